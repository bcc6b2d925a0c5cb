//! rustls configurations built from PEM files, and kept current when the files change.
//!
//! Every connection of the platform is TLS 1.3/1.2 with the ring provider, chosen
//! explicitly (never a process-wide default that another crate could change). A server
//! config asks for client certificates signed by the platform CA ([`ClientAuth::Required`]
//! for cells; [`ClientAuth::Optional`] at the router's edge, where clients may use bearer
//! tokens instead). A client config trusts only the platform CA.
//!
//! [`Reloading`] re-reads the files when their modification time changes (checked every
//! [`RELOAD_PERIOD`]), so a rotated certificate is used by the next handshake without a
//! restart; a broken new file is logged and the last good configuration stays.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::SecurityError;
use crate::pki::Files;

/// How often [`Reloading`] looks at its files.
pub const RELOAD_PERIOD: Duration = Duration::from_secs(5);

/// Whether a server asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every client must present a certificate of the platform CA (cells).
    Required,
    /// A client may present one; without one it must authenticate otherwise (the edge).
    Optional,
}

/// The crypto provider of every LDC connection.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain, its key and the CA, read from PEM files.
pub struct Credentials {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Arc<RootCertStore>,
    /// When the leaf certificate expires.
    pub not_after: Option<SystemTime>,
}

impl Credentials {
    pub fn load(files: &Files) -> Result<Credentials, SecurityError> {
        let chain = read_certs(&files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| SecurityError::Pem {
            path: files.key.display().to_string(),
            error: e.to_string(),
        })?;
        let not_after = chain.first().and_then(|c| der_not_after(c));
        Ok(Credentials {
            chain,
            key,
            roots: Arc::new(roots(&files.ca)?),
            not_after,
        })
    }
}

/// The platform CA as a root store.
pub fn roots(ca: &Path) -> Result<RootCertStore, SecurityError> {
    let mut store = RootCertStore::empty();
    for c in read_certs(ca)? {
        store
            .add(c)
            .map_err(|e| SecurityError::Tls(format!("CA {}: {e}", ca.display())))?;
    }
    Ok(store)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, SecurityError> {
    let pem = |e: rustls_pki_types::pem::Error| SecurityError::Pem {
        path: path.display().to_string(),
        error: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(SecurityError::Pem {
            path: path.display().to_string(),
            error: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

/// A server configuration speaking HTTP/2 (gRPC).
pub fn server_config(c: &Credentials, auth: ClientAuth) -> Result<ServerConfig, SecurityError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(c.roots.clone(), provider());
    let verifier = match auth {
        ClientAuth::Required => verifier,
        ClientAuth::Optional => verifier.allow_unauthenticated(),
    }
    .build()
    .map_err(|e| SecurityError::Tls(e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| SecurityError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(c.chain.clone(), c.key.clone_key())
        .map_err(|e| SecurityError::Tls(format!("certificate and key do not match: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// The start of every client configuration: our provider, safe protocol versions, the
/// platform CA as the only root.
fn client_builder(
    roots: Arc<RootCertStore>,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, SecurityError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| SecurityError::Tls(e.to_string()))?
        .with_root_certificates(roots))
}

fn h2(mut cfg: ClientConfig) -> ClientConfig {
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg
}

/// A client configuration trusting the platform CA, presenting `c`'s certificate.
pub fn client_config(c: &Credentials) -> Result<ClientConfig, SecurityError> {
    let cfg = client_builder(c.roots.clone())?
        .with_client_auth_cert(c.chain.clone(), c.key.clone_key())
        .map_err(|e| SecurityError::Tls(format!("certificate and key do not match: {e}")))?;
    Ok(h2(cfg))
}

/// A client configuration trusting the platform CA that presents no certificate (a client
/// authenticating with a bearer token).
pub fn anonymous_client_config(ca: &Path) -> Result<ClientConfig, SecurityError> {
    Ok(h2(
        client_builder(Arc::new(roots(ca)?))?.with_no_client_auth()
    ))
}

/// When a PEM certificate expires.
pub fn not_after(pem: &[u8]) -> Option<SystemTime> {
    let der = CertificateDer::from_pem_slice(pem).ok()?;
    der_not_after(&der)
}

fn der_not_after(der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let secs = cert.validity().not_after.timestamp();
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// Builds a configuration from loaded credentials.
type Build<T> = Box<dyn Fn(&Credentials) -> Result<T, SecurityError> + Send + Sync>;

/// A configuration built from files, rebuilt when they change.
pub struct Reloading<T> {
    /// `None`: a fixed configuration (see [`Reloading::fixed`]).
    files: Option<Files>,
    build: Build<T>,
    state: RwLock<(Arc<T>, Stamp)>,
    expiry: Option<prometheus::Gauge>,
}

/// Modification times of the three files.
type Stamp = [Option<SystemTime>; 3];

fn stamp(f: &Option<Files>) -> Stamp {
    let m = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match f {
        Some(f) => [m(&f.cert), m(&f.key), m(&f.ca)],
        None => [None; 3],
    }
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Loads now (an error here is fatal: there is no last good configuration yet).
    pub fn new(
        files: Files,
        build: impl Fn(&Credentials) -> Result<T, SecurityError> + Send + Sync + 'static,
    ) -> Result<Arc<Self>, SecurityError> {
        Self::load(files, Box::new(build), None)
    }

    /// Also reports the certificate's expiry as `ldc_tls_cert_expiry_timestamp_seconds`.
    pub fn with_expiry_metric(
        files: Files,
        build: impl Fn(&Credentials) -> Result<T, SecurityError> + Send + Sync + 'static,
        registry: &prometheus::Registry,
        component: &str,
    ) -> Result<Arc<Self>, SecurityError> {
        let gauge = prometheus::Gauge::with_opts(
            prometheus::Opts::new(
                "ldc_tls_cert_expiry_timestamp_seconds",
                "When this component's TLS certificate expires (Unix time); alert well before",
            )
            .const_label("component", component),
        )
        .map_err(|e| SecurityError::Tls(e.to_string()))?;
        registry
            .register(Box::new(gauge.clone()))
            .map_err(|e| SecurityError::Tls(format!("expiry metric: {e}")))?;
        Self::load(files, Box::new(build), Some(gauge))
    }

    /// A configuration that never changes (one not built from certificate files, such as
    /// a client that authenticates with a token and only needs the CA).
    pub fn fixed(cfg: T) -> Arc<Self> {
        Arc::new(Reloading {
            files: None,
            build: Box::new(|_| Err(SecurityError::Tls("a fixed configuration".into()))),
            state: RwLock::new((Arc::new(cfg), [None; 3])),
            expiry: None,
        })
    }

    fn load(
        files: Files,
        build: Build<T>,
        expiry: Option<prometheus::Gauge>,
    ) -> Result<Arc<Self>, SecurityError> {
        let creds = Credentials::load(&files)?;
        let files = Some(files);
        let s = stamp(&files);
        if let Some(g) = &expiry {
            set_expiry(g, &creds);
        }
        let cfg = build(&creds)?;
        Ok(Arc::new(Reloading {
            files,
            build,
            state: RwLock::new((Arc::new(cfg), s)),
            expiry,
        }))
    }

    /// The current configuration.
    pub fn current(&self) -> Arc<T> {
        self.state.read().expect("tls state lock").0.clone()
    }

    /// Rebuilds if a file changed. Returns whether a new configuration is in use.
    pub fn reload_if_changed(&self) -> bool {
        let Some(files) = &self.files else {
            return false;
        };
        let s = stamp(&self.files);
        if self.state.read().expect("tls state lock").1 == s {
            return false;
        }
        let built = Credentials::load(files).and_then(|c| {
            if let Some(g) = &self.expiry {
                set_expiry(g, &c);
            }
            (self.build)(&c)
        });
        match built {
            Ok(cfg) => {
                *self.state.write().expect("tls state lock") = (Arc::new(cfg), s);
                tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded");
                true
            }
            Err(e) => {
                // Keep the last good one; look again next period (the writer may be midway).
                tracing::warn!(cert = %files.cert.display(), error = %e, "TLS files changed but do not load; keeping the previous certificate");
                false
            }
        }
    }

    /// Checks the files every [`RELOAD_PERIOD`] until the returned task is aborted.
    pub fn watch(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RELOAD_PERIOD).await;
                let m = me.clone();
                let _ = tokio::task::spawn_blocking(move || m.reload_if_changed()).await;
            }
        })
    }
}

fn set_expiry(g: &prometheus::Gauge, c: &Credentials) {
    if let Some(t) = c.not_after.and_then(|t| t.duration_since(UNIX_EPOCH).ok()) {
        g.set(t.as_secs_f64());
    }
}
