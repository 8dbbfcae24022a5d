//! The `twinfleet` binary as an operator runs it.

use crate::support::http_get;
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

/// Reads stdout until the binary says where it listens.
fn wait_ready(child: &mut Child) -> SocketAddr {
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    addr.parse().unwrap()
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
    let addr = wait_ready(&mut child);
    assert!(dir.path().join("twinfleet-data/db").is_dir(), "data in ./twinfleet-data");
    let (status, body) = http_get(addr, "/healthz");
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, body) = http_get(addr, "/api/v1/actors");
    assert_eq!(status, 200);
    assert_eq!(body["actors"][0]["kind"], "platform");
    let (status, body) = http_get(addr, "/api/v1/twins/missing");
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
    let addr = wait_ready(&mut child);
    let (status, body) = http_get(addr, "/api/v1/device-types");
    assert_eq!(status, 200);
    let dispenser = body.as_array().unwrap().iter().find(|t| t["id"] == "medicine-dispenser").expect("loaded");
    assert_eq!(dispenser["domain"]["root"], "Device");
    signal(&child, libc::SIGTERM);
    let (ok, err) = finish(child);
    assert!(ok && err.contains("device type medicine-dispenser created"), "{err}");
}
