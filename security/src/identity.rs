//! Who a certificate names: one SPIFFE-style URI in its subject alternative names.
//!
//! * `spiffe://ldc/router`, `spiffe://ldc/controller`, `spiffe://ldc/cell/{name}`: the
//!   platform's own components;
//! * `spiffe://ldc/user/{id}`: one user (acts only for itself);
//! * `spiffe://ldc/service/{name}`: a service acting for users, with its scopes as further
//!   URIs `urn:ldc:scope:{scope}` (the CA that signed the certificate granted them).
//!
//! A certificate with no such URI, or with two identities, names nobody.

use ldc_core::authz::{Principal, Scope};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

pub const TRUST_DOMAIN: &str = "spiffe://ldc/";
pub const SCOPE_URN: &str = "urn:ldc:scope:";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Router,
    Controller,
    Cell(String),
    /// A client of the payment API.
    Client(Principal),
}

impl Identity {
    /// The certificate URIs naming this identity (the first is the identity itself).
    pub fn uris(&self) -> Vec<String> {
        match self {
            Identity::Router => vec![format!("{TRUST_DOMAIN}router")],
            Identity::Controller => vec![format!("{TRUST_DOMAIN}controller")],
            Identity::Cell(n) => vec![format!("{TRUST_DOMAIN}cell/{n}")],
            Identity::Client(p) => {
                let kind = match p.kind {
                    ldc_core::authz::Kind::User => "user",
                    ldc_core::authz::Kind::Service => "service",
                };
                let mut v = vec![format!("{TRUST_DOMAIN}{kind}/{}", p.subject)];
                if p.kind == ldc_core::authz::Kind::Service {
                    v.extend(p.scopes.iter().map(|s| format!("{SCOPE_URN}{s}")));
                }
                v
            }
        }
    }

    /// How logs name it.
    pub fn label(&self) -> String {
        match self {
            Identity::Router => "router".into(),
            Identity::Controller => "controller".into(),
            Identity::Cell(n) => format!("cell:{n}"),
            Identity::Client(p) => p.label(),
        }
    }

    pub fn is_cell(&self) -> bool {
        matches!(self, Identity::Cell(_))
    }

    /// Parses the URIs of a certificate.
    pub fn from_uris<'a>(uris: impl IntoIterator<Item = &'a str>) -> Option<Identity> {
        let mut found = None;
        let mut scopes = Vec::new();
        for u in uris {
            if let Some(s) = u.strip_prefix(SCOPE_URN) {
                scopes.push(Scope::parse(s)?);
                continue;
            }
            let Some(path) = u.strip_prefix(TRUST_DOMAIN) else {
                continue;
            };
            let id = match path.split_once('/') {
                None if path == "router" => Identity::Router,
                None if path == "controller" => Identity::Controller,
                Some(("cell", n)) if valid_name(n) => Identity::Cell(n.to_string()),
                Some(("user", u)) if ldc_core::shard::validate_user_id(u).is_ok() => {
                    Identity::Client(Principal::user(u, [Scope::Read, Scope::Transfer]))
                }
                Some(("service", n)) if valid_name(n) => {
                    Identity::Client(Principal::service(n, []))
                }
                _ => return None,
            };
            if found.replace(id).is_some() {
                return None;
            }
        }
        match found? {
            Identity::Client(mut p) if p.kind == ldc_core::authz::Kind::Service => {
                p.scopes.extend(scopes);
                Some(Identity::Client(p))
            }
            other if scopes.is_empty() => Some(other),
            _ => None,
        }
    }

    /// The identity a DER certificate names (the chain was verified by rustls already).
    pub fn from_cert_der(der: &[u8]) -> Option<Identity> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let san = cert.subject_alternative_name().ok()??;
        Identity::from_uris(san.value.general_names.iter().filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        }))
    }
}

/// Component and service names: up to 63 ASCII letters, digits, `-` and `_` (`r1-a`,
/// `treasury`).
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_their_uris() {
        for id in [
            Identity::Router,
            Identity::Controller,
            Identity::Cell("r1-a".into()),
            Identity::Client(Principal::user("alice", [Scope::Read, Scope::Transfer])),
            Identity::Client(Principal::service("treasury", Scope::ALL)),
            Identity::Client(Principal::service("reports", [Scope::Read])),
        ] {
            let uris = id.uris();
            assert_eq!(
                Identity::from_uris(uris.iter().map(String::as_str)),
                Some(id)
            );
        }
    }

    #[test]
    fn ambiguous_or_foreign_uris_name_nobody() {
        let none = |u: &[&str]| Identity::from_uris(u.iter().copied());
        assert_eq!(none(&[]), None);
        assert_eq!(none(&["spiffe://other/router"]), None);
        assert_eq!(none(&["spiffe://ldc/router", "spiffe://ldc/cell/a"]), None);
        assert_eq!(none(&["spiffe://ldc/cell/"]), None);
        assert_eq!(none(&["spiffe://ldc/cell/a/b"]), None);
        assert_eq!(none(&["spiffe://ldc/cell/a.b"]), None);
        assert_eq!(none(&["spiffe://ldc/admin"]), None);
        // Scopes only mean something on a service certificate.
        assert_eq!(
            none(&["spiffe://ldc/user/alice", "urn:ldc:scope:payments:funds"]),
            None
        );
        assert_eq!(
            none(&["spiffe://ldc/service/x", "urn:ldc:scope:payments:all"]),
            None
        );
    }
}
