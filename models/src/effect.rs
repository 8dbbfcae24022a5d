//! Effects as data. A step function of the models answers an input with a [`Decision`]:
//! the events to journal (they change the state through `evolve`) and the effects the
//! actor around it must carry out in the world. The actor infers nothing from event
//! kinds; it persists the events and then does exactly what the effects say.
//!
//! A wait is part of the persisted state (see [`Waits`]): the effect only tells the actor
//! to arm or cancel its timer, so after a restart the actor re-arms every wait the state
//! holds and the machine goes on where it stopped.

use crate::alert::{AlertKind, Severity};
use crate::command::{CommandId, DeviceCommand};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::fmt;

/// What one input did: events to journal (in order) and effects to carry out after them.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision<E> {
    pub events: Vec<E>,
    pub effects: Vec<Effect>,
}

impl<E> Default for Decision<E> {
    fn default() -> Self {
        Decision { events: Vec::new(), effects: Vec::new() }
    }
}

/// Something that must happen outside the model.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Hand a command to the device. Carried out once the events of the same decision
    /// are durable, so a device never sees a command id that a crash could forget.
    Deliver { id: CommandId, command: DeviceCommand },
    /// Arm (or re-arm) the timer of a wait; on expiry the actor feeds the machine
    /// `WaitExpired { wait, attempt }`. A timer whose attempt no longer matches is stale.
    ArmWait { wait: WaitName, attempt: u32, deadline: Timestamp },
    /// Cancel the timer of a wait (it was satisfied, superseded or abandoned).
    CancelWait { wait: WaitName },
    /// Raise an operator-visible alert.
    RaiseAlert { kind: AlertKind, severity: Severity, message: String },
    /// Store the whole state with this decision's events (a state that will not change
    /// again soon, e.g. an archived twin, should not wait for the next snapshot).
    Snapshot,
}

/// The waits a machine can own. Closed, so every timer of a twin is listed here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum WaitName {
    /// The device has not yet reported the twin's desired state.
    DesiredSync,
    /// A supervisor's backoff before it restarts a crashed child (held by the
    /// supervisor's [`crate::RestartTracker`], not by a twin's state).
    Restart,
    /// The deadline of a provisioning process's current step
    /// ([`crate::provisioning::Provisioning`]).
    Provisioning,
    /// An install waiting for its maintenance window (attempt 0) or for the device's
    /// answer (attempt 1).
    Install,
}

impl WaitName {
    pub fn as_str(self) -> &'static str {
        match self {
            WaitName::DesiredSync => "desired_sync",
            WaitName::Restart => "restart",
            WaitName::Provisioning => "provisioning",
            WaitName::Install => "install",
        }
    }
}

impl fmt::Display for WaitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One armed wait: which attempt is running, until when, and for which command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Wait {
    pub wait: WaitName,
    /// 0 for the first attempt, then 1, 2, ... for the retries.
    pub attempt: u32,
    pub deadline: Timestamp,
    /// The command whose answer the wait expects, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandId>,
}

/// The armed waits of one machine, persisted with its state. Small (one per kind).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Waits(Vec<Wait>);

impl Waits {
    pub fn get(&self, name: WaitName) -> Option<&Wait> {
        self.0.iter().find(|w| w.wait == name)
    }

    /// Arms `wait`, replacing one of the same name.
    pub fn arm(&mut self, wait: Wait) {
        self.cancel(wait.wait);
        self.0.push(wait);
    }

    pub fn cancel(&mut self, name: WaitName) -> Option<Wait> {
        let i = self.0.iter().position(|w| w.wait == name)?;
        Some(self.0.swap_remove(i))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Wait> {
        self.0.iter()
    }

    /// The effects that re-arm every wait, for an actor that starts from this state.
    pub fn rearm(&self) -> Vec<Effect> {
        self.0.iter().map(|w| Effect::ArmWait { wait: w.wait, attempt: w.attempt, deadline: w.deadline }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arming_replaces_a_wait_of_the_same_name_and_rearm_lists_them() {
        let mut w = Waits::default();
        w.arm(Wait { wait: WaitName::DesiredSync, attempt: 0, deadline: Timestamp(10), command: None });
        w.arm(Wait { wait: WaitName::DesiredSync, attempt: 1, deadline: Timestamp(20), command: Some(CommandId(3)) });
        assert_eq!(w.iter().count(), 1);
        assert_eq!(
            w.rearm(),
            vec![Effect::ArmWait { wait: WaitName::DesiredSync, attempt: 1, deadline: Timestamp(20) }]
        );
        assert_eq!(w.cancel(WaitName::DesiredSync).map(|w| w.attempt), Some(1));
        assert!(w.is_empty());
        assert_eq!(serde_json::to_string(&w).unwrap(), "[]");
    }
}
