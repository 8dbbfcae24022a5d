//! The maps of the crate: twin-keyed, with a fast seeded hasher.

use dashmap::DashMap;

/// The hasher of every twin-keyed map: much faster than SipHash on short ids (SipHash
/// was 13% of creating a million twins) and still seeded per process, so that crafted
/// ids cannot flood one bucket.
pub(crate) type FastHash = foldhash::fast::RandomState;
/// A concurrent directory keyed by ids.
pub(crate) type Directory<K, V> = DashMap<K, V, FastHash>;
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, FastHash>;
pub(crate) type FastSet<K> = std::collections::HashSet<K, FastHash>;
