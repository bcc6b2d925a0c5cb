//! The blue/green release decision, shared by `ldc cell traffic-shift` (local platform)
//! and `kubectl cell traffic-shift` (Kubernetes).
//!
//! Both drivers gather the same [`Facts`] (the weight in force, the pause, which colours
//! have something running, the last recorded change, any ownership operation in flight)
//! and call [`decide`]; only where the answer is written differs (a store record or the
//! Cell resource). So a release behaves the same on a laptop and in a cluster, and the
//! refusals read the same.
//!
//! The rules, in order:
//! * `--abort` always wins: it is the way out of a bad release, paused or not, during an
//!   incident or not, and it ends the release (the pause with it).
//! * While paused, weight changes (`--green`, `--promote`) are refused until `--resume`.
//! * While an ownership operation involves the cell (a failover, switchover or cutover in
//!   flight), only `--abort` and `--pause` are accepted: the release waits for the incident.
//! * A colour that starts carrying users must have something running; otherwise the
//!   cell's traffic-carrying colour would be down and the cell would be failed over.
//! * `--undo` returns to the state before the last recorded change (repeating it toggles,
//!   like `kubectl rollout undo`).

use serde::{Deserialize, Serialize};

use crate::routing::BP_MAX;

/// What an operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Set the green weight (basis points).
    Set(u16),
    Pause,
    Resume,
    /// Every user to green.
    Promote,
    /// Every user back to blue.
    Abort,
    /// Back to the state before the last change.
    Undo,
}

impl Action {
    /// The name recorded in the audit trail.
    pub fn name(self) -> &'static str {
        match self {
            Action::Set(_) => "shift",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Promote => "promote",
            Action::Abort => "abort",
            Action::Undo => "undo",
        }
    }
}

/// One entry of a cell's traffic audit trail: who changed what, when, before and after.
/// Written in camelCase (the key style of every report); trails written before read the
/// same (the snake_case aliases).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Change {
    #[serde(alias = "at_unix_ms")]
    pub at_unix_ms: u64,
    /// Who ran the command (`user@host` locally, the Kubernetes user in a cluster).
    pub by: String,
    pub action: String,
    #[serde(alias = "before_bp")]
    pub before_bp: u16,
    #[serde(alias = "after_bp")]
    pub after_bp: u16,
    #[serde(alias = "paused_before")]
    pub paused_before: bool,
    #[serde(alias = "paused_after")]
    pub paused_after: bool,
    /// Epoch of the routing table the change was decided on.
    #[serde(alias = "routing_epoch")]
    pub routing_epoch: u64,
}

/// The facts a decision depends on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Facts {
    pub weight_bp: u16,
    pub paused: bool,
    pub owns_shards: bool,
    /// Whether the colour has something running that can serve (a process locally, a
    /// ready pod in a cluster).
    pub blue_up: bool,
    pub green_up: bool,
    /// The last recorded change, for `--undo`.
    pub last: Option<Change>,
    /// An ownership operation in flight that involves the cell, described for humans.
    pub conflict: Option<String>,
}

/// The decided change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    pub before_bp: u16,
    pub after_bp: u16,
    pub paused_before: bool,
    pub paused_after: bool,
    /// Nothing would change.
    pub noop: bool,
    pub warnings: Vec<String>,
}

/// Most changes a cell's traffic audit trail keeps, on every platform: the oldest are
/// dropped first ([`record_change`]). It bounds the record (a store value locally, an
/// annotation of the Cell on Kubernetes, where all annotations share 256 KiB).
pub const TRAFFIC_HISTORY_MAX: usize = 100;

/// Appends `change` to a trail and drops the oldest beyond [`TRAFFIC_HISTORY_MAX`].
pub fn record_change(trail: &mut Vec<Change>, change: Change) {
    trail.push(change);
    let excess = trail.len().saturating_sub(TRAFFIC_HISTORY_MAX);
    trail.drain(..excess);
}

/// Whether a cell can serve its users: every colour that receives some of them (blue below
/// 100% green, green above 0%) has something live. The one health rule of `ldc up`'s
/// controller and the operator; a cell for which it is false is failed over.
pub fn serves(green_bp: u16, blue_live: bool, green_live: bool) -> bool {
    (green_bp >= BP_MAX || blue_live) && (green_bp == 0 || green_live)
}

/// `--green PCT` in basis points: 0..=100 with at most two decimals (0.5 -> 50 bp).
pub fn pct_to_bp(pct: f64) -> Result<u16, String> {
    if !pct.is_finite() || !(0.0..=100.0).contains(&pct) {
        return Err(format!(
            "--green {pct} is out of range: give a percentage between 0 and 100"
        ));
    }
    let bp = pct * 100.0;
    let rounded = bp.round();
    if (bp - rounded).abs() > 1e-6 {
        return Err(format!(
            "--green {pct} has more than two decimals; the split is in basis points (0.01%)"
        ));
    }
    Ok(rounded as u16)
}

/// "0.5%", "1%", "50%", "99.99%".
pub fn fmt_pct(bp: u16) -> String {
    let s = format!("{}.{:02}", bp / 100, bp % 100);
    format!("{}%", s.trim_end_matches('0').trim_end_matches('.'))
}

/// Decides a traffic change (pure). `tool` is the command prefix the messages suggest
/// (`ldc cell` or `kubectl cell`). Refusals are `Err` with a message that says what to do.
pub fn decide(tool: &str, cell: &str, action: Action, f: &Facts) -> Result<Decision, String> {
    let mut d = Decision {
        before_bp: f.weight_bp,
        after_bp: f.weight_bp,
        paused_before: f.paused,
        paused_after: f.paused,
        noop: false,
        warnings: Vec::new(),
    };
    if let Some(op) = &f.conflict
        && !matches!(action, Action::Abort | Action::Pause)
    {
        return Err(format!(
            "cell {cell} is busy: {op}; wait for it (`{tool} status`) and retry; \
             `{tool} traffic-shift {cell} --abort` (all users to blue) is always allowed"
        ));
    }
    match action {
        Action::Pause => d.paused_after = true,
        Action::Resume => d.paused_after = false,
        Action::Abort => {
            d.after_bp = 0;
            d.paused_after = false;
        }
        Action::Undo => {
            let Some(last) = &f.last else {
                return Err(format!(
                    "cell {cell} has no recorded traffic change to undo (`{tool} history` shows the trail)"
                ));
            };
            d.after_bp = last.before_bp;
            d.paused_after = last.paused_before;
        }
        Action::Set(_) | Action::Promote if f.paused => {
            return Err(format!(
                "cell {cell} is paused at green {}; run `{tool} traffic-shift {cell} --resume` \
                 first, or `--abort` to send every user back to blue",
                fmt_pct(f.weight_bp)
            ));
        }
        Action::Set(bp) if bp > BP_MAX => {
            return Err(format!(
                "green weight {bp} bp is out of range (0..={BP_MAX})"
            ));
        }
        Action::Set(bp) => d.after_bp = bp,
        Action::Promote => d.after_bp = BP_MAX,
    }
    d.noop = d.after_bp == d.before_bp && d.paused_after == d.paused_before;
    if d.noop {
        return Ok(d);
    }
    if !f.owns_shards {
        if d.after_bp != d.before_bp {
            d.warnings.push(format!(
                "cell {cell} owns no shards: the new weight takes effect when it owns some"
            ));
        }
    } else if action != Action::Abort {
        // A colour that starts carrying traffic must be running, or the cell's
        // traffic-carrying colour would be down and the cell would be failed over.
        if d.after_bp > 0 && d.before_bp == 0 && !f.green_up {
            return Err(format!(
                "cell {cell} has nothing running in green, so green cannot take users; \
                 start it first (`{tool} status` shows what runs)"
            ));
        }
        if d.after_bp < BP_MAX && d.before_bp == BP_MAX && !f.blue_up {
            return Err(format!(
                "cell {cell} has nothing running in blue, so blue cannot take users back; \
                 start it first (`{tool} status` shows what runs)"
            ));
        }
    }
    Ok(d)
}

/// Whether the change can be undone right after it is made: the colour that loses users
/// must still have something running to take them back. Returns a warning otherwise.
pub fn reverse_warning(cell: &str, d: &Decision, f: &Facts) -> Option<String> {
    if !f.owns_shards || d.after_bp == d.before_bp {
        return None;
    }
    if d.after_bp > d.before_bp && !f.blue_up {
        return Some(format!(
            "cell {cell} has nothing running in blue: this shift cannot be undone until blue runs again"
        ));
    }
    if d.after_bp < d.before_bp && !f.green_up {
        return Some(format!(
            "cell {cell} has nothing running in green: this shift cannot be undone until green runs again"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(weight_bp: u16, paused: bool) -> Facts {
        Facts {
            weight_bp,
            paused,
            owns_shards: true,
            blue_up: true,
            green_up: true,
            ..Facts::default()
        }
    }

    fn dec(a: Action, f: &Facts) -> Result<Decision, String> {
        decide("ldc cell", "c", a, f)
    }

    #[test]
    fn percent_to_basis_points() {
        assert_eq!(pct_to_bp(0.0), Ok(0));
        assert_eq!(pct_to_bp(0.5), Ok(50));
        assert_eq!(pct_to_bp(1.0), Ok(100));
        assert_eq!(pct_to_bp(33.33), Ok(3333));
        assert_eq!(pct_to_bp(100.0), Ok(10_000));
        assert!(pct_to_bp(100.01).is_err());
        assert!(pct_to_bp(-1.0).is_err());
        assert!(pct_to_bp(f64::NAN).is_err());
        assert!(pct_to_bp(0.125).is_err());
        assert_eq!(fmt_pct(50), "0.5%");
        assert_eq!(fmt_pct(100), "1%");
        assert_eq!(fmt_pct(9999), "99.99%");
        assert_eq!(fmt_pct(0), "0%");
    }

    #[test]
    fn shifts_pause_and_abort() {
        let d = dec(Action::Set(100), &facts(0, false)).unwrap();
        assert_eq!((d.before_bp, d.after_bp, d.noop), (0, 100, false));
        let d = dec(Action::Promote, &facts(5000, false)).unwrap();
        assert_eq!(d.after_bp, BP_MAX);
        // Paused: shifts and promote are refused, abort is not (and ends the pause).
        assert!(
            dec(Action::Set(200), &facts(100, true))
                .unwrap_err()
                .contains("--resume")
        );
        assert!(dec(Action::Promote, &facts(100, true)).is_err());
        let d = dec(Action::Abort, &facts(100, true)).unwrap();
        assert_eq!((d.after_bp, d.paused_after), (0, false));
        let d = dec(Action::Resume, &facts(100, true)).unwrap();
        assert_eq!((d.after_bp, d.paused_after), (100, false));
        // No change is a no-op, not an error.
        assert!(dec(Action::Set(100), &facts(100, false)).unwrap().noop);
        assert!(dec(Action::Pause, &facts(100, true)).unwrap().noop);
        assert!(dec(Action::Abort, &facts(0, false)).unwrap().noop);
        assert!(dec(Action::Set(10_001), &facts(0, false)).is_err());
    }

    #[test]
    fn refuses_a_colour_that_is_not_running_and_warns_without_shards() {
        let mut f = facts(0, false);
        f.green_up = false;
        assert!(dec(Action::Set(100), &f).is_err());
        // Abort needs nothing running.
        f.weight_bp = 100;
        assert!(dec(Action::Abort, &f).is_ok());
        let mut f = facts(BP_MAX, false);
        f.blue_up = false;
        assert!(dec(Action::Set(5000), &f).is_err());
        assert_eq!(dec(Action::Abort, &f).unwrap().after_bp, 0);
        let mut f = facts(0, false);
        f.owns_shards = false;
        f.green_up = false;
        let d = dec(Action::Set(100), &f).unwrap();
        assert_eq!(d.warnings.len(), 1);
    }

    #[test]
    fn undo_returns_to_the_state_before_the_last_change_and_toggles() {
        let f = facts(5000, false);
        assert!(
            dec(Action::Undo, &f)
                .unwrap_err()
                .contains("no recorded traffic change")
        );
        let change = |before: u16, after: u16, pb: bool, pa: bool| Change {
            at_unix_ms: 1,
            by: "me".into(),
            action: "shift".into(),
            before_bp: before,
            after_bp: after,
            paused_before: pb,
            paused_after: pa,
            routing_epoch: 3,
        };
        let mut f = facts(5000, false);
        f.last = Some(change(100, 5000, false, false));
        let d = dec(Action::Undo, &f).unwrap();
        assert_eq!((d.before_bp, d.after_bp), (5000, 100));
        // The undo is itself the last change now: undoing it goes forward again.
        let mut f = facts(100, false);
        f.last = Some(change(5000, 100, false, false));
        assert_eq!(dec(Action::Undo, &f).unwrap().after_bp, 5000);
        // Undo of a pause resumes.
        let mut f = facts(100, true);
        f.last = Some(change(100, 100, false, true));
        let d = dec(Action::Undo, &f).unwrap();
        assert_eq!((d.after_bp, d.paused_after), (100, false));
        // Undo into a colour with nothing running is refused like any shift.
        let mut f = facts(0, false);
        f.green_up = false;
        f.last = Some(change(100, 0, false, false));
        assert!(dec(Action::Undo, &f).unwrap_err().contains("green"));
    }

    #[test]
    fn an_operation_in_flight_blocks_everything_but_abort_and_pause() {
        let mut f = facts(100, false);
        f.conflict = Some("failover r1-a (op-1) is in progress".into());
        for a in [
            Action::Set(200),
            Action::Promote,
            Action::Resume,
            Action::Undo,
        ] {
            let e = dec(a, &f).unwrap_err();
            assert!(e.contains("busy") && e.contains("failover r1-a"), "{e}");
            assert!(e.contains("--abort"), "{e}");
        }
        assert_eq!(dec(Action::Abort, &f).unwrap().after_bp, 0);
        assert!(dec(Action::Pause, &f).unwrap().paused_after);
    }

    #[test]
    fn reverse_needs_the_colour_that_loses_users() {
        let mut f = facts(0, false);
        let d = dec(Action::Set(BP_MAX), &f).unwrap();
        assert_eq!(reverse_warning("c", &d, &f), None);
        f.blue_up = false;
        assert!(
            reverse_warning("c", &d, &f)
                .unwrap()
                .contains("nothing running in blue")
        );
        let mut f = facts(BP_MAX, false);
        let d = dec(Action::Abort, &f).unwrap();
        f.green_up = false;
        assert!(reverse_warning("c", &d, &f).unwrap().contains("green"));
    }
}
