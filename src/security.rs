//! Where each `ldc` process finds its certificates, keys and tokens.
//!
//! Everything comes from the platform's PKI directory (`--pki`, default `DATA_DIR/pki`),
//! which `ldc up` creates and renews: the router uses `router.pem`, each cell
//! `cell-NAME.pem`, the local controller `controller.pem`, and client commands the
//! credential named by `--credential` (default `cli`: a service with every scope, the
//! administrator of a platform on one machine), or a bearer token from `--token`.
//! `--insecure` turns all of it off, loudly; it exists for debugging on a laptop only.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ldc_router::EdgeSecurity;
use ldc_security::Identity;
use ldc_security::pki::{Files, Pki};
use ldc_security::platform;
use ldc_security::tls::{self, ClientAuth, Reloading};
use ldc_security::token::TokenVerifier;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use crate::cli::Global;

/// Connect timeout of client and probe connections.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

impl Global {
    pub fn pki(&self) -> Pki {
        Pki::new(
            self.pki
                .clone()
                .unwrap_or_else(|| self.data_dir.join("pki")),
        )
    }
}

/// Prints the warning every start of an insecure process gives.
pub fn warn_insecure(what: &str) {
    eprintln!(
        "WARNING: {what} runs with --insecure: plaintext, no authentication; anyone who can \
         reach it can move money. For debugging on a development machine only."
    );
}

/// The files of leaf `name`, with a hint when the PKI was never created.
fn files(pki: &Pki, name: &str) -> Result<Files> {
    let f = pki.files(name);
    if !f.cert.exists() {
        bail!(
            "no certificate {} (the platform's PKI is created by `ldc up`; point --pki at it, \
             or pass --insecure on a development machine)",
            f.cert.display()
        );
    }
    Ok(f)
}

/// How cell `cell` talks to the platform.
pub fn cell_transport(
    g: &Global,
    cell: &str,
    registry: &prometheus::Registry,
) -> Result<ldc_cell::Transport> {
    if g.insecure {
        warn_insecure(&format!("cell {cell}"));
        return Ok(ldc_cell::Transport::Insecure);
    }
    let own = files(&g.pki(), &platform::cell_leaf(cell))?;
    Ok(ldc_cell::Transport::MutualTls {
        server: platform::server(own.clone(), ClientAuth::Required, registry, "cell")?,
        client: platform::client(own)?,
    })
}

/// How a router secures its edge and its connections to cells. Token keys: the files
/// given, else the PKI's `token.pub.pem`.
pub fn router_security(
    g: &Global,
    token_keys: &[PathBuf],
    registry: &prometheus::Registry,
) -> Result<EdgeSecurity> {
    if g.insecure {
        warn_insecure("the router");
        return Ok(EdgeSecurity::Insecure);
    }
    let pki = g.pki();
    let own = files(&pki, platform::ROUTER)?;
    let default_key = pki.token_public_path();
    let keys: Vec<PathBuf> = if token_keys.is_empty() && default_key.exists() {
        vec![default_key]
    } else {
        token_keys.to_vec()
    };
    let tokens = if keys.is_empty() {
        None
    } else {
        Some(Arc::new(TokenVerifier::from_pem_files(&keys)?))
    };
    Ok(EdgeSecurity::Tls {
        server: platform::server(own.clone(), ClientAuth::Optional, registry, "router")?,
        upstream: platform::client(own)?,
        tokens,
    })
}

/// A channel from the local controller to a component at `addr` (health probes).
pub fn controller_channel(g: &Global, addr: &str) -> Result<Channel> {
    if g.insecure {
        return plain_channel(addr);
    }
    let cfg = platform::client(files(&g.pki(), platform::CONTROLLER)?)?;
    Ok(ldc_security::net::channel(
        addr,
        cfg,
        Identity::is_cell,
        CONNECT_TIMEOUT,
        Duration::from_secs(10),
    )?)
}

fn plain_channel(addr: &str) -> Result<Channel> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .with_context(|| format!("bad address {addr:?}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(Duration::from_secs(10))
            .connect_lazy(),
    )
}

/// A client's credential: a bearer token added to every call, or nothing to add (the
/// client certificate of the connection, or `--insecure`).
#[derive(Clone)]
pub struct Credential(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Credential {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The client TLS configuration of `ldc` commands: the CA, and the `--credential`
/// certificate unless a token is used.
pub fn client_tls(g: &Global) -> Result<Option<Arc<Reloading<rustls::ClientConfig>>>> {
    if g.insecure {
        return Ok(None);
    }
    let pki = g.pki();
    if g.token.is_some() {
        let cfg = tls::anonymous_client_config(&pki.ca_path())
            .with_context(|| format!("cannot read the platform CA in {}", pki.dir().display()))?;
        return Ok(Some(Reloading::fixed(cfg)));
    }
    let f = credential_files(&pki, &g.credential);
    if !f.cert.exists() {
        bail!(
            "no credential {:?} ({} does not exist); `ldc up` creates `cli` in its data \
             directory, or pass --token",
            g.credential,
            f.cert.display()
        );
    }
    Ok(Some(platform::client(f)?))
}

/// A credential is a leaf name in the PKI, or a path to a `.pem` with its `.key` beside it.
fn credential_files(pki: &Pki, credential: &str) -> Files {
    let p = Path::new(credential);
    if credential.ends_with(".pem") {
        return Files {
            cert: p.to_path_buf(),
            key: p.with_extension("key"),
            ca: pki.ca_path(),
        };
    }
    pki.files(credential)
}

/// A channel from a client command to the router (or, with `expect`, another component).
pub fn client_channel(g: &Global, addr: &str) -> Result<(Channel, Credential)> {
    let cred = Credential(match &g.token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .context("--token is not a valid header value")?,
        ),
        None => None,
    });
    let channel = match client_tls(g)? {
        None => plain_channel(addr)?,
        Some(cfg) => ldc_security::net::channel(
            addr,
            cfg,
            |id| matches!(id, Identity::Router) || id.is_cell(),
            CONNECT_TIMEOUT,
            Duration::from_secs(10),
        )?,
    };
    Ok((channel, cred))
}

/// The key signing the routing tables this process publishes (`ldc up`'s controller and
/// the `ldc cell` verbs): the PKI's `routing.key`. `None` with `--insecure`.
pub fn table_signer(g: &Global) -> Result<Option<Arc<ldc_security::table::TableSigner>>> {
    if g.insecure {
        return Ok(None);
    }
    let path = g.pki().routing_key_path();
    let s = ldc_security::table::TableSigner::from_pem_file(&path).with_context(|| {
        format!(
            "cannot read the routing-table signing key {} (`ldc up` creates it; ldc cell \
             commands must run where the platform's PKI is)",
            path.display()
        )
    })?;
    Ok(Some(Arc::new(s)))
}

/// The key routers verify published tables with: `--table-public-key`, else the PKI's
/// `routing.pub.pem`. `None` with `--insecure`.
pub fn table_verifier(
    g: &Global,
    key: Option<&Path>,
) -> Result<Option<ldc_security::table::TableVerifier>> {
    if g.insecure {
        return Ok(None);
    }
    let default = g.pki().routing_public_path();
    let path = key.unwrap_or(&default);
    Ok(Some(
        ldc_security::table::TableVerifier::from_pem_file(path).with_context(|| {
            format!(
                "cannot read the routing-table public key {}: a router takes only signed tables",
                path.display()
            )
        })?,
    ))
}
