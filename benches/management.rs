//! Management at fleet scale, in process, on the virtual clock, with simulated devices
//! answering through a device link of the bench's own (`DeviceLink`: each command is
//! answered by a task on the twin's arbiter, through the twin's handle, as a gateway
//! would hand the device's answer over).
//!
//! `rollout`: a rollout of an app version to `TWINFLEET_BENCH_TWINS` (default 100,000)
//! twins in 4 waves (1, 10, 50, 100%), no rate limit, aborting above 2% failures after
//! 100 ended installs: once with every device succeeding, once with 3% of the devices
//! (chosen by a hash of their id) failing. Rows: wall time, rollout decisions per second
//! (installs started + their results + rollbacks), and where the failing case aborted.
//!
//! `fanout`: a type's configuration template reads a DTA layer's value; the DTA holds
//! every twin; one layer change re-renders every member's configuration. Rows: the time
//! until every member computed its delta and handed it to its device link, and until the
//! `TWINFLEET_BENCH_CONNECTED` (default 10,000) connected devices acknowledged it.
//!
//! `cargo bench --bench management`. `TWINFLEET_BENCH_SECTIONS` (default
//! `rollout,fanout`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use twinfleet::models::{CommandId, ConfigLayer, DeviceCommand, DeviceTypeId, DtaId, Metadata, Timestamp, TwinId};
use twinfleet::{DeviceTypeSpec, DtaSpec, Platform, TwinSpec};

mod common;
use common::{cores, env_or};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Devices that answer in process.
#[derive(Debug)]
struct SimDevices {
    rt: std::sync::OnceLock<twinfleet::TwinRuntime>,
    /// Percent of devices whose installs fail.
    fail_pct: u64,
    /// Devices `< connected` (by index) answer desired states.
    connected: usize,
    installs: AtomicU64,
    desired: AtomicU64,
    acked: Arc<AtomicU64>,
}

fn index(id: &str) -> usize {
    id.rsplit('-').next().and_then(|n| n.parse().ok()).unwrap_or(0)
}

fn fails(id: &str, pct: u64) -> bool {
    let h = id.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3));
    h % 100 < pct
}

impl twinfleet::DeviceLink for SimDevices {
    fn deliver(&self, twin: &TwinId, _: &Metadata, id: CommandId, cmd: DeviceCommand) -> Result<(), String> {
        let rt = self.rt.get().expect("attached after the start").clone();
        let twin = twin.to_string();
        match cmd {
            DeviceCommand::InstallApp { .. } => {
                self.installs.fetch_add(1, Relaxed);
                let ok = !fails(&twin, self.fail_pct);
                actix_rt::spawn(async move {
                    if let Ok(h) = rt.twin(&twin) {
                        let _ = h
                            .ack(id.to_string(), ok, if ok { String::new() } else { "simulated failure".into() })
                            .await;
                    }
                });
            }
            DeviceCommand::ApplyDesired { desired, .. } => {
                self.desired.fetch_add(1, Relaxed);
                if index(&twin) < self.connected {
                    let acked = self.acked.clone();
                    actix_rt::spawn(async move {
                        if let Ok(h) = rt.twin(&twin) {
                            let _ = h.ack(id.to_string(), true, String::new()).await;
                            let _ = h.report(desired).await;
                            acked.fetch_add(1, Relaxed);
                        }
                    });
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// The `limit` layer of DTA `hall`.
fn layer(limit: i64) -> ConfigLayer {
    ConfigLayer { priority: 1, values: serde_json::json!({"limit": limit}).as_object().cloned().unwrap() }
}

/// A platform with type `lamp` (`defaults`) and `n` twins; with `hall`, every twin is a
/// member of DTA `hall` (layer `site`: limit 1).
async fn platform(
    dir: &std::path::Path,
    n: usize,
    fail_pct: u64,
    connected: usize,
    defaults: serde_json::Value,
    hall: bool,
) -> (Platform, Arc<SimDevices>) {
    let clock = twinfleet::VirtualClock::new(Timestamp(1_800_000_000_000));
    let p = Platform::builder(dir).clock(clock).start().await.unwrap();
    let mut dtas = Vec::new();
    if hall {
        let layers = [("site".to_string(), layer(1))].into_iter().collect::<BTreeMap<_, _>>();
        p.create_dta(DtaSpec { id: DtaId::new("hall").unwrap(), name: "Hall".into(), parents: vec![], layers })
            .await
            .unwrap();
        dtas.push(DtaId::new("hall").unwrap());
    }
    let sim = Arc::new(SimDevices {
        rt: Default::default(),
        fail_pct,
        connected,
        installs: AtomicU64::new(0),
        desired: AtomicU64::new(0),
        acked: Arc::new(AtomicU64::new(0)),
    });
    sim.rt.set(p.runtime().clone()).unwrap();
    p.runtime().attach_device_link("sim", sim.clone());
    let spec = DeviceTypeSpec {
        defaults: defaults.as_object().cloned().unwrap_or_default(),
        ..DeviceTypeSpec::new(DeviceTypeId::new("lamp").unwrap())
    };
    let ty = p.create_device_type(spec).await.unwrap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(50_000) {
        let specs = chunk
            .iter()
            .map(|i| {
                let mut s = TwinSpec::new(TwinId::new(format!("l-{i:06}")).unwrap());
                s.dtas = dtas.clone();
                s
            })
            .collect();
        ty.spawn_fleet(specs).await.unwrap();
    }
    (p, sim)
}

async fn rollout(n: usize, fail_pct: u64) {
    let dir = std::env::temp_dir().join(format!("twinfleet-mgmt-rollout-{}-{fail_pct}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (p, sim) = platform(&dir, n, fail_pct, 0, serde_json::json!({}), false).await;
    let rt = p.runtime().clone();
    let app: twinfleet::models::apps::AppVersion =
        serde_json::from_value(serde_json::json!({"app": "blink", "version": "2.0.0"})).unwrap();
    rt.apps().register(app).unwrap();
    let bytes = b"blink 2.0.0".to_vec();
    let mut up = rt.apps().begin().unwrap();
    up.write(&bytes).unwrap();
    let sum: String = {
        use sha2::Digest;
        sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
    };
    let declared = twinfleet_actors::apps::Declared {
        app: "blink".into(),
        version: "2.0.0".into(),
        os: "any".into(),
        arch: "any".into(),
        sha256: sum,
        size: None,
    };
    rt.apps().finish(up, &declared).unwrap();
    let spec: twinfleet::models::rollout::RolloutSpec = serde_json::from_value(serde_json::json!({
        "id": "bench", "app": "blink", "version": "2.0.0", "device_type": "lamp", "waves": [1, 10, 50, 100],
        "abort": {"failure_rate": 0.02, "min_count": 100}
    }))
    .unwrap();
    let t = Instant::now();
    rt.start_rollout(spec).await.unwrap();
    let r = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = rt.rollout("bench").unwrap();
        if r.is_final() {
            break r;
        }
        assert!(t.elapsed() < Duration::from_secs(1800), "the rollout did not end within 30 minutes");
    };
    let secs = t.elapsed().as_secs_f64();
    let progress = r.progress();
    let started: usize = progress.iter().map(|w| w.succeeded + w.failed + w.rolled_back + w.installing).sum();
    let ended: usize = progress.iter().map(|w| w.succeeded + w.failed + w.rolled_back).sum();
    let rolled: usize = progress.iter().map(|w| w.rolled_back).sum();
    // (These twins had no version before: going back installs nothing.)
    let nothing_before = r
        .targets
        .iter()
        .filter(|t| t.status == twinfleet::models::rollout::TargetStatus::RolledBack && t.previous.is_none())
        .count();
    let decisions = started + ended + rolled;
    let outcome = match &r.state {
        twinfleet::models::rollout::RolloutState::Aborted { reason } => {
            format!("aborted in wave {}: {reason}", r.wave + 1)
        }
        s => format!("{s:?}").to_lowercase(),
    };
    println!(
        "| rollout, 4 waves, {fail_pct}% failing devices | {n} | {} | {secs:.2} s | {:.0} | {} installs sent, {rolled} rolled back ({nothing_before} with no earlier version) | {outcome} |",
        cores(),
        decisions as f64 / secs,
        sim.installs.load(Relaxed),
    );
    p.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn fanout(n: usize, connected: usize) {
    let dir = std::env::temp_dir().join(format!("twinfleet-mgmt-fanout-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (p, sim) = platform(&dir, n, 0, connected, serde_json::json!({"limit": 0}), true).await;
    let rt = p.runtime().clone();
    let t = rt
        .add_template(
            "lamp",
            None,
            serde_json::json!({"limit": "{{ config.limit }}", "name": "{{ twin.id }}"}),
            String::new(),
        )
        .await
        .unwrap();
    rt.apply_template("lamp", t.version).await.unwrap();
    // Every twin fills the template once (the first render), then the bench starts.
    let deadline = Instant::now() + Duration::from_secs(600);
    while sim.desired.load(Relaxed) < n as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while sim.acked.load(Relaxed) < connected as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (d0, a0) = (sim.desired.load(Relaxed), sim.acked.load(Relaxed));
    let t = Instant::now();
    rt.dta("hall").unwrap().set_layer("site", layer(2)).await.unwrap();
    let reached = t.elapsed().as_secs_f64();
    let (mut computed, mut acked) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(600);
    while (computed.is_none() || acked.is_none()) && Instant::now() < deadline {
        if computed.is_none() && sim.desired.load(Relaxed) >= d0 + n as u64 {
            computed = Some(t.elapsed().as_secs_f64());
        }
        if acked.is_none() && sim.acked.load(Relaxed) >= a0 + connected as u64 {
            acked = Some(t.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let show = |v: Option<f64>| v.map_or("not within 600 s".to_string(), |s| format!("{s:.2} s"));
    println!(
        "| one DTA layer change → {n} members' templates | {n} | {} | {reached:.2} s | {} | {} ({connected} connected) |",
        cores(),
        show(computed),
        show(acked)
    );
    p.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    // As the `twinfleet` binary does at its start (see twinfleet::memory).
    twinfleet::memory::disable_transparent_huge_pages().expect("prctl(PR_SET_THP_DISABLE)");
    tracing_subscriber::fmt().with_env_filter("error").with_writer(std::io::stderr).init();
    actix_rt::System::new().block_on(async {
        let sections = std::env::var("TWINFLEET_BENCH_SECTIONS").unwrap_or_else(|_| "rollout,fanout".into());
        let on = |s: &str| sections.split(',').any(|x| x.trim() == s);
        let n = env_or("TWINFLEET_BENCH_TWINS", 100_000) as usize;
        if on("rollout") {
            println!("| benchmark | twins | cores | wall time | decisions/s | work | outcome |");
            println!("|---|---|---|---|---|---|---|");
            rollout(n, 0).await;
            rollout(n, 3).await;
        }
        if on("fanout") {
            println!();
            println!("| benchmark | twins | cores | layer change reached every member | every member computed and sent its delta | every connected device acked |");
            println!("|---|---|---|---|---|---|");
            fanout(n, env_or("TWINFLEET_BENCH_CONNECTED", 10_000) as usize).await;
        }
    });
}
