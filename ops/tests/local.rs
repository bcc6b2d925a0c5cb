//! Every verb on the local platform, in a temporary directory on a real store (the
//! embedded SQLite engine `ldc up` uses): the reports, the refusals, the records.

use std::sync::Arc;

use ldc_control::{CellRuntime, keys};
use ldc_core::planner::{Command, Topology};
use ldc_core::traffic::Action;
use ldc_ops::cli::Verb;
use ldc_ops::local::LocalPlatform;
use ldc_ops::verbs::Report;
use ldc_ops::verbs::moves::{MoveCommand, MoveOpts};
use ldc_ops::verbs::traffic::TrafficAction;
use ldc_ops::{OpsError, Platform, PlatformError, run};
use ldc_store::Store;

struct Local {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    p: LocalPlatform,
}

/// Two regions: r1 with r1-a, r1-b serving and standby r1-s; r2 with r2-a and standby
/// r2-s; 12 shards; every cell healthy with a blue process, r1-a with a green one too.
fn platform() -> Local {
    let dir = tempfile::tempdir().unwrap();
    let store = ldc_store::open(dir.path().join("store.db").to_str().unwrap()).unwrap();
    let topo = Topology::new(
        12,
        &[
            ("r1-a", "r1"),
            ("r1-b", "r1"),
            ("r1-s", "r1"),
            ("r2-a", "r2"),
            ("r2-s", "r2"),
        ],
    );
    let mut t = store.begin().unwrap();
    ldc_control::init(&mut *t, &topo, &["r1-a", "r1-b", "r2-a"], 0).unwrap();
    for (i, c) in topo.cells.iter().enumerate() {
        let rt = CellRuntime {
            region: c.region.clone(),
            blue: vec![format!("127.0.0.1:{}", 7000 + i)],
            green: if c.id == "r1-a" {
                vec!["127.0.0.1:7100".into()]
            } else {
                vec![]
            },
            pids: vec![100 + i as u32, 0],
            metrics: vec![String::new(), String::new()],
            healthy: true,
        };
        ldc_control::put_cell_runtime(&mut *t, &c.id, &rt).unwrap();
    }
    ldc_control::publish_routing(&mut *t, &Default::default(), None).unwrap();
    t.commit().unwrap();
    Local {
        p: LocalPlatform::new(store.clone(), None),
        store,
        _dir: dir,
    }
}

impl Local {
    fn set_healthy(&self, cell: &str, healthy: bool) {
        let mut t = self.store.begin().unwrap();
        let mut rt = ldc_control::load_cell_runtimes(&mut *t).unwrap()[cell].clone();
        rt.healthy = healthy;
        ldc_control::put_cell_runtime(&mut *t, cell, &rt).unwrap();
        t.commit().unwrap();
    }
}

fn mv(command: MoveCommand, dry_run: bool) -> Verb {
    Verb::Move {
        command,
        opts: MoveOpts {
            dry_run,
            force: false,
        },
    }
}

fn failover(cell: &str) -> MoveCommand {
    MoveCommand::Failover { cell: cell.into() }
}

fn shift(cell: &str, a: TrafficAction, dry_run: bool) -> Verb {
    Verb::Traffic {
        cell: cell.into(),
        action: a,
        dry_run,
    }
}

async fn status(p: &LocalPlatform) -> ldc_ops::verbs::status::StatusReport {
    match run(
        p,
        Verb::Status {
            watch: false,
            until_settled: false,
        },
    )
    .await
    .unwrap()
    {
        Report::Status(s) => s,
        r => panic!("{r:?}"),
    }
}

#[tokio::test]
async fn status_reports_every_cell() {
    let l = platform();
    let s = status(&l.p).await;
    assert_eq!(
        (s.shard_count, s.routing_epoch, s.regions.len()),
        (12, 1, 2)
    );
    let row = |c: &str| s.cells.iter().find(|r| r.cell == c).unwrap().clone();
    let a = row("r1-a");
    assert_eq!(
        (a.role, a.ranges.as_str(), a.epoch_span.as_str()),
        ("serving", "0-3", "1")
    );
    assert_eq!((a.colours.blue.live, a.colours.green.live), (1, 1));
    assert_eq!(a.colours.blue.detail["pid"], 100);
    assert_eq!(row("r1-s").role, "standby");
    assert_eq!(row("r1-s").ranges, "-");
    // camelCase keys, one style on both front-ends.
    let j = serde_json::to_value(&s).unwrap();
    assert!(j["cells"][0].get("greenWeightBp").is_some(), "{j}");
    assert!(j.get("routingEpoch").is_some());
}

#[tokio::test]
async fn moves_plan_apply_record_and_revert() {
    let l = platform();
    // A dry run plans and checks the reverse, and writes nothing.
    let Report::Move(d) = run(&l.p, mv(failover("r1-a"), true)).await.unwrap() else {
        panic!()
    };
    assert!(d.dry_run && d.result.is_none());
    assert_eq!(d.moves.len(), 4);
    assert!(d.moves.iter().all(|m| m.to == "r1-s" && m.epoch_after == 2));
    assert!(d.reverse.possible && d.reverse.waits_for.is_empty());
    assert_eq!(
        status(&l.p).await.routing_epoch,
        1,
        "a dry run changed nothing"
    );

    // The move: fenced, published, recorded.
    l.set_healthy("r1-a", false);
    let Report::Move(m) = run(&l.p, mv(failover("r1-a"), false)).await.unwrap() else {
        panic!()
    };
    let res = m.result.clone().unwrap();
    assert_eq!((res.shards_moved, res.routing_epoch), (4, 2));
    assert_eq!(
        m.reverse.waits_for,
        ["r1-a"],
        "the reverse waits for r1-a to recover"
    );
    let s = status(&l.p).await;
    assert_eq!(s.routing_epoch, 2);
    let standby = s.cells.iter().find(|c| c.cell == "r1-s").unwrap();
    assert_eq!(
        (standby.ranges.as_str(), standby.epoch_span.as_str()),
        ("0-3", "2")
    );
    let Report::History(h) = run(
        &l.p,
        Verb::History {
            cell: None,
            limit: 0,
        },
    )
    .await
    .unwrap() else {
        panic!()
    };
    assert_eq!(h.moves.len(), 1);
    assert_eq!(h.moves[0].id, m.id);
    assert_eq!(h.moves[0].command, "failover r1-a");
    assert_eq!(h.moves[0].moved_from["r1-a"], "0-3");

    // Revert waits for r1-a; once healthy it sends the shards home, epoch + 1.
    let revert = mv(MoveCommand::Revert { op: m.id.clone() }, false);
    let e = run(&l.p, revert.clone()).await.unwrap_err();
    assert_eq!(e.exit_code(), 2, "{e}");
    assert!(e.to_string().contains("r1-a"), "{e}");
    l.set_healthy("r1-a", true);
    let Report::Move(r) = run(&l.p, revert).await.unwrap() else {
        panic!()
    };
    assert_eq!(r.command, format!("revert {}", m.id));
    assert!(r.moves.iter().all(|m| m.to == "r1-a" && m.epoch_after == 3));
    let Report::History(h) = run(
        &l.p,
        Verb::History {
            cell: Some("r1-a".into()),
            limit: 1,
        },
    )
    .await
    .unwrap() else {
        panic!()
    };
    assert_eq!(
        (h.moves.len(), h.moves_total),
        (1, 2),
        "both moves involve r1-a"
    );
    assert_eq!(h.moves[0].id, r.id, "the newest is shown");
}

#[tokio::test]
async fn refusals_say_what_to_do_and_write_nothing() {
    let l = platform();
    let refused = |e: OpsError| {
        assert_eq!(e.exit_code(), 2, "{e}");
        e.to_string()
    };
    let e = refused(run(&l.p, mv(failover("nope"), false)).await.unwrap_err());
    assert!(e.contains("nope"), "{e}");
    l.set_healthy("r2-s", false);
    let e = refused(
        run(
            &l.p,
            mv(
                MoveCommand::Switchover {
                    cell: "r2-a".into(),
                    to: "r2-s".into(),
                },
                false,
            ),
        )
        .await
        .unwrap_err(),
    );
    assert!(e.contains("not healthy"), "{e}");
    let e = refused(
        run(&l.p, mv(MoveCommand::Revert { op: "op-0".into() }, false))
            .await
            .unwrap_err(),
    );
    assert!(e.contains("ldc cell history"), "{e}");
    let e = refused(
        run(&l.p, shift("r9", TrafficAction::Do(Action::Promote), false))
            .await
            .unwrap_err(),
    );
    assert!(e.contains("unknown cell") && e.contains("r1-a"), "{e}");
    // Green cannot take users where nothing runs in green.
    let e = refused(
        run(
            &l.p,
            shift("r1-b", TrafficAction::Do(Action::Set(100)), false),
        )
        .await
        .unwrap_err(),
    );
    assert!(e.contains("nothing running in green"), "{e}");
    assert_eq!(status(&l.p).await.routing_epoch, 1, "nothing was written");
}

#[tokio::test]
async fn a_release_steps_pauses_undoes_and_aborts() {
    let l = platform();
    let t = |r: Report| match r {
        Report::Traffic(t) => t,
        r => panic!("{r:?}"),
    };
    // --next walks the local release steps: 1%, 10%, ...
    let a = t(run(&l.p, shift("r1-a", TrafficAction::Next, false))
        .await
        .unwrap());
    assert_eq!(
        (
            a.decision.before_bp,
            a.decision.after_bp,
            a.routing_epoch_after
        ),
        (0, 100, 2)
    );
    let a = t(run(&l.p, shift("r1-a", TrafficAction::Next, false))
        .await
        .unwrap());
    assert_eq!(a.decision.after_bp, 1000);
    let s = status(&l.p).await;
    let r1a = s.cells.iter().find(|c| c.cell == "r1-a").unwrap();
    assert_eq!(
        (r1a.green_weight_bp, r1a.step.as_deref()),
        (1000, Some("step 2/4"))
    );
    // Paused: shifts are refused, abort still works.
    t(
        run(&l.p, shift("r1-a", TrafficAction::Do(Action::Pause), false))
            .await
            .unwrap(),
    );
    let e = run(&l.p, shift("r1-a", TrafficAction::Next, false))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("--resume"), "{e}");
    let dry = t(
        run(&l.p, shift("r1-a", TrafficAction::Do(Action::Abort), true))
            .await
            .unwrap(),
    );
    assert!(dry.dry_run && dry.decision.after_bp == 0);
    t(run(
        &l.p,
        shift("r1-a", TrafficAction::Do(Action::Resume), false),
    )
    .await
    .unwrap());
    let u = t(
        run(&l.p, shift("r1-a", TrafficAction::Do(Action::Undo), false))
            .await
            .unwrap(),
    );
    assert!(u.decision.paused_after, "undo of the resume pauses again");
    let a = t(
        run(&l.p, shift("r1-a", TrafficAction::Do(Action::Abort), false))
            .await
            .unwrap(),
    );
    assert_eq!((a.decision.after_bp, a.decision.paused_after), (0, false));
    let Report::History(h) = run(
        &l.p,
        Verb::History {
            cell: Some("r1-a".into()),
            limit: 0,
        },
    )
    .await
    .unwrap() else {
        panic!()
    };
    let actions: Vec<&str> = h.traffic.iter().map(|c| c.change.action.as_str()).collect();
    assert_eq!(
        actions,
        ["shift", "shift", "pause", "resume", "undo", "abort"]
    );
    assert!(h.traffic.iter().all(|c| c.change.by.contains('@')));
}

/// The optimistic lock: a move decided on a snapshot that another move has overtaken is
/// a conflict and writes nothing (the driver then decides again).
#[tokio::test]
async fn a_stale_decision_is_a_conflict() {
    let l = platform();
    let before = l.p.snapshot().await.unwrap();
    let plan = ldc_core::planner::plan(
        &before.topology,
        &before.map,
        &before.health(),
        &Command::Failover {
            cell: "r1-a".into(),
        },
    )
    .unwrap();
    run(&l.p, mv(failover("r1-a"), false)).await.unwrap();
    let e =
        l.p.record_move(&before, "late-1", &plan, "me")
            .await
            .unwrap_err();
    assert_eq!(e, PlatformError::Conflict);
    let mut t = l.store.begin_read().unwrap();
    assert!(
        ldc_control::moves::get(&mut *t, keys::LOCAL_MOVES_PREFIX, "late-1", false)
            .unwrap()
            .is_none()
    );
    t.rollback().unwrap();
    // A traffic change decided before another one is a conflict too.
    let snap = l.p.snapshot().await.unwrap();
    run(
        &l.p,
        shift("r1-a", TrafficAction::Do(Action::Set(500)), false),
    )
    .await
    .unwrap();
    let (action, d) = ldc_ops::verbs::traffic::decide(
        &snap,
        "ldc cell",
        "r1-a",
        TrafficAction::Do(Action::Set(700)),
    )
    .unwrap();
    let ch = ldc_ops::verbs::traffic::change(action, &d, "me", 1, snap.routing_epoch);
    assert_eq!(
        l.p.record_traffic(&snap, "r1-a", &ch).await.unwrap_err(),
        PlatformError::Conflict
    );
}

/// History is kept in full past one scan's bound; `--limit` shows the newest and says
/// how many there are.
#[tokio::test]
async fn history_beyond_ten_thousand_moves_is_kept() {
    let l = platform();
    let n = ldc_store::SCAN_LIMIT_MAX + 500;
    let mut t = l.store.begin().unwrap();
    for i in 0..n {
        let rec = ldc_control::moves::MoveRecord {
            id: format!("m-{i:06}"),
            // Every tenth moves r2-a's shards: `history r2-a` pages through the rest.
            command: if i % 10 == 0 {
                "failover r2-a"
            } else {
                "failover r1-a"
            }
            .into(),
            summary: String::new(),
            shards_moved: 1,
            routing_epoch: i as u64,
            moved_from: Default::default(),
            by: "test".into(),
            at_unix_ms: i as u64,
        };
        ldc_control::moves::put(&mut *t, keys::LOCAL_MOVES_PREFIX, &rec).unwrap();
    }
    t.commit().unwrap();
    let Report::History(h) = run(
        &l.p,
        Verb::History {
            cell: None,
            limit: 5,
        },
    )
    .await
    .unwrap() else {
        panic!()
    };
    assert_eq!((h.moves.len(), h.moves_total), (5, n));
    assert_eq!(h.moves[4].id, format!("m-{:06}", n - 1));
    let text = ldc_ops::render::render(&Report::History(h), ldc_ops::cli::Format::Text, "ldc cell");
    assert!(
        text.contains(&format!("the newest 5 of {n} moves")),
        "{text}"
    );
    let Report::History(all) = run(
        &l.p,
        Verb::History {
            cell: None,
            limit: 0,
        },
    )
    .await
    .unwrap() else {
        panic!()
    };
    assert_eq!(all.moves.len(), n);
    let Report::History(r2a) = run(
        &l.p,
        Verb::History {
            cell: Some("r2-a".into()),
            limit: 3,
        },
    )
    .await
    .unwrap() else {
        panic!()
    };
    assert_eq!((r2a.moves.len(), r2a.moves_total), (3, n.div_ceil(10)));
    let last = (n - 1) / 10 * 10;
    assert_eq!(r2a.moves[2].id, format!("m-{last:06}"));
}

#[test]
fn every_report_renders_as_text_json_and_yaml() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let l = platform();
    let r = rt
        .block_on(run(
            &l.p,
            Verb::Status {
                watch: false,
                until_settled: false,
            },
        ))
        .unwrap();
    use ldc_ops::cli::Format;
    let text = ldc_ops::render::render(&r, Format::Text, "ldc cell");
    assert!(
        text.starts_with("routing epoch 1, 12 shards, regions r1,r2\nCELL"),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ldc_ops::render::render(&r, Format::Json, "ldc cell")).unwrap();
    let yaml: serde_json::Value =
        serde_yaml::from_str(&ldc_ops::render::render(&r, Format::Yaml, "ldc cell")).unwrap();
    assert_eq!(json, yaml);
}

fn route(users: &[&str]) -> Verb {
    Verb::Route {
        users: users.iter().map(|u| u.to_string()).collect(),
        stdin: false,
    }
}

#[tokio::test]
async fn route_follows_the_table_in_force_and_refuses_bad_users() {
    let l = platform();
    let users: Vec<String> = (0..64).map(|i| format!("user-{i}")).collect();
    let refs: Vec<&str> = users.iter().map(String::as_str).collect();
    let Report::Route(r) = run(&l.p, route(&refs)).await.unwrap() else {
        panic!("a route report");
    };
    assert_eq!((r.routing_epoch, r.routes.len()), (1, 64));
    for u in &r.routes {
        assert_eq!(u.shard, ldc_core::shard::shard_of(&u.user, 12));
        assert_eq!(u.shard_epoch, 1);
        assert_eq!(u.colour, "blue", "green is at 0%");
        assert!(u.endpoints[0].starts_with("127.0.0.1:70"), "{u:?}");
    }
    let moved: Vec<String> = r
        .routes
        .iter()
        .filter(|u| u.cell == "r1-a")
        .map(|u| u.user.clone())
        .collect();
    assert!(!moved.is_empty());

    // After a failover of r1-a, its users go to the standby, at the next shard epoch.
    run(&l.p, mv(failover("r1-a"), false)).await.unwrap();
    let moved_refs: Vec<&str> = moved.iter().map(String::as_str).collect();
    let Report::Route(after) = run(&l.p, route(&moved_refs)).await.unwrap() else {
        panic!("a route report");
    };
    assert_eq!(after.routing_epoch, 2);
    for u in &after.routes {
        assert_eq!((u.cell.as_str(), u.shard_epoch), ("r1-s", 2), "{u:?}");
    }

    for (users, says) in [
        (vec![], "name at least one user"),
        (vec!["bad user"], "user \"bad user\""),
    ] {
        let err = run(&l.p, route(&users)).await.unwrap_err();
        assert!(
            matches!(&err, OpsError::Refused(m) if m.contains(says)),
            "{err:?}"
        );
    }
    let many = vec!["u"; ldc_ops::verbs::route::ROUTE_USERS_MAX + 1];
    let err = run(&l.p, route(&many)).await.unwrap_err();
    assert!(matches!(&err, OpsError::Refused(m) if m.contains("at most")));
}
