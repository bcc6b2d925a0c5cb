//! Retention of idempotency records: kept for a documented window, then forgotten.
//!
//! Every mutating request leaves an idempotency record, so without retention a shard's
//! records grow with its payments forever. Like Stripe's (kept at least 24 hours), LDC's
//! promise is a window: a retry with the same key within [`RETENTION_DEFAULT`] (set with
//! `ldc cell serve --idempotency-retention-secs`) replays the first answer; after it, the
//! key is forgotten and a request with it is a new payment. Clients retry within seconds
//! or minutes; the window is for people re-running a command with `--key` the next day.
//!
//! The job runs in every cell process and prunes only the shards its cell owns, through
//! the writer: each `Prune` is fenced by the shard's epoch like a payment, so a cell that
//! lost a shard cannot touch it. Records are walked oldest first through their age index
//! (`keys::idempotency_by_age`), at most [`PRUNE_BATCH_MAX`] per command, so a prune is a
//! small batch among payments, never a long transaction.

use ldc_core::clock::now_ms;
use std::sync::Arc;
use std::time::Duration;

use ldc_store::Store;
use tokio::sync::watch;

use crate::ledger::{Command, Outcome};
use crate::metrics::CellMetrics;
use crate::writer::Writer;

/// How long an idempotency key is remembered by default.
pub const RETENTION_DEFAULT: Duration = Duration::from_secs(24 * 3600);
/// Most records one prune command forgets.
const PRUNE_BATCH_MAX: usize = 1_000;
/// Most prune commands per shard per round (the rest waits for the next round).
const PRUNE_ROUNDS_PER_SHARD_MAX: usize = 16;

/// Pure: how often the job looks, for a window: a tenth of it, within 1 s to 60 s.
pub fn interval(retention: Duration) -> Duration {
    (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Pure: the creation time before which records are forgotten at `now_ms`.
pub fn cutoff_ms(now_ms: u64, retention: Duration) -> u64 {
    now_ms.saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX))
}

/// Prunes the shards `cell` owns every [`interval`] until `stop`.
pub async fn run(
    store: Arc<dyn Store>,
    writer: Writer,
    cell: String,
    retention: Duration,
    metrics: CellMetrics,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval(retention)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let (s, c) = (store.clone(), cell.clone());
        let shards = tokio::task::spawn_blocking(move || {
            let mut t = s.begin_read()?;
            let owned = ldc_control::owned_shards(&mut *t, &c);
            let _ = t.rollback();
            owned.map_err(|e| ldc_store::StoreError::Backend(e.to_string()))
        })
        .await;
        let shards = match shards {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "retention: cannot read shard ownership");
                continue;
            }
            Err(_) => continue,
        };
        let before_ms = cutoff_ms(now_ms(), retention);
        for shard in shards {
            for _ in 0..PRUNE_ROUNDS_PER_SHARD_MAX {
                let cmd = Command::Prune {
                    shard,
                    before_ms,
                    limit: PRUNE_BATCH_MAX,
                };
                match writer.submit(cmd).await {
                    Ok((Outcome::Pruned(n), _)) => {
                        metrics.idempotency_pruned.inc_by(n as u64);
                        if n < PRUNE_BATCH_MAX {
                            break;
                        }
                    }
                    Ok(_) => break,
                    // Moved (the shard left), overloaded, stopping: the next round tries.
                    Err(e) => {
                        tracing::debug!(shard, error = %e, "retention: prune skipped");
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_looks_often_enough_for_its_window() {
        assert_eq!(interval(RETENTION_DEFAULT), Duration::from_secs(60));
        assert_eq!(interval(Duration::from_secs(20)), Duration::from_secs(2));
        assert_eq!(interval(Duration::from_secs(1)), Duration::from_secs(1));
    }

    #[test]
    fn the_cutoff_never_underflows() {
        assert_eq!(cutoff_ms(10_000, Duration::from_secs(3)), 7_000);
        assert_eq!(cutoff_ms(10, Duration::from_secs(3)), 0);
        assert_eq!(cutoff_ms(10, Duration::MAX), 0);
    }
}
