//! A SIGKILL of a twinfleet process in the middle of ingest over MQTT (QoS 1) and gRPC
//! loses no point it acknowledged: a PUBACK, or a gRPC batch ack, means the point is in
//! the series store's WAL, synced.

use crate::mqtt::{addr, embedded_config};
use crate::support::*;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use twinfleet::TelemetryQuery;
use twinfleet::models::Timestamp;
use twinfleet_protocols::mqtt::{MqttDevice, MqttGateway, QoS};
use twinfleet_protocols::{DevicePoint, GrpcDevice, GrpcGateway};

const CHILD_ENV: &str = "TWINFLEET_TEST_INGEST_CHILD_DIR";
const DEVICES: usize = 8;

/// Not a test on its own: the platform process of `acknowledged_points_survive_sigkill`.
#[actix_rt::test]
async fn child_platform() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let p = start(std::path::Path::new(&dir), None, test_settings()).await;
    fleet(&p, "meter", json!({}), "k", 2 * DEVICES, |_| vec![]).await;
    let mqtt = MqttGateway::start(p.runtime().clone(), embedded_config()).await.unwrap();
    let grpc = GrpcGateway::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let mut tokens = Vec::new();
    for i in 0..2 * DEVICES {
        tokens.push(p.issue_device_token(&format!("k-{i}")).await.unwrap());
    }
    println!("READY {} {} {}", addr(mqtt.operational()), grpc.local_addr(), tokens.join(" "));
    // Runs until killed.
    std::future::pending::<()>().await;
}

#[test]
fn acknowledged_points_survive_sigkill_over_mqtt_and_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "ingest_crash::child_platform", "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("child starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = loop {
        let line = lines.next().expect("child prints READY").unwrap();
        // (The test harness may print its own "test ... " before it on the same line.)
        if let Some(at) = line.find("READY ") {
            break line[at + 6..].to_string();
        }
    };
    let parts: Vec<String> = ready.split_whitespace().map(String::from).collect();
    let (mqtt_addr, grpc_addr, tokens) = (parts[0].clone(), parts[1].clone(), parts[2..].to_vec());
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let base = now_ms - 3_600_000;

    // Devices publish point i at time base + i until the kill; each counts what the
    // platform acknowledged.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (mqtt_acked, grpc_acked) = rt.block_on(async {
        let mut mqtt_devs = Vec::new();
        for (i, token) in tokens.iter().enumerate().take(DEVICES) {
            mqtt_devs.push(Arc::new(MqttDevice::connect(&mqtt_addr, &format!("k-{i}"), token).await.unwrap()));
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for d in &mqtt_devs {
            let (d, stop) = (d.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = 0i64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let body = json!({"ts": base + i, "values": {"v": i}}).to_string().into_bytes();
                    if d.publish_raw(&format!("devices/{}/telemetry", d.id()), QoS::AtLeastOnce, body).await.is_err() {
                        break;
                    }
                    i += 1;
                    if i % 16 == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }));
        }
        let grpc_acked: Vec<Arc<std::sync::atomic::AtomicI64>> =
            (0..DEVICES).map(|_| Arc::new(std::sync::atomic::AtomicI64::new(0))).collect();
        for (k, token) in tokens.iter().enumerate().skip(DEVICES) {
            let (acked, stop, token, grpc_addr) =
                (grpc_acked[k - DEVICES].clone(), stop.clone(), token.clone(), grpc_addr.clone());
            tasks.push(tokio::spawn(async move {
                let mut dev =
                    GrpcDevice::connect(&format!("http://{grpc_addr}"), &format!("k-{k}"), &token).await.unwrap();
                let mut stream = dev.telemetry().await.unwrap();
                let mut i = 0i64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let points =
                        (i..i + 10).map(|j| DevicePoint { metric: "v".into(), value: j as f64, at_ms: Some(base + j) });
                    if stream.send(points.collect()).await.is_err() {
                        break;
                    }
                    i += 10;
                    // Acknowledged: every point below i is durable.
                    acked.store(i, std::sync::atomic::Ordering::Relaxed);
                }
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while mqtt_devs.iter().map(|d| d.acked()).sum::<u64>() < 2_000
            || grpc_acked.iter().any(|a| a.load(std::sync::atomic::Ordering::Relaxed) < 200)
        {
            assert!(Instant::now() < deadline, "ingest too slow before the kill");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Mid-stream: every device has messages in flight.
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        let mqtt_acked: Vec<u64> = mqtt_devs.iter().map(|d| d.acked()).collect();
        let grpc_acked: Vec<i64> = grpc_acked.iter().map(|a| a.load(std::sync::atomic::Ordering::Relaxed)).collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        (mqtt_acked, grpc_acked)
    });
    drop(rt);

    // PUBACKs come in the order the messages were sent, so n PUBACKs cover points 0..n.
    let expected: Vec<(usize, i64)> = mqtt_acked
        .iter()
        .enumerate()
        .map(|(k, n)| (k, *n as i64))
        .chain(grpc_acked.iter().enumerate().map(|(k, n)| (k + DEVICES, *n)))
        .collect();
    actix_rt::System::new().block_on(async {
        let p = start(dir.path(), None, test_settings()).await;
        for (k, n) in expected {
            let twin = p.twin(&format!("k-{k}")).unwrap();
            let to = Timestamp(base + 3_000_000);
            let q = TelemetryQuery { metric: Some("v".into()), from: Timestamp(base), to, limit: 10_000_000 };
            let page = twin.telemetry_page(q).await.unwrap();
            let mut got: Vec<i64> = page.points.iter().map(|pt| pt.at.0 - base).filter(|i| *i < n).collect();
            got.sort_unstable();
            got.dedup();
            assert_eq!(got.len() as i64, n, "k-{k}: {n} points acknowledged, {} survived", got.len());
            // The latest value came back too (it rides in the WAL with the points): at
            // least the last acknowledged one.
            if n > 0 {
                let view = twin.get().await.unwrap();
                let latest = view.telemetry_latest.get("v").unwrap_or_else(|| panic!("k-{k}: no latest value"));
                assert!(latest.at.0 >= base + n - 1, "k-{k}: latest at {} < last acked {}", latest.at.0 - base, n - 1);
            }
        }
        p.shutdown().await;
    });
}
