//! How records are laid out on disk: one format byte, a CRC-32 of the body, the body in
//! JSON. The checksum turns a torn or bit-flipped record into a typed error, so that the
//! runtime can quarantine that one record and start everything else.

use serde::Serialize;
use serde::de::DeserializeOwned;

const FORMAT_V1: u8 = 1;
const HEADER: usize = 5;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("record is truncated ({len} bytes, header needs {HEADER})")]
    Truncated { len: usize },
    #[error("record has unknown format {0}")]
    UnknownFormat(u8),
    #[error("record checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("record body does not decode: {0}")]
    Body(String),
}

pub fn encode_record<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&[FORMAT_V1, 0, 0, 0, 0]);
    // Serializing our own types into memory cannot fail: they have string keys only.
    serde_json::to_writer(&mut out, value).expect("records serialize to JSON");
    let crc = crc32fast::hash(&out[HEADER..]);
    out[1..HEADER].copy_from_slice(&crc.to_le_bytes());
    out
}

pub fn decode_record<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() < HEADER {
        return Err(CodecError::Truncated { len: bytes.len() });
    }
    if bytes[0] != FORMAT_V1 {
        return Err(CodecError::UnknownFormat(bytes[0]));
    }
    let stored = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let computed = crc32fast::hash(&bytes[HEADER..]);
    if stored != computed {
        return Err(CodecError::Checksum { stored, computed });
    }
    serde_json::from_slice(&bytes[HEADER..]).map_err(|e| CodecError::Body(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_corruption_are_detected() {
        let rec = encode_record(&vec!["a", "b"]);
        assert_eq!(decode_record::<Vec<String>>(&rec).unwrap(), vec!["a", "b"]);
        assert_eq!(decode_record::<Vec<String>>(&rec[..3]), Err(CodecError::Truncated { len: 3 }));
        let mut flipped = rec.clone();
        *flipped.last_mut().unwrap() ^= 0x01;
        assert!(matches!(decode_record::<Vec<String>>(&flipped), Err(CodecError::Checksum { .. })));
        let cut = &rec[..rec.len() - 2];
        assert!(matches!(decode_record::<Vec<String>>(cut), Err(CodecError::Checksum { .. })));
    }
}
