//! The live actor tree as operators inspect it: a page of actors filtered by kind,
//! parent and trouble, one actor's statistics, and the per-kind summary `/metrics` sums
//! from the counters every actor keeps (no actor is messaged).

use crate::dti::TypeContext;
use crate::error::TwinError;
use crate::group::DtaEntry;
use crate::supervisor::TwinRuntime;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use twinfleet_models::{DeviceTypeId, DtaId};
use twinfleet_runtime::{ActorStats, ActorStatus, ActorView};

/// Which actors to list. `mailbox_over` and `restarted` pick troubled actors: given
/// both, an actor matching either is listed.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams), into_params(parameter_in = Query))]
pub struct ActorQuery {
    pub kind: Option<String>,
    pub parent: Option<String>,
    /// Only actors with more than this many messages waiting.
    pub mailbox_over: Option<u32>,
    /// `true`: only actors restarted at least once.
    pub restarted: Option<bool>,
    #[serde(default)]
    pub offset: usize,
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ActorPage {
    /// Actors matching the query (before paging).
    pub total: usize,
    pub actors: Vec<ActorView>,
}

/// Actors of one kind, summed for /metrics.
#[derive(Debug, Clone)]
pub struct KindSummary {
    pub kind: &'static str,
    /// `(status, actors)` for every status, zeros included.
    pub by_status: Vec<(ActorStatus, u64)>,
    pub messages_handled: u64,
    /// Messages waiting, summed over the kind's actors, and the deepest mailbox.
    pub mailbox_depth: u64,
    pub mailbox_depth_max: u64,
    pub restarts: u64,
}

impl KindSummary {
    fn new(kind: &'static str) -> Self {
        KindSummary {
            kind,
            by_status: ActorStatus::ALL.iter().map(|&s| (s, 0)).collect(),
            messages_handled: 0,
            mailbox_depth: 0,
            mailbox_depth_max: 0,
            restarts: 0,
        }
    }

    fn add(&mut self, s: &ActorStats) {
        // `by_status` follows `ActorStatus::ALL`, whose order is the enum's.
        self.by_status[s.status() as usize].1 += 1;
        self.messages_handled += s.messages_handled();
        let depth = u64::from(s.mailbox_depth());
        self.mailbox_depth += depth;
        self.mailbox_depth_max = self.mailbox_depth_max.max(depth);
        self.restarts += u64::from(s.restarts());
    }
}

/// What /metrics shows about the actors: one pass over every actor's counters (a few
/// atomic reads each, bound by memory latency: ~0.1 s per million twins here), never a
/// message.
#[derive(Debug, Clone)]
pub struct FleetSummary {
    /// `platform`, `tdta`, `dta`, `dti`, in that order.
    pub kinds: Vec<KindSummary>,
    /// `(device type, active twins, archived twins)`, sorted by type.
    pub twins: Vec<(DeviceTypeId, u64, u64)>,
}

impl TwinRuntime {
    /// The supervision tree, flattened: supervisor, TDTAs, DTAs, then DTIs.
    pub fn actors(&self, q: &ActorQuery) -> ActorPage {
        let limit = q.limit.unwrap_or(100).min(10_000);
        let keep = |s: &ActorStats| {
            let troubled = match (q.mailbox_over, q.restarted) {
                (None, None | Some(false)) => true,
                (over, restarted) => {
                    over.is_some_and(|n| s.mailbox_depth() > n) || (restarted == Some(true) && s.restarts() > 0)
                }
            };
            q.kind.as_deref().is_none_or(|k| k == s.kind)
                && q.parent.as_deref().is_none_or(|p| s.parent.as_deref() == Some(p))
                && troubled
        };
        let mut total = 0;
        let mut out = Vec::new();
        let mut visit = |s: &ActorStats| {
            if keep(s) {
                if total >= q.offset && out.len() < limit {
                    out.push(s.view());
                }
                total += 1;
            }
        };
        visit(&self.stats);
        let mut types: Vec<Arc<TypeContext>> = self.env.directory.types.iter().map(|c| c.clone()).collect();
        types.sort_by(|a, b| a.device_type.cmp(&b.device_type));
        types.iter().for_each(|t| visit(&t.stats));
        let mut dtas: Vec<(DtaId, Arc<DtaEntry>)> =
            self.env.directory.dtas.iter().map(|e| (e.key().clone(), e.clone())).collect();
        dtas.sort_by(|a, b| a.0.cmp(&b.0));
        dtas.iter().for_each(|(_, e)| visit(&e.stats));
        if q.kind.as_deref().is_none_or(|k| k == "dti") {
            self.env.directory.twins.iter().for_each(|s| visit(&s.stats));
        }
        ActorPage { total, actors: out }
    }

    /// Every actor summed by kind, and the twins by device type and lifecycle.
    pub fn summary(&self) -> FleetSummary {
        let mut platform = KindSummary::new("platform");
        platform.add(&self.stats);
        let mut tdta = KindSummary::new("tdta");
        let types: Vec<Arc<TypeContext>> = self.env.directory.types.iter().map(|t| t.clone()).collect();
        types.iter().for_each(|t| tdta.add(&t.stats));
        let mut dta = KindSummary::new("dta");
        self.env.directory.dtas.iter().for_each(|d| dta.add(&d.stats));
        let mut dti = KindSummary::new("dti");
        // (active, archived) per entry of `types`, found by pointer: few types, many twins.
        let mut counts = vec![(0u64, 0u64); types.len()];
        for slot in self.env.directory.twins.iter() {
            dti.add(&slot.stats);
            if let Some(i) = types.iter().position(|t| Arc::ptr_eq(t, &slot.ty)) {
                let c = &mut counts[i];
                if slot.archived() { c.1 += 1 } else { c.0 += 1 }
            }
        }
        let mut twins: Vec<(DeviceTypeId, u64, u64)> =
            types.iter().zip(counts).map(|(t, (active, archived))| (t.device_type.clone(), active, archived)).collect();
        twins.sort_by(|a, b| a.0.cmp(&b.0));
        FleetSummary { kinds: vec![platform, tdta, dta, dti], twins }
    }

    /// One actor: `platform/supervisor`, `tdta/<type>`, `dta/<id>` or `dti/<twin>`.
    pub fn actor(&self, kind: &str, id: &str) -> Result<ActorView, TwinError> {
        match kind {
            "platform" if id == "supervisor" => Ok(self.stats.view()),
            "tdta" => Ok(self.device_type(id)?.actor()),
            "dta" => Ok(self.dta(id)?.actor()),
            "dti" => Ok(self.twin(id)?.actor()),
            _ => Err(TwinError::Unknown { kind: "actor", id: format!("{kind}/{id}") }),
        }
    }
}
