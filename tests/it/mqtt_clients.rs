//! Third-party MQTT clients against the embedded gateway: paho-mqtt (3.1.1 and 5) and
//! Mosquitto's `mosquitto_pub`/`mosquitto_sub` (3.1.1 and 5) send telemetry and state,
//! receive their twin's command and acknowledge it. Needs `python3` with `paho-mqtt` and
//! `mosquitto-clients` (`.ci/run` installs them); without them a test says so loudly and
//! skips, except under CI, where it fails.

use crate::mqtt::{addr, embedded_config};
use crate::support::*;
use serde_json::{Value, json};
use std::process::{Command, Stdio};
use twinfleet::models::EventKind;
use twinfleet::{Platform, TwinHandle};
use twinfleet_protocols::mqtt::MqttGateway;

fn have(what: &str, ok: bool, install: &str) -> bool {
    if !ok {
        assert!(std::env::var_os("CI").is_none(), "CI must install {what} (see .ci/run)");
        eprintln!("\n*** SKIPPED: {what} not found ({install}) ***\n");
    }
    ok
}

async fn setup(dir: &std::path::Path) -> (Platform, MqttGateway, String) {
    let p = start(dir, None, test_settings()).await;
    fleet(&p, "meter", json!({}), "c", 4, |_| vec![]).await;
    let gw = MqttGateway::start(p.runtime().clone(), embedded_config()).await.unwrap();
    let ops = addr(gw.operational());
    (p, gw, ops)
}

async fn acked(twin: &TwinHandle, id: &str, message: &str) {
    eventually(&format!("the ack of command {id} lands"), || async {
        twin.events(10)
            .await
            .unwrap()
            .iter()
            .any(|e| matches!(&e.kind, EventKind::CommandAcked { command_id, message: m, .. } if command_id == id && m == message))
            .then_some(())
    })
    .await;
}

#[actix_rt::test]
async fn paho_mqtt_devices_of_both_protocol_versions_work_end_to_end() {
    let paho = Command::new("python3").args(["-c", "import paho.mqtt"]).output().is_ok_and(|o| o.status.success());
    if !have("python3 with paho-mqtt", paho, "pip install paho-mqtt") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (p, gw, ops) = setup(dir.path()).await;
    let (host, port) = ops.rsplit_once(':').unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/mqtt_device.py");
    for (device, protocol) in [("c-0", "3"), ("c-1", "5")] {
        let token = p.issue_device_token(device).await.unwrap();
        let child = Command::new("python3")
            .arg(&script)
            .args([host, port, device, &token, protocol, "20"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let twin = p.twin(device).unwrap();
        eventually(&format!("paho {protocol}: the state report lands"), || async {
            (twin.get().await.unwrap().state.reported.get("client") == Some(&json!("paho"))).then_some(())
        })
        .await;
        let v = twin.get().await.unwrap();
        assert_eq!(v.telemetry_latest["temp"].value, 39.0, "paho {protocol}: all 20 points, in order");
        twin.set_desired(obj(json!({"rate": 7}))).await.unwrap();
        let out = actix_rt::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "paho {protocol} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        let last: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(last["command"]["apply_desired"], json!({"rate": 7}), "{stdout}");
        acked(&twin, last["acked"].as_str().unwrap(), "applied by paho").await;
    }
    gw.stop().await;
    p.shutdown().await;
}

#[actix_rt::test]
async fn mosquitto_pub_and_sub_devices_of_both_protocol_versions_work_end_to_end() {
    // `--help` exits with 1; that it runs at all is the probe.
    let clients = Command::new("mosquitto_sub").arg("--help").output().is_ok();
    if !have("mosquitto-clients", clients, "apt-get install mosquitto-clients") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (p, gw, ops) = setup(dir.path()).await;
    let (host, port) = ops.rsplit_once(':').unwrap();
    for (device, version) in [("c-2", "mqttv311"), ("c-3", "mqttv5")] {
        let token = p.issue_device_token(device).await.unwrap();
        let client = |tool: &str| {
            let mut c = Command::new(tool);
            c.args(["-h", host, "-p", port, "-i", device, "-u", device, "-P", &token, "-V", version, "-q", "1"]);
            c
        };
        let publish = |topic: &str, message: &str| {
            let out =
                client("mosquitto_pub").args(["-t", &format!("devices/{device}/{topic}"), "-m", message]).output();
            let out = out.unwrap();
            assert!(out.status.success(), "mosquitto_pub {version}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let twin = p.twin(device).unwrap();
        publish("telemetry", r#"{"values": {"temp": 21.5}}"#);
        publish("state", r#"{"client": "mosquitto"}"#);
        let v = twin.get().await.unwrap();
        assert_eq!(v.state.reported.get("client"), Some(&json!("mosquitto")), "{version}: acknowledged = stored");
        assert_eq!(v.telemetry_latest["temp"].value, 21.5);

        // A command set while the device is away arrives when it subscribes.
        twin.set_desired(obj(json!({"mode": version}))).await.unwrap();
        let topic = format!("devices/{device}/commands");
        let out = client("mosquitto_sub").args(["-t", &topic, "-C", "1", "-W", "10"]).output().unwrap();
        assert!(out.status.success(), "mosquitto_sub {version}: {}", String::from_utf8_lossy(&out.stderr));
        let cmd: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(cmd["apply_desired"], json!({"mode": version}));
        let id = cmd["command_id"].as_str().unwrap();
        publish("acks", &json!({"command_id": id, "success": true, "message": "mosquitto"}).to_string());
        acked(&twin, id, "mosquitto").await;

        // Another device's topic closes the connection and changes nothing: the gateway
        // counts the refusal before anything could reach a twin.
        let refused = p.rejections().count("wrong_device");
        let out = client("mosquitto_pub").args(["-t", "devices/c-0/state", "-m", r#"{"owned": true}"#]).output();
        let _ = out.unwrap();
        eventually(&format!("{version}: the foreign topic is refused"), || async {
            (p.rejections().count("wrong_device") == refused + 1).then_some(())
        })
        .await;
        assert!(!p.twin("c-0").unwrap().get().await.unwrap().state.reported.contains_key("owned"));
    }
    gw.stop().await;
    p.shutdown().await;
}
