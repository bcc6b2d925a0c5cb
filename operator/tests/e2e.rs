//! End-to-end tests against a real API server (no mock): `e2e/run.sh` starts a cluster
//! with `e2e/cluster.sh`, exports KUBECONFIG and runs
//! `cargo test -p ldc-operator --test e2e -- --ignored --test-threads=1`.
//!
//! Each test gets its own namespace, its own store file and its own operator process
//! (`target/debug/ldc-operator`), and drives it the way a user would: custom resources,
//! `kubectl-cell`, and (to make a cell fail) a patch of its pods' status, which KWOK leaves
//! alone. Ownership is checked in the store itself, the routing table in the ConfigMap the
//! routers watch. Tests wait for conditions with a deadline; they never sleep blindly.
//!
//! Depth: every test is level 1 (control plane only; no data-plane traffic).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, CustomResourceExt, ResourceExt};
use ldc_core::planner::ShardMap;
use ldc_core::routing::RoutingTable;
use ldc_operator::crd::{
    Cell, CellRole, CellSpec, ColourReplicas, FailoverPolicy, Topology, TopologySpec, Traffic,
};
use ldc_operator::specs;

const WAIT: Duration = Duration::from_secs(60);

async fn client() -> Client {
    Client::try_default()
        .await
        .expect("KUBECONFIG must point at a running cluster (run e2e/run.sh)")
}

/// Polls `f` every 100 ms until it returns Some, or panics after `WAIT` naming `what`.
async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let t0 = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            t0.elapsed() < WAIT,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Installs the CRDs generated from the Rust types (idempotent) and waits until served.
async fn install_crds(c: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(c.clone());
    for crd in [Topology::crd(), Cell::crd()] {
        let name = crd.name_any();
        api.patch(
            &name,
            &PatchParams::apply("ldc-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("apply CRD");
        wait_for(&format!("CRD {name} established"), || async {
            let crd = api.get(&name).await.ok()?;
            crd.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        })
        .await;
    }
}

/// One test's world: namespace, store, operator process.
struct Env {
    client: Client,
    ns: String,
    dir: tempfile::TempDir,
    /// Operator processes, oldest first.
    operators: Vec<Child>,
    generation: u32,
    /// KUBECONFIG for the operator (default: the test's own).
    operator_kubeconfig: Option<PathBuf>,
}

impl Env {
    async fn new(tag: &str) -> Env {
        let client = client().await;
        install_crds(&client).await;
        let ns = format!("e2e-{tag}-{}", std::process::id());
        let nsapi: Api<Namespace> = Api::all(client.clone());
        let mut n = Namespace::default();
        n.metadata.name = Some(ns.clone());
        nsapi
            .create(&PostParams::default(), &n)
            .await
            .expect("create namespace");
        // The namespace's default ServiceAccount must exist before pods can be created.
        let sa: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(client.clone(), &ns);
        wait_for("default ServiceAccount", || async {
            sa.get_opt("default").await.ok().flatten()
        })
        .await;
        Env {
            client,
            ns,
            dir: tempfile::tempdir().expect("tempdir"),
            operators: Vec::new(),
            generation: 0,
            operator_kubeconfig: None,
        }
    }

    fn store_path(&self) -> PathBuf {
        self.dir.path().join("store.db")
    }

    fn log_path(&self, generation: u32) -> PathBuf {
        self.dir.path().join(format!("operator-{generation}.log"))
    }

    /// Starts an operator for this namespace and waits until it leads.
    async fn start_operator(&mut self) {
        self.spawn_operator();
        self.wait_log(self.generation, "READY").await;
    }

    /// Starts one more operator process (it leads only once it holds the Lease).
    fn spawn_operator(&mut self) {
        self.generation += 1;
        let log = self.log_path(self.generation);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ldc-operator"));
        if let Some(k) = &self.operator_kubeconfig {
            cmd.env("KUBECONFIG", k);
        }
        let child = cmd
            .args(["--namespace", &self.ns, "--lease-seconds", "4"])
            // several operators run at once here: each picks a free metrics port
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--identity")
            .arg(format!("e2e-{}", self.generation))
            .env("LDC_LOG", "info,ldc_operator::controller=debug,kube=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start ldc-operator");
        self.operators.push(child);
    }

    /// Waits until operator `generation`'s log contains `needle`.
    async fn wait_log(&self, generation: u32, needle: &str) {
        let log = self.log_path(generation);
        wait_for(
            &format!("operator {generation} to log {needle:?}"),
            || async {
                std::fs::read_to_string(&log)
                    .ok()?
                    .contains(needle)
                    .then_some(())
            },
        )
        .await;
    }

    /// SIGKILLs the oldest operator: a crash, not a clean shutdown.
    fn kill_oldest_operator(&mut self) {
        if !self.operators.is_empty() {
            let mut c = self.operators.remove(0);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The metrics text of operator `generation` (it must have logged READY).
    async fn scrape_metrics(&self, generation: u32) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let log = std::fs::read_to_string(self.log_path(generation)).expect("operator log");
        let addr = log
            .lines()
            .find_map(|l| {
                l.strip_prefix("READY ")?
                    .split(' ')
                    .find_map(|f| f.strip_prefix("metrics="))
            })
            .expect("READY line with metrics=ADDR")
            .to_string();
        let mut s = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect to metrics");
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: operator\r\nconnection: close\r\n\r\n")
            .await
            .expect("send");
        let mut out = String::new();
        tokio::time::timeout(WAIT, s.read_to_string(&mut out))
            .await
            .expect("metrics answered in time")
            .expect("read metrics");
        assert!(out.starts_with("HTTP/1.1 200"), "metrics answer: {out}");
        out
    }

    fn operator_log(&self) -> String {
        (1..=self.generation)
            .map(|g| std::fs::read_to_string(self.log_path(g)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn topology(&self, automatic: bool, delay_s: u32) -> Topology {
        let mut t = Topology::new(
            "prod",
            TopologySpec {
                shard_count: 12,
                regions: vec!["r1".into(), "r2".into()],
                store: self.store_path().display().to_string(),
                redundancy: Default::default(),
                failover: FailoverPolicy {
                    automatic,
                    not_ready_seconds: delay_s,
                    region_cutover: false,
                },
                region_node_label: "topology.kubernetes.io/region".into(),
                router_address: "ldc-router:7400".into(),
            },
        );
        t.metadata.namespace = Some(self.ns.clone());
        t
    }

    fn cell(&self, name: &str, region: &str, role: CellRole) -> Cell {
        let mut c = Cell::new(
            name,
            CellSpec {
                topology: "prod".into(),
                region: region.into(),
                role,
                image: "ldc:e2e".into(),
                images: Default::default(),
                replicas: ColourReplicas { blue: 1, green: 1 },
                traffic: Traffic::default(),
                capacity: None,
            },
        );
        c.metadata.namespace = Some(self.ns.clone());
        c
    }

    /// Topology `prod` with r1-a, r1-s, r2-a, r2-s.
    async fn create_platform(&self, automatic: bool, delay_s: u32) {
        let pp = PostParams::default();
        self.api::<Topology>()
            .create(&pp, &self.topology(automatic, delay_s))
            .await
            .expect("create topology");
        for (n, r, role) in [
            ("r1-a", "r1", CellRole::Serving),
            ("r1-s", "r1", CellRole::Standby),
            ("r2-a", "r2", CellRole::Serving),
            ("r2-s", "r2", CellRole::Standby),
        ] {
            self.api::<Cell>()
                .create(&pp, &self.cell(n, r, role))
                .await
                .expect("create cell");
        }
    }

    async fn table(&self) -> Option<RoutingTable> {
        let cm = self
            .api::<ConfigMap>()
            .get_opt("prod-routing")
            .await
            .ok()??;
        specs::table_from_config_map(&cm)
    }

    async fn wait_table(&self, what: &str, done: impl Fn(&RoutingTable) -> bool) -> RoutingTable {
        wait_for(what, || async { self.table().await.filter(|t| done(t)) }).await
    }

    async fn wait_ready(&self) -> Topology {
        self.wait_ready_named("prod", 4).await
    }

    async fn wait_ready_named(&self, name: &str, cells: u32) -> Topology {
        wait_for("topology Ready with every cell ready", || async {
            let t = self.api::<Topology>().get(name).await.ok()?;
            let st = t.status.clone()?;
            let ready = st
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            (ready && st.cells_ready == cells && st.routing_epoch >= 1).then_some(t)
        })
        .await
    }

    /// Ownership as the store holds it (the fencing records cells check on every write).
    fn store_map(&self) -> ShardMap {
        let store = ldc_store::open(self.store_path().to_str().unwrap()).expect("open store");
        let mut t = store.begin_read().expect("begin");
        let m = ldc_control::load_map(&mut *t, 12).expect("load map");
        t.rollback().expect("rollback");
        m
    }

    fn kubectl_cell(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_kubectl-cell"))
            .args(["-n", &self.ns, "--timeout", "30s"])
            .args(args)
            .output()
            .expect("run kubectl-cell");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Makes every pod of `cell` not ready (KWOK does not undo a status patch).
    async fn fail_pods(&self, cell: &str) {
        let pods = self.api::<Pod>();
        let lp = ListParams::default().labels(&format!("{}={cell}", specs::LABEL_CELL));
        let list = wait_for(&format!("pods of {cell}"), || async {
            let l = pods.list(&lp).await.ok()?;
            (!l.items.is_empty()).then_some(l)
        })
        .await;
        for p in list.items {
            let patch = serde_json::json!({"status": {"conditions": [
                {"type": "Ready", "status": "False", "reason": "E2eFailed"},
                {"type": "ContainersReady", "status": "False", "reason": "E2eFailed"},
            ]}});
            pods.patch_status(
                &p.name_any(),
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
            .expect("patch pod status");
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        while !self.operators.is_empty() {
            self.kill_oldest_operator();
        }
        if std::thread::panicking() {
            eprintln!("---- operator log ----\n{}", self.operator_log());
        }
        // Best effort: the cluster is torn down by run.sh anyway.
        let _ = Command::new("kubectl")
            .args(["delete", "namespace", &self.ns, "--wait=false"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn assert_refused(r: Result<impl std::fmt::Debug, kube::Error>, needle: &str) {
    match r {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 422, "{e:?}");
            assert!(
                e.message.contains(needle),
                "message {:?} lacks {needle:?}",
                e.message
            );
        }
        other => panic!("expected the API server to refuse ({needle}), got {other:?}"),
    }
}

#[tokio::test]
#[ignore = "needs a cluster: e2e/run.sh"]
async fn crds_install_and_reject_invalid_specs() {
    let env = Env::new("crd").await;
    let pp = PostParams::default();
    let topos = env.api::<Topology>();

    let mut t = env.topology(true, 5);
    t.spec.shard_count = 0;
    assert_refused(topos.create(&pp, &t).await, "spec.shardCount");
    let mut t = env.topology(true, 5);
    t.spec.regions = vec!["r1".into(), "r1".into()];
    assert_refused(topos.create(&pp, &t).await, "regions must be unique");
    let mut t = env.topology(true, 5);
    t.spec.regions = vec!["R_1".into()];
    assert_refused(topos.create(&pp, &t).await, "should match");

    topos
        .create(&pp, &env.topology(true, 5))
        .await
        .expect("valid topology");
    let patch = serde_json::json!({"spec": {"shardCount": 13}});
    assert_refused(
        topos
            .patch("prod", &PatchParams::default(), &Patch::Merge(&patch))
            .await,
        "shardCount is immutable",
    );
    let patch = serde_json::json!({"spec": {"store": "/somewhere/else.db"}});
    assert_refused(
        topos
            .patch("prod", &PatchParams::default(), &Patch::Merge(&patch))
            .await,
        "store is immutable",
    );
    // A shard range the operator would have to parse is bounded by the schema: a hostile
    // `movedFrom` (0-4294967295 once asked the parser for 16 GiB) never gets stored.
    let record = |moved: serde_json::Value| {
        serde_json::json!({"status": {"history": [{
            "id": "op-1", "command": "failover r1-a", "result": "Succeeded", "message": "",
            "shardsMoved": 1, "routingEpoch": 2, "movedFrom": moved,
            "requestedBy": "e2e", "finishedAt": "2026-01-01T00:00:00Z"
        }]}})
    };
    let ps = PatchParams::default();
    for (moved, says) in [
        (serde_json::json!({"r1-a": "0-4294967295"}), "should match"),
        (serde_json::json!({"r1-a": "0-24,x"}), "should match"),
        (serde_json::json!({"r1-a": "1,".repeat(40_000)}), "Too long"),
    ] {
        assert_refused(
            topos
                .patch_status("prod", &ps, &Patch::Merge(&record(moved)))
                .await,
            says,
        );
    }
    topos
        .patch_status(
            "prod",
            &ps,
            &Patch::Merge(&record(serde_json::json!({"r1-a": "0-24,30"}))),
        )
        .await
        .expect("a well-formed history record is taken");

    let cells = env.api::<Cell>();
    let mut c = env.cell("r1-a", "r1", CellRole::Serving);
    c.spec.replicas.green = 0;
    c.spec.traffic.green_weight_bp = 500;
    assert_refused(cells.create(&pp, &c).await, "needs replicas.green > 0");
    let mut c = env.cell("r1-a", "r1", CellRole::Serving);
    c.spec.traffic.green_weight_bp = 10_001;
    assert_refused(cells.create(&pp, &c).await, "greenWeightBp");
    let c = env.cell(
        "a-cell-name-that-is-far-too-long-for-a-workload",
        "r1",
        CellRole::Serving,
    );
    assert_refused(cells.create(&pp, &c).await, "at most 40 characters");

    cells
        .create(&pp, &env.cell("r1-a", "r1", CellRole::Serving))
        .await
        .expect("valid cell");
    let patch = serde_json::json!({"spec": {"region": "r2"}});
    assert_refused(
        cells
            .patch("r1-a", &PatchParams::default(), &Patch::Merge(&patch))
            .await,
        "region is immutable",
    );
}

#[tokio::test]
#[ignore = "needs a cluster: e2e/run.sh"]
async fn reconcile_creates_workloads_status_and_routing_table() {
    let mut env = Env::new("reconcile").await;
    env.create_platform(false, 5).await;
    env.start_operator().await;
    let topo = env.wait_ready().await;

    let deps = env
        .api::<Deployment>()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    let mut names: Vec<String> = deps.iter().map(|d| d.name_any()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "r1-a-blue",
            "r1-a-green",
            "r1-s-blue",
            "r1-s-green",
            "r2-a-blue",
            "r2-a-green",
            "r2-s-blue",
            "r2-s-green"
        ]
    );
    for d in &deps {
        let owner = &d.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("Cell", Some(true))
        );
    }
    let svcs = env
        .api::<Service>()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    assert_eq!(svcs.len(), 8);

    let st = topo.status.unwrap();
    assert_eq!(st.routing_epoch, 1);
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "NPlusOne" && c.status == "True")
    );
    let table = env
        .wait_table("routing table epoch 1", |t| t.epoch == 1)
        .await;
    assert_eq!(table.shards.len(), 12);
    assert_eq!(table.shards[0].cell, "r1-a");
    assert_eq!(
        table.cells["r2-s"].blue,
        [format!("r2-s-blue.{}.svc:7500", env.ns)]
    );

    // The store was created with the initial map at epoch 1.
    let map = env.store_map();
    assert_eq!(map.owned_by("r1-a"), (0..6).collect::<Vec<_>>());
    assert!(map.owners.iter().all(|o| o.epoch == 1));

    let cell = env.api::<Cell>().get("r1-a").await.unwrap();
    let cst = cell.status.unwrap();
    assert_eq!(
        (cst.role.as_str(), cst.shards, cst.shard_ranges.as_str()),
        ("serving", 6, "0-5")
    );
    assert!(
        cell.metadata
            .finalizers
            .unwrap()
            .contains(&"ldc.dev/owns-shards".to_string())
    );

    // A traffic shift through the plugin reaches the published table.
    let (ok, out, err) = env.kubectl_cell(&["traffic-shift", "r1-a", "--green", "25"]);
    assert!(ok, "{out}{err}");
    let t = env
        .wait_table("green weight 2500", |t| {
            t.cells["r1-a"].green_weight_bp == 2500
        })
        .await;
    assert_eq!(t.epoch, 2);

    // `status --watch` prints the status, then again (with the time) when it changes.
    let path = std::env::temp_dir().join(format!("ldc-watch-{}-{}", std::process::id(), env.ns));
    let mut watch = Command::new(env!("CARGO_BIN_EXE_kubectl-cell"))
        .args(["-n", &env.ns, "status", "--watch"])
        .stdout(std::fs::File::create(&path).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let read = || std::fs::read_to_string(&path).unwrap_or_default();
    wait_for("the watch to print the status", || async {
        let s = read();
        (s.contains("r1-a") && s.contains("25%")).then_some(())
    })
    .await;
    let (ok, out, err) = env.kubectl_cell(&["traffic-shift", "r1-a", "--green", "50"]);
    assert!(ok, "{out}{err}");
    wait_for("the watch to print the change", || async {
        let s = read();
        (s.matches("\n--- ").count() + usize::from(s.starts_with("--- ")) >= 2 && s.contains("50%"))
            .then_some(())
    })
    .await;
    let _ = watch.kill();
    let _ = watch.wait();
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
#[ignore = "needs a cluster: e2e/run.sh"]
async fn kubectl_cell_failover_fences_in_store_then_routes() {
    let mut env = Env::new("failover").await;
    env.create_platform(false, 5).await;
    env.start_operator().await;
    env.wait_ready().await;
    env.wait_table("routing table", |t| t.epoch == 1).await;
    // A router's table, fed by the Kubernetes source (ldc-router feature `kube`).
    let router_table = ldc_router::TableHandle::new();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (client, ns, rt) = (env.client.clone(), env.ns.clone(), router_table.clone());
    tokio::spawn(async move {
        let stop = async move {
            let _ = stop_rx.await;
        };
        ldc_router::kube_source::watch_config_map(client, &ns, "prod-routing", rt, stop).await
    });
    let t = router_table.wait_for(WAIT, |t| t.epoch == 1).await;
    assert_eq!(
        t.map(|t| t.epoch),
        Some(1),
        "router took the published table"
    );
    assert_eq!(specs::TABLE_KEY, ldc_router::kube_source::TABLE_KEY);
    assert_eq!(specs::SIGNATURE_KEY, ldc_router::kube_source::SIGNATURE_KEY);

    let (ok, out, err) = env.kubectl_cell(&["failover", "r1-a", "--dry-run"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("dry run") && out.contains("r1-a -> r1-s: 6 shards [0-5]"),
        "{out}"
    );
    assert!(
        env.store_map().owners.iter().all(|o| o.epoch == 1),
        "dry run changed nothing"
    );

    let (ok, out, err) = env.kubectl_cell(&["failover", "r1-a"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("routing epoch 1 -> 2"), "{out}");
    let t = router_table.wait_for(WAIT, |t| t.epoch == 2).await.unwrap();
    assert_eq!(
        (t.shards[0].cell.as_str(), t.shards[0].epoch),
        ("r1-s", 2),
        "the router follows"
    );
    let _ = stop_tx.send(());

    // Fence: the store moved the shards with epoch + 1 ...
    let map = env.store_map();
    assert_eq!(map.owned_by("r1-s"), (0..6).collect::<Vec<_>>());
    assert!(
        map.owned_by("r1-s")
            .iter()
            .all(|s| map.owners[*s as usize].epoch == 2)
    );
    assert!(
        map.owned_by("r2-a")
            .iter()
            .all(|s| map.owners[*s as usize].epoch == 1)
    );
    // ... and the published table carries the same owners and epochs.
    let t = env.wait_table("table epoch 2", |t| t.epoch == 2).await;
    for (i, o) in map.owners.iter().enumerate() {
        assert_eq!((&t.shards[i].cell, t.shards[i].epoch), (&o.cell, o.epoch));
    }
    let topo = env.api::<Topology>().get("prod").await.unwrap();
    let st = topo.status.unwrap();
    assert!(st.pending_operation.is_none());
    let h = st.history.last().unwrap();
    assert_eq!(
        (
            h.command.as_str(),
            h.result.as_str(),
            h.shards_moved,
            h.routing_epoch
        ),
        ("failover r1-a", "Succeeded", 6, 2)
    );
    let c = wait_for("r1-s status serving", || async {
        let c = env.api::<Cell>().get("r1-s").await.ok()?;
        (c.status.as_ref()?.role == "serving").then_some(c)
    })
    .await;
    assert_eq!(c.status.unwrap().epochs, "2");

    // A refused plan is reported, not applied: r1-a owns nothing now.
    let (ok, _, err) = env.kubectl_cell(&["failover", "r1-a"]);
    assert!(!ok && err.contains("owns no shard"), "{err}");

    // A serving cell cannot be deleted while it owns shards; after a switchover it goes.
    env.api::<Cell>()
        .delete("r2-a", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        env.api::<Cell>().get_opt("r2-a").await.unwrap().is_some(),
        "kept: owns shards"
    );
    let (ok, out, err) = env.kubectl_cell(&["switchover", "r2-a", "--to", "r2-s"]);
    assert!(ok, "{out}{err}");
    wait_for("r2-a deleted once it owns nothing", || async {
        env.api::<Cell>()
            .get_opt("r2-a")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(
        env.store_map().owned_by("r2-s"),
        (6..12).collect::<Vec<_>>()
    );
    let (ok, out, err) = env.kubectl_cell(&["history"]);
    assert!(
        ok && out.contains("switchover r2-a --to r2-s"),
        "{out}{err}"
    );

    // Disaster recovery: region r2 moves to r1 (dry run first, then for real).
    let (ok, out, err) = env.kubectl_cell(&["dr", "cutover", "--from", "r2", "--dry-run"]);
    assert!(
        ok && out.contains("dry run") && out.contains("6 shards [6-11]"),
        "{out}{err}"
    );
    let (ok, out, err) = env.kubectl_cell(&["dr", "cutover", "--from", "r2", "--to", "r1"]);
    assert!(ok, "{out}{err}");
    let map = env.store_map();
    assert!(map.owned_by("r2-s").is_empty());
    assert!((6..12).all(|s| map.owners[s].epoch == 3 && map.owners[s].cell.starts_with("r1-")));
    let t = env.table().await.unwrap();
    assert!(
        (6..12).all(|s| t.shards[s].epoch == 3),
        "published with the store's epochs"
    );
}

#[tokio::test]
#[ignore = "needs a cluster: e2e/run.sh"]
async fn not_ready_pods_fail_over_automatically_after_the_delay() {
    let mut env = Env::new("auto").await;
    env.create_platform(true, 2).await;
    env.start_operator().await;
    env.wait_ready().await;
    env.wait_table("routing table", |t| t.epoch == 1).await;

    let t0 = Instant::now();
    env.fail_pods("r2-a").await;
    let t = env
        .wait_table("r2-a's shards routed to r2-s", |t| {
            t.shards[6].cell == "r2-s"
        })
        .await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "failed over before the delay: {took:?}"
    );
    assert_eq!(t.epoch, 2);
    let map = env.store_map();
    assert_eq!(map.owned_by("r2-s"), (6..12).collect::<Vec<_>>());
    assert!(
        map.owned_by("r2-s")
            .iter()
            .all(|s| map.owners[*s as usize].epoch == 2)
    );
    assert_eq!(
        map.owned_by("r1-a"),
        (0..6).collect::<Vec<_>>(),
        "other region untouched"
    );
    let topo = wait_for("auto failover in history and N+1 reported", || async {
        let t = env.api::<Topology>().get("prod").await.ok()?;
        let st = t.status.as_ref()?;
        let np = st
            .conditions
            .iter()
            .any(|c| c.type_ == "NPlusOne" && c.status == "False");
        (np && st
            .history
            .iter()
            .any(|h| h.id.starts_with("auto-failover-r2-a")))
        .then_some(t)
    })
    .await;
    eprintln!(
        "automatic failover took {took:?}; history: {:?}",
        topo.status.unwrap().history
    );

    // The operator's metrics tell the same story.
    let text = env.scrape_metrics(env.generation).await;
    for want in [
        "ldc_operator_is_leader 1",
        "ldc_operator_operations_total{kind=\"auto-failover\",result=\"Succeeded\"} 1",
        "ldc_operator_shards_moved_total{kind=\"auto-failover\"} 6",
        "ldc_operator_routing_epoch{topology=\"prod\"} 2",
        "ldc_operator_cell_shards{cell=\"r2-s\",topology=\"prod\"} 6",
        "ldc_operator_failover_delay_seconds_count 1",
    ] {
        assert!(
            text.contains(&format!("{want}\n")),
            "missing {want} in\n{text}"
        );
    }

    // Now the standby fails too: region r2 is down as a whole. Without the opt-in nothing
    // moves (there is no cell left in r2) and the operator says it is blocked.
    env.fail_pods("r2-s").await;
    wait_for("FailoverBlocked reported", || async {
        let t = env.api::<Topology>().get("prod").await.ok()?;
        t.status?
            .conditions
            .iter()
            .any(|c| c.type_ == "FailoverBlocked" && c.status == "True")
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        env.table().await.unwrap().epoch,
        2,
        "moved without the opt-in"
    );
    // With it, region r2 is cut over to r1 on its own, every shard's epoch +1.
    let patch = serde_json::json!({"spec": {"failover": {"regionCutover": true}}});
    env.api::<Topology>()
        .patch("prod", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let t = env
        .wait_table("r2's shards routed to r1", |t| {
            (6..12).all(|s| t.shards[s].cell.starts_with("r1-"))
        })
        .await;
    assert_eq!(t.epoch, 3);
    assert!((6..12).all(|s| t.shards[s].epoch == 3));
    assert!((0..6).all(|s| t.shards[s].cell == "r1-a" && t.shards[s].epoch == 1));
    wait_for("automatic region cutover in history", || async {
        let t = env.api::<Topology>().get("prod").await.ok()?;
        t.status?
            .history
            .iter()
            .any(|h| h.id.starts_with("auto-dr-cutover-r2") && h.result == "Succeeded")
            .then_some(())
    })
    .await;
    let text = env.scrape_metrics(env.generation).await;
    let want = "ldc_operator_operations_total{kind=\"auto-dr-cutover\",result=\"Succeeded\"} 1\n";
    assert!(text.contains(want), "missing {want} in\n{text}");
}

#[tokio::test]
#[ignore = "needs a cluster: e2e/run.sh"]
async fn operator_restart_is_idempotent() {
    let mut env = Env::new("restart").await;
    env.create_platform(false, 5).await;
    env.start_operator().await;
    env.wait_ready().await;
    let (ok, out, err) = env.kubectl_cell(&["failover", "r1-a"]);
    assert!(ok, "{out}{err}");
    env.wait_table("table epoch 2", |t| t.epoch == 2).await;

    let snapshot = |env: &Env| {
        let (c, d, t) = (
            env.api::<ConfigMap>(),
            env.api::<Deployment>(),
            env.api::<Topology>(),
        );
        async move {
            let cm = c.get("prod-routing").await.unwrap();
            let mut deps: Vec<(String, String)> = d
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .iter()
                .map(|d| (d.name_any(), d.metadata.generation.unwrap_or(0).to_string()))
                .collect();
            deps.sort();
            let topo = t.get("prod").await.unwrap();
            (cm.resource_version(), deps, topo.status.unwrap().history)
        }
    };
    let before = snapshot(&env).await;
    let map_before = env.store_map();

    // Leader election: a second operator waits while the first holds the Lease ...
    env.spawn_operator();
    env.wait_log(2, "another operator leads").await;
    // ... and takes over when the first crashes, then reconciles everything once more.
    env.kill_oldest_operator();
    env.wait_log(2, "READY").await;
    env.wait_log(2, "reconciled").await;

    let after = snapshot(&env).await;
    assert_eq!(
        after, before,
        "routing ConfigMap, Deployments and history untouched"
    );
    assert_eq!(env.store_map(), map_before, "no ownership change");
    assert_eq!(env.table().await.unwrap().epoch, 2, "no new routing epoch");
    assert!(
        !env.operator_log().contains("ERROR"),
        "{}",
        env.operator_log()
    );
}

/// A copy of the test's kubeconfig whose user impersonates `user`.
fn impersonating_kubeconfig(dir: &std::path::Path, user: &str) -> PathBuf {
    let src = std::env::var("KUBECONFIG").expect("KUBECONFIG");
    let mut v: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    for u in v["users"].as_sequence_mut().expect("users") {
        u["user"]["as"] = serde_yaml::Value::String(user.into());
    }
    let p = dir.join("impersonating.kubeconfig");
    std::fs::write(&p, serde_yaml::to_string(&v).unwrap()).unwrap();
    p
}

#[tokio::test]
#[ignore = "needs a cluster: e2e/run.sh"]
async fn helm_chart_installs_and_operator_reconciles_with_the_charts_rbac() {
    let mut env = Env::new("chart").await;
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/ldc");
    let helm_home = env.dir.path().join("helm");
    let store = env.store_path();
    let out = Command::new("helm")
        .args([
            "install",
            "rel",
            chart,
            "--namespace",
            &env.ns,
            "--wait",
            "--timeout",
            "120s",
        ])
        .args(["--set", &format!("store.spec={}", store.display())])
        .args([
            "--set",
            "store.hostPath=",
            "--set",
            "topology.shardCount=12",
        ])
        .env("HELM_CONFIG_HOME", helm_home.join("config"))
        .env("HELM_CACHE_HOME", helm_home.join("cache"))
        .env("HELM_DATA_HOME", helm_home.join("data"))
        .output()
        .expect("run helm (e2e/run.sh puts it on PATH)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("kubectl cell -n"),
        "NOTES.txt printed: {stdout}"
    );

    // Run the operator as the chart's ServiceAccount: its Role must be enough.
    let sa = format!("system:serviceaccount:{}:rel-operator", env.ns);
    env.operator_kubeconfig = Some(impersonating_kubeconfig(env.dir.path(), &sa));
    env.start_operator().await;
    env.wait_ready_named("ldc", 6).await;
    let deps = env
        .api::<Deployment>()
        .list(&ListParams::default().labels("ldc.dev/topology=ldc"))
        .await
        .unwrap();
    assert_eq!(deps.items.len(), 12, "blue and green for 6 cells");
    let cm = env.api::<ConfigMap>().get("ldc-routing").await.unwrap();
    let table = specs::table_from_config_map(&cm).unwrap();
    assert_eq!((table.epoch, table.shards.len()), (1, 12));
    assert_eq!(table.cells.len(), 6);
    let log = env.operator_log();
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "RBAC refused something:\n{log}"
    );
    // Events were recorded (events.k8s.io is in the Role).
    let evs: Api<k8s_openapi::api::events::v1::Event> = env.api();
    let evs = evs.list(&ListParams::default()).await.unwrap();
    assert!(
        evs.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("RoutingPublished"))
    );
}
