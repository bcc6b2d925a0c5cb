//! The `kubectl cell` verbs. The plugin never moves a shard itself: it previews the plan
//! with the same planner the operator uses (from the published routing table and the
//! cells' Ready conditions), records the intent with an optimistic lock (the patch carries
//! the `resourceVersion` it read, so two operators typing at once cannot overwrite each
//! other), and waits until the operator has published a routing table carrying the change.
//!
//! Each verb is parse (clap, in the binary) → [`Verb`] → [`run`] with an injected client.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use ldc_core::planner::{self, Command, Health, Owner, Plan, ShardMap};
use ldc_core::routing::RoutingTable;
use ldc_core::traffic::{self, Action, Change, Facts};
use serde_json::json;
use thiserror::Error;

use crate::crd::{
    Cell, OperationRecord, OperationRequest, TRAFFIC_HISTORY_ANNOTATION, TRAFFIC_HISTORY_MAX,
    Topology,
};
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
    #[error("{0}")]
    TrafficRefused(String),
    #[error("this move could not be undone: {0}; fix that first, or pass --force to move anyway")]
    Irreversible(planner::PlanError),
    #[error(transparent)]
    Request(#[from] model::RequestError),
    #[error(
        "the traffic audit trail on cell {0} is corrupt ({1}); fix or remove annotation ldc.dev/traffic-history"
    )]
    CorruptTrail(String, String),
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
        /// Act even if the move could not be undone.
        force: bool,
    },
    /// Undo an earlier move (by its id in the history).
    Revert {
        op: String,
        dry_run: bool,
        force: bool,
    },
    Traffic {
        cell: String,
        action: Action,
        dry_run: bool,
    },
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

fn requester() -> String {
    std::env::var("USER").unwrap_or_else(|_| "kubectl-cell".into())
}

/// Runs one verb; returns what to print.
pub async fn run(client: &Client, t: &Target, verb: Verb) -> Result<String, PluginError> {
    let topo = topology(client, t).await?;
    let name = topo.name_any();
    match verb {
        Verb::Status => status(client, t, &topo).await,
        Verb::History => {
            let cells = cells(client, t, &name).await?;
            history(&topo, &cells, t.json)
        }
        Verb::Move {
            command,
            dry_run,
            force,
        } => moves(client, t, &topo, command, dry_run, force).await,
        Verb::Revert { op, dry_run, force } => {
            let history = topo
                .status
                .as_ref()
                .map(|s| s.history.clone())
                .unwrap_or_default();
            let command = model::revert_command(&history, &op)?;
            moves(client, t, &topo, command, dry_run, force).await
        }
        Verb::Traffic {
            cell,
            action,
            dry_run,
        } => traffic(client, t, &topo, &cell, action, dry_run).await,
    }
}

/// A move (failover, switchover, cutover, revert): plan it as the operator would, check it
/// can be undone, print both, then record it and wait for the operator and the routers.
async fn moves(
    client: &Client,
    t: &Target,
    topo: &Topology,
    command: Command,
    dry_run: bool,
    force: bool,
) -> Result<String, PluginError> {
    let name = topo.name_any();
    let cells = cells(client, t, &name).await?;
    let table = published_table(client, &t.namespace, &name)
        .await?
        .ok_or_else(|| PluginError::NoTable(specs::routing_config_map_name(&name)))?;
    let plan = preview(topo, &cells, &table, &command)?;
    let by = who(client).await;
    let now = Timestamp::now();
    let id = format!(
        "{}-{}",
        by.rsplit(':').next().unwrap_or("kubectl-cell"),
        now.as_millisecond()
    );
    let reverse = reverse_check(topo, &cells, &table, &plan, &id);
    let mut out = format!(
        "{}plan for {} (from routing epoch {}):\n  {}\n",
        if dry_run { "dry run: " } else { "" },
        model::describe_command(&command),
        table.epoch,
        model::describe_plan(&plan)
    );
    match &reverse {
        Ok(r) if matches!(&r.command, Command::Revert { back, .. } if back.is_empty()) => {
            out.push_str(&format!(
                "  reverse: none: {} is being deleted, so this move is final\n",
                r.final_for.join(", ")
            ));
        }
        Ok(r) => {
            out.push_str(&format!("  reverse: `kubectl cell revert {id}`"));
            if r.waits_for.is_empty() {
                out.push_str(" (possible now)");
            } else {
                out.push_str(&format!(
                    " (possible once {} is ready again)",
                    r.waits_for.join(", ")
                ));
            }
            if !r.final_for.is_empty() {
                out.push_str(&format!(
                    "; final for {} (being deleted)",
                    r.final_for.join(", ")
                ));
            }
            out.push('\n');
        }
        Err(e) => out.push_str(&format!("  reverse: NOT possible: {e}\n")),
    }
    let reverse_json = match &reverse {
        Ok(r) => json!({
            "possible": true,
            "command": format!("kubectl cell revert {id}"),
            "waitsFor": r.waits_for,
            "finalFor": r.final_for,
        }),
        Err(e) => json!({"possible": false, "why": e.to_string()}),
    };
    if dry_run {
        if reverse.is_err() && !force {
            out.push_str("  (without --force this move would be refused)\n");
        }
        return Ok(json_or(
            t,
            out,
            json!({"dryRun": true, "plan": plan, "reverse": reverse_json}),
        ));
    }
    if let Err(e) = reverse
        && !force
    {
        return Err(PluginError::Irreversible(e));
    }
    let rec = record_and_wait(client, t, topo, &command, id, by, now).await?;
    out.push_str(&format!(
        "applied by the operator: {} ({} shards moved); routing epoch {} -> {}\n",
        rec.message, rec.shards_moved, table.epoch, rec.routing_epoch
    ));
    Ok(json_or(
        t,
        out,
        json!({"dryRun": false, "plan": plan, "reverse": reverse_json, "result": rec}),
    ))
}

/// Whether `plan` could be undone: its reverse planned on the map after it, with the
/// cells it empties assumed to recover unless they are being deleted.
pub fn reverse_check(
    topo: &Topology,
    cells: &[Cell],
    table: &RoutingTable,
    plan: &Plan,
    id: &str,
) -> Result<planner::ReverseCheck, planner::PlanError> {
    let gone = cells
        .iter()
        .filter(|c| c.metadata.deletion_timestamp.is_some())
        .map(|c| c.name_any())
        .collect();
    planner::check_reverse(
        &model::planner_topology(topo, cells),
        &map_of(table),
        &reported_health(cells),
        plan,
        id,
        &gone,
    )
}

/// Records the intent on the Topology status (optimistic lock) and waits for the outcome
/// and for the routing table that carries it.
async fn record_and_wait(
    client: &Client,
    t: &Target,
    topo: &Topology,
    command: &Command,
    id: String,
    by: String,
    now: Timestamp,
) -> Result<OperationRecord, PluginError> {
    let api: Api<Topology> = Api::namespaced(client.clone(), &t.namespace);
    let name = topo.name_any();
    let req = request_for(command, id.clone(), by, now.to_string());
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
            progress_done();
            return Err(PluginError::Timeout(
                t.timeout,
                format!("operation {id} not carried out yet"),
            ));
        }
        progress(
            started,
            &format!("waiting for the operator to carry out {id}"),
        );
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
    let started = Instant::now();
    loop {
        let tb = published_table(client, &t.namespace, topo).await?;
        if let Some(tb) = tb.as_ref()
            && done(tb)
        {
            progress_done();
            return Ok(tb.clone());
        }
        if Instant::now() >= deadline {
            progress_done();
            return Err(PluginError::Timeout(
                t.timeout,
                "the published routing table does not carry the change yet".into(),
            ));
        }
        progress(
            started,
            &format!(
                "waiting for routers' table to carry the change (published epoch {})",
                tb.map_or(0, |t| t.epoch)
            ),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A cell's traffic audit trail (the annotation written with each change).
pub fn traffic_trail(c: &Cell) -> Result<Vec<Change>, PluginError> {
    match c.annotations().get(TRAFFIC_HISTORY_ANNOTATION) {
        None => Ok(Vec::new()),
        Some(v) => serde_json::from_str(v)
            .map_err(|e| PluginError::CorruptTrail(c.name_any(), e.to_string())),
    }
}

/// The ownership operation in flight that involves `cell`, if any, for humans.
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

/// The facts `kubectl cell traffic-shift` decides on: the Cell's spec (desired weight,
/// pause), its reported ready pods per colour, the published ownership, its audit trail.
pub fn traffic_facts(
    topo: &Topology,
    cell: &Cell,
    table: Option<&RoutingTable>,
) -> Result<Facts, PluginError> {
    let owns_shards = table.is_some_and(|t| map_of(t).count_owned(&cell.name_any()) > 0);
    let st = cell.status.clone().unwrap_or_default();
    Ok(Facts {
        weight_bp: cell.spec.traffic.green_weight_bp,
        paused: cell.spec.traffic.paused,
        owns_shards,
        blue_up: st.ready_blue > 0,
        green_up: st.ready_green > 0,
        last: traffic_trail(cell)?.pop(),
        conflict: conflict_for(topo, cell, owns_shards),
    })
}

/// Placeholder weight meaning "the cell's next release step" (beyond any real weight).
pub const NEXT_STEP: u16 = u16::MAX;

/// Resolves `--next` against the cell's release steps.
pub fn resolve_next(cell: &Cell, action: Action) -> Result<Action, PluginError> {
    if action != Action::Set(NEXT_STEP) {
        return Ok(action);
    }
    let tr = &cell.spec.traffic;
    let name = cell.name_any();
    if tr.steps.is_empty() {
        return Err(PluginError::TrafficRefused(format!(
            "cell {name} has no release steps; set spec.traffic.steps (e.g. [100, 1000, 5000, 10000]) or use --green PCT"
        )));
    }
    tr.next_step().map(Action::Set).ok_or_else(|| {
        PluginError::TrafficRefused(format!(
            "cell {name} is at or past its last release step (green {}); `--promote` to finish or `--abort` to roll back",
            traffic::fmt_pct(tr.green_weight_bp)
        ))
    })
}

async fn traffic(
    client: &Client,
    t: &Target,
    topo: &Topology,
    cell: &str,
    action: Action,
    dry_run: bool,
) -> Result<String, PluginError> {
    let api: Api<Cell> = Api::namespaced(client.clone(), &t.namespace);
    let name = topo.name_any();
    let started = Instant::now();
    let deadline = started + t.timeout;
    let by = who(client).await;
    // Decide on a fresh read and write with its resourceVersion; a conflict (someone else
    // changed the cell meanwhile) means deciding again on what is there now.
    loop {
        let cur = api
            .get_opt(cell)
            .await?
            .filter(|c| c.spec.topology == name)
            .ok_or_else(|| PluginError::UnknownCell(cell.into()))?;
        let topo_now: Topology = Api::<Topology>::namespaced(client.clone(), &t.namespace)
            .get(&name)
            .await?;
        let table = published_table(client, &t.namespace, &name).await?;
        let facts = traffic_facts(&topo_now, &cur, table.as_ref())?;
        let action = resolve_next(&cur, action)?;
        let mut d = traffic::decide("kubectl cell", cell, action, &facts)
            .map_err(PluginError::TrafficRefused)?;
        d.warnings
            .extend(traffic::reverse_warning(cell, &d, &facts));
        let paused = |p: bool| if p { ", paused" } else { "" };
        let change = format!(
            "cell {cell}: green {}{} -> {}{}",
            traffic::fmt_pct(d.before_bp),
            paused(d.paused_before),
            traffic::fmt_pct(d.after_bp),
            paused(d.paused_after)
        );
        let mut out = String::new();
        for w in &d.warnings {
            out.push_str(&format!("warning: {w}\n"));
        }
        let epoch_before = table.as_ref().map_or(0, |t| t.epoch);
        if d.noop {
            out.push_str(&format!(
                "cell {cell}: nothing to change (green {}{})\n",
                traffic::fmt_pct(d.after_bp),
                paused(d.paused_after)
            ));
            return Ok(json_or(
                t,
                out,
                json!({"cell": cell, "decision": d, "dryRun": dry_run}),
            ));
        }
        if dry_run {
            out.push_str(&format!("dry run: {change}; nothing changed\n"));
            return Ok(json_or(
                t,
                out,
                json!({"cell": cell, "decision": d, "dryRun": true}),
            ));
        }
        let mut trail = traffic_trail(&cur)?;
        trail.push(Change {
            at_unix_ms: Timestamp::now().as_millisecond().max(0) as u64,
            by: by.clone(),
            action: action.name().into(),
            before_bp: d.before_bp,
            after_bp: d.after_bp,
            paused_before: d.paused_before,
            paused_after: d.paused_after,
            routing_epoch: epoch_before,
        });
        let excess = trail.len().saturating_sub(TRAFFIC_HISTORY_MAX);
        trail.drain(..excess);
        let patch = json!({
            "metadata": {
                "resourceVersion": cur.resource_version(),
                "annotations": {TRAFFIC_HISTORY_ANNOTATION: serde_json::to_string(&trail).expect("changes encode")},
            },
            "spec": {"traffic": {"greenWeightBp": d.after_bp, "paused": d.paused_after}},
        });
        match api
            .patch(cell, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 && Instant::now() < deadline => continue,
            Err(e) => return Err(e.into()),
        }
        if d.after_bp == d.before_bp {
            out.push_str(&format!("{change}\n"));
            return Ok(json_or(
                t,
                out,
                json!({"cell": cell, "decision": d, "dryRun": false}),
            ));
        }
        let weight = d.after_bp;
        let tb = wait_for_table(client, t, &name, deadline, |tb| {
            tb.cells.get(cell).map(|c| c.green_weight_bp) == Some(weight)
        })
        .await?;
        out.push_str(&format!(
            "{change} (routing epoch {epoch_before} -> {}, published in {:.1}s)\n",
            tb.epoch,
            started.elapsed().as_secs_f64()
        ));
        return Ok(json_or(
            t,
            out,
            json!({"cell": cell, "decision": d, "dryRun": false, "routingEpoch": tb.epoch}),
        ));
    }
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

fn json_or(t: &Target, text: String, v: serde_json::Value) -> String {
    if t.json { v.to_string() } else { text }
}

/// Who is acting, as the API server authenticates them (`kubectl auth whoami`), falling
/// back to the local login name when the server does not say.
async fn who(client: &Client) -> String {
    let review = SelfSubjectReview::default();
    let api: Api<SelfSubjectReview> = Api::all(client.clone());
    match api.create(&PostParams::default(), &review).await {
        Ok(r) => r
            .status
            .and_then(|s| s.user_info)
            .and_then(|u| u.username)
            .unwrap_or_else(requester),
        Err(_) => requester(),
    }
}

/// `status --watch`: prints the status, then again (with the time) whenever it changes,
/// until interrupted. Polls once a second: cheap, and it survives API server restarts.
pub async fn watch_status(client: &Client, t: &Target) -> Result<(), PluginError> {
    let mut last = String::new();
    let mut failing = false;
    loop {
        let now = match topology(client, t).await {
            Ok(topo) => status(client, t, &topo).await,
            Err(e) => Err(e),
        };
        match now {
            Ok(out) => {
                failing = false;
                if out != last {
                    if !t.json {
                        println!("--- {}", Timestamp::now().strftime("%Y-%m-%d %H:%M:%S UTC"));
                    }
                    print!("{out}");
                    if !out.ends_with('\n') {
                        println!();
                    }
                    last = out;
                }
            }
            // A watch outlives a blip of the API server: say so once and keep trying.
            Err(e) if !failing => {
                eprintln!("warning: {e}; retrying");
                failing = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
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

/// The ownership operations (Topology status) and every cell's traffic audit trail.
fn history(topo: &Topology, cells: &[Cell], json_out: bool) -> Result<String, PluginError> {
    let h = topo
        .status
        .as_ref()
        .map(|s| s.history.clone())
        .unwrap_or_default();
    let mut changes: Vec<(String, Change)> = Vec::new();
    for c in cells {
        for ch in traffic_trail(c)? {
            changes.push((c.name_any(), ch));
        }
    }
    changes.sort_by_key(|(c, ch)| (ch.at_unix_ms, c.clone()));
    if json_out {
        let traffic: Vec<serde_json::Value> = changes
            .iter()
            .map(|(c, ch)| {
                let mut v = serde_json::to_value(ch).expect("changes encode");
                v["cell"] = json!(c);
                v
            })
            .collect();
        return Ok(json!({"operations": h, "traffic": traffic}).to_string());
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
    if !changes.is_empty() {
        out.push_str(&format!(
            "\n{:<24} {:<10} {:<8} {:<24} {:>10}    {:<10}\n",
            "TRAFFIC (UTC)", "CELL", "ACTION", "BY", "BEFORE", "AFTER"
        ));
        let p = |bp: u16, paused: bool| {
            format!(
                "{}{}",
                traffic::fmt_pct(bp),
                if paused { " (p)" } else { "" }
            )
        };
        for (c, ch) in changes {
            let at = Timestamp::from_millisecond(ch.at_unix_ms as i64)
                .map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default();
            out.push_str(&format!(
                "{:<24} {:<10} {:<8} {:<24} {:>10} -> {:<10}\n",
                at,
                c,
                ch.action,
                ch.by,
                p(ch.before_bp, ch.paused_before),
                p(ch.after_bp, ch.paused_after)
            ));
        }
    }
    Ok(out)
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
    fn conflicts_and_traffic_facts() {
        use crate::crd::TopologyStatus;
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
        // A cell about to be failed over automatically is busy too (only if it owns shards
        // and automatic failover is on).
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

        // Facts: the spec's weight and pause, ready pods, the trail's last change.
        let mut c = ready(cell("r1-a", "r1", CellRole::Serving), true);
        c.spec.traffic.green_weight_bp = 1000;
        c.spec.traffic.paused = true;
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
        let f = traffic_facts(&tp, &c, None).unwrap();
        assert_eq!(
            (f.weight_bp, f.paused, f.owns_shards, f.blue_up, f.green_up),
            (1000, true, false, false, true)
        );
        assert_eq!(f.last, Some(ch));
        c.metadata.annotations = Some(BTreeMap::from([(
            TRAFFIC_HISTORY_ANNOTATION.to_string(),
            "not json".to_string(),
        )]));
        assert!(matches!(
            traffic_facts(&tp, &c, None),
            Err(PluginError::CorruptTrail(..))
        ));
    }

    #[test]
    fn next_release_step() {
        let mut c = cell("r1-a", "r1", CellRole::Serving);
        let next = Action::Set(NEXT_STEP);
        assert!(
            resolve_next(&c, next)
                .unwrap_err()
                .to_string()
                .contains("no release steps")
        );
        c.spec.traffic.steps = vec![100, 1000, 10_000];
        assert_eq!(resolve_next(&c, next).unwrap(), Action::Set(100));
        c.spec.traffic.green_weight_bp = 500; // between steps: the next one up
        assert_eq!(resolve_next(&c, next).unwrap(), Action::Set(1000));
        assert_eq!(c.spec.traffic.step_label(), None);
        c.spec.traffic.green_weight_bp = 10_000;
        assert_eq!(c.spec.traffic.step_label().as_deref(), Some("step 3/3"));
        assert!(
            resolve_next(&c, next)
                .unwrap_err()
                .to_string()
                .contains("last release step")
        );
        // Anything else passes through.
        assert_eq!(resolve_next(&c, Action::Abort).unwrap(), Action::Abort);
    }

    #[test]
    fn requests_and_weights() {
        let c = Command::DrCutover {
            from: "r1".into(),
            to: Some("r2".into()),
        };
        let r = request_for(&c, "id".into(), "me".into(), "t".into());
        assert_eq!(model::command_of(&r, &[]).unwrap(), c);
    }
}
