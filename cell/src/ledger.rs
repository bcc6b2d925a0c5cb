//! The payment logic: parse (pure) → execute against a [`Kv`] → encode.
//!
//! Every function here runs inside a store transaction the caller owns and commits, so a
//! command either writes all of its records or none. Each payment writes balanced entries:
//! an entry posts its amount to the user and the opposite to a contra system account of the
//! shard (`post`): top-ups and withdrawals against the clearing account, cross-cell
//! transfers against the transit accounts of the two shards. Money in flight is therefore
//! exactly the sum of transit balances.
//!
//! Fencing is [`fence`]: the caller reads the shard's ownership record *in the same
//! transaction* before executing, so a cell that lost the shard cannot commit.

use ldc_core::planner::Owner;
use ldc_core::proto::{self, CreditKind, DeliverOutcome, PaymentKind, PaymentStatus};
use ldc_core::shard::shard_of;
use ldc_store::{Kv, prefix_end};
use prost::Message;
use sha2::{Digest, Sha256};

use crate::error::PaymentError;
use crate::keys::{self, SysAccount};
use crate::model::*;

/// A command that writes. Built from a validated request by the service layer.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    OpenAccount {
        user: String,
        currency: String,
        key: String,
    },
    TopUp {
        user: String,
        amount: i64,
        currency: String,
        key: String,
    },
    Withdraw {
        user: String,
        amount: i64,
        currency: String,
        key: String,
    },
    Transfer {
        user: String,
        to: String,
        amount: i64,
        currency: String,
        key: String,
    },
    Refund {
        user: String,
        payment_id: String,
        amount: i64,
        key: String,
    },
    /// An inbound credit from another shard's outbox.
    Deliver(proto::Credit),
    /// The payer side learns the outcome of a delivery.
    Settle {
        shard: u32,
        message_id: String,
        applied: bool,
        reason: String,
    },
    /// Retention: forget at most `limit` idempotency records of `shard` created before
    /// `before_ms` (see `retention`).
    Prune {
        shard: u32,
        before_ms: u64,
        limit: usize,
    },
}

impl Command {
    /// The shard this command writes (and must be fenced on).
    pub fn shard(&self, shard_count: u32) -> u32 {
        match self {
            Command::OpenAccount { user, .. }
            | Command::TopUp { user, .. }
            | Command::Withdraw { user, .. }
            | Command::Transfer { user, .. }
            | Command::Refund { user, .. } => shard_of(user, shard_count),
            Command::Deliver(c) => shard_of(&c.to_user_id, shard_count),
            Command::Settle { shard, .. } | Command::Prune { shard, .. } => *shard,
        }
    }

    /// The user the command is about (for tracing).
    pub fn user(&self) -> &str {
        match self {
            Command::OpenAccount { user, .. }
            | Command::TopUp { user, .. }
            | Command::Withdraw { user, .. }
            | Command::Transfer { user, .. }
            | Command::Refund { user, .. } => user,
            Command::Deliver(c) => &c.to_user_id,
            Command::Settle { message_id, .. } => {
                message_id.rsplit_once(':').map_or("", |(u, _)| u)
            }
            Command::Prune { .. } => "",
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Command::OpenAccount { .. } => "open_account",
            Command::TopUp { .. } => "top_up",
            Command::Withdraw { .. } => "withdraw",
            Command::Transfer { .. } => "transfer",
            Command::Refund { .. } => "refund",
            Command::Deliver(_) => "deliver",
            Command::Settle { .. } => "settle",
            Command::Prune { .. } => "prune",
        }
    }

    /// Checks everything that can be checked without the store. Nothing invalid is queued.
    pub fn validate(&self) -> Result<(), PaymentError> {
        match self {
            Command::OpenAccount {
                user,
                currency,
                key,
            } => {
                validate_user("user_id", user)?;
                validate_currency(currency)?;
                validate_key(key)
            }
            Command::TopUp {
                user,
                amount,
                currency,
                key,
            }
            | Command::Withdraw {
                user,
                amount,
                currency,
                key,
            } => {
                validate_user("user_id", user)?;
                validate_amount(*amount)?;
                validate_currency(currency)?;
                validate_key(key)
            }
            Command::Transfer {
                user,
                to,
                amount,
                currency,
                key,
            } => {
                validate_user("user_id", user)?;
                validate_user("to_user_id", to)?;
                if user == to {
                    return Err(PaymentError::InvalidArgument(format!(
                        "cannot transfer from {user} to itself; name another payee"
                    )));
                }
                validate_amount(*amount)?;
                validate_currency(currency)?;
                validate_key(key)
            }
            Command::Refund {
                user,
                payment_id,
                amount,
                key,
            } => {
                validate_user("user_id", user)?;
                if keys::parse_payment_id(payment_id).is_none() {
                    return Err(PaymentError::InvalidArgument(format!(
                        "payment_id {} is malformed; payment ids look like alice:17",
                        quote(payment_id)
                    )));
                }
                validate_amount(*amount)?;
                validate_key(key)
            }
            Command::Deliver(c) => {
                validate_user("from_user_id", &c.from_user_id)?;
                validate_user("to_user_id", &c.to_user_id)?;
                validate_amount(c.amount)?;
                validate_currency(&c.currency)?;
                if keys::parse_payment_id(&c.message_id).is_none() {
                    return Err(PaymentError::InvalidArgument(format!(
                        "message_id {} is malformed",
                        quote(&c.message_id)
                    )));
                }
                match CreditKind::try_from(c.kind) {
                    Ok(CreditKind::Transfer) => Ok(()),
                    Ok(CreditKind::Refund) if keys::parse_payment_id(&c.refund_of).is_some() => {
                        Ok(())
                    }
                    _ => Err(PaymentError::InvalidArgument(format!(
                        "credit kind {} is not valid",
                        c.kind
                    ))),
                }
            }
            Command::Settle { .. } => Ok(()),
            Command::Prune { limit, .. } if *limit <= ldc_store::SCAN_LIMIT_MAX => Ok(()),
            Command::Prune { .. } => Err(PaymentError::InvalidArgument(format!(
                "a prune removes at most {} records",
                ldc_store::SCAN_LIMIT_MAX
            ))),
        }
    }
}

/// What a command produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Account(proto::Account),
    Payment(proto::Payment),
    Delivered(proto::DeliverResponse),
    Settled,
    /// Idempotency records forgotten by a `Prune`.
    Pruned(usize),
    /// A writer heartbeat went through a commit and its sync (see `Writer::heartbeat`).
    Heartbeat,
}

/// Facts about the serving cell the ledger needs.
#[derive(Debug, Clone)]
pub struct Ctx<'a> {
    pub cell: &'a str,
    pub shard_count: u32,
    pub now_ms: u64,
}

/// Reads the ownership record of `shard` for update and checks that `cell` owns it.
/// Returns the epoch. On TiKV the read registers a lock so a concurrent epoch bump
/// conflicts with our commit; on SQLite the write lock already excludes it.
pub fn fence(kv: &mut dyn Kv, cell: &str, shard: u32) -> Result<u64, PaymentError> {
    let raw = kv.get_for_update(&keys::owner(shard))?;
    check_owner(raw, cell, shard)
}

/// Same check on a read-only snapshot (reads need no lock: they change nothing).
pub fn fence_read(kv: &mut dyn Kv, cell: &str, shard: u32) -> Result<u64, PaymentError> {
    let raw = kv.get(&keys::owner(shard))?;
    check_owner(raw, cell, shard)
}

fn check_owner(raw: Option<Vec<u8>>, cell: &str, shard: u32) -> Result<u64, PaymentError> {
    let raw =
        raw.ok_or_else(|| PaymentError::Corrupt(format!("shard {shard} has no ownership record")))?;
    let owner: Owner = serde_json::from_slice(&raw)
        .map_err(|e| PaymentError::Corrupt(format!("ownership record of shard {shard}: {e}")))?;
    if owner.cell != cell {
        return Err(PaymentError::Moved {
            shard,
            owner: owner.cell,
            epoch: owner.epoch,
        });
    }
    Ok(owner.epoch)
}

/// Runs one command. The caller has fenced the command's shard in this transaction.
pub fn execute(
    kv: &mut dyn Kv,
    ctx: &Ctx,
    epoch: u64,
    cmd: &Command,
) -> Result<Outcome, PaymentError> {
    match cmd {
        Command::OpenAccount {
            user,
            currency,
            key,
        } => idempotent(
            kv,
            ctx,
            user,
            key,
            format!("open|{user}|{currency}"),
            |kv, shard| open_account(kv, ctx, epoch, shard, user, currency),
        ),
        Command::TopUp {
            user,
            amount,
            currency,
            key,
        } => idempotent(
            kv,
            ctx,
            user,
            key,
            format!("topup|{user}|{amount}|{currency}"),
            |kv, shard| external(kv, ctx, shard, user, *amount, currency, PaymentKind::TopUp),
        ),
        Command::Withdraw {
            user,
            amount,
            currency,
            key,
        } => idempotent(
            kv,
            ctx,
            user,
            key,
            format!("withdraw|{user}|{amount}|{currency}"),
            |kv, shard| {
                external(
                    kv,
                    ctx,
                    shard,
                    user,
                    *amount,
                    currency,
                    PaymentKind::Withdrawal,
                )
            },
        ),
        Command::Transfer {
            user,
            to,
            amount,
            currency,
            key,
        } => idempotent(
            kv,
            ctx,
            user,
            key,
            format!("transfer|{user}|{to}|{amount}|{currency}"),
            |kv, shard| transfer(kv, ctx, shard, user, to, *amount, currency),
        ),
        Command::Refund {
            user,
            payment_id,
            amount,
            key,
        } => idempotent(
            kv,
            ctx,
            user,
            key,
            format!("refund|{user}|{payment_id}|{amount}"),
            |kv, shard| refund(kv, ctx, shard, user, payment_id, *amount),
        ),
        Command::Deliver(credit) => deliver(kv, ctx, credit).map(Outcome::Delivered),
        Command::Prune {
            shard,
            before_ms,
            limit,
        } => prune(kv, *shard, *before_ms, *limit).map(Outcome::Pruned),
        Command::Settle {
            shard,
            message_id,
            applied,
            reason,
        } => settle(kv, ctx, *shard, message_id, *applied, reason).map(|_| Outcome::Settled),
    }
}

enum Encoded {
    Account(proto::Account),
    /// A new payment: its sequence number and the answer.
    Payment(u64, proto::Payment),
}

/// Replays the first answer for a key, refuses a key reused for another request, or runs
/// `f` and records its answer under the key in the same transaction.
fn idempotent(
    kv: &mut dyn Kv,
    ctx: &Ctx,
    user: &str,
    key: &str,
    request: String,
    f: impl FnOnce(&mut dyn Kv, u32) -> Result<Encoded, PaymentError>,
) -> Result<Outcome, PaymentError> {
    let shard = shard_of(user, ctx.shard_count);
    let ikey = keys::idempotency(shard, user, key);
    let is_account = request.starts_with("open|");
    if let Some(raw) = kv.get(&ikey)? {
        let rec: IdemRec = dec("idempotency", &raw)?;
        if rec.request != request {
            return Err(PaymentError::KeyReused {
                key: key.to_string(),
                first: rec.request,
            });
        }
        return match (rec.answer, is_account) {
            (IdemAnswer::Account(raw), true) => proto::Account::decode(&raw[..])
                .map(Outcome::Account)
                .map_err(|e| PaymentError::Corrupt(format!("idempotent response: {e}"))),
            (IdemAnswer::Payment(seq), false) => {
                first_answer(kv, shard, user, seq).map(Outcome::Payment)
            }
            _ => Err(PaymentError::Corrupt(format!(
                "idempotency record of {user}/{key} does not match its request"
            ))),
        };
    }
    let (answer, outcome) = match f(kv, shard)? {
        Encoded::Account(a) => (IdemAnswer::Account(a.encode_to_vec()), Outcome::Account(a)),
        Encoded::Payment(seq, p) => (IdemAnswer::Payment(seq), Outcome::Payment(p)),
    };
    kv.put(&ikey, &enc(&IdemRec { request, answer }))?;
    kv.put(
        &keys::idempotency_by_age(shard, ctx.now_ms, user, key),
        AGE_INDEX_VALUE,
    )?;
    Ok(outcome)
}

/// The value of an age-index key (the key says everything; some engines keep no empty
/// values).
const AGE_INDEX_VALUE: &[u8] = b"1";

/// Forgets up to `limit` idempotency records of `shard` created before `before_ms`,
/// oldest first. A retry with a forgotten key is a new payment: the retention window is
/// the promise (README, "Idempotency keys").
fn prune(kv: &mut dyn Kv, shard: u32, before_ms: u64, limit: usize) -> Result<usize, PaymentError> {
    let prefix = keys::idempotency_age_prefix(shard);
    let end = format!("{prefix}{before_ms:013}");
    let rows = kv.scan(prefix.as_bytes(), end.as_bytes(), limit)?;
    for (k, _) in &rows {
        let (_, user, key) = keys::parse_idempotency_by_age(shard, k).ok_or_else(|| {
            PaymentError::Corrupt(format!(
                "idempotency age key {}",
                crate::model::quote(&String::from_utf8_lossy(k))
            ))
        })?;
        kv.delete(&keys::idempotency(shard, user, key))?;
        kv.delete(k)?;
    }
    Ok(rows.len())
}

/// The status a payment of `kind` is created with: money leaving for another cell is
/// pending until the payee's cell applies it, everything else completes at once.
fn created_status(kind: PaymentKind) -> PaymentStatus {
    match kind {
        PaymentKind::TransferOut | PaymentKind::RefundOut => PaymentStatus::Pending,
        _ => PaymentStatus::Completed,
    }
}

/// The answer the request that created payment `seq` got, rebuilt from the payment record:
/// everything in it but the status and the refunded amount is fixed at creation, and
/// those two were [`created_status`] and 0.
fn first_answer(
    kv: &mut dyn Kv,
    shard: u32,
    user: &str,
    seq: u64,
) -> Result<proto::Payment, PaymentError> {
    let raw = kv.get(&keys::payment(shard, user, seq))?.ok_or_else(|| {
        PaymentError::Corrupt(format!(
            "idempotency record names payment {} which does not exist",
            keys::payment_id(user, seq)
        ))
    })?;
    let rec: PaymentRec = dec("payment", &raw)?;
    let mut p = to_proto(user, seq, &rec);
    let kind = PaymentKind::try_from(rec.kind)
        .map_err(|_| PaymentError::Corrupt(format!("payment kind {}", rec.kind)))?;
    p.status = created_status(kind) as i32;
    p.refunded = 0;
    Ok(p)
}

fn load_account(
    kv: &mut dyn Kv,
    shard: u32,
    user: &str,
) -> Result<Option<AccountRec>, PaymentError> {
    kv.get(&keys::account(shard, user))?
        .map(|b| dec("account", &b))
        .transpose()
}

fn need_account(
    kv: &mut dyn Kv,
    shard: u32,
    user: &str,
    currency: &str,
) -> Result<AccountRec, PaymentError> {
    let acct = load_account(kv, shard, user)?
        .ok_or_else(|| PaymentError::UnknownAccount(user.to_string()))?;
    if acct.currency != currency {
        return Err(PaymentError::CurrencyMismatch {
            user: user.to_string(),
            account: acct.currency,
            request: currency.to_string(),
        });
    }
    Ok(acct)
}

fn open_account(
    kv: &mut dyn Kv,
    ctx: &Ctx,
    epoch: u64,
    shard: u32,
    user: &str,
    currency: &str,
) -> Result<Encoded, PaymentError> {
    if let Some(a) = load_account(kv, shard, user)? {
        return Err(PaymentError::AccountExists {
            user: user.to_string(),
            currency: a.currency,
        });
    }
    let acct = AccountRec {
        currency: currency.to_string(),
        balance: 0,
        next_payment: 1,
        next_entry: 1,
        created_ms: ctx.now_ms,
    };
    kv.put(&keys::account(shard, user), &enc(&acct))?;
    Ok(Encoded::Account(proto::Account {
        user_id: user.to_string(),
        currency: currency.to_string(),
        balance: 0,
        shard,
        cell: ctx.cell.to_string(),
        epoch,
    }))
}

/// The system account on the other side of a user's entry of `kind`: the outside world
/// for top-ups and withdrawals, money in flight between cells for everything else.
fn contra_of(kind: PaymentKind) -> SysAccount {
    match kind {
        PaymentKind::TopUp | PaymentKind::Withdrawal => SysAccount::Clearing,
        _ => SysAccount::Transit,
    }
}

/// Posts one ledger line: `amount` to the user's account and `-amount` to the shard's
/// contra system account ([`contra_of`] the kind) in the account's currency, so the line
/// balances by construction. The caller checked the user's limits; this asserts them again
/// (TigerBeetle style: check before write).
fn post(
    kv: &mut dyn Kv,
    shard: u32,
    user: &str,
    acct: &mut AccountRec,
    amount: i64,
    payment: u64,
    kind: PaymentKind,
) -> Result<(), PaymentError> {
    let contra = contra_of(kind);
    let sys_key = keys::sys_account(shard, &acct.currency, contra);
    let mut sys: SysAccountRec = kv
        .get(&sys_key)?
        .map(|b| dec("system account", &b))
        .transpose()?
        .unwrap_or_default();
    sys.balance = sys.balance.checked_sub(amount).ok_or_else(|| {
        PaymentError::OutOfRange(format!(
            "the {} account of shard {shard} would overflow",
            contra.as_str()
        ))
    })?;
    sys.postings = checked(sys.postings.checked_add(1), "posting count")?;
    let balance = checked(acct.balance.checked_add(amount), "balance")?;
    if balance < 0 {
        return Err(PaymentError::Corrupt(format!(
            "ledger invariant: the balance of {user} would go negative ({balance})"
        )));
    }
    acct.balance = balance;
    let seq = acct.next_entry;
    acct.next_entry = checked(seq.checked_add(1), "entry sequence")?;
    let e = EntryRec {
        payment,
        amount,
        balance_after: balance,
        kind: kind as i32,
        contra,
    };
    kv.put(&keys::entry(shard, user, seq), &enc(&e))?;
    kv.put(&keys::account(shard, user), &enc(acct))?;
    kv.put(&sys_key, &enc(&sys))?;
    Ok(())
}

/// Every money and sequence operation of the ledger is checked (release builds do not
/// trap on overflow): an overflow refuses the payment as corrupt state, with nothing
/// written, instead of wrapping.
fn checked<T>(v: Option<T>, what: &str) -> Result<T, PaymentError> {
    v.ok_or_else(|| PaymentError::Corrupt(format!("{what} would overflow")))
}

fn check_credit_room(user: &str, acct: &AccountRec, amount: i64) -> Result<(), PaymentError> {
    if acct
        .balance
        .checked_add(amount)
        .is_none_or(|b| b > BALANCE_MAX)
    {
        return Err(PaymentError::OutOfRange(format!(
            "crediting {amount} would take {user}'s balance over the maximum of {BALANCE_MAX} minor units"
        )));
    }
    Ok(())
}

fn check_funds(user: &str, acct: &AccountRec, amount: i64) -> Result<(), PaymentError> {
    if acct.balance < amount {
        return Err(PaymentError::InsufficientFunds {
            user: user.to_string(),
            balance: acct.balance,
            amount,
            currency: acct.currency.clone(),
        });
    }
    Ok(())
}

fn to_proto(user: &str, seq: u64, p: &PaymentRec) -> proto::Payment {
    proto::Payment {
        payment_id: keys::payment_id(user, seq),
        user_id: user.to_string(),
        kind: p.kind,
        status: p.status,
        amount: p.amount,
        currency: p.currency.clone(),
        counterparty: p.counterparty.clone(),
        related_payment_id: p.related.clone(),
        refunded: p.refunded,
        balance_after: p.balance_after,
        created_unix_ms: p.created_ms,
        status_reason: String::new(),
    }
}

struct NewPayment<'a> {
    kind: PaymentKind,
    amount: i64,
    currency: &'a str,
    counterparty: &'a str,
    related: &'a str,
}

/// Allocates a payment id and writes the record (after the balance moved).
fn write_payment(
    kv: &mut dyn Kv,
    ctx: &Ctx,
    shard: u32,
    user: &str,
    acct: &mut AccountRec,
    seq: u64,
    np: NewPayment,
) -> Result<PaymentRec, PaymentError> {
    let rec = PaymentRec {
        kind: np.kind as i32,
        status: created_status(np.kind) as i32,
        amount: np.amount,
        currency: np.currency.to_string(),
        counterparty: np.counterparty.to_string(),
        related: np.related.to_string(),
        refunded: 0,
        balance_after: acct.balance,
        created_ms: ctx.now_ms,
    };
    kv.put(&keys::payment(shard, user, seq), &enc(&rec))?;
    Ok(rec)
}

fn take_payment_seq(acct: &mut AccountRec) -> Result<u64, PaymentError> {
    let seq = acct.next_payment;
    acct.next_payment = checked(seq.checked_add(1), "payment sequence")?;
    Ok(seq)
}

/// Top-up (money in from outside) or withdrawal (money out), against the clearing account.
fn external(
    kv: &mut dyn Kv,
    ctx: &Ctx,
    shard: u32,
    user: &str,
    amount: i64,
    currency: &str,
    kind: PaymentKind,
) -> Result<Encoded, PaymentError> {
    let mut acct = need_account(kv, shard, user, currency)?;
    let signed = if kind == PaymentKind::TopUp {
        check_credit_room(user, &acct, amount)?;
        amount
    } else {
        check_funds(user, &acct, amount)?;
        -amount
    };
    let seq = take_payment_seq(&mut acct)?;
    post(kv, shard, user, &mut acct, signed, seq, kind)?;
    let np = NewPayment {
        kind,
        amount,
        currency,
        counterparty: "",
        related: "",
    };
    let rec = write_payment(kv, ctx, shard, user, &mut acct, seq, np)?;
    Ok(Encoded::Payment(seq, to_proto(user, seq, &rec)))
}

fn enqueue(
    kv: &mut dyn Kv,
    ctx: &Ctx,
    shard: u32,
    credit: &proto::Credit,
) -> Result<(), PaymentError> {
    let rec = OutboxRec {
        credit: credit.encode_to_vec(),
        created_ms: ctx.now_ms,
    };
    kv.put(&keys::outbox(shard, &credit.message_id), &enc(&rec))?;
    Ok(())
}

/// Debits the payer and queues the credit for the payee's cell, atomically.
fn transfer(
    kv: &mut dyn Kv,
    ctx: &Ctx,
    shard: u32,
    user: &str,
    to: &str,
    amount: i64,
    currency: &str,
) -> Result<Encoded, PaymentError> {
    let mut acct = need_account(kv, shard, user, currency)?;
    check_funds(user, &acct, amount)?;
    let seq = take_payment_seq(&mut acct)?;
    let id = keys::payment_id(user, seq);
    post(
        kv,
        shard,
        user,
        &mut acct,
        -amount,
        seq,
        PaymentKind::TransferOut,
    )?;
    let np = NewPayment {
        kind: PaymentKind::TransferOut,
        amount,
        currency,
        counterparty: to,
        related: "",
    };
    let rec = write_payment(kv, ctx, shard, user, &mut acct, seq, np)?;
    let credit = proto::Credit {
        message_id: id,
        from_shard: shard,
        from_user_id: user.to_string(),
        to_user_id: to.to_string(),
        amount,
        currency: currency.to_string(),
        kind: CreditKind::Transfer as i32,
        refund_of: String::new(),
    };
    enqueue(kv, ctx, shard, &credit)?;
    Ok(Encoded::Payment(seq, to_proto(user, seq, &rec)))
}

fn load_payment(
    kv: &mut dyn Kv,
    shard: u32,
    user: &str,
    id: &str,
) -> Result<(u64, PaymentRec), PaymentError> {
    let unknown = || PaymentError::UnknownPayment {
        user: user.to_string(),
        id: quote(id),
    };
    let (owner, seq) = keys::parse_payment_id(id).ok_or_else(unknown)?;
    if owner != user {
        return Err(unknown());
    }
    let raw = kv
        .get(&keys::payment(shard, user, seq))?
        .ok_or_else(unknown)?;
    Ok((seq, dec("payment", &raw)?))
}

/// The payee of a received transfer gives (part of) it back to the payer.
fn refund(
    kv: &mut dyn Kv,
    ctx: &Ctx,
    shard: u32,
    user: &str,
    payment_id: &str,
    amount: i64,
) -> Result<Encoded, PaymentError> {
    let (orig_seq, mut orig) = load_payment(kv, shard, user, payment_id)?;
    if orig.kind != PaymentKind::TransferIn as i32 {
        let kind = PaymentKind::try_from(orig.kind).map_or("unknown", |k| k.as_str_name());
        return Err(PaymentError::NotRefundable {
            id: payment_id.to_string(),
            why: format!(
                "it is a {kind}; only a received transfer (TRANSFER_IN) can be refunded, by its payee"
            ),
        });
    }
    let remaining = orig.amount - orig.refunded;
    if amount > remaining {
        return Err(PaymentError::RefundTooLarge {
            id: payment_id.to_string(),
            amount,
            remaining,
            paid: orig.amount,
            refunded: orig.refunded,
        });
    }
    let mut acct = need_account(kv, shard, user, &orig.currency)?;
    check_funds(user, &acct, amount)?;
    orig.refunded = checked(orig.refunded.checked_add(amount), "refunded amount")?;
    if orig.refunded > orig.amount {
        return Err(PaymentError::Corrupt(
            "ledger invariant: refunded more than paid".into(),
        ));
    }
    kv.put(&keys::payment(shard, user, orig_seq), &enc(&orig))?;
    let seq = take_payment_seq(&mut acct)?;
    let id = keys::payment_id(user, seq);
    let currency = orig.currency.clone();
    post(
        kv,
        shard,
        user,
        &mut acct,
        -amount,
        seq,
        PaymentKind::RefundOut,
    )?;
    let np = NewPayment {
        kind: PaymentKind::RefundOut,
        amount,
        currency: &currency,
        counterparty: &orig.counterparty,
        related: payment_id,
    };
    let rec = write_payment(kv, ctx, shard, user, &mut acct, seq, np)?;
    let credit = proto::Credit {
        message_id: id,
        from_shard: shard,
        from_user_id: user.to_string(),
        to_user_id: orig.counterparty.clone(),
        amount,
        currency,
        kind: CreditKind::Refund as i32,
        refund_of: orig.related.clone(),
    };
    enqueue(kv, ctx, shard, &credit)?;
    Ok(Encoded::Payment(seq, to_proto(user, seq, &rec)))
}

/// Applies an inbound credit exactly once: the dedup record and the credit commit together,
/// and a repeated delivery gets the first answer.
fn deliver(
    kv: &mut dyn Kv,
    ctx: &Ctx,
    c: &proto::Credit,
) -> Result<proto::DeliverResponse, PaymentError> {
    let to = c.to_user_id.as_str();
    let shard = shard_of(to, ctx.shard_count);
    let dkey = keys::dedup(shard, to, &c.message_id);
    let content = credit_digest(c);
    if let Some(raw) = kv.get(&dkey)? {
        let d: DedupRec = dec("dedup", &raw)?;
        if d.content != content {
            return Err(PaymentError::RelayConflict {
                message_id: quote(&c.message_id),
            });
        }
        return Ok(answer(&d));
    }
    let reject =
        |kv: &mut dyn Kv, reason: String| -> Result<proto::DeliverResponse, PaymentError> {
            let d = DedupRec {
                applied: false,
                reason,
                payment_id: String::new(),
                content,
            };
            kv.put(&dkey, &enc(&d))?;
            Ok(answer(&d))
        };
    let mut acct = match load_account(kv, shard, to)? {
        None => return reject(kv, format!("no account for user {to}")),
        Some(a) if a.currency != c.currency => {
            let why = format!(
                "account {to} is in {}, the credit is in {}",
                a.currency, c.currency
            );
            return reject(kv, why);
        }
        Some(a) => a,
    };
    if let Err(e) = check_credit_room(to, &acct, c.amount) {
        return reject(kv, e.to_string());
    }
    let refund = c.kind == CreditKind::Refund as i32;
    let kind = if refund {
        PaymentKind::RefundIn
    } else {
        PaymentKind::TransferIn
    };
    if refund {
        // The payer's original transfer records how much came back.
        match load_payment(kv, shard, to, &c.refund_of) {
            Ok((seq, mut orig)) => {
                orig.refunded = checked(orig.refunded.checked_add(c.amount), "refunded amount")?;
                kv.put(&keys::payment(shard, to, seq), &enc(&orig))?;
            }
            Err(PaymentError::UnknownPayment { .. }) => {
                return reject(kv, format!("refunded payment {} is unknown", c.refund_of));
            }
            Err(e) => return Err(e),
        }
    }
    let seq = take_payment_seq(&mut acct)?;
    let id = keys::payment_id(to, seq);
    post(kv, shard, to, &mut acct, c.amount, seq, kind)?;
    let np = NewPayment {
        kind,
        amount: c.amount,
        currency: &c.currency,
        counterparty: &c.from_user_id,
        related: &c.message_id,
    };
    write_payment(kv, ctx, shard, to, &mut acct, seq, np)?;
    let d = DedupRec {
        applied: true,
        reason: String::new(),
        payment_id: id,
        content,
    };
    kv.put(&dkey, &enc(&d))?;
    Ok(answer(&d))
}

/// What a dedup record remembers of a credit's content: SHA-256 of its protobuf encoding
/// (prost encodes a message's fields in one fixed order, so equal credits hash equal).
fn credit_digest(c: &proto::Credit) -> [u8; 32] {
    Sha256::digest(c.encode_to_vec()).into()
}

fn answer(d: &DedupRec) -> proto::DeliverResponse {
    proto::DeliverResponse {
        outcome: if d.applied {
            DeliverOutcome::Applied
        } else {
            DeliverOutcome::Rejected
        } as i32,
        reason: d.reason.clone(),
        payment_id: d.payment_id.clone(),
    }
}

/// The payer side closes an outbox message: completed, or compensated when rejected.
/// A message already settled is a no-op, so settling twice is harmless.
fn settle(
    kv: &mut dyn Kv,
    ctx: &Ctx,
    shard: u32,
    message_id: &str,
    applied: bool,
    reason: &str,
) -> Result<(), PaymentError> {
    let okey = keys::outbox(shard, message_id);
    let Some(raw) = kv.get(&okey)? else {
        return Ok(());
    };
    let ob: OutboxRec = dec("outbox", &raw)?;
    let c = proto::Credit::decode(&ob.credit[..])
        .map_err(|e| PaymentError::Corrupt(format!("outbox credit: {e}")))?;
    let payer = c.from_user_id.as_str();
    debug_assert_eq!(shard_of(payer, ctx.shard_count), shard);
    let (seq, mut rec) = load_payment(kv, shard, payer, message_id)?;
    if applied {
        rec.status = PaymentStatus::Completed as i32;
    } else {
        let mut acct = load_account(kv, shard, payer)?.ok_or_else(|| {
            PaymentError::Corrupt(format!("payer {payer} of {message_id} has no account"))
        })?;
        let kind = PaymentKind::try_from(rec.kind).unwrap_or(PaymentKind::TransferOut);
        post(kv, shard, payer, &mut acct, c.amount, seq, kind)?;
        rec.status = PaymentStatus::Reversed as i32;
        if c.kind == CreditKind::Refund as i32 {
            // Give the refunded amount back to what can still be refunded.
            let (oseq, mut orig) = load_payment(kv, shard, payer, &rec.related)?;
            orig.refunded = checked(orig.refunded.checked_sub(c.amount), "refunded amount")?;
            kv.put(&keys::payment(shard, payer, oseq), &enc(&orig))?;
        }
        tracing::info!(
            message_id,
            reason,
            "credit rejected by the payee's cell; payer compensated"
        );
    }
    kv.put(&keys::payment(shard, payer, seq), &enc(&rec))?;
    kv.delete(&okey)?;
    Ok(())
}

// ---- reads ----

pub fn get_balance(
    kv: &mut dyn Kv,
    ctx: &Ctx,
    epoch: u64,
    user: &str,
) -> Result<proto::Account, PaymentError> {
    let shard = shard_of(user, ctx.shard_count);
    let a = load_account(kv, shard, user)?
        .ok_or_else(|| PaymentError::UnknownAccount(user.to_string()))?;
    Ok(proto::Account {
        user_id: user.to_string(),
        currency: a.currency,
        balance: a.balance,
        shard,
        cell: ctx.cell.to_string(),
        epoch,
    })
}

pub fn get_payment(
    kv: &mut dyn Kv,
    ctx: &Ctx,
    user: &str,
    id: &str,
) -> Result<proto::Payment, PaymentError> {
    let shard = shard_of(user, ctx.shard_count);
    let (seq, rec) = load_payment(kv, shard, user, id)?;
    Ok(to_proto(user, seq, &rec))
}

/// Most entries one page returns.
pub const ENTRIES_PAGE_MAX: u32 = 1000;

pub fn list_entries(
    kv: &mut dyn Kv,
    ctx: &Ctx,
    user: &str,
    after_seq: u64,
    limit: u32,
) -> Result<proto::ListEntriesResponse, PaymentError> {
    let shard = shard_of(user, ctx.shard_count);
    if load_account(kv, shard, user)?.is_none() {
        return Err(PaymentError::UnknownAccount(user.to_string()));
    }
    let limit = if limit == 0 {
        100
    } else {
        limit.min(ENTRIES_PAGE_MAX)
    };
    // Entries share the journal range with payments; walk it until one entry past the
    // page (to know whether there is more) or the end of the range.
    let end = prefix_end(keys::journal_prefix(shard, user).as_bytes());
    let Some(first) = after_seq.checked_add(1) else {
        return Ok(proto::ListEntriesResponse::default());
    };
    let mut start = keys::entry(shard, user, first);
    start.truncate(start.len() - 1); // from the first journal key of that sequence number
    let mut entries = Vec::with_capacity(limit as usize);
    let mut more = false;
    'pages: loop {
        let rows = kv.scan(&start, &end, 2 * limit as usize + 2)?;
        let exhausted = rows.len() < 2 * limit as usize + 2;
        for (k, v) in &rows {
            let key =
                std::str::from_utf8(k).map_err(|_| PaymentError::Corrupt("journal key".into()))?;
            let Some((_, _, keys::UserKey::Entry(seq))) = keys::parse_user_key(key) else {
                continue;
            };
            if entries.len() == limit as usize {
                more = true;
                break 'pages;
            }
            let e: EntryRec = dec("entry", v)?;
            entries.push(proto::Entry {
                seq,
                payment_id: keys::payment_id(user, e.payment),
                amount: e.amount,
                balance_after: e.balance_after,
                kind: e.kind,
            });
        }
        match rows.last() {
            Some((k, _)) if !exhausted => {
                start = k.clone();
                start.push(0);
            }
            _ => break,
        }
    }
    let next_after_seq = if more {
        entries.last().map_or(0, |e| e.seq)
    } else {
        0
    };
    Ok(proto::ListEntriesResponse {
        entries,
        next_after_seq,
    })
}
