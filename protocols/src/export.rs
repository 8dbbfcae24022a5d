//! The history exporter: pushes the metric points of a device type's or a group's twins
//! to a webhook in batches, republishes them on an MQTT topic, or appends them to an
//! NDJSON or CSV file (`twinfleet_models::export`).
//!
//! **Source and order.** An export reads the series store's WAL
//! (`twinfleet_runtime::series::WalRead`): every point the platform acknowledged, in the
//! order it was acknowledged (so a late point is exported when it arrives). It holds the
//! WAL generations it has not read yet, so checkpoints keep them for it (within
//! `SeriesOptions::export_wal_bytes`, 1 GiB; an export further behind loses the oldest,
//! counted in `twinfleet_export_lost_total` and logged). A point equal to its series'
//! previous exported point (same timestamp and value, a device's redelivery) is skipped,
//! as the store itself drops it.
//!
//! **Cursor.** After each batch is delivered the export stores its cursor (the next WAL
//! position, and for files the file's length) in sled and waits for it to be durable.
//! A new export starts from now (the WAL's end), not from the past.
//! - A file export is exactly once across crashes: at start the file is cut back to the
//!   length its cursor recorded, so a batch written but not yet recorded is written
//!   again once, not twice.
//! - Webhook and MQTT deliveries are at least once: after a crash between a delivery and
//!   its cursor the batch is sent again. Each batch names its WAL range (`from`, `to`,
//!   also the `X-Twinfleet-Export-From` header), the same again on a resend, so a
//!   receiver can drop a repeat. A graceful stop or restart repeats nothing.
//!
//! **Failures.** A failed delivery is retried with the notifier's backoff (0.5 s doubling
//! to 60 s, failing after 5 attempts); one export never holds back another, the twins or
//! ingest. A webhook must answer 2xx within 5 s, redirects are failures.

use crate::notify::{retry, signature};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;
use twinfleet_actors::TwinRuntime;
use twinfleet_actors::exports::{ExportCursor, ExportStats};
use twinfleet_models::export::{CSV_HEADER, ExportKind, ExportRow, ExportSpec, FileFormat};
use twinfleet_runtime::series::WalPosition;

const IDLE_POLL: Duration = Duration::from_millis(50);

/// The running exports.
#[derive(Debug)]
pub struct Exporter {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// One export's state on its thread.
struct Run {
    rt: TwinRuntime,
    spec: ExportSpec,
    stats: Arc<ExportStats>,
    cursor: ExportCursor,
    /// Per series (namespace, key): the last exported point (timestamp, value bits).
    last: HashMap<(String, String), (i64, u64)>,
    /// Whether the missing group was reported (once).
    warned: bool,
    sink: Sink,
}

enum Sink {
    File { file: std::fs::File, path: PathBuf },
    Webhook(ureq::Agent),
    Mqtt(crate::mqtt::publisher::Reconnecting),
}

impl Exporter {
    /// Starts one thread per export (checked: `export::validate_exports`). Each export's
    /// cursor is loaded (or set to now) and its WAL hold taken before this returns.
    /// Relative file paths are taken from `data_dir`.
    pub fn start(rt: TwinRuntime, data_dir: &Path, specs: Vec<ExportSpec>) -> Result<Exporter, String> {
        twinfleet_models::export::validate_exports(&specs)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for spec in specs {
            let run = Run::open(rt.clone(), data_dir, spec)?;
            let stop = stop.clone();
            let t = std::thread::Builder::new()
                .name(format!("export-{}", run.spec.name))
                .spawn(move || run.run(&stop))
                .map_err(|e| format!("cannot start an export thread: {e}"))?;
            threads.push(t);
        }
        Ok(Exporter { stop, threads })
    }

    /// Stops every export after the batch in flight (its cursor stored).
    pub fn stop(self) {
        self.stop.store(true, Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

impl Run {
    fn open(rt: TwinRuntime, data_dir: &Path, spec: ExportSpec) -> Result<Run, String> {
        let name = spec.name.clone();
        let book = rt.exports();
        let stats = book.stats(&name);
        book.register(&spec);
        let stored = book.cursor(&name).map_err(|e| format!("export {name}: {e}"))?;
        let fresh = stored.is_none();
        let mut cursor = stored.unwrap_or_else(|| {
            let end = rt.series().wal_end();
            ExportCursor { generation: end.generation, offset: end.offset, ..ExportCursor::default() }
        });
        rt.series().hold_wal(&name, position(&cursor));
        let sink = match spec.kind {
            ExportKind::File => {
                let path = data_dir.join(&spec.path);
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| format!("export {name}: {}: {e}", dir.display()))?;
                }
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .read(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| format!("export {name}: {}: {e}", path.display()))?;
                let len = file.metadata().map_err(|e| format!("export {name}: {e}"))?.len();
                if len > cursor.file_bytes {
                    // Written after the last recorded cursor (a crash in between): cut
                    // back, it is written again from the cursor.
                    tracing::info!(
                        export = name,
                        "cutting {} back to {} bytes, its last recorded batch",
                        path.display(),
                        cursor.file_bytes
                    );
                    file.set_len(cursor.file_bytes)
                        .and_then(|_| file.sync_data())
                        .map_err(|e| format!("export {name}: {e}"))?;
                } else if len < cursor.file_bytes {
                    tracing::error!(
                        export = name,
                        "{} is shorter ({len} bytes) than this export wrote ({} bytes): it was changed by someone else; appending goes on at its end",
                        path.display(),
                        cursor.file_bytes
                    );
                    cursor.file_bytes = len;
                }
                if cursor.file_bytes == 0 && spec.format == FileFormat::Csv {
                    file.write_all(CSV_HEADER.as_bytes())
                        .and_then(|_| file.sync_data())
                        .map_err(|e| format!("export {name}: {e}"))?;
                    cursor.file_bytes = CSV_HEADER.len() as u64;
                }
                Sink::File { file, path }
            }
            ExportKind::Webhook => Sink::Webhook(
                ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(5)))
                    .max_redirects(0)
                    .build()
                    .into(),
            ),
            ExportKind::Mqtt => Sink::Mqtt(Default::default()),
        };
        let run = Run { rt, spec, stats, cursor, last: HashMap::new(), warned: false, sink };
        if fresh || matches!(run.sink, Sink::File { .. }) {
            run.store_cursor().map_err(|e| format!("export {name}: its cursor cannot be stored: {e}"))?;
        }
        Ok(run)
    }

    fn store_cursor(&self) -> Result<(), String> {
        let t = self.rt.exports().set_cursor(&self.spec.name, &self.cursor);
        futures::executor::block_on(t).map_err(|e| e.to_string())
    }

    fn run(mut self, stop: &AtomicBool) {
        let name = self.spec.name.clone();
        let series = self.rt.series().clone();
        while !stop.load(Relaxed) {
            let from = position(&self.cursor);
            let read = match series.read_wal(from, self.spec.batch_points) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(export = name, "the history WAL cannot be read: {e}");
                    if crate::notify::pause(stop, Duration::from_secs(1)) {
                        return;
                    }
                    continue;
                }
            };
            if let Some(at) = read.lost {
                self.stats.lost.fetch_add(1, Relaxed);
                tracing::error!(
                    export = name,
                    "the export was behind what the WAL keeps for it: the points between {from} and {at} are not exported"
                );
            }
            if read.records.is_empty() && read.next == from {
                if crate::notify::pause(stop, IDLE_POLL) {
                    return;
                }
                continue;
            }
            let rows = self.rows(&read.records);
            let to = read.next;
            if !rows.is_empty() {
                let delivered = {
                    let Run { spec, stats, sink, cursor, .. } = &mut self;
                    retry("export", &spec.name, stop, &stats.failed, &stats.failing, || {
                        deliver(sink, spec, cursor, from, to, &rows)
                    })
                };
                if !delivered {
                    return; // stopped
                }
                self.stats.points.fetch_add(rows.len() as u64, Relaxed);
                self.stats.batches.fetch_add(1, Relaxed);
                self.cursor.points += rows.len() as u64;
            }
            self.cursor.generation = to.generation;
            self.cursor.offset = to.offset;
            // Durable before the next batch: a restart resends at most this one.
            if let Err(e) = self.store_cursor() {
                tracing::warn!(export = name, "the export's cursor was not stored: {e}");
            }
            series.hold_wal(&name, to);
        }
    }

    /// The rows of `records` this export takes, redeliveries skipped.
    fn rows(&mut self, records: &[twinfleet_runtime::series::WalRecord]) -> Vec<ExportRow> {
        let group = self.spec.group.as_ref().and_then(|g| match self.rt.dta(g) {
            Ok(h) => Some(h),
            Err(_) => {
                if !std::mem::replace(&mut self.warned, true) {
                    tracing::warn!(export = self.spec.name, "group {g:?} does not exist: its points are not exported");
                }
                None
            }
        });
        if self.spec.group.is_some() && group.is_none() {
            return Vec::new();
        }
        let mut rows = Vec::new();
        for rec in records {
            for s in &rec.series {
                let Some((twin, metric)) = s.key.split_once(' ') else { continue };
                if !self.spec.wants(&s.namespace, metric) || group.as_ref().is_some_and(|g| !g.contains(twin)) {
                    continue;
                }
                let last = self.last.entry((s.namespace.clone(), s.key.clone())).or_insert((i64::MIN, 0));
                for &(at, value) in &s.points {
                    if *last == (at, value.to_bits()) {
                        self.stats.duplicates.fetch_add(1, Relaxed);
                        continue;
                    }
                    *last = (at, value.to_bits());
                    rows.push(ExportRow {
                        twin: twin.to_string(),
                        device_type: s.namespace.clone(),
                        metric: metric.to_string(),
                        at,
                        value,
                    });
                }
            }
        }
        rows
    }
}

fn position(c: &ExportCursor) -> WalPosition {
    WalPosition { generation: c.generation, offset: c.offset }
}

/// Delivers one batch (`from`..`to` of the WAL); a file export moves `cursor.file_bytes`.
fn deliver(
    sink: &mut Sink,
    spec: &ExportSpec,
    cursor: &mut ExportCursor,
    from: WalPosition,
    to: WalPosition,
    rows: &[ExportRow],
) -> Result<(), String> {
    match sink {
        Sink::File { file, path } => {
            let mut text = String::with_capacity(rows.len() * 80);
            for r in rows {
                r.line(spec.format, &mut text);
            }
            let written = file.write_all(text.as_bytes()).and_then(|_| file.sync_data());
            match written {
                Ok(()) => {
                    cursor.file_bytes += text.len() as u64;
                    Ok(())
                }
                Err(e) => {
                    // Nothing half written stays: back to the last whole batch.
                    let _ = file.set_len(cursor.file_bytes);
                    Err(format!("{}: {e}", path.display()))
                }
            }
        }
        Sink::Webhook(agent) => {
            let body = serde_json::to_vec(&serde_json::json!({
                "export": spec.name,
                "from": from.to_string(),
                "to": to.to_string(),
                "points": rows,
            }))
            .map_err(|e| e.to_string())?;
            let mut req = agent
                .post(&spec.url)
                .header("content-type", "application/json")
                .header("x-twinfleet-export-from", &from.to_string());
            if !spec.secret.is_empty() {
                req = req.header("x-twinfleet-signature", &signature(&spec.secret, &body));
            }
            match req.send(&body[..]) {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("{} answered {}", spec.url, r.status())),
                Err(e) => Err(format!("{}: {e}", spec.url)),
            }
        }
        Sink::Mqtt(conn) => {
            let client_id = format!("twinfleet-export-{}", spec.name);
            conn.publish_all(&client_id, &spec.url, &spec.username, &spec.password, mqtt_messages(spec, from, rows)?)
        }
    }
}

/// One message per twin of the batch, on the export's topic.
fn mqtt_messages(spec: &ExportSpec, from: WalPosition, rows: &[ExportRow]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut by_twin: Vec<(&str, &str, Vec<&ExportRow>)> = Vec::new();
    let mut index: HashMap<(&str, &str), usize> = HashMap::new();
    for r in rows {
        let i = *index.entry((r.twin.as_str(), r.device_type.as_str())).or_insert_with(|| {
            by_twin.push((r.twin.as_str(), r.device_type.as_str(), Vec::new()));
            by_twin.len() - 1
        });
        by_twin[i].2.push(r);
    }
    by_twin
        .into_iter()
        .map(|(twin, ty, points)| {
            let topic = spec.topic().replace("{device_type}", ty).replace("{twin}", twin);
            let points: Vec<_> =
                points.iter().map(|p| serde_json::json!({"metric": p.metric, "at": p.at, "value": p.value})).collect();
            let body = serde_json::to_vec(&serde_json::json!({
                "export": spec.name, "from": from.to_string(), "twin": twin, "device_type": ty, "points": points,
            }))
            .map_err(|e| e.to_string())?;
            Ok((topic, body))
        })
        .collect()
}
