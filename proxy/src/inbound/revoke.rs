//! Open connections follow changes of who may call: a connection whose caller the policy no
//! longer allows, whose mesh certificate no longer chains to the trust bundle (a root was
//! removed), or whose certificate has expired, is closed, as linkerd and ztunnel do.
//!
//! Each inbound connection's bytes go through a [`Revocable`] wrapper. Once the caller and the
//! port are known, a watcher task ([`watch`]) waits for a change that refuses the caller. It then
//! drains the connection (HTTP/1 `Connection: close`, HTTP/2 GOAWAY) and, after [`GRACE`], cuts
//! the wrapper: every read and write fails from then on, which ends opaque TCP, upgraded streams
//! and HTTP requests still in flight. The watcher ends with the connection.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures_util::task::AtomicWaker;
use outrider_control::api::Identity;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::policy::Policies;
use crate::drain;
use crate::identity::IdentityStore;

/// How long a revoked HTTP connection may finish what it is doing before it is cut.
pub(crate) const GRACE: Duration = Duration::from_millis(500);

/// The switch shared by a connection's [`Revocable`] and its watcher.
#[derive(Debug, Default)]
pub(crate) struct Cut {
    cut: AtomicBool,
    read: AtomicWaker,
    write: AtomicWaker,
}

impl Cut {
    /// Cuts the connection: pending and later reads and writes fail.
    pub(crate) fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.read.wake();
        self.write.wake();
    }

    fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
}

fn aborted() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "closed: the caller is no longer authorized",
    )
}

/// A connection's IO that fails once its [`Cut`] is cut.
#[derive(Debug)]
pub(crate) struct Revocable<I> {
    io: I,
    cut: Arc<Cut>,
}

impl<I> Revocable<I> {
    /// Wraps `io`; the returned switch cuts it.
    pub(crate) fn new(io: I) -> (Self, Arc<Cut>) {
        let cut = Arc::new(Cut::default());
        (
            Self {
                io,
                cut: cut.clone(),
            },
            cut,
        )
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Revocable<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.cut.read.register(cx.waker());
        if self.cut.is_cut() {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Revocable<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.cut.write.register(cx.waker());
        if self.cut.is_cut() {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.cut.write.register(cx.waker());
        if self.cut.is_cut() {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.cut.write.register(cx.waker());
        if self.cut.is_cut() {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A mesh caller's certificate, as presented at the handshake.
#[derive(Debug, Clone)]
pub(crate) struct PeerCert {
    /// The chain, leaf first.
    pub(crate) chain: Vec<CertificateDer<'static>>,
    /// When the leaf expires.
    pub(crate) not_after: Option<SystemTime>,
}

impl PeerCert {
    /// The certificate `chain` (leaf first) of a mesh caller.
    pub(crate) fn new(chain: &[CertificateDer<'_>]) -> Self {
        let not_after = chain.first().and_then(|leaf| {
            let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
            let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
            SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
        });
        Self {
            chain: chain.iter().map(|c| c.clone().into_owned()).collect(),
            not_after,
        }
    }
}

/// What a connection's watcher needs to know of it.
pub(crate) struct Watched {
    /// The app port it calls.
    pub(crate) port: u16,
    /// The caller (`None`: plaintext).
    pub(crate) peer: Option<Arc<Identity>>,
    /// The caller's certificate (mesh callers).
    pub(crate) cert: Option<PeerCert>,
    /// How long the connection may finish its work once revoked ([`GRACE`] for HTTP, none for
    /// opaque TCP).
    pub(crate) grace: Duration,
}

/// Aborts the watcher when the connection (its last holder) ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves when something refuses the connection described by `w`; never without a reason.
async fn refused(
    w: &Watched,
    policies: &Policies,
    identity: Option<&IdentityStore>,
) -> &'static str {
    let expiry = async {
        match w.cert.as_ref().and_then(|c| c.not_after) {
            Some(at) => {
                let left = at.duration_since(SystemTime::now()).unwrap_or_default();
                tokio::time::sleep(left).await;
            }
            None => std::future::pending().await,
        }
    };
    let untrusted = async {
        match (identity, &w.cert) {
            (Some(store), Some(cert)) => store.until_untrusted(&cert.chain).await,
            _ => std::future::pending().await,
        }
    };
    tokio::select! {
        () = policies.until_denied(w.port, w.peer.as_deref()) => "policy",
        () = expiry => "peer certificate expired",
        () = untrusted => "peer certificate no longer trusted",
    }
}

/// Starts the watcher of a connection: the returned drain watch is signalled when the listener
/// drains or the caller is refused (the cut follows `w.grace` later); the returned guard, kept
/// with the connection, stops the watcher when the connection ends.
pub(crate) fn watch(
    w: Watched,
    policies: Policies,
    identity: Option<Arc<IdentityStore>>,
    mut listener: drain::Watch,
    cut: Arc<Cut>,
    metrics: Arc<crate::metrics::DirectionMetrics>,
) -> (drain::Watch, Arc<dyn std::any::Any + Send + Sync>) {
    let (signal, conn_drain) = drain::channel();
    let task = tokio::spawn(async move {
        tokio::select! {
            () = listener.signaled() => {
                signal.start();
                // Keep the listener's watch (so its drain waits for this connection) until the
                // connection ends and aborts this task.
                std::future::pending::<()>().await;
            }
            why = refused(&w, &policies, identity.as_deref()) => {
                metrics.error(crate::errors::Reason::Denied);
                tracing::info!(
                    peer = w.peer.as_deref().map_or("a plaintext client", |p| p.as_str()),
                    port = w.port,
                    why,
                    "closing an open connection whose caller is no longer authorized"
                );
                signal.start();
                tokio::time::sleep(w.grace).await;
                cut.cut();
                std::future::pending::<()>().await;
            }
        }
    });
    (conn_drain, Arc::new(AbortOnDrop(task)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_cut_fails_a_pending_read_and_every_later_write() {
        let (a, mut b) = tokio::io::duplex(64);
        let (mut a, cut) = Revocable::new(a);
        b.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        a.read_exact(&mut one).await.unwrap();
        let pending = tokio::spawn(async move {
            let read = a.read(&mut one).await;
            (read.map_err(|e| e.kind()), a.write_all(b"y").await.is_err())
        });
        tokio::task::yield_now().await;
        cut.cut();
        let (read, write_failed) = pending.await.unwrap();
        assert_eq!(read, Err(io::ErrorKind::ConnectionAborted));
        assert!(write_failed);
    }
}
