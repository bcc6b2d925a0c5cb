//! # ldc-store: one narrow transactional key-value interface
//!
//! The payment logic is written against [`Txn`] and nothing else: get, put, delete, scan,
//! `get_for_update` (a read that makes the commit fail if someone else wrote the key), and
//! commit with conflict detection. Two engines implement it:
//!
//! * [`sqlite::SqliteStore`], the embedded default: SQLite in WAL mode with
//!   `synchronous=FULL`, so a commit is on disk before it returns, and several cell
//!   processes on one machine can share one file at once (SQLite's lock serialises writers).
//!   [`partitioned::PartitionedStore`] splits it into one file per group of shards, so
//!   that cells write side by side and a stuck cell holds only its own file's lock.
//! * `tikv::TikvStore` (feature `tikv`): TiKV optimistic transactions through
//!   `tikv-client`, selected at run time by PD endpoints.
//!
//! [`conformance`] is the one suite both must pass. [`overlay::Overlay`] lets the cell run
//! many commands inside one store transaction (group commit) while each command can still
//! be rolled back on its own.
//!
//! Transactions are synchronous on purpose: a cell's writer thread owns its transaction,
//! and keeping `.await` out of the ledger code keeps it simple to reason about and test.
#![forbid(unsafe_code)]

pub mod conformance;
pub mod failpoints;
pub mod overlay;
pub mod partitioned;
pub mod sqlite;
#[cfg(feature = "tikv")]
pub mod tikv;

use thiserror::Error;

/// A key-value pair returned by [`Txn::scan`].
pub type Pair = (Vec<u8>, Vec<u8>);

/// Most pairs one scan may return (a limit on everything).
pub const SCAN_LIMIT_MAX: usize = 10_000;

/// Store failures. `Conflict` and `Busy` mean nothing was committed and the whole
/// transaction may be retried.
#[derive(Debug, Clone, Error)]
pub enum StoreError {
    #[error("write conflict: another transaction changed a key this one read for update; retry")]
    Conflict,
    #[error("store busy: {0}; retry")]
    Busy(String),
    #[error("store backend error: {0}")]
    Backend(String),
    #[error("the commit outcome is unknown: {0}")]
    Undetermined(String),
    #[error("invalid store configuration: {0}")]
    Config(String),
    /// The disk is full: nothing of the transaction was written; retry once space returns.
    #[error("the store's disk is full: {0}")]
    Full(String),
    /// A write or sync failed at the disk. What a failed write or fsync leaves behind is not
    /// knowable in this process (the kernel may have dropped the pages), so a writer that
    /// sees it stops and its process leaves, to recover from what is really on disk.
    #[error("the store's disk failed: {0}")]
    Io(String),
}

impl StoreError {
    /// Whether retrying the whole transaction is safe and may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Conflict | StoreError::Busy(_))
    }

    /// A stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            StoreError::Conflict => "conflict",
            StoreError::Busy(_) => "busy",
            StoreError::Backend(_) => "backend",
            StoreError::Undetermined(_) => "undetermined",
            StoreError::Config(_) => "config",
            StoreError::Full(_) => "disk_full",
            StoreError::Io(_) => "io",
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Reads and writes inside a transaction. Split from [`Txn`] so an [`overlay::Overlay`]
/// (a sub-transaction) offers the same surface to the payment logic.
pub trait Kv {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Reads `key` and registers it so the commit fails with [`StoreError::Conflict`] if
    /// another transaction writes it first. Fencing reads the ownership record this way.
    fn get_for_update(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()>;
    fn delete(&mut self, key: &[u8]) -> Result<()>;
    /// Pairs with `start <= key < end`, ascending, at most `limit`. A `limit` above
    /// [`SCAN_LIMIT_MAX`] is a bug of the caller and panics (see [`check_scan_limit`]):
    /// a silent clamp would return fewer pairs than asked without a word. Readers of
    /// ranges that may hold more use [`scan_all`].
    fn scan(&mut self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<Pair>>;
}

/// A store transaction. Dropping one without `commit` or `rollback` rolls it back and logs
/// a warning: a forgotten transaction is a bug worth seeing.
pub trait Txn: Kv + Send {
    /// Makes every write durable (synced to disk / replicated) or none.
    fn commit(self: Box<Self>) -> Result<()>;
    fn rollback(self: Box<Self>) -> Result<()>;
}

/// A transactional store shared by threads (and, for the embedded engine, processes).
pub trait Store: Send + Sync {
    /// Starts a read-write transaction.
    fn begin(&self) -> Result<Box<dyn Txn>>;
    /// Starts a read-only transaction on a consistent snapshot (for the embedded store
    /// split into files, one snapshot per file: see [`partitioned`]).
    fn begin_read(&self) -> Result<Box<dyn Txn>>;
    /// Starts a read-only transaction on one snapshot of the whole store, even where
    /// [`Store::begin_read`] snapshots each part on its own: what a reader that adds up
    /// across shards (reconciliation) needs.
    fn begin_snapshot(&self) -> Result<Box<dyn Txn>> {
        self.begin_read()
    }
    /// Starts a read-write transaction whose `commit` may return before the writes are
    /// durable: they are visible to later transactions at once and durable after the next
    /// [`Store::sync`] that starts after `commit` returned. Group commit uses it to execute
    /// the next batch while the previous one syncs; it must not tell anyone about such a
    /// commit before that `sync` returned. Engines whose commit is always durable (TiKV)
    /// keep the default, a plain [`Store::begin`].
    fn begin_unsynced(&self) -> Result<Box<dyn Txn>> {
        self.begin()
    }
    /// Makes every transaction committed before this call durable (see
    /// [`Store::begin_unsynced`]). An error means the durability of those commits is
    /// unknown; the caller must not acknowledge them.
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    /// A short name for logs and metrics (`sqlite`, `tikv`).
    fn engine(&self) -> &'static str;
}

/// Panics on a scan `limit` above [`SCAN_LIMIT_MAX`]; every engine calls it first.
pub fn check_scan_limit(limit: usize) -> usize {
    assert!(
        limit <= SCAN_LIMIT_MAX,
        "a scan of {limit} pairs asked for more than SCAN_LIMIT_MAX ({SCAN_LIMIT_MAX}); page with scan_all"
    );
    limit
}

/// Too many pairs for [`scan_all`]: the caller's bound, exceeded.
#[derive(Debug, Clone, Error)]
#[error("more than {max} records under {prefix}; the bound was reached, nothing was cut")]
pub struct TooMany {
    pub prefix: String,
    pub max: usize,
}

/// Calls `visit` with every pair whose key starts with `prefix`, in key order, reading
/// pages of [`SCAN_LIMIT_MAX`]: for ranges that may hold more than one scan returns.
/// Memory stays one page whatever the range holds.
pub fn visit_prefix(
    kv: &mut dyn Kv,
    prefix: &[u8],
    mut visit: impl FnMut(Vec<u8>, Vec<u8>),
) -> Result<()> {
    let end = prefix_end(prefix);
    let mut start = prefix.to_vec();
    loop {
        let page = kv.scan(&start, &end, SCAN_LIMIT_MAX)?;
        let full = page.len() == SCAN_LIMIT_MAX;
        if let Some((last, _)) = page.last() {
            // The next page starts just after the last key (its successor in key order).
            start = last.clone();
            start.push(0);
        }
        for (k, v) in page {
            visit(k, v);
        }
        if !full {
            return Ok(());
        }
    }
}

/// Every pair whose key starts with `prefix` (read in pages, see [`visit_prefix`]), at
/// most `max` of them: more is [`TooMany`] (an error the caller reports), never a silently
/// shorter answer.
pub fn scan_all(
    kv: &mut dyn Kv,
    prefix: &[u8],
    max: usize,
) -> Result<std::result::Result<Vec<Pair>, TooMany>> {
    let mut out: Vec<Pair> = Vec::new();
    let mut over = false;
    visit_prefix(kv, prefix, |k, v| {
        if out.len() < max {
            out.push((k, v));
        } else {
            over = true;
        }
    })?;
    Ok(if over {
        Err(TooMany {
            prefix: String::from_utf8_lossy(prefix).into_owned(),
            max,
        })
    } else {
        Ok(out)
    })
}

/// The end of the key range of every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): no finite end; use a key greater than any we write.
    vec![0xff; prefix.len() + 1]
}

/// Opens the store named by `spec`: `tikv://pd1:2379,pd2:2379` for TiKV, anything else is
/// the path of the embedded store's (control) file.
pub fn open(spec: &str) -> Result<std::sync::Arc<dyn Store>> {
    if let Some(pd) = spec.strip_prefix("tikv://") {
        #[cfg(feature = "tikv")]
        {
            let endpoints: Vec<String> = pd.split(',').map(str::to_string).collect();
            return Ok(std::sync::Arc::new(tikv::TikvStore::connect(endpoints)?));
        }
        #[cfg(not(feature = "tikv"))]
        {
            return Err(StoreError::Config(format!(
                "store {pd:?} is TiKV but this binary was built without TiKV support; \
                 rebuild with `cargo build --release --features tikv`"
            )));
        }
    }
    partitioned::open(std::path::Path::new(spec))
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0xff, 0xff]);
    }
}
