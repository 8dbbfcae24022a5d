//! The one source of time for all twin logic. `SystemClock` reads the wall clock and
//! sleeps on tokio timers; `VirtualClock` only moves when a test calls `advance`, firing
//! every timer that falls due in deadline order, so deadlines, windows and backoffs can
//! be tested without sleeping.

use futures::future::BoxFuture;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, oneshot};
use twinfleet_models::Timestamp;

/// A clock shared by all the actors of a platform.
pub type SharedClock = Arc<dyn Clock>;

pub trait Clock: Send + Sync + Debug + 'static {
    fn now(&self) -> Timestamp;
    /// A future that completes once `now() >= deadline`. It needs a tokio runtime (any
    /// actix arbiter has one) only for the system clock.
    fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<'static, ()>;

    fn sleep(&self, ms: u64) -> BoxFuture<'static, ()> {
        self.sleep_until(self.now() + ms)
    }
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp(chrono::Utc::now().timestamp_millis())
    }

    fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<'static, ()> {
        let ms = deadline.since(self.now());
        Box::pin(tokio::time::sleep(Duration::from_millis(ms)))
    }

    /// Without reading the clock (every request's deadline is one of these).
    fn sleep(&self, ms: u64) -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(Duration::from_millis(ms)))
    }
}

/// A clock that stands still until told to move.
#[derive(Debug)]
pub struct VirtualClock {
    state: Mutex<VirtualState>,
    registered: Notify,
}

#[derive(Debug)]
struct VirtualState {
    now: Timestamp,
    next_id: u64,
    timers: BTreeMap<(Timestamp, u64), oneshot::Sender<()>>,
}

impl VirtualClock {
    pub fn new(start: Timestamp) -> Arc<Self> {
        Arc::new(VirtualClock {
            state: Mutex::new(VirtualState { now: start, next_id: 0, timers: BTreeMap::new() }),
            registered: Notify::new(),
        })
    }

    /// Moves time forward by `ms`, firing due timers one by one at their own deadline.
    pub fn advance(&self, ms: u64) {
        let mut st = self.state.lock();
        let target = st.now + ms;
        while let Some(entry) = st.timers.first_entry() {
            if entry.key().0 > target {
                break;
            }
            let ((at, _), tx) = entry.remove_entry();
            st.now = st.now.max(at);
            let _ = tx.send(());
        }
        st.now = target;
    }

    /// Timers that are registered and still awaited.
    pub fn pending_timers(&self) -> usize {
        self.state.lock().timers.values().filter(|tx| !tx.is_closed()).count()
    }

    /// Waits (without moving time) until at least `n` timers are pending, so that a test
    /// advances the clock only after the actor under test has armed its timer.
    pub async fn wait_for_timers(&self, n: usize) {
        loop {
            let notified = self.registered.notified();
            if self.pending_timers() >= n {
                return;
            }
            notified.await;
        }
    }
}

impl Clock for VirtualClock {
    fn now(&self) -> Timestamp {
        self.state.lock().now
    }

    fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<'static, ()> {
        let mut st = self.state.lock();
        if deadline <= st.now {
            return Box::pin(std::future::ready(()));
        }
        let (tx, rx) = oneshot::channel();
        let id = st.next_id;
        st.next_id += 1;
        st.timers.insert((deadline, id), tx);
        // Timers whose sleeper went away (a request answered before its deadline) are
        // dropped now and then, so that long virtual runs do not accumulate them.
        if st.timers.len() >= 1024 && st.timers.len().is_power_of_two() {
            st.timers.retain(|_, tx| !tx.is_closed());
        }
        drop(st);
        self.registered.notify_waiters();
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn virtual_timers_fire_in_deadline_order_without_sleeping() {
        let clock = VirtualClock::new(Timestamp(1_000));
        let order = Arc::new(Mutex::new(vec![]));
        let mut handles = vec![];
        for ms in [300u64, 100, 200] {
            let c: SharedClock = clock.clone();
            let order = order.clone();
            handles.push(tokio::spawn(async move {
                c.sleep(ms).await;
                order.lock().push((ms, c.now()));
            }));
        }
        clock.wait_for_timers(3).await;
        clock.advance(150);
        assert_eq!(clock.now(), Timestamp(1_150));
        tokio::task::yield_now().await;
        clock.advance(1_000);
        for h in handles {
            h.await.unwrap();
        }
        let fired: Vec<u64> = order.lock().iter().map(|(ms, _)| *ms).collect();
        assert_eq!(fired, vec![100, 200, 300]);
        assert_eq!(clock.pending_timers(), 0);
    }
}
