//! # ldc-cell: a stateless payment cell
//!
//! A cell serves every request of the users in the shards it owns, and keeps no state of
//! its own: balances, ledgers, idempotency records and outboxes live in the store.
//!
//! Layout (request path first):
//! * [`service`]: gRPC handlers; parse and validate, then hand over.
//! * [`writer`]: group commit; many commands, one store transaction, one sync.
//! * [`ledger`]: the payment logic and fencing, written against `ldc_store::Kv`.
//! * [`relay`]: delivers cross-cell credits from the outbox, exactly once, cell to cell.
//! * [`gate`]: who may call a cell (routers the payment API, cells the relay).
//! * [`reconcile`]: recomputes balances and proves money is conserved.
//!
//! Control records (ownership, topology, routing) are `ldc_control`'s.
//! * [`keys`], [`model`], [`error`], [`metrics`]: key layout, records, errors, metrics.
#![forbid(unsafe_code)]

pub mod error;
pub mod gate;
pub mod health;
pub mod keys;
pub mod ledger;
pub mod metrics;
pub mod model;
pub mod reconcile;
pub mod relay;
pub mod retention;
pub mod service;
pub mod writer;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ldc_core::proto::{cell_relay_server::CellRelayServer, payments_server::PaymentsServer};
use ldc_security::tls::Reloading;
use ldc_store::Store;
use rustls::{ClientConfig, ServerConfig};
use tokio::net::TcpListener;
use tokio::sync::Notify;

pub use error::PaymentError;

/// How to run one cell process.
pub struct CellConfig {
    pub cell: String,
    /// `blue` or `green`: which deployment of the cell this process is (labels only).
    pub colour: String,
    pub store: Arc<dyn Store>,
    /// Whether this process delivers its outbox (off only for benchmarks of one cell).
    pub relay: bool,
    pub queue_max: usize,
    pub batch_max: usize,
    pub transport: Transport,
    /// Where the writer's progress is published for `/readyz` (see [`health`]).
    pub readiness: health::Readiness,
    /// How long idempotency keys are remembered (see [`retention`]).
    pub idempotency_retention: Duration,
    /// A file written (with the reason) the moment the fail-stop alarm is raised, for a
    /// supervisor that may kill this process as unresponsive before it has left with its
    /// exit code (`ldc up` must know, to restart every process on the store).
    pub fail_stop_marker: Option<std::path::PathBuf>,
}

/// How a cell talks to the rest of the platform.
#[derive(Clone)]
pub enum Transport {
    /// Mutual TLS with certificates of the platform CA: the payment API only for routers,
    /// the relay only for cells, health for any component. `client` is this cell's own
    /// certificate for delivering credits to other cells.
    MutualTls {
        server: Arc<Reloading<ServerConfig>>,
        client: Arc<Reloading<ClientConfig>>,
    },
    /// Plaintext and no authentication: the explicit `--insecure` development switch only.
    Insecure,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot read the platform config: {0}")]
    Control(#[from] ldc_control::ControlError),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("store: {0}")]
    Store(#[from] ldc_store::StoreError),
    /// The writer raised its fail-stop alarm: the process must leave so its supervisor
    /// restarts it and recovery runs from what is on disk.
    #[error("fail-stop: {0}; exiting so that a restart recovers from what is on disk")]
    FailStop(String),
}

/// Longest a fail-stopped cell waits for in-flight calls (all already answered "outcome
/// unknown") before it leaves.
const FAIL_STOP_DRAIN_MAX: Duration = Duration::from_secs(2);

/// Serves the payment API (plus gRPC health and reflection) on `listener` until `shutdown`
/// resolves, then drains in-flight requests and stops the writer.
pub async fn serve(
    cfg: CellConfig,
    listener: TcpListener,
    registry: prometheus::Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let shard_count = {
        let store = cfg.store.clone();
        tokio::task::spawn_blocking(move || -> Result<u32, ServeError> {
            let mut t = store.begin_read()?;
            let c = ldc_control::load_config(&mut *t)?;
            let _ = t.rollback();
            Ok(c.shard_count)
        })
        .await
        .expect("config task")?
    };
    let metrics = metrics::CellMetrics::new(&registry, &cfg.cell, &cfg.colour);
    let wake = Arc::new(Notify::new());
    let (writer, writer_thread) = writer::Writer::start(
        cfg.store.clone(),
        writer::WriterConfig {
            cell: cfg.cell.clone(),
            shard_count,
            queue_max: cfg.queue_max,
            batch_max: cfg.batch_max,
        },
        metrics.clone(),
        wake.clone(),
    );
    let svc = service::CellService {
        cell: cfg.cell.clone().into(),
        colour: cfg.colour.clone().into(),
        shard_count,
        writer: writer.clone(),
        store: cfg.store.clone(),
        metrics: metrics.clone(),
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let relay = cfg.relay.then(|| {
        let mut rx = stop_rx.clone();
        tokio::spawn(relay::run(
            cfg.store.clone(),
            writer.clone(),
            relay::RelayConfig {
                cell: cfg.cell.clone(),
                holder: format!("{}/{}", cfg.colour, std::process::id()),
                shard_count,
                transport: cfg.transport.clone(),
            },
            wake.clone(),
            metrics.clone(),
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
        ))
    });
    let retention = tokio::spawn(retention::run(
        cfg.store.clone(),
        writer.clone(),
        cfg.cell.clone(),
        cfg.idempotency_retention,
        metrics.clone(),
        stop_rx.clone(),
    ));
    let alarm = writer.alarm().clone();
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let health = tokio::spawn(health::run(
        writer.clone(),
        health_reporter.clone(),
        cfg.readiness.clone(),
        metrics.clone(),
        stop_rx.clone(),
    ));
    drop(writer);
    // Stop serving on the shutdown signal, or at once on a fail-stop alarm.
    let shutdown = {
        let (alarm, reporter) = (alarm.clone(), health_reporter.clone());
        let marker = cfg.fail_stop_marker.clone();
        async move {
            tokio::select! {
                _ = shutdown => {}
                why = alarm.wait() => {
                    if let Some(m) = marker {
                        let written = m
                            .parent()
                            .map_or(Ok(()), std::fs::create_dir_all)
                            .and_then(|()| std::fs::write(&m, &why));
                        if let Err(e) = written {
                            tracing::error!(marker = %m.display(), error = %e, "cannot write the fail-stop marker");
                        }
                    }
                    health::set(&reporter, false).await
                }
            }
        }
    };
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ldc_core::proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("descriptor set is valid");

    let secure = matches!(cfg.transport, Transport::MutualTls { .. });
    tracing::info!(cell = %cfg.cell, colour = %cfg.colour, addr = ?listener.local_addr().ok(), engine = cfg.store.engine(), mutual_tls = secure, "cell serving");
    let gate = |service, allow, only| {
        gate::Gate::new(secure, service, allow, only, metrics.refused_peers.clone())
    };
    let router = tonic::transport::Server::builder()
        .add_service(tonic::service::interceptor::InterceptedService::new(
            health_service,
            gate(
                "grpc.health.v1.Health",
                gate::components,
                "platform components",
            ),
        ))
        .add_service(reflection)
        .add_service(PaymentsServer::with_interceptor(
            svc.clone(),
            gate("ldc.v1.Payments", gate::routers, "routers"),
        ))
        .add_service(CellRelayServer::with_interceptor(
            svc.clone(),
            gate("ldc.v1.CellRelay", gate::cells, "cells"),
        ));
    let _reload = match &cfg.transport {
        Transport::MutualTls { server, client } => {
            Some((AbortOnDrop(server.watch()), AbortOnDrop(client.watch())))
        }
        Transport::Insecure => None,
    };
    let server: std::pin::Pin<Box<dyn Future<Output = _> + Send>> = match &cfg.transport {
        Transport::MutualTls { server, .. } => {
            let incoming = ldc_security::net::incoming(listener, server.clone());
            Box::pin(router.serve_with_incoming_shutdown(incoming, shutdown))
        }
        Transport::Insecure => {
            // With our own listener tonic applies no socket options: turn Nagle off
            // ourselves, or a small response can sit in the kernel waiting for the
            // client's (delayed) ACK.
            let incoming = tokio_stream::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                |conn| {
                    if let Ok(s) = &conn
                        && let Err(e) = s.set_nodelay(true)
                    {
                        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                    }
                    conn
                },
            );
            Box::pin(router.serve_with_incoming_shutdown(incoming, shutdown))
        }
    };
    // A fail-stopped cell drains for a bounded time only: its callers were answered.
    let result = tokio::select! {
        r = server => r,
        _ = async { alarm.wait().await; tokio::time::sleep(FAIL_STOP_DRAIN_MAX).await } => Ok(()),
    };
    let _ = stop_tx.send(true);
    let _ = health.await;
    let _ = retention.await;
    if let Some(r) = relay {
        let _ = r.await;
    }
    drop(svc);
    // The writer stops once its last handle is gone; wait so every commit is answered.
    let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    if alarm.raised() {
        return Err(ServeError::FailStop(alarm.wait().await));
    }
    result?;
    Ok(())
}

/// Aborts a background task when dropped (the certificate reloader of a server).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
