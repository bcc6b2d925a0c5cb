//! Faults on the platform as users run it (`ldc up`, real processes over TLS): each test
//! injects one fault, checks the invariants (no acknowledged payment lost, none applied
//! twice, `ldc reconcile` clean) and prints one row of the fault table.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::payments::*;
use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.1 request to a cell's metrics port; returns the status line and body.
async fn http(addr: &str, method: &str, path: &str, body: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut resp))
        .await
        .unwrap_or_else(|_| panic!("{method} http://{addr}{path} timed out"))
        .unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// Sets failpoint `name` of the cell process whose metrics port is `metrics` (test builds
/// of `ldc` serve `PUT /fail/NAME` there).
async fn set_failpoint(metrics: &str, name: &str, actions: &str) {
    let (status, body) = http(metrics, "PUT", &format!("/fail/{name}"), actions).await;
    assert!(
        status.contains(" 200 "),
        "PUT /fail/{name}: {status} {body}"
    );
}

/// The users of `users` whose shards `cell` owns.
fn users_of(p: &Platform, users: &[String], cell: &str) -> HashSet<String> {
    let shards = p.shards_of(cell);
    users
        .iter()
        .filter(|u| shards.contains(&u64::from(ldc_core::shard::shard_of(u, 100))))
        .cloned()
        .collect()
}

async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t0.elapsed()
}

/// The pids of the cell that owns `user`'s shard.
fn owner_pids(p: &Platform, user: &str) -> Vec<i32> {
    pids(&p.owner_of(user))
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap() as i32)
        .collect()
}

fn signal_all(pids: &[i32], sig: Signal) {
    for p in pids {
        kill(Pid::from_raw(*p), sig).unwrap();
    }
}

/// The fault table: one row per scenario, appended by each test (they run in parallel)
/// to a file that `scripts/test.sh` prints after the tests.
pub const FAULT_TABLE: &str = concat!(env!("CARGO_TARGET_TMPDIR"), "/fault-table.md");

/// One row of the fault table: the fault, requests that failed (each retried with its
/// key), how long the affected users waited to pay again, acknowledged payments lost and
/// payments applied twice (both asserted 0 by the test before it writes the row).
fn fault_row(fault: &str, failed: u64, repaid_after: Option<Duration>, lost: u64, twice: u64) {
    use std::io::Write;
    let row = format!(
        "| {fault:<44} | {failed:>8} | {:>12} | {lost:>4} | {twice:>5} |",
        repaid_after.map_or("-".into(), |d| format!("{:.2}s", d.as_secs_f64()))
    );
    println!("{row}");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(FAULT_TABLE)
        .unwrap();
    writeln!(f, "{row}").unwrap();
}

fn key_from_stderr(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    text.lines()
        .find_map(|l| l.strip_prefix("idempotency key: "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("the CLI printed no idempotency key: {text}"))
        .to_string()
}

/// A top-up whose cell stops answering (SIGSTOP, port still open) outlives the CLI's
/// deadline: the CLI announced its key before sending, retried with it, and gives up with
/// "outcome unknown" (exit 3). Re-run with that key once the cell is back, it pays exactly
/// once, whatever happened to the first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_payment_interrupted_by_a_deadline_and_rerun_pays_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ldc");
    // The controller must not fail the stopped cell over: this test is about the client.
    let platform = Platform::start(&data, &["--failure-threshold", "1000000"]);
    let c = platform.client().await;
    open_and_fund(&c, "alice", 1_000).await;

    let pids = owner_pids(&platform, "alice");
    signal_all(&pids, Signal::SIGSTOP);
    let stopped_at = Instant::now();
    let out = ldc()
        .arg("--data-dir")
        .arg(&data)
        .args([
            "topup",
            "alice",
            "777",
            "--currency",
            "EUR",
            "--deadline",
            "2",
        ])
        .output()
        .unwrap();
    signal_all(&pids, Signal::SIGCONT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "a payment without an answer is reported as of unknown outcome: {stderr}"
    );
    assert!(stderr.contains("outcome is not known"), "{stderr}");
    let key = key_from_stderr(&out.stderr);

    // Re-run by hand with the printed key (twice: the second is a pure replay).
    let again = ldc_json(
        &data,
        &["topup", "alice", "777", "--currency", "EUR", "--key", &key],
    );
    let repaid_after = stopped_at.elapsed();
    let replay = ldc_json(
        &data,
        &["topup", "alice", "777", "--currency", "EUR", "--key", &key],
    );
    assert_eq!(again["payment_id"], replay["payment_id"]);
    assert_eq!(again["idempotency_key"], key.as_str());

    let balance = ldc_json(&data, &["balance", "alice"]);
    assert_eq!(balance["balance"], 1_777, "exactly one top-up of 777");
    let entries = ldc_json(&data, &["entries", "alice"]);
    let topups = entries["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["amount"] == 777)
        .count();
    assert_eq!(topups, 1, "{entries}");
    assert_eq!(reconcile(&data)["clean"], true);
    fault_row(
        "CLI payment past its deadline, re-run",
        1,
        Some(repaid_after),
        0,
        topups as u64 - 1,
    );
}

/// A failed fsync in one cell process (failpoint at the store's sync seam) under
/// continuous payments: that process answers nothing it cannot prove durable, turns
/// NOT_SERVING and leaves (exit 75); the controller restarts every cell process sharing
/// the store file, recovery runs from disk, and no acknowledged payment is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_failure_stops_every_writer_on_the_file_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ldc");
    let platform = Platform::start(&data, &[]);
    let c = platform.client().await;
    let users: Vec<String> = (0..24).map(|i| format!("user-{i}")).collect();
    fund(&c, &users).await;
    let load = Load::start(&c, &users, 4);
    load.wait_progress(30, Duration::from_secs(30)).await;

    let before: Vec<u32> = platform.status()["cells"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| pids(c).as_array().unwrap().clone())
        .map(|p| p.as_u64().unwrap() as u32)
        .filter(|p| *p != 0)
        .collect();
    let victim = platform.cell("r1-a");
    let victim_pid = pids(&victim)[0].as_u64().unwrap() as u32;
    set_failpoint(
        victim["colours"]["blue"]["metrics"].as_str().unwrap(),
        "store::sync",
        "return",
    )
    .await;
    let fault = Instant::now();

    wait_for(
        "the failing process leaves",
        Duration::from_secs(20),
        || !alive(victim_pid),
    )
    .await;
    // Every process on the shared file was restarted, and payments resume for everyone.
    wait_for(
        "every cell process restarted",
        Duration::from_secs(30),
        || before.iter().all(|p| !alive(*p)),
    )
    .await;
    let everyone: HashSet<String> = users.iter().cloned().collect();
    load.wait_recovered(&everyone, fault, Duration::from_secs(30))
        .await;
    load.wait_progress(30, Duration::from_secs(30)).await;
    let LoadResult {
        acked,
        failed_attempts,
        ..
    } = load.stop_and_audit(&data, &c, &users).await;
    let r = recovery(&acked, &everyone, fault);
    fault_row(
        "fsync failure in one cell process",
        failed_attempts.len() as u64,
        Some(r.max),
        0,
        0,
    );
}

/// A hung writer: the cell's commit blocks (failpoint `sleep`) while its port stays open
/// and it holds the shared store's write lock. Its health turns NOT_SERVING on progress
/// (a TCP or plain health check would still pass); the controller sees it hold the lock,
/// kills it (fencing by force) and fails its shards over; the cells that only waited for
/// the lock are not failed over. Nothing acknowledged is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_writer_is_detected_fenced_and_failed_over() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ldc");
    let platform = Platform::start(&data, &[]);
    let c = platform.client().await;
    let users: Vec<String> = (0..24).map(|i| format!("user-{i}")).collect();
    fund(&c, &users).await;
    let affected = users_of(&platform, &users, "r1-a");
    assert!(!affected.is_empty(), "no test user lives on r1-a");
    let load = Load::start(&c, &users, 4);
    load.wait_progress(30, Duration::from_secs(30)).await;

    let victim = platform.cell("r1-a");
    let victim_pid = pids(&victim)[0].as_u64().unwrap() as u32;
    let others: Vec<u32> = ["r1-b", "r2-a", "r2-b"]
        .iter()
        .map(|c| pids(&platform.cell(c))[0].as_u64().unwrap() as u32)
        .collect();
    set_failpoint(
        victim["colours"]["blue"]["metrics"].as_str().unwrap(),
        "store::commit",
        "sleep(600000)",
    )
    .await;
    let fault = Instant::now();

    let fenced = wait_for(
        "the stuck process is killed",
        Duration::from_secs(30),
        || !alive(victim_pid),
    )
    .await;
    wait_for(
        "the standby takes r1-a's shards",
        Duration::from_secs(30),
        || {
            platform.cell("r1-a")["shards"]
                .as_array()
                .unwrap()
                .is_empty()
        },
    )
    .await;
    load.wait_recovered(&affected, fault, Duration::from_secs(30))
        .await;
    load.wait_progress(30, Duration::from_secs(30)).await;
    let LoadResult {
        acked,
        failed_attempts,
        ..
    } = load.stop_and_audit(&data, &c, &users).await;
    for (cell, pid) in ["r1-b", "r2-a", "r2-b"].iter().zip(&others) {
        assert!(
            alive(*pid),
            "{cell} only waited for the lock and was killed"
        );
        assert!(
            !platform.cell(cell)["shards"].as_array().unwrap().is_empty(),
            "{cell} only waited for the lock and was failed over"
        );
    }
    let h = ldc_json(&data, &["cell", "history"]);
    let failovers: Vec<&serde_json::Value> = h["moves"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["id"].as_str().unwrap_or("").starts_with("auto-failover"))
        .collect();
    assert_eq!(
        failovers.len(),
        1,
        "only the stuck cell is failed over: {h}"
    );
    let r = recovery(&acked, &affected, fault);
    eprintln!(
        "hung writer: killed after {fenced:?}; its users paid again after {:?}",
        r.max
    );
    fault_row(
        "hung writer (commit blocked, port open)",
        failed_attempts.len() as u64,
        Some(r.max),
        0,
        0,
    );
}

/// Readiness follows the writer, not the port: with its commit paused (failpoint `pause`)
/// the cell still answers HTTP and gRPC, but `/readyz` says 503 and gRPC health
/// NOT_SERVING within the stall window; released, it is ready again. (The controller is
/// told not to act: this test is about what the cell reports.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_writer_progress_not_the_open_port() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ldc");
    let platform = Platform::start(&data, &["--failure-threshold", "1000000"]);
    let cell = platform.cell("r1-a");
    let metrics = cell["colours"]["blue"]["metrics"]
        .as_str()
        .unwrap()
        .to_string();
    let grpc = cell["colours"]["blue"]["endpoints"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        http(&metrics, "GET", "/readyz", "").await.0,
        "HTTP/1.1 200 OK"
    );
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel_as(
        &data,
        &grpc,
        ldc_security::platform::CONTROLLER,
    ));
    let status = |h: &mut tonic_health::pb::health_client::HealthClient<_>| {
        let mut h = h.clone();
        async move {
            h.check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .unwrap()
                .into_inner()
                .status
        }
    };
    assert_eq!(status(&mut health).await, 1, "SERVING");

    set_failpoint(&metrics, "store::commit", "pause").await;
    let t0 = Instant::now();
    loop {
        let (line, body) = http(&metrics, "GET", "/readyz", "").await;
        if line.contains(" 503 ") {
            assert!(body.contains("no progress"), "{body}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "still ready with a paused writer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let not_ready_after = t0.elapsed();
    assert_eq!(
        status(&mut health).await,
        2,
        "NOT_SERVING, and the port still answers"
    );
    let m = http(&metrics, "GET", "/metrics", "").await.1;
    assert!(
        counter(&m, "ldc_cell_writer_stalled_seconds", &[]) >= 3.0,
        "{m}"
    );

    let (line, _) = http(&metrics, "DELETE", "/fail/store::commit", "").await;
    assert!(line.contains(" 200 "), "{line}");
    let t1 = Instant::now();
    loop {
        if http(&metrics, "GET", "/readyz", "")
            .await
            .0
            .contains(" 200 ")
        {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(10),
            "not ready after the writer resumed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status(&mut health).await, 1, "SERVING again");
    eprintln!(
        "paused writer: not ready after {not_ready_after:?}, ready {:?} after release",
        t1.elapsed()
    );
    // A release build refuses failpoints; a bad name is refused with the list.
    let (line, body) = http(&metrics, "PUT", "/fail/store::nope", "return").await;
    assert!(
        line.contains(" 400 ") && body.contains("store::commit"),
        "{line} {body}"
    );
}

/// Raises this process's open-file limit to its hard limit (the platform's processes,
/// started after, inherit it); returns the limit.
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    hard
}

/// 10,050 idle client connections (TLS done, HTTP/2 preface sent, then nothing) against a
/// router with 10,000 connection slots, while payments run: the payments' connection keeps
/// serving, the idle ones give way to new clients (evicted longest-idle first), and a new
/// CLI command gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_sockets_do_not_lock_clients_out() {
    const IDLE: usize = 10_050;
    let limit = raise_fd_limit();
    assert!(
        limit >= IDLE as u64 + 2_000,
        "this test needs an open-file hard limit of at least {} (ulimit -Hn is {limit})",
        IDLE + 2_000
    );
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ldc");
    let platform = Platform::start(&data, &[]);
    let c = platform.client().await;
    let users: Vec<String> = (0..12).map(|i| format!("user-{i}")).collect();
    fund(&c, &users).await;
    let load = Load::start(&c, &users, 4);
    load.wait_progress(20, Duration::from_secs(30)).await;

    let tls = Arc::new(
        ldc_security::tls::anonymous_client_config(&data.join("pki").join("ca.pem")).unwrap(),
    );
    let started = Instant::now();
    let fault = Instant::now();
    let mut idle = Vec::with_capacity(IDLE);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..IDLE {
        while tasks.len() >= 128 {
            if let Some(Ok(Some(s))) = tasks.join_next().await {
                idle.push(s);
            }
        }
        let (addr, tls) = (platform.router.clone(), tls.clone());
        tasks.spawn(async move {
            let (mut s, _) = tokio::time::timeout(
                Duration::from_secs(10),
                ldc_security::net::connect(&addr, tls),
            )
            .await
            .ok()?
            .ok()?;
            s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                .await
                .ok()?;
            Some(s)
        });
    }
    while let Some(r) = tasks.join_next().await {
        if let Ok(Some(s)) = r {
            idle.push(s);
        }
    }
    let opened = idle.len();
    eprintln!(
        "idle flood: {opened} TLS connections opened in {:?}",
        started.elapsed()
    );
    assert!(
        opened > 9_000,
        "only {opened} idle connections could be opened"
    );

    // New clients get in while the flood holds its sockets, and payments continue.
    for u in &users[..3] {
        let b = ldc_json(&data, &["balance", u, "--deadline", "10"]);
        assert_eq!(b["user_id"], u.as_str());
    }
    load.wait_progress(20, Duration::from_secs(30)).await;
    let m = http_get(&platform.admin, "/metrics").await;
    let evicted = counter(&m, "ldc_router_connections_evicted_total", &[]);
    assert!(
        evicted >= 1.0,
        "the flood filled the slots, so someone was evicted: {m}"
    );
    drop(idle);

    let LoadResult {
        acked,
        failed_attempts,
        ..
    } = load.stop_and_audit(&data, &c, &users).await;
    let everyone: HashSet<String> = users.iter().cloned().collect();
    let r = recovery(&acked, &everyone, fault);
    fault_row(
        "10,050 idle TLS connections on the router",
        failed_attempts.len() as u64,
        Some(r.max),
        0,
        0,
    );
    eprintln!("idle flood: {evicted} idle connections evicted");
}

/// A small tmpfs mounted for one test, unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "ldc-test-disk",
            ])
            .arg(dir)
            .output()
            .expect("mount(8) is installed");
        assert!(
            out.status.success(),
            "cannot mount a {size} tmpfs at {} (the disk-full test needs root, as CI runs): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk(dir.to_path_buf())
    }

    /// Writes a file until the disk is full; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0xa5u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The store's disk fills up under continuous payments: payments are refused with
/// RESOURCE_EXHAUSTED and nothing half-written (no process leaves: a full disk is not a
/// disk fault), and once space returns they resume with every acknowledged payment intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_payments_cleanly_and_they_resume_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&dir.path().join("disk"), "64m");
    let data = dir.path().join("disk").join("ldc");
    let platform = Platform::start(&data, &[]);
    let c = platform.client().await;
    let users: Vec<String> = (0..12).map(|i| format!("user-{i}")).collect();
    fund(&c, &users).await;
    let pids_before = pids(&platform.cell("r1-a")).clone();
    let load = Load::start(&c, &users, 4);
    load.wait_progress(20, Duration::from_secs(30)).await;

    let filler = disk.fill();
    let full_at = Instant::now();
    wait_for(
        "payments refused with RESOURCE_EXHAUSTED",
        Duration::from_secs(60),
        || load.failed_with(tonic::Code::ResourceExhausted) > 0,
    )
    .await;
    let refused = load.failed_with(tonic::Code::ResourceExhausted);
    // A full disk is refused, not a fault: the cell processes stay.
    assert_eq!(
        pids(&platform.cell("r1-a")),
        pids_before,
        "a full disk made a cell leave"
    );
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    let before = load.acked();
    wait_for("payments resume", Duration::from_secs(30), || {
        load.acked() >= before + 20
    })
    .await;
    let resumed_after = freed.elapsed();

    let LoadResult {
        failed_attempts, ..
    } = load.stop_and_audit(&data, &c, &users).await;
    eprintln!(
        "disk full for {:?}: {refused} attempts refused; payments resumed {resumed_after:?} after space returned",
        full_at.elapsed() - resumed_after
    );
    fault_row(
        "disk full, then space returns",
        failed_attempts.len() as u64,
        Some(resumed_after),
        0,
        0,
    );
    drop(platform);
}

/// A 200 KB value in every string field of every request type, through the router while
/// payments run: each is refused with a precise code and a short message (never an echo
/// of the input), nothing is written, and the connections it travelled on keep serving
/// everyone else (no payment of the load sees UNAVAILABLE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_kb_field_in_every_string_of_every_request_is_refused_precisely() {
    use ldc_core::proto;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ldc");
    let platform = Platform::start(&data, &[]);
    let c = platform.client().await;
    let users: Vec<String> = (0..12).map(|i| format!("user-{i}")).collect();
    fund(&c, &users).await;
    let load = Load::start(&c, &users, 4);
    load.wait_progress(20, Duration::from_secs(30)).await;
    let unavailable_before = load.failed_with(tonic::Code::Unavailable);

    let u = "user-0".to_string();
    let big = "x".repeat(200_000);
    // Field `i` of case `f`: the 200 KB value in field `f`, a good value elsewhere.
    let val = |f: usize, i: usize, good: &str| {
        if f == i {
            big.clone()
        } else {
            good.to_string()
        }
    };
    let mut cases: Vec<(String, tonic::Status)> = Vec::new();
    let mut push = |name: String, r: Result<(), tonic::Status>| match r {
        Ok(()) => panic!("{name}: a 200 KB field was accepted"),
        Err(s) => cases.push((name, s)),
    };
    for f in 0..3 {
        let m = proto::OpenAccountRequest {
            user_id: val(f, 0, &u),
            currency: val(f, 1, "EUR"),
            idempotency_key: val(f, 2, "k-open"),
        };
        push(
            format!("OpenAccount field {f}"),
            c.clone().open_account(req(&u, m)).await.map(drop),
        );
        let m = proto::TopUpRequest {
            user_id: val(f, 0, &u),
            amount: 5,
            currency: val(f, 1, "EUR"),
            idempotency_key: val(f, 2, "k-topup"),
        };
        push(
            format!("TopUp field {f}"),
            c.clone().top_up(req(&u, m)).await.map(drop),
        );
        let m = proto::WithdrawRequest {
            user_id: val(f, 0, &u),
            amount: 5,
            currency: val(f, 1, "EUR"),
            idempotency_key: val(f, 2, "k-withdraw"),
        };
        push(
            format!("Withdraw field {f}"),
            c.clone().withdraw(req(&u, m)).await.map(drop),
        );
        let m = proto::RefundRequest {
            user_id: val(f, 0, &u),
            payment_id: val(f, 1, "user-0:1"),
            amount: 1,
            idempotency_key: val(f, 2, "k-refund"),
        };
        push(
            format!("Refund field {f}"),
            c.clone().refund(req(&u, m)).await.map(drop),
        );
    }
    for f in 0..4 {
        let m = proto::TransferRequest {
            user_id: val(f, 0, &u),
            to_user_id: val(f, 1, "user-1"),
            amount: 5,
            currency: val(f, 2, "EUR"),
            idempotency_key: val(f, 3, "k-transfer"),
        };
        push(
            format!("Transfer field {f}"),
            c.clone().transfer(req(&u, m)).await.map(drop),
        );
    }
    let m = proto::GetBalanceRequest {
        user_id: big.clone(),
    };
    push(
        "GetBalance user_id".into(),
        c.clone().get_balance(req(&u, m)).await.map(drop),
    );
    for f in 0..2 {
        let m = proto::GetPaymentRequest {
            user_id: val(f, 0, &u),
            payment_id: val(f, 1, "user-0:1"),
        };
        push(
            format!("GetPayment field {f}"),
            c.clone().get_payment(req(&u, m)).await.map(drop),
        );
    }
    let m = proto::ListEntriesRequest {
        user_id: big.clone(),
        after_seq: 0,
        limit: 10,
    };
    push(
        "ListEntries user_id".into(),
        c.clone().list_entries(req(&u, m)).await.map(drop),
    );
    // The routing header itself.
    // The routing header itself: over the router's 8 KiB header limit it is refused with
    // RESOURCE_EXHAUSTED; far over it (200 KB) the HTTP/2 layer refuses the headers before
    // they cost memory (the client may refuse to send them at all, having the router's
    // advertised limit), and the connection keeps serving the others.
    let mut r = tonic::Request::new(proto::GetBalanceRequest { user_id: u.clone() });
    r.metadata_mut()
        .insert(ldc_core::USER_HEADER, "x".repeat(12_000).parse().unwrap());
    push(
        "x-ldc-user header of 12 KB".into(),
        c.clone().get_balance(r).await.map(drop),
    );
    let mut r = tonic::Request::new(proto::GetBalanceRequest { user_id: u.clone() });
    r.metadata_mut()
        .insert(ldc_core::USER_HEADER, "x".repeat(200_000).parse().unwrap());
    let huge_header = c.clone().get_balance(r).await;
    assert!(huge_header.is_err(), "a 200 KB header was served");

    for (name, s) in &cases {
        use tonic::Code::*;
        assert!(
            matches!(
                s.code(),
                InvalidArgument
                    | NotFound
                    | FailedPrecondition
                    | OutOfRange
                    | ResourceExhausted
                    | PermissionDenied
            ),
            "{name}: {:?} {}",
            s.code(),
            &s.message()[..s.message().len().min(200)]
        );
        assert!(
            s.message().len() < 400,
            "{name}: {} bytes of message",
            s.message().len()
        );
    }
    load.wait_progress(20, Duration::from_secs(30)).await;
    assert_eq!(
        load.failed_with(tonic::Code::Unavailable),
        unavailable_before,
        "an oversized request broke a connection others use"
    );
    load.stop_and_audit(&data, &c, &users).await;
    // Nothing was written for user-0 beyond the load's own payments (`verify` counts its
    // top-ups, transfers and credits against what was acknowledged; no other kind exists).
    let entries = ldc_json(&data, &["entries", &u, "--limit", "1000"]);
    for e in entries["entries"].as_array().unwrap() {
        assert!(
            ["TOP_UP", "TRANSFER_OUT", "TRANSFER_IN"].contains(&e["kind"].as_str().unwrap()),
            "an oversized request wrote {e}"
        );
    }
    eprintln!(
        "oversized fields: {} requests refused precisely",
        cases.len()
    );
    fault_row(
        "200 KB in every string of every request",
        cases.len() as u64,
        None,
        0,
        0,
    );
}

/// Each region's processes in their own network namespace; region r1 is partitioned from
/// r2 (every packet between them dropped silently) for 5 s under continuous payments, then
/// healed. Payments go on being acknowledged in both regions (a transfer's debit and its
/// outbox message are local); credits to the other region wait in the outbox and are
/// delivered once after the heal; nothing is failed over (the controller still sees every
/// cell), nothing lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_partitioned_from_the_other_loses_nothing_and_heals() {
    let net = common::netns::Regions::create(2);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ldc");
    let (r1, r2) = (net.up_arg(1), net.up_arg(2));
    let platform = Platform::start(&data, &["--region-netns", &r1, "--region-netns", &r2]);
    assert!(
        platform.cell("r1-a")["colours"]["blue"]["endpoints"][0]
            .as_str()
            .unwrap()
            .starts_with(&net.address(1)),
        "r1's cells listen in their namespace"
    );
    let c = platform.client().await;
    let users: Vec<String> = (0..24).map(|i| format!("user-{i}")).collect();
    fund(&c, &users).await;
    let load = Load::start(&c, &users, 4);
    load.wait_progress(30, Duration::from_secs(30)).await;

    net.partition(1, 2);
    let fault = Instant::now();
    let during = load.acked();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let acked_during = load.acked() - during;
    let pending = |d: &std::path::Path| -> u64 {
        reconcile(d)["report"]["currencies"]
            .as_object()
            .map(|m| {
                m.values()
                    .map(|c| c["outbox_messages"].as_u64().unwrap())
                    .sum()
            })
            .unwrap_or(0)
    };
    let stuck = pending(&data);
    net.heal(1, 2);
    let healed = Instant::now();
    assert!(
        acked_during >= 20,
        "payments stopped during the partition: {acked_during}"
    );
    assert!(
        stuck > 0,
        "no credit waited for the other region: the test crossed no regions"
    );
    load.wait_progress(30, Duration::from_secs(30)).await;
    // Stop the load, then the backlog drains: how long after the heal every credit that
    // waited (and every later one) is delivered.
    let result = load.stop().await;
    assert_eq!(
        result.failed_payments, 0,
        "a payment was not acknowledged within 30 s"
    );
    let settled = wait_settled(&data, Duration::from_secs(60));
    let drained_after = healed.elapsed();
    assert_eq!(
        pending(&data),
        0,
        "credits still undelivered a minute after the heal: {settled}"
    );
    verify(
        &|| wait_settled(&data, Duration::from_secs(30)),
        &c,
        &users,
        &result.acked,
        0,
    )
    .await;
    let failed_attempts = result.failed_attempts;
    let h = ldc_json(&data, &["cell", "history"]);
    assert!(
        h["moves"].as_array().unwrap().is_empty(),
        "a partition between regions failed a cell over: {h}"
    );
    eprintln!(
        "partition: {acked_during} payments acknowledged in 5 s of partition, {stuck} credits \
         waiting at the heal, delivered {drained_after:?} after it ({:?} after the fault)",
        fault.elapsed()
    );
    fault_row(
        "regions partitioned 5 s (netns), healed",
        failed_attempts.len() as u64,
        Some(drained_after),
        0,
        0,
    );
    drop(platform);
}

/// Disaster recovery of a region that is cut off from the other (network namespaces, the
/// partition of the test above): `ldc cell dr cutover --from r1` moves r1's shards to r2's
/// cells while every packet between the regions is dropped; r1's users pay again on r2,
/// the credits r1 had queued are delivered by their shards' new owners, and after the
/// heal the audit is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dr_cutover_of_a_partitioned_region_loses_nothing() {
    let net = common::netns::Regions::create(2);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ldc");
    let (r1, r2) = (net.up_arg(1), net.up_arg(2));
    let platform = Platform::start(&data, &["--region-netns", &r1, "--region-netns", &r2]);
    let c = platform.client().await;
    let users: Vec<String> = (0..24).map(|i| format!("user-{i}")).collect();
    fund(&c, &users).await;
    let affected: HashSet<String> = ["r1-a", "r1-b"]
        .iter()
        .flat_map(|cell| users_of(&platform, &users, cell))
        .collect();
    assert!(!affected.is_empty(), "no test user lives in r1");
    let load = Load::start(&c, &users, 4);
    load.wait_progress(30, Duration::from_secs(30)).await;

    net.partition(1, 2);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fault = Instant::now();
    let out = ldc()
        .arg("--data-dir")
        .arg(&data)
        .args(["cell", "dr", "cutover", "--from", "r1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    load.wait_recovered(&affected, fault, Duration::from_secs(30))
        .await;
    for cell in ["r1-a", "r1-b", "r1-s"] {
        assert!(
            platform.shards_of(cell).is_empty(),
            "{cell} kept shards after the cutover"
        );
    }
    load.wait_progress(30, Duration::from_secs(30)).await;
    net.heal(1, 2);
    let LoadResult {
        acked,
        failed_attempts,
        ..
    } = load.stop_and_audit(&data, &c, &users).await;
    let r = recovery(&acked, &affected, fault);
    eprintln!(
        "dr cutover of a partitioned region: r1's users paid again after {:?}",
        r.max
    );
    fault_row(
        "DR cutover of a partitioned region",
        failed_attempts.len() as u64,
        Some(r.max),
        0,
        0,
    );
    drop(platform);
}
