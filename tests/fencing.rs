//! Fencing with two real cell processes on one store: cell A owns a shard at epoch 1 and
//! keeps running after the shard is switched to cell B (epoch 2), like a cell cut off by a
//! failover. A, still sent requests, can no longer commit anything: it answers "moved" with
//! B and epoch 2 and writes nothing; B commits. Writes racing with the switch are each
//! committed by exactly one of them. Run for every layout of the embedded store's files.

mod common;

use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ldc_control::{self as control, CellRuntime};
use ldc_core::planner::{CellInfo, Topology};
use ldc_core::proto;
use ldc_store::Store;
use std::io::BufRead;

fn start_cell(data: &std::path::Path, cell: &str) -> (Child, String) {
    let mut child = ldc()
        .arg("--data-dir")
        .arg(data)
        .args(["cell", "serve", "--cell", cell, "--no-relay"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("listen="))
        .expect("ready line")
        .to_string();
    (child, addr)
}

/// One store file for every shard (a store created before shard files).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposed_owner_cannot_commit_in_one_file() {
    deposed_owner_cannot_commit(&[]).await;
}

/// `ldc up`'s layout: the shards of each group that moves together in their own file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposed_owner_cannot_commit_in_shard_group_files() {
    deposed_owner_cannot_commit(&[(0, 1), (2, 3)]).await;
}

/// A file per shard, one shard (16..) left in the control file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposed_owner_cannot_commit_in_a_file_per_shard() {
    deposed_owner_cannot_commit(&[(0, 0), (1, 1), (2, 2)]).await;
}

/// Shard files `layout` (none: one file).
async fn deposed_owner_cannot_commit(layout: &[(u32, u32)]) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    let path = data.join("store.db");
    if !layout.is_empty() {
        let made = ldc_store::partitioned::create(&path, layout).unwrap();
        assert_eq!(made, ldc_store::partitioned::Created::New);
    }
    let store: Arc<dyn Store> = ldc_store::open(&path.display().to_string()).unwrap();
    let topo = Topology {
        shard_count: 4,
        cells: vec![
            CellInfo {
                id: "a".into(),
                region: "r1".into(),
                capacity: None,
            },
            CellInfo {
                id: "b".into(),
                region: "r1".into(),
                capacity: None,
            },
        ],
    };
    {
        let mut t = store.begin().unwrap();
        control::init(&mut *t, &topo, &["a"], 0).unwrap();
        for c in ["a", "b"] {
            let rt = CellRuntime {
                region: "r1".into(),
                healthy: true,
                ..Default::default()
            };
            control::put_cell_runtime(&mut *t, c, &rt).unwrap();
        }
        t.commit().unwrap();
    }
    ldc_security::platform::ensure_local(
        &ldc_security::pki::Pki::new(data.join("pki")),
        ["a", "b"],
    )
    .unwrap();
    let (mut a, a_addr) = start_cell(&data, "a");
    let (mut b, b_addr) = start_cell(&data, "b");
    // Cells take payment calls from routers only: this test is the router.
    let (ca, cb) = (
        client_as(&data, &a_addr, ldc_security::platform::ROUTER),
        client_as(&data, &b_addr, ldc_security::platform::ROUTER),
    );
    let user = "alice";
    open_and_fund(&ca, user, 1_000).await;

    // Writers hammer A with distinct top-ups of 1 while the shard moves to B.
    let stop_at = Instant::now() + Duration::from_millis(1500);
    let mut tasks = Vec::new();
    for w in 0..4 {
        let ca = ca.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut moved) = (0i64, 0);
            let mut n = 0;
            while Instant::now() < stop_at {
                n += 1;
                let m = proto::TopUpRequest {
                    user_id: "alice".into(),
                    amount: 1,
                    currency: "EUR".into(),
                    idempotency_key: format!("w{w}-{n}"),
                };
                match ca.clone().top_up(req("alice", m)).await {
                    Ok(_) => ok += 1,
                    Err(s) if s.code() == tonic::Code::Unavailable => {
                        assert_eq!(s.metadata().get(ldc_core::MOVED_OWNER).unwrap(), "b");
                        assert_eq!(s.metadata().get(ldc_core::MOVED_EPOCH).unwrap(), "2");
                        moved += 1;
                    }
                    Err(s) => panic!("unexpected {s:?}"),
                }
            }
            (ok, moved)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = ldc()
        .arg("--data-dir")
        .arg(&data)
        .args(["cell", "switchover", "a", "--to", "b"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "switchover: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (mut acked_by_a, mut moved) = (0, 0);
    for t in tasks {
        let (o, m) = t.await.unwrap();
        acked_by_a += o;
        moved += m;
    }
    assert!(
        acked_by_a > 0 && moved > 0,
        "the race did not happen (acked {acked_by_a}, moved {moved})"
    );

    // A is still running but fenced: a write is refused and changes nothing.
    let bal = |c: proto::payments_client::PaymentsClient<tonic::transport::Channel>| async move {
        c.clone()
            .get_balance(req(
                "alice",
                proto::GetBalanceRequest {
                    user_id: "alice".into(),
                },
            ))
            .await
            .map(|r| r.into_inner())
    };
    let before = bal(cb.clone()).await.unwrap();
    assert_eq!(
        before.balance,
        1_000 + acked_by_a,
        "exactly the top-ups A acknowledged are in the ledger"
    );
    assert_eq!((before.cell.as_str(), before.epoch), ("b", 2));
    let m = proto::TopUpRequest {
        user_id: "alice".into(),
        amount: 5,
        currency: "EUR".into(),
        idempotency_key: "late".into(),
    };
    let s = ca
        .clone()
        .top_up(req("alice", m.clone()))
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unavailable);
    assert!(
        bal(ca.clone()).await.is_err(),
        "A must not serve reads of a shard it lost either"
    );
    assert_eq!(
        bal(cb.clone()).await.unwrap().balance,
        before.balance,
        "the deposed cell committed a write"
    );
    // The same request (same key) at the owner applies once.
    cb.clone().top_up(req("alice", m.clone())).await.unwrap();
    cb.clone().top_up(req("alice", m)).await.unwrap();
    assert_eq!(bal(cb.clone()).await.unwrap().balance, before.balance + 5);
    assert!(ldc_cell::reconcile::run(&*store).unwrap().is_clean());

    for c in [&mut a, &mut b] {
        terminate(c);
    }
}
