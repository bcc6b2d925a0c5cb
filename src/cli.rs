//! Command-line surface. Parsing only; each command's action lives in its own module.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "ldc",
    version,
    about = "LDC: cell-based multi-region payments",
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub cmd: Cmd,
}

impl Cli {
    /// Whether the command is `ldc router serve`.
    pub fn is_router_serve(&self) -> bool {
        matches!(
            self.cmd,
            Cmd::Router {
                cmd: RouterCmd::Serve(_)
            }
        )
    }

    /// Worker threads of the command's runtime: cells, the load generator and `ldc up` get
    /// two (the machine's cores; a single-threaded cell measured no faster), clients one.
    /// `1` for `ldc router serve` means a single-threaded runtime (see
    /// [`RouterServeArgs::worker_threads`]).
    pub fn worker_threads(&self) -> usize {
        match &self.cmd {
            Cmd::Router {
                cmd: RouterCmd::Serve(a),
            } => a.worker_threads.max(1),
            Cmd::Cell {
                cmd: CellCmd::Serve(_),
            }
            | Cmd::Load(_)
            | Cmd::Up(_) => 2,
            _ => 1,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Directory of the local platform (store, router address).
    #[arg(long, global = true, env = "LDC_DATA_DIR", default_value = ".ldc")]
    pub data_dir: PathBuf,
    /// Store: a SQLite file path, or tikv://PD1,PD2. Default: DATA_DIR/store.db.
    #[arg(long, global = true, env = "LDC_STORE")]
    pub store: Option<String>,
    /// Router address. Default: the one `ldc up` recorded in DATA_DIR/router.addr.
    #[arg(long, global = true, env = "LDC_ROUTER")]
    pub router: Option<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// The platform's PKI directory (CA, component certificates, token keys). Default:
    /// DATA_DIR/pki, which `ldc up` creates.
    #[arg(long, global = true, env = "LDC_PKI")]
    pub pki: Option<PathBuf>,
    /// Client commands: the certificate to authenticate with, a name in the PKI directory
    /// (`cli`, the administrator credential `ldc up` creates) or a path to a `.pem` with
    /// its `.key` beside it.
    #[arg(long, global = true, env = "LDC_CREDENTIAL", default_value = "cli")]
    pub credential: String,
    /// Client commands: authenticate with this bearer token instead of a certificate
    /// (`ldc token` makes one).
    #[arg(long, global = true, env = "LDC_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Client commands: give up after this many seconds of attempts (each retried with the
    /// same idempotency key); a payment still unanswered then is reported as of unknown
    /// outcome (exit code 3): re-run it with the printed --key.
    #[arg(long, global = true, default_value_t = crate::client::RETRY_DEADLINE.as_secs_f64(), value_parser = deadline_secs)]
    pub deadline: f64,
    /// Development only: no TLS and no authentication anywhere. Prints a warning on every
    /// start. Never use it where real money or a real network is involved.
    #[arg(long, global = true)]
    pub insecure: bool,
}

/// `-o text|json|yaml`, the format of every command (the operating verbs' own).
pub use ldc_ops::cli::Format as Output;

/// Prints a document as `-o json` (one line) or `-o yaml` asks.
pub fn print_doc(out: Output, v: &serde_json::Value) {
    match out {
        Output::Yaml => print!(
            "---\n{}",
            serde_yaml::to_string(v).expect("documents encode")
        ),
        _ => println!("{v}"),
    }
}

fn deadline_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err("expected seconds between 0.1 and 3600, e.g. 30".into()),
    }
}

impl Global {
    pub fn store_spec(&self) -> String {
        self.store
            .clone()
            .unwrap_or_else(|| self.data_dir.join("store.db").display().to_string())
    }

    pub fn router_addr(&self) -> String {
        if let Some(r) = &self.router {
            return r.clone();
        }
        std::fs::read_to_string(self.data_dir.join("router.addr"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| crate::up::DEFAULT_ROUTER.to_string())
    }
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the whole platform on this machine until Ctrl-C.
    Up(UpArgs),
    /// Cell processes and shard ownership.
    Cell {
        #[command(subcommand)]
        cmd: CellCmd,
    },
    /// The routing gateway process.
    Router {
        #[command(subcommand)]
        cmd: RouterCmd,
    },
    /// Accounts.
    Account {
        #[command(subcommand)]
        cmd: AccountCmd,
    },
    /// Add money to an account from outside.
    Topup(MoneyArgs),
    /// Take money out of an account.
    Withdraw(MoneyArgs),
    /// Pay another user (any cell).
    Transfer(TransferArgs),
    /// Give back (part of) a received transfer to its payer.
    Refund(RefundArgs),
    /// Show an account's balance.
    Balance { user: String },
    /// Payments.
    Payment {
        #[command(subcommand)]
        cmd: PaymentCmd,
    },
    /// List an account's ledger entries.
    Entries {
        user: String,
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Recompute every balance and prove money is conserved (exit 1 on any difference).
    Reconcile,
    /// Where users are routed now (the same as `ldc cell route`; the router benchmark
    /// configures its peer with it).
    #[command(hide = true)]
    Route {
        users: Vec<String>,
        /// Also read user ids from stdin, one per line.
        #[arg(long)]
        stdin: bool,
    },
    /// Closed-loop load generator (the benchmark).
    Load(crate::load::LoadArgs),
    /// Make a bearer token for a user (or, with --service, a service), signed with the
    /// platform's token key (DATA_DIR/pki/token.key).
    Token(TokenArgs),
}

#[derive(Args, Debug)]
pub struct TokenArgs {
    /// The user id (or the service's name with --service).
    pub subject: String,
    /// Make a service token, which acts for any user within its scopes.
    #[arg(long)]
    pub service: bool,
    /// Scopes: read, transfer, funds (funds only for services). Default: read,transfer.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["read".to_string(), "transfer".to_string()])]
    pub scope: Vec<String>,
    /// Lifetime, e.g. 30m, 12h, 7d.
    #[arg(long, default_value = "12h")]
    pub ttl: String,
}

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Router listen address.
    #[arg(long, default_value = crate::up::DEFAULT_ROUTER)]
    pub listen: String,
    /// Regions to create (first start only).
    #[arg(long, default_value_t = 2)]
    pub regions: u32,
    /// Serving cells per region, plus one standby (first start only).
    #[arg(long, default_value_t = 2)]
    pub cells_per_region: u32,
    /// Shard count (first start only; never changes afterwards).
    #[arg(long, default_value_t = ldc_core::shard::DEFAULT_SHARDS)]
    pub shards: u32,
    /// Health-check failures in a row before a cell is failed over.
    #[arg(long, default_value_t = 3)]
    pub failure_threshold: u32,
    /// Health-check period in milliseconds.
    #[arg(long, default_value_t = 200)]
    pub check_ms: u64,
    /// Where the local controller serves its Prometheus metrics.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub metrics_listen: String,
    /// How often the router re-reads the routing table (ms). A "moved" answer makes it
    /// re-read at once anyway; tests raise this to exercise stale tables.
    #[arg(long, default_value_t = 100)]
    pub router_poll_ms: u64,
    /// Run a region's cell processes in a network namespace: `REGION=NETNS@ADDRESS`
    /// (repeatable). The namespace must exist and reach, and be reached from, this one at
    /// ADDRESS; the cells listen there and their certificates name it. The fault tests use
    /// it to partition regions (tests/faults.rs).
    #[arg(long = "region-netns", value_parser = parse_region_netns)]
    pub region_netns: Vec<RegionNetns>,
    /// How the embedded store keeps its shards (first start only): `cells`, a file per
    /// serving cell's shards, so that cells write side by side and a stuck cell holds only
    /// its own file; or `one-file`, every shard in the one store file (the layout before
    /// shard files; kept for comparison in `bench/payments.sh`).
    #[arg(long, value_enum, default_value_t = StoreLayout::Cells)]
    pub store_layout: StoreLayout,
}

/// `ldc up --store-layout`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreLayout {
    Cells,
    OneFile,
}

/// Where a region's cell processes run (`--region-netns`).
#[derive(Debug, Clone)]
pub struct RegionNetns {
    pub region: String,
    pub netns: String,
    pub address: std::net::IpAddr,
}

fn parse_region_netns(s: &str) -> Result<RegionNetns, String> {
    let bad = || "expected REGION=NETNS@ADDRESS, e.g. r1=ldc-r1@10.77.1.2".to_string();
    let (region, rest) = s.split_once('=').ok_or_else(bad)?;
    let (netns, address) = rest.split_once('@').ok_or_else(bad)?;
    let ok = |v: &str| {
        !v.is_empty()
            && v.len() <= 64
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if !ok(region) || !ok(netns) {
        return Err(bad());
    }
    Ok(RegionNetns {
        region: region.into(),
        netns: netns.into(),
        address: address.parse().map_err(|_| bad())?,
    })
}

#[derive(Subcommand, Debug)]
pub enum CellCmd {
    /// Run one cell process.
    Serve(CellServeArgs),
    /// The operating verbs, the same as `kubectl cell`'s (crate `ldc-ops`).
    #[command(flatten)]
    Ops(ldc_ops::cli::OpsCmd),
}

#[derive(Args, Debug)]
pub struct CellServeArgs {
    #[arg(long)]
    pub cell: String,
    #[arg(long, default_value = "blue")]
    pub colour: String,
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    #[arg(long, default_value = "127.0.0.1:0")]
    pub metrics_listen: String,
    /// Die with the parent process (set by `ldc up`).
    #[arg(long, hide = true)]
    pub die_with_parent: bool,
    #[arg(long, default_value_t = ldc_cell::writer::QUEUE_MAX)]
    pub queue_max: usize,
    #[arg(long, default_value_t = ldc_cell::writer::BATCH_MAX)]
    pub batch_max: usize,
    /// Disable the outbox relay (benchmarks of one cell without a router).
    #[arg(long)]
    pub no_relay: bool,
    /// How long an idempotency key is remembered: a retry with it within this window
    /// replays the first answer; after it the key is forgotten (default 24 h). `ldc up`'s
    /// cells take it from the environment.
    #[arg(long, env = "LDC_IDEMPOTENCY_RETENTION_SECS", default_value_t = ldc_cell::retention::RETENTION_DEFAULT.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    pub idempotency_retention_secs: u64,
}

#[derive(Subcommand, Debug)]
pub enum RouterCmd {
    /// Run a router: it takes the routing table from the store (polled), or from the
    /// operator's ConfigMap on Kubernetes (watched), and proxies every call to its cell.
    Serve(RouterServeArgs),
}

#[derive(Args, Debug, Clone)]
pub struct RouterServeArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// Where probes, metrics and the routing table are served (plain HTTP, GET only; keep
    /// it off the client network).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub admin_listen: String,
    /// Public keys (PEM) whose ES256 bearer tokens the router accepts; repeat for several.
    /// Default: the PKI's token.pub.pem.
    #[arg(long = "token-public-key")]
    pub token_public_keys: Vec<PathBuf>,
    /// Public key (PEM) of the routing-table publisher; tables not signed with it are
    /// refused. Default: the PKI's routing.pub.pem.
    #[arg(long)]
    pub table_public_key: Option<PathBuf>,
    #[arg(long, hide = true)]
    pub die_with_parent: bool,
    /// Where the routing table comes from.
    #[arg(long, value_enum, default_value_t = TableSource::Store)]
    pub table_source: TableSource,
    /// store: table poll period in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub poll_ms: u64,
    /// kubernetes: the ConfigMap the operator publishes the table to (`<topology>-routing`).
    #[arg(long, default_value = "ldc-routing")]
    pub config_map: String,
    /// kubernetes: its namespace (default: the kubeconfig's or the pod's).
    #[arg(long, env = "LDC_NAMESPACE")]
    pub namespace: Option<String>,
    /// Threads proxying requests. 1 (the default, like linkerd2-proxy's) runs the router
    /// on a single-threaded runtime: no cross-thread wake-ups, work stealing or contended
    /// atomics per request, and a router that shares its cores with other processes (a
    /// sidecar, or `ldc up`) answers with a shorter tail. Give it more on a dedicated node
    /// whose load needs more than one core.
    #[arg(long, env = "LDC_ROUTER_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableSource {
    /// Poll the table the operator (or `ldc up`) commits to the store with the ownership.
    Store,
    /// Watch the operator's routing ConfigMap through the Kubernetes API.
    Kubernetes,
}

#[derive(Subcommand, Debug)]
pub enum AccountCmd {
    /// Open an account for a user in one currency.
    Open {
        user: String,
        #[arg(long)]
        currency: String,
        #[arg(long)]
        key: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct MoneyArgs {
    pub user: String,
    /// Amount in minor units (1050 = 10.50).
    #[arg(allow_negative_numbers = true)]
    pub amount: i64,
    #[arg(long)]
    pub currency: String,
    /// Idempotency key (default: a new random key, printed so you can retry with it).
    #[arg(long)]
    pub key: Option<String>,
}

#[derive(Args, Debug)]
pub struct TransferArgs {
    pub from: String,
    pub to: String,
    #[arg(allow_negative_numbers = true)]
    pub amount: i64,
    #[arg(long)]
    pub currency: String,
    #[arg(long)]
    pub key: Option<String>,
}

#[derive(Args, Debug)]
pub struct RefundArgs {
    /// The payee of the original transfer, who gives the money back.
    pub user: String,
    /// The TRANSFER_IN payment id (as shown in the payee's entries).
    pub payment_id: String,
    #[arg(allow_negative_numbers = true)]
    pub amount: i64,
    #[arg(long)]
    pub key: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum PaymentCmd {
    /// Show one payment (ids look like alice:17).
    Get { payment_id: String },
}

pub async fn run(cli: Cli) -> Result<ExitCode> {
    let g = cli.global;
    match cli.cmd {
        Cmd::Up(a) => crate::up::run(&g, a).await,
        Cmd::Cell {
            cmd: CellCmd::Serve(a),
        } => crate::up::serve_cell(&g, a).await,
        Cmd::Router {
            cmd: RouterCmd::Serve(a),
        } => crate::up::serve_router(&g, a).await,
        Cmd::Cell {
            cmd: CellCmd::Ops(cmd),
        } => crate::ops::run(&g, cmd).await,
        Cmd::Reconcile => crate::ops::reconcile(&g).await,
        Cmd::Route { users, stdin } => {
            crate::ops::run(&g, ldc_ops::cli::OpsCmd::Route { users, stdin }).await
        }
        Cmd::Load(a) => crate::load::run(&g, a).await,
        Cmd::Token(a) => crate::token::run(&g, a),
        other => crate::client::run(&g, other).await,
    }
}
