//! A twin's latest telemetry values and their record, apart from the DTI that keeps them
//! and the telemetry queries that read their names.
//!
//! **Where the values live.** A telemetry message's points go to the series store's WAL,
//! whose heads know each series' newest point (`twinfleet_runtime::series`, "Last
//! points"); the twin's record in sled (`spaces::TELEMETRY_LATEST`) is written only when
//! a metric appears that the record does not name yet (so it always names every
//! metric), and at each checkpoint of the series store, whose sink ([`last_sink`]) takes
//! the newest points into it before the WAL that held them is retired. A reader merges
//! the record with the newer points the store holds ([`stored`]; a restore does it for
//! every twin at once, [`newest_by_twin`]); after a crash the WAL replays them. A sled
//! insert per message had cost about a quarter of the platform's CPU in gRPC ingest.
//!
//! One window is known: a sink reads a record, merges and writes it back, so a record a
//! DTI writes for a new metric between the two is overwritten without that name. The
//! name comes back at the latest with the next checkpoint (the new metric's point is
//! either among the points that sink merges, which adds missing names, or in the heads
//! of the next one); until then a telemetry query without metric names omits it, and a
//! restart after a crash merges every head by its key, so nothing is lost.

use crate::records::{binary_body, binary_seal, binary_start};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use twinfleet_models::Timestamp;
use twinfleet_runtime::series::{LastSink, SeriesStore};
use twinfleet_runtime::{Storage, StorageError, WriteBatch, decode_record};

/// The newest value of each metric.
pub(crate) type Latest = BTreeMap<String, LatestPoint>;

/// The newest value of one metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatestPoint {
    pub at: Timestamp,
    pub value: f64,
}

/// The format byte of the binary latest-values record (the runtime codec's JSON records
/// are format 1, and a latest record written by an older version still reads).
const LATEST_BINARY: u8 = 2;

/// A twin's latest values as stored: the format byte, a CRC-32 of the body, then the
/// count of metrics (u16) and each metric as its name (u8 length; names are at most 128
/// bytes), timestamp (i64) and value (f64 bits), little-endian. Written with every
/// telemetry message, so it is made without serde: the JSON record cost a fifth of the
/// twins' share of MQTT ingest.
pub(crate) fn encode_latest(latest: &Latest) -> Vec<u8> {
    let mut out = binary_start(LATEST_BINARY, 2 + latest.keys().map(|k| 17 + k.len()).sum::<usize>());
    out.extend_from_slice(&(latest.len().min(u16::MAX as usize) as u16).to_le_bytes());
    for (name, p) in latest.iter().take(u16::MAX as usize) {
        let name = &name.as_bytes()[..name.len().min(u8::MAX as usize)];
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.extend_from_slice(&p.at.0.to_le_bytes());
        out.extend_from_slice(&p.value.to_bits().to_le_bytes());
    }
    binary_seal(out)
}

/// The twin and the metric a series key names (`crate::records::series_key`).
fn twin_and_metric(key: &str) -> Option<(&str, &str)> {
    key.split_once(' ').filter(|(t, m)| !t.is_empty() && !m.is_empty())
}

/// Takes `(at, value)` into `latest` where it is at least as new as what it has (the
/// DTI's rule: of equal timestamps the later write wins); whether it changed anything.
fn take(latest: &mut Latest, metric: &str, at: i64, value: f64) -> bool {
    match latest.get_mut(metric) {
        Some(e) if at >= e.at.0 => {
            let changed = e.at.0 != at || e.value.to_bits() != value.to_bits();
            *e = LatestPoint { at: Timestamp(at), value };
            changed
        }
        Some(_) => false,
        None => {
            latest.insert(metric.to_string(), LatestPoint { at: Timestamp(at), value });
            true
        }
    }
}

/// A twin's latest values as stored: its record in sled, with the newer points the
/// series store holds since its last checkpoint (the record names every metric the
/// twin has: a DTI writes it whenever a new one appears).
pub(crate) fn stored(
    series: &SeriesStore,
    storage: &dyn Storage,
    namespace: &str,
    twin: &str,
) -> Result<Option<Latest>, StorageError> {
    let Some(raw) = storage.get(crate::spaces::TELEMETRY_LATEST, twin.as_bytes())? else {
        return Ok(None);
    };
    let mut latest = match decode_latest(&raw) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(twin, "the latest telemetry values do not decode ({e}); starting without them");
            return Ok(None);
        }
    };
    let names: Vec<String> = latest.keys().cloned().collect();
    for m in names {
        if let Some((at, value)) = series.last_point(namespace, &crate::records::series_key(twin, &m)) {
            take(&mut latest, &m, at, value);
        }
    }
    Ok(Some(latest))
}

/// The newest points the series store holds (after a restart: what its WAL replayed),
/// by twin, for a restore to merge into the records it read ([`merge_into`]).
pub(crate) fn newest_by_twin(series: &SeriesStore) -> std::collections::HashMap<String, Vec<(String, i64, f64)>> {
    let mut by_twin: std::collections::HashMap<String, Vec<(String, i64, f64)>> = Default::default();
    for p in series.last_points() {
        if let Some((twin, metric)) = twin_and_metric(&p.key) {
            by_twin.entry(twin.to_string()).or_default().push((metric.to_string(), p.at, p.value));
        }
    }
    by_twin
}

/// `raw` (a stored record, or none) with `points` taken in, encoded; `None` where
/// nothing changed.
pub(crate) fn merge_into(raw: Option<&[u8]>, points: &[(String, i64, f64)]) -> Option<Vec<u8>> {
    let mut latest = raw.and_then(|r| decode_latest(r).ok()).unwrap_or_default();
    let mut changed = false;
    for (m, at, value) in points {
        changed |= take(&mut latest, m, *at, *value);
    }
    changed.then(|| encode_latest(&latest))
}

/// The series store's checkpoint sink: the newest points into the twins' records in
/// sled, in one batch, durably. A twin without a record is skipped (it was deleted: a
/// twin's first telemetry writes its record).
pub(crate) fn last_sink(storage: std::sync::Arc<dyn Storage>) -> LastSink {
    Box::new(move |points| {
        let mut by_twin: std::collections::HashMap<&str, Vec<(String, i64, f64)>> = Default::default();
        for p in points {
            if let Some((twin, metric)) = twin_and_metric(&p.key) {
                by_twin.entry(twin).or_default().push((metric.to_string(), p.at, p.value));
            }
        }
        let mut batch = WriteBatch::new();
        for (twin, points) in by_twin {
            let Some(raw) = storage.get(crate::spaces::TELEMETRY_LATEST, twin.as_bytes()).map_err(|e| e.to_string())?
            else {
                continue;
            };
            if let Some(merged) = merge_into(Some(&raw), &points) {
                batch.put(crate::spaces::TELEMETRY_LATEST, twin.as_bytes().to_vec(), merged);
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        futures::executor::block_on(storage.submit(batch)).map_err(|e| e.to_string())
    })
}

/// Reads a latest-values record of either format.
pub(crate) fn decode_latest(raw: &[u8]) -> Result<Latest, String> {
    let Some(mut c) = binary_body(raw, LATEST_BINARY)? else {
        return decode_record::<Latest>(raw).map_err(|e| e.to_string());
    };
    let count = c.u16()?;
    let mut latest = Latest::new();
    for _ in 0..count {
        let name = c.str8()?.to_string();
        let at = c.i64()?;
        let value = c.f64()?;
        latest.insert(name, LatestPoint { at: Timestamp(at), value });
    }
    Ok(latest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinfleet_runtime::encode_record;

    #[test]
    fn the_binary_latest_record_roundtrips_and_the_json_one_still_reads() {
        let mut l = Latest::new();
        l.insert("temp".into(), LatestPoint { at: Timestamp(1_700_000_000_123), value: -0.5 });
        l.insert("m".repeat(128), LatestPoint { at: Timestamp(-5), value: f64::MAX });
        let raw = encode_latest(&l);
        assert_eq!(decode_latest(&raw).unwrap(), l);
        assert!(raw.len() < encode_record(&l).len(), "smaller than the JSON record");
        // Written by an older version.
        assert_eq!(decode_latest(&encode_record(&l)).unwrap(), l);
        // A flipped bit or a cut record is an error, never other values.
        let mut flipped = raw.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(decode_latest(&flipped).unwrap_err().contains("checksum"));
        assert!(decode_latest(&raw[..raw.len() - 3]).is_err());
        assert!(decode_latest(&raw[..3]).is_err());
        assert_eq!(decode_latest(&encode_latest(&Latest::new())).unwrap(), Latest::new());
    }
}
