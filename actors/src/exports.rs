//! History exports' bookkeeping: each export's cursor (where it stands in the history's
//! WAL, and how long its file was at that point), persisted in `EXPORT_CURSOR`, and its
//! counters for `/metrics` and `GET /api/v1/exports`. The exporter itself is at the edge
//! (`twinfleet_protocols::export`).

use crate::TwinError;
use crate::spaces;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use twinfleet_models::export::ExportSpec;
use twinfleet_runtime::{Storage, WriteBatch, decode_record, encode_record};

/// Where an export stands: the next WAL record to read, and (file exports) the file's
/// length once everything before it was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExportCursor {
    pub generation: u64,
    pub offset: u64,
    #[serde(default)]
    pub file_bytes: u64,
    /// Points exported so far.
    #[serde(default)]
    pub points: u64,
}

/// Counters of one export.
#[derive(Debug, Default)]
pub struct ExportStats {
    pub points: AtomicU64,
    pub batches: AtomicU64,
    /// Attempts that failed (each retry counts).
    pub failed: AtomicU64,
    /// Points skipped as redeliveries (equal to the series' previous point).
    pub duplicates: AtomicU64,
    /// Times its position was no longer kept (points lost to it).
    pub lost: AtomicU64,
    /// It has failed its retries and keeps trying the same batch.
    pub failing: AtomicBool,
}

/// Every export's cursor and counters.
#[derive(Debug)]
pub struct ExportBook {
    storage: Arc<dyn Storage>,
    stats: DashMap<String, Arc<ExportStats>>,
    specs: DashMap<String, ExportSpec>,
}

/// What `GET /api/v1/exports` shows of one export.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExportView {
    /// Its configuration, secrets hidden.
    pub spec: ExportSpec,
    pub cursor: Option<ExportCursor>,
    pub points: u64,
    pub batches: u64,
    pub failed: u64,
    pub duplicates: u64,
    pub lost: u64,
    pub failing: bool,
}

impl ExportBook {
    pub(crate) fn new(storage: Arc<dyn Storage>) -> Self {
        ExportBook { storage, stats: DashMap::new(), specs: DashMap::new() }
    }

    /// Records a running export's spec (for [`Self::views`]).
    pub fn register(&self, spec: &ExportSpec) {
        self.specs.insert(spec.name.clone(), spec.clone());
    }

    /// Every running export, by name.
    pub fn views(&self) -> Vec<ExportView> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut v: Vec<ExportView> = self
            .specs
            .iter()
            .map(|e| {
                let st = self.stats(e.key());
                ExportView {
                    spec: e.value().redacted(),
                    cursor: self.cursor(e.key()).ok().flatten(),
                    points: st.points.load(Relaxed),
                    batches: st.batches.load(Relaxed),
                    failed: st.failed.load(Relaxed),
                    duplicates: st.duplicates.load(Relaxed),
                    lost: st.lost.load(Relaxed),
                    failing: st.failing.load(Relaxed),
                }
            })
            .collect();
        v.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        v
    }

    /// Export `name`'s counters.
    pub fn stats(&self, name: &str) -> Arc<ExportStats> {
        self.stats.entry(name.to_string()).or_default().clone()
    }

    /// Every export's counters, by name.
    pub fn all_stats(&self) -> Vec<(String, Arc<ExportStats>)> {
        let mut v: Vec<_> = self.stats.iter().map(|e| (e.key().clone(), e.value().clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Where export `name` stands (`None`: it never ran).
    pub fn cursor(&self, name: &str) -> Result<Option<ExportCursor>, TwinError> {
        match self.storage.get(spaces::EXPORT_CURSOR, name.as_bytes())? {
            None => Ok(None),
            Some(raw) => decode_record(&raw)
                .map(Some)
                .map_err(|e| TwinError::Invalid(format!("export {name}: its stored cursor does not decode: {e}"))),
        }
    }

    /// Stores export `name`'s cursor; the ticket resolves once it is durable.
    pub fn set_cursor(&self, name: &str, c: &ExportCursor) -> twinfleet_runtime::Ticket {
        let mut b = WriteBatch::new();
        b.put(spaces::EXPORT_CURSOR, name.as_bytes().to_vec(), encode_record(c));
        self.storage.submit(b)
    }
}
