//! `ldc load`: a closed-loop load generator (the benchmark, never a test).
//!
//! `--concurrency` workers each send one payment, wait for the durable answer, and send the
//! next, for `--seconds`. Every payment has a unique idempotency key (`{run}-{worker}-{n}`,
//! the run id printed before the first payment), so each counted success is one durable,
//! distinct payment; an answer that leaves the outcome open or says nothing was applied is
//! retried with the same key (at most [`ATTEMPTS_MAX`] attempts), as any client must, and
//! its latency counts from the first attempt. Prints payments/s and latency percentiles.

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ldc_core::proto::{self, payments_client::PaymentsClient};
use serde_json::json;

use crate::cli::{Global, Output};
use crate::client::request;

/// Most attempts of one payment (the retries reuse its key).
const ATTEMPTS_MAX: u32 = 3;
/// Pause before a retry.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// How long after the end of the run unanswered requests are given before it fails.
const STUCK_AFTER: Duration = Duration::from_secs(10);

/// One HTTP/2 connection used as it is (a connection that breaks is not replaced: its
/// requests fail and the run reports them as errors). tonic's `Channel` puts a buffer task (a channel
/// hop and two wake-ups) and a timer in front of every request; in a load generator that
/// is CPU taken from the server it measures, on the same cores.
#[derive(Clone)]
struct H2(SendRequest<tonic::body::Body>);

type H2Future = Pin<
    Box<dyn Future<Output = Result<http::Response<hyper::body::Incoming>, hyper::Error>> + Send>,
>;

impl tower_service::Service<http::Request<tonic::body::Body>> for H2 {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = H2Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> H2Future {
        Box::pin(self.0.send_request(req))
    }
}

/// One connection to `addr`: TLS with the command's credential (a router needs a client
/// credential; a cell loaded directly needs `--credential router`), or plaintext with
/// `--insecure`.
async fn connect(g: &Global, addr: &str) -> Result<PaymentsClient<H2>> {
    let origin: http::Uri = format!("http://{addr}")
        .parse()
        .with_context(|| format!("bad target address {addr:?}"))?;
    if g.token.is_some() {
        bail!("ldc load authenticates with a certificate (--credential), not a token");
    }
    let timeout = Duration::from_secs(2);
    let send = match crate::security::client_tls(g)? {
        Some(tls) => {
            let (stream, _) =
                tokio::time::timeout(timeout, ldc_security::net::connect(addr, tls.current()))
                    .await
                    .with_context(|| format!("connecting to {addr} timed out"))?
                    .with_context(|| format!("cannot connect to {addr} over TLS"))?;
            h2(addr, stream).await?
        }
        None => {
            let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
                .await
                .with_context(|| format!("connecting to {addr} timed out"))?
                .with_context(|| format!("cannot connect to {addr}"))?;
            tcp.set_nodelay(true)?;
            h2(addr, tcp).await?
        }
    };
    Ok(PaymentsClient::with_origin(H2(send), origin))
}

async fn h2<IO>(addr: &str, io: IO) -> Result<SendRequest<tonic::body::Body>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(io))
        .await
        .with_context(|| format!("HTTP/2 handshake with {addr} failed"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "load connection closed");
        }
    });
    Ok(send)
}

#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Address to load (a router, or a cell directly). Default: the router.
    #[arg(long)]
    pub target: Option<String>,
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    #[arg(long, default_value_t = 1000)]
    pub users: usize,
    #[arg(long, default_value = "EUR")]
    pub currency: String,
    #[arg(long, value_enum, default_value_t = Mix::Topup)]
    pub mix: Mix,
    /// gRPC connections to spread the workers over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Only use users whose shard is in this list (comma separated), e.g. one cell's shards.
    #[arg(long, value_delimiter = ',')]
    pub shards: Vec<u32>,
    #[arg(long, default_value_t = 100)]
    pub shard_count: u32,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum Mix {
    /// Top-ups: one user, one shard per payment.
    Topup,
    /// Transfers between random users (cross-cell where shards differ).
    Transfer,
}

pub async fn run(g: &Global, a: LoadArgs) -> Result<ExitCode> {
    if a.concurrency == 0 || a.users < 2 || a.connections == 0 {
        bail!("--concurrency and --connections must be at least 1 and --users at least 2");
    }
    let target = a.target.clone().unwrap_or_else(|| g.router_addr());
    let run_id = format!("{:08x}", rand::random::<u32>());
    eprintln!("idempotency keys of this run: {run_id}-WORKER-N (retries reuse them)");
    let users: Vec<String> = (0..)
        .map(|i| format!("load-{i}"))
        .filter(|u| {
            a.shards.is_empty()
                || a.shards
                    .contains(&ldc_core::shard::shard_of(u, a.shard_count))
        })
        .take(a.users)
        .collect();
    let mut clients = Vec::new();
    for _ in 0..a.connections {
        // Separate channels are separate HTTP/2 connections.
        clients.push(connect(g, &target).await?);
    }
    // Setup: open and fund every user (idempotent keys: a rerun reuses the accounts).
    let setup = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (i, u) in users.iter().enumerate() {
        let mut c = clients[i % clients.len()].clone();
        let (u, ccy) = (u.clone(), a.currency.clone());
        set.spawn(async move {
            let open = proto::OpenAccountRequest {
                user_id: u.clone(),
                currency: ccy.clone(),
                idempotency_key: format!("open-{u}"),
            };
            match c.open_account(request(&u, open)).await {
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::AlreadyExists => {}
                Err(s) => return Err(s),
            }
            let fund = proto::TopUpRequest {
                user_id: u.clone(),
                amount: 1_000_000_000,
                currency: ccy,
                idempotency_key: format!("fund-{u}"),
            };
            c.top_up(request(&u, fund)).await.map(|_| ())
        });
        if set.len() >= 64
            && let Some(r) = set.join_next().await
        {
            r??;
        }
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    eprintln!(
        "setup: {} accounts ready in {:?}",
        users.len(),
        setup.elapsed()
    );

    let users = Arc::new(users);
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(a.seconds);
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..a.concurrency {
        let mut c = clients[w % clients.len()].clone();
        let (users, ok, errors, retries, run_id, ccy, mix) = (
            users.clone(),
            ok.clone(),
            errors.clone(),
            retries.clone(),
            run_id.clone(),
            a.currency.clone(),
            a.mix,
        );
        workers.spawn(async move {
            let mut lat_us: Vec<u32> = Vec::with_capacity(1 << 16);
            let mut n: u64 = 0;
            let mut last_err = None;
            while Instant::now() < deadline {
                n += 1;
                let key = format!("{run_id}-{w}-{n}");
                let i = rand::random_range(0..users.len());
                // The payee of a transfer (drawn for top-ups too: the draw is cheap).
                let j = (i + 1 + rand::random_range(0..users.len() - 1)) % users.len();
                let t0 = Instant::now();
                let mut attempt = 1;
                let r = loop {
                    let key = key.clone();
                    let r = match mix {
                        Mix::Topup => {
                            let u = &users[i];
                            let m = proto::TopUpRequest {
                                user_id: u.clone(),
                                amount: 1,
                                currency: ccy.clone(),
                                idempotency_key: key,
                            };
                            c.top_up(request(u, m)).await.map(|_| ())
                        }
                        Mix::Transfer => {
                            let (u, v) = (&users[i], &users[j]);
                            let m = proto::TransferRequest {
                                user_id: u.clone(),
                                to_user_id: v.clone(),
                                amount: 1,
                                currency: ccy.clone(),
                                idempotency_key: key,
                            };
                            c.transfer(request(u, m)).await.map(|_| ())
                        }
                    };
                    match r {
                        Err(s) if crate::client::retryable(s.code()) && attempt < ATTEMPTS_MAX => {
                            retries.fetch_add(1, Ordering::Relaxed);
                            attempt += 1;
                            tokio::time::sleep(RETRY_PAUSE).await;
                        }
                        r => break r,
                    }
                };
                match r {
                    Ok(()) => {
                        lat_us.push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(s) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        last_err = Some(format!("{:?}: {}", s.code(), s.message()));
                    }
                }
            }
            (lat_us, last_err)
        });
    }
    let mut lat: Vec<u32> = Vec::new();
    let mut last_err = None;
    // Requests carry no timer each (that is CPU on the cores being measured); one deadline
    // for the whole run stops a stuck target from hanging it.
    let hard_deadline = tokio::time::Instant::from_std(deadline) + STUCK_AFTER;
    loop {
        let r = match tokio::time::timeout_at(hard_deadline, workers.join_next()).await {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(_) => {
                workers.abort_all();
                bail!(
                    "requests to {target} were still unanswered {}s after the run ended; is the target stuck?",
                    STUCK_AFTER.as_secs()
                );
            }
        };
        let (l, e) = r?;
        lat.extend(l);
        last_err = last_err.or(e);
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let idx = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        f64::from(lat[idx]) / 1000.0
    };
    let ok_n = ok.load(Ordering::Relaxed);
    let err_n = errors.load(Ordering::Relaxed);
    let retry_n = retries.load(Ordering::Relaxed);
    let rate = ok_n as f64 / elapsed;
    match g.output {
        Output::Json | Output::Yaml => crate::cli::print_doc(
            g.output,
            &json!({"target": target, "mix": format!("{:?}", a.mix).to_lowercase(), "concurrency": a.concurrency,
                   "seconds": elapsed, "payments": ok_n, "errors": err_n, "retries": retry_n, "payments_per_sec": rate,
                   "p50_ms": pct(0.50), "p99_ms": pct(0.99), "p999_ms": pct(0.999), "last_error": last_err}),
        ),
        Output::Text => {
            println!(
                "{ok_n} durable payments in {elapsed:.1}s = {rate:.0}/s; latency p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms; {err_n} errors, {retry_n} retries",
                pct(0.50),
                pct(0.99),
                pct(0.999)
            );
            if let Some(e) = last_err {
                println!("last error: {e}");
            }
        }
    }
    Ok(if err_n == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}
