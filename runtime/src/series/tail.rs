//! Reading the WAL in append order, for exports: every point the store acknowledged, in
//! the order it was acknowledged, from a position a reader records.
//!
//! A position is `(generation, offset)`: the WAL file and the byte offset of the next
//! record in it. Readers *hold* the oldest generation they still need
//! ([`SeriesStore::hold_wal`]); a checkpoint then moves the generations it covered to
//! `wal/done/` instead of deleting them (they are no longer replayed at a start, only
//! read), and deletes them once no hold needs them. What `wal/done/` keeps is capped
//! (`SeriesOptions::export_wal_bytes`): past the cap the oldest generations go even if
//! held, counted in `wal_export_dropped`, and a reader positioned in one learns it from
//! [`WalRead::lost`].

use super::segment::Cursor;
use super::{SeriesError, SeriesPoints, SeriesStore, WAL_MAGIC, decode_wal_record, io};
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;

/// Where a WAL reader is: the next record is at `offset` of generation `generation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct WalPosition {
    pub generation: u64,
    pub offset: u64,
}

impl std::fmt::Display for WalPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.generation, self.offset)
    }
}

impl std::str::FromStr for WalPosition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (g, o) = s.split_once(':').ok_or_else(|| format!("{s:?} is not a position (generation:offset)"))?;
        Ok(WalPosition {
            generation: g.parse().map_err(|_| format!("{s:?}: bad generation"))?,
            offset: o.parse().map_err(|_| format!("{s:?}: bad offset"))?,
        })
    }
}

/// One WAL record as read: where it starts, where the next one starts, its points.
#[derive(Debug, Clone, PartialEq)]
pub struct WalRecord {
    pub at: WalPosition,
    pub next: WalPosition,
    pub series: Vec<SeriesPoints>,
}

/// What one [`SeriesStore::read_wal`] returned.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WalRead {
    pub records: Vec<WalRecord>,
    /// Where to read next (after the last record, or further on past the ends of
    /// generations).
    pub next: WalPosition,
    /// Set when the position asked for is no longer kept: reading went on from this
    /// oldest position kept, and what lay between is lost to the reader.
    pub lost: Option<WalPosition>,
}

impl SeriesStore {
    /// The end of what is durable: a reader at this position has read everything.
    pub fn wal_end(&self) -> WalPosition {
        *self.durable.lock()
    }

    /// Keeps generation `from.generation` and later for reader `name` (replaces its
    /// earlier hold).
    pub fn hold_wal(&self, name: &str, from: WalPosition) {
        self.holds.lock().insert(name.to_string(), from.generation);
    }

    /// Forgets reader `name`'s hold.
    pub fn release_wal(&self, name: &str) {
        self.holds.lock().remove(name);
    }

    /// The oldest generation some reader holds.
    pub(super) fn oldest_hold(&self) -> Option<u64> {
        self.holds.lock().values().min().copied()
    }

    /// Every WAL file, live (`wal/`) or kept for readers (`wal/done/`), by generation.
    fn readable_wal_files(&self) -> Vec<(u64, PathBuf)> {
        let mut v = self.wal_files();
        v.extend(self.done_wal_files());
        v.sort();
        v.dedup_by_key(|(g, _)| *g);
        v
    }

    /// Records from `from` on, whole records only, until about `max_points` points (at
    /// least one record when there is one). Reads only what is durable.
    pub fn read_wal(&self, from: WalPosition, max_points: usize) -> Result<WalRead, SeriesError> {
        let end = self.wal_end();
        let files = self.readable_wal_files();
        let mut out = WalRead { next: from, ..WalRead::default() };
        let magic = WAL_MAGIC.len() as u64;
        if out.next.offset < magic {
            out.next.offset = magic;
        }
        // A position older than the oldest generation kept: go on from there.
        if let Some((oldest, _)) = files.first()
            && out.next.generation < *oldest
            && out.next < end
        {
            out.next = WalPosition { generation: *oldest, offset: magic };
            out.lost = Some(out.next);
        }
        let tombstones = self.inner.lock().tombstones.clone();
        let mut points = 0usize;
        while out.next < end && points < max_points.max(1) {
            let pos = out.next;
            let Some((_, path)) = files.iter().find(|(g, _)| *g == pos.generation) else {
                // Not kept (dropped past the cap, or never written): the next one kept.
                match files.iter().find(|(g, _)| *g > pos.generation) {
                    Some((g, _)) => {
                        out.next = WalPosition { generation: *g, offset: magic };
                        out.lost.get_or_insert(out.next);
                        continue;
                    }
                    None => break,
                }
            };
            let limit = if pos.generation == end.generation { Some(end.offset) } else { None };
            let mut f = std::fs::File::open(path).map_err(io)?;
            let len = limit.unwrap_or(f.metadata().map_err(io)?.len());
            if pos.offset >= len {
                if pos.generation >= end.generation {
                    break;
                }
                // The end of a generation: the next one.
                match files.iter().find(|(g, _)| *g > pos.generation) {
                    Some((g, _)) => out.next = WalPosition { generation: *g, offset: magic },
                    None => out.next = end,
                }
                continue;
            }
            f.seek(SeekFrom::Start(pos.offset)).map_err(io)?;
            let mut r = std::io::BufReader::with_capacity(1 << 20, f.take(len - pos.offset));
            let mut offset = pos.offset;
            let mut torn = false;
            while points < max_points.max(1) && offset < len {
                let mut head = [0u8; 8];
                if r.read_exact(&mut head).is_err() {
                    torn = true;
                    break;
                }
                let mut c = Cursor(&head);
                let (Some(n), Some(crc)) = (c.u32(), c.u32()) else { break };
                let mut body = vec![0u8; n as usize];
                if r.read_exact(&mut body).is_err() || crc32fast::hash(&body) != crc {
                    // A torn end (cut off at the next start): nothing acknowledged is in it.
                    torn = true;
                    break;
                }
                let Some(mut series) = decode_wal_record(&body) else {
                    torn = true;
                    break;
                };
                let at = WalPosition { generation: pos.generation, offset };
                offset += 8 + n as u64;
                let key = (at.generation, at.offset);
                series.retain(|s| !tombstones.iter().any(|t| key < t.wal && t.covers(&s.namespace, &s.key)));
                points += series.iter().map(|s| s.points.len()).sum::<usize>();
                let next = WalPosition { generation: pos.generation, offset };
                out.records.push(WalRecord { at, next, series });
            }
            out.next = WalPosition { generation: pos.generation, offset };
            if (torn || offset >= len) && pos.generation < end.generation {
                // The end of an older generation (or its unreadable tail): the next one.
                match files.iter().find(|(g, _)| *g > pos.generation) {
                    Some((g, _)) => out.next = WalPosition { generation: *g, offset: magic },
                    None => out.next = end,
                }
            } else if torn {
                break;
            }
        }
        Ok(out)
    }

    /// The generations kept in `wal/done/` for readers.
    pub(super) fn done_wal_files(&self) -> Vec<(u64, PathBuf)> {
        let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(self.dir.join("wal").join("done"))
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

    /// After a checkpoint covered generations up to `old_gen`: each goes to `wal/done/`
    /// if a reader holds it, else away; then `wal/done/` is trimmed to what holds need,
    /// within the cap.
    pub(super) fn retire_wal(&self, old_gen: u64) {
        let hold = self.oldest_hold();
        let done_dir = self.dir.join("wal").join("done");
        for (g, path) in self.wal_files() {
            if g > old_gen {
                continue;
            }
            if hold.is_some_and(|h| h <= g) {
                let moved = super::mkdir(&done_dir)
                    .and_then(|_| std::fs::rename(&path, done_dir.join(path.file_name().expect("a file"))));
                if let Err(e) = moved {
                    tracing::error!(wal = %path.display(), error = %e, "a WAL generation kept for exports could not be moved; it is removed");
                    let _ = std::fs::remove_file(&path);
                }
            } else {
                let _ = std::fs::remove_file(path);
            }
        }
        let mut done = self.done_wal_files();
        done.retain(|(g, path)| {
            let needed = hold.is_some_and(|h| h <= *g);
            if !needed {
                let _ = std::fs::remove_file(path);
            }
            needed
        });
        let mut sizes: Vec<u64> =
            done.iter().map(|(_, p)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).collect();
        let mut total: u64 = sizes.iter().sum();
        let mut i = 0;
        while total > self.opts.export_wal_bytes && i < done.len() {
            tracing::error!(
                wal = %done[i].1.display(),
                "the WAL kept for exports is past its cap of {} bytes: its oldest generation is removed, and an export that has not read it loses those points",
                self.opts.export_wal_bytes
            );
            let _ = std::fs::remove_file(&done[i].1);
            self.counters.wal_export_dropped.fetch_add(1, Relaxed);
            total -= sizes[i];
            sizes[i] = 0;
            i += 1;
        }
        self.counters.wal_kept_bytes.store(total, Relaxed);
    }
}
