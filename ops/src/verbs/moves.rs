//! The moves: `failover`, `switchover`, `dr cutover` and `revert`. Each is planned with the
//! planner both controllers use, checked to be reversible, printed, and (unless
//! `--dry-run`) recorded on the platform, which carries it out.

use ldc_control::moves::MoveRecord;
use ldc_core::planner::{self, Command, Plan, PlanError, ReverseCheck};
use serde::Serialize;

use crate::{OpsError, Snapshot};

/// A move as asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoveCommand {
    Failover {
        cell: String,
    },
    Switchover {
        cell: String,
        to: String,
    },
    DrCutover {
        from: String,
        to: Option<String>,
    },
    /// Undo the recorded move `op`.
    Revert {
        op: String,
    },
}

/// Options of every move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MoveOpts {
    /// Print the plan and its reverse; change nothing.
    pub dry_run: bool,
    /// Move even if the move could not be undone.
    pub force: bool,
}

/// The planner command for `c`; a revert needs the record of the move it undoes.
pub fn command_for(
    tool: &str,
    c: &MoveCommand,
    reverted: Option<&MoveRecord>,
) -> Result<Command, OpsError> {
    Ok(match c {
        MoveCommand::Failover { cell } => Command::Failover { cell: cell.clone() },
        MoveCommand::Switchover { cell, to } => Command::Switchover {
            cell: cell.clone(),
            to: to.clone(),
        },
        MoveCommand::DrCutover { from, to } => Command::DrCutover {
            from: from.clone(),
            to: to.clone(),
        },
        MoveCommand::Revert { op } => {
            let Some(rec) = reverted else {
                return Err(OpsError::Refused(format!(
                    "no move {}; `{tool} history` lists them",
                    ldc_core::quote_prefix(op, 64)
                )));
            };
            if rec.moved_from.is_empty() {
                return Err(OpsError::Refused(format!(
                    "move {op} moved no shards, so there is nothing to revert"
                )));
            }
            Command::Revert {
                op: op.clone(),
                back: rec.moved_from.clone(),
            }
        }
    })
}

/// The id of a move asked for by `by` at `now_ms`: `alice-1764680000000`.
pub fn move_id(by: &str, now_ms: u64) -> String {
    // `alice@host` locally, `system:serviceaccount:ns:name` or `alice` on Kubernetes.
    let user = by.split('@').next().unwrap_or(by);
    let user = user.rsplit(':').next().unwrap_or(user);
    let clean: String = user
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(32)
        .collect();
    let clean = clean.trim_matches('-');
    format!("{}-{now_ms}", if clean.is_empty() { "op" } else { clean })
}

/// A move planned on a snapshot, before anything is recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub id: String,
    pub plan: Plan,
    pub reverse: Result<ReverseCheck, PlanError>,
}

/// Plans `command` on `s` as move `id` and checks its reverse. Refuses a move while
/// another is pending, and a plan the planner refuses.
pub fn plan(s: &Snapshot, tool: &str, command: &Command, id: &str) -> Result<Planned, OpsError> {
    if let Some(p) = &s.pending {
        return Err(OpsError::Refused(format!(
            "move {} ({}) is still pending; wait for it (`{tool} status --watch --until-settled`) and retry",
            p.id, p.command
        )));
    }
    let health = s.health();
    let plan = planner::plan(&s.topology, &s.map, &health, command)
        .map_err(|e| OpsError::Refused(format!("cannot plan {command}: {e}")))?;
    let gone = s
        .cells
        .iter()
        .filter(|(_, c)| c.deleting)
        .map(|(n, _)| n.clone())
        .collect();
    let reverse = planner::check_reverse(&s.topology, &s.map, &health, &plan, id, &gone);
    Ok(Planned {
        id: id.to_string(),
        plan,
        reverse,
    })
}

/// Refuses to carry out a move that could not be undone, unless forced.
pub fn check_reversible(p: &Planned, opts: MoveOpts) -> Result<(), OpsError> {
    match &p.reverse {
        Err(e) if !opts.force => Err(OpsError::Refused(format!(
            "this move could not be undone: {e}; fix that first, or pass --force to move anyway"
        ))),
        _ => Ok(()),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MoveReport {
    pub dry_run: bool,
    pub id: String,
    pub command: String,
    pub routing_epoch_before: u64,
    pub moves: Vec<MoveLine>,
    /// The plan for humans, one line per source and target.
    pub summary: Vec<String>,
    pub reverse: Reverse,
    /// Dry run only: why the move would be refused (irreversible without `--force`).
    pub would_refuse: Option<String>,
    /// Once carried out.
    pub result: Option<MoveResult>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MoveLine {
    pub shard: u32,
    pub from: String,
    pub to: String,
    pub epoch_before: u64,
    pub epoch_after: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Reverse {
    pub possible: bool,
    /// The command that undoes the move (after the tool: `revert ID`).
    pub command: Option<String>,
    /// Cells that must be healthy again before the reverse can run.
    pub waits_for: Vec<String>,
    /// Cells for which the move is final (being deleted).
    pub final_for: Vec<String>,
    /// Why it is not possible.
    pub why: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MoveResult {
    pub shards_moved: u32,
    pub routing_epoch: u64,
    pub by: String,
    pub at_unix_ms: u64,
    pub message: String,
}

/// The report of `p` (planned on `s`), before it is carried out.
pub fn report(s: &Snapshot, p: &Planned, opts: MoveOpts) -> MoveReport {
    let reverse = match &p.reverse {
        Ok(r) => Reverse {
            possible: true,
            command: matches!(&r.command, Command::Revert { back, .. } if !back.is_empty())
                .then(|| format!("revert {}", p.id)),
            waits_for: r.waits_for.clone(),
            final_for: r.final_for.clone(),
            why: None,
        },
        Err(e) => Reverse {
            possible: false,
            command: None,
            waits_for: vec![],
            final_for: vec![],
            why: Some(e.to_string()),
        },
    };
    MoveReport {
        dry_run: opts.dry_run,
        id: p.id.clone(),
        command: p.plan.command.to_string(),
        routing_epoch_before: s.routing_epoch,
        moves: p
            .plan
            .moves
            .iter()
            .map(|m| MoveLine {
                shard: m.shard,
                from: m.from.clone(),
                to: m.to.clone(),
                epoch_before: m.epoch_before,
                epoch_after: m.epoch_after,
            })
            .collect(),
        summary: p.plan.describe(),
        would_refuse: if opts.dry_run {
            check_reversible(p, opts).err().map(|e| e.to_string())
        } else {
            None
        },
        reverse,
        result: None,
    }
}
