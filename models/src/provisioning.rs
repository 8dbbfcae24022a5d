//! Provisioning processes (Maree et al. 2024, sections 4.4, 5 and 7.6): a device type's
//! onboarding is a state machine declared in its model file, and its TDTA runs one
//! instance per device. Pure: [`ProcessSpec`] is the declared machine, checked once at
//! load ([`ProcessSpec::validate`] names whatever it does not know); [`Provisioning`] is
//! one device's instance, whose [`Provisioning::decide`] answers an input with the
//! events to journal and the effects to carry out ([`ProvisionEffect`]: run a step, arm
//! or cancel the step's deadline, raise an alert), and whose [`Provisioning::evolve`]
//! applies an event. The step log (every transition with time, actor and outcome) is
//! part of the instance, so it lives in the twin.
//!
//! A state may run a [`Step`] when it is entered (the platform's action: check the
//! identity, create the twin, issue credentials, …, or wait for a human or the device),
//! and leaves on one of the [`Input`]s its `on` table names: the step's `done` or
//! `failed`, an operator's `approved` or `rejected`, the device's `confirmed`, or
//! `timeout` once the step's retries are used up. A transition may carry a guard on the
//! facts of the claim (mode, allow-list). A state without `on` is final.

use crate::alert::{AlertKind, Severity};
use crate::effect::{Effect, WaitName};
use crate::policy::{RetryPolicy, WaitDecision};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What the platform does when a state is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Step {
    /// The identity manager: serial, MAC and model consistent with what is known.
    CheckIdentity,
    /// A human decides (`approved` / `rejected`); reminders go to the alert sink.
    AwaitApproval,
    /// Create the device's twin (with its identity and the step's log entry, in one batch).
    CreateTwin,
    /// Issue unique credentials and register them with the chosen operational gateway.
    IssueCredentials,
    /// Apply the type's (and groups') configuration to the new twin.
    ApplyConfiguration,
    /// Request the type's baseline apps (a recorded request until app management).
    RequestApps,
    /// Wait for the device to connect to the operational gateway and confirm.
    AwaitConfirmation,
    /// Remove the claim-phase (transient) credentials.
    RemoveClaim,
}

impl Step {
    /// Steps that wait for someone outside the platform rather than act.
    pub fn waits_outside(self) -> bool {
        matches!(self, Step::AwaitApproval | Step::AwaitConfirmation)
    }
}

/// What moves a process on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Input {
    /// The state's step succeeded.
    Done,
    /// The state's step failed for good (e.g. the identity does not match).
    Failed,
    Approved,
    Rejected,
    /// The device confirmed on its operational gateway.
    Confirmed,
    /// The state's step ran past its deadline and every retry.
    Timeout,
}

/// How a device type onboards devices (overridable per batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Mode {
    /// Devices on an allow-list or in a pre-registered batch go through alone; others
    /// wait for an operator.
    #[default]
    Automatic,
    /// Every device waits for an operator.
    SemiAutomatic,
    /// An operator registers the device and hands its credentials over out of band.
    Manual,
}

/// A condition on the claim's facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Guard {
    /// The mode is automatic and the device is allow-listed or pre-registered.
    PreApproved,
    /// The mode is semi-automatic, or the device is not pre-approved.
    NeedsApproval,
}

/// What a guard looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Facts {
    pub mode: Mode,
    /// On the type's allow-list or in a pre-registered batch.
    pub pre_registered: bool,
}

impl Guard {
    pub fn holds(self, f: &Facts) -> bool {
        let pre = f.mode == Mode::Automatic && f.pre_registered;
        match self {
            Guard::PreApproved => pre,
            Guard::NeedsApproval => !pre,
        }
    }
}

/// One way out of a state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Transition {
    pub to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<Guard>,
}

/// The transitions of one input: a target, or targets tried in order (the first whose
/// guard holds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Targets {
    To(String),
    Choose(Vec<Transition>),
}

impl Targets {
    fn all(&self) -> Vec<&str> {
        match self {
            Targets::To(s) => vec![s.as_str()],
            Targets::Choose(v) => v.iter().map(|t| t.to.as_str()).collect(),
        }
    }

    fn pick(&self, facts: &Facts) -> Option<&str> {
        match self {
            Targets::To(s) => Some(s),
            Targets::Choose(v) => v.iter().find(|t| t.guard.is_none_or(|g| g.holds(facts))).map(|t| t.to.as_str()),
        }
    }
}

/// One state of a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StateSpec {
    /// Run on entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<Step>,
    /// Where each input leads. None: a final state.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub on: BTreeMap<Input, Targets>,
    /// The step's deadline and retries (default: `RetryPolicy::default()`; for a
    /// human's approval, `deadline_ms` is the reminder period).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    /// Whether a human must act here (any step may be marked; `await_approval` always
    /// is).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub human: bool,
    /// A final state's outcome (`operational`, `refused`, …); default: the state's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

/// A state's deadline and retries, as written in a model file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RetrySpec {
    pub deadline_ms: u64,
    #[serde(default)]
    pub max_retries: u32,
    /// Extra delay before the first retry, doubled for each next one (capped at 10×).
    #[serde(default)]
    pub backoff_ms: u64,
}

impl RetrySpec {
    fn policy(self) -> RetryPolicy {
        RetryPolicy {
            deadline_ms: self.deadline_ms,
            max_retries: self.max_retries,
            backoff: crate::policy::Backoff {
                initial_ms: self.backoff_ms,
                factor: 2,
                max_ms: self.backoff_ms.saturating_mul(10),
            },
        }
    }
}

/// A provisioning process: its states, the one it starts in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProcessSpec {
    pub initial: String,
    pub states: BTreeMap<String, StateSpec>,
}

/// Why a process declaration is refused at load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProcessError {
    #[error("the initial state {0:?} is not declared")]
    UnknownInitial(String),
    #[error("state {from:?}: on {input:?} leads to {to:?}, which is not declared")]
    UnknownTarget { from: String, input: &'static str, to: String },
    #[error("state {0:?} is final (no `on`) but runs step {1:?}, which could never finish")]
    FinalWithStep(String, &'static str),
    #[error("state {from:?}: on {input:?}, no target is unconditional, so some claims would go nowhere")]
    NoFallback { from: String, input: &'static str },
    #[error("state {0:?}: no final state can be reached from it")]
    Dead(String),
    #[error("a process needs at least one state")]
    Empty,
    #[error("allocation: {0}")]
    Allocation(String),
}

fn input_name(i: Input) -> &'static str {
    match i {
        Input::Done => "done",
        Input::Failed => "failed",
        Input::Approved => "approved",
        Input::Rejected => "rejected",
        Input::Confirmed => "confirmed",
        Input::Timeout => "timeout",
    }
}

fn step_name(s: Step) -> &'static str {
    match s {
        Step::CheckIdentity => "check_identity",
        Step::AwaitApproval => "await_approval",
        Step::CreateTwin => "create_twin",
        Step::IssueCredentials => "issue_credentials",
        Step::ApplyConfiguration => "apply_configuration",
        Step::RequestApps => "request_apps",
        Step::AwaitConfirmation => "await_confirmation",
        Step::RemoveClaim => "remove_claim",
    }
}

impl ProcessSpec {
    /// Parses and validates a process written as JSON (unknown steps, inputs and guards
    /// are refused by name by the parser; unknown states by [`ProcessSpec::validate`]).
    pub fn from_json(v: &serde_json::Value) -> Result<ProcessSpec, String> {
        let spec: ProcessSpec = serde_json::from_value(v.clone()).map_err(|e| format!("provisioning process: {e}"))?;
        spec.validate().map_err(|e| format!("provisioning process: {e}"))?;
        Ok(spec)
    }

    /// Every state named exists; every state can reach a final one; a guarded choice
    /// ends with an unconditional target; final states run no step.
    pub fn validate(&self) -> Result<(), ProcessError> {
        if self.states.is_empty() {
            return Err(ProcessError::Empty);
        }
        if !self.states.contains_key(&self.initial) {
            return Err(ProcessError::UnknownInitial(self.initial.clone()));
        }
        for (name, s) in &self.states {
            if s.on.is_empty()
                && let Some(step) = s.step
            {
                return Err(ProcessError::FinalWithStep(name.clone(), step_name(step)));
            }
            for (input, targets) in &s.on {
                for to in targets.all() {
                    if !self.states.contains_key(to) {
                        return Err(ProcessError::UnknownTarget {
                            from: name.clone(),
                            input: input_name(*input),
                            to: to.to_string(),
                        });
                    }
                }
                if let Targets::Choose(v) = targets
                    && v.last().is_none_or(|t| t.guard.is_some())
                {
                    return Err(ProcessError::NoFallback { from: name.clone(), input: input_name(*input) });
                }
            }
        }
        // Every state reaches a final one (a fixpoint over "can finish").
        let mut finishes: std::collections::BTreeSet<&str> =
            self.states.iter().filter(|(_, s)| s.on.is_empty()).map(|(n, _)| n.as_str()).collect();
        loop {
            let before = finishes.len();
            for (name, s) in &self.states {
                if s.on.values().flat_map(|t| t.all()).any(|to| finishes.contains(to)) {
                    finishes.insert(name);
                }
            }
            if finishes.len() == before {
                break;
            }
        }
        if let Some((dead, _)) = self.states.iter().find(|(n, _)| !finishes.contains(n.as_str())) {
            return Err(ProcessError::Dead(dead.clone()));
        }
        Ok(())
    }

    /// The default process of the primary paper: claim received → identity checked →
    /// (approval, where required) → twin created → credentials issued and registered →
    /// configuration applied → baseline apps requested → confirmed by the device on its
    /// operational gateway → claim credentials removed → operational.
    pub fn default_process() -> ProcessSpec {
        let json = serde_json::json!({
            "initial": "claim_received",
            "states": {
                "claim_received": {
                    "step": "check_identity",
                    "on": {"done": [{"to": "creating_twin", "guard": "pre_approved"}, {"to": "awaiting_approval"}],
                           "failed": "refused", "timeout": "failed"},
                    "retry": {"deadline_ms": 5_000, "max_retries": 2, "backoff_ms": 1_000}
                },
                "awaiting_approval": {
                    "step": "await_approval", "human": true,
                    "on": {"approved": "creating_twin", "rejected": "refused", "timeout": "refused"},
                    "retry": {"deadline_ms": 3_600_000, "max_retries": 23}
                },
                "creating_twin": {"step": "create_twin", "on": {"done": "issuing_credentials", "failed": "failed", "timeout": "failed"}},
                "issuing_credentials": {"step": "issue_credentials", "on": {"done": "configuring", "failed": "failed", "timeout": "failed"}},
                "configuring": {"step": "apply_configuration", "on": {"done": "requesting_apps", "failed": "failed", "timeout": "failed"}},
                "requesting_apps": {"step": "request_apps", "on": {"done": "awaiting_confirmation", "failed": "failed", "timeout": "failed"}},
                "awaiting_confirmation": {
                    "step": "await_confirmation",
                    "on": {"confirmed": "removing_claim", "timeout": "failed"},
                    "retry": {"deadline_ms": 600_000, "max_retries": 2}
                },
                "removing_claim": {"step": "remove_claim", "on": {"done": "operational", "failed": "failed", "timeout": "failed"}},
                "operational": {},
                "refused": {},
                "failed": {}
            }
        });
        ProcessSpec::from_json(&json).expect("the default process is valid")
    }
}

/// How a device type provisions its devices (in its model file, `provisioning`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProvisioningSpec {
    #[serde(default)]
    pub mode: Mode,
    /// Serials pre-registered for the automatic mode.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_list: Vec<String>,
    /// The process; default: [`ProcessSpec::default_process`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessSpec>,
    /// What a provisioned device that claims again gets (same serial and MAC).
    #[serde(default)]
    pub reprovision: Reprovision,
    /// How the operational gateway of each device is chosen among the configured ones
    /// (`crate::enrollment::allocate`); default: weighted hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<Allocation>,
}

/// The gateway manager's allocation policy of a device type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Allocation {
    pub policy: AllocationPolicy,
    /// The gateway of the `static` policy (by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum AllocationPolicy {
    /// The first configured gateway that serves the region the device claims from (the
    /// paper's choice); a claim from an unknown region is refused.
    Region,
    /// Rendezvous hashing of the serial over the gateways, by their weights: a device
    /// always lands on the same gateway, and adding one moves only its share.
    Hash,
    /// Always the named gateway.
    Static,
}

/// A provisioned device claims again (factory reset, lost credentials, replaced
/// storage): what its type does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Reprovision {
    /// Refused: it is provisioned already (an operator can issue a new token).
    #[default]
    Refuse,
    /// The process runs again on the same twin (its state and history stay).
    Keep,
    /// The twin is deleted and the process runs again from scratch.
    Reset,
}

impl ProvisioningSpec {
    pub fn validate(&self) -> Result<(), ProcessError> {
        if let Some(a) = &self.allocation {
            match (a.policy, &a.gateway) {
                (AllocationPolicy::Static, None) => {
                    return Err(ProcessError::Allocation("the static allocation policy needs a `gateway`".into()));
                }
                (AllocationPolicy::Region | AllocationPolicy::Hash, Some(g)) => {
                    return Err(ProcessError::Allocation(format!(
                        "`gateway` {g:?} is only for the static policy, not {:?}",
                        a.policy
                    )));
                }
                _ => {}
            }
        }
        self.process.as_ref().map_or(Ok(()), ProcessSpec::validate)
    }

    /// The claim's facts for the device with `serial`.
    pub fn facts(&self, serial: &str) -> Facts {
        Facts { mode: self.mode, pre_registered: self.allow_list.iter().any(|s| s == serial) }
    }
}

/// What a device says of itself when it claims (the identity manager keeps it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Identity {
    pub serial: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub firmware: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub os: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub arch: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peripherals: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub region: String,
}

impl Identity {
    /// A serial is 1 to 128 printable ASCII characters; every other field at most 128
    /// bytes, peripherals at most 64.
    pub fn validate(&self) -> Result<(), String> {
        let ok = |s: &str| s.len() <= 128 && s.bytes().all(|b| (0x21..0x7f).contains(&b));
        if self.serial.is_empty() || !ok(&self.serial) {
            return Err("serial must be 1 to 128 printable characters without spaces".into());
        }
        for (name, v) in [("mac", &self.mac), ("model", &self.model), ("region", &self.region), ("arch", &self.arch)] {
            if !ok(v) {
                return Err(format!("{name} must be at most 128 printable characters without spaces"));
            }
        }
        if self.firmware.len() > 128 || self.os.len() > 128 {
            return Err("firmware and os are at most 128 bytes".into());
        }
        if self.peripherals.len() > 64 || self.peripherals.iter().any(|p| p.len() > 128) {
            return Err("at most 64 peripherals of at most 128 bytes".into());
        }
        Ok(())
    }
}

/// Who made a transition happen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "name")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Actor {
    Device,
    /// The TDTA (a step's result, a deadline).
    Tdta,
    /// An operator, by name.
    Operator(String),
}

/// One line of the step-by-step log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogEntry {
    pub at: Timestamp,
    /// The state left (`None` for the start).
    pub from: Option<String>,
    pub to: String,
    /// What moved it (`None` for the start).
    pub input: Option<Input>,
    pub actor: Actor,
    /// Why, or what the step said.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// What a process journals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum ProvisionEvent {
    /// Entered `to` (the log entry says from where and why).
    Entered(LogEntry),
    /// The current step is tried again (attempt `attempt`, 1 = the first retry).
    Retried { at: Timestamp, attempt: u32 },
}

/// What the TDTA must do for a process.
#[derive(Debug, Clone, PartialEq)]
pub enum ProvisionEffect {
    /// Run the state's step (again, for `attempt > 0`); its result comes back as `done`
    /// or `failed`.
    Run { step: Step, attempt: u32 },
    /// Arm, cancel, alert (shared with the twin machines).
    Core(Effect),
}

/// What one input decided.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProvisionDecision {
    pub events: Vec<ProvisionEvent>,
    pub effects: Vec<ProvisionEffect>,
}

/// Why an input was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProvisionRefusal {
    #[error("provisioning is over ({0})")]
    Finished(String),
    #[error("state {state:?} does not take {input:?}")]
    NotNow { state: String, input: &'static str },
    #[error("no transition of state {state:?} on {input:?} applies to this claim")]
    NoTarget { state: String, input: &'static str },
}

/// One device's run of a process: where it is, the attempt of its step, its log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Provisioning {
    pub state: String,
    pub facts: Facts,
    /// The attempt of the current state's step (0: the first).
    pub attempt: u32,
    pub log: Vec<LogEntry>,
}

impl Provisioning {
    /// A process that starts at `now` with the claim's `facts`: the start and the
    /// effects of entering the initial state.
    pub fn start(spec: &ProcessSpec, facts: Facts, now: Timestamp) -> (Provisioning, ProvisionDecision) {
        Self::start_by(spec, facts, Actor::Device, "claim received", now)
    }

    /// [`Provisioning::start`] by someone else than the device (an operator registering
    /// it, in the manual mode).
    pub fn start_by(
        spec: &ProcessSpec,
        facts: Facts,
        actor: Actor,
        note: &str,
        now: Timestamp,
    ) -> (Provisioning, ProvisionDecision) {
        let mut p = Provisioning { state: String::new(), facts, attempt: 0, log: Vec::new() };
        let entry =
            LogEntry { at: now, from: None, to: spec.initial.clone(), input: None, actor, note: note.to_string() };
        let mut d = ProvisionDecision { events: vec![ProvisionEvent::Entered(entry)], effects: Vec::new() };
        d.effects.extend(enter(spec, &spec.initial, now));
        d.events.iter().for_each(|e| p.evolve(e));
        (p, d)
    }

    /// The state's spec.
    fn here<'a>(&self, spec: &'a ProcessSpec) -> &'a StateSpec {
        spec.states.get(&self.state).unwrap_or_else(|| {
            // A process whose spec lost the state (changed model file): treat as final.
            static EMPTY: std::sync::OnceLock<StateSpec> = std::sync::OnceLock::new();
            EMPTY.get_or_init(StateSpec::default)
        })
    }

    /// The current state's declaration (`None` if the spec no longer has it).
    pub fn state_spec<'a>(&self, spec: &'a ProcessSpec) -> Option<&'a StateSpec> {
        spec.states.get(&self.state)
    }

    /// Whether the process is in a final state, and its outcome.
    pub fn outcome(&self, spec: &ProcessSpec) -> Option<String> {
        let s = self.here(spec);
        s.on.is_empty().then(|| s.outcome.clone().unwrap_or_else(|| self.state.clone()))
    }

    /// Answers `input` from `actor` at `now` (`note`: the step's word on it).
    pub fn decide(
        &self,
        spec: &ProcessSpec,
        input: Input,
        actor: Actor,
        note: &str,
        now: Timestamp,
    ) -> Result<ProvisionDecision, ProvisionRefusal> {
        if let Some(o) = self.outcome(spec) {
            return Err(ProvisionRefusal::Finished(o));
        }
        let here = self.here(spec);
        let name = input_name(input);
        let Some(targets) = here.on.get(&input) else {
            return Err(ProvisionRefusal::NotNow { state: self.state.clone(), input: name });
        };
        let to = targets
            .pick(&self.facts)
            .ok_or_else(|| ProvisionRefusal::NoTarget { state: self.state.clone(), input: name })?;
        let entry = LogEntry {
            at: now,
            from: Some(self.state.clone()),
            to: to.to_string(),
            input: Some(input),
            actor,
            note: note.to_string(),
        };
        let mut effects = vec![ProvisionEffect::Core(Effect::CancelWait { wait: WaitName::Provisioning })];
        effects.extend(enter(spec, to, now));
        Ok(ProvisionDecision { events: vec![ProvisionEvent::Entered(entry)], effects })
    }

    /// The current step's deadline passed (attempt `attempt`): retry it with backoff,
    /// or, its retries used up, alert and take the state's `timeout` transition (a state
    /// without one stays where it is, alerted). A stale timer decides nothing.
    pub fn on_deadline(&self, spec: &ProcessSpec, attempt: u32, now: Timestamp) -> ProvisionDecision {
        let here = self.here(spec);
        let (Some(step), None) = (here.step, self.outcome(spec)) else { return ProvisionDecision::default() };
        if attempt != self.attempt {
            return ProvisionDecision::default();
        }
        let policy = here.retry.map(RetrySpec::policy).unwrap_or_default();
        match policy.on_expiry(self.attempt, now) {
            WaitDecision::Retry { attempt, deadline } => {
                let mut effects = Vec::new();
                if step == Step::AwaitApproval || here.human {
                    effects.push(ProvisionEffect::Core(Effect::RaiseAlert {
                        kind: AlertKind::DeadlineExceeded,
                        severity: Severity::Warning,
                        message: format!(
                            "provisioning waits for a human in state {:?} (reminder {attempt})",
                            self.state
                        ),
                    }));
                }
                // A waiting step is only reminded of; an acting one runs again.
                if !step.waits_outside() {
                    effects.push(ProvisionEffect::Run { step, attempt });
                }
                effects.push(ProvisionEffect::Core(Effect::ArmWait {
                    wait: WaitName::Provisioning,
                    attempt,
                    deadline,
                }));
                ProvisionDecision { events: vec![ProvisionEvent::Retried { at: now, attempt }], effects }
            }
            WaitDecision::Alert { attempts } => {
                let alert = ProvisionEffect::Core(Effect::RaiseAlert {
                    kind: AlertKind::DeadlineExceeded,
                    severity: Severity::Critical,
                    message: format!(
                        "provisioning step {} in state {:?} did not finish in {attempts} attempts",
                        step_name(step),
                        self.state
                    ),
                });
                match self.decide(spec, Input::Timeout, Actor::Tdta, "deadline and retries exceeded", now) {
                    Ok(mut d) => {
                        d.effects.insert(0, alert);
                        d
                    }
                    Err(_) => ProvisionDecision { events: vec![], effects: vec![alert] },
                }
            }
        }
    }

    pub fn evolve(&mut self, event: &ProvisionEvent) {
        match event {
            ProvisionEvent::Entered(entry) => {
                self.state = entry.to.clone();
                self.attempt = 0;
                self.log.push(entry.clone());
            }
            ProvisionEvent::Retried { attempt, .. } => self.attempt = *attempt,
        }
    }

    /// The waits to re-arm and steps to resume after a restart (a process that was in
    /// the middle of a step runs it again: steps are idempotent).
    pub fn resume(&self, spec: &ProcessSpec, now: Timestamp) -> Vec<ProvisionEffect> {
        if self.outcome(spec).is_some() {
            return Vec::new();
        }
        enter(spec, &self.state, now)
            .into_iter()
            .map(|e| match e {
                ProvisionEffect::Run { step, .. } => ProvisionEffect::Run { step, attempt: self.attempt },
                ProvisionEffect::Core(Effect::ArmWait { wait, deadline, .. }) => {
                    ProvisionEffect::Core(Effect::ArmWait { wait, attempt: self.attempt, deadline })
                }
                other => other,
            })
            .collect()
    }
}

/// The effects of entering `state` at `now`: run its step and arm its deadline.
fn enter(spec: &ProcessSpec, state: &str, now: Timestamp) -> Vec<ProvisionEffect> {
    let Some(s) = spec.states.get(state) else { return Vec::new() };
    let Some(step) = s.step else { return Vec::new() };
    let policy = s.retry.map(RetrySpec::policy).unwrap_or_default();
    vec![
        ProvisionEffect::Run { step, attempt: 0 },
        ProvisionEffect::Core(Effect::ArmWait {
            wait: WaitName::Provisioning,
            attempt: 0,
            deadline: policy.first_deadline(now),
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn apply(p: &mut Provisioning, d: &ProvisionDecision) {
        d.events.iter().for_each(|e| p.evolve(e));
    }

    /// Decides `input` from the TDTA and applies it.
    fn on(p: &mut Provisioning, spec: &ProcessSpec, input: Input, at: i64) {
        let d = p.decide(spec, input, Actor::Tdta, "", Timestamp(at)).unwrap();
        apply(p, &d);
    }

    fn steps(d: &ProvisionDecision) -> Vec<Step> {
        d.effects
            .iter()
            .filter_map(|e| match e {
                ProvisionEffect::Run { step, .. } => Some(*step),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_pre_registered_device_runs_the_default_process_to_operational() {
        let spec = ProcessSpec::default_process();
        let facts = Facts { mode: Mode::Automatic, pre_registered: true };
        let (mut p, d) = Provisioning::start(&spec, facts, Timestamp(0));
        assert_eq!(steps(&d), [Step::CheckIdentity]);
        let order = [
            (Input::Done, Step::CreateTwin),
            (Input::Done, Step::IssueCredentials),
            (Input::Done, Step::ApplyConfiguration),
            (Input::Done, Step::RequestApps),
            (Input::Done, Step::AwaitConfirmation),
            (Input::Confirmed, Step::RemoveClaim),
        ];
        for (i, (input, next)) in order.into_iter().enumerate() {
            let d = p.decide(&spec, input, Actor::Tdta, "", Timestamp(i as i64 + 1)).unwrap();
            assert_eq!(steps(&d), [next], "after {input:?}");
            apply(&mut p, &d);
        }
        let d = p.decide(&spec, Input::Done, Actor::Tdta, "", Timestamp(10)).unwrap();
        apply(&mut p, &d);
        assert_eq!(p.outcome(&spec).as_deref(), Some("operational"));
        assert_eq!(p.log.len(), 8, "the start and seven transitions");
        assert_eq!(p.log[1].from.as_deref(), Some("claim_received"));
        assert!(matches!(
            p.decide(&spec, Input::Done, Actor::Tdta, "", Timestamp(11)),
            Err(ProvisionRefusal::Finished(_))
        ));
    }

    #[test]
    fn a_device_not_pre_approved_waits_for_a_human_who_is_reminded_and_can_reject() {
        let spec = ProcessSpec::default_process();
        let (mut p, d) = Provisioning::start(&spec, Facts::default(), Timestamp(0));
        apply(&mut p, &d);
        let d = p.decide(&spec, Input::Done, Actor::Tdta, "identity ok", Timestamp(1)).unwrap();
        assert_eq!(steps(&d), [Step::AwaitApproval]);
        apply(&mut p, &d);
        assert_eq!(p.state, "awaiting_approval");
        // An hour without an answer: a reminder, and the wait goes on.
        let d = p.on_deadline(&spec, 0, Timestamp(3_600_001));
        assert!(d.effects.iter().any(|e| matches!(e, ProvisionEffect::Core(Effect::RaiseAlert { .. }))));
        assert!(steps(&d).is_empty(), "waiting for a human runs nothing");
        apply(&mut p, &d);
        assert_eq!(p.attempt, 1);
        assert_eq!(p.on_deadline(&spec, 0, Timestamp(3_600_002)), ProvisionDecision::default(), "a stale timer");
        let d = p.decide(&spec, Input::Rejected, Actor::Operator("ann".into()), "unknown site", Timestamp(5)).unwrap();
        apply(&mut p, &d);
        assert_eq!(p.outcome(&spec).as_deref(), Some("refused"));
        assert_eq!(p.log.last().unwrap().actor, Actor::Operator("ann".into()));
        // Semi-automatic: even a pre-registered device waits.
        let facts = Facts { mode: Mode::SemiAutomatic, pre_registered: true };
        let (mut p, d) = Provisioning::start(&spec, facts, Timestamp(0));
        apply(&mut p, &d);
        on(&mut p, &spec, Input::Done, 1);
        assert_eq!(p.state, "awaiting_approval");
    }

    #[test]
    fn a_stuck_step_is_retried_with_backoff_then_alerts_and_times_out() {
        let spec = ProcessSpec::default_process();
        let (mut p, d) = Provisioning::start(&spec, Facts::default(), Timestamp(0));
        apply(&mut p, &d);
        // check_identity: 5 s deadline, 2 retries, 1 s backoff doubling.
        let d = p.on_deadline(&spec, 0, Timestamp(5_000));
        assert_eq!(steps(&d), [Step::CheckIdentity]);
        assert!(d.effects.contains(&ProvisionEffect::Core(Effect::ArmWait {
            wait: WaitName::Provisioning,
            attempt: 1,
            deadline: Timestamp(11_000)
        })));
        apply(&mut p, &d);
        let d = p.on_deadline(&spec, 1, Timestamp(11_000));
        apply(&mut p, &d);
        assert_eq!(p.attempt, 2);
        let d = p.on_deadline(&spec, 2, Timestamp(20_000));
        assert!(matches!(
            &d.effects[0],
            ProvisionEffect::Core(Effect::RaiseAlert { severity: Severity::Critical, .. })
        ));
        apply(&mut p, &d);
        assert_eq!(p.outcome(&spec).as_deref(), Some("failed"));
        assert_eq!(p.log.last().unwrap().input, Some(Input::Timeout));
    }

    #[test]
    fn a_restarted_process_resumes_its_step_and_deadline() {
        let spec = ProcessSpec::default_process();
        let (mut p, d) = Provisioning::start(&spec, Facts::default(), Timestamp(0));
        apply(&mut p, &d);
        let d = p.on_deadline(&spec, 0, Timestamp(5_000));
        apply(&mut p, &d);
        let back: Provisioning = serde_json::from_value(serde_json::to_value(&p).unwrap()).unwrap();
        let r = back.resume(&spec, Timestamp(6_000));
        assert_eq!(r[0], ProvisionEffect::Run { step: Step::CheckIdentity, attempt: 1 });
        assert!(matches!(r[1], ProvisionEffect::Core(Effect::ArmWait { attempt: 1, .. })));
    }

    #[test]
    fn a_process_naming_what_does_not_exist_is_refused_by_name() {
        let bad = |v: serde_json::Value| ProcessSpec::from_json(&v).unwrap_err();
        let e = bad(json!({"initial": "a", "states": {"a": {"step": "check_identity", "on": {"done": "b"}}}}));
        assert!(e.contains("\"b\""), "{e}");
        let e = bad(json!({"initial": "a", "states": {"a": {"step": "check_identity", "on": {"finished": "a"}}}}));
        assert!(e.contains("finished"), "{e}");
        let e = bad(json!({"initial": "a", "states": {"a": {"step": "dance", "on": {"done": "a"}}}}));
        assert!(e.contains("dance"), "{e}");
        let e = bad(json!({"initial": "start", "states": {"a": {}}}));
        assert!(e.contains("start"), "{e}");
        let e = bad(json!({"initial": "a", "states": {"a": {"step": "create_twin", "on": {"done": "a"}}}}));
        assert!(e.contains("no final state"), "{e}");
        let e = bad(
            json!({"initial": "a", "states": {"a": {"step": "create_twin", "on": {"done": [{"to": "z", "guard": "pre_approved"}]}}, "z": {}}}),
        );
        assert!(e.contains("unconditional"), "{e}");
        // Another type's different process is another file, not code.
        let short = json!({"initial": "a", "states": {
            "a": {"step": "create_twin", "on": {"done": "b"}},
            "b": {"step": "issue_credentials", "on": {"done": "ready"}},
            "ready": {"outcome": "operational"}
        }});
        let spec = ProcessSpec::from_json(&short).unwrap();
        let (mut p, d) = Provisioning::start(&spec, Facts::default(), Timestamp(0));
        assert_eq!(steps(&d), [Step::CreateTwin]);
        apply(&mut p, &d);
        on(&mut p, &spec, Input::Done, 1);
        on(&mut p, &spec, Input::Done, 2);
        assert_eq!(p.outcome(&spec).as_deref(), Some("operational"));
    }
}
