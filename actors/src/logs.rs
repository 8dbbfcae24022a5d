//! App logs of the twins (level, app, text), stored per twin in the `LOGS` keyspace and
//! read off the twin: a query scans storage lazily on the blocking pool, newest first,
//! in pages of at most `limit` lines, filtered by app and lowest level, whatever the
//! range (memory holds one page).
//!
//! Key: twin id, 0x00, the line's millis (big-endian, sign bit flipped so that order is
//! time order), a sequence (big-endian: a storage id per batch × 1,024 + the line's
//! index, unique across restarts). Value: the line's level, app and text. A batch is one
//! sled batch, written through the twin's mailbox (so nothing lands after the twin is
//! archived or deleted) and acknowledged once durable. Lines are kept as they come:
//! out of order, equal timestamps and repeats are all stored (a log is not a series).
//! Retention: a device type's `history.max_age_ms` applies to its logs too (compaction).

use crate::records::journal_prefix;
use crate::spaces;
use serde::{Deserialize, Serialize};
use twinfleet_models::{LogLevel, LogLine, Timestamp, TwinId};
use twinfleet_runtime::{Storage, StorageError, WriteBatch, decode_record, encode_record};

/// Which lines to return: `from <= at <= to`, of `app` (all when `None`) and at least
/// `level`, newest first, at most `limit`, before `cursor` (a page's `next`).
#[derive(Debug, Clone)]
pub struct LogQuery {
    pub app: Option<String>,
    pub level: Option<LogLevel>,
    pub from: Timestamp,
    pub to: Timestamp,
    pub limit: usize,
    pub cursor: Option<String>,
}

/// One page of a log query.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogPage {
    pub lines: Vec<LogLine>,
    /// Pass as `cursor` for the next (older) page, when there may be more.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    level: LogLevel,
    app: String,
    text: String,
}

fn ordered(ms: i64) -> [u8; 8] {
    ((ms as u64) ^ (1 << 63)).to_be_bytes()
}

fn key(prefix: &[u8], ms: i64, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 16);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&ordered(ms));
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// `(millis, seq)` of a key with `prefix`.
fn parse_key(prefix: &[u8], k: &[u8]) -> Option<(i64, u64)> {
    let rest = k.strip_prefix(prefix)?;
    let ms = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?) ^ (1 << 63);
    let seq = u64::from_be_bytes(rest.get(8..16)?.try_into().ok()?);
    Some((ms as i64, seq))
}

/// Puts `lines` of twin `id` into `batch`; `batch_id` is unique (a storage id).
pub(crate) fn append(batch: &mut WriteBatch, id: &TwinId, batch_id: u64, lines: Vec<LogLine>) {
    let prefix = journal_prefix(id);
    for (i, l) in lines.into_iter().enumerate() {
        let k = key(&prefix, l.at.0, batch_id * 1_024 + i as u64);
        batch.put(spaces::LOGS, k, encode_record(&Stored { level: l.level, app: l.app, text: l.text }));
    }
}

/// `(millis, seq)` of a cursor (a page's `next`).
pub(crate) fn parse_cursor(c: &str) -> Option<(i64, u64)> {
    let (ms, seq) = c.split_once('.')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// One page of twin `id`'s lines.
pub(crate) fn read_page(storage: &dyn Storage, id: &TwinId, q: &LogQuery) -> Result<LogPage, StorageError> {
    let prefix = journal_prefix(id);
    let start = key(&prefix, q.from.0, 0);
    let mut end = key(&prefix, q.to.0, u64::MAX);
    if let Some(c) = &q.cursor {
        let (ms, seq) =
            parse_cursor(c).ok_or_else(|| StorageError::Engine(format!("cursor {c:?} is not a page's next")))?;
        // Strictly before the cursor's key.
        let before = if seq > 0 { key(&prefix, ms, seq - 1) } else { key(&prefix, ms.saturating_sub(1), u64::MAX) };
        end = end.min(before);
    }
    if end < start {
        return Ok(LogPage { lines: vec![], next: None });
    }
    let mut lines = Vec::new();
    let mut next = None;
    for row in storage.scan_range_rev(spaces::LOGS, &start, &end) {
        let (k, v) = row?;
        let Some((ms, seq)) = parse_key(&prefix, &k) else { continue };
        let Ok(s) = decode_record::<Stored>(&v) else {
            tracing::warn!(twin = %id, "a stored log line does not decode; skipped");
            continue;
        };
        if q.app.as_ref().is_some_and(|a| *a != s.app) || q.level.is_some_and(|l| s.level < l) {
            continue;
        }
        if lines.len() == q.limit {
            // There is one more: the next page starts below the last line returned.
            break;
        }
        lines.push(LogLine { at: Timestamp(ms), level: s.level, app: s.app, text: s.text });
        next = Some(format!("{ms}.{seq}"));
    }
    // `next` only when the page is full (there may be more).
    let next = if lines.len() == q.limit { next } else { None };
    Ok(LogPage { lines, next })
}

/// Deletes twin `id`'s lines older than `cutoff`; returns how many.
pub(crate) fn delete_before(storage: &dyn Storage, id: &TwinId, cutoff: i64) -> Result<usize, StorageError> {
    let prefix = journal_prefix(id);
    let (start, end) = (key(&prefix, i64::MIN, 0), key(&prefix, cutoff.saturating_sub(1), u64::MAX));
    let mut deleted = 0;
    let mut batch = WriteBatch::new();
    for row in storage.scan_range_rev(spaces::LOGS, &start, &end) {
        batch.delete(spaces::LOGS, row?.0);
        deleted += 1;
        if batch.len() >= 10_000 {
            futures::executor::block_on(storage.submit(std::mem::take(&mut batch)))?;
        }
    }
    if !batch.is_empty() {
        futures::executor::block_on(storage.submit(batch))?;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_time_then_sequence_and_parse_back() {
        let p = b"t\0".to_vec();
        let ks: Vec<Vec<u8>> = [(-5, 0), (0, 3), (0, 4), (7, 0)].iter().map(|&(m, s)| key(&p, m, s)).collect();
        assert!(ks.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(parse_key(&p, &ks[0]), Some((-5, 0)));
        assert_eq!(parse_key(&p, &ks[2]), Some((0, 4)));
    }
}
