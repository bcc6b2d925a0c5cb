//! Reconciliation: recompute every balance from the ledger and prove money is conserved.
//!
//! A feature, not a test helper: `ldc reconcile` runs it against a live store. It reads one
//! consistent snapshot and checks, per currency:
//!
//! 1. every user account's balance equals the sum of its entries, and no user balance is
//!    negative; every system account's balance equals the sum of the contra legs posted
//!    to it (an entry posts `amount` to its user and `-amount` to its contra account);
//! 2. double entry: Σ user balances + Σ transit + Σ clearing = 0, i.e.
//!    Σ user balances + money in flight = Σ top-ups − Σ withdrawals;
//! 3. money in flight (Σ transit balances) equals the amount of outbox messages whose
//!    credit has not been applied yet (a credit applied twice, or lost, breaks this);
//! 4. no transfer has been refunded beyond its amount.

use std::collections::{BTreeMap, HashMap};

use ldc_core::proto;
use ldc_store::{Kv, Pair, Store, prefix_end};
use prost::Message;
use serde::Serialize;

use crate::error::PaymentError;
use crate::keys::{self, SysAccount, UserKey};
use crate::model::*;

/// Totals of one currency, in minor units.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CurrencyTotals {
    pub accounts: u64,
    pub user_balances: i128,
    /// Σ top-ups − Σ withdrawals (= −Σ clearing balances).
    pub net_external: i128,
    /// Σ transit balances.
    pub in_flight: i128,
    /// Amount of outbox messages not yet applied by the payee's cell.
    pub outbox_unapplied: i128,
    pub outbox_messages: u64,
    /// user_balances + in_flight − net_external; must be 0.
    pub difference: i128,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub currencies: BTreeMap<String, CurrencyTotals>,
    pub entries_checked: u64,
    pub problems: Vec<String>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty() && self.currencies.values().all(|c| c.difference == 0)
    }
}

const PAGE: usize = 5_000;

/// Calls `f` for every pair under `prefix`, page by page.
fn scan_all(
    kv: &mut dyn Kv,
    prefix: &[u8],
    mut f: impl FnMut(&[u8], &[u8]) -> Result<(), PaymentError>,
) -> Result<(), PaymentError> {
    let end = prefix_end(prefix);
    let mut start = prefix.to_vec();
    loop {
        let page: Vec<Pair> = kv.scan(&start, &end, PAGE)?;
        for (k, v) in &page {
            f(k, v)?;
        }
        if page.len() < PAGE {
            return Ok(());
        }
        start = page.last().expect("non-empty").0.clone();
        start.push(0);
    }
}

#[derive(Default)]
struct AccountCheck {
    shard: u32,
    currency: String,
    balance: Option<i64>,
    entries_sum: i128,
    entries: u64,
    next_entry: u64,
    /// Σ and count of the contra legs this user's entries posted, per system account.
    contra: BTreeMap<SysAccount, (i128, u64)>,
}

/// A system account as the contra legs of user entries make it.
#[derive(Default)]
struct SysCheck {
    balance: i128,
    postings: u64,
    stored: Option<SysAccountRec>,
}

/// Runs every check on one snapshot of `store`.
pub fn run(store: &dyn Store) -> Result<Report, PaymentError> {
    // Money in flight is added up across shards, whose files may be apart: one instant.
    let mut t = store.begin_snapshot()?;
    let r = run_on(&mut *t);
    let _ = t.rollback();
    r
}

pub fn run_on(kv: &mut dyn Kv) -> Result<Report, PaymentError> {
    // Refuse to "prove" anything about a store that holds no platform.
    ldc_control::load_config(kv).map_err(|e| PaymentError::Corrupt(e.to_string()))?;
    let mut report = Report::default();
    let mut accounts: HashMap<String, AccountCheck> = HashMap::new();
    let mut applied: HashMap<String, bool> = HashMap::new(); // message id → applied (payee side)
    let mut problems = Vec::new();

    // Users: accounts, entries, payments, dedup records.
    scan_all(kv, b"u/", |k, v| {
        let key =
            std::str::from_utf8(k).map_err(|_| PaymentError::Corrupt("non-UTF-8 key".into()))?;
        let Some((shard, user, kind)) = keys::parse_user_key(key) else {
            problems.push(format!("unexpected key {key}"));
            return Ok(());
        };
        let id = format!("user {user}");
        match kind {
            UserKey::Account => {
                let a: AccountRec = dec("account", v)?;
                let c = accounts.entry(id).or_default();
                c.shard = shard;
                c.currency = a.currency;
                c.balance = Some(a.balance);
                c.next_entry = a.next_entry;
                if a.balance < 0 {
                    problems.push(format!("user {user} has a negative balance {}", a.balance));
                }
            }
            UserKey::Entry(_) => {
                let e: EntryRec = dec("entry", v)?;
                let c = accounts.entry(id).or_default();
                c.entries_sum += i128::from(e.amount);
                c.entries += 1;
                let leg = c.contra.entry(e.contra).or_default();
                leg.0 -= i128::from(e.amount);
                leg.1 += 1;
                if i128::from(e.balance_after) != c.entries_sum {
                    problems.push(format!(
                        "{key}: balance_after {} but entries sum to {}",
                        e.balance_after, c.entries_sum
                    ));
                }
            }
            UserKey::Payment(_) => {
                let p: PaymentRec = dec("payment", v)?;
                if p.refunded < 0 || p.refunded > p.amount {
                    problems.push(format!("{key}: refunded {} of {}", p.refunded, p.amount));
                }
            }
            UserKey::Dedup => {
                let d: DedupRec = dec("dedup", v)?;
                let message = key.rsplit_once("/d/").map_or("", |(_, m)| m).to_string();
                applied.insert(message, d.applied);
            }
            UserKey::Idempotency => {}
        }
        Ok(())
    })?;

    // System accounts: stored balances, checked below against the contra legs.
    let mut sys: BTreeMap<(u32, String, SysAccount), SysCheck> = BTreeMap::new();
    scan_all(kv, b"x/", |k, v| {
        let key =
            std::str::from_utf8(k).map_err(|_| PaymentError::Corrupt("non-UTF-8 key".into()))?;
        let Some((shard, ccy, which)) = keys::parse_sys_account(key) else {
            problems.push(format!("unexpected key {key}"));
            return Ok(());
        };
        let a: SysAccountRec = dec("system account", v)?;
        sys.entry((shard, ccy.to_string(), which))
            .or_default()
            .stored = Some(a);
        Ok(())
    })?;

    // Outbox: what is still in flight according to the messages.
    let mut outbox: Vec<proto::Credit> = Vec::new();
    scan_all(kv, b"ob/", |_, v| {
        let rec: OutboxRec = dec("outbox", v)?;
        outbox.push(
            proto::Credit::decode(&rec.credit[..])
                .map_err(|e| PaymentError::Corrupt(format!("outbox: {e}")))?,
        );
        Ok(())
    })?;

    for (id, c) in &accounts {
        report.entries_checked += c.entries;
        let Some(balance) = c.balance else {
            problems.push(format!("{id} has entries but no account record"));
            continue;
        };
        if i128::from(balance) != c.entries_sum {
            problems.push(format!(
                "{id}: balance {balance} but its entries sum to {}",
                c.entries_sum
            ));
        }
        if c.next_entry != c.entries + 1 {
            problems.push(format!(
                "{id}: {} entries but next entry number {}",
                c.entries, c.next_entry
            ));
        }
        for (which, (sum, n)) in &c.contra {
            let s = sys
                .entry((c.shard, c.currency.clone(), *which))
                .or_default();
            s.balance += sum;
            s.postings += n;
        }
        let t = report.currencies.entry(c.currency.clone()).or_default();
        t.accounts += 1;
        t.user_balances += i128::from(balance);
    }
    for ((shard, ccy, which), s) in sys {
        let id = format!("the {} account of shard {shard} in {ccy}", which.as_str());
        let Some(stored) = s.stored else {
            problems.push(format!(
                "{id} has {} postings but no account record",
                s.postings
            ));
            continue;
        };
        if i128::from(stored.balance) != s.balance || stored.postings != s.postings {
            problems.push(format!(
                "{id}: balance {} over {} postings, but its contra legs sum to {} over {}",
                stored.balance, stored.postings, s.balance, s.postings
            ));
        }
        report.entries_checked += s.postings;
        let t = report.currencies.entry(ccy).or_default();
        match which {
            SysAccount::Clearing => t.net_external -= i128::from(stored.balance),
            SysAccount::Transit => t.in_flight += i128::from(stored.balance),
        }
    }
    for c in &outbox {
        let t = report.currencies.entry(c.currency.clone()).or_default();
        t.outbox_messages += 1;
        let was_applied = applied.get(&c.message_id).copied().unwrap_or(false);
        if !was_applied {
            t.outbox_unapplied += i128::from(c.amount);
        }
    }
    for (ccy, t) in report.currencies.iter_mut() {
        t.difference = t.user_balances + t.in_flight - t.net_external;
        if t.in_flight != t.outbox_unapplied {
            problems.push(format!(
                "{ccy}: money in flight by transit accounts is {} but unapplied outbox messages hold {}",
                t.in_flight, t.outbox_unapplied
            ));
        }
    }
    report.problems = problems;
    Ok(report)
}
