//! Who may call a cell: the check every request passes before its handler.
//!
//! A cell is never reached by clients. Its payment API is for routers (which authenticated
//! the client and authorized the call), its relay for other cells, its health service for
//! any component of the platform. The TLS handshake has already proved the peer holds a
//! certificate of the platform CA; this names which component it is and refuses the rest.

use ldc_security::Identity;
use ldc_security::net::Peer;
use tonic::{Request, Status};

/// An interceptor admitting the peers `allow` accepts (everyone, over the explicit
/// insecure transport).
#[derive(Clone)]
pub struct Gate {
    allow: Option<fn(&Identity) -> bool>,
    service: &'static str,
    only: &'static str,
    refused: prometheus::IntCounterVec,
}

impl Gate {
    pub fn new(
        secure: bool,
        service: &'static str,
        allow: fn(&Identity) -> bool,
        only: &'static str,
        refused: prometheus::IntCounterVec,
    ) -> Gate {
        Gate {
            allow: secure.then_some(allow),
            service,
            only,
            refused,
        }
    }
}

pub fn routers(id: &Identity) -> bool {
    matches!(id, Identity::Router)
}

pub fn cells(id: &Identity) -> bool {
    id.is_cell()
}

pub fn components(id: &Identity) -> bool {
    matches!(
        id,
        Identity::Router | Identity::Controller | Identity::Cell(_)
    )
}

impl tonic::service::Interceptor for Gate {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(allow) = self.allow else {
            return Ok(req);
        };
        let peer = req
            .extensions()
            .get::<Peer>()
            .and_then(|p| p.identity.as_deref());
        match peer {
            Some(id) if allow(id) => Ok(req),
            Some(id) => {
                self.refused
                    .with_label_values(&[self.service, "not_allowed"])
                    .inc();
                tracing::warn!(service = self.service, peer = %id.label(), "refused a call from a component that may not make it");
                Err(Status::permission_denied(format!(
                    "{} may not call {}; only {} may",
                    id.label(),
                    self.service,
                    self.only
                )))
            }
            None => {
                self.refused
                    .with_label_values(&[self.service, "no_identity"])
                    .inc();
                Err(Status::unauthenticated(format!(
                    "{} needs a certificate naming a component of this platform; clients call the router",
                    self.service
                )))
            }
        }
    }
}
