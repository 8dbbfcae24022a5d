//! The arithmetic of history queries, on points already decoded: merging the chunks of
//! one series (last write wins on equal timestamps) and downsampling into buckets.
//! Both work on streams, one point at a time, so a query's memory does not grow with its
//! range.

use serde::{Deserialize, Serialize};

/// Merges streams of one series that are each sorted by timestamp (non-decreasing) into
/// one strictly increasing stream. Where several points hold the same timestamp, the
/// newest write wins: within a stream the later point, across streams the point of the
/// stream given **last** (streams are given oldest write first); the others are
/// skipped. This is the policy "last write wins per timestamp".
#[derive(Debug)]
pub struct Merge<I: Iterator<Item = (i64, f64)>> {
    heads: Vec<(Option<(i64, f64)>, I)>,
}

impl<I: Iterator<Item = (i64, f64)>> Merge<I> {
    pub fn new(streams: impl IntoIterator<Item = I>) -> Self {
        Merge {
            heads: streams
                .into_iter()
                .map(|mut s| {
                    let head = s.next();
                    (head, s)
                })
                .collect(),
        }
    }
}

impl<I: Iterator<Item = (i64, f64)>> Iterator for Merge<I> {
    type Item = (i64, f64);

    fn next(&mut self) -> Option<(i64, f64)> {
        // The smallest timestamp; among equals the last stream (the newest write).
        let mut best: Option<(usize, i64)> = None;
        for (i, (head, _)) in self.heads.iter().enumerate() {
            if let Some((t, _)) = head
                && best.is_none_or(|(_, b)| *t <= b)
            {
                best = Some((i, *t));
            }
        }
        let (winner, t) = best?;
        let mut point = self.heads[winner].0;
        for (i, (head, stream)) in self.heads.iter_mut().enumerate() {
            // Past every point at `t` of each stream; the winner's last one is the point.
            while head.is_some_and(|(ht, _)| ht == t) {
                if i == winner {
                    point = *head;
                }
                *head = stream.next();
            }
        }
        point
    }
}

/// One bucket of a downsampled series: the points with `start <= at < start + width`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Bucket {
    /// Start of the bucket, ms since the epoch (a multiple of the width).
    pub start: i64,
    pub min: f64,
    pub max: f64,
    pub avg: f64,
    /// The value of the bucket's latest point.
    pub last: f64,
    pub count: u64,
}

/// Folds a sorted stream into buckets of `width_ms`, aligned to multiples of the width
/// since the epoch. Empty buckets are not produced.
#[derive(Debug)]
pub struct Downsample<I: Iterator<Item = (i64, f64)>> {
    points: std::iter::Peekable<I>,
    width: i64,
}

impl<I: Iterator<Item = (i64, f64)>> Downsample<I> {
    /// `width_ms` must be positive (a width of 0 is taken as 1).
    pub fn new(points: I, width_ms: i64) -> Self {
        Downsample { points: points.peekable(), width: width_ms.max(1) }
    }
}

impl<I: Iterator<Item = (i64, f64)>> Iterator for Downsample<I> {
    type Item = Bucket;

    fn next(&mut self) -> Option<Bucket> {
        let (t, v) = self.points.next()?;
        let start = t.div_euclid(self.width).saturating_mul(self.width);
        let end = start.saturating_add(self.width);
        let mut b = Bucket { start, min: v, max: v, avg: 0.0, last: v, count: 1 };
        let mut sum = v;
        while let Some(&(t, v)) = self.points.peek() {
            if t >= end {
                break;
            }
            self.points.next();
            b.min = b.min.min(v);
            b.max = b.max.max(v);
            b.last = v;
            b.count += 1;
            sum += v;
        }
        b.avg = sum / b.count as f64;
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_keeps_order_and_the_last_write_of_a_timestamp() {
        let old = vec![(1, 1.0), (3, 3.0), (5, 5.0)];
        let late = vec![(2, 2.0), (3, 30.0), (6, 6.0)];
        let newest = vec![(5, 50.0)];
        let merged: Vec<_> = Merge::new([old.into_iter(), late.into_iter(), newest.into_iter()]).collect();
        assert_eq!(merged, vec![(1, 1.0), (2, 2.0), (3, 30.0), (5, 50.0), (6, 6.0)]);
        assert_eq!(Merge::new(Vec::<std::vec::IntoIter<(i64, f64)>>::new()).next(), None);
    }

    #[test]
    fn buckets_are_aligned_and_hold_min_max_avg_last_count() {
        let pts = vec![(-1_500, 4.0), (0, 1.0), (500, 3.0), (999, 2.0), (3_000, 7.0)];
        let b: Vec<_> = Downsample::new(pts.into_iter(), 1_000).collect();
        assert_eq!(
            b,
            vec![
                Bucket { start: -2_000, min: 4.0, max: 4.0, avg: 4.0, last: 4.0, count: 1 },
                Bucket { start: 0, min: 1.0, max: 3.0, avg: 2.0, last: 2.0, count: 3 },
                Bucket { start: 3_000, min: 7.0, max: 7.0, avg: 7.0, last: 7.0, count: 1 },
            ]
        );
    }

    #[test]
    fn equal_timestamps_within_a_stream_collapse_to_the_later_point() {
        let a = vec![(1, 1.0), (2, 2.0), (2, 2.5), (3, 3.0)];
        let b = vec![(3, 30.0), (3, 31.0), (4, 4.0)];
        let merged: Vec<(i64, f64)> = Merge::new([a.into_iter(), b.into_iter()]).collect();
        assert_eq!(merged, vec![(1, 1.0), (2, 2.5), (3, 31.0), (4, 4.0)]);
    }
}
