//! Prometheus metrics of the operator.
//!
//! Why: the operator is the part of the platform that moves money's owners. When a cell
//! fails, the questions on call are "did the operator notice, how long did it take to move
//! the shards, which routing epoch is published, and which replica leads?" — the Topology
//! status answers them for one moment, these metrics answer them over time and can be
//! alerted on (reconcile errors by kind, failed operations, a failover delay above the
//! configured `notReadySeconds`, no leader).
//!
//! Every name starts with `ldc_operator_`:
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `ldc_operator_reconciles_total` | counter | `result` (`ok`/`error`) |
//! | `ldc_operator_reconcile_duration_seconds` | histogram | |
//! | `ldc_operator_reconcile_errors_total` | counter | `kind` ([`crate::controller::Error::label`]: `conflict`, `kube`, `store`, …) |
//! | `ldc_operator_operations_total` | counter | `kind` (`failover`, `switchover`, `dr-cutover`, `revert`, `auto-failover`, `auto-dr-cutover`), `result` (`Succeeded`/`Failed`) |
//! | `ldc_operator_shards_moved_total` | counter | `kind` |
//! | `ldc_operator_routing_epoch` | gauge | `topology` |
//! | `ldc_operator_cells` / `ldc_operator_cells_ready` | gauge | `topology` |
//! | `ldc_operator_cell_shards` | gauge | `topology`, `cell` |
//! | `ldc_operator_is_leader` | gauge | |
//! | `ldc_operator_failover_delay_seconds` | histogram | |
//!
//! An automatic failover that the planner refuses is retried every few seconds and counts
//! as one `Failed` operation per attempt, so `rate(...{result="Failed"}) > 0` is the alert.
//!
//! The hooks in the reconciler are one line each and go through [`OperatorMetrics`]
//! methods that hold the label logic, so it is tested here without a cluster. The HTTP
//! side is the admin port every LDC process serves ([`ldc_admin`]: `/metrics`,
//! `/healthz`, `/readyz`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use ldc_core::planner::Command;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

pub use ldc_admin::render;

/// Outcome of an operation, as in the Topology's history (`result` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpResult {
    Succeeded,
    Failed,
}

impl OpResult {
    pub fn as_str(self) -> &'static str {
        match self {
            OpResult::Succeeded => "Succeeded",
            OpResult::Failed => "Failed",
        }
    }
}

/// The `kind` label of an operation.
pub fn operation_kind(command: &Command, automatic: bool) -> &'static str {
    match command {
        Command::Failover { .. } if automatic => "auto-failover",
        Command::Failover { .. } => "failover",
        Command::Switchover { .. } => "switchover",
        Command::DrCutover { .. } if automatic => "auto-dr-cutover",
        Command::DrCutover { .. } => "dr-cutover",
        Command::Revert { .. } => "revert",
    }
}

/// How long the failed cell of `command` had been not ready at `now`: `None` for anything
/// but a failover, or when the cell was ready (a planned failover of a healthy cell).
pub fn failover_delay(
    command: &Command,
    not_ready_since: &BTreeMap<String, Option<Timestamp>>,
    now: Timestamp,
) -> Option<Duration> {
    let Command::Failover { cell } = command else {
        return None;
    };
    let since = (*not_ready_since.get(cell)?)?;
    Duration::try_from(now.duration_since(since)).ok()
}

/// Every metric the operator exports. Cheap to share (handles behind an `Arc<Context>`).
pub struct OperatorMetrics {
    pub reconciles: IntCounterVec,
    pub reconcile_seconds: Histogram,
    pub reconcile_errors: IntCounterVec,
    pub operations: IntCounterVec,
    pub shards_moved: IntCounterVec,
    pub routing_epoch: IntGaugeVec,
    pub cells: IntGaugeVec,
    pub cells_ready: IntGaugeVec,
    pub cell_shards: IntGaugeVec,
    pub is_leader: IntGauge,
    pub failover_delay_seconds: Histogram,
    /// Cells last reported per topology, so series of deleted cells are removed.
    known_cells: Mutex<BTreeMap<String, BTreeSet<String>>>,
}

impl OperatorMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> Result<OperatorMetrics, prometheus::Error> {
        let m = OperatorMetrics {
            reconciles: IntCounterVec::new(
                Opts::new(
                    "ldc_operator_reconciles_total",
                    "Topology reconciles by result (ok or error)",
                ),
                &["result"],
            )?,
            reconcile_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "ldc_operator_reconcile_duration_seconds",
                    "Time of one Topology reconcile (observe, act, plan, fence, report)",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
            )?,
            reconcile_errors: IntCounterVec::new(
                Opts::new(
                    "ldc_operator_reconcile_errors_total",
                    "Failed reconciles by error kind",
                ),
                &["kind"],
            )?,
            operations: IntCounterVec::new(
                Opts::new(
                    "ldc_operator_operations_total",
                    "Shard-ownership operations by kind and result",
                ),
                &["kind", "result"],
            )?,
            shards_moved: IntCounterVec::new(
                Opts::new(
                    "ldc_operator_shards_moved_total",
                    "Shards whose owner changed, by operation kind",
                ),
                &["kind"],
            )?,
            routing_epoch: IntGaugeVec::new(
                Opts::new(
                    "ldc_operator_routing_epoch",
                    "Epoch of the routing table committed and published for a topology",
                ),
                &["topology"],
            )?,
            cells: IntGaugeVec::new(
                Opts::new("ldc_operator_cells", "Cells of a topology"),
                &["topology"],
            )?,
            cells_ready: IntGaugeVec::new(
                Opts::new(
                    "ldc_operator_cells_ready",
                    "Cells of a topology whose serving colours have ready pods",
                ),
                &["topology"],
            )?,
            cell_shards: IntGaugeVec::new(
                Opts::new("ldc_operator_cell_shards", "Shards a cell owns"),
                &["topology", "cell"],
            )?,
            is_leader: IntGauge::new(
                "ldc_operator_is_leader",
                "1 while this replica holds the leader Lease (only the leader reconciles)",
            )?,
            failover_delay_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "ldc_operator_failover_delay_seconds",
                    "From a cell first seen not ready to its shards committed to new owners",
                )
                .buckets(vec![
                    1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0, 600.0,
                ]),
            )?,
            known_cells: Mutex::new(BTreeMap::new()),
        };
        registry.register(Box::new(m.reconciles.clone()))?;
        registry.register(Box::new(m.reconcile_seconds.clone()))?;
        registry.register(Box::new(m.reconcile_errors.clone()))?;
        registry.register(Box::new(m.operations.clone()))?;
        registry.register(Box::new(m.shards_moved.clone()))?;
        registry.register(Box::new(m.routing_epoch.clone()))?;
        registry.register(Box::new(m.cells.clone()))?;
        registry.register(Box::new(m.cells_ready.clone()))?;
        registry.register(Box::new(m.cell_shards.clone()))?;
        registry.register(Box::new(m.is_leader.clone()))?;
        registry.register(Box::new(m.failover_delay_seconds.clone()))?;
        Ok(m)
    }

    /// Metrics in a private registry (tests, and contexts built without a server).
    pub fn unregistered() -> OperatorMetrics {
        OperatorMetrics::new(&Registry::new()).expect("metric definitions are valid")
    }

    /// One reconcile finished after `elapsed`; `error` is the error's label, if it failed.
    pub fn reconciled(&self, elapsed: Duration, error: Option<&str>) {
        self.reconcile_seconds.observe(elapsed.as_secs_f64());
        let result = match error {
            None => "ok",
            Some(kind) => {
                self.reconcile_errors.with_label_values(&[kind]).inc();
                "error"
            }
        };
        self.reconciles.with_label_values(&[result]).inc();
    }

    /// An operation ended. `delay` is [`failover_delay`] for a failover of a failed cell.
    pub fn operation(
        &self,
        kind: &str,
        result: OpResult,
        shards_moved: u32,
        delay: Option<Duration>,
    ) {
        self.operations
            .with_label_values(&[kind, result.as_str()])
            .inc();
        if result == OpResult::Succeeded {
            self.shards_moved
                .with_label_values(&[kind])
                .inc_by(u64::from(shards_moved));
            if let Some(d) = delay.filter(|_| shards_moved > 0) {
                self.failover_delay_seconds.observe(d.as_secs_f64());
            }
        }
    }

    /// The state of `topology` after a reconcile: published epoch, cells and readiness,
    /// shards per cell (`cell_shards` names every cell of the topology, standby cells with
    /// 0). Series of cells no longer listed are removed.
    pub fn topology(
        &self,
        topology: &str,
        routing_epoch: u64,
        cell_shards: impl IntoIterator<Item = (String, u32)>,
        cells_ready: u32,
    ) {
        let cell_shards: BTreeMap<String, u32> = cell_shards.into_iter().collect();
        let t = [topology];
        self.routing_epoch
            .with_label_values(&t)
            .set(i64::try_from(routing_epoch).unwrap_or(i64::MAX));
        self.cells
            .with_label_values(&t)
            .set(cell_shards.len() as i64);
        self.cells_ready
            .with_label_values(&t)
            .set(i64::from(cells_ready));
        for (cell, n) in &cell_shards {
            self.cell_shards
                .with_label_values(&[topology, cell])
                .set(i64::from(*n));
        }
        let now: BTreeSet<String> = cell_shards.keys().cloned().collect();
        let mut known = self.known_cells.lock().expect("lock");
        let before = known.insert(topology.to_string(), now.clone());
        for gone in before.iter().flatten().filter(|c| !now.contains(*c)) {
            let _ = self.cell_shards.remove_label_values(&[topology, gone]);
        }
    }

    /// `topology` was deleted: its series go.
    pub fn forget_topology(&self, topology: &str) {
        let t = [topology];
        let _ = self.routing_epoch.remove_label_values(&t);
        let _ = self.cells.remove_label_values(&t);
        let _ = self.cells_ready.remove_label_values(&t);
        let gone = self.known_cells.lock().expect("lock").remove(topology);
        for cell in gone.iter().flatten() {
            let _ = self.cell_shards.remove_label_values(&[topology, cell]);
        }
    }
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        OperatorMetrics::unregistered()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (Registry, OperatorMetrics) {
        let r = Registry::new();
        let m = OperatorMetrics::new(&r).unwrap();
        (r, m)
    }

    /// The sample lines of `text` (no `# HELP`/`# TYPE`) that start with `prefix`.
    fn lines<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| !l.starts_with('#') && l.starts_with(prefix))
            .collect()
    }

    #[test]
    fn reconciles_are_counted_by_result_and_error_kind() {
        let (r, m) = setup();
        m.reconciled(Duration::from_millis(20), None);
        m.reconciled(Duration::from_millis(30), None);
        m.reconciled(Duration::from_secs(2), Some("kube"));
        let text = render(&r);
        assert!(text.contains("ldc_operator_reconciles_total{result=\"ok\"} 2\n"));
        assert!(text.contains("ldc_operator_reconciles_total{result=\"error\"} 1\n"));
        assert!(text.contains("ldc_operator_reconcile_errors_total{kind=\"kube\"} 1\n"));
        assert!(text.contains("ldc_operator_reconcile_duration_seconds_count 3\n"));
        assert!(text.contains("ldc_operator_reconcile_duration_seconds_bucket{le=\"0.025\"} 1\n"));
        assert!(text.contains("ldc_operator_reconcile_duration_seconds_bucket{le=\"0.05\"} 2\n"));
        assert!(text.contains("ldc_operator_reconcile_duration_seconds_bucket{le=\"2.5\"} 3\n"));
    }

    #[test]
    fn operations_count_by_kind_and_result_and_shards_only_on_success() {
        let (r, m) = setup();
        let fo = Command::Failover {
            cell: "r1-a".into(),
        };
        let auto = operation_kind(&fo, true);
        m.operation(auto, OpResult::Succeeded, 34, Some(Duration::from_secs(12)));
        m.operation(auto, OpResult::Failed, 0, Some(Duration::from_secs(40)));
        let sw = Command::Switchover {
            cell: "r1-a".into(),
            to: "r1-s".into(),
        };
        m.operation(operation_kind(&sw, false), OpResult::Succeeded, 10, None);
        let text = render(&r);
        for want in [
            "ldc_operator_operations_total{kind=\"auto-failover\",result=\"Succeeded\"} 1",
            "ldc_operator_operations_total{kind=\"auto-failover\",result=\"Failed\"} 1",
            "ldc_operator_operations_total{kind=\"switchover\",result=\"Succeeded\"} 1",
            "ldc_operator_shards_moved_total{kind=\"auto-failover\"} 34",
            "ldc_operator_shards_moved_total{kind=\"switchover\"} 10",
            // only the successful failover's delay is observed
            "ldc_operator_failover_delay_seconds_count 1",
            "ldc_operator_failover_delay_seconds_sum 12",
            "ldc_operator_failover_delay_seconds_bucket{le=\"10\"} 0",
            "ldc_operator_failover_delay_seconds_bucket{le=\"15\"} 1",
        ] {
            assert!(
                text.contains(&format!("{want}\n")),
                "missing {want} in\n{text}"
            );
        }
        // a failed operation moves nothing
        assert_eq!(lines(&text, "ldc_operator_shards_moved_total{").len(), 2);
    }

    #[test]
    fn operation_kinds() {
        let fo = Command::Failover { cell: "c".into() };
        assert_eq!(operation_kind(&fo, false), "failover");
        assert_eq!(operation_kind(&fo, true), "auto-failover");
        let dr = Command::DrCutover {
            from: "r1".into(),
            to: None,
        };
        assert_eq!(operation_kind(&dr, false), "dr-cutover");
    }

    #[test]
    fn failover_delay_is_measured_from_not_ready_since() {
        let now: Timestamp = "2025-01-01T00:00:30Z".parse().unwrap();
        let since = BTreeMap::from([
            (
                "r1-a".to_string(),
                Some("2025-01-01T00:00:18Z".parse().unwrap()),
            ),
            ("r1-b".to_string(), None),
        ]);
        let fo = |c: &str| Command::Failover { cell: c.into() };
        assert_eq!(
            failover_delay(&fo("r1-a"), &since, now),
            Some(Duration::from_secs(12))
        );
        assert_eq!(failover_delay(&fo("r1-b"), &since, now), None);
        assert_eq!(failover_delay(&fo("nope"), &since, now), None);
        let sw = Command::Switchover {
            cell: "r1-a".into(),
            to: "r1-s".into(),
        };
        assert_eq!(failover_delay(&sw, &since, now), None);
    }

    #[test]
    fn topology_gauges_follow_the_cells_and_drop_deleted_ones() {
        let (r, m) = setup();
        let shards = BTreeMap::from([
            ("r1-a".to_string(), 50),
            ("r1-b".to_string(), 50),
            ("r1-s".to_string(), 0),
        ]);
        m.topology("prod", 7, shards, 2);
        let text = render(&r);
        for want in [
            "ldc_operator_routing_epoch{topology=\"prod\"} 7",
            "ldc_operator_cells{topology=\"prod\"} 3",
            "ldc_operator_cells_ready{topology=\"prod\"} 2",
            "ldc_operator_cell_shards{cell=\"r1-a\",topology=\"prod\"} 50",
            "ldc_operator_cell_shards{cell=\"r1-s\",topology=\"prod\"} 0",
        ] {
            assert!(
                text.contains(&format!("{want}\n")),
                "missing {want} in\n{text}"
            );
        }

        // r1-a fails over to r1-s and is then deleted.
        let shards = BTreeMap::from([("r1-b".to_string(), 50), ("r1-s".to_string(), 50)]);
        m.topology("prod", 8, shards, 2);
        let text = render(&r);
        assert!(text.contains("ldc_operator_routing_epoch{topology=\"prod\"} 8\n"));
        assert!(text.contains("ldc_operator_cells{topology=\"prod\"} 2\n"));
        assert!(lines(&text, "ldc_operator_cell_shards{cell=\"r1-a\"").is_empty());
        assert_eq!(lines(&text, "ldc_operator_cell_shards{").len(), 2);

        m.forget_topology("prod");
        let text = render(&r);
        assert!(lines(&text, "ldc_operator_routing_epoch").is_empty());
        assert!(lines(&text, "ldc_operator_cell_shards").is_empty());
        assert!(lines(&text, "ldc_operator_cells").is_empty());
    }

    /// Every reconcile error arrives wrapped by the finalizer; its kind is the cause's.
    #[test]
    fn error_kinds_look_through_the_finalizer() {
        use crate::controller::Error;
        use kube::runtime::finalizer::Error as FinalizerError;
        let api = |code| {
            Error::Kube(kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..Default::default()
            })))
        };
        let wrapped = |e| Error::Finalizer(Box::new(FinalizerError::ApplyFailed(e)));
        assert_eq!(wrapped(api(500)).label(), "kube");
        assert_eq!(wrapped(api(409)).label(), "conflict");
        assert_eq!(api(409).label(), "conflict");
        assert_eq!(wrapped(Error::NoNamespace).label(), "no_namespace");
        let cleanup = Error::Finalizer(Box::new(FinalizerError::CleanupFailed(Error::Join(
            "panicked".into(),
        ))));
        assert_eq!(cleanup.label(), "join");
        let unnamed = Error::Finalizer(Box::new(FinalizerError::UnnamedObject));
        assert_eq!(unnamed.label(), "finalizer");

        let (r, m) = setup();
        m.reconciled(Duration::from_millis(1), Some(wrapped(api(409)).label()));
        assert!(render(&r).contains("ldc_operator_reconcile_errors_total{kind=\"conflict\"} 1\n"));
    }

    #[test]
    fn leader_gauge_starts_at_zero() {
        let (r, m) = setup();
        assert!(render(&r).contains("ldc_operator_is_leader 0\n"));
        m.is_leader.set(1);
        assert!(render(&r).contains("ldc_operator_is_leader 1\n"));
    }
}
