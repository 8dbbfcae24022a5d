//! Monitoring cost and latency, in process (the twins' batched ingest path, no device
//! transport): 10,000 twins of a type with no rules and 10,000 of a type with 5 rules
//! each (threshold with hysteresis, range, rate of change, staleness, offline), fed
//! 10-point batches by 500 concurrent senders through `TwinHandle::ingest`, alternating
//! the two types in rounds in the same run (rows: points/s, medians of the rounds). Then
//! the alert latency: at half the measured rate, one twin's point crosses its threshold
//! every 20 ms; the time from `ingest` called to the raise arriving on the alert book's
//! broadcast (what `/alerts/stream` forwards), p50/p99. Then the resident memory of
//! 100,000 twins with and without rules, each having taken one batch.
//!
//! `cargo bench --bench monitoring`. `TWINFLEET_BENCH_TWINS` (default 10,000),
//! `TWINFLEET_BENCH_ROUNDS` (default 5).

use std::sync::Arc;
use std::time::{Duration, Instant};
use twinfleet::models::{DeviceTypeId, MetricPoint, TwinId};
use twinfleet::{DeviceTypeSpec, Platform, TwinSpec};

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
    tracing_subscriber::fmt().with_env_filter("error").with_writer(std::io::stderr).init();
    if let Ok(mode) = std::env::var("TWINFLEET_MONITORING_MEM") {
        return actix_rt::System::new().block_on(memory(mode == "rules"));
    }
    actix_rt::System::new().block_on(run());
}

/// The child of the memory rows: prints `MEM <bytes per twin>`.
async fn memory(with_rules: bool) {
    let m = env_or("TWINFLEET_BENCH_TWINS", 100_000) as usize;
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
    let n = env_or("TWINFLEET_BENCH_TWINS", 10_000) as usize;
    let rounds = env_or("TWINFLEET_BENCH_ROUNDS", 5) as usize;
    let dir = std::env::temp_dir().join(format!("twinfleet-monitoring-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let p = Platform::builder(&dir).start().await.unwrap();
    let plain = Arc::new(fleet(&p, "plain", serde_json::json!({}), "p", n).await);
    let watched = Arc::new(fleet(&p, "watched", rules(), "w", n).await);
    // Warm up both (the first batch resolves a twin's rules).
    ingest_rate(&p, &plain, 1.0).await;
    ingest_rate(&p, &watched, 1.0).await;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        a.push(ingest_rate(&p, &plain, 3.0).await);
        b.push(ingest_rate(&p, &watched, 3.0).await);
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

    // Alert latency at half the rate: background load on the watched type, and one twin
    // of a type with a low threshold crossing it every 20 ms.
    let spec = DeviceTypeSpec {
        defaults: serde_json::json!({"rules": {"hot": {"kind": "threshold", "metric": "t", "above": 50}}})
            .as_object()
            .cloned()
            .unwrap(),
        ..DeviceTypeSpec::new(DeviceTypeId::new("probe").unwrap())
    };
    p.create_device_type(spec)
        .await
        .unwrap()
        .spawn_fleet(vec![TwinSpec::new(TwinId::new("probe-0").unwrap())])
        .await
        .unwrap();
    let probe = p.twin("probe-0").unwrap();
    let load_until = Instant::now() + Duration::from_secs(12);
    let target = rb / 2.0;
    let load = {
        let (p, twins) = (p.runtime().clone(), watched.clone());
        actix_rt::spawn(async move {
            // Paced senders: 100 tasks, each its share of half the rate.
            let per = target / 10.0 / 100.0;
            let tasks = (0..100).map(|s| {
                let (p, twins) = (p.clone(), twins.clone());
                actix_rt::spawn(async move {
                    let mut k = s as u64;
                    let gap = Duration::from_secs_f64(1.0 / per.max(1.0));
                    let mut next = Instant::now();
                    while Instant::now() < load_until {
                        let t = &twins[(k as usize * 7919) % twins.len()];
                        k += 1;
                        let _ = t.ingest(batch(&p, k)).await;
                        next += gap;
                        if let Some(d) = next.checked_duration_since(Instant::now()) {
                            tokio::time::sleep(d).await;
                        }
                    }
                })
            });
            futures::future::join_all(tasks).await;
        })
    };
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
    load.await.unwrap();
    lat.sort_by(|a, b| a.total_cmp(b));
    println!();
    println!("| alert latency (ingest → raise on the alert stream) | samples | cores | p50 | p99 | load |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| threshold crossed, at half the measured rate | {} | {} | {:.2} ms | {:.2} ms | ~{target:.0} points/s on {n} twins with 5 rules |",
        lat.len(),
        cores(),
        pct(&lat, 0.5),
        pct(&lat, 0.99)
    );
    p.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);

    // Memory: 100,000 twins, each having taken one batch, with and without rules, each
    // in a child process of its own (resident set growth over the fleet's creation).
    let m = 100_000;
    println!();
    println!("| memory per twin (resident set growth / twins, own process) | twins | cores | bytes per twin |");
    println!("|---|---|---|---|");
    for name in ["none", "rules"] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .env("TWINFLEET_MONITORING_MEM", name)
            .env("TWINFLEET_BENCH_TWINS", m.to_string())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let b: f64 =
            text.lines().find_map(|l| l.strip_prefix("MEM ")).and_then(|v| v.trim().parse().ok()).unwrap_or(f64::NAN);
        let label = if name == "none" { "no rules" } else { "5 rules" };
        println!("| {label}, one batch taken | {m} | {} | {b:.0} |", cores());
    }
}
