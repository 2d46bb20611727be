//! The pod lookup: what the plugin needs to know about a pod (its annotations, `hostNetwork`),
//! behind [`PodLookup`], and [`ApiLookup`], which asks the API server with one HTTPS GET of
//! `/api/v1/namespaces/NS/pods/NAME`, authenticated by the token of the kubeconfig the installer
//! writes, and bounded in time as a whole (connect, TLS, request, body).
//!
//! This is a plain hyper + rustls (ring) client on purpose, for now: the `kube` client is being
//! added to the workspace separately, and this lookup moves to it once that lands; the trait
//! keeps the plugin independent of which.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use serde::Deserialize;

/// The largest pod object read (bytes).
const MAX_BODY: usize = 4 << 20;

/// What the plugin needs to know about a pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
    /// `spec.hostNetwork`.
    pub host_network: bool,
}

/// Why a lookup failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupError {
    /// The kubeconfig cannot be read or is incomplete.
    Config(String),
    /// The API server did not answer within the bound, or could not be reached.
    Unreachable(String),
    /// The API server answered with an error status or an unreadable body.
    Api(String),
}

impl fmt::Display for LookupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LookupError::Config(m) => write!(f, "kubeconfig: {m}"),
            LookupError::Unreachable(m) => write!(f, "API server unreachable: {m}"),
            LookupError::Api(m) => write!(f, "API server: {m}"),
        }
    }
}

/// Looks a pod up by namespace and name.
pub trait PodLookup {
    /// The pod's annotations and `hostNetwork`; `Ok(None)` when the pod does not exist.
    fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodInfo>, LookupError>;
}

/// The pieces of a kubeconfig the lookup uses: the current context's server, CA and token.
#[derive(Clone)]
pub struct Kubeconfig {
    /// `https://host:port`.
    pub server: String,
    /// The CA certificates (DER) that sign the API server's certificate.
    pub ca: Vec<CertificateDer<'static>>,
    /// The bearer token (never logged).
    pub token: String,
}

impl fmt::Debug for Kubeconfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kubeconfig")
            .field("server", &self.server)
            .field("ca", &self.ca.len())
            .field("token", &"<redacted>")
            .finish()
    }
}

#[derive(Deserialize)]
struct KcFile {
    #[serde(rename = "current-context")]
    current_context: Option<String>,
    #[serde(default)]
    contexts: Vec<Named<KcContext>>,
    #[serde(default)]
    clusters: Vec<Named<KcCluster>>,
    #[serde(default)]
    users: Vec<Named<KcUser>>,
}

#[derive(Deserialize)]
struct Named<T> {
    name: String,
    #[serde(alias = "context", alias = "cluster", alias = "user")]
    value: T,
}

#[derive(Deserialize)]
struct KcContext {
    cluster: String,
    user: String,
}

#[derive(Deserialize)]
struct KcCluster {
    server: String,
    #[serde(rename = "certificate-authority-data")]
    ca_data: Option<String>,
    #[serde(rename = "certificate-authority")]
    ca_file: Option<String>,
}

#[derive(Deserialize)]
struct KcUser {
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<String>,
}

impl Kubeconfig {
    /// Parses kubeconfig YAML (the current context; `certificate-authority-data` or
    /// `certificate-authority`, `token` or `tokenFile`).
    pub fn parse(text: &str) -> Result<Kubeconfig, LookupError> {
        let bad = |m: String| LookupError::Config(m);
        let file: KcFile = serde_norway::from_str(text).map_err(|e| bad(e.to_string()))?;
        let find = |what: &str, name: &str| bad(format!("no {what} named `{name}`"));
        let ctx = match &file.current_context {
            Some(name) => file
                .contexts
                .iter()
                .find(|c| &c.name == name)
                .ok_or_else(|| find("context", name))?,
            None => file
                .contexts
                .first()
                .ok_or_else(|| bad("no contexts".into()))?,
        };
        let cluster = file
            .clusters
            .iter()
            .find(|c| c.name == ctx.value.cluster)
            .ok_or_else(|| find("cluster", &ctx.value.cluster))?;
        let user = file
            .users
            .iter()
            .find(|u| u.name == ctx.value.user)
            .ok_or_else(|| find("user", &ctx.value.user))?;
        let pem = match (&cluster.value.ca_data, &cluster.value.ca_file) {
            (Some(data), _) => base64::engine::general_purpose::STANDARD
                .decode(data.trim())
                .map_err(|e| bad(format!("certificate-authority-data is not base64: {e}")))?,
            (None, Some(path)) => std::fs::read(path)
                .map_err(|e| bad(format!("certificate-authority {path}: {e}")))?,
            (None, None) => return Err(bad("the cluster has no certificate authority".into())),
        };
        let ca = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("certificate authority: {e}")))?;
        if ca.is_empty() {
            return Err(bad("the certificate authority holds no certificate".into()));
        }
        let token = match (&user.value.token, &user.value.token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| bad(format!("tokenFile {path}: {e}")))?
                .trim()
                .to_owned(),
            (None, None) => return Err(bad("the user has no token".into())),
        };
        if !cluster.value.server.starts_with("https://") {
            return Err(bad(format!(
                "server `{}` is not https://",
                cluster.value.server
            )));
        }
        Ok(Kubeconfig {
            server: cluster.value.server.trim_end_matches('/').to_owned(),
            ca,
            token,
        })
    }

    /// Reads and parses the kubeconfig at `path`.
    pub fn load(path: &str) -> Result<Kubeconfig, LookupError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| LookupError::Config(format!("{path}: {e}")))?;
        Kubeconfig::parse(&text)
    }
}

/// [`PodLookup`] by one HTTPS GET to the API server, the whole exchange bounded by `timeout`.
#[derive(Debug, Clone)]
pub struct ApiLookup {
    /// Where and how to connect.
    pub kubeconfig: Kubeconfig,
    /// The bound on the whole lookup.
    pub timeout: Duration,
}

#[derive(Deserialize)]
struct PodObject {
    #[serde(default)]
    metadata: PodMeta,
    #[serde(default)]
    spec: PodSpecPart,
}

#[derive(Deserialize, Default)]
struct PodMeta {
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodSpecPart {
    #[serde(default)]
    host_network: Option<bool>,
}

/// Reads a pod object (JSON, as the API server returns it).
pub fn parse_pod(body: &[u8]) -> Result<PodInfo, LookupError> {
    let pod: PodObject = serde_json::from_slice(body)
        .map_err(|e| LookupError::Api(format!("the pod object cannot be read: {e}")))?;
    Ok(PodInfo {
        annotations: pod.metadata.annotations.unwrap_or_default(),
        host_network: pod.spec.host_network.unwrap_or(false),
    })
}

/// Splits `https://host:port` into host and port (443 by default); IPv6 in brackets.
fn host_port(server: &str) -> Result<(String, u16), LookupError> {
    let rest = server.trim_start_matches("https://");
    let authority = rest.split('/').next().unwrap_or(rest);
    let bad = || LookupError::Config(format!("server `{server}` has no valid host:port"));
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(bad)?;
        (h.to_owned(), after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (authority.to_owned(), None),
        }
    };
    let port = match port {
        Some(p) => p.parse().map_err(|_| bad())?,
        None => 443,
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host, port))
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

impl ApiLookup {
    async fn get(&self, namespace: &str, name: &str) -> Result<Option<PodInfo>, LookupError> {
        let (host, port) = host_port(&self.kubeconfig.server)?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in &self.kubeconfig.ca {
            roots
                .add(cert.clone())
                .map_err(|e| LookupError::Config(format!("certificate authority: {e}")))?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| LookupError::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let server_name = ServerName::try_from(host.clone())
            .map_err(|e| LookupError::Config(format!("server name `{host}`: {e}")))?;
        let unreachable = |what: &str, e: &dyn fmt::Display| {
            LookupError::Unreachable(format!("{}: {what}: {e}", self.kubeconfig.server))
        };
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| unreachable("connect", &e))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(server_name, tcp)
            .await
            .map_err(|e| unreachable("TLS handshake", &e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable("HTTP", &e))?;
        let driver = tokio::spawn(conn);
        let uri = format!("/api/v1/namespaces/{namespace}/pods/{name}");
        let authority = self.kubeconfig.server.trim_start_matches("https://");
        let request = http::Request::get(uri.as_str())
            .header(http::header::HOST, authority)
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.kubeconfig.token),
            )
            .header(http::header::USER_AGENT, "outrider-cni")
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| LookupError::Config(format!("request: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable("request", &e))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| unreachable("reading the answer", &e))?
            .to_bytes();
        driver.abort();
        match status.as_u16() {
            200 => parse_pod(&body).map(Some),
            404 => Ok(None),
            code => Err(LookupError::Api(format!(
                "GET {uri} answered {code}{}",
                if code == 401 || code == 403 {
                    " (the plugin's ServiceAccount needs `get` on pods)"
                } else {
                    ""
                }
            ))),
        }
    }
}

impl PodLookup for ApiLookup {
    fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodInfo>, LookupError> {
        if !valid_segment(namespace) || !valid_segment(name) {
            return Err(LookupError::Api(format!(
                "`{namespace}/{name}` is not a valid pod namespace/name"
            )));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| LookupError::Unreachable(format!("cannot start a runtime: {e}")))?;
        let timeout = self.timeout;
        let result = runtime.block_on(async {
            tokio::time::timeout(timeout, self.get(namespace, name))
                .await
                .unwrap_or_else(|_| {
                    Err(LookupError::Unreachable(format!(
                        "{}: no answer within {} s",
                        self.kubeconfig.server,
                        timeout.as_secs()
                    )))
                })
        });
        // The runtime's threads (DNS resolution) end here, before the caller changes namespace.
        runtime.shutdown_background();
        result
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBUjCB+aADAgECAgEBMAoGCCqGSM49BAMCMA0xCzAJBgNVBAMMAmNhMB4XDTI2MDEwMTAwMDAwMFoXDTM2MDEwMTAwMDAwMFowDTELMAkGA1UEAwwCY2EwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAQ=\n-----END CERTIFICATE-----\n";

    fn kubeconfig(server: &str, extra_user: &str) -> String {
        let data = base64::engine::general_purpose::STANDARD.encode(CA);
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: cni\ncontexts:\n- name: other\n  context: {{cluster: x, user: x}}\n- name: cni\n  context: {{cluster: local, user: outrider-cni}}\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    certificate-authority-data: {data}\nusers:\n- name: outrider-cni\n  user:\n{extra_user}"
        )
    }

    #[test]
    fn kubeconfig_current_context_is_used_and_token_redacted() {
        let kc = Kubeconfig::parse(&kubeconfig(
            "https://198.18.0.1:6443/",
            "    token: s3cr3t\n",
        ))
        .unwrap();
        assert_eq!(kc.server, "https://198.18.0.1:6443");
        assert_eq!(kc.token, "s3cr3t");
        assert_eq!(kc.ca.len(), 1);
        assert!(!format!("{kc:?}").contains("s3cr3t"));
        for (text, needle) in [
            (kubeconfig("http://x:1", "    token: t\n"), "not https://"),
            (kubeconfig("https://x:1", "    {}\n"), "no token"),
            (
                "current-context: nope\ncontexts: []\n".to_owned(),
                "no context named `nope`",
            ),
            ("[".to_owned(), "kubeconfig"),
        ] {
            let e = Kubeconfig::parse(&text).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn server_addresses() {
        assert_eq!(host_port("https://api:6443").unwrap(), ("api".into(), 6443));
        assert_eq!(
            host_port("https://10.0.0.1").unwrap(),
            ("10.0.0.1".into(), 443)
        );
        assert_eq!(
            host_port("https://[2001:db8::1]:6443/x").unwrap(),
            ("2001:db8::1".into(), 6443)
        );
        assert!(host_port("https://api:http").is_err());
        assert!(host_port("https://:1").is_err());
    }

    #[test]
    fn pod_objects() {
        let p = parse_pod(br#"{"metadata":{"annotations":{"a":"b"}},"spec":{"hostNetwork":true}}"#)
            .unwrap();
        assert!(p.host_network);
        assert_eq!(p.annotations["a"], "b");
        assert_eq!(parse_pod(b"{}").unwrap(), PodInfo::default());
        assert!(parse_pod(br#"{"metadata":{"annotations":{"a":1}}}"#).is_err());
        assert!(!valid_segment("../x") && !valid_segment("") && valid_segment("web-0"));
    }
}
