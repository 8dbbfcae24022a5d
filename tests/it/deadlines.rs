//! The desired-state watchdog on the virtual clock: a deadline fires a retry with
//! backoff, then an alert, with no real sleeping; reaching the desired state disarms it.

use crate::support::*;
use serde_json::json;
use std::sync::Arc;
use tokio::sync::mpsc;
use twinfleet::models::{AlertKind, Backoff, EventKind, RetryPolicy, TwinId};
use twinfleet::{DeviceCommand, DeviceLink};

/// A device transport that records the desired states twins send: (twin, attempt,
/// command id).
#[derive(Debug)]
struct Recorder(mpsc::UnboundedSender<(TwinId, u32, u64)>);

impl DeviceLink for Recorder {
    fn deliver(
        &self,
        twin: &TwinId,
        _: &twinfleet::models::Metadata,
        id: twinfleet::models::CommandId,
        cmd: DeviceCommand,
    ) -> Result<(), String> {
        let DeviceCommand::ApplyDesired { attempt, .. } = cmd else { return Ok(()) };
        self.0.send((twin.clone(), attempt, id.0)).map_err(|e| e.to_string())
    }
}

/// The attempts of the journal's `wait_retried` events, in order.
fn retries(events: &[twinfleet::models::TwinEvent]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::WaitRetried { attempt, .. } => Some(*attempt),
            _ => None,
        })
        .collect()
}

/// Test settings with a short desired-state policy: 1 s per attempt, 2 retries after
/// 500 ms and 1,000 ms of backoff.
fn short_sync() -> twinfleet::Settings {
    let mut settings = test_settings();
    settings.desired_sync = RetryPolicy {
        deadline_ms: 1_000,
        max_retries: 2,
        backoff: Backoff { initial_ms: 500, factor: 2, max_ms: 10_000 },
    };
    settings
}

#[actix_rt::test]
async fn a_deadline_fires_a_retry_and_then_an_alert_on_virtual_time() {
    let dir = tempfile::tempdir().unwrap();
    let clock = virtual_clock();
    let p = start(dir.path(), Some(clock.clone()), short_sync()).await;
    fleet(&p, "valve", json!({}), "v", 2, |_| vec![]).await;
    let (tx, mut sent) = mpsc::unbounded_channel();
    p.attach_device_link("test", Arc::new(Recorder(tx)));
    let mut alerts = p.alerts().subscribe();

    let twin = p.twin("v-0").unwrap();
    twin.set_desired(obj(json!({"open": true}))).await.unwrap();
    let (twin_id, attempt, first) = sent.recv().await.unwrap();
    assert_eq!((twin_id, attempt), (tid("v-0"), 0));
    let start = twinfleet::Clock::now(&*clock);

    clock.advance(999);
    assert!(sent.try_recv().is_err(), "nothing before the deadline");
    clock.advance(1); // deadline 1: retry 1, next deadline after 500 ms backoff + 1000 ms
    assert_eq!(sent.recv().await.unwrap(), (tid("v-0"), 1, first), "a retry re-sends the same command");
    clock.wait_for_timers(1).await;
    assert_eq!(twin.get().await.unwrap().desired_sync.unwrap().deadline, start + 2_500);

    clock.advance(1_500); // deadline 2: retry 2, backoff 1000 ms + 1000 ms
    assert_eq!(sent.recv().await.unwrap(), (tid("v-0"), 2, first));
    clock.wait_for_timers(1).await;
    clock.advance(2_000); // deadline 3: retries used up
    let alert = alerts.recv().await.unwrap();
    assert_eq!((alert.kind, alert.source.as_str()), (AlertKind::DeadlineExceeded, "dti/v-0"));
    assert!(alert.message.contains("after 3 attempts"), "{}", alert.message);

    let events = twin.events(20).await.unwrap();
    assert_eq!(retries(&events), vec![1, 2]);
    assert!(events.iter().any(|e| matches!(e.kind, EventKind::AlertRaised { .. })));
    assert!(sent.try_recv().is_err(), "no retry after the alert");
    p.shutdown().await;
}

#[actix_rt::test]
async fn reaching_the_desired_state_disarms_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let clock = virtual_clock();
    let p = start(dir.path(), Some(clock.clone()), test_settings()).await;
    fleet(&p, "valve", json!({}), "w", 1, |_| vec![]).await;
    let (tx, mut sent) = mpsc::unbounded_channel();
    p.attach_device_link("test", Arc::new(Recorder(tx)));
    let mut alerts = p.alerts().subscribe();
    let twin = p.twin("w-0").unwrap();
    twin.set_desired(obj(json!({"open": true}))).await.unwrap();
    assert_eq!(sent.recv().await.unwrap().1, 0);
    twin.report(obj(json!({"open": true, "pressure": 2.1}))).await.unwrap();
    let view = twin.get().await.unwrap();
    assert!(view.in_sync && view.desired_sync.is_none());
    assert_eq!(clock.pending_timers(), 0);
    clock.advance(24 * 3_600_000);
    assert!(sent.try_recv().is_err());
    assert!(alerts.try_recv().is_err());
    p.shutdown().await;
}

#[actix_rt::test]
async fn a_pending_wait_survives_a_restart_and_still_retries_then_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let clock = virtual_clock();
    let settings = short_sync();
    let p = start(dir.path(), Some(clock.clone()), settings.clone()).await;
    fleet(&p, "valve", json!({}), "r", 1, |_| vec![]).await;
    let (tx, mut sent) = mpsc::unbounded_channel();
    p.attach_device_link("test", Arc::new(Recorder(tx)));
    let start_at = twinfleet::Clock::now(&*clock);
    p.twin("r-0").unwrap().set_desired(obj(json!({"open": true}))).await.unwrap();
    let (_, attempt, id) = sent.recv().await.unwrap();
    assert_eq!(attempt, 0);
    clock.advance(1_000); // retry 1, next deadline at +2,500
    assert_eq!(sent.recv().await.unwrap(), (tid("r-0"), 1, id));
    clock.wait_for_timers(1).await;
    p.shutdown().await;

    // The wait is in the stored state: the new incarnation re-arms it.
    let p = start(dir.path(), Some(clock.clone()), settings).await;
    let (tx, mut sent) = mpsc::unbounded_channel();
    p.attach_device_link("test", Arc::new(Recorder(tx)));
    let mut alerts = p.alerts().subscribe();
    let twin = p.twin("r-0").unwrap();
    let view = twin.get().await.unwrap();
    let wait = view.desired_sync.expect("the wait came back with the twin");
    assert_eq!((wait.attempt, wait.deadline), (1, start_at + 2_500));
    clock.wait_for_timers(1).await;
    assert!(sent.try_recv().is_err(), "nothing is sent before the stored deadline");
    clock.advance(1_500); // retry 2: the same command, by its stored id
    assert_eq!(sent.recv().await.unwrap(), (tid("r-0"), 2, id));
    clock.wait_for_timers(1).await;
    clock.advance(2_000); // retries used up
    let alert = alerts.recv().await.unwrap();
    assert_eq!((alert.kind, alert.source.as_str()), (AlertKind::DeadlineExceeded, "dti/r-0"));
    assert_eq!(retries(&twin.events(20).await.unwrap()), vec![1, 2]);
    assert!(twin.get().await.unwrap().desired_sync.is_none());
    p.shutdown().await;
}
