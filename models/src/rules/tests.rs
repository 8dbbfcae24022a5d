use super::*;
use serde_json::json;

fn layer(v: Value) -> RuleLayer {
    v.as_object().unwrap().clone()
}

fn rule(id: &str, v: Value) -> Rule {
    Rule::from_value(id, &v, None).unwrap()
}

fn pt(metric: &str, at: i64, value: f64) -> MetricPoint {
    MetricPoint { metric: metric.into(), at: Timestamp(at), value }
}

/// Steps `rule` with `points` at `now` (latest = the last point of each metric).
fn feed(state: &mut RuleState, rule: &Rule, points: &[MetricPoint], now: i64) -> Vec<RuleEffect> {
    let latest = |m: &str| points.iter().rev().find(|p| p.metric == m).map(|p| (p.at, p.value));
    let obs = Observed { points, logs: &[], latest: &latest, last_seen: Some(Timestamp(now)) };
    state.step(rule, &obs, Timestamp(now))
}

/// A deadline: no new input; the twin's latest values are `standing`.
fn tick(state: &mut RuleState, rule: &Rule, standing: &[MetricPoint], now: i64) -> Vec<RuleEffect> {
    let latest = |m: &str| standing.iter().rev().find(|p| p.metric == m).map(|p| (p.at, p.value));
    let obs = Observed { points: &[], logs: &[], latest: &latest, last_seen: Some(Timestamp(now)) };
    state.step(rule, &obs, Timestamp(now))
}

fn kinds(effects: &[RuleEffect]) -> Vec<&'static str> {
    effects
        .iter()
        .map(|e| match e {
            RuleEffect::Raise { .. } => "raise",
            RuleEffect::Clear { .. } => "clear",
            RuleEffect::WakeAt(_) => "wake",
        })
        .collect()
}

fn with_rules(v: Value) -> Map<String, Value> {
    layer(json!({ "rules": v }))
}

fn dta(id: &str, priority: i32, rules: Value) -> LayerRef {
    LayerRef {
        dta: crate::ids::DtaId::new(id).unwrap(),
        name: std::sync::Arc::from("monitoring"),
        priority,
        values: std::sync::Arc::new(with_rules(rules)),
    }
}

#[test]
fn a_type_threshold_is_overridden_by_a_dta_and_disabled_by_a_twin() {
    let ty = with_rules(json!({"hot": {"kind": "threshold", "metric": "temp", "above": 80, "severity": "major"},
                               "quiet": {"kind": "offline"}}));
    let dtas = [
        dta("b-high", 10, json!({"hot": {"above": 90, "for": "30s"}})),
        dta("a-low", 1, json!({"hot": {"above": 85}})),
    ];
    let e = effective_rules(&ty, &dtas, &Map::new(), None);
    assert!(e.errors.is_empty(), "{:?}", e.errors);
    let (hot, source) = e.rules.iter().find(|(r, _)| r.id == "hot").unwrap();
    assert_eq!(
        hot.condition,
        Condition::Threshold { metric: "temp".into(), bound: Bound::Above { limit: 90.0, clear_below: 90.0 } }
    );
    assert_eq!((hot.for_ms, hot.severity), (30_000, Severity::Major), "the patch keeps what it does not name");
    assert!(
        matches!(source, LayerSource::Dta { dta, priority: 10, .. } if dta.as_str() == "b-high"),
        "the higher priority has the last word"
    );
    let quiet = &e.rules.iter().find(|(r, _)| r.id == "quiet").unwrap().0;
    assert_eq!(quiet.condition, Condition::Offline { after_ms: DEFAULT_OFFLINE_MS });

    // The twin disables one, removes the other, and adds its own.
    let twin = with_rules(
        json!({"hot": {"disabled": true}, "quiet": null, "mine": {"kind": "staleness", "metric": "temp", "after": "5m"}}),
    );
    let e = effective_rules(&ty, &dtas, &twin, None);
    let ids: Vec<(&str, bool)> = e.rules.iter().map(|(r, _)| (r.id.as_str(), r.disabled)).collect();
    assert_eq!(ids, [("hot", true), ("mine", false)]);
    assert_eq!(e.rules[0].1, LayerSource::TwinOverride);
    // A patch with nothing beneath it does not resolve, and says so.
    let e = effective_rules(&Map::new(), &[], &with_rules(json!({"ghost": {"above": 1}})), None);
    assert!(e.rules.is_empty() && e.errors[0].rule == "ghost" && e.errors[0].problem.contains("no `kind`"), "{e:?}");
}

#[test]
fn hysteresis_and_for_keep_a_value_at_its_threshold_from_flapping() {
    let r = rule("hot", json!({"kind": "threshold", "metric": "temp", "above": 80, "clear_below": 75, "for": "10s"}));
    let mut s = RuleState::default();
    // Over, then back under within `for`: never raised.
    assert_eq!(kinds(&feed(&mut s, &r, &[pt("temp", 0, 81.0)], 0)), ["wake"]);
    assert!(matches!(s.phase, Phase::Pending { .. }));
    assert!(kinds(&feed(&mut s, &r, &[pt("temp", 5_000, 79.0)], 5_000)).is_empty());
    assert_eq!(s.phase, Phase::Ok);
    // Over for 10 s (the deadline comes as a wake-up with no input): raised once.
    assert_eq!(feed(&mut s, &r, &[pt("temp", 6_000, 81.0)], 6_000), [RuleEffect::WakeAt(Timestamp(16_000))]);
    assert!(kinds(&feed(&mut s, &r, &[pt("temp", 9_000, 83.0)], 9_000)).iter().all(|k| *k == "wake"));
    let raised = tick(&mut s, &r, &[pt("temp", 9_000, 83.0)], 16_000);
    let RuleEffect::Raise { severity, message, .. } = &raised[0] else { panic!("{raised:?}") };
    assert_eq!(*severity, Severity::Warning);
    assert!(message.contains("above 80"), "{message}");
    // Hovering between 75 and 80 neither clears nor raises again.
    for (i, v) in [79.0, 81.0, 76.0, 80.0].into_iter().enumerate() {
        assert!(feed(&mut s, &r, &[pt("temp", 20_000 + i as i64, v)], 20_000 + i as i64).is_empty());
    }
    // At or below 75 it clears.
    assert_eq!(kinds(&feed(&mut s, &r, &[pt("temp", 30_000, 75.0)], 30_000)), ["clear"]);
    // Every point of a batch counts: a spike inside one raises (no `for`).
    let spike = rule("spike", json!({"kind": "threshold", "metric": "temp", "above": 80}));
    let mut s = RuleState::default();
    let batch = [pt("temp", 1, 70.0), pt("temp", 2, 99.0), pt("temp", 3, 70.0)];
    assert_eq!(kinds(&feed(&mut s, &spike, &batch, 3)), ["raise", "clear"]);
}

#[test]
fn clear_for_holds_an_alert_until_the_value_stays_normal() {
    let r = rule(
        "low",
        json!({"kind": "threshold", "metric": "battery", "below": 10, "clear_above": 15, "clear_for": "1m"}),
    );
    let mut s = RuleState::default();
    assert_eq!(kinds(&feed(&mut s, &r, &[pt("battery", 0, 9.0)], 0)), ["raise"]);
    assert_eq!(kinds(&feed(&mut s, &r, &[pt("battery", 1, 16.0)], 1_000)), ["wake"]);
    assert!(feed(&mut s, &r, &[pt("battery", 2, 14.0)], 2_000).is_empty(), "back in the band: clearing stops");
    assert_eq!(kinds(&feed(&mut s, &r, &[pt("battery", 3, 16.0)], 3_000)), ["wake"]);
    assert_eq!(kinds(&tick(&mut s, &r, &[pt("battery", 3, 16.0)], 63_000)), ["clear"]);
}

#[test]
fn a_device_goes_offline_after_20_s_of_silence_and_comes_back() {
    let r = rule("offline", json!({"kind": "offline"}));
    let mut s = RuleState::default();
    let none = |_: &str| None;
    let at = |s: &mut RuleState, last: i64, now: i64| {
        let obs = Observed { points: &[], logs: &[], latest: &none, last_seen: Some(Timestamp(last)) };
        s.step(&r, &obs, Timestamp(now))
    };
    assert_eq!(at(&mut s, 0, 0), [RuleEffect::WakeAt(Timestamp(20_000))]);
    assert_eq!(at(&mut s, 0, 19_999), [RuleEffect::WakeAt(Timestamp(20_000))]);
    let e = at(&mut s, 0, 20_000);
    assert!(
        matches!(&e[0], RuleEffect::Raise { message, .. } if message.contains("nothing from the device for 20 s")),
        "{e:?}"
    );
    assert!(at(&mut s, 0, 40_000).is_empty(), "raised once");
    assert_eq!(kinds(&at(&mut s, 41_000, 41_000)), ["clear", "wake"]);
    // Never heard from: not offline (nothing to miss).
    let mut fresh = RuleState::default();
    let obs = Observed { points: &[], logs: &[], latest: &none, last_seen: None };
    assert!(fresh.step(&r, &obs, Timestamp(99_000)).is_empty());
}

#[test]
fn a_log_pattern_fires_on_enough_errors_of_an_app_within_its_window() {
    let r = rule(
        "crashy",
        json!({"kind": "log_pattern", "app": "pump", "level": "error", "contains": "stall", "count": 3, "within": "1m"}),
    );
    let mut s = RuleState::default();
    let none = |_: &str| None;
    let line = |app: &str, level, text: &str| LogLine { at: Timestamp(0), level, app: app.into(), text: text.into() };
    let logs = |s: &mut RuleState, lines: &[LogLine], now: i64| {
        let obs = Observed { points: &[], logs: lines, latest: &none, last_seen: Some(Timestamp(now)) };
        kinds(&s.step(&r, &obs, Timestamp(now)))
    };
    let stall = line("pump", LogLevel::Error, "motor stall at 3 A");
    let noise = [
        line("ui", LogLevel::Error, "stall"),
        line("pump", LogLevel::Info, "stall"),
        line("pump", LogLevel::Error, "ok"),
    ];
    assert!(logs(&mut s, &noise, 0).is_empty(), "other apps, lower levels, other texts do not count");
    assert!(logs(&mut s, std::slice::from_ref(&stall), 1_000).is_empty());
    assert!(logs(&mut s, std::slice::from_ref(&stall), 2_000).is_empty());
    assert_eq!(logs(&mut s, std::slice::from_ref(&stall), 3_000), ["raise", "wake"]);
    // The window slides: once the first of the three is over a minute old, it clears.
    assert_eq!(logs(&mut s, &[], 61_001), ["clear"]);
}

#[test]
fn rate_range_and_expression_rules_raise_and_clear() {
    let rate = rule("jump", json!({"kind": "rate_of_change", "metric": "p", "max_per_s": 10, "clear_per_s": 2}));
    let mut s = RuleState::default();
    assert!(feed(&mut s, &rate, &[pt("p", 0, 0.0)], 0).is_empty(), "one point: no rate yet");
    assert_eq!(kinds(&feed(&mut s, &rate, &[pt("p", 1_000, 50.0)], 1_000)), ["raise"]);
    assert!(feed(&mut s, &rate, &[pt("p", 2_000, 45.0)], 2_000).is_empty(), "5/s: not yet calm");
    assert_eq!(kinds(&feed(&mut s, &rate, &[pt("p", 3_000, 44.0)], 3_000)), ["clear"]);

    let range = rule("band", json!({"kind": "range", "metric": "t", "min": 10, "max": 20, "clear_margin": 1}));
    let mut s = RuleState::default();
    assert_eq!(kinds(&feed(&mut s, &range, &[pt("t", 0, 21.0)], 0)), ["raise"]);
    assert!(feed(&mut s, &range, &[pt("t", 1, 19.5)], 1).is_empty(), "inside, but not by the margin");
    assert_eq!(kinds(&feed(&mut s, &range, &[pt("t", 2, 18.0)], 2)), ["clear"]);

    let both = rule(
        "dry-heat",
        json!({"kind": "expression", "expr": "temp > 30 && humidity < 20", "clear": "temp < 28 || humidity > 25", "severity": "critical"}),
    );
    let mut s = RuleState::default();
    assert!(feed(&mut s, &both, &[pt("temp", 0, 35.0)], 0).is_empty(), "humidity unknown yet");
    let e = feed(&mut s, &both, &[pt("temp", 1, 35.0), pt("humidity", 1, 10.0)], 1);
    let RuleEffect::Raise { severity, values, .. } = &e[0] else { panic!("{e:?}") };
    assert_eq!((*severity, values.len()), (Severity::Critical, 2));
    assert!(feed(&mut s, &both, &[pt("temp", 2, 29.0), pt("humidity", 2, 22.0)], 2).is_empty(), "hysteresis");
    assert_eq!(kinds(&feed(&mut s, &both, &[pt("temp", 3, 27.0), pt("humidity", 3, 22.0)], 3)), ["clear"]);
}

#[test]
fn disabling_a_firing_rule_clears_its_alert() {
    let mut r = rule("hot", json!({"kind": "threshold", "metric": "t", "above": 1}));
    let mut s = RuleState::default();
    assert_eq!(kinds(&feed(&mut s, &r, &[pt("t", 0, 2.0)], 0)), ["raise"]);
    r.disabled = true;
    assert_eq!(kinds(&feed(&mut s, &r, &[pt("t", 1, 2.0)], 1)), ["clear"]);
    assert!(feed(&mut s, &r, &[pt("t", 2, 2.0)], 2).is_empty());
    // The state round-trips through JSON (it is persisted).
    let s = RuleState {
        phase: Phase::Clearing { since: Timestamp(1), clearing: Timestamp(2) },
        last: Some((Timestamp(3), 4.0)),
        hits: vec![Timestamp(5)],
    };
    assert_eq!(serde_json::from_value::<RuleState>(serde_json::to_value(&s).unwrap()).unwrap(), s);
}

#[test]
fn a_malformed_rule_is_refused_naming_the_problem() {
    let metrics = ["temp".to_string(), "humidity".to_string()];
    for (v, says) in [
        (
            json!({"kind": "threshold", "metric": "pressure", "above": 1}),
            "unknown metric \"pressure\"; the device type declares temp, humidity",
        ),
        (
            json!({"kind": "threshold", "metric": "temp", "above": 80, "clear_below": 85}),
            "clear_below 85 is above the raise bound 80",
        ),
        (json!({"kind": "threshold", "metric": "temp", "below": 10, "clear_above": 5}), "contradictory"),
        (json!({"kind": "threshold", "metric": "temp", "above": 1, "below": 2}), "not both"),
        (json!({"kind": "range", "metric": "temp", "min": 5, "max": 5}), "min 5 is not below max 5"),
        (json!({"kind": "staleness", "metric": "temp", "after": "5 minutes"}), "bad duration \"5 minutes\""),
        (json!({"kind": "threshold", "metric": "temp", "above": 1, "for": -3}), "bad duration -3"),
        (json!({"kind": "offline", "after": "40d"}), "at most 30d"),
        (json!({"kind": "expression", "expr": "temp >"}), "expr \"temp >\": the expression ends"),
        (json!({"kind": "expression", "expr": "temp > 1 && rain > 2"}), "unknown metric \"rain\""),
        (
            json!({"kind": "threshold", "metric": "temp", "above": 1, "within": "1m"}),
            "`within` is no field of a threshold rule",
        ),
        (json!({"kind": "threshold", "metric": "temp", "abov": 1}), "unknown field `abov`"),
        (json!({"kind": "sometimes"}), "unknown kind \"sometimes\""),
        (json!({"kind": "offline", "severity": "apocalyptic"}), "bad severity"),
        (json!({"kind": "log_pattern", "count": 0, "within": "1m"}), "count 0"),
        (json!({"kind": "log_pattern", "level": "loud", "within": "1m"}), "bad level"),
    ] {
        let e = Rule::from_value("r", &v, Some(&metrics)).unwrap_err();
        assert!(e.to_string().contains(says), "{v}: {e}");
    }
    // A layer is checked alone: whole rules in full, patches by their keys.
    let ok = json!({"a": {"kind": "offline", "after": "1m"}, "b": {"above": 3, "for": "10s"}, "c": null});
    assert_eq!(validate_layer(&ok, None), Ok(()));
    assert!(validate_layer(&json!([1]), None).unwrap_err().to_string().contains("is an object"));
    for (v, says) in [
        (json!({"b": {"for": "soon"}}), "bad duration"),
        (json!({"b": {"colour": "red"}}), "unknown field `colour`"),
        (json!({"b": {"expr": "x >"}}), "expr"),
        (json!({"bad id": {"above": 1}}), "bad rule id"),
        (json!({"b": 7}), "is an object"),
    ] {
        let e = validate_layer(&v, None).unwrap_err();
        assert!(e.to_string().contains(says), "{v}: {e}");
    }
    assert_eq!(parse_duration(&json!("1500ms")), Ok(1_500));
    assert_eq!(parse_duration(&json!("2h")), Ok(7_200_000));
    assert_eq!(parse_duration(&json!(250)), Ok(250));
}
