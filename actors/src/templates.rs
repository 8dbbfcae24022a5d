//! The configuration directory (`twinfleet_models::template`): each device type's
//! versioned configuration templates, stored in `TEMPLATE`, and the version applied to
//! the type (`TEMPLATE_ACTIVE`, held in its `TypeContext`). Applying a version tells
//! every twin of the type to fill it in; a twin fills it again whenever its effective
//! configuration may have changed (a DTA layer, a membership, its overrides or
//! metadata), and writes only the difference into its desired state
//! (`TwinCommand::ApplyTemplate`).

use crate::TwinError;
use crate::dti::TypeContext;
use crate::env::TwinEnv;
use crate::spaces;
use std::sync::Arc;
use twinfleet_models::template::{self, ConfigTemplate};
use twinfleet_runtime::{Storage, WriteBatch, decode_record, encode_record};

fn key(device_type: &str, version: u32) -> Vec<u8> {
    let mut k = prefix(device_type);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

fn prefix(device_type: &str) -> Vec<u8> {
    let mut k = device_type.as_bytes().to_vec();
    k.push(0);
    k
}

/// Every stored version of `device_type`'s templates, oldest first.
pub(crate) fn list(storage: &dyn Storage, device_type: &str) -> Result<Vec<ConfigTemplate>, TwinError> {
    let mut out = Vec::new();
    for r in storage.scan(spaces::TEMPLATE, &prefix(device_type)) {
        let (_, v) = r?;
        out.push(
            decode_record(&v)
                .map_err(|e| TwinError::Invalid(format!("a stored template of {device_type} does not decode: {e}")))?,
        );
    }
    Ok(out)
}

/// Version `version` of `device_type`'s template.
pub(crate) fn get(storage: &dyn Storage, device_type: &str, version: u32) -> Result<ConfigTemplate, TwinError> {
    let raw = storage
        .get(spaces::TEMPLATE, &key(device_type, version))?
        .ok_or_else(|| TwinError::Unknown { kind: "template", id: format!("{device_type} version {version}") })?;
    decode_record(&raw)
        .map_err(|e| TwinError::Invalid(format!("template {device_type} v{version} does not decode: {e}")))
}

/// The applied template of a type, as stored (read when its context is made).
pub(crate) fn load_active(storage: &dyn Storage, device_type: &str) -> Option<Arc<ConfigTemplate>> {
    let raw = storage.get(spaces::TEMPLATE_ACTIVE, device_type.as_bytes()).ok()??;
    let version = u32::from_be_bytes(raw.get(..4)?.try_into().ok()?);
    match get(storage, device_type, version) {
        Ok(t) => Some(Arc::new(t)),
        Err(e) => {
            tracing::error!(device_type, version, "the applied configuration template cannot be read: {e}");
            None
        }
    }
}

/// Stores a new version of `ctx`'s template (checked first); the next version number.
pub(crate) async fn add(
    ctx: &TypeContext,
    target: Option<String>,
    body: serde_json::Value,
    comment: String,
) -> Result<ConfigTemplate, TwinError> {
    let target = target.unwrap_or_else(|| template::DEFAULT_TARGET.to_string());
    template::validate(&target, &body).map_err(|e| TwinError::Rejected(e.into()))?;
    let storage = &*ctx.infra.storage;
    // One writer at a time per type, so two uploads never take the same number.
    let _one = ctx.fleet_edit.lock().await;
    let device_type = ctx.device_type.as_str();
    let last = storage.scan_rev(spaces::TEMPLATE, &prefix(device_type), 1)?;
    let version = match last.first() {
        Some((k, _)) => u32::from_be_bytes(k[k.len() - 4..].try_into().expect("a 4-byte version")) + 1,
        None => 1,
    };
    let t = ConfigTemplate {
        device_type: device_type.to_string(),
        version,
        target,
        body,
        comment,
        created_at: ctx.infra.clock.now(),
    };
    let mut b = WriteBatch::new();
    b.put(spaces::TEMPLATE, key(device_type, version), encode_record(&t));
    storage.submit(b).await?;
    Ok(t)
}

/// Applies version `version` to `ctx`'s type: stores it as the type's, then tells every
/// twin of the type to fill it in. Returns how many twins were told (a twin whose
/// mailbox is full fills it at its next layer change or restart of the template).
pub(crate) async fn apply(env: &TwinEnv, ctx: &Arc<TypeContext>, version: u32) -> Result<usize, TwinError> {
    let t = Arc::new(get(&*ctx.infra.storage, ctx.device_type.as_str(), version)?);
    let mut b = WriteBatch::new();
    b.put(spaces::TEMPLATE_ACTIVE, ctx.device_type.as_str(), version.to_be_bytes().to_vec());
    ctx.infra.storage.submit(b).await?;
    ctx.set_template(Some(t));
    let mut told = 0;
    for slot in env.directory.twins.iter().filter(|s| Arc::ptr_eq(&s.ty, ctx)) {
        slot.stats.enqueued();
        let sent = slot.with_addr(|a| a.try_send(crate::dti::Ask(crate::dti::TemplateChanged)).is_ok());
        if sent == Some(true) {
            told += 1;
        } else {
            slot.stats.unqueued();
        }
    }
    Ok(told)
}
