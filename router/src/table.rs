//! The routing table a router uses, and the store source that feeds it.
//!
//! [`TableHandle::offer`] is the only way in: a table is validated, then taken only if its
//! epoch is higher than the current one. Sources may race, repeat themselves, or replay old
//! values; the router still never routes backwards. Sources hand over what was published
//! with [`TableHandle::offer_published`]: with a verifier (every secure router), the
//! publisher's signature of those exact bytes must verify, or the table is refused and
//! alarmed (`ldc_router_source_errors_total{reason="unsigned"|"bad_signature"}`).
//!
//! A request that meets a "moved" answer calls [`TableHandle::request_refresh`] and waits
//! (bounded) for a newer epoch. A source that can fetch on demand listens on
//! [`TableHandle::refresh_requested`]; [`poll_store`] does, so a moved answer re-reads the
//! store at once instead of waiting for the next poll.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ldc_core::routing::{RoutingTable, SIGNATURE_KEY, STORE_KEY, TableError};
use ldc_security::table::{TableSignatureError, TableVerifier};
use tokio::sync::{Notify, watch};

use crate::metrics::SourceMetrics;

/// Holds the current routing table. Cheap to clone; clones share the table.
#[derive(Clone)]
pub struct TableHandle {
    inner: Arc<Inner>,
}

struct Inner {
    tx: watch::Sender<Option<Arc<RoutingTable>>>,
    refresh: Notify,
    has_source: AtomicBool,
    /// When a source last delivered the current table or a newer one.
    confirmed_at: Mutex<Option<Instant>>,
    metrics: SourceMetrics,
    /// The publisher's key; `None` takes unsigned tables (tests, `--insecure`).
    verifier: Option<TableVerifier>,
}

/// Why a published table was not taken.
#[derive(Debug, thiserror::Error)]
pub enum PublishedError {
    #[error("{0}")]
    Signature(#[from] TableSignatureError),
    #[error("the routing table is not valid JSON: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("the routing table is invalid: {0}")]
    Invalid(#[from] TableError),
}

impl PublishedError {
    pub fn label(&self) -> &'static str {
        match self {
            PublishedError::Signature(e) => e.label(),
            PublishedError::Decode(_) => "decode",
            PublishedError::Invalid(_) => "invalid",
        }
    }
}

impl Default for TableHandle {
    fn default() -> Self {
        TableHandle::new()
    }
}

impl TableHandle {
    /// A handle with no table: the router answers UNAVAILABLE until a table is offered.
    pub fn new() -> Self {
        TableHandle::with_verifier(None)
    }

    /// A handle that takes published tables only with the publisher's signature.
    pub fn verified(verifier: TableVerifier) -> Self {
        TableHandle::with_verifier(Some(verifier))
    }

    fn with_verifier(verifier: Option<TableVerifier>) -> Self {
        let (tx, _) = watch::channel(None);
        TableHandle {
            inner: Arc::new(Inner {
                tx,
                refresh: Notify::new(),
                has_source: AtomicBool::new(false),
                confirmed_at: Mutex::new(None),
                metrics: SourceMetrics::new(),
                verifier,
            }),
        }
    }

    /// Offers a table as published: `bytes` (its JSON) and the signature stored beside
    /// them. A table whose signature does not verify is refused and alarmed.
    pub fn offer_published(
        &self,
        bytes: &[u8],
        signature: Option<&[u8]>,
    ) -> Result<bool, PublishedError> {
        if let Some(v) = &self.inner.verifier
            && let Err(e) = v.verify(bytes, signature)
        {
            tracing::error!(error = %e, "ALARM: refused a routing table that is not signed by the platform's publisher; keeping the current one");
            return Err(e.into());
        }
        let t: RoutingTable = serde_json::from_slice(bytes)?;
        Ok(self.try_offer(t)?)
    }

    /// Offers a table. It is taken (and `true` returned) only if it is valid and its epoch
    /// is higher than the current table's; routing never goes backwards.
    pub fn offer(&self, t: RoutingTable) -> bool {
        match self.try_offer(t) {
            Ok(taken) => taken,
            Err(e) => {
                tracing::warn!(error = %e, "refused an invalid routing table; keeping the current one");
                false
            }
        }
    }

    /// Like [`TableHandle::offer`], but says why an invalid table was refused.
    pub fn try_offer(&self, t: RoutingTable) -> Result<bool, TableError> {
        t.validate()?;
        let epoch = t.epoch;
        let mut t = Some(t);
        let taken = self.inner.tx.send_if_modified(|cur| {
            let newer = cur.as_ref().is_none_or(|c| epoch > c.epoch);
            if newer {
                *cur = t.take().map(Arc::new);
            }
            newer
        });
        let current = self.current().map_or(0, |c| c.epoch);
        if epoch >= current {
            // The source confirmed the table in use (or replaced it): it is fresh.
            *self.inner.confirmed_at.lock().expect("lock") = Some(Instant::now());
        }
        if taken {
            self.inner.metrics.table_epoch.set(epoch as i64);
            tracing::info!(epoch, "routing table taken");
        } else if epoch < current {
            tracing::debug!(epoch, current, "ignored an older routing table");
        }
        Ok(taken)
    }

    /// The table in use, if any.
    pub fn current(&self) -> Option<Arc<RoutingTable>> {
        self.inner.tx.borrow().clone()
    }

    /// Asks the table source (if any) for a fresh read now. Coalesces: many requests before
    /// the source looks cause one read.
    pub fn request_refresh(&self) {
        self.inner.refresh.notify_one();
    }

    /// Resolves when someone called [`TableHandle::request_refresh`]. A source that can
    /// fetch on demand calls [`TableHandle::attach_source`] once, then awaits this.
    pub async fn refresh_requested(&self) {
        self.inner.refresh.notified().await;
    }

    /// Declares that a source answering [`TableHandle::refresh_requested`] is attached, so
    /// requests that meet a "moved" answer wait for it.
    pub fn attach_source(&self) {
        self.inner.has_source.store(true, Ordering::Release);
    }

    /// Whether a source that refreshes on demand is attached.
    pub fn has_source(&self) -> bool {
        self.inner.has_source.load(Ordering::Acquire)
    }

    /// Waits until the table satisfies `done`, at most `wait`. Returns the table in use at
    /// the end either way.
    pub async fn wait_for(
        &self,
        wait: Duration,
        done: impl Fn(&RoutingTable) -> bool,
    ) -> Option<Arc<RoutingTable>> {
        let mut rx = self.inner.tx.subscribe();
        let _ =
            tokio::time::timeout(wait, rx.wait_for(|t| t.as_ref().is_some_and(|t| done(t)))).await;
        self.current()
    }

    /// Counts a failed read of the table source (`reason` is a stable label).
    pub fn record_source_error(&self, reason: &'static str) {
        self.inner
            .metrics
            .source_errors
            .with_label_values(&[reason])
            .inc();
    }

    /// The source metrics, for registration and for refreshing the age gauge.
    pub fn metrics(&self) -> &SourceMetrics {
        &self.inner.metrics
    }

    /// Seconds since a source last confirmed the table in use; `None` without a table.
    pub fn age(&self) -> Option<Duration> {
        self.inner
            .confirmed_at
            .lock()
            .expect("lock")
            .map(|t| t.elapsed())
    }

    /// Sets the age gauge from [`TableHandle::age`] (called when metrics are scraped).
    pub(crate) fn update_age_gauge(&self) {
        if let Some(age) = self.age() {
            self.inner.metrics.table_age_seconds.set(age.as_secs_f64());
        }
    }
}

/// Why a read of the store source gave no table.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("store read failed: {0}")]
    Store(#[from] ldc_store::StoreError),
    #[error("no routing table is published under {key:?} yet", key = String::from_utf8_lossy(STORE_KEY))]
    Missing,
    #[error("the routing table in the store was refused: {0}")]
    Refused(#[from] PublishedError),
    #[error("the store read took longer than {0:?}")]
    Timeout(Duration),
    #[error("the store read task failed: {0}")]
    Join(String),
}

impl SourceError {
    /// A stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            SourceError::Store(_) => "store",
            SourceError::Missing => "missing",
            SourceError::Refused(e) => e.label(),
            SourceError::Timeout(_) => "timeout",
            SourceError::Join(_) => "join",
        }
    }
}

/// Reads the table once from the store and offers it. Returns whether it was taken.
pub async fn read_store_once(
    store: &Arc<dyn ldc_store::Store>,
    table: &TableHandle,
    timeout: Duration,
) -> Result<bool, SourceError> {
    let store = store.clone();
    // Store transactions are synchronous (SQLite may block on a lock): keep them off the
    // async workers.
    type Published = (Option<Vec<u8>>, Option<Vec<u8>>);
    let read = tokio::task::spawn_blocking(move || -> Result<Published, SourceError> {
        let mut txn = store.begin_read()?;
        // One snapshot: the table and its signature as committed together.
        let value = txn
            .get(STORE_KEY)
            .and_then(|v| Ok((v, txn.get(SIGNATURE_KEY)?)));
        txn.rollback()?;
        Ok(value?)
    });
    let (bytes, signature) = tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| SourceError::Timeout(timeout))?
        .map_err(|e| SourceError::Join(e.to_string()))??;
    let bytes = bytes.ok_or(SourceError::Missing)?;
    Ok(table.offer_published(&bytes, signature.as_deref())?)
}

/// Polls the store key [`STORE_KEY`] (a JSON [`RoutingTable`]) every `every`, and at once
/// when a request asks for a refresh, offering what it reads to `table`. When the store
/// fails, the last good table stays in use; the failure is counted in
/// `ldc_router_source_errors_total` and the table's age keeps growing.
pub async fn poll_store(
    store: Arc<dyn ldc_store::Store>,
    table: TableHandle,
    every: Duration,
    shutdown: impl Future<Output = ()>,
) {
    table.attach_source();
    // A limit on everything: even a zero period must not spin on the store.
    let every = every.max(Duration::from_millis(10));
    let read_timeout = every.clamp(Duration::from_secs(1), Duration::from_secs(10));
    tokio::pin!(shutdown);
    let mut failing = false;
    loop {
        match read_store_once(&store, &table, read_timeout).await {
            Ok(_) => {
                if failing {
                    tracing::info!("routing table source recovered");
                }
                failing = false;
            }
            Err(e) => {
                table.record_source_error(e.label());
                // Log a failure once when it starts, not on every poll.
                if !failing {
                    tracing::warn!(error = %e, "cannot read the routing table; keeping the last good one");
                }
                failing = true;
            }
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(every) => {}
            _ = table.refresh_requested() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ldc_core::routing::{CellRoute, ShardRoute};

    pub(crate) fn table(epoch: u64) -> RoutingTable {
        let mut t = RoutingTable {
            epoch,
            shards: vec![
                ShardRoute {
                    cell: "c1".into(),
                    epoch: 1
                };
                4
            ],
            ..Default::default()
        };
        t.cells.insert("c1".into(), CellRoute::default());
        t
    }

    #[test]
    fn epoch_never_goes_backwards() {
        let h = TableHandle::new();
        assert!(h.current().is_none());
        assert!(h.offer(table(2)));
        assert!(!h.offer(table(1)), "older epoch refused");
        assert!(!h.offer(table(2)), "equal epoch refused");
        assert_eq!(h.current().unwrap().epoch, 2);
        assert!(h.offer(table(5)));
        assert_eq!(h.current().unwrap().epoch, 5);
        assert_eq!(h.metrics().table_epoch.get(), 5);
    }

    #[test]
    fn invalid_table_refused() {
        let h = TableHandle::new();
        let mut bad = table(9);
        bad.shards[0].cell = "ghost".into();
        assert!(matches!(
            h.try_offer(bad),
            Err(TableError::UnknownCell { .. })
        ));
        assert!(h.current().is_none());
    }

    #[tokio::test]
    async fn wait_for_sees_a_newer_table() {
        let h = TableHandle::new();
        h.offer(table(1));
        let h2 = h.clone();
        let waiter = tokio::spawn(async move {
            h2.wait_for(Duration::from_secs(10), |t| t.epoch > 1)
                .await
                .unwrap()
                .epoch
        });
        tokio::task::yield_now().await;
        h.offer(table(3));
        assert_eq!(waiter.await.unwrap(), 3);
    }
}
