//! The inspection endpoints over real HTTP on loopback.

use crate::support::*;
use serde_json::json;
use twinfleet_protocols::HttpApi;

#[actix_rt::test]
async fn twin_view_and_actor_tree_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), None, test_settings()).await;
    p.create_dta(twinfleet::DtaSpec {
        id: did("line-1"),
        name: "Line 1".into(),
        parents: vec![],
        layers: Default::default(),
    })
    .await
    .unwrap();
    fleet(&p, "press", json!({"speed": 3}), "h", 50, |i| if i < 10 { vec![did("line-1")] } else { vec![] }).await;
    p.twin("h-1").unwrap().report(obj(json!({"temp": 40}))).await.unwrap();
    let api = HttpApi::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap(), 1).unwrap();
    let addr = api.local_addr();
    let token = admin_token(&p).await;
    let admin = token.clone();
    let get = move |path: &'static str| {
        let token = token.clone();
        actix_rt::task::spawn_blocking(move || http_as(addr, &token, "GET", path, None))
    };

    let (status, twin) = get("/api/v1/twins/h-1?events=5").await.unwrap();
    assert_eq!(status, 200, "{twin}");
    assert_eq!(twin["identity"]["twin_id"], "h-1");
    assert_eq!(twin["identity"]["device_type"], "press");
    assert_eq!(twin["reported"], json!({"temp": 40}));
    assert_eq!(twin["effective_config"]["values"], json!({"speed": 3}));
    assert_eq!(twin["memberships"], json!(["line-1"]));
    assert_eq!(twin["actor"]["kind"], "dti");
    assert_eq!(twin["actor"]["parent"], "tdta/press");
    assert_eq!(twin["last_events"][0]["event"], "reported");

    let (status, err) = get("/api/v1/twins/nobody").await.unwrap();
    assert_eq!((status, err["error"].as_str()), (404, Some("not_found")));
    let (status, page) = get("/api/v1/actors?kind=dti&limit=5").await.unwrap();
    assert_eq!((status, page["total"].as_u64(), page["actors"].as_array().unwrap().len()), (200, Some(50), 5));
    let (_, page) = get("/api/v1/actors?kind=tdta").await.unwrap();
    assert_eq!(page["actors"][0]["id"], "press");
    assert_eq!(page["actors"][0]["parent"], "platform/supervisor");
    let (_, page) = get("/api/v1/actors?parent=tdta/press&limit=1").await.unwrap();
    assert_eq!(page["total"], 50);
    let (status, err) = get("/api/v1/actors?limit=many").await.unwrap();
    assert_eq!((status, err["error"].as_str()), (400, Some("invalid")));
    let (status, _) = get("/api/v1/nothing-here").await.unwrap();
    assert_eq!(status, 404);
    let now = p.now();
    let points = vec![twinfleet::models::MetricPoint { metric: "load".into(), at: now, value: 0.75 }];
    p.twin("h-2").unwrap().telemetry(points).await.unwrap();
    let (status, t) = get("/api/v1/twins/h-2/telemetry?metric=load&limit=5").await.unwrap();
    assert_eq!((status, t["points"][0]["value"].as_f64()), (200, Some(0.75)), "{t}");
    let (status, _) = get("/api/v1/twins/h-2/telemetry?metric=other").await.unwrap();
    assert_eq!(status, 200);
    let (status, err) = get("/api/v1/twins/h-2/telemetry?colour=red").await.unwrap();
    assert_eq!((status, err["error"].as_str()), (400, Some("invalid")), "unknown query fields are refused");
    let (_, dtas) = get("/api/v1/dtas").await.unwrap();
    assert_eq!(dtas[0]["members"], 10);
    // A known path with another method is 405 and says which methods it has.
    let (status, err) =
        actix_rt::task::spawn_blocking(move || http_as(addr, &admin, "PUT", "/api/v1/actors", None)).await.unwrap();
    assert_eq!((status, err["error"].as_str()), (405, Some("method_not_allowed")), "{err}");
    // The OpenAPI document needs no token and lists the routes as registered.
    let (status, doc) = actix_rt::task::spawn_blocking(move || http_get(addr, "/api/v1/openapi.json")).await.unwrap();
    assert_eq!((status, doc["openapi"].as_str()), (200, Some("3.1.0")));
    for path in ["/api/v1/twins", "/api/v1/twins/{id}/components/{path}", "/api/v1/jobs/{id}", "/api/v1/audit"] {
        assert!(doc["paths"].get(path).is_some(), "{path} is documented");
    }
    assert!(doc["paths"]["/api/v1/twins/{id}/desired"].get("patch").is_some());
    api.stop().await;
    p.shutdown().await;
}

/// The metric `name{labels}` from a Prometheus exposition, if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[actix_rt::test]
async fn metrics_show_requests_actors_twins_and_storage() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), None, test_settings()).await;
    fleet(&p, "press", json!({}), "m", 20, |_| vec![]).await;
    p.twin("m-3").unwrap().command(twinfleet::models::TwinCommand::Archive).await.unwrap();
    assert!(p.twin("m-4").unwrap().inject_panic().await.is_err());
    let api = HttpApi::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap(), 1).unwrap();
    let addr = api.local_addr();
    let token = admin_token(&p).await;
    actix_rt::task::spawn_blocking(move || {
        for path in ["/api/v1/twins/m-1", "/api/v1/twins/m-2", "/api/v1/twins/nobody", "/nothing-here"] {
            http_as(addr, &token, "GET", path, None);
        }
        http_request(addr, "GET", "/api/v1/twins", None); // no token: 401
    })
    .await
    .unwrap();
    // The panicked twin restarts after its backoff (real time here).
    let panicked = p.twin("m-4").unwrap();
    eventually("the panicked twin runs again", || {
        let t = panicked.clone();
        async move { t.get().await.ok() }
    })
    .await;
    let (_, body) = actix_rt::task::spawn_blocking(move || http_get(addr, "/metrics")).await.unwrap();
    let text = body.as_str().unwrap().to_string();
    let has = |series: &str, want: f64| {
        assert_eq!(sample(&text, series), Some(want), "{series} in /metrics:\n{text}");
    };
    // Requests by route pattern (never the concrete path) and status, with latencies.
    has(r#"twinfleet_http_requests_total{method="GET",route="/api/v1/twins/{id}",status="200"}"#, 2.0);
    has(r#"twinfleet_http_requests_total{method="GET",route="/api/v1/twins/{id}",status="404"}"#, 1.0);
    has(r#"twinfleet_http_requests_total{method="GET",route="/api/v1/twins",status="401"}"#, 1.0);
    has(r#"twinfleet_http_requests_total{method="GET",route="unmatched",status="404"}"#, 1.0);
    has(r#"twinfleet_http_requests_seconds_count{method="GET",route="/api/v1/twins/{id}"}"#, 3.0);
    has(r#"twinfleet_http_requests_seconds_bucket{method="GET",route="/api/v1/twins/{id}",le="+Inf"}"#, 3.0);
    // Actors by kind and status; restarts; twins by type and lifecycle.
    has(r#"twinfleet_actors{kind="dti",status="running"}"#, 20.0);
    has(r#"twinfleet_actors{kind="tdta",status="running"}"#, 1.0);
    has(r#"twinfleet_actors{kind="dti",status="failed"}"#, 0.0);
    has(r#"twinfleet_actor_restarts_total{kind="dti"}"#, 1.0);
    has(r#"twinfleet_actor_restarts_total{kind="tdta"}"#, 0.0);
    has(r#"twinfleet_twins{device_type="press",state="active"}"#, 19.0);
    has(r#"twinfleet_twins{device_type="press",state="archived"}"#, 1.0);
    assert!(sample(&text, r#"twinfleet_actor_messages_handled_total{kind="dti"}"#).unwrap() >= 3.0);
    assert!(sample(&text, r#"twinfleet_actor_mailbox_depth{kind="dti"}"#).is_some());
    // Storage: one histogram observation per group commit.
    let commits = sample(&text, "twinfleet_storage_commits_total").unwrap();
    assert!(commits > 0.0);
    has("twinfleet_storage_commit_records_count", commits);
    has("twinfleet_storage_flush_seconds_count", commits);
    has(r#"twinfleet_storage_flush_seconds_bucket{le="+Inf"}"#, commits);
    assert!(text.contains("# TYPE twinfleet_storage_flush_seconds histogram\n"));
    api.stop().await;
    p.shutdown().await;
}
