//! # ldc-admin: the admin port every LDC process serves
//!
//! Cells, routers and the operator each serve plain HTTP/1.1 on a listener of their own,
//! never on the traffic port: `GET /metrics` (Prometheus text), `/healthz` (the process is
//! alive), `/readyz` (it can do its work), plus what a component adds (the router's
//! `/table`, a test build's `/fail/NAME`). The accept loop is written once, here, with the
//! limits every listener has: at most [`CONNECTIONS_MAX`] connections (more are dropped:
//! a flood of scrapers must not cost memory), [`HEADER_TIMEOUT`] to send a request's
//! headers, a back-off when accept fails. Each component passes a handler; [`standard`]
//! answers the three common paths.
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::CONTENT_TYPE;
use hyper::service::service_fn;
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Most connections an admin listener serves at once (scrapers and probes are few).
pub const CONNECTIONS_MAX: usize = 64;
/// Longest a connection may take to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

pub use hyper::Request;
pub use hyper::body::Incoming;

/// An admin answer.
pub type Reply = Response<Full<Bytes>>;

/// An answer with `status`, `content_type` and `body`.
pub fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

/// A plain-text answer.
pub fn text(status: StatusCode, body: impl Into<String>) -> Reply {
    reply(status, "text/plain; charset=utf-8", body.into())
}

/// The registry's metrics in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut buf = String::new();
    TextEncoder::new()
        .encode_utf8(&registry.gather(), &mut buf)
        .expect("text encoding cannot fail");
    buf
}

/// `GET /metrics` of `registry`.
pub fn metrics(registry: &Registry) -> Reply {
    reply(
        StatusCode::OK,
        "text/plain; version=0.0.4",
        render(registry),
    )
}

/// The common paths: `GET /metrics`, `/healthz`, and `/readyz` (`ready`: `Ok` with what
/// to say, or `Err` with why not). `None` for any other request.
pub fn standard<B>(
    registry: &Registry,
    ready: impl FnOnce() -> Result<String, String>,
    req: &Request<B>,
) -> Option<Reply> {
    if req.method() != Method::GET {
        return None;
    }
    Some(match req.uri().path() {
        "/metrics" => metrics(registry),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match ready() {
            Ok(what) => text(StatusCode::OK, format!("ready{what}\n")),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ => return None,
    })
}

/// The answer to a path nobody serves, naming the ones that are.
pub fn not_found(paths: &str) -> Reply {
    text(
        StatusCode::NOT_FOUND,
        format!("not found; this port serves {paths}\n"),
    )
}

/// Serves `handler` on `listener` (named `name` in logs) until `shutdown` resolves.
pub async fn serve<H, F>(
    listener: TcpListener,
    name: &'static str,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    let connections = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    ldc_security::net::accept_failed(name, &e).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            continue; // dropped: a flood of scrapers must not cost memory
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| {
                let answer = handler(req);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(listener = name, %peer, error = %e, "admin connection ended with an error");
            }
        });
    }
}

/// Resolves on SIGTERM (what the kubelet and `ldc up` send) or ctrl-c.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler can be installed");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_the_standard_paths_and_what_a_component_adds() {
        let registry = Registry::new();
        let c = prometheus::IntCounter::new("ldc_test_total", "a test counter").unwrap();
        registry.register(Box::new(c.clone())).unwrap();
        c.inc();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(
            listener,
            "test-admin",
            move |req: Request<Incoming>| {
                let registry = registry.clone();
                async move {
                    let ready = || Err("the writer makes no progress".to_string());
                    standard(&registry, ready, &req).unwrap_or_else(|| match req.uri().path() {
                        "/extra" => text(StatusCode::OK, "extra\n"),
                        _ => not_found("/metrics, /healthz, /readyz, /extra"),
                    })
                }
            },
            async {
                let _ = stopped.await;
            },
        ));
        assert!(get(addr, "/metrics").await.contains("ldc_test_total 1"));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let r = get(addr, "/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 503") && r.contains("not ready: the writer makes no progress"),
            "{r}"
        );
        assert!(get(addr, "/extra").await.ends_with("extra\n"));
        let r = get(addr, "/nope").await;
        assert!(r.starts_with("HTTP/1.1 404") && r.contains("/extra"), "{r}");
        stop.send(()).unwrap();
        task.await.unwrap();
    }
}
