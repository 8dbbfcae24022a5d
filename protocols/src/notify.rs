//! The notification service: delivers the monitoring alerts' changes to the configured
//! sinks (`twinfleet_models::notify`): a log line, an HTTP POST to a webhook signed
//! with HMAC-SHA256 of a shared secret, or a QoS 1 message on an MQTT broker's topic
//! (acknowledged by the broker before the sink moves on). The live SSE stream
//! (`/api/v1/alerts/stream`) is the fourth way out; it reads the same change log.
//!
//! The outbox is the alerts' change log (`twinfleet_actors::alerting`, persisted, the
//! newest `MAX_CHANGES` kept): each sink reads it from its own cursor, stored after each
//! delivery and made durable once per read of up to `READ_CHANGES` changes, so delivery
//! is at least once (a crash repeats at most that many) and in change order (so in order
//! per twin), and resumes after a restart. Each sink runs on a thread of its own: one that is down
//! holds back only itself, never the other sinks or the twins (which only append to the
//! log). A failed delivery is retried with backoff (0.5 s doubling to 60 s); after 5
//! failed attempts the sink is marked failing (`/metrics`) and keeps retrying the same
//! change every 60 s. A webhook must answer 2xx within 5 s; redirects are not followed
//! (a 3xx is a failure). A sink further behind than the log keeps loses the older
//! changes, counted as dropped. A change that an active silence matches when its turn
//! comes is not sent (counted as silenced); it is not sent later either.

use hmac::{Hmac, Mac};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use twinfleet_actors::TwinRuntime;
use twinfleet_actors::alerting::SinkStats;
use twinfleet_models::RuleAlert;
use twinfleet_models::notify::{SinkKind, SinkSpec};

/// Attempts before a sink is marked failing.
const FAILING_AFTER: u32 = 5;
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);
/// Changes a sink reads from the log at once (and at most delivers again after a crash).
const READ_CHANGES: usize = 100;
/// How often an idle sink looks at the log.
const IDLE_POLL: Duration = Duration::from_millis(100);

/// The running sinks.
#[derive(Debug)]
pub struct Notifier {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// HMAC-SHA256 of `body` with `secret`, as the `X-Twinfleet-Signature` header carries it.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    format!("sha256={}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

impl Notifier {
    /// Starts one thread per sink (checked: `notify::validate_sinks`).
    pub fn start(rt: TwinRuntime, sinks: Vec<SinkSpec>) -> Result<Notifier, String> {
        twinfleet_models::notify::validate_sinks(&sinks)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for spec in sinks {
            let (rt, stop) = (rt.clone(), stop.clone());
            let t = std::thread::Builder::new()
                .name(format!("notify-{}", spec.name))
                .spawn(move || run(rt, spec, stop))
                .map_err(|e| format!("cannot start a notification thread: {e}"))?;
            threads.push(t);
        }
        Ok(Notifier { stop, threads })
    }

    /// Stops every sink (a delivery in flight finishes or times out first).
    pub fn stop(self) {
        self.stop.store(true, Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Sleeps `d` unless stopped meanwhile; whether it is stopped.
pub(crate) fn pause(stop: &AtomicBool, d: Duration) -> bool {
    let until = std::time::Instant::now() + d;
    while std::time::Instant::now() < until {
        if stop.load(Relaxed) {
            return true;
        }
        std::thread::sleep(IDLE_POLL.min(until - std::time::Instant::now()));
    }
    stop.load(Relaxed)
}

/// How a sink reaches its destination.
struct Out {
    agent: ureq::Agent,
    mqtt: crate::mqtt::publisher::Reconnecting,
}

fn run(rt: TwinRuntime, spec: SinkSpec, stop: Arc<AtomicBool>) {
    let book = rt.alert_book();
    let stats = book.sink_stats(&spec.name);
    let mut out = Out {
        agent: ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(WEBHOOK_TIMEOUT))
            .max_redirects(0)
            .build()
            .into(),
        mqtt: Default::default(),
    };
    // A new sink starts from now (it does not replay history).
    let mut cursor = match book.sink_cursor(&spec.name) {
        Ok(Some(c)) => c,
        Ok(None) => {
            let now = book.revision();
            let _ = futures::executor::block_on(book.set_sink_cursor(&spec.name, now));
            now
        }
        Err(e) => {
            tracing::error!(sink = spec.name, "the notification sink cannot read its cursor: {e}");
            return;
        }
    };
    while !stop.load(Relaxed) {
        let (changes, lost) = match book.changes_after(cursor, READ_CHANGES) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(sink = spec.name, "the alert change log cannot be read: {e}");
                if pause(&stop, Duration::from_secs(1)) {
                    return;
                }
                continue;
            }
        };
        if lost && let Some((first, _)) = changes.first() {
            let n = first - cursor - 1;
            stats.dropped.fetch_add(n, Relaxed);
            tracing::warn!(sink = spec.name, "{n} alert changes were older than the change log keeps: not delivered");
        }
        if changes.is_empty() {
            if pause(&stop, IDLE_POLL) {
                return;
            }
            continue;
        }
        // The cursor is stored after each change taken, and waited for (durable) once
        // per read of the log: a crash delivers at most that read's changes again
        // (`READ_CHANGES`), and the sink does not wait for a disk flush per change.
        let mut stored = None;
        for (rev, alert) in changes {
            if spec.wants(&alert) {
                if book.silenced(&alert, rt.clock().now()) {
                    stats.silenced.fetch_add(1, Relaxed);
                } else if !deliver_with_retries(&mut out, &spec, rev, &alert, &stats, &stop) {
                    // Stopped: what was delivered is recorded before the thread ends.
                    if let Some(t) = stored.take() {
                        let _ = futures::executor::block_on(t);
                    }
                    return;
                }
            }
            cursor = rev;
            stored = Some(book.set_sink_cursor(&spec.name, cursor));
        }
        if let Some(t) = stored
            && let Err(e) = futures::executor::block_on(t)
        {
            tracing::warn!(sink = spec.name, "the sink's cursor was not stored: {e}");
        }
    }
}

/// Delivers one change until it is taken; `false` if stopped first.
fn deliver_with_retries(
    out: &mut Out,
    spec: &SinkSpec,
    rev: u64,
    alert: &RuleAlert,
    stats: &SinkStats,
    stop: &AtomicBool,
) -> bool {
    let done =
        retry("notification sink", &spec.name, stop, &stats.failed, &stats.failing, || deliver(out, spec, rev, alert));
    if done {
        stats.delivered.fetch_add(1, Relaxed);
    }
    done
}

/// Runs `attempt` until it succeeds, with backoff (0.5 s doubling to 60 s); counts each
/// failure in `failed` and sets `failing` after [`FAILING_AFTER`] of them (cleared on
/// success). `false` if stopped first. Shared by the notification sinks and the exports.
pub(crate) fn retry(
    what: &str,
    name: &str,
    stop: &AtomicBool,
    failed: &AtomicU64,
    failing: &AtomicBool,
    mut attempt: impl FnMut() -> Result<(), String>,
) -> bool {
    let mut attempts = 0u32;
    let mut backoff = Duration::from_millis(500);
    loop {
        match attempt() {
            Ok(()) => {
                failing.store(false, Relaxed);
                return true;
            }
            Err(why) => {
                attempts += 1;
                failed.fetch_add(1, Relaxed);
                if attempts == FAILING_AFTER {
                    failing.store(true, Relaxed);
                    tracing::error!(name, "{what} failing after {attempts} attempts: {why}");
                } else if attempts < FAILING_AFTER {
                    tracing::warn!(name, attempt = attempts, "{what}: not delivered: {why}; retried in {backoff:?}");
                }
                if pause(stop, backoff) {
                    return false;
                }
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

fn deliver(out: &mut Out, spec: &SinkSpec, rev: u64, alert: &RuleAlert) -> Result<(), String> {
    match spec.kind {
        SinkKind::Log => {
            tracing::warn!(
                sink = spec.name,
                twin = alert.twin,
                rule = alert.rule,
                severity = ?alert.severity,
                state = ?alert.state,
                "alert: {}",
                alert.message
            );
            Ok(())
        }
        SinkKind::Webhook => {
            let body = serde_json::to_vec(&serde_json::json!({"revision": rev, "alert": alert})).unwrap_or_default();
            let mut req = out
                .agent
                .post(&spec.url)
                .header("content-type", "application/json")
                .header("x-twinfleet-revision", &rev.to_string());
            if !spec.secret.is_empty() {
                req = req.header("x-twinfleet-signature", &signature(&spec.secret, &body));
            }
            match req.send(&body[..]) {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("{} answered {}", spec.url, r.status())),
                Err(e) => Err(format!("{}: {e}", spec.url)),
            }
        }
        SinkKind::Mqtt => {
            let body = serde_json::to_vec(&serde_json::json!({"revision": rev, "alert": alert})).unwrap_or_default();
            let client_id = format!("twinfleet-notify-{}", spec.name);
            out.mqtt.publish_all(
                &client_id,
                &spec.url,
                &spec.username,
                &spec.password,
                vec![(spec.topic_for(alert), body)],
            )
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_signature_is_hmac_sha256_in_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            super::signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
