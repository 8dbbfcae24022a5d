//! The provisioning processes in flight, in memory (their records are in storage,
//! `spaces::PROVISIONING`; `crate::provisioning` runs them). A leaf: data only.

use dashmap::{DashMap, DashSet};
use std::sync::Arc;

/// The key of one device's process: its type and serial.
pub(crate) fn claim_key(ty: &str, serial: &str) -> String {
    format!("{ty}\0{serial}")
}

#[derive(Debug, Default)]
pub(crate) struct Claims {
    /// One lock per process: inputs to one device's process take turns.
    pub locks: DashMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// Twin id → claim key, for processes that wait for the device to confirm on its
    /// operational gateway (the gateways' authentication looks here).
    pub awaiting_confirmation: DashMap<String, String>,
    /// Claim keys of processes that wait for a human.
    pub pending: DashSet<String>,
    /// Claim rate buckets: `cred/<type>` and `src/<address>`.
    pub rates: DashMap<String, twinfleet_models::Bucket>,
}

/// Buckets kept at most; past it the idle ones are forgotten (a flood of sources cannot
/// grow the map without bound).
const MAX_BUCKETS: usize = 100_000;

impl Claims {
    pub fn lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.entry(key.to_string()).or_default().clone()
    }

    /// Takes a token of `key`'s bucket, or says in how many ms one comes.
    pub fn admit(
        &self,
        key: String,
        limit: &twinfleet_models::RateLimit,
        now: twinfleet_models::Timestamp,
    ) -> Result<(), u64> {
        if self.rates.len() >= MAX_BUCKETS {
            self.rates.clear();
        }
        self.rates.entry(key).or_insert_with(|| twinfleet_models::Bucket::full(limit, now)).take(limit, now)
    }
}
