//! Readiness from progress, not from an open port.
//!
//! A cell whose writer is stuck (a hung disk, a held store lock, a wedged thread) still
//! accepts connections and answers RPCs that need no write; a TCP or plain gRPC health
//! check calls it healthy while every payment times out. So the cell's gRPC health is
//! SERVING only while its writer makes progress: the batch it works on (executing,
//! committing, or waiting to hand its commit to the syncers) is younger than
//! [`STALL_AFTER`], and so is the oldest unanswered heartbeat. A heartbeat goes through
//! the writer every [`HEARTBEAT_INTERVAL`] (a batch with a commit and a sync, like a
//! payment's), so an idle writer proves itself too; under load a full queue refuses the
//! heartbeat, and the payments' own batches are the signal. After a fail-stop alarm the
//! cell stays NOT_SERVING until its process leaves.
//!
//! Judged on batch age, the process that holds a shared store lock while stuck turns
//! NOT_SERVING before the processes waiting for that lock (their batches began later):
//! the local controller uses that order to fence the right one.
//!
//! The local controller, the router's active health checks and a kubelet's readiness
//! probe all ask this health service, so each of them sees a stuck writer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ldc_core::proto::payments_server::PaymentsServer;
use tokio::time::Instant;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::metrics::CellMetrics;
use crate::service::CellService;
use crate::writer::Writer;

/// How often a heartbeat is sent through the writer.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
/// How often progress is judged.
const JUDGE_INTERVAL: Duration = Duration::from_millis(100);
/// A batch or heartbeat older than this: the writer is stalled and the cell NOT_SERVING.
pub const STALL_AFTER: Duration = Duration::from_secs(3);

/// Pure: whether the cell serves, from the age of the writer's current batch and of the
/// oldest unanswered heartbeat (`None`: none), and whether the fail-stop alarm is raised.
pub fn serving(batch: Option<Duration>, heartbeat: Option<Duration>, alarm: bool) -> bool {
    !alarm && batch.is_none_or(|a| a <= STALL_AFTER) && heartbeat.is_none_or(|a| a <= STALL_AFTER)
}

/// The writer's progress for the HTTP readiness probe (`/readyz` on the metrics port, what
/// a kubelet asks): ready while the gRPC health is SERVING.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }
}

/// Sets every service name the cell answers health for.
pub(crate) async fn set(reporter: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status(
            <PaymentsServer<CellService> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}

/// Watches the writer's progress and publishes it as gRPC health until `stop`.
pub async fn run(
    writer: Writer,
    reporter: HealthReporter,
    readiness: Readiness,
    metrics: CellMetrics,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut serving_now = true;
    set(&reporter, serving_now).await;
    readiness.set(true);
    // The heartbeat in flight (one at most: a stuck one is not stacked on) and when it left.
    let mut beat: Option<(Instant, tokio::task::JoinHandle<()>)> = None;
    let mut last_beat = Instant::now();
    loop {
        if beat.as_ref().is_some_and(|(_, h)| h.is_finished()) {
            beat = None;
        }
        if beat.is_none() && last_beat.elapsed() >= HEARTBEAT_INTERVAL {
            let w = writer.clone();
            last_beat = Instant::now();
            beat = Some((
                last_beat,
                tokio::spawn(async move {
                    let _ = w.heartbeat().await;
                }),
            ));
        }
        tokio::select! {
            _ = tokio::time::sleep(JUDGE_INTERVAL) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let batch = writer.batch_age();
        let heartbeat = beat
            .as_ref()
            .filter(|(_, h)| !h.is_finished())
            .map(|(t, _)| t.elapsed());
        metrics.writer_stalled_seconds.set(
            batch
                .unwrap_or_default()
                .max(heartbeat.unwrap_or_default())
                .as_secs_f64(),
        );
        let now = serving(batch, heartbeat, writer.alarm().raised());
        if now != serving_now {
            serving_now = now;
            if now {
                tracing::info!("writer makes progress again: SERVING");
            } else {
                tracing::warn!(?batch, ?heartbeat, "writer makes no progress: NOT_SERVING");
            }
            set(&reporter, now).await;
            readiness.set(now);
        }
    }
    readiness.set(false);
    if let Some((_, b)) = beat {
        b.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn an_idle_or_moving_writer_serves() {
        assert!(serving(None, None, false));
        assert!(serving(Some(5 * MS), Some(400 * MS), false));
        assert!(serving(Some(STALL_AFTER), Some(STALL_AFTER), false));
    }

    #[test]
    fn an_old_batch_or_heartbeat_is_a_stall() {
        assert!(!serving(Some(STALL_AFTER + MS), None, false));
        assert!(!serving(None, Some(STALL_AFTER + MS), false));
        assert!(!serving(Some(MS), Some(STALL_AFTER + MS), false));
    }

    #[test]
    fn a_raised_alarm_is_never_serving() {
        assert!(!serving(None, None, true));
        assert!(!serving(Some(MS), Some(MS), true));
    }
}
