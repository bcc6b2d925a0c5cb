//! Admin endpoints on the admin port (never the client port): `GET /healthz`, `/readyz`,
//! `/metrics`, `/table`. Read-only: nothing here changes the router.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use prometheus::{Encoder, TextEncoder};

use crate::body::RespBody;
use crate::proxy::Shared;

pub(crate) fn handle<B>(s: &Shared, req: &Request<B>) -> Response<RespBody> {
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "the admin port serves GET only\n".into(),
        );
    }
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
        _ => text(
            StatusCode::NOT_FOUND,
            "the admin port serves GET /healthz, /readyz, /metrics and /table\n".into(),
        ),
    }
}

/// Answer to an HTTP/1 request on the traffic port.
pub(crate) fn not_grpc() -> Response<RespBody> {
    text(
        StatusCode::NOT_FOUND,
        "this port proxies gRPC over HTTP/2; probes, metrics and the table are on the \
         router's admin port\n"
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
