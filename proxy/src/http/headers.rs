//! Hop-by-hop header handling (RFC 9110 section 7.6.1): fields that describe one connection are
//! removed before a message is forwarded on another. `Connection`-listed fields go too, except the
//! fields the proxy itself depends on (`Host`, `Content-Length`, `Transfer-Encoding` and the
//! proxy's own [`HOP`]), which a client cannot make it drop. Upgrade requests keep
//! `Connection: upgrade` and `Upgrade`, which the next hop needs to switch protocols.
//!
//! Also the framing checks a request must pass before it is forwarded ([`check_request`]): one
//! `Host` (RFC 9112 3.2), and no transfer coding but `chunked` (RFC 9112 6.1), and the hop marker
//! that detects a request coming back to the proxy that already forwarded it.

use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, HOST, TE, TRANSFER_ENCODING,
    UPGRADE,
};

use crate::errors::{BadRequest, BoxError, Loop, UnsupportedTransferCoding};

/// The hop marker (in the spirit of `Via`, RFC 9110 7.6.3): every request a proxy forwards
/// carries that proxy's own token ([`hop_token`]), so a request that comes back to it is refused
/// (508).
pub(crate) const HOP: HeaderName = HeaderName::from_static("outrider-hop");

/// A new random hop token, one per proxy.
pub(crate) fn hop_token() -> HeaderValue {
    HeaderValue::from(fastrand::u64(1..u64::MAX))
}

/// Refuses a request that cannot be forwarded safely: two `Host` fields (which one a backend
/// believes differs), a transfer coding other than `chunked` (its coding would be lost), or, with
/// a `token` (the outbound direction), a request that already passed this proxy's outbound (a
/// forwarding loop); then adds the hop marker. Without a token (inbound, towards the app) every
/// hop marker is removed: the app is a new start, and a request that went through an app and
/// comes back is an ordinary call chain (A → B → A), not a loop.
pub(crate) fn check_request(
    headers: &mut HeaderMap,
    token: Option<&HeaderValue>,
) -> Result<(), BoxError> {
    if headers.get_all(HOST).iter().nth(1).is_some() {
        return Err(BadRequest("more than one Host field".into()).into());
    }
    for v in headers.get_all(TRANSFER_ENCODING) {
        let only_chunked = v
            .to_str()
            .map(|s| {
                s.split(',')
                    .all(|c| c.trim().eq_ignore_ascii_case("chunked"))
            })
            .unwrap_or(false);
        if !only_chunked {
            return Err(UnsupportedTransferCoding.into());
        }
    }
    let Some(token) = token else {
        headers.remove(&HOP);
        return Ok(());
    };
    if headers.get_all(&HOP).iter().any(|v| v == token) {
        return Err(Loop.into());
    }
    headers.append(HOP, token.clone());
    Ok(())
}

/// Fields a `Connection` header may not remove.
fn is_protected(name: &HeaderName) -> bool {
    name == HOST || name == CONTENT_LENGTH || name == TRANSFER_ENCODING || *name == HOP
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The fields [`strip_hop_by_hop`] acts on.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == CONNECTION
        || name == TRANSFER_ENCODING
        || name == UPGRADE
        || name == TE
        || *name == KEEP_ALIVE
        || *name == PROXY_CONNECTION
}

/// Whether `headers` ask to switch protocols (`Connection: upgrade` plus `Upgrade`).
pub(crate) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE) && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(CONNECTION).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// Removes hop-by-hop fields. With `keep_upgrade`, the upgrade handshake fields stay.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of these fields: one pass over the names (a comparison each) costs
    // less than the six hashed lookups below, which only run when one of them is there.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Fields named in Connection are hop-by-hop too. Most messages have no Connection header, so
    // this allocates nothing on the common path.
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| !(is_protected(n) || (keep_upgrade && *n == UPGRADE)))
            .collect();
        for name in named {
            headers.remove(name);
        }
        headers.remove(CONNECTION);
        if keep_upgrade {
            headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
    headers.remove(KEEP_ALIVE);
    headers.remove(PROXY_CONNECTION);
    // RFC 9112 6.3: Transfer-Encoding overrides Content-Length, and an intermediary that forwards
    // the message must remove the Content-Length it received (else the body is cut short).
    if headers.remove(TRANSFER_ENCODING).is_some() {
        headers.remove(CONTENT_LENGTH);
    }
    if !keep_upgrade {
        headers.remove(UPGRADE);
    }
    // `TE: trailers` is the one TE value HTTP/2 (and gRPC) relies on end to end.
    let te_trailers_only = headers
        .get(TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !te_trailers_only {
        headers.remove(TE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_listed_and_standard_fields() {
        let mut h = map(&[
            ("connection", "keep-alive, x-session"),
            ("keep-alive", "timeout=5"),
            ("x-session", "abc"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("upgrade", "h2c"),
            ("authorization", "Bearer secret"),
            ("host", "payments"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["authorization", "host"]);
    }

    #[test]
    fn connection_cannot_remove_what_the_proxy_depends_on() {
        let mut h = map(&[
            (
                "connection",
                "close, x-secret, host, content-length, outrider-hop",
            ),
            ("x-secret", "s"),
            ("host", "payments"),
            ("content-length", "3"),
            ("outrider-hop", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-length", "host", "outrider-hop"]);
    }

    #[test]
    fn each_hop_by_hop_field_alone_is_removed() {
        // Without a Connection field too: the one-pass check must see every field it guards.
        for (name, value) in [
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "gzip"),
            ("upgrade", "websocket"),
            ("transfer-encoding", "chunked"),
            ("connection", "close"),
        ] {
            let mut h = map(&[(name, value), ("x-app", "1")]);
            strip_hop_by_hop(&mut h, false);
            assert!(!h.contains_key(name), "{name} kept");
            assert!(h.contains_key("x-app"));
        }
        // Nothing hop-by-hop: nothing changes.
        let mut h = map(&[("host", "a"), ("x-app", "1"), ("content-length", "3")]);
        let before = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, before);
    }

    #[test]
    fn transfer_encoding_wins_over_content_length() {
        let mut h = map(&[("transfer-encoding", "chunked"), ("content-length", "1")]);
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn requests_that_cannot_be_forwarded_safely_are_refused() {
        use crate::errors::{reason_of, Reason};
        let token = hop_token();
        let reason = |pairs: &[(&str, &str)]| {
            check_request(&mut map(pairs), Some(&token)).map_err(|e| reason_of(&*e))
        };
        assert_eq!(
            reason(&[("host", "a"), ("host", "b")]),
            Err(Reason::BadRequest)
        );
        assert_eq!(
            reason(&[("transfer-encoding", "gzip, chunked")]),
            Err(Reason::UnsupportedTransferCoding)
        );
        assert_eq!(
            reason(&[("transfer-encoding", "Chunked"), ("host", "a")]),
            Ok(())
        );
        // The hop marker: added once, refused when the request comes back.
        let mut h = map(&[("host", "a"), ("outrider-hop", "42")]);
        check_request(&mut h, Some(&token)).unwrap();
        assert_eq!(h.get_all(&HOP).iter().count(), 2);
        assert!(
            check_request(&mut h.clone(), Some(&hop_token())).is_ok(),
            "another proxy's token"
        );
        // Towards the app (no token): every marker goes, so a call chain through apps is fine.
        let mut to_app = h.clone();
        check_request(&mut to_app, None).unwrap();
        assert!(to_app.get(&HOP).is_none());
        assert_eq!(
            check_request(&mut h, Some(&token)).map_err(|e| reason_of(&*e)),
            Err(Reason::Loop)
        );
    }

    #[test]
    fn keeps_te_trailers_and_upgrade_handshake() {
        let mut h = map(&[
            ("te", "trailers"),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("te").unwrap(), "trailers");
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
        assert!(!is_upgrade(&map(&[("upgrade", "websocket")])));
    }
}
