//! The edge: who is calling, and may they make this call.
//!
//! A client proves who it is with a client certificate of the platform CA (checked by the
//! TLS handshake) or with a bearer token (`authorization: Bearer …`, ES256, checked here).
//! A token, when present, is the credential: a certificate-holding client can still act as
//! a narrower identity. The router then asks [`ldc_core::authz::authorize`], the one rule,
//! and forwards the call with the principal in `x-ldc-principal` (for the cell's logs;
//! cells trust it only because the connection comes from a router certificate). The
//! `authorization` header never leaves the router.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use ldc_core::authz::{self, Denied, Principal};
use ldc_security::Identity;
use ldc_security::tls::Reloading;
use ldc_security::token::{TokenError, TokenVerifier};
use rustls::{ClientConfig, ServerConfig};

use crate::grpc::Code;
use crate::proxy::Fail;

/// Request header carrying the authenticated principal from the router to the cell.
pub const PRINCIPAL_HEADER: &str = "x-ldc-principal";
pub(crate) const PRINCIPAL: HeaderName = HeaderName::from_static(PRINCIPAL_HEADER);
const AUTHORIZATION: HeaderName = http::header::AUTHORIZATION;

/// How a router secures its two sides.
#[derive(Clone)]
pub enum EdgeSecurity {
    /// TLS at the edge (client certificates optional, tokens accepted), mutual TLS to the
    /// cells with the router's own certificate.
    Tls {
        server: Arc<Reloading<ServerConfig>>,
        upstream: Arc<Reloading<ClientConfig>>,
        /// `None`: no token keys configured, so only client certificates authenticate.
        tokens: Option<Arc<TokenVerifier>>,
    },
    /// Plaintext, no authentication: the explicit `--insecure` development switch only.
    /// The relay is refused even so.
    Insecure,
}

impl EdgeSecurity {
    pub fn is_secure(&self) -> bool {
        matches!(self, EdgeSecurity::Tls { .. })
    }
}

fn unauthenticated(reason: &'static str, message: impl Into<String>) -> Fail {
    Fail::new(Code::Unauthenticated, reason, message)
}

/// The principal making this call: its bearer token if it sent one, else its certificate.
pub(crate) fn authenticate(
    headers: &HeaderMap,
    peer: Option<&Identity>,
    tokens: Option<&TokenVerifier>,
) -> Result<Principal, Fail> {
    if let Some(v) = headers.get(&AUTHORIZATION) {
        let token = bearer(v)?;
        let Some(verifier) = tokens else {
            return Err(unauthenticated(
                "token_not_accepted",
                "this router accepts no bearer tokens (no token keys are configured); \
                 authenticate with a client certificate",
            ));
        };
        return verifier
            .verify(token)
            .map_err(|e: TokenError| unauthenticated(e.label(), e.to_string()));
    }
    match peer {
        Some(Identity::Client(p)) => Ok(p.clone()),
        Some(other) => Err(unauthenticated(
            "not_a_client",
            format!(
                "the client certificate names {}, a component of the platform, not a client; \
                 use a user or service credential",
                other.label()
            ),
        )),
        None => Err(unauthenticated(
            "no_credentials",
            "no credentials: send a client certificate of this platform or \
             `authorization: Bearer <token>` (`ldc token` makes one)",
        )),
    }
}

fn bearer(v: &HeaderValue) -> Result<&str, Fail> {
    let s = v.to_str().ok().and_then(|s| {
        let (scheme, rest) = s.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    });
    s.filter(|t| !t.is_empty()).ok_or_else(|| {
        unauthenticated(
            "bad_authorization_header",
            "the authorization header must be `Bearer <token>`",
        )
    })
}

/// The refusal for a call the principal may not make.
pub(crate) fn denied(e: Denied) -> Fail {
    Fail::new(Code::PermissionDenied, e.label(), e.to_string())
}

/// Checks the method before anything else: the relay and unknown services are refused
/// whoever asks.
pub(crate) fn public_method(path: &str) -> Result<(), Fail> {
    authz::method_scope(path).map(|_| ()).map_err(denied)
}

/// Prepares the headers for the cell: the client's own credential and any principal it
/// claimed are removed; the authenticated principal (if any) is set.
pub(crate) fn forward_principal(headers: &mut HeaderMap, who: Option<&Principal>) {
    headers.remove(&AUTHORIZATION);
    headers.remove(&PRINCIPAL);
    if let Some(p) = who
        && let Ok(v) = HeaderValue::from_str(&p.label())
    {
        headers.insert(PRINCIPAL, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ldc_core::authz::Scope;

    #[test]
    fn credentials_are_read_precisely() {
        let mut h = HeaderMap::new();
        let alice = Identity::Client(Principal::user("alice", [Scope::Read]));
        assert_eq!(
            authenticate(&h, Some(&alice), None).unwrap().subject,
            "alice"
        );
        let e = authenticate(&h, None, None).unwrap_err();
        assert_eq!(e.reason(), "no_credentials");
        let e = authenticate(&h, Some(&Identity::Router), None).unwrap_err();
        assert_eq!(e.reason(), "not_a_client");
        for bad in ["Basic abc", "Bearer", "Bearer  ", "token"] {
            h.insert(AUTHORIZATION, HeaderValue::from_static(bad));
            let e = authenticate(&h, Some(&alice), None).unwrap_err();
            assert_eq!(e.reason(), "bad_authorization_header", "{bad}");
        }
        // A token without configured keys is refused, even with a good certificate.
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer a.b.c"));
        let e = authenticate(&h, Some(&alice), None).unwrap_err();
        assert_eq!(e.reason(), "token_not_accepted");
    }

    #[test]
    fn the_cell_sees_only_the_authenticated_principal() {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer secret"));
        h.insert(PRINCIPAL, HeaderValue::from_static("service:treasury"));
        forward_principal(&mut h, Some(&Principal::user("alice", [])));
        assert_eq!(h.get(&AUTHORIZATION), None);
        assert_eq!(h.get(&PRINCIPAL).unwrap(), "user:alice");
        forward_principal(&mut h, None);
        assert_eq!(h.get(&PRINCIPAL), None);
    }
}
