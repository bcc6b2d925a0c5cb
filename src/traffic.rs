//! `ldc cell traffic-shift|history` and `ldc route`: the blue/green release of a cell on the
//! local platform, and where the published routing table sends a user.
//!
//! A cell's green weight lives in the routing table every router holds (that is what routes
//! traffic). Next to it, the record `sys/traffic/{cell}` keeps what the table has no room
//! for: whether the release is paused, and the audit trail (who, when, before -> after). A
//! change writes the record and republishes the routing table (epoch + 1) in one store
//! transaction, so the two never disagree and routers see the change on their next poll.
//!
//! Each verb is parse -> decide (pure, [`decide`], unit-tested) -> apply (one transaction).

use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::ExitCode;

use anyhow::{Result, bail};
use ldc_cell::control;
use ldc_core::routing::RoutingTable;
pub use ldc_core::traffic::{Action, Change, Facts, fmt_pct, pct_to_bp};
use ldc_core::traffic::{Decision, decide, reverse_warning};
use ldc_store::{Kv, prefix_end};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::cli::{Global, Output, TrafficShiftArgs};
use crate::up::blocking;

/// Store key prefix of the per-cell traffic records.
pub const TRAFFIC_PREFIX: &str = "sys/traffic/";
/// Most changes kept in a cell's audit trail (the oldest are dropped first).
pub const HISTORY_MAX: usize = 200;

fn traffic_key(cell: &str) -> Vec<u8> {
    format!("{TRAFFIC_PREFIX}{cell}").into_bytes()
}

/// `sys/traffic/{cell}`: a cell's release state and its audit trail.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficState {
    /// Green weight in basis points as of the last change (the routing table is the truth).
    pub green_weight_bp: u16,
    pub paused: bool,
    #[serde(default)]
    pub history: Vec<Change>,
}

/// Reads every cell's traffic record.
pub fn load_states(kv: &mut dyn Kv) -> Result<BTreeMap<String, TrafficState>> {
    let p = TRAFFIC_PREFIX.as_bytes();
    let rows = kv.scan(p, &prefix_end(p), 10_000)?;
    rows.into_iter()
        .map(|(k, v)| {
            let cell = String::from_utf8_lossy(&k[p.len()..]).into_owned();
            let st: TrafficState = serde_json::from_slice(&v).map_err(|e| {
                anyhow::anyhow!("traffic record {TRAFFIC_PREFIX}{cell} is corrupt: {e}")
            })?;
            Ok((cell, st))
        })
        .collect()
}

/// The login name of this process's user: `$USER`, `$LOGNAME`, or the uid's passwd entry.
fn user_name() -> String {
    if let Ok(u) = std::env::var("USER").or_else(|_| std::env::var("LOGNAME"))
        && !u.is_empty()
    {
        return u;
    }
    use std::os::unix::fs::MetadataExt;
    let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
        return "unknown".into();
    };
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| {
            p.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_string())
            })
        })
        .unwrap_or_else(|| format!("uid{uid}"))
}

/// `user@host` of whoever runs this command (the audit trails record it).
pub fn who() -> String {
    let user = user_name();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{user}@{host}")
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// UTC `YYYY-MM-DD HH:MM:SS` for a Unix time in milliseconds.
pub fn fmt_time(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The result of one `traffic-shift`.
#[derive(Debug, Serialize)]
struct Report {
    cell: String,
    action: &'static str,
    dry_run: bool,
    #[serde(flatten)]
    decision: Decision,
    routing_epoch_before: u64,
    routing_epoch_after: u64,
}

enum Outcome {
    Done(Report),
    Refused(String),
}

/// `ldc cell traffic-shift`.
pub async fn shift(g: &Global, a: TrafficShiftArgs) -> Result<ExitCode> {
    let signer = crate::security::table_signer(g)?;
    let action = match (a.green, a.pause, a.resume, a.promote, a.abort || a.undo) {
        (Some(pct), ..) => match pct_to_bp(pct) {
            Ok(bp) => Action::Set(bp),
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(2));
            }
        },
        (None, true, ..) => Action::Pause,
        (None, _, true, ..) => Action::Resume,
        (None, _, _, true, _) => Action::Promote,
        (None, _, _, _, true) if a.undo => Action::Undo,
        (None, _, _, _, true) => Action::Abort,
        _ => bail!("say what to do: --green PCT, --pause, --resume, --promote, --abort or --undo"),
    };
    let spec = g.store_spec();
    let cell = a.cell.clone();
    let dry_run = a.dry_run;
    let by = who();
    let outcome = blocking(move || {
        let store = ldc_store::open(&spec)?;
        let mut t = store.begin()?;
        let topo = control::load_topology(&mut *t)?;
        if !topo.cells.iter().any(|c| c.id == cell) {
            t.rollback()?;
            let known: Vec<&str> = topo.cells.iter().map(|c| c.id.as_str()).collect();
            return Ok(Outcome::Refused(format!(
                "unknown cell {cell:?}; the cells are {}",
                known.join(", ")
            )));
        }
        let cfg = control::load_config(&mut *t)?;
        let map = control::load_map(&mut *t, cfg.shard_count)?;
        let rt = control::load_cell_runtimes(&mut *t)?
            .remove(&cell)
            .unwrap_or_default();
        let table = control::load_routing(&mut *t)?.unwrap_or_default();
        let key = traffic_key(&cell);
        let mut state: TrafficState = match t.get_for_update(&key)? {
            Some(b) => serde_json::from_slice(&b).map_err(|e| {
                anyhow::anyhow!("traffic record {TRAFFIC_PREFIX}{cell} is corrupt: {e}")
            })?,
            None => TrafficState::default(),
        };
        // The routing table is what routers use: it is the weight in force.
        let weight_bp = table
            .cells
            .get(&cell)
            .map_or(state.green_weight_bp, |c| c.green_weight_bp);
        let facts = Facts {
            weight_bp,
            paused: state.paused,
            owns_shards: map.count_owned(&cell) > 0,
            blue_up: !rt.blue.is_empty(),
            green_up: !rt.green.is_empty(),
            last: state.history.last().cloned(),
            conflict: None,
        };
        let decision = match decide("ldc cell", &cell, action, &facts) {
            Ok(mut d) => {
                d.warnings.extend(reverse_warning(&cell, &d, &facts));
                d
            }
            Err(msg) => {
                t.rollback()?;
                return Ok(Outcome::Refused(msg));
            }
        };
        let mut report = Report {
            cell: cell.clone(),
            action: action.name(),
            dry_run,
            decision,
            routing_epoch_before: table.epoch,
            routing_epoch_after: table.epoch,
        };
        if dry_run || report.decision.noop {
            t.rollback()?;
            return Ok(Outcome::Done(report));
        }
        let d = &report.decision;
        if d.after_bp != d.before_bp {
            let published = control::publish_routing(
                &mut *t,
                &BTreeMap::from([(cell.clone(), d.after_bp)]),
                signer.as_deref(),
            )?;
            report.routing_epoch_after = published.epoch;
        }
        state.green_weight_bp = d.after_bp;
        state.paused = d.paused_after;
        state.history.push(Change {
            at_unix_ms: now_ms(),
            by,
            action: action.name().into(),
            before_bp: d.before_bp,
            after_bp: d.after_bp,
            paused_before: d.paused_before,
            paused_after: d.paused_after,
            routing_epoch: report.routing_epoch_after,
        });
        let excess = state.history.len().saturating_sub(HISTORY_MAX);
        state.history.drain(..excess);
        t.put(&key, &serde_json::to_vec(&state)?)?;
        t.commit()?;
        Ok(Outcome::Done(report))
    })
    .await?;
    let report = match outcome {
        Outcome::Done(r) => r,
        Outcome::Refused(msg) => {
            eprintln!("error: {msg}");
            return Ok(ExitCode::from(2));
        }
    };
    for w in &report.decision.warnings {
        eprintln!("warning: {w}");
    }
    if g.output == Output::Json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let d = &report.decision;
    let paused = |p: bool| if p { ", paused" } else { "" };
    let change = format!(
        "{}: green {}{} -> {}{}",
        report.cell,
        fmt_pct(d.before_bp),
        paused(d.paused_before),
        fmt_pct(d.after_bp),
        paused(d.paused_after)
    );
    let dry = if report.dry_run { "dry run: " } else { "" };
    if d.noop {
        println!(
            "{}: nothing to change (green {}{})",
            report.cell,
            fmt_pct(d.after_bp),
            paused(d.paused_after)
        );
    } else if action == Action::Pause {
        println!(
            "{dry}{}: paused at green {}; weight changes are refused until --resume (--abort still works)",
            report.cell,
            fmt_pct(d.after_bp)
        );
    } else if action == Action::Resume {
        println!(
            "{dry}{}: resumed at green {}",
            report.cell,
            fmt_pct(d.after_bp)
        );
    } else if report.dry_run {
        println!("dry run: {change}; nothing changed");
    } else if report.routing_epoch_after != report.routing_epoch_before {
        println!(
            "{change} (routing epoch {} -> {})",
            report.routing_epoch_before, report.routing_epoch_after
        );
    } else {
        println!("{change}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `ldc cell history [CELL]`.
pub async fn history(g: &Global, cell: Option<String>) -> Result<ExitCode> {
    let spec = g.store_spec();
    let (states, ops) = blocking(move || {
        let store = ldc_store::open(&spec)?;
        let mut t = store.begin_read()?;
        let s = load_states(&mut *t)?;
        let o = crate::ops::load_ops(&mut *t)?;
        t.rollback()?;
        Ok((s, o))
    })
    .await?;
    let ops: Vec<crate::ops::OpRecord> = ops
        .into_iter()
        .filter(|o| {
            cell.as_ref()
                .is_none_or(|c| o.moved_from.contains_key(c) || o.command.contains(c.as_str()))
        })
        .collect();
    let mut rows: Vec<(&String, &Change)> = states
        .iter()
        .filter(|(c, _)| cell.as_ref().is_none_or(|want| want == *c))
        .flat_map(|(c, s)| s.history.iter().map(move |h| (c, h)))
        .collect();
    rows.sort_by_key(|(c, h)| (h.at_unix_ms, c.as_str()));
    if g.output == Output::Json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|(c, h)| {
                let mut v = serde_json::to_value(h).expect("changes encode");
                v["cell"] = json!(c);
                v
            })
            .collect();
        println!("{}", json!({ "changes": v, "operations": ops }));
        return Ok(ExitCode::SUCCESS);
    }
    if !ops.is_empty() {
        println!(
            "{:<20} {:<16} {:<30} {:>6} {:>6}  {:<24}",
            "WHEN (UTC)", "OPERATION", "COMMAND", "MOVED", "EPOCH", "BY"
        );
        for o in &ops {
            println!(
                "{:<20} {:<16} {:<30} {:>6} {:>6}  {:<24}",
                fmt_time(o.at_unix_ms),
                o.id,
                o.command,
                o.shards_moved,
                o.routing_epoch,
                o.by
            );
        }
        println!();
    }
    if rows.is_empty() {
        println!("no traffic changes recorded");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:<8} {:<8} {:<24} {:>8}    {:<8} EPOCH",
        "WHEN (UTC)", "CELL", "ACTION", "BY", "BEFORE", "AFTER"
    );
    for (c, h) in rows {
        let p =
            |bp: u16, paused: bool| format!("{}{}", fmt_pct(bp), if paused { " (p)" } else { "" });
        println!(
            "{:<20} {:<8} {:<8} {:<24} {:>8} -> {:<8} {}",
            fmt_time(h.at_unix_ms),
            c,
            h.action,
            h.by,
            p(h.before_bp, h.paused_before),
            p(h.after_bp, h.paused_after),
            h.routing_epoch
        );
    }
    Ok(ExitCode::SUCCESS)
}

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
            Output::Json => {
                out.push_str(
                    &json!({
                        "user": u, "shard": r.shard, "shard_epoch": r.shard_epoch, "cell": r.cell,
                        "colour": r.colour, "green_weight_bp": weight, "endpoints": r.endpoints,
                        "table_epoch": table.epoch,
                    })
                    .to_string(),
                );
                out.push('\n');
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(fmt_time(0), "1970-01-01 00:00:00");
        assert_eq!(fmt_time(1_700_000_000_000), "2023-11-14 22:13:20");
    }
}
