//! How a message counts in its actor's mailbox depth (`ActorStats::queued`, shown in the
//! actor listing and `/metrics`, and the bound of `try_command`): from the moment it is
//! made until its actor takes it, or until it is dropped untaken. actix drops a message
//! untaken when its caller gave up before the actor reached it (a deadline, a dropped
//! future: it skips a message nobody awaits), when the mailbox is closed, or when a
//! `try_send` finds it full. Every message of every actor carries a [`Queued`].

use std::sync::{Arc, Weak};
use twinfleet_runtime::ActorStats;

/// What holds an actor's statistics (a twin's slot, a DTA's entry, a type's context).
pub(crate) trait Counted: Send + Sync {
    fn stats(&self) -> &ActorStats;
}

impl Counted for ActorStats {
    fn stats(&self) -> &ActorStats {
        self
    }
}

/// Counts one message in `owner`'s mailbox depth while it lives untaken. Weak: a
/// message left in a stopped actor's queue must not keep what holds that queue.
pub(crate) struct Queued(Option<Weak<dyn Counted>>);

impl Queued {
    pub(crate) fn new<T: Counted + 'static>(owner: &Arc<T>) -> Self {
        owner.stats().enqueued();
        let owner: Weak<dyn Counted> = Arc::downgrade(owner) as Weak<dyn Counted>;
        Queued(Some(owner))
    }

    /// The actor took it (and counts it handled itself).
    pub(crate) fn taken(mut self) {
        self.0 = None;
    }
}

impl std::fmt::Debug for Queued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Queued")
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        if let Some(owner) = self.0.take().and_then(|w| w.upgrade()) {
            owner.stats().unqueued();
        }
    }
}
