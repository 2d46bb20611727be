//! Transport wrappers used by every connection:
//!
//! - [`PrefixedIo`] replays the bytes that protocol detection already read, then reads from the
//!   socket; writes go straight through.
//! - [`MeteredIo`] counts the bytes the downstream socket carries (into the direction's TCP
//!   counters) and stamps an [`Activity`] clock, which the idle timeouts read.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use pin_project_lite::pin_project;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

pin_project! {
    /// An IO that first yields `prefix`, then reads from `io`.
    #[derive(Debug)]
    pub struct PrefixedIo<T> {
        prefix: Bytes,
        #[pin]
        io: T,
    }
}

impl<T> PrefixedIo<T> {
    /// Wraps `io`, replaying `prefix` before its own bytes.
    pub(crate) fn new(prefix: Bytes, io: T) -> Self {
        Self { prefix, io }
    }

    /// The wrapped IO.
    pub(crate) fn get_ref(&self) -> &T {
        &self.io
    }
}

impl<T: AsyncRead> AsyncRead for PrefixedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        this.io.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for PrefixedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The last time a connection moved a byte, readable from another task.
#[derive(Debug, Clone)]
pub(crate) struct Activity {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    /// A clock that starts now.
    pub(crate) fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Records activity now.
    pub(crate) fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// How long since the last recorded activity.
    pub(crate) fn idle_for(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }

    /// Resolves once nothing has moved for `timeout` and `is_busy` says no work is in flight.
    pub(crate) async fn idle(&self, timeout: Duration, is_busy: impl Fn() -> bool) {
        loop {
            let idle = self.idle_for();
            if idle >= timeout && !is_busy() {
                return;
            }
            let wait = timeout.saturating_sub(idle).max(Duration::from_millis(100));
            tokio::time::sleep(wait).await;
        }
    }
}

pin_project! {
    /// Counts bytes received from and sent to the downstream peer, and stamps activity.
    #[derive(Debug)]
    pub struct MeteredIo<T> {
        #[pin]
        io: T,
        received: IntCounter,
        sent: IntCounter,
        activity: Activity,
    }
}

impl<T> MeteredIo<T> {
    /// Wraps an accepted connection's `io`, counting into its direction's TCP byte counters, with
    /// a fresh activity clock (returned too, for the idle timeouts).
    pub(crate) fn accepted(io: T, metrics: &crate::metrics::DirectionMetrics) -> (Self, Activity) {
        let activity = Activity::new();
        let io = Self {
            io,
            received: metrics.tcp_received.clone(),
            sent: metrics.tcp_sent.clone(),
            activity: activity.clone(),
        };
        (io, activity)
    }

    /// The wrapped IO.
    pub(crate) fn get_ref(&self) -> &T {
        &self.io
    }
}

impl<T: AsyncRead> AsyncRead for MeteredIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let res = this.io.poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.received.inc_by(n as u64);
            this.activity.touch();
        }
        res
    }
}

impl<T: AsyncWrite> AsyncWrite for MeteredIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = this.io.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            this.sent.inc_by(n as u64);
            this.activity.touch();
        }
        res
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = this.io.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            this.sent.inc_by(n as u64);
            this.activity.touch();
        }
        res
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn prefix_is_replayed_before_the_socket() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.unwrap();
        drop(a);
        let mut io = PrefixedIo::new(Bytes::from_static(b"hello"), b);
        let mut out = String::new();
        io.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_quiet_and_no_work() {
        let activity = Activity::new();
        activity.touch();
        let busy = std::sync::atomic::AtomicBool::new(true);
        let t = Instant::now();
        let idle = activity.idle(Duration::from_secs(5), || busy.load(Ordering::Relaxed));
        tokio::pin!(idle);
        assert!(tokio::time::timeout(Duration::from_secs(10), &mut idle)
            .await
            .is_err());
        busy.store(false, Ordering::Relaxed);
        idle.await;
        assert!(t.elapsed() >= Duration::from_secs(10));
    }
}
