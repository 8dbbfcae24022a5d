//! What the operator API needs beyond single-twin requests: authorization decisions on
//! live facts (types, DTA membership), filtered and paged listings of twins read from
//! the directory without asking each actor, and deleting a twin with everything stored
//! about it.

use crate::access::Principal;
use crate::env::TwinEnv;
use crate::error::TwinError;
use crate::handle::TwinHandle;
use crate::records::{FleetChunk, FleetChunkRef, journal_prefix, twin_key};
use crate::spaces;
use crate::supervisor::TwinRuntime;
use crate::telemetry::series_key;
use serde::{Deserialize, Serialize};
use std::collections::{BinaryHeap, HashSet};
use std::sync::Arc;
use twinfleet_models::access::{access_to_dta, access_to_twin, access_to_type, decide};
use twinfleet_models::{Access, Action, DeviceTypeId, DtaId, Role, Scope, TwinFacts, TwinId};
use twinfleet_runtime::WriteBatch;

/// The DTA `root` and every DTA nested under it.
fn subtree(env: &TwinEnv, root: &DtaId) -> Vec<DtaId> {
    let mut out = vec![root.clone()];
    let mut i = 0;
    while i < out.len() {
        if let Some(e) = env.directory.dtas.get(&out[i]) {
            let mut children: Vec<DtaId> = e.children.lock().iter().cloned().collect();
            children.retain(|c| !out.contains(c));
            out.extend(children);
        }
        i += 1;
    }
    out
}

/// Adds the members of `root` and of every DTA nested under it to `into`.
fn subtree_members(env: &TwinEnv, root: &DtaId, into: &mut HashSet<TwinId>) {
    for d in subtree(env, root) {
        if let Some(e) = env.directory.dtas.get(&d) {
            into.extend(e.members.lock().iter().cloned());
        }
    }
}

fn is_member(env: &TwinEnv, dta: &DtaId, twin: &TwinId) -> bool {
    env.directory.dtas.get(dta).is_some_and(|e| e.members.lock().contains(twin))
}

struct Facts<'a> {
    env: &'a TwinEnv,
    id: &'a TwinId,
    ty: &'a DeviceTypeId,
}

impl TwinFacts for Facts<'_> {
    fn id(&self) -> &TwinId {
        self.id
    }
    fn device_type(&self) -> &DeviceTypeId {
        self.ty
    }
    fn within(&self, dta: &DtaId) -> bool {
        subtree(self.env, dta).iter().any(|d| is_member(self.env, d, self.id))
    }
}

/// Which twins to list. Filters combine with AND.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams), into_params(parameter_in = Query))]
pub struct TwinFilter {
    pub device_type: Option<String>,
    /// A DTA: its members and those of DTAs nested under it.
    pub group: Option<String>,
    /// Lifecycle: `active` or `archived`.
    pub state: Option<LifecycleFilter>,
    /// Actor status: `running`, `restarting`, `failed`, ...
    pub status: Option<String>,
    pub tag: Option<String>,
    /// Health from the open alerts: `ok`, `degraded`, `critical`, `offline`.
    #[cfg_attr(feature = "openapi", param(value_type = Option<String>))]
    pub health: Option<twinfleet_models::Health>,
    /// Cursor: only ids after this one (the `next` of the previous page).
    pub after: Option<String>,
    /// Default 100, at most 10,000.
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum LifecycleFilter {
    Active,
    Archived,
}

/// One line of a twin listing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TwinSummary {
    pub id: String,
    pub device_type: String,
    /// `active` or `archived`.
    pub state: String,
    pub status: String,
    /// From its open alerts (`twinfleet_models::Health`).
    #[serde(default)]
    pub health: twinfleet_models::Health,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// A page of twins, in id order.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TwinPage {
    /// Twins matching the filters (and visible to the caller), all pages together.
    pub total: usize,
    pub twins: Vec<TwinSummary>,
    /// Pass as `after` for the next page; absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// The twins a principal may read, precomputed for a listing.
struct Visible {
    all: bool,
    twins: HashSet<TwinId>,
    types: HashSet<DeviceTypeId>,
    members: HashSet<TwinId>,
}

impl Visible {
    fn of(env: &TwinEnv, p: &Principal) -> Visible {
        let mut v = Visible {
            all: p.role == Role::Admin,
            twins: HashSet::new(),
            types: HashSet::new(),
            members: HashSet::new(),
        };
        for g in p.grants.iter() {
            match &g.scope {
                Scope::Fleet => v.all = true,
                Scope::Twin(id) => {
                    v.twins.insert(id.clone());
                }
                Scope::DeviceType(t) => {
                    v.types.insert(t.clone());
                }
                Scope::Dta(d) => subtree_members(env, d, &mut v.members),
            }
        }
        v
    }

    fn sees(&self, id: &TwinId, ty: &DeviceTypeId) -> bool {
        self.all || self.twins.contains(id) || self.types.contains(ty) || self.members.contains(id)
    }
}

impl TwinRuntime {
    /// Whether `p` may take `action` on the twin `h`.
    pub fn authorize_twin(&self, p: &Principal, action: Action, h: &TwinHandle) -> Result<(), TwinError> {
        let env = self.env();
        let granted = if p.role == Role::Admin {
            Some(Access::Write)
        } else {
            access_to_twin(p.grants.iter(), &Facts { env, id: h.id(), ty: h.device_type() })
        };
        Ok(decide(p.role, action, granted, &format!("twin {}", h.id()))?)
    }

    /// Whether `p` may take `action` on device type `ty` (creating its twins is
    /// `Provision` on the type).
    pub fn authorize_type(&self, p: &Principal, action: Action, ty: &DeviceTypeId) -> Result<(), TwinError> {
        Ok(decide(p.role, action, access_to_type(p.grants.iter(), ty), &format!("device type {ty}"))?)
    }

    /// Whether `p` may take `action` on DTA `dta` (a grant on an enclosing DTA counts).
    pub fn authorize_dta(&self, p: &Principal, action: Action, dta: &DtaId) -> Result<(), TwinError> {
        let env = self.env();
        let encloses = |g: &DtaId| subtree(env, g).contains(dta);
        Ok(decide(p.role, action, access_to_dta(p.grants.iter(), encloses), &format!("DTA {dta}"))?)
    }

    /// Whether `p`'s role allows `action` on objects that need no grant (creating device
    /// types and DTAs needs a grant on the whole fleet; inspection needs the role only).
    pub fn authorize(&self, p: &Principal, action: Action) -> Result<(), TwinError> {
        let granted = match action {
            Action::Inspect => Some(Access::Write),
            _ => p.grants.iter().filter(|g| g.scope == Scope::Fleet).map(|g| g.access).max(),
        };
        Ok(decide(p.role, action, granted, "the fleet")?)
    }

    /// Members of DTA `dta` and of the DTAs nested under it, in id order.
    pub fn group_members(&self, dta: &str) -> Result<Vec<TwinId>, TwinError> {
        let root = self.dta(dta)?.id().clone();
        let mut set = HashSet::new();
        subtree_members(self.env(), &root, &mut set);
        let mut v: Vec<TwinId> = set.into_iter().collect();
        v.sort();
        Ok(v)
    }

    /// A page of the twins `p` may read that match `f`, in id order.
    pub fn list_twins(&self, p: &Principal, f: &TwinFilter) -> Result<TwinPage, TwinError> {
        let env = self.env();
        let limit = f.limit.unwrap_or(100).clamp(1, 10_000);
        let visible = Visible::of(env, p);
        let ty = f.device_type.as_deref().map(|t| self.device_type(t).map(|h| h.id().clone())).transpose()?;
        let group = f.group.as_deref().map(|g| self.group_members(g)).transpose()?;
        let mut total = 0;
        let mut after_cursor = 0;
        // The `limit` smallest ids after the cursor: a max-heap of at most `limit`.
        let mut heap: BinaryHeap<TwinId> = BinaryHeap::with_capacity(limit + 1);
        let mut consider = |slot: &crate::dti::TwinSlot| {
            let sty = &slot.ty.device_type;
            if !visible.sees(&slot.id, sty)
                || ty.as_ref().is_some_and(|t| t != sty)
                || f.state.is_some_and(|s| (s == LifecycleFilter::Archived) != slot.archived())
                || f.tag.as_deref().is_some_and(|t| !slot.has_tag(t))
                || f.status.as_deref().is_some_and(|s| slot.stats.status().as_str() != s)
                || f.health.is_some_and(|h| env.alert_book.health(slot.id.as_str()) != h)
            {
                return;
            }
            total += 1;
            if f.after.as_deref().is_some_and(|a| slot.id.as_str() <= a) {
                return;
            }
            after_cursor += 1;
            if heap.len() < limit {
                heap.push(slot.id.clone());
            } else if heap.peek().is_some_and(|top| slot.id < *top) {
                heap.pop();
                heap.push(slot.id.clone());
            }
        };
        match &group {
            Some(members) => members.iter().filter_map(|id| env.directory.twins.get(id)).for_each(|s| consider(&s)),
            None => env.directory.twins.iter().for_each(|s| consider(&s)),
        }
        let ids = heap.into_sorted_vec();
        let next = (after_cursor > ids.len()).then(|| ids.last().map(|id| id.to_string())).flatten();
        let twins: Vec<TwinSummary> = ids
            .iter()
            .filter_map(|id| env.directory.twins.get(id))
            .map(|s| TwinSummary {
                id: s.id.to_string(),
                device_type: s.ty.device_type.to_string(),
                state: if s.archived() { "archived" } else { "active" }.into(),
                status: s.stats.status().as_str().into(),
                health: env.alert_book.health(s.id.as_str()),
                tags: s.tags(),
            })
            .collect();
        Ok(TwinPage { total, twins, next })
    }

    /// Deletes twin `id`: stops its actor (after what is queued), removes it from its
    /// DTAs, and deletes its fleet entry, snapshot, journal, telemetry and credentials
    /// in one batch. Resolves once that batch is durable.
    pub async fn delete_twin(&self, id: &str) -> Result<(), TwinError> {
        let h = self.twin(id)?;
        let env = self.env().clone();
        let slot = h.slot().clone();
        // Concurrent deletions of twins sharing a fleet record take turns.
        let _edit = slot.ty.fleet_edit.lock().await;
        if env.directory.twins.get(id).is_none_or(|s| !Arc::ptr_eq(&s, &slot)) {
            return Err(TwinError::NotFound(id.to_string()));
        }
        match h.retire().await {
            Ok(()) => {}
            Err(TwinError::Unavailable { status, .. }) => {
                return Err(TwinError::Conflict(format!("twin {id} is {status:?}; delete it once it runs")));
            }
            Err(e) => return Err(e),
        }
        env.directory.remove_twin(&slot.id);
        env.sessions.close(slot.id.as_str(), "twin deleted");
        for d in env.directory.dtas.iter() {
            d.members.lock().remove(&slot.id);
        }
        slot.ty.twins.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let storage = &env.storage;
        let mut b = WriteBatch::new();
        if slot.origin != crate::dti::NO_ORIGIN {
            let key = slot.ty.chunks.lock().get(slot.origin as usize).cloned();
            if let Some(key) = key
                && let Some(bytes) = storage.get(spaces::FLEET, &key)?
            {
                let mut chunk = FleetChunk::decode(&bytes)
                    .map_err(|e| TwinError::Invalid(format!("fleet record of twin {id} does not decode: {e}")))?;
                chunk.twins.retain(|s| s.id != slot.id);
                let rec = FleetChunkRef {
                    device_type: &chunk.device_type,
                    created_at: chunk.created_at,
                    twins: &chunk.twins,
                };
                b.put(spaces::FLEET, key, rec.encode());
            }
        }
        // Its open alerts end with it.
        env.alert_book.clear_twin_into(&mut b, slot.id.as_str(), env.clock.now());
        b.delete(spaces::SNAPSHOT, twin_key(&slot.id));
        b.delete(spaces::CREDENTIAL, twin_key(&slot.id));
        b.delete(spaces::TELEMETRY_LATEST, twin_key(&slot.id));
        b.delete(spaces::TAIL, twin_key(&slot.id));
        let prefix = journal_prefix(&slot.id);
        for space in [spaces::JOURNAL, spaces::TELEMETRY, spaces::LOGS] {
            for row in storage.scan(space, &prefix) {
                b.delete(space, row?.0);
            }
        }
        // History: every metric series of the twin (a twin re-created with this id
        // starts without it). `TELEMETRY` above is where data directories of before the
        // series store kept it.
        let history = env.series.delete_series(slot.ty.device_type.as_str(), &series_key(slot.id.as_str(), ""));
        // The history first: its deletion waits for a checkpoint in progress, whose sink
        // may still write this twin's latest values to sled (`crate::latest`); the
        // batch's delete of them must come after.
        history.await.map_err(twinfleet_runtime::StorageError::from)?;
        storage.submit(b).await?;
        env.credentials.forget(slot.id.as_str());
        Ok(())
    }
}
