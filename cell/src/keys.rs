//! The store's key layout. Every key a cell writes for a user starts with the user's
//! shard, so one shard's data is one contiguous range (a shard migration is a range copy)
//! and a scan never crosses shards by accident.
//!
//! ```text
//! sys/config                          platform config (shard count), JSON
//! sys/topology                        planner topology, JSON
//! sys/routing                         published routing table, JSON (ldc_core::routing::STORE_KEY)
//! sys/cells/{cell}                    local runtime facts (pid, endpoint, health), JSON
//! own/{shard:05}                      shard ownership {cell, epoch}: the fencing record, JSON
//! u/{shard:05}/{user}/a               account
//! u/{shard:05}/{user}/p/{seq:012}     payment
//! u/{shard:05}/{user}/e/{seq:012}     ledger entry
//! u/{shard:05}/{user}/i/{key}         idempotency record
//! u/{shard:05}/{user}/d/{message}     inbound credit dedup record
//! x/{shard:05}/{ccy}/{clearing|transit}        system account of the shard
//! x/{shard:05}/{ccy}/{clearing|transit}/e/{seq:012}  its entries
//! ob/{shard:05}/{message}             outbox message waiting for delivery
//! ```
//! User ids are `[A-Za-z0-9_.-]` (no `/`), so user prefixes never overlap.

pub const CONFIG: &[u8] = b"sys/config";
pub const TOPOLOGY: &[u8] = b"sys/topology";
pub const CELLS_PREFIX: &str = "sys/cells/";

pub fn cell_runtime(cell: &str) -> Vec<u8> {
    format!("{CELLS_PREFIX}{cell}").into_bytes()
}

pub fn owner(shard: u32) -> Vec<u8> {
    format!("own/{shard:05}").into_bytes()
}

pub const OWNER_PREFIX: &[u8] = b"own/";

pub fn user_prefix(shard: u32, user: &str) -> String {
    format!("u/{shard:05}/{user}/")
}

pub fn account(shard: u32, user: &str) -> Vec<u8> {
    format!("u/{shard:05}/{user}/a").into_bytes()
}

pub fn payment(shard: u32, user: &str, seq: u64) -> Vec<u8> {
    format!("u/{shard:05}/{user}/p/{seq:012}").into_bytes()
}

pub fn entry(shard: u32, user: &str, seq: u64) -> Vec<u8> {
    format!("u/{shard:05}/{user}/e/{seq:012}").into_bytes()
}

pub fn entries_prefix(shard: u32, user: &str) -> String {
    format!("u/{shard:05}/{user}/e/")
}

pub fn idempotency(shard: u32, user: &str, key: &str) -> Vec<u8> {
    format!("u/{shard:05}/{user}/i/{key}").into_bytes()
}

pub fn dedup(shard: u32, user: &str, message: &str) -> Vec<u8> {
    format!("u/{shard:05}/{user}/d/{message}").into_bytes()
}

/// The two system accounts each shard keeps per currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SysAccount {
    /// The outside world: top-ups debit it, withdrawals credit it. Its balance is
    /// −(top-ups − withdrawals) of the shard.
    Clearing,
    /// Money in flight between cells: a cross-cell debit credits the payer shard's transit
    /// account; the credit on the other side debits the payee shard's.
    Transit,
}

impl SysAccount {
    pub fn as_str(self) -> &'static str {
        match self {
            SysAccount::Clearing => "clearing",
            SysAccount::Transit => "transit",
        }
    }
}

pub fn sys_account(shard: u32, ccy: &str, which: SysAccount) -> Vec<u8> {
    format!("x/{shard:05}/{ccy}/{}", which.as_str()).into_bytes()
}

pub fn sys_entry(shard: u32, ccy: &str, which: SysAccount, seq: u64) -> Vec<u8> {
    format!("x/{shard:05}/{ccy}/{}/e/{seq:012}", which.as_str()).into_bytes()
}

pub fn outbox(shard: u32, message: &str) -> Vec<u8> {
    format!("ob/{shard:05}/{message}").into_bytes()
}

pub fn outbox_prefix(shard: u32) -> String {
    format!("ob/{shard:05}/")
}

/// Payment ids are `{user}:{seq}`: they name their user, so a lookup needs no index.
pub fn payment_id(user: &str, seq: u64) -> String {
    format!("{user}:{seq}")
}

/// Splits a payment id into (user, seq).
pub fn parse_payment_id(id: &str) -> Option<(&str, u64)> {
    let (user, seq) = id.rsplit_once(':')?;
    ldc_core::shard::validate_user_id(user).ok()?;
    Some((user, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payment_ids_round_trip() {
        assert_eq!(
            parse_payment_id(&payment_id("al.ice-1", 42)),
            Some(("al.ice-1", 42))
        );
        assert_eq!(parse_payment_id("nope"), None);
        assert_eq!(parse_payment_id("a/b:1"), None);
        assert_eq!(parse_payment_id("a:x"), None);
    }

    #[test]
    fn keys_sort_by_shard_then_user() {
        assert!(account(1, "zzz") < account(2, "aaa"));
        assert!(entry(3, "u", 9) < entry(3, "u", 10));
    }
}
