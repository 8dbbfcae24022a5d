//! Fleet benchmarks: spawning a million twins, request/reply through the public handle,
//! and restart recovery, against a baseline of bare actix actors in the same run.
//!
//! `cargo bench --bench fleet` runs every section, each in a child process of its own so
//! that one section's memory does not hide in the next one's RSS. Each section prints
//! table rows with the machine's core count. `TWINFLEET_BENCH_TWINS` changes the fleet
//! size (default 1,000,000); `TWINFLEET_BENCH_REPEAT` the repetitions of the timed
//! request loops (default 3, the median is reported); `TWINFLEET_BENCH_SECTIONS` picks
//! sections (`bare,fleet,restart`); `TWINFLEET_BENCH_SPAWN_ONLY=1` stops the fleet section
//! after the spawn, for profiling.
//!
//! `restart` restarts the data directory the `fleet` section left behind in a new
//! process, as an operator's restart of the binary does: `TWINFLEET_BENCH_RESTARTS`
//! times (default 3), each a process of its own, each timed from the process's start
//! until every twin has answered. It needs `fleet` before it in the same run.

use actix::prelude::*;
use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};
use twinfleet::models::{DeviceTypeId, DtaId, TwinId};
use twinfleet::{DeviceTypeSpec, DtaSpec, Platform, TwinHandle, TwinSpec};

mod common;
use common::{cores, cpu_user_system_ms, env_or, median, pct, rss};

// The same allocator as the `twinfleet` binary (see src/main.rs for why).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TYPES: [&str; 3] = ["thermostat", "meter", "valve"];
const SITES: usize = 100;
const REGIONS: usize = 7;

fn twins() -> usize {
    env_or("TWINFLEET_BENCH_TWINS", 1_000_000) as usize
}

fn repeat() -> usize {
    env_or("TWINFLEET_BENCH_REPEAT", 3) as usize
}

fn row(bench: &str, n: usize, value: &str, extra: &str) {
    println!("| {bench} | {n} | {} | {value} | {extra} |", cores());
}

fn main() {
    PROCESS_START.get_or_init(Instant::now);
    // As the `twinfleet` binary does at its start (see twinfleet::memory).
    twinfleet::memory::disable_transparent_huge_pages().expect("prctl(PR_SET_THP_DISABLE)");
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--section") {
        let section = args[i + 1].clone();
        actix_rt::System::new().block_on(run_section(&section));
        return;
    }
    println!("| benchmark | twins | cores | result | detail |");
    println!("|---|---|---|---|---|");
    // The fleet's data directory, shared by `fleet` (which makes it) and `restart`.
    let dir = std::env::temp_dir().join(format!("twinfleet-bench-{}", std::process::id()));
    let sections = std::env::var("TWINFLEET_BENCH_SECTIONS").unwrap_or("bare,fleet,restart".into());
    let sections: Vec<&str> = sections.split(',').collect();
    let keep = sections.contains(&"restart");
    for section in &sections {
        let times = if *section == "restart" { env_or("TWINFLEET_BENCH_RESTARTS", 3) } else { 1 };
        for _ in 0..times {
            let status = Command::new(std::env::current_exe().unwrap())
                .args(["--section", section])
                .env("TWINFLEET_BENCH_DIR", &dir)
                .env("TWINFLEET_BENCH_KEEP_DIR", if keep { "1" } else { "" })
                .status()
                .expect("section runs");
            assert!(status.success(), "section {section} failed");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn bench_dir() -> std::path::PathBuf {
    std::env::var_os("TWINFLEET_BENCH_DIR")
        .map(Into::into)
        .unwrap_or_else(|| std::env::temp_dir().join(format!("twinfleet-bench-{}", std::process::id())))
}

async fn run_section(section: &str) {
    match section {
        "bare" => bare_actors().await,
        "fleet" => fleet().await,
        "restart" => restart_in_new_process().await,
        other => panic!("unknown section {other}"),
    }
}

/// Baseline: the same number of empty actix actors with the same mailbox bound, spread
/// over one arbiter per core.
struct Bare;

impl Actor for Bare {
    type Context = Context<Self>;
}

async fn bare_actors() {
    let n = twins();
    let arbiters: Vec<Arbiter> = (0..cores()).map(|_| Arbiter::new()).collect();
    let rss0 = rss();
    let started = Instant::now();
    let mut done = Vec::new();
    for (i, a) in arbiters.iter().enumerate() {
        let share = n / arbiters.len() + usize::from(i < n % arbiters.len());
        let (tx, rx) = tokio::sync::oneshot::channel();
        a.spawn_fn(move || {
            let addrs: Vec<Addr<Bare>> = (0..share)
                .map(|_| {
                    Bare::create(|ctx| {
                        ctx.set_mailbox_capacity(32);
                        Bare
                    })
                })
                .collect();
            // Keep the addresses alive (as a registry would) and hand back the count.
            let _ = tx.send(addrs.len());
            std::mem::forget(addrs);
        });
        done.push(rx);
    }
    let mut total = 0;
    for rx in done {
        total += rx.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let per = (rss() - rss0) as f64 / total as f64;
    row(
        "baseline: spawn bare actix actors",
        total,
        &format!("{secs:.2} s"),
        &format!("{:.0} actors/s, {per:.0} B RSS/actor", total as f64 / secs),
    );
}

fn specs(n: usize) -> Vec<Vec<TwinSpec>> {
    let mut per_type: Vec<Vec<TwinSpec>> = TYPES.iter().map(|_| Vec::with_capacity(n / 3 + 1)).collect();
    for i in 0..n {
        let mut s = TwinSpec::new(TwinId::new(format!("dev-{i:07}")).unwrap());
        s.serial = format!("SN{i:010}");
        s.mac = format!("02:00:00:{:02x}:{:02x}:{:02x}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff);
        s.dtas.push(DtaId::new(format!("site-{}", i % SITES)).unwrap());
        if i % 2 == 0 {
            s.dtas.push(DtaId::new(format!("region-{}", i % REGIONS)).unwrap());
        }
        per_type[i % TYPES.len()].push(s);
    }
    per_type
}

async fn fleet() {
    let n = twins();
    let dir = bench_dir();
    let _ = std::fs::remove_dir_all(&dir);
    let all = specs(n);
    let rss0 = rss();
    let p = Platform::builder(&dir).start().await.unwrap();
    for r in 0..REGIONS {
        p.create_dta(DtaSpec {
            id: DtaId::new(format!("region-{r}")).unwrap(),
            name: String::new(),
            parents: vec![],
            layers: Default::default(),
        })
        .await
        .unwrap();
    }
    for s in 0..SITES {
        let parent = DtaId::new(format!("region-{}", s % REGIONS)).unwrap();
        p.create_dta(DtaSpec {
            id: DtaId::new(format!("site-{s}")).unwrap(),
            name: String::new(),
            parents: vec![parent],
            layers: Default::default(),
        })
        .await
        .unwrap();
    }
    let mut types = Vec::new();
    for t in TYPES {
        types.push(
            p.create_device_type(DeviceTypeSpec {
                id: DeviceTypeId::new(t).unwrap(),
                model: format!("{t}-hw2"),
                defaults: Default::default(),
                domain: None,
                journal: Default::default(),
                history: Default::default(),
                provisioning: None,
                metrics: None,
            })
            .await
            .unwrap(),
        );
    }
    let started = Instant::now();
    let spawns = types.iter().zip(all).map(|(t, specs)| t.spawn_fleet(specs));
    let created: usize = futures::future::join_all(spawns).await.into_iter().map(|r| r.unwrap().created).sum();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(created, n);
    let per = (rss() - rss0) as f64 / n as f64;
    row(
        "spawn DTIs (3 TDTAs, 1-2 DTAs each), running and durable",
        n,
        &format!("{secs:.2} s"),
        &format!("{:.0} twins/s, {per:.0} B RSS/twin", n as f64 / secs),
    );

    if std::env::var_os("TWINFLEET_BENCH_SPAWN_ONLY").is_some() {
        // A profiling aid: `perf record` of the spawn alone, without the teardown.
        let _ = std::fs::remove_dir_all(&dir);
        std::process::exit(0);
    }

    // What a /metrics scrape costs: one pass over every actor's counters.
    let mut scrape = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let summary = p.runtime().summary();
        scrape.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(summary.twins.iter().map(|(_, active, archived)| active + archived).sum::<u64>(), n as u64);
    }
    row(
        "metrics: sum every actor's counters (one /metrics scrape)",
        n,
        &format!("{:.1} ms", median(scrape)),
        "median of 5",
    );

    // Request/reply through the public handle.
    for callers in [1usize, 10_000] {
        let handles: Vec<TwinHandle> =
            (0..callers).map(|c| p.twin(&format!("dev-{:07}", (c * 97) % n)).unwrap()).collect();
        for (label, write) in [("get (read)", false), ("report (durable write)", true)] {
            let mut rates = Vec::new();
            let mut p50s = Vec::new();
            let mut p99s = Vec::new();
            for _ in 0..repeat() {
                let (rate, p50, p99) = request_loop(&handles, write, Duration::from_secs(2)).await;
                rates.push(rate);
                p50s.push(p50);
                p99s.push(p99);
            }
            row(
                &format!("request/reply via TwinHandle: {label}, {callers} callers"),
                n,
                &format!("{:.0} msg/s", median(rates)),
                &format!("p50 {:.0} us, p99 {:.0} us (median of {})", median(p50s), median(p99s), repeat()),
            );
        }
    }

    // Restart recovery: stop, start again, and ask every twin; once in pages through
    // `get_many`, once with one `get` per twin from 10,000 callers (the baseline).
    p.shutdown().await;
    // The ids the batched callers ask for, as a caller holds them (from a listing, say):
    // made before the clock starts. Looking them up is the platform's part, and timed.
    let ids: std::sync::Arc<Vec<String>> = std::sync::Arc::new((0..n).map(|i| format!("dev-{i:07}")).collect());
    for batched in [true, false] {
        let started = Instant::now();
        let p = Platform::builder(&dir).start().await.unwrap();
        let restored = p.restore_report().twins;
        let restored_secs = started.elapsed().as_secs_f64();
        let answered = if batched { ask_in_pages(&p, &ids).await } else { ask_one_by_one(&p, n).await };
        let secs = started.elapsed().as_secs_f64();
        assert_eq!((restored, answered), (n, n));
        let how = if batched { "get_many, pages of 10,000, 4 callers" } else { "one get per twin, 10,000 callers" };
        row(
            &format!("restart recovery: start until every twin answered ({how})"),
            n,
            &format!("{secs:.2} s"),
            &format!("restore itself {restored_secs:.2} s"),
        );
        p.shutdown().await;
    }
    if std::env::var("TWINFLEET_BENCH_KEEP_DIR").map_or(true, |k| k.is_empty()) {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Restart recovery as an operator's restart of the binary: this process starts the
/// platform on the directory `fleet` left behind and asks every twin through `get_many`;
/// the clock runs from this process's start (its first instruction in `main` is close
/// enough: the exec and the dynamic loader take ~1 ms) until the last twin answered.
async fn restart_in_new_process() {
    let started = *PROCESS_START.get_or_init(Instant::now);
    let dir = bench_dir();
    assert!(dir.exists(), "the restart section needs the fleet section before it in the same run");
    let p = Platform::builder(&dir).start().await.unwrap();
    let report = p.restore_report();
    let n = report.twins;
    let restored_secs = started.elapsed().as_secs_f64();
    let restore_only = report.millis as f64 / 1e3;
    // Unlike the in-process rows, the ids are made inside the timed span: a new process
    // has nothing in hand (it costs ~0.1 s for a million; reported apart below).
    let t = Instant::now();
    let ids: std::sync::Arc<Vec<String>> = std::sync::Arc::new((0..n).map(|i| format!("dev-{i:07}")).collect());
    let ids_secs = t.elapsed().as_secs_f64();
    let answered = ask_in_pages(&p, &ids).await;
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(answered, n);
    let (user, sys) = cpu_user_system_ms("self");
    let (user, sys) = (user / 1e3, sys / 1e3);
    row(
        "restart recovery in a new process: start until every twin answered (get_many, pages of 10,000, 4 callers)",
        n,
        &format!("{secs:.2} s"),
        &format!(
            "start {restored_secs:.2} s (the restore in it {restore_only:.2} s), ids made {ids_secs:.2} s, process CPU {:.2} s ({user:.2} user, {sys:.2} system)",
            user + sys
        ),
    );
    p.shutdown().await;
}

/// Set first thing in `main`.
static PROCESS_START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Every twin of `ids` asked through `get_many` in pages of 10,000, four pages at a
/// time; returns how many answered.
async fn ask_in_pages(p: &Platform, ids: &std::sync::Arc<Vec<String>>) -> usize {
    const PAGE: usize = 10_000;
    const CALLERS: usize = 4;
    let callers: Vec<_> = (0..CALLERS)
        .map(|c| {
            let (rt, ids) = (p.runtime().clone(), ids.clone());
            actix_rt::spawn(async move {
                let mut ok = 0;
                for page in ids.chunks(PAGE).skip(c).step_by(CALLERS) {
                    ok += rt.get_many(page).await.iter().filter(|r| r.is_ok()).count();
                }
                ok
            })
        })
        .collect();
    let mut answered = 0;
    for t in callers {
        answered += t.await.unwrap();
    }
    answered
}

/// Every twin asked with one `get` each, by 10,000 callers each asking its share in
/// turn; returns how many answered.
async fn ask_one_by_one(p: &Platform, n: usize) -> usize {
    let callers = 10_000.min(n);
    let tasks: Vec<_> = (0..callers)
        .map(|c| {
            let handles: Vec<TwinHandle> =
                (c..n).step_by(callers).map(|i| p.twin(&format!("dev-{i:07}")).unwrap()).collect();
            actix_rt::spawn(async move {
                let mut ok = 0;
                for h in handles {
                    ok += usize::from(h.get().await.is_ok());
                }
                ok
            })
        })
        .collect();
    let mut answered = 0;
    for t in tasks {
        answered += t.await.unwrap();
    }
    answered
}

/// Runs `handles.len()` concurrent callers for `dur`; returns (msg/s, p50 us, p99 us).
async fn request_loop(handles: &[TwinHandle], write: bool, dur: Duration) -> (f64, f64, f64) {
    let end = Instant::now() + dur;
    let started = Instant::now();
    let tasks: Vec<_> = handles
        .iter()
        .cloned()
        .map(|h| {
            actix_rt::spawn(async move {
                let mut lat = Vec::new();
                let mut n = 0u64;
                while Instant::now() < end {
                    let t = Instant::now();
                    if write {
                        n += 1;
                        h.report(json!({"n": n}).as_object().unwrap().clone()).await.unwrap();
                    } else {
                        h.get().await.unwrap();
                    }
                    lat.push(t.elapsed().as_micros() as u32);
                }
                lat
            })
        })
        .collect();
    let mut all: Vec<u32> = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort_unstable();
    (all.len() as f64 / secs, pct(&all, 0.5), pct(&all, 0.99))
}
