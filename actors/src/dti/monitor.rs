//! A twin's monitoring (FR3/FR4): its effective rules (`twinfleet_models::rules`,
//! layered like configuration under `rules`), their states, and the one timer that
//! wakes them. Every input from the device (points, log lines, reports, acks) and every
//! deadline steps each rule, a pure function; the DTI carries out what it returns: a
//! changed phase is journalled (so a restart neither loses nor re-raises an alert), and
//! an alert raised or cleared goes into the same write (`crate::alerting`).
//!
//! A twin without rules in its layers keeps no monitor at all. The device's last
//! message time is kept in memory; after a start it counts from the start, so a device
//! that stays silent goes offline one `after` later.

use super::Dti;
use crate::alerting::Draft;
use actix::prelude::*;
use std::collections::BTreeMap;
use twinfleet_models::rules::{Effective, Phase, RULES_KEY, Rule, RuleEffect, RuleState, effective_rules};
use twinfleet_models::{EventKind, LogLine, MetricPoint, Timestamp, TwinCommand};
use twinfleet_runtime::WriteBatch;

/// A rule's raise: its id, kind, severity, message and triggering values.
type Raised = (String, &'static str, twinfleet_models::Severity, String, BTreeMap<String, f64>);

pub(crate) struct Monitor {
    /// Shared by every twin of the type whose layers add no rules.
    rules: std::sync::Arc<[Rule]>,
    /// Rules that do not resolve, with why (shown in the twin's view).
    pub(crate) errors: Vec<twinfleet_models::rules::RuleError>,
    states: BTreeMap<String, RuleState>,
    /// The armed wake-up and its time.
    wake: Option<(Timestamp, SpawnHandle)>,
}

/// What a twin knows about its rules, kept in the actor. 24 bytes: every running twin
/// carries one (see `tests/task_size.rs` for why its size matters).
pub(crate) struct Monitoring {
    pub(crate) monitor: Option<Box<Monitor>>,
    /// `TypeContext::rules_version` when they were resolved; `STALE` when the inputs
    /// changed since (layers, overrides), which no version equals.
    seen_version: u64,
    /// When the device last sent anything (or the twin started); `NEVER` before.
    last_seen: Timestamp,
}

impl Monitoring {
    const STALE: u64 = u64::MAX;
    const NEVER: Timestamp = Timestamp(i64::MIN);

    /// The rules' inputs changed: resolve them again before the next use.
    pub(crate) fn mark_dirty(&mut self) {
        self.seen_version = Self::STALE;
    }

    pub(crate) fn last_seen(&self) -> Option<Timestamp> {
        (self.last_seen != Self::NEVER).then_some(self.last_seen)
    }
}

impl Default for Monitoring {
    fn default() -> Self {
        Monitoring { monitor: None, seen_version: Self::STALE, last_seen: Self::NEVER }
    }
}

/// A twin's effective rules as the API shows them.
#[derive(Debug, Clone, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RulesView {
    pub rules: Vec<RuleLine>,
    /// Rules that do not resolve, and why.
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RuleLine {
    pub id: String,
    pub kind: &'static str,
    pub severity: twinfleet_models::Severity,
    pub disabled: bool,
    pub for_ms: u64,
    pub clear_for_ms: u64,
    /// The layer that touched it last.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub source: twinfleet_models::LayerSource,
    /// Where it stands (persisted phase; `ok` when absent).
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub phase: Phase,
}

impl Dti {
    /// The effective rules with their provenance (resolved afresh, not from the cache).
    pub(crate) fn rules_view(&self) -> RulesView {
        let defaults = self.slot.ty.defaults();
        let layers = self.layers.iter().flat_map(|r| r.layers.iter());
        let e = effective_rules(&defaults, layers, &self.state.overrides, self.slot.ty.metrics.as_deref());
        RulesView {
            rules: e
                .rules
                .into_iter()
                .map(|(r, source)| RuleLine {
                    phase: self.state.rules.get(&r.id).copied().unwrap_or_default(),
                    kind: r.kind(),
                    severity: r.severity,
                    disabled: r.disabled,
                    for_ms: r.for_ms,
                    clear_for_ms: r.clear_for_ms,
                    id: r.id,
                    source,
                })
                .collect(),
            errors: e.errors.iter().map(|e| e.to_string()).collect(),
        }
    }

    /// Resolves the rules again if their layers changed.
    fn resolve_rules(&mut self) {
        let version = self.slot.ty.rules_version();
        if self.monitoring.seen_version == version && self.monitoring.last_seen().is_some() {
            return;
        }
        self.monitoring.seen_version = version;
        let defaults = self.slot.ty.defaults();
        let layers: Vec<_> = self.layers.iter().flat_map(|r| r.layers.iter()).collect();
        let any = defaults.contains_key(RULES_KEY)
            || self.state.overrides.contains_key(RULES_KEY)
            || layers.iter().any(|l| l.values.contains_key(RULES_KEY));
        if !any && self.state.rules.is_empty() {
            self.monitoring.monitor = None;
            return;
        }
        let own =
            self.state.overrides.contains_key(RULES_KEY) || layers.iter().any(|l| l.values.contains_key(RULES_KEY));
        let archived = self.state.lifecycle == twinfleet_models::Lifecycle::Archived;
        let (rules, errors) = if archived {
            // An archived (decommissioned) twin watches nothing: its alerts clear.
            (std::sync::Arc::from(Vec::new()), Vec::new())
        } else if own {
            let Effective { rules, errors } = effective_rules(
                &defaults,
                layers.iter().copied(),
                &self.state.overrides,
                self.slot.ty.metrics.as_deref(),
            );
            (rules.into_iter().map(|(r, _)| r).collect(), errors)
        } else {
            self.slot.ty.type_rules(version, &defaults)
        };
        let m = self.monitoring.monitor.get_or_insert_with(|| {
            Box::new(Monitor {
                rules: std::sync::Arc::from(Vec::new()),
                errors: Vec::new(),
                states: BTreeMap::new(),
                wake: None,
            })
        });
        m.states.retain(|id, _| rules.iter().any(|r| &r.id == id));
        m.rules = rules;
        m.errors = errors;
    }

    /// Steps every rule with the new `points` and `logs` (both empty: a deadline or a
    /// change of the rules). `device`: the input came from the device. The phases, and
    /// the alerts they raise or clear, go into `batch`. Returns the `last_seq` of a
    /// snapshot put into `batch` (see `Dti::journal`), for whoever awaits it.
    pub(crate) fn monitor(
        &mut self,
        points: &[MetricPoint],
        logs: &[LogLine],
        device: bool,
        batch: &mut WriteBatch,
        ctx: &mut Context<Self>,
    ) -> Option<u64> {
        let now = self.env().clock.now();
        if device || self.monitoring.last_seen().is_none() {
            self.monitoring.last_seen = now;
        }
        self.resolve_rules();
        let last_seen = self.monitoring.last_seen();
        let m = self.monitoring.monitor.as_mut()?;
        let latest = self.latest.as_deref();
        let get = |metric: &str| latest.and_then(|l| l.get(metric)).map(|p| (p.at, p.value));
        let obs = twinfleet_models::rules::Observed { points, logs, latest: &get, last_seen };
        let mut changes: Vec<(String, Phase)> = Vec::new();
        let mut raised = Vec::new();
        let mut cleared = Vec::new();
        let mut wake: Option<Timestamp> = None;
        let rules = m.rules.clone();
        for rule in rules.iter() {
            let stored = self.state.rules.get(&rule.id).copied().unwrap_or_default();
            if !m.states.contains_key(&rule.id) {
                m.states.insert(rule.id.clone(), RuleState { phase: stored, ..Default::default() });
            }
            let Some(st) = m.states.get_mut(&rule.id) else { continue };
            for e in st.step(rule, &obs, now) {
                match e {
                    RuleEffect::Raise { severity, message, values } => {
                        raised.push((rule.id.clone(), rule.kind(), severity, message, values))
                    }
                    RuleEffect::Clear { .. } => cleared.push(rule.id.clone()),
                    RuleEffect::WakeAt(t) => wake = Some(wake.map_or(t, |w| w.min(t))),
                }
            }
            if st.phase != stored {
                changes.push((rule.id.clone(), st.phase));
            }
        }
        // A rule gone from the layers while not ok: its alert clears.
        for (id, phase) in &self.state.rules {
            if !m.rules.iter().any(|r| &r.id == id) {
                changes.push((id.clone(), Phase::Ok));
                if matches!(phase, Phase::Firing { .. } | Phase::Clearing { .. }) {
                    cleared.push(id.clone());
                }
            }
        }
        // The next wake-up. An armed one that comes earlier stays (when it fires, the
        // look then arms the next): most inputs then touch no timer.
        let armed = m.wake.as_ref().map(|(t, _)| *t);
        if wake.is_some_and(|w| armed.is_none_or(|a| w < a)) {
            if let Some((_, h)) = m.wake.take() {
                ctx.cancel_future(h);
            }
            if let Some(t) = wake {
                let sleep = self.env().clock.sleep_until(t);
                let h = ctx.spawn(sleep.into_actor(self).map(|(), act, ctx| {
                    if let Some(m) = act.monitoring.monitor.as_mut() {
                        m.wake = None;
                    }
                    act.guarded(ctx, |act, ctx| act.monitor_tick(ctx));
                }));
                if let Some(m) = self.monitoring.monitor.as_mut() {
                    m.wake = Some((t, h));
                }
            }
        }
        self.carry_out_rules(changes, raised, cleared, now, batch, ctx)
    }

    /// Journals the phase changes and writes the alerts, into `batch`.
    fn carry_out_rules(
        &mut self,
        changes: Vec<(String, Phase)>,
        raised: Vec<Raised>,
        cleared: Vec<String>,
        now: Timestamp,
        batch: &mut WriteBatch,
        ctx: &mut Context<Self>,
    ) -> Option<u64> {
        if changes.is_empty() && raised.is_empty() && cleared.is_empty() {
            return None;
        }
        let env = self.slot.ty.infra.clone();
        let twin = self.slot.id.to_string();
        for rule in cleared {
            if let Err(e) = env.alert_book.clear_into(batch, &twin, &rule, now) {
                tracing::warn!(twin, rule, "an alert could not be cleared: {e}");
            }
        }
        for (rule, kind, severity, message, values) in raised {
            let draft = Draft {
                twin: twin.clone(),
                device_type: self.slot.ty.device_type.to_string(),
                rule: rule.clone(),
                kind,
                severity,
                message,
                values,
                memberships: self.state.memberships.iter().map(|d| d.to_string()).collect(),
                location: self.state.metadata.location.clone(),
                recent_events: self.recent_events(),
            };
            if let Err(e) = env.alert_book.raise_into(batch, draft, now) {
                tracing::warn!(twin, rule, "an alert could not be raised: {e}");
            }
        }
        let rules = twinfleet_models::TwinRules {
            desired_sync: &env.settings.desired_sync,
            install_deadline_ms: env.settings.install_deadline_ms,
            domain: None,
            metrics: self.slot.ty.metrics.as_deref(),
        };
        let mut events = Vec::new();
        for (rule, phase) in changes {
            match self.state.decide(TwinCommand::Record(EventKind::RulePhase { rule, phase }), now, rules) {
                Ok(d) => {
                    for e in &d.events {
                        self.state.evolve(e);
                    }
                    events.extend(d.events);
                }
                Err(e) => tracing::warn!(twin = %self.slot.id, "a rule's phase was not recorded: {e}"),
            }
        }
        self.slot.set_last_seq(self.state.last_seq);
        self.journal(&events, false, batch, ctx)
    }

    /// A deadline of a rule (or a change of the rules): steps them with no input and
    /// writes what changed.
    pub(crate) fn monitor_tick(&mut self, ctx: &mut Context<Self>) {
        let mut batch = WriteBatch::new();
        let snapshot = self.monitor(&[], &[], false, &mut batch, ctx);
        self.submit_monitoring(batch, snapshot, ctx);
    }

    /// Writes a batch of monitoring changes made outside a request.
    pub(crate) fn submit_monitoring(&mut self, batch: WriteBatch, snapshot: Option<u64>, ctx: &mut Context<Self>) {
        if batch.is_empty() {
            return;
        }
        let ticket = self.env().storage.submit(batch);
        ctx.spawn(actix::fut::wrap_future::<_, Self>(ticket).map(move |r, act, ctx| match r {
            Ok(()) => {
                if let Some(seq) = snapshot {
                    act.slot.snapshot_stored(seq);
                }
            }
            Err(e) => {
                act.crash(
                    ctx,
                    format!("a rule's change was refused by storage ({e}); restarting from the stored state"),
                )
            }
        }));
    }

    /// The last journal events of the twin that only it holds (since its snapshot), for
    /// an alert's context: `seq event` each, newest last, at most 10.
    fn recent_events(&self) -> Vec<String> {
        let Some(chunk) = self.chunk.as_deref() else { return Vec::new() };
        let events = crate::codec::decode_journal(&chunk.record()).unwrap_or_default();
        let mut out: Vec<String> = events
            .into_iter()
            .filter_map(|e| {
                let v = serde_json::to_value(&e.kind).ok()?;
                Some(format!("{} {}", e.seq, v.get("event")?.as_str()?))
            })
            .collect();
        let n = out.len().saturating_sub(10);
        out.drain(..n);
        out
    }
}
