//! The MQTT topic scheme (PROTOCOL.md documents it for device makers).
//!
//! | direction | topic | payload |
//! |---|---|---|
//! | device → twin | `devices/{id}/telemetry` | `{"ts"?: ms, "values": {"metric": number, ...}}` and/or `"points": [{"metric", "value", "ts"?}]` |
//! | device → twin | `devices/{id}/state` | JSON merge patch on the reported state |
//! | device → twin | `devices/{id}/status` | `{"status": "online" / ..., ...}` → reported `status` |
//! | device → twin | `devices/{id}/acks` | `{"command_id", "success", "message"?}` |
//! | device → twin | `devices/{id}/logs` | `{"ts"?, "app"?, "lines": ["text" or {"ts"?, "level"?, "app"?, "text"}]}` |
//! | twin → device | `devices/{id}/commands` | `{"command_id", "apply_desired": {..}}` |
//! | device → platform | `provisioning/{type}/{id}/request` | `{"claim_token", "metadata"?}` |
//! | platform → device | `provisioning/{type}/{id}/response` | `{"ok", "device_id", "token", "operational"}` or `{"ok": false, "error"}` |

/// What a device publishes to its twin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Telemetry,
    State,
    Status,
    Acks,
    Logs,
}

impl Channel {
    pub const ALL: [Channel; 5] = [Channel::Telemetry, Channel::State, Channel::Status, Channel::Acks, Channel::Logs];

    pub fn name(self) -> &'static str {
        match self {
            Channel::Telemetry => "telemetry",
            Channel::State => "state",
            Channel::Status => "status",
            Channel::Acks => "acks",
            Channel::Logs => "logs",
        }
    }

    fn parse(s: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.name() == s)
    }
}

pub const COMMANDS: &str = "commands";

/// `devices/{id}/{channel}`.
pub fn device_topic(id: &str, channel: &str) -> String {
    format!("devices/{id}/{channel}")
}

/// The subscription filters of the transformer, one per channel.
pub fn device_filters() -> impl Iterator<Item = String> {
    Channel::ALL.into_iter().map(|c| format!("devices/+/{}", c.name()))
}

pub const PROVISIONING_FILTER: &str = "provisioning/+/+/request";

pub fn provisioning_request(ty: &str, id: &str) -> String {
    format!("provisioning/{ty}/{id}/request")
}

pub fn provisioning_response(ty: &str, id: &str) -> String {
    format!("provisioning/{ty}/{id}/response")
}

/// A topic the transformer received, parsed.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    Device { id: &'a str, channel: Channel },
    Provisioning { ty: &'a str, id: &'a str },
}

pub fn parse(topic: &str) -> Option<Parsed<'_>> {
    let mut parts = topic.split('/');
    match (parts.next()?, parts.next()?, parts.next()?, parts.next()) {
        ("devices", id, ch, None) if !id.is_empty() => Some(Parsed::Device { id, channel: Channel::parse(ch)? }),
        ("provisioning", ty, id, Some("request")) if parts.next().is_none() && !ty.is_empty() && !id.is_empty() => {
            Some(Parsed::Provisioning { ty, id })
        }
        _ => None,
    }
}

/// Who a connection on the embedded gateway speaks for, and so which topics it may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// An operational device: publishes `devices/{id}/<channel>`, subscribes
    /// `devices/{id}/commands`.
    Device(String),
    /// A device being provisioned with the claim token of `ty` (or of its `batch`):
    /// publishes its request, subscribes its response.
    Claimant { ty: String, id: String, batch: Option<String> },
}

impl Identity {
    pub fn may_publish(&self, topic: &str) -> bool {
        match self {
            Identity::Device(me) => {
                matches!(parse(topic), Some(Parsed::Device { id, .. }) if id == me)
            }
            Identity::Claimant { ty, id, .. } => topic == provisioning_request(ty, id),
        }
    }

    /// Exact filters only: no wildcards, so a device cannot listen to others.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        match self {
            Identity::Device(me) => filter == device_topic(me, COMMANDS),
            Identity::Claimant { ty, id, .. } => filter == provisioning_response(ty, id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_parse_and_identities_are_confined() {
        assert_eq!(parse("devices/d1/telemetry"), Some(Parsed::Device { id: "d1", channel: Channel::Telemetry }));
        assert_eq!(parse("devices/d1/nope"), None);
        assert_eq!(parse("devices/d1/state/x"), None);
        assert_eq!(parse("provisioning/pump/p7/request"), Some(Parsed::Provisioning { ty: "pump", id: "p7" }));
        assert_eq!(parse("provisioning/pump/p7/response"), None);
        let me = Identity::Device("d1".into());
        assert!(me.may_publish("devices/d1/state"));
        assert!(!me.may_publish("devices/d2/state"));
        assert!(!me.may_publish("devices/d1/commands"));
        assert!(!me.may_publish("devices/+/state"));
        assert!(me.may_subscribe("devices/d1/commands"));
        assert!(!me.may_subscribe("devices/+/commands"));
        assert!(!me.may_subscribe("#"));
        let c = Identity::Claimant { ty: "pump".into(), id: "p7".into(), batch: None };
        assert!(c.may_publish("provisioning/pump/p7/request"));
        assert!(!c.may_publish("provisioning/pump/p8/request"));
        assert!(!c.may_publish("devices/p7/state"));
        assert!(c.may_subscribe("provisioning/pump/p7/response"));
    }
}
