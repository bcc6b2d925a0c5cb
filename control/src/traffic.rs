//! `sys/traffic/{cell}`: a cell's blue/green release on the local platform, beside the
//! green weight in the routing table (which is what routers use): whether the release is
//! paused, and its audit trail (who, when, before -> after), trimmed to
//! [`ldc_core::traffic::TRAFFIC_HISTORY_MAX`] changes as on Kubernetes.

use std::collections::BTreeMap;

use ldc_core::traffic::{Change, record_change};
use ldc_store::Kv;
use serde::{Deserialize, Serialize};

use crate::records::CELLS_MAX;
use crate::{ControlError, decode, keys, put_json};

/// A cell's release state and its audit trail.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficState {
    /// Green weight in basis points as of the last change (the routing table is the truth).
    pub green_weight_bp: u16,
    pub paused: bool,
    #[serde(default)]
    pub history: Vec<Change>,
}

impl TrafficState {
    /// Records a change: weight, pause and the trail (oldest dropped past the bound).
    pub fn apply(&mut self, change: Change) {
        self.green_weight_bp = change.after_bp;
        self.paused = change.paused_after;
        record_change(&mut self.history, change);
    }
}

/// Every cell's traffic record.
pub fn load_all(kv: &mut dyn Kv) -> Result<BTreeMap<String, TrafficState>, ControlError> {
    let p = keys::TRAFFIC_PREFIX.as_bytes();
    ldc_store::scan_all(kv, p, CELLS_MAX)??
        .into_iter()
        .map(|(k, v)| {
            let cell = String::from_utf8_lossy(&k[p.len()..]).into_owned();
            Ok((cell, decode(&k, &v)?))
        })
        .collect()
}

/// One cell's record, read for update (a concurrent change conflicts at commit).
pub fn load_for_update(kv: &mut dyn Kv, cell: &str) -> Result<TrafficState, ControlError> {
    let key = keys::traffic(cell);
    match kv.get_for_update(&key)? {
        Some(b) => decode(&key, &b),
        None => Ok(TrafficState::default()),
    }
}

pub fn put(kv: &mut dyn Kv, cell: &str, st: &TrafficState) -> Result<(), ControlError> {
    put_json(kv, &keys::traffic(cell), st)
}
