//! Counted rejections of bad input. Every edge that refuses something (a malformed
//! payload, wrong credentials, an unknown device, a full mailbox) counts it here by
//! reason, so that /metrics can show it, and logs it at most once per second per reason
//! with the number suppressed since, so that a flood of bad input cannot flood the log.

use dashmap::DashMap;
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

const LOG_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Reason {
    count: AtomicU64,
    /// When this reason was last logged, and how many were not logged since.
    log: Mutex<(Option<Instant>, u64)>,
}

/// Shared by all edges of a platform. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Rejections {
    reasons: Arc<DashMap<&'static str, Reason>>,
}

impl Rejections {
    /// Counts one rejection; logs it unless this reason was logged less than a second ago.
    /// Returns whether it logged.
    pub fn reject(&self, reason: &'static str, detail: impl FnOnce() -> String) -> bool {
        let entry = self.reasons.entry(reason).or_default();
        entry.count.fetch_add(1, Relaxed);
        let mut log = entry.log.lock();
        let now = Instant::now();
        if log.0.is_none_or(|t| now.duration_since(t) >= LOG_EVERY) {
            let suppressed = std::mem::take(&mut log.1);
            log.0 = Some(now);
            let detail = detail();
            tracing::warn!(reason, suppressed, "rejected: {detail}");
            true
        } else {
            log.1 += 1;
            false
        }
    }

    pub fn count(&self, reason: &str) -> u64 {
        self.reasons.get(reason).map(|r| r.count.load(Relaxed)).unwrap_or(0)
    }

    /// Every reason with its count, sorted by reason.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let mut v: Vec<(&'static str, u64)> = self.reasons.iter().map(|e| (*e.key(), e.count.load(Relaxed))).collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_every_rejection_and_logs_few() {
        let r = Rejections::default();
        let logged = (0..1000).filter(|_| r.reject("bad_token", || "device x".into())).count();
        assert_eq!(r.count("bad_token"), 1000);
        assert_eq!(logged, 1, "one log line per second per reason");
        assert_eq!(r.snapshot(), vec![("bad_token", 1000)]);
    }
}
