//! The payment CLI: one gRPC call through the router per command.
//!
//! Every mutating command sends an idempotency key (`--key`, or a fresh random one, printed
//! on stderr *before* the first attempt), and retries every answer that leaves the outcome
//! open or says nothing was applied (UNAVAILABLE, DEADLINE_EXCEEDED, UNKNOWN, CANCELLED,
//! ABORTED, RESOURCE_EXHAUSTED) with the same key, with jittered exponential backoff, until a
//! deadline. The cell applies a key once and replays the first answer to every repeat, so a
//! retry (the CLI's own, or a user re-running the command with `--key`) can never pay twice.
//! When the deadline passes with the outcome still open, the command says so, names the
//! key, and exits with [`EXIT_OUTCOME_UNKNOWN`].

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use ldc_core::proto::{self, PaymentKind, PaymentStatus, payments_client::PaymentsClient};
use serde_json::json;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::security::Credential;

use crate::cli::{AccountCmd, Cmd, Global, Output, PaymentCmd};

/// Most attempts of one command.
const ATTEMPTS_MAX: u32 = 8;
/// Deadline of one attempt (sent to the server as `grpc-timeout`).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default deadline of the command over all attempts (`--deadline`).
pub const RETRY_DEADLINE: Duration = Duration::from_secs(30);
/// First backoff, doubled per attempt up to [`BACKOFF_CAP`]; each sleep is drawn uniformly
/// below it ("full jitter"), so clients retrying together spread out.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// Exit code when a payment command gave up with the outcome still open: re-run it with the
/// printed `--key` to learn it (the payment is applied at most once).
pub const EXIT_OUTCOME_UNKNOWN: u8 = 3;
/// Exit code of a refused command (fix the request) or an unreachable platform.
const EXIT_REFUSED: u8 = 2;

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

/// Whether an answer may be retried with the same idempotency key: nothing was applied
/// (UNAVAILABLE, ABORTED, RESOURCE_EXHAUSTED) or the outcome is not known
/// (DEADLINE_EXCEEDED, UNKNOWN, CANCELLED: tonic reports its own client-side timeout as
/// CANCELLED "Timeout expired", after the request may have been sent). Every other code
/// is final: retrying would get it again.
pub fn retryable(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unavailable | DeadlineExceeded | Unknown | Cancelled | Aborted | ResourceExhausted
    )
}

/// The ceiling of the sleep before attempt `attempt + 1` (1-based): exponential, capped.
pub fn backoff_ceiling(attempt: u32) -> Duration {
    BACKOFF_BASE
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(BACKOFF_CAP)
}

/// Calls `f` with a per-attempt deadline until it succeeds, fails with a final status, or
/// attempts or the overall deadline run out (then the last status is returned).
async fn retry<T, M, F, Fut>(
    within: Duration,
    user: &str,
    msg: &M,
    mut f: F,
) -> Result<T, tonic::Status>
where
    M: Clone,
    F: FnMut(tonic::Request<M>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut attempt = 1;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let mut req = request(user, msg.clone());
        req.set_timeout(ATTEMPT_TIMEOUT.min(left));
        let r = match tokio::time::timeout(ATTEMPT_TIMEOUT.min(left), f(req)).await {
            Ok(r) => r,
            Err(_) => Err(tonic::Status::deadline_exceeded(
                "no answer within the attempt deadline",
            )),
        };
        let s = match r {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if !retryable(s.code()) => return Err(s),
            Err(s) => s,
        };
        let sleep = backoff_ceiling(attempt).mul_f64(rand::random::<f64>());
        if attempt >= ATTEMPTS_MAX || tokio::time::Instant::now() + sleep >= deadline {
            return Err(s);
        }
        tracing::debug!(attempt, code = ?s.code(), "retrying with the same idempotency key");
        tokio::time::sleep(sleep).await;
        attempt += 1;
    }
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
        Output::Json | Output::Yaml => {
            let mut v = payment_json(p);
            if let Some(k) = key {
                v["idempotency_key"] = json!(k);
            }
            crate::cli::print_doc(out, &v);
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
        }
    }
}

fn print_account(out: Output, a: &proto::Account) {
    match out {
        Output::Json | Output::Yaml => crate::cli::print_doc(out, &account_json(a)),
        Output::Text => println!(
            "{} balance {} {} (shard {}, cell {}, epoch {})",
            a.user_id, a.balance, a.currency, a.shard, a.cell, a.epoch
        ),
    }
}

fn fail(addr: &str, s: tonic::Status, key: Option<&str>) -> Result<ExitCode> {
    eprintln!("error: {:?}: {}", s.code(), s.message());
    if let Some(k) = key.filter(|_| retryable(s.code())) {
        eprintln!(
            "the outcome is not known: the payment was applied once or not at all. Run the same \
             command again with --key {k} to learn which (it cannot pay twice)"
        );
        return Ok(ExitCode::from(EXIT_OUTCOME_UNKNOWN));
    }
    if s.code() == tonic::Code::Unavailable && s.message().contains("connect") {
        eprintln!(
            "hint: nothing answers at {addr}; start the platform with `ldc up`, or point at a router with --router"
        );
    }
    Ok(ExitCode::from(EXIT_REFUSED))
}

/// The idempotency key of a mutating command: the user's, or a new one announced on stderr
/// before anything is sent, so an interrupted command can be re-run with it.
fn key_of(given: Option<String>, verb: &str) -> String {
    given.unwrap_or_else(|| {
        let k = new_key(verb);
        eprintln!(
            "idempotency key: {k} (if this command is interrupted, re-run it with --key {k})"
        );
        k
    })
}

pub async fn run(g: &Global, cmd: Cmd) -> Result<ExitCode> {
    let addr = g.router_addr();
    let client = connect(g, &addr).await?;
    let out = g.output;
    let within = Duration::from_secs_f64(g.deadline);
    let c = &client;
    let mut key = None;
    let r = match cmd {
        Cmd::Account {
            cmd:
                AccountCmd::Open {
                    user,
                    currency,
                    key: k,
                },
        } => {
            let k: &str = key.insert(key_of(k, "open"));
            let msg = proto::OpenAccountRequest {
                user_id: user.clone(),
                currency,
                idempotency_key: k.to_string(),
            };
            retry(within, &user, &msg, |r| async move {
                c.clone().open_account(r).await
            })
            .await
            .map(|a| print_account(out, &a))
        }
        Cmd::Topup(a) => {
            let k: &str = key.insert(key_of(a.key, "topup"));
            let msg = proto::TopUpRequest {
                user_id: a.user.clone(),
                amount: a.amount,
                currency: a.currency,
                idempotency_key: k.to_string(),
            };
            retry(within, &a.user, &msg, |r| async move {
                c.clone().top_up(r).await
            })
            .await
            .map(|p| print_payment(out, &p, Some(k)))
        }
        Cmd::Withdraw(a) => {
            let k: &str = key.insert(key_of(a.key, "withdraw"));
            let msg = proto::WithdrawRequest {
                user_id: a.user.clone(),
                amount: a.amount,
                currency: a.currency,
                idempotency_key: k.to_string(),
            };
            retry(within, &a.user, &msg, |r| async move {
                c.clone().withdraw(r).await
            })
            .await
            .map(|p| print_payment(out, &p, Some(k)))
        }
        Cmd::Transfer(a) => {
            let k: &str = key.insert(key_of(a.key, "transfer"));
            let msg = proto::TransferRequest {
                user_id: a.from.clone(),
                to_user_id: a.to,
                amount: a.amount,
                currency: a.currency,
                idempotency_key: k.to_string(),
            };
            retry(within, &a.from, &msg, |r| async move {
                c.clone().transfer(r).await
            })
            .await
            .map(|p| print_payment(out, &p, Some(k)))
        }
        Cmd::Refund(a) => {
            let k: &str = key.insert(key_of(a.key, "refund"));
            let msg = proto::RefundRequest {
                user_id: a.user.clone(),
                payment_id: a.payment_id,
                amount: a.amount,
                idempotency_key: k.to_string(),
            };
            retry(within, &a.user, &msg, |r| async move {
                c.clone().refund(r).await
            })
            .await
            .map(|p| print_payment(out, &p, Some(k)))
        }
        Cmd::Balance { user } => {
            let msg = proto::GetBalanceRequest {
                user_id: user.clone(),
            };
            retry(within, &user, &msg, |r| async move {
                c.clone().get_balance(r).await
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
                return Ok(ExitCode::from(EXIT_REFUSED));
            };
            let user = user.to_string();
            let msg = proto::GetPaymentRequest {
                user_id: user.clone(),
                payment_id,
            };
            retry(within, &user, &msg, |r| async move {
                c.clone().get_payment(r).await
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
            retry(within, &user, &msg, |r| async move {
                c.clone().list_entries(r).await
            })
            .await
            .map(|r| print_entries(out, &r))
        }
        _ => unreachable!("dispatched elsewhere"),
    };
    match r {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(s) => fail(&addr, s, key.as_deref()),
    }
}

fn print_entries(out: Output, r: &proto::ListEntriesResponse) {
    match out {
        Output::Json | Output::Yaml => {
            let entries: Vec<_> = r
                .entries
                .iter()
                .map(|e| json!({"seq": e.seq, "payment_id": e.payment_id, "amount": e.amount, "balance_after": e.balance_after, "kind": kind_name(e.kind)}))
                .collect();
            crate::cli::print_doc(
                out,
                &json!({"entries": entries, "next_after_seq": r.next_after_seq}),
            );
        }
        Output::Text => {
            for e in &r.entries {
                println!(
                    "{:>6} {:<24} {:>14} {:>14} {}",
                    e.seq,
                    e.payment_id,
                    e.amount,
                    e.balance_after,
                    kind_name(e.kind)
                );
            }
            if r.next_after_seq > 0 {
                println!("more: --after {}", r.next_after_seq);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_open_or_unapplied_outcomes_are_retried() {
        use tonic::Code::*;
        for c in [
            Unavailable,
            DeadlineExceeded,
            Unknown,
            Cancelled,
            Aborted,
            ResourceExhausted,
        ] {
            assert!(retryable(c), "{c:?}");
        }
        for c in [
            Ok,
            InvalidArgument,
            NotFound,
            AlreadyExists,
            PermissionDenied,
            FailedPrecondition,
            OutOfRange,
            Unimplemented,
            Internal,
            DataLoss,
            Unauthenticated,
        ] {
            assert!(!retryable(c), "{c:?}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        assert_eq!(backoff_ceiling(1), BACKOFF_BASE);
        assert_eq!(backoff_ceiling(2), BACKOFF_BASE * 2);
        assert_eq!(backoff_ceiling(3), BACKOFF_BASE * 4);
        assert_eq!(backoff_ceiling(40), BACKOFF_CAP);
        assert_eq!(backoff_ceiling(u32::MAX), BACKOFF_CAP);
        let total: Duration = (1..ATTEMPTS_MAX).map(backoff_ceiling).sum();
        assert!(
            total < RETRY_DEADLINE,
            "the attempts fit the deadline: {total:?}"
        );
    }
}
