//! History exports and alert state across a SIGKILL of a child `twinfleet` process: a
//! file export (NDJSON and CSV) resumes with neither gaps nor duplicates, a webhook
//! export resumes with nothing missing and nothing repeated beyond a whole batch it
//! names again, and the alert raised before the kill is neither lost nor raised again.

use crate::support::{Hook, eventually, http_as, settled};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use twinfleet_protocols::mqtt::{MqttDevice, QoS};

const TOKEN: &str = "tfa_export-test-admin-token-0123456789";

/// The child `twinfleet`, killed if the test ends without stopping it (a failed
/// assertion), so it does not outlive the test holding its output open.
struct Proc(Option<Child>);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts the binary on ephemeral ports with `config`; returns it with its HTTP and
/// MQTT addresses.
fn spawn(dir: &Path, config: &Path) -> (Proc, SocketAddr, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_twinfleet"))
        .arg("run")
        .args(["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0", "--mqtt", "127.0.0.1:0"])
        .args(["--mqtt-provisioning", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--config")
        .arg(config)
        .env("TWINFLEET_ADMIN_TOKEN", TOKEN)
        .env_remove("TWINFLEET_DATA_DIR")
        .env_remove("TWINFLEET_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("twinfleet binary starts");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    loop {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "twinfleet closed stdout before it was ready");
        let Some(http) = line.split("http://").nth(1).and_then(|r| r.split_whitespace().next()) else { continue };
        let mqtt = line.split("MQTT on ").nth(1).and_then(|r| r.split_whitespace().next()).expect("MQTT address");
        // Keep reading stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        return (Proc(Some(child)), http.parse().unwrap(), mqtt.to_string());
    }
}

fn kill(mut p: Proc) {
    let mut child = p.0.take().unwrap();
    child.kill().expect("SIGKILL"); // Child::kill sends SIGKILL on Unix.
    child.wait().unwrap();
}

fn stop(mut p: Proc) {
    let mut child = p.0.take().unwrap();
    // Safety: kill(2) on a pid we own.
    #[allow(unsafe_code)]
    let r = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(r, 0);
    assert!(child.wait().unwrap().success(), "a clean stop");
}

fn api(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> serde_json::Value {
    let (status, v) = http_as(addr, TOKEN, method, path, body);
    assert!((200..300).contains(&status), "{method} {path}: {status} {v}");
    v
}

/// A point as exported: twin, metric, timestamp, value.
type Point = (String, String, i64, String);

/// Publishes `n` messages of device `id` (temp and rssi each), QoS 1, from `t0`, and
/// waits for every PUBACK; returns the points.
async fn publish(mqtt: &str, id: &str, token: &str, t0: i64, n: usize, temp: f64) -> Vec<Point> {
    let d = MqttDevice::connect(mqtt, id, token).await.expect("the device connects");
    let mut points = Vec::new();
    let mut sent = 0;
    for i in 0..n as i64 {
        let (at, rssi) = (t0 + i * 1_000, -40.0 - i as f64);
        d.telemetry(QoS::AtLeastOnce, Some(at), &[("temp", temp), ("rssi", rssi)]).await.unwrap();
        sent += 1;
        points.push((id.into(), "temp".into(), at, temp.to_string()));
        points.push((id.into(), "rssi".into(), at, rssi.to_string()));
        if i == 3 {
            // A redelivery of the same message: stored once, exported once.
            d.telemetry(QoS::AtLeastOnce, Some(at), &[("temp", temp), ("rssi", rssi)]).await.unwrap();
            sent += 1;
        }
    }
    // Every publish issued, not only those written so far (the client queues them).
    eventually("every publish acknowledged", || async { (d.acked() >= sent).then_some(()) }).await;
    points
}

fn file_points(path: &Path) -> Vec<Point> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
            assert_eq!(v["device_type"], "meter");
            let value = v["value"].as_f64().unwrap().to_string();
            (v["twin"].as_str().unwrap().into(), v["metric"].as_str().unwrap().into(), v["at"].as_i64().unwrap(), value)
        })
        .collect()
}

/// The webhook's batches with repeats dropped (a batch sent again after the kill names
/// the same `from`): the points, and how many batches were repeats.
fn hook_points(hook: &Hook) -> (Vec<Point>, usize) {
    let mut by_from: BTreeMap<(u64, u64), Vec<Point>> = BTreeMap::new();
    let mut repeats = 0;
    for b in hook.taken() {
        let from: twinfleet_runtime::series::WalPosition = b["from"].as_str().unwrap().parse().unwrap();
        let points = b["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let value = p["value"].as_f64().unwrap().to_string();
                (
                    p["twin"].as_str().unwrap().into(),
                    p["metric"].as_str().unwrap().into(),
                    p["at"].as_i64().unwrap(),
                    value,
                )
            })
            .collect();
        if by_from.insert((from.generation, from.offset), points).is_some() {
            repeats += 1;
        }
    }
    (by_from.into_values().flatten().collect(), repeats)
}

fn sorted(mut v: Vec<Point>) -> Vec<Point> {
    v.sort();
    v
}

fn hot_alerts(addr: SocketAddr) -> Vec<serde_json::Value> {
    let page = api(addr, "GET", "/api/v1/alerts?rule=hot", None);
    page["alerts"].as_array().cloned().unwrap_or_else(|| page.as_array().cloned().unwrap_or_default())
}

#[actix_rt::test]
async fn exports_and_alert_state_survive_a_sigkill_with_neither_gaps_nor_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    // The webhook refuses its first three batches: the export is behind at the kill.
    let hook = Hook::start(vec![503, 503, 503]);
    let config = dir.path().join("twinfleet.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[exports]]
name = "lake"
device_type = "meter"
kind = "file"
path = "exports/meter.ndjson"
batch_points = 25

[[exports]]
name = "sheet"
device_type = "meter"
metrics = ["temp"]
kind = "file"
path = "exports/meter.csv"
format = "csv"

[[exports]]
name = "hall-hook"
group = "hall"
kind = "webhook"
url = "http://{}/history"
secret = "s3cret"
batch_points = 10
"#,
            hook.addr
        ),
    )
    .unwrap();
    let (child, addr, mqtt) = spawn(dir.path(), &config);
    let rules = r#"{"id":"meter","model":"M-1","defaults":{"rules":{"hot":{"kind":"threshold","metric":"temp","above":80,"clear_below":75,"severity":"major"}}}}"#;
    api(addr, "POST", "/api/v1/device-types", Some(rules));
    api(addr, "POST", "/api/v1/dtas", Some(r#"{"id":"hall","name":"Hall","parents":[],"layers":{}}"#));
    let mut tokens = BTreeMap::new();
    for (id, dtas) in [("m-0", "[]"), ("m-1", r#"["hall"]"#)] {
        let twin = format!(r#"{{"id":"{id}","device_type":"meter","dtas":{dtas}}}"#);
        api(addr, "POST", "/api/v1/twins", Some(&twin));
        let t = api(addr, "POST", &format!("/api/v1/twins/{id}/token"), None);
        tokens.insert(id, t["token"].as_str().unwrap().to_string());
    }
    // An hour back: well inside what the platform takes (no future timestamps), and the
    // second run's points still after the first's.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let t0 = now - 3_600_000;
    let mut expect = publish(&mqtt, "m-0", &tokens["m-0"], t0, 40, 20.0).await;
    expect.extend(publish(&mqtt, "m-1", &tokens["m-1"], t0, 40, 95.0).await);
    let raised = eventually("m-1's hot alert", || async {
        let a = hot_alerts(addr);
        (!a.is_empty()).then_some(a)
    })
    .await;
    assert_eq!(raised.len(), 1, "{raised:?}");
    assert_eq!((raised[0]["twin"].as_str(), raised[0]["state"].as_str()), (Some("m-1"), Some("raised")));

    // The kill: whatever the exports had not delivered yet is still in the WAL. The hook
    // refuses from here until the restarted process has counted a failure.
    hook.refusing.store(true, std::sync::atomic::Ordering::SeqCst);
    kill(child);
    let (child, addr, mqtt) = spawn(dir.path(), &config);
    expect.extend(publish(&mqtt, "m-0", &tokens["m-0"], t0 + 100_000, 20, 21.0).await);
    expect.extend(publish(&mqtt, "m-1", &tokens["m-1"], t0 + 100_000, 20, 96.0).await);
    let expect = sorted(expect);

    let ndjson = dir.path().join("data/exports/meter.ndjson");
    // Until it has them all; then any gap or repeat is named.
    let got = sorted(settled(|got: &Vec<Point>| got.len() >= expect.len(), || async { file_points(&ndjson) }).await);
    let missing: Vec<&Point> = expect.iter().filter(|p| !got.contains(p)).collect();
    let extra: Vec<&Point> = got.iter().filter(|p| !expect.contains(p)).collect();
    assert_eq!(got, expect, "every acknowledged point exactly once; missing {missing:?}, extra {extra:?}");

    // The CSV export runs on its own: wait until it has at least as many rows, then
    // check it has exactly as many.
    let csv_path = dir.path().join("data/exports/meter.csv");
    let want_temps = expect.iter().filter(|p| p.1 == "temp").count();
    let csv = eventually("the CSV export has every temp point", || async {
        let csv = std::fs::read_to_string(&csv_path).unwrap_or_default();
        (csv.lines().count() > want_temps).then_some(csv)
    })
    .await;
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("twin,device_type,metric,at,value"), "one header");
    let temps: Vec<&str> = lines.collect();
    assert_eq!(temps.len(), want_temps, "only temp, once each");
    assert!(temps.iter().all(|l| l.contains(",meter,temp,")), "{temps:?}");

    // Counters are per process: the restarted one counts the refusals it meets.
    let failed = |text: &str| -> u64 {
        let line = text.lines().find(|l| l.starts_with(r#"twinfleet_export_failed_total{export="hall-hook"} "#));
        line.and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0)
    };
    eventually("the restarted webhook export counts a refusal", || async {
        let (_, metrics) = http_as(addr, TOKEN, "GET", "/metrics", None);
        (failed(metrics.as_str().unwrap_or_default()) >= 1).then_some(())
    })
    .await;
    hook.refusing.store(false, std::sync::atomic::Ordering::SeqCst);

    let hall: Vec<Point> = expect.iter().filter(|p| p.0 == "m-1").cloned().collect();
    let (got, repeats) = eventually("the webhook has every point of the hall", || async {
        let (got, repeats) = hook_points(&hook);
        (got.len() >= hall.len()).then_some((got, repeats))
    })
    .await;
    assert_eq!(sorted(got), hall, "every point of the group's members, nothing of others");
    assert!(repeats <= 1, "at most the batch in flight at the kill is sent again: {repeats}");
    let (headers, body, _) = hook.got.lock().unwrap().iter().find(|r| r.2 == 200).cloned().unwrap();
    assert_eq!(headers["x-twinfleet-signature"], twinfleet_protocols::notify::signature("s3cret", &body));
    let refused = hook.got.lock().unwrap().iter().filter(|r| r.2 == 503).count();
    assert!(refused >= 4, "the three scripted refusals and at least one after the restart: {refused}");

    // The alert: still the one raised before the kill, not raised again.
    let after = hot_alerts(addr);
    assert_eq!(after.len(), 1, "nothing re-raised: {after:?}");
    assert_eq!(after[0]["id"], raised[0]["id"], "nothing lost");
    assert_eq!(after[0]["state"], "raised");

    let exports = api(addr, "GET", "/api/v1/exports", None);
    let names: Vec<&str> = exports.as_array().unwrap().iter().map(|e| e["spec"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["hall-hook", "lake", "sheet"]);
    let hook_view = &exports[0];
    assert_eq!(hook_view["spec"]["secret"], "(set)", "secrets are not shown");
    // The cursor is stored after the file is written: wait for it to catch up.
    let lake_points = eventually("the file export's cursor counts every point", || async {
        let exports = api(addr, "GET", "/api/v1/exports", None);
        let n = exports[1]["cursor"]["points"].as_u64();
        (n >= Some(expect.len() as u64)).then_some(n)
    })
    .await;
    assert_eq!(lake_points, Some(expect.len() as u64));
    let (_, metrics) = http_as(addr, TOKEN, "GET", "/metrics", None);
    let text = metrics.as_str().unwrap_or_default();
    assert!((1..=refused as u64).contains(&failed(text)), "{text}");
    assert!(text.contains(r#"twinfleet_export_duplicates_total{export="lake"} "#), "{text}");
    stop(child);
}
