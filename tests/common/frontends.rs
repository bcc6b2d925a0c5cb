//! The check that `ldc cell` and `kubectl cell` are one product: for the same state they
//! print the same JSON document. A local store is made to hold the state a cluster shows
//! (cells, regions, capacities, ownership with its epochs, health, what runs, weights,
//! pauses, the routing epoch), then the same verbs run through both front-ends.

use std::path::Path;
use std::process::Command;

use ldc_control::traffic::TrafficState;
use ldc_control::{CellRuntime, keys};
use ldc_core::planner::{self, CellInfo, Owner, Topology};
use serde_json::Value;

/// Fields that name the platform's own machinery, not the state: what runs a colour (pid
/// and metrics address locally, replicas on Kubernetes, and the endpoints routers dial).
fn strip_platform_detail(v: &mut Value) {
    if let Some(routes) = v["routes"].as_array_mut() {
        for r in routes {
            r["endpoints"] = Value::Null;
        }
    }
    if let Some(cells) = v["cells"].as_array_mut() {
        for c in cells {
            for colour in ["blue", "green"] {
                let live = c["colours"][colour]["live"].clone();
                c["colours"][colour] = serde_json::json!({ "live": live });
            }
        }
    }
}

/// Writes the state of `status` (a `kubectl cell status -o json`), `cells` (`kubectl get
/// cells -o json`) and the moves of `history` (`kubectl cell history -o json`) into a new
/// local store at `store`.
pub fn mirror(store: &Path, status: &Value, cells: &Value, history: &Value) {
    let capacity = |name: &str| {
        cells["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["metadata"]["name"] == name)
            .and_then(|c| c["spec"]["capacity"].as_u64())
            .map(|n| n as u32)
    };
    let list = status["cells"].as_array().unwrap();
    let topo = Topology {
        shard_count: status["shardCount"].as_u64().unwrap() as u32,
        cells: list
            .iter()
            .map(|c| {
                let id = c["cell"].as_str().unwrap().to_string();
                CellInfo {
                    capacity: capacity(&id),
                    region: c["region"].as_str().unwrap().to_string(),
                    id,
                }
            })
            .collect(),
    };
    let s = ldc_store::open(store.to_str().unwrap()).unwrap();
    let mut t = s.begin().unwrap();
    let first = topo.cells[0].id.clone();
    ldc_control::init(&mut *t, &topo, &[first.as_str()], 0).unwrap();
    let mut weights = std::collections::BTreeMap::new();
    for c in list {
        let cell = c["cell"].as_str().unwrap();
        for (shard, epoch) in c["epochs"].as_object().unwrap() {
            let o = Owner {
                cell: cell.to_string(),
                epoch: epoch.as_u64().unwrap(),
            };
            t.put(
                &keys::owner(shard.parse().unwrap()),
                &serde_json::to_vec(&o).unwrap(),
            )
            .unwrap();
        }
        let live = |colour: &str| {
            (0..c["colours"][colour]["live"].as_u64().unwrap())
                .map(|i| format!("127.0.0.1:{}", 9 + i))
                .collect::<Vec<_>>()
        };
        let rt = CellRuntime {
            region: c["region"].as_str().unwrap().to_string(),
            blue: live("blue"),
            green: live("green"),
            pids: vec![0, 0],
            metrics: vec![String::new(), String::new()],
            healthy: c["healthy"].as_bool().unwrap(),
        };
        ldc_control::put_cell_runtime(&mut *t, cell, &rt).unwrap();
        let bp = c["greenWeightBp"].as_u64().unwrap() as u16;
        weights.insert(cell.to_string(), bp);
        let st = TrafficState {
            green_weight_bp: bp,
            paused: c["paused"].as_bool().unwrap(),
            history: vec![],
        };
        ldc_control::traffic::put(&mut *t, cell, &st).unwrap();
    }
    for m in history["moves"].as_array().unwrap() {
        if m["result"] != "Succeeded" {
            continue;
        }
        let rec = ldc_control::moves::MoveRecord {
            id: m["id"].as_str().unwrap().to_string(),
            command: m["command"].as_str().unwrap().to_string(),
            summary: m["message"].as_str().unwrap().to_string(),
            shards_moved: m["shardsMoved"].as_u64().unwrap() as u32,
            routing_epoch: m["routingEpoch"].as_u64().unwrap(),
            moved_from: m["movedFrom"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(c, r)| {
                    let shards = planner::parse_shard_ranges(r.as_str().unwrap()).unwrap();
                    (c.clone(), shards)
                })
                .collect(),
            by: m["by"].as_str().unwrap().to_string(),
            at_unix_ms: m["atUnixMs"].as_u64().unwrap(),
        };
        ldc_control::moves::put(&mut *t, keys::LOCAL_MOVES_PREFIX, &rec).unwrap();
    }
    let mut table = ldc_control::publish_routing(&mut *t, &weights, None).unwrap();
    table.epoch = status["routingEpoch"].as_u64().unwrap();
    ldc_control::store_routing(&mut *t, &table, None).unwrap();
    t.commit().unwrap();
}

/// The JSON `ldc cell ARGS -o json` prints on the store at `store`.
pub fn ldc_cell_json(ldc: &Path, store: &Path, args: &[&str]) -> Value {
    let out = Command::new(ldc)
        .arg("--data-dir")
        .arg(store.parent().unwrap())
        .arg("--store")
        .arg(store)
        .args(["-o", "json", "cell"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ldc cell {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Makes two documents of the same verb comparable: platform detail out, the parts that
/// differ by design (a new move's id, which carries who and when; the tool's name in
/// messages) normalised.
pub fn comparable(mut v: Value) -> Value {
    strip_platform_detail(&mut v);
    if v.get("id").is_some() {
        v["id"] = Value::Null;
        v["reverse"]["command"] = Value::Null;
    }
    let text = v
        .to_string()
        .replace("kubectl cell", "TOOL")
        .replace("ldc cell", "TOOL");
    serde_json::from_str(&text).unwrap()
}

/// Asserts both front-ends print the same document for `args` (read-only verbs or dry runs).
pub fn assert_same(kubectl: &Value, local: &Value, args: &[&str]) {
    let (k, l) = (comparable(kubectl.clone()), comparable(local.clone()));
    assert_eq!(
        k, l,
        "`kubectl cell {args:?}` and `ldc cell {args:?}` disagree:\nkubectl: {k:#}\nldc:     {l:#}"
    );
}
