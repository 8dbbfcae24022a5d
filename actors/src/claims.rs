//! The provisioning processes in flight, in memory (their records are in storage,
//! `spaces::PROVISIONING`; `crate::provisioning` runs them). A leaf: data only.

use dashmap::{DashMap, DashSet};
use std::sync::Arc;

/// A device type's provisioning rules, ready to use for every claim: its declaration
/// (or, none declared, the claim token alone pre-approves), its process, and its
/// allow-list as a set.
#[derive(Debug, Clone)]
pub struct Rules {
    pub spec: twinfleet_models::provisioning::ProvisioningSpec,
    /// No `provisioning` declared: every claim is pre-approved.
    pub open: bool,
    pub process: twinfleet_models::provisioning::ProcessSpec,
    allow: std::collections::HashSet<String>,
}

impl Rules {
    pub fn of(declared: Option<&twinfleet_models::provisioning::ProvisioningSpec>) -> Rules {
        let spec = declared.cloned().unwrap_or_default();
        let process = spec.process.clone().unwrap_or_else(twinfleet_models::provisioning::ProcessSpec::default_process);
        let allow = spec.allow_list.iter().cloned().collect();
        Rules { open: declared.is_none(), spec, process, allow }
    }

    /// The facts of a claim by `serial`.
    pub fn facts(&self, serial: &str) -> twinfleet_models::provisioning::Facts {
        twinfleet_models::provisioning::Facts {
            mode: self.spec.mode,
            pre_registered: self.open || self.allow.contains(serial),
        }
    }
}

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

/// One input's turn at a process (`Claims::turn`). Dropped, it forgets the process's
/// lock if nobody else holds or waits for it, so the map holds only processes in use.
pub(crate) struct Turn<'a> {
    locks: &'a DashMap<String, Arc<tokio::sync::Mutex<()>>>,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        // (Under the shard's lock, as every `turn` takes its clone: a count of 1 means
        // only the map holds it.)
        self.locks.remove_if(&self.key, |_, m| Arc::strong_count(m) == 1);
    }
}

impl Claims {
    /// Waits for the turn at process `key`.
    pub async fn turn(&self, key: &str) -> Turn<'_> {
        let lock = self.locks.entry(key.to_string()).or_default().clone();
        let guard = lock.lock_owned().await;
        Turn { locks: &self.locks, key: key.to_string(), guard: Some(guard) }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_process_lock_is_forgotten_once_nobody_holds_or_waits_for_it() {
        let c = Arc::new(Claims::default());
        let first = c.turn("a").await;
        let (c2, entered) = (c.clone(), Arc::new(std::sync::atomic::AtomicBool::new(false)));
        let e2 = entered.clone();
        let waiter = tokio::spawn(async move {
            let _t = c2.turn("a").await;
            e2.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        tokio::task::yield_now().await;
        assert!(!entered.load(std::sync::atomic::Ordering::SeqCst), "inputs take turns");
        drop(first);
        assert_eq!(c.locks.len(), 1, "kept while someone waits");
        waiter.await.unwrap();
        assert!(entered.load(std::sync::atomic::Ordering::SeqCst));
        assert!(c.locks.is_empty(), "forgotten once unused");
    }
}
