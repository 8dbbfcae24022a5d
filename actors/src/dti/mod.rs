//! The DTI: one actor per device. It owns the twin's state, decides every input through
//! the pure `TwinState::decide` of `twinfleet-models`, persists the events (snapshot +
//! journal events, one atomic batch), carries out the decision's effects (arm or cancel
//! a wait's timer, raise an alert, and, once the batch is durable, deliver commands to
//! the device) and answers only after the flush. It infers nothing from event kinds.
//!
//! Waits live in the twin's state: on start the actor re-arms every stored wait, and a
//! timer that fires feeds `WaitExpired` back into `decide`.
//!
//! Failure: the synchronous part of every handler and timer runs under `catch_unwind`. A
//! panic stops only this actor; its TDTA is told and restarts it from storage.

use crate::codec::{Chunk, decode_event, decode_journal, encode_event, page_events, page_item};
use crate::context::Infra;
use crate::error::TwinError;
use crate::records::{FleetChunk, journal_key, journal_prefix, twin_key};
use crate::spaces;
use crate::telemetry::series_key_parts;
use actix::prelude::*;
use parking_lot::RwLock;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use twinfleet_models::{
    Alert, CommandId, Decision, DeviceCommand, DtaId, Effect, EffectiveConfig, EventKind, LayerRef, Lifecycle,
    MetricPoint, Timestamp, TwinCommand, TwinEvent, TwinId, TwinRules, TwinState, WaitName, effective_config,
    validate_batch,
};
use twinfleet_runtime::series::{SeriesBatch, SeriesError};
use twinfleet_runtime::{ActorStats, ActorStatus, Ticket, WriteBatch, decode_record, encode_record, page_key, panic};

mod kind;
pub mod monitor;
mod requests;
mod slot;

pub use kind::FleetReport;
pub(crate) use kind::*;
pub(crate) mod ingest;

pub(crate) use requests::{
    Answered, AppendLogs, Ask, Command, Events, Get, InjectPanic, InstallOf, Join, LayersChanged, Leave, Prepare,
    Prepared, Request, Retire, Rules, RulesChanged, Telemetry, TemplateChanged, ToDevice, ViewInto, ViewSink,
};
pub use slot::*;

/// The bytes of a running twin's future (actix's `ContextFut<Dti, _>`: the actor, its
/// context and mailbox receiver), which tokio allocates inside one task cell. The test
/// `tests/task_size.rs` keeps that cell within mimalloc's 1,024-byte class.
pub const RUNNING_TWIN_BYTES: usize = std::mem::size_of::<actix::dev::ContextFut<Dti, actix::Context<Dti>>>();

pub struct Dti {
    slot: Arc<TwinSlot>,
    state: TwinState,
    /// Resolved layers of each direct membership (a boxed slice: 8 bytes fewer than a
    /// `Vec`, and they change only when the twin joins or leaves a DTA).
    layers: Box<[Arc<ResolvedLayers>]>,
    /// The running timer of each armed wait (the waits themselves are in `state`).
    timers: Timers,
    /// Set when this incarnation is a restart: recorded in the journal on start (boxed:
    /// rare, and a million twins pay 8 bytes each instead of 32).
    restart: Option<Box<(String, u32)>>,
    /// Journal events after the stored snapshot (its `Tail` marker exists while > 0).
    pending: u32,
    /// The paged ones among them, encoded: the history record the next snapshot writes.
    chunk: Option<Box<Chunk>>,
    /// The last snapshot written and its history record, until its batch is known to
    /// be durable (see `journal`).
    unconfirmed: Option<Box<(u64, Chunk)>>,
    /// The timer that writes the snapshot of a twin that went idle.
    idle: IdleTimer,
    /// Newest value per metric. Boxed on purpose: a twin without telemetry pays 8 bytes
    /// instead of 24, and a million idle twins is the common case.
    #[allow(clippy::box_collection)]
    latest: Option<Box<BTreeMap<String, LatestPoint>>>,
    /// Its monitoring rules and their states (`monitor`).
    monitoring: monitor::Monitoring,
}

impl std::fmt::Debug for Dti {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dti").field("id", &self.slot.id).field("last_seq", &self.state.last_seq).finish()
    }
}

/// The running timers of a twin's armed waits, 8 bytes in the actor: no allocation
/// until a wait is first armed (most twins never arm one), then kept, so re-arming a
/// wait on every change (a desired state per PATCH) allocates nothing.
#[derive(Default)]
#[allow(clippy::box_collection)] // on purpose: 8 bytes in every twin instead of a Vec's 24
struct Timers(Option<Box<Vec<(WaitName, u32, SpawnHandle)>>>);

impl Timers {
    fn push(&mut self, wait: WaitName, attempt: u32, timer: SpawnHandle) {
        self.0.get_or_insert_with(Default::default).push((wait, attempt, timer));
    }

    /// Forgets the timer of `wait`'s `attempt`, which has fired.
    fn fired(&mut self, wait: WaitName, attempt: u32) {
        if let Some(v) = &mut self.0 {
            v.retain(|(w, a, _)| !(*w == wait && *a == attempt));
        }
    }

    /// Takes the timer of `wait` out, if one is armed.
    fn take(&mut self, wait: WaitName) -> Option<SpawnHandle> {
        let v = self.0.as_mut()?;
        let i = v.iter().position(|(w, _, _)| *w == wait)?;
        Some(v.swap_remove(i).2)
    }

    /// Takes every timer out.
    fn take_all(&mut self) -> Vec<SpawnHandle> {
        self.0.take().map(|v| v.into_iter().map(|(_, _, t)| t).collect()).unwrap_or_default()
    }
}

/// The idle-snapshot timer, in 8 bytes instead of an `Option`'s 16: actix numbers a
/// context's spawned futures from 1 (`SpawnHandle::default().next()`), so the default
/// handle, 0, stands for "not armed".
#[derive(Default)]
struct IdleTimer(SpawnHandle);

impl IdleTimer {
    fn is_armed(&self) -> bool {
        self.0 != SpawnHandle::default()
    }

    fn set(&mut self, timer: SpawnHandle) {
        debug_assert!(timer != SpawnHandle::default(), "actix handed out handle 0");
        self.0 = timer;
    }

    fn take(&mut self) -> Option<SpawnHandle> {
        let t = std::mem::take(&mut self.0);
        (t != SpawnHandle::default()).then_some(t)
    }
}

/// How a request is answered.
pub(crate) enum Outcome<R> {
    Now(Result<R, TwinError>),
    /// Once the ticket's batch is durable; then the deliveries of the same decision are
    /// carried out and the reply is sent.
    AfterFlush(Applied, R),
    Later(futures::future::BoxFuture<'static, Result<R, TwinError>>),
}

/// A decision that was applied and submitted: durable when `ticket` resolves, and the
/// commands to hand to the device then.
pub(crate) struct Applied {
    seq: u64,
    ticket: Ticket,
    deliveries: Vec<(CommandId, DeviceCommand)>,
    /// Whether an undelivered command fails the request (an operator's command does;
    /// a desired state does not: its wait retries).
    must_deliver: bool,
    /// The `last_seq` of the snapshot in the batch, if it holds one.
    snapshot: Option<u64>,
}

impl Applied {
    /// Awaits the batch; records a durable snapshot in the slot.
    async fn stored(
        ticket: Ticket,
        snapshot: Option<u64>,
        slot: &TwinSlot,
    ) -> Result<(), twinfleet_runtime::StorageError> {
        ticket.await?;
        if let Some(seq) = snapshot {
            slot.snapshot_stored(seq);
        }
        Ok(())
    }
}

impl Dti {
    /// Starts the actor on the current arbiter and publishes its address in the slot.
    pub(crate) fn launch(
        slot: Arc<TwinSlot>,
        state: TwinState,
        layers: Vec<Arc<ResolvedLayers>>,
        start: Start,
    ) -> Addr<Dti> {
        let cap = slot.ty.infra.settings.dti_mailbox;
        slot.set_summary(&state);
        slot.set_last_seq(state.last_seq);
        let s = slot.clone();
        let Start { restart, tail, latest, chunk } = start;
        let addr = Dti::create(move |ctx| {
            ctx.set_mailbox_capacity(cap);
            Dti {
                slot: s,
                state,
                layers: layers.into_boxed_slice(),
                timers: Timers::default(),
                restart: restart.map(Box::new),
                pending: tail,
                chunk,
                unconfirmed: None,
                idle: IdleTimer::default(),
                latest,
                monitoring: Default::default(),
            }
        });
        slot.set_addr(Some(addr.clone()));
        addr
    }

    fn env(&self) -> &Infra {
        &self.slot.ty.infra
    }

    fn view(&self) -> TwinView {
        let defaults = self.slot.ty.defaults();
        let layers = self.layers.iter().flat_map(|r| r.layers.iter());
        TwinView {
            state: self.state.clone(),
            effective_config: effective_config(&defaults, layers, &self.state.overrides),
            in_sync: self.state.in_sync(),
            desired_sync: self
                .state
                .waits
                .get(WaitName::DesiredSync)
                .map(|w| WaitView { attempt: w.attempt, deadline: w.deadline }),
            telemetry_latest: self.latest.as_deref().cloned().unwrap_or_default(),
            health: self.env().alert_book.health(self.slot.id.as_str()),
        }
    }

    /// Validates a batch and stores it: the latest values in sled, the points in the
    /// series store.
    fn store_telemetry(
        &mut self,
        points: Vec<MetricPoint>,
        ctx: &mut Context<Self>,
    ) -> Result<(Ticket, usize, Option<u64>), TwinError> {
        let Prepared { batch, series, points, snapshot } = self.prepare_telemetry(points, ctx)?;
        let env = &self.slot.ty.infra;
        let history = env.series.submit_batch(series);
        Ok((submit_unless_empty(&*env.storage, batch).and_series(history), points, snapshot))
    }

    /// Validates app log lines and queues their write (`crate::logs`).
    fn store_logs(
        &mut self,
        lines: Vec<twinfleet_models::LogLine>,
        ctx: &mut Context<Self>,
    ) -> Result<(Ticket, usize, Option<u64>), TwinError> {
        let env = self.slot.ty.infra.clone();
        if self.state.lifecycle == twinfleet_models::Lifecycle::Archived {
            return Err(TwinError::Rejected(twinfleet_models::ModelError::Archived(self.slot.id.clone())));
        }
        env.storage.writable()?;
        twinfleet_models::log::validate_logs(&lines, env.clock.now(), env.settings.telemetry.max_future_ms)?;
        let n = lines.len();
        let mut batch = WriteBatch::new();
        let snapshot = self.monitor(&[], &lines, true, &mut batch, ctx);
        crate::logs::append(&mut batch, &self.slot.id, env.storage.generate_id()?, lines);
        Ok((env.storage.submit(batch), n, snapshot))
    }

    /// Validates a batch and takes it in (the latest values); returns what must be
    /// written for it, for a caller that writes the batches of many twins at once.
    pub(crate) fn prepare_telemetry(
        &mut self,
        points: Vec<MetricPoint>,
        ctx: &mut Context<Self>,
    ) -> Result<Prepared, TwinError> {
        let env = self.slot.ty.infra.clone();
        if self.state.lifecycle == twinfleet_models::Lifecycle::Archived {
            return Err(TwinError::Rejected(twinfleet_models::ModelError::Archived(self.slot.id.clone())));
        }
        env.storage.writable()?;
        validate_batch(&points, env.clock.now(), &env.settings.telemetry)?;
        let latest = self.latest.get_or_insert_with(Default::default);
        let mut new_metric = false;
        for p in &points {
            // (A metric already known is not copied again.)
            match latest.get_mut(&p.metric) {
                Some(e) if p.at >= e.at => *e = LatestPoint { at: p.at, value: p.value },
                Some(_) => {}
                None => {
                    latest.insert(p.metric.clone(), LatestPoint { at: p.at, value: p.value });
                    new_metric = true;
                }
            }
        }
        let mut batch = WriteBatch::new();
        // The record in sled names every metric; the values are the series store's
        // newest points (`crate::latest`): written here only when a metric is new.
        if new_metric {
            batch.put(spaces::TELEMETRY_LATEST, twin_key(&self.slot.id), slot::encode_latest(latest));
        }
        // The rules look at every point, in arrival order, before the points are sorted.
        let snapshot = self.monitor(&points, &[], true, &mut batch, ctx);
        let n = points.len();
        // One series per metric, points in the order they came (the store sorts late
        // ones out, see `twinfleet_runtime::series`), grouped without sorting the batch.
        let series = series_of(&points, self.slot.ty.device_type.as_str(), self.slot.id.as_str())
            .map_err(|e| TwinError::Storage(e.into()))?;
        Ok(Prepared { batch, series, points: n, snapshot })
    }

    /// decide → evolve → persist → carry out the effects. Deliveries wait for the
    /// flush (they come back in [`Applied`]); timers and alerts are carried out now.
    fn apply(&mut self, cmd: TwinCommand, also: WriteBatch, ctx: &mut Context<Self>) -> Result<Applied, TwinError> {
        let env = self.slot.ty.infra.clone();
        // A full disk refuses writes before anything changes in memory.
        env.storage.writable()?;
        let now = env.clock.now();
        let rules = TwinRules {
            desired_sync: &env.settings.desired_sync,
            install_deadline_ms: env.settings.install_deadline_ms,
            domain: self.slot.ty.domain.as_deref(),
            metrics: self.slot.ty.metrics.as_deref(),
        };
        // From the device (it is alive), or changing the twin's own rules.
        let device = matches!(cmd, TwinCommand::Report(_) | TwinCommand::Ack { .. });
        // (Archived, it watches nothing: its alerts clear.)
        let rules_touched = matches!(&cmd, TwinCommand::SetOverrides(p) if p.contains_key(twinfleet_models::rules::RULES_KEY))
            || matches!(cmd, TwinCommand::Archive);
        let Decision { events, effects } = self.state.decide(cmd, now, rules)?;
        for e in &events {
            self.state.evolve(e);
            // A rollout's install ended: its driver hears of it (no receiver: none runs).
            if let twinfleet_models::EventKind::InstallChanged { job } = &e.kind
                && job.rollout.is_some()
                && job.phase.is_final()
            {
                let _ = env.installs.send((self.slot.id.to_string(), job.clone()));
            }
        }
        self.slot.refresh_summary(&self.state);
        self.slot.set_last_seq(self.state.last_seq);
        let mut batch = WriteBatch::new();
        let mut snapshot = self.journal(&events, effects.contains(&Effect::Snapshot), &mut batch, ctx);
        if rules_touched {
            self.monitoring.mark_dirty();
        }
        if device || rules_touched {
            snapshot = self.monitor(&[], &[], device, &mut batch, ctx).or(snapshot);
        }
        batch.append(also);
        // A decision without events writes nothing (a report of what is already known).
        let ticket = if batch.is_empty() { Ticket::ready(Ok(())) } else { env.storage.submit(batch) };
        let deliveries = self.carry_out(effects, now, ctx);
        Ok(Applied { seq: self.state.last_seq, ticket, deliveries, must_deliver: false, snapshot })
    }

    /// Writes `events` to the journal. Between snapshots each event is an item of the
    /// group commit's journal page (one record for the events of every twin in that
    /// commit), and the `Tail` marker names the page of the first one, so a restart
    /// replays the pages from there. Every `snapshot_every` events, when idle, or when
    /// the decision asks (`snapshot`), the batch holds the snapshot and the interval's
    /// events as one history record (`codec::Chunk`), and no page item. Returns the
    /// snapshot's `last_seq` when the batch holds one.
    ///
    /// Until a snapshot's batch is known to be durable, every batch holds a snapshot
    /// (with the unconfirmed interval's events too): had that batch failed while a later
    /// one landed, a new marker would name a later page than the first event the stored
    /// snapshot lacks.
    fn journal(
        &mut self,
        events: &[TwinEvent],
        snapshot: bool,
        batch: &mut WriteBatch,
        ctx: &mut Context<Self>,
    ) -> Option<u64> {
        if events.is_empty() {
            return None;
        }
        if self.unconfirmed.as_ref().is_some_and(|u| self.slot.is_snapshot_stored(u.0)) {
            self.unconfirmed = None;
        }
        let every = self.slot.ty.infra.settings.snapshot_every;
        let snap = snapshot || self.unconfirmed.is_some() || self.pending + events.len() as u32 >= every;
        let paged = self.chunk.is_some();
        let id = self.slot.id.as_str();
        let chunk = self.chunk.get_or_insert_with(|| Box::new(Chunk::new(events[0].seq)));
        for e in events {
            let encoded = encode_event(e);
            if !snap {
                batch.pack(spaces::JOURNAL_PAGE, page_item(id, &encoded));
            }
            chunk.push(e.seq, &encoded);
        }
        let key = twin_key(&self.slot.id);
        if snap {
            self.write_snapshot(batch);
            // The idle timer now only lets go of the unconfirmed record once it is durable.
            if let Some(t) = self.idle.take() {
                ctx.cancel_future(t);
            }
            self.arm_idle_snapshot(ctx);
            Some(self.state.last_seq)
        } else {
            if !paged {
                batch.put_page_id(spaces::TAIL, key, spaces::JOURNAL_PAGE);
            }
            self.pending += events.len() as u32;
            self.arm_idle_snapshot(ctx);
            None
        }
    }

    /// Puts the snapshot, the history record of the events since the last stored one,
    /// and the marker's removal in `batch`; keeps the record until the batch is durable.
    fn write_snapshot(&mut self, batch: &mut WriteBatch) {
        let key = twin_key(&self.slot.id);
        let chunk = match (self.unconfirmed.take(), self.chunk.take()) {
            (Some(u), Some(c)) => Some(u.1.joined(*c)),
            (Some(u), None) => Some(u.1),
            (None, c) => c.map(|c| *c),
        };
        for (first, record) in chunk.iter().flat_map(Chunk::records) {
            batch.put(spaces::JOURNAL, journal_key(&self.slot.id, first), record);
        }
        batch.put(spaces::SNAPSHOT, key.clone(), encode_record(&self.state));
        batch.delete(spaces::TAIL, key);
        self.pending = 0;
        self.unconfirmed = chunk.map(|c| Box::new((self.state.last_seq, c)));
    }

    /// Writes the snapshot `snapshot_idle_ms` after the first event since the last one
    /// (real time: a storage matter, not a decision of the twin).
    fn arm_idle_snapshot(&mut self, ctx: &mut Context<Self>) {
        if self.idle.is_armed() {
            return;
        }
        let after = std::time::Duration::from_millis(self.slot.ty.infra.settings.snapshot_idle_ms);
        self.idle.set(ctx.run_later(after, |act, ctx| {
            act.idle.take();
            act.guarded(ctx, |act, ctx| act.snapshot_now(ctx));
        }));
    }

    /// Writes the snapshot now if events are pending. A refused write restarts the twin
    /// from storage (the marker and the pages are still there). Also lets go of the last
    /// snapshot's history record once that is durable.
    fn snapshot_now(&mut self, ctx: &mut Context<Self>) {
        if self.unconfirmed.as_ref().is_some_and(|u| self.slot.is_snapshot_stored(u.0)) {
            self.unconfirmed = None;
        }
        if self.pending == 0 || self.env().storage.writable().is_err() {
            return;
        }
        let mut batch = WriteBatch::new();
        self.write_snapshot(&mut batch);
        let seq = self.state.last_seq;
        let ticket = self.env().storage.submit(batch);
        ctx.spawn(actix::fut::wrap_future::<_, Self>(ticket).map(move |r, act, ctx| match r {
            Ok(()) => {
                act.slot.snapshot_stored(seq);
                if act.unconfirmed.as_ref().is_some_and(|u| u.0 == seq) {
                    act.unconfirmed = None;
                }
            }
            Err(e) => {
                act.crash(ctx, format!("a snapshot was refused by storage ({e}); restarting from the stored state"))
            }
        }));
    }

    /// Carries out the effects that need no flush first; returns the deliveries.
    fn carry_out(
        &mut self,
        effects: Vec<Effect>,
        now: Timestamp,
        ctx: &mut Context<Self>,
    ) -> Vec<(CommandId, DeviceCommand)> {
        let mut deliveries = Vec::new();
        for effect in effects {
            match effect {
                Effect::Deliver { id, command } => deliveries.push((id, command)),
                Effect::ArmWait { wait, attempt, deadline } => self.arm(ctx, wait, attempt, deadline),
                Effect::CancelWait { wait } => self.cancel(ctx, wait),
                Effect::RaiseAlert { kind, severity, message } => self.env().alerts.raise(Alert {
                    at: now,
                    severity,
                    kind,
                    source: format!("dti/{}", self.slot.id),
                    message,
                }),
                // Written with the decision's events (`journal`).
                Effect::Snapshot => {}
            }
        }
        deliveries
    }

    /// Hands durable commands to the device transport. A desired state superseded
    /// meanwhile by a newer one is not sent (the newer command carries it). Returns the
    /// last delivery error; the desired-state wait retries either way.
    fn deliver(&self, deliveries: Vec<(CommandId, DeviceCommand)>) -> Result<(), String> {
        let mut result = Ok(());
        let current = self.state.waits.get(WaitName::DesiredSync).and_then(|w| w.command);
        for (id, command) in deliveries {
            if matches!(command, DeviceCommand::ApplyDesired { .. }) && current != Some(id) {
                continue;
            }
            if let Err(why) = self.env().deliver_to_device(&self.slot.id, &self.state.metadata, id, command) {
                tracing::debug!(twin = %self.slot.id, command = %id, "command not delivered: {why}");
                result = Err(why);
            }
        }
        result
    }

    /// The layers of its rules changed: resolve them again and look at once (a rule
    /// disabled or removed clears its alert now).
    pub(crate) fn rules_changed(&mut self, ctx: &mut Context<Self>) {
        self.monitoring.mark_dirty();
        self.monitor_tick(ctx);
    }

    /// Fills the type's configuration template in for this twin, from its effective
    /// configuration now; writes only what changed (`TwinCommand::ApplyTemplate`).
    pub(crate) fn fill_template(&mut self, ctx: &mut Context<Self>) {
        let Some(template) = self.slot.ty.template() else { return };
        if self.state.lifecycle == twinfleet_models::Lifecycle::Archived {
            return;
        }
        let defaults = self.slot.ty.defaults();
        let layers = self.layers.iter().flat_map(|r| r.layers.iter());
        let config = effective_config(&defaults, layers, &self.state.overrides).values;
        self.input(TwinCommand::ApplyTemplate { template, config }, ctx);
    }

    /// Feeds the twin an input of its own (a restart, an expired wait): durable like
    /// any other change, unawaited; its deliveries go out after the flush.
    fn input(&mut self, cmd: TwinCommand, ctx: &mut Context<Self>) {
        match self.apply(cmd, WriteBatch::new(), ctx) {
            Ok(Applied { deliveries, ticket, snapshot, .. }) if !deliveries.is_empty() || snapshot.is_some() => {
                ctx.spawn(actix::fut::wrap_future::<_, Self>(ticket).map(move |r, act, ctx| {
                    act.guarded(ctx, |act, _| match r {
                        Ok(()) => {
                            if let Some(seq) = snapshot {
                                act.slot.snapshot_stored(seq);
                            }
                            drop(act.deliver(deliveries))
                        }
                        Err(e) => tracing::warn!(twin = %act.slot.id, error = %e, "not stored; nothing sent"),
                    })
                }));
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(twin = %self.slot.id, error = %e, "could not record an event"),
        }
    }

    fn arm(&mut self, ctx: &mut Context<Self>, wait: WaitName, attempt: u32, deadline: Timestamp) {
        self.cancel(ctx, wait);
        let sleep = self.env().clock.sleep_until(deadline);
        let timer = ctx.spawn(sleep.into_actor(self).map(move |(), act, ctx| {
            act.timers.fired(wait, attempt);
            act.guarded(ctx, |act, ctx| act.input(TwinCommand::WaitExpired { wait, attempt }, ctx))
        }));
        self.timers.push(wait, attempt, timer);
    }

    fn cancel(&mut self, ctx: &mut Context<Self>, wait: WaitName) {
        if let Some(timer) = self.timers.take(wait) {
            ctx.cancel_future(timer);
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
            let queued = crate::queued::Queued::new(&self.slot.ty);
            tdta.failed.do_send(ChildFailed { slot: self.slot.clone(), error: message, queued });
        }
    }

    /// The last `limit` journal events: the stored history records, read after a
    /// storage barrier (so they include every batch this twin submitted before), and the
    /// events since the last snapshot, which only the pages and this twin hold.
    fn read_events(&self, limit: usize) -> futures::future::BoxFuture<'static, Result<Vec<TwinEvent>, TwinError>> {
        let storage = self.env().storage.clone();
        let barrier = storage.barrier();
        let prefix = journal_prefix(&self.slot.id);
        let id = self.slot.id.clone();
        let memory: Vec<Vec<u8>> =
            self.unconfirmed.iter().map(|u| u.1.record()).chain(self.chunk.iter().map(|c| c.record())).collect();
        Box::pin(async move {
            barrier.await?;
            let rows = storage.scan_rev(spaces::JOURNAL, &prefix, limit)?;
            let mut events = BTreeMap::new();
            for v in rows.iter().map(|(_, v)| v).chain(memory.iter()) {
                match decode_journal(v) {
                    Ok(es) => events.extend(es.into_iter().map(|e| (e.seq, e))),
                    Err(e) => tracing::warn!(twin = %id, "skipping a corrupt journal entry: {e}"),
                }
            }
            let skip = events.len().saturating_sub(limit);
            Ok(events.into_values().skip(skip).collect())
        })
    }
}

impl Actor for Dti {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.slot.stats.set_status(ActorStatus::Running);
        self.guarded(ctx, |act, ctx| {
            if let Some((reason, attempt)) = act.restart.take().map(|r| *r) {
                act.input(TwinCommand::Record(EventKind::Restarted { reason, attempt }), ctx);
            }
            // The waits are in the stored state: re-arm their timers (a deadline that
            // passed while the twin was down fires at once).
            let rearm = act.state.waits.rearm();
            let now = act.env().clock.now();
            act.carry_out(rearm, now, ctx);
            // The rules resolve and arm their deadlines (a device silent since the
            // start goes offline one `after` later).
            act.monitor_tick(ctx);
            if act.pending > 0 {
                act.arm_idle_snapshot(ctx);
            }
        });
    }
}

impl<Q: Request> Handler<Ask<Q>> for Dti {
    type Result = Answer<Result<Answered<Q::Reply>, TwinError>>;

    fn handle(&mut self, Ask(req, queued): Ask<Q>, ctx: &mut Context<Self>) -> Self::Result {
        queued.taken();
        self.slot.stats.dequeued();
        match panic::catch(|| req.run(self, ctx)) {
            Ok(Outcome::Now(r)) => Answer::Now(r.map(Answered::Ready)),
            Ok(Outcome::Later(fut)) => Answer::Detached(Box::pin(async move { fut.await.map(Answered::Ready) })),
            // Without deliveries the answer does not need the actor: the caller awaits
            // the flush (it arrives even if the twin crashes before the flush).
            Ok(Outcome::AfterFlush(Applied { ticket, deliveries, snapshot, .. }, reply)) if deliveries.is_empty() => {
                Answer::Now(Ok(Answered::AfterFlush { ticket, snapshot, reply }))
            }
            Ok(Outcome::AfterFlush(Applied { ticket, deliveries, must_deliver, snapshot, .. }, reply)) => {
                let slot = self.slot.clone();
                let stored = async move { Applied::stored(ticket, snapshot, &slot).await };
                Answer::OnActor(Box::pin(actix::fut::wrap_future::<_, Self>(stored).map(move |stored, act, ctx| {
                    if let Err(e) = stored {
                        act.crash(
                            ctx,
                            format!("a write was refused by storage ({e}); restarting from the stored state"),
                        );
                        return Err(e.into());
                    }
                    let mut delivered = Ok(());
                    act.guarded(ctx, |act, _| delivered = act.deliver(deliveries));
                    match delivered {
                        Err(reason) if must_deliver => {
                            Err(TwinError::DeviceUnreachable { id: act.slot.id.to_string(), reason })
                        }
                        _ => Ok(Answered::Ready(reply)),
                    }
                })))
            }
            Err(message) => {
                let err = TwinError::Crashed { kind: "twin", id: self.slot.id.to_string(), message: message.clone() };
                self.crash(ctx, message);
                Answer::Now(Err(err))
            }
        }
    }
}

/// A write of this twin failed after its change was applied in memory: the twin stops
/// and its TDTA restarts it from the stored state (rare: a full disk refuses writes up
/// front; only writes already queued when it filled get here).
pub(crate) struct Reload(pub String);

impl Message for Reload {
    type Result = ();
}

impl Handler<Reload> for Dti {
    type Result = ();
    fn handle(&mut self, Reload(why): Reload, ctx: &mut Context<Self>) {
        self.crash(ctx, format!("a write was refused by storage ({why}); restarting from the stored state"));
    }
}

/// How a DTI answers. An immediate answer is sent at once, even by an actor that stops
/// after a crash (a write without deliveries answers at once with its ticket); a
/// detached one (a read) does not
/// need the actor to finish; one on the actor (a flushed write with deliveries) finishes
/// there, so that its deliveries see the twin's state of that moment.
pub(crate) enum Answer<T> {
    Now(T),
    Detached(futures::future::BoxFuture<'static, T>),
    OnActor(ResponseActFuture<Dti, T>),
}

impl<M: Message<Result = T>, T: Send + 'static> actix::dev::MessageResponse<Dti, M> for Answer<T> {
    fn handle(self, ctx: &mut Context<Dti>, tx: Option<actix::dev::OneshotSender<T>>) {
        let send = |r: T| {
            if let Some(tx) = tx {
                // The caller may have given up (its deadline passed): nothing to do.
                let _ = tx.send(r);
            }
        };
        match self {
            Answer::Now(r) => send(r),
            Answer::Detached(fut) => drop(actix_rt::spawn(async move { send(fut.await) })),
            Answer::OnActor(fut) => drop(ctx.spawn(fut.map(move |r, _, _| send(r)))),
        }
    }
}

/// Submits `batch`, or answers at once where it holds nothing (a telemetry message
/// usually writes to the series store alone, see `crate::latest`).
pub(crate) fn submit_unless_empty(storage: &dyn twinfleet_runtime::Storage, batch: WriteBatch) -> Ticket {
    if batch.is_empty() { Ticket::ready(Ok(())) } else { storage.submit(batch) }
}

/// The batch's points as one series per metric (keyed by `series_key_parts`), in the
/// order each metric first appears, each series' points in the order they came, encoded
/// for the series store. A few metrics are found by a linear scan, many through an index.
fn series_of(points: &[MetricPoint], namespace: &str, twin: &str) -> Result<SeriesBatch, SeriesError> {
    let mut names: Vec<&str> = Vec::new();
    let mut index: Option<std::collections::HashMap<&str, usize>> = None;
    let find = |names: &[&str], index: &Option<std::collections::HashMap<&str, usize>>, metric: &str| match index {
        Some(ix) => ix.get(metric).copied(),
        None => names.iter().position(|m| *m == metric),
    };
    for p in points {
        let metric = p.metric.as_str();
        if find(&names, &index, metric).is_some() {
            continue;
        }
        names.push(metric);
        if let Some(ix) = &mut index {
            ix.insert(metric, names.len() - 1);
        } else if names.len() > 16 {
            index = Some(names.iter().enumerate().map(|(i, m)| (*m, i)).collect());
        }
    }
    let mut batch = SeriesBatch::with_capacity(
        points.len() * 16 + names.iter().map(|m| 9 + namespace.len() + twin.len() + m.len()).sum::<usize>(),
    );
    let key = |metric| series_key_parts(twin, metric);
    if names.len() == points.len() {
        // Every metric once (the usual message): one series per point, in order.
        for p in points {
            batch.push(namespace, &key(&p.metric), [(p.at.0, p.value)])?;
        }
        return Ok(batch);
    }
    let mut per: Vec<Vec<(i64, f64)>> = vec![Vec::new(); names.len()];
    for p in points {
        per[find(&names, &index, &p.metric).expect("named above")].push((p.at.0, p.value));
    }
    for (metric, mine) in names.iter().zip(per) {
        batch.push(namespace, &key(metric), mine)?;
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinfleet_models::Timestamp;

    fn grouped(points: &[(&str, i64)]) -> Vec<(String, Vec<i64>)> {
        let points: Vec<MetricPoint> = points
            .iter()
            .map(|(m, at)| MetricPoint { metric: m.to_string(), at: Timestamp(*at), value: 1.0 })
            .collect();
        let series = series_of(&points, "t", "twin").unwrap().to_series();
        assert!(series.iter().all(|s| s.namespace == "t"));
        series
            .into_iter()
            .map(|s| (s.key.strip_prefix("twin ").unwrap().to_string(), s.points.into_iter().map(|p| p.0).collect()))
            .collect()
    }

    #[test]
    fn a_batch_groups_into_one_series_per_metric_in_first_appearance_and_arrival_order() {
        let got = grouped(&[("b", 3), ("a", 1), ("b", 1), ("c", 9), ("a", 2)]);
        assert_eq!(got, [("b".into(), vec![3, 1]), ("a".into(), vec![1, 2]), ("c".into(), vec![9])]);
        // Past the linear scan, the index groups the same way.
        let names: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
        let mut points: Vec<(&str, i64)> = names.iter().map(|m| (m.as_str(), 1)).collect();
        points.extend(names.iter().rev().map(|m| (m.as_str(), 2)));
        let got = grouped(&points);
        assert_eq!(got.len(), 40);
        assert!(got.iter().zip(&names).all(|((k, at), m)| k == m && at == &vec![1, 2]), "{got:?}");
        // Every metric once: one series per point, in order.
        assert_eq!(grouped(&[("x", 5), ("y", 4)]), [("x".into(), vec![5]), ("y".into(), vec![4])]);
        // A key too long for the series store refuses the batch (and only it).
        let long = "m".repeat(600);
        let p = MetricPoint { metric: long, at: Timestamp(1), value: 1.0 };
        assert_eq!(series_of(&[p], "t", "twin"), Err(SeriesError::BadName));
    }
}
