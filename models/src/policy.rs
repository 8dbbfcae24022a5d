//! Supervision and watchdog policies as pure state machines: how long to back off, when
//! to give up restarting a twin, when a wait that ran past its deadline is retried and
//! when it becomes an alert. The actors own the timers; these types only decide.

use crate::alert::{AlertKind, Severity};
use crate::effect::{Decision, Effect, WaitName};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Exponential backoff without jitter, so that runs on the virtual clock are repeatable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backoff {
    pub initial_ms: u64,
    pub factor: u32,
    pub max_ms: u64,
}

impl Backoff {
    /// The delay before attempt `n` (0-based): `initial * factor^n`, capped at `max`.
    pub fn delay_ms(&self, n: u32) -> u64 {
        let mut d = self.initial_ms;
        for _ in 0..n {
            d = d.saturating_mul(self.factor as u64);
            if d >= self.max_ms {
                return self.max_ms;
            }
        }
        d.min(self.max_ms)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial_ms: 100, factor: 2, max_ms: 10_000 }
    }
}

/// How a supervisor treats a failing child: restart with backoff, and after
/// `max_restarts` failures within `window_ms` stop trying and mark it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    pub max_restarts: u32,
    pub window_ms: u64,
    pub backoff: Backoff,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy { max_restarts: 5, window_ms: 60_000, backoff: Backoff::default() }
    }
}

/// What happened to one supervised child, journaled into its [`RestartTracker`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestartEvent {
    /// The child failed at `at`; failures before `forget_before` leave the window.
    Failed { at: Timestamp, forget_before: Timestamp },
    /// Too many failures in the window: the supervisor no longer restarts the child.
    GaveUp { at: Timestamp },
}

/// The failure history of one child, kept by its supervisor: a state machine of the
/// `decide`/`evolve` shape. A failure decides either a restart (an
/// [`Effect::ArmWait`] of [`WaitName::Restart`] whose deadline is the backoff; the
/// supervisor restarts the child when it expires) or, past `max_restarts` within the
/// window, giving up (a [`RestartEvent::GaveUp`] and an [`Effect::RaiseAlert`]).
/// A child given up on decides nothing more.
#[derive(Debug, Clone, Default)]
pub struct RestartTracker {
    failures: VecDeque<Timestamp>,
    given_up: bool,
}

impl RestartTracker {
    /// What the supervisor does about a failure of the child at `now` (`error` names it).
    pub fn decide(&self, policy: &RestartPolicy, now: Timestamp, error: &str) -> Decision<RestartEvent> {
        if self.given_up {
            return Decision::default();
        }
        let forget_before = Timestamp(now.0.saturating_sub(policy.window_ms as i64));
        let n = self.failures.iter().filter(|t| **t >= forget_before).count() as u32 + 1;
        let failed = RestartEvent::Failed { at: now, forget_before };
        if n > policy.max_restarts {
            Decision {
                events: vec![failed, RestartEvent::GaveUp { at: now }],
                effects: vec![Effect::RaiseAlert {
                    kind: AlertKind::ActorFailed,
                    severity: Severity::Critical,
                    message: format!("{n} failures within {} ms; last: {error}", policy.window_ms),
                }],
            }
        } else {
            let deadline = now.plus_millis(policy.backoff.delay_ms(n - 1));
            Decision {
                events: vec![failed],
                effects: vec![Effect::ArmWait { wait: WaitName::Restart, attempt: n, deadline }],
            }
        }
    }

    pub fn evolve(&mut self, event: &RestartEvent) {
        match event {
            RestartEvent::Failed { at, forget_before } => {
                while self.failures.front().is_some_and(|t| t < forget_before) {
                    self.failures.pop_front();
                }
                self.failures.push_back(*at);
            }
            RestartEvent::GaveUp { .. } => self.given_up = true,
        }
    }

    /// Decides and applies a failure in one step, for a supervisor that journals nothing.
    pub fn on_failure(&mut self, policy: &RestartPolicy, now: Timestamp, error: &str) -> Vec<Effect> {
        let Decision { events, effects } = self.decide(policy, now, error);
        events.iter().for_each(|e| self.evolve(e));
        effects
    }

    pub fn failures_in_window(&self) -> usize {
        self.failures.len()
    }

    pub fn given_up(&self) -> bool {
        self.given_up
    }
}

/// The deadline of an asynchronous wait a twin owns (a device reply, an approval, a
/// provisioning step), and what to do when it passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// How long one attempt may wait.
    pub deadline_ms: u64,
    /// Retries after the first attempt before the wait becomes an alert.
    pub max_retries: u32,
    /// Extra delay before each retry.
    pub backoff: Backoff,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            deadline_ms: 30_000,
            max_retries: 3,
            backoff: Backoff { initial_ms: 1_000, factor: 2, max_ms: 60_000 },
        }
    }
}

/// What the owner of an expired wait does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitDecision {
    /// Try again (attempt `attempt`, 1-based retries) and wait until `deadline`.
    Retry { attempt: u32, deadline: Timestamp },
    /// Retries are used up: raise an alert.
    Alert { attempts: u32 },
}

impl RetryPolicy {
    /// The first deadline of a wait that starts at `now`.
    pub fn first_deadline(&self, now: Timestamp) -> Timestamp {
        now + self.deadline_ms
    }

    /// Decides what happens when attempt `attempts_so_far` (0 = the original) expired at `now`.
    pub fn on_expiry(&self, attempts_so_far: u32, now: Timestamp) -> WaitDecision {
        if attempts_so_far >= self.max_retries {
            WaitDecision::Alert { attempts: attempts_so_far + 1 }
        } else {
            let delay = self.backoff.delay_ms(attempts_so_far);
            WaitDecision::Retry { attempt: attempts_so_far + 1, deadline: now + delay + self.deadline_ms }
        }
    }
}

/// A rate: `per_sec` on average, up to `burst` at once (a token bucket).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RateLimit {
    pub per_sec: f64,
    pub burst: f64,
}

/// The tokens of one [`RateLimit`]ed key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    tokens: f64,
    last: Timestamp,
}

impl Bucket {
    /// A bucket that starts full at `now`.
    pub fn full(limit: &RateLimit, now: Timestamp) -> Bucket {
        Bucket { tokens: limit.burst, last: now }
    }

    /// Takes one token at `now`, or says in how many ms the next one comes.
    pub fn take(&mut self, limit: &RateLimit, now: Timestamp) -> Result<(), u64> {
        let elapsed = now.0.saturating_sub(self.last.0).max(0) as f64 / 1e3;
        self.tokens = (self.tokens + elapsed * limit.per_sec).min(limit.burst);
        self.last = Timestamp(now.0.max(self.last.0));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else if limit.per_sec <= 0.0 {
            Err(u64::MAX)
        } else {
            Err((((1.0 - self.tokens) / limit.per_sec) * 1e3).ceil() as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let l = RateLimit { per_sec: 10.0, burst: 3.0 };
        let mut b = Bucket::full(&l, Timestamp(0));
        assert!((0..3).all(|_| b.take(&l, Timestamp(0)).is_ok()));
        assert_eq!(b.take(&l, Timestamp(0)), Err(100));
        assert_eq!(b.take(&l, Timestamp(100)), Ok(()));
        assert!(b.take(&l, Timestamp(150)).is_err());
        // Idle long: back to the burst, not more.
        assert!((0..3).all(|_| b.take(&l, Timestamp(60_000)).is_ok()));
        assert!(b.take(&l, Timestamp(60_000)).is_err());
    }

    #[test]
    fn backoff_grows_and_caps() {
        let b = Backoff { initial_ms: 100, factor: 2, max_ms: 1000 };
        let delays: Vec<u64> = (0..6).map(|n| b.delay_ms(n)).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
    }

    fn arm(attempt: u32, deadline: i64) -> Vec<Effect> {
        vec![Effect::ArmWait { wait: WaitName::Restart, attempt, deadline: Timestamp(deadline) }]
    }

    #[test]
    fn restarts_give_up_after_max_in_window_and_forget_old_failures() {
        let p = RestartPolicy { max_restarts: 2, window_ms: 1_000, backoff: Backoff::default() };
        let mut t = RestartTracker::default();
        assert_eq!(t.on_failure(&p, Timestamp(0), "boom"), arm(1, 100));
        assert_eq!(t.on_failure(&p, Timestamp(10), "boom"), arm(2, 210));
        let d = t.decide(&p, Timestamp(20), "boom");
        assert_eq!(d.events.last(), Some(&RestartEvent::GaveUp { at: Timestamp(20) }));
        assert!(matches!(&d.effects[..], [Effect::RaiseAlert { kind: AlertKind::ActorFailed, message, .. }]
            if message == "3 failures within 1000 ms; last: boom"));
        d.events.iter().for_each(|e| t.evolve(e));
        assert!(t.given_up());
        // A child given up on decides nothing more.
        assert_eq!(t.decide(&p, Timestamp(30), "boom"), Decision::default());
        // Far later the window is empty again.
        let mut t = RestartTracker::default();
        t.on_failure(&p, Timestamp(0), "boom");
        t.on_failure(&p, Timestamp(10), "boom");
        assert_eq!(t.on_failure(&p, Timestamp(5_000), "boom"), arm(1, 5_100));
        assert_eq!(t.failures_in_window(), 1);
    }

    #[test]
    fn deciding_alone_changes_nothing() {
        let p = RestartPolicy { max_restarts: 1, window_ms: 1_000, backoff: Backoff::default() };
        let t = RestartTracker::default();
        let first = t.decide(&p, Timestamp(0), "x");
        assert_eq!(t.decide(&p, Timestamp(0), "x"), first);
        assert_eq!(t.failures_in_window(), 0);
    }

    #[test]
    fn waits_retry_then_alert() {
        let p = RetryPolicy {
            deadline_ms: 1_000,
            max_retries: 2,
            backoff: Backoff { initial_ms: 500, factor: 2, max_ms: 10_000 },
        };
        let start = Timestamp(0);
        let d0 = p.first_deadline(start);
        assert_eq!(d0, Timestamp(1_000));
        assert_eq!(p.on_expiry(0, d0), WaitDecision::Retry { attempt: 1, deadline: Timestamp(2_500) });
        assert_eq!(p.on_expiry(1, Timestamp(2_500)), WaitDecision::Retry { attempt: 2, deadline: Timestamp(4_500) });
        assert_eq!(p.on_expiry(2, Timestamp(4_500)), WaitDecision::Alert { attempts: 3 });
    }
}
