//! Entry points for the `fuzz/` targets (hidden from the docs; not an API): protocol detection,
//! the request-header normalisation the proxy applies before forwarding, and the mesh's parsers of
//! bytes from the network (a ClientHello's ALPN, a peer certificate's identity, a token's claim). Each checks its own
//! invariants and panics when one breaks, which is what a fuzzer looks for.

use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};

use crate::detect::{classify, Protocol};
use crate::http::headers::{check_request, hop_token, strip_hop_by_hop, HOP};

/// Classifies `buf` with the byte bound `max`: never panics, and decides (`Some`) once the
/// bound, the HTTP/2 preface length and a line end are all reached after any leading empty
/// lines (the detection loop itself stops at `max` bytes whatever `classify` says).
pub fn detect(buf: &[u8], max: usize) -> Option<&'static str> {
    let max = max.clamp(1, 64 * 1024);
    let verdict = classify(buf, max);
    let bound = max.max(crate::detect::H2_PREFACE.len()).max(25);
    let line = crate::detect::skip_empty_lines(buf);
    if line.len() >= bound && line.contains(&b'\n') {
        assert!(verdict.is_some(), "undecided on {} bytes", buf.len());
    }
    verdict.map(|p| match p {
        Protocol::Http1 => "http1",
        Protocol::Http2 => "http2",
        Protocol::Tls => "tls",
        Protocol::Opaque => "opaque",
    })
}

/// Runs a request's headers (name/value pairs as received; invalid ones are skipped, as hyper
/// would refuse them) through the forwarding checks and hop-by-hop removal, and checks what comes
/// out: `Host` kept if it was there once, no `Transfer-Encoding` and no `Connection` left, no
/// `Content-Length` next to a `Transfer-Encoding`, and exactly one hop marker added.
pub fn normalize_request_headers(pairs: &[(&[u8], &[u8])], upgrade: bool) {
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(n, v);
        }
    }
    let host = headers.get(HOST).cloned();
    let hosts = headers.get_all(HOST).iter().count();
    let had_te = headers.contains_key(TRANSFER_ENCODING);
    let hops_before = headers.get_all(&HOP).iter().count();
    let token = hop_token();
    if check_request(&mut headers, Some(&token)).is_err() {
        return;
    }
    strip_hop_by_hop(&mut headers, upgrade);
    assert!(hosts <= 1);
    assert_eq!(headers.get(HOST).cloned(), host, "Host changed");
    assert!(!headers.contains_key(TRANSFER_ENCODING));
    if had_te {
        assert!(
            !headers.contains_key(CONTENT_LENGTH),
            "a stale Content-Length"
        );
    }
    if !upgrade {
        assert!(!headers.contains_key(http::header::CONNECTION));
    }
    assert_eq!(headers.get_all(&HOP).iter().count(), hops_before + 1);
    assert!(headers.get_all(&HOP).iter().any(|v| v == token));
}

/// Feeds `data` to every parser of mesh input: the ALPN markers of a ClientHello (the inbound
/// side reads them from any client), the SPIFFE identity of a certificate (a peer's), and the
/// identity a bootstrap token claims. None may panic.
pub fn mesh_input(data: &[u8]) {
    let _ = crate::identity::tls::offered_alpn(data);
    let _ = crate::identity::tls::identity_of(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::identity::certify::claimed_identity(text, "outrider.local");
    }
}

/// Whether the inbound admits `peer` (`None`: a plaintext caller) on `port` by `view`'s policy.
pub fn authorize(
    view: &outrider_control::api::WatchResponse,
    port: u16,
    peer: Option<&outrider_control::api::Identity>,
) -> bool {
    crate::inbound::policy::decide(view, port, peer).is_ok()
}

/// Whether the inbound admits `peer` before any view, by `--default-inbound-policy`.
pub fn authorize_without_view(
    policy: outrider_control::api::DefaultPolicy,
    peer: Option<&outrider_control::api::Identity>,
) -> bool {
    crate::inbound::policy::decide_without_view(policy, peer).is_ok()
}
