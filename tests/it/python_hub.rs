//! A client generated from the seed's Hub schema by another toolchain (Python
//! grpcio-tools) streams values that land in the right twin. Needs `python3` with
//! `grpcio` and `grpcio-tools` (`.ci/run` installs them); without them the test says so
//! loudly and skips, except under CI, where it fails.

use crate::support::*;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use twinfleet::TelemetryQuery;
use twinfleet::models::Timestamp;
use twinfleet_protocols::GrpcGateway;

fn python_grpc_available() -> bool {
    Command::new("python3").args(["-c", "import grpc, grpc_tools"]).output().is_ok_and(|o| o.status.success())
}

#[actix_rt::test]
async fn a_python_grpcio_hub_client_streams_values_into_the_right_twin() {
    if !python_grpc_available() {
        assert!(std::env::var_os("CI").is_none(), "CI must install grpcio and grpcio-tools (see .ci/run)");
        eprintln!(
            "\n*** SKIPPED python_hub: python3 with grpcio + grpcio-tools not found (pip install grpcio grpcio-tools) ***\n"
        );
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stubs = tempfile::tempdir().unwrap();
    let out = Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(root.join("proto/proto"))
        .arg(format!("--python_out={}", stubs.path().display()))
        .arg(format!("--grpc_python_out={}", stubs.path().display()))
        .arg(root.join("proto/proto/hub.proto"))
        .output()
        .unwrap();
    assert!(out.status.success(), "grpc_tools.protoc failed: {}", String::from_utf8_lossy(&out.stderr));

    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), None, test_settings()).await;
    fleet(&p, "printer", json!({}), "py", 3, |_| vec![]).await;
    let token = p.issue_device_token("py-1").await.unwrap();
    let gw = GrpcGateway::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let script = root.join("tests/python/hub_client.py");
    let args: Vec<String> = vec![
        script.display().to_string(),
        stubs.path().display().to_string(),
        gw.local_addr().to_string(),
        token,
        "acme".into(),
        "py-1".into(),
        "1500".into(),
    ];
    let out =
        actix_rt::task::spawn_blocking(move || Command::new("python3").args(&args).output().unwrap()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "python client failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("wrong token -> UNAUTHENTICATED"), "{stdout}");
    assert!(stdout.contains("SENT 1500"), "{stdout}");

    let twin = p.twin("py-1").unwrap();
    let q =
        TelemetryQuery { metric: Some("humidity".into()), from: Timestamp(0), to: Timestamp(i64::MAX), limit: 10_000 };
    let points = twin.telemetry_query(q.clone()).await.unwrap();
    assert_eq!(points.len(), 1500);
    assert!((points.last().unwrap().value - 40.0).abs() < 1e-9, "oldest value first sent");
    assert_eq!(twin.get().await.unwrap().state.reported["hub_status"]["status"], "success");
    assert!(p.twin("py-0").unwrap().telemetry_query(q).await.unwrap().is_empty(), "no other twin got values");
    gw.stop().await;
    p.shutdown().await;
}
