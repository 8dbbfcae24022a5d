//! Provisioning at fleet scale: 10,000 simulated devices claim at once, fully automatic
//! (every serial on the type's allow-list), and each goes on until it is operational:
//! claim on the provisioning gateway → credentials → connect with them to the
//! operational gateway (which confirms it). Devices run in a child process (this binary
//! re-run with `TWINFLEET_PROVISION_DEVICES`); the per-device time is claim sent →
//! operational connection accepted, measured there. Then the same over gRPC
//! (`Provisioning.Claim`, then a state report with the new token), and 1,000 pending
//! devices of a semi-automatic type approved in one call (`approve_claims`, what
//! `POST /device-types/{id}/approvals` runs).
//!
//! Section `flood`: one operational device publishes QoS 1 telemetry, each message
//! waiting for its PUBACK (the twin's durable write), first alone, then while 200
//! claimers flood one claim token on the provisioning gateway with the default rate
//! limits; the rows compare its publish → PUBACK latency without and with the flood.
//!
//! Section `baseline`: the MQTT exchanges of the same onboarding with nothing behind
//! them, on Mosquitto: per device a claim connection (CONNECT, SUBSCRIBE to its reply
//! topic, PUBLISH the claim there, receive it back relayed, DISCONNECT) and then an
//! operational connection (CONNECT, SUBSCRIBE to its commands, DISCONNECT), the same
//! device process and clients (rumqttc), no twin, no token, no record. Skipped, loudly,
//! where Mosquitto is not installed.
//!
//! `cargo bench --bench provision`. `TWINFLEET_BENCH_DEVICES` (default 10,000),
//! `TWINFLEET_BENCH_SECTIONS` (default `baseline,mqtt,grpc,approve,flood`).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use twinfleet::Platform;
use twinfleet::models::DeviceTypeId;
use twinfleet::models::provisioning::{Mode, ProvisioningSpec};
use twinfleet_protocols::mqtt::{Endpoint, MqttConfig, MqttDevice, MqttGateway};
use twinfleet_protocols::{GrpcDevice, GrpcGateway};

mod common;
use common::{Mosquitto, cores, cpu_ms, env_or, pct};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // As the `twinfleet` binary does at its start (see twinfleet::memory).
    twinfleet::memory::disable_transparent_huge_pages().expect("prctl(PR_SET_THP_DISABLE)");
    if let Ok(args) = std::env::var("TWINFLEET_PROVISION_DEVICES") {
        return tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(devices(args));
    }
    tracing_subscriber::fmt().with_env_filter("warn").with_writer(std::io::stderr).init();
    actix_rt::System::new().block_on(platform());
}

/// The child: `<protocol> <provisioning addr> <operational addr> <type> <claim token> <n>`;
/// prints one line per device (`ms`), then `DONE <wall ms> <failures> <CPU ms>` (the
/// process's own user + system time).
async fn devices(args: String) {
    let a: Vec<String> = args.split_whitespace().map(String::from).collect();
    if a[0] == "flood" {
        return flood(&a[1..]).await;
    }
    let [proto, prov, ops, ty, claim, n] = &a[..] else { panic!("bad args {args}") };
    let n: usize = n.parse().unwrap();
    let started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (proto, prov, ops, ty, claim) = (proto.clone(), prov.clone(), ops.clone(), ty.clone(), claim.clone());
            tokio::spawn(async move {
                let id = format!("{proto}-{i:05}");
                let serial = format!("S-{i:05}");
                let t = Instant::now();
                let ok = match proto.as_str() {
                    "baseline" => baseline_device(&prov, &id).await,
                    "mqtt" => mqtt_device(&prov, &ops, &ty, &claim, &id, &serial).await,
                    _ => grpc_device(&prov, &ty, &claim, &id, &serial).await,
                };
                ok.then(|| t.elapsed().as_secs_f64() * 1e3)
            })
        })
        .collect();
    let mut failures = 0;
    let mut lines = String::new();
    for t in tasks {
        match t.await.unwrap() {
            Some(ms) => lines.push_str(&format!("{ms:.3}\n")),
            None => failures += 1,
        }
    }
    print!("{lines}");
    println!("DONE {:.1} {failures} {}", started.elapsed().as_secs_f64() * 1e3, cpu_ms("self"));
}

/// Publishes `n` QoS 1 messages one at a time; each one's publish → PUBACK time (ms).
async fn acked_latencies(dev: &MqttDevice, n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let before = dev.acked();
        let t = Instant::now();
        dev.telemetry(twinfleet_protocols::mqtt::QoS::AtLeastOnce, None, &[("v", i as f64)]).await.unwrap();
        while dev.acked() == before {
            tokio::task::yield_now().await;
        }
        out.push(t.elapsed().as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    out
}

/// The child of section `flood`: `flood <prov> <ops> <device> <token> <type> <claim>
/// <messages>`; prints `BASE <ms>`, `FLOOD <ms>` lines, then `CLAIMS <sent> <admitted>
/// <limited> <secs>`.
async fn flood(a: &[String]) {
    let [prov, ops, id, token, ty, claim, n] = a else { panic!("bad flood args {a:?}") };
    let n: usize = n.parse().unwrap();
    let dev = MqttDevice::connect(ops, id, token).await.unwrap();
    for ms in acked_latencies(&dev, n).await {
        println!("BASE {ms:.3}");
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let counts = std::sync::Arc::new([(); 3].map(|()| std::sync::atomic::AtomicU64::new(0)));
    let started = Instant::now();
    let claimers: Vec<_> = (0..200)
        .map(|c| {
            let (prov, ty, claim, stop, counts) =
                (prov.clone(), ty.clone(), claim.clone(), stop.clone(), counts.clone());
            tokio::spawn(async move {
                use std::sync::atomic::Ordering::Relaxed;
                let mut i = 0u64;
                while !stop.load(Relaxed) {
                    let id = format!("f-{c}-{i}");
                    i += 1;
                    counts[0].fetch_add(1, Relaxed);
                    match MqttDevice::provision(&prov, &ty, &id, &claim, serde_json::json!({})).await {
                        Ok(r) if r.ok || r.pending => counts[1].fetch_add(1, Relaxed),
                        Ok(_) => counts[2].fetch_add(1, Relaxed),
                        Err(_) => 0,
                    };
                }
            })
        })
        .collect();
    // (The flood gets going first.)
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = acked_latencies(&dev, n).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    for c in claimers {
        let _ = c.await;
    }
    for ms in during {
        println!("FLOOD {ms:.3}");
    }
    let c: Vec<u64> = counts.iter().map(|c| c.load(std::sync::atomic::Ordering::Relaxed)).collect();
    println!("CLAIMS {} {} {} {secs:.2}", c[0], c[1], c[2]);
    dev.disconnect().await;
}

/// The baseline's device (see the module documentation) against the broker at `addr`.
async fn baseline_device(addr: &str, id: &str) -> bool {
    use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
    let (host, port) = addr.rsplit_once(':').unwrap();
    let port: u16 = port.parse().unwrap();
    let session = |client_id: String| {
        let mut o = MqttOptions::new(client_id, host, port);
        o.set_keep_alive(Duration::from_secs(30));
        o
    };
    async fn until(ev: &mut EventLoop, done: impl Fn(&Packet) -> bool) -> bool {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(p)) if done(&p) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    }
    async fn hang_up(c: AsyncClient, ev: &mut EventLoop) {
        let _ = c.disconnect().await;
        let sent = async { while !matches!(ev.poll().await, Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_)) {} };
        let _ = tokio::time::timeout(Duration::from_secs(5), sent).await;
    }
    for _ in 0..50 {
        // The claim: the request relayed back as the answer.
        let (c, mut ev) = AsyncClient::new(session(format!("c-{id}")), 16);
        let topic = format!("provisioning/{id}/reply");
        let _ = c.subscribe(&topic, QoS::AtLeastOnce).await;
        let _ = c.publish(&topic, QoS::AtLeastOnce, false, vec![b'x'; 160]).await;
        if !until(&mut ev, |p| matches!(p, Packet::Publish(_))).await {
            // The listener's backlog or a busy moment: try again shortly (as the real
            // device does).
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        hang_up(c, &mut ev).await;
        // The operational connection.
        let (c, mut ev) = AsyncClient::new(session(id.to_string()), 16);
        let _ = c.subscribe(format!("devices/{id}/commands"), QoS::AtLeastOnce).await;
        let ok = until(&mut ev, |p| matches!(p, Packet::SubAck(_))).await;
        hang_up(c, &mut ev).await;
        return ok;
    }
    false
}

async fn mqtt_device(prov: &str, ops: &str, ty: &str, claim: &str, id: &str, serial: &str) -> bool {
    let identity = serde_json::json!({"serial": serial, "mac": format!("m-{serial}")});
    for _ in 0..50 {
        match MqttDevice::provision_as(prov, ty, id, claim, identity.clone()).await {
            Ok(r) if r.ok => {
                let token = r.token.unwrap_or_default();
                return match MqttDevice::connect(ops, id, &token).await {
                    Ok(d) => {
                        d.disconnect().await;
                        true
                    }
                    Err(e) => {
                        eprintln!("{id}: operational connect failed: {e}");
                        false
                    }
                };
            }
            Ok(r) => {
                eprintln!("{id}: {r:?}");
                return false;
            }
            // The listener's backlog or a busy moment: try again shortly.
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    false
}

async fn grpc_device(endpoint: &str, ty: &str, claim: &str, id: &str, serial: &str) -> bool {
    use twinfleet_proto::device as pb;
    let Ok(channel) = tonic::transport::Channel::from_shared(endpoint.to_string()).unwrap().connect().await else {
        return false;
    };
    let mut client = pb::provisioning_client::ProvisioningClient::new(channel.clone());
    let mut r = tonic::Request::new(pb::ClaimRequest {
        device_id: id.into(),
        identity: Some(pb::DeviceIdentity { serial: serial.into(), mac: format!("m-{serial}"), ..Default::default() }),
    });
    r.metadata_mut().insert("x-device-type", ty.parse().unwrap());
    r.metadata_mut().insert("authorization", format!("Bearer {claim}").parse().unwrap());
    let Ok(reply) = client.claim(r).await else { return false };
    let reply = reply.into_inner();
    let mut dev = GrpcDevice::on_channel(channel, id, &reply.token);
    let mut patch = serde_json::Map::new();
    patch.insert("online".into(), serde_json::Value::Bool(true));
    dev.report(&patch).await.is_ok()
}

async fn device_type(p: &Platform, id: &str, spec: ProvisioningSpec) -> String {
    let t = twinfleet::DeviceTypeSpec {
        provisioning: Some(spec),
        ..twinfleet::DeviceTypeSpec::new(DeviceTypeId::new(id).unwrap())
    };
    p.create_device_type(t).await.unwrap();
    p.issue_claim_token(id).await.unwrap()
}

/// What a device process reported: per-device times (sorted), wall ms, failures, and
/// its CPU ms; and the CPU ms of the server side (the platform's process, or Mosquitto)
/// over the same run.
struct Run {
    lat: Vec<f64>,
    wall: f64,
    failures: usize,
    cpu_ms: f64,
    server_cpu_ms: f64,
}

fn run_child(args: String) -> Run {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("TWINFLEET_PROVISION_DEVICES", args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut run = Run { lat: Vec::new(), wall: 0.0, failures: 0, cpu_ms: 0.0, server_cpu_ms: 0.0 };
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("DONE ") {
            let v: Vec<&str> = rest.split_whitespace().collect();
            (run.wall, run.failures, run.cpu_ms) =
                (v[0].parse().unwrap(), v[1].parse().unwrap(), v[2].parse().unwrap());
        } else if let Ok(ms) = line.parse::<f64>() {
            run.lat.push(ms);
        }
    }
    let _ = child.wait();
    run.lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    run
}

/// What the section asked of storage, per device (printed under the table).
fn storage_line(name: &str, s0: &twinfleet::StorageStats, s1: &twinfleet::StorageStats, n: usize) -> String {
    let per = |a: u64, b: u64| (b - a) as f64 / n as f64;
    format!(
        "{name}: per device {:.1} write batches, {:.1} records, {:.0} bytes committed; {:.2} group commits",
        per(s0.batches_submitted, s1.batches_submitted),
        per(s0.ops_committed, s1.ops_committed),
        per(s0.bytes_committed, s1.bytes_committed),
        per(s0.groups_committed, s1.groups_committed),
    )
}

async fn platform() {
    let n = env_or("TWINFLEET_BENCH_DEVICES", 10_000) as usize;
    let sections =
        std::env::var("TWINFLEET_BENCH_SECTIONS").unwrap_or_else(|_| "baseline,mqtt,grpc,approve,flood".into());
    let on = |s: &str| sections.split(',').any(|x| x.trim() == s);
    let dir = std::env::temp_dir().join(format!("twinfleet-provision-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // The claim rate limits are lifted: this measures provisioning, not the limiter.
    let unlimited = twinfleet::models::RateLimit { per_sec: 1e9, burst: 1e9 };
    let settings =
        twinfleet::Settings { claims_per_credential: unlimited, claims_per_source: unlimited, ..Default::default() };
    let p = Platform::builder(&dir).settings(settings).start().await.unwrap();
    let allow: Vec<String> = (0..n).map(|i| format!("S-{i:05}")).collect();
    println!("| benchmark | devices | cores | devices/s | claim → operational p50 / p99 | detail |");
    println!("|---|---|---|---|---|---|");
    let mut notes: Vec<String> = Vec::new();
    let row = |name: &str, r: &Run| {
        println!(
            "| {name} | {n} | {} | {:.0} | {:.0} ms / {:.0} ms | {} operational in {:.2} s, {} failed; CPU per device: {:.0} µs in the devices' process, {:.0} µs on the server side |",
            cores(),
            r.lat.len() as f64 / (r.wall / 1e3),
            pct(&r.lat, 0.5),
            pct(&r.lat, 0.99),
            r.lat.len(),
            r.wall / 1e3,
            r.failures,
            r.cpu_ms * 1e3 / n as f64,
            r.server_cpu_ms * 1e3 / n as f64,
        );
    };
    if on("baseline") {
        match Mosquitto::start(&dir, "allow_anonymous true\npersistence false\nlog_type error\n") {
            Some(broker) => {
                let args = format!("baseline 127.0.0.1:{} - - - {n}", broker.port);
                let c0 = cpu_ms(&broker.pid());
                let mut run = actix_rt::task::spawn_blocking(move || run_child(args)).await.unwrap();
                run.server_cpu_ms = cpu_ms(&broker.pid()) - c0;
                row("baseline: the same MQTT exchanges on Mosquitto, nothing behind them", &run);
            }
            None => println!(
                "| baseline: the same MQTT exchanges on Mosquitto | {n} | {} | | | SKIPPED: mosquitto not installed (apt-get install mosquitto) |",
                cores()
            ),
        }
    }
    if on("mqtt") {
        let claim =
            device_type(&p, "meter", ProvisioningSpec { allow_list: allow.clone(), ..Default::default() }).await;
        let cfg = MqttConfig {
            operational: "127.0.0.1:0".parse().unwrap(),
            provisioning: "127.0.0.1:0".parse().unwrap(),
            ..MqttConfig::default()
        };
        let gw = MqttGateway::start(p.runtime().clone(), cfg).await.unwrap();
        let (Endpoint::Listen(prov), Endpoint::Listen(ops)) = (gw.provisioning().clone(), gw.operational().clone())
        else {
            unreachable!()
        };
        let args = format!("mqtt {prov} {ops} meter {claim} {n}");
        let (c0, s0) = (cpu_ms("self"), p.storage_stats());
        let mut run = actix_rt::task::spawn_blocking(move || run_child(args)).await.unwrap();
        run.server_cpu_ms = cpu_ms("self") - c0;
        row("MQTT, fully automatic", &run);
        notes.push(storage_line("MQTT", &s0, &p.storage_stats(), n));
        gw.stop().await;
    }
    if on("grpc") {
        let claim =
            device_type(&p, "gauge", ProvisioningSpec { allow_list: allow.clone(), ..Default::default() }).await;
        let grpc = GrpcGateway::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap()).unwrap();
        let args = format!("grpc http://{} - gauge {claim} {n}", grpc.local_addr());
        let (c0, s0) = (cpu_ms("self"), p.storage_stats());
        let mut run = actix_rt::task::spawn_blocking(move || run_child(args)).await.unwrap();
        run.server_cpu_ms = cpu_ms("self") - c0;
        row("gRPC, fully automatic", &run);
        notes.push(storage_line("gRPC", &s0, &p.storage_stats(), n));
        grpc.stop().await;
    }
    if on("approve") {
        let m = 1_000;
        device_type(&p, "kiosk", ProvisioningSpec { mode: Mode::SemiAutomatic, ..Default::default() }).await;
        let rt = p.runtime().clone();
        for i in 0..m {
            let id = twinfleet::models::provisioning::Identity {
                serial: format!("K-{i:04}"),
                mac: format!("k-{i}"),
                ..Default::default()
            };
            rt.claim("kiosk", &format!("k-{i:04}"), Some(id), Default::default()).await.unwrap();
        }
        assert_eq!(rt.pending_claims().len(), m);
        let t = Instant::now();
        // One call for all (`POST /device-types/{id}/approvals` does the same).
        let serials: Vec<String> = (0..m).map(|i| format!("K-{i:04}")).collect();
        let results = rt.approve_claims("kiosk", &serials, "bench").await;
        assert!(results.iter().all(|(_, r)| r.is_ok()));
        let secs = t.elapsed().as_secs_f64();
        println!(
            "| semi-automatic: {m} pending approved at once | {m} | {} | {:.0} | | all past approval (credentials issued, awaiting confirmation) in {secs:.2} s; one call of `TwinRuntime::approve_claims` |",
            cores(),
            m as f64 / secs
        );
    }
    for line in &notes {
        println!("\n{line}");
    }
    p.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    if on("flood") {
        flood_section().await;
    }
}

/// Operational latency with and without a claim flood, on a platform with the default
/// claim rate limits.
async fn flood_section() {
    let dir = std::env::temp_dir().join(format!("twinfleet-flood-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let p = Platform::builder(&dir).start().await.unwrap();
    let token = common::meter_fleet(&p, &["op-0".to_string()]).await.remove(0);
    let claim = device_type(&p, "flood", ProvisioningSpec { mode: Mode::SemiAutomatic, ..Default::default() }).await;
    let cfg = MqttConfig {
        operational: "127.0.0.1:0".parse().unwrap(),
        provisioning: "127.0.0.1:0".parse().unwrap(),
        ..MqttConfig::default()
    };
    let gw = MqttGateway::start(p.runtime().clone(), cfg).await.unwrap();
    let (Endpoint::Listen(prov), Endpoint::Listen(ops)) = (gw.provisioning().clone(), gw.operational().clone()) else {
        unreachable!()
    };
    let n = env_or("TWINFLEET_BENCH_FLOOD_MESSAGES", 2_000);
    let args = format!("flood {prov} {ops} op-0 {token} flood {claim} {n}");
    let out = actix_rt::task::spawn_blocking(move || {
        let o = Command::new(std::env::current_exe().unwrap())
            .env("TWINFLEET_PROVISION_DEVICES", args)
            .stderr(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).to_string()
    })
    .await
    .unwrap();
    let series = |tag: &str| {
        let mut v: Vec<f64> =
            out.lines().filter_map(|l| l.strip_prefix(tag)).filter_map(|x| x.trim().parse().ok()).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v
    };
    let (base, during) = (series("BASE "), series("FLOOD "));
    let claims: Vec<f64> = out
        .lines()
        .find_map(|l| l.strip_prefix("CLAIMS "))
        .map(|l| l.split_whitespace().filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default();
    let [sent, admitted, limited, secs] = claims[..] else { panic!("flood child said nothing: {out}") };
    println!();
    println!("| operational QoS 1 publish → PUBACK | messages | cores | p50 | p99 | max | claim flood |");
    println!("|---|---|---|---|---|---|---|");
    for (name, v, flood) in [
        ("alone", &base, "none".to_string()),
        (
            "during a claim flood",
            &during,
            format!(
                "{:.0} claims/s sent by 200 claimers ({admitted:.0} admitted, {limited:.0} refused as rate-limited) over {secs:.1} s",
                sent / secs
            ),
        ),
    ] {
        println!(
            "| {name} | {} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {flood} |",
            v.len(),
            cores(),
            pct(v, 0.5),
            pct(v, 0.99),
            v.last().copied().unwrap_or(0.0)
        );
    }
    gw.stop().await;
    p.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
