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
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::sync::oneshot;

/// The keyspaces of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Space {
    Meta = 0,
    DeviceType = 1,
    Dta = 2,
    /// Packed initial records of twins created in bulk (thousands per record).
    Fleet = 3,
    /// One snapshot per twin that changed since it was created.
    Snapshot = 4,
    /// Per-twin journal: key = twin id, 0x00, big-endian sequence number.
    Journal = 5,
    Alert = 6,
    // 7 is unused: a quarantined record stays where it is (see actors::restore).
    /// Device credentials: twin id → keyed hash of its token.
    Credential = 8,
    /// Telemetry: key = twin id, 0x00, first point's millis (BE), record id (BE); value =
    /// a packed batch whose points all fall in one clock hour.
    Telemetry = 9,
    /// Users, groups and API tokens of the operator API: `user/<name>`, `group/<name>`,
    /// `token/<keyed hash>`.
    Access = 10,
    /// The audit log: key = big-endian id (increasing), value = one entry.
    Audit = 11,
    /// Long-running jobs of the operator API: key = big-endian job id.
    Job = 12,
    /// The newest value of each metric of a twin: key = twin id.
    TelemetryLatest = 13,
}

#[derive(Debug, Clone)]
enum Op {
    Put(Space, Vec<u8>, Vec<u8>),
    Delete(Space, Vec<u8>),
}

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
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    #[error("storage engine error: {0}")]
    Engine(String),
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
}

impl Ticket {
    pub fn ready(r: Result<(), StorageError>) -> Ticket {
        Ticket(TicketInner::Done(Some(r)))
    }
}

impl Future for Ticket {
    type Output = Result<(), StorageError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            TicketInner::Waiting(rx) => Pin::new(rx).poll(cx).map(|r| r.unwrap_or(Err(StorageError::Closed))),
            TicketInner::Done(r) => Poll::Ready(r.take().unwrap_or(Err(StorageError::Closed))),
        }
    }
}

/// Counters of the writer, for benchmarks and /metrics.
#[derive(Debug, Clone)]
pub struct StorageStats {
    pub batches_submitted: u64,
    pub groups_committed: u64,
    pub ops_committed: u64,
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
}

impl Default for SledOptions {
    fn default() -> Self {
        SledOptions { cache_bytes: 64 << 20, queue_capacity: 4096, max_group_ops: 50_000 }
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
            flush_total: AtomicU64::new(0),
            flush_max: AtomicU64::new(0),
            group_ops: Histogram::new(SIZE_BOUNDS),
            flush: Histogram::latency(),
        }
    }
}

/// sled with a group-commit writer thread.
pub struct SledStorage {
    /// `None` after shutdown: sled keeps its file lock while any handle lives, so the
    /// engine is dropped here even if other parts still hold the `SledStorage`.
    engine: RwLock<Option<(sled::Db, sled::Tree)>>,
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
    StorageError::Engine(e.to_string())
}

fn prefixed(space: Space, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(space as u8);
    k.extend_from_slice(key);
    k
}

impl SledStorage {
    /// Opens (or creates) the database under `dir/db`.
    pub fn open(dir: &Path, opts: SledOptions) -> Result<Arc<Self>, StorageError> {
        let path = dir.join("db");
        remove_partial_snapshots(&path);
        let db = sled::Config::new().path(&path).cache_capacity(opts.cache_bytes).open().map_err(engine)?;
        crate::lock::restrict_tree(dir)
            .map_err(|e| StorageError::Engine(format!("cannot restrict the permissions of {}: {e}", dir.display())))?;
        let tree = db.open_tree("twinfleet").map_err(engine)?;
        let (tx, rx) = sync_channel(opts.queue_capacity);
        let counters = Arc::new(Counters::default());
        let writer = {
            let (db, tree, counters) = (db.clone(), tree.clone(), counters.clone());
            std::thread::Builder::new()
                .name("tf-storage".into())
                .spawn(move || writer_loop(db, tree, rx, opts.max_group_ops, counters))
                .map_err(|e| StorageError::Engine(e.to_string()))?
        };
        Ok(Arc::new(SledStorage {
            engine: RwLock::new(Some((db, tree))),
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

fn writer_loop(db: sled::Db, tree: sled::Tree, rx: Receiver<Pending>, max_ops: usize, c: Arc<Counters>) {
    while let Ok(first) = rx.recv() {
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
        let mut batch = sled::Batch::default();
        for p in &mut group {
            for op in std::mem::take(&mut p.batch.ops) {
                match op {
                    Op::Put(s, k, v) => batch.insert(prefixed(s, &k), v),
                    Op::Delete(s, k) => batch.remove(prefixed(s, &k)),
                }
            }
        }
        let started = Instant::now();
        let result = tree.apply_batch(batch).and_then(|_| db.flush().map(|_| ())).map_err(engine);
        let micros = started.elapsed().as_micros() as u64;
        c.groups.fetch_add(1, Relaxed);
        c.ops.fetch_add(ops as u64, Relaxed);
        c.flush_total.fetch_add(micros, Relaxed);
        c.flush_max.fetch_max(micros, Relaxed);
        c.group_ops.observe(ops as u64);
        c.flush.observe(micros);
        if let Err(e) = &result {
            tracing::error!(error = %e, ops, "group commit failed; {} callers get the error", group.len());
        }
        for p in group {
            let _ = p.done.send(result.clone());
        }
    }
    let _ = db.flush();
}

impl SledStorage {
    fn tree(&self) -> Result<sled::Tree, StorageError> {
        self.engine.read().as_ref().map(|(_, t)| t.clone()).ok_or(StorageError::Closed)
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
        self.engine.read().as_ref().ok_or(StorageError::Closed)?.0.generate_id().map_err(engine)
    }

    fn stats(&self) -> StorageStats {
        let c = &self.counters;
        StorageStats {
            batches_submitted: c.submitted.load(Relaxed),
            groups_committed: c.groups.load(Relaxed),
            ops_committed: c.ops.load(Relaxed),
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
        if let Some((db, _)) = self.engine.write().take() {
            let _ = db.flush();
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

    #[tokio::test]
    async fn batches_are_durable_and_spaces_are_separate() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStorage::open(dir.path(), SledOptions::default()).unwrap();
            let mut tickets = vec![];
            for i in 0..100u32 {
                let mut b = WriteBatch::new();
                b.put(Space::Journal, format!("t\0{i:04}"), vec![i as u8]).put(Space::Snapshot, "t", vec![i as u8]);
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
        assert_eq!(s.get(Space::Snapshot, b"t").unwrap(), Some(vec![99]));
        assert_eq!(s.scan(Space::Journal, b"t\0").count(), 100);
        assert_eq!(s.scan(Space::Snapshot, b"").count(), 1);
        let last = s.scan_rev(Space::Journal, b"t\0", 2).unwrap();
        assert_eq!(last[0].1, vec![99]);
        assert_eq!(last[1].1, vec![98]);
    }
}
