//! The typed handle of a twin (`TwinHandle`; the DTA's and the device type's handles live
//! with their actors, in `dta` and `tdta`): the only way embedders and the protocol edges
//! talk to twins. Handles wrap actix addresses so that the actor crate could be
//! swapped, survive restarts of the actor behind them (they point at the twin's slot,
//! not its mailbox), and put a deadline on the platform clock on every request.

use crate::access::{AccessControl, AuditEntry};
use crate::context::Infra;
use crate::dti::{
    Ask, Command, Events, Get, InjectPanic, Request, Retire, Telemetry, ToDevice, TwinSlot, TwinView, ViewInto,
    ViewSink,
};
use crate::error::TwinError;
use crate::telemetry::{TelemetryPage, TelemetryQuery};
use actix::MailboxError;
use futures::FutureExt;
use futures::future::Either;
use serde_json::{Map, Value};
use std::future::Future;
use std::sync::Arc;
use twinfleet_models::{CommandId, DeviceCommand, DeviceTypeId, MetricPoint, TwinCommand, TwinEvent, TwinId};
use twinfleet_runtime::{ActorStats, ActorStatus, ActorView, WriteBatch};

/// Awaits an actor's answer with the platform's request deadline.
///
/// A combinator, not an `async fn`: an `async fn` keeps its argument and the pinned copy
/// it awaits side by side, and every layer of a request doubled the caller's future that
/// way (a `get` was 6 KB, copied on every call).
///
/// (A message that never reached its actor takes itself out of the mailbox depth: every
/// message carries a `Queued`.)
pub(crate) fn deliver<'a, T>(
    request: impl Future<Output = Result<Result<T, TwinError>, MailboxError>> + 'a,
    stats: &'a ActorStats,
    infra: &Infra,
) -> impl Future<Output = Result<T, TwinError>> + 'a {
    let ms = infra.settings.request_timeout_ms;
    Timed { request, deadline: infra.clock.sleep(ms) }.map(move |answer| match answer {
        Some(Ok(r)) => r,
        Some(Err(_)) => {
            Err(TwinError::Unavailable { kind: stats.kind, id: stats.id.to_string(), status: stats.status() })
        }
        None => Err(TwinError::Timeout { kind: stats.kind, id: stats.id.to_string(), ms }),
    })
}

pin_project_lite::pin_project! {
    /// `request`, polled in place, or `None` once `deadline` passes first.
    struct Timed<F> {
        #[pin]
        request: F,
        deadline: futures::future::BoxFuture<'static, ()>,
    }
}

impl<F: Future> Future for Timed<F> {
    type Output = Option<F::Output>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = self.project();
        if let std::task::Poll::Ready(r) = this.request.poll(cx) {
            return std::task::Poll::Ready(Some(r));
        }
        this.deadline.as_mut().poll(cx).map(|()| None)
    }
}

/// A handle to one DTI.
///
/// A request enters the twin's mailbox when its method is called; the future it returns
/// awaits the answer (under the platform's request deadline). Dropping that future
/// before the twin takes the request withdraws it (actix skips a message nobody awaits);
/// after, only the answer is lost.
#[derive(Debug, Clone)]
pub struct TwinHandle {
    slot: Arc<TwinSlot>,
}

impl TwinHandle {
    pub(crate) fn new(slot: Arc<TwinSlot>) -> Self {
        TwinHandle { slot }
    }

    pub fn id(&self) -> &TwinId {
        &self.slot.id
    }

    pub fn device_type(&self) -> &DeviceTypeId {
        &self.slot.ty.device_type
    }

    /// The actor's statistics, read without sending it a message.
    pub fn actor(&self) -> ActorView {
        self.slot.stats.view()
    }

    /// Puts `req` in the mailbox now (or parks it while the mailbox is full) and
    /// returns the future of the answer.
    fn post<Q: Request>(
        &self,
        req: Q,
    ) -> Result<impl Future<Output = Result<Q::Reply, TwinError>> + use<Q>, TwinError> {
        let Some(request) = self.slot.with_addr(|a| a.send(Ask::new(req, &self.slot))) else {
            return Err(self.gone());
        };
        let slot = self.slot.clone();
        Ok(async move {
            // Early returns, so that only the flush's boxed future is kept across its
            // await (not the answer and the reply it was taken from).
            let answered = async {
                let answered = match request.await {
                    Ok(Ok(answered)) => answered,
                    Ok(Err(e)) => return Ok(Err(e)),
                    Err(e) => return Err(e),
                };
                let flushed = match answered.finish(&slot) {
                    Ok(reply) => return Ok(Ok(reply)),
                    Err(flushed) => flushed,
                };
                Ok(flushed.await)
            };
            match deliver(answered, &slot.stats, &slot.ty.infra).await {
                Err(TwinError::Unavailable { .. }) => Err(TwinHandle { slot }.gone()),
                r => r,
            }
        })
    }

    /// Why the twin cannot take a request: a retired (deleted) twin is gone for good
    /// (404), any other state is transient (503).
    fn gone(&self) -> TwinError {
        match self.slot.stats.status() {
            ActorStatus::Stopped => TwinError::NotFound(self.slot.id.to_string()),
            status => TwinError::Unavailable { kind: "twin", id: self.slot.id.to_string(), status },
        }
    }

    /// `post`, with its refusal as the future's output. Not an `async fn` with `?`: that
    /// kept the posted future and the awaited one side by side.
    pub(crate) fn request<Q: Request>(
        &self,
        req: Q,
    ) -> impl Future<Output = Result<Q::Reply, TwinError>> + Send + use<Q> {
        match self.post(req) {
            Ok(posted) => Either::Left(posted),
            Err(e) => Either::Right(std::future::ready(Err(e))),
        }
    }

    pub fn get(&self) -> impl Future<Output = Result<TwinView, TwinError>> + Send + use<> {
        self.request(Get)
    }

    /// Its current (or last) app install, without the rest of its view.
    pub fn install(
        &self,
    ) -> impl Future<Output = Result<Option<twinfleet_models::install::InstallJob>, TwinError>> + Send + use<> {
        self.request(crate::dti::InstallOf)
    }

    /// Its effective monitoring rules: each with the layer that set it last and its
    /// phase, and the rules that do not resolve.
    pub fn rules(&self) -> impl Future<Output = Result<crate::dti::monitor::RulesView, TwinError>> + Send + use<> {
        self.request(crate::dti::Rules)
    }

    /// Applies a command; resolves with the journal sequence number once it is durable.
    pub fn command(&self, cmd: TwinCommand) -> impl Future<Output = Result<u64, TwinError>> + Send + use<> {
        self.request(Command(cmd, WriteBatch::new()))
    }

    /// Like `command`, and stores `audit` (its id set) in the same atomic batch as the
    /// change, only if the twin accepts the command: the change and the entry that
    /// describes it are durable together, after one flush.
    pub fn command_audited(
        &self,
        cmd: TwinCommand,
        audit: &AuditEntry,
    ) -> impl Future<Output = Result<u64, TwinError>> + Send + use<> {
        self.request(Command(cmd, AccessControl::audit_batch(audit)))
    }

    /// Like `command`, but fails at once with `MailboxFull` instead of waiting for room.
    /// The command is in the mailbox when this returns `Ok`.
    pub fn try_command(
        &self,
        cmd: TwinCommand,
    ) -> Result<impl Future<Output = Result<u64, TwinError>> + use<>, TwinError> {
        if self.slot.stats.mailbox_depth() as usize >= self.slot.ty.infra.settings.dti_mailbox {
            return Err(TwinError::MailboxFull(self.slot.id.to_string()));
        }
        self.post(Command(cmd, WriteBatch::new()))
    }

    pub fn report(&self, patch: Map<String, Value>) -> impl Future<Output = Result<u64, TwinError>> + Send + use<> {
        self.command(TwinCommand::Report(patch))
    }

    pub fn set_desired(
        &self,
        patch: Map<String, Value>,
    ) -> impl Future<Output = Result<u64, TwinError>> + Send + use<> {
        self.command(TwinCommand::SetDesired(patch))
    }

    /// Records the device's answer to command `command_id` (its decimal form, as on the
    /// wire). An id the twin never minted, or no longer awaits, is refused with
    /// `Rejected(UnmatchedAck)` and changes nothing.
    pub fn ack(
        &self,
        command_id: String,
        success: bool,
        message: String,
    ) -> impl Future<Output = Result<u64, TwinError>> + Send + use<> {
        self.command(TwinCommand::Ack { command_id, success, message })
    }

    /// The last `limit` journal events, oldest first.
    pub fn events(&self, limit: usize) -> impl Future<Output = Result<Vec<TwinEvent>, TwinError>> + Send + use<> {
        self.request(Events(limit))
    }

    /// Stores a telemetry batch like [`TwinHandle::telemetry`], written together with
    /// the batches other twins of its type and arbiter receive meanwhile (one mailbox
    /// message per twin on its own arbiter, one sled batch and one series submission
    /// per drain; `dti::ingest`). Resolves with the number of points once durable.
    pub async fn ingest(&self, points: Vec<MetricPoint>) -> Result<usize, TwinError> {
        crate::dti::ingest::ingest(&self.slot, points).await
    }

    /// Stores a telemetry batch (accepted or rejected whole); resolves with the number
    /// of points once they are durable.
    pub fn telemetry(&self, points: Vec<MetricPoint>) -> impl Future<Output = Result<usize, TwinError>> + Send + use<> {
        self.request(Telemetry(points))
    }

    /// Stores app log lines (accepted or rejected whole, through the twin, so an
    /// archived or deleted twin takes none); resolves with their number once durable.
    pub fn append_logs(
        &self,
        lines: Vec<twinfleet_models::LogLine>,
    ) -> impl Future<Output = Result<usize, TwinError>> + Send + use<> {
        self.request(crate::dti::AppendLogs(lines))
    }

    /// One page of the twin's app log lines, newest first, read from storage on the
    /// blocking pool (not through the twin), like [`TwinHandle::telemetry_page`].
    pub async fn logs_page(&self, q: crate::logs::LogQuery) -> Result<crate::logs::LogPage, TwinError> {
        if let Some(c) = &q.cursor
            && crate::logs::parse_cursor(c).is_none()
        {
            return Err(TwinError::Invalid(format!("cursor {c:?} is not a page's next")));
        }
        let storage = self.slot.ty.infra.storage.clone();
        let id = self.slot.id.clone();
        tokio::task::spawn_blocking(move || crate::logs::read_page(&*storage, &id, &q))
            .await
            .map_err(|e| TwinError::Invalid(format!("log read failed: {e}")))?
            .map_err(TwinError::from)
    }

    /// Stored points, newest first: the first page of [`TwinHandle::telemetry_page`].
    pub async fn telemetry_query(&self, q: TelemetryQuery) -> Result<Vec<MetricPoint>, TwinError> {
        Ok(self.telemetry_page(q).await?.points)
    }

    /// One page of stored points, newest first, read from storage on the blocking pool:
    /// the twin's mailbox and arbiter are not involved, so a long read holds up no
    /// twin. It sees every point this twin acknowledged before (a point is in the
    /// series store's heads before its write is acknowledged).
    pub async fn telemetry_page(&self, q: TelemetryQuery) -> Result<TelemetryPage, TwinError> {
        let infra = &self.slot.ty.infra;
        let (storage, series) = (infra.storage.clone(), infra.series.clone());
        let ns = self.slot.ty.device_type.to_string();
        let id = self.slot.id.clone();
        tokio::task::spawn_blocking(move || crate::telemetry::read_page(&series, &*storage, &ns, &id, &q))
            .await
            .map_err(|e| TwinError::Invalid(format!("telemetry read failed: {e}")))?
            .map_err(TwinError::from)
    }

    /// The query's metrics downsampled into buckets of `width_ms` (min, max, avg, last,
    /// count), oldest first, read from storage on the blocking pool like
    /// [`TwinHandle::telemetry_page`]. At most [`crate::telemetry::MAX_BUCKETS`] buckets
    /// per metric (`(to - from) / width_ms`); more is an `Invalid` error.
    pub async fn telemetry_buckets(
        &self,
        q: TelemetryQuery,
        width_ms: i64,
    ) -> Result<Vec<crate::telemetry::MetricBuckets>, TwinError> {
        use crate::telemetry::MAX_BUCKETS;
        if width_ms < 1 {
            return Err(TwinError::Invalid(format!("a bucket is at least 1 ms wide, not {width_ms}")));
        }
        if q.to.0.saturating_sub(q.from.0) / width_ms >= MAX_BUCKETS {
            return Err(TwinError::Invalid(format!(
                "{} ms in buckets of {width_ms} ms is more than {MAX_BUCKETS} buckets; ask for wider buckets or a shorter range",
                q.to.0.saturating_sub(q.from.0)
            )));
        }
        let infra = &self.slot.ty.infra;
        let (storage, series) = (infra.storage.clone(), infra.series.clone());
        let ns = self.slot.ty.device_type.to_string();
        let id = self.slot.id.clone();
        tokio::task::spawn_blocking(move || crate::telemetry::read_buckets(&series, &*storage, &ns, &id, &q, width_ms))
            .await
            .map_err(|e| TwinError::Invalid(format!("telemetry read failed: {e}")))?
            .map_err(TwinError::from)
    }

    /// Sends a command to the device through whichever transport reaches it (MQTT
    /// publish, gRPC command stream or a call to its DeviceControl server). The twin
    /// mints the command's id and journals it (`command_sent`) before the transport gets
    /// it; resolves with that id once the transport has it. The device's answer arrives
    /// as a `command_acked` event, over any transport, after a restart too.
    pub fn send_to_device(
        &self,
        cmd: DeviceCommand,
    ) -> impl Future<Output = Result<CommandId, TwinError>> + Send + use<> {
        self.request(ToDevice(cmd))
    }

    pub(crate) fn slot(&self) -> &Arc<TwinSlot> {
        &self.slot
    }

    /// Stops the twin for good, after everything queued before (see `delete_twin`).
    pub(crate) fn retire(&self) -> impl Future<Output = Result<(), TwinError>> + Send + use<> {
        self.request(Retire)
    }

    /// Makes the twin panic (only where the platform allows fault injection).
    pub fn inject_panic(&self) -> impl Future<Output = Result<(), TwinError>> + Send + use<> {
        self.request(InjectPanic)
    }
}

/// The views of many twins, in the order given (`Err` in place of a twin that was not
/// found). Each twin answers from its own mailbox, in turn with what was queued before,
/// as it answers [`TwinHandle::get`]; only the asking is batched: the twins of one
/// arbiter are asked together by a task on that arbiter (one cross-thread message per
/// arbiter and call, instead of a round trip, a timer and two wake-ups per twin). Each
/// arbiter's group has the platform's request deadline; a twin that has not answered by
/// then gets `Timeout`.
pub(crate) async fn views(
    infra: &Infra,
    slots: Vec<Result<Arc<TwinSlot>, TwinError>>,
) -> Vec<Result<TwinView, TwinError>> {
    let arbiters = infra.arbiters.len().max(1);
    let mut groups: Vec<Vec<Arc<TwinSlot>>> = (0..arbiters).map(|_| Vec::new()).collect();
    // Each twin's group; a group answers in the order its twins were given, so the
    // answers are taken back from each group's answers in turn.
    let places: Vec<Result<u16, TwinError>> = slots
        .into_iter()
        .map(|slot| {
            slot.map(|slot| {
                let a = usize::from(slot.arbiter) % arbiters;
                groups[a].push(slot);
                a as u16
            })
        })
        .collect();
    let ms = infra.settings.request_timeout_ms;
    let asked: Vec<_> = groups
        .into_iter()
        .enumerate()
        .map(|(a, group)| {
            let n = group.len();
            let (tx, rx) = tokio::sync::oneshot::channel();
            if n > 0 {
                let deadline = infra.clock.clone();
                infra.arbiters.run_on(a, move || {
                    actix::spawn(async move {
                        let _ = tx.send(ask_here(group, deadline.sleep(ms), ms).await);
                    });
                });
            }
            // Without an answer its arbiter stopped first: the platform is stopping.
            rx.map(move |answered| answered.unwrap_or_else(|_| (0..n).map(|_| Err(TwinError::ShuttingDown)).collect()))
        })
        .collect();
    let mut answers: Vec<std::vec::IntoIter<Result<TwinView, TwinError>>> =
        futures::future::join_all(asked).await.into_iter().map(Vec::into_iter).collect();
    places
        .into_iter()
        .map(|place| {
            let a = place?;
            answers[usize::from(a)].next().expect("a group answers for each of its twins")
        })
        .collect()
}

/// On the twins' arbiter: asks every twin of `group` at once (a [`ViewInto`] each, so
/// no reply channel or future per twin) and collects the views, in the group's order,
/// until `deadline`.
async fn ask_here(
    group: Vec<Arc<TwinSlot>>,
    deadline: futures::future::BoxFuture<'static, ()>,
    ms: u64,
) -> Vec<Result<TwinView, TwinError>> {
    let sink = ViewSink::new(group.len());
    // Twins whose mailbox is full wait for room, like any other request.
    let mut parked = Vec::new();
    for (k, slot) in group.iter().enumerate() {
        let ask = Ask::new(ViewInto { k: k as u32, sink: sink.clone() }, slot);
        match slot.with_addr(|a| a.try_send(ask)) {
            Some(Ok(())) | None => {}
            Some(Err(actix::dev::SendError::Full(ask))) => parked.push(slot.with_addr(|a| a.send(ask))),
            Some(Err(actix::dev::SendError::Closed(_))) => {}
        }
    }
    let waited = async {
        futures::future::join_all(parked.into_iter().flatten()).await;
        sink.all_done().await;
    };
    let timed_out =
        matches!(futures::future::select(std::pin::pin!(waited), deadline).await, futures::future::Either::Right(_));
    group
        .into_iter()
        .zip(sink.take())
        .map(|(slot, view)| match view {
            Some(view) => Ok(view),
            None if timed_out && slot.stats.status() == ActorStatus::Running => {
                Err(TwinError::Timeout { kind: slot.stats.kind, id: slot.stats.id.to_string(), ms })
            }
            None => Err(TwinHandle::new(slot).gone()),
        })
        .collect()
}
