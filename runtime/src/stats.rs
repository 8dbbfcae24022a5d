//! What the inspection tree shows about each actor: kind, id, parent, mailbox depth,
//! messages handled, restarts, last error and status. The counters are atomics updated by
//! the actor's handle (on enqueue) and by the actor (on dequeue), so reading them never
//! sends a message and works for an actor that is stuck or dead.

use parking_lot::Mutex;
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorStatus {
    Starting,
    Running,
    Restarting,
    /// Given up after too many restarts; needs an operator.
    Failed,
    Stopped,
}

impl ActorStatus {
    /// Every status, in declaration order (`ALL[s as usize] == s`).
    pub const ALL: [ActorStatus; 5] = [
        ActorStatus::Starting,
        ActorStatus::Running,
        ActorStatus::Restarting,
        ActorStatus::Failed,
        ActorStatus::Stopped,
    ];

    /// The name used in JSON and in filters (`running`, `restarting`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ActorStatus::Starting => "starting",
            ActorStatus::Running => "running",
            ActorStatus::Restarting => "restarting",
            ActorStatus::Failed => "failed",
            ActorStatus::Stopped => "stopped",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => ActorStatus::Starting,
            1 => ActorStatus::Running,
            2 => ActorStatus::Restarting,
            3 => ActorStatus::Failed,
            _ => ActorStatus::Stopped,
        }
    }
}

#[derive(Debug)]
pub struct ActorStats {
    pub kind: &'static str,
    pub id: Arc<str>,
    /// The supervisor, as `kind/id`.
    pub parent: Option<Arc<str>>,
    handled: AtomicU64,
    queued: AtomicU32,
    restarts: AtomicU32,
    status: AtomicU8,
    last_error: Mutex<Option<Box<str>>>,
}

/// A point-in-time copy of an actor's statistics.
#[derive(Debug, Clone, Serialize)]
pub struct ActorView {
    pub kind: &'static str,
    pub id: String,
    pub parent: Option<String>,
    pub status: ActorStatus,
    pub mailbox_depth: u32,
    pub messages_handled: u64,
    pub restarts: u32,
    pub last_error: Option<String>,
}

impl ActorStats {
    pub fn new(kind: &'static str, id: Arc<str>, parent: Option<Arc<str>>) -> Self {
        ActorStats {
            kind,
            id,
            parent,
            handled: AtomicU64::new(0),
            queued: AtomicU32::new(0),
            restarts: AtomicU32::new(0),
            status: AtomicU8::new(0),
            last_error: Mutex::new(None),
        }
    }

    /// `kind/id`, the name children use for their parent.
    pub fn path(&self) -> String {
        format!("{}/{}", self.kind, self.id)
    }

    pub fn enqueued(&self) {
        self.queued.fetch_add(1, Relaxed);
    }

    /// A message left the mailbox without being handled (send failed).
    pub fn unqueued(&self) {
        let _ = self.queued.fetch_update(Relaxed, Relaxed, |q| Some(q.saturating_sub(1)));
    }

    pub fn dequeued(&self) {
        self.unqueued();
        self.handled.fetch_add(1, Relaxed);
    }

    pub fn set_status(&self, s: ActorStatus) {
        self.status.store(s as u8, Relaxed);
    }

    pub fn status(&self) -> ActorStatus {
        ActorStatus::from_u8(self.status.load(Relaxed))
    }

    /// A restart: the old mailbox is gone with its messages.
    pub fn restarted(&self) {
        self.restarts.fetch_add(1, Relaxed);
        self.queued.store(0, Relaxed);
    }

    pub fn record_error(&self, e: &str) {
        *self.last_error.lock() = Some(e.into());
    }

    pub fn mailbox_depth(&self) -> u32 {
        self.queued.load(Relaxed)
    }

    pub fn messages_handled(&self) -> u64 {
        self.handled.load(Relaxed)
    }

    pub fn restarts(&self) -> u32 {
        self.restarts.load(Relaxed)
    }

    pub fn view(&self) -> ActorView {
        ActorView {
            kind: self.kind,
            id: self.id.to_string(),
            parent: self.parent.as_deref().map(str::to_string),
            status: self.status(),
            mailbox_depth: self.mailbox_depth(),
            messages_handled: self.messages_handled(),
            restarts: self.restarts(),
            last_error: self.last_error.lock().as_deref().map(str::to_string),
        }
    }
}
