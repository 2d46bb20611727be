//! The one path that dials upstreams: the HTTP/1 pools, the HTTP/2 connections and opaque TCP all
//! connect through [`Connect`], so the connect timeout, TCP options, the connection counter, the
//! bound on connections per upstream (and, with mTLS, the TLS client) live in one place.
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

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::errors::{BoxError, ConnectError, ConnectTimeout, UpstreamBusy};

/// Addresses whose bounds are kept before unused ones are forgotten.
const MAX_TRACKED: usize = 4096;

/// Dials upstream endpoints; cheap to clone.
#[derive(Debug, Clone)]
pub struct Connect {
    timeout: Duration,
    connects: IntCounter,
    max_per_upstream: usize,
    open: Arc<Mutex<HashMap<SocketAddr, Arc<Semaphore>>>>,
}

impl Connect {
    /// Dials within `timeout`, counting every dial in `connects`, with at most
    /// `max_per_upstream` connections open to one address.
    pub fn new(timeout: Duration, connects: IntCounter, max_per_upstream: usize) -> Self {
        Self {
            timeout,
            connects,
            max_per_upstream: max_per_upstream.max(1),
            open: Arc::default(),
        }
    }

    /// The bound on open connections per upstream address.
    pub fn max_per_upstream(&self) -> usize {
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
    pub async fn connect(&self, addr: SocketAddr) -> Result<Upstream, BoxError> {
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
            stream,
            _slot: permit,
        })
    }
}

pin_project_lite::pin_project! {
    /// An upstream connection; its slot in the per-upstream bound is freed when it closes.
    #[derive(Debug)]
    pub struct Upstream {
        #[pin]
        stream: TcpStream,
        _slot: OwnedSemaphorePermit,
    }
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().stream.poll_read(cx, buf)
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().stream.poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().stream.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().stream.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().stream.poll_shutdown(cx)
    }
}

impl crate::detect::Readable for Upstream {
    fn readable(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send {
        self.stream.readable()
    }
}

impl hyper_util::client::legacy::connect::Connection for Upstream {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.stream.connected()
    }
}
