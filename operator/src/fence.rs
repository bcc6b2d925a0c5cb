//! The operator's store executor: fence first, then route.
//!
//! One store transaction applies a plan (a compare-and-set per ownership record with the
//! epoch bump, [`ldc_control::apply_plan`]), records the move ([`ldc_control::moves`]) so a re-run
//! after a crash does not plan again, and writes the next routing table (epoch + 1) under
//! [`ldc_core::routing::STORE_KEY`]. Only after that commit does the reconciler publish the
//! same table to the ConfigMap routers watch. So the epoch lives with the ownership it
//! describes (monotonic across operator restarts, even if the ConfigMap is deleted), and a
//! router can never see a table that names an owner the store has not fenced.
//!
//! Everything here is synchronous (store transactions are); callers use `spawn_blocking`.

use std::sync::Arc;

use ldc_control::moves::{self, MoveRecord};
use ldc_control::{self as control, ControlError, keys};
use ldc_core::planner::{Plan, ShardMap, Topology};
use ldc_core::routing::RoutingTable;
use ldc_security::table::TableSigner;
use ldc_store::{Store, StoreError, Txn};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum FenceError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(
        "no Cell has role serving, so the platform cannot be created; mark at least one cell serving"
    )]
    NoServingCell,
}

impl FenceError {
    /// A stable label for metrics and events.
    pub fn label(&self) -> &'static str {
        match self {
            FenceError::Store(_) => "store",
            FenceError::Control(ControlError::StalePlan { .. }) => "stale_plan",
            FenceError::Control(ControlError::ShardCountChanged { .. }) => "shard_count",
            FenceError::Control(_) => "control",
            FenceError::NoServingCell => "no_serving_cell",
        }
    }
}

/// The outcome of one [`commit_step`].
#[derive(Debug, Clone)]
pub struct Step {
    /// Ownership after the step.
    pub map: ShardMap,
    /// The routing table in the store after the step (new or unchanged).
    pub table: RoutingTable,
    /// Whether a new table was written.
    pub table_changed: bool,
    /// The table as stored (its JSON) and the publisher's signature of those bytes: what
    /// the routing ConfigMap carries, byte for byte.
    pub published: (String, Option<String>),
    /// The move's record, when one was given (applied now, or by an earlier run when its id
    /// was recorded already: then nothing moved again).
    pub op: Option<MoveRecord>,
}

/// Opens a store by spec (`tikv://...` or a SQLite path).
pub fn open(spec: &str) -> Result<Arc<dyn Store>, FenceError> {
    Ok(ldc_store::open(spec)?)
}

fn finish<T>(txn: Box<dyn Txn>, r: Result<T, FenceError>) -> Result<T, FenceError> {
    match r {
        Ok(v) => {
            txn.commit()?;
            Ok(v)
        }
        Err(e) => {
            let _ = txn.rollback();
            Err(e)
        }
    }
}

/// Creates the platform in the store if it is empty (initial map over `serving`, epoch 1)
/// and returns the ownership map. Checks the shard count never changed.
pub fn ensure_initialised(
    store: &dyn Store,
    topo: &Topology,
    serving: &[String],
    now_ms: u64,
) -> Result<ShardMap, FenceError> {
    let mut txn = store.begin()?;
    let r = (|| {
        let kv = &mut *txn;
        // `init` checks that the shard count never changed when the platform exists.
        match control::load_config(kv) {
            Err(ControlError::NotInitialised) if serving.is_empty() => {
                return Err(FenceError::NoServingCell);
            }
            Err(ControlError::NotInitialised) | Ok(_) => {
                let refs: Vec<&str> = serving.iter().map(String::as_str).collect();
                control::init(kv, topo, &refs, now_ms)?;
            }
            Err(e) => return Err(e.into()),
        }
        Ok(control::load_map(kv, topo.shard_count)?)
    })();
    finish(txn, r)
}

/// Reads the ownership map and the stored routing table.
pub fn load(
    store: &dyn Store,
    shard_count: u32,
) -> Result<(ShardMap, Option<RoutingTable>), FenceError> {
    let mut txn = store.begin_read()?;
    let r = (|| {
        let kv = &mut *txn;
        Ok((
            control::load_map(kv, shard_count)?,
            control::load_routing(kv)?,
        ))
    })();
    finish(txn, r)
}

/// Whether move `id` of `scope` was already applied (and what it did).
pub fn applied_op(
    store: &dyn Store,
    scope: &str,
    id: &str,
) -> Result<Option<MoveRecord>, FenceError> {
    let mut txn = store.begin_read()?;
    let r = moves::get(&mut *txn, &keys::operator_moves_prefix(scope), id, false)
        .map_err(FenceError::from);
    finish(txn, r)
}

/// A move for [`commit_step`]: its id, who asked, and its plan.
pub struct StepMove<'a> {
    pub id: &'a str,
    pub by: &'a str,
    pub plan: &'a Plan,
}

/// One fenced step in one transaction: apply the move's plan unless its id is already
/// recorded (then nothing moves again), then store the routing table `build` makes from
/// the new map if it differs from the stored one ([`RoutingTable::succeeding`]). `build`
/// returns a table with any epoch; the epoch is set here.
pub fn commit_step(
    store: &dyn Store,
    shard_count: u32,
    scope: &str,
    op: Option<StepMove<'_>>,
    build: impl Fn(&ShardMap) -> RoutingTable,
    signer: Option<&TableSigner>,
) -> Result<Step, FenceError> {
    let mut txn = store.begin()?;
    let prefix = keys::operator_moves_prefix(scope);
    let r = (|| {
        let kv = &mut *txn;
        let mut record = None;
        let mut fresh = None;
        if let Some(m) = &op {
            record = moves::get(kv, &prefix, m.id, true)?;
            if record.is_none() {
                // Fence: every moved shard must still be where the plan saw it.
                control::apply_plan(kv, m.plan)?;
                fresh = Some(m.plan);
            }
        }
        let map = control::load_map(kv, shard_count)?;
        let prev = control::load_routing(kv)?;
        let (table, table_changed, published) = match build(&map).succeeding(prev.as_ref()) {
            Some(t) => {
                let published = control::store_routing(kv, &t, signer)?;
                (t, true, published)
            }
            None => {
                let t = prev.expect("unchanged implies a previous table");
                let json = kv
                    .get(keys::ROUTING)?
                    .and_then(|b| String::from_utf8(b).ok())
                    .unwrap_or_default();
                let sig = kv
                    .get(keys::ROUTING_SIGNATURE)?
                    .and_then(|b| String::from_utf8(b).ok());
                let published = match (sig, signer) {
                    (Some(sig), _) => (json, Some(sig)),
                    // Stored unsigned (an older operator, or --insecure): sign it now,
                    // routers take only signed tables.
                    (None, Some(_)) => control::store_routing(kv, &t, signer)?,
                    (None, None) => (json, None),
                };
                (t, false, published)
            }
        };
        if let (Some(plan), Some(m)) = (fresh, &op) {
            let rec = MoveRecord::of(m.id, plan, table.epoch, m.by, ldc_core::clock::now_ms());
            moves::put(kv, &prefix, &rec)?;
            record = Some(rec);
        }
        Ok(Step {
            map,
            table,
            table_changed,
            published,
            op: record,
        })
    })();
    finish(txn, r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ldc_core::planner::{self, CellInfo, Command, Health};
    use ldc_core::routing::{CellRoute, ShardRoute};
    use std::collections::BTreeMap;

    fn topo() -> Topology {
        let c = |id: &str| CellInfo {
            id: id.into(),
            region: "r1".into(),
            capacity: None,
        };
        Topology {
            shard_count: 4,
            cells: vec![c("a"), c("b"), c("s")],
        }
    }

    fn build(map: &ShardMap) -> RoutingTable {
        RoutingTable {
            epoch: 0,
            shards: map
                .owners
                .iter()
                .map(|o| ShardRoute {
                    cell: o.cell.clone(),
                    epoch: o.epoch,
                })
                .collect(),
            cells: ["a", "b", "s"]
                .iter()
                .map(|c| (c.to_string(), CellRoute::default()))
                .collect(),
        }
    }

    #[test]
    fn fence_then_route_and_replay_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path().join("s.db").to_str().unwrap()).unwrap();
        let serving = vec!["a".to_string(), "b".to_string()];
        let map = ensure_initialised(&*store, &topo(), &serving, 0).unwrap();
        assert_eq!(map.owned_by("a"), vec![0, 1]);
        let s0 = commit_step(&*store, 4, "ns/t", None, build, None).unwrap();
        assert_eq!((s0.table.epoch, s0.table_changed), (1, true));
        let again = commit_step(&*store, 4, "ns/t", None, build, None).unwrap();
        assert_eq!((again.table.epoch, again.table_changed), (1, false));

        let health: BTreeMap<String, Health> = [("b", Health::Healthy), ("s", Health::Healthy)]
            .iter()
            .map(|(c, h)| (c.to_string(), *h))
            .collect();
        let plan = planner::plan(
            &topo(),
            &map,
            &health,
            &Command::Failover { cell: "a".into() },
        )
        .unwrap();
        let s1 = commit_step(
            &*store,
            4,
            "ns/t",
            Some(StepMove {
                id: "op1",
                by: "me",
                plan: &plan,
            }),
            build,
            None,
        )
        .unwrap();
        assert_eq!(s1.map.owned_by("s"), vec![0, 1]);
        assert_eq!(s1.map.owners[0].epoch, 2, "epoch bumped in the store");
        assert_eq!(s1.table.epoch, 2);
        assert_eq!(s1.table.shards[0].cell, "s");
        assert_eq!(s1.op.as_ref().unwrap().routing_epoch, 2);

        // A re-run of the same operation (operator restarted before recording it) moves nothing.
        let s2 = commit_step(
            &*store,
            4,
            "ns/t",
            Some(StepMove {
                id: "op1",
                by: "me",
                plan: &plan,
            }),
            build,
            None,
        )
        .unwrap();
        assert_eq!(s2.map, s1.map);
        assert_eq!((s2.table.epoch, s2.table_changed), (2, false));
        assert_eq!(s2.op, s1.op);
        assert_eq!(s1.op.as_ref().unwrap().moved_from["a"], vec![0, 1]);
        assert_eq!(applied_op(&*store, "ns/t", "op1").unwrap(), s1.op);

        // The same plan under a new id is stale: the fence refuses it and nothing changes.
        let err = commit_step(
            &*store,
            4,
            "ns/t",
            Some(StepMove {
                id: "op2",
                by: "me",
                plan: &plan,
            }),
            build,
            None,
        )
        .unwrap_err();
        assert_eq!(err.label(), "stale_plan");
        assert_eq!(load(&*store, 4).unwrap().0, s1.map);

        let bad = ensure_initialised(
            &*store,
            &Topology {
                shard_count: 5,
                ..topo()
            },
            &serving,
            0,
        );
        assert!(matches!(
            bad,
            Err(FenceError::Control(ControlError::ShardCountChanged {
                stored: 4,
                asked: 5
            }))
        ));
    }
}
