//! The Kubernetes table source (feature `kube`): follows the ConfigMap the LDC operator
//! publishes the routing table to (`<topology>-routing`, key [`TABLE_KEY`], written only
//! after the ownership it describes is fenced in the store).
//!
//! A watch delivers every new version at once; a "moved" answer
//! ([`TableHandle::request_refresh`]) triggers a direct read, so a router that missed an
//! event still catches up before it retries. Every table goes through
//! [`TableHandle::offer`], so an old or replayed ConfigMap never moves routing backwards.

use std::future::Future;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use ldc_core::routing::RoutingTable;

use crate::table::TableHandle;

/// Key of the routing table (JSON) inside the operator's ConfigMap.
pub const TABLE_KEY: &str = "routing.json";
/// Key of the publisher's signature of [`TABLE_KEY`]'s bytes.
pub const SIGNATURE_KEY: &str = "routing.json.sig";

/// Why a ConfigMap gave no table.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("ConfigMap has no {TABLE_KEY} key")]
    Missing,
    #[error("the routing table in the ConfigMap is not valid JSON: {0}")]
    Decode(#[from] serde_json::Error),
}

impl KubeSourceError {
    /// A stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            KubeSourceError::Kube(_) => "kube",
            KubeSourceError::Missing => "missing",
            KubeSourceError::Decode(_) => "decode",
        }
    }
}

/// The table a ConfigMap carries.
pub fn table_of(cm: &ConfigMap) -> Result<RoutingTable, KubeSourceError> {
    let s = cm
        .data
        .as_ref()
        .and_then(|d| d.get(TABLE_KEY))
        .ok_or(KubeSourceError::Missing)?;
    Ok(serde_json::from_str(s)?)
}

fn offer_cm(table: &TableHandle, cm: &ConfigMap) {
    let data = cm.data.as_ref();
    let Some(bytes) = data.and_then(|d| d.get(TABLE_KEY)) else {
        table.record_source_error(KubeSourceError::Missing.label());
        tracing::warn!("the routing table ConfigMap has no {TABLE_KEY} key");
        return;
    };
    let signature = data.and_then(|d| d.get(SIGNATURE_KEY));
    if let Err(e) = table.offer_published(bytes.as_bytes(), signature.map(|s| s.as_bytes())) {
        table.record_source_error(e.label());
        tracing::warn!(error = %e, "refused the ConfigMap's routing table");
    }
}

/// Watches ConfigMap `namespace/name` and offers each version to `table` until `shutdown`.
/// Watch errors are retried with the watcher's backoff; the last good table stays in use.
pub async fn watch_config_map(
    client: Client,
    namespace: &str,
    name: &str,
    table: TableHandle,
    shutdown: impl Future<Output = ()>,
) {
    table.attach_source();
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let wc = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let events = watcher::watcher(api.clone(), wc).default_backoff();
    tokio::pin!(events);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            ev = events.next() => match ev {
                None => return,
                Some(Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm))) => offer_cm(&table, &cm),
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    table.record_source_error("kube");
                    tracing::warn!(error = %e, "routing table watch failed; retrying");
                }
            },
            _ = table.refresh_requested() => match api.get_opt(name).await {
                Ok(Some(cm)) => offer_cm(&table, &cm),
                Ok(None) => table.record_source_error("missing"),
                Err(e) => {
                    table.record_source_error("kube");
                    tracing::warn!(error = %e, "routing table read failed");
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ldc_core::routing::{CellRoute, ShardRoute};
    use std::collections::BTreeMap;

    #[test]
    fn reads_the_operators_config_map() {
        let mut t = RoutingTable {
            epoch: 3,
            shards: vec![ShardRoute {
                cell: "c".into(),
                epoch: 2,
            }],
            ..Default::default()
        };
        t.cells.insert("c".into(), CellRoute::default());
        let cm = ConfigMap {
            data: Some(BTreeMap::from([(
                TABLE_KEY.to_string(),
                serde_json::to_string(&t).unwrap(),
            )])),
            ..Default::default()
        };
        assert_eq!(table_of(&cm).unwrap(), t);
        let h = TableHandle::new();
        offer_cm(&h, &cm);
        assert_eq!(h.current().unwrap().epoch, 3);
        assert!(matches!(
            table_of(&ConfigMap::default()),
            Err(KubeSourceError::Missing)
        ));
    }
}
