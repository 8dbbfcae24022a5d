//! Monitoring rules (FR3/FR4 of Maree et al.): what a twin watches in its device's
//! metrics, heartbeat and app logs, and when that raises or clears an alert.
//!
//! - **Kinds** (`Condition`): `threshold` (above or below), `range` (outside min..max),
//!   `rate_of_change` (|Δvalue/Δt| per second), `staleness` (no point of a metric for a
//!   while), `offline` (no message at all for a while, default 20 s as in Bigler 2025),
//!   `log_pattern` (at least `count` matching app-log lines within a window), and
//!   `expression` (a condition over several metrics, `expr`).
//! - **Flapping**: every rule has `for` (the condition must hold that long before the
//!   alert is raised) and `clear_for` (the clear condition must hold that long before it
//!   clears), and separate clear conditions (hysteresis): `clear_below` for `above`,
//!   `clear_above` for `below`, `clear_margin` for ranges, `clear_per_s` for rates, `clear`
//!   for expressions.
//! - **Layers** (`effective_rules`): rules are configuration, under the key `rules`
//!   (rule id → rule object) of the device type's defaults (TDTA), the DTAs' layers (by
//!   priority) and the twin's overrides (DTI), resolved by the same layering. A later
//!   layer's object is a JSON merge patch on the rule of that id: it may change one field
//!   (`{"above": 90}`), disable the rule (`{"disabled": true}`: kept and shown, not
//!   evaluated) or remove it (`null`). A patch for an id that no earlier layer defines
//!   must be a whole rule (with `kind`); a rule of another kind under the same id is
//!   made by removing the old fields too (`null` each), or under a new id.
//! - **Lifecycle** (`RuleState::step`): ok → pending (condition holds, waiting out `for`)
//!   → firing (alert raised) → clearing (clear condition holds, waiting out `clear_for`)
//!   → ok (alert cleared). A step is pure: it takes the new points and log lines (or
//!   none, at a deadline), the twin's latest values and `now`, and returns effects: raise,
//!   clear, and the next time the rule needs a look without input.
//!
//! Durations are milliseconds or strings with a unit: `500ms`, `30s`, `5m`, `2h`, `1d`.

pub mod expr;

use crate::alert::Severity;
use crate::config::{LayerRef, LayerSource};
use crate::log::{LogLevel, LogLine};
use crate::telemetry::MetricPoint;
use crate::time::Timestamp;
use expr::Expr;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The longest duration a rule may name (`for`, `after`, `within`, ...): 30 days.
pub const MAX_DURATION_MS: u64 = 30 * 24 * 3_600_000;
/// Rules one layer may hold.
pub const MAX_RULES_PER_LAYER: usize = 256;
/// The default `after` of an `offline` rule (Bigler 2025: 20 s).
pub const DEFAULT_OFFLINE_MS: u64 = 20_000;

/// A duration in a rule: `500ms`, `30s`, `5m`, `2h`, `1d`, or a number of milliseconds.
pub fn parse_duration(v: &Value) -> Result<u64, String> {
    let bad = || format!("bad duration {v}: use milliseconds or e.g. 500ms, 30s, 5m, 2h, 1d (at most 30d)");
    let ms = match v {
        Value::Number(n) => n.as_u64().ok_or_else(bad)?,
        Value::String(s) => {
            let s = s.trim();
            let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
            let (n, unit) = s.split_at(split);
            let n: u64 = n.parse().map_err(|_| bad())?;
            let scale = match unit.trim() {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                _ => return Err(bad()),
            };
            n.checked_mul(scale).ok_or_else(bad)?
        }
        _ => return Err(bad()),
    };
    if ms > MAX_DURATION_MS {
        return Err(bad());
    }
    Ok(ms)
}

/// What a rule watches.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// Raise when the value is above `above` (clear once at or below `clear_below`,
    /// default `above`), or below `below` (clear at or above `clear_above`).
    Threshold { metric: String, bound: Bound },
    /// Raise when the value leaves `min..=max`; clear once it is back inside by
    /// `clear_margin`.
    Range { metric: String, min: f64, max: f64, clear_margin: f64 },
    /// Raise when the value changes faster than `max_per_s` (either way) between two
    /// points; clear once it changes at most `clear_per_s` (default `max_per_s`).
    RateOfChange { metric: String, max_per_s: f64, clear_per_s: f64 },
    /// Raise when the metric has had no point for `after_ms`; clear on the next point.
    Staleness { metric: String, after_ms: u64 },
    /// Raise when the device has sent nothing for `after_ms`; clear on its next message.
    Offline { after_ms: u64 },
    /// Raise when at least `count` app-log lines matching (`app`, level at least `level`,
    /// text containing `contains`) arrived within `within_ms`; clear when fewer do.
    LogPattern { app: Option<String>, level: LogLevel, contains: Option<String>, count: u32, within_ms: u64 },
    /// Raise when `expr` holds; clear when `clear` holds (default: when `expr` does not).
    /// `reads`: the metrics either reads.
    Expression { expr: Expr, source: String, clear: Option<(Expr, String)>, reads: Vec<String> },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bound {
    Above { limit: f64, clear_below: f64 },
    Below { limit: f64, clear_above: f64 },
}

/// One rule, resolved and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub id: String,
    pub severity: Severity,
    pub condition: Condition,
    pub for_ms: u64,
    pub clear_for_ms: u64,
    pub disabled: bool,
    pub description: String,
}

/// The keys a rule object may have.
pub const RULE_KEYS: [&str; 23] = [
    "kind",
    "severity",
    "for",
    "clear_for",
    "disabled",
    "description",
    "metric",
    "above",
    "below",
    "clear_above",
    "clear_below",
    "min",
    "max",
    "clear_margin",
    "max_per_s",
    "clear_per_s",
    "after",
    "app",
    "level",
    "contains",
    "count",
    "within",
    "expr",
];
/// ... and `clear` (an expression rule's clear condition).
const CLEAR_KEY: &str = "clear";

/// Why a rule was refused, naming the rule and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rule {rule:?}: {problem}")]
pub struct RuleError {
    pub rule: String,
    pub problem: String,
}

fn finite(o: &Map<String, Value>, key: &str) -> Result<Option<f64>, String> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            n.as_f64().filter(|v| v.is_finite()).map(Some).ok_or_else(|| format!("`{key}` is not a finite number"))
        }
        Some(v) => Err(format!("`{key}` must be a number, not {v}")),
    }
}

fn text(o: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= 1_024 => Ok(Some(s.clone())),
        Some(v) => Err(format!("`{key}` must be a string of at most 1,024 bytes, not {v}")),
    }
}

impl Rule {
    /// Its kind's name, as in its object.
    pub fn kind(&self) -> &'static str {
        match self.condition {
            Condition::Threshold { .. } => "threshold",
            Condition::Range { .. } => "range",
            Condition::RateOfChange { .. } => "rate_of_change",
            Condition::Staleness { .. } => "staleness",
            Condition::Offline { .. } => "offline",
            Condition::LogPattern { .. } => "log_pattern",
            Condition::Expression { .. } => "expression",
        }
    }

    /// Reads and checks rule `id` from its (merged) object. `metrics`: the metrics the
    /// device type declares, if it declares any (a rule on another one is refused).
    pub fn from_value(id: &str, v: &Value, metrics: Option<&[String]>) -> Result<Rule, RuleError> {
        Self::read(id, v, metrics).map_err(|problem| RuleError { rule: id.to_string(), problem })
    }

    fn read(id: &str, v: &Value, metrics: Option<&[String]>) -> Result<Rule, String> {
        crate::ids::DtaId::new(id).map_err(|e| format!("bad rule id: {e}"))?;
        let o = v.as_object().ok_or("a rule is a JSON object")?;
        if let Some(k) = o.keys().find(|k| !RULE_KEYS.contains(&k.as_str()) && k.as_str() != CLEAR_KEY) {
            return Err(format!("unknown field `{k}`"));
        }
        let kind = text(o, "kind")?
            .ok_or("no `kind` (threshold, range, rate_of_change, staleness, offline, log_pattern or expression)")?;
        let duration = |key: &str| o.get(key).map(parse_duration).transpose().map(Option::unwrap_or_default);
        let severity = match o.get("severity") {
            None => Severity::Warning,
            Some(s) => serde_json::from_value(s.clone())
                .map_err(|_| format!("bad severity {s}; one of info, warning, minor, major, critical"))?,
        };
        let metric = || -> Result<String, String> {
            let m = text(o, "metric")?.ok_or(format!("a {kind} rule names its `metric`"))?;
            if !crate::telemetry::metric_name_ok(&m) {
                return Err(format!("{m:?} is not a metric name"));
            }
            known(&m, metrics)?;
            Ok(m)
        };
        // Only the fields of its kind (a leftover of another kind is a mistake).
        let allowed: &[&str] = match kind.as_str() {
            "threshold" => &["metric", "above", "below", "clear_above", "clear_below"],
            "range" => &["metric", "min", "max", "clear_margin"],
            "rate_of_change" => &["metric", "max_per_s", "clear_per_s"],
            "staleness" => &["metric", "after"],
            "offline" => &["after"],
            "log_pattern" => &["app", "level", "contains", "count", "within"],
            "expression" => &["expr", "clear"],
            other => return Err(format!("unknown kind {other:?}")),
        };
        const COMMON: [&str; 6] = ["kind", "severity", "for", "clear_for", "disabled", "description"];
        if let Some(k) = o.keys().find(|k| !COMMON.contains(&k.as_str()) && !allowed.contains(&k.as_str())) {
            return Err(format!("`{k}` is no field of a {kind} rule"));
        }
        let condition = match kind.as_str() {
            "threshold" => {
                let (above, below) = (finite(o, "above")?, finite(o, "below")?);
                let (ca, cb) = (finite(o, "clear_above")?, finite(o, "clear_below")?);
                let bound = match (above, below) {
                    (Some(limit), None) => {
                        if ca.is_some() {
                            return Err("`clear_above` belongs to `below`; with `above` use `clear_below`".into());
                        }
                        let clear_below = cb.unwrap_or(limit);
                        if clear_below > limit {
                            return Err(format!(
                                "clear_below {clear_below} is above the raise bound {limit}: it would never hold back flapping but clear while still raised"
                            ));
                        }
                        Bound::Above { limit, clear_below }
                    }
                    (None, Some(limit)) => {
                        if cb.is_some() {
                            return Err("`clear_below` belongs to `above`; with `below` use `clear_above`".into());
                        }
                        let clear_above = ca.unwrap_or(limit);
                        if clear_above < limit {
                            return Err(format!(
                                "clear_above {clear_above} is below the raise bound {limit}: contradictory"
                            ));
                        }
                        Bound::Below { limit, clear_above }
                    }
                    (Some(_), Some(_)) => {
                        return Err("a threshold has `above` or `below`, not both (use a range)".into());
                    }
                    (None, None) => return Err("a threshold needs `above` or `below`".into()),
                };
                Condition::Threshold { metric: metric()?, bound }
            }
            "range" => {
                let min = finite(o, "min")?.ok_or("a range needs `min`")?;
                let max = finite(o, "max")?.ok_or("a range needs `max`")?;
                let clear_margin = finite(o, "clear_margin")?.unwrap_or(0.0);
                if min >= max {
                    return Err(format!("min {min} is not below max {max}"));
                }
                if clear_margin < 0.0 || 2.0 * clear_margin >= max - min {
                    return Err(format!(
                        "clear_margin {clear_margin} must be at least 0 and less than half of the range"
                    ));
                }
                Condition::Range { metric: metric()?, min, max, clear_margin }
            }
            "rate_of_change" => {
                let max_per_s = finite(o, "max_per_s")?.ok_or("a rate_of_change rule needs `max_per_s`")?;
                let clear_per_s = finite(o, "clear_per_s")?.unwrap_or(max_per_s);
                if max_per_s <= 0.0 || clear_per_s < 0.0 || clear_per_s > max_per_s {
                    return Err(format!(
                        "need 0 <= clear_per_s ({clear_per_s}) <= max_per_s ({max_per_s}), max_per_s > 0"
                    ));
                }
                Condition::RateOfChange { metric: metric()?, max_per_s, clear_per_s }
            }
            "staleness" => {
                let after_ms = duration("after")?;
                if after_ms == 0 {
                    return Err("a staleness rule needs `after` (e.g. \"5m\")".into());
                }
                Condition::Staleness { metric: metric()?, after_ms }
            }
            "offline" => {
                let after_ms = o.get("after").map(parse_duration).transpose()?.unwrap_or(DEFAULT_OFFLINE_MS);
                if after_ms == 0 {
                    return Err("`after` of an offline rule must be more than 0".into());
                }
                Condition::Offline { after_ms }
            }
            "log_pattern" => {
                let level = match o.get("level") {
                    None => LogLevel::Error,
                    Some(l) => serde_json::from_value(l.clone())
                        .map_err(|_| format!("bad level {l}; one of debug, info, warning, error"))?,
                };
                let count = match o.get("count") {
                    None => 1,
                    Some(c) => c
                        .as_u64()
                        .filter(|c| (1..=10_000).contains(c))
                        .ok_or(format!("count {c} is not 1 to 10,000"))? as u32,
                };
                let within_ms = duration("within")?;
                if within_ms == 0 {
                    return Err("a log_pattern rule needs `within` (e.g. \"1m\")".into());
                }
                Condition::LogPattern { app: text(o, "app")?, level, contains: text(o, "contains")?, count, within_ms }
            }
            _ => {
                let source = text(o, "expr")?.ok_or("an expression rule needs `expr`")?;
                let expr = Expr::parse(&source).map_err(|e| format!("expr {source:?}: {e}"))?;
                let clear = match text(o, CLEAR_KEY)? {
                    Some(c) => Some((Expr::parse(&c).map_err(|e| format!("clear {c:?}: {e}"))?, c)),
                    None => None,
                };
                let mut reads = expr.metrics();
                if let Some((c, _)) = &clear {
                    reads.extend(c.metrics());
                }
                for m in &reads {
                    known(m, metrics)?;
                }
                Condition::Expression { expr, source, clear, reads: reads.into_iter().collect() }
            }
        };
        let disabled = match o.get("disabled") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(format!("`disabled` must be true or false, not {v}")),
        };
        Ok(Rule {
            id: id.to_string(),
            severity,
            condition,
            for_ms: duration("for")?,
            clear_for_ms: duration("clear_for")?,
            disabled,
            description: text(o, "description")?.unwrap_or_default(),
        })
    }

    /// The metric(s) it reads, for the message.
    fn subject(&self) -> String {
        match &self.condition {
            Condition::Threshold { metric, .. }
            | Condition::Range { metric, .. }
            | Condition::RateOfChange { metric, .. }
            | Condition::Staleness { metric, .. } => metric.clone(),
            Condition::Offline { .. } => "the device".into(),
            Condition::LogPattern { app, .. } => app.clone().unwrap_or_else(|| "app logs".into()),
            Condition::Expression { source, .. } => source.clone(),
        }
    }
}

fn known(m: &str, metrics: Option<&[String]>) -> Result<(), String> {
    match metrics {
        Some(list) if !list.iter().any(|k| k == m) => {
            Err(format!("unknown metric {m:?}; the device type declares {}", list.join(", ")))
        }
        _ => Ok(()),
    }
}

/// The configuration key that holds rules, in a device type's defaults, a DTA's layers
/// and a twin's overrides: rules are layered exactly like configuration.
pub const RULES_KEY: &str = "rules";

/// A layer's rules: rule id → rule object, patch or `null`.
pub type RuleLayer = Map<String, Value>;

/// Checks one layer's `rules` value alone: ids, whole rules (with `kind`) in full,
/// patches for their keys and durations. `metrics`: the type's declared metrics, if any.
pub fn validate_layer(rules: &Value, metrics: Option<&[String]>) -> Result<(), RuleError> {
    let Some(layer) = rules.as_object() else {
        return Err(RuleError {
            rule: String::new(),
            problem: format!("`rules` is an object of rule id → rule, not {rules}"),
        });
    };
    if layer.len() > MAX_RULES_PER_LAYER {
        return Err(RuleError {
            rule: String::new(),
            problem: format!("{} rules; a layer holds at most {MAX_RULES_PER_LAYER}", layer.len()),
        });
    }
    for (id, v) in layer {
        let err = |problem: String| RuleError { rule: id.clone(), problem };
        crate::ids::DtaId::new(id).map_err(|e| err(format!("bad rule id: {e}")))?;
        match v {
            Value::Null => {}
            Value::Object(o) if o.contains_key("kind") => {
                Rule::from_value(id, v, metrics)?;
            }
            Value::Object(o) => {
                for (k, x) in o {
                    if !RULE_KEYS.contains(&k.as_str()) && k != CLEAR_KEY {
                        return Err(err(format!("unknown field `{k}`")));
                    }
                    if matches!(k.as_str(), "for" | "clear_for" | "after" | "within") && !x.is_null() {
                        parse_duration(x).map_err(err)?;
                    }
                    if matches!(k.as_str(), "expr" | "clear")
                        && let Some(s) = x.as_str()
                    {
                        Expr::parse(s).map_err(|e| err(format!("{k} {s:?}: {e}")))?;
                    }
                }
            }
            other => return Err(err(format!("a rule is an object (or null to remove it), not {other}"))),
        }
    }
    Ok(())
}

/// Checks the `rules` of a configuration document (type defaults, a DTA layer, a twin's
/// overrides), if it has any (`null` removes them all).
pub fn check_config(values: &Map<String, Value>, metrics: Option<&[String]>) -> Result<(), RuleError> {
    match values.get(RULES_KEY) {
        None | Some(Value::Null) => Ok(()),
        Some(v) => validate_layer(v, metrics),
    }
}

/// A twin's effective rules: each with the layer that touched it last, and the rules
/// that do not resolve (e.g. a patch with no rule beneath it) with why.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Effective {
    pub rules: Vec<(Rule, LayerSource)>,
    pub errors: Vec<RuleError>,
}

/// Resolves the `rules` of the type's defaults < the DTA layers (by priority, DTA id,
/// layer name; a layer reached twice counts once) < the twin's overrides, as
/// `config::effective_config` does: each rule's object is merge-patched by every later
/// layer that names it.
pub fn effective_rules<'a>(
    defaults: &Map<String, Value>,
    layers: impl IntoIterator<Item = &'a LayerRef>,
    overrides: &Map<String, Value>,
    metrics: Option<&[String]>,
) -> Effective {
    let mut ordered: Vec<&LayerRef> = layers.into_iter().collect();
    ordered.sort_by(|a, b| (a.priority, &a.dta, &a.name).cmp(&(b.priority, &b.dta, &b.name)));
    ordered.dedup_by(|a, b| a.dta == b.dta && a.name == b.name);
    let mut merged: BTreeMap<String, (Map<String, Value>, LayerSource)> = BTreeMap::new();
    let mut apply = |values: &Map<String, Value>, source: LayerSource| {
        let Some(Value::Object(layer)) = values.get(RULES_KEY) else { return };
        for (id, patch) in layer {
            match patch {
                Value::Object(p) => {
                    let entry = merged.entry(id.clone()).or_insert_with(|| (Map::new(), source.clone()));
                    crate::config::merge_patch(&mut entry.0, p);
                    entry.1 = source.clone();
                }
                _ => {
                    merged.remove(id);
                }
            }
        }
    };
    apply(defaults, LayerSource::TypeDefaults);
    for l in ordered {
        apply(&l.values, LayerSource::Dta { dta: l.dta.clone(), layer: l.name.to_string(), priority: l.priority });
    }
    apply(overrides, LayerSource::TwinOverride);
    let mut out = Effective::default();
    for (id, (v, source)) in merged {
        match Rule::from_value(&id, &Value::Object(v), metrics) {
            Ok(r) => out.rules.push((r, source)),
            Err(e) => out.errors.push(e),
        }
    }
    out
}

/// Where a rule stands.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "phase")]
pub enum Phase {
    #[default]
    Ok,
    /// The condition holds since `since`; raised once it has held `for`.
    Pending { since: Timestamp },
    /// Raised at `since`.
    Firing { since: Timestamp },
    /// Raised at `since`; its clear condition holds since `clearing`.
    Clearing { since: Timestamp, clearing: Timestamp },
}

/// A rule's persisted state: its phase and what its condition remembers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RuleState {
    pub phase: Phase,
    /// The metric's previous point (rate of change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<(Timestamp, f64)>,
    /// When the matching log lines of the window arrived (log patterns; at most `count`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hits: Vec<Timestamp>,
}

/// What a step sees.
#[allow(missing_debug_implementations)]
pub struct Observed<'a> {
    /// New points, in arrival order.
    pub points: &'a [MetricPoint],
    /// New app-log lines.
    pub logs: &'a [LogLine],
    /// The twin's newest value and time of a metric (including `points`).
    pub latest: &'a dyn Fn(&str) -> Option<(Timestamp, f64)>,
    /// When the device last sent anything (including this input).
    pub last_seen: Option<Timestamp>,
}

/// What a step asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum RuleEffect {
    /// Raise the rule's alert: the values that triggered it and why.
    Raise {
        severity: Severity,
        message: String,
        values: BTreeMap<String, f64>,
    },
    Clear {
        message: String,
    },
    /// Look again at this time even if nothing arrives (a `for` running out, a metric
    /// going stale, a log window sliding).
    WakeAt(Timestamp),
}

/// The condition, seen once: whether the raise condition and the clear condition hold
/// (`None`: unknown), and when it changes by itself (time-based kinds). What it says of
/// the values is only written when an alert is raised (`explain` below): a step that
/// changes nothing allocates nothing.
struct Seen {
    raise: Option<bool>,
    clear: Option<bool>,
    changes_at: Option<Timestamp>,
}

const UNKNOWN: Seen = Seen { raise: None, clear: None, changes_at: None };

/// An alert's message and triggering values, written when it is raised.
type Explain<'a> = &'a dyn Fn() -> (String, BTreeMap<String, f64>);

impl RuleState {
    /// Feeds `obs` at `now` to rule `rule`.
    pub fn step(&mut self, rule: &Rule, obs: &Observed<'_>, now: Timestamp) -> Vec<RuleEffect> {
        let mut effects = Vec::new();
        if rule.disabled {
            if matches!(self.phase, Phase::Firing { .. } | Phase::Clearing { .. }) {
                effects.push(RuleEffect::Clear { message: format!("rule {} disabled", rule.id) });
            }
            *self = RuleState::default();
            return effects;
        }
        let mut wake = None;
        match &rule.condition {
            Condition::Threshold { metric, .. }
            | Condition::Range { metric, .. }
            | Condition::RateOfChange { metric, .. } => {
                // Every point counts, in order.
                let mut any = false;
                for p in obs.points.iter().filter(|p| &p.metric == metric) {
                    any = true;
                    let (seen, rate) = self.value_seen(rule, p.at, p.value, true);
                    let explain = || value_explain(rule, metric, p.value, rate);
                    self.advance(rule, &seen, &explain, now, &mut effects, &mut wake);
                }
                if !any {
                    // A deadline: a threshold or range looks at the value that stands
                    // (a rate needs a new point).
                    match (obs.latest)(metric) {
                        Some((at, value)) if !matches!(rule.condition, Condition::RateOfChange { .. }) => {
                            let (seen, rate) = self.value_seen(rule, at, value, false);
                            let explain = || value_explain(rule, metric, value, rate);
                            self.advance(rule, &seen, &explain, now, &mut effects, &mut wake);
                        }
                        _ => self.advance(rule, &UNKNOWN, &|| Default::default(), now, &mut effects, &mut wake),
                    }
                }
            }
            Condition::Expression { expr, source, clear, reads } => {
                let touched = obs.points.is_empty() || obs.points.iter().any(|p| reads.contains(&p.metric));
                let get = |m: &str| (obs.latest)(m).map(|(_, v)| v);
                let seen = if touched {
                    let raise = expr.holds(&get);
                    let clear = match clear {
                        Some((c, _)) => c.holds(&get),
                        None => raise.map(|r| !r),
                    };
                    Seen { raise, clear, changes_at: None }
                } else {
                    UNKNOWN
                };
                let explain = || {
                    let values = reads.iter().filter_map(|m| get(m).map(|v| (m.clone(), v))).collect();
                    (format!("{source} holds"), values)
                };
                self.advance(rule, &seen, &explain, now, &mut effects, &mut wake);
            }
            Condition::Staleness { metric, after_ms } => {
                let last = (obs.latest)(metric).map(|(at, _)| at);
                let seen = silence(last, *after_ms, now);
                let explain = || silent_explain(last, now, &format!("no {metric} point"));
                self.advance(rule, &seen, &explain, now, &mut effects, &mut wake);
            }
            Condition::Offline { after_ms } => {
                let seen = silence(obs.last_seen, *after_ms, now);
                let explain = || silent_explain(obs.last_seen, now, "nothing from the device");
                self.advance(rule, &seen, &explain, now, &mut effects, &mut wake);
            }
            Condition::LogPattern { app, level, contains, count, within_ms } => {
                for l in obs.logs {
                    let hit = l.level >= *level
                        && app.as_ref().is_none_or(|a| &l.app == a)
                        && contains.as_ref().is_none_or(|c| l.text.contains(c.as_str()));
                    if hit {
                        self.hits.push(now);
                    }
                }
                let from = Timestamp(now.millis().saturating_sub(*within_ms as i64));
                self.hits.retain(|t| *t > from);
                let excess = self.hits.len().saturating_sub(*count as usize);
                self.hits.drain(..excess);
                let n = self.hits.len() as u32;
                let full = n >= *count;
                let seen = Seen {
                    raise: Some(full),
                    clear: Some(!full),
                    // The oldest hit leaves the window then.
                    changes_at: self.hits.first().filter(|_| full).map(|t| t.plus_millis(*within_ms + 1)),
                };
                let explain = || {
                    let values = BTreeMap::from([("lines".to_string(), f64::from(n))]);
                    (format!("{n} matching log lines within {within_ms} ms"), values)
                };
                self.advance(rule, &seen, &explain, now, &mut effects, &mut wake);
            }
        }
        if let Some(t) = wake {
            effects.push(RuleEffect::WakeAt(t));
        }
        effects
    }

    /// A metric rule's view of one value (`fresh`: a new point, which a rate of change
    /// remembers), and the rate where it computes one.
    fn value_seen(&mut self, rule: &Rule, at: Timestamp, v: f64, fresh: bool) -> (Seen, f64) {
        let (raise, clear, rate) = match &rule.condition {
            Condition::Threshold { bound: Bound::Above { limit, clear_below }, .. } => {
                (v > *limit, v <= *clear_below, 0.0)
            }
            Condition::Threshold { bound: Bound::Below { limit, clear_above }, .. } => {
                (v < *limit, v >= *clear_above, 0.0)
            }
            Condition::Range { min, max, clear_margin, .. } => {
                (v < *min || v > *max, v >= min + clear_margin && v <= max - clear_margin, 0.0)
            }
            Condition::RateOfChange { max_per_s, clear_per_s, .. } if fresh => {
                let before = self.last.replace((at, v));
                let Some((t0, v0)) = before.filter(|(t0, _)| at > *t0) else { return (UNKNOWN, 0.0) };
                let rate = ((v - v0) / ((at - t0) as f64 / 1000.0)).abs();
                (rate > *max_per_s, rate <= *clear_per_s, rate)
            }
            _ => return (UNKNOWN, 0.0),
        };
        (Seen { raise: Some(raise), clear: Some(clear), changes_at: None }, rate)
    }

    /// The lifecycle: one look at the condition at `at`.
    fn advance(
        &mut self,
        rule: &Rule,
        seen: &Seen,
        explain: Explain<'_>,
        at: Timestamp,
        effects: &mut Vec<RuleEffect>,
        wake: &mut Option<Timestamp>,
    ) {
        let soonest = |w: &mut Option<Timestamp>, t: Timestamp| *w = Some(w.map_or(t, |x| x.min(t)));
        let raise = |effects: &mut Vec<RuleEffect>| {
            let (why, values) = explain();
            effects.push(RuleEffect::Raise { severity: rule.severity, message: format!("{}: {why}", rule.id), values })
        };
        let cleared = |effects: &mut Vec<RuleEffect>| {
            effects.push(RuleEffect::Clear { message: format!("{}: {} is back to normal", rule.id, rule.subject()) })
        };
        self.phase = match (self.phase, seen.raise, seen.clear) {
            (Phase::Ok, Some(true), _) if rule.for_ms == 0 => {
                raise(effects);
                Phase::Firing { since: at }
            }
            (Phase::Ok, Some(true), _) => {
                soonest(wake, at.plus_millis(rule.for_ms));
                Phase::Pending { since: at }
            }
            (Phase::Pending { .. }, Some(false), _) => Phase::Ok,
            (Phase::Pending { since }, _, _) if at.since(since) >= rule.for_ms && seen.raise != Some(false) => {
                raise(effects);
                Phase::Firing { since: at }
            }
            (p @ Phase::Pending { since }, _, _) => {
                soonest(wake, since.plus_millis(rule.for_ms));
                p
            }
            (Phase::Firing { .. }, _, Some(true)) if rule.clear_for_ms == 0 => {
                cleared(effects);
                Phase::Ok
            }
            (Phase::Firing { since }, _, Some(true)) => {
                soonest(wake, at.plus_millis(rule.clear_for_ms));
                Phase::Clearing { since, clearing: at }
            }
            (Phase::Clearing { since, .. }, _, Some(false)) => Phase::Firing { since },
            (Phase::Clearing { clearing, .. }, _, _) if at.since(clearing) >= rule.clear_for_ms => {
                cleared(effects);
                Phase::Ok
            }
            (p @ Phase::Clearing { clearing, .. }, _, _) => {
                soonest(wake, clearing.plus_millis(rule.clear_for_ms));
                p
            }
            (p, _, _) => p,
        };
        if let Some(t) = seen.changes_at {
            soonest(wake, t);
        }
    }
}

/// What a metric rule says of the value that raised it.
fn value_explain(rule: &Rule, metric: &str, v: f64, rate: f64) -> (String, BTreeMap<String, f64>) {
    let why = match &rule.condition {
        Condition::Threshold { bound: Bound::Above { limit, .. }, .. } => format!("{metric} {v} above {limit}"),
        Condition::Threshold { bound: Bound::Below { limit, .. }, .. } => format!("{metric} {v} below {limit}"),
        Condition::Range { min, max, .. } => format!("{metric} {v} outside {min}..{max}"),
        Condition::RateOfChange { max_per_s, .. } => format!("{metric} changes {rate:.3}/s, over {max_per_s}/s"),
        _ => String::new(),
    };
    (why, BTreeMap::from([(metric.to_string(), v)]))
}

fn silent_explain(last: Option<Timestamp>, now: Timestamp, what: &str) -> (String, BTreeMap<String, f64>) {
    let quiet = last.map_or(0, |l| now.since(l));
    (format!("{what} for {} s", quiet / 1000), BTreeMap::from([("silent_ms".to_string(), quiet as f64)]))
}

/// A silence rule's view: raised once nothing came for `after_ms`.
fn silence(last: Option<Timestamp>, after_ms: u64, now: Timestamp) -> Seen {
    let Some(last) = last else {
        // Never heard from: nothing to miss yet.
        return UNKNOWN;
    };
    let silent = now.since(last) >= after_ms;
    Seen { raise: Some(silent), clear: Some(!silent), changes_at: (!silent).then(|| last.plus_millis(after_ms)) }
}

#[cfg(test)]
mod tests;
