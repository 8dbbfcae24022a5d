//! App logs (level, app, text) per twin: sent over MQTT and gRPC, stored durably,
//! queried over HTTP by app, level and time range with a cursor, kept by the device
//! type's history retention, gone with a deleted twin, refused by an archived one.

use crate::mqtt::{addr, embedded_config};
use crate::support::*;
use serde_json::{Value, json};
use twinfleet::models::{DeviceTypeId, HistoryRetention, LogLevel, Timestamp, TwinId};
use twinfleet::{LogQuery, TwinSpec};
use twinfleet_proto::device as pb;
use twinfleet_protocols::mqtt::{MqttDevice, MqttGateway, QoS};
use twinfleet_protocols::{GrpcDevice, GrpcGateway, HttpApi};

#[actix_rt::test]
async fn app_logs_from_mqtt_and_grpc_are_stored_paged_filtered_and_kept_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), None, test_settings()).await;
    fleet(&p, "pump", json!({}), "g", 2, |_| vec![]).await;
    let token = p.issue_device_token("g-0").await.unwrap();
    let mqtt = MqttGateway::start(p.runtime().clone(), embedded_config()).await.unwrap();
    let grpc = GrpcGateway::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let now = p.now().0;

    // MQTT: bare strings (info, app "device", time of arrival) and full lines.
    let dev = MqttDevice::connect(&addr(mqtt.operational()), "g-0", &token).await.unwrap();
    let lines: Vec<Value> = (0..30)
        .map(|i| {
            let level = ["debug", "info", "warning", "error"][i % 4];
            json!({"ts": now - 100_000 + i as i64 * 1_000, "level": level, "app": "fw", "text": format!("fw line {i}")})
        })
        .collect();
    let publish = |body: Value| dev.publish_raw("devices/g-0/logs", QoS::AtLeastOnce, body.to_string().into_bytes());
    publish(json!({"lines": lines})).await.unwrap();
    publish(json!({"lines": ["booted", "ready"]})).await.unwrap();
    // Bad input: counted, nothing stored, the session goes on.
    publish(json!({"lines": [{"text": "x", "level": "loud"}]})).await.unwrap();
    publish(json!({"lines": [{"text": "x", "app": "not an app"}]})).await.unwrap();
    publish(json!({"lines": "no"})).await.unwrap();

    // gRPC: SendLogs, with equal timestamps (all kept, in the order sent).
    let mut g = GrpcDevice::connect(&format!("http://{}", grpc.local_addr()), "g-0", &token).await.unwrap();
    let at = prost_types::Timestamp { seconds: (now - 50_000) / 1000, nanos: 0 };
    let glines: Vec<pb::LogLine> = (0..3)
        .map(|i| pb::LogLine {
            timestamp: Some(at),
            level: pb::LogLevel::Error as i32,
            app: "modem".into(),
            message: format!("modem {i}"),
        })
        .collect();
    assert_eq!(g.logs(glines).await.unwrap(), 3);
    let bad = pb::LogLine { timestamp: None, level: 99, app: "modem".into(), message: "?".into() };
    assert_eq!(g.logs(vec![bad]).await.unwrap_err().code(), tonic::Code::InvalidArgument);

    let twin = p.twin("g-0").unwrap();
    let q = |app: Option<&str>, level: Option<LogLevel>, limit, cursor: Option<String>| LogQuery {
        app: app.map(String::from),
        level,
        from: Timestamp(now - 200_000),
        to: Timestamp(now + 1_000),
        limit,
        cursor,
    };
    eventually("the MQTT lines are stored", || async {
        (twin.logs_page(q(Some("device"), None, 10, None)).await.unwrap().lines.len() == 2).then_some(())
    })
    .await;
    // (The refused MQTT messages are counted as the gateway reaches them.)
    eventually("two unknown levels (MQTT, gRPC) and a bad app name are counted", || async {
        (p.rejections().count("bad_log") >= 3).then_some(())
    })
    .await;
    assert_eq!(p.rejections().count("bad_log"), 3, "two unknown levels (MQTT, gRPC), a bad app name");
    assert!(p.rejections().count("malformed") >= 1);

    // HTTP: newest first, filtered by app and lowest level, paged by cursor.
    let http = HttpApi::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap(), 1).unwrap();
    let (haddr, admin) = (http.local_addr(), admin_token(&p).await);
    let get = |path: String| {
        let admin = admin.clone();
        actix_rt::task::spawn_blocking(move || http_as(haddr, &admin, "GET", &path, None))
    };
    let range = format!("from={}&to={}", now - 200_000, now + 1_000);
    let mut texts = Vec::new();
    let mut cursor = String::new();
    loop {
        let (s, b) = get(format!("/api/v1/twins/g-0/logs?app=fw&level=warning&limit=4&{range}{cursor}")).await.unwrap();
        assert_eq!(s, 200, "{b}");
        for l in b["lines"].as_array().unwrap() {
            assert!(l["level"] == "warning" || l["level"] == "error", "{l}");
            texts.push(l["text"].as_str().unwrap().to_string());
        }
        match b["next"].as_str() {
            Some(n) => cursor = format!("&cursor={n}"),
            None => break,
        }
    }
    // Lines 2, 3, 6, 7, … 26, 27, 30-less: warning = i % 4 == 2, error = i % 4 == 3.
    let want: Vec<String> = (0..30).rev().filter(|i| i % 4 >= 2).map(|i| format!("fw line {i}")).collect();
    assert_eq!(texts, want, "every warning and error line once, newest first");
    let (s, b) = get(format!("/api/v1/twins/g-0/logs?app=modem&{range}")).await.unwrap();
    assert_eq!(s, 200, "{b}");
    let modem: Vec<&str> = b["lines"].as_array().unwrap().iter().map(|l| l["text"].as_str().unwrap()).collect();
    assert_eq!(modem, ["modem 2", "modem 1", "modem 0"], "equal timestamps: all kept, newest sent first");
    let (s, b) = get("/api/v1/twins/g-0/logs?level=loud".into()).await.unwrap();
    assert_eq!(s, 400, "{b}");
    let (s, b) = get("/api/v1/twins/g-0/logs?cursor=nonsense".into()).await.unwrap();
    assert_eq!(s, 400, "{b}");
    let (s, _) = get("/api/v1/twins/nobody/logs".into()).await.unwrap();
    assert_eq!(s, 404);
    let doc: Value = serde_json::from_str(&twinfleet_protocols::http::openapi_json()).unwrap();
    let params = &doc["paths"]["/api/v1/twins/{id}/logs"]["get"]["parameters"];
    let names: Vec<&str> = params.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert!(["app", "level", "from", "to", "limit", "cursor"].iter().all(|n| names.contains(n)), "{names:?}");
    let params = &doc["paths"]["/api/v1/twins/{id}/telemetry"]["get"]["parameters"];
    let names: Vec<&str> = params.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert!(["metric", "bucket", "from", "to", "limit"].iter().all(|n| names.contains(n)), "{names:?}");

    // Durable: the same after a restart.
    dev.disconnect().await;
    mqtt.stop().await;
    grpc.stop().await;
    http.stop().await;
    p.shutdown().await;
    let p = start(dir.path(), None, test_settings()).await;
    let twin = p.twin("g-0").unwrap();
    let all = twin.logs_page(q(None, None, 1_000, None)).await.unwrap();
    assert_eq!(all.lines.len(), 30 + 2 + 3, "every stored line is back");
    assert!(all.next.is_none());

    // An archived twin takes no logs; a deleted one leaves none to a twin re-created
    // with its id.
    let other = p.twin("g-1").unwrap();
    let line = |text: &str| twinfleet::models::LogLine {
        at: Timestamp(now),
        level: LogLevel::Info,
        app: "fw".into(),
        text: text.into(),
    };
    assert_eq!(other.append_logs(vec![line("one")]).await.unwrap(), 1);
    p.delete_twin("g-1").await.unwrap();
    let ty = DeviceTypeId::new("pump").unwrap();
    let again = p.create_twin(&ty, TwinSpec::new(TwinId::new("g-1").unwrap())).await.unwrap();
    assert!(again.logs_page(q(None, None, 10, None)).await.unwrap().lines.is_empty(), "nothing of the old twin");
    twin.command(twinfleet::models::TwinCommand::Archive).await.unwrap();
    assert!(twin.append_logs(vec![line("late")]).await.is_err(), "an archived twin takes no logs");
    p.shutdown().await;
}

#[actix_rt::test]
async fn a_device_types_history_retention_deletes_old_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let clock = virtual_clock();
    let p = start(dir.path(), Some(clock.clone()), test_settings()).await;
    let day = 86_400_000i64;
    let spec = twinfleet::DeviceTypeSpec {
        history: HistoryRetention { max_age_ms: Some(2 * day as u64), max_bytes: None },
        ..twinfleet::DeviceTypeSpec::new(DeviceTypeId::new("logger").unwrap())
    };
    p.create_device_type(spec).await.unwrap();
    let ty = DeviceTypeId::new("logger").unwrap();
    let twin = p.create_twin(&ty, TwinSpec::new(TwinId::new("l-0").unwrap())).await.unwrap();
    let now = twinfleet::Clock::now(&*clock).0;
    let lines: Vec<twinfleet::models::LogLine> = (0..5)
        .map(|d| twinfleet::models::LogLine {
            at: Timestamp(now - d * day - 1),
            level: LogLevel::Info,
            app: "fw".into(),
            text: format!("{d} days ago"),
        })
        .collect();
    twin.append_logs(lines).await.unwrap();
    let report = p.compact_journals().await.unwrap();
    assert_eq!(report.log_lines_deleted, 3, "{report:?}");
    let q = LogQuery { app: None, level: None, from: Timestamp(0), to: Timestamp(now), limit: 100, cursor: None };
    let kept: Vec<String> = twin.logs_page(q).await.unwrap().lines.into_iter().map(|l| l.text).collect();
    assert_eq!(kept, ["0 days ago", "1 days ago"]);
    p.shutdown().await;
}
