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

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use ldc_core::proto::{self, PaymentKind, PaymentStatus, payments_client::PaymentsClient};
use ldc_core::routing::{Colour, colour_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

/// One platform at a time: each is 13 processes on a small machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SHARDS: u32 = 100;
const CELL: &str = "r1-a";

#[derive(Debug, Clone)]
struct Acked {
    user: String,
    key: String,
    kind: PaymentKind,
    amount: i64,
    to: Option<String>,
    payment_id: String,
}

/// Continuous payments by a few workers until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
    /// Calls answered with an error (each later retried with the same key).
    failed_attempts: Arc<AtomicU64>,
    /// Payments never acknowledged (the last answer was an error).
    failed_payments: Arc<AtomicU64>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(c: &PaymentsClient<Channel>, users: &[String], workers: usize) -> Load {
        let l = Load {
            stop: Arc::default(),
            acked: Arc::default(),
            failed_attempts: Arc::default(),
            failed_payments: Arc::default(),
            workers: Vec::new(),
        };
        let mut handles = Vec::new();
        for w in 0..workers {
            let (c, users, stop, acked, attempts, failed) = (
                c.clone(),
                users.to_vec(),
                l.stop.clone(),
                l.acked.clone(),
                l.failed_attempts.clone(),
                l.failed_payments.clone(),
            );
            handles.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let i = (w * 7 + n as usize) % users.len();
                    let u = users[i].clone();
                    let key = format!("w{w}-{n}");
                    let deadline = Instant::now() + Duration::from_secs(30);
                    let (kind, amount, to, r) = if n.is_multiple_of(3) {
                        let m = proto::TopUpRequest {
                            user_id: u.clone(),
                            amount: 7,
                            currency: "EUR".into(),
                            idempotency_key: key.clone(),
                        };
                        let r = call_until(deadline, || {
                            attempts.fetch_add(1, Ordering::Relaxed);
                            let mut c = c.clone();
                            let r = req(&u, m.clone());
                            async move { c.top_up(r).await }
                        })
                        .await;
                        (PaymentKind::TopUp, 7, None, r)
                    } else {
                        let to = users[(i + 5) % users.len()].clone();
                        let m = proto::TransferRequest {
                            user_id: u.clone(),
                            to_user_id: to.clone(),
                            amount: 3,
                            currency: "EUR".into(),
                            idempotency_key: key.clone(),
                        };
                        let r = call_until(deadline, || {
                            attempts.fetch_add(1, Ordering::Relaxed);
                            let mut c = c.clone();
                            let r = req(&u, m.clone());
                            async move { c.transfer(r).await }
                        })
                        .await;
                        (PaymentKind::TransferOut, 3, Some(to), r)
                    };
                    // The successful call is not a failed attempt.
                    match r {
                        Ok(p) => {
                            attempts.fetch_sub(1, Ordering::Relaxed);
                            acked.lock().unwrap().push(Acked {
                                user: u,
                                key,
                                kind,
                                amount,
                                to,
                                payment_id: p.payment_id,
                            });
                        }
                        Err(s) => {
                            eprintln!("payment {key} of {u} failed: {s:?}");
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        Load {
            workers: handles,
            ..l
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until `more` further payments are acknowledged: the load really ran across
    /// whatever just changed.
    async fn wait_progress(&self, more: usize, timeout: Duration) {
        let target = self.acked() + more;
        let deadline = Instant::now() + timeout;
        while self.acked() < target {
            assert!(
                Instant::now() < deadline,
                "load made no progress: {} of {target} payments acknowledged",
                self.acked()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) -> (Vec<Acked>, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.await.unwrap();
        }
        let acked = self.acked.lock().unwrap().clone();
        (
            acked,
            self.failed_attempts.load(Ordering::Relaxed),
            self.failed_payments.load(Ordering::Relaxed),
        )
    }
}

/// A plain HTTP/1.0 GET (metrics and admin endpoints); returns the body.
async fn http_get(addr: &str, path: &str) -> String {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let resp = tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .unwrap_or_else(|_| panic!("GET http://{addr}{path} timed out"))
        .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"));
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "GET http://{addr}{path}: {head}"
    );
    body.to_string()
}

/// Sum of a Prometheus counter over the series whose labels include every `labels` pair.
fn counter(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            if !(rest.is_empty() || rest.starts_with('{')) {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// The router's table epoch (from its `/table` admin endpoint).
async fn router_epoch(router: &str) -> u64 {
    let t: serde_json::Value = serde_json::from_str(&http_get(router, "/table").await).unwrap();
    t["epoch"].as_u64().unwrap()
}

async fn wait_router_epoch(router: &str, epoch: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while router_epoch(router).await < epoch {
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
    r["routing_epoch_after"].as_u64().unwrap()
}

/// `count` users on `cell` and `count` elsewhere (user ids are what decide the shard).
fn users_split(p: &Platform, cell: &str, count: usize) -> (Vec<String>, Vec<String>) {
    let shards: HashSet<u64> = p.cell(cell)["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
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

/// Every acknowledged payment applied exactly once, each transfer credited once, money
/// conserved, and a replay of each payment with its key returns the first result.
async fn verify(
    data: &std::path::Path,
    c: &PaymentsClient<Channel>,
    users: &[String],
    acked: &[Acked],
) {
    let report = wait_settled(data, Duration::from_secs(30));
    assert_eq!(report["clean"], true, "reconcile: {report:#}");
    let mut per_user: BTreeMap<&str, Vec<&Acked>> = BTreeMap::new();
    for a in acked {
        per_user.entry(a.user.as_str()).or_default().push(a);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut ids = HashSet::new();
    for (user, list) in &per_user {
        for a in list {
            assert!(
                ids.insert(a.payment_id.clone()),
                "two acknowledgements share payment id {}",
                a.payment_id
            );
            let m = proto::GetPaymentRequest {
                user_id: user.to_string(),
                payment_id: a.payment_id.clone(),
            };
            let p = call_until(deadline, || {
                let mut c = c.clone();
                let r = req(user, m.clone());
                async move { c.get_payment(r).await }
            })
            .await
            .unwrap_or_else(|s| panic!("acknowledged payment {} lost: {s:?}", a.payment_id));
            assert_eq!((p.kind, p.amount), (a.kind as i32, a.amount));
            if a.kind == PaymentKind::TransferOut {
                assert_eq!(
                    p.status,
                    PaymentStatus::Completed as i32,
                    "transfer {} not completed",
                    a.payment_id
                );
            }
        }
        let m = proto::ListEntriesRequest {
            user_id: user.to_string(),
            after_seq: 0,
            limit: 10_000,
        };
        let entries = call_until(deadline, || {
            let mut c = c.clone();
            let r = req(user, m.clone());
            async move { c.list_entries(r).await }
        })
        .await
        .unwrap();
        let own = entries
            .entries
            .iter()
            .filter(|e| {
                e.kind == PaymentKind::TopUp as i32 || e.kind == PaymentKind::TransferOut as i32
            })
            .count();
        assert_eq!(
            own,
            list.len() + 1,
            "user {user}: ledger has {own} own payments, {} were acknowledged (+1 funding)",
            list.len()
        );
    }
    let sent = acked
        .iter()
        .filter(|a| a.kind == PaymentKind::TransferOut)
        .count();
    let mut credits = 0;
    for u in users {
        let m = proto::ListEntriesRequest {
            user_id: u.clone(),
            after_seq: 0,
            limit: 10_000,
        };
        let e = call_until(deadline, || {
            let mut c = c.clone();
            let r = req(u, m.clone());
            async move { c.list_entries(r).await }
        })
        .await
        .unwrap();
        credits += e
            .entries
            .iter()
            .filter(|e| e.kind == PaymentKind::TransferIn as i32)
            .count();
    }
    assert_eq!(
        credits, sent,
        "every acknowledged transfer is credited exactly once"
    );
    // Idempotent replays: the same key gives the first result and applies nothing.
    for a in acked.iter().step_by(7) {
        let p = match a.kind {
            PaymentKind::TopUp => {
                let m = proto::TopUpRequest {
                    user_id: a.user.clone(),
                    amount: a.amount,
                    currency: "EUR".into(),
                    idempotency_key: a.key.clone(),
                };
                call_until(deadline, || {
                    let mut c = c.clone();
                    let r = req(&a.user, m.clone());
                    async move { c.top_up(r).await }
                })
                .await
            }
            _ => {
                let m = proto::TransferRequest {
                    user_id: a.user.clone(),
                    to_user_id: a.to.clone().unwrap(),
                    amount: a.amount,
                    currency: "EUR".into(),
                    idempotency_key: a.key.clone(),
                };
                call_until(deadline, || {
                    let mut c = c.clone();
                    let r = req(&a.user, m.clone());
                    async move { c.transfer(r).await }
                })
                .await
            }
        }
        .unwrap_or_else(|s| panic!("replay of {} failed: {s:?}", a.key));
        assert_eq!(p.payment_id, a.payment_id, "replay of {} differs", a.key);
    }
    let report = wait_settled(data, Duration::from_secs(30));
    assert_eq!(report["clean"], true, "reconcile after replays: {report:#}");
}

async fn fund(c: &PaymentsClient<Channel>, users: &[String]) {
    for u in users {
        open_and_fund(c, u, 100_000).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shift_cell_0_1_50_100_abort_under_load_without_a_failed_request() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ldc");
    let platform = Platform::start(&data, &[]);
    let c = client(&platform.router).await;
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
        &http_get(&platform.router, "/metrics").await,
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
        wait_router_epoch(&platform.router, epoch).await;
        assert_eq!(platform.cell(CELL)["green_weight_bp"], bp);
        load.wait_progress(40, Duration::from_secs(30)).await;
        for u in &on {
            let want = colour_for(u, bp);
            let got = serving_colour(&c, &metrics, u, None).await;
            assert_eq!(got, want, "user {u} at green {bp} bp");
            green_seen += usize::from(got == Colour::Green);
        }
    }
    let (acked, failed_attempts, failed_payments) = load.stop().await;
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
    let m = http_get(&platform.router, "/metrics").await;
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
    let steps: Vec<(u64, u64)> = h["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["before_bp"].as_u64().unwrap(),
                c["after_bp"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(steps, [(0, 100), (100, 5000), (5000, 10_000), (10_000, 0)]);
    verify(&data, &c, &users, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_with_a_stale_router_table_is_invisible_to_clients() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ldc");
    // The router re-reads the table only every 5 s, unless a "moved" answer asks it to.
    let platform = Platform::start(&data, &["--router-poll-ms", "5000"]);
    let c = client(&platform.router).await;
    let (on, off) = users_split(&platform, CELL, 12);
    let users: Vec<String> = on.iter().chain(&off).cloned().collect();
    fund(&c, &users).await;
    // Half of the cell's users on green, so the move crosses colours too.
    let epoch = traffic_shift(&platform, CELL, &["--green", "50"]);
    wait_router_epoch(&platform.router, epoch).await;

    let load = Load::start(&c, &users, 6);
    load.wait_progress(30, Duration::from_secs(30)).await;
    let moved_before = counter(
        &http_get(&platform.router, "/metrics").await,
        "ldc_router_moved_retries_total",
        &[],
    );
    let epoch_before = router_epoch(&platform.router).await;
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
    while router_epoch(&platform.router).await == epoch_before {
        assert!(
            Instant::now() < deadline,
            "the router did not refresh its table on a moved answer"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    load.wait_progress(60, Duration::from_secs(30)).await;
    let moved_after = counter(
        &http_get(&platform.router, "/metrics").await,
        "ldc_router_moved_retries_total",
        &[],
    );
    assert!(moved_after > moved_before, "no request met a moved answer");
    assert_eq!(platform.cell(CELL)["shards"].as_array().unwrap().len(), 0);

    let (acked, failed_attempts, failed_payments) = load.stop().await;
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
    verify(&data, &c, &users, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn green_process_killed_at_50_percent_is_ejected_and_replays_hide_it() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ldc");
    let platform = Platform::start(&data, &[]);
    let c = client(&platform.router).await;
    let (on, off) = users_split(&platform, CELL, 12);
    let users: Vec<String> = on.iter().chain(&off).cloned().collect();
    fund(&c, &users).await;
    let epoch = traffic_shift(&platform, CELL, &["--green", "50"]);
    wait_router_epoch(&platform.router, epoch).await;
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
    let (acked, failed_attempts, failed_payments) = load.stop().await;
    let m = http_get(&platform.router, "/metrics").await;
    let ejections = counter(&m, "ldc_router_ejections_total", &[]);
    eprintln!(
        "green killed: {} payments acknowledged, {failed_attempts} attempts retried, {ejections} ejections",
        acked.len()
    );
    assert!(ejections >= 1.0, "the dead endpoint was never ejected");
    assert_eq!(failed_payments, 0, "a payment was not acknowledged");
    verify(&data, &c, &users, &acked).await;
}
