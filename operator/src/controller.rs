//! The reconciler: observe → plan → act, one Topology at a time.
//!
//! Every change to a Topology, its Cells, their pods and Deployments, or the routing
//! ConfigMap reconciles the Topology (so all ownership changes of one platform are
//! serialised through one loop):
//!
//! 1. **observe**: the Topology, its Cells, their pods (readiness per colour), the store's
//!    ownership map (the platform is created in the store on first sight);
//! 2. **act on children**: server-side apply of a Deployment and a Service per cell and
//!    colour (idempotent; owned by the Cell, so deleting a cell collects them);
//! 3. **plan**: a pending `kubectl cell` request, or an automatic failover of a cell whose
//!    serving pods have been not ready for `failover.notReadySeconds`, goes through the one
//!    shared planner ([`ldc_core::planner::plan`]);
//! 4. **fence, then route**: [`crate::fence::commit_step`] commits the new ownership (each
//!    moved shard's epoch goes up by one) and the next routing table in the store; only then
//!    is the table published to the `<topology>-routing` ConfigMap the routers watch;
//! 5. **report**: status (conditions, epochs, history) of the Topology and every Cell, and
//!    events.
//!
//! Re-running it changes nothing: applies are declarative, a table is written only when its
//! content changes, an operation id already recorded in the store is not applied again, and
//! status is patched only when it differs.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use ldc_core::planner::{self, Command, Health};
use ldc_store::Store;
use serde_json::json;
use thiserror::Error;

use crate::crd::{
    CELL_FINALIZER, Cell, CellStatus, HISTORY_MAX, OperationRecord, TOPOLOGY_FINALIZER, Topology,
    TopologyStatus,
};
use crate::fence::{self, FenceError};
use crate::metrics::{self, OpResult, OperatorMetrics};
use crate::model;
use crate::specs::{self, COLOURS, EPOCH_ANNOTATION, LABEL_MANAGED_BY, LABEL_TOPOLOGY, MANAGER};

/// Requeue period when nothing is pending (a periodic resync on top of the watches).
const RESYNC: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Fence(#[from] FenceError),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("store task failed: {0}")]
    Join(String),
    #[error("the store did not answer within {0:?}")]
    StoreTimeout(std::time::Duration),
    #[error("object has no namespace")]
    NoNamespace,
    #[error("certificates: {0}")]
    Pki(#[from] crate::pki::PkiError),
}

impl Error {
    /// Whether this is an optimistic-lock conflict (HTTP 409), which a re-run resolves.
    pub fn is_conflict(&self) -> bool {
        match self {
            Error::Kube(kube::Error::Api(e)) => e.code == 409,
            Error::Finalizer(f) => match &**f {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.is_conflict(),
                _ => false,
            },
            _ => false,
        }
    }

    /// A stable label for metrics and logs: the cause's, through the finalizer wrapper
    /// every reconcile error comes in; `conflict` for an optimistic-lock conflict.
    pub fn label(&self) -> &'static str {
        if self.is_conflict() {
            return "conflict";
        }
        match self {
            Error::Kube(_) => "kube",
            Error::Fence(e) => e.label(),
            Error::Finalizer(f) => match &**f {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.label(),
                _ => "finalizer",
            },
            Error::Join(_) => "join",
            Error::StoreTimeout(_) => "store_timeout",
            Error::NoNamespace => "no_namespace",
            Error::Pki(_) => "pki",
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<OperatorMetrics>,
    stores: Mutex<HashMap<String, Arc<dyn Store>>>,
    /// Whether store calls reach the store (see [`crate::reach`]).
    pub reach: Arc<crate::reach::StoreReach>,
}

impl Context {
    pub fn new(client: Client, identity: &str, metrics: Arc<OperatorMetrics>) -> Context {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: Some(identity.to_string()),
            },
        );
        Context {
            client,
            recorder,
            metrics,
            stores: Mutex::new(HashMap::new()),
            reach: Arc::default(),
        }
    }

    /// The store for `spec`, opened once and shared.
    async fn store(&self, spec: &str) -> Result<Arc<dyn Store>, Error> {
        if let Some(s) = self.stores.lock().expect("lock").get(spec) {
            return Ok(s.clone());
        }
        let owned = spec.to_string();
        let s = blocking(&self.reach, move || fence::open(&owned)).await?;
        self.stores
            .lock()
            .expect("lock")
            .insert(spec.to_string(), s.clone());
        Ok(s)
    }

    async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let ev = KEvent {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: reason.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "cannot publish event");
        }
    }
}

/// Runs a store call off the async runtime, bounded by [`crate::reach::STORE_CALL_TIMEOUT`]
/// (a timed-out call's thread finishes on its own; its result is dropped), and records
/// whether it reached the store.
async fn blocking<T: Send + 'static>(
    reach: &crate::reach::StoreReach,
    f: impl FnOnce() -> Result<T, FenceError> + Send + 'static,
) -> Result<T, Error> {
    let timeout = crate::reach::STORE_CALL_TIMEOUT;
    let r = match tokio::time::timeout(timeout, tokio::task::spawn_blocking(f)).await {
        Err(_) => Err(Error::StoreTimeout(timeout)),
        Ok(joined) => joined
            .map_err(|e| Error::Join(e.to_string()))?
            .map_err(Error::from),
    };
    reach.record(reached(&r), std::time::Instant::now());
    r
}

/// Whether a store call's outcome came from the store (a refusal is an answer).
fn reached<T>(r: &Result<T, Error>) -> bool {
    use ldc_store::StoreError;
    !matches!(
        r,
        Err(Error::StoreTimeout(_))
            | Err(Error::Fence(FenceError::Store(
                StoreError::Backend(_)
                    | StoreError::Undetermined(_)
                    | StoreError::Io(_)
                    | StoreError::Config(_)
                    | StoreError::Busy(_)
            )))
    )
}

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

/// Lifts a cell's "owns shards" finalizer (optimistic lock on what was read).
async fn release_cell(cells: &Api<Cell>, c: &Cell) -> Result<(), Error> {
    if !c.finalizers().iter().any(|f| f == CELL_FINALIZER) {
        return Ok(());
    }
    let fins: Vec<String> = c
        .finalizers()
        .iter()
        .filter(|f| *f != CELL_FINALIZER)
        .cloned()
        .collect();
    let patch = json!({"metadata": {"finalizers": fins, "resourceVersion": c.resource_version()}});
    cells
        .patch(
            &c.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

/// One reconcile of a Topology (behind its finalizer).
pub async fn reconcile(topo: Arc<Topology>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = topo.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<Topology> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, TOPOLOGY_FINALIZER, topo, |event| async {
        match event {
            FinalizerEvent::Apply(t) => apply(t, ctx.clone()).await,
            FinalizerEvent::Cleanup(t) => {
                // The whole platform goes (e.g. `helm uninstall`): without their topology
                // the cells' "owns shards" finalizers protect nothing, so they are lifted,
                // even on cells that still own shards; the store keeps who owns what.
                let cells: Api<Cell> = Api::namespaced(ctx.client.clone(), &ns);
                let name = t.name_any();
                ctx.metrics.forget_topology(&name);
                for c in cells.list(&ListParams::default()).await? {
                    if c.spec.topology == name {
                        release_cell(&cells, &c).await?;
                    }
                }
                ctx.event(
                    &*t,
                    EventType::Normal,
                    "TopologyDeleted",
                    format!(
                        "topology removed; the store ({}) keeps ownership records and ledgers",
                        t.spec.store
                    ),
                )
                .await;
                Ok(Action::await_change())
            }
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// A pending operation: from `kubectl cell` or automatic.
struct Pending {
    id: String,
    command: Command,
    requested_by: String,
    automatic: bool,
}

async fn apply(cached: Arc<Topology>, ctx: Arc<Context>) -> Result<Action, Error> {
    let now = Timestamp::now();
    let ns = cached.namespace().ok_or(Error::NoNamespace)?;
    let name = cached.name_any();
    // Decide from the latest object, not the watch cache: status (pending request,
    // history) written a moment ago must not be overwritten by a stale copy. Every status
    // write below also carries this resourceVersion, so a concurrent change is a conflict
    // and a fresh reconcile, never a lost update.
    let topo = match Api::<Topology>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&name)
        .await?
    {
        Some(t) => Arc::new(t),
        None => return Ok(Action::await_change()),
    };
    let scope = format!("{ns}/{name}");
    let gen_ = topo.metadata.generation;
    let client = ctx.client.clone();
    let cells_api: Api<Cell> = Api::namespaced(client.clone(), &ns);
    let topo_api: Api<Topology> = Api::namespaced(client.clone(), &ns);
    let old_status = topo.status.clone().unwrap_or_default();
    let mut status = old_status.clone();
    status.observed_generation = gen_;
    status.regions = topo.spec.regions.join(",");
    status.routing_config_map = specs::routing_config_map_name(&name);

    // ---- observe: cells
    let mut all_cells: Vec<Cell> = cells_api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|c| c.spec.topology == name)
        .collect();
    all_cells.sort_by_key(|c| c.name_any());
    for c in &all_cells {
        let has = c.finalizers().iter().any(|f| f == CELL_FINALIZER);
        if !has && c.metadata.deletion_timestamp.is_none() {
            let mut fins = c.finalizers().to_vec();
            fins.push(CELL_FINALIZER.into());
            let patch =
                json!({"metadata": {"finalizers": fins, "resourceVersion": c.resource_version()}});
            cells_api
                .patch(
                    &c.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await?;
        }
    }
    let unknown: Vec<String> = model::cells_in_unknown_regions(&topo, &all_cells)
        .iter()
        .map(|c| c.name_any())
        .collect();
    let cells: Vec<Cell> = all_cells
        .iter()
        .filter(|c| !unknown.contains(&c.name_any()))
        .cloned()
        .collect();
    for c in all_cells.iter().filter(|c| unknown.contains(&c.name_any())) {
        let mut st = c.status.clone().unwrap_or_default();
        model::set_condition(
            &mut st.conditions,
            "Ready",
            false,
            "UnknownRegion",
            format!(
                "region {} is not one of the topology's regions ({}); fix spec.region or the topology",
                c.spec.region,
                topo.spec.regions.join(",")
            ),
            c.metadata.generation,
            now,
        );
        patch_cell_status(&cells_api, c, st).await?;
    }

    // ---- observe: the store (created on first sight)
    let store = ctx.store(&topo.spec.store).await?;
    let ptopo = model::planner_topology(&topo, &cells);
    let live: Vec<Cell> = cells
        .iter()
        .filter(|c| c.metadata.deletion_timestamp.is_none())
        .cloned()
        .collect();
    let serving = model::initial_serving(&live);
    let init = {
        let (store, ptopo) = (store.clone(), ptopo.clone());
        blocking(&ctx.reach, move || {
            fence::ensure_initialised(&*store, &ptopo, &serving, ldc_core::clock::now_ms())
        })
        .await
    };
    let map = match init {
        Ok(m) => m,
        Err(Error::Fence(e)) => {
            let msg = e.to_string();
            model::set_condition(
                &mut status.conditions,
                "Ready",
                false,
                "StoreNotUsable",
                msg.clone(),
                gen_,
                now,
            );
            if status != old_status {
                ctx.event(&*topo, EventType::Warning, "StoreNotUsable", msg)
                    .await;
            }
            patch_topology_status(&topo_api, &topo, &status).await?;
            return Ok(Action::requeue(Duration::from_secs(10)));
        }
        Err(e) => return Err(e),
    };

    // ---- act: certificates first (pods mount them), then Deployments and Services per
    // cell and colour
    let names: Vec<String> = live.iter().map(|c| c.name_any()).collect();
    let keys = Arc::new(crate::pki::ensure(&client, &topo, &names).await?);
    let pp = PatchParams::apply(MANAGER).force();
    let dep_api: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let svc_api: Api<Service> = Api::namespaced(client.clone(), &ns);
    let pdb_api: Api<k8s_openapi::api::policy::v1::PodDisruptionBudget> =
        Api::namespaced(client.clone(), &ns);
    for c in &live {
        for colour in COLOURS {
            let d = specs::cell_deployment(&topo, c, colour);
            let s = specs::cell_service(&topo, c, colour);
            let b = specs::cell_pdb(&topo, c, colour);
            let n = specs::workload_name(&c.name_any(), colour);
            dep_api.patch(&n, &pp, &Patch::Apply(&d)).await?;
            svc_api.patch(&n, &pp, &Patch::Apply(&s)).await?;
            pdb_api.patch(&n, &pp, &Patch::Apply(&b)).await?;
        }
    }

    // ---- observe: health
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pods = pods_api
        .list(&ListParams::default().labels(&format!("{LABEL_TOPOLOGY}={name}")))
        .await?
        .items;
    let ready = model::readiness(&pods);
    let health = model::health_map(&cells, &ready);
    let since: BTreeMap<String, Option<Timestamp>> = cells
        .iter()
        .map(|c| {
            let prev = c
                .status
                .as_ref()
                .and_then(|s| s.not_ready_since.as_deref())
                .and_then(|s| s.parse().ok());
            (
                c.name_any(),
                model::not_ready_since(prev, health[&c.name_any()], now),
            )
        })
        .collect();

    // ---- plan: a requested operation first, else an automatic failover that is due
    let delay = Duration::from_secs(u64::from(topo.spec.failover.not_ready_seconds));
    let mut requeue = RESYNC;
    let mut pending = None;
    let mut clear_request = false;
    if let Some(req) = old_status.pending_operation.as_ref() {
        clear_request = true;
        if !old_status.history.iter().any(|h| h.id == req.id) {
            match model::command_of(req, &old_status.history) {
                Ok(command) => {
                    pending = Some(Pending {
                        id: req.id.clone(),
                        command,
                        requested_by: req.requested_by.clone(),
                        automatic: false,
                    })
                }
                Err(e) => push_history(
                    &mut status,
                    OperationRecord {
                        id: req.id.clone(),
                        command: req.kind.clone(),
                        result: "Failed".into(),
                        message: e.to_string(),
                        shards_moved: 0,
                        routing_epoch: 0,
                        moved_from: Default::default(),
                        requested_by: req.requested_by.clone(),
                        finished_at: now.to_string(),
                    },
                ),
            }
        }
    }
    // A region down as a whole has no cell to fail over to: cut it over (opt-in).
    if pending.is_none() && topo.spec.failover.automatic && topo.spec.failover.region_cutover {
        for (region, due) in model::regions_down(&cells, &map, &health, &since, now, delay) {
            match due {
                Ok(()) => {
                    let command = Command::DrCutover {
                        from: region,
                        to: None,
                    };
                    pending = Some(Pending {
                        id: planner::automatic_move_id(&command, &ptopo, &map),
                        command,
                        requested_by: MANAGER.into(),
                        automatic: true,
                    });
                    break;
                }
                Err(left) => requeue = requeue.min(left.max(Duration::from_millis(500))),
            }
        }
    }
    if pending.is_none() && topo.spec.failover.automatic {
        for c in &cells {
            let cname = c.name_any();
            let owned = map.owned_by(&cname);
            let Some(Some(s)) = since.get(&cname) else {
                continue;
            };
            let ever_ready = c.status.as_ref().is_some_and(|s| s.ever_ready);
            if !model::auto_failover_candidate(owned.len(), ever_ready) {
                continue;
            }
            match model::failover_due(*s, now, delay) {
                Ok(()) => {
                    let command = Command::Failover { cell: cname };
                    pending = Some(Pending {
                        id: planner::automatic_move_id(&command, &ptopo, &map),
                        command,
                        requested_by: MANAGER.into(),
                        automatic: true,
                    });
                    break;
                }
                Err(left) => requeue = requeue.min(left.max(Duration::from_millis(500))),
            }
        }
    }

    // ---- fence, then route
    let build_cells = cells.clone();
    let ns_b = ns.clone();
    let build = move |m: &ldc_core::planner::ShardMap| model::build_table(m, &build_cells, &ns_b);
    let mut op_for_step = None;
    let mut failed: Option<(Pending, String)> = None;
    if let Some(p) = pending {
        let (store2, scope2, id2) = (store.clone(), scope.clone(), p.id.clone());
        let done = blocking(&ctx.reach, move || {
            fence::applied_op(&*store2, &scope2, &id2)
        })
        .await?;
        if done.is_some() {
            // Applied by an earlier run that stopped before recording it: only report.
            op_for_step = Some((p, None));
        } else {
            match planner::plan(&ptopo, &map, &health, &p.command) {
                Ok(plan) => op_for_step = Some((p, Some(plan))),
                Err(e) => failed = Some((p, e.to_string())),
            }
        }
    }
    let step = {
        let store = store.clone();
        let scope = scope.clone();
        let op = op_for_step
            .as_ref()
            .map(|(p, plan)| (p.id.clone(), p.requested_by.clone(), plan.clone()));
        let shard_count = topo.spec.shard_count;
        blocking(&ctx.reach, move || {
            let op_ref = op.as_ref().map(|(id, by, plan)| fence::StepMove {
                id,
                by,
                plan: plan.as_ref(),
            });
            fence::commit_step(
                &*store,
                shard_count,
                &scope,
                op_ref,
                build,
                Some(&keys.routing),
            )
        })
        .await?
    };

    // A test failpoint: stop right after the fence committed, before the table is published
    // (the e2e suite crashes the operator here and checks the next leader finishes once).
    if step.op.is_some() && std::env::var("LDC_FAILPOINT").as_deref() == Ok("after-fence") {
        tracing::error!(topology = %name, "failpoint after-fence: exiting before publishing");
        std::process::exit(86);
    }

    // Route: publish the committed table to the ConfigMap routers watch.
    let cm_api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let cm_name = specs::routing_config_map_name(&name);
    let published = cm_api
        .get_opt(&cm_name)
        .await?
        .and_then(|cm| cm.annotations().get(EPOCH_ANNOTATION).cloned())
        .and_then(|e| e.parse::<u64>().ok());
    if published != Some(step.table.epoch) {
        let cm = specs::routing_config_map(&topo, step.table.epoch, &step.published);
        cm_api.patch(&cm_name, &pp, &Patch::Apply(&cm)).await?;
        tracing::info!(topology = %name, epoch = step.table.epoch, "routing table published");
        ctx.event(
            &*topo,
            EventType::Normal,
            "RoutingPublished",
            format!(
                "routing table epoch {} published to ConfigMap {cm_name}",
                step.table.epoch
            ),
        )
        .await;
    }
    status.routing_epoch = step.table.epoch;

    // ---- report the operation
    if let Some((p, _)) = op_for_step {
        let rec = step.op.clone().unwrap_or_else(|| {
            // Recorded as applied, then its record lost: say so rather than invent it.
            ldc_control::moves::MoveRecord {
                id: p.id.clone(),
                command: p.command.to_string(),
                summary: "applied by an earlier run; its record is gone".into(),
                shards_moved: 0,
                routing_epoch: step.table.epoch,
                moved_from: Default::default(),
                by: p.requested_by.clone(),
                at_unix_ms: 0,
            }
        });
        let command = p.command.to_string();
        let note = format!(
            "{command}: {} (routing epoch {})",
            rec.summary, rec.routing_epoch
        );
        tracing::info!(topology = %name, id = %p.id, "{note}");
        ctx.event(
            &*topo,
            EventType::Normal,
            match (&p.command, p.automatic) {
                (Command::DrCutover { .. }, true) => "AutomaticRegionCutover",
                (_, true) => "AutomaticFailover",
                _ => "ShardsMoved",
            },
            note,
        )
        .await;
        let delay = metrics::failover_delay(&p.command, &since, Timestamp::now());
        let kind = metrics::operation_kind(&p.command, p.automatic);
        ctx.metrics
            .operation(kind, OpResult::Succeeded, rec.shards_moved, delay);
        push_history(
            &mut status,
            OperationRecord {
                id: p.id,
                command,
                result: "Succeeded".into(),
                message: rec.summary,
                shards_moved: rec.shards_moved,
                routing_epoch: rec.routing_epoch,
                moved_from: ldc_control::moves::ranges_by_cell(&rec.moved_from),
                requested_by: p.requested_by,
                finished_at: now.to_string(),
            },
        );
        requeue = Duration::from_millis(100); // look again at once with the new map
    }
    if let Some((p, why)) = failed {
        let command = p.command.to_string();
        let kind = metrics::operation_kind(&p.command, p.automatic);
        ctx.metrics.operation(kind, OpResult::Failed, 0, None);
        ctx.event(
            &*topo,
            EventType::Warning,
            "OperationFailed",
            format!("{command}: {why}"),
        )
        .await;
        if p.automatic {
            // Not recorded in history (it would repeat every reconcile); the condition says it.
            model::set_condition(
                &mut status.conditions,
                "FailoverBlocked",
                true,
                "NoPlan",
                format!("{command}: {why}"),
                gen_,
                now,
            );
            requeue = requeue.min(Duration::from_secs(5));
        } else {
            push_history(
                &mut status,
                OperationRecord {
                    id: p.id,
                    command,
                    result: "Failed".into(),
                    message: why,
                    shards_moved: 0,
                    routing_epoch: 0,
                    moved_from: Default::default(),
                    requested_by: p.requested_by,
                    finished_at: now.to_string(),
                },
            );
        }
    } else {
        status.conditions.retain(|c| c.type_ != "FailoverBlocked");
    }

    // ---- report: cells
    let mut ready_cells = 0;
    for c in &cells {
        let cname = c.name_any();
        let owned = step.map.owned_by(&cname);
        let epochs: Vec<u64> = owned
            .iter()
            .map(|s| step.map.owners[*s as usize].epoch)
            .collect();
        let r = ready.get(&cname).copied().unwrap_or_default();
        let healthy = health[&cname] == Health::Healthy;
        ready_cells += u32::from(healthy);
        let mut st: CellStatus = c.status.clone().unwrap_or_default();
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
        let weight = step
            .table
            .cells
            .get(&cname)
            .map_or(c.spec.traffic.green_weight_bp, |w| w.green_weight_bp);
        let mut notes: Vec<String> = c.spec.traffic.step_label().into_iter().collect();
        if c.spec.traffic.paused {
            notes.push("paused".into());
        }
        let green = if notes.is_empty() {
            ldc_core::traffic::fmt_pct(weight)
        } else {
            format!(
                "{} ({})",
                ldc_core::traffic::fmt_pct(weight),
                notes.join(", ")
            )
        };
        if !st.green_percent.is_empty() && st.green_percent != green {
            ctx.event(
                c,
                EventType::Normal,
                "TrafficShifted",
                format!(
                    "green {} -> {green} (routing epoch {})",
                    st.green_percent, step.table.epoch
                ),
            )
            .await;
        }
        st.green_percent = green;
        st.not_ready_since = since[&cname].map(|t| t.to_string());
        st.ever_ready |= healthy;
        let (reason, msg) = if healthy {
            (
                "PodsReady",
                format!("{} blue and {} green pods ready", r.blue, r.green),
            )
        } else if c.metadata.deletion_timestamp.is_some() {
            ("Deleting", "cell is being deleted".to_string())
        } else {
            (
                "PodsNotReady",
                format!(
                    "serving colours have no ready pod ({} blue, {} green ready)",
                    r.blue, r.green
                ),
            )
        };
        model::set_condition(
            &mut st.conditions,
            "Ready",
            healthy,
            reason,
            msg,
            c.metadata.generation,
            now,
        );
        patch_cell_status(&cells_api, c, st).await?;

        // A deleted cell goes only once it owns nothing.
        if c.metadata.deletion_timestamp.is_some()
            && c.finalizers().iter().any(|f| f == CELL_FINALIZER)
        {
            if owned.is_empty() {
                release_cell(&cells_api, c).await?;
            } else {
                ctx.event(c, EventType::Warning, "StillOwnsShards", format!(
                    "cell {cname} owns {} shards; it is kept until they move (`kubectl cell switchover {cname} --to CELL`)",
                    owned.len()
                )).await;
            }
        }
    }

    // ---- report: topology
    status.cells_total = cells.len() as u32;
    status.cells_ready = ready_cells;
    let shards = cells
        .iter()
        .map(|c| (c.name_any(), step.map.count_owned(&c.name_any())));
    ctx.metrics
        .topology(&name, step.table.epoch, shards, ready_cells);
    let short = model::n_plus_one_shortfall(&topo, &live, &step.map, &health);
    let (np_ok, np_msg) = if short.is_empty() {
        (
            true,
            format!(
                "every region has {} standby cell(s)",
                topo.spec.redundancy.standby_cells_per_region
            ),
        )
    } else {
        (
            false,
            short
                .iter()
                .map(|(r, (have, want))| format!("region {r} has {have} of {want} standby cells"))
                .collect::<Vec<_>>()
                .join("; "),
        )
    };
    model::set_condition(
        &mut status.conditions,
        "NPlusOne",
        np_ok,
        if np_ok {
            "StandbyAvailable"
        } else {
            "StandbyMissing"
        },
        np_msg,
        gen_,
        now,
    );
    let all_ready = ready_cells as usize == cells.len() && unknown.is_empty();
    let serving_ok = cells.iter().all(|c| {
        health[&c.name_any()] == Health::Healthy || step.map.count_owned(&c.name_any()) == 0
    });
    let (ok, reason, msg) = if !unknown.is_empty() {
        (
            false,
            "CellsInUnknownRegion",
            format!("cells in unknown regions: {}", unknown.join(",")),
        )
    } else if !serving_ok {
        (
            false,
            "ServingCellNotReady",
            "a cell that owns shards has no ready pods".to_string(),
        )
    } else if all_ready {
        (
            true,
            "Reconciled",
            format!(
                "{} cells ready; routing epoch {}",
                cells.len(),
                step.table.epoch
            ),
        )
    } else {
        (
            true,
            "ServingCellsReady",
            format!(
                "every serving cell is ready ({ready_cells}/{} cells ready); routing epoch {}",
                cells.len(),
                step.table.epoch
            ),
        )
    };
    model::set_condition(&mut status.conditions, "Ready", ok, reason, msg, gen_, now);
    if clear_request {
        status.pending_operation = None;
    }
    patch_topology_status(&topo_api, &topo, &status).await?;
    Ok(Action::requeue(requeue))
}

/// [`reconcile`], timed and counted in the operator's metrics.
async fn timed_reconcile(topo: Arc<Topology>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let r = reconcile(topo, ctx.clone()).await;
    ctx.metrics
        .reconciled(started.elapsed(), r.as_ref().err().map(Error::label));
    r
}

fn push_history(status: &mut TopologyStatus, rec: OperationRecord) {
    status.history.retain(|h| h.id != rec.id);
    status.history.push(rec);
    let extra = status.history.len().saturating_sub(HISTORY_MAX);
    status.history.drain(..extra);
}

async fn patch_cell_status(api: &Api<Cell>, c: &Cell, st: CellStatus) -> Result<(), Error> {
    if c.status.as_ref() == Some(&st) {
        return Ok(());
    }
    let mut v = serde_json::to_value(&st).expect("status encodes");
    if st.not_ready_since.is_none() {
        v["notReadySince"] = serde_json::Value::Null;
    }
    api.patch_status(
        &c.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": v})),
    )
    .await?;
    Ok(())
}

/// Patches the topology status when it changed, carrying the resourceVersion read at the
/// start (optimistic lock): clearing a request can never erase a newer one, and a status
/// computed from an old object is refused instead of overwriting history.
async fn patch_topology_status(
    api: &Api<Topology>,
    topo: &Topology,
    st: &TopologyStatus,
) -> Result<(), Error> {
    if topo.status.as_ref() == Some(st) {
        return Ok(());
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use ldc_store::StoreError;

    #[test]
    fn only_silence_or_a_broken_backend_counts_as_not_reaching_the_store() {
        let store = |e: StoreError| Err::<(), _>(Error::Fence(FenceError::Store(e)));
        assert!(reached(&Ok(())));
        // The store answered, even if it said no.
        assert!(reached(&store(StoreError::Conflict)));
        assert!(reached(&Err::<(), _>(Error::Fence(
            FenceError::NoServingCell
        ))));
        // Silence, or a backend that cannot answer.
        assert!(!reached(&Err::<(), _>(Error::StoreTimeout(
            std::time::Duration::from_secs(10)
        ))));
        for e in [
            StoreError::Backend("pd unreachable".into()),
            StoreError::Undetermined("x".into()),
            StoreError::Io("x".into()),
            StoreError::Config("cannot reach TiKV PD".into()),
            StoreError::Busy("x".into()),
        ] {
            assert!(!reached(&store(e)));
        }
    }
}
