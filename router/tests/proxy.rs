//! The router end to end: a real `serve` in front of small tonic backends, with security
//! on: clients reach the router over TLS with a certificate or a token of a real platform
//! CA (made once per test binary in a temp dir), the router reaches each backend over
//! mutual TLS and checks the backend holds the certificate of the cell the table names.
//!
//! `EchoCell` is a test double for a payment cell: it implements only `GetBalance`, answers
//! with its own name in `Account.cell` (so a test sees which backend served), and can be
//! told to answer "moved", fail, or stall. Each backend runs on its own tokio runtime so a
//! test can kill it outright (every socket closes, as when a pod dies).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ldc_core::proto::payments_client::PaymentsClient;
use ldc_core::proto::payments_server::{Payments, PaymentsServer};
use ldc_core::proto::{self, GetBalanceRequest};
use ldc_core::routing::{
    BP_MAX, CellRoute, RoutingTable, SIGNATURE_KEY, STORE_KEY, ShardRoute, colour_for,
};
use ldc_core::shard::shard_of;
use ldc_router::{EdgeSecurity, Listeners, RouterConfig, TableHandle};
use ldc_security::Identity;
use ldc_security::pki::{Leaf, Pki};
use ldc_security::platform;
use ldc_security::tls::ClientAuth;
use ldc_security::token::{TokenIssuer, TokenVerifier};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

const SHARDS: u32 = 100;

// ---------------------------------------------------------------------------------------
// The platform CA of this test binary.

/// Cell names the tables of these tests use.
const CELLS: [&str; 2] = ["A", "B"];

fn pki() -> &'static Pki {
    static PKI: std::sync::OnceLock<(tempfile::TempDir, Pki)> = std::sync::OnceLock::new();
    &PKI.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let mut leaves = platform::local_leaves(CELLS);
        for (name, principal) in [
            (
                "alice",
                ldc_core::authz::Principal::user("alice", [ldc_core::authz::Scope::Read]),
            ),
            (
                "reports",
                ldc_core::authz::Principal::service("reports", [ldc_core::authz::Scope::Read]),
            ),
        ] {
            leaves.push(Leaf {
                name: name.into(),
                identity: Identity::Client(principal),
                hosts: vec![],
            });
        }
        pki.ensure(&leaves).unwrap();
        (dir, pki)
    })
    .1
}

fn issuer() -> TokenIssuer {
    TokenIssuer::from_pem_file(&pki().token_key_path()).unwrap()
}

fn edge_security() -> EdgeSecurity {
    let p = pki();
    EdgeSecurity::Tls {
        server: platform::server(
            p.files(platform::ROUTER),
            ClientAuth::Optional,
            &prometheus::Registry::new(),
            "router",
        )
        .unwrap(),
        upstream: platform::client(p.files(platform::ROUTER)).unwrap(),
        tokens: Some(Arc::new(
            TokenVerifier::from_pem_files(&[p.token_public_path()]).unwrap(),
        )),
    }
}

fn is_router(id: &Identity) -> bool {
    matches!(id, Identity::Router)
}

/// A TLS channel to the router presenting certificate `leaf` (or none).
fn channel_to(addr: SocketAddr, leaf: Option<&str>) -> Channel {
    let cfg = match leaf {
        Some(l) => platform::client(pki().files(l)).unwrap(),
        None => ldc_security::tls::Reloading::fixed(
            ldc_security::tls::anonymous_client_config(&pki().ca_path()).unwrap(),
        ),
    };
    ldc_security::net::channel(
        &addr.to_string(),
        cfg,
        is_router,
        Duration::from_secs(2),
        Duration::from_secs(10),
    )
    .unwrap()
}

// ---------------------------------------------------------------------------------------
// EchoCell: the test double for a cell.

#[derive(Debug, Clone)]
enum Behaviour {
    Serve,
    Moved { owner: String, epoch: u64 },
    Fail(Code),
    Stall(Duration),
}

struct EchoCell {
    name: String,
    calls: Arc<AtomicUsize>,
    behaviour: Arc<Mutex<Behaviour>>,
    request_ids: Arc<Mutex<Vec<String>>>,
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("EchoCell only implements GetBalance"))
}

#[tonic::async_trait]
impl Payments for EchoCell {
    async fn open_account(
        &self,
        _: Request<proto::OpenAccountRequest>,
    ) -> Result<Response<proto::Account>, Status> {
        unimplemented()
    }
    async fn top_up(
        &self,
        _: Request<proto::TopUpRequest>,
    ) -> Result<Response<proto::Payment>, Status> {
        unimplemented()
    }
    async fn withdraw(
        &self,
        _: Request<proto::WithdrawRequest>,
    ) -> Result<Response<proto::Payment>, Status> {
        unimplemented()
    }
    async fn transfer(
        &self,
        _: Request<proto::TransferRequest>,
    ) -> Result<Response<proto::Payment>, Status> {
        unimplemented()
    }
    async fn refund(
        &self,
        _: Request<proto::RefundRequest>,
    ) -> Result<Response<proto::Payment>, Status> {
        unimplemented()
    }
    async fn get_balance(
        &self,
        req: Request<GetBalanceRequest>,
    ) -> Result<Response<proto::Account>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(id) = req.metadata().get(ldc_core::REQUEST_ID_HEADER) {
            self.request_ids
                .lock()
                .unwrap()
                .push(id.to_str().unwrap().to_string());
        }
        let behaviour = self.behaviour.lock().unwrap().clone();
        match behaviour {
            Behaviour::Serve => {}
            Behaviour::Moved { owner, epoch } => {
                let mut s = Status::unavailable(format!("shard moved to {owner}"));
                s.metadata_mut()
                    .insert(ldc_core::MOVED_OWNER, owner.parse().unwrap());
                s.metadata_mut()
                    .insert(ldc_core::MOVED_EPOCH, epoch.to_string().parse().unwrap());
                return Err(s);
            }
            Behaviour::Fail(code) => return Err(Status::new(code, "EchoCell was told to fail")),
            Behaviour::Stall(d) => tokio::time::sleep(d).await,
        }
        Ok(Response::new(proto::Account {
            user_id: req.into_inner().user_id,
            cell: self.name.clone(),
            ..Default::default()
        }))
    }
    async fn get_payment(
        &self,
        _: Request<proto::GetPaymentRequest>,
    ) -> Result<Response<proto::Payment>, Status> {
        unimplemented()
    }
    async fn list_entries(
        &self,
        _: Request<proto::ListEntriesRequest>,
    ) -> Result<Response<proto::ListEntriesResponse>, Status> {
        unimplemented()
    }
}

/// One EchoCell process stand-in, on its own runtime.
struct Backend {
    addr: SocketAddr,
    /// The backend's gRPC health, which the router's active check asks.
    health: tonic_health::server::HealthReporter,
    calls: Arc<AtomicUsize>,
    behaviour: Arc<Mutex<Behaviour>>,
    request_ids: Arc<Mutex<Vec<String>>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Backend {
    /// A backend named `name` holding the certificate of cell `cell`.
    fn start(cell: &str, name: &str) -> Backend {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let behaviour = Arc::new(Mutex::new(Behaviour::Serve));
        let request_ids = Arc::new(Mutex::new(Vec::new()));
        let cell_name = cell;
        let cell = EchoCell {
            name: name.to_string(),
            calls: calls.clone(),
            behaviour: behaviour.clone(),
            request_ids: request_ids.clone(),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let files = pki().files(&platform::cell_leaf(cell_name));
        let (health, health_service) = tonic_health::server::health_reporter();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            let tls = platform::server(
                files,
                ClientAuth::Required,
                &prometheus::Registry::new(),
                "cell",
            )
            .unwrap();
            tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(PaymentsServer::new(cell))
                .serve_with_incoming(ldc_security::net::incoming(listener, tls))
                .await
                .unwrap();
        });
        Backend {
            addr,
            health,
            calls,
            behaviour,
            request_ids,
            rt: Some(rt),
        }
    }

    fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn set(&self, b: Behaviour) {
        *self.behaviour.lock().unwrap() = b;
    }

    /// What the backend's health service answers (as a cell's does from its writer's
    /// progress).
    async fn set_serving(&self, serving: bool) {
        let status = if serving {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        self.health.set_service_status("", status).await;
    }

    /// Kills the backend: its runtime, listener and connections go away; returns once
    /// they are gone.
    async fn kill(&mut self) {
        if let Some(rt) = self.rt.take() {
            tokio::task::spawn_blocking(move || rt.shutdown_timeout(Duration::from_secs(5)))
                .await
                .unwrap();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The router under test.

struct Router {
    addr: SocketAddr,
    admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), ldc_router::RouterError>>>,
}

impl Router {
    async fn start(table: TableHandle, config: RouterConfig) -> Router {
        let traffic = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = traffic.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(ldc_router::serve(
            Listeners { traffic, admin },
            table,
            config,
            edge_security(),
            prometheus::Registry::new(),
            async move {
                let _ = rx.await;
            },
        ));
        Router {
            addr,
            admin: admin_addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// A client with the CLI's certificate (a service with every scope).
    async fn client(&self) -> PaymentsClient<Channel> {
        PaymentsClient::new(channel_to(self.addr, Some(platform::CLI)))
    }

    /// A plain HTTP/1.1 GET on the router's admin port: (status, body).
    async fn get(&self, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(self.admin).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: router\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

fn config() -> RouterConfig {
    RouterConfig {
        request_timeout: Duration::from_secs(5),
        health_check_interval: Duration::from_millis(100),
        ..RouterConfig::default()
    }
}

fn cell(blue: &[&Backend], green: &[&Backend], green_bp: u16, allow_forced: bool) -> CellRoute {
    CellRoute {
        region: "r1".into(),
        blue: blue.iter().map(|b| b.endpoint()).collect(),
        green: green.iter().map(|b| b.endpoint()).collect(),
        green_weight_bp: green_bp,
        allow_forced_colour: allow_forced,
    }
}

/// A table of `SHARDS` shards; `owner(shard)` names the owning cell.
fn table(
    epoch: u64,
    cells: BTreeMap<String, CellRoute>,
    owner: impl Fn(u32) -> &'static str,
) -> RoutingTable {
    RoutingTable {
        epoch,
        shards: (0..SHARDS)
            .map(|s| ShardRoute {
                cell: owner(s).to_string(),
                epoch: 1,
            })
            .collect(),
        cells,
    }
}

fn one_cell_table(epoch: u64, c: CellRoute) -> RoutingTable {
    table(epoch, BTreeMap::from([("A".to_string(), c)]), |_| "A")
}

async fn balance(
    client: &mut PaymentsClient<Channel>,
    headers: &[(&'static str, &str)],
) -> Result<proto::Account, Status> {
    let mut req = Request::new(GetBalanceRequest {
        user_id: "whoever".into(),
    });
    for (k, v) in headers {
        req.metadata_mut().insert(*k, v.parse().unwrap());
    }
    client.get_balance(req).await.map(Response::into_inner)
}

async fn served_by(client: &mut PaymentsClient<Channel>, user: &str) -> String {
    balance(client, &[(ldc_core::USER_HEADER, user)])
        .await
        .unwrap_or_else(|s| panic!("request for {user} failed: {s:?}"))
        .cell
}

/// Waits (polling) until `cond` holds, at most 10 s.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The value of an unlabelled metric in Prometheus text, or of the sum of a labelled one.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------------
// A store double for the table source.

#[derive(Default)]
struct MemStore {
    data: Mutex<HashMap<Vec<u8>, Vec<u8>>>,
    broken: std::sync::atomic::AtomicBool,
    reads: AtomicUsize,
}

impl MemStore {
    /// Publishes `t` as `ldc up` or the operator does: its JSON and the publisher's
    /// signature of those bytes.
    fn publish(&self, t: &RoutingTable) {
        let json = serde_json::to_vec(t).unwrap();
        let sig = signer().sign(&json);
        self.publish_raw(json, Some(sig.into_bytes()));
    }

    fn publish_raw(&self, json: Vec<u8>, sig: Option<Vec<u8>>) {
        let mut d = self.data.lock().unwrap();
        d.insert(STORE_KEY.to_vec(), json);
        match sig {
            Some(s) => d.insert(SIGNATURE_KEY.to_vec(), s),
            None => d.remove(SIGNATURE_KEY),
        };
    }
}

fn signer() -> ldc_security::table::TableSigner {
    ldc_security::table::TableSigner::from_pem_file(&pki().routing_key_path()).unwrap()
}

/// A table handle that takes only tables signed by the test platform's publisher.
fn verified_handle() -> TableHandle {
    TableHandle::verified(
        ldc_security::table::TableVerifier::from_pem_file(&pki().routing_public_path()).unwrap(),
    )
}

struct MemTxn(HashMap<Vec<u8>, Vec<u8>>);

impl ldc_store::Kv for MemTxn {
    fn get(&mut self, key: &[u8]) -> ldc_store::Result<Option<Vec<u8>>> {
        Ok(self.0.get(key).cloned())
    }
    fn get_for_update(&mut self, key: &[u8]) -> ldc_store::Result<Option<Vec<u8>>> {
        self.get(key)
    }
    fn put(&mut self, _: &[u8], _: &[u8]) -> ldc_store::Result<()> {
        unreachable!("the router only reads")
    }
    fn delete(&mut self, _: &[u8]) -> ldc_store::Result<()> {
        unreachable!("the router only reads")
    }
    fn scan(&mut self, _: &[u8], _: &[u8], _: usize) -> ldc_store::Result<Vec<ldc_store::Pair>> {
        unreachable!("the router only reads")
    }
}

impl ldc_store::Txn for MemTxn {
    fn commit(self: Box<Self>) -> ldc_store::Result<()> {
        Ok(())
    }
    fn rollback(self: Box<Self>) -> ldc_store::Result<()> {
        Ok(())
    }
}

impl ldc_store::Store for MemStore {
    fn begin(&self) -> ldc_store::Result<Box<dyn ldc_store::Txn>> {
        self.begin_read()
    }
    fn begin_read(&self) -> ldc_store::Result<Box<dyn ldc_store::Txn>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        if self.broken.load(Ordering::SeqCst) {
            return Err(ldc_store::StoreError::Backend("MemStore is broken".into()));
        }
        Ok(Box::new(MemTxn(self.data.lock().unwrap().clone())))
    }
    fn engine(&self) -> &'static str {
        "mem"
    }
}

/// Starts `poll_store` with a poll period so long that only refresh requests cause reads.
fn poll_on_demand(store: Arc<MemStore>, table: TableHandle) -> tokio::sync::oneshot::Sender<()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(ldc_router::poll_store(
        store,
        table,
        Duration::from_secs(3600),
        async move {
            let _ = rx.await;
        },
    ));
    tx
}

// ---------------------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn routes_users_to_the_owning_cell() {
    let a = Backend::start("A", "A");
    let b = Backend::start("B", "B");
    let t = table(
        1,
        BTreeMap::from([
            ("A".to_string(), cell(&[&a], &[], 0, false)),
            ("B".to_string(), cell(&[&b], &[], 0, false)),
        ]),
        |s| if s < 50 { "A" } else { "B" },
    );
    let handle = TableHandle::new();
    assert!(handle.offer(t));
    let router = Router::start(handle, config()).await;
    let mut client = router.client().await;

    let mut seen = HashMap::new();
    for i in 0..40 {
        let user = format!("user-{i}");
        let expected = if shard_of(&user, SHARDS) < 50 {
            "A"
        } else {
            "B"
        };
        assert_eq!(served_by(&mut client, &user).await, expected, "{user}");
        *seen.entry(expected).or_insert(0) += 1;
    }
    assert_eq!(
        seen.len(),
        2,
        "both cells owned some of the users: {seen:?}"
    );

    // A shard number routes nothing: every call is for a user (the relay, which routed by
    // shard, goes cell to cell and never through the router).
    let e = balance(&mut client, &[("x-ldc-shard", "3")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Every forwarded request carries a request id; a client's own is kept.
    assert_eq!(a.request_ids.lock().unwrap().len(), a.calls());
    balance(
        &mut client,
        &[
            (ldc_core::USER_HEADER, "user-0"),
            (ldc_core::REQUEST_ID_HEADER, "rid-42"),
        ],
    )
    .await
    .unwrap();
    let ids: Vec<String> = [&a, &b]
        .iter()
        .flat_map(|x| x.request_ids.lock().unwrap().clone())
        .collect();
    assert!(ids.contains(&"rid-42".to_string()));
    router.stop().await;
}

#[tokio::test]
async fn blue_green_split_at_0_50_100_is_sticky() {
    let blue = Backend::start("A", "blue");
    let green = Backend::start("A", "green");
    let handle = TableHandle::new();
    let router = Router::start(handle.clone(), config()).await;
    let mut client = router.client().await;
    let users: Vec<String> = (0..60).map(|i| format!("u{i}")).collect();

    for (epoch, weight) in [(1, 0), (2, 5_000), (3, BP_MAX)] {
        assert!(handle.offer(one_cell_table(
            epoch,
            cell(&[&blue], &[&green], weight, false)
        )));
        let mut greens = 0;
        for u in &users {
            let first = served_by(&mut client, u).await;
            let again = served_by(&mut client, u).await;
            assert_eq!(first, again, "{u} is sticky at weight {weight}");
            assert_eq!(
                first,
                colour_for(u, weight).as_str(),
                "{u} at weight {weight}"
            );
            greens += usize::from(first == "green");
        }
        match weight {
            0 => assert_eq!(greens, 0),
            BP_MAX => assert_eq!(greens, users.len()),
            _ => assert!(
                (15..=45).contains(&greens),
                "about half green at 50%: {greens}"
            ),
        }
    }
    router.stop().await;
}

#[tokio::test]
async fn forced_colour_only_where_allowed() {
    let blue = Backend::start("A", "blue");
    let green = Backend::start("A", "green");
    let handle = TableHandle::new();
    handle.offer(one_cell_table(1, cell(&[&blue], &[&green], 0, false)));
    let router = Router::start(handle.clone(), config()).await;
    let mut client = router.client().await;
    let forced = [
        (ldc_core::USER_HEADER, "alice"),
        (ldc_core::COLOUR_HEADER, "green"),
    ];

    // Not allowed: the header is ignored and the split decides (0% green).
    assert_eq!(balance(&mut client, &forced).await.unwrap().cell, "blue");

    handle.offer(one_cell_table(2, cell(&[&blue], &[&green], 0, true)));
    assert_eq!(balance(&mut client, &forced).await.unwrap().cell, "green");
    assert_eq!(
        served_by(&mut client, "alice").await,
        "blue",
        "unforced still follows the split"
    );

    let bad = [
        (ldc_core::USER_HEADER, "alice"),
        (ldc_core::COLOUR_HEADER, "purple"),
    ];
    let e = balance(&mut client, &bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains(ldc_core::COLOUR_HEADER),
        "{}",
        e.message()
    );
    router.stop().await;
}

#[tokio::test]
async fn table_epoch_never_goes_backwards() {
    let a = Backend::start("A", "A");
    let b = Backend::start("B", "B");
    let handle = TableHandle::new();
    let router = Router::start(handle.clone(), config()).await;
    let mut client = router.client().await;

    assert!(handle.offer(one_cell_table(5, cell(&[&a], &[], 0, false))));
    assert!(!handle.offer(one_cell_table(3, cell(&[&b], &[], 0, false))));
    assert!(!handle.offer(one_cell_table(5, cell(&[&b], &[], 0, false))));
    assert_eq!(served_by(&mut client, "alice").await, "A");

    let (status, body) = router.get("/table").await;
    assert_eq!(status, 200);
    let shown: RoutingTable = serde_json::from_str(&body).unwrap();
    assert_eq!(shown.epoch, 5);
    let (_, metrics) = router.get("/metrics").await;
    assert_eq!(metric(&metrics, "ldc_router_table_epoch"), 5.0);
    router.stop().await;
}

#[tokio::test]
async fn store_source_keeps_the_last_good_table_when_the_store_fails() {
    let a = Backend::start("A", "A");
    let store = Arc::new(MemStore::default());
    store.publish(&one_cell_table(1, cell(&[&a], &[], 0, false)));
    let handle = verified_handle();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let poller = tokio::spawn(ldc_router::poll_store(
        store.clone(),
        handle.clone(),
        Duration::from_millis(10),
        async move {
            let _ = rx.await;
        },
    ));
    let router = Router::start(handle.clone(), config()).await;
    wait_until("the first table", || handle.current().is_some()).await;

    store.broken.store(true, Ordering::SeqCst);
    let reads = store.reads.load(Ordering::SeqCst);
    wait_until("failed reads", || {
        store.reads.load(Ordering::SeqCst) >= reads + 3
    })
    .await;
    let mut client = router.client().await;
    assert_eq!(
        served_by(&mut client, "alice").await,
        "A",
        "last good table still used"
    );
    let (_, metrics) = router.get("/metrics").await;
    assert!(
        metric(&metrics, "ldc_router_source_errors_total") >= 2.0,
        "{metrics}"
    );
    assert!(metrics.contains("ldc_router_table_age_seconds"));

    // Recovery: a newer table is picked up again.
    store.publish(&one_cell_table(2, cell(&[&a], &[], 0, false)));
    store.broken.store(false, Ordering::SeqCst);
    wait_until("the newer table", || handle.current().unwrap().epoch == 2).await;
    tx.send(()).unwrap();
    poller.await.unwrap();
    router.stop().await;
}

/// Two cells; every shard starts on A. A answers "moved" (to B, epoch 2) and the store
/// holds a newer table that gives the shards to B.
async fn moved_setup() -> (Backend, Backend, Arc<MemStore>, TableHandle, RoutingTable) {
    let a = Backend::start("A", "A");
    let b = Backend::start("B", "B");
    let cells = BTreeMap::from([
        ("A".to_string(), cell(&[&a], &[], 0, false)),
        ("B".to_string(), cell(&[&b], &[], 0, false)),
    ]);
    let v1 = table(1, cells.clone(), |_| "A");
    let mut v2 = table(2, cells, |_| "B");
    for s in &mut v2.shards {
        s.epoch = 2;
    }
    let store = Arc::new(MemStore::default());
    store.publish(&v1);
    (a, b, store, verified_handle(), v2)
}

#[tokio::test]
async fn moved_answer_refreshes_the_table_and_retries_once_at_the_new_owner() {
    let (a, b, store, handle, v2) = moved_setup().await;
    let _stop = poll_on_demand(store.clone(), handle.clone());
    wait_until("table v1", || {
        handle.current().is_some_and(|t| t.epoch == 1)
    })
    .await;
    let router = Router::start(handle.clone(), config()).await;
    let mut client = router.client().await;

    // Ownership moves in the store; the router has not polled (its period is an hour).
    store.publish(&v2);
    a.set(Behaviour::Moved {
        owner: "B".into(),
        epoch: 2,
    });

    assert_eq!(served_by(&mut client, "alice").await, "B");
    assert_eq!(
        (a.calls(), b.calls()),
        (1, 1),
        "one refused attempt, one retry"
    );
    assert_eq!(
        handle.current().unwrap().epoch,
        2,
        "the moved answer triggered a store read"
    );
    let (_, metrics) = router.get("/metrics").await;
    assert_eq!(metric(&metrics, "ldc_router_moved_retries_total"), 1.0);

    // The next request goes straight to B.
    assert_eq!(served_by(&mut client, "alice").await, "B");
    assert_eq!(a.calls(), 1);
    router.stop().await;
}

#[tokio::test]
async fn a_second_moved_answer_is_returned_not_retried_again() {
    let (a, b, store, handle, v2) = moved_setup().await;
    let _stop = poll_on_demand(store.clone(), handle.clone());
    wait_until("table v1", || {
        handle.current().is_some_and(|t| t.epoch == 1)
    })
    .await;
    let router = Router::start(handle.clone(), config()).await;
    let mut client = router.client().await;
    store.publish(&v2);
    a.set(Behaviour::Moved {
        owner: "B".into(),
        epoch: 2,
    });
    b.set(Behaviour::Moved {
        owner: "A".into(),
        epoch: 3,
    });

    let e = balance(&mut client, &[(ldc_core::USER_HEADER, "alice")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert_eq!(
        e.metadata().get(ldc_core::MOVED_OWNER).unwrap(),
        "A",
        "B's answer, as is"
    );
    assert_eq!((a.calls(), b.calls()), (1, 1), "exactly one retry");
    router.stop().await;
}

#[tokio::test]
async fn moved_hint_is_followed_when_no_newer_table_comes() {
    // No table source at all: the router cannot refresh, so it trusts the cell's answer.
    let (a, b, _store, handle, _v2) = moved_setup().await;
    let cells = BTreeMap::from([
        ("A".to_string(), cell(&[&a], &[], 0, false)),
        ("B".to_string(), cell(&[&b], &[], 0, false)),
    ]);
    handle.offer(table(1, cells, |_| "A"));
    let router = Router::start(handle.clone(), config()).await;
    let mut client = router.client().await;
    a.set(Behaviour::Moved {
        owner: "B".into(),
        epoch: 2,
    });
    assert_eq!(served_by(&mut client, "alice").await, "B");
    assert_eq!((a.calls(), b.calls()), (1, 1));
    router.stop().await;
}

#[tokio::test]
async fn other_errors_are_returned_as_is_and_never_retried() {
    let (a, b, store, handle, v2) = moved_setup().await;
    let _stop = poll_on_demand(store.clone(), handle.clone());
    wait_until("table v1", || {
        handle.current().is_some_and(|t| t.epoch == 1)
    })
    .await;
    let router = Router::start(handle.clone(), config()).await;
    let mut client = router.client().await;
    store.publish(&v2);

    // UNAVAILABLE without the moved metadata is not "moved": it may have been applied.
    a.set(Behaviour::Fail(Code::Unavailable));
    let e = balance(&mut client, &[(ldc_core::USER_HEADER, "alice")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert_eq!(e.message(), "EchoCell was told to fail");
    a.set(Behaviour::Fail(Code::FailedPrecondition));
    let e = balance(&mut client, &[(ldc_core::USER_HEADER, "alice")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!((a.calls(), b.calls()), (2, 0));
    assert_eq!(
        handle.current().unwrap().epoch,
        1,
        "no refresh was asked for"
    );
    router.stop().await;
}

#[tokio::test]
async fn upstream_timeout_is_deadline_exceeded_and_not_retried() {
    let a = Backend::start("A", "A");
    a.set(Behaviour::Stall(Duration::from_secs(3)));
    let handle = TableHandle::new();
    handle.offer(one_cell_table(1, cell(&[&a], &[], 0, false)));
    let cfg = RouterConfig {
        request_timeout: Duration::from_millis(200),
        ..config()
    };
    let router = Router::start(handle, cfg).await;
    let mut client = router.client().await;
    let e = balance(&mut client, &[(ldc_core::USER_HEADER, "alice")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(
        e.message().contains("may have been applied"),
        "{}",
        e.message()
    );
    assert_eq!(a.calls(), 1);
    router.stop().await;
}

#[tokio::test]
async fn bad_or_missing_user_header_is_invalid_argument() {
    let a = Backend::start("A", "A");
    let handle = TableHandle::new();
    handle.offer(one_cell_table(1, cell(&[&a], &[], 0, false)));
    let router = Router::start(handle, config()).await;
    let mut client = router.client().await;

    let e = balance(&mut client, &[]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("x-ldc-user"), "{}", e.message());

    let e = balance(&mut client, &[(ldc_core::USER_HEADER, "no/slashes")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("x-ldc-user"), "{}", e.message());

    let long = "x".repeat(10_000);
    let e = balance(
        &mut client,
        &[
            ("x-padding", long.as_str()),
            (ldc_core::USER_HEADER, "alice"),
        ],
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(a.calls(), 0, "nothing reached the cell");
    let (_, metrics) = router.get("/metrics").await;
    assert!(
        metrics.contains("ldc_router_errors_total{reason=\"missing_user_header\"} 1"),
        "{metrics}"
    );
    router.stop().await;
}

#[tokio::test]
async fn no_table_is_unavailable_and_not_ready() {
    let a = Backend::start("A", "A");
    let handle = TableHandle::new();
    let router = Router::start(handle.clone(), config()).await;
    let mut client = router.client().await;

    let e = balance(&mut client, &[(ldc_core::USER_HEADER, "alice")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(
        e.message().starts_with("router has no routing table yet"),
        "{}",
        e.message()
    );
    assert_eq!(router.get("/healthz").await.0, 200);
    assert_eq!(router.get("/readyz").await.0, 503);
    assert_eq!(router.get("/table").await.0, 503);

    handle.offer(one_cell_table(1, cell(&[&a], &[], 0, false)));
    let (status, body) = router.get("/readyz").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "ready: routing table epoch 1\n")
    );
    assert_eq!(served_by(&mut client, "alice").await, "A");
    router.stop().await;
}

#[tokio::test]
async fn a_killed_endpoint_is_ejected_and_its_colour_keeps_serving() {
    let mut dead = Backend::start("A", "blue-1");
    let alive = Backend::start("A", "blue-2");
    let handle = TableHandle::new();
    handle.offer(one_cell_table(1, cell(&[&dead, &alive], &[], 0, false)));
    let router = Router::start(handle, config()).await;
    let mut client = router.client().await;

    // Both serve while alive.
    let mut seen = std::collections::HashSet::new();
    for i in 0..40 {
        seen.insert(served_by(&mut client, &format!("u{i}")).await);
    }
    assert_eq!(seen.len(), 2, "power of two choices spreads: {seen:?}");

    dead.kill().await;
    // Until the router notices, a request may fail (UNAVAILABLE, never silently retried);
    // then every request is served by the survivor.
    let mut streak = 0;
    for i in 0..200 {
        match balance(&mut client, &[(ldc_core::USER_HEADER, &format!("u{i}"))]).await {
            Ok(acc) => {
                assert_eq!(acc.cell, "blue-2");
                streak += 1;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                streak = 0;
            }
        }
        if streak == 20 {
            break;
        }
    }
    assert_eq!(streak, 20, "traffic settled on the surviving endpoint");
    let (_, metrics) = router.get("/metrics").await;
    assert!(
        metric(&metrics, "ldc_router_ejections_total") >= 1.0,
        "{metrics}"
    );
    router.stop().await;
}

/// A backend whose health says NOT_SERVING (a cell whose writer is stuck: its port still
/// answers) is ejected by the active check and traffic goes to its sibling; SERVING again,
/// it is back. A TCP connect would have passed all along.
#[tokio::test]
async fn an_endpoint_not_serving_by_its_health_is_ejected_while_its_port_answers() {
    let stuck = Backend::start("A", "blue-1");
    let fine = Backend::start("A", "blue-2");
    let handle = TableHandle::new();
    handle.offer(one_cell_table(1, cell(&[&stuck, &fine], &[], 0, false)));
    let router = Router::start(handle, config()).await;
    let mut client = router.client().await;
    stuck.set_serving(false).await;
    // Within a few probe periods (100 ms here) every request lands on the sibling.
    let mut streak = 0;
    for i in 0..400 {
        if served_by(&mut client, &format!("u{i}")).await == "blue-2" {
            streak += 1;
        } else {
            streak = 0;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if streak == 30 {
            break;
        }
    }
    assert_eq!(streak, 30, "traffic left the NOT_SERVING endpoint");
    stuck.set_serving(true).await;
    let mut seen = std::collections::HashSet::new();
    for i in 0..400 {
        seen.insert(served_by(&mut client, &format!("v{i}")).await);
        if seen.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(seen.len(), 2, "the endpoint came back once SERVING");
    let (_, metrics) = router.get("/metrics").await;
    assert!(
        metric(&metrics, "ldc_router_ejections_total") >= 1.0,
        "{metrics}"
    );
    router.stop().await;
}

/// Outlier detection: an endpoint that takes requests and never answers them is ejected
/// after a few timeouts in a row, without waiting for the probe; the timeouts are answered
/// DEADLINE_EXCEEDED (they may have been applied) and later requests go to the sibling.
#[tokio::test]
async fn an_endpoint_that_stops_answering_is_ejected_as_an_outlier() {
    let hung = Backend::start("A", "blue-1");
    let fine = Backend::start("A", "blue-2");
    hung.set(Behaviour::Stall(Duration::from_secs(30)));
    let handle = TableHandle::new();
    handle.offer(one_cell_table(1, cell(&[&hung, &fine], &[], 0, false)));
    let cfg = RouterConfig {
        request_timeout: Duration::from_millis(100),
        // The probe would find nothing wrong (the hung backend's health is SERVING): only
        // the outlier rule can eject it here.
        health_check_interval: Duration::from_secs(3600),
        ..config()
    };
    let router = Router::start(handle, cfg).await;
    let mut client = router.client().await;
    let mut timeouts = 0;
    let mut streak = 0;
    for i in 0..200 {
        match balance(&mut client, &[(ldc_core::USER_HEADER, &format!("u{i}"))]).await {
            Ok(acc) => {
                assert_eq!(acc.cell, "blue-2");
                streak += 1;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
                timeouts += 1;
                streak = 0;
            }
        }
        if streak == 30 {
            break;
        }
    }
    assert_eq!(streak, 30, "traffic settled on the answering endpoint");
    assert!(
        timeouts >= ldc_router::balance::OUTLIER_FAILURES_MAX as usize,
        "ejected after {timeouts} timeouts, before the rule says"
    );
    let (_, metrics) = router.get("/metrics").await;
    assert!(
        metric(&metrics, "ldc_router_ejections_total") >= 1.0,
        "{metrics}"
    );
    router.stop().await;
}

/// One client cannot take every place in a cell's queue: past its bound of requests in
/// flight it is refused at the edge (RESOURCE_EXHAUSTED, nothing sent to the cell), while
/// another client is served as usual; an answer frees a place.
#[tokio::test]
async fn one_client_is_bounded_in_flight_and_others_are_not_held_back() {
    let a = Backend::start("A", "A");
    a.set(Behaviour::Stall(Duration::from_millis(500)));
    let handle = TableHandle::new();
    handle.offer(one_cell_table(1, cell(&[&a], &[], 0, false)));
    let cfg = RouterConfig {
        client_in_flight_max: 2,
        ..config()
    };
    let router = Router::start(handle, cfg).await;
    let busy = router.client().await; // service:cli
    let mut calls = Vec::new();
    for i in 0..2 {
        let mut c = busy.clone();
        calls.push(tokio::spawn(async move {
            balance(&mut c, &[(ldc_core::USER_HEADER, &format!("u{i}"))]).await
        }));
    }
    wait_until("both stalled calls reached the cell", || a.calls() == 2).await;
    let e = balance(&mut busy.clone(), &[(ldc_core::USER_HEADER, "u9")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message()
            .contains("\"service:cli\" has 2 requests in flight"),
        "{}",
        e.message()
    );
    assert_eq!(a.calls(), 2, "the refused call reached the cell");
    // Another client is not held back by this one.
    let mut reports = PaymentsClient::new(channel_to(router.addr, Some("reports")));
    let served =
        tokio::spawn(async move { balance(&mut reports, &[(ldc_core::USER_HEADER, "u5")]).await });
    wait_until("the other client's call reached the cell", || {
        a.calls() == 3
    })
    .await;
    for c in calls {
        c.await.unwrap().unwrap();
    }
    served.await.unwrap().unwrap();
    // Answers freed the places.
    a.set(Behaviour::Serve);
    served_by(&mut busy.clone(), "u7").await;
    let (_, metrics) = router.get("/metrics").await;
    assert!(metrics.contains("reason=\"client_in_flight\""), "{metrics}");
    router.stop().await;
}

#[tokio::test]
async fn metrics_count_requests_by_cell_colour_and_code() {
    let blue = Backend::start("A", "blue");
    let green = Backend::start("A", "green");
    let handle = TableHandle::new();
    handle.offer(one_cell_table(7, cell(&[&blue], &[&green], 0, false)));
    let router = Router::start(handle, config()).await;
    let mut client = router.client().await;
    served_by(&mut client, "alice").await;
    served_by(&mut client, "bob").await;
    blue.set(Behaviour::Fail(Code::NotFound));
    let _ = balance(&mut client, &[(ldc_core::USER_HEADER, "alice")]).await;

    let (status, metrics) = router.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(r#"ldc_router_requests_total{cell="A",code="OK",colour="blue"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"ldc_router_requests_total{cell="A",code="NOT_FOUND",colour="blue"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"ldc_router_request_seconds_count{cell="A",colour="blue"} 3"#),
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "ldc_router_table_epoch"), 7.0);
    assert_eq!(router.get("/nope").await.0, 404);
    router.stop().await;
}

#[tokio::test]
async fn a_body_too_large_to_replay_is_not_retried_after_moved() {
    let (a, b, store, handle, v2) = moved_setup().await;
    let _stop = poll_on_demand(store.clone(), handle.clone());
    wait_until("table v1", || {
        handle.current().is_some_and(|t| t.epoch == 1)
    })
    .await;
    let cfg = RouterConfig {
        retry_body_bytes_max: 4,
        ..config()
    };
    let router = Router::start(handle.clone(), cfg).await;
    let mut client = router.client().await;
    store.publish(&v2);
    a.set(Behaviour::Moved {
        owner: "B".into(),
        epoch: 2,
    });
    // The body ("whoever" plus framing) is larger than 4 bytes: it was streamed, so the
    // moved answer goes back to the client, which may retry (nothing was applied).
    let e = balance(&mut client, &[(ldc_core::USER_HEADER, "alice")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert_eq!(e.metadata().get(ldc_core::MOVED_OWNER).unwrap(), "B");
    assert_eq!((a.calls(), b.calls()), (1, 0));
    router.stop().await;
}

#[tokio::test]
async fn no_usable_endpoint_names_the_cell_and_colour() {
    let mut only = Backend::start("A", "blue");
    let handle = TableHandle::new();
    handle.offer(one_cell_table(1, cell(&[&only], &[], 0, false)));
    let router = Router::start(handle.clone(), config()).await;
    let mut client = router.client().await;
    only.kill().await;

    // First: the connect fails (safe to retry: nothing reached the cell).
    let e = balance(&mut client, &[(ldc_core::USER_HEADER, "alice")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(
        e.message()
            .starts_with("cannot connect to cell A (blue endpoint")
            || e.message()
                .starts_with("cell A has no healthy blue endpoint"),
        "{}",
        e.message()
    );
    // Then the endpoint is ejected and the router says so without trying.
    let e = balance(&mut client, &[(ldc_core::USER_HEADER, "alice")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(
        e.message()
            .starts_with("cell A has no healthy blue endpoint"),
        "{}",
        e.message()
    );

    // A colour with no endpoints at all.
    handle.offer(one_cell_table(2, cell(&[&only], &[], BP_MAX, false)));
    let e = balance(&mut client, &[(ldc_core::USER_HEADER, "alice")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert_eq!(
        e.message(),
        "cell A has no green endpoints in routing table epoch 2"
    );
    router.stop().await;
}

/// `r` was refused with `code` and a message saying `says`.
fn check<T: std::fmt::Debug>(r: Result<Response<T>, Status>, code: Code, says: &str) {
    let e = r.expect_err("refused");
    assert_eq!(e.code(), code, "{e:?}");
    assert!(e.message().contains(says), "{}", e.message());
}

/// A request for `user` carrying `token` (if any) as a bearer token.
fn with_token<T>(msg: T, user: &str, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert(ldc_core::USER_HEADER, user.parse().unwrap());
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

/// Every call is authenticated and authorized at the edge. Each refusal has its precise
/// code and reason, is counted, and nothing reaches a cell.
#[tokio::test]
async fn the_edge_refuses_who_may_not_and_sends_nothing() {
    use ldc_core::authz::{Principal, Scope};
    use ldc_core::proto::cell_relay_client::CellRelayClient;
    let a = Backend::start("A", "A");
    let handle = TableHandle::new();
    handle.offer(one_cell_table(1, cell(&[&a], &[], 0, false)));
    let router = Router::start(handle, config()).await;
    let hour = Duration::from_secs(3600);
    let token = |p: Principal| issuer().issue(&p, hour).unwrap();
    let alice_read = token(Principal::user("alice", [Scope::Read]));
    let alice_pay = token(Principal::user("alice", [Scope::Read, Scope::Transfer]));
    let alice_all = token(Principal::user("alice", Scope::ALL));
    let payments = token(Principal::service("payments", [Scope::Transfer]));
    let expired = issuer()
        .issue_at(
            &Principal::user("alice", [Scope::Read]),
            std::time::SystemTime::now() - 2 * hour,
            hour,
        )
        .unwrap();
    let foreign = {
        let dir = tempfile::tempdir().unwrap();
        let other = Pki::new(dir.path());
        other.ensure(&[]).unwrap();
        TokenIssuer::from_pem_file(&other.token_key_path())
            .unwrap()
            .issue(&Principal::user("alice", Scope::ALL), hour)
            .unwrap()
    };
    let anon = PaymentsClient::new(channel_to(router.addr, None));
    let transfer = || proto::TransferRequest {
        user_id: "alice".into(),
        to_user_id: "bob".into(),
        amount: 10,
        currency: "EUR".into(),
        idempotency_key: "k".into(),
    };
    let money = || proto::WithdrawRequest {
        user_id: "alice".into(),
        amount: 10,
        currency: "EUR".into(),
        idempotency_key: "k".into(),
    };
    let read = |user: &str, t: Option<&str>| {
        with_token(
            GetBalanceRequest {
                user_id: user.into(),
            },
            user,
            t,
        )
    };

    let mut c = anon.clone();
    // Missing, expired, foreign and garbled credentials: UNAUTHENTICATED.
    check(
        c.withdraw(with_token(money(), "alice", None)).await,
        Code::Unauthenticated,
        "no credentials",
    );
    check(
        c.get_balance(read("alice", Some(&expired))).await,
        Code::Unauthenticated,
        "expired",
    );
    check(
        c.get_balance(read("alice", Some(&foreign))).await,
        Code::Unauthenticated,
        "not signed by a key this platform trusts",
    );
    check(
        c.get_balance(read("alice", Some("e30.e30.e30"))).await,
        Code::Unauthenticated,
        "malformed",
    );
    // Valid but not allowed: PERMISSION_DENIED.
    check(
        c.get_balance(read("bob", Some(&alice_read))).await,
        Code::PermissionDenied,
        "cannot act for user \"bob\"",
    );
    check(
        c.transfer(with_token(transfer(), "alice", Some(&alice_read)))
            .await,
        Code::PermissionDenied,
        "lacks scope payments:transfer",
    );
    check(
        c.withdraw(with_token(money(), "alice", Some(&alice_all)))
            .await,
        Code::PermissionDenied,
        "only a service",
    );
    check(
        c.withdraw(with_token(money(), "alice", Some(&payments)))
            .await,
        Code::PermissionDenied,
        "lacks scope payments:funds",
    );
    // A user certificate is a user credential; a read-only service certificate reads only.
    let mut alice_cert = PaymentsClient::new(channel_to(router.addr, Some("alice")));
    check(
        alice_cert.get_balance(read("bob", None)).await,
        Code::PermissionDenied,
        "cannot act for user",
    );
    let mut reports = PaymentsClient::new(channel_to(router.addr, Some("reports")));
    check(
        reports
            .transfer(with_token(transfer(), "alice", None))
            .await,
        Code::PermissionDenied,
        "lacks scope payments:transfer",
    );
    // The relay is never public, whoever asks (even the CLI's all-scopes certificate).
    let mut relay = CellRelayClient::new(channel_to(router.addr, Some(platform::CLI)));
    let mut forged = with_token(
        proto::Credit {
            message_id: "mallory:1".into(),
            to_user_id: "alice".into(),
            amount: 1_000_000,
            currency: "EUR".into(),
            ..Default::default()
        },
        "alice",
        None,
    );
    forged.set_timeout(Duration::from_secs(5));
    check(
        relay.deliver(forged).await,
        Code::PermissionDenied,
        "private cell-to-cell relay",
    );
    assert_eq!(a.calls(), 0, "a refused call reached the cell");

    // What is allowed passes: own reads by token and certificate, a service reading anyone.
    assert_eq!(
        c.get_balance(read("alice", Some(&alice_read)))
            .await
            .unwrap()
            .into_inner()
            .cell,
        "A"
    );
    alice_cert.get_balance(read("alice", None)).await.unwrap();
    reports.get_balance(read("bob", None)).await.unwrap();
    // (EchoCell implements only GetBalance: reaching it is UNIMPLEMENTED.)
    let e = c
        .transfer(with_token(transfer(), "alice", Some(&alice_pay)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    assert_eq!(a.calls(), 3);

    let (_, metrics) = router.get("/metrics").await;
    for (code, reason) in [
        ("UNAUTHENTICATED", "no_credentials"),
        ("UNAUTHENTICATED", "token_expired"),
        ("UNAUTHENTICATED", "token_signature"),
        ("PERMISSION_DENIED", "other_user"),
        ("PERMISSION_DENIED", "missing_scope"),
        ("PERMISSION_DENIED", "funds_need_service"),
        ("PERMISSION_DENIED", "relay_not_public"),
    ] {
        let line = format!("ldc_router_auth_refusals_total{{code=\"{code}\",reason=\"{reason}\"}}");
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }
    router.stop().await;
}

/// TLS is the only way in: plaintext h2c and client certificates of another CA fail the
/// handshake; an endpoint whose certificate names another cell than the table does gets
/// nothing (the router closes the connection before sending).
#[tokio::test]
async fn only_tls_with_this_platforms_certificates_gets_through() {
    let a = Backend::start("A", "A");
    let impostor = Backend::start("B", "impostor");
    let handle = TableHandle::new();
    handle.offer(one_cell_table(1, cell(&[&a], &[], 0, false)));
    let router = Router::start(handle.clone(), config()).await;

    let plain = Channel::from_shared(format!("http://{}", router.addr))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    let e = balance(
        &mut PaymentsClient::new(plain),
        &[(ldc_core::USER_HEADER, "alice")],
    )
    .await
    .unwrap_err();
    assert!(
        std::error::Error::source(&e)
            .is_some_and(|s| s.downcast_ref::<tonic::transport::Error>().is_some()),
        "{e:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let other = Pki::new(dir.path());
    platform::ensure_local(&other, []).unwrap();
    let foreign_cert = ldc_security::net::channel(
        &router.addr.to_string(),
        platform::client(ldc_security::pki::Files {
            ca: pki().ca_path(),
            ..other.files(platform::CLI)
        })
        .unwrap(),
        is_router,
        Duration::from_secs(2),
        Duration::from_secs(5),
    )
    .unwrap();
    let e = balance(
        &mut PaymentsClient::new(foreign_cert),
        &[(ldc_core::USER_HEADER, "alice")],
    )
    .await
    .unwrap_err();
    assert!(
        std::error::Error::source(&e)
            .is_some_and(|s| s.downcast_ref::<tonic::transport::Error>().is_some()),
        "{e:?}"
    );
    assert_eq!(a.calls(), 0);

    // The table points cell A at a backend holding cell B's certificate.
    handle.offer(one_cell_table(2, cell(&[&impostor], &[], 0, false)));
    let mut c = router.client().await;
    let e = balance(&mut c, &[(ldc_core::USER_HEADER, "alice")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("names cell:B, not cell A") && e.message().contains("safe to retry"),
        "{}",
        e.message()
    );
    assert_eq!(impostor.calls(), 0);
    router.stop().await;
}

/// Someone who can write the store key (or the ConfigMap) cannot point the router at a
/// cell of their own: a table whose bytes were changed after signing, a table signed by
/// another key and an unsigned table are each refused, alarmed and counted, and the router
/// keeps routing with the last signed table.
#[tokio::test]
async fn a_tampered_routing_table_is_refused_and_the_signed_one_kept() {
    let a = Backend::start("A", "A");
    let evil = Backend::start("A", "evil");
    let store = Arc::new(MemStore::default());
    store.publish(&one_cell_table(1, cell(&[&a], &[], 0, false)));
    let handle = verified_handle();
    let stop = poll_on_demand(store.clone(), handle.clone());
    let router = Router::start(handle.clone(), config()).await;
    wait_until("the first table", || handle.current().is_some()).await;

    let forged_table = one_cell_table(2, cell(&[&evil], &[], 0, false));
    let genuine = serde_json::to_vec(&one_cell_table(2, cell(&[&a], &[], 0, false))).unwrap();
    let other_key = {
        let (private, _) = ldc_security::pki::token_key_pair().unwrap();
        ldc_security::table::TableSigner::from_pem(private.as_bytes()).unwrap()
    };
    let forged = serde_json::to_vec(&forged_table).unwrap();
    for (reason, json, sig) in [
        (
            "bad_signature",
            forged.clone(),
            Some(signer().sign(&genuine)),
        ),
        (
            "bad_signature",
            forged.clone(),
            Some(other_key.sign(&forged)),
        ),
        ("unsigned", forged.clone(), None),
    ] {
        store.publish_raw(json, sig.map(String::into_bytes));
        handle.request_refresh();
        let (_, m) = router.get("/metrics").await;
        let before = counter_of(&m, reason);
        wait_until_async("the refusal", || async {
            handle.request_refresh();
            let (_, m) = router.get("/metrics").await;
            counter_of(&m, reason) > before
        })
        .await;
        assert_eq!(handle.current().unwrap().epoch, 1, "{reason}: table taken");
    }
    let mut client = router.client().await;
    assert_eq!(served_by(&mut client, "alice").await, "A");
    assert_eq!(evil.calls(), 0);

    // The publisher's own next table is taken.
    store.publish(&one_cell_table(3, cell(&[&a], &[], 0, false)));
    handle.request_refresh();
    wait_until("the signed table", || handle.current().unwrap().epoch == 3).await;
    let _ = stop.send(());
    router.stop().await;
}

fn counter_of(metrics: &str, reason: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("ldc_router_source_errors_total{")
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn wait_until_async<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
