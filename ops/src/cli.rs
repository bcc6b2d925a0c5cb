//! The command tree both front-ends parse: `ldc cell <verb>` and `kubectl cell <verb>`.
//! Each front-end adds only its own options (where the platform is) beside it.

use clap::{Args, Subcommand, ValueEnum};
use ldc_core::traffic::{Action, pct_to_bp};

use crate::OpsError;
use crate::verbs::history::MOVES_SHOWN_DEFAULT;
use crate::verbs::moves::{MoveCommand, MoveOpts};
use crate::verbs::traffic::TrafficAction;

/// Output format (`-o`).
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Text,
    Json,
    Yaml,
}

/// The operating verbs.
#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum OpsCmd {
    /// Cells, roles, health, shards, epochs, releases and what runs them.
    Status {
        /// Keep watching: print again whenever something changes (Ctrl-C to stop).
        #[arg(short = 'w', long)]
        watch: bool,
        /// With --watch: exit once no move is pending and every cell that owns shards is
        /// healthy.
        #[arg(long, requires = "watch")]
        until_settled: bool,
    },
    /// The moves (id, command, epoch, who, outcome) and the traffic changes (who, when,
    /// before -> after).
    History {
        /// Only what involves this cell.
        cell: Option<String>,
        /// Show the newest N moves (0: all of them; every move is kept).
        #[arg(long, default_value_t = MOVES_SHOWN_DEFAULT)]
        limit: usize,
    },
    /// Move every shard of CELL to its region's standby (the epoch bump fences CELL).
    Failover {
        cell: String,
        #[command(flatten)]
        m: MoveArgs,
    },
    /// Planned move of every shard of CELL to another cell.
    Switchover {
        cell: String,
        #[arg(long)]
        to: String,
        #[command(flatten)]
        m: MoveArgs,
    },
    /// Undo an earlier move: its shards go back to the cells they left (ids: `history`).
    Revert {
        op: String,
        #[command(flatten)]
        m: MoveArgs,
    },
    /// Disaster recovery.
    Dr {
        #[command(subcommand)]
        cmd: DrCmd,
    },
    /// Blue/green release of one cell: shift a share of its users to green, step, pause,
    /// resume, promote (green 100%), abort (green 0%, always allowed) or undo.
    TrafficShift(TrafficShiftArgs),
    /// Where the routing table in force sends users: shard, cell, colour, endpoints.
    Route {
        /// User ids.
        users: Vec<String>,
        /// Also read user ids from stdin, one per line.
        #[arg(long)]
        stdin: bool,
    },
}

#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum DrCmd {
    /// Move a whole region's shards to the other regions (or one of them).
    Cutover {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        m: MoveArgs,
    },
}

/// Options of every move.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct MoveArgs {
    /// Print the plan and its reverse; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Act even if the move could not be undone afterwards.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug, Clone, PartialEq)]
#[command(group(
    clap::ArgGroup::new("action")
        .required(true)
        .args(["green", "next", "pause", "resume", "promote", "abort", "undo"]),
))]
pub struct TrafficShiftArgs {
    pub cell: String,
    /// Share of the cell's users on green, in percent (0-100, up to two decimals: 0.5 = 50 bp).
    #[arg(long, value_name = "PCT")]
    pub green: Option<f64>,
    /// To the cell's next release step (Kubernetes: `spec.traffic.steps`; locally 1%,
    /// 10%, 50%, 100%).
    #[arg(long)]
    pub next: bool,
    /// Freeze the weight: every change except --abort is refused until --resume.
    #[arg(long)]
    pub pause: bool,
    /// Allow weight changes again after --pause.
    #[arg(long)]
    pub resume: bool,
    /// Send every user of the cell to green (100%).
    #[arg(long)]
    pub promote: bool,
    /// Send every user back to blue (0%); allowed even when paused, and ends the pause.
    #[arg(long)]
    pub abort: bool,
    /// Return to the weight and pause state before the last change (again: toggles back).
    #[arg(long)]
    pub undo: bool,
    /// Print before -> after and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// A parsed verb.
#[derive(Debug, Clone, PartialEq)]
pub enum Verb {
    Status {
        watch: bool,
        until_settled: bool,
    },
    History {
        cell: Option<String>,
        limit: usize,
    },
    Move {
        command: MoveCommand,
        opts: MoveOpts,
    },
    Traffic {
        cell: String,
        action: TrafficAction,
        dry_run: bool,
    },
    Route {
        users: Vec<String>,
        /// Read more user ids from stdin.
        stdin: bool,
    },
}

impl Verb {
    /// Whether the verb changes the platform (the front-end then says where it acts).
    pub fn writes(&self) -> bool {
        match self {
            Verb::Move { opts, .. } => !opts.dry_run,
            Verb::Traffic { dry_run, .. } => !dry_run,
            _ => false,
        }
    }
}

impl TryFrom<OpsCmd> for Verb {
    type Error = OpsError;

    fn try_from(c: OpsCmd) -> Result<Verb, OpsError> {
        let mv = |command, m: MoveArgs| Verb::Move {
            command,
            opts: MoveOpts {
                dry_run: m.dry_run,
                force: m.force,
            },
        };
        Ok(match c {
            OpsCmd::Status {
                watch,
                until_settled,
            } => Verb::Status {
                watch,
                until_settled,
            },
            OpsCmd::History { cell, limit } => Verb::History { cell, limit },
            OpsCmd::Route { users, stdin } => Verb::Route { users, stdin },
            OpsCmd::Failover { cell, m } => mv(MoveCommand::Failover { cell }, m),
            OpsCmd::Switchover { cell, to, m } => mv(MoveCommand::Switchover { cell, to }, m),
            OpsCmd::Revert { op, m } => mv(MoveCommand::Revert { op }, m),
            OpsCmd::Dr {
                cmd: DrCmd::Cutover { from, to, m },
            } => mv(MoveCommand::DrCutover { from, to }, m),
            OpsCmd::TrafficShift(a) => {
                // clap's group guarantees exactly one action.
                let action = match a.green {
                    Some(pct) => {
                        TrafficAction::Do(Action::Set(pct_to_bp(pct).map_err(OpsError::Refused)?))
                    }
                    None if a.next => TrafficAction::Next,
                    None if a.pause => TrafficAction::Do(Action::Pause),
                    None if a.resume => TrafficAction::Do(Action::Resume),
                    None if a.promote => TrafficAction::Do(Action::Promote),
                    None if a.abort => TrafficAction::Do(Action::Abort),
                    None => TrafficAction::Do(Action::Undo),
                };
                Verb::Traffic {
                    cell: a.cell,
                    action,
                    dry_run: a.dry_run,
                }
            }
        })
    }
}
