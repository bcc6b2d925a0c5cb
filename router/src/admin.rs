//! Admin endpoints on the proxy's own port: `GET /healthz`, `/readyz`, `/metrics`,
//! `/table`. One port keeps deployment simple (one Service port, one probe target); a GET
//! that is not gRPC on one of these paths can never be a payment call, so the split is
//! unambiguous.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use prometheus::{Encoder, TextEncoder};

use crate::body::RespBody;
use crate::proxy::Shared;

const PATHS: [&str; 4] = ["/healthz", "/readyz", "/metrics", "/table"];

/// Whether `req` is an admin request rather than a call to proxy.
pub(crate) fn is_admin<B>(req: &Request<B>) -> bool {
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    req.method() == Method::GET && !grpc && PATHS.contains(&req.uri().path())
}

pub(crate) fn handle<B>(s: &Shared, req: &Request<B>) -> Response<RespBody> {
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match s.table.current() {
            Some(t) => text(
                StatusCode::OK,
                format!("ready: routing table epoch {}\n", t.epoch),
            ),
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: no routing table yet\n".into(),
            ),
        },
        "/metrics" => {
            s.table.update_age_gauge();
            let mut buf = Vec::new();
            let encoder = TextEncoder::new();
            match encoder.encode(&s.registry.gather(), &mut buf) {
                Ok(()) => respond(StatusCode::OK, encoder.format_type(), buf),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot encode metrics: {e}\n"),
                ),
            }
        }
        "/table" => match s.table.current() {
            Some(t) => match serde_json::to_vec_pretty(&*t) {
                Ok(json) => respond(StatusCode::OK, "application/json", json),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot encode the table: {e}\n"),
                ),
            },
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no routing table yet\n".into(),
            ),
        },
        _ => not_grpc(),
    }
}

/// Answer to an HTTP/1 request that is not an admin GET.
pub(crate) fn not_grpc() -> Response<RespBody> {
    text(
        StatusCode::NOT_FOUND,
        "this port proxies gRPC over HTTP/2 (cleartext, prior knowledge) and serves \
         GET /healthz, /readyz, /metrics and /table\n"
            .into(),
    )
}

fn text(status: StatusCode, body: String) -> Response<RespBody> {
    respond(status, "text/plain; charset=utf-8", body.into_bytes())
}

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<RespBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}
