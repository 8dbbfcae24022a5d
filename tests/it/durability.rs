//! What is acknowledged as stored survives a SIGKILL; a restart restores every twin,
//! its memberships and its journal; a corrupt record is quarantined while the rest
//! starts.

use crate::support::*;
use serde_json::json;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use twinfleet::TwinError;
use twinfleet::models::{AlertKind, EventKind};
use twinfleet_actors::spaces;
use twinfleet_runtime::{SledOptions, SledStorage, Storage, WriteBatch};

const CHILD_ENV: &str = "TWINFLEET_TEST_CRASH_CHILD_DIR";
const WRITERS: usize = 32;

/// Not a test on its own: the child process of `acknowledged_writes_survive_sigkill`.
/// Without the environment variable it returns at once.
#[actix_rt::test]
async fn child_writer() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let p = start(std::path::Path::new(&dir), None, test_settings()).await;
    fleet(&p, "meter", json!({}), "w", WRITERS, |_| vec![]).await;
    println!("READY");
    let tasks: Vec<_> = (0..WRITERS)
        .map(|t| {
            let h = p.twin(&format!("w-{t}")).unwrap();
            actix_rt::spawn(async move {
                for n in 1u64.. {
                    let seq = h.report(obj(json!({"n": n}))).await.expect("write acknowledged");
                    // Printed only after the acknowledgement, i.e. after the flush.
                    println!("ACK w-{t} {n} {seq}");
                }
            })
        })
        .collect();
    futures::future::join_all(tasks).await;
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "durability::child_writer", "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("child starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // twin → (highest acknowledged n, its sequence number)
    let mut acked: HashMap<String, (u64, u64)> = HashMap::new();
    let mut acks = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while acks < 3_000 {
        assert!(Instant::now() < deadline, "child produced only {acks} acknowledgements");
        let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) else { panic!("child went silent after {acks} acks") };
        let parts: Vec<&str> = line.split_whitespace().collect();
        if let ["ACK", twin, n, seq] = parts[..] {
            let (n, seq): (u64, u64) = (n.parse().unwrap(), seq.parse().unwrap());
            let e = acked.entry(twin.to_string()).or_default();
            *e = (*e).max((n, seq));
            acks += 1;
        }
    }
    // In the middle of writes: every writer has more in flight.
    child.kill().expect("SIGKILL"); // Child::kill sends SIGKILL on Unix.
    child.wait().unwrap();
    // Lines already read before the kill count too; later ones were never acked to us.
    while let Ok(line) = rx.try_recv() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        if let ["ACK", twin, n, seq] = parts[..] {
            let (n, seq): (u64, u64) = (n.parse().unwrap(), seq.parse().unwrap());
            let e = acked.entry(twin.to_string()).or_default();
            *e = (*e).max((n, seq));
        }
    }
    assert_eq!(acked.len(), WRITERS, "every writer was acknowledged at least once");

    actix_rt::System::new().block_on(async {
        let p = start(dir.path(), None, test_settings()).await;
        assert_eq!(p.restore_report().twins, WRITERS);
        assert!(p.restore_report().quarantined.is_empty(), "{:?}", p.restore_report().quarantined);
        for (twin, (n, seq)) in &acked {
            let view = p.twin(twin).unwrap().get().await.unwrap();
            let stored = view.state.reported["n"].as_u64().unwrap();
            assert!(stored >= *n, "{twin}: acknowledged n={n} but only n={stored} survived");
            assert!(
                view.state.last_seq >= *seq,
                "{twin}: acknowledged seq {seq}, journal ends at {}",
                view.state.last_seq
            );
            let events = p.twin(twin).unwrap().events(5_000).await.unwrap();
            assert!(events.iter().any(|e| e.seq == *seq), "{twin}: journal entry {seq} lost");
        }
        p.shutdown().await;
    });
}

#[actix_rt::test]
async fn a_restart_restores_twins_memberships_and_journal() {
    let dir = tempfile::tempdir().unwrap();
    let n = 5_000;
    {
        let p = start(dir.path(), None, test_settings()).await;
        p.create_dta(twinfleet::DtaSpec {
            id: did("site-a"),
            name: "Site A".into(),
            parents: vec![],
            layers: Default::default(),
        })
        .await
        .unwrap();
        fleet(&p, "meter", json!({"interval": 60}), "m", n, |i| if i % 2 == 0 { vec![did("site-a")] } else { vec![] })
            .await;
        let t = p.twin("m-10").unwrap();
        t.report(obj(json!({"kwh": 12.5}))).await.unwrap();
        t.set_desired(obj(json!({"interval": 30}))).await.unwrap();
        t.command(twinfleet::models::TwinCommand::UpdateMetadata(twinfleet::models::Metadata {
            location: Some("Stellenbosch, lab 3".into()),
            tags: vec!["pilot".into()],
            ..Default::default()
        }))
        .await
        .unwrap();
        p.shutdown().await;
    }
    let p = start(dir.path(), None, test_settings()).await;
    let r = p.restore_report();
    assert_eq!((r.twins, r.dtas, r.device_types, r.quarantined.len()), (n, 1, 1, 0));
    let v = p.twin("m-10").unwrap().get().await.unwrap();
    assert_eq!(v.state.reported, obj(json!({"kwh": 12.5})));
    assert_eq!(v.state.desired, obj(json!({"interval": 30})));
    assert_eq!(v.state.metadata.location.as_deref(), Some("Stellenbosch, lab 3"));
    assert_eq!(v.state.memberships, vec![did("site-a")]);
    assert_eq!(v.state.identity.serial, "SN00000010");
    let kinds: Vec<&str> = p
        .twin("m-10")
        .unwrap()
        .events(10)
        .await
        .unwrap()
        .iter()
        .map(|e| match e.kind {
            EventKind::Reported { .. } => "reported",
            EventKind::DesiredSet { .. } => "desired",
            EventKind::MetadataUpdated { .. } => "metadata",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, vec!["reported", "desired", "metadata"]);
    assert_eq!(p.twin("m-4999").unwrap().get().await.unwrap().state.identity.mac, "02:00:00:00:13:87");
    assert_eq!(p.dta("site-a").unwrap().info().members, n / 2);
    assert_eq!(p.device_type("meter").unwrap().info().twins, n);
    p.shutdown().await;
}

#[actix_rt::test]
async fn a_corrupt_record_quarantines_that_twin_and_the_others_start() {
    let dir = tempfile::tempdir().unwrap();
    {
        let p = start(dir.path(), None, test_settings()).await;
        fleet(&p, "plug", json!({}), "q", 10, |_| vec![]).await;
        p.twin("q-3").unwrap().report(obj(json!({"on": true}))).await.unwrap();
        p.twin("q-4").unwrap().report(obj(json!({"on": false}))).await.unwrap();
        p.shutdown().await;
    }
    {
        // Truncate q-3's event in its journal page (its change is not in a snapshot
        // yet), as a torn write would.
        let s = SledStorage::open(dir.path(), SledOptions::default()).unwrap();
        assert!(s.get(spaces::SNAPSHOT, b"q-3").unwrap().is_none(), "one change writes no snapshot");
        let page = s.get(spaces::TAIL, b"q-3").unwrap().expect("the tail marker names the change's page");
        let part = [&page[..], &[0u8, 0][..]].concat(); // the page's first (and only) part
        let rec = s.get(spaces::JOURNAL_PAGE, &part).unwrap().expect("the change is in a journal page");
        let mut rewritten = Vec::new();
        for item in twinfleet_runtime::page_items(&rec) {
            let mut item = item.unwrap().to_vec();
            if item[2..].starts_with(b"q-3") {
                item.truncate(item.len() - 3);
            }
            rewritten.extend_from_slice(&(item.len() as u32).to_le_bytes());
            rewritten.extend_from_slice(&item);
        }
        let mut b = WriteBatch::new();
        b.put(spaces::JOURNAL_PAGE, part, rewritten);
        s.submit(b).await.unwrap();
        s.shutdown();
    }
    let p = start(dir.path(), None, test_settings()).await;
    let r = p.restore_report();
    assert_eq!(r.twins, 9);
    assert_eq!(r.quarantined.len(), 1);
    assert_eq!(r.quarantined[0].twin.as_deref(), Some("q-3"));
    assert!(r.quarantined[0].reason.contains("checksum"), "{}", r.quarantined[0].reason);
    assert!(matches!(p.twin("q-3"), Err(TwinError::Quarantined { .. })));
    assert_eq!(p.twin("q-4").unwrap().get().await.unwrap().state.reported, obj(json!({"on": false})));
    assert!(p.alerts().recent().iter().any(|a| a.kind == AlertKind::Quarantined && a.message.contains("q-3")));
    // The quarantined id cannot be reused while its record is on disk.
    let err = p.device_type("plug").unwrap().spawn_fleet(vec![twinfleet::TwinSpec::new(tid("q-3"))]).await.unwrap_err();
    assert!(matches!(err, TwinError::AlreadyExists { .. }));
    p.shutdown().await;
}

/// Every file under `dir` with its mode, for the messages below.
fn modes(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = vec![(dir.to_path_buf(), std::fs::metadata(dir).unwrap().permissions().mode() & 0o777)];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(modes(&e.path()));
        } else {
            out.push((e.path(), e.metadata().unwrap().permissions().mode() & 0o777));
        }
    }
    out
}

#[actix_rt::test]
async fn the_data_directory_is_for_its_owner_only() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("data");
    let p = start(&dir, None, test_settings()).await;
    fleet(&p, "lamp", json!({}), "l", 10, |_| vec![]).await;
    p.twin("l-0").unwrap().report(obj(json!({"on": true}))).await.unwrap();
    p.issue_device_token("l-1").await.unwrap();
    for (path, mode) in modes(&dir) {
        let want = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{} is {mode:o}", path.display());
    }
    p.shutdown().await;
}

#[actix_rt::test]
async fn a_partial_snapshot_left_by_a_failed_start_does_not_block_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), None, test_settings()).await;
    fleet(&p, "lamp", json!({}), "l", 3, |_| vec![]).await;
    p.shutdown().await;
    // What a start on a full disk leaves behind: sled's snapshot, never completed.
    std::fs::write(dir.path().join("db").join("snap.00000000000000FF.generating"), b"").unwrap();
    let p = start(dir.path(), None, test_settings()).await;
    assert_eq!(p.twin("l-2").unwrap().get().await.unwrap().state.identity.twin_id.as_str(), "l-2");
    assert!(!dir.path().join("db").join("snap.00000000000000FF.generating").exists());
    p.shutdown().await;
}

#[actix_rt::test]
async fn a_job_interrupted_by_a_stop_resumes_and_reports_exactly_what_it_did() {
    use twinfleet::{Generate, JobSpec, JobState};
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), None, test_settings()).await;
    fleet(&p, "crate", json!({}), "seed", 1, |_| vec![]).await;
    let token = admin_token(&p).await;
    let admin = p.access().authenticate(&token).unwrap();
    let generate = Generate { prefix: "j-".into(), count: 20_000, start: 0, dtas: vec![], tags: vec![] };
    let spec = JobSpec::CreateTwins { device_type: "crate".parse().unwrap(), twins: vec![], generate: Some(generate) };
    let job = p.submit_job(&admin, spec).await.unwrap();
    // Stop at once: the job is still running (a kill leaves the same records behind).
    p.shutdown().await;

    let p = start(dir.path(), None, test_settings()).await;
    let restored = p.restore_report().twins;
    assert!(restored < 20_001, "the stop interrupted the job: it had created {} of 20,000 twins", restored - 1);
    let done = eventually("the resumed job finishes", || async {
        p.jobs().get(job.id).filter(|j| j.state != JobState::Running)
    })
    .await;
    assert_eq!((done.state, done.done, done.failed, done.total), (JobState::Succeeded, 20_000, 0, 20_000), "{done:?}");
    assert!(done.errors.is_empty(), "{done:?}");
    for i in [0, 9_999, 19_999] {
        p.twin(&format!("j-{i}")).expect("created once, by the job and its resumption");
    }
    assert_eq!(p.device_type("crate").unwrap().info().twins, 20_001);
    p.shutdown().await;

    // Done is done: a third start does not run it again.
    let p = start(dir.path(), None, test_settings()).await;
    assert_eq!(p.jobs().get(job.id).unwrap().state, JobState::Succeeded);
    p.shutdown().await;
}

#[actix_rt::test]
async fn a_change_writes_its_event_the_snapshot_comes_every_n_events_or_when_idle_and_restore_replays_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings();
    settings.snapshot_every = 4;
    settings.snapshot_idle_ms = 60_000;
    let p = start(dir.path(), None, settings.clone()).await;
    fleet(&p, "gauge", json!({}), "s", 1, |_| vec![]).await;
    let twin = p.twin("s-0").unwrap();
    let storage = p.storage().clone();
    let snapshot_seq = |s: &std::sync::Arc<dyn Storage>| {
        s.get(spaces::SNAPSHOT, b"s-0")
            .unwrap()
            .map(|b| twinfleet_runtime::decode_record::<twinfleet::models::TwinState>(&b).unwrap().last_seq)
    };
    for n in 1..=3 {
        twin.report(obj(json!({ "n": n }))).await.unwrap();
    }
    assert_eq!(snapshot_seq(&storage), None, "three changes wrote three events and no snapshot");
    assert!(storage.get(spaces::TAIL, b"s-0").unwrap().is_some(), "the tail marker says a restart must replay");
    twin.report(obj(json!({ "n": 4 }))).await.unwrap();
    assert_eq!(snapshot_seq(&storage), Some(4), "the fourth event brings the snapshot");
    assert!(storage.get(spaces::TAIL, b"s-0").unwrap().is_none());
    for n in 5..=6 {
        twin.report(obj(json!({ "n": n }))).await.unwrap();
    }
    p.shutdown().await;

    // Restore: snapshot (4 events) + the journal's tail (2 events).
    let p = start(dir.path(), None, settings.clone()).await;
    let view = p.twin("s-0").unwrap().get().await.unwrap();
    assert_eq!((view.state.reported["n"].as_i64(), view.state.last_seq), (Some(6), 6));
    let events = p.twin("s-0").unwrap().events(10).await.unwrap();
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
    p.shutdown().await;

    // An idle twin writes its snapshot by itself.
    settings.snapshot_idle_ms = 20;
    let p = start(dir.path(), None, settings.clone()).await;
    let storage = p.storage().clone();
    eventually("the idle twin writes its snapshot", || async { (snapshot_seq(&storage) == Some(6)).then_some(()) })
        .await;
    assert!(storage.get(spaces::TAIL, b"s-0").unwrap().is_none());
    // The pages that held 5 and 6 are no longer needed: a pass (this one, or the
    // background one every 2 s) deletes them.
    p.compact_journals().await.unwrap();
    assert_eq!(storage.scan(spaces::JOURNAL_PAGE, b"").count(), 0, "no page is left that no twin needs");
    let events = p.twin("s-0").unwrap().events(10).await.unwrap();
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6], "history is whole");
    p.shutdown().await;

    // A pending tail keeps its pages: a restart after the pass still replays it.
    settings.snapshot_idle_ms = 60_000;
    let p = start(dir.path(), None, settings.clone()).await;
    p.twin("s-0").unwrap().report(obj(json!({ "n": 7 }))).await.unwrap();
    let r = p.compact_journals().await.unwrap();
    assert_eq!(r.pages_deleted, 0, "the page of 7 is named by the tail marker");
    p.shutdown().await;
    let p = start(dir.path(), None, settings).await;
    let view = p.twin("s-0").unwrap().get().await.unwrap();
    assert_eq!((view.state.reported["n"].as_i64(), view.state.last_seq), (Some(7), 7));
    p.shutdown().await;
}

#[actix_rt::test]
async fn journal_retention_drops_old_events_but_never_the_unsnapshotted_tail() {
    let dir = tempfile::tempdir().unwrap();
    let clock = virtual_clock();
    let mut settings = test_settings();
    settings.snapshot_every = 8;
    settings.snapshot_idle_ms = 3_600_000;
    settings.compaction_interval_ms = 0;
    let p = start(dir.path(), Some(clock.clone()), settings.clone()).await;
    let spec = twinfleet::DeviceTypeSpec {
        id: "counter".parse().unwrap(),
        model: "C-1".into(),
        defaults: Default::default(),
        domain: None,
        journal: twinfleet::models::JournalRetention { keep_events: Some(5), max_age_ms: Some(3_600_000) },
        history: Default::default(),
        provisioning: None,
        metrics: None,
    };
    p.create_device_type(spec).await.unwrap().spawn_fleet(vec![twinfleet::TwinSpec::new(tid("c-0"))]).await.unwrap();
    fleet(&p, "keeper", json!({}), "k", 1, |_| vec![]).await;
    let (twin, keeper) = (p.twin("c-0").unwrap(), p.twin("k-0").unwrap());
    for n in 1..=20 {
        twin.report(obj(json!({ "n": n }))).await.unwrap();
        keeper.report(obj(json!({ "n": n }))).await.unwrap();
    }
    // Snapshots at 8 and 16, each with its interval's history record (1..8, 9..16);
    // 17..20 are the tail. Keep 5 would drop 1..15, all covered: whole records only, so
    // 1..8 go and 9..16 stay (a record holds one snapshot interval).
    let r = p.compact_journals().await.unwrap();
    assert_eq!((r.twins, r.events_deleted), (1, 8), "only the type with a retention is compacted");
    let seqs = |evs: Vec<twinfleet::models::TwinEvent>| evs.iter().map(|e| e.seq).collect::<Vec<_>>();
    assert_eq!(seqs(twin.events(100).await.unwrap()), (9..=20).collect::<Vec<_>>());
    assert_eq!(keeper.events(100).await.unwrap().len(), 20, "unbounded journals are untouched");

    // Old events go by age too, except the tail the snapshot does not cover yet.
    clock.advance(2 * 3_600_000);
    twin.report(obj(json!({ "n": 21 }))).await.unwrap();
    let r = p.compact_journals().await.unwrap();
    assert_eq!(r.events_deleted, 8, "9..16 are covered and old; 17..20 are old but only in the tail");
    assert_eq!(seqs(twin.events(100).await.unwrap()), (17..=21).collect::<Vec<_>>());
    p.shutdown().await;

    let p = start(dir.path(), Some(clock), settings).await;
    let view = p.twin("c-0").unwrap().get().await.unwrap();
    assert_eq!((view.state.reported["n"].as_i64(), view.state.last_seq), (Some(21), 21), "snapshot + tail intact");
    p.shutdown().await;
}

#[actix_rt::test]
async fn a_data_directory_of_before_the_journal_pages_restores_its_per_event_tail() {
    use twinfleet::models::{Timestamp, TwinEvent};
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), None, test_settings()).await;
    fleet(&p, "valve", json!({}), "v", 1, |_| vec![]).await;
    p.shutdown().await;
    {
        // What an older version left: a per-event journal record (JSON, format 1)
        // after the stored state, and an empty tail marker.
        let s = SledStorage::open(dir.path(), SledOptions::default()).unwrap();
        let event =
            TwinEvent { seq: 1, at: Timestamp(1_000), kind: EventKind::Reported { patch: obj(json!({"open": true})) } };
        let mut b = WriteBatch::new();
        b.put(spaces::JOURNAL, [&b"v-0\0"[..], &1u64.to_be_bytes()].concat(), twinfleet_runtime::encode_record(&event));
        b.put(spaces::TAIL, "v-0", Vec::new());
        s.submit(b).await.unwrap();
        s.shutdown();
    }
    let p = start(dir.path(), None, test_settings()).await;
    assert!(p.restore_report().quarantined.is_empty(), "{:?}", p.restore_report().quarantined);
    let twin = p.twin("v-0").unwrap();
    let view = twin.get().await.unwrap();
    assert_eq!(
        (view.state.reported["open"].clone(), view.state.last_seq),
        (json!(true), 1),
        "the old tail is replayed"
    );
    // A change now goes to the pages; both survive the next restart, in order.
    twin.report(obj(json!({"open": false}))).await.unwrap();
    p.shutdown().await;
    let p = start(dir.path(), None, test_settings()).await;
    let twin = p.twin("v-0").unwrap();
    let view = twin.get().await.unwrap();
    assert_eq!((view.state.reported["open"].clone(), view.state.last_seq), (json!(false), 2));
    let seqs: Vec<u64> = twin.events(10).await.unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2]);
    p.shutdown().await;
}

/// A clean stop records how large the directory was (twins, each DTA's members), and the
/// next start sizes its maps from it; a hint that does not decode sizes nothing and
/// stops nothing.
#[actix_rt::test]
async fn a_clean_stop_leaves_size_hints_that_a_start_reads_and_survives_garbage_and_absurd_sizes() {
    let dir = tempfile::tempdir().unwrap();
    {
        let p = start(dir.path(), None, test_settings()).await;
        p.create_dta(twinfleet::DtaSpec {
            id: did("hall"),
            name: "Hall".into(),
            parents: vec![],
            layers: Default::default(),
        })
        .await
        .unwrap();
        fleet(&p, "plug", json!({}), "h", 300, |i| if i % 3 == 0 { vec![did("hall")] } else { vec![] }).await;
        p.shutdown().await;
    }
    {
        let s = SledStorage::open(dir.path(), SledOptions::default()).unwrap();
        let raw = s.get(spaces::META, b"size-hints").unwrap().expect("written at the clean stop");
        let hints: serde_json::Value = twinfleet_runtime::decode_record(&raw).unwrap();
        assert_eq!(hints["twins"], 300, "{hints}");
        assert_eq!(hints["dta_members"]["hall"], 100, "{hints}");
        // Garbage in the hint's place.
        let mut b = WriteBatch::new();
        b.put(spaces::META, b"size-hints".to_vec(), b"\x01not a record".to_vec());
        s.submit(b).await.unwrap();
        s.shutdown();
    }
    let p = start(dir.path(), None, test_settings()).await;
    assert_eq!(p.restore_report().twins, 300);
    assert_eq!(p.dta("hall").unwrap().info().members, 100);
    p.shutdown().await;
    // A well-formed record with absurd sizes (written by hand) allocates within a bound.
    {
        let s = SledStorage::open(dir.path(), SledOptions::default()).unwrap();
        let absurd = json!({"twins": 1u64 << 50, "dta_members": {"hall": 1u64 << 50}});
        let mut b = WriteBatch::new();
        b.put(spaces::META, b"size-hints".to_vec(), twinfleet_runtime::encode_record(&absurd));
        s.submit(b).await.unwrap();
        s.shutdown();
    }
    let p = start(dir.path(), None, test_settings()).await;
    assert_eq!(p.restore_report().twins, 300);
    p.shutdown().await;
}
