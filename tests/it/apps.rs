//! The app store through the real HTTP API, the embedded MQTT gateway and the
//! device-side artifact client: versions with compatibility metadata, artifact uploads
//! (size limit, declared checksum, nothing kept when refused), range downloads that a
//! device resumes, an incompatible install refused with its reasons and no command
//! sent, and a corrupt artifact refused by the device and reported as a failed install.

use crate::mqtt::{addr, embedded_config};
use crate::support::*;
use serde_json::json;
use sha2::Digest;
use std::time::Duration;
use twinfleet::models::EventKind;
use twinfleet_protocols::HttpApi;
use twinfleet_protocols::artifact_client::{FetchError, fetch_artifact};
use twinfleet_protocols::mqtt::{MqttDevice, MqttGateway};

pub(crate) fn sha256(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A blocking PUT of raw bytes with headers: (status, body as JSON).
pub(crate) fn put_bytes(
    http: std::net::SocketAddr,
    token: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, serde_json::Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut req = agent.put(format!("http://{http}{path}")).header("authorization", &format!("Bearer {token}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut res = req.send(body).unwrap();
    let status = res.status().as_u16();
    let text = res.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}

/// The artifact files kept (temporary uploads aside).
fn kept(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("artifacts"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.retain(|n| n != "tmp");
    v.sort();
    v
}

#[actix_rt::test]
async fn apps_are_checked_uploaded_served_in_ranges_installed_and_a_corrupt_artifact_fails_the_install() {
    let dir = tempfile::tempdir().unwrap();
    let settings = twinfleet::Settings { max_artifact_bytes: 1 << 20, ..test_settings() };
    let p = start(dir.path(), None, settings).await;
    let ty = fleet(&p, "cam", json!({}), "x", 0, |_| vec![]).await;
    // Its provisioning identity: the OS, architecture and peripherals the check uses.
    let mut spec = twinfleet::TwinSpec::new(tid("c-0"));
    spec.metadata.attributes =
        obj(json!({"identity": {"serial": "S0", "os": "linux", "arch": "arm64", "peripherals": ["gps"]}}));
    ty.spawn_fleet(vec![spec]).await.unwrap();
    let admin = admin_token(&p).await;
    let api = HttpApi::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap(), 2).unwrap();
    let http = api.local_addr();
    let gw = MqttGateway::start(p.runtime().clone(), embedded_config()).await.unwrap();
    let token = p.issue_device_token("c-0").await.unwrap();
    let mut device = MqttDevice::connect(&addr(gw.operational()), "c-0", &token).await.unwrap();
    device.report(json!({"platform": {"os_version": "6.1.0", "memory_mb": 256}})).await.unwrap();
    let c0 = p.twin("c-0").unwrap();
    eventually("the platform report arrives", || async {
        c0.get().await.unwrap().state.reported.contains_key("platform").then_some(())
    })
    .await;

    let vision = json!({"app": "vision", "version": "2.1.0",
        "requires": {"os": "linux", "arch": ["arm64"], "peripherals": ["camera"], "min_memory_mb": 512}});
    let blink = json!({"app": "blink", "version": "1.0.0", "requires": {"os": "linux", "os_version": ">=5.10"}});
    for app in [&vision, &blink] {
        let (status, body) = http_as(http, &admin, "POST", "/api/v1/apps", Some(&app.to_string()));
        assert_eq!(status, 201, "{body}");
    }
    let (status, _) = http_as(http, &admin, "POST", "/api/v1/apps", Some(&blink.to_string()));
    assert_eq!(status, 409, "a version is registered once");
    let (status, body) = http_as(http, &admin, "POST", "/api/v1/apps", Some(r#"{"app": "x", "version": "one"}"#));
    assert_eq!(status, 400, "{body}");

    // Uploads: a wrong checksum and an oversized body are refused and keep nothing.
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let sum = sha256(&bytes);
    let path = "/api/v1/apps/blink/1.0.0/artifacts/linux/arm64";
    let (status, body) = put_bytes(http, &admin, path, &[("x-checksum-sha256", &sha256(b"other"))], &bytes);
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("nothing was kept"), "{body}");
    let big = vec![7u8; (1 << 20) + 1];
    let (status, body) = put_bytes(http, &admin, path, &[("x-checksum-sha256", &sha256(&big))], &big);
    assert_eq!((status, body["error"].as_str()), (413, Some("too_large")), "{body}");
    assert!(kept(dir.path()).is_empty(), "nothing kept: {:?}", kept(dir.path()));
    let (status, artifact) = put_bytes(http, &admin, path, &[("x-checksum-sha256", &sum)], &bytes);
    assert_eq!(status, 201, "{artifact}");
    assert_eq!((artifact["sha256"].as_str(), artifact["size"].as_u64()), (Some(sum.as_str()), Some(300_000)));
    assert_eq!(kept(dir.path()), std::slice::from_ref(&sum), "stored under its hash");

    // An incompatible app is refused with every reason, and nothing is sent.
    let (status, body) =
        http_as(http, &admin, "POST", "/api/v1/twins/c-0/installs", Some(r#"{"app": "vision", "version": "2.1.0"}"#));
    assert_eq!((status, body["error"].as_str()), (422, Some("incompatible")), "{body}");
    let reasons: Vec<&str> = body["reasons"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    assert!(reasons.contains(&"requires peripheral camera; the device has gps"), "{reasons:?}");
    assert!(reasons.contains(&"requires 512 MB of memory; the device has 256 MB"), "{reasons:?}");
    let events = p.twin("c-0").unwrap().events(50).await.unwrap();
    assert!(!events.iter().any(|e| matches!(e.kind, EventKind::CommandSent { .. })), "no command: {events:?}");

    // A compatible one reaches the device, which downloads it in two goes (the first
    // broken off after 100,000 bytes) and checks it.
    let (status, started) =
        http_as(http, &admin, "POST", "/api/v1/twins/c-0/installs", Some(r#"{"app": "blink", "version": "1.0.0"}"#));
    assert_eq!(status, 202, "{started}");
    let cmd = device.next_command(Duration::from_secs(10)).await.expect("install_app over MQTT");
    let url = cmd.body["install_app"]["artifact_url"].as_str().unwrap().to_string();
    assert_eq!(url, format!("/api/v1/artifacts/{sum}"));
    let dest = dir.path().join("device-download");
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let get = |range: &str| {
        let mut res = agent
            .get(format!("http://{http}{url}"))
            .header("authorization", &format!("Bearer {admin}"))
            .header("range", range)
            .call()
            .unwrap();
        let content_range = res.headers().get("content-range").map(|v| v.to_str().unwrap().to_string());
        (res.status().as_u16(), content_range, res.body_mut().read_to_vec().unwrap())
    };
    let (status, content_range, partial) = get("bytes=0-99999");
    assert_eq!((status, content_range.as_deref()), (206, Some("bytes 0-99999/300000")));
    assert_eq!(partial, bytes[..100_000]);
    assert_eq!(get("bytes=400000-").0, 416, "a range outside the file");
    std::fs::write(&dest, &partial).unwrap();
    let (base, id, tok, u, d) = (format!("http://{http}"), "c-0".to_string(), token.clone(), url.clone(), dest.clone());
    let mut seen = Vec::new();
    let size = actix_rt::task::spawn_blocking(move || {
        fetch_artifact(&base, &id, &tok, &u, &d, |done, total| seen.push((done, total))).map(|n| (n, seen))
    })
    .await
    .unwrap()
    .expect("the device gets the artifact");
    assert_eq!(size.0, 300_000);
    assert!(
        size.1.first().is_some_and(|&(done, total)| done > 100_000 && total == 300_000),
        "resumed: {:?}",
        size.1.first()
    );
    assert_eq!(std::fs::read(&dest).unwrap(), bytes);
    device.ack(&cmd.command_id, true, "installed").await.unwrap();
    device.report(json!({"apps": {"blink": "1.0.0"}})).await.unwrap();
    eventually("the install is recorded", || async {
        c0.get().await.unwrap().state.apps.contains_key("blink").then_some(())
    })
    .await;

    // Bad device credentials get nothing.
    let (status, _, _) = http_full(http, Some("wrong"), "GET", &url, &[("x-device-id", "c-0")], None);
    assert_eq!(status, 401);

    // The stored file is corrupted: the device refuses it and reports the install failed.
    std::fs::write(dir.path().join("artifacts").join(&sum), b"corrupt").unwrap();
    let (status, started) =
        http_as(http, &admin, "POST", "/api/v1/twins/c-0/installs", Some(r#"{"app": "blink", "version": "1.0.0"}"#));
    assert_eq!(status, 202, "{started}");
    let cmd = device.next_command(Duration::from_secs(10)).await.expect("install_app again");
    let (base, tok, u, d) = (format!("http://{http}"), token.clone(), url.clone(), dir.path().join("second"));
    let err = actix_rt::task::spawn_blocking(move || fetch_artifact(&base, "c-0", &tok, &u, &d, |_, _| {}))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, FetchError::ChecksumMismatch { .. }), "{err}");
    assert!(!dir.path().join("second").exists(), "the corrupt download is deleted");
    let command_id = cmd.command_id.clone();
    device.ack(&command_id, false, &err.to_string()).await.unwrap();
    let twin = p.twin("c-0").unwrap();
    eventually("the failed install is journalled", || async {
        twin.events(20).await.unwrap().into_iter().find_map(|e| match e.kind {
            EventKind::CommandAcked { command_id: c, success: false, message } if c == command_id => Some(message),
            _ => None,
        })
    })
    .await;

    device.disconnect().await;
    gw.stop().await;
    api.stop().await;
    p.shutdown().await;
}

#[actix_rt::test]
async fn an_install_waits_for_approval_and_for_its_maintenance_window_on_the_virtual_clock() {
    use twinfleet::DtaSpec;
    use twinfleet::models::ConfigLayer;
    let dir = tempfile::tempdir().unwrap();
    let clock = virtual_clock(); // 2023-11-14 22:13:20 UTC
    let p = start(dir.path(), Some(clock.clone()), test_settings()).await;
    // The group's layer: its members install at night only. A window in a bad format is
    // refused where it is written, naming the problem.
    let bad = ConfigLayer { priority: 1, values: obj(json!({"maintenance_window": "02:00-04:00 Mars/Olympus daily"})) };
    let e = p
        .create_dta(DtaSpec {
            id: did("night"),
            name: "Night".into(),
            parents: vec![],
            layers: [("w".to_string(), bad)].into(),
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not an IANA time zone"), "{e}");
    let window = ConfigLayer { priority: 1, values: obj(json!({"maintenance_window": "02:00-04:00 UTC daily"})) };
    p.create_dta(DtaSpec {
        id: did("night"),
        name: "Night".into(),
        parents: vec![],
        layers: [("w".to_string(), window)].into(),
    })
    .await
    .unwrap();
    // The type asks for approval of every install.
    fleet(&p, "cam", json!({"install_approval": true}), "c", 1, |_| vec![did("night")]).await;
    let admin = admin_token(&p).await;
    let api = HttpApi::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap(), 2).unwrap();
    let http = api.local_addr();
    let gw = MqttGateway::start(p.runtime().clone(), embedded_config()).await.unwrap();
    let token = p.issue_device_token("c-0").await.unwrap();
    let mut device = MqttDevice::connect(&addr(gw.operational()), "c-0", &token).await.unwrap();

    let (status, _) = http_as(http, &admin, "POST", "/api/v1/apps", Some(r#"{"app": "blink", "version": "1.0.0"}"#));
    assert_eq!(status, 201);
    let bytes = b"blink firmware".to_vec();
    let (status, _) = put_bytes(
        http,
        &admin,
        "/api/v1/apps/blink/1.0.0/artifacts/any/any",
        &[("x-checksum-sha256", &sha256(&bytes))],
        &bytes,
    );
    assert_eq!(status, 201);

    let install = r#"{"app": "blink", "version": "1.0.0"}"#;
    let (status, job) = http_as(http, &admin, "POST", "/api/v1/twins/c-0/installs", Some(install));
    assert_eq!((status, job["phase"].as_str()), (202, Some("awaiting_approval")), "{job}");
    let (status, body) = http_as(http, &admin, "POST", "/api/v1/twins/c-0/installs", Some(install));
    assert_eq!((status, body["error"].as_str()), (409, Some("install_conflict")), "one at a time: {body}");
    let twin = p.twin("c-0").unwrap();
    let sent = |events: &[twinfleet::models::TwinEvent]| {
        events.iter().any(|e| matches!(e.kind, EventKind::CommandSent { .. }))
    };
    assert!(!sent(&twin.events(50).await.unwrap()), "nothing sent before approval");

    // Approved at 22:13 UTC, it waits for 02:00 UTC.
    let (status, job) = http_as(http, &admin, "POST", "/api/v1/twins/c-0/installs/blink/approve", None);
    let opens = 1_700_013_600_000i64; // 2023-11-15 02:00 UTC
    assert_eq!(
        (status, job["phase"].as_str(), job["opens"].as_i64()),
        (200, Some("awaiting_window"), Some(opens)),
        "{job}"
    );
    let (status, _) = http_as(http, &admin, "POST", "/api/v1/twins/c-0/installs/blink/approve", None);
    assert_eq!(status, 409, "approved once");
    clock.advance((opens - 1 - p.runtime().clock().now().0) as u64);
    assert!(!sent(&twin.events(50).await.unwrap()), "nothing sent before the window");
    clock.advance(1);
    let cmd = device.next_command(Duration::from_secs(10)).await.expect("install_app in the window");
    assert_eq!(cmd.body["install_app"]["app"], "blink");
    device.ack(&cmd.command_id, true, "installed").await.unwrap();
    let view = eventually("the install is done", || async {
        let v = twin.get().await.unwrap();
        (v.state
            .install
            .as_ref()
            .is_some_and(|j| matches!(j.phase, twinfleet::models::install::InstallPhase::Installed { .. })))
        .then_some(v)
    })
    .await;
    assert_eq!(view.state.apps.get("blink").map(String::as_str), Some("1.0.0"), "the inventory");
    let (status, body) = http_as(http, &admin, "POST", "/api/v1/twins/c-0/installs/blink/rollback", None);
    assert_eq!(status, 409, "nothing installed before 1.0.0: {body}");

    // 2.0.0 replaces it (approved; the window is open now), then the operator goes back.
    let (status, _) = http_as(http, &admin, "POST", "/api/v1/apps", Some(r#"{"app": "blink", "version": "2.0.0"}"#));
    assert_eq!(status, 201);
    let (status, _) = put_bytes(
        http,
        &admin,
        "/api/v1/apps/blink/2.0.0/artifacts/any/any",
        &[("x-checksum-sha256", &sha256(b"v2"))],
        b"v2",
    );
    assert_eq!(status, 201);
    let (status, job) =
        http_as(http, &admin, "POST", "/api/v1/twins/c-0/installs", Some(r#"{"app": "blink", "version": "2.0.0"}"#));
    assert_eq!((status, job["phase"].as_str()), (202, Some("awaiting_approval")));
    let (_, job) = http_as(http, &admin, "POST", "/api/v1/twins/c-0/installs/blink/approve", None);
    assert_eq!((job["phase"].as_str(), job["previous"].as_str()), (Some("installing"), Some("1.0.0")), "{job}");
    let cmd = device.next_command(Duration::from_secs(10)).await.expect("install_app 2.0.0");
    device.ack(&cmd.command_id, true, "installed").await.unwrap();
    eventually("2.0.0 is installed", || async {
        (twin.get().await.unwrap().state.apps.get("blink").map(String::as_str) == Some("2.0.0")).then_some(())
    })
    .await;
    let (status, job) = http_as(http, &admin, "POST", "/api/v1/twins/c-0/installs/blink/rollback", None);
    assert_eq!((status, job["version"].as_str()), (202, Some("1.0.0")), "{job}");
    let (_, job) = http_as(http, &admin, "POST", "/api/v1/twins/c-0/installs/blink/approve", None);
    assert_eq!(job["phase"], "installing", "{job}");
    let cmd = device.next_command(Duration::from_secs(10)).await.expect("install_app 1.0.0 again");
    assert_eq!(cmd.body["install_app"]["version"], "1.0.0");
    device.ack(&cmd.command_id, true, "rolled back").await.unwrap();
    eventually("1.0.0 is back", || async {
        (twin.get().await.unwrap().state.apps.get("blink").map(String::as_str) == Some("1.0.0")).then_some(())
    })
    .await;

    // Removed: the device gets uninstall_app; the app leaves the inventory once it confirms.
    let (status, job) = http_as(http, &admin, "POST", "/api/v1/twins/c-0/installs/blink/uninstall", None);
    assert_eq!((status, job["uninstall"].as_bool()), (202, Some(true)), "{job}");
    http_as(http, &admin, "POST", "/api/v1/twins/c-0/installs/blink/approve", None);
    let cmd = device.next_command(Duration::from_secs(10)).await.expect("uninstall_app");
    assert_eq!(cmd.body["uninstall_app"], json!({"app": "blink"}));
    device.ack(&cmd.command_id, true, "removed").await.unwrap();
    eventually("blink is gone", || async { twin.get().await.unwrap().state.apps.is_empty().then_some(()) }).await;
    let (status, _) = http_as(http, &admin, "POST", "/api/v1/twins/c-0/installs/blink/uninstall", None);
    assert_eq!(status, 409, "not installed any more");

    device.disconnect().await;
    gw.stop().await;
    api.stop().await;
    p.shutdown().await;
}
