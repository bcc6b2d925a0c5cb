//! Bearer tokens for clients that cannot hold a certificate: JWTs signed with ES256 by a
//! key the platform's operator configures (`ldc up` creates `pki/token.key`), verified
//! with `jsonwebtoken` against the configured public keys.
//!
//! Claims: `sub` (user id, or service name), `kind` (`user` | `service`), `scope`
//! (space-separated, e.g. `payments:read payments:transfer`), `aud` = `ldc`, `exp`, `iat`.
//! Every claim is required; an unknown scope makes the token invalid rather than
//! silently narrower, so a typo is found at once.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use ldc_core::authz::{Kind, Principal, Scope};
use serde::{Deserialize, Serialize};

use crate::SecurityError;
use crate::identity::valid_name;

/// The audience every LDC token names.
pub const AUDIENCE: &str = "ldc";
/// Longest token the router reads (a header limit already applies; this one is explicit).
pub const TOKEN_BYTES_MAX: usize = 4096;
/// Most verification keys (old and new during a rotation, a few issuers).
pub const KEYS_MAX: usize = 16;
/// Clock skew tolerated on `exp`.
const LEEWAY_SECS: u64 = 30;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    kind: String,
    scope: String,
    aud: String,
    exp: u64,
    iat: u64,
}

/// Why a token was refused. Messages say what was wrong, never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("bearer token has expired; get a new one (`ldc token`)")]
    Expired,
    #[error("bearer token is not signed by a key this platform trusts")]
    BadSignature,
    #[error("bearer token is malformed: {0}")]
    Malformed(&'static str),
    #[error("bearer token is for another audience; LDC tokens name audience \"ldc\"")]
    Audience,
    #[error("bearer token is longer than {TOKEN_BYTES_MAX} bytes")]
    TooLong,
}

impl TokenError {
    pub fn label(&self) -> &'static str {
        match self {
            TokenError::Expired => "token_expired",
            TokenError::BadSignature => "token_signature",
            TokenError::Malformed(_) => "token_malformed",
            TokenError::Audience => "token_audience",
            TokenError::TooLong => "token_too_long",
        }
    }
}

/// Signs tokens (held by whoever issues credentials: `ldc token`).
pub struct TokenIssuer {
    key: EncodingKey,
}

impl TokenIssuer {
    pub fn from_pem_file(path: &Path) -> Result<TokenIssuer, SecurityError> {
        let pem = std::fs::read(path).map_err(|e| SecurityError::Io {
            path: path.display().to_string(),
            error: e.to_string(),
        })?;
        let key = EncodingKey::from_ec_pem(&pem).map_err(|e| SecurityError::Pem {
            path: path.display().to_string(),
            error: e.to_string(),
        })?;
        Ok(TokenIssuer { key })
    }

    /// A token for `p`, valid for `ttl`.
    pub fn issue(&self, p: &Principal, ttl: Duration) -> Result<String, SecurityError> {
        self.issue_at(p, SystemTime::now(), ttl)
    }

    /// A token issued at `now` (tests make expired ones with a past `now`).
    pub fn issue_at(
        &self,
        p: &Principal,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<String, SecurityError> {
        let iat = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let claims = Claims {
            sub: p.subject.clone(),
            kind: match p.kind {
                Kind::User => "user".into(),
                Kind::Service => "service".into(),
            },
            scope: p
                .scopes
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" "),
            aud: AUDIENCE.into(),
            exp: iat + ttl.as_secs(),
            iat,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &self.key)
            .map_err(|e| SecurityError::Token(e.to_string()))
    }
}

/// Verified tokens remembered, so a client reusing its token costs one signature check
/// per token, not per call (as Envoy's JWT filter caches). Cleared when full.
pub const VERIFIED_CACHE_MAX: usize = 10_000;

/// Verifies tokens against the configured public keys.
pub struct TokenVerifier {
    keys: Vec<DecodingKey>,
    validation: Validation,
    /// token → (principal, expiry in Unix seconds).
    verified: std::sync::Mutex<std::collections::HashMap<String, (Principal, u64)>>,
}

impl TokenVerifier {
    /// Reads public keys (PEM, `-----BEGIN PUBLIC KEY-----`), one per file.
    pub fn from_pem_files(paths: &[impl AsRef<Path>]) -> Result<TokenVerifier, SecurityError> {
        if paths.len() > KEYS_MAX {
            return Err(SecurityError::Token(format!(
                "{} token keys configured; at most {KEYS_MAX}",
                paths.len()
            )));
        }
        let mut keys = Vec::new();
        for p in paths {
            let p = p.as_ref();
            let pem = std::fs::read(p).map_err(|e| SecurityError::Io {
                path: p.display().to_string(),
                error: e.to_string(),
            })?;
            keys.push(
                DecodingKey::from_ec_pem(&pem).map_err(|e| SecurityError::Pem {
                    path: p.display().to_string(),
                    error: e.to_string(),
                })?,
            );
        }
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        validation.leeway = LEEWAY_SECS;
        Ok(TokenVerifier {
            keys,
            validation,
            verified: Default::default(),
        })
    }

    /// The principal a token names. A token verified before is answered from memory until
    /// it expires (the same leeway as a full check).
    pub fn verify(&self, token: &str) -> Result<Principal, TokenError> {
        if token.len() > TOKEN_BYTES_MAX {
            return Err(TokenError::TooLong);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        {
            let cache = self.verified.lock().expect("token cache lock");
            if let Some((p, exp)) = cache.get(token) {
                if now <= exp + LEEWAY_SECS {
                    return Ok(p.clone());
                }
                drop(cache);
                return Err(TokenError::Expired);
            }
        }
        let (p, exp) = self.verify_signature(token)?;
        let mut cache = self.verified.lock().expect("token cache lock");
        if cache.len() >= VERIFIED_CACHE_MAX {
            cache.clear();
        }
        cache.insert(token.to_string(), (p.clone(), exp));
        Ok(p)
    }

    fn verify_signature(&self, token: &str) -> Result<(Principal, u64), TokenError> {
        let mut last = TokenError::BadSignature;
        for k in &self.keys {
            match jsonwebtoken::decode::<Claims>(token, k, &self.validation) {
                Ok(d) => {
                    let exp = d.claims.exp;
                    return principal(d.claims).map(|p| (p, exp));
                }
                Err(e) => {
                    last = match e.kind() {
                        ErrorKind::InvalidSignature => TokenError::BadSignature,
                        ErrorKind::ExpiredSignature => TokenError::Expired,
                        ErrorKind::InvalidAudience => TokenError::Audience,
                        ErrorKind::InvalidAlgorithm => {
                            TokenError::Malformed("only ES256 tokens are accepted")
                        }
                        ErrorKind::MissingRequiredClaim(_) => {
                            TokenError::Malformed("a required claim (sub, aud, exp) is missing")
                        }
                        _ => TokenError::Malformed("not a JWT with LDC's claims"),
                    };
                    // A bad signature may be another key's token: try the next key.
                    // Anything else is the token's own fault, whichever key signed it.
                    if last != TokenError::BadSignature {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}

fn principal(c: Claims) -> Result<Principal, TokenError> {
    let scopes = c
        .scope
        .split_whitespace()
        .map(Scope::parse)
        .collect::<Option<Vec<_>>>()
        .ok_or(TokenError::Malformed("unknown scope"))?;
    match c.kind.as_str() {
        "user" if ldc_core::shard::validate_user_id(&c.sub).is_ok() => {
            Ok(Principal::user(c.sub, scopes))
        }
        "service" if valid_name(&c.sub) => Ok(Principal::service(c.sub, scopes)),
        "user" | "service" => Err(TokenError::Malformed("sub is not a valid name")),
        _ => Err(TokenError::Malformed("kind must be user or service")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Pki;

    fn keys(dir: &Path) -> (TokenIssuer, TokenVerifier) {
        let pki = Pki::new(dir);
        pki.ensure(&[]).unwrap();
        (
            TokenIssuer::from_pem_file(&pki.token_key_path()).unwrap(),
            TokenVerifier::from_pem_files(&[pki.token_public_path()]).unwrap(),
        )
    }

    #[test]
    fn tokens_verify_to_their_principal_and_fail_precisely() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let (issuer, verifier) = keys(a.path());
        let (other_issuer, _) = keys(b.path());
        let hour = Duration::from_secs(3600);
        let alice = Principal::user("alice", [Scope::Read]);
        let t = issuer.issue(&alice, hour).unwrap();
        assert_eq!(verifier.verify(&t), Ok(alice.clone()));
        let svc = Principal::service("treasury", Scope::ALL);
        assert_eq!(verifier.verify(&issuer.issue(&svc, hour).unwrap()), Ok(svc));

        let old = SystemTime::now() - 2 * hour;
        let expired = issuer.issue_at(&alice, old, hour).unwrap();
        assert_eq!(verifier.verify(&expired), Err(TokenError::Expired));
        let foreign = other_issuer.issue(&alice, hour).unwrap();
        assert_eq!(verifier.verify(&foreign), Err(TokenError::BadSignature));
        assert!(matches!(
            verifier.verify("not.a.token"),
            Err(TokenError::Malformed(_))
        ));
        assert_eq!(
            verifier.verify(&"x".repeat(TOKEN_BYTES_MAX + 1)),
            Err(TokenError::TooLong)
        );
        // A tampered payload (another subject) breaks the signature.
        let mut parts: Vec<String> = t.split('.').map(String::from).collect();
        let bob = issuer
            .issue(&Principal::user("bob", [Scope::Read]), hour)
            .unwrap();
        parts[1] = bob.split('.').nth(1).unwrap().to_string();
        assert_eq!(
            verifier.verify(&parts.join(".")),
            Err(TokenError::BadSignature)
        );
        // Keys rotate: a verifier with both keys takes tokens of either.
        let both = TokenVerifier::from_pem_files(&[
            Pki::new(a.path()).token_public_path(),
            Pki::new(b.path()).token_public_path(),
        ])
        .unwrap();
        assert_eq!(both.verify(&foreign), Ok(alice));
        assert_eq!(both.verify(&expired), Err(TokenError::Expired));
    }
}
