//! Payments through the router while the platform is operated on a real Kubernetes
//! control plane (issue 5). Run by `e2e/run.sh`, which starts the cluster
//! (`e2e/cluster.sh`: API server, etcd, controller manager, KWOK nodes) and exports
//! KUBECONFIG; `cargo test` alone skips it (`#[ignore]`).
//!
//! The world is built the way a user builds it: `helm install` of `charts/ldc`, then
//! `kubectl cell` for every operation. Pods under KWOK run no containers, so this suite
//! plays the kubelet for the data plane: for each Deployment the chart and the operator
//! created (the router, a blue and a green process per cell) it starts one local process
//! with that Deployment's own command, arguments and environment, bound to the loopback
//! address that stands for the pod's IP. The cluster's DNS names (`<cell>-<colour>.<ns>.svc`,
//! `<release>-router`) resolve through a hosts file bind-mounted over `/etc/hosts` in a
//! private mount namespace of each process (`unshare --mount`, root only), so routing
//! tables and relay addresses stay exactly as the operator publishes them. The operator,
//! the routers (installed with `router.tableSource=kubernetes`: they watch the operator's
//! routing ConfigMap) and the uninstall hook run with their pod's ServiceAccount
//! (impersonated), as the kubelet would mount its token, so the chart's RBAC is what they get. When the suite kills a process it also marks that
//! process's pods not ready, as a kubelet would.
//!
//! Scenarios, in order, each under continuous payments (tests/common/payments.rs):
//! traffic shift 0 → 10 → 100% → abort; failover of a cell whose processes were killed;
//! switchover back to the repaired cell; DR cutover of a whole region; the operator leader
//! killed while a region fails back. After each: every acknowledged payment present once,
//! none applied twice, transfers credited once, `ldc reconcile` clean. Timings — requests
//! failed and the time from the fault to the affected users' first successful payment
//! (RTO) — are printed as a table and written to `target/e2e-report.txt`, never asserted.
//! Finally `helm upgrade` and `helm uninstall`, which must leave nothing behind.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::payments::*;
use common::*;
use ldc_core::routing::RoutingTable;
use serde_json::{Value, json};

const RELEASE: &str = "rel";
const TOPOLOGY: &str = "ldc";
const SHARDS: u32 = 24;
const CELLS: [(&str, &str); 6] = [
    ("r1-a", "r1"),
    ("r1-b", "r1"),
    ("r1-s", "r1"),
    ("r2-a", "r2"),
    ("r2-b", "r2"),
    ("r2-s", "r2"),
];
const WAIT: Duration = Duration::from_secs(120);
/// Payments in flight at once.
const WORKERS: usize = 4;

/// A binary of this workspace, built next to `ldc` by `cargo test --workspace`.
fn bin(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_ldc")).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace (`cargo test --workspace --test e2e --no-run`)",
        p.display()
    );
    p
}

fn output(mut c: Command, what: &str) -> (bool, String, String) {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `f` every 50 ms until it returns Some, or panics after `WAIT` naming `what`.
async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t0.elapsed() < WAIT,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One local process standing for the pods of one Deployment.
struct Proc {
    name: String,
    /// The "pod IP": a loopback address of its own.
    ip: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// The hosts file standing for the cluster's DNS (None: the host's own).
    hosts: Option<PathBuf>,
    /// Secret volumes: (a local directory holding the Secret's files, the mount path),
    /// bind-mounted in the process's mount namespace as the kubelet mounts them.
    mounts: Vec<(PathBuf, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// The process the Deployment `dep` would run in a pod with IP `ip`: its container's
    /// command (the image's entrypoint is `ldc`), arguments and environment, with the
    /// wildcard listen addresses bound to `ip` and downward-API fields filled in.
    fn from_deployment(dep: &Value, ip: &str, ns: &str, dir: &Path, hosts: &Path) -> Proc {
        let name = dep["metadata"]["name"].as_str().unwrap();
        Proc::from_pod_spec(name, &dep["spec"]["template"]["spec"], ip, ns, dir, hosts)
    }

    /// The process of a pod spec's (first) container (`name`: the pod or Deployment).
    fn from_pod_spec(
        name: &str,
        spec: &Value,
        ip: &str,
        ns: &str,
        dir: &Path,
        hosts: &Path,
    ) -> Proc {
        let name = name.to_string();
        let c = &spec["containers"][0];
        let spec_sa = spec["serviceAccountName"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        // Like the kubelet mounting the ServiceAccount's token: a kubeconfig that acts as
        // the pod's ServiceAccount, unless the pod opts out.
        let kubeconfig = (spec["automountServiceAccountToken"] != false).then(|| {
            impersonating_kubeconfig(dir, &format!("system:serviceaccount:{ns}:{spec_sa}"))
        });
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
                .unwrap_or_default()
        };
        let command = strings(&c["command"]);
        let program = bin(command.first().map_or("ldc", String::as_str));
        let args: Vec<String> = command
            .iter()
            .skip(1)
            .cloned()
            .chain(strings(&c["args"]))
            .map(|a| a.replace("0.0.0.0:", &format!("{ip}:")))
            .collect();
        let pod = format!("{name}-{}", ip.replace('.', "-"));
        let env = c["env"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                            Some("metadata.namespace") => ns.to_string(),
                            Some("metadata.name") => pod.clone(),
                            Some("spec.serviceAccountName") => spec_sa.clone(),
                            Some(other) => panic!("{name}: unsupported fieldRef {other}"),
                            None => e["value"].as_str().unwrap_or_default().to_string(),
                        };
                        (e["name"].as_str().unwrap().to_string(), value)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut env: Vec<(String, String)> = env;
        if let Some(k) = kubeconfig {
            env.push(("KUBECONFIG".into(), k.display().to_string()));
        }
        let mounts = secret_mounts(&name, spec, c, ns, dir);
        Proc {
            mounts,
            log: dir.join(format!("{name}.log")),
            name,
            ip: ip.into(),
            program,
            args,
            env,
            hosts: Some(hosts.into()),
            child: None,
        }
    }

    /// Starts the process. With a hosts file it runs in a private mount namespace where
    /// that file is `/etc/hosts` (the cluster's DNS names); the test's KUBECONFIG is never
    /// inherited, only one its `env` names.
    fn start(&mut self) {
        assert!(self.child.is_none(), "{} already runs", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = match &self.hosts {
            Some(hosts) => {
                let mut script = String::from(r#"mount --bind "$0" /etc/hosts"#);
                for (src, dst) in &self.mounts {
                    write!(
                        script,
                        " && mkdir -p '{dst}' && mount --bind '{}' '{dst}'",
                        src.display()
                    )
                    .unwrap();
                }
                script.push_str(r#" && exec "$@""#);
                let mut c = Command::new("unshare");
                c.args(["--mount", "--", "sh", "-c"])
                    .arg(script)
                    .arg(hosts)
                    .arg(&self.program);
                c
            }
            None => Command::new(&self.program),
        };
        let child = cmd
            .args(&self.args)
            .env_remove("KUBECONFIG")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {} (needs util-linux unshare): {e}", self.name));
        self.child = Some(child);
    }

    /// SIGKILL: a crash, not a shutdown.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let c = self.child.as_ref().expect("running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig).unwrap();
    }

    fn addr(&self, port: u16) -> String {
        format!("{}:{port}", self.ip)
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The Secret volumes of container `c` in pod `spec`, materialized as the kubelet does:
/// each Secret's keys written as files into a local directory, to bind-mount at the
/// container's mount path.
fn secret_mounts(
    name: &str,
    spec: &Value,
    c: &Value,
    ns: &str,
    dir: &Path,
) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let vol = m["name"].as_str().unwrap();
        let Some(secret) = spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == vol)
            .and_then(|v| v["secret"]["secretName"].as_str())
        else {
            continue;
        };
        let local = dir.join(format!("{name}-{vol}"));
        write_secret(ns, secret, &local);
        out.push((local, m["mountPath"].as_str().unwrap().to_string()));
    }
    out
}

/// Writes the keys of Secret `secret` as files into `to`.
fn write_secret(ns: &str, secret: &str, to: &Path) {
    use base64::Engine as _;
    let mut c = Command::new("kubectl");
    c.args(["-n", ns, "get", "secret", secret, "-o", "json"]);
    let (ok, out, err) = output(c, "kubectl");
    assert!(ok, "Secret {secret} (the operator issues it): {err}");
    let s: Value = serde_json::from_str(&out).unwrap();
    std::fs::create_dir_all(to).unwrap();
    for (k, v) in s["data"].as_object().unwrap() {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap();
        std::fs::write(to.join(k), bytes).unwrap();
    }
}

/// Waits until `addr` accepts TCP connections (the process is serving).
async fn wait_listening(p: &Proc, port: u16) {
    let addr = p.addr(port);
    let t0 = Instant::now();
    while tokio::net::TcpStream::connect(&addr).await.is_err() {
        assert!(
            t0.elapsed() < WAIT,
            "{} never listened on {addr}:\n{}",
            p.name,
            p.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One scenario under way: its load, and what the table will report.
struct Scenario {
    name: &'static str,
    load: Load,
    started: Instant,
    /// When the fault (or the operation) began, and the users it affects.
    fault: Option<(Instant, HashSet<String>)>,
    /// How long the operation took, from its command (or the fault) until `kubectl cell`
    /// returned, i.e. until the routing table carrying it was published.
    op: Option<Duration>,
}

/// One row of the timing table.
struct Row {
    scenario: &'static str,
    seconds: f64,
    op: Option<Duration>,
    acked: usize,
    failed_attempts: usize,
    failed_payments: u64,
    recovery: Option<Recovery>,
}

const HEADER: [&str; 9] = [
    "scenario", "secs", "op s", "acked", "failed", "lost", "users", "RTO p50", "RTO max",
];

fn format_cells(c: [&str; 9]) -> String {
    format!(
        "| {:<44} | {:>5} | {:>5} | {:>6} | {:>6} | {:>4} | {:>5} | {:>7} | {:>7} |",
        c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8]
    )
}

/// The namespace, the cluster objects and the local processes of one run.
struct World {
    ns: String,
    dir: tempfile::TempDir,
    hosts: PathBuf,
    /// Second octet of every loopback address of this run.
    net: u8,
    cells: BTreeMap<(String, &'static str), Proc>,
    router: Option<Proc>,
    operators: Vec<Proc>,
    rows: Vec<Row>,
}

impl World {
    fn new() -> World {
        let pid = std::process::id();
        let ns = format!("e2e-pay-{pid}");
        let dir = tempfile::tempdir().unwrap();
        let net = 20 + (pid % 200) as u8;
        let mut hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        hosts.push_str("\n# LDC e2e: the cluster's service names, as its DNS would answer\n");
        let w = World {
            hosts: dir.path().join("hosts"),
            ns,
            dir,
            net,
            cells: BTreeMap::new(),
            router: None,
            operators: Vec::new(),
            rows: Vec::new(),
        };
        for (i, (cell, _)) in CELLS.iter().enumerate() {
            for colour in ["blue", "green"] {
                let ip = w.cell_ip(i, colour);
                writeln!(hosts, "{ip} {cell}-{colour}.{}.svc", w.ns).unwrap();
            }
        }
        let rip = w.router_ip();
        writeln!(
            hosts,
            "{rip} {RELEASE}-router {RELEASE}-router.{}.svc",
            w.ns
        )
        .unwrap();
        std::fs::write(&w.hosts, hosts).unwrap();
        w
    }

    fn cell_ip(&self, index: usize, colour: &str) -> String {
        let last = if colour == "blue" { 1 } else { 2 };
        format!("127.{}.{}.{last}", self.net, index + 1)
    }

    fn router_ip(&self) -> String {
        format!("127.{}.100.1", self.net)
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("store.db")
    }

    /// A data directory whose `pki/` holds the CLI credential the operator issued (a user
    /// with kubectl access to the namespace's Secrets takes it the same way).
    fn client_data(&self) -> PathBuf {
        let d = self.dir.path().join("client");
        if !d.join("pki").exists() {
            write_secret(&self.ns, &format!("{TOPOLOGY}-pki-cli"), &d.join("pki"));
        }
        d
    }

    fn router_addr(&self) -> String {
        self.router.as_ref().unwrap().addr(7400)
    }

    /// The router's admin port (`/table`, `/metrics`, probes).
    fn router_admin(&self) -> String {
        self.router.as_ref().unwrap().addr(7401)
    }

    fn kubectl(&self, args: &[&str]) -> (bool, String, String) {
        let mut c = Command::new("kubectl");
        c.arg("-n").arg(&self.ns).args(args);
        output(c, "kubectl")
    }

    fn get(&self, args: &[&str]) -> Value {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        let (ok, out, err) = self.kubectl(&a);
        assert!(ok, "kubectl {a:?}: {err}");
        serde_json::from_str(&out).unwrap()
    }

    /// `kubectl cell ARGS` (kubectl finds the plugin on PATH, as for a user).
    fn kubectl_cell(&self, args: &[&str]) -> String {
        let mut c = self.kubectl_cell_command(args);
        c.stdin(Stdio::null());
        let (ok, out, err) = output(c, "kubectl cell");
        assert!(ok, "kubectl cell {args:?} failed:\n{out}{err}");
        out
    }

    /// `kubectl cell ARGS -o json`.
    fn kubectl_cell_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.kubectl_cell(&a)).unwrap()
    }

    /// The cluster's state mirrored into a local store; then the same verbs through both
    /// front-ends must print the same document (`common::frontends`).
    /// `kubectl cell VERB -o json` and `ldc cell VERB -o json` on a local store that holds
    /// the cluster's state (`name`: its directory) print the same document, for each verb.
    fn same_json_on_both_front_ends(&self, name: &str, verbs: &[&[&str]]) {
        let status = self.kubectl_cell_json(&["status"]);
        let history = self.kubectl_cell_json(&["history", "--limit", "0"]);
        let store = self.dir.path().join(name).join("store.db");
        std::fs::create_dir_all(store.parent().unwrap()).unwrap();
        frontends::mirror(&store, &status, &self.get(&["cells"]), &history);
        let ldc = Path::new(env!("CARGO_BIN_EXE_ldc"));
        for args in verbs {
            let k = self.kubectl_cell_json(args);
            let l = frontends::ldc_cell_json(ldc, &store, args);
            frontends::assert_same(&k, &l, args);
        }
        eprintln!("kubectl cell and ldc cell agree on {verbs:?}");
    }

    fn kubectl_cell_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("kubectl");
        let path = format!(
            "{}:{}",
            bin("kubectl-cell").parent().unwrap().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        c.env("PATH", path)
            .args(["cell", "-n", &self.ns, "--timeout", "90s"])
            .args(args);
        c
    }

    fn helm(&self, args: &[&str]) -> (bool, String, String) {
        let home = self.dir.path().join("helm");
        let mut c = Command::new("helm");
        c.args(args)
            .args(["--namespace", &self.ns])
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_DATA_HOME", home.join("data"));
        output(c, "helm (e2e/run.sh puts it on PATH)")
    }

    fn table(&self) -> Option<RoutingTable> {
        let (ok, out, _) = self.kubectl(&["get", "configmap", "ldc-routing", "-o", "json"]);
        if !ok {
            return None;
        }
        let cm: Value = serde_json::from_str(&out).ok()?;
        serde_json::from_str(cm["data"]["routing.json"].as_str()?).ok()
    }

    fn topology(&self) -> Value {
        self.get(&["topology", TOPOLOGY])
    }

    /// The router's own table (its `/table` admin endpoint).
    async fn router_table(&self) -> Value {
        serde_json::from_str(&http_get(&self.router_admin(), "/table").await).unwrap()
    }

    async fn wait_router_epoch(&self, epoch: u64) {
        let t0 = Instant::now();
        while self.router_table().await["epoch"].as_u64().unwrap_or(0) < epoch {
            assert!(
                t0.elapsed() < WAIT,
                "router never took routing epoch {epoch}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts an operator the way the chart's Deployment runs it, as its ServiceAccount.
    fn start_operator(&mut self) {
        self.start_operator_with(&[]);
    }

    /// The same, with extra environment (e.g. a failpoint).
    fn start_operator_with(&mut self, extra: &[(&str, &str)]) {
        let dep = self.get(&["deployment", &format!("{RELEASE}-operator")]);
        let n = self.operators.len() + 1;
        let ip = format!("127.{}.200.{n}", self.net);
        let mut p = Proc::from_deployment(&dep, &ip, &self.ns, self.dir.path(), &self.hosts);
        p.name = format!("operator-{n}");
        p.log = self.dir.path().join(format!("operator-{n}.log"));
        // The operator reaches only the API server (on the host's loopback): it needs its
        // kubeconfig, not the cluster's DNS names.
        p.hosts = None;
        p.env
            .extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        p.start();
        self.operators.push(p);
    }

    /// Waits for a command started in the background (`kubectl cell`, `helm`); it must
    /// succeed.
    async fn wait_success(&self, child: std::process::Child, what: &str) {
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{what}: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.operator_log()
        );
    }

    fn operator_log(&self) -> String {
        self.operators
            .iter()
            .map(|p| format!("---- {} ----\n{}", p.name, p.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    async fn wait_operator_log(&self, n: usize, needle: &str) {
        let log = self.operators[n - 1].log.clone();
        wait_for(&format!("operator {n} to log {needle:?}"), || {
            std::fs::read_to_string(&log)
                .ok()?
                .contains(needle)
                .then_some(())
        })
        .await;
    }

    /// Starts the router and every cell colour with replicas, from their Deployments.
    async fn start_data_plane(&mut self) {
        let dep = self.get(&["deployment", &format!("{RELEASE}-router")]);
        let mut r = Proc::from_deployment(
            &dep,
            &self.router_ip(),
            &self.ns,
            self.dir.path(),
            &self.hosts,
        );
        r.start();
        wait_listening(&r, 7400).await;
        self.router = Some(r);
        let deps = self.get(&["deployments", "-l", &format!("ldc.dev/topology={TOPOLOGY}")]);
        for d in deps["items"].as_array().unwrap() {
            let labels = &d["metadata"]["labels"];
            let cell = labels["ldc.dev/cell"].as_str().unwrap().to_string();
            let colour = match labels["ldc.dev/colour"].as_str().unwrap() {
                "blue" => "blue",
                _ => "green",
            };
            if d["spec"]["replicas"].as_i64().unwrap_or(0) == 0 {
                continue;
            }
            let index = CELLS.iter().position(|(c, _)| *c == cell).unwrap();
            let ip = self.cell_ip(index, colour);
            let mut p = Proc::from_deployment(d, &ip, &self.ns, self.dir.path(), &self.hosts);
            p.start();
            self.cells.insert((cell, colour), p);
        }
        assert_eq!(self.cells.len(), 12, "a blue and a green process per cell");
        for p in self.cells.values() {
            wait_listening(p, 7500).await;
        }
    }

    fn kill_cell(&mut self, cell: &str) {
        for ((c, _), p) in self.cells.iter_mut() {
            if c == cell {
                p.kill();
            }
        }
    }

    async fn restart_cell(&mut self, cell: &str) {
        for ((c, _), p) in self.cells.iter_mut() {
            if c == cell {
                p.start();
            }
        }
        for ((c, _), p) in self.cells.iter() {
            if c == cell {
                wait_listening(p, 7500).await;
            }
        }
    }

    /// What a kubelet reports when a cell's processes die or come back: its pods' Ready.
    fn set_pods_ready(&self, cell: &str, ready: bool) {
        let pods = self.get(&["pods", "-l", &format!("ldc.dev/cell={cell}")]);
        let items = pods["items"].as_array().unwrap();
        assert!(!items.is_empty(), "cell {cell} has no pods");
        let status = if ready { "True" } else { "False" };
        let patch = json!({"status": {"conditions": [
            {"type": "Ready", "status": status, "reason": "E2eKubelet"},
            {"type": "ContainersReady", "status": status, "reason": "E2eKubelet"},
        ]}})
        .to_string();
        for p in items {
            let name = p["metadata"]["name"].as_str().unwrap();
            let (ok, _, err) = self.kubectl(&[
                "patch",
                "pod",
                name,
                "--subresource=status",
                "--type=strategic",
                "-p",
                &patch,
            ]);
            assert!(ok, "patch pod {name} status: {err}");
        }
    }

    /// Waits until the operator counts `n` ready cells.
    async fn wait_cells_ready(&self, n: u64) {
        wait_for(&format!("{n} cells ready"), || {
            (self.topology()["status"]["cellsReady"].as_u64() == Some(n)).then_some(())
        })
        .await;
    }

    fn settle(&self) -> Value {
        let store = self.store();
        wait_settled_store(
            &["--store".as_ref(), store.as_os_str()],
            Duration::from_secs(60),
        )
    }

    fn users_of(&self, users: &[String], pred: impl Fn(&str) -> bool) -> HashSet<String> {
        let t = self.table().expect("routing table");
        users
            .iter()
            .filter(|u| {
                let s = ldc_core::shard::shard_of(u, SHARDS) as usize;
                pred(&t.shards[s].cell)
            })
            .cloned()
            .collect()
    }

    /// Starts a scenario: continuous payments, running before anything changes.
    async fn begin(&self, name: &'static str, c: &Client, users: &[String]) -> Scenario {
        let load = Load::start_tagged(c, users, WORKERS, &format!("{}-", self.rows.len()));
        load.wait_progress(20, WAIT).await;
        Scenario {
            name,
            load,
            started: Instant::now(),
            fault: None,
            op: None,
        }
    }

    /// Ends a scenario: waits until every affected user paid again, stops the load,
    /// verifies exactly-once over everything so far and records a row of the table.
    async fn finish(&mut self, s: Scenario, c: &Client, users: &[String], all: &mut Vec<Acked>) {
        s.load.wait_progress(40, WAIT).await;
        if let Some((at, affected)) = &s.fault {
            s.load.wait_recovered(affected, *at, WAIT).await;
        }
        let r = s.load.stop().await;
        let row = Row {
            scenario: s.name,
            seconds: s.started.elapsed().as_secs_f64(),
            op: s.op,
            acked: r.acked.len(),
            failed_attempts: r.failed_attempts.len(),
            failed_payments: r.failed_payments,
            recovery: s
                .fault
                .as_ref()
                .map(|(at, affected)| recovery(&r.acked, affected, *at)),
        };
        eprintln!("{}", format_row(&row));
        assert_eq!(
            r.failed_payments, 0,
            "{}: payments were never acknowledged",
            s.name
        );
        let fresh = all.len();
        all.extend(r.acked);
        verify(&|| self.settle(), c, users, all, fresh).await;
        self.rows.push(row);
    }
}

type Client = ldc_core::proto::payments_client::PaymentsClient<tonic::transport::Channel>;

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.operator_log());
            if let Some(r) = &self.router {
                eprintln!("---- router ----\n{}", r.log_tail());
            }
        }
        self.cells.clear();
        self.router = None;
        self.operators.clear();
        // Best effort: e2e/run.sh tears the whole cluster down anyway.
        let _ = Command::new("kubectl")
            .args(["delete", "namespace", &self.ns, "--wait=false"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Between two published tables, exactly `from`'s shards moved, to `to`, each epoch +1.
fn assert_only_moved(before: &RoutingTable, after: &RoutingTable, from: &str, to: &str) {
    for (s, (b, a)) in before.shards.iter().zip(&after.shards).enumerate() {
        if b.cell == from {
            assert_eq!((a.cell.as_str(), a.epoch), (to, b.epoch + 1), "shard {s}");
        } else {
            assert_eq!((&a.cell, a.epoch), (&b.cell, b.epoch), "shard {s} moved");
        }
    }
}

fn format_row(r: &Row) -> String {
    let secs = |d: Duration| format!("{:.2}", d.as_secs_f64());
    let (users, median, max) = match r.recovery {
        Some(rec) => (
            format!("{}/{}", rec.recovered, rec.users),
            secs(rec.median),
            secs(rec.max),
        ),
        None => ("-".into(), "-".into(), "-".into()),
    };
    format_cells([
        r.scenario,
        &format!("{:.1}", r.seconds),
        &r.op.map_or("-".into(), secs),
        &r.acked.to_string(),
        &r.failed_attempts.to_string(),
        &r.failed_payments.to_string(),
        &users,
        &median,
        &max,
    ])
}

/// A copy of the test's kubeconfig whose user impersonates `user`.
fn impersonating_kubeconfig(dir: &Path, user: &str) -> PathBuf {
    let src = std::env::var("KUBECONFIG").expect("KUBECONFIG (run e2e/run.sh)");
    let mut v: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    for u in v["users"].as_sequence_mut().expect("users") {
        u["user"]["as"] = serde_yaml::Value::String(user.into());
    }
    let p = dir.join(format!("{}.kubeconfig", user.replace(':', "-")));
    std::fs::write(&p, serde_yaml::to_string(&v).unwrap()).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: e2e/run.sh"]
async fn payments_through_the_router_survive_every_operation() {
    let (_, uid, _) = output(
        {
            let mut c = Command::new("id");
            c.arg("-u");
            c
        },
        "id -u",
    );
    assert_eq!(
        uid.trim(),
        "0",
        "the e2e data plane bind-mounts a hosts file in its own mount namespace: run as root"
    );
    let mut w = World::new();
    let (ok, _, err) = w.kubectl(&["create", "namespace", &w.ns.clone()]);
    assert!(ok, "create namespace: {err}");

    // ---- helm install: CRDs established, topology Ready.
    let t0 = Instant::now();
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/ldc");
    let store = format!("store.spec={}", w.store().display());
    let values = [
        "--set",
        &store,
        "--set",
        "store.hostPath=",
        "--set",
        &format!("topology.shardCount={SHARDS}"),
        "--set",
        "topology.failover.automatic=false",
        "--set",
        "topology.replicas.blue=1",
        "--set",
        "topology.replicas.green=1",
        "--set",
        "router.replicas=1",
        // Routers watch the operator's ConfigMap (the store source has the local tests).
        "--set",
        "router.tableSource=kubernetes",
        "--set",
        "operator.leaseSeconds=4",
    ];
    let mut install = vec!["install", RELEASE, chart, "--wait", "--timeout", "180s"];
    install.extend_from_slice(&values);
    let (ok, out, err) = w.helm(&install);
    assert!(ok, "helm install: {out}{err}");
    assert!(
        out.contains("kubectl cell"),
        "NOTES.txt tells what to do next: {out}"
    );
    for crd in ["topologies.ldc.dev", "cells.ldc.dev"] {
        let (ok, _, err) = w.kubectl(&[
            "wait",
            "--for=condition=Established",
            &format!("crd/{crd}"),
            "--timeout=60s",
        ]);
        assert!(ok, "CRD {crd} not established: {err}");
    }
    w.start_operator();
    w.wait_operator_log(1, "READY").await;
    wait_for("topology Ready", || {
        let t = w.topology();
        let ready = t["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        (ready && t["status"]["routingEpoch"].as_u64()? >= 1).then_some(())
    })
    .await;
    w.start_data_plane().await;
    let installed = t0.elapsed();

    // ---- users on every serving cell, funded through the router.
    // The pod IP stands for the router's Service, whose name its certificate carries.
    let c = client_named(
        &w.client_data(),
        &w.router_addr(),
        &format!("{RELEASE}-router"),
        ldc_security::platform::CLI,
    );
    let users: Vec<String> = (0..48).map(|i| format!("pay-{i}")).collect();
    for cell in ["r1-a", "r1-b", "r2-a", "r2-b"] {
        assert!(
            w.users_of(&users, |c| c == cell).len() >= 3,
            "too few test users on {cell}; pick other names"
        );
    }
    fund(&c, &users).await;
    let mut all: Vec<Acked> = Vec::new();
    eprintln!(
        "platform installed and serving after {:.1}s; scenarios:\n{}",
        installed.as_secs_f64(),
        format_cells(HEADER)
    );

    // ---- 0. one product: `kubectl cell` and `ldc cell` print the same JSON for the same
    // state (status, a dry run of each move, a traffic change).
    w.same_json_on_both_front_ends(
        "mirror",
        &[
            &["status"],
            &["failover", "r1-a", "--dry-run"],
            &["switchover", "r1-a", "--to", "r1-s", "--dry-run"],
            &["dr", "cutover", "--from", "r2", "--dry-run"],
            &["traffic-shift", "r1-a", "--green", "10", "--dry-run"],
            &["traffic-shift", "r2-b", "--pause", "--dry-run"],
            &["route", "alice", "bob", "carol", "dave", "erin"],
        ],
    );

    // ---- 1. a release of r1-a: 10%, pause (a shift is refused), resume, 100%, undo (back
    // to 10%), abort. No request may fail; every change is in the cell's audit trail.
    let mut sc = w
        .begin("release r1-a: next→pause→100%→undo→abort", &c, &users)
        .await;
    let green_metrics = w.cells[&("r1-a".to_string(), "green")].addr(9100);
    let green_served = || async {
        counter(
            &http_get(&green_metrics, "/metrics").await,
            "ldc_cell_requests_total",
            &[],
        )
    };
    let green_before = green_served().await;
    let t0 = Instant::now();
    // The release's steps live on the Cell; the API server refuses steps out of order.
    let set_steps = |steps: &str| {
        let patch = format!(r#"{{"spec":{{"traffic":{{"steps":{steps}}}}}}}"#);
        w.kubectl(&["patch", "cell", "r1-a", "--type=merge", "-p", &patch])
    };
    let (ok, _, err) = set_steps("[5000,1000]");
    assert!(!ok && err.contains("strictly increasing"), "{err}");
    let (ok, _, err) = set_steps("[1000,10000]");
    assert!(ok, "{err}");
    for (args, bp) in [
        (&["--next"][..], 1000u64),
        (&["--pause"][..], 1000),
        (&["--resume"][..], 1000),
        (&["--green", "100"][..], 10_000),
        (&["--undo"][..], 1000),
        (&["--abort"][..], 0),
    ] {
        let mut a = vec!["traffic-shift", "r1-a"];
        a.extend_from_slice(args);
        w.kubectl_cell(&a);
        if args == ["--pause"] {
            // Paused: a shift is refused with what to do, and nothing changes.
            let (ok, out, err) = output(
                w.kubectl_cell_command(&["traffic-shift", "r1-a", "--green", "50"]),
                "kubectl cell",
            );
            assert!(!ok, "a shift of a paused release went through: {out}");
            assert!(err.contains("paused") && err.contains("--resume"), "{err}");
            let cell = w.get(&["cell", "r1-a"]);
            assert_eq!(cell["spec"]["traffic"]["paused"], true);
            assert_eq!(cell["spec"]["traffic"]["greenWeightBp"], 1000);
        }
        let t = w.table().unwrap();
        assert_eq!(u64::from(t.cells["r1-a"].green_weight_bp), bp);
        w.wait_router_epoch(t.epoch).await;
        sc.load.wait_progress(20, WAIT).await;
        if bp == 10_000 {
            assert!(
                green_served().await > green_before,
                "r1-a green served nothing at 100%"
            );
        }
    }
    sc.op = Some(t0.elapsed());
    let trail: Vec<Value> = serde_json::from_str(
        w.get(&["cell", "r1-a"])["metadata"]["annotations"]["ldc.dev/traffic-history"]
            .as_str()
            .expect("the cell carries its traffic audit trail"),
    )
    .unwrap();
    let actions: Vec<&str> = trail
        .iter()
        .map(|c| c["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["shift", "pause", "resume", "shift", "undo", "abort"],
        "{trail:#?}"
    );
    assert!(trail.iter().all(|c| !c["by"].as_str().unwrap().is_empty()));
    let h = w.kubectl_cell(&["history"]);
    assert!(h.contains("undo") && h.contains("r1-a"), "{h}");
    w.finish(sc, &c, &users, &mut all).await;

    // ---- 2. failover of a cell whose processes were killed.
    let affected = w.users_of(&users, |c| c == "r1-b");
    let before = w.table().unwrap();
    let mut sc = w
        .begin("failover r1-b (processes killed)", &c, &users)
        .await;
    w.kill_cell("r1-b");
    let fault = Instant::now();
    w.set_pods_ready("r1-b", false);
    w.kubectl_cell(&["failover", "r1-b"]);
    sc.op = Some(fault.elapsed());
    sc.fault = Some((fault, affected.clone()));
    let after = w.table().unwrap();
    assert_only_moved(&before, &after, "r1-b", "r1-s");
    w.finish(sc, &c, &users, &mut all).await;

    // ---- 3. the cell repaired; switchover back, planned: no request may fail.
    w.restart_cell("r1-b").await;
    w.set_pods_ready("r1-b", true);
    w.wait_cells_ready(6).await;
    let mut sc = w
        .begin("switchover r1-s → r1-b (planned)", &c, &users)
        .await;
    let t0 = Instant::now();
    w.kubectl_cell(&["switchover", "r1-s", "--to", "r1-b"]);
    sc.op = Some(t0.elapsed());
    sc.fault = Some((t0, affected));
    let t = w.table().unwrap();
    assert!(
        t.shards.iter().all(|s| s.cell != "r1-s"),
        "r1-s still owns shards"
    );
    w.finish(sc, &c, &users, &mut all).await;

    // ---- 4. region r2 lost: DR cutover to r1.
    let affected = w.users_of(&users, |c| c.starts_with("r2-"));
    let mut sc = w
        .begin("dr cutover r2 → r1 (region killed)", &c, &users)
        .await;
    for (cell, region) in CELLS {
        if region == "r2" {
            w.kill_cell(cell);
        }
    }
    let fault = Instant::now();
    for (cell, region) in CELLS {
        if region == "r2" {
            w.set_pods_ready(cell, false);
        }
    }
    let before_cutover = w.table().unwrap();
    let out = w.kubectl_cell(&["dr", "cutover", "--from", "r2", "--to", "r1"]);
    assert!(
        out.contains("reverse: `kubectl cell revert") && out.contains("once r2-"),
        "the plan names its reverse, possible once r2 is back: {out}"
    );
    sc.op = Some(fault.elapsed());
    let cutover_id = w.topology()["status"]["history"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|r| r["command"] == "dr cutover --from r2 --to r1")
        .expect("the cutover is in the history")["id"]
        .as_str()
        .unwrap()
        .to_string();
    sc.fault = Some((fault, affected));
    let t = w.table().unwrap();
    assert!(
        t.shards.iter().all(|s| s.cell.starts_with("r1-")),
        "r2 still owns shards"
    );
    w.finish(sc, &c, &users, &mut all).await;

    // ---- 5. region r2 back; failing back (the cutover reverted: r2's shards go home, r1's
    // stay), the operator leader is killed mid-operation.
    for (cell, region) in CELLS {
        if region == "r2" {
            w.restart_cell(cell).await;
            w.set_pods_ready(cell, true);
        }
    }
    w.wait_cells_ready(6).await;
    w.start_operator();
    w.wait_operator_log(2, "another operator leads").await;
    // A revert's dry run reads the same from the move's record on both front-ends.
    w.same_json_on_both_front_ends("mirror-revert", &[&["revert", &cutover_id, "--dry-run"]]);
    let before = w.table().unwrap();
    let mut sc = w
        .begin("revert dr cutover, operator leader killed", &c, &users)
        .await;
    // The leader freezes (SIGSTOP) just before the command, so the operation is certainly
    // in flight when it dies (SIGKILL): the standby must take the Lease and finish it once.
    w.operators[0].signal(nix::sys::signal::Signal::SIGSTOP);
    let mut cmd = w.kubectl_cell_command(&["revert", &cutover_id]);
    let pending = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let op_id = wait_for("the cutover recorded as pending", || {
        w.topology()["status"]["pendingOperation"]["id"]
            .as_str()
            .map(String::from)
    })
    .await;
    assert_eq!(
        w.table().unwrap().epoch,
        before.epoch,
        "a frozen leader acted"
    );
    w.operators[0].kill();
    let fault = Instant::now();
    w.wait_success(pending, "kubectl cell revert with the leader killed")
        .await;
    sc.op = Some(fault.elapsed());
    sc.fault = Some((fault, users.iter().cloned().collect()));
    let after = w.table().unwrap();
    for (s, ((home, b), a)) in before_cutover
        .shards
        .iter()
        .zip(&before.shards)
        .zip(&after.shards)
        .enumerate()
    {
        assert_eq!(a.cell, home.cell, "shard {s} is not back home");
        if home.cell.starts_with("r2-") {
            assert_eq!(a.epoch, b.epoch + 1, "shard {s}: moved back exactly once");
        } else {
            assert_eq!(a.epoch, b.epoch, "shard {s} of r1 moved");
        }
    }
    let history = w.topology()["status"]["history"].clone();
    let records: Vec<&Value> = history
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["id"] == op_id.as_str())
        .collect();
    assert_eq!(
        records.len(),
        1,
        "operation {op_id} recorded once: {history:#}"
    );
    assert_eq!(records[0]["result"], "Succeeded", "{history:#}");
    w.finish(sc, &c, &users, &mut all).await;

    // ---- 6. the operator crashes between fence and publish: the ownership change is
    // committed in the store, the routing table not yet published. The next leader must
    // publish it and record the operation once, without moving anything again.
    w.operators[1].kill();
    w.start_operator_with(&[("LDC_FAILPOINT", "after-fence")]);
    w.wait_operator_log(3, "leading").await;
    let before = w.table().unwrap();
    let affected = w.users_of(&users, |c| c == "r2-a");
    let mut sc = w
        .begin("switchover r2-a → r2-s, crash after fence", &c, &users)
        .await;
    let t0 = Instant::now();
    let pending = w
        .kubectl_cell_command(&["switchover", "r2-a", "--to", "r2-s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let child = w.operators[2].child.as_mut().unwrap();
    let code = wait_for("the operator to hit the failpoint and exit", || {
        child.try_wait().unwrap()
    })
    .await;
    assert_eq!(code.code(), Some(86), "{}", w.operator_log());
    assert_eq!(
        w.table().unwrap().epoch,
        before.epoch,
        "the crashed operator published"
    );
    w.start_operator();
    w.wait_operator_log(4, "leading").await;
    w.wait_success(
        pending,
        "kubectl cell switchover across a crash after the fence",
    )
    .await;
    sc.op = Some(t0.elapsed());
    sc.fault = Some((t0, affected));
    let after = w.table().unwrap();
    assert_only_moved(&before, &after, "r2-a", "r2-s");
    let history = w.topology()["status"]["history"].clone();
    let n = history
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["command"] == "switchover r2-a --to r2-s")
        .count();
    assert_eq!(n, 1, "recorded once: {history:#}");
    w.finish(sc, &c, &users, &mut all).await;

    // ---- The report.
    let mut report = format!(
        "LDC e2e: payments through the router on a real control plane ({} payments, {WORKERS} clients)\n{}\n",
        all.len(),
        format_cells(HEADER)
    );
    for r in &w.rows {
        writeln!(report, "{}", format_row(r)).unwrap();
    }
    report.push_str(
        "secs = the scenario under load; op s = from the command (or the fault) until \
         `kubectl cell` returned with the new routing table published; \
         failed = attempts answered with an error (each retried with its idempotency key); \
         lost = payments never acknowledged; users = affected users that paid again; \
         RTO = seconds from the fault (or command) to an affected user's first successful \
         payment begun after it.\n",
    );
    eprintln!("\n{report}");
    let target = Path::new(env!("CARGO_BIN_EXE_ldc"))
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("e2e-report.txt");
    std::fs::write(&target, &report).unwrap();

    // ---- helm upgrade, then helm uninstall leaves nothing behind.
    let mut upgrade = vec!["upgrade", RELEASE, chart, "--wait", "--timeout", "180s"];
    upgrade.extend_from_slice(&values);
    upgrade.extend_from_slice(&["--set", "router.replicas=2"]);
    let epoch = w.table().unwrap().epoch;
    let (ok, out, err) = w.helm(&upgrade);
    assert!(ok, "helm upgrade: {out}{err}");
    let r = w.get(&["deployment", &format!("{RELEASE}-router")]);
    assert_eq!(r["spec"]["replicas"], 2);
    assert_eq!(
        w.table().unwrap().epoch,
        epoch,
        "an upgrade changes no routing"
    );

    // Uninstall: Helm first runs the chart's pre-delete hook, a bare Pod; as the kubelet,
    // run its container (with its own ServiceAccount) and report the pod Succeeded.
    let home = w.dir.path().join("helm");
    let uninstall = Command::new("helm")
        .args([
            "uninstall",
            RELEASE,
            "--wait",
            "--timeout",
            "120s",
            "--namespace",
            &w.ns,
        ])
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let hook = format!("{RELEASE}-teardown");
    let pod = wait_for("the pre-delete hook pod", || {
        let (ok, out, _) = w.kubectl(&["get", "pod", &hook, "-o", "json"]);
        ok.then(|| serde_json::from_str::<Value>(&out).unwrap())
    })
    .await;
    let ip = format!("127.{}.201.1", w.net);
    let mut p = Proc::from_pod_spec(&hook, &pod["spec"], &ip, &w.ns, w.dir.path(), &w.hosts);
    p.hosts = None;
    p.start();
    let (status, log) = tokio::task::spawn_blocking(move || {
        let s = p.child.take().unwrap().wait().unwrap();
        (s, p.log_tail())
    })
    .await
    .unwrap();
    assert!(
        status.success(),
        "teardown hook failed:\n{log}\n{}",
        w.operator_log()
    );
    let (ok, _, err) = w.kubectl(&[
        "patch",
        "pod",
        &hook,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Succeeded"}}"#,
    ]);
    assert!(ok, "report the hook pod Succeeded: {err}");
    w.wait_success(uninstall, "helm uninstall").await;
    let t0 = Instant::now();
    loop {
        let (ok, out, err) = w.kubectl(&[
            "get",
            "topologies,cells,deployments,services,configmaps,serviceaccounts,roles,rolebindings,leases,pods,secrets,networkpolicies,poddisruptionbudgets",
            "-o",
            "name",
        ]);
        let left: Vec<String> = out
            .lines()
            .filter(|l| !matches!(*l, "configmap/kube-root-ca.crt" | "serviceaccount/default"))
            .map(String::from)
            .collect();
        if ok && left.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < WAIT,
            "helm uninstall left behind: {left:?} {err}\n{}",
            w.operator_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
