//! The series store: metric history, apart from sled (which keeps twin state).
//!
//! - **Write-ahead log.** [`SeriesStore::submit`] queues the points of any number of
//!   series; a writer thread appends everything queued at once as one WAL record and
//!   syncs it (one fsync covers many twins, as sled's group commit does), and only then
//!   resolves the callers' tickets and adds the points to the heads. A point is
//!   acknowledged only once its WAL record is on disk.
//! - **Heads.** Each series has a head chunk in memory, compressed as it fills
//!   ([`twinfleet_models::series::codec`]); a head is sealed when it holds
//!   `head_points` points or the next point belongs to a later partition.
//! - **Checkpoints.** When the WAL has grown past `checkpoint_wal_bytes` (or on
//!   [`SeriesStore::checkpoint`] and at shutdown) every head is sealed, the sealed chunks
//!   are written as one immutable segment file per namespace and time partition
//!   (`series/<namespace>/<partition start>/<seq>.seg`, see `segment`), and the WAL is
//!   started afresh. A crash replays the WAL into the heads.
//! - **Namespaces and partitions.** A namespace (the platform uses the device type) has
//!   its own partitions of `partition_ms` (default one day); retention drops whole
//!   partitions of a namespace ([`SeriesStore::drop_before`]).
//! - **Order and duplicates** (the policy, per series): a point later than the series'
//!   newest is appended; one at the same timestamp with the same value is a duplicate
//!   (a redelivery) and is dropped; any other point at or before the newest (a late
//!   point, or a new value for a stored timestamp) goes to the series' *late head*, a
//!   second chunk sealed like the first. Queries merge a series' chunks in time order,
//!   and where two chunks hold the same timestamp the later write wins. A point older
//!   than what retention dropped is refused as expired.
//! - **Queries** ([`SeriesStore::points`]) stream one partition at a time, decode one
//!   cluster of overlapping chunks at a time, and never touch the twins.
//! - **Last points.** A head knows its series' newest point (the newest timestamp; of
//!   equal ones the last written), so the store answers "the newest point of each series
//!   written since the last checkpoint" from memory ([`SeriesStore::last_point`],
//!   [`SeriesStore::last_points`]), also after a crash (the WAL replays into the heads).
//!   A checkpoint hands those points to the owner's [`LastSink`] before it retires the
//!   WAL that held them. The platform keeps a twin's latest telemetry values this way,
//!   without a write of their own per message (see `twinfleet_actors::latest`).

mod segment;
mod tail;

pub use tail::{WalPosition, WalRead, WalRecord};

use parking_lot::Mutex;
use segment::{ChunkRef, Cursor, Sealed, Segment};
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use tokio::sync::oneshot;
use twinfleet_models::series::codec::{ChunkEncoder, decode};
use twinfleet_models::series::query::Merge;

/// Tuning of a series store.
#[derive(Debug, Clone, Copy)]
pub struct SeriesOptions {
    /// Width of a time partition (the unit retention drops), ms.
    pub partition_ms: i64,
    /// Points a head chunk holds before it is sealed.
    pub head_points: u32,
    /// WAL size past which the writer seals every head into segments and starts a new
    /// WAL.
    pub checkpoint_wal_bytes: u64,
    /// Points queued for the writer at most (callers wait beyond).
    pub queue_batches: usize,
    /// WAL kept past checkpoints for readers (exports) at most, in bytes; past it the
    /// oldest generations go even if held (see `tail`).
    pub export_wal_bytes: u64,
}

impl Default for SeriesOptions {
    fn default() -> Self {
        SeriesOptions {
            partition_ms: 86_400_000,
            head_points: 7_200,
            checkpoint_wal_bytes: 256 << 20,
            queue_batches: 4_096,
            export_wal_bytes: 1 << 30,
        }
    }
}

/// Why the series store refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeriesError {
    #[error("history storage failed, the points were not stored: {0}")]
    Io(String),
    #[error("history storage is full, the points were not stored ({0}); free space on the data directory's disk")]
    Full(String),
    #[error("history storage is shut down; the points were not stored")]
    Closed,
    #[error("a namespace must be 1 to 200 bytes and a series key 1 to 512")]
    BadName,
}

fn io(e: std::io::Error) -> SeriesError {
    if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
        SeriesError::Full(e.to_string())
    } else {
        SeriesError::Io(e.to_string())
    }
}

/// The newest point of a series, as a checkpoint hands it to the [`LastSink`].
#[derive(Debug, Clone, PartialEq)]
pub struct LastPoint {
    pub namespace: String,
    pub key: String,
    pub at: i64,
    pub value: f64,
}

/// Where a checkpoint hands the newest point of every series written since the one
/// before (called off the writer thread, before the WAL that holds them is retired). An
/// error keeps the WAL and the points: they are offered again at the next checkpoint
/// and [`SeriesStore::last_point`] still answers them meanwhile.
pub type LastSink = Box<dyn Fn(&[LastPoint]) -> Result<(), String> + Send + Sync>;

/// The points of one series in one submission.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesPoints {
    pub namespace: String,
    pub key: String,
    pub points: Vec<(i64, f64)>,
}

/// The points of any number of series, already in the WAL's encoding: what
/// [`SeriesStore::submit_batch`] takes. Producers append series to it (the platform's
/// twins do, one batch per twin and message, and a gateway's drain appends the batches
/// of many twins); the writer copies the bytes into the WAL record as they are and adds
/// the points to the heads straight from them. No string or vector per series on the
/// way: a telemetry message of ten metrics costs one buffer, not thirty allocations.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeriesBatch {
    bytes: Vec<u8>,
    series: u32,
    points: usize,
}

impl SeriesBatch {
    pub fn new() -> Self {
        SeriesBatch::default()
    }

    pub fn with_capacity(bytes: usize) -> Self {
        SeriesBatch { bytes: Vec::with_capacity(bytes), series: 0, points: 0 }
    }

    /// Adds one series: `namespace`, the key made of `key`'s parts joined as they are,
    /// and its points. A namespace outside 1 to 200 bytes or a key outside 1 to 512 is
    /// refused ([`SeriesError::BadName`]) and nothing is added.
    pub fn push(
        &mut self,
        namespace: &str,
        key: &[&str],
        points: impl IntoIterator<Item = (i64, f64)>,
    ) -> Result<(), SeriesError> {
        let key_len: usize = key.iter().map(|k| k.len()).sum();
        if !(1..=MAX_NAMESPACE).contains(&namespace.len()) || !(1..=MAX_KEY).contains(&key_len) {
            return Err(SeriesError::BadName);
        }
        let b = &mut self.bytes;
        b.extend_from_slice(&(namespace.len() as u16).to_le_bytes());
        b.extend_from_slice(namespace.as_bytes());
        b.extend_from_slice(&(key_len as u16).to_le_bytes());
        for k in key {
            b.extend_from_slice(k.as_bytes());
        }
        let count_at = b.len();
        b.extend_from_slice(&0u32.to_le_bytes());
        let mut n = 0u32;
        for (t, v) in points {
            b.extend_from_slice(&t.to_le_bytes());
            b.extend_from_slice(&v.to_bits().to_le_bytes());
            n += 1;
        }
        b[count_at..count_at + 4].copy_from_slice(&n.to_le_bytes());
        self.series += 1;
        self.points += n as usize;
        Ok(())
    }

    /// Adds every series of `other` after this batch's.
    pub fn append(&mut self, other: &SeriesBatch) {
        self.bytes.extend_from_slice(&other.bytes);
        self.series += other.series;
        self.points += other.points;
    }

    pub fn series(&self) -> usize {
        self.series as usize
    }

    pub fn points(&self) -> usize {
        self.points
    }

    /// The encoded size, in bytes.
    pub fn bytes_len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.series == 0
    }

    /// The series as added, decoded again.
    pub fn to_series(&self) -> Vec<SeriesPoints> {
        let mut out = Vec::with_capacity(self.series as usize);
        each_series(&self.bytes, |namespace, key, points| {
            out.push(SeriesPoints { namespace: namespace.into(), key: key.into(), points: pairs(points).collect() })
        });
        out
    }
}

impl TryFrom<Vec<SeriesPoints>> for SeriesBatch {
    type Error = SeriesError;
    fn try_from(batch: Vec<SeriesPoints>) -> Result<Self, SeriesError> {
        let mut b = SeriesBatch::with_capacity(
            batch.iter().map(|s| 12 + s.namespace.len() + s.key.len() + s.points.len() * 16).sum(),
        );
        for s in &batch {
            b.push(&s.namespace, &[&s.key], s.points.iter().copied())?;
        }
        Ok(b)
    }
}

/// The longest namespace (the platform's device type ids: 128) and series key (a twin
/// id and a metric name of up to 128 each, and the space between), in bytes.
const MAX_NAMESPACE: usize = 200;
const MAX_KEY: usize = 512;

/// Calls `f` with each series encoded in `body` (a WAL record's series, after their
/// count): namespace, key, and the points as 16-byte (timestamp, value bits) pairs.
/// False where the bytes end early or a name is not UTF-8.
fn each_series(mut body: &[u8], mut f: impl FnMut(&str, &str, &[u8])) -> bool {
    while !body.is_empty() {
        let mut c = Cursor(body);
        let (Some(ns), Some(key)) = (c.str(), c.str()) else { return false };
        let Some(n) = c.u32() else { return false };
        let Some(points) = c.take(n as usize * 16) else { return false };
        f(ns, key, points);
        body = c.0;
    }
    true
}

/// The (timestamp, value) pairs of `each_series`' points.
fn pairs(points: &[u8]) -> impl Iterator<Item = (i64, f64)> + '_ {
    points.chunks_exact(16).map(|p| {
        let (t, v) = p.split_at(8);
        (
            i64::from_le_bytes(t.try_into().expect("8 bytes")),
            f64::from_bits(u64::from_le_bytes(v.try_into().expect("8 bytes"))),
        )
    })
}

/// Resolves once the submitted points are in the WAL, on disk.
#[derive(Debug)]
pub struct SeriesTicket(oneshot::Receiver<Result<(), SeriesError>>);

impl std::future::Future for SeriesTicket {
    type Output = Result<(), SeriesError>;
    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.get_mut().0).poll(cx).map(|r| r.unwrap_or(Err(SeriesError::Closed)))
    }
}

impl SeriesTicket {
    /// Waits on the calling thread (for code outside an async runtime).
    pub fn wait(self) -> Result<(), SeriesError> {
        self.0.blocking_recv().unwrap_or(Err(SeriesError::Closed))
    }
}

/// Counters of the store, for /metrics and the benchmarks.
#[derive(Debug, Default)]
pub struct SeriesCounters {
    pub points: AtomicU64,
    pub duplicates: AtomicU64,
    pub late: AtomicU64,
    pub expired: AtomicU64,
    pub groups: AtomicU64,
    pub wal_bytes: AtomicU64,
    pub checkpoints: AtomicU64,
    pub segment_bytes: AtomicU64,
    pub corrupt_segments: AtomicU64,
    pub corrupt_chunks: AtomicU64,
    pub wal_records_replayed: AtomicU64,
    pub partitions_dropped: AtomicU64,
    /// WAL generations removed past `export_wal_bytes` while a reader held them.
    pub wal_export_dropped: AtomicU64,
    /// Bytes of WAL kept in `wal/done/` for readers.
    pub wal_kept_bytes: AtomicU64,
}

enum Pending {
    Write { batch: SeriesBatch, done: oneshot::Sender<Result<(), SeriesError>> },
    Checkpoint { done: oneshot::Sender<Result<(), SeriesError>> },
    Delete { namespace: String, prefix: String, done: oneshot::Sender<Result<(), SeriesError>> },
}

/// A deletion of every series of a namespace whose key starts with `prefix`: chunks
/// written before it (`seq` below) and WAL records before its position are skipped.
#[derive(Debug, Clone)]
struct Tombstone {
    namespace: String,
    prefix: String,
    seq: u64,
    wal: (u64, u64),
}

impl Tombstone {
    fn covers(&self, namespace: &str, key: &str) -> bool {
        self.namespace == namespace && key.starts_with(&self.prefix)
    }

    fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        for s in [&self.namespace, &self.prefix] {
            body.extend_from_slice(&(s.len() as u16).to_le_bytes());
            body.extend_from_slice(s.as_bytes());
        }
        for v in [self.seq, self.wal.0, self.wal.1] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        let mut rec = (body.len() as u32).to_le_bytes().to_vec();
        rec.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        rec.extend_from_slice(&body);
        rec
    }
}

struct Head {
    enc: ChunkEncoder,
    partition: i64,
    seq: u64,
}

#[derive(Default)]
struct Heads {
    main: Option<Head>,
    late: Option<Head>,
}

impl Heads {
    /// The series' newest point since the last checkpoint: the main head's last (a
    /// point at its newest timestamp goes there, so the last written of equal ones).
    fn newest(&self) -> Option<(i64, f64)> {
        self.main.as_ref().map(|h| (h.enc.last_at(), h.enc.last_value()))
    }
}

/// One namespace: its partitions' segments, chunks sealed since the last checkpoint,
/// the heads, and how far retention has dropped.
#[derive(Default)]
struct Namespace {
    segments: BTreeMap<i64, Vec<Arc<Segment>>>,
    sealed: BTreeMap<i64, Vec<Arc<Sealed>>>,
    heads: HashMap<String, Heads, foldhash::fast::RandomState>,
    dropped_before: i64,
}

struct Inner {
    spaces: HashMap<String, Namespace, foldhash::fast::RandomState>,
    seq: u64,
    tombstones: Vec<Tombstone>,
    /// Newest points of checkpoints whose sink failed: offered again at the next one,
    /// and answered by `last_point` where the series has no head since.
    unsunk: HashMap<(String, String), (i64, f64)>,
}

/// The series store of one data directory.
pub struct SeriesStore {
    dir: PathBuf,
    opts: SeriesOptions,
    inner: Mutex<Inner>,
    tx: parking_lot::RwLock<Option<SyncSender<Pending>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The end of the durable WAL (generation, bytes), for readers.
    durable: Mutex<tail::WalPosition>,
    /// Readers' holds: name → oldest generation still needed.
    holds: Mutex<HashMap<String, u64>>,
    /// Buffers of written batches, for the next ones ([`SeriesStore::batch`]).
    spare: Mutex<Vec<Vec<u8>>>,
    last_sink: parking_lot::RwLock<Option<LastSink>>,
    pub counters: SeriesCounters,
}

/// A checkpoint begun by the writer: the sealed chunks to write, and the newest WAL
/// generation they cover.
struct CheckpointJob {
    work: Vec<(String, i64, Vec<Arc<Sealed>>)>,
    old_gen: u64,
    /// The newest point of every series written since the checkpoint before.
    last: Vec<LastPoint>,
    /// The store's sequence when it began (a deletion at or after it is newer).
    seq: u64,
}

fn path_name(ns: &str) -> String {
    let safe = ns.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')) && !ns.starts_with('.');
    if safe { ns.to_string() } else { format!("~{}", ns.bytes().map(|b| format!("{b:02x}")).collect::<String>()) }
}

fn ns_from_path(name: &str) -> Option<String> {
    match name.strip_prefix('~') {
        None => Some(name.to_string()),
        Some(hex) => {
            let bytes: Option<Vec<u8>> =
                (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect();
            String::from_utf8(bytes?).ok()
        }
    }
}

const WAL_MAGIC: &[u8; 8] = b"TFWAL001";

/// Creates `dir` and its missing parents with mode 0700.
fn mkdir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

impl SeriesStore {
    /// Opens (or creates) the store in `dir`: reads every segment's index (a segment that
    /// does not check is reported, counted and skipped) and replays the WAL into the
    /// heads (a torn record at its end, from a crash mid-write, is cut off).
    pub fn open(dir: &Path, opts: SeriesOptions) -> Result<Arc<SeriesStore>, SeriesError> {
        // Owner only, as the rest of the data directory (0700 directories, 0600 files).
        mkdir(&dir.join("wal")).map_err(io)?;
        crate::lock::restrict_tree(dir).map_err(io)?;
        let store = Arc::new(SeriesStore {
            dir: dir.to_path_buf(),
            opts,
            inner: Mutex::new(Inner {
                spaces: HashMap::default(),
                seq: 0,
                tombstones: Vec::new(),
                unsunk: HashMap::new(),
            }),
            tx: parking_lot::RwLock::new(None),
            writer: Mutex::new(None),
            durable: Mutex::new(tail::WalPosition::default()),
            holds: Mutex::new(HashMap::new()),
            spare: Mutex::new(Vec::new()),
            last_sink: parking_lot::RwLock::new(None),
            counters: SeriesCounters::default(),
        });
        store.load_tombstones()?;
        store.load_segments()?;
        let wal = store.replay_wal()?;
        *store.durable.lock() = tail::WalPosition { generation: wal.gen_no, offset: wal.bytes };
        let (tx, rx) = sync_channel(opts.queue_batches.max(1));
        let s = store.clone();
        let handle =
            std::thread::Builder::new().name("tf-series".into()).spawn(move || s.writer_loop(rx, wal)).map_err(io)?;
        *store.tx.write() = Some(tx);
        *store.writer.lock() = Some(handle);
        Ok(store)
    }

    fn load_tombstones(&self) -> Result<(), SeriesError> {
        let data = match std::fs::read(self.dir.join("tombstones")) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(e)),
        };
        let mut inner = self.inner.lock();
        let mut c = Cursor(&data);
        while let (Some(len), Some(crc)) = (c.u32(), c.u32()) {
            let Some(body) = c.take(len as usize) else { break };
            if crc32fast::hash(body) != crc {
                break;
            }
            let mut b = Cursor(body);
            let t = (|| {
                Some(Tombstone {
                    namespace: b.string()?,
                    prefix: b.string()?,
                    seq: b.u64()?,
                    wal: (b.u64()?, b.u64()?),
                })
            })();
            let Some(t) = t else { break };
            inner.seq = inner.seq.max(t.seq + 1);
            inner.tombstones.push(t);
        }
        Ok(())
    }

    fn load_segments(&self) -> Result<(), SeriesError> {
        let mut inner = self.inner.lock();
        let Ok(spaces) = std::fs::read_dir(&self.dir) else { return Ok(()) };
        for ns_dir in spaces.flatten() {
            let name = ns_dir.file_name().to_string_lossy().to_string();
            if name == "wal" || !ns_dir.path().is_dir() {
                continue;
            }
            let Some(ns) = ns_from_path(&name) else { continue };
            for part in std::fs::read_dir(ns_dir.path()).map_err(io)?.flatten() {
                let Ok(start) = part.file_name().to_string_lossy().parse::<i64>() else { continue };
                let mut files: Vec<PathBuf> = std::fs::read_dir(part.path())
                    .map_err(io)?
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "seg"))
                    .collect();
                files.sort();
                for f in files {
                    match Segment::open(&f) {
                        Ok(seg) => {
                            let max = seg.index.values().flatten().map(|r| r.seq).max().unwrap_or(0);
                            inner.seq = inner.seq.max(max + 1);
                            inner
                                .spaces
                                .entry(ns.clone())
                                .or_default()
                                .segments
                                .entry(start)
                                .or_default()
                                .push(Arc::new(seg));
                        }
                        Err(why) => {
                            self.counters.corrupt_segments.fetch_add(1, Relaxed);
                            tracing::error!(segment = %f.display(), "history segment skipped: {why}; its partition's other segments and the WAL are still served");
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn wal_files(&self) -> Vec<(u64, PathBuf)> {
        let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(self.dir.join("wal"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        let n = e.file_name().to_string_lossy().strip_suffix(".wal")?.parse().ok()?;
                        Some((n, e.path()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Replays every WAL file into the heads; returns the open WAL to append to.
    fn replay_wal(&self) -> Result<Wal, SeriesError> {
        let files = self.wal_files();
        let mut last_gen = 0;
        for (gen_no, path) in &files {
            last_gen = *gen_no;
            let data = std::fs::read(path).map_err(io)?;
            let tombstones = self.inner.lock().tombstones.clone();
            let mut pos = WAL_MAGIC.len();
            if data.len() < pos || &data[..pos] != WAL_MAGIC {
                tracing::error!(wal = %path.display(), "not a WAL file; skipped");
                continue;
            }
            loop {
                let mut c = Cursor(&data[pos..]);
                let (Some(len), Some(crc)) = (c.u32(), c.u32()) else { break };
                let Some(body) = c.take(len as usize) else { break };
                if crc32fast::hash(body) != crc {
                    break;
                }
                let at = (*gen_no, pos as u64);
                // All or nothing: a record that does not decode is where the WAL ends.
                let Some(series) = body.get(4..).filter(|b| each_series(b, |_, _, _| {})) else { break };
                self.apply(series, |ns, key| !tombstones.iter().any(|t| at < t.wal && t.covers(ns, key)));
                self.counters.wal_records_replayed.fetch_add(1, Relaxed);
                pos += 8 + len as usize;
            }
            if pos < data.len() {
                tracing::warn!(wal = %path.display(), bytes = data.len() - pos, "the WAL ends in a torn or unreadable record (a crash mid-write); it is cut off, nothing acknowledged is in it");
                let f = OpenOptions::new().write(true).open(path).map_err(io)?;
                f.set_len(pos as u64).map_err(io)?;
                f.sync_all().map_err(io)?;
            }
        }
        // Appends go to a fresh file; the replayed ones stay until the next checkpoint.
        Wal::create(&self.dir.join("wal"), last_gen + 1)
    }

    /// Queues points for the WAL; the ticket resolves once they are on disk. Blocks while
    /// the writer's queue is full (back-pressure).
    pub fn submit(&self, batch: Vec<SeriesPoints>) -> SeriesTicket {
        match SeriesBatch::try_from(batch) {
            Ok(b) => self.submit_batch(b),
            Err(e) => {
                let (done, rx) = oneshot::channel();
                let _ = done.send(Err(e));
                SeriesTicket(rx)
            }
        }
    }

    /// An empty batch with room for `bytes`, in the buffer of a batch already written
    /// where one is spare. A producer that drains many twins at once (the gateways'
    /// ingest) builds a batch of megabytes many times a second; made afresh each time
    /// and freed on the writer's thread, its memory went back to the allocator's arena
    /// and was faulted in again (zeroed, as huge pages) for the next one.
    pub fn batch(&self, bytes: usize) -> SeriesBatch {
        let mut buf = self.spare.lock().pop().unwrap_or_default();
        buf.reserve(bytes);
        SeriesBatch { bytes: buf, series: 0, points: 0 }
    }

    /// Keeps a written batch's buffer for [`SeriesStore::batch`]: a few, of a useful
    /// size (small ones are cheap to make, huge ones not worth holding on to).
    fn recycle(&self, mut buf: Vec<u8>) {
        if (64 << 10..=64 << 20).contains(&buf.capacity()) {
            let mut spare = self.spare.lock();
            if spare.len() < 8 {
                buf.clear();
                spare.push(buf);
            }
        }
    }

    /// [`SeriesStore::submit`] for points already encoded (the names were checked as
    /// they were added).
    pub fn submit_batch(&self, batch: SeriesBatch) -> SeriesTicket {
        let (done, rx) = oneshot::channel();
        match &*self.tx.read() {
            Some(tx) => {
                if let Err(e) = tx.send(Pending::Write { batch, done })
                    && let Pending::Write { done, .. } = e.0
                {
                    let _ = done.send(Err(SeriesError::Closed));
                }
            }
            None => {
                let _ = done.send(Err(SeriesError::Closed));
            }
        }
        SeriesTicket(rx)
    }

    fn writer_loop(self: Arc<Self>, rx: Receiver<Pending>, mut wal: Wal) {
        let mut next = None;
        let mut record: Vec<u8> = Vec::new();
        let mut background: Option<std::thread::JoinHandle<()>> = None;
        let join = |b: &mut Option<std::thread::JoinHandle<()>>| {
            if let Some(h) = b.take() {
                let _ = h.join();
            }
        };
        loop {
            let first = match next.take() {
                Some(p) => p,
                None => match rx.recv() {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let mut group = match first {
                Pending::Checkpoint { done } => {
                    join(&mut background);
                    let _ = done.send(self.checkpoint_with(&mut wal));
                    continue;
                }
                Pending::Delete { namespace, prefix, done } => {
                    join(&mut background);
                    let _ = done.send(self.delete_with(&wal, namespace, prefix));
                    continue;
                }
                Pending::Write { batch, done } => vec![(batch, done)],
            };
            let mut points: usize = group[0].0.points;
            while points < 1_000_000 {
                match rx.try_recv() {
                    Ok(Pending::Write { batch, done }) => {
                        points += batch.points;
                        group.push((batch, done));
                    }
                    Ok(other) => {
                        next = Some(other);
                        break;
                    }
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            // The record: length, CRC, the count of series, the producers' bytes as they
            // are. One buffer, kept from one group to the next (not faulted in afresh
            // for every commit).
            record.clear();
            record.extend_from_slice(&[0u8; 12]);
            let mut series = 0u32;
            for (batch, _) in &group {
                record.extend_from_slice(&batch.bytes);
                series += batch.series;
            }
            record[8..12].copy_from_slice(&series.to_le_bytes());
            let body_len = (record.len() - 8) as u32;
            let crc = crc32fast::hash(&record[8..]);
            record[..4].copy_from_slice(&body_len.to_le_bytes());
            record[4..8].copy_from_slice(&crc.to_le_bytes());
            let result = wal.append(&record);
            match &result {
                Ok(()) => {
                    *self.durable.lock() = tail::WalPosition { generation: wal.gen_no, offset: wal.bytes };
                    self.counters.groups.fetch_add(1, Relaxed);
                    self.counters.wal_bytes.fetch_add(record.len() as u64, Relaxed);
                    self.apply(&record[12..], |_, _| true);
                }
                Err(e) => {
                    tracing::error!(error = %e, "history WAL append failed; {} submissions get the error", group.len())
                }
            }
            // A burst's buffer is not kept for good.
            if record.capacity() > 64 << 20 {
                record = Vec::new();
            }
            for (batch, done) in group {
                self.recycle(batch.bytes);
                let _ = done.send(result.clone());
            }
            if wal.bytes >= self.opts.checkpoint_wal_bytes {
                // One checkpoint at a time; the segments are written beside the appends.
                join(&mut background);
                match self.begin_checkpoint(&mut wal) {
                    Ok(job) => {
                        let me = self.clone();
                        let spawned = std::thread::Builder::new().name("tf-series-seal".into()).spawn(move || {
                            if let Err(e) = me.finish_checkpoint(job) {
                                tracing::error!(error = %e, "history checkpoint failed; the WAL keeps every point and it is retried");
                            }
                        });
                        match spawned {
                            Ok(h) => background = Some(h),
                            Err(e) => tracing::error!(error = %e, "cannot start the checkpoint thread"),
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "history checkpoint failed; the WAL keeps every point and it is retried")
                    }
                }
            }
        }
        join(&mut background);
        if let Err(e) = self.checkpoint_with(&mut wal) {
            tracing::error!(error = %e, "history checkpoint at shutdown failed; the WAL replays at the next start");
        }
    }

    fn partition_of(&self, t: i64) -> i64 {
        t.div_euclid(self.opts.partition_ms).saturating_mul(self.opts.partition_ms)
    }

    /// Adds durable points to the heads, by the order and duplicate policy: the series
    /// encoded in `body` (a WAL record's, after the count) that `keep` keeps. False where
    /// `body` is malformed (what came before the fault is applied).
    fn apply(&self, body: &[u8], keep: impl Fn(&str, &str) -> bool) -> bool {
        let mut inner = self.inner.lock();
        let Inner { spaces, seq, .. } = &mut *inner;
        let (mut added, mut dups, mut late, mut expired) = (0u64, 0u64, 0u64, 0u64);
        let whole = each_series(body, |namespace, key, points| {
            if !keep(namespace, key) {
                return;
            }
            // Lookups without allocating for the namespaces and series that exist.
            if !spaces.contains_key(namespace) {
                spaces.insert(namespace.to_string(), Namespace::default());
            }
            let ns = spaces.get_mut(namespace).expect("inserted above");
            let dropped_before = ns.dropped_before;
            let Namespace { heads: all_heads, sealed: all_sealed, .. } = ns;
            let heads = match all_heads.get_mut(key) {
                Some(h) => h,
                None => all_heads.entry(key.to_string()).or_default(),
            };
            for (t, v) in pairs(points) {
                if t < dropped_before {
                    expired += 1;
                    continue;
                }
                let p = self.partition_of(t);
                let newest = heads.main.as_ref().map(|h| (h.enc.last_at(), h.enc.last_value()));
                let slot = match newest {
                    Some((last, value)) if t == last && value.to_bits() == v.to_bits() => {
                        dups += 1;
                        continue;
                    }
                    // (A new value at the newest timestamp is appended: within a chunk
                    // the later of equal timestamps wins, see `Merge`.)
                    Some((last, _)) if t < last => {
                        late += 1;
                        &mut heads.late
                    }
                    _ => &mut heads.main,
                };
                added += 1;
                match slot {
                    Some(h) if h.partition == p && t >= h.enc.last_at() && h.enc.count() < self.opts.head_points => {
                        h.enc.push(t, v)
                    }
                    _ => {
                        if let Some(old) = slot.take() {
                            let sealed = seal(key, old);
                            all_sealed.entry(sealed.0).or_default().push(Arc::new(sealed.1));
                        }
                        *slot = Some(Head { enc: ChunkEncoder::new(t, v), partition: p, seq: *seq });
                        *seq += 1;
                    }
                }
            }
        });
        let c = &self.counters;
        c.points.fetch_add(added, Relaxed);
        c.duplicates.fetch_add(dups, Relaxed);
        c.late.fetch_add(late, Relaxed);
        c.expired.fetch_add(expired, Relaxed);
        whole
    }

    /// Seals every head and writes everything sealed as segments, then starts a new WAL
    /// (asks the writer thread, which owns the WAL, and waits for it).
    pub fn checkpoint(&self) -> Result<(), SeriesError> {
        let (done, rx) = oneshot::channel();
        let tx = self.tx.read().clone().ok_or(SeriesError::Closed)?;
        tx.send(Pending::Checkpoint { done }).map_err(|_| SeriesError::Closed)?;
        rx.blocking_recv().unwrap_or(Err(SeriesError::Closed))
    }

    fn checkpoint_with(&self, wal: &mut Wal) -> Result<(), SeriesError> {
        let job = self.begin_checkpoint(wal)?;
        self.finish_checkpoint(job)
    }

    /// The writer's part of a checkpoint, quick: every head is sealed and a new WAL
    /// generation starts, so appends go on at once. What the sealed chunks hold stays
    /// in the old generations until [`Self::finish_checkpoint`] has them in segments.
    fn begin_checkpoint(&self, wal: &mut Wal) -> Result<CheckpointJob, SeriesError> {
        let next = Wal::create(&self.dir.join("wal"), wal.gen_no + 1)?;
        let (work, last, seq) = {
            let mut inner = self.inner.lock();
            let seq = inner.seq;
            let Inner { spaces, unsunk, .. } = &mut *inner;
            let mut work = Vec::new();
            let mut last: Vec<LastPoint> = std::mem::take(unsunk)
                .into_iter()
                .map(|((namespace, key), (at, value))| LastPoint { namespace, key, at, value })
                .collect();
            for (name, ns) in spaces.iter_mut() {
                for (key, heads) in ns.heads.iter() {
                    if let Some((at, value)) = heads.newest() {
                        last.push(LastPoint { namespace: name.clone(), key: key.clone(), at, value });
                    }
                }
                for (key, heads) in ns.heads.iter_mut() {
                    for h in [heads.main.take(), heads.late.take()].into_iter().flatten() {
                        let (p, s) = seal(key, h);
                        ns.sealed.entry(p).or_default().push(Arc::new(s));
                    }
                }
                ns.heads.clear();
                for (p, chunks) in &ns.sealed {
                    work.push((name.clone(), *p, chunks.clone()));
                }
            }
            (work, last, seq)
        };
        let old = std::mem::replace(wal, next);
        *self.durable.lock() = tail::WalPosition { generation: wal.gen_no, offset: wal.bytes };
        Ok(CheckpointJob { work, old_gen: old.gen_no, last, seq })
    }

    /// Writes a checkpoint's sealed chunks as segment files (off the writer thread when
    /// it was started by the WAL's size), makes them the chunks' home, and removes the
    /// WAL generations they came from.
    fn finish_checkpoint(&self, job: CheckpointJob) -> Result<(), SeriesError> {
        // The newest points go to their sink first: the WAL that holds them is retired
        // below. If it fails they wait for the next checkpoint (and the WAL is kept).
        if !job.last.is_empty()
            && let Some(sink) = &*self.last_sink.read()
            && let Err(e) = sink(&job.last)
        {
            let mut inner = self.inner.lock();
            let Inner { unsunk, tombstones, .. } = &mut *inner;
            for p in job.last {
                // (A series deleted meanwhile stays deleted.)
                if !tombstones.iter().any(|t| t.seq >= job.seq && t.covers(&p.namespace, &p.key)) {
                    unsunk.insert((p.namespace, p.key), (p.at, p.value));
                }
            }
            return Err(SeriesError::Io(format!("the newest points' sink failed: {e}")));
        }
        let mut written = Vec::new();
        for (ns, p, chunks) in job.work {
            let dir = self.dir.join(path_name(&ns)).join(p.to_string());
            mkdir(&dir).map_err(io)?;
            let first_seq = chunks.iter().map(|c| c.seq).min().unwrap_or(0);
            let path = dir.join(format!("{first_seq:020}.seg"));
            segment::write(&path, &chunks).map_err(io)?;
            self.counters.segment_bytes.fetch_add(std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0), Relaxed);
            let seg = Segment::open(&path).map_err(SeriesError::Io)?;
            written.push((ns, p, chunks, Arc::new(seg)));
        }
        {
            let mut inner = self.inner.lock();
            for (ns, p, chunks, seg) in written {
                let space = inner.spaces.entry(ns).or_default();
                if let Some(s) = space.sealed.get_mut(&p) {
                    // Exactly the chunks written (others may have been sealed meanwhile).
                    let done: std::collections::HashSet<*const Sealed> = chunks.iter().map(Arc::as_ptr).collect();
                    s.retain(|c| !done.contains(&Arc::as_ptr(c)));
                    if s.is_empty() {
                        space.sealed.remove(&p);
                    }
                }
                if p + self.opts.partition_ms > space.dropped_before {
                    space.segments.entry(p).or_default().push(seg);
                }
            }
        }
        // Everything those WAL generations held is now in segments (they are kept
        // only for the readers that still need them).
        self.retire_wal(job.old_gen);
        self.counters.checkpoints.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Where checkpoints hand the newest point of each series written since the one
    /// before (see the module documentation).
    pub fn set_last_sink(&self, sink: LastSink) {
        *self.last_sink.write() = Some(sink);
    }

    /// The newest point of a series written since the last checkpoint (that the sink
    /// has not taken), if any.
    pub fn last_point(&self, namespace: &str, key: &str) -> Option<(i64, f64)> {
        let inner = self.inner.lock();
        let head = inner.spaces.get(namespace).and_then(|ns| ns.heads.get(key)).and_then(Heads::newest);
        let unsunk = if inner.unsunk.is_empty() {
            None
        } else {
            inner.unsunk.get(&(namespace.to_string(), key.to_string())).copied()
        };
        match (head, unsunk) {
            (Some(h), Some(u)) => Some(if u.0 > h.0 { u } else { h }),
            (h, u) => h.or(u),
        }
    }

    /// [`SeriesStore::last_point`] of every series that has one (after a restart: what
    /// the WAL replayed), for a reader that merges them with what the sink wrote.
    pub fn last_points(&self) -> Vec<LastPoint> {
        let inner = self.inner.lock();
        let mut out: Vec<LastPoint> = Vec::new();
        for (name, ns) in &inner.spaces {
            for (key, heads) in &ns.heads {
                if let Some((at, value)) = heads.newest() {
                    out.push(LastPoint { namespace: name.clone(), key: key.clone(), at, value });
                }
            }
        }
        // Older sink failures: where the series has a newer head, both are listed and
        // the reader keeps the newer.
        for ((namespace, key), (at, value)) in &inner.unsunk {
            out.push(LastPoint { namespace: namespace.clone(), key: key.clone(), at: *at, value: *value });
        }
        out
    }

    /// Deletes every series of `namespace` whose key starts with `prefix` (a twin's
    /// series: `"<twin id> "`), and their newest points, durably: what was stored before
    /// is never read again, also not from the WAL after a crash; points submitted
    /// afterwards start new series.
    pub fn delete_series(&self, namespace: &str, prefix: &str) -> SeriesTicket {
        let (done, rx) = oneshot::channel();
        match &*self.tx.read() {
            Some(tx) => {
                let _ = tx.send(Pending::Delete { namespace: namespace.into(), prefix: prefix.into(), done });
            }
            None => {
                let _ = done.send(Err(SeriesError::Closed));
            }
        }
        SeriesTicket(rx)
    }

    fn delete_with(&self, wal: &Wal, namespace: String, prefix: String) -> Result<(), SeriesError> {
        let mut inner = self.inner.lock();
        let t = Tombstone { namespace, prefix, seq: inner.seq, wal: (wal.gen_no, wal.bytes) };
        let mut f =
            OpenOptions::new().create(true).append(true).mode(0o600).open(self.dir.join("tombstones")).map_err(io)?;
        f.write_all(&t.encode()).and_then(|_| f.sync_data()).map_err(io)?;
        inner.seq += 1;
        inner.unsunk.retain(|(ns, k), _| !t.covers(ns, k));
        if let Some(ns) = inner.spaces.get_mut(&t.namespace) {
            ns.heads.retain(|k, _| !k.starts_with(&t.prefix));
            for chunks in ns.sealed.values_mut() {
                chunks.retain(|c| !c.key.starts_with(&t.prefix));
            }
        }
        inner.tombstones.push(t);
        Ok(())
    }

    /// Drops the partitions of `namespace` that end at or before `cutoff` (ms), with their
    /// files; later points older than `cutoff` are refused as expired. Returns the number
    /// of partitions dropped.
    pub fn drop_before(&self, namespace: &str, cutoff: i64) -> usize {
        let width = self.opts.partition_ms;
        // Whole partitions only: the one holding `cutoff` stays.
        let cutoff = self.partition_of(cutoff);
        let mut inner = self.inner.lock();
        let ns = inner.spaces.entry(namespace.to_string()).or_default();
        ns.dropped_before = ns.dropped_before.max(cutoff);
        let gone: Vec<i64> =
            ns.segments.keys().chain(ns.sealed.keys()).copied().filter(|p| p + width <= cutoff).collect();
        ns.segments.retain(|p, _| p + width > cutoff);
        ns.sealed.retain(|p, _| p + width > cutoff);
        for heads in ns.heads.values_mut() {
            for h in [&mut heads.main, &mut heads.late] {
                if h.as_ref().is_some_and(|h| h.partition + width <= cutoff) {
                    *h = None;
                }
            }
        }
        drop(inner);
        let mut parts: Vec<i64> = gone;
        parts.sort();
        parts.dedup();
        // On disk too (a partition may only exist there if it was written before this run).
        let dir = self.dir.join(path_name(namespace));
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if let Ok(p) = e.file_name().to_string_lossy().parse::<i64>()
                    && p + width <= cutoff
                {
                    if let Err(err) = std::fs::remove_dir_all(e.path()) {
                        tracing::error!(partition = %e.path().display(), error = %err, "a dropped history partition could not be removed");
                    }
                    if !parts.contains(&p) {
                        parts.push(p);
                    }
                }
            }
        }
        self.counters.partitions_dropped.fetch_add(parts.len() as u64, Relaxed);
        parts.len()
    }

    /// The bytes of each of `namespace`'s partitions on disk (its sealed segment files),
    /// as `(partition start, bytes)`. Heads in memory and the WAL are not counted.
    pub fn partition_bytes(&self, namespace: &str) -> Vec<(i64, u64)> {
        let dir = self.dir.join(path_name(namespace));
        let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<i64>() else { continue };
            let bytes = std::fs::read_dir(e.path())
                .map(|files| files.flatten().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum())
                .unwrap_or(0);
            out.push((p, bytes));
        }
        out.sort();
        out
    }

    /// The points of one series with `from <= t <= to`, in time order (last write wins on
    /// equal timestamps), streamed one partition and one cluster of overlapping chunks at
    /// a time. A chunk that does not check is counted, reported and skipped.
    pub fn points(self: &Arc<Self>, namespace: &str, key: &str, from: i64, to: i64) -> Points {
        self.query(namespace, key, from, to, false)
    }

    /// As [`SeriesStore::points`], newest first.
    pub fn points_rev(self: &Arc<Self>, namespace: &str, key: &str, from: i64, to: i64) -> Points {
        self.query(namespace, key, from, to, true)
    }

    fn query(self: &Arc<Self>, namespace: &str, key: &str, from: i64, to: i64, descending: bool) -> Points {
        let partitions: Vec<i64> = {
            let inner = self.inner.lock();
            match inner.spaces.get(namespace) {
                None => Vec::new(),
                Some(ns) => {
                    let lo = self.partition_of(from);
                    let mut ps: Vec<i64> = ns
                        .segments
                        .range(lo..=to)
                        .map(|(p, _)| *p)
                        .chain(ns.sealed.range(lo..=to).map(|(p, _)| *p))
                        .collect();
                    if let Some(h) = ns.heads.get(key) {
                        ps.extend([&h.main, &h.late].into_iter().flatten().map(|h| h.partition));
                    }
                    ps.retain(|p| *p >= lo && *p <= to);
                    ps.sort();
                    ps.dedup();
                    ps
                }
            }
        };
        Points {
            store: self.clone(),
            namespace: namespace.to_string(),
            key: key.to_string(),
            from,
            to,
            partitions: if descending { partitions } else { partitions.into_iter().rev().collect() },
            descending,
            chunks: Vec::new(),
            current: Vec::new().into_iter(),
        }
    }

    /// The chunks of one series in one partition, as sources to read, by first timestamp.
    fn chunks_of(&self, namespace: &str, key: &str, p: i64) -> Vec<Source> {
        let inner = self.inner.lock();
        let Some(ns) = inner.spaces.get(namespace) else { return Vec::new() };
        let deleted_before =
            inner.tombstones.iter().filter(|t| t.covers(namespace, key)).map(|t| t.seq).max().unwrap_or(0);
        let mut out = Vec::new();
        for seg in ns.segments.get(&p).into_iter().flatten() {
            for r in seg.index.get(key).into_iter().flatten().filter(|r| r.seq >= deleted_before) {
                out.push(Source::Segment(seg.clone(), *r));
            }
        }
        for s in ns.sealed.get(&p).into_iter().flatten() {
            if s.key == key {
                out.push(Source::Memory(s.clone()));
            }
        }
        if let Some(h) = ns.heads.get(key) {
            for h in [&h.main, &h.late].into_iter().flatten() {
                if h.partition == p {
                    out.push(Source::Memory(Arc::new(h.sealed(key))));
                }
            }
        }
        out.sort_by_key(|s| std::cmp::Reverse((s.first(), s.seq())));
        out
    }

    /// Stops the writer after what is queued, with a last checkpoint.
    pub fn shutdown(&self) {
        self.tx.write().take();
        if let Some(h) = self.writer.lock().take() {
            let _ = h.join();
        }
    }

    /// Heads and sealed chunks not yet in segments, in bytes (memory of the store).
    pub fn memory_bytes(&self) -> usize {
        let inner = self.inner.lock();
        inner
            .spaces
            .values()
            .map(|ns| {
                ns.heads
                    .values()
                    .map(|h| {
                        [&h.main, &h.late].into_iter().flatten().map(|h| h.enc.byte_len() + 96).sum::<usize>() + 64
                    })
                    .sum::<usize>()
                    + ns.sealed.values().flatten().map(|s| s.bytes.len() + 64).sum::<usize>()
            })
            .sum()
    }
}

impl std::fmt::Debug for SeriesStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeriesStore").field("dir", &self.dir).field("opts", &self.opts).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Points {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Points")
            .field("key", &self.key)
            .field("from", &self.from)
            .field("to", &self.to)
            .finish_non_exhaustive()
    }
}

impl Drop for SeriesStore {
    fn drop(&mut self) {
        self.tx.write().take();
    }
}

fn seal(key: &str, h: Head) -> (i64, Sealed) {
    (h.partition, h.sealed(key))
}

impl Head {
    /// The head as a sealed chunk (a copy of its stream as it stands).
    fn sealed(&self, key: &str) -> Sealed {
        Sealed {
            key: key.to_string(),
            first: self.enc.first_at(),
            last: self.enc.last_at(),
            count: self.enc.count(),
            seq: self.seq,
            bytes: self.enc.bytes().to_vec(),
        }
    }
}

enum Source {
    Segment(Arc<Segment>, ChunkRef),
    Memory(Arc<Sealed>),
}

impl Source {
    fn first(&self) -> i64 {
        match self {
            Source::Segment(_, r) => r.first,
            Source::Memory(s) => s.first,
        }
    }
    fn last(&self) -> i64 {
        match self {
            Source::Segment(_, r) => r.last,
            Source::Memory(s) => s.last,
        }
    }
    fn seq(&self) -> u64 {
        match self {
            Source::Segment(_, r) => r.seq,
            Source::Memory(s) => s.seq,
        }
    }
    fn points(&self) -> Result<Vec<(i64, f64)>, String> {
        let (bytes, count) = match self {
            Source::Segment(seg, r) => (seg.read(r)?, r.count),
            Source::Memory(s) => (s.bytes.clone(), s.count),
        };
        decode(&bytes, count).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())
    }
}

/// A streaming query (see [`SeriesStore::points`]).
pub struct Points {
    store: Arc<SeriesStore>,
    namespace: String,
    key: String,
    from: i64,
    to: i64,
    /// Partitions still to read, the next one last.
    partitions: Vec<i64>,
    descending: bool,
    /// Chunks of the current partition still to read, the next one last.
    chunks: Vec<Source>,
    current: std::vec::IntoIter<(i64, f64)>,
}

impl Points {
    /// Decodes the next cluster of overlapping chunks, merged.
    fn next_cluster(&mut self) -> bool {
        loop {
            if self.chunks.is_empty() {
                let Some(p) = self.partitions.pop() else { return false };
                self.chunks = self.store.chunks_of(&self.namespace, &self.key, p);
                self.chunks.retain(|c| c.last() >= self.from && c.first() <= self.to);
                if self.descending {
                    // The chunk that ends last is read first.
                    self.chunks.sort_by_key(|c| (c.last(), c.seq()));
                }
                continue;
            }
            let mut cluster = vec![self.chunks.pop().expect("not empty")];
            if self.descending {
                let mut start = cluster[0].first();
                while self.chunks.last().is_some_and(|c| c.last() >= start) {
                    let c = self.chunks.pop().expect("checked");
                    start = start.min(c.first());
                    cluster.push(c);
                }
            } else {
                let mut end = cluster[0].last();
                while self.chunks.last().is_some_and(|c| c.first() <= end) {
                    let c = self.chunks.pop().expect("checked");
                    end = end.max(c.last());
                    cluster.push(c);
                }
            }
            cluster.sort_by_key(|c| c.seq());
            let mut streams = Vec::new();
            for c in &cluster {
                match c.points() {
                    Ok(p) => streams.push(p.into_iter()),
                    Err(why) => {
                        self.store.counters.corrupt_chunks.fetch_add(1, Relaxed);
                        tracing::error!(series = %self.key, "a history chunk is skipped: {why}");
                    }
                }
            }
            let (from, to) = (self.from, self.to);
            let mut merged: Vec<(i64, f64)> = Merge::new(streams).filter(|(t, _)| *t >= from && *t <= to).collect();
            if self.descending {
                merged.reverse();
            }
            if !merged.is_empty() {
                self.current = merged.into_iter();
                return true;
            }
        }
    }
}

impl Iterator for Points {
    type Item = (i64, f64);

    fn next(&mut self) -> Option<(i64, f64)> {
        loop {
            if let Some(p) = self.current.next() {
                return Some(p);
            }
            if !self.next_cluster() {
                return None;
            }
        }
    }
}

fn decode_wal_record(body: &[u8]) -> Option<Vec<SeriesPoints>> {
    let mut c = Cursor(body);
    let n = c.u32()?;
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let namespace = c.string()?;
        let key = c.string()?;
        let count = c.u32()? as usize;
        if c.0.len() < count * 16 {
            return None;
        }
        let points =
            (0..count).map(|_| Some((c.u64()? as i64, f64::from_bits(c.u64()?)))).collect::<Option<Vec<_>>>()?;
        out.push(SeriesPoints { namespace, key, points });
    }
    Some(out)
}

/// The WAL file being appended to.
struct Wal {
    file: File,
    gen_no: u64,
    bytes: u64,
}

impl Wal {
    fn create(dir: &Path, gen_no: u64) -> Result<Wal, SeriesError> {
        let path = dir.join(format!("{gen_no:020}.wal"));
        let mut file =
            OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&path).map_err(io)?;
        file.write_all(WAL_MAGIC).map_err(io)?;
        file.sync_all().map_err(io)?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(Wal { file, gen_no, bytes: WAL_MAGIC.len() as u64 })
    }

    /// Appends one record (length, CRC and body, as the writer made it) and syncs it. A
    /// failed append is cut off again, so the file never holds a half record before
    /// later ones.
    fn append(&mut self, rec: &[u8]) -> Result<(), SeriesError> {
        let r = self.file.write_all(rec).and_then(|_| self.file.sync_data());
        match r {
            Ok(()) => {
                self.bytes += rec.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(self.bytes);
                use std::io::Seek;
                let _ = self.file.seek(std::io::SeekFrom::Start(self.bytes));
                Err(io(e))
            }
        }
    }
}

#[cfg(test)]
mod tests;
