//! Bringing a platform back from its data directory: device types first (their TDTAs),
//! then DTAs parents-first, then every twin from its packed fleet record or its own
//! snapshot, whichever is newer. A record that fails its checksum or does not decode is
//! quarantined: reported (alert, restore report, `Quarantined` on access) and left
//! untouched on disk, while everything else starts.

use crate::codec::page_events;
use crate::dti::{NO_ORIGIN, Start, Tail, TwinSlot, TypeContext, replay_legacy, tail_page};
use crate::env::TwinEnv;
use crate::error::TwinError;
use crate::maps::Directory;
use crate::records::{DeviceTypeSpec, DtaSpec, FleetChunk};
use crate::spaces;
use crate::tdta::{NewMembers, Tdta, on_arbiter};
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use twinfleet_models::{Alert, AlertKind, DtaId, Severity, TwinId, TwinState};
use twinfleet_runtime::{decode_record, page_id, page_key};

/// Individual alerts raised for quarantined records before they are summarized.
const ALERT_LIMIT: usize = 100;

#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreReport {
    pub device_types: usize,
    pub dtas: usize,
    pub twins: usize,
    pub quarantined: Vec<QuarantineEntry>,
    /// Points of the old sled history moved into the series store at this start.
    pub history_migrated: u64,
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
        env.directory.quarantine(t.to_string(), reason.clone());
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

/// What restoring one fleet record did, reported back from its arbiter.
#[derive(Default)]
struct ChunkOutcome {
    launched: usize,
    /// (space, key, twin, reason)
    quarantined: Vec<(&'static str, Vec<u8>, Option<String>, String)>,
}

/// On an arbiter: decode one fleet record and start its twins, each from its own
/// snapshot when it has one.
#[allow(clippy::too_many_arguments)]
fn restore_chunk(
    env: &TwinEnv,
    ty: &Arc<TypeContext>,
    snapshots: &Directory<TwinId, Vec<u8>>,
    tails: &Tails,
    latest: &Directory<TwinId, Vec<u8>>,
    key: &[u8],
    bytes: &[u8],
    origin: u32,
    arbiter: u16,
) -> ChunkOutcome {
    let mut out = ChunkOutcome::default();
    let chunk = match FleetChunk::decode(bytes) {
        Ok(c) => c,
        Err(e) => {
            let reason = format!("{e}; its twins start only from their own snapshots");
            out.quarantined.push(("fleet", key.to_vec(), None, reason));
            return out;
        }
    };
    let mut members = NewMembers::default();
    for spec in chunk.twins {
        let state = match take(snapshots, &spec.id) {
            Some((_, raw)) => match decode_record::<TwinState>(&raw) {
                Ok(s) => s,
                Err(e) => {
                    out.quarantined.push((
                        "snapshot",
                        spec.id.as_str().as_bytes().to_vec(),
                        Some(spec.id.to_string()),
                        e.to_string(),
                    ));
                    continue;
                }
            },
            None => spec.into_initial_state(&chunk.device_type, &ty.model, chunk.created_at),
        };
        if start_restored(env, ty, state, origin, arbiter, (tails, latest), &mut members, &mut out) {
            out.launched += 1;
        }
    }
    // Counted once per record: the counter is shared by every arbiter.
    ty.twins.fetch_add(out.launched, Relaxed);
    members.register(env);
    out
}

/// On an arbiter: start twins that have a snapshot but no readable fleet record.
fn restore_orphans(env: &TwinEnv, orphans: Vec<(TwinId, Vec<u8>)>, stored: Stored<'_>) -> ChunkOutcome {
    let mut out = ChunkOutcome::default();
    let mut members = NewMembers::default();
    for (id, raw) in orphans {
        let key = id.as_str().as_bytes().to_vec();
        match decode_record::<TwinState>(&raw) {
            Ok(state) => match env.directory.types.get(&state.identity.device_type).map(|t| t.clone()) {
                Some(ty) => {
                    if start_restored(env, &ty, state, NO_ORIGIN, 0, stored, &mut members, &mut out) {
                        ty.twins.fetch_add(1, Relaxed);
                        out.launched += 1;
                    }
                }
                None => {
                    let reason = format!("unknown device type {}", state.identity.device_type);
                    out.quarantined.push(("snapshot", key, Some(id.to_string()), reason));
                }
            },
            Err(e) => out.quarantined.push(("snapshot", key, Some(id.to_string()), e.to_string())),
        }
    }
    members.register(env);
    out
}

/// Starts a restored twin, after replaying its journal tail when it has one (a tail
/// that does not decode quarantines the twin: its state would be incomplete).
#[allow(clippy::too_many_arguments)]
fn start_restored(
    env: &TwinEnv,
    ty: &Arc<TypeContext>,
    mut state: TwinState,
    origin: u32,
    arbiter: u16,
    (tails, latest): Stored<'_>,
    members: &mut NewMembers,
    out: &mut ChunkOutcome,
) -> bool {
    let id = state.identity.twin_id.clone();
    let mut tail = Tail::default();
    if let Some((_, paged)) = take(tails, &id) {
        let replayed = paged.and_then(|paged| {
            tail.events = replay_legacy(&*env.storage, &mut state)?;
            tail.apply_paged(&mut state, paged.iter().map(Vec::as_slice))
        });
        if let Err(reason) = replayed {
            out.quarantined.push(("journal", id.as_str().as_bytes().to_vec(), Some(id.to_string()), reason));
            return false;
        }
    }
    let slot = Arc::new(TwinSlot::new(id.clone(), ty.clone(), origin, arbiter));
    env.directory.restore_twin(slot.clone());
    let latest = Start::decode_latest(&slot.id, take(latest, &slot.id).map(|(_, raw)| raw).as_deref());
    members.launch(env, slot, state, Start { restart: None, tail: tail.events, latest, chunk: tail.chunk });
    true
}

/// Removes `id` from one of the maps restore read ahead, under a shared lock when it is
/// not there (most twins have no snapshot, tail or latest values of their own, and every
/// arbiter looks each of its twins up in all three).
fn take<V>(map: &Directory<TwinId, V>, id: &TwinId) -> Option<(TwinId, V)> {
    if map.contains_key(id) { map.remove(id) } else { None }
}

/// What restore read ahead for the twins: who has a journal tail (with its events from
/// the journal pages, encoded, or why they cannot be read), and the stored latest
/// telemetry values.
type Stored<'a> = (&'a Tails, &'a Directory<TwinId, Vec<u8>>);
type Tails = Directory<TwinId, Result<Vec<Vec<u8>>, String>>;

pub(crate) async fn restore(env: &Arc<TwinEnv>) -> Result<RestoreReport, TwinError> {
    let started = Instant::now();
    let mut report = RestoreReport::default();

    for row in env.storage.scan(spaces::DEVICE_TYPE, b"") {
        let (k, v) = row?;
        match decode_record::<DeviceTypeSpec>(&v) {
            Ok(spec) => {
                let ctx = TypeContext::new(&spec, env.infra().clone());
                Tdta::launch(ctx.clone(), env.clone());
                env.directory.restore_type(ctx);
                report.device_types += 1;
            }
            Err(e) => quarantine(env, &mut report, "device_type", &k, None, e.to_string()),
        }
    }

    let mut pending = Vec::new();
    for row in env.storage.scan(spaces::DTA, b"") {
        let (k, v) = row?;
        match decode_record::<DtaSpec>(&v) {
            Ok(spec) => pending.push(spec),
            Err(e) => quarantine(env, &mut report, "dta", &k, None, e.to_string()),
        }
    }
    // Parents first; a DTA whose parent is gone (quarantined) starts without it.
    while !pending.is_empty() {
        let known = |p: &DtaId| env.directory.dtas.contains_key(p) || !pending.iter().any(|s: &DtaSpec| &s.id == p);
        let (ready, rest): (Vec<DtaSpec>, Vec<DtaSpec>) =
            pending.iter().cloned().partition(|s| s.parents.iter().all(known));
        if ready.is_empty() {
            for s in rest {
                quarantine(env, &mut report, "dta", s.id.as_str().as_bytes(), None, "DTA nesting has a cycle".into());
            }
            break;
        }
        for spec in ready {
            crate::dta::start(spec, env);
            report.dtas += 1;
        }
        pending = rest;
    }

    // Snapshots stay raw here: the arbiters decode them, in parallel, as they meet
    // their twins in the fleet records.
    let snapshots: Arc<Directory<TwinId, Vec<u8>>> = Arc::new(Directory::default());
    for row in env.storage.scan(spaces::SNAPSHOT, b"") {
        let (k, v) = row?;
        match std::str::from_utf8(&k).ok().and_then(|s| TwinId::new(s).ok()) {
            Some(id) => {
                snapshots.insert(id, v);
            }
            None => quarantine(env, &mut report, "snapshot", &k, None, "key is not a twin id".into()),
        }
    }

    // Twins with journal events after their snapshot (normally few): replayed on start,
    // from the journal pages their markers name (one pass over the pages still kept).
    let tails: Arc<Tails> = Arc::new(Directory::default());
    let from_page: Directory<TwinId, u64> = Directory::default();
    for row in env.storage.scan(spaces::TAIL, b"") {
        let (k, v) = row?;
        if let Some(id) = std::str::from_utf8(&k).ok().and_then(|s| TwinId::new(s).ok()) {
            if let Some(page) = tail_page(&v) {
                from_page.insert(id.clone(), page);
            }
            tails.insert(id, Ok(Vec::new()));
        }
    }
    if let Some(first) = from_page.iter().map(|e| *e.value()).min() {
        for (k, v) in env.storage.scan_range(spaces::JOURNAL_PAGE, &page_key(first), &page_key(u64::MAX))? {
            let page = page_id(&k).unwrap_or(0);
            for item in page_events(&v) {
                let Ok((id, event)) = item else {
                    // Whose events follow is unknown: every twin that may have some
                    // there is quarantined rather than started without them.
                    let why = format!("journal page {page} does not parse");
                    tracing::error!("{why}");
                    for e in from_page.iter().filter(|e| *e.value() <= page) {
                        tails.insert(e.key().clone(), Err(why.clone()));
                    }
                    break;
                };
                if from_page.get(id).is_some_and(|from| page >= *from)
                    && let Some(mut events) = tails.get_mut(id)
                    && let Ok(events) = events.as_mut()
                {
                    events.push(event.to_vec());
                }
            }
        }
    }
    drop(from_page);

    // The latest telemetry values of the twins that have any, in one sequential pass.
    let latest: Arc<Directory<TwinId, Vec<u8>>> = Arc::new(Directory::default());
    for row in env.storage.scan(spaces::TELEMETRY_LATEST, b"") {
        let (k, v) = row?;
        if let Some(id) = std::str::from_utf8(&k).ok().and_then(|s| TwinId::new(s).ok()) {
            latest.insert(id, v);
        }
    }
    // With the newer points of the history's heads (written since its last
    // checkpoint; after a crash, replayed from its WAL).
    for (id, points) in crate::latest::newest_by_twin(&env.series) {
        let Ok(id) = TwinId::new(&id) else { continue };
        let merged = crate::latest::merge_into(latest.get(&id).as_deref().map(|v| v.as_slice()), &points);
        if let Some(merged) = merged {
            latest.insert(id, merged);
        }
    }

    let n = env.arbiters.len();
    let mut pending = Vec::new();
    let mut next = 0usize;
    for row in env.storage.scan(spaces::FLEET, b"") {
        let (k, v) = row?;
        let type_id = k.split(|b| *b == 0).next().and_then(|t| std::str::from_utf8(t).ok()).unwrap_or("");
        let Some(ty) = env.directory.types.get(type_id).map(|t| t.clone()) else {
            quarantine(env, &mut report, "fleet", &k, None, format!("unknown device type {type_id:?}"));
            continue;
        };
        let origin = {
            let mut c = ty.chunks.lock();
            c.push(k.clone());
            (c.len() - 1) as u32
        };
        let (e, s, t, l, i) = (env.clone(), snapshots.clone(), tails.clone(), latest.clone(), next % n);
        pending.push(on_arbiter(env, i, move || restore_chunk(&e, &ty, &s, &t, &l, &k, &v, origin, i as u16)));
        next += 1;
    }
    let mut outcomes: Vec<ChunkOutcome> = futures::future::join_all(pending).await.into_iter().flatten().collect();

    // Twins whose fleet record is gone or corrupt still start from their own snapshots.
    let orphans: Vec<(TwinId, Vec<u8>)> = snapshots.iter().map(|e| (e.key().clone(), e.value().clone())).collect();
    snapshots.clear();
    if !orphans.is_empty() {
        let (e, t, l) = (env.clone(), tails.clone(), latest.clone());
        if let Some(o) = on_arbiter(env, 0, move || restore_orphans(&e, orphans, (&t, &l))).await {
            outcomes.push(o);
        }
    }
    for o in outcomes {
        report.twins += o.launched;
        for (space, key, twin, reason) in o.quarantined {
            quarantine(env, &mut report, space, &key, twin.as_deref(), reason);
        }
    }
    report.history_migrated = migrate_history(env).await?;
    report.millis = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// The history of data directories from before the series store (`TELEMETRY`: one
/// packed batch per record) moves into the series store once, after the twins started:
/// each record's points go through their twin as an ordinary batch (so its latest values
/// know those metrics too), durably, and only then is the record deleted (a crash in
/// between migrates it again; the store drops exact duplicates). Records of twins that
/// no longer exist are deleted; one that does not decode or is refused stays and is
/// logged.
async fn migrate_history(env: &TwinEnv) -> Result<u64, TwinError> {
    use twinfleet_runtime::WriteBatch;
    let mut moved = 0u64;
    let rows: Vec<_> = env.storage.scan(spaces::TELEMETRY, b"").collect::<Result<_, _>>()?;
    for (k, v) in rows {
        let twin = k.split(|b| *b == 0).next().and_then(|t| std::str::from_utf8(t).ok()).unwrap_or("");
        if let Some(slot) = env.directory.twins.get(twin).map(|s| s.clone()) {
            let Some(points) = twinfleet_models::decode_batch(&v) else {
                tracing::warn!(twin, "an old telemetry record does not decode; left where it is");
                continue;
            };
            let handle = crate::handle::TwinHandle::new(slot);
            let mut taken = true;
            for part in points.chunks(env.settings.telemetry.max_points.max(1)) {
                match handle.ingest(part.to_vec()).await {
                    Ok(n) => moved += n as u64,
                    Err(e) => {
                        // (Never a reason not to start: the record stays for the next one.)
                        tracing::warn!(twin, "an old telemetry record could not be moved: {e}; left where it is");
                        taken = false;
                        break;
                    }
                }
            }
            if !taken {
                continue;
            }
        }
        let mut done = WriteBatch::new();
        done.delete(spaces::TELEMETRY, k);
        env.storage.submit(done).await?;
    }
    if moved > 0 {
        tracing::info!(points = moved, "old telemetry history moved into the series store");
    }
    Ok(moved)
}
