//! Notification sinks: where the monitoring alerts go (`log`, `webhook`), routed by
//! severity, device type and group (DTA). Pure: the specs, their checks and the routing;
//! the notifier (`twinfleet_protocols::notify`) delivers.

use crate::alert::{AlertState, RuleAlert, Severity};
use serde::{Deserialize, Serialize};

/// One sink of the configuration (`[[notify]]` in the config file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSpec {
    /// Its name (letters, digits, `.`, `_`, `:`, `-`): the key of its cursor.
    pub name: String,
    /// `log`: a log line per change. `webhook`: an HTTP POST per change.
    pub kind: SinkKind,
    /// The webhook's `http://` URL.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
    /// The webhook's shared secret: each POST carries `X-Twinfleet-Signature: sha256=`
    /// HMAC-SHA256(secret, body) in hex.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secret: String,
    /// Only alerts of at least this severity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_severity: Option<Severity>,
    /// Only alerts of these device types (empty: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_types: Vec<String>,
    /// Only alerts of twins in one of these DTAs (directly; empty: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Also acknowledgements (default: raised and cleared only).
    #[serde(default)]
    pub acknowledgements: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    Log,
    Webhook,
}

impl SinkSpec {
    pub fn validate(&self) -> Result<(), String> {
        crate::ids::DtaId::new(&self.name).map_err(|e| format!("sink name: {e}"))?;
        match self.kind {
            SinkKind::Webhook if !self.url.starts_with("http://") => Err(format!(
                "sink {}: the webhook url {:?} must be http:// (this build has no TLS client; put a TLS proxy in front)",
                self.name, self.url
            )),
            SinkKind::Log if !self.url.is_empty() || !self.secret.is_empty() => {
                Err(format!("sink {}: a log sink takes no url or secret", self.name))
            }
            _ => Ok(()),
        }
    }

    /// Whether this change of `a` goes to this sink.
    pub fn wants(&self, a: &RuleAlert) -> bool {
        (self.acknowledgements || a.state != AlertState::Acknowledged)
            && self.min_severity.is_none_or(|s| a.severity >= s)
            && (self.device_types.is_empty() || self.device_types.contains(&a.device_type))
            && (self.groups.is_empty() || a.memberships.iter().any(|m| self.groups.contains(m)))
    }
}

/// Checks a configured list: each sink, and names unique.
pub fn validate_sinks(sinks: &[SinkSpec]) -> Result<(), String> {
    let mut names = std::collections::HashSet::new();
    for s in sinks {
        s.validate()?;
        if !names.insert(s.name.as_str()) {
            return Err(format!("sink {:?} is listed twice", s.name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Timestamp;

    fn alert(severity: Severity, ty: &str, groups: &[&str], state: AlertState) -> RuleAlert {
        RuleAlert {
            id: 1,
            twin: "t".into(),
            device_type: ty.into(),
            rule: "r".into(),
            kind: "threshold".into(),
            severity,
            state,
            message: String::new(),
            values: Default::default(),
            raised_at: Timestamp(0),
            acknowledged_at: None,
            acknowledged_by: None,
            cleared_at: None,
            memberships: groups.iter().map(|g| g.to_string()).collect(),
            location: None,
            recent_events: vec![],
        }
    }

    #[test]
    fn sinks_route_by_severity_type_and_group() {
        let s: SinkSpec = serde_json::from_value(serde_json::json!({
            "name": "ops", "kind": "webhook", "url": "http://hooks.local/x", "min_severity": "major",
            "device_types": ["pump"], "groups": ["hall-3"]
        }))
        .unwrap();
        assert_eq!(s.validate(), Ok(()));
        assert!(s.wants(&alert(Severity::Critical, "pump", &["hall-3"], AlertState::Raised)));
        assert!(!s.wants(&alert(Severity::Warning, "pump", &["hall-3"], AlertState::Raised)), "severity");
        assert!(!s.wants(&alert(Severity::Major, "valve", &["hall-3"], AlertState::Raised)), "type");
        assert!(!s.wants(&alert(Severity::Major, "pump", &["hall-4"], AlertState::Raised)), "group");
        assert!(!s.wants(&alert(Severity::Major, "pump", &["hall-3"], AlertState::Acknowledged)), "acks are opt-in");
        assert!(s.wants(&alert(Severity::Major, "pump", &["hall-3"], AlertState::Cleared)));
        let tls = SinkSpec { url: "https://x".into(), ..s.clone() };
        assert!(tls.validate().unwrap_err().contains("http://"));
        assert!(validate_sinks(&[s.clone(), s]).unwrap_err().contains("twice"));
    }
}
