//! A DTA's shared data, outside its actor: its record, members, children and the layers
//! it hands out (its own and its ancestors'), and the requests its actor answers. The
//! directory holds these entries; the actor (`dta`) only serializes changes and pushes.

use crate::context::Infra;
use crate::dti::ResolvedLayers;
use crate::error::TwinError;
use crate::maps::FastSet;
use crate::records::DtaSpec;
use actix::prelude::*;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use twinfleet_models::{ConfigLayer, DtaId, LayerRef, TwinId};
use twinfleet_runtime::{ActorStats, ActorStatus};

#[derive(Debug)]
pub struct DtaEntry {
    pub(crate) id: DtaId,
    pub(crate) stats: ActorStats,
    pub(crate) infra: Arc<Infra>,
    record: RwLock<DtaSpec>,
    resolved: RwLock<Arc<ResolvedLayers>>,
    parent_resolved: Mutex<HashMap<DtaId, Arc<ResolvedLayers>>>,
    pub(crate) members: Mutex<FastSet<TwinId>>,
    pub(crate) children: Mutex<HashSet<DtaId>>,
    /// Where its actor takes requests, while it runs.
    addr: RwLock<Option<Recipient<DtaMsg>>>,
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
    /// A new entry; `parent_resolved` holds the layers its parents hand out now.
    pub(crate) fn new(
        spec: DtaSpec,
        infra: Arc<Infra>,
        parent_resolved: HashMap<DtaId, Arc<ResolvedLayers>>,
    ) -> Arc<Self> {
        let stats = ActorStats::new("dta", spec.id.as_arc().clone(), Some(Arc::from("platform/supervisor")));
        let entry = Arc::new(DtaEntry {
            id: spec.id.clone(),
            stats,
            resolved: RwLock::new(Arc::new(ResolvedLayers { dta: spec.id.clone(), version: 0, layers: vec![] })),
            record: RwLock::new(spec),
            parent_resolved: Mutex::new(parent_resolved),
            members: Mutex::new(FastSet::default()),
            children: Mutex::new(HashSet::new()),
            addr: RwLock::new(None),
            infra,
        });
        entry.recompute();
        entry
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
    pub(crate) fn refresh(self: &Arc<Self>, ids: Vec<TwinId>) {
        if let Some(a) = self.addr.read().as_ref() {
            a.do_send(DtaMsg::new(DtaRequest::Push(Some(ids)), self));
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

    pub(crate) fn addr(&self) -> Option<Recipient<DtaMsg>> {
        self.addr.read().clone()
    }

    /// Publishes the address of the actor that now serves this DTA.
    pub(crate) fn attach(&self, addr: Recipient<DtaMsg>) {
        *self.addr.write() = Some(addr);
        self.stats.set_status(ActorStatus::Running);
    }

    pub(crate) fn record(&self) -> DtaSpec {
        self.record.read().clone()
    }

    pub(crate) fn set_record(&self, next: DtaSpec) {
        *self.record.write() = next;
    }

    /// Takes a parent's newer layers; false when they are not newer than those held.
    pub(crate) fn parent_changed(&self, parent: Arc<ResolvedLayers>) -> bool {
        let mut pr = self.parent_resolved.lock();
        match pr.get(&parent.dta) {
            Some(old) if old.version >= parent.version => false,
            _ => {
                pr.insert(parent.dta.clone(), parent);
                true
            }
        }
    }

    /// Own layers plus every ancestor's, under a new version.
    pub(crate) fn recompute(&self) -> Arc<ResolvedLayers> {
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
        let resolved = Arc::new(ResolvedLayers { dta: r.id.clone(), version: self.infra.next_version(), layers });
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

/// A request in a DTA's mailbox, counted in its depth until the DTA takes it.
pub(crate) struct DtaMsg(pub DtaRequest, pub(crate) crate::queued::Queued);

impl DtaMsg {
    pub(crate) fn new(req: DtaRequest, to: &Arc<DtaEntry>) -> Self {
        DtaMsg(req, crate::queued::Queued::new(to))
    }
}

impl crate::queued::Counted for DtaEntry {
    fn stats(&self) -> &ActorStats {
        &self.stats
    }
}

impl Message for DtaMsg {
    /// Members the change reached.
    type Result = Result<usize, TwinError>;
}
