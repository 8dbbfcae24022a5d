//! Retention. Metric history: every pass drops the series-store partitions of each
//! device type with a `DeviceTypeSpec::history` bound that lie wholly before its cutoff.
//! Journal retention: a pass over the journals of every twin whose device type bounds
//! its journal (`DeviceTypeSpec::journal`), dropping the oldest history records the
//! retention allows (a record holds one snapshot interval, so up to `snapshot_every`
//! events more than the retention may stay). It runs on a thread of its own, every
//! `Settings::compaction_interval_ms`, and deletes in bounded batches through the
//! group-commit writer, so it never holds a twin up. It never drops an event a
//! snapshot does not cover yet (a restart replays those), nor a twin's newest event.
//!
//! The same thread deletes the journal pages no twin needs any more, every
//! [`PAGE_GC_MS`]: those older than the oldest page a `TAIL` marker names.

use crate::codec::decode_journal;
use crate::dti::tail_page;
use crate::env::TwinEnv;
use crate::error::TwinError;
use crate::records::{journal_prefix, twin_key};
use crate::spaces;
use serde::Serialize;
use std::sync::{Arc, Weak};
use std::time::Duration;
use twinfleet_models::{JournalRetention, Timestamp, TwinId, TwinState};
use twinfleet_runtime::{StorageError, WriteBatch, decode_record};

/// Deletes per write batch of a pass.
const DELETE_BATCH: usize = 10_000;
/// How often (real time) dead journal pages are deleted.
pub(crate) const PAGE_GC_MS: u64 = 2_000;

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CompactionReport {
    /// Twins whose journals were looked at (those of types with a retention).
    pub twins: usize,
    pub events_deleted: usize,
    /// Journal pages deleted because no twin needs them any more.
    pub pages_deleted: usize,
    /// Metric history partitions (days) dropped by the device types' history retention.
    pub history_partitions_dropped: usize,
    /// App log lines deleted by the same retention.
    pub log_lines_deleted: usize,
}

/// Starts the periodic passes; the thread ends once the platform is gone.
pub(crate) fn start_compactor(env: &Arc<TwinEnv>) {
    let every = env.settings.compaction_interval_ms;
    let weak: Weak<TwinEnv> = Arc::downgrade(env);
    let spawned = std::thread::Builder::new().name("tf-compaction".into()).spawn(move || {
        let (mut waited, mut since_gc) = (0u64, 0u64);
        let tick = if every == 0 { PAGE_GC_MS } else { every.min(1_000) };
        loop {
            std::thread::sleep(Duration::from_millis(tick));
            waited += tick;
            since_gc += tick;
            let Some(env) = weak.upgrade() else { return };
            if since_gc >= PAGE_GC_MS {
                since_gc = 0;
                match collect_pages(&env) {
                    Ok(_) => {}
                    Err(TwinError::Storage(StorageError::Closed)) => return,
                    Err(e) => tracing::warn!("deleting dead journal pages failed: {e}"),
                }
            }
            if every == 0 || waited < every {
                continue;
            }
            waited = 0;
            match compact(&env) {
                Ok(r) if r.events_deleted > 0 || r.history_partitions_dropped > 0 => tracing::info!(
                    twins = r.twins,
                    deleted = r.events_deleted,
                    history_partitions = r.history_partitions_dropped,
                    "retention pass"
                ),
                Ok(_) => {}
                Err(TwinError::Storage(StorageError::Closed)) => return,
                Err(e) => tracing::warn!("journal compaction pass failed: {e}"),
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot start journal compaction: {e}");
    }
}

/// Deletes the journal pages older than the oldest page a `TAIL` marker names (every
/// page, up to the newest one seen first, when no marker names one). The newest page
/// is read before the markers: a page committed later is newer, and one committed
/// earlier came with its marker in the same atomic batch.
pub(crate) fn collect_pages(env: &TwinEnv) -> Result<usize, TwinError> {
    let page_id = |k: &[u8]| twinfleet_runtime::page_id(k).unwrap_or(u64::MAX);
    let Some(newest) = env.storage.scan_rev(spaces::JOURNAL_PAGE, b"", 1)?.first().map(|(k, _)| page_id(k)) else {
        return Ok(0);
    };
    let mut keep_from = newest.saturating_add(1);
    for row in env.storage.scan(spaces::TAIL, b"") {
        let (_, v) = row?;
        if let Some(p) = tail_page(&v) {
            keep_from = keep_from.min(p);
        }
    }
    let mut deleted = 0;
    let mut batch = WriteBatch::new();
    for row in env.storage.scan(spaces::JOURNAL_PAGE, b"") {
        let (k, _) = row?;
        if page_id(&k) >= keep_from {
            break;
        }
        batch.delete(spaces::JOURNAL_PAGE, k);
        deleted += 1;
        if batch.len() >= DELETE_BATCH {
            futures::executor::block_on(env.storage.submit(std::mem::take(&mut batch)))?;
        }
    }
    if !batch.is_empty() {
        futures::executor::block_on(env.storage.submit(batch))?;
    }
    Ok(deleted)
}

pub(crate) fn compact(env: &TwinEnv) -> Result<CompactionReport, TwinError> {
    let now = env.clock.now();
    let mut report = CompactionReport::default();
    // History: whole partitions of each bounded type's namespace (see
    // `twinfleet_runtime::series`); points older than the cutoff are refused from then on.
    let bounded_types: Vec<(String, i64)> = env
        .directory
        .types
        .iter()
        .filter_map(|t| t.value().history.cutoff(now).map(|c| (t.key().to_string(), c)))
        .collect();
    for (ty, cutoff) in &bounded_types {
        report.history_partitions_dropped += env.series.drop_before(ty, *cutoff);
    }
    // By size: the oldest whole partitions while the type's segments exceed the bound.
    let sized: Vec<(String, twinfleet_models::HistoryRetention)> = env
        .directory
        .types
        .iter()
        .filter(|t| t.value().history.max_bytes.is_some())
        .map(|t| (t.key().to_string(), t.value().history))
        .collect();
    for (ty, retention) in sized {
        if let Some(keep) = retention.keep_from(&env.series.partition_bytes(&ty)) {
            report.history_partitions_dropped += env.series.drop_before(&ty, keep);
        }
    }
    // App logs: the same cutoff, line by line (they are keyed per twin, not per day).
    let cutoffs: std::collections::HashMap<&str, i64> = bounded_types.iter().map(|(t, c)| (t.as_str(), *c)).collect();
    if !cutoffs.is_empty() {
        let twins: Vec<(TwinId, i64)> = env
            .directory
            .twins
            .iter()
            .filter_map(|e| cutoffs.get(e.value().ty.device_type.as_str()).map(|c| (e.key().clone(), *c)))
            .collect();
        for (id, cutoff) in twins {
            report.log_lines_deleted += crate::logs::delete_before(&*env.storage, &id, cutoff)?;
        }
    }
    let bounded: Vec<(TwinId, JournalRetention, u64)> = env
        .directory
        .twins
        .iter()
        .filter(|e| !e.value().ty.journal.is_unbounded())
        .map(|e| (e.key().clone(), e.value().ty.journal, e.value().last_seq()))
        .collect();
    let mut batch = WriteBatch::new();
    for (id, retention, last_seq) in bounded {
        let mut journal = Vec::new();
        let mut records = Vec::new();
        for row in env.storage.scan(spaces::JOURNAL, &journal_prefix(&id)) {
            let (k, v) = row?;
            if let Ok(events) = decode_journal(&v) {
                journal.extend(events.iter().map(|e| (e.seq, e.at)));
                records.push((k, events.len()));
            }
        }
        report.twins += 1;
        // Read after the scan: without a marker now, a snapshot covers every event seen.
        let covered = match env.storage.get(spaces::TAIL, &twin_key(&id))? {
            None => u64::MAX,
            Some(_) => match env.storage.get(spaces::SNAPSHOT, &twin_key(&id))? {
                Some(b) => decode_record::<TwinState>(&b).map(|s| s.last_seq).unwrap_or(0),
                None => 0,
            },
        };
        // The events after the history (only in the pages yet) are the newest: they
        // count towards `keep_events` and are never dropped.
        let newest = journal.last().map_or(0, |(seq, _)| *seq);
        let counted: Vec<(u64, Timestamp)> =
            journal.iter().copied().chain((newest + 1..=last_seq).map(|seq| (seq, now))).collect();
        let n = retention.expired(&counted, now).min(journal.iter().take_while(|(seq, _)| *seq <= covered).count());
        // Whole records only: those whose every event is among the `n` oldest.
        let mut dropped = 0;
        for (k, events) in records {
            if dropped + events > n {
                break;
            }
            dropped += events;
            batch.delete(spaces::JOURNAL, k);
        }
        report.events_deleted += dropped;
        if batch.len() >= DELETE_BATCH {
            futures::executor::block_on(env.storage.submit(std::mem::take(&mut batch)))?;
        }
    }
    if !batch.is_empty() {
        futures::executor::block_on(env.storage.submit(batch))?;
    }
    report.pages_deleted = collect_pages(env)?;
    Ok(report)
}
