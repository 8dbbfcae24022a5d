//! Measurements for /metrics: fixed-bucket histograms updated with atomics, per-route
//! request counters and latencies shared by the HTTP and gRPC edges, and a writer of the
//! Prometheus text format (version 0.0.4).
//!
//! Recording is lock-free on the hot path once a route has been seen (one `DashMap`
//! read and a few relaxed atomic adds); reading copies the counters, so a scrape never
//! stops a writer.

use dashmap::DashMap;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (inclusive) of latencies, in microseconds: 100 µs .. 10 s.
pub const LATENCY_BOUNDS_US: &[u64] =
    &[100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 10_000_000];

/// Upper bounds (inclusive) of sizes counted in items (records per group commit).
pub const SIZE_BOUNDS: &[u64] = &[1, 4, 16, 64, 256, 1_024, 4_096, 16_384, 65_536];

/// A histogram over `u64` observations with fixed inclusive upper bounds (plus `+Inf`).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// One counter per bound, then `+Inf`; not cumulative.
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [u64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bounds must increase");
        Histogram { bounds, buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum: AtomicU64::new(0) }
    }

    /// A latency histogram (observations in microseconds).
    pub fn latency() -> Self {
        Histogram::new(LATENCY_BOUNDS_US)
    }

    pub fn observe(&self, v: u64) {
        let i = self.bounds.partition_point(|&b| b < v);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum.fetch_add(v, Relaxed);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn view(&self) -> HistogramView {
        let mut cumulative = Vec::with_capacity(self.buckets.len());
        let mut n = 0;
        for b in self.buckets.iter() {
            n += b.load(Relaxed);
            cumulative.push(n);
        }
        HistogramView { bounds: self.bounds, cumulative, sum: self.sum.load(Relaxed) }
    }
}

/// A copy of a histogram: cumulative counts per bound, the last one being `+Inf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramView {
    pub bounds: &'static [u64],
    pub cumulative: Vec<u64>,
    pub sum: u64,
}

impl HistogramView {
    pub fn count(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }
}

/// Which edge served a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Edge {
    Http,
    Grpc,
}

/// One route of one edge: `GET /api/v1/twins/{id}` or `/twinfleet.v1.DeviceGateway/ReportState`.
/// The route is the pattern, never the concrete path, so the number of series stays
/// bounded by the API's size.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct RouteKey {
    edge: Edge,
    method: &'static str,
    route: Arc<str>,
}

#[derive(Debug)]
struct RouteStats {
    /// Requests by status (HTTP status code, gRPC status name).
    statuses: DashMap<Arc<str>, AtomicU64>,
    latency: Histogram,
}

/// Request counters and latencies by edge, method, route and status. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct RequestMetrics {
    routes: Arc<DashMap<RouteKey, RouteStats>>,
}

/// One route's figures, as `/metrics` shows them.
#[derive(Debug, Clone)]
pub struct RouteView {
    pub edge: Edge,
    pub method: &'static str,
    pub route: String,
    /// `(status, requests)`, sorted by status.
    pub statuses: Vec<(String, u64)>,
    pub latency: HistogramView,
}

impl RequestMetrics {
    /// Counts one finished request. `method` is an HTTP method, or `"POST"` for gRPC.
    pub fn record(&self, edge: Edge, method: &'static str, route: &str, status: &str, took: Duration) {
        let key = RouteKey { edge, method, route: Arc::from(route) };
        let stats = match self.routes.get(&key) {
            Some(s) => s,
            None => {
                self.routes
                    .entry(key.clone())
                    .or_insert_with(|| RouteStats { statuses: DashMap::new(), latency: Histogram::latency() });
                self.routes.get(&key).expect("just inserted")
            }
        };
        stats.latency.observe_duration(took);
        match stats.statuses.get(status) {
            Some(n) => {
                n.fetch_add(1, Relaxed);
            }
            None => {
                stats.statuses.entry(Arc::from(status)).or_default().fetch_add(1, Relaxed);
            }
        }
    }

    /// Every route seen, sorted by edge, route and method.
    pub fn snapshot(&self) -> Vec<RouteView> {
        let mut v: Vec<RouteView> = self
            .routes
            .iter()
            .map(|e| {
                let mut statuses: Vec<(String, u64)> =
                    e.statuses.iter().map(|s| (s.key().to_string(), s.value().load(Relaxed))).collect();
                statuses.sort();
                RouteView {
                    edge: e.key().edge,
                    method: e.key().method,
                    route: e.key().route.to_string(),
                    statuses,
                    latency: e.latency.view(),
                }
            })
            .collect();
        v.sort_by(|a, b| (a.edge, &a.route, a.method).cmp(&(b.edge, &b.route, b.method)));
        v
    }
}

/// A writer of the Prometheus text exposition format.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

/// Label pairs of one sample.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

impl Exposition {
    pub fn new() -> Self {
        Exposition::default()
    }

    /// Starts a family: `kind` is `counter`, `gauge` or `histogram`.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        self
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: Labels<'_>, value: u64) -> &mut Self {
        self.name_and_labels(name, labels, None);
        let _ = writeln!(self.out, " {value}");
        self
    }

    /// A family with a single unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: u64) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    /// The `_bucket`, `_sum` and `_count` samples of a histogram; observations are
    /// divided by `scale` (1e6 turns microseconds into seconds).
    pub fn histogram(&mut self, name: &str, labels: Labels<'_>, h: &HistogramView, scale: f64) -> &mut Self {
        let bucket = format!("{name}_bucket");
        for (i, n) in h.cumulative.iter().enumerate() {
            let le = h.bounds.get(i).map_or("+Inf".to_string(), |&b| fmt_float(b as f64 / scale));
            self.name_and_labels(&bucket, labels, Some(&le));
            let _ = writeln!(self.out, " {n}");
        }
        self.name_and_labels(&format!("{name}_sum"), labels, None);
        let _ = writeln!(self.out, " {}", fmt_float(h.sum as f64 / scale));
        self.sample(&format!("{name}_count"), labels, h.count())
    }

    fn name_and_labels(&mut self, name: &str, labels: Labels<'_>, le: Option<&str>) {
        self.out.push_str(name);
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.out.push('{');
        let le = le.map(|v| ("le", v));
        for (i, (k, v)) in labels.iter().copied().chain(le).enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            let _ = write!(self.out, "{k}=\"");
            for c in v.chars() {
                match c {
                    '\\' => self.out.push_str("\\\\"),
                    '"' => self.out.push_str("\\\""),
                    '\n' => self.out.push_str("\\n"),
                    c => self.out.push(c),
                }
            }
            self.out.push('"');
        }
        self.out.push('}');
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn fmt_float(v: f64) -> String {
    let s = format!("{v}");
    if s.contains('.') || s.contains('e') || s.contains("inf") || s.contains("NaN") { s } else { format!("{s}.0") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_whose_bound_holds_them() {
        let h = Histogram::new(&[1, 10, 100]);
        for v in [0, 1, 2, 10, 11, 100, 1_000] {
            h.observe(v);
        }
        let v = h.view();
        assert_eq!(v.cumulative, vec![2, 4, 6, 7]);
        assert_eq!((v.sum, v.count()), (1_124, 7));
    }

    #[test]
    fn requests_are_counted_by_route_and_status() {
        let m = RequestMetrics::default();
        let ms = Duration::from_millis(1);
        m.record(Edge::Http, "GET", "/api/v1/twins/{id}", "200", ms);
        m.record(Edge::Http, "GET", "/api/v1/twins/{id}", "200", ms * 30);
        m.record(Edge::Http, "GET", "/api/v1/twins/{id}", "404", ms);
        m.record(Edge::Grpc, "POST", "/twinfleet.v1.DeviceGateway/ReportState", "OK", ms);
        let s = m.snapshot();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].statuses, vec![("200".into(), 2), ("404".into(), 1)]);
        assert_eq!(s[0].latency.count(), 3);
        assert_eq!(s[0].latency.sum, 32_000);
        assert_eq!(s[1].edge, Edge::Grpc);
    }

    #[test]
    fn the_exposition_escapes_labels_and_writes_cumulative_buckets_in_seconds() {
        let h = Histogram::new(&[500, 1_000_000]);
        h.observe(400);
        h.observe(2_000_000);
        let mut e = Exposition::new();
        e.family("x_seconds", "histogram", "A latency.").histogram("x_seconds", &[("route", "a\"b")], &h.view(), 1e6);
        let text = e.finish();
        assert!(text.contains("x_seconds_bucket{route=\"a\\\"b\",le=\"0.0005\"} 1\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{route=\"a\\\"b\",le=\"1.0\"} 1\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{route=\"a\\\"b\",le=\"+Inf\"} 2\n"), "{text}");
        assert!(text.contains("x_seconds_sum{route=\"a\\\"b\"} 2.0004\n"), "{text}");
        assert!(text.contains("x_seconds_count{route=\"a\\\"b\"} 2\n"), "{text}");
    }
}
