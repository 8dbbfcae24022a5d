//! End-to-end tests of twinfleet, used as its users use it: the `Platform` façade, real
//! sled in temporary directories, real HTTP over loopback, and the `twinfleet` binary as
//! a child process. One test binary split into modules, so that linking happens once.

mod access;
mod apps;
mod backpressure;
mod bad_input;
mod binary;
mod components;
mod config_layers;
mod credentials;
mod deadlines;
mod desired;
mod durability;
mod export;
mod full_disk;
mod grpc;
mod http_api;
mod ingest_crash;
mod layers;
mod logs;
mod monitoring;
mod mosquitto;
mod mqtt;
mod mqtt_clients;
mod provisioning;
mod python_hub;
mod rollouts;
mod sessions;
mod supervision;
mod support;
mod telemetry;
