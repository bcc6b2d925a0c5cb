//! The routing table is signed by whoever publishes it (`ldc up`'s controller, or the
//! operator) and verified by every router before it routes with it: someone who can edit
//! the store key or the routing ConfigMap (ordinary `edit` rights on the namespace) cannot
//! point routers at a cell of their own.
//!
//! The signature covers the exact bytes published (the table's JSON), so nothing needs a
//! canonical form: it sits next to them, under [`SIGNATURE_SUFFIX`]-named keys (the store
//! key `sys/routing.sig`, the ConfigMap key `routing.json.sig`). ES256 through
//! jsonwebtoken's JWS primitives; the key pair is `routing.key` / `routing.pub.pem` in
//! the PKI.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};

use crate::SecurityError;

/// Appended to the name of a key holding a table to name the key holding its signature.
pub const SIGNATURE_SUFFIX: &str = ".sig";
/// Longest signature read (an ES256 signature is 86 base64url characters).
pub const SIGNATURE_BYTES_MAX: usize = 256;

/// Signs published tables.
pub struct TableSigner {
    key: EncodingKey,
}

impl TableSigner {
    pub fn from_pem(pem: &[u8]) -> Result<TableSigner, SecurityError> {
        Ok(TableSigner {
            key: EncodingKey::from_ec_pem(pem).map_err(|e| SecurityError::Pem {
                path: "routing signing key".into(),
                error: e.to_string(),
            })?,
        })
    }

    pub fn from_pem_file(path: &Path) -> Result<TableSigner, SecurityError> {
        TableSigner::from_pem(&read(path)?)
    }

    /// The signature of `bytes`.
    pub fn sign(&self, bytes: &[u8]) -> String {
        jsonwebtoken::crypto::sign(bytes, &self.key, Algorithm::ES256)
            .expect("ES256 signing with a valid key does not fail")
    }
}

/// Why a published table is not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableSignatureError {
    #[error("the routing table carries no signature; only signed tables are routed with")]
    Unsigned,
    #[error(
        "the routing table's signature does not verify: it was changed or signed by another key"
    )]
    Invalid,
}

impl TableSignatureError {
    pub fn label(&self) -> &'static str {
        match self {
            TableSignatureError::Unsigned => "unsigned",
            TableSignatureError::Invalid => "bad_signature",
        }
    }
}

/// Verifies published tables.
pub struct TableVerifier {
    key: DecodingKey,
}

impl TableVerifier {
    pub fn from_pem(pem: &[u8]) -> Result<TableVerifier, SecurityError> {
        Ok(TableVerifier {
            key: DecodingKey::from_ec_pem(pem).map_err(|e| SecurityError::Pem {
                path: "routing public key".into(),
                error: e.to_string(),
            })?,
        })
    }

    pub fn from_pem_file(path: &Path) -> Result<TableVerifier, SecurityError> {
        TableVerifier::from_pem(&read(path)?)
    }

    /// Whether `signature` is the publisher's signature of `bytes`.
    pub fn verify(
        &self,
        bytes: &[u8],
        signature: Option<&[u8]>,
    ) -> Result<(), TableSignatureError> {
        let sig = signature.ok_or(TableSignatureError::Unsigned)?;
        if sig.len() > SIGNATURE_BYTES_MAX {
            return Err(TableSignatureError::Invalid);
        }
        let sig = std::str::from_utf8(sig).map_err(|_| TableSignatureError::Invalid)?;
        match jsonwebtoken::crypto::verify(sig, bytes, &self.key, Algorithm::ES256) {
            Ok(true) => Ok(()),
            _ => Err(TableSignatureError::Invalid),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|e| SecurityError::Io {
        path: path.display().to_string(),
        error: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::token_key_pair;

    #[test]
    fn only_the_publishers_signature_of_these_bytes_verifies() {
        let (private, public) = token_key_pair().unwrap();
        let (other_private, _) = token_key_pair().unwrap();
        let signer = TableSigner::from_pem(private.as_bytes()).unwrap();
        let verifier = TableVerifier::from_pem(public.as_bytes()).unwrap();
        let table = br#"{"epoch":7,"shards":[],"cells":{}}"#;
        let sig = signer.sign(table);
        assert_eq!(verifier.verify(table, Some(sig.as_bytes())), Ok(()));
        assert_eq!(
            verifier.verify(table, None),
            Err(TableSignatureError::Unsigned)
        );
        let tampered = br#"{"epoch":8,"shards":[],"cells":{}}"#;
        assert_eq!(
            verifier.verify(tampered, Some(sig.as_bytes())),
            Err(TableSignatureError::Invalid)
        );
        let forged = TableSigner::from_pem(other_private.as_bytes())
            .unwrap()
            .sign(table);
        assert_eq!(
            verifier.verify(table, Some(forged.as_bytes())),
            Err(TableSignatureError::Invalid)
        );
        assert_eq!(
            verifier.verify(table, Some(&[b'x'; 1000])),
            Err(TableSignatureError::Invalid)
        );
    }
}
