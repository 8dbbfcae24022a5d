//! The `twinfleet` binary as an operator runs it.

use crate::support::{http_as, http_get};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn spawn(dir: &std::path::Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_twinfleet"))
        .arg("run")
        .args(args)
        .current_dir(dir)
        .env_remove("TWINFLEET_DATA_DIR")
        .env_remove("TWINFLEET_HTTP")
        .env_remove("TWINFLEET_CONFIG")
        .env_remove("TWINFLEET_GRPC")
        .env_remove("TWINFLEET_MQTT")
        .env_remove("TWINFLEET_MQTT_PROVISIONING")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("twinfleet binary starts")
}

/// Every listener on an ephemeral port (parallel tests must not collide on the
/// defaults), then `extra`.
fn with_ephemeral_ports<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"];
    args.extend(["--mqtt", "127.0.0.1:0", "--mqtt-provisioning", "127.0.0.1:0"]);
    args.extend_from_slice(extra);
    args
}

/// Reads stdout until the binary says where it listens; returns the address and the
/// admin token it printed, if it printed one.
fn wait_ready_with_token(child: &mut Child) -> (SocketAddr, Option<String>) {
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut token = None;
    loop {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "twinfleet closed stdout before it was ready");
        if let Some(t) = line.split("(shown only now): ").nth(1) {
            token = Some(t.trim().to_string());
            continue;
        }
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected line {line:?}"));
        return (addr.parse().unwrap(), token);
    }
}

fn wait_ready(child: &mut Child) -> SocketAddr {
    wait_ready_with_token(child).0
}

/// Runs a client subcommand of the binary; returns (success, stdout, stderr).
pub(crate) fn client(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_twinfleet"))
        .args(args)
        .env_remove("TWINFLEET_TOKEN")
        .env_remove("TWINFLEET_API")
        .output()
        .expect("twinfleet binary runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn signal(child: &Child, sig: i32) {
    // Safety: kill(2) on a pid we own; no memory is touched.
    #[allow(unsafe_code)]
    let r = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(r, 0);
}

/// Waits for exit (at most 30 s) and returns (success, stderr).
fn finish(mut child: Child) -> (bool, String) {
    let mut stderr = child.stderr.take().unwrap();
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let status = child.wait();
        let _ = tx.send(status);
    });
    let status = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(s) => s.unwrap(),
        Err(_) => {
            // Safety: kill(2) on a pid we own.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(pid, libc::SIGKILL)
            };
            panic!("twinfleet did not stop within 30 s");
        }
    };
    let mut err = String::new();
    stderr.read_to_string(&mut err).unwrap();
    (status.success(), err)
}

#[test]
fn run_on_defaults_serves_health_and_the_actor_tree_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    // Default data directory (./twinfleet-data in the working directory); an ephemeral
    // port so that parallel test runs do not collide on 8080.
    let mut child = spawn(dir.path(), &with_ephemeral_ports(&[]));
    let (addr, token) = wait_ready_with_token(&mut child);
    let token = token.expect("a fresh data dir prints an admin token");
    assert!(token.starts_with("tfa_"), "{token}");
    assert!(dir.path().join("twinfleet-data/db").is_dir(), "data in ./twinfleet-data");
    let (status, body) = http_get(addr, "/healthz");
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, body) = http_get(addr, "/api/v1/actors");
    assert_eq!((status, body["error"].as_str()), (401, Some("unauthenticated")), "no token, no API");
    let (status, body) = http_as(addr, &token, "GET", "/api/v1/actors", None);
    assert_eq!(status, 200);
    assert_eq!(body["actors"][0]["kind"], "platform");
    let (status, body) = http_as(addr, &token, "GET", "/api/v1/twins/missing", None);
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    signal(&child, libc::SIGINT);
    let (ok, err) = finish(child);
    assert!(ok, "clean exit on Ctrl-C; stderr:\n{err}");
    assert!(err.contains("stopped cleanly"), "{err}");
    assert!(err.contains("data directory"), "says where data lives: {err}");
}

#[test]
fn a_second_instance_on_the_same_data_dir_is_refused_and_sigterm_stops_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = spawn(dir.path(), &with_ephemeral_ports(&["--data-dir", "shared"]));
    wait_ready(&mut first);
    let second = spawn(dir.path(), &with_ephemeral_ports(&["--data-dir", "shared"]));
    let (ok, err) = finish(second);
    assert!(!ok, "second instance must fail");
    assert!(err.contains("already used by another running twinfleet instance"), "{err}");
    signal(&first, libc::SIGTERM);
    let (ok, err) = finish(first);
    assert!(ok && err.contains("stopped cleanly"), "{err}");
}

#[test]
fn a_bad_config_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tf.toml"), "htpp = \"127.0.0.1:1\"\n").unwrap();
    let (ok, err) = finish(spawn(dir.path(), &["--config", "tf.toml"]));
    assert!(!ok);
    assert!(err.contains("tf.toml") && err.contains("unknown field"), "{err}");
}

#[test]
fn device_type_files_are_loaded_at_start_and_their_components_served() {
    let dir = tempfile::tempdir().unwrap();
    let types = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("device-types");
    let mut child = spawn(dir.path(), &with_ephemeral_ports(&["--device-types", types.to_str().unwrap()]));
    let (addr, token) = wait_ready_with_token(&mut child);
    let (status, body) = http_as(addr, &token.unwrap(), "GET", "/api/v1/device-types", None);
    assert_eq!(status, 200);
    let dispenser = body.as_array().unwrap().iter().find(|t| t["id"] == "medicine-dispenser").expect("loaded");
    assert_eq!(dispenser["domain"]["root"], "Device");
    signal(&child, libc::SIGTERM);
    let (ok, err) = finish(child);
    assert!(ok && err.contains("device type medicine-dispenser created"), "{err}");
}

#[test]
fn the_cli_lists_and_shows_twins_of_a_running_instance() {
    let dir = tempfile::tempdir().unwrap();
    let token = "tfa_test-admin-token-0123456789abcdef";
    let mut child = Command::new(env!("CARGO_BIN_EXE_twinfleet"))
        .arg("run")
        .args(with_ephemeral_ports(&[]))
        .current_dir(dir.path())
        .env("TWINFLEET_ADMIN_TOKEN", token)
        .env_remove("TWINFLEET_DATA_DIR")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (addr, printed) = wait_ready_with_token(&mut child);
    assert_eq!(printed, None, "a token from the environment is not printed");
    let ty = r#"{"id":"valve","model":"V-2"}"#;
    assert_eq!(http_as(addr, token, "POST", "/api/v1/device-types", Some(ty)).0, 201);
    for i in 0..3 {
        let twin = format!(r#"{{"id":"valve-{i}","device_type":"valve","metadata":{{"tags":["north"]}}}}"#);
        let (s, b) = http_as(addr, token, "POST", "/api/v1/twins", Some(&twin));
        assert_eq!(s, 201, "{b}");
    }
    let api = format!("http://{addr}");
    let (ok, out, err) = client(&["twins", "list", "--api", &api, "--token", token]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("ID") && lines[0].contains("TYPE") && lines[0].contains("STATE"), "{out}");
    assert!(lines[1].starts_with("valve-0") && lines[1].contains("valve") && lines[1].contains("active"), "{out}");
    assert!(out.contains("3 of 3 twins"), "{out}");
    let (ok, out, _) = client(&["twins", "list", "--api", &api, "--token", token, "--limit", "2", "--json"]);
    assert!(ok);
    let page: serde_json::Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!((page["total"].as_u64(), page["next"].as_str()), (Some(3), Some("valve-1")));
    let (ok, out, _) = client(&["twin", "show", "valve-2", "--api", &api, "--token", token]);
    assert!(ok && out.contains("valve-2") && out.contains("V-2") && out.contains("north"), "{out}");
    let (ok, out, _) = client(&["actors", "--kind", "tdta", "--api", &api, "--token", token]);
    assert!(ok && out.contains("valve") && out.contains("platform/supervisor"), "{out}");
    let (ok, _, err) = client(&["twins", "list", "--api", &api, "--token", "tfa_wrong-token-000000000000000"]);
    assert!(!ok && err.contains("401"), "a wrong token is a clear error: {err}");
    let (ok, _, err) = client(&["twin", "show", "nope", "--api", &api, "--token", token]);
    assert!(!ok && err.contains("404") && err.contains("nope"), "{err}");
    signal(&child, libc::SIGTERM);
    let (ok, err) = finish(child);
    assert!(ok, "{err}");
}

#[test]
fn a_stop_signal_right_after_the_api_answers_still_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let http = format!("127.0.0.1:{port}");
    let args = ["--http", http.as_str(), "--grpc", "127.0.0.1:0", "--mqtt", "127.0.0.1:0"];
    let child = spawn(dir.path(), &[&args[..], &["--mqtt-provisioning", "127.0.0.1:0"]].concat());
    // The moment the HTTP listener accepts, the other listeners are still starting.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(&http).is_err() {
        assert!(std::time::Instant::now() < deadline, "the HTTP API never answered");
        std::thread::sleep(Duration::from_millis(1));
    }
    signal(&child, libc::SIGTERM);
    let (ok, err) = finish(child);
    assert!(ok, "a SIGTERM during start is a clean stop, not a kill; stderr:\n{err}");
    assert!(err.contains("stopped cleanly"), "{err}");
}

/// Each connected device holds a socket: the binary raises its soft open-files limit to
/// the hard one, so the usual soft limit of 1,024 does not stop a fleet at about a
/// thousand devices.
#[test]
fn the_binary_raises_its_open_files_limit_to_the_hard_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -Sn 256 && exec \"$0\" run \"$@\"")
        .arg(env!("CARGO_BIN_EXE_twinfleet"))
        .args(with_ephemeral_ports(&[]))
        .current_dir(dir.path())
        .env_remove("TWINFLEET_DATA_DIR")
        .env_remove("TWINFLEET_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sh starts twinfleet");
    wait_ready(&mut child);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("a Max open files line");
    let v: Vec<&str> = line.split_whitespace().collect();
    let (soft, hard) = (v[3], v[4]);
    assert_eq!(soft, hard, "soft raised to hard: {line}");
    signal(&child, libc::SIGINT);
    let (ok, err) = finish(child);
    assert!(ok, "{err}");
    assert!(err.contains("open files limit raised from 256"), "says so: {err}");
}
