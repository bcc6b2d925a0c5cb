//! The Kubernetes platform of the operating verbs (`ldc_ops::Platform`): what `kubectl cell`
//! runs on. The plugin never moves a shard itself. A snapshot is the Topology, its Cells
//! and the published routing table; a move is recorded as the Topology's
//! `status.pendingOperation` with an optimistic lock (the patch carries the
//! `resourceVersion` it read, so two people typing at once cannot overwrite each other), and
//! the plugin waits until the operator has carried it out and published a routing table
//! carrying it. A traffic change patches the Cell's `spec.traffic` and its audit-trail
//! annotation in one locked patch, then waits for the table to carry the new weight.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use ldc_control::moves::MoveRecord;
use ldc_core::planner::{self, Command, Plan};
use ldc_core::routing::Colour::{Blue, Green};
use ldc_core::routing::RoutingTable;
use ldc_core::traffic::{Change, record_change};
use ldc_ops::{
    CellFacts, ColourFacts, HistoryData, MoveOutcome, MoveView, Pending, Platform, PlatformError,
    Snapshot,
};
use serde_json::json;

use crate::crd::{Cell, OperationRecord, OperationRequest, TRAFFIC_HISTORY_ANNOTATION, Topology};
use crate::model;
use crate::specs;

/// How often a wait for the operator looks again.
const WAIT_PERIOD: Duration = Duration::from_millis(200);

/// One Topology (the only one in the namespace unless named) of a cluster.
pub struct KubePlatform {
    pub client: Client,
    pub namespace: String,
    pub topology: Option<String>,
    /// Longest a change waits for the operator and the routing table.
    pub timeout: Duration,
}

fn kube_error(e: kube::Error) -> PlatformError {
    match e {
        kube::Error::Api(s) if s.code == 409 => PlatformError::Conflict,
        e => PlatformError::Failed(format!("kubernetes API: {e}")),
    }
}

/// Whether the operator last reported the cell Ready.
pub fn reported_ready(c: &Cell) -> bool {
    c.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// A cell's traffic audit trail (the annotation written with each change).
pub fn traffic_trail(c: &Cell) -> Result<Vec<Change>, PlatformError> {
    match c.annotations().get(TRAFFIC_HISTORY_ANNOTATION) {
        None => Ok(Vec::new()),
        Some(v) => serde_json::from_str(v).map_err(|e| {
            PlatformError::Failed(format!(
                "the traffic audit trail on cell {} is corrupt ({e}); fix or remove annotation {TRAFFIC_HISTORY_ANNOTATION}",
                c.name_any()
            ))
        }),
    }
}

/// The ownership change in flight (or due) that involves `cell`, for humans.
pub fn conflict_for(topo: &Topology, cell: &Cell, owns_shards: bool) -> Option<String> {
    let name = cell.name_any();
    if let Some(p) = topo
        .status
        .as_ref()
        .and_then(|s| s.pending_operation.as_ref())
    {
        let involved = p.cell.as_deref() == Some(name.as_str())
            || p.to.as_deref() == Some(name.as_str())
            || p.from_region.as_deref() == Some(cell.spec.region.as_str())
            || p.to_region.as_deref() == Some(cell.spec.region.as_str())
            || (p.kind == "dr-cutover" && p.to_region.is_none());
        if involved {
            return Some(format!("{} {} is pending", p.kind, p.id));
        }
    }
    let since = cell
        .status
        .as_ref()
        .and_then(|s| s.not_ready_since.as_deref());
    if let Some(since) = since
        && owns_shards
        && topo.spec.failover.automatic
    {
        return Some(format!(
            "it has had no ready serving pod since {since} and is failed over automatically after {}s",
            topo.spec.failover.not_ready_seconds
        ));
    }
    None
}

/// The snapshot of a Topology, its Cells and the published table (pure).
pub fn snapshot_of(
    topo: &Topology,
    cells: &[Cell],
    table: &RoutingTable,
) -> Result<Snapshot, PlatformError> {
    let map = table.ownership();
    let mut facts = BTreeMap::new();
    for c in cells {
        let name = c.name_any();
        let st = c.status.clone().unwrap_or_default();
        let route = table.cells.get(&name).cloned().unwrap_or_default();
        let owns = map.count_owned(&name) > 0;
        let colour = |live: u32, endpoints: Vec<String>, replicas: i32, colour| ColourFacts {
            live,
            endpoints,
            detail: BTreeMap::from([
                ("replicas".to_string(), json!(replicas)),
                ("image".to_string(), json!(c.spec.image_of(colour))),
            ]),
        };
        facts.insert(
            name,
            CellFacts {
                region: c.spec.region.clone(),
                healthy: reported_ready(c),
                deleting: c.metadata.deletion_timestamp.is_some(),
                green_weight_bp: c.spec.traffic.green_weight_bp,
                paused: c.spec.traffic.paused,
                steps: c.spec.traffic.steps.clone(),
                blue: colour(st.ready_blue, route.blue, c.spec.replicas.blue, Blue),
                green: colour(st.ready_green, route.green, c.spec.replicas.green, Green),
                last_change: traffic_trail(c)?.pop(),
                busy: conflict_for(topo, c, owns),
            },
        );
    }
    let status = topo.status.clone().unwrap_or_default();
    let pending = status.pending_operation.as_ref().map(|p| Pending {
        id: p.id.clone(),
        command: model::command_of(p, &status.history)
            .map(|c| c.to_string())
            .unwrap_or_else(|_| p.kind.clone()),
    });
    Ok(Snapshot {
        topology: model::planner_topology(topo, cells),
        map,
        routing_epoch: table.epoch,
        cells: facts,
        pending,
    })
}

/// The request the plugin records for a move.
pub fn request_for(command: &Command, id: String, by: String, at: String) -> OperationRequest {
    let mut r = OperationRequest {
        id,
        kind: String::new(),
        cell: None,
        to: None,
        from_region: None,
        to_region: None,
        revert_of: None,
        requested_by: by,
        requested_at: at,
    };
    match command {
        Command::Failover { cell } => {
            r.kind = "failover".into();
            r.cell = Some(cell.clone());
        }
        Command::Switchover { cell, to } => {
            r.kind = "switchover".into();
            r.cell = Some(cell.clone());
            r.to = Some(to.clone());
        }
        Command::DrCutover { from, to } => {
            r.kind = "dr-cutover".into();
            r.from_region = Some(from.clone());
            r.to_region = to.clone();
        }
        Command::Revert { op, .. } => {
            r.kind = "revert".into();
            r.revert_of = Some(op.clone());
        }
    }
    r
}

/// A Topology history entry as a move record.
pub fn record_of(r: &OperationRecord) -> MoveRecord {
    MoveRecord {
        id: r.id.clone(),
        command: r.command.clone(),
        summary: r.message.clone(),
        shards_moved: r.shards_moved,
        routing_epoch: r.routing_epoch,
        moved_from: r
            .moved_from
            .iter()
            .filter_map(|(c, v)| Some((c.clone(), planner::parse_shard_ranges(v).ok()?)))
            .collect(),
        by: r.requested_by.clone(),
        at_unix_ms: r
            .finished_at
            .parse::<Timestamp>()
            .map_or(0, |t| t.as_millisecond().max(0) as u64),
    }
}

impl KubePlatform {
    async fn topology(&self) -> Result<Topology, PlatformError> {
        let api: Api<Topology> = Api::namespaced(self.client.clone(), &self.namespace);
        if let Some(n) = &self.topology {
            return api.get_opt(n).await.map_err(kube_error)?.ok_or_else(|| {
                PlatformError::Refused(format!(
                    "no Topology {n} in namespace {}; `kubectl get topologies -n {}` lists them",
                    self.namespace, self.namespace
                ))
            });
        }
        let mut items = api
            .list(&ListParams::default())
            .await
            .map_err(kube_error)?
            .items;
        match items.len() {
            0 => Err(PlatformError::Refused(format!(
                "no Topology in namespace {}; install the chart there, or pick the namespace with -n",
                self.namespace
            ))),
            1 => Ok(items.remove(0)),
            _ => Err(PlatformError::Refused(format!(
                "several Topologies in namespace {} ({}); pick one with --topology",
                self.namespace,
                items
                    .iter()
                    .map(|t| t.name_any())
                    .collect::<Vec<_>>()
                    .join(",")
            ))),
        }
    }

    async fn cells(&self, topo: &str) -> Result<Vec<Cell>, PlatformError> {
        let api: Api<Cell> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut v: Vec<Cell> = api
            .list(&ListParams::default())
            .await
            .map_err(kube_error)?
            .items
            .into_iter()
            .filter(|c| c.spec.topology == topo)
            .collect();
        v.sort_by_key(|c| c.name_any());
        Ok(v)
    }

    async fn table(&self, topo: &str) -> Result<Option<RoutingTable>, PlatformError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        Ok(api
            .get_opt(&specs::routing_config_map_name(topo))
            .await
            .map_err(kube_error)?
            .as_ref()
            .and_then(specs::table_from_config_map))
    }

    /// Waits until the published table satisfies `done`; returns it.
    async fn wait_for_table(
        &self,
        topo: &str,
        deadline: Instant,
        done: impl Fn(&RoutingTable) -> bool,
    ) -> Result<RoutingTable, PlatformError> {
        let started = Instant::now();
        loop {
            let tb = self.table(topo).await?;
            if let Some(tb) = tb.as_ref()
                && done(tb)
            {
                progress_done();
                return Ok(tb.clone());
            }
            if Instant::now() >= deadline {
                progress_done();
                return Err(PlatformError::Failed(format!(
                    "gave up after {:?}: the published routing table does not carry the change yet; `kubectl cell status` shows where it is",
                    self.timeout
                )));
            }
            progress(
                started,
                &format!(
                    "waiting for the routers' table to carry the change (published epoch {})",
                    tb.map_or(0, |t| t.epoch)
                ),
            );
            tokio::time::sleep(WAIT_PERIOD).await;
        }
    }
}

impl Platform for KubePlatform {
    fn tool(&self) -> &'static str {
        "kubectl cell"
    }

    /// Who the API server says is acting (`kubectl auth whoami`), else the local login.
    async fn who(&self) -> String {
        let api: Api<SelfSubjectReview> = Api::all(self.client.clone());
        let local = || std::env::var("USER").unwrap_or_else(|_| "kubectl-cell".into());
        match api
            .create(&PostParams::default(), &SelfSubjectReview::default())
            .await
        {
            Ok(r) => r
                .status
                .and_then(|s| s.user_info)
                .and_then(|u| u.username)
                .unwrap_or_else(local),
            Err(_) => local(),
        }
    }

    async fn snapshot(&self) -> Result<Snapshot, PlatformError> {
        let topo = self.topology().await?;
        let name = topo.name_any();
        let cells = self.cells(&name).await?;
        let table = self.table(&name).await?.ok_or_else(|| {
            PlatformError::Failed(format!(
                "no routing table is published yet (ConfigMap {}); is the operator running?",
                specs::routing_config_map_name(&name)
            ))
        })?;
        snapshot_of(&topo, &cells, &table)
    }

    async fn record_move(
        &self,
        on: &Snapshot,
        id: &str,
        plan: &Plan,
        by: &str,
    ) -> Result<MoveOutcome, PlatformError> {
        let api: Api<Topology> = Api::namespaced(self.client.clone(), &self.namespace);
        let cur = self.topology().await?;
        let name = cur.name_any();
        let started = Instant::now();
        let deadline = started + self.timeout;
        // The lock: nothing pending, the table as planned on, and the resourceVersion read.
        if let Some(p) = cur
            .status
            .as_ref()
            .and_then(|s| s.pending_operation.as_ref())
        {
            return Err(PlatformError::Refused(format!(
                "move {} is still pending; wait for it (`kubectl cell status --watch --until-settled`) and retry",
                p.id
            )));
        }
        if self.table(&name).await?.map(|t| t.epoch) != Some(on.routing_epoch) {
            return Err(PlatformError::Conflict);
        }
        let req = request_for(
            &plan.command,
            id.to_string(),
            by.to_string(),
            Timestamp::now().to_string(),
        );
        let patch = json!({
            "metadata": {"resourceVersion": cur.resource_version()},
            "status": {"pendingOperation": req},
        });
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(kube_error)?;
        loop {
            let now = api.get(&name).await.map_err(kube_error)?;
            if let Some(rec) = now
                .status
                .as_ref()
                .and_then(|s| s.history.iter().find(|h| h.id == id))
            {
                progress_done();
                if rec.result != "Succeeded" {
                    return Err(PlatformError::Refused(format!(
                        "the operator refused {}: {}",
                        rec.command, rec.message
                    )));
                }
                let epoch = rec.routing_epoch;
                self.wait_for_table(&name, deadline, |t| t.epoch >= epoch)
                    .await?;
                return Ok(MoveOutcome {
                    record: record_of(rec),
                    message: rec.message.clone(),
                });
            }
            if Instant::now() >= deadline {
                progress_done();
                return Err(PlatformError::Failed(format!(
                    "gave up after {:?} waiting for the operator to carry out {id} (it stays recorded; `kubectl cell status --watch` shows when it is done)",
                    self.timeout
                )));
            }
            progress(
                started,
                &format!("waiting for the operator to carry out {id}"),
            );
            tokio::time::sleep(WAIT_PERIOD).await;
        }
    }

    async fn record_traffic(
        &self,
        on: &Snapshot,
        cell: &str,
        change: &Change,
    ) -> Result<u64, PlatformError> {
        let api: Api<Cell> = Api::namespaced(self.client.clone(), &self.namespace);
        let started = Instant::now();
        let seen = on.cells.get(cell).cloned().unwrap_or_default();
        let cur = api.get(cell).await.map_err(kube_error)?;
        let mut trail = traffic_trail(&cur)?;
        // The lock: the release is as decided on, and the patch carries the version read.
        if cur.spec.traffic.green_weight_bp != seen.green_weight_bp
            || cur.spec.traffic.paused != seen.paused
            || trail.last() != seen.last_change.as_ref()
        {
            return Err(PlatformError::Conflict);
        }
        record_change(&mut trail, change.clone());
        let patch = json!({
            "metadata": {
                "resourceVersion": cur.resource_version(),
                "annotations": {TRAFFIC_HISTORY_ANNOTATION: serde_json::to_string(&trail).expect("changes encode")},
            },
            "spec": {"traffic": {"greenWeightBp": change.after_bp, "paused": change.paused_after}},
        });
        api.patch(cell, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(kube_error)?;
        if change.after_bp == change.before_bp {
            return Ok(on.routing_epoch);
        }
        let topo = cur.spec.topology.clone();
        let weight = change.after_bp;
        let tb = self
            .wait_for_table(&topo, started + self.timeout, |t| {
                t.cells.get(cell).map(|c| c.green_weight_bp) == Some(weight)
            })
            .await?;
        Ok(tb.epoch)
    }

    async fn move_record(&self, id: &str) -> Result<Option<MoveRecord>, PlatformError> {
        let topo = self.topology().await?;
        Ok(topo
            .status
            .as_ref()
            .and_then(|s| s.history.iter().find(|h| h.id == id))
            .filter(|h| h.result == "Succeeded")
            .map(record_of))
    }

    async fn history(
        &self,
        moves_max: usize,
        cell: Option<&str>,
    ) -> Result<HistoryData, PlatformError> {
        let topo = self.topology().await?;
        let cells = self.cells(&topo.name_any()).await?;
        let h = topo.status.map(|s| s.history).unwrap_or_default();
        let views: Vec<MoveView> = h
            .iter()
            .map(|r| MoveView {
                record: record_of(r),
                result: r.result.clone(),
                message: r.message.clone(),
            })
            .filter(|m| cell.is_none_or(|c| m.record.involves(c)))
            .collect();
        let total = views.len();
        let moves = views
            .into_iter()
            .skip(total.saturating_sub(moves_max))
            .collect();
        let mut traffic = Vec::new();
        for c in &cells {
            for ch in traffic_trail(c)? {
                traffic.push((c.name_any(), ch));
            }
        }
        Ok(HistoryData {
            moves,
            moves_total: total,
            traffic,
        })
    }

    /// Watches the Topologies, Cells and ConfigMaps of the namespace and returns at the
    /// first change after the watches started (or after `wait`).
    async fn changed(&self, _seen: &Snapshot, wait: Duration) {
        let cfg = watcher::Config::default();
        let c = self.client.clone();
        let ns = self.namespace.clone();
        let topos = watcher(Api::<Topology>::namespaced(c.clone(), &ns), cfg.clone())
            .map(|e| is_change(&e));
        let cells =
            watcher(Api::<Cell>::namespaced(c.clone(), &ns), cfg.clone()).map(|e| is_change(&e));
        let maps = watcher(Api::<ConfigMap>::namespaced(c, &ns), cfg).map(|e| is_change(&e));
        let any = futures::stream::select(futures::stream::select(topos, cells), maps);
        let mut changes = std::pin::pin!(any.filter(|c| std::future::ready(*c)));
        let _ = tokio::time::timeout(wait, changes.next()).await;
    }
}

/// A change after a watch's initial listing (which only says what exists).
fn is_change<K>(e: &Result<watcher::Event<K>, watcher::Error>) -> bool {
    matches!(e, Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)))
}

/// A progress line on stderr while waiting: rewritten in place on a terminal, one line a
/// second otherwise (logs stay readable).
fn progress(since: Instant, what: &str) {
    use std::io::{IsTerminal, Write};
    let secs = since.elapsed().as_secs_f64();
    let mut err = std::io::stderr();
    if err.is_terminal() {
        let _ = write!(err, "\r\x1b[K{what} ({secs:.1}s)");
        let _ = err.flush();
    } else if (secs % 1.0) < 0.2 && secs >= 1.0 {
        let _ = writeln!(err, "{what} ({secs:.0}s)");
    }
}

fn progress_done() {
    use std::io::{IsTerminal, Write};
    let mut err = std::io::stderr();
    if err.is_terminal() {
        let _ = write!(err, "\r\x1b[K");
        let _ = err.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{CellRole, CellStatus, Condition, TopologyStatus};
    use crate::specs::tests::{cell, topo};
    use ldc_ops::verbs::traffic::{TrafficAction, decide};

    fn ready(mut c: Cell, ok: bool) -> Cell {
        c.status = Some(CellStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: if ok { "True" } else { "False" }.into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        c
    }

    fn table(cells: &[Cell]) -> RoutingTable {
        let map = ldc_core::planner::ShardMap::initial(12, &["r1-a", "r2-a"]);
        model::build_table(&map, cells, "pay")
            .succeeding(None)
            .unwrap()
    }

    #[test]
    fn snapshot_uses_the_published_map_and_reported_health() {
        let cells = vec![
            ready(cell("r1-a", "r1", CellRole::Serving), false),
            ready(cell("r1-s", "r1", CellRole::Standby), true),
            ready(cell("r2-a", "r2", CellRole::Serving), true),
        ];
        let s = snapshot_of(&topo(), &cells, &table(&cells)).unwrap();
        let p = ldc_ops::verbs::moves::plan(
            &s,
            "kubectl cell",
            &Command::Failover {
                cell: "r1-a".into(),
            },
            "x-1",
        )
        .unwrap();
        assert_eq!(p.plan.moves.len(), 6);
        assert!(
            p.plan
                .moves
                .iter()
                .all(|m| m.to == "r1-s" && m.epoch_after == 2)
        );
        let err = ldc_ops::verbs::moves::plan(
            &s,
            "kubectl cell",
            &Command::Switchover {
                cell: "r2-a".into(),
                to: "r1-a".into(),
            },
            "x-2",
        )
        .unwrap_err();
        assert!(err.to_string().contains("not healthy"), "{err}");
    }

    #[test]
    fn conflicts_and_traffic_facts() {
        let mut tp = topo();
        let a = cell("r1-a", "r1", CellRole::Serving);
        let b = cell("r2-a", "r2", CellRole::Serving);
        assert_eq!(conflict_for(&tp, &a, true), None);
        let req = |c: &Command| request_for(c, "op-9".into(), "me".into(), "t".into());
        tp.status = Some(TopologyStatus {
            pending_operation: Some(req(&Command::Failover {
                cell: "r1-a".into(),
            })),
            ..Default::default()
        });
        assert!(
            conflict_for(&tp, &a, true)
                .unwrap()
                .contains("failover op-9")
        );
        assert_eq!(conflict_for(&tp, &b, true), None);
        tp.status.as_mut().unwrap().pending_operation = Some(req(&Command::DrCutover {
            from: "r2".into(),
            to: None,
        }));
        // Every region is involved in a cutover to "every other region".
        assert!(conflict_for(&tp, &a, true).is_some());
        assert!(conflict_for(&tp, &b, true).is_some());
        tp.status = None;
        let mut sick = a.clone();
        sick.status = Some(CellStatus {
            not_ready_since: Some("2026-11-29T10:00:00Z".into()),
            ..Default::default()
        });
        assert!(
            conflict_for(&tp, &sick, true)
                .unwrap()
                .contains("failed over automatically")
        );
        assert_eq!(conflict_for(&tp, &sick, false), None);
        tp.spec.failover.automatic = false;
        assert_eq!(conflict_for(&tp, &sick, true), None);

        // Facts: the spec's weight, pause and steps, ready pods, the trail's last change.
        let mut c = ready(cell("r1-a", "r1", CellRole::Serving), true);
        c.spec.traffic.green_weight_bp = 1000;
        c.spec.traffic.paused = true;
        c.spec.traffic.steps = vec![100, 1000, 10_000];
        c.status.as_mut().unwrap().ready_green = 1;
        let ch = Change {
            at_unix_ms: 5,
            by: "alice".into(),
            action: "pause".into(),
            before_bp: 1000,
            after_bp: 1000,
            paused_before: false,
            paused_after: true,
            routing_epoch: 7,
        };
        c.metadata.annotations = Some(BTreeMap::from([(
            TRAFFIC_HISTORY_ANNOTATION.to_string(),
            serde_json::to_string(&vec![ch.clone()]).unwrap(),
        )]));
        let cells = vec![c.clone()];
        let s = snapshot_of(&tp, &cells, &table(&cells)).unwrap();
        let f = &s.cells["r1-a"];
        assert_eq!(
            (f.green_weight_bp, f.paused, f.blue.live, f.green.live),
            (1000, true, 0, 1)
        );
        assert_eq!(f.last_change, Some(ch));
        // Paused: `--next` is refused until resumed; resumed, it goes to the next step.
        assert!(decide(&s, "kubectl cell", "r1-a", TrafficAction::Next).is_err());
        c.metadata.annotations = Some(BTreeMap::from([(
            TRAFFIC_HISTORY_ANNOTATION.to_string(),
            "not json".to_string(),
        )]));
        assert!(snapshot_of(&tp, &[c], &table(&cells)).is_err());
    }

    #[test]
    fn requests_round_trip() {
        let c = Command::DrCutover {
            from: "r1".into(),
            to: Some("r2".into()),
        };
        let r = request_for(&c, "id".into(), "me".into(), "t".into());
        assert_eq!(model::command_of(&r, &[]).unwrap(), c);
    }
}
