//! Group commit: one writer thread per cell process turns many concurrent commands into
//! one store transaction and one sync.
//!
//! Durability costs one fsync per commit (~150 µs here), which caps a one-command-per-commit
//! design at a few thousand payments per second. The writer drains whatever is queued (up to
//! `batch_max`), fences each shard the batch touches once, runs each command in its own
//! [`Overlay`] (so a refused payment leaves nothing behind), commits once, and only then
//! answers every caller. No caller hears "ok" before its payment is on disk.
//!
//! A store error that may leave the transaction unusable (or a commit conflict) aborts the
//! whole batch; it is retried a bounded number of times, and callers then get a retryable
//! error. Because every mutating command is idempotent, a retry by the client is safe.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ldc_store::overlay::Overlay;
use ldc_store::{Store, StoreError};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::error::PaymentError;
use crate::ledger::{self, Command, Ctx, Outcome};
use crate::metrics::CellMetrics;

/// Default bound on queued commands (a limit on everything: beyond it callers get
/// RESOURCE_EXHAUSTED instead of unbounded latency).
pub const QUEUE_MAX: usize = 16_384;
/// Default most commands per store transaction.
pub const BATCH_MAX: usize = 1_024;
/// Attempts per batch when the store says retry.
const BATCH_ATTEMPTS: u32 = 4;

/// What a caller gets: the outcome and the shard epoch it was served at.
type Answer = Result<(Outcome, u64), PaymentError>;
type Reply = oneshot::Sender<Answer>;

struct Job {
    cmd: Command,
    reply: Reply,
}

/// Handle for submitting commands to the writer thread.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
}

pub struct WriterConfig {
    pub cell: String,
    pub shard_count: u32,
    pub queue_max: usize,
    pub batch_max: usize,
}

impl Writer {
    /// Starts the writer thread. It exits when every `Writer` handle is dropped.
    /// `outbox` is notified after a commit that queued outbox messages.
    pub fn start(
        store: Arc<dyn Store>,
        cfg: WriterConfig,
        metrics: CellMetrics,
        outbox: Arc<Notify>,
    ) -> (Writer, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(cfg.queue_max);
        let handle = std::thread::Builder::new()
            .name(format!("writer-{}", cfg.cell))
            .spawn(move || run(rx, store, cfg, metrics, outbox))
            .expect("spawn writer thread");
        (Writer { tx }, handle)
    }

    /// Submits a validated command; resolves once it is durably committed (or refused).
    /// Returns the outcome and the shard epoch it was served at.
    pub async fn submit(&self, cmd: Command) -> Answer {
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(Job { cmd, reply }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => return Err(PaymentError::Overloaded),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(PaymentError::ShuttingDown),
        }
        rx.await.unwrap_or(Err(PaymentError::ShuttingDown))
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn run(
    mut rx: mpsc::Receiver<Job>,
    store: Arc<dyn Store>,
    cfg: WriterConfig,
    metrics: CellMetrics,
    outbox: Arc<Notify>,
) {
    let mut batch: Vec<Job> = Vec::with_capacity(cfg.batch_max);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < cfg.batch_max {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        metrics.batch_size.observe(batch.len() as f64);
        let started = Instant::now();
        let results = process(&*store, &cfg, &mut batch, &metrics);
        metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        let mut queued_outbox = false;
        for (job, result) in batch.drain(..).zip(results) {
            if result.is_ok()
                && matches!(job.cmd, Command::Transfer { .. } | Command::Refund { .. })
            {
                queued_outbox = true;
            }
            let _ = job.reply.send(result); // the caller may have gone away; that is fine
        }
        if queued_outbox {
            outbox.notify_one();
        }
    }
    tracing::info!(cell = %cfg.cell, "writer stopped");
}

/// Why a batch attempt was abandoned.
enum Abort {
    Store(StoreError),
    Fatal(PaymentError),
}

fn process(
    store: &dyn Store,
    cfg: &WriterConfig,
    batch: &mut [Job],
    metrics: &CellMetrics,
) -> Vec<Answer> {
    let mut last = None;
    for attempt in 0..BATCH_ATTEMPTS {
        if attempt > 0 {
            metrics.batch_retries.inc();
            std::thread::sleep(Duration::from_millis(2u64 << attempt));
        }
        match attempt_batch(store, cfg, batch) {
            Ok(results) => return results,
            Err(Abort::Store(e)) if e.is_retryable() => last = Some(e),
            Err(Abort::Store(e)) => {
                tracing::error!(error = %e, "batch failed");
                return batch
                    .iter()
                    .map(|_| Err(PaymentError::Store(clone_store_err(&e))))
                    .collect();
            }
            Err(Abort::Fatal(e)) => {
                tracing::error!(error = %e, "batch failed");
                let msg = e.to_string();
                return batch
                    .iter()
                    .map(|_| Err(PaymentError::Corrupt(msg.clone())))
                    .collect();
            }
        }
    }
    let e = last.expect("at least one attempt");
    batch
        .iter()
        .map(|_| Err(PaymentError::Store(clone_store_err(&e))))
        .collect()
}

fn clone_store_err(e: &StoreError) -> StoreError {
    match e {
        StoreError::Conflict => StoreError::Conflict,
        StoreError::Busy(s) => StoreError::Busy(s.clone()),
        StoreError::Backend(s) => StoreError::Backend(s.clone()),
        StoreError::Undetermined(s) => StoreError::Undetermined(s.clone()),
        StoreError::Config(s) => StoreError::Config(s.clone()),
    }
}

fn attempt_batch(
    store: &dyn Store,
    cfg: &WriterConfig,
    batch: &[Job],
) -> Result<Vec<Answer>, Abort> {
    let mut txn = store.begin().map_err(Abort::Store)?;
    // Writes of the whole batch are buffered and reach the store once per key at the end:
    // hot keys (a shard's clearing account, an active user's account) are written once per
    // batch instead of once per command.
    let mut batch_buf = Overlay::new(&mut *txn);
    let ctx = Ctx {
        cell: &cfg.cell,
        shard_count: cfg.shard_count,
        now_ms: now_ms(),
    };
    // Fence each shard once per batch: Ok(epoch) or the moved answer.
    let mut fences: HashMap<u32, Result<u64, (String, u64)>> = HashMap::new();
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        let shard = job.cmd.shard(cfg.shard_count);
        let fenced = match fences.get(&shard) {
            Some(f) => f.clone(),
            None => {
                let f = match ledger::fence(&mut batch_buf, &cfg.cell, shard) {
                    Ok(epoch) => Ok(epoch),
                    Err(PaymentError::Moved { owner, epoch, .. }) => Err((owner, epoch)),
                    Err(PaymentError::Store(e)) => return Err(Abort::Store(e)),
                    Err(e) => return Err(Abort::Fatal(e)),
                };
                fences.insert(shard, f.clone());
                f
            }
        };
        let epoch = match fenced {
            Ok(epoch) => epoch,
            Err((owner, epoch)) => {
                results.push(Err(PaymentError::Moved {
                    shard,
                    owner,
                    epoch,
                }));
                continue;
            }
        };
        let mut ov = Overlay::new(&mut batch_buf);
        match ledger::execute(&mut ov, &ctx, epoch, &job.cmd) {
            Ok(outcome) => {
                ov.merge().map_err(Abort::Store)?;
                results.push(Ok((outcome, epoch)));
            }
            Err(PaymentError::Store(e)) => return Err(Abort::Store(e)),
            Err(e @ PaymentError::Corrupt(_)) => return Err(Abort::Fatal(e)),
            Err(e) => results.push(Err(e)),
        }
    }
    batch_buf.merge().map_err(Abort::Store)?;
    txn.commit().map_err(Abort::Store)?;
    Ok(results)
}
