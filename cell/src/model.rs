//! Stored records and the checks every input goes through before it reaches the ledger.
//!
//! Hot-path records are encoded with `postcard` (compact, fast); control records
//! (ownership, topology, routing) are JSON so people can read them with `sqlite3`.

use serde::{Deserialize, Serialize};

use crate::error::PaymentError;
pub use crate::keys::SysAccount;

/// Largest amount of one payment, in minor units (a limit on everything: 10^15 minor
/// units is ten trillion of a two-decimal currency).
pub const AMOUNT_MAX: i64 = 1_000_000_000_000_000;
/// Largest balance an account may reach. Far below `i64::MAX`, so sums over many accounts
/// in reconciliation cannot overflow `i128` and compensation can never overflow `i64`.
pub const BALANCE_MAX: i64 = 100_000_000_000_000_000;
/// Longest idempotency key, in bytes.
pub const KEY_LEN_MAX: usize = 128;

/// Active ISO 4217 currency codes (2024 list; funds and precious metals excluded), sorted
/// for a binary search on the hot path.
const ISO_4217: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT",
    "BGN", "BHD", "BIF", "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD",
    "CDF", "CHF", "CLP", "CNY", "COP", "CRC", "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD",
    "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ",
    "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IQD", "IRR", "ISK", "JMD", "JOD",
    "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD", "KZT", "LAK", "LBP", "LKR",
    "LRD", "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR",
    "MWK", "MXN", "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN",
    "PGK", "PHP", "PKR", "PLN", "PYG", "QAR", "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR",
    "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP", "SZL", "THB",
    "TJS", "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX", "USD", "UYU", "UZS",
    "VED", "VES", "VND", "VUV", "WST", "XAF", "XCD", "XCG", "XOF", "XPF", "YER", "ZAR", "ZMW",
    "ZWG",
];

/// Most characters of client input an error message quotes: errors travel in response
/// headers, and an echoed 200 KB field once broke a router's shared HTTP/2 connection.
pub const QUOTE_CHARS_MAX: usize = 64;

/// How an error names client input: quoted, at most [`QUOTE_CHARS_MAX`] characters.
pub fn quote(input: &str) -> String {
    ldc_core::quote_prefix(input, QUOTE_CHARS_MAX)
}

/// Checks an ISO 4217 code.
pub fn validate_currency(ccy: &str) -> Result<(), PaymentError> {
    if ISO_4217.binary_search(&ccy).is_ok() {
        return Ok(());
    }
    let hint = if ccy.len() == 3 && ISO_4217.iter().any(|c| c.eq_ignore_ascii_case(ccy)) {
        format!(" (codes are upper case: {})", ccy.to_ascii_uppercase())
    } else {
        String::new()
    };
    Err(PaymentError::InvalidArgument(format!(
        "currency {} is not an active ISO 4217 code{hint}; use e.g. EUR, USD or CNY",
        quote(ccy)
    )))
}

/// Checks a payment amount in minor units.
pub fn validate_amount(amount: i64) -> Result<(), PaymentError> {
    if amount <= 0 {
        return Err(PaymentError::InvalidArgument(format!(
            "amount {amount} must be positive (integer minor units, e.g. 1050 for 10.50)"
        )));
    }
    if amount > AMOUNT_MAX {
        return Err(PaymentError::InvalidArgument(format!(
            "amount {amount} is over the per-payment maximum of {AMOUNT_MAX} minor units; split the payment"
        )));
    }
    Ok(())
}

/// Checks a user id, naming the field in the error.
pub fn validate_user(field: &str, user: &str) -> Result<(), PaymentError> {
    ldc_core::shard::validate_user_id(user)
        .map_err(|e| PaymentError::InvalidArgument(format!("{field}: {e}")))
}

/// Checks an idempotency key: 1 to 128 printable ASCII characters.
pub fn validate_key(key: &str) -> Result<(), PaymentError> {
    if key.is_empty() {
        return Err(PaymentError::InvalidArgument(
            "idempotency_key is empty; every mutating call needs a unique key (e.g. a UUID) so it can be retried safely"
                .into(),
        ));
    }
    if key.len() > KEY_LEN_MAX || !key.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(PaymentError::InvalidArgument(format!(
            "idempotency_key must be 1 to {KEY_LEN_MAX} printable ASCII characters without spaces"
        )));
    }
    Ok(())
}

/// A user's account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRec {
    pub currency: String,
    pub balance: i64,
    pub next_payment: u64,
    pub next_entry: u64,
    pub created_ms: u64,
}

/// A shard's clearing or transit account (per currency). Balances may be negative.
/// Its postings are the contra legs of user entries (see [`EntryRec`]), so it has no entry
/// rows of its own; `postings` counts them for reconciliation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysAccountRec {
    pub balance: i64,
    pub postings: u64,
}

/// A payment as stored; mirrors `proto::Payment`. Its id is `{user}:{seq}` from its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRec {
    pub kind: i32,
    pub status: i32,
    pub amount: i64,
    pub currency: String,
    pub counterparty: String,
    pub related: String,
    pub refunded: i64,
    pub balance_after: i64,
    pub created_ms: u64,
}

/// One ledger line with both of its legs, as a TigerBeetle transfer: `amount` is posted
/// to the user's account and `-amount` to the shard's `contra` system account (clearing
/// for top-ups and withdrawals, transit for money between cells), so every line balances
/// by construction. The system account's side needs no row of its own: one row per
/// payment instead of two, and a shard's system accounts (no longer interleaved with
/// their entries) sit together on one B-tree page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryRec {
    /// Sequence number of the user's payment this line belongs to (`{user}:{payment}`).
    pub payment: u64,
    pub amount: i64,
    pub balance_after: i64,
    pub kind: i32,
    pub contra: SysAccount,
}

/// What the first request with an idempotency key asked and got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdemRec {
    /// Canonical form of the request; a replay must match it exactly.
    pub request: String,
    pub answer: IdemAnswer,
}

/// The first answer to an idempotency key. A payment is named, not copied: its record
/// holds every field of the first answer (see `ledger::first_answer`), and a small
/// idempotency record keeps more of them on a page (they are the one write per payment
/// that lands on a random page).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdemAnswer {
    /// The encoded `proto::Account` an account opening returned.
    Account(Vec<u8>),
    /// The sequence number of the payment the request created.
    Payment(u64),
}

/// The answer given to an inbound credit, replayed to repeated deliveries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupRec {
    pub applied: bool,
    pub reason: String,
    pub payment_id: String,
    /// SHA-256 of the credit as delivered (its protobuf encoding): a second delivery with
    /// this message id is a duplicate only if its content is the same.
    pub content: [u8; 32],
}

/// A message waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxRec {
    /// Encoded `proto::Credit`.
    pub credit: Vec<u8>,
    pub created_ms: u64,
}

/// Encodes a hot-path record.
pub fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("records always encode")
}

/// Decodes a hot-path record; a failure means the store holds something we did not write.
pub fn dec<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, PaymentError> {
    postcard::from_bytes(bytes)
        .map_err(|e| PaymentError::Corrupt(format!("{what} record does not decode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn currencies() {
        assert!(ISO_4217.windows(2).all(|w| w[0] < w[1]), "must stay sorted");
        assert!(validate_currency("EUR").is_ok());
        assert!(validate_currency("CNY").is_ok());
        let e = validate_currency("eur").unwrap_err().to_string();
        assert!(e.contains("upper case: EUR"), "{e}");
        assert!(validate_currency("XXX").is_err());
        assert!(validate_currency("").is_err());
        assert!(validate_currency("EURO").is_err());
    }

    #[test]
    fn amounts_and_keys() {
        assert!(validate_amount(1).is_ok());
        assert!(validate_amount(AMOUNT_MAX).is_ok());
        assert!(validate_amount(0).is_err());
        assert!(validate_amount(-5).is_err());
        assert!(validate_amount(AMOUNT_MAX + 1).is_err());
        assert!(validate_key("k-1").is_ok());
        assert!(validate_key("").is_err());
        assert!(validate_key("a b").is_err());
        assert!(validate_key(&"k".repeat(129)).is_err());
    }
}
