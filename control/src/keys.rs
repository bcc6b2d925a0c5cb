//! Every control key (see the table in the crate docs). Shard-scoped keys (`own/…`) follow
//! the store's convention that a shard's keys start with `{space}/{shard:05}`, so the
//! embedded store keeps a shard's fence in that shard's file.

pub const CONFIG: &[u8] = b"sys/config";
pub const TOPOLOGY: &[u8] = b"sys/topology";
pub use ldc_core::routing::{SIGNATURE_KEY as ROUTING_SIGNATURE, STORE_KEY as ROUTING};

pub const CELLS_PREFIX: &str = "sys/cells/";

/// `sys/cells/{cell}`: what `ldc up` knows about a running cell.
pub fn cell_runtime(cell: &str) -> Vec<u8> {
    format!("{CELLS_PREFIX}{cell}").into_bytes()
}

pub const OWNER_PREFIX: &[u8] = b"own/";

/// `own/{shard:05}`: who owns a shard, at which epoch (the fencing record).
pub fn owner(shard: u32) -> Vec<u8> {
    format!("own/{shard:05}").into_bytes()
}

/// Moves applied on the local platform: `sys/ops/{id}`.
pub const LOCAL_MOVES_PREFIX: &str = "sys/ops/";

/// Moves the operator applied for one Topology (`scope` is `namespace/topology`):
/// `sys/k8s/op/{scope}/`.
pub fn operator_moves_prefix(scope: &str) -> String {
    format!("sys/k8s/op/{scope}/")
}

pub const TRAFFIC_PREFIX: &str = "sys/traffic/";

/// `sys/traffic/{cell}`: a cell's release state and audit trail (local platform).
pub fn traffic(cell: &str) -> Vec<u8> {
    format!("{TRAFFIC_PREFIX}{cell}").into_bytes()
}

/// `sys/relay/{cell}`: the lease saying which colour's relay delivers a cell's outbox.
pub fn relay_lease(cell: &str) -> Vec<u8> {
    format!("sys/relay/{cell}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_control_key_is_a_system_key_or_a_shard_fence() {
        for k in [
            CONFIG.to_vec(),
            TOPOLOGY.to_vec(),
            ROUTING.to_vec(),
            ROUTING_SIGNATURE.to_vec(),
            cell_runtime("a"),
            LOCAL_MOVES_PREFIX.as_bytes().to_vec(),
            operator_moves_prefix("ns/t").into_bytes(),
            traffic("a"),
            relay_lease("a"),
        ] {
            assert!(k.starts_with(b"sys/"), "{}", String::from_utf8_lossy(&k));
        }
        assert_eq!(owner(7), b"own/00007");
    }
}
