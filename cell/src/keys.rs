//! The store's key layout. Every key a cell writes for a user starts with the user's
//! shard, so one shard's data is one contiguous range (a shard migration is a range copy)
//! and a scan never crosses shards by accident.
//!
//! ```text
//! sys/…, own/{shard:05}               control records: ldc_control (ownership, config, …)
//! u/{shard:05}/{user}/d/{message}     inbound credit dedup record
//! u/{shard:05}/{user}/i/{key}         idempotency record
//! u/{shard:05}/{user}/j/{seq:012}e    ledger entry (both legs: the user's and its contra)
//! u/{shard:05}/{user}/j/{seq:012}p    payment
//! u/{shard:05}/{user}/k               account
//! x/{shard:05}/{ccy}/{clearing|transit}  a system account (balance of its contra legs)
//! t/{shard:05}/{created_ms:013}/{user}/{key}  an idempotency record by age (retention)
//! ob/{shard:05}/{message}             outbox message waiting for delivery
//! ```
//! User ids are `[A-Za-z0-9_.-]` (no `/`), so user prefixes never overlap.
//!
//! Every shard's key is `{space}/{shard:05}` or `{space}/{shard:05}/…`, and every other
//! key starts with `sys/`: the convention by which the embedded store puts a shard's
//! records, its ownership record (the fence) among them, in that shard's file
//! (`ldc_store::partitioned::shard_of_key`; checked by `every_shard_key_names_its_shard`).
//!
//! The order inside a user's range is chosen for write locality: a payment writes its
//! payment record, its entry and the account. Entries and payments share the `j/` journal
//! range (their counters advance together, so the newest of each sit side by side), and the
//! account key `k` sorts right after the journal's tail, so one payment dirties one or two
//! B-tree pages instead of four. System accounts have no entry rows (an entry carries its
//! contra leg), so every shard's system accounts sit together on a page or two that a
//! whole batch shares. Every page a commit dirties is written to the WAL as a frame: 4.9
//! frames per top-up with system entry rows, 3.3 without (counted with `perf stat` on the
//! writer's `pwrite`s under `bench/payments.sh` load), so this is throughput.

/// The shard's ownership record (its fence), a control record: [`ldc_control::keys`].
pub use ldc_control::keys::owner;

pub fn user_prefix(shard: u32, user: &str) -> String {
    format!("u/{shard:05}/{user}/")
}

pub fn account(shard: u32, user: &str) -> Vec<u8> {
    format!("u/{shard:05}/{user}/k").into_bytes()
}

pub fn payment(shard: u32, user: &str, seq: u64) -> Vec<u8> {
    format!("u/{shard:05}/{user}/j/{seq:012}p").into_bytes()
}

pub fn entry(shard: u32, user: &str, seq: u64) -> Vec<u8> {
    format!("u/{shard:05}/{user}/j/{seq:012}e").into_bytes()
}

/// The journal range (entries and payments) of a user.
pub fn journal_prefix(shard: u32, user: &str) -> String {
    format!("u/{shard:05}/{user}/j/")
}

/// What a key inside a user's range is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserKey {
    Account,
    Entry(u64),
    Payment(u64),
    Idempotency,
    Dedup,
}

/// Parses `u/{shard}/{user}/...` into (shard, user, kind). `None` for anything else.
pub fn parse_user_key(key: &str) -> Option<(u32, &str, UserKey)> {
    let rest = key.strip_prefix("u/")?;
    let mut parts = rest.splitn(3, '/');
    let (shard, user, tail) = (parts.next()?, parts.next()?, parts.next()?);
    let shard = shard.parse().ok()?;
    let kind = match tail.split_once('/') {
        None if tail == "k" => UserKey::Account,
        Some(("j", j)) if j.len() == 13 => {
            let seq = j[..12].parse().ok()?;
            match &j[12..] {
                "e" => UserKey::Entry(seq),
                "p" => UserKey::Payment(seq),
                _ => return None,
            }
        }
        Some(("i", _)) => UserKey::Idempotency,
        Some(("d", _)) => UserKey::Dedup,
        _ => return None,
    };
    Some((shard, user, kind))
}

pub fn idempotency(shard: u32, user: &str, key: &str) -> Vec<u8> {
    format!("u/{shard:05}/{user}/i/{key}").into_bytes()
}

/// The age index of an idempotency record: a shard's records oldest first, so retention
/// walks only what has expired (and new records append at the index's tail page).
pub fn idempotency_by_age(shard: u32, created_ms: u64, user: &str, key: &str) -> Vec<u8> {
    format!("t/{shard:05}/{created_ms:013}/{user}/{key}").into_bytes()
}

pub fn idempotency_age_prefix(shard: u32) -> String {
    format!("t/{shard:05}/")
}

/// `(created_ms, user, key)` of an [`idempotency_by_age`] key of `shard`.
pub fn parse_idempotency_by_age(shard: u32, k: &[u8]) -> Option<(u64, &str, &str)> {
    let rest = std::str::from_utf8(k)
        .ok()?
        .strip_prefix(&idempotency_age_prefix(shard))?;
    let (created, rest) = rest.split_once('/')?;
    // User ids have no `/`; keys may.
    let (user, key) = rest.split_once('/')?;
    Some((created.parse().ok()?, user, key))
}

pub fn dedup(shard: u32, user: &str, message: &str) -> Vec<u8> {
    format!("u/{shard:05}/{user}/d/{message}").into_bytes()
}

/// The two system accounts each shard keeps per currency.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
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

/// Parses `x/{shard}/{ccy}/{which}` into (shard, currency, account).
pub fn parse_sys_account(key: &str) -> Option<(u32, &str, SysAccount)> {
    let mut parts = key.strip_prefix("x/")?.split('/');
    let (shard, ccy, which) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let which = match which {
        "clearing" => SysAccount::Clearing,
        "transit" => SysAccount::Transit,
        _ => return None,
    };
    Some((shard.parse().ok()?, ccy, which))
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

    /// The embedded store files every shard's records by the shard its key names.
    #[test]
    fn every_shard_key_names_its_shard() {
        use ldc_store::partitioned::shard_of_key;
        let shard = 12_345;
        for key in [
            owner(shard),
            account(shard, "alice"),
            payment(shard, "alice", 7),
            entry(shard, "alice", 7),
            idempotency(shard, "alice", "k/with/slashes"),
            idempotency_by_age(shard, 1, "alice", "k"),
            dedup(shard, "alice", "m"),
            sys_account(shard, "EUR", SysAccount::Transit),
            outbox(shard, "m"),
            outbox_prefix(shard).into_bytes(),
            idempotency_age_prefix(shard).into_bytes(),
            user_prefix(shard, "alice").into_bytes(),
            journal_prefix(shard, "alice").into_bytes(),
        ] {
            assert_eq!(
                shard_of_key(&key),
                Some(shard),
                "{}",
                String::from_utf8_lossy(&key)
            );
        }
        for key in [
            ldc_control::keys::CONFIG.to_vec(),
            ldc_control::keys::TOPOLOGY.to_vec(),
            ldc_control::keys::cell_runtime("00001"),
            ldc_control::keys::ROUTING.to_vec(),
            ldc_control::keys::traffic("00001"),
            ldc_control::keys::relay_lease("00001"),
        ] {
            assert_eq!(
                shard_of_key(&key),
                None,
                "{}",
                String::from_utf8_lossy(&key)
            );
        }
    }

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
        // Locality: the account sorts after the whole journal, system accounts after
        // their entries.
        assert!(payment(3, "u", 999_999) < account(3, "u"));
        assert!(entry(3, "u", 5) < payment(3, "u", 5));
        assert!(payment(3, "u", 5) < entry(3, "u", 6));
        assert_eq!(
            parse_sys_account(
                std::str::from_utf8(&sys_account(7, "EUR", SysAccount::Transit)).unwrap()
            ),
            Some((7, "EUR", SysAccount::Transit))
        );
        assert_eq!(parse_sys_account("x/00007/EUR/transit/e/1"), None);
        assert_eq!(parse_sys_account("x/00007/EUR/other"), None);
        assert!(
            account(3, "u") < account(3, "u0"),
            "user ranges must not interleave"
        );
    }

    #[test]
    fn user_keys_parse() {
        let k = |b: Vec<u8>| String::from_utf8(b).unwrap();
        assert_eq!(
            parse_user_key(&k(account(2, "al.ice"))),
            Some((2, "al.ice", UserKey::Account))
        );
        assert_eq!(
            parse_user_key(&k(entry(2, "bob", 7))),
            Some((2, "bob", UserKey::Entry(7)))
        );
        assert_eq!(
            parse_user_key(&k(payment(2, "bob", 8))),
            Some((2, "bob", UserKey::Payment(8)))
        );
        assert_eq!(
            parse_idempotency_by_age(2, &idempotency_by_age(2, 1_700_000_000_000, "bob", "a/b")),
            Some((1_700_000_000_000, "bob", "a/b"))
        );
        assert_eq!(
            parse_idempotency_by_age(3, &idempotency_by_age(2, 1, "bob", "k")),
            None
        );
        assert_eq!(
            parse_user_key(&k(idempotency(2, "bob", "a/b"))),
            Some((2, "bob", UserKey::Idempotency))
        );
        assert_eq!(
            parse_user_key(&k(dedup(2, "bob", "x:1"))),
            Some((2, "bob", UserKey::Dedup))
        );
        assert_eq!(parse_user_key("u/00002/bob/zz"), None);
        assert_eq!(parse_user_key("x/00002/EUR"), None);
    }
}
