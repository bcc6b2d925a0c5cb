//! Every way a payment command can fail, and the gRPC status each maps to.
//!
//! The rule: a client must be able to tell from the code alone whether to fix the request
//! (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, OUT_OF_RANGE, ALREADY_EXISTS), retry
//! the same request with the same idempotency key (UNAVAILABLE, ABORTED, RESOURCE_EXHAUSTED,
//! UNKNOWN), or page someone (INTERNAL). The message says what was wrong and what to do.

use ldc_store::StoreError;
use thiserror::Error;
use tonic::{Code, Status};

#[derive(Debug, Error)]
pub enum PaymentError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error(
        "no account for user {0}; open one with OpenAccount (`ldc account open {0} --currency EUR`)"
    )]
    UnknownAccount(String),
    #[error("account {user} already exists in {currency}")]
    AccountExists { user: String, currency: String },
    #[error(
        "insufficient funds: {user} has {balance} {currency} (minor units), the payment needs {amount}; top up or lower the amount"
    )]
    InsufficientFunds {
        user: String,
        balance: i64,
        amount: i64,
        currency: String,
    },
    #[error(
        "currency mismatch: account {user} is in {account}, the request is in {request}; pay in {account}"
    )]
    CurrencyMismatch {
        user: String,
        account: String,
        request: String,
    },
    #[error("{0}")]
    OutOfRange(String),
    #[error(
        "no payment {id} for user {user}; check the id (`ldc payment get` shows a user's payments)"
    )]
    UnknownPayment { user: String, id: String },
    #[error("payment {id} cannot be refunded: {why}")]
    NotRefundable { id: String, why: String },
    #[error(
        "refund of {amount} exceeds what is left to refund on {id}: {remaining} (paid {paid}, refunded {refunded})"
    )]
    RefundTooLarge {
        id: String,
        amount: i64,
        remaining: i64,
        paid: i64,
        refunded: i64,
    },
    #[error(
        "idempotency key {key:?} was already used for a different request ({first}); use a new key for a new payment"
    )]
    KeyReused { key: String, first: String },
    #[error(
        "shard {shard} moved: it is owned by cell {owner} at epoch {epoch}; the router retries"
    )]
    Moved {
        shard: u32,
        owner: String,
        epoch: u64,
    },
    #[error(
        "cell is overloaded (write queue full); retry with the same idempotency key after a short backoff"
    )]
    Overloaded,
    #[error("cell is shutting down; retry with the same idempotency key")]
    ShuttingDown,
    /// A credit reused a delivered message id with other content: a forgery or a bug,
    /// never a duplicate. Nothing is written; the operator is alarmed.
    #[error(
        "message {message_id} was already delivered with different content; refused (a relay message id is never reused)"
    )]
    RelayConflict { message_id: String },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl PaymentError {
    /// The gRPC code for this error.
    pub fn code(&self) -> Code {
        use PaymentError::*;
        match self {
            InvalidArgument(_) | KeyReused { .. } => Code::InvalidArgument,
            UnknownAccount(_) | UnknownPayment { .. } => Code::NotFound,
            AccountExists { .. } | RelayConflict { .. } => Code::AlreadyExists,
            InsufficientFunds { .. }
            | CurrencyMismatch { .. }
            | NotRefundable { .. }
            | RefundTooLarge { .. } => Code::FailedPrecondition,
            OutOfRange(_) => Code::OutOfRange,
            Moved { .. } | ShuttingDown => Code::Unavailable,
            Overloaded => Code::ResourceExhausted,
            Store(e) if e.is_retryable() => Code::Unavailable,
            Store(StoreError::Undetermined(_) | StoreError::Io(_)) => Code::Unknown,
            Store(StoreError::Full(_)) => Code::ResourceExhausted,
            Store(_) | Corrupt(_) => Code::Internal,
        }
    }

    /// A stable label for metrics.
    pub fn label(&self) -> &'static str {
        use PaymentError::*;
        match self {
            InvalidArgument(_) => "invalid_argument",
            UnknownAccount(_) => "unknown_account",
            AccountExists { .. } => "account_exists",
            InsufficientFunds { .. } => "insufficient_funds",
            CurrencyMismatch { .. } => "currency_mismatch",
            OutOfRange(_) => "out_of_range",
            UnknownPayment { .. } => "unknown_payment",
            NotRefundable { .. } => "not_refundable",
            RefundTooLarge { .. } => "refund_too_large",
            KeyReused { .. } => "key_reused",
            RelayConflict { .. } => "relay_conflict",
            Moved { .. } => "moved",
            Overloaded => "overloaded",
            ShuttingDown => "shutting_down",
            Store(e) => e.label(),
            Corrupt(_) => "corrupt",
        }
    }
}

impl From<PaymentError> for Status {
    fn from(e: PaymentError) -> Status {
        let mut msg = e.to_string();
        if let PaymentError::Store(se) = &e {
            if se.is_retryable() {
                msg.push_str("; nothing was applied, retry with the same idempotency key");
            } else if matches!(se, StoreError::Full(_)) {
                msg.push_str("; nothing was applied, retry with the same idempotency key once the disk has room");
            } else if matches!(se, StoreError::Undetermined(_) | StoreError::Io(_)) {
                msg.push_str("; retry with the same idempotency key to learn the outcome");
            }
        }
        let mut status = Status::new(e.code(), msg);
        if let PaymentError::Moved { owner, epoch, .. } = &e {
            let md = status.metadata_mut();
            if let Ok(v) = owner.parse() {
                md.insert(ldc_core::MOVED_OWNER, v);
            }
            if let Ok(v) = epoch.to_string().parse() {
                md.insert(ldc_core::MOVED_EPOCH, v);
            }
        }
        status
    }
}
