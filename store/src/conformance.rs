//! The conformance suite every backend must pass.
//!
//! Public (not `cfg(test)`) so each backend's integration test calls the same functions:
//! `store/tests/conformance.rs` runs them on SQLite always and on TiKV when `LDC_TIKV_PD`
//! names PD endpoints. Each check uses its own key prefix so the suite can run against a
//! shared, non-empty store. Failures panic with a message naming the broken property.

use std::sync::Arc;

use crate::overlay::Overlay;
use crate::{Kv, Store, StoreError, prefix_end};

fn k(prefix: &str, s: &str) -> Vec<u8> {
    format!("{prefix}/{s}").into_bytes()
}

/// Runs every check with keys under `prefix`.
pub fn run_all(store: Arc<dyn Store>, prefix: &str) {
    put_get_delete(&*store, &format!("{prefix}/pgd"));
    scan_order_range_limit(&*store, &format!("{prefix}/scan"));
    rollback_and_drop_discard(&*store, &format!("{prefix}/rb"));
    read_your_writes_and_snapshot(&*store, &format!("{prefix}/ryw"));
    overlay_isolation(&*store, &format!("{prefix}/ov"));
    unsynced_commit_then_sync(&*store, &format!("{prefix}/us"));
    concurrent_increments_are_serialisable(store, &format!("{prefix}/inc"));
}

/// Committed writes are visible to later transactions; deletes remove.
pub fn put_get_delete(store: &dyn Store, p: &str) {
    let mut t = store.begin().unwrap();
    t.put(&k(p, "a"), b"1").unwrap();
    t.put(&k(p, "b"), b"").unwrap();
    t.commit().unwrap();
    let mut t = store.begin_read().unwrap();
    assert_eq!(
        t.get(&k(p, "a")).unwrap().as_deref(),
        Some(&b"1"[..]),
        "committed put not visible"
    );
    assert_eq!(
        t.get(&k(p, "b")).unwrap().as_deref(),
        Some(&b""[..]),
        "empty value must differ from absent"
    );
    assert_eq!(t.get(&k(p, "zz")).unwrap(), None);
    t.rollback().unwrap();
    let mut t = store.begin().unwrap();
    t.put(&k(p, "a"), b"2").unwrap();
    t.delete(&k(p, "b")).unwrap();
    t.commit().unwrap();
    let mut t = store.begin_read().unwrap();
    assert_eq!(
        t.get(&k(p, "a")).unwrap().as_deref(),
        Some(&b"2"[..]),
        "overwrite lost"
    );
    assert_eq!(t.get(&k(p, "b")).unwrap(), None, "delete not applied");
    t.rollback().unwrap();
}

/// An unsynced commit is visible to the next transactions at once (group commit executes
/// the next batch on top of it), a rollback of one leaves nothing, `sync` succeeds, and
/// an ordinary transaction afterwards still commits.
pub fn unsynced_commit_then_sync(store: &dyn Store, p: &str) {
    let mut t = store.begin_unsynced().unwrap();
    t.put(&k(p, "a"), b"1").unwrap();
    t.commit().unwrap();
    let mut t = store.begin_unsynced().unwrap();
    assert_eq!(
        t.get(&k(p, "a")).unwrap().as_deref(),
        Some(&b"1"[..]),
        "an unsynced commit must be visible to the next write transaction"
    );
    t.put(&k(p, "b"), b"2").unwrap();
    t.rollback().unwrap();
    store.sync().unwrap();
    let mut t = store.begin().unwrap();
    assert_eq!(
        t.get(&k(p, "b")).unwrap(),
        None,
        "rolled back write visible"
    );
    t.put(&k(p, "c"), b"3").unwrap();
    t.commit().unwrap();
    let mut t = store.begin_read().unwrap();
    assert_eq!(t.get(&k(p, "a")).unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(t.get(&k(p, "c")).unwrap().as_deref(), Some(&b"3"[..]));
    t.rollback().unwrap();
}

/// Scans return `[start, end)` ascending, bytewise, honouring the limit.
pub fn scan_order_range_limit(store: &dyn Store, p: &str) {
    let mut t = store.begin().unwrap();
    for s in ["c", "a", "b", "d", "b0", "\u{7f}"] {
        t.put(&k(p, s), s.as_bytes()).unwrap();
    }
    t.commit().unwrap();
    let mut t = store.begin_read().unwrap();
    let all = t
        .scan(&k(p, ""), &prefix_end(format!("{p}/").as_bytes()), 100)
        .unwrap();
    let keys: Vec<String> = all
        .iter()
        .map(|(k, _)| String::from_utf8(k.clone()).unwrap())
        .collect();
    let want: Vec<String> = ["a", "b", "b0", "c", "d", "\u{7f}"]
        .iter()
        .map(|s| format!("{p}/{s}"))
        .collect();
    assert_eq!(keys, want, "scan order or range wrong");
    let two = t.scan(&k(p, "b"), &k(p, "d"), 2).unwrap();
    assert_eq!(two.len(), 2, "scan limit ignored");
    assert_eq!(two[0].0, k(p, "b"));
    assert_eq!(two[1].0, k(p, "b0"));
    assert!(t.scan(&k(p, "x"), &k(p, "y"), 10).unwrap().is_empty());
    t.rollback().unwrap();
}

/// Rolled back and dropped transactions leave nothing behind.
pub fn rollback_and_drop_discard(store: &dyn Store, p: &str) {
    let mut t = store.begin().unwrap();
    t.put(&k(p, "x"), b"1").unwrap();
    t.rollback().unwrap();
    {
        let mut t = store.begin().unwrap();
        t.put(&k(p, "y"), b"1").unwrap();
        // dropped here
    }
    let mut t = store.begin_read().unwrap();
    assert_eq!(t.get(&k(p, "x")).unwrap(), None, "rollback leaked a write");
    assert_eq!(
        t.get(&k(p, "y")).unwrap(),
        None,
        "dropped transaction leaked a write"
    );
    t.rollback().unwrap();
}

/// A transaction sees its own writes, including in scans.
pub fn read_your_writes_and_snapshot(store: &dyn Store, p: &str) {
    let mut t = store.begin().unwrap();
    t.put(&k(p, "m"), b"1").unwrap();
    assert_eq!(t.get(&k(p, "m")).unwrap().as_deref(), Some(&b"1"[..]));
    let s = t
        .scan(&k(p, ""), &prefix_end(format!("{p}/").as_bytes()), 10)
        .unwrap();
    assert_eq!(s.len(), 1, "scan misses the transaction's own write");
    t.commit().unwrap();
}

/// Overlays merge on success and discard on drop, and scans see merged state.
pub fn overlay_isolation(store: &dyn Store, p: &str) {
    let mut t = store.begin().unwrap();
    t.put(&k(p, "1"), b"base").unwrap();
    t.put(&k(p, "2"), b"base").unwrap();
    {
        let mut o = Overlay::new(&mut *t);
        o.put(&k(p, "1"), b"changed").unwrap();
        o.delete(&k(p, "2")).unwrap();
        o.put(&k(p, "3"), b"new").unwrap();
        let s = o
            .scan(&k(p, ""), &prefix_end(format!("{p}/").as_bytes()), 10)
            .unwrap();
        let keys: Vec<Vec<u8>> = s.into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            vec![k(p, "1"), k(p, "3")],
            "overlay scan does not merge"
        );
        // Limit with a horizon: parent has 1,2; local adds 3 and deletes 2.
        let one = o
            .scan(&k(p, ""), &prefix_end(format!("{p}/").as_bytes()), 1)
            .unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].0, k(p, "1"));
        // dropped: discarded
    }
    assert_eq!(
        t.get(&k(p, "1")).unwrap().as_deref(),
        Some(&b"base"[..]),
        "dropped overlay leaked"
    );
    {
        let mut o = Overlay::new(&mut *t);
        o.put(&k(p, "1"), b"changed").unwrap();
        o.delete(&k(p, "2")).unwrap();
        assert_eq!(
            o.get_for_update(&k(p, "1")).unwrap().as_deref(),
            Some(&b"changed"[..])
        );
        o.merge().unwrap();
    }
    t.commit().unwrap();
    let mut r = store.begin_read().unwrap();
    assert_eq!(
        r.get(&k(p, "1")).unwrap().as_deref(),
        Some(&b"changed"[..]),
        "merged overlay lost"
    );
    assert_eq!(r.get(&k(p, "2")).unwrap(), None, "merged delete lost");
    r.rollback().unwrap();
}

/// Two threads incrementing one counter read with `get_for_update` never lose an update:
/// either the engine serialises them (SQLite) or the loser's commit conflicts and retries.
pub fn concurrent_increments_are_serialisable(store: Arc<dyn Store>, p: &str) {
    const PER_THREAD: u64 = 100;
    let key = k(p, "counter");
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let store = store.clone();
            let key = key.clone();
            std::thread::spawn(move || {
                for _ in 0..PER_THREAD {
                    for attempt in 0.. {
                        assert!(attempt < 1000, "increment starved");
                        let mut t = match store.begin() {
                            Ok(t) => t,
                            Err(e) if e.is_retryable() => continue,
                            Err(e) => panic!("begin failed: {e}"),
                        };
                        let v = t
                            .get_for_update(&key)
                            .unwrap()
                            .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
                            .unwrap_or(0);
                        t.put(&key, &(v + 1).to_be_bytes()).unwrap();
                        match t.commit() {
                            Ok(()) => break,
                            Err(StoreError::Conflict) | Err(StoreError::Busy(_)) => continue,
                            Err(e) => panic!("commit failed: {e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut t = store.begin_read().unwrap();
    let v = u64::from_be_bytes(t.get(&key).unwrap().unwrap().try_into().unwrap());
    t.rollback().unwrap();
    assert_eq!(
        v,
        2 * PER_THREAD,
        "lost update: the store is not serialisable for get_for_update keys"
    );
}
