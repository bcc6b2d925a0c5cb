//! The outbox relay: delivers queued credits of the shards this cell owns straight to the
//! payee's cell, over mutual TLS, and settles each one on the payer side. Credits go in
//! batches (`DeliverBatch`, one call per payee endpoint and up to `DELIVER_BATCH_MAX`
//! credits), applied by the payee's writer in one store transaction and settled by ours in
//! one: a transfer across cells costs about two local payments, not two calls and three
//! transactions of its own. A payee cell of an earlier release, which answers
//! UNIMPLEMENTED, gets one `Deliver` per credit.
//!
//! Straight, not through the router: the relay is private (`CellRelay` is never served to
//! clients, and a cell accepts `Deliver` only from a cell certificate). The payee's cell and
//! its endpoints come from the routing table in the store (`sys/routing`), read in the same
//! snapshot as the outbox; a stale table costs one "moved" answer and a retry next round.
//!
//! Exactly once, end to end: the debit and the outbox message commit together; the payee's
//! cell applies a credit and its dedup record together; the payer settles (deletes the
//! message, completes or compensates the payment) in a fenced transaction. Every step can
//! be repeated after a crash of either side: a redelivery gets the first answer, a second
//! settle finds no message. The relay runs on whichever cell owns the payer's shard now, so
//! a failover hands the outbox to the new owner with the shard.

use ldc_core::clock::now_ms;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use ldc_core::proto::{self, DeliverOutcome, cell_relay_client::CellRelayClient};
use ldc_core::routing::RoutingTable;
use ldc_store::{Store, prefix_end};
use prost::Message;
use tokio::sync::Notify;
use tonic::transport::{Channel, Endpoint};

use crate::error::PaymentError;
use crate::keys;
use crate::ledger::Command;
use crate::metrics::CellMetrics;
use crate::model::{OutboxRec, dec};
use crate::service::DELIVER_BATCH_MAX;
use crate::writer::Writer;

/// Most messages taken per shard per round.
const ROUND_PER_SHARD_MAX: usize = 256;
/// Batch deliveries in flight at once.
const BATCHES_IN_FLIGHT_MAX: usize = 16;
/// Timeout of one delivery call.
const DELIVER_TIMEOUT: Duration = Duration::from_secs(3);
/// Poll period when nothing wakes the relay.
const IDLE_POLL: Duration = Duration::from_millis(200);

pub struct RelayConfig {
    pub cell: String,
    /// Who this relay is (`colour/pid`): both colours of a cell run a relay, and only the
    /// one holding the cell's relay lease delivers (see [`lead`]).
    pub holder: String,
    pub shard_count: u32,
    /// How to reach other cells.
    pub transport: crate::Transport,
}

/// Most relay connections kept (one per endpoint of another cell).
const CHANNELS_MAX: usize = 1024;
/// Connect timeout of a relay connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// One lazily connected channel per endpoint, made on first use.
struct Channels {
    transport: crate::Transport,
    by_addr: HashMap<String, CellRelayClient<Channel>>,
}

impl Channels {
    fn get(&mut self, addr: &str) -> Result<CellRelayClient<Channel>, String> {
        if let Some(c) = self.by_addr.get(addr) {
            return Ok(c.clone());
        }
        let channel = match &self.transport {
            crate::Transport::MutualTls { client, .. } => ldc_security::net::channel(
                addr,
                client.clone(),
                ldc_security::Identity::is_cell,
                CONNECT_TIMEOUT,
                DELIVER_TIMEOUT,
            ),
            crate::Transport::Insecure => {
                Endpoint::from_shared(format!("http://{addr}")).map(|e| {
                    e.connect_timeout(CONNECT_TIMEOUT)
                        .timeout(DELIVER_TIMEOUT)
                        .connect_lazy()
                })
            }
        }
        .map_err(|e| format!("bad endpoint {addr:?}: {e}"))?;
        if self.by_addr.len() >= CHANNELS_MAX {
            self.by_addr.clear();
        }
        let c = CellRelayClient::new(channel);
        self.by_addr.insert(addr.to_string(), c.clone());
        Ok(c)
    }
}

/// One pending message, as read from the store.
struct Pending {
    shard: u32,
    credit: proto::Credit,
    created_ms: u64,
}

/// How long a relay lease lasts without renewal; the holder renews at half of it.
const LEASE_MS: u64 = 3_000;

/// The relay lease of a cell (`sys/relay/{cell}`).
#[derive(serde::Serialize, serde::Deserialize)]
struct Lease {
    holder: String,
    expires_ms: u64,
}

/// Whether `holder` may deliver the cell's outbox now: takes the lease if it is free or
/// expired, renews it when half gone. Both colours of a cell run a relay; without this
/// both would deliver every message (harmless, the payee deduplicates, but twice the
/// work). It is an optimisation, not a safety mechanism: exactly-once comes from the
/// dedup records, so two holders at once after a clock jump cost only duplicates.
pub fn lead(
    store: &dyn Store,
    cell: &str,
    holder: &str,
    now_ms: u64,
) -> Result<bool, PaymentError> {
    let key = ldc_control::keys::relay_lease(cell);
    // Some(answer) when nothing needs writing; None to take or renew the lease.
    let decide = |raw: Option<Vec<u8>>| -> Option<bool> {
        match raw.and_then(|b| serde_json::from_slice::<Lease>(&b).ok()) {
            Some(l) if l.holder == holder => {
                (l.expires_ms >= now_ms + LEASE_MS / 2).then_some(true)
            }
            Some(l) if l.expires_ms > now_ms => Some(false),
            _ => None,
        }
    };
    // Usually a read settles it: a write transaction would take the store's write lock,
    // which the cell's writer needs for every batch.
    let mut r = store.begin_read()?;
    let seen = r.get(&key)?;
    r.rollback()?;
    if let Some(answer) = decide(seen) {
        return Ok(answer);
    }
    let mut t = store.begin()?;
    if let Some(answer) = decide(t.get_for_update(&key)?) {
        t.rollback()?;
        return Ok(answer);
    }
    let lease = Lease {
        holder: holder.to_string(),
        expires_ms: now_ms + LEASE_MS,
    };
    t.put(&key, &serde_json::to_vec(&lease).expect("lease encodes"))?;
    match t.commit() {
        Ok(()) => Ok(true),
        Err(e) if e.is_retryable() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// What one relay round works from.
struct Round {
    owned: u32,
    pending: Vec<Pending>,
    table: Option<RoutingTable>,
}

/// Reads the outbox of every shard this cell owns and the routing table (one consistent
/// snapshot).
fn scan_outbox(store: &dyn Store, cell: &str) -> Result<Round, PaymentError> {
    let mut t = store.begin_read()?;
    let table = ldc_control::load_routing(&mut *t)
        .map_err(|e| PaymentError::Corrupt(format!("routing table: {e}")))?;
    let shards = ldc_control::owned_shards(&mut *t, cell)
        .map_err(|e| PaymentError::Corrupt(e.to_string()))?;
    let owned = shards.len() as u32;
    let mut out = Vec::new();
    for shard in shards {
        let p = keys::outbox_prefix(shard);
        for (_, raw) in t.scan(p.as_bytes(), &prefix_end(p.as_bytes()), ROUND_PER_SHARD_MAX)? {
            let rec: OutboxRec = dec("outbox", &raw)?;
            let credit = proto::Credit::decode(&rec.credit[..])
                .map_err(|e| PaymentError::Corrupt(format!("outbox credit: {e}")))?;
            out.push(Pending {
                shard,
                credit,
                created_ms: rec.created_ms,
            });
        }
    }
    t.rollback()?;
    // The writer commits batches before they are synced: never send a credit whose debit a
    // crash could still take back. One sync covers every commit this snapshot can see.
    store.sync()?;
    Ok(Round {
        owned,
        pending: out,
        table,
    })
}

/// Runs until `shutdown` resolves.
pub async fn run(
    store: Arc<dyn Store>,
    writer: Writer,
    cfg: RelayConfig,
    wake: Arc<Notify>,
    metrics: CellMetrics,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut channels = Channels {
        transport: cfg.transport.clone(),
        by_addr: HashMap::new(),
    };
    tokio::pin!(shutdown);
    let mut backoff = IDLE_POLL;
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(backoff) => {}
        }
        let (s, cell, holder) = (store.clone(), cfg.cell.clone(), cfg.holder.clone());
        let leading =
            tokio::task::spawn_blocking(move || lead(&*s, &cell, &holder, now_ms())).await;
        match leading {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                // The other colour delivers; look again later (it may go away).
                metrics.outbox_pending.set(0);
                metrics.outbox_lag_seconds.set(0.0);
                backoff = IDLE_POLL;
                continue;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "relay lease failed");
                backoff = IDLE_POLL;
                continue;
            }
            Err(_) => continue,
        }
        let s = store.clone();
        let cell = cfg.cell.clone();
        let scanned = tokio::task::spawn_blocking(move || scan_outbox(&*s, &cell)).await;
        let Round {
            owned,
            pending,
            table,
        } = match scanned {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "outbox scan failed");
                continue;
            }
            Err(_) => continue,
        };
        metrics.owned_shards.set(i64::from(owned));
        metrics.outbox_pending.set(pending.len() as i64);
        let now = now_ms();
        let oldest = pending.iter().map(|p| p.created_ms).min();
        metrics
            .outbox_lag_seconds
            .set(oldest.map_or(0.0, |o| now.saturating_sub(o) as f64 / 1000.0));
        if pending.is_empty() {
            backoff = IDLE_POLL;
            continue;
        }
        let Some(table) = table else {
            tracing::warn!("outbox has credits but no routing table is published yet; waiting");
            backoff = IDLE_POLL;
            continue;
        };
        let failures = deliver_all(&mut channels, &table, &writer, pending, &metrics).await;
        // Nothing failed: look again at once (more may be queued). Failures back off.
        backoff = if failures == 0 {
            Duration::ZERO
        } else {
            (backoff * 2).clamp(Duration::from_millis(50), Duration::from_secs(2))
        };
    }
}

async fn deliver_all(
    channels: &mut Channels,
    table: &RoutingTable,
    writer: &Writer,
    pending: Vec<Pending>,
    metrics: &CellMetrics,
) -> usize {
    let mut failures = 0;
    // One batch per endpoint of a payee cell (and per DELIVER_BATCH_MAX credits).
    let mut by_addr: BTreeMap<String, Vec<Pending>> = BTreeMap::new();
    for p in pending {
        match payee_endpoint(table, &p.credit.to_user_id, p.created_ms) {
            Ok(addr) => by_addr.entry(addr.to_string()).or_default().push(p),
            Err(why) => {
                metrics.relay_deliveries.with_label_values(&["error"]).inc();
                tracing::debug!(
                    message_id = p.credit.message_id,
                    why,
                    "cannot route the credit; will retry"
                );
                failures += 1;
            }
        }
    }
    let sem = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT_MAX));
    let mut tasks = tokio::task::JoinSet::new();
    for (addr, mut group) in by_addr {
        let client = match channels.get(&addr) {
            Ok(c) => c,
            Err(why) => {
                metrics
                    .relay_deliveries
                    .with_label_values(&["error"])
                    .inc_by(group.len() as u64);
                tracing::debug!(addr, why, "cannot reach the payee's cell; will retry");
                failures += group.len();
                continue;
            }
        };
        while !group.is_empty() {
            let chunk: Vec<Pending> = group.drain(..group.len().min(DELIVER_BATCH_MAX)).collect();
            let permit = sem.clone().acquire_owned().await.expect("semaphore open");
            let (mut client, writer, metrics) = (client.clone(), writer.clone(), metrics.clone());
            tasks.spawn(async move {
                let _permit = permit;
                deliver_batch(&mut client, &writer, chunk, &metrics).await
            });
        }
    }
    while let Some(r) = tasks.join_next().await {
        failures += r.unwrap_or(1);
    }
    failures
}

/// The endpoint of the payee's cell (any colour serves the cell's shards; `spread` picks
/// one of several, so retries of a message move over them).
fn payee_endpoint<'t>(table: &'t RoutingTable, user: &str, spread: u64) -> Result<&'t str, String> {
    let r = table
        .route_user(user, None)
        .map_err(|e| format!("routing table epoch {}: {e}", table.epoch))?;
    let cell = &table.cells[r.cell];
    let count = cell.blue.len() + cell.green.len();
    if count == 0 {
        return Err(format!("cell {} lists no endpoints", r.cell));
    }
    let i = (spread.wrapping_add(now_ms() / 1000) % count as u64) as usize;
    Ok(cell
        .blue
        .iter()
        .chain(&cell.green)
        .nth(i)
        .expect("i < count"))
}

/// Delivers `chunk` in one call and settles what was answered; returns how many are not
/// settled (they stay in the outbox for a later round).
async fn deliver_batch(
    client: &mut CellRelayClient<Channel>,
    writer: &Writer,
    chunk: Vec<Pending>,
    metrics: &CellMetrics,
) -> usize {
    let credits = chunk.iter().map(|p| p.credit.clone()).collect();
    let mut req = tonic::Request::new(proto::CreditBatch { credits });
    req.set_timeout(DELIVER_TIMEOUT);
    let results = match client.deliver_batch(req).await {
        Ok(r) => r.into_inner().results,
        Err(status) if status.code() == tonic::Code::Unimplemented => {
            // A payee cell of an earlier release (mid-upgrade): one call per credit.
            let mut failures = 0;
            for p in chunk {
                failures += usize::from(!deliver_one(client, writer, p, metrics).await);
            }
            return failures;
        }
        Err(status) => {
            metrics
                .relay_deliveries
                .with_label_values(&["error"])
                .inc_by(chunk.len() as u64);
            tracing::debug!(credits = chunk.len(), code = ?status.code(), message = status.message(), "batch delivery failed; will retry");
            return chunk.len();
        }
    };
    if results.len() != chunk.len() {
        tracing::error!(
            sent = chunk.len(),
            answered = results.len(),
            "a batch delivery answered another number of credits than sent; not settling"
        );
        return chunk.len();
    }
    let mut failures = 0;
    let mut settles = tokio::task::JoinSet::new();
    for (p, r) in chunk.into_iter().zip(results) {
        let resp = match (r.code, r.response) {
            (0, Some(resp)) => resp,
            (code, _) => {
                metrics.relay_deliveries.with_label_values(&["error"]).inc();
                tracing::debug!(
                    message_id = p.credit.message_id,
                    code,
                    message = r.message,
                    "delivery failed; will retry"
                );
                failures += 1;
                continue;
            }
        };
        let Some(cmd) = settlement(p, resp, metrics) else {
            failures += 1;
            continue;
        };
        let writer = writer.clone();
        // At once, so the writer settles the whole batch in one store transaction.
        settles.spawn(async move { writer.submit(cmd).await.is_ok() });
    }
    while let Some(r) = settles.join_next().await {
        failures += usize::from(!matches!(r, Ok(true)));
    }
    failures
}

/// The command that settles `p` on the payer side after the payee's answer, if the answer
/// is one to settle on.
fn settlement(p: Pending, resp: proto::DeliverResponse, metrics: &CellMetrics) -> Option<Command> {
    let applied = match DeliverOutcome::try_from(resp.outcome) {
        Ok(DeliverOutcome::Applied) => true,
        Ok(DeliverOutcome::Rejected) => false,
        _ => {
            // Never compensate on an answer we do not understand: that could pay twice.
            tracing::error!(
                message_id = p.credit.message_id,
                outcome = resp.outcome,
                "unknown delivery outcome; not settling"
            );
            return None;
        }
    };
    metrics
        .relay_deliveries
        .with_label_values(&[if applied { "applied" } else { "rejected" }])
        .inc();
    Some(Command::Settle {
        shard: p.shard,
        message_id: p.credit.message_id,
        applied,
        reason: resp.reason,
    })
}

/// Delivers one message with `Deliver` and settles it. Returns whether it is settled.
async fn deliver_one(
    client: &mut CellRelayClient<Channel>,
    writer: &Writer,
    p: Pending,
    metrics: &CellMetrics,
) -> bool {
    let mut req = tonic::Request::new(p.credit.clone());
    req.set_timeout(DELIVER_TIMEOUT);
    let resp = match client.deliver(req).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            metrics.relay_deliveries.with_label_values(&["error"]).inc();
            tracing::debug!(message_id = p.credit.message_id, code = ?status.code(), message = status.message(), "delivery failed; will retry");
            return false;
        }
    };
    let Some(cmd) = settlement(p, resp, metrics) else {
        return false;
    };
    match writer.submit(cmd).await {
        Ok(_) => true,
        Err(e) => {
            tracing::debug!(error = %e, "settle failed; will retry");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ldc_store::sqlite::SqliteStore;

    #[test]
    fn one_relay_per_cell_leads_until_its_lease_expires() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        let t0 = 1_000_000;
        assert!(lead(&store, "r1-a", "blue/1", t0).unwrap());
        // The other colour waits while the lease runs; renewals keep it.
        assert!(!lead(&store, "r1-a", "green/2", t0 + 100).unwrap());
        assert!(lead(&store, "r1-a", "blue/1", t0 + LEASE_MS / 2 + 1).unwrap());
        assert!(!lead(&store, "r1-a", "green/2", t0 + LEASE_MS + 1).unwrap());
        // Another cell's lease is its own.
        assert!(lead(&store, "r2-a", "green/2", t0 + 200).unwrap());
        // The holder went away: once the lease has run out the other colour takes over.
        let later = t0 + LEASE_MS / 2 + 1 + LEASE_MS + 1;
        assert!(lead(&store, "r1-a", "green/2", later).unwrap());
        assert!(!lead(&store, "r1-a", "blue/1", later + 1).unwrap());
    }
}
