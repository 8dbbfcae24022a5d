//! Fleet rollouts through the real HTTP API and the embedded MQTT gateway, with device
//! clients that install what they are told (and fail where the test injects it), on the
//! virtual clock: injected failures abort the first wave and roll the updated devices
//! back; alerts after the install stop the rollout at its health gate; a rollout resumes
//! after a restart of the platform.

use crate::apps::{put_bytes, sha256};
use crate::mqtt::{addr, embedded_config};
use crate::support::*;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use twinfleet::Platform;
use twinfleet::models::install::InstallPhase;
use twinfleet_protocols::HttpApi;
use twinfleet_protocols::mqtt::{MqttDevice, MqttGateway};

const N: usize = 10;

/// Devices that install what their twin sends: each acks `install_app` (failing the
/// versions `fail` names for it) and reports its apps.
fn devices(
    ops: String,
    tokens: Vec<String>,
    fail: Arc<BTreeSet<(String, String)>>,
) -> Vec<actix_rt::task::JoinHandle<()>> {
    (0..N)
        .map(|i| {
            let (ops, token, fail) = (ops.clone(), tokens[i].clone(), fail.clone());
            actix_rt::spawn(async move {
                let id = format!("l-{i}");
                let mut d = MqttDevice::connect(&ops, &id, &token).await.unwrap();
                while let Some(cmd) = d.next_command(Duration::from_secs(3600)).await {
                    let Some(v) = cmd.body.get("install_app") else { continue };
                    let version = v["version"].as_str().unwrap().to_string();
                    if fail.contains(&(id.clone(), version.clone())) {
                        d.ack(&cmd.command_id, false, "injected failure").await.unwrap();
                    } else {
                        d.ack(&cmd.command_id, true, "installed").await.unwrap();
                        d.report(json!({"apps": {"blink": version}})).await.unwrap();
                    }
                }
            })
        })
        .collect()
}

struct Fleet {
    p: Platform,
    api: HttpApi,
    gw: MqttGateway,
    admin: String,
    devices: Vec<actix_rt::task::JoinHandle<()>>,
}

impl Fleet {
    /// A request from a thread of its own: the test's thread runs the platform's
    /// supervisor and the devices, which must go on while the request waits.
    async fn http(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let (addr, token) = (self.api.local_addr(), self.admin.clone());
        let (method, path, body) = (method.to_string(), path.to_string(), body.map(String::from));
        actix_rt::task::spawn_blocking(move || http_as(addr, &token, &method, &path, body.as_deref())).await.unwrap()
    }

    async fn stop(self) {
        for d in self.devices {
            d.abort();
        }
        self.gw.stop().await;
        self.api.stop().await;
        self.p.shutdown().await;
    }
}

/// A platform in `dir` (fresh or restarted) with its gateways, devices and, when fresh,
/// type `lamp` (`defaults`), its twins l-0..l-9, and blink 1.0.0 and 2.0.0 in the store.
async fn platform(
    dir: &std::path::Path,
    at: i64,
    defaults: Value,
    fail: &[(&str, &str)],
    fresh: bool,
) -> (Fleet, Arc<twinfleet::VirtualClock>) {
    let clock = twinfleet::VirtualClock::new(twinfleet::models::Timestamp(at));
    let p = start(dir, Some(clock.clone()), test_settings()).await;
    let admin = if fresh {
        fleet(&p, "lamp", defaults, "l", N, |_| vec![]).await;
        admin_token(&p).await
    } else {
        String::new() // (the caller keeps the first run's token: it is stored)
    };
    let mut tokens = Vec::new();
    for i in 0..N {
        tokens.push(p.issue_device_token(&format!("l-{i}")).await.unwrap());
    }
    let api = HttpApi::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap(), 2).unwrap();
    let gw = MqttGateway::start(p.runtime().clone(), embedded_config()).await.unwrap();
    let fail = Arc::new(fail.iter().map(|(t, v)| (t.to_string(), v.to_string())).collect());
    let devices = devices(addr(gw.operational()), tokens, fail);
    let f = Fleet { p, api, gw, admin, devices };
    if fresh {
        for version in ["1.0.0", "2.0.0"] {
            let (status, body) =
                f.http("POST", "/api/v1/apps", Some(&json!({"app": "blink", "version": version}).to_string())).await;
            assert_eq!(status, 201, "{body}");
            let bytes = format!("blink {version}").into_bytes();
            let path = format!("/api/v1/apps/blink/{version}/artifacts/any/any");
            let (addr, token) = (f.api.local_addr(), f.admin.clone());
            let (status, _) = actix_rt::task::spawn_blocking(move || {
                put_bytes(addr, &token, &path, &[("x-checksum-sha256", &sha256(&bytes))], &bytes)
            })
            .await
            .unwrap();
            assert_eq!(status, 201);
        }
    }
    (f, clock)
}

/// Installs blink `version` on every twin directly and waits until all have it.
async fn everyone_has(f: &Fleet, version: &str) {
    for i in 0..N {
        f.p.runtime().install(&format!("l-{i}"), "blink", version, None).await.unwrap();
    }
    for i in 0..N {
        let twin = f.p.twin(&format!("l-{i}")).unwrap();
        eventually("the base version is installed", || async {
            (twin.get().await.unwrap().state.apps.get("blink").map(String::as_str) == Some(version)).then_some(())
        })
        .await;
    }
}

async fn version_of(f: &Fleet, twin: &str) -> Option<String> {
    f.p.twin(twin).unwrap().get().await.unwrap().state.apps.get("blink").cloned()
}

fn statuses(r: &Value) -> Vec<(String, String)> {
    r["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["twin"].as_str().unwrap().into(), t["status"].as_str().unwrap().into()))
        .collect()
}

async fn rollout_until(f: &Fleet, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let last = std::cell::RefCell::new(Value::Null);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, r) = f.http("GET", &format!("/api/v1/rollouts/{id}"), None).await;
        if done(&r) {
            return r;
        }
        *last.borrow_mut() = r;
        assert!(std::time::Instant::now() < deadline, "timed out waiting for: {what}; the rollout: {}", last.borrow());
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    }
}

#[actix_rt::test]
async fn injected_failures_abort_the_first_wave_and_roll_the_updated_devices_back() {
    let dir = tempfile::tempdir().unwrap();
    let (f, _) = platform(dir.path(), 1_700_000_000_000, json!({}), &[("l-1", "2.0.0")], true).await;
    everyone_has(&f, "1.0.0").await;
    let spec = json!({"id": "r1", "app": "blink", "version": "2.0.0", "device_type": "lamp",
                      "waves": [20, 60, 100], "abort": {"failure_rate": 0.3, "min_count": 2}});
    let (status, r) = f.http("POST", "/api/v1/rollouts", Some(&spec.to_string())).await;
    assert_eq!(status, 201, "{r}");
    // A second rollout of the same app on the same twins is refused, with the reason.
    let again = json!({"id": "r2", "app": "blink", "version": "2.0.0", "device_type": "lamp"});
    let (status, body) = f.http("POST", "/api/v1/rollouts", Some(&again.to_string())).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["message"].as_str().unwrap().contains("rollout r1"), "{body}");

    let r = rollout_until(&f, "r1", "the rollout aborts and rolls back", |r| {
        r["state"] == "aborted" && statuses(r)[0].1 == "rolled_back"
    })
    .await;
    assert!(r["reason"].as_str().unwrap().contains("1 of 2 installs failed in wave 1"), "{r}");
    let s = statuses(&r);
    assert_eq!(s[1].1, "failed");
    assert!(s[2..].iter().all(|(_, st)| st == "postponed"), "{s:?}");
    assert_eq!(r["progress"][0]["failed"], 1);
    assert_eq!(r["progress"][1]["postponed"], 4);
    assert_eq!(version_of(&f, "l-0").await.as_deref(), Some("1.0.0"), "rolled back");
    for i in 2..N {
        assert_eq!(version_of(&f, &format!("l-{i}")).await.as_deref(), Some("1.0.0"), "never updated");
    }
    let (status, _) = f.http("POST", "/api/v1/rollouts/r1/resume", None).await;
    assert_eq!(status, 409, "an ended rollout takes no control");
    // The CLI shows the same.
    let args: Vec<String> =
        ["rollouts", "list", "--api", &format!("http://{}", f.api.local_addr()), "--token", &f.admin]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let (ok, out, err) = actix_rt::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::binary::client(&args)
    })
    .await
    .unwrap();
    assert!(ok && out.contains("r1") && out.contains("aborted (1 of 2 installs failed"), "{out}{err}");
    assert!(out.contains("20.0%: 0/2 ok, 1 failed, 1 rolled back; 60.0%: 0/4 ok, 0 failed, 4 postponed"), "{out}");
    f.stop().await;
}

#[actix_rt::test]
async fn alerts_after_the_install_stop_the_rollout_at_its_health_gate() {
    let dir = tempfile::tempdir().unwrap();
    let rules = json!({"rules": {"hot": {"kind": "threshold", "metric": "temp", "above": 80, "severity": "major"}}});
    let (f, clock) = platform(dir.path(), 1_700_000_000_000, rules, &[], true).await;
    let spec = json!({"id": "gated", "app": "blink", "version": "2.0.0", "device_type": "lamp", "waves": [20, 100],
                      "on_abort": "postpone", "health_gate": {"min_severity": "major", "hold": "10m"}});
    let (status, r) = f.http("POST", "/api/v1/rollouts", Some(&spec.to_string())).await;
    assert_eq!(status, 201, "{r}");
    let r = rollout_until(&f, "gated", "the first wave is held at the gate", |r| r["gate"].is_object()).await;
    assert_eq!(r["progress"][0]["succeeded"], 2);
    // An updated device runs hot during the gate.
    let now = f.p.runtime().clock().now();
    let hot = twinfleet::models::MetricPoint { metric: "temp".into(), at: now, value: 95.0 };
    f.p.twin("l-0").unwrap().ingest(vec![hot]).await.unwrap();
    let r = rollout_until(&f, "gated", "the rollout stops at the gate", |r| r["state"] == "aborted").await;
    let s = statuses(&r);
    assert_eq!(s[0].1, "failed");
    assert!(r["targets"][0]["reason"].as_str().unwrap().contains("alert hot (major) during the health gate"), "{r}");
    assert!(s[2..].iter().all(|(_, st)| st == "postponed"), "the next wave never started: {s:?}");
    clock.advance(3_600_000);
    for i in 2..N {
        assert_eq!(version_of(&f, &format!("l-{i}")).await, None, "never installed");
    }
    f.stop().await;
}

#[actix_rt::test]
async fn a_rollout_resumes_after_a_restart_of_the_platform() {
    let dir = tempfile::tempdir().unwrap();
    let (f, clock) = platform(dir.path(), 1_700_000_000_000, json!({}), &[], true).await;
    let spec = json!({"id": "night", "app": "blink", "version": "2.0.0", "device_type": "lamp", "waves": [30, 100],
                      "health_gate": {"min_severity": "critical", "hold": "1h"}});
    let (status, _) = f.http("POST", "/api/v1/rollouts", Some(&spec.to_string())).await;
    assert_eq!(status, 201);
    rollout_until(&f, "night", "the first wave is held at the gate", |r| r["gate"].is_object()).await;
    let (status, paused) = f.http("POST", "/api/v1/rollouts/night/pause", None).await;
    assert_eq!((status, paused["state"].as_str()), (200, Some("paused")), "{paused}");
    let at = f.p.runtime().clock().now().0;
    let admin = f.admin.clone();
    f.stop().await;
    drop(clock);

    // The platform comes back: the rollout is where it was, paused; resumed, it waits out
    // its gate on the clock and finishes.
    let (mut f, clock) = platform(dir.path(), at, json!({}), &[], false).await;
    f.admin = admin;
    let (_, r) = f.http("GET", "/api/v1/rollouts/night", None).await;
    assert_eq!((r["state"].as_str(), r["progress"][0]["succeeded"].as_u64()), (Some("paused"), Some(3)), "{r}");
    let (status, r) = f.http("POST", "/api/v1/rollouts/night/resume", None).await;
    assert_eq!(status, 200, "{r}");
    clock.advance(3_600_000);
    // The last wave is held by the gate too: the rollout completes once it proved healthy.
    rollout_until(&f, "night", "the last wave is installed and held", |r| {
        r["progress"][1]["succeeded"] == 7 && r["gate"].is_object()
    })
    .await;
    clock.advance(3_600_000);
    let r = rollout_until(&f, "night", "the rollout completes", |r| r["state"] == "completed").await;
    assert_eq!(r["progress"][1]["succeeded"], 7);
    for i in 0..N {
        let twin = f.p.twin(&format!("l-{i}")).unwrap();
        let job = twin.get().await.unwrap().state.install.unwrap();
        assert!(matches!(job.phase, InstallPhase::Installed { .. }), "l-{i}: {job:?}");
    }
    f.stop().await;
}
