//! Monitoring rules inside the twins, on the virtual clock: a threshold set at the
//! device type, overridden by a DTA and disabled by a twin; a device going offline after
//! 20 s of silence and coming back; hysteresis; a log-pattern rule; the alerts stored,
//! listed and acknowledged over HTTP; and a restart that neither loses nor re-raises.

use crate::support::*;
use serde_json::json;
use std::collections::BTreeMap;
use twinfleet::models::{AlertState, ConfigLayer, LogLevel, LogLine, MetricPoint, RuleAlert, TwinCommand};
use twinfleet::{DtaSpec, Platform};
use twinfleet_protocols::HttpApi;

fn rules() -> serde_json::Value {
    json!({"rules": {
        "hot": {"kind": "threshold", "metric": "temp", "above": 80, "clear_below": 75, "severity": "major"},
        "offline": {"kind": "offline"},
        "stalls": {"kind": "log_pattern", "app": "pump", "contains": "stall", "count": 2, "within": "1m"}
    }})
}

async fn point(p: &Platform, twin: &str, v: f64) {
    let now = p.runtime().clock().now();
    let pt = MetricPoint { metric: "temp".into(), at: now, value: v };
    p.twin(twin).unwrap().ingest(vec![pt]).await.unwrap();
}

/// Reads `n` events of the SSE stream at `path` (after `last_id`, if given): their ids
/// and data.
fn sse(
    addr: std::net::SocketAddr,
    token: &str,
    path: &str,
    last_id: Option<u64>,
    n: usize,
) -> Vec<(u64, serde_json::Value)> {
    sse_ready(addr, token, path, last_id, n, None)
}

/// [`sse`], telling `ready` once the stream has answered (its head came: it is
/// subscribed, and nothing after that is missed).
fn sse_ready(
    addr: std::net::SocketAddr,
    token: &str,
    path: &str,
    last_id: Option<u64>,
    n: usize,
    ready: Option<std::sync::mpsc::Sender<()>>,
) -> Vec<(u64, serde_json::Value)> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let resume = last_id.map(|id| format!("Last-Event-ID: {id}\r\n")).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n{resume}\r\n").unwrap();
    let mut out = Vec::new();
    let mut id = None;
    for line in BufReader::new(s).lines() {
        let line = line.expect("the stream stays open");
        if line.starts_with(": revision")
            && let Some(r) = &ready
        {
            let _ = r.send(());
        }
        if let Some(v) = line.strip_prefix("id: ") {
            id = v.trim().parse().ok();
        } else if let Some(d) = line.strip_prefix("data: ") {
            out.push((id.take().unwrap(), serde_json::from_str(d).unwrap()));
            if out.len() == n {
                break;
            }
        }
    }
    out
}

fn alerts(p: &Platform) -> Vec<RuleAlert> {
    p.runtime().alert_book().list(&Default::default()).unwrap().0
}

fn open(p: &Platform, twin: &str) -> BTreeMap<String, AlertState> {
    alerts(p)
        .into_iter()
        .filter(|a| a.twin == twin && a.state != AlertState::Cleared)
        .map(|a| (a.rule, a.state))
        .collect()
}

async fn setup(dir: &std::path::Path, clock: std::sync::Arc<twinfleet::VirtualClock>) -> Platform {
    let p = start(dir, Some(clock), test_settings()).await;
    let mut layers = BTreeMap::new();
    layers.insert(
        "monitoring".to_string(),
        ConfigLayer { priority: 10, values: obj(json!({"rules": {"hot": {"above": 90}}})) },
    );
    p.create_dta(DtaSpec { id: did("hall"), name: "Hall".into(), parents: vec![], layers }).await.unwrap();
    fleet(&p, "meter", rules(), "m", 3, |i| if i == 1 { vec![did("hall")] } else { vec![] }).await;
    p.twin("m-2")
        .unwrap()
        .command(TwinCommand::SetOverrides(obj(json!({"rules": {"hot": {"disabled": true}}}))))
        .await
        .unwrap();
    p
}

#[actix_rt::test]
async fn layered_thresholds_offline_hysteresis_and_log_patterns_raise_and_clear_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let clock = virtual_clock();
    let p = setup(dir.path(), clock.clone()).await;

    // The type's threshold (80) for m-0, the DTA's (90) for m-1, none for m-2.
    for t in ["m-0", "m-1", "m-2"] {
        point(&p, t, 85.0).await;
    }
    assert_eq!(open(&p, "m-0").get("hot"), Some(&AlertState::Raised));
    assert!(open(&p, "m-1").is_empty() && open(&p, "m-2").is_empty(), "{:?}", alerts(&p));
    point(&p, "m-1", 95.0).await;
    point(&p, "m-2", 99.0).await;
    assert!(open(&p, "m-1").contains_key("hot"));
    assert!(open(&p, "m-2").is_empty(), "disabled at the twin");
    let hot = alerts(&p).into_iter().find(|a| a.twin == "m-1").unwrap();
    assert_eq!((hot.device_type.as_str(), hot.memberships.clone()), ("meter", vec!["hall".to_string()]));
    assert_eq!(hot.values.get("temp"), Some(&95.0));
    assert_eq!(hot.severity, twinfleet::models::Severity::Major);

    // Hysteresis: m-0 hovering between 75 and 80 stays raised, once; at 75 it clears.
    for v in [79.0, 81.0, 76.0] {
        point(&p, "m-0", v).await;
    }
    assert_eq!(alerts(&p).iter().filter(|a| a.twin == "m-0" && a.rule == "hot").count(), 1);
    point(&p, "m-0", 75.0).await;
    assert!(!open(&p, "m-0").contains_key("hot"));

    // Offline after 20 s of silence (virtual time), back on the next message.
    clock.advance(19_000);
    point(&p, "m-0", 20.0).await;
    clock.advance(1_500);
    eventually("m-1 and m-2 go offline", || async {
        (open(&p, "m-1").contains_key("offline") && open(&p, "m-2").contains_key("offline")).then_some(())
    })
    .await;
    assert!(!open(&p, "m-0").contains_key("offline"), "m-0 spoke 1.5 s ago");
    p.twin("m-2").unwrap().report(obj(json!({"fw": "1.1"}))).await.unwrap();
    assert!(!open(&p, "m-2").contains_key("offline"), "a report brings it back");

    // Two pump stall lines within a minute.
    let line = |text: &str| LogLine {
        at: p.runtime().clock().now(),
        level: LogLevel::Error,
        app: "pump".into(),
        text: text.into(),
    };
    let m0 = p.twin("m-0").unwrap();
    m0.append_logs(vec![line("motor stall")]).await.unwrap();
    assert!(!open(&p, "m-0").contains_key("stalls"));
    m0.append_logs(vec![line("ok"), line("stall again")]).await.unwrap();
    assert!(open(&p, "m-0").contains_key("stalls"));

    // A rule disabled at the type reaches idle twins at once: m-1's firing "hot" clears
    // without any input from it (the DTA's patch keeps the rest of the rule).
    let mut defaults = rules();
    defaults["rules"]["hot"]["disabled"] = json!(true);
    p.device_type("meter").unwrap().set_defaults(obj(defaults)).await.unwrap();
    eventually("m-1's hot clears", || async { (!open(&p, "m-1").contains_key("hot")).then_some(()) }).await;
    p.device_type("meter").unwrap().set_defaults(obj(rules())).await.unwrap();

    // An archived (decommissioned) twin watches nothing, and a deleted one's alerts end.
    assert!(!open(&p, "m-1").is_empty());
    p.twin("m-1").unwrap().command(TwinCommand::Archive).await.unwrap();
    let v = p.twin("m-1").unwrap().get().await.unwrap();
    assert!(open(&p, "m-1").is_empty(), "{:?} {:?} {:?}", open(&p, "m-1"), v.state.rules, v.state.lifecycle);
    clock.advance(60_000);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(open(&p, "m-1").is_empty(), "no offline alert for an archived twin");
    p.runtime().delete_twin("m-0").await.unwrap();
    assert!(open(&p, "m-0").is_empty());
    p.shutdown().await;
}

#[actix_rt::test]
async fn alerts_are_listed_and_acknowledged_over_http_and_a_restart_neither_loses_nor_reraises() {
    let dir = tempfile::tempdir().unwrap();
    let clock = virtual_clock();
    let p = setup(dir.path(), clock.clone()).await;
    point(&p, "m-0", 85.0).await;
    point(&p, "m-1", 95.0).await;
    let http = HttpApi::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap(), 1).unwrap();
    let (addr, admin) = (http.local_addr(), admin_token(&p).await);
    let call = |method: &'static str, path: String, body: Option<String>| {
        let admin = admin.clone();
        actix_rt::task::spawn_blocking(move || http_as(addr, &admin, method, &path, body.as_deref()))
    };
    let (s, page) = call("GET", "/api/v1/alerts?state=open&twin=m-1".into(), None).await.unwrap();
    assert_eq!(s, 200, "{page}");
    assert_eq!(page["alerts"].as_array().unwrap().len(), 1, "{page}");
    let id = page["alerts"][0]["id"].as_u64().unwrap();
    let (s, a) = call("POST", format!("/api/v1/alerts/{id}/acknowledge"), None).await.unwrap();
    assert_eq!((s, a["state"].clone(), a["acknowledged_by"].clone()), (200, json!("acknowledged"), json!("admin")));
    // Health from the open alerts, in the API and the CLI.
    let (s, v) = call("GET", "/api/v1/twins?health=critical".into(), None).await.unwrap();
    let ids: Vec<_> = v["twins"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap().to_string()).collect();
    assert_eq!((s, ids), (200, vec!["m-0".to_string(), "m-1".to_string()]));
    let (_, v) = call("GET", "/api/v1/twins/m-2".into(), None).await.unwrap();
    assert_eq!(v["health"], "ok");
    let cli = |args: Vec<String>| {
        actix_rt::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            crate::binary::client(&args)
        })
    };
    let api = format!("http://{addr}");
    let argv = |a: &[&str]| -> Vec<String> {
        a.iter().map(|s| s.to_string()).chain(["--api".into(), api.clone(), "--token".into(), admin.clone()]).collect()
    };
    let (ok, out, err) = cli(argv(&["twins", "list", "--health", "critical"])).await.unwrap();
    assert!(ok && out.contains("m-1") && !out.contains("m-2"), "{out}{err}");
    let (ok, out, err) = cli(argv(&["alerts", "--state", "open", "--twin", "m-1"])).await.unwrap();
    assert!(ok && out.contains("acknowledged") && out.contains("hot"), "{out}{err}");

    // The live stream: from the start of the log, then resumed after the first event.
    let a2 = admin.clone();
    let seen =
        actix_rt::task::spawn_blocking(move || sse(addr, &a2, "/api/v1/alerts/stream?after=0", None, 3)).await.unwrap();
    let states: Vec<_> =
        seen.iter().map(|(_, a)| (a["twin"].as_str().unwrap().to_string(), a["state"].clone())).collect();
    assert_eq!(
        states,
        [("m-0".into(), json!("raised")), ("m-1".into(), json!("raised")), ("m-1".into(), json!("acknowledged"))]
    );
    let a2 = admin.clone();
    let first = seen[0].0;
    let resumed =
        actix_rt::task::spawn_blocking(move || sse(addr, &a2, "/api/v1/alerts/stream", Some(first), 2)).await.unwrap();
    assert_eq!(resumed.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [seen[1].0, seen[2].0], "what it missed");
    // A live one sees the next change as it happens.
    let a2 = admin.clone();
    let (tx, subscribed) = std::sync::mpsc::channel();
    let live = actix_rt::task::spawn_blocking(move || {
        sse_ready(addr, &a2, "/api/v1/alerts/stream?severity=major", None, 1, Some(tx))
    });
    actix_rt::task::spawn_blocking(move || subscribed.recv_timeout(std::time::Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("the stream answered");
    point(&p, "m-0", 70.0).await;
    let live = live.await.unwrap();
    assert_eq!((live[0].1["twin"].clone(), live[0].1["state"].clone()), (json!("m-0"), json!("cleared")));
    assert!(live[0].0 > seen[2].0);
    // The platform's own alerts go the same way.
    p.runtime().alerts().raise(twinfleet::models::Alert {
        at: p.runtime().clock().now(),
        severity: twinfleet::models::Severity::Warning,
        kind: twinfleet::models::AlertKind::DeadlineExceeded,
        source: "dti/m-1".into(),
        message: "m-1 did not report its desired state".into(),
    });
    let platform = eventually("the platform alert is in the book", || async {
        let (_, page) = call("GET", "/api/v1/alerts?rule=platform.deadline_exceeded".into(), None).await.unwrap();
        page["alerts"].as_array().filter(|a| !a.is_empty()).cloned()
    })
    .await;
    assert_eq!((platform[0]["twin"].clone(), platform[0]["state"].clone()), (json!("m-1"), json!("raised")));
    let (s, page) = call("GET", "/api/v1/alerts?severity=critical".into(), None).await.unwrap();
    assert_eq!((s, page["alerts"].as_array().unwrap().len()), (200, 0));
    let (s, e) = call("GET", "/api/v1/alerts?state=lost".into(), None).await.unwrap();
    assert_eq!(s, 400, "{e}");
    // A twin's effective rules, with where each comes from.
    let (s, v) = call("GET", "/api/v1/twins/m-1/rules".into(), None).await.unwrap();
    assert_eq!(s, 200, "{v}");
    let hot = v["rules"].as_array().unwrap().iter().find(|r| r["id"] == "hot").unwrap().clone();
    assert_eq!((hot["source"]["kind"].clone(), hot["source"]["dta"].clone()), (json!("dta"), json!("hall")), "{hot}");
    assert_eq!(hot["phase"]["phase"], "firing");
    // Silences over HTTP: a bad one is refused, naming the problem.
    let (s, e) = call("POST", "/api/v1/silences".into(), Some(json!({"ends_at": 5}).to_string())).await.unwrap();
    assert!(s == 400 && e["message"].as_str().unwrap().contains("matches something"), "{s} {e}");
    let ok =
        json!({"group": "hall", "ends_at": p.runtime().clock().now().plus_millis(60_000), "comment": "swap filters"});
    let (s, v) = call("POST", "/api/v1/silences".into(), Some(ok.to_string())).await.unwrap();
    assert_eq!((s, v["created_by"].clone()), (201, json!("admin")), "{v}");
    let (_, list) = call("GET", "/api/v1/silences".into(), None).await.unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    let (s, _) = call("DELETE", format!("/api/v1/silences/{}", v["id"]), None).await.unwrap();
    assert_eq!(s, 200);
    // A malformed rule is refused where it is written, naming the problem.
    let bad = json!({"rules": {"cold": {"kind": "threshold", "metric": "temp", "below": 5, "clear_above": 2}}});
    let (s, e) = call("PATCH", "/api/v1/twins/m-0/overrides".into(), Some(bad.to_string())).await.unwrap();
    assert!(s == 400 && e["message"].as_str().unwrap().contains("clear_above 2 is below"), "{s} {e}");
    http.stop().await;
    let before = alerts(&p);
    let phase = p.twin("m-1").unwrap().get().await.unwrap().state.rules.get("hot").copied();
    assert!(matches!(phase, Some(twinfleet::models::rules::Phase::Firing { .. })), "{phase:?}");
    p.shutdown().await;

    // After a restart the same inputs raise nothing new; the firing rules are still firing.
    let p = start(dir.path(), Some(clock.clone()), test_settings()).await;
    let again = p.twin("m-1").unwrap().get().await.unwrap().state.rules.get("hot").copied();
    assert_eq!(again, phase, "the rule's phase is restored with the twin");
    let mut raised = p.runtime().alert_book().subscribe();
    point(&p, "m-1", 96.0).await;
    let after: Vec<_> = alerts(&p).into_iter().filter(|a| !a.rule.starts_with("platform.")).collect();
    let before: Vec<_> = before.into_iter().filter(|a| !a.rule.starts_with("platform.")).collect();
    assert_eq!(after.len(), before.len(), "nothing re-raised: {after:?}");
    assert!(raised.try_recv().is_err(), "no alert event at all");
    assert_eq!(open(&p, "m-1").get("hot"), Some(&AlertState::Acknowledged), "nothing lost");
    // And they still clear.
    point(&p, "m-1", 10.0).await;
    assert!(!open(&p, "m-1").contains_key("hot"));
    p.shutdown().await;
}

#[actix_rt::test]
async fn alerts_reach_a_real_webhook_signed_retried_routed_and_resumed_after_a_restart() {
    use twinfleet::models::notify::{SinkKind, SinkSpec};
    use twinfleet_protocols::Notifier;
    let dir = tempfile::tempdir().unwrap();
    let clock = virtual_clock();
    let p = setup(dir.path(), clock.clone()).await;
    let hook = Hook::start(vec![500, 503]);
    let spec = SinkSpec {
        name: "hook".into(),
        kind: SinkKind::Webhook,
        url: format!("http://{}/alerts", hook.addr),
        secret: "s3cret".into(),
        topic: String::new(),
        username: String::new(),
        password: String::new(),
        min_severity: Some(twinfleet::models::Severity::Major),
        device_types: vec![],
        groups: vec![],
        acknowledgements: false,
    };
    let n = Notifier::start(p.runtime().clone(), vec![spec.clone()]).unwrap();
    eventually("the sink has its cursor", || async { p.runtime().alert_book().sink_cursor("hook").unwrap().map(drop) })
        .await;
    point(&p, "m-0", 85.0).await; // major: raised
    // Offline alerts are warnings: not routed here.
    clock.advance(21_000);
    eventually("m-1 goes offline", || async { open(&p, "m-1").contains_key("offline").then_some(()) }).await;
    point(&p, "m-0", 70.0).await; // cleared
    let taken = eventually("two changes delivered after two refusals", || async {
        let t = hook.taken();
        (t.len() == 2).then_some(t)
    })
    .await;
    let states: Vec<_> = taken.iter().map(|b| (b["alert"]["rule"].clone(), b["alert"]["state"].clone())).collect();
    assert_eq!(states, [(json!("hot"), json!("raised")), (json!("hot"), json!("cleared"))], "in order");
    {
        let got = hook.got.lock().unwrap();
        assert_eq!(got.iter().map(|r| r.2).collect::<Vec<_>>()[..3], [500, 503, 200], "retried until taken");
        for (headers, body, _) in got.iter() {
            assert_eq!(headers["x-twinfleet-signature"], twinfleet_protocols::notify::signature("s3cret", body));
        }
    }
    let stats = p.runtime().alert_book().sink_stats("hook");
    assert_eq!(stats.failed.load(std::sync::atomic::Ordering::Relaxed), 2);

    // Stopped, a change happens; started again, the sink delivers it and nothing twice.
    actix_rt::task::spawn_blocking(move || n.stop()).await.unwrap();
    point(&p, "m-1", 95.0).await;
    let n = Notifier::start(p.runtime().clone(), vec![spec]).unwrap();
    let taken = eventually("the change made while it was stopped", || async {
        let t = hook.taken();
        (t.len() == 3).then_some(t)
    })
    .await;
    assert_eq!(
        (taken[2]["alert"]["twin"].clone(), taken[2]["alert"]["state"].clone()),
        (json!("m-1"), json!("raised"))
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(hook.taken().len(), 3, "nothing delivered twice");

    // A silence (a maintenance window of DTA "hall": m-1) holds its changes back; the
    // others go on.
    let now = p.runtime().clock().now();
    let silence = twinfleet::models::notify::Silence {
        id: 0,
        twin: None,
        device_type: None,
        rule: None,
        group: Some("hall".into()),
        starts_at: now,
        ends_at: now.plus_millis(3_600_000),
        comment: "maintenance".into(),
        created_by: "test".into(),
    };
    let silence = p.runtime().alert_book().add_silence(silence).await.unwrap();
    point(&p, "m-1", 10.0).await; // m-1's hot clears: silenced
    point(&p, "m-0", 99.0).await; // m-0's raises: delivered
    let taken = eventually("m-0's change", || async {
        let t = hook.taken();
        (t.len() == 4).then_some(t)
    })
    .await;
    assert_eq!(taken[3]["alert"]["twin"], "m-0");
    eventually("m-1's change counted as silenced", || async {
        (stats.silenced.load(std::sync::atomic::Ordering::Relaxed) == 1).then_some(())
    })
    .await;
    p.runtime().alert_book().delete_silence(silence.id).await.unwrap();
    point(&p, "m-1", 95.0).await; // raises again: delivered
    eventually("m-1's change after the silence", || async { (hook.taken().len() == 5).then_some(()) }).await;
    actix_rt::task::spawn_blocking(move || n.stop()).await.unwrap();
    p.shutdown().await;
}
