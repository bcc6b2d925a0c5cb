//! The reconciler: one Topology at a time, in five phases, one file each.
//!
//! Every change to a Topology, its Cells, their pods and Deployments, or the routing
//! ConfigMap reconciles the Topology (so all ownership changes of one platform are
//! serialised through one loop):
//!
//! 1. [`observe`]: the latest Topology, its Cells, the store's ownership map (the platform
//!    is created in the store on first sight), the pods' readiness per colour;
//! 2. [`children`]: certificates, then a Deployment, Service and PodDisruptionBudget per
//!    cell and colour (server-side apply; owned by the Cell);
//! 3. [`pending`]: which move this reconcile carries out — a `kubectl cell` request, or an
//!    automatic failover or region cutover that is due — and its plan from the one shared
//!    planner ([`ldc_core::planner::plan`]); pure;
//! 4. [`publish`]: fence, then route — the move and the next routing table commit in one
//!    store transaction ([`crate::fence::commit_step`]), and only then is the table
//!    published to the `<topology>-routing` ConfigMap the routers watch;
//! 5. [`status`]: status (conditions, epochs, history) of the Topology and every Cell, and
//!    events; computed purely, patched only when it changed.
//!
//! Re-running it changes nothing: applies are declarative, a table is written only when its
//! content changes, an operation id already recorded in the store is reported, never
//! applied again, and status is patched only when it differs. [`context`] holds what every
//! reconcile shares.

mod children;
mod context;
mod observe;
mod pending;
mod publish;
mod status;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, ResourceExt};

use context::blocking;
pub use context::{Context, Error, Note};
use pending::Decision;
use status::{Deletion, Outcome};

use crate::crd::{Cell, TOPOLOGY_FINALIZER, Topology, TopologyStatus};
use crate::fence::{self, Step};
use crate::metrics::{self, OpResult, OperatorMetrics};
use crate::specs::{LABEL_MANAGED_BY, LABEL_TOPOLOGY, MANAGER};
use ldc_core::planner::ShardMap;
use ldc_store::Store;

/// Requeue period when nothing is pending (a periodic resync on top of the watches).
const RESYNC: Duration = Duration::from_secs(60);
/// Requeue after a move: look again at once with the new map.
const AFTER_MOVE: Duration = Duration::from_millis(100);
/// Requeue while an automatic move is refused (the condition says why).
const BLOCKED_RECHECK: Duration = Duration::from_secs(5);
/// Requeue while the store cannot be used.
const STORE_RECHECK: Duration = Duration::from_secs(10);

/// Runs the controller for `namespace` until `shutdown` resolves.
pub async fn run(
    client: Client,
    namespace: String,
    identity: String,
    metrics: Arc<OperatorMetrics>,
    reach: Arc<crate::reach::StoreReach>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let topologies: Api<Topology> = Api::namespaced(client.clone(), &namespace);
    let cells: Api<Cell> = Api::namespaced(client.clone(), &namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let mut ctx = Context::new(client, &identity, metrics);
    ctx.reach = reach;
    let ctx = Arc::new(ctx);
    let ns = namespace.clone();
    let by_label = move |labels: &BTreeMap<String, String>| {
        labels
            .get(LABEL_TOPOLOGY)
            .map(|t| ObjectRef::<Topology>::new(t).within(&ns))
    };
    let (by_label_pod, by_label_dep) = (by_label.clone(), by_label);
    let ns = namespace.clone();
    Controller::new(topologies, watcher::Config::default())
        .owns(
            cms,
            watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGER}")),
        )
        .watches(cells, watcher::Config::default(), move |c: Cell| {
            Some(ObjectRef::new(&c.spec.topology).within(&ns))
        })
        .watches(
            pods,
            watcher::Config::default().labels(LABEL_TOPOLOGY),
            move |p: Pod| by_label_pod(p.labels()),
        )
        .watches(
            deployments,
            watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGER}")),
            move |d: Deployment| by_label_dep(d.labels()),
        )
        .graceful_shutdown_on(shutdown)
        .run(timed_reconcile, error_policy, ctx)
        .for_each(|r| async move {
            match r {
                Ok((obj, _)) => tracing::debug!(topology = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile failed"),
            }
        })
        .await;
}

fn error_policy(topo: Arc<Topology>, e: &Error, _ctx: Arc<Context>) -> Action {
    if e.is_conflict() {
        // Someone (the plugin, a user) changed an object we read: look again soon.
        tracing::debug!(topology = %topo.name_any(), "conflict; reconciling again");
        return Action::requeue(Duration::from_millis(200));
    }
    tracing::warn!(topology = %topo.name_any(), error = %e, label = e.label(), "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(3))
}

/// [`reconcile`], timed and counted in the operator's metrics.
async fn timed_reconcile(topo: Arc<Topology>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let r = reconcile(topo, ctx.clone()).await;
    ctx.metrics
        .reconciled(started.elapsed(), r.as_ref().err().map(Error::label));
    r
}

/// One reconcile of a Topology (behind its finalizer).
pub async fn reconcile(topo: Arc<Topology>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = topo.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<Topology> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, TOPOLOGY_FINALIZER, topo, |event| async {
        match event {
            FinalizerEvent::Apply(t) => apply(&t, &ctx).await,
            FinalizerEvent::Cleanup(t) => cleanup(&t, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// The whole platform goes (e.g. `helm uninstall`): without their topology the cells'
/// "owns shards" finalizers protect nothing, so they are lifted, even on cells that still
/// own shards; the store keeps who owns what.
async fn cleanup(t: &Topology, ctx: &Context) -> Result<Action, Error> {
    let ns = t.namespace().ok_or(Error::NoNamespace)?;
    let cells: Api<Cell> = Api::namespaced(ctx.client.clone(), &ns);
    let name = t.name_any();
    ctx.metrics.forget_topology(&name);
    for c in cells.list(&ListParams::default()).await? {
        if c.spec.topology == name {
            status::release_cell(&cells, &c).await?;
        }
    }
    let msg = format!(
        "topology removed; the store ({}) keeps ownership records and ledgers",
        t.spec.store
    );
    ctx.event(t, Note::normal("TopologyDeleted", msg)).await;
    Ok(Action::await_change())
}

/// What phases 3 to 5 work from.
struct Observed {
    topo: Topology,
    cells: observe::Cells,
    map: ShardMap,
    pods: observe::PodHealth,
    now: Timestamp,
}

/// The phases, in order (see the module docs).
#[tracing::instrument(skip_all, fields(topology = %cached.name_any()))]
async fn apply(cached: &Topology, ctx: &Context) -> Result<Action, Error> {
    let now = Timestamp::now();
    let Some(topo) = observe::latest(ctx, cached).await? else {
        return Ok(Action::await_change());
    };
    let ns = topo.namespace().ok_or(Error::NoNamespace)?;
    let cells_api: Api<Cell> = Api::namespaced(ctx.client.clone(), &ns);
    let mut st = status::start(&topo);

    // 1. observe
    if let Some(why) = status::store_moved(&topo) {
        return refuse_store(ctx, &topo, st, why, now).await;
    }
    let cells = observe::cells(ctx, &topo).await?;
    for c in &cells.unknown {
        status::patch_cell(&cells_api, c, status::unknown_region(&topo, c, now)).await?;
    }
    let (store, map) = match observe::store(ctx, &topo, &cells).await? {
        Ok(found) => found,
        Err(e) => return refuse_store(ctx, &topo, st, e.to_string(), now).await,
    };
    st.store.clone_from(&topo.spec.store);

    // 2. children
    let keys = Arc::new(children::apply(ctx, &topo, &cells.live).await?);
    let pods = observe::pods(ctx, &topo, &cells.known, now).await?;
    if let Some(why) = pods.store_not_shared.clone() {
        return refuse_store(ctx, &topo, st, why, now).await;
    }
    let o = Observed {
        topo,
        cells,
        map,
        pods,
        now,
    };

    // 3. the pending operation
    let choice = pending::choose(&o.topo, &st, &o.cells.known, &o.map, &o.pods, now);
    if let Some(r) = &choice.rejected {
        status::rejected(&mut st, r, now);
    }
    let decision = match &choice.pending {
        Some(p) => Some((p, decide(ctx, &o, &store, p).await?)),
        None => None,
    };

    // 4. fence, then route
    let to_apply = match &decision {
        Some((p, Decision::Apply(plan))) => Some((*p, plan)),
        _ => None,
    };
    let step = publish::commit(ctx, &o.topo, store, &o.cells.known, to_apply, keys).await?;
    publish::failpoint_after_fence(&o.topo, &step);
    publish::config_map(ctx, &o.topo, &step).await?;

    // 5. report
    let outcome = decision.map(|(p, d)| outcome(p.clone(), d, &step));
    if choice.clear_request {
        st.pending_operation = None;
    }
    report(ctx, &o, st, &step, outcome.as_ref()).await?;
    Ok(Action::requeue(requeue(outcome.as_ref(), choice.due_in)))
}

/// The store cannot be used: say why in status (an event when it is news) and do nothing.
async fn refuse_store(
    ctx: &Context,
    topo: &Topology,
    mut st: TopologyStatus,
    why: String,
    now: Timestamp,
) -> Result<Action, Error> {
    if let Some(note) = status::store_not_usable(topo, &mut st, why, now) {
        ctx.event(topo, note).await;
    }
    status::patch_topology(ctx, topo, &st).await?;
    Ok(Action::requeue(STORE_RECHECK))
}

/// Phase 3's one store read: a move the store already records is reported, not planned.
async fn decide(
    ctx: &Context,
    o: &Observed,
    store: &Arc<dyn Store>,
    p: &pending::Pending,
) -> Result<Decision, Error> {
    let ns = o.topo.namespace().ok_or(Error::NoNamespace)?;
    let scope = format!("{ns}/{}", o.topo.name_any());
    let (s, id) = (store.clone(), p.id.clone());
    let recorded = blocking(&ctx.reach, move || fence::applied_op(&*s, &scope, &id)).await?;
    let ptopo = crate::model::planner_topology(&o.topo, &o.cells.known);
    Ok(pending::decide(p, recorded, &ptopo, &o.map, &o.pods))
}

/// Phase 5: the operation's outcome, every cell's status, the topology's status.
async fn report(
    ctx: &Context,
    o: &Observed,
    mut st: TopologyStatus,
    step: &Step,
    outcome: Option<&Outcome>,
) -> Result<(), Error> {
    let (topo, now) = (&o.topo, o.now);
    if let Some(out) = outcome {
        count(ctx, out, &o.pods);
    }
    if let Some(note) = status::operation(topo, &mut st, outcome, now) {
        tracing::info!(topology = %topo.name_any(), reason = note.reason, "{}", note.message);
        ctx.event(topo, note).await;
    }
    let ns = topo.namespace().ok_or(Error::NoNamespace)?;
    let cells_api: Api<Cell> = Api::namespaced(ctx.client.clone(), &ns);
    for c in &o.cells.known {
        let (cst, shifted) = status::cell(c, step, &o.pods, now);
        if let Some(note) = shifted {
            ctx.event(c, note).await;
        }
        status::patch_cell(&cells_api, c, cst).await?;
        match status::deletion(c, step.map.count_owned(&c.name_any()) as usize) {
            Deletion::None => {}
            Deletion::Release => status::release_cell(&cells_api, c).await?,
            Deletion::Keep(note) => ctx.event(c, note).await,
        }
    }
    status::topology(topo, &mut st, &o.cells, step, &o.pods, now);
    let shards = o
        .cells
        .known
        .iter()
        .map(|c| (c.name_any(), step.map.count_owned(&c.name_any())));
    ctx.metrics
        .topology(&topo.name_any(), step.table.epoch, shards, st.cells_ready);
    status::patch_topology(ctx, topo, &st).await
}

/// The outcome of a decided operation once `step` committed.
fn outcome(p: pending::Pending, d: Decision, step: &Step) -> Outcome {
    match d {
        Decision::Recorded(record) => Outcome::Moved { pending: p, record },
        Decision::Apply(_) => {
            let record = step
                .op
                .clone()
                .expect("a step given a move returns its record");
            Outcome::Moved { pending: p, record }
        }
        Decision::Refused(why) => Outcome::Refused { pending: p, why },
    }
}

/// Counts an operation in the metrics.
fn count(ctx: &Context, o: &Outcome, pods: &observe::PodHealth) {
    let p = o.pending();
    let kind = metrics::operation_kind(&p.command, p.automatic);
    match o {
        Outcome::Moved { record, .. } => {
            let delay = metrics::failover_delay(&p.command, &pods.since, Timestamp::now());
            ctx.metrics
                .operation(kind, OpResult::Succeeded, record.shards_moved, delay);
        }
        Outcome::Refused { .. } => ctx.metrics.operation(kind, OpResult::Failed, 0, None),
    }
}

/// When to reconcile again.
fn requeue(outcome: Option<&Outcome>, due_in: Option<Duration>) -> Duration {
    let base = match outcome {
        Some(Outcome::Moved { .. }) => return AFTER_MOVE,
        Some(Outcome::Refused { pending, .. }) if pending.automatic => BLOCKED_RECHECK,
        _ => RESYNC,
    };
    due_in.map_or(base, |d| base.min(d))
}
