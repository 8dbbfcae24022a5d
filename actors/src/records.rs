//! What the actors persist, and under which keys. Records are encoded with
//! `twinfleet_runtime::encode_record` (format byte + CRC + JSON).
//!
//! Twins created in bulk are stored packed: one `Fleet` record holds the initial
//! description of up to [`CHUNK`] twins, and a twin gets a `Snapshot` record of its own
//! only once it changes. That is what lets a million twins be created durably in a few
//! hundred writes instead of a million.

use crate::{TwinError, spaces};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use twinfleet_models::template::ConfigTemplate;
use twinfleet_models::{ConfigLayer, DeviceTypeId, DtaId, Identity, Metadata, Timestamp, TwinId, TwinState};
use twinfleet_runtime::{Storage, decode_record};

/// Twins per packed fleet record.
pub const CHUNK: usize = 4096;

/// How an embedder or operator describes a twin to create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TwinSpec {
    pub id: TwinId,
    #[serde(default)]
    pub serial: String,
    #[serde(default)]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Metadata::is_empty")]
    pub metadata: Metadata,
    /// DTAs the twin joins at creation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dtas: Vec<DtaId>,
}

impl TwinSpec {
    pub fn new(id: TwinId) -> Self {
        TwinSpec { id, serial: String::new(), mac: String::new(), metadata: Metadata::default(), dtas: vec![] }
    }

    pub(crate) fn initial_state(&self, device_type: &DeviceTypeId, model: &Arc<str>, at: Timestamp) -> TwinState {
        let identity = Identity {
            twin_id: self.id.clone(),
            serial: self.serial.clone(),
            mac: self.mac.clone(),
            model: model.clone(),
            device_type: device_type.clone(),
        };
        TwinState::new(identity, self.metadata.clone(), self.dtas.clone(), at)
    }

    /// Like `initial_state`, moving the strings instead of copying them.
    pub(crate) fn into_initial_state(self, device_type: &DeviceTypeId, model: &Arc<str>, at: Timestamp) -> TwinState {
        let identity = Identity {
            twin_id: self.id,
            serial: self.serial,
            mac: self.mac,
            model: model.clone(),
            device_type: device_type.clone(),
        };
        TwinState::new(identity, self.metadata, self.dtas, at)
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct FleetChunkRef<'a> {
    pub device_type: &'a DeviceTypeId,
    pub created_at: Timestamp,
    pub twins: &'a [TwinSpec],
}

#[derive(Debug, Deserialize)]
pub(crate) struct FleetChunk {
    pub device_type: DeviceTypeId,
    pub created_at: Timestamp,
    pub twins: Vec<TwinSpec>,
}

/// The format byte of a binary fleet record (the runtime codec's JSON records are
/// format 1; a fleet record written as JSON by an older version still reads).
const FLEET_BINARY: u8 = 2;

impl FleetChunkRef<'_> {
    /// The record: the format byte, a CRC-32 of the body, then the device type (u16
    /// length), the creation time (i64 ms), the count of twins (u32) and each twin: id
    /// (u8 length; ids are at most 128 bytes), serial and MAC (u16 lengths), metadata as
    /// JSON (u32 length, 0 when empty), DTAs (u16 count, each u8 length and id); integers
    /// little-endian. Binary because a restart decodes a million twins' records at once
    /// (the JSON decode was ~13% of a restore of 1M twins).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = binary_start(FLEET_BINARY, 14 + self.device_type.as_str().len() + self.twins.len() * 40);
        let str16 = |out: &mut Vec<u8>, s: &str| {
            let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
            out.extend_from_slice(&(s.len() as u16).to_le_bytes());
            out.extend_from_slice(s);
        };
        let id8 = |out: &mut Vec<u8>, s: &str| {
            out.push(s.len() as u8);
            out.extend_from_slice(s.as_bytes());
        };
        str16(&mut out, self.device_type.as_str());
        out.extend_from_slice(&self.created_at.0.to_le_bytes());
        out.extend_from_slice(&(self.twins.len() as u32).to_le_bytes());
        for t in self.twins {
            id8(&mut out, t.id.as_str());
            str16(&mut out, &t.serial);
            str16(&mut out, &t.mac);
            if t.metadata.is_empty() {
                out.extend_from_slice(&0u32.to_le_bytes());
            } else {
                let json = serde_json::to_vec(&t.metadata).expect("metadata serializes to JSON");
                out.extend_from_slice(&(json.len() as u32).to_le_bytes());
                out.extend_from_slice(&json);
            }
            out.extend_from_slice(&(t.dtas.len() as u16).to_le_bytes());
            for d in &t.dtas {
                id8(&mut out, d.as_str());
            }
        }
        binary_seal(out)
    }
}

impl FleetChunk {
    /// Reads a fleet record of either format ([`FleetChunkRef::encode`], or the JSON
    /// record of older versions).
    pub(crate) fn decode(raw: &[u8]) -> Result<FleetChunk, String> {
        let Some(mut c) = binary_body(raw, FLEET_BINARY)? else {
            return decode_record::<FleetChunk>(raw).map_err(|e| e.to_string());
        };
        let device_type = DeviceTypeId::new(c.str16()?).map_err(|e| e.to_string())?;
        let created_at = Timestamp(c.i64()?);
        let n = c.u32()? as usize;
        let mut twins = Vec::with_capacity(n.min(CHUNK));
        for _ in 0..n {
            let id = TwinId::new(c.str8()?).map_err(|e| e.to_string())?;
            let serial = c.str16()?.to_string();
            let mac = c.str16()?.to_string();
            let meta_len = c.u32()? as usize;
            let metadata = if meta_len == 0 {
                Metadata::default()
            } else {
                serde_json::from_slice(c.take(meta_len)?).map_err(|e| format!("metadata of {id}: {e}"))?
            };
            let dtas = c.u16()? as usize;
            let dtas = (0..dtas)
                .map(|_| c.str8().and_then(|d| DtaId::new(d).map_err(|e| e.to_string())))
                .collect::<Result<Vec<_>, _>>()?;
            twins.push(TwinSpec { id, serial, mac, metadata, dtas });
        }
        if !c.0.is_empty() {
            return Err("the record has bytes after its last twin".into());
        }
        Ok(FleetChunk { device_type, created_at, twins })
    }
}

/// A binary record (the fleet record, a twin's latest values): a format byte, a CRC-32
/// of the body, the body; integers little-endian. [`binary_start`] begins one with room
/// for `body` bytes, [`binary_seal`] writes its CRC.
pub(crate) fn binary_start(format: u8, body: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body);
    out.extend_from_slice(&[format, 0, 0, 0, 0]);
    out
}

pub(crate) fn binary_seal(mut out: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&out[5..]);
    out[1..5].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The checked body of a binary record of `format`; `None` where `raw` is of another
/// format (a JSON record of an older version, for the caller to read).
pub(crate) fn binary_body(raw: &[u8], format: u8) -> Result<Option<Reader<'_>>, String> {
    if raw.first() != Some(&format) {
        return Ok(None);
    }
    let (Some(crc), Some(body)) = (raw.get(1..5), raw.get(5..)) else {
        return Err("the record is truncated".into());
    };
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err("the record's checksum does not match".into());
    }
    Ok(Some(Reader(body)))
}

/// A cursor over a binary record's body.
pub(crate) struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("the record ends early".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    pub(crate) fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    pub(crate) fn f64(&mut self) -> Result<f64, String> {
        Ok(f64::from_bits(u64::from_le_bytes(self.array()?)))
    }

    fn str_of(&mut self, n: usize) -> Result<&'a str, String> {
        std::str::from_utf8(self.take(n)?).map_err(|_| "a string is not UTF-8".to_string())
    }

    pub(crate) fn str8(&mut self) -> Result<&'a str, String> {
        let n = self.take(1)?[0] as usize;
        self.str_of(n)
    }

    fn str16(&mut self) -> Result<&'a str, String> {
        let n = self.u16()? as usize;
        self.str_of(n)
    }
}

/// A device type: what its TDTA knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceTypeSpec {
    pub id: DeviceTypeId,
    /// The hardware model name.
    #[serde(default)]
    pub model: String,
    /// Configuration defaults, the bottom layer of every twin of this type.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub defaults: Map<String, Value>,
    /// The domain model of the type's components (Sartaj et al.), if it has one: the
    /// component API validates every write against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub domain: Option<twinfleet_models::DomainModel>,
    /// How much of each twin's journal is kept (default: all of it).
    #[serde(default, skip_serializing_if = "twinfleet_models::JournalRetention::is_unbounded")]
    pub journal: twinfleet_models::JournalRetention,
    /// How long the twins' metric history is kept (default: all of it).
    #[serde(default, skip_serializing_if = "twinfleet_models::HistoryRetention::is_unbounded")]
    pub history: twinfleet_models::HistoryRetention,
    /// How devices of this type are provisioned (`crate::provisioning`). Without it, a
    /// claim with the type's claim token is pre-approved and runs the default process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning: Option<twinfleet_models::provisioning::ProvisioningSpec>,
    /// The metrics its devices send, if declared: a monitoring rule on any other metric
    /// is refused (`twinfleet_models::rules`). Undeclared: any metric name is taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Vec<String>>,
}

impl DeviceTypeSpec {
    /// A type with nothing but its id: no defaults, no domain model, everything kept,
    /// provisioned with the default process.
    pub fn new(id: DeviceTypeId) -> Self {
        DeviceTypeSpec {
            id,
            model: String::new(),
            defaults: Map::new(),
            domain: None,
            journal: Default::default(),
            history: Default::default(),
            provisioning: None,
            metrics: None,
        }
    }
}

/// A group: what its DTA knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DtaSpec {
    pub id: DtaId,
    #[serde(default)]
    pub name: String,
    /// Enclosing DTAs whose layers reach this DTA's members too.
    #[serde(default)]
    pub parents: Vec<DtaId>,
    #[serde(default)]
    pub layers: BTreeMap<String, ConfigLayer>,
}

/// The series of one metric of one twin in the series store (a space is in neither a
/// twin id nor a metric).
pub(crate) fn series_key(twin: &str, metric: &str) -> String {
    series_key_parts(twin, metric).concat()
}

/// [`series_key`] in parts, for a writer that copies them where they go.
pub(crate) fn series_key_parts<'a>(twin: &'a str, metric: &'a str) -> [&'a str; 3] {
    [twin, " ", metric]
}

pub(crate) fn twin_key(id: &TwinId) -> Vec<u8> {
    id.as_str().as_bytes().to_vec()
}

pub(crate) fn journal_prefix(id: &TwinId) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.as_str().len() + 9);
    k.extend_from_slice(id.as_str().as_bytes());
    k.push(0);
    k
}

pub(crate) fn journal_key(id: &TwinId, seq: u64) -> Vec<u8> {
    let mut k = journal_prefix(id);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub(crate) fn fleet_key(device_type: &DeviceTypeId, chunk_id: u64) -> Vec<u8> {
    let mut k = device_type.as_str().as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&chunk_id.to_be_bytes());
    k
}

// Configuration templates as stored (`TEMPLATE`, `TEMPLATE_ACTIVE`); the service is
// `crate::templates`.

pub(crate) fn template_key(device_type: &str, version: u32) -> Vec<u8> {
    let mut k = template_prefix(device_type);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

pub(crate) fn template_prefix(device_type: &str) -> Vec<u8> {
    let mut k = device_type.as_bytes().to_vec();
    k.push(0);
    k
}

/// Every stored version of `device_type`'s templates, oldest first.
pub(crate) fn template_list(storage: &dyn Storage, device_type: &str) -> Result<Vec<ConfigTemplate>, TwinError> {
    let mut out = Vec::new();
    for r in storage.scan(spaces::TEMPLATE, &template_prefix(device_type)) {
        let (_, v) = r?;
        out.push(
            decode_record(&v)
                .map_err(|e| TwinError::Invalid(format!("a stored template of {device_type} does not decode: {e}")))?,
        );
    }
    Ok(out)
}

/// Version `version` of `device_type`'s template.
pub(crate) fn template_get(
    storage: &dyn Storage,
    device_type: &str,
    version: u32,
) -> Result<ConfigTemplate, TwinError> {
    let raw = storage
        .get(spaces::TEMPLATE, &template_key(device_type, version))?
        .ok_or_else(|| TwinError::Unknown { kind: "template", id: format!("{device_type} version {version}") })?;
    decode_record(&raw)
        .map_err(|e| TwinError::Invalid(format!("template {device_type} v{version} does not decode: {e}")))
}

/// The applied template of a type, as stored (read when its context is made).
pub(crate) fn template_active(storage: &dyn Storage, device_type: &str) -> Option<Arc<ConfigTemplate>> {
    let raw = storage.get(spaces::TEMPLATE_ACTIVE, device_type.as_bytes()).ok()??;
    let version = u32::from_be_bytes(raw.get(..4)?.try_into().ok()?);
    match template_get(storage, device_type, version) {
        Ok(t) => Some(Arc::new(t)),
        Err(e) => {
            tracing::error!(device_type, version, "the applied configuration template cannot be read: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinfleet_runtime::encode_record;

    #[test]
    fn the_binary_fleet_record_roundtrips_and_the_json_one_still_reads() {
        let ty = DeviceTypeId::new("dispenser").unwrap();
        let mut full = TwinSpec::new(TwinId::new("t".repeat(128)).unwrap());
        full.serial = "SN-1".into();
        full.mac = "00:11:22:33:44:55".into();
        full.metadata.location = Some("ward 7".into());
        full.dtas = vec![DtaId::new("site-1").unwrap(), DtaId::new("r".repeat(128)).unwrap()];
        let twins = vec![TwinSpec::new(TwinId::new("a").unwrap()), full];
        let rec = FleetChunkRef { device_type: &ty, created_at: Timestamp(-5), twins: &twins };
        let check = |c: FleetChunk| {
            assert_eq!((c.device_type, c.created_at, c.twins), (ty.clone(), Timestamp(-5), twins.clone()));
        };
        let raw = rec.encode();
        check(FleetChunk::decode(&raw).unwrap());
        // Written by an older version.
        check(FleetChunk::decode(&encode_record(&rec)).unwrap());
        assert!(raw.len() < encode_record(&rec).len(), "smaller than the JSON record");
        // A flipped bit, a cut record or trailing bytes are errors, never other twins.
        let mut flipped = raw.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(FleetChunk::decode(&flipped).unwrap_err().contains("checksum"));
        assert!(FleetChunk::decode(&raw[..raw.len() - 3]).is_err());
        assert!(FleetChunk::decode(&raw[..3]).is_err());
        let mut longer = raw.clone();
        longer.push(0);
        let crc = crc32fast::hash(&longer[5..]);
        longer[1..5].copy_from_slice(&crc.to_le_bytes());
        assert!(FleetChunk::decode(&longer).unwrap_err().contains("after its last twin"));
    }
}
