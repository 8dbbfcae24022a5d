//! The state of one DTI and the step functions that change it.
//!
//! `TwinState::decide` checks a command against the current state and returns a
//! [`Decision`]: the events it causes and the effects to carry out (deliver a command to
//! the device, arm or cancel a wait, raise an alert), or a typed error and nothing.
//! `TwinState::evolve` applies one event. The DTI actor persists the events in the twin's
//! journal and then carries out the effects; it infers nothing from event kinds.
//!
//! The desired-state sync is one such machine: a desired state the device does not
//! report yet is sent as a command the twin names, and a `desired_sync` wait (in the
//! state, so it survives restarts) retries it with backoff and ends in an alert. What is
//! sent is only the delta (`desired::delta`): what the device does not report yet, so a
//! retry or a reconnect carries only what is still pending. A device that refuses it
//! (a negative acknowledgement) fails the keys it carried with its reason; retries used
//! up fail them too. A key written with `clear_on_sync` leaves the desired state once
//! the device reports it.

use crate::alert::{AlertKind, Severity};
use crate::command::{CommandId, CommandKind, Commands, DeviceCommand, Unmatched};
use crate::config::merge_patch;
use crate::desired::{KeyState, KeyStatus, covers, delta, same};
use crate::domain::{DomainModel, Edit, PathError, Violation, apply_edit, merge_diff};
use crate::effect::{Decision, Effect, Wait, WaitName, Waits};
use crate::ids::{DeviceTypeId, DtaId, TwinId};
use crate::limits::{self, DocumentError};
use crate::policy::{RetryPolicy, WaitDecision};
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
    /// Desired keys the device refused or did not reach after every retry, with why.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub desired_failed: std::collections::BTreeMap<String, String>,
    /// Which configuration template version and values produced each desired key a
    /// template fills (`template::AppliedTemplate`), by key.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub templates: std::collections::BTreeMap<String, crate::template::AppliedTemplate>,
    /// The twin's current (or last) app install (boxed: most twins have none, and the
    /// job is ~190 bytes that every twin would carry inline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install: Option<Box<crate::install::InstallJob>>,
    /// The app inventory: what the device installed through its twin, app → version.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub apps: std::collections::BTreeMap<String, String>,
    /// Desired keys removed from the desired state once the device reports them.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub clear_on_sync: std::collections::BTreeSet<String>,
    /// The DTAs this twin belongs to directly.
    #[serde(default)]
    pub memberships: Vec<DtaId>,
    #[serde(default)]
    pub lifecycle: Lifecycle,
    /// The waits this twin owns (persisted, so a restart re-arms them).
    #[serde(default, skip_serializing_if = "Waits::is_empty")]
    pub waits: Waits,
    /// Command ids minted so far and the commands awaiting the device's answer.
    #[serde(default, skip_serializing_if = "Commands::is_empty")]
    pub commands: Commands,
    /// Where each monitoring rule that is not ok stands (persisted, so a restart
    /// neither loses nor re-raises an alert).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub rules: std::collections::BTreeMap<String, crate::rules::Phase>,
    /// Sequence number of the last event in the journal (0: none yet).
    #[serde(default)]
    pub last_seq: u64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// What a caller (or the twin's own timer) asks of a twin.
#[derive(Debug, Clone, PartialEq)]
pub enum TwinCommand {
    /// The device reported part of its state (a JSON merge patch).
    Report(Map<String, Value>),
    /// An operator or group wants part of the state changed (a JSON merge patch). Its
    /// `components` part is validated against the device type's domain model.
    SetDesired(Map<String, Value>),
    /// [`TwinCommand::SetDesired`] with conditions: only if the twin's version (its
    /// journal's `last_seq`) is `if_version`; with `clear_on_sync`, the patch's keys
    /// leave the desired state once the device reports them.
    WriteDesired {
        patch: Map<String, Value>,
        if_version: Option<u64>,
        clear_on_sync: bool,
    },
    UpdateMetadata(Metadata),
    /// Fill the device type's configuration template for this twin (`config`: its
    /// effective configuration) and set the result as the template's desired key; only
    /// the difference to the key's current desired value is written and sent.
    ApplyTemplate {
        template: Arc<crate::template::ConfigTemplate>,
        config: Map<String, Value>,
    },
    /// A JSON merge patch on the twin's own configuration overrides.
    SetOverrides(Map<String, Value>),
    JoinDta(DtaId),
    LeaveDta(DtaId),
    Archive,
    /// A write to the twin's components (its desired `components` document), checked
    /// against the device type's domain model as a whole before anything changes.
    EditComponents {
        path: String,
        edit: Edit,
    },
    /// Send a command to the device; the twin mints its id.
    SendToDevice(DeviceCommand),
    /// Install an app version the store found compatible: after an operator's approval
    /// (if `approval`), in the maintenance window (if any), under the install watchdog.
    Install {
        app: String,
        version: String,
        artifact_url: String,
        approval: bool,
        window: Option<crate::install::MaintenanceWindow>,
        rollout: Option<String>,
        /// Remove the app instead (`version`: the one installed).
        uninstall: bool,
    },
    /// An operator approves the install of `app` that awaits approval.
    ApproveInstall {
        app: String,
    },
    /// The device answered a command (the id as it came over the wire).
    Ack {
        command_id: String,
        success: bool,
        message: String,
    },
    /// The timer of a wait ran out (fed by the actor that armed it).
    WaitExpired {
        wait: WaitName,
        attempt: u32,
    },
    /// Something happened that is only recorded (a restart).
    Record(EventKind),
    /// The device (re)connected: send it again every command it has not answered yet,
    /// under the same ids (the desired state as it is now). Records nothing.
    Resend,
}

/// What a twin's decisions depend on besides its state: the policies and the device
/// type's domain model.
#[derive(Debug, Clone, Copy)]
pub struct TwinRules<'a> {
    /// How long the device gets to report the desired state, and the retries.
    pub desired_sync: &'a RetryPolicy,
    /// How long the device gets to answer an install.
    pub install_deadline_ms: i64,
    /// The device type's domain model, validating the `components` document.
    pub domain: Option<&'a DomainModel>,
    /// The metrics the device type declares, if it declares any (rules on others are
    /// refused).
    pub metrics: Option<&'a [String]>,
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
    /// The desired state changed. When the device does not report it yet, the twin
    /// sends it (command `wait.command`) and waits for it until `wait.deadline`.
    DesiredSet {
        patch: Map<String, Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wait: Option<Wait>,
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
    /// A wait the twin owns ran past its deadline and was retried, until `deadline`.
    WaitRetried {
        wait: WaitName,
        attempt: u32,
        #[serde(default)]
        deadline: Timestamp,
    },
    /// The reported state now matches the desired state.
    InSync,
    /// The twin sent a command to its device.
    CommandSent {
        command_id: CommandId,
        command: CommandKind,
        /// The command's arguments ([`DeviceCommand::body`]), to send it again.
        #[serde(default, skip_serializing_if = "Map::is_empty")]
        body: Map<String, Value>,
    },
    /// The device acknowledged a command the twin sent it.
    CommandAcked {
        command_id: String,
        success: bool,
        message: String,
    },
    /// An alert; when it ends a wait (its retries are used up), `wait` names it.
    AlertRaised {
        alert: AlertKind,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wait: Option<WaitName>,
    },
    /// A monitoring rule moved on (`rules::Phase`: pending since, firing since, ...).
    RulePhase {
        rule: String,
        phase: crate::rules::Phase,
    },
    /// Desired keys failed: the device refused them (its reason) or did not report them
    /// after every retry. The sync stops waiting.
    DesiredFailed {
        reasons: std::collections::BTreeMap<String, String>,
    },
    /// Desired keys written with `clear_on_sync` were reported: they leave the desired
    /// state.
    DesiredCleared {
        keys: Vec<String>,
    },
    /// The keys of the desired write just before are to be cleared once reported.
    DesiredTransient {
        keys: Vec<String>,
    },
    /// The twin's install moved on (`install::InstallJob`, as it is now).
    InstallChanged {
        job: crate::install::InstallJob,
    },
    /// A configuration template filled desired key `target` (with the desired change
    /// before it, if the result differed): which version, from which values.
    TemplateApplied {
        target: String,
        version: u32,
        values: std::collections::BTreeMap<String, Value>,
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
    #[error(transparent)]
    Document(#[from] DocumentError),
    #[error("{}", unmatched_message(.command_id, *.why))]
    UnmatchedAck { command_id: String, why: Unmatched },
    /// A monitoring rule in the configuration's `rules` does not check.
    #[error(transparent)]
    Rules(#[from] crate::rules::RuleError),
    /// An install was asked for while another one runs, or an approval finds nothing to
    /// approve.
    #[error("{0}")]
    Install(String),
    /// A configuration template does not fill for this twin.
    #[error(transparent)]
    Template(#[from] crate::template::TemplateError),
    /// A conditional write found the twin at another version.
    #[error("twin {twin} is at version {current}, not {expected}: it changed meanwhile; read it again")]
    VersionMismatch { twin: TwinId, expected: u64, current: u64 },
}

fn unmatched_message(id: &str, why: Unmatched) -> String {
    let shown: String = id.chars().take(40).collect();
    match why {
        Unmatched::Unknown => format!("acknowledgement of command {shown:?}, which this twin never sent"),
        Unmatched::Stale => format!("acknowledgement of command {shown:?}, which this twin no longer awaits"),
    }
}

impl TwinState {
    /// A new twin as created by its TDTA.
    pub fn new(identity: Identity, metadata: Metadata, memberships: Vec<DtaId>, now: Timestamp) -> Self {
        TwinState {
            identity,
            metadata,
            reported: Map::new(),
            desired: Map::new(),
            desired_failed: Default::default(),
            templates: Default::default(),
            install: None,
            apps: Default::default(),
            clear_on_sync: Default::default(),
            overrides: Map::new(),
            memberships,
            lifecycle: Lifecycle::Active,
            waits: Waits::default(),
            commands: Commands::default(),
            rules: Default::default(),
            last_seq: 0,
            created_at: now,
            updated_at: now,
        }
    }

    pub fn id(&self) -> &TwinId {
        &self.identity.twin_id
    }

    /// Validates `cmd` and returns the events it causes, numbered from `last_seq + 1`,
    /// and the effects to carry out once they are stored. Nothing changes until the
    /// events are passed to [`TwinState::evolve`].
    pub fn decide(
        &self,
        cmd: TwinCommand,
        now: Timestamp,
        rules: TwinRules<'_>,
    ) -> Result<Decision<TwinEvent>, TwinError> {
        let id = self.id();
        let cmd = match cmd {
            TwinCommand::SetDesired(patch) => {
                TwinCommand::WriteDesired { patch, if_version: None, clear_on_sync: false }
            }
            cmd => cmd,
        };
        if let TwinCommand::WriteDesired { if_version: Some(v), .. } = &cmd
            && *v != self.last_seq
        {
            return Err(TwinError::VersionMismatch { twin: id.clone(), expected: *v, current: self.last_seq });
        }
        let writable =
            !matches!(cmd, TwinCommand::Record(_) | TwinCommand::Ack { .. } | TwinCommand::WaitExpired { .. });
        if writable && self.lifecycle == Lifecycle::Archived {
            return Err(TwinError::Archived(id.clone()));
        }
        // Every document that enters the twin is bounded, so whatever is stored can be read.
        match &cmd {
            TwinCommand::Report(p) | TwinCommand::SetDesired(p) | TwinCommand::WriteDesired { patch: p, .. } => {
                limits::check_object(p)?
            }
            TwinCommand::SetOverrides(p) => {
                limits::check_object(p)?;
                crate::rules::check_config(p, rules.metrics)?;
            }
            TwinCommand::UpdateMetadata(m) => limits::check_object(&m.attributes)?,
            TwinCommand::EditComponents { edit: Edit::Put(v) | Edit::Append(v), .. } => limits::check_value(v)?,
            _ => {}
        }
        let mut kinds = Vec::with_capacity(2);
        let mut effects = Vec::new();
        match cmd {
            TwinCommand::Report(patch)
            | TwinCommand::SetDesired(patch)
            | TwinCommand::WriteDesired { patch, .. }
            | TwinCommand::SetOverrides(patch)
                if patch.is_empty() =>
            {
                return Err(TwinError::EmptyPatch);
            }
            TwinCommand::Report(patch) => {
                // Only a twin that waits for its desired state needs the state after the
                // patch (a copy of the reported state): most reports skip it.
                let waiting = self.waits.get(WaitName::DesiredSync).is_some();
                let reaches_sync = !self.desired.is_empty() && (waiting || !self.in_sync()) && {
                    let mut after = self.reported.clone();
                    merge_patch(&mut after, &patch);
                    // (With a sync waiting: once nothing but failed keys is missing.)
                    covers(&after, &self.desired)
                        || (waiting && self.outstanding(&self.desired, &after, None).is_empty())
                };
                // Keys to clear once reported, and failed keys the device now reports.
                let settled: Vec<String> = if self.clear_on_sync.is_empty() {
                    Vec::new()
                } else {
                    let mut after = self.reported.clone();
                    merge_patch(&mut after, &patch);
                    self.clear_on_sync
                        .iter()
                        .filter(|k| self.desired.get(*k).is_some_and(|w| after.get(*k).is_some_and(|h| same(h, w))))
                        .cloned()
                        .collect()
                };
                // The device's progress on the running install: it is alive, so the
                // watchdog starts again.
                let progress = self.install.as_ref().and_then(|j| match &j.phase {
                    crate::install::InstallPhase::Installing { command, .. } => {
                        let p = patch.get("apps")?.get(&j.app)?.get("progress")?.as_f64()?;
                        Some((j.clone(), *command, p.clamp(0.0, 100.0) as u8))
                    }
                    _ => None,
                });
                kinds.push(EventKind::Reported { patch });
                if let Some((job, command, p)) = progress {
                    let deadline = Timestamp(now.0.saturating_add(rules.install_deadline_ms));
                    let phase = crate::install::InstallPhase::Installing { command, deadline };
                    kinds.push(EventKind::InstallChanged {
                        job: crate::install::InstallJob { phase, progress: Some(p), ..*job },
                    });
                    effects.push(Effect::ArmWait { wait: WaitName::Install, attempt: 1, deadline });
                }
                if !settled.is_empty() {
                    kinds.push(EventKind::DesiredCleared { keys: settled });
                }
                if reaches_sync {
                    kinds.push(EventKind::InSync);
                    if self.waits.get(WaitName::DesiredSync).is_some() {
                        effects.push(Effect::CancelWait { wait: WaitName::DesiredSync });
                    }
                }
            }
            TwinCommand::SetDesired(_) => unreachable!("made a WriteDesired above"),
            TwinCommand::WriteDesired { patch, clear_on_sync, .. } => {
                if let (Some(model), Some(components)) = (rules.domain, patch.get("components")) {
                    let current = self.desired.get("components").cloned().unwrap_or_else(|| Value::Object(Map::new()));
                    let mut doc = Map::new();
                    doc.insert("components".into(), current);
                    let mut wrapper = Map::new();
                    wrapper.insert("components".into(), components.clone());
                    merge_patch(&mut doc, &wrapper);
                    let new = doc.remove("components").unwrap_or_else(|| Value::Object(Map::new()));
                    if !new.is_object() {
                        return Err(TwinError::Component(PathError::Invalid("components must be an object".into())));
                    }
                    let violations = model.validate(&new);
                    if !violations.is_empty() {
                        return Err(TwinError::Violations(violations));
                    }
                }
                let transient: Vec<String> = if clear_on_sync {
                    patch.iter().filter(|(_, v)| !v.is_null()).map(|(k, _)| k.clone()).collect()
                } else {
                    Vec::new()
                };
                self.desired_set(patch, now, rules, &mut kinds, &mut effects);
                if !transient.is_empty() {
                    kinds.push(EventKind::DesiredTransient { keys: transient });
                }
            }
            TwinCommand::UpdateMetadata(metadata) => kinds.push(EventKind::MetadataUpdated { metadata }),
            TwinCommand::ApplyTemplate { template, config } => {
                let ctx = crate::template::RenderContext {
                    twin: id.as_str(),
                    serial: &self.identity.serial,
                    mac: &self.identity.mac,
                    model: &self.identity.model,
                    device_type: self.identity.device_type.as_str(),
                    location: self.metadata.location.as_deref(),
                    tags: &self.metadata.tags,
                    attributes: &self.metadata.attributes,
                    config: &config,
                };
                let (value, values) = crate::template::render(&template.body, &ctx)?;
                limits::check_value(&value)?;
                let target = template.target.clone();
                let current = self.desired.get(&target);
                let recorded =
                    self.templates.get(&target).is_some_and(|a| a.version == template.version && a.values == values);
                if current != Some(&value) {
                    let change = match (current, &value) {
                        (Some(Value::Object(old)), Value::Object(new)) => Value::Object(merge_diff(old, new)),
                        _ => value.clone(),
                    };
                    let mut patch = Map::new();
                    patch.insert(target.clone(), change);
                    self.desired_set(patch, now, rules, &mut kinds, &mut effects);
                }
                if current != Some(&value) || !recorded {
                    kinds.push(EventKind::TemplateApplied { target, version: template.version, values });
                }
            }
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
            TwinCommand::Archive => {
                kinds.push(EventKind::Archived);
                effects.extend(self.waits.iter().map(|w| Effect::CancelWait { wait: w.wait }));
                effects.push(Effect::Snapshot);
            }
            TwinCommand::EditComponents { path, edit } => {
                let Some(model) = rules.domain else {
                    return Err(TwinError::Component(PathError::Invalid(format!(
                        "device type {} has no domain model",
                        self.identity.device_type
                    ))));
                };
                let current = self.desired.get("components").cloned().unwrap_or_else(|| Value::Object(Map::new()));
                let new = apply_edit(model, &current, &path, edit)?;
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
                    self.desired_set(patch, now, rules, &mut kinds, &mut effects);
                }
            }
            TwinCommand::Install { app, version, artifact_url, approval, window, rollout, uninstall } => {
                if let Some(j) = &self.install
                    && !j.phase.is_final()
                {
                    return Err(TwinError::Install(format!(
                        "twin {id} is installing {} {} ({}); one install at a time",
                        j.app,
                        j.version,
                        j.phase.name()
                    )));
                }
                let job = crate::install::InstallJob {
                    previous: self.apps.get(&app).cloned(),
                    app,
                    version,
                    artifact_url,
                    phase: crate::install::InstallPhase::AwaitingApproval,
                    requested_at: now,
                    window: window.as_ref().map(|w| w.text().to_string()),
                    rollout,
                    progress: None,
                    uninstall,
                };
                if approval {
                    kinds.push(EventKind::InstallChanged { job });
                } else {
                    self.install_step(job, window.as_ref(), now, rules, &mut kinds, &mut effects);
                }
            }
            TwinCommand::ApproveInstall { app } => match &self.install {
                Some(j) if j.app == app && j.phase == crate::install::InstallPhase::AwaitingApproval => {
                    let window = j.window.as_deref().and_then(|w| crate::install::MaintenanceWindow::parse(w).ok());
                    self.install_step((**j).clone(), window.as_ref(), now, rules, &mut kinds, &mut effects);
                }
                _ => return Err(TwinError::Install(format!("twin {id} has no install of {app} awaiting approval"))),
            },
            TwinCommand::SendToDevice(command) => {
                let command_id = self.commands.next_id();
                kinds.push(EventKind::CommandSent { command_id, command: command.kind(), body: command.body() });
                effects.push(Effect::Deliver { id: command_id, command });
            }
            TwinCommand::Ack { command_id, success, message } => match self.commands.matches(&command_id) {
                Ok(id) => {
                    let sync = self.waits.get(WaitName::DesiredSync).filter(|w| w.command == Some(id));
                    let refused = !success && sync.is_some();
                    let reason = if message.is_empty() { "the device refused it".to_string() } else { message.clone() };
                    kinds.push(EventKind::CommandAcked { command_id: id.to_string(), success, message });
                    if refused {
                        // The device refused the desired state: the keys it still lacks
                        // fail with its reason, and the sync stops retrying.
                        let reasons = delta(&self.desired, &self.reported)
                            .into_iter()
                            .map(|(k, _)| (k, reason.clone()))
                            .collect();
                        kinds.push(EventKind::DesiredFailed { reasons });
                        effects.push(Effect::CancelWait { wait: WaitName::DesiredSync });
                    }
                    if let Some(j) = &self.install
                        && matches!(j.phase, crate::install::InstallPhase::Installing { command, .. } if command == id)
                    {
                        let phase = if success {
                            crate::install::InstallPhase::Installed { at: now }
                        } else {
                            crate::install::InstallPhase::Failed { reason, at: now }
                        };
                        kinds.push(EventKind::InstallChanged {
                            job: crate::install::InstallJob { phase, ..(**j).clone() },
                        });
                        effects.push(Effect::CancelWait { wait: WaitName::Install });
                    }
                }
                Err(why) => return Err(TwinError::UnmatchedAck { command_id, why }),
            },
            TwinCommand::WaitExpired { wait, attempt } => match self.waits.get(wait) {
                // A timer of an attempt that is over (or of a wait that ended) is stale.
                Some(w) if w.attempt == attempt => match wait {
                    WaitName::DesiredSync => self.desired_sync_expired(*w, now, rules, &mut kinds, &mut effects),
                    WaitName::Install => self.install_expired(now, rules, &mut kinds, &mut effects),
                    // A supervisor's wait and a TDTA's; a twin never arms them.
                    WaitName::Restart | WaitName::Provisioning => {}
                },
                _ => {}
            },
            TwinCommand::Record(kind) => kinds.push(kind),
            TwinCommand::Resend => {
                let sync = self.waits.get(WaitName::DesiredSync);
                for p in &self.commands.pending {
                    let attempt = match p.kind {
                        // Only the desired state the sync still waits for (an older one
                        // is superseded by it).
                        CommandKind::ApplyDesired => match sync {
                            Some(w) if w.command == Some(p.id) => w.attempt,
                            _ => continue,
                        },
                        _ => 0,
                    };
                    let pending = if p.kind == CommandKind::ApplyDesired {
                        self.outstanding(&self.desired, &self.reported, None)
                    } else {
                        Map::new()
                    };
                    if let Some(command) = DeviceCommand::from_pending(p, &pending, attempt) {
                        effects.push(Effect::Deliver { id: p.id, command });
                    }
                }
            }
        }
        let events = kinds
            .into_iter()
            .enumerate()
            .map(|(i, kind)| TwinEvent { seq: self.last_seq + 1 + i as u64, at: now, kind })
            .collect();
        Ok(Decision { events, effects })
    }

    /// The desired state changes by `patch`: while the device does not report the
    /// result, the twin sends it and waits.
    fn desired_set(
        &self,
        patch: Map<String, Value>,
        now: Timestamp,
        rules: TwinRules<'_>,
        kinds: &mut Vec<EventKind>,
        effects: &mut Vec<Effect>,
    ) {
        let mut desired = self.desired.clone();
        merge_patch(&mut desired, &patch);
        let missing = self.outstanding(&desired, &self.reported, Some(&patch));
        if missing.is_empty() {
            if self.waits.get(WaitName::DesiredSync).is_some() {
                effects.push(Effect::CancelWait { wait: WaitName::DesiredSync });
            }
            kinds.push(EventKind::DesiredSet { patch, wait: None });
            return;
        }
        let id = self.commands.next_id();
        let deadline = rules.desired_sync.first_deadline(now);
        let wait = Wait { wait: WaitName::DesiredSync, attempt: 0, deadline, command: Some(id) };
        kinds.push(EventKind::DesiredSet { patch, wait: Some(wait) });
        effects.push(Effect::Deliver { id, command: DeviceCommand::ApplyDesired { desired: missing, attempt: 0 } });
        effects.push(Effect::ArmWait { wait: WaitName::DesiredSync, attempt: 0, deadline });
    }

    /// The device did not report the desired state in time: retry with backoff, or
    /// alert once the retries are used up.
    fn desired_sync_expired(
        &self,
        w: Wait,
        now: Timestamp,
        rules: TwinRules<'_>,
        kinds: &mut Vec<EventKind>,
        effects: &mut Vec<Effect>,
    ) {
        if self.outstanding(&self.desired, &self.reported, None).is_empty() {
            kinds.push(EventKind::InSync);
            return;
        }
        match rules.desired_sync.on_expiry(w.attempt, now) {
            WaitDecision::Retry { attempt, deadline } => {
                kinds.push(EventKind::WaitRetried { wait: w.wait, attempt, deadline });
                if let Some(id) = w.command {
                    let command = DeviceCommand::ApplyDesired {
                        desired: self.outstanding(&self.desired, &self.reported, None),
                        attempt,
                    };
                    effects.push(Effect::Deliver { id, command });
                }
                effects.push(Effect::ArmWait { wait: w.wait, attempt, deadline });
            }
            WaitDecision::Alert { attempts } => {
                let message = format!("twin {} did not report its desired state after {attempts} attempts", self.id());
                let why = format!("not reported after {attempts} attempts");
                let reasons = delta(&self.desired, &self.reported).into_iter().map(|(k, _)| (k, why.clone())).collect();
                kinds.push(EventKind::AlertRaised {
                    alert: AlertKind::DeadlineExceeded,
                    message: message.clone(),
                    wait: Some(w.wait),
                });
                kinds.push(EventKind::DesiredFailed { reasons });
                effects.push(Effect::RaiseAlert {
                    kind: AlertKind::DeadlineExceeded,
                    severity: Severity::Warning,
                    message,
                });
            }
        }
    }

    /// Moves an approved install on: to its maintenance window, or to the device.
    fn install_step(
        &self,
        mut job: crate::install::InstallJob,
        window: Option<&crate::install::MaintenanceWindow>,
        now: Timestamp,
        rules: TwinRules<'_>,
        kinds: &mut Vec<EventKind>,
        effects: &mut Vec<Effect>,
    ) {
        use crate::install::InstallPhase;
        let opens = window.map_or(now, |w| w.next_open(now));
        if opens > now {
            job.phase = InstallPhase::AwaitingWindow { opens };
            kinds.push(EventKind::InstallChanged { job });
            effects.push(Effect::ArmWait { wait: WaitName::Install, attempt: 0, deadline: opens });
            return;
        }
        let command_id = self.commands.next_id();
        let command = if job.uninstall {
            DeviceCommand::UninstallApp { app: job.app.clone() }
        } else {
            DeviceCommand::InstallApp {
                app: job.app.clone(),
                version: job.version.clone(),
                artifact_url: job.artifact_url.clone(),
            }
        };
        let deadline = Timestamp(now.0.saturating_add(rules.install_deadline_ms));
        kinds.push(EventKind::CommandSent { command_id, command: command.kind(), body: command.body() });
        job.phase = InstallPhase::Installing { command: command_id, deadline };
        kinds.push(EventKind::InstallChanged { job });
        effects.push(Effect::Deliver { id: command_id, command });
        effects.push(Effect::ArmWait { wait: WaitName::Install, attempt: 1, deadline });
    }

    /// The install's wait ran out: its window opened (send it), or the device did not
    /// answer in time (it failed).
    fn install_expired(
        &self,
        now: Timestamp,
        rules: TwinRules<'_>,
        kinds: &mut Vec<EventKind>,
        effects: &mut Vec<Effect>,
    ) {
        use crate::install::InstallPhase;
        let Some(job) = &self.install else { return };
        match &job.phase {
            // (A timer of an earlier deadline, re-armed since: stale.)
            InstallPhase::AwaitingWindow { opens } if now < *opens => {}
            InstallPhase::Installing { deadline, .. } if now < *deadline => {}
            InstallPhase::AwaitingWindow { .. } => {
                // The window is open now: no window to wait for again.
                self.install_step((**job).clone(), None, now, rules, kinds, effects);
            }
            InstallPhase::Installing { .. } => {
                let reason = format!("the device did not answer within {} s", rules.install_deadline_ms / 1000);
                let message = format!("twin {}: install of {} {} failed: {reason}", self.id(), job.app, job.version);
                kinds.push(EventKind::InstallChanged {
                    job: crate::install::InstallJob {
                        phase: InstallPhase::Failed { reason, at: now },
                        ..(**job).clone()
                    },
                });
                effects.push(Effect::RaiseAlert {
                    kind: AlertKind::DeadlineExceeded,
                    severity: Severity::Warning,
                    message,
                });
            }
            _ => {}
        }
    }

    /// Applies one event. Events come from `decide` or from the journal, so they are
    /// trusted: applying never fails.
    pub fn evolve(&mut self, event: &TwinEvent) {
        match &event.kind {
            EventKind::Reported { patch } => {
                merge_patch(&mut self.reported, patch);
                if !self.desired_failed.is_empty() {
                    let (desired, reported) = (&self.desired, &self.reported);
                    self.desired_failed
                        .retain(|k, _| !desired.get(k).is_some_and(|w| reported.get(k).is_some_and(|h| same(h, w))));
                }
            }
            EventKind::DesiredSet { patch, wait } => {
                merge_patch(&mut self.desired, patch);
                // A new write of a key tries it again; a removed key is no longer awaited.
                for (k, v) in patch {
                    self.desired_failed.remove(k);
                    if v.is_null() {
                        self.clear_on_sync.remove(k);
                    }
                }
                match wait {
                    Some(w) => {
                        if let Some(id) = w.command {
                            // The new desired state supersedes what earlier ones asked.
                            self.commands.superseded(CommandKind::ApplyDesired);
                            self.commands.sent(id, CommandKind::ApplyDesired, Map::new(), event.at);
                        }
                        self.waits.arm(*w);
                    }
                    None => {
                        self.waits.cancel(WaitName::DesiredSync);
                    }
                }
            }
            EventKind::MetadataUpdated { metadata } => self.metadata = metadata.clone(),
            EventKind::OverridesSet { patch } => merge_patch(&mut self.overrides, patch),
            EventKind::JoinedDta { dta } => {
                if !self.memberships.contains(dta) {
                    self.memberships.push(dta.clone());
                }
            }
            EventKind::LeftDta { dta } => self.memberships.retain(|d| d != dta),
            EventKind::Archived => {
                self.lifecycle = Lifecycle::Archived;
                self.waits = Waits::default();
            }
            EventKind::WaitRetried { wait, attempt, deadline } => {
                if let Some(w) = self.waits.get(*wait).copied() {
                    self.waits.arm(Wait { attempt: *attempt, deadline: *deadline, ..w });
                }
            }
            EventKind::InSync => {
                self.waits.cancel(WaitName::DesiredSync);
            }
            EventKind::CommandSent { command_id, command, body } => {
                self.commands.sent(*command_id, *command, body.clone(), event.at)
            }
            EventKind::CommandAcked { command_id, .. } => {
                if let Ok(id) = command_id.parse() {
                    self.commands.acked(id);
                }
            }
            EventKind::RulePhase { rule, phase } => {
                if *phase == crate::rules::Phase::Ok {
                    self.rules.remove(rule);
                } else {
                    self.rules.insert(rule.clone(), *phase);
                }
            }
            EventKind::AlertRaised { wait, .. } => {
                if let Some(w) = wait {
                    self.waits.cancel(*w);
                }
            }
            EventKind::DesiredFailed { reasons } => {
                self.desired_failed.extend(reasons.iter().map(|(k, v)| (k.clone(), v.clone())));
                self.waits.cancel(WaitName::DesiredSync);
            }
            EventKind::DesiredCleared { keys } => {
                for k in keys {
                    self.desired.remove(k);
                    self.clear_on_sync.remove(k);
                    self.desired_failed.remove(k);
                }
            }
            EventKind::DesiredTransient { keys } => self.clear_on_sync.extend(keys.iter().cloned()),
            EventKind::InstallChanged { job } => {
                use crate::install::InstallPhase;
                match &job.phase {
                    InstallPhase::AwaitingWindow { opens } => {
                        self.waits.arm(Wait { wait: WaitName::Install, attempt: 0, deadline: *opens, command: None })
                    }
                    InstallPhase::Installing { command, deadline } => self.waits.arm(Wait {
                        wait: WaitName::Install,
                        attempt: 1,
                        deadline: *deadline,
                        command: Some(*command),
                    }),
                    InstallPhase::Installed { .. } if job.uninstall => {
                        self.apps.remove(&job.app);
                        self.waits.cancel(WaitName::Install);
                    }
                    InstallPhase::Installed { .. } => {
                        self.apps.insert(job.app.clone(), job.version.clone());
                        self.waits.cancel(WaitName::Install);
                    }
                    InstallPhase::Failed { .. } | InstallPhase::AwaitingApproval => {
                        self.waits.cancel(WaitName::Install);
                    }
                }
                self.install = Some(Box::new(job.clone()));
            }
            EventKind::TemplateApplied { target, version, values } => {
                let applied = crate::template::AppliedTemplate { version: *version, values: values.clone() };
                self.templates.insert(target.clone(), applied);
            }
            EventKind::Created | EventKind::Restarted { .. } => {}
        }
        self.last_seq = self.last_seq.max(event.seq);
        self.updated_at = self.updated_at.max(event.at);
    }

    /// True when every desired value is reported as such.
    pub fn in_sync(&self) -> bool {
        covers(&self.reported, &self.desired)
    }

    /// What the device does not report yet of the desired state.
    pub fn delta(&self) -> Map<String, Value> {
        delta(&self.desired, &self.reported)
    }

    /// What a sync sends of `desired` against `reported`: the delta without the keys
    /// that failed, unless `patch` writes them again.
    fn outstanding(
        &self,
        desired: &Map<String, Value>,
        reported: &Map<String, Value>,
        patch: Option<&Map<String, Value>>,
    ) -> Map<String, Value> {
        let mut d = delta(desired, reported);
        if !self.desired_failed.is_empty() {
            d.retain(|k, _| !self.desired_failed.contains_key(k) || patch.is_some_and(|p| p.contains_key(k)));
        }
        d
    }

    /// Where each top-level key of the desired state stands.
    pub fn desired_status(&self) -> std::collections::BTreeMap<String, KeyStatus> {
        let sync = self.waits.get(WaitName::DesiredSync);
        self.desired
            .iter()
            .map(|(k, want)| {
                let have = self.reported.get(k);
                let state = if have.is_some_and(|h| same(h, want)) {
                    KeyState::InSync
                } else if let Some(reason) = self.desired_failed.get(k) {
                    KeyState::Failed { reason: reason.clone() }
                } else {
                    KeyState::Pending { attempt: sync.map(|w| w.attempt), deadline: sync.map(|w| w.deadline) }
                };
                let status = KeyStatus {
                    state,
                    desired: want.clone(),
                    reported: have.cloned(),
                    clear_on_sync: self.clear_on_sync.contains(k),
                };
                (k.clone(), status)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Backoff;
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

    const SYNC: RetryPolicy = RetryPolicy {
        deadline_ms: 1_000,
        max_retries: 2,
        backoff: Backoff { initial_ms: 500, factor: 2, max_ms: 10_000 },
    };

    fn rules() -> TwinRules<'static> {
        TwinRules { desired_sync: &SYNC, install_deadline_ms: 60_000, domain: None, metrics: None }
    }

    /// decide + evolve, as the actor does; returns the decision.
    fn run(s: &mut TwinState, cmd: TwinCommand, now: i64) -> Decision<TwinEvent> {
        let d = s.decide(cmd, Timestamp(now), rules()).unwrap();
        d.events.iter().for_each(|e| s.evolve(e));
        d
    }

    fn step(s: &mut TwinState, cmd: TwinCommand, now: i64) -> Vec<TwinEvent> {
        run(s, cmd, now).events
    }

    fn expire(s: &mut TwinState, now: i64) -> Decision<TwinEvent> {
        let attempt = s.waits.get(WaitName::DesiredSync).expect("an armed wait").attempt;
        run(s, TwinCommand::WaitExpired { wait: WaitName::DesiredSync, attempt }, now)
    }

    fn ack(id: &str) -> TwinCommand {
        TwinCommand::Ack { command_id: id.into(), success: true, message: String::new() }
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
        assert!(matches!(
            s.decide(TwinCommand::JoinDta(dta), Timestamp(2), rules()),
            Err(TwinError::AlreadyMember { .. })
        ));
        assert_eq!(s.decide(TwinCommand::Report(Map::new()), Timestamp(2), rules()), Err(TwinError::EmptyPatch));
        step(&mut s, TwinCommand::Archive, 3);
        assert!(matches!(
            s.decide(TwinCommand::SetDesired(obj(json!({"a": 1}))), Timestamp(4), rules()),
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
        journal.extend(step(&mut s, TwinCommand::SetDesired(obj(json!({"a": {"c": 3}}))), 4));
        journal.extend(expire(&mut s, 1_004).events);
        journal.extend(step(&mut s, ack("1"), 1_005));
        let mut replayed = twin();
        journal.iter().for_each(|e| replayed.evolve(e));
        assert_eq!(replayed, s);
        let text = serde_json::to_string(&journal[0]).unwrap();
        assert_eq!(text, r#"{"seq":1,"at":1,"event":"reported","patch":{"a":{"b":1}}}"#);
    }

    // The desired-state machine, on inputs alone.

    #[test]
    fn a_desired_state_not_reported_yet_is_sent_and_waited_for() {
        let mut s = twin();
        let d = run(&mut s, TwinCommand::SetDesired(obj(json!({"open": true}))), 100);
        let wait =
            Wait { wait: WaitName::DesiredSync, attempt: 0, deadline: Timestamp(1_100), command: Some(CommandId(1)) };
        assert_eq!(d.events[0].kind, EventKind::DesiredSet { patch: obj(json!({"open": true})), wait: Some(wait) });
        assert_eq!(
            d.effects,
            vec![
                Effect::Deliver {
                    id: CommandId(1),
                    command: DeviceCommand::ApplyDesired { desired: obj(json!({"open": true})), attempt: 0 }
                },
                Effect::ArmWait { wait: WaitName::DesiredSync, attempt: 0, deadline: Timestamp(1_100) },
            ]
        );
        assert_eq!(s.waits.get(WaitName::DesiredSync), Some(&wait));
        assert_eq!(s.commands.pending.len(), 1);
    }

    #[test]
    fn a_desired_state_already_reported_needs_no_command() {
        let mut s = twin();
        step(&mut s, TwinCommand::Report(obj(json!({"open": true}))), 1);
        let d = run(&mut s, TwinCommand::SetDesired(obj(json!({"open": true}))), 2);
        assert_eq!(d.events.len(), 1);
        assert!(d.effects.is_empty(), "{:?}", d.effects);
        assert!(s.waits.is_empty() && s.commands.is_empty());
    }

    #[test]
    fn a_wait_retries_with_backoff_then_alerts_and_stale_timers_do_nothing() {
        let mut s = twin();
        run(&mut s, TwinCommand::SetDesired(obj(json!({"open": true}))), 0);
        let d = expire(&mut s, 1_000);
        assert_eq!(
            d.events[0].kind,
            EventKind::WaitRetried { wait: WaitName::DesiredSync, attempt: 1, deadline: Timestamp(2_500) }
        );
        assert_eq!(
            d.effects,
            vec![
                Effect::Deliver {
                    id: CommandId(1),
                    command: DeviceCommand::ApplyDesired { desired: obj(json!({"open": true})), attempt: 1 }
                },
                Effect::ArmWait { wait: WaitName::DesiredSync, attempt: 1, deadline: Timestamp(2_500) },
            ],
            "a retry re-sends the same command"
        );
        // The timer of attempt 0 firing late is stale.
        let late = run(&mut s, TwinCommand::WaitExpired { wait: WaitName::DesiredSync, attempt: 0 }, 2_000);
        assert_eq!(late, Decision::default());
        let d = expire(&mut s, 2_500);
        assert!(matches!(d.events[0].kind, EventKind::WaitRetried { attempt: 2, deadline: Timestamp(4_500), .. }));
        let d = expire(&mut s, 4_500);
        assert!(matches!(
            &d.events[0].kind,
            EventKind::AlertRaised { alert: AlertKind::DeadlineExceeded, wait: Some(WaitName::DesiredSync), .. }
        ));
        let [Effect::RaiseAlert { kind: AlertKind::DeadlineExceeded, severity: Severity::Warning, message }] =
            &d.effects[..]
        else {
            panic!("{:?}", d.effects)
        };
        assert!(message.contains("after 3 attempts"), "{message}");
        assert!(s.waits.is_empty(), "the wait ends with the alert");
        assert_eq!(
            run(&mut s, TwinCommand::WaitExpired { wait: WaitName::DesiredSync, attempt: 2 }, 9_000),
            Decision::default()
        );
    }

    #[test]
    fn reporting_the_desired_state_cancels_the_wait_and_the_ack_still_matches() {
        let mut s = twin();
        run(&mut s, TwinCommand::SetDesired(obj(json!({"open": true}))), 0);
        let d = run(&mut s, TwinCommand::Report(obj(json!({"open": true}))), 10);
        assert_eq!(d.events[1].kind, EventKind::InSync);
        assert_eq!(d.effects, vec![Effect::CancelWait { wait: WaitName::DesiredSync }]);
        assert!(s.waits.is_empty());
        let d = run(&mut s, ack("1"), 20);
        assert!(
            matches!(&d.events[0].kind, EventKind::CommandAcked { command_id, success: true, .. } if command_id == "1")
        );
        assert!(s.commands.pending.is_empty());
    }

    #[test]
    fn a_new_desired_state_supersedes_the_wait_with_a_new_command() {
        let mut s = twin();
        run(&mut s, TwinCommand::SetDesired(obj(json!({"a": 1}))), 0);
        expire(&mut s, 1_000);
        let d = run(&mut s, TwinCommand::SetDesired(obj(json!({"b": 2}))), 1_200);
        assert!(
            matches!(&d.effects[0], Effect::Deliver { id: CommandId(2), command: DeviceCommand::ApplyDesired { desired, attempt: 0 } } if desired == &obj(json!({"a": 1, "b": 2})))
        );
        assert_eq!(s.waits.get(WaitName::DesiredSync).map(|w| (w.attempt, w.command)), Some((0, Some(CommandId(2)))));
        // Clearing the desired state ends the wait.
        let d = run(&mut s, TwinCommand::SetDesired(obj(json!({"a": null, "b": null}))), 1_300);
        assert_eq!(d.effects, vec![Effect::CancelWait { wait: WaitName::DesiredSync }]);
        assert!(s.waits.is_empty());
    }

    #[test]
    fn acks_are_matched_by_the_ids_the_twin_minted() {
        let mut s = twin();
        let install = DeviceCommand::InstallApp { app: "a".into(), version: "1".into(), artifact_url: "u".into() };
        let d = run(&mut s, TwinCommand::SendToDevice(install.clone()), 1);
        assert_eq!(d.effects, vec![Effect::Deliver { id: CommandId(1), command: install }]);
        let unknown = s.decide(ack("2"), Timestamp(2), rules());
        assert_eq!(unknown, Err(TwinError::UnmatchedAck { command_id: "2".into(), why: Unmatched::Unknown }));
        run(&mut s, ack("1"), 3);
        let stale = s.decide(ack("1"), Timestamp(4), rules());
        assert_eq!(stale, Err(TwinError::UnmatchedAck { command_id: "1".into(), why: Unmatched::Stale }));
        // Acks are accepted on an archived twin; new commands are not.
        let d =
            run(&mut s, TwinCommand::SendToDevice(DeviceCommand::SetConfiguration { configuration: Map::new() }), 5);
        assert!(matches!(d.effects[0], Effect::Deliver { id: CommandId(2), .. }));
        run(&mut s, TwinCommand::Archive, 6);
        run(&mut s, ack("2"), 7);
        assert!(matches!(
            s.decide(
                TwinCommand::SendToDevice(DeviceCommand::SetConfiguration { configuration: Map::new() }),
                Timestamp(8),
                rules()
            ),
            Err(TwinError::Archived(_))
        ));
    }

    #[test]
    fn a_reconnecting_device_is_sent_only_what_it_has_not_answered() {
        let mut s = twin();
        let install = DeviceCommand::InstallApp { app: "a".into(), version: "1".into(), artifact_url: "u".into() };
        let config = DeviceCommand::SetConfiguration { configuration: obj(json!({"rate": 5})) };
        run(&mut s, TwinCommand::SendToDevice(install.clone()), 1); // id 1
        run(&mut s, TwinCommand::SendToDevice(config.clone()), 2); // id 2
        run(&mut s, TwinCommand::SetDesired(obj(json!({"open": true}))), 3); // id 3
        run(&mut s, TwinCommand::SetDesired(obj(json!({"speed": 2}))), 4); // id 4 supersedes 3
        run(&mut s, ack("2"), 5);
        let d = run(&mut s, TwinCommand::Resend, 6);
        assert!(d.events.is_empty(), "resending records nothing");
        let desired = DeviceCommand::ApplyDesired { desired: obj(json!({"open": true, "speed": 2})), attempt: 0 };
        assert_eq!(
            d.effects,
            vec![
                Effect::Deliver { id: CommandId(1), command: install },
                Effect::Deliver { id: CommandId(4), command: desired },
            ]
        );
        // Once answered and in sync, nothing is left to send.
        run(&mut s, ack("1"), 7);
        run(&mut s, TwinCommand::Report(obj(json!({"open": true, "speed": 2}))), 8);
        assert_eq!(run(&mut s, TwinCommand::Resend, 9).effects, vec![]);
    }

    #[test]
    fn documents_nested_too_deep_are_refused_before_anything_changes() {
        let mut deep = json!(1);
        for _ in 0..crate::MAX_DEPTH {
            deep = json!({ "x": deep });
        }
        let s = twin();
        for cmd in [
            TwinCommand::Report(obj(json!({ "a": deep }))),
            TwinCommand::SetDesired(obj(json!({ "a": deep }))),
            TwinCommand::SetOverrides(obj(json!({ "a": deep }))),
        ] {
            assert_eq!(s.decide(cmd, Timestamp(1), rules()), Err(TwinError::Document(DocumentError::TooDeep)));
        }
        assert!(s.decide(TwinCommand::Report(obj(deep)), Timestamp(1), rules()).is_ok(), "exactly the limit is fine");
    }

    #[test]
    fn archiving_cancels_every_wait() {
        let mut s = twin();
        run(&mut s, TwinCommand::SetDesired(obj(json!({"a": 1}))), 0);
        let d = run(&mut s, TwinCommand::Archive, 1);
        assert_eq!(d.effects, vec![Effect::CancelWait { wait: WaitName::DesiredSync }, Effect::Snapshot]);
        assert!(s.waits.is_empty());
        assert_eq!(
            run(&mut s, TwinCommand::WaitExpired { wait: WaitName::DesiredSync, attempt: 0 }, 1_000),
            Decision::default()
        );
    }

    #[test]
    fn a_restarted_twin_rearms_its_waits_from_the_stored_state() {
        let mut s = twin();
        run(&mut s, TwinCommand::SetDesired(obj(json!({"a": 1}))), 0);
        expire(&mut s, 1_000);
        let stored: TwinState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(stored, s);
        assert_eq!(
            stored.waits.rearm(),
            vec![Effect::ArmWait { wait: WaitName::DesiredSync, attempt: 1, deadline: Timestamp(2_500) }]
        );
        // The retry after the restart sends the same command id.
        let mut s = stored;
        let d = expire(&mut s, 2_600);
        assert!(matches!(
            d.effects[0],
            Effect::Deliver { id: CommandId(1), command: DeviceCommand::ApplyDesired { attempt: 2, .. } }
        ));
    }

    /// The desired state a decision delivers, if any.
    fn sent(d: &Decision<TwinEvent>) -> Option<Map<String, Value>> {
        d.effects.iter().find_map(|e| match e {
            Effect::Deliver { command: DeviceCommand::ApplyDesired { desired, .. }, .. } => Some(desired.clone()),
            _ => None,
        })
    }

    fn state_of(s: &TwinState, key: &str) -> KeyState {
        s.desired_status()[key].state.clone()
    }

    #[test]
    fn only_the_delta_is_sent_and_a_retry_or_resend_carries_only_what_is_still_missing() {
        let mut s = twin();
        step(&mut s, TwinCommand::Report(obj(json!({"rate": 5, "net": {"ssid": "lab", "ch": 1}}))), 1);
        let d = run(&mut s, TwinCommand::SetDesired(obj(json!({"rate": 5, "net": {"ch": 6}, "mode": "eco"}))), 2);
        assert_eq!(sent(&d), Some(obj(json!({"net": {"ch": 6}, "mode": "eco"}))));
        assert_eq!(state_of(&s, "rate"), KeyState::InSync);
        assert_eq!(state_of(&s, "mode"), KeyState::Pending { attempt: Some(0), deadline: Some(Timestamp(1_002)) });
        step(&mut s, TwinCommand::Report(obj(json!({"mode": "eco"}))), 3);
        assert_eq!(s.delta(), obj(json!({"net": {"ch": 6}})));
        assert_eq!(sent(&expire(&mut s, 1_002)), Some(obj(json!({"net": {"ch": 6}}))), "the retry");
        assert_eq!(sent(&run(&mut s, TwinCommand::Resend, 1_100)), Some(obj(json!({"net": {"ch": 6}}))), "the resend");
        let evs = step(&mut s, TwinCommand::Report(obj(json!({"net": {"ch": 6}}))), 1_200);
        assert_eq!(evs.last().unwrap().kind, EventKind::InSync);
        assert!(s.desired_status().values().all(|k| k.state == KeyState::InSync));
    }

    #[test]
    fn a_refusal_fails_the_keys_with_the_devices_reason_until_written_again() {
        let mut s = twin();
        run(&mut s, TwinCommand::SetDesired(obj(json!({"fw": "9.9", "led": "on"}))), 0);
        step(&mut s, TwinCommand::Report(obj(json!({"led": "on"}))), 1);
        let d = run(
            &mut s,
            TwinCommand::Ack { command_id: "1".into(), success: false, message: "no space for fw".into() },
            2,
        );
        assert!(d.effects.contains(&Effect::CancelWait { wait: WaitName::DesiredSync }), "{:?}", d.effects);
        assert_eq!(state_of(&s, "fw"), KeyState::Failed { reason: "no space for fw".into() });
        assert_eq!(state_of(&s, "led"), KeyState::InSync);
        assert!(s.waits.is_empty(), "no more retries");
        // Another key's write does not send the failed one again.
        let d = run(&mut s, TwinCommand::SetDesired(obj(json!({"rate": 2}))), 3);
        assert_eq!(sent(&d), Some(obj(json!({"rate": 2}))));
        let evs = step(&mut s, TwinCommand::Report(obj(json!({"rate": 2}))), 4);
        assert_eq!(evs.last().unwrap().kind, EventKind::InSync, "nothing but the failed key is missing");
        assert_eq!(state_of(&s, "fw"), KeyState::Failed { reason: "no space for fw".into() });
        // Written again, it is tried again; reported, it settles.
        let d = run(&mut s, TwinCommand::SetDesired(obj(json!({"fw": "9.9"}))), 5);
        assert_eq!(sent(&d), Some(obj(json!({"fw": "9.9"}))));
        assert!(matches!(state_of(&s, "fw"), KeyState::Pending { .. }));
        step(&mut s, TwinCommand::Report(obj(json!({"fw": "9.9"}))), 6);
        assert!(s.desired_failed.is_empty() && s.in_sync());
    }

    #[test]
    fn retries_used_up_fail_the_missing_keys() {
        let mut s = twin();
        run(&mut s, TwinCommand::SetDesired(obj(json!({"open": true}))), 0);
        expire(&mut s, 1_000);
        expire(&mut s, 2_500);
        let d = expire(&mut s, 5_000);
        assert!(d.events.iter().any(|e| matches!(e.kind, EventKind::DesiredFailed { .. })), "{:?}", d.events);
        assert_eq!(state_of(&s, "open"), KeyState::Failed { reason: "not reported after 3 attempts".into() });
    }

    #[test]
    fn a_key_written_with_clear_on_sync_leaves_the_desired_state_once_reported() {
        let mut s = twin();
        let write = |patch: Value, clear: bool| TwinCommand::WriteDesired {
            patch: obj(patch),
            if_version: None,
            clear_on_sync: clear,
        };
        run(&mut s, write(json!({"reboot": true}), true), 1);
        run(&mut s, write(json!({"rate": 3}), false), 2);
        assert!(s.desired_status()["reboot"].clear_on_sync);
        let evs = step(&mut s, TwinCommand::Report(obj(json!({"reboot": true, "rate": 3}))), 3);
        assert!(evs.iter().any(|e| e.kind == EventKind::DesiredCleared { keys: vec!["reboot".into()] }), "{evs:?}");
        assert_eq!(s.desired, obj(json!({"rate": 3})), "the key is gone, the other stays");
        assert!(s.clear_on_sync.is_empty() && s.in_sync());
    }

    #[test]
    fn a_conditional_write_at_another_version_changes_nothing() {
        let mut s = twin();
        step(&mut s, TwinCommand::Report(obj(json!({"a": 1}))), 1);
        let v = s.last_seq;
        let stale =
            TwinCommand::WriteDesired { patch: obj(json!({"a": 2})), if_version: Some(v - 1), clear_on_sync: false };
        assert_eq!(
            s.decide(stale, Timestamp(2), rules()),
            Err(TwinError::VersionMismatch { twin: s.id().clone(), expected: v - 1, current: v })
        );
        let fresh =
            TwinCommand::WriteDesired { patch: obj(json!({"a": 2})), if_version: Some(v), clear_on_sync: false };
        run(&mut s, fresh, 3);
        assert_eq!(s.desired, obj(json!({"a": 2})));
    }

    fn install(approval: bool, window: Option<&str>) -> TwinCommand {
        TwinCommand::Install {
            app: "blink".into(),
            version: "1.1.0".into(),
            artifact_url: "/api/v1/artifacts/ab".into(),
            approval,
            window: window.map(|w| crate::install::MaintenanceWindow::parse(w).unwrap()),
            rollout: None,
            uninstall: false,
        }
    }

    #[test]
    fn progress_reports_keep_an_install_alive_and_show() {
        use crate::install::InstallPhase;
        let mut s = twin();
        run(&mut s, install(false, None), 0);
        let d = run(
            &mut s,
            TwinCommand::Report(obj(json!({"apps": {"blink": {"state": "downloading", "progress": 40}}}))),
            50_000,
        );
        assert_eq!(s.install.as_ref().unwrap().progress, Some(40));
        assert!(matches!(phase(&s), InstallPhase::Installing { deadline, .. } if deadline == Timestamp(110_000)));
        assert!(d.effects.contains(&Effect::ArmWait {
            wait: WaitName::Install,
            attempt: 1,
            deadline: Timestamp(110_000)
        }));
        // The first deadline has passed; its timer is stale for the new one.
        run(&mut s, TwinCommand::WaitExpired { wait: WaitName::Install, attempt: 1 }, 60_000);
        assert!(matches!(phase(&s), InstallPhase::Installing { .. }), "{:?}", phase(&s));
    }

    fn phase(s: &TwinState) -> crate::install::InstallPhase {
        s.install.as_ref().unwrap().phase.clone()
    }

    #[test]
    fn an_install_waits_for_approval_then_its_window_then_the_devices_answer() {
        use crate::install::InstallPhase;
        let mut s = twin();
        // 2026-01-14 12:00 UTC, a Wednesday; the window opens at 21:00 UTC (22:00 CET).
        let noon = 1_768_392_000_000;
        let opens = noon + 9 * 3_600_000;
        let d = run(&mut s, install(true, Some("22:00-05:00 Europe/Berlin weekdays")), noon);
        assert_eq!(phase(&s), InstallPhase::AwaitingApproval);
        assert!(d.effects.is_empty(), "nothing sent before approval: {:?}", d.effects);
        assert!(
            matches!(s.decide(install(false, None), Timestamp(noon), rules()), Err(TwinError::Install(_))),
            "one at a time"
        );
        let d = run(&mut s, TwinCommand::ApproveInstall { app: "blink".into() }, noon + 1);
        assert_eq!(phase(&s), InstallPhase::AwaitingWindow { opens: Timestamp(opens) });
        assert_eq!(
            d.effects,
            vec![Effect::ArmWait { wait: WaitName::Install, attempt: 0, deadline: Timestamp(opens) }]
        );
        let d = run(&mut s, TwinCommand::WaitExpired { wait: WaitName::Install, attempt: 0 }, opens);
        let InstallPhase::Installing { command, .. } = phase(&s) else { panic!("{:?}", phase(&s)) };
        assert!(d.effects.iter().any(|e| matches!(e, Effect::Deliver { command: DeviceCommand::InstallApp { version, .. }, .. } if version == "1.1.0")));
        run(
            &mut s,
            TwinCommand::Ack { command_id: command.to_string(), success: true, message: String::new() },
            opens + 5,
        );
        assert_eq!(phase(&s), InstallPhase::Installed { at: Timestamp(opens + 5) });
        assert_eq!(s.apps.get("blink").map(String::as_str), Some("1.1.0"), "the inventory");
        assert!(s.waits.get(WaitName::Install).is_none());
    }

    #[test]
    fn an_install_fails_on_a_refusal_or_when_the_device_does_not_answer() {
        use crate::install::InstallPhase;
        let mut s = twin();
        run(&mut s, install(false, None), 10);
        let InstallPhase::Installing { command, deadline } = phase(&s) else { panic!() };
        assert_eq!(deadline, Timestamp(60_010));
        run(
            &mut s,
            TwinCommand::Ack { command_id: command.to_string(), success: false, message: "checksum mismatch".into() },
            20,
        );
        assert_eq!(phase(&s), InstallPhase::Failed { reason: "checksum mismatch".into(), at: Timestamp(20) });
        assert!(s.apps.is_empty());
        run(&mut s, install(false, None), 30);
        let d = run(&mut s, TwinCommand::WaitExpired { wait: WaitName::Install, attempt: 1 }, 60_030);
        assert!(matches!(phase(&s), InstallPhase::Failed { reason, .. } if reason.contains("did not answer")));
        assert!(d.effects.iter().any(|e| matches!(e, Effect::RaiseAlert { .. })));
        // A stale timer of the window phase does nothing.
        let before = s.clone();
        run(&mut s, TwinCommand::WaitExpired { wait: WaitName::Install, attempt: 0 }, 70_000);
        assert_eq!(s, before);
    }
}
