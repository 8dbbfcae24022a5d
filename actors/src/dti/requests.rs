//! Every request a DTI takes, each with its own reply type, and how the actor runs it.

use super::*;
use crate::queued::Queued;
use twinfleet_models::LogLine;

/// A request to a DTI with its own reply type, so a caller can never get the answer of
/// another request. Every trigger of the actor is one of the types below that implement
/// this trait (all in this module), or one of its wait timers.
pub(crate) trait Request: Send + 'static {
    type Reply: Send + 'static;
    fn run(self, dti: &mut Dti, ctx: &mut Context<Dti>) -> Outcome<Self::Reply>;
}

/// The envelope of a [`Request`] in the actor's mailbox; it counts in the twin's
/// mailbox depth until the twin takes it (see [`Queued`]).
pub(crate) struct Ask<Q>(pub Q, pub(crate) Queued);

impl<Q> Ask<Q> {
    pub(crate) fn new(req: Q, slot: &Arc<TwinSlot>) -> Self {
        Ask(req, Queued::new(slot))
    }
}

impl<Q: Request> Message for Ask<Q> {
    type Result = Result<Answered<Q::Reply>, TwinError>;
}

/// What the actor hands back: the reply, or the reply once the batch behind `ticket`
/// is durable. The caller awaits that flush itself, so the storage writer wakes the
/// caller directly instead of the twin's arbiter and then the caller.
pub(crate) enum Answered<R> {
    Ready(R),
    AfterFlush { ticket: Ticket, snapshot: Option<u64>, reply: R },
}

impl<R: Send + 'static> Answered<R> {
    /// The reply, or the future of the reply once durable. A refused write restarts
    /// the twin from storage (the change is in its memory but not on disk). The flush is
    /// awaited in a future of its own, so a caller's future does not carry a large reply
    /// (a twin's view) across that await.
    pub(crate) fn finish(
        self,
        slot: &Arc<TwinSlot>,
    ) -> Result<R, futures::future::BoxFuture<'static, Result<R, TwinError>>> {
        match self {
            Answered::Ready(r) => Ok(r),
            Answered::AfterFlush { ticket, snapshot, reply } => {
                let slot = slot.clone();
                Err(Box::pin(async move {
                    match Applied::stored(ticket, snapshot, &slot).await {
                        Ok(()) => Ok(reply),
                        Err(e) => {
                            slot.with_addr(|a| a.do_send(Reload(e.to_string())));
                            Err(e.into())
                        }
                    }
                }))
            }
        }
    }
}

/// The twin's view.
#[derive(Debug)]
pub(crate) struct Get;
/// The twin's current (or last) install, without the rest of its view.
#[derive(Debug)]
pub(crate) struct InstallOf;
/// The twin's effective rules, each with its layer and phase.
#[derive(Debug)]
pub(crate) struct Rules;
/// The type's rules changed: resolve them and look at once.
#[derive(Debug)]
pub(crate) struct RulesChanged;
/// A command, and records to write in the same atomic batch if it is accepted;
/// answered with the journal sequence number once durable.
#[derive(Debug)]
pub(crate) struct Command(pub TwinCommand, pub WriteBatch);
/// The last `limit` journal events.
#[derive(Debug)]
pub(crate) struct Events(pub usize);
#[derive(Debug)]
pub(crate) struct Join(pub Arc<ResolvedLayers>);
#[derive(Debug)]
pub(crate) struct Leave(pub DtaId);
#[derive(Debug)]
pub(crate) struct LayersChanged(pub Arc<ResolvedLayers>);
/// The type's configuration template changed: fill it in again.
#[derive(Debug)]
pub(crate) struct TemplateChanged;
#[derive(Debug)]
pub(crate) struct Telemetry(pub Vec<MetricPoint>);
/// A telemetry batch taken in but not written: the caller writes it with other twins'
/// (see `crate::ingest`).
#[derive(Debug)]
pub(crate) struct Prepare(pub Vec<MetricPoint>);

/// What a prepared telemetry batch needs written.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub batch: WriteBatch,
    pub series: SeriesBatch,
    pub points: usize,
    /// The `last_seq` of a snapshot in `batch` (a rule's phase changed), to record once
    /// it is durable.
    pub snapshot: Option<u64>,
}
/// App log lines to store; answered with their number once durable.
#[derive(Debug)]
pub(crate) struct AppendLogs(pub Vec<LogLine>);
#[derive(Debug)]
pub(crate) struct InjectPanic;
/// A command for the device; answered with the id the twin minted for it, once the
/// transport has it.
#[derive(Debug)]
pub(crate) struct ToDevice(pub DeviceCommand);
/// Stop for good (the twin is being deleted): answered after everything queued before
/// it; nothing is written after the answer.
#[derive(Debug)]
pub(crate) struct Retire;

/// What an accepted write answers: its journal sequence number.
fn seq(r: Result<Applied, TwinError>) -> Outcome<u64> {
    match r {
        Ok(applied) => {
            let seq = applied.seq;
            Outcome::AfterFlush(applied, seq)
        }
        Err(e) => Outcome::Now(Err(e)),
    }
}

impl Request for RulesChanged {
    type Reply = ();
    fn run(self, dti: &mut Dti, ctx: &mut Context<Dti>) -> Outcome<()> {
        dti.rules_changed(ctx);
        Outcome::Now(Ok(()))
    }
}

impl Request for Rules {
    type Reply = super::monitor::RulesView;
    fn run(self, dti: &mut Dti, _: &mut Context<Dti>) -> Outcome<Self::Reply> {
        Outcome::Now(Ok(dti.rules_view()))
    }
}

impl Request for InstallOf {
    type Reply = Option<twinfleet_models::install::InstallJob>;
    fn run(self, dti: &mut Dti, _: &mut Context<Dti>) -> Outcome<Self::Reply> {
        Outcome::Now(Ok(dti.state.install.as_deref().cloned()))
    }
}

impl Request for Get {
    type Reply = TwinView;
    fn run(self, dti: &mut Dti, _: &mut Context<Dti>) -> Outcome<TwinView> {
        Outcome::Now(Ok(dti.view()))
    }
}

/// A `Get` that is one of many asked together (`handle::views`): the twin puts its view
/// into the batch's sink, at its place `k`, instead of answering through a channel of
/// its own. Dropped untaken (a stopped twin, a panic), it leaves its place empty and
/// counts itself done all the same, so the batch never waits for it.
pub(crate) struct ViewInto {
    pub k: u32,
    pub sink: Arc<ViewSink>,
}

/// Where the twins of one batch put their views; see [`ViewInto`].
pub(crate) struct ViewSink {
    views: parking_lot::Mutex<Vec<Option<TwinView>>>,
    remaining: std::sync::atomic::AtomicUsize,
    done: futures::task::AtomicWaker,
}

impl ViewSink {
    /// A sink for `places` twins: the batch must make exactly one [`ViewInto`] per place
    /// (each counts itself done when it is dropped, answered or not).
    pub(crate) fn new(places: usize) -> Arc<Self> {
        Arc::new(ViewSink {
            views: parking_lot::Mutex::new(vec![None; places]),
            remaining: std::sync::atomic::AtomicUsize::new(places),
            done: Default::default(),
        })
    }

    /// Resolves once every twin asked has put its view or dropped its request.
    pub(crate) fn all_done(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            self.done.register(cx.waker());
            if self.remaining.load(std::sync::atomic::Ordering::Acquire) == 0 {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
    }

    /// The views, by place (`None`: not answered).
    pub(crate) fn take(&self) -> Vec<Option<TwinView>> {
        std::mem::take(&mut *self.views.lock())
    }

    fn one_done(&self) {
        if self.remaining.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            self.done.wake();
        }
    }
}

impl Drop for ViewInto {
    fn drop(&mut self) {
        self.sink.one_done();
    }
}

impl Request for ViewInto {
    type Reply = ();
    fn run(self, dti: &mut Dti, _: &mut Context<Dti>) -> Outcome<()> {
        let view = dti.view();
        if let Some(place) = self.sink.views.lock().get_mut(self.k as usize) {
            *place = Some(view);
        }
        Outcome::Now(Ok(()))
    }
}

impl Request for Command {
    type Reply = u64;
    fn run(self, dti: &mut Dti, ctx: &mut Context<Dti>) -> Outcome<u64> {
        // What a template may be filled from: its overrides and metadata.
        let refill = matches!(self.0, TwinCommand::SetOverrides(_) | TwinCommand::UpdateMetadata(_));
        let r = dti.apply(self.0, self.1, ctx);
        if refill && r.is_ok() {
            dti.fill_template(ctx);
        }
        seq(r)
    }
}

impl Request for Events {
    type Reply = Vec<TwinEvent>;
    fn run(self, dti: &mut Dti, _: &mut Context<Dti>) -> Outcome<Vec<TwinEvent>> {
        Outcome::Later(dti.read_events(self.0))
    }
}

impl Request for Join {
    type Reply = u64;
    fn run(self, dti: &mut Dti, ctx: &mut Context<Dti>) -> Outcome<u64> {
        let resolved = self.0;
        let r = dti.apply(TwinCommand::JoinDta(resolved.dta.clone()), WriteBatch::new(), ctx);
        if r.is_ok() {
            let mut layers = std::mem::take(&mut dti.layers).into_vec();
            layers.retain(|l| l.dta != resolved.dta);
            layers.push(resolved);
            dti.layers = layers.into_boxed_slice();
            dti.rules_changed(ctx);
            dti.fill_template(ctx);
        }
        seq(r)
    }
}

impl Request for Leave {
    type Reply = u64;
    fn run(self, dti: &mut Dti, ctx: &mut Context<Dti>) -> Outcome<u64> {
        let r = dti.apply(TwinCommand::LeaveDta(self.0.clone()), WriteBatch::new(), ctx);
        if r.is_ok() {
            let mut layers = std::mem::take(&mut dti.layers).into_vec();
            layers.retain(|l| l.dta != self.0);
            dti.layers = layers.into_boxed_slice();
            dti.rules_changed(ctx);
            dti.fill_template(ctx);
        }
        seq(r)
    }
}

impl Request for LayersChanged {
    type Reply = ();
    fn run(self, dti: &mut Dti, ctx: &mut Context<Dti>) -> Outcome<()> {
        let resolved = self.0;
        if let Some(l) = dti.layers.iter_mut().find(|l| l.dta == resolved.dta)
            && resolved.version > l.version
        {
            *l = resolved;
            dti.rules_changed(ctx);
            dti.fill_template(ctx);
        }
        Outcome::Now(Ok(()))
    }
}

impl Request for TemplateChanged {
    type Reply = ();
    fn run(self, dti: &mut Dti, ctx: &mut Context<Dti>) -> Outcome<()> {
        dti.fill_template(ctx);
        Outcome::Now(Ok(()))
    }
}

impl Request for Telemetry {
    type Reply = usize;
    fn run(self, dti: &mut Dti, ctx: &mut Context<Dti>) -> Outcome<usize> {
        match dti.store_telemetry(self.0, ctx) {
            Ok((ticket, points, snapshot)) => Outcome::AfterFlush(
                Applied { seq: 0, ticket, deliveries: Vec::new(), must_deliver: false, snapshot },
                points,
            ),
            Err(e) => Outcome::Now(Err(e)),
        }
    }
}

impl Request for AppendLogs {
    type Reply = usize;
    fn run(self, dti: &mut Dti, ctx: &mut Context<Dti>) -> Outcome<usize> {
        match dti.store_logs(self.0, ctx) {
            Ok((ticket, n, snapshot)) => Outcome::AfterFlush(
                Applied { seq: 0, ticket, deliveries: Vec::new(), must_deliver: false, snapshot },
                n,
            ),
            Err(e) => Outcome::Now(Err(e)),
        }
    }
}

impl Request for Prepare {
    type Reply = Prepared;
    fn run(self, dti: &mut Dti, ctx: &mut Context<Dti>) -> Outcome<Prepared> {
        Outcome::Now(dti.prepare_telemetry(self.0, ctx))
    }
}

impl Request for ToDevice {
    type Reply = CommandId;
    fn run(self, dti: &mut Dti, ctx: &mut Context<Dti>) -> Outcome<CommandId> {
        match dti.apply(TwinCommand::SendToDevice(self.0), WriteBatch::new(), ctx) {
            Ok(applied) => {
                let id = applied.deliveries.first().map(|(id, _)| *id).unwrap_or(CommandId(0));
                Outcome::AfterFlush(Applied { must_deliver: true, ..applied }, id)
            }
            Err(e) => Outcome::Now(Err(e)),
        }
    }
}

impl Request for Retire {
    type Reply = ();
    fn run(self, dti: &mut Dti, ctx: &mut Context<Dti>) -> Outcome<()> {
        for timer in dti.timers.take_all() {
            ctx.cancel_future(timer);
        }
        if let Some(t) = dti.idle.take() {
            ctx.cancel_future(t);
        }
        dti.slot.set_addr(None);
        dti.slot.stats.set_status(ActorStatus::Stopped);
        ctx.stop();
        Outcome::Now(Ok(()))
    }
}

impl Request for InjectPanic {
    type Reply = ();
    fn run(self, dti: &mut Dti, _: &mut Context<Dti>) -> Outcome<()> {
        if !dti.env().settings.allow_fault_injection {
            return Outcome::Now(Err(TwinError::FaultInjectionDisabled));
        }
        panic!("fault injected into twin {}", dti.slot.id)
    }
}
