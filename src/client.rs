//! The payment CLI: one gRPC call through the router per command.
//!
//! Every mutating command sends an idempotency key (`--key`, or a fresh random one that is
//! printed), and retries UNAVAILABLE answers with the same key: nothing was applied, or the
//! replay returns the first result, so a retry can never pay twice.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use ldc_core::proto::{self, PaymentKind, PaymentStatus, payments_client::PaymentsClient};
use serde_json::json;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::security::Credential;

use crate::cli::{AccountCmd, Cmd, Global, Output, PaymentCmd};

const ATTEMPTS: u32 = 5;

/// The payment API client of `ldc` commands: TLS to the router with the command's
/// credential (see [`crate::security`]).
pub type Client = PaymentsClient<InterceptedService<Channel, Credential>>;

pub async fn connect(g: &Global, addr: &str) -> Result<Client> {
    let (ch, cred) = crate::security::client_channel(g, addr)
        .with_context(|| format!("cannot set up a connection to {addr}"))?;
    Ok(PaymentsClient::with_interceptor(ch, cred))
}

/// A request carrying the routing header and a request id.
pub fn request<T>(user: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Ok(v) = user.parse() {
        r.metadata_mut().insert(ldc_core::USER_HEADER, v);
    }
    if let Ok(v) = new_key("req").parse() {
        r.metadata_mut().insert(ldc_core::REQUEST_ID_HEADER, v);
    }
    r
}

pub fn new_key(prefix: &str) -> String {
    format!(
        "{prefix}-{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

/// Calls `f` until it succeeds, fails with a non-retryable status, or attempts run out.
async fn retry<T, F, Fut>(mut f: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=ATTEMPTS {
        match f().await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if s.code() == tonic::Code::Unavailable && attempt < ATTEMPTS => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(s) => return Err(s),
        }
    }
    unreachable!("the last attempt returns")
}

pub fn kind_name(k: i32) -> &'static str {
    PaymentKind::try_from(k).map_or("UNKNOWN", |k| k.as_str_name())
}

pub fn status_name(s: i32) -> &'static str {
    PaymentStatus::try_from(s).map_or("UNKNOWN", |s| s.as_str_name())
}

pub fn payment_json(p: &proto::Payment) -> serde_json::Value {
    json!({
        "payment_id": p.payment_id, "user_id": p.user_id, "kind": kind_name(p.kind),
        "status": status_name(p.status), "amount": p.amount, "currency": p.currency,
        "counterparty": p.counterparty, "related_payment_id": p.related_payment_id,
        "refunded": p.refunded, "balance_after": p.balance_after,
        "created_unix_ms": p.created_unix_ms, "status_reason": p.status_reason,
    })
}

fn account_json(a: &proto::Account) -> serde_json::Value {
    json!({"user_id": a.user_id, "currency": a.currency, "balance": a.balance, "shard": a.shard, "cell": a.cell, "epoch": a.epoch})
}

fn print_payment(out: Output, p: &proto::Payment, key: Option<&str>) {
    match out {
        Output::Json => {
            let mut v = payment_json(p);
            if let Some(k) = key {
                v["idempotency_key"] = json!(k);
            }
            println!("{v}");
        }
        Output::Text => {
            println!(
                "{} {} {} {} {} {}{} balance after {}",
                p.payment_id,
                kind_name(p.kind),
                status_name(p.status),
                p.amount,
                p.currency,
                if p.counterparty.is_empty() {
                    String::new()
                } else {
                    format!("counterparty {} ", p.counterparty)
                },
                if p.refunded > 0 {
                    format!("refunded {} ", p.refunded)
                } else {
                    String::new()
                },
                p.balance_after,
            );
            if let Some(k) = key {
                println!("idempotency key: {k} (pass --key {k} to retry safely)");
            }
        }
    }
}

fn print_account(out: Output, a: &proto::Account) {
    match out {
        Output::Json => println!("{}", account_json(a)),
        Output::Text => println!(
            "{} balance {} {} (shard {}, cell {}, epoch {})",
            a.user_id, a.balance, a.currency, a.shard, a.cell, a.epoch
        ),
    }
}

fn fail(addr: &str, s: tonic::Status) -> Result<ExitCode> {
    let hint = if s.code() == tonic::Code::Unavailable && s.message().contains("connect") {
        format!(
            "\nhint: nothing answers at {addr}; start the platform with `ldc up`, or point at a router with --router"
        )
    } else {
        String::new()
    };
    eprintln!("error: {:?}: {}{hint}", s.code(), s.message());
    Ok(ExitCode::from(2))
}

pub async fn run(g: &Global, cmd: Cmd) -> Result<ExitCode> {
    let addr = g.router_addr();
    let client = connect(g, &addr).await?;
    let out = g.output;
    let r = match cmd {
        Cmd::Account {
            cmd:
                AccountCmd::Open {
                    user,
                    currency,
                    key,
                },
        } => {
            let key = key.unwrap_or_else(|| new_key("open"));
            let msg = proto::OpenAccountRequest {
                user_id: user.clone(),
                currency,
                idempotency_key: key,
            };
            retry(|| {
                let mut c = client.clone();
                let req = request(&user, msg.clone());
                async move { c.open_account(req).await }
            })
            .await
            .map(|a| print_account(out, &a))
        }
        Cmd::Topup(a) => {
            let key = a.key.unwrap_or_else(|| new_key("topup"));
            let msg = proto::TopUpRequest {
                user_id: a.user.clone(),
                amount: a.amount,
                currency: a.currency,
                idempotency_key: key.clone(),
            };
            retry(|| {
                let mut c = client.clone();
                let req = request(&a.user, msg.clone());
                async move { c.top_up(req).await }
            })
            .await
            .map(|p| print_payment(out, &p, Some(&key)))
        }
        Cmd::Withdraw(a) => {
            let key = a.key.unwrap_or_else(|| new_key("withdraw"));
            let msg = proto::WithdrawRequest {
                user_id: a.user.clone(),
                amount: a.amount,
                currency: a.currency,
                idempotency_key: key.clone(),
            };
            retry(|| {
                let mut c = client.clone();
                let req = request(&a.user, msg.clone());
                async move { c.withdraw(req).await }
            })
            .await
            .map(|p| print_payment(out, &p, Some(&key)))
        }
        Cmd::Transfer(a) => {
            let key = a.key.unwrap_or_else(|| new_key("transfer"));
            let msg = proto::TransferRequest {
                user_id: a.from.clone(),
                to_user_id: a.to,
                amount: a.amount,
                currency: a.currency,
                idempotency_key: key.clone(),
            };
            retry(|| {
                let mut c = client.clone();
                let req = request(&a.from, msg.clone());
                async move { c.transfer(req).await }
            })
            .await
            .map(|p| print_payment(out, &p, Some(&key)))
        }
        Cmd::Refund(a) => {
            let key = a.key.unwrap_or_else(|| new_key("refund"));
            let msg = proto::RefundRequest {
                user_id: a.user.clone(),
                payment_id: a.payment_id,
                amount: a.amount,
                idempotency_key: key.clone(),
            };
            retry(|| {
                let mut c = client.clone();
                let req = request(&a.user, msg.clone());
                async move { c.refund(req).await }
            })
            .await
            .map(|p| print_payment(out, &p, Some(&key)))
        }
        Cmd::Balance { user } => {
            let msg = proto::GetBalanceRequest {
                user_id: user.clone(),
            };
            retry(|| {
                let mut c = client.clone();
                let req = request(&user, msg.clone());
                async move { c.get_balance(req).await }
            })
            .await
            .map(|a| print_account(out, &a))
        }
        Cmd::Payment {
            cmd: PaymentCmd::Get { payment_id },
        } => {
            let Some((user, _)) = payment_id.rsplit_once(':') else {
                eprintln!(
                    "error: payment id {payment_id:?} is malformed; payment ids look like alice:17"
                );
                return Ok(ExitCode::from(2));
            };
            let user = user.to_string();
            let msg = proto::GetPaymentRequest {
                user_id: user.clone(),
                payment_id,
            };
            retry(|| {
                let mut c = client.clone();
                let req = request(&user, msg.clone());
                async move { c.get_payment(req).await }
            })
            .await
            .map(|p| print_payment(out, &p, None))
        }
        Cmd::Entries { user, after, limit } => {
            let msg = proto::ListEntriesRequest {
                user_id: user.clone(),
                after_seq: after,
                limit,
            };
            retry(|| { let mut c = client.clone(); let req = request(&user, msg.clone()); async move { c.list_entries(req).await } }).await.map(|r| {
                match out {
                    Output::Json => {
                        let entries: Vec<_> = r
                            .entries
                            .iter()
                            .map(|e| json!({"seq": e.seq, "payment_id": e.payment_id, "amount": e.amount, "balance_after": e.balance_after, "kind": kind_name(e.kind)}))
                            .collect();
                        println!("{}", json!({"entries": entries, "next_after_seq": r.next_after_seq}));
                    }
                    Output::Text => {
                        for e in &r.entries {
                            println!("{:>6} {:<24} {:>14} {:>14} {}", e.seq, e.payment_id, e.amount, e.balance_after, kind_name(e.kind));
                        }
                        if r.next_after_seq > 0 {
                            println!("more: --after {}", r.next_after_seq);
                        }
                    }
                }
            })
        }
        _ => unreachable!("dispatched elsewhere"),
    };
    match r {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(s) => fail(&addr, s),
    }
}
