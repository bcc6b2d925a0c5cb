//! # ldc-ops: every operating verb, once
//!
//! `ldc cell …` (the local platform `ldc up` runs) and `kubectl cell …` (Kubernetes) are
//! two front-ends over this crate: the same clap command tree ([`cli`]), the same verbs,
//! the same reports and rendering ([`render`]: text, `-o json`, `-o yaml`, camelCase keys),
//! the same exit codes (0 done, 2 refused with what to do, 1 error).
//!
//! A verb is a function from a [`Snapshot`] of the platform and its parsed arguments to a
//! report or a refusal ([`verbs`]); nothing in it knows where the snapshot came from. The
//! [`Platform`] trait is all a platform provides: read a snapshot; record a move or a
//! traffic change under an optimistic lock (a conflict means: decide again on a fresh
//! snapshot); read the history; wait for the routing table to carry a change. [`run`]
//! drives a verb over a platform. [`local::LocalPlatform`] is the store `ldc up` uses;
//! the operator crate has the Kubernetes one.
#![forbid(unsafe_code)]

pub mod cli;
pub mod local;
pub mod platform;
pub mod render;
mod run;
mod snapshot;
pub mod verbs;

pub use platform::{HistoryData, MoveOutcome, MoveView, Platform, PlatformError};
pub use run::{ATTEMPTS_MAX, run, watch_status};
pub use snapshot::{CellFacts, ColourFacts, Pending, Snapshot};

use thiserror::Error;

/// Why a verb did not do what it was asked.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OpsError {
    /// Understood and refused: the message says what was wrong and what to do. Nothing
    /// was written. Exit code 2.
    #[error("{0}")]
    Refused(String),
    /// Something failed (the store, the API server, a timeout). Exit code 1.
    #[error("{0}")]
    Failed(String),
}

impl OpsError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            OpsError::Refused(_) => 2,
            OpsError::Failed(_) => 1,
        }
    }
}

impl From<PlatformError> for OpsError {
    fn from(e: PlatformError) -> Self {
        match e {
            PlatformError::Refused(m) => OpsError::Refused(m),
            other => OpsError::Failed(other.to_string()),
        }
    }
}
