//! The TDTA: one actor per device type. It creates the DTIs of its type (one at a time
//! or a whole fleet in one call), holds the type's configuration defaults, and supervises
//! its DTIs: a DTI that crashed is restarted from its last persisted state after a
//! backoff, and after too many failures in a window it is marked failed and an alert is
//! raised.

use crate::dti::{
    ChildFailed, Dti, FleetReport, ResolvedLayers, SetDefaults, SpawnFleet, Start, TdtaPorts, TwinSlot, TypeContext,
    load_twin,
};
use crate::env::TwinEnv;
use crate::error::TwinError;
use crate::group::DtaEntry;
use crate::handle::deliver;
use crate::maps::FastMap;
use crate::queued::Queued;
use crate::records::{CHUNK, DeviceTypeSpec, FleetChunkRef, TwinSpec, fleet_key};
use crate::spaces;
use actix::prelude::*;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use twinfleet_models::{
    Alert, AlertKind, DeviceTypeId, DtaId, Effect, RestartTracker, Severity, Timestamp, TwinId, TwinState, WaitName,
};
use twinfleet_runtime::{ActorStatus, ActorView, Ticket, WriteBatch, encode_record, panic};

/// The layers each DTA currently hands out, for twins about to start.
pub(crate) fn layers_for(env: &TwinEnv, dtas: &[DtaId]) -> Vec<Arc<ResolvedLayers>> {
    dtas.iter().filter_map(|d| env.directory.dtas.get(d).map(|e| e.resolved())).collect()
}

/// A batch of twins travelling to an arbiter: one packed fleet record's worth.
pub(crate) struct ChunkWork {
    pub key: Vec<u8>,
    pub origin: u32,
    pub specs: Vec<TwinSpec>,
    pub slots: Vec<Arc<TwinSlot>>,
    /// Written in the same batch as this chunk's record.
    pub also: WriteBatch,
}

/// Collects, per DTA, the twins started in one batch and the oldest layer version they
/// were started with; registers them with their DTAs at the end of the batch.
#[derive(Default)]
pub(crate) struct NewMembers {
    by_dta: FastMap<DtaId, (u64, Vec<TwinId>)>,
    /// The distinct memberships of this batch's twins so far, with their layers: the
    /// twins of one batch share a few hundred sets of DTAs at most, and this saves a
    /// directory lookup per DTA and twin.
    seen: FastMap<Vec<DtaId>, Vec<Arc<ResolvedLayers>>>,
}

impl NewMembers {
    /// Starts one twin on the current arbiter and remembers its memberships.
    pub(crate) fn launch(&mut self, env: &TwinEnv, slot: Arc<TwinSlot>, state: TwinState, start: Start) {
        let layers = match self.seen.get(&state.memberships) {
            Some(layers) => layers.clone(),
            None => {
                let layers = layers_for(env, &state.memberships);
                self.seen.insert(state.memberships.clone(), layers.clone());
                layers
            }
        };
        for l in &layers {
            let e = self.by_dta.entry(l.dta.clone()).or_insert_with(|| (l.version, Vec::new()));
            e.0 = e.0.min(l.version);
            e.1.push(state.identity.twin_id.clone());
        }
        Dti::launch(slot, state, layers, start);
    }

    /// Adds the twins to their DTAs' member sets (one lock per DTA), and has a DTA
    /// re-push its layers to them if they changed since the twins started.
    pub(crate) fn register(self, env: &TwinEnv) {
        for (dta, (version, ids)) in self.by_dta {
            if let Some(entry) = env.directory.dtas.get(&dta) {
                let entry: Arc<DtaEntry> = entry.clone();
                entry.add_members(ids.iter().cloned());
                if entry.resolved().version != version {
                    entry.refresh(ids);
                }
            }
        }
    }
}

/// Runs `f` on arbiter `i` and returns the future of its result (`None` if the arbiter
/// is gone).
pub(crate) fn on_arbiter<T, F>(env: &TwinEnv, i: usize, f: F) -> impl Future<Output = Option<T>> + use<T, F>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    env.arbiters.run_on(i, move || {
        let _ = tx.send(f());
    });
    async move { rx.await.ok() }
}

/// Phase 1 of a fleet creation, on an arbiter: reserve the ids. Stops at the first id
/// that exists (or is quarantined) and returns it.
fn reserve(env: &TwinEnv, ty: &Arc<TypeContext>, arbiter: u16, works: &mut [ChunkWork]) -> Option<TwinId> {
    for w in works {
        for spec in &w.specs {
            let slot = Arc::new(TwinSlot::new(spec.id.clone(), ty.clone(), w.origin, arbiter));
            if !env.directory.reserve_twin(&slot) {
                return Some(spec.id.clone());
            }
            w.slots.push(slot);
        }
    }
    None
}

/// Phase 2, on the same arbiter: write the packed records, start the twins, register
/// them with their DTAs. Returns the tickets of the records.
fn launch_chunks(env: &TwinEnv, ty: &TypeContext, now: Timestamp, works: Vec<ChunkWork>) -> Vec<Ticket> {
    let mut tickets = Vec::with_capacity(works.len());
    let mut members = NewMembers::default();
    for w in works {
        let record = FleetChunkRef { device_type: &ty.device_type, created_at: now, twins: &w.specs };
        let mut batch = w.also;
        batch.put(spaces::FLEET, w.key, record.encode());
        tickets.push(env.storage.submit(batch));
        for (slot, spec) in w.slots.into_iter().zip(w.specs) {
            let state = spec.into_initial_state(&ty.device_type, &ty.model, now);
            members.launch(env, slot, state, Start::default());
        }
    }
    members.register(env);
    tickets
}

#[derive(Debug)]
pub struct Tdta {
    ctx: Arc<TypeContext>,
    env: Arc<TwinEnv>,
    restarts: HashMap<TwinId, RestartTracker>,
}

impl Tdta {
    /// Starts the TDTA of `ctx` and publishes its ports in the context.
    pub(crate) fn launch(ctx: Arc<TypeContext>, env: Arc<TwinEnv>) {
        let cap = env.settings.aggregate_mailbox;
        let c = ctx.clone();
        let addr = Tdta::create(move |actx| {
            actx.set_mailbox_capacity(cap);
            Tdta { ctx: c, env, restarts: HashMap::new() }
        });
        ctx.attach(TdtaPorts {
            failed: addr.clone().recipient(),
            spawn: addr.clone().recipient(),
            defaults: addr.recipient(),
        });
    }

    fn spawn_fleet(
        &mut self,
        specs: Vec<TwinSpec>,
        mut also: WriteBatch,
    ) -> Result<impl Future<Output = Result<FleetReport, TwinError>> + use<>, TwinError> {
        let env = self.env.clone();
        let ty = self.ctx.clone();
        let distinct: HashSet<&DtaId> = specs.iter().flat_map(|s| s.dtas.iter()).collect();
        if let Some(d) = distinct.into_iter().find(|d| !env.directory.dtas.contains_key(*d)) {
            return Err(TwinError::UnknownDta(d.to_string()));
        }
        let now = env.clock.now();
        let created = specs.len();

        // One packed record per CHUNK twins; records are spread over the arbiters, and a
        // twin lives on the arbiter that handled its record.
        let n = env.arbiters.len();
        let mut per_arbiter: Vec<Vec<ChunkWork>> = (0..n).map(|_| Vec::new()).collect();
        let mut keys = Vec::new();
        let mut specs = specs.into_iter().peekable();
        let base = ty.chunks.lock().len();
        while specs.peek().is_some() {
            let part: Vec<TwinSpec> = specs.by_ref().take(CHUNK).collect();
            let key = fleet_key(&ty.device_type, env.storage.generate_id()?);
            let origin = (base + keys.len()) as u32;
            let also = std::mem::take(&mut also);
            per_arbiter[keys.len() % n].push(ChunkWork {
                key: key.clone(),
                origin,
                specs: part,
                slots: Vec::new(),
                also,
            });
            keys.push(key);
        }
        let records = keys.len();
        ty.chunks.lock().extend(keys);

        Ok(async move {
            // Phase 1: reserve every id on every arbiter, so that a conflict leaves nothing.
            let reserved = per_arbiter.into_iter().enumerate().map(|(i, mut works)| {
                let (e, t) = (env.clone(), ty.clone());
                on_arbiter(&env, i, move || {
                    let conflict = reserve(&e, &t, i as u16, &mut works);
                    (works, conflict)
                })
            });
            let reserved: Vec<(Vec<ChunkWork>, Option<TwinId>)> =
                futures::future::join_all(reserved).await.into_iter().map(|r| r.unwrap_or_default()).collect();
            if let Some(id) = reserved.iter().find_map(|(_, c)| c.clone()) {
                for slot in reserved.iter().flat_map(|(w, _)| w.iter()).flat_map(|w| w.slots.iter()) {
                    env.directory.release_twin(slot);
                }
                return Err(TwinError::AlreadyExists { kind: "twin", id: id.to_string() });
            }
            // Phase 2: write, start and register on the same arbiters.
            let launched = reserved.into_iter().enumerate().map(|(i, (works, _))| {
                let (e, t) = (env.clone(), ty.clone());
                on_arbiter(&env, i, move || launch_chunks(&e, &t, now, works))
            });
            let tickets: Vec<Ticket> =
                futures::future::join_all(launched).await.into_iter().flatten().flatten().collect();
            ty.twins.fetch_add(created, Relaxed);
            for t in tickets {
                t.await?;
            }
            Ok(FleetReport { created, records })
        })
    }

    /// Feeds a child's failure to its restart machine and carries out what it decides:
    /// a restart when the backoff wait expires, or an alert once it gives up.
    fn restart_child(&mut self, slot: Arc<TwinSlot>, error: String, ctx: &mut Context<Self>) {
        let now = self.env.clock.now();
        let tracker = self.restarts.entry(slot.id.clone()).or_default();
        let effects = tracker.on_failure(&self.env.settings.restart, now, &error);
        let given_up = tracker.given_up();
        for effect in effects {
            match effect {
                Effect::ArmWait { wait: WaitName::Restart, attempt, deadline } => {
                    self.restart_at(slot.clone(), error.clone(), attempt, deadline, ctx)
                }
                Effect::RaiseAlert { kind, severity, message } => self.alert_given_up(&slot, kind, severity, message),
                other => tracing::error!(twin = %slot.id, ?other, "a supervisor cannot carry out this effect"),
            }
        }
        if given_up {
            self.stop_restarting(&slot);
        }
    }

    /// Restarts the twin from its last persisted state once `deadline` has passed.
    fn restart_at(
        &self,
        slot: Arc<TwinSlot>,
        error: String,
        attempt: u32,
        deadline: Timestamp,
        ctx: &mut Context<Self>,
    ) {
        let ty = self.ctx.clone();
        let s = slot.clone();
        let env = self.env.clone();
        let load = async move {
            env.clock.sleep_until(deadline).await;
            // Writes the twin submitted before it crashed are applied first.
            env.storage.barrier().await.map_err(|e| e.to_string())?;
            load_twin(&ty, &s)
        };
        ctx.spawn(load.into_actor(self).map(move |loaded, act, _| match loaded {
            Ok((state, tail)) => {
                let env = act.env.clone();
                let latest =
                    crate::latest::stored(&env.series, &*env.storage, slot.ty.device_type.as_str(), slot.id.as_str())
                        .ok()
                        .flatten()
                        .map(Box::new);
                let i = slot.arbiter as usize;
                slot.stats.restarted();
                tracing::info!(twin = %slot.id, attempt, "restarting twin from its last persisted state");
                let e = env.clone();
                env.arbiters.run_on(i, move || {
                    let layers = layers_for(&e, &state.memberships);
                    Dti::launch(
                        slot,
                        state,
                        layers,
                        Start { restart: Some((error, attempt)), tail: tail.events, latest, chunk: tail.chunk },
                    );
                });
            }
            Err(why) => {
                let message = format!("cannot reload its state: {why}");
                act.alert_given_up(&slot, AlertKind::ActorFailed, Severity::Critical, message);
                act.stop_restarting(&slot);
            }
        }));
    }

    fn alert_given_up(&self, slot: &TwinSlot, kind: AlertKind, severity: Severity, why: String) {
        slot.stats.record_error(&why);
        self.env.alerts.raise(Alert {
            at: self.env.clock.now(),
            severity,
            kind,
            source: format!("dti/{}", slot.id),
            message: format!("twin {} is no longer restarted: {why}", slot.id),
        });
    }

    fn stop_restarting(&self, slot: &TwinSlot) {
        slot.stats.set_status(ActorStatus::Failed);
        slot.set_addr(None);
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
        ctx.infra.alerts.raise(Alert {
            at: ctx.infra.clock.now(),
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

    fn handle(&mut self, SpawnFleet(specs, also, queued): SpawnFleet, _: &mut Context<Self>) -> Self::Result {
        queued.taken();
        let ctx = self.ctx.clone();
        match guarded(&ctx, || self.spawn_fleet(specs, also)) {
            Ok(fut) => Box::pin(fut),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }
}

impl Handler<SetDefaults> for Tdta {
    type Result = ResponseFuture<Result<(), TwinError>>;

    fn handle(&mut self, SetDefaults(defaults, queued): SetDefaults, _: &mut Context<Self>) -> Self::Result {
        queued.taken();
        let ctx = self.ctx.clone();
        let r = guarded(&ctx, || {
            let mut spec = ctx.spec();
            spec.defaults = defaults.clone();
            let mut b = WriteBatch::new();
            b.put(spaces::DEVICE_TYPE, ctx.device_type.as_str(), encode_record(&spec));
            Ok(ctx.infra.storage.submit(b))
        });
        let env = self.env.clone();
        Box::pin(async move {
            r?.await?;
            let rules_changed = ctx.defaults().get(twinfleet_models::rules::RULES_KEY)
                != defaults.get(twinfleet_models::rules::RULES_KEY);
            ctx.set_defaults(defaults);
            if rules_changed {
                // Every twin of the type looks at its rules now, not at its next input
                // (a rule disabled at the type clears its alerts at once). A twin whose
                // mailbox is full gets it at its next input or deadline.
                for slot in env.directory.twins.iter().filter(|s| Arc::ptr_eq(&s.ty, &ctx)) {
                    // (Refused by a full mailbox, the message takes itself out of the
                    // depth it counted in.)
                    slot.with_addr(|a| a.try_send(crate::dti::Ask::new(crate::dti::RulesChanged, &slot)));
                }
            }
            Ok(())
        })
    }
}

impl Handler<ChildFailed> for Tdta {
    type Result = ();

    fn handle(&mut self, ChildFailed { slot, error, queued }: ChildFailed, ctx: &mut Context<Self>) {
        queued.taken();
        let tctx = self.ctx.clone();
        let _ = guarded(&tctx, || {
            self.restart_child(slot, error, ctx);
            Ok(())
        });
    }
}

/// What a TDTA shows of itself.
#[derive(Debug, Clone, Serialize)]
pub struct TypeInfo {
    #[serde(flatten)]
    pub spec: DeviceTypeSpec,
    pub twins: usize,
    pub fleet_records: usize,
}

/// A checked claim credential (`TwinRuntime::authenticate_claim`): the device type it
/// provisions for and, for a pre-registered batch's token, the batch.
#[derive(Debug, Clone)]
pub struct ClaimCredential {
    pub ty: TypeHandle,
    pub batch: Option<String>,
}

impl ClaimCredential {
    /// `<type>` or `<type>/<batch>`: the credential's name (its MQTT username).
    pub fn name(&self) -> String {
        match &self.batch {
            Some(b) => format!("{}/{b}", self.ty.id()),
            None => self.ty.id().to_string(),
        }
    }
}

/// A handle to one TDTA (device type).
#[derive(Debug, Clone)]
pub struct TypeHandle {
    ctx: Arc<TypeContext>,
}

impl TypeHandle {
    pub(crate) fn new(ctx: Arc<TypeContext>) -> Self {
        TypeHandle { ctx }
    }

    /// The type's domain model, if it has one.
    pub fn domain(&self) -> Option<Arc<twinfleet_models::DomainModel>> {
        self.ctx.domain.clone()
    }

    pub(crate) fn claim_rules(&self) -> Arc<crate::claims::Rules> {
        self.ctx.claim_rules.clone()
    }

    /// How the type's devices are provisioned, if it says.
    pub fn provisioning(&self) -> Option<Arc<twinfleet_models::provisioning::ProvisioningSpec>> {
        self.ctx.provisioning.clone()
    }

    pub fn id(&self) -> &DeviceTypeId {
        &self.ctx.device_type
    }

    pub fn info(&self) -> TypeInfo {
        TypeInfo {
            spec: self.ctx.spec(),
            twins: self.ctx.twins.load(Relaxed),
            fleet_records: self.ctx.chunks.lock().len(),
        }
    }

    pub fn actor(&self) -> ActorView {
        self.ctx.stats.view()
    }

    /// Creates twins of this type, all or nothing; resolves once they all run and their
    /// records are durable.
    pub async fn spawn_fleet(&self, specs: Vec<TwinSpec>) -> Result<FleetReport, TwinError> {
        self.spawn_fleet_with(specs, WriteBatch::new()).await
    }

    /// [`TypeHandle::spawn_fleet`], writing `also` atomically with the twins' record.
    pub(crate) async fn spawn_fleet_with(
        &self,
        specs: Vec<TwinSpec>,
        also: WriteBatch,
    ) -> Result<FleetReport, TwinError> {
        for s in &specs {
            twinfleet_models::limits::check_object(&s.metadata.attributes)
                .map_err(twinfleet_models::ModelError::from)?;
        }
        let addr = self.tdta()?;
        // Creating a large fleet takes longer than an ordinary request: no deadline here
        // beyond the storage's own back-pressure.
        addr.spawn.send(SpawnFleet(specs, also, Queued::new(&self.ctx))).await.map_err(|_| TwinError::ShuttingDown)?
    }

    pub async fn set_defaults(&self, defaults: Map<String, Value>) -> Result<(), TwinError> {
        twinfleet_models::limits::check_object(&defaults).map_err(twinfleet_models::ModelError::from)?;
        twinfleet_models::rules::check_config(&defaults, self.ctx.metrics.as_deref())
            .map_err(twinfleet_models::ModelError::from)?;
        twinfleet_models::install::check_config(&defaults).map_err(TwinError::Invalid)?;
        let addr = self.tdta()?;
        deliver(addr.defaults.send(SetDefaults(defaults, Queued::new(&self.ctx))), &self.ctx.stats, &self.ctx.infra)
            .await
    }

    /// The TDTA's address (each message counts itself in its mailbox depth: `Queued`).
    fn tdta(&self) -> Result<TdtaPorts, TwinError> {
        self.ctx.tdta().ok_or_else(|| TwinError::Unavailable {
            kind: "tdta",
            id: self.ctx.device_type.to_string(),
            status: self.ctx.stats.status(),
        })
    }
}
