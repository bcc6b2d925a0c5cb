//! Desired Kubernetes objects, built by pure functions (no client, no clock) so they are
//! tested without a cluster: one Deployment and one Service per cell and colour, and the
//! ConfigMap that carries the routing table to the routers.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, Container, ContainerPort, EnvVar, HTTPGetAction,
    HostPathVolumeSource, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile,
    SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use ldc_core::routing::{Colour, RoutingTable};

use crate::crd::{Cell, Topology};

/// The gRPC port of a cell pod and its Service.
pub const CELL_GRPC_PORT: i32 = 7500;
/// The Prometheus metrics port of a cell pod.
pub const CELL_METRICS_PORT: i32 = 9100;
/// Key of the routing table (JSON) inside the routing ConfigMap.
pub const TABLE_KEY: &str = "routing.json";
/// Annotation on the routing ConfigMap carrying the table's epoch (cheap to read).
pub const EPOCH_ANNOTATION: &str = "ldc.dev/routing-epoch";

pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGER: &str = "ldc-operator";
pub const LABEL_TOPOLOGY: &str = "ldc.dev/topology";
pub const LABEL_CELL: &str = "ldc.dev/cell";
pub const LABEL_COLOUR: &str = "ldc.dev/colour";

pub const COLOURS: [Colour; 2] = [Colour::Blue, Colour::Green];

/// `r1-a-blue`: the Deployment and Service of one cell colour.
pub fn workload_name(cell: &str, colour: Colour) -> String {
    format!("{cell}-{colour}")
}

/// The ConfigMap routers watch.
pub fn routing_config_map_name(topology: &str) -> String {
    format!("{topology}-routing")
}

/// The in-cluster endpoint of one cell colour, as the routing table lists it.
pub fn endpoint(cell: &str, colour: Colour, namespace: &str) -> String {
    format!(
        "{}.{namespace}.svc:{CELL_GRPC_PORT}",
        workload_name(cell, colour)
    )
}

/// Labels selecting one cell colour's pods.
pub fn selector_labels(topology: &str, cell: &str, colour: Colour) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_TOPOLOGY.to_string(), topology.to_string()),
        (LABEL_CELL.to_string(), cell.to_string()),
        (LABEL_COLOUR.to_string(), colour.to_string()),
    ])
}

fn labels(topology: &str, cell: &str, colour: Colour) -> BTreeMap<String, String> {
    let mut l = selector_labels(topology, cell, colour);
    l.insert("app.kubernetes.io/name".into(), "ldc-cell".into());
    l.insert(LABEL_MANAGED_BY.into(), MANAGER.into());
    l
}

/// Owner reference making `owner` the controller of a child (garbage collection).
pub fn controller_ref<K: Resource<DynamicType = ()>>(owner: &K) -> Option<OwnerReference> {
    owner.controller_owner_ref(&())
}

/// The Deployment of one cell colour. Its pods run `ldc cell serve` against the topology's
/// store, with the cell's certificate from its PKI Secret (see [`crate::pki`]); probes use
/// the plain-HTTP metrics port, since the gRPC port speaks only mutual TLS.
pub fn cell_deployment(topo: &Topology, cell: &Cell, colour: Colour) -> Deployment {
    let name = cell.metadata.name.clone().unwrap_or_default();
    let topo_name = topo.metadata.name.clone().unwrap_or_default();
    let replicas = match colour {
        Colour::Blue => cell.spec.replicas.blue,
        Colour::Green => cell.spec.replicas.green,
    };
    let labels = labels(&topo_name, &name, colour);
    let args = [
        "cell",
        "serve",
        "--cell",
        &name,
        "--colour",
        colour.as_str(),
        "--listen",
        &format!("0.0.0.0:{CELL_GRPC_PORT}"),
        "--metrics-listen",
        &format!("0.0.0.0:{CELL_METRICS_PORT}"),
    ]
    .map(String::from)
    .to_vec();
    // Ready while the writer makes progress (a stuck cell leaves its Service and counts as
    // failed); alive while the process answers at all.
    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(2),
        ..Default::default()
    };
    let pki_secret =
        crate::pki::leaf_secret_name(&topo_name, &ldc_security::platform::cell_leaf(&name));
    let store = store_volume(&topo.spec.store);
    Deployment {
        metadata: ObjectMeta {
            name: Some(workload_name(&name, colour)),
            namespace: cell.metadata.namespace.clone(),
            labels: Some(labels.clone()),
            owner_references: controller_ref(cell).map(|r| vec![r]),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&topo_name, &name, colour)),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                ..Default::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    // Cells never call the Kubernetes API.
                    automount_service_account_token: Some(false),
                    affinity: region_affinity(topo, &cell.spec.region),
                    security_context: Some(pod_security()),
                    containers: vec![Container {
                        name: "cell".into(),
                        image: Some(cell.spec.image_of(colour).to_string()),
                        args: Some(args),
                        env: Some(vec![
                            EnvVar {
                                name: "LDC_STORE".into(),
                                value: Some(topo.spec.store.clone()),
                                ..Default::default()
                            },
                            EnvVar {
                                name: "LDC_PKI".into(),
                                value: Some(crate::pki::MOUNT_PATH.into()),
                                ..Default::default()
                            },
                        ]),
                        volume_mounts: Some(
                            [VolumeMount {
                                name: "pki".into(),
                                mount_path: crate::pki::MOUNT_PATH.into(),
                                read_only: Some(true),
                                ..Default::default()
                            }]
                            .into_iter()
                            .chain(store.clone().map(|(_, m)| m))
                            .collect(),
                        ),
                        ports: Some(vec![
                            ContainerPort {
                                name: Some("grpc".into()),
                                container_port: CELL_GRPC_PORT,
                                ..Default::default()
                            },
                            ContainerPort {
                                name: Some("metrics".into()),
                                container_port: CELL_METRICS_PORT,
                                ..Default::default()
                            },
                        ]),
                        readiness_probe: Some(probe("/readyz", 2)),
                        liveness_probe: Some(probe("/healthz", 10)),
                        security_context: Some(container_security()),
                        resources: Some(ResourceRequirements {
                            requests: Some(BTreeMap::from([
                                ("cpu".into(), Quantity("100m".into())),
                                ("memory".into(), Quantity("64Mi".into())),
                            ])),
                            limits: Some(BTreeMap::from([(
                                "memory".into(),
                                Quantity("512Mi".into()),
                            )])),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }],
                    volumes: Some(
                        [Volume {
                            name: "pki".into(),
                            secret: Some(SecretVolumeSource {
                                secret_name: Some(pki_secret),
                                default_mode: Some(0o440),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }]
                        .into_iter()
                        .chain(store.map(|(v, _)| v))
                        .collect(),
                    ),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

/// With a TiKV store, a cell's pods are placed on nodes of its region (required: a cell
/// that ran in another region would not fail with it). An embedded store is one node's
/// file, so there every pod must share that node instead ([`crate::model::store_shared`]).
pub fn region_affinity(topo: &Topology, region: &str) -> Option<Affinity> {
    let label = &topo.spec.region_node_label;
    if label.is_empty() || !topo.spec.store.starts_with("tikv://") {
        return None;
    }
    Some(Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(vec![NodeSelectorRequirement {
                        key: label.clone(),
                        operator: "In".into(),
                        values: Some(vec![region.to_string()]),
                    }]),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// For an embedded (SQLite) store: the node directory that holds its files, mounted at the
/// same path, as the chart mounts it for the operator and the routers (`store.hostPath`).
/// Without it a cell on a real node would open a private, empty store in its container (on
/// a read-only root filesystem at that): every pod that shares the platform must see the
/// same files. `None` for TiKV (`tikv://…`), which is reached over the network.
pub fn store_volume(store: &str) -> Option<(Volume, VolumeMount)> {
    if store.starts_with("tikv://") {
        return None;
    }
    let dir = std::path::Path::new(store).parent()?.to_str()?;
    if dir.is_empty() || dir == "/" {
        return None;
    }
    let volume = Volume {
        name: "store".into(),
        host_path: Some(HostPathVolumeSource {
            path: dir.into(),
            type_: Some("DirectoryOrCreate".into()),
        }),
        ..Default::default()
    };
    let mount = VolumeMount {
        name: "store".into(),
        mount_path: dir.into(),
        ..Default::default()
    };
    Some((volume, mount))
}

/// The user every LDC container runs as (the image's non-root user).
pub const RUN_AS: i64 = 65532;

/// Non-root, with the group that may read the mounted PKI Secret (mode 0440), and the
/// runtime's default seccomp profile.
fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        fs_group: Some(RUN_AS),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// No privilege escalation, no capabilities, a read-only root filesystem.
fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The metadata of an object of one cell colour (its Deployment, Service and budget):
/// named `{cell}-{colour}`, labelled, owned by the Cell.
fn cell_child_meta(topo_name: &str, cell: &Cell, colour: Colour) -> ObjectMeta {
    let name = cell.metadata.name.clone().unwrap_or_default();
    ObjectMeta {
        name: Some(workload_name(&name, colour)),
        namespace: cell.metadata.namespace.clone(),
        labels: Some(labels(topo_name, &name, colour)),
        owner_references: controller_ref(cell).map(|r| vec![r]),
        ..Default::default()
    }
}

/// The PodDisruptionBudget of one cell colour: a voluntary disruption (a node drain) takes
/// at most one of its pods at a time.
pub fn cell_pdb(topo: &Topology, cell: &Cell, colour: Colour) -> PodDisruptionBudget {
    let name = cell.metadata.name.clone().unwrap_or_default();
    let topo_name = topo.metadata.name.clone().unwrap_or_default();
    PodDisruptionBudget {
        metadata: cell_child_meta(&topo_name, cell, colour),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&topo_name, &name, colour)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

/// The ClusterIP Service of one cell colour (the endpoint the routing table names).
pub fn cell_service(topo: &Topology, cell: &Cell, colour: Colour) -> Service {
    let name = cell.metadata.name.clone().unwrap_or_default();
    let topo_name = topo.metadata.name.clone().unwrap_or_default();
    Service {
        metadata: cell_child_meta(&topo_name, cell, colour),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(&topo_name, &name, colour)),
            ports: Some(vec![
                ServicePort {
                    name: Some("grpc".into()),
                    port: CELL_GRPC_PORT,
                    target_port: Some(IntOrString::String("grpc".into())),
                    ..Default::default()
                },
                ServicePort {
                    name: Some("metrics".into()),
                    port: CELL_METRICS_PORT,
                    target_port: Some(IntOrString::String("metrics".into())),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        status: None,
    }
}

/// Key of the publisher's signature of [`TABLE_KEY`]'s bytes.
pub const SIGNATURE_KEY: &str = "routing.json.sig";

/// The ConfigMap carrying the table of `epoch` to the routers, owned by the topology:
/// `published` is the table's JSON as stored and the publisher's signature of it.
pub fn routing_config_map(
    topo: &Topology,
    epoch: u64,
    published: &(String, Option<String>),
) -> ConfigMap {
    let topo_name = topo.metadata.name.clone().unwrap_or_default();
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(routing_config_map_name(&topo_name)),
            namespace: topo.metadata.namespace.clone(),
            labels: Some(BTreeMap::from([
                (LABEL_TOPOLOGY.to_string(), topo_name),
                (LABEL_MANAGED_BY.to_string(), MANAGER.to_string()),
                (
                    "app.kubernetes.io/component".to_string(),
                    "routing-table".to_string(),
                ),
            ])),
            annotations: Some(BTreeMap::from([(
                EPOCH_ANNOTATION.to_string(),
                epoch.to_string(),
            )])),
            owner_references: controller_ref(topo).map(|r| vec![r]),
            ..Default::default()
        },
        data: Some(
            [
                (TABLE_KEY, Some(&published.0)),
                (SIGNATURE_KEY, published.1.as_ref()),
            ]
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_string(), v?.clone())))
            .collect(),
        ),
        ..Default::default()
    }
}

/// Reads the routing table out of a routing ConfigMap.
pub fn table_from_config_map(cm: &ConfigMap) -> Option<RoutingTable> {
    let s = cm.data.as_ref()?.get(TABLE_KEY)?;
    serde_json::from_str(s).ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crd::{CellRole, CellSpec, ColourReplicas, TopologySpec, Traffic};

    pub fn topo() -> Topology {
        let mut t = Topology::new(
            "prod",
            TopologySpec {
                shard_count: 12,
                regions: vec!["r1".into(), "r2".into()],
                store: "/data/store.db".into(),
                redundancy: Default::default(),
                failover: Default::default(),
                region_node_label: "topology.kubernetes.io/region".into(),
                router_address: "ldc-router:7400".into(),
            },
        );
        t.metadata.namespace = Some("pay".into());
        t.metadata.uid = Some("uid-t".into());
        t
    }

    pub fn cell(name: &str, region: &str, role: CellRole) -> Cell {
        let mut c = Cell::new(
            name,
            CellSpec {
                topology: "prod".into(),
                region: region.into(),
                role,
                image: "ldc:dev".into(),
                images: Default::default(),
                replicas: ColourReplicas { blue: 2, green: 1 },
                traffic: Traffic::default(),
                capacity: None,
            },
        );
        c.metadata.namespace = Some("pay".into());
        c.metadata.uid = Some(format!("uid-{name}"));
        c
    }

    #[test]
    fn deployment_per_colour_is_owned_and_selects_its_pods() {
        let d = cell_deployment(
            &topo(),
            &cell("r1-a", "r1", CellRole::Serving),
            Colour::Green,
        );
        assert_eq!(d.metadata.name.as_deref(), Some("r1-a-green"));
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(1));
        let sel = spec.selector.match_labels.unwrap();
        let tpl = spec.template.metadata.unwrap().labels.unwrap();
        assert!(sel.iter().all(|(k, v)| tpl.get(k) == Some(v)));
        assert_eq!(sel[LABEL_COLOUR], "green");
        let owner = &d.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("Cell", Some(true))
        );
        let c = &spec.template.spec.unwrap().containers[0];
        let args = c.args.as_ref().unwrap().join(" ");
        assert!(args.starts_with("cell serve --cell r1-a --colour green"));
        assert_eq!(
            c.env.as_ref().unwrap()[0].value.as_deref(),
            Some("/data/store.db")
        );
    }

    #[test]
    fn service_targets_the_grpc_port() {
        let s = cell_service(
            &topo(),
            &cell("r2-s", "r2", CellRole::Standby),
            Colour::Blue,
        );
        assert_eq!(s.metadata.name.as_deref(), Some("r2-s-blue"));
        let spec = s.spec.unwrap();
        assert_eq!(spec.ports.unwrap()[0].port, CELL_GRPC_PORT);
        assert_eq!(spec.selector.unwrap()[LABEL_CELL], "r2-s");
        assert_eq!(
            endpoint("r2-s", Colour::Blue, "pay"),
            "r2-s-blue.pay.svc:7500"
        );
    }

    /// The chart's ServiceMonitor for cells scrapes the Service port named `metrics`.
    #[test]
    fn metrics_port_is_named_on_pod_and_service() {
        let (t, c) = (topo(), cell("r1-a", "r1", CellRole::Serving));
        let d = cell_deployment(&t, &c, Colour::Blue);
        let pod = d.spec.unwrap().template.spec.unwrap();
        let ports = pod.containers[0].ports.clone().unwrap();
        let named = ports
            .iter()
            .find(|p| p.name.as_deref() == Some("metrics"))
            .expect("metrics container port");
        assert_eq!(named.container_port, CELL_METRICS_PORT);
        let args = pod.containers[0].args.clone().unwrap().join(" ");
        assert!(args.contains(&format!("--metrics-listen 0.0.0.0:{CELL_METRICS_PORT}")));
        let s = cell_service(&t, &c, Colour::Blue);
        let ports = s.spec.unwrap().ports.unwrap();
        let sp = ports
            .iter()
            .find(|p| p.name.as_deref() == Some("metrics"))
            .expect("metrics service port");
        assert_eq!(sp.port, CELL_METRICS_PORT);
        assert_eq!(sp.target_port, Some(IntOrString::String("metrics".into())));
        assert_eq!(
            s.metadata.labels.unwrap()["app.kubernetes.io/name"],
            "ldc-cell",
            "the ServiceMonitor selects cell Services by this label"
        );
    }

    #[test]
    fn each_cell_colour_has_a_disruption_budget_for_its_own_pods() {
        let (t, c) = (topo(), cell("r1-a", "r1", CellRole::Serving));
        let p = cell_pdb(&t, &c, Colour::Green);
        assert_eq!(p.metadata.name.as_deref(), Some("r1-a-green"));
        let spec = p.spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        let d = cell_deployment(&t, &c, Colour::Green);
        assert_eq!(
            spec.selector.unwrap().match_labels,
            d.spec.unwrap().selector.match_labels
        );
    }

    /// Cell pods run hardened, with their cell's certificate and probes off the TLS port.
    #[test]
    fn cell_pods_are_hardened_and_mount_their_certificate() {
        let (t, c) = (topo(), cell("r1-a", "r1", CellRole::Serving));
        let pod = cell_deployment(&t, &c, Colour::Green)
            .spec
            .unwrap()
            .template
            .spec
            .unwrap();
        let psc = pod.security_context.clone().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.fs_group, Some(RUN_AS));
        assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let ct = &pod.containers[0];
        let csc = ct.security_context.clone().unwrap();
        assert_eq!(csc.read_only_root_filesystem, Some(true));
        assert_eq!(csc.allow_privilege_escalation, Some(false));
        assert_eq!(csc.capabilities.unwrap().drop, Some(vec!["ALL".into()]));
        assert!(ct.resources.as_ref().unwrap().limits.is_some());
        let vol = &pod.volumes.as_ref().unwrap()[0];
        let secret = vol.secret.as_ref().unwrap().secret_name.clone().unwrap();
        let topo_name = t.metadata.name.clone().unwrap();
        assert_eq!(secret, format!("{topo_name}-pki-cell-r1-a"));
        let env = ct.env.as_ref().unwrap();
        assert!(
            env.iter()
                .any(|e| e.name == "LDC_PKI" && e.value.as_deref() == Some(crate::pki::MOUNT_PATH))
        );
        let probe = ct
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(probe.port, IntOrString::String("metrics".into()));
        assert_eq!(probe.path.as_deref(), Some("/readyz"));
    }

    /// The pod template of `cell`'s `colour` Deployment.
    fn pod_spec(t: &Topology, cell: &Cell, colour: Colour) -> PodSpec {
        cell_deployment(t, cell, colour)
            .spec
            .unwrap()
            .template
            .spec
            .unwrap()
    }

    /// A release runs one colour on its own image; the other keeps the cell's.
    #[test]
    fn each_colour_runs_its_own_image_when_it_has_one() {
        let mut c = cell("r1-a", "r1", CellRole::Serving);
        let image = |c: &Cell, colour| {
            let p = pod_spec(&topo(), c, colour);
            p.containers[0].image.clone().unwrap()
        };
        assert_eq!(image(&c, Colour::Green), "ldc:dev");
        c.spec.images.green = Some("ldc:0.2.0".into());
        assert_eq!(image(&c, Colour::Green), "ldc:0.2.0");
        assert_eq!(image(&c, Colour::Blue), "ldc:dev");
    }

    /// With TiKV a cell's pods run in its region; an embedded store places nothing.
    #[test]
    fn cells_run_in_their_region_when_the_store_is_distributed() {
        let c = cell("r2-a", "r2", CellRole::Serving);
        let affinity = |t: &Topology| pod_spec(t, &c, Colour::Blue).affinity;
        assert_eq!(
            affinity(&topo()),
            None,
            "embedded: every pod on the store's node"
        );
        let mut t = topo();
        t.spec.store = "tikv://pd-0:2379".into();
        let a = affinity(&t).unwrap().node_affinity.unwrap();
        let term = &a
            .required_during_scheduling_ignored_during_execution
            .unwrap()
            .node_selector_terms[0];
        let req = &term.match_expressions.as_ref().unwrap()[0];
        assert_eq!(req.key, "topology.kubernetes.io/region");
        assert_eq!(
            (req.operator.as_str(), req.values.clone()),
            ("In", Some(vec!["r2".to_string()]))
        );
        t.spec.region_node_label = String::new();
        assert_eq!(affinity(&t), None, "placement turned off");
    }

    /// Every cell pod sees the embedded store's files (the same node directory the
    /// operator and routers mount); a TiKV store needs no volume.
    #[test]
    fn cell_pods_mount_the_embedded_store_directory() {
        let c = cell("r1-a", "r1", CellRole::Serving);
        let pod = |t: &Topology| pod_spec(t, &c, Colour::Blue);
        let p = pod(&topo());
        let vol = p
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "store");
        let host = vol.unwrap().host_path.as_ref().unwrap();
        assert_eq!(host.path, "/data");
        let mounts = p.containers[0].volume_mounts.as_ref().unwrap();
        let m = mounts.iter().find(|m| m.name == "store").unwrap();
        assert_eq!((m.mount_path.as_str(), m.read_only), ("/data", None));

        let mut tikv = topo();
        tikv.spec.store = "tikv://pd-0:2379".into();
        let p = pod(&tikv);
        assert!(p.volumes.unwrap().iter().all(|v| v.name != "store"));
        assert_eq!(
            store_volume("store.db").map(|(v, _)| v.name),
            None,
            "no directory"
        );
    }

    #[test]
    fn routing_config_map_round_trips() {
        let table = RoutingTable {
            epoch: 7,
            ..Default::default()
        };
        let json = serde_json::to_string(&table).unwrap();
        let cm = routing_config_map(&topo(), table.epoch, &(json, Some("sig".into())));
        assert_eq!(cm.data.as_ref().unwrap()[SIGNATURE_KEY], "sig");
        assert_eq!(cm.metadata.name.as_deref(), Some("prod-routing"));
        assert_eq!(
            cm.metadata.annotations.as_ref().unwrap()[EPOCH_ANNOTATION],
            "7"
        );
        assert_eq!(table_from_config_map(&cm), Some(table));
    }
}
