//! Persistence behind one trait, so the engine can change. The sled engine keeps every
//! space in one tree under a one-byte prefix, which makes a batch that touches a twin's
//! snapshot and its journal atomic.
//!
//! Writes go through one writer thread that groups whatever is queued into a single
//! `apply_batch` followed by one `flush` (group commit). A [`Ticket`] resolves only after
//! that flush, so anything acknowledged to a caller as stored survives a crash. The queue
//! is bounded: when storage falls behind, `submit` blocks the submitting thread, which is
//! the back-pressure that slows every producer down instead of growing memory.

use crate::metrics::{Histogram, HistogramView, SIZE_BOUNDS};
use parking_lot::RwLock;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, sync_channel};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// A keyspace: the one-byte prefix of every key written under it, so that a batch
/// touching several keyspaces is one atomic sled batch. The runtime knows no domain:
/// each layer declares the keyspaces it owns (the twins' are in `twinfleet_actors::spaces`);
/// the runtime declares only its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Space(pub u8);

impl Space {
    /// Alerts of the platform (`AlertSink`): key = millis BE, seq BE.
    pub const ALERT: Space = Space(6);
}

#[derive(Debug, Clone)]
enum Op {
    Put(Space, Vec<u8>, Vec<u8>),
    Delete(Space, Vec<u8>),
    /// One item of the commit's page in this space (`WriteBatch::pack`).
    Pack(Space, Vec<u8>),
    /// A put whose value is the id of the commit's page in the second space.
    PutPageId(Space, Vec<u8>, Space),
}

/// The items of one page (`WriteBatch::pack`), in the order they were packed. A page
/// that does not parse yields one error and stops.
pub fn page_items(page: &[u8]) -> impl Iterator<Item = Result<&[u8], StorageError>> {
    let mut rest = page;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let item = rest.get(..4).and_then(|len| {
            let n = u32::from_le_bytes(len.try_into().ok()?) as usize;
            rest.get(4..4 + n).map(|item| (item, 4 + n))
        });
        match item {
            Some((item, used)) => {
                rest = &rest[used..];
                Some(Ok(item))
            }
            None => {
                rest = &[];
                Some(Err(StorageError::Engine("a page is cut short".into())))
            }
        }
    })
}

/// The start of a page's keys: its id, big-endian (pages sort in commit order). A
/// page is stored in parts of at most [`PAGE_PART_BYTES`] (key: id, then the part's
/// number as u16 BE): sled keeps values inline in leaves of up to 16 entries and writes
/// a leaf whose serialized size passes 128 KiB as a blob file of its own, so large
/// values in one leaf multiply what reaches the disk.
pub fn page_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

/// The id of the page a stored key belongs to.
pub fn page_id(key: &[u8]) -> Option<u64> {
    key.get(..8)?.try_into().ok().map(u64::from_be_bytes)
}

/// The most bytes of items one stored part of a page holds (an item larger than this
/// gets a part of its own).
pub const PAGE_PART_BYTES: usize = 2048;

/// Writes that become durable together.
#[derive(Debug, Clone, Default)]
pub struct WriteBatch {
    ops: Vec<Op>,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn put(&mut self, space: Space, key: impl Into<Vec<u8>>, value: Vec<u8>) -> &mut Self {
        self.ops.push(Op::Put(space, key.into(), value));
        self
    }

    pub fn delete(&mut self, space: Space, key: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::Delete(space, key.into()));
        self
    }

    /// Appends `item` to the page of the group commit this batch lands in: one record
    /// in `space` (key: a fresh increasing page id, [`page_key`]) holds the items of
    /// every batch of that commit, so many small appends of many writers cost one
    /// record. Read them back with [`page_items`]; the page id is what
    /// [`WriteBatch::put_page_id`] stores.
    pub fn pack(&mut self, space: Space, item: Vec<u8>) -> &mut Self {
        self.ops.push(Op::Pack(space, item));
        self
    }

    /// Puts `key` in `space` with the id of this commit's page in `page_space` as its
    /// value (8 bytes, big-endian), atomically with that page.
    pub fn put_page_id(&mut self, space: Space, key: impl Into<Vec<u8>>, page_space: Space) -> &mut Self {
        self.ops.push(Op::PutPageId(space, key.into(), page_space));
        self
    }

    /// Adds every operation of `other` after this batch's own.
    pub fn append(&mut self, mut other: WriteBatch) -> &mut Self {
        self.ops.append(&mut other.ops);
        self
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The bytes of keys and values it writes.
    pub fn bytes(&self) -> u64 {
        self.ops
            .iter()
            .map(|op| match op {
                Op::Put(_, k, v) => (k.len() + v.len() + 1) as u64,
                Op::Delete(_, k) => (k.len() + 1) as u64,
                Op::Pack(_, item) => (item.len() + 4) as u64,
                Op::PutPageId(_, k, _) => (k.len() + 9) as u64,
            })
            .sum()
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    #[error("storage engine error: {0}")]
    Engine(String),
    /// The disk is full: nothing was written. Reads keep working, and writes resume by
    /// themselves once space is freed.
    #[error(
        "storage is full, nothing was written ({0}); free space on the data directory's disk: writes resume by themselves"
    )]
    Full(String),
    #[error("storage is shut down; the write was not applied")]
    Closed,
}

/// Resolves when the batch it was issued for is flushed to disk (or failed).
#[derive(Debug)]
pub struct Ticket(TicketInner);

#[derive(Debug)]
enum TicketInner {
    Waiting(oneshot::Receiver<Result<(), StorageError>>),
    Done(Option<Result<(), StorageError>>),
    /// Both a storage write and a history write (see [`Ticket::and_series`]).
    Joined(Box<Ticket>, Option<crate::series::SeriesTicket>),
}

impl Ticket {
    pub fn ready(r: Result<(), StorageError>) -> Ticket {
        Ticket(TicketInner::Done(Some(r)))
    }

    /// A ticket that resolves once this write and the history write `series` are both
    /// durable; the first error wins.
    pub fn and_series(self, series: crate::series::SeriesTicket) -> Ticket {
        Ticket(TicketInner::Joined(Box::new(self), Some(series)))
    }
}

impl From<crate::series::SeriesError> for StorageError {
    fn from(e: crate::series::SeriesError) -> Self {
        use crate::series::SeriesError as S;
        match e {
            S::Full(why) => StorageError::Full(why),
            S::Closed => StorageError::Closed,
            other => StorageError::Engine(other.to_string()),
        }
    }
}

impl Future for Ticket {
    type Output = Result<(), StorageError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            TicketInner::Waiting(rx) => Pin::new(rx).poll(cx).map(|r| r.unwrap_or(Err(StorageError::Closed))),
            TicketInner::Done(r) => Poll::Ready(r.take().unwrap_or(Err(StorageError::Closed))),
            TicketInner::Joined(first, series) => {
                if let Some(s) = series {
                    match Pin::new(s).poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(e)) => {
                            *series = None;
                            return Poll::Ready(Err(e.into()));
                        }
                        Poll::Ready(Ok(())) => *series = None,
                    }
                }
                Pin::new(&mut **first).poll(cx)
            }
        }
    }
}

/// Counters of the writer, for benchmarks and /metrics.
#[derive(Debug, Clone)]
pub struct StorageStats {
    pub batches_submitted: u64,
    pub groups_committed: u64,
    pub ops_committed: u64,
    /// Bytes of keys and values committed (the logical size; sled's log adds its own).
    pub bytes_committed: u64,
    pub flush_micros_total: u64,
    pub flush_micros_max: u64,
    /// Records per group commit.
    pub group_ops: HistogramView,
    /// Time to apply and flush one group commit, in microseconds.
    pub flush_micros: HistogramView,
}

/// A stored record: key (without the space prefix) and value.
pub type Record = (Vec<u8>, Vec<u8>);
/// Records in key order, as a scan yields them.
pub type Records<'a> = Box<dyn Iterator<Item = Result<Record, StorageError>> + 'a>;

/// A key-value store with durable batched writes.
pub trait Storage: Send + Sync + fmt::Debug + 'static {
    /// Queues `batch`; the ticket resolves after it is flushed. Blocks while the write
    /// queue is full.
    fn submit(&self, batch: WriteBatch) -> Ticket;
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;
    /// Every record of `space` whose key starts with `prefix`, in key order.
    fn scan(&self, space: Space, prefix: &[u8]) -> Records<'_>;
    /// Up to `limit` records of `space` with `prefix`, newest key first.
    fn scan_rev(&self, space: Space, prefix: &[u8], limit: usize) -> Result<Vec<Record>, StorageError>;
    /// Records of `space` with `start <= key <= end`, in key order.
    fn scan_range(&self, space: Space, start: &[u8], end: &[u8]) -> Result<Vec<Record>, StorageError>;
    /// Records of `space` with `start <= key <= end`, newest key first, lazily.
    fn scan_range_rev(&self, space: Space, start: &[u8], end: &[u8]) -> Records<'_>;
    /// A unique, increasing id (survives restarts).
    fn generate_id(&self) -> Result<u64, StorageError>;
    fn stats(&self) -> StorageStats;
    /// Waits until everything submitted before has been flushed.
    fn barrier(&self) -> Ticket {
        self.submit(WriteBatch::new())
    }
    /// Flushes, stops the writer and refuses further writes.
    fn shutdown(&self);
    /// Whether writes are accepted now: `Err(Full)` while the disk is full.
    fn writable(&self) -> Result<(), StorageError> {
        Ok(())
    }
}

/// Tuning of the sled engine.
#[derive(Debug, Clone)]
pub struct SledOptions {
    /// sled's page cache in bytes (sled's own default is 1 GiB, too much next to a
    /// million twins in memory).
    pub cache_bytes: u64,
    /// Batches queued for the writer before `submit` blocks.
    pub queue_capacity: usize,
    /// Most operations one group commit takes.
    pub max_group_ops: usize,
    /// Free space the disk must keep: below it, writes are refused (`Full`) before sled
    /// is touched. sled cannot take back a batch it applied but could not flush, so the
    /// check must come first; the reserve leaves room for sled's own log and snapshots.
    pub min_free_bytes: u64,
}

impl Default for SledOptions {
    fn default() -> Self {
        SledOptions { cache_bytes: 64 << 20, queue_capacity: 4096, max_group_ops: 50_000, min_free_bytes: 16 << 20 }
    }
}

struct Pending {
    batch: WriteBatch,
    done: oneshot::Sender<Result<(), StorageError>>,
}

struct Counters {
    submitted: AtomicU64,
    groups: AtomicU64,
    ops: AtomicU64,
    bytes: AtomicU64,
    flush_total: AtomicU64,
    flush_max: AtomicU64,
    group_ops: Histogram,
    flush: Histogram,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            submitted: AtomicU64::new(0),
            groups: AtomicU64::new(0),
            ops: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            flush_total: AtomicU64::new(0),
            flush_max: AtomicU64::new(0),
            group_ops: Histogram::new(SIZE_BOUNDS),
            flush: Histogram::latency(),
        }
    }
}

/// The engine and whether it takes writes, shared by the storage and its writer.
struct Engine {
    /// `None` after shutdown: sled keeps its file lock while any handle lives, so the
    /// engine is dropped here even if other parts still hold the `SledStorage`.
    db: RwLock<Option<(sled::Db, sled::Tree)>>,
    /// `Some(why)` while the disk is full; `is_full` mirrors it so that the check every
    /// write makes is one atomic load, not a lock.
    full: RwLock<Option<String>>,
    is_full: std::sync::atomic::AtomicBool,
    /// sled itself failed a write for lack of space: it refuses every write until it is
    /// reopened (the reserve check usually refuses first, and sled is left untouched).
    poisoned: std::sync::atomic::AtomicBool,
    path: PathBuf,
    cache_bytes: u64,
    min_free_bytes: u64,
}

impl Engine {
    fn set_full(&self, why: Option<String>) {
        self.is_full.store(why.is_some(), Relaxed);
        *self.full.write() = why;
    }

    /// Why the disk cannot take `bytes` more now, if it cannot.
    fn short_of_space(&self, bytes: u64) -> Option<String> {
        let free = free_bytes(&self.path)?;
        (free < self.min_free_bytes.saturating_add(bytes)).then(|| {
            format!("{} has {free} bytes free, below the reserve of {} bytes", self.path.display(), self.min_free_bytes)
        })
    }
}

/// Free bytes for unprivileged writers on the file system of `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    #[allow(unsafe_code)]
    // Safety: statvfs(3) writes one plain struct that we own; `c` is a valid C string
    // that outlives the call; the struct is only read when the call succeeded.
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c.as_ptr(), &mut st) == 0).then_some(st)
    }?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// How often a writer whose disk is full checks for free space again.
const FULL_PROBE_EVERY: Duration = Duration::from_secs(1);
/// The free space a probe must find before the engine is reopened.
const FULL_PROBE_BYTES: usize = 1 << 20;

/// sled with a group-commit writer thread.
pub struct SledStorage {
    engine: Arc<Engine>,
    path: PathBuf,
    tx: RwLock<Option<SyncSender<Pending>>>,
    writer: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
    counters: Arc<Counters>,
}

impl fmt::Debug for SledStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledStorage").field("path", &self.path).finish()
    }
}

fn engine(e: sled::Error) -> StorageError {
    match &e {
        sled::Error::Io(io) if is_full(io) => StorageError::Full(io.to_string()),
        _ => StorageError::Engine(e.to_string()),
    }
}

fn is_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
        || e.raw_os_error() == Some(28)
        || e.get_ref().is_some_and(|inner| inner.to_string().contains("No space left on device"))
}

/// Opens sled. Its own file lock may still be held for a moment by a platform of this
/// process that has just stopped (sled's I/O threads let go of the file after the
/// database is dropped) or by a child being spawned (which shares every open file until
/// its exec): the data directory's lock (`DataDirLock`) already keeps other processes
/// out, so a held sled lock is waited for, up to 2 s, before it is an error.
fn open_engine(path: &Path, cache_bytes: u64) -> Result<(sled::Db, sled::Tree), StorageError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let db = loop {
        match sled::Config::new().path(path).cache_capacity(cache_bytes).open() {
            Ok(db) => break db,
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(engine(e)),
        }
    };
    let tree = db.open_tree("twinfleet").map_err(engine)?;
    Ok((db, tree))
}

/// One page of a group commit: its id and its parts.
struct Page {
    id: u64,
    parts: Vec<Vec<u8>>,
}

/// The pages of one group commit, one per space.
#[derive(Default)]
struct Pages(Vec<(Space, Page)>);

impl Pages {
    fn page(&mut self, db: &sled::Db, space: Space) -> Result<&mut Page, sled::Error> {
        let i = match self.0.iter().position(|(s, _)| *s == space) {
            Some(i) => i,
            None => {
                self.0.push((space, Page { id: db.generate_id()?, parts: vec![Vec::new()] }));
                self.0.len() - 1
            }
        };
        Ok(&mut self.0[i].1)
    }

    /// Appends an item to the page's last part, or to a new part once that is full.
    fn push(parts: &mut Vec<Vec<u8>>, item: &[u8]) {
        let last = parts.last().map_or(0, Vec::len);
        if last > 0 && last + 4 + item.len() > PAGE_PART_BYTES {
            parts.push(Vec::with_capacity(PAGE_PART_BYTES));
        }
        let part = parts.last_mut().expect("a page has a part");
        part.extend_from_slice(&(item.len() as u32).to_le_bytes());
        part.extend_from_slice(item);
    }
}

fn prefixed(space: Space, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(space.0);
    k.extend_from_slice(key);
    k
}

impl SledStorage {
    /// Opens (or creates) the database under `dir/db`.
    pub fn open(dir: &Path, opts: SledOptions) -> Result<Arc<Self>, StorageError> {
        let path = dir.join("db");
        remove_partial_snapshots(&path);
        let (db, tree) = open_engine(&path, opts.cache_bytes)?;
        crate::lock::restrict_tree(dir)
            .map_err(|e| StorageError::Engine(format!("cannot restrict the permissions of {}: {e}", dir.display())))?;
        let engine = Arc::new(Engine {
            db: RwLock::new(Some((db, tree))),
            full: RwLock::new(None),
            is_full: std::sync::atomic::AtomicBool::new(false),
            poisoned: std::sync::atomic::AtomicBool::new(false),
            path: path.clone(),
            cache_bytes: opts.cache_bytes,
            min_free_bytes: opts.min_free_bytes,
        });
        let (tx, rx) = sync_channel(opts.queue_capacity);
        let counters = Arc::new(Counters::default());
        let writer = {
            let (engine, counters) = (engine.clone(), counters.clone());
            std::thread::Builder::new()
                .name("tf-storage".into())
                .spawn(move || writer_loop(&engine, rx, opts.max_group_ops, counters))
                .map_err(|e| StorageError::Engine(e.to_string()))?
        };
        Ok(Arc::new(SledStorage {
            engine,
            path,
            tx: RwLock::new(Some(tx)),
            writer: parking_lot::Mutex::new(Some(writer)),
            counters,
        }))
    }
}

/// Removes `snap.*.generating` files: sled writes a snapshot under that name and renames
/// it when complete, so one that is left over (a start that failed on a full disk leaves
/// a zero-byte one) is garbage, but sled would refuse every later start over it
/// ("Read corrupted data").
fn remove_partial_snapshots(db: &Path) {
    let Ok(entries) = std::fs::read_dir(db) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::warn!("removed the partial snapshot {} left by an earlier failure", entry.path().display())
                }
                Err(e) => tracing::warn!("cannot remove the partial snapshot {}: {e}", entry.path().display()),
            }
        }
    }
}

fn writer_loop(engine: &Engine, rx: Receiver<Pending>, max_ops: usize, c: Arc<Counters>) {
    let mut last_probe = Instant::now();
    loop {
        let first = if engine.full.read().is_none() {
            match rx.recv() {
                Ok(p) => p,
                Err(_) => break,
            }
        } else {
            match rx.recv_timeout(FULL_PROBE_EVERY) {
                Ok(p) => p,
                Err(RecvTimeoutError::Timeout) => {
                    recover(engine);
                    last_probe = Instant::now();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        };
        let mut group = vec![first];
        let mut ops = group[0].batch.len();
        while ops < max_ops {
            match rx.try_recv() {
                Ok(p) => {
                    ops += p.batch.len();
                    group.push(p);
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        if engine.full.read().is_some() && last_probe.elapsed() >= FULL_PROBE_EVERY {
            recover(engine);
            last_probe = Instant::now();
        }
        if engine.full.read().is_none() {
            let bytes: u64 = group.iter().map(|p| p.batch.bytes()).sum();
            if let Some(why) = engine.short_of_space(bytes) {
                tracing::error!(
                    "the disk is full: {why}; writes are refused, reads go on, writes resume when space is freed"
                );
                engine.set_full(Some(why));
                last_probe = Instant::now();
            }
        }
        if let Some(why) = engine.full.read().clone() {
            // Nothing is attempted while the disk is full; a barrier (an empty batch)
            // still answers, so reads that wait for one keep working.
            for p in group {
                let r = if p.batch.is_empty() { Ok(()) } else { Err(StorageError::Full(why.clone())) };
                let _ = p.done.send(r);
            }
            continue;
        }
        let mut batch = sled::Batch::default();
        c.bytes.fetch_add(group.iter().map(|p| p.batch.bytes()).sum::<u64>(), Relaxed);
        let started = Instant::now();
        let db = engine.db.read();
        let result = match db.as_ref() {
            Some((db, tree)) => {
                let mut pages = Pages::default();
                let mut failed = None;
                for p in &mut group {
                    for op in std::mem::take(&mut p.batch.ops) {
                        match op {
                            Op::Put(s, k, v) => batch.insert(prefixed(s, &k), v),
                            Op::Delete(s, k) => batch.remove(prefixed(s, &k)),
                            Op::Pack(s, item) => match pages.page(db, s) {
                                Ok(page) => Pages::push(&mut page.parts, &item),
                                Err(e) => failed = Some(e),
                            },
                            Op::PutPageId(s, k, page_space) => match pages.page(db, page_space) {
                                Ok(page) => batch.insert(prefixed(s, &k), page_key(page.id).to_vec()),
                                Err(e) => failed = Some(e),
                            },
                        }
                    }
                }
                for (s, Page { id, parts }) in pages.0 {
                    for (n, bytes) in parts.into_iter().enumerate().filter(|(_, b)| !b.is_empty()) {
                        let mut key = page_key(id).to_vec();
                        key.extend_from_slice(&(n as u16).to_be_bytes());
                        batch.insert(prefixed(s, &key), bytes);
                    }
                }
                match failed {
                    Some(e) => Err(self::engine(e)),
                    None => tree.apply_batch(batch).and_then(|_| db.flush().map(|_| ())).map_err(self::engine),
                }
            }
            None => Err(StorageError::Closed),
        };
        drop(db);
        let micros = started.elapsed().as_micros() as u64;
        c.groups.fetch_add(1, Relaxed);
        c.ops.fetch_add(ops as u64, Relaxed);
        c.flush_total.fetch_add(micros, Relaxed);
        c.flush_max.fetch_max(micros, Relaxed);
        c.group_ops.observe(ops as u64);
        c.flush.observe(micros);
        match &result {
            Err(StorageError::Full(why)) => {
                tracing::error!(
                    "the disk is full: {why}; {} write(s) refused, reads go on, writes resume when space is freed",
                    group.len()
                );
                engine.set_full(Some(why.clone()));
                engine.poisoned.store(true, Relaxed);
                last_probe = Instant::now();
            }
            Err(e) => tracing::error!(error = %e, ops, "group commit failed; {} callers get the error", group.len()),
            Ok(()) => {}
        }
        for p in group {
            let _ = p.done.send(result.clone());
        }
    }
    if let Some((db, _)) = engine.db.read().as_ref() {
        let _ = db.flush();
    }
}

/// While the disk is full: if a probe finds space again, reopens sled (it refuses
/// writes until reopened) and takes writes again. Reads wait for the moment of the
/// reopen only.
fn recover(engine: &Engine) {
    if engine.short_of_space(FULL_PROBE_BYTES as u64).is_some() {
        return;
    }
    if !engine.poisoned.load(Relaxed) {
        engine.set_full(None);
        tracing::warn!("space is available again: storage takes writes again");
        return;
    }
    let probe = engine.path.join(".space-probe");
    let written = (|| {
        use std::io::Write;
        let mut f = std::fs::File::create(&probe)?;
        f.write_all(&vec![0u8; FULL_PROBE_BYTES])?;
        f.sync_all()
    })();
    let _ = std::fs::remove_file(&probe);
    if written.is_err() {
        return;
    }
    let mut db = engine.db.write();
    if db.is_none() {
        return; // shut down meanwhile
    }
    drop(db.take());
    match open_engine(&engine.path, engine.cache_bytes) {
        Ok(e) => {
            *db = Some(e);
            engine.set_full(None);
            engine.poisoned.store(false, Relaxed);
            tracing::warn!("space is available again: storage takes writes again");
        }
        Err(e) => tracing::error!("cannot reopen storage after the disk was full (retrying): {e}"),
    }
}

impl SledStorage {
    fn tree(&self) -> Result<sled::Tree, StorageError> {
        self.engine.db.read().as_ref().map(|(_, t)| t.clone()).ok_or(StorageError::Closed)
    }
}

impl Storage for SledStorage {
    fn submit(&self, batch: WriteBatch) -> Ticket {
        let guard = self.tx.read();
        let Some(tx) = guard.as_ref() else {
            return Ticket::ready(Err(StorageError::Closed));
        };
        let (done, rx) = oneshot::channel();
        self.counters.submitted.fetch_add(1, Relaxed);
        match tx.send(Pending { batch, done }) {
            Ok(()) => Ticket(TicketInner::Waiting(rx)),
            Err(_) => Ticket::ready(Err(StorageError::Closed)),
        }
    }

    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.tree()?.get(prefixed(space, key)).map_err(engine)?.map(|v| v.to_vec()))
    }

    fn scan(&self, space: Space, prefix: &[u8]) -> Records<'_> {
        match self.tree() {
            Ok(tree) => Box::new(
                tree.scan_prefix(prefixed(space, prefix))
                    .map(|r| r.map(|(k, v)| (k[1..].to_vec(), v.to_vec())).map_err(engine)),
            ),
            Err(e) => Box::new(std::iter::once(Err(e))),
        }
    }

    fn scan_rev(&self, space: Space, prefix: &[u8], limit: usize) -> Result<Vec<Record>, StorageError> {
        self.tree()?
            .scan_prefix(prefixed(space, prefix))
            .rev()
            .take(limit)
            .map(|r| r.map(|(k, v)| (k[1..].to_vec(), v.to_vec())).map_err(engine))
            .collect()
    }

    fn scan_range(&self, space: Space, start: &[u8], end: &[u8]) -> Result<Vec<Record>, StorageError> {
        self.tree()?
            .range(prefixed(space, start)..=prefixed(space, end))
            .map(|r| r.map(|(k, v)| (k[1..].to_vec(), v.to_vec())).map_err(engine))
            .collect()
    }

    fn scan_range_rev(&self, space: Space, start: &[u8], end: &[u8]) -> Records<'_> {
        match self.tree() {
            Ok(tree) => Box::new(
                tree.range(prefixed(space, start)..=prefixed(space, end))
                    .rev()
                    .map(|r| r.map(|(k, v)| (k[1..].to_vec(), v.to_vec())).map_err(engine)),
            ),
            Err(e) => Box::new(std::iter::once(Err(e))),
        }
    }

    fn generate_id(&self) -> Result<u64, StorageError> {
        self.engine.db.read().as_ref().ok_or(StorageError::Closed)?.0.generate_id().map_err(engine)
    }

    fn stats(&self) -> StorageStats {
        let c = &self.counters;
        StorageStats {
            batches_submitted: c.submitted.load(Relaxed),
            groups_committed: c.groups.load(Relaxed),
            ops_committed: c.ops.load(Relaxed),
            bytes_committed: c.bytes.load(Relaxed),
            flush_micros_total: c.flush_total.load(Relaxed),
            flush_micros_max: c.flush_max.load(Relaxed),
            group_ops: c.group_ops.view(),
            flush_micros: c.flush.view(),
        }
    }

    fn shutdown(&self) {
        drop(self.tx.write().take());
        if let Some(h) = self.writer.lock().take() {
            let _ = h.join();
        }
        if let Some((db, _)) = self.engine.db.write().take() {
            let _ = db.flush();
        }
    }

    fn writable(&self) -> Result<(), StorageError> {
        if !self.engine.is_full.load(Relaxed) {
            return Ok(());
        }
        match self.engine.full.read().as_ref() {
            Some(why) => Err(StorageError::Full(why.clone())),
            None => Ok(()),
        }
    }
}

impl Drop for SledStorage {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNAPSHOT: Space = Space(4);
    const JOURNAL: Space = Space(5);

    #[tokio::test]
    async fn batches_are_durable_and_spaces_are_separate() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStorage::open(dir.path(), SledOptions::default()).unwrap();
            let mut tickets = vec![];
            for i in 0..100u32 {
                let mut b = WriteBatch::new();
                b.put(JOURNAL, format!("t\0{i:04}"), vec![i as u8]).put(SNAPSHOT, "t", vec![i as u8]);
                tickets.push(s.submit(b));
            }
            for t in tickets {
                t.await.unwrap();
            }
            assert!(s.stats().groups_committed <= 100);
            s.shutdown();
            assert!(matches!(s.submit(WriteBatch::new()).await, Err(StorageError::Closed)));
        }
        let s = SledStorage::open(dir.path(), SledOptions::default()).unwrap();
        assert_eq!(s.get(SNAPSHOT, b"t").unwrap(), Some(vec![99]));
        assert_eq!(s.scan(JOURNAL, b"t\0").count(), 100);
        assert_eq!(s.scan(SNAPSHOT, b"").count(), 1);
        let last = s.scan_rev(JOURNAL, b"t\0", 2).unwrap();
        assert_eq!(last[0].1, vec![99]);
        assert_eq!(last[1].1, vec![98]);
    }

    #[tokio::test]
    async fn packed_items_of_one_commit_share_one_page_whose_id_is_stored_with_them() {
        const PAGE: Space = Space(20);
        const MARK: Space = Space(21);
        let dir = tempfile::tempdir().unwrap();
        let s = SledStorage::open(dir.path(), SledOptions::default()).unwrap();
        let mut tickets = vec![];
        for i in 0..200u32 {
            let mut b = WriteBatch::new();
            b.pack(PAGE, format!("item-{i}").into_bytes());
            if i % 50 == 0 {
                b.put_page_id(MARK, format!("m{i}"), PAGE);
            }
            tickets.push(s.submit(b));
        }
        for t in tickets {
            t.await.unwrap();
        }
        let pages: Vec<(Vec<u8>, Vec<u8>)> = s.scan(PAGE, b"").map(Result::unwrap).collect();
        assert!(!pages.is_empty() && pages.len() <= 200);
        let items: Vec<String> = pages
            .iter()
            .flat_map(|(_, v)| {
                page_items(v).map(|i| String::from_utf8(i.unwrap().to_vec()).unwrap()).collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(items, (0..200).map(|i| format!("item-{i}")).collect::<Vec<_>>(), "every item, in order");
        for i in [0, 50, 100, 150] {
            let id = s.get(MARK, format!("m{i}").as_bytes()).unwrap().unwrap();
            let next = page_key(page_id(&id).unwrap() + 1);
            let parts = s.scan_range(PAGE, &id, &next).unwrap();
            assert!(!parts.is_empty(), "the page the mark names exists");
            let want = format!("item-{i}");
            let found = parts.iter().any(|(_, v)| page_items(v).any(|it| it.unwrap() == want.as_bytes()));
            assert!(found, "item {i} is in its mark's page");
        }
        // A large commit is stored in parts of bounded size.
        let mut b = WriteBatch::new();
        for i in 0..100u32 {
            b.pack(PAGE, vec![i as u8; 100]);
        }
        s.submit(b).await.unwrap();
        let biggest = s.scan(PAGE, b"").map(|r| r.unwrap().1.len()).max().unwrap();
        assert!(biggest <= PAGE_PART_BYTES, "parts stay within {PAGE_PART_BYTES} bytes: {biggest}");
        assert_eq!(page_items(&[5, 0, 0, 0, 1]).collect::<Vec<_>>().len(), 1);
        assert!(page_items(&[5, 0, 0, 0, 1]).next().unwrap().is_err(), "a page cut short is an error");
    }
}
