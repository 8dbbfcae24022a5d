//! The TDTA: one actor per device type. It creates the DTIs of its type (one at a time
//! or a whole fleet in one call), holds the type's configuration defaults, and supervises
//! its DTIs: a DTI that crashed is restarted from its last persisted state after a
//! backoff, and after too many failures in a window it is marked failed and an alert is
//! raised.

use crate::dta::DtaEntry;
use crate::dti::{Dti, NO_ORIGIN, ResolvedLayers, TwinSlot};
use crate::env::TwinEnv;
use crate::error::TwinError;
use crate::records::{CHUNK, DeviceTypeSpec, FleetChunk, FleetChunkRef, TwinSpec, fleet_key, twin_key};
use actix::prelude::*;
use dashmap::mapref::entry::Entry;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use twinfleet_models::{
    Alert, AlertKind, DeviceTypeId, DtaId, RestartDecision, RestartTracker, Severity, TwinId, TwinState,
};
use twinfleet_runtime::{ActorStats, ActorStatus, Space, WriteBatch, decode_record, encode_record, panic};

/// What a TDTA and its DTIs share; outlives restarts of the TDTA actor.
#[derive(Debug)]
pub struct TypeContext {
    pub(crate) device_type: DeviceTypeId,
    pub(crate) model: Arc<str>,
    /// `tdta/<id>`: the parent of every DTI of this type in the actor tree.
    pub(crate) path: Arc<str>,
    pub(crate) env: Arc<TwinEnv>,
    pub(crate) stats: ActorStats,
    defaults: RwLock<Arc<Map<String, Value>>>,
    tdta: RwLock<Option<Addr<Tdta>>>,
    /// Keys of the packed fleet records, indexed by `TwinSlot::origin`.
    pub(crate) chunks: Mutex<Vec<Vec<u8>>>,
    pub(crate) twins: AtomicUsize,
}

impl TypeContext {
    pub(crate) fn new(spec: &DeviceTypeSpec, env: Arc<TwinEnv>) -> Arc<Self> {
        let path: Arc<str> = Arc::from(format!("tdta/{}", spec.id));
        Arc::new(TypeContext {
            device_type: spec.id.clone(),
            model: Arc::from(spec.model.as_str()),
            stats: ActorStats::new("tdta", spec.id.as_arc().clone(), Some(Arc::from("platform/supervisor"))),
            path,
            env,
            defaults: RwLock::new(Arc::new(spec.defaults.clone())),
            tdta: RwLock::new(None),
            chunks: Mutex::new(Vec::new()),
            twins: AtomicUsize::new(0),
        })
    }

    pub(crate) fn defaults(&self) -> Arc<Map<String, Value>> {
        self.defaults.read().clone()
    }

    /// Drops the TDTA's address; the actor stops once no message is in flight.
    pub(crate) fn stop(&self) {
        self.tdta.write().take();
        self.stats.set_status(ActorStatus::Stopped);
    }

    pub(crate) fn tdta(&self) -> Option<Addr<Tdta>> {
        self.tdta.read().clone()
    }

    pub(crate) fn spec(&self) -> DeviceTypeSpec {
        DeviceTypeSpec {
            id: self.device_type.clone(),
            model: self.model.to_string(),
            defaults: (*self.defaults()).clone(),
        }
    }
}

/// The layers each DTA currently hands out, for twins about to start.
pub(crate) fn layers_for(env: &TwinEnv, dtas: &[DtaId]) -> Vec<Arc<ResolvedLayers>> {
    dtas.iter().filter_map(|d| env.dtas.get(d).map(|e| e.resolved())).collect()
}

/// The last persisted state of a twin: its own snapshot, else its packed fleet record.
pub(crate) fn load_twin(ty: &TypeContext, slot: &TwinSlot) -> Result<TwinState, String> {
    let storage = &ty.env.storage;
    if let Some(bytes) = storage.get(Space::Snapshot, &twin_key(&slot.id)).map_err(|e| e.to_string())? {
        return decode_record(&bytes).map_err(|e| format!("snapshot: {e}"));
    }
    if slot.origin == NO_ORIGIN {
        return Err("no snapshot and no fleet record".into());
    }
    let key = ty.chunks.lock().get(slot.origin as usize).cloned().ok_or("fleet record index out of range")?;
    let bytes = storage.get(Space::Fleet, &key).map_err(|e| e.to_string())?.ok_or("fleet record missing")?;
    let chunk: FleetChunk = decode_record(&bytes).map_err(|e| format!("fleet record: {e}"))?;
    let spec = chunk.twins.iter().find(|s| s.id == slot.id).ok_or("twin missing from its fleet record")?;
    Ok(spec.initial_state(&chunk.device_type, &ty.model, chunk.created_at))
}

/// Starts twins on their arbiters, one batch per arbiter, and resolves when all run.
pub(crate) fn launch_batch(
    env: &TwinEnv,
    twins: Vec<(Arc<TwinSlot>, TwinState)>,
) -> impl Future<Output = usize> + use<> {
    let n = env.arbiters.len();
    let mut parts: Vec<Vec<(Arc<TwinSlot>, TwinState)>> = (0..n).map(|_| Vec::new()).collect();
    for (slot, state) in twins {
        parts[env.arbiters.index_for(slot.id.as_str())].push((slot, state));
    }
    let mut done = Vec::with_capacity(n);
    for (i, part) in parts.into_iter().enumerate() {
        if part.is_empty() {
            continue;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        done.push(rx);
        env.arbiters.run_on(i, move || {
            let count = part.len();
            for (slot, state) in part {
                let layers = layers_for(&slot.ty.env, &state.memberships);
                Dti::launch(slot, state, layers, None);
            }
            let _ = tx.send(count);
        });
    }
    async move {
        let mut total = 0;
        for rx in done {
            total += rx.await.unwrap_or(0);
        }
        total
    }
}

/// Adds new members to their DTAs, and has a DTA re-push its layers to those that may
/// have started with an older version.
pub(crate) fn register_members(env: &TwinEnv, members: HashMap<DtaId, (u64, Vec<TwinId>)>) {
    for (dta, (version, ids)) in members {
        if let Some(entry) = env.dtas.get(&dta) {
            let entry: Arc<DtaEntry> = entry.clone();
            entry.add_members(ids.iter().cloned());
            if entry.resolved().version != version {
                entry.refresh(ids);
            }
        }
    }
}

/// Creates twins of this type. All-or-nothing: an existing or duplicate id, or an
/// unknown DTA, rejects the whole request and creates nothing.
#[derive(Debug)]
pub struct SpawnFleet(pub Vec<TwinSpec>);

/// What a fleet creation did.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FleetReport {
    pub created: usize,
    /// Packed records written.
    pub records: usize,
}

impl Message for SpawnFleet {
    type Result = Result<FleetReport, TwinError>;
}

#[derive(Debug)]
pub(crate) struct SetDefaults(pub Map<String, Value>);

impl Message for SetDefaults {
    type Result = Result<(), TwinError>;
}

/// Sent by a DTI that crashed.
#[derive(Debug)]
pub(crate) struct ChildFailed {
    pub slot: Arc<TwinSlot>,
    pub error: String,
}

impl Message for ChildFailed {
    type Result = ();
}

#[derive(Debug)]
pub struct Tdta {
    ctx: Arc<TypeContext>,
    restarts: HashMap<TwinId, RestartTracker>,
}

impl Tdta {
    pub(crate) fn launch(ctx: Arc<TypeContext>) -> Addr<Tdta> {
        let cap = ctx.env.settings.aggregate_mailbox;
        let c = ctx.clone();
        let addr = Tdta::create(move |actx| {
            actx.set_mailbox_capacity(cap);
            Tdta { ctx: c, restarts: HashMap::new() }
        });
        *ctx.tdta.write() = Some(addr.clone());
        ctx.stats.set_status(ActorStatus::Running);
        addr
    }

    fn spawn_fleet(
        &mut self,
        specs: Vec<TwinSpec>,
    ) -> Result<impl Future<Output = Result<FleetReport, TwinError>> + use<>, TwinError> {
        let env = self.ctx.env.clone();
        let ty = self.ctx.clone();
        let distinct: HashSet<&DtaId> = specs.iter().flat_map(|s| s.dtas.iter()).collect();
        let mut versions: HashMap<DtaId, u64> = HashMap::new();
        for d in distinct {
            let entry = env.dtas.get(d).ok_or_else(|| TwinError::UnknownDta(d.to_string()))?;
            versions.insert(d.clone(), entry.resolved().version);
        }
        let now = env.clock.now();

        // Reserve every id first, so that a conflict leaves nothing behind.
        let chunk_base = ty.chunks.lock().len();
        let mut slots = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let origin = (chunk_base + i / CHUNK) as u32;
            let conflict = env.quarantine.contains_key(spec.id.as_str());
            match env.twins.entry(spec.id.clone()) {
                Entry::Vacant(v) if !conflict => {
                    let slot = Arc::new(TwinSlot::new(spec.id.clone(), ty.clone(), origin));
                    v.insert(slot.clone());
                    slots.push(slot);
                }
                _ => {
                    for s in &slots {
                        env.twins.remove(&s.id);
                    }
                    return Err(TwinError::AlreadyExists { kind: "twin", id: spec.id.to_string() });
                }
            }
        }

        let mut tickets = Vec::new();
        let mut keys = Vec::new();
        for part in specs.chunks(CHUNK) {
            let key = match env.storage.generate_id() {
                Ok(id) => fleet_key(&ty.device_type, id),
                Err(e) => {
                    for s in &slots {
                        env.twins.remove(&s.id);
                    }
                    return Err(e.into());
                }
            };
            let mut batch = WriteBatch::new();
            batch.put(
                Space::Fleet,
                key.clone(),
                encode_record(&FleetChunkRef { device_type: &ty.device_type, created_at: now, twins: part }),
            );
            tickets.push(env.storage.submit(batch));
            keys.push(key);
        }
        let records = keys.len();
        ty.chunks.lock().extend(keys);

        let mut members: HashMap<DtaId, (u64, Vec<TwinId>)> = HashMap::new();
        let mut twins = Vec::with_capacity(specs.len());
        for (slot, spec) in slots.into_iter().zip(specs) {
            for d in &spec.dtas {
                members.entry(d.clone()).or_insert_with(|| (versions[d], Vec::new())).1.push(spec.id.clone());
            }
            let state = spec.initial_state(&ty.device_type, &ty.model, now);
            twins.push((slot, state));
        }
        let created = twins.len();
        ty.twins.fetch_add(created, Relaxed);
        let launched = launch_batch(&env, twins);
        Ok(async move {
            let mut failure = None;
            for t in tickets {
                if let Err(e) = t.await {
                    failure = Some(e);
                }
            }
            launched.await;
            register_members(&env, members);
            match failure {
                Some(e) => Err(e.into()),
                None => Ok(FleetReport { created, records }),
            }
        })
    }

    fn restart_child(&mut self, slot: Arc<TwinSlot>, error: String, ctx: &mut Context<Self>) {
        let env = self.ctx.env.clone();
        let now = env.clock.now();
        let decision = self.restarts.entry(slot.id.clone()).or_default().on_failure(&env.settings.restart, now);
        match decision {
            RestartDecision::Restart { after_ms, attempt } => {
                let ty = self.ctx.clone();
                let s = slot.clone();
                let load = async move {
                    ty.env.clock.sleep(after_ms).await;
                    // Writes the twin submitted before it crashed are applied first.
                    ty.env.storage.barrier().await.map_err(|e| e.to_string())?;
                    load_twin(&ty, &s)
                };
                ctx.spawn(load.into_actor(self).map(move |loaded, act, _| match loaded {
                    Ok(state) => {
                        let env = act.ctx.env.clone();
                        let i = env.arbiters.index_for(slot.id.as_str());
                        slot.stats.restarted();
                        tracing::info!(twin = %slot.id, attempt, "restarting twin from its last persisted state");
                        env.arbiters.run_on(i, move || {
                            let layers = layers_for(&slot.ty.env, &state.memberships);
                            Dti::launch(slot, state, layers, Some((error, attempt)));
                        });
                    }
                    Err(why) => act.give_up(&slot, &format!("cannot reload its state: {why}")),
                }));
            }
            RestartDecision::GiveUp { failures_in_window } => {
                self.give_up(
                    &slot,
                    &format!(
                        "{failures_in_window} failures within {} ms; last: {error}",
                        env.settings.restart.window_ms
                    ),
                );
            }
        }
    }

    fn give_up(&self, slot: &TwinSlot, why: &str) {
        slot.stats.set_status(ActorStatus::Failed);
        slot.stats.record_error(why);
        slot.set_addr(None);
        let env = &self.ctx.env;
        env.alerts.raise(Alert {
            at: env.clock.now(),
            severity: Severity::Critical,
            kind: AlertKind::ActorFailed,
            source: format!("dti/{}", slot.id),
            message: format!("twin {} is no longer restarted: {why}", slot.id),
        });
    }
}

impl Actor for Tdta {
    type Context = Context<Self>;
}

/// Runs a handler's synchronous part under the panic guard. A TDTA that panics keeps its
/// shared context (defaults, fleet index); the error is recorded and alerted, and the
/// caller gets `Crashed`.
fn guarded<T>(ctx: &TypeContext, f: impl FnOnce() -> Result<T, TwinError>) -> Result<T, TwinError> {
    ctx.stats.dequeued();
    panic::catch(f).unwrap_or_else(|message| {
        ctx.stats.record_error(&message);
        ctx.env.alerts.raise(Alert {
            at: ctx.env.clock.now(),
            severity: Severity::Critical,
            kind: AlertKind::ActorFailed,
            source: ctx.path.to_string(),
            message: format!("handler panicked: {message}"),
        });
        Err(TwinError::Crashed { kind: "tdta", id: ctx.device_type.to_string(), message })
    })
}

impl Handler<SpawnFleet> for Tdta {
    type Result = ResponseFuture<Result<FleetReport, TwinError>>;

    fn handle(&mut self, SpawnFleet(specs): SpawnFleet, _: &mut Context<Self>) -> Self::Result {
        let ctx = self.ctx.clone();
        match guarded(&ctx, || self.spawn_fleet(specs)) {
            Ok(fut) => Box::pin(fut),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }
}

impl Handler<SetDefaults> for Tdta {
    type Result = ResponseFuture<Result<(), TwinError>>;

    fn handle(&mut self, SetDefaults(defaults): SetDefaults, _: &mut Context<Self>) -> Self::Result {
        let ctx = self.ctx.clone();
        let r = guarded(&ctx, || {
            let mut spec = ctx.spec();
            spec.defaults = defaults.clone();
            let mut b = WriteBatch::new();
            b.put(Space::DeviceType, ctx.device_type.as_str(), encode_record(&spec));
            Ok(ctx.env.storage.submit(b))
        });
        Box::pin(async move {
            r?.await?;
            *ctx.defaults.write() = Arc::new(defaults);
            Ok(())
        })
    }
}

impl Handler<ChildFailed> for Tdta {
    type Result = ();

    fn handle(&mut self, msg: ChildFailed, ctx: &mut Context<Self>) {
        let tctx = self.ctx.clone();
        let _ = guarded(&tctx, || {
            self.restart_child(msg.slot, msg.error, ctx);
            Ok(())
        });
    }
}
