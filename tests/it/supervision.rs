//! A panic in one twin stops only that twin; its TDTA restarts it from storage with
//! backoff (on the virtual clock), and gives up after too many failures.

use crate::support::*;
use serde_json::json;
use twinfleet::models::{AlertKind, EventKind};
use twinfleet::{ActorQuery, ActorStatus, TwinError};

#[actix_rt::test]
async fn a_panic_restarts_only_that_twin_with_its_state_restored() {
    let dir = tempfile::tempdir().unwrap();
    let clock = virtual_clock();
    let p = start(dir.path(), Some(clock.clone()), test_settings()).await;
    fleet(&p, "sensor", json!({}), "s", 20, |_| vec![]).await;
    let victim = p.twin("s-7").unwrap();
    victim.report(obj(json!({"temp": 21.5}))).await.unwrap();
    let before = victim.get().await.unwrap();

    let err = victim.inject_panic().await.unwrap_err();
    assert!(matches!(err, TwinError::Crashed { .. }), "{err:?}");
    // While it waits for its restart it answers with a typed error, not a hang.
    assert!(matches!(victim.get().await, Err(TwinError::Unavailable { status: ActorStatus::Restarting, .. })));
    for i in (0..20).filter(|i| *i != 7) {
        p.twin(&format!("s-{i}")).unwrap().get().await.expect("siblings keep answering");
    }

    clock.wait_for_timers(1).await; // the restart backoff
    clock.advance(100);
    let after = eventually("the twin is restarted", || async { victim.get().await.ok() }).await;
    assert_eq!(after.state.reported, before.state.reported);
    assert_eq!(after.state.identity, before.state.identity);
    let actor = victim.actor();
    assert_eq!((actor.restarts, actor.status), (1, ActorStatus::Running));
    assert!(actor.last_error.unwrap().contains("fault injected"));
    let events = victim.events(10).await.unwrap();
    assert!(events.iter().any(|e| matches!(&e.kind, EventKind::Restarted { attempt: 1, .. })), "{events:?}");

    let others = p.actors(&ActorQuery { kind: Some("dti".into()), limit: Some(100), ..Default::default() });
    assert_eq!(others.total, 20);
    assert_eq!(others.actors.iter().filter(|a| a.restarts > 0).map(|a| a.id.as_str()).collect::<Vec<_>>(), vec!["s-7"]);
    p.shutdown().await;
}

#[actix_rt::test]
async fn a_twin_that_keeps_failing_is_marked_failed_and_alerted() {
    let dir = tempfile::tempdir().unwrap();
    let clock = virtual_clock();
    let mut settings = test_settings();
    settings.restart.max_restarts = 2;
    let p = start(dir.path(), Some(clock.clone()), settings).await;
    fleet(&p, "sensor", json!({}), "f", 3, |_| vec![]).await;
    let mut alerts = p.alerts().subscribe();
    let victim = p.twin("f-1").unwrap();
    for attempt in 1..=2u32 {
        assert!(matches!(victim.inject_panic().await, Err(TwinError::Crashed { .. })));
        clock.wait_for_timers(1).await;
        clock.advance(10_000);
        eventually("restart", || async { victim.get().await.ok() }).await;
        assert_eq!(victim.actor().restarts, attempt);
    }
    assert!(matches!(victim.inject_panic().await, Err(TwinError::Crashed { .. })));
    let alert = alerts.recv().await.unwrap();
    assert_eq!((alert.kind, alert.source.as_str()), (AlertKind::ActorFailed, "dti/f-1"));
    assert_eq!(victim.actor().status, ActorStatus::Failed);
    assert!(matches!(victim.get().await, Err(TwinError::Unavailable { status: ActorStatus::Failed, .. })));
    p.twin("f-0").unwrap().get().await.expect("siblings unaffected");
    p.shutdown().await;
}

#[actix_rt::test]
async fn fault_injection_is_refused_unless_enabled() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), None, twinfleet::Settings::default()).await;
    fleet(&p, "sensor", json!({}), "x", 1, |_| vec![]).await;
    let t = p.twin("x-0").unwrap();
    assert!(matches!(t.inject_panic().await, Err(TwinError::FaultInjectionDisabled)));
    assert_eq!(t.actor().restarts, 0);
    p.shutdown().await;
}
