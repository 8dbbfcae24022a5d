//! Notification sinks: where the monitoring alerts go (`log`, `webhook`, `mqtt`), routed by
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
    /// `log`: a log line per change. `webhook`: an HTTP POST per change. `mqtt`: a QoS 1
    /// message per change on a topic of an MQTT broker.
    pub kind: SinkKind,
    /// The webhook's `http://` URL, or the broker's `mqtt://host:port`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
    /// `mqtt`: the topic, with `{device_type}`, `{twin}`, `{rule}` and `{severity}`
    /// filled in (default [`DEFAULT_TOPIC`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub topic: String,
    /// `mqtt`: the broker account.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub username: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub password: String,
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
    Mqtt,
}

/// The topic of an MQTT sink when none is given.
pub const DEFAULT_TOPIC: &str = "twinfleet/alerts/{device_type}/{twin}";

impl SinkSpec {
    pub fn validate(&self) -> Result<(), String> {
        crate::ids::DtaId::new(&self.name).map_err(|e| format!("sink name: {e}"))?;
        let n = &self.name;
        let unused = |fields: &[(&str, &String)]| -> Result<(), String> {
            match fields.iter().find(|(_, v)| !v.is_empty()) {
                Some((f, _)) => Err(format!("sink {n}: a {:?} sink takes no {f}", self.kind)),
                None => Ok(()),
            }
        };
        match self.kind {
            SinkKind::Webhook if !self.url.starts_with("http://") => Err(format!(
                "sink {n}: the webhook url {:?} must be http:// (this build has no TLS client; put a TLS proxy in front)",
                self.url
            )),
            SinkKind::Webhook => unused(&[("topic", &self.topic), ("username", &self.username)]),
            SinkKind::Mqtt => {
                if crate::export::mqtt_broker(&self.url).is_none() {
                    return Err(format!("sink {n}: the broker url {:?} must be mqtt://host:port", self.url));
                }
                let topic = self.topic();
                if topic.is_empty() || topic.contains(['+', '#']) {
                    return Err(format!("sink {n}: the topic {topic:?} must not be empty or hold wildcards"));
                }
                unused(&[("secret", &self.secret)])
            }
            SinkKind::Log => unused(&[
                ("url", &self.url),
                ("secret", &self.secret),
                ("topic", &self.topic),
                ("username", &self.username),
            ]),
        }
    }

    /// The MQTT topic template.
    pub fn topic(&self) -> &str {
        if self.topic.is_empty() { DEFAULT_TOPIC } else { &self.topic }
    }

    /// The MQTT topic of a change of `a`.
    pub fn topic_for(&self, a: &RuleAlert) -> String {
        self.topic()
            .replace("{device_type}", &a.device_type)
            .replace("{twin}", &a.twin)
            .replace("{rule}", &a.rule)
            .replace("{severity}", a.severity.as_str())
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

    fn alert(severity: Severity, ty: &str, groups: &[&str], state: AlertState) -> RuleAlert {
        RuleAlert {
            severity,
            device_type: ty.into(),
            memberships: groups.iter().map(|g| g.to_string()).collect(),
            state,
            ..super::tests_support::alert()
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
        let mqtt = SinkSpec { kind: SinkKind::Mqtt, url: "mqtt://localhost:1883".into(), ..s.clone() };
        assert_eq!(mqtt.validate(), Ok(()));
        let a = alert(Severity::Critical, "pump", &["hall-3"], AlertState::Raised);
        assert_eq!(mqtt.topic_for(&a), format!("twinfleet/alerts/pump/{}", a.twin));
        let wild = SinkSpec { topic: "alerts/#".into(), ..mqtt.clone() };
        assert!(wild.validate().unwrap_err().contains("wildcards"));
        let no_port = SinkSpec { url: "mqtt://localhost".into(), ..mqtt.clone() };
        assert!(no_port.validate().unwrap_err().contains("host:port"));
        let log =
            SinkSpec { kind: SinkKind::Log, url: String::new(), secret: String::new(), topic: "x".into(), ..s.clone() };
        assert!(log.validate().unwrap_err().contains("takes no topic"));
        assert!(validate_sinks(&[s.clone(), s]).unwrap_err().contains("twice"));
    }
}

/// A silence: while it lasts, the changes of the alerts it matches are not sent to any
/// sink (they are still raised, stored, listed and streamed). A DTA's maintenance
/// window is a silence on `group`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Silence {
    #[serde(default)]
    pub id: u64,
    /// What it matches: every given field must (at least one is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// A DTA the twin belongs to directly (a maintenance window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// From (default: when it is created) until, in ms since the epoch.
    #[serde(default)]
    pub starts_at: crate::time::Timestamp,
    pub ends_at: crate::time::Timestamp,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub comment: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub created_by: String,
}

/// The longest silence: a year.
pub const MAX_SILENCE_MS: i64 = 366 * 86_400_000;

impl Silence {
    pub fn validate(&self) -> Result<(), String> {
        if self.twin.is_none() && self.device_type.is_none() && self.rule.is_none() && self.group.is_none() {
            return Err("a silence matches something: give a twin, device_type, rule or group".into());
        }
        if self.ends_at <= self.starts_at {
            return Err(format!("ends_at {} is not after starts_at {}", self.ends_at.0, self.starts_at.0));
        }
        if self.ends_at - self.starts_at > MAX_SILENCE_MS {
            return Err("a silence lasts at most a year".into());
        }
        if self.comment.len() > 1_024 {
            return Err("a comment is at most 1,024 bytes".into());
        }
        Ok(())
    }

    /// Whether it holds back `a`'s change at `now`.
    pub fn mutes(&self, a: &RuleAlert, now: crate::time::Timestamp) -> bool {
        self.starts_at <= now
            && now < self.ends_at
            && self.twin.as_ref().is_none_or(|t| &a.twin == t)
            && self.device_type.as_ref().is_none_or(|t| &a.device_type == t)
            && self.rule.as_ref().is_none_or(|r| &a.rule == r)
            && self.group.as_ref().is_none_or(|g| a.memberships.contains(g))
    }
}

#[cfg(test)]
mod silence_tests {
    use super::*;
    use crate::time::Timestamp;

    #[test]
    fn a_silence_mutes_what_it_matches_while_it_lasts() {
        let mut a = super::tests_support::alert();
        a.memberships = vec!["ward-1".into()];
        let s = Silence {
            id: 1,
            twin: None,
            device_type: None,
            rule: None,
            group: Some("ward-1".into()),
            starts_at: Timestamp(100),
            ends_at: Timestamp(200),
            comment: "maintenance".into(),
            created_by: "ops".into(),
        };
        assert_eq!(s.validate(), Ok(()));
        assert!(!s.mutes(&a, Timestamp(99)) && s.mutes(&a, Timestamp(100)) && !s.mutes(&a, Timestamp(200)));
        a.memberships.clear();
        assert!(!s.mutes(&a, Timestamp(150)), "another group");
        let none = Silence { group: None, ..s.clone() };
        assert!(none.validate().unwrap_err().contains("matches something"));
        let backwards = Silence { ends_at: Timestamp(50), ..s };
        assert!(backwards.validate().unwrap_err().contains("not after"));
    }
}

#[cfg(test)]
mod tests_support {
    pub fn alert() -> RuleAlert {
        RuleAlert {
            id: 1,
            twin: "t".into(),
            device_type: "pump".into(),
            rule: "r".into(),
            kind: "threshold".into(),
            severity: Severity::Major,
            state: AlertState::Raised,
            message: String::new(),
            values: Default::default(),
            raised_at: crate::time::Timestamp(0),
            acknowledged_at: None,
            acknowledged_by: None,
            cleared_at: None,
            memberships: vec![],
            location: None,
            recent_events: vec![],
        }
    }
    use super::*;
}
