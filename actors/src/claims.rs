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
}

impl Claims {
    pub fn lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.entry(key.to_string()).or_default().clone()
    }
}
