//! The state of one DTI and the step functions that change it.
//!
//! `TwinState::decide` checks a command against the current state and returns the events
//! it causes (or a typed error and no events); `TwinState::evolve` applies one event. The
//! DTI actor persists the events in the twin's journal together with the new snapshot.

use crate::config::merge_patch;
use crate::domain::{DomainModel, Edit, PathError, Violation, apply_edit, merge_diff};
use crate::ids::{DeviceTypeId, DtaId, TwinId};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::sync::Arc;

/// Who the device is. Set at creation and never changed by a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    pub twin_id: TwinId,
    pub serial: String,
    pub mac: String,
    /// The hardware model; shared by the whole fleet, so stored once in memory.
    pub model: Arc<str>,
    pub device_type: DeviceTypeId,
}

/// Where the device is and how operators label it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Metadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Free-form attributes (e.g. the address of a device-hosted gRPC server).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub attributes: Map<String, Value>,
}

impl Metadata {
    pub fn is_empty(&self) -> bool {
        self.location.is_none() && self.tags.is_empty() && self.attributes.is_empty()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Lifecycle {
    #[default]
    Active,
    Archived,
}

/// Everything a DTI knows about its device. The journal holds how it got here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TwinState {
    pub identity: Identity,
    #[serde(default)]
    pub metadata: Metadata,
    #[serde(default)]
    pub reported: Map<String, Value>,
    #[serde(default)]
    pub desired: Map<String, Value>,
    /// This twin's own configuration overrides, the top of the layering.
    #[serde(default)]
    pub overrides: Map<String, Value>,
    /// The DTAs this twin belongs to directly.
    #[serde(default)]
    pub memberships: Vec<DtaId>,
    #[serde(default)]
    pub lifecycle: Lifecycle,
    /// Sequence number of the last event in the journal (0: none yet).
    #[serde(default)]
    pub last_seq: u64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// What a caller asks of a twin.
#[derive(Debug, Clone, PartialEq)]
pub enum TwinCommand {
    /// The device reported part of its state (a JSON merge patch).
    Report(Map<String, Value>),
    /// An operator or group wants part of the state changed (a JSON merge patch).
    SetDesired(Map<String, Value>),
    UpdateMetadata(Metadata),
    /// A JSON merge patch on the twin's own configuration overrides.
    SetOverrides(Map<String, Value>),
    JoinDta(DtaId),
    LeaveDta(DtaId),
    Archive,
    /// A write to the twin's components (its desired `components` document), checked
    /// against the device type's domain model as a whole before anything changes.
    EditComponents {
        model: Arc<DomainModel>,
        path: String,
        edit: Edit,
    },
    /// Something happened that is only recorded (a restart, a timeout, an alert).
    Record(EventKind),
}

/// One entry of a twin's append-only journal: the contextual data of the twin (when,
/// in which order, what).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TwinEvent {
    pub seq: u64,
    pub at: Timestamp,
    #[serde(flatten)]
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    Created,
    Reported {
        patch: Map<String, Value>,
    },
    DesiredSet {
        patch: Map<String, Value>,
    },
    MetadataUpdated {
        metadata: Metadata,
    },
    OverridesSet {
        patch: Map<String, Value>,
    },
    JoinedDta {
        dta: DtaId,
    },
    LeftDta {
        dta: DtaId,
    },
    Archived,
    /// The supervisor restarted the twin after a failure.
    Restarted {
        reason: String,
        attempt: u32,
    },
    /// A wait the twin owns ran past its deadline and was retried.
    WaitRetried {
        wait: String,
        attempt: u32,
    },
    /// The reported state now matches the desired state.
    InSync,
    /// The device acknowledged a command the twin sent it.
    CommandAcked {
        command_id: String,
        success: bool,
        message: String,
    },
    AlertRaised {
        alert: AlertKind,
        message: String,
    },
}

/// A command that cannot be applied, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TwinError {
    #[error("twin {0} is archived and accepts no changes")]
    Archived(TwinId),
    #[error("twin {twin} is already a member of DTA {dta}")]
    AlreadyMember { twin: TwinId, dta: DtaId },
    #[error("twin {twin} is not a member of DTA {dta}")]
    NotMember { twin: TwinId, dta: DtaId },
    #[error("a patch must not be empty")]
    EmptyPatch,
    #[error(transparent)]
    Component(#[from] PathError),
    #[error("{} constraint violation(s): {}", .0.len(), .0.iter().map(|v| v.message.as_str()).collect::<Vec<_>>().join("; "))]
    Violations(Vec<Violation>),
}

impl TwinState {
    /// A new twin as created by its TDTA.
    pub fn new(identity: Identity, metadata: Metadata, memberships: Vec<DtaId>, now: Timestamp) -> Self {
        TwinState {
            identity,
            metadata,
            reported: Map::new(),
            desired: Map::new(),
            overrides: Map::new(),
            memberships,
            lifecycle: Lifecycle::Active,
            last_seq: 0,
            created_at: now,
            updated_at: now,
        }
    }

    pub fn id(&self) -> &TwinId {
        &self.identity.twin_id
    }

    /// Validates `cmd` and returns the events it causes, numbered from `last_seq + 1`.
    /// Nothing changes until the events are passed to [`TwinState::evolve`].
    pub fn decide(&self, cmd: TwinCommand, now: Timestamp) -> Result<Vec<TwinEvent>, TwinError> {
        let id = self.id();
        let writable = !matches!(cmd, TwinCommand::Record(_));
        if writable && self.lifecycle == Lifecycle::Archived {
            return Err(TwinError::Archived(id.clone()));
        }
        let mut kinds = Vec::with_capacity(2);
        match cmd {
            TwinCommand::Report(patch) | TwinCommand::SetDesired(patch) | TwinCommand::SetOverrides(patch)
                if patch.is_empty() =>
            {
                return Err(TwinError::EmptyPatch);
            }
            TwinCommand::Report(patch) => {
                let was_in_sync = self.in_sync();
                let mut after = self.reported.clone();
                merge_patch(&mut after, &patch);
                kinds.push(EventKind::Reported { patch });
                if !was_in_sync && !self.desired.is_empty() && covers(&after, &self.desired) {
                    kinds.push(EventKind::InSync);
                }
            }
            TwinCommand::SetDesired(patch) => kinds.push(EventKind::DesiredSet { patch }),
            TwinCommand::UpdateMetadata(metadata) => kinds.push(EventKind::MetadataUpdated { metadata }),
            TwinCommand::SetOverrides(patch) => kinds.push(EventKind::OverridesSet { patch }),
            TwinCommand::JoinDta(dta) => {
                if self.memberships.contains(&dta) {
                    return Err(TwinError::AlreadyMember { twin: id.clone(), dta });
                }
                kinds.push(EventKind::JoinedDta { dta });
            }
            TwinCommand::LeaveDta(dta) => {
                if !self.memberships.contains(&dta) {
                    return Err(TwinError::NotMember { twin: id.clone(), dta });
                }
                kinds.push(EventKind::LeftDta { dta });
            }
            TwinCommand::Archive => kinds.push(EventKind::Archived),
            TwinCommand::EditComponents { model, path, edit } => {
                let current = self.desired.get("components").cloned().unwrap_or_else(|| Value::Object(Map::new()));
                let new = apply_edit(&model, &current, &path, edit)?;
                let violations = model.validate(&new);
                if !violations.is_empty() {
                    return Err(TwinError::Violations(violations));
                }
                let (Value::Object(old), Value::Object(new)) = (current, new) else {
                    return Err(TwinError::Component(PathError::Invalid("components must be an object".into())));
                };
                let diff = merge_diff(&old, &new);
                if !diff.is_empty() {
                    let mut patch = Map::new();
                    patch.insert("components".into(), Value::Object(diff));
                    kinds.push(EventKind::DesiredSet { patch });
                }
            }
            TwinCommand::Record(kind) => kinds.push(kind),
        }
        Ok(kinds
            .into_iter()
            .enumerate()
            .map(|(i, kind)| TwinEvent { seq: self.last_seq + 1 + i as u64, at: now, kind })
            .collect())
    }

    /// Applies one event. Events come from `decide` or from the journal, so they are
    /// trusted: applying never fails.
    pub fn evolve(&mut self, event: &TwinEvent) {
        match &event.kind {
            EventKind::Reported { patch } => merge_patch(&mut self.reported, patch),
            EventKind::DesiredSet { patch } => merge_patch(&mut self.desired, patch),
            EventKind::MetadataUpdated { metadata } => self.metadata = metadata.clone(),
            EventKind::OverridesSet { patch } => merge_patch(&mut self.overrides, patch),
            EventKind::JoinedDta { dta } => {
                if !self.memberships.contains(dta) {
                    self.memberships.push(dta.clone());
                }
            }
            EventKind::LeftDta { dta } => self.memberships.retain(|d| d != dta),
            EventKind::Archived => self.lifecycle = Lifecycle::Archived,
            EventKind::Created
            | EventKind::Restarted { .. }
            | EventKind::WaitRetried { .. }
            | EventKind::InSync
            | EventKind::CommandAcked { .. }
            | EventKind::AlertRaised { .. } => {}
        }
        self.last_seq = self.last_seq.max(event.seq);
        self.updated_at = self.updated_at.max(event.at);
    }

    /// True when every desired value is reported as such.
    pub fn in_sync(&self) -> bool {
        covers(&self.reported, &self.desired)
    }
}

/// True when every key of `wanted` has the same value in `have` (recursively for objects).
/// Numbers compare by value, so `5` and `5.0` match: devices and transports differ in
/// how they write numbers.
fn covers(have: &Map<String, Value>, wanted: &Map<String, Value>) -> bool {
    wanted.iter().all(|(k, w)| have.get(k).is_some_and(|h| same(h, w)))
}

fn same(h: &Value, w: &Value) -> bool {
    match (h, w) {
        (Value::Object(h), Value::Object(w)) => covers(h, w),
        (Value::Number(h), Value::Number(w)) => h.as_f64() == w.as_f64(),
        (Value::Array(h), Value::Array(w)) => h.len() == w.len() && h.iter().zip(w).all(|(h, w)| same(h, w)),
        (h, w) => h == w,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn twin() -> TwinState {
        let identity = Identity {
            twin_id: TwinId::new("t1").unwrap(),
            serial: "SN1".into(),
            mac: "00:11:22:33:44:55".into(),
            model: Arc::from("m1"),
            device_type: DeviceTypeId::new("sensor").unwrap(),
        };
        TwinState::new(identity, Metadata::default(), vec![], Timestamp(5))
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    fn step(s: &mut TwinState, cmd: TwinCommand, now: i64) -> Vec<TwinEvent> {
        let evs = s.decide(cmd, Timestamp(now)).unwrap();
        evs.iter().for_each(|e| s.evolve(e));
        evs
    }

    #[test]
    fn events_are_numbered_and_applied() {
        let mut s = twin();
        step(&mut s, TwinCommand::SetDesired(obj(json!({"fw": "2.0"}))), 10);
        let evs = step(&mut s, TwinCommand::Report(obj(json!({"fw": "2.0", "temp": 21}))), 20);
        assert_eq!(evs.len(), 2, "report that reaches desired also records InSync: {evs:?}");
        assert_eq!(evs[1].kind, EventKind::InSync);
        assert_eq!(s.last_seq, 3);
        assert_eq!(s.updated_at, Timestamp(20));
        assert!(s.in_sync());
    }

    #[test]
    fn numbers_match_by_value_when_checking_sync() {
        let mut s = twin();
        step(&mut s, TwinCommand::SetDesired(obj(json!({"rate": 5, "limits": [1, 2.5]}))), 1);
        let evs = step(&mut s, TwinCommand::Report(obj(json!({"rate": 5.0, "limits": [1.0, 2.5]}))), 2);
        assert_eq!(evs.last().unwrap().kind, EventKind::InSync);
    }

    #[test]
    fn rejected_commands_change_nothing() {
        let mut s = twin();
        let dta = DtaId::new("g").unwrap();
        step(&mut s, TwinCommand::JoinDta(dta.clone()), 1);
        let before = s.clone();
        assert!(matches!(s.decide(TwinCommand::JoinDta(dta), Timestamp(2)), Err(TwinError::AlreadyMember { .. })));
        assert_eq!(s.decide(TwinCommand::Report(Map::new()), Timestamp(2)), Err(TwinError::EmptyPatch));
        step(&mut s, TwinCommand::Archive, 3);
        assert!(matches!(
            s.decide(TwinCommand::SetDesired(obj(json!({"a": 1}))), Timestamp(4)),
            Err(TwinError::Archived(_))
        ));
        assert_eq!(before.memberships, s.memberships);
    }

    #[test]
    fn journal_replay_rebuilds_the_state() {
        let mut s = twin();
        let mut journal = vec![];
        journal.extend(step(&mut s, TwinCommand::Report(obj(json!({"a": {"b": 1}}))), 1));
        journal.extend(step(
            &mut s,
            TwinCommand::UpdateMetadata(Metadata { location: Some("lab".into()), ..Default::default() }),
            2,
        ));
        journal.extend(step(&mut s, TwinCommand::Report(obj(json!({"a": {"b": null, "c": 2}}))), 3));
        let mut replayed = twin();
        journal.iter().for_each(|e| replayed.evolve(e));
        assert_eq!(replayed, s);
        let text = serde_json::to_string(&journal[0]).unwrap();
        assert_eq!(text, r#"{"seq":1,"at":1,"event":"reported","patch":{"a":{"b":1}}}"#);
    }
}
