//! Pure domain logic of twinfleet: what a twin is and how it changes, with no I/O, no
//! async runtime and no clock reads. Every function here takes the current time as an
//! argument, so the actors around it can run on real or virtual time and a test can
//! replay any sequence of inputs deterministically.
//!
//! The shape is the one of a step function: `decide(state, input, now)` validates an
//! input and yields a `Decision { events, effects }`, `evolve(state, event)` applies an
//! event. The actors persist the events and carry out the effects (`effect`); the
//! models never learn how.

pub mod access;
pub mod alert;
pub mod apps;
pub mod command;
pub mod config;
pub mod desired;
pub mod domain;
pub mod effect;
pub mod enrollment;
pub mod export;
pub mod ids;
pub mod install;
pub mod limits;
pub mod log;
pub mod notify;
pub mod policy;
pub mod provisioning;
pub mod retention;
pub mod rollout;
pub mod rules;
pub mod series;
pub mod telemetry;
pub mod template;
pub mod time;
pub mod twin;

pub use access::{Access, Action, Denied, Grant, Role, Scope, TwinFacts};
pub use alert::{Alert, AlertKind, AlertState, Health, RuleAlert, Severity};
pub use command::{CommandId, CommandKind, Commands, DeviceCommand, PendingCommand, Unmatched};
pub use config::{ConfigLayer, EffectiveConfig, LayerRef, LayerSource, effective_config, merge_patch};
pub use domain::{DomainModel, Edit, PathError, Violation};
pub use effect::{Decision, Effect, Wait, WaitName, Waits};
pub use ids::{DeviceTypeId, DtaId, IdError, TwinId};
pub use limits::{DocumentError, MAX_DEPTH, MAX_DOCUMENT_BYTES};
pub use log::{LogError, LogLevel, LogLine};
pub use policy::{Backoff, Bucket, RateLimit, RestartEvent, RestartPolicy, RestartTracker, RetryPolicy, WaitDecision};
pub use retention::{HistoryRetention, JournalRetention};
pub use telemetry::{MetricPoint, TelemetryError, TelemetryLimits, decode_batch, encode_batch, validate_batch};
pub use time::Timestamp;
pub use twin::{
    EventKind, Identity, Lifecycle, Metadata, TwinCommand, TwinError as ModelError, TwinEvent, TwinRules, TwinState,
};
