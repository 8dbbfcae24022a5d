//! What the directory, the handles and operators see of a twin without asking its actor:
//! its slot, how it starts, and its view.

use super::*;

/// Marks a twin that has no packed fleet record to fall back to.
pub(crate) const NO_ORIGIN: u32 = u32::MAX;

/// The configuration layers a DTA hands to its members: its own and its ancestors'.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedLayers {
    pub dta: DtaId,
    /// Newer pushes carry larger versions; a twin ignores an older one arriving late.
    pub version: u64,
    pub layers: Vec<LayerRef>,
}

/// The stable home of a twin in the directory. The actor behind it comes and goes with
/// restarts; handles keep pointing at the slot.
#[derive(Debug)]
pub struct TwinSlot {
    pub(crate) id: TwinId,
    pub(crate) stats: ActorStats,
    addr: RwLock<Option<Addr<Dti>>>,
    pub(crate) ty: Arc<TypeContext>,
    /// Index of the packed fleet record this twin was created from, or `NO_ORIGIN`.
    pub(crate) origin: u32,
    /// The arbiter the twin runs on (and is restarted on).
    pub(crate) arbiter: u16,
    /// What listings filter on without asking the actor: set at every start and after
    /// every change of metadata or lifecycle.
    archived: AtomicBool,
    tags: RwLock<Option<Arc<[String]>>>,
    /// The `last_seq` of the newest snapshot known to be durable (set as tickets of
    /// batches holding a snapshot resolve; see `Dti::journal`).
    snapshot_stored: AtomicU64,
    /// The twin's `last_seq`, for journal retention (which counts the events only the
    /// pages hold yet).
    last_seq: AtomicU64,
}

impl crate::queued::Counted for TwinSlot {
    fn stats(&self) -> &ActorStats {
        &self.stats
    }
}

impl TwinSlot {
    pub(crate) fn new(id: TwinId, ty: Arc<TypeContext>, origin: u32, arbiter: u16) -> Self {
        let stats = ActorStats::new("dti", id.as_arc().clone(), Some(ty.path.clone()));
        TwinSlot {
            id,
            stats,
            addr: RwLock::new(None),
            ty,
            origin,
            arbiter,
            archived: AtomicBool::new(false),
            tags: RwLock::new(None),
            snapshot_stored: AtomicU64::new(0),
            last_seq: AtomicU64::new(0),
        }
    }

    pub(super) fn set_summary(&self, state: &TwinState) {
        self.archived.store(state.lifecycle == Lifecycle::Archived, Relaxed);
        let tags = &state.metadata.tags;
        *self.tags.write() = (!tags.is_empty()).then(|| Arc::from(tags.as_slice()));
    }

    /// Updates the summary if the state's lifecycle or tags differ from it (read from
    /// the state, not inferred from event kinds).
    pub(super) fn refresh_summary(&self, state: &TwinState) {
        let archived = state.lifecycle == Lifecycle::Archived;
        let tags = &state.metadata.tags;
        let same_tags = match self.tags.read().as_deref() {
            None => tags.is_empty(),
            Some(t) => t == tags.as_slice(),
        };
        if archived && !self.archived() {
            // An archived twin accepts nothing from its device: end its sessions now.
            self.ty.infra.sessions.close(self.id.as_str(), "twin archived");
        }
        if archived != self.archived() || !same_tags {
            self.set_summary(state);
        }
    }

    /// Records that the snapshot at `seq` is durable.
    pub(crate) fn snapshot_stored(&self, seq: u64) {
        self.snapshot_stored.fetch_max(seq, Relaxed);
    }

    pub(crate) fn last_seq(&self) -> u64 {
        self.last_seq.load(Relaxed)
    }

    pub(super) fn set_last_seq(&self, seq: u64) {
        self.last_seq.store(seq, Relaxed);
    }

    pub(crate) fn is_snapshot_stored(&self, seq: u64) -> bool {
        self.snapshot_stored.load(Relaxed) >= seq
    }

    pub(crate) fn archived(&self) -> bool {
        self.archived.load(Relaxed)
    }

    pub(crate) fn has_tag(&self, tag: &str) -> bool {
        self.tags.read().as_ref().is_some_and(|t| t.iter().any(|x| x == tag))
    }

    pub(crate) fn tags(&self) -> Vec<String> {
        self.tags.read().as_deref().map(<[String]>::to_vec).unwrap_or_default()
    }

    pub(crate) fn set_addr(&self, addr: Option<Addr<Dti>>) {
        *self.addr.write() = addr;
    }

    /// Runs `f` with the live address, without cloning it (an `Addr` clone allocates).
    pub(crate) fn with_addr<R>(&self, f: impl FnOnce(&Addr<Dti>) -> R) -> Option<R> {
        self.addr.read().as_ref().map(f)
    }
}

pub(crate) use crate::latest::{Latest, decode_latest, encode_latest};

/// How a DTI starts, besides its state.
#[derive(Debug, Default)]
pub(crate) struct Start {
    /// Set when this incarnation is a restart: recorded in the journal on start.
    pub restart: Option<(String, u32)>,
    /// Journal events replayed on top of the stored snapshot.
    pub tail: u32,
    /// Those of them that came from the journal pages: the history record the next
    /// snapshot writes.
    pub chunk: Option<Box<Chunk>>,
    /// The latest telemetry values, as stored.
    pub latest: Option<Box<Latest>>,
}

impl Start {
    /// The stored latest values of a twin, if it has any (a decode failure is logged
    /// and starts empty: they are a cache of the telemetry records).
    pub(crate) fn decode_latest(id: &TwinId, raw: Option<&[u8]>) -> Option<Box<Latest>> {
        let raw = raw?;
        match decode_latest(raw) {
            Ok(l) => Some(Box::new(l)),
            Err(e) => {
                tracing::warn!(twin = %id, "the latest telemetry values do not decode ({e}); starting without them");
                None
            }
        }
    }
}

/// What a twin shows of itself.
#[derive(Debug, Clone, Serialize)]
pub struct TwinView {
    #[serde(flatten)]
    pub state: TwinState,
    pub effective_config: EffectiveConfig,
    pub in_sync: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired_sync: Option<WaitView>,
    /// The newest value of each metric the device sent: `metric → {at, value}`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub telemetry_latest: BTreeMap<String, LatestPoint>,
    /// From its open alerts.
    pub health: twinfleet_models::Health,
}

pub use crate::latest::LatestPoint;

/// A wait the twin owns, as shown to operators.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct WaitView {
    pub attempt: u32,
    pub deadline: Timestamp,
}

/// The last persisted state of a twin and how it got there: its own snapshot, else its
/// packed fleet record, then the journal events after it (`Tail`).
pub(crate) fn load_twin(ty: &TypeContext, slot: &TwinSlot) -> Result<(TwinState, Tail), String> {
    let storage = &*ty.infra.storage;
    let mut state = load_base(ty, slot)?;
    let mut tail = Tail::default();
    let key = twin_key(&slot.id);
    if let Some(marker) = storage.get(spaces::TAIL, &key).map_err(|e| e.to_string())? {
        tail.events = replay_legacy(storage, &mut state)?;
        if let Some(page) = tail_page(&marker) {
            let mut events = Vec::new();
            for (_, v) in storage
                .scan_range(spaces::JOURNAL_PAGE, &page_key(page), &page_key(u64::MAX))
                .map_err(|e| e.to_string())?
            {
                for item in page_events(&v) {
                    let (id, event) = item?;
                    if id == slot.id.as_str() {
                        events.push(event.to_vec());
                    }
                }
            }
            tail.apply_paged(&mut state, events.iter().map(Vec::as_slice))?;
        }
    }
    Ok((state, tail))
}

/// The journal events a twin replayed on top of its stored state.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    pub events: u32,
    /// The paged ones, as the history record of the next snapshot.
    pub chunk: Option<Box<Chunk>>,
}

impl Tail {
    /// Applies the encoded events of the journal pages that come after `state.last_seq`,
    /// in order, keeping them for the next history record.
    pub(crate) fn apply_paged<'a>(
        &mut self,
        state: &mut TwinState,
        events: impl Iterator<Item = &'a [u8]>,
    ) -> Result<(), String> {
        for bytes in events {
            let e = decode_event(bytes).map_err(|e| format!("journal page item: {e}"))?;
            if e.seq <= state.last_seq {
                continue;
            }
            state.evolve(&e);
            self.chunk.get_or_insert_with(|| Box::new(Chunk::new(e.seq))).push(e.seq, bytes);
            self.events += 1;
        }
        Ok(())
    }
}

/// The page a `TAIL` marker names (`None` for a marker of before the pages).
pub(crate) fn tail_page(marker: &[u8]) -> Option<u64> {
    marker.try_into().ok().map(u64::from_be_bytes)
}

/// Applies the per-event journal records after `state.last_seq` (data directories of
/// before the pages; newer records are chunks that a snapshot covers); returns how many.
pub(crate) fn replay_legacy(storage: &dyn twinfleet_runtime::Storage, state: &mut TwinState) -> Result<u32, String> {
    let id = state.identity.twin_id.clone();
    let start = crate::records::journal_key(&id, state.last_seq.saturating_add(1));
    let end = crate::records::journal_key(&id, u64::MAX);
    let mut n = 0;
    for (k, v) in storage.scan_range(spaces::JOURNAL, &start, &end).map_err(|e| e.to_string())? {
        let events = decode_journal(&v)
            .map_err(|e| format!("journal entry {}: {e}", String::from_utf8_lossy(&k).replace('\0', "/")))?;
        for e in events {
            if e.seq > state.last_seq {
                state.evolve(&e);
                n += 1;
            }
        }
    }
    Ok(n)
}

fn load_base(ty: &TypeContext, slot: &TwinSlot) -> Result<TwinState, String> {
    let storage = &ty.infra.storage;
    if let Some(bytes) = storage.get(spaces::SNAPSHOT, &twin_key(&slot.id)).map_err(|e| e.to_string())? {
        return decode_record(&bytes).map_err(|e| format!("snapshot: {e}"));
    }
    if slot.origin == NO_ORIGIN {
        return Err("no snapshot and no fleet record".into());
    }
    let key = ty.chunks.lock().get(slot.origin as usize).cloned().ok_or("fleet record index out of range")?;
    let bytes = storage.get(spaces::FLEET, &key).map_err(|e| e.to_string())?.ok_or("fleet record missing")?;
    let chunk = FleetChunk::decode(&bytes).map_err(|e| format!("fleet record: {e}"))?;
    let spec = chunk.twins.iter().find(|s| s.id == slot.id).ok_or("twin missing from its fleet record")?;
    Ok(spec.initial_state(&chunk.device_type, &ty.model, chunk.created_at))
}
