//! The accept loops (traffic and admin) and the active health checker.
//!
//! The traffic listener is the edge: TLS (client certificates optional, ALPN h2), each
//! handshake in the connection's own task with a deadline, so a silent socket costs one
//! connection slot for a few seconds and never the accept loop. The admin listener is
//! plain HTTP/1.1 (`/healthz`, `/readyz`, `/metrics`, `/table`) on its own port, which
//! carries no payment traffic and no control: it is for probes and Prometheus, and is kept
//! off the client network (loopback for `ldc up`, a NetworkPolicy on Kubernetes).

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use ldc_security::Identity;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::auth::EdgeSecurity;
use crate::balance::Balancer;
use crate::metrics::RouterMetrics;
use crate::proxy::{self, Shared};
use crate::{RouterConfig, RouterError, TableHandle, admin};

/// Where a router listens.
pub struct Listeners {
    /// Client traffic (gRPC).
    pub traffic: TcpListener,
    /// Probes, metrics and the table (HTTP/1.1 GET).
    pub admin: TcpListener,
}

/// Serves the proxy on `listeners.traffic` and the admin endpoints on `listeners.admin`
/// until `shutdown` resolves, then stops accepting and waits (at most
/// `config.drain_timeout`) for requests in flight. Metrics are registered in `registry`;
/// the table comes from `table` (see [`crate::poll_store`]).
pub async fn serve(
    listeners: Listeners,
    table: TableHandle,
    config: RouterConfig,
    security: EdgeSecurity,
    registry: prometheus::Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RouterError> {
    let Listeners {
        traffic: listener,
        admin,
    } = listeners;
    let metrics = RouterMetrics::new();
    metrics.register(&registry, table.metrics())?;
    if let Some(t) = table.current() {
        table.metrics().table_epoch.set(t.epoch as i64);
    }

    let shared = Arc::new(Shared {
        balancer: Balancer::new(
            config.ejection_base,
            config.ejection_max,
            metrics.ejections.clone(),
        ),
        table,
        metrics,
        registry,
        config: config.clone(),
        security: security.clone(),
        buffer_budget: Arc::new(Semaphore::new(
            config.buffered_bytes_max.min(Semaphore::MAX_PERMITS),
        )),
        clients: crate::clients::InFlightByClient::new(config.client_in_flight_max),
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let health = tokio::spawn(health_check(shared.clone(), stop_rx.clone()));
    let admin_addr = admin.local_addr()?;
    let admin = tokio::spawn(serve_admin(admin, shared.clone(), stop_rx));
    let reloads: Vec<_> = match &security {
        EdgeSecurity::Tls {
            server, upstream, ..
        } => vec![server.watch(), upstream.watch()],
        EdgeSecurity::Insecure => {
            tracing::warn!(
                "INSECURE: the router serves plaintext and authenticates no one (--insecure);                  anyone who reaches it can move money. Never run this outside a development machine."
            );
            vec![]
        }
    };

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        // hyper's minimum is 8 KiB; our own header check gives the precise error.
        .max_buf_size((config.header_bytes_max * 2).max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        // Twice our limit: headers a little too big get a precise gRPC error from us,
        // huge ones are refused by h2 before they cost memory.
        .max_header_list_size(u32::try_from(config.header_bytes_max * 2).unwrap_or(u32::MAX))
        .max_concurrent_streams(config.streams_per_connection_max)
        .keep_alive_interval(Duration::from_secs(20));

    let graceful = GracefulShutdown::new();
    let slots = crate::slots::Slots::new(config.connections_max);
    let addr = listener.local_addr()?;
    tracing::info!(%addr, admin = %admin_addr, tls = security.is_secure(), "router listening");
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    ldc_security::net::accept_failed("router", &e).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.admit() else {
            shared.metrics.connections_refused.inc();
            tracing::warn!(%peer, max = config.connections_max, "every connection has requests in flight; closing this one");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (s, builder, watcher) = (shared.clone(), builder.clone(), graceful.watcher());
        tokio::spawn(async move {
            let slot = Arc::new(slot);
            let serve = async {
                match &s.security {
                    EdgeSecurity::Tls { server, .. } => {
                        let tls = match ldc_security::net::accept(stream, server.current()).await {
                            Ok(t) => t,
                            Err(e) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                        };
                        let id = ldc_security::net::peer_identity(tls.get_ref().1).map(Arc::new);
                        let svc = traffic_service(s.clone(), id, slot.clone());
                        let conn = builder.serve_connection(TokioIo::new(tls), svc);
                        if let Err(e) = watcher.watch(conn).await {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        }
                    }
                    EdgeSecurity::Insecure => {
                        let svc = traffic_service(s.clone(), None, slot.clone());
                        let conn = builder.serve_connection(TokioIo::new(stream), svc);
                        if let Err(e) = watcher.watch(conn).await {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        }
                    }
                }
            };
            tokio::select! {
                () = serve => {}
                () = slot.evicted() => {
                    s.metrics.connections_evicted.inc();
                    tracing::debug!(%peer, "idle connection closed to make room for a new one");
                }
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    if tokio::time::timeout(config.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout = ?config.drain_timeout,
            "requests still in flight after the drain timeout; closing"
        );
    }
    let _ = health.await;
    let _ = admin.await;
    for r in reloads {
        r.abort();
    }
    Ok(())
}

/// The service of one traffic connection, whose client certificate named `peer`.
fn traffic_service(
    s: Arc<Shared>,
    peer: Option<Arc<Identity>>,
    slot: Arc<crate::slots::Slot>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = http::Response<crate::body::RespBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<http::Response<crate::body::RespBody>, Infallible>> + Send,
> + Clone {
    service_fn(move |req: Request<Incoming>| {
        let (s, peer) = (s.clone(), peer.clone());
        let busy = slot.request();
        async move {
            let resp = dispatch(s, req, peer).await;
            Ok::<_, Infallible>(resp.map(|b| crate::body::Guarded::wrap(b, busy)))
        }
    })
}

async fn dispatch(
    s: Arc<Shared>,
    req: Request<Incoming>,
    peer: Option<Arc<Identity>>,
) -> http::Response<crate::body::RespBody> {
    if req.version() != Version::HTTP_2 {
        return admin::not_grpc();
    }
    // Boxed: the request's future is large (every state of a proxied call); hyper moves the
    // service future into each stream task it spawns, so it moves a pointer instead.
    Box::pin(proxy::proxy(s, req, peer)).await
}

/// The admin listener: plain HTTP/1.1 GETs ([`ldc_admin::serve`]).
async fn serve_admin(listener: TcpListener, s: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let handler = move |req: Request<Incoming>| {
        let s = s.clone();
        async move { admin::handle(&s, &req) }
    };
    let stopped = async move {
        let _ = stop.wait_for(|v| *v).await;
    };
    ldc_admin::serve(listener, "router-admin", handler, stopped).await
}

/// Probes every endpoint of the table each interval with a gRPC health call (see
/// [`crate::probe`]): an endpoint that does not answer SERVING in time is ejected, one that
/// does is brought back. Also forgets endpoints that left the table.
async fn health_check(s: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let every = s.config.health_check_interval;
    loop {
        tokio::select! {
            _ = stop.wait_for(|v| *v) => return,
            _ = tokio::time::sleep(every) => {}
        }
        let Some(t) = s.table.current() else {
            continue;
        };
        let targets: Vec<(&str, &str)> = t
            .cells
            .iter()
            .flat_map(|(cell, c)| {
                c.blue
                    .iter()
                    .chain(c.green.iter())
                    .map(move |a| (cell.as_str(), a.as_str()))
            })
            .collect();
        s.balancer
            .retain(&targets.iter().map(|(_, a)| *a).collect::<HashSet<&str>>());
        let mut probes = tokio::task::JoinSet::new();
        for (cell, addr) in targets {
            let (ep, s, cell) = (s.balancer.endpoint(addr), s.clone(), cell.to_string());
            probes.spawn(async move {
                let how = crate::upstream::Connect {
                    timeout: s.config.connect_timeout,
                    tls: match &s.security {
                        EdgeSecurity::Tls { upstream, .. } => Some(&**upstream),
                        EdgeSecurity::Insecure => None,
                    },
                    cell: &cell,
                };
                let r = crate::probe::probe(&ep, &how, s.config.health_check_timeout).await;
                (ep, r)
            });
        }
        while let Some(r) = probes.join_next().await {
            let Ok((ep, r)) = r else { continue };
            match r {
                crate::probe::Probe::Serving => s.balancer.restore(&ep),
                crate::probe::Probe::NotServing(why) | crate::probe::Probe::Failed(why) => {
                    tracing::debug!(endpoint = %ep.addr(), %why, "health probe failed");
                    s.balancer.eject(&ep, Instant::now());
                }
            }
        }
    }
}
