//! Journal retention: a pass over the journals of every twin whose device type bounds
//! its journal (`DeviceTypeSpec::journal`), dropping the oldest events the retention
//! allows. It runs on a thread of its own, every `Settings::compaction_interval_ms`,
//! and deletes in bounded batches through the group-commit writer, so it never holds a
//! twin up. It never drops an event a snapshot does not cover yet (a restart replays
//! those), nor a twin's newest event.

use crate::codec::decode_event;
use crate::env::TwinEnv;
use crate::error::TwinError;
use crate::records::{journal_prefix, twin_key};
use crate::spaces;
use serde::Serialize;
use std::sync::{Arc, Weak};
use std::time::Duration;
use twinfleet_models::{JournalRetention, TwinId, TwinState};
use twinfleet_runtime::{StorageError, WriteBatch, decode_record};

/// Deletes per write batch of a pass.
const DELETE_BATCH: usize = 10_000;

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CompactionReport {
    /// Twins whose journals were looked at (those of types with a retention).
    pub twins: usize,
    pub events_deleted: usize,
}

/// Starts the periodic pass; the thread ends once the platform is gone.
pub(crate) fn start_compactor(env: &Arc<TwinEnv>) {
    let every = env.settings.compaction_interval_ms;
    if every == 0 {
        return;
    }
    let weak: Weak<TwinEnv> = Arc::downgrade(env);
    let spawned = std::thread::Builder::new().name("tf-compaction".into()).spawn(move || {
        let mut waited = 0u64;
        loop {
            std::thread::sleep(Duration::from_millis(1_000.min(every)));
            waited += 1_000.min(every);
            let Some(env) = weak.upgrade() else { return };
            if waited < every {
                continue;
            }
            waited = 0;
            match compact(&env) {
                Ok(r) if r.events_deleted > 0 => {
                    tracing::info!(twins = r.twins, deleted = r.events_deleted, "journal compaction pass")
                }
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

pub(crate) fn compact(env: &TwinEnv) -> Result<CompactionReport, TwinError> {
    let now = env.clock.now();
    let mut report = CompactionReport::default();
    let bounded: Vec<(TwinId, JournalRetention)> = env
        .directory
        .twins
        .iter()
        .filter(|e| !e.value().ty.journal.is_unbounded())
        .map(|e| (e.key().clone(), e.value().ty.journal))
        .collect();
    let mut batch = WriteBatch::new();
    for (id, retention) in bounded {
        let mut journal = Vec::new();
        let mut keys = Vec::new();
        for row in env.storage.scan(spaces::JOURNAL, &journal_prefix(&id)) {
            let (k, v) = row?;
            if let Ok(e) = decode_event(&v) {
                journal.push((e.seq, e.at));
                keys.push(k);
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
        let n = retention.expired(&journal, now).min(journal.iter().take_while(|(seq, _)| *seq <= covered).count());
        for k in keys.into_iter().take(n) {
            batch.delete(spaces::JOURNAL, k);
        }
        report.events_deleted += n;
        if batch.len() >= DELETE_BATCH {
            futures::executor::block_on(env.storage.submit(std::mem::take(&mut batch)))?;
        }
    }
    if !batch.is_empty() {
        futures::executor::block_on(env.storage.submit(batch))?;
    }
    Ok(report)
}
