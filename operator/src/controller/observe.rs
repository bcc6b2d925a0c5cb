//! Phase 1, observe: the latest Topology, its Cells (adopted under the "owns shards"
//! finalizer), the store's ownership map (the platform is created in the store on first
//! sight), and the cells' pods. The I/O is here; what it means (which cells count, how
//! healthy each is, since when) is decided by the pure functions below and in
//! [`crate::model`].

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use ldc_core::planner::{Health, ShardMap};
use ldc_store::Store;

use super::context::{Context, Error, blocking, set_finalizers};
use crate::crd::{CELL_FINALIZER, Cell, Topology};
use crate::fence::{self, FenceError};
use crate::model::{self, Readiness};
use crate::specs::LABEL_TOPOLOGY;

/// The Topology as the API server has it now, not as the watch cache had it: status
/// written a moment ago (a pending request, history) must not be overwritten by a stale
/// copy. Every status write carries this object's resourceVersion, so a concurrent change
/// is a conflict and a fresh reconcile, never a lost update. `None` once it is gone.
pub(super) async fn latest(ctx: &Context, cached: &Topology) -> Result<Option<Topology>, Error> {
    let ns = cached.namespace().ok_or(Error::NoNamespace)?;
    Ok(Api::<Topology>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&cached.name_any())
        .await?)
}

/// The cells of one topology, by what the reconcile may do with them.
#[derive(Debug, Clone, Default)]
pub(super) struct Cells {
    /// Cells in one of the topology's regions (deleting ones included): what is planned.
    pub known: Vec<Cell>,
    /// Cells naming a region the topology does not have: reported, never planned.
    pub unknown: Vec<Cell>,
    /// Known cells not being deleted: what gets Deployments, Services and certificates.
    pub live: Vec<Cell>,
}

impl Cells {
    /// Splits the cells of `topo` (any order) into [`Cells`], each list in name order.
    pub fn of(topo: &Topology, mut all: Vec<Cell>) -> Cells {
        all.retain(|c| c.spec.topology == topo.name_any());
        all.sort_by_key(|c| c.name_any());
        let (unknown, known): (Vec<Cell>, Vec<Cell>) = all
            .into_iter()
            .partition(|c| !topo.spec.regions.contains(&c.spec.region));
        let live = known
            .iter()
            .filter(|c| c.metadata.deletion_timestamp.is_none())
            .cloned()
            .collect();
        Cells {
            known,
            unknown,
            live,
        }
    }

    pub fn unknown_names(&self) -> Vec<String> {
        self.unknown.iter().map(|c| c.name_any()).collect()
    }
}

/// Lists the topology's cells and adopts each live one under [`CELL_FINALIZER`], so a cell
/// that owns shards cannot disappear before they move.
pub(super) async fn cells(ctx: &Context, topo: &Topology) -> Result<Cells, Error> {
    let ns = topo.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<Cell> = Api::namespaced(ctx.client.clone(), &ns);
    let cells = Cells::of(topo, api.list(&ListParams::default()).await?.items);
    for c in cells.known.iter().chain(&cells.unknown) {
        let has = c.finalizers().iter().any(|f| f == CELL_FINALIZER);
        if has || c.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let mut fins: Vec<&str> = c.finalizers().iter().map(String::as_str).collect();
        fins.push(CELL_FINALIZER);
        set_finalizers(&api, c, &fins).await?;
    }
    Ok(cells)
}

/// The store of `topo` and its ownership map, creating the platform in it on first sight
/// (the initial map over the serving cells). `Ok(Err(_))` is a store that answered but
/// cannot be used as it is (reported in status); `Err(_)` a call that failed.
pub(super) async fn store(
    ctx: &Context,
    topo: &Topology,
    cells: &Cells,
) -> Result<Result<(Arc<dyn Store>, ShardMap), FenceError>, Error> {
    let store = ctx.store(&topo.spec.store).await?;
    let ptopo = model::planner_topology(topo, &cells.known);
    let serving = model::initial_serving(&cells.live);
    let s = store.clone();
    let init = blocking(&ctx.reach, move || {
        fence::ensure_initialised(&*s, &ptopo, &serving, ldc_core::clock::now_ms())
    })
    .await;
    match init {
        Ok(map) => Ok(Ok((store, map))),
        Err(Error::Fence(e)) => Ok(Err(e)),
        Err(e) => Err(e),
    }
}

/// What the pods say about each known cell.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct PodHealth {
    /// Ready pods per cell and colour.
    pub ready: BTreeMap<String, Readiness>,
    /// The planner's health per cell ([`model::cell_health`]).
    pub health: BTreeMap<String, Health>,
    /// Since when each cell has been unhealthy (`None`: healthy).
    pub since: BTreeMap<String, Option<Timestamp>>,
    /// Why the pods cannot share the store, if they cannot ([`model::store_shared`]).
    pub store_not_shared: Option<String>,
}

impl PodHealth {
    /// Health of `cells` from their `pods` at `now`, keeping each cell's recorded
    /// `notReadySince` while it stays unhealthy.
    pub fn of(cells: &[Cell], pods: &[Pod], store: &str, now: Timestamp) -> PodHealth {
        let ready = model::readiness(pods);
        let health = model::health_map(cells, &ready);
        let since = cells
            .iter()
            .map(|c| {
                let prev = c
                    .status
                    .as_ref()
                    .and_then(|s| s.not_ready_since.as_deref())
                    .and_then(|s| s.parse().ok());
                let name = c.name_any();
                let since = model::not_ready_since(prev, health[&name], now);
                (name, since)
            })
            .collect();
        PodHealth {
            ready,
            health,
            since,
            store_not_shared: model::store_shared(store, pods).err(),
        }
    }

    /// Test fixture: every cell of `cells` healthy with one ready pod per colour, but
    /// `down`, unhealthy (no ready pod) since `since`.
    #[cfg(test)]
    pub fn all_but(cells: &[Cell], down: &[&str], since: Timestamp) -> PodHealth {
        let mut p = PodHealth::default();
        for c in cells {
            let n = c.name_any();
            let is_down = down.contains(&n.as_str());
            let (r, h) = if is_down {
                (Readiness::default(), Health::Unhealthy)
            } else {
                (Readiness { blue: 1, green: 1 }, Health::Healthy)
            };
            p.ready.insert(n.clone(), r);
            p.health.insert(n.clone(), h);
            p.since.insert(n, is_down.then_some(since));
        }
        p
    }

    pub fn is_healthy(&self, cell: &str) -> bool {
        self.health.get(cell) == Some(&Health::Healthy)
    }
}

/// Reads the topology's pods and judges its cells by them.
pub(super) async fn pods(
    ctx: &Context,
    topo: &Topology,
    cells: &[Cell],
    now: Timestamp,
) -> Result<PodHealth, Error> {
    let ns = topo.namespace().ok_or(Error::NoNamespace)?;
    let selector = format!("{LABEL_TOPOLOGY}={}", topo.name_any());
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;
    Ok(PodHealth::of(cells, &pods, &topo.spec.store, now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{CellRole, CellStatus};
    use crate::specs::tests::{cell, topo};

    #[test]
    fn cells_split_by_region_and_deletion_in_name_order() {
        let mut gone = cell("r1-c", "r1", CellRole::Standby);
        gone.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::UNIX_EPOCH),
        );
        let mut other = cell("x-a", "r1", CellRole::Serving);
        other.spec.topology = "another".into();
        let all = vec![
            cell("r2-a", "r2", CellRole::Serving),
            cell("r9-a", "r9", CellRole::Serving),
            gone,
            cell("r1-a", "r1", CellRole::Serving),
            other,
        ];
        let c = Cells::of(&topo(), all);
        let names = |v: &[Cell]| v.iter().map(|c| c.name_any()).collect::<Vec<_>>();
        assert_eq!(names(&c.known), ["r1-a", "r1-c", "r2-a"]);
        assert_eq!(names(&c.live), ["r1-a", "r2-a"]);
        assert_eq!(c.unknown_names(), ["r9-a"]);
    }

    #[test]
    fn not_ready_since_is_kept_while_unhealthy_and_cleared_when_healthy() {
        let t0: Timestamp = "2025-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2025-01-01T00:00:09Z".parse().unwrap();
        let mut was_down = cell("r1-a", "r1", CellRole::Serving);
        was_down.status = Some(CellStatus {
            not_ready_since: Some(t0.to_string()),
            ..Default::default()
        });
        let fresh = cell("r1-b", "r1", CellRole::Serving);
        let h = PodHealth::of(&[was_down.clone(), fresh], &[], "/data/store.db", t1);
        assert_eq!(h.since["r1-a"], Some(t0), "still down since t0");
        assert_eq!(h.since["r1-b"], Some(t1), "down from now");
        assert!(!h.is_healthy("r1-a"));
    }
}
