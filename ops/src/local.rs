//! The local platform: the store `ldc up` runs on. A move or a traffic change is carried
//! out by the command itself, in one store transaction that re-checks what it was decided
//! on (the optimistic lock), writes the control records and publishes the routing table
//! (routers poll it), so it is in force when the command returns.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ldc_control::moves::{self, MoveRecord};
use ldc_control::{CellRuntime, ControlError, keys, traffic as records};
use ldc_core::clock::now_ms;
use ldc_core::planner::Plan;
use ldc_core::traffic::Change;
use ldc_security::table::TableSigner;
use ldc_store::{Store, StoreError, Txn};

use crate::platform::{HistoryData, MoveOutcome, MoveView, Platform, PlatformError};
use crate::verbs::traffic::DEFAULT_STEPS;
use crate::{CellFacts, ColourFacts, Snapshot};

/// How often [`Platform::changed`] looks at the store (it has no watch).
const POLL_PERIOD: Duration = Duration::from_millis(250);

/// The store `ldc up` uses, and the key that signs the routing tables it publishes
/// (`None` with `--insecure`).
pub struct LocalPlatform {
    store: Arc<dyn Store>,
    signer: Option<Arc<TableSigner>>,
}

impl LocalPlatform {
    pub fn new(store: Arc<dyn Store>, signer: Option<Arc<TableSigner>>) -> Self {
        LocalPlatform { store, signer }
    }

    /// Runs `f` in a transaction on a blocking thread: commits its `Ok`, rolls back its
    /// `Err`.
    async fn txn<T: Send + 'static>(
        &self,
        write: bool,
        f: impl FnOnce(&mut dyn Txn) -> Result<T, PlatformError> + Send + 'static,
    ) -> Result<T, PlatformError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut t = if write {
                store.begin()
            } else {
                store.begin_read()
            }
            .map_err(store_error)?;
            match f(&mut *t) {
                Ok(v) => {
                    t.commit().map_err(store_error)?;
                    Ok(v)
                }
                Err(e) => {
                    let _ = t.rollback();
                    Err(e)
                }
            }
        })
        .await
        .map_err(|e| PlatformError::Failed(format!("store task failed: {e}")))?
    }
}

fn store_error(e: StoreError) -> PlatformError {
    match e {
        StoreError::Conflict | StoreError::Busy(_) => PlatformError::Conflict,
        e => PlatformError::Failed(format!("store: {e}")),
    }
}

fn control_error(e: ControlError) -> PlatformError {
    match e {
        ControlError::StalePlan { .. } => PlatformError::Conflict,
        ControlError::Store(e) => store_error(e),
        ControlError::NotInitialised => PlatformError::Refused(e.to_string()),
        e => PlatformError::Failed(e.to_string()),
    }
}

/// Reads the snapshot in `kv`.
fn read_snapshot(kv: &mut dyn Txn) -> Result<Snapshot, ControlError> {
    let cfg = ldc_control::load_config(kv)?;
    let topology = ldc_control::load_topology(kv)?;
    let map = ldc_control::load_map(kv, cfg.shard_count)?;
    let runtimes = ldc_control::load_cell_runtimes(kv)?;
    let table = ldc_control::load_routing(kv)?.unwrap_or_default();
    let mut states = records::load_all(kv)?;
    let cells = topology
        .cells
        .iter()
        .map(|c| {
            let rt = runtimes.get(&c.id).cloned().unwrap_or_default();
            let st = states.remove(&c.id).unwrap_or_default();
            let weight = table
                .cells
                .get(&c.id)
                .map_or(st.green_weight_bp, |r| r.green_weight_bp);
            let facts = CellFacts {
                region: c.region.clone(),
                healthy: rt.healthy,
                deleting: false,
                green_weight_bp: weight,
                paused: st.paused,
                steps: DEFAULT_STEPS.to_vec(),
                blue: colour(&rt, 0),
                green: colour(&rt, 1),
                last_change: st.history.last().cloned(),
                busy: None,
            };
            (c.id.clone(), facts)
        })
        .collect();
    Ok(Snapshot {
        topology,
        map,
        routing_epoch: table.epoch,
        cells,
        pending: None,
    })
}

/// Colour `i` (0 blue, 1 green) of a cell as `ldc up` recorded it: its process's pid and
/// metrics address (0 and "" when not running).
fn colour(rt: &CellRuntime, i: usize) -> ColourFacts {
    let endpoints = if i == 0 { &rt.blue } else { &rt.green };
    ColourFacts {
        live: endpoints.len() as u32,
        endpoints: endpoints.clone(),
        detail: BTreeMap::from([
            (
                "pid".to_string(),
                rt.pids.get(i).copied().unwrap_or(0).into(),
            ),
            (
                "metrics".to_string(),
                rt.metrics.get(i).cloned().unwrap_or_default().into(),
            ),
        ]),
    }
}

impl Platform for LocalPlatform {
    fn tool(&self) -> &'static str {
        "ldc cell"
    }

    async fn who(&self) -> String {
        who()
    }

    async fn snapshot(&self) -> Result<Snapshot, PlatformError> {
        self.txn(false, |t| read_snapshot(t).map_err(control_error))
            .await
    }

    async fn record_move(
        &self,
        _on: &Snapshot,
        id: &str,
        plan: &Plan,
        by: &str,
    ) -> Result<MoveOutcome, PlatformError> {
        let (id, plan, by, signer) = (
            id.to_string(),
            plan.clone(),
            by.to_string(),
            self.signer.clone(),
        );
        self.txn(true, move |t| {
            // The fence is the lock: every moved shard must still be where the plan saw it.
            ldc_control::apply_plan(t, &plan).map_err(control_error)?;
            let table = ldc_control::publish_routing(t, &BTreeMap::new(), signer.as_deref())
                .map_err(control_error)?;
            let record = MoveRecord::of(&id, &plan, table.epoch, &by, now_ms());
            moves::put(t, keys::LOCAL_MOVES_PREFIX, &record).map_err(control_error)?;
            Ok(MoveOutcome {
                message: record.summary.clone(),
                record,
            })
        })
        .await
    }

    async fn record_traffic(
        &self,
        on: &Snapshot,
        cell: &str,
        change: &Change,
    ) -> Result<u64, PlatformError> {
        let seen = on.cells.get(cell).cloned().unwrap_or_default();
        let (cell, change, signer) = (cell.to_string(), change.clone(), self.signer.clone());
        self.txn(true, move |t| {
            let mut st = records::load_for_update(t, &cell).map_err(control_error)?;
            let table = ldc_control::load_routing(t)
                .map_err(control_error)?
                .unwrap_or_default();
            let weight = table
                .cells
                .get(&cell)
                .map_or(st.green_weight_bp, |c| c.green_weight_bp);
            // The lock: the release is as the change was decided on.
            if weight != seen.green_weight_bp
                || st.paused != seen.paused
                || st.history.last() != seen.last_change.as_ref()
            {
                return Err(PlatformError::Conflict);
            }
            let mut epoch = table.epoch;
            if change.after_bp != change.before_bp {
                epoch = ldc_control::publish_routing(
                    t,
                    &BTreeMap::from([(cell.clone(), change.after_bp)]),
                    signer.as_deref(),
                )
                .map_err(control_error)?
                .epoch;
            }
            st.apply(change);
            records::put(t, &cell, &st).map_err(control_error)?;
            Ok(epoch)
        })
        .await
    }

    async fn move_record(&self, id: &str) -> Result<Option<MoveRecord>, PlatformError> {
        let id = id.to_string();
        self.txn(false, move |t| {
            moves::get(t, keys::LOCAL_MOVES_PREFIX, &id, false).map_err(control_error)
        })
        .await
    }

    async fn history(
        &self,
        moves_max: usize,
        cell: Option<&str>,
    ) -> Result<HistoryData, PlatformError> {
        let cell = cell.map(str::to_string);
        self.txn(false, move |t| {
            let keep = |r: &MoveRecord| cell.as_deref().is_none_or(|c| r.involves(c));
            let (recs, total) = moves::newest(t, keys::LOCAL_MOVES_PREFIX, moves_max, keep)
                .map_err(control_error)?;
            let states = records::load_all(t).map_err(control_error)?;
            Ok(HistoryData {
                moves: recs
                    .into_iter()
                    .map(|r| MoveView {
                        result: "Succeeded".into(),
                        message: r.summary.clone(),
                        record: r,
                    })
                    .collect(),
                moves_total: total,
                traffic: states
                    .into_iter()
                    .flat_map(|(c, s)| s.history.into_iter().map(move |h| (c.clone(), h)))
                    .collect(),
            })
        })
        .await
    }

    async fn changed(&self, seen: &Snapshot, wait: Duration) {
        let until = Instant::now() + wait;
        while Instant::now() < until {
            tokio::time::sleep(POLL_PERIOD).await;
            match self.snapshot().await {
                Ok(s) if &s == seen => {}
                _ => return,
            }
        }
    }
}

/// The login name of this process's user: `$USER`, `$LOGNAME`, or the uid's passwd entry.
fn user_name() -> String {
    if let Ok(u) = std::env::var("USER").or_else(|_| std::env::var("LOGNAME"))
        && !u.is_empty()
    {
        return u;
    }
    use std::os::unix::fs::MetadataExt;
    let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
        return "unknown".into();
    };
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| {
            p.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_string())
            })
        })
        .unwrap_or_else(|| format!("uid{uid}"))
}

/// `user@host` of whoever runs this command (the audit trails record it).
pub fn who() -> String {
    let user = user_name();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{user}@{host}")
}
