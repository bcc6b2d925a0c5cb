//! One proxied request: parse the routing headers, decide the endpoint, forward, and retry
//! once after a "moved" answer.
//!
//! The order matters for safety: every check that can refuse a request runs before
//! anything is sent, and the only retry is after a "moved" answer, which a cell gives
//! before doing anything.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{CONNECTION, HOST, HeaderName, TRANSFER_ENCODING, UPGRADE};
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use ldc_core::routing::{Colour, RouteError, RoutingTable, colour_for};
use ldc_core::{COLOUR_HEADER, REQUEST_ID_HEADER, USER_HEADER};
use ldc_security::Identity;
use tokio::time::Sleep;
use tracing::Instrument;

use crate::RouterConfig;
use crate::auth::{self, EdgeSecurity};
use crate::balance::{Balancer, Endpoint, InFlight};
use crate::body::{Completion, ReplayBody, RespBody, UpstreamBody, buffer};
use crate::grpc::{self, Code, Moved};
use crate::metrics::RouterMetrics;
use crate::table::TableHandle;
use crate::upstream::SendError;

// Header names as constants: looking a header up by `&str` parses and validates the
// name on every call (it showed in profiles); these are checked once, at compile time.
const USER: HeaderName = HeaderName::from_static(USER_HEADER);
const COLOUR: HeaderName = HeaderName::from_static(COLOUR_HEADER);
const REQUEST_ID: HeaderName = HeaderName::from_static(REQUEST_ID_HEADER);
const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// What every request handler shares.
pub(crate) struct Shared {
    pub table: TableHandle,
    pub config: RouterConfig,
    pub metrics: RouterMetrics,
    pub balancer: Balancer,
    pub registry: prometheus::Registry,
    pub security: crate::auth::EdgeSecurity,
    /// Request-body bytes buffered for replay, router-wide (`buffered_bytes_max`).
    pub buffer_budget: Arc<tokio::sync::Semaphore>,
    /// Requests in flight per client (`client_in_flight_max`).
    pub clients: Arc<crate::clients::InFlightByClient>,
}

/// An answer the router makes itself.
#[derive(Debug)]
pub(crate) struct Fail {
    code: Code,
    /// Stable label for `ldc_router_errors_total{reason}`.
    reason: &'static str,
    message: String,
    cell: Option<String>,
    colour: Option<Colour>,
}

impl Fail {
    pub(crate) fn new(code: Code, reason: &'static str, message: impl Into<String>) -> Fail {
        Fail {
            code,
            reason,
            message: message.into(),
            cell: None,
            colour: None,
        }
    }

    /// The stable label of this refusal.
    #[cfg(test)]
    pub(crate) fn reason(&self) -> &'static str {
        self.reason
    }

    fn at(mut self, d: &Decision<'_>) -> Fail {
        self.cell = Some(d.cell.to_string());
        self.colour = Some(d.colour);
        self
    }
}

/// Where a request goes; borrows from the routing table it was decided with (no copies
/// per request).
#[derive(Debug, Clone)]
struct Decision<'t> {
    shard: u32,
    cell: &'t str,
    colour: Colour,
    endpoints: &'t [String],
    table_epoch: u64,
}

/// What the router routes on, from the request headers.
#[derive(Debug, Clone)]
struct RouteKey {
    user: String,
    forced: Option<Colour>,
}

/// The request line and headers, kept to build each attempt.
struct Head {
    method: Method,
    path_and_query: PathAndQuery,
    headers: HeaderMap,
    /// The deadline is the router's own request timeout, not a shorter one the client
    /// asked for: only then does a timeout say something about the endpoint (outliers).
    own_deadline: bool,
}

/// Entry point for requests that are not admin requests.
pub(crate) async fn proxy(
    s: Arc<Shared>,
    req: Request<Incoming>,
    peer: Option<Arc<Identity>>,
) -> Response<RespBody> {
    let started = Instant::now();
    let (mut parts, body) = req.into_parts();
    let request_id = match parts.headers.get(&REQUEST_ID) {
        Some(v) => v.clone(),
        None => {
            let v = new_request_id();
            parts.headers.insert(REQUEST_ID, v.clone());
            v
        }
    };
    // DEBUG: formatting seven span fields per request costs more than routing it;
    // `LDC_LOG=ldc_router=debug` turns request spans on.
    let span = tracing::debug_span!(
        "route",
        request_id = %String::from_utf8_lossy(request_id.as_bytes()),
        path = %parts.uri.path(),
        user = tracing::field::Empty,
        shard = tracing::field::Empty,
        cell = tracing::field::Empty,
        colour = tracing::field::Empty,
        endpoint = tracing::field::Empty,
    );
    let result = route(&s, parts, body, peer.as_deref(), started)
        .instrument(span)
        .await;
    match result {
        Ok(resp) => resp,
        Err(fail) => {
            tracing::debug!(code = fail.code.name(), reason = fail.reason, message = %fail.message, "router answered with an error");
            s.metrics
                .router_errors
                .with_label_values(&[fail.reason])
                .inc();
            if matches!(fail.code, Code::Unauthenticated | Code::PermissionDenied) {
                s.metrics
                    .auth_refusals
                    .with_label_values(&[fail.code.name(), fail.reason])
                    .inc();
            }
            s.metrics
                .requests
                .with_label_values(&[
                    fail.cell.as_deref().unwrap_or("-"),
                    fail.colour.map_or("-", Colour::as_str),
                    fail.code.name(),
                ])
                .inc();
            grpc::error_response(fail.code, &fail.message, Some(&request_id))
        }
    }
}

/// A random request id: 16 hex digits.
fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = rand::random::<u64>();
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = HEX[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id).expect("hex is a valid header value")
}

/// The request's upstream deadline: one timer for the whole request (body read, each
/// attempt, then the response body), registered once instead of once per phase.
type Deadline = Pin<Box<Sleep>>;

/// Runs `fut` unless `deadline` passes first.
async fn before<F: Future>(deadline: &mut Deadline, fut: F) -> Option<F::Output> {
    tokio::select! {
        biased;
        out = fut => Some(out),
        () = deadline.as_mut() => None,
    }
}

async fn route(
    s: &Shared,
    parts: http::request::Parts,
    body: Incoming,
    peer: Option<&Identity>,
    started: Instant,
) -> Result<Response<RespBody>, Fail> {
    check_header_size(&parts.headers, s.config.header_bytes_max)?;
    auth::public_method(parts.uri.path())?;
    let principal = match &s.security {
        EdgeSecurity::Tls { tokens, .. } => {
            Some(auth::authenticate(&parts.headers, peer, tokens.as_deref())?)
        }
        EdgeSecurity::Insecure => None,
    };
    let table = s.table.current().ok_or_else(|| {
        Fail::new(
            Code::Unavailable,
            "no_table",
            "router has no routing table yet; it is waiting for its table source \
             (the store key sys/routing, published by `ldc up` or the operator); retry shortly",
        )
    })?;
    let key = route_key(&parts.headers)?;
    if let Some(p) = &principal {
        ldc_core::authz::authorize(p, parts.uri.path(), &key.user).map_err(auth::denied)?;
    }
    let client = match &principal {
        Some(p) => Some(s.clients.enter(p.label()).ok_or_else(|| {
            Fail::new(
                Code::ResourceExhausted,
                "client_in_flight",
                format!(
                    "{} has {} requests in flight at this router, its limit; wait for \
                     answers, or retry after a short backoff with the same idempotency key \
                     (nothing was sent to a cell)",
                    ldc_core::quote_prefix(&p.label(), 64),
                    s.clients.max()
                ),
            )
        })?),
        None => None,
    };
    let span = tracing::Span::current();
    span.record("user", key.user.as_str());
    let timeout = upstream_timeout(&parts.headers, s.config.request_timeout);
    let mut deadline: Deadline = Box::pin(tokio::time::sleep(timeout));

    let head = Head {
        method: parts.method,
        path_and_query: parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
        headers: {
            let mut h = forward_headers(parts.headers);
            auth::forward_principal(&mut h, principal.as_ref());
            h
        },
        own_deadline: timeout >= s.config.request_timeout,
    };

    // Read the (small, unary) body first, so it can be sent again after "moved".
    let mut body = match before(
        &mut deadline,
        buffer(body, s.config.retry_body_bytes_max, &s.buffer_budget),
    )
    .await
    {
        None => {
            return Err(Fail::new(
                Code::DeadlineExceeded,
                "client_body_timeout",
                format!(
                    "the request body did not arrive within {timeout:?}; nothing was sent to a cell"
                ),
            ));
        }
        Some(Err(e)) => {
            return Err(Fail::new(
                Code::Cancelled,
                "client_body",
                format!("reading the request body failed: {e}; nothing was sent to a cell"),
            ));
        }
        Some(Ok(b)) => b,
    };

    let first = decide(&table, &key)?;
    record(&span, &first);
    let send_body = body.take_body().expect("a fresh body can be sent");
    let (resp, guard) = send(s, &head, send_body, &first, &mut deadline).await?;

    let Some(moved) = grpc::moved(resp.headers()) else {
        return Ok(respond(s, resp, guard, &first, started, deadline, client));
    };
    if !body.replayable() {
        tracing::info!(owner = %moved.owner, "cell answered moved; body too large to replay, returning the answer");
        return Ok(respond(s, resp, guard, &first, started, deadline, client));
    }
    drop(resp);
    drop(guard);
    s.metrics.moved_retries.inc();
    tracing::info!(refused_by = %first.cell, owner = %moved.owner, owner_epoch = ?moved.epoch, "cell answered moved; refreshing the table and retrying once");

    let table = refresh(s, &table, &first, &moved, deadline.deadline()).await;
    let second = decide_after_moved(&table, &key, &first, &moved)?;
    record(&span, &second);
    let send_body = body
        .take_body()
        .expect("a replayable body can be sent again");
    let (resp, guard) = send(s, &head, send_body, &second, &mut deadline).await?;
    Ok(respond(s, resp, guard, &second, started, deadline, client))
}

fn record(span: &tracing::Span, d: &Decision<'_>) {
    span.record("shard", d.shard);
    span.record("cell", d.cell);
    span.record("colour", d.colour.as_str());
}

/// Refuses requests whose headers exceed the limit (names plus values, in bytes).
fn check_header_size(headers: &HeaderMap, max: usize) -> Result<(), Fail> {
    let size: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if size > max {
        return Err(Fail::new(
            Code::ResourceExhausted,
            "headers_too_large",
            format!("request headers are {size} bytes; the router accepts at most {max}"),
        ));
    }
    Ok(())
}

/// Reads `x-ldc-user` and `x-ldc-colour`.
fn route_key(headers: &HeaderMap) -> Result<RouteKey, Fail> {
    let forced = match headers.get(&COLOUR) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.parse::<Colour>().ok())
                .ok_or_else(|| {
                    Fail::new(
                        Code::InvalidArgument,
                        "bad_colour_header",
                        format!(
                            "header {COLOUR_HEADER} is {:?}; use blue or green",
                            String::from_utf8_lossy(v.as_bytes())
                        ),
                    )
                })?,
        ),
    };
    if let Some(v) = headers.get(&USER) {
        let user = v.to_str().map_err(|_| {
            Fail::new(
                Code::InvalidArgument,
                "bad_user_header",
                format!("header {USER_HEADER} is not plain ASCII; set it to the user id"),
            )
        })?;
        ldc_core::shard::validate_user_id(user).map_err(|e| {
            Fail::new(
                Code::InvalidArgument,
                "bad_user_header",
                format!("header {USER_HEADER}: {e}"),
            )
        })?;
        return Ok(RouteKey {
            user: user.to_string(),
            forced,
        });
    }
    Err(Fail::new(
        Code::InvalidArgument,
        "missing_user_header",
        format!("request has no {USER_HEADER} header; set it to the user id the call is for"),
    ))
}

/// The router's upstream deadline: the configured timeout, shortened by the client's
/// `grpc-timeout` if that is smaller.
fn upstream_timeout(headers: &HeaderMap, configured: Duration) -> Duration {
    headers
        .get(&GRPC_TIMEOUT)
        .and_then(|v| parse_grpc_timeout(v.as_bytes()))
        .map_or(configured, |t| t.min(configured))
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Removes headers that are specific to one hop (HTTP/2 forbids them anyway).
fn forward_headers(mut h: HeaderMap) -> HeaderMap {
    for name in [
        CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        TRANSFER_ENCODING,
        UPGRADE,
        HOST,
    ] {
        h.remove(name);
    }
    h
}

/// Routes with `table`. A forced colour the cell does not allow is ignored (the split
/// decides): a stray test header must never break production traffic.
fn decide<'t>(table: &'t RoutingTable, key: &RouteKey) -> Result<Decision<'t>, Fail> {
    let routed = match table.route_user(&key.user, key.forced) {
        Err(RouteError::ForcedColourRefused { cell, colour }) => {
            tracing::debug!(%cell, %colour, "forced colour not allowed for this cell; ignoring the header");
            table.route_user(&key.user, None)
        }
        other => other,
    };
    match routed {
        Ok(r) => Ok(Decision {
            shard: r.shard,
            cell: r.cell,
            colour: r.colour,
            endpoints: r.endpoints,
            table_epoch: table.epoch,
        }),
        Err(e) => Err(Fail::new(
            Code::Internal,
            "table_inconsistent",
            format!("routing table epoch {} cannot route: {e}", table.epoch),
        )),
    }
}

/// Routes the retry after a "moved" answer. Normally the refreshed table names the new
/// owner. If it still names the cell that refused, the cell's own answer is better
/// information (it read the ownership record): route to the owner it named, if the table
/// describes that cell. The owner fences every write, so a stale hint is still safe.
fn decide_after_moved<'t>(
    table: &'t RoutingTable,
    key: &RouteKey,
    refused: &Decision<'_>,
    moved: &Moved,
) -> Result<Decision<'t>, Fail> {
    let d = decide(table, key)?;
    if d.cell != refused.cell || moved.owner == refused.cell {
        return Ok(d);
    }
    let Some((owner_name, owner)) = table.cells.get_key_value(&moved.owner) else {
        return Ok(d);
    };
    let colour = match key.forced {
        Some(c) if owner.allow_forced_colour => c,
        _ => colour_for(&key.user, owner.green_weight_bp),
    };
    tracing::info!(owner = %moved.owner, "table still names the refusing cell; following the cell's moved hint");
    Ok(Decision {
        shard: d.shard,
        cell: owner_name.as_str(),
        colour,
        endpoints: owner.endpoints(colour),
        table_epoch: table.epoch,
    })
}

/// After "moved": ask the source for a fresh table and wait (bounded) for one that no
/// longer sends this shard to the refusing cell at an old epoch.
async fn refresh(
    s: &Shared,
    old: &Arc<RoutingTable>,
    refused: &Decision<'_>,
    moved: &Moved,
    deadline: tokio::time::Instant,
) -> Arc<RoutingTable> {
    if !s.table.has_source() {
        return s.table.current().unwrap_or_else(|| old.clone());
    }
    s.table.request_refresh();
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let wait = s.config.moved_refresh_wait.min(left);
    let shard = refused.shard as usize;
    let t = s
        .table
        .wait_for(wait, |t| {
            t.epoch > refused.table_epoch
                && t.shards.get(shard).is_some_and(|r| {
                    r.cell != refused.cell || moved.epoch.is_some_and(|e| r.epoch >= e)
                })
        })
        .await
        .unwrap_or_else(|| old.clone());
    if t.epoch == refused.table_epoch {
        tracing::info!(
            epoch = t.epoch,
            "no newer routing table arrived in time; retrying with the current one"
        );
    }
    t
}

/// Sends one attempt to an endpoint chosen in `d`.
async fn send(
    s: &Shared,
    head: &Head,
    body: ReplayBody,
    d: &Decision<'_>,
    deadline: &mut Deadline,
) -> Result<(Response<Incoming>, InFlight), Fail> {
    let ep = pick(s, d)?;
    tracing::Span::current().record("endpoint", ep.addr());
    let authority = ep.authority().cloned().ok_or_else(|| {
        Fail::new(
            Code::Internal,
            "bad_endpoint",
            format!(
                "cell {} lists endpoint {:?}, which is not host:port",
                d.cell,
                ep.addr()
            ),
        )
        .at(d)
    })?;
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(authority);
    uri.path_and_query = Some(head.path_and_query.clone());
    let uri = Uri::from_parts(uri).map_err(|e| {
        Fail::new(
            Code::Internal,
            "bad_endpoint",
            format!("cell {} endpoint {:?}: {e}", d.cell, ep.addr()),
        )
        .at(d)
    })?;
    let mut req = Request::new(body);
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_2;
    *req.headers_mut() = head.headers.clone();

    let guard = ep.start();
    let how = crate::upstream::Connect {
        timeout: s.config.connect_timeout,
        tls: match &s.security {
            EdgeSecurity::Tls { upstream, .. } => Some(&**upstream),
            EdgeSecurity::Insecure => None,
        },
        cell: d.cell,
    };
    let sent = ep.upstream().send(ep.addr(), &how, req);
    match before(deadline, sent).await {
        Some(Ok(resp)) => {
            s.balancer.restore(&ep);
            Ok((resp, guard))
        }
        Some(Err(SendError::Connect(e))) => {
            s.balancer.eject(&ep, Instant::now());
            Err(Fail::new(
                Code::Unavailable,
                "connect",
                format!(
                    "cannot connect to cell {} ({} endpoint {}): {}; nothing reached the cell, \
                     it is safe to retry",
                    d.cell,
                    d.colour,
                    ep.addr(),
                    e
                ),
            )
            .at(d))
        }
        Some(Err(SendError::Upstream(e))) => {
            s.balancer.outlier(&ep, Instant::now());
            Err(Fail::new(
            Code::Unavailable,
            "upstream",
            format!(
                "the connection to cell {} ({} endpoint {}) failed after the request was sent: {}; \
                 it may have been applied, retry with the same idempotency key",
                d.cell,
                d.colour,
                ep.addr(),
                error_chain(&e)
            ),
        )
        .at(d))
        }
        None => {
            if head.own_deadline {
                s.balancer.outlier(&ep, Instant::now());
            }
            Err(Fail::new(
                Code::DeadlineExceeded,
                "upstream_timeout",
                format!(
                    "cell {} ({} endpoint {}) did not answer before the deadline; \
                 the request may have been applied, retry with the same idempotency key",
                    d.cell,
                    d.colour,
                    ep.addr()
                ),
            )
            .at(d))
        }
    }
}

fn pick(s: &Shared, d: &Decision<'_>) -> Result<Arc<Endpoint>, Fail> {
    if d.endpoints.is_empty() {
        return Err(Fail::new(
            Code::Unavailable,
            "no_endpoint",
            format!(
                "cell {} has no {} endpoints in routing table epoch {}",
                d.cell, d.colour, d.table_epoch
            ),
        )
        .at(d));
    }
    s.balancer
        .pick(d.endpoints, Instant::now(), &mut rand::rng())
        .ok_or_else(|| {
            Fail::new(
                Code::Unavailable,
                "no_healthy_endpoint",
                format!(
                    "cell {} has no healthy {} endpoint: all {} are ejected after failed \
                     connections; the health check brings them back when they accept \
                     connections again",
                    d.cell,
                    d.colour,
                    d.endpoints.len()
                ),
            )
            .at(d)
        })
}

/// Streams the cell's answer back, recording its outcome when it ends.
fn respond(
    s: &Shared,
    resp: Response<Incoming>,
    guard: InFlight,
    d: &Decision<'_>,
    started: Instant,
    deadline: Deadline,
    client: Option<crate::clients::ClientGuard>,
) -> Response<RespBody> {
    let (parts, body) = resp.into_parts();
    let metrics = guard
        .endpoint()
        .cell_metrics(&s.metrics, d.cell, d.colour.as_str());
    let mut completion = Completion::new(metrics, started, Some(guard));
    if let Some(code) = grpc::status_label(&parts.headers) {
        completion.set_code(code);
    }
    let body = UpstreamBody::new(body, deadline, completion).boxed_unsync();
    // The client's request counts until its answer has streamed back.
    let body = match client {
        Some(c) => crate::body::Guarded::wrap(body, c),
        None => body,
    };
    Response::from_parts(parts, body)
}

/// An error and its sources, as one line (hyper-util's own message is only the kind).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(
            parse_grpc_timeout(b"100m"),
            Some(Duration::from_millis(100))
        );
        assert_eq!(parse_grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout(b"m"), None);
        assert_eq!(parse_grpc_timeout(b"123456789m"), None);
        assert_eq!(parse_grpc_timeout(b"10x"), None);
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", HeaderValue::from_static("50m"));
        assert_eq!(
            upstream_timeout(&h, Duration::from_secs(5)),
            Duration::from_millis(50)
        );
        h.insert("grpc-timeout", HeaderValue::from_static("60S"));
        assert_eq!(
            upstream_timeout(&h, Duration::from_secs(5)),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn route_keys() {
        let mut h = HeaderMap::new();
        let e = route_key(&h).unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
        assert!(e.message.contains(USER_HEADER), "{}", e.message);

        h.insert(USER_HEADER, HeaderValue::from_static("a/b"));
        assert_eq!(route_key(&h).unwrap_err().reason, "bad_user_header");

        h.insert(USER_HEADER, HeaderValue::from_static("alice"));
        h.insert(COLOUR_HEADER, HeaderValue::from_static("green"));
        let k = route_key(&h).unwrap();
        assert_eq!(k.user, "alice");
        assert_eq!(k.forced, Some(Colour::Green));

        h.insert(COLOUR_HEADER, HeaderValue::from_static("purple"));
        assert_eq!(route_key(&h).unwrap_err().reason, "bad_colour_header");

        // Routing by shard number was for the relay, which no longer passes the router.
        let mut h = HeaderMap::new();
        h.insert("x-ldc-shard", HeaderValue::from_static("42"));
        assert_eq!(route_key(&h).unwrap_err().reason, "missing_user_header");
    }

    #[test]
    fn header_limit() {
        let mut h = HeaderMap::new();
        h.insert("x-big", HeaderValue::from_str(&"a".repeat(100)).unwrap());
        assert!(check_header_size(&h, 200).is_ok());
        assert_eq!(
            check_header_size(&h, 50).unwrap_err().code,
            Code::ResourceExhausted
        );
    }
}
