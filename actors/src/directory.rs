//! The directory of a platform: every twin's slot, every device type's context, every
//! DTA's entry, and the ids of quarantined twins. This module is their only writer:
//! the maps are `Entries`, which the rest of the crate can read (get, iterate, count)
//! but not change, so every change of the directory is one of the functions below.

use crate::dti::TwinSlot;
use crate::dti::TypeContext;
use crate::group::DtaEntry;
use crate::maps::FastHash;
use crate::spaces;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use dashmap::mapref::one::Ref;
use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use twinfleet_models::{DeviceTypeId, DtaId, TwinId};
use twinfleet_runtime::{Storage, WriteBatch, decode_record, encode_record};

/// A concurrent map that only this module writes.
#[derive(Debug)]
pub(crate) struct Entries<K: Eq + Hash, V>(DashMap<K, V, FastHash>);

impl<K: Eq + Hash, V> Default for Entries<K, V> {
    fn default() -> Self {
        Entries(DashMap::default())
    }
}

impl<K: Eq + Hash, V> Entries<K, V> {
    pub(crate) fn get<Q>(&self, k: &Q) -> Option<Ref<'_, K, V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.get(k)
    }

    pub(crate) fn contains_key<Q>(&self, k: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.contains_key(k)
    }

    pub(crate) fn iter(&self) -> dashmap::iter::Iter<'_, K, V, FastHash> {
        self.0.iter()
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

/// Locks of the twins' map. Every arbiter inserts into it while a fleet spawns or
/// restores, and every request looks a twin up in it: dashmap's default (four per core)
/// had the two arbiters of a 2-core machine waiting for each other's shard locks.
const TWIN_SHARDS: usize = 256;

/// What the directory holds.
#[derive(Debug)]
pub(crate) struct TwinDirectory {
    pub(crate) twins: Entries<TwinId, Arc<TwinSlot>>,
    pub(crate) types: Entries<DeviceTypeId, Arc<TypeContext>>,
    pub(crate) dtas: Entries<DtaId, Arc<DtaEntry>>,
    /// Records that failed to decode at start: twin id → reason.
    pub(crate) quarantine: Entries<String, String>,
    /// Member counts of the DTAs at the last clean stop, taken as each DTA is added.
    member_hints: parking_lot::Mutex<HashMap<String, usize>>,
}

impl Default for TwinDirectory {
    fn default() -> Self {
        TwinDirectory::sized(SizeHints::default())
    }
}

/// `META` key of the [`SizeHints`] record.
const SIZE_HINTS: &[u8] = b"size-hints";

/// How large the directory was at the last clean stop: a restart sizes its maps for that
/// at once, instead of growing (and rehashing, which reads every key again) a million
/// entries step by step. Only a hint: a missing or unreadable record sizes nothing.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct SizeHints {
    twins: usize,
    dta_members: HashMap<String, usize>,
}

/// The most a hint sizes a map for: a record changed by hand (its checksum protects it
/// from torn writes, not from that) must not make a start allocate without bound.
const MAX_HINT: usize = 10_000_000;

impl SizeHints {
    pub(crate) fn load(storage: &dyn Storage) -> Self {
        let mut hints: SizeHints = match storage.get(spaces::META, SIZE_HINTS) {
            Ok(Some(raw)) => decode_record(&raw).unwrap_or_default(),
            _ => SizeHints::default(),
        };
        hints.twins = hints.twins.min(MAX_HINT);
        hints.dta_members.values_mut().for_each(|n| *n = (*n).min(MAX_HINT));
        hints
    }
}

impl TwinDirectory {
    pub(crate) fn sized(hints: SizeHints) -> Self {
        TwinDirectory {
            twins: Entries(DashMap::with_capacity_and_hasher_and_shard_amount(
                hints.twins,
                FastHash::default(),
                TWIN_SHARDS,
            )),
            types: Entries::default(),
            dtas: Entries::default(),
            quarantine: Entries::default(),
            member_hints: parking_lot::Mutex::new(hints.dta_members),
        }
    }

    /// The record of the directory's sizes now, for the next start (written at a clean stop).
    pub(crate) fn size_hints(&self) -> WriteBatch {
        let hints = SizeHints {
            twins: self.twins.len(),
            dta_members: self.dtas.iter().map(|e| (e.key().to_string(), e.value().members.lock().len())).collect(),
        };
        let mut b = WriteBatch::new();
        b.put(spaces::META, SIZE_HINTS, encode_record(&hints));
        b
    }
}

impl TwinDirectory {
    /// Adds a device type unless one of that id exists; returns it, or `None` if taken.
    pub(crate) fn add_type(
        &self,
        id: DeviceTypeId,
        make: impl FnOnce() -> Arc<TypeContext>,
    ) -> Option<Arc<TypeContext>> {
        match self.types.0.entry(id) {
            Entry::Occupied(_) => None,
            Entry::Vacant(v) => Some(v.insert(make()).clone()),
        }
    }

    /// Puts a restored device type in place.
    pub(crate) fn restore_type(&self, ctx: Arc<TypeContext>) {
        self.types.0.insert(ctx.device_type.clone(), ctx);
    }

    /// Takes back a device type whose creation was not stored.
    pub(crate) fn remove_type(&self, id: &DeviceTypeId) {
        self.types.0.remove(id);
    }

    pub(crate) fn add_dta(&self, id: DtaId, entry: Arc<DtaEntry>) {
        if let Some(n) = self.member_hints.lock().remove(id.as_str()) {
            entry.members.lock().reserve(n);
        }
        self.dtas.0.insert(id, entry);
    }

    pub(crate) fn quarantine(&self, twin: String, reason: String) {
        self.quarantine.0.insert(twin, reason);
    }

    /// Puts a restored twin in place.
    pub(crate) fn restore_twin(&self, slot: Arc<TwinSlot>) {
        self.twins.0.insert(slot.id.clone(), slot);
    }

    /// Reserves `id` for a new twin: false when the id exists or is quarantined.
    pub(crate) fn reserve_twin(&self, slot: &Arc<TwinSlot>) -> bool {
        if self.quarantine.contains_key(slot.id.as_str()) {
            return false;
        }
        match self.twins.0.entry(slot.id.clone()) {
            Entry::Vacant(v) => {
                v.insert(slot.clone());
                true
            }
            Entry::Occupied(_) => false,
        }
    }

    /// Releases a reservation (only that slot, not a twin that took the id since).
    pub(crate) fn release_twin(&self, slot: &Arc<TwinSlot>) {
        self.twins.0.remove_if(&slot.id, |_, v| Arc::ptr_eq(v, slot));
    }

    /// Removes a deleted twin.
    pub(crate) fn remove_twin(&self, id: &TwinId) {
        self.twins.0.remove(id);
    }

    /// Forgets everything (the platform stops).
    pub(crate) fn clear(&self) {
        self.twins.0.clear();
        self.types.0.clear();
        self.dtas.0.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The maps start at the sizes of the last stop: the twins' map holds that many
    /// without growing, and a DTA added with a hint has room for its members.
    #[test]
    fn hints_size_the_twins_map_and_a_dta_members() {
        let hints = SizeHints { twins: 50_000, dta_members: [("hall".to_string(), 7_000)].into() };
        let d = TwinDirectory::sized(hints);
        assert!(d.twins.0.capacity() >= 50_000, "capacity {}", d.twins.0.capacity());
        assert_eq!(d.member_hints.lock().get("hall"), Some(&7_000));
        let unsized_ = TwinDirectory::default();
        assert!(unsized_.twins.0.capacity() < 50_000);
    }
}
