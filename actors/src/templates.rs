//! The configuration directory (`twinfleet_models::template`): each device type's
//! versioned configuration templates, stored in `TEMPLATE`, and the version applied to
//! the type (`TEMPLATE_ACTIVE`, held in its `TypeContext`). Applying a version tells
//! every twin of the type to fill it in; a twin fills it again whenever its effective
//! configuration may have changed (a DTA layer, a membership, its overrides or
//! metadata), and writes only the difference into its desired state
//! (`TwinCommand::ApplyTemplate`).

use crate::TwinError;
use crate::dti::{TwinSlot, TypeContext};
use crate::records::{template_get, template_key, template_prefix};
use crate::spaces;
use std::sync::Arc;
use twinfleet_models::template::{self, ConfigTemplate};
use twinfleet_runtime::{WriteBatch, encode_record};

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
    let last = storage.scan_rev(spaces::TEMPLATE, &template_prefix(device_type), 1)?;
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
    b.put(spaces::TEMPLATE, template_key(device_type, version), encode_record(&t));
    storage.submit(b).await?;
    Ok(t)
}

/// Applies version `version` to `ctx`'s type: stores it as the type's, then tells every
/// twin of the type to fill it in. Returns how many twins were told (a twin whose
/// mailbox is full fills it at its next layer change or restart of the template).
pub(crate) async fn apply(
    ctx: &Arc<TypeContext>,
    version: u32,
    twins: impl IntoIterator<Item = Arc<TwinSlot>>,
) -> Result<usize, TwinError> {
    let t = Arc::new(template_get(&*ctx.infra.storage, ctx.device_type.as_str(), version)?);
    let mut b = WriteBatch::new();
    b.put(spaces::TEMPLATE_ACTIVE, ctx.device_type.as_str(), version.to_be_bytes().to_vec());
    ctx.infra.storage.submit(b).await?;
    ctx.set_template(Some(t));
    let mut told = 0;
    for slot in twins.into_iter().filter(|s| Arc::ptr_eq(&s.ty, ctx)) {
        let sent = slot.with_addr(|a| a.try_send(crate::dti::Ask::new(crate::dti::TemplateChanged, &slot)).is_ok());
        if sent == Some(true) {
            told += 1;
        }
    }
    Ok(told)
}
