//! Phase 4, fence then route: the move (if any) and the next routing table commit in one
//! store transaction ([`crate::fence::commit_step`]); only then is the table published to
//! the `<topology>-routing` ConfigMap the routers watch, byte for byte as stored, with
//! its signature. A router can therefore never see a table naming an owner the store has
//! not fenced, and the epoch lives with the ownership it describes.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use ldc_core::planner::{Plan, ShardMap};
use ldc_store::Store;

use super::context::{Context, Error, Note, blocking};
use super::pending::Pending;
use crate::crd::{Cell, Topology};
use crate::fence::{self, Step};
use crate::model;
use crate::pki::Keys;
use crate::specs::{self, EPOCH_ANNOTATION, MANAGER};

/// Commits `apply` (a pending operation and its plan), or nothing but the routing table,
/// in the store.
pub(super) async fn commit(
    ctx: &Context,
    topo: &Topology,
    store: Arc<dyn Store>,
    cells: &[Cell],
    apply: Option<(&Pending, &Plan)>,
    keys: Arc<Keys>,
) -> Result<Step, Error> {
    let ns = topo.namespace().ok_or(Error::NoNamespace)?;
    let scope = format!("{ns}/{}", topo.name_any());
    let shard_count = topo.spec.shard_count;
    let cells = cells.to_vec();
    let build = move |m: &ShardMap| model::build_table(m, &cells, &ns);
    let apply = apply.map(|(p, plan)| (p.id.clone(), p.requested_by.clone(), plan.clone()));
    blocking(&ctx.reach, move || {
        let step = apply
            .as_ref()
            .map(|(id, by, plan)| fence::StepMove { id, by, plan });
        fence::commit_step(
            &*store,
            shard_count,
            &scope,
            step,
            build,
            Some(&keys.routing),
        )
    })
    .await
}

/// A test failpoint: with `LDC_FAILPOINT=after-fence`, the process exits right after a move
/// committed, before its table is published (the e2e suite crashes the operator here and
/// checks that the next leader finishes the move once).
pub(super) fn failpoint_after_fence(topo: &Topology, step: &Step) {
    if step.op.is_some() && std::env::var("LDC_FAILPOINT").as_deref() == Ok("after-fence") {
        tracing::error!(topology = %topo.name_any(), "failpoint after-fence: exiting before publishing");
        std::process::exit(86);
    }
}

/// Publishes the committed table to the routing ConfigMap unless it already carries it.
pub(super) async fn config_map(ctx: &Context, topo: &Topology, step: &Step) -> Result<(), Error> {
    let ns = topo.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let name = specs::routing_config_map_name(&topo.name_any());
    let published = api
        .get_opt(&name)
        .await?
        .and_then(|cm| cm.annotations().get(EPOCH_ANNOTATION).cloned())
        .and_then(|e| e.parse::<u64>().ok());
    let epoch = step.table.epoch;
    if published == Some(epoch) {
        return Ok(());
    }
    let cm = specs::routing_config_map(topo, epoch, &step.published);
    let pp = PatchParams::apply(MANAGER).force();
    api.patch(&name, &pp, &Patch::Apply(&cm)).await?;
    tracing::info!(topology = %topo.name_any(), epoch, "routing table published");
    let note = format!("routing table epoch {epoch} published to ConfigMap {name}");
    ctx.event(topo, Note::normal("RoutingPublished", note))
        .await;
    Ok(())
}
