//! TiKV backend: optimistic Percolator transactions through `tikv-client`.
//!
//! Reads happen at the transaction's start timestamp; writes are buffered and sent at
//! commit (two-phase). `get_for_update` adds the key to the lock set, so a concurrent
//! write to it (say, a failover bumping a shard's ownership epoch) makes our commit fail
//! with a write conflict: this is what fences a deposed cell on TiKV.
//!
//! `tikv-client` is async; our [`Txn`] is synchronous (see the crate docs), so each call is
//! driven to completion on a small runtime owned by the store. Callers are plain threads
//! (the cell's writer thread, or `spawn_blocking`), never async tasks.

use std::sync::Arc;

use tikv_client::{Transaction, TransactionClient};
use tokio::runtime::Runtime;

use crate::{Kv, Pair, Result, Store, StoreError, Txn};

pub struct TikvStore {
    rt: Arc<Runtime>,
    client: TransactionClient,
}

fn map_err(e: tikv_client::Error) -> StoreError {
    let text = e.to_string();
    // tikv-client reports write conflicts and lock contention inside key errors; the debug
    // form names the variant.
    let dbg = format!("{e:?}");
    if dbg.contains("WriteConflict") || dbg.contains("Conflict") || dbg.contains("KeyIsLocked") {
        StoreError::Conflict
    } else if dbg.contains("UndeterminedError") {
        StoreError::Undetermined(text)
    } else {
        StoreError::Backend(text)
    }
}

impl TikvStore {
    /// Connects to the PD endpoints (`host:port`).
    pub fn connect(pd_endpoints: Vec<String>) -> Result<TikvStore> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tikv-client")
            .enable_all()
            .build()
            .map_err(|e| {
                StoreError::Config(format!("cannot start the TiKV client runtime: {e}"))
            })?;
        let client = rt
            .block_on(TransactionClient::new(pd_endpoints.clone()))
            .map_err(|e| {
                StoreError::Config(format!("cannot reach TiKV PD at {pd_endpoints:?}: {e}"))
            })?;
        Ok(TikvStore {
            rt: Arc::new(rt),
            client,
        })
    }

    fn start(&self, read_only: bool) -> Result<Box<dyn Txn>> {
        let txn = self
            .rt
            .block_on(self.client.begin_optimistic())
            .map_err(map_err)?;
        Ok(Box::new(TikvTxn {
            rt: self.rt.clone(),
            txn: Some(txn),
            read_only,
        }))
    }
}

impl Store for TikvStore {
    fn begin(&self) -> Result<Box<dyn Txn>> {
        self.start(false)
    }

    fn begin_read(&self) -> Result<Box<dyn Txn>> {
        self.start(true)
    }

    fn engine(&self) -> &'static str {
        "tikv"
    }
}

struct TikvTxn {
    rt: Arc<Runtime>,
    txn: Option<Transaction>,
    read_only: bool,
}

impl TikvTxn {
    fn t(&mut self) -> &mut Transaction {
        self.txn.as_mut().expect("transaction already finished")
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(StoreError::Backend(
                "write in a read-only transaction".into(),
            ))
        } else {
            Ok(())
        }
    }
}

impl Kv for TikvTxn {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let rt = self.rt.clone();
        rt.block_on(self.t().get(key.to_vec())).map_err(map_err)
    }

    fn get_for_update(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.writable()?;
        let rt = self.rt.clone();
        let v = rt.block_on(self.t().get(key.to_vec())).map_err(map_err)?;
        rt.block_on(self.t().lock_keys(vec![key.to_vec()]))
            .map_err(map_err)?;
        Ok(v)
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        self.writable()?;
        let rt = self.rt.clone();
        rt.block_on(self.t().put(key.to_vec(), value.to_vec()))
            .map_err(map_err)
    }

    fn delete(&mut self, key: &[u8]) -> Result<()> {
        self.writable()?;
        let rt = self.rt.clone();
        rt.block_on(self.t().delete(key.to_vec())).map_err(map_err)
    }

    fn scan(&mut self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<Pair>> {
        let rt = self.rt.clone();
        let limit = crate::check_scan_limit(limit) as u32;
        let range = start.to_vec()..end.to_vec();
        let pairs = rt.block_on(self.t().scan(range, limit)).map_err(map_err)?;
        Ok(pairs.map(|p| (Vec::from(p.0), p.1)).collect())
    }
}

impl Txn for TikvTxn {
    fn commit(mut self: Box<Self>) -> Result<()> {
        let mut txn = self.txn.take().expect("transaction already finished");
        if self.read_only {
            return self.rt.block_on(txn.rollback()).map_err(map_err);
        }
        self.rt.block_on(txn.commit()).map(|_| ()).map_err(map_err)
    }

    fn rollback(mut self: Box<Self>) -> Result<()> {
        let mut txn = self.txn.take().expect("transaction already finished");
        self.rt.block_on(txn.rollback()).map_err(map_err)
    }
}

impl Drop for TikvTxn {
    fn drop(&mut self) {
        if let Some(mut txn) = self.txn.take() {
            tracing::warn!("TiKV transaction dropped without commit or rollback; rolling back");
            let _ = self.rt.block_on(txn.rollback());
        }
    }
}
