//! MQTT on the embedded gateway (twinfleet serves the sessions) with rumqttc devices
//! over loopback: state, telemetry, commands and acks, provisioning, and every kind of
//! bad input, including a device trying to speak as another.

use crate::support::*;
use serde_json::json;
use std::time::Duration;
use twinfleet::models::EventKind;
use twinfleet::{DeviceCommand, Platform};
use twinfleet_protocols::HttpApi;
use twinfleet_protocols::mqtt::{Endpoint, MqttConfig, MqttDevice, MqttGateway, QoS};

pub fn embedded_config() -> MqttConfig {
    MqttConfig {
        operational: "127.0.0.1:0".parse().unwrap(),
        provisioning: "127.0.0.1:0".parse().unwrap(),
        max_payload: 64 * 1024,
        ..MqttConfig::default()
    }
}

pub fn addr(ep: &Endpoint) -> String {
    match ep {
        Endpoint::Listen(a) => a.to_string(),
        Endpoint::Broker(b) => format!("{}:{}", b.host, b.port),
    }
}

async fn setup(dir: &std::path::Path) -> (Platform, MqttGateway, String, String, String) {
    let p = start(dir, None, test_settings()).await;
    fleet(&p, "meter", json!({}), "m", 3, |_| vec![]).await;
    let t0 = p.issue_device_token("m-0").await.unwrap();
    let t1 = p.issue_device_token("m-1").await.unwrap();
    let gw = MqttGateway::start(p.runtime().clone(), embedded_config()).await.unwrap();
    let ops = addr(gw.operational());
    (p, gw, ops, t0, t1)
}

#[actix_rt::test]
async fn a_device_over_mqtt_changes_its_twin_and_answers_its_commands() {
    let dir = tempfile::tempdir().unwrap();
    let (p, gw, ops, t0, _) = setup(dir.path()).await;
    let mut device = MqttDevice::connect(&ops, "m-0", &t0).await.unwrap();
    let twin = p.twin("m-0").unwrap();

    device.report(json!({"fw": "2.0", "rate": 1})).await.unwrap();
    eventually("the reported state arrives", || async {
        (twin.get().await.unwrap().state.reported == obj(json!({"fw": "2.0", "rate": 1}))).then_some(())
    })
    .await;

    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        device.telemetry(qos, None, &[("temp", 20.5), ("hum", 41.0)]).await.unwrap();
    }
    eventually("telemetry arrives", || async {
        let v = twin.get().await.unwrap();
        (v.telemetry_latest.get("hum").map(|p| p.value) == Some(41.0)).then_some(())
    })
    .await;

    // The twin's desired state reaches the device as a command; its ack comes back.
    twin.set_desired(obj(json!({"rate": 5}))).await.unwrap();
    let cmd = device.next_command(Duration::from_secs(10)).await.expect("a command over MQTT");
    assert_eq!(cmd.body.get("apply_desired"), Some(&json!({"rate": 5})));
    device.ack(&cmd.command_id, true, "applied").await.unwrap();
    device.report(json!({"rate": 5})).await.unwrap();
    eventually("the ack and the report reach the twin", || async {
        let events = twin.events(20).await.unwrap();
        let acked = events.iter().any(|e| {
            matches!(&e.kind, EventKind::CommandAcked { command_id, success: true, .. } if *command_id == cmd.command_id)
        });
        (acked && twin.get().await.unwrap().in_sync).then_some(())
    })
    .await;
    assert_eq!(p.rejections().snapshot().iter().map(|(_, n)| n).sum::<u64>(), 0, "nothing was rejected");

    // Operator commands take the same way: install an app, set a configuration.
    let install = DeviceCommand::InstallApp {
        app: "flow-ctl".into(),
        version: "1.4.0".into(),
        artifact_url: "https://repo.example/flow-ctl-1.4.0.bin".into(),
    };
    let id = twin.send_to_device(install).await.unwrap();
    let cmd = device.next_command(Duration::from_secs(10)).await.expect("install_app over MQTT");
    assert_eq!(cmd.command_id, id.to_string());
    assert_eq!(cmd.body["install_app"]["version"], json!("1.4.0"));
    let set = DeviceCommand::SetConfiguration { configuration: obj(json!({"period_s": 10})) };
    let id2 = twin.send_to_device(set).await.unwrap();
    assert_eq!(id2.0, id.0 + 1, "ids are monotonic per twin");
    let cmd = device.next_command(Duration::from_secs(10)).await.expect("set_configuration over MQTT");
    assert_eq!(cmd.body["set_configuration"], json!({"period_s": 10}));

    device.disconnect().await;
    gw.stop().await;
    p.shutdown().await;
}

#[actix_rt::test]
async fn an_ack_after_a_restart_matches_its_command_and_unmatched_acks_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (p, gw, ops, t0, _) = setup(dir.path()).await;
    let mut device = MqttDevice::connect(&ops, "m-0", &t0).await.unwrap();
    p.twin("m-0").unwrap().set_desired(obj(json!({"rate": 9}))).await.unwrap();
    let cmd = device.next_command(Duration::from_secs(10)).await.expect("a command over MQTT");
    device.disconnect().await;
    gw.stop().await;
    p.shutdown().await;

    let p = start(dir.path(), None, test_settings()).await;
    let gw = MqttGateway::start(p.runtime().clone(), embedded_config()).await.unwrap();
    let ops = addr(gw.operational());
    let device = MqttDevice::connect(&ops, "m-0", &t0).await.unwrap();
    device.ack(&cmd.command_id, true, "applied before the restart").await.unwrap();
    let twin = p.twin("m-0").unwrap();
    eventually("the ack matches the command sent before the restart", || async {
        twin.events(5)
            .await
            .unwrap()
            .into_iter()
            .any(|e| matches!(&e.kind, EventKind::CommandAcked { command_id, .. } if *command_id == cmd.command_id))
            .then_some(())
    })
    .await;
    let before = twin.get().await.unwrap().state.last_seq;
    device.ack(&cmd.command_id, true, "a duplicate").await.unwrap();
    device.ack("12345", true, "never sent").await.unwrap();
    let r = &p.rejections();
    eventually("unmatched acks are counted", || async {
        (r.count("stale_ack") == 1 && r.count("unknown_ack") == 1).then_some(())
    })
    .await;
    assert!(device.is_connected(), "an unmatched ack is not a reason to disconnect");
    assert_eq!(twin.get().await.unwrap().state.last_seq, before, "nothing was journalled");
    device.disconnect().await;
    gw.stop().await;
    p.shutdown().await;
}

#[actix_rt::test]
async fn bad_mqtt_input_is_rejected_counted_and_never_reaches_a_twin() {
    let dir = tempfile::tempdir().unwrap();
    let (p, gw, ops, t0, t1) = setup(dir.path()).await;
    let r = &p.rejections();
    let (m0, m1) = (p.twin("m-0").unwrap(), p.twin("m-1").unwrap());

    // Who may connect: the wrong token, an unknown device, another device's token, a
    // client id that is not the username.
    assert!(MqttDevice::connect(&ops, "m-0", "tfd_wrong").await.is_err());
    assert!(MqttDevice::connect(&ops, "ghost", &t0).await.is_err());
    assert!(MqttDevice::connect(&ops, "m-0", &t1).await.is_err());
    assert!(MqttDevice::connect_with(&ops, "m-1", "m-0", &t0, 8).await.is_err());
    assert_eq!((r.count("bad_credentials"), r.count("unknown_device")), (3, 1));

    // A device cannot publish as another device: the front closes the connection and
    // the message never reaches the broker.
    let dev = MqttDevice::connect(&ops, "m-0", &t0).await.unwrap();
    dev.publish_raw("devices/m-1/state", QoS::AtLeastOnce, br#"{"owned": true}"#.to_vec()).await.unwrap();
    eventually("the impostor is disconnected", || async { (!dev.is_connected()).then_some(()) }).await;
    assert_eq!(r.count("wrong_device"), 1);

    // Nor listen to another device's commands.
    let listener = MqttDevice::connect(&ops, "m-0", &t0).await.unwrap();
    listener.subscribe_raw("devices/+/commands").await.unwrap();
    eventually("the eavesdropper is disconnected", || async { (!listener.is_connected()).then_some(()) }).await;
    assert_eq!(r.count("wrong_device"), 2);

    // Bad payloads on its own topics: each counted, the connection stays, nothing lands.
    let dev = MqttDevice::connect(&ops, "m-0", &t0).await.unwrap();
    let future = p.now().0 + 3_600_000;
    let bad: [(&str, Vec<u8>, &str); 7] = [
        ("devices/m-0/state", b"{not json".to_vec(), "malformed"),
        ("devices/m-0/state", b"[1, 2]".to_vec(), "malformed"),
        ("devices/m-0/telemetry", br#"{"values": {"t": "hot"}}"#.to_vec(), "wrong_type"),
        ("devices/m-0/telemetry", br#"{"values": {"t": "NaN"}}"#.to_vec(), "wrong_type"),
        ("devices/m-0/telemetry", br#"{"valeus": {"t": 1}}"#.to_vec(), "malformed"),
        (
            "devices/m-0/telemetry",
            format!(r#"{{"ts": {future}, "values": {{"t": 1}}}}"#).into_bytes(),
            "future_timestamp",
        ),
        ("devices/m-0/acks", br#"{"command_id": ""}"#.to_vec(), "malformed"),
    ];
    for (topic, payload, _) in &bad {
        dev.publish_raw(topic, QoS::AtLeastOnce, payload.clone()).await.unwrap();
    }
    // Then a good one. (The broker keeps one log per subscription filter, so messages
    // on different topics may be handled in any order: wait for the counts.)
    dev.report(json!({"ok": true})).await.unwrap();
    eventually("every bad message counted", || async {
        let counts = (r.count("malformed"), r.count("wrong_type"), r.count("future_timestamp"));
        (counts == (4, 2, 1)).then_some(())
    })
    .await;
    eventually("the good report lands", || async {
        (m0.get().await.unwrap().state.reported == obj(json!({"ok": true}))).then_some(())
    })
    .await;
    assert!(dev.is_connected(), "bad payloads on its own topics do not cost the device its connection");
    assert!(m0.get().await.unwrap().telemetry_latest.is_empty(), "no rejected point was stored");

    // An oversized message: counted, connection closed, nothing stored.
    dev.publish_raw("devices/m-0/state", QoS::AtLeastOnce, vec![b' '; 100 * 1024]).await.unwrap();
    eventually("the oversized sender is disconnected", || async { (!dev.is_connected()).then_some(()) }).await;
    assert_eq!(r.count("oversized"), 1);

    // The gateway still serves, and m-1 was never touched.
    let dev = MqttDevice::connect(&ops, "m-0", &t0).await.unwrap();
    dev.report(json!({"after": 1})).await.unwrap();
    eventually("the gateway still serves", || async {
        m0.get().await.unwrap().state.reported.contains_key("after").then_some(())
    })
    .await;
    assert!(m1.get().await.unwrap().state.reported.is_empty(), "m-1 was never written");

    // Every reason is a counter in /metrics.
    let http = HttpApi::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap(), 1).unwrap();
    let addr = http.local_addr();
    let (status, body) = actix_rt::task::spawn_blocking(move || http_get(addr, "/metrics")).await.unwrap();
    let text = body.as_str().unwrap_or_default().to_string();
    assert_eq!(status, 200);
    for line in [
        r#"twinfleet_rejected_total{reason="wrong_device"} 2"#,
        r#"twinfleet_rejected_total{reason="malformed"} 4"#,
        r#"twinfleet_rejected_total{reason="oversized"} 1"#,
        r#"twinfleet_rejected_total{reason="unknown_device"} 1"#,
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in /metrics:\n{text}");
    }
    // The open sessions and the series store are there too.
    for family in ["twinfleet_device_sessions ", "twinfleet_series_points_total ", "twinfleet_series_commits_total "] {
        assert!(text.lines().any(|l| l.starts_with(family)), "{family} not in /metrics:\n{text}");
    }
    http.stop().await;
    gw.stop().await;
    p.shutdown().await;
}

/// Sends `bytes` on a fresh connection and returns what the gateway answers before it
/// closes (or within 3 s).
async fn raw(ops: &str, bytes: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(ops).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut got)).await;
    got
}

/// A CONNECT of protocol `level` for `id` with password `token` (`flags` added).
fn connect_packet(level: u8, id: &str, token: &str, extra_flags: u8) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, 0b1100_0010 | extra_flags, 0, 30];
    if level == 5 {
        body.push(0); // no properties
    }
    for field in [id, id, token] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field.as_bytes());
    }
    let mut p = vec![0x10, body.len() as u8];
    p.extend(body);
    p
}

#[actix_rt::test]
async fn the_gateway_speaks_mqtt_3_and_5_and_closes_only_bad_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (p, gw, ops, t0, _) = setup(dir.path()).await;
    let r = &p.rejections();
    // A half-sent CONNECT holds nobody up.
    let mut half = tokio::net::TcpStream::connect(&ops).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut half, &connect_packet(4, "m-0", &t0, 0)[..7]).await.unwrap();

    // MQTT 3.1.1 and 5 both get a CONNACK (5: with its properties) that accepts.
    let v4 = raw(&ops, &connect_packet(4, "m-0", &t0, 0)).await;
    assert_eq!(&v4[..4], &[0x20, 0x02, 0x00, 0x00], "3.1.1 CONNACK accepts: {v4:?}");
    let v5 = raw(&ops, &connect_packet(5, "m-0", &t0, 0)).await;
    assert_eq!((v5[0], v5[3]), (0x20, 0x00), "5 CONNACK accepts: {v5:?}");
    // MQTT 5 with a wrong token: refused with 5's own code (0x87 not authorized).
    let bad = raw(&ops, &connect_packet(5, "m-0", "tfd_wrong", 0)).await;
    assert_eq!((bad[0], bad[3]), (0x20, 0x87), "{bad:?}");
    // Protocol level 3 (MQTT 3.1): return code 0x01, then closed.
    assert_eq!(raw(&ops, &connect_packet(3, "m-0", &t0, 0)).await, vec![0x20, 0x02, 0x00, 0x01]);
    assert_eq!(r.count("unsupported_protocol"), 1);
    // The reserved flag bit: closed without a CONNACK.
    assert!(raw(&ops, &connect_packet(4, "m-0", &t0, 1)).await.is_empty());
    // A PUBLISH before CONNECT, and a remaining length of ~256 MB: closed, counted.
    assert!(raw(&ops, &[0x30, 0x05, 0x00, 0x01, b'x', b'{', b'}']).await.is_empty());
    assert!(raw(&ops, &[0x10, 0xFF, 0xFF, 0xFF, 0x7F]).await.is_empty());
    assert_eq!((r.count("malformed"), r.count("oversized")), (2, 1));

    // Meanwhile a real device works, and the twin never saw any of it.
    let dev = MqttDevice::connect(&ops, "m-0", &t0).await.unwrap();
    dev.report(json!({"fine": true})).await.unwrap();
    let twin = p.twin("m-0").unwrap();
    eventually("the good device is served", || async {
        twin.get().await.unwrap().state.reported.contains_key("fine").then_some(())
    })
    .await;
    drop(half);
    gw.stop().await;
    p.shutdown().await;
}

#[actix_rt::test]
async fn keep_alive_closes_a_silent_device_and_spares_one_that_pings() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let (p, gw, ops, t0, t1) = setup(dir.path()).await;
    // Keep-alive 1 s: the gateway waits 1.5 s for the next packet.
    let hello = |id: &str, token: &str| {
        let mut c = connect_packet(4, id, token, 0);
        c[10..12].copy_from_slice(&1u16.to_be_bytes());
        c
    };
    let mut silent = tokio::net::TcpStream::connect(&ops).await.unwrap();
    let mut pinging = tokio::net::TcpStream::connect(&ops).await.unwrap();
    silent.write_all(&hello("m-0", &t0)).await.unwrap();
    pinging.write_all(&hello("m-1", &t1)).await.unwrap();
    let mut ack = [0u8; 4];
    silent.read_exact(&mut ack).await.unwrap();
    pinging.read_exact(&mut ack).await.unwrap();
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    let start = std::time::Instant::now();
    let pings = async {
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            pinging.write_all(&[0xC0, 0x00]).await.unwrap();
            let mut resp = [0u8; 2];
            pinging.read_exact(&mut resp).await.expect("a device that pings stays connected");
            assert_eq!(resp, [0xD0, 0x00]);
        }
    };
    let closed = async {
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest)).await;
        assert!(matches!(n, Ok(Ok(0))), "the silent device is closed without a word (3.1.1): {n:?} {rest:?}");
        start.elapsed()
    };
    let ((), silent_for) = tokio::join!(pings, closed);
    assert!(
        silent_for >= Duration::from_millis(1_400) && silent_for < Duration::from_secs(3),
        "closed after {silent_for:?} of silence (keep-alive 1 s: 1.5 s)"
    );
    gw.stop().await;
    p.shutdown().await;
}

#[actix_rt::test]
async fn a_device_provisions_itself_with_its_types_claim_token() {
    let dir = tempfile::tempdir().unwrap();
    let (p, gw, ops, _, _) = setup(dir.path()).await;
    let prov = addr(gw.provisioning());
    let claim = p.issue_claim_token("meter").await.unwrap();
    assert!(claim.starts_with(twinfleet::CLAIM_PREFIX));

    // A wrong claim token is refused at the door.
    assert!(MqttDevice::provision(&prov, "meter", "m-new", "tfc_wrong", json!({})).await.is_err());

    let resp = MqttDevice::provision(&prov, "meter", "m-new", &claim, json!({"location": "hall 3"})).await.unwrap();
    assert!(resp.ok, "{resp:?}");
    assert_eq!(resp.operational.as_deref(), Some(format!("mqtt://{ops}").as_str()));
    let token = resp.token.unwrap();
    let twin = p.twin("m-new").unwrap();
    assert_eq!(twin.get().await.unwrap().state.metadata.location.as_deref(), Some("hall 3"));

    // The new device works on the operational gateway with the token it got.
    let dev = MqttDevice::connect(&ops, "m-new", &token).await.unwrap();
    dev.report(json!({"hello": 1})).await.unwrap();
    eventually("the provisioned device reports", || async {
        twin.get().await.unwrap().state.reported.contains_key("hello").then_some(())
    })
    .await;

    // The claim token cannot take over an existing device.
    let again = MqttDevice::provision(&prov, "meter", "m-0", &claim, json!({})).await.unwrap();
    assert!(!again.ok && again.error.unwrap().contains("already exists"));
    // Nor is it a device token.
    assert!(MqttDevice::connect(&ops, "m-0", &claim).await.is_err());

    gw.stop().await;
    p.shutdown().await;
}
