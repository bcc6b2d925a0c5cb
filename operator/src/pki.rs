//! The operator-managed PKI: a CA and one certificate per component, in Secrets of the
//! topology's namespace (as CloudNativePG's operator manages its clusters' certificates).
//!
//! * `{topology}-ca`: the CA (`ca.pem`, `ca.key`), the key pair that signs bearer tokens
//!   (`token.key`, `token.pub.pem`) and the one that signs routing tables (`routing.key`,
//!   `routing.pub.pem`). Created once; it never leaves the operator.
//! * `{topology}-pki-{leaf}`: one per component, laid out as a PKI directory (`ca.pem`,
//!   `{leaf}.pem`, `{leaf}.key`, plus `token.pub.pem` and `routing.pub.pem` for the
//!   router), so a pod mounts it
//!   at [`MOUNT_PATH`] and runs with `LDC_PKI` pointing there. Leaves: `router`, `cli` (the
//!   administrator's client credential), `cell-{name}` for every cell.
//!
//! Every reconcile re-issues a leaf that is missing or within
//! [`ldc_security::pki::RENEW_BEFORE`] of expiry; the kubelet updates mounted Secrets in
//! place and the components reload them without a restart. Which Secrets to write is
//! decided by [`plan`], a pure function; [`ensure`] does the I/O.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use ldc_security::Identity;
use ldc_security::pki::{Authority, Leaf, needs_renewal, token_key_pair};
use ldc_security::platform;

use crate::crd::Topology;
use crate::specs::{LABEL_MANAGED_BY, LABEL_TOPOLOGY, MANAGER, controller_ref};

/// Where pods mount their PKI Secret.
pub const MOUNT_PATH: &str = "/etc/ldc/pki";

pub fn ca_secret_name(topology: &str) -> String {
    format!("{topology}-ca")
}

pub fn leaf_secret_name(topology: &str, leaf: &str) -> String {
    format!("{topology}-pki-{leaf}")
}

/// The DNS names a Service `name` answers to inside the cluster.
fn service_hosts(name: &str, ns: &str) -> Vec<String> {
    vec![
        name.to_string(),
        format!("{name}.{ns}"),
        format!("{name}.{ns}.svc"),
        format!("{name}.{ns}.svc.cluster.local"),
    ]
}

/// Every certificate a topology needs: the router (named by its Service, the host of
/// `spec.routerAddress`), the CLI credential, and each cell (both colours' Services).
pub fn leaves(topo: &Topology, cells: &[String]) -> Vec<Leaf> {
    let ns = topo.namespace().unwrap_or_default();
    let router_host = topo
        .spec
        .router_address
        .rsplit_once(':')
        .map_or(topo.spec.router_address.as_str(), |(h, _)| h);
    let mut v = vec![
        Leaf {
            name: platform::ROUTER.into(),
            identity: Identity::Router,
            hosts: service_hosts(router_host, &ns),
        },
        Leaf {
            name: platform::CLI.into(),
            identity: Identity::Client(ldc_core::authz::Principal::service(
                platform::CLI,
                ldc_core::authz::Scope::ALL,
            )),
            hosts: vec![],
        },
    ];
    for c in cells {
        let mut hosts = Vec::new();
        for colour in ["blue", "green"] {
            hosts.extend(service_hosts(&format!("{c}-{colour}"), &ns));
        }
        v.push(Leaf {
            name: platform::cell_leaf(c),
            identity: Identity::Cell(c.clone()),
            hosts,
        });
    }
    v
}

/// The leaves to (re)issue, given each leaf Secret's current certificate (absent: none).
pub fn plan<'a>(leaves: &'a [Leaf], current: &BTreeMap<String, Vec<u8>>) -> Vec<&'a Leaf> {
    leaves
        .iter()
        .filter(|l| current.get(&l.name).is_none_or(|pem| needs_renewal(pem)))
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Security(#[from] ldc_security::SecurityError),
    #[error(
        "Secret {0} exists but is not an LDC CA (missing ca.pem, ca.key, token.pub.pem or routing.key); delete it to have a new CA issued"
    )]
    BadCa(String),
}

/// What the CA Secret holds besides the CA.
pub struct Keys {
    pub token_public: String,
    pub routing_public: String,
    /// Signs the routing tables the operator publishes.
    pub routing: ldc_security::table::TableSigner,
}

fn secret(topo: &Topology, name: String, data: BTreeMap<String, String>) -> Secret {
    let topo_name = topo.name_any();
    Secret {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: topo.namespace(),
            labels: Some(BTreeMap::from([
                (LABEL_TOPOLOGY.to_string(), topo_name),
                (LABEL_MANAGED_BY.to_string(), MANAGER.to_string()),
            ])),
            owner_references: controller_ref(topo).map(|r| vec![r]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            data.into_iter()
                .map(|(k, v)| (k, ByteString(v.into_bytes())))
                .collect(),
        ),
        ..Default::default()
    }
}

fn field(s: &Secret, key: &str) -> Option<String> {
    let b = s.data.as_ref()?.get(key)?;
    String::from_utf8(b.0.clone()).ok()
}

/// Creates the CA Secret if there is none; returns the CA and its keys.
async fn ensure_ca(api: &Api<Secret>, topo: &Topology) -> Result<(Authority, Keys), PkiError> {
    let name = ca_secret_name(&topo.name_any());
    if let Some(s) = api.get_opt(&name).await? {
        let (Some(cert), Some(key), Some(token), Some(routing), Some(routing_public)) = (
            field(&s, "ca.pem"),
            field(&s, "ca.key"),
            field(&s, "token.pub.pem"),
            field(&s, "routing.key"),
            field(&s, "routing.pub.pem"),
        ) else {
            return Err(PkiError::BadCa(name));
        };
        let keys = Keys {
            token_public: token,
            routing_public,
            routing: ldc_security::table::TableSigner::from_pem(routing.as_bytes())?,
        };
        return Ok((Authority::from_pem(&cert, &key)?, keys));
    }
    let ca = Authority::generate()?;
    let (token_private, token_public) = token_key_pair()?;
    let (routing_private, routing_public) = token_key_pair()?;
    let data = BTreeMap::from([
        ("ca.pem".to_string(), ca.cert_pem().to_string()),
        ("ca.key".to_string(), ca.key_pem()),
        ("token.key".to_string(), token_private),
        ("token.pub.pem".to_string(), token_public.clone()),
        ("routing.key".to_string(), routing_private.clone()),
        ("routing.pub.pem".to_string(), routing_public.clone()),
    ]);
    // Create, never overwrite: a CA replaced under running components would cut them off.
    match api
        .create(&PostParams::default(), &secret(topo, name.clone(), data))
        .await
    {
        Ok(_) => {
            tracing::info!(secret = %name, "created the platform CA");
            let keys = Keys {
                token_public,
                routing_public,
                routing: ldc_security::table::TableSigner::from_pem(routing_private.as_bytes())?,
            };
            Ok((ca, keys))
        }
        // Another reconcile created it first: use that one.
        Err(kube::Error::Api(e)) if e.code == 409 => Box::pin(ensure_ca(api, topo)).await,
        Err(e) => Err(e.into()),
    }
}

/// Makes sure the CA and every leaf Secret of `topo` exist and are fresh. Returns the
/// CA Secret's keys (the routing-table signer among them).
pub async fn ensure(
    client: &kube::Client,
    topo: &Topology,
    cells: &[String],
) -> Result<Keys, PkiError> {
    let ns = topo.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let (ca, keys) = ensure_ca(&api, topo).await?;
    let leaves = leaves(topo, cells);
    let mut current = BTreeMap::new();
    for l in &leaves {
        let name = leaf_secret_name(&topo.name_any(), &l.name);
        if let Some(s) = api.get_opt(&name).await?
            && let (Some(cert), Some(_)) = (
                field(&s, &format!("{}.pem", l.name)),
                field(&s, &format!("{}.key", l.name)),
            )
            && field(&s, "ca.pem").as_deref() == Some(ca.cert_pem())
        {
            current.insert(l.name.clone(), cert.into_bytes());
        }
    }
    let pp = PatchParams::apply(MANAGER).force();
    let mut issued = Vec::new();
    for l in plan(&leaves, &current) {
        let cert = ca.issue(l)?;
        let mut data = BTreeMap::from([
            ("ca.pem".to_string(), ca.cert_pem().to_string()),
            (format!("{}.pem", l.name), cert.cert_pem),
            (format!("{}.key", l.name), cert.key_pem),
        ]);
        if l.name == platform::ROUTER {
            data.insert("token.pub.pem".into(), keys.token_public.clone());
            data.insert("routing.pub.pem".into(), keys.routing_public.clone());
        }
        let name = leaf_secret_name(&topo.name_any(), &l.name);
        api.patch(&name, &pp, &Patch::Apply(&secret(topo, name.clone(), data)))
            .await?;
        issued.push(l.name.clone());
    }
    if !issued.is_empty() {
        tracing::info!(topology = %topo.name_any(), leaves = ?issued, "issued certificates");
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_name_every_component_and_its_service_hosts() {
        let t = crate::specs::tests::topo();
        let l = leaves(&t, &["r1-a".to_string()]);
        let names: Vec<&str> = l.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["router", "cli", "cell-r1-a"]);
        let ns = t.namespace().unwrap();
        assert!(
            l[0].hosts.contains(&format!("ldc-router.{ns}.svc")),
            "{:?}",
            l[0].hosts
        );
        for colour in ["blue", "green"] {
            assert!(l[2].hosts.contains(&format!("r1-a-{colour}.{ns}.svc")));
        }
        assert_eq!(l[2].identity, Identity::Cell("r1-a".into()));
    }

    #[test]
    fn plan_issues_missing_and_expiring_leaves_only() {
        let t = crate::specs::tests::topo();
        let leaves = leaves(&t, &["r1-a".to_string()]);
        assert_eq!(plan(&leaves, &BTreeMap::new()).len(), 3);
        let ca = Authority::generate().unwrap();
        let fresh = ca.issue(&leaves[0]).unwrap().cert_pem.into_bytes();
        let current = BTreeMap::from([
            ("router".to_string(), fresh),
            ("cli".to_string(), b"not a certificate".to_vec()),
        ]);
        let todo: Vec<&str> = plan(&leaves, &current)
            .iter()
            .map(|l| l.name.as_str())
            .collect();
        assert_eq!(todo, ["cli", "cell-r1-a"]);
    }
}
