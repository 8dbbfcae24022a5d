//! End-to-end telemetry ingest over MQTT on the embedded gateway: device (rumqttc) →
//! twinfleet's gateway session → DTI → stored durably (PUBACK after the WAL and sled
//! sync).
//!
//! The devices run in a child process (this binary re-run with `TWINFLEET_MQTT_DEVICES`),
//! so that the platform's memory per connection is measured on its own. Each device
//! publishes 10 metrics per message as fast as its client lets it, for the run's length.
//! Throughput counts points stored durably inside the window; latency comes from a
//! probe device in the platform's process that publishes one message at a time and
//! waits until its twin holds it (publish → stored → visible), sampled during the load.
//!
//! Each device costs the platform one socket; where the open-files limit is below the
//! device count (plus a few hundred), lower the count.
//!
//! `cargo bench --bench mqtt`. `TWINFLEET_BENCH_DEVICES` (default 10,000),
//! `TWINFLEET_BENCH_SECONDS` (default 5), `TWINFLEET_BENCH_REPEAT` (default 3),
//! `TWINFLEET_BENCH_QOS` (`0` or `1`: only that section).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use twinfleet::Platform;
use twinfleet_protocols::mqtt::{Endpoint, MqttConfig, MqttDevice, MqttGateway, QoS};

mod common;
use common::{Mosquitto, cores, env_or, median, meter_fleet, pct, rss};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const POINTS_PER_MESSAGE: usize = 10;

fn payload(seq: u64) -> Vec<u8> {
    let mut s = String::from("{\"values\":{");
    for m in 0..POINTS_PER_MESSAGE {
        if m > 0 {
            s.push(',');
        }
        s.push_str(&format!("\"m{m}\":{}.5", seq + m as u64));
    }
    s.push_str("}}");
    s.into_bytes()
}

fn main() {
    // As the `twinfleet` binary does at its start (see twinfleet::memory).
    twinfleet::memory::disable_transparent_huge_pages().expect("prctl(PR_SET_THP_DISABLE)");
    if let Ok(addr) = std::env::var("TWINFLEET_MQTT_DEVICES") {
        return tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(devices(addr));
    }
    tracing_subscriber::fmt().with_env_filter("warn").with_writer(std::io::stderr).init();
    actix_rt::System::new().block_on(platform());
}

/// The child: connects every device, then runs `GO <qos> <secs>` commands from stdin.
async fn devices(addr: String) {
    let tokens: Vec<(String, String)> = std::fs::read_to_string(std::env::var("TWINFLEET_MQTT_TOKENS").unwrap())
        .unwrap()
        .lines()
        .map(|l| l.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).unwrap())
        .collect();
    let before = rss();
    let mut devs = Vec::with_capacity(tokens.len());
    for chunk in tokens.chunks(200) {
        let batch =
            futures::future::join_all(chunk.iter().map(|(id, tok)| MqttDevice::connect_with(&addr, id, id, tok, 256)))
                .await;
        devs.extend(batch.into_iter().map(|d| std::sync::Arc::new(d.expect("device connects"))));
    }
    println!("CONNECTED {}", rss() - before);
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line.unwrap();
        let parts: Vec<&str> = line.split_whitespace().collect();
        let ["GO", qos, secs] = parts[..] else { break };
        let qos = if qos == "1" { QoS::AtLeastOnce } else { QoS::AtMostOnce };
        let until = Instant::now() + Duration::from_secs(secs.parse().unwrap());
        let before_run: u64 = devs.iter().map(|d| if qos == QoS::AtLeastOnce { d.acked() } else { d.written() }).sum();
        let tasks: Vec<_> = devs
            .iter()
            .map(|d| {
                let d = d.clone();
                tokio::spawn(async move {
                    let mut sent = 0u64;
                    while Instant::now() < until {
                        if d.publish_raw(&format!("devices/{}/telemetry", d.id()), qos, payload(sent)).await.is_err() {
                            break;
                        }
                        sent += 1;
                    }
                    sent
                })
            })
            .collect();
        let mut sent = 0;
        for t in tasks {
            sent += t.await.unwrap();
        }
        // Report what left the devices (QoS 0: written to the socket) or what the
        // gateway acknowledged (QoS 1), once that stops moving: publishes still queued in
        // the clients are not the platform's yet.
        let count = |d: &MqttDevice| if qos == QoS::AtLeastOnce { d.acked() } else { d.written() };
        let mut last = u64::MAX;
        loop {
            tokio::time::sleep(Duration::from_secs(4)).await;
            let now: u64 = devs.iter().map(|d| count(d)).sum::<u64>() - before_run;
            if now == last {
                break;
            }
            last = now;
        }
        let _ = sent;
        let sent = last;
        println!("SENT {sent}");
    }
}

async fn platform() {
    let n = env_or("TWINFLEET_BENCH_DEVICES", 10_000) as usize;
    let secs = env_or("TWINFLEET_BENCH_SECONDS", 5);
    let repeat = env_or("TWINFLEET_BENCH_REPEAT", 3) as usize;
    let dir = std::env::temp_dir().join(format!("twinfleet-mqtt-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let p = Platform::builder(&dir).start().await.unwrap();
    let mut ids: Vec<String> = (0..n).map(|i| format!("d-{i:05}")).collect();
    ids.push("probe".into());
    let mut tokens = meter_fleet(&p, &ids).await;
    let probe_token = tokens.pop().unwrap();
    let tokens: String = ids.iter().zip(&tokens).map(|(id, t)| format!("{id} {t}\n")).collect();
    let token_file = dir.join("tokens");
    std::fs::write(&token_file, tokens).unwrap();

    let cfg = MqttConfig {
        operational: "127.0.0.1:0".parse().unwrap(),
        provisioning: "127.0.0.1:0".parse().unwrap(),
        ..MqttConfig::default()
    };
    let gw = MqttGateway::start(p.runtime().clone(), cfg).await.unwrap();
    let Endpoint::Listen(addr) = gw.operational().clone() else { unreachable!() };
    let rss_before = rss();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("TWINFLEET_MQTT_DEVICES", addr.to_string())
        .env("TWINFLEET_MQTT_TOKENS", &token_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to_child = child.stdin.take().unwrap();
    let mut from_child = BufReader::new(child.stdout.take().unwrap()).lines();
    let started = Instant::now();
    let connected = actix_rt::task::spawn_blocking(move || {
        let line = from_child.next().unwrap().unwrap();
        (line, from_child)
    })
    .await
    .unwrap();
    let (line, mut from_child) = connected;
    let device_side: u64 = line.strip_prefix("CONNECTED ").unwrap().parse().unwrap();
    let connect_secs = started.elapsed().as_secs_f64();
    actix_rt::time::sleep(Duration::from_millis(500)).await;
    let platform_side = rss().saturating_sub(rss_before);
    println!("| benchmark | devices | cores | points/s (median) | msgs/s | latency p50 / p99 | detail |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| MQTT connections | {n} | {} | | | | connected in {connect_secs:.1} s; platform +{:.1} KiB/device (gateway session + twin side), device side +{:.1} KiB/device (rumqttc client) |",
        cores(),
        platform_side as f64 / n as f64 / 1024.0,
        device_side as f64 / n as f64 / 1024.0
    );

    let probe = MqttDevice::connect(&addr.to_string(), "probe", &probe_token).await.unwrap();
    let probe_twin = p.twin("probe").unwrap();
    let only = std::env::var("TWINFLEET_BENCH_QOS").ok();
    let series_points = || p.runtime().series().counters.points.load(std::sync::atomic::Ordering::Relaxed);
    for (qos, name) in [(QoS::AtMostOnce, "MQTT QoS 0"), (QoS::AtLeastOnce, "MQTT QoS 1")] {
        if only.as_deref().is_some_and(|q| q != if qos == QoS::AtLeastOnce { "1" } else { "0" }) {
            continue;
        }
        let mut rates = Vec::new();
        let mut msg_rates = Vec::new();
        let mut lat = Vec::new();
        let mut sent_total = 0u64;
        let mut stored_total = 0u64;
        for _ in 0..repeat {
            let ops0 = series_points();
            writeln!(to_child, "GO {} {secs}", if qos == QoS::AtLeastOnce { 1 } else { 0 }).unwrap();
            let t0 = Instant::now();
            let window = Duration::from_secs(secs);
            let mut seq = 0u64;
            while t0.elapsed() < window {
                seq += 1;
                let sent = Instant::now();
                probe.telemetry(QoS::AtLeastOnce, None, &[("probe", seq as f64)]).await.unwrap();
                loop {
                    let v = probe_twin.get().await.unwrap();
                    if v.telemetry_latest.get("probe").map(|p| p.value) == Some(seq as f64) {
                        break;
                    }
                    if t0.elapsed() > window * 4 {
                        break;
                    }
                    actix_rt::time::sleep(Duration::from_millis(1)).await;
                }
                lat.push(sent.elapsed().as_secs_f64() * 1000.0);
            }

            let el = t0.elapsed().as_secs_f64();
            let (line, rest) = actix_rt::task::spawn_blocking(move || {
                let l = from_child.next().unwrap().unwrap();
                (l, from_child)
            })
            .await
            .unwrap();
            from_child = rest;
            let sent: u64 = line.strip_prefix("SENT ").unwrap().parse().unwrap();
            // Drain: wait until the series store has not moved for 8 s, so the next run
            // starts clean and the tally is complete.
            // Long enough for a checkpoint or a burst of reconnects: what devices wrote
            // into socket buffers during the run is still this run's.
            let (last, last_change) = settle(&series_points, Duration::from_secs(8)).await;
            // Sustained rate: everything stored, over the time from the start until the
            // last record (devices write faster than the platform stores; what they
            // wrote waits in socket buffers and is stored after the window).
            let busy = (last_change - t0).as_secs_f64().max(el);
            // Points written to the series store, minus the probe's (one per message).
            let stored = (last - ops0).saturating_sub(seq) / POINTS_PER_MESSAGE as u64;
            sent_total += sent;
            stored_total += stored;
            let refused = p.rejections().snapshot();
            if !refused.is_empty() {
                eprintln!("{name}: refused so far {refused:?}; open sessions {}", p.runtime().sessions().total());
            }
            rates.push(stored as f64 * POINTS_PER_MESSAGE as f64 / busy);
            msg_rates.push(stored as f64 / busy);
        }
        lat.sort_by(|a, b| a.total_cmp(b));
        println!(
            "| {name}, {POINTS_PER_MESSAGE} points/message | {n} | {} | {:.0} | {:.0} | {:.0} ms / {:.0} ms | {} runs of {secs} s; {} {sent_total} messages, stored {stored_total} ({:.2}%) |",
            cores(),
            median(rates),
            median(msg_rates),
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            repeat,
            if qos == QoS::AtLeastOnce { "gateway acknowledged" } else { "devices wrote" },
            stored_total as f64 * 100.0 / sent_total.max(1) as f64
        );
        let c = &p.runtime().series().counters;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "series store so far: {} points, {} late, {} duplicates, {} group commits, {} WAL bytes",
            load(&c.points),
            load(&c.late),
            load(&c.duplicates),
            load(&c.groups),
            load(&c.wal_bytes)
        );
    }
    writeln!(to_child, "QUIT").unwrap();
    let _ = child.wait();
    if only.as_deref() != Some("0") {
        mosquitto_relay(n, secs, repeat, &token_file, &dir).await;
    }
    probe.disconnect().await;
    gw.stop().await;
    p.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits until `count` has not moved for `quiet`; returns its value and when it last
/// moved.
async fn settle(count: &impl Fn() -> u64, quiet: Duration) -> (u64, Instant) {
    let mut last = count();
    let mut last_change = Instant::now();
    loop {
        actix_rt::time::sleep(quiet).await;
        let now = count();
        if now == last {
            return (last, last_change);
        }
        last = now;
        last_change = Instant::now();
    }
}

/// The baseline of the same run: Mosquitto merely relaying the same QoS 1 load from the
/// same device process to one subscriber (nothing stored). Skipped, with a message,
/// where Mosquitto is not installed.
async fn mosquitto_relay(n: usize, secs: u64, repeat: usize, token_file: &std::path::Path, dir: &std::path::Path) {
    // No limit on the subscriber's queue (the default of 1,000 would drop messages and
    // flatter the rate), no persistence: a pure relay.
    let conf =
        "allow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 100\npersistence false\nlog_type error\n";
    let Some(broker) = Mosquitto::start(dir, conf) else {
        println!(
            "| Mosquitto relay, QoS 1 | — | {} | | | | SKIPPED: mosquitto not installed (apt-get install mosquitto) |",
            cores()
        );
        return;
    };
    let port = broker.port;
    let addr = format!("127.0.0.1:{port}");

    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut opts = rumqttc::MqttOptions::new("relay-subscriber", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(60));
    // A persistent session: if the flood costs it its connection, the broker keeps what
    // it relays meanwhile and the subscriber picks it up on reconnecting.
    opts.set_clean_session(false);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (sub, mut events) = rumqttc::AsyncClient::new(opts, 64);
    sub.subscribe("devices/+/telemetry", QoS::AtLeastOnce).await.unwrap();
    let counter = received.clone();
    let poller = actix_rt::spawn(async move {
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(_))) => {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(_) => {}
                // rumqttc reconnects on the next poll.
                Err(e) => {
                    eprintln!("relay subscriber: {e}; reconnecting");
                    actix_rt::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("TWINFLEET_MQTT_DEVICES", &addr)
        .env("TWINFLEET_MQTT_TOKENS", token_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to_child = child.stdin.take().unwrap();
    let mut from_child = BufReader::new(child.stdout.take().unwrap()).lines();
    let (_, mut from_child) = actix_rt::task::spawn_blocking(move || {
        let line = from_child.next().unwrap().unwrap();
        (line, from_child)
    })
    .await
    .unwrap();
    let mut rates = Vec::new();
    let mut relayed = 0;
    for _ in 0..repeat {
        let r0 = received.load(std::sync::atomic::Ordering::Relaxed);
        writeln!(to_child, "GO 1 {secs}").unwrap();
        let t0 = Instant::now();
        let (_line, rest) = actix_rt::task::spawn_blocking(move || {
            let l = from_child.next().unwrap().unwrap();
            (l, from_child)
        })
        .await
        .unwrap();
        from_child = rest;
        // Until the subscriber has stopped receiving for 3 s.
        let (last, last_change) =
            settle(&|| received.load(std::sync::atomic::Ordering::Relaxed), Duration::from_secs(3)).await;
        let busy = (last_change - t0).as_secs_f64().max(secs as f64);
        relayed += last - r0;
        rates.push((last - r0) as f64 / busy);
    }
    println!(
        "| Mosquitto relay, QoS 1, 10 points/message (baseline) | {n} | {} | {:.0} | {:.0} | | {repeat} runs of {secs} s; publisher → Mosquitto → one subscriber, nothing stored; relayed {relayed} messages |",
        cores(),
        median(rates.clone()) * POINTS_PER_MESSAGE as f64,
        median(rates),
    );
    writeln!(to_child, "QUIT").unwrap();
    let _ = child.wait();
    poller.abort();
    drop(broker);
}
