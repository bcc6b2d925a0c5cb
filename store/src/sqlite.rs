//! The embedded engine: one SQLite file in WAL mode, shared by every cell process on the
//! machine.
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

use crate::{Kv, Pair, Result, SCAN_LIMIT_MAX, Store, StoreError, Txn};

/// How long a writer waits for another process's write lock before giving up with `Busy`.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// WAL size (pages) at which a committing writer checkpoints itself: a safety net only.
const WAL_AUTOCHECKPOINT_PAGES: u32 = 16_384;
/// Period of the background checkpointer.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);
/// Idle connections kept per store handle.
const POOL_IDLE_MAX: usize = 16;

/// The embedded store. Cheap to share (`Arc`); each transaction borrows a pooled connection.
pub struct SqliteStore {
    path: PathBuf,
    pool: Arc<Mutex<Vec<Connection>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn map_err(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) =>
        {
            StoreError::Busy(e.to_string())
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
            stop: Arc::default(),
        };
        let conn = store.connect()?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID;",
        )
        .map_err(map_err)?;
        store.pool.lock().expect("pool lock").push(conn);
        let ckpt = store.connect()?;
        let stop = store.stop.clone();
        std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(CHECKPOINT_EVERY);
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

    fn take(&self) -> Result<Connection> {
        if let Some(c) = self.pool.lock().expect("pool lock").pop() {
            return Ok(c);
        }
        self.connect()
    }

    fn start(&self, sql: &str, write: bool) -> Result<Box<dyn Txn>> {
        let conn = self.take()?;
        if let Err(e) = conn.execute_batch(sql) {
            give_back(&self.pool, conn);
            return Err(map_err(e));
        }
        Ok(Box::new(SqliteTxn {
            conn: Some(conn),
            pool: self.pool.clone(),
            write,
        }))
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
        self.start("BEGIN IMMEDIATE", true)
    }

    fn begin_read(&self) -> Result<Box<dyn Txn>> {
        self.start("BEGIN DEFERRED", false)
    }

    fn engine(&self) -> &'static str {
        "sqlite"
    }
}

struct SqliteTxn {
    conn: Option<Connection>,
    pool: Arc<Mutex<Vec<Connection>>>,
    write: bool,
}

impl SqliteTxn {
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
        // The write lock taken by BEGIN IMMEDIATE already excludes every other writer.
        self.writable()?;
        self.get(key)
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        self.writable()?;
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
        self.writable()?;
        let mut st = self
            .conn()
            .prepare_cached("DELETE FROM kv WHERE k = ?1")
            .map_err(map_err)?;
        st.execute(params![key]).map_err(map_err)?;
        Ok(())
    }

    fn scan(&mut self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<Pair>> {
        let limit = limit.min(SCAN_LIMIT_MAX) as i64;
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

impl Txn for SqliteTxn {
    fn commit(mut self: Box<Self>) -> Result<()> {
        self.finish("COMMIT")
    }

    fn rollback(mut self: Box<Self>) -> Result<()> {
        self.finish("ROLLBACK")
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
