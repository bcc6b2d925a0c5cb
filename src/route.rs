//! `ldc route`: where the published routing table sends users, as a router would route
//! them (the router benchmark configures its peer with it).

use std::io::BufRead;
use std::process::ExitCode;

use anyhow::{Result, bail};
use ldc_control as control;
use ldc_core::routing::RoutingTable;
use ldc_core::traffic::fmt_pct;
use serde_json::json;

use crate::cli::{Global, Output};
use crate::up::blocking;

/// `ldc route USER...`: routes users with the published table, as a router would.
pub async fn route(g: &Global, mut users: Vec<String>, stdin: bool) -> Result<ExitCode> {
    if stdin {
        for line in std::io::stdin().lock().lines() {
            let line = line?;
            let u = line.trim();
            if !u.is_empty() {
                users.push(u.to_string());
            }
        }
    }
    if users.is_empty() {
        bail!("name at least one user (or pass --stdin)");
    }
    let spec = g.store_spec();
    let table: RoutingTable = blocking(move || {
        let store = ldc_store::open(&spec)?;
        let mut t = store.begin_read()?;
        let r = control::load_routing(&mut *t)?;
        t.rollback()?;
        r.ok_or_else(|| anyhow::anyhow!("no routing table published yet; run `ldc up` first"))
    })
    .await?;
    let mut out = String::new();
    for u in &users {
        ldc_core::shard::validate_user_id(u).map_err(|e| anyhow::anyhow!("user {u:?}: {e}"))?;
        let r = table
            .route_user(u, None)
            .map_err(|e| anyhow::anyhow!("user {u:?}: {e}"))?;
        let weight = table.cells.get(r.cell).map_or(0, |c| c.green_weight_bp);
        match g.output {
            Output::Json | Output::Yaml => {
                let v = json!({
                    "user": u, "shard": r.shard, "shardEpoch": r.shard_epoch, "cell": r.cell,
                    "colour": r.colour, "greenWeightBp": weight, "endpoints": r.endpoints,
                    "tableEpoch": table.epoch,
                });
                if g.output == Output::Yaml {
                    out.push_str("---\n");
                    out.push_str(&serde_yaml::to_string(&v).expect("documents encode"));
                } else {
                    out.push_str(&v.to_string());
                    out.push('\n');
                }
            }
            Output::Text => out.push_str(&format!(
                "{u} shard {} cell {} colour {} (green {}) endpoints {}\n",
                r.shard,
                r.cell,
                r.colour,
                fmt_pct(weight),
                r.endpoints.join(",")
            )),
        }
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}
