//! Telemetry reads: bounded by default, paged exactly, served from storage without the
//! twin (a twin that cannot answer still has its history read), and the latest values
//! survive a restart.

use crate::support::*;
use serde_json::{Value, json};
use std::collections::HashSet;
use twinfleet::models::{MetricPoint, Timestamp};
use twinfleet::{ActorStatus, TwinError};
use twinfleet_protocols::HttpApi;

#[actix_rt::test]
async fn telemetry_reads_are_bounded_paged_exact_and_do_not_need_the_twin() {
    let dir = tempfile::tempdir().unwrap();
    let clock = virtual_clock();
    let p = start(dir.path(), Some(clock.clone()), test_settings()).await;
    fleet(&p, "meter", json!({}), "t", 1, |_| vec![]).await;
    let twin = p.twin("t-0").unwrap();
    let now = twinfleet::Clock::now(&*clock).0;
    // 3 days of points, one every 10 minutes, two metrics at the same millisecond.
    let hour = 3_600_000;
    let mut all = Vec::new();
    for i in 0..(72 * 6) {
        let at = Timestamp(now - 3 * 24 * hour + i * 600_000 + 1);
        all.push(MetricPoint { metric: "temp".into(), at, value: i as f64 });
        all.push(MetricPoint { metric: "hum".into(), at, value: -(i as f64) });
    }
    for chunk in all.chunks(100) {
        twin.telemetry(chunk.to_vec()).await.unwrap();
    }
    let http = HttpApi::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap(), 1).unwrap();
    let (addr, token) = (http.local_addr(), admin_token(&p).await);
    let get = |path: String| {
        let token = token.clone();
        actix_rt::task::spawn_blocking(move || http_as(addr, &token, "GET", &path, None))
    };

    // No range: the last 24 hours only, newest first.
    let (s, b) = get("/api/v1/twins/t-0/telemetry?limit=10000".into()).await.unwrap();
    assert_eq!(s, 200, "{b}");
    let points = b["points"].as_array().unwrap();
    assert_eq!(points.len(), 2 * 24 * 6, "one day of two metrics");
    assert!(points.windows(2).all(|w| w[0]["at"].as_i64() >= w[1]["at"].as_i64()), "newest first");
    assert!(b.get("next").is_none(), "{b}");

    // Paging through everything with `next`: each point exactly once, pages end on whole milliseconds.
    let mut seen = HashSet::new();
    let mut to = now;
    let mut pages = 0;
    loop {
        let (s, b) = get(format!("/api/v1/twins/t-0/telemetry?from=0&to={to}&limit=101")).await.unwrap();
        assert_eq!(s, 200, "{b}");
        let points = b["points"].as_array().unwrap();
        assert!(points.len() <= 102, "a page holds its limit and the rest of its last millisecond");
        for pt in points {
            assert!(seen.insert((pt["metric"].as_str().unwrap().to_string(), pt["at"].as_i64().unwrap())), "{pt}");
        }
        pages += 1;
        match b.get("next").and_then(Value::as_i64) {
            Some(n) => to = n,
            None => break,
        }
    }
    assert_eq!(seen.len(), all.len(), "every point once, over {pages} pages");
    let (s, _) = get("/api/v1/twins/t-0/telemetry?from=10&to=5".into()).await.unwrap();
    assert_eq!(s, 400);

    // Several metrics by name; and hourly buckets over the 3 days (6 points an hour).
    let (s, b) = get(format!("/api/v1/twins/t-0/telemetry?metric=temp,hum&from=0&to={now}&limit=4")).await.unwrap();
    assert_eq!(s, 200, "{b}");
    let names: HashSet<&str> = b["points"].as_array().unwrap().iter().map(|p| p["metric"].as_str().unwrap()).collect();
    assert_eq!(names, HashSet::from(["temp", "hum"]));
    let from = now - 3 * 24 * hour;
    let (s, b) =
        get(format!("/api/v1/twins/t-0/telemetry?metric=temp&from={from}&to={now}&bucket={hour}")).await.unwrap();
    assert_eq!(s, 200, "{b}");
    let buckets = b["series"][0]["buckets"].as_array().unwrap();
    assert_eq!(b["series"][0]["metric"], "temp");
    let counted: u64 = buckets.iter().map(|k| k["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, 72 * 6, "every point in exactly one bucket");
    let full = &buckets[1];
    assert_eq!(full["count"], 6, "{full}");
    assert_eq!(full["max"].as_f64().unwrap() - full["min"].as_f64().unwrap(), 5.0, "{full}");
    assert_eq!(full["last"], full["max"], "values rise: the last is the largest");
    assert_eq!(full["start"].as_i64().unwrap() % hour, 0, "aligned on the hour");
    let (s, b) = get(format!("/api/v1/twins/t-0/telemetry?from=0&to={now}&bucket=1")).await.unwrap();
    assert_eq!(s, 400, "more than 10,000 buckets is refused: {b}");

    // The twin crashed and waits for its restart (virtual time stands still): its
    // history is still read, from storage.
    assert!(matches!(twin.inject_panic().await, Err(TwinError::Crashed { .. })));
    assert_eq!(twin.actor().status, ActorStatus::Restarting);
    let page = twin
        .telemetry_page(twinfleet::TelemetryQuery {
            metric: Some("temp".into()),
            from: Timestamp(0),
            to: Timestamp(now),
            limit: 5,
        })
        .await
        .expect("a read does not need the twin");
    assert_eq!(page.points.len(), 5);
    assert_eq!(page.points[0].value, (72 * 6 - 1) as f64);
    http.stop().await;
    p.shutdown().await;

    // The latest values come back with the twin.
    let p = start(dir.path(), Some(clock.clone()), test_settings()).await;
    let view = p.twin("t-0").unwrap().get().await.unwrap();
    assert_eq!(view.telemetry_latest["temp"].value, (72 * 6 - 1) as f64);
    assert_eq!(view.telemetry_latest["hum"].value, -((72 * 6 - 1) as f64));
    p.shutdown().await;
}

#[actix_rt::test]
async fn a_device_types_history_retention_drops_whole_old_days() {
    use twinfleet::models::{DeviceTypeId, HistoryRetention, TwinId};
    let dir = tempfile::tempdir().unwrap();
    let clock = virtual_clock();
    let p = start(dir.path(), Some(clock.clone()), test_settings()).await;
    let day = 86_400_000;
    let spec = twinfleet::DeviceTypeSpec {
        history: HistoryRetention { max_age_ms: Some(2 * day as u64), max_bytes: None },
        ..twinfleet::DeviceTypeSpec::new(DeviceTypeId::new("logger").unwrap())
    };
    p.create_device_type(spec).await.unwrap();
    let ty = DeviceTypeId::new("logger").unwrap();
    let twin = p.create_twin(&ty, twinfleet::TwinSpec::new(TwinId::new("l-0").unwrap())).await.unwrap();
    let now = twinfleet::Clock::now(&*clock).0;
    // Five days, a point an hour.
    let points: Vec<MetricPoint> = (0..5 * 24)
        .map(|h| MetricPoint { metric: "v".into(), at: Timestamp(now - 5 * day + h * 3_600_000 + 1), value: h as f64 })
        .collect();
    for c in points.chunks(24) {
        twin.telemetry(c.to_vec()).await.unwrap();
    }
    let all = |twin: twinfleet::TwinHandle| async move {
        let q = twinfleet::TelemetryQuery { metric: None, from: Timestamp(0), to: Timestamp(now), limit: 10_000 };
        twin.telemetry_page(q).await.unwrap().points
    };
    assert_eq!(all(twin.clone()).await.len(), 5 * 24);

    let report = p.compact_journals().await.unwrap();
    assert!(report.history_partitions_dropped >= 2, "{report:?}");
    let kept = all(twin.clone()).await;
    let cutoff = now - 2 * day;
    assert!(kept.iter().all(|pt| pt.at.0 >= cutoff - day), "only whole days before the cutoff go");
    assert!(kept.iter().any(|pt| pt.at.0 < cutoff), "the day that holds the cutoff stays whole");
    assert!(kept.len() >= 2 * 24 && kept.len() < 5 * 24, "{} points kept", kept.len());
    // The points of the last two days are all there.
    assert_eq!(
        kept.iter().filter(|pt| pt.at.0 >= cutoff).count(),
        points.iter().filter(|pt| pt.at.0 >= cutoff).count()
    );
    p.shutdown().await;
}

#[actix_rt::test]
async fn a_size_bound_on_history_drops_the_oldest_days_and_keeps_the_newest() {
    use twinfleet::models::{DeviceTypeId, HistoryRetention, TwinId};
    let dir = tempfile::tempdir().unwrap();
    let day = 86_400_000;
    let spec = twinfleet::DeviceTypeSpec {
        id: DeviceTypeId::new("sized").unwrap(),
        model: String::new(),
        defaults: Default::default(),
        domain: None,
        journal: Default::default(),
        // Smaller than any day: only the newest partition may stay.
        history: HistoryRetention { max_age_ms: None, max_bytes: Some(1) },
        provisioning: None,
        metrics: None,
    };
    let p = start(dir.path(), None, test_settings()).await;
    p.create_device_type(spec).await.unwrap();
    let ty = DeviceTypeId::new("sized").unwrap();
    let twin = p.create_twin(&ty, twinfleet::TwinSpec::new(TwinId::new("s-0").unwrap())).await.unwrap();
    let now = p.now().0;
    let newest_day = now - now.rem_euclid(day);
    let points: Vec<MetricPoint> = (0..4 * 24)
        .map(|h| MetricPoint {
            metric: "v".into(),
            at: Timestamp(newest_day - 3 * day + h * 3_600_000),
            value: h as f64,
        })
        .filter(|pt| pt.at.0 <= now)
        .collect();
    let stored = points.len();
    twin.telemetry(points).await.unwrap();
    // Sealed into segment files at shutdown (sizes count what is on disk).
    p.shutdown().await;
    let p = start(dir.path(), None, test_settings()).await;
    let twin = p.twin("s-0").unwrap();
    let all = |twin: twinfleet::TwinHandle| async move {
        let q = twinfleet::TelemetryQuery { metric: None, from: Timestamp(0), to: Timestamp(now), limit: 10_000 };
        twin.telemetry_page(q).await.unwrap().points
    };
    assert_eq!(all(twin.clone()).await.len(), stored);
    let report = p.compact_journals().await.unwrap();
    assert_eq!(report.history_partitions_dropped, 3, "{report:?}");
    let kept = all(twin.clone()).await;
    assert!(!kept.is_empty() && kept.iter().all(|pt| pt.at.0 >= newest_day), "only the newest day stays");
    p.shutdown().await;
}

#[actix_rt::test]
async fn history_kept_in_sled_by_earlier_versions_moves_into_the_series_store_once() {
    use twinfleet_runtime::WriteBatch;
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), None, test_settings()).await;
    fleet(&p, "meter", json!({}), "t", 1, |_| vec![]).await;
    let now = p.now().0;
    // Two records as data directories before the series store hold them: key = twin id,
    // 0x00, first point's millis (BE), record id (BE); value = a packed batch.
    let mut b = WriteBatch::new();
    for r in 0..2u64 {
        let points: Vec<MetricPoint> = (0..10)
            .map(|i| MetricPoint {
                metric: if i % 2 == 0 { "temp".into() } else { "hum".into() },
                at: Timestamp(now - 100_000 + (r as i64) * 10_000 + i),
                value: i as f64,
            })
            .collect();
        let mut key = b"t-0\0".to_vec();
        key.extend_from_slice(&points[0].at.0.to_be_bytes());
        key.extend_from_slice(&r.to_be_bytes());
        b.put(twinfleet_actors::spaces::TELEMETRY, key, twinfleet::models::encode_batch(&points));
    }
    p.runtime().storage().submit(b).await.unwrap();
    p.shutdown().await;

    let all = |p: &twinfleet::Platform| {
        let twin = p.twin("t-0").unwrap();
        async move {
            let q = twinfleet::TelemetryQuery { metric: None, from: Timestamp(0), to: Timestamp(now), limit: 1_000 };
            twin.telemetry_page(q).await.unwrap().points.len()
        }
    };
    let p = start(dir.path(), None, test_settings()).await;
    assert_eq!(all(&p).await, 20, "the old points are in the series store");
    assert_eq!(p.runtime().storage().scan(twinfleet_actors::spaces::TELEMETRY, b"").count(), 0, "and gone from sled");
    p.shutdown().await;
    let p = start(dir.path(), None, test_settings()).await;
    assert_eq!(all(&p).await, 20, "moved once, not again");
    p.shutdown().await;
}

/// The latest values travel in the history's WAL and reach sled at its checkpoints
/// (`actors/src/latest.rs`): they are back after a restart whether a checkpoint wrote
/// them or not (a crash, where only the WAL has them: `ingest_crash`), and a deleted
/// twin's never come back to a twin re-created with its id, also not from a checkpoint
/// that comes after the deletion.
#[actix_rt::test]
async fn latest_values_survive_checkpoints_and_restarts_and_go_with_a_deleted_twin() {
    use twinfleet::models::{DeviceTypeId, TwinId};
    let dir = tempfile::tempdir().unwrap();
    let clock = virtual_clock();
    let p = start(dir.path(), Some(clock.clone()), test_settings()).await;
    fleet(&p, "meter", json!({}), "l", 2, |_| vec![]).await;
    let now = twinfleet::Clock::now(&*clock).0;
    let point = |metric: &str, at: i64, value: f64| MetricPoint { metric: metric.into(), at: Timestamp(at), value };
    for (i, id) in ["l-0", "l-1"].into_iter().enumerate() {
        let twin = p.twin(id).unwrap();
        twin.ingest(vec![point("temp", now - 10, 1.0), point("hum", now - 10, 50.0)]).await.unwrap();
        twin.ingest(vec![point("temp", now - 5, 2.0 + i as f64)]).await.unwrap();
    }
    let series = p.runtime().series().clone();
    let ty = DeviceTypeId::new("meter").unwrap();
    let latest_of = |view: &twinfleet::TwinView, m: &str| view.telemetry_latest.get(m).map(|l| l.value);

    // Deleted before any checkpoint, then a checkpoint: the sink must not write it back.
    p.delete_twin("l-1").await.unwrap();
    actix_rt::task::spawn_blocking(move || series.checkpoint()).await.unwrap().unwrap();
    let again = p.create_twin(&ty, twinfleet::TwinSpec::new(TwinId::new("l-1").unwrap())).await.unwrap();
    assert!(again.get().await.unwrap().telemetry_latest.is_empty(), "nothing of the deleted twin");
    let names = again
        .telemetry_page(twinfleet::TelemetryQuery { metric: None, from: Timestamp(0), to: Timestamp(now), limit: 10 })
        .await
        .unwrap();
    assert!(names.points.is_empty(), "{names:?}");
    // After the checkpoint, l-0's values are in sled; one more message puts newer ones
    // in the WAL only.
    p.twin("l-0").unwrap().ingest(vec![point("temp", now - 1, 3.0)]).await.unwrap();
    p.shutdown().await;

    // A clean restart (its checkpoint wrote sled).
    let p = start(dir.path(), Some(clock.clone()), test_settings()).await;
    let view = p.twin("l-0").unwrap().get().await.unwrap();
    assert_eq!((latest_of(&view, "temp"), latest_of(&view, "hum")), (Some(3.0), Some(50.0)));
    assert!(p.twin("l-1").unwrap().get().await.unwrap().telemetry_latest.is_empty());
    p.shutdown().await;
}
