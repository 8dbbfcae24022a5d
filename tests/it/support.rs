//! Helpers shared by the end-to-end tests.

use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use twinfleet::models::{Backoff, DeviceTypeId, DtaId, RestartPolicy, Timestamp, TwinId};
use twinfleet::{DeviceTypeSpec, Platform, Settings, TwinSpec, TypeHandle, VirtualClock};

pub fn obj(v: Value) -> Map<String, Value> {
    v.as_object().cloned().expect("a JSON object")
}

pub fn tid(s: &str) -> TwinId {
    TwinId::new(s).unwrap()
}

pub fn did(s: &str) -> DtaId {
    DtaId::new(s).unwrap()
}

/// Settings for tests: fault injection on, short restart backoff.
pub fn test_settings() -> Settings {
    Settings {
        allow_fault_injection: true,
        restart: RestartPolicy {
            max_restarts: 3,
            window_ms: 60_000,
            backoff: Backoff { initial_ms: 100, factor: 2, max_ms: 1_000 },
        },
        ..Settings::default()
    }
}

pub fn virtual_clock() -> Arc<VirtualClock> {
    VirtualClock::new(Timestamp(1_700_000_000_000))
}

pub async fn start(dir: &Path, clock: Option<Arc<VirtualClock>>, settings: Settings) -> Platform {
    let mut b = Platform::builder(dir).arbiters(2).settings(settings);
    if let Some(c) = clock {
        b = b.clock(c);
    }
    b.start().await.expect("platform starts")
}

/// Creates device type `ty` (defaults given) and `n` twins `{prefix}-{i}`, each in the
/// DTAs `dtas(i)` returns.
pub async fn fleet(
    p: &Platform,
    ty: &str,
    defaults: Value,
    prefix: &str,
    n: usize,
    dtas: impl Fn(usize) -> Vec<DtaId>,
) -> TypeHandle {
    let ty = p
        .create_device_type(DeviceTypeSpec {
            id: DeviceTypeId::new(ty).unwrap(),
            model: format!("{ty}-hw1"),
            defaults: obj(defaults),
            domain: None,
            journal: Default::default(),
            history: Default::default(),
            provisioning: None,
            metrics: None,
        })
        .await
        .expect("device type created");
    let specs = (0..n)
        .map(|i| {
            let mut s = TwinSpec::new(tid(&format!("{prefix}-{i}")));
            s.serial = format!("SN{i:08}");
            s.mac = format!("02:00:00:{:02x}:{:02x}:{:02x}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff);
            s.dtas = dtas(i);
            s
        })
        .collect();
    let report = ty.spawn_fleet(specs).await.expect("fleet spawned");
    assert_eq!(report.created, n);
    ty
}

/// The bootstrap admin's API token on a fresh platform.
pub async fn admin_token(p: &Platform) -> String {
    p.bootstrap_admin(None).await.expect("bootstrap").expect("a fresh platform issues an admin token")
}

/// Waits for a condition that another thread makes true (a restart, a flush), polling
/// it every 10 ms for at most 20 s. Waits on the event, not for a fixed time.
pub async fn eventually<T, F, Fut>(what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    settled(Option::is_some, f).await.unwrap_or_else(|| panic!("timed out waiting for: {what}"))
}

/// Polls `f` every 10 ms until `done` holds for its value (at most 20 s), and returns
/// that value; at the deadline it returns the last value instead of failing, for a
/// caller whose own assertion says better what is wrong. The one polling loop of the
/// tests: [`eventually`] is this, failing at the deadline.
pub async fn settled<T, F, Fut>(done: impl Fn(&T) -> bool, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = f().await;
        if done(&v) || Instant::now() >= deadline {
            return v;
        }
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A minimal blocking HTTP/1.1 GET over loopback: (status, body as JSON).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, Value) {
    http_request(addr, "GET", path, None)
}

/// A minimal blocking HTTP/1.1 request over loopback with an optional JSON body and no
/// credentials.
pub fn http_request(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    http_call(addr, None, method, path, body)
}

/// Like `http_request`, as the holder of API token `token`.
pub fn http_as(addr: SocketAddr, token: &str, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    http_call(addr, Some(token), method, path, body)
}

fn http_call(addr: SocketAddr, token: Option<&str>, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let (status, body, _) = http_full(addr, token, method, path, &[], body);
    (status, body)
}

/// A request with extra headers: (status, body as JSON, response headers by lowercase
/// name).
pub fn http_full(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, Value, BTreeMap<String, String>) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut extra = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    for (k, v) in headers {
        extra.push_str(&format!("{k}: {v}\r\n"));
    }
    match body {
        Some(b) => write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )
        .unwrap(),
        None => write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n").unwrap(),
    }
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read response");
    let status: u16 = raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status line");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let headers: BTreeMap<String, String> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = if headers.get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, serde_json::from_str(&body).unwrap_or(Value::String(body)), headers)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

/// A webhook server on loopback: answers each POST with the next status of `script`
/// (then 200), and keeps every request's headers and body.
/// A request the hook got: headers, body, the status it answered.
pub type Got = (BTreeMap<String, String>, Vec<u8>, u16);

pub struct Hook {
    pub addr: std::net::SocketAddr,
    pub got: std::sync::Arc<std::sync::Mutex<Vec<Got>>>,
    /// While set, every request is answered 503 and the script waits.
    pub refusing: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Hook {
    pub fn start(script: Vec<u16>) -> Hook {
        use std::io::{BufRead, BufReader};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let g = got.clone();
        let refusing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refuse = refusing.clone();
        std::thread::spawn(move || {
            let mut script = script.into_iter();
            for s in l.incoming() {
                let Ok(s) = s else { return };
                // A request cut off (its sender killed mid-write) is dropped, not recorded.
                let read = || -> std::io::Result<(BTreeMap<String, String>, Vec<u8>)> {
                    let mut r = BufReader::new(s.try_clone()?);
                    let mut headers = BTreeMap::new();
                    let mut line = String::new();
                    r.read_line(&mut line)?;
                    loop {
                        line.clear();
                        if r.read_line(&mut line)? == 0 || line == "\r\n" {
                            break;
                        }
                        if let Some((k, v)) = line.trim_end().split_once(':') {
                            headers.insert(k.to_ascii_lowercase(), v.trim().to_string());
                        }
                    }
                    let n: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
                    let mut body = vec![0; n];
                    r.read_exact(&mut body)?;
                    Ok((headers, body))
                };
                let Ok((headers, body)) = read() else { continue };
                let status =
                    if refuse.load(std::sync::atomic::Ordering::SeqCst) { 503 } else { script.next().unwrap_or(200) };
                g.lock().unwrap().push((headers, body, status));
                let mut s = s;
                let _ = write!(s, "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            }
        });
        Hook { addr, got, refusing }
    }

    /// The bodies of the requests it answered 200, as JSON.
    pub fn taken(&self) -> Vec<serde_json::Value> {
        self.got.lock().unwrap().iter().filter(|r| r.2 == 200).map(|r| serde_json::from_slice(&r.1).unwrap()).collect()
    }
}
