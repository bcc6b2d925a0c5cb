//! The embedded store split into files: one SQLite file per group of shards, so that a cell
//! only ever locks what it owns.
//!
//! SQLite has one write lock per file. With every cell's shards in one file, a cell process
//! that is stopped, hung or slow while it holds that lock stops every other cell's writes,
//! and the cells' writers queue for the lock instead of writing side by side. Split by
//! shard, each group of shards that moves together (the shards a cell owned at creation)
//! has its own file, its own lock, its own WAL and its own ownership records, and a stuck
//! cell holds only its own file.
//!
//! Which file a key belongs to follows one convention, shared with the payment cell's key
//! layout: a key `{space}/{shard:05}` or `{space}/{shard:05}/…` (any space but `sys`) is
//! the shard's, in the file whose range holds the shard; every other key (the `sys/`
//! control records: config, topology, routing table, move history) is in the control file,
//! the one the store is named by. The control file also holds the layout (table
//! `ldc_partitions`), written once, when the store is created.
//!
//! What a transaction over several files can and cannot promise:
//! * **Per file, everything**: a file's part of a transaction is atomic, durable at commit
//!   (or at the next [`Store::sync`]) and serialisable, because it runs under that file's
//!   write lock. Everything that must be atomic is kept in one file by the key layout: a
//!   payment and its shard's ownership record (the fence) are in the shard's file.
//! * **Across files, order, not atomicity**: a transaction that writes several files
//!   commits the shard files first, in shard order, and the control file last (the fencing
//!   rule: ownership before the routing table built from it). A crash between two of those
//!   commits leaves the first ones done; each is a complete per-shard change (an epoch bump
//!   of a shard, a set of independent commands), never half of one.
//! * **Locks**: a read in a read-write transaction takes no lock on a shard file (so the
//!   controller's routing publication, which reads every ownership record, never waits for
//!   a cell's writer); a write or `get_for_update` takes it. In a group commit that
//!   fails with [`StoreError::Conflict`] if the file changed since the transaction read it;
//!   a control operation instead reads that file afresh from then on (it would otherwise
//!   conflict with every commit of a busy writer; it decides on what it reads for update,
//!   as the ownership compare-and-set of a move does). A
//!   transaction from [`Store::begin`] (a control operation: moves, publication, leases)
//!   locks the control file at its first access and before its first shard file, so
//!   control operations queue on the control file and two of them never deadlock on shard
//!   files. The group commit ([`Store::begin_unsynced`]) writes shard records only and
//!   never waits for the control file (one that locked a shard file and then touches the
//!   control file is refused as a bug). Shard files are locked in shard order by both.
//! * **Snapshots**: [`Store::begin_read`] reads each file on its own snapshot, taken at
//!   first use: right for anything that reads within a shard. [`Store::begin_snapshot`] is
//!   one snapshot of every file at one instant (taken optimistically: it takes no lock, and
//!   tries again if a file changed while it took them): what reconciliation, which adds up
//!   money across shards, reads. At that instant a transaction that writes several files
//!   may be committed in some of them only; money never moves in such a transaction (a
//!   payment writes one shard; the relay moves money between shards in one transaction
//!   per side, in order).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::OptionalExtension;

use crate::sqlite::{SqliteStore, SqliteTxn, map_err};
use crate::{Kv, Pair, Result, Store, StoreError, Txn, prefix_end};

/// Digits of the shard number in a shard's keys (`{space}/{shard:05}…`).
pub const SHARD_DIGITS: usize = 5;
/// Most shard files one store may have (a limit on everything: a sync visits each).
pub const PARTITIONS_MAX: usize = 256;
/// Attempts of [`Store::begin_snapshot`] before it reports the store busy.
const SNAPSHOT_ATTEMPTS_MAX: u32 = 10_000;

/// The shard a key belongs to, by the convention above; `None` for a control key.
pub fn shard_of_key(key: &[u8]) -> Option<u32> {
    let slash = key.iter().position(|&b| b == b'/')?;
    if slash == 0 || &key[..slash] == b"sys" {
        return None;
    }
    let rest = &key[slash + 1..];
    if rest.len() < SHARD_DIGITS {
        return None;
    }
    let (digits, tail) = rest.split_at(SHARD_DIGITS);
    if !digits.iter().all(u8::is_ascii_digit) || tail.first().is_some_and(|&b| b != b'/') {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The shard whose keys hold every key of `start..end`, if one does (the scans of a user's
/// or a shard's records); `None` for a scan that may cross shards.
fn shard_of_range(start: &[u8], end: &[u8]) -> Option<u32> {
    let shard = shard_of_key(start)?;
    let slash = start.iter().position(|&b| b == b'/')?;
    let shard_keys = &start[..slash + 1 + SHARD_DIGITS];
    (end <= prefix_end(shard_keys).as_slice()).then_some(shard)
}

/// One shard file: shards `first..=last`, in `file` (a name in the control file's
/// directory, so a data directory can move).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub first: u32,
    pub last: u32,
    pub file: String,
}

const LAYOUT_SQL: &str = "CREATE TABLE IF NOT EXISTS ldc_partitions (first INTEGER PRIMARY KEY, last INTEGER NOT NULL, file TEXT NOT NULL)";

fn read_layout(control: &SqliteStore) -> Result<Vec<Partition>> {
    control.with_conn(|c| {
        let exists: Option<String> = c
            .query_row(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'ldc_partitions'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(map_err)?;
        if exists.is_none() {
            return Ok(Vec::new());
        }
        layout_rows(c)
    })
}

fn layout_rows(c: &rusqlite::Connection) -> Result<Vec<Partition>> {
    let mut st = c
        .prepare("SELECT first, last, file FROM ldc_partitions ORDER BY first")
        .map_err(map_err)?;
    let rows = st
        .query_map([], |r| {
            Ok(Partition {
                first: r.get(0)?,
                last: r.get(1)?,
                file: r.get(2)?,
            })
        })
        .map_err(map_err)?;
    rows.collect::<std::result::Result<Vec<_>, _>>()
        .map_err(map_err)
}

/// The file name of the shard file for `first..=last` of the store at `control`.
fn partition_file(control: &Path, first: u32, last: u32) -> String {
    let stem = control
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "store".into());
    format!("{stem}.shards-{first:05}-{last:05}.db")
}

/// Refuses ranges that overlap, are out of order or are too many.
fn check_ranges(ranges: &[(u32, u32)]) -> Result<()> {
    let bad = |why: String| Err(StoreError::Config(format!("store layout: {why}")));
    if ranges.len() > PARTITIONS_MAX {
        return bad(format!(
            "{} shard files asked, at most {PARTITIONS_MAX}",
            ranges.len()
        ));
    }
    for (i, &(first, last)) in ranges.iter().enumerate() {
        if first > last {
            return bad(format!("range {first}-{last} is empty"));
        }
        if i > 0 && ranges[i - 1].1 >= first {
            return bad(format!(
                "range {first}-{last} overlaps or precedes the one before it"
            ));
        }
    }
    Ok(())
}

/// What [`create`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// The layout was written: a new store.
    New,
    /// The store already has this layout (or another one, which stays: the layout never
    /// changes after creation).
    Exists(Vec<Partition>),
    /// The store already holds shard records in its one file (created without partitions):
    /// it stays one file.
    SingleFile,
}

/// Gives a new store at `control` one shard file per range of `ranges` (sorted, disjoint,
/// inclusive). Shards outside every range stay in the control file.
pub fn create(control: &Path, ranges: &[(u32, u32)]) -> Result<Created> {
    check_ranges(ranges)?;
    let store = SqliteStore::open(control)?;
    store.with_conn(|c| {
        c.execute_batch("BEGIN IMMEDIATE").map_err(map_err)?;
        let r = (|| {
            c.execute_batch(LAYOUT_SQL).map_err(map_err)?;
            let existing = layout_rows(c)?;
            if !existing.is_empty() {
                return Ok(Created::Exists(existing));
            }
            let shard_keys: Option<Vec<u8>> = c
                .query_row(
                    "SELECT k FROM kv WHERE k < X'7379732F' OR k >= X'73797330' LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .optional()
                .map_err(map_err)?;
            if shard_keys.is_some() {
                return Ok(Created::SingleFile);
            }
            for &(first, last) in ranges {
                c.execute(
                    "INSERT INTO ldc_partitions (first, last, file) VALUES (?1, ?2, ?3)",
                    rusqlite::params![first, last, partition_file(control, first, last)],
                )
                .map_err(map_err)?;
            }
            Ok(Created::New)
        })();
        let end = if r.is_ok() { "COMMIT" } else { "ROLLBACK" };
        c.execute_batch(end).map_err(map_err)?;
        r
    })
}

/// Every file of the store at `control`: the control file first, then each shard file.
pub fn files(control: &Path) -> Result<Vec<PathBuf>> {
    let store = SqliteStore::open(control)?;
    let dir = control.parent().unwrap_or(Path::new(""));
    let mut out = vec![control.to_path_buf()];
    out.extend(read_layout(&store)?.into_iter().map(|p| dir.join(p.file)));
    Ok(out)
}

/// SQLite's `integrity_check` on every file of the store at `control`: each problem found,
/// as `file: message` (none when every file is sound).
pub fn integrity_check(control: &Path) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    for f in files(control)? {
        let store = SqliteStore::open(&f)?;
        let found: Vec<String> = store.with_conn(|c| {
            let mut st = c.prepare("PRAGMA integrity_check").map_err(map_err)?;
            let rows = st.query_map([], |r| r.get(0)).map_err(map_err)?;
            rows.collect::<std::result::Result<Vec<String>, _>>()
                .map_err(map_err)
        })?;
        problems.extend(
            found
                .into_iter()
                .filter(|m| m != "ok")
                .map(|m| format!("{}: {m}", f.display())),
        );
    }
    Ok(problems)
}

/// Opens the embedded store at `control`: one file, or its shard files too when it has a
/// layout.
pub fn open(control: &Path) -> Result<Arc<dyn Store>> {
    let store = SqliteStore::open(control)?;
    let layout = read_layout(&store)?;
    if layout.is_empty() {
        return Ok(Arc::new(store));
    }
    Ok(Arc::new(PartitionedStore::open_with(
        control, store, &layout,
    )?))
}

/// The embedded store over a control file and its shard files.
pub struct PartitionedStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// `files[0]` is the control file; `files[i + 1]` holds `ranges[i]`.
    files: Vec<SqliteStore>,
    ranges: Vec<(u32, u32)>,
    /// The files [`Store::sync`] syncs: those whose shard records this handle has read or
    /// written, and any it committed to unsynced. Unsynced commits (the cells' group
    /// commit) only ever write shard records, and a process syncs for what it wrote or
    /// read of its own shards (the relay, before it sends the outbox it read); syncing
    /// every file would make each cell flush every other cell's writes too.
    interest: Vec<std::sync::atomic::AtomicBool>,
}

impl Inner {
    fn mark(&self, i: usize) {
        // Read first: after the first time this is a shared read, not a write to a cache
        // line every thread of the process touches.
        if !self.interest[i].load(std::sync::atomic::Ordering::Relaxed) {
            self.interest[i].store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn index_of_shard(&self, shard: u32) -> usize {
        let i = self.ranges.partition_point(|&(_, last)| last < shard);
        match self.ranges.get(i) {
            Some(&(first, _)) if first <= shard => i + 1,
            _ => 0,
        }
    }
}

impl PartitionedStore {
    fn open_with(control: &Path, store: SqliteStore, layout: &[Partition]) -> Result<Self> {
        let ranges: Vec<(u32, u32)> = layout.iter().map(|p| (p.first, p.last)).collect();
        check_ranges(&ranges)?;
        let dir = control.parent().unwrap_or(Path::new(""));
        let mut files = vec![store];
        for p in layout {
            files.push(SqliteStore::open(&dir.join(&p.file))?);
        }
        let interest = files.iter().map(|_| Default::default()).collect();
        Ok(PartitionedStore {
            inner: Arc::new(Inner {
                files,
                ranges,
                interest,
            }),
        })
    }

    fn txn(&self, mode: Mode) -> PartitionedTxn {
        PartitionedTxn {
            inner: self.inner.clone(),
            mode,
            subs: (0..self.inner.files.len()).map(|_| None).collect(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Read,
    Write { unsynced: bool },
}

/// A transaction over the files it touches, each file's part begun at its first use.
struct PartitionedTxn {
    inner: Arc<Inner>,
    mode: Mode,
    subs: Vec<Option<SqliteTxn>>,
}

impl PartitionedTxn {
    /// The transaction's part in file `i`, begun (and locked, if `lock`) as needed.
    fn sub(&mut self, i: usize, lock: bool) -> Result<&mut SqliteTxn> {
        let control_op = self.mode == (Mode::Write { unsynced: false });
        if lock && i != 0 && control_op && self.subs[0].is_none() {
            // A control operation: control first (see the module doc on the lock order).
            self.sub(0, false)?;
        }
        let group_commit = self.mode == (Mode::Write { unsynced: true });
        if lock
            && i == 0
            && group_commit
            && !self.subs[0].as_ref().is_some_and(SqliteTxn::is_locked)
            && self.subs[1..].iter().flatten().any(SqliteTxn::is_locked)
        {
            return Err(StoreError::Backend(
                "lock order: a group commit locked a shard file before the control file \
                 (a bug: group commits write shard records only)"
                    .into(),
            ));
        }
        if lock && control_op && i != 0 && self.subs[i].as_ref().is_some_and(|t| !t.is_locked()) {
            // A control operation locks a shard file it has only read so far: its part in
            // that file starts again, locked, on the file as it is now. Upgrading the old
            // snapshot would fail whenever the shard's writer committed since (under load,
            // always). Only plain reads came before, which promise nothing at commit; what
            // a control operation decides on it reads for update (`apply_plan`'s
            // compare-and-set of each ownership record).
            let mut read = self.subs[i].take().expect("checked above");
            let _ = read.rollback_now();
        }
        if self.subs[i].is_none() {
            let file = &self.inner.files[i];
            let t = match self.mode {
                Mode::Read => file.begin_reading()?,
                Mode::Write { unsynced } if lock || (i == 0 && control_op) => {
                    file.begin_locked(unsynced)?
                }
                Mode::Write { unsynced } => file.begin_deferred_write(unsynced)?,
            };
            self.subs[i] = Some(t);
        }
        if lock && group_commit {
            self.inner.mark(i);
        }
        let t = self.subs[i].as_mut().expect("begun above");
        if lock {
            t.lock()?;
        }
        Ok(t)
    }

    /// The part in the file of `key`, noting a shard record's file for [`Store::sync`].
    fn sub_of_key(&mut self, key: &[u8], lock: bool) -> Result<&mut SqliteTxn> {
        let i = match shard_of_key(key) {
            Some(shard) => {
                let i = self.inner.index_of_shard(shard);
                self.inner.mark(i);
                i
            }
            None => 0,
        };
        self.sub(i, lock)
    }

    fn finish(&mut self, commit: bool) -> Result<()> {
        // Shard files in shard order, the control file last.
        let n = self.subs.len();
        let mut committed = 0usize;
        let mut failed: Option<StoreError> = None;
        for i in (1..n).chain([0]) {
            let Some(mut t) = self.subs[i].take() else {
                continue;
            };
            if failed.is_some() || !commit || !t.is_locked() {
                let _ = t.rollback_now();
                continue;
            }
            match t.commit_now() {
                Ok(()) => committed += 1,
                Err(e) => failed = Some(e),
            }
        }
        match failed {
            None => Ok(()),
            Some(e @ StoreError::Io(_)) => Err(e),
            Some(e) if committed == 0 => Err(e),
            Some(e) => Err(StoreError::Undetermined(format!(
                "the transaction committed in {committed} of its files, then failed: {e}"
            ))),
        }
    }
}

impl Kv for PartitionedTxn {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.sub_of_key(key, false)?.get(key)
    }

    fn get_for_update(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.sub_of_key(key, true)?.get_for_update(key)
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        self.sub_of_key(key, true)?.put(key, value)
    }

    fn delete(&mut self, key: &[u8]) -> Result<()> {
        self.sub_of_key(key, true)?.delete(key)
    }

    fn scan(&mut self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<Pair>> {
        let limit = crate::check_scan_limit(limit);
        if shard_of_range(start, end).is_some() {
            return self.sub_of_key(start, false)?.scan(start, end, limit);
        }
        // Keys of different files never coincide: merge every file's first `limit`.
        let mut all = Vec::new();
        for i in 0..self.subs.len() {
            all.extend(self.sub(i, false)?.scan(start, end, limit)?);
        }
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all.truncate(limit);
        Ok(all)
    }
}

impl Txn for PartitionedTxn {
    fn commit(mut self: Box<Self>) -> Result<()> {
        if self.mode != Mode::Read {
            // Once per transaction, even one that wrote nothing (the writer's heartbeat).
            crate::failpoints::hit(crate::failpoints::COMMIT)?;
        }
        self.finish(true)
    }

    fn rollback(mut self: Box<Self>) -> Result<()> {
        self.finish(false)
    }
}

impl Store for PartitionedStore {
    fn begin(&self) -> Result<Box<dyn Txn>> {
        Ok(Box::new(self.txn(Mode::Write { unsynced: false })))
    }

    fn begin_read(&self) -> Result<Box<dyn Txn>> {
        Ok(Box::new(self.txn(Mode::Read)))
    }

    fn begin_unsynced(&self) -> Result<Box<dyn Txn>> {
        Ok(Box::new(self.txn(Mode::Write { unsynced: true })))
    }

    fn begin_snapshot(&self) -> Result<Box<dyn Txn>> {
        // Optimistic, so that it never waits for (or starves behind) a busy writer: take a
        // snapshot of each file, one after another, between two readings of every file's
        // `data_version` (which changes when another connection commits). If no file
        // changed from the first reading to the second, each snapshot is its file's state
        // over the whole span, so all of them are the store at one instant; otherwise try
        // again.
        let probes: Vec<rusqlite::Connection> = self
            .inner
            .files
            .iter()
            .map(SqliteStore::probe_connection)
            .collect::<Result<_>>()?;
        let versions = || -> Result<Vec<i64>> {
            probes
                .iter()
                .map(|c| {
                    c.query_row("PRAGMA data_version", [], |r| r.get(0))
                        .map_err(map_err)
                })
                .collect()
        };
        for attempt in 0..SNAPSHOT_ATTEMPTS_MAX {
            let before = versions()?;
            let mut txn = self.txn(Mode::Read);
            for (i, f) in self.inner.files.iter().enumerate() {
                let mut t = f.begin_reading()?;
                t.get(b"")?; // a read starts the snapshot
                txn.subs[i] = Some(t);
            }
            if versions()? == before {
                return Ok(Box::new(txn));
            }
            drop(txn.finish(false));
            if attempt % 16 == 15 {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
        Err(StoreError::Busy(format!(
            "the store's files changed during each of {SNAPSHOT_ATTEMPTS_MAX} attempts at one snapshot of them all"
        )))
    }

    fn sync(&self) -> Result<()> {
        // What it syncs covers every commit to those files before the call, whoever made it
        // (the cell's other colour writes the same shards' file).
        for (f, interest) in self.inner.files.iter().zip(&self.inner.interest) {
            if interest.load(std::sync::atomic::Ordering::Relaxed) {
                f.sync_wal()?;
            }
        }
        Ok(())
    }

    fn engine(&self) -> &'static str {
        "sqlite"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_belong_to_their_shard() {
        for (key, shard) in [
            (&b"own/00042"[..], Some(42)),
            (b"u/00007/alice/k", Some(7)),
            (b"x/00100/EUR/clearing", Some(100)),
            (b"ob/00003/m1", Some(3)),
            (b"t/00003/0000000000001/a/k", Some(3)),
            (b"sys/00001", None),
            (b"sys/cells/00001", None),
            (b"own/0004", None),
            (b"own/000421", None),
            (b"own/0004x", None),
            (b"/00001", None),
            (b"nothing", None),
        ] {
            assert_eq!(shard_of_key(key), shard, "{}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn ranges_within_one_shard_are_found() {
        assert_eq!(
            shard_of_range(b"u/00007/alice/", b"u/00007/alice0"),
            Some(7)
        );
        assert_eq!(shard_of_range(b"ob/00003/", b"ob/00003\xff"), Some(3));
        assert_eq!(shard_of_range(b"own/00003", b"own/00004"), Some(3));
        assert_eq!(shard_of_range(b"own/00003", b"own/00005"), None);
        assert_eq!(shard_of_range(b"own/", b"own0"), None);
        assert_eq!(shard_of_range(b"sys/", b"sys0"), None);
    }

    #[test]
    fn layouts_are_checked() {
        assert!(check_ranges(&[(0, 9), (10, 19)]).is_ok());
        assert!(check_ranges(&[(0, 9), (9, 19)]).is_err());
        assert!(check_ranges(&[(10, 19), (0, 9)]).is_err());
        assert!(check_ranges(&[(5, 4)]).is_err());
        let many: Vec<(u32, u32)> = (0..=PARTITIONS_MAX as u32).map(|i| (i, i)).collect();
        assert!(check_ranges(&many).is_err());
    }
}
