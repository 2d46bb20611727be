//! Protocol detection: the first bytes a client sends say what it speaks. Detection reads at most
//! [`crate::Config::detect_max_bytes`] bytes and waits at most `detect_timeout`; the bytes read are
//! replayed to whatever handles the connection ([`crate::io::PrefixedIo`]). A client that sends
//! nothing in time (a server-speaks-first protocol on a port not listed as opaque) is handled as
//! opaque TCP, so such protocols are delayed by at most the timeout.

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
    /// A TLS ClientHello record (forwarded as opaque bytes until mTLS lands).
    Tls,
    /// Anything else.
    Opaque,
}

/// How detection ended; the label of the `outrider_detect_total` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The bytes identified the protocol.
    Detected(Protocol),
    /// The client sent nothing conclusive before the timeout: handled as opaque.
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

fn classify_http1(buf: &[u8], max_bytes: usize) -> Option<Protocol> {
    // method = token, then SP.
    let Some(sp) = buf.iter().take(MAX_METHOD + 1).position(|b| *b == b' ') else {
        let undecided = buf.len() <= MAX_METHOD && buf.iter().all(|b| is_method_char(*b));
        return if undecided {
            None
        } else {
            Some(Protocol::Opaque)
        };
    };
    let method = &buf[..sp];
    if method.is_empty() || !method.iter().all(|b| is_method_char(*b)) {
        return Some(Protocol::Opaque);
    }
    let Some(eol) = buf.iter().position(|b| *b == b'\n') else {
        // A well-known method and a request line longer than we read: HTTP/1 it is, hyper judges
        // the rest. An unknown method needs its whole request line.
        if buf.len() >= max_bytes {
            return Some(if METHODS.contains(&method) {
                Protocol::Http1
            } else {
                Protocol::Opaque
            });
        }
        return None;
    };
    let line = buf[..eol].strip_suffix(b"\r").unwrap_or(&buf[..eol]);
    if line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0") {
        Some(Protocol::Http1)
    } else {
        Some(Protocol::Opaque)
    }
}

fn is_method_char(b: u8) -> bool {
    b.is_ascii_uppercase() || b == b'-' || b == b'_'
}

/// Reads from `io` until the protocol is known, `max_bytes` are read, the peer closes its side, or
/// `timeout` passes. Returns the outcome and every byte read, to be replayed.
pub async fn detect<I: AsyncRead + Unpin>(
    io: &mut I,
    timeout: Duration,
    max_bytes: usize,
) -> io::Result<(Outcome, Bytes)> {
    let mut buf = BytesMut::with_capacity(1024.min(max_bytes));
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
                () = &mut deadline => return Ok((Outcome::Timeout, buf.freeze())),
            }
        };
        if read == 0 {
            // The client closed its side before we could tell: whatever it sent is opaque.
            return Ok((Outcome::Detected(Protocol::Opaque), buf.freeze()));
        }
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
        assert_eq!(classify(b"GET / SPDY/3\r\n", MAX), Some(Protocol::Opaque));
        assert_eq!(classify(&[0x16, 0x09, 0x09], MAX), Some(Protocol::Opaque));
    }

    #[test]
    fn asks_for_more_when_undecided() {
        assert_eq!(classify(b"", MAX), None);
        assert_eq!(classify(b"GE", MAX), None);
        assert_eq!(classify(b"GET /long/path", MAX), None);
        assert_eq!(classify(b"PRI * HTTP/2", MAX), None);
        assert_eq!(classify(&[0x16], MAX), None);
        // Past the byte bound a known method is HTTP/1, an unknown one opaque.
        assert_eq!(classify(b"GET /aaaaaaaa", 10), Some(Protocol::Http1));
        assert_eq!(classify(b"FOO /aaaaaaaa", 10), Some(Protocol::Opaque));
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
