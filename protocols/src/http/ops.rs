//! What operators and monitoring read without a token: `/healthz` and `/metrics`.

use super::*;

pub(super) async fn healthz(rt: web::Data<TwinRuntime>) -> HttpResponse {
    // Degraded storage (a full disk) answers 503: reads still work, writes are refused
    // until space is freed.
    let (status, storage, mut res) = match rt.storage_writable() {
        Ok(()) => ("ok", serde_json::json!({"writable": true}), HttpResponse::Ok()),
        Err(e) => (
            "degraded",
            serde_json::json!({"writable": false, "error": e.to_string()}),
            HttpResponse::ServiceUnavailable(),
        ),
    };
    res.json(serde_json::json!({
        "status": status,
        "storage": storage,
        "twins": rt.twin_count(),
        "device_types": rt.device_types().len(),
        "dtas": rt.dtas().len(),
    }))
}

/// Prometheus text exposition: rejected inputs by reason, twins, storage. (The operator
/// issue adds actors, mailboxes and request latencies.)
/// The Prometheus exposition: edges (rejections, requests), actors, twins, storage.
pub(super) async fn metrics(rt: web::Data<TwinRuntime>) -> HttpResponse {
    let mut e = Exposition::new();

    e.family("twinfleet_rejected_total", "counter", "Inputs rejected at the edges (MQTT, gRPC, HTTP), by reason.");
    for (reason, n) in rt.rejections().snapshot() {
        e.sample("twinfleet_rejected_total", &[("reason", reason)], n);
    }

    let sinks = rt.alert_book().all_sink_stats();
    for (name, what, f) in [
        ("twinfleet_notifications_delivered_total", "Alert changes a notification sink delivered.", 0),
        (
            "twinfleet_notifications_failed_total",
            "Failed delivery attempts of a notification sink (each retry counts).",
            1,
        ),
        (
            "twinfleet_notifications_dropped_total",
            "Alert changes a sink never got: older than the change log keeps.",
            2,
        ),
        ("twinfleet_notifications_silenced_total", "Alert changes a silence held back from a sink.", 4),
        ("twinfleet_notification_sink_failing", "1 while a sink has failed its retries and keeps retrying.", 3),
    ] {
        e.family(name, if f == 3 { "gauge" } else { "counter" }, what);
        for (sink, st) in &sinks {
            use std::sync::atomic::Ordering::Relaxed;
            let n = match f {
                0 => st.delivered.load(Relaxed),
                1 => st.failed.load(Relaxed),
                2 => st.dropped.load(Relaxed),
                4 => st.silenced.load(Relaxed),
                _ => u64::from(st.failing.load(Relaxed)),
            };
            e.sample(name, &[("sink", sink)], n);
        }
    }
    let exports = rt.exports().all_stats();
    type ExportField = fn(&twinfleet_actors::exports::ExportStats) -> u64;
    let export_fields: [(&str, &str, &str, ExportField); 6] = [
        ("twinfleet_export_points_total", "counter", "Metric points a history export delivered.", |s| {
            s.points.load(std::sync::atomic::Ordering::Relaxed)
        }),
        ("twinfleet_export_batches_total", "counter", "Batches a history export delivered.", |s| {
            s.batches.load(std::sync::atomic::Ordering::Relaxed)
        }),
        (
            "twinfleet_export_failed_total",
            "counter",
            "Failed delivery attempts of a history export (each retry counts).",
            |s| s.failed.load(std::sync::atomic::Ordering::Relaxed),
        ),
        (
            "twinfleet_export_duplicates_total",
            "counter",
            "Redelivered points (equal to the series' previous one) an export skipped.",
            |s| s.duplicates.load(std::sync::atomic::Ordering::Relaxed),
        ),
        (
            "twinfleet_export_lost_total",
            "counter",
            "Times an export was further behind than the WAL kept for it (points lost to it).",
            |s| s.lost.load(std::sync::atomic::Ordering::Relaxed),
        ),
        ("twinfleet_export_failing", "gauge", "1 while an export has failed its retries and keeps retrying.", |s| {
            u64::from(s.failing.load(std::sync::atomic::Ordering::Relaxed))
        }),
    ];
    for (name, kind, help, field) in export_fields {
        e.family(name, kind, help);
        for (export, st) in &exports {
            e.sample(name, &[("export", export)], field(st));
        }
    }
    e.family(
        "twinfleet_history_wal_kept_bytes",
        "gauge",
        "History WAL kept past checkpoints for the exports that have not read it.",
    );
    e.sample(
        "twinfleet_history_wal_kept_bytes",
        &[],
        rt.series().counters.wal_kept_bytes.load(std::sync::atomic::Ordering::Relaxed),
    );

    e.family("twinfleet_alerts_open", "gauge", "Monitoring alerts raised or acknowledged and not cleared.");
    e.sample("twinfleet_alerts_open", &[], rt.alert_book().open_count() as u64);

    let routes = rt.requests().snapshot();
    for (edge, name, what) in [
        (Edge::Http, "twinfleet_http_requests", "HTTP requests"),
        (Edge::Grpc, "twinfleet_grpc_requests", "gRPC calls"),
    ] {
        let (total, seconds) = (format!("{name}_total"), format!("{name}_seconds"));
        let code = if edge == Edge::Http { "status" } else { "code" };
        e.family(&total, "counter", &format!("{what} by method, route and {code}."));
        for r in routes.iter().filter(|r| r.edge == edge) {
            for (status, n) in &r.statuses {
                e.sample(&total, &[("method", r.method), ("route", &r.route), (code, status)], *n);
            }
        }
        e.family(&seconds, "histogram", &format!("Latency of {what} until the answer is ready, by method and route."));
        for r in routes.iter().filter(|r| r.edge == edge) {
            e.histogram(&seconds, &[("method", r.method), ("route", &r.route)], &r.latency, 1e6);
        }
    }

    // A pass over every actor (~0.1 s per million twins): off the HTTP worker.
    let summary = {
        let rt = rt.clone();
        match web::block(move || rt.summary()).await {
            Ok(s) => s,
            Err(e) => return HttpResponse::InternalServerError().body(format!("metrics: {e}")),
        }
    };
    e.family("twinfleet_actors", "gauge", "Actors by kind (platform, tdta, dta, dti) and status.");
    for k in &summary.kinds {
        for (status, n) in &k.by_status {
            e.sample("twinfleet_actors", &[("kind", k.kind), ("status", status.as_str())], *n);
        }
    }
    type Field = fn(&twinfleet_actors::KindSummary) -> u64;
    let per_kind: [(&str, &str, &str, Field); 4] = [
        ("twinfleet_actor_messages_handled_total", "counter", "Messages handled, by actor kind.", |k| {
            k.messages_handled
        }),
        ("twinfleet_actor_mailbox_depth", "gauge", "Messages waiting in mailboxes, summed by actor kind.", |k| {
            k.mailbox_depth
        }),
        ("twinfleet_actor_mailbox_depth_max", "gauge", "The deepest mailbox of each actor kind.", |k| {
            k.mailbox_depth_max
        }),
        ("twinfleet_actor_restarts_total", "counter", "Restarts after a panic, by actor kind.", |k| k.restarts),
    ];
    for (name, kind, help, field) in per_kind {
        e.family(name, kind, help);
        for k in &summary.kinds {
            e.sample(name, &[("kind", k.kind)], field(k));
        }
    }
    e.family("twinfleet_twins", "gauge", "Twins (DTIs) by device type and lifecycle state (active, archived).");
    for (ty, active, archived) in &summary.twins {
        e.sample("twinfleet_twins", &[("device_type", ty.as_str()), ("state", "active")], *active);
        e.sample("twinfleet_twins", &[("device_type", ty.as_str()), ("state", "archived")], *archived);
    }

    let s = rt.storage_stats();
    let writable = u64::from(rt.storage_writable().is_ok());
    e.single(
        "twinfleet_storage_writable",
        "gauge",
        "1 while storage takes writes, 0 while the disk is full.",
        writable,
    );
    e.single("twinfleet_storage_batches_total", "counter", "Write batches submitted.", s.batches_submitted);
    e.single("twinfleet_storage_commits_total", "counter", "Group commits (apply + flush).", s.groups_committed);
    e.single("twinfleet_storage_ops_total", "counter", "Records written or deleted.", s.ops_committed);
    e.family("twinfleet_storage_commit_records", "histogram", "Records per group commit.");
    e.histogram("twinfleet_storage_commit_records", &[], &s.group_ops, 1.0);
    e.family("twinfleet_storage_flush_seconds", "histogram", "Time to apply and flush one group commit.");
    e.histogram("twinfleet_storage_flush_seconds", &[], &s.flush_micros, 1e6);
    e.single(
        "twinfleet_device_sessions",
        "gauge",
        "Open device sessions on every gateway (MQTT connections, gRPC streams).",
        rt.sessions().total() as u64,
    );
    let c = &rt.series().counters;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let series: [(&str, &str, &str, u64); 10] = [
        ("twinfleet_series_points_total", "counter", "Metric points written to the series store.", load(&c.points)),
        (
            "twinfleet_series_duplicates_total",
            "counter",
            "Points dropped as duplicates (the time and value of their series' newest).",
            load(&c.duplicates),
        ),
        ("twinfleet_series_late_total", "counter", "Points older than their series' newest.", load(&c.late)),
        (
            "twinfleet_series_expired_total",
            "counter",
            "Points refused as older than what retention dropped.",
            load(&c.expired),
        ),
        ("twinfleet_series_commits_total", "counter", "WAL group commits.", load(&c.groups)),
        ("twinfleet_series_wal_bytes_total", "counter", "Bytes appended to the write-ahead log.", load(&c.wal_bytes)),
        (
            "twinfleet_series_segment_bytes_total",
            "counter",
            "Bytes written to sealed segment files.",
            load(&c.segment_bytes),
        ),
        (
            "twinfleet_series_corrupt_segments_total",
            "counter",
            "Segment files skipped as corrupt.",
            load(&c.corrupt_segments),
        ),
        ("twinfleet_series_corrupt_chunks_total", "counter", "Chunks skipped as corrupt.", load(&c.corrupt_chunks)),
        (
            "twinfleet_series_partitions_dropped_total",
            "counter",
            "Partitions dropped by retention.",
            load(&c.partitions_dropped),
        ),
    ];
    for (name, kind, help, v) in series {
        e.single(name, kind, help, v);
    }
    e.single(
        "twinfleet_series_memory_bytes",
        "gauge",
        "Memory of the series store's heads.",
        rt.series().memory_bytes() as u64,
    );
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(e.finish())
}
