//! Plan-from-CR logic: everything the reconciler decides, as pure functions of the custom
//! resources, the observed pods and the store's ownership map (no client, no clock: the
//! time is a parameter). The shard moves themselves come from the one shared planner,
//! [`ldc_core::planner::plan`]; this module only turns Kubernetes facts into its inputs and
//! its output into a routing table.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use ldc_core::planner::{self, CellInfo, Command, Health, ShardMap};
use ldc_core::routing::{BP_MAX, CellRoute, Colour, RoutingTable};
use thiserror::Error;

use crate::crd::{Cell, CellRole, Condition, OperationRecord, OperationRequest, Topology};
use crate::specs::{self, LABEL_CELL, LABEL_COLOUR};

/// Why an operation request cannot become a planner command.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("operation {kind} needs `{field}`")]
    Missing { kind: String, field: &'static str },
    #[error("unknown operation kind {0:?}; use failover, switchover, dr-cutover or revert")]
    UnknownKind(String),
    #[error("no operation {0} in the topology's history; `kubectl cell history` lists them")]
    NoSuchOperation(String),
    #[error("operation {0} moved no shard (or failed), so there is nothing to revert")]
    NothingToRevert(String),
    #[error("the history record is corrupt: {0}")]
    BadRecord(String),
}

/// The planner's view of the topology: every cell of the topology (ordered by name).
pub fn planner_topology(topo: &Topology, cells: &[Cell]) -> planner::Topology {
    let mut cells: Vec<CellInfo> = cells
        .iter()
        .map(|c| CellInfo {
            id: c.metadata.name.clone().unwrap_or_default(),
            region: c.spec.region.clone(),
            capacity: c.spec.capacity,
        })
        .collect();
    cells.sort_by(|a, b| a.id.cmp(&b.id));
    planner::Topology {
        shard_count: topo.spec.shard_count,
        cells,
    }
}

/// Serving cells in name order: the owners of the initial map.
pub fn initial_serving(cells: &[Cell]) -> Vec<String> {
    let mut v: Vec<String> = cells
        .iter()
        .filter(|c| c.spec.role == CellRole::Serving)
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    v.sort();
    v
}

/// Cells naming a region the topology does not have (refused from planning).
pub fn cells_in_unknown_regions<'a>(topo: &Topology, cells: &'a [Cell]) -> Vec<&'a Cell> {
    cells
        .iter()
        .filter(|c| !topo.spec.regions.contains(&c.spec.region))
        .collect()
}

/// Ready pods of one cell, per colour.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Readiness {
    pub blue: u32,
    pub green: u32,
}

fn pod_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether the pods of a topology can share its store. An embedded (SQLite) store is a
/// file in a hostPath directory: each node has its own, so cells on two nodes would each
/// own "all" shards in a store of their own, and money moved in one would not exist in
/// the other. `Err` names the nodes and what to do. A TiKV store is shared by design.
pub fn store_shared(store: &str, pods: &[Pod]) -> Result<(), String> {
    if store.starts_with("tikv://") {
        return Ok(());
    }
    let nodes: std::collections::BTreeSet<&str> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.spec.as_ref()?.node_name.as_deref())
        .collect();
    if nodes.len() <= 1 {
        return Ok(());
    }
    let names: Vec<&str> = nodes.iter().take(8).copied().collect();
    Err(format!(
        "the embedded store {} is a file on each node, but the topology's pods run on {} nodes ({}{}); \
         nothing moves until they share one node (a nodeSelector on the cells) or the store is TiKV",
        ldc_core::quote_prefix(store, 64),
        nodes.len(),
        names.join(", "),
        if nodes.len() > names.len() {
            ", …"
        } else {
            ""
        }
    ))
}

/// Counts ready pods per cell and colour from the cells' pods (by label).
pub fn readiness(pods: &[Pod]) -> BTreeMap<String, Readiness> {
    let mut out: BTreeMap<String, Readiness> = BTreeMap::new();
    for p in pods.iter().filter(|p| pod_ready(p)) {
        let Some(labels) = p.metadata.labels.as_ref() else {
            continue;
        };
        let (Some(cell), Some(colour)) = (labels.get(LABEL_CELL), labels.get(LABEL_COLOUR)) else {
            continue;
        };
        let r = out.entry(cell.clone()).or_default();
        match colour.parse::<Colour>() {
            Ok(Colour::Blue) => r.blue += 1,
            Ok(Colour::Green) => r.green += 1,
            Err(_) => {}
        }
    }
    out
}

/// A cell is healthy when every colour that receives users has at least one ready pod
/// (blue below 100% green, green above 0%). A cell being deleted is never a target.
pub fn cell_health(cell: &Cell, r: Readiness) -> Health {
    let serves =
        ldc_core::traffic::serves(cell.spec.traffic.green_weight_bp, r.blue > 0, r.green > 0);
    if serves && cell.metadata.deletion_timestamp.is_none() {
        Health::Healthy
    } else {
        Health::Unhealthy
    }
}

/// The health map the planner takes.
pub fn health_map(cells: &[Cell], ready: &BTreeMap<String, Readiness>) -> BTreeMap<String, Health> {
    cells
        .iter()
        .map(|c| {
            let name = c.metadata.name.clone().unwrap_or_default();
            let r = ready.get(&name).copied().unwrap_or_default();
            (name, cell_health(c, r))
        })
        .collect()
}

/// The new `notReadySince`: kept while the cell stays unhealthy, set now when it becomes
/// unhealthy, cleared when it is healthy.
pub fn not_ready_since(
    prev: Option<Timestamp>,
    health: Health,
    now: Timestamp,
) -> Option<Timestamp> {
    match health {
        Health::Healthy => None,
        Health::Unhealthy => Some(prev.unwrap_or(now)),
    }
}

/// Whether `cell` is a candidate for automatic failover: it owns shards and has been ready
/// before (a cell still rolling out for the first time is not failed, only reported).
pub fn auto_failover_candidate(owned_shards: usize, ever_ready: bool) -> bool {
    owned_shards > 0 && ever_ready
}

/// Whether an automatic failover is due: `Ok(())` when the cell has been unhealthy for at
/// least `delay`, otherwise `Err(time left)`.
pub fn failover_due(since: Timestamp, now: Timestamp, delay: Duration) -> Result<(), Duration> {
    let elapsed = now.duration_since(since);
    let delay = k8s_openapi::jiff::SignedDuration::try_from(delay).unwrap_or_default();
    if elapsed >= delay {
        Ok(())
    } else {
        Err(Duration::try_from(delay - elapsed).unwrap_or_default())
    }
}

/// Regions that are down as a whole: every cell of the region has been not ready (and at
/// least one of them owns shards and was ready once), while a cell of another region is
/// healthy. Each with `Ok` when it has been down for `delay`, else how long is left.
pub fn regions_down(
    cells: &[Cell],
    map: &ShardMap,
    health: &BTreeMap<String, Health>,
    since: &BTreeMap<String, Option<Timestamp>>,
    now: Timestamp,
    delay: Duration,
) -> Vec<(String, Result<(), Duration>)> {
    let mut regions: BTreeMap<&str, Vec<&Cell>> = BTreeMap::new();
    for c in cells {
        regions.entry(c.spec.region.as_str()).or_default().push(c);
    }
    let mut out = Vec::new();
    for (region, rc) in &regions {
        let name = |c: &Cell| c.metadata.name.clone().unwrap_or_default();
        let all_down = rc
            .iter()
            .all(|c| health.get(&name(c)) != Some(&Health::Healthy));
        let owns = rc.iter().any(|c| {
            map.count_owned(&name(c)) > 0 && c.status.as_ref().is_some_and(|s| s.ever_ready)
        });
        let elsewhere = cells
            .iter()
            .any(|c| c.spec.region != *region && health.get(&name(c)) == Some(&Health::Healthy));
        if !(all_down && owns && elsewhere) {
            continue;
        }
        // Down since the latest of its cells went down.
        let Some(latest) = rc
            .iter()
            .map(|c| since.get(&name(c)).copied().flatten())
            .collect::<Option<Vec<Timestamp>>>()
            .and_then(|v| v.into_iter().max())
        else {
            continue;
        };
        out.push((region.to_string(), failover_due(latest, now, delay)));
    }
    out
}

/// The command that reverts operation `id`, from its record in `history`.
pub fn revert_command(history: &[OperationRecord], id: &str) -> Result<Command, RequestError> {
    let rec = history
        .iter()
        .find(|h| h.id == id)
        .ok_or_else(|| RequestError::NoSuchOperation(id.to_string()))?;
    if rec.result != "Succeeded" || rec.moved_from.is_empty() {
        return Err(RequestError::NothingToRevert(id.to_string()));
    }
    let mut back = BTreeMap::new();
    for (cell, ranges) in &rec.moved_from {
        back.insert(
            cell.clone(),
            planner::parse_shard_ranges(ranges).map_err(RequestError::BadRecord)?,
        );
    }
    Ok(Command::Revert {
        op: id.to_string(),
        back,
    })
}

/// The planner command an operation request asks for (`history` resolves reverts).
pub fn command_of(
    op: &OperationRequest,
    history: &[OperationRecord],
) -> Result<Command, RequestError> {
    let need = |v: &Option<String>, field: &'static str| {
        v.clone().ok_or_else(|| RequestError::Missing {
            kind: op.kind.clone(),
            field,
        })
    };
    match op.kind.as_str() {
        "failover" => Ok(Command::Failover {
            cell: need(&op.cell, "cell")?,
        }),
        "switchover" => Ok(Command::Switchover {
            cell: need(&op.cell, "cell")?,
            to: need(&op.to, "to")?,
        }),
        "dr-cutover" => Ok(Command::DrCutover {
            from: need(&op.from_region, "fromRegion")?,
            to: op.to_region.clone(),
        }),
        "revert" => revert_command(history, &need(&op.revert_of, "revertOf")?),
        other => Err(RequestError::UnknownKind(other.to_string())),
    }
}

/// The routing table for `map` and `cells`, with epoch 0 (see [`RoutingTable::succeeding`]).
pub fn build_table(map: &ShardMap, cells: &[Cell], namespace: &str) -> RoutingTable {
    let cells = cells
        .iter()
        .map(|c| {
            let name = c.metadata.name.clone().unwrap_or_default();
            let ep = |colour| vec![specs::endpoint(&name, colour, namespace)];
            let route = CellRoute {
                region: c.spec.region.clone(),
                blue: if c.spec.replicas.blue > 0 {
                    ep(Colour::Blue)
                } else {
                    vec![]
                },
                green: if c.spec.replicas.green > 0 {
                    ep(Colour::Green)
                } else {
                    vec![]
                },
                green_weight_bp: c.spec.traffic.green_weight_bp.min(BP_MAX),
                allow_forced_colour: c.spec.traffic.allow_forced_colour,
            };
            (name, route)
        })
        .collect();
    RoutingTable::of(map, cells)
}

/// Sets a condition, keeping `lastTransitionTime` when the status did not change.
pub fn set_condition(
    conds: &mut Vec<Condition>,
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) {
    let status = if ok { "True" } else { "False" }.to_string();
    let last = conds
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.to_string());
    conds.retain(|c| c.type_ != type_);
    conds.push(Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        last_transition_time: last,
        observed_generation: generation,
    });
    conds.sort_by(|a, b| a.type_.cmp(&b.type_));
}

/// Regions short of the N+1 policy, with (healthy standby cells, wanted). A standby is a
/// healthy cell that owns no shard: a failed cell that lost its shards does not count.
pub fn n_plus_one_shortfall(
    topo: &Topology,
    cells: &[Cell],
    map: &ShardMap,
    health: &BTreeMap<String, Health>,
) -> BTreeMap<String, (u32, u32)> {
    let want = topo.spec.redundancy.standby_cells_per_region;
    topo.spec
        .regions
        .iter()
        .filter_map(|r| {
            let standby = cells
                .iter()
                .filter(|c| &c.spec.region == r && c.metadata.deletion_timestamp.is_none())
                .filter(|c| {
                    let n = c.metadata.name.as_deref().unwrap_or("");
                    map.count_owned(n) == 0 && health.get(n) == Some(&Health::Healthy)
                })
                .count() as u32;
            (standby < want).then(|| (r.clone(), (standby, want)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::CellStatus;
    use crate::specs::tests::{cell, topo};
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn cells() -> Vec<Cell> {
        vec![
            cell("r1-a", "r1", CellRole::Serving),
            cell("r1-b", "r1", CellRole::Serving),
            cell("r1-s", "r1", CellRole::Standby),
            cell("r2-a", "r2", CellRole::Serving),
            cell("r2-s", "r2", CellRole::Standby),
        ]
    }

    fn pod(cell: &str, colour: &str, ready: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                labels: Some(BTreeMap::from([
                    (LABEL_CELL.to_string(), cell.to_string()),
                    (LABEL_COLOUR.to_string(), colour.to_string()),
                ])),
                ..Default::default()
            },
            spec: None,
            status: Some(PodStatus {
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn topology_and_initial_map_from_crs() {
        let t = planner_topology(&topo(), &cells());
        assert_eq!(t.shard_count, 12);
        assert_eq!(t.cells.len(), 5);
        assert_eq!(initial_serving(&cells()), ["r1-a", "r1-b", "r2-a"]);
        let mut c = cells();
        c.push(cell("r9-x", "r9", CellRole::Serving));
        assert_eq!(cells_in_unknown_regions(&topo(), &c).len(), 1);
    }

    #[test]
    fn an_embedded_store_is_shared_only_by_pods_on_one_node() {
        let on = |cell: &str, node: Option<&str>| {
            let mut p = pod(cell, "blue", true);
            p.spec = Some(k8s_openapi::api::core::v1::PodSpec {
                node_name: node.map(String::from),
                ..Default::default()
            });
            p
        };
        let one = [
            on("r1-a", Some("n1")),
            on("r2-a", Some("n1")),
            on("r1-b", None),
        ];
        assert_eq!(
            store_shared("/data/store.db", &one),
            Ok(()),
            "pending pods do not count"
        );
        let two = [on("r1-a", Some("n1")), on("r2-a", Some("n2"))];
        let why = store_shared("/data/store.db", &two).unwrap_err();
        assert!(
            why.contains("2 nodes (n1, n2)") && why.contains("TiKV"),
            "{why}"
        );
        assert_eq!(store_shared("tikv://pd:2379", &two), Ok(()));
        let mut gone = on("r2-a", Some("n2"));
        gone.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2025-01-01T00:00:00Z".parse().unwrap(),
            ));
        assert_eq!(
            store_shared("/data/store.db", &[on("r1-a", Some("n1")), gone]),
            Ok(())
        );
    }

    #[test]
    fn health_follows_ready_pods_of_serving_colours() {
        let pods = vec![
            pod("r1-a", "blue", true),
            pod("r1-a", "blue", false),
            pod("r1-b", "blue", false),
            pod("r1-b", "green", true),
        ];
        let ready = readiness(&pods);
        assert_eq!(ready["r1-a"], Readiness { blue: 1, green: 0 });
        let h = health_map(&cells(), &ready);
        assert_eq!(h["r1-a"], Health::Healthy);
        // r1-b: its blue pods (which get all users at weight 0) are down.
        assert_eq!(h["r1-b"], Health::Unhealthy);
        assert_eq!(h["r2-s"], Health::Unhealthy, "no pods seen: unhealthy");
        let mut all_green = cell("r1-b", "r1", CellRole::Serving);
        all_green.spec.traffic.green_weight_bp = BP_MAX;
        assert_eq!(
            cell_health(&all_green, ready["r1-b"]),
            Health::Healthy,
            "at 100% green only green must be ready"
        );
    }

    #[test]
    fn failover_waits_for_the_delay() {
        let t0: Timestamp = "2025-01-01T00:00:00Z".parse().unwrap();
        let t5 = "2025-01-01T00:00:05Z".parse().unwrap();
        let t10 = "2025-01-01T00:00:10Z".parse().unwrap();
        let since = not_ready_since(None, Health::Unhealthy, t0).unwrap();
        assert_eq!(
            not_ready_since(Some(since), Health::Unhealthy, t5),
            Some(t0)
        );
        assert_eq!(not_ready_since(Some(since), Health::Healthy, t5), None);
        let delay = Duration::from_secs(10);
        assert_eq!(failover_due(since, t5, delay), Err(Duration::from_secs(5)));
        assert_eq!(failover_due(since, t10, delay), Ok(()));
        assert!(auto_failover_candidate(3, true));
        assert!(
            !auto_failover_candidate(3, false),
            "never ready: first rollout"
        );
        assert!(!auto_failover_candidate(0, true), "nothing to move");
    }

    #[test]
    fn a_region_is_down_only_when_all_its_cells_are() {
        let mut cs = cells();
        for c in &mut cs {
            c.status = Some(CellStatus {
                ever_ready: true,
                ..Default::default()
            });
        }
        let map = ShardMap::initial(12, &["r1-a", "r1-b", "r2-a"]);
        let t0: Timestamp = "2025-01-01T00:00:00Z".parse().unwrap();
        let t3: Timestamp = "2025-01-01T00:00:03Z".parse().unwrap();
        let t9: Timestamp = "2025-01-01T00:00:09Z".parse().unwrap();
        let delay = Duration::from_secs(5);
        let mut health: BTreeMap<String, Health> = cs
            .iter()
            .map(|c| (c.metadata.name.clone().unwrap(), Health::Healthy))
            .collect();
        let mut since: BTreeMap<String, Option<Timestamp>> =
            health.keys().map(|k| (k.clone(), None)).collect();
        // One r2 cell down: the standby takes it; the region is not down.
        health.insert("r2-a".into(), Health::Unhealthy);
        since.insert("r2-a".into(), Some(t0));
        assert!(regions_down(&cs, &map, &health, &since, t9, delay).is_empty());
        // Both: down since the later of the two.
        health.insert("r2-s".into(), Health::Unhealthy);
        since.insert("r2-s".into(), Some(t3));
        assert_eq!(
            regions_down(&cs, &map, &health, &since, t3, delay),
            vec![("r2".to_string(), Err(Duration::from_secs(5)))]
        );
        assert_eq!(
            regions_down(&cs, &map, &health, &since, t9, delay),
            vec![("r2".to_string(), Ok(()))]
        );
        // Nobody healthy elsewhere: nowhere to go.
        for c in ["r1-a", "r1-b", "r1-s"] {
            health.insert(c.into(), Health::Unhealthy);
        }
        assert!(regions_down(&cs, &map, &health, &since, t9, delay).is_empty());
        // A region that owns nothing is not cut over.
        let mut health2 = health.clone();
        for c in ["r1-a", "r1-b", "r1-s"] {
            health2.insert(c.into(), Health::Healthy);
        }
        let empty_r2 = ShardMap::initial(12, &["r1-a", "r1-b"]);
        assert!(regions_down(&cs, &empty_r2, &health2, &since, t9, delay).is_empty());
    }

    #[test]
    fn requests_become_planner_commands() {
        let mut op = OperationRequest {
            id: "x".into(),
            kind: "switchover".into(),
            cell: Some("r1-s".into()),
            to: None,
            from_region: None,
            to_region: None,
            revert_of: None,
            requested_by: String::new(),
            requested_at: String::new(),
        };
        assert_eq!(
            command_of(&op, &[]),
            Err(RequestError::Missing {
                kind: "switchover".into(),
                field: "to"
            })
        );
        op.to = Some("r1-a".into());
        let c = command_of(&op, &[]).unwrap();
        assert_eq!(c.to_string(), "switchover r1-s --to r1-a");

        // A revert resolves the recorded operation's moves from the history.
        let rec = |id: &str, result: &str, moved: &[(&str, &str)]| OperationRecord {
            id: id.into(),
            command: "dr cutover --from r2".into(),
            result: result.into(),
            message: String::new(),
            shards_moved: 3,
            routing_epoch: 4,
            moved_from: moved
                .iter()
                .map(|(c, r)| (c.to_string(), r.to_string()))
                .collect(),
            requested_by: String::new(),
            finished_at: String::new(),
        };
        let history = vec![
            rec("ok", "Succeeded", &[("r2-a", "6-8"), ("r2-b", "9,11")]),
            rec("failed", "Failed", &[]),
            rec("corrupt", "Succeeded", &[("r2-a", "8-6")]),
        ];
        op.kind = "revert".into();
        op.revert_of = Some("ok".into());
        assert_eq!(
            command_of(&op, &history).unwrap(),
            Command::Revert {
                op: "ok".into(),
                back: BTreeMap::from([
                    ("r2-a".to_string(), vec![6, 7, 8]),
                    ("r2-b".to_string(), vec![9, 11])
                ])
            }
        );
        op.revert_of = Some("failed".into());
        assert_eq!(
            command_of(&op, &history),
            Err(RequestError::NothingToRevert("failed".into()))
        );
        op.revert_of = Some("nope".into());
        assert_eq!(
            command_of(&op, &history),
            Err(RequestError::NoSuchOperation("nope".into()))
        );
        op.revert_of = Some("corrupt".into());
        assert!(matches!(
            command_of(&op, &history),
            Err(RequestError::BadRecord(_))
        ));
    }

    #[test]
    fn failover_plan_from_crs_goes_to_the_region_standby() {
        let cs = cells();
        let t = planner_topology(&topo(), &cs);
        let map = ShardMap::initial(12, &["r1-a", "r1-b", "r2-a"]);
        let pods: Vec<Pod> = ["r1-b", "r1-s", "r2-a", "r2-s"]
            .iter()
            .map(|c| pod(c, "blue", true))
            .collect();
        let h = health_map(&cs, &readiness(&pods));
        let plan = planner::plan(
            &t,
            &map,
            &h,
            &Command::Failover {
                cell: "r1-a".into(),
            },
        )
        .unwrap();
        assert_eq!(
            plan.describe().join("; "),
            "r1-a -> r1-s: 4 shards [0-3], each epoch +1"
        );
        let next = plan.apply(&map);
        assert_eq!(n_plus_one_shortfall(&topo(), &cs, &map, &h).len(), 0);
        assert_eq!(
            n_plus_one_shortfall(&topo(), &cs, &next, &h)["r1"],
            (0, 1),
            "r1 used its standby; the failed r1-a does not count"
        );
    }

    #[test]
    fn table_epoch_moves_only_on_change() {
        let cs = cells();
        let map = ShardMap::initial(12, &["r1-a", "r1-b", "r2-a"]);
        let t1 = build_table(&map, &cs, "pay").succeeding(None).unwrap();
        assert_eq!(t1.epoch, 1);
        t1.validate().unwrap();
        assert_eq!(t1.cells["r1-a"].blue, ["r1-a-blue.pay.svc:7500"]);
        assert_eq!(build_table(&map, &cs, "pay").succeeding(Some(&t1)), None);
        let mut cs2 = cs.clone();
        cs2[0].spec.traffic.green_weight_bp = 100;
        let t2 = build_table(&map, &cs2, "pay")
            .succeeding(Some(&t1))
            .unwrap();
        assert_eq!((t2.epoch, t2.cells["r1-a"].green_weight_bp), (2, 100));
    }

    #[test]
    fn conditions_keep_transition_time() {
        let t0: Timestamp = "2025-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2025-01-01T00:01:00Z".parse().unwrap();
        let mut c = vec![];
        set_condition(&mut c, "Ready", true, "Ok", "fine".into(), Some(1), t0);
        set_condition(&mut c, "Ready", true, "Ok", "still".into(), Some(2), t1);
        assert_eq!(c[0].last_transition_time, t0.to_string());
        set_condition(&mut c, "Ready", false, "Down", "no".into(), Some(2), t1);
        assert_eq!(c[0].last_transition_time, t1.to_string());
        assert_eq!(c.len(), 1);
    }
}
