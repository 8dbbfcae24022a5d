//! Operator API benchmark: desired-state updates through HTTP
//! (`PATCH /api/v1/twins/{id}/desired` with an admin token), from concurrent keep-alive
//! clients. Each answer leaves after the change and its audit record are flushed.
//!
//! Baselines in the same run: `GET /healthz` (the HTTP stack alone, no storage) and
//! `set_desired` through `TwinHandle` with as many callers (twin + storage, no HTTP).
//! Each figure is the median of `TWINFLEET_BENCH_REPEAT` (default 3) runs of 3 s.
//! `TWINFLEET_BENCH_CLIENTS` (default 64), `TWINFLEET_BENCH_TWINS` (default 10,000),
//! `TWINFLEET_BENCH_SECTIONS` (default `healthz,handle,patch,bare`; one alone for
//! profiling). `bare` is the floor under the PATCH row: the same requests answered by a
//! bare actix-web handler after the same kind of group-committed write (see `bare`);
//! `bare-nowrite` (not in the default) is that handler without the write.
//! Clients and server share the machine's cores.

mod common;

use common::{cores, device_write_bytes, disk_write_bytes, env_or, median, pct};
use serde_json::json;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use twinfleet::models::{DeviceTypeId, TwinId};
use twinfleet::{DeviceTypeSpec, Platform, TwinHandle, TwinSpec};
use twinfleet_protocols::HttpApi;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RUN: Duration = Duration::from_secs(3);

fn row(bench: &str, clients: usize, value: &str, extra: &str) {
    println!("| {bench} | {clients} | {} | {value} | {extra} |", cores());
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    stream: BufReader<TcpStream>,
    line: String,
    body: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Conn { stream: BufReader::new(stream), line: String::new(), body: Vec::new() }
    }

    /// Sends a whole request and reads the answer; returns its status.
    async fn call(&mut self, request: &[u8]) -> u16 {
        self.stream.get_mut().write_all(request).await.unwrap();
        let mut status = 0;
        let mut len = 0;
        loop {
            self.line.clear();
            assert!(self.stream.read_line(&mut self.line).await.unwrap() > 0, "connection closed");
            let l = self.line.trim_end();
            if l.is_empty() {
                break;
            }
            if status == 0 {
                status = l.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap();
            } else if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap();
            }
        }
        self.body.resize(len, 0);
        self.stream.read_exact(&mut self.body).await.unwrap();
        status
    }
}

/// Runs `clients` connections for `RUN`, each sending `request(client, n)` in turn;
/// returns (requests/s, p50 us, p99 us). Every answer must be `want`.
async fn http_loop(
    addr: SocketAddr,
    clients: usize,
    want: u16,
    request: impl Fn(usize, u64) -> Vec<u8> + Clone + 'static,
) -> (f64, f64, f64) {
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(Conn::open(addr).await);
    }
    let started = Instant::now();
    let end = started + RUN;
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(c, mut conn)| {
            let request = request.clone();
            actix_rt::spawn(async move {
                let mut lat = Vec::new();
                let mut n = 0;
                while Instant::now() < end {
                    let req = request(c, n);
                    let t = Instant::now();
                    let status = conn.call(&req).await;
                    assert_eq!(status, want, "{}", String::from_utf8_lossy(&conn.body));
                    lat.push(t.elapsed().as_micros() as u32);
                    n += 1;
                }
                lat
            })
        })
        .collect();
    rate_and_latency(tasks, started).await
}

/// Waits for tasks that each return their request latencies (µs); returns (requests/s
/// since `started`, p50 µs, p99 µs).
async fn rate_and_latency(tasks: Vec<actix_rt::task::JoinHandle<Vec<u32>>>, started: Instant) -> (f64, f64, f64) {
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort_unstable();
    DONE.fetch_add(all.len() as u64, std::sync::atomic::Ordering::Relaxed);
    (all.len() as f64 / secs, pct(&all, 0.5), pct(&all, 0.99))
}

/// Requests completed, for the bytes-per-change figures.
static DONE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Runs `section` and prints the bytes it wrote per completed request: logical (keys and
/// values committed) and on the device (`/proc/self/io`).
async fn measured<F: std::future::Future<Output = ()>>(p: &Platform, dir: &std::path::Path, label: &str, section: F) {
    let (s0, d0, b0) = (p.storage_stats().bytes_committed, disk_write_bytes(), device_write_bytes(dir));
    let n0 = DONE.load(std::sync::atomic::Ordering::Relaxed);
    section.await;
    let n = (DONE.load(std::sync::atomic::Ordering::Relaxed) - n0).max(1) as f64;
    let (s1, d1, b1) = (p.storage_stats().bytes_committed, disk_write_bytes(), device_write_bytes(dir));
    let device = match (b0, b1) {
        (Some(b0), Some(b1)) => format!("{:.0}", (b1 - b0) as f64 / n),
        _ => "? (not a block device)".into(),
    };
    BYTES.lock().unwrap().push(format!(
        "{label}: {:.0} bytes committed, {device} bytes written to the block device (every process) and {:.0} \
         bytes by /proc/self/io write_bytes per change",
        (s1 - s0) as f64 / n,
        (d1 - d0) as f64 / n
    ));
}

static BYTES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Runs `callers` tasks calling `set_desired` on their own twins for `RUN`.
async fn handle_loop(handles: Vec<Vec<TwinHandle>>) -> (f64, f64, f64) {
    let started = Instant::now();
    let end = started + RUN;
    let tasks: Vec<_> = handles
        .into_iter()
        .map(|mine| {
            actix_rt::spawn(async move {
                let mut lat = Vec::new();
                let mut n = 0u64;
                while Instant::now() < end {
                    let h = &mine[n as usize % mine.len()];
                    let t = Instant::now();
                    h.set_desired(json!({"setpoint": n}).as_object().unwrap().clone()).await.unwrap();
                    lat.push(t.elapsed().as_micros() as u32);
                    n += 1;
                }
                lat
            })
        })
        .collect();
    rate_and_latency(tasks, started).await
}

fn report(bench: &str, clients: usize, runs: Vec<(f64, f64, f64)>) {
    let column = |f: fn(&(f64, f64, f64)) -> f64| median(runs.iter().map(f).collect());
    row(
        bench,
        clients,
        &format!("{:.0} req/s", column(|r| r.0)),
        &format!("p50 {:.0} us, p99 {:.0} us (median of {})", column(|r| r.1), column(|r| r.2), runs.len()),
    );
}

/// The PATCH request of client `c`'s `n`th call: client c updates twins c, c + clients,
/// c + 2 clients, ... in turn.
fn patch_request(
    ids: Vec<String>,
    token: String,
    clients: usize,
    twins: usize,
) -> impl Fn(usize, u64) -> Vec<u8> + Clone {
    let per_client = twins / clients;
    move |c, n| {
        let id = &ids[c + clients * (n as usize % per_client)];
        let body = format!("{{\"setpoint\":{n}}}");
        format!(
            "PATCH /api/v1/twins/{id}/desired HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
}

/// The floor under the PATCH row: the same requests on the same HTTP stack (actix-web,
/// as many workers), each answered after a durable write through the same group commit
/// (twinfleet's sled writer), and nothing else: no authentication lookup, no twin, no
/// validation, no audit task. The handler checks the bearer header's form, parses the
/// JSON body, and commits two records (the change and an audit line, as a PATCH does)
/// in one batch before it answers.
mod bare {
    use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use twinfleet_runtime::storage::{SledOptions, SledStorage, Space, Storage, WriteBatch};

    struct State {
        storage: Arc<SledStorage>,
        seq: AtomicU64,
        write: bool,
    }

    async fn patch(req: HttpRequest, path: web::Path<String>, body: web::Bytes, st: web::Data<State>) -> HttpResponse {
        let authorized =
            req.headers().get("authorization").and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("Bearer "));
        if !authorized {
            return HttpResponse::Unauthorized().finish();
        }
        let Ok(doc) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&body) else {
            return HttpResponse::BadRequest().finish();
        };
        let seq = st.seq.fetch_add(1, Ordering::Relaxed);
        let id = path.into_inner();
        if !st.write {
            return HttpResponse::Ok().json(serde_json::json!({"id": id, "seq": seq}));
        }
        let mut b = WriteBatch::new();
        let mut key = id.as_bytes().to_vec();
        key.extend_from_slice(&seq.to_be_bytes());
        b.put(Space(200), key, serde_json::to_vec(&doc).unwrap());
        b.put(
            Space(201),
            seq.to_be_bytes().to_vec(),
            format!("{{\"path\":\"/api/v1/twins/{id}/desired\",\"status\":200}}").into_bytes(),
        );
        match st.storage.submit(b).await {
            Ok(()) => HttpResponse::Ok().json(serde_json::json!({"id": id, "seq": seq})),
            Err(e) => HttpResponse::InternalServerError().body(e.to_string()),
        }
    }

    /// Serves the bare handler; `write: false` answers once the body is parsed.
    pub fn start(dir: &std::path::Path, workers: usize, write: bool) -> (SocketAddr, actix_web::dev::ServerHandle) {
        let storage =
            SledStorage::open(&dir.join(if write { "bare" } else { "bare-nowrite" }), SledOptions::default()).unwrap();
        let state = web::Data::new(State { storage, seq: AtomicU64::new(0), write });
        let server = HttpServer::new(move || {
            App::new().app_data(state.clone()).route("/api/v1/twins/{id}/desired", web::patch().to(patch))
        })
        .workers(workers)
        .bind("127.0.0.1:0")
        .unwrap();
        let addr = server.addrs()[0];
        let server = server.run();
        let handle = server.handle();
        actix_rt::spawn(server);
        (addr, handle)
    }
}

fn main() {
    // As the `twinfleet` binary does at its start (see twinfleet::memory).
    twinfleet::memory::disable_transparent_huge_pages().expect("prctl(PR_SET_THP_DISABLE)");
    actix_rt::System::new().block_on(run());
}

async fn run() {
    let clients = env_or("TWINFLEET_BENCH_CLIENTS", 64) as usize;
    let twins = env_or("TWINFLEET_BENCH_TWINS", 10_000) as usize;
    let repeat = env_or("TWINFLEET_BENCH_REPEAT", 3) as usize;
    let dir = std::env::temp_dir().join(format!("twinfleet-bench-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let p = Platform::builder(&dir).start().await.unwrap();
    let ty = p
        .create_device_type(DeviceTypeSpec {
            id: DeviceTypeId::new("thermostat").unwrap(),
            model: "t1".into(),
            defaults: Default::default(),
            domain: None,
            journal: Default::default(),
            history: Default::default(),
            provisioning: None,
            metrics: None,
        })
        .await
        .unwrap();
    let ids: Vec<String> = (0..twins).map(|i| format!("t-{i:06}")).collect();
    ty.spawn_fleet(ids.iter().map(|id| TwinSpec::new(TwinId::new(id).unwrap())).collect()).await.unwrap();
    let token = p.bootstrap_admin(None).await.unwrap().expect("a fresh platform issues a token");
    let workers = env_or("TWINFLEET_BENCH_HTTP_WORKERS", cores() as u64) as usize;
    let api = HttpApi::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap(), workers).unwrap();
    let addr = api.local_addr();

    println!("| benchmark | clients | cores | result | detail |");
    println!("|---|---|---|---|---|");
    let sections = std::env::var("TWINFLEET_BENCH_SECTIONS").unwrap_or("healthz,handle,patch,bare".into());
    let section = |name: &str| sections.split(',').any(|s| s == name);
    if section("healthz") {
        let healthz = b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n".to_vec();
        let mut runs = Vec::new();
        for _ in 0..repeat {
            let req = healthz.clone();
            runs.push(http_loop(addr, clients, 200, move |_, _| req.clone()).await);
        }
        report("baseline: GET /healthz (HTTP stack, no storage)", clients, runs);
    }

    // Client c updates twins c, c + clients, c + 2 clients, ... in turn.
    if section("handle") {
        measured(&p, &dir, "set_desired via TwinHandle", async {
            let mut runs = Vec::new();
            for _ in 0..repeat {
                let mine: Vec<Vec<TwinHandle>> = (0..clients)
                    .map(|c| (c..twins).step_by(clients).map(|i| p.twin(&ids[i]).unwrap()).collect())
                    .collect();
                runs.push(handle_loop(mine).await);
            }
            report("baseline: set_desired via TwinHandle (durable, no HTTP)", clients, runs);
        })
        .await;
    }
    if section("patch") {
        measured(&p, &dir, "PATCH /desired (change + audit entry)", async {
            let mut runs = Vec::new();
            for _ in 0..repeat {
                runs.push(
                    http_loop(addr, clients, 200, patch_request(ids.clone(), token.clone(), clients, twins)).await,
                );
            }
            report("PATCH /twins/{id}/desired (durable change + audit record)", clients, runs);
        })
        .await;
    }
    for (name, write) in [("bare", true), ("bare-nowrite", false)] {
        if !section(name) {
            continue;
        }
        let (addr, server) = bare::start(&dir, workers, write);
        let mut runs = Vec::new();
        for _ in 0..repeat {
            runs.push(http_loop(addr, clients, 200, patch_request(ids.clone(), token.clone(), clients, twins)).await);
        }
        let what = if write { "2 records group-committed" } else { "no write" };
        report(
            &format!("baseline: the same PATCH on a bare actix-web handler (JSON parsed, {what}, nothing else)"),
            clients,
            runs,
        );
        server.stop(true).await;
    }
    for line in BYTES.lock().unwrap().iter() {
        println!("\n{line}");
    }
    let s = p.storage_stats();
    println!(
        "\nstorage: {} batches, {} group commits, {:.1} records/commit, {:.0} us/flush on average",
        s.batches_submitted,
        s.groups_committed,
        s.ops_committed as f64 / s.groups_committed.max(1) as f64,
        s.flush_micros_total as f64 / s.groups_committed.max(1) as f64
    );
    api.stop().await;
    p.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
