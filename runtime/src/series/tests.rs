use super::*;

fn opts() -> SeriesOptions {
    SeriesOptions {
        partition_ms: 10_000,
        head_points: 50,
        checkpoint_wal_bytes: u64::MAX,
        queue_batches: 64,
        export_wal_bytes: 1 << 30,
    }
}

fn put(store: &SeriesStore, ns: &str, key: &str, points: Vec<(i64, f64)>) {
    store.submit(vec![SeriesPoints { namespace: ns.into(), key: key.into(), points }]).wait().unwrap();
}

fn all(store: &Arc<SeriesStore>, ns: &str, key: &str) -> Vec<(i64, f64)> {
    store.points(ns, key, i64::MIN, i64::MAX).collect()
}

/// Copies a data directory as it is now, as a crash would leave it (nothing flushed
/// beyond what the store synced itself).
fn crash_copy(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dst = to.join(e.file_name());
        if e.path().is_dir() {
            std::fs::create_dir_all(&dst).unwrap();
            crash_copy(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

#[test]
fn points_over_several_partitions_survive_checkpoints_and_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let expect: Vec<(i64, f64)> = (0..1_000).map(|i| (i * 137, (i % 17) as f64 / 4.0)).collect();
    {
        let s = SeriesStore::open(dir.path(), opts()).unwrap();
        for c in expect.chunks(33) {
            put(&s, "thermostat", "t1/temp", c.to_vec());
        }
        put(&s, "thermostat", "t2/temp", vec![(5, 1.0)]);
        assert_eq!(all(&s, "thermostat", "t1/temp"), expect, "from the heads and sealed chunks");
        s.checkpoint().unwrap();
        assert_eq!(all(&s, "thermostat", "t1/temp"), expect, "from segments");
        put(&s, "thermostat", "t1/temp", vec![(200_000, 9.0)]);
        s.shutdown();
    }
    let s = SeriesStore::open(dir.path(), opts()).unwrap();
    let mut with_last = expect.clone();
    with_last.push((200_000, 9.0));
    assert_eq!(all(&s, "thermostat", "t1/temp"), with_last);
    assert_eq!(all(&s, "thermostat", "t2/temp"), vec![(5, 1.0)]);
    // A range inside: several partitions (10 s each), ends included.
    let range: Vec<_> = s.points("thermostat", "t1/temp", 13_700, 54_800).collect();
    assert_eq!(range, expect.iter().copied().filter(|(t, _)| (13_700..=54_800).contains(t)).collect::<Vec<_>>());
    assert!(all(&s, "meter", "t1/temp").is_empty(), "namespaces are apart");
    let mut rev: Vec<_> = s.points_rev("thermostat", "t1/temp", 13_700, 54_800).collect();
    rev.reverse();
    assert_eq!(rev, range, "newest first, the same points");
    let parts = std::fs::read_dir(dir.path().join("thermostat")).unwrap().count();
    assert!(parts >= 13, "{parts} partition directories");
}

#[test]
fn acknowledged_points_replay_from_the_wal_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let s = SeriesStore::open(dir.path(), opts()).unwrap();
    let expect: Vec<(i64, f64)> = (0..500).map(|i| (i * 1_000, 20.0 + (i % 9) as f64 / 100.0)).collect();
    for c in expect.chunks(10) {
        put(&s, "valve", "v/pressure", c.to_vec());
    }
    crash_copy(dir.path(), crashed.path());
    // A torn record at the end, as a crash mid-append leaves it.
    let wal = std::fs::read_dir(crashed.path().join("wal")).unwrap().flatten().map(|e| e.path()).max().unwrap();
    let mut f = OpenOptions::new().append(true).open(&wal).unwrap();
    f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 5]).unwrap();
    drop(f);
    let r = SeriesStore::open(crashed.path(), opts()).unwrap();
    assert_eq!(all(&r, "valve", "v/pressure"), expect);
    assert_eq!(r.counters.wal_records_replayed.load(Relaxed), 50);
    // Appending after the replay works, and both survive a clean restart.
    put(&r, "valve", "v/pressure", vec![(600_000, 1.5)]);
    r.shutdown();
    let r = SeriesStore::open(crashed.path(), opts()).unwrap();
    assert_eq!(all(&r, "valve", "v/pressure").len(), 501);
    s.shutdown();
}

#[test]
fn late_points_merge_in_order_duplicates_are_dropped_and_the_last_write_wins() {
    let dir = tempfile::tempdir().unwrap();
    let s = SeriesStore::open(dir.path(), opts()).unwrap();
    put(&s, "ns", "k", vec![(1_000, 1.0), (2_000, 2.0), (4_000, 4.0)]);
    put(&s, "ns", "k", vec![(4_000, 4.0)]); // a redelivery
    put(&s, "ns", "k", vec![(3_000, 3.0), (2_000, 20.0)]); // late, and a new value for 2 s
    put(&s, "ns", "k", vec![(5_000, 5.0)]);
    let want = vec![(1_000, 1.0), (2_000, 20.0), (3_000, 3.0), (4_000, 4.0), (5_000, 5.0)];
    assert_eq!(all(&s, "ns", "k"), want);
    let rev: Vec<_> = s.points_rev("ns", "k", i64::MIN, i64::MAX).collect();
    assert_eq!(rev, want.iter().rev().copied().collect::<Vec<_>>());
    assert_eq!(s.counters.duplicates.load(Relaxed), 1);
    assert_eq!(s.counters.late.load(Relaxed), 2);
    s.checkpoint().unwrap();
    assert_eq!(all(&s, "ns", "k"), want, "the same from segments");
    // After the checkpoint the newer value still wins over the older one.
    put(&s, "ns", "k", vec![(3_000, 30.0)]);
    s.checkpoint().unwrap();
    s.shutdown();
    let s = SeriesStore::open(dir.path(), opts()).unwrap();
    assert_eq!(all(&s, "ns", "k")[2], (3_000, 30.0));
    assert_eq!(all(&s, "ns", "k").len(), 5);
}

#[test]
fn a_burst_at_one_timestamp_stays_in_one_chunk_and_its_last_value_wins() {
    // Devices that send no timestamp get their arrival time: several messages of one
    // device can land in the same millisecond. Those points are not late; they share
    // the head's chunk (once a point per chunk each, costing ~40 B of index apiece).
    let dir = tempfile::tempdir().unwrap();
    let s = SeriesStore::open(dir.path(), opts()).unwrap();
    put(&s, "ns", "k", vec![(1_000, 1.0)]);
    for i in 0..40 {
        put(&s, "ns", "k", vec![(2_000, i as f64)]);
    }
    put(&s, "ns", "k", vec![(3_000, 3.0)]);
    assert_eq!(s.counters.late.load(Relaxed), 0);
    let want = vec![(1_000, 1.0), (2_000, 39.0), (3_000, 3.0)];
    assert_eq!(all(&s, "ns", "k"), want);
    s.checkpoint().unwrap();
    assert_eq!(all(&s, "ns", "k"), want, "the same from segments");
    let rev: Vec<_> = s.points_rev("ns", "k", i64::MIN, i64::MAX).collect();
    assert_eq!(rev, want.iter().rev().copied().collect::<Vec<_>>());
    // One chunk of 42 points (head size 50): the segment is a few hundred bytes, not
    // 42 chunks with an index entry each.
    let seg = s.counters.segment_bytes.load(Relaxed);
    assert!(seg < 400, "{seg} bytes of segment for 42 points");
    s.shutdown();
}

#[test]
fn retention_drops_whole_partitions_and_refuses_older_points() {
    let dir = tempfile::tempdir().unwrap();
    let s = SeriesStore::open(dir.path(), opts()).unwrap();
    put(&s, "ns", "k", (0..40).map(|i| (i * 1_000, i as f64)).collect());
    put(&s, "other", "k", vec![(1_000, 1.0)]);
    s.checkpoint().unwrap();
    put(&s, "ns", "k", vec![(40_000, 40.0)]);
    // 25 s: partitions [0, 10 s) and [10 s, 20 s) go; [20 s, 30 s) holds the cutoff and stays.
    assert_eq!(s.drop_before("ns", 25_000), 2);
    assert!(!dir.path().join("ns").join("0").exists());
    assert!(!dir.path().join("ns").join("10000").exists());
    let left = all(&s, "ns", "k");
    assert_eq!(left.first(), Some(&(20_000, 20.0)));
    assert_eq!(left.len(), 21);
    put(&s, "ns", "k", vec![(19_999, 1.0), (20_000, 2.0)]);
    assert_eq!(s.counters.expired.load(Relaxed), 1);
    assert_eq!(all(&s, "other", "k"), vec![(1_000, 1.0)], "another namespace keeps its partitions");
    s.shutdown();
    let s = SeriesStore::open(dir.path(), opts()).unwrap();
    assert_eq!(all(&s, "ns", "k").first(), Some(&(20_000, 2.0)));
}

#[test]
fn a_corrupt_segment_is_skipped_and_the_rest_is_served() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = SeriesStore::open(dir.path(), opts()).unwrap();
        put(&s, "ns", "k", (0..30).map(|i| (i * 1_000, i as f64)).collect());
        s.checkpoint().unwrap();
        put(&s, "ns", "k", vec![(35_000, 35.0)]); // in the WAL only
        // No shutdown checkpoint: as after a crash (the writer thread is left idle).
        std::mem::forget(s);
    }
    // Truncate the middle partition's segment, garble a chunk of the first.
    let seg = |p: &str| std::fs::read_dir(dir.path().join("ns").join(p)).unwrap().flatten().next().unwrap().path();
    let mid = seg("10000");
    let len = std::fs::metadata(&mid).unwrap().len();
    OpenOptions::new().write(true).open(&mid).unwrap().set_len(len - 3).unwrap();
    let first = seg("0");
    let mut bytes = std::fs::read(&first).unwrap();
    bytes[12] ^= 0xFF;
    std::fs::write(&first, bytes).unwrap();
    let s = SeriesStore::open(dir.path(), opts()).unwrap();
    assert_eq!(s.counters.corrupt_segments.load(Relaxed), 1);
    let got = all(&s, "ns", "k");
    assert_eq!(s.counters.corrupt_chunks.load(Relaxed), 1);
    let want: Vec<(i64, f64)> = (20..30).map(|i| (i * 1_000, i as f64)).chain([(35_000, 35.0)]).collect();
    assert_eq!(got, want, "the third partition and the WAL's point");
}

#[test]
fn bad_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = SeriesStore::open(dir.path(), opts()).unwrap();
    let r = s.submit(vec![SeriesPoints { namespace: String::new(), key: "k".into(), points: vec![(1, 1.0)] }]).wait();
    assert_eq!(r, Err(SeriesError::BadName));
    // A namespace that is no safe file name still works, under an escaped directory.
    put(&s, "a/../b", "k", vec![(1, 1.0)]);
    s.checkpoint().unwrap();
    s.shutdown();
    let s = SeriesStore::open(dir.path(), opts()).unwrap();
    assert_eq!(all(&s, "a/../b", "k"), vec![(1, 1.0)]);
}

#[test]
fn a_deleted_series_never_comes_back_from_segments_or_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let s = SeriesStore::open(dir.path(), opts()).unwrap();
    put(&s, "ns", "twin-1 temp", vec![(1_000, 1.0)]);
    s.checkpoint().unwrap(); // in a segment
    put(&s, "ns", "twin-1 temp", vec![(2_000, 2.0)]); // in the WAL and a head
    put(&s, "ns", "twin-1 humidity", vec![(2_000, 50.0)]);
    put(&s, "ns", "twin-10 temp", vec![(2_000, 9.0)]);
    s.delete_series("ns", "twin-1 ").wait().unwrap();
    assert!(all(&s, "ns", "twin-1 temp").is_empty());
    assert!(all(&s, "ns", "twin-1 humidity").is_empty());
    assert_eq!(all(&s, "ns", "twin-10 temp"), vec![(2_000, 9.0)], "another twin whose id shares the prefix");
    // A re-created twin of the same id starts empty.
    put(&s, "ns", "twin-1 temp", vec![(3_000, 3.0)]);
    assert_eq!(all(&s, "ns", "twin-1 temp"), vec![(3_000, 3.0)]);
    crash_copy(dir.path(), crashed.path());
    let r = SeriesStore::open(crashed.path(), opts()).unwrap();
    assert_eq!(all(&r, "ns", "twin-1 temp"), vec![(3_000, 3.0)], "after a crash: the WAL replays only what came after");
    assert!(all(&r, "ns", "twin-1 humidity").is_empty());
    r.shutdown();
    s.shutdown();
    let s = SeriesStore::open(dir.path(), opts()).unwrap();
    assert_eq!(all(&s, "ns", "twin-1 temp"), vec![(3_000, 3.0)], "after a clean restart");
}

#[test]
fn checkpoints_by_wal_size_run_beside_appends_and_lose_nothing_across_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let copy = tempfile::tempdir().unwrap();
    let small = SeriesOptions { checkpoint_wal_bytes: 8 << 10, ..opts() };
    let keys: Vec<String> = (0..20).map(|k| format!("d{k} temp")).collect();
    let expect: Vec<(i64, f64)> = (0..400).map(|i| (i * 10, i as f64 / 8.0)).collect();
    {
        let s = SeriesStore::open(dir.path(), small).unwrap();
        for c in expect.chunks(10) {
            let batch = keys.iter().map(|k| SeriesPoints { namespace: "m".into(), key: k.clone(), points: c.to_vec() });
            s.submit(batch.collect()).wait().unwrap();
            // Every acknowledged point is readable at once, whatever the checkpoints do.
            assert_eq!(all(&s, "m", &keys[3]).last(), c.last());
        }
        assert!(s.counters.checkpoints.load(Relaxed) >= 2, "the WAL's size started checkpoints");
        for k in &keys {
            assert_eq!(all(&s, "m", k), expect, "{k} while running");
        }
        // As a crash would leave it: segments written so far and the WAL generations
        // not yet covered by them.
        crash_copy(dir.path(), copy.path());
        s.shutdown();
    }
    for d in [dir.path(), copy.path()] {
        let s = SeriesStore::open(d, small).unwrap();
        for k in &keys {
            assert_eq!(all(&s, "m", k), expect, "{k} after reopening {}", d.display());
        }
        s.shutdown();
    }
}

/// Everything read from `from` to the end, and where reading ended.
fn read_all(s: &SeriesStore, mut from: WalPosition) -> (Vec<(String, i64, f64)>, WalPosition, bool) {
    let mut out = Vec::new();
    let mut lost = false;
    loop {
        let r = s.read_wal(from, 7).unwrap();
        lost |= r.lost.is_some();
        for rec in &r.records {
            assert!(rec.at >= from && rec.next > rec.at);
            for sp in &rec.series {
                out.extend(sp.points.iter().map(|(t, v)| (sp.key.clone(), *t, *v)));
            }
        }
        if r.next == from && r.records.is_empty() {
            return (out, from, lost);
        }
        from = r.next;
    }
}

#[test]
fn the_wal_reads_in_append_order_across_checkpoints_and_restarts_while_held() {
    let dir = tempfile::tempdir().unwrap();
    let mut expect = Vec::new();
    let (start, middle);
    {
        let s = SeriesStore::open(dir.path(), opts()).unwrap();
        start = s.wal_end();
        s.hold_wal("export", start);
        for i in 0..30i64 {
            let key = format!("t{} temp", i % 3);
            put(&s, "meter", &key, vec![(1_000 - i, i as f64), (2_000 + i, 0.5)]);
            expect.push((key.clone(), 1_000 - i, i as f64));
            expect.push((key, 2_000 + i, 0.5));
            if i == 10 {
                s.checkpoint().unwrap();
            }
        }
        let (got, end, lost) = read_all(&s, start);
        assert_eq!(got, expect, "every point, in the order acknowledged, late ones too");
        assert!(!lost);
        assert_eq!(end, s.wal_end());
        middle = s.read_wal(start, 40).unwrap().next;
        s.shutdown(); // a checkpoint: the generations move to wal/done, held
    }
    let s = SeriesStore::open(dir.path(), opts()).unwrap();
    s.hold_wal("export", middle);
    put(&s, "meter", "t9 temp", vec![(5, 5.0)]);
    let (got, _, lost) = read_all(&s, start);
    assert!(!lost, "still kept: nothing has checkpointed since the hold moved");
    assert_eq!(got.len(), expect.len() + 1);
    let (from_middle, _, _) = read_all(&s, middle);
    assert_eq!(from_middle.last(), Some(&("t9 temp".to_string(), 5, 5.0)));
    assert_eq!(&from_middle[..from_middle.len() - 1], &expect[expect.len() + 1 - from_middle.len()..]);
    // After a checkpoint only what the hold needs is kept; a reader further back learns
    // it lost points.
    s.checkpoint().unwrap();
    let (got, _, lost) = read_all(&s, start);
    assert!(lost);
    assert!(got.len() >= from_middle.len() && got.len() < expect.len(), "from the oldest generation kept on");
    assert!(got.ends_with(&from_middle));
    // The store's own view is unchanged (the kept generations are not replayed again).
    s.shutdown();
    let s = SeriesStore::open(dir.path(), opts()).unwrap();
    assert_eq!(all(&s, "meter", "t0 temp").len(), 20);
    assert_eq!(s.counters.wal_records_replayed.load(Relaxed), 0);
}

#[test]
fn without_holds_checkpoints_keep_no_wal_and_the_cap_bounds_what_holds_keep() {
    let dir = tempfile::tempdir().unwrap();
    let s = SeriesStore::open(dir.path(), SeriesOptions { export_wal_bytes: 300, ..opts() }).unwrap();
    for i in 0..5 {
        put(&s, "meter", "t1 temp", vec![(i, 1.0)]);
        s.checkpoint().unwrap();
    }
    assert!(s.done_wal_files().is_empty(), "nobody holds: nothing kept");
    s.hold_wal("x", s.wal_end());
    for i in 5..40 {
        put(&s, "meter", "t1 temp", (0..4).map(|j| (i * 10 + j, 1.0)).collect());
        s.checkpoint().unwrap();
    }
    let kept: u64 = s.done_wal_files().iter().map(|(_, p)| std::fs::metadata(p).unwrap().len()).sum();
    assert!(kept <= 300, "kept {kept} bytes");
    assert!(s.counters.wal_export_dropped.load(Relaxed) > 0);
    s.release_wal("x");
    s.checkpoint().unwrap();
    assert!(s.done_wal_files().is_empty(), "released: nothing kept");
}

#[test]
fn an_encoded_batch_holds_what_was_pushed_and_refuses_bad_names_alone() {
    let mut b = SeriesBatch::new();
    b.push("ns", &["twin", " ", "m1"], [(1, 1.5), (2, f64::NAN)]).unwrap();
    // A key of a 128-byte twin id and a 128-byte metric fits.
    let (twin, metric) = ("t".repeat(128), "m".repeat(128));
    b.push("ns", &[&twin, " ", &metric], [(3, -0.0)]).unwrap();
    assert_eq!(b.push("", &["k"], [(1, 1.0)]), Err(SeriesError::BadName));
    assert_eq!(b.push("ns", &[&"k".repeat(513)], [(1, 1.0)]), Err(SeriesError::BadName));
    assert_eq!(b.push("ns", &[], [(1, 1.0)]), Err(SeriesError::BadName));
    assert_eq!((b.series(), b.points()), (2, 3), "a refused series adds nothing");
    let got = b.to_series();
    assert_eq!(got[0].key, "twin m1");
    assert_eq!(got[0].points[0], (1, 1.5));
    assert!(got[0].points[1].1.is_nan());
    assert_eq!(got[1].key.len(), 257);
    assert_eq!(got[1].points[0].1.to_bits(), (-0.0f64).to_bits());
    // Appended batches keep their series in order; the store takes them as one.
    let mut all = SeriesBatch::new();
    all.append(&b);
    all.append(&b);
    assert_eq!((all.series(), all.points()), (4, 6));
    let dir = tempfile::tempdir().unwrap();
    let s = SeriesStore::open(dir.path(), opts()).unwrap();
    s.submit_batch(all).wait().unwrap();
    // Again at the newest timestamp with the same value is a duplicate (dropped); again
    // before it is a late point (kept, the later write winning in queries).
    assert_eq!(s.counters.points.load(Relaxed), 4);
    assert_eq!(s.counters.duplicates.load(Relaxed), 2);
    assert_eq!(s.counters.late.load(Relaxed), 1);
    s.shutdown();
    // And the WAL replays them.
    let s = SeriesStore::open(dir.path(), opts()).unwrap();
    assert_eq!(s.points("ns", &format!("{twin} {metric}"), 0, 10).collect::<Vec<_>>().len(), 1);
    assert_eq!(s.points("ns", "twin m1", 0, 10).count(), 2);
}

#[test]
fn a_written_batch_lends_its_buffer_to_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let s = SeriesStore::open(dir.path(), opts()).unwrap();
    let mut b = s.batch(100_000);
    b.push("ns", &["k"], (0..5_000).map(|i| (i, 1.0))).unwrap();
    let (ptr, cap) = (b.bytes.as_ptr(), b.bytes.capacity());
    s.submit_batch(b).wait().unwrap();
    let again = s.batch(10);
    assert!(again.is_empty() && again.bytes.is_empty());
    assert_eq!((again.bytes.as_ptr(), again.bytes.capacity()), (ptr, cap), "the same buffer, emptied");
    // A small one is not kept.
    let mut small = s.batch(0);
    small.push("ns", &["k"], [(9_000, 2.0)]).unwrap();
    s.submit_batch(small).wait().unwrap();
    assert_eq!(s.batch(0).bytes.capacity(), 0);
    assert_eq!(s.points("ns", "k", 0, 10_000).count(), 5_001);
}

#[test]
fn the_newest_points_replay_reach_the_sink_at_a_checkpoint_and_go_with_a_deletion() {
    let dir = tempfile::tempdir().unwrap();
    let s = SeriesStore::open(dir.path(), opts()).unwrap();
    put(&s, "meter", "a temp", vec![(10, 1.0), (30, 3.0), (20, 2.0)]);
    put(&s, "meter", "a temp", vec![(30, 3.5)]);
    put(&s, "meter", "b temp", vec![(5, 0.5)]);
    assert_eq!(s.last_point("meter", "a temp"), Some((30, 3.5)), "the newest; of equal times the last written");
    assert_eq!(s.last_point("other", "a temp"), None);

    // A crash: the WAL brings them back.
    let crashed = tempfile::tempdir().unwrap();
    crash_copy(dir.path(), crashed.path());
    let r = SeriesStore::open(crashed.path(), opts()).unwrap();
    let mut replayed: Vec<(String, i64, f64)> = r.last_points().into_iter().map(|p| (p.key, p.at, p.value)).collect();
    replayed.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(replayed, vec![("a temp".into(), 30, 3.5), ("b temp".into(), 5, 0.5)]);
    r.shutdown();

    // A failing sink: the checkpoint fails, the points are still answered and offered
    // again; a working one takes them.
    let calls: Arc<Mutex<Vec<Vec<LastPoint>>>> = Arc::default();
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (c, f) = (calls.clone(), fail.clone());
    s.set_last_sink(Box::new(move |points| {
        c.lock().push(points.to_vec());
        if f.load(Relaxed) { Err("disk full".into()) } else { Ok(()) }
    }));
    assert!(s.checkpoint().is_err());
    assert_eq!(s.last_point("meter", "a temp"), Some((30, 3.5)), "kept after the heads were sealed");
    put(&s, "meter", "b temp", vec![(1, 0.1)]);
    assert_eq!(s.last_point("meter", "b temp"), Some((5, 0.5)), "a late point is not the newest");
    fail.store(false, Relaxed);
    s.checkpoint().unwrap();
    let last = calls.lock().last().unwrap().clone();
    let mut got: Vec<(String, i64, f64)> = last.into_iter().map(|p| (p.key, p.at, p.value)).collect();
    got.sort_by(|x, y| x.0.cmp(&y.0).then(x.1.cmp(&y.1)));
    // b's newest is at 5: the sink keeps the newer of what it gets and what it has.
    assert_eq!(got, vec![("a temp".into(), 30, 3.5), ("b temp".into(), 1, 0.1), ("b temp".into(), 5, 0.5)]);
    assert_eq!(s.last_point("meter", "a temp"), None, "the sink has it");
    assert!(s.last_points().is_empty());

    // A deleted twin's newest points go with its series, also from the WAL.
    put(&s, "meter", "a temp", vec![(40, 4.0)]);
    put(&s, "meter", "b temp", vec![(40, 4.0)]);
    s.delete_series("meter", "a ").wait().unwrap();
    assert_eq!(s.last_point("meter", "a temp"), None);
    let crashed = tempfile::tempdir().unwrap();
    crash_copy(dir.path(), crashed.path());
    let r = SeriesStore::open(crashed.path(), opts()).unwrap();
    assert_eq!(r.last_point("meter", "a temp"), None);
    assert_eq!(r.last_point("meter", "b temp"), Some((40, 4.0)));
    r.shutdown();
    s.shutdown();
}
