//! `kubectl cell`: the operating verbs of crate `ldc-ops` (the same command tree as
//! `ldc cell`) on a Kubernetes cluster ([`ldc_operator::platform::KubePlatform`]). This
//! file is the front-end only: kubectl's connection flags, output, completion, exit codes.
#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use ldc_operator::platform::KubePlatform;
use ldc_ops::cli::{Format, OpsCmd, Verb};
use ldc_ops::render::render;
use ldc_ops::{OpsError, Platform};

#[derive(Parser, Debug)]
#[command(
    name = "kubectl-cell",
    bin_name = "kubectl cell",
    version,
    about = "Operate LDC cells on Kubernetes (the same verbs as `ldc cell`)"
)]
struct Cli {
    #[command(flatten)]
    conn: Conn,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Format::Text)]
    output: Format,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where and as whom to act (kubectl's own flags), and how long to wait.
#[derive(clap::Args, Debug)]
struct Conn {
    /// Path to the kubeconfig file (default: the files $KUBECONFIG lists, else
    /// ~/.kube/config; in a pod, its service account).
    #[arg(long, global = true)]
    kubeconfig: Option<std::path::PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, global = true)]
    context: Option<String>,
    /// Namespace (default: the context's).
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    /// Act as this user (impersonation, as `kubectl --as`).
    #[arg(long = "as", global = true, value_name = "USER")]
    as_user: Option<String>,
    /// With --as: act in these groups (repeatable, as `kubectl --as-group`).
    #[arg(long = "as-group", global = true, value_name = "GROUP")]
    as_group: Vec<String>,
    /// Topology (default: the only one in the namespace).
    #[arg(long, global = true)]
    topology: Option<String>,
    /// How long to wait for the operator to carry out a change: 90s, 1m30s, 1h.
    #[arg(long, global = true, default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    #[command(flatten)]
    Ops(OpsCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion { shell: clap_complete::Shell },
    /// What kubectl's plugin completion asks (`kubectl_complete-cell` calls it): the
    /// words that may follow ARGS, one per line, then cobra's directive.
    #[command(name = "__complete", hide = true)]
    Complete {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e}; use e.g. 90s, 1m30s, 1h"))
}

/// The words that may follow `args` (the last one being typed): subcommands and flags of
/// the command they reach.
fn completions(args: &[String]) -> Vec<String> {
    let mut cmd = Cli::command();
    cmd.build();
    let (typed, done) = args
        .split_last()
        .map_or(("", &[][..]), |(l, r)| (l.as_str(), r));
    let mut at = &cmd;
    for w in done {
        if let Some(sub) = at.find_subcommand(w) {
            at = sub;
        }
    }
    let mut out: Vec<String> = at
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .map(|s| s.get_name().to_string())
        .collect();
    for a in at.get_arguments().chain(cmd.get_arguments()) {
        if let Some(l) = a.get_long() {
            out.push(format!("--{l}"));
        }
    }
    out.retain(|w| w.starts_with(typed));
    out.sort();
    out.dedup();
    out
}

/// Where the command acts, for the line a changing verb prints first.
fn target_line(cli: &Conn, cfg: &Config, namespace: &str) -> String {
    let kc = match &cli.kubeconfig {
        Some(p) => Kubeconfig::read_from(p).ok(),
        None => Kubeconfig::read().ok(),
    };
    let context = cli
        .context
        .clone()
        .or_else(|| kc.as_ref().and_then(|k| k.current_context.clone()));
    let cluster = kc.as_ref().and_then(|k| {
        let ctx = context.as_ref()?;
        k.contexts
            .iter()
            .find(|c| &c.name == ctx)?
            .context
            .as_ref()
            .map(|c| c.cluster.clone())
    });
    format!(
        "acting on cluster {} ({}), context {}, namespace {namespace}{}",
        cluster.as_deref().unwrap_or("in-cluster"),
        cfg.cluster_url,
        context.as_deref().unwrap_or("-"),
        cli.as_user
            .as_ref()
            .map(|u| format!(", as {u}"))
            .unwrap_or_default()
    )
}

async fn config(cli: &Conn) -> Result<Config, String> {
    let opts = KubeConfigOptions {
        context: cli.context.clone(),
        ..Default::default()
    };
    let mut cfg = match &cli.kubeconfig {
        Some(p) => {
            let kc = Kubeconfig::read_from(p)
                .map_err(|e| format!("cannot read kubeconfig {}: {e}", p.display()))?;
            Config::from_custom_kubeconfig(kc, &opts)
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", p.display()))?
        }
        None if cli.context.is_some() => Config::from_kubeconfig(&opts)
            .await
            .map_err(|e| format!("kubeconfig: {e}"))?,
        None => Config::infer()
            .await
            .map_err(|e| format!("no kubeconfig and not in a cluster: {e}"))?,
    };
    if let Some(u) = &cli.as_user {
        cfg.auth_info.impersonate = Some(u.clone());
    }
    if !cli.as_group.is_empty() {
        cfg.auth_info.impersonate_groups = Some(cli.as_group.clone());
    }
    Ok(cfg)
}

fn fail(e: &OpsError) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(e.exit_code())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let Cli {
        conn: cli,
        output,
        cmd,
    } = Cli::parse();
    let ops = match cmd {
        Cmd::Ops(o) => o,
        Cmd::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "kubectl-cell",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Cmd::Complete { args } => {
            let mut out = std::io::stdout().lock();
            for w in completions(&args) {
                let _ = writeln!(out, "{w}");
            }
            let _ = writeln!(out, ":4"); // cobra: ShellCompDirectiveNoFileComp
            return ExitCode::SUCCESS;
        }
    };
    let verb = match Verb::try_from(ops) {
        Ok(v) => v,
        Err(e) => return fail(&e),
    };
    let cfg = match config(&cli).await {
        Ok(c) => c,
        Err(e) => return fail(&OpsError::Failed(e)),
    };
    let namespace = cli
        .namespace
        .clone()
        .unwrap_or_else(|| cfg.default_namespace.clone());
    if verb.writes() {
        eprintln!("{}", target_line(&cli, &cfg, &namespace));
    }
    let client = match Client::try_from(cfg) {
        Ok(c) => c,
        Err(e) => {
            return fail(&OpsError::Failed(format!(
                "cannot reach the Kubernetes API: {e}"
            )));
        }
    };
    let p = KubePlatform {
        client,
        namespace,
        topology: cli.topology.clone(),
        timeout: cli.timeout,
    };
    let out = if let Verb::Status {
        watch: true,
        until_settled,
    } = verb
    {
        ldc_ops::watch_status(&p, output, until_settled, |s| {
            print!("{s}");
            let _ = std::io::stdout().flush();
        })
        .await
    } else {
        ldc_ops::run(&p, verb)
            .await
            .map(|r| print!("{}", render(&r, output, p.tool())))
    };
    match out {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_kubectl() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("soon").unwrap_err().contains("1m30s"));
    }

    #[test]
    fn completion_offers_verbs_and_flags() {
        let w = |a: &[&str]| completions(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(w(&["tr"]).contains(&"traffic-shift".to_string()));
        assert!(w(&["traffic-shift", "r1-a", "--n"]).contains(&"--next".to_string()));
        assert!(w(&["failover", "--"]).contains(&"--dry-run".to_string()));
        assert!(w(&["--con"]).contains(&"--context".to_string()));
        Cli::command().debug_assert();
    }
}
