//! What a platform provides to the verbs.

use ldc_control::moves::MoveRecord;
use ldc_core::planner::Plan;
use ldc_core::traffic::Change;
use thiserror::Error;

use crate::Snapshot;

/// A platform failure, as the verbs see it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlatformError {
    /// The state the decision was made on changed before it was recorded (someone else
    /// acted in between): nothing was written; decide again on a fresh snapshot.
    #[error("the platform changed while the change was being recorded")]
    Conflict,
    /// The platform (or its controller) refused, saying why and what to do.
    #[error("{0}")]
    Refused(String),
    /// The store or the API server failed, or a wait ran out.
    #[error("{0}")]
    Failed(String),
}

/// A move as carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveOutcome {
    pub record: MoveRecord,
    /// What the controller said about it (the plan on one line, or why it did more or less).
    pub message: String,
}

/// What `history` shows: the newest moves (and how many there are in all) and every
/// cell's traffic changes (each trail is bounded).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HistoryData {
    pub moves: Vec<MoveView>,
    pub moves_total: usize,
    pub traffic: Vec<(String, Change)>,
}

/// One move in the history: its record and its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveView {
    pub record: MoveRecord,
    /// `Succeeded`, or `Failed` (the controller refused it; Kubernetes only).
    pub result: String,
    pub message: String,
}

/// A platform LDC runs on. Implementations: [`crate::local::LocalPlatform`] (the store
/// `ldc up` uses) and the operator crate's Kubernetes platform.
#[allow(async_fn_in_trait)] // used generically by the front-ends, never as `dyn`
pub trait Platform {
    /// The command prefix the messages suggest: `ldc cell` or `kubectl cell`.
    fn tool(&self) -> &'static str;

    /// Who is acting, as recorded in the audit trails.
    async fn who(&self) -> String;

    /// The platform now.
    async fn snapshot(&self) -> Result<Snapshot, PlatformError>;

    /// Carries out `plan` (planned on `on`) as move `id`: the platform checks that what
    /// the plan moves is still as `on` saw it ([`PlatformError::Conflict`] otherwise),
    /// records it, and returns once the routing table routers use carries it.
    async fn record_move(
        &self,
        on: &Snapshot,
        id: &str,
        plan: &Plan,
        by: &str,
    ) -> Result<MoveOutcome, PlatformError>;

    /// Records a traffic change of `cell` (decided on `on`: a change of the cell since is
    /// a [`PlatformError::Conflict`]) and returns once the routing table carries it, with
    /// the epoch of that table.
    async fn record_traffic(
        &self,
        on: &Snapshot,
        cell: &str,
        change: &Change,
    ) -> Result<u64, PlatformError>;

    /// A recorded move by id (what `revert` undoes).
    async fn move_record(&self, id: &str) -> Result<Option<MoveRecord>, PlatformError>;

    /// The newest `moves_max` moves (only those that involve `cell`, when given:
    /// [`MoveRecord::involves`]), how many there are in all, and every traffic change.
    async fn history(
        &self,
        moves_max: usize,
        cell: Option<&str>,
    ) -> Result<HistoryData, PlatformError>;

    /// Returns when the platform may have changed since `seen` (a watch where the
    /// platform has one), or after at most `wait`.
    async fn changed(&self, seen: &Snapshot, wait: std::time::Duration);
}
