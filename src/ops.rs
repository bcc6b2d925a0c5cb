//! `ldc cell status|failover|switchover|dr cutover` and `ldc reconcile` on the local store
//! (`traffic-shift` and `history` live in [`crate::traffic`]).
//!
//! Moves use the same planner as the controller and the operator: print the plan, then
//! (unless `--dry-run`) apply it in one transaction that re-checks every moved shard is still
//! where the plan saw it, bumps epochs, and republishes the routing table.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::Result;
use ldc_cell::control::{self, CellRuntime};
use ldc_core::planner::shard_ranges as ranges;
use ldc_core::planner::{self, Health, Plan, ReverseCheck, ShardMap, Topology};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::cli::{CellCmd, DrCmd, Global, Output};
use crate::up::blocking;

struct State {
    topo: Topology,
    map: ShardMap,
    runtimes: BTreeMap<String, CellRuntime>,
    routing_epoch: u64,
    /// Green weight per cell, from the routing table (what routers use).
    weights: BTreeMap<String, u16>,
    traffic: BTreeMap<String, crate::traffic::TrafficState>,
}

async fn load(g: &Global) -> Result<State> {
    let spec = g.store_spec();
    blocking(move || {
        let store = ldc_store::open(&spec)?;
        let mut t = store.begin_read()?;
        let cfg = control::load_config(&mut *t)?;
        let routing = control::load_routing(&mut *t)?.unwrap_or_default();
        let s = State {
            topo: control::load_topology(&mut *t)?,
            map: control::load_map(&mut *t, cfg.shard_count)?,
            runtimes: control::load_cell_runtimes(&mut *t)?,
            routing_epoch: routing.epoch,
            weights: routing
                .cells
                .iter()
                .map(|(c, r)| (c.clone(), r.green_weight_bp))
                .collect(),
            traffic: crate::traffic::load_states(&mut *t)?,
        };
        t.rollback()?;
        Ok(s)
    })
    .await
}

/// Key prefix of the records of applied moves (`sys/ops/{id}`), what `revert` reads.
pub const OPS_PREFIX: &str = "sys/ops/";

/// What an applied move did, kept so it can be reverted and audited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpRecord {
    pub id: String,
    pub command: String,
    /// The moved shards by the cell they left.
    pub moved_from: BTreeMap<String, Vec<u32>>,
    pub shards_moved: u32,
    pub routing_epoch: u64,
    pub by: String,
    pub at_unix_ms: u64,
}

fn describe(c: &planner::Command) -> String {
    match c {
        planner::Command::Failover { cell } => format!("failover {cell}"),
        planner::Command::Switchover { cell, to } => format!("switchover {cell} --to {to}"),
        planner::Command::DrCutover { from, to: None } => format!("dr cutover --from {from}"),
        planner::Command::DrCutover { from, to: Some(t) } => {
            format!("dr cutover --from {from} --to {t}")
        }
        planner::Command::Revert { op, .. } => format!("revert {op}"),
    }
}

fn print_plan(
    out: Output,
    plan: &Plan,
    dry_run: bool,
    id: &str,
    reverse: &Result<ReverseCheck, planner::PlanError>,
) {
    match out {
        Output::Json => {
            let rev = match reverse {
                Ok(r) => {
                    json!({"possible": true, "command": format!("ldc cell revert {id}"), "waits_for": r.waits_for})
                }
                Err(e) => json!({"possible": false, "why": e.to_string()}),
            };
            println!(
                "{}",
                json!({"dry_run": dry_run, "id": id, "plan": plan, "reverse": rev})
            )
        }
        Output::Text => {
            println!(
                "{}plan for {} (operation {id}):",
                if dry_run { "dry run: " } else { "" },
                describe(&plan.command)
            );
            for line in plan.describe() {
                println!("  {line}");
            }
            match reverse {
                Ok(r) if r.waits_for.is_empty() => {
                    println!("  reverse: `ldc cell revert {id}` (possible now)")
                }
                Ok(r) => println!(
                    "  reverse: `ldc cell revert {id}` (possible once {} is healthy again)",
                    r.waits_for.join(", ")
                ),
                Err(e) => println!("  reverse: NOT possible: {e}"),
            }
        }
    }
}

/// Records an applied move (in the transaction that applies it), so it can be reverted.
pub fn record_op(
    kv: &mut dyn ldc_store::Kv,
    id: &str,
    plan: &Plan,
    routing_epoch: u64,
    by: &str,
) -> Result<()> {
    let rec = OpRecord {
        id: id.to_string(),
        command: describe(&plan.command),
        moved_from: plan.moved_from(),
        shards_moved: plan.moves.len() as u32,
        routing_epoch,
        by: by.to_string(),
        at_unix_ms: crate::traffic::now_ms(),
    };
    kv.put(
        format!("{OPS_PREFIX}{id}").as_bytes(),
        &serde_json::to_vec(&rec)?,
    )?;
    Ok(())
}

fn load_op(kv: &mut dyn ldc_store::Kv, id: &str) -> Result<Option<OpRecord>> {
    Ok(match kv.get(format!("{OPS_PREFIX}{id}").as_bytes())? {
        Some(b) => {
            Some(serde_json::from_slice(&b).map_err(|e| {
                anyhow::anyhow!("operation record {OPS_PREFIX}{id} is corrupt: {e}")
            })?)
        }
        None => None,
    })
}

/// Every recorded move, oldest first.
pub fn load_ops(kv: &mut dyn ldc_store::Kv) -> Result<Vec<OpRecord>> {
    let p = OPS_PREFIX.as_bytes();
    let mut v: Vec<OpRecord> = kv
        .scan(p, &ldc_store::prefix_end(p), 100_000)?
        .into_iter()
        .map(|(k, b)| {
            serde_json::from_slice(&b).map_err(|e| {
                anyhow::anyhow!(
                    "operation record {} is corrupt: {e}",
                    String::from_utf8_lossy(&k)
                )
            })
        })
        .collect::<Result<_>>()?;
    v.sort_by_key(|r| (r.at_unix_ms, r.id.clone()));
    Ok(v)
}

pub async fn run(g: &Global, cmd: CellCmd) -> Result<ExitCode> {
    let (command, m) = match cmd {
        CellCmd::Status => return status(g).await,
        CellCmd::TrafficShift(a) => return crate::traffic::shift(g, a).await,
        CellCmd::History { cell } => return crate::traffic::history(g, cell).await,
        CellCmd::Failover { cell, m } => (planner::Command::Failover { cell }, m),
        CellCmd::Switchover { cell, to, m } => (planner::Command::Switchover { cell, to }, m),
        CellCmd::Dr {
            cmd: DrCmd::Cutover { from, to, m },
        } => (planner::Command::DrCutover { from, to }, m),
        CellCmd::Revert { op, m } => {
            let spec = g.store_spec();
            let id = op.clone();
            let rec = blocking(move || {
                let store = ldc_store::open(&spec)?;
                let mut t = store.begin_read()?;
                let r = load_op(&mut *t, &id);
                t.rollback()?;
                r
            })
            .await?;
            let Some(rec) = rec else {
                eprintln!("error: no operation {op}; `ldc cell history` lists them");
                return Ok(ExitCode::from(2));
            };
            (
                planner::Command::Revert {
                    op,
                    back: rec.moved_from,
                },
                m,
            )
        }
        CellCmd::Serve(_) => unreachable!("dispatched in cli"),
    };
    let dry_run = m.dry_run;
    let s = load(g).await?;
    let health: BTreeMap<String, Health> = s
        .runtimes
        .iter()
        .map(|(c, rt)| {
            (
                c.clone(),
                if rt.healthy {
                    Health::Healthy
                } else {
                    Health::Unhealthy
                },
            )
        })
        .collect();
    let plan = match planner::plan(&s.topo, &s.map, &health, &command) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let id = format!("op-{}", crate::traffic::now_ms());
    let reverse = planner::check_reverse(&s.topo, &s.map, &health, &plan, &id, &Default::default());
    print_plan(g.output, &plan, dry_run, &id, &reverse);
    if dry_run {
        return Ok(ExitCode::SUCCESS);
    }
    if let Err(e) = reverse
        && !m.force
    {
        eprintln!(
            "error: this move could not be undone: {e}; fix that first, or pass --force to move anyway"
        );
        return Ok(ExitCode::from(2));
    }
    let spec = g.store_spec();
    let p = plan.clone();
    let signer = crate::security::table_signer(g)?;
    let epoch = blocking(move || {
        let store = ldc_store::open(&spec)?;
        let mut t = store.begin()?;
        control::apply_plan(&mut *t, &p)?;
        let table = control::publish_routing(&mut *t, &BTreeMap::new(), signer.as_deref())?;
        record_op(&mut *t, &id, &p, table.epoch, &crate::traffic::who())?;
        t.commit()?;
        Ok(table.epoch)
    })
    .await?;
    if g.output == Output::Text {
        println!(
            "applied: {} shards moved; routing epoch {} -> {epoch}",
            plan.moves.len(),
            s.routing_epoch
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn status(g: &Global) -> Result<ExitCode> {
    let s = load(g).await?;
    let cells: Vec<serde_json::Value> = s
        .topo
        .cells
        .iter()
        .map(|c| {
            let shards = s.map.owned_by(&c.id);
            let epochs: BTreeMap<String, u64> =
                shards.iter().map(|sh| (sh.to_string(), s.map.owners[*sh as usize].epoch)).collect();
            let rt = s.runtimes.get(&c.id).cloned().unwrap_or_default();
            let weight = s.weights.get(&c.id).copied().unwrap_or(0);
            let paused = s.traffic.get(&c.id).is_some_and(|t| t.paused);
            // `pids` and `metrics` list blue first, then green (0 / "" when not running).
            let colour = |i: usize, endpoints: &[String]| {
                json!({
                    "pid": rt.pids.get(i).copied().unwrap_or(0),
                    "metrics": rt.metrics.get(i).cloned().unwrap_or_default(),
                    "endpoints": endpoints,
                    "running": !endpoints.is_empty(),
                })
            };
            json!({
                "cell": c.id, "region": c.region,
                "role": if shards.is_empty() { "standby" } else { "serving" },
                "healthy": rt.healthy, "shards": shards, "epochs": epochs,
                "pids": rt.pids, "endpoints": {"blue": rt.blue, "green": rt.green}, "metrics": rt.metrics,
                "green_weight_bp": weight, "paused": paused,
                "colours": {"blue": colour(0, &rt.blue), "green": colour(1, &rt.green)},
            })
        })
        .collect();
    if g.output == Output::Json {
        println!(
            "{}",
            json!({"shard_count": s.topo.shard_count, "routing_epoch": s.routing_epoch, "regions": s.topo.regions(), "cells": cells})
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "routing epoch {}, {} shards",
        s.routing_epoch, s.topo.shard_count
    );
    println!(
        "{:<8} {:<7} {:<8} {:<8} {:>6} {:<16} {:<9} {:<15} PIDS (BLUE,GREEN)",
        "CELL", "REGION", "ROLE", "HEALTH", "SHARDS", "RANGES", "EPOCHS", "GREEN"
    );
    for c in &s.topo.cells {
        let shards = s.map.owned_by(&c.id);
        let rt = s.runtimes.get(&c.id).cloned().unwrap_or_default();
        let epochs: Vec<u64> = shards
            .iter()
            .map(|sh| s.map.owners[*sh as usize].epoch)
            .collect();
        let epoch_range = match (epochs.iter().min(), epochs.iter().max()) {
            (Some(a), Some(b)) if a == b => a.to_string(),
            (Some(a), Some(b)) => format!("{a}-{b}"),
            _ => "-".into(),
        };
        let weight = s.weights.get(&c.id).copied().unwrap_or(0);
        let paused = s.traffic.get(&c.id).is_some_and(|t| t.paused);
        let green = format!(
            "{}{}",
            crate::traffic::fmt_pct(weight),
            if paused { " paused" } else { "" }
        );
        println!(
            "{:<8} {:<7} {:<8} {:<8} {:>6} {:<16} {:<9} {:<15} {}",
            c.id,
            c.region,
            if shards.is_empty() {
                "standby"
            } else {
                "serving"
            },
            if rt.healthy { "healthy" } else { "down" },
            shards.len(),
            ranges(&shards),
            epoch_range,
            green,
            rt.pids
                .iter()
                .map(|p| if *p == 0 { "-".into() } else { p.to_string() })
                .collect::<Vec<_>>()
                .join(",")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn reconcile(g: &Global) -> Result<ExitCode> {
    let spec = g.store_spec();
    let report = blocking(move || {
        let store = ldc_store::open(&spec)?;
        Ok(ldc_cell::reconcile::run(&*store)?)
    })
    .await?;
    let clean = report.is_clean();
    match g.output {
        Output::Json => println!("{}", json!({"clean": clean, "report": report})),
        Output::Text => {
            for (ccy, t) in &report.currencies {
                println!(
                    "{ccy}: {} accounts, balances {} + in flight {} = top-ups - withdrawals {}  (difference {}); outbox {} messages, {} unapplied",
                    t.accounts,
                    t.user_balances,
                    t.in_flight,
                    t.net_external,
                    t.difference,
                    t.outbox_messages,
                    t.outbox_unapplied
                );
            }
            println!("{} ledger entries checked", report.entries_checked);
            for p in &report.problems {
                println!("PROBLEM: {p}");
            }
            println!(
                "{}",
                if clean {
                    "reconcile: clean, money is conserved"
                } else {
                    "reconcile: DIFFERENCES FOUND"
                }
            );
        }
    }
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn shard_ranges() {
        assert_eq!(super::ranges(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(super::ranges(&[]), "-");
    }
}
