//! Runs the conformance suite on every backend that is available: the embedded SQLite
//! store always, TiKV when `LDC_TIKV_PD` names PD endpoints (and the `tikv` feature is on).

use std::sync::Arc;

use ldc_store::{Store, conformance, sqlite::SqliteStore};

#[test]
fn sqlite_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("store.db")).unwrap());
    conformance::run_all(store, "conf");
}

/// Two handles on one file behave like two processes sharing the store.
#[test]
fn sqlite_two_handles_share_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let a: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    let b: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    let mut t = a.begin().unwrap();
    t.put(b"k", b"from-a").unwrap();
    t.commit().unwrap();
    let mut r = b.begin_read().unwrap();
    assert_eq!(r.get(b"k").unwrap().as_deref(), Some(&b"from-a"[..]));
    r.rollback().unwrap();
    // A read snapshot does not see later commits; a new one does.
    let mut snap = b.begin_read().unwrap();
    assert!(snap.get(b"k").unwrap().is_some());
    let mut t = a.begin().unwrap();
    t.put(b"k", b"again").unwrap();
    t.commit().unwrap();
    assert_eq!(
        snap.get(b"k").unwrap().as_deref(),
        Some(&b"from-a"[..]),
        "snapshot not stable"
    );
    snap.rollback().unwrap();
}

#[cfg(feature = "tikv")]
#[test]
fn tikv_conformance() {
    let Ok(pd) = std::env::var("LDC_TIKV_PD") else {
        eprintln!("LDC_TIKV_PD not set: TiKV conformance not run");
        return;
    };
    let store = ldc_store::open(&format!("tikv://{pd}")).unwrap();
    let prefix = format!("conf-{}", std::process::id());
    conformance::run_all(store, &prefix);
}
