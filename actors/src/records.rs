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
