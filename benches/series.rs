//! History benchmarks.
//!
//! `cargo bench --bench series`; `TWINFLEET_BENCH_SECTIONS` picks sections (default
//! `codec,ingest,disk,query,year,replay`).
//! - `codec`: bytes per point of the series codec against Gorilla's XOR coding of the
//!   same points in the same run. Series of 1 Hz points, one day each
//!   (`TWINFLEET_BENCH_POINTS`, default 86,400), in chunks of `TWINFLEET_BENCH_CHUNK`
//!   points (default 7,200: two hours at 1 Hz, the store's head size); bytes include each
//!   chunk's header.
//! - `ingest`: durable points/s into the series store (WAL append + fdatasync per group
//!   commit) from 10,000 concurrent submitters of 10-point batches, closed loop, on one
//!   tokio runtime with the machine's cores.
//! - `disk`: segment bytes per point after a checkpoint, 1,000 series × 1 day at 1 Hz.
//! - `query`: one day of 1 Hz data of one series, raw and in 1-minute buckets.
//! - `year`: peak RSS growth while one year of one series (a point every 10 s) streams.
//! - `replay`: opening a store whose WAL holds 10M points not yet sealed (as after kill -9).
//! - `fjall` (with `--features fjall-bench`, not in the default list): the same sealed
//!   chunks (1,000 series × 1 day, chunks of 7,200 points) in our segment files and in a
//!   fjall keyspace (key = series, first timestamp; value = the chunk), in the same run:
//!   seal rate, bytes on disk per point, one day of one series raw and in 1-minute
//!   buckets.

mod common;

use common::{Arma, cores, env_or, median, rss};
use std::sync::Arc;
use std::time::Instant;
use twinfleet_models::series::codec::ChunkEncoder;
use twinfleet_models::series::query::Downsample;
use twinfleet_runtime::series::{SeriesOptions, SeriesPoints, SeriesStore};

fn row(bench: &str, value: &str, extra: &str) {
    println!("| {bench} | {} | {value} | {extra} |", cores());
}

/// Bits per point of `points` coded in chunks of `chunk`, by `new` (decimal or XOR).
fn bits_per_point(points: &[(i64, f64)], chunk: usize, new: fn(i64, f64) -> ChunkEncoder) -> f64 {
    let mut bits = 0u64;
    for c in points.chunks(chunk) {
        let mut e = new(c[0].0, c[0].1);
        for &(t, v) in &c[1..] {
            e.push(t, v);
        }
        bits += e.bits() + 32; // + the chunk's point count, as the store keeps it
    }
    bits as f64 / points.len() as f64
}

fn sections() -> Vec<String> {
    std::env::var("TWINFLEET_BENCH_SECTIONS")
        .unwrap_or_else(|_| "codec,ingest,disk,query,year,replay".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .collect()
}

const START: i64 = 1_764_547_200_000; // 2025-12-01T00:00:00Z

fn main() {
    // As the `twinfleet` binary does at its start (see twinfleet::memory).
    twinfleet::memory::disable_transparent_huge_pages().expect("prctl(PR_SET_THP_DISABLE)");
    let sections = sections();
    println!("| benchmark | cores | result | detail |");
    println!("|---|---|---|---|");
    let on = |s: &str| sections.iter().any(|x| x == s);
    if on("codec") {
        codec();
    }
    if on("ingest") {
        ingest();
    }
    if on("disk") {
        disk();
    }
    if on("query") {
        query();
    }
    if on("year") {
        year();
    }
    if on("replay") {
        replay();
    }
    if on("fjall") {
        #[cfg(feature = "fjall-bench")]
        fjall_compare();
        #[cfg(not(feature = "fjall-bench"))]
        eprintln!("*** section fjall skipped: build with --features fjall-bench ***");
    }
}

#[cfg(feature = "fjall-bench")]
fn fjall_compare() {
    use twinfleet_models::series::codec;
    let series = env_or("TWINFLEET_BENCH_SERIES", 1_000) as usize;
    let chunk = 7_200usize;
    let points_per = 86_400i64;
    let total = series as f64 * points_per as f64;
    // Ours: fill the heads (no checkpoint on the way), then time the checkpoint that
    // writes all of them into segments.
    let dir = tempfile::tempdir().unwrap();
    let opts = SeriesOptions { checkpoint_wal_bytes: u64::MAX, ..SeriesOptions::default() };
    let store = SeriesStore::open(dir.path(), opts).unwrap();
    fill(&store, "sensor", series, points_per, 1_000, false);
    let t = Instant::now();
    store.checkpoint().unwrap();
    let seal_ours = t.elapsed().as_secs_f64();
    let bytes_ours = dir_bytes(&dir.path().join("sensor"));

    // fjall: the same points, encoded into the same chunks, inserted and flushed.
    let mut chunks: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut gens: Vec<Arma> = (0..series).map(|k| Arma::new(k as u64 + 11, 45.0, 0.05)).collect();
    for (k, a) in gens.iter_mut().enumerate() {
        let pts: Vec<(i64, f64)> = (0..points_per).map(|i| (START + i * 1_000, a.next_value())).collect();
        for c in pts.chunks(chunk) {
            let mut e = ChunkEncoder::new(c[0].0, c[0].1);
            for &(t, v) in &c[1..] {
                e.push(t, v);
            }
            let mut key = format!("dev-{k}/humidity").into_bytes();
            key.push(0);
            key.extend_from_slice(&c[0].0.to_be_bytes());
            let mut value = e.count().to_le_bytes().to_vec();
            value.extend_from_slice(e.bytes());
            chunks.push((key, value));
        }
    }
    let fdir = tempfile::tempdir().unwrap();
    let db = fjall::Database::builder(fdir.path()).open().unwrap();
    let ks = db.keyspace("sensor", fjall::KeyspaceCreateOptions::default).unwrap();
    let t = Instant::now();
    for group in chunks.chunks(1_000) {
        let mut b = db.batch();
        for (k, v) in group {
            b.insert(&ks, k.clone(), v.clone());
        }
        b.commit().unwrap();
    }
    db.persist(fjall::PersistMode::SyncAll).unwrap();
    ks.rotate_memtable_and_wait().unwrap();
    let seal_fjall = t.elapsed().as_secs_f64();
    ks.major_compact().unwrap();
    let bytes_fjall = dir_bytes(fdir.path());
    let tables = ks.disk_space();
    row(
        "sealed history: seal rate, our segment files",
        &format!("{:.0} points/s", total / seal_ours),
        &format!("{series} series x 1 day at 1 Hz, one checkpoint: {seal_ours:.2} s"),
    );
    row(
        "sealed history: seal rate, fjall keyspace",
        &format!("{:.0} points/s", total / seal_fjall),
        &format!("the same chunks: batches of 1,000 + persist(SyncAll) + memtable flush: {seal_fjall:.2} s"),
    );
    row(
        "sealed history: bytes on disk per point, our segment files",
        &format!("{:.3} B/point", bytes_ours as f64 / total),
        &format!("{bytes_ours} bytes (index included)"),
    );
    row(
        "sealed history: bytes on disk per point, fjall keyspace",
        &format!("{:.3} B/point", bytes_fjall as f64 / total),
        &format!(
            "{bytes_fjall} bytes in its directory after a major compaction (journal, tables, manifest; LZ4 default); tables alone {:.3} B/point",
            tables as f64 / total
        ),
    );

    // One day of one series, raw and in 1-minute buckets, from each.
    let prefix = {
        let mut p = b"dev-0/humidity".to_vec();
        p.push(0);
        p
    };
    let from_fjall = || {
        ks.prefix(&prefix).flat_map(|g| {
            let (_, v) = g.into_inner().unwrap();
            let count = u32::from_le_bytes(v[..4].try_into().unwrap());
            codec::decode(&v[4..], count).map(|p| p.unwrap()).collect::<Vec<_>>()
        })
    };
    let (from, to) = (START, START + 86_400_000);
    let mut m: [Vec<f64>; 4] = Default::default();
    for _ in 0..9 {
        let t = Instant::now();
        assert_eq!(store.points("sensor", "dev-0/humidity", from, to).count(), 86_400);
        m[0].push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        assert_eq!(from_fjall().count(), 86_400);
        m[1].push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        assert_eq!(Downsample::new(store.points("sensor", "dev-0/humidity", from, to), 60_000).count(), 1_440);
        m[2].push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        assert_eq!(Downsample::new(from_fjall(), 60_000).count(), 1_440);
        m[3].push(t.elapsed().as_secs_f64() * 1e3);
    }
    let [raw_ours, raw_fjall, b_ours, b_fjall] = m.map(median);
    row("sealed history: 1 day raw, our segment files", &format!("{raw_ours:.2} ms"), "median of 9");
    row(
        "sealed history: 1 day raw, fjall keyspace",
        &format!("{raw_fjall:.2} ms"),
        "median of 9 (prefix scan + decode)",
    );
    row("sealed history: 1 day in 1-minute buckets, our segment files", &format!("{b_ours:.2} ms"), "median of 9");
    row("sealed history: 1 day in 1-minute buckets, fjall keyspace", &format!("{b_fjall:.2} ms"), "median of 9");
    store.shutdown();
}

fn codec() {
    let n = env_or("TWINFLEET_BENCH_POINTS", 86_400) as i64;
    let chunk = env_or("TWINFLEET_BENCH_CHUNK", 7_200) as usize;
    let start = 1_764_547_200_000i64; // 2025-12-01T00:00:00Z
    let series =
        |f: &mut dyn FnMut(i64) -> f64| -> Vec<(i64, f64)> { (0..n).map(|i| (start + i * 1_000, f(i))).collect() };
    let cases: Vec<(&str, Vec<(i64, f64)>)> = vec![
        ("ARMA(4,3) humidity, sigma 0.05, 2 decimals", {
            let mut a = Arma::new(1, 45.0, 0.05);
            series(&mut |_| a.next_value())
        }),
        ("ARMA(4,3) temperature, sigma 0.2, 2 decimals", {
            let mut a = Arma::new(2, 21.0, 0.2);
            series(&mut |_| a.next_value())
        }),
        ("constant value", series(&mut |_| 21.5)),
        ("counter (+1 per point)", series(&mut |i| i as f64)),
        ("ARMA(4,3), full-precision floats (no rounding)", {
            let mut a = Arma::new(3, 45.0, 0.05);
            let mut prev = 0.0;
            series(&mut |_| {
                prev = a.next_value() + prev * 1e-9 + 1.0 / 3.0;
                prev
            })
        }),
    ];
    for (name, points) in &cases {
        let ours = bits_per_point(points, chunk, ChunkEncoder::new) / 8.0;
        let gorilla = bits_per_point(points, chunk, ChunkEncoder::new_xor) / 8.0;
        row(
            &format!("codec: {name}, 1 Hz"),
            &format!("{ours:.3} B/point"),
            &format!("Gorilla XOR in the same run: {gorilla:.3} B/point; {n} points, chunks of {chunk}"),
        );
    }
}

/// Feeds `series` series of `points` ARMA points each (one every `step_ms`) into
/// `store`, in submissions of 3,600 points of every series.
fn fill(store: &SeriesStore, ns: &str, series: usize, points: i64, step_ms: i64, constant: bool) {
    let mut gens: Vec<Arma> = (0..series).map(|k| Arma::new(k as u64 + 11, 45.0, 0.05)).collect();
    let mut done = 0;
    while done < points {
        let n = (points - done).min(3_600);
        let batch = gens
            .iter_mut()
            .enumerate()
            .map(|(k, a)| SeriesPoints {
                namespace: ns.into(),
                key: format!("dev-{k}/humidity"),
                points: (done..done + n)
                    .map(|i| (START + i * step_ms, if constant { 21.5 } else { a.next_value() }))
                    .collect(),
            })
            .collect();
        store.submit(batch).wait().unwrap();
        done += n;
    }
}

fn dir_bytes(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .map(|d| {
            d.flatten()
                .map(
                    |e| {
                        if e.path().is_dir() {
                            dir_bytes(&e.path())
                        } else {
                            e.metadata().map(|m| m.len()).unwrap_or(0)
                        }
                    },
                )
                .sum()
        })
        .unwrap_or(0)
}

fn ingest() {
    let devices = env_or("TWINFLEET_BENCH_DEVICES", 10_000) as usize;
    let secs = env_or("TWINFLEET_BENCH_SECONDS", 5);
    let dir = tempfile::tempdir().unwrap();
    let store = SeriesStore::open(dir.path(), SeriesOptions::default()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(cores()).enable_all().build().unwrap();
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = (0..devices)
            .map(|d| {
                let (store, done, stop) = (store.clone(), done.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut a = Arma::new(d as u64 + 1, 45.0, 0.05);
                    let mut t = START;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let points: Vec<(i64, f64)> = (0..10)
                            .map(|_| {
                                t += 1_000;
                                (t, a.next_value())
                            })
                            .collect();
                        let key = format!("dev-{d}/humidity");
                        // submit blocks only while the writer's queue is full (the
                        // writer is its own thread, so a blocked worker is let go).
                        store.submit(vec![SeriesPoints { namespace: "sensor".into(), key, points }]).await.unwrap();
                        done.fetch_add(10, std::sync::atomic::Ordering::Relaxed);
                    }
                })
            })
            .collect();
        tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let points = done.load(std::sync::atomic::Ordering::Relaxed);
    let groups = store.counters.groups.load(std::sync::atomic::Ordering::Relaxed);
    row(
        "series store ingest: 10-point batches, durable (WAL fdatasync per group commit)",
        &format!("{:.0} points/s", points as f64 / elapsed),
        &format!(
            "{devices} concurrent submitters, {secs} s; {groups} group commits, {:.0} points/commit",
            points as f64 / groups.max(1) as f64
        ),
    );
    store.shutdown();
}

fn disk() {
    let series = env_or("TWINFLEET_BENCH_SERIES", 1_000) as usize;
    for (name, constant) in [("ARMA(4,3) humidity, 2 decimals", false), ("constant value", true)] {
        let dir = tempfile::tempdir().unwrap();
        let store = SeriesStore::open(dir.path(), SeriesOptions::default()).unwrap();
        fill(&store, "sensor", series, 86_400, 1_000, constant);
        store.checkpoint().unwrap();
        let seg = dir_bytes(&dir.path().join("sensor"));
        let points = series as f64 * 86_400.0;
        row(
            &format!("series store: bytes on disk per point, {name}, 1 Hz"),
            &format!("{:.3} B/point", seg as f64 / points),
            &format!("{series} series x 1 day, segment files after a checkpoint (index included); {seg} bytes"),
        );
        store.shutdown();
    }
}

fn query() {
    let dir = tempfile::tempdir().unwrap();
    let store = SeriesStore::open(dir.path(), SeriesOptions::default()).unwrap();
    fill(&store, "sensor", 1, 86_400, 1_000, false);
    store.checkpoint().unwrap();
    let (from, to) = (START, START + 86_400_000);
    let mut raw = Vec::new();
    let mut buckets = Vec::new();
    for _ in 0..9 {
        let t = Instant::now();
        let n = store.points("sensor", "dev-0/humidity", from, to).count();
        raw.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(n, 86_400);
        let t = Instant::now();
        let b = Downsample::new(store.points("sensor", "dev-0/humidity", from, to), 60_000).count();
        buckets.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(b, 1_440);
    }
    row(
        "series query: 1 day of 1 Hz, raw points",
        &format!("{:.2} ms", median(raw)),
        "86,400 points from segments, median of 9",
    );
    row(
        "series query: 1 day of 1 Hz, 1-minute buckets (min/max/avg/last/count)",
        &format!("{:.2} ms", median(buckets)),
        "1,440 buckets, median of 9",
    );
    store.shutdown();
}

/// Peak RSS (`VmHWM`), in bytes.
fn peak_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn year() {
    let dir = tempfile::tempdir().unwrap();
    let store = SeriesStore::open(dir.path(), SeriesOptions::default()).unwrap();
    let points = 365 * 8_640;
    fill(&store, "sensor", 1, points, 10_000, false);
    store.checkpoint().unwrap();
    // Reset the peak to now (Linux: writing 5 to clear_refs resets VmHWM).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = rss();
    let t = Instant::now();
    let n = store.points("sensor", "dev-0/humidity", i64::MIN, i64::MAX).count();
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let growth = peak_rss().saturating_sub(before);
    assert_eq!(n as i64, points);
    row(
        "series query: 1 year of one series (a point every 10 s), streamed",
        &format!("{:.1} MiB peak RSS growth", growth as f64 / 1_048_576.0),
        &format!("{n} points in {ms:.0} ms; the whole range raw would be {:.0} MiB", n as f64 * 16.0 / 1_048_576.0),
    );
    store.shutdown();
}

fn replay() {
    let points = env_or("TWINFLEET_BENCH_REPLAY_POINTS", 10_000_000) as i64;
    let series = 1_000usize;
    let dir = tempfile::tempdir().unwrap();
    let opts = SeriesOptions { checkpoint_wal_bytes: u64::MAX, ..SeriesOptions::default() };
    {
        let store = SeriesStore::open(dir.path(), opts).unwrap();
        fill(&store, "sensor", series, points / series as i64, 1_000, false);
        // As kill -9 leaves it: no checkpoint, the WAL holds every point.
        std::mem::forget(store);
    }
    let wal = dir_bytes(&dir.path().join("wal"));
    let t = Instant::now();
    let store = SeriesStore::open(dir.path(), opts).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let replayed = store.points("sensor", "dev-0/humidity", i64::MIN, i64::MAX).count();
    assert_eq!(replayed as i64, points / series as i64);
    row(
        "series store: WAL replay on open, 10M points not yet sealed",
        &format!("{secs:.2} s"),
        &format!("{points} points of {series} series, WAL {:.0} MiB", wal as f64 / 1_048_576.0),
    );
}
