//! The trust boundary of the platform on one machine (`ldc up`, real processes, its own
//! PKI): every call that a credential may not make is refused with its precise status,
//! and nothing is written — balances, ledgers, idempotency and dedup records, outboxes
//! unchanged, `ldc reconcile` clean. What is allowed still works, end to end.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use common::payments::{counter, http_get};
use common::*;
use ldc_core::authz::{Principal, Scope};
use ldc_core::proto::{self, cell_relay_client::CellRelayClient};
use ldc_security::pki::Pki;
use ldc_security::platform;
use ldc_security::token::TokenIssuer;
use ldc_store::prefix_end;
use tonic::Code;

/// Every user-visible record: accounts, journals, idempotency and dedup records (`u/`),
/// system accounts (`x/`), outboxes (`ob/`).
fn user_records(data: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let store = ldc_store::open(&data.join("store.db").display().to_string()).unwrap();
    let mut t = store.begin_read().unwrap();
    let mut all = Vec::new();
    for p in [&b"u/"[..], b"x/", b"ob/"] {
        all.extend(ldc_store::scan_all(&mut *t, p, 100_000).unwrap().unwrap());
    }
    all
}

fn with_token<T>(msg: T, user: &str, token: Option<&str>) -> tonic::Request<T> {
    let mut r = req(user, msg);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

fn refused<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    says: &str,
) {
    let e = r.expect_err("must be refused");
    assert_eq!(e.code(), code, "{e:?}");
    assert!(e.message().contains(says), "{}", e.message());
}

/// The transport refused the connection (no handler ran).
fn no_connection<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) {
    let e = r.expect_err("must fail");
    assert!(
        std::error::Error::source(&e)
            .is_some_and(|s| s.downcast_ref::<tonic::transport::Error>().is_some()),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_credential_may_not_do_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ldc");
    let platform = Platform::start(&data, &["--regions", "1", "--cells-per-region", "2"]);
    let admin = platform.client().await;
    for u in ["alice", "bob"] {
        open_and_fund(&admin, u, 1_000).await;
    }
    // One real transfer, delivered: its credit is the one a forger will try to replay.
    admin
        .clone()
        .transfer(req(
            "alice",
            proto::TransferRequest {
                user_id: "alice".into(),
                to_user_id: "bob".into(),
                amount: 100,
                currency: "EUR".into(),
                idempotency_key: "real".into(),
            },
        ))
        .await
        .unwrap();
    wait_settled(&data, Duration::from_secs(20));
    let before = user_records(&data);

    let pki = Pki::new(data.join("pki"));
    let issuer = TokenIssuer::from_pem_file(&pki.token_key_path()).unwrap();
    let hour = Duration::from_secs(3600);
    let token = |p: Principal| issuer.issue(&p, hour).unwrap();
    let alice_read = token(Principal::user("alice", [Scope::Read]));
    let alice = token(Principal::user("alice", [Scope::Read, Scope::Transfer]));
    let payments = token(Principal::service(
        "payments",
        [Scope::Read, Scope::Transfer],
    ));
    let expired = issuer
        .issue_at(
            &Principal::user("alice", [Scope::Read, Scope::Transfer]),
            SystemTime::now() - 2 * hour,
            hour,
        )
        .unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let other = Pki::new(other_dir.path());
    platform::ensure_local(&other, ["r1-a"]).unwrap();
    let foreign = TokenIssuer::from_pem_file(&other.token_key_path())
        .unwrap()
        .issue(
            &Principal::user("alice", [Scope::Read, Scope::Transfer]),
            hour,
        )
        .unwrap();

    // Token clients hold no certificate: TLS trusting the platform CA, nothing more.
    let anon = {
        let cfg = ldc_security::tls::anonymous_client_config(&pki.ca_path()).unwrap();
        let ch = ldc_security::net::channel(
            &platform.router,
            ldc_security::tls::Reloading::fixed(cfg),
            |id| matches!(id, ldc_security::Identity::Router),
            Duration::from_secs(2),
            Duration::from_secs(5),
        )
        .unwrap();
        proto::payments_client::PaymentsClient::new(ch)
    };
    let withdraw = |user: &str| proto::WithdrawRequest {
        user_id: user.into(),
        amount: 500,
        currency: "EUR".into(),
        idempotency_key: "w".into(),
    };
    let transfer = |from: &str, to: &str| proto::TransferRequest {
        user_id: from.into(),
        to_user_id: to.into(),
        amount: 500,
        currency: "EUR".into(),
        idempotency_key: "t".into(),
    };
    let topup = || proto::TopUpRequest {
        user_id: "alice".into(),
        amount: 1_000_000,
        currency: "EUR".into(),
        idempotency_key: "mint".into(),
    };
    let mut c = anon.clone();
    refused(
        c.withdraw(with_token(withdraw("alice"), "alice", None))
            .await,
        Code::Unauthenticated,
        "no credentials",
    );
    refused(
        c.withdraw(with_token(withdraw("bob"), "bob", Some(&alice)))
            .await,
        Code::PermissionDenied,
        "cannot act for user \"bob\"",
    );
    refused(
        c.transfer(with_token(transfer("bob", "alice"), "bob", Some(&alice)))
            .await,
        Code::PermissionDenied,
        "cannot act for user \"bob\"",
    );
    refused(
        c.transfer(with_token(
            transfer("alice", "bob"),
            "alice",
            Some(&alice_read),
        ))
        .await,
        Code::PermissionDenied,
        "lacks scope payments:transfer",
    );
    refused(
        c.top_up(with_token(topup(), "alice", Some(&payments)))
            .await,
        Code::PermissionDenied,
        "lacks scope payments:funds",
    );
    refused(
        c.withdraw(with_token(withdraw("alice"), "alice", Some(&alice)))
            .await,
        Code::PermissionDenied,
        "only a service",
    );
    refused(
        c.transfer(with_token(
            transfer("alice", "bob"),
            "alice",
            Some(&expired),
        ))
        .await,
        Code::Unauthenticated,
        "expired",
    );
    refused(
        c.transfer(with_token(
            transfer("alice", "bob"),
            "alice",
            Some(&foreign),
        ))
        .await,
        Code::Unauthenticated,
        "not signed by a key this platform trusts",
    );

    // The relay: never through the router, and straight to a cell only from a cell.
    let status = platform.status();
    let cell_of = |name: &str| {
        status["cells"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["cell"] == name)
            .unwrap()["colours"]["blue"]["endpoints"][0]
            .as_str()
            .unwrap()
            .to_string()
    };
    let bob_shard = ldc_core::shard::shard_of("bob", 100);
    let bob_cell = platform.owner_of("bob")["cell"]
        .as_str()
        .unwrap()
        .to_string();
    let bob_addr = cell_of(&bob_cell);
    let forged = || {
        let mut r = req(
            "bob",
            proto::Credit {
                message_id: "mallory:1".into(),
                from_user_id: "mallory".into(),
                to_user_id: "bob".into(),
                amount: 1_000_000,
                currency: "EUR".into(),
                kind: proto::CreditKind::Transfer as i32,
                ..Default::default()
            },
        );
        r.set_timeout(Duration::from_secs(5));
        r
    };
    let relay_as = |addr: &str, leaf: &str| CellRelayClient::new(channel_as(&data, addr, leaf));
    refused(
        relay_as(&platform.router, platform::CLI)
            .deliver(forged())
            .await,
        Code::PermissionDenied,
        "private cell-to-cell relay",
    );
    for leaf in [platform::CLI, platform::ROUTER, platform::CONTROLLER] {
        refused(
            relay_as(&bob_addr, leaf).deliver(forged()).await,
            Code::PermissionDenied,
            "only cells",
        );
    }
    let plain = tonic::transport::Channel::from_shared(format!("http://{bob_addr}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    no_connection(CellRelayClient::new(plain).deliver(forged()).await);
    let foreign_cell = ldc_security::net::channel(
        &bob_addr,
        platform::client(ldc_security::pki::Files {
            ca: pki.ca_path(),
            ..other.files(&platform::cell_leaf("r1-a"))
        })
        .unwrap(),
        ldc_security::Identity::is_cell,
        Duration::from_secs(2),
        Duration::from_secs(5),
    )
    .unwrap();
    no_connection(CellRelayClient::new(foreign_cell).deliver(forged()).await);

    // A real cell replaying the delivered transfer's message id with other content.
    let mut own_cell = relay_as(&bob_addr, &platform::cell_leaf(&bob_cell));
    let real_id = {
        let store = ldc_store::open(&data.join("store.db").display().to_string()).unwrap();
        let mut t = store.begin_read().unwrap();
        let p = format!("u/{bob_shard:05}/bob/d/");
        let rows = t.scan(p.as_bytes(), &prefix_end(p.as_bytes()), 10).unwrap();
        assert_eq!(rows.len(), 1, "bob received one credit");
        String::from_utf8(rows[0].0[p.len()..].to_vec()).unwrap()
    };
    let mut replay = forged();
    replay.get_mut().message_id = real_id.clone();
    refused(
        own_cell.deliver(replay).await,
        Code::AlreadyExists,
        "already delivered with different content",
    );

    assert!(
        user_records(&data) == before,
        "a refused call wrote something"
    );
    let r = reconcile(&data);
    assert_eq!(r["clean"], true, "{r}");
    let m = http_get(&platform.admin, "/metrics").await;
    assert!(
        counter(
            &m,
            "ldc_router_auth_refusals_total",
            &[
                ("code", "PERMISSION_DENIED"),
                ("reason", "relay_not_public")
            ]
        ) >= 1.0,
        "{m}"
    );

    // A table written into the store by someone without the publisher's key (pointing
    // every cell at one endpoint, with a higher epoch) is refused: the router keeps its
    // signed table, counts the refusal, and payments keep going to the right cells.
    let epoch_before: u64 =
        serde_json::from_str::<serde_json::Value>(&http_get(&platform.admin, "/table").await)
            .unwrap()["epoch"]
            .as_u64()
            .unwrap();
    {
        let store = ldc_store::open(&data.join("store.db").display().to_string()).unwrap();
        let mut t = store.begin().unwrap();
        let raw = t.get(ldc_core::routing::STORE_KEY).unwrap().unwrap();
        let mut table: ldc_core::routing::RoutingTable = serde_json::from_slice(&raw).unwrap();
        table.epoch += 100;
        for c in table.cells.values_mut() {
            c.blue = vec![bob_addr.clone()];
            c.green.clear();
        }
        t.put(
            ldc_core::routing::STORE_KEY,
            &serde_json::to_vec(&table).unwrap(),
        )
        .unwrap();
        t.commit().unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = http_get(&platform.admin, "/metrics").await;
        if counter(
            &m,
            "ldc_router_source_errors_total",
            &[("reason", "bad_signature")],
        ) >= 1.0
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tampered table not refused:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let epoch_now =
        serde_json::from_str::<serde_json::Value>(&http_get(&platform.admin, "/table").await)
            .unwrap()["epoch"]
            .as_u64()
            .unwrap();
    assert_eq!(epoch_now, epoch_before, "the router took a tampered table");

    // What is allowed works: alice's own token pays bob, bob's balance is right.
    c.transfer(with_token(
        proto::TransferRequest {
            idempotency_key: "alice-own".into(),
            ..transfer("alice", "bob")
        },
        "alice",
        Some(&alice),
    ))
    .await
    .unwrap();
    let b = c
        .get_balance(with_token(
            proto::GetBalanceRequest {
                user_id: "alice".into(),
            },
            "alice",
            Some(&alice_read),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.balance, 1_000 - 100 - 500);

    // An oversized field through the router: a precise NOT_FOUND quoting a short prefix,
    // and the router's connection to the cell (shared by every request) survives it.
    let e = admin
        .clone()
        .get_payment(req(
            "alice",
            proto::GetPaymentRequest {
                user_id: "alice".into(),
                payment_id: "x".repeat(200_000),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{}", e.code());
    assert!(
        e.message().len() < 300,
        "{} bytes echoed",
        e.message().len()
    );
    c.get_balance(with_token(
        proto::GetBalanceRequest {
            user_id: "alice".into(),
        },
        "alice",
        Some(&alice_read),
    ))
    .await
    .unwrap();
    drop(platform);
}
