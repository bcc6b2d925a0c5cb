//! Active health probes: a gRPC health check sent over the endpoint's own connection.
//!
//! A TCP connect proves only that a socket is open; a cell whose writer is stuck (or a
//! process stopped with SIGSTOP, whose kernel still completes handshakes) passes it while
//! every payment times out. The probe asks the cell's `grpc.health.v1.Health/Check`, which
//! reports SERVING only while the cell's writer makes progress (see `ldc_cell::health`),
//! on the same mutual-TLS HTTP/2 connection the traffic uses, so a connection that hangs
//! is found as well. The router still never decodes payment bodies: the probe is the one
//! message it builds and reads itself, with `prost`.

use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{Request, Uri, Version, header};
use http_body_util::BodyExt;

use crate::balance::Endpoint;
use crate::body::ReplayBody;
use crate::upstream::Connect;

/// The method every component's health service answers.
pub const HEALTH_CHECK_PATH: &str = "/grpc.health.v1.Health/Check";
/// Largest health answer read (a status is a few bytes).
const ANSWER_BYTES_MAX: usize = 256;
/// `grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING`.
const SERVING: i32 = 1;

/// `grpc.health.v1.HealthCheckResponse`: only its status.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Serving,
    /// The endpoint answered, and said it cannot serve (or answered nonsense).
    NotServing(String),
    /// No answer: connect failure, a broken connection, or the timeout.
    Failed(String),
}

/// Probes `ep` (served by the cell `how.cell` names) within `timeout`.
pub async fn probe(ep: &Endpoint, how: &Connect<'_>, timeout: Duration) -> Probe {
    let Ok(uri) = Uri::try_from(format!("http://{}{HEALTH_CHECK_PATH}", ep.addr())) else {
        return Probe::Failed(format!("{:?} is not host:port", ep.addr()));
    };
    let mut req = Request::new(ReplayBody::from_bytes(Bytes::from_static(&[0; 5])));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_2;
    let h = req.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        "application/grpc".parse().expect("valid"),
    );
    h.insert(header::TE, "trailers".parse().expect("valid"));
    h.insert(
        "grpc-timeout",
        format!("{}m", timeout.as_millis()).parse().expect("valid"),
    );
    let call = async {
        let resp = ep
            .upstream()
            .send(ep.addr(), how, req)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let head_status = grpc_status(resp.headers());
        let limited = http_body_util::Limited::new(resp.into_body(), ANSWER_BYTES_MAX);
        let collected = limited.collect().await.map_err(|e| e.to_string())?;
        let status = collected.trailers().and_then(grpc_status).or(head_status);
        Ok::<_, String>((status, collected.to_bytes()))
    };
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Probe::Failed(format!("no health answer within {timeout:?}")),
        Ok(Err(e)) => Probe::Failed(e),
        Ok(Ok((status, body))) => judge(status, body),
    }
}

fn grpc_status(h: &http::HeaderMap) -> Option<u32> {
    h.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// Pure: the verdict on a health answer with gRPC status `status` and body `body` (one
/// length-prefixed message).
pub fn judge(status: Option<u32>, mut body: Bytes) -> Probe {
    match status {
        Some(0) => {}
        Some(code) => return Probe::NotServing(format!("health check answered gRPC code {code}")),
        None => return Probe::NotServing("health answer without a gRPC status".into()),
    }
    if body.len() < 5 || body[0] != 0 {
        return Probe::NotServing("malformed health answer".into());
    }
    body.advance(1);
    let len = body.get_u32() as usize;
    if len != body.len() {
        return Probe::NotServing("malformed health answer".into());
    }
    match <HealthCheckResponse as prost::Message>::decode(body) {
        Ok(r) if r.status == SERVING => Probe::Serving,
        Ok(r) => Probe::NotServing(format!("health status {}", r.status)),
        Err(_) => Probe::NotServing("malformed health answer".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(msg: &[u8]) -> Bytes {
        let mut v = vec![0];
        v.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        v.extend_from_slice(msg);
        Bytes::from(v)
    }

    #[test]
    fn serving_only_for_an_ok_answer_saying_serving() {
        assert_eq!(judge(Some(0), framed(&[0x08, 0x01])), Probe::Serving);
        assert!(matches!(
            judge(Some(0), framed(&[0x08, 0x02])),
            Probe::NotServing(_)
        ));
        // Status 0 (UNKNOWN) is the empty message.
        assert!(matches!(judge(Some(0), framed(&[])), Probe::NotServing(_)));
        assert!(matches!(
            judge(Some(14), framed(&[0x08, 0x01])),
            Probe::NotServing(_)
        ));
        assert!(matches!(
            judge(None, framed(&[0x08, 0x01])),
            Probe::NotServing(_)
        ));
    }

    #[test]
    fn malformed_answers_are_not_serving() {
        assert!(matches!(judge(Some(0), Bytes::new()), Probe::NotServing(_)));
        assert!(matches!(
            judge(Some(0), Bytes::from_static(&[1, 0, 0, 0, 0])),
            Probe::NotServing(_)
        ));
        let mut long = framed(&[0x08, 0x01]).to_vec();
        long.push(0);
        assert!(matches!(
            judge(Some(0), Bytes::from(long)),
            Probe::NotServing(_)
        ));
        assert!(matches!(
            judge(Some(0), framed(&[0xff])),
            Probe::NotServing(_)
        ));
    }
}
