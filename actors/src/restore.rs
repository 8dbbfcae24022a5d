//! Bringing a platform back from its data directory: device types first (their TDTAs),
//! then DTAs parents-first, then every twin from its packed fleet record or its own
//! snapshot, whichever is newer. A record that fails its checksum or does not decode is
//! quarantined: reported (alert, restore report, `Quarantined` on access) and left
//! untouched on disk, while everything else starts.

use crate::dta::{Dta, DtaEntry};
use crate::dti::{NO_ORIGIN, TwinSlot};
use crate::env::TwinEnv;
use crate::error::TwinError;
use crate::records::{DeviceTypeSpec, DtaSpec, FleetChunk};
use crate::tdta::{Tdta, TypeContext, launch_batch, register_members};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use twinfleet_models::{Alert, AlertKind, DtaId, Severity, TwinId, TwinState};
use twinfleet_runtime::{Space, decode_record};

/// Twins launched per batch during restore.
const LAUNCH_BATCH: usize = 16_384;
/// Individual alerts raised for quarantined records before they are summarized.
const ALERT_LIMIT: usize = 100;

#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreReport {
    pub device_types: usize,
    pub dtas: usize,
    pub twins: usize,
    pub quarantined: Vec<QuarantineEntry>,
    pub millis: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct QuarantineEntry {
    /// `space/key` of the record.
    pub record: String,
    /// The twin it belongs to, when known.
    pub twin: Option<String>,
    pub reason: String,
}

fn quarantine(env: &TwinEnv, report: &mut RestoreReport, space: &str, key: &[u8], twin: Option<&str>, reason: String) {
    let record = format!("{space}/{}", String::from_utf8_lossy(key).replace('\0', "/"));
    tracing::error!(%record, "quarantined a record that does not decode: {reason}");
    if let Some(t) = twin {
        env.quarantine.insert(t.to_string(), reason.clone());
    }
    if report.quarantined.len() < ALERT_LIMIT {
        env.alerts.raise(Alert {
            at: env.clock.now(),
            severity: Severity::Critical,
            kind: AlertKind::Quarantined,
            source: "platform/supervisor".into(),
            message: format!("record {record} quarantined: {reason}"),
        });
    }
    report.quarantined.push(QuarantineEntry { record, twin: twin.map(str::to_string), reason });
}

pub(crate) async fn restore(env: &Arc<TwinEnv>) -> Result<RestoreReport, TwinError> {
    let started = Instant::now();
    let mut report = RestoreReport::default();

    for row in env.storage.scan(Space::DeviceType, b"") {
        let (k, v) = row?;
        match decode_record::<DeviceTypeSpec>(&v) {
            Ok(spec) => {
                let ctx = TypeContext::new(&spec, env.clone());
                Tdta::launch(ctx.clone());
                env.types.insert(spec.id.clone(), ctx);
                report.device_types += 1;
            }
            Err(e) => quarantine(env, &mut report, "device_type", &k, None, e.to_string()),
        }
    }

    let mut pending = Vec::new();
    for row in env.storage.scan(Space::Dta, b"") {
        let (k, v) = row?;
        match decode_record::<DtaSpec>(&v) {
            Ok(spec) => pending.push(spec),
            Err(e) => quarantine(env, &mut report, "dta", &k, None, e.to_string()),
        }
    }
    // Parents first; a DTA whose parent is gone (quarantined) starts without it.
    while !pending.is_empty() {
        let known = |p: &DtaId| env.dtas.contains_key(p) || !pending.iter().any(|s: &DtaSpec| &s.id == p);
        let (ready, rest): (Vec<DtaSpec>, Vec<DtaSpec>) =
            pending.iter().cloned().partition(|s| s.parents.iter().all(known));
        if ready.is_empty() {
            for s in rest {
                quarantine(env, &mut report, "dta", s.id.as_str().as_bytes(), None, "DTA nesting has a cycle".into());
            }
            break;
        }
        for spec in ready {
            let id = spec.id.clone();
            let parents = spec.parents.clone();
            let entry = DtaEntry::new(spec, env.clone());
            Dta::launch(entry.clone());
            env.dtas.insert(id.clone(), entry);
            for p in parents {
                if let Some(pe) = env.dtas.get(&p) {
                    pe.children.lock().insert(id.clone());
                }
            }
            report.dtas += 1;
        }
        pending = rest;
    }

    let mut snapshots: HashMap<TwinId, TwinState> = HashMap::new();
    for row in env.storage.scan(Space::Snapshot, b"") {
        let (k, v) = row?;
        match decode_record::<TwinState>(&v) {
            Ok(s) => {
                snapshots.insert(s.identity.twin_id.clone(), s);
            }
            Err(e) => {
                let id = String::from_utf8_lossy(&k).to_string();
                quarantine(env, &mut report, "snapshot", &k, Some(&id), e.to_string());
            }
        }
    }

    let versions: HashMap<DtaId, u64> = env.dtas.iter().map(|e| (e.key().clone(), e.resolved().version)).collect();
    let mut members: HashMap<DtaId, (u64, Vec<TwinId>)> = HashMap::new();
    let mut batch: Vec<(Arc<TwinSlot>, TwinState)> = Vec::with_capacity(LAUNCH_BATCH);
    let mut add =
        |ty: &Arc<TypeContext>, state: TwinState, origin: u32, batch: &mut Vec<(Arc<TwinSlot>, TwinState)>| {
            let id = state.identity.twin_id.clone();
            for d in &state.memberships {
                if let Some(v) = versions.get(d) {
                    members.entry(d.clone()).or_insert_with(|| (*v, Vec::new())).1.push(id.clone());
                }
            }
            let slot = Arc::new(TwinSlot::new(id.clone(), ty.clone(), origin));
            env.twins.insert(id, slot.clone());
            ty.twins.fetch_add(1, Relaxed);
            batch.push((slot, state));
        };

    for row in env.storage.scan(Space::Fleet, b"") {
        let (k, v) = row?;
        let chunk = match decode_record::<FleetChunk>(&v) {
            Ok(c) => c,
            Err(e) => {
                quarantine(
                    env,
                    &mut report,
                    "fleet",
                    &k,
                    None,
                    format!("{e}; its twins start only from their own snapshots"),
                );
                continue;
            }
        };
        let Some(ty) = env.types.get(&chunk.device_type).map(|t| t.clone()) else {
            quarantine(env, &mut report, "fleet", &k, None, format!("unknown device type {}", chunk.device_type));
            continue;
        };
        let origin = {
            let mut c = ty.chunks.lock();
            c.push(k.clone());
            (c.len() - 1) as u32
        };
        for spec in chunk.twins {
            if env.quarantine.contains_key(spec.id.as_str()) {
                continue;
            }
            let state = snapshots
                .remove(&spec.id)
                .unwrap_or_else(|| spec.initial_state(&chunk.device_type, &ty.model, chunk.created_at));
            add(&ty, state, origin, &mut batch);
            if batch.len() >= LAUNCH_BATCH {
                report.twins += launch_batch(env, std::mem::take(&mut batch)).await;
            }
        }
    }
    for (id, state) in snapshots {
        match env.types.get(&state.identity.device_type).map(|t| t.clone()) {
            Some(ty) => add(&ty, state, NO_ORIGIN, &mut batch),
            None => quarantine(
                env,
                &mut report,
                "snapshot",
                id.as_str().as_bytes(),
                Some(id.as_str()),
                format!("unknown device type {}", state.identity.device_type),
            ),
        }
    }
    report.twins += launch_batch(env, batch).await;
    register_members(env, members);
    report.millis = started.elapsed().as_millis() as u64;
    Ok(report)
}
