//! The one planner: (topology, observed ownership and health, command) → plan.
//!
//! Pure: no I/O, no clock. The local controller (`ldc up`), `ldc cell failover`, the
//! Kubernetes operator and `kubectl cell` all call [`plan`], print the [`Plan`], and hand
//! it to their executor, which writes the new ownership records (with bumped epochs) to the
//! store *before* publishing a routing table (fence first, then route).
//!
//! Rules every plan keeps (checked by the property tests below):
//! * every shard has exactly one owner before and after;
//! * a moved shard's epoch goes up by exactly one, an unmoved shard's stays;
//! * shards only move to healthy cells, and never past a cell's capacity;
//! * a plan with no moves is refused (nothing to do is an error the operator sees).

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use thiserror::Error;

/// A cell as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellInfo {
    pub id: String,
    pub region: String,
    /// Most shards this cell may own (`None`: no limit).
    pub capacity: Option<u32>,
}

/// The fixed shape of the platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    pub shard_count: u32,
    pub cells: Vec<CellInfo>,
}

impl Topology {
    /// `shard_count` shards over `cells` (id, region), none with a capacity limit.
    pub fn new(shard_count: u32, cells: &[(&str, &str)]) -> Topology {
        let cells = cells
            .iter()
            .map(|(id, region)| CellInfo {
                id: id.to_string(),
                region: region.to_string(),
                capacity: None,
            })
            .collect();
        Topology { shard_count, cells }
    }

    pub fn cell(&self, id: &str) -> Option<&CellInfo> {
        self.cells.iter().find(|c| c.id == id)
    }

    pub fn regions(&self) -> BTreeSet<&str> {
        self.cells.iter().map(|c| c.region.as_str()).collect()
    }
}

/// Owner of one shard, with its fencing epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub cell: String,
    pub epoch: u64,
}

/// Ownership of every shard (index = shard number).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMap {
    pub owners: Vec<Owner>,
}

impl ShardMap {
    /// Shards owned by `cell`, ascending.
    pub fn owned_by(&self, cell: &str) -> Vec<u32> {
        self.owners
            .iter()
            .enumerate()
            .filter(|(_, o)| o.cell == cell)
            .map(|(i, _)| i as u32)
            .collect()
    }

    pub fn count_owned(&self, cell: &str) -> u32 {
        self.owners.iter().filter(|o| o.cell == cell).count() as u32
    }

    /// The initial map: serving cells (those not named standby) own contiguous equal runs of
    /// shards, in the order given, at epoch 1.
    pub fn initial(shard_count: u32, serving: &[&str]) -> ShardMap {
        assert!(!serving.is_empty(), "need at least one serving cell");
        let n = serving.len() as u32;
        let owners = (0..shard_count)
            .map(|s| Owner {
                cell: serving[(s * n / shard_count) as usize].to_string(),
                epoch: 1,
            })
            .collect();
        ShardMap { owners }
    }
}

/// "0-24,30" for a sorted shard list ("-" when empty): how both drivers print shard sets.
pub fn shard_ranges(shards: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < shards.len() {
        let mut j = i;
        while j + 1 < shards.len() && shards[j + 1] == shards[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            shards[i].to_string()
        } else {
            format!("{}-{}", shards[i], shards[j])
        });
        i = j + 1;
    }
    if out.is_empty() {
        "-".into()
    } else {
        out.join(",")
    }
}

/// Most characters of a malformed shard list quoted back in an error: the list may come
/// from a custom resource or a command line of any size.
const RANGE_QUOTE_CHARS_MAX: usize = 32;

/// Parses what [`shard_ranges`] prints ("0-24,30"; "-" or "" is empty).
///
/// Bounded: every shard must be below [`crate::shard::MAX_SHARDS`] and the list may name
/// at most that many shards, so a hostile range (`0-4294967295`) is refused before it
/// allocates anything.
pub fn parse_shard_ranges(s: &str) -> Result<Vec<u32>, String> {
    let s = s.trim();
    if s.is_empty() || s == "-" {
        return Ok(Vec::new());
    }
    let limit = crate::shard::MAX_SHARDS;
    let quote = |t: &str| crate::quote_prefix(t, RANGE_QUOTE_CHARS_MAX);
    let mut out = Vec::new();
    for part in s.split(',') {
        let bad = || format!("bad shard range {}; expected e.g. 0-24,30", quote(part));
        let (a, b): (u32, u32) = match part.split_once('-') {
            Some((a, b)) => (
                a.trim().parse().map_err(|_| bad())?,
                b.trim().parse().map_err(|_| bad())?,
            ),
            None => {
                let a = part.trim().parse().map_err(|_| bad())?;
                (a, a)
            }
        };
        if a > b {
            return Err(bad());
        }
        if b >= limit {
            return Err(format!(
                "shard range {} names shard {b}, but shard ids are below {limit}",
                quote(part)
            ));
        }
        if out.len() + (b - a + 1) as usize > limit as usize {
            return Err(format!(
                "shard list {} names more than {limit} shards",
                quote(s)
            ));
        }
        out.extend(a..=b);
    }
    Ok(out)
}

/// The command that undoes `plan`: every moved shard back to the cell it came from.
pub fn reverse_of(plan: &Plan, op: &str) -> Command {
    Command::Revert {
        op: op.to_string(),
        back: plan.moved_from(),
    }
}

/// Whether `plan` can be undone once it has run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReverseCheck {
    /// The command that undoes it.
    pub command: Command,
    /// Cells the shards would go back to that are not healthy now: the reverse works once
    /// they are (a failover's reverse waits for the failed cell to recover).
    pub waits_for: Vec<String>,
    /// Cells the shards leave for good (being deleted): for them the move is final, which
    /// is the point of evacuating a cell before it goes.
    pub final_for: Vec<String>,
}

/// Checks, before `plan` runs, that its reverse will be possible: plans the reverse on the
/// map after `plan`, assuming the cells it empties recover. Cells in `gone` (being deleted)
/// are left out of the reverse and reported as final. An error says why the move could not
/// be undone (e.g. a capacity lowered since the shards arrived).
pub fn check_reverse(
    topo: &Topology,
    map: &ShardMap,
    health: &BTreeMap<String, Health>,
    plan: &Plan,
    op: &str,
    gone: &BTreeSet<String>,
) -> Result<ReverseCheck, PlanError> {
    let mut command = reverse_of(plan, op);
    let Command::Revert { back, .. } = &mut command else {
        unreachable!("reverse_of returns a revert")
    };
    let final_for: Vec<String> = back.keys().filter(|c| gone.contains(*c)).cloned().collect();
    back.retain(|c, _| !gone.contains(c));
    let mut assumed = health.clone();
    let mut waits_for = Vec::new();
    for cell in back.keys() {
        if !is_healthy(health, cell) {
            waits_for.push(cell.clone());
            assumed.insert(cell.clone(), Health::Healthy);
        }
    }
    if !back.is_empty() {
        plan_inner(topo, &plan.apply(map), &assumed, &command)?;
    }
    Ok(ReverseCheck {
        command,
        waits_for,
        final_for,
    })
}

/// What the health checks say about a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    Unhealthy,
}

/// An ownership change someone asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Command {
    /// Move every shard of `cell` to its region's standby (a healthy cell that owns no
    /// shard), or spread them over the region's healthy cells when there is none.
    Failover { cell: String },
    /// Planned move of every shard of `cell` to `to` (the executor drains first).
    Switchover { cell: String, to: String },
    /// Move every shard owned in region `from` to the healthy cells of `to` (or of every
    /// other region).
    DrCutover { from: String, to: Option<String> },
    /// Move shards back to named cells: the reverse of operation `op` (see [`reverse_of`]).
    Revert {
        op: String,
        back: BTreeMap<String, Vec<u32>>,
    },
}

impl std::fmt::Display for Command {
    /// The command as typed after `ldc cell` / `kubectl cell`: `failover r1-a`,
    /// `switchover r1-s --to r1-a`, `dr cutover --from r1`, `revert op-17`. What both
    /// platforms record and print for a move.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Failover { cell } => write!(f, "failover {cell}"),
            Command::Switchover { cell, to } => write!(f, "switchover {cell} --to {to}"),
            Command::DrCutover { from, to: None } => write!(f, "dr cutover --from {from}"),
            Command::DrCutover { from, to: Some(t) } => {
                write!(f, "dr cutover --from {from} --to {t}")
            }
            Command::Revert { op, .. } => write!(f, "revert {op}"),
        }
    }
}

/// The id of a move a controller starts on its own (`ldc up`'s or the operator's):
/// `auto-failover-r1-a-e3`, `auto-dr-cutover-r1-e5`, where the number is the highest epoch
/// of the shards the command would move, before it moves them. It is known before the
/// move is planned and changes with every move of those shards, so a controller that
/// restarts in the middle names the same move again (and finds it recorded) instead of
/// moving twice.
pub fn automatic_move_id(command: &Command, topo: &Topology, map: &ShardMap) -> String {
    let in_scope = |cell: &str| match command {
        Command::Failover { cell: c } | Command::Switchover { cell: c, .. } => c == cell,
        Command::DrCutover { from, .. } => topo.cell(cell).is_some_and(|c| &c.region == from),
        Command::Revert { back, .. } => back.contains_key(cell),
    };
    let epoch = map
        .owners
        .iter()
        .filter(|o| in_scope(&o.cell))
        .map(|o| o.epoch)
        .max()
        .unwrap_or(0);
    let (verb, subject) = match command {
        Command::Failover { cell } => ("failover", cell.as_str()),
        Command::Switchover { cell, .. } => ("switchover", cell.as_str()),
        Command::DrCutover { from, .. } => ("dr-cutover", from.as_str()),
        Command::Revert { op, .. } => ("revert", op.as_str()),
    };
    format!("auto-{verb}-{subject}-e{epoch}")
}

/// The epochs of a cell's shards for humans: `3`, or `2-5` when they differ, `-` for none.
pub fn epoch_span(epochs: &[u64]) -> String {
    match (epochs.iter().min(), epochs.iter().max()) {
        (Some(a), Some(b)) if a == b => a.to_string(),
        (Some(a), Some(b)) => format!("{a}-{b}"),
        _ => "-".into(),
    }
}

/// One shard changing owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub shard: u32,
    pub from: String,
    pub to: String,
    pub epoch_before: u64,
    pub epoch_after: u64,
}

/// The planner's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub command: Command,
    pub moves: Vec<Move>,
}

impl Plan {
    /// The map after the plan. `map` must be the map the plan was made from.
    pub fn apply(&self, map: &ShardMap) -> ShardMap {
        let mut next = map.clone();
        for m in &self.moves {
            let o = &mut next.owners[m.shard as usize];
            debug_assert_eq!(
                (o.cell.as_str(), o.epoch),
                (m.from.as_str(), m.epoch_before)
            );
            *o = Owner {
                cell: m.to.clone(),
                epoch: m.epoch_after,
            };
        }
        next
    }

    /// The moved shards by the cell they leave (sorted): what a revert sends back.
    pub fn moved_from(&self) -> BTreeMap<String, Vec<u32>> {
        let mut by: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for m in &self.moves {
            by.entry(m.from.clone()).or_default().push(m.shard);
        }
        for v in by.values_mut() {
            v.sort_unstable();
        }
        by
    }

    /// One line per (from, to) pair: `r1-a -> r1-s: 3 shards [0-2], each epoch +1`. How
    /// every driver prints a plan.
    pub fn describe(&self) -> Vec<String> {
        let mut by_pair: BTreeMap<(&str, &str), Vec<u32>> = BTreeMap::new();
        for m in &self.moves {
            by_pair
                .entry((m.from.as_str(), m.to.as_str()))
                .or_default()
                .push(m.shard);
        }
        by_pair
            .into_iter()
            .map(|((from, to), shards)| {
                format!(
                    "{from} -> {to}: {} shards [{}], each epoch +1",
                    shards.len(),
                    shard_ranges(&shards)
                )
            })
            .collect()
    }

    /// Cells that receive shards, with how many.
    pub fn targets(&self) -> BTreeMap<&str, u32> {
        let mut t = BTreeMap::new();
        for m in &self.moves {
            *t.entry(m.to.as_str()).or_insert(0) += 1;
        }
        t
    }
}

/// Why no plan could be made. Every message says what to do instead.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("unknown cell {0:?}; `ldc cell status` lists the cells")]
    UnknownCell(String),
    #[error("unknown region {0:?}; `ldc cell status` lists the regions")]
    UnknownRegion(String),
    #[error("cell {0} owns no shard, so there is nothing to move")]
    NothingToMove(String),
    #[error("cannot move cell {cell}'s shards to itself; name another cell")]
    SameCell { cell: String },
    #[error("target cell {0} is not healthy; pick a healthy cell or fix it first")]
    TargetUnhealthy(String),
    #[error(
        "no healthy cell in region {region} can take cell {cell}'s {shards} shards; \
         bring a standby up, or move the region with `dr cutover --from {region}`"
    )]
    NoTargetInRegion {
        cell: String,
        region: String,
        shards: u32,
    },
    #[error(
        "no healthy cell outside region {0} can take its shards; the platform lacks N+1 capacity"
    )]
    NoTargetOutsideRegion(String),
    #[error("moving {shards} shards would put cell {cell} over its capacity of {capacity}")]
    OverCapacity {
        cell: String,
        capacity: u32,
        shards: u32,
    },
    #[error("ownership map has {map} shards but the topology has {topology}; the state is corrupt")]
    ShardCountMismatch { map: usize, topology: u32 },
    #[error("shard {shard} is owned by {cell:?}, which is not in the topology")]
    OwnerNotInTopology { shard: u32, cell: String },
    #[error("every shard {0} moved is already back where it came from; nothing to revert")]
    AlreadyReverted(String),
    #[error("shard {shard} does not exist (the topology has {shard_count} shards)")]
    NoSuchShard { shard: u32, shard_count: u32 },
}

fn is_healthy(health: &BTreeMap<String, Health>, cell: &str) -> bool {
    health.get(cell) == Some(&Health::Healthy)
}

/// Makes a plan. `health` lists what the health checks say; a cell absent from it is
/// treated as unhealthy (never move shards to a cell nobody has seen).
pub fn plan(
    topo: &Topology,
    map: &ShardMap,
    health: &BTreeMap<String, Health>,
    command: &Command,
) -> Result<Plan, PlanError> {
    plan_inner(topo, map, health, command)
}

fn plan_inner(
    topo: &Topology,
    map: &ShardMap,
    health: &BTreeMap<String, Health>,
    command: &Command,
) -> Result<Plan, PlanError> {
    if map.owners.len() != topo.shard_count as usize {
        return Err(PlanError::ShardCountMismatch {
            map: map.owners.len(),
            topology: topo.shard_count,
        });
    }
    for (i, o) in map.owners.iter().enumerate() {
        if topo.cell(&o.cell).is_none() {
            return Err(PlanError::OwnerNotInTopology {
                shard: i as u32,
                cell: o.cell.clone(),
            });
        }
    }
    let mut load: BTreeMap<&str, u32> = topo.cells.iter().map(|c| (c.id.as_str(), 0)).collect();
    for o in &map.owners {
        *load.get_mut(o.cell.as_str()).expect("checked above") += 1;
    }

    let (shards, targets): (Vec<u32>, Vec<&CellInfo>) = match command {
        Command::Revert { op, back } => {
            return plan_revert(topo, map, health, command, op, back, load);
        }
        Command::Failover { cell } => {
            let info = topo
                .cell(cell)
                .ok_or_else(|| PlanError::UnknownCell(cell.clone()))?;
            let shards = map.owned_by(cell);
            if shards.is_empty() {
                return Err(PlanError::NothingToMove(cell.clone()));
            }
            let healthy_in_region: Vec<&CellInfo> = topo
                .cells
                .iter()
                .filter(|c| c.region == info.region && c.id != *cell && is_healthy(health, &c.id))
                .collect();
            // N+1: the standby is a healthy cell of the region that owns nothing and has
            // room for all the shards. Prefer it; otherwise spread over the region.
            let standby = healthy_in_region.iter().copied().find(|c| {
                load[c.id.as_str()] == 0 && c.capacity.is_none_or(|cap| cap >= shards.len() as u32)
            });
            let targets = match standby {
                Some(s) => vec![s],
                None if healthy_in_region.is_empty() => {
                    return Err(PlanError::NoTargetInRegion {
                        cell: cell.clone(),
                        region: info.region.clone(),
                        shards: shards.len() as u32,
                    });
                }
                None => healthy_in_region,
            };
            (shards, targets)
        }
        Command::Switchover { cell, to } => {
            topo.cell(cell)
                .ok_or_else(|| PlanError::UnknownCell(cell.clone()))?;
            let target = topo
                .cell(to)
                .ok_or_else(|| PlanError::UnknownCell(to.clone()))?;
            if cell == to {
                return Err(PlanError::SameCell { cell: cell.clone() });
            }
            if !is_healthy(health, to) {
                return Err(PlanError::TargetUnhealthy(to.clone()));
            }
            let shards = map.owned_by(cell);
            if shards.is_empty() {
                return Err(PlanError::NothingToMove(cell.clone()));
            }
            (shards, vec![target])
        }
        Command::DrCutover { from, to } => {
            if !topo.regions().contains(from.as_str()) {
                return Err(PlanError::UnknownRegion(from.clone()));
            }
            if let Some(t) = to {
                if !topo.regions().contains(t.as_str()) {
                    return Err(PlanError::UnknownRegion(t.clone()));
                }
                if t == from {
                    return Err(PlanError::SameCell {
                        cell: format!("region {from}"),
                    });
                }
            }
            let in_from: BTreeSet<&str> = topo
                .cells
                .iter()
                .filter(|c| c.region == *from)
                .map(|c| c.id.as_str())
                .collect();
            let shards: Vec<u32> = map
                .owners
                .iter()
                .enumerate()
                .filter(|(_, o)| in_from.contains(o.cell.as_str()))
                .map(|(i, _)| i as u32)
                .collect();
            if shards.is_empty() {
                return Err(PlanError::NothingToMove(format!("region {from}")));
            }
            let targets: Vec<&CellInfo> = topo
                .cells
                .iter()
                .filter(|c| {
                    c.region != *from
                        && to.as_ref().is_none_or(|t| c.region == *t)
                        && is_healthy(health, &c.id)
                })
                .collect();
            if targets.is_empty() {
                return Err(PlanError::NoTargetOutsideRegion(from.clone()));
            }
            (shards, targets)
        }
    };

    // Spread: each shard goes to the least-loaded target (ties by cell id), so a single
    // standby takes everything and several targets end up balanced.
    let mut moves = Vec::with_capacity(shards.len());
    for shard in shards {
        let target = targets
            .iter()
            .filter(|c| c.capacity.is_none_or(|cap| load[c.id.as_str()] < cap))
            .min_by_key(|c| (load[c.id.as_str()], c.id.as_str()))
            .ok_or_else(|| {
                let c = targets[0];
                PlanError::OverCapacity {
                    cell: c.id.clone(),
                    capacity: c.capacity.unwrap_or(0),
                    shards: load[c.id.as_str()] + 1,
                }
            })?;
        let owner = &map.owners[shard as usize];
        *load
            .get_mut(owner.cell.as_str())
            .expect("owner in topology") -= 1;
        *load
            .get_mut(target.id.as_str())
            .expect("target in topology") += 1;
        moves.push(Move {
            shard,
            from: owner.cell.clone(),
            to: target.id.clone(),
            epoch_before: owner.epoch,
            epoch_after: owner.epoch + 1,
        });
    }
    Ok(Plan {
        command: command.clone(),
        moves,
    })
}

/// Each named shard goes back to its named cell; shards already there stay put.
fn plan_revert(
    topo: &Topology,
    map: &ShardMap,
    health: &BTreeMap<String, Health>,
    command: &Command,
    op: &str,
    back: &BTreeMap<String, Vec<u32>>,
    mut load: BTreeMap<&str, u32>,
) -> Result<Plan, PlanError> {
    let mut moves = Vec::new();
    let mut seen = BTreeSet::new();
    for (cell, shards) in back {
        let info = topo
            .cell(cell)
            .ok_or_else(|| PlanError::UnknownCell(cell.clone()))?;
        if !is_healthy(health, cell) {
            return Err(PlanError::TargetUnhealthy(cell.clone()));
        }
        for &shard in shards {
            let owner = map
                .owners
                .get(shard as usize)
                .ok_or(PlanError::NoSuchShard {
                    shard,
                    shard_count: topo.shard_count,
                })?;
            if owner.cell == *cell || !seen.insert(shard) {
                continue;
            }
            let l = load.get_mut(cell.as_str()).expect("cell in topology");
            if info.capacity.is_some_and(|cap| *l >= cap) {
                return Err(PlanError::OverCapacity {
                    cell: cell.clone(),
                    capacity: info.capacity.unwrap_or(0),
                    shards: *l + 1,
                });
            }
            *l += 1;
            moves.push(Move {
                shard,
                from: owner.cell.clone(),
                to: cell.clone(),
                epoch_before: owner.epoch,
                epoch_after: owner.epoch + 1,
            });
        }
    }
    if moves.is_empty() {
        return Err(PlanError::AlreadyReverted(op.to_string()));
    }
    moves.sort_by_key(|m| m.shard);
    Ok(Plan {
        command: command.clone(),
        moves,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn topo() -> Topology {
        let cell = |id: &str, region: &str| CellInfo {
            id: id.into(),
            region: region.into(),
            capacity: None,
        };
        Topology {
            shard_count: 12,
            cells: vec![
                cell("r1-a", "r1"),
                cell("r1-b", "r1"),
                cell("r1-s", "r1"),
                cell("r2-a", "r2"),
                cell("r2-b", "r2"),
                cell("r2-s", "r2"),
            ],
        }
    }

    fn all_healthy(t: &Topology) -> BTreeMap<String, Health> {
        t.cells
            .iter()
            .map(|c| (c.id.clone(), Health::Healthy))
            .collect()
    }

    fn initial() -> ShardMap {
        ShardMap::initial(12, &["r1-a", "r1-b", "r2-a", "r2-b"])
    }

    #[test]
    fn initial_map_is_even() {
        let m = initial();
        assert_eq!(m.owned_by("r1-a"), vec![0, 1, 2]);
        assert_eq!(m.owned_by("r2-b"), vec![9, 10, 11]);
        assert!(m.owners.iter().all(|o| o.epoch == 1));
    }

    #[test]
    fn failover_goes_to_standby() {
        let t = topo();
        let mut h = all_healthy(&t);
        h.insert("r1-a".into(), Health::Unhealthy);
        let p = plan(
            &t,
            &initial(),
            &h,
            &Command::Failover {
                cell: "r1-a".into(),
            },
        )
        .unwrap();
        assert_eq!(p.moves.len(), 3);
        assert!(
            p.moves
                .iter()
                .all(|m| m.to == "r1-s" && m.epoch_after == 2 && m.from == "r1-a")
        );
        let next = p.apply(&initial());
        assert_eq!(next.owned_by("r1-s"), vec![0, 1, 2]);
        assert!(next.owned_by("r1-a").is_empty());
    }

    #[test]
    fn failover_spreads_without_standby() {
        let t = topo();
        let mut h = all_healthy(&t);
        h.insert("r1-s".into(), Health::Unhealthy);
        let p = plan(
            &t,
            &initial(),
            &h,
            &Command::Failover {
                cell: "r1-a".into(),
            },
        )
        .unwrap();
        assert_eq!(p.targets(), BTreeMap::from([("r1-b", 3)]));
        // Both r1 cells gone: refuse and point at dr cutover.
        h.insert("r1-b".into(), Health::Unhealthy);
        let e = plan(
            &t,
            &initial(),
            &h,
            &Command::Failover {
                cell: "r1-a".into(),
            },
        )
        .unwrap_err();
        assert!(matches!(e, PlanError::NoTargetInRegion { .. }));
        assert!(e.to_string().contains("dr cutover --from r1"));
    }

    #[test]
    fn second_failover_after_standby_used_spreads() {
        let t = topo();
        let mut h = all_healthy(&t);
        h.insert("r1-a".into(), Health::Unhealthy);
        let m1 = plan(
            &t,
            &initial(),
            &h,
            &Command::Failover {
                cell: "r1-a".into(),
            },
        )
        .unwrap()
        .apply(&initial());
        h.insert("r1-b".into(), Health::Unhealthy);
        let p = plan(
            &t,
            &m1,
            &h,
            &Command::Failover {
                cell: "r1-b".into(),
            },
        )
        .unwrap();
        assert_eq!(p.targets(), BTreeMap::from([("r1-s", 3)]));
    }

    #[test]
    fn refusals() {
        let t = topo();
        let h = all_healthy(&t);
        let m = initial();
        let f = |c: Command| plan(&t, &m, &h, &c).unwrap_err();
        assert_eq!(
            f(Command::Failover { cell: "zz".into() }),
            PlanError::UnknownCell("zz".into())
        );
        assert_eq!(
            f(Command::Failover {
                cell: "r1-s".into()
            }),
            PlanError::NothingToMove("r1-s".into())
        );
        assert_eq!(
            f(Command::Switchover {
                cell: "r1-a".into(),
                to: "r1-a".into()
            }),
            PlanError::SameCell {
                cell: "r1-a".into()
            }
        );
        assert_eq!(
            f(Command::DrCutover {
                from: "r9".into(),
                to: None
            }),
            PlanError::UnknownRegion("r9".into())
        );
        let mut h2 = h.clone();
        h2.remove("r1-s");
        assert_eq!(
            plan(
                &t,
                &m,
                &h2,
                &Command::Switchover {
                    cell: "r1-a".into(),
                    to: "r1-s".into()
                }
            )
            .unwrap_err(),
            PlanError::TargetUnhealthy("r1-s".into())
        );
        let mut bad = m.clone();
        bad.owners.pop();
        assert!(matches!(
            plan(
                &t,
                &bad,
                &h,
                &Command::Failover {
                    cell: "r1-a".into()
                }
            ),
            Err(PlanError::ShardCountMismatch { .. })
        ));
    }

    #[test]
    fn capacity_is_respected() {
        let mut t = topo();
        for c in &mut t.cells {
            c.capacity = Some(4);
        }
        let h = all_healthy(&t);
        // r1-s has room for 3; fine.
        plan(
            &t,
            &initial(),
            &h,
            &Command::Failover {
                cell: "r1-a".into(),
            },
        )
        .unwrap();
        // Whole region r1 (6 shards) into r2 (cells with 3,3,0 shards, cap 4): 1+1+4 = 6 fits.
        let p = plan(
            &t,
            &initial(),
            &h,
            &Command::DrCutover {
                from: "r1".into(),
                to: None,
            },
        )
        .unwrap();
        assert_eq!(
            p.targets(),
            BTreeMap::from([("r2-a", 1), ("r2-b", 1), ("r2-s", 4)])
        );
        for c in &mut t.cells {
            c.capacity = Some(3);
        }
        let e = plan(
            &t,
            &initial(),
            &h,
            &Command::DrCutover {
                from: "r1".into(),
                to: None,
            },
        )
        .unwrap_err();
        assert!(matches!(e, PlanError::OverCapacity { .. }));
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        let cells =
            prop::sample::select(vec!["r1-a", "r1-b", "r1-s", "r2-a", "r2-b", "r2-s", "zz"]);
        let regions = prop::sample::select(vec!["r1", "r2", "r3"]);
        prop_oneof![
            cells
                .clone()
                .prop_map(|c| Command::Failover { cell: c.into() }),
            (cells.clone(), cells).prop_map(|(c, t)| Command::Switchover {
                cell: c.into(),
                to: t.into()
            }),
            (regions.clone(), prop::option::of(regions)).prop_map(|(f, t)| Command::DrCutover {
                from: f.into(),
                to: t.map(Into::into)
            }),
        ]
    }

    #[test]
    fn revert_moves_each_shard_back_and_checks_before() {
        let t = topo();
        let h = all_healthy(&t);
        let map = initial();
        let p = plan(
            &t,
            &map,
            &h,
            &Command::DrCutover {
                from: "r1".into(),
                to: None,
            },
        )
        .unwrap();
        let none = BTreeSet::new();
        let rc = check_reverse(&t, &map, &h, &p, "op-1", &none).unwrap();
        assert!(rc.waits_for.is_empty());
        let after = p.apply(&map);
        let back = plan(&t, &after, &h, &rc.command).unwrap();
        let restored = back.apply(&after);
        for (a, b) in map.owners.iter().zip(&restored.owners) {
            assert_eq!(a.cell, b.cell);
        }
        // Every shard that moved twice is two epochs on; the others never moved.
        assert!(back.moves.iter().all(|m| m.epoch_after == 3));
        // A revert of what is already back has nothing to do.
        assert_eq!(
            plan(&t, &restored, &h, &rc.command),
            Err(PlanError::AlreadyReverted("op-1".into()))
        );
        // A failed cell: the reverse waits for it; a cell being deleted: no reverse.
        let mut h2 = h.clone();
        h2.insert("r1-a".into(), Health::Unhealthy);
        let f = plan(
            &t,
            &map,
            &h2,
            &Command::Failover {
                cell: "r1-a".into(),
            },
        )
        .unwrap();
        let rc = check_reverse(&t, &map, &h2, &f, "op-2", &none).unwrap();
        assert_eq!(rc.waits_for, vec!["r1-a".to_string()]);
        assert!(matches!(
            plan(&t, &f.apply(&map), &h2, &rc.command),
            Err(PlanError::TargetUnhealthy(_))
        ));
        let gone = BTreeSet::from(["r1-a".to_string()]);
        let rc = check_reverse(&t, &map, &h2, &f, "op-2", &gone).unwrap();
        assert_eq!(rc.final_for, vec!["r1-a".to_string()]);
        assert!(matches!(rc.command, Command::Revert { back, .. } if back.is_empty()));
        // A lowered capacity makes the reverse impossible, and the check says so first.
        let mut small = t.clone();
        small.cells[0].capacity = Some(2);
        assert!(matches!(
            check_reverse(&small, &map, &h2, &f, "op-2", &none),
            Err(PlanError::OverCapacity { .. })
        ));
        // Ranges round-trip.
        for v in [vec![], vec![3], vec![0, 1, 2, 7, 9, 10]] {
            assert_eq!(parse_shard_ranges(&shard_ranges(&v)).unwrap(), v);
        }
        assert!(parse_shard_ranges("3-1").is_err());
        assert!(parse_shard_ranges("a").is_err());
    }

    #[test]
    fn shard_ranges_are_bounded_before_they_allocate() {
        // A hostile custom resource once made this allocate 16 GiB.
        let e = parse_shard_ranges("0-4294967295").unwrap_err();
        assert!(e.contains("below 10000"), "{e}");
        assert!(parse_shard_ranges("10000").is_err());
        assert_eq!(parse_shard_ranges("9999").unwrap(), vec![9999]);
        // Overlapping ranges cannot add up past the limit either.
        let many = ["0-9999"; 3].join(",");
        assert!(parse_shard_ranges(&many).unwrap_err().contains("more than"));
        // The error quotes a short prefix of the input, never all of it.
        let huge = "x".repeat(200_000);
        let e = parse_shard_ranges(&huge).unwrap_err();
        assert!(e.len() < 200, "{} bytes", e.len());
    }

    fn arb_capacities() -> impl Strategy<Value = Vec<Option<u32>>> {
        prop::collection::vec(prop::option::of(2u32..8), 6)
    }

    proptest! {
        /// With capacities, N+1 and reverses: capacity is never exceeded, a failover goes
        /// to the region's standby when one can take everything, a shard never has two
        /// owners at one epoch over the whole run, and every plan's reverse (checked
        /// before) brings each moved shard back.
        #[test]
        fn capacity_standby_epochs_and_reverse(
            caps in arb_capacities(),
            steps in prop::collection::vec((arb_command(), prop::collection::vec(any::<bool>(), 6), any::<bool>()), 1..25),
        ) {
            let mut t = topo();
            for (c, cap) in t.cells.iter_mut().zip(caps) {
                // Never below what the initial map gives a cell (3 shards).
                c.capacity = cap.map(|k| k.max(3));
            }
            let mut map = initial();
            let mut seen: BTreeMap<(usize, u64), String> = BTreeMap::new();
            let mut record = |m: &ShardMap| -> Result<(), TestCaseError> {
                for (i, o) in m.owners.iter().enumerate() {
                    let prev = seen.entry((i, o.epoch)).or_insert_with(|| o.cell.clone());
                    prop_assert_eq!(&*prev, &o.cell, "shard {} has two owners at epoch {}", i, o.epoch);
                }
                Ok(())
            };
            record(&map)?;
            for (n, (cmd, healthy, revert)) in steps.into_iter().enumerate() {
                let h: BTreeMap<String, Health> = t.cells.iter().zip(healthy)
                    .map(|(c, ok)| (c.id.clone(), if ok { Health::Healthy } else { Health::Unhealthy }))
                    .collect();
                let Ok(p) = plan(&t, &map, &h, &cmd) else { continue };
                let next = p.apply(&map);
                for c in &t.cells {
                    if let Some(cap) = c.capacity {
                        let before = map.count_owned(&c.id);
                        let after = next.count_owned(&c.id);
                        prop_assert!(after <= cap.max(before), "{} over capacity {}: {}", c.id, cap, after);
                    }
                }
                if let Command::Failover { cell } = &cmd {
                    let region = &t.cell(cell).unwrap().region;
                    let k = map.count_owned(cell);
                    let standby_exists = t.cells.iter().any(|c| &c.region == region && c.id != *cell
                        && h.get(&c.id) == Some(&Health::Healthy) && map.count_owned(&c.id) == 0
                        && c.capacity.is_none_or(|cap| cap >= k));
                    if standby_exists {
                        prop_assert_eq!(p.targets().len(), 1, "N+1: one standby takes a failed cell");
                        let to = *p.targets().keys().next().unwrap();
                        prop_assert_eq!(map.count_owned(to), 0);
                    }
                }
                let id = format!("op-{n}");
                let rc = check_reverse(&t, &map, &h, &p, &id, &BTreeSet::new());
                prop_assert!(rc.is_ok(), "reverse impossible: {:?}", rc);
                map = next;
                record(&map)?;
                if revert {
                    let mut all = h.clone();
                    for c in &t.cells {
                        all.insert(c.id.clone(), Health::Healthy);
                    }
                    let back = plan(&t, &map, &all, &rc.unwrap().command).unwrap();
                    let restored = back.apply(&map);
                    for m in &p.moves {
                        prop_assert_eq!(&restored.owners[m.shard as usize].cell, &m.from);
                        prop_assert_eq!(restored.owners[m.shard as usize].epoch, m.epoch_after + 1);
                    }
                    map = restored;
                    record(&map)?;
                }
            }
        }
    }

    proptest! {
        /// Any sequence of commands under any health keeps the ownership invariants.
        #[test]
        fn invariants_hold(steps in prop::collection::vec((arb_command(), prop::collection::vec(any::<bool>(), 6)), 1..30)) {
            let t = topo();
            let mut map = initial();
            for (cmd, healthy) in steps {
                let h: BTreeMap<String, Health> = t.cells.iter().zip(healthy)
                    .map(|(c, ok)| (c.id.clone(), if ok { Health::Healthy } else { Health::Unhealthy }))
                    .collect();
                if let Ok(p) = plan(&t, &map, &h, &cmd) {
                        prop_assert!(!p.moves.is_empty());
                        // Dry run equals execution: planning twice gives the same plan.
                        prop_assert_eq!(&plan(&t, &map, &h, &cmd).unwrap(), &p);
                        let next = p.apply(&map);
                        prop_assert_eq!(next.owners.len(), map.owners.len());
                        let moved: BTreeSet<u32> = p.moves.iter().map(|m| m.shard).collect();
                        prop_assert_eq!(moved.len(), p.moves.len(), "a shard moved twice in one plan");
                        for (i, (a, b)) in map.owners.iter().zip(&next.owners).enumerate() {
                            if moved.contains(&(i as u32)) {
                                prop_assert_eq!(b.epoch, a.epoch + 1);
                                prop_assert_ne!(&a.cell, &b.cell);
                                prop_assert_eq!(h.get(&b.cell), Some(&Health::Healthy));
                            } else {
                                prop_assert_eq!(a, b);
                            }
                            prop_assert!(t.cell(&b.cell).is_some());
                        }
                        map = next;
                }
            }
        }
    }
}
