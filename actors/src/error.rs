//! The typed error of every twin operation: each variant says what was wrong and with
//! which input, so that the HTTP and gRPC edges can map it to a status and a message.

use twinfleet_models::{Denied, IdError, LogError, ModelError, TelemetryError};
use twinfleet_runtime::{ActorStatus, StorageError};

#[derive(Debug, Clone, thiserror::Error)]
pub enum TwinError {
    #[error("no twin with id {0:?}")]
    NotFound(String),
    #[error("no device type {0:?}")]
    UnknownDeviceType(String),
    #[error("no DTA {0:?}")]
    UnknownDta(String),
    #[error("no {kind} {id:?}")]
    Unknown { kind: &'static str, id: String },
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("not authenticated: {0}")]
    Unauthenticated(String),
    #[error("forbidden: {0}")]
    Forbidden(#[from] Denied),
    #[error("{kind} {id:?} already exists")]
    AlreadyExists { kind: &'static str, id: String },
    #[error("{kind} {id:?} is {status:?} and cannot answer now; retry later")]
    Unavailable { kind: &'static str, id: String, status: ActorStatus },
    #[error("device {id:?} cannot be reached now: {reason}")]
    DeviceUnreachable { id: String, reason: String },
    #[error("mailbox of twin {0:?} is full; retry later")]
    MailboxFull(String),
    #[error("{what}: too many requests; retry in {retry_after_ms} ms")]
    RateLimited { what: String, retry_after_ms: u64 },
    #[error("{kind} {id:?} did not answer within {ms} ms")]
    Timeout { kind: &'static str, id: String, ms: u64 },
    #[error("{kind} {id:?} crashed while handling the request ({message}); its supervisor restarts it")]
    Crashed { kind: &'static str, id: String, message: String },
    #[error("twin {id:?} is quarantined: {reason}")]
    Quarantined { id: String, reason: String },
    #[error("rejected: {0}")]
    Rejected(#[from] ModelError),
    #[error("telemetry rejected: {0}")]
    Telemetry(#[from] TelemetryError),
    #[error("logs rejected: {0}")]
    Logs(#[from] LogError),
    #[error("invalid id: {0}")]
    InvalidId(#[from] IdError),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error("fault injection is disabled on this platform")]
    FaultInjectionDisabled,
    #[error("the platform is shutting down")]
    ShuttingDown,
    /// A body larger than the configured limit.
    #[error("too large: {0}")]
    TooLarge(String),
    /// An app version that cannot run on the device, with every reason.
    #[error("{app} cannot be installed on twin {twin}: {}", .reasons.join("; "))]
    Incompatible { twin: String, app: String, reasons: Vec<String> },
}
