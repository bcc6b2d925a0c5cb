//! # ldc-router: the routing gateway that pins users to their cell
//!
//! Every payment request names its user in the `x-ldc-user` header (cell-to-cell relay
//! traffic may name a shard in `x-ldc-shard` instead). The router maps user → shard →
//! owning cell → colour (the sticky blue/green split) → one endpoint, and forwards the
//! request there over HTTP/2 cleartext. It never decodes a protobuf body: it stays thin,
//! fast, and independent of the API's evolution. Responses (headers, body, trailers) are
//! streamed back untouched.
//!
//! Why it is shaped this way:
//!
//! * **The table is a value with an epoch** ([`TableHandle`]). A new table is taken only if
//!   its epoch is higher, so routing never goes backwards, even if sources race.
//! * **Wrong cell is a cheap, safe error** (DESIGN §2.4). A cell that no longer owns a shard
//!   answers UNAVAILABLE with `ldc-moved-owner` / `ldc-moved-epoch` before doing anything.
//!   The router then asks its table source for a fresher table and retries exactly once.
//!   That is the *only* retry: anything else may have been applied, so it goes back to the
//!   client as is (payment commands carry idempotency keys; the client decides).
//! * **Errors the router makes are gRPC errors** with precise messages, so a client sees
//!   one error model whether the cell or the router refused.
//! * **A limit on everything**: header bytes, buffered body bytes, upstream time,
//!   connections, the moved-refresh wait.
//!
//! ## The router's own answers
//!
//! All are gRPC errors (HTTP 200, `application/grpc`, trailers-only), counted in
//! `ldc_router_errors_total{reason}`:
//!
//! | situation | code | reason label |
//! |---|---|---|
//! | no routing table yet | UNAVAILABLE | `no_table` |
//! | `x-ldc-user` missing, malformed, or not a valid user id | INVALID_ARGUMENT | `missing_user_header`, `bad_user_header` |
//! | `x-ldc-shard` not a number / `x-ldc-colour` not blue or green | INVALID_ARGUMENT | `bad_shard_header`, `bad_colour_header` |
//! | shard number beyond the table (the count is fixed per platform, so it names nothing) | NOT_FOUND | `unknown_shard` |
//! | request headers over `header_bytes_max` | RESOURCE_EXHAUSTED | `headers_too_large` |
//! | the client already has `client_in_flight_max` requests in flight | RESOURCE_EXHAUSTED | `client_in_flight` |
//! | the colour lists no endpoints / all are ejected (names cell and colour) | UNAVAILABLE | `no_endpoint`, `no_healthy_endpoint` |
//! | connect to the endpoint failed (nothing reached the cell: safe to retry) | UNAVAILABLE | `connect` |
//! | connection failed after the request was sent (may have been applied) | UNAVAILABLE | `upstream` |
//! | no answer before the deadline (may have been applied; never retried) | DEADLINE_EXCEEDED | `upstream_timeout` |
//!
//! A forced colour (`x-ldc-colour`) on a cell that does not allow it is ignored, not
//! refused: a stray test header must never break real traffic.
//!
//! ## Layout
//!
//! * [`table`]: [`TableHandle`] (the current table, epoch-monotone) and [`poll_store`], the
//!   table source of the single-machine platform.
//! * [`balance`]: endpoint choice within a colour (power of two choices on in-flight
//!   requests) and passive ejection with backoff; pure over an injected clock and RNG.
//! * [`grpc`]: the router's own gRPC error answers and the "moved" detection.
//! * [`body`]: the replayable request body and the observed, deadline-bound response body.
//! * `proxy`: one request, from headers to the upstream answer (and the single retry).
//! * `admin`: `/healthz`, `/readyz`, `/metrics`, `/table` on the same listener.
//! * `server`: [`serve`], the accept loop (HTTP/1.1 + HTTP/2 on one port) and the active
//!   health checker.
//! * `upstream`: the HTTP/2 connections to each endpoint (a few per endpoint, shared by
//!   all requests, no pool lookup per request).
//! * [`metrics`]: the Prometheus metrics.
//! * `kube_source` (feature `kube`): follows the operator's routing ConfigMap.
#![forbid(unsafe_code)]

mod admin;
pub mod auth;
pub mod balance;
pub mod body;
mod clients;
pub mod grpc;
#[cfg(feature = "kube")]
pub mod kube_source;
pub mod metrics;
mod probe;
mod proxy;
mod server;
mod slots;
pub mod table;
mod upstream;

use std::time::Duration;

use thiserror::Error;

pub use auth::EdgeSecurity;
pub use server::{Listeners, serve};
pub use table::{TableHandle, poll_store};

/// How a router behaves. Every field is a limit or a period; the defaults suit the
/// single-machine platform and a small cluster.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Longest time one upstream call may take, from sending the request to the end of the
    /// response (also capped by the client's `grpc-timeout`). Default 5 s.
    pub request_timeout: Duration,
    /// Longest time to establish a TCP connection to an endpoint. A connect failure is safe
    /// (nothing reached the cell) and ejects the endpoint. Default 1 s.
    pub connect_timeout: Duration,
    /// Most bytes of request header names and values the router accepts. Default 8 KiB.
    pub header_bytes_max: usize,
    /// Most request-body bytes buffered so the request can be replayed after a "moved"
    /// answer. Larger bodies are streamed and cannot be retried. Default 1 MiB.
    pub retry_body_bytes_max: usize,
    /// Longest time a request waits for a fresher table after a "moved" answer before it
    /// retries with what it has. Default 1 s.
    pub moved_refresh_wait: Duration,
    /// Period of the active health check (a gRPC health call to each endpoint of the
    /// table, which reports the cell's writer progress). Default 1 s.
    pub health_check_interval: Duration,
    /// How long one health probe may take. Default 500 ms.
    pub health_check_timeout: Duration,
    /// First ejection period after a connect failure; doubles on each consecutive
    /// failure up to `ejection_max`. Default 1 s.
    pub ejection_base: Duration,
    /// Longest ejection period. Default 30 s.
    pub ejection_max: Duration,
    /// Most client connections served at once; when all are taken, the longest-idle one
    /// gives way to a new one. Default 10 000.
    pub connections_max: usize,
    /// Most concurrent requests (HTTP/2 streams) per client connection. Default 256.
    pub streams_per_connection_max: u32,
    /// Most requests in flight per client (authenticated principal), over all its
    /// connections; more are refused with RESOURCE_EXHAUSTED. Default 1024.
    pub client_in_flight_max: usize,
    /// Most request-body bytes buffered for replay across all requests at once; a body
    /// that does not fit is streamed (not replayable). Default 64 MiB.
    pub buffered_bytes_max: usize,
    /// How long `serve` waits for in-flight requests after shutdown. Default 10 s.
    pub drain_timeout: Duration,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            header_bytes_max: 8 * 1024,
            retry_body_bytes_max: 1024 * 1024,
            moved_refresh_wait: Duration::from_secs(1),
            health_check_interval: Duration::from_secs(1),
            health_check_timeout: Duration::from_millis(500),
            ejection_base: Duration::from_secs(1),
            ejection_max: Duration::from_secs(30),
            connections_max: 10_000,
            streams_per_connection_max: 256,
            client_in_flight_max: 1024,
            buffered_bytes_max: 64 * 1024 * 1024,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Why the router could not run.
#[derive(Debug, Error)]
pub enum RouterError {
    #[error("cannot register router metrics: {0}; is another router using this registry?")]
    Metrics(#[from] prometheus::Error),
    #[error("listener failed: {0}")]
    Io(#[from] std::io::Error),
}

impl RouterError {
    /// A stable label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            RouterError::Metrics(_) => "metrics",
            RouterError::Io(_) => "io",
        }
    }
}
