//! The platform's own certificate authority, kept in a directory (`{data}/pki` for
//! `ldc up`): no manual steps, nothing to download.
//!
//! Layout: `ca.pem` + `ca.key` (the CA), `{name}.pem` + `{name}.key` per component or
//! client (`router`, `controller`, `cell-r1-a`, `treasury`, …), `token.key` +
//! `token.pub.pem` (the ES256 key pair that signs bearer tokens), `routing.key` +
//! `routing.pub.pem` (the key pair that signs routing tables). Keys are written 0600.
//! [`Pki::ensure`] creates what is missing and re-issues certificates that are close to
//! expiry, so running it at every start is both the setup and the rotation.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::SecurityError;
use crate::identity::Identity;

/// How long the CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
/// How long a leaf certificate is valid.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(90 * 86_400);
/// A leaf certificate with less than this left is re-issued by [`Pki::ensure`].
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);

/// One certificate the platform needs: file stem, identity, and the DNS names / IP
/// addresses it serves under (servers only).
#[derive(Debug, Clone)]
pub struct Leaf {
    pub name: String,
    pub identity: Identity,
    pub hosts: Vec<String>,
}

/// Paths of one issued certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// A directory-backed CA.
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    pub fn new(dir: impl Into<PathBuf>) -> Pki {
        Pki { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Where the leaf `name` lives (it may not exist yet).
    pub fn files(&self, name: &str) -> Files {
        Files {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
            ca: self.ca_path(),
        }
    }

    pub fn token_key_path(&self) -> PathBuf {
        self.dir.join("token.key")
    }

    pub fn token_public_path(&self) -> PathBuf {
        self.dir.join("token.pub.pem")
    }

    /// The key that signs routing tables (the publisher's; see [`crate::table`]).
    pub fn routing_key_path(&self) -> PathBuf {
        self.dir.join("routing.key")
    }

    pub fn routing_public_path(&self) -> PathBuf {
        self.dir.join("routing.pub.pem")
    }

    /// Creates the CA, the token key pair and every leaf that is missing or expires within
    /// [`RENEW_BEFORE`]. Returns the leaves (re)issued.
    pub fn ensure(&self, leaves: &[Leaf]) -> Result<Vec<String>, SecurityError> {
        fs::create_dir_all(&self.dir).map_err(|e| io(&self.dir, e))?;
        let ca = self.authority()?;
        for (private_path, public_path) in [
            (self.token_key_path(), self.token_public_path()),
            (self.routing_key_path(), self.routing_public_path()),
        ] {
            if !private_path.exists() {
                let (private, public) = token_key_pair()?;
                write_file(&public_path, public.as_bytes(), 0o644)?;
                write_file(&private_path, private.as_bytes(), 0o600)?;
            }
        }
        let mut issued = Vec::new();
        for leaf in leaves {
            let f = self.files(&leaf.name);
            let current = fs::read(&f.cert).ok();
            if f.key.exists() && !current.as_deref().is_none_or(needs_renewal) {
                continue;
            }
            self.write_leaf(&ca, leaf)?;
            issued.push(leaf.name.clone());
        }
        Ok(issued)
    }

    /// Issues (or re-issues) one leaf now.
    pub fn issue(&self, leaf: &Leaf) -> Result<Files, SecurityError> {
        let ca = self.authority()?;
        self.write_leaf(&ca, leaf)
    }

    fn write_leaf(&self, ca: &Authority, leaf: &Leaf) -> Result<Files, SecurityError> {
        let issued = ca.issue(leaf)?;
        let f = self.files(&leaf.name);
        // Key first, then the certificate: a reader that sees the new certificate finds
        // its key (the reloader waits for both to change anyway).
        write_file(&f.key, issued.key_pem.as_bytes(), 0o600)?;
        write_file(&f.cert, issued.cert_pem.as_bytes(), 0o644)?;
        Ok(f)
    }

    /// The directory's CA, created on first use.
    pub fn authority(&self) -> Result<Authority, SecurityError> {
        let key_path = self.dir.join("ca.key");
        if key_path.exists() {
            let key = fs::read_to_string(&key_path).map_err(|e| io(&key_path, e))?;
            let cert = fs::read_to_string(self.ca_path()).map_err(|e| io(&self.ca_path(), e))?;
            return Authority::from_pem(&cert, &key);
        }
        fs::create_dir_all(&self.dir).map_err(|e| io(&self.dir, e))?;
        let ca = Authority::generate()?;
        write_file(&self.ca_path(), ca.cert_pem().as_bytes(), 0o644)?;
        write_file(&key_path, ca.key_pem().as_bytes(), 0o600)?;
        Ok(ca)
    }
}

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A certificate authority in memory: the directory PKI of `ldc up` and the operator's
/// Secrets both issue through it.
pub struct Authority {
    params: CertificateParams,
    key: KeyPair,
    cert_pem: String,
}

impl Authority {
    /// The CA's name and constraints: the same every time, so an authority can be rebuilt
    /// from its key and certificate (issuing needs the name and the key).
    fn params() -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::CommonName, "LDC platform CA");
        p.distinguished_name.push(DnType::OrganizationName, "LDC");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p
    }

    /// A new CA valid for [`CA_VALIDITY`].
    pub fn generate() -> Result<Authority, SecurityError> {
        let mut params = Self::params();
        validity(&mut params, CA_VALIDITY);
        let key = KeyPair::generate().map_err(rc)?;
        let cert_pem = params.self_signed(&key).map_err(rc)?.pem();
        Ok(Authority {
            params,
            key,
            cert_pem,
        })
    }

    /// The CA whose certificate and key these are.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Authority, SecurityError> {
        Ok(Authority {
            params: Self::params(),
            key: KeyPair::from_pem(key_pem).map_err(rc)?,
            cert_pem: cert_pem.to_string(),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A new certificate for `leaf`, valid for [`LEAF_VALIDITY`].
    pub fn issue(&self, leaf: &Leaf) -> Result<Issued, SecurityError> {
        let mut p = CertificateParams::new(leaf.hosts.clone()).map_err(rc)?;
        for u in leaf.identity.uris() {
            p.subject_alt_names
                .push(SanType::URI(u.try_into().map_err(rc)?));
        }
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::CommonName, leaf.identity.label());
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        validity(&mut p, LEAF_VALIDITY);
        let key = KeyPair::generate().map_err(rc)?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = p.signed_by(&key, &issuer).map_err(rc)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A new ES256 key pair (bearer tokens, routing tables): (private PKCS#8 PEM, public PEM).
pub fn token_key_pair() -> Result<(String, String), SecurityError> {
    let k = KeyPair::generate().map_err(rc)?;
    Ok((k.serialize_pem(), k.public_key_pem()))
}

/// Whether a PEM certificate is unreadable or expires within [`RENEW_BEFORE`].
pub fn needs_renewal(cert_pem: &[u8]) -> bool {
    crate::tls::not_after(cert_pem).is_none_or(|t| t < SystemTime::now() + RENEW_BEFORE)
}

fn validity(p: &mut CertificateParams, valid: Duration) {
    let now = time::OffsetDateTime::now_utc();
    // A little in the past: clocks of the machines that check it may lag.
    p.not_before = now - time::Duration::minutes(5);
    p.not_after = now + valid;
}

/// Writes through a temporary file and a rename, so a reader never sees half a file.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), SecurityError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io(&tmp, e))?;
    f.write_all(data).map_err(|e| io(&tmp, e))?;
    f.sync_all().map_err(|e| io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io(path, e))
}

fn io(path: &Path, e: std::io::Error) -> SecurityError {
    SecurityError::Io {
        path: path.display().to_string(),
        error: e.to_string(),
    }
}

fn rc(e: rcgen::Error) -> SecurityError {
    SecurityError::Pki(e.to_string())
}
