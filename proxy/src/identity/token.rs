//! The bootstrap token the proxy certifies with, and the identity it asks for with it.
//!
//! Two kinds of token, told apart by their shape:
//!
//! - an Outrider bootstrap token (`v1.PAYLOAD.SIGNATURE`, minted by `outrider control token` and
//!   mounted from the Secret `outrider-token-<serviceaccount>`): its `sub` is the whole SPIFFE
//!   identity;
//! - a projected ServiceAccount token (a JWT, `HEADER.PAYLOAD.SIGNATURE`, audience `outrider`,
//!   written by the kubelet and rotated in place): its `kubernetes.io` claims name the namespace
//!   and the service account, and the proxy's trust domain (`--trust-domain`) completes the
//!   identity `spiffe://TD/ns/NS/sa/SA`.
//!
//! Neither is verified here: the control plane checks the token (its own signature, or the API
//! server's TokenReview) and certifies only what the check names; the proxy only needs to know
//! what to put in its CSR. The file is read again before every certification, so a rotated token
//! is used at the next renewal. A token that cannot be read is an error naming the file and what
//! is wrong with its shape; no error or log line holds the token itself.

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine as _;
use outrider_control::api::Identity;

use crate::errors::BoxError;

/// The trust domain of identities read from projected tokens when none is configured (the
/// control plane's default too).
pub const DEFAULT_TRUST_DOMAIN: &str = "outrider.local";

/// Where the bootstrap token comes from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// A file, read again before every request (a projected token is rotated in place by the
    /// kubelet); a projected token's identity is in `trust_domain`.
    File {
        /// The token file.
        path: PathBuf,
        /// The mesh's trust domain.
        trust_domain: Arc<str>,
    },
    /// A fixed token (the demo, tests); a projected one is read in [`DEFAULT_TRUST_DOMAIN`].
    Fixed(Arc<str>),
}

impl TokenSource {
    /// The token file `path`, for identities in `trust_domain`.
    pub fn file(path: impl Into<PathBuf>, trust_domain: &str) -> Self {
        TokenSource::File {
            path: path.into(),
            trust_domain: trust_domain.into(),
        }
    }

    /// The token now, and the identity it claims.
    pub async fn read(&self) -> Result<(String, Identity), BoxError> {
        match self {
            TokenSource::Fixed(t) => {
                let identity = claimed_identity(t, DEFAULT_TRUST_DOMAIN)?;
                Ok((t.to_string(), identity))
            }
            TokenSource::File { path, trust_domain } => {
                let text = tokio::fs::read_to_string(path).await.map_err(|e| {
                    format!("cannot read the identity token {}: {e}", path.display())
                })?;
                let token = text.trim().to_string();
                let identity = claimed_identity(&token, trust_domain)
                    .map_err(|e| format!("the identity token {}: {e}", path.display()))?;
                Ok((token, identity))
            }
        }
    }
}

/// The identity `token` claims, read without checking its signature: an Outrider token's
/// `sub`, or a projected ServiceAccount token's namespace and account in `trust_domain`.
pub fn claimed_identity(token: &str, trust_domain: &str) -> Result<Identity, BoxError> {
    let mut parts = token.split('.');
    let (Some(head), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(
            "the identity token is malformed (expected v1.PAYLOAD.SIGNATURE or a JWT, \
             HEADER.PAYLOAD.SIGNATURE)"
                .into(),
        );
    };
    if head == "v1" {
        return outrider_identity(payload);
    }
    service_account_identity(payload, trust_domain)
}

/// A base64url segment (unpadded, as JWTs write them; padding tolerated).
fn decode(segment: &str, what: &str) -> Result<serde_json::Value, BoxError> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segment.trim_end_matches('='))
        .map_err(|_| format!("the identity token's {what} is not base64url"))?;
    serde_json::from_slice(&bytes)
        .map_err(|_| format!("the identity token's {what} is not a JSON object").into())
}

fn outrider_identity(payload: &str) -> Result<Identity, BoxError> {
    let claims = decode(payload, "payload")?;
    let sub = claims
        .get("sub")
        .and_then(serde_json::Value::as_str)
        .ok_or("the identity token's payload has no \"sub\" identity")?;
    Ok(sub.parse()?)
}

/// The identity of a projected ServiceAccount token's payload: the claims the API server
/// writes, `{"kubernetes.io": {"namespace": NS, "serviceaccount": {"name": SA}}}`. Its
/// audience, when it says one, must include `outrider` (the control plane reviews it for that
/// audience only: better said here than as a refusal).
fn service_account_identity(payload: &str, trust_domain: &str) -> Result<Identity, BoxError> {
    let claims = decode(payload, "payload")?;
    if !claims.is_object() {
        return Err("the identity token's payload is not a JSON object".into());
    }
    let audience_ok = match claims.get("aud") {
        None => true,
        Some(serde_json::Value::String(a)) => a == AUDIENCE,
        Some(serde_json::Value::Array(all)) => all.iter().any(|a| a.as_str() == Some(AUDIENCE)),
        Some(_) => false,
    };
    if !audience_ok {
        return Err(format!(
            "the identity token is not for the audience `{AUDIENCE}` (the projected volume's \
             serviceAccountToken must ask for it)"
        )
        .into());
    }
    let k8s = claims.get("kubernetes.io");
    let namespace = k8s
        .and_then(|k| k.get("namespace"))
        .and_then(serde_json::Value::as_str);
    let account = k8s
        .and_then(|k| k.pointer("/serviceaccount/name"))
        .and_then(serde_json::Value::as_str);
    let (Some(namespace), Some(account)) = (namespace, account) else {
        return Err(
            "the identity token is neither an Outrider token nor a projected ServiceAccount \
             token (its payload has no \"kubernetes.io\" namespace and serviceaccount name)"
                .into(),
        );
    };
    Identity::new(trust_domain, namespace, account).map_err(|e| {
        format!("the identity token's namespace and service account make no identity: {e}").into()
    })
}

/// The audience a projected token must be for (the control plane's TokenReview asks for it).
pub const AUDIENCE: &str = "outrider";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::testing::token_for;

    const WEB: &str = "spiffe://outrider.local/ns/demo/sa/web";

    /// A JWT with `payload` (its header and signature are never read).
    fn jwt(payload: &serde_json::Value) -> String {
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        format!(
            "{}.{}.{}",
            b64(br#"{"alg":"RS256","kid":"k1"}"#),
            b64(payload.to_string().as_bytes()),
            b64(b"not checked here")
        )
    }

    /// The claims the API server writes into a projected token.
    fn projected(ns: &str, sa: &str) -> serde_json::Value {
        serde_json::json!({
            "aud": ["outrider"], "exp": 1_900_000_000, "iat": 1_800_000_000,
            "iss": "https://kubernetes.default.svc.cluster.local",
            "kubernetes.io": {"namespace": ns,
                              "pod": {"name": "web-7c9d8-x2x4z", "uid": "1b2c"},
                              "serviceaccount": {"name": sa, "uid": "3d4e"}},
            "nbf": 1_800_000_000, "sub": format!("system:serviceaccount:{ns}:{sa}")
        })
    }

    #[test]
    fn a_projected_token_names_its_namespace_and_account_in_the_trust_domain() {
        let token = jwt(&projected("demo", "web"));
        assert_eq!(
            claimed_identity(&token, "outrider.local").unwrap().as_str(),
            WEB
        );
        assert_eq!(
            claimed_identity(&token, "prod.example").unwrap().as_str(),
            "spiffe://prod.example/ns/demo/sa/web"
        );
        // A single audience string, and no audience at all, are taken.
        let mut one = projected("demo", "web");
        one["aud"] = "outrider".into();
        assert!(claimed_identity(&jwt(&one), "outrider.local").is_ok());
        let mut none = projected("demo", "web");
        none.as_object_mut().unwrap().remove("aud");
        assert!(claimed_identity(&jwt(&none), "outrider.local").is_ok());
        // Outrider's own tokens still name their whole identity.
        assert_eq!(
            claimed_identity(&token_for(WEB), "other.example")
                .unwrap()
                .as_str(),
            WEB
        );
    }

    #[test]
    fn bad_tokens_are_clear_errors_that_never_hold_the_token() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let mut api_audience = projected("demo", "web");
        api_audience["aud"] = serde_json::json!(["https://kubernetes.default.svc"]);
        let mut numeric_ns = projected("demo", "web");
        numeric_ns["kubernetes.io"]["namespace"] = 7.into();
        let cases = [
            ("".to_string(), "malformed"),
            ("eyJhbGciOiJSUzI1NiJ9".to_string(), "malformed"),
            ("a.b.c.d".to_string(), "malformed"),
            ("eyJhbGciOiJSUzI1NiJ9.!!!.sig".to_string(), "not base64url"),
            (format!("h.{}.s", b64("not json")), "not a JSON object"),
            (format!("h.{}.s", b64("[1, 2]")), "not a JSON object"),
            (format!("h.{}.s", b64("{}")), "no \"kubernetes.io\""),
            (
                jwt(&serde_json::json!({"kubernetes.io": {"namespace": "demo"}})),
                "no \"kubernetes.io\"",
            ),
            (
                jwt(&serde_json::json!({"kubernetes.io": {"serviceaccount": {"name": "web"}}})),
                "no \"kubernetes.io\"",
            ),
            (jwt(&numeric_ns), "no \"kubernetes.io\""),
            (jwt(&api_audience), "not for the audience `outrider`"),
            (jwt(&projected("Demo_NS", "web")), "make no identity"),
            (jwt(&projected("demo", "")), "make no identity"),
            ("v1.e30.x".to_string(), "no \"sub\""),
        ];
        for (token, needle) in cases {
            let e = claimed_identity(&token, "outrider.local")
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{token:?}: {e}");
            if token.len() > 8 {
                assert!(!e.contains(&token), "the error holds the token: {e}");
            }
        }
    }

    #[tokio::test]
    async fn a_token_file_is_read_again_each_time() {
        let dir = std::env::temp_dir().join(format!(
            "outrider-token-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        let source = TokenSource::file(&path, "outrider.local");
        let e = source.read().await.unwrap_err().to_string();
        assert!(e.contains("cannot read the identity token"), "{e}");
        let first = jwt(&projected("demo", "web"));
        std::fs::write(&path, format!("{first}\n")).unwrap();
        assert_eq!(source.read().await.unwrap(), (first, WEB.parse().unwrap()));
        // The kubelet rotates it (same account, new token): the new one is used.
        let mut later = projected("demo", "web");
        later["iat"] = 1_800_003_600.into();
        let rotated = jwt(&later);
        std::fs::write(&path, &rotated).unwrap();
        assert_eq!(source.read().await.unwrap().0, rotated);
        std::fs::write(&path, "garbage").unwrap();
        let e = source.read().await.unwrap_err().to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("malformed"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
