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
