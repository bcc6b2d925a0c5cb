//! The custom resources of API group `ldc.dev/v1alpha1`, as Rust types.
//!
//! The CRD YAML under `charts/ldc/crds/` is generated from these types (`ldc-operator crd`)
//! and a test fails when the committed file drifts, so the schema the API server enforces
//! is always the one the operator was compiled against.
//!
//! Validation lives in the schema (OpenAPI bounds and CEL rules), so a bad spec is refused
//! by the API server with a clear message before the operator ever sees it:
//!
//! * [`Topology`] (`ldctopo`): shard count (immutable), regions, N+1 policy, failover delay,
//!   the store spec shared by the operator and the cells.
//! * [`Cell`] (`ldccell`): region (immutable), initial role, image, replicas per colour,
//!   and its traffic (green weight in basis points).
//!
//! Operations asked through `kubectl cell` are recorded as intent in
//! `Topology.status.pendingOperation` (an optimistic-lock patch); the operator carries them
//! out and appends the outcome to `Topology.status.history`.

// Several `printcolumn(type_ = ...)` in one `#[kube]` look like duplicated attributes to
// clippy; they are separate columns.
#![allow(clippy::duplicated_attributes)]

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every LDC resource.
pub const GROUP: &str = "ldc.dev";
/// Finalizer on a [`Topology`]: the operator records its removal (events) before it goes.
pub const TOPOLOGY_FINALIZER: &str = "ldc.dev/topology";
/// Finalizer on a [`Cell`]: a cell that still owns shards cannot disappear (its users would
/// have no writer); move its shards first (`kubectl cell switchover`).
pub const CELL_FINALIZER: &str = "ldc.dev/owns-shards";
/// Most moves shown in `Topology.status.history` (a resource's size is bounded); every move
/// is kept in the store (`ldc_control::moves`), and a revert of an older one looks there.
pub const HISTORY_MAX: usize = 20;

/// The shape of one LDC platform: how many shards, which regions, the N+1 policy and how
/// failover behaves. Cells join it by naming it in `spec.topology`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ldc.dev",
    version = "v1alpha1",
    kind = "Topology",
    namespaced,
    status = "TopologyStatus",
    shortname = "ldctopo",
    category = "ldc",
    printcolumn(name = "Shards", type_ = "integer", json_path = ".spec.shardCount"),
    printcolumn(name = "Regions", type_ = "string", json_path = ".status.regions"),
    printcolumn(
        name = "Epoch",
        type_ = "integer",
        json_path = ".status.routingEpoch",
        description = "routing table epoch"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TopologySpec {
    /// Number of user shards. Fixed for the life of the platform: changing it would move
    /// users' money to the wrong owner.
    #[schemars(range(min = 1, max = 10000))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("shardCount is immutable: it is fixed when the platform is created"))]
    pub shard_count: u32,
    /// Regions, e.g. [r1, r2]. Each cell names one of them.
    #[schemars(
        length(min = 1, max = 16),
        inner(
            length(min = 1, max = 16),
            regex(pattern = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
        )
    )]
    #[x_kube(validation = Rule::new("self.all(r, self.exists_one(o, o == r))").message("regions must be unique"))]
    pub regions: Vec<String>,
    /// Where shard ownership lives: a SQLite file path shared by the cells and the operator,
    /// or `tikv://PD1,PD2`. Fixed for the life of the platform: pointed elsewhere, the
    /// operator would create a second platform at epoch 1 beside the first, whose owners
    /// still hold their shards (the operator also refuses it, see `status.store`).
    #[schemars(length(min = 1, max = 512))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("store is immutable: the platform's ownership and ledgers live there; moving them is a migration, not an edit"))]
    pub store: String,
    /// N+1: how many standby cells (owning no shard) each region keeps so any one cell can
    /// fail. The operator reports a `NPlusOne` condition when a region falls short.
    #[serde(default)]
    pub redundancy: Redundancy,
    /// Automatic failover of cells whose pods are not ready.
    #[serde(default)]
    pub failover: FailoverPolicy,
    /// The node label that names a node's region. With a TiKV store, a cell's pods run
    /// only on nodes of its region (so "a region goes down" is its nodes going down); an
    /// embedded store keeps every pod on the one node that holds its file. Empty: no
    /// region placement.
    #[serde(default = "default_region_node_label")]
    #[schemars(length(max = 317))]
    pub region_node_label: String,
    /// Address (`host:port`) cells use to reach the router (cross-cell messages).
    #[serde(default = "default_router_address")]
    #[schemars(length(min = 1, max = 253))]
    pub router_address: String,
}

fn default_region_node_label() -> String {
    "topology.kubernetes.io/region".into()
}

fn default_router_address() -> String {
    "ldc-router:7400".into()
}

/// The N+1 policy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Redundancy {
    /// Standby cells each region should have.
    #[schemars(range(min = 0, max = 8))]
    pub standby_cells_per_region: u32,
}

impl Default for Redundancy {
    fn default() -> Self {
        Redundancy {
            standby_cells_per_region: 1,
        }
    }
}

/// When the operator fails a cell over on its own.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FailoverPolicy {
    /// Fail over automatically (otherwise only `kubectl cell failover` moves shards).
    pub automatic: bool,
    /// How long a cell's serving pods must all be not ready before its shards move.
    #[schemars(range(min = 1, max = 3600))]
    pub not_ready_seconds: u32,
    /// Opt-in: when every cell of a region has been not ready that long (no cell left in
    /// the region to fail over to), cut the region over to the others automatically. Off,
    /// the operator reports `FailoverBlocked` and waits for `kubectl cell dr cutover`.
    #[serde(default)]
    pub region_cutover: bool,
}

impl Default for FailoverPolicy {
    fn default() -> Self {
        FailoverPolicy {
            automatic: true,
            not_ready_seconds: 10,
            region_cutover: false,
        }
    }
}

/// A standard Kubernetes condition.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: String,
    pub reason: String,
    pub message: String,
    /// RFC 3339 time of the last status change.
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// An ownership change asked for (by `kubectl cell` or by the operator itself).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OperationRequest {
    /// Unique id; the outcome is recorded in `status.history` under it.
    #[schemars(length(min = 1, max = 128))]
    pub id: String,
    /// failover, switchover, dr-cutover or revert.
    #[schemars(regex(pattern = r"^(failover|switchover|dr-cutover|revert)$"))]
    pub kind: String,
    /// failover / switchover: the cell whose shards move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell: Option<String>,
    /// switchover: the cell that receives them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// dr-cutover: the region that is evacuated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_region: Option<String>,
    /// dr-cutover: the region that receives (default: every other region).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_region: Option<String>,
    /// revert: the id of the operation (in `status.history`) whose moves are undone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert_of: Option<String>,
    #[serde(default)]
    pub requested_by: String,
    #[serde(default)]
    pub requested_at: String,
}

/// What happened to one operation.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OperationRecord {
    pub id: String,
    /// The command, e.g. `failover r1-a`.
    pub command: String,
    /// Succeeded or Failed.
    pub result: String,
    /// The plan (moves grouped by source and target) or why there was none.
    pub message: String,
    pub shards_moved: u32,
    /// Routing table epoch that carries the change (0 when nothing was published).
    pub routing_epoch: u64,
    /// Where the moved shards came from (cell -> shard ranges): what a revert moves back.
    /// Bounded in the schema (the operator parses these ranges; `0-4294967295` once asked
    /// it for 16 GiB): at most 64 cells, ranges of shard ids below 100 000.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 64,
        "additionalProperties" = {
            "type": "string",
            "maxLength": 65536,
            "pattern": "^(-|[0-9]{1,5}(-[0-9]{1,5})?(,[0-9]{1,5}(-[0-9]{1,5})?)*)$"
        }
    ))]
    pub moved_from: std::collections::BTreeMap<String, String>,
    pub requested_by: String,
    pub finished_at: String,
}

/// What the operator observed and did.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TopologyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Regions as a printable list.
    #[serde(default)]
    pub regions: String,
    /// Epoch of the routing table last published to the `<topology>-routing` ConfigMap.
    #[serde(default)]
    pub routing_epoch: u64,
    /// Name of the ConfigMap routers watch.
    #[serde(default)]
    pub routing_config_map: String,
    /// The store the platform was created in; a spec naming another one is refused.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub store: String,
    #[serde(default)]
    pub cells_ready: u32,
    #[serde(default)]
    pub cells_total: u32,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Intent recorded by `kubectl cell`, cleared when the operator has acted on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_operation: Option<OperationRequest>,
    /// The last operations (newest last), at most 20.
    #[serde(default)]
    #[schemars(length(max = 20))]
    pub history: Vec<OperationRecord>,
}

/// One payment cell: a blue and a green Deployment (and Service) in one region.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ldc.dev",
    version = "v1alpha1",
    kind = "Cell",
    namespaced,
    status = "CellStatus",
    shortname = "ldccell",
    category = "ldc",
    validation = Rule::new("self.metadata.name.size() <= 40 && self.metadata.name.matches('^[a-z0-9]([a-z0-9-]*[a-z0-9])?$')").message("a cell name is a DNS label of at most 40 characters (it prefixes its Deployments and Services)"),
    printcolumn(name = "Region", type_ = "string", json_path = ".spec.region"),
    printcolumn(name = "Role", type_ = "string", json_path = ".status.role"),
    printcolumn(name = "Shards", type_ = "integer", json_path = ".status.shards"),
    printcolumn(name = "Green", type_ = "string", json_path = ".status.greenPercent"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("self.traffic.greenWeightBp == 0 || self.replicas.green > 0").message("traffic.greenWeightBp > 0 needs replicas.green > 0: there would be no green pod to serve those users"))]
#[x_kube(validation = Rule::new("self.traffic.greenWeightBp == 10000 || self.replicas.blue > 0").message("traffic below 100% green needs replicas.blue > 0: there would be no blue pod to serve those users"))]
#[serde(rename_all = "camelCase")]
pub struct CellSpec {
    /// The Topology this cell belongs to (same namespace).
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("topology is immutable"))]
    pub topology: String,
    /// One of the topology's regions.
    #[schemars(
        length(min = 1, max = 16),
        regex(pattern = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
    )]
    #[x_kube(validation = Rule::new("self == oldSelf").message("region is immutable: a cell never moves region; create a new cell"))]
    pub region: String,
    /// Role when the platform is first created: serving cells share the shards, standby
    /// cells own none (N+1). Afterwards ownership lives in the store; see `status.role`.
    #[serde(default)]
    pub role: CellRole,
    /// Container image of the `ldc` binary (both colours, unless `images` names another).
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// A colour's own image: during a release one colour runs the new version while the
    /// other keeps serving the old, and `traffic` moves users between them.
    #[serde(default, skip_serializing_if = "ColourImages::is_empty")]
    pub images: ColourImages,
    #[serde(default)]
    pub replicas: ColourReplicas,
    #[serde(default)]
    pub traffic: Traffic,
    /// Most shards this cell may own (unset: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub capacity: Option<u32>,
}

/// Per-colour images (unset: the cell's `image`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ColourImages {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub blue: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub green: Option<String>,
}

impl ColourImages {
    pub fn is_empty(&self) -> bool {
        self.blue.is_none() && self.green.is_none()
    }
}

impl CellSpec {
    /// The image `colour` runs.
    pub fn image_of(&self, colour: ldc_core::routing::Colour) -> &str {
        let own = match colour {
            ldc_core::routing::Colour::Blue => &self.images.blue,
            ldc_core::routing::Colour::Green => &self.images.green,
        };
        own.as_deref().unwrap_or(&self.image)
    }
}

/// Initial role of a cell.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum CellRole {
    #[default]
    Serving,
    Standby,
}

/// Pods per colour.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ColourReplicas {
    #[schemars(range(min = 0, max = 100))]
    pub blue: i32,
    #[schemars(range(min = 0, max = 100))]
    pub green: i32,
}

impl Default for ColourReplicas {
    fn default() -> Self {
        ColourReplicas { blue: 1, green: 0 }
    }
}

/// The cell's blue/green split.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Traffic {
    /// Share of the cell's users sent to green, in basis points (0..=10000).
    #[schemars(range(min = 0, max = 10000))]
    pub green_weight_bp: u16,
    /// Whether the `x-ldc-colour` header may force a colour (testing a release).
    #[serde(default)]
    pub allow_forced_colour: bool,
    /// A paused release: `kubectl cell traffic-shift` refuses weight changes (except
    /// `--abort`) until `--resume`.
    #[serde(default)]
    pub paused: bool,
    /// The release's steps, green weights in basis points, e.g. [100, 1000, 5000, 10000]:
    /// `kubectl cell traffic-shift CELL --next` moves to the next one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20), inner(range(min = 1, max = 10000)))]
    #[x_kube(validation = Rule::new("self.isSorted() && self.all(x, self.exists_one(y, y == x))").message("traffic.steps must be strictly increasing green weights in basis points, e.g. [100, 1000, 5000, 10000]"))]
    pub steps: Vec<u16>,
}

impl Traffic {
    /// "step 2/4" when the weight is one of the steps.
    pub fn step_label(&self) -> Option<String> {
        ldc_ops::verbs::status::step_label(&self.steps, self.green_weight_bp)
    }
}

/// Annotation on a Cell holding its traffic audit trail (JSON list of
/// [`ldc_core::traffic::Change`], newest last, at most
/// [`ldc_core::traffic::TRAFFIC_HISTORY_MAX`], as on the local platform). Written by
/// `kubectl cell traffic-shift` in the same optimistic-locked patch as the change itself.
pub const TRAFFIC_HISTORY_ANNOTATION: &str = "ldc.dev/traffic-history";

/// What the operator observed about one cell.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CellStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// serving (owns shards) or standby (owns none), from the store.
    #[serde(default)]
    pub role: String,
    #[serde(default)]
    pub shards: u32,
    /// Owned shards as ranges, e.g. `0-24,30`.
    #[serde(default)]
    pub shard_ranges: String,
    /// Lowest and highest ownership epoch of the owned shards, e.g. `1-2`.
    #[serde(default)]
    pub epochs: String,
    #[serde(default)]
    pub ready_blue: u32,
    #[serde(default)]
    pub ready_green: u32,
    #[serde(default)]
    pub green_percent: String,
    /// RFC 3339 time since when the cell's serving pods have all been not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ready_since: Option<String>,
    /// Whether the cell has ever been ready. A cell that never was (first rollout, slow
    /// image pull) is reported but not failed over automatically.
    #[serde(default)]
    pub ever_ready: bool,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn crds_are_structural_and_carry_rules() {
        let t = serde_json::to_string(&Topology::crd()).unwrap();
        assert!(t.contains("shardCount is immutable"));
        assert!(t.contains(r#""shortNames":["ldctopo"]"#));
        let c = serde_json::to_string(&Cell::crd()).unwrap();
        assert!(c.contains("needs replicas.green > 0"));
        assert!(c.contains(r#""status":{}"#), "status subresource");
    }
}
