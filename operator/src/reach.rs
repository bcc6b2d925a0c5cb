//! Whether the operator reaches its store, and the rule that makes a leader that cannot
//! reach it step down.
//!
//! A leader cut off from the store still renews its Lease through the API server, so a
//! replica that could do the work never gets it: failovers and cutovers wait forever.
//! Every store call of the controller is bounded by [`STORE_CALL_TIMEOUT`] and recorded
//! here; when calls have failed to reach the store for longer than the lease lasts (no
//! call reached it in between), the binary releases its Lease and exits, and another
//! replica (or this one, restarted) takes over.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest one store call of the operator may take (a hung TiKV or a held lock).
pub const STORE_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Store reachability as the controller's calls saw it.
#[derive(Debug, Default)]
pub struct StoreReach {
    /// When calls began to fail to reach the store (none since succeeded).
    failing_since: Mutex<Option<Instant>>,
}

impl StoreReach {
    /// Records one call's outcome: it reached the store (an answer, even a refusal) or not.
    pub fn record(&self, reached: bool, now: Instant) {
        let mut f = self.failing_since.lock().expect("lock");
        if reached {
            *f = None;
        } else if f.is_none() {
            *f = Some(now);
        }
    }

    /// How long calls have failed to reach the store at `now` (`None`: the last reached).
    pub fn unreachable_for(&self, now: Instant) -> Option<Duration> {
        self.failing_since
            .lock()
            .expect("lock")
            .map(|t| now.saturating_duration_since(t))
    }
}

/// Pure: whether a leader must step down, given how long the store has been unreachable
/// and how long its lease lasts.
pub fn must_step_down(unreachable_for: Option<Duration>, lease: Duration) -> bool {
    unreachable_for.is_some_and(|d| d > lease)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_that_reaches_the_store_clears_the_failure() {
        let r = StoreReach::default();
        let t0 = Instant::now();
        assert_eq!(r.unreachable_for(t0), None);
        r.record(false, t0);
        r.record(false, t0 + Duration::from_secs(5)); // the first failure counts
        assert_eq!(
            r.unreachable_for(t0 + Duration::from_secs(7)),
            Some(Duration::from_secs(7))
        );
        r.record(true, t0 + Duration::from_secs(8));
        assert_eq!(r.unreachable_for(t0 + Duration::from_secs(9)), None);
    }

    #[test]
    fn a_leader_steps_down_only_after_a_whole_lease_without_the_store() {
        let lease = Duration::from_secs(15);
        assert!(!must_step_down(None, lease));
        assert!(!must_step_down(Some(Duration::from_secs(15)), lease));
        assert!(must_step_down(Some(Duration::from_secs(16)), lease));
    }
}
