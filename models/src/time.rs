//! Time as a plain value. The models never read a clock: callers pass `now` in.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::{Add, Sub};

/// Milliseconds since the Unix epoch (UTC). A plain integer so that it is cheap to copy,
/// compare and store, and so that virtual clocks can produce any value they like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub const ZERO: Timestamp = Timestamp(0);

    pub fn millis(self) -> i64 {
        self.0
    }

    /// Milliseconds from `earlier` to `self`, never negative.
    pub fn since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0).max(0) as u64
    }

    /// A Unix time of `seconds` and `nanos` (as in `google.protobuf.Timestamp`), if it is
    /// one: `nanos` in `0..1_000_000_000` and the milliseconds within `i64`.
    pub fn from_unix(seconds: i64, nanos: i32) -> Option<Timestamp> {
        if !(0..1_000_000_000).contains(&nanos) {
            return None;
        }
        seconds.checked_mul(1000)?.checked_add(i64::from(nanos) / 1_000_000).map(Timestamp)
    }

    pub fn plus_millis(self, ms: u64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms.min(i64::MAX as u64) as i64))
    }
}

impl Add<u64> for Timestamp {
    type Output = Timestamp;
    fn add(self, ms: u64) -> Timestamp {
        self.plus_millis(ms)
    }
}

impl Sub for Timestamp {
    type Output = i64;
    fn sub(self, other: Timestamp) -> i64 {
        self.0.saturating_sub(other.0)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_times_are_checked() {
        assert_eq!(Timestamp::from_unix(1_700_000_000, 5_000_000), Some(Timestamp(1_700_000_000_005)));
        assert_eq!(Timestamp::from_unix(i64::MAX, 0), None);
        assert_eq!(Timestamp::from_unix(i64::MIN / 1000 - 1, 0), None);
        assert_eq!(Timestamp::from_unix(0, -1), None);
        assert_eq!(Timestamp::from_unix(0, 1_000_000_000), None);
    }
}
