//! Developer tool: payments/s of the group-commit writer alone (no gRPC), on the embedded
//! store. `cargo run --release -p ldc-cell --example writer_throughput -- 64 5`
use std::sync::Arc;
use std::time::{Duration, Instant};

use ldc_cell::ledger::Command;
use ldc_cell::metrics::CellMetrics;
use ldc_cell::writer::{Writer, WriterConfig};
use ldc_core::planner::Topology;
use ldc_store::{Store, sqlite::SqliteStore};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let conc: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(64);
    let secs: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
    let topo = Topology::new(100, &[("c", "r")]);
    let mut t = store.begin().unwrap();
    ldc_control::init(&mut *t, &topo, &["c"], 0).unwrap();
    t.commit().unwrap();
    let reg = prometheus::Registry::new();
    let (w, _h) = Writer::start(
        store.clone(),
        WriterConfig {
            cell: "c".into(),
            shard_count: 100,
            queue_max: 65536,
            batch_max: 1024,
        },
        CellMetrics::new(&reg, "c", "blue"),
        Arc::new(tokio::sync::Notify::new()),
    );
    for u in 0..1000 {
        let user = format!("u{u}");
        w.submit(Command::OpenAccount {
            user,
            currency: "EUR".into(),
            key: format!("o{u}"),
        })
        .await
        .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = vec![];
    for c in 0..conc {
        let w = w.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let user = format!("u{}", (c * 131 + n as usize) % 1000);
                w.submit(Command::TopUp {
                    user,
                    amount: 1,
                    currency: "EUR".into(),
                    key: format!("{c}-{n}"),
                })
                .await
                .unwrap();
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    println!(
        "{} payments in {secs}s = {:.0}/s (concurrency {conc})",
        total,
        total as f64 / secs as f64
    );
    print!(
        "{}",
        ldc_cell::metrics::render(&reg)
            .lines()
            .filter(|l| l.contains("batch_commands_sum")
                || l.contains("batch_commands_count")
                || l.contains("batch_seconds_sum"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    println!();
}
