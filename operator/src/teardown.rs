//! `ldc-operator teardown`: what the chart's `pre-delete` hook runs on `helm uninstall`.
//!
//! Why a hook: Helm deletes a release's custom resources last, after the operator's Role,
//! so an operator would lose the right to lift its finalizers and the Topology and Cells
//! would hang in deletion for ever. The hook runs first, while the operator still runs
//! with all its rights: it deletes the release's Topologies and Cells and waits until they
//! are gone. The operator does the finalizer work (a Topology being deleted releases its
//! cells even if they still own shards: the whole platform goes). Ownership records and
//! ledgers stay in the store, so installing again on the same store resumes every balance.

use std::time::{Duration, Instant};

use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client, ResourceExt};

use crate::crd::{Cell, Topology};

#[derive(Debug, thiserror::Error)]
pub enum TeardownError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(
        "after {0:?} these still exist: {1}; is the operator running? \
         (`kubectl get topologies,cells -o yaml` shows their finalizers)"
    )]
    Timeout(Duration, String),
}

/// Deletes every Topology and Cell matching `selector` in `namespace` and waits until they
/// are gone; returns how many it deleted. API errors are retried until `timeout` (a hook's
/// RoleBinding can take a moment to be honoured); every step is idempotent.
pub async fn run(
    client: &Client,
    namespace: &str,
    selector: &str,
    timeout: Duration,
) -> Result<usize, TeardownError> {
    let started = Instant::now();
    loop {
        match attempt(client, namespace, selector, started, timeout).await {
            Err(TeardownError::Kube(e)) if started.elapsed() < timeout => {
                tracing::warn!(error = %e, "teardown: API request failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
}

async fn attempt(
    client: &Client,
    namespace: &str,
    selector: &str,
    started: Instant,
    timeout: Duration,
) -> Result<usize, TeardownError> {
    let topologies: Api<Topology> = Api::namespaced(client.clone(), namespace);
    let cells: Api<Cell> = Api::namespaced(client.clone(), namespace);
    let lp = ListParams::default().labels(selector);
    let mut deleted = 0;
    for t in topologies.list(&lp).await? {
        delete(&topologies, &t.name_any()).await?;
        deleted += 1;
    }
    for c in cells.list(&lp).await? {
        delete(&cells, &c.name_any()).await?;
        deleted += 1;
    }
    loop {
        let mut left: Vec<String> = topologies
            .list(&lp)
            .await?
            .iter()
            .map(|t| format!("topology/{}", t.name_any()))
            .collect();
        left.extend(
            cells
                .list(&lp)
                .await?
                .iter()
                .map(|c| format!("cell/{}", c.name_any())),
        );
        if left.is_empty() {
            return Ok(deleted);
        }
        if started.elapsed() > timeout {
            return Err(TeardownError::Timeout(timeout, left.join(", ")));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn delete<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}
