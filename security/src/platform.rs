//! The certificates a platform needs, and the configurations its components build from
//! them: one place that says which component holds which certificate.

use std::sync::Arc;

use ldc_core::authz::{Principal, Scope};
use rustls::{ClientConfig, ServerConfig};

use crate::SecurityError;
use crate::identity::Identity;
use crate::pki::{Files, Leaf, Pki};
use crate::tls::{self, ClientAuth, Reloading};

/// The router's certificate (server at the edge, client to cells).
pub const ROUTER: &str = "router";
/// The local controller's (`ldc up`) or the operator's certificate.
pub const CONTROLLER: &str = "controller";
/// The CLI's default credential in a data directory: a service with every scope, as the
/// administrator of a platform on one machine is (`ldc token` makes narrower ones).
pub const CLI: &str = "cli";

/// The file stem of a cell's certificate.
pub fn cell_leaf(cell: &str) -> String {
    format!("cell-{cell}")
}

/// Hosts every certificate of a platform on one machine serves under.
pub const LOCAL_HOSTS: [&str; 3] = ["127.0.0.1", "::1", "localhost"];

/// Every certificate of a platform on one machine with these cells.
pub fn local_leaves<'a>(cells: impl IntoIterator<Item = &'a str>) -> Vec<Leaf> {
    local_leaves_on(cells, &[])
}

/// [`local_leaves`], the router and cells also serving under `extra_hosts` (addresses of
/// network namespaces on this machine that cells run in).
pub fn local_leaves_on<'a>(
    cells: impl IntoIterator<Item = &'a str>,
    extra_hosts: &[String],
) -> Vec<Leaf> {
    let hosts: Vec<String> = LOCAL_HOSTS
        .iter()
        .map(|h| h.to_string())
        .chain(extra_hosts.iter().cloned())
        .collect();
    let mut v = vec![
        Leaf {
            name: ROUTER.into(),
            identity: Identity::Router,
            hosts: hosts.clone(),
        },
        Leaf {
            name: CONTROLLER.into(),
            identity: Identity::Controller,
            hosts: vec![],
        },
        Leaf {
            name: CLI.into(),
            identity: Identity::Client(Principal::service(CLI, Scope::ALL)),
            hosts: vec![],
        },
    ];
    v.extend(cells.into_iter().map(|c| Leaf {
        name: cell_leaf(c),
        identity: Identity::Cell(c.to_string()),
        hosts: hosts.clone(),
    }));
    v
}

/// A reloading server configuration from `files`; its expiry is a metric in `registry`.
pub fn server(
    files: Files,
    auth: ClientAuth,
    registry: &prometheus::Registry,
    component: &str,
) -> Result<Arc<Reloading<ServerConfig>>, SecurityError> {
    Reloading::with_expiry_metric(
        files,
        move |c| tls::server_config(c, auth),
        registry,
        component,
    )
}

/// A reloading client configuration presenting the certificate in `files`.
pub fn client(files: Files) -> Result<Arc<Reloading<ClientConfig>>, SecurityError> {
    Reloading::new(files, tls::client_config)
}

/// Creates (or renews) the certificates of a platform on one machine.
pub fn ensure_local<'a>(
    pki: &Pki,
    cells: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<String>, SecurityError> {
    ensure_local_on(pki, cells, &[])
}

/// [`ensure_local`] with extra hosts (see [`local_leaves_on`]).
pub fn ensure_local_on<'a>(
    pki: &Pki,
    cells: impl IntoIterator<Item = &'a str>,
    extra_hosts: &[String],
) -> Result<Vec<String>, SecurityError> {
    pki.ensure(&local_leaves_on(cells, extra_hosts))
}
