//! The gRPC gateway (tonic): the paper's communication mediator for request-response
//! devices. It serves Bigler's `Hub` (wire-compatible) and twinfleet's `DeviceGateway`,
//! authenticates every call against the credential store, and is the twins' device link
//! for devices that hold a `Commands` stream open.
//!
//! Identity: `DeviceGateway` calls carry `x-device-id: <twin id>` and
//! `authorization: Bearer <device token>` in their metadata; bodies carry no identity, so
//! a device can only speak as itself. `Hub` calls carry the token the same way; the twin
//! is `device_identifier`, and `tenant_identifier` must match the twin's `tenant`
//! attribute when it has one (PERMISSION_DENIED otherwise).
//!
//! Telemetry: `SendTelemetry` acknowledges each batch after it is durable (a rejected
//! batch is acknowledged with `accepted = 0` and the reason, and the stream goes on);
//! `SendNumericScalarValues` stores values in batches of 1,000 as they arrive, every value
//! must name the authenticated device, and an error ends the stream saying how many
//! values were stored before it. Not yet served (UNIMPLEMENTED): `SendLogs`.

use crate::json::{json_to_struct, struct_to_json};
use dashmap::DashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use twinfleet_actors::{AuthError, DeviceCommand, DeviceLink, TwinError, TwinHandle, TwinRuntime};
use twinfleet_models::{CommandId, Metadata, MetricPoint, ModelError, Timestamp, TwinId};
use twinfleet_proto::device::device_control_client::DeviceControlClient;
use twinfleet_proto::device::{
    self as pb, device_gateway_server::DeviceGateway, device_gateway_server::DeviceGatewayServer,
};
use twinfleet_proto::hub::{self, hub_server::Hub, hub_server::HubServer};
use twinfleet_runtime::Edge;

/// Acks queued per telemetry stream.
const TELEMETRY_WINDOW: usize = 8;
/// Hub values stored together.
const HUB_BATCH: usize = 1_000;
/// Commands queued per connected device before `deliver` reports it as full.
const COMMAND_QUEUE: usize = 64;
/// Largest message accepted, in bytes (RESOURCE_EXHAUSTED beyond).
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// A `TwinError` as a gRPC status.
/// The gRPC status of a twin error (the one classification of `crate::error`).
pub fn status(e: TwinError) -> Status {
    crate::error::grpc_status(e)
}

fn with_stored(s: Status, stored: usize) -> Status {
    Status::new(s.code(), format!("{} ({stored} values stored before)", s.message()))
}

fn auth_status(e: AuthError) -> Status {
    match e {
        AuthError::Storage(_) => Status::unavailable(e.to_string()),
        _ => Status::unauthenticated(e.to_string()),
    }
}

/// The twins' link to their gRPC devices: a device's open `Commands` stream if it has
/// one; otherwise, for a request-response device (the twin's `grpc_address`
/// attribute), a call to the `DeviceControl` server it hosts.
#[derive(Debug)]
pub struct GrpcLinks {
    rt: TwinRuntime,
    streams: DashMap<TwinId, mpsc::Sender<Result<pb::Command, Status>>>,
}

/// Deadline of one call to a device-hosted DeviceControl server.
const CONTROL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl GrpcLinks {
    /// Calls a device's DeviceControl server (desired state and configuration:
    /// `SetConfiguration`; apps: `InstallApp`), records the device's answer in the twin's
    /// journal, and reports the state the device then returns. Failures are logged; the
    /// twin's watchdog retries desired state.
    fn call_device(&self, twin: &TwinId, addr: &str, command_id: CommandId, body: pb::command::Body) {
        let (rt, twin, addr) = (self.rt.clone(), twin.clone(), addr.to_string());
        actix_rt::spawn(async move {
            let call = async {
                let channel = Channel::from_shared(format!("http://{addr}"))
                    .map_err(|e| e.to_string())?
                    .connect_timeout(CONTROL_TIMEOUT)
                    .timeout(CONTROL_TIMEOUT)
                    .connect()
                    .await
                    .map_err(|e| format!("cannot reach {addr}: {e}"))?;
                let mut device = DeviceControlClient::new(channel);
                let reply = match body {
                    pb::command::Body::ApplyDesired(s) => {
                        device.set_configuration(pb::SetConfigurationRequest { configuration: Some(s) }).await
                    }
                    pb::command::Body::SetConfiguration(req) => device.set_configuration(req).await,
                    pb::command::Body::InstallApp(req) => device.install_app(req).await,
                };
                let reply = reply.map_err(|s| s.to_string())?.into_inner();
                let state = device.get_state(pb::GetStateRequest {}).await.map_err(|s| s.to_string())?.into_inner();
                Ok::<_, String>((reply, struct_to_json(&state)?))
            };
            let Ok(handle) = rt.twin(twin.as_str()) else { return };
            match call.await {
                Ok((reply, state)) => {
                    if let Err(e) = handle.ack(command_id.to_string(), reply.success, reply.message).await {
                        tracing::warn!(%twin, "cannot record the device's answer: {e}");
                    }
                    if !state.is_empty()
                        && let Err(e) = handle.report(state).await
                    {
                        tracing::warn!(%twin, "cannot report the device's state: {e}");
                    }
                }
                Err(e) => tracing::info!(%twin, "DeviceControl call failed (the twin retries): {e}"),
            }
        });
    }
}

impl DeviceLink for GrpcLinks {
    fn preference(&self, twin: &TwinId, metadata: &Metadata) -> u8 {
        let stream = self.streams.get(twin).is_some_and(|t| !t.is_closed());
        if stream || metadata.attributes.get("grpc_address").is_some_and(|a| a.is_string()) { 2 } else { 0 }
    }

    fn deliver(&self, twin: &TwinId, metadata: &Metadata, id: CommandId, cmd: DeviceCommand) -> Result<(), String> {
        let body = match cmd {
            DeviceCommand::ApplyDesired { desired, .. } => pb::command::Body::ApplyDesired(json_to_struct(&desired)),
            DeviceCommand::SetConfiguration { configuration } => {
                pb::command::Body::SetConfiguration(pb::SetConfigurationRequest {
                    configuration: Some(json_to_struct(&configuration)),
                })
            }
            DeviceCommand::InstallApp { app, version, artifact_url } => {
                pb::command::Body::InstallApp(pb::InstallAppRequest { app, version, artifact_url })
            }
        };
        let Some(tx) = self.streams.get(twin).map(|t| t.clone()) else {
            return match metadata.attributes.get("grpc_address").and_then(|a| a.as_str()) {
                Some(addr) => {
                    self.call_device(twin, addr, id, body);
                    Ok(())
                }
                None => Err(format!("device {twin} has no open gRPC command stream and no grpc_address")),
            };
        };
        match tx.try_send(Ok(pb::Command { command_id: id.to_string(), body: Some(body) })) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(format!("command queue of device {twin} is full")),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.streams.remove_if(twin, |_, t| t.is_closed());
                Err(format!("device {twin} closed its command stream"))
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Gateway {
    rt: TwinRuntime,
    links: Arc<GrpcLinks>,
    /// Turns true when the gateway stops: open device streams end with UNAVAILABLE
    /// instead of holding the graceful shutdown open.
    closing: watch::Receiver<bool>,
}

/// Waits until the gateway starts closing.
async fn closed(mut closing: watch::Receiver<bool>) {
    let _ = closing.wait_for(|c| *c).await;
}

fn shutting_down() -> Status {
    Status::unavailable("the gateway is shutting down; reconnect later")
}

impl Gateway {
    fn token<T>(req: &Request<T>) -> Result<&str, Status> {
        let v = req
            .metadata()
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing authorization metadata"))?;
        let v = v.to_str().map_err(|_| Status::unauthenticated("authorization metadata is not ASCII"))?;
        v.strip_prefix("Bearer ")
            .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <device token>`"))
    }

    fn authenticate_as<T>(&self, req: &Request<T>, device_id: &str) -> Result<TwinHandle, Status> {
        let token = Self::token(req).inspect_err(|_| {
            self.rt.env().rejections.reject("bad_credentials", || format!("device {device_id:?}: no usable token"));
        })?;
        self.rt.authenticate_device(device_id, token).map_err(auth_status)
    }

    fn authenticate<T>(&self, req: &Request<T>) -> Result<TwinHandle, Status> {
        let id = req
            .metadata()
            .get("x-device-id")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| self.reject("bad_credentials", Status::unauthenticated("missing x-device-id metadata")))?
            .to_string();
        self.authenticate_as(req, &id)
    }

    /// A Hub tenant must match the twin's `tenant` attribute when it has one.
    async fn check_tenant(&self, twin: &TwinHandle, tenant: &str) -> Result<(), Status> {
        let view = twin.get().await.map_err(status)?;
        match view.state.metadata.attributes.get("tenant").and_then(|t| t.as_str()) {
            Some(t) if t != tenant => Err(self.reject(
                "wrong_tenant",
                Status::permission_denied(format!("device {} is not in tenant {tenant:?}", twin.id())),
            )),
            _ => Ok(()),
        }
    }

    /// A point as the twin stores it; an unset timestamp means "now".
    fn point(&self, metric: String, value: f64, ts: Option<prost_types::Timestamp>) -> Result<MetricPoint, Status> {
        let at = match ts {
            Some(t) => self.timestamp(t)?,
            None => self.rt.env().clock.now(),
        };
        Ok(MetricPoint { metric, at, value })
    }

    /// A protobuf timestamp in milliseconds, refused (INVALID_ARGUMENT, counted) when it
    /// is out of range.
    fn timestamp(&self, t: prost_types::Timestamp) -> Result<Timestamp, Status> {
        Timestamp::from_unix(t.seconds, t.nanos).ok_or_else(|| {
            let msg = format!("timestamp {}s {}ns is out of range", t.seconds, t.nanos);
            self.reject("malformed", Status::invalid_argument(msg))
        })
    }

    /// Stores a batch for the Hub, counting a rejected one.
    async fn store(&self, twin: &TwinHandle, points: Vec<MetricPoint>) -> Result<usize, Status> {
        match twin.telemetry(points).await {
            Ok(n) => Ok(n),
            Err(TwinError::Telemetry(e)) => {
                self.rt.env().rejections.reject(e.reason(), || format!("device {}: {e}", twin.id()));
                Err(Status::invalid_argument(e.to_string()))
            }
            Err(e) => Err(status(e)),
        }
    }

    fn reject(&self, reason: &'static str, s: Status) -> Status {
        self.rt.env().rejections.reject(reason, || s.message().to_string());
        s
    }
}

type CommandStream = Pin<Box<dyn Stream<Item = Result<pb::Command, Status>> + Send>>;
type AckStream = Pin<Box<dyn Stream<Item = Result<pb::BatchAck, Status>> + Send>>;

#[tonic::async_trait]
impl DeviceGateway for Gateway {
    type SendTelemetryStream = AckStream;
    type CommandsStream = CommandStream;

    async fn send_telemetry(
        &self,
        req: Request<tonic::Streaming<pb::TelemetryBatch>>,
    ) -> Result<Response<AckStream>, Status> {
        let twin = self.authenticate(&req)?;
        let mut batches = req.into_inner();
        let (tx, rx) = mpsc::channel(TELEMETRY_WINDOW);
        let gw = self.clone();
        // One batch at a time, acknowledged after its flush: a device that sends faster
        // than its twin stores is slowed by HTTP/2 flow control, not by a growing queue.
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    m = batches.message() => m,
                    () = closed(gw.closing.clone()) => Err(shutting_down()),
                };
                let batch = match next {
                    Ok(Some(b)) => b,
                    Ok(None) => break,
                    Err(s) => {
                        let _ = tx.send(Err(oversized(&gw.rt, s))).await;
                        break;
                    }
                };
                // A point with an impossible timestamp rejects its batch (counted); the
                // stream goes on.
                let points: Result<Vec<MetricPoint>, Status> =
                    batch.points.into_iter().map(|p| gw.point(p.metric, p.value, p.timestamp)).collect();
                let points = match points {
                    Ok(p) => p,
                    Err(s) => {
                        let ack =
                            pb::BatchAck { batch_id: batch.batch_id, accepted: 0, error: s.message().to_string() };
                        if tx.send(Ok(ack)).await.is_err() {
                            break;
                        }
                        continue;
                    }
                };
                let ack = match twin.telemetry(points).await {
                    Ok(n) => pb::BatchAck { batch_id: batch.batch_id, accepted: n as u32, error: String::new() },
                    Err(TwinError::Telemetry(e)) => {
                        gw.rt.env().rejections.reject(e.reason(), || format!("device {}: {e}", twin.id()));
                        pb::BatchAck { batch_id: batch.batch_id, accepted: 0, error: e.to_string() }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(status(e))).await;
                        break;
                    }
                };
                if tx.send(Ok(ack)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn send_logs(&self, req: Request<pb::LogBatch>) -> Result<Response<pb::Ack>, Status> {
        self.authenticate(&req)?;
        Err(Status::unimplemented("log ingest is not built yet"))
    }

    async fn report_state(&self, req: Request<pb::StateReport>) -> Result<Response<pb::Ack>, Status> {
        let twin = self.authenticate(&req)?;
        let patch = req
            .into_inner()
            .patch
            .ok_or_else(|| self.reject("malformed", Status::invalid_argument("patch is required")))?;
        let patch = struct_to_json(&patch).map_err(|e| self.reject("malformed", Status::invalid_argument(e)))?;
        let seq = twin.report(patch).await.map_err(status)?;
        Ok(Response::new(pb::Ack { seq }))
    }

    async fn commands(&self, req: Request<pb::CommandsRequest>) -> Result<Response<CommandStream>, Status> {
        let twin = self.authenticate(&req)?;
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        // A newer stream replaces an older one of the same device.
        self.links.streams.insert(twin.id().clone(), tx);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ack_command(&self, req: Request<pb::CommandAck>) -> Result<Response<pb::Ack>, Status> {
        let twin = self.authenticate(&req)?;
        let ack = req.into_inner();
        if ack.command_id.is_empty() || ack.command_id.len() > 256 {
            return Err(self.reject("malformed", Status::invalid_argument("command_id must be 1 to 256 bytes")));
        }
        match twin.ack(ack.command_id, ack.success, ack.message).await {
            Ok(seq) => Ok(Response::new(pb::Ack { seq })),
            Err(e @ TwinError::Rejected(ModelError::UnmatchedAck { .. })) => {
                Err(self.reject(crate::error::classify(&e).reason, status(e)))
            }
            Err(e) => Err(status(e)),
        }
    }
}

#[tonic::async_trait]
impl Hub for Gateway {
    async fn send_numeric_scalar_values(
        &self,
        req: Request<tonic::Streaming<hub::NumericScalarValues>>,
    ) -> Result<Response<()>, Status> {
        let token = Self::token(&req)?.to_string();
        let mut values = req.into_inner();
        let mut twin: Option<TwinHandle> = None;
        let mut batch = Vec::new();
        let mut stored = 0usize;
        loop {
            let next = tokio::select! {
                m = values.message() => m,
                () = closed(self.closing.clone()) => Err(shutting_down()),
            };
            let Some(v) = next.map_err(|s| with_stored(oversized(&self.rt, s), stored))? else { break };
            let h = match &twin {
                Some(h) if h.id().as_str() == v.device_identifier => h,
                Some(h) => {
                    let s = Status::permission_denied(format!(
                        "this stream speaks for device {}; a value names {:?}",
                        h.id(),
                        v.device_identifier
                    ));
                    return Err(with_stored(self.reject("wrong_device", s), stored));
                }
                None => {
                    let h = self.rt.authenticate_device(&v.device_identifier, &token).map_err(auth_status)?;
                    self.check_tenant(&h, &v.tenant_identifier).await?;
                    twin.insert(h)
                }
            };
            batch.push(self.point(v.metric_identifier, v.value, v.timestamp).map_err(|s| with_stored(s, stored))?);
            if batch.len() >= HUB_BATCH {
                stored += self.store(h, std::mem::take(&mut batch)).await.map_err(|s| with_stored(s, stored))?;
            }
        }
        if let Some(h) = &twin
            && !batch.is_empty()
        {
            self.store(h, batch).await.map_err(|s| with_stored(s, stored))?;
        }
        Ok(Response::new(()))
    }

    async fn send_device_status(&self, req: Request<hub::DeviceStatus>) -> Result<Response<()>, Status> {
        let body = req.get_ref().clone();
        let twin = self.authenticate_as(&req, &body.device_identifier)?;
        let view = twin.get().await.map_err(status)?;
        if let Some(tenant) = view.state.metadata.attributes.get("tenant").and_then(|t| t.as_str())
            && tenant != body.tenant_identifier
        {
            return Err(self.reject(
                "wrong_tenant",
                Status::permission_denied(format!(
                    "device {} is not in tenant {:?}",
                    body.device_identifier, body.tenant_identifier
                )),
            ));
        }
        let status_name = hub::Status::try_from(body.status)
            .map(|s| s.as_str_name().to_lowercase())
            .unwrap_or_else(|_| body.status.to_string());
        let mut patch = serde_json::Map::new();
        let mut hub_status = serde_json::Map::new();
        hub_status.insert("status".into(), status_name.into());
        if let Some(ts) = body.timestamp {
            hub_status.insert("timestamp_ms".into(), self.timestamp(ts)?.0.into());
        }
        patch.insert("hub_status".into(), hub_status.into());
        twin.report(patch).await.map_err(status)?;
        Ok(Response::new(()))
    }
}

/// Every call passes this layer, which does two things:
/// - tonic refuses a message over the size limit itself, before any handler, with
///   OUT_OF_RANGE; gRPC's convention (grpc-go, grpc-java) is RESOURCE_EXHAUSTED. The
///   layer rewrites that answer and counts it as `oversized`. (A client-streaming call
///   meets the same error inside the handler; see `oversized`.)
/// - It counts the call in the request metrics by method path and status code, with the
///   time until the response headers. A call that fails before its response (every unary
///   error) carries its code in those headers; a call whose headers went out is counted
///   `Ok` (a stream that fails later is not seen here). Calls the server does not
///   implement are counted under the route `unimplemented`, so unknown paths cannot
///   grow the number of series.
#[derive(Debug, Clone)]
struct EdgeLayer(TwinRuntime);

impl<S> tower_layer::Layer<S> for EdgeLayer {
    type Service = EdgeService<S>;
    fn layer(&self, inner: S) -> EdgeService<S> {
        EdgeService { inner, rt: self.0.clone() }
    }
}

#[derive(Debug, Clone)]
struct EdgeService<S> {
    inner: S,
    rt: TwinRuntime,
}

const TOO_LARGE: &str = "decoded%20message%20length%20too%20large";
/// How tonic words a protobuf decode error (it answers INTERNAL; it is the client's).
const UNDECODABLE: &str = "failed%20to%20decode%20Protobuf%20message";

impl<S, B, RB> tower_service::Service<tonic::codegen::http::Request<B>> for EdgeService<S>
where
    S: tower_service::Service<tonic::codegen::http::Request<B>, Response = tonic::codegen::http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        let started = std::time::Instant::now();
        let path = req.uri().path().to_string();
        let call = self.inner.call(req);
        let rt = self.rt.clone();
        Box::pin(async move {
            let mut resp = call.await?;
            let h = resp.headers_mut();
            let too_large = h.get("grpc-status").is_some_and(|s| s == "11")
                && h.get("grpc-message").and_then(|m| m.to_str().ok()).is_some_and(|m| m.contains(TOO_LARGE));
            if too_large {
                h.insert("grpc-status", tonic::codegen::http::HeaderValue::from_static("8"));
                rt.env().rejections.reject("oversized", || format!("gRPC message over {MAX_MESSAGE_BYTES} bytes"));
            }
            let undecodable = h.get("grpc-status").is_some_and(|s| s == "13")
                && h.get("grpc-message").and_then(|m| m.to_str().ok()).is_some_and(|m| m.contains(UNDECODABLE));
            if undecodable {
                h.insert("grpc-status", tonic::codegen::http::HeaderValue::from_static("3"));
                rt.env().rejections.reject("malformed", || format!("{path}: the message is not valid protobuf"));
            }
            let code = h
                .get("grpc-status")
                .and_then(|s| s.to_str().ok())
                .and_then(|s| s.parse::<i32>().ok())
                .map_or(tonic::Code::Ok, tonic::Code::from_i32);
            let route = if code == tonic::Code::Unimplemented { "unimplemented" } else { &path };
            rt.env().requests.record(Edge::Grpc, "POST", route, code_name(code), started.elapsed());
            Ok(resp)
        })
    }
}

/// The status code's name as gRPC's own metrics spell it (`OK`, `INVALID_ARGUMENT`).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An error met reading a client stream: a too-large message is RESOURCE_EXHAUSTED and
/// an undecodable one INVALID_ARGUMENT (tonic says OUT_OF_RANGE and INTERNAL), counted.
fn oversized(rt: &TwinRuntime, s: Status) -> Status {
    if s.code() == tonic::Code::OutOfRange && s.message().contains("message length too large") {
        rt.env().rejections.reject("oversized", || s.message().to_string());
        Status::resource_exhausted(s.message().to_string())
    } else if s.code() == tonic::Code::Internal && s.message().contains("failed to decode Protobuf message") {
        rt.env().rejections.reject("malformed", || s.message().to_string());
        Status::invalid_argument(s.message().to_string())
    } else {
        s
    }
}

/// How long `stop` lets calls in flight finish before it drops them.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// A running gRPC gateway.
#[derive(Debug)]
pub struct GrpcGateway {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: Option<oneshot::Receiver<()>>,
    closing: watch::Sender<bool>,
    arbiter: actix::ArbiterHandle,
    links: Arc<GrpcLinks>,
}

impl GrpcGateway {
    /// Binds `addr`, serves on an arbiter of its own, and becomes the twins' device link.
    pub fn start(rt: TwinRuntime, addr: SocketAddr) -> std::io::Result<GrpcGateway> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let links = Arc::new(GrpcLinks { rt: rt.clone(), streams: DashMap::new() });
        rt.env().attach_device_link("grpc", links.clone());
        let (closing, closing_rx) = watch::channel(false);
        let gw = Gateway { rt, links: links.clone(), closing: closing_rx };
        let (stop, stopped) = oneshot::channel::<()>();
        let (finished, done) = oneshot::channel();
        let arbiter = actix::Arbiter::new();
        arbiter.spawn(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("gRPC listener: {e}");
                    return;
                }
            };
            let result = tonic::transport::Server::builder()
                .layer(EdgeLayer(gw.rt.clone()))
                .add_service(DeviceGatewayServer::new(gw.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES))
                .add_service(HubServer::new(gw).max_decoding_message_size(MAX_MESSAGE_BYTES))
                .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!("gRPC gateway stopped: {e}");
            }
            let _ = finished.send(());
            actix::Arbiter::current().stop();
        });
        Ok(GrpcGateway { addr, stop: Some(stop), done: Some(done), closing, arbiter: arbiter.handle(), links })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Devices with an open command stream.
    pub fn connected_devices(&self) -> usize {
        self.links.streams.iter().filter(|s| !s.is_closed()).count()
    }

    /// Stops accepting, ends open device streams (UNAVAILABLE), lets calls in flight
    /// finish for at most 5 s, then drops whatever is left.
    pub async fn stop(mut self) {
        // The link holds the runtime, whose environment holds the link: break the cycle.
        self.links.rt.env().detach_device_link("grpc");
        self.links.streams.clear();
        let _ = self.closing.send(true);
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.done.take()
            && tokio::time::timeout(STOP_GRACE, d).await.is_err()
        {
            tracing::warn!("gRPC calls still running after {STOP_GRACE:?}; dropping them");
            self.arbiter.stop();
        }
    }
}
