//! The device side of gRPC: what a device (or the simulator, a test, a benchmark) uses to
//! talk to its twin through the gateway. It holds the device's identity and token and
//! adds them to every call.

use crate::json::{json_to_struct, struct_to_json};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};
use twinfleet_proto::device::{self as pb, device_gateway_client::DeviceGatewayClient};

/// A connected device.
#[derive(Debug, Clone)]
pub struct GrpcDevice {
    id: String,
    bearer: MetadataValue<tonic::metadata::Ascii>,
    client: DeviceGatewayClient<Channel>,
}

/// A point as a device sends it; `at_ms: None` lets the gateway stamp it.
#[derive(Debug, Clone, PartialEq)]
pub struct DevicePoint {
    pub metric: String,
    pub value: f64,
    pub at_ms: Option<i64>,
}

/// An open telemetry stream: send batches, read one acknowledgement per batch.
#[derive(Debug)]
pub struct TelemetryStream {
    tx: mpsc::Sender<pb::TelemetryBatch>,
    acks: Streaming<pb::BatchAck>,
    next_id: u64,
}

impl TelemetryStream {
    /// Sends a batch and waits for its acknowledgement (after it is durable).
    pub async fn send(&mut self, points: Vec<DevicePoint>) -> Result<pb::BatchAck, Status> {
        self.next_id += 1;
        let batch = pb::TelemetryBatch {
            batch_id: self.next_id,
            points: points
                .into_iter()
                .map(|p| pb::MetricPoint {
                    metric: p.metric,
                    value: p.value,
                    timestamp: p.at_ms.map(|ms| prost_types::Timestamp {
                        seconds: ms.div_euclid(1000),
                        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
                    }),
                    unit: String::new(),
                })
                .collect(),
        };
        self.tx.send(batch).await.map_err(|_| Status::unavailable("telemetry stream closed"))?;
        self.acks.message().await?.ok_or_else(|| Status::unavailable("telemetry stream ended"))
    }
}

impl GrpcDevice {
    /// Connects to the gateway at `endpoint` (e.g. `http://127.0.0.1:50051`) as device
    /// `id` with its `token`.
    pub async fn connect(endpoint: &str, id: &str, token: &str) -> Result<Self, Status> {
        let channel = Channel::from_shared(endpoint.to_string())
            .map_err(|e| Status::invalid_argument(format!("endpoint {endpoint:?}: {e}")))?
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("cannot connect to {endpoint}: {e}")))?;
        Ok(Self::on_channel(channel, id, token))
    }

    /// Uses an existing channel (many simulated devices can share a few connections).
    pub fn on_channel(channel: Channel, id: &str, token: &str) -> Self {
        let bearer =
            MetadataValue::try_from(format!("Bearer {token}")).unwrap_or_else(|_| MetadataValue::from_static("Bearer"));
        GrpcDevice { id: id.to_string(), bearer, client: DeviceGatewayClient::new(channel) }
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Ok(id) = MetadataValue::try_from(self.id.as_str()) {
            r.metadata_mut().insert("x-device-id", id);
        }
        r.metadata_mut().insert("authorization", self.bearer.clone());
        r
    }

    /// Reports part of the device's state (a JSON merge patch); returns the journal
    /// sequence number.
    pub async fn report(&mut self, patch: &Map<String, Value>) -> Result<u64, Status> {
        let req = self.request(pb::StateReport { patch: Some(json_to_struct(patch)) });
        Ok(self.client.report_state(req).await?.into_inner().seq)
    }

    /// Sends app log lines; returns how many were stored.
    pub async fn logs(&mut self, lines: Vec<pb::LogLine>) -> Result<u64, Status> {
        let req = self.request(pb::LogBatch { lines });
        Ok(self.client.send_logs(req).await?.into_inner().seq)
    }

    /// Opens a telemetry stream.
    pub async fn telemetry(&mut self) -> Result<TelemetryStream, Status> {
        let (tx, rx) = mpsc::channel(2);
        let acks = self.client.send_telemetry(self.request(ReceiverStream::new(rx))).await?.into_inner();
        Ok(TelemetryStream { tx, acks, next_id: 0 })
    }

    /// Opens the command stream.
    pub async fn commands(&mut self) -> Result<Streaming<pb::Command>, Status> {
        Ok(self.client.commands(self.request(pb::CommandsRequest {})).await?.into_inner())
    }

    pub async fn ack(&mut self, command_id: &str, success: bool, message: &str) -> Result<u64, Status> {
        let req = self.request(pb::CommandAck { command_id: command_id.into(), success, message: message.into() });
        Ok(self.client.ack_command(req).await?.into_inner().seq)
    }
}

/// The desired state carried by an `apply_desired` command, as JSON.
pub fn desired_of(cmd: &pb::Command) -> Option<Map<String, Value>> {
    match &cmd.body {
        Some(pb::command::Body::ApplyDesired(s)) => struct_to_json(s).ok(),
        _ => None,
    }
}
