//! Alerts: what a twin or a supervisor raises when something needs an operator. The
//! monitoring issue turns them into rules and notifications.

use crate::time::Timestamp;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Severity {
    Info,
    Warning,
    /// (Minor and major: the middle of ThingsBoard's five severities, for rules.)
    Minor,
    Major,
    Critical,
}

impl Severity {
    /// Its name, as it is serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Minor => "minor",
            Severity::Major => "major",
            Severity::Critical => "critical",
        }
    }
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

/// Where a rule's alert stands: raised → acknowledged → cleared (or raised → cleared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum AlertState {
    Raised,
    Acknowledged,
    Cleared,
}

/// A monitoring rule's alert, one per twin and rule while it is open, with the context
/// an operator needs (FR10 of Maree et al.).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RuleAlert {
    /// Increasing: a later alert has a larger id.
    pub id: u64,
    pub twin: String,
    pub device_type: String,
    pub rule: String,
    /// The rule's kind (`threshold`, `offline`, ...; `platform` for the platform's own).
    #[serde(default)]
    pub kind: String,
    pub severity: Severity,
    pub state: AlertState,
    pub message: String,
    /// The values that triggered it.
    pub values: std::collections::BTreeMap<String, f64>,
    pub raised_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleared_at: Option<Timestamp>,
    /// The twin's DTA memberships and location when it was raised.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub memberships: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// The twin's last journal events then (`seq event` each, newest last).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_events: Vec<String>,
}

/// A twin's health, derived from its open alerts: `offline` while an `offline` rule's
/// alert is open, else `critical` with an open alert of severity major or critical,
/// else `degraded` with an open warning or minor one, else `ok` (info alerts do not
/// count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Health {
    #[default]
    Ok,
    Degraded,
    Critical,
    Offline,
}

impl Health {
    /// The health of a twin whose open alerts are `(kind, severity)` each.
    pub fn of<'a>(open: impl IntoIterator<Item = (&'a str, Severity)>) -> Health {
        open.into_iter()
            .map(|(kind, sev)| match (kind, sev) {
                ("offline", _) => Health::Offline,
                (_, Severity::Major | Severity::Critical) => Health::Critical,
                (_, Severity::Warning | Severity::Minor) => Health::Degraded,
                _ => Health::Ok,
            })
            .max()
            .unwrap_or(Health::Ok)
    }
}
