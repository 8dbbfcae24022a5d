//! The DTA: one actor per group. It holds named configuration layers and hands them,
//! together with the layers of its enclosing DTAs, to every member DTI. A change to a
//! layer is persisted first, then pushed to every member and to every nested DTA (which
//! pushes on to its own members). Each push carries a version, so a twin that receives
//! two pushes out of order keeps the newer.
//!
//! The DTA's data (record, members, resolved layers) lives in its `DtaEntry`, outside
//! the actor, so that the actor only serializes changes and pushes.

use crate::dti::{Join, LayersChanged, Leave, ResolvedLayers};
use crate::env::TwinEnv;
use crate::error::TwinError;
use crate::group::{DtaEntry, DtaInfo, DtaMsg, DtaRequest};
use crate::handle::{TwinHandle, deliver};
use crate::records::DtaSpec;
use crate::spaces;
use actix::prelude::*;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use twinfleet_models::{Alert, AlertKind, ConfigLayer, DtaId, ModelError, Severity, TwinId};
use twinfleet_runtime::{ActorView, WriteBatch, encode_record, panic};

/// Members pushed to concurrently by one layer change.
const PUSH_CONCURRENCY: usize = 512;

/// Creates a DTA's entry, starts its actor, registers it and links it to its parents.
pub(crate) fn start(spec: DtaSpec, env: &Arc<TwinEnv>) {
    let id = spec.id.clone();
    let parents = spec.parents.clone();
    let parent_resolved: HashMap<DtaId, Arc<ResolvedLayers>> =
        parents.iter().filter_map(|p| env.directory.dtas.get(p).map(|e| (p.clone(), e.resolved()))).collect();
    let entry = DtaEntry::new(spec, env.infra().clone(), parent_resolved);
    Dta::launch(entry.clone(), env.clone());
    env.directory.add_dta(id.clone(), entry);
    for p in parents {
        if let Some(pe) = env.directory.dtas.get(&p) {
            pe.children.lock().insert(id.clone());
        }
    }
}

#[derive(Debug)]
pub struct Dta {
    entry: Arc<DtaEntry>,
    env: Arc<TwinEnv>,
}

impl Dta {
    fn launch(entry: Arc<DtaEntry>, env: Arc<TwinEnv>) {
        let cap = env.settings.aggregate_mailbox;
        let e = entry.clone();
        let addr = Dta::create(move |ctx| {
            ctx.set_mailbox_capacity(cap);
            Dta { entry: e, env }
        });
        entry.attach(addr.recipient());
    }

    /// Pushes the current layers to members (all, or `only`) and to nested DTAs.
    fn push(&self, only: Option<Vec<TwinId>>) -> impl Future<Output = usize> + use<> {
        let entry = &self.entry;
        let resolved = entry.resolved();
        let env = self.env.clone();
        if only.is_none() {
            for child in entry.children.lock().iter() {
                if let Some(c) = env.directory.dtas.get(child).map(|c| c.clone())
                    && let Some(a) = c.addr()
                {
                    // Nesting is shallow and changes are rare; this ignores the bound.
                    a.do_send(DtaMsg::new(DtaRequest::ParentChanged(resolved.clone()), &c));
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
        let env = self.env.clone();
        match req {
            DtaRequest::SetLayer { name, layer } => {
                if name.is_empty() || name.len() > 128 {
                    return Err(TwinError::Invalid(format!("layer name {name:?} must be 1 to 128 bytes")));
                }
                let mut next = entry.record();
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
                entry.set_record(next);
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
                if !entry.parent_changed(parent) {
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

    fn handle(&mut self, DtaMsg(req, queued): DtaMsg, _: &mut Context<Self>) -> Self::Result {
        queued.taken();
        self.entry.stats.dequeued();
        match panic::catch(|| self.handle_request(req)) {
            Ok(Ok(fut)) => fut,
            Ok(Err(e)) => Box::pin(std::future::ready(Err(e))),
            Err(message) => {
                let e = &self.entry;
                e.stats.record_error(&message);
                e.infra.alerts.raise(Alert {
                    at: e.infra.clock.now(),
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

    /// Whether `twin` is a direct member.
    pub fn contains(&self, twin: &str) -> bool {
        self.entry.members.lock().contains(twin)
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
        deliver(addr.send(DtaMsg::new(req, &self.entry)), stats, &self.entry.infra).await
    }

    /// Sets a layer; resolves once it is durable and has reached every member. Returns
    /// the number of members reached.
    pub async fn set_layer(&self, name: impl Into<String>, layer: ConfigLayer) -> Result<usize, TwinError> {
        twinfleet_models::limits::check_object(&layer.values).map_err(ModelError::from)?;
        twinfleet_models::rules::check_config(&layer.values, None).map_err(ModelError::from)?;
        twinfleet_models::install::check_config(&layer.values).map_err(TwinError::Invalid)?;
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
