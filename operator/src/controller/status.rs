//! Phase 5, report: the status of every Cell and of the Topology, the operation's outcome
//! in history, and the events that go with them. What the status says is computed by the
//! pure functions here; the patches (only when something changed, the Topology's under the
//! resourceVersion the reconcile read) are at the bottom.

use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use ldc_control::moves::MoveRecord;
use ldc_core::planner::{self, Command};
use serde_json::json;

use super::context::{Context, Error, Note, set_finalizers};
use super::observe::{Cells, PodHealth};
use super::pending::{Pending, Rejected};
use crate::crd::{
    CELL_FINALIZER, Cell, CellStatus, HISTORY_MAX, OperationRecord, Topology, TopologyStatus,
};
use crate::fence::Step;
use crate::model;
use crate::specs;

/// The Topology's status as this reconcile starts it: what it was, with the fields that
/// follow the spec brought up to date.
pub fn start(topo: &Topology) -> TopologyStatus {
    let mut s = topo.status.clone().unwrap_or_default();
    s.observed_generation = topo.metadata.generation;
    s.regions = topo.spec.regions.join(",");
    s.routing_config_map = specs::routing_config_map_name(&topo.name_any());
    s
}

/// The status of a cell whose region the topology does not have.
pub fn unknown_region(topo: &Topology, c: &Cell, now: Timestamp) -> CellStatus {
    let mut st = c.status.clone().unwrap_or_default();
    let msg = format!(
        "region {} is not one of the topology's regions ({}); fix spec.region or the topology",
        c.spec.region,
        topo.spec.regions.join(",")
    );
    let generation = c.metadata.generation;
    model::set_condition(
        &mut st.conditions,
        "Ready",
        false,
        "UnknownRegion",
        msg,
        generation,
        now,
    );
    st
}

/// Why the spec's store cannot be used when the platform was created in another one (a
/// CRD without the immutability rule let the edit through): opening it would create a
/// second platform at epoch 1 beside the first, whose owners still hold their shards.
pub fn store_moved(topo: &Topology) -> Option<String> {
    let created_in = topo.status.as_ref().map_or("", |s| s.store.as_str());
    (!created_in.is_empty() && created_in != topo.spec.store).then(|| {
        format!(
            "spec.store was changed to {} but the platform lives in {created_in}; \
             nothing is done until spec.store is set back (moving a platform is a migration)",
            ldc_core::quote_prefix(&topo.spec.store, 64)
        )
    })
}

/// Records that the store cannot be used; the event is due only when this is news.
pub fn store_not_usable(
    topo: &Topology,
    status: &mut TopologyStatus,
    why: String,
    now: Timestamp,
) -> Option<Note> {
    let generation = topo.metadata.generation;
    let msg = why.clone();
    model::set_condition(
        &mut status.conditions,
        "Ready",
        false,
        "StoreNotUsable",
        msg,
        generation,
        now,
    );
    (*status != topo.status.clone().unwrap_or_default())
        .then(|| Note::warning("StoreNotUsable", why))
}

/// What became of this reconcile's operation.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Its shards moved (now or, when the store already recorded it, in an earlier run).
    Moved {
        pending: Pending,
        record: MoveRecord,
    },
    /// The planner refused it.
    Refused { pending: Pending, why: String },
}

impl Outcome {
    pub fn pending(&self) -> &Pending {
        match self {
            Outcome::Moved { pending, .. } | Outcome::Refused { pending, .. } => pending,
        }
    }
}

fn failed(id: &str, command: String, by: &str, why: String, now: Timestamp) -> OperationRecord {
    OperationRecord {
        id: id.into(),
        command,
        result: "Failed".into(),
        message: why,
        shards_moved: 0,
        routing_epoch: 0,
        moved_from: Default::default(),
        requested_by: by.into(),
        finished_at: now.to_string(),
    }
}

/// Appends `rec` to history (replacing an entry with its id), keeping the newest
/// [`HISTORY_MAX`].
pub fn push_history(status: &mut TopologyStatus, rec: OperationRecord) {
    status.history.retain(|h| h.id != rec.id);
    status.history.push(rec);
    let extra = status.history.len().saturating_sub(HISTORY_MAX);
    status.history.drain(..extra);
}

/// Records a request that could not become a command.
pub fn rejected(status: &mut TopologyStatus, r: &Rejected, now: Timestamp) {
    let rec = failed(&r.id, r.kind.clone(), &r.requested_by, r.why.clone(), now);
    push_history(status, rec);
}

/// Records the operation's outcome (history, the `FailoverBlocked` condition) and returns
/// its event. A refused automatic move is not put in history (it would be again every
/// reconcile); its condition says it instead, and goes once no move is refused.
pub fn operation(
    topo: &Topology,
    status: &mut TopologyStatus,
    outcome: Option<&Outcome>,
    now: Timestamp,
) -> Option<Note> {
    if !matches!(outcome, Some(Outcome::Refused { .. })) {
        status.conditions.retain(|c| c.type_ != "FailoverBlocked");
    }
    let outcome = outcome?;
    let p = outcome.pending();
    let command = p.command.to_string();
    Some(match outcome {
        Outcome::Moved { record, .. } => {
            let reason = match (&p.command, p.automatic) {
                (Command::DrCutover { .. }, true) => "AutomaticRegionCutover",
                (_, true) => "AutomaticFailover",
                _ => "ShardsMoved",
            };
            let note = format!(
                "{command}: {} (routing epoch {})",
                record.summary, record.routing_epoch
            );
            push_history(
                status,
                OperationRecord {
                    id: p.id.clone(),
                    command,
                    result: "Succeeded".into(),
                    message: record.summary.clone(),
                    shards_moved: record.shards_moved,
                    routing_epoch: record.routing_epoch,
                    moved_from: ldc_control::moves::ranges_by_cell(&record.moved_from),
                    requested_by: p.requested_by.clone(),
                    finished_at: now.to_string(),
                },
            );
            Note::normal(reason, note)
        }
        Outcome::Refused { why, .. } => {
            let note = format!("{command}: {why}");
            if p.automatic {
                let generation = topo.metadata.generation;
                let (conds, msg) = (&mut status.conditions, note.clone());
                model::set_condition(
                    conds,
                    "FailoverBlocked",
                    true,
                    "NoPlan",
                    msg,
                    generation,
                    now,
                );
            } else {
                push_history(
                    status,
                    failed(&p.id, command, &p.requested_by, why.clone(), now),
                );
            }
            Note::warning("OperationFailed", note)
        }
    })
}

/// A cell's status after `step`, and the event when its green share changed.
pub fn cell(c: &Cell, step: &Step, pods: &PodHealth, now: Timestamp) -> (CellStatus, Option<Note>) {
    let name = c.name_any();
    let owned = step.map.owned_by(&name);
    let epochs: Vec<u64> = owned
        .iter()
        .map(|s| step.map.owners[*s as usize].epoch)
        .collect();
    let r = pods.ready.get(&name).copied().unwrap_or_default();
    let healthy = pods.is_healthy(&name);
    let mut st = c.status.clone().unwrap_or_default();
    st.observed_generation = c.metadata.generation;
    st.role = if owned.is_empty() {
        "standby"
    } else {
        "serving"
    }
    .into();
    st.shards = owned.len() as u32;
    st.shard_ranges = planner::shard_ranges(&owned);
    st.epochs = planner::epoch_span(&epochs);
    st.ready_blue = r.blue;
    st.ready_green = r.green;
    let green = green_text(c, step);
    let shifted = (!st.green_percent.is_empty() && st.green_percent != green).then(|| {
        let msg = format!(
            "green {} -> {green} (routing epoch {})",
            st.green_percent, step.table.epoch
        );
        Note::normal("TrafficShifted", msg)
    });
    st.green_percent = green;
    st.not_ready_since = pods
        .since
        .get(&name)
        .copied()
        .flatten()
        .map(|t| t.to_string());
    st.ever_ready |= healthy;
    let (reason, msg) = if healthy {
        (
            "PodsReady",
            format!("{} blue and {} green pods ready", r.blue, r.green),
        )
    } else if c.metadata.deletion_timestamp.is_some() {
        ("Deleting", "cell is being deleted".to_string())
    } else {
        let msg = format!(
            "serving colours have no ready pod ({} blue, {} green ready)",
            r.blue, r.green
        );
        ("PodsNotReady", msg)
    };
    let generation = c.metadata.generation;
    model::set_condition(
        &mut st.conditions,
        "Ready",
        healthy,
        reason,
        msg,
        generation,
        now,
    );
    (st, shifted)
}

/// The green share as the routing table carries it, with the rollout step and pause.
fn green_text(c: &Cell, step: &Step) -> String {
    let weight = step
        .table
        .cells
        .get(&c.name_any())
        .map_or(c.spec.traffic.green_weight_bp, |w| w.green_weight_bp);
    let pct = ldc_core::traffic::fmt_pct(weight);
    let mut notes: Vec<String> = c.spec.traffic.step_label().into_iter().collect();
    if c.spec.traffic.paused {
        notes.push("paused".into());
    }
    if notes.is_empty() {
        pct
    } else {
        format!("{pct} ({})", notes.join(", "))
    }
}

/// What to do about a cell being deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deletion {
    /// Not being deleted, or nothing holds it.
    None,
    /// It owns nothing: lift the "owns shards" finalizer.
    Release,
    /// It still owns shards: keep it, and say how to move them.
    Keep(Note),
}

/// A deleted cell goes only once it owns nothing.
pub fn deletion(c: &Cell, owned: usize) -> Deletion {
    let held = c.finalizers().iter().any(|f| f == CELL_FINALIZER);
    if c.metadata.deletion_timestamp.is_none() || !held {
        return Deletion::None;
    }
    if owned == 0 {
        return Deletion::Release;
    }
    let name = c.name_any();
    Deletion::Keep(Note::warning(
        "StillOwnsShards",
        format!(
            "cell {name} owns {owned} shards; it is kept until they move (`kubectl cell switchover {name} --to CELL`)"
        ),
    ))
}

/// The Topology's counts and its `NPlusOne` and `Ready` conditions after `step`.
pub fn topology(
    topo: &Topology,
    status: &mut TopologyStatus,
    cells: &Cells,
    step: &Step,
    pods: &PodHealth,
    now: Timestamp,
) {
    let known = &cells.known;
    let generation = topo.metadata.generation;
    let ready = known
        .iter()
        .filter(|c| pods.is_healthy(&c.name_any()))
        .count();
    status.cells_total = known.len() as u32;
    status.cells_ready = ready as u32;
    status.routing_epoch = step.table.epoch;

    let short = model::n_plus_one_shortfall(topo, &cells.live, &step.map, &pods.health);
    let (np_ok, np_reason, np_msg) = if short.is_empty() {
        let want = topo.spec.redundancy.standby_cells_per_region;
        (
            true,
            "StandbyAvailable",
            format!("every region has {want} standby cell(s)"),
        )
    } else {
        let each = short
            .iter()
            .map(|(r, (have, want))| format!("region {r} has {have} of {want} standby cells"));
        (false, "StandbyMissing", each.collect::<Vec<_>>().join("; "))
    };
    model::set_condition(
        &mut status.conditions,
        "NPlusOne",
        np_ok,
        np_reason,
        np_msg,
        generation,
        now,
    );

    let unknown = cells.unknown_names();
    let epoch = step.table.epoch;
    let serving_ok = known
        .iter()
        .all(|c| pods.is_healthy(&c.name_any()) || step.map.count_owned(&c.name_any()) == 0);
    let total = known.len();
    let (ok, reason, msg) = if !unknown.is_empty() {
        let msg = format!("cells in unknown regions: {}", unknown.join(","));
        (false, "CellsInUnknownRegion", msg)
    } else if !serving_ok {
        let msg = "a cell that owns shards has no ready pods".to_string();
        (false, "ServingCellNotReady", msg)
    } else if ready == total {
        (
            true,
            "Reconciled",
            format!("{total} cells ready; routing epoch {epoch}"),
        )
    } else {
        let msg = format!(
            "every serving cell is ready ({ready}/{total} cells ready); routing epoch {epoch}"
        );
        (true, "ServingCellsReady", msg)
    };
    model::set_condition(
        &mut status.conditions,
        "Ready",
        ok,
        reason,
        msg,
        generation,
        now,
    );
}

// ---- the patches

/// Patches a cell's status when it changed.
pub(super) async fn patch_cell(api: &Api<Cell>, c: &Cell, st: CellStatus) -> Result<(), Error> {
    if c.status.as_ref() == Some(&st) {
        return Ok(());
    }
    let mut v = serde_json::to_value(&st).expect("status encodes");
    if st.not_ready_since.is_none() {
        v["notReadySince"] = serde_json::Value::Null;
    }
    let patch = Patch::Merge(json!({"status": v}));
    api.patch_status(&c.name_any(), &PatchParams::default(), &patch)
        .await?;
    Ok(())
}

/// Patches the topology status when it changed, carrying the resourceVersion read at the
/// start (optimistic lock): clearing a request can never erase a newer one, and a status
/// computed from an old object is refused instead of overwriting history.
pub(super) async fn patch_topology(
    ctx: &Context,
    topo: &Topology,
    st: &TopologyStatus,
) -> Result<(), Error> {
    if topo.status.as_ref() == Some(st) {
        return Ok(());
    }
    let ns = topo.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<Topology> = Api::namespaced(ctx.client.clone(), &ns);
    let mut v = serde_json::to_value(st).expect("status encodes");
    if st.pending_operation.is_none() {
        v["pendingOperation"] = serde_json::Value::Null;
    }
    let patch = json!({"metadata": {"resourceVersion": topo.resource_version()}, "status": v});
    api.patch_status(
        &topo.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// Lifts a cell's "owns shards" finalizer (optimistic lock on what was read).
pub(super) async fn release_cell(api: &Api<Cell>, c: &Cell) -> Result<(), Error> {
    if !c.finalizers().iter().any(|f| f == CELL_FINALIZER) {
        return Ok(());
    }
    let fins: Vec<&str> = c
        .finalizers()
        .iter()
        .map(String::as_str)
        .filter(|f| *f != CELL_FINALIZER)
        .collect();
    set_finalizers(api, c, &fins).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::CellRole;
    use crate::specs::tests::{cell, topo};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use ldc_core::planner::ShardMap;

    fn now() -> Timestamp {
        "2025-01-01T00:00:30Z".parse().unwrap()
    }

    fn cells() -> Cells {
        let all = vec![
            cell("r1-a", "r1", CellRole::Serving),
            cell("r1-s", "r1", CellRole::Standby),
            cell("r2-a", "r2", CellRole::Serving),
            cell("r2-s", "r2", CellRole::Standby),
        ];
        Cells::of(&topo(), all)
    }

    fn step(cells: &Cells, owners: &[&str]) -> Step {
        let map = ShardMap::initial(12, owners);
        let mut table = model::build_table(&map, &cells.known, "pay");
        table.epoch = 7;
        Step {
            map,
            table,
            table_changed: false,
            published: (String::new(), None),
            op: None,
        }
    }

    /// Every cell healthy with one ready pod per colour, but `down`.
    fn pods(cells: &Cells, down: &[&str]) -> PodHealth {
        PodHealth::all_but(&cells.known, down, now())
    }

    fn pending(automatic: bool) -> Pending {
        Pending {
            id: "op1".into(),
            command: Command::Failover {
                cell: "r1-a".into(),
            },
            requested_by: "alice".into(),
            automatic,
        }
    }

    fn condition<'a>(st: &'a TopologyStatus, t: &str) -> Option<&'a crate::crd::Condition> {
        st.conditions.iter().find(|c| c.type_ == t)
    }

    #[test]
    fn a_cell_reports_what_it_owns_its_pods_and_traffic_changes() {
        let cs = cells();
        let s = step(&cs, &["r1-a", "r2-a"]);
        let (st, shifted) = super::cell(&cs.known[0], &s, &pods(&cs, &[]), now());
        assert_eq!((st.role.as_str(), st.shards), ("serving", 6));
        assert_eq!((st.shard_ranges.as_str(), st.epochs.as_str()), ("0-5", "1"));
        assert_eq!((st.ready_blue, st.ready_green, st.ever_ready), (1, 1, true));
        assert_eq!(st.green_percent, "0%");
        assert_eq!(shifted, None, "first report: no change to tell");
        assert_eq!(st.conditions[0].reason, "PodsReady");

        let mut c = cs.known[0].clone();
        c.status = Some(st);
        c.spec.traffic.green_weight_bp = 2_500;
        let cs2 = Cells::of(&topo(), vec![c.clone()]);
        let s2 = step(&cs2, &["r1-a"]);
        let (st2, shifted) = super::cell(&c, &s2, &pods(&cs2, &["r1-a"]), now());
        assert_eq!(st2.green_percent, "25%");
        let note = shifted.expect("green changed");
        assert_eq!(note.message, "green 0% -> 25% (routing epoch 7)");
        assert_eq!(st2.not_ready_since, Some(now().to_string()));
        assert!(st2.ever_ready, "once ready, always ever ready");
        assert_eq!(st2.conditions[0].reason, "PodsNotReady");

        let (standby, _) = super::cell(&cs.known[1], &s, &pods(&cs, &[]), now());
        assert_eq!((standby.role.as_str(), standby.shards), ("standby", 0));
    }

    #[test]
    fn a_platform_stays_in_the_store_it_was_created_in() {
        let mut t = topo();
        assert_eq!(store_moved(&t), None, "not created yet");
        t.status = Some(TopologyStatus {
            store: t.spec.store.clone(),
            ..Default::default()
        });
        assert_eq!(store_moved(&t), None);
        t.spec.store = "/elsewhere/store.db".into();
        let why = store_moved(&t).unwrap();
        assert!(
            why.contains("/elsewhere/store.db") && why.contains("/data/store.db"),
            "{why}"
        );
    }

    #[test]
    fn a_deleted_cell_goes_only_once_it_owns_nothing() {
        let mut c = cell("r1-a", "r1", CellRole::Serving);
        assert_eq!(deletion(&c, 3), Deletion::None);
        c.metadata.deletion_timestamp = Some(Time(now()));
        assert_eq!(deletion(&c, 3), Deletion::None, "no finalizer holds it");
        c.metadata.finalizers = Some(vec![CELL_FINALIZER.into()]);
        assert_eq!(deletion(&c, 0), Deletion::Release);
        let Deletion::Keep(note) = deletion(&c, 3) else {
            panic!("it owns shards");
        };
        assert!(note.warning && note.message.contains("switchover r1-a --to CELL"));
    }

    #[test]
    fn topology_ready_only_when_every_owner_is_ready_and_no_cell_is_lost() {
        let cs = cells();
        let s = step(&cs, &["r1-a", "r2-a"]);
        let t = topo();
        let mut st = start(&t);
        topology(&t, &mut st, &cs, &s, &pods(&cs, &[]), now());
        let ready = condition(&st, "Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "Reconciled")
        );
        assert_eq!(
            (st.cells_ready, st.cells_total, st.routing_epoch),
            (4, 4, 7)
        );
        assert_eq!(condition(&st, "NPlusOne").unwrap().status, "True");

        // A standby down: still serving, but N+1 is short in r1.
        topology(&t, &mut st, &cs, &s, &pods(&cs, &["r1-s"]), now());
        assert_eq!(condition(&st, "Ready").unwrap().reason, "ServingCellsReady");
        let np = condition(&st, "NPlusOne").unwrap();
        assert_eq!(np.message, "region r1 has 0 of 1 standby cells");

        // An owner down: not ready.
        topology(&t, &mut st, &cs, &s, &pods(&cs, &["r2-a"]), now());
        assert_eq!(
            condition(&st, "Ready").unwrap().reason,
            "ServingCellNotReady"
        );

        // A cell in a region the topology does not have.
        let mut all = cs.known.clone();
        all.push(cell("r9-a", "r9", CellRole::Serving));
        let with_unknown = Cells::of(&t, all);
        topology(&t, &mut st, &with_unknown, &s, &pods(&cs, &[]), now());
        let ready = condition(&st, "Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "CellsInUnknownRegion")
        );
    }

    #[test]
    fn outcomes_go_to_history_or_to_the_blocked_condition() {
        let t = topo();
        let mut st = start(&t);
        let plan = ldc_core::planner::Plan {
            command: pending(false).command,
            moves: vec![],
        };
        let record = MoveRecord::of("op1", &plan, 7, "alice", 0);
        let moved = Outcome::Moved {
            pending: pending(false),
            record,
        };
        let note = operation(&t, &mut st, Some(&moved), now()).unwrap();
        assert_eq!((note.reason, note.warning), ("ShardsMoved", false));
        assert_eq!(st.history.len(), 1);
        assert_eq!(
            (st.history[0].result.as_str(), st.history[0].routing_epoch),
            ("Succeeded", 7)
        );

        let refused = |automatic| Outcome::Refused {
            pending: Pending {
                id: "op2".into(),
                ..pending(automatic)
            },
            why: "no healthy cell".into(),
        };
        let note = operation(&t, &mut st, Some(&refused(true)), now()).unwrap();
        assert_eq!((note.reason, note.warning), ("OperationFailed", true));
        assert_eq!(st.history.len(), 1, "an automatic refusal is not history");
        assert_eq!(
            condition(&st, "FailoverBlocked").unwrap().message,
            "failover r1-a: no healthy cell"
        );

        assert_eq!(operation(&t, &mut st, None, now()), None);
        assert!(
            condition(&st, "FailoverBlocked").is_none(),
            "cleared once nothing is refused"
        );

        operation(&t, &mut st, Some(&refused(false)), now());
        assert_eq!(
            (st.history[1].id.as_str(), st.history[1].result.as_str()),
            ("op2", "Failed")
        );
        assert!(condition(&st, "FailoverBlocked").is_none());
    }

    #[test]
    fn history_keeps_the_newest_and_one_entry_per_id() {
        let mut st = TopologyStatus::default();
        for i in 0..HISTORY_MAX + 5 {
            let r = Rejected {
                id: format!("op{i}"),
                kind: "failover".into(),
                requested_by: "alice".into(),
                why: "x".into(),
            };
            rejected(&mut st, &r, now());
        }
        assert_eq!(st.history.len(), HISTORY_MAX);
        assert_eq!(st.history[0].id, "op5");
        let again = Rejected {
            id: "op5".into(),
            kind: "failover".into(),
            requested_by: "alice".into(),
            why: "y".into(),
        };
        rejected(&mut st, &again, now());
        assert_eq!(st.history.len(), HISTORY_MAX);
        assert_eq!(st.history.last().unwrap().message, "y");
    }
}
