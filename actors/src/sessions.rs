//! The open device sessions of every gateway (MQTT connections, gRPC streams), so that
//! a credential change takes effect everywhere at once: revoking or re-issuing a
//! device's token, archiving its twin or deleting it ends each of that device's open
//! sessions, on every gateway, before the call that changed it returns.
//!
//! A gateway opens a [`Session`] once it has authenticated a device and holds it for as
//! long as the connection or stream lives; it waits on [`Session::closed`] beside its
//! work and ends the connection when that resolves. Dropping the session unregisters it.
//!
//! A gateway that keeps accounts of its own (an external broker's, see
//! `twinfleet_protocols::mqtt::accounts`) [`watch`](DeviceSessions::watch)es the
//! [`CredentialChange`]s instead: every token issued, and every end of a holder's
//! credentials, in the order they happened.

use dashmap::DashMap;
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tokio::sync::{mpsc, watch};

/// The holder under which sessions authenticated with device type `ty`'s claim token
/// are registered (a `/` is in no device id).
pub fn claim_holder(ty: &str) -> String {
    format!("claim/{ty}")
}

/// Tells one session why it ends.
type Closer = watch::Sender<Option<&'static str>>;

/// A change of a holder's credentials. The holder is a device id, or
/// [`claim_holder`]`(type)` for a device type's claim token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialChange {
    /// A new token (the only moment the plain token exists outside the device).
    Issued { holder: String, token: String },
    /// The holder's credentials ended: revoked, replaced (an `Issued` follows), its
    /// twin archived or deleted.
    Ended { holder: String, reason: &'static str },
}

/// Every open device session, by device id.
#[derive(Debug, Default)]
pub struct DeviceSessions {
    next: AtomicU64,
    open: DashMap<String, Vec<(u64, Closer)>>,
    watchers: Mutex<Vec<mpsc::UnboundedSender<CredentialChange>>>,
}

impl DeviceSessions {
    /// Every credential change from now on, in order (until the receiver is dropped).
    pub fn watch(&self) -> mpsc::UnboundedReceiver<CredentialChange> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.watchers.lock().push(tx);
        rx
    }

    fn announce(&self, change: CredentialChange) {
        let mut watchers = self.watchers.lock();
        watchers.retain(|w| w.send(change.clone()).is_ok());
    }

    /// Tells the watchers that `holder` has a new `token`.
    pub(crate) fn issued(&self, holder: &str, token: &str) {
        self.announce(CredentialChange::Issued { holder: holder.to_string(), token: token.to_string() });
    }

    /// Registers a session of `device`, open until it is dropped or closed.
    pub fn open(self: &Arc<Self>, device: &str) -> Session {
        let id = self.next.fetch_add(1, Relaxed);
        let (tx, rx) = watch::channel(None);
        self.open.entry(device.to_string()).or_default().push((id, tx));
        Session { registry: self.clone(), device: device.to_string(), id, closed: rx }
    }

    /// Ends every open session of `device` with `reason` (e.g. "token revoked") and
    /// tells the watchers; returns how many sessions there were.
    pub fn close(&self, device: &str, reason: &'static str) -> usize {
        self.announce(CredentialChange::Ended { holder: device.to_string(), reason });
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

    #[test]
    fn watchers_hear_every_change_in_order_and_dropped_ones_are_forgotten() {
        let reg = DeviceSessions::default();
        let mut w = reg.watch();
        drop(reg.watch());
        reg.close("a", "token re-issued");
        reg.issued("a", "tfd_x");
        assert_eq!(w.try_recv().unwrap(), CredentialChange::Ended { holder: "a".into(), reason: "token re-issued" });
        assert_eq!(w.try_recv().unwrap(), CredentialChange::Issued { holder: "a".into(), token: "tfd_x".into() });
        assert!(w.try_recv().is_err());
        assert_eq!(reg.watchers.lock().len(), 1);
    }
}
