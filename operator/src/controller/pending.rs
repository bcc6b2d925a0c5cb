//! Phase 3, the pending operation: which move (if any) this reconcile carries out, and
//! with which plan. Pure: a function of the Topology's status and spec, the cells, the
//! ownership map and the pods' health at a given time.
//!
//! A request recorded by `kubectl cell` comes first; otherwise, with automatic failover
//! on, a region that has been down as a whole for `notReadySeconds` is cut over (opt-in),
//! else the first cell whose serving pods have been not ready that long is failed over.
//! Every move goes through the one shared planner ([`planner::plan`]) — unless the store
//! already records its id, in which case an earlier run applied it and it is only
//! reported, never planned again.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use ldc_control::moves::MoveRecord;
use ldc_core::planner::{self, Command, Plan, ShardMap};

use super::observe::PodHealth;
use crate::crd::{Cell, Topology, TopologyStatus};
use crate::model;
use crate::specs::MANAGER;

/// The soonest an automatic move that is not yet due is looked at again.
const RECHECK_MIN: Duration = Duration::from_millis(500);

/// An operation to carry out: from `kubectl cell` or automatic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub id: String,
    pub command: Command,
    pub requested_by: String,
    pub automatic: bool,
}

/// A request that cannot become a command (recorded as failed, never retried).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub id: String,
    /// The kind the request named.
    pub kind: String,
    pub requested_by: String,
    pub why: String,
}

/// What [`choose`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Choice {
    pub pending: Option<Pending>,
    pub rejected: Option<Rejected>,
    /// Whether `status.pendingOperation` is cleared by this reconcile's status write.
    pub clear_request: bool,
    /// When an automatic move that is not yet due becomes due (look again then).
    pub due_in: Option<Duration>,
}

impl Choice {
    fn wait(&mut self, left: Duration) {
        let left = left.max(RECHECK_MIN);
        self.due_in = Some(self.due_in.map_or(left, |d| d.min(left)));
    }
}

/// Chooses this reconcile's operation.
pub fn choose(
    topo: &Topology,
    status: &TopologyStatus,
    cells: &[Cell],
    map: &ShardMap,
    pods: &PodHealth,
    now: Timestamp,
) -> Choice {
    let mut choice = Choice::default();
    if let Some(req) = &status.pending_operation {
        choice.clear_request = true;
        // Already in history: a re-run after the status write that recorded it.
        if status.history.iter().all(|h| h.id != req.id) {
            match model::command_of(req, &status.history) {
                Ok(command) => {
                    choice.pending = Some(Pending {
                        id: req.id.clone(),
                        command,
                        requested_by: req.requested_by.clone(),
                        automatic: false,
                    })
                }
                Err(e) => {
                    choice.rejected = Some(Rejected {
                        id: req.id.clone(),
                        kind: req.kind.clone(),
                        requested_by: req.requested_by.clone(),
                        why: e.to_string(),
                    })
                }
            }
        }
    }
    let policy = &topo.spec.failover;
    if choice.pending.is_some() || !policy.automatic {
        return choice;
    }
    let ptopo = model::planner_topology(topo, cells);
    let delay = Duration::from_secs(u64::from(policy.not_ready_seconds));
    let automatic = |command: Command| Pending {
        id: planner::automatic_move_id(&command, &ptopo, map),
        command,
        requested_by: MANAGER.into(),
        automatic: true,
    };
    // A region down as a whole has no cell to fail over to: cut it over (opt-in).
    if policy.region_cutover {
        let down = model::regions_down(cells, map, &pods.health, &pods.since, now, delay);
        for (region, due) in down {
            match due {
                Ok(()) => {
                    choice.pending = Some(automatic(Command::DrCutover {
                        from: region,
                        to: None,
                    }));
                    return choice;
                }
                Err(left) => choice.wait(left),
            }
        }
    }
    for c in cells {
        let name = c.name_any();
        let Some(Some(since)) = pods.since.get(&name) else {
            continue;
        };
        let ever_ready = c.status.as_ref().is_some_and(|s| s.ever_ready);
        if !model::auto_failover_candidate(map.count_owned(&name) as usize, ever_ready) {
            continue;
        }
        match model::failover_due(*since, now, delay) {
            Ok(()) => {
                choice.pending = Some(automatic(Command::Failover { cell: name }));
                return choice;
            }
            Err(left) => choice.wait(left),
        }
    }
    choice
}

/// How a chosen operation is carried out.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The store records it: an earlier run applied it (and stopped before reporting).
    Recorded(MoveRecord),
    /// Apply this plan (fenced in the store by [`crate::fence::commit_step`]).
    Apply(Plan),
    /// The planner refuses it, saying why.
    Refused(String),
}

/// Decides `p` given what the store records under its id.
pub fn decide(
    p: &Pending,
    recorded: Option<MoveRecord>,
    ptopo: &planner::Topology,
    map: &ShardMap,
    pods: &PodHealth,
) -> Decision {
    if let Some(rec) = recorded {
        return Decision::Recorded(rec);
    }
    match planner::plan(ptopo, map, &pods.health, &p.command) {
        Ok(plan) => Decision::Apply(plan),
        Err(e) => Decision::Refused(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{CellRole, CellStatus, OperationRecord, OperationRequest};
    use crate::specs::tests::{cell, topo};

    fn t(s: &str) -> Timestamp {
        format!("2025-01-01T00:00:{s}Z").parse().unwrap()
    }

    fn cells() -> Vec<Cell> {
        let mut cs = vec![
            cell("r1-a", "r1", CellRole::Serving),
            cell("r1-s", "r1", CellRole::Standby),
            cell("r2-a", "r2", CellRole::Serving),
            cell("r2-s", "r2", CellRole::Standby),
        ];
        for c in &mut cs {
            c.status = Some(CellStatus {
                ever_ready: true,
                ..Default::default()
            });
        }
        cs
    }

    fn map() -> ShardMap {
        ShardMap::initial(12, &["r1-a", "r2-a"])
    }

    /// Health where `down` cells have been unhealthy since `since`.
    fn pods(down: &[&str], since: Timestamp) -> PodHealth {
        PodHealth::all_but(&cells(), down, since)
    }

    /// [`choose`] on the default topology, cells and map, with `down` cells unhealthy
    /// since second 0, at second `at`.
    fn chosen(st: &TopologyStatus, down: &[&str], at: &str) -> Choice {
        choose(&topo(), st, &cells(), &map(), &pods(down, t("00")), t(at))
    }

    fn request(id: &str, kind: &str) -> OperationRequest {
        OperationRequest {
            id: id.into(),
            kind: kind.into(),
            cell: Some("r1-a".into()),
            to: None,
            from_region: None,
            to_region: None,
            revert_of: None,
            requested_by: "alice".into(),
            requested_at: String::new(),
        }
    }

    fn with_request(r: OperationRequest) -> TopologyStatus {
        TopologyStatus {
            pending_operation: Some(r),
            ..Default::default()
        }
    }

    #[test]
    fn nothing_to_do_when_all_is_healthy() {
        let c = chosen(&TopologyStatus::default(), &[], "30");
        assert_eq!(c, Choice::default());
    }

    #[test]
    fn a_request_comes_first_and_is_cleared() {
        let st = with_request(request("op1", "failover"));
        // r2-a is due for automatic failover, but the request goes first.
        let c = chosen(&st, &["r2-a"], "30");
        assert!(c.clear_request);
        let p = c.pending.unwrap();
        assert_eq!((p.id.as_str(), p.automatic), ("op1", false));
        assert_eq!(
            p.command,
            Command::Failover {
                cell: "r1-a".into()
            }
        );
        assert_eq!(p.requested_by, "alice");
    }

    #[test]
    fn a_request_already_in_history_is_only_cleared() {
        let mut st = with_request(request("op1", "failover"));
        st.history.push(OperationRecord {
            id: "op1".into(),
            command: "failover r1-a".into(),
            result: "Succeeded".into(),
            message: String::new(),
            shards_moved: 6,
            routing_epoch: 2,
            moved_from: Default::default(),
            requested_by: "alice".into(),
            finished_at: String::new(),
        });
        let c = chosen(&st, &[], "01");
        assert!(c.clear_request && c.pending.is_none() && c.rejected.is_none());
    }

    #[test]
    fn a_bad_request_is_rejected_with_why_and_automatic_moves_go_on() {
        let mut r = request("op2", "switchover");
        r.to = None;
        let st = with_request(r);
        let c = chosen(&st, &["r2-a"], "30");
        assert!(c.clear_request);
        assert_eq!(
            c.pending.map(|p| p.command),
            Some(Command::Failover {
                cell: "r2-a".into()
            })
        );
        let rej = c.rejected.unwrap();
        assert_eq!((rej.id.as_str(), rej.kind.as_str()), ("op2", "switchover"));
        assert!(rej.why.contains("needs `to`"), "{}", rej.why);
    }

    #[test]
    fn automatic_failover_waits_for_the_delay_then_fails_the_cell_over() {
        let st = TopologyStatus::default();
        let early = chosen(&st, &["r2-a"], "04");
        assert_eq!(early.pending, None);
        assert_eq!(early.due_in, Some(Duration::from_secs(6)));
        let due = chosen(&st, &["r2-a"], "10");
        let p = due.pending.unwrap();
        assert!(p.automatic && p.requested_by == MANAGER);
        assert_eq!(
            p.command,
            Command::Failover {
                cell: "r2-a".into()
            }
        );
        assert!(p.id.starts_with("auto-failover-r2-a-"), "{}", p.id);
        assert!(!due.clear_request);
    }

    #[test]
    fn cells_never_ready_or_owning_nothing_are_not_failed_over() {
        let mut cs = cells();
        cs[2].status = None; // r2-a never ready: first rollout
        let st = TopologyStatus::default();
        let p = pods(&["r2-a", "r2-s"], t("00"));
        let c = choose(&topo(), &st, &cs, &map(), &p, t("30"));
        assert_eq!(c.pending, None, "r2-s owns nothing, r2-a was never ready");
        let mut manual = topo();
        manual.spec.failover.automatic = false;
        let c = choose(&manual, &st, &cells(), &map(), &p, t("30"));
        assert_eq!(c, Choice::default(), "automatic failover off");
    }

    #[test]
    fn a_region_down_as_a_whole_is_cut_over_only_when_asked_for() {
        let st = TopologyStatus::default();
        let p = pods(&["r2-a", "r2-s"], t("00"));
        let off = chosen(&st, &["r2-a", "r2-s"], "30");
        // Without region cutover, the cell fails over (to nowhere: the planner refuses).
        assert_eq!(
            off.pending.unwrap().command,
            Command::Failover {
                cell: "r2-a".into()
            }
        );
        let mut on = topo();
        on.spec.failover.region_cutover = true;
        let c = choose(&on, &st, &cells(), &map(), &p, t("30"));
        let cmd = c.pending.unwrap().command;
        assert_eq!(
            cmd,
            Command::DrCutover {
                from: "r2".into(),
                to: None
            }
        );
    }

    #[test]
    fn decide_reports_recorded_moves_and_plans_the_rest() {
        let cs = cells();
        let ptopo = model::planner_topology(&topo(), &cs);
        let p = Pending {
            id: "op1".into(),
            command: Command::Failover {
                cell: "r1-a".into(),
            },
            requested_by: "alice".into(),
            automatic: false,
        };
        let health = pods(&["r1-a"], t("00"));
        let Decision::Apply(plan) = decide(&p, None, &ptopo, &map(), &health) else {
            panic!("a healthy standby takes r1-a's shards");
        };
        assert!(plan.moves.iter().all(|m| m.to == "r1-s"));
        let rec = MoveRecord::of("op1", &plan, 2, "alice", 0);
        assert_eq!(
            decide(&p, Some(rec.clone()), &ptopo, &map(), &health),
            Decision::Recorded(rec),
            "never planned again"
        );
        let everyone_down = pods(&["r1-a", "r1-s", "r2-a", "r2-s"], t("00"));
        assert!(matches!(
            decide(&p, None, &ptopo, &map(), &everyone_down),
            Decision::Refused(_)
        ));
    }
}
