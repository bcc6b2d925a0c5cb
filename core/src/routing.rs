//! The routing table every router holds, and the blue/green split.
//!
//! The table is a value with a monotonic `epoch`: a router swaps in a new table only if
//! its epoch is higher, so routing never goes backwards. It maps each shard to its owning
//! cell (with the shard's ownership epoch, which cells use for fencing) and each cell to
//! its endpoints per colour and its green weight.
//!
//! The split is a pure function of (user, weight): a user's *position* is a seeded hash in
//! `0..10_000`, and the user goes green iff `position < green_weight_bp`. So it is sticky
//! (same user, same weight, same colour), monotone (raising the weight only moves users
//! from blue to green), exact at 0 and 10 000, and proportional in between.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use thiserror::Error;

use crate::shard::{fnv1a64, shard_of};

/// Store key under which the local platform publishes the current routing table (JSON).
/// Routers of `ldc up` poll it; on Kubernetes the operator publishes the same value to a
/// resource the routers watch.
pub const STORE_KEY: &[u8] = b"sys/routing";
/// Store key of the publisher's signature of the bytes under [`STORE_KEY`].
pub const SIGNATURE_KEY: &[u8] = b"sys/routing.sig";

/// Basis points in 100%.
pub const BP_MAX: u16 = 10_000;

/// Seed mixed into the colour hash so the split is independent of the shard function
/// (otherwise a shard's users would all flip together).
pub const SPLIT_SEED: u64 = 0x1dc0_b1e5_9a3e_e7f1;

/// One of a cell's two deployments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    Blue,
    Green,
}

impl Colour {
    pub fn as_str(self) -> &'static str {
        match self {
            Colour::Blue => "blue",
            Colour::Green => "green",
        }
    }
}

impl std::fmt::Display for Colour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Colour {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "blue" => Ok(Colour::Blue),
            "green" => Ok(Colour::Green),
            other => Err(format!("unknown colour {other:?}; use blue or green")),
        }
    }
}

/// The user's position in `0..BP_MAX` for the colour split.
pub fn split_position(user: &str) -> u16 {
    let h = fnv1a64(user.as_bytes()) ^ SPLIT_SEED;
    // Mix once more (splitmix64 finaliser) so nearby ids spread evenly.
    let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z % u64::from(BP_MAX)) as u16
}

/// The colour `user` is served by when the cell's green weight is `green_bp`.
pub fn colour_for(user: &str, green_bp: u16) -> Colour {
    if split_position(user) < green_bp.min(BP_MAX) {
        Colour::Green
    } else {
        Colour::Blue
    }
}

/// Where one shard is served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRoute {
    pub cell: String,
    /// The shard's ownership epoch (fencing token) when this table was published.
    pub epoch: u64,
}

/// How one cell is reached.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CellRoute {
    pub region: String,
    /// Endpoints (`host:port`) of the blue deployment.
    pub blue: Vec<String>,
    /// Endpoints of the green deployment.
    pub green: Vec<String>,
    /// Share of the cell's users sent to green, in basis points (0..=10000).
    pub green_weight_bp: u16,
    /// Whether the `x-ldc-colour` header may force a colour (testing a release).
    pub allow_forced_colour: bool,
}

impl CellRoute {
    pub fn endpoints(&self, colour: Colour) -> &[String] {
        match colour {
            Colour::Blue => &self.blue,
            Colour::Green => &self.green,
        }
    }
}

/// The versioned routing table.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RoutingTable {
    /// Monotonic version; a router never replaces a table with one of lower or equal epoch.
    pub epoch: u64,
    /// Index = shard number.
    pub shards: Vec<ShardRoute>,
    pub cells: BTreeMap<String, CellRoute>,
}

/// Why a request cannot be routed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("shard {0} is not in the routing table (it has {1} shards)")]
    UnknownShard(u32, usize),
    #[error("shard {shard} is owned by cell {cell:?}, which the routing table does not describe")]
    UnknownCell { shard: u32, cell: String },
    #[error("colour {colour} was forced but cell {cell} does not allow forced colours")]
    ForcedColourRefused { cell: String, colour: Colour },
}

/// A routing decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route<'a> {
    pub shard: u32,
    pub shard_epoch: u64,
    pub cell: &'a str,
    pub colour: Colour,
    pub endpoints: &'a [String],
}

/// A table that is not internally consistent.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TableError {
    #[error("routing table has no shards")]
    NoShards,
    #[error("shard {shard} is owned by unknown cell {cell:?}")]
    UnknownCell { shard: u32, cell: String },
    #[error("cell {cell} has green weight {weight} bp; the maximum is {BP_MAX}")]
    WeightTooHigh { cell: String, weight: u16 },
}

impl RoutingTable {
    /// The table to publish after `prev`: this one with the next epoch if it differs
    /// from `prev` in anything but the epoch; `None` when nothing changed (a re-run
    /// publishes nothing). The one epoch rule of every publisher (`ldc up`, the operator).
    pub fn succeeding(mut self, prev: Option<&RoutingTable>) -> Option<RoutingTable> {
        let prev_epoch = prev.map_or(0, |p| p.epoch);
        self.epoch = prev_epoch;
        if prev == Some(&self) {
            return None;
        }
        self.epoch = prev_epoch + 1;
        Some(self)
    }

    /// A table (epoch 0: see [`RoutingTable::succeeding`]) routing by `map` to `cells`.
    pub fn of(map: &crate::planner::ShardMap, cells: BTreeMap<String, CellRoute>) -> Self {
        let shards = map
            .owners
            .iter()
            .map(|o| ShardRoute {
                cell: o.cell.clone(),
                epoch: o.epoch,
            })
            .collect();
        RoutingTable {
            epoch: 0,
            shards,
            cells,
        }
    }

    /// The ownership the table states (what a reader of a published table plans on).
    pub fn ownership(&self) -> crate::planner::ShardMap {
        crate::planner::ShardMap {
            owners: self
                .shards
                .iter()
                .map(|s| crate::planner::Owner {
                    cell: s.cell.clone(),
                    epoch: s.epoch,
                })
                .collect(),
        }
    }

    pub fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    /// Checks internal consistency: every shard names a described cell, weights in range.
    pub fn validate(&self) -> Result<(), TableError> {
        if self.shards.is_empty() {
            return Err(TableError::NoShards);
        }
        for (i, s) in self.shards.iter().enumerate() {
            if !self.cells.contains_key(&s.cell) {
                return Err(TableError::UnknownCell {
                    shard: i as u32,
                    cell: s.cell.clone(),
                });
            }
        }
        for (name, c) in &self.cells {
            if c.green_weight_bp > BP_MAX {
                return Err(TableError::WeightTooHigh {
                    cell: name.clone(),
                    weight: c.green_weight_bp,
                });
            }
        }
        Ok(())
    }

    /// Routes a shard; `user` (when known) picks the colour, otherwise blue is used unless
    /// the cell is fully green.
    pub fn route_shard(
        &self,
        shard: u32,
        user: Option<&str>,
        forced: Option<Colour>,
    ) -> Result<Route<'_>, RouteError> {
        let s = self
            .shards
            .get(shard as usize)
            .ok_or(RouteError::UnknownShard(shard, self.shards.len()))?;
        let cell = self
            .cells
            .get(&s.cell)
            .ok_or_else(|| RouteError::UnknownCell {
                shard,
                cell: s.cell.clone(),
            })?;
        let colour = match (forced, user) {
            (Some(c), _) if cell.allow_forced_colour => c,
            (Some(c), _) => {
                return Err(RouteError::ForcedColourRefused {
                    cell: s.cell.clone(),
                    colour: c,
                });
            }
            (None, Some(u)) => colour_for(u, cell.green_weight_bp),
            (None, None) if cell.green_weight_bp >= BP_MAX => Colour::Green,
            (None, None) => Colour::Blue,
        };
        Ok(Route {
            shard,
            shard_epoch: s.epoch,
            cell: &s.cell,
            colour,
            endpoints: cell.endpoints(colour),
        })
    }

    /// Routes a user: user → shard → cell → colour → endpoints.
    pub fn route_user(&self, user: &str, forced: Option<Colour>) -> Result<Route<'_>, RouteError> {
        self.route_shard(shard_of(user, self.shard_count()), Some(user), forced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn table(weight: u16) -> RoutingTable {
        let mut cells = BTreeMap::new();
        cells.insert(
            "c1".to_string(),
            CellRoute {
                region: "r1".into(),
                blue: vec!["127.0.0.1:1".into()],
                green: vec!["127.0.0.1:2".into()],
                green_weight_bp: weight,
                allow_forced_colour: false,
            },
        );
        RoutingTable {
            epoch: 1,
            shards: vec![
                ShardRoute {
                    cell: "c1".into(),
                    epoch: 3
                };
                10
            ],
            cells,
        }
    }

    #[test]
    fn routes_and_refuses() {
        let t = table(0);
        t.validate().unwrap();
        let r = t.route_user("alice", None).unwrap();
        assert_eq!((r.cell, r.colour, r.shard_epoch), ("c1", Colour::Blue, 3));
        assert_eq!(
            t.route_shard(10, None, None),
            Err(RouteError::UnknownShard(10, 10))
        );
        assert!(matches!(
            t.route_user("alice", Some(Colour::Green)),
            Err(RouteError::ForcedColourRefused { .. })
        ));
        let mut t2 = t.clone();
        t2.shards[0].cell = "ghost".into();
        assert!(matches!(t2.validate(), Err(TableError::UnknownCell { .. })));
        assert_eq!(
            table(10_000).route_shard(0, None, None).unwrap().colour,
            Colour::Green
        );
    }

    #[test]
    fn forced_colour_when_allowed() {
        let mut t = table(0);
        t.cells.get_mut("c1").unwrap().allow_forced_colour = true;
        let r = t.route_user("alice", Some(Colour::Green)).unwrap();
        assert_eq!(r.colour, Colour::Green);
        assert_eq!(r.endpoints, ["127.0.0.1:2".to_string()]);
    }

    proptest! {
        #[test]
        fn split_is_sticky_and_monotone(user in "[a-z0-9_]{1,24}", a in 0u16..=10_000, b in 0u16..=10_000) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert_eq!(colour_for(&user, lo), colour_for(&user, lo));
            if colour_for(&user, lo) == Colour::Green {
                prop_assert_eq!(colour_for(&user, hi), Colour::Green);
            }
            if colour_for(&user, hi) == Colour::Blue {
                prop_assert_eq!(colour_for(&user, lo), Colour::Blue);
            }
            prop_assert_eq!(colour_for(&user, 0), Colour::Blue);
            prop_assert_eq!(colour_for(&user, BP_MAX), Colour::Green);
        }

        #[test]
        fn split_distribution_within_tolerance(weight in 0u16..=10_000, salt in 0u32..1000) {
            let n = 20_000u32;
            let green = (0..n).filter(|i| colour_for(&format!("u{salt}-{i}"), weight) == Colour::Green).count();
            let expected = f64::from(n) * f64::from(weight) / 10_000.0;
            // 5 standard deviations of a binomial plus a small floor.
            let p = f64::from(weight) / 10_000.0;
            let tol = 5.0 * (f64::from(n) * p * (1.0 - p)).sqrt() + 2.0;
            prop_assert!((green as f64 - expected).abs() <= tol, "weight {} green {} expected {}", weight, green, expected);
        }
    }
}
