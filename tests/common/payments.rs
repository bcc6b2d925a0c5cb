//! Continuous payments through a router and the exactly-once check afterwards, shared by
//! the integration tests (`failover`, `traffic_shift`) and the Kubernetes end-to-end suite
//! (`e2e`), so every fault scenario is judged by the same rules.
//!
//! A payment is retried with its idempotency key while the answer says nothing happened
//! or the outcome is unknown, as a client would. Every attempt is timed, so a scenario
//! can report how many requests failed and how long the affected users waited (RTO).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ldc_core::proto::{self, PaymentKind, PaymentStatus, payments_client::PaymentsClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

use super::{call_until, open_and_fund, req};

/// Codes that say "nothing happened" or "outcome unknown": a client retries these with
/// the same idempotency key.
pub fn retryable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::ResourceExhausted
            | tonic::Code::Internal
    )
}

/// One acknowledged payment.
#[derive(Debug, Clone)]
pub struct Acked {
    pub user: String,
    pub key: String,
    pub kind: PaymentKind,
    pub amount: i64,
    pub to: Option<String>,
    pub payment_id: String,
    /// When the first attempt was sent.
    pub first_attempt: Instant,
    /// When the acknowledgement arrived.
    pub acked_at: Instant,
}

/// One attempt answered with an error (retried later with the same key, unless the
/// payment gave up).
#[derive(Debug, Clone)]
pub struct FailedAttempt {
    pub user: String,
    pub at: Instant,
    pub code: tonic::Code,
}

/// What a load run saw.
#[derive(Debug, Default)]
pub struct LoadResult {
    pub acked: Vec<Acked>,
    pub failed_attempts: Vec<FailedAttempt>,
    /// Payments never acknowledged (the last answer was an error).
    pub failed_payments: u64,
}

#[derive(Default)]
struct Shared {
    acked: Mutex<Vec<Acked>>,
    failed_attempts: Mutex<Vec<FailedAttempt>>,
    failed_payments: Mutex<u64>,
}

/// Continuous payments by a few workers until stopped: two transfers (to a user five
/// places on) for every top-up, each payment retried with its key for up to 30 s.
pub struct Load {
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `tag` keeps idempotency keys unique across several loads over the same users.
    pub fn start(c: &PaymentsClient<Channel>, users: &[String], workers: usize) -> Load {
        Self::start_tagged(c, users, workers, "")
    }

    pub fn start_tagged(
        c: &PaymentsClient<Channel>,
        users: &[String],
        workers: usize,
        tag: &str,
    ) -> Load {
        let users = users.to_vec();
        Self::spawn(c, workers, tag, move |w, n| {
            let i = (w * 7 + n as usize) % users.len();
            let to = (!n.is_multiple_of(3)).then(|| users[(i + 5) % users.len()].clone());
            (users[i].clone(), to)
        })
    }

    /// Payments by `payers` (two transfers to one of `payees` for every top-up), with
    /// `workers` workers for each payer: a payer whose cell stops holds up only itself.
    pub fn per_payer(
        c: &PaymentsClient<Channel>,
        payers: &[String],
        payees: &[String],
        workers: usize,
        tag: &str,
    ) -> Load {
        let (payers, payees) = (payers.to_vec(), payees.to_vec());
        Self::spawn(c, payers.len() * workers, tag, move |w, n| {
            let payer = &payers[w % payers.len()];
            let mut j = (w * 5 + n as usize * 3) % payees.len();
            if &payees[j] == payer {
                j = (j + 1) % payees.len();
            }
            let to = (!n.is_multiple_of(3)).then(|| payees[j].clone());
            (payer.clone(), to)
        })
    }

    /// `workers` workers, each paying `pick(worker, n)` (payer, payee of a transfer or
    /// none for a top-up) for its n-th payment, one after another.
    fn spawn(
        c: &PaymentsClient<Channel>,
        workers: usize,
        tag: &str,
        pick: impl Fn(usize, u64) -> (String, Option<String>) + Send + Sync + 'static,
    ) -> Load {
        let stop: Arc<AtomicBool> = Arc::default();
        let shared: Arc<Shared> = Arc::default();
        let pick = Arc::new(pick);
        let handles = (0..workers)
            .map(|w| {
                let (c, stop, shared, tag, pick) = (
                    c.clone(),
                    stop.clone(),
                    shared.clone(),
                    tag.to_string(),
                    pick.clone(),
                );
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let (payer, to) = pick(w, n);
                        pay(&c, &shared, &payer, format!("{tag}w{w}-{n}"), to).await;
                    }
                })
            })
            .collect();
        Load {
            stop,
            shared,
            workers: handles,
        }
    }

    pub fn acked(&self) -> usize {
        self.shared.acked.lock().unwrap().len()
    }

    /// Attempts answered with `code` so far.
    pub fn failed_with(&self, code: tonic::Code) -> usize {
        self.shared
            .failed_attempts
            .lock()
            .unwrap()
            .iter()
            .filter(|f| f.code == code)
            .count()
    }

    /// Waits until `more` further payments are acknowledged: the load really ran across
    /// whatever just changed.
    pub async fn wait_progress(&self, more: usize, timeout: Duration) {
        let target = self.acked() + more;
        let deadline = Instant::now() + timeout;
        while self.acked() < target {
            assert!(
                Instant::now() < deadline,
                "load made no progress: {} of {target} payments acknowledged",
                self.acked()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every `affected` user has had a payment begun after `fault`
    /// acknowledged (the load picks users in turn, so each gets there).
    pub async fn wait_recovered(
        &self,
        affected: &HashSet<String>,
        fault: Instant,
        timeout: Duration,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            let r = recovery(&self.shared.acked.lock().unwrap(), affected, fault);
            if r.recovered == r.users {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "affected users still without a successful payment after {timeout:?}: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the load and audits everything it acknowledged on the platform at `data`
    /// ([`verify`]); every payment must have been acknowledged within its 30 s.
    pub async fn stop_and_audit(
        self,
        data: &std::path::Path,
        c: &PaymentsClient<Channel>,
        users: &[String],
    ) -> LoadResult {
        let r = self.stop().await;
        assert_eq!(
            r.failed_payments, 0,
            "a payment was not acknowledged within 30 s"
        );
        verify(
            &|| super::wait_settled(data, Duration::from_secs(30)),
            c,
            users,
            &r.acked,
            0,
        )
        .await;
        r
    }

    pub async fn stop(self) -> LoadResult {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.await.unwrap();
        }
        LoadResult {
            acked: std::mem::take(&mut *self.shared.acked.lock().unwrap()),
            failed_attempts: std::mem::take(&mut *self.shared.failed_attempts.lock().unwrap()),
            failed_payments: *self.shared.failed_payments.lock().unwrap(),
        }
    }
}

/// One payment (a top-up of 7, or a transfer of 3 to `to`), retried with its key.
async fn pay(
    c: &PaymentsClient<Channel>,
    shared: &Shared,
    user: &str,
    key: String,
    to: Option<String>,
) {
    let first_attempt = Instant::now();
    let deadline = first_attempt + Duration::from_secs(30);
    let (kind, amount) = match to {
        None => (PaymentKind::TopUp, 7),
        Some(_) => (PaymentKind::TransferOut, 3),
    };
    loop {
        let mut c = c.clone();
        let r = match &to {
            None => {
                let m = proto::TopUpRequest {
                    user_id: user.into(),
                    amount,
                    currency: "EUR".into(),
                    idempotency_key: key.clone(),
                };
                c.top_up(req(user, m)).await
            }
            Some(to) => {
                let m = proto::TransferRequest {
                    user_id: user.into(),
                    to_user_id: to.clone(),
                    amount,
                    currency: "EUR".into(),
                    idempotency_key: key.clone(),
                };
                c.transfer(req(user, m)).await
            }
        };
        match r {
            Ok(p) => {
                shared.acked.lock().unwrap().push(Acked {
                    user: user.into(),
                    key,
                    kind,
                    amount,
                    to,
                    payment_id: p.into_inner().payment_id,
                    first_attempt,
                    acked_at: Instant::now(),
                });
                return;
            }
            Err(s) => {
                shared.failed_attempts.lock().unwrap().push(FailedAttempt {
                    user: user.into(),
                    at: Instant::now(),
                    code: s.code(),
                });
                if !retryable(s.code()) || Instant::now() >= deadline {
                    eprintln!("payment {key} of {user} failed: {s:?}");
                    *shared.failed_payments.lock().unwrap() += 1;
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Recovery of the users a fault hit: for each affected user, the time from `fault` to
/// the acknowledgement of their first payment begun after it. Users without such a
/// payment are counted as not recovered.
#[derive(Debug, Clone, Copy, Default)]
pub struct Recovery {
    pub users: usize,
    pub recovered: usize,
    pub median: Duration,
    pub max: Duration,
}

pub fn recovery(acked: &[Acked], affected: &HashSet<String>, fault: Instant) -> Recovery {
    let mut first: BTreeMap<&str, Duration> = BTreeMap::new();
    for a in acked
        .iter()
        .filter(|a| a.first_attempt >= fault && affected.contains(&a.user))
    {
        let d = a.acked_at - fault;
        first
            .entry(a.user.as_str())
            .and_modify(|x| *x = (*x).min(d))
            .or_insert(d);
    }
    let mut v: Vec<Duration> = first.into_values().collect();
    v.sort();
    Recovery {
        users: affected.len(),
        recovered: v.len(),
        median: v.get(v.len() / 2).copied().unwrap_or_default(),
        max: v.last().copied().unwrap_or_default(),
    }
}

pub async fn fund(c: &PaymentsClient<Channel>, users: &[String]) {
    for u in users {
        open_and_fund(c, u, 100_000).await;
    }
}

/// Every acknowledged payment applied exactly once, each transfer credited once, money
/// conserved (`settle` runs `ldc reconcile` once every outbox message is delivered), and a
/// replay of every seventh payment with its key returns the first result and applies
/// nothing.
///
/// `acked` is every payment acknowledged since the users were funded (ledgers are counted
/// against all of it); payments, statuses and replays are checked for `acked[fresh..]`,
/// so a scenario in several phases can verify after each without redoing earlier work.
pub async fn verify(
    settle: &dyn Fn() -> serde_json::Value,
    c: &PaymentsClient<Channel>,
    users: &[String],
    acked: &[Acked],
    fresh: usize,
) {
    let report = settle();
    assert_eq!(report["clean"], true, "reconcile: {report:#}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ids = HashSet::new();
    for a in acked {
        assert!(
            ids.insert(a.payment_id.clone()),
            "two acknowledgements share payment id {}",
            a.payment_id
        );
    }
    // Each fresh payment is there, with what was asked, and transfers completed.
    for a in &acked[fresh..] {
        let m = proto::GetPaymentRequest {
            user_id: a.user.clone(),
            payment_id: a.payment_id.clone(),
        };
        let p = call_until(deadline, || {
            let mut c = c.clone();
            let r = req(&a.user, m.clone());
            async move { c.get_payment(r).await }
        })
        .await
        .unwrap_or_else(|s| panic!("acknowledged payment {} lost: {s:?}", a.payment_id));
        assert_eq!((p.kind, p.amount), (a.kind as i32, a.amount));
        if a.kind == PaymentKind::TransferOut {
            assert_eq!(
                p.status,
                PaymentStatus::Completed as i32,
                "transfer {} not completed",
                a.payment_id
            );
        }
    }
    // Nothing applied twice: each ledger has one entry per acknowledged payment of its
    // user (plus the funding top-up), and as many credits as transfers were sent to it.
    let mut own: BTreeMap<&str, usize> = BTreeMap::new();
    let mut credits: BTreeMap<&str, usize> = BTreeMap::new();
    for a in acked {
        *own.entry(a.user.as_str()).or_default() += 1;
        if let Some(to) = &a.to {
            *credits.entry(to.as_str()).or_default() += 1;
        }
    }
    for u in users {
        // Every page of the ledger (a page holds at most the cell's page limit).
        let mut entries = Vec::new();
        let mut after = 0;
        loop {
            let m = proto::ListEntriesRequest {
                user_id: u.clone(),
                after_seq: after,
                limit: 1_000,
            };
            let page = call_until(deadline, || {
                let mut c = c.clone();
                let r = req(u, m.clone());
                async move { c.list_entries(r).await }
            })
            .await
            .unwrap_or_else(|s| panic!("ledger of {u}: {s:?}"));
            entries.extend(page.entries);
            if page.next_after_seq == 0 {
                break;
            }
            after = page.next_after_seq;
        }
        let count = |k: PaymentKind| entries.iter().filter(|e| e.kind == k as i32).count();
        let mine = count(PaymentKind::TopUp) + count(PaymentKind::TransferOut);
        let want = own.get(u.as_str()).copied().unwrap_or(0) + 1;
        assert_eq!(
            mine, want,
            "user {u}: ledger has {mine} own payments, {want} were acknowledged (+1 funding)"
        );
        let got = count(PaymentKind::TransferIn);
        let want = credits.get(u.as_str()).copied().unwrap_or(0);
        assert_eq!(
            got, want,
            "user {u}: {got} credits for {want} transfers sent to them"
        );
    }
    // Idempotent replays: the same key gives the first result and applies nothing.
    for a in acked[fresh..].iter().step_by(7) {
        let p = call_until(deadline, || {
            let mut c = c.clone();
            let a = a.clone();
            async move {
                match &a.to {
                    None => {
                        let m = proto::TopUpRequest {
                            user_id: a.user.clone(),
                            amount: a.amount,
                            currency: "EUR".into(),
                            idempotency_key: a.key.clone(),
                        };
                        c.top_up(req(&a.user, m)).await
                    }
                    Some(to) => {
                        let m = proto::TransferRequest {
                            user_id: a.user.clone(),
                            to_user_id: to.clone(),
                            amount: a.amount,
                            currency: "EUR".into(),
                            idempotency_key: a.key.clone(),
                        };
                        c.transfer(req(&a.user, m)).await
                    }
                }
            }
        })
        .await
        .unwrap_or_else(|s| panic!("replay of {} failed: {s:?}", a.key));
        assert_eq!(p.payment_id, a.payment_id, "replay of {} differs", a.key);
    }
    let report = settle();
    assert_eq!(report["clean"], true, "reconcile after replays: {report:#}");
}

/// A plain HTTP/1.0 GET (metrics and admin endpoints); returns the body.
pub async fn http_get(addr: &str, path: &str) -> String {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let resp = tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .unwrap_or_else(|_| panic!("GET http://{addr}{path} timed out"))
        .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"));
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "GET http://{addr}{path}: {head}"
    );
    body.to_string()
}

/// Sum of a Prometheus counter over the series whose labels include every `labels` pair.
pub fn counter(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            if !(rest.is_empty() || rest.starts_with('{')) {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}
