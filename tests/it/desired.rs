//! Desired state reconciled per key through the real gateways with device clients: over
//! MQTT (operator writes over HTTP, conditional with `If-Match`) and over gRPC, only the
//! delta reaches the device, each key's state shows in `GET /twins/{id}/delta`, a
//! reconnecting device gets only what is still pending, a refusal fails the keys with
//! the device's reason, and a `clear_on_sync` key leaves the desired state once reported.

use crate::mqtt::{addr, embedded_config};
use crate::support::*;
use serde_json::{Value, json};
use std::time::Duration;
use twinfleet::models::TwinCommand;
use twinfleet_protocols::device_client::desired_of;
use twinfleet_protocols::mqtt::{MqttDevice, MqttGateway};
use twinfleet_protocols::{GrpcDevice, GrpcGateway, HttpApi};

/// Each desired key's state as `GET /delta` shows it.
fn key_states(delta: &Value) -> Vec<(String, String)> {
    delta["keys"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v["state"].as_str().unwrap().to_string()))
        .collect()
}

#[actix_rt::test]
async fn desired_state_round_trips_over_mqtt_as_deltas_and_a_reconnecting_device_gets_only_what_is_pending() {
    let dir = tempfile::tempdir().unwrap();
    // The virtual clock stands still: no retry interferes; what the device gets comes
    // from the writes and its reconnect.
    let p = start(dir.path(), Some(virtual_clock()), test_settings()).await;
    fleet(&p, "meter", json!({}), "m", 1, |_| vec![]).await;
    let token = p.issue_device_token("m-0").await.unwrap();
    let admin = admin_token(&p).await;
    let gw = MqttGateway::start(p.runtime().clone(), embedded_config()).await.unwrap();
    let ops = addr(gw.operational());
    let api = HttpApi::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap(), 1).unwrap();
    let http = api.local_addr();
    let call = |method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>| {
        http_full(http, Some(&admin), method, path, headers, body)
    };
    let twin = p.twin("m-0").unwrap();

    let mut device = MqttDevice::connect(&ops, "m-0", &token).await.unwrap();
    device.report(json!({"rate": 1, "net": {"ssid": "lab", "ch": 1}})).await.unwrap();
    eventually("the report arrives", || async { (!twin.get().await.unwrap().state.reported.is_empty()).then_some(()) })
        .await;

    // A conditional write at the version the twin shows.
    let (status, delta, headers) = call("GET", "/api/v1/twins/m-0/delta", &[], None);
    assert_eq!(status, 200, "{delta}");
    assert_eq!((delta["in_sync"].as_bool(), delta["delta"].clone()), (Some(true), json!({})));
    let version = headers["etag"].clone();
    assert_eq!(version, format!("\"{}\"", delta["version"]));
    let want = r#"{"rate": 1, "net": {"ch": 6}, "mode": "eco"}"#;
    let (status, body, headers) = call("PATCH", "/api/v1/twins/m-0/desired", &[("If-Match", &version)], Some(want));
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["etag"], format!("\"{}\"", body["seq"]));
    // The same version again is stale now: 412, and nothing changes.
    let (status, body, _) =
        call("PATCH", "/api/v1/twins/m-0/desired", &[("If-Match", &version)], Some(r#"{"rate": 2}"#));
    assert_eq!((status, body["error"].as_str()), (412, Some("version_mismatch")), "{body}");
    let (status, _, _) = call("PATCH", "/api/v1/twins/m-0/desired", &[("If-Match", "yesterday")], Some("{}"));
    assert_eq!(status, 400);

    // Only what the device lacks is sent: not `rate`, not the network's ssid.
    let cmd = device.next_command(Duration::from_secs(10)).await.expect("a command over MQTT");
    assert_eq!(cmd.body["apply_desired"], json!({"net": {"ch": 6}, "mode": "eco"}));
    let (_, delta, _) = call("GET", "/api/v1/twins/m-0/delta", &[], None);
    assert_eq!(
        key_states(&delta),
        [("mode".into(), "pending".into()), ("net".into(), "pending".into()), ("rate".into(), "in_sync".into())]
    );
    assert_eq!(delta["keys"]["mode"]["attempt"], 0);
    assert!(delta["keys"]["mode"]["deadline"].is_i64());

    // The device applies part of it and goes away; a write lands while it is offline.
    device.report(json!({"mode": "eco"})).await.unwrap();
    eventually("the partial report arrives", || async {
        (twin.get().await.unwrap().state.reported.get("mode") == Some(&json!("eco"))).then_some(())
    })
    .await;
    device.disconnect().await;
    let (status, _, _) = call("PATCH", "/api/v1/twins/m-0/desired", &[], Some(r#"{"led": "on"}"#));
    assert_eq!(status, 200);

    // Reconnected, it gets what is still pending, and nothing it already has.
    let mut device = MqttDevice::connect(&ops, "m-0", &token).await.unwrap();
    let cmd = device.next_command(Duration::from_secs(10)).await.expect("the pending delta on reconnect");
    assert_eq!(cmd.body["apply_desired"], json!({"net": {"ch": 6}, "led": "on"}));

    // It refuses: the keys it lacks fail with its reason; reporting one settles it.
    device.ack(&cmd.command_id, false, "channel 6 is not allowed here").await.unwrap();
    let delta = eventually("the refusal shows", || async {
        let (_, d, _) = call("GET", "/api/v1/twins/m-0/delta", &[], None);
        (d["keys"]["net"]["state"] == "failed").then_some(d)
    })
    .await;
    assert_eq!(delta["keys"]["net"]["reason"], "channel 6 is not allowed here");
    assert_eq!(delta["keys"]["led"]["state"], "failed");
    device.report(json!({"led": "on"})).await.unwrap();
    eventually("the reported key settles", || async {
        let (_, d, _) = call("GET", "/api/v1/twins/m-0/delta", &[], None);
        (d["keys"]["led"]["state"] == "in_sync").then_some(())
    })
    .await;

    // A one-shot key: sent alone (the failed key is not sent again unless written),
    // and gone from the desired state once the device reports it.
    let (status, _, _) =
        call("PATCH", "/api/v1/twins/m-0/desired?clear_on_sync=true", &[], Some(r#"{"reboot": true}"#));
    assert_eq!(status, 200);
    let cmd = device.next_command(Duration::from_secs(10)).await.expect("the one-shot key");
    assert_eq!(cmd.body["apply_desired"], json!({"reboot": true}));
    let (_, delta, _) = call("GET", "/api/v1/twins/m-0/delta", &[], None);
    assert_eq!(delta["keys"]["reboot"]["clear_on_sync"], true);
    device.report(json!({"reboot": true})).await.unwrap();
    eventually("the one-shot key leaves the desired state", || async {
        (!twin.get().await.unwrap().state.desired.contains_key("reboot")).then_some(())
    })
    .await;
    let (_, delta, _) = call("GET", "/api/v1/twins/m-0/delta", &[], None);
    assert_eq!(delta["delta"], json!({"net": {"ch": 6}}), "only the refused key is missing");
    assert_eq!(delta["keys"]["net"]["state"], "failed");

    device.disconnect().await;
    gw.stop().await;
    api.stop().await;
    p.shutdown().await;
}

#[actix_rt::test]
async fn desired_state_round_trips_over_grpc_as_deltas_and_a_reconnecting_stream_gets_only_what_is_pending() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), Some(virtual_clock()), test_settings()).await;
    fleet(&p, "pump", json!({}), "g", 1, |_| vec![]).await;
    let token = p.issue_device_token("g-0").await.unwrap();
    let gw = GrpcGateway::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", gw.local_addr())).unwrap().connect().await.unwrap();
    let mut device = GrpcDevice::on_channel(channel.clone(), "g-0", &token);
    let twin = p.twin("g-0").unwrap();
    device.report(&obj(json!({"speed": 3, "valve": {"open": false, "limit": 10}}))).await.unwrap();

    let mut commands = device.commands().await.unwrap();
    eventually("the command stream is registered", || async { (gw.connected_devices() == 1).then_some(()) }).await;
    let write = |patch: Value| TwinCommand::WriteDesired { patch: obj(patch), if_version: None, clear_on_sync: false };
    twin.command(write(json!({"speed": 3, "valve": {"open": true, "limit": 10}}))).await.unwrap();
    let cmd = commands.message().await.unwrap().expect("a command");
    assert_eq!(desired_of(&cmd), Some(obj(json!({"valve": {"open": true}}))), "only the delta");
    device.ack(&cmd.command_id, true, "").await.unwrap();

    // The stream goes away; two writes land, one of which the device reports meanwhile
    // (over a unary call).
    drop(commands);
    eventually("the stream is gone", || async { (gw.connected_devices() == 0).then_some(()) }).await;
    twin.command(write(json!({"mode": "boost", "speed": 5}))).await.unwrap();
    device.report(&obj(json!({"speed": 5}))).await.unwrap();

    let mut commands = device.commands().await.unwrap();
    let cmd = commands.message().await.unwrap().expect("the pending delta on reconnect");
    assert_eq!(desired_of(&cmd), Some(obj(json!({"valve": {"open": true}, "mode": "boost"}))));
    device.report(&obj(json!({"valve": {"open": true}, "mode": "boost"}))).await.unwrap();
    let view = twin.get().await.unwrap();
    assert!(view.in_sync && view.state.delta().is_empty());
    assert!(view.state.desired_status().values().all(|k| k.state == twinfleet::models::desired::KeyState::InSync));
    drop(commands);
    gw.stop().await;
    p.shutdown().await;
}

#[actix_rt::test]
async fn a_template_fills_per_twin_and_a_dta_layer_change_re_renders_only_the_difference() {
    use twinfleet::DtaSpec;
    use twinfleet::models::ConfigLayer;
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), Some(virtual_clock()), test_settings()).await;
    let mut layers = std::collections::BTreeMap::new();
    layers.insert(
        "site".to_string(),
        ConfigLayer { priority: 10, values: obj(json!({"site": "berlin", "limits": {"max": 80}})) },
    );
    p.create_dta(DtaSpec { id: did("berlin"), name: "Berlin".into(), parents: vec![], layers }).await.unwrap();
    let defaults = json!({"site": "default-site", "limits": {"max": 50}});
    fleet(&p, "valve", defaults, "v", 2, |i| if i == 0 { vec![did("berlin")] } else { vec![] }).await;
    let token = p.issue_device_token("v-0").await.unwrap();
    let admin = admin_token(&p).await;
    let gw = MqttGateway::start(p.runtime().clone(), embedded_config()).await.unwrap();
    let api = HttpApi::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap(), 1).unwrap();
    let http = api.local_addr();
    let mut device = MqttDevice::connect(&addr(gw.operational()), "v-0", &token).await.unwrap();

    // A template with a placeholder it cannot know is refused, naming it.
    let bad = r#"{"body": {"key": "{{ secrets.key }}"}}"#;
    let (status, body) = http_as(http, &admin, "POST", "/api/v1/device-types/valve/templates", Some(bad));
    assert_eq!((status, body["error"].as_str()), (422, Some("invalid_template")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("secrets.key"), "{body}");
    // So is a body that is not an object (a null one would delete the key it fills).
    let (status, body) = http_as(
        http,
        &admin,
        "POST",
        "/api/v1/device-types/valve/templates",
        Some(r#"{"body": null, "target": null}"#),
    );
    assert_eq!((status, body["error"].as_str()), (422, Some("invalid_template")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("must be a JSON object, not null"), "{body}");

    let template = json!({"comment": "first", "body": {
        "site": "{{ config.site }}",
        "max": "{{ config.limits.max }}",
        "name": "{{ twin.id }}/{{ identity.serial }}",
        "broker": "mqtt://{{ config.gateway | \"gw-1\" }}:8883",
    }});
    let (status, t) =
        http_as(http, &admin, "POST", "/api/v1/device-types/valve/templates", Some(&template.to_string()));
    assert_eq!((status, t["version"].as_u64(), t["target"].as_str()), (201, Some(1), Some("config")), "{t}");
    let (status, applied) = http_as(http, &admin, "POST", "/api/v1/device-types/valve/templates/1/apply", None);
    assert_eq!((status, applied["twins"].as_u64()), (200, Some(2)), "{applied}");

    // Each twin fills it from its own identity and layers; the device gets it.
    let cmd = device.next_command(Duration::from_secs(10)).await.expect("the rendered configuration");
    let rendered = json!({"site": "berlin", "max": 80, "name": "v-0/SN00000000", "broker": "mqtt://gw-1:8883"});
    assert_eq!(cmd.body["apply_desired"], json!({"config": rendered}));
    let other = eventually("v-1 fills it too", || async {
        let v = p.twin("v-1").unwrap().get().await.unwrap();
        v.state.desired.get("config").cloned()
    })
    .await;
    assert_eq!(
        other,
        json!({"site": "default-site", "max": 50, "name": "v-1/SN00000001", "broker": "mqtt://gw-1:8883"})
    );
    device.report(json!({"config": rendered})).await.unwrap();
    let twin = p.twin("v-0").unwrap();
    eventually("v-0 is in sync", || async { twin.get().await.unwrap().in_sync.then_some(()) }).await;
    let (_, view) = http_as(http, &admin, "GET", "/api/v1/twins/v-0", None);
    assert_eq!(view["templates"]["config"]["version"], 1, "{view}");
    assert_eq!(view["templates"]["config"]["values"]["config.site"], "berlin");
    assert_eq!(view["templates"]["config"]["values"]["config.gateway"], "gw-1", "a default used is recorded");

    // The group's layer changes: its member re-renders and the device gets only the
    // difference; the twin outside the group keeps its configuration.
    let layer = ConfigLayer { priority: 10, values: obj(json!({"site": "berlin", "limits": {"max": 90}})) };
    p.dta("berlin").unwrap().set_layer("site", layer).await.unwrap();
    let cmd = device.next_command(Duration::from_secs(10)).await.expect("the re-rendered difference");
    assert_eq!(cmd.body["apply_desired"], json!({"config": {"max": 90}}));
    let (_, view) = http_as(http, &admin, "GET", "/api/v1/twins/v-0", None);
    assert_eq!(view["desired"]["config"]["max"], 90);
    assert_eq!(view["templates"]["config"]["values"]["config.limits.max"], 90);
    let v1 = p.twin("v-1").unwrap().get().await.unwrap();
    assert_eq!(v1.state.desired["config"]["max"], 50);
    let (_, list) = http_as(http, &admin, "GET", "/api/v1/device-types/valve/templates", None);
    assert_eq!((list["applied"].as_u64(), list["versions"].as_array().map(Vec::len)), (Some(1), Some(1)), "{list}");

    device.disconnect().await;
    gw.stop().await;
    api.stop().await;
    p.shutdown().await;
}
