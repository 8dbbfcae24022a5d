//! One classification of every twin error, mapped once to each edge: the HTTP status and
//! error code, the gRPC status code, and the reason under which the MQTT transformer
//! (and the gRPC gateway) count a refused message. The edges never match on
//! `TwinError` themselves, so they cannot disagree (an archived twin is a conflict
//! everywhere: 409, FAILED_PRECONDITION, `archived`).

use actix_web::http::StatusCode;
use tonic::Code;
use twinfleet_actors::TwinError;
use twinfleet_models::{ModelError, PathError, Unmatched};
use twinfleet_runtime::StorageError;

/// The kind of failure, independent of the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Malformed input: bad JSON, a bad id, a document too deep or too large.
    Invalid,
    Unauthenticated,
    Forbidden,
    NotFound,
    AlreadyExists,
    /// The target's state forbids it (archived, quarantined, in use, no longer awaited).
    Conflict,
    /// Well-formed, but the twin's rules refuse it (constraint violations, bad telemetry).
    Rejected,
    /// A conditional write's precondition (a version) does not hold: read again.
    PreconditionFailed,
    /// A body over the configured limit.
    TooLarge,
    /// A mailbox is full: retry later.
    Busy,
    /// The actor or the device cannot answer now: retry later.
    Unavailable,
    Timeout,
    /// Storage refuses writes (e.g. the disk is full): retry later; reads still work.
    InsufficientStorage,
    Internal,
}

impl Class {
    pub fn http(self) -> StatusCode {
        match self {
            Class::Invalid => StatusCode::BAD_REQUEST,
            Class::Unauthenticated => StatusCode::UNAUTHORIZED,
            Class::Forbidden => StatusCode::FORBIDDEN,
            Class::NotFound => StatusCode::NOT_FOUND,
            Class::AlreadyExists | Class::Conflict => StatusCode::CONFLICT,
            Class::Rejected => StatusCode::UNPROCESSABLE_ENTITY,
            Class::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            Class::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Class::Busy => StatusCode::TOO_MANY_REQUESTS,
            Class::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Class::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Class::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
            Class::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn grpc(self) -> Code {
        match self {
            Class::Invalid | Class::Rejected => Code::InvalidArgument,
            Class::Unauthenticated => Code::Unauthenticated,
            Class::Forbidden => Code::PermissionDenied,
            Class::NotFound => Code::NotFound,
            Class::AlreadyExists => Code::AlreadyExists,
            Class::Conflict | Class::PreconditionFailed => Code::FailedPrecondition,
            Class::Busy | Class::InsufficientStorage | Class::TooLarge => Code::ResourceExhausted,
            Class::Unavailable => Code::Unavailable,
            Class::Timeout => Code::DeadlineExceeded,
            Class::Internal => Code::Internal,
        }
    }
}

/// A classified error: its class, the stable code of the HTTP body, and the reason it is
/// counted under when a device's message is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified {
    pub class: Class,
    pub code: &'static str,
    pub reason: &'static str,
}

const fn c(class: Class, code: &'static str, reason: &'static str) -> Classified {
    Classified { class, code, reason }
}

/// The one table from `TwinError` to its class, code and reason.
pub fn classify(e: &TwinError) -> Classified {
    use Class::*;
    match e {
        TwinError::NotFound(_) => c(NotFound, "not_found", "unknown_device"),
        TwinError::UnknownDeviceType(_) | TwinError::UnknownDta(_) | TwinError::Unknown { .. } => {
            c(NotFound, "not_found", "not_found")
        }
        TwinError::AlreadyExists { .. } => c(AlreadyExists, "already_exists", "already_exists"),
        TwinError::Conflict(_) => c(Conflict, "conflict", "conflict"),
        TwinError::Quarantined { .. } => c(Conflict, "quarantined", "quarantined"),
        TwinError::Unauthenticated(_) => c(Unauthenticated, "unauthenticated", "bad_credentials"),
        TwinError::Forbidden(_) | TwinError::FaultInjectionDisabled => c(Forbidden, "forbidden", "forbidden"),
        TwinError::Unavailable { .. } | TwinError::Crashed { .. } => c(Unavailable, "unavailable", "twin_unavailable"),
        TwinError::ShuttingDown => c(Unavailable, "shutting_down", "twin_unavailable"),
        TwinError::DeviceUnreachable { .. } => c(Unavailable, "device_unreachable", "device_unreachable"),
        TwinError::MailboxFull(_) => c(Busy, "mailbox_full", "twin_unavailable"),
        TwinError::RateLimited { .. } => c(Busy, "rate_limited", "rate_limited"),
        TwinError::Timeout { .. } => c(Timeout, "timeout", "twin_unavailable"),
        TwinError::Rejected(m) => match m {
            ModelError::Violations(_) => c(Rejected, "constraint_violation", "rejected"),
            ModelError::Archived(_) => c(Conflict, "archived", "archived"),
            ModelError::Component(PathError::NotFound(_)) => c(NotFound, "not_found", "rejected"),
            ModelError::Component(PathError::Invalid(_)) => c(Invalid, "invalid", "rejected"),
            ModelError::Document(d) => c(Invalid, "invalid", d.reason()),
            ModelError::Rules(_) => c(Invalid, "invalid_rule", "malformed"),
            ModelError::VersionMismatch { .. } => c(PreconditionFailed, "version_mismatch", "conflict"),
            ModelError::Template(_) => c(Rejected, "invalid_template", "rejected"),
            ModelError::Install(_) => c(Conflict, "install_conflict", "conflict"),
            ModelError::UnmatchedAck { why: Unmatched::Unknown, .. } => c(NotFound, "unknown_command", "unknown_ack"),
            ModelError::UnmatchedAck { why: Unmatched::Stale, .. } => c(Conflict, "stale_command", "stale_ack"),
            ModelError::EmptyPatch | ModelError::AlreadyMember { .. } | ModelError::NotMember { .. } => {
                c(Rejected, "rejected", "rejected")
            }
        },
        TwinError::Telemetry(t) => c(Rejected, "rejected", t.reason()),
        TwinError::Logs(l) => c(Rejected, "rejected", l.reason()),
        TwinError::InvalidId(_) | TwinError::Invalid(_) => c(Invalid, "invalid", "malformed"),
        TwinError::Storage(s) => storage(s),
        TwinError::TooLarge(_) => c(TooLarge, "too_large", "too_large"),
        TwinError::Incompatible { .. } => c(Rejected, "incompatible", "rejected"),
    }
}

fn storage(e: &StorageError) -> Classified {
    match e {
        StorageError::Closed => c(Class::Unavailable, "shutting_down", "twin_unavailable"),
        StorageError::Engine(_) => c(Class::Internal, "storage", "storage"),
        StorageError::Full(_) => c(Class::InsufficientStorage, "storage_full", "storage_full"),
    }
}

/// The gRPC status of a twin error.
pub fn grpc_status(e: TwinError) -> tonic::Status {
    tonic::Status::new(classify(&e).class.grpc(), e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinfleet_models::TwinId;

    #[test]
    fn an_archived_twin_is_a_conflict_on_every_edge() {
        let e = TwinError::Rejected(ModelError::Archived(TwinId::new("t").unwrap()));
        let k = classify(&e);
        assert_eq!(
            (k.class.http(), k.class.grpc(), k.code, k.reason),
            (StatusCode::CONFLICT, Code::FailedPrecondition, "archived", "archived")
        );
    }

    #[test]
    fn documents_too_deep_are_malformed_input() {
        let e = TwinError::Rejected(ModelError::Document(twinfleet_models::DocumentError::TooDeep));
        let k = classify(&e);
        assert_eq!(
            (k.class.http(), k.class.grpc(), k.reason),
            (StatusCode::BAD_REQUEST, Code::InvalidArgument, "too_deep")
        );
    }
}
