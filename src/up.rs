//! `ldc up`: the whole platform on one machine, and the process entry points it starts.
//!
//! The supervisor creates the platform in the store on first start (regions, two serving
//! cells and one standby per region, 100 shards), starts a router and, for every cell, two
//! OS processes: its blue and its green deployment (the same binary with `--colour green`,
//! on the same store). It publishes the routing table with both colours' endpoints, and
//! then acts as the *local controller*: it health checks every process, and when a cell
//! stops answering it runs the shared planner (`ldc_core::planner`) and applies the plan to
//! the store — ownership with bumped epochs first, then the routing table, in one
//! transaction.
//!
//! A cell is healthy when the colours that carry its traffic are: blue while its green
//! weight is below 100%, green while it is above 0% (`ldc cell traffic-shift` sets the
//! weight). So a crashed green process at weight 0 is only restarted, while the same crash
//! at 50% fails the cell over. A dead process of either colour is restarted; a cell that
//! was failed over comes back owning nothing, as the region's new standby (N+1).
//!
//! Child processes print one line `READY listen=ADDR metrics=ADDR` on stdout; logs go to
//! stderr. They die with the supervisor (PR_SET_PDEATHSIG), so nothing is left behind.

use std::collections::BTreeMap;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use ldc_control::{self as control, CellRuntime};
use ldc_core::planner::{self, CellInfo, Health, Topology};
use ldc_core::routing::Colour;
use ldc_store::Store;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use ldc_store::sqlite::LockProbe;

use crate::cli::{
    CellServeArgs, Global, RegionNetns, RouterServeArgs, StoreLayout, TableSource, UpArgs,
};

/// Where `ldc up` listens, and where clients look when nothing else is said.
pub const DEFAULT_ROUTER: &str = "127.0.0.1:7400";
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest the controller waits for a SIGKILLed process to be gone.
const KILL_WAIT_MAX: Duration = Duration::from_secs(2);

/// Runs a blocking store closure off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("store task panicked")?
}

/// The default layout: regions r1..rN, each with cells rN-a, rN-b, … and standby rN-s.
pub fn default_topology(regions: u32, per_region: u32, shards: u32) -> (Topology, Vec<String>) {
    let mut cells = Vec::new();
    let mut serving = Vec::new();
    for r in 1..=regions {
        let region = format!("r{r}");
        for c in 0..per_region {
            let id = format!("{region}-{}", (b'a' + c as u8) as char);
            serving.push(id.clone());
            cells.push(CellInfo {
                id,
                region: region.clone(),
                capacity: None,
            });
        }
        cells.push(CellInfo {
            id: format!("{region}-s"),
            region,
            capacity: None,
        });
    }
    (
        Topology {
            shard_count: shards,
            cells,
        },
        serving,
    )
}

fn die_with_parent() {
    // If the supervisor is killed (even with -9), its children get SIGTERM.
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM);
}

/// `ldc cell serve`.
pub async fn serve_cell(g: &Global, a: CellServeArgs) -> Result<ExitCode> {
    if a.die_with_parent {
        die_with_parent();
    }
    let spec = g.store_spec();
    let store = blocking(move || ldc_store::open(&spec).map_err(Into::into)).await?;
    let listener = TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let metrics_listener = TcpListener::bind(&a.metrics_listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.metrics_listen))?;
    println!(
        "READY listen={} metrics={}",
        listener.local_addr()?,
        metrics_listener.local_addr()?
    );
    let registry = prometheus::Registry::new();
    let transport = crate::security::cell_transport(g, &a.cell, &registry)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut m_rx = stop_rx.clone();
    let readiness = ldc_cell::health::Readiness::default();
    tokio::spawn(ldc_cell::metrics::serve_metrics(
        metrics_listener,
        registry.clone(),
        Some(readiness.clone()),
        async move {
            let _ = m_rx.wait_for(|s| *s).await;
        },
    ));
    tokio::spawn(async move {
        ldc_admin::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let cfg = ldc_cell::CellConfig {
        cell: a.cell,
        colour: a.colour,
        store,
        relay: !a.no_relay,
        queue_max: a.queue_max,
        batch_max: a.batch_max,
        transport,
        readiness,
        idempotency_retention: Duration::from_secs(a.idempotency_retention_secs),
        fail_stop_marker: Some(fail_stop_marker(&g.data_dir, std::process::id())),
    };
    let mut rx = stop_rx;
    match ldc_cell::serve(cfg, listener, registry, async move {
        let _ = rx.wait_for(|s| *s).await;
    })
    .await
    {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e @ ldc_cell::ServeError::FailStop(_)) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(EXIT_FAIL_STOP))
        }
        Err(e) => Err(e.into()),
    }
}

/// Where cell process `pid` says it stopped on a storage fault (see `EXIT_FAIL_STOP`),
/// before it has left.
/// The address a client on this machine dials for a listener bound to `listen`: the
/// unspecified address (every interface) becomes loopback, anything else stays.
fn dial_address(listen: &str) -> String {
    match listen.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => {
            let ip: std::net::IpAddr = if a.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            };
            std::net::SocketAddr::new(ip, a.port()).to_string()
        }
        _ => listen.to_string(),
    }
}

pub fn fail_stop_marker(data_dir: &std::path::Path, pid: u32) -> std::path::PathBuf {
    data_dir.join("fail-stop").join(pid.to_string())
}

/// Whether cell process `pid` raised its fail-stop alarm (and forgets it).
fn took_fail_stop(data_dir: &std::path::Path, pid: u32) -> bool {
    std::fs::remove_file(fail_stop_marker(data_dir, pid)).is_ok()
}

/// Exit code of a cell process that stopped on a storage fault or a writer panic
/// (fail-stop): its supervisor restarts it, and `ldc up` restarts every cell process that
/// shares its store file (they may have synced through the same failed file).
pub const EXIT_FAIL_STOP: u8 = 75;

/// `ldc router serve`: a router fed by the store (polled) or the operator's ConfigMap.
pub async fn serve_router(g: &Global, a: RouterServeArgs) -> Result<ExitCode> {
    if a.die_with_parent {
        die_with_parent();
    }
    let listen = &a.listen;
    let listener = TcpListener::bind(listen).await.with_context(|| {
        format!("cannot listen on {listen}; is another `ldc up` running? pick another address with --listen")
    })?;
    let addr = listener.local_addr()?;
    let admin = TcpListener::bind(&a.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (--admin-listen)", a.admin_listen))?;
    let admin_addr = admin.local_addr()?;
    let registry = prometheus::Registry::new();
    let security = crate::security::router_security(g, &a.token_public_keys, &registry)?;
    let table = match crate::security::table_verifier(g, a.table_public_key.as_deref())? {
        Some(v) => ldc_router::TableHandle::verified(v),
        None => ldc_router::TableHandle::new(),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    match a.table_source {
        TableSource::Store => {
            let spec = g.store_spec();
            let store = blocking(move || ldc_store::open(&spec).map_err(Into::into)).await?;
            tokio::spawn(ldc_router::poll_store(
                store,
                table.clone(),
                Duration::from_millis(a.poll_ms),
                stopped(stop_rx.clone()),
            ));
        }
        TableSource::Kubernetes => {
            let client = kube::Client::try_default().await.context(
                "cannot reach the Kubernetes API for --table-source kubernetes \
                 (in-cluster ServiceAccount or KUBECONFIG)",
            )?;
            let ns = a
                .namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_string());
            let (table, stop) = (table.clone(), stopped(stop_rx.clone()));
            tokio::spawn(async move {
                ldc_router::kube_source::watch_config_map(client, &ns, &a.config_map, table, stop)
                    .await
            });
        }
    }
    println!("READY listen={addr} metrics={admin_addr}");
    tokio::spawn(async move {
        ldc_admin::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    ldc_router::serve(
        ldc_router::Listeners {
            traffic: listener,
            admin,
        },
        table,
        ldc_router::RouterConfig::default(),
        security,
        registry,
        stopped(stop_rx),
    )
    .await
    .map_err(|e| anyhow!("router failed: {e}"))?;
    Ok(ExitCode::SUCCESS)
}

/// The local controller's metrics.
struct ControllerMetrics {
    failovers: prometheus::IntCounterVec,
    failover_seconds: prometheus::Histogram,
    healthy: prometheus::IntGaugeVec,
    restarts: prometheus::IntCounterVec,
    process_up: prometheus::IntGaugeVec,
    routing_epoch: prometheus::IntGauge,
}

impl ControllerMetrics {
    fn new(registry: &prometheus::Registry) -> Result<ControllerMetrics> {
        use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts};
        let m = ControllerMetrics {
            failovers: IntCounterVec::new(
                Opts::new(
                    "ldc_controller_failovers_total",
                    "Automatic cell failovers by cell and result",
                ),
                &["cell", "result"],
            )?,
            failover_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "ldc_controller_failover_seconds",
                    "From the first failed health check to the new routing table committed",
                )
                .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0]),
            )?,
            healthy: IntGaugeVec::new(
                Opts::new(
                    "ldc_controller_cell_healthy",
                    "1 if the cell passes health checks",
                ),
                &["cell"],
            )?,
            restarts: IntCounterVec::new(
                Opts::new("ldc_controller_restarts_total", "Cell process restarts"),
                &["cell"],
            )?,
            process_up: IntGaugeVec::new(
                Opts::new(
                    "ldc_controller_process_up",
                    "1 if the cell's process of this colour passes health checks",
                ),
                &["cell", "colour"],
            )?,
            routing_epoch: IntGauge::new(
                "ldc_controller_routing_epoch",
                "Epoch of the last routing table published",
            )?,
        };
        registry.register(Box::new(m.failovers.clone()))?;
        registry.register(Box::new(m.failover_seconds.clone()))?;
        registry.register(Box::new(m.healthy.clone()))?;
        registry.register(Box::new(m.restarts.clone()))?;
        registry.register(Box::new(m.process_up.clone()))?;
        registry.register(Box::new(m.routing_epoch.clone()))?;
        Ok(m)
    }
}

/// A child process of the supervisor.
struct Proc {
    /// `router`, or `CELL/COLOUR`.
    name: String,
    args: Vec<String>,
    child: Option<Child>,
    pid: u32,
    listen: String,
    metrics: String,
    failures: u32,
    /// When the current run of failed checks began.
    failing_since: Option<Instant>,
    healthy: bool,
    restart_at: Option<Instant>,
    health: Option<HealthClient<tonic::transport::Channel>>,
    /// The network namespace the process runs in (`--region-netns`), if not this one.
    netns: Option<String>,
}

async fn spawn(
    g: &Global,
    args: &[String],
    netns: Option<&str>,
) -> Result<(Child, String, String)> {
    let exe = std::env::current_exe().context("cannot find the ldc binary")?;
    // `ip netns exec` enters the namespace and execs ldc: the pid stays the process's.
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    cmd.arg("--data-dir")
        .arg(&g.data_dir)
        .arg("--store")
        .arg(g.store_spec());
    if let Some(r) = &g.router {
        cmd.arg("--router").arg(r);
    }
    if let Some(p) = &g.pki {
        cmd.arg("--pki").arg(p);
    }
    if g.insecure {
        cmd.arg("--insecure");
    }
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("cannot start a child process")?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(READY_TIMEOUT, lines.next_line())
        .await
        .map_err(|_| anyhow!("{args:?} did not become ready within {READY_TIMEOUT:?}"))??
        .ok_or_else(|| anyhow!("{args:?} exited before it was ready (see its log above)"))?;
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .map(str::to_string)
            .ok_or_else(|| anyhow!("bad ready line {line:?}"))
    };
    let (listen, metrics) = (field("listen=")?, field("metrics=")?);
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, listen, metrics))
}

impl Proc {
    async fn start(&mut self, g: &Global) -> Result<()> {
        let (child, listen, metrics) = spawn(g, &self.args, self.netns.as_deref())
            .await
            .with_context(|| format!("{} did not start", self.name))?;
        self.pid = child.id().unwrap_or(0);
        self.child = Some(child);
        self.listen = listen;
        self.metrics = metrics;
        self.failures = 0;
        self.restart_at = None;
        self.health = crate::security::controller_channel(g, &self.listen)
            .ok()
            .map(HealthClient::new);
        Ok(())
    }

    /// One health probe: the process is alive and answers gRPC health in time.
    async fn probe(&mut self, timeout: Duration) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        let Some(h) = self.health.as_mut() else {
            return false;
        };
        let mut req = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        req.set_timeout(timeout);
        matches!(tokio::time::timeout(timeout, h.check(req)).await, Ok(Ok(r)) if r.get_ref().status == 1)
    }

    fn new(name: String, args: Vec<String>) -> Proc {
        Proc {
            name,
            args,
            child: None,
            pid: 0,
            listen: String::new(),
            metrics: String::new(),
            failures: 0,
            failing_since: None,
            healthy: true,
            restart_at: None,
            health: None,
            netns: None,
        }
    }

    /// SIGKILLs the process, waits for it to be gone (bounded) and schedules its restart.
    async fn kill_for_restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            if tokio::time::timeout(KILL_WAIT_MAX, c.wait()).await.is_err() {
                eprintln!(
                    "{} (pid {}) did not exit after SIGKILL within {KILL_WAIT_MAX:?}",
                    self.name, self.pid
                );
            }
            self.restart_at = Some(Instant::now() + Duration::from_millis(500));
        }
    }

    fn check_state(&self) -> CheckState {
        CheckState {
            healthy: self.healthy,
            failures: self.failures,
            failing_since: self.failing_since,
        }
    }

    /// Whether the process is running (it may still fail its health checks).
    fn running(&self) -> bool {
        self.child.is_some() && self.restart_at.is_none()
    }

    /// Its endpoint for the routing table: none while it is not running.
    fn endpoints(&self) -> Vec<String> {
        if self.running() {
            vec![self.listen.clone()]
        } else {
            vec![]
        }
    }
}

/// A holder of the store's write lock seen at every check for this long is stuck (a busy
/// writer lets go between batches, a few milliseconds apart).
const HOLDER_STUCK_AFTER: Duration = Duration::from_secs(2);

/// The pid of the cell process holding the embedded store's write lock now, if one does.
fn lock_holder(probe: &LockProbe, cells: &[Cell]) -> Option<u32> {
    let holder = probe.holder().ok()??;
    cells
        .iter()
        .flat_map(|c| [&c.blue, &c.green])
        .any(|p| p.pid == holder && p.child.is_some())
        .then_some(holder)
}

/// Pure: `seen` (the holder and since when it was seen at every check) after a check at
/// `now` found `holder`, and whether that holder counts as stuck: it held the lock at every
/// check for [`HOLDER_STUCK_AFTER`], or it fails its own health checks. Every other writer
/// waits for a stuck holder, so their failed checks are not theirs.
fn track_holder(
    seen: Option<(u32, Instant)>,
    holder: Option<u32>,
    holder_failing: bool,
    now: Instant,
) -> (Option<(u32, Instant)>, Option<u32>) {
    let seen = match (seen, holder) {
        (Some((p, since)), Some(h)) if p == h => Some((p, since)),
        (_, Some(h)) => Some((h, now)),
        (_, None) => None,
    };
    let stuck = seen
        .filter(|(_, since)| holder_failing || now.duration_since(*since) >= HOLDER_STUCK_AFTER)
        .map(|(p, _)| p);
    (seen, stuck)
}

/// What one check saw of a running process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcSeen {
    /// It answered its health probe (SERVING) in time.
    ok: bool,
    /// It exited, with this code (`None`: killed by a signal).
    exit: Option<Option<i32>>,
    /// Another process holds a store lock and is stuck: this one may only be waiting for it.
    waits_for_stuck: bool,
}

/// A process's health bookkeeping between checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CheckState {
    healthy: bool,
    /// Failed checks in a row.
    failures: u32,
    /// When the current run of failed checks began.
    failing_since: Option<Instant>,
}

/// What a check means for a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcCheck {
    state: CheckState,
    /// The routing table must be published again (health or endpoints changed).
    changed: bool,
    /// The process exited: forget its child and schedule its restart.
    reap: bool,
    /// It left on a storage fault ([`EXIT_FAIL_STOP`]): every writer must restart.
    fail_stop: bool,
    news: ProcNews,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcNews {
    None,
    Healthy,
    Unhealthy,
}

/// Pure: a process after a check that saw `seen` at `now`. A pass clears its failures; a
/// failure counts, and makes it unhealthy at the `threshold`-th in a row or at once when it
/// exited. A running process that only waits for a stuck lock holder is not failed (it
/// recovers once the holder is fenced).
fn check_proc(s: CheckState, seen: &ProcSeen, threshold: u32, now: Instant) -> ProcCheck {
    let mut c = ProcCheck {
        state: s,
        changed: false,
        reap: false,
        fail_stop: false,
        news: ProcNews::None,
    };
    if seen.ok {
        c.state.failures = 0;
        c.state.failing_since = None;
        if !s.healthy {
            c.state.healthy = true;
            c.changed = true;
            c.news = ProcNews::Healthy;
        }
        return c;
    }
    let exited = seen.exit.is_some();
    if !exited && s.healthy && seen.waits_for_stuck {
        return c;
    }
    c.state.failures = s.failures + 1;
    c.state.failing_since = Some(s.failing_since.unwrap_or(now));
    c.fail_stop = seen.exit == Some(Some(i32::from(EXIT_FAIL_STOP)));
    if s.healthy && (c.state.failures >= threshold || exited) {
        c.state.healthy = false;
        c.changed = true;
        c.news = ProcNews::Unhealthy;
    }
    if exited {
        c.reap = true;
        c.changed = true; // its endpoint leaves the table
    }
    c
}

/// One cell: its blue and green processes and its health as the controller judges it.
struct Cell {
    id: String,
    region: String,
    blue: Proc,
    green: Proc,
    healthy: bool,
}

impl Cell {
    /// A cell's processes, in the network namespace `place` names (if any).
    fn new(id: &str, region: &str, place: Option<&RegionNetns>) -> Cell {
        let proc_for = |colour: Colour| {
            let mut args: Vec<String> = vec![
                "cell".into(),
                "serve".into(),
                "--cell".into(),
                id.into(),
                "--colour".into(),
                colour.as_str().into(),
                "--die-with-parent".into(),
            ];
            if let Some(p) = place {
                let at = std::net::SocketAddr::new(p.address, 0).to_string();
                args.extend(["--listen".into(), at.clone(), "--metrics-listen".into(), at]);
            }
            let mut proc = Proc::new(format!("{id}/{colour}"), args);
            proc.netns = place.map(|p| p.netns.clone());
            proc
        };
        Cell {
            id: id.into(),
            region: region.into(),
            blue: proc_for(Colour::Blue),
            green: proc_for(Colour::Green),
            healthy: true,
        }
    }

    fn procs_mut(&mut self) -> [(Colour, &mut Proc); 2] {
        [
            (Colour::Blue, &mut self.blue),
            (Colour::Green, &mut self.green),
        ]
    }

    /// The colours that carry traffic at this green weight must be healthy.
    fn judge(&self, green_bp: u16) -> bool {
        ldc_core::traffic::serves(green_bp, self.blue.healthy, self.green.healthy)
    }

    /// When the current run of failed checks of a traffic-carrying colour began.
    fn failing_since(&self) -> Option<Instant> {
        match (self.blue.failing_since, self.green.failing_since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The runtime record: `pids` and `metrics` list blue first, then green (0 / "" when a
    /// process is not running).
    fn runtime(&self) -> CellRuntime {
        let pid = |p: &Proc| if p.running() { p.pid } else { 0 };
        let metrics = |p: &Proc| {
            if p.running() {
                p.metrics.clone()
            } else {
                String::new()
            }
        };
        CellRuntime {
            region: self.region.clone(),
            blue: self.blue.endpoints(),
            green: self.green.endpoints(),
            pids: vec![pid(&self.blue), pid(&self.green)],
            metrics: vec![metrics(&self.blue), metrics(&self.green)],
            healthy: self.healthy,
        }
    }
}

/// Green weight per cell in the published routing table.
async fn load_weights(store: &Arc<dyn Store>) -> Result<BTreeMap<String, u16>> {
    let store = store.clone();
    blocking(move || {
        let mut t = store.begin_read()?;
        let r = control::load_routing(&mut *t)?;
        t.rollback()?;
        Ok(r.map(|r| {
            r.cells
                .into_iter()
                .map(|(c, route)| (c, route.green_weight_bp))
                .collect()
        })
        .unwrap_or_default())
    })
    .await
}

/// Writes every cell's runtime record and republishes the routing table, in one txn.
async fn publish(store: &Arc<dyn Store>, cells: &[Cell], signer: &Signer) -> Result<u64> {
    let (store, signer) = (store.clone(), signer.clone());
    let rts: Vec<(String, CellRuntime)> =
        cells.iter().map(|c| (c.id.clone(), c.runtime())).collect();
    blocking(move || {
        let mut t = store.begin()?;
        for (name, rt) in &rts {
            control::put_cell_runtime(&mut *t, name, rt)?;
        }
        let table = control::publish_routing(&mut *t, &BTreeMap::new(), signer.as_deref())?;
        t.commit()?;
        Ok(table.epoch)
    })
    .await
}

/// The key signing the routing tables this controller publishes (`None`: `--insecure`).
type Signer = Option<Arc<ldc_security::table::TableSigner>>;

/// Plans and applies a failover of `cell`, and republishes routing, in one transaction.
async fn failover(
    store: &Arc<dyn Store>,
    cells: &[Cell],
    cell: &str,
    signer: &Signer,
) -> Result<Option<(planner::Plan, u64)>> {
    let (store, signer) = (store.clone(), signer.clone());
    let health: BTreeMap<String, Health> = cells
        .iter()
        .map(|p| {
            (
                p.id.clone(),
                if p.healthy {
                    Health::Healthy
                } else {
                    Health::Unhealthy
                },
            )
        })
        .collect();
    let rts: Vec<(String, CellRuntime)> =
        cells.iter().map(|c| (c.id.clone(), c.runtime())).collect();
    let cell = cell.to_string();
    blocking(move || {
        let mut t = store.begin()?;
        let cfg = control::load_config(&mut *t)?;
        let topo = control::load_topology(&mut *t)?;
        let map = control::load_map(&mut *t, cfg.shard_count)?;
        if map.count_owned(&cell) == 0 {
            t.rollback()?;
            return Ok(None);
        }
        let command = planner::Command::Failover { cell };
        let id = planner::automatic_move_id(&command, &topo, &map);
        let plan = planner::plan(&topo, &map, &health, &command)?;
        control::apply_plan(&mut *t, &plan)?;
        for (name, rt) in &rts {
            control::put_cell_runtime(&mut *t, name, rt)?;
        }
        let table = control::publish_routing(&mut *t, &BTreeMap::new(), signer.as_deref())?;
        // Recorded like a manual move, so `ldc cell revert` can send the shards home.
        let record = control::moves::MoveRecord::of(
            &id,
            &plan,
            table.epoch,
            "ldc up (automatic failover)",
            ldc_core::clock::now_ms(),
        );
        control::moves::put(&mut *t, control::keys::LOCAL_MOVES_PREFIX, &record)?;
        t.commit()?;
        Ok(Some((plan, table.epoch)))
    })
    .await
}

/// The shards each serving cell owns when the platform is created, as inclusive ranges:
/// the groups that move together, each given its own store file.
fn cell_shard_ranges(shards: u32, serving: &[String]) -> Vec<(u32, u32)> {
    let refs: Vec<&str> = serving.iter().map(String::as_str).collect();
    let map = planner::ShardMap::initial(shards, &refs);
    let mut out: Vec<(u32, u32)> = Vec::new();
    for (shard, owner) in map.owners.iter().enumerate() {
        let shard = shard as u32;
        match out.last_mut() {
            Some(r) if map.owners[r.1 as usize].cell == owner.cell => r.1 = shard,
            _ => out.push((shard, shard)),
        }
    }
    out
}

/// `ldc up`.
pub async fn run(g: &Global, a: UpArgs) -> Result<ExitCode> {
    std::fs::create_dir_all(&g.data_dir)
        .with_context(|| format!("cannot create {}", g.data_dir.display()))?;
    let lock = std::fs::File::create(g.data_dir.join("up.lock"))?;
    if lock.try_lock().is_err() {
        bail!(
            "another `ldc up` is running on {}; stop it first or use another --data-dir",
            g.data_dir.display()
        );
    }
    // Fail-stop markers of processes of an earlier run say nothing about this one.
    let _ = std::fs::remove_dir_all(g.data_dir.join("fail-stop"));
    if a.shards == 0 || a.shards > ldc_core::shard::MAX_SHARDS {
        bail!(
            "--shards must be between 1 and {}",
            ldc_core::shard::MAX_SHARDS
        );
    }
    if a.regions == 0 || a.cells_per_region == 0 || a.cells_per_region > 25 {
        bail!("--regions must be at least 1 and --cells-per-region between 1 and 25");
    }
    let spec = g.store_spec();
    let (topo, serving) = default_topology(a.regions, a.cells_per_region, a.shards);
    let embedded = !spec.starts_with("tikv://");
    if embedded && a.store_layout == StoreLayout::Cells {
        let ranges = cell_shard_ranges(a.shards, &serving);
        let path = std::path::PathBuf::from(&spec);
        let made = blocking(move || {
            ldc_store::partitioned::create(&path, &ranges).map_err(anyhow::Error::from)
        })
        .await?;
        if made == ldc_store::partitioned::Created::SingleFile {
            eprintln!(
                "note: this store keeps every shard in one file (it was created before shard files); \
                 a stuck cell can stop the others until it is killed"
            );
        }
    }
    let store = blocking(move || ldc_store::open(&spec).map_err(Into::into)).await?;
    // The cell processes write the embedded store's files (see the fail-stop rule below).
    // One probe per file for the life of the controller (see `LockProbe` on why it stays
    // open).
    let lock_probes: Vec<LockProbe> = if embedded {
        let control = std::path::PathBuf::from(g.store_spec());
        blocking(move || Ok(ldc_store::partitioned::files(&control)?))
            .await?
            .iter()
            .filter_map(|f| LockProbe::open(f).ok())
            .collect()
    } else {
        Vec::new()
    };
    let (created, topo) = {
        let store = store.clone();
        blocking(move || {
            let mut t = store.begin()?;
            let refs: Vec<&str> = serving.iter().map(String::as_str).collect();
            let created = match control::init(&mut *t, &topo, &refs, ldc_core::clock::now_ms()) {
                Ok(c) => c,
                Err(control::ControlError::ShardCountChanged { stored, .. }) => {
                    eprintln!(
                        "note: this store has {stored} shards; --shards is ignored after creation"
                    );
                    false
                }
                Err(e) => return Err(e.into()),
            };
            let topo = control::load_topology(&mut *t)?;
            t.commit()?;
            Ok((created, topo))
        })
        .await?
    };
    eprintln!(
        "{} platform in {} ({} regions, {} cells, {} shards)",
        if created { "created" } else { "resuming" },
        g.data_dir.display(),
        topo.regions().len(),
        topo.cells.len(),
        topo.shard_count
    );

    if g.insecure {
        crate::security::warn_insecure("`ldc up`");
    } else {
        let pki = g.pki();
        let cells: Vec<String> = topo.cells.iter().map(|c| c.id.clone()).collect();
        let hosts: Vec<String> = a
            .region_netns
            .iter()
            .map(|p| p.address.to_string())
            .collect();
        let issued = blocking(move || {
            ldc_security::platform::ensure_local_on(&pki, cells.iter().map(String::as_str), &hosts)
                .map_err(Into::into)
        })
        .await
        .context("cannot create the platform's certificates")?;
        if !issued.is_empty() {
            eprintln!(
                "issued {} certificate(s) in {}: {}",
                issued.len(),
                g.pki().dir().display(),
                issued.join(", ")
            );
        }
    }
    let signer = crate::security::table_signer(g)?;
    // Router first, so the cells' table has a front door when they start.
    let mut router = Proc::new(
        "router".into(),
        vec![
            "router".into(),
            "serve".into(),
            "--listen".into(),
            a.listen.clone(),
            "--die-with-parent".into(),
            "--poll-ms".into(),
            a.router_poll_ms.to_string(),
        ],
    );
    router.start(g).await.context("router did not start")?;
    // What clients dial: a router listening on every address (`0.0.0.0`, `::`) is reached
    // on loopback, the name its certificate carries.
    std::fs::write(g.data_dir.join("router.addr"), dial_address(&router.listen))?;
    std::fs::write(g.data_dir.join("router.admin"), &router.metrics)?;
    // Children must use this router even if --listen asked for port 0.
    router.args[3] = router.listen.clone();
    let g = Global {
        router: Some(router.listen.clone()),
        ..g.clone()
    };

    let mut cells: Vec<Cell> = Vec::new();
    for c in &topo.cells {
        let place = a.region_netns.iter().find(|p| p.region == c.region);
        let mut cell = Cell::new(&c.id, &c.region, place);
        for (colour, p) in cell.procs_mut() {
            p.start(&g)
                .await
                .with_context(|| format!("cell {} ({colour}) did not start", c.id))?;
        }
        cells.push(cell);
    }
    let epoch = publish(&store, &cells, &signer).await?;
    let mut weights = load_weights(&store).await?;
    let registry = prometheus::Registry::new();
    let metrics = ControllerMetrics::new(&registry)?;
    metrics.routing_epoch.set(epoch as i64);
    let metrics_listener = TcpListener::bind(&a.metrics_listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.metrics_listen))?;
    let metrics_addr = metrics_listener.local_addr()?;
    let (metrics_stop, metrics_stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(ldc_cell::metrics::serve_metrics(
        metrics_listener,
        registry.clone(),
        None,
        async move {
            let _ = metrics_stop_rx.await;
        },
    ));
    println!(
        "LDC is up: router {} (routing epoch {epoch})",
        router.listen
    );
    println!(
        "  router admin http://{}/ (healthz, readyz, metrics, table)",
        router.metrics
    );
    println!("  controller metrics http://{metrics_addr}/metrics");
    for c in &cells {
        let w = weights.get(&c.id).copied().unwrap_or(0);
        for (colour, p) in [(Colour::Blue, &c.blue), (Colour::Green, &c.green)] {
            println!(
                "  cell {:<8} {:<5} region {:<4} pid {:<7} grpc {} metrics http://{}/metrics{}",
                c.id,
                colour.as_str(),
                c.region,
                p.pid,
                p.listen,
                p.metrics,
                match colour {
                    Colour::Green if w > 0 =>
                        format!("  (green {})", ldc_core::traffic::fmt_pct(w)),
                    _ => String::new(),
                }
            );
        }
    }
    if !g.insecure {
        println!(
            "  credentials in {}: `ldc` commands use cli.pem (every scope); a user's own token: ldc token alice",
            g.pki().dir().display()
        );
    }
    println!("try: ldc account open alice --currency EUR && ldc topup alice 1000 --currency EUR");
    println!("     ldc cell status      (Ctrl-C stops everything; a later `ldc up` resumes)");

    let period = Duration::from_millis(a.check_ms.max(20));
    let probe_timeout = period.max(Duration::from_millis(300));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = ldc_admin::shutdown_signal();
    tokio::pin!(stop);
    // Each store file's write-lock holder and since when it was seen at every check.
    let mut holder_seen: Vec<Option<(u32, Instant)>> = vec![None; lock_probes.len()];
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        // Traffic shifts change which colours must be healthy; keep the last good read.
        match load_weights(&store).await {
            Ok(w) => weights = w,
            Err(e) => eprintln!("cannot read the routing table's weights: {e:#}"),
        }
        let mut changed = false;
        // A process that raised its fail-stop alarm says so at once (a marker file), even
        // if it is killed as unresponsive before it leaves with its exit code.
        let mut fail_stopped = false;
        for p in cells.iter().flat_map(|c| [&c.blue, &c.green]) {
            // Every marker is taken (and removed), not just the first.
            if p.child.is_some() && took_fail_stop(&g.data_dir, p.pid) {
                fail_stopped = true;
            }
        }
        let mut to_fail = Vec::new();
        let mut stuck_holders = Vec::new();
        for (probe, seen) in lock_probes.iter().zip(holder_seen.iter_mut()) {
            let holder = lock_holder(probe, &cells);
            let holder_failing = holder.is_some_and(|h| {
                cells
                    .iter()
                    .flat_map(|c| [&c.blue, &c.green])
                    .any(|p| p.pid == h && p.failures > 0)
            });
            let (now_seen, stuck) = track_holder(*seen, holder, holder_failing, Instant::now());
            *seen = now_seen;
            stuck_holders.extend(stuck);
        }
        for cell in cells.iter_mut() {
            let id = cell.id.clone();
            for (colour, p) in cell.procs_mut() {
                if let Some(at) = p.restart_at {
                    if Instant::now() >= at {
                        metrics.restarts.with_label_values(&[&id]).inc();
                        match p.start(&g).await {
                            Ok(()) => {
                                changed = true; // a new endpoint to publish
                                eprintln!(
                                    "restarted cell {} {colour} (pid {}); a cell that was failed over owns no shards until a move",
                                    id, p.pid
                                );
                            }
                            Err(e) => {
                                eprintln!("restart of cell {} {colour} failed: {e:#}", id);
                                p.restart_at = Some(Instant::now() + Duration::from_secs(2));
                            }
                        }
                    }
                    continue;
                }
                // observe
                let ok = p.probe(probe_timeout).await;
                metrics
                    .process_up
                    .with_label_values(&[&id, colour.as_str()])
                    .set(i64::from(ok));
                let seen = ProcSeen {
                    ok,
                    exit: p
                        .child
                        .as_mut()
                        .and_then(|c| c.try_wait().ok().flatten())
                        .map(|s| s.code()),
                    waits_for_stuck: stuck_holders.iter().any(|&h| h != p.pid),
                };
                // decide
                let d = check_proc(p.check_state(), &seen, a.failure_threshold, Instant::now());
                // act
                (p.failures, p.failing_since, p.healthy) =
                    (d.state.failures, d.state.failing_since, d.state.healthy);
                changed |= d.changed;
                fail_stopped |= d.fail_stop;
                match d.news {
                    ProcNews::Healthy => eprintln!("cell {id} {colour} is healthy"),
                    ProcNews::Unhealthy => eprintln!(
                        "cell {id} {colour} is unhealthy ({} failed checks{})",
                        p.failures,
                        if seen.exit.is_some() {
                            ", process exited"
                        } else {
                            ""
                        }
                    ),
                    ProcNews::None => {}
                }
                if d.reap {
                    p.child = None;
                    p.restart_at = Some(Instant::now() + Duration::from_millis(500));
                }
            }
            let w = weights.get(&cell.id).copied().unwrap_or(0);
            let ok = cell.judge(w);
            metrics
                .healthy
                .with_label_values(&[&cell.id])
                .set(i64::from(ok));
            if ok != cell.healthy {
                cell.healthy = ok;
                changed = true;
                if ok {
                    eprintln!("cell {} is healthy", cell.id);
                } else {
                    eprintln!(
                        "cell {} is unhealthy: a colour carrying its traffic (green {}) is down",
                        cell.id,
                        ldc_core::traffic::fmt_pct(w)
                    );
                    to_fail.push(cell.id.clone());
                }
            }
        }
        if fail_stopped && embedded {
            // The failed file may be any the process wrote: its cell's shard file (shared
            // with its other colour, and with whichever cell those shards move to) or the
            // control file (shared by all). After a failed fsync the kernel may have dropped
            // pages that a later sync through another process would not bring back, so no
            // process acknowledges anything more before recovery from what is on disk (we
            // cannot tell which file failed: all of them).
            eprintln!(
                "a cell stopped on a storage fault: restarting every cell process on the store"
            );
            for cell in cells.iter_mut() {
                for (_, p) in cell.procs_mut() {
                    p.kill_for_restart().await;
                }
            }
            changed = true;
        }
        for cell in &to_fail {
            // Fence by force: a process that is running but makes no progress (stopped,
            // hung) is killed before its shards move, so it cannot write after the move
            // and holds no store lock the move needs.
            if let Some(c) = cells.iter_mut().find(|c| &c.id == cell) {
                for (colour, p) in c.procs_mut() {
                    if !p.healthy && p.child.is_some() {
                        eprintln!(
                            "cell {cell} {colour} is stuck (pid {}): killing it before its shards move",
                            p.pid
                        );
                        p.kill_for_restart().await;
                    }
                }
            }
        }
        for cell in to_fail {
            let started = Instant::now();
            let since = cells
                .iter()
                .find(|c| c.id == cell)
                .and_then(Cell::failing_since)
                .unwrap_or(started);
            match failover(&store, &cells, &cell, &signer).await {
                Ok(Some((plan, epoch))) => {
                    metrics.routing_epoch.set(epoch as i64);
                    metrics.failovers.with_label_values(&[&cell, "ok"]).inc();
                    metrics
                        .failover_seconds
                        .observe(since.elapsed().as_secs_f64());
                    let targets: Vec<String> = plan
                        .targets()
                        .iter()
                        .map(|(c, n)| format!("{c} ({n})"))
                        .collect();
                    eprintln!(
                        "failover {cell}: {} shards -> {} in {:?}",
                        plan.moves.len(),
                        targets.join(", "),
                        started.elapsed()
                    );
                    changed = false; // failover republished routing with the new health
                }
                Ok(None) => {}
                Err(e) => {
                    metrics.failovers.with_label_values(&[&cell, "error"]).inc();
                    eprintln!("failover of {cell} failed: {e:#}; trying again at the next check");
                    // Judged again at the next check: still unhealthy, it is failed over then.
                    if let Some(c) = cells.iter_mut().find(|c| c.id == cell) {
                        c.healthy = true;
                    }
                }
            }
        }
        if changed {
            match publish(&store, &cells, &signer).await {
                Ok(epoch) => metrics.routing_epoch.set(epoch as i64),
                Err(e) => eprintln!("publishing the routing table failed: {e:#}"),
            }
        }
        // Keep the router alive too.
        if router
            .child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_some())
        {
            eprintln!("router exited; restarting it on {}", router.listen);
            if let Err(e) = router.start(&g).await {
                eprintln!("router restart failed: {e:#}");
            }
        }
    }

    let _ = metrics_stop.send(());
    eprintln!("stopping...");
    for p in cells
        .iter_mut()
        .flat_map(|c| [&mut c.blue, &mut c.green])
        .chain(std::iter::once(&mut router))
    {
        if let Some(c) = &p.child
            && let Some(pid) = c.id()
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    for p in cells
        .iter_mut()
        .flat_map(|c| [&mut c.blue, &mut c.green])
        .chain(std::iter::once(&mut router))
    {
        if let Some(mut c) = p.child.take()
            && tokio::time::timeout(Duration::from_secs(5), c.wait())
                .await
                .is_err()
        {
            let _ = c.kill().await;
        }
    }
    // Mark everything down so `ldc cell status` does not show stale processes as healthy.
    for c in cells.iter_mut() {
        c.healthy = false;
    }
    let _ = publish(&store, &cells, &signer).await;
    eprintln!("stopped");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_serving_cell_gets_a_store_file_for_its_shards() {
        let (_, serving) = default_topology(2, 2, 100);
        assert_eq!(
            cell_shard_ranges(100, &serving),
            vec![(0, 24), (25, 49), (50, 74), (75, 99)]
        );
        let one = vec!["only".to_string()];
        assert_eq!(cell_shard_ranges(7, &one), vec![(0, 6)]);
        // More cells than shards: the cells that own none get no file.
        let (_, serving) = default_topology(1, 5, 3);
        assert_eq!(cell_shard_ranges(3, &serving), vec![(0, 0), (1, 1), (2, 2)]);
        // The ranges are exactly what the initial ownership map gives each cell.
        for shards in [1, 9, 100, 1000] {
            let (_, serving) = default_topology(3, 3, shards);
            let refs: Vec<&str> = serving.iter().map(String::as_str).collect();
            let map = planner::ShardMap::initial(shards, &refs);
            for (first, last) in cell_shard_ranges(shards, &serving) {
                let owner = &map.owners[first as usize].cell;
                assert_eq!(map.owned_by(owner), (first..=last).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn a_process_check_counts_failures_and_reaps_exits() {
        let t0 = Instant::now();
        let healthy = CheckState {
            healthy: true,
            failures: 0,
            failing_since: None,
        };
        let seen = |ok, exit, waits_for_stuck| ProcSeen {
            ok,
            exit,
            waits_for_stuck,
        };
        // A pass changes nothing for a healthy process.
        let c = check_proc(healthy, &seen(true, None, false), 3, t0);
        assert_eq!(
            (c.state, c.changed, c.news),
            (healthy, false, ProcNews::None)
        );
        // Failures count; the third makes it unhealthy; the run's start is kept.
        let c1 = check_proc(healthy, &seen(false, None, false), 3, t0);
        assert_eq!(
            (c1.state.failures, c1.state.healthy, c1.changed),
            (1, true, false)
        );
        let later = t0 + Duration::from_secs(1);
        let c2 = check_proc(c1.state, &seen(false, None, false), 3, later);
        let c3 = check_proc(c2.state, &seen(false, None, false), 3, later);
        assert_eq!(
            (c3.state.healthy, c3.news, c3.changed),
            (false, ProcNews::Unhealthy, true)
        );
        assert_eq!(c3.state.failing_since, Some(t0));
        assert!(!c3.reap);
        // A pass brings it back.
        let back = check_proc(c3.state, &seen(true, None, false), 3, later);
        assert_eq!(
            (back.state, back.news, back.changed),
            (healthy, ProcNews::Healthy, true)
        );
        // An exit is unhealthy at once and reaped; a fail-stop exit says so.
        let gone = check_proc(healthy, &seen(false, Some(Some(1)), false), 3, t0);
        assert_eq!(
            (gone.state.healthy, gone.reap, gone.fail_stop),
            (false, true, false)
        );
        let code = Some(Some(i32::from(EXIT_FAIL_STOP)));
        assert!(check_proc(healthy, &seen(false, code, false), 3, t0).fail_stop);
        assert!(
            check_proc(healthy, &seen(false, Some(None), false), 3, t0).reap,
            "killed"
        );
        // Waiting for a stuck lock holder is not a failure of its own...
        let waits = check_proc(healthy, &seen(false, None, true), 3, t0);
        assert_eq!((waits.state, waits.changed), (healthy, false));
        // ...unless it already is unhealthy, or it exited.
        assert_eq!(
            check_proc(c3.state, &seen(false, None, true), 3, later)
                .state
                .failures,
            4
        );
        assert!(check_proc(healthy, &seen(false, Some(Some(1)), true), 3, t0).reap);
    }

    #[test]
    fn clients_dial_loopback_for_a_router_on_every_address() {
        assert_eq!(dial_address("0.0.0.0:7400"), "127.0.0.1:7400");
        assert_eq!(dial_address("[::]:7400"), "[::1]:7400");
        assert_eq!(dial_address("127.0.0.1:7400"), "127.0.0.1:7400");
        assert_eq!(dial_address("10.0.0.5:7400"), "10.0.0.5:7400");
        assert_eq!(dial_address("router.local:7400"), "router.local:7400");
    }

    #[test]
    fn a_holder_is_stuck_when_it_keeps_the_lock_or_fails_its_checks() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        // First sight: not stuck yet.
        let (seen, stuck) = track_holder(None, Some(7), false, t0);
        assert_eq!((seen, stuck), (Some((7, t0)), None));
        // Seen at every check for the window: stuck.
        let (seen, stuck) = track_holder(seen, Some(7), false, ms(1_999));
        assert_eq!(stuck, None);
        let (seen, stuck) = track_holder(seen, Some(7), false, ms(2_000));
        assert_eq!((seen, stuck), (Some((7, t0)), Some(7)));
        // Another holder (a busy writer let go): the clock restarts.
        let (seen, stuck) = track_holder(seen, Some(8), false, ms(2_100));
        assert_eq!((seen, stuck), (Some((8, ms(2_100))), None));
        // A holder that fails its own checks is stuck at once; no holder, nobody is.
        assert_eq!(track_holder(seen, Some(8), true, ms(2_200)).1, Some(8));
        assert_eq!(track_holder(seen, None, false, ms(2_300)), (None, None));
    }
}
