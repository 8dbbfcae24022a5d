//! The edges of twinfleet: the operator HTTP API ([`http`]) and the gRPC gateway
//! ([`grpc`]: Bigler's Hub, twinfleet's DeviceGateway, the twins' device link). The MQTT
//! gateways and transformers join with the rest of the protocol issue.

pub mod device_client;
pub mod grpc;
pub mod http;
pub mod json;

pub use device_client::{DevicePoint, GrpcDevice, TelemetryStream};
pub use grpc::GrpcGateway;
pub use http::{HttpApi, HttpError};
