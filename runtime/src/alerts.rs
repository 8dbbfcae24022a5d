//! The internal alert sink: every alert is logged, kept in a bounded in-memory ring for
//! the API, broadcast to subscribers (tests, and later the notifier) and persisted. The
//! monitoring issue adds rules and notifications on top.

use crate::codec::encode_record;
use crate::storage::{Space, Storage, WriteBatch};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tokio::sync::broadcast;
use twinfleet_models::Alert;

const RECENT: usize = 1_000;

#[derive(Debug, Clone)]
pub struct AlertSink {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    storage: Arc<dyn Storage>,
    recent: Mutex<VecDeque<Alert>>,
    tx: broadcast::Sender<Alert>,
    seq: AtomicU64,
}

impl AlertSink {
    pub fn new(storage: Arc<dyn Storage>) -> Self {
        let (tx, _) = broadcast::channel(1024);
        AlertSink {
            inner: Arc::new(Inner { storage, recent: Mutex::new(VecDeque::new()), tx, seq: AtomicU64::new(0) }),
        }
    }

    pub fn raise(&self, alert: Alert) {
        tracing::warn!(kind = ?alert.kind, severity = ?alert.severity, source = %alert.source, "alert: {}", alert.message);
        let seq = self.inner.seq.fetch_add(1, Relaxed);
        let mut key = alert.at.0.to_be_bytes().to_vec();
        key.extend_from_slice(&seq.to_be_bytes());
        let mut b = WriteBatch::new();
        b.put(Space::ALERT, key, encode_record(&alert));
        // Alerts are best effort durable: nobody waits on the flush.
        drop(self.inner.storage.submit(b));
        {
            let mut r = self.inner.recent.lock();
            if r.len() == RECENT {
                r.pop_front();
            }
            r.push_back(alert.clone());
        }
        let _ = self.inner.tx.send(alert);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Alert> {
        self.inner.tx.subscribe()
    }

    pub fn recent(&self) -> Vec<Alert> {
        self.inner.recent.lock().iter().cloned().collect()
    }
}
