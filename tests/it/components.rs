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

fn plan(period_days: i64, doses: i64) -> Value {
    json!({
        "first_dose_date": "2026-12-01",
        "period_days": period_days,
        "intake_times": [{"time": "09:00", "medication_lines": [{"doses": doses, "current_roll": true}]}]
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

    // Valid writes: a medication plan (POST appends), alarm and display settings (PUT).
    let (s, b) = req("POST", format!("{base}/medication_plans"), Some(plan(7, 2))).await.unwrap();
    assert_eq!(s, 201, "{b}");
    let (s, b) = req("PUT", format!("{base}/settings/alarm"), Some(json!({"volume": 7, "melody": 2}))).await.unwrap();
    assert_eq!(s, 200, "{b}");
    let (s, _) = req("PUT", format!("{base}/settings/display/brightness"), Some(json!(5))).await.unwrap();
    assert_eq!(s, 200);
    let (s, _) = req("PUT", format!("{base}/settings/early_access_to_medication"), Some(json!(300))).await.unwrap();
    assert_eq!(s, 200);
    let (s, b) = req("GET", format!("{base}/settings"), None).await.unwrap();
    assert_eq!(
        (s, &b),
        (
            200,
            &json!({"alarm": {"volume": 7, "melody": 2}, "display": {"brightness": 5}, "early_access_to_medication": 300})
        )
    );
    let before = req("GET", base.to_string(), None).await.unwrap().1;

    // Every constraint of the paper, and the implied ones: 422, the violation named, nothing written.
    let cases: Vec<(&str, String, Value, &str, &str)> = vec![
        ("POST", format!("{base}/medication_plans"), plan(0, 2), "medication_plans/1/period_days", "min"),
        ("POST", format!("{base}/medication_plans"), plan(29, 2), "medication_plans/1/period_days", "max"),
        (
            "POST",
            format!("{base}/medication_plans"),
            plan(7, 10),
            "medication_plans/1/intake_times/0/medication_lines/0/doses",
            "max",
        ),
        (
            "PUT",
            format!("{base}/medication_plans/0/intake_times/0/medication_lines/0/doses"),
            json!(-1),
            "medication_plans/0/intake_times/0/medication_lines/0/doses",
            "min",
        ),
        (
            "PUT",
            format!("{base}/settings/early_access_to_medication"),
            json!(0),
            "settings/early_access_to_medication",
            "min",
        ),
        (
            "PUT",
            format!("{base}/settings/early_access_to_medication"),
            json!(301),
            "settings/early_access_to_medication",
            "max",
        ),
        ("PUT", format!("{base}/settings/display/brightness"), json!(6), "settings/display/brightness", "max"),
        ("PUT", format!("{base}/settings/language"), json!("Klingon"), "settings/language", "enum"),
        ("PUT", format!("{base}/settings/alarm/volume"), json!("loud"), "settings/alarm/volume", "type"),
        (
            "PUT",
            format!("{base}/medication_plans/0/intake_times/0/time"),
            json!("25:00"),
            "medication_plans/0/intake_times/0/time",
            "format",
        ),
        (
            "PUT",
            format!("{base}/medication_plans/0/intake_times/0/medication_lines/0"),
            json!({"doses": 1, "current_roll": false, "next_roll": false}),
            "medication_plans/0/intake_times/0/medication_lines/0/current_roll|next_roll",
            "at_least_one_true",
        ),
        (
            "PUT",
            format!("{base}/settings/alarm"),
            json!({"volume": 1, "colour": "red"}),
            "settings/alarm/colour",
            "unknown",
        ),
        (
            "POST",
            format!("{base}/medication_plans"),
            json!({"period_days": 3}),
            "medication_plans/1/first_dose_date",
            "required",
        ),
    ];
    for (method, path, body, property, rule) in cases {
        let (s, b) = req(method, path.clone(), Some(body.clone())).await.unwrap();
        assert_eq!(s, 422, "{method} {path} {body}: {b}");
        assert_eq!(b["error"], "constraint_violation");
        let v = b["violations"].as_array().unwrap();
        assert!(v.iter().any(|v| v["property"] == property && v["rule"] == rule), "{method} {path}: {b}");
    }
    assert_eq!(req("GET", base.to_string(), None).await.unwrap().1, before, "no rejected write changed anything");

    // Unknown paths and bad bodies are 4xx, never 5xx.
    assert_eq!(req("PUT", format!("{base}/settings/nope"), Some(json!(1))).await.unwrap().0, 404);
    assert_eq!(req("GET", format!("{base}/medication_plans/9"), None).await.unwrap().0, 404);
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
    let (s, _) = req("DELETE", format!("{base}/medication_plans/0"), None).await.unwrap();
    assert_eq!(s, 200);
    assert_eq!(req("GET", format!("{base}/medication_plans"), None).await.unwrap().1, json!([]));
    let events = p.twin("karie-100").unwrap().events(50).await.unwrap();
    assert_eq!(events.iter().filter(|e| matches!(e.kind, EventKind::DesiredSet { .. })).count(), 5);

    http.stop().await;
    p.shutdown().await;
}
