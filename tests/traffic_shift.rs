//! Blue/green releases and routing changes on the real platform (`ldc up`: a router, and a
//! blue and a green process per cell), under continuous payments through the router. Each
//! payment is retried with its idempotency key while the answer is UNAVAILABLE (or the
//! outcome unknown), as a client would. Afterwards: every acknowledged payment applied
//! exactly once, every transfer credited once, reconcile clean.
//!
//! * a cell shifted 0 -> 1 -> 50 -> 100% -> abort: no request fails at all, and at every
//!   weight each user is served by the colour `ldc_core::routing::colour_for` names (read
//!   from the blue and green processes' own request counters);
//! * a switchover while the router's table is stale (it polls every 5 s): the old owner
//!   answers "moved", the router refreshes and retries, and no request fails;
//! * the green process killed at 50%: the router ejects its endpoint, the controller fails
//!   the cell over and restarts the process, and idempotent replays hide it all.
//!
//! The three tests start a platform each (13 processes), so they take turns.

mod common;

use std::time::{Duration, Instant};

use common::payments::*;
use common::*;
use ldc_core::proto::{self, payments_client::PaymentsClient};
use ldc_core::routing::{Colour, colour_for};
use tonic::transport::Channel;

/// One platform at a time: each is 13 processes on a small machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SHARDS: u32 = 100;
const CELL: &str = "r1-a";
/// Longest wait for every cross-cell credit to be delivered before reconciling.
const SETTLE: Duration = Duration::from_secs(30);

/// The router's table epoch (from its `/table` admin endpoint).
async fn router_epoch(admin: &str) -> u64 {
    let t: serde_json::Value = serde_json::from_str(&http_get(admin, "/table").await).unwrap();
    t["epoch"].as_u64().unwrap()
}

async fn wait_router_epoch(admin: &str, epoch: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while router_epoch(admin).await < epoch {
        assert!(
            Instant::now() < deadline,
            "router did not take routing epoch {epoch}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `ldc cell traffic-shift CELL ARGS -o json`; returns the routing epoch it published.
fn traffic_shift(p: &Platform, cell: &str, args: &[&str]) -> u64 {
    let mut a = vec!["cell", "traffic-shift", cell];
    a.extend_from_slice(args);
    let r = ldc_json(&p.data, &a);
    r["routingEpochAfter"].as_u64().unwrap()
}

/// `count` users on `cell` and `count` elsewhere (user ids are what decide the shard).
fn users_split(p: &Platform, cell: &str, count: usize) -> (Vec<String>, Vec<String>) {
    let shards = p.shards_of(cell);
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for i in 0..10_000 {
        let u = format!("user-{i}");
        let mine = shards.contains(&u64::from(ldc_core::shard::shard_of(&u, SHARDS)));
        match (mine, on.len() < count, off.len() < count) {
            (true, true, _) => on.push(u),
            (false, _, true) => off.push(u),
            _ => {}
        }
        if on.len() == count && off.len() == count {
            break;
        }
    }
    (on, off)
}

/// The metrics addresses of a cell's blue and green processes.
fn colour_metrics(p: &Platform, cell: &str) -> (String, String) {
    let c = p.cell(cell);
    let m = |colour: &str| {
        c["colours"][colour]["metrics"]
            .as_str()
            .unwrap()
            .to_string()
    };
    (m("blue"), m("green"))
}

/// Which colour of `cell` serves `user` now: one GetBalance through the router, and the
/// blue and green processes' own request counters say who answered it.
async fn serving_colour(
    c: &PaymentsClient<Channel>,
    metrics: &(String, String),
    user: &str,
    forced: Option<Colour>,
) -> Colour {
    let count = |addr: String| async move {
        counter(
            &http_get(&addr, "/metrics").await,
            "ldc_cell_requests_total",
            &[("method", "GetBalance")],
        )
    };
    let (b0, g0) = (
        count(metrics.0.clone()).await,
        count(metrics.1.clone()).await,
    );
    let mut r = req(
        user,
        proto::GetBalanceRequest {
            user_id: user.into(),
        },
    );
    if let Some(f) = forced {
        r.metadata_mut()
            .insert(ldc_core::COLOUR_HEADER, f.as_str().parse().unwrap());
    }
    c.clone()
        .get_balance(r)
        .await
        .unwrap_or_else(|s| panic!("GetBalance of {user}: {s:?}"));
    let (b1, g1) = (
        count(metrics.0.clone()).await,
        count(metrics.1.clone()).await,
    );
    match (b1 - b0, g1 - g0) {
        (1.0, 0.0) => Colour::Blue,
        (0.0, 1.0) => Colour::Green,
        other => panic!("GetBalance of {user} counted {other:?} by (blue, green)"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shift_cell_0_1_50_100_abort_under_load_without_a_failed_request() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ldc");
    let platform = Platform::start(&data, &[]);
    let c = platform.client().await;
    let (on, off) = users_split(&platform, CELL, 16);
    let users: Vec<String> = on.iter().chain(&off).cloned().collect();
    fund(&c, &users).await;
    let metrics = colour_metrics(&platform, CELL);

    // The test header forces a colour when the table allows it (the default).
    assert_eq!(
        serving_colour(&c, &metrics, &on[0], Some(Colour::Green)).await,
        Colour::Green
    );

    let errors_before = counter(
        &http_get(&platform.admin, "/metrics").await,
        "ldc_router_errors_total",
        &[],
    );
    let load = Load::start(&c, &users, 6);
    load.wait_progress(30, Duration::from_secs(30)).await;
    let mut green_seen = 0;
    for (args, bp) in [
        (vec!["--green", "1"], 100u16),
        (vec!["--green", "50"], 5000),
        (vec!["--promote"], 10_000),
        (vec!["--abort"], 0),
    ] {
        let epoch = traffic_shift(&platform, CELL, &args);
        wait_router_epoch(&platform.admin, epoch).await;
        assert_eq!(platform.cell(CELL)["greenWeightBp"], bp);
        load.wait_progress(40, Duration::from_secs(30)).await;
        for u in &on {
            let want = colour_for(u, bp);
            let got = serving_colour(&c, &metrics, u, None).await;
            assert_eq!(got, want, "user {u} at green {bp} bp");
            green_seen += usize::from(got == Colour::Green);
        }
    }
    let LoadResult {
        acked,
        failed_attempts,
        failed_payments,
    } = load.stop().await;
    let failed_attempts = failed_attempts.len();
    eprintln!(
        "traffic shift: {} payments acknowledged, {failed_attempts} failed attempts, {green_seen} green answers checked",
        acked.len()
    );
    assert!(green_seen >= on.len(), "green served nobody");
    assert_eq!(failed_payments, 0, "payments failed");
    assert_eq!(
        failed_attempts, 0,
        "a weight change must not fail a request"
    );

    // The router's own counters agree: the cell got green traffic, and no error answers.
    let m = http_get(&platform.admin, "/metrics").await;
    assert!(
        counter(
            &m,
            "ldc_router_requests_total",
            &[("cell", CELL), ("colour", "green"), ("code", "OK")]
        ) > 0.0
    );
    assert_eq!(
        counter(&m, "ldc_router_errors_total", &[]),
        errors_before,
        "the router answered errors during the shifts"
    );

    // The audit trail recorded every change, in order.
    let h = ldc_json(&data, &["cell", "history", CELL]);
    let steps: Vec<(u64, u64)> = h["traffic"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["beforeBp"].as_u64().unwrap(),
                c["afterBp"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(steps, [(0, 100), (100, 5000), (5000, 10_000), (10_000, 0)]);
    verify(&|| wait_settled(&data, SETTLE), &c, &users, &acked, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_with_a_stale_router_table_is_invisible_to_clients() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ldc");
    // The router re-reads the table only every 5 s, unless a "moved" answer asks it to.
    let platform = Platform::start(&data, &["--router-poll-ms", "5000"]);
    let c = platform.client().await;
    let (on, off) = users_split(&platform, CELL, 12);
    let users: Vec<String> = on.iter().chain(&off).cloned().collect();
    fund(&c, &users).await;
    // Half of the cell's users on green, so the move crosses colours too.
    let epoch = traffic_shift(&platform, CELL, &["--green", "50"]);
    wait_router_epoch(&platform.admin, epoch).await;

    let load = Load::start(&c, &users, 6);
    load.wait_progress(30, Duration::from_secs(30)).await;
    let moved_before = counter(
        &http_get(&platform.admin, "/metrics").await,
        "ldc_router_moved_retries_total",
        &[],
    );
    let epoch_before = router_epoch(&platform.admin).await;
    let out = ldc()
        .arg("--data-dir")
        .arg(&data)
        .args(["cell", "switchover", CELL, "--to", "r1-s"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // The first request for a moved shard meets "moved"; the router refreshes at once,
    // long before its next poll.
    let deadline = Instant::now() + Duration::from_secs(4);
    while router_epoch(&platform.admin).await == epoch_before {
        assert!(
            Instant::now() < deadline,
            "the router did not refresh its table on a moved answer"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    load.wait_progress(60, Duration::from_secs(30)).await;
    let moved_after = counter(
        &http_get(&platform.admin, "/metrics").await,
        "ldc_router_moved_retries_total",
        &[],
    );
    assert!(moved_after > moved_before, "no request met a moved answer");
    assert_eq!(platform.cell(CELL)["shards"].as_array().unwrap().len(), 0);

    let LoadResult {
        acked,
        failed_attempts,
        failed_payments,
    } = load.stop().await;
    let failed_attempts = failed_attempts.len();
    eprintln!(
        "switchover: {} payments acknowledged, {failed_attempts} failed attempts, {} moved retries",
        acked.len(),
        moved_after - moved_before
    );
    assert_eq!(failed_payments, 0);
    assert_eq!(
        failed_attempts, 0,
        "a moved answer must be retried by the router, not seen by the client"
    );
    verify(&|| wait_settled(&data, SETTLE), &c, &users, &acked, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn green_process_killed_at_50_percent_is_ejected_and_replays_hide_it() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ldc");
    let platform = Platform::start(&data, &[]);
    let c = platform.client().await;
    let (on, off) = users_split(&platform, CELL, 12);
    let users: Vec<String> = on.iter().chain(&off).cloned().collect();
    fund(&c, &users).await;
    let epoch = traffic_shift(&platform, CELL, &["--green", "50"]);
    wait_router_epoch(&platform.admin, epoch).await;
    let green_user = on
        .iter()
        .find(|u| colour_for(u, 5000) == Colour::Green)
        .expect("a green user at 50%")
        .clone();

    let load = Load::start(&c, &users, 6);
    load.wait_progress(30, Duration::from_secs(30)).await;
    let before = platform.cell(CELL);
    let green_pid = before["colours"]["green"]["pid"].as_u64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(green_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // A request for a green user right away meets the dead endpoint: connect refused,
    // the endpoint is ejected, the answer is UNAVAILABLE and a replay succeeds.
    let m = proto::GetBalanceRequest {
        user_id: green_user.clone(),
    };
    call_until(Instant::now() + Duration::from_secs(20), || {
        let mut c = c.clone();
        let r = req(&green_user, m.clone());
        async move { c.get_balance(r).await }
    })
    .await
    .unwrap();

    // The controller fails the cell over (green carried traffic) and restarts green.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = platform.cell(CELL);
        let pid = s["colours"]["green"]["pid"].as_u64().unwrap();
        if pid != 0 && pid != green_pid && s["healthy"] == true {
            assert!(s["shards"].as_array().unwrap().is_empty());
            break;
        }
        assert!(Instant::now() < deadline, "green was not restarted: {s:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!alive(green_pid as u32));
    load.wait_progress(60, Duration::from_secs(30)).await;
    let LoadResult {
        acked,
        failed_attempts,
        failed_payments,
    } = load.stop().await;
    let failed_attempts = failed_attempts.len();
    let m = http_get(&platform.admin, "/metrics").await;
    let ejections = counter(&m, "ldc_router_ejections_total", &[]);
    eprintln!(
        "green killed: {} payments acknowledged, {failed_attempts} attempts retried, {ejections} ejections",
        acked.len()
    );
    assert!(ejections >= 1.0, "the dead endpoint was never ejected");
    assert_eq!(failed_payments, 0, "a payment was not acknowledged");
    verify(&|| wait_settled(&data, SETTLE), &c, &users, &acked, 0).await;
}
