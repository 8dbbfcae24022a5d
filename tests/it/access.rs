//! Operators over real HTTP on loopback: who may read and write which twin (roles ×
//! grants directly, via a DTA, via a TDTA), the audit log, and long-running jobs.

use crate::support::*;
use serde_json::{Value, json};
use std::net::SocketAddr;
use twinfleet::{DtaSpec, TwinError};
use twinfleet_protocols::HttpApi;

/// One blocking HTTP call off the actix thread.
async fn call(
    addr: SocketAddr,
    token: Option<&str>,
    method: &'static str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let (token, path) = (token.map(str::to_string), path.to_string());
    actix_rt::task::spawn_blocking(move || {
        let body = body.map(|b| b.to_string());
        match token {
            Some(t) => http_as(addr, &t, method, &path, body.as_deref()),
            None => http_request(addr, method, &path, body.as_deref()),
        }
    })
    .await
    .unwrap()
}

/// As admin: creates `user` with `role` in `group` and returns a token of theirs.
async fn user(addr: SocketAddr, admin: &str, name: &str, role: &str, group: &str) -> String {
    let (s, b) =
        call(addr, Some(admin), "POST", "/api/v1/users", Some(json!({"name": name, "role": role, "groups": [group]})))
            .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) =
        call(addr, Some(admin), "POST", &format!("/api/v1/users/{name}/tokens"), Some(json!({"description": "test"})))
            .await;
    assert_eq!(s, 201, "{b}");
    b["token"].as_str().unwrap().to_string()
}

#[actix_rt::test]
async fn roles_and_grants_decide_every_read_and_write_and_the_audit_log_shows_them() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), None, test_settings()).await;
    // A hospital DTA with a ward nested in it; twins of three types.
    for (id, parents) in [("hospital", vec![]), ("ward", vec![did("hospital")])] {
        p.create_dta(DtaSpec { id: did(id), name: id.into(), parents, layers: Default::default() }).await.unwrap();
    }
    fleet(&p, "pump", json!({}), "pump", 3, |i| if i == 2 { vec![did("ward")] } else { vec![] }).await;
    fleet(&p, "meter", json!({}), "meter", 1, |_| vec![]).await;
    fleet(&p, "valve", json!({}), "valve", 1, |_| vec![]).await;
    let http = HttpApi::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap(), 2).unwrap();
    let addr = http.local_addr();
    let admin = admin_token(&p).await;
    let admin = admin.as_str();

    // Group "ops": write on pump-0 directly, write on the hospital DTA (covers pump-2 in
    // the nested ward), read on every meter (TDTA), write on the valve type (to create).
    // Group "other": write on pump-1.
    let grants = json!([
        {"scope": {"twin": "pump-0"}, "access": "write"},
        {"scope": {"dta": "hospital"}, "access": "write"},
        {"scope": {"device_type": "meter"}, "access": "read"},
        {"scope": {"device_type": "valve"}, "access": "write"},
    ]);
    let (s, b) =
        call(addr, Some(admin), "POST", "/api/v1/groups", Some(json!({"name": "ops", "grants": grants}))).await;
    assert_eq!(s, 201, "{b}");
    let other = json!({"name": "other", "grants": [{"scope": {"twin": "pump-1"}, "access": "write"}]});
    assert_eq!(call(addr, Some(admin), "POST", "/api/v1/groups", Some(other)).await.0, 201);
    let mut tokens = vec![("admin", admin.to_string())];
    for role in ["configurator", "maintainer", "owner"] {
        tokens.push((role, user(addr, admin, role, role, "ops").await));
    }
    let outsider = user(addr, admin, "outsider", "configurator", "other").await;

    // The twins as seen from group "ops".
    let own = "pump-0"; // granted directly, write
    let foreign = "pump-1"; // granted to another group only
    let via_dta = "pump-2"; // member of ward, nested in hospital (write)
    let via_tdta = "meter-0"; // its type is granted, read only

    // Expected status per (role, operation, twin). Reads need any grant; desired state
    // (write) needs a write grant; metadata (manage) also needs maintainer or above.
    let expect = |role: &str, op: &str, twin: &str| -> u16 {
        if role == "admin" {
            return 200;
        }
        let access = match twin {
            t if t == own || t == via_dta => Some("write"),
            t if t == via_tdta => Some("read"),
            _ => None,
        };
        let role_ok = match op {
            "read" | "write" => true,
            "manage" => role != "owner",
            _ => unreachable!(),
        };
        match (role_ok, op, access) {
            (false, _, _) => 403,
            (_, "read", Some(_)) => 200,
            (_, _, Some("write")) => 200,
            _ => 403,
        }
    };
    for (role, token) in &tokens {
        for twin in [own, foreign, via_dta, via_tdta] {
            let ops: [(&str, &'static str, String, Option<Value>); 5] = [
                ("read", "GET", format!("/api/v1/twins/{twin}"), None),
                ("read", "GET", format!("/api/v1/twins/{twin}/telemetry"), None),
                ("read", "GET", format!("/api/v1/twins/{twin}/events"), None),
                ("write", "PATCH", format!("/api/v1/twins/{twin}/desired"), Some(json!({"rate": 5}))),
                ("manage", "PUT", format!("/api/v1/twins/{twin}/metadata"), Some(json!({"tags": [role]}))),
            ];
            for (op, method, path, body) in ops {
                let want = expect(role, op, twin);
                let (got, b) = call(addr, Some(token), method, &path, body.clone()).await;
                assert_eq!(got, want, "{role} {method} {path}: {b}");
                if want == 403 {
                    assert_eq!(b["error"], "forbidden", "{b}");
                }
                // Without a token, or with a wrong one: 401, whatever the twin.
                assert_eq!(call(addr, None, method, &path, body.clone()).await.0, 401, "{path}");
                assert_eq!(call(addr, Some("tfa_not-a-real-token-0000000000"), method, &path, body).await.0, 401);
            }
        }
    }
    // One call for many twins: each one answered, or refused, in its place.
    for (role, token) in &tokens {
        let path = format!("/api/v1/twin-views?ids={own},{foreign},nobody,{via_dta},{via_tdta}");
        let (got, b) = call(addr, Some(token), "GET", &path, None).await;
        assert_eq!(got, 200, "{role}: {b}");
        let items = b["twins"].as_array().unwrap();
        let ids: Vec<&str> = items.iter().map(|i| i["id"].as_str().unwrap()).collect();
        assert_eq!(ids, [own, foreign, "nobody", via_dta, via_tdta], "in the order asked");
        for item in items {
            let id = item["id"].as_str().unwrap();
            match (id, expect(role, "read", id)) {
                ("nobody", _) => assert_eq!(item["error"], "not_found", "{item}"),
                (_, 200) => assert_eq!(item["view"]["identity"]["twin_id"], id, "{role}: {item}"),
                _ => assert_eq!((&item["error"], &item["view"]), (&json!("forbidden"), &Value::Null), "{role}: {item}"),
            }
        }
    }
    let (got, b) = call(addr, Some(admin), "GET", "/api/v1/twin-views?ids=", None).await;
    assert_eq!((got, b["error"].as_str()), (400, Some("invalid")), "{b}");
    let many = (0..1_001).map(|i| format!("t{i}")).collect::<Vec<_>>().join(",");
    let (got, b) = call(addr, Some(admin), "GET", &format!("/api/v1/twin-views?ids={many}"), None).await;
    assert_eq!((got, b["error"].as_str()), (400, Some("invalid")), "more than 1,000 ids: {b}");

    // The outsider (configurator in "other") sees only pump-1.
    assert_eq!(call(addr, Some(&outsider), "GET", "/api/v1/twins/pump-1", None).await.0, 200);
    for t in [own, via_dta, via_tdta] {
        assert_eq!(call(addr, Some(&outsider), "GET", &format!("/api/v1/twins/{t}"), None).await.0, 403);
    }

    // Lists return only what the caller may read.
    let ids = |b: &Value| -> Vec<String> {
        b["twins"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap().to_string()).collect()
    };
    let owner = &tokens[3].1;
    let (s, b) = call(addr, Some(owner), "GET", "/api/v1/twins", None).await;
    assert_eq!((s, ids(&b)), (200, vec!["meter-0".to_string(), "pump-0".into(), "pump-2".into(), "valve-0".into()]));
    let (_, b) = call(addr, Some(admin), "GET", "/api/v1/twins?device_type=pump&limit=2", None).await;
    assert_eq!(
        (b["total"].as_u64(), ids(&b), b["next"].as_str()),
        (Some(3), vec!["pump-0".into(), "pump-1".into()], Some("pump-1"))
    );
    let (_, b) = call(addr, Some(admin), "GET", "/api/v1/twins?device_type=pump&after=pump-1", None).await;
    assert_eq!((ids(&b), b.get("next")), (vec!["pump-2".to_string()], None));
    let (_, b) = call(addr, Some(admin), "GET", "/api/v1/twins?group=hospital", None).await;
    assert_eq!(ids(&b), vec!["pump-2"], "a group lists its nested DTAs' members");
    let (_, b) = call(addr, Some(admin), "GET", "/api/v1/twins?tag=maintainer", None).await;
    assert_eq!(ids(&b), vec!["pump-0", "pump-2"], "metadata written by the maintainer");
    let (s, b) = call(addr, Some(admin), "GET", "/api/v1/twins?colour=red", None).await;
    assert_eq!((s, b["error"].as_str()), (400, Some("invalid")));

    // Provisioning: only a configurator with a write grant on the type creates and deletes.
    let valve = |id: &str| json!({"id": id, "device_type": "valve"});
    for (i, (role, token)) in tokens.iter().enumerate().skip(1) {
        let want = if *role == "configurator" { 201 } else { 403 };
        assert_eq!(
            call(addr, Some(token), "POST", "/api/v1/twins", Some(valve(&format!("valve-new-{i}")))).await.0,
            want,
            "{role}"
        );
    }
    let configurator = &tokens[1].1;
    let pump = json!({"id": "pump-new", "device_type": "pump"});
    assert_eq!(call(addr, Some(configurator), "POST", "/api/v1/twins", Some(pump)).await.0, 403, "no grant on pumps");
    assert_eq!(call(addr, Some(&tokens[2].1), "DELETE", "/api/v1/twins/valve-new-1", None).await.0, 403, "maintainer");
    let held = p.runtime().twin("valve-new-1").unwrap();
    assert_eq!(call(addr, Some(configurator), "DELETE", "/api/v1/twins/valve-new-1", None).await.0, 204);
    assert_eq!(call(addr, Some(admin), "GET", "/api/v1/twins/valve-new-1", None).await.0, 404, "deleted");
    // A handle taken before the deletion says "not found" too, not "try again later".
    assert!(matches!(held.get().await, Err(TwinError::NotFound(_))), "a retired twin is gone");
    // Archive: maintainer may, owner may not; an archived twin refuses writes (409).
    assert_eq!(call(addr, Some(owner), "POST", "/api/v1/twins/pump-0/archive", None).await.0, 403);
    assert_eq!(call(addr, Some(&tokens[2].1), "POST", "/api/v1/twins/pump-0/archive", None).await.0, 200);
    let (s, b) = call(addr, Some(owner), "PATCH", "/api/v1/twins/pump-0/desired", Some(json!({"rate": 6}))).await;
    assert_eq!((s, b["error"].as_str()), (409, Some("archived")), "{b}");
    let (_, b) = call(addr, Some(admin), "GET", "/api/v1/twins?state=archived", None).await;
    assert_eq!(ids(&b), vec!["pump-0"]);

    // Administration is for admins only; everyone may see themselves.
    for (role, token) in tokens.iter().skip(1) {
        assert_eq!(call(addr, Some(token), "GET", "/api/v1/users", None).await.0, 403, "{role}");
        assert_eq!(call(addr, Some(token), "GET", "/api/v1/audit", None).await.0, 403, "{role}");
        let (s, me) = call(addr, Some(token), "GET", "/api/v1/me", None).await;
        assert_eq!((s, me["user"]["role"].as_str()), (200, Some(*role)));
    }
    // Bad input to the admin API is a 4xx that says what is wrong.
    let (s, b) = call(addr, Some(admin), "POST", "/api/v1/users", Some(json!({"name": "x", "role": "king"}))).await;
    assert_eq!((s, b["error"].as_str()), (400, Some("invalid")), "{b}");
    let (s, _) = call(
        addr,
        Some(admin),
        "POST",
        "/api/v1/users",
        Some(json!({"name": "y", "role": "owner", "groups": ["nope"]})),
    )
    .await;
    assert_eq!(s, 404);
    let (s, _) =
        call(addr, Some(admin), "POST", "/api/v1/users", Some(json!({"name": "owner", "role": "owner"}))).await;
    assert_eq!(s, 409);
    assert_eq!(call(addr, Some(admin), "DELETE", "/api/v1/groups/ops", None).await.0, 409, "ops still has members");

    // Revoking a token locks its holder out at once.
    let (_, list) = call(addr, Some(admin), "GET", "/api/v1/users/owner/tokens", None).await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    assert!(!list.to_string().contains(owner.as_str()), "tokens are never shown again");
    assert_eq!(call(addr, Some(admin), "DELETE", &format!("/api/v1/users/owner/tokens/{id}"), None).await.0, 204);
    assert_eq!(call(addr, Some(owner), "GET", "/api/v1/twins/pump-0", None).await.0, 401);

    // The audit log has every write: who, what, when, outcome — refusals included.
    let (s, log) = call(addr, Some(admin), "GET", "/api/v1/audit?user=maintainer&limit=1000", None).await;
    assert_eq!(s, 200);
    let log = log.as_array().unwrap();
    let has = |method: &str, target: &str, status: u64| {
        log.iter().any(|e| {
            e["action"] == method && e["target"] == target && e["status"] == status && e["at"].as_i64().is_some()
        })
    };
    assert!(has("PATCH", "/api/v1/twins/pump-0/desired", 200), "{log:?}");
    // Stored in the batch of the change itself, and only there: one entry per write.
    let n = log.iter().filter(|e| e["action"] == "PATCH" && e["target"] == "/api/v1/twins/pump-0/desired").count();
    assert_eq!(n, 1, "{log:?}");
    assert!(has("PATCH", "/api/v1/twins/pump-1/desired", 403));
    assert!(has("POST", "/api/v1/twins/pump-0/archive", 200));
    assert!(log.iter().all(|e| e["user"] == "maintainer"));
    assert!(!log.iter().any(|e| e["action"] == "GET"), "reads are not audited");
    // A write the twin refused is audited with its refusal.
    let (_, log) =
        call(addr, Some(admin), "GET", "/api/v1/audit?user=owner&target=/api/v1/twins/pump-0/desired", None).await;
    assert_eq!(log.as_array().unwrap().iter().map(|e| e["status"].as_u64()).collect::<Vec<_>>()[0], Some(409), "{log}");
    let (_, page) = call(addr, Some(admin), "GET", "/api/v1/audit?limit=2", None).await;
    let before = page[1]["id"].as_u64().unwrap();
    let (_, older) = call(addr, Some(admin), "GET", &format!("/api/v1/audit?limit=1&before={before}"), None).await;
    assert!(older[0]["id"].as_u64().unwrap() < before, "paging goes back in time");
    let metrics = actix_rt::task::spawn_blocking(move || http_get(addr, "/metrics")).await.unwrap().1;
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(metrics.contains("twinfleet_rejected_total{reason=\"no_api_token\"}"), "{metrics}");
    assert!(metrics.contains("twinfleet_rejected_total{reason=\"bad_api_token\"}"));

    // Users, groups and tokens survive a restart.
    http.stop().await;
    p.shutdown().await;
    let p = start(dir.path(), None, test_settings()).await;
    let http = HttpApi::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap(), 1).unwrap();
    let addr = http.local_addr();
    assert_eq!(call(addr, Some(configurator), "GET", "/api/v1/twins/pump-2", None).await.0, 200);
    assert_eq!(call(addr, Some(owner), "GET", "/api/v1/twins/pump-2", None).await.0, 401, "still revoked");
    assert_eq!(call(addr, Some(admin), "GET", "/api/v1/twins/valve-new-1", None).await.0, 404, "still deleted");
    assert_eq!(p.bootstrap_admin(None).await.unwrap(), None, "no second bootstrap token");
    http.stop().await;
    p.shutdown().await;
}

#[actix_rt::test]
async fn a_ten_thousand_twin_creation_job_reports_progress_and_completes() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), None, test_settings()).await;
    fleet(&p, "tracker", json!({}), "seed", 1, |_| vec![]).await;
    p.create_dta(DtaSpec { id: did("depot"), name: "Depot".into(), parents: vec![], layers: Default::default() })
        .await
        .unwrap();
    let http = HttpApi::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap(), 1).unwrap();
    let addr = http.local_addr();
    let admin = admin_token(&p).await;
    let admin = Some(admin.as_str());

    let spec = json!({"kind": "create_twins", "device_type": "tracker",
        "generate": {"prefix": "trk-", "count": 10000, "dtas": ["depot"], "tags": ["fleet-a"]}});
    let (s, job) = call(addr, admin, "POST", "/api/v1/jobs", Some(spec)).await;
    assert_eq!(s, 202, "{job}");
    assert_eq!((job["state"].as_str(), job["total"].as_u64()), (Some("running"), Some(10_000)));
    let path = format!("/api/v1/jobs/{}", job["id"]);
    let seen = std::cell::RefCell::new(vec![]);
    let done = eventually("the job finishes", || {
        let path = path.clone();
        let seen = &seen;
        async move {
            let (s, j) = call(addr, admin, "GET", &path, None).await;
            assert_eq!(s, 200, "{j}");
            seen.borrow_mut().push(j["done"].as_u64().unwrap());
            (j["state"] != "running").then_some(j)
        }
    })
    .await;
    assert_eq!(
        (done["state"].as_str(), done["done"].as_u64(), done["failed"].as_u64()),
        (Some("succeeded"), Some(10_000), Some(0)),
        "{done}"
    );
    let seen = seen.into_inner();
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "progress only grows: {seen:?}");
    assert!(done["finished_at"].as_i64().is_some());
    assert_eq!(p.twin_count(), 10_001);
    let (_, page) = call(addr, admin, "GET", "/api/v1/twins?group=depot&tag=fleet-a&limit=1", None).await;
    assert_eq!(page["total"], 10_000);

    // Checked whole before it starts: an existing id, an unknown type, a malformed spec.
    let again = json!({"kind": "create_twins", "device_type": "tracker", "generate": {"prefix": "trk-", "count": 5, "start": 9998}});
    let (s, b) = call(addr, admin, "POST", "/api/v1/jobs", Some(again)).await;
    assert_eq!((s, b["error"].as_str()), (409, Some("already_exists")), "{b}");
    let (s, _) = call(
        addr,
        admin,
        "POST",
        "/api/v1/jobs",
        Some(json!({"kind": "create_twins", "device_type": "nope", "twins": [{"id": "x"}]})),
    )
    .await;
    assert_eq!(s, 404);
    let (s, b) = call(addr, admin, "POST", "/api/v1/jobs", Some(json!({"kind": "paint_twins"}))).await;
    assert_eq!((s, b["error"].as_str()), (400, Some("invalid")), "{b}");

    // Archiving a group is a job too.
    let (s, job) =
        call(addr, admin, "POST", "/api/v1/jobs", Some(json!({"kind": "archive_twins", "group": "depot"}))).await;
    assert_eq!(s, 202, "{job}");
    let path = format!("/api/v1/jobs/{}", job["id"]);
    let done = eventually("the archive job finishes", || {
        let path = path.clone();
        async move {
            let (_, j) = call(addr, admin, "GET", &path, None).await;
            (j["state"] != "running").then_some(j)
        }
    })
    .await;
    assert_eq!((done["state"].as_str(), done["done"].as_u64()), (Some("succeeded"), Some(10_000)), "{done}");
    let (_, page) = call(addr, admin, "GET", "/api/v1/twins?state=archived&limit=1", None).await;
    assert_eq!(page["total"], 10_000);
    let (_, jobs) = call(addr, admin, "GET", "/api/v1/jobs", None).await;
    assert_eq!(jobs.as_array().unwrap().len(), 2);
    http.stop().await;
    p.shutdown().await;
}

#[actix_rt::test]
async fn the_bootstrap_admin_comes_only_with_a_fresh_data_directory_or_an_explicit_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let given = format!("tfa_{}", "b".repeat(40));
    let p = start(dir.path(), None, test_settings()).await;
    assert_eq!(p.bootstrap_admin(Some(&given)).await.unwrap(), None, "the given token is not echoed");
    let access = &p.access();
    assert!(access.knows(&given));
    // Another admin revokes the bootstrap token.
    let id = access.tokens("admin")[0].id.clone();
    access.revoke_token("admin", &id).await.unwrap();
    p.shutdown().await;

    // Restarting with the same --admin-token does not bring it back.
    let p = start(dir.path(), None, test_settings()).await;
    assert_eq!(p.bootstrap_admin(Some(&given)).await.unwrap(), None);
    assert!(!p.access().knows(&given), "a revoked token never comes back silently");
    // Nor does a deleted admin, even when no user is left.
    p.access().delete_user("admin").await.unwrap();
    p.shutdown().await;
    let p = start(dir.path(), None, test_settings()).await;
    assert_eq!(p.bootstrap_admin(None).await.unwrap(), None, "no new admin token on a used directory");
    assert!(p.access().user("admin").is_err(), "a deleted admin is not re-created");

    // An explicit rotation brings the admin back with a new token; old ones stay revoked.
    let new = p.rotate_admin_token(None).await.unwrap().expect("a new token");
    let access = &p.access();
    assert!(access.knows(&new) && !access.knows(&given));
    assert_eq!(access.user("admin").unwrap().role, twinfleet::models::Role::Admin);
    let again = p.rotate_admin_token(Some(&given)).await.unwrap();
    assert_eq!(again, None);
    assert!(access.knows(&given) && !access.knows(&new), "a rotation revokes the earlier bootstrap token");
    p.shutdown().await;
}

#[actix_rt::test]
async fn authentication_is_decided_on_the_path_the_router_matches() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), None, test_settings()).await;
    let admin = admin_token(&p).await;
    let http = HttpApi::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap(), 1).unwrap();
    let addr = http.local_addr();
    let r = &p.rejections();
    for spelling in ["/%61pi/v1/users", "/api/v1/%75sers", "/%41PI/v1/users", "/api%2Fv1/users"] {
        let before = r.count("no_api_token");
        let (s, _) = call(addr, None, "GET", spelling, None).await;
        assert_eq!(s, 401, "{spelling} without a token");
        assert_eq!(r.count("no_api_token"), before + 1, "{spelling} is counted as a request without a token");
    }
    // With a token, an encoded write is served, and audited under the routed path.
    let (s, b) = call(addr, Some(&admin), "POST", "/%61pi/v1/groups", Some(json!({"name": "enc", "grants": []}))).await;
    assert_eq!(s, 201, "{b}");
    let (_, log) = call(addr, Some(&admin), "GET", "/api/v1/audit?limit=10", None).await;
    let entries = log.as_array().expect("the audit log is a list");
    assert!(
        entries.iter().any(|e| e["target"] == "/api/v1/groups" && e["action"] == "POST" && e["status"] == 201),
        "{log}"
    );
    // Public paths stay public.
    assert_eq!(call(addr, None, "GET", "/healthz", None).await.0, 200);
    assert_eq!(call(addr, None, "GET", "/api/v1/openapi.json", None).await.0, 200);
    http.stop().await;
    p.shutdown().await;
}
