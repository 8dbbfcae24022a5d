//! Bad input and overload: typed errors, never a panic, never unbounded queues.

use crate::support::*;
use serde_json::json;
use twinfleet::TwinError;
use twinfleet::models::TwinCommand;

#[actix_rt::test]
async fn unknown_ids_and_rejected_commands_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), None, test_settings()).await;
    fleet(&p, "lamp", json!({}), "l", 2, |_| vec![]).await;
    assert!(matches!(p.twin("nobody"), Err(TwinError::NotFound(_))));
    assert!(matches!(p.dta("nothing"), Err(TwinError::UnknownDta(_))));
    assert!(matches!(p.device_type("none"), Err(TwinError::UnknownDeviceType(_))));
    let t = p.twin("l-0").unwrap();
    let seq = t.get().await.unwrap().state.last_seq;
    assert!(matches!(t.report(Default::default()).await, Err(TwinError::Rejected(_))));
    t.command(TwinCommand::Archive).await.unwrap();
    assert!(matches!(t.set_desired(obj(json!({"on": true}))).await, Err(TwinError::Rejected(_))));
    assert_eq!(t.get().await.unwrap().state.last_seq, seq + 1, "only the archive was journalled");
    p.shutdown().await;
}

#[actix_rt::test]
async fn a_full_mailbox_is_a_typed_error_and_accepted_commands_are_all_applied() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings();
    settings.dti_mailbox = 4;
    let p = start(dir.path(), None, settings).await;
    fleet(&p, "lamp", json!({}), "b", 1, |_| vec![]).await;
    let t = p.twin("b-0").unwrap();
    let mut accepted = Vec::new();
    let mut full = 0;
    for n in 0..5_000 {
        match t.try_command(TwinCommand::Report(obj(json!({"n": n})))) {
            Ok(answer) => accepted.push(answer),
            Err(TwinError::MailboxFull(id)) => {
                assert_eq!(id, "b-0");
                full += 1;
            }
            Err(e) => panic!("unexpected {e}"),
        }
        assert!(t.actor().mailbox_depth <= 4, "the mailbox bound holds");
    }
    assert!(full > 0, "5000 posts in a tight loop must overrun a mailbox of 4");
    let n = accepted.len() as u64;
    for r in futures::future::join_all(accepted).await {
        r.expect("every accepted command is applied");
    }
    assert_eq!(t.get().await.unwrap().state.last_seq, n);
    p.shutdown().await;
}

/// A request's future is what every caller stores and moves per request: it stays
/// small. Nested `async fn`s each kept their argument beside the future they awaited,
/// and a `get` had grown to 6 KB, copied on every call (10,000 callers' gets ran 30%
/// slower for it; BENCHMARKS.md, "Requests without the 6 KB future").
#[actix_rt::test]
async fn a_request_future_stays_small() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), None, test_settings()).await;
    fleet(&p, "lamp", json!({}), "s", 1, |_| vec![]).await;
    let t = p.twin("s-0").unwrap();
    let get = t.get();
    assert!(std::mem::size_of_val(&get) <= 1024, "a get's future takes {} bytes", std::mem::size_of_val(&get));
    get.await.unwrap();
    let report = t.report(obj(json!({"on": true})));
    assert!(std::mem::size_of_val(&report) <= 2048, "a report's future takes {} bytes", std::mem::size_of_val(&report));
    report.await.unwrap();
    assert_eq!(t.get().await.unwrap().state.reported.get("on"), Some(&json!(true)));
    p.shutdown().await;
}

/// A request dropped before the twin takes it (a caller that gave up: a deadline, a
/// dropped future) leaves the mailbox depth: actix skips it, and it took itself out of
/// the count. It used to stay counted forever, so the depth in the actor listing and
/// /metrics only grew, and `try_command` would end up refusing a twin with an empty
/// mailbox.
#[actix_rt::test]
async fn requests_given_up_leave_the_mailbox_depth() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), None, test_settings()).await;
    fleet(&p, "lamp", json!({}), "g", 1, |_| vec![]).await;
    let t = p.twin("g-0").unwrap();
    for n in 0..2_000 {
        drop(t.report(obj(json!({"n": n}))));
        drop(t.get());
    }
    t.get().await.unwrap();
    eventually("the depth back to zero", || async { (t.actor().mailbox_depth == 0).then_some(()) }).await;
    assert!(t.try_command(TwinCommand::Report(obj(json!({"after": true})))).is_ok());
    p.shutdown().await;
}

/// `get_many` answers every id in its place: a view per twin (an archived one too, one
/// asked twice twice), `NotFound` for an unknown or deleted id; a twin whose mailbox is
/// full waits for room like any request, and answers after what was queued before it.
/// Nothing stays counted in the mailboxes afterwards.
#[actix_rt::test]
async fn get_many_answers_every_twin_in_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings();
    settings.dti_mailbox = 4;
    let p = start(dir.path(), None, settings).await;
    fleet(&p, "lamp", json!({}), "m", 40, |_| vec![]).await;
    p.twin("m-3").unwrap().report(obj(json!({"on": true}))).await.unwrap();
    p.twin("m-5").unwrap().command(TwinCommand::Archive).await.unwrap();
    p.delete_twin("m-7").await.unwrap();
    // Fill m-9's mailbox: the batch has to wait for room, then see these reports applied.
    let busy = p.twin("m-9").unwrap();
    let mut queued = Vec::new();
    for n in 0.. {
        match busy.try_command(TwinCommand::Report(obj(json!({"n": n})))) {
            Ok(answer) => queued.push(answer),
            Err(TwinError::MailboxFull(_)) => break,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    let last = queued.len() as u64 - 1;
    let queued = actix_rt::spawn(futures::future::join_all(queued));

    let mut ids: Vec<String> = (0..40).rev().map(|i| format!("m-{i}")).collect();
    ids.insert(10, "nobody".into());
    ids.push("m-3".into());
    let views = p.get_many(&ids).await;
    assert_eq!(views.len(), ids.len());
    for (id, view) in ids.iter().zip(&views) {
        match id.as_str() {
            "nobody" | "m-7" => assert!(matches!(view, Err(TwinError::NotFound(_))), "{id}: {view:?}"),
            _ => assert_eq!(view.as_ref().unwrap().state.identity.twin_id.as_str(), id, "in its place"),
        }
    }
    let view = |id: &str| views[ids.iter().position(|i| i == id).unwrap()].as_ref().unwrap();
    assert_eq!(view("m-3").state.reported.get("on"), Some(&json!(true)));
    assert_eq!(views.last().unwrap().as_ref().unwrap().state.reported.get("on"), Some(&json!(true)));
    assert_eq!(
        view("m-5").state.lifecycle,
        twinfleet::models::Lifecycle::Archived,
        "an archived twin still shows itself"
    );
    assert_eq!(view("m-9").state.reported.get("n"), Some(&json!(last)), "asked after the queued reports");
    for r in queued.await.unwrap() {
        r.unwrap();
    }
    for i in (0..40).filter(|i| *i != 7) {
        assert_eq!(p.twin(&format!("m-{i}")).unwrap().actor().mailbox_depth, 0, "m-{i}");
    }
    p.shutdown().await;
}

/// The same for the aggregate actors: requests to a DTA and to a TDTA that their callers
/// gave up after posting leave those mailboxes' depth (they stayed counted forever), and
/// a crashed twin's report to its TDTA is counted while queued, then taken out.
#[actix_rt::test]
async fn requests_given_up_leave_a_dta_and_a_tdta_mailbox_depth() {
    use futures::FutureExt;
    use twinfleet::models::ConfigLayer;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings();
    settings.allow_fault_injection = true;
    let p = start(dir.path(), None, settings).await;
    p.create_dta(twinfleet::DtaSpec {
        id: did("hall"),
        name: "Hall".into(),
        parents: vec![],
        layers: Default::default(),
    })
    .await
    .unwrap();
    let ty = fleet(&p, "lamp", json!({}), "a", 3, |_| vec![did("hall")]).await;
    let dta = p.dta("hall").unwrap();
    for n in 0..500 {
        let layer = ConfigLayer { priority: 1, values: obj(json!({"n": n})) };
        assert!(dta.set_layer("l", layer).now_or_never().is_none(), "posted, not answered yet");
        assert!(ty.set_defaults(obj(json!({"n": n}))).now_or_never().is_none());
    }
    p.twin("a-1").unwrap().inject_panic().await.unwrap_err();
    eventually("the twin restarted", || async { p.twin("a-1").unwrap().get().await.ok() }).await;
    eventually("both depths back to zero", || async {
        (dta.actor().mailbox_depth == 0 && ty.actor().mailbox_depth == 0).then_some(())
    })
    .await;
    // Both still answer, and count what they handled.
    dta.set_layer("l", ConfigLayer { priority: 1, values: obj(json!({"n": "last"})) }).await.unwrap();
    ty.set_defaults(obj(json!({"n": "last"}))).await.unwrap();
    assert_eq!((dta.actor().mailbox_depth, ty.actor().mailbox_depth), (0, 0));
    p.shutdown().await;
}
