//! `status`: every cell, its role, health, shards, epochs, release and what runs it.

use std::collections::BTreeMap;

use ldc_core::planner::{epoch_span, shard_ranges};
use serde::Serialize;

use crate::{ColourFacts, Pending, Snapshot};

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    pub shard_count: u32,
    pub routing_epoch: u64,
    pub regions: Vec<String>,
    pub cells: Vec<CellStatus>,
    /// A move recorded and not yet carried out.
    pub pending: Option<Pending>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CellStatus {
    pub cell: String,
    pub region: String,
    /// `serving` (owns shards) or `standby`.
    pub role: &'static str,
    pub healthy: bool,
    pub shards: Vec<u32>,
    /// The shards as ranges (`0-5,9`).
    pub ranges: String,
    /// Each owned shard's epoch.
    pub epochs: BTreeMap<String, u64>,
    /// Lowest and highest of them (`1-2`).
    pub epoch_span: String,
    pub green_weight_bp: u16,
    pub paused: bool,
    /// `step 2/4` when the weight is one of the cell's release steps.
    pub step: Option<String>,
    pub busy: Option<String>,
    pub colours: Colours,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Colours {
    pub blue: ColourFacts,
    pub green: ColourFacts,
}

/// The status report of `s`.
pub fn status(s: &Snapshot) -> StatusReport {
    let cells = s
        .cells
        .iter()
        .map(|(name, c)| {
            let shards = s.map.owned_by(name);
            let epochs: Vec<u64> = shards
                .iter()
                .map(|sh| s.map.owners[*sh as usize].epoch)
                .collect();
            CellStatus {
                cell: name.clone(),
                region: c.region.clone(),
                role: if shards.is_empty() {
                    "standby"
                } else {
                    "serving"
                },
                healthy: c.healthy,
                ranges: shard_ranges(&shards),
                epochs: shards
                    .iter()
                    .zip(&epochs)
                    .map(|(sh, e)| (sh.to_string(), *e))
                    .collect(),
                epoch_span: epoch_span(&epochs),
                shards,
                green_weight_bp: c.green_weight_bp,
                paused: c.paused,
                step: step_label(&c.steps, c.green_weight_bp),
                busy: c.busy.clone(),
                colours: Colours {
                    blue: c.blue.clone(),
                    green: c.green.clone(),
                },
            }
        })
        .collect();
    StatusReport {
        shard_count: s.topology.shard_count,
        routing_epoch: s.routing_epoch,
        regions: s
            .topology
            .regions()
            .into_iter()
            .map(str::to_string)
            .collect(),
        cells,
        pending: s.pending.clone(),
    }
}

/// `step 2/4` when `bp` is the second of four release steps.
pub fn step_label(steps: &[u16], bp: u16) -> Option<String> {
    let i = steps.iter().position(|s| *s == bp)?;
    Some(format!("step {}/{}", i + 1, steps.len()))
}
