//! Reading a twin's stored telemetry, off the twin: a query goes straight to storage on
//! the blocking pool (never through the twin's mailbox, never on an arbiter thread), in
//! pages of at most `limit` points, newest first.
//!
//! Records hold the points of one clock hour each, so hours are disjoint: a page reads
//! whole hours, newest first, until it has `limit` points, and keeps at most one hour in
//! memory beyond that. A page ends on a millisecond boundary (every point of its oldest
//! millisecond is in it), so `next` (that millisecond minus one) continues exactly.

use crate::records::{TELEMETRY_SPAN_MS, telemetry_key};
use crate::spaces;
use serde::Serialize;
use twinfleet_models::{MetricPoint, Timestamp, TwinId, decode_batch};
use twinfleet_runtime::{Storage, StorageError};

/// Which stored points to return: `metric` (all when `None`) with `from <= at <= to`,
/// newest first, at most `limit` (plus the rest of the oldest millisecond returned).
#[derive(Debug, Clone)]
pub struct TelemetryQuery {
    pub metric: Option<String>,
    pub from: Timestamp,
    pub to: Timestamp,
    pub limit: usize,
}

/// One page of a query.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TelemetryPage {
    pub points: Vec<MetricPoint>,
    /// Where the next page starts (its `to`), when there may be more points.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<Timestamp>,
}

/// Reads one page. Blocking: call it on the blocking pool.
pub(crate) fn read_page(storage: &dyn Storage, id: &TwinId, q: &TelemetryQuery) -> Result<TelemetryPage, StorageError> {
    let limit = q.limit.max(1);
    let hour_of = |ms: i64| ms.div_euclid(TELEMETRY_SPAN_MS);
    let start = telemetry_key(id, hour_of(q.from.0).saturating_mul(TELEMETRY_SPAN_MS), 0);
    let end = telemetry_key(id, q.to.0, u64::MAX);
    let prefix_len = start.len() - 16;
    let mut out: Vec<MetricPoint> = Vec::new();
    let mut hour: Option<i64> = None;
    let mut more = false;
    for row in storage.scan_range_rev(spaces::TELEMETRY, &start, &end) {
        let (k, v) = row?;
        let first = i64::from_be_bytes(k[prefix_len..prefix_len + 8].try_into().unwrap_or_default()) ^ i64::MIN;
        if hour.is_some_and(|h| h != hour_of(first)) && out.len() >= limit {
            more = true;
            break;
        }
        hour = Some(hour_of(first));
        let Some(points) = decode_batch(&v) else { continue };
        out.extend(
            points
                .into_iter()
                .filter(|p| p.at >= q.from && p.at <= q.to && q.metric.as_ref().is_none_or(|m| *m == p.metric)),
        );
    }
    out.sort_by_key(|p| std::cmp::Reverse(p.at));
    if out.len() > limit {
        let boundary = out[limit - 1].at;
        let keep = out.iter().take_while(|p| p.at >= boundary).count();
        out.truncate(keep);
        more = true;
    }
    let next = match out.last() {
        Some(last) if more && last.at > q.from => Some(Timestamp(last.at.0 - 1)),
        _ => None,
    };
    Ok(TelemetryPage { points: out, next })
}
