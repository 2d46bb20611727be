//! The server side of an HTTP connection: hyper (HTTP/1.1 with upgrades, or HTTP/2) in front of
//! a direction's request stack, which is built once and shared by every connection.
//!
//! Per-connection state does not live in the stack: the server inserts a [`ConnContext`] into
//! every request that may become a byte stream (`Upgrade`, `CONNECT`: the drain signal, the
//! connection guard and activity clock an upgraded stream keeps), counts the connection's in-flight requests (the idle timeout never closes a connection
//! that has some) and boxes the request body into [`super::Body`].
//!
//! The connection ends when the client closes it, when a drain starts, or when it has been idle
//! with no request in flight for the idle timeout. A drain sends HTTP/2 GOAWAY at once; an HTTP/1
//! connection answers its next requests with `Connection: close` and, if it stays idle, is closed
//! only after the drain grace (`--drain-window`), so a keep-alive client that sends during the
//! window gets an answer, never an EOF. In-flight requests finish.

use std::any::Any;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tower::ServiceExt;

use crate::detect::Protocol;
use crate::drain;
use crate::errors::{BoxError, RequestBodyError, ResponseBody};
use crate::metrics::DirectionMetrics;
use crate::transport::io::Activity;

use super::Body;

/// Server-side limits of one HTTP connection.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest request header block (bytes). HTTP/1 answers 431 beyond it; HTTP/2 resets the stream.
    pub max_header_bytes: u32,
    /// HTTP/1: time allowed for a request's headers to arrive.
    pub header_read_timeout: Duration,
    /// Idle time (no request in flight, no bytes moving) after which the connection is closed.
    pub idle_timeout: Duration,
    /// Time without a byte either way on the client connection after which it is closed even
    /// with requests in flight (a hung upstream, a stalled upload).
    pub stream_idle_timeout: Duration,
    /// After a drain starts, how long an idle HTTP/1 connection stays open (its next response
    /// says `Connection: close`).
    pub drain_grace: Duration,
}

impl From<&crate::config::Config> for ServerConfig {
    fn from(config: &crate::config::Config) -> Self {
        Self {
            max_header_bytes: config.max_header_bytes,
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.http_idle_timeout,
            stream_idle_timeout: config.stream_idle_timeout,
            drain_grace: config.drain_window,
        }
    }
}

/// What the downstream connection lends to its requests: an upgraded (WebSocket, CONNECT) stream
/// outlives its request and keeps these until it closes.
pub struct ConnContext {
    /// Drains wait for upgraded streams too.
    pub drain: drain::Watch,
    /// The downstream connection's guard (connection limit, gauges): never read, only kept alive
    /// (its drop frees the connection's slot).
    #[allow(dead_code)]
    pub held: Arc<dyn Any + Send + Sync>,
    /// The downstream connection's activity clock.
    pub activity: Activity,
    /// Idle timeout of an upgraded stream.
    pub idle_timeout: Duration,
}

impl std::fmt::Debug for ConnContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnContext").finish_non_exhaustive()
    }
}

/// The request stack a server calls: a cheap clone per request, never failing (its rescue layer
/// turns errors into responses).
pub trait Stack:
    tower::Service<
        Request<Body>,
        Response = Response<ResponseBody>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> Stack for S where
    S: tower::Service<
            Request<Body>,
            Response = Response<ResponseBody>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// Serves HTTP on `io` with `stack` until the connection ends, a drain completes it, or it idles
/// out. Requests hyper answers itself (malformed: 400, oversized headers: 431) are counted in
/// `metrics` as 4xx responses with reason `bad-request`. An HTTP/1 client that started a request
/// but did not finish its headers within the header-read timeout gets `408 Request Timeout`
/// (hyper would only close), counted with reason `header-timeout`.
pub async fn serve<I, S>(
    io: I,
    protocol: Protocol,
    stack: S,
    config: &ServerConfig,
    ctx: ConnContext,
    metrics: &DirectionMetrics,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Stack,
{
    let (back, returned) = tokio::sync::oneshot::channel();
    let head = (protocol == Protocol::Http1).then(|| Arc::new(Head::new()));
    let io = Returning {
        io: Some(io),
        back: Some(back),
        partial: false,
        head: head.clone(),
    };
    let e = match serve_inner(io, protocol, stack, config, ctx, head).await {
        Ok(()) => return,
        Err(Ended::HeaderTimeout) => {
            // The connection (and with it the IO) is dropped: answer on the IO handed back.
            if let Ok((mut io, true)) = returned.await {
                use tokio::io::AsyncWriteExt;
                const TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\noutrider-error: header-timeout\r\n\r\n";
                let write = async {
                    io.write_all(TIMEOUT).await?;
                    io.shutdown().await
                };
                let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
                metrics.response(http::StatusCode::REQUEST_TIMEOUT);
                metrics.error(crate::errors::Reason::HeaderTimeout);
            }
            return tracing::debug!("request head not complete within the header-read timeout");
        }
        Err(Ended::Hyper(e)) => e,
    };
    if e.is_parse() || e.is_parse_too_large() {
        metrics.response(http::StatusCode::BAD_REQUEST);
        metrics.error(crate::errors::Reason::BadRequest);
    }
    tracing::debug!(error = %e, "HTTP connection ended with an error");
}

/// How a connection's serving ended, when not cleanly.
enum Ended {
    /// hyper's own error.
    Hyper(hyper::Error),
    /// An HTTP/1 request head did not complete within the header-read timeout.
    HeaderTimeout,
}

/// The HTTP/1 header-read clock of one connection. hyper's own header timeout also runs between
/// keep-alive requests, so it would close idle connections after the header timeout instead of
/// the idle timeout; this one runs only from a request's first byte to its complete head.
///
/// It ticks every half header timeout and costs a request two atomic stores, no clock read and no
/// timer: a head still pending two ticks after the tick it started in is late, so the 408 comes
/// between one and one and a half header timeouts after the first byte.
struct Head {
    /// Ticks so far.
    tick: AtomicU64,
    /// The tick in which the pending head's first byte arrived, plus 1 (0: none pending).
    since: AtomicU64,
    /// Requests between their complete head and their response head.
    in_flight: AtomicUsize,
}

impl Head {
    fn new() -> Self {
        Self {
            tick: AtomicU64::new(0),
            since: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// Bytes arrived: with no request in progress, they start a head.
    fn read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0 && self.since.load(Ordering::Relaxed) == 0 {
            let now = self.tick.load(Ordering::Relaxed) + 1;
            self.since.store(now, Ordering::Relaxed);
        }
    }

    /// The head is complete (hyper handed the request over).
    fn complete(&self) {
        self.since.store(0, Ordering::Relaxed);
    }

    /// Resolves once a head has been pending for the header timeout (up to one and a half).
    async fn timed_out(&self, timeout: Duration) {
        let period = (timeout / 2).max(Duration::from_millis(1));
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let tick = self.tick.fetch_add(1, Ordering::Relaxed) + 1;
            let since = self.since.load(Ordering::Relaxed);
            if since != 0 && tick >= since + 2 {
                return;
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The connection's IO, handed back when hyper drops it, with whether a request had started
    /// (bytes read since the last write): so the server can still answer a header timeout.
    struct Returning<T> {
        io: Option<T>,
        back: Option<tokio::sync::oneshot::Sender<(T, bool)>>,
        partial: bool,
        head: Option<Arc<Head>>,
    }

    impl<T> PinnedDrop for Returning<T> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let (Some(io), Some(back)) = (this.io.take(), this.back.take()) {
                let _ = back.send((io, *this.partial));
            }
        }
    }
}

fn gone() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "the connection was handed back",
    )
}

impl<T: AsyncRead + Unpin> AsyncRead for Returning<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.project();
        let Some(io) = this.io.as_mut() else {
            return std::task::Poll::Ready(Err(gone()));
        };
        let before = buf.filled().len();
        let res = Pin::new(io).poll_read(cx, buf);
        if buf.filled().len() > before {
            *this.partial = true;
            if let Some(head) = this.head {
                head.read();
            }
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Returning<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.project();
        let Some(io) = this.io.as_mut() else {
            return std::task::Poll::Ready(Err(gone()));
        };
        *this.partial = false;
        Pin::new(io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.project();
        let Some(io) = this.io.as_mut() else {
            return std::task::Poll::Ready(Err(gone()));
        };
        *this.partial = false;
        Pin::new(io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }
    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.project().io.as_mut() {
            Some(io) => Pin::new(io).poll_flush(cx),
            None => std::task::Poll::Ready(Err(gone())),
        }
    }
    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.project().io.as_mut() {
            Some(io) => Pin::new(io).poll_shutdown(cx),
            None => std::task::Poll::Ready(Err(gone())),
        }
    }
}

async fn serve_inner<I, S>(
    io: I,
    protocol: Protocol,
    stack: S,
    config: &ServerConfig,
    ctx: ConnContext,
    head: Option<Arc<Head>>,
) -> Result<(), Ended>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Stack,
{
    let mut drain = ctx.drain.clone();
    let activity = ctx.activity.clone();
    let closing = (protocol == Protocol::Http1).then(|| Arc::new(AtomicBool::new(false)));
    let in_flight = Arc::new(AtomicUsize::new(0));
    // Requests starting and ending: HTTP/2's pings move bytes on an idle connection, so its
    // idleness is measured on requests, not on the socket.
    let requests = (protocol == Protocol::Http2).then(Activity::new);
    let svc = ConnService {
        stack,
        ctx: Arc::new(ctx),
        in_flight: in_flight.clone(),
        requests: requests.clone(),
        head: head.clone(),
        body_idle: (protocol == Protocol::Http2).then_some(config.stream_idle_timeout),
        closing: closing.clone(),
    };
    let io = TokioIo::new(io);
    let busy = in_flight.clone();
    let is_busy = move || busy.load(Ordering::Relaxed) > 0;
    if protocol == Protocol::Http2 {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            // Pings find dead peers; a peer that does not answer within 10 s is dropped.
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10))
            .max_header_list_size(config.max_header_bytes);
        let conn = builder.serve_connection(io, svc);
        let requests = requests.unwrap_or_default();
        let idle = requests.idle(config.idle_timeout, is_busy);
        // HTTP/2's pings keep the socket busy, so the stream idle timeout applies per stream,
        // to each request and response body (`IdleBody`), not to the connection.
        let stuck = std::future::pending();
        drive(
            conn,
            |c| c.graceful_shutdown(),
            Drain {
                watch: &mut drain,
                closing: None,
                grace: config.drain_grace,
            },
            idle,
            stuck,
            std::future::pending(),
        )
        .await
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            // Our own clock (`Head`) times request heads; hyper's would also close idle
            // keep-alive connections at the header timeout.
            .header_read_timeout(None)
            // A client may send its request and shut down its write side while it waits.
            .half_close(true)
            .max_buf_size(config.max_header_bytes.max(8192) as usize);
        let conn = builder.serve_connection(io, svc).with_upgrades();
        let idle = activity.idle(config.idle_timeout, is_busy);
        let stream_idle = config.stream_idle_timeout;
        let stuck_clock = activity.clone();
        let stuck = async move { stuck_clock.idle(stream_idle, || false).await };
        let header_timeout = config.header_read_timeout;
        let head_late = async move {
            match head {
                Some(head) => head.timed_out(header_timeout).await,
                None => std::future::pending().await,
            }
        };
        drive(
            conn,
            |c| c.graceful_shutdown(),
            Drain {
                watch: &mut drain,
                closing,
                grace: config.drain_grace,
            },
            idle,
            stuck,
            head_late,
        )
        .await
    }
}

/// The per-connection adapter between hyper and the shared stack.
struct ConnService<S> {
    stack: S,
    ctx: Arc<ConnContext>,
    in_flight: Arc<AtomicUsize>,
    /// HTTP/2: stamped when requests start and end.
    requests: Option<Activity>,
    head: Option<Arc<Head>>,
    /// HTTP/2: how long a request or response body may stay without a frame.
    body_idle: Option<Duration>,
    /// HTTP/1: set once a drain started; responses then say `Connection: close`.
    closing: Option<Arc<AtomicBool>>,
}

/// Decrements the in-flight counts when the request ends, however it ends.
struct InFlight {
    count: Arc<AtomicUsize>,
    requests: Option<Activity>,
    head: Option<Arc<Head>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
        if let Some(requests) = &self.requests {
            requests.touch();
        }
        if let Some(head) = &self.head {
            head.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl<S: Stack> hyper::service::Service<Request<Incoming>> for ConnService<S> {
    type Response = Response<IdleBody<ResponseBody>>;
    type Error = Infallible;
    type Future = Counted<tower::util::Oneshot<S, Request<Body>>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        if let Some(requests) = &self.requests {
            requests.touch();
        }
        if let Some(head) = &self.head {
            head.in_flight.fetch_add(1, Ordering::Relaxed);
            head.complete();
        }
        let body_idle = self.body_idle;
        let mut req = req.map(|b| {
            let b = b.map_err(|e| BoxError::from(RequestBodyError(e)));
            match body_idle {
                Some(idle) => IdleBody::new(b, Some(idle)).boxed_unsync(),
                None => b.boxed_unsync(),
            }
        });
        // Only a request that may become a byte stream needs the connection's context (and an
        // extension map allocated for it).
        let may_upgrade = req.method() == http::Method::CONNECT
            || req.headers().contains_key(http::header::UPGRADE);
        if may_upgrade {
            req.extensions_mut().insert(self.ctx.clone());
        }
        Counted {
            inner: self.stack.clone().oneshot(req),
            body_idle,
            closing: self.closing.clone(),
            _in_flight: InFlight {
                count: self.in_flight.clone(),
                requests: self.requests.clone(),
                head: self.head.clone(),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// A request's response future, counted in flight until it ends.
    pub struct Counted<F> {
        #[pin]
        inner: F,
        body_idle: Option<Duration>,
        closing: Option<Arc<AtomicBool>>,
        _in_flight: InFlight,
    }
}

impl<F> Future for Counted<F>
where
    F: Future<Output = Result<Response<ResponseBody>, Infallible>>,
{
    type Output = Result<Response<IdleBody<ResponseBody>>, Infallible>;
    fn poll(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let idle = *this.body_idle;
        let closing = this
            .closing
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed));
        this.inner.poll(cx).map(|r| {
            r.map(|mut rsp| {
                // A draining HTTP/1 connection closes after this response (not after a switch
                // of protocols: the stream is the client's then).
                if closing && rsp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
                    rsp.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                rsp.map(|b| IdleBody::new(b, idle))
            })
        })
    }
}

/// A body that stayed without a frame for the stream idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("no body data for the stream idle timeout ({0:?})")]
pub struct BodyIdle(Duration);

pin_project_lite::pin_project! {
    /// A body that fails with [`BodyIdle`] once no frame has come for its idle timeout (none:
    /// no bound), so a stalled HTTP/2 upload or download does not hold its stream forever.
    pub struct IdleBody<B> {
        #[pin]
        inner: B,
        idle: Option<Duration>,
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<B> IdleBody<B> {
    /// `inner`, failing after `idle` without a frame.
    pub fn new(inner: B, idle: Option<Duration>) -> Self {
        Self {
            inner,
            idle,
            timer: None,
        }
    }
}

impl<B> http_body::Body for IdleBody<B>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                if let (Some(timer), Some(idle)) = (this.timer.as_mut(), *this.idle) {
                    timer.as_mut().reset(tokio::time::Instant::now() + idle);
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let Some(idle) = *this.idle else {
                    return Poll::Pending;
                };
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyIdle(idle).into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Polls a hyper connection, asking it to shut down gracefully once on drain or idleness, and
/// dropping it when nothing has moved for the stream idle timeout (`stuck`) or a request head is
/// late (`head_late`).
/// How a connection learns of a drain and answers it.
struct Drain<'a> {
    watch: &'a mut drain::Watch,
    /// HTTP/1: set at the drain (responses say `Connection: close`); the connection is shut down
    /// after `grace`. `None`: shut down at once (HTTP/2 GOAWAY).
    closing: Option<Arc<AtomicBool>>,
    grace: Duration,
}

async fn drive<C>(
    conn: C,
    graceful: impl Fn(Pin<&mut C>),
    drain: Drain<'_>,
    idle: impl Future<Output = ()>,
    stuck: impl Future<Output = ()>,
    head_late: impl Future<Output = ()>,
) -> Result<(), Ended>
where
    C: Future<Output = Result<(), hyper::Error>>,
{
    let Drain {
        watch,
        closing: close_next,
        grace,
    } = drain;
    tokio::pin!(conn);
    tokio::pin!(idle);
    tokio::pin!(stuck);
    tokio::pin!(head_late);
    let late = tokio::time::sleep(Duration::MAX);
    tokio::pin!(late);
    let mut closing = false;
    let mut draining = false;
    loop {
        tokio::select! {
            // The connection first: a drain that is already signalled must not close a
            // connection hyper has not read yet, or the request detection already read is lost.
            biased;
            res = &mut conn => return res.map_err(Ended::Hyper),
            () = watch.signaled(), if !closing && !draining => {
                tracing::debug!("draining connection");
                match &close_next {
                    Some(flag) => {
                        flag.store(true, Ordering::Relaxed);
                        draining = true;
                        let now = tokio::time::Instant::now();
                        late.as_mut().reset(now.checked_add(grace).unwrap_or(now));
                    }
                    None => {
                        graceful(conn.as_mut());
                        closing = true;
                    }
                }
            }
            () = &mut late, if draining && !closing => {
                tracing::debug!("closing a draining connection after the drain grace");
                graceful(conn.as_mut());
                closing = true;
            }
            () = &mut idle, if !closing => {
                tracing::debug!("closing idle connection");
                graceful(conn.as_mut());
                closing = true;
            }
            () = &mut stuck => {
                tracing::debug!("closing a connection with nothing moving for the stream idle timeout");
                return Ok(());
            }
            () = &mut head_late => return Err(Ended::HeaderTimeout),
        }
    }
}
