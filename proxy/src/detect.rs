//! Protocol detection: the first bytes a client sends say what it speaks. Detection reads at most
//! [`crate::Config::detect_max_bytes`] bytes and waits at most `detect_timeout`; the bytes read are
//! replayed to whatever handles the connection (`transport::io::PrefixedIo`). At the deadline, the
//! start of an HTTP request is HTTP (the header timeout applies); a client that sent nothing may
//! wait for a server that speaks first, so the upstream is dialled and whichever side speaks first
//! decides ([`detect_or_wait`]), within a bound. With [`Bounds::early_dial`] (the sidecar's
//! outbound) that dial happens after a short grace instead of at the deadline, and a failed dial
//! ends the connection ([`DetectError::Dial`]): a refused connection stays refused.

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The HTTP/2 connection preface a prior-knowledge (h2c) client starts with.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 prior-knowledge preface.
    Http2,
    /// A TLS ClientHello record (a mesh ClientHello is terminated inbound; other TLS is opaque).
    Tls,
    /// Anything else.
    Opaque,
}

/// How detection ended; the label of the `outrider_detect_total` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The bytes identified the protocol.
    Detected(Protocol),
    /// The client sent nothing conclusive before the timeout, or stayed silent until the
    /// upstream dialled for it spoke first: handled as opaque.
    Timeout,
    /// The destination port is listed as opaque: nothing was read.
    Skipped,
}

impl Outcome {
    /// The protocol the connection is handled as.
    pub fn protocol(self) -> Protocol {
        match self {
            Outcome::Detected(p) => p,
            Outcome::Timeout | Outcome::Skipped => Protocol::Opaque,
        }
    }

    /// A bounded label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Detected(Protocol::Http1) => "http1",
            Outcome::Detected(Protocol::Http2) => "http2",
            Outcome::Detected(Protocol::Tls) => "tls",
            Outcome::Detected(Protocol::Opaque) => "opaque",
            Outcome::Timeout => "timeout",
            Outcome::Skipped => "skipped",
        }
    }

    /// Every label value, for pre-registering metrics.
    pub const ALL: [Outcome; 6] = [
        Outcome::Detected(Protocol::Http1),
        Outcome::Detected(Protocol::Http2),
        Outcome::Detected(Protocol::Tls),
        Outcome::Detected(Protocol::Opaque),
        Outcome::Timeout,
        Outcome::Skipped,
    ];
}

const METHODS: &[&[u8]] = &[
    b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
];
const MAX_METHOD: usize = 24;

/// Classifies the bytes seen so far; `None` means more bytes are needed to decide.
pub fn classify(buf: &[u8], max_bytes: usize) -> Option<Protocol> {
    let first = *buf.first()?;
    if first == 0x16 {
        // TLS handshake record: content type 22, then legacy version 3.x.
        return match buf.get(1..3) {
            None => None,
            Some([3, minor]) if *minor <= 4 => Some(Protocol::Tls),
            Some(_) => Some(Protocol::Opaque),
        };
    }
    if first == b'P' && buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(buf) {
        return None;
    }
    if buf.starts_with(H2_PREFACE) {
        return Some(Protocol::Http2);
    }
    classify_http1(buf, max_bytes)
}

/// RFC 9112 2.2: a server SHOULD ignore at least one empty line before the request line.
pub(crate) fn skip_empty_lines(mut buf: &[u8]) -> &[u8] {
    while let Some(rest) = buf
        .strip_prefix(b"\r\n")
        .or_else(|| buf.strip_prefix(b"\n"))
    {
        buf = rest;
    }
    buf
}

fn classify_http1(buf: &[u8], max_bytes: usize) -> Option<Protocol> {
    let line_start = skip_empty_lines(buf);
    if line_start.is_empty() || line_start == b"\r" {
        // Only empty lines so far.
        return (buf.len() >= max_bytes).then_some(Protocol::Opaque);
    }
    let buf = line_start;
    // method = token, then SP.
    let method_len = buf
        .iter()
        .take(MAX_METHOD + 1)
        .take_while(|b| is_token_char(**b))
        .count();
    if method_len == buf.len() {
        // Only a token so far.
        return if buf.len() <= MAX_METHOD {
            None
        } else {
            Some(Protocol::Opaque)
        };
    }
    let method = &buf[..method_len];
    // A well-known method is HTTP however the rest of its line is malformed (tab separators, no
    // version, a line longer than we read): the HTTP server answers it (400); it is never
    // tunnelled around the HTTP layer.
    let known = METHODS.contains(&method);
    if method.is_empty() || buf.get(method_len) != Some(&b' ') {
        return Some(if known && !method.is_empty() {
            Protocol::Http1
        } else {
            Protocol::Opaque
        });
    }
    let target = &buf[method_len + 1..];
    let Some(eol) = buf.iter().position(|b| *b == b'\n') else {
        // A request line longer than we read: HTTP/1 for a well-known method, or an unknown one
        // followed by a request target (origin `/`, asterisk `*` or absolute `scheme://`);
        // hyper judges the rest.
        if buf.len() >= max_bytes {
            return Some(if known || is_request_target(target) {
                Protocol::Http1
            } else {
                Protocol::Opaque
            });
        }
        return None;
    };
    let line = buf[..eol].strip_suffix(b"\r").unwrap_or(&buf[..eol]);
    // Any HTTP version goes to the HTTP server, which answers one it does not speak (a 505 or
    // 400 there, never a raw tunnel past every HTTP layer).
    let version = line.rsplit(|b| *b == b' ').next().unwrap_or_default();
    if known || (version.starts_with(b"HTTP/") && line.len() > method_len + 1 + version.len()) {
        Some(Protocol::Http1)
    } else {
        Some(Protocol::Opaque)
    }
}

/// Whether `target` starts like an HTTP request target: `/path`, `*`, or `scheme://...`.
fn is_request_target(target: &[u8]) -> bool {
    match target.first() {
        Some(b'/' | b'*') => true,
        Some(_) => {
            let scheme = target
                .iter()
                .take(16)
                .take_while(|b| b.is_ascii_alphanumeric() || b"+-.".contains(b))
                .count();
            scheme > 0 && target[scheme..].starts_with(b"://")
        }
        None => false,
    }
}

/// RFC 9110 5.6.2 `tchar`: what a method (any token, in any case) is made of.
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// At the detection deadline, whether the bytes read so far begin an HTTP/1 request (a method
/// prefix, or a request line not yet complete) or the HTTP/2 preface: such a client is slow, not
/// speaking another protocol, and the HTTP server's header timeout applies to it.
fn is_http_prefix(buf: &[u8]) -> Option<Protocol> {
    // "PRI " and more: the HTTP/2 preface (a bare "P" or "PR" may as well be POST or PROPFIND).
    if buf.len() >= 4 && H2_PREFACE.starts_with(buf) {
        return Some(Protocol::Http2);
    }
    let line = skip_empty_lines(buf);
    if line.is_empty() || line == b"\r" {
        // Only empty lines: allowed before a request line (RFC 9112 2.2), so HTTP.
        return (!buf.is_empty()).then_some(Protocol::Http1);
    }
    let buf = line;
    let method_len = buf.iter().position(|b| *b == b' ').unwrap_or(buf.len());
    let plausible = !buf.is_empty()
        && method_len <= MAX_METHOD
        && buf[..method_len].iter().all(|b| is_token_char(*b))
        && !buf.contains(&b'\n');
    plausible.then_some(Protocol::Http1)
}

/// Reads from `io` until the protocol is known, `max_bytes` are read, the peer closes its side, or
/// `timeout` passes. Returns the outcome and every byte read, to be replayed.
pub async fn detect<I: AsyncRead + Unpin>(
    io: &mut I,
    timeout: Duration,
    max_bytes: usize,
) -> io::Result<(Outcome, Bytes)> {
    detect_after(
        io,
        BytesMut::with_capacity(1024.min(max_bytes)),
        timeout,
        max_bytes,
    )
    .await
}

/// [`detect`], with `buf` already read.
pub async fn detect_after<I: AsyncRead + Unpin>(
    io: &mut I,
    mut buf: BytesMut,
    timeout: Duration,
    max_bytes: usize,
) -> io::Result<(Outcome, Bytes)> {
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    loop {
        if let Some(p) = classify(&buf, max_bytes) {
            return Ok((Outcome::Detected(p), buf.freeze()));
        }
        if buf.len() >= max_bytes {
            return Ok((Outcome::Detected(Protocol::Opaque), buf.freeze()));
        }
        if buf.capacity() == buf.len() {
            buf.reserve((max_bytes - buf.len()).min(4096));
        }
        let room = (max_bytes - buf.len()).min(buf.capacity() - buf.len());
        let read = {
            let mut limited = (&mut *io).take(room as u64);
            tokio::select! {
                r = limited.read_buf(&mut buf) => r?,
                () = &mut deadline => {
                    // A slow HTTP client is HTTP (its header timeout applies); a silent one is
                    // left to the caller (see `wait_for_first_words`).
                    let outcome = match is_http_prefix(&buf) {
                        Some(p) => Outcome::Detected(p),
                        None => Outcome::Timeout,
                    };
                    return Ok((outcome, buf.freeze()));
                }
            }
        };
        if read == 0 {
            // The client closed its side before we could tell: whatever it sent is opaque.
            return Ok((Outcome::Detected(Protocol::Opaque), buf.freeze()));
        }
    }
}

/// An upstream connection whose first words can be awaited without reading them.
pub trait Readable {
    /// Resolves once the upstream has sent something (or closed). Cancel-safe.
    fn readable(&mut self) -> impl std::future::Future<Output = io::Result<()>> + Send;
}

/// Who spoke first on a connection that was silent through detection.
#[derive(Debug)]
pub enum FirstWords {
    /// The client sent these bytes (detection goes on with them).
    Client(BytesMut),
    /// The upstream spoke first: a server-speaks-first protocol.
    Upstream,
    /// The client closed its side without a word.
    ClientClosed,
    /// Neither side said anything within the timeout.
    Silence,
}

/// After a detection timeout with nothing read, waits for whichever side speaks first, with
/// `upstream` already connected (a server-speaks-first protocol needs it), for at most
/// `timeout`. A client that stays silent does not keep an upstream connection for longer. An
/// upstream that fails (a reset) before a word is [`DetectError::Dial`].
pub async fn wait_for_first_words<I: AsyncRead + Unpin>(
    client: &mut I,
    upstream: &mut impl Readable,
    timeout: Duration,
) -> Result<FirstWords, DetectError> {
    let mut buf = BytesMut::with_capacity(1024);
    tokio::select! {
        read = client.read_buf(&mut buf) => Ok(match read? {
            0 => FirstWords::ClientClosed,
            _ => FirstWords::Client(buf),
        }),
        ready = upstream.readable() => match ready {
            Ok(()) => Ok(FirstWords::Upstream),
            Err(e) => Err(DetectError::Dial(e.into())),
        },
        () = tokio::time::sleep(timeout) => Ok(FirstWords::Silence),
    }
}

/// What a connection turned out to be, and the upstream connection already opened for it when
/// it was silent through detection.
#[derive(Debug)]
pub struct Detected<U> {
    /// How detection ended.
    pub outcome: Outcome,
    /// Every byte read from the client, to be replayed.
    pub prefix: Bytes,
    /// The upstream dialled while the client was silent (used for opaque TCP; dropped for HTTP).
    pub upstream: Option<U>,
}

/// Detection bounds.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// How long to wait for the client's first bytes before dialling the upstream.
    pub timeout: Duration,
    /// Most bytes read.
    pub max_bytes: usize,
    /// How long a connection may stay silent on both sides once the upstream is dialled.
    pub silence: Duration,
    /// Whether a silent client may be waiting for a server that speaks first. Not for a
    /// destination declared HTTP: its silent clients are waited for (within `silence`) without
    /// keeping an upstream connection.
    pub server_may_speak_first: bool,
    /// When set, a client still silent after this grace gets its upstream dialled at once, in
    /// parallel with the rest of detection, and a failed dial ends the connection with
    /// [`DetectError::Dial`] (the sidecar outbound resets the client: a refused connection stays
    /// refused). `None`: a silent client is dialled for only at `timeout`.
    pub early_dial: Option<Duration>,
}

/// The grace a silent client gets before its upstream is dialled (sidecar outbound): longer than
/// a client takes to write its request after the handshake, short enough that a refused
/// connection is reset well within 100 ms.
pub const EARLY_DIAL_GRACE: Duration = Duration::from_millis(25);

/// Why detection ended a connection.
#[derive(Debug)]
pub enum DetectError {
    /// Reading the client failed.
    Client(io::Error),
    /// The upstream dialled for a silent client could not be reached.
    Dial(crate::errors::BoxError),
}

impl std::fmt::Display for DetectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DetectError::Client(e) => write!(f, "reading the client: {e}"),
            DetectError::Dial(e) => write!(f, "dialling the upstream: {e}"),
        }
    }
}

impl std::error::Error for DetectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DetectError::Client(e) => Some(e),
            DetectError::Dial(e) => Some(&**e),
        }
    }
}

impl From<io::Error> for DetectError {
    fn from(e: io::Error) -> Self {
        DetectError::Client(e)
    }
}

/// Detects the protocol of `io`. A client still silent at the deadline may be waiting for a
/// server that speaks first: the upstream is dialled with `connect` and whichever side speaks
/// first decides (the client's bytes are detected as usual; the upstream's mean opaque TCP);
/// when neither speaks within `bounds.silence`, or the client leaves (also before detection
/// ends, without a byte), `Ok(None)`: close. With [`Bounds::early_dial`], see
/// [`detect_dialling_early`].
pub async fn detect_or_wait<I, U, F, Fut>(
    io: &mut I,
    bounds: Bounds,
    connect: F,
) -> Result<Option<Detected<U>>, DetectError>
where
    I: AsyncRead + Unpin,
    U: Readable,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<U, crate::errors::BoxError>>,
{
    if let Some(grace) = bounds.early_dial.filter(|g| *g < bounds.timeout) {
        return detect_dialling_early(io, bounds, grace, connect).await;
    }
    let (outcome, prefix) = detect(io, bounds.timeout, bounds.max_bytes).await?;
    if prefix.is_empty() && outcome == Outcome::Detected(Protocol::Opaque) {
        // The client closed its side without a byte: nothing to forward, and dialling for it
        // would let a loop through an alias multiply connections.
        return Ok(None);
    }
    if outcome != Outcome::Timeout || !prefix.is_empty() {
        return Ok(Some(Detected {
            outcome,
            prefix,
            upstream: None,
        }));
    }
    if !bounds.server_may_speak_first {
        return wait_without_upstream(io, bounds, bounds.silence).await;
    }
    let upstream = connect().await.map_err(DetectError::Dial)?;
    first_words(io, upstream, bounds, bounds.silence).await
}

/// Detection for a client that may be talking to an address where nothing listens: a client
/// that speaks within `grace` is detected as usual (nothing new: every HTTP client); one still
/// silent then gets its upstream dialled while the rest of detection goes on, so that a refused
/// (or otherwise failed) dial ends the connection at once ([`DetectError::Dial`]) instead of
/// after the detection timeout. Once dialled:
///
/// - the client speaks HTTP: the connection dialled for it is dropped (the HTTP stack has its
///   own pools); it speaks anything else: it is the connection's upstream;
/// - the client is still silent: as [`detect_or_wait`] after its timeout (whichever side speaks
///   first decides), except that a destination declared HTTP keeps no upstream connection for a
///   silent client (the dial only checked that someone listens): at most one dial per
///   connection either way.
///
/// A silent client is held at most `timeout + silence`, as without the early dial.
async fn detect_dialling_early<I, U, F, Fut>(
    io: &mut I,
    bounds: Bounds,
    grace: Duration,
    connect: F,
) -> Result<Option<Detected<U>>, DetectError>
where
    I: AsyncRead + Unpin,
    U: Readable,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<U, crate::errors::BoxError>>,
{
    let start = tokio::time::Instant::now();
    let remaining = |from: Duration| from.saturating_sub(start.elapsed());
    let mut buf = BytesMut::with_capacity(1024.min(bounds.max_bytes));
    match tokio::time::timeout(grace, io.read_buf(&mut buf)).await {
        // Closed without a byte: nothing to forward, nobody to dial for.
        Ok(Ok(0)) => return Ok(None),
        Ok(Ok(_)) => {
            // Spoke at once: detection as usual, no early dial.
            let timeout = remaining(bounds.timeout);
            let (outcome, prefix) = detect_after(io, buf, timeout, bounds.max_bytes).await?;
            return Ok(Some(Detected {
                outcome,
                prefix,
                upstream: None,
            }));
        }
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => {}
    }
    // Silent through the grace: dial now, and listen to the client meanwhile.
    let dial = connect();
    tokio::pin!(dial);
    let held = bounds.timeout + bounds.silence;
    enum First<U> {
        Client(usize),
        Dialled(U),
    }
    let first = tokio::select! {
        read = io.read_buf(&mut buf) => First::Client(read?),
        dialled = &mut dial => First::Dialled(dialled.map_err(DetectError::Dial)?),
        () = tokio::time::sleep(remaining(held)) => return Ok(None),
    };
    match first {
        First::Client(0) => Ok(None),
        First::Client(_) => {
            // The client spoke while the dial was in flight.
            let timeout = bounds.timeout;
            let (outcome, prefix) = detect_after(io, buf, timeout, bounds.max_bytes).await?;
            let upstream = match outcome.protocol() {
                // Not needed for HTTP: dropping the future closes it (or cancels the dial).
                Protocol::Http1 | Protocol::Http2 => None,
                Protocol::Tls | Protocol::Opaque => Some(dial.await.map_err(DetectError::Dial)?),
            };
            Ok(Some(Detected {
                outcome,
                prefix,
                upstream,
            }))
        }
        First::Dialled(upstream) => {
            let left = remaining(held);
            if bounds.server_may_speak_first {
                first_words(io, upstream, bounds, left).await
            } else {
                // Someone listens; no server there speaks first: keep no connection for a
                // silent client, and dial no more for it.
                drop(upstream);
                wait_without_upstream(io, bounds, left).await
            }
        }
    }
}

/// Waits (within `within`) for a silent client's first bytes without an upstream connection,
/// then detects them; `Ok(None)` when none come.
async fn wait_without_upstream<I, U>(
    io: &mut I,
    bounds: Bounds,
    within: Duration,
) -> Result<Option<Detected<U>>, DetectError>
where
    I: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(1024);
    match tokio::time::timeout(within, io.read_buf(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => {
            let (outcome, prefix) = detect_after(io, buf, bounds.timeout, bounds.max_bytes).await?;
            Ok(Some(Detected {
                outcome,
                prefix,
                upstream: None,
            }))
        }
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(_)) | Err(_) => Ok(None),
    }
}

/// With `upstream` connected for a silent client, whichever side speaks first (within
/// `within`) decides.
async fn first_words<I, U>(
    io: &mut I,
    mut upstream: U,
    bounds: Bounds,
    within: Duration,
) -> Result<Option<Detected<U>>, DetectError>
where
    I: AsyncRead + Unpin,
    U: Readable,
{
    match wait_for_first_words(io, &mut upstream, within).await? {
        FirstWords::Client(buf) => {
            let (outcome, prefix) = detect_after(io, buf, bounds.timeout, bounds.max_bytes).await?;
            Ok(Some(Detected {
                outcome,
                prefix,
                upstream: Some(upstream),
            }))
        }
        FirstWords::Upstream => Ok(Some(Detected {
            outcome: Outcome::Timeout,
            prefix: Bytes::new(),
            upstream: Some(upstream),
        })),
        FirstWords::ClientClosed | FirstWords::Silence => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    const MAX: usize = 8192;

    #[test]
    fn classifies_captured_openings() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", MAX),
            Some(Protocol::Http1)
        );
        assert_eq!(
            classify(b"POST /a?b=c HTTP/1.0\r\n", MAX),
            Some(Protocol::Http1)
        );
        assert_eq!(
            classify(b"M-SEARCH * HTTP/1.1\r\n", MAX),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(H2_PREFACE, MAX), Some(Protocol::Http2));
        // A TLS 1.2 ClientHello record header as sent by curl/rustls.
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01], MAX),
            Some(Protocol::Tls)
        );
        // Redis RESP, MySQL-ish binary, SSH banner, garbage.
        assert_eq!(
            classify(b"*1\r\n$4\r\nPING\r\n", MAX),
            Some(Protocol::Opaque)
        );
        assert_eq!(classify(&[0x00, 0x01, 0xff], MAX), Some(Protocol::Opaque));
        assert_eq!(
            classify(b"SSH-2.0-OpenSSH\r\n", MAX),
            Some(Protocol::Opaque)
        );
        // A well-known method with another version is malformed HTTP: the server answers 400.
        assert_eq!(classify(b"GET / SPDY/3\r\n", MAX), Some(Protocol::Http1));
        assert_eq!(classify(b"FOO / SPDY/3\r\n", MAX), Some(Protocol::Opaque));
        // Valid or nearly valid HTTP goes to the HTTP server, which answers it there.
        assert_eq!(
            classify(b"\r\nGET / HTTP/1.1\r\n", MAX),
            Some(Protocol::Http1),
            "a leading empty line (RFC 9112 2.2)"
        );
        assert_eq!(classify(b"get / HTTP/1.1\r\n", MAX), Some(Protocol::Http1));
        assert_eq!(
            classify(b"PURGE /x HTTP/1.1\r\n", MAX),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"GET / HTTP/1.2\r\n", MAX), Some(Protocol::Http1));
        assert_eq!(classify(b"\r\n\r\n", MAX), None);
        // Malformed request lines of a well-known method are HTTP (the server answers 400).
        assert_eq!(
            classify(b"GET\t/a\tHTTP/1.1\r\n", MAX),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"GET /nine\r\n", MAX), Some(Protocol::Http1));
        assert_eq!(classify(b"POST\r\n", MAX), Some(Protocol::Http1));
        // Other protocols' lines stay opaque (memcached's and Redis's inline commands).
        assert_eq!(classify(b"get key\r\n", MAX), Some(Protocol::Opaque));
        assert_eq!(classify(b"SET a b\r\n", MAX), Some(Protocol::Opaque));
        assert_eq!(classify(&[0x16, 0x09, 0x09], MAX), Some(Protocol::Opaque));
    }

    #[test]
    fn asks_for_more_when_undecided() {
        assert_eq!(classify(b"", MAX), None);
        assert_eq!(classify(b"GE", MAX), None);
        assert_eq!(classify(b"GET /long/path", MAX), None);
        assert_eq!(classify(b"PRI * HTTP/2", MAX), None);
        assert_eq!(classify(&[0x16], MAX), None);
        // Past the byte bound a known method is HTTP/1, and so is an unknown one followed by a
        // request target; anything else is opaque.
        assert_eq!(classify(b"GET /aaaaaaaa", 10), Some(Protocol::Http1));
        assert_eq!(classify(b"FOO /aaaaaaaa", 10), Some(Protocol::Http1));
        assert_eq!(classify(b"FOO http://a/", 10), Some(Protocol::Http1));
        assert_eq!(classify(b"FOO aaaaaaaaa", 10), Some(Protocol::Opaque));
        // A token longer than any method is not HTTP.
        assert_eq!(classify(&[b'A'; 40], MAX), Some(Protocol::Opaque));
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_decide_within_the_bound() {
        // xorshift64: a fixed, reproducible stream of inputs, biased towards protocol openings.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seeds: [&[u8]; 5] = [
            b"GET ",
            b"PRI * HTTP/2",
            &[0x16, 0x03],
            b"POST /a HTTP/1.",
            b"",
        ];
        for i in 0..20_000 {
            let mut buf = seeds[i % seeds.len()].to_vec();
            let extra = (next() % 64) as usize;
            buf.extend((0..extra).map(|_| {
                let r = next();
                if r % 4 == 0 {
                    b" \r\nHTTP/1.1"[(r >> 8) as usize % 11]
                } else {
                    r as u8
                }
            }));
            let bound = 1 + (next() % 80) as usize;
            let verdict = classify(&buf, bound);
            if buf.len() >= bound.max(H2_PREFACE.len()).max(MAX_METHOD + 1) && buf.contains(&b'\n')
            {
                assert!(verdict.is_some(), "undecided on {buf:?} with bound {bound}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn silent_client_times_out_with_nothing_read() {
        let (_client, mut server) = tokio::io::duplex(64);
        let (outcome, bytes) = detect(&mut server, Duration::from_secs(1), MAX)
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Timeout);
        assert!(bytes.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_http_client_is_http_at_the_deadline() {
        for (sent, expect) in [
            (&b"G"[..], Outcome::Detected(Protocol::Http1)),
            (b"GET /slow", Outcome::Detected(Protocol::Http1)),
            (b"PRI * HT", Outcome::Detected(Protocol::Http2)),
            (b"P", Outcome::Detected(Protocol::Http1)),
            (b"\r\n", Outcome::Detected(Protocol::Http1)),
            (b"\x00\x01", Outcome::Detected(Protocol::Opaque)),
        ] {
            let (mut client, mut server) = tokio::io::duplex(64);
            client.write_all(sent).await.unwrap();
            let (outcome, bytes) = detect(&mut server, Duration::from_secs(1), MAX)
                .await
                .unwrap();
            assert_eq!(outcome, expect, "{sent:?}");
            assert_eq!(&bytes[..], sent);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn split_request_line_is_detected_and_replayed() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            client.write_all(b"GET /x HT").await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            client.write_all(b"TP/1.1\r\n").await.unwrap();
            client
        });
        let (outcome, bytes) = detect(&mut server, Duration::from_secs(1), MAX)
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Detected(Protocol::Http1));
        assert_eq!(&bytes[..], b"GET /x HTTP/1.1\r\n");
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn half_closed_client_is_opaque() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET /par").await.unwrap();
        client.shutdown().await.unwrap();
        let (outcome, bytes) = detect(&mut server, Duration::from_secs(1), MAX)
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Detected(Protocol::Opaque));
        assert_eq!(&bytes[..], b"GET /par");
    }

    #[tokio::test]
    async fn many_empty_lines_are_decided_at_the_byte_bound() {
        // Found by the `detect` fuzz target: empty lines before a method prefix keep `classify`
        // undecided; the detection loop still decides at its byte bound.
        let input = b"\n\n\r\n\r\n\r\n\n\r\n\r\n\r\n\n\r\n\r\n\r\n\r\n\r\n\nA";
        assert_eq!(classify(input, 16), None);
        let (mut client, mut server) = tokio::io::duplex(1 << 10);
        client.write_all(input).await.unwrap();
        let (outcome, bytes) = detect(&mut server, Duration::from_secs(1), 16)
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Detected(Protocol::Opaque));
        assert!(bytes.len() >= 16);
    }

    /// An upstream that speaks when its watch says so.
    #[derive(Debug)]
    struct Peer(tokio::sync::watch::Receiver<bool>);

    impl Readable for Peer {
        async fn readable(&mut self) -> io::Result<()> {
            let _ = self.0.wait_for(|spoke| *spoke).await;
            Ok(())
        }
    }

    /// How an early-dial detection went: its result, the dials made, the (paused) time taken.
    struct Run {
        ended: Result<Option<Detected<Peer>>, DetectError>,
        dials: usize,
        took: Duration,
    }

    /// [`detect_or_wait`] on `server` with an early dial that takes `dial_takes` and is refused
    /// when `refused`; the upstream speaks once `speaks` says so.
    async fn early_detect(
        server: &mut tokio::io::DuplexStream,
        server_may_speak_first: bool,
        dial_takes: Duration,
        refused: bool,
        speaks: tokio::sync::watch::Receiver<bool>,
    ) -> Run {
        let bounds = Bounds {
            timeout: Duration::from_secs(1),
            max_bytes: MAX,
            silence: Duration::from_secs(10),
            server_may_speak_first,
            early_dial: Some(EARLY_DIAL_GRACE),
        };
        let mut dials = 0;
        let start = tokio::time::Instant::now();
        let ended = detect_or_wait(server, bounds, || {
            dials += 1;
            async move {
                tokio::time::sleep(dial_takes).await;
                if refused {
                    Err("connection refused".into())
                } else {
                    Ok(Peer(speaks))
                }
            }
        })
        .await;
        Run {
            ended,
            dials,
            took: start.elapsed(),
        }
    }

    /// A client that writes `bytes` after `after`.
    fn client_writes(
        mut client: tokio::io::DuplexStream,
        after: Duration,
        bytes: &'static [u8],
    ) -> tokio::task::JoinHandle<tokio::io::DuplexStream> {
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            client.write_all(bytes).await.unwrap();
            client
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_speaks_at_once_causes_no_early_dial() {
        let (_speak, speaks) = tokio::sync::watch::channel(false);
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let run = early_detect(&mut server, true, Duration::ZERO, true, speaks).await;
        let detected = run.ended.unwrap().unwrap();
        assert_eq!(detected.outcome, Outcome::Detected(Protocol::Http1));
        assert!(detected.upstream.is_none());
        assert_eq!(run.dials, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_of_a_refused_upstream_fails_after_the_grace() {
        for server_may_speak_first in [true, false] {
            let (_speak, speaks) = tokio::sync::watch::channel(false);
            let (_client, mut server) = tokio::io::duplex(64);
            let dial_takes = Duration::from_millis(1);
            let run = early_detect(
                &mut server,
                server_may_speak_first,
                dial_takes,
                true,
                speaks,
            );
            let run = run.await;
            assert!(
                matches!(run.ended, Err(DetectError::Dial(_))),
                "{:?}",
                run.ended
            );
            assert_eq!(run.took, EARLY_DIAL_GRACE + dial_takes);
            assert_eq!(run.dials, 1);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_speaks_first_is_heard_after_the_grace_not_the_timeout() {
        let (speak, speaks) = tokio::sync::watch::channel(false);
        let (_client, mut server) = tokio::io::duplex(64);
        let banner = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            speak.send_replace(true);
            speak
        });
        let run = early_detect(&mut server, true, Duration::ZERO, false, speaks).await;
        let detected = run.ended.unwrap().unwrap();
        assert_eq!(detected.outcome, Outcome::Timeout);
        assert!(detected.upstream.is_some());
        assert_eq!(run.took, Duration::from_millis(50));
        drop(banner.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_declared_http_destination_keeps_no_connection_for_a_silent_client_and_dials_once() {
        let (_speak, speaks) = tokio::sync::watch::channel(false);
        let (client, mut server) = tokio::io::duplex(64);
        let late = client_writes(client, Duration::from_secs(2), b"GET / HTTP/1.1\r\n");
        let run = early_detect(&mut server, false, Duration::ZERO, false, speaks).await;
        let detected = run.ended.unwrap().unwrap();
        assert_eq!(detected.outcome, Outcome::Detected(Protocol::Http1));
        assert!(detected.upstream.is_none());
        assert_eq!(run.dials, 1);
        drop(late.await.unwrap());
        // Silent for good: closed at timeout + silence, still one dial.
        let (_speak, speaks) = tokio::sync::watch::channel(false);
        let (_client, mut server) = tokio::io::duplex(64);
        let run = early_detect(&mut server, false, Duration::ZERO, false, speaks).await;
        assert!(matches!(run.ended, Ok(None)));
        assert_eq!(run.took, Duration::from_secs(11));
        assert_eq!(run.dials, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_speaks_during_the_dial_keeps_it_only_for_opaque_bytes() {
        for (sent, opaque) in [
            (&b"GET / HTTP/1.1\r\n"[..], false),
            (b"\x00\x01binary", true),
        ] {
            let (_speak, speaks) = tokio::sync::watch::channel(false);
            let (client, mut server) = tokio::io::duplex(64);
            let writer = client_writes(client, EARLY_DIAL_GRACE + Duration::from_millis(5), sent);
            let run = early_detect(&mut server, true, Duration::from_millis(50), false, speaks);
            let detected = run.await.ended.unwrap().unwrap();
            assert_eq!(detected.upstream.is_some(), opaque, "{sent:?}");
            assert_eq!(&detected.prefix[..], sent);
            drop(writer.await.unwrap());
        }
    }

    #[tokio::test]
    async fn reads_no_more_than_the_bound() {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        client.write_all(&[b'G'; 100]).await.unwrap();
        let (outcome, bytes) = detect(&mut server, Duration::from_secs(1), 16)
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Detected(Protocol::Opaque));
        assert!(bytes.len() <= 25, "read {} bytes", bytes.len());
    }
}
