//! `kubectl cell`: status, history, and the moves (failover, switchover, dr cutover,
//! traffic-shift). Parsing only; the verbs live in `ldc_operator::plugin`.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use kube::Client;
use ldc_core::planner::Command;
use ldc_core::traffic::{self, Action};
use ldc_operator::plugin::{self, Target, Verb};

#[derive(Parser, Debug)]
#[command(
    name = "kubectl-cell",
    version,
    about = "Operate LDC cells on Kubernetes"
)]
struct Cli {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    /// Topology (default: the only one in the namespace).
    #[arg(long, global = true)]
    topology: Option<String>,
    /// How long to wait for the operator to publish the change.
    #[arg(long, global = true, default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
    /// Output as JSON.
    #[arg(short = 'o', long = "output", global = true, default_value = "text", value_parser = ["text", "json"])]
    output: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Debug)]
struct DryRun {
    /// Print the plan and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Act even if the move could not be undone afterwards.
    #[arg(long)]
    force: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Cells, roles, readiness, shards, epochs and the routing epoch.
    Status {
        /// Keep watching: print again whenever something changes (Ctrl-C to stop).
        #[arg(short = 'w', long)]
        watch: bool,
    },
    /// The last moves (id, plan, epoch, who, outcome) and every cell's traffic changes.
    History,
    /// Move every shard of CELL to its region's standby.
    Failover {
        cell: String,
        #[command(flatten)]
        d: DryRun,
    },
    /// Planned move of every shard of CELL to --to.
    Switchover {
        cell: String,
        #[arg(long)]
        to: String,
        #[command(flatten)]
        d: DryRun,
    },
    /// Undo an earlier move: its shards go back where they came from (ids: `history`).
    Revert {
        op: String,
        #[command(flatten)]
        d: DryRun,
    },
    /// Disaster recovery.
    Dr {
        #[command(subcommand)]
        cmd: DrCmd,
    },
    /// Shift a cell's users between blue and green (a release).
    #[command(group(
        clap::ArgGroup::new("action")
            .required(true)
            .args(["green", "next", "pause", "resume", "promote", "abort", "undo"]),
    ))]
    TrafficShift {
        cell: String,
        /// Share of the cell's users on green, in percent (0-100, up to two decimals).
        #[arg(long, value_name = "PCT")]
        green: Option<f64>,
        /// To the next of the cell's release steps (`spec.traffic.steps`).
        #[arg(long)]
        next: bool,
        /// Freeze the weight: every change except --abort is refused until --resume.
        #[arg(long)]
        pause: bool,
        /// Allow weight changes again after --pause.
        #[arg(long)]
        resume: bool,
        /// Every user of the cell to green (100%).
        #[arg(long)]
        promote: bool,
        /// Every user back to blue (0%); always allowed, even paused or during an incident.
        #[arg(long)]
        abort: bool,
        /// Back to the weight and pause state before the last change (again: toggles).
        #[arg(long)]
        undo: bool,
        /// Print before -> after and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand, Debug)]
enum DrCmd {
    /// Move a whole region's shards to the other regions.
    Cutover {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        d: DryRun,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, mul) = if let Some(v) = s.strip_suffix("ms") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('m') {
        (v, 60.0)
    } else {
        (s, 1.0)
    };
    n.parse::<f64>()
        .ok()
        .filter(|v| *v >= 0.0)
        .map(|v| Duration::from_secs_f64(v * mul))
        .ok_or_else(|| format!("bad duration {s:?}; use e.g. 30s, 2m, 500ms"))
}

fn verb(cmd: Cmd) -> Result<Verb, String> {
    Ok(match cmd {
        Cmd::Status { .. } => Verb::Status,
        Cmd::History => Verb::History,
        Cmd::Failover { cell, d } => Verb::Move {
            command: Command::Failover { cell },
            dry_run: d.dry_run,
            force: d.force,
        },
        Cmd::Switchover { cell, to, d } => Verb::Move {
            command: Command::Switchover { cell, to },
            dry_run: d.dry_run,
            force: d.force,
        },
        Cmd::Revert { op, d } => Verb::Revert {
            op,
            dry_run: d.dry_run,
            force: d.force,
        },
        Cmd::Dr {
            cmd: DrCmd::Cutover { from, to, d },
        } => Verb::Move {
            command: Command::DrCutover { from, to },
            dry_run: d.dry_run,
            force: d.force,
        },
        Cmd::TrafficShift {
            cell,
            green,
            next,
            pause,
            resume,
            promote,
            abort,
            undo,
            dry_run,
        } => {
            // clap's group guarantees exactly one. `--next` is resolved against the cell's
            // steps when it is read (Verb::Traffic with `next`).
            let action = match green {
                Some(p) => Action::Set(traffic::pct_to_bp(p)?),
                None if next => Action::Set(plugin::NEXT_STEP),
                None if pause => Action::Pause,
                None if resume => Action::Resume,
                None if promote => Action::Promote,
                None if abort => Action::Abort,
                None if undo => Action::Undo,
                None => {
                    return Err(
                        "say what to do: --green PCT, --pause, --resume, --promote, --abort or --undo"
                            .into(),
                    );
                }
            };
            Verb::Traffic {
                cell,
                action,
                dry_run,
            }
        }
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let watch = matches!(cli.cmd, Cmd::Status { watch: true });
    let v = match verb(cli.cmd) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let client = match Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: cannot reach the Kubernetes API: {e}");
            return ExitCode::from(1);
        }
    };
    let target = Target {
        namespace: cli
            .namespace
            .unwrap_or_else(|| client.default_namespace().to_string()),
        topology: cli.topology,
        timeout: cli.timeout,
        json: cli.output == "json",
    };
    if watch {
        return match plugin::watch_status(&client, &target).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        };
    }
    match plugin::run(&client, &target, v).await {
        Ok(out) => {
            print!("{out}");
            if !out.ends_with('\n') {
                println!();
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
