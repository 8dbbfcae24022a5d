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
//! values were stored before it. `SendLogs` stores app log lines (`twinfleet_actors::logs`).
//!
//! Provisioning: `Provisioning.Claim` runs a new device's claim (claim token in the
//! metadata) through its type's process (`twinfleet_actors::provisioning`).

use crate::json::{json_to_struct, struct_to_json};
use dashmap::DashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use twinfleet_actors::{AuthError, DeviceCommand, DeviceLink, TwinError, TwinHandle, TwinRuntime};
use twinfleet_models::{CommandId, Metadata, MetricPoint, ModelError, Timestamp, TwinId};
use twinfleet_proto::device::{
    self as pb, device_gateway_server::DeviceGateway, device_gateway_server::DeviceGatewayServer,
};
use twinfleet_proto::hub::{self, hub_server::Hub, hub_server::HubServer};

mod edge;
mod links;
mod services;

use edge::EdgeLayer;
pub use links::GrpcLinks;

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

#[derive(Debug, Clone)]
struct Gateway {
    rt: TwinRuntime,
    links: Arc<GrpcLinks>,
    /// Turns true when the gateway stops: open device streams end with UNAVAILABLE
    /// instead of holding the graceful shutdown open.
    closing: watch::Receiver<bool>,
    /// Where provisioned devices are told to connect (this gateway).
    operational: String,
}

/// Waits until the gateway starts closing.
async fn closed(mut closing: watch::Receiver<bool>) {
    let _ = closing.wait_for(|c| *c).await;
}

/// The platform ended the device's session (its token was revoked or re-issued, its
/// twin archived or deleted).
fn session_ended(reason: &str) -> Status {
    Status::unauthenticated(format!("session ended: {reason}"))
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
            self.rt.rejections().reject("bad_credentials", || format!("device {device_id:?}: no usable token"));
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
            None => self.rt.now(),
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
        match twin.ingest(points).await {
            Ok(n) => Ok(n),
            Err(TwinError::Telemetry(e)) => {
                self.rt.rejections().reject(e.reason(), || format!("device {}: {e}", twin.id()));
                Err(Status::invalid_argument(e.to_string()))
            }
            Err(e) => Err(status(e)),
        }
    }

    fn reject(&self, reason: &'static str, s: Status) -> Status {
        self.rt.rejections().reject(reason, || s.message().to_string());
        s
    }
}

/// An error met reading a client stream: a too-large message is RESOURCE_EXHAUSTED and
/// an undecodable one INVALID_ARGUMENT (tonic says OUT_OF_RANGE and INTERNAL), counted.
fn oversized(rt: &TwinRuntime, s: Status) -> Status {
    if s.code() == tonic::Code::OutOfRange && s.message().contains("message length too large") {
        rt.rejections().reject("oversized", || s.message().to_string());
        Status::resource_exhausted(s.message().to_string())
    } else if s.code() == tonic::Code::Internal && s.message().contains("failed to decode Protobuf message") {
        rt.rejections().reject("malformed", || s.message().to_string());
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
        let listener = crate::listen::tcp_listener(addr)?;
        let addr = listener.local_addr()?;
        let links = Arc::new(GrpcLinks { rt: rt.clone(), streams: DashMap::new() });
        rt.attach_device_link("grpc", links.clone());
        let (closing, closing_rx) = watch::channel(false);
        let gw = Gateway { rt, links: links.clone(), closing: closing_rx, operational: format!("http://{addr}") };
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
                .add_service(HubServer::new(gw.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES))
                .add_service(pb::provisioning_server::ProvisioningServer::new(gw))
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async {
                        let _ = stopped.await;
                    },
                )
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
        self.links.rt.detach_device_link("grpc");
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
