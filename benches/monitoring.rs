//! Monitoring cost and latency, in process (the twins' batched ingest path, no device
//! transport): 10,000 twins of a type with no rules and 10,000 of a type with 5 rules
//! each (threshold with hysteresis, range, rate of change, staleness, offline), fed
//! 10-point batches by 500 concurrent senders through `TwinHandle::ingest`, alternating
//! the two types in rounds in the same run (rows: points/s, medians of the rounds). Then
//! the alert latency: at half the measured rate, one twin's point crosses its threshold
//! every 20 ms; the time from `ingest` called to the raise arriving on the alert book's
//! broadcast (what `/alerts/stream` forwards), p50/p99.
//!
//! `sse`: the same at half the rate, end to end: a device publishes over MQTT to the
//! embedded gateway, and an SSE client reads `GET /api/v1/alerts/stream` over loopback
//! HTTP; from the publish call to the raise's `data:` line parsed by the client.
//!
//! `webhook`: 10,000 twins raise an alert each, as fast as they take their points; a
//! webhook sink delivers every raise to a keep-alive HTTP server on loopback (the bench's
//! own, answering 200 at once); alerts/s from the first raise to the last delivery.
//!
//! `memory`: the resident memory of `TWINFLEET_BENCH_MEM_TWINS` (default 100,000) twins
//! with and without rules, each having taken one batch, each in a child process.
//!
//! `cargo bench --bench monitoring`. `TWINFLEET_BENCH_SECTIONS` (default
//! `ingest,sse,webhook,memory`), `TWINFLEET_BENCH_TWINS` (default 10,000),
//! `TWINFLEET_BENCH_ROUNDS` (default 5).

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use twinfleet::models::{DeviceTypeId, MetricPoint, TwinId};
use twinfleet::{DeviceTypeSpec, Platform, TwinSpec};
use twinfleet_protocols::mqtt::{Endpoint, MqttConfig, MqttDevice, MqttGateway, QoS};

mod common;
use common::{cores, env_or, median, pct, rss};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rules() -> serde_json::Value {
    serde_json::json!({"rules": {
        "hot": {"kind": "threshold", "metric": "m0", "above": 1e9, "clear_below": 9e8, "for": "10s"},
        "band": {"kind": "range", "metric": "m1", "min": -1e9, "max": 1e9},
        "jump": {"kind": "rate_of_change", "metric": "m2", "max_per_s": 1e12},
        "stale": {"kind": "staleness", "metric": "m3", "after": "1h"},
        "offline": {"kind": "offline", "after": "1h"}
    }})
}

async fn fleet(
    p: &Platform,
    ty: &str,
    defaults: serde_json::Value,
    prefix: &str,
    n: usize,
) -> Vec<twinfleet::TwinHandle> {
    let spec = DeviceTypeSpec {
        defaults: defaults.as_object().cloned().unwrap_or_default(),
        ..DeviceTypeSpec::new(DeviceTypeId::new(ty).unwrap())
    };
    let h = p.create_device_type(spec).await.unwrap();
    let specs: Vec<TwinSpec> =
        (0..n).map(|i| TwinSpec::new(TwinId::new(format!("{prefix}-{i:06}")).unwrap())).collect();
    h.spawn_fleet(specs).await.unwrap();
    (0..n).map(|i| p.twin(&format!("{prefix}-{i:06}")).unwrap()).collect()
}

fn batch(rt: &twinfleet::TwinRuntime, k: u64) -> Vec<MetricPoint> {
    let now = rt.clock().now();
    (0..10).map(|m| MetricPoint { metric: format!("m{m}"), at: now, value: (k % 1000) as f64 + m as f64 }).collect()
}

/// Points/s of `secs` of 500 senders over `twins`.
async fn ingest_rate(p: &Platform, twins: &Arc<Vec<twinfleet::TwinHandle>>, secs: f64) -> f64 {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let senders = (0..500).map(|s| {
        let (p, twins) = (p.runtime().clone(), twins.clone());
        actix_rt::spawn(async move {
            let mut n = 0u64;
            let mut k = s as u64;
            while Instant::now() < until {
                let t = &twins[(k as usize * 7919) % twins.len()];
                k += 1;
                if t.ingest(batch(&p, k)).await.is_ok() {
                    n += 10;
                }
            }
            n
        })
    });
    let t = Instant::now();
    let total: u64 = futures::future::join_all(senders).await.into_iter().map(|r| r.unwrap()).sum();
    total as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    // As the `twinfleet` binary does at its start (see twinfleet::memory).
    twinfleet::memory::disable_transparent_huge_pages().expect("prctl(PR_SET_THP_DISABLE)");
    tracing_subscriber::fmt().with_env_filter("error").with_writer(std::io::stderr).init();
    if let Ok(mode) = std::env::var("TWINFLEET_MONITORING_MEM") {
        return actix_rt::System::new().block_on(memory(mode == "rules"));
    }
    actix_rt::System::new().block_on(run());
}

/// The child of the memory rows: prints `MEM <bytes per twin>`.
async fn memory(with_rules: bool) {
    let m = env_or("TWINFLEET_BENCH_MEM_TWINS", 100_000) as usize;
    let dir = std::env::temp_dir().join(format!("twinfleet-monitoring-mem-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let p = Platform::builder(&dir).start().await.unwrap();
    let before = rss();
    let defaults = if with_rules { rules() } else { serde_json::json!({}) };
    let twins = Arc::new(fleet(&p, "mem", defaults, "x", m).await);
    let rt = p.runtime().clone();
    for chunk in twins.chunks(1000) {
        let sends = chunk.iter().enumerate().map(|(i, t)| t.ingest(batch(&rt, i as u64)));
        futures::future::join_all(sends).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!("MEM {}", rss().saturating_sub(before) as f64 / m as f64);
    p.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn run() {
    let sections = std::env::var("TWINFLEET_BENCH_SECTIONS").unwrap_or_else(|_| "ingest,sse,webhook,memory".into());
    let on = |s: &str| sections.split(',').any(|x| x.trim() == s);
    let n = env_or("TWINFLEET_BENCH_TWINS", 10_000) as usize;
    let rounds = env_or("TWINFLEET_BENCH_ROUNDS", 5) as usize;
    if on("ingest") || on("sse") {
        let dir = std::env::temp_dir().join(format!("twinfleet-monitoring-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let p = Platform::builder(&dir).start().await.unwrap();
        let plain = Arc::new(fleet(&p, "plain", serde_json::json!({}), "p", n).await);
        let watched = Arc::new(fleet(&p, "watched", rules(), "w", n).await);
        // Warm up both (the first batch resolves a twin's rules).
        ingest_rate(&p, &plain, 1.0).await;
        ingest_rate(&p, &watched, 1.0).await;
        let rate = if on("ingest") {
            ingest_rows(&p, &plain, &watched, n, rounds).await
        } else {
            let r = median(vec![ingest_rate(&p, &watched, 3.0).await, ingest_rate(&p, &watched, 3.0).await]);
            println!("(measured rate with 5 rules: {r:.0} points/s)");
            r
        };
        if on("ingest") {
            latency_in_process(&p, &watched, rate / 2.0, n).await;
        }
        if on("sse") {
            latency_mqtt_to_sse(&p, &watched, rate / 2.0, n).await;
        }
        p.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
    if on("webhook") {
        webhook_fan_out(n).await;
    }
    if on("memory") {
        memory_rows();
    }
}

/// The ingest rows (no rules against 5 rules, alternating rounds); the median rate with
/// rules.
async fn ingest_rows(
    p: &Platform,
    plain: &Arc<Vec<twinfleet::TwinHandle>>,
    watched: &Arc<Vec<twinfleet::TwinHandle>>,
    n: usize,
    rounds: usize,
) -> f64 {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        a.push(ingest_rate(p, plain, 3.0).await);
        b.push(ingest_rate(p, watched, 3.0).await);
    }
    let (ra, rb) = (median(a.clone()), median(b.clone()));
    println!("| benchmark | twins | cores | points/s (median of {rounds}) | rounds | vs no rules |");
    println!("|---|---|---|---|---|---|");
    let fmt = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
    println!("| ingest, 10-point batches, no rules | {n} | {} | {ra:.0} | {} | |", cores(), fmt(&a));
    println!(
        "| ingest, 10-point batches, 5 rules per twin | {n} | {} | {rb:.0} | {} | {:+.1}% |",
        cores(),
        fmt(&b),
        (rb / ra - 1.0) * 100.0
    );
    rb
}

/// Paced background load of `target` points/s on `twins` until `until`: 100 tasks, each
/// its share. Yields the rate achieved (points/s).
fn background_load(
    p: &Platform,
    twins: &Arc<Vec<twinfleet::TwinHandle>>,
    target: f64,
    until: Instant,
) -> actix_rt::task::JoinHandle<f64> {
    let (p, twins) = (p.runtime().clone(), twins.clone());
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    actix_rt::spawn(async move {
        let per = target / 10.0 / 100.0;
        let tasks = (0..100).map(|s| {
            let (p, twins, done) = (p.clone(), twins.clone(), done.clone());
            actix_rt::spawn(async move {
                let mut k = s as u64;
                let gap = Duration::from_secs_f64(1.0 / per.max(1.0));
                let mut next = Instant::now();
                while Instant::now() < until {
                    let t = &twins[(k as usize * 7919) % twins.len()];
                    k += 1;
                    if t.ingest(batch(&p, k)).await.is_ok() {
                        done.fetch_add(10, Relaxed);
                    }
                    next += gap;
                    if let Some(d) = next.checked_duration_since(Instant::now()) {
                        tokio::time::sleep(d).await;
                    }
                }
            })
        });
        futures::future::join_all(tasks).await;
        done.load(Relaxed) as f64 / started.elapsed().as_secs_f64()
    })
}

/// A type `ty` with one threshold rule (`t` above 50) and its twin `{ty}-0`.
async fn probe_twin(p: &Platform, ty: &str) -> twinfleet::TwinHandle {
    let spec = DeviceTypeSpec {
        defaults: serde_json::json!({"rules": {"hot": {"kind": "threshold", "metric": "t", "above": 50}}})
            .as_object()
            .cloned()
            .unwrap(),
        ..DeviceTypeSpec::new(DeviceTypeId::new(ty).unwrap())
    };
    p.create_device_type(spec)
        .await
        .unwrap()
        .spawn_fleet(vec![TwinSpec::new(TwinId::new(format!("{ty}-0")).unwrap())])
        .await
        .unwrap();
    p.twin(&format!("{ty}-0")).unwrap()
}

fn latency_row(what: &str, lat: &mut [f64], target: f64, achieved: f64, n: usize) {
    lat.sort_by(|a, b| a.total_cmp(b));
    println!();
    println!("| alert latency | samples | cores | p50 | p99 | load |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {what} | {} | {} | {:.2} ms | {:.2} ms | {achieved:.0} points/s achieved (target {target:.0}) on {n} twins with 5 rules |",
        lat.len(),
        cores(),
        pct(lat, 0.5),
        pct(lat, 0.99)
    );
}

/// Ingest → raise on the alert book's broadcast, in process, under half the rate.
async fn latency_in_process(p: &Platform, watched: &Arc<Vec<twinfleet::TwinHandle>>, target: f64, n: usize) {
    let probe = probe_twin(p, "probe").await;
    let load = background_load(p, watched, target, Instant::now() + Duration::from_secs(12));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut alerts = p.runtime().alert_book().subscribe();
    let mut lat = Vec::new();
    for i in 0..400 {
        let v = if i % 2 == 0 { 99.0 } else { 1.0 };
        let now = p.runtime().clock().now();
        let t = Instant::now();
        probe.ingest(vec![MetricPoint { metric: "t".into(), at: now, value: v }]).await.unwrap();
        if v > 50.0 {
            loop {
                let (_, a) = tokio::time::timeout(Duration::from_secs(5), alerts.recv()).await.unwrap().unwrap();
                if a.twin == "probe-0" && a.state == twinfleet::models::AlertState::Raised {
                    break;
                }
            }
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let achieved = load.await.unwrap();
    latency_row("ingest → raise on the alert book's broadcast (in process)", &mut lat, target, achieved, n);
}

/// MQTT publish on the embedded gateway → the raise's event read by an SSE client of
/// `/api/v1/alerts/stream` over loopback, under half the rate.
async fn latency_mqtt_to_sse(p: &Platform, watched: &Arc<Vec<twinfleet::TwinHandle>>, target: f64, n: usize) {
    let _probe = probe_twin(p, "edge").await;
    let token = p.issue_device_token("edge-0").await.unwrap();
    let admin = p.bootstrap_admin(None).await.unwrap().expect("a fresh platform issues a token");
    let api = twinfleet_protocols::HttpApi::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap(), 1).unwrap();
    let http = api.local_addr();
    let cfg = MqttConfig {
        operational: "127.0.0.1:0".parse().unwrap(),
        provisioning: "127.0.0.1:0".parse().unwrap(),
        ..MqttConfig::default()
    };
    let gw = MqttGateway::start(p.runtime().clone(), cfg).await.unwrap();
    let Endpoint::Listen(mqtt) = gw.operational().clone() else { unreachable!() };
    let device = MqttDevice::connect(&mqtt.to_string(), "edge-0", &token).await.unwrap();

    // The SSE client on a thread of its own: the instant each raise of edge-0 is parsed.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(http).unwrap();
        write!(
            s,
            "GET /api/v1/alerts/stream?twin=edge-0 HTTP/1.1\r\nHost: {http}\r\nAuthorization: Bearer {admin}\r\nAccept: text/event-stream\r\n\r\n"
        )
        .unwrap();
        for line in BufReader::new(s).lines() {
            let Ok(line) = line else { return };
            if line.starts_with(": revision") {
                let _ = ready_tx.send(());
            } else if let Some(d) = line.strip_prefix("data: ") {
                let a: serde_json::Value = serde_json::from_str(d).unwrap();
                if a["twin"] == "edge-0" && a["state"] == "raised" && tx.send(Instant::now()).is_err() {
                    return;
                }
            }
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).expect("the stream answers");
    let load = background_load(p, watched, target, Instant::now() + Duration::from_secs(12));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut lat = Vec::new();
    for i in 0..400 {
        let v = if i % 2 == 0 { 99.0 } else { 1.0 };
        let t = Instant::now();
        device.telemetry(QoS::AtLeastOnce, None, &[("t", v)]).await.unwrap();
        if v > 50.0 {
            let at = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
            lat.push(at.duration_since(t).as_secs_f64() * 1e3);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let achieved = load.await.unwrap();
    latency_row("MQTT publish → raise read from /alerts/stream (SSE over loopback)", &mut lat, target, achieved, n);
    gw.stop().await;
    api.stop().await;
}

/// A keep-alive HTTP server on loopback answering every request 200 at once; counts the
/// requests.
fn webhook_server() -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let c = c.clone();
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                let mut line = String::new();
                loop {
                    let mut len = 0usize;
                    line.clear();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((k, v)) = line.split_once(':')
                            && k.eq_ignore_ascii_case("content-length")
                        {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    c.fetch_add(1, Relaxed);
                    if w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, count)
}

/// `n` twins raise an alert each; a webhook sink delivers them to a local server.
async fn webhook_fan_out(n: usize) {
    use twinfleet::models::notify::{SinkKind, SinkSpec};
    let dir = std::env::temp_dir().join(format!("twinfleet-monitoring-hook-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let p = Platform::builder(&dir).start().await.unwrap();
    let spec = DeviceTypeSpec {
        defaults: serde_json::json!({"rules": {"hot": {"kind": "threshold", "metric": "t", "above": 50}}})
            .as_object()
            .cloned()
            .unwrap(),
        ..DeviceTypeSpec::new(DeviceTypeId::new("fan").unwrap())
    };
    let h = p.create_device_type(spec).await.unwrap();
    let specs: Vec<TwinSpec> = (0..n).map(|i| TwinSpec::new(TwinId::new(format!("f-{i:06}")).unwrap())).collect();
    h.spawn_fleet(specs).await.unwrap();
    let twins: Vec<_> = (0..n).map(|i| p.twin(&format!("f-{i:06}")).unwrap()).collect();
    let (addr, count) = webhook_server();
    let sink = SinkSpec {
        name: "fan".into(),
        kind: SinkKind::Webhook,
        url: format!("http://{addr}/alerts"),
        secret: "bench-secret".into(),
        topic: String::new(),
        username: String::new(),
        password: String::new(),
        min_severity: None,
        device_types: vec![],
        groups: vec![],
        acknowledgements: false,
    };
    let notifier = twinfleet_protocols::Notifier::start(p.runtime().clone(), vec![sink]).unwrap();
    while p.runtime().alert_book().sink_cursor("fan").unwrap().is_none() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rt = p.runtime().clone();
    let t = Instant::now();
    for chunk in twins.chunks(500) {
        let sends = chunk.iter().map(|tw| {
            let now = rt.clock().now();
            tw.ingest(vec![MetricPoint { metric: "t".into(), at: now, value: 99.0 }])
        });
        for r in futures::future::join_all(sends).await {
            r.unwrap();
        }
    }
    let raised = t.elapsed().as_secs_f64();
    let at_raised = count.load(Relaxed);
    let deadline = Instant::now() + Duration::from_secs(600);
    while count.load(Relaxed) < n as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let delivered = count.load(Relaxed);
    let secs = t.elapsed().as_secs_f64();
    println!();
    println!(
        "| webhook fan-out | alerts | cores | delivered/s overall | raised in | all delivered in | backlog after the raises, drained at |"
    );
    println!("|---|---|---|---|---|---|---|");
    let backlog = delivered.saturating_sub(at_raised);
    println!(
        "| one POST per raise, signed, keep-alive server on loopback | {delivered} of {n} | {} | {:.0} | {raised:.2} s | {secs:.2} s | {backlog} at {:.0}/s |",
        cores(),
        delivered as f64 / secs,
        backlog as f64 / (secs - raised).max(1e-3)
    );
    notifier.stop();
    p.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The memory rows: each kind in a child process of its own (resident set growth over
/// the fleet's creation and one batch per twin).
fn memory_rows() {
    let m = env_or("TWINFLEET_BENCH_MEM_TWINS", 100_000);
    println!();
    println!("| memory per twin (resident set growth / twins, own process) | twins | cores | bytes per twin |");
    println!("|---|---|---|---|");
    for name in ["none", "rules"] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .env("TWINFLEET_MONITORING_MEM", name)
            .env("TWINFLEET_BENCH_MEM_TWINS", m.to_string())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let b: f64 =
            text.lines().find_map(|l| l.strip_prefix("MEM ")).and_then(|v| v.trim().parse().ok()).unwrap_or(f64::NAN);
        let label = if name == "none" { "no rules" } else { "5 rules" };
        println!("| {label}, one batch taken | {m} | {} | {b:.0} |", cores());
    }
}
