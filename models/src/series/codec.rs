//! The compressed encoding of one series chunk: a bit stream of `(timestamp, value)`
//! points, appended one at a time and read back in order.
//!
//! Timestamps are delta-of-delta coded as in Gorilla (Pelkonen et al. 2015). Values are
//! coded in one of two modes, chosen per chunk and switched inside it when needed:
//! - **decimal**: most sensor values are decimals with a few digits (`45.23`). A value
//!   that is exactly `n / 10^s` for the chunk's scale `s` (0..=9) is stored as the delta
//!   of the integer `n` from the previous one, in a few bits. A value that needs a larger
//!   scale switches the chunk to it (a *rescale* code); one that is no short decimal at
//!   all (`0.1 + 0.2`, NaN, -0.0) is stored raw, bit for bit, and leaves the integer
//!   run where it was.
//! - **float**: the XOR of the value's bits with the previous value's, as in Gorilla,
//!   for chunks whose first value is no short decimal.
//!
//! Every point starts with one bit: `0` means "the same step as before and the same
//! value" (a regular series holding still costs one bit a point), `1` is followed by the
//! timestamp code and the value code. The codec is total: any sequence of `i64`
//! timestamps (equal, decreasing) and any `f64` bit patterns round-trip exactly. The
//! series store, not the codec, decides which points a chunk holds (see its module).

/// A bit stream being written, most significant bit first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct BitWriter {
    bytes: Vec<u8>,
    /// Bits used in the last byte (0 = the last byte is full or there is none).
    used: u8,
}

impl BitWriter {
    fn bit(&mut self, b: bool) {
        self.bits(b as u64, 1);
    }

    /// Appends the low `n` bits of `v` (n ≤ 64).
    fn bits(&mut self, v: u64, n: u32) {
        let mut left = n;
        while left > 0 {
            if self.used == 0 {
                self.bytes.push(0);
            }
            let free = 8 - self.used as u32;
            let take = free.min(left);
            let chunk = ((v >> (left - take)) & ((1u64 << take) - 1)) as u8;
            let last = self.bytes.len() - 1;
            self.bytes[last] |= chunk << (free - take);
            self.used = ((self.used as u32 + take) % 8) as u8;
            left -= take;
        }
    }

    fn len_bits(&self) -> u64 {
        self.bytes.len() as u64 * 8 - if self.used == 0 { 0 } else { 8 - self.used as u64 }
    }
}

/// A bit stream being read.
#[derive(Debug, Clone)]
struct BitReader<'a> {
    bytes: &'a [u8],
    pos: u64,
}

impl<'a> BitReader<'a> {
    fn bit(&mut self) -> Option<bool> {
        Some(self.bits(1)? == 1)
    }

    fn bits(&mut self, n: u32) -> Option<u64> {
        if self.pos + n as u64 > self.bytes.len() as u64 * 8 {
            return None;
        }
        let mut v = 0u64;
        let mut left = n;
        while left > 0 {
            let byte = self.bytes[(self.pos / 8) as usize];
            let off = (self.pos % 8) as u32;
            let take = (8 - off).min(left);
            let chunk = (byte >> (8 - off - take)) & ((1u16 << take) - 1) as u8;
            v = (v << take) | chunk as u64;
            self.pos += take as u64;
            left -= take;
        }
        Some(v)
    }

    /// Counts `1` bits before the first `0`, up to `max` (the `0` is consumed).
    fn ones(&mut self, max: u32) -> Option<u32> {
        let mut n = 0;
        while n < max && self.bit()? {
            n += 1;
        }
        Some(n)
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// The largest decimal scale a value may use (`n / 10^9`).
pub const MAX_SCALE: u8 = 9;
const POW10: [f64; 10] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];
/// Integers of a decimal value stay within what an `f64` holds exactly.
const MAX_DECIMAL: f64 = 9_007_199_254_740_992.0; // 2^53

/// `value` as `n / 10^scale` exactly (bit for bit), if it is one.
fn as_decimal(value: f64, scale: u8) -> Option<i64> {
    let n = (value * POW10[scale as usize]).round();
    if n.is_nan() || n.abs() >= MAX_DECIMAL {
        return None;
    }
    // From the integer, as the decoder computes it (so -0.0 is no decimal: its integer 0
    // would come back as +0.0).
    let back = n as i64 as f64 / POW10[scale as usize];
    (back.to_bits() == value.to_bits()).then_some(n as i64)
}

/// The smallest scale at or above `from` at which `value` is a decimal.
fn decimal_scale(value: f64, from: u8) -> Option<(u8, i64)> {
    (from..=MAX_SCALE).find_map(|s| as_decimal(value, s).map(|n| (s, n)))
}

/// Timestamp delta-of-delta buckets after the `1` of a changed point: `0` (dod = 0),
/// `10` + 7 bits, `110` + 12 bits, `1110` + 20 bits, `1111` + 64 bits (zigzag).
const TS_BUCKETS: [u32; 3] = [7, 12, 20];
/// Decimal value codes: `0` the previous value again (bit for bit); else the zigzag of
/// the integer delta minus one (never 0 here) in `10` + 3 bits, `110` + 6, `1110` + 10,
/// `11110` + 16, `111110` + 32 or `1111110` + 64; `1111111` is an escape: `0` + 64 raw
/// bits of a value that is no decimal at the chunk's scale, or `1` + 4 bits of a scale +
/// 64 bits of the value's integer (zigzag) at it (a rescale, or the run's integer stated
/// again after a raw value).
const DEC_BUCKETS: [u32; 6] = [3, 6, 10, 16, 32, 64];

/// Appends points to one chunk.
#[derive(Debug, Clone)]
pub struct ChunkEncoder {
    w: BitWriter,
    count: u32,
    first: i64,
    last: i64,
    delta: i64,
    value: f64,
    mode: Mode,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// Decimal at `scale`, with the integer of the last decimal value.
    Decimal { scale: u8, n: i64 },
    /// Gorilla XOR, with the leading and trailing zeros of the last stored XOR.
    Float { leading: u32, trailing: u32 },
}

impl ChunkEncoder {
    /// A chunk that starts with the point `(at, value)`.
    pub fn new(at: i64, value: f64) -> ChunkEncoder {
        // Room for the header and a few dozen points before the first reallocation.
        let mut w = BitWriter { bytes: Vec::with_capacity(64), used: 0 };
        w.bits(at as u64, 64);
        w.bits(value.to_bits(), 64);
        let mode = match decimal_scale(value, 0) {
            Some((scale, n)) => {
                w.bit(false);
                w.bits(scale as u64, 4);
                Mode::Decimal { scale, n }
            }
            None => {
                w.bit(true);
                Mode::Float { leading: 64, trailing: 0 }
            }
        };
        ChunkEncoder { w, count: 1, first: at, last: at, delta: 0, value, mode }
    }

    /// A chunk that codes every value as Gorilla's XOR, whatever it holds: the baseline
    /// the benchmarks compare the decimal mode with.
    pub fn new_xor(at: i64, value: f64) -> ChunkEncoder {
        let mut w = BitWriter::default();
        w.bits(at as u64, 64);
        w.bits(value.to_bits(), 64);
        w.bit(true);
        ChunkEncoder {
            w,
            count: 1,
            first: at,
            last: at,
            delta: 0,
            value,
            mode: Mode::Float { leading: 64, trailing: 0 },
        }
    }

    pub fn push(&mut self, at: i64, value: f64) {
        let delta = at.wrapping_sub(self.last);
        let dod = delta.wrapping_sub(self.delta);
        self.count += 1;
        if dod == 0 && value.to_bits() == self.value.to_bits() {
            self.w.bit(false);
            self.last = at;
            return;
        }
        self.w.bit(true);
        self.timestamp(dod);
        match self.mode {
            Mode::Decimal { scale, n } => self.decimal(value, scale, n),
            Mode::Float { leading, trailing } => self.xor(value, leading, trailing),
        }
        self.last = at;
        self.delta = delta;
        self.value = value;
    }

    fn timestamp(&mut self, dod: i64) {
        if dod == 0 {
            self.w.bit(false);
            return;
        }
        let z = zigzag(dod);
        for (i, &bits) in TS_BUCKETS.iter().enumerate() {
            if z < 1u64 << bits {
                self.w.bits((1u64 << (i + 1)) - 1, i as u32 + 1);
                self.w.bit(false);
                self.w.bits(z, bits);
                return;
            }
        }
        self.w.bits(0b1111, 4);
        self.w.bits(z, 64);
    }

    fn decimal(&mut self, value: f64, scale: u8, last_n: i64) {
        if value.to_bits() == self.value.to_bits() {
            self.w.bit(false);
            return;
        }
        if let Some(n) = as_decimal(value, scale) {
            let d = n.wrapping_sub(last_n);
            if d == 0 {
                // The integer run's value again after a raw value: restate it.
                self.w.bits(0b111_1111, 7);
                self.w.bit(true);
                self.w.bits(scale as u64, 4);
                self.w.bits(zigzag(n), 64);
            } else {
                let z = zigzag(d) - 1;
                let i = DEC_BUCKETS.iter().position(|&b| b == 64 || z < 1u64 << b).unwrap_or(DEC_BUCKETS.len() - 1);
                self.w.bits((1u64 << (i + 1)) - 1, i as u32 + 1);
                self.w.bit(false);
                self.w.bits(z, DEC_BUCKETS[i]);
            }
            self.mode = Mode::Decimal { scale, n };
            return;
        }
        self.w.bits(0b111_1111, 7);
        match decimal_scale(value, scale + 1) {
            Some((s, n)) => {
                self.w.bit(true);
                self.w.bits(s as u64, 4);
                self.w.bits(zigzag(n), 64);
                self.mode = Mode::Decimal { scale: s, n };
            }
            None => {
                self.w.bit(false);
                self.w.bits(value.to_bits(), 64);
            }
        }
    }

    fn xor(&mut self, value: f64, leading: u32, trailing: u32) {
        let x = value.to_bits() ^ self.value.to_bits();
        if x == 0 {
            self.w.bit(false);
            return;
        }
        self.w.bit(true);
        let (l, t) = (x.leading_zeros().min(31), x.trailing_zeros());
        if leading < 64 && l >= leading && t >= trailing {
            self.w.bit(false);
            self.w.bits(x >> trailing, 64 - leading - trailing);
        } else {
            let meaningful = 64 - l - t;
            self.w.bit(true);
            self.w.bits(l as u64, 5);
            self.w.bits(meaningful as u64 - 1, 6);
            self.w.bits(x >> t, meaningful);
            self.mode = Mode::Float { leading: l, trailing: t };
        }
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn first_at(&self) -> i64 {
        self.first
    }

    pub fn last_at(&self) -> i64 {
        self.last
    }

    pub fn last_value(&self) -> f64 {
        self.value
    }

    /// Size of the encoded points so far, in bytes (rounded up).
    pub fn byte_len(&self) -> usize {
        self.w.bytes.len()
    }

    /// Bits used so far (for bytes-per-point figures that do not round up).
    pub fn bits(&self) -> u64 {
        self.w.len_bits()
    }

    /// The chunk as it stands: `count` and the stream, decodable by [`decode`].
    pub fn bytes(&self) -> &[u8] {
        &self.w.bytes
    }
}

/// Why a chunk does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a series chunk does not decode: {0}")]
pub struct ChunkError(pub &'static str);

/// Reads the `count` points of a chunk's stream, in order.
pub fn decode(bytes: &[u8], count: u32) -> Decoder<'_> {
    Decoder {
        r: BitReader { bytes, pos: 0 },
        left: count,
        started: false,
        last: 0,
        delta: 0,
        value: 0.0,
        mode: Mode::Float { leading: 64, trailing: 0 },
    }
}

/// An iterator over a chunk's points; yields an error (once) where the stream ends early
/// or holds a code that is not in the format.
#[derive(Debug, Clone)]
pub struct Decoder<'a> {
    r: BitReader<'a>,
    left: u32,
    started: bool,
    last: i64,
    delta: i64,
    value: f64,
    mode: Mode,
}

impl Decoder<'_> {
    fn first(&mut self) -> Option<(i64, f64)> {
        let at = self.r.bits(64)? as i64;
        let value = f64::from_bits(self.r.bits(64)?);
        self.mode = if self.r.bit()? {
            Mode::Float { leading: 64, trailing: 0 }
        } else {
            let scale = self.r.bits(4)? as u8;
            if scale > MAX_SCALE {
                return None;
            }
            Mode::Decimal { scale, n: as_decimal(value, scale)? }
        };
        Some((at, value))
    }

    fn next_point(&mut self) -> Option<(i64, f64)> {
        if !self.r.bit()? {
            return Some((self.last.wrapping_add(self.delta), self.value));
        }
        let dod = match self.r.ones(4)? {
            0 => 0,
            4 => unzigzag(self.r.bits(64)?),
            i => unzigzag(self.r.bits(TS_BUCKETS[i as usize - 1])?),
        };
        let delta = self.delta.wrapping_add(dod);
        let value = match self.mode {
            Mode::Decimal { scale, n } => match self.r.ones(7)? {
                0 => self.value,
                7 => {
                    if self.r.bit()? {
                        let s = self.r.bits(4)? as u8;
                        if s > MAX_SCALE {
                            return None;
                        }
                        let n = unzigzag(self.r.bits(64)?);
                        self.mode = Mode::Decimal { scale: s, n };
                        n as f64 / POW10[s as usize]
                    } else {
                        f64::from_bits(self.r.bits(64)?)
                    }
                }
                i => {
                    let z = self.r.bits(DEC_BUCKETS[i as usize - 1])?;
                    let n = n.wrapping_add(unzigzag(z.wrapping_add(1)));
                    self.mode = Mode::Decimal { scale, n };
                    n as f64 / POW10[scale as usize]
                }
            },
            Mode::Float { leading, trailing } => {
                if !self.r.bit()? {
                    self.value
                } else if !self.r.bit()? {
                    if leading >= 64 {
                        return None;
                    }
                    let x = self.r.bits(64 - leading - trailing)? << trailing;
                    f64::from_bits(self.value.to_bits() ^ x)
                } else {
                    let l = self.r.bits(5)? as u32;
                    let meaningful = self.r.bits(6)? as u32 + 1;
                    if l + meaningful > 64 {
                        return None;
                    }
                    let t = 64 - l - meaningful;
                    let x = self.r.bits(meaningful)? << t;
                    self.mode = Mode::Float { leading: l, trailing: t };
                    f64::from_bits(self.value.to_bits() ^ x)
                }
            }
        };
        self.delta = delta;
        Some((self.last.wrapping_add(delta), value))
    }
}

impl Iterator for Decoder<'_> {
    type Item = Result<(i64, f64), ChunkError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        let point = if self.started { self.next_point() } else { self.first() };
        self.started = true;
        match point {
            Some((at, value)) => {
                self.left -= 1;
                self.last = at;
                self.value = value;
                Some(Ok((at, value)))
            }
            None => {
                self.left = 0;
                Some(Err(ChunkError("truncated, or a code outside the format")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), so the tests need no crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn round_trip(points: &[(i64, f64)]) -> ChunkEncoder {
        let mut e = ChunkEncoder::new(points[0].0, points[0].1);
        for &(t, v) in &points[1..] {
            e.push(t, v);
        }
        let back: Vec<(i64, f64)> = decode(e.bytes(), e.count()).map(|p| p.unwrap()).collect();
        assert_eq!(back.len(), points.len());
        for (i, (a, b)) in points.iter().zip(&back).enumerate() {
            assert_eq!(a.0, b.0, "timestamp of point {i}");
            assert_eq!(a.1.to_bits(), b.1.to_bits(), "value of point {i}: {} vs {}", a.1, b.1);
        }
        e
    }

    #[test]
    fn random_series_round_trip_bit_for_bit() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for case in 0..300 {
            let n = 1 + (rng.next() % 500) as usize;
            let mut t = (rng.next() % 2_000_000_000_000) as i64 - 1_000_000_000_000;
            let mut v = 20.0;
            let points: Vec<(i64, f64)> = (0..n)
                .map(|_| {
                    // Steps: mostly regular, sometimes equal, backwards or huge.
                    t = t.wrapping_add(match rng.next() % 10 {
                        0 => 0,
                        1 => -((rng.next() % 5_000) as i64),
                        2 => (rng.next() >> 1) as i64,
                        _ => 1_000 + (rng.next() % 3) as i64,
                    });
                    v = match (case % 4, rng.next() % 8) {
                        (0, _) => f64::from_bits(rng.next()),
                        (_, 0) => f64::from_bits(rng.next()),
                        (1, _) => ((v * 100.0 + (rng.next() % 21) as f64 - 10.0).round()) / 100.0,
                        (2, _) => v + (rng.next() % 1000) as f64 / 7.0,
                        _ => (rng.next() % 4) as f64,
                    };
                    (t, v)
                })
                .collect();
            round_trip(&points);
        }
    }

    #[test]
    fn edge_values_round_trip() {
        let edges = [
            0.0,
            -0.0,
            f64::NAN,
            -f64::NAN,
            f64::from_bits(0x7FF8_0000_0000_0001),
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN,
            f64::MAX,
            f64::MIN_POSITIVE,
            f64::EPSILON,
            5e-324,
            1e15,
            9_007_199_254_740_993.0,
            0.1 + 0.2,
            45.23,
            -45.23,
            1e-9,
            123_456.789,
        ];
        for first in edges {
            let mut pts = vec![(i64::MIN, first)];
            for (i, v) in edges.iter().enumerate() {
                pts.push((i64::MIN + i as i64, *v));
                pts.push((i64::MAX - i as i64, *v));
            }
            round_trip(&pts);
        }
    }

    #[test]
    fn equal_and_decreasing_timestamps_round_trip() {
        round_trip(&[(5, 1.0), (5, 2.0), (5, 2.0), (4, 2.0), (-7, 2.5), (i64::MAX, 1.0), (i64::MIN, 1.0)]);
    }

    #[test]
    fn a_regular_constant_series_costs_one_bit_a_point() {
        let pts: Vec<(i64, f64)> = (0..10_000).map(|i| (1_700_000_000_000 + i * 1_000, 21.5)).collect();
        let e = round_trip(&pts);
        // Header (129 + 4 bits), the first step (a few bits), then one bit each.
        assert!(e.bits() < 10_000 + 200, "{} bits", e.bits());
    }

    #[test]
    fn two_decimal_values_use_the_decimal_mode_and_rescale() {
        let pts = [(0, 45.0), (1_000, 45.2), (2_000, 45.23), (3_000, 45.24), (4_000, 0.1 + 0.2), (5_000, 45.25)];
        let e = round_trip(&pts);
        assert!(matches!(e.mode, Mode::Decimal { scale: 2, n: 4525 }), "{:?}", e.mode);
    }

    #[test]
    fn truncated_or_garbled_chunks_are_an_error_not_a_panic() {
        let pts: Vec<(i64, f64)> = (0..100).map(|i| (i * 1_000, (i % 7) as f64 / 4.0)).collect();
        let e = round_trip(&pts);
        for cut in 0..e.bytes().len() {
            let r: Vec<_> = decode(&e.bytes()[..cut], e.count()).collect();
            assert!(r.last().is_some_and(|p| p.is_err()), "cut at {cut}");
        }
        let mut rng = Rng(7);
        for _ in 0..2_000 {
            let junk: Vec<u8> = (0..(rng.next() % 64)).map(|_| rng.next() as u8).collect();
            let _ = decode(&junk, (rng.next() % 200) as u32).count();
        }
    }
}
