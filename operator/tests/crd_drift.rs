//! The CRD YAML the chart ships must be exactly what the Rust types generate, so the
//! schema the API server enforces is the one the operator was compiled against.
//! To refresh it: `cargo run -p ldc-operator --bin ldc-operator -- crd > charts/ldc/crds/ldc.dev.yaml`.

#[test]
fn committed_crds_match_the_rust_types() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/ldc/crds/ldc.dev.yaml"
    );
    let committed = std::fs::read_to_string(path).expect("charts/ldc/crds/ldc.dev.yaml");
    let generated = ldc_operator::crds_yaml();
    assert!(
        committed == generated,
        "charts/ldc/crds/ldc.dev.yaml drifted from operator/src/crd.rs; regenerate it with \
         `cargo run -p ldc-operator --bin ldc-operator -- crd > charts/ldc/crds/ldc.dev.yaml`"
    );
}
