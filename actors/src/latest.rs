//! A twin's latest telemetry values and their record in sled (`spaces::TELEMETRY_LATEST`),
//! apart from the DTI that keeps them and the telemetry queries that read their names.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use twinfleet_models::Timestamp;
use twinfleet_runtime::decode_record;

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
    let mut out = Vec::with_capacity(7 + latest.keys().map(|k| 17 + k.len()).sum::<usize>());
    out.extend_from_slice(&[LATEST_BINARY, 0, 0, 0, 0]);
    out.extend_from_slice(&(latest.len().min(u16::MAX as usize) as u16).to_le_bytes());
    for (name, p) in latest.iter().take(u16::MAX as usize) {
        let name = &name.as_bytes()[..name.len().min(u8::MAX as usize)];
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.extend_from_slice(&p.at.0.to_le_bytes());
        out.extend_from_slice(&p.value.to_bits().to_le_bytes());
    }
    let crc = crc32fast::hash(&out[5..]);
    out[1..5].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Reads a latest-values record of either format.
pub(crate) fn decode_latest(raw: &[u8]) -> Result<Latest, String> {
    if raw.first() != Some(&LATEST_BINARY) {
        return decode_record::<Latest>(raw).map_err(|e| e.to_string());
    }
    let (Some(crc), Some(body)) = (raw.get(1..5), raw.get(5..)) else {
        return Err("the record is truncated".into());
    };
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err("the record's checksum does not match".into());
    }
    let mut rest = body;
    let mut take = |n: usize| -> Result<&[u8], String> {
        if rest.len() < n {
            return Err("the record ends early".into());
        }
        let (a, b) = rest.split_at(n);
        rest = b;
        Ok(a)
    };
    let count = u16::from_le_bytes(take(2)?.try_into().expect("2 bytes"));
    let mut latest = Latest::new();
    for _ in 0..count {
        let len = take(1)?[0] as usize;
        let name = std::str::from_utf8(take(len)?).map_err(|_| "a metric name is not UTF-8".to_string())?.to_string();
        let at = i64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
        let value = f64::from_bits(u64::from_le_bytes(take(8)?.try_into().expect("8 bytes")));
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
