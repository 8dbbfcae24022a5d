//! The DTI: one actor per device. It owns the twin's state, applies commands through the
//! pure step functions of `twinfleet-models`, persists each change (snapshot + journal
//! events, one atomic batch) and answers only after the flush.
//!
//! Failure: the synchronous part of every handler and timer runs under `catch_unwind`. A
//! panic stops only this actor; its TDTA is told and restarts it from storage. The
//! desired-state watchdog: while the reported state does not cover the desired state, the
//! twin waits with a deadline, re-sends the desired state on expiry with backoff, and
//! raises an alert when its retries are used up.

use crate::env::{DeviceCommand, TwinEnv};
use crate::error::TwinError;
use crate::records::{TELEMETRY_SPAN_MS, journal_key, journal_prefix, telemetry_key, twin_key};
use crate::tdta::{ChildFailed, TypeContext};
use actix::prelude::*;
use parking_lot::RwLock;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use twinfleet_models::{
    Alert, AlertKind, DtaId, EffectiveConfig, EventKind, LayerRef, Lifecycle, MetricPoint, Severity, Timestamp,
    TwinCommand, TwinEvent, TwinId, TwinState, WaitDecision, decode_batch, effective_config, encode_batch,
    validate_batch,
};
use twinfleet_runtime::{ActorStats, ActorStatus, Space, Ticket, WriteBatch, decode_record, encode_record, panic};

/// Marks a twin that has no packed fleet record to fall back to.
pub(crate) const NO_ORIGIN: u32 = u32::MAX;

/// The configuration layers a DTA hands to its members: its own and its ancestors'.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedLayers {
    pub dta: DtaId,
    /// Newer pushes carry larger versions; a twin ignores an older one arriving late.
    pub version: u64,
    pub layers: Vec<LayerRef>,
}

/// The stable home of a twin in the directory. The actor behind it comes and goes with
/// restarts; handles keep pointing at the slot.
#[derive(Debug)]
pub struct TwinSlot {
    pub(crate) id: TwinId,
    pub(crate) stats: ActorStats,
    addr: RwLock<Option<Addr<Dti>>>,
    pub(crate) ty: Arc<TypeContext>,
    /// Index of the packed fleet record this twin was created from, or `NO_ORIGIN`.
    pub(crate) origin: u32,
    /// The arbiter the twin runs on (and is restarted on).
    pub(crate) arbiter: u16,
    /// What listings filter on without asking the actor: set at every start and after
    /// every change of metadata or lifecycle.
    archived: AtomicBool,
    tags: RwLock<Option<Arc<[String]>>>,
}

impl TwinSlot {
    pub(crate) fn new(id: TwinId, ty: Arc<TypeContext>, origin: u32, arbiter: u16) -> Self {
        let stats = ActorStats::new("dti", id.as_arc().clone(), Some(ty.path.clone()));
        TwinSlot {
            id,
            stats,
            addr: RwLock::new(None),
            ty,
            origin,
            arbiter,
            archived: AtomicBool::new(false),
            tags: RwLock::new(None),
        }
    }

    fn set_summary(&self, state: &TwinState) {
        self.archived.store(state.lifecycle == Lifecycle::Archived, Relaxed);
        let tags = &state.metadata.tags;
        *self.tags.write() = (!tags.is_empty()).then(|| Arc::from(tags.as_slice()));
    }

    pub(crate) fn archived(&self) -> bool {
        self.archived.load(Relaxed)
    }

    pub(crate) fn has_tag(&self, tag: &str) -> bool {
        self.tags.read().as_ref().is_some_and(|t| t.iter().any(|x| x == tag))
    }

    pub(crate) fn tags(&self) -> Vec<String> {
        self.tags.read().as_deref().map(<[String]>::to_vec).unwrap_or_default()
    }

    pub(crate) fn set_addr(&self, addr: Option<Addr<Dti>>) {
        *self.addr.write() = addr;
    }

    /// Runs `f` with the live address, without cloning it (an `Addr` clone allocates).
    pub(crate) fn with_addr<R>(&self, f: impl FnOnce(&Addr<Dti>) -> R) -> Option<R> {
        self.addr.read().as_ref().map(f)
    }
}

/// A request to a DTI. One closed enum, so every trigger of the actor is listed here.
#[derive(Debug)]
pub(crate) enum DtiRequest {
    Get,
    /// A command, and records to write in the same atomic batch if it is accepted.
    Command(TwinCommand, WriteBatch),
    Events {
        limit: usize,
    },
    Join(Arc<ResolvedLayers>),
    Leave(DtaId),
    LayersChanged(Arc<ResolvedLayers>),
    Telemetry(Vec<MetricPoint>),
    TelemetryQuery(TelemetryQuery),
    InjectPanic,
    ToDevice(DeviceCommand),
    /// Stop for good (the twin is being deleted): answered after everything queued
    /// before it; nothing is written after the answer.
    Retire,
}

/// Which stored points to return: `metric` (all when `None`) with `from <= at <= to`,
/// newest first, at most `limit`.
#[derive(Debug, Clone)]
pub struct TelemetryQuery {
    pub metric: Option<String>,
    pub from: Timestamp,
    pub to: Timestamp,
    pub limit: usize,
}

#[derive(Debug)]
pub(crate) enum DtiReply {
    View(Box<TwinView>),
    Ack { seq: u64 },
    Events(Vec<TwinEvent>),
    Points(Vec<MetricPoint>),
    Stored { points: usize },
    Done,
}

pub(crate) struct DtiMsg(pub DtiRequest);

impl Message for DtiMsg {
    type Result = Result<DtiReply, TwinError>;
}

/// What a twin shows of itself.
#[derive(Debug, Clone, Serialize)]
pub struct TwinView {
    #[serde(flatten)]
    pub state: TwinState,
    pub effective_config: EffectiveConfig,
    pub in_sync: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired_sync: Option<WaitView>,
    /// The newest value of each metric the device sent: `metric → {at, value}`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub telemetry_latest: BTreeMap<String, LatestPoint>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatestPoint {
    pub at: Timestamp,
    pub value: f64,
}

/// A wait the twin owns, as shown to operators.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct WaitView {
    pub attempt: u32,
    pub deadline: Timestamp,
}

struct SyncWait {
    attempt: u32,
    deadline: Timestamp,
    timer: SpawnHandle,
}

pub struct Dti {
    slot: Arc<TwinSlot>,
    state: TwinState,
    /// Resolved layers of each direct membership.
    layers: Vec<Arc<ResolvedLayers>>,
    sync: Option<SyncWait>,
    /// Set when this incarnation is a restart: recorded in the journal on start.
    restart: Option<(String, u32)>,
    /// Newest value per metric. Boxed on purpose: a twin without telemetry pays 8 bytes
    /// instead of 24, and a million idle twins is the common case.
    #[allow(clippy::box_collection)]
    latest: Option<Box<BTreeMap<String, LatestPoint>>>,
}

impl std::fmt::Debug for Dti {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dti").field("id", &self.slot.id).field("last_seq", &self.state.last_seq).finish()
    }
}

enum Outcome {
    Now(Result<DtiReply, TwinError>),
    AfterFlush(Ticket, DtiReply),
    Later(futures::future::BoxFuture<'static, Result<DtiReply, TwinError>>),
}

impl Dti {
    /// Starts the actor on the current arbiter and publishes its address in the slot.
    pub(crate) fn launch(
        slot: Arc<TwinSlot>,
        state: TwinState,
        layers: Vec<Arc<ResolvedLayers>>,
        restart: Option<(String, u32)>,
    ) -> Addr<Dti> {
        let cap = slot.ty.env.settings.dti_mailbox;
        slot.set_summary(&state);
        let s = slot.clone();
        let addr = Dti::create(move |ctx| {
            ctx.set_mailbox_capacity(cap);
            Dti { slot: s, state, layers, sync: None, restart, latest: None }
        });
        slot.set_addr(Some(addr.clone()));
        addr
    }

    fn env(&self) -> &TwinEnv {
        &self.slot.ty.env
    }

    fn view(&self) -> TwinView {
        let defaults = self.slot.ty.defaults();
        let layers = self.layers.iter().flat_map(|r| r.layers.iter());
        TwinView {
            state: self.state.clone(),
            effective_config: effective_config(&defaults, layers, &self.state.overrides),
            in_sync: self.state.in_sync(),
            desired_sync: self.sync.as_ref().map(|w| WaitView { attempt: w.attempt, deadline: w.deadline }),
            telemetry_latest: self.latest.as_deref().cloned().unwrap_or_default(),
        }
    }

    /// Validates a batch and stores it, one record per clock hour it touches.
    fn store_telemetry(&mut self, mut points: Vec<MetricPoint>) -> Result<(Ticket, usize), TwinError> {
        let env = self.slot.ty.env.clone();
        validate_batch(&points, env.clock.now(), &env.settings.telemetry)?;
        let latest = self.latest.get_or_insert_with(Default::default);
        for p in &points {
            let e = latest.entry(p.metric.clone()).or_insert(LatestPoint { at: p.at, value: p.value });
            if p.at >= e.at {
                *e = LatestPoint { at: p.at, value: p.value };
            }
        }
        let n = points.len();
        points.sort_by_key(|p| p.at);
        let mut batch = WriteBatch::new();
        for hour in points.chunk_by(|a, b| a.at.0.div_euclid(TELEMETRY_SPAN_MS) == b.at.0.div_euclid(TELEMETRY_SPAN_MS))
        {
            let key = telemetry_key(&self.slot.id, hour[0].at.0, env.storage.generate_id()?);
            batch.put(Space::Telemetry, key, encode_batch(hour));
        }
        Ok((env.storage.submit(batch), n))
    }

    /// Reads stored points after a storage barrier (the twin sees its own writes).
    fn query_telemetry(&self, q: TelemetryQuery) -> futures::future::BoxFuture<'static, Result<DtiReply, TwinError>> {
        let storage = self.env().storage.clone();
        let barrier = storage.barrier();
        let prefix = journal_prefix(&self.slot.id);
        let start = telemetry_key(&self.slot.id, q.from.0.saturating_sub(TELEMETRY_SPAN_MS - 1), 0);
        let end = telemetry_key(&self.slot.id, q.to.0, u64::MAX);
        Box::pin(async move {
            barrier.await?;
            let mut out = Vec::new();
            for row in storage.scan_range(Space::Telemetry, &start, &end)?.into_iter().rev() {
                let (k, v) = row;
                debug_assert!(k.starts_with(&prefix));
                let Some(points) = decode_batch(&v) else { continue };
                for p in points.into_iter().rev() {
                    if p.at >= q.from && p.at <= q.to && q.metric.as_ref().is_none_or(|m| *m == p.metric) {
                        out.push(p);
                    }
                }
                if out.len() >= q.limit {
                    break;
                }
            }
            out.sort_by_key(|p| std::cmp::Reverse(p.at));
            out.truncate(q.limit);
            Ok(DtiReply::Points(out))
        })
    }

    /// decide → evolve → persist. The returned ticket resolves when the change is durable.
    fn apply(&mut self, cmd: TwinCommand, ctx: &mut Context<Self>) -> Result<(u64, Ticket), TwinError> {
        self.apply_with(cmd, WriteBatch::new(), ctx)
    }

    /// Decides and applies `cmd`; writes its events, the snapshot and `also` in one batch.
    fn apply_with(
        &mut self,
        cmd: TwinCommand,
        also: WriteBatch,
        ctx: &mut Context<Self>,
    ) -> Result<(u64, Ticket), TwinError> {
        let now = self.env().clock.now();
        let events = self.state.decide(cmd, now)?;
        for e in &events {
            self.state.evolve(e);
        }
        if events.iter().any(|e| matches!(e.kind, EventKind::MetadataUpdated { .. } | EventKind::Archived)) {
            self.slot.set_summary(&self.state);
        }
        let mut batch = WriteBatch::new();
        batch.put(Space::Snapshot, twin_key(&self.slot.id), encode_record(&self.state));
        for e in &events {
            batch.put(Space::Journal, journal_key(&self.slot.id, e.seq), encode_record(e));
        }
        batch.append(also);
        let ticket = self.env().storage.submit(batch);
        for e in &events {
            match &e.kind {
                EventKind::DesiredSet { .. } if !self.state.in_sync() => {
                    let deadline = self.env().settings.desired_sync.first_deadline(now);
                    self.arm_sync(ctx, 0, deadline);
                }
                EventKind::DesiredSet { .. } | EventKind::InSync => self.disarm_sync(ctx),
                _ => {}
            }
        }
        Ok((self.state.last_seq, ticket))
    }

    /// Records an event the twin itself observed; durable like any other, unawaited.
    fn record(&mut self, kind: EventKind, ctx: &mut Context<Self>) {
        if let Err(e) = self.apply(TwinCommand::Record(kind), ctx) {
            tracing::warn!(twin = %self.slot.id, error = %e, "could not record an event");
        }
    }

    fn arm_sync(&mut self, ctx: &mut Context<Self>, attempt: u32, deadline: Timestamp) {
        self.disarm_sync(ctx);
        let cmd = DeviceCommand::ApplyDesired { desired: self.state.desired.clone(), attempt };
        if let Err(why) = self.env().deliver_to_device(&self.slot.id, &self.state.metadata, cmd) {
            tracing::debug!(twin = %self.slot.id, attempt, "desired state not delivered: {why}");
        }
        let sleep = self.env().clock.sleep_until(deadline);
        let timer = ctx.spawn(
            sleep.into_actor(self).map(move |(), act, ctx| act.guarded(ctx, |act, ctx| act.sync_expired(attempt, ctx))),
        );
        self.sync = Some(SyncWait { attempt, deadline, timer });
    }

    fn disarm_sync(&mut self, ctx: &mut Context<Self>) {
        if let Some(w) = self.sync.take() {
            ctx.cancel_future(w.timer);
        }
    }

    fn sync_expired(&mut self, attempt: u32, ctx: &mut Context<Self>) {
        match &self.sync {
            Some(w) if w.attempt == attempt => self.sync = None,
            _ => return,
        }
        if self.state.in_sync() {
            return;
        }
        let now = self.env().clock.now();
        match self.env().settings.desired_sync.on_expiry(attempt, now) {
            WaitDecision::Retry { attempt, deadline } => {
                self.record(EventKind::WaitRetried { wait: "desired_sync".into(), attempt }, ctx);
                self.arm_sync(ctx, attempt, deadline);
            }
            WaitDecision::Alert { attempts } => {
                let message =
                    format!("twin {} did not report its desired state after {attempts} attempts", self.slot.id);
                self.record(
                    EventKind::AlertRaised { alert: AlertKind::DeadlineExceeded, message: message.clone() },
                    ctx,
                );
                self.env().alerts.raise(Alert {
                    at: now,
                    severity: Severity::Warning,
                    kind: AlertKind::DeadlineExceeded,
                    source: format!("dti/{}", self.slot.id),
                    message,
                });
            }
        }
    }

    /// Runs timer callbacks under the same panic guard as handlers.
    fn guarded(&mut self, ctx: &mut Context<Self>, f: impl FnOnce(&mut Self, &mut Context<Self>)) {
        if let Err(message) = panic::catch(|| f(self, ctx)) {
            self.crash(ctx, message);
        }
    }

    fn crash(&mut self, ctx: &mut Context<Self>, message: String) {
        tracing::error!(twin = %self.slot.id, "twin crashed: {message}");
        self.slot.stats.record_error(&message);
        self.slot.stats.set_status(ActorStatus::Restarting);
        self.slot.set_addr(None);
        ctx.stop();
        if let Some(tdta) = self.slot.ty.tdta() {
            // Failures are rare and must not be lost, so this one message ignores the
            // mailbox bound.
            tdta.do_send(ChildFailed { slot: self.slot.clone(), error: message });
        }
    }

    /// The last `limit` journal events, read after a storage barrier so that they
    /// include every event this twin submitted before (read-your-writes).
    fn read_events(&self, limit: usize) -> futures::future::BoxFuture<'static, Result<DtiReply, TwinError>> {
        let storage = self.env().storage.clone();
        let barrier = storage.barrier();
        let prefix = journal_prefix(&self.slot.id);
        let id = self.slot.id.clone();
        Box::pin(async move {
            barrier.await?;
            let rows = storage.scan_rev(Space::Journal, &prefix, limit)?;
            let mut out = Vec::with_capacity(rows.len());
            for (_, v) in rows.into_iter().rev() {
                match decode_record::<TwinEvent>(&v) {
                    Ok(e) => out.push(e),
                    Err(e) => tracing::warn!(twin = %id, "skipping a corrupt journal entry: {e}"),
                }
            }
            Ok(DtiReply::Events(out))
        })
    }

    fn handle_request(&mut self, req: DtiRequest, ctx: &mut Context<Self>) -> Outcome {
        let ack = |r: Result<(u64, Ticket), TwinError>| match r {
            Ok((seq, ticket)) => Outcome::AfterFlush(ticket, DtiReply::Ack { seq }),
            Err(e) => Outcome::Now(Err(e)),
        };
        match req {
            DtiRequest::Get => Outcome::Now(Ok(DtiReply::View(Box::new(self.view())))),
            DtiRequest::Command(cmd, also) => ack(self.apply_with(cmd, also, ctx)),
            DtiRequest::Events { limit } => Outcome::Later(self.read_events(limit)),
            DtiRequest::Join(resolved) => {
                let r = self.apply(TwinCommand::JoinDta(resolved.dta.clone()), ctx);
                if r.is_ok() {
                    self.layers.retain(|l| l.dta != resolved.dta);
                    self.layers.push(resolved);
                }
                ack(r)
            }
            DtiRequest::Leave(dta) => {
                let r = self.apply(TwinCommand::LeaveDta(dta.clone()), ctx);
                if r.is_ok() {
                    self.layers.retain(|l| l.dta != dta);
                }
                ack(r)
            }
            DtiRequest::LayersChanged(resolved) => {
                if let Some(l) = self.layers.iter_mut().find(|l| l.dta == resolved.dta)
                    && resolved.version > l.version
                {
                    *l = resolved;
                }
                Outcome::Now(Ok(DtiReply::Done))
            }
            DtiRequest::Telemetry(points) => match self.store_telemetry(points) {
                Ok((ticket, points)) => Outcome::AfterFlush(ticket, DtiReply::Stored { points }),
                Err(e) => Outcome::Now(Err(e)),
            },
            DtiRequest::TelemetryQuery(q) => Outcome::Later(self.query_telemetry(q)),
            DtiRequest::ToDevice(cmd) => Outcome::Now(
                self.env()
                    .deliver_to_device(&self.slot.id, &self.state.metadata, cmd)
                    .map(|()| DtiReply::Ack { seq: self.state.last_seq })
                    .map_err(|reason| TwinError::DeviceUnreachable { id: self.slot.id.to_string(), reason }),
            ),
            DtiRequest::Retire => {
                self.disarm_sync(ctx);
                self.slot.set_addr(None);
                self.slot.stats.set_status(ActorStatus::Stopped);
                ctx.stop();
                Outcome::Now(Ok(DtiReply::Done))
            }
            DtiRequest::InjectPanic => {
                if !self.env().settings.allow_fault_injection {
                    return Outcome::Now(Err(TwinError::FaultInjectionDisabled));
                }
                panic!("fault injected into twin {}", self.slot.id)
            }
        }
    }
}

impl Actor for Dti {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.slot.stats.set_status(ActorStatus::Running);
        self.guarded(ctx, |act, ctx| {
            if let Some((reason, attempt)) = act.restart.take() {
                act.record(EventKind::Restarted { reason, attempt }, ctx);
            }
            if !act.state.desired.is_empty() && !act.state.in_sync() {
                let deadline = act.env().settings.desired_sync.first_deadline(act.env().clock.now());
                act.arm_sync(ctx, 0, deadline);
            }
        });
    }
}

impl Handler<DtiMsg> for Dti {
    type Result = ResponseFuture<Result<DtiReply, TwinError>>;

    fn handle(&mut self, DtiMsg(req): DtiMsg, ctx: &mut Context<Self>) -> Self::Result {
        self.slot.stats.dequeued();
        match panic::catch(|| self.handle_request(req, ctx)) {
            Ok(Outcome::Now(r)) => Box::pin(std::future::ready(r)),
            Ok(Outcome::Later(fut)) => fut,
            Ok(Outcome::AfterFlush(ticket, reply)) => Box::pin(async move {
                ticket.await?;
                Ok(reply)
            }),
            Err(message) => {
                let err = TwinError::Crashed { kind: "twin", id: self.slot.id.to_string(), message: message.clone() };
                self.crash(ctx, message);
                Box::pin(std::future::ready(Err(err)))
            }
        }
    }
}
