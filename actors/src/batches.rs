//! Pre-registered batches (enrollment groups): an operator imports the serials (and
//! optionally MACs and other identity fields) of devices before they claim, as JSON or
//! CSV. A batch's devices are pre-registered for the automatic mode, a batch may
//! override its type's mode, and it gets a claim token of its own (credential
//! `<type>/<batch>`) that claims only its serials. A pre-registered MAC must match the
//! claim's.
//!
//! An import is all-or-nothing: the batch record, one registration per device and the
//! batch's token hash are one write; a serial already registered (in any batch of the
//! type) refuses the whole import, naming it.

use crate::claims::claim_key;
use crate::credentials::Holder;
use crate::error::TwinError;
use crate::sessions::claim_holder;
use crate::spaces;
use crate::supervisor::TwinRuntime;
use serde::{Deserialize, Serialize};
use twinfleet_models::Timestamp;
use twinfleet_models::enrollment::BatchSpec;
use twinfleet_models::provisioning::{Identity, Mode};
use twinfleet_runtime::{WriteBatch, decode_record, encode_record};

/// A batch as stored and shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchView {
    pub device_type: String,
    pub name: String,
    /// Overrides the type's mode for this batch's devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    pub devices: u64,
    pub created_at: Timestamp,
    pub created_by: String,
}

/// One pre-registered device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Registration {
    pub batch: String,
    /// The batch's mode (it overrides the type's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    pub identity: Identity,
}

/// The import guard: imports take turns, so that two cannot register one serial.
const IMPORT_LOCK: &str = "\u{1}batch-import";

impl TwinRuntime {
    /// Imports batch `spec` into device type `ty` on behalf of `operator`; answers the
    /// batch and its claim token (shown once).
    pub async fn import_batch(
        &self,
        ty: &str,
        spec: BatchSpec,
        operator: &str,
    ) -> Result<(BatchView, String), TwinError> {
        spec.validate().map_err(TwinError::Invalid)?;
        let ty = self.device_type(ty)?.id().to_string();
        let _turn = self.env.claims.turn(IMPORT_LOCK).await;
        let key = claim_key(&ty, &spec.name);
        if self.env.storage.get(spaces::BATCH, key.as_bytes())?.is_some() {
            return Err(TwinError::AlreadyExists { kind: "batch", id: format!("{ty}/{}", spec.name) });
        }
        for d in &spec.devices {
            if let Some(r) = self.registration(&ty, &d.serial)? {
                return Err(TwinError::Conflict(format!(
                    "serial {:?} is registered already, in batch {:?} of {ty}",
                    d.serial, r.batch
                )));
            }
        }
        let now = self.env.clock.now();
        let view = BatchView {
            device_type: ty.clone(),
            name: spec.name.clone(),
            mode: spec.mode,
            devices: spec.devices.len() as u64,
            created_at: now,
            created_by: operator.to_string(),
        };
        let credential = format!("{ty}/{}", spec.name);
        let (token, mut prepared) = self.env.credentials.prepare(Holder::Claim(&credential), now)?;
        let mut b = std::mem::take(&mut prepared.batch);
        b.put(spaces::BATCH, key.as_str(), encode_record(&view));
        for identity in spec.devices {
            let k = claim_key(&ty, &identity.serial);
            b.put(
                spaces::REGISTRATION,
                k.as_str(),
                encode_record(&Registration { batch: spec.name.clone(), mode: spec.mode, identity }),
            );
        }
        self.env.storage.submit(b).await?;
        self.env.credentials.installed(prepared);
        self.env.sessions.issued(&claim_holder(&credential), &token);
        Ok((view, token))
    }

    /// The batches of device type `ty`, by name.
    pub fn batches(&self, ty: &str) -> Result<Vec<BatchView>, TwinError> {
        let ty = self.device_type(ty)?.id().to_string();
        let prefix = claim_key(&ty, "");
        let mut out = Vec::new();
        for row in self.env.storage.scan(spaces::BATCH, prefix.as_bytes()) {
            let (_, v) = row?;
            out.push(decode_record(&v).map_err(|e| TwinError::Invalid(format!("a batch record of {ty}: {e}")))?);
        }
        Ok(out)
    }

    pub fn batch(&self, ty: &str, name: &str) -> Result<BatchView, TwinError> {
        let raw = self
            .env
            .storage
            .get(spaces::BATCH, claim_key(ty, name).as_bytes())?
            .ok_or_else(|| TwinError::Unknown { kind: "batch", id: format!("{ty}/{name}") })?;
        decode_record(&raw).map_err(|e| TwinError::Invalid(format!("batch {ty}/{name}: {e}")))
    }

    /// Deletes batch `name` of `ty`: its token stops working at once (open provisioning
    /// sessions with it end) and its devices are no longer pre-registered. Processes
    /// already started go on; provisioned devices keep their twins.
    pub async fn delete_batch(&self, ty: &str, name: &str) -> Result<BatchView, TwinError> {
        let view = self.batch(ty, name)?;
        let _turn = self.env.claims.turn(IMPORT_LOCK).await;
        let credential = format!("{ty}/{name}");
        let mut b = WriteBatch::new();
        b.delete(spaces::BATCH, claim_key(ty, name).as_str());
        // (One scan of the type's registrations: deletions are rare.)
        for row in self.env.storage.scan(spaces::REGISTRATION, claim_key(ty, "").as_bytes()) {
            let (k, v) = row?;
            if decode_record::<Registration>(&v).is_ok_and(|r| r.batch == name) {
                b.delete(spaces::REGISTRATION, k);
            }
        }
        self.env.storage.submit(b).await?;
        self.env.credentials.revoke(Holder::Claim(&credential)).await?;
        self.env.sessions.close(&claim_holder(&credential), "batch deleted");
        Ok(view)
    }

    /// The pre-registration of `serial` of type `ty`, if any.
    pub(crate) fn registration(&self, ty: &str, serial: &str) -> Result<Option<Registration>, TwinError> {
        let key = claim_key(ty, serial);
        match self.env.storage.get(spaces::REGISTRATION, key.as_bytes())? {
            None => Ok(None),
            Some(raw) => decode_record(&raw)
                .map(Some)
                .map_err(|e| TwinError::Invalid(format!("registration of {ty}/{serial} does not decode: {e}"))),
        }
    }
}
