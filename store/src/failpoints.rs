//! Failpoints at the store's commit and sync seams, for the fault-injection tests.
//!
//! Built on the `fail` crate and compiled in only with the `failpoints` feature, which the
//! workspace enables for test builds alone (a dev-dependency of the `ldc` package): a
//! release binary has no failpoints and [`configure`] refuses. A failpoint takes the `fail`
//! crate's actions (`sleep(ms)`, `delay(ms)`, `pause`, `panic`, `off`, with `N%` and `N*`
//! prefixes); `return` makes the seam fail as the disk would (an I/O error), and
//! `return(crash)` aborts the process in the middle of the seam, as a power cut would.
//!
//! The seams (embedded store):
//! * [`COMMIT`]: after a transaction's writes, before its COMMIT (holding the write lock).
//! * [`SYNC`]: before the fsync that makes commits durable.

use crate::StoreError;

/// Before a read-write transaction commits.
pub const COMMIT: &str = "store::commit";
/// Before the store syncs committed transactions to disk.
pub const SYNC: &str = "store::sync";
/// Every failpoint, for validating names.
pub const NAMES: [&str; 2] = [COMMIT, SYNC];

/// Whether this build has failpoints.
pub const fn enabled() -> bool {
    cfg!(feature = "failpoints")
}

/// Why a failpoint could not be set.
#[derive(Debug, thiserror::Error)]
pub enum FailpointError {
    #[error("this build has no failpoints (they exist only in test builds)")]
    Disabled,
    #[error("no failpoint named {0:?}; the failpoints are {NAMES:?}")]
    Unknown(String),
    #[error("bad failpoint actions: {0}")]
    Actions(String),
}

fn known(name: &str) -> Result<(), FailpointError> {
    if !enabled() {
        return Err(FailpointError::Disabled);
    }
    if !NAMES.contains(&name) {
        return Err(FailpointError::Unknown(name.chars().take(64).collect()));
    }
    Ok(())
}

/// Sets failpoint `name` to `actions` (the `fail` crate's syntax).
pub fn configure(name: &str, actions: &str) -> Result<(), FailpointError> {
    known(name)?;
    #[cfg(feature = "failpoints")]
    fail::cfg(name, actions).map_err(FailpointError::Actions)?;
    let _ = actions;
    tracing::warn!(failpoint = name, actions, "failpoint set");
    Ok(())
}

/// Turns failpoint `name` off (a paused seam resumes).
pub fn remove(name: &str) -> Result<(), FailpointError> {
    known(name)?;
    #[cfg(feature = "failpoints")]
    fail::remove(name);
    tracing::warn!(failpoint = name, "failpoint removed");
    Ok(())
}

/// Passes through seam `name`: runs its actions, if any.
#[inline]
pub(crate) fn hit(name: &'static str) -> Result<(), StoreError> {
    #[cfg(feature = "failpoints")]
    fail::fail_point!(name, |arg: Option<String>| {
        if arg.as_deref() == Some("crash") {
            eprintln!("failpoint {name}: crashing the process");
            std::process::abort();
        }
        Err(StoreError::Io(format!(
            "injected I/O error at failpoint {name}"
        )))
    });
    let _ = name;
    Ok(())
}
