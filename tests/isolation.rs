//! Cells fail alone, on the platform as users run it (`ldc up`: 2 regions × 2 serving cells
//! and a standby each, the embedded store split into a file per cell's shards).
//!
//! * A serving process stopped (SIGSTOP: it holds whatever store lock it held, as a hung
//!   or swapped-out process does) five times at random under continuous cross-cell
//!   transfers: the users of every other cell keep paying at no less than half their
//!   normal rate with not one failed call, the controller kills the stopped process and
//!   fails its cell over, and its users pay again.
//! * `kill -9` of every cell process in turn under load: every store file passes SQLite's
//!   `integrity_check`, and the exactly-once audit and `ldc reconcile` are clean.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::payments::*;
use common::*;
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

const STOPS: usize = 5;
const STOP_FOR: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_cell_stops_no_other_cell() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ldc");
    let platform = Platform::start(&data, &[]);
    let files = ldc_store::partitioned::files(&data.join("store.db")).unwrap();
    assert_eq!(
        files.len(),
        5,
        "a control file and one per serving cell: {files:?}"
    );
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
    let mut stops: Vec<Stopped> = Vec::new();
    for _ in 0..STOPS {
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
        let pid = victim["pids"][0].as_u64().unwrap() as u32;
        let affected = users_on(&platform, &users, &cell);
        kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).unwrap();
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
            "stopped {cell} (pid {pid}, {} of the users) for {STOP_FOR:?}: killed after {killed_after:?}",
            affected.len()
        );
        load.wait_recovered(&affected, at, Duration::from_secs(30))
            .await;
        stops.push(Stopped {
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
    for s in &stops {
        let others: HashSet<String> = all.difference(&s.affected).cloned().collect();
        let normal = rate(&acked, &others, normal_from, normal_to);
        let during = rate(&acked, &others, s.at, s.until);
        let r = recovery(&acked, &s.affected, s.at);
        eprintln!(
            "{} stopped: the other cells' {} users paid {during:.0}/s (normal {normal:.0}/s, {:.0}%); \
             its {} users paid again after {:?}",
            s.cell,
            others.len(),
            100.0 * during / normal,
            r.users,
            r.max
        );
        assert!(
            during >= normal / 2.0,
            "while {} was stopped the other cells' users paid {during:.0}/s, under half their normal {normal:.0}/s",
            s.cell
        );
        assert!(
            s.killed_after.is_some(),
            "the stopped process of {} was never killed",
            s.cell
        );
    }
    // Not one failed call by a user whose cell was not stopped at that moment.
    for f in &failed_attempts {
        assert!(
            stops
                .iter()
                .any(|s| s.affected.contains(&f.user) && f.at >= s.at),
            "{} (on a running cell) had a call fail with {:?}",
            f.user,
            f.code
        );
    }
    let pids = platform.stop();
    assert!(pids.iter().all(|p| !alive(*p)));
    let problems = ldc_store::partitioned::integrity_check(&data.join("store.db")).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
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
            let pid = platform.cell(cell)["pids"][colour].as_u64().unwrap() as u32;
            kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
            killed += 1;
            // Restarted by the controller (a new pid in the same place), and payments go on.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let now = platform.cell(cell)["pids"][colour].as_u64().unwrap_or(0) as u32;
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
