//! End-to-end telemetry ingest over gRPC: device client → gateway → DTI → stored
//! durably, acknowledged per batch. The devices run in a child process (this binary
//! re-run with `TWINFLEET_INGEST_DEVICES`, one child per run); both share this machine's
//! cores.
//!
//! `cargo bench --bench ingest`. `TWINFLEET_BENCH_SECONDS` (default 5) sets each run's
//! length; `TWINFLEET_BENCH_REPEAT` (default 3) the runs per row (median reported);
//! `TWINFLEET_BENCH_SECTIONS` (default `baseline,small,large,hub`) the rows.
//!
//! The `baseline` row is the transport's own ceiling on this machine: the same device
//! process against a bare tonic `DeviceGateway` server that decodes each batch and
//! acknowledges it at once (nothing authenticated, validated or stored), served like the
//! gateway (one thread of its own, `TCP_NODELAY`). It is to the gRPC rows what the
//! Mosquitto relay is to the MQTT bench's.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use twinfleet::Platform;
use twinfleet_proto::device::{self as pb, device_gateway_client::DeviceGatewayClient};
use twinfleet_proto::hub::{self, hub_client::HubClient};
use twinfleet_protocols::GrpcGateway;

// The same allocator as the `twinfleet` binary (see src/main.rs for why).
mod common;
use common::{cores, env_or, median, meter_fleet, pct, rss};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Devices streaming Hub values at once.
const HUB_DEVICES: usize = 1_000;
/// HTTP/2 connections the simulated devices share.
const CONNECTIONS: usize = 16;

fn main() {
    // As the `twinfleet` binary does at its start (see twinfleet::memory).
    twinfleet::memory::disable_transparent_huge_pages().expect("prctl(PR_SET_THP_DISABLE)");
    if let Ok(args) = std::env::var("TWINFLEET_INGEST_DEVICES") {
        return tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(devices(args));
    }
    actix_rt::System::new().block_on(run());
}

/// The child: `<gateway addr> <token file> <gateway|hub> <devices> <per batch> <secs>`;
/// prints `RESULT <points/s> <p50 µs> <p99 µs>`.
async fn devices(args: String) {
    let a: Vec<String> = args.split_whitespace().map(String::from).collect();
    let [addr, token_file, mode, n, per, secs] = &a[..] else { panic!("bad args {args}") };
    let tokens: Vec<String> = std::fs::read_to_string(token_file).unwrap().lines().map(String::from).collect();
    let n: usize = n.parse().unwrap();
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap());
    }
    let dur = Duration::from_secs(secs.parse().unwrap());
    let (rate, lat) = match mode.as_str() {
        "gateway" => gateway_run(&channels, &tokens[..n], per.parse().unwrap(), dur).await,
        _ => (hub_run(&channels, &tokens, per.parse().unwrap(), dur).await, vec![0]),
    };
    println!("RESULT {rate} {} {}", pct(&lat, 0.5), pct(&lat, 0.99));
}

/// One run in a fresh device process: (points/s, p50 µs, p99 µs).
async fn in_child(
    addr: &str,
    token_file: &std::path::Path,
    mode: &str,
    n: usize,
    per: usize,
    secs: u64,
) -> (f64, f64, f64) {
    let args = format!("{addr} {} {mode} {n} {per} {secs}", token_file.display());
    actix_rt::task::spawn_blocking(move || {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env("TWINFLEET_INGEST_DEVICES", args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = (0.0, 0.0, 0.0);
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            if let Some(rest) = line.strip_prefix("RESULT ") {
                let v: Vec<f64> = rest.split_whitespace().map(|x| x.parse().unwrap()).collect();
                out = (v[0], v[1], v[2]);
            }
        }
        let _ = child.wait();
        out
    })
    .await
    .unwrap()
}

async fn run() {
    let devices = 10_000usize;
    let dir = std::env::temp_dir().join(format!("twinfleet-ingest-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let p = Platform::builder(&dir).start().await.unwrap();
    let ids: Vec<String> = (0..devices).map(|i| format!("d-{i:05}")).collect();
    let tokens = meter_fleet(&p, &ids).await;
    let gw = GrpcGateway::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = gw.local_addr().to_string();
    let token_file = dir.join("tokens");
    std::fs::write(&token_file, tokens.join("\n")).unwrap();
    let secs = env_or("TWINFLEET_BENCH_SECONDS", 5);
    let repeat = env_or("TWINFLEET_BENCH_REPEAT", 3) as usize;

    let sections = std::env::var("TWINFLEET_BENCH_SECTIONS").unwrap_or_else(|_| "baseline,small,large,hub".into());
    let on = |s: &str| sections.split(',').any(|x| x == s);

    println!("| benchmark | devices | cores | points/s | detail |");
    println!("|---|---|---|---|---|");
    if on("baseline") {
        let (echo_addr, stop) = echo_server();
        let mut rates = vec![];
        let mut p50 = vec![];
        for _ in 0..repeat {
            let (rate, l50, _) = in_child(&echo_addr, &token_file, "gateway", devices, 10, secs).await;
            rates.push(rate);
            p50.push(l50);
        }
        let _ = stop.send(());
        println!(
            "| baseline: bare tonic server, decode + ack only, 10 points/batch | {devices} | {} | {:.0} | nothing authenticated or stored; per batch p50 {:.1} ms (median of {repeat}; devices in a child process) |",
            cores(),
            median(rates),
            median(p50) / 1000.0,
        );
    }
    for (section, label, n, per_batch) in [
        ("small", "DeviceGateway.SendTelemetry, 10 points/batch", devices, 10usize),
        ("large", "DeviceGateway.SendTelemetry, 1,000 points/batch", 100, 1_000),
    ] {
        if !on(section) {
            continue;
        }
        let mut rates = vec![];
        let mut p50 = vec![];
        let mut p99 = vec![];
        let rss0 = rss();
        for _ in 0..repeat {
            let (rate, l50, l99) = in_child(&addr, &token_file, "gateway", n, per_batch, secs).await;
            rates.push(rate);
            p50.push(l50);
            p99.push(l99);
        }
        println!(
            "| gRPC {label} | {n} | {} | {:.0} | per batch p50 {:.1} ms, p99 {:.1} ms; platform RSS +{} MiB during the runs (median of {repeat}; devices in a child process) |",
            cores(),
            median(rates),
            median(p50) / 1000.0,
            median(p99) / 1000.0,
            rss().saturating_sub(rss0) >> 20
        );
    }
    if on("hub") {
        let mut rates = vec![];
        for _ in 0..repeat {
            rates.push(in_child(&addr, &token_file, "hub", HUB_DEVICES, 1_000, secs).await.0);
        }
        println!(
            "| gRPC Hub.SendNumericScalarValues, streams of 1,000 values | {HUB_DEVICES} | {} | {:.0} | one value per message, stored in batches of 1,000 (median of {repeat}) |",
            cores(),
            median(rates)
        );
    }
    gw.stop().await;
    p.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The baseline's server: `DeviceGateway` with `SendTelemetry` answering each batch as
/// soon as it is decoded, on an arbiter of its own. Returns its address and its stop.
fn echo_server() -> (String, tokio::sync::oneshot::Sender<()>) {
    use std::pin::Pin;
    use tokio_stream::Stream;
    use tonic::{Request, Response, Status};
    use twinfleet_proto::device::device_gateway_server::{DeviceGateway, DeviceGatewayServer};

    type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;
    struct Echo;
    #[tonic::async_trait]
    impl DeviceGateway for Echo {
        type SendTelemetryStream = Out<pb::BatchAck>;
        type CommandsStream = Out<pb::Command>;
        async fn send_telemetry(
            &self,
            req: Request<tonic::Streaming<pb::TelemetryBatch>>,
        ) -> Result<Response<Self::SendTelemetryStream>, Status> {
            let mut batches = req.into_inner();
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                while let Ok(Some(b)) = batches.message().await {
                    let ack =
                        pb::BatchAck { batch_id: b.batch_id, accepted: b.points.len() as u32, error: String::new() };
                    if tx.send(Ok(ack)).await.is_err() {
                        break;
                    }
                }
            });
            Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
        }
        async fn send_logs(&self, _: Request<pb::LogBatch>) -> Result<Response<pb::Ack>, Status> {
            Err(Status::unimplemented("baseline"))
        }
        async fn report_state(&self, _: Request<pb::StateReport>) -> Result<Response<pb::Ack>, Status> {
            Err(Status::unimplemented("baseline"))
        }
        async fn commands(&self, _: Request<pb::CommandsRequest>) -> Result<Response<Self::CommandsStream>, Status> {
            Err(Status::unimplemented("baseline"))
        }
        async fn ack_command(&self, _: Request<pb::CommandAck>) -> Result<Response<pb::Ack>, Status> {
            Err(Status::unimplemented("baseline"))
        }
    }

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    actix_rt::Arbiter::new().spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let _ = tonic::transport::Server::builder()
            .add_service(DeviceGatewayServer::new(Echo))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = stopped.await;
                },
            )
            .await;
        actix_rt::Arbiter::current().stop();
    });
    (addr, stop)
}

fn authed<T>(msg: T, device: &str, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("x-device-id", MetadataValue::try_from(device).unwrap());
    r.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {token}")).unwrap());
    r
}

/// Every device keeps one telemetry stream open and sends its next batch when the
/// previous one is acknowledged. Returns points/s and per-batch latencies (µs).
async fn gateway_run(channels: &[Channel], tokens: &[String], per_batch: usize, dur: Duration) -> (f64, Vec<u32>) {
    let end = Instant::now() + dur;
    let started = Instant::now();
    let tasks: Vec<_> = tokens
        .iter()
        .enumerate()
        .map(|(i, token)| {
            let mut client = DeviceGatewayClient::new(channels[i % channels.len()].clone());
            let (device, token) = (format!("d-{i:05}"), token.clone());
            tokio::spawn(async move {
                let (tx, rx) = mpsc::channel(2);
                let mut acks =
                    client.send_telemetry(authed(ReceiverStream::new(rx), &device, &token)).await.unwrap().into_inner();
                let mut lat = Vec::new();
                let mut points = 0usize;
                let mut id = 0u64;
                while Instant::now() < end {
                    id += 1;
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
                    let ts = prost_types::Timestamp { seconds: now.as_secs() as i64, nanos: now.subsec_nanos() as i32 };
                    let batch = pb::TelemetryBatch {
                        batch_id: id,
                        points: (0..per_batch)
                            .map(|m| pb::MetricPoint {
                                metric: format!("m{}", m % 10),
                                value: m as f64,
                                timestamp: Some(ts),
                                unit: String::new(),
                            })
                            .collect(),
                    };
                    let t = Instant::now();
                    tx.send(batch).await.unwrap();
                    let ack = acks.message().await.unwrap().unwrap();
                    lat.push(t.elapsed().as_micros() as u32);
                    points += ack.accepted as usize;
                }
                drop(tx);
                (points, lat)
            })
        })
        .collect();
    let mut points = 0;
    let mut lat = Vec::new();
    for t in tasks {
        let (p, l) = t.await.unwrap();
        points += p;
        lat.extend(l);
    }
    lat.sort_unstable();
    (points as f64 / started.elapsed().as_secs_f64(), lat)
}

/// Devices stream `per_stream` Hub values, one stream after another, until time is up.
async fn hub_run(channels: &[Channel], tokens: &[String], per_stream: usize, dur: Duration) -> f64 {
    let end = Instant::now() + dur;
    let started = Instant::now();
    let tasks: Vec<_> = tokens
        .iter()
        .enumerate()
        .take(HUB_DEVICES)
        .map(|(i, token)| {
            let mut client = HubClient::new(channels[i % channels.len()].clone());
            let (device, token) = (format!("d-{i:05}"), token.clone());
            tokio::spawn(async move {
                let mut sent = 0usize;
                while Instant::now() < end {
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
                    let values: Vec<hub::NumericScalarValues> = (0..per_stream)
                        .map(|k| hub::NumericScalarValues {
                            tenant_identifier: "t".into(),
                            device_identifier: device.clone(),
                            metric_identifier: "humidity".into(),
                            value: k as f64,
                            unit: "%".into(),
                            display_name: String::new(),
                            timestamp: Some(prost_types::Timestamp { seconds: now.as_secs() as i64, nanos: 0 }),
                        })
                        .collect();
                    let mut r = tonic::Request::new(tokio_stream::iter(values));
                    r.metadata_mut()
                        .insert("authorization", MetadataValue::try_from(format!("Bearer {token}")).unwrap());
                    client.send_numeric_scalar_values(r).await.unwrap();
                    sent += per_stream;
                }
                sent
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}
