//! A credential change takes effect everywhere at once: revoking or re-issuing a
//! device's token, archiving its twin or deleting it ends the device's open sessions on
//! the embedded MQTT gateway and its gRPC streams. And an offline device receives on
//! reconnect exactly the commands its twin still waits for.

use crate::mqtt::{addr, embedded_config};
use crate::support::*;
use serde_json::json;
use std::time::Duration;
use tonic::transport::Channel;
use twinfleet::models::{TwinCommand, TwinId};
use twinfleet::{DeviceCommand, Platform, TwinSpec};
use twinfleet_protocols::mqtt::{MqttDevice, MqttGateway, QoS};
use twinfleet_protocols::{DevicePoint, GrpcDevice, GrpcGateway};

struct Rig {
    p: Platform,
    mqtt: MqttGateway,
    grpc: GrpcGateway,
    ops: String,
    channel: Channel,
}

async fn rig(dir: &std::path::Path) -> Rig {
    let p = start(dir, None, test_settings()).await;
    fleet(&p, "meter", json!({}), "m", 4, |_| vec![]).await;
    let mqtt = MqttGateway::start(p.runtime().clone(), embedded_config()).await.unwrap();
    let grpc = GrpcGateway::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let channel = Channel::from_shared(format!("http://{}", grpc.local_addr())).unwrap().connect().await.unwrap();
    let ops = addr(mqtt.operational());
    Rig { p, mqtt, grpc, ops, channel }
}

/// An MQTT session, a gRPC command stream and a gRPC telemetry stream of device `id`;
/// `change` must end all three, and the old token must open none again.
async fn ends_every_session(r: &Rig, id: &str, what: &str, change: impl AsyncFnOnce(&Platform)) {
    let token = r.p.issue_device_token(id).await.unwrap();
    let dev = MqttDevice::connect(&r.ops, id, &token).await.unwrap();
    let mut grpc = GrpcDevice::on_channel(r.channel.clone(), id, &token);
    let mut commands = grpc.commands().await.unwrap();
    let mut telemetry = grpc.telemetry().await.unwrap();
    telemetry.send(vec![DevicePoint { metric: "t".into(), value: 1.0, at_ms: None }]).await.unwrap();
    eventually("all three sessions are registered", || async {
        (r.p.runtime().sessions().count(id) == 3).then_some(())
    })
    .await;

    change(&r.p).await;

    eventually(&format!("{what}: the MQTT session ends"), || async { (!dev.is_connected()).then_some(()) }).await;
    let ended = tokio::time::timeout(Duration::from_secs(10), commands.message()).await.expect("stream ends");
    assert_eq!(ended.unwrap_err().code(), tonic::Code::Unauthenticated, "{what}: the command stream ends");
    let sent = telemetry.send(vec![DevicePoint { metric: "t".into(), value: 2.0, at_ms: None }]).await;
    assert!(sent.is_err(), "{what}: the telemetry stream ends: {sent:?}");
    assert_eq!(r.p.runtime().sessions().count(id), 0, "{what}: nothing left registered");
    assert!(MqttDevice::connect(&r.ops, id, &token).await.is_err(), "{what}: the old token opens nothing");
    assert!(grpc.report(&obj(json!({"x": 1}))).await.is_err(), "{what}: nor over gRPC");
}

#[actix_rt::test]
async fn revoking_reissuing_archiving_and_deleting_end_the_devices_open_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let r = rig(dir.path()).await;

    ends_every_session(&r, "m-0", "revoke", async |p| p.revoke_device_token("m-0").await.unwrap()).await;
    ends_every_session(&r, "m-1", "re-issue", async |p| drop(p.issue_device_token("m-1").await.unwrap())).await;
    ends_every_session(&r, "m-2", "archive", async |p| {
        p.twin("m-2").unwrap().command(TwinCommand::Archive).await.unwrap();
    })
    .await;
    // An archived twin accepts nothing, whoever asks.
    let archived = r.p.twin("m-2").unwrap();
    assert!(archived.telemetry(vec![]).await.is_err());
    let stored = archived.get().await.unwrap().telemetry_latest.len();

    ends_every_session(&r, "m-3", "delete", async |p| p.delete_twin("m-3").await.unwrap()).await;
    // A twin re-created under the same id is a new device: the old token is not its.
    let ty = twinfleet::models::DeviceTypeId::new("meter").unwrap();
    r.p.create_twin(&ty, TwinSpec::new(TwinId::new("m-3").unwrap())).await.unwrap();
    assert!(r.p.twin("m-3").unwrap().get().await.unwrap().telemetry_latest.is_empty());
    assert_eq!(archived.get().await.unwrap().telemetry_latest.len(), stored);

    r.mqtt.stop().await;
    r.grpc.stop().await;
    r.p.shutdown().await;
}

#[actix_rt::test]
async fn an_offline_device_receives_only_its_pending_commands_when_it_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let r = rig(dir.path()).await;
    let token = r.p.issue_device_token("m-0").await.unwrap();
    let twin = r.p.twin("m-0").unwrap();

    // Answered while online: never sent again.
    let mut dev = MqttDevice::connect(&r.ops, "m-0", &token).await.unwrap();
    let answered = twin.send_to_device(DeviceCommand::SetConfiguration { configuration: obj(json!({"a": 1})) });
    let answered = answered.await.unwrap();
    let got = dev.next_command(Duration::from_secs(10)).await.expect("the online command");
    assert_eq!(got.command_id, answered.to_string());
    dev.ack(&got.command_id, true, "done").await.unwrap();
    eventually("the ack lands", || async { twin.get().await.unwrap().state.commands.pending.is_empty().then_some(()) })
        .await;
    dev.disconnect().await;

    // While offline: an install, two desired states (the second supersedes the first).
    let install =
        DeviceCommand::InstallApp { app: "fw".into(), version: "2.1".into(), artifact_url: "https://x/fw".into() };
    let install = twin.send_to_device(install).await.unwrap();
    twin.set_desired(obj(json!({"rate": 1}))).await.unwrap();
    twin.set_desired(obj(json!({"mode": "eco"}))).await.unwrap();

    // On reconnect: exactly the install and the current desired state.
    let mut dev = MqttDevice::connect(&r.ops, "m-0", &token).await.unwrap();
    let mut got = Vec::new();
    while let Some(c) = dev.next_command(Duration::from_secs(3)).await {
        got.push(c);
    }
    let bodies: Vec<String> = got.iter().map(|c| serde_json::Value::Object(c.body.clone()).to_string()).collect();
    assert_eq!(got.len(), 2, "only what is pending: {bodies:?}");
    assert_eq!(got[0].command_id, install.to_string());
    assert_eq!(got[0].body["install_app"]["version"], json!("2.1"));
    assert_eq!(got[1].body["apply_desired"], json!({"rate": 1, "mode": "eco"}));
    for c in &got {
        dev.ack(&c.command_id, true, "applied").await.unwrap();
    }
    dev.report(json!({"rate": 1, "mode": "eco"})).await.unwrap();
    eventually("everything answered", || async {
        let v = twin.get().await.unwrap();
        (v.state.waits.is_empty() && v.state.commands.pending.is_empty()).then_some(())
    })
    .await;
    dev.disconnect().await;

    // Nothing is left to send.
    let mut dev = MqttDevice::connect(&r.ops, "m-0", &token).await.unwrap();
    assert!(dev.next_command(Duration::from_secs(2)).await.is_none(), "no broker backlog, nothing pending");
    dev.telemetry(QoS::AtLeastOnce, None, &[("t", 1.0)]).await.unwrap();
    dev.disconnect().await;
    r.mqtt.stop().await;
    r.grpc.stop().await;
    r.p.shutdown().await;
}
