//! The platform on one machine with real processes: under continuous payments, `kill -9`
//! a serving cell; its shards move to the region's standby with bumped epochs; afterwards
//! every acknowledged payment is present exactly once, nothing is applied twice, money is
//! conserved, and a restart of the whole platform resumes with every balance intact.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use ldc_core::proto::{self, PaymentKind, PaymentStatus};

#[derive(Debug, Clone)]
struct Acked {
    user: String,
    kind: PaymentKind,
    amount: i64,
    payment_id: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_serving_cell_under_load_then_restart_platform() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ldc");
    let platform = Platform::start(&data, &[]);
    let c = client(&platform.router).await;

    let users: Vec<String> = (0..24).map(|i| format!("user-{i}")).collect();
    for u in &users {
        open_and_fund(&c, u, 100_000).await;
    }
    let victim = "r1-a";
    let victim_shards: Vec<u64> = platform.cell(victim)["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    assert!(!victim_shards.is_empty());
    assert!(
        users
            .iter()
            .any(|u| victim_shards.contains(&u64::from(ldc_core::shard::shard_of(u, 100)))),
        "no test user lives on the victim cell; pick other user names"
    );

    // Continuous payments: 6 workers, each payment retried with its key until acknowledged.
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let failed_calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop_at = Instant::now() + Duration::from_secs(6);
    let mut workers = Vec::new();
    for w in 0..6 {
        let (c, users, acked, failed_calls) = (
            c.clone(),
            users.clone(),
            acked.clone(),
            failed_calls.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < stop_at {
                n += 1;
                let i = (w * 7 + n as usize) % users.len();
                let u = users[i].clone();
                let key = format!("w{w}-{n}");
                let deadline = Instant::now() + Duration::from_secs(30);
                let (kind, amount, r) = if n.is_multiple_of(3) {
                    let m = proto::TopUpRequest {
                        user_id: u.clone(),
                        amount: 7,
                        currency: "EUR".into(),
                        idempotency_key: key,
                    };
                    let r = call_until(deadline, || {
                        failed_calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let mut c = c.clone();
                        let r = req(&u, m.clone());
                        async move { c.top_up(r).await }
                    })
                    .await;
                    (PaymentKind::TopUp, 7, r)
                } else {
                    let to = users[(i + 5) % users.len()].clone();
                    let m = proto::TransferRequest {
                        user_id: u.clone(),
                        to_user_id: to,
                        amount: 3,
                        currency: "EUR".into(),
                        idempotency_key: key,
                    };
                    let r = call_until(deadline, || {
                        failed_calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let mut c = c.clone();
                        let r = req(&u, m.clone());
                        async move { c.transfer(r).await }
                    })
                    .await;
                    (PaymentKind::TransferOut, 3, r)
                };
                failed_calls.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                let p = r.unwrap_or_else(|s| panic!("payment not acknowledged within 30 s: {s:?}"));
                acked.lock().unwrap().push(Acked {
                    user: u,
                    kind,
                    amount,
                    payment_id: p.payment_id,
                });
            }
        }));
    }

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before_kill = acked.lock().unwrap().len();
    let pid = platform.cell(victim)["pids"][0].as_u64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed_at = Instant::now();

    // The controller moves the victim's shards to the standby with an epoch bump.
    let mut moved_after = None;
    while killed_at.elapsed() < Duration::from_secs(20) {
        let s = platform.cell("r1-s");
        if s["shards"].as_array().unwrap().len() == victim_shards.len() {
            moved_after = Some(killed_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let moved_after = moved_after.expect("standby did not take the shards");
    let standby = platform.cell("r1-s");
    for s in &victim_shards {
        assert_eq!(
            standby["epochs"][s.to_string()],
            2,
            "shard {s} epoch not bumped"
        );
    }
    assert!(
        platform.cell(victim)["shards"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    for w in workers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let retries = failed_calls.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "failover: shards moved {:?} after kill -9; {} payments acknowledged ({} before the kill); {} calls retried",
        moved_after,
        acked.len(),
        before_kill,
        retries
    );
    assert!(
        acked.len() > before_kill,
        "no payment was acknowledged after the kill"
    );

    // Every acknowledged payment is present, once.
    let report = wait_settled(&data, Duration::from_secs(30));
    assert_eq!(report["clean"], true, "reconcile: {report:#}");
    let mut per_user: BTreeMap<&str, Vec<&Acked>> = BTreeMap::new();
    for a in &acked {
        per_user.entry(a.user.as_str()).or_default().push(a);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for (user, list) in &per_user {
        let mut seen = std::collections::HashSet::new();
        for a in list {
            assert!(
                seen.insert(a.payment_id.clone()),
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
        // Nothing applied twice: the user's ledger has exactly one entry per acknowledged
        // payment of theirs (plus the funding top-up and the credits they received).
        let m = proto::ListEntriesRequest {
            user_id: user.to_string(),
            after_seq: 0,
            limit: 1000,
        };
        let entries = call_until(deadline, || {
            let mut c = c.clone();
            let r = req(user, m.clone());
            async move { c.list_entries(r).await }
        })
        .await
        .unwrap();
        let own: usize = entries
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
    let received: usize = acked
        .iter()
        .filter(|a| a.kind == PaymentKind::TransferOut)
        .count();
    let mut credits = 0usize;
    for u in &users {
        let m = proto::ListEntriesRequest {
            user_id: u.clone(),
            after_seq: 0,
            limit: 1000,
        };
        let e = c
            .clone()
            .list_entries(req(u, m))
            .await
            .unwrap()
            .into_inner();
        credits += e
            .entries
            .iter()
            .filter(|e| e.kind == PaymentKind::TransferIn as i32)
            .count();
    }
    assert_eq!(
        credits, received,
        "every acknowledged transfer must be credited exactly once"
    );

    // Balances survive a full restart on the same data directory.
    let balances = |c: proto::payments_client::PaymentsClient<tonic::transport::Channel>,
                    users: Vec<String>| async move {
        let mut out = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        for u in users {
            let m = proto::GetBalanceRequest { user_id: u.clone() };
            let a = call_until(deadline, || {
                let mut c = c.clone();
                let r = req(&u, m.clone());
                async move { c.get_balance(r).await }
            })
            .await
            .unwrap();
            out.insert(u, a.balance);
        }
        out
    };
    let before = balances(c.clone(), users.clone()).await;
    let pids = platform.stop();
    for p in pids {
        assert!(!alive(p), "process {p} survived `ldc up` stopping");
    }
    let again = Platform::start(&data, &[]);
    let c2 = client(&again.router).await;
    let after = balances(c2, users.clone()).await;
    assert_eq!(before, after, "balances changed across a restart");
    assert_eq!(reconcile(&data)["clean"], true);
    // The standby kept the shards it took over: ownership is durable too.
    assert_eq!(
        again.cell("r1-s")["shards"].as_array().unwrap().len(),
        victim_shards.len()
    );
    again.stop();
}
