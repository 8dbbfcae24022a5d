//! Commands a twin sends to its device, and their ids.
//!
//! The twin mints every command id itself: monotonic per twin, persisted with its state,
//! so that an acknowledgement after a restart, or over another protocol than the one
//! that carried the command, still matches it. On the wire an id is its decimal number
//! (`"17"`). An acknowledgement of an id the twin never minted is *unknown*; one of an
//! id it minted but no longer awaits (already acknowledged, or dropped from the bounded
//! list of pending commands) is *stale*. Both are refused with a typed error and change
//! nothing.

use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;
use std::str::FromStr;

/// A command id, unique within one twin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CommandId(pub u64);

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A command id on the wire that is not a plain decimal number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a command id is a decimal number of at most 20 digits")]
pub struct BadCommandId;

impl FromStr for CommandId {
    type Err = BadCommandId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Only plain decimal digits: no sign, no spaces, no leading "+".
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BadCommandId);
        }
        s.parse().map(CommandId).map_err(|_| BadCommandId)
    }
}

/// What a twin asks of its device. The protocol adapters turn it into an MQTT publish or
/// a gRPC message, named by the id the twin minted.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceCommand {
    /// The twin's whole desired state, from its desired-state sync (`attempt` 0 is the
    /// first delivery, then the retries).
    ApplyDesired {
        desired: Map<String, Value>,
        attempt: u32,
    },
    /// Operator-issued configuration.
    SetConfiguration {
        configuration: Map<String, Value>,
    },
    InstallApp {
        app: String,
        version: String,
        artifact_url: String,
    },
    UninstallApp {
        app: String,
    },
}

impl DeviceCommand {
    /// What a pending command keeps to be sent again: its arguments, except for a
    /// desired state (the twin's current desired state is sent instead).
    pub fn body(&self) -> Map<String, Value> {
        match self {
            DeviceCommand::ApplyDesired { .. } => Map::new(),
            DeviceCommand::SetConfiguration { configuration } => configuration.clone(),
            DeviceCommand::InstallApp { app, version, artifact_url } => [
                ("app".to_string(), Value::from(app.as_str())),
                ("version".to_string(), Value::from(version.as_str())),
                ("artifact_url".to_string(), Value::from(artifact_url.as_str())),
            ]
            .into_iter()
            .collect(),
            DeviceCommand::UninstallApp { app } => {
                [("app".to_string(), Value::from(app.as_str()))].into_iter().collect()
            }
        }
    }

    /// The command a pending one stands for (`desired`: the twin's desired state now).
    /// `None` for an install whose arguments were not kept (a journal from before they
    /// were).
    pub fn from_pending(p: &PendingCommand, desired: &Map<String, Value>, attempt: u32) -> Option<DeviceCommand> {
        let text = |k: &str| p.body.get(k).and_then(Value::as_str).map(String::from);
        Some(match p.kind {
            CommandKind::ApplyDesired => DeviceCommand::ApplyDesired { desired: desired.clone(), attempt },
            CommandKind::SetConfiguration => DeviceCommand::SetConfiguration { configuration: p.body.clone() },
            CommandKind::InstallApp => DeviceCommand::InstallApp {
                app: text("app")?,
                version: text("version")?,
                artifact_url: text("artifact_url")?,
            },
            CommandKind::UninstallApp => DeviceCommand::UninstallApp { app: text("app")? },
        })
    }

    pub fn kind(&self) -> CommandKind {
        match self {
            DeviceCommand::ApplyDesired { .. } => CommandKind::ApplyDesired,
            DeviceCommand::SetConfiguration { .. } => CommandKind::SetConfiguration,
            DeviceCommand::InstallApp { .. } => CommandKind::InstallApp,
            DeviceCommand::UninstallApp { .. } => CommandKind::UninstallApp,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum CommandKind {
    ApplyDesired,
    SetConfiguration,
    InstallApp,
    UninstallApp,
}

/// A command sent and not yet acknowledged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PendingCommand {
    pub id: CommandId,
    pub kind: CommandKind,
    pub sent_at: Timestamp,
    /// Its arguments ([`DeviceCommand::body`]), to send it again to a device that
    /// reconnects.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub body: Map<String, Value>,
}

/// How many unacknowledged commands a twin remembers; the oldest is dropped beyond.
pub const MAX_PENDING_COMMANDS: usize = 16;

/// The command ids a twin minted and the commands it still awaits an answer to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Commands {
    /// The last id minted (0: none yet; the first command is 1).
    #[serde(default)]
    pub last_id: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<PendingCommand>,
}

/// Why an acknowledgement matched no command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    /// Not an id this twin ever minted (or not a number at all).
    Unknown,
    /// Minted, but no longer awaited: acknowledged before, or dropped as too old.
    Stale,
}

impl Unmatched {
    /// The reason under which edges count it.
    pub fn reason(self) -> &'static str {
        match self {
            Unmatched::Unknown => "unknown_ack",
            Unmatched::Stale => "stale_ack",
        }
    }
}

impl Commands {
    pub fn is_empty(&self) -> bool {
        self.last_id == 0 && self.pending.is_empty()
    }

    /// The id the next command gets.
    pub fn next_id(&self) -> CommandId {
        CommandId(self.last_id + 1)
    }

    /// Whether an ack of `id` (as sent on the wire) would match a pending command.
    pub fn matches(&self, id: &str) -> Result<CommandId, Unmatched> {
        let id: CommandId = id.parse().map_err(|_| Unmatched::Unknown)?;
        if id.0 == 0 || id.0 > self.last_id {
            Err(Unmatched::Unknown)
        } else if self.pending.iter().any(|p| p.id == id) {
            Ok(id)
        } else {
            Err(Unmatched::Stale)
        }
    }

    pub(crate) fn sent(&mut self, id: CommandId, kind: CommandKind, body: Map<String, Value>, at: Timestamp) {
        self.last_id = self.last_id.max(id.0);
        if !self.pending.iter().any(|p| p.id == id) {
            self.pending.push(PendingCommand { id, kind, sent_at: at, body });
        }
        if self.pending.len() > MAX_PENDING_COMMANDS {
            let excess = self.pending.len() - MAX_PENDING_COMMANDS;
            self.pending.drain(..excess);
        }
    }

    /// Forgets the pending commands of `kind` (a newer one replaces them; an ack of one
    /// of them is then stale).
    pub(crate) fn superseded(&mut self, kind: CommandKind) {
        self.pending.retain(|p| p.kind != kind);
    }

    pub(crate) fn acked(&mut self, id: CommandId) {
        self.pending.retain(|p| p.id != id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_plain_decimals() {
        assert_eq!("17".parse::<CommandId>(), Ok(CommandId(17)));
        for bad in ["", "+1", "-1", " 1", "1a", "t1-m3", "99999999999999999999999"] {
            assert!(bad.parse::<CommandId>().is_err(), "{bad:?}");
        }
        assert_eq!(CommandId(42).to_string(), "42");
    }

    #[test]
    fn acks_match_pending_commands_only() {
        let mut c = Commands::default();
        assert_eq!(c.matches("1"), Err(Unmatched::Unknown));
        c.sent(c.next_id(), CommandKind::InstallApp, Map::new(), Timestamp(1));
        c.sent(c.next_id(), CommandKind::ApplyDesired, Map::new(), Timestamp(2));
        assert_eq!(c.matches("2"), Ok(CommandId(2)));
        c.acked(CommandId(2));
        assert_eq!(c.matches("2"), Err(Unmatched::Stale));
        assert_eq!(c.matches("3"), Err(Unmatched::Unknown));
        assert_eq!(c.matches("0"), Err(Unmatched::Unknown));
        assert_eq!(c.matches("nope"), Err(Unmatched::Unknown));
        assert_eq!(c.matches("1"), Ok(CommandId(1)));
    }

    #[test]
    fn only_the_newest_pending_commands_are_kept() {
        let mut c = Commands::default();
        for i in 0..(MAX_PENDING_COMMANDS as i64 + 4) {
            c.sent(c.next_id(), CommandKind::SetConfiguration, Map::new(), Timestamp(i));
        }
        assert_eq!(c.pending.len(), MAX_PENDING_COMMANDS);
        assert_eq!(c.matches("1"), Err(Unmatched::Stale));
        assert_eq!(c.matches(&c.last_id.to_string()), Ok(CommandId(c.last_id)));
    }
}
