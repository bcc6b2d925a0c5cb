//! The platform on one machine with real processes: under continuous payments, `kill -9`
//! a serving cell; its shards move to the region's standby with bumped epochs; afterwards
//! every acknowledged payment is present exactly once, nothing is applied twice, money is
//! conserved, and a restart of the whole platform resumes with every balance intact.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use common::payments::*;
use common::*;
use ldc_core::proto;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_serving_cell_under_load_then_restart_platform() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ldc");
    let platform = Platform::start(&data, &[]);
    let c = platform.client().await;

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
    let load = Load::start(&c, &users, 6);
    load.wait_progress(30, Duration::from_secs(30)).await;
    let before_kill = load.acked();
    let pid = pids(&platform.cell(victim))[0].as_u64().unwrap() as i32;
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

    let affected: HashSet<String> = users
        .iter()
        .filter(|u| victim_shards.contains(&u64::from(ldc_core::shard::shard_of(u, 100))))
        .cloned()
        .collect();
    load.wait_recovered(&affected, killed_at, Duration::from_secs(30))
        .await;
    let LoadResult {
        acked,
        failed_attempts,
        failed_payments,
    } = load.stop().await;
    let r = recovery(&acked, &affected, killed_at);
    eprintln!(
        "failover: shards moved {:?} after kill -9; {} payments acknowledged ({} before the kill); \
         {} calls retried; the victim's {} users paid again after {:?} (median {:?})",
        moved_after,
        acked.len(),
        before_kill,
        failed_attempts.len(),
        r.users,
        r.max,
        r.median,
    );
    assert_eq!(
        failed_payments, 0,
        "a payment was not acknowledged within 30 s"
    );

    // Every acknowledged payment is present, once; money is conserved.
    verify(
        &|| wait_settled(&data, Duration::from_secs(30)),
        &c,
        &users,
        &acked,
        0,
    )
    .await;

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
    let c2 = again.client().await;
    let after = balances(c2, users.clone()).await;
    assert_eq!(before, after, "balances changed across a restart");
    assert_eq!(reconcile(&data)["clean"], true);
    // The standby kept the shards it took over: ownership is durable too.
    assert_eq!(
        again.cell("r1-s")["shards"].as_array().unwrap().len(),
        victim_shards.len()
    );
    // The automatic failover is recorded; reverting it sends the shards home, epoch +1.
    let h = ldc_json(&data, &["cell", "history"]);
    let op = h["moves"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["command"] == format!("failover {victim}"))
        .unwrap_or_else(|| panic!("the failover is not in the history: {h}"));
    let id = op["id"].as_str().unwrap();
    assert!(id.starts_with("auto-failover-r1-a"), "{op}");
    let revert = || {
        ldc()
            .arg("--data-dir")
            .arg(&data)
            .args(["cell", "revert", id])
            .output()
            .unwrap()
    };
    let out = revert();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let home = again.cell(victim);
    assert_eq!(
        home["shards"].as_array().unwrap().len(),
        victim_shards.len()
    );
    for s in &victim_shards {
        assert_eq!(home["epochs"][s.to_string()], 3, "shard {s}");
    }
    // Reverting again has nothing to do, and says so.
    let out = revert();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already back"));
    again.stop();
}
