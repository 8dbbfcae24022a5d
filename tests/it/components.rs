//! Model-generated component endpoints (Sartaj et al. 2023) over real HTTP: the medicine
//! dispenser's domain model from `device-types/medicine-dispenser.json`, its constraints
//! checked on every write (422 with the violations, nothing written), valid writes
//! stored and journalled.

use crate::support::*;
use serde_json::{Value, json};
use twinfleet::models::EventKind;
use twinfleet::{DeviceTypeSpec, TwinSpec};
use twinfleet_protocols::HttpApi;

const DISPENSER: &str = include_str!("../../device-types/medicine-dispenser.json");

const EXAMPLE: &str = include_str!("../../docs/examples/karie-components.json");

fn plan(period_days: i64, doses: i64) -> Value {
    json!({
        "first_dose_date": "2026-12-01",
        "period_days": period_days,
        "timings": [{"time": "09:00", "medications": [{"doses": doses, "current_roll": true, "next_roll": false}]}]
    })
}

#[actix_rt::test]
async fn the_dispensers_constraints_reject_bad_writes_with_422_and_accept_good_ones() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), None, test_settings()).await;
    let spec: DeviceTypeSpec = serde_json::from_str(DISPENSER).unwrap();
    let ty = p.create_device_type(spec).await.unwrap();
    ty.spawn_fleet(vec![TwinSpec::new(tid("karie-100"))]).await.unwrap();
    let http = HttpApi::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap(), 1).unwrap();
    let addr = http.local_addr();
    let token = admin_token(&p).await;
    let t = token.clone();
    let req = move |m: &'static str, path: String, body: Option<Value>| {
        let t = t.clone();
        actix_rt::task::spawn_blocking(move || http_as(addr, &t, m, &path, body.map(|b| b.to_string()).as_deref()))
    };
    let base = "/api/v1/twins/karie-100/components";

    // The reference model's required attributes: a partial first write is refused.
    let (s, b) = req("PUT", format!("{base}/settings/alarm"), Some(json!({"volume": 3}))).await.unwrap();
    assert_eq!(s, 422, "{b}");
    let v = b["violations"].as_array().unwrap();
    for required in ["type", "number", "location", "cartridge", "settings/alarm/silent_mode", "settings/display"] {
        assert!(v.iter().any(|v| v["property"] == required && v["rule"] == "required"), "{required}: {b}");
    }
    // The whole document first (docs/examples/karie-components.json), then edits.
    let example: Value = serde_json::from_str(EXAMPLE).unwrap();
    let (s, b) = req("PUT", base.to_string(), Some(example.clone())).await.unwrap();
    assert_eq!(s, 200, "{b}");
    let (s, b) = req("POST", format!("{base}/medicationplan"), Some(plan(7, 2))).await.unwrap();
    assert_eq!(s, 201, "{b}");
    let (s, b) = req("PUT", format!("{base}/settings/alarm/volume"), Some(json!(5))).await.unwrap();
    assert_eq!(s, 200, "{b}");
    let (s, _) = req("PUT", format!("{base}/settings/display/brightness"), Some(json!(5))).await.unwrap();
    assert_eq!(s, 200);
    let (s, _) = req("PUT", format!("{base}/settings/early_access_to_medication"), Some(json!(300))).await.unwrap();
    assert_eq!(s, 200);
    let (s, b) = req("GET", format!("{base}/settings/alarm"), None).await.unwrap();
    assert_eq!((s, &b["volume"], &b["melody"]), (200, &json!(5), &json!("chime")));
    let before = req("GET", base.to_string(), None).await.unwrap().1;

    // Every constraint of the paper and of its reference model: 422, the violation
    // named, nothing written.
    let line = "medicationplan/0/timings/0/medications/0";
    let cases: Vec<(&str, String, Option<Value>, &str, &str)> = vec![
        ("POST", format!("{base}/medicationplan"), Some(plan(0, 2)), "medicationplan/2/period_days", "min"),
        ("POST", format!("{base}/medicationplan"), Some(plan(29, 2)), "medicationplan/2/period_days", "max"),
        (
            "POST",
            format!("{base}/medicationplan"),
            Some(plan(7, 10)),
            "medicationplan/2/timings/0/medications/0/doses",
            "max",
        ),
        (
            "PUT",
            format!("{base}/{line}/doses"),
            Some(json!(-1)),
            "medicationplan/0/timings/0/medications/0/doses",
            "min",
        ),
        (
            "PUT",
            format!("{base}/settings/early_access_to_medication"),
            Some(json!(0)),
            "settings/early_access_to_medication",
            "min",
        ),
        (
            "PUT",
            format!("{base}/settings/early_access_to_medication"),
            Some(json!(301)),
            "settings/early_access_to_medication",
            "max",
        ),
        ("PUT", format!("{base}/settings/display/brightness"), Some(json!(6)), "settings/display/brightness", "max"),
        ("PUT", format!("{base}/settings/alarm/volume"), Some(json!(6)), "settings/alarm/volume", "max"),
        ("PUT", format!("{base}/settings/alarm/duration"), Some(json!(2)), "settings/alarm/duration", "min"),
        ("PUT", format!("{base}/settings/language"), Some(json!("Klingon")), "settings/language", "enum"),
        ("PUT", format!("{base}/settings/alarm/volume"), Some(json!("loud")), "settings/alarm/volume", "type"),
        ("PUT", format!("{base}/number"), Some(json!(0)), "number", "min"),
        (
            "PUT",
            format!("{base}/medicationplan/0/timings/0/time"),
            Some(json!("25:00")),
            "medicationplan/0/timings/0/time",
            "format",
        ),
        (
            "PUT",
            format!("{base}/medicationplan/0/first_dose_date"),
            Some(json!("2023-02-30")),
            "medicationplan/0/first_dose_date",
            "format",
        ),
        (
            "PUT",
            format!("{base}/{line}"),
            Some(json!({"doses": 1, "current_roll": false, "next_roll": false})),
            "medicationplan/0/timings/0/medications/0/current_roll|next_roll",
            "at_least_one_true",
        ),
        (
            "PUT",
            format!("{base}/cartridge"),
            Some(json!({"is_empty": true, "colour": "red"})),
            "cartridge/colour",
            "unknown",
        ),
        (
            "POST",
            format!("{base}/medicationplan"),
            Some(json!({"timings": [{"medications": [{"doses": 1, "current_roll": true, "next_roll": true}]}]})),
            "medicationplan/2/period_days",
            "required",
        ),
        // Required attributes cannot be deleted, nor a list emptied below its minimum.
        ("DELETE", format!("{base}/settings/alarm/volume"), None, "settings/alarm/volume", "required"),
        ("DELETE", format!("{base}/location"), None, "location", "required"),
        ("DELETE", format!("{base}/medicationplan/0/timings/0"), None, "medicationplan/0/timings", "min_items"),
    ];
    for (method, path, body, property, rule) in cases {
        let (s, b) = req(method, path.clone(), body.clone()).await.unwrap();
        assert_eq!(s, 422, "{method} {path} {body:?}: {b}");
        assert_eq!(b["error"], "constraint_violation");
        let v = b["violations"].as_array().unwrap();
        assert!(v.iter().any(|v| v["property"] == property && v["rule"] == rule), "{method} {path}: {b}");
    }
    assert_eq!(req("GET", base.to_string(), None).await.unwrap().1, before, "no rejected write changed anything");

    // PATCH /desired is validated exactly like a component write.
    let desired = "/api/v1/twins/karie-100/desired".to_string();
    for bad in [json!({"settings": {"alarm": {"volume": 99}}}), json!({"settings": {"display": {"brightness": "x"}}})] {
        let (s, b) = req("PATCH", desired.clone(), Some(json!({"components": bad}))).await.unwrap();
        assert_eq!((s, b["error"].as_str()), (422, Some("constraint_violation")), "{b}");
    }
    let (s, b) = req("PATCH", desired.clone(), Some(json!({"components": null}))).await.unwrap();
    assert_eq!(s, 422, "removing the whole document leaves its required parts missing: {b}");
    assert_eq!(req("GET", base.to_string(), None).await.unwrap().1, before, "no rejected PATCH changed anything");
    let (s, b) = req("PATCH", desired, Some(json!({"components": {"settings": {"alarm": {"volume": 1}}}, "rate": 2})))
        .await
        .unwrap();
    assert_eq!(s, 200, "{b}");
    let (s, b) = req("PUT", format!("{base}/settings/alarm/volume"), Some(json!(2))).await.unwrap();
    assert_eq!(s, 200, "a valid component write after a PATCH still works: {b}");

    // Unknown paths and bad bodies are 4xx, never 5xx.
    assert_eq!(req("PUT", format!("{base}/settings/nope"), Some(json!(1))).await.unwrap().0, 404);
    assert_eq!(req("GET", format!("{base}/medicationplan/9"), None).await.unwrap().0, 404);
    assert_eq!(req("POST", format!("{base}/settings"), Some(json!({}))).await.unwrap().0, 400);
    let broken = move || http_as(addr, &token, "PUT", "/api/v1/twins/karie-100/components/settings", Some("{oops"));
    let (s, b) = actix_rt::task::spawn_blocking(broken).await.unwrap();
    assert_eq!((s, b["error"].as_str()), (400, Some("invalid")), "{b}");
    let huge = json!("x".repeat(300 * 1024));
    let (s, _) = req("PUT", format!("{base}/note"), Some(huge)).await.unwrap();
    assert_eq!(s, 400, "an oversized body is refused");
    let (s, b) = req("GET", "/api/v1/twins/nobody/components".into(), None).await.unwrap();
    assert_eq!(s, 404, "{b}");

    // DELETE removes a medication plan; the writes are journalled as desired-state changes.
    let (s, _) = req("DELETE", format!("{base}/medicationplan/0"), None).await.unwrap();
    assert_eq!(s, 200);
    assert_eq!(req("GET", format!("{base}/medicationplan"), None).await.unwrap().1.as_array().unwrap().len(), 1);
    let events = p.twin("karie-100").unwrap().events(50).await.unwrap();
    assert_eq!(events.iter().filter(|e| matches!(e.kind, EventKind::DesiredSet { .. })).count(), 8);

    http.stop().await;
    p.shutdown().await;
}
