//! HTTP/2 connections to one cell endpoint, shared by every request routed there.
//!
//! Why not hyper-util's pooled `Client`: a gRPC endpoint needs one or two HTTP/2
//! connections, each carrying many streams. The pooled client pays a pool lookup (a
//! global lock, a key built from the URI) and a checkout per request; here a request
//! takes a slot (round-robin if there are several), clones its `SendRequest` (an `Arc`
//! increment) and sends.
//!
//! Connections are mutual TLS when the router is secure: the router presents its own
//! certificate, and the endpoint must present the certificate of the cell the table names
//! there, or the connection is dropped before any request is sent.
//!
//! Safety of the one transparent retry here: a request goes to a new connection only
//! when the old one gave the request back unsent (closed before the stream was opened),
//! so nothing can have reached the cell.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2::{Builder, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::body::ReplayBody;

/// How to open a connection to an endpoint.
pub struct Connect<'a> {
    pub timeout: Duration,
    /// The router's mutual-TLS client configuration (`None`: plaintext, `--insecure`);
    /// read only when a connection is opened, never per request.
    pub tls: Option<&'a ldc_security::tls::Reloading<rustls::ClientConfig>>,
    /// The cell the routing table says serves this endpoint.
    pub cell: &'a str,
}

/// HTTP/2 connections per endpoint. One connection carries every stream to the endpoint
/// and batches their frames into fewer writes: in bench/router.sh one connection cost
/// 45 CPU us/request against 56 with two (a router talks to many endpoints, so the
/// connection tasks still spread over the cores).
const CONNECTIONS_PER_ENDPOINT: usize = 1;

/// Attempts to get a live connection for one request (a closed connection gives the
/// request back unsent; the next attempt uses a fresh one).
const SEND_ATTEMPTS_MAX: usize = 2;

/// Why a request did not get an answer.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made: nothing reached the cell.
    Connect(String),
    /// The connection failed after the request may have been sent.
    Upstream(hyper::Error),
}

struct Slot {
    sender: Mutex<Option<SendRequest<ReplayBody>>>,
    /// Held while connecting, so concurrent requests wait for one connection instead of
    /// each opening their own.
    connecting: tokio::sync::Mutex<()>,
}

/// The connections of one endpoint (`host:port`), made on first use.
pub struct Upstream {
    slots: [Slot; CONNECTIONS_PER_ENDPOINT],
    next: AtomicUsize,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").finish_non_exhaustive()
    }
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            slots: std::array::from_fn(|_| Slot {
                sender: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
            }),
            next: AtomicUsize::new(0),
        }
    }
}

impl Upstream {
    /// Sends `req` to `addr` on one of this endpoint's connections (connecting within
    /// `connect_timeout` if there is none).
    pub async fn send(
        &self,
        addr: &str,
        how: &Connect<'_>,
        mut req: Request<ReplayBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let slot = &self.slots[self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()];
        for _ in 0..SEND_ATTEMPTS_MAX {
            let mut sender = match slot.live() {
                Some(s) => s,
                None => slot.connect(addr, how).await?,
            };
            if sender.ready().await.is_err() {
                slot.clear();
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(back) => {
                        // Never sent: safe to send on a fresh connection.
                        slot.clear();
                        req = back;
                    }
                    None => return Err(SendError::Upstream(e.into_error())),
                },
            }
        }
        Err(SendError::Connect(format!(
            "the connection to {addr} closed {SEND_ATTEMPTS_MAX} times before the request could be sent"
        )))
    }
}

impl Slot {
    fn live(&self) -> Option<SendRequest<ReplayBody>> {
        let g = self.sender.lock().expect("lock");
        g.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    /// Forgets the slot's connection if it is closed (another request may have replaced
    /// it with a live one already).
    fn clear(&self) {
        let mut g = self.sender.lock().expect("lock");
        if g.as_ref().is_some_and(|s| s.is_closed()) {
            *g = None;
        }
    }

    async fn connect(
        &self,
        addr: &str,
        how: &Connect<'_>,
    ) -> Result<SendRequest<ReplayBody>, SendError> {
        let _connecting = self.connecting.lock().await;
        if let Some(s) = self.live() {
            return Ok(s);
        }
        let timeout = how.timeout;
        let sender = tokio::time::timeout(timeout, open(addr, how))
            .await
            .map_err(|_| {
                SendError::Connect(format!("connect to {addr} timed out after {timeout:?}"))
            })??;
        *self.sender.lock().expect("lock") = Some(sender.clone());
        Ok(sender)
    }
}

/// Opens one connection: TCP, then TLS checking the cell's certificate (when secure), then
/// the HTTP/2 handshake.
async fn open(addr: &str, how: &Connect<'_>) -> Result<SendRequest<ReplayBody>, SendError> {
    let Some(tls) = &how.tls else {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| SendError::Connect(format!("tcp connect error: {e}")))?;
        let _ = tcp.set_nodelay(true);
        return handshake(addr, tcp).await;
    };
    let (stream, id) = ldc_security::net::connect(addr, tls.current())
        .await
        .map_err(|e| SendError::Connect(format!("TLS connect error: {e}")))?;
    match id {
        Some(ldc_security::Identity::Cell(name)) if name == how.cell => {
            handshake(addr, stream).await
        }
        other => Err(SendError::Connect(format!(
            "the endpoint's certificate names {}, not cell {}; the connection was closed              before sending anything",
            other.map_or_else(|| "nobody".to_string(), |i| i.label()),
            how.cell
        ))),
    }
}

async fn handshake<IO>(addr: &str, io: IO) -> Result<SendRequest<ReplayBody>, SendError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .adaptive_window(false)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| SendError::Connect(format!("http/2 handshake: {e}")))?;
    let peer = addr.to_string();
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(endpoint = %peer, error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}
