//! Group commit: one writer thread per cell process turns many concurrent commands into
//! one store transaction and one sync.
//!
//! Durability costs one fsync per commit (~150 µs here), which caps a one-command-per-commit
//! design at a few thousand payments per second. The writer drains whatever is queued (up to
//! `batch_max`), fences each shard the batch touches once, runs each command in its own
//! [`Overlay`] (so a refused payment leaves nothing behind), commits once, and only then
//! answers every caller. No caller hears "ok" before its payment is on disk.
//!
//! The fsync is pipelined: the writer commits a batch without waiting for the sync
//! ([`Store::begin_unsynced`]) and hands its replies to the syncer threads: a sync starts
//! as soon as a committed batch is not covered by a running one (up to
//! `SYNCS_IN_FLIGHT_MAX` overlap), and finished syncs are applied in the order they
//! started, each answering the callers of every batch committed before it began (see
//! `SyncQueue`). While batch N syncs, the writer already executes batch N+1 on top of N's
//! committed state.
//! This is safe because durability follows commit order: the embedded store appends every
//! commit to one WAL, recovery replays a prefix of it (frames are checksummed in a chain),
//! and one fsync covers everything written before it. So N+1 can only ever be durable
//! together with N, no reply leaves before a sync that started after its batch committed,
//! and if a sync fails the syncers answer every pending caller with an undetermined outcome
//! and refuses all later work (after a failed fsync the kernel may have dropped the pages;
//! only a restart, which recovers from what is really on disk, can tell). Reads served by
//! this process wait for [`Writer::wait_durable`] so they never show a payment that could
//! still vanish.
//!
//! A store error that may leave the transaction unusable (or a commit conflict) aborts the
//! whole batch; it is retried a bounded number of times, and callers then get a retryable
//! error. Because every mutating command is idempotent, a retry by the client is safe.
//!
//! Fail-stop: a failed sync, a disk error on commit ([`StoreError::Io`]) or a panic of the
//! writer or a syncer raises the [`Alarm`]: every pending caller is answered "outcome
//! unknown" and the process is expected to leave (`serve` turns NOT_SERVING and returns an
//! error), so its supervisor restarts it and recovery runs from what is on disk. A process
//! is never left half-alive. A full disk is not a fault: the batch is refused with nothing
//! written and payments resume when space returns.

use ldc_core::clock::now_ms;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ldc_store::overlay::Overlay;
use ldc_store::{Store, StoreError};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::error::PaymentError;
use crate::ledger::{self, Command, Ctx, Outcome};
use crate::metrics::CellMetrics;

/// Default bound on queued commands (a limit on everything: beyond it callers get
/// RESOURCE_EXHAUSTED instead of unbounded latency).
pub const QUEUE_MAX: usize = 16_384;
/// Default most commands per store transaction.
pub const BATCH_MAX: usize = 1_024;
/// Attempts per batch when the store says retry.
const BATCH_ATTEMPTS: u32 = 4;

/// What a caller gets: the outcome and the shard epoch it was served at.
type Answer = Result<(Outcome, u64), PaymentError>;
type Reply = oneshot::Sender<Answer>;

struct Job {
    /// `None`: a heartbeat, which writes nothing but commits and syncs like any batch.
    cmd: Option<Command>,
    reply: Reply,
}

/// Batches committed but possibly not yet synced, between the writer and the syncers (a
/// limit on everything: a slow disk slows the writer down instead of queueing forever).
const UNSYNCED_BATCHES_MAX: usize = 8;
/// Store syncs running at once (one thread each); see [`SyncQueue`].
const SYNCS_IN_FLIGHT_MAX: usize = 3;
/// The durable watermark after a failed sync: nothing is durable any more, as far as
/// anyone in this process may assume.
const POISONED: u64 = u64::MAX;

/// Handle for submitting commands to the writer thread.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
    /// Sequence number of the last batch the writer started to commit (set before the
    /// commit, so every commit a reader can see has a number at most this).
    committing: Arc<AtomicU64>,
    /// Sequence number of the last batch known durable ([`POISONED`] after a failed sync).
    durable: watch::Receiver<u64>,
    alarm: Alarm,
    busy: Busy,
}

/// When the writer's current batch began (from execution through its hand-off to the
/// syncers), for the progress-based health (`health`): a writer stuck in a commit, a
/// held store lock or a full sync queue shows as one batch growing old.
#[derive(Clone)]
struct Busy {
    origin: Instant,
    /// Microseconds since `origin` when the current batch began, plus one; 0: idle.
    since_us: Arc<AtomicU64>,
}

impl Busy {
    fn begin(&self) {
        let us = self.origin.elapsed().as_micros() as u64 + 1;
        self.since_us.store(us, Ordering::Relaxed);
    }

    fn end(&self) {
        self.since_us.store(0, Ordering::Relaxed);
    }

    fn age(&self) -> Option<Duration> {
        match self.since_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(
                self.origin
                    .elapsed()
                    .saturating_sub(Duration::from_micros(us - 1)),
            ),
        }
    }
}

/// Why this process must stop writing and leave (fail-stop), raised once by whichever
/// thread sees the fault first.
#[derive(Clone)]
pub struct Alarm(Arc<watch::Sender<Option<String>>>);

impl Alarm {
    fn new() -> Alarm {
        Alarm(Arc::new(watch::channel(None).0))
    }

    /// Raises the alarm (the first reason is kept).
    pub fn raise(&self, why: String) {
        self.0.send_if_modified(|v| {
            if v.is_some() {
                return false;
            }
            tracing::error!(reason = %why, "fail-stop: this cell process accepts no more writes and leaves");
            *v = Some(why);
            true
        });
    }

    pub fn raised(&self) -> bool {
        self.0.borrow().is_some()
    }

    /// Resolves with the reason once the alarm is raised.
    pub async fn wait(&self) -> String {
        let mut rx = self.0.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or_default(),
            Err(_) => String::new(), // unreachable while `self` holds the sender
        }
    }
}

/// Raises the alarm if the thread holding it unwinds from a panic.
struct PanicAlarm(Alarm, &'static str);

impl Drop for PanicAlarm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.raise(format!("the {} thread panicked", self.1));
        }
    }
}

pub struct WriterConfig {
    pub cell: String,
    pub shard_count: u32,
    pub queue_max: usize,
    pub batch_max: usize,
}

impl Writer {
    /// Starts the writer thread. It exits when every `Writer` handle is dropped.
    /// `outbox` is notified after a commit that queued outbox messages.
    pub fn start(
        store: Arc<dyn Store>,
        cfg: WriterConfig,
        metrics: CellMetrics,
        outbox: Arc<Notify>,
    ) -> (Writer, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(cfg.queue_max);
        let committing = Arc::new(AtomicU64::new(0));
        let (durable_tx, durable) = watch::channel(0);
        let queue = Arc::new(SyncQueue::new());
        let durable_tx = Arc::new(durable_tx);
        let alarm = Alarm::new();
        let syncers: Vec<_> = (0..SYNCS_IN_FLIGHT_MAX)
            .map(|i| {
                let (store, metrics, queue, durable_tx, outbox, alarm) = (
                    store.clone(),
                    metrics.clone(),
                    queue.clone(),
                    durable_tx.clone(),
                    outbox.clone(),
                    alarm.clone(),
                );
                std::thread::Builder::new()
                    .name(format!("syncer-{}-{i}", cfg.cell))
                    .spawn(move || {
                        let _panic = PanicAlarm(alarm.clone(), "syncer");
                        run_syncer(&queue, &*store, &durable_tx, &metrics, &outbox, &alarm)
                    })
                    .expect("spawn syncer thread")
            })
            .collect();
        let seq = committing.clone();
        let writer_alarm = alarm.clone();
        let busy = Busy {
            origin: Instant::now(),
            since_us: Arc::default(),
        };
        let writer_busy = busy.clone();
        let handle = std::thread::Builder::new()
            .name(format!("writer-{}", cfg.cell))
            .spawn(move || {
                let panic = PanicAlarm(writer_alarm.clone(), "writer");
                let shared = WriterShared {
                    committing: &seq,
                    queue: &queue,
                    alarm: &writer_alarm,
                    busy: &writer_busy,
                };
                run(rx, store, cfg, metrics, shared);
                if writer_alarm.raised() {
                    queue.poison(&durable_tx);
                }
                drop(panic);
                // The writer stopped: the syncers answer what is left and stop.
                queue.close();
                for s in syncers {
                    let _ = s.join();
                }
            })
            .expect("spawn writer thread");
        (
            Writer {
                tx,
                committing,
                durable,
                alarm,
                busy,
            },
            handle,
        )
    }

    /// Waits until every batch this process had started to commit when called is durable.
    /// A read calls it after reading, before answering, so it never shows a write that a
    /// crash could still take back.
    pub async fn wait_durable(&self) -> Result<(), PaymentError> {
        let target = self.committing.load(Ordering::SeqCst);
        let mut rx = self.durable.clone();
        match rx.wait_for(|d| *d >= target).await {
            Ok(d) if *d == POISONED => Err(PaymentError::Store(sync_failed())),
            Ok(_) => Ok(()),
            Err(_) => Err(PaymentError::ShuttingDown),
        }
    }

    /// How long the batch the writer is working on has taken so far (`None`: idle).
    pub fn batch_age(&self) -> Option<Duration> {
        self.busy.age()
    }

    /// The fail-stop alarm of this writer (see the module docs).
    pub fn alarm(&self) -> &Alarm {
        &self.alarm
    }

    /// Submits a validated command; resolves once it is durably committed (or refused).
    /// Returns the outcome and the shard epoch it was served at.
    pub async fn submit(&self, cmd: Command) -> Answer {
        self.send(Some(cmd)).await
    }

    /// Sends a heartbeat through the writer: it resolves once a batch holding it has
    /// committed and synced, so its round trip is the writer's progress (`health`).
    pub async fn heartbeat(&self) -> Result<(), PaymentError> {
        self.send(None).await.map(|_| ())
    }

    async fn send(&self, cmd: Option<Command>) -> Answer {
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(Job { cmd, reply }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => return Err(PaymentError::Overloaded),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(PaymentError::ShuttingDown),
        }
        rx.await.unwrap_or(Err(PaymentError::ShuttingDown))
    }
}

fn sync_failed() -> StoreError {
    StoreError::Undetermined(
        "the store failed to sync; this cell process accepts no more writes and must be \
         restarted (retry with the same idempotency key)"
            .into(),
    )
}

/// A committed (possibly unsynced) batch on its way to the syncer.
struct Committed {
    seq: u64,
    replies: Vec<(Reply, Answer)>,
    queued_outbox: bool,
}

/// What the writer thread shares with [`Writer`] handles and the syncers.
struct WriterShared<'a> {
    committing: &'a AtomicU64,
    queue: &'a SyncQueue,
    alarm: &'a Alarm,
    busy: &'a Busy,
}

fn run(
    mut rx: mpsc::Receiver<Job>,
    store: Arc<dyn Store>,
    cfg: WriterConfig,
    metrics: CellMetrics,
    shared: WriterShared<'_>,
) {
    let WriterShared {
        committing,
        queue,
        alarm,
        busy,
    } = shared;
    let mut batch: Vec<Job> = Vec::with_capacity(cfg.batch_max);
    let mut seq = 0u64;
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < cfg.batch_max {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        if alarm.raised() {
            // Fail-stop: commit nothing more; these callers' payments were not applied.
            for job in batch.drain(..) {
                let _ = job.reply.send(Err(PaymentError::ShuttingDown));
            }
            break;
        }
        busy.begin();
        metrics.batch_size.observe(batch.len() as f64);
        let started = Instant::now();
        seq += 1;
        // Before the commit: a reader that can see this batch must wait for its sync.
        committing.store(seq, Ordering::SeqCst);
        let results = process(&*store, &cfg, &mut batch, &metrics);
        if let Some(Err(PaymentError::Store(e @ StoreError::Io(_)))) = results.first() {
            alarm.raise(format!("a commit failed at the disk: {e}"));
        }
        metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        let mut queued_outbox = false;
        let replies = batch
            .drain(..)
            .zip(results)
            .map(|(job, result)| {
                if result.is_ok()
                    && matches!(
                        job.cmd,
                        Some(Command::Transfer { .. } | Command::Refund { .. })
                    )
                {
                    queued_outbox = true;
                }
                (job.reply, result)
            })
            .collect();
        // Every batch goes through the syncers, even a failed one, so the durable watermark
        // advances in order.
        queue.push(Committed {
            seq,
            replies,
            queued_outbox,
        });
        busy.end();
        if alarm.raised() {
            break; // fail-stop: `Writer::start`'s thread refuses what is pending
        }
    }
    tracing::info!(cell = %cfg.cell, "writer stopped");
}

/// Committed batches waiting for a sync, shared by the writer and the syncer threads.
///
/// Syncs overlap: when a batch commits while a sync is running, an idle syncer starts the
/// next sync at once instead of waiting for the running one to end (this disk completes
/// concurrent flushes of one file nearly in parallel, so a batch waits for one sync instead
/// of one and a half). Results are applied strictly in the order the syncs started: sync
/// `t` answers the batches it covers only after every sync started before it succeeded. A
/// sync opens its own descriptor of the WAL, so a write-back error is reported to every
/// sync that was already running when the error was recorded; the earliest such sync
/// fails, and in-order application then refuses every later batch even if a later sync
/// (which could have missed the error) returned success first.
struct SyncQueue {
    state: Mutex<SyncState>,
    /// Wakes a syncer: a batch committed, or the writer stopped.
    work: Condvar,
    /// Wakes the writer: batches were answered (room under [`UNSYNCED_BATCHES_MAX`]).
    room: Condvar,
}

#[derive(Default)]
struct SyncState {
    /// Committed, unanswered batches in commit order.
    pending: VecDeque<Committed>,
    /// Sequence number of the last batch committed (pushed by the writer).
    committed: u64,
    /// Sequence number of the last batch some started sync covers.
    covered: u64,
    /// Syncs are numbered in the order they start...
    next_ticket: u64,
    /// ...and their results applied in that order.
    next_to_apply: u64,
    /// Finished syncs whose results wait for an earlier sync: ticket -> (covered, result).
    finished: BTreeMap<u64, (u64, Result<(), StoreError>)>,
    poisoned: bool,
    closed: bool,
}

fn lock(m: &Mutex<SyncState>) -> MutexGuard<'_, SyncState> {
    // A panicking syncer must not hide pending callers; the state stays consistent because
    // every update is made under the lock in one step.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Answers every pending batch with "sync failed".
fn refuse_all(pending: impl IntoIterator<Item = Committed>) {
    for c in pending {
        // Even a refusal may rest on state that is now in doubt (a balance, an idempotency
        // record of an earlier unsynced batch): answer none.
        for (reply, _) in c.replies {
            let _ = reply.send(Err(PaymentError::Store(sync_failed())));
        }
    }
}

impl SyncQueue {
    fn new() -> SyncQueue {
        SyncQueue {
            state: Mutex::new(SyncState::default()),
            work: Condvar::new(),
            room: Condvar::new(),
        }
    }

    /// Hands a committed batch to the syncers; blocks while too many wait (a slow disk
    /// slows the writer down instead of queueing forever).
    fn push(&self, c: Committed) {
        let mut s = lock(&self.state);
        while s.pending.len() >= UNSYNCED_BATCHES_MAX && !s.poisoned {
            s = self.room.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        if s.poisoned {
            drop(s);
            refuse_all([c]);
            return;
        }
        s.committed = c.seq;
        s.pending.push_back(c);
        drop(s);
        self.work.notify_one();
    }

    /// Fail-stop: refuses every pending batch and all later ones, and tells readers that
    /// nothing is durable any more.
    fn poison(&self, durable: &watch::Sender<u64>) {
        let refused: Vec<_> = {
            let mut s = lock(&self.state);
            s.poisoned = true;
            s.pending.drain(..).collect()
        };
        durable.send_replace(POISONED);
        self.room.notify_all();
        refuse_all(refused);
    }

    /// The writer stopped: syncers finish what is committed and exit.
    fn close(&self) {
        lock(&self.state).closed = true;
        self.work.notify_all();
    }
}

/// One syncer thread: starts a sync whenever a committed batch is not covered by a running
/// one, then applies finished syncs in start order and answers the batches they cover.
fn run_syncer(
    q: &SyncQueue,
    store: &dyn Store,
    durable: &watch::Sender<u64>,
    metrics: &CellMetrics,
    outbox: &Notify,
    alarm: &Alarm,
) {
    loop {
        let (ticket, cover) = {
            let mut s = lock(&q.state);
            while s.committed == s.covered {
                if s.closed {
                    return;
                }
                s = q.work.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            let ticket = s.next_ticket;
            s.next_ticket += 1;
            s.covered = s.committed;
            (ticket, s.covered)
        };
        // Every batch up to `cover` had committed when this sync started. A failed batch
        // committed nothing, but it may follow committed ones; it is covered all the same.
        let result = if lock(&q.state).poisoned {
            Err(sync_failed())
        } else {
            let started = Instant::now();
            let r = store.sync();
            metrics
                .sync_seconds
                .observe(started.elapsed().as_secs_f64());
            r
        };
        let mut answered = Vec::new();
        let mut refused = Vec::new();
        {
            let mut s = lock(&q.state);
            s.finished.insert(ticket, (cover, result));
            loop {
                let next = s.next_to_apply;
                let Some((cover, result)) = s.finished.remove(&next) else {
                    break;
                };
                s.next_to_apply += 1;
                match result {
                    Ok(()) if !s.poisoned => {
                        while s.pending.front().is_some_and(|c| c.seq <= cover) {
                            answered.extend(s.pending.pop_front());
                        }
                        durable.send_replace(cover);
                    }
                    Ok(()) => {}
                    Err(e) => {
                        if !s.poisoned {
                            alarm.raise(format!("a store sync failed: {e}"));
                        }
                        s.poisoned = true;
                        durable.send_replace(POISONED);
                    }
                }
            }
            if s.poisoned {
                refused.extend(s.pending.drain(..));
            }
        }
        q.room.notify_all();
        refuse_all(refused);
        let mut queued_outbox = false;
        for c in answered {
            queued_outbox |= c.queued_outbox;
            for (reply, answer) in c.replies {
                let _ = reply.send(answer); // the caller may have gone away
            }
        }
        if queued_outbox {
            outbox.notify_one();
        }
    }
}

/// Why a batch attempt was abandoned.
enum Abort {
    Store(StoreError),
    Fatal(PaymentError),
}

fn process(
    store: &dyn Store,
    cfg: &WriterConfig,
    batch: &mut [Job],
    metrics: &CellMetrics,
) -> Vec<Answer> {
    let mut last = None;
    for attempt in 0..BATCH_ATTEMPTS {
        if attempt > 0 {
            metrics.batch_retries.inc();
            std::thread::sleep(Duration::from_millis(2u64 << attempt));
        }
        match attempt_batch(store, cfg, batch) {
            Ok(results) => return results,
            Err(Abort::Store(e)) if e.is_retryable() => last = Some(e),
            Err(Abort::Store(e)) => {
                tracing::error!(error = %e, "batch failed");
                return batch
                    .iter()
                    .map(|_| Err(PaymentError::Store(e.clone())))
                    .collect();
            }
            Err(Abort::Fatal(e)) => {
                tracing::error!(error = %e, "batch failed");
                let msg = e.to_string();
                return batch
                    .iter()
                    .map(|_| Err(PaymentError::Corrupt(msg.clone())))
                    .collect();
            }
        }
    }
    let e = last.expect("at least one attempt");
    batch
        .iter()
        .map(|_| Err(PaymentError::Store(e.clone())))
        .collect()
}

fn attempt_batch(
    store: &dyn Store,
    cfg: &WriterConfig,
    batch: &[Job],
) -> Result<Vec<Answer>, Abort> {
    // Unsynced: the syncer thread makes this commit durable before anyone hears of it.
    let mut txn = store.begin_unsynced().map_err(Abort::Store)?;
    // Writes of the whole batch are buffered and reach the store once per key at the end:
    // hot keys (a shard's clearing account, an active user's account) are written once per
    // batch instead of once per command.
    let mut batch_buf = Overlay::new(&mut *txn);
    let ctx = Ctx {
        cell: &cfg.cell,
        shard_count: cfg.shard_count,
        now_ms: now_ms(),
    };
    // Fence each shard once per batch, Ok(epoch) or the moved answer, in shard order: the
    // fence locks the shard's store file (when the store is split into files), and every
    // transaction that locks several takes them in that order, so none waits in a cycle.
    let shards: BTreeSet<u32> = batch
        .iter()
        .filter_map(|j| j.cmd.as_ref().map(|c| c.shard(cfg.shard_count)))
        .collect();
    let mut fences: HashMap<u32, Result<u64, (String, u64)>> = HashMap::new();
    for shard in shards {
        let f = match ledger::fence(&mut batch_buf, &cfg.cell, shard) {
            Ok(epoch) => Ok(epoch),
            Err(PaymentError::Moved { owner, epoch, .. }) => Err((owner, epoch)),
            Err(PaymentError::Store(e)) => return Err(Abort::Store(e)),
            Err(e) => return Err(Abort::Fatal(e)),
        };
        fences.insert(shard, f);
    }
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        let Some(cmd) = &job.cmd else {
            results.push(Ok((Outcome::Heartbeat, 0)));
            continue;
        };
        let shard = cmd.shard(cfg.shard_count);
        let fenced = fences.get(&shard).cloned().expect("fenced above");
        let epoch = match fenced {
            Ok(epoch) => epoch,
            Err((owner, epoch)) => {
                results.push(Err(PaymentError::Moved {
                    shard,
                    owner,
                    epoch,
                }));
                continue;
            }
        };
        let mut ov = Overlay::new(&mut batch_buf);
        match ledger::execute(&mut ov, &ctx, epoch, cmd) {
            Ok(outcome) => {
                ov.merge().map_err(Abort::Store)?;
                results.push(Ok((outcome, epoch)));
            }
            Err(PaymentError::Store(e)) => return Err(Abort::Store(e)),
            Err(e @ PaymentError::Corrupt(_)) => return Err(Abort::Fatal(e)),
            Err(e) => results.push(Err(e)),
        }
    }
    batch_buf.merge().map_err(Abort::Store)?;
    txn.commit().map_err(Abort::Store)?;
    Ok(results)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use ldc_store::Txn;
    use ldc_store::sqlite::SqliteStore;

    use super::*;

    /// The embedded store, with a sync that can be held back or made to fail.
    struct GatedStore {
        inner: SqliteStore,
        hold: AtomicBool,
        fail: AtomicBool,
        /// Holds only the first sync, then fails it if `fail_first` is set.
        hold_first: AtomicBool,
        fail_first: AtomicBool,
        syncs: AtomicU64,
    }

    impl Store for GatedStore {
        fn begin(&self) -> ldc_store::Result<Box<dyn Txn>> {
            self.inner.begin()
        }
        fn begin_read(&self) -> ldc_store::Result<Box<dyn Txn>> {
            self.inner.begin_read()
        }
        fn begin_unsynced(&self) -> ldc_store::Result<Box<dyn Txn>> {
            self.inner.begin_unsynced()
        }
        fn sync(&self) -> ldc_store::Result<()> {
            if self.syncs.fetch_add(1, Ordering::SeqCst) == 0 {
                while self.hold_first.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                if self.fail_first.load(Ordering::SeqCst) {
                    return Err(StoreError::Undetermined("injected fsync failure".into()));
                }
            }
            while self.hold.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            if self.fail.load(Ordering::SeqCst) {
                return Err(StoreError::Undetermined("injected fsync failure".into()));
            }
            self.inner.sync()
        }
        fn engine(&self) -> &'static str {
            "gated"
        }
    }

    fn setup() -> (tempfile::TempDir, Arc<GatedStore>, Writer) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(GatedStore {
            inner: SqliteStore::open(&dir.path().join("s.db")).unwrap(),
            hold: AtomicBool::new(false),
            fail: AtomicBool::new(false),
            hold_first: AtomicBool::new(false),
            fail_first: AtomicBool::new(false),
            syncs: AtomicU64::new(0),
        });
        let mut t = store.begin().unwrap();
        ldc_control::init(
            &mut *t,
            &ldc_core::planner::Topology::new(4, &[("c", "r")]),
            &["c"],
            0,
        )
        .unwrap();
        t.commit().unwrap();
        let reg = prometheus::Registry::new();
        let (w, _h) = Writer::start(
            store.clone(),
            WriterConfig {
                cell: "c".into(),
                shard_count: 4,
                queue_max: 64,
                batch_max: 16,
            },
            CellMetrics::new(&reg, "c", "blue"),
            Arc::new(Notify::new()),
        );
        (dir, store, w)
    }

    fn open(user: &str) -> Command {
        Command::OpenAccount {
            user: user.into(),
            currency: "EUR".into(),
            key: format!("open-{user}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_answer_before_the_sync() {
        let (_dir, store, w) = setup();
        store.hold.store(true, Ordering::SeqCst);
        let w2 = w.clone();
        let pending = tokio::spawn(async move { w2.submit(open("alice")).await });
        // The batch commits (unsynced) but its sync is held: no answer, and a read waits.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!pending.is_finished(), "answered before the sync");
        let w3 = w.clone();
        let read = tokio::spawn(async move { w3.wait_durable().await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!read.is_finished(), "a read passed an unsynced batch");
        store.hold.store(false, Ordering::SeqCst);
        let (outcome, epoch) = pending.await.unwrap().unwrap();
        assert!(matches!(outcome, Outcome::Account(_)));
        assert_eq!(epoch, 1);
        read.await.unwrap().unwrap();
        // Later batches see the earlier one's state: a replay returns the first answer.
        let (again, _) = w.submit(open("alice")).await.unwrap();
        assert_eq!(again, outcome);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_sync_acknowledges_nothing_and_stops_writes() {
        let (_dir, store, w) = setup();
        w.submit(open("alice")).await.unwrap();
        store.fail.store(true, Ordering::SeqCst);
        let e = w.submit(open("bob")).await.unwrap_err();
        assert!(
            matches!(e, PaymentError::Store(StoreError::Undetermined(_))),
            "{e:?}"
        );
        assert!(w.wait_durable().await.is_err());
        assert!(w.alarm().raised(), "a failed sync is a fail-stop");
        assert!(w.alarm().wait().await.contains("sync failed"));
        // Even with the disk back, this process confirms nothing more (and commits
        // nothing: the writer has stopped).
        store.fail.store(false, Ordering::SeqCst);
        let e = w.submit(open("carol")).await.unwrap_err();
        assert!(matches!(e, PaymentError::ShuttingDown), "{e:?}");
        let mut t = store.begin_read().unwrap();
        let carol = crate::keys::account(ldc_core::shard::shard_of("carol", 4), "carol");
        assert_eq!(
            t.get(&carol).unwrap(),
            None,
            "nothing committed after the alarm"
        );
    }

    /// Overlapping syncs: a later sync that returns first answers nobody while an earlier
    /// one runs, and when the earlier one fails, the batches the later one covered are
    /// refused too (the later sync may have missed the write-back error).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn syncs_apply_in_start_order() {
        let (_dir, store, w) = setup();
        store.syncs.store(0, Ordering::SeqCst);
        store.hold_first.store(true, Ordering::SeqCst);
        store.fail_first.store(true, Ordering::SeqCst);
        let w1 = w.clone();
        let first = tokio::spawn(async move { w1.submit(open("alice")).await });
        while store.syncs.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let w2 = w.clone();
        let second = tokio::spawn(async move { w2.submit(open("bob")).await });
        while store.syncs.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The second sync has started (and, not being held, returned) after bob's batch
        // committed; alice's sync is still running.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !second.is_finished(),
            "answered before an earlier sync ended"
        );
        assert!(!first.is_finished());
        store.hold_first.store(false, Ordering::SeqCst);
        for r in [first.await.unwrap(), second.await.unwrap()] {
            let e = r.unwrap_err();
            assert!(
                matches!(e, PaymentError::Store(StoreError::Undetermined(_))),
                "{e:?}"
            );
        }
        assert!(w.wait_durable().await.is_err());
    }
}
