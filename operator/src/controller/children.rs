//! Phase 2, children: what each live cell runs. Certificates first (the pods mount them;
//! [`crate::pki::ensure`]), then a Deployment, a Service and a PodDisruptionBudget per cell
//! and colour, by server-side apply: declarative, so a re-run changes nothing, and owned by
//! the Cell, so deleting a cell collects them. The objects themselves are pure functions
//! of the resources ([`crate::specs`]).

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};

use super::context::{Context, Error};
use crate::crd::{Cell, Topology};
use crate::pki::Keys;
use crate::specs::{self, COLOURS, MANAGER};

/// Ensures the certificates and the workloads of `live` cells; returns the platform's keys
/// (the routing-table signer among them).
pub(super) async fn apply(ctx: &Context, topo: &Topology, live: &[Cell]) -> Result<Keys, Error> {
    let ns = topo.namespace().ok_or(Error::NoNamespace)?;
    let names: Vec<String> = live.iter().map(|c| c.name_any()).collect();
    let keys = crate::pki::ensure(&ctx.client, topo, &names).await?;
    let pp = PatchParams::apply(MANAGER).force();
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), &ns);
    for c in live {
        for colour in COLOURS {
            let n = specs::workload_name(&c.name_any(), colour);
            let d = specs::cell_deployment(topo, c, colour);
            deployments.patch(&n, &pp, &Patch::Apply(&d)).await?;
            let s = specs::cell_service(topo, c, colour);
            services.patch(&n, &pp, &Patch::Apply(&s)).await?;
            let b = specs::cell_pdb(topo, c, colour);
            budgets.patch(&n, &pp, &Patch::Apply(&b)).await?;
        }
    }
    Ok(keys)
}
