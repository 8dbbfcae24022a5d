//! The DTA: one actor per group. It holds named configuration layers and hands them,
//! together with the layers of its enclosing DTAs, to every member DTI. A change to a
//! layer is persisted first, then pushed to every member and to every nested DTA (which
//! pushes on to its own members). Each push carries a version, so a twin that receives
//! two pushes out of order keeps the newer.
//!
//! The DTA's data (record, members, resolved layers) lives in its `DtaEntry`, outside
//! the actor, so that the actor only serializes changes and pushes.

use crate::dti::{Join, LayersChanged, Leave, ResolvedLayers};
use crate::env::{FastSet, TwinEnv};
use crate::error::TwinError;
use crate::handle::{TwinHandle, deliver};
use crate::records::DtaSpec;
use crate::spaces;
use actix::prelude::*;
use futures::StreamExt;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use twinfleet_models::{Alert, AlertKind, ConfigLayer, DtaId, LayerRef, ModelError, Severity, TwinId};
use twinfleet_runtime::{ActorStats, ActorStatus, ActorView, WriteBatch, encode_record, panic};

/// Members pushed to concurrently by one layer change.
const PUSH_CONCURRENCY: usize = 512;

#[derive(Debug)]
pub struct DtaEntry {
    pub(crate) id: DtaId,
    pub(crate) stats: ActorStats,
    pub(crate) env: Arc<TwinEnv>,
    record: RwLock<DtaSpec>,
    resolved: RwLock<Arc<ResolvedLayers>>,
    parent_resolved: Mutex<HashMap<DtaId, Arc<ResolvedLayers>>>,
    pub(crate) members: Mutex<FastSet<TwinId>>,
    pub(crate) children: Mutex<HashSet<DtaId>>,
    addr: RwLock<Option<Addr<Dta>>>,
}

/// What a DTA shows of itself.
#[derive(Debug, Clone, Serialize)]
pub struct DtaInfo {
    pub id: DtaId,
    pub name: String,
    pub parents: Vec<DtaId>,
    pub children: Vec<DtaId>,
    pub layers: BTreeMap<String, ConfigLayer>,
    pub members: usize,
    pub version: u64,
}

impl DtaEntry {
    pub(crate) fn new(spec: DtaSpec, env: Arc<TwinEnv>) -> Arc<Self> {
        let stats = ActorStats::new("dta", spec.id.as_arc().clone(), Some(Arc::from("platform/supervisor")));
        let parent_resolved: HashMap<DtaId, Arc<ResolvedLayers>> =
            spec.parents.iter().filter_map(|p| env.directory.dtas.get(p).map(|e| (p.clone(), e.resolved()))).collect();
        let entry = Arc::new(DtaEntry {
            id: spec.id.clone(),
            stats,
            resolved: RwLock::new(Arc::new(ResolvedLayers { dta: spec.id.clone(), version: 0, layers: vec![] })),
            record: RwLock::new(spec),
            parent_resolved: Mutex::new(parent_resolved),
            members: Mutex::new(FastSet::default()),
            children: Mutex::new(HashSet::new()),
            addr: RwLock::new(None),
            env,
        });
        entry.recompute();
        entry
    }

    /// Creates the entry, starts its actor, registers it and links it to its parents.
    pub(crate) fn start(spec: DtaSpec, env: &Arc<TwinEnv>) {
        let id = spec.id.clone();
        let parents = spec.parents.clone();
        let entry = DtaEntry::new(spec, env.clone());
        Dta::launch(entry.clone());
        env.directory.add_dta(id.clone(), entry);
        for p in parents {
            if let Some(pe) = env.directory.dtas.get(&p) {
                pe.children.lock().insert(id.clone());
            }
        }
    }

    pub(crate) fn resolved(&self) -> Arc<ResolvedLayers> {
        self.resolved.read().clone()
    }

    pub(crate) fn add_members(&self, ids: impl ExactSizeIterator<Item = TwinId>) {
        let mut m = self.members.lock();
        m.reserve(ids.len());
        m.extend(ids);
    }

    /// Has the actor push the current layers to `ids`.
    pub(crate) fn refresh(&self, ids: Vec<TwinId>) {
        if let Some(a) = self.addr.read().as_ref() {
            a.do_send(DtaMsg(DtaRequest::Push(Some(ids))));
        }
    }

    pub(crate) fn info(&self) -> DtaInfo {
        let r = self.record.read();
        let mut children: Vec<DtaId> = self.children.lock().iter().cloned().collect();
        children.sort();
        DtaInfo {
            id: r.id.clone(),
            name: r.name.clone(),
            parents: r.parents.clone(),
            children,
            layers: r.layers.clone(),
            members: self.members.lock().len(),
            version: self.resolved().version,
        }
    }

    /// Drops the DTA's address; the actor stops once no message is in flight.
    pub(crate) fn stop(&self) {
        self.addr.write().take();
        self.stats.set_status(ActorStatus::Stopped);
    }

    pub(crate) fn addr(&self) -> Option<Addr<Dta>> {
        self.addr.read().clone()
    }

    /// Own layers plus every ancestor's, under a new version.
    fn recompute(&self) -> Arc<ResolvedLayers> {
        let r = self.record.read();
        let mut layers: Vec<LayerRef> = r
            .layers
            .iter()
            .map(|(name, l)| LayerRef {
                dta: r.id.clone(),
                name: Arc::from(name.as_str()),
                priority: l.priority,
                values: Arc::new(l.values.clone()),
            })
            .collect();
        for p in &r.parents {
            if let Some(pr) = self.parent_resolved.lock().get(p) {
                layers.extend(pr.layers.iter().cloned());
            }
        }
        let resolved = Arc::new(ResolvedLayers { dta: r.id.clone(), version: self.env.next_version(), layers });
        *self.resolved.write() = resolved.clone();
        resolved
    }
}

#[derive(Debug)]
pub(crate) enum DtaRequest {
    SetLayer {
        name: String,
        layer: Option<ConfigLayer>,
    },
    Join(TwinId),
    Leave(TwinId),
    ParentChanged(Arc<ResolvedLayers>),
    /// Push the current layers to these members (all when `None`).
    Push(Option<Vec<TwinId>>),
}

pub(crate) struct DtaMsg(pub DtaRequest);

impl Message for DtaMsg {
    /// Members the change reached.
    type Result = Result<usize, TwinError>;
}

#[derive(Debug)]
pub struct Dta {
    entry: Arc<DtaEntry>,
}

impl Dta {
    pub(crate) fn launch(entry: Arc<DtaEntry>) -> Addr<Dta> {
        let cap = entry.env.settings.aggregate_mailbox;
        let e = entry.clone();
        let addr = Dta::create(move |ctx| {
            ctx.set_mailbox_capacity(cap);
            Dta { entry: e }
        });
        *entry.addr.write() = Some(addr.clone());
        entry.stats.set_status(ActorStatus::Running);
        addr
    }

    /// Pushes the current layers to members (all, or `only`) and to nested DTAs.
    fn push(&self, only: Option<Vec<TwinId>>) -> impl Future<Output = usize> + use<> {
        let entry = &self.entry;
        let resolved = entry.resolved();
        let env = entry.env.clone();
        if only.is_none() {
            for child in entry.children.lock().iter() {
                if let Some(c) = env.directory.dtas.get(child).and_then(|c| c.addr()) {
                    // Nesting is shallow and changes are rare; this ignores the bound.
                    c.do_send(DtaMsg(DtaRequest::ParentChanged(resolved.clone())));
                }
            }
        }
        let ids: Vec<TwinId> = match only {
            Some(ids) => ids,
            None => entry.members.lock().iter().cloned().collect(),
        };
        let handles: Vec<TwinHandle> =
            ids.iter().filter_map(|id| env.directory.twins.get(id).map(|s| TwinHandle::new(s.clone()))).collect();
        async move {
            futures::stream::iter(handles)
                .map(|h| {
                    let r = resolved.clone();
                    async move { h.request(LayersChanged(r)).await.is_ok() }
                })
                .buffer_unordered(PUSH_CONCURRENCY)
                .filter(|ok| std::future::ready(*ok))
                .count()
                .await
        }
    }

    fn handle_request(
        &mut self,
        req: DtaRequest,
    ) -> Result<futures::future::BoxFuture<'static, Result<usize, TwinError>>, TwinError> {
        let entry = self.entry.clone();
        let env = entry.env.clone();
        match req {
            DtaRequest::SetLayer { name, layer } => {
                if name.is_empty() || name.len() > 128 {
                    return Err(TwinError::Invalid(format!("layer name {name:?} must be 1 to 128 bytes")));
                }
                let mut next = entry.record.read().clone();
                match layer {
                    Some(l) => {
                        next.layers.insert(name, l);
                    }
                    None => {
                        if next.layers.remove(&name).is_none() {
                            return Err(TwinError::Invalid(format!("DTA {} has no layer {name:?}", entry.id)));
                        }
                    }
                }
                let mut b = WriteBatch::new();
                b.put(spaces::DTA, entry.id.as_str(), encode_record(&next));
                let ticket = env.storage.submit(b);
                *entry.record.write() = next;
                entry.recompute();
                let push = self.push(None);
                Ok(Box::pin(async move {
                    ticket.await?;
                    Ok(push.await)
                }))
            }
            DtaRequest::Join(twin) | DtaRequest::Leave(twin) if !env.directory.twins.contains_key(&twin) => {
                Err(TwinError::NotFound(twin.to_string()))
            }
            DtaRequest::Join(twin) => {
                let handle = TwinHandle::new(
                    env.directory
                        .twins
                        .get(&twin)
                        .map(|s| s.clone())
                        .ok_or_else(|| TwinError::NotFound(twin.to_string()))?,
                );
                let resolved = entry.resolved();
                Ok(Box::pin(async move {
                    handle.request(Join(resolved.clone())).await?;
                    entry.members.lock().insert(twin.clone());
                    // A layer change that raced with the join reaches the newcomer too.
                    if entry.resolved().version != resolved.version {
                        entry.refresh(vec![twin]);
                    }
                    Ok(1)
                }))
            }
            DtaRequest::Leave(twin) => {
                let handle = TwinHandle::new(
                    env.directory
                        .twins
                        .get(&twin)
                        .map(|s| s.clone())
                        .ok_or_else(|| TwinError::NotFound(twin.to_string()))?,
                );
                let dta = entry.id.clone();
                Ok(Box::pin(async move {
                    handle.request(Leave(dta)).await?;
                    entry.members.lock().remove(&twin);
                    Ok(1)
                }))
            }
            DtaRequest::ParentChanged(parent) => {
                let newer = {
                    let mut pr = entry.parent_resolved.lock();
                    match pr.get(&parent.dta) {
                        Some(old) if old.version >= parent.version => false,
                        _ => {
                            pr.insert(parent.dta.clone(), parent);
                            true
                        }
                    }
                };
                if !newer {
                    return Ok(Box::pin(std::future::ready(Ok(0))));
                }
                entry.recompute();
                let push = self.push(None);
                Ok(Box::pin(async move { Ok(push.await) }))
            }
            DtaRequest::Push(only) => {
                let push = self.push(only);
                Ok(Box::pin(async move { Ok(push.await) }))
            }
        }
    }
}

impl Actor for Dta {
    type Context = Context<Self>;
}

impl Handler<DtaMsg> for Dta {
    type Result = ResponseFuture<Result<usize, TwinError>>;

    fn handle(&mut self, DtaMsg(req): DtaMsg, _: &mut Context<Self>) -> Self::Result {
        self.entry.stats.dequeued();
        match panic::catch(|| self.handle_request(req)) {
            Ok(Ok(fut)) => fut,
            Ok(Err(e)) => Box::pin(std::future::ready(Err(e))),
            Err(message) => {
                let e = &self.entry;
                e.stats.record_error(&message);
                e.env.alerts.raise(Alert {
                    at: e.env.clock.now(),
                    severity: Severity::Critical,
                    kind: AlertKind::ActorFailed,
                    source: format!("dta/{}", e.id),
                    message: format!("handler panicked: {message}"),
                });
                Box::pin(std::future::ready(Err(TwinError::Crashed { kind: "dta", id: e.id.to_string(), message })))
            }
        }
    }
}

/// A handle to one DTA.
#[derive(Debug, Clone)]
pub struct DtaHandle {
    entry: Arc<DtaEntry>,
}

impl DtaHandle {
    pub(crate) fn new(entry: Arc<DtaEntry>) -> Self {
        DtaHandle { entry }
    }

    pub fn id(&self) -> &DtaId {
        &self.entry.id
    }

    pub fn info(&self) -> DtaInfo {
        self.entry.info()
    }

    pub fn actor(&self) -> ActorView {
        self.entry.stats.view()
    }

    /// Member ids in order, a page at a time.
    pub fn members(&self, offset: usize, limit: usize) -> Vec<TwinId> {
        let mut ids: Vec<TwinId> = self.entry.members.lock().iter().cloned().collect();
        ids.sort();
        ids.into_iter().skip(offset).take(limit).collect()
    }

    async fn ask(&self, req: DtaRequest) -> Result<usize, TwinError> {
        let stats = &self.entry.stats;
        let addr = self.entry.addr().ok_or_else(|| TwinError::Unavailable {
            kind: "dta",
            id: self.entry.id.to_string(),
            status: stats.status(),
        })?;
        stats.enqueued();
        deliver(addr.send(DtaMsg(req)), stats, &self.entry.env).await
    }

    /// Sets a layer; resolves once it is durable and has reached every member. Returns
    /// the number of members reached.
    pub async fn set_layer(&self, name: impl Into<String>, layer: ConfigLayer) -> Result<usize, TwinError> {
        twinfleet_models::limits::check_object(&layer.values).map_err(ModelError::from)?;
        self.ask(DtaRequest::SetLayer { name: name.into(), layer: Some(layer) }).await
    }

    pub async fn remove_layer(&self, name: impl Into<String>) -> Result<usize, TwinError> {
        self.ask(DtaRequest::SetLayer { name: name.into(), layer: None }).await
    }

    pub async fn join(&self, twin: &TwinId) -> Result<(), TwinError> {
        self.ask(DtaRequest::Join(twin.clone())).await.map(|_| ())
    }

    pub async fn leave(&self, twin: &TwinId) -> Result<(), TwinError> {
        self.ask(DtaRequest::Leave(twin.clone())).await.map(|_| ())
    }
}
