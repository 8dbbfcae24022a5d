//! Errors as HTTP answers: the status and code come from the one classification
//! (`crate::error`); the body is `{"error", "message"}` (and the violations).

use super::*;

/// A `TwinError` as an HTTP answer.
#[derive(Debug)]
pub struct HttpError(pub TwinError);

impl From<TwinError> for HttpError {
    fn from(e: TwinError) -> Self {
        HttpError(e)
    }
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl HttpError {
    fn code(&self) -> &'static str {
        crate::error::classify(&self.0).code
    }
}

impl ResponseError for HttpError {
    fn status_code(&self) -> StatusCode {
        crate::error::classify(&self.0).class.http()
    }

    fn error_response(&self) -> HttpResponse {
        let mut body = serde_json::json!({"error": self.code(), "message": self.0.to_string()});
        if let TwinError::Rejected(ModelError::Violations(v)) = &self.0 {
            body["violations"] = serde_json::to_value(v).unwrap_or_default();
        }
        if let TwinError::Incompatible { reasons, .. } = &self.0 {
            body["reasons"] = serde_json::to_value(reasons).unwrap_or_default();
        }
        let mut res = HttpResponse::build(self.status_code());
        if matches!(self.0, TwinError::Unauthenticated(_)) {
            res.insert_header(("WWW-Authenticate", "Bearer"));
        }
        if matches!(crate::error::classify(&self.0).class, crate::error::Class::InsufficientStorage) {
            // Writes resume by themselves once space is freed; the storage checks every second.
            res.insert_header(("Retry-After", "5"));
        }
        res.json(body)
    }
}

/// The body of every error answer.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody {
    /// A stable code: `invalid`, `unauthenticated`, `forbidden`, `not_found`,
    /// `already_exists`, `conflict`, `archived`, `constraint_violation`, ...
    error: String,
    /// What was wrong, for a human.
    message: String,
    /// Constraint violations (422 `constraint_violation` only): property, rule, value.
    #[serde(skip_serializing_if = "Option::is_none")]
    violations: Option<Vec<serde_json::Value>>,
}

/// The error answers any API route may give.
#[derive(Debug, utoipa::IntoResponses)]
#[allow(dead_code)]
pub(crate) enum Errors {
    /// Malformed input: bad JSON, an unknown field, a wrong type, a bad id, query or path.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No API token, or an unknown or revoked one.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The caller's role or grants do not allow this.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// No such twin, device type, DTA, user, group, job, component path or route.
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// Already exists, archived, quarantined, or still in use.
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// Well-formed but refused by the twin's rules (constraint violations are listed).
    #[response(status = 422)]
    Unprocessable(ErrorBody),
    /// The twin's mailbox is full; retry later.
    #[response(status = 429)]
    TooManyRequests(ErrorBody),
    /// Storage failed.
    #[response(status = 500)]
    Internal(ErrorBody),
    /// The twin is restarting, the device unreachable, or the platform stopping.
    #[response(status = 503)]
    Unavailable(ErrorBody),
    /// The twin did not answer in time.
    #[response(status = 504)]
    Timeout(ErrorBody),
}
