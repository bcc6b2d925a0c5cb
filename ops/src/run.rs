//! Drives a verb over a platform: snapshot, decide, record; on a conflict (someone changed
//! the platform in between) decide again on a fresh snapshot, at most [`ATTEMPTS_MAX`] times.

use std::time::Duration;

use ldc_core::clock::now_ms;

use crate::cli::{Format, Verb};
use crate::render::render;
use crate::verbs::moves::{self, MoveCommand, MoveOpts, MoveResult};
use crate::verbs::route::{self, ROUTE_USERS_MAX};
use crate::verbs::traffic::{self, TrafficAction};
use crate::verbs::{Report, history, status};
use crate::{OpsError, Platform, PlatformError, Snapshot};

/// Most times a change is decided again after a conflict.
pub const ATTEMPTS_MAX: u32 = 5;

/// Runs `verb` (other than `status --watch`, see [`watch_status`]) on `p`.
pub async fn run<P: Platform>(p: &P, verb: Verb) -> Result<Report, OpsError> {
    match verb {
        Verb::Status { .. } => Ok(Report::Status(status::status(&p.snapshot().await?))),
        Verb::History { cell, limit } => {
            let shown = if limit == 0 { usize::MAX } else { limit };
            let h = p.history(shown, cell.as_deref()).await?;
            Ok(Report::History(history::history(
                &h,
                cell.as_deref(),
                shown,
            )))
        }
        Verb::Move { command, opts } => do_move(p, command, opts).await,
        Verb::Route { mut users, stdin } => {
            if stdin {
                users.extend(read_users()?);
            }
            Ok(Report::Route(route::route(&p.snapshot().await?, &users)?))
        }
        Verb::Traffic {
            cell,
            action,
            dry_run,
        } => do_traffic(p, &cell, action, dry_run).await,
    }
}

/// User ids from stdin, one per line (blank lines skipped), at most [`ROUTE_USERS_MAX`]
/// (one more is read, so that `route` can say there were too many).
fn read_users() -> Result<Vec<String>, OpsError> {
    use std::io::BufRead;
    let mut users = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| OpsError::Failed(format!("cannot read stdin: {e}")))?;
        let u = line.trim();
        if !u.is_empty() {
            users.push(u.to_string());
        }
        if users.len() > ROUTE_USERS_MAX {
            break;
        }
    }
    Ok(users)
}

fn kept_changing(tool: &str, what: &str) -> OpsError {
    OpsError::Failed(format!(
        "the platform kept changing while {what} was being recorded ({ATTEMPTS_MAX} attempts, nothing written); look at `{tool} status` and retry"
    ))
}

async fn do_move<P: Platform>(p: &P, mc: MoveCommand, opts: MoveOpts) -> Result<Report, OpsError> {
    let tool = p.tool();
    let reverted = match &mc {
        MoveCommand::Revert { op } => p.move_record(op).await?,
        _ => None,
    };
    let command = moves::command_for(tool, &mc, reverted.as_ref())?;
    let by = p.who().await;
    let id = moves::move_id(&by, now_ms());
    for _ in 0..ATTEMPTS_MAX {
        let snap = p.snapshot().await?;
        let planned = moves::plan(&snap, tool, &command, &id)?;
        let mut report = moves::report(&snap, &planned, opts);
        if opts.dry_run {
            return Ok(Report::Move(report));
        }
        moves::check_reversible(&planned, opts)?;
        match p.record_move(&snap, &id, &planned.plan, &by).await {
            Ok(done) => {
                report.result = Some(MoveResult {
                    shards_moved: done.record.shards_moved,
                    routing_epoch: done.record.routing_epoch,
                    by: done.record.by,
                    at_unix_ms: done.record.at_unix_ms,
                    message: done.message,
                });
                return Ok(Report::Move(report));
            }
            Err(PlatformError::Conflict) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(kept_changing(tool, &command.to_string()))
}

async fn do_traffic<P: Platform>(
    p: &P,
    cell: &str,
    a: TrafficAction,
    dry_run: bool,
) -> Result<Report, OpsError> {
    let tool = p.tool();
    let by = p.who().await;
    for _ in 0..ATTEMPTS_MAX {
        let snap = p.snapshot().await?;
        let (action, d) = traffic::decide(&snap, tool, cell, a)?;
        let mut report = traffic::report(&snap, cell, action, &d, dry_run);
        if dry_run || d.noop {
            return Ok(Report::Traffic(report));
        }
        let change = traffic::change(action, &d, &by, now_ms(), snap.routing_epoch);
        match p.record_traffic(&snap, cell, &change).await {
            Ok(epoch) => {
                report.routing_epoch_after = epoch;
                return Ok(Report::Traffic(report));
            }
            Err(PlatformError::Conflict) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(kept_changing(
        tool,
        &format!("the traffic change of {cell}"),
    ))
}

/// Whether nothing is in flight: no pending move, and every cell that owns shards healthy.
pub fn settled(s: &Snapshot) -> bool {
    s.pending.is_none()
        && s.cells
            .iter()
            .all(|(name, c)| c.healthy || s.map.count_owned(name) == 0)
}

/// Longest `status --watch` waits for a change before it looks again anyway.
const WATCH_WAIT_MAX: Duration = Duration::from_secs(30);

/// `status --watch`: prints the status, then again (with the time, in text) whenever it
/// changes; with `until_settled`, returns once [`settled`]. Survives platform blips (says
/// so once and keeps trying).
pub async fn watch_status<P: Platform>(
    p: &P,
    format: Format,
    until_settled: bool,
    mut print: impl FnMut(&str),
) -> Result<(), OpsError> {
    let mut last = String::new();
    let mut failing = false;
    loop {
        match p.snapshot().await {
            Ok(s) => {
                failing = false;
                let now = render(&Report::Status(status::status(&s)), format, p.tool());
                if now != last {
                    if format == Format::Text {
                        print(&format!("--- {} UTC\n", ldc_core::clock::fmt_utc(now_ms())));
                    }
                    print(&now);
                    last = now;
                }
                if until_settled && settled(&s) {
                    return Ok(());
                }
                p.changed(&s, WATCH_WAIT_MAX).await;
            }
            Err(e) => {
                if !failing {
                    eprintln!("warning: {e}; retrying");
                    failing = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
