//! Property tests of the ledger on the real embedded store: random interleavings of every
//! command, idempotency replays, and cross-cell transfers delivered and settled in random
//! order (and twice) keep money conserved and apply every payment exactly once.

use std::collections::BTreeMap;
use std::sync::Arc;

use ldc_cell::ledger::{self, Command, Ctx, Outcome};
use ldc_cell::reconcile;
use ldc_cell::{PaymentError, keys};
use ldc_core::planner::Topology;
use ldc_core::proto::{self, DeliverOutcome, PaymentStatus};
use ldc_core::shard::shard_of;
use ldc_store::{Store, prefix_end, sqlite::SqliteStore};
use proptest::prelude::*;
use prost::Message;

const SHARDS: u32 = 8;
const USERS: [&str; 6] = ["alice", "bob", "carol", "dave", "erin", "frank"];

struct World {
    store: Arc<dyn Store>,
    _dir: tempfile::TempDir,
    /// (command, first outcome) of every acknowledged mutating command, for replays.
    acked: Vec<(Command, Outcome)>,
    /// Σ acknowledged top-ups − withdrawals per currency.
    net_external: BTreeMap<String, i128>,
    /// TRANSFER_IN payment ids with their payee, candidates for refunds.
    received: Vec<(String, String)>,
    now: u64,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let topo = Topology::new(SHARDS, &[("c1", "r1"), ("c2", "r1")]);
        let mut t = store.begin().unwrap();
        assert!(ldc_control::init(&mut *t, &topo, &["c1", "c2"], 0).unwrap());
        t.commit().unwrap();
        World {
            store,
            _dir: dir,
            acked: vec![],
            net_external: BTreeMap::new(),
            received: vec![],
            now: 1,
        }
    }

    /// Accounts for alice and bob in EUR, alice topped up with 100.
    fn alice_with_100_and_bob() -> World {
        let mut w = World::new();
        for (i, u) in ["alice", "bob"].iter().enumerate() {
            w.run(&Command::OpenAccount {
                user: (*u).into(),
                currency: "EUR".into(),
                key: format!("o{i}"),
            })
            .unwrap();
        }
        w.run(&Command::TopUp {
            user: "alice".into(),
            amount: 100,
            currency: "EUR".into(),
            key: "t".into(),
        })
        .unwrap();
        w
    }

    fn owner(&self, shard: u32) -> String {
        let mut t = self.store.begin_read().unwrap();
        let m = ldc_control::load_map(&mut *t, SHARDS).unwrap();
        m.owners[shard as usize].cell.clone()
    }

    /// Runs one command as its shard's owner, in its own transaction.
    fn run(&mut self, cmd: &Command) -> Result<Outcome, PaymentError> {
        cmd.validate()?;
        let shard = cmd.shard(SHARDS);
        let cell = self.owner(shard);
        self.now += 1;
        let ctx = Ctx {
            cell: &cell,
            shard_count: SHARDS,
            now_ms: self.now,
        };
        let mut t = self.store.begin().unwrap();
        let r = ledger::fence(&mut *t, &cell, shard)
            .and_then(|epoch| ledger::execute(&mut *t, &ctx, epoch, cmd));
        match &r {
            Ok(_) => t.commit().unwrap(),
            Err(_) => t.rollback().unwrap(),
        }
        r
    }

    fn outbox(&self) -> Vec<(u32, proto::Credit)> {
        let mut t = self.store.begin_read().unwrap();
        let rows = t.scan(b"ob/", &prefix_end(b"ob/"), 10_000).unwrap();
        rows.into_iter()
            .map(|(k, v)| {
                let shard: u32 = std::str::from_utf8(&k[3..8]).unwrap().parse().unwrap();
                let rec: ldc_cell::model::OutboxRec = ldc_cell::model::dec("outbox", &v).unwrap();
                (shard, proto::Credit::decode(&rec.credit[..]).unwrap())
            })
            .collect()
    }

    /// One relay step for message `pick`: deliver (maybe twice), then settle (maybe twice).
    fn relay(&mut self, pick: usize, twice: bool, settle: bool) {
        let ob = self.outbox();
        if ob.is_empty() {
            return;
        }
        let (shard, credit) = ob[pick % ob.len()].clone();
        let first = self.run(&Command::Deliver(credit.clone())).unwrap();
        if twice {
            let again = self.run(&Command::Deliver(credit.clone())).unwrap();
            assert_eq!(first, again, "a redelivery must get the first answer");
        }
        let Outcome::Delivered(d) = first else {
            panic!("deliver gave {first:?}")
        };
        let applied = d.outcome == DeliverOutcome::Applied as i32;
        if applied && credit.kind == proto::CreditKind::Transfer as i32 {
            self.received
                .push((credit.to_user_id.clone(), d.payment_id.clone()));
        }
        if settle {
            let cmd = Command::Settle {
                shard,
                message_id: credit.message_id.clone(),
                applied,
                reason: d.reason.clone(),
            };
            self.run(&cmd).unwrap();
            if twice {
                self.run(&cmd).unwrap();
            }
        }
    }

    fn check(&self) {
        let report = reconcile::run(&*self.store).unwrap();
        assert!(report.is_clean(), "reconcile: {report:#?}");
        for (ccy, t) in &report.currencies {
            assert_eq!(
                t.net_external,
                self.net_external.get(ccy).copied().unwrap_or(0),
                "{ccy}: the ledger's net external money differs from the acknowledged top-ups and withdrawals"
            );
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Open(usize, bool),
    TopUp(usize, i64),
    Withdraw(usize, i64),
    Transfer(usize, usize, i64),
    Refund(usize, i64),
    Replay(usize),
    Relay(usize, bool, bool),
    /// Move a shard to the other cell (a failover), bumping its epoch.
    Move(u32),
}

fn op() -> impl Strategy<Value = Op> {
    let u = 0..USERS.len();
    let amt = prop_oneof![8 => 1i64..500, 1 => Just(0), 1 => Just(-3), 1 => Just(ldc_cell::model::AMOUNT_MAX + 1)];
    prop_oneof![
        3 => (u.clone(), prop::bool::weighted(0.15)).prop_map(|(u, usd)| Op::Open(u, usd)),
        4 => (u.clone(), amt.clone()).prop_map(|(u, a)| Op::TopUp(u, a)),
        2 => (u.clone(), amt.clone()).prop_map(|(u, a)| Op::Withdraw(u, a)),
        4 => (u.clone(), u.clone(), amt.clone()).prop_map(|(a, b, x)| Op::Transfer(a, b, x)),
        2 => (any::<usize>(), amt).prop_map(|(i, a)| Op::Refund(i, a)),
        2 => any::<usize>().prop_map(Op::Replay),
        4 => (any::<usize>(), any::<bool>(), any::<bool>()).prop_map(|(i, t, s)| Op::Relay(i, t, s)),
        1 => (0..SHARDS).prop_map(Op::Move),
    ]
}

fn balance(w: &World, user: &str) -> Option<i64> {
    let mut t = w.store.begin_read().unwrap();
    t.get(&keys::account(shard_of(user, SHARDS), user))
        .unwrap()
        .map(|b| {
            ldc_cell::model::dec::<ldc_cell::model::AccountRec>("account", &b)
                .unwrap()
                .balance
        })
}

thread_local! {
    static STATS: std::cell::RefCell<Vec<(usize, usize)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Guards against a generator that never reaches transfers: the property above would then
/// pass without proving anything about cross-cell delivery.
#[test]
fn generator_reaches_transfers_and_refunds() {
    conservation_and_exactly_once();
    let (acked, received): (usize, usize) = STATS.with(|s| {
        s.borrow()
            .iter()
            .fold((0, 0), |(a, r), (x, y)| (a + x, r + y))
    });
    assert!(
        acked > 100 && received >= 3,
        "acked {acked}, received {received}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn conservation_and_exactly_once(ops in prop::collection::vec(op(), 1..60)) {
        let mut w = World::new();
        // Open most accounts up front so the random ops mostly reach the interesting paths.
        for (i, u) in USERS.iter().enumerate().take(4) {
            let cmd = Command::OpenAccount { user: (*u).into(), currency: "EUR".into(), key: format!("open{i}") };
            let o = w.run(&cmd).unwrap();
            w.acked.push((cmd, o));
        }
        for (i, op) in ops.into_iter().enumerate() {
            let key = format!("k{i}");
            let cmd = match op {
                Op::Open(u, usd) => Command::OpenAccount {
                    user: USERS[u].into(), currency: if usd { "USD" } else { "EUR" }.into(), key,
                },
                Op::TopUp(u, a) => Command::TopUp { user: USERS[u].into(), amount: a, currency: "EUR".into(), key },
                Op::Withdraw(u, a) => Command::Withdraw { user: USERS[u].into(), amount: a, currency: "EUR".into(), key },
                Op::Transfer(a, b, x) => Command::Transfer {
                    user: USERS[a].into(), to: USERS[b].into(), amount: x, currency: "EUR".into(), key,
                },
                Op::Refund(pick, a) => {
                    if w.received.is_empty() { continue; }
                    let (user, id) = w.received[pick % w.received.len()].clone();
                    Command::Refund { user, payment_id: id, amount: a, key }
                }
                Op::Replay(pick) => {
                    if w.acked.is_empty() { continue; }
                    let (cmd, first) = w.acked[pick % w.acked.len()].clone();
                    let user = cmd.user().to_string();
                    let before = balance(&w, &user);
                    let again = w.run(&cmd).expect("a replay of an acknowledged command must succeed");
                    prop_assert_eq!(&again, &first, "replay must return the first result");
                    prop_assert_eq!(balance(&w, &user), before, "replay must not move money");
                    // Same key, different request: refused, nothing written.
                    if let Command::TopUp { user, amount, currency, key } = cmd {
                        let other = Command::TopUp { user, amount: amount + 1, currency, key };
                        let reused = matches!(w.run(&other), Err(PaymentError::KeyReused { .. }));
                        prop_assert!(reused, "same key with a different request must be refused");
                    }
                    w.check();
                    continue;
                }
                Op::Relay(i, twice, settle) => {
                    w.relay(i, twice, settle);
                    w.check();
                    continue;
                }
                Op::Move(shard) => {
                    let mut t = w.store.begin().unwrap();
                    let map = ldc_control::load_map(&mut *t, SHARDS).unwrap();
                    let o = &map.owners[shard as usize];
                    let to = if o.cell == "c1" { "c2" } else { "c1" };
                    let plan = ldc_core::planner::Plan {
                        command: ldc_core::planner::Command::Switchover { cell: o.cell.clone(), to: to.into() },
                        moves: vec![ldc_core::planner::Move {
                            shard, from: o.cell.clone(), to: to.into(), epoch_before: o.epoch, epoch_after: o.epoch + 1,
                        }],
                    };
                    ldc_control::apply_plan(&mut *t, &plan).unwrap();
                    t.commit().unwrap();
                    // The deposed cell can no longer write the shard.
                    let mut t = w.store.begin().unwrap();
                    let fenced = ledger::fence(&mut *t, &o.cell, shard);
                    prop_assert!(
                        matches!(&fenced, Err(PaymentError::Moved { owner, epoch, .. }) if owner == to && *epoch == o.epoch + 1),
                        "deposed owner must be fenced, got {:?}", fenced
                    );
                    t.rollback().unwrap();
                    continue;
                }
            };
            let user = cmd.user().to_string();
            let before = balance(&w, &user);
            match w.run(&cmd) {
                Ok(outcome) => {
                    match &cmd {
                        Command::TopUp { amount, currency, .. } => *w.net_external.entry(currency.clone()).or_default() += i128::from(*amount),
                        Command::Withdraw { amount, currency, .. } => *w.net_external.entry(currency.clone()).or_default() -= i128::from(*amount),
                        _ => {}
                    }
                    w.acked.push((cmd, outcome));
                }
                Err(e) => {
                    prop_assert_eq!(balance(&w, &user), before, "a refused command moved money: {}", e);
                }
            }
            w.check();
        }
        // Drain: every message delivered and settled; nothing left in flight.
        for _ in 0..1000 {
            if w.outbox().is_empty() { break; }
            w.relay(0, false, true);
        }
        prop_assert!(w.outbox().is_empty());
        w.check();
        STATS.with(|s| s.borrow_mut().push((w.acked.len(), w.received.len())));
        let report = reconcile::run(&*w.store).unwrap();
        for t in report.currencies.values() {
            prop_assert_eq!(t.in_flight, 0);
            prop_assert_eq!(t.user_balances, t.net_external);
        }
        // Each acknowledged transfer is completed (credited once) or reversed (refunded to payer).
        for (cmd, outcome) in &w.acked {
            if let (Command::Transfer { user, .. }, Outcome::Payment(p)) = (cmd, outcome) {
                let mut t = w.store.begin_read().unwrap();
                let now = ledger::get_payment(&mut *t, &Ctx { cell: "", shard_count: SHARDS, now_ms: 0 }, user, &p.payment_id).unwrap();
                prop_assert!(now.status == PaymentStatus::Completed as i32 || now.status == PaymentStatus::Reversed as i32);
            }
        }
    }
}

/// Reconciliation is a detector, not a rubber stamp: each kind of tampering is reported.
#[test]
fn reconcile_detects_tampering() {
    use ldc_cell::model::{AccountRec, SysAccountRec, dec, enc};
    let mut w = World::alice_with_100_and_bob();
    w.run(&Command::Transfer {
        user: "alice".into(),
        to: "bob".into(),
        amount: 30,
        currency: "EUR".into(),
        key: "x".into(),
    })
    .unwrap();
    assert!(reconcile::run(&*w.store).unwrap().is_clean());

    // 1. A balance changed without an entry.
    let key = keys::account(shard_of("alice", SHARDS), "alice");
    let tamper = |w: &World, f: &dyn Fn(&mut dyn ldc_store::Kv)| {
        let mut t = w.store.begin().unwrap();
        f(&mut *t);
        t.commit().unwrap();
    };
    let original = {
        let mut t = w.store.begin_read().unwrap();
        t.get(&key).unwrap().unwrap()
    };
    tamper(&w, &|kv| {
        let mut a: AccountRec = dec("account", &original).unwrap();
        a.balance += 1;
        kv.put(&key, &enc(&a)).unwrap();
    });
    let r = reconcile::run(&*w.store).unwrap();
    assert!(!r.is_clean());
    assert_eq!(r.currencies["EUR"].difference, 1, "{r:#?}");
    tamper(&w, &|kv| kv.put(&key, &original).unwrap());
    assert!(reconcile::run(&*w.store).unwrap().is_clean());

    // 1b. A system account moved without a contra leg (its side of the double entry): the
    //     clearing balance no longer matches the legs of the user entries posted to it.
    let clearing = keys::sys_account(shard_of("alice", SHARDS), "EUR", keys::SysAccount::Clearing);
    let original = {
        let mut t = w.store.begin_read().unwrap();
        t.get(&clearing).unwrap().unwrap()
    };
    tamper(&w, &|kv| {
        let mut a: SysAccountRec = dec("system account", &original).unwrap();
        a.balance -= 5;
        kv.put(&clearing, &enc(&a)).unwrap();
    });
    let r = reconcile::run(&*w.store).unwrap();
    assert!(
        r.problems
            .iter()
            .any(|p| p.contains("clearing account") && p.contains("contra legs sum to -100")),
        "{:?}",
        r.problems
    );
    tamper(&w, &|kv| kv.put(&clearing, &original).unwrap());
    assert!(reconcile::run(&*w.store).unwrap().is_clean());

    // 2. A credit applied twice (simulated: the outbox message still claims to be unapplied
    //    after the payee was credited) breaks the in-flight check.
    w.relay(0, false, false); // deliver, do not settle
    assert!(reconcile::run(&*w.store).unwrap().is_clean());
    let ob = w.outbox();
    let (_, credit) = &ob[0];
    tamper(&w, &|kv| {
        let dkey = keys::dedup(
            shard_of(&credit.to_user_id, SHARDS),
            &credit.to_user_id,
            &credit.message_id,
        );
        kv.delete(&dkey).unwrap();
    });
    let r = reconcile::run(&*w.store).unwrap();
    assert!(!r.is_clean(), "a lost dedup record must be visible: {r:#?}");
    assert!(
        r.problems.iter().any(|p| p.contains("in flight")),
        "{:?}",
        r.problems
    );
}

/// Listing pages through a journal where entries and payments interleave: every entry once,
/// in order, whatever the page size.
#[test]
fn entries_page_through_the_journal() {
    let mut w = World::new();
    for u in ["alice", "bob"] {
        w.run(&Command::OpenAccount {
            user: u.into(),
            currency: "EUR".into(),
            key: format!("o-{u}"),
        })
        .unwrap();
    }
    for i in 0..25 {
        w.run(&Command::TopUp {
            user: "alice".into(),
            amount: 10 + i,
            currency: "EUR".into(),
            key: format!("t{i}"),
        })
        .unwrap();
    }
    w.run(&Command::Transfer {
        user: "alice".into(),
        to: "nobody".into(),
        amount: 5,
        currency: "EUR".into(),
        key: "x".into(),
    })
    .unwrap();
    w.relay(0, false, true); // rejected → compensation entry on alice for an old payment
    let ctx = Ctx {
        cell: "",
        shard_count: SHARDS,
        now_ms: 0,
    };
    let all = {
        let mut t = w.store.begin_read().unwrap();
        ledger::list_entries(&mut *t, &ctx, "alice", 0, 1000).unwrap()
    };
    assert_eq!(all.entries.len(), 27);
    assert_eq!(all.next_after_seq, 0);
    assert_eq!(
        all.entries.iter().map(|e| e.amount).sum::<i64>(),
        (10..35).sum::<i64>()
    );
    for page in [1u32, 2, 3, 7, 26, 27] {
        let (mut got, mut after) = (Vec::new(), 0);
        loop {
            let mut t = w.store.begin_read().unwrap();
            let r = ledger::list_entries(&mut *t, &ctx, "alice", after, page).unwrap();
            assert!(r.entries.len() <= page as usize);
            got.extend(r.entries);
            if r.next_after_seq == 0 {
                break;
            }
            after = r.next_after_seq;
        }
        assert_eq!(got, all.entries, "page size {page}");
    }
}

/// A replay answers what the first request got even after the payment moved on: the
/// transfer was pending and nothing of it refunded when first answered; by the replay it is
/// completed and partly refunded.
#[test]
fn replays_answer_the_first_state_of_a_payment() {
    let mut w = World::alice_with_100_and_bob();
    let transfer = Command::Transfer {
        user: "alice".into(),
        to: "bob".into(),
        amount: 30,
        currency: "EUR".into(),
        key: "x".into(),
    };
    let Outcome::Payment(first) = w.run(&transfer).unwrap() else {
        panic!("a transfer answers a payment")
    };
    assert_eq!(first.status, PaymentStatus::Pending as i32);
    w.relay(0, false, true);
    let (_, received) = w.received[0].clone();
    w.run(&Command::Refund {
        user: "bob".into(),
        payment_id: received,
        amount: 10,
        key: "r".into(),
    })
    .unwrap();
    w.relay(0, false, true);
    let now = {
        let mut t = w.store.begin_read().unwrap();
        ledger::get_payment(
            &mut *t,
            &Ctx {
                cell: "c1",
                shard_count: SHARDS,
                now_ms: 0,
            },
            "alice",
            &first.payment_id,
        )
        .unwrap()
    };
    assert_eq!(now.status, PaymentStatus::Completed as i32);
    assert_eq!(now.refunded, 10);
    assert_eq!(w.run(&transfer).unwrap(), Outcome::Payment(first));
    assert!(reconcile::run(&*w.store).unwrap().is_clean());
}

/// Every key and value in the store, to prove a refused command wrote nothing.
fn dump(w: &World) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut t = w.store.begin_read().unwrap();
    t.scan(b"", &[0xff], 10_000).unwrap()
}

/// A credit that reuses a delivered message id with other content is a forgery (or a bug),
/// never a duplicate: refused ALREADY_EXISTS, nothing written, and the real credit's first
/// answer still stands for its own redeliveries.
#[test]
fn a_message_id_reused_with_other_content_is_refused_and_writes_nothing() {
    let mut w = World::alice_with_100_and_bob();
    w.run(&Command::Transfer {
        user: "alice".into(),
        to: "bob".into(),
        amount: 30,
        currency: "EUR".into(),
        key: "pay".into(),
    })
    .unwrap();
    let (_, credit) = w.outbox().remove(0);
    let Outcome::Delivered(first) = w.run(&Command::Deliver(credit.clone())).unwrap() else {
        panic!("deliver answers Delivered");
    };
    assert_eq!(first.outcome, DeliverOutcome::Applied as i32);
    let before = dump(&w);

    for forged in [
        proto::Credit {
            amount: 1_000_000,
            ..credit.clone()
        },
        proto::Credit {
            from_user_id: "mallory".into(),
            ..credit.clone()
        },
        proto::Credit {
            currency: "USD".into(),
            ..credit.clone()
        },
    ] {
        let e = w.run(&Command::Deliver(forged)).unwrap_err();
        assert!(
            matches!(e, PaymentError::RelayConflict { .. }),
            "forged credit: {e}"
        );
        assert_eq!(e.code(), tonic::Code::AlreadyExists);
        assert!(e.to_string().contains(&credit.message_id), "{e}");
        assert_eq!(dump(&w), before, "a refused credit wrote something");
    }
    assert_eq!(balance(&w, "bob"), Some(30));
    // The genuine redelivery is still a duplicate with its first answer.
    let Outcome::Delivered(again) = w.run(&Command::Deliver(credit)).unwrap() else {
        panic!("deliver answers Delivered");
    };
    assert_eq!(again, first);
    assert_eq!(dump(&w), before);
    assert!(reconcile::run(&*w.store).unwrap().is_clean());
}
