//! Alerts: what a twin or a supervisor raises when something needs an operator. The
//! monitoring issue turns them into rules and notifications.

use crate::time::Timestamp;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    /// (Minor and major: the middle of ThingsBoard's five severities, for rules.)
    Minor,
    Major,
    Critical,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// A supervised actor failed too often and is no longer restarted.
    ActorFailed,
    /// A wait ran past its deadline and its retries.
    DeadlineExceeded,
    /// A stored record could not be decoded; the twin was quarantined.
    Quarantined,
}

/// An internal alert event. The monitoring issue turns these into notifications.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub at: Timestamp,
    pub severity: Severity,
    pub kind: AlertKind,
    /// The actor that raised it, as `kind/id`.
    pub source: String,
    pub message: String,
}
