//! The embedded store split into shard files: the conformance suite in each kind of file,
//! and what splitting is for (a held lock on one shard file stops no writer of another)
//! and what it must not break (one snapshot across files, the lock order).

use std::sync::Arc;
use std::sync::mpsc;

use ldc_store::partitioned::{self, Created};
use ldc_store::{Store, StoreError, conformance, prefix_end};

/// A store with shards 0-9 and 10-19 in their own files, 20+ in the control file; two
/// handles on it (two processes, as far as SQLite's locks go).
fn split() -> (tempfile::TempDir, Arc<dyn Store>, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    assert_eq!(
        partitioned::create(&path, &[(0, 9), (10, 19)]).unwrap(),
        Created::New
    );
    let a = ldc_store::open(path.to_str().unwrap()).unwrap();
    let b = ldc_store::open(path.to_str().unwrap()).unwrap();
    (dir, a, b)
}

#[test]
fn conformance_in_every_kind_of_file() {
    let (_dir, a, _b) = split();
    // Shard 3's file, shard 15's file, a shard left in the control file, a control key.
    for prefix in ["u/00003", "u/00015", "u/00042", "sys/conf"] {
        conformance::run_all(a.clone(), prefix);
    }
}

#[test]
fn the_layout_is_written_once_and_lists_every_file() {
    let (dir, a, _b) = split();
    let path = dir.path().join("store.db");
    match partitioned::create(&path, &[(0, 99)]).unwrap() {
        Created::Exists(l) => assert_eq!(l.len(), 2, "the first layout stays"),
        other => panic!("a second layout replaced the first: {other:?}"),
    }
    let files = partitioned::files(&path).unwrap();
    assert_eq!(files.len(), 3);
    assert!(files.iter().all(|f| f.exists()), "{files:?}");
    // A store that already holds shard records in one file stays one file.
    let old = dir.path().join("old.db");
    let s = ldc_store::open(old.to_str().unwrap()).unwrap();
    let mut t = s.begin().unwrap();
    t.put(b"own/00001", b"x").unwrap();
    t.commit().unwrap();
    assert_eq!(
        partitioned::create(&old, &[(0, 9)]).unwrap(),
        Created::SingleFile
    );
    assert_eq!(partitioned::files(&old).unwrap(), vec![old.clone()]);
    drop(a);
}

#[test]
fn scans_across_files_merge_in_order() {
    let (_dir, a, _b) = split();
    let mut t = a.begin().unwrap();
    for shard in [25u32, 1, 12, 9, 10, 0, 19] {
        t.put(format!("own/{shard:05}").as_bytes(), b"o").unwrap();
    }
    t.put(b"sys/x", b"c").unwrap();
    t.commit().unwrap();
    let mut r = a.begin_read().unwrap();
    let keys = |rows: Vec<ldc_store::Pair>| -> Vec<String> {
        rows.into_iter()
            .map(|(k, _)| String::from_utf8(k).unwrap())
            .collect()
    };
    let all = keys(r.scan(b"own/", &prefix_end(b"own/"), 100).unwrap());
    assert_eq!(
        all,
        [
            "00000", "00001", "00009", "00010", "00012", "00019", "00025"
        ]
        .map(|s| format!("own/{s}"))
    );
    let first3 = keys(r.scan(b"own/", &prefix_end(b"own/"), 3).unwrap());
    assert_eq!(first3, all[..3]);
    let from_10 = keys(r.scan(b"own/00010", &prefix_end(b"own/"), 100).unwrap());
    assert_eq!(from_10, all[3..]);
    let everything = keys(r.scan(b"", &[0xff], 100).unwrap());
    assert_eq!(everything.len(), 8, "{everything:?}");
    r.rollback().unwrap();
}

/// Holds the write lock of `key`'s file from another handle until told to let go.
fn hold(
    store: Arc<dyn Store>,
    key: &'static [u8],
) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (held_tx, held_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let h = std::thread::spawn(move || {
        // A cell's group commit.
        let mut t = store.begin_unsynced().unwrap();
        t.put(key, b"held").unwrap();
        held_tx.send(()).unwrap();
        let _ = go_rx.recv();
        t.commit().unwrap();
        store.sync().unwrap();
    });
    held_rx.recv().unwrap();
    (go_tx, h)
}

#[test]
fn a_held_shard_file_stops_no_other_writer() {
    let (_dir, a, b) = split();
    let (go, held) = hold(b.clone(), b"u/00003/stuck/k");
    // Another shard file and the control file: written while shard 3's file is held (in
    // one file, these commits would wait for the lock and fail with Busy after 10 s).
    let mut t = a.begin().unwrap();
    t.put(b"u/00012/other/k", b"1").unwrap();
    t.commit().unwrap();
    let mut t = a.begin().unwrap();
    t.put(b"sys/routing", b"r").unwrap();
    // A control transaction reads the held file's records without waiting for its lock
    // (the routing publication reads every ownership record).
    assert_eq!(t.get(b"u/00003/stuck/k").unwrap(), None);
    t.commit().unwrap();
    go.send(()).unwrap();
    held.join().unwrap();
    let mut r = a.begin_read().unwrap();
    assert_eq!(
        r.get(b"u/00003/stuck/k").unwrap().as_deref(),
        Some(&b"held"[..])
    );
    r.rollback().unwrap();
}

/// A group commit that wrote after a stale read conflicts (retryable, nothing written).
#[test]
fn a_group_commit_after_a_stale_read_conflicts() {
    let (_dir, a, b) = split();
    let mut t = a.begin_unsynced().unwrap();
    assert_eq!(t.get(b"own/00004").unwrap(), None);
    let mut other = b.begin_unsynced().unwrap();
    other.put(b"own/00004", b"theirs").unwrap();
    other.commit().unwrap();
    let e = t.put(b"own/00004", b"mine").unwrap_err();
    assert!(matches!(e, StoreError::Conflict), "{e:?}");
    assert!(e.is_retryable());
    t.rollback().unwrap();
}

/// A control operation (a move) that read a busy writer's file and then locks it reads
/// it afresh: its compare-and-set sees the writer's latest commit, and it commits.
#[test]
fn a_control_operation_locks_what_it_read_afresh() {
    let (_dir, a, b) = split();
    let mut w = b.begin_unsynced().unwrap();
    w.put(b"own/00004", b"epoch-1").unwrap();
    w.commit().unwrap();
    let mut t = a.begin().unwrap();
    assert_eq!(
        t.get(b"own/00004").unwrap().as_deref(),
        Some(&b"epoch-1"[..])
    );
    let mut w = b.begin_unsynced().unwrap();
    w.put(b"own/00004", b"epoch-2").unwrap();
    w.commit().unwrap();
    assert_eq!(
        t.get_for_update(b"own/00004").unwrap().as_deref(),
        Some(&b"epoch-2"[..]),
        "the lock was taken on a stale snapshot"
    );
    t.put(b"own/00004", b"epoch-3").unwrap();
    t.commit().unwrap();
    let mut r = a.begin_read().unwrap();
    assert_eq!(
        r.get(b"own/00004").unwrap().as_deref(),
        Some(&b"epoch-3"[..])
    );
    r.rollback().unwrap();
}

#[test]
fn the_control_file_is_locked_before_any_shard_file() {
    let (_dir, a, b) = split();
    // A group commit that touches the control file after a shard file is a bug.
    let mut t = a.begin_unsynced().unwrap();
    t.put(b"own/00004", b"x").unwrap();
    let e = t.put(b"sys/routing", b"r").unwrap_err();
    assert!(
        matches!(e, StoreError::Backend(ref m) if m.contains("lock order")),
        "{e:?}"
    );
    t.rollback().unwrap();
    // A control operation takes the control file first, whatever it touches first.
    let mut t = a.begin().unwrap();
    t.put(b"own/00004", b"x").unwrap();
    let mut other = b.begin_unsynced().unwrap();
    assert_eq!(
        other.get(b"sys/routing").unwrap(),
        None,
        "a read waits for no lock"
    );
    other.rollback().unwrap();
    t.put(b"sys/routing", b"r").unwrap();
    t.put(b"own/00014", b"y").unwrap();
    t.commit().unwrap();
    let mut r = a.begin_read().unwrap();
    assert_eq!(r.get(b"own/00014").unwrap().as_deref(), Some(&b"y"[..]));
    r.rollback().unwrap();
}

/// Money moves from a shard of one file to a shard of the other as the relay moves it: a
/// debit (counted in `sent`) committed in the payer's file, then its credit (counted in
/// `applied`) in the payee's. At no instant is more applied than sent: `begin_snapshot`
/// must never see that, while `begin_read` (a snapshot per file, taken at first use) can
/// (reconciliation would then find money in flight that is negative).
#[test]
fn a_snapshot_is_one_instant_of_every_file() {
    let (_dir, a, b) = split();
    let (sent, applied): (&[u8], &[u8]) = (b"x/00001/EUR/sent", b"x/00011/EUR/applied");
    let mut t = a.begin().unwrap();
    t.put(sent, b"0").unwrap();
    t.put(applied, b"0").unwrap();
    t.commit().unwrap();
    let value = |t: &mut Box<dyn ldc_store::Txn>, k: &[u8]| -> i64 {
        let raw = t.get(k).unwrap().unwrap();
        std::str::from_utf8(&raw).unwrap().parse().unwrap()
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mover = {
        let (b, stop) = (b.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut moves = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for k in [sent, applied] {
                    // As a cell's writer does: the file locked first (its fence), then read.
                    let mut t = b.begin_unsynced().unwrap();
                    let raw = t.get_for_update(k).unwrap().unwrap();
                    let v: i64 = std::str::from_utf8(&raw).unwrap().parse().unwrap();
                    t.put(k, (v + 1).to_string().as_bytes()).unwrap();
                    t.commit().unwrap();
                }
                moves += 1;
            }
            moves
        })
    };
    for _ in 0..300 {
        let mut s = a.begin_snapshot().unwrap();
        let s_sent = value(&mut s, sent);
        // The payee's file read a moment after the payer's.
        std::thread::sleep(std::time::Duration::from_millis(1));
        let s_applied = value(&mut s, applied);
        s.rollback().unwrap();
        assert!(
            s_applied <= s_sent,
            "a snapshot saw {s_applied} credits applied of {s_sent} sent"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(mover.join().unwrap() > 0);
}
