//! Reading a twin's stored telemetry, off the twin: a query goes straight to the series
//! store on the blocking pool (never through the twin's mailbox, never on an arbiter
//! thread), in pages of at most `limit` points, newest first.
//!
//! Each metric of a twin is one series of its device type's namespace
//! ([`series_key`]). A page without a metric merges the twin's metrics (those its
//! latest values name) newest first. A page ends on a millisecond boundary (every
//! point of its oldest millisecond is in it), so `next` (that millisecond minus one)
//! continues exactly. The series streams decode one chunk cluster at a time, so a page
//! holds at most `limit` points plus one cluster per metric, whatever the range.

use serde::Serialize;
use std::sync::Arc;
use twinfleet_models::series::query::{Bucket, Downsample};
use twinfleet_models::{MetricPoint, Timestamp, TwinId};
use twinfleet_runtime::series::{Points, SeriesStore};
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

pub(crate) use crate::records::{series_key, series_key_parts};

/// The metrics a query names (`metric`: one name, or several separated by commas; a
/// metric name holds no comma), or all the twin has (those its latest values name).
/// (The latest-values record in sled names every metric, see `crate::latest`.)
fn metric_names(storage: &dyn Storage, id: &TwinId, metric: Option<&str>) -> Result<Vec<String>, StorageError> {
    Ok(match metric {
        Some(m) => m.split(',').filter(|m| !m.is_empty()).map(String::from).collect(),
        None => storage
            .get(crate::spaces::TELEMETRY_LATEST, id.as_str().as_bytes())?
            .and_then(|raw| crate::latest::decode_latest(&raw).ok())
            .map(|m| m.into_keys().collect())
            .unwrap_or_default(),
    })
}

/// One metric downsampled: its buckets, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MetricBuckets {
    pub metric: String,
    pub buckets: Vec<Bucket>,
}

/// The most buckets one query may ask for per metric (`(to - from) / width`).
pub const MAX_BUCKETS: i64 = 10_000;

/// Downsamples the query's metrics into buckets of `width_ms` aligned on multiples of
/// it, oldest first; streams the points (memory: the buckets and one chunk cluster).
/// Blocking: call it on the blocking pool.
pub(crate) fn read_buckets(
    series: &Arc<SeriesStore>,
    storage: &dyn Storage,
    namespace: &str,
    id: &TwinId,
    q: &TelemetryQuery,
    width_ms: i64,
) -> Result<Vec<MetricBuckets>, StorageError> {
    let metrics = metric_names(storage, id, q.metric.as_deref())?;
    Ok(metrics
        .into_iter()
        .map(|m| {
            let points = series.points(namespace, &series_key(id.as_str(), &m), q.from.0, q.to.0);
            MetricBuckets { buckets: Downsample::new(points, width_ms).collect(), metric: m }
        })
        .collect())
}

/// Reads one page. Blocking: call it on the blocking pool.
pub(crate) fn read_page(
    series: &Arc<SeriesStore>,
    storage: &dyn Storage,
    namespace: &str,
    id: &TwinId,
    q: &TelemetryQuery,
) -> Result<TelemetryPage, StorageError> {
    let limit = q.limit.max(1);
    let metrics = metric_names(storage, id, q.metric.as_deref())?;
    let mut streams: Vec<(String, std::iter::Peekable<Points>)> = metrics
        .into_iter()
        .map(|m| {
            let s = series.points_rev(namespace, &series_key(id.as_str(), &m), q.from.0, q.to.0).peekable();
            (m, s)
        })
        .collect();
    let mut out: Vec<MetricPoint> = Vec::new();
    let mut more = false;
    loop {
        // The newest head among the metrics.
        let best =
            streams.iter_mut().enumerate().filter_map(|(i, (_, s))| s.peek().map(|p| (i, p.0))).max_by_key(|(_, t)| *t);
        let Some((i, t)) = best else { break };
        if out.len() >= limit && out.last().is_some_and(|p| p.at.0 != t) {
            more = true;
            break;
        }
        let (metric, s) = &mut streams[i];
        let (at, value) = s.next().expect("peeked");
        out.push(MetricPoint { metric: metric.clone(), at: Timestamp(at), value });
    }
    let next = match out.last() {
        Some(last) if more && last.at > q.from => Some(Timestamp(last.at.0 - 1)),
        _ => None,
    };
    Ok(TelemetryPage { points: out, next })
}
