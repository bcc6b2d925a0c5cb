//! The `kubectl cell` verbs. The plugin never moves a shard itself: it previews the plan
//! with the same planner the operator uses (from the published routing table and the
//! cells' Ready conditions), records the intent with an optimistic lock (the patch carries
//! the `resourceVersion` it read, so two operators typing at once cannot overwrite each
//! other), and waits until the operator has published a routing table carrying the change.
//!
//! Each verb is parse (clap, in the binary) → [`Verb`] → [`run`] with an injected client.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use ldc_core::planner::{self, Command, Health, Owner, Plan, ShardMap};
use ldc_core::routing::{BP_MAX, RoutingTable};
use serde_json::json;
use thiserror::Error;

use crate::crd::{Cell, OperationRecord, OperationRequest, Topology};
use crate::model;
use crate::specs;

#[derive(Debug, Error)]
pub enum PluginError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("no Topology in namespace {0}; install the chart or create one")]
    NoTopology(String),
    #[error("several Topologies in namespace {ns} ({names}); pick one with --topology")]
    ManyTopologies { ns: String, names: String },
    #[error("no routing table is published yet (ConfigMap {0}); is the operator running?")]
    NoTable(String),
    #[error("cannot plan: {0}")]
    Plan(#[from] planner::PlanError),
    #[error("operation {0} is still pending; wait for it (`kubectl cell history`) and retry")]
    Busy(String),
    #[error("no cell {0}")]
    UnknownCell(String),
    #[error("green weight must be 0..=100 percent, got {0}")]
    BadPercent(f64),
    #[error("gave up after {0:?} waiting for the operator: {1}")]
    Timeout(Duration, String),
    #[error("the operator refused {command}: {message}")]
    Refused { command: String, message: String },
}

/// What the user asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Verb {
    Status,
    History,
    Move {
        command: Command,
        dry_run: bool,
    },
    Traffic {
        cell: String,
        shift: Shift,
        dry_run: bool,
    },
}

/// A traffic change.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shift {
    /// Set the green share (percent, 0..=100, two decimals).
    Green(f64),
    /// Back to 0% green.
    Abort,
    /// All users to green.
    Promote,
}

impl Shift {
    /// The weight in basis points.
    pub fn weight_bp(self) -> Result<u16, PluginError> {
        match self {
            Shift::Abort => Ok(0),
            Shift::Promote => Ok(BP_MAX),
            Shift::Green(p) if (0.0..=100.0).contains(&p) => Ok((p * 100.0).round() as u16),
            Shift::Green(p) => Err(PluginError::BadPercent(p)),
        }
    }
}

/// Where and how long.
#[derive(Debug, Clone)]
pub struct Target {
    pub namespace: String,
    pub topology: Option<String>,
    pub timeout: Duration,
    pub json: bool,
}

async fn topology(client: &Client, t: &Target) -> Result<Topology, PluginError> {
    let api: Api<Topology> = Api::namespaced(client.clone(), &t.namespace);
    if let Some(n) = &t.topology {
        return Ok(api.get(n).await?);
    }
    let mut items = api.list(&ListParams::default()).await?.items;
    match items.len() {
        0 => Err(PluginError::NoTopology(t.namespace.clone())),
        1 => Ok(items.remove(0)),
        _ => Err(PluginError::ManyTopologies {
            ns: t.namespace.clone(),
            names: items
                .iter()
                .map(|t| t.name_any())
                .collect::<Vec<_>>()
                .join(","),
        }),
    }
}

async fn cells(client: &Client, t: &Target, topo: &str) -> Result<Vec<Cell>, PluginError> {
    let api: Api<Cell> = Api::namespaced(client.clone(), &t.namespace);
    let mut v: Vec<Cell> = api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|c| c.spec.topology == topo)
        .collect();
    v.sort_by_key(|c| c.name_any());
    Ok(v)
}

/// The routing table published for `topo`, if any.
pub async fn published_table(
    client: &Client,
    namespace: &str,
    topo: &str,
) -> Result<Option<RoutingTable>, PluginError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    Ok(api
        .get_opt(&specs::routing_config_map_name(topo))
        .await?
        .as_ref()
        .and_then(specs::table_from_config_map))
}

/// The ownership map as the published table states it.
pub fn map_of(table: &RoutingTable) -> ShardMap {
    ShardMap {
        owners: table
            .shards
            .iter()
            .map(|s| Owner {
                cell: s.cell.clone(),
                epoch: s.epoch,
            })
            .collect(),
    }
}

/// Health as the operator last reported it (the cells' Ready condition).
pub fn reported_health(cells: &[Cell]) -> BTreeMap<String, Health> {
    cells
        .iter()
        .map(|c| {
            let ready = c.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            });
            (
                c.name_any(),
                if ready {
                    Health::Healthy
                } else {
                    Health::Unhealthy
                },
            )
        })
        .collect()
}

/// The plan the operator would make now, from what is published.
pub fn preview(
    topo: &Topology,
    cells: &[Cell],
    table: &RoutingTable,
    command: &Command,
) -> Result<Plan, PluginError> {
    let ptopo = model::planner_topology(topo, cells);
    Ok(planner::plan(
        &ptopo,
        &map_of(table),
        &reported_health(cells),
        command,
    )?)
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
    }
    r
}

fn requester() -> String {
    std::env::var("USER").unwrap_or_else(|_| "kubectl-cell".into())
}

/// Runs one verb; returns what to print.
pub async fn run(client: &Client, t: &Target, verb: Verb) -> Result<String, PluginError> {
    let topo = topology(client, t).await?;
    let name = topo.name_any();
    match verb {
        Verb::Status => status(client, t, &topo).await,
        Verb::History => Ok(history(&topo, t.json)),
        Verb::Move { command, dry_run } => {
            let cells = cells(client, t, &name).await?;
            let table = published_table(client, &t.namespace, &name)
                .await?
                .ok_or_else(|| PluginError::NoTable(specs::routing_config_map_name(&name)))?;
            let plan = preview(&topo, &cells, &table, &command)?;
            let mut out = format!(
                "{}plan for {} (from routing epoch {}):\n  {}\n",
                if dry_run { "dry run: " } else { "" },
                model::describe_command(&command),
                table.epoch,
                model::describe_plan(&plan)
            );
            if dry_run {
                if t.json {
                    return Ok(json!({"dryRun": true, "plan": plan}).to_string());
                }
                return Ok(out);
            }
            let rec = record_and_wait(client, t, &topo, &command).await?;
            if t.json {
                return Ok(json!({"dryRun": false, "plan": plan, "result": rec}).to_string());
            }
            out.push_str(&format!(
                "applied by the operator: {} ({} shards moved); routing epoch {} -> {}\n",
                rec.message, rec.shards_moved, table.epoch, rec.routing_epoch
            ));
            Ok(out)
        }
        Verb::Traffic {
            cell,
            shift,
            dry_run,
        } => traffic(client, t, &name, &cell, shift, dry_run).await,
    }
}

/// Records the intent on the Topology status (optimistic lock) and waits for the outcome
/// and for the routing table that carries it.
async fn record_and_wait(
    client: &Client,
    t: &Target,
    topo: &Topology,
    command: &Command,
) -> Result<OperationRecord, PluginError> {
    let api: Api<Topology> = Api::namespaced(client.clone(), &t.namespace);
    let name = topo.name_any();
    let now = Timestamp::now();
    let id = format!("{}-{}", requester(), now.as_millisecond());
    let req = request_for(command, id.clone(), requester(), now.to_string());
    let started = Instant::now();
    // Optimistic lock: retry on conflict with a fresh read, refuse if another is pending.
    loop {
        let cur = api.get(&name).await?;
        if let Some(p) = cur
            .status
            .as_ref()
            .and_then(|s| s.pending_operation.as_ref())
        {
            return Err(PluginError::Busy(p.id.clone()));
        }
        let patch = json!({
            "metadata": {"resourceVersion": cur.resource_version()},
            "status": {"pendingOperation": req},
        });
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => break,
            Err(kube::Error::Api(e)) if e.code == 409 && started.elapsed() < t.timeout => {
                continue;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let deadline = started + t.timeout;
    loop {
        let cur = api.get(&name).await?;
        if let Some(rec) = cur
            .status
            .as_ref()
            .and_then(|s| s.history.iter().find(|h| h.id == id))
        {
            if rec.result != "Succeeded" {
                return Err(PluginError::Refused {
                    command: rec.command.clone(),
                    message: rec.message.clone(),
                });
            }
            wait_for_table(client, t, &name, deadline, |tb| {
                tb.epoch >= rec.routing_epoch
            })
            .await?;
            return Ok(rec.clone());
        }
        if Instant::now() >= deadline {
            return Err(PluginError::Timeout(
                t.timeout,
                format!("operation {id} not carried out yet"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_for_table(
    client: &Client,
    t: &Target,
    topo: &str,
    deadline: Instant,
    done: impl Fn(&RoutingTable) -> bool,
) -> Result<RoutingTable, PluginError> {
    loop {
        if let Some(tb) = published_table(client, &t.namespace, topo).await?
            && done(&tb)
        {
            return Ok(tb);
        }
        if Instant::now() >= deadline {
            return Err(PluginError::Timeout(
                t.timeout,
                "the published routing table does not carry the change yet".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn traffic(
    client: &Client,
    t: &Target,
    topo: &str,
    cell: &str,
    shift: Shift,
    dry_run: bool,
) -> Result<String, PluginError> {
    let api: Api<Cell> = Api::namespaced(client.clone(), &t.namespace);
    let weight = shift.weight_bp()?;
    let cur = api
        .get_opt(cell)
        .await?
        .ok_or_else(|| PluginError::UnknownCell(cell.into()))?;
    let before = cur.spec.traffic.green_weight_bp;
    let plan = format!(
        "{}plan: cell {cell} green {}% -> {}%\n",
        if dry_run { "dry run: " } else { "" },
        f64::from(before) / 100.0,
        f64::from(weight) / 100.0
    );
    if dry_run {
        return Ok(plan);
    }
    let patch = json!({
        "metadata": {"resourceVersion": cur.resource_version()},
        "spec": {"traffic": {"greenWeightBp": weight}},
    });
    api.patch(cell, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let deadline = Instant::now() + t.timeout;
    let tb = wait_for_table(client, t, topo, deadline, |tb| {
        tb.cells.get(cell).map(|c| c.green_weight_bp) == Some(weight)
    })
    .await?;
    Ok(format!("{plan}published in routing epoch {}\n", tb.epoch))
}

async fn status(client: &Client, t: &Target, topo: &Topology) -> Result<String, PluginError> {
    let name = topo.name_any();
    let cells = cells(client, t, &name).await?;
    let table = published_table(client, &t.namespace, &name).await?;
    if t.json {
        return Ok(json!({"topology": topo, "cells": cells, "table": table}).to_string());
    }
    let st = topo.status.clone().unwrap_or_default();
    let mut out = format!(
        "topology {name}: {} shards, regions {}, routing epoch {} (ConfigMap {}), {}/{} cells ready\n",
        topo.spec.shard_count,
        topo.spec.regions.join(","),
        table.as_ref().map_or(0, |t| t.epoch),
        specs::routing_config_map_name(&name),
        st.cells_ready,
        st.cells_total
    );
    for c in &st.conditions {
        out.push_str(&format!(
            "  {}={} {}: {}\n",
            c.type_, c.status, c.reason, c.message
        ));
    }
    out.push_str(&format!(
        "{:<10} {:<7} {:<8} {:<6} {:>6} {:<16} {:<7} {:<6} {:<6}\n",
        "CELL", "REGION", "ROLE", "READY", "SHARDS", "RANGES", "EPOCHS", "GREEN", "PODS"
    ));
    let map = table.as_ref().map(map_of);
    for c in &cells {
        let s = c.status.clone().unwrap_or_default();
        let cname = c.name_any();
        let owned = map.as_ref().map(|m| m.owned_by(&cname)).unwrap_or_default();
        let ready = reported_health(std::slice::from_ref(c))[&cname] == Health::Healthy;
        out.push_str(&format!(
            "{:<10} {:<7} {:<8} {:<6} {:>6} {:<16} {:<7} {:<6} {}/{}\n",
            cname,
            c.spec.region,
            if owned.is_empty() {
                "standby"
            } else {
                "serving"
            },
            if ready { "yes" } else { "no" },
            owned.len(),
            model::ranges(&owned),
            s.epochs,
            format!("{}%", f64::from(c.spec.traffic.green_weight_bp) / 100.0),
            s.ready_blue,
            s.ready_green
        ));
    }
    if let Some(p) = &st.pending_operation {
        out.push_str(&format!("pending: {} ({})\n", p.id, p.kind));
    }
    Ok(out)
}

fn history(topo: &Topology, json_out: bool) -> String {
    let h = topo
        .status
        .as_ref()
        .map(|s| s.history.clone())
        .unwrap_or_default();
    if json_out {
        return json!(h).to_string();
    }
    let mut out = format!(
        "{:<32} {:<28} {:<9} {:>6} {:>6} {:<14} MESSAGE\n",
        "ID", "COMMAND", "RESULT", "MOVED", "EPOCH", "BY"
    );
    for r in h {
        out.push_str(&format!(
            "{:<32} {:<28} {:<9} {:>6} {:>6} {:<14} {}\n",
            r.id, r.command, r.result, r.shards_moved, r.routing_epoch, r.requested_by, r.message
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{CellRole, CellStatus, Condition};
    use crate::specs::tests::{cell, topo};

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

    #[test]
    fn preview_uses_the_published_map_and_reported_health() {
        let cells = vec![
            ready(cell("r1-a", "r1", CellRole::Serving), false),
            ready(cell("r1-s", "r1", CellRole::Standby), true),
            ready(cell("r2-a", "r2", CellRole::Serving), true),
        ];
        let map = ShardMap::initial(12, &["r1-a", "r2-a"]);
        let table = model::next_table(None, model::build_table(&map, &cells, "pay")).unwrap();
        let plan = preview(
            &topo(),
            &cells,
            &table,
            &Command::Failover {
                cell: "r1-a".into(),
            },
        )
        .unwrap();
        assert_eq!(plan.moves.len(), 6);
        assert!(
            plan.moves
                .iter()
                .all(|m| m.to == "r1-s" && m.epoch_after == 2)
        );
        let err = preview(
            &topo(),
            &cells,
            &table,
            &Command::Switchover {
                cell: "r2-a".into(),
                to: "r1-a".into(),
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("not healthy"), "{err}");
    }

    #[test]
    fn requests_and_weights() {
        let c = Command::DrCutover {
            from: "r1".into(),
            to: Some("r2".into()),
        };
        let r = request_for(&c, "id".into(), "me".into(), "t".into());
        assert_eq!(model::command_of(&r).unwrap(), c);
        assert_eq!(Shift::Green(12.5).weight_bp().unwrap(), 1250);
        assert_eq!(Shift::Promote.weight_bp().unwrap(), 10_000);
        assert!(Shift::Green(101.0).weight_bp().is_err());
    }
}
