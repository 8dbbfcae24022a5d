//! Fleet rollouts, orchestrated for a device type (Maree et al. 2024, 5 and 7.7: twins of
//! a type collaborate, and when an install fails on some devices the others postpone or
//! roll back). Pure: the spec, the state, and a step that decides what to do next; the
//! driver (`twinfleet_actors::rollouts`) carries the actions out through the twins'
//! installs and feeds back their results and the monitoring alerts.
//!
//! A rollout installs one app version on the twins of a type (optionally only the
//! members of some DTAs), in **waves** of cumulative percentages (default 1, 10, 50,
//! 100), starting at most `rate.per_minute` installs a minute (growing by
//! `rate.growth` each minute: exponential). It **aborts** once at least
//! `abort.min_count` installs ended and more than `abort.failure_rate` of them failed:
//! the targets not started are postponed, and (with `on_abort: roll_back`) the devices
//! already updated go back to the version they had. A **health gate** holds a finished
//! wave for `health_gate.hold` before the next one starts; a monitoring alert of at least
//! `health_gate.min_severity` on a twin of the wave during that time counts as that
//! install's failure (and so may abort the rollout).

use crate::alert::Severity;
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};

/// What an operator asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// Its id (letters, digits, `.`, `_`, `:`, `-`).
    pub id: String,
    pub app: String,
    pub version: String,
    pub device_type: String,
    /// Only the direct members of these DTAs (empty: every twin of the type).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Cumulative percentages of the targets, increasing, the last 100.
    #[serde(default = "default_waves")]
    pub waves: Vec<f64>,
    #[serde(default)]
    pub rate: Rate,
    #[serde(default)]
    pub abort: Abort,
    #[serde(default)]
    pub on_abort: OnAbort,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_gate: Option<HealthGate>,
}

fn default_waves() -> Vec<f64> {
    vec![1.0, 10.0, 50.0, 100.0]
}

/// How fast installs start.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Installs started per minute at most (absent: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_minute: Option<u32>,
    /// Each minute's limit is the previous one's times this (1 or absent: constant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub growth: Option<f64>,
}

/// When to give up.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Abort {
    /// The share of ended installs that may fail (0 to 1; default 0.1).
    #[serde(default = "default_failure_rate")]
    pub failure_rate: f64,
    /// Installs that must have ended before the rate counts (default 1).
    #[serde(default = "default_min_count")]
    pub min_count: u32,
}

fn default_failure_rate() -> f64 {
    0.1
}

fn default_min_count() -> u32 {
    1
}

impl Default for Abort {
    fn default() -> Self {
        Abort { failure_rate: default_failure_rate(), min_count: default_min_count() }
    }
}

/// What an abort does to the devices already updated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum OnAbort {
    /// They go back to the version they had before.
    #[default]
    RollBack,
    /// They keep the new version; only the rest is postponed.
    Postpone,
}

/// Hold each finished wave until no alert of `min_severity` came for `hold`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HealthGate {
    pub min_severity: Severity,
    /// How long: a duration string (`"30s"`, `"10m"`) or a number of milliseconds.
    pub hold: serde_json::Value,
}

/// Where a rollout stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RolloutState {
    Running,
    Paused,
    Completed,
    Aborted { reason: String },
    Cancelled,
}

/// One twin of a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum TargetStatus {
    Pending,
    Installing,
    Succeeded,
    Failed {
        reason: String,
    },
    /// Not started: the rollout was aborted or cancelled first.
    Postponed,
    /// Going back to `to` after an abort (`None`: nothing was installed before, so
    /// nothing to go back to).
    RollingBack {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
    },
    RolledBack,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Target {
    pub twin: String,
    #[serde(flatten)]
    pub status: TargetStatus,
    /// The version the device had before (known once its install ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// The wave it belongs to (0-based).
    pub wave: usize,
}

/// A wave held by the health gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Gate {
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub until: Timestamp,
    /// Alerts after this revision of the alert log count.
    pub after_revision: u64,
}

/// A rollout and everything it decided so far (persisted after every step).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Rollout {
    pub spec: RolloutSpec,
    #[serde(flatten)]
    pub state: RolloutState,
    /// The wave that runs (0-based).
    pub wave: usize,
    pub targets: Vec<Target>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<Gate>,
    /// Start of the current rate-limit minute, and installs started in it.
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub minute_start: Timestamp,
    pub started_in_minute: u32,
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub created_at: Timestamp,
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub updated_at: Timestamp,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start the install on this twin (its result comes back as [`Rollout::result`]).
    Install { twin: String },
    /// Install `to` again on this twin (the result comes back as [`Rollout::rolled_back`]).
    RollBack { twin: String, to: String },
    /// Step again at this time at the latest.
    WakeAt(Timestamp),
    /// A health gate started: alerts after the log's current revision count.
    GateStarted,
}

/// An operator's control of a running rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Control {
    Pause,
    Resume,
    Cancel,
}

impl RolloutSpec {
    /// Checks the spec, naming what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        crate::ids::DtaId::new(&self.id).map_err(|e| format!("rollout id: {e}"))?;
        crate::ids::DeviceTypeId::new(&self.device_type).map_err(|e| format!("device_type: {e}"))?;
        if !crate::apps::valid_app_name(&self.app) {
            return Err(format!("app {:?} is not an app name", self.app));
        }
        if self.waves.is_empty()
            || self.waves.windows(2).any(|w| w[1] <= w[0])
            || self.waves.iter().any(|p| !(*p > 0.0 && *p <= 100.0))
            || self.waves.last() != Some(&100.0)
        {
            return Err(format!("waves {:?} must be increasing percentages in (0, 100] ending at 100", self.waves));
        }
        if !(0.0..=1.0).contains(&self.abort.failure_rate) {
            return Err(format!("abort.failure_rate {} must be between 0 and 1", self.abort.failure_rate));
        }
        if self.rate.per_minute == Some(0) {
            return Err("rate.per_minute must be at least 1 (or absent: no limit)".into());
        }
        if let Some(g) = self.rate.growth
            && !(g.is_finite() && g >= 1.0)
        {
            return Err(format!("rate.growth {g} must be at least 1"));
        }
        if let Some(g) = &self.health_gate {
            crate::rules::parse_duration(&g.hold).map_err(|e| format!("health_gate.hold: {e}"))?;
        }
        Ok(())
    }

    fn hold_ms(&self) -> Option<u64> {
        self.health_gate.as_ref().and_then(|g| crate::rules::parse_duration(&g.hold).ok())
    }
}

impl Rollout {
    /// A new rollout over `twins` (in the order given, which decides the waves).
    pub fn new(spec: RolloutSpec, twins: Vec<String>, now: Timestamp) -> Rollout {
        let n = twins.len();
        let ends: Vec<usize> = spec.waves.iter().map(|p| ((p / 100.0) * n as f64).ceil() as usize).collect();
        let targets = twins
            .into_iter()
            .enumerate()
            .map(|(i, twin)| Target {
                twin,
                status: TargetStatus::Pending,
                previous: None,
                wave: ends.iter().position(|e| i < *e).unwrap_or(ends.len().saturating_sub(1)),
            })
            .collect();
        Rollout {
            spec,
            state: RolloutState::Running,
            wave: 0,
            targets,
            gate: None,
            minute_start: now,
            started_in_minute: 0,
            created_at: now,
            updated_at: now,
        }
    }

    /// How many waves there are.
    pub fn waves(&self) -> usize {
        self.spec.waves.len()
    }

    /// Whether the rollout is over, rollbacks included.
    pub fn is_final(&self) -> bool {
        matches!(self.state, RolloutState::Completed | RolloutState::Aborted { .. } | RolloutState::Cancelled)
            && !self
                .targets
                .iter()
                .any(|t| matches!(t.status, TargetStatus::RollingBack { .. } | TargetStatus::Installing))
    }

    /// An install of this rollout ended on `twin` (`previous`: the version it replaced).
    /// An install that succeeds after the rollout aborted goes back at once: the
    /// rollback to start, if there is a version to go back to.
    pub fn result(
        &mut self,
        twin: &str,
        ok: Result<(), String>,
        previous: Option<String>,
        now: Timestamp,
    ) -> Option<Action> {
        let aborted = matches!(self.state, RolloutState::Aborted { .. });
        let roll_back = aborted && self.spec.on_abort == OnAbort::RollBack;
        let t = self.targets.iter_mut().find(|t| t.twin == twin && t.status == TargetStatus::Installing)?;
        t.previous = previous;
        self.updated_at = now;
        t.status = match ok {
            Ok(()) if roll_back => match &t.previous {
                Some(to) => TargetStatus::RollingBack { to: Some(to.clone()) },
                None => TargetStatus::RolledBack,
            },
            Ok(()) => TargetStatus::Succeeded,
            Err(reason) => TargetStatus::Failed { reason },
        };
        match &t.status {
            TargetStatus::RollingBack { to: Some(to) } => {
                Some(Action::RollBack { twin: t.twin.clone(), to: to.clone() })
            }
            _ => None,
        }
    }

    /// A rollback of `twin` ended (successful or not, it is over for the rollout).
    pub fn rolled_back(&mut self, twin: &str, ok: Result<(), String>, now: Timestamp) {
        if let Some(t) =
            self.targets.iter_mut().find(|t| t.twin == twin && matches!(t.status, TargetStatus::RollingBack { .. }))
        {
            t.status = match ok {
                Ok(()) => TargetStatus::RolledBack,
                Err(reason) => TargetStatus::Failed { reason: format!("rollback failed: {reason}") },
            };
            self.updated_at = now;
        }
    }

    /// A monitoring alert was raised on `twin`: during the health gate, on an updated
    /// twin of the held wave, at the gate's severity or above, it fails that install.
    pub fn alert(&mut self, twin: &str, severity: Severity, rule: &str, now: Timestamp) {
        let (Some(gate), Some(g)) = (self.gate, &self.spec.health_gate) else { return };
        if severity < g.min_severity || now > gate.until {
            return;
        }
        let wave = self.wave;
        if let Some(t) =
            self.targets.iter_mut().find(|t| t.twin == twin && t.wave == wave && t.status == TargetStatus::Succeeded)
        {
            t.status =
                TargetStatus::Failed { reason: format!("alert {rule} ({}) during the health gate", severity.as_str()) };
            self.updated_at = now;
        }
    }

    /// An operator's control.
    pub fn control(&mut self, c: Control, now: Timestamp) -> Result<(), String> {
        match (c, &self.state) {
            (Control::Pause, RolloutState::Running) => self.state = RolloutState::Paused,
            (Control::Resume, RolloutState::Paused) => self.state = RolloutState::Running,
            (Control::Cancel, RolloutState::Running | RolloutState::Paused) => {
                self.state = RolloutState::Cancelled;
                self.postpone_pending();
            }
            (c, s) => return Err(format!("rollout {} is {s:?}: cannot {c:?}", self.spec.id)),
        }
        self.updated_at = now;
        Ok(())
    }

    fn postpone_pending(&mut self) {
        for t in &mut self.targets {
            if t.status == TargetStatus::Pending {
                t.status = TargetStatus::Postponed;
            }
        }
    }

    /// Decides what to do now: abort, start installs within the rate, hold or open a
    /// health gate, move to the next wave, complete. `revision`: the alert log's
    /// revision now (where a gate starting now counts from).
    pub fn step(&mut self, now: Timestamp, revision: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.state != RolloutState::Running {
            return actions;
        }
        let ended = self
            .targets
            .iter()
            .filter(|t| matches!(t.status, TargetStatus::Succeeded | TargetStatus::Failed { .. }))
            .count();
        let failed = self.targets.iter().filter(|t| matches!(t.status, TargetStatus::Failed { .. })).count();
        if ended as u32 >= self.spec.abort.min_count.max(1)
            && failed as f64 / ended as f64 > self.spec.abort.failure_rate
        {
            let reason = format!(
                "{failed} of {ended} installs failed in wave {} (more than {:.0}%)",
                self.wave + 1,
                self.spec.abort.failure_rate * 100.0
            );
            self.state = RolloutState::Aborted { reason };
            self.gate = None;
            self.postpone_pending();
            if self.spec.on_abort == OnAbort::RollBack {
                for t in &mut self.targets {
                    if t.status == TargetStatus::Succeeded {
                        t.status = TargetStatus::RollingBack { to: t.previous.clone() };
                        if let Some(to) = &t.previous {
                            actions.push(Action::RollBack { twin: t.twin.clone(), to: to.clone() });
                        } else {
                            t.status = TargetStatus::RolledBack;
                        }
                    }
                }
            }
            self.updated_at = now;
            return actions;
        }
        let wave = self.wave;
        // Start what the rate allows.
        if now.0 >= self.minute_start.0 + 60_000 {
            let minutes = (now.0 - self.minute_start.0) / 60_000;
            self.minute_start = Timestamp(self.minute_start.0 + minutes * 60_000);
            self.started_in_minute = 0;
        }
        let limit = self.spec.rate.per_minute.map(|base| {
            let minute = ((self.minute_start.0 - self.created_at.0) / 60_000).max(0) as i32;
            let growth = self.spec.rate.growth.unwrap_or(1.0);
            (f64::from(base) * growth.powi(minute)).min(f64::from(u32::MAX)) as u32
        });
        let mut waiting_for_rate = false;
        for t in self.targets.iter_mut().filter(|t| t.wave == wave && t.status == TargetStatus::Pending) {
            if limit.is_some_and(|l| self.started_in_minute >= l) {
                waiting_for_rate = true;
                break;
            }
            t.status = TargetStatus::Installing;
            self.started_in_minute += 1;
            actions.push(Action::Install { twin: t.twin.clone() });
        }
        if waiting_for_rate {
            actions.push(Action::WakeAt(Timestamp(self.minute_start.0 + 60_000)));
        }
        let open = self
            .targets
            .iter()
            .any(|t| t.wave == wave && matches!(t.status, TargetStatus::Pending | TargetStatus::Installing));
        if open {
            if !actions.is_empty() {
                self.updated_at = now;
            }
            return actions;
        }
        // The wave is over: hold it at the health gate, then go on.
        if let Some(hold) = self.spec.hold_ms() {
            match self.gate {
                None => {
                    let until = Timestamp(now.0 + hold as i64);
                    self.gate = Some(Gate { until, after_revision: revision });
                    actions.push(Action::GateStarted);
                    actions.push(Action::WakeAt(until));
                    self.updated_at = now;
                    return actions;
                }
                Some(g) if now < g.until => {
                    actions.push(Action::WakeAt(g.until));
                    return actions;
                }
                Some(_) => self.gate = None,
            }
        }
        if self.wave + 1 < self.waves() {
            self.wave += 1;
            self.updated_at = now;
            let mut next = self.step(now, revision);
            actions.append(&mut next);
        } else {
            self.state = RolloutState::Completed;
            self.updated_at = now;
        }
        actions
    }

    /// Per wave: how many targets, and how many of them stand where.
    pub fn progress(&self) -> Vec<WaveProgress> {
        (0..self.waves())
            .map(|w| {
                let mut p = WaveProgress { wave: w + 1, percent: self.spec.waves[w], ..WaveProgress::default() };
                for t in self.targets.iter().filter(|t| t.wave == w) {
                    p.targets += 1;
                    match t.status {
                        TargetStatus::Pending => p.pending += 1,
                        TargetStatus::Installing => p.installing += 1,
                        TargetStatus::Succeeded => p.succeeded += 1,
                        TargetStatus::Failed { .. } => p.failed += 1,
                        TargetStatus::Postponed => p.postponed += 1,
                        TargetStatus::RollingBack { .. } | TargetStatus::RolledBack => p.rolled_back += 1,
                    }
                }
                p
            })
            .collect()
    }
}

/// One wave's counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WaveProgress {
    pub wave: usize,
    pub percent: f64,
    pub targets: usize,
    pub pending: usize,
    pub installing: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub postponed: usize,
    pub rolled_back: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(extra: serde_json::Value) -> RolloutSpec {
        let mut v =
            json!({"id": "r1", "app": "blink", "version": "2.0.0", "device_type": "lamp", "waves": [10, 50, 100]});
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let s: RolloutSpec = serde_json::from_value(v).unwrap();
        s.validate().unwrap();
        s
    }

    fn twins(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("t-{i:02}")).collect()
    }

    fn installs(a: &[Action]) -> Vec<String> {
        a.iter().filter_map(|a| if let Action::Install { twin } = a { Some(twin.clone()) } else { None }).collect()
    }

    #[test]
    fn waves_follow_each_other_and_the_rollout_completes() {
        let mut r = Rollout::new(spec(json!({})), twins(20), Timestamp(0));
        assert_eq!(r.targets.iter().filter(|t| t.wave == 0).count(), 2);
        assert_eq!(installs(&r.step(Timestamp(1), 0)), ["t-00", "t-01"]);
        assert!(r.step(Timestamp(2), 0).is_empty(), "the wave runs");
        for t in ["t-00", "t-01"] {
            r.result(t, Ok(()), Some("1.0.0".into()), Timestamp(3));
        }
        assert_eq!(installs(&r.step(Timestamp(4), 0)).len(), 8, "wave 2: up to 50%");
        for i in 2..10 {
            r.result(&format!("t-{i:02}"), Ok(()), None, Timestamp(5));
        }
        assert_eq!(installs(&r.step(Timestamp(6), 0)).len(), 10);
        for i in 10..20 {
            r.result(&format!("t-{i:02}"), Ok(()), None, Timestamp(7));
        }
        r.step(Timestamp(8), 0);
        assert_eq!(r.state, RolloutState::Completed);
        assert_eq!(r.progress()[1].succeeded, 8);
    }

    #[test]
    fn failures_over_the_rate_abort_postpone_the_rest_and_roll_back_the_updated() {
        let mut r =
            Rollout::new(spec(json!({"abort": {"failure_rate": 0.4, "min_count": 2}})), twins(20), Timestamp(0));
        r.step(Timestamp(1), 0);
        r.result("t-00", Ok(()), Some("1.0.0".into()), Timestamp(2));
        r.result("t-01", Err("checksum mismatch".into()), Some("1.0.0".into()), Timestamp(2));
        let a = r.step(Timestamp(3), 0);
        assert!(matches!(&r.state, RolloutState::Aborted { reason } if reason.contains("1 of 2")), "{:?}", r.state);
        assert_eq!(a, [Action::RollBack { twin: "t-00".into(), to: "1.0.0".into() }]);
        assert_eq!(r.progress()[1].postponed, 8);
        r.rolled_back("t-00", Ok(()), Timestamp(4));
        assert_eq!(r.targets[0].status, TargetStatus::RolledBack);
        assert!(r.step(Timestamp(5), 0).is_empty());
    }

    #[test]
    fn an_alert_during_the_health_gate_fails_the_install_and_the_next_wave_waits() {
        let mut r = Rollout::new(
            spec(json!({"health_gate": {"min_severity": "major", "hold": "10m"}, "abort": {"failure_rate": 0.0}})),
            twins(20),
            Timestamp(0),
        );
        r.step(Timestamp(1), 0);
        r.result("t-00", Ok(()), None, Timestamp(2));
        r.result("t-01", Ok(()), None, Timestamp(2));
        let a = r.step(Timestamp(3), 41);
        assert_eq!(a, [Action::GateStarted, Action::WakeAt(Timestamp(600_003))]);
        assert_eq!(r.gate, Some(Gate { until: Timestamp(600_003), after_revision: 41 }));
        assert_eq!(r.step(Timestamp(100), 41), [Action::WakeAt(Timestamp(600_003))], "held");
        r.alert("t-01", Severity::Warning, "hot", Timestamp(200));
        assert_eq!(r.targets[1].status, TargetStatus::Succeeded, "below the gate's severity");
        r.alert("t-01", Severity::Critical, "hot", Timestamp(300));
        r.step(Timestamp(301), 41);
        assert!(matches!(r.state, RolloutState::Aborted { .. }), "{:?}", r.state);
        assert_eq!(r.progress()[1].succeeded + r.progress()[1].installing, 0, "the next wave never started");
    }

    #[test]
    fn the_rate_limits_starts_per_minute_and_grows() {
        let mut r = Rollout::new(
            spec(json!({"waves": [100], "rate": {"per_minute": 2, "growth": 2.0}})),
            twins(10),
            Timestamp(0),
        );
        let a = r.step(Timestamp(0), 0);
        assert_eq!(installs(&a).len(), 2);
        assert!(a.contains(&Action::WakeAt(Timestamp(60_000))));
        assert_eq!(installs(&r.step(Timestamp(60_000), 0)).len(), 4, "doubled in the second minute");
        r.control(Control::Pause, Timestamp(60_001)).unwrap();
        assert!(r.step(Timestamp(120_000), 0).is_empty(), "paused");
        r.control(Control::Resume, Timestamp(120_001)).unwrap();
        assert_eq!(installs(&r.step(Timestamp(120_002), 0)).len(), 4, "the rest");
        assert!(r.control(Control::Resume, Timestamp(1)).is_err());
    }

    #[test]
    fn a_bad_spec_is_named() {
        let bad = |v: serde_json::Value| {
            let mut s = spec(json!({}));
            let patch: RolloutSpec = serde_json::from_value({
                let mut base = serde_json::to_value(&s).unwrap();
                base.as_object_mut().unwrap().extend(v.as_object().unwrap().clone());
                base
            })
            .unwrap();
            s = patch;
            s.validate().unwrap_err()
        };
        assert!(bad(json!({"waves": [50, 10, 100]})).contains("waves"));
        assert!(bad(json!({"waves": [10, 50]})).contains("waves"));
        assert!(bad(json!({"abort": {"failure_rate": 2.0}})).contains("failure_rate"));
        assert!(bad(json!({"health_gate": {"min_severity": "major", "hold": "soon"}})).contains("hold"));
    }
}
