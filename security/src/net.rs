//! TLS on the wire: the accept side (a stream of authenticated connections for tonic) and
//! the connect side (a TLS connection that checks who answered).
//!
//! The handshake never runs in the accept loop: each one runs in its own task, bounded in
//! time ([`HANDSHAKE_TIMEOUT`]) and in number ([`HANDSHAKES_MAX`]), so a client that opens
//! a socket and says nothing holds one slot for a few seconds, not the listener.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use crate::identity::Identity;
use crate::tls::Reloading;

/// Longest time a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most handshakes in progress at once on one listener.
pub const HANDSHAKES_MAX: usize = 256;
/// Connections handed over but not yet taken by the server.
const READY_QUEUE_MAX: usize = 64;

/// Who is on the other end of an accepted connection. tonic puts it in each request's
/// extensions (`req.extensions().get::<Peer>()`).
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    /// The identity its certificate names; `None` without a (usable) certificate.
    pub identity: Option<Arc<Identity>>,
}

/// The identity the peer's certificate names (rustls has verified the chain).
pub fn peer_identity(conn: &rustls::CommonState) -> Option<Identity> {
    let certs = conn.peer_certificates()?;
    Identity::from_cert_der(certs.first()?)
}

/// An accepted TLS connection with its peer.
pub struct TlsConn {
    inner: server::TlsStream<TcpStream>,
    peer: Peer,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Completes one server handshake within [`HANDSHAKE_TIMEOUT`].
pub async fn accept(
    tcp: TcpStream,
    config: Arc<ServerConfig>,
) -> io::Result<server::TlsStream<TcpStream>> {
    let _ = tcp.set_nodelay(true);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(tcp)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "TLS handshake did not finish in time",
        )),
    }
}

/// Pause of an accept loop after a failed accept (out of file descriptors, mostly), so it
/// backs off instead of spinning on an error that only time clears.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What every accept loop does when `accept` fails: log it and back off.
pub async fn accept_failed(listener: &str, e: &io::Error) {
    tracing::warn!(listener, error = %e, "accept failed; backing off");
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// Accepts TCP connections on `listener`, completes their TLS handshakes off the accept
/// loop and yields the authenticated connections (for tonic's `serve_with_incoming`).
/// The accept task ends when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<Reloading<ServerConfig>>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(READY_QUEUE_MAX);
    tokio::spawn(async move {
        let handshakes = Arc::new(Semaphore::new(HANDSHAKES_MAX));
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => return,
            };
            let (tcp, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    accept_failed("tls", &e).await;
                    continue;
                }
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                tracing::warn!(%addr, max = HANDSHAKES_MAX, "too many TLS handshakes in progress; closing this connection");
                continue;
            };
            let (tx, cfg) = (tx.clone(), config.current());
            tokio::spawn(async move {
                let _permit = permit;
                match accept(tcp, cfg).await {
                    Ok(tls) => {
                        let identity = peer_identity(tls.get_ref().1).map(Arc::new);
                        let peer = Peer {
                            addr: Some(addr),
                            identity,
                        };
                        let _ = tx.send(Ok(TlsConn { inner: tls, peer })).await;
                    }
                    Err(e) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Connects to `addr` (`host:port`) over TLS, verifying the server's certificate for
/// `host`, and returns the connection with the identity the server's certificate names.
pub async fn connect(
    addr: &str,
    config: Arc<ClientConfig>,
) -> io::Result<(client::TlsStream<TcpStream>, Option<Identity>)> {
    connect_named(addr, host_of(addr), config).await
}

/// Like [`connect`], verifying the server's certificate for `host` instead of the host of
/// `addr` (an address that is not the name the certificate carries, e.g. a pod IP).
pub async fn connect_named(
    addr: &str,
    host: &str,
    config: Arc<ClientConfig>,
) -> io::Result<(client::TlsStream<TcpStream>, Option<Identity>)> {
    let name = ServerName::try_from(host.to_string()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{host:?} is not a host name or IP address"),
        )
    })?;
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let tls = TlsConnector::from(config).connect(name, tcp).await?;
    let id = peer_identity(tls.get_ref().1);
    Ok((tls, id))
}

/// The host of `host:port` (IPv6 in brackets too).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// A lazily connecting tonic channel to `addr` over TLS; each connection must be answered
/// by a peer `expect` accepts (e.g. a cell), or it is closed before any request is sent.
pub fn channel(
    addr: &str,
    config: Arc<Reloading<ClientConfig>>,
    expect: fn(&Identity) -> bool,
    connect_timeout: Duration,
    request_timeout: Duration,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let host = host_of(addr).to_string();
    channel_named(
        addr,
        &host,
        config,
        expect,
        connect_timeout,
        request_timeout,
    )
}

/// Like [`channel`], verifying the server's certificate for `host` (see [`connect_named`]).
pub fn channel_named(
    addr: &str,
    host: &str,
    config: Arc<Reloading<ClientConfig>>,
    expect: fn(&Identity) -> bool,
    connect_timeout: Duration,
    request_timeout: Duration,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let (target, host) = (addr.to_string(), host.to_string());
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let (target, host, cfg) = (target.clone(), host.clone(), config.current());
        async move {
            let (tls, id) = connect_named(&target, &host, cfg).await?;
            match id {
                Some(id) if expect(&id) => Ok(hyper_util::rt::TokioIo::new(tls)),
                other => Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{target} answered as {}, not the component expected there",
                        other.map_or_else(|| "nobody".to_string(), |i| i.label())
                    ),
                )),
            }
        }
    });
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(connect_timeout)
            .timeout(request_timeout)
            .connect_with_connector_lazy(connector),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("127.0.0.1:7500"), "127.0.0.1");
        assert_eq!(host_of("r1-a-blue.ldc.svc:7500"), "r1-a-blue.ldc.svc");
        assert_eq!(host_of("[::1]:7500"), "::1");
    }
}
