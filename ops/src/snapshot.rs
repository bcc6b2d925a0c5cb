//! What a verb decides on: the platform as one value, the same on both platforms.

use std::collections::BTreeMap;

use ldc_core::planner::{Health, ShardMap, Topology};
use ldc_core::traffic::Change;
use serde::Serialize;

/// The platform at one moment, as the routers and the controller see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Cells, regions, capacities and the shard count, as the planner takes them.
    pub topology: Topology,
    /// Ownership as published (every router routes by it).
    pub map: ShardMap,
    /// Epoch of the routing table in force.
    pub routing_epoch: u64,
    /// Every cell by name.
    pub cells: BTreeMap<String, CellFacts>,
    /// A move recorded and not yet carried out (Kubernetes: the operator's queue of one).
    pub pending: Option<Pending>,
}

/// A move waiting for its controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Pending {
    pub id: String,
    pub command: String,
}

/// One cell.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CellFacts {
    pub region: String,
    /// Whether the controller judges it healthy ([`ldc_core::traffic::serves`]): every
    /// colour that receives users has something live.
    pub healthy: bool,
    /// Being deleted: moves away from it are final, none go to it.
    pub deleting: bool,
    /// Green weight in force (basis points).
    pub green_weight_bp: u16,
    pub paused: bool,
    /// The release steps `--next` walks (basis points, ascending).
    pub steps: Vec<u16>,
    pub blue: ColourFacts,
    pub green: ColourFacts,
    /// The last recorded traffic change (what `--undo` reverts).
    pub last_change: Option<Change>,
    /// An ownership change involving the cell that is in flight or about to start (an
    /// automatic failover that is due), for humans; traffic changes other than abort and
    /// pause wait for it.
    pub busy: Option<String>,
}

/// One colour of a cell.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ColourFacts {
    /// Processes (local) or ready pods (Kubernetes) that can serve.
    pub live: u32,
    /// Where routers send this colour's users.
    pub endpoints: Vec<String>,
    /// What runs it, by platform: `pid` and `metrics` locally, `pods` on Kubernetes.
    #[serde(flatten)]
    pub detail: BTreeMap<String, serde_json::Value>,
}

impl Snapshot {
    /// Health as the planner takes it.
    pub fn health(&self) -> BTreeMap<String, Health> {
        self.cells
            .iter()
            .map(|(c, f)| {
                let h = if f.healthy && !f.deleting {
                    Health::Healthy
                } else {
                    Health::Unhealthy
                };
                (c.clone(), h)
            })
            .collect()
    }

    /// The cell `name`, or a refusal that lists the cells.
    pub fn cell(&self, name: &str) -> Result<&CellFacts, crate::OpsError> {
        self.cells.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.cells.keys().map(String::as_str).collect();
            crate::OpsError::Refused(format!(
                "unknown cell {}; the cells are {}",
                ldc_core::quote_prefix(name, 64),
                known.join(", ")
            ))
        })
    }
}
