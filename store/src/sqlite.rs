//! The embedded engine: a SQLite file in WAL mode, shared by the cell processes on the
//! machine (`ldc up` gives each group of shards a file of its own: see
//! [`crate::partitioned`], which builds on this one).
//!
//! Why SQLite: it is crash-safe (the WAL is synced on commit with `synchronous=FULL`, so an
//! acknowledged payment survives `kill -9` and power loss), it needs no server, and several
//! processes can open one file at once: SQLite's write lock serialises writers across
//! processes, which is exactly the isolation fencing needs.
//!
//! Read-write transactions start with `BEGIN IMMEDIATE`, taking the write lock up front, so
//! they are serialisable: `get_for_update` needs no extra bookkeeping and a commit never
//! conflicts. Read-only transactions read a WAL snapshot and never block writers.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params};

use crate::{Kv, Pair, Result, Store, StoreError, Txn};

/// How long a writer waits for another process's write lock before giving up with `Busy`.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Offset of SQLite's WAL write lock in the `-shm` file (see [`LockProbe`]).
const WAL_WRITE_LOCK_BYTE: i64 = 120;
/// WAL size (pages) at which a committing writer checkpoints itself.
/// Under steady writes the background PASSIVE checkpoints never let the WAL restart (new
/// frames keep arriving), so this inline checkpoint is what bounds the WAL; each one stalls
/// the cell's writer (two fsyncs). 64 Ki pages (256 MiB at 4 KiB) makes them a quarter as
/// frequent as 16 Ki did: +14% writer throughput in `writer_throughput`. At 18,000
/// payments/s (59,000 frames/s) that is one stall of 20-50 ms about every 1.1 s, which is
/// the p99.9 of `bench/payments.sh` (30-40 ms against a p99 of 7 ms). Timed: the stall is
/// a fixed cost that grows with the database (8 ms early in a run, 30 ms at 170,000
/// payments), not the frames left to copy: waking the background checkpointer 2 Ki frames
/// before the limit, so that the inline one copied almost nothing, still left 14-23 ms;
/// what is left is most likely the sync of the database file (not separately timed), which
/// a checkpoint must do before the WAL may restart.
/// Also tried: a background `wal_checkpoint(RESTART)` after each PASSIVE pass; it stalled
/// writers as long and cost 10% throughput.
const WAL_AUTOCHECKPOINT_PAGES: u32 = 65_536;
/// Period of the background checkpointer. A checkpoint copies the newest version of each
/// page written since the last one, so a longer period copies a hot page (a user's journal
/// tail, the system accounts) once instead of many times: 1 s instead of 200 ms gave +5%
/// payments/s and a p99 of 8.7 ms instead of 11.2 ms in `bench/payments.sh`.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(1000);
/// Idle connections kept per store handle.
const POOL_IDLE_MAX: usize = 16;

/// The embedded store. Cheap to share (`Arc`); each transaction borrows a pooled connection.
pub struct SqliteStore {
    path: PathBuf,
    pool: Arc<Mutex<Vec<Connection>>>,
    /// Connections that run with `synchronous=NORMAL` for [`Store::begin_unsynced`], kept
    /// apart for good: one never reaches `pool` (where a commit must fsync), and the group
    /// commit writer gets the same warm connection each batch without switching modes.
    unsynced_pool: Arc<Mutex<Vec<Connection>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Set by every commit that wrote: only a process that writes checkpoints, so the
    /// processes sharing the file (standby cells, the other colour, the controller) do not
    /// all race to copy the same frames.
    wrote: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// SQLite's `SQLITE_BUSY_SNAPSHOT`: a transaction that read a snapshot tried to write after
/// another connection committed. Nothing was written; the whole transaction may be retried.
const BUSY_SNAPSHOT: i32 = 517;

pub(crate) fn map_err(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _) if f.extended_code == BUSY_SNAPSHOT => {
            StoreError::Conflict
        }
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) =>
        {
            StoreError::Busy(e.to_string())
        }
        rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::DiskFull => {
            StoreError::Full(e.to_string())
        }
        rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::SystemIoFailure => {
            StoreError::Io(e.to_string())
        }
        _ => StoreError::Backend(e.to_string()),
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the store file at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Config(format!("cannot create {}: {e}", dir.display())))?;
        }
        let store = SqliteStore {
            path: path.to_path_buf(),
            pool: Arc::new(Mutex::new(Vec::new())),
            unsynced_pool: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::default(),
            wrote: Arc::default(),
        };
        let conn = store.connect()?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID;",
        )
        .map_err(map_err)?;
        store.pool.lock().expect("pool lock").push(conn);
        let ckpt = store.connect()?;
        let (stop, wrote) = (store.stop.clone(), store.wrote.clone());
        std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(CHECKPOINT_EVERY);
                    if !wrote.swap(false, std::sync::atomic::Ordering::Relaxed) {
                        continue;
                    }
                    // PASSIVE never blocks writers or readers; it copies what it can.
                    if let Err(e) = ckpt.execute_batch("PRAGMA wal_checkpoint(PASSIVE)") {
                        tracing::debug!(error = %e, "checkpoint skipped");
                    }
                }
            })
            .map_err(|e| StoreError::Config(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(store)
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn connect(&self) -> Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| {
            StoreError::Config(format!("cannot open store {}: {e}", self.path.display()))
        })?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(map_err)?;
        // journal_mode returns a row, so query it rather than execute it.
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(map_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Config(format!(
                "store {} refused WAL mode (got {mode}); is it on a network filesystem?",
                self.path.display()
            )));
        }
        // FULL: the WAL is fsynced at every commit. NORMAL would lose the last commits on
        // power loss, which would break "no acknowledged payment is ever lost".
        conn.execute_batch(
            "PRAGMA synchronous=FULL; PRAGMA cache_size=-65536; PRAGMA temp_store=MEMORY;",
        )
        .map_err(map_err)?;
        // Checkpoints (copying the WAL into the main file, with its own fsync) run on a
        // background thread; a commit only does one if that thread falls far behind.
        conn.execute_batch(&format!(
            "PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}"
        ))
        .map_err(map_err)?;
        conn.set_prepared_statement_cache_capacity(32);
        Ok(conn)
    }

    fn start(&self, sql: &str, write: bool, unsynced: bool) -> Result<Box<dyn Txn>> {
        Ok(Box::new(self.start_txn(sql, write, unsynced)?))
    }

    /// A read-write transaction that takes the write lock only at its first write or
    /// [`SqliteTxn::lock`] (`BEGIN DEFERRED`): what a transaction over several files uses
    /// for a file it may only read, so that reading never waits for that file's writers.
    pub(crate) fn begin_deferred_write(&self, unsynced: bool) -> Result<SqliteTxn> {
        self.start_txn("BEGIN DEFERRED", true, unsynced)
    }

    /// A read-write transaction holding the write lock from the start.
    pub(crate) fn begin_locked(&self, unsynced: bool) -> Result<SqliteTxn> {
        self.start_txn("BEGIN IMMEDIATE", true, unsynced)
    }

    /// A read-only transaction.
    pub(crate) fn begin_reading(&self) -> Result<SqliteTxn> {
        self.start_txn("BEGIN DEFERRED", false, false)
    }

    /// A connection of its own, outside the pools (for `PRAGMA data_version`, which counts
    /// the commits of every other connection since the last time it was asked on this one).
    pub(crate) fn probe_connection(&self) -> Result<Connection> {
        self.connect()
    }

    /// Runs `f` on a connection of this store outside any transaction.
    pub(crate) fn with_conn<R>(&self, f: impl FnOnce(&Connection) -> Result<R>) -> Result<R> {
        let conn = match self.pool.lock().expect("pool lock").pop() {
            Some(c) => c,
            None => self.connect()?,
        };
        let r = f(&conn);
        give_back(&self.pool, conn);
        r
    }

    fn start_txn(&self, sql: &str, write: bool, unsynced: bool) -> Result<SqliteTxn> {
        let pool = if unsynced {
            &self.unsynced_pool
        } else {
            &self.pool
        };
        let taken = pool.lock().expect("pool lock").pop();
        let conn = match taken {
            Some(c) => c,
            None => {
                let c = self.connect()?;
                if unsynced {
                    c.execute_batch(SYNC_NORMAL).map_err(map_err)?;
                }
                c
            }
        };
        if let Err(e) = conn.execute_batch(sql) {
            give_back(pool, conn);
            return Err(map_err(e));
        }
        Ok(SqliteTxn {
            conn: Some(conn),
            pool: pool.clone(),
            wrote: self.wrote.clone(),
            write,
            locked: sql == "BEGIN IMMEDIATE",
        })
    }

    /// The WAL file: every commit's frames are appended to it.
    fn wal_path(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push("-wal");
        PathBuf::from(p)
    }
}

/// `synchronous=NORMAL` in WAL mode: COMMIT appends its frames to the WAL and publishes them
/// without fsync. SQLite still syncs the WAL before every checkpoint (so frames are durable
/// before they are copied into the database file and before the WAL is restarted) and
/// syncs the header of a restarted WAL. Only connections of the unsynced pool run with it.
const SYNC_NORMAL: &str = "PRAGMA synchronous=NORMAL";

impl SqliteStore {
    pub(crate) fn sync_wal(&self) -> Result<()> {
        crate::failpoints::hit(crate::failpoints::SYNC)?;
        // An fsync on any descriptor of the WAL flushes every frame written to it before the
        // call, whoever wrote it. A missing WAL was fully checkpointed (synced) and removed
        // by the last connection that closed: there is nothing left to sync.
        match std::fs::File::open(self.wal_path()) {
            Ok(f) => f
                .sync_all()
                .map_err(|e| StoreError::Io(format!("fsync of the WAL failed: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Undetermined(format!(
                "cannot open the WAL to sync it: {e}"
            ))),
        }
    }
}

fn give_back(pool: &Mutex<Vec<Connection>>, conn: Connection) {
    let mut p = pool.lock().expect("pool lock");
    if p.len() < POOL_IDLE_MAX {
        p.push(conn);
    }
}

impl Store for SqliteStore {
    fn begin(&self) -> Result<Box<dyn Txn>> {
        self.start("BEGIN IMMEDIATE", true, false)
    }

    fn begin_read(&self) -> Result<Box<dyn Txn>> {
        self.start("BEGIN DEFERRED", false, false)
    }

    fn begin_unsynced(&self) -> Result<Box<dyn Txn>> {
        self.start("BEGIN IMMEDIATE", true, true)
    }

    fn sync(&self) -> Result<()> {
        self.sync_wal()
    }

    fn engine(&self) -> &'static str {
        "sqlite"
    }
}

pub(crate) struct SqliteTxn {
    conn: Option<Connection>,
    pool: Arc<Mutex<Vec<Connection>>>,
    wrote: Arc<std::sync::atomic::AtomicBool>,
    write: bool,
    /// Whether this transaction holds the file's write lock.
    locked: bool,
}

/// A statement that writes nothing but, like every write, takes the write lock (and fails
/// with `SQLITE_BUSY_SNAPSHOT`, a [`StoreError::Conflict`], if the file changed since this
/// transaction's snapshot).
const TAKE_WRITE_LOCK: &str = "UPDATE kv SET v = v WHERE 0";

impl SqliteTxn {
    /// Takes the write lock now (a no-op for a transaction that holds it).
    pub(crate) fn lock(&mut self) -> Result<()> {
        self.writable()?;
        if !self.locked {
            self.conn()
                .execute_batch(TAKE_WRITE_LOCK)
                .map_err(map_err)?;
            self.locked = true;
        }
        Ok(())
    }

    pub(crate) fn is_locked(&self) -> bool {
        self.locked
    }

    fn conn(&self) -> &Connection {
        self.conn.as_ref().expect("transaction already finished")
    }

    fn writable(&self) -> Result<()> {
        if self.write {
            Ok(())
        } else {
            Err(StoreError::Backend(
                "write in a read-only transaction".into(),
            ))
        }
    }

    fn finish(&mut self, sql: &str) -> Result<()> {
        let conn = self.conn.take().expect("transaction already finished");
        let r = conn.execute_batch(sql).map_err(map_err);
        if r.is_err() {
            // A failed COMMIT leaves SQLite in the transaction in some cases; make sure the
            // connection goes back to the pool clean.
            let _ = conn.execute_batch("ROLLBACK");
        }
        give_back(&self.pool, conn);
        r
    }
}

impl Kv for SqliteTxn {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let mut st = self
            .conn()
            .prepare_cached("SELECT v FROM kv WHERE k = ?1")
            .map_err(map_err)?;
        st.query_row(params![key], |r| r.get(0))
            .optional()
            .map_err(map_err)
    }

    fn get_for_update(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        // The write lock (taken by BEGIN IMMEDIATE, or now) excludes every other writer.
        self.lock()?;
        self.get(key)
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        self.lock()?;
        let mut st = self
            .conn()
            .prepare_cached(
                "INSERT INTO kv (k, v) VALUES (?1, ?2) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
            )
            .map_err(map_err)?;
        st.execute(params![key, value]).map_err(map_err)?;
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) -> Result<()> {
        self.lock()?;
        let mut st = self
            .conn()
            .prepare_cached("DELETE FROM kv WHERE k = ?1")
            .map_err(map_err)?;
        st.execute(params![key]).map_err(map_err)?;
        Ok(())
    }

    fn scan(&mut self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<Pair>> {
        let limit = crate::check_scan_limit(limit) as i64;
        let mut st = self
            .conn()
            .prepare_cached("SELECT k, v FROM kv WHERE k >= ?1 AND k < ?2 ORDER BY k LIMIT ?3")
            .map_err(map_err)?;
        let rows = st
            .query_map(params![start, end, limit], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(map_err)?;
        rows.collect::<std::result::Result<Vec<Pair>, _>>()
            .map_err(map_err)
    }
}

impl SqliteTxn {
    /// Commits (the failpoint is the caller's: once per store transaction).
    pub(crate) fn commit_now(&mut self) -> Result<()> {
        self.finish("COMMIT")?;
        if self.write {
            self.wrote.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    pub(crate) fn rollback_now(&mut self) -> Result<()> {
        self.finish("ROLLBACK")
    }
}

impl Txn for SqliteTxn {
    fn commit(mut self: Box<Self>) -> Result<()> {
        if self.write {
            crate::failpoints::hit(crate::failpoints::COMMIT)?;
        }
        self.commit_now()
    }

    fn rollback(mut self: Box<Self>) -> Result<()> {
        self.rollback_now()
    }
}

impl Drop for SqliteTxn {
    fn drop(&mut self) {
        if self.conn.is_some() {
            tracing::warn!("store transaction dropped without commit or rollback; rolling back");
            let _ = self.finish("ROLLBACK");
        }
    }
}

/// Asks the kernel which process holds the write lock of a store file: what a supervisor
/// asks before it kills a stuck writer (fencing by force).
///
/// In WAL mode SQLite takes its write lock as a POSIX record lock on byte 120 of the
/// `-shm` file (`WAL_WRITE_LOCK`, part of SQLite's documented WAL-index format, stable
/// across versions because processes of different versions must share it); `F_GETLK`
/// names the holder. Locks of the calling process are not reported.
///
/// The probe keeps its descriptor open for its whole life, on purpose: closing *any*
/// descriptor of a file drops every POSIX lock the process holds on it, including the
/// locks SQLite's own connections in this process hold on the `-shm` (its dead-man-switch
/// lock among them). Open one probe per process and keep it.
#[derive(Debug)]
pub struct LockProbe {
    shm: std::fs::File,
}

impl LockProbe {
    /// A probe of the store file at `path` (its `-shm` must exist: a store that is open).
    pub fn open(path: &Path) -> std::io::Result<LockProbe> {
        let mut shm = path.as_os_str().to_os_string();
        shm.push("-shm");
        let shm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(shm)?;
        Ok(LockProbe { shm })
    }

    /// The process holding the write lock, if another process holds it.
    pub fn holder(&self) -> std::io::Result<Option<u32>> {
        let mut lk = nix::libc::flock {
            l_type: nix::libc::F_WRLCK as _,
            l_whence: nix::libc::SEEK_SET as _,
            l_start: WAL_WRITE_LOCK_BYTE,
            l_len: 1,
            l_pid: 0,
        };
        nix::fcntl::fcntl(&self.shm, nix::fcntl::FcntlArg::F_GETLK(&mut lk))?;
        Ok((i32::from(lk.l_type) != nix::libc::F_UNLCK).then_some(lk.l_pid as u32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Child side of `the_write_lock_holder_is_named`: holds the write lock of the store
    /// named by `LDC_TEST_HOLD` until killed (run only as that test's child process).
    #[test]
    #[ignore = "a helper process of the_write_lock_holder_is_named"]
    fn hold_the_write_lock() {
        let path = std::env::var("LDC_TEST_HOLD").expect("run by the_write_lock_holder_is_named");
        let store = SqliteStore::open(Path::new(&path)).unwrap();
        let mut t = store.begin().unwrap();
        t.put(b"k", b"v").unwrap();
        std::fs::write(format!("{path}.held"), b"").unwrap();
        std::thread::sleep(Duration::from_secs(60));
    }

    #[test]
    fn the_write_lock_holder_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = SqliteStore::open(&path).unwrap();
        let probe = LockProbe::open(&path).unwrap();
        assert_eq!(probe.holder().unwrap(), None);
        // Our own lock is not reported (only another process can be stuck holding it).
        let t = store.begin().unwrap();
        assert_eq!(probe.holder().unwrap(), None);
        t.rollback().unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sqlite::tests::hold_the_write_lock",
                "--ignored",
                "--nocapture",
            ])
            .env("LDC_TEST_HOLD", &path)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let held = dir.path().join("s.db.held");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !held.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the child never took the lock"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let holder = probe.holder().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(holder, Some(child.id()));
        // The kernel releases it with the process.
        assert_eq!(probe.holder().unwrap(), None);
    }

    fn synchronous(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap()
    }

    /// An unsynced transaction must never leave its connection where an ordinary commit
    /// could get it: that commit would skip the fsync.
    #[test]
    fn unsynced_connections_stay_apart() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        for commit in [true, false] {
            let mut t = store.begin_unsynced().unwrap();
            t.put(b"k", b"v").unwrap();
            if commit {
                t.commit().unwrap();
            } else {
                t.rollback().unwrap();
            }
            let mut t = store.begin().unwrap();
            t.put(b"k2", b"v").unwrap();
            t.commit().unwrap();
            let pool = store.pool.lock().unwrap();
            assert!(!pool.is_empty());
            for c in pool.iter() {
                assert_eq!(synchronous(c), 2, "a pooled connection is not FULL");
            }
            let unsynced = store.unsynced_pool.lock().unwrap();
            assert_eq!(unsynced.len(), 1, "the unsynced connection is reused");
            assert_eq!(synchronous(&unsynced[0]), 1);
        }
        store.sync().unwrap();
        assert!(store.wal_path().exists(), "sync must target the live WAL");
    }
}
