//! # ldc-control: the control records, in one place
//!
//! Everything the platform knows about itself (as opposed to users' money) lives in the
//! store under `sys/` (and the ownership fences under `own/`). This crate owns every one
//! of those keys and records: nothing else builds a `sys/` key or parses a control record,
//! so a newcomer reads the layout here and nowhere else. The cells, `ldc up`, the verbs of
//! `ldc cell` / `kubectl cell` (`ldc-ops`) and the operator all go through it.
//!
//! ```text
//! sys/config                 platform config: shard count, ledger format     (records)
//! sys/topology               the planner topology: cells, regions, capacity  (records)
//! own/{shard:05}             shard ownership {cell, epoch}: the fence        (records)
//! sys/cells/{cell}           what `ldc up` knows of a running cell           (records)
//! sys/routing, .sig          the published routing table and its signature   (records)
//! sys/ops/{id}               a move applied on the local platform            (moves)
//! sys/k8s/op/{scope}/{id}    a move the operator applied (scope ns/topology) (moves)
//! sys/traffic/{cell}         a cell's release: pause and audit trail         (traffic)
//! sys/relay/{cell}           which colour's relay delivers the outbox        (keys)
//! ```
//!
//! Limits are named here ([`records::CELLS_MAX`], [`moves`], [`traffic`]); a read that
//! would cross one fails with [`ControlError::TooMany`] instead of returning less.
#![forbid(unsafe_code)]

pub mod keys;
pub mod moves;
mod records;
pub mod traffic;

pub use records::*;

use ldc_store::Kv;
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("store: {0}")]
    Store(#[from] ldc_store::StoreError),
    #[error("control record {what} is corrupt: {why}")]
    Corrupt { what: String, why: String },
    #[error("the platform is not initialised in this store; run `ldc up` once to create it")]
    NotInitialised,
    #[error(
        "the store holds ledger records in format {stored}, and this build of LDC reads format {supported}; \
         use the LDC release that created the store, or start on a new data directory (a new store)"
    )]
    LedgerFormat { stored: u32, supported: u32 },
    #[error(
        "the store was created with {stored} shards but {asked} were asked; the shard count never changes after creation"
    )]
    ShardCountChanged { stored: u32, asked: u32 },
    #[error(
        "shard {shard} changed since the plan was made (planned {planned_cell}@{planned_epoch}, now {cell}@{epoch}); \
         nothing was applied, plan again"
    )]
    StalePlan {
        shard: u32,
        planned_cell: String,
        planned_epoch: u64,
        cell: String,
        epoch: u64,
    },
    #[error(transparent)]
    TooMany(#[from] ldc_store::TooMany),
}

pub(crate) fn get_json<T: for<'de> Deserialize<'de>>(
    kv: &mut dyn Kv,
    key: &[u8],
) -> Result<Option<T>, ControlError> {
    match kv.get(key)? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| ControlError::Corrupt {
                what: String::from_utf8_lossy(key).into_owned(),
                why: e.to_string(),
            }),
    }
}

pub(crate) fn put_json<T: Serialize>(
    kv: &mut dyn Kv,
    key: &[u8],
    v: &T,
) -> Result<(), ControlError> {
    kv.put(key, &serde_json::to_vec(v).expect("control records encode"))?;
    Ok(())
}

/// Decodes a control record read under `key`.
pub(crate) fn decode<T: for<'de> Deserialize<'de>>(
    key: &[u8],
    raw: &[u8],
) -> Result<T, ControlError> {
    serde_json::from_slice(raw).map_err(|e| ControlError::Corrupt {
        what: String::from_utf8_lossy(key).into_owned(),
        why: e.to_string(),
    })
}
