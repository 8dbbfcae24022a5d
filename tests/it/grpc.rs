//! The gRPC gateway over real HTTP/2 on loopback, with the client generated from our
//! .proto: authentication, reported state, the command stream with acks, the Hub's
//! device status, and the typed statuses of bad input.

use crate::support::*;
use serde_json::json;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request};
use twinfleet::Platform;
use twinfleet::models::{EventKind, Metadata, TwinCommand};
use twinfleet_proto::device as pb;
use twinfleet_proto::device::device_gateway_client::DeviceGatewayClient;
use twinfleet_proto::hub::{self, hub_client::HubClient};
use twinfleet_protocols::device_client::desired_of;
use twinfleet_protocols::json::{json_to_struct, struct_to_json};
use twinfleet_protocols::{DevicePoint, GrpcDevice, GrpcGateway};

fn authed<T>(msg: T, device: &str, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("x-device-id", MetadataValue::try_from(device).unwrap());
    r.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {token}")).unwrap());
    r
}

fn patch(v: serde_json::Value) -> pb::StateReport {
    pb::StateReport { patch: Some(json_to_struct(v.as_object().unwrap())) }
}

async fn setup(dir: &std::path::Path) -> (Platform, GrpcGateway, Channel, String, String) {
    let p = start(dir, None, test_settings()).await;
    fleet(&p, "pump", json!({}), "g", 3, |_| vec![]).await;
    let t0 = p.issue_device_token("g-0").await.unwrap();
    let t1 = p.issue_device_token("g-1").await.unwrap();
    let gw = GrpcGateway::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let channel = Channel::from_shared(format!("http://{}", gw.local_addr())).unwrap().connect().await.unwrap();
    (p, gw, channel, t0, t1)
}

#[actix_rt::test]
async fn a_device_reports_state_and_receives_and_acks_its_twins_commands() {
    let dir = tempfile::tempdir().unwrap();
    let (p, gw, channel, t0, _) = setup(dir.path()).await;
    // The device side, as a device built on twinfleet-protocols uses it.
    let mut device = GrpcDevice::on_channel(channel, "g-0", &t0);

    let seq = device.report(&obj(json!({"fw": "1.2", "pressure": 2.5}))).await.unwrap();
    let twin = p.twin("g-0").unwrap();
    let view = twin.get().await.unwrap();
    assert_eq!(view.state.reported, obj(json!({"fw": "1.2", "pressure": 2.5})));
    assert_eq!(seq, view.state.last_seq);

    // The twin's desired state reaches the device over its command stream.
    let mut commands = device.commands().await.unwrap();
    eventually("the command stream is registered", || async { (gw.connected_devices() == 1).then_some(()) }).await;
    twin.set_desired(obj(json!({"rate": 5}))).await.unwrap();
    let cmd = commands.message().await.unwrap().expect("a command");
    assert_eq!(desired_of(&cmd), Some(obj(json!({"rate": 5}))));

    // The ack comes back to the twin's journal; the report brings the twin in sync.
    device.ack(&cmd.command_id, true, "applied").await.unwrap();
    device.report(&obj(json!({"rate": 5}))).await.unwrap();
    let view = twin.get().await.unwrap();
    assert!(view.in_sync && view.desired_sync.is_none());
    let events = twin.events(10).await.unwrap();
    assert!(
        events.iter().any(
            |e| matches!(&e.kind, EventKind::CommandAcked { command_id, success: true, .. } if *command_id == cmd.command_id)
        ),
        "{events:?}"
    );
    assert!(events.iter().any(|e| e.kind == EventKind::InSync));

    // An operator command takes the same way as over MQTT.
    let install = twinfleet::DeviceCommand::InstallApp {
        app: "pump-ctl".into(),
        version: "2.0".into(),
        artifact_url: "https://repo.example/pump-ctl-2.0.bin".into(),
    };
    let id = twin.send_to_device(install).await.unwrap();
    let cmd = commands.message().await.unwrap().expect("install_app over gRPC");
    assert_eq!(cmd.command_id, id.to_string(), "the twin minted the id: 1 was the desired state, 2 this one");
    assert_eq!(id.0, 2);
    assert!(matches!(cmd.body, Some(pb::command::Body::InstallApp(ref a)) if a.version == "2.0"), "{cmd:?}");

    // Telemetry through the device client: one ack per batch.
    let mut stream = device.telemetry().await.unwrap();
    let ack = stream.send(vec![DevicePoint { metric: "temp".into(), value: 21.5, at_ms: None }]).await.unwrap();
    assert_eq!((ack.batch_id, ack.accepted), (1, 1));
    assert_eq!(twin.get().await.unwrap().telemetry_latest["temp"].value, 21.5);

    // Stopping does not wait for the device to hang up: its open stream is ended.
    gw.stop().await;
    let err = stream.send(vec![DevicePoint { metric: "temp".into(), value: 1.0, at_ms: None }]).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    p.shutdown().await;
}

#[actix_rt::test]
async fn bad_credentials_and_bad_input_get_typed_statuses_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (p, gw, channel, t0, t1) = setup(dir.path()).await;
    let mut client = DeviceGatewayClient::new(channel.clone());
    let code = |r: Result<tonic::Response<pb::Ack>, tonic::Status>| r.unwrap_err().code();

    assert_eq!(code(client.report_state(Request::new(patch(json!({"a": 1})))).await), Code::Unauthenticated);
    assert_eq!(
        code(client.report_state(authed(patch(json!({"a": 1})), "g-0", "tfd_wrong")).await),
        Code::Unauthenticated
    );
    assert_eq!(code(client.report_state(authed(patch(json!({"a": 1})), "nobody", &t0)).await), Code::Unauthenticated);
    // A device cannot speak as another device: g-1's token does not open g-0.
    assert_eq!(code(client.report_state(authed(patch(json!({"a": 1})), "g-0", &t1)).await), Code::Unauthenticated);
    assert_eq!(
        code(client.report_state(authed(pb::StateReport { patch: None }, "g-0", &t0)).await),
        Code::InvalidArgument
    );
    assert_eq!(code(client.report_state(authed(patch(json!({})), "g-0", &t0)).await), Code::InvalidArgument);
    let mut nan = json_to_struct(json!({}).as_object().unwrap());
    nan.fields.insert("t".into(), prost_types::Value { kind: Some(prost_types::value::Kind::NumberValue(f64::NAN)) });
    assert_eq!(
        code(client.report_state(authed(pb::StateReport { patch: Some(nan) }, "g-0", &t0)).await),
        Code::InvalidArgument
    );
    // Over the 1 MiB limit: RESOURCE_EXHAUSTED (tonic's own OUT_OF_RANGE is rewritten)
    // and counted, for a unary call and inside a telemetry stream.
    let huge = json!({"blob": "x".repeat(2 << 20)});
    let r = &p.rejections();
    assert_eq!(code(client.report_state(authed(patch(huge), "g-0", &t0)).await), Code::ResourceExhausted);
    assert_eq!(r.count("oversized"), 1);
    let mut device = GrpcDevice::on_channel(channel.clone(), "g-0", &t0);
    let mut stream = device.telemetry().await.unwrap();
    let big: Vec<DevicePoint> =
        (0..100_000).map(|i| DevicePoint { metric: format!("m{i}"), value: 1.0, at_ms: None }).collect();
    assert_eq!(stream.send(big).await.unwrap_err().code(), Code::ResourceExhausted);
    assert_eq!(r.count("oversized"), 2);
    assert_eq!((r.count("bad_credentials"), r.count("unknown_device"), r.count("malformed")), (3, 1, 2));
    assert!(p.twin("g-0").unwrap().get().await.unwrap().state.reported.is_empty(), "nothing rejected reached the twin");
    // Every call is in the request metrics by method path and status code.
    let routes = p.requests().snapshot();
    let report = routes.iter().find(|r| r.route == "/twinfleet.device.v1.DeviceGateway/ReportState").expect("counted");
    let statuses: Vec<(&str, u64)> = report.statuses.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    assert_eq!(statuses, vec![("INVALID_ARGUMENT", 3), ("RESOURCE_EXHAUSTED", 1), ("UNAUTHENTICATED", 4)]);
    assert_eq!(report.latency.count(), 8);

    gw.stop().await;
    p.shutdown().await;
}

#[actix_rt::test]
async fn the_hub_schema_reports_device_status_into_the_right_twin() {
    let dir = tempfile::tempdir().unwrap();
    let (p, gw, channel, t0, _) = setup(dir.path()).await;
    let twin = p.twin("g-0").unwrap();
    let mut attributes = serde_json::Map::new();
    attributes.insert("tenant".into(), json!("acme"));
    twin.command(TwinCommand::UpdateMetadata(Metadata { attributes, ..Default::default() })).await.unwrap();
    let mut hub = HubClient::new(channel);
    let status = |tenant: &str| hub::DeviceStatus {
        tenant_identifier: tenant.into(),
        device_identifier: "g-0".into(),
        status: hub::Status::Pending as i32,
        timestamp: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 5_000_000 }),
    };
    let mut req = Request::new(status("acme"));
    req.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {t0}")).unwrap());
    hub.send_device_status(req).await.unwrap();
    assert_eq!(
        twin.get().await.unwrap().state.reported["hub_status"],
        json!({"status": "pending", "timestamp_ms": 1_700_000_000_005i64})
    );

    let mut req = Request::new(status("globex"));
    req.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {t0}")).unwrap());
    assert_eq!(hub.send_device_status(req).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(hub.send_device_status(Request::new(status("acme"))).await.unwrap_err().code(), Code::Unauthenticated);
    gw.stop().await;
    p.shutdown().await;
}

fn point(metric: &str, value: f64, at_ms: i64) -> pb::MetricPoint {
    pb::MetricPoint {
        metric: metric.into(),
        value,
        timestamp: Some(prost_types::Timestamp { seconds: at_ms / 1000, nanos: (at_ms % 1000) as i32 * 1_000_000 }),
        unit: String::new(),
    }
}

#[actix_rt::test]
async fn telemetry_batches_are_acked_after_they_are_stored_and_bad_ones_are_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (p, gw, channel, t0, _) = setup(dir.path()).await;
    let mut client = DeviceGatewayClient::new(channel);
    let now = p.now().0;
    let batches = vec![
        pb::TelemetryBatch {
            batch_id: 1,
            points: (0..10).map(|i| point("temp", 20.0 + i as f64, now - 10_000 + i)).collect(),
        },
        pb::TelemetryBatch { batch_id: 2, points: vec![point("temp", f64::NAN, now)] },
        pb::TelemetryBatch { batch_id: 3, points: vec![point("temp", 99.0, now + 3_600_000)] },
        pb::TelemetryBatch { batch_id: 4, points: vec![point("rh", 41.5, now), point("temp", 30.0, now)] },
    ];
    let mut acks = client.send_telemetry(authed(tokio_stream::iter(batches), "g-0", &t0)).await.unwrap().into_inner();
    let mut got = vec![];
    while let Some(a) = acks.message().await.unwrap() {
        got.push((a.batch_id, a.accepted, a.error.split(':').next().unwrap_or("").to_string()));
    }
    assert_eq!(got.iter().map(|g| (g.0, g.1)).collect::<Vec<_>>(), vec![(1, 10), (2, 0), (3, 0), (4, 2)]);
    assert!(got[1].2.contains("point 0 (temp)"), "{got:?}");
    let r = &p.rejections();
    assert_eq!((r.count("not_finite"), r.count("future_timestamp")), (1, 1));

    let twin = p.twin("g-0").unwrap();
    let all = twin
        .telemetry_query(twinfleet::TelemetryQuery {
            metric: Some("temp".into()),
            from: twinfleet::models::Timestamp(0),
            to: twinfleet::models::Timestamp(now + 10),
            limit: 100,
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 11, "10 + 1 temp points, none from the rejected batches");
    assert_eq!(all[0].value, 30.0, "newest first");
    let view = twin.get().await.unwrap();
    assert_eq!(view.telemetry_latest["rh"].value, 41.5);
    assert_eq!(view.telemetry_latest["temp"].value, 30.0);
    gw.stop().await;
    p.shutdown().await;
}

#[actix_rt::test]
async fn hub_value_streams_land_in_the_named_twin_and_cannot_speak_for_another() {
    let dir = tempfile::tempdir().unwrap();
    let (p, gw, channel, t0, _) = setup(dir.path()).await;
    let mut hub = HubClient::new(channel);
    let now = p.now().0;
    let value = |device: &str, i: i64| hub::NumericScalarValues {
        tenant_identifier: "acme".into(),
        device_identifier: device.into(),
        metric_identifier: "humidity".into(),
        value: 40.0 + i as f64 / 10.0,
        unit: "%".into(),
        display_name: "Humidity".into(),
        timestamp: Some(prost_types::Timestamp {
            seconds: (now - 5_000 + i) / 1000,
            nanos: ((now - 5_000 + i) % 1000) as i32 * 1_000_000,
        }),
    };
    let with_token = |values: Vec<hub::NumericScalarValues>| {
        let mut r = Request::new(tokio_stream::iter(values));
        r.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {t0}")).unwrap());
        r
    };
    hub.send_numeric_scalar_values(with_token((0..2_500).map(|i| value("g-0", i)).collect())).await.unwrap();
    let stored = p
        .twin("g-0")
        .unwrap()
        .telemetry_query(twinfleet::TelemetryQuery {
            metric: None,
            from: twinfleet::models::Timestamp(0),
            to: twinfleet::models::Timestamp(now),
            limit: 10_000,
        })
        .await
        .unwrap();
    assert_eq!(stored.len(), 2_500);

    // A stream authenticated as g-0 cannot slip in a value for g-1.
    let err = hub.send_numeric_scalar_values(with_token(vec![value("g-0", 1), value("g-1", 2)])).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(p.rejections().count("wrong_device"), 1);
    let err =
        hub.send_numeric_scalar_values(Request::new(tokio_stream::iter(vec![value("g-0", 1)]))).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut future = value("g-0", 0);
    future.timestamp = Some(prost_types::Timestamp { seconds: now / 1000 + 86_400, nanos: 0 });
    let err = hub.send_numeric_scalar_values(with_token(vec![future])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    gw.stop().await;
    p.shutdown().await;
}

/// A request-response device: it hosts DeviceControl and keeps its state in memory.
#[derive(Debug, Default, Clone)]
struct Device {
    state: std::sync::Arc<std::sync::Mutex<serde_json::Map<String, serde_json::Value>>>,
    calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

#[tonic::async_trait]
impl twinfleet_proto::device::device_control_server::DeviceControl for Device {
    async fn set_configuration(
        &self,
        req: Request<pb::SetConfigurationRequest>,
    ) -> Result<tonic::Response<pb::ControlReply>, tonic::Status> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let config = struct_to_json(&req.into_inner().configuration.unwrap_or_default()).unwrap();
        self.state.lock().unwrap().extend(config);
        Ok(tonic::Response::new(pb::ControlReply { success: true, message: "applied".into() }))
    }

    async fn install_app(
        &self,
        _: Request<pb::InstallAppRequest>,
    ) -> Result<tonic::Response<pb::ControlReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this device"))
    }

    async fn uninstall_app(
        &self,
        _: Request<pb::UninstallAppRequest>,
    ) -> Result<tonic::Response<pb::ControlReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this device"))
    }

    async fn get_state(
        &self,
        _: Request<pb::GetStateRequest>,
    ) -> Result<tonic::Response<prost_types::Struct>, tonic::Status> {
        Ok(tonic::Response::new(json_to_struct(&self.state.lock().unwrap())))
    }
}

#[actix_rt::test]
async fn a_device_hosted_device_control_server_is_called_by_its_twin() {
    let dir = tempfile::tempdir().unwrap();
    let (p, gw, _channel, _, _) = setup(dir.path()).await;
    let device = Device::default();
    device.state.lock().unwrap().insert("speed".into(), json!(1));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let device_addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(twinfleet_proto::device::device_control_server::DeviceControlServer::new(device.clone()))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    actix_rt::spawn(server);

    let twin = p.twin("g-2").unwrap();
    let mut attributes = serde_json::Map::new();
    attributes.insert("grpc_address".into(), json!(device_addr.to_string()));
    twin.command(TwinCommand::UpdateMetadata(Metadata { attributes, ..Default::default() })).await.unwrap();
    twin.set_desired(obj(json!({"speed": 3}))).await.unwrap();

    let view = eventually("the device applied the desired state and the twin knows", || async {
        twin.get().await.ok().filter(|v| v.in_sync)
    })
    .await;
    assert_eq!(view.state.reported, obj(json!({"speed": 3})));
    assert_eq!(device.calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    let events = twin.events(10).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| matches!(&e.kind, EventKind::CommandAcked { success: true, message, .. } if message == "applied")),
        "{events:?}"
    );
    gw.stop().await;
    p.shutdown().await;
}

#[actix_rt::test]
async fn an_ack_after_a_restart_matches_its_command_and_unmatched_acks_are_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (p, gw, channel, t0, _) = setup(dir.path()).await;
    let mut device = GrpcDevice::on_channel(channel, "g-0", &t0);
    let mut commands = device.commands().await.unwrap();
    eventually("the command stream is registered", || async { (gw.connected_devices() == 1).then_some(()) }).await;
    p.twin("g-0").unwrap().set_desired(obj(json!({"rate": 7}))).await.unwrap();
    let cmd = commands.message().await.unwrap().expect("a command");
    drop(commands);
    gw.stop().await;
    p.shutdown().await;

    // A new process on the same data directory: the twin still knows its command.
    let p = start(dir.path(), None, test_settings()).await;
    let gw = GrpcGateway::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let channel = Channel::from_shared(format!("http://{}", gw.local_addr())).unwrap().connect().await.unwrap();
    let mut device = GrpcDevice::on_channel(channel, "g-0", &t0);
    device.ack(&cmd.command_id, true, "applied before the restart").await.unwrap();
    let twin = p.twin("g-0").unwrap();
    let acked = twin.events(5).await.unwrap().into_iter().any(|e| {
        matches!(&e.kind, EventKind::CommandAcked { command_id, success: true, .. } if *command_id == cmd.command_id)
    });
    assert!(acked, "the ack is journalled against the command sent before the restart");

    // The same ack again is stale; ids the twin never minted are unknown. Both are
    // refused with their own status, counted, and change nothing.
    let before = twin.get().await.unwrap().state.last_seq;
    assert_eq!(device.ack(&cmd.command_id, true, "again").await.unwrap_err().code(), Code::FailedPrecondition);
    assert_eq!(device.ack("999", true, "").await.unwrap_err().code(), Code::NotFound);
    assert_eq!(device.ack("g-0-3", true, "").await.unwrap_err().code(), Code::NotFound);
    let r = &p.rejections();
    assert_eq!((r.count("stale_ack"), r.count("unknown_ack")), (1, 2));
    assert_eq!(twin.get().await.unwrap().state.last_seq, before);
    gw.stop().await;
    p.shutdown().await;
}

/// A message that is not a `StateReport`: field 1 as a varint where a `Struct` belongs.
#[derive(Clone, PartialEq, prost::Message)]
struct NotAStateReport {
    #[prost(uint64, tag = "1")]
    patch: u64,
}

#[actix_rt::test]
async fn impossible_timestamps_and_undecodable_protobuf_are_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let (p, gw, channel, t0, _) = setup(dir.path()).await;
    let r = &p.rejections();

    // A Hub status whose seconds overflow milliseconds (it used to be multiplied unchecked).
    let mut hub = HubClient::new(channel.clone());
    for (seconds, nanos) in [(i64::MAX, 0), (0, -5), (1_700_000_000, 2_000_000_000)] {
        let mut req = Request::new(hub::DeviceStatus {
            tenant_identifier: String::new(),
            device_identifier: "g-0".into(),
            status: hub::Status::Pending as i32,
            timestamp: Some(prost_types::Timestamp { seconds, nanos }),
        });
        req.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {t0}")).unwrap());
        let err = hub.send_device_status(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{seconds}s {nanos}ns: {err:?}");
        assert!(err.message().contains("out of range"), "{err:?}");
    }
    assert_eq!(r.count("malformed"), 3);

    // Bytes that do not decode as the call's message: INVALID_ARGUMENT, not INTERNAL.
    let mut raw = tonic::client::Grpc::new(channel.clone());
    raw.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/twinfleet.device.v1.DeviceGateway/ReportState");
    let codec = tonic_prost::ProstCodec::<NotAStateReport, pb::Ack>::default();
    let err = raw.unary(authed(NotAStateReport { patch: 7 }, "g-0", &t0), path, codec).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(r.count("malformed"), 4);
    assert!(p.twin("g-0").unwrap().get().await.unwrap().state.reported.is_empty());
    gw.stop().await;
    p.shutdown().await;
}
