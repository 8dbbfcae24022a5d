//! Segment files: immutable, sealed chunks of one time partition of one namespace, with
//! an index at the end.
//!
//! ```text
//! "TFSEG001"
//! chunk streams, back to back
//! index: u32 entries; per entry: u16 key length, key, i64 first, i64 last, u32 count,
//!        u64 seq, u64 offset, u32 length, u32 crc32 of the stream
//! footer: u64 index offset, u32 index length, u32 crc32 of the index, "TFSEGEND"
//! ```
//! A segment whose footer or index does not check is reported and skipped whole; a chunk
//! whose stream does not check is reported and skipped alone.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"TFSEG001";
const END: &[u8; 8] = b"TFSEGEND";
const FOOTER: usize = 8 + 4 + 4 + 8;

/// A sealed chunk, in memory (about to be written, or read back).
#[derive(Debug, Clone)]
pub(crate) struct Sealed {
    pub key: String,
    pub first: i64,
    pub last: i64,
    pub count: u32,
    /// Write order: among chunks holding the same timestamp the highest seq wins.
    pub seq: u64,
    pub bytes: Vec<u8>,
}

/// Where a chunk lies in a segment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChunkRef {
    pub first: i64,
    pub last: i64,
    pub count: u32,
    pub seq: u64,
    offset: u64,
    len: u32,
    crc: u32,
}

/// An open segment: its file and its index.
#[derive(Debug)]
pub(crate) struct Segment {
    pub path: PathBuf,
    file: File,
    pub index: HashMap<String, Vec<ChunkRef>>,
}

fn put_u16(b: &mut Vec<u8>, v: u16) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

/// Reads little-endian fields off a byte slice.
pub(crate) struct Cursor<'a>(pub &'a [u8]);

impl<'a> Cursor<'a> {
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    pub fn str(&mut self) -> Option<&'a str> {
        let n = self.u16()? as usize;
        std::str::from_utf8(self.take(n)?).ok()
    }
    pub fn string(&mut self) -> Option<String> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

/// Writes `chunks` as the segment `path` (through a temporary name, then fsync and
/// rename, so a crash leaves either the whole segment or none).
pub(crate) fn write<C: std::ops::Deref<Target = Sealed>>(path: &Path, chunks: &[C]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&tmp)?;
    // Streamed: the chunks are not copied into one buffer of the file's size.
    let mut out = std::io::BufWriter::with_capacity(256 << 10, f);
    out.write_all(MAGIC)?;
    let mut offset = MAGIC.len() as u64;
    let mut index = Vec::with_capacity(4 + chunks.len() * 64);
    put_u32(&mut index, chunks.len() as u32);
    for c in chunks {
        out.write_all(&c.bytes)?;
        put_u16(&mut index, c.key.len() as u16);
        index.extend_from_slice(c.key.as_bytes());
        put_u64(&mut index, c.first as u64);
        put_u64(&mut index, c.last as u64);
        put_u32(&mut index, c.count);
        put_u64(&mut index, c.seq);
        put_u64(&mut index, offset);
        put_u32(&mut index, c.bytes.len() as u32);
        put_u32(&mut index, crc32fast::hash(&c.bytes));
        offset += c.bytes.len() as u64;
    }
    out.write_all(&index)?;
    let mut footer = Vec::with_capacity(FOOTER);
    put_u64(&mut footer, offset);
    put_u32(&mut footer, index.len() as u32);
    put_u32(&mut footer, crc32fast::hash(&index));
    footer.extend_from_slice(END);
    out.write_all(&footer)?;
    let f = out.into_inner().map_err(|e| e.into_error())?;
    f.sync_data()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl Segment {
    /// Opens a segment and checks its footer and index.
    pub fn open(path: &Path) -> Result<Segment, String> {
        let file = File::open(path).map_err(|e| e.to_string())?;
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        if len < (MAGIC.len() + FOOTER) as u64 {
            return Err(format!("{len} bytes: shorter than a segment's header and footer"));
        }
        let mut footer = [0u8; FOOTER];
        file.read_exact_at(&mut footer, len - FOOTER as u64).map_err(|e| e.to_string())?;
        let mut c = Cursor(&footer);
        let (offset, index_len, crc) = (c.u64().unwrap_or(0), c.u32().unwrap_or(0), c.u32().unwrap_or(0));
        if c.0 != END || offset + index_len as u64 + FOOTER as u64 != len {
            return Err("its footer is not a segment footer (truncated?)".into());
        }
        let mut index = vec![0u8; index_len as usize];
        file.read_exact_at(&mut index, offset).map_err(|e| e.to_string())?;
        if crc32fast::hash(&index) != crc {
            return Err("its index does not match its checksum".into());
        }
        let parse = || -> Option<HashMap<String, Vec<ChunkRef>>> {
            let mut c = Cursor(&index);
            let mut out: HashMap<String, Vec<ChunkRef>> = HashMap::new();
            for _ in 0..c.u32()? {
                let key = c.string()?;
                let r = ChunkRef {
                    first: c.u64()? as i64,
                    last: c.u64()? as i64,
                    count: c.u32()?,
                    seq: c.u64()?,
                    offset: c.u64()?,
                    len: c.u32()?,
                    crc: c.u32()?,
                };
                if r.offset + r.len as u64 > offset {
                    return None;
                }
                out.entry(key).or_default().push(r);
            }
            Some(out)
        };
        let index = parse().ok_or("its index does not parse")?;
        Ok(Segment { path: path.to_path_buf(), file, index })
    }

    /// The stream of one chunk, checked against its checksum.
    pub fn read(&self, r: &ChunkRef) -> Result<Vec<u8>, String> {
        let mut buf = vec![0u8; r.len as usize];
        self.file.read_exact_at(&mut buf, r.offset).map_err(|e| e.to_string())?;
        if crc32fast::hash(&buf) != r.crc {
            return Err(format!("{}: a chunk at offset {} does not match its checksum", self.path.display(), r.offset));
        }
        Ok(buf)
    }
}
