//! Prometheus metrics of a router.
//!
//! The table-source metrics live in the [`crate::TableHandle`] (a source such as
//! [`crate::poll_store`] runs without a registry); [`crate::serve`] registers them together
//! with the request metrics in the registry it is given.

use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry,
};

/// Metrics of the table source, carried by the [`crate::TableHandle`].
#[derive(Clone)]
pub struct SourceMetrics {
    /// `ldc_router_table_epoch`: epoch of the table in use (0 = none).
    pub table_epoch: IntGauge,
    /// `ldc_router_table_age_seconds`: seconds since a source last confirmed the table in
    /// use (delivered it or a newer one). Grows while the source is failing.
    pub table_age_seconds: Gauge,
    /// `ldc_router_source_errors_total{reason}`: failed reads of the table source.
    pub source_errors: IntCounterVec,
}

impl SourceMetrics {
    pub(crate) fn new() -> SourceMetrics {
        SourceMetrics {
            table_epoch: IntGauge::new(
                "ldc_router_table_epoch",
                "Epoch of the routing table in use (0 = no table yet)",
            )
            .expect("valid metric"),
            table_age_seconds: Gauge::new(
                "ldc_router_table_age_seconds",
                "Seconds since the table source last confirmed the table in use",
            )
            .expect("valid metric"),
            source_errors: IntCounterVec::new(
                Opts::new(
                    "ldc_router_source_errors_total",
                    "Failed reads of the routing-table source, by reason",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        }
    }

    fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.table_epoch.clone()))?;
        registry.register(Box::new(self.table_age_seconds.clone()))?;
        registry.register(Box::new(self.source_errors.clone()))?;
        Ok(())
    }
}

/// Request metrics of a router. Cheap to clone (handles).
#[derive(Clone)]
pub struct RouterMetrics {
    /// `ldc_router_requests_total{cell,colour,code}`: proxied requests by final gRPC code
    /// (`-` for a cell or colour the router did not get to).
    pub requests: IntCounterVec,
    /// `ldc_router_request_seconds{cell,colour}`: time from the request to the end of the
    /// response.
    pub latency: HistogramVec,
    /// `ldc_router_moved_retries_total`: requests retried after a "moved" answer.
    pub moved_retries: IntCounter,
    /// `ldc_router_ejections_total`: endpoints ejected (passively or by the health check).
    pub ejections: IntCounter,
    /// `ldc_router_errors_total{reason}`: answers the router made itself, by reason.
    pub router_errors: IntCounterVec,
    /// `ldc_router_auth_refusals_total{code,reason}`: calls refused at the edge because
    /// the caller is not authenticated (`UNAUTHENTICATED`) or not allowed
    /// (`PERMISSION_DENIED`).
    pub auth_refusals: IntCounterVec,
    /// `ldc_router_connections_evicted_total`: idle client connections closed to make room
    /// for a new one (all slots taken).
    pub connections_evicted: IntCounter,
    /// `ldc_router_connections_refused_total`: client connections refused because every
    /// slot held a connection with requests in flight.
    pub connections_refused: IntCounter,
}

impl RouterMetrics {
    /// Creates unregistered metrics (tests, or before [`RouterMetrics::register`]).
    pub fn new() -> RouterMetrics {
        RouterMetrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "ldc_router_requests_total",
                    "Proxied requests by cell, colour and final gRPC code",
                ),
                &["cell", "colour", "code"],
            )
            .expect("valid metric"),
            latency: HistogramVec::new(
                HistogramOpts::new(
                    "ldc_router_request_seconds",
                    "Request latency through the router, by cell and colour",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
                &["cell", "colour"],
            )
            .expect("valid metric"),
            moved_retries: IntCounter::new(
                "ldc_router_moved_retries_total",
                "Requests retried once after a cell answered 'moved'",
            )
            .expect("valid metric"),
            ejections: IntCounter::new(
                "ldc_router_ejections_total",
                "Endpoints ejected after a failed connect or health probe",
            )
            .expect("valid metric"),
            router_errors: IntCounterVec::new(
                Opts::new(
                    "ldc_router_errors_total",
                    "Error answers produced by the router itself, by reason",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            auth_refusals: IntCounterVec::new(
                Opts::new(
                    "ldc_router_auth_refusals_total",
                    "Calls refused at the edge: UNAUTHENTICATED or PERMISSION_DENIED, by reason",
                ),
                &["code", "reason"],
            )
            .expect("valid metric"),
            connections_evicted: IntCounter::new(
                "ldc_router_connections_evicted_total",
                "Idle client connections closed to make room for new ones (connection slots full)",
            )
            .expect("valid metric"),
            connections_refused: IntCounter::new(
                "ldc_router_connections_refused_total",
                "Client connections refused: every connection slot had requests in flight",
            )
            .expect("valid metric"),
        }
    }

    /// Registers these metrics and the table source's in `registry`.
    pub fn register(
        &self,
        registry: &Registry,
        source: &SourceMetrics,
    ) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.requests.clone()))?;
        registry.register(Box::new(self.latency.clone()))?;
        registry.register(Box::new(self.moved_retries.clone()))?;
        registry.register(Box::new(self.ejections.clone()))?;
        registry.register(Box::new(self.router_errors.clone()))?;
        registry.register(Box::new(self.auth_refusals.clone()))?;
        registry.register(Box::new(self.connections_evicted.clone()))?;
        registry.register(Box::new(self.connections_refused.clone()))?;
        source.register(registry)
    }
}

impl Default for RouterMetrics {
    fn default() -> Self {
        RouterMetrics::new()
    }
}

/// The request metrics of one cell and colour, resolved once and kept with the endpoint:
/// `with_label_values` hashes the labels and takes the vector's lock on every call, twice
/// per request; these handles are plain atomics.
pub struct CellMetrics {
    cell: String,
    colour: &'static str,
    requests: IntCounterVec,
    /// `requests{cell,colour,code="OK"}`: the code of almost every request.
    ok: IntCounter,
    latency: Histogram,
}

impl std::fmt::Debug for CellMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CellMetrics")
            .field("cell", &self.cell)
            .field("colour", &self.colour)
            .finish_non_exhaustive()
    }
}

impl CellMetrics {
    /// The handles of `cell` and `colour` in `m`.
    pub fn new(m: &RouterMetrics, cell: &str, colour: &'static str) -> CellMetrics {
        CellMetrics {
            cell: cell.to_string(),
            colour,
            requests: m.requests.clone(),
            ok: m.requests.with_label_values(&[cell, colour, "OK"]),
            latency: m.latency.with_label_values(&[cell, colour]),
        }
    }

    /// Whether these are the handles of `cell` and `colour`.
    pub fn is_for(&self, cell: &str, colour: &str) -> bool {
        self.cell == cell && self.colour == colour
    }

    /// Records one request that ended with gRPC `code` after `seconds`.
    pub fn record(&self, code: &str, seconds: f64) {
        if code == "OK" {
            self.ok.inc();
        } else {
            self.requests
                .with_label_values(&[&self.cell, self.colour, code])
                .inc();
        }
        self.latency.observe(seconds);
    }
}
