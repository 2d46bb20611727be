//! The one path that dials upstreams: the HTTP/1 pools, the HTTP/2 connections and opaque TCP all
//! connect through [`Connect`], so the connect timeout, TCP options, the connection counter, the
//! bound on connections per upstream and the mutual TLS client live in one place.
//!
//! To an endpoint with an identity, [`Connect::connect_tls`] originates TLS 1.3 with the proxy's
//! certificate and the ALPN marker of what the connection carries, and accepts the peer only if
//! it is exactly that identity; the handshake is bounded by the connect timeout too.
//!
//! The bound: at most `max_per_upstream` connections to one address are open at once, whatever
//! asks for them, so no single destination (or a forwarding loop) can take every file descriptor.
//! Past it a dial fails at once with [`UpstreamBusy`] (503 `overloaded`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use outrider_control::api::Identity;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::client::TlsStream;

use crate::errors::{BoxError, ConnectError, ConnectTimeout, TlsFailed, UpstreamBusy};
use crate::identity::{Alpn, IdentityStore};
use crate::metrics::Handshakes;

/// Addresses whose bounds are kept before unused ones are forgotten.
const MAX_TRACKED: usize = 4096;

/// Dials upstream endpoints; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Connect {
    timeout: Duration,
    connects: IntCounter,
    max_per_upstream: usize,
    open: Arc<Mutex<HashMap<SocketAddr, Arc<Semaphore>>>>,
    tls: Option<MeshClient>,
}

/// The mutual TLS client: the proxy's identity and the handshake counters.
#[derive(Debug, Clone)]
struct MeshClient {
    store: Arc<IdentityStore>,
    handshakes: Handshakes,
}

impl Connect {
    /// Dials within `timeout`, counting every dial in `connects`, with at most
    /// `max_per_upstream` connections open to one address.
    pub(crate) fn new(timeout: Duration, connects: IntCounter, max_per_upstream: usize) -> Self {
        Self {
            timeout,
            connects,
            max_per_upstream: max_per_upstream.max(1),
            open: Arc::default(),
            tls: None,
        }
    }

    /// Originates mutual TLS with `store`'s certificate to endpoints that have an identity,
    /// counting handshakes in `handshakes`.
    pub(crate) fn with_tls(mut self, store: Arc<IdentityStore>, handshakes: Handshakes) -> Self {
        self.tls = Some(MeshClient { store, handshakes });
        self
    }

    /// Whether this proxy originates mTLS (it has an identity configured).
    pub(crate) fn is_meshed(&self) -> bool {
        self.tls.is_some()
    }

    /// The generation of this proxy's own certificate (see
    /// [`IdentityStore::leaf_generation`]; 0 without an identity). A mesh connection dialled
    /// under an older generation presented a certificate that has since been renewed: the
    /// server closes it when that certificate expires, so new requests should not start on it.
    pub(crate) fn leaf_generation(&self) -> u64 {
        self.tls.as_ref().map_or(0, |t| t.store.leaf_generation())
    }

    /// Connects to `addr`, in mutual TLS carrying `alpn` when `peer` names the endpoint's
    /// identity and this proxy has one (else in plaintext, as before mTLS).
    pub(crate) async fn connect_to(
        &self,
        addr: SocketAddr,
        peer: Option<&Identity>,
        alpn: Alpn,
    ) -> Result<Upstream, BoxError> {
        match peer {
            Some(peer) if self.tls.is_some() => self.connect_tls(addr, peer, alpn).await,
            _ => self.connect(addr).await,
        }
    }

    /// Connects to `addr` and does a TLS 1.3 handshake that presents this proxy's certificate,
    /// offers `alpn` and accepts only `peer`. Fails with [`TlsFailed`] (or a connect error).
    ///
    /// A session resumed with a peer whose certificate has expired since (resumption does not
    /// verify it again) is not used: the cached sessions for that peer are dropped and the
    /// connection is made again with a full handshake.
    pub(crate) async fn connect_tls(
        &self,
        addr: SocketAddr,
        peer: &Identity,
        alpn: Alpn,
    ) -> Result<Upstream, BoxError> {
        let failed = |source: BoxError| TlsFailed {
            addr,
            peer: peer.to_string(),
            source,
        };
        let Some(tls) = &self.tls else {
            return Err(failed("this proxy has no identity configured".into()).into());
        };
        for _ in 0..2 {
            let Some(config) = tls.store.client_config(peer, alpn) else {
                tls.handshakes.failed.inc();
                return Err(failed("this proxy has no certificate yet".into()).into());
            };
            let upstream = self.connect(addr).await?;
            let Stream::Plain(tcp) = upstream.stream else {
                return Err(failed("already TLS".into()).into());
            };
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let handshake = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
            let stream = match tokio::time::timeout(self.timeout, handshake).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tls.handshakes.failed.inc();
                    return Err(failed(e.into()).into());
                }
                Err(_) => {
                    tls.handshakes.failed.inc();
                    let after = outrider_control::duration::format(self.timeout);
                    let why = format!("the handshake took longer than {after}");
                    return Err(failed(why.into()).into());
                }
            };
            let state = stream.get_ref().1;
            if crate::identity::tls::resumed_with_expired_peer(state) {
                tracing::debug!(%addr, %peer, "resumed a session whose peer certificate has expired; handshaking again");
                tls.store.forget_sessions(peer, alpn);
                continue;
            }
            if state.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                tls.handshakes.resumed.inc();
            } else {
                tls.handshakes.full.inc();
            }
            return Ok(Upstream {
                stream: Stream::Tls(Box::new(stream)),
                pending: Bytes::new(),
                _slot: upstream._slot,
            });
        }
        tls.handshakes.failed.inc();
        let why = "the peer's certificate has expired (a resumed session and a new handshake)";
        Err(failed(why.into()).into())
    }

    /// The bound on open connections per upstream address.
    pub(crate) fn max_per_upstream(&self) -> usize {
        self.max_per_upstream
    }

    fn slot(&self, addr: SocketAddr) -> Result<OwnedSemaphorePermit, BoxError> {
        let mut open = match self.open.lock() {
            Ok(o) => o,
            Err(poisoned) => poisoned.into_inner(),
        };
        if open.len() >= MAX_TRACKED && !open.contains_key(&addr) {
            let max = self.max_per_upstream;
            open.retain(|_, s| s.available_permits() < max);
        }
        // Acquired under the lock, so a concurrent clean-up cannot forget a semaphore that is
        // about to hand out a permit (two semaphores for one address would double the bound).
        open.entry(addr)
            .or_insert_with(|| Arc::new(Semaphore::new(self.max_per_upstream)))
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                UpstreamBusy {
                    addr,
                    max: self.max_per_upstream,
                }
                .into()
            })
    }

    /// Connects to `addr` with Nagle off and TCP keepalive on (probes after 30 s idle, every
    /// 10 s, so an upstream that vanished without a FIN is found). Fails with [`UpstreamBusy`],
    /// [`ConnectError`] or [`ConnectTimeout`].
    pub(crate) async fn connect(&self, addr: SocketAddr) -> Result<Upstream, BoxError> {
        let permit = self.slot(addr)?;
        self.connects.inc();
        let stream = match tokio::time::timeout(self.timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => return Err(ConnectError { addr, source }.into()),
            Err(_) => {
                return Err(ConnectTimeout {
                    addr,
                    after: self.timeout,
                }
                .into())
            }
        };
        let tune = |s: &TcpStream| -> std::io::Result<()> {
            s.set_nodelay(true)?;
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(Duration::from_secs(30))
                .with_interval(Duration::from_secs(10));
            socket2::SockRef::from(s).set_tcp_keepalive(&keepalive)
        };
        tune(&stream).map_err(|source| ConnectError { addr, source })?;
        Ok(Upstream {
            stream: Stream::Plain(stream),
            pending: Bytes::new(),
            _slot: permit,
        })
    }
}

/// An upstream connection's stream: plain TCP, or mutual TLS over it.
#[derive(Debug)]
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An upstream connection; its slot in the per-upstream bound is freed when it closes.
#[derive(Debug)]
pub(crate) struct Upstream {
    stream: Stream,
    /// Application bytes read while waiting for the upstream to speak first (TLS only).
    pending: Bytes,
    _slot: OwnedSemaphorePermit,
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.get_mut().stream {
            Stream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for Upstream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.pending.is_empty() {
            let n = self.pending.len().min(buf.remaining());
            buf.put_slice(&self.pending[..n]);
            self.pending.advance(n);
            return Poll::Ready(Ok(()));
        }
        each!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        each!(self, s => s.poll_write(cx, buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        each!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        each!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        each!(self, s => s.poll_shutdown(cx))
    }
}

impl crate::detect::Readable for Upstream {
    async fn readable(&mut self) -> std::io::Result<()> {
        match &mut self.stream {
            Stream::Plain(s) => s.readable().await,
            // TLS records that carry no application data (session tickets) are not the server
            // speaking: wait for real bytes, and keep them for the copy.
            Stream::Tls(s) => {
                if self.pending.is_empty() {
                    let mut buf = BytesMut::with_capacity(4096);
                    s.read_buf(&mut buf).await?;
                    self.pending = buf.freeze();
                }
                Ok(())
            }
        }
    }
}

impl hyper_util::client::legacy::connect::Connection for Upstream {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        match &self.stream {
            Stream::Plain(s) => s.connected(),
            Stream::Tls(s) => s.get_ref().0.connected(),
        }
    }
}
