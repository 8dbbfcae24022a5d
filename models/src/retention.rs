//! How much of a twin's journal its device type keeps: the last `keep_events` events
//! and/or those younger than `max_age_ms`. An event is dropped when either bound says
//! so; the newest event is always kept, and so is every event a snapshot does not cover
//! yet (the caller passes only covered ones).

use crate::time::Timestamp;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JournalRetention {
    /// Keep at most this many events per twin (the newest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_events: Option<u64>,
    /// Drop events older than this (milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_ms: Option<u64>,
}

/// How much of a device type's metric history is kept: whole partitions (days) older
/// than `max_age_ms` are dropped by the compaction pass, and so are the oldest whole
/// partitions while the type's sealed history on disk is larger than `max_bytes` (the
/// newest partition always stays). Either, both or neither; default: all of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HistoryRetention {
    /// Drop the points older than this (milliseconds), by whole partitions: a partition
    /// goes once all of it is older.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_ms: Option<u64>,
    /// Drop the oldest partitions while the type's sealed segments take more bytes
    /// than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
}

impl HistoryRetention {
    pub fn is_unbounded(&self) -> bool {
        self.max_age_ms.is_none() && self.max_bytes.is_none()
    }

    /// Given the bytes of each partition `(start, bytes)`, the start of the oldest one
    /// to keep under `max_bytes` (`None`: keep all). Partitions go oldest first; the
    /// newest is kept however large.
    pub fn keep_from(&self, partitions: &[(i64, u64)]) -> Option<i64> {
        let max = self.max_bytes?;
        let mut parts = partitions.to_vec();
        parts.sort();
        let mut total: u64 = parts.iter().map(|p| p.1).sum();
        let mut first = 0;
        while total > max && first + 1 < parts.len() {
            total -= parts[first].1;
            first += 1;
        }
        (first > 0).then(|| parts[first].0)
    }

    /// The time before which points may go, at `now`.
    pub fn cutoff(&self, now: Timestamp) -> Option<i64> {
        self.max_age_ms.map(|age| now.0.saturating_sub(age.min(i64::MAX as u64) as i64))
    }
}

impl JournalRetention {
    /// Keeps everything (the default).
    pub fn is_unbounded(&self) -> bool {
        self.keep_events.is_none() && self.max_age_ms.is_none()
    }

    /// Of a twin's journal, oldest first as `(seq, at)`, how many of the oldest events
    /// to drop at `now`.
    pub fn expired(&self, journal: &[(u64, Timestamp)], now: Timestamp) -> usize {
        let n = journal.len();
        if n <= 1 {
            return 0;
        }
        let by_count = self.keep_events.map_or(0, |keep| n.saturating_sub(keep.max(1) as usize));
        let by_age = self.max_age_ms.map_or(0, |age| {
            let cutoff = Timestamp(now.0.saturating_sub(age.min(i64::MAX as u64) as i64));
            journal.iter().take_while(|(_, at)| *at < cutoff).count()
        });
        by_count.max(by_age).min(n - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(ats: &[i64]) -> Vec<(u64, Timestamp)> {
        ats.iter().enumerate().map(|(i, at)| (i as u64 + 1, Timestamp(*at))).collect()
    }

    #[test]
    fn count_and_age_each_drop_the_oldest_and_the_newest_stays() {
        let j = journal(&[10, 20, 30, 40, 50]);
        assert_eq!(JournalRetention::default().expired(&j, Timestamp(1_000)), 0);
        assert_eq!(JournalRetention { keep_events: Some(2), max_age_ms: None }.expired(&j, Timestamp(60)), 3);
        assert_eq!(JournalRetention { keep_events: None, max_age_ms: Some(25) }.expired(&j, Timestamp(60)), 3);
        assert_eq!(JournalRetention { keep_events: Some(4), max_age_ms: Some(15) }.expired(&j, Timestamp(60)), 4);
        assert_eq!(JournalRetention { keep_events: Some(0), max_age_ms: Some(0) }.expired(&j, Timestamp(1_000)), 4);
        assert_eq!(
            JournalRetention { keep_events: Some(1), max_age_ms: None }.expired(&journal(&[5]), Timestamp(9)),
            0
        );
    }

    #[test]
    fn a_size_bound_drops_the_oldest_partitions_and_keeps_the_newest() {
        let r = HistoryRetention { max_age_ms: None, max_bytes: Some(100) };
        assert_eq!(r.keep_from(&[(2, 60), (0, 50), (1, 30)]), Some(1), "0 goes: 90 left");
        assert_eq!(r.keep_from(&[(0, 40), (1, 60)]), None, "100 fits");
        assert_eq!(r.keep_from(&[(0, 500), (1, 400)]), Some(1), "the newest stays, however large");
        assert_eq!(r.keep_from(&[]), None);
        assert_eq!(HistoryRetention::default().keep_from(&[(0, u64::MAX)]), None);
        assert!(!r.is_unbounded());
    }
}
