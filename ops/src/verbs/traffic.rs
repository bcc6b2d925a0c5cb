//! `traffic-shift`: a cell's blue/green release (shift, next step, pause, resume, promote,
//! abort, undo). The decision is [`ldc_core::traffic::decide`], the same on both platforms;
//! this adds `--next` (the cell's release steps) and the report.

use ldc_core::traffic::{self, Action, Change, Decision, Facts, fmt_pct};
use serde::Serialize;

use crate::{CellFacts, OpsError, Snapshot};

/// What `traffic-shift` was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrafficAction {
    /// One of the decisions of [`ldc_core::traffic`].
    Do(Action),
    /// The cell's next release step above its weight.
    Next,
}

/// The release steps the local platform walks with `--next` (1%, 10%, 50%, 100%); on
/// Kubernetes a Cell's `spec.traffic.steps` (empty: `--next` is refused).
pub const DEFAULT_STEPS: [u16; 4] = [100, 1_000, 5_000, 10_000];

/// The first release step above the cell's weight.
pub fn resolve(
    tool: &str,
    cell: &str,
    c: &CellFacts,
    a: TrafficAction,
) -> Result<Action, OpsError> {
    if let TrafficAction::Do(a) = a {
        return Ok(a);
    }
    if c.steps.is_empty() {
        return Err(OpsError::Refused(format!(
            "cell {cell} has no release steps; set spec.traffic.steps (e.g. [100, 1000, 5000, 10000]) or use --green PCT"
        )));
    }
    c.steps
        .iter()
        .copied()
        .find(|s| *s > c.green_weight_bp)
        .map(Action::Set)
        .ok_or_else(|| {
            OpsError::Refused(format!(
                "cell {cell} is at or past its last release step (green {}); `{tool} traffic-shift {cell} --promote` to finish or `--abort` to roll back",
                fmt_pct(c.green_weight_bp)
            ))
        })
}

/// The facts [`traffic::decide`] takes, from the snapshot.
pub fn facts(s: &Snapshot, cell: &str, c: &CellFacts) -> Facts {
    Facts {
        weight_bp: c.green_weight_bp,
        paused: c.paused,
        owns_shards: s.map.count_owned(cell) > 0,
        blue_up: c.blue.live > 0,
        green_up: c.green.live > 0,
        last: c.last_change.clone(),
        conflict: c.busy.clone(),
    }
}

/// Decides a traffic change on `s`: the action (with `--next` resolved) and the decision,
/// warnings included.
pub fn decide(
    s: &Snapshot,
    tool: &str,
    cell: &str,
    a: TrafficAction,
) -> Result<(Action, Decision), OpsError> {
    let c = s.cell(cell)?;
    let action = resolve(tool, cell, c, a)?;
    let f = facts(s, cell, c);
    let mut d = traffic::decide(tool, cell, action, &f).map_err(OpsError::Refused)?;
    d.warnings.extend(traffic::reverse_warning(cell, &d, &f));
    Ok((action, d))
}

/// The audit-trail entry of a decided change.
pub fn change(
    action: Action,
    d: &Decision,
    by: &str,
    at_unix_ms: u64,
    routing_epoch: u64,
) -> Change {
    Change {
        at_unix_ms,
        by: by.to_string(),
        action: action.name().into(),
        before_bp: d.before_bp,
        after_bp: d.after_bp,
        paused_before: d.paused_before,
        paused_after: d.paused_after,
        routing_epoch,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficReport {
    pub cell: String,
    pub action: &'static str,
    pub dry_run: bool,
    /// Before and after, whether nothing would change, and warnings.
    #[serde(flatten)]
    pub decision: Decision,
    pub routing_epoch_before: u64,
    pub routing_epoch_after: u64,
}

/// The report of a decision (before it is recorded: `routing_epoch_after` is the epoch
/// before until a new table carries it).
pub fn report(
    s: &Snapshot,
    cell: &str,
    action: Action,
    d: &Decision,
    dry_run: bool,
) -> TrafficReport {
    TrafficReport {
        cell: cell.to_string(),
        action: action.name(),
        dry_run,
        decision: d.clone(),
        routing_epoch_before: s.routing_epoch,
        routing_epoch_after: s.routing_epoch,
    }
}
