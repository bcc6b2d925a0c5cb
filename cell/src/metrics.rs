//! Prometheus metrics of a cell process, and its admin port (on [`ldc_admin`]).

use std::future::Future;

use hyper::{Request, StatusCode, body::Incoming};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};
use tokio::net::TcpListener;

/// Every metric a cell exports. Cheap to clone (handles).
#[derive(Clone)]
pub struct CellMetrics {
    pub requests: IntCounterVec,
    pub latency: HistogramVec,
    pub batch_size: Histogram,
    pub commit_seconds: Histogram,
    pub sync_seconds: Histogram,
    pub batch_retries: IntCounter,
    pub moved: IntCounter,
    pub outbox_pending: IntGauge,
    pub outbox_lag_seconds: prometheus::Gauge,
    pub relay_deliveries: IntCounterVec,
    /// Inbound credits that reused a delivered message id with other content (refused).
    pub relay_conflicts: IntCounter,
    /// Calls refused before their handler because of who made them.
    pub refused_peers: IntCounterVec,
    pub owned_shards: IntGauge,
    /// Seconds since a batch last became durable (the readiness signal, see `health`).
    pub writer_stalled_seconds: prometheus::Gauge,
    /// Idempotency records forgotten after the retention window (see `retention`).
    pub idempotency_pruned: IntCounter,
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ]
}

impl CellMetrics {
    /// Creates the metrics with constant labels `cell` and `colour` and registers them.
    pub fn new(registry: &Registry, cell: &str, colour: &str) -> CellMetrics {
        let c = |o: Opts| o.const_label("cell", cell).const_label("colour", colour);
        let h = |o: HistogramOpts| o.const_label("cell", cell).const_label("colour", colour);
        let m = CellMetrics {
            requests: IntCounterVec::new(
                c(Opts::new(
                    "ldc_cell_requests_total",
                    "Payment API requests by method and gRPC code",
                )),
                &["method", "code"],
            )
            .unwrap(),
            latency: HistogramVec::new(
                h(
                    HistogramOpts::new("ldc_cell_request_seconds", "Payment API latency by method")
                        .buckets(latency_buckets()),
                ),
                &["method"],
            )
            .unwrap(),
            batch_size: Histogram::with_opts(h(HistogramOpts::new(
                "ldc_cell_batch_commands",
                "Commands per group-commit batch",
            )
            .buckets(vec![
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
            ])))
            .unwrap(),
            commit_seconds: Histogram::with_opts(h(HistogramOpts::new(
                "ldc_cell_batch_seconds",
                "Time to execute and commit one batch (its sync is ldc_cell_sync_seconds)",
            )
            .buckets(latency_buckets())))
            .unwrap(),
            sync_seconds: Histogram::with_opts(h(HistogramOpts::new(
                "ldc_cell_sync_seconds",
                "Time of one store sync (fsync) that makes committed batches durable",
            )
            .buckets(latency_buckets())))
            .unwrap(),
            batch_retries: IntCounter::with_opts(c(Opts::new(
                "ldc_cell_batch_retries_total",
                "Batches retried because the store asked to",
            )))
            .unwrap(),
            moved: IntCounter::with_opts(c(Opts::new(
                "ldc_cell_moved_total",
                "Requests answered 'moved' (shard not owned)",
            )))
            .unwrap(),
            outbox_pending: IntGauge::with_opts(c(Opts::new(
                "ldc_cell_outbox_pending",
                "Outbox messages of owned shards waiting for delivery",
            )))
            .unwrap(),
            outbox_lag_seconds: prometheus::Gauge::with_opts(c(Opts::new(
                "ldc_cell_outbox_lag_seconds",
                "Age of the oldest undelivered outbox message",
            )))
            .unwrap(),
            relay_deliveries: IntCounterVec::new(
                c(Opts::new(
                    "ldc_cell_relay_deliveries_total",
                    "Outbox deliveries by outcome",
                )),
                &["outcome"],
            )
            .unwrap(),
            relay_conflicts: IntCounter::with_opts(c(Opts::new(
                "ldc_cell_relay_conflicts_total",
                "Inbound credits refused because their message id was delivered before with other content (alarm on any)",
            )))
            .unwrap(),
            refused_peers: IntCounterVec::new(
                c(Opts::new(
                    "ldc_cell_refused_peers_total",
                    "Calls refused because the peer may not make them, by service and reason",
                )),
                &["service", "reason"],
            )
            .unwrap(),
            owned_shards: IntGauge::with_opts(c(Opts::new(
                "ldc_cell_owned_shards",
                "Shards this cell owns",
            )))
            .unwrap(),
            writer_stalled_seconds: prometheus::Gauge::with_opts(c(Opts::new(
                "ldc_cell_writer_stalled_seconds",
                "Seconds since the writer last made a batch durable (heartbeats included); the cell is not ready past 3",
            )))
            .unwrap(),
            idempotency_pruned: IntCounter::with_opts(c(Opts::new(
                "ldc_cell_idempotency_pruned_total",
                "Idempotency records forgotten after the retention window",
            )))
            .unwrap(),
        };
        registry.register(Box::new(m.requests.clone())).unwrap();
        registry.register(Box::new(m.latency.clone())).unwrap();
        registry.register(Box::new(m.batch_size.clone())).unwrap();
        registry
            .register(Box::new(m.commit_seconds.clone()))
            .unwrap();
        registry.register(Box::new(m.sync_seconds.clone())).unwrap();
        registry
            .register(Box::new(m.batch_retries.clone()))
            .unwrap();
        registry.register(Box::new(m.moved.clone())).unwrap();
        registry
            .register(Box::new(m.outbox_pending.clone()))
            .unwrap();
        registry
            .register(Box::new(m.outbox_lag_seconds.clone()))
            .unwrap();
        registry
            .register(Box::new(m.relay_deliveries.clone()))
            .unwrap();
        registry
            .register(Box::new(m.relay_conflicts.clone()))
            .unwrap();
        registry
            .register(Box::new(m.refused_peers.clone()))
            .unwrap();
        registry.register(Box::new(m.owned_shards.clone())).unwrap();
        registry
            .register(Box::new(m.writer_stalled_seconds.clone()))
            .unwrap();
        registry
            .register(Box::new(m.idempotency_pruned.clone()))
            .unwrap();
        m
    }
}

pub use ldc_admin::render;

/// Largest failpoint action list accepted (`PUT /fail/NAME`).
const FAILPOINT_BODY_BYTES_MAX: usize = 256;

/// Serves the cell's admin port ([`ldc_admin::serve`]): `GET /metrics`, `/healthz`, and
/// `/readyz` (with `readiness`: the writer makes progress) on `listener` until `shutdown`
/// resolves. Test builds also take `PUT /fail/NAME` (body: the actions) and
/// `DELETE /fail/NAME` to set the store's failpoints (`ldc_store::failpoints`); other
/// builds answer 404.
pub async fn serve_metrics(
    listener: TcpListener,
    registry: Registry,
    readiness: Option<crate::health::Readiness>,
    shutdown: impl Future<Output = ()>,
) {
    let handler = move |req: Request<Incoming>| {
        let (registry, readiness) = (registry.clone(), readiness.clone());
        async move { route(&registry, readiness.as_ref(), req).await }
    };
    ldc_admin::serve(listener, "cell-metrics", handler, shutdown).await
}

async fn route(
    registry: &Registry,
    readiness: Option<&crate::health::Readiness>,
    req: Request<Incoming>,
) -> ldc_admin::Reply {
    let ready = || match readiness {
        Some(r) if !r.ready() => {
            Err("the writer makes no progress (see ldc_cell_writer_stalled_seconds)".to_string())
        }
        _ => Ok(String::new()),
    };
    if let Some(r) = ldc_admin::standard(registry, ready, &req) {
        return r;
    }
    let path = req.uri().path().to_string();
    match (req.method().as_str(), path.as_str()) {
        (m @ ("PUT" | "DELETE"), p) if p.starts_with("/fail/") => {
            let (status, body) = failpoint(m == "PUT", &p["/fail/".len()..], req.into_body()).await;
            ldc_admin::text(StatusCode::from_u16(status).expect("a valid status"), body)
        }
        _ => ldc_admin::not_found("/metrics, /healthz and /readyz"),
    }
}

/// `PUT /fail/NAME` with the actions as body, or `DELETE /fail/NAME`.
async fn failpoint(set: bool, name: &str, body: Incoming) -> (u16, String) {
    use ldc_store::failpoints::{self, FailpointError};
    if !failpoints::enabled() {
        return (404, "this build has no failpoints\n".into());
    }
    let r = if set {
        let limited = http_body_util::Limited::new(body, FAILPOINT_BODY_BYTES_MAX);
        let actions = match http_body_util::BodyExt::collect(limited).await {
            Ok(b) => String::from_utf8_lossy(&b.to_bytes()).trim().to_string(),
            Err(_) => {
                return (
                    400,
                    format!("failpoint actions are at most {FAILPOINT_BODY_BYTES_MAX} bytes\n"),
                );
            }
        };
        failpoints::configure(name, &actions)
    } else {
        failpoints::remove(name)
    };
    match r {
        Ok(()) => (200, "ok\n".into()),
        Err(e @ FailpointError::Disabled) => (404, format!("{e}\n")),
        Err(e) => (400, format!("{e}\n")),
    }
}
