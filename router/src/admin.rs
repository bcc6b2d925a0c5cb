//! Admin endpoints on the admin port (never the client port): `GET /healthz`, `/readyz`,
//! `/metrics`, `/table`. Read-only: nothing here changes the router.

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use ldc_admin::{Reply, reply, text};

use crate::body::RespBody;
use crate::proxy::Shared;

pub(crate) fn handle<B>(s: &Shared, req: &Request<B>) -> Reply {
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "the admin port serves GET only\n",
        );
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match s.table.current() {
            Some(t) => text(
                StatusCode::OK,
                format!("ready: routing table epoch {}\n", t.epoch),
            ),
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: no routing table yet\n",
            ),
        },
        "/metrics" => {
            s.table.update_age_gauge();
            ldc_admin::metrics(&s.registry)
        }
        "/table" => match s.table.current() {
            Some(t) => match serde_json::to_vec_pretty(&*t) {
                Ok(json) => reply(StatusCode::OK, "application/json", json),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot encode the table: {e}\n"),
                ),
            },
            None => text(StatusCode::SERVICE_UNAVAILABLE, "no routing table yet\n"),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "the admin port serves GET /healthz, /readyz, /metrics and /table\n",
        ),
    }
}

/// Answer to an HTTP/1 request on the traffic port.
pub(crate) fn not_grpc() -> Response<RespBody> {
    let r = text(
        StatusCode::NOT_FOUND,
        "this port proxies gRPC over HTTP/2; probes, metrics and the table are on the \
         router's admin port\n",
    );
    r.map(|b| b.map_err(|never| match never {}).boxed_unsync())
}
