//! Cells fail alone, on the platform as users run it (`ldc up`: 2 regions × 2 serving cells
//! and a standby each, the embedded store split into a file per cell's shards).
//!
//! * A serving process stopped (SIGSTOP) while it holds its store file's write lock, as a
//!   hung or swapped-out process may, five times at random under continuous cross-cell
//!   transfers: while it is stopped (until the controller kills it, a few seconds) the
//!   users of every other cell keep paying at no less than half their normal rate with
//!   not one failed call; the controller fails its cell over and its users pay again.
//!   With every shard in one file (`--store-layout one-file`) the same stop does stop
//!   the other cells: that is the control.
//! * `kill -9` of every cell process in turn under load: every store file passes SQLite's
//!   `integrity_check`, and the exactly-once audit and `ldc reconcile` are clean.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::payments::*;
use common::*;
use ldc_store::sqlite::LockProbe;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::Rng;

/// The users whose shards `cell` owns now.
fn users_on(p: &Platform, users: &[String], cell: &str) -> HashSet<String> {
    let shards = p.shards_of(cell);
    users
        .iter()
        .filter(|u| shards.contains(&u64::from(ldc_core::shard::shard_of(u, 100))))
        .cloned()
        .collect()
}

/// Payments of `users` acknowledged in `from..to`, per second.
fn rate(acked: &[Acked], users: &HashSet<String>, from: Instant, to: Instant) -> f64 {
    let n = acked
        .iter()
        .filter(|a| a.acked_at >= from && a.acked_at < to && users.contains(&a.user))
        .count();
    n as f64 / (to - from).as_secs_f64()
}

/// One stop of a serving process.
struct Stopped {
    cell: String,
    at: Instant,
    until: Instant,
    affected: HashSet<String>,
    killed_after: Option<Duration>,
}

const STOP_FOR: Duration = Duration::from_secs(10);

/// Stops `pid` at a moment it holds the write lock of one of the store's files (the worst
/// moment: a process stopped between two transactions holds nothing): stops it, and lets it
/// go on again if it holds none, until it is caught holding one.
async fn stop_holding_a_lock(pid: u32, probes: &[LockProbe]) {
    let p = Pid::from_raw(pid as i32);
    for _ in 0..STOP_ATTEMPTS_MAX {
        kill(p, Signal::SIGSTOP).unwrap();
        // SIGSTOP is asynchronous: wait until the kernel reports the process stopped.
        while !stopped(pid) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if probes.iter().any(|l| l.holder().unwrap() == Some(pid)) {
            return;
        }
        kill(p, Signal::SIGCONT).unwrap();
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(1..20))).await;
    }
    panic!("process {pid} was never caught holding a store lock");
}

const STOP_ATTEMPTS_MAX: usize = 2_000;

/// Whether the process is in the stopped state (`T` in `/proc/PID/stat`).
fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
        .unwrap_or(false)
}

/// What one stop did to the others.
struct Seen {
    cell: String,
    /// The other cells' users' payments per second: normally, and while it was stopped.
    normal: f64,
    during: f64,
}

/// `ldc up` with `--store-layout layout`; `stops` times, a random serving process is
/// stopped for [`STOP_FOR`] under continuous payments. Checks that the controller kills it,
/// that its users pay again, that no call of any other user failed and that the audit,
/// `reconcile` and every file's `integrity_check` are clean; returns the rates.
async fn stop_serving_processes(layout: &str, stops: usize) -> Vec<Seen> {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ldc");
    // Slower to give up on a process than by default, so each stop leaves a few seconds in
    // which the stopped process holds whatever it held before it is killed.
    let platform = Platform::start(
        &data,
        &["--failure-threshold", "8", "--store-layout", layout],
    );
    let probes: Vec<LockProbe> = ldc_store::partitioned::files(&data.join("store.db"))
        .unwrap()
        .iter()
        .map(|f| LockProbe::open(f).unwrap())
        .collect();
    let c = platform.client().await;
    let users: Vec<String> = (0..32).map(|i| format!("user-{i}")).collect();
    fund(&c, &users).await;
    // A worker per payer, so that a payer whose cell is stopped holds up only itself.
    let load = Load::per_payer(&c, &users, &users, 1, "iso-");
    load.wait_progress(100, Duration::from_secs(30)).await;
    let normal_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let normal_to = Instant::now();

    let mut rng = rand::rng();
    let mut stopped: Vec<Stopped> = Vec::new();
    for _ in 0..stops {
        let status = platform.status();
        let serving: Vec<&serde_json::Value> = status["cells"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| !c["shards"].as_array().unwrap().is_empty())
            .collect();
        let victim = serving[rng.random_range(0..serving.len())];
        let cell = victim["cell"].as_str().unwrap().to_string();
        // Blue carries a cell's traffic (no traffic shift here).
        let pid = pids(victim)[0].as_u64().unwrap() as u32;
        let affected = users_on(&platform, &users, &cell);
        stop_holding_a_lock(pid, &probes).await;
        let at = Instant::now();
        let mut killed_after = None;
        while at.elapsed() < STOP_FOR {
            if killed_after.is_none() && !alive(pid) {
                killed_after = Some(at.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGCONT);
        let until = Instant::now();
        eprintln!(
            "stopped {cell} (pid {pid}, {} of the users): killed after {killed_after:?}",
            affected.len()
        );
        assert!(
            killed_after.is_some(),
            "the stopped process of {cell} was never killed"
        );
        load.wait_recovered(&affected, at, Duration::from_secs(30))
            .await;
        stopped.push(Stopped {
            cell,
            at,
            until,
            affected,
            killed_after,
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let LoadResult {
        acked,
        failed_attempts,
        ..
    } = load.stop_and_audit(&data, &c, &users).await;

    let all: HashSet<String> = users.iter().cloned().collect();
    let mut seen = Vec::new();
    for s in &stopped {
        let others: HashSet<String> = all.difference(&s.affected).cloned().collect();
        let normal = rate(&acked, &others, normal_from, normal_to);
        // While the process was stopped: until the controller killed it.
        let stopped_until = s.killed_after.map_or(s.until, |d| s.at + d);
        let during = rate(&acked, &others, s.at, stopped_until);
        let r = recovery(&acked, &s.affected, s.at);
        eprintln!(
            "[{layout}] {} stopped for {:?}: the other cells' {} users paid {during:.0}/s (normal {normal:.0}/s, {:.0}%); \
             its {} users paid again after {:?}",
            s.cell,
            stopped_until - s.at,
            others.len(),
            100.0 * during / normal,
            r.users,
            r.max
        );
        seen.push(Seen {
            cell: s.cell.clone(),
            normal,
            during,
        });
    }
    if layout == "cells" {
        // Not one failed call by a user whose cell was not stopped at that moment.
        for f in &failed_attempts {
            assert!(
                stopped
                    .iter()
                    .any(|s| s.affected.contains(&f.user) && f.at >= s.at),
                "{} (on a running cell) had a call fail with {:?}",
                f.user,
                f.code
            );
        }
    }
    let pids = platform.stop();
    assert!(pids.iter().all(|p| !alive(*p)));
    let control = data.join("store.db");
    let files = ldc_store::partitioned::files(&control).unwrap();
    let expected = if layout == "cells" { 5 } else { 1 };
    assert_eq!(files.len(), expected, "{files:?}");
    let problems = ldc_store::partitioned::integrity_check(&control).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_cell_stops_no_other_cell() {
    for s in stop_serving_processes("cells", 5).await {
        assert!(
            s.during >= s.normal / 2.0,
            "while {} was stopped the other cells' users paid {:.0}/s, under half their normal {:.0}/s",
            s.cell,
            s.during,
            s.normal
        );
    }
}

/// The control: with every shard in one file, the same stop does stop the other cells
/// (which is why `ldc up` splits the store, and shows that the check above can fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_one_file_a_stopped_cell_stops_the_others() {
    let seen = stop_serving_processes("one-file", 1).await;
    assert!(
        seen.iter().all(|s| s.during < s.normal / 2.0),
        "with one store file the other cells kept paying while one was stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_every_cell_process_in_turn() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ldc");
    let platform = Platform::start(&data, &[]);
    let c = platform.client().await;
    let users: Vec<String> = (0..24).map(|i| format!("user-{i}")).collect();
    fund(&c, &users).await;
    let load = Load::per_payer(&c, &users, &users, 1, "k9-");
    load.wait_progress(50, Duration::from_secs(30)).await;
    let cells: Vec<String> = platform.status()["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["cell"].as_str().unwrap().to_string())
        .collect();
    let mut killed = 0;
    for cell in &cells {
        for colour in 0..2 {
            let pid = pids(&platform.cell(cell))[colour].as_u64().unwrap() as u32;
            kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
            killed += 1;
            // Restarted by the controller (a new pid in the same place), and payments go on.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let now = pids(&platform.cell(cell))[colour].as_u64().unwrap_or(0) as u32;
                if now != 0 && now != pid && alive(now) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{cell} pid {pid} was not restarted"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            load.wait_progress(20, Duration::from_secs(30)).await;
        }
    }
    let r = load.stop_and_audit(&data, &c, &users).await;
    eprintln!(
        "kill -9 of {killed} processes in turn: {} payments acknowledged, {} calls retried",
        r.acked.len(),
        r.failed_attempts.len()
    );
    platform.stop();
    let files = ldc_store::partitioned::files(&data.join("store.db")).unwrap();
    assert_eq!(files.len(), 5, "{files:?}");
    let problems = ldc_store::partitioned::integrity_check(&data.join("store.db")).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
}
