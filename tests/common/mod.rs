//! Helpers for the cross-crate integration tests: run the real `ldc` binary as separate
//! processes (the platform, cells, CLI) and talk to them over loopback.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ldc_core::proto::{self, payments_client::PaymentsClient};
use tonic::transport::Channel;

pub mod frontends;
pub mod netns;
pub mod payments;

pub fn ldc() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ldc"));
    c.env("LDC_LOG", "warn,ldc=info");
    c
}

/// Runs `ldc ARGS -o json` against a data dir and parses stdout.
pub fn ldc_json(data: &Path, args: &[&str]) -> serde_json::Value {
    let out = ldc()
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .args(["-o", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ldc {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "ldc {args:?}: bad JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A running `ldc up`, stopped (SIGTERM) on drop.
pub struct Platform {
    pub child: Child,
    pub router: String,
    /// The router's admin port (`/healthz`, `/readyz`, `/metrics`, `/table`).
    pub admin: String,
    pub data: PathBuf,
}

impl Platform {
    pub fn start(data: &Path, extra: &[&str]) -> Platform {
        let mut child = ldc()
            .arg("--data-dir")
            .arg(data)
            .args(["up", "--listen", "127.0.0.1:0", "--check-ms", "100"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !sent && let Some(rest) = line.strip_prefix("LDC is up: router ") {
                    let addr = rest.split_whitespace().next().unwrap().to_string();
                    let _ = tx.send(addr);
                    sent = true;
                }
            }
        });
        let router = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("ldc up did not come up");
        let admin = std::fs::read_to_string(data.join("router.admin"))
            .expect("ldc up records the router's admin address")
            .trim()
            .to_string();
        Platform {
            child,
            router,
            admin,
            data: data.to_path_buf(),
        }
    }

    /// A client of the router with the CLI credential.
    pub async fn client(&self) -> PaymentsClient<Channel> {
        client(&self.data, &self.router).await
    }

    /// `ldc cell status -o json`.
    pub fn status(&self) -> serde_json::Value {
        ldc_json(&self.data, &["cell", "status"])
    }

    pub fn cell(&self, name: &str) -> serde_json::Value {
        self.status()["cells"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["cell"] == name)
            .unwrap()
            .clone()
    }

    /// The shards `cell` owns now.
    pub fn shards_of(&self, cell: &str) -> std::collections::HashSet<u64> {
        self.cell(cell)["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_u64().unwrap())
            .collect()
    }

    /// The status of the cell that owns `user`'s shard (of the default 100).
    pub fn owner_of(&self, user: &str) -> serde_json::Value {
        let shard = u64::from(ldc_core::shard::shard_of(user, 100));
        let status = self.status();
        status["cells"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| {
                c["shards"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s.as_u64() == Some(shard))
            })
            .unwrap_or_else(|| panic!("no cell owns shard {shard}: {status}"))
            .clone()
    }

    /// Stops with SIGTERM and waits; returns the pids the platform had.
    pub fn stop(mut self) -> Vec<u32> {
        let pids: Vec<u32> = self.status()["cells"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| {
                pids(c)
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p.as_u64().unwrap() as u32)
                    .collect::<Vec<_>>()
            })
            .collect();
        terminate(&mut self.child);
        pids
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

pub fn terminate(child: &mut Child) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub fn alive(pid: u32) -> bool {
    // Signal 0 checks existence; a zombie still counts, so also read its state.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s.split_whitespace().nth(2).is_none_or(|st| st != "Z"),
        Err(_) => false,
    }
}

/// A client of the router at `addr` with the data directory's CLI credential (a service
/// with every scope), over TLS.
pub async fn client(data: &Path, addr: &str) -> PaymentsClient<Channel> {
    client_as(data, addr, ldc_security::platform::CLI)
}

/// A client of `addr` (a router or a cell) presenting certificate `leaf` of the data
/// directory's PKI; cells take payment calls only from `router`.
pub fn client_as(data: &Path, addr: &str, leaf: &str) -> PaymentsClient<Channel> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    client_named(data, addr, host, leaf)
}

/// Like [`client_as`], checking the server's certificate for `host` rather than the host
/// of `addr` (a pod IP standing for a Service name).
pub fn client_named(data: &Path, addr: &str, host: &str, leaf: &str) -> PaymentsClient<Channel> {
    PaymentsClient::new(channel_named(data, addr, host, leaf))
}

/// A TLS channel to `addr` (a router or a cell) presenting certificate `leaf`.
pub fn channel_as(data: &Path, addr: &str, leaf: &str) -> Channel {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    channel_named(data, addr, host, leaf)
}

fn channel_named(data: &Path, addr: &str, host: &str, leaf: &str) -> Channel {
    let pki = ldc_security::pki::Pki::new(data.join("pki"));
    ldc_security::net::channel_named(
        addr,
        host,
        ldc_security::platform::client(pki.files(leaf)).unwrap(),
        |id| matches!(id, ldc_security::Identity::Router) || id.is_cell(),
        Duration::from_secs(1),
        Duration::from_secs(5),
    )
    .unwrap()
}

pub fn req<T>(user: &str, m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut()
        .insert(ldc_core::USER_HEADER, user.parse().unwrap());
    r
}

/// Retries a call with the same request (same idempotency key) while the answer says
/// nothing happened or the outcome is unknown, until `deadline`.
pub async fn call_until<T, F, Fut>(deadline: Instant, mut f: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    loop {
        match f().await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if payments::retryable(s.code()) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => return Err(s),
        }
    }
}

pub async fn open_and_fund(c: &PaymentsClient<Channel>, user: &str, amount: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let o = proto::OpenAccountRequest {
        user_id: user.into(),
        currency: "EUR".into(),
        idempotency_key: format!("open-{user}"),
    };
    call_until(deadline, || {
        let mut c = c.clone();
        let r = req(user, o.clone());
        async move { c.open_account(r).await }
    })
    .await
    .unwrap();
    let t = proto::TopUpRequest {
        user_id: user.into(),
        amount,
        currency: "EUR".into(),
        idempotency_key: format!("fund-{user}"),
    };
    call_until(deadline, || {
        let mut c = c.clone();
        let r = req(user, t.clone());
        async move { c.top_up(r).await }
    })
    .await
    .unwrap();
}

pub fn reconcile(data: &Path) -> serde_json::Value {
    reconcile_store(&["--data-dir".as_ref(), data.as_os_str()])
}

/// `ldc GLOBAL... reconcile -o json` (GLOBAL names the store: `--data-dir D`, `--store S`).
pub fn reconcile_store(global: &[&std::ffi::OsStr]) -> serde_json::Value {
    let out = ldc()
        .args(global)
        .args(["reconcile", "-o", "json"])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "ldc reconcile: bad JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Waits until every outbox message is delivered and settled; returns the last report.
pub fn wait_settled(data: &Path, timeout: Duration) -> serde_json::Value {
    wait_settled_store(&["--data-dir".as_ref(), data.as_os_str()], timeout)
}

pub fn wait_settled_store(global: &[&std::ffi::OsStr], timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let r = reconcile_store(global);
        let pending: u64 = r["report"]["currencies"]
            .as_object()
            .map(|m| {
                m.values()
                    .map(|c| c["outbox_messages"].as_u64().unwrap())
                    .sum()
            })
            .unwrap_or(0);
        if pending == 0 || Instant::now() > deadline {
            return r;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The pids of a cell's processes in `ldc cell status -o json`, blue then green (0: none).
pub fn pids(cell: &serde_json::Value) -> serde_json::Value {
    serde_json::json!([
        cell["colours"]["blue"]["pid"],
        cell["colours"]["green"]["pid"]
    ])
}
