//! Provisioning through the real MQTT provisioning gateway: the semi-automatic mode with
//! an operator's approval over HTTP, a rejection, the step log, the transient
//! credentials gone afterwards, an identity that does not match, two types with
//! different process model files, a process resumed after a restart, and (on the
//! virtual clock) a stuck step retried and then alerting.

use crate::mqtt::{addr, embedded_config};
use crate::support::*;
use serde_json::{Value, json};
use twinfleet::models::provisioning::{Mode, ProcessSpec, ProvisioningSpec};
use twinfleet::models::{DeviceTypeId, Severity};
use twinfleet::{DeviceTypeSpec, Platform};
use twinfleet_protocols::HttpApi;
use twinfleet_protocols::mqtt::{MqttDevice, MqttGateway, QoS};

async fn device_type(p: &Platform, id: &str, provisioning: ProvisioningSpec) -> String {
    let spec =
        DeviceTypeSpec { provisioning: Some(provisioning), ..DeviceTypeSpec::new(DeviceTypeId::new(id).unwrap()) };
    p.create_device_type(spec).await.unwrap();
    p.issue_claim_token(id).await.unwrap()
}

fn states(log: &Value) -> Vec<String> {
    log.as_array().unwrap().iter().map(|e| e["to"].as_str().unwrap().to_string()).collect()
}

#[actix_rt::test]
async fn a_semi_automatic_device_waits_for_approval_over_http_then_becomes_operational() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), None, test_settings()).await;
    let semi = ProvisioningSpec { mode: Mode::SemiAutomatic, ..Default::default() };
    let claim = device_type(&p, "kiosk", semi).await;
    let mqtt = MqttGateway::start(p.runtime().clone(), embedded_config()).await.unwrap();
    let (prov, ops) = (addr(mqtt.provisioning()), addr(mqtt.operational()));
    let http = HttpApi::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap(), 1).unwrap();
    let (haddr, admin) = (http.local_addr(), admin_token(&p).await);
    let call = |method: &'static str, path: String| {
        let admin = admin.clone();
        actix_rt::task::spawn_blocking(move || http_as(haddr, &admin, method, &path, None))
    };
    let identity =
        json!({"serial": "SN-1", "mac": "aa:bb:cc:00:00:01", "model": "K2", "firmware": "1.0", "region": "eu"});

    // The device claims and is told to wait; asking again is answered the same.
    let r = MqttDevice::provision_as(&prov, "kiosk", "k-1", &claim, identity.clone()).await.unwrap();
    assert!(!r.ok && r.pending && r.token.is_none(), "{r:?}");
    assert_eq!(r.state.as_deref(), Some("awaiting_approval"));
    let r = MqttDevice::provision_as(&prov, "kiosk", "k-1", &claim, identity.clone()).await.unwrap();
    assert!(r.pending, "{r:?}");
    assert!(p.twin("k-1").is_err(), "no twin before the approval");
    let (s, pending) = call("GET", "/api/v1/provisioning/pending".into()).await.unwrap();
    assert_eq!(s, 200, "{pending}");
    assert_eq!(pending[0]["identity"]["serial"], "SN-1");
    // The same from the CLI.
    let api = format!("http://{haddr}");
    let cli = |args: Vec<String>| {
        actix_rt::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            crate::binary::client(&args)
        })
    };
    let argv = |a: &[&str]| -> Vec<String> {
        a.iter().map(|s| s.to_string()).chain(["--api".into(), api.clone(), "--token".into(), admin.clone()]).collect()
    };
    let (ok, out, err) = cli(argv(&["provisioning", "pending"])).await.unwrap();
    assert!(ok && out.contains("SN-1") && out.contains("awaiting_approval"), "{out}{err}");

    // A second claim for the serial with another MAC is refused and alerts.
    let other = json!({"serial": "SN-1", "mac": "ff:ff:ff:ff:ff:ff"});
    let r = MqttDevice::provision_as(&prov, "kiosk", "k-1", &claim, other).await.unwrap();
    assert!(!r.ok && !r.pending && r.error.as_deref().unwrap_or("").contains("MAC"), "{r:?}");
    assert_eq!(p.rejections().count("identity_mismatch"), 1);

    // An operator approves over HTTP; the device's next claim gets its credentials.
    let (s, v) = call("POST", "/api/v1/provisioning/kiosk/SN-1/approve".into()).await.unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "awaiting_confirmation");
    let r = MqttDevice::provision_as(&prov, "kiosk", "k-1", &claim, identity.clone()).await.unwrap();
    assert!(r.ok, "{r:?}");
    let token = r.token.clone().unwrap();
    // The device connects to the operational gateway with them: that confirms it.
    let dev = MqttDevice::connect(&ops, "k-1", &token).await.unwrap();
    dev.telemetry(QoS::AtLeastOnce, None, &[("temp", 21.0)]).await.unwrap();
    let view = eventually("the process ends operational", || async {
        let (_, v) = call("GET", "/api/v1/provisioning/kiosk/SN-1".into()).await.unwrap();
        (v["outcome"] == "operational").then_some(v)
    })
    .await;
    assert_eq!(
        states(&view["log"]),
        [
            "claim_received",
            "awaiting_approval",
            "creating_twin",
            "issuing_credentials",
            "configuring",
            "requesting_apps",
            "awaiting_confirmation",
            "removing_claim",
            "operational"
        ],
        "every step is in the log"
    );
    assert_eq!(view["log"][2]["actor"], json!({"kind": "operator", "name": "admin"}));
    assert_eq!(view["log"][7]["actor"]["kind"], "device");
    let (ok, out, err) = cli(argv(&["provisioning", "show", "kiosk", "SN-1"])).await.unwrap();
    assert!(ok && out.contains("removing_claim") && out.contains("operator admin"), "{out}{err}");
    // The transient credentials are gone: claiming again shows no token.
    let r = MqttDevice::provision_as(&prov, "kiosk", "k-1", &claim, identity.clone()).await.unwrap();
    assert!(!r.ok && r.token.is_none(), "{r:?}");
    let (s, pending) = call("GET", "/api/v1/provisioning/pending".into()).await.unwrap();
    assert_eq!((s, pending), (200, json!([])));
    // The twin carries the identity.
    let twin = p.twin("k-1").unwrap().get().await.unwrap();
    assert_eq!(twin.state.metadata.attributes["identity"]["mac"], "aa:bb:cc:00:00:01");

    // A rejected device is refused.
    let id2 = json!({"serial": "SN-2", "mac": "aa:bb:cc:00:00:02"});
    assert!(MqttDevice::provision_as(&prov, "kiosk", "k-2", &claim, id2.clone()).await.unwrap().pending);
    let (ok, out, err) = cli(argv(&["provisioning", "reject", "kiosk", "SN-2", "--reason", "not ours"])).await.unwrap();
    assert!(ok && out.contains("refused") && out.contains("not ours"), "{out}{err}");
    let r = MqttDevice::provision_as(&prov, "kiosk", "k-2", &claim, id2).await.unwrap();
    assert!(!r.ok && !r.pending && r.token.is_none(), "{r:?}");
    assert!(p.twin("k-2").is_err());
    let (s, _) = call("POST", "/api/v1/provisioning/kiosk/SN-9/approve".into()).await.unwrap();
    assert_eq!(s, 404);

    dev.disconnect().await;
    http.stop().await;
    mqtt.stop().await;
    p.shutdown().await;
}

#[actix_rt::test]
async fn types_follow_their_own_process_files_and_a_process_resumes_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), None, test_settings()).await;
    // Type "lamp": a short process of its own (no confirmation wait).
    let short = ProcessSpec::from_json(&json!({"initial": "new", "states": {
        "new": {"step": "create_twin", "on": {"done": "keys"}},
        "keys": {"step": "issue_credentials", "on": {"done": "ready"}},
        "ready": {"outcome": "operational"}
    }}))
    .unwrap();
    let lamp = device_type(&p, "lamp", ProvisioningSpec { process: Some(short), ..Default::default() }).await;
    // Type "meter": the default process, automatic, serial on the allow-list.
    let auto = ProvisioningSpec { allow_list: vec!["M-1".into()], ..Default::default() };
    let meter = device_type(&p, "meter", auto).await;
    // A process naming an unknown state is refused at load, naming it.
    let bad = json!({"id": "bad", "provisioning": {"process": {"initial": "a", "states": {"a": {"step": "create_twin", "on": {"done": "nowhere"}}}}}});
    let bad: DeviceTypeSpec = serde_json::from_value(bad).unwrap();
    let e = p.create_device_type(bad).await.unwrap_err().to_string();
    assert!(e.contains("nowhere"), "{e}");

    let mqtt = MqttGateway::start(p.runtime().clone(), embedded_config()).await.unwrap();
    let prov = addr(mqtt.provisioning());
    let r = MqttDevice::provision_as(&prov, "lamp", "l-1", &lamp, json!({"serial": "L-1", "mac": "01"})).await.unwrap();
    assert!(r.ok && r.token.is_some(), "{r:?}");
    let lamp_view = p.runtime().claim_view("lamp", "L-1").unwrap();
    assert_eq!(lamp_view.outcome.as_deref(), Some("operational"), "its own process: done without confirmation");
    let r =
        MqttDevice::provision_as(&prov, "meter", "m-1", &meter, json!({"serial": "M-1", "mac": "02"})).await.unwrap();
    assert!(r.ok, "allow-listed: no approval needed: {r:?}");
    let token = r.token.unwrap();
    assert_eq!(p.runtime().claim_view("meter", "M-1").unwrap().state, "awaiting_confirmation");
    // Not on the allow-list: waits.
    let r =
        MqttDevice::provision_as(&prov, "meter", "m-2", &meter, json!({"serial": "M-2", "mac": "03"})).await.unwrap();
    assert!(r.pending, "{r:?}");

    // twinfleet restarts while m-1 has not confirmed and m-2 waits.
    mqtt.stop().await;
    p.shutdown().await;
    let p = start(dir.path(), None, test_settings()).await;
    let mqtt = MqttGateway::start(p.runtime().clone(), embedded_config()).await.unwrap();
    assert_eq!(p.runtime().pending_claims().len(), 1, "the waiting list is rebuilt");
    let dev = MqttDevice::connect(&addr(mqtt.operational()), "m-1", &token).await.unwrap();
    eventually("m-1 confirms after the restart", || async {
        (p.runtime().claim_view("meter", "M-1").unwrap().outcome.as_deref() == Some("operational")).then_some(())
    })
    .await;
    dev.disconnect().await;
    mqtt.stop().await;
    p.shutdown().await;
}

#[actix_rt::test]
async fn a_stuck_step_is_retried_on_the_virtual_clock_then_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let clock = virtual_clock();
    let p = start(dir.path(), Some(clock.clone()), test_settings()).await;
    let process = ProcessSpec::from_json(&json!({"initial": "new", "states": {
        "new": {"step": "create_twin", "on": {"done": "keys"}},
        "keys": {"step": "issue_credentials", "on": {"done": "confirm"}},
        "confirm": {"step": "await_confirmation", "on": {"confirmed": "ready", "timeout": "failed"},
                    "retry": {"deadline_ms": 1000, "max_retries": 1, "backoff_ms": 500}},
        "ready": {"outcome": "operational"},
        "failed": {}
    }}))
    .unwrap();
    device_type(&p, "valve", ProvisioningSpec { process: Some(process), ..Default::default() }).await;
    let a = p.runtime().claim("valve", "v-1", None, Default::default()).await.unwrap();
    assert!(matches!(a, twinfleet::ClaimAnswer::Credentials { .. }), "{a:?}");
    let mut alerts = p.runtime().alerts().subscribe();
    eventually("the deadline is armed", || async { (clock.pending_timers() > 0).then_some(()) }).await;
    let timers = clock.pending_timers();
    clock.advance(1_000); // the first deadline: a retry, the next after 500 + 1000 ms
    eventually("the retry", || async {
        let v = p.runtime().claim_view("valve", "v-1").unwrap();
        (v.state == "confirm" && v.attempt == 1 && clock.pending_timers() >= timers).then_some(())
    })
    .await;
    clock.advance(1_500); // retries used up
    let view = eventually("the process times out", || async {
        let v = p.runtime().claim_view("valve", "v-1").unwrap();
        v.outcome.is_some().then_some(v)
    })
    .await;
    assert_eq!(view.outcome.as_deref(), Some("failed"));
    let alert = loop {
        let a = tokio::time::timeout(std::time::Duration::from_secs(10), alerts.recv()).await.unwrap().unwrap();
        if a.severity == Severity::Critical {
            break a;
        }
    };
    assert!(alert.message.contains("await_confirmation"), "{}", alert.message);
    p.shutdown().await;
}

#[actix_rt::test]
async fn an_automatic_device_provisions_over_grpc_and_its_claim_token_reaches_nothing_else() {
    use twinfleet_proto::device as pb;
    use twinfleet_protocols::{DevicePoint, GrpcDevice, GrpcGateway};
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), None, test_settings()).await;
    let auto = ProvisioningSpec { allow_list: vec!["G-1".into()], ..Default::default() };
    let claim = device_type(&p, "gauge", auto).await;
    let grpc = GrpcGateway::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let endpoint = format!("http://{}", grpc.local_addr());
    let channel = tonic::transport::Channel::from_shared(endpoint.clone()).unwrap().connect().await.unwrap();
    let mut client = pb::provisioning_client::ProvisioningClient::new(channel.clone());
    let request = |token: &str, serial: &str| {
        let mut r = tonic::Request::new(pb::ClaimRequest {
            device_id: "g-1".into(),
            identity: Some(pb::DeviceIdentity { serial: serial.into(), mac: "0a".into(), ..Default::default() }),
        });
        r.metadata_mut().insert("x-device-type", "gauge".parse().unwrap());
        r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        r
    };
    let e = client.claim(request("tfc_wrong", "G-1")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let reply = client.claim(request(&claim, "G-1")).await.unwrap().into_inner();
    assert_eq!(reply.status, pb::claim_reply::Status::Credentials as i32, "{reply:?}");
    assert_eq!(reply.operational, endpoint);
    // The same device asking again gets the same answer.
    let again = client.claim(request(&claim, "G-1")).await.unwrap().into_inner();
    assert_eq!(again.token, reply.token);

    // The claim token is no device credential.
    let mut as_claimant = GrpcDevice::on_channel(channel.clone(), "g-1", &claim);
    assert_eq!(as_claimant.report(&obj(json!({"x": 1}))).await.unwrap_err().code(), tonic::Code::Unauthenticated);

    // With its own token the device reaches its twin, which confirms it.
    let mut dev = GrpcDevice::on_channel(channel, "g-1", &reply.token);
    let mut stream = dev.telemetry().await.unwrap();
    stream.send(vec![DevicePoint { metric: "p".into(), value: 1.5, at_ms: None }]).await.unwrap();
    eventually("the gRPC device is operational", || async {
        (p.runtime().claim_view("gauge", "G-1").unwrap().outcome.as_deref() == Some("operational")).then_some(())
    })
    .await;
    assert!(p.twin("g-1").unwrap().get().await.unwrap().telemetry_latest.contains_key("p"));
    drop(stream);
    grpc.stop().await;
    p.shutdown().await;
}

#[actix_rt::test]
async fn a_claim_flood_is_rate_limited_per_credential_and_source_and_operational_devices_go_on() {
    use twinfleet::models::RateLimit;
    let dir = tempfile::tempdir().unwrap();
    let settings = twinfleet::Settings {
        claims_per_credential: RateLimit { per_sec: 1.0, burst: 5.0 },
        claims_per_source: RateLimit { per_sec: 1_000.0, burst: 1_000.0 },
        ..test_settings()
    };
    let p = start(dir.path(), None, settings).await;
    let flood = device_type(&p, "flood", ProvisioningSpec::default()).await;
    let calm = device_type(&p, "calm", ProvisioningSpec::default()).await;
    fleet(&p, "meter", json!({}), "op", 1, |_| vec![]).await;
    let token = p.issue_device_token("op-0").await.unwrap();
    let mqtt = MqttGateway::start(p.runtime().clone(), embedded_config()).await.unwrap();
    let (prov, ops) = (addr(mqtt.provisioning()), addr(mqtt.operational()));
    let dev = MqttDevice::connect(&ops, "op-0", &token).await.unwrap();

    // 40 claims at once with one claim token, while the operational device publishes.
    let claims = (0..40).map(|i| {
        let (prov, flood) = (prov.clone(), flood.clone());
        async move { MqttDevice::provision(&prov, "flood", &format!("f-{i}"), &flood, json!({})).await.unwrap() }
    });
    let publishing = async {
        for i in 0..200 {
            dev.telemetry(QoS::AtLeastOnce, None, &[("v", i as f64)]).await.unwrap();
        }
    };
    let (answers, ()) = futures::join!(futures::future::join_all(claims), publishing);
    // (Declared without an allow-list: admitted claims wait for approval.)
    let admitted = answers.iter().filter(|r| r.ok || r.pending).count();
    let limited: Vec<_> =
        answers.iter().filter(|r| r.error.as_deref().is_some_and(|e| e.contains("too many"))).collect();
    assert!((5..=6).contains(&admitted), "{admitted} admitted");
    assert_eq!(admitted + limited.len(), 40, "every other claim is refused as rate-limited");
    assert!(limited.iter().all(|r| r.retry_after_ms.is_some()));
    assert_eq!(p.rejections().count("rate_limited") as usize, limited.len());
    eventually("all 200 operational messages are stored", || async {
        let v = p.twin("op-0").unwrap().get().await.unwrap();
        (v.telemetry_latest.get("v").map(|l| l.value) == Some(199.0)).then_some(())
    })
    .await;
    // Another type's claim token is not held up by the flood.
    let r = MqttDevice::provision(&prov, "calm", "c-1", &calm, json!({})).await.unwrap();
    assert!(r.pending, "{r:?}");
    dev.disconnect().await;
    mqtt.stop().await;
    p.shutdown().await;

    // Per source: with a tight limit per address, claims from this one are held to it.
    let dir = tempfile::tempdir().unwrap();
    let settings = twinfleet::Settings { claims_per_source: RateLimit { per_sec: 0.5, burst: 2.0 }, ..test_settings() };
    let p = start(dir.path(), None, settings).await;
    let a = device_type(&p, "a", ProvisioningSpec::default()).await;
    let b = device_type(&p, "b", ProvisioningSpec::default()).await;
    let mqtt = MqttGateway::start(p.runtime().clone(), embedded_config()).await.unwrap();
    let prov = addr(mqtt.provisioning());
    assert!(MqttDevice::provision(&prov, "a", "a-1", &a, json!({})).await.unwrap().pending);
    assert!(MqttDevice::provision(&prov, "b", "b-1", &b, json!({})).await.unwrap().pending);
    let third = MqttDevice::provision(&prov, "a", "a-2", &a, json!({})).await.unwrap();
    assert!(!third.ok && !third.pending && third.error.as_deref().unwrap_or("").contains("127.0.0.1"), "{third:?}");
    mqtt.stop().await;
    p.shutdown().await;
}

#[actix_rt::test]
async fn reprovisioning_keeps_or_resets_the_twin_and_decommissioning_refuses_the_device_everywhere() {
    use twinfleet::models::provisioning::Reprovision;
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), None, test_settings()).await;
    let keep = ProvisioningSpec { reprovision: Reprovision::Keep, ..Default::default() };
    let keep = ProvisioningSpec { allow_list: vec!["K-1".into()], ..keep };
    let reset =
        ProvisioningSpec { reprovision: Reprovision::Reset, allow_list: vec!["R-1".into()], ..Default::default() };
    let kc = device_type(&p, "keeper", keep).await;
    let rc = device_type(&p, "resetter", reset).await;
    let mqtt = MqttGateway::start(p.runtime().clone(), embedded_config()).await.unwrap();
    let (prov, ops) = (addr(mqtt.provisioning()), addr(mqtt.operational()));
    let http = HttpApi::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap(), 1).unwrap();
    let (haddr, admin) = (http.local_addr(), admin_token(&p).await);

    // Provision both, each sends a point, then "loses" its credentials and claims again.
    let mut tokens = Vec::new();
    for (ty, id, serial, claim) in [("keeper", "kp-1", "K-1", &kc), ("resetter", "rs-1", "R-1", &rc)] {
        let identity = json!({"serial": serial, "mac": "00:11"});
        let r = MqttDevice::provision_as(&prov, ty, id, claim, identity.clone()).await.unwrap();
        let dev = MqttDevice::connect(&ops, id, r.token.as_deref().unwrap()).await.unwrap();
        dev.telemetry(QoS::AtLeastOnce, None, &[("first", 1.0)]).await.unwrap();
        eventually("operational", || async {
            (p.runtime().claim_view(ty, serial).unwrap().outcome.as_deref() == Some("operational")).then_some(())
        })
        .await;
        dev.disconnect().await;
        let again = MqttDevice::provision_as(&prov, ty, id, claim, identity).await.unwrap();
        assert!(again.ok && again.token != r.token, "{ty}: new credentials: {again:?}");
        assert!(
            MqttDevice::connect(&ops, id, r.token.as_deref().unwrap()).await.is_err(),
            "{ty}: the old token is dead"
        );
        tokens.push(again.token.unwrap());
    }
    let kept = p.twin("kp-1").unwrap().get().await.unwrap();
    assert!(kept.telemetry_latest.contains_key("first"), "keep: the twin's data stays");
    let fresh = p.twin("rs-1").unwrap().get().await.unwrap();
    assert!(!fresh.telemetry_latest.contains_key("first"), "reset: a new twin");
    let log = p.runtime().claim_view("keeper", "K-1").unwrap().log;
    assert!(log.iter().any(|e| e.note.contains("reprovision")), "the log shows both runs: {log:?}");

    // Decommissioning: the session ends, the device is refused, the twin stays archived.
    let dev = MqttDevice::connect(&ops, "kp-1", &tokens[0]).await.unwrap();
    let (s, v) =
        actix_rt::task::spawn_blocking(move || http_as(haddr, &admin, "POST", "/api/v1/twins/kp-1/decommission", None))
            .await
            .unwrap();
    assert_eq!(s, 200, "{v}");
    eventually("the session ends", || async { (!dev.is_connected()).then_some(()) }).await;
    assert!(MqttDevice::connect(&ops, "kp-1", &tokens[0]).await.is_err());
    let twin = p.twin("kp-1").unwrap().get().await.unwrap();
    assert_eq!(twin.state.lifecycle, twinfleet::models::Lifecycle::Archived);
    // keep cannot bring an archived twin back.
    let r = MqttDevice::provision_as(&prov, "keeper", "kp-1", &kc, json!({"serial": "K-1", "mac": "00:11"})).await;
    assert!(!r.unwrap().ok);
    http.stop().await;
    mqtt.stop().await;
    p.shutdown().await;
}

#[actix_rt::test]
async fn the_manual_mode_registers_devices_by_operator_and_pending_ones_are_approved_in_one_call() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), None, test_settings()).await;
    let manual = device_type(&p, "panel", ProvisioningSpec { mode: Mode::Manual, ..Default::default() }).await;
    let semi = device_type(&p, "kiosk", ProvisioningSpec { mode: Mode::SemiAutomatic, ..Default::default() }).await;
    let mqtt = MqttGateway::start(p.runtime().clone(), embedded_config()).await.unwrap();
    let (prov, ops) = (addr(mqtt.provisioning()), addr(mqtt.operational()));
    let http = HttpApi::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap(), 1).unwrap();
    let (haddr, admin) = (http.local_addr(), admin_token(&p).await);
    let call = |method: &'static str, path: &str, body: Value| {
        let (admin, path) = (admin.clone(), path.to_string());
        actix_rt::task::spawn_blocking(move || http_as(haddr, &admin, method, &path, Some(&body.to_string())))
    };

    // Manual: a device cannot claim; an operator registers it and hands the token over.
    let r = MqttDevice::provision(&prov, "panel", "pn-1", &manual, json!({})).await.unwrap();
    assert!(!r.ok && !r.pending && r.error.as_deref().unwrap_or("").contains("operator"), "{r:?}");
    let body = json!({"device_id": "pn-1", "identity": {"serial": "P-1", "mac": "0f"}});
    let (s, v) = call("POST", "/api/v1/device-types/panel/devices", body.clone()).await.unwrap();
    assert_eq!(s, 201, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    let (s, _) = call("POST", "/api/v1/device-types/panel/devices", body).await.unwrap();
    assert_eq!(s, 409, "registered once");
    let dev = MqttDevice::connect(&ops, "pn-1", &token).await.unwrap();
    eventually("the registered device is operational", || async {
        (p.runtime().claim_view("panel", "P-1").unwrap().outcome.as_deref() == Some("operational")).then_some(())
    })
    .await;
    let log = p.runtime().claim_view("panel", "P-1").unwrap().log;
    assert_eq!(log[0].actor, twinfleet::models::provisioning::Actor::Operator("admin".into()));
    dev.disconnect().await;

    // Bulk approval: three pending kiosks approved in one call; an unknown serial is
    // reported, not fatal.
    for i in 0..3 {
        let id = json!({"serial": format!("K-{i}"), "mac": format!("{i}")});
        assert!(MqttDevice::provision_as(&prov, "kiosk", &format!("k-{i}"), &semi, id).await.unwrap().pending);
    }
    let (s, v) = call("POST", "/api/v1/device-types/kiosk/approvals", json!({"serials": ["K-0", "K-1", "K-2", "K-9"]}))
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    let states: Vec<&str> = v.as_array().unwrap().iter().filter_map(|r| r["state"].as_str()).collect();
    assert_eq!(states, ["awaiting_confirmation"; 3]);
    assert!(v[3]["error"].as_str().is_some(), "{v}");
    assert!(p.runtime().pending_claims().is_empty());
    http.stop().await;
    mqtt.stop().await;
    p.shutdown().await;
}

#[actix_rt::test]
async fn a_batch_imported_as_csv_provisions_alone_with_its_own_claim_token_and_only_its_devices() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), None, test_settings()).await;
    // The type waits for an operator; the batch overrides that (automatic).
    let semi = ProvisioningSpec { mode: Mode::SemiAutomatic, ..Default::default() };
    let type_claim = device_type(&p, "tracker", semi).await;
    let mqtt = MqttGateway::start(p.runtime().clone(), embedded_config()).await.unwrap();
    let (prov, ops) = (addr(mqtt.provisioning()), addr(mqtt.operational()));
    let http = HttpApi::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap(), 1).unwrap();
    let (haddr, admin) = (http.local_addr(), admin_token(&p).await);
    let csv = dir.path().join("lot-7.csv");
    std::fs::write(&csv, "serial,mac,model\r\nT-1,aa:00:00:00:00:01,T2\nT-2,aa:00:00:00:00:02,T2\n\"T-3\",,T2\n")
        .unwrap();
    let api = format!("http://{haddr}");
    let (csv_path, admin2) = (csv.display().to_string(), admin.clone());
    let (ok, out, err) = actix_rt::task::spawn_blocking(move || {
        crate::binary::client(&[
            "provisioning",
            "import",
            "tracker",
            &csv_path,
            "--name",
            "lot-7",
            "--mode",
            "automatic",
            "--api",
            &api,
            "--token",
            &admin2,
        ])
    })
    .await
    .unwrap();
    assert!(ok && out.contains("3 devices"), "{out}{err}");
    let batch_claim = out.split_whitespace().last().unwrap().to_string();
    assert!(batch_claim.starts_with("tfc_"), "{out}");
    let call = |method: &'static str, path: &'static str, body: Option<String>| {
        let admin = admin.clone();
        actix_rt::task::spawn_blocking(move || http_as(haddr, &admin, method, path, body.as_deref()))
    };
    let (s, v) = call("GET", "/api/v1/device-types/tracker/batches", None).await.unwrap();
    assert_eq!((s, v[0]["name"].clone(), v[0]["devices"].clone()), (200, json!("lot-7"), json!(3)), "{v}");
    // An import repeating a registered serial is refused whole, naming it.
    let again = json!({"name": "lot-8", "devices": [{"serial": "T-9"}, {"serial": "T-2"}]}).to_string();
    let (s, v) = call("POST", "/api/v1/device-types/tracker/batches", Some(again)).await.unwrap();
    assert_eq!(s, 409, "{v}");
    assert!(v["message"].as_str().unwrap().contains("\"T-2\""), "{v}");
    let (s, _) = call("GET", "/api/v1/device-types/tracker/batches/lot-8", None).await.unwrap();
    assert_eq!(s, 404, "nothing of the refused import is left");
    let bad = json!({"name": "lot-9", "devices": [{"serial": "ok"}, {"serial": "two words"}]}).to_string();
    let (s, v) = call("POST", "/api/v1/device-types/tracker/batches", Some(bad)).await.unwrap();
    assert!(s == 400 && v["message"].as_str().unwrap().contains("device 2"), "{s} {v}");

    // A device of the batch claims with the batch's token: no approval, its credentials.
    let t1 = json!({"serial": "T-1", "mac": "aa:00:00:00:00:01"});
    let r = MqttDevice::provision_in_batch(&prov, "tracker", "lot-7", "t-1", &batch_claim, t1).await.unwrap();
    assert!(r.ok, "{r:?}");
    let dev = MqttDevice::connect(&ops, "t-1", r.token.as_deref().unwrap()).await.unwrap();
    dev.telemetry(QoS::AtLeastOnce, None, &[("lat", 59.9)]).await.unwrap();
    let view = eventually("t-1 is operational", || async {
        let v = p.runtime().claim_view("tracker", "T-1").unwrap();
        (v.outcome.as_deref() == Some("operational")).then_some(v)
    })
    .await;
    assert_eq!(view.batch.as_deref(), Some("lot-7"));
    // Pre-registered, so with the type's own token it goes through too.
    let r = MqttDevice::provision_as(&prov, "tracker", "t-3", &type_claim, json!({"serial": "T-3"})).await.unwrap();
    assert!(r.ok, "{r:?}");
    // Not in the batch: its token does not claim it; with the type's token it waits.
    let stranger = json!({"serial": "X-1", "mac": "bb"});
    let r =
        MqttDevice::provision_in_batch(&prov, "tracker", "lot-7", "x-1", &batch_claim, stranger.clone()).await.unwrap();
    assert!(!r.ok && !r.pending && r.error.as_deref().unwrap_or("").contains("not in batch"), "{r:?}");
    let r = MqttDevice::provision_as(&prov, "tracker", "x-1", &type_claim, stranger).await.unwrap();
    assert!(r.pending, "{r:?}");
    // A registered MAC must match.
    let fake = json!({"serial": "T-2", "mac": "ff:ff"});
    let r = MqttDevice::provision_in_batch(&prov, "tracker", "lot-7", "t-2", &batch_claim, fake).await.unwrap();
    assert!(!r.ok && r.error.as_deref().unwrap_or("").contains("registered it with"), "{r:?}");
    // A batch token with the type's username is the wrong password for it.
    let r = MqttDevice::provision_as(&prov, "tracker", "t-2", &batch_claim, json!({"serial": "T-2"})).await;
    assert!(r.is_err() || !r.unwrap().ok);

    // Deleting the batch ends its token at once.
    let (s, _) = call("DELETE", "/api/v1/device-types/tracker/batches/lot-7", None).await.unwrap();
    assert_eq!(s, 200);
    let t2 = json!({"serial": "T-2", "mac": "aa:00:00:00:00:02"});
    let r = MqttDevice::provision_in_batch(&prov, "tracker", "lot-7", "t-2", &batch_claim, t2).await;
    assert!(r.is_err() || !r.unwrap().ok, "a deleted batch's token claims nothing");
    assert!(p.twin("t-1").is_ok(), "its provisioned devices keep their twins");
    dev.disconnect().await;
    http.stop().await;
    mqtt.stop().await;
    p.shutdown().await;
}

#[actix_rt::test]
async fn the_gateway_manager_allocates_by_region_and_refuses_an_unknown_region() {
    use twinfleet::models::enrollment::GatewaySpec;
    use twinfleet::models::provisioning::{Allocation, AllocationPolicy};
    let dir = tempfile::tempdir().unwrap();
    let gw = |name: &str, mqtt: &str, regions: &[&str]| GatewaySpec {
        name: name.into(),
        mqtt: mqtt.into(),
        grpc: format!("http://{name}.example:50051"),
        regions: regions.iter().map(|r| r.to_string()).collect(),
        weight: 1,
    };
    // The "eu" gateway is this process's own operational listener (on a port chosen
    // first); "us" is another address devices would be sent to.
    let ops = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let settings = twinfleet::Settings {
        gateways: vec![gw("eu-1", &ops, &["eu", "uk"]), gw("us-1", "us.example:1883", &["us"])],
        ..test_settings()
    };
    let p = start(dir.path(), None, settings).await;
    let region = Allocation { policy: AllocationPolicy::Region, gateway: None };
    let allow = vec!["S-1".into(), "S-2".into()];
    let spec = ProvisioningSpec { allocation: Some(region), allow_list: allow, ..Default::default() };
    let claim = device_type(&p, "sensor", spec).await;
    // A static policy naming a gateway that is not configured is refused at load.
    let fixed = Allocation { policy: AllocationPolicy::Static, gateway: Some("mars-1".into()) };
    let bad = DeviceTypeSpec {
        provisioning: Some(ProvisioningSpec { allocation: Some(fixed), ..Default::default() }),
        ..DeviceTypeSpec::new(DeviceTypeId::new("rover").unwrap())
    };
    let e = p.create_device_type(bad).await.unwrap_err().to_string();
    assert!(e.contains("mars-1"), "{e}");

    let config = twinfleet_protocols::mqtt::MqttConfig { operational: ops.parse().unwrap(), ..embedded_config() };
    let gateway = MqttGateway::start(p.runtime().clone(), config).await.unwrap();
    let prov = addr(gateway.provisioning());
    let uk = json!({"serial": "S-1", "mac": "01", "region": "uk"});
    let r = MqttDevice::provision_as(&prov, "sensor", "s-1", &claim, uk).await.unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!((r.gateway.as_deref(), r.operational.as_deref()), (Some("eu-1"), Some(ops.as_str())));
    let s1 = r.token.unwrap();
    let us = json!({"serial": "S-2", "mac": "02", "region": "us"});
    let r = MqttDevice::provision_as(&prov, "sensor", "s-2", &claim, us).await.unwrap();
    assert_eq!((r.gateway.as_deref(), r.operational.as_deref()), (Some("us-1"), Some("us.example:1883")), "{r:?}");
    let view = p.runtime().claim_view("sensor", "S-2").unwrap();
    assert_eq!(view.gateway.as_deref(), Some("us-1"));
    assert!(view.log.iter().any(|e| e.note.contains("gateway us-1")), "the log names the gateway: {:?}", view.log);
    // An unknown region, or none, gets a clear refusal, counted; no process starts.
    let mars = json!({"serial": "S-3", "mac": "03", "region": "mars"});
    let r = MqttDevice::provision_as(&prov, "sensor", "s-3", &claim, mars).await.unwrap();
    let e = r.error.clone().unwrap_or_default();
    assert!(!r.ok && e.contains("unknown region \"mars\"") && e.contains("eu, uk, us"), "{r:?}");
    assert!(p.runtime().claim_view("sensor", "S-3").is_err());
    let r = MqttDevice::provision_as(&prov, "sensor", "s-4", &claim, json!({"serial": "S-4"})).await.unwrap();
    assert!(!r.ok && r.error.unwrap_or_default().contains("names no region"));
    assert_eq!(p.rejections().count("malformed"), 2);
    // The device allocated to this process's own gateway confirms there.
    let dev = MqttDevice::connect(&ops, "s-1", &s1).await.unwrap();
    eventually("s-1 confirms on its allocated gateway", || async {
        (p.runtime().claim_view("sensor", "S-1").unwrap().outcome.as_deref() == Some("operational")).then_some(())
    })
    .await;
    dev.disconnect().await;
    gateway.stop().await;
    p.shutdown().await;
}

#[actix_rt::test]
async fn a_claim_with_a_proof_is_bound_to_it_and_its_token_comes_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), None, test_settings()).await;
    let claim =
        device_type(&p, "probe", ProvisioningSpec { allow_list: vec!["P-1".into()], ..Default::default() }).await;
    let mqtt = MqttGateway::start(p.runtime().clone(), embedded_config()).await.unwrap();
    let (prov, ops) = (addr(mqtt.provisioning()), addr(mqtt.operational()));
    let id = json!({"serial": "P-1", "mac": "0p"});
    let proof = "the device's own secret of 32 b";
    let r = MqttDevice::provision_with_proof(&prov, "probe", "p-1", &claim, id.clone(), proof).await.unwrap();
    assert!(r.ok, "{r:?}");
    let sealed = r.sealed_token.clone().unwrap();
    let token = r.token.clone().unwrap();
    assert!(token.starts_with("tfd_") && !sealed.contains(&token[4..]), "{r:?}");
    // The same device (same proof) gets the same answer; anyone else is refused, even
    // with the right serial and MAC, and without a proof too.
    let again = MqttDevice::provision_with_proof(&prov, "probe", "p-1", &claim, id.clone(), proof).await.unwrap();
    assert_eq!(again.token.as_deref(), Some(token.as_str()));
    let other = "somebody else's secret, 32 bytes";
    let r = MqttDevice::provision_with_proof(&prov, "probe", "p-1", &claim, id.clone(), other).await.unwrap();
    assert!(!r.ok && r.error.as_deref().unwrap_or("").contains("proof"), "{r:?}");
    let r = MqttDevice::provision_as(&prov, "probe", "p-1", &claim, id.clone()).await.unwrap();
    assert!(!r.ok && r.token.is_none(), "{r:?}");
    let r = MqttDevice::provision_with_proof(&prov, "probe", "p-1", &claim, id, "short").await.unwrap();
    assert!(!r.ok && r.error.as_deref().unwrap_or("").contains("16 to 256"), "{r:?}");
    let dev = MqttDevice::connect(&ops, "p-1", &token).await.unwrap();
    eventually("p-1 is operational", || async {
        (p.runtime().claim_view("probe", "P-1").unwrap().outcome.as_deref() == Some("operational")).then_some(())
    })
    .await;
    dev.disconnect().await;
    mqtt.stop().await;
    p.shutdown().await;
}
