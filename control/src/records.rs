//! Platform config, topology, shard ownership, cell runtime facts and the published
//! routing table, plus the executor that applies a planner [`Plan`] to the store.
//!
//! The order is the fencing rule of the design: ownership records (with bumped epochs) are
//! written first, then the routing table is rebuilt from them. The local platform does both
//! in one store transaction; the operator commits ownership, then publishes the table.

use ldc_security::table::TableSigner;
use std::collections::BTreeMap;

use ldc_core::planner::{Owner, Plan, ShardMap, Topology};
use ldc_core::routing::{self, CellRoute, RoutingTable};
use ldc_store::{Kv, prefix_end};
use serde::{Deserialize, Serialize};

use crate::{ControlError, decode, get_json, keys, put_json};

/// The layout of the ledger's records (see [`crate::keys`] and [`crate::model`]) this
/// build writes and reads. 2: entries carry their contra leg, system accounts have no
/// entry rows, idempotency records name their payment. 3: relay dedup records keep a
/// digest of the credit they answered. 4: idempotency records have an age index
/// (`keys::idempotency_by_age`), which retention walks.
pub const LEDGER_FORMAT: u32 = 4;

/// The shards `cell` owns, from the ownership records (what the relay and retention walk).
pub fn owned_shards(kv: &mut dyn Kv, cell: &str) -> Result<Vec<u32>, ControlError> {
    let corrupt = |why: String| ControlError::Corrupt {
        what: "shard ownership".into(),
        why,
    };
    let rows = kv.scan(
        keys::OWNER_PREFIX,
        &prefix_end(keys::OWNER_PREFIX),
        ldc_core::shard::MAX_SHARDS as usize,
    )?;
    let mut out = Vec::new();
    for (k, v) in rows {
        let o: Owner = serde_json::from_slice(&v).map_err(|e| corrupt(e.to_string()))?;
        if o.cell != cell {
            continue;
        }
        let shard = std::str::from_utf8(&k[keys::OWNER_PREFIX.len()..])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt("a key that names no shard".into()))?;
        out.push(shard);
    }
    Ok(out)
}

/// Fixed facts about a platform, written once at creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformConfig {
    pub shard_count: u32,
    pub created_unix_ms: u64,
    /// [`LEDGER_FORMAT`] of the build that created the store (absent: format 1).
    #[serde(default = "first_format")]
    pub ledger_format: u32,
}

fn first_format() -> u32 {
    1
}

/// Refuses a store whose records this build would misread.
fn check_format(cfg: PlatformConfig) -> Result<PlatformConfig, ControlError> {
    if cfg.ledger_format != LEDGER_FORMAT {
        return Err(ControlError::LedgerFormat {
            stored: cfg.ledger_format,
            supported: LEDGER_FORMAT,
        });
    }
    Ok(cfg)
}

/// What the local runner knows about a running cell (one process per colour).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellRuntime {
    pub region: String,
    pub blue: Vec<String>,
    pub green: Vec<String>,
    pub pids: Vec<u32>,
    pub metrics: Vec<String>,
    pub healthy: bool,
}

pub fn load_config(kv: &mut dyn Kv) -> Result<PlatformConfig, ControlError> {
    check_format(get_json(kv, keys::CONFIG)?.ok_or(ControlError::NotInitialised)?)
}

pub fn load_topology(kv: &mut dyn Kv) -> Result<Topology, ControlError> {
    get_json(kv, keys::TOPOLOGY)?.ok_or(ControlError::NotInitialised)
}

pub fn load_routing(kv: &mut dyn Kv) -> Result<Option<RoutingTable>, ControlError> {
    get_json(kv, routing::STORE_KEY)
}

/// Creates the platform if the store is empty: config, topology and the initial ownership
/// map (epoch 1). Returns false (and checks the shard count) when it already exists.
pub fn init(
    kv: &mut dyn Kv,
    topology: &Topology,
    serving: &[&str],
    now_ms: u64,
) -> Result<bool, ControlError> {
    if let Some(cfg) = get_json::<PlatformConfig>(kv, keys::CONFIG)? {
        let cfg = check_format(cfg)?;
        if cfg.shard_count != topology.shard_count {
            return Err(ControlError::ShardCountChanged {
                stored: cfg.shard_count,
                asked: topology.shard_count,
            });
        }
        return Ok(false);
    }
    put_json(
        kv,
        keys::CONFIG,
        &PlatformConfig {
            shard_count: topology.shard_count,
            created_unix_ms: now_ms,
            ledger_format: LEDGER_FORMAT,
        },
    )?;
    put_json(kv, keys::TOPOLOGY, topology)?;
    let map = ShardMap::initial(topology.shard_count, serving);
    for (shard, owner) in map.owners.iter().enumerate() {
        put_json(kv, &keys::owner(shard as u32), owner)?;
    }
    Ok(true)
}

/// Reads every ownership record.
pub fn load_map(kv: &mut dyn Kv, shard_count: u32) -> Result<ShardMap, ControlError> {
    let rows = kv.scan(
        keys::OWNER_PREFIX,
        &prefix_end(keys::OWNER_PREFIX),
        shard_count as usize + 1,
    )?;
    if rows.len() != shard_count as usize {
        return Err(ControlError::Corrupt {
            what: "ownership records".into(),
            why: format!("found {} for {shard_count} shards", rows.len()),
        });
    }
    let owners = rows
        .into_iter()
        .map(|(k, v)| {
            serde_json::from_slice::<Owner>(&v).map_err(|e| ControlError::Corrupt {
                what: String::from_utf8_lossy(&k).into_owned(),
                why: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ShardMap { owners })
}

/// Applies a plan's moves, each conditional on the shard still being where the plan saw it
/// (a compare-and-set per ownership record, read for update so TiKV fences concurrent
/// writers). Any difference aborts with `StalePlan` and the caller rolls back.
pub fn apply_plan(kv: &mut dyn Kv, plan: &Plan) -> Result<(), ControlError> {
    // In shard order: the order in which every writer locks the store's shard files.
    let mut moves: Vec<_> = plan.moves.iter().collect();
    moves.sort_by_key(|m| m.shard);
    for m in moves {
        let key = keys::owner(m.shard);
        let cur: Owner = match kv.get_for_update(&key)? {
            Some(b) => serde_json::from_slice(&b).map_err(|e| ControlError::Corrupt {
                what: format!("own/{}", m.shard),
                why: e.to_string(),
            })?,
            None => {
                return Err(ControlError::Corrupt {
                    what: format!("own/{}", m.shard),
                    why: "missing".into(),
                });
            }
        };
        if cur.cell != m.from || cur.epoch != m.epoch_before {
            return Err(ControlError::StalePlan {
                shard: m.shard,
                planned_cell: m.from.clone(),
                planned_epoch: m.epoch_before,
                cell: cur.cell,
                epoch: cur.epoch,
            });
        }
        assert!(
            m.epoch_after > cur.epoch,
            "fencing invariant: epochs only go up"
        );
        put_json(
            kv,
            &key,
            &Owner {
                cell: m.to.clone(),
                epoch: m.epoch_after,
            },
        )?;
    }
    Ok(())
}

pub fn put_cell_runtime(kv: &mut dyn Kv, cell: &str, rt: &CellRuntime) -> Result<(), ControlError> {
    put_json(kv, &keys::cell_runtime(cell), rt)
}

/// Most cells a platform may have (bounds every per-cell read).
pub const CELLS_MAX: usize = ldc_store::SCAN_LIMIT_MAX;

pub fn load_cell_runtimes(kv: &mut dyn Kv) -> Result<BTreeMap<String, CellRuntime>, ControlError> {
    let p = keys::CELLS_PREFIX.as_bytes();
    ldc_store::scan_all(kv, p, CELLS_MAX)??
        .into_iter()
        .map(|(k, v)| {
            let name = String::from_utf8_lossy(&k[p.len()..]).into_owned();
            Ok((name, decode(&k, &v)?))
        })
        .collect()
}

/// Stores `table` under [`routing::STORE_KEY`] with the publisher's signature of those
/// exact bytes under [`routing::SIGNATURE_KEY`] (none with `--insecure`: routers that
/// verify then refuse it). Every publisher (`ldc up`, the operator) writes through here.
/// Returns the JSON stored and its signature.
pub fn store_routing(
    kv: &mut dyn Kv,
    table: &RoutingTable,
    signer: Option<&TableSigner>,
) -> Result<(String, Option<String>), ControlError> {
    let json = serde_json::to_string(table).expect("routing tables encode");
    kv.put(routing::STORE_KEY, json.as_bytes())?;
    let signature = signer.map(|s| s.sign(json.as_bytes()));
    match &signature {
        Some(sig) => kv.put(routing::SIGNATURE_KEY, sig.as_bytes())?,
        None => kv.delete(routing::SIGNATURE_KEY)?,
    }
    Ok((json, signature))
}

/// Rebuilds the routing table from ownership and cell runtimes, keeps each cell's green
/// weight from the previous table unless `weights` overrides it, and stores it with the
/// next epoch, signed by `signer`, if it differs from the stored one
/// ([`RoutingTable::succeeding`]). Returns the table in force.
pub fn publish_routing(
    kv: &mut dyn Kv,
    weights: &BTreeMap<String, u16>,
    signer: Option<&TableSigner>,
) -> Result<RoutingTable, ControlError> {
    let cfg = load_config(kv)?;
    let topo = load_topology(kv)?;
    let map = load_map(kv, cfg.shard_count)?;
    let runtimes = load_cell_runtimes(kv)?;
    let stored = load_routing(kv)?;
    let prev = stored.clone().unwrap_or_default();
    let cells = topo
        .cells
        .iter()
        .map(|c| {
            let rt = runtimes.get(&c.id).cloned().unwrap_or_default();
            let prev_cell = prev.cells.get(&c.id);
            let weight = weights
                .get(&c.id)
                .copied()
                .or_else(|| prev_cell.map(|p| p.green_weight_bp))
                .unwrap_or(0);
            let route = CellRoute {
                region: c.region.clone(),
                blue: rt.blue,
                green: rt.green,
                green_weight_bp: weight,
                allow_forced_colour: prev_cell.is_none_or(|p| p.allow_forced_colour),
            };
            (c.id.clone(), route)
        })
        .collect();
    let candidate = RoutingTable::of(&map, cells);
    let Some(table) = candidate.succeeding(stored.as_ref()) else {
        return Ok(prev);
    };
    table.validate().map_err(|e| ControlError::Corrupt {
        what: "routing table".into(),
        why: e.to_string(),
    })?;
    store_routing(kv, &table, signer)?;
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ldc_store::{Store, sqlite::SqliteStore};

    /// A store written by an older layout is refused with what to do, never misread.
    #[test]
    fn stores_of_another_ledger_format_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        let topo = Topology::new(4, &[("c", "r")]);
        let mut t = store.begin().unwrap();
        assert!(init(&mut *t, &topo, &["c"], 0).unwrap());
        assert_eq!(load_config(&mut *t).unwrap().ledger_format, LEDGER_FORMAT);
        // What a format-1 build wrote: no ledger_format field.
        t.put(keys::CONFIG, br#"{"shard_count":4,"created_unix_ms":0}"#)
            .unwrap();
        let e = load_config(&mut *t).unwrap_err().to_string();
        assert!(
            e.contains("format 1") && e.contains("new data directory"),
            "{e}"
        );
        assert!(matches!(
            init(&mut *t, &topo, &["c"], 0),
            Err(ControlError::LedgerFormat {
                stored: 1,
                supported: LEDGER_FORMAT
            })
        ));
        t.rollback().unwrap();
    }
}
