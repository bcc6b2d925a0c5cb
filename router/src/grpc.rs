//! The little of gRPC the router needs, without decoding bodies: status codes, its own
//! error answers (trailers-only responses), and recognising a cell's "moved" answer.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty};

use crate::body::RespBody;

/// `grpc-status`, a constant so that looking it up does not parse the name each time.
const GRPC_STATUS: header::HeaderName = header::HeaderName::from_static("grpc-status");

/// gRPC status codes the router produces or labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl Code {
    /// The canonical name (`UNAVAILABLE`), used as a metric label.
    pub fn name(self) -> &'static str {
        CODE_NAMES[self as usize]
    }
}

const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The metric label for a `grpc-status` value as sent on the wire (`"14"` → `UNAVAILABLE`).
pub fn code_label(status: &[u8]) -> &'static str {
    std::str::from_utf8(status)
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .and_then(|n| CODE_NAMES.get(n).copied())
        .unwrap_or("UNKNOWN")
}

/// The `grpc-status` in `headers`, as a label, if present.
pub fn status_label(headers: &HeaderMap) -> Option<&'static str> {
    headers.get(&GRPC_STATUS).map(|v| code_label(v.as_bytes()))
}

/// Percent-encodes a `grpc-message` as the gRPC HTTP/2 spec asks: bytes outside printable
/// ASCII, and `%`, become `%XX`.
pub fn encode_message(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A gRPC error answer made by the router: HTTP 200, `application/grpc`, trailers-only
/// (status and message in the headers, no body). `request_id` is echoed when known.
pub fn error_response(
    code: Code,
    message: &str,
    request_id: Option<&HeaderValue>,
) -> Response<RespBody> {
    let mut resp = Response::new(
        Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code as u16));
    if let Ok(v) = HeaderValue::from_str(&encode_message(message)) {
        h.insert("grpc-message", v);
    }
    if let Some(id) = request_id {
        h.insert(ldc_core::REQUEST_ID_HEADER, id.clone());
    }
    resp
}

/// A cell's "moved" answer: it does not own the shard; `owner` does at `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    pub owner: String,
    pub epoch: Option<u64>,
}

/// Recognises a "moved" answer from its response headers: a trailers-only UNAVAILABLE
/// carrying `ldc-moved-owner` (and `ldc-moved-epoch`). Any other answer is `None`.
pub fn moved(headers: &HeaderMap) -> Option<Moved> {
    if headers.get(&GRPC_STATUS)?.as_bytes() != b"14" {
        return None;
    }
    let owner = headers
        .get(ldc_core::MOVED_OWNER)?
        .to_str()
        .ok()?
        .to_string();
    let epoch = headers
        .get(ldc_core::MOVED_EPOCH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse().ok());
    Some(Moved { owner, epoch })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(encode_message("plain text: ok"), "plain text: ok");
        assert_eq!(encode_message("100% é\n"), "100%25 %C3%A9%0A");
    }

    #[test]
    fn error_answers_are_trailers_only() {
        let r = error_response(Code::Unavailable, "no table", None);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["grpc-message"], "no table");
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert!(hyper::body::Body::is_end_stream(r.body()));
    }

    #[test]
    fn moved_needs_status_and_owner() {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("14"));
        assert_eq!(moved(&h), None, "plain UNAVAILABLE is not moved");
        h.insert(ldc_core::MOVED_OWNER, HeaderValue::from_static("c2"));
        h.insert(ldc_core::MOVED_EPOCH, HeaderValue::from_static("7"));
        assert_eq!(
            moved(&h),
            Some(Moved {
                owner: "c2".into(),
                epoch: Some(7)
            })
        );
        h.insert("grpc-status", HeaderValue::from_static("9"));
        assert_eq!(moved(&h), None, "other codes are not moved");
    }

    #[test]
    fn labels() {
        assert_eq!(code_label(b"0"), "OK");
        assert_eq!(code_label(b"14"), "UNAVAILABLE");
        assert_eq!(code_label(b"99"), "UNKNOWN");
        assert_eq!(Code::DeadlineExceeded.name(), "DEADLINE_EXCEEDED");
    }
}
