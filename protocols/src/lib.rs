//! The edges of twinfleet. Today: the operator HTTP API ([`http`]), starting with health
//! and inspection. The MQTT and gRPC gateways and transformers join with the protocol
//! issue, the rest of the operator API with the operator issue.

pub mod http;

pub use http::{HttpApi, HttpError};
