//! Endpoint choice within one cell colour, and ejection of endpoints that fail.
//!
//! * **Power of two choices**: pick two distinct available endpoints at random and send to
//!   the one with fewer requests in flight. It needs no global view, adapts to a slow pod
//!   at once, and avoids the herd that "least loaded" causes when many routers agree.
//! * **Passive ejection**: a failed connect (nothing reached the cell) ejects the endpoint
//!   for a backoff period that doubles on each consecutive failure, up to a maximum.
//! * **Outlier detection**: [`OUTLIER_FAILURES_MAX`] requests in a row that reached the
//!   endpoint but got no answer (timeouts, connections broken mid-request) eject it too: a
//!   cell that accepts connections and then hangs is routed around without waiting for the
//!   next probe. gRPC errors are answers (a "moved" is routine) and never count.
//! * **Active health check**: the server probes every endpoint of the table with a gRPC
//!   health call that reports the cell's writer progress; SERVING brings an ejected
//!   endpoint back at once, anything else ejects it.
//!
//! Everything here takes the time (`now`) and the random source as arguments, so tests
//! drive it with a deterministic clock and a seeded RNG.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use rand::Rng;

use crate::metrics::{CellMetrics, RouterMetrics};
use crate::upstream::Upstream;

/// One upstream endpoint (`host:port`) and what the router knows about it.
#[derive(Debug)]
pub struct Endpoint {
    addr: String,
    /// `addr` as a URI authority (`None` if it is not a valid one), parsed once.
    authority: Option<http::uri::Authority>,
    in_flight: AtomicUsize,
    health: Mutex<Health>,
    upstream: Upstream,
    /// The metric handles of the endpoint's cell and colour (an endpoint serves one).
    metrics: OnceLock<Arc<CellMetrics>>,
}

#[derive(Debug, Default)]
struct Health {
    ejected_until: Option<Instant>,
    /// Consecutive failures (connects or probes); sets the next ejection period.
    failures: u32,
    /// Consecutive requests without an answer since the last success.
    outliers: u32,
}

/// Requests in a row without an answer (timeout, broken connection) that eject an endpoint.
pub const OUTLIER_FAILURES_MAX: u32 = 5;

impl Endpoint {
    fn new(addr: &str) -> Endpoint {
        Endpoint {
            addr: addr.to_string(),
            authority: addr.parse().ok(),
            in_flight: AtomicUsize::new(0),
            health: Mutex::new(Health::default()),
            upstream: Upstream::default(),
            metrics: OnceLock::new(),
        }
    }

    /// The endpoint's address, `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The endpoint's address as a URI authority; `None` if it is not `host:port`.
    pub fn authority(&self) -> Option<&http::uri::Authority> {
        self.authority.as_ref()
    }

    /// The endpoint's HTTP/2 connections.
    pub(crate) fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// The request metrics of `cell` and `colour`, resolved on the endpoint's first request
    /// and kept (an endpoint that turns up under another cell or colour, which a table
    /// change could do, gets fresh handles each time).
    pub(crate) fn cell_metrics(
        &self,
        m: &RouterMetrics,
        cell: &str,
        colour: &'static str,
    ) -> Arc<CellMetrics> {
        let cached = self
            .metrics
            .get_or_init(|| Arc::new(CellMetrics::new(m, cell, colour)));
        if cached.is_for(cell, colour) {
            cached.clone()
        } else {
            Arc::new(CellMetrics::new(m, cell, colour))
        }
    }

    /// Requests in flight to this endpoint.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether the endpoint may receive requests at `now` (not ejected, or the ejection
    /// period is over).
    pub fn is_available(&self, now: Instant) -> bool {
        let h = self.health.lock().expect("lock");
        h.ejected_until.is_none_or(|until| now >= until)
    }

    /// Marks a request in flight until the guard is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// A request in flight to an endpoint; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight(Arc<Endpoint>);

impl InFlight {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every endpoint the router has routed to, with its load and health. Shared by all
/// requests; survives table changes (an endpoint keeps its state while it stays listed).
pub struct Balancer {
    endpoints: Mutex<HashMap<String, Arc<Endpoint>>>,
    ejection_base: Duration,
    ejection_max: Duration,
    ejections: IntCounter,
}

impl Balancer {
    /// `ejections` counts every ejection (a metric handle; may be unregistered).
    pub fn new(ejection_base: Duration, ejection_max: Duration, ejections: IntCounter) -> Self {
        Balancer {
            endpoints: Mutex::new(HashMap::new()),
            ejection_base,
            ejection_max: ejection_max.max(ejection_base),
            ejections,
        }
    }

    /// The state of `addr`, created on first use.
    pub fn endpoint(&self, addr: &str) -> Arc<Endpoint> {
        let mut map = self.endpoints.lock().expect("lock");
        if let Some(e) = map.get(addr) {
            return e.clone();
        }
        let e = Arc::new(Endpoint::new(addr));
        map.insert(addr.to_string(), e.clone());
        e
    }

    /// Picks one of `addrs` by power of two choices among the available ones; `None` when
    /// the list is empty or every endpoint is ejected.
    pub fn pick<R: Rng + ?Sized>(
        &self,
        addrs: &[String],
        now: Instant,
        rng: &mut R,
    ) -> Option<Arc<Endpoint>> {
        let available: Vec<Arc<Endpoint>> = {
            // One lock per request, not one per endpoint.
            let mut map = self.endpoints.lock().expect("lock");
            addrs
                .iter()
                .map(|a| match map.get(a.as_str()) {
                    Some(e) => e.clone(),
                    // Allocates the key only the first time (not per request).
                    None => map
                        .entry(a.clone())
                        .or_insert_with(|| Arc::new(Endpoint::new(a)))
                        .clone(),
                })
                .filter(|e| e.is_available(now))
                .collect()
        };
        match available.len() {
            0 => None,
            1 => available.into_iter().next(),
            n => {
                let i = rng.random_range(0..n);
                // A second, distinct index: offset by 1..n.
                let j = (i + rng.random_range(1..n)) % n;
                let (a, b) = (&available[i], &available[j]);
                Some(if b.in_flight() < a.in_flight() { b } else { a }.clone())
            }
        }
    }

    /// Ejects `ep` after a failure (a connect or a probe) at `now`: for `ejection_base`,
    /// doubled per consecutive failure, at most `ejection_max`. Returns the period.
    pub fn eject(&self, ep: &Endpoint, now: Instant) -> Duration {
        let mut h = ep.health.lock().expect("lock");
        let was_ejected = h.ejected_until.is_some_and(|until| now < until);
        h.failures = h.failures.saturating_add(1);
        let shift = (h.failures - 1).min(16);
        let period = self
            .ejection_base
            .saturating_mul(1 << shift)
            .min(self.ejection_max);
        h.ejected_until = Some(now + period);
        if !was_ejected {
            self.ejections.inc();
            tracing::warn!(endpoint = %ep.addr, period_ms = period.as_millis() as u64, failures = h.failures, "endpoint ejected");
        }
        period
    }

    /// Records a request that reached `ep` and got no answer; ejects the endpoint at the
    /// [`OUTLIER_FAILURES_MAX`]th in a row. Returns whether it did.
    pub fn outlier(&self, ep: &Endpoint, now: Instant) -> bool {
        {
            let mut h = ep.health.lock().expect("lock");
            h.outliers = h.outliers.saturating_add(1);
            if h.outliers < OUTLIER_FAILURES_MAX {
                return false;
            }
            h.outliers = 0;
        }
        self.eject(ep, now);
        true
    }

    /// Records a success (a response, or a probe that answered SERVING): clears any
    /// ejection and the failure counts.
    pub fn restore(&self, ep: &Endpoint) {
        let mut h = ep.health.lock().expect("lock");
        if h.ejected_until.is_some() || h.failures > 0 || h.outliers > 0 {
            if h.ejected_until.is_some() {
                tracing::info!(endpoint = %ep.addr, "endpoint back in service");
            }
            *h = Health::default();
        }
    }

    /// Forgets endpoints not in `keep` (no longer in the table) and nothing in flight.
    pub fn retain(&self, keep: &HashSet<&str>) {
        self.endpoints
            .lock()
            .expect("lock")
            .retain(|addr, e| keep.contains(addr.as_str()) || e.in_flight() > 0);
    }

    /// Every endpoint known now.
    pub fn all(&self) -> Vec<Arc<Endpoint>> {
        self.endpoints
            .lock()
            .expect("lock")
            .values()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn balancer() -> Balancer {
        Balancer::new(
            Duration::from_secs(1),
            Duration::from_secs(8),
            IntCounter::new("e", "e").unwrap(),
        )
    }

    fn addrs(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:50051")).collect()
    }

    #[test]
    fn empty_and_single() {
        let b = balancer();
        let mut rng = StdRng::seed_from_u64(1);
        let now = Instant::now();
        assert!(b.pick(&[], now, &mut rng).is_none());
        let one = addrs(1);
        assert_eq!(b.pick(&one, now, &mut rng).unwrap().addr(), one[0]);
    }

    #[test]
    fn two_choices_prefer_fewer_in_flight() {
        let b = balancer();
        let mut rng = StdRng::seed_from_u64(7);
        let now = Instant::now();
        let a = addrs(2);
        // Endpoint 0 is busy: with two endpoints both are always the two choices, so the
        // idle one always wins.
        let busy = b.endpoint(&a[0]);
        let _g1 = busy.start();
        let _g2 = busy.start();
        for _ in 0..100 {
            assert_eq!(b.pick(&a, now, &mut rng).unwrap().addr(), a[1]);
        }
    }

    #[test]
    fn spreads_evenly_when_idle() {
        let b = balancer();
        let mut rng = StdRng::seed_from_u64(42);
        let now = Instant::now();
        let a = addrs(3);
        let mut counts = HashMap::new();
        for _ in 0..3000 {
            *counts
                .entry(b.pick(&a, now, &mut rng).unwrap().addr().to_string())
                .or_insert(0) += 1;
        }
        for addr in &a {
            let c = counts[addr];
            assert!((800..=1200).contains(&c), "{addr} got {c} of 3000");
        }
    }

    #[test]
    fn in_flight_guard_counts() {
        let b = balancer();
        let e = b.endpoint("x:1");
        let g = e.start();
        assert_eq!(e.in_flight(), 1);
        drop(g);
        assert_eq!(e.in_flight(), 0);
    }

    #[test]
    fn ejection_backs_off_and_expires() {
        let b = balancer();
        let mut rng = StdRng::seed_from_u64(3);
        let t0 = Instant::now();
        let a = addrs(2);
        let dead = b.endpoint(&a[0]);

        assert_eq!(b.eject(&dead, t0), Duration::from_secs(1));
        assert_eq!(b.ejections.get(), 1);
        for _ in 0..50 {
            assert_eq!(b.pick(&a, t0, &mut rng).unwrap().addr(), a[1]);
        }
        // Just before the period ends: still out. At its end: eligible again.
        assert!(!dead.is_available(t0 + Duration::from_millis(999)));
        assert!(dead.is_available(t0 + Duration::from_secs(1)));

        // Consecutive failures double the period, up to the maximum.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.eject(&dead, t1), Duration::from_secs(2));
        let t2 = t1 + Duration::from_secs(2);
        assert_eq!(b.eject(&dead, t2), Duration::from_secs(4));
        let t3 = t2 + Duration::from_secs(4);
        assert_eq!(b.eject(&dead, t3), Duration::from_secs(8));
        let t4 = t3 + Duration::from_secs(8);
        assert_eq!(b.eject(&dead, t4), Duration::from_secs(8), "capped");
        assert_eq!(b.ejections.get(), 5);

        // A second failure while already ejected extends but is not a new ejection.
        b.eject(&dead, t4 + Duration::from_millis(1));
        assert_eq!(b.ejections.get(), 5);

        // A success (the health check connected) brings it back and resets the backoff.
        b.restore(&dead);
        assert!(dead.is_available(t4));
        assert_eq!(b.eject(&dead, t4), Duration::from_secs(1));
    }

    #[test]
    fn all_ejected_gives_none() {
        let b = balancer();
        let mut rng = StdRng::seed_from_u64(5);
        let now = Instant::now();
        let a = addrs(2);
        for addr in &a {
            b.eject(&b.endpoint(addr), now);
        }
        assert!(b.pick(&a, now, &mut rng).is_none());
        assert!(b.pick(&a, now + Duration::from_secs(1), &mut rng).is_some());
    }

    #[test]
    fn retain_forgets_unlisted() {
        let b = balancer();
        b.endpoint("a:1");
        let busy = b.endpoint("b:1");
        let _g = busy.start();
        b.endpoint("c:1");
        b.retain(&HashSet::from(["a:1"]));
        let mut left: Vec<String> = b.all().iter().map(|e| e.addr().to_string()).collect();
        left.sort();
        assert_eq!(left, ["a:1", "b:1"]);
    }
}
