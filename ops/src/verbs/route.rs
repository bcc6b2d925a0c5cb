//! `route`: where the routing table in force sends users, as a router routes them (shard,
//! its epoch, cell, colour by the sticky blue/green split, endpoints). Reads only.

use ldc_core::routing::{CellRoute, RoutingTable};
use serde::Serialize;

use crate::{OpsError, Snapshot};

/// Most users one `route` answers for.
pub const ROUTE_USERS_MAX: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteReport {
    pub routing_epoch: u64,
    pub routes: Vec<UserRoute>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UserRoute {
    pub user: String,
    pub shard: u32,
    pub shard_epoch: u64,
    pub cell: String,
    pub colour: String,
    pub green_weight_bp: u16,
    pub endpoints: Vec<String>,
}

/// The table routers route by, as the snapshot describes it.
fn table(s: &Snapshot) -> RoutingTable {
    let cells = s
        .cells
        .iter()
        .map(|(name, c)| {
            let route = CellRoute {
                region: c.region.clone(),
                blue: c.blue.endpoints.clone(),
                green: c.green.endpoints.clone(),
                green_weight_bp: c.green_weight_bp,
                allow_forced_colour: false,
            };
            (name.clone(), route)
        })
        .collect();
    RoutingTable {
        epoch: s.routing_epoch,
        ..RoutingTable::of(&s.map, cells)
    }
}

/// Routes `users` on `s`. Refuses an empty list, more than [`ROUTE_USERS_MAX`] users, and
/// a user id that is not one.
pub fn route(s: &Snapshot, users: &[String]) -> Result<RouteReport, OpsError> {
    if users.is_empty() {
        return Err(OpsError::Refused(
            "name at least one user (or pass --stdin)".into(),
        ));
    }
    if users.len() > ROUTE_USERS_MAX {
        return Err(OpsError::Refused(format!(
            "{} users asked for; route at most {ROUTE_USERS_MAX} at a time",
            users.len()
        )));
    }
    let t = table(s);
    let mut routes = Vec::with_capacity(users.len());
    for u in users {
        let bad = |e: &dyn std::fmt::Display| {
            OpsError::Refused(format!("user {}: {e}", ldc_core::quote_prefix(u, 64)))
        };
        ldc_core::shard::validate_user_id(u).map_err(|e| bad(&e))?;
        let r = t.route_user(u, None).map_err(|e| bad(&e))?;
        routes.push(UserRoute {
            user: u.clone(),
            shard: r.shard,
            shard_epoch: r.shard_epoch,
            cell: r.cell.to_string(),
            colour: r.colour.to_string(),
            green_weight_bp: t.cells.get(r.cell).map_or(0, |c| c.green_weight_bp),
            endpoints: r.endpoints.to_vec(),
        });
    }
    Ok(RouteReport {
        routing_epoch: s.routing_epoch,
        routes,
    })
}
