//! # ldc-security: the trust boundary's parts
//!
//! Every LDC connection is mutual TLS inside the platform and TLS at the edge; every
//! client of the payment API is authenticated (a client certificate or a bearer token) and
//! authorized by [`ldc_core::authz`]. This crate holds what that needs and nothing else:
//!
//! * [`pki`]: the platform's own CA in a directory (rcgen): no manual steps, rotation by
//!   re-running [`pki::Pki::ensure`];
//! * [`identity`]: who a certificate names (SPIFFE-style URIs: router, controller, cell,
//!   user, service with scopes);
//! * [`tls`]: rustls server and client configurations from PEM files, reloaded when the
//!   files change, with the certificate's expiry as a metric;
//! * [`token`]: ES256 bearer tokens (jsonwebtoken) for clients that cannot hold a
//!   certificate;
//! * [`platform`]: which component holds which certificate;
//! * [`table`]: the routing table's signature (publishers sign, routers verify);
//! * [`net`]: TLS accept (off the accept loop, bounded) and connect (checking who answered).
//!
//! No cryptography is written here: rustls, ring, rcgen and jsonwebtoken do it.
#![forbid(unsafe_code)]

pub mod identity;
pub mod net;
pub mod pki;
pub mod platform;
pub mod table;
pub mod tls;
pub mod token;

pub use identity::Identity;

/// Why security material could not be created or loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("{path}: {error}")]
    Io { path: String, error: String },
    #[error("{path}: not valid PEM for this use: {error}")]
    Pem { path: String, error: String },
    #[error("certificate authority: {0}")]
    Pki(String),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("token: {0}")]
    Token(String),
}
