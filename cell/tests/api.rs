//! The payment API of one real cell (gRPC over mutual TLS on loopback, certificates of a
//! real platform CA, SQLite store in a temp dir): every bad input gets its precise status
//! and a message that says what to do, and writes nothing; idempotency replays and key
//! reuse behave as documented; only routers may pay and only cells may deliver.

use std::sync::Arc;

use ldc_cell::{CellConfig, Transport};
use ldc_core::planner::Topology;
use ldc_core::proto::{self, payments_client::PaymentsClient};
use ldc_security::pki::Pki;
use ldc_security::platform;
use ldc_security::tls::ClientAuth;
use ldc_store::{Store, prefix_end, sqlite::SqliteStore};
use tonic::Code;
use tonic::transport::Channel;

struct Cell {
    /// A client holding the router's certificate (the only peer that may pay).
    client: PaymentsClient<Channel>,
    client_channel: Channel,
    addr: std::net::SocketAddr,
    pki: Pki,
    store: Arc<dyn Store>,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts cell `c1` owning shards 0..8 of 10; shards 8 and 9 belong to `c2` (not running).
async fn start() -> Cell {
    start_with(ldc_cell::retention::RETENTION_DEFAULT).await
}

/// [`start`], remembering idempotency keys for `retention`.
async fn start_with(retention: std::time::Duration) -> Cell {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
    let topo = Topology::new(10, &[("c1", "r1"), ("c2", "r1")]);
    let mut t = store.begin().unwrap();
    ldc_control::init(&mut *t, &topo, &["c1", "c1", "c1", "c1", "c2"], 0).unwrap();
    t.commit().unwrap();
    let pki = Pki::new(dir.path().join("pki"));
    platform::ensure_local(&pki, ["c1", "c2"]).unwrap();
    let registry = prometheus::Registry::new();
    let own = pki.files(&platform::cell_leaf("c1"));
    let transport = Transport::MutualTls {
        server: platform::server(own.clone(), ClientAuth::Required, &registry, "cell").unwrap(),
        client: platform::client(own).unwrap(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let cfg = CellConfig {
        cell: "c1".into(),
        colour: "blue".into(),
        store: store.clone(),
        relay: false,
        queue_max: 1024,
        batch_max: 64,
        transport,
        readiness: Default::default(),
        idempotency_retention: retention,
        fail_stop_marker: None,
    };
    let task = tokio::spawn(async move {
        ldc_cell::serve(cfg, listener, registry, async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    let client_channel = channel_as(&pki, addr, platform::ROUTER);
    let client = PaymentsClient::new(client_channel.clone());
    Cell {
        client,
        client_channel,
        addr,
        pki,
        store,
        _dir: dir,
        stop: Some(tx),
        task,
    }
}

impl Cell {
    /// Number of user records in the store (accounts, payments, entries, keys...).
    fn user_keys(&self) -> usize {
        let mut t = self.store.begin_read().unwrap();
        let n: usize = [&b"u/"[..], b"x/", b"ob/", b"t/"]
            .iter()
            .map(|p| {
                ldc_store::scan_all(&mut *t, p, 100_000)
                    .unwrap()
                    .unwrap()
                    .len()
            })
            .sum();
        t.rollback().unwrap();
        n
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
    }
}

/// A mutual-TLS channel to the cell at `addr` presenting certificate `leaf` of `pki`.
fn channel_as(pki: &Pki, addr: std::net::SocketAddr, leaf: &str) -> Channel {
    ldc_security::net::channel(
        &addr.to_string(),
        platform::client(pki.files(leaf)).unwrap(),
        ldc_security::Identity::is_cell,
        std::time::Duration::from_secs(2),
        std::time::Duration::from_secs(5),
    )
    .unwrap()
}

/// A call's answer.
type Reply = Result<tonic::Response<proto::Payment>, tonic::Status>;

fn req<T>(user: &str, m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut()
        .insert(ldc_core::USER_HEADER, user.parse().unwrap());
    r
}

fn topup(user: &str, amount: i64, ccy: &str, key: &str) -> proto::TopUpRequest {
    proto::TopUpRequest {
        user_id: user.into(),
        amount,
        currency: ccy.into(),
        idempotency_key: key.into(),
    }
}

/// A user whose shard (of 10) is owned by c1, and one owned by c2.
fn users() -> (String, String, String) {
    let mut mine = (0..)
        .map(|i| format!("u{i}"))
        .filter(|u| ldc_core::shard::shard_of(u, 10) < 8);
    let theirs = (0..)
        .map(|i| format!("v{i}"))
        .find(|u| ldc_core::shard::shard_of(u, 10) >= 8)
        .unwrap();
    (mine.next().unwrap(), mine.next().unwrap(), theirs)
}

#[tokio::test]
async fn bad_input_is_refused_precisely_and_writes_nothing() {
    let cell = start().await;
    let mut c = cell.client.clone();
    let (alice, bob, remote) = users();
    let open = |u: &str, ccy: &str, k: &str| proto::OpenAccountRequest {
        user_id: u.into(),
        currency: ccy.into(),
        idempotency_key: k.into(),
    };
    c.open_account(req(&alice, open(&alice, "EUR", "o1")))
        .await
        .unwrap();
    c.open_account(req(&bob, open(&bob, "USD", "o2")))
        .await
        .unwrap();
    c.top_up(req(&alice, topup(&alice, 500, "EUR", "t1")))
        .await
        .unwrap();
    let before = cell.user_keys();

    // (status code, substring of the message) for each bad request.
    let cases: Vec<(Reply, Code, &str)> = vec![
        (
            c.top_up(req(&alice, topup(&alice, 0, "EUR", "b1"))).await,
            Code::InvalidArgument,
            "must be positive",
        ),
        (
            c.top_up(req(&alice, topup(&alice, -5, "EUR", "b2"))).await,
            Code::InvalidArgument,
            "must be positive",
        ),
        (
            c.top_up(req(&alice, topup(&alice, i64::MAX, "EUR", "b3")))
                .await,
            Code::InvalidArgument,
            "maximum",
        ),
        (
            c.top_up(req(&alice, topup(&alice, 10, "eur", "b4"))).await,
            Code::InvalidArgument,
            "upper case: EUR",
        ),
        (
            c.top_up(req(&alice, topup(&alice, 10, "XYZ", "b5"))).await,
            Code::InvalidArgument,
            "ISO 4217",
        ),
        (
            c.top_up(req(&alice, topup(&alice, 10, "USD", "b6"))).await,
            Code::FailedPrecondition,
            "currency mismatch",
        ),
        (
            c.top_up(req(&alice, topup(&alice, 10, "EUR", ""))).await,
            Code::InvalidArgument,
            "idempotency_key",
        ),
        (
            c.top_up(req("nobody", topup("nobody", 10, "EUR", "b7")))
                .await,
            Code::NotFound,
            "ldc account open",
        ),
        (
            c.top_up(req("bad/user", topup("bad/user", 10, "EUR", "b8")))
                .await,
            Code::InvalidArgument,
            "user_id",
        ),
        (
            c.top_up(req(&bob, topup(&alice, 10, "EUR", "b9"))).await,
            Code::InvalidArgument,
            "must match",
        ),
        (
            c.withdraw(req(
                &alice,
                proto::WithdrawRequest {
                    user_id: alice.clone(),
                    amount: 501,
                    currency: "EUR".into(),
                    idempotency_key: "b10".into(),
                },
            ))
            .await,
            Code::FailedPrecondition,
            "insufficient funds",
        ),
        (
            c.transfer(req(
                &alice,
                proto::TransferRequest {
                    user_id: alice.clone(),
                    to_user_id: alice.clone(),
                    amount: 1,
                    currency: "EUR".into(),
                    idempotency_key: "b11".into(),
                },
            ))
            .await,
            Code::InvalidArgument,
            "to itself",
        ),
        (
            c.transfer(req(
                &alice,
                proto::TransferRequest {
                    user_id: alice.clone(),
                    to_user_id: bob.clone(),
                    amount: 9999,
                    currency: "EUR".into(),
                    idempotency_key: "b12".into(),
                },
            ))
            .await,
            Code::FailedPrecondition,
            "insufficient funds",
        ),
        (
            c.refund(req(
                &alice,
                proto::RefundRequest {
                    user_id: alice.clone(),
                    payment_id: "garbage".into(),
                    amount: 1,
                    idempotency_key: "b13".into(),
                },
            ))
            .await,
            Code::InvalidArgument,
            "malformed",
        ),
        (
            c.refund(req(
                &alice,
                proto::RefundRequest {
                    user_id: alice.clone(),
                    payment_id: format!("{alice}:1"),
                    amount: 1,
                    idempotency_key: "b14".into(),
                },
            ))
            .await,
            Code::FailedPrecondition,
            "only a received transfer",
        ),
        (
            c.refund(req(
                &alice,
                proto::RefundRequest {
                    user_id: alice.clone(),
                    payment_id: format!("{alice}:99"),
                    amount: 1,
                    idempotency_key: "b15".into(),
                },
            ))
            .await,
            Code::NotFound,
            "no payment",
        ),
        (
            c.top_up(req(&alice, topup(&alice, 7, "EUR", "t1"))).await,
            Code::InvalidArgument,
            "already used for a different request",
        ),
    ];
    for (i, (r, code, text)) in cases.into_iter().enumerate() {
        let s = r.expect_err(&format!("case {i} should fail"));
        assert_eq!(s.code(), code, "case {i}: {}", s.message());
        assert!(
            s.message().contains(text),
            "case {i}: message {:?} lacks {text:?}",
            s.message()
        );
    }
    // Opening twice with a new key: ALREADY_EXISTS.
    let s = c
        .open_account(req(&alice, open(&alice, "EUR", "o9")))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::AlreadyExists);
    let s = c
        .open_account(req(&alice, open(&alice, "EURO", "o8")))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(
        cell.user_keys(),
        before,
        "a refused request wrote to the store"
    );

    // Wrong cell: "moved" with owner and epoch, before anything is done.
    let s = c
        .top_up(req(&remote, topup(&remote, 10, "EUR", "m1")))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unavailable);
    assert_eq!(s.metadata().get(ldc_core::MOVED_OWNER).unwrap(), "c2");
    assert_eq!(s.metadata().get(ldc_core::MOVED_EPOCH).unwrap(), "1");
    let s = c
        .get_balance(req(
            &remote,
            proto::GetBalanceRequest {
                user_id: remote.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unavailable);
    assert_eq!(
        cell.user_keys(),
        before,
        "a moved request wrote to the store"
    );

    // Malformed body: field 2 (amount, an int64) sent as a string.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Garbage {
        #[prost(string, tag = "2")]
        amount: String,
    }
    let mut raw = tonic::client::Grpc::new(cell.client_channel.clone());
    raw.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/ldc.v1.Payments/TopUp");
    let codec = tonic_prost::ProstCodec::<Garbage, proto::Payment>::default();
    let s = raw
        .unary(
            req(
                &alice,
                Garbage {
                    amount: "ten".into(),
                },
            ),
            path,
            codec,
        )
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
    assert!(s.message().contains("malformed message"), "{}", s.message());
    assert_eq!(
        cell.user_keys(),
        before,
        "a malformed request wrote to the store"
    );
    cell.stop().await;
}

#[tokio::test]
async fn replay_returns_the_first_result() {
    let cell = start().await;
    let mut c = cell.client.clone();
    let (alice, _, _) = users();
    c.open_account(req(
        &alice,
        proto::OpenAccountRequest {
            user_id: alice.clone(),
            currency: "EUR".into(),
            idempotency_key: "o".into(),
        },
    ))
    .await
    .unwrap();
    let first = c
        .top_up(req(&alice, topup(&alice, 250, "EUR", "k")))
        .await
        .unwrap()
        .into_inner();
    let again = c
        .top_up(req(&alice, topup(&alice, 250, "EUR", "k")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, again);
    let bal = c
        .get_balance(req(
            &alice,
            proto::GetBalanceRequest {
                user_id: alice.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bal.balance, 250, "a replay applied the payment twice");
    let entries = c
        .list_entries(req(
            &alice,
            proto::ListEntriesRequest {
                user_id: alice.clone(),
                after_seq: 0,
                limit: 0,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(entries.entries.len(), 1);
    let got = c
        .get_payment(req(
            &alice,
            proto::GetPaymentRequest {
                user_id: alice.clone(),
                payment_id: first.payment_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.amount, 250);
    assert!(ldc_cell::reconcile::run(&*cell.store).unwrap().is_clean());
    cell.stop().await;
}

/// The connection failed under the call (tonic reports a broken transport as UNKNOWN or
/// UNAVAILABLE): the request never reached a handler.
fn refused_by_transport(e: &tonic::Status) {
    assert!(
        std::error::Error::source(&e)
            .is_some_and(|s| s.downcast_ref::<tonic::transport::Error>().is_some()),
        "{e:?}"
    );
}

/// Only routers pay and only cells deliver: every other peer is refused before the handler,
/// with the precise status, and nothing is written. A plaintext connection and a
/// certificate of another CA do not get past the handshake.
#[tokio::test]
async fn only_routers_pay_and_only_cells_deliver() {
    use ldc_core::proto::cell_relay_client::CellRelayClient;
    let cell = start().await;
    let (alice, _, _) = users();
    let open = |user: &str| {
        req(
            user,
            proto::OpenAccountRequest {
                user_id: user.into(),
                currency: "EUR".into(),
                idempotency_key: "o".into(),
            },
        )
    };
    let credit = || proto::Credit {
        message_id: "mallory:1".into(),
        from_shard: 0,
        from_user_id: "mallory".into(),
        to_user_id: alice.clone(),
        amount: 1_000_000,
        currency: "EUR".into(),
        kind: proto::CreditKind::Transfer as i32,
        refund_of: String::new(),
    };
    let before = cell.user_keys();

    // A client certificate (even one with every scope) is not a router.
    let cli = channel_as(&cell.pki, cell.addr, platform::CLI);
    let e = PaymentsClient::new(cli.clone())
        .open_account(open(&alice))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("only routers"), "{}", e.message());
    // Neither a client nor a router may deliver a credit.
    for leaf in [platform::CLI, platform::ROUTER, platform::CONTROLLER] {
        let e = CellRelayClient::new(channel_as(&cell.pki, cell.addr, leaf))
            .deliver(credit())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{leaf}: {e:?}");
        assert!(e.message().contains("only cells"), "{}", e.message());
        let e = CellRelayClient::new(channel_as(&cell.pki, cell.addr, leaf))
            .deliver_batch(proto::CreditBatch {
                credits: vec![credit()],
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "batch, {leaf}: {e:?}");
    }
    assert_eq!(cell.user_keys(), before, "a refused peer wrote something");

    // Plaintext h2c: the cell speaks only TLS, so the call fails and nothing is written.
    let plain = Channel::from_shared(format!("http://{}", cell.addr))
        .unwrap()
        .connect_timeout(std::time::Duration::from_secs(2))
        .timeout(std::time::Duration::from_secs(5))
        .connect_lazy();
    let e = CellRelayClient::new(plain)
        .deliver(credit())
        .await
        .unwrap_err();
    refused_by_transport(&e);

    // A cell certificate from another CA fails the handshake.
    let other = tempfile::tempdir().unwrap();
    let other_pki = Pki::new(other.path());
    platform::ensure_local(&other_pki, ["c2"]).unwrap();
    let foreign = ldc_security::net::channel(
        &cell.addr.to_string(),
        // Trusts our CA (so the client side completes), presents the other CA's cell cert.
        platform::client(ldc_security::pki::Files {
            ca: cell.pki.ca_path(),
            ..other_pki.files(&platform::cell_leaf("c2"))
        })
        .unwrap(),
        ldc_security::Identity::is_cell,
        std::time::Duration::from_secs(2),
        std::time::Duration::from_secs(5),
    )
    .unwrap();
    let e = CellRelayClient::new(foreign)
        .deliver(credit())
        .await
        .unwrap_err();
    refused_by_transport(&e);
    assert_eq!(cell.user_keys(), before, "a refused peer wrote something");

    // The same credit from a real cell certificate is taken (rejected here: no account).
    let d = CellRelayClient::new(channel_as(&cell.pki, cell.addr, &platform::cell_leaf("c2")))
        .deliver(credit())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.outcome, proto::DeliverOutcome::Rejected as i32, "{d:?}");
    // And the router's certificate opens the account.
    let mut c = cell.client.clone();
    c.open_account(open(&alice)).await.unwrap();
    cell.stop().await;
}

/// A batch of credits is answered credit by credit, in order, each as `Deliver` would
/// answer it: applied, a duplicate answered as the first time, a reused id with other
/// content refused, a credit for a user without an account (bob's) rejected. A batch over the
/// limit is refused whole with nothing written.
#[tokio::test]
async fn a_batch_of_credits_is_answered_credit_by_credit() {
    use ldc_core::proto::cell_relay_client::CellRelayClient;
    let cell = start().await;
    let (alice, bob, _) = users();
    let mut c = cell.client.clone();
    c.open_account(req(
        &alice,
        proto::OpenAccountRequest {
            user_id: alice.clone(),
            currency: "EUR".into(),
            idempotency_key: "o".into(),
        },
    ))
    .await
    .unwrap();
    let credit = |id: &str, to: &str, amount: i64| proto::Credit {
        message_id: id.into(),
        from_shard: 0,
        from_user_id: "payer".into(),
        to_user_id: to.into(),
        amount,
        currency: "EUR".into(),
        kind: proto::CreditKind::Transfer as i32,
        refund_of: String::new(),
    };
    let mut relay =
        CellRelayClient::new(channel_as(&cell.pki, cell.addr, &platform::cell_leaf("c2")));
    let too_many: Vec<proto::Credit> = (0..=ldc_cell::service::DELIVER_BATCH_MAX)
        .map(|i| credit(&format!("payer:{i}"), &alice, 1))
        .collect();
    let before = cell.user_keys();
    let e = relay
        .deliver_batch(proto::CreditBatch { credits: too_many })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("at most 256"), "{}", e.message());
    assert_eq!(cell.user_keys(), before, "a refused batch wrote something");

    let mut deliver = async |credits: Vec<proto::Credit>| {
        relay
            .deliver_batch(proto::CreditBatch { credits })
            .await
            .unwrap()
            .into_inner()
            .results
    };
    let first = deliver(vec![
        credit("payer:1", &alice, 5),
        credit("payer:2", &alice, 7),
    ])
    .await;
    assert_eq!(first.len(), 2);
    let applied = first[0].response.clone().unwrap();
    assert_eq!(applied.outcome, proto::DeliverOutcome::Applied as i32);
    assert_eq!(
        first[1].response.as_ref().unwrap().outcome,
        proto::DeliverOutcome::Applied as i32
    );
    let results = deliver(vec![
        credit("payer:1", &alice, 5),
        credit("payer:2", &alice, 8),
        credit("payer:3", &bob, 5),
    ])
    .await;
    assert_eq!(results.len(), 3);
    assert_eq!(
        results[0].response.as_ref(),
        Some(&applied),
        "a duplicate's answer"
    );
    assert_ne!(
        results[1].code, 0,
        "a reused id with other content was applied"
    );
    assert!(results[1].response.is_none());
    let rejected = results[2].response.clone().unwrap();
    assert_eq!(rejected.outcome, proto::DeliverOutcome::Rejected as i32);
    let bal = c
        .get_balance(req(
            &alice,
            proto::GetBalanceRequest {
                user_id: alice.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bal.balance, 12, "each credit was applied once");
    cell.stop().await;
}

/// Oversized client input is named by a short prefix in the error, never echoed whole:
/// errors travel in response headers, and a 200 KB echo once broke the router's shared
/// HTTP/2 connection to the cell (UNAVAILABLE for everyone on it). The connection stays
/// usable afterwards.
#[tokio::test]
async fn oversized_input_is_quoted_short_and_the_connection_survives() {
    let cell = start().await;
    let mut c = cell.client.clone();
    let (alice, _, _) = users();
    let huge = "x".repeat(200_000);
    let e = c
        .get_payment(req(
            &alice,
            proto::GetPaymentRequest {
                user_id: alice.clone(),
                payment_id: huge.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::NotFound,
        "{}",
        &e.message()[..100.min(e.message().len())]
    );
    assert!(
        e.message().len() < 300,
        "{} bytes echoed",
        e.message().len()
    );
    let e = c
        .top_up(req(&alice, topup(&alice, 5, &huge, "k")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().len() < 300,
        "{} bytes echoed",
        e.message().len()
    );
    let e = c
        .top_up(req(&alice, topup(&huge, 5, "EUR", "k")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().len() < 300,
        "{} bytes echoed",
        e.message().len()
    );
    // The same connection still answers.
    c.open_account(req(
        &alice,
        proto::OpenAccountRequest {
            user_id: alice.clone(),
            currency: "EUR".into(),
            idempotency_key: "o".into(),
        },
    ))
    .await
    .unwrap();
    cell.stop().await;
}

/// Idempotency keys are remembered for the retention window and then forgotten by the
/// background job (with their age index): within the window a retry replays the first
/// answer; after it, the same key is a new payment, as documented.
#[tokio::test]
async fn idempotency_keys_are_kept_for_the_window_then_forgotten() {
    let cell = start_with(std::time::Duration::from_secs(2)).await;
    let mut c = cell.client.clone();
    let (alice, _, _) = users();
    c.open_account(req(
        &alice,
        proto::OpenAccountRequest {
            user_id: alice.clone(),
            currency: "EUR".into(),
            idempotency_key: "open".into(),
        },
    ))
    .await
    .unwrap();
    let first = c
        .top_up(req(&alice, topup(&alice, 5, "EUR", "k1")))
        .await
        .unwrap()
        .into_inner();
    let replay = c
        .top_up(req(&alice, topup(&alice, 5, "EUR", "k1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        first.payment_id, replay.payment_id,
        "within the window: a replay"
    );
    let records = |cell: &Cell| {
        let mut t = cell.store.begin_read().unwrap();
        let n = t.scan(b"t/", &prefix_end(b"t/"), 100).unwrap().len();
        t.rollback().unwrap();
        n
    };
    assert_eq!(
        records(&cell),
        2,
        "the opening and the top-up are indexed by age"
    );
    let t0 = std::time::Instant::now();
    while records(&cell) > 0 {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "never pruned"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let again = c
        .top_up(req(&alice, topup(&alice, 5, "EUR", "k1")))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(
        again.payment_id, first.payment_id,
        "after the window: a new payment"
    );
    assert_eq!(again.balance_after, 10);
    // The payments themselves stay.
    let p = c
        .get_payment(req(
            &alice,
            proto::GetPaymentRequest {
                user_id: alice.clone(),
                payment_id: first.payment_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.amount, 5);
    cell.stop().await;
}
