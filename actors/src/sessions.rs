//! The open device sessions of every gateway (MQTT connections, gRPC streams), so that
//! a credential change takes effect everywhere at once: revoking or re-issuing a
//! device's token, archiving its twin or deleting it ends each of that device's open
//! sessions, on every gateway, before the call that changed it returns.
//!
//! A gateway opens a [`Session`] once it has authenticated a device and holds it for as
//! long as the connection or stream lives; it waits on [`Session::closed`] beside its
//! work and ends the connection when that resolves. Dropping the session unregisters it.

use dashmap::DashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tokio::sync::watch;

/// The holder under which sessions authenticated with device type `ty`'s claim token
/// are registered (a `/` is in no device id).
pub fn claim_holder(ty: &str) -> String {
    format!("claim/{ty}")
}

/// Tells one session why it ends.
type Closer = watch::Sender<Option<&'static str>>;

/// Every open device session, by device id.
#[derive(Debug, Default)]
pub struct DeviceSessions {
    next: AtomicU64,
    open: DashMap<String, Vec<(u64, Closer)>>,
}

impl DeviceSessions {
    /// Registers a session of `device`, open until it is dropped or closed.
    pub fn open(self: &Arc<Self>, device: &str) -> Session {
        let id = self.next.fetch_add(1, Relaxed);
        let (tx, rx) = watch::channel(None);
        self.open.entry(device.to_string()).or_default().push((id, tx));
        Session { registry: self.clone(), device: device.to_string(), id, closed: rx }
    }

    /// Ends every open session of `device` with `reason` (e.g. "token revoked");
    /// returns how many there were.
    pub fn close(&self, device: &str, reason: &'static str) -> usize {
        match self.open.remove(device) {
            Some((_, sessions)) => {
                for (_, tx) in &sessions {
                    tx.send_replace(Some(reason));
                }
                if !sessions.is_empty() {
                    tracing::info!(device, reason, sessions = sessions.len(), "closing the device's open sessions");
                }
                sessions.len()
            }
            None => 0,
        }
    }

    /// Open sessions of `device`.
    pub fn count(&self, device: &str) -> usize {
        self.open.get(device).map_or(0, |v| v.len())
    }

    /// Open sessions of all devices.
    pub fn total(&self) -> usize {
        self.open.iter().map(|e| e.value().len()).sum()
    }
}

/// One open session of a device.
#[derive(Debug)]
pub struct Session {
    registry: Arc<DeviceSessions>,
    device: String,
    id: u64,
    closed: watch::Receiver<Option<&'static str>>,
}

impl Session {
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Resolves with the reason once the platform ends this session.
    pub async fn closed(&self) -> &'static str {
        let mut rx = self.closed.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(r) => r.unwrap_or("closed"),
            // The registry never drops the sender of a live session except on close.
            Err(_) => "closed",
        }
    }

    /// Whether the platform has ended this session.
    pub fn is_closed(&self) -> bool {
        self.closed.borrow().is_some()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let dashmap::Entry::Occupied(mut e) = self.registry.open.entry(self.device.clone()) {
            e.get_mut().retain(|(id, _)| *id != self.id);
            if e.get().is_empty() {
                e.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn closing_a_device_ends_all_of_its_sessions_and_no_other() {
        let reg = Arc::new(DeviceSessions::default());
        let (a1, a2, b) = (reg.open("a"), reg.open("a"), reg.open("b"));
        assert_eq!((reg.count("a"), reg.total()), (2, 3));
        assert_eq!(reg.close("a", "token revoked"), 2);
        assert_eq!(a1.closed().await, "token revoked");
        assert!(a2.is_closed() && !b.is_closed());
        drop((a1, a2));
        assert_eq!(reg.total(), 1);
        drop(b);
        assert_eq!(reg.total(), 0);
        assert_eq!(reg.close("a", "again"), 0);
    }
}
