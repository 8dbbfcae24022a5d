//! The edges of twinfleet: the operator HTTP API ([`http`]), the gRPC gateway ([`grpc`]:
//! Bigler's Hub, twinfleet's DeviceGateway) and the MQTT gateways and transformer
//! ([`mqtt`]). Each device transport attaches itself to the twins as a device link.

pub mod artifact_client;
pub mod device_client;
pub mod error;
pub mod export;
pub mod grpc;
pub mod http;
pub mod json;
pub mod listen;
pub mod mqtt;
pub mod notify;

pub use device_client::{DevicePoint, GrpcDevice, TelemetryStream};
pub use export::Exporter;
pub use grpc::GrpcGateway;
pub use http::{HttpApi, HttpError};
pub use mqtt::{MqttConfig, MqttDevice, MqttGateway};
pub use notify::Notifier;
