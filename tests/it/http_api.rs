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
    let now = twinfleet::Clock::now(&*p.env().clock);
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
