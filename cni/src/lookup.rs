//! The pod lookup: what the plugin needs to know about a pod (its annotations, `hostNetwork`),
//! behind [`PodLookup`], and [`ApiLookup`], which asks the API server for the pod with the
//! `kube` client (rustls on ring, as the control plane's), authenticated as the kubeconfig the
//! installer writes says (the DaemonSet's ServiceAccount token), and bounded in time as a whole:
//! reading the kubeconfig, connecting, TLS, the request and the body.
//!
//! Each lookup runs on a runtime of its own that is shut down before the plugin enters the pod's
//! network namespace. A lookup that does not finish in time is [`LookupError::Unreachable`]: the
//! plugin then fails `ADD` with "try again later" (docs/cni.md).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};

/// What the plugin needs to know about a pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
    /// `spec.hostNetwork`.
    pub host_network: bool,
}

impl From<Pod> for PodInfo {
    fn from(pod: Pod) -> Self {
        PodInfo {
            annotations: pod.metadata.annotations.unwrap_or_default(),
            host_network: pod.spec.and_then(|s| s.host_network).unwrap_or(false),
        }
    }
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

/// [`PodLookup`] through the `kube` client, configured by the kubeconfig at `kubeconfig` (read
/// at each lookup: a kubeconfig that cannot be read fails only the pods that need a lookup), the
/// whole lookup bounded by `timeout`.
#[derive(Debug, Clone)]
pub struct ApiLookup {
    /// The kubeconfig file (its current context: server, CA, token or tokenFile).
    pub kubeconfig: PathBuf,
    /// The bound on the whole lookup.
    pub timeout: Duration,
}

/// The client configuration of kubeconfig YAML `text`: its current context, over `https://`
/// only (the token must not travel in the clear), every timeout the client has set to
/// `timeout`.
pub async fn client_config(text: &str, timeout: Duration) -> Result<kube::Config, LookupError> {
    let bad = |e: &dyn fmt::Display| LookupError::Config(e.to_string());
    let kubeconfig = Kubeconfig::from_yaml(text).map_err(|e| bad(&e))?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| bad(&e))?;
    if config.cluster_url.scheme_str() != Some("https") {
        return Err(LookupError::Config(format!(
            "server `{}` is not https://",
            config.cluster_url
        )));
    }
    config.connect_timeout = Some(timeout);
    config.read_timeout = Some(timeout);
    config.write_timeout = Some(timeout);
    Ok(config)
}

/// What a failed GET means for the plugin: an answer from the API server, or none.
fn classify(e: kube::Error, at: &str) -> LookupError {
    match e {
        kube::Error::Api(r) => LookupError::Api(format!(
            "GET {at} answered {} {}{}",
            r.code,
            r.reason,
            if r.code == 401 || r.code == 403 {
                " (the plugin's ServiceAccount needs `get` on pods)"
            } else {
                ""
            }
        )),
        kube::Error::SerdeError(e) => {
            LookupError::Api(format!("the pod object cannot be read: {e}"))
        }
        other => LookupError::Unreachable(format!("GET {at}: {}", chain(&other))),
    }
}

/// An error with its causes, `: `-separated (kube's own messages stop at the top).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

impl ApiLookup {
    async fn get(&self, namespace: &str, name: &str) -> Result<Option<PodInfo>, LookupError> {
        let text = tokio::fs::read_to_string(&self.kubeconfig)
            .await
            .map_err(|e| LookupError::Config(format!("{}: {e}", self.kubeconfig.display())))?;
        let config = client_config(&text, self.timeout).await?;
        let server = config.cluster_url.to_string();
        let client = Client::try_from(config)
            .map_err(|e| LookupError::Config(format!("cannot make a client: {}", chain(&e))))?;
        let at = format!(
            "{}/api/v1/namespaces/{namespace}/pods/{name}",
            server.trim_end_matches('/')
        );
        Api::<Pod>::namespaced(client, namespace)
            .get_opt(name)
            .await
            .map(|pod| pod.map(PodInfo::from))
            .map_err(|e| classify(e, &at))
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
                        "no answer within {} s",
                        timeout.as_secs()
                    )))
                })
        });
        // The runtime's tasks (the client's connection) end here, before the caller changes
        // namespace.
        runtime.shutdown_background();
        result
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A self-signed certificate is not needed to read a kubeconfig: any PEM-shaped CA will do
    /// until a connection is made, which these tests never make.
    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBUjCB+aADAgECAgEBMAoGCCqGSM49BAMCMA0xCzAJBgNVBAMMAmNhMB4XDTI2MDEwMTAwMDAwMFoXDTM2MDEwMTAwMDAwMFowDTELMAkGA1UEAwwCY2EwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAQ=\n-----END CERTIFICATE-----\n";

    fn kubeconfig(server: &str, extra_user: &str) -> String {
        use base64::Engine as _;
        let data = base64::engine::general_purpose::STANDARD.encode(CA);
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: cni\ncontexts:\n- name: other\n  context: {{cluster: x, user: x}}\n- name: cni\n  context: {{cluster: local, user: outrider-cni}}\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    certificate-authority-data: {data}\nusers:\n- name: outrider-cni\n  user:\n{extra_user}"
        )
    }

    #[tokio::test]
    async fn the_current_context_is_used_and_bad_kubeconfigs_are_named() {
        let second = Duration::from_secs(2);
        let config = client_config(
            &kubeconfig("https://198.18.0.1:6443/", "    token: s3cr3t\n"),
            second,
        )
        .await
        .unwrap();
        assert_eq!(config.cluster_url.host(), Some("198.18.0.1"));
        assert_eq!(config.cluster_url.port_u16(), Some(6443));
        assert_eq!(config.read_timeout, Some(second));
        assert_eq!(config.connect_timeout, Some(second));
        for (text, needle) in [
            (kubeconfig("http://x:1", "    token: t\n"), "not https://"),
            ("current-context: nope\ncontexts: []\n".to_owned(), "nope"),
            ("[".to_owned(), "kubeconfig"),
        ] {
            let e = client_config(&text, second).await.unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn pod_objects_and_names() {
        let pod: Pod = serde_json::from_str(
            r#"{"metadata":{"annotations":{"a":"b"}},"spec":{"hostNetwork":true,"containers":[]}}"#,
        )
        .unwrap();
        let p = PodInfo::from(pod);
        assert!(p.host_network);
        assert_eq!(p.annotations["a"], "b");
        assert_eq!(PodInfo::from(Pod::default()), PodInfo::default());
        assert!(!valid_segment("../x") && !valid_segment("") && valid_segment("web-0"));
        let lookup = ApiLookup {
            kubeconfig: "/nonexistent/kubeconfig".into(),
            timeout: Duration::from_secs(1),
        };
        assert!(matches!(
            lookup.pod("Bad/NS", "x"),
            Err(LookupError::Api(_))
        ));
        assert!(matches!(
            lookup.pod("ns", "web"),
            Err(LookupError::Config(_))
        ));
    }

    #[test]
    fn api_answers_and_silence_are_told_apart() {
        let forbidden = kube::Error::Api(kube::core::ErrorResponse {
            status: "Failure".into(),
            message: "pods is forbidden".into(),
            reason: "Forbidden".into(),
            code: 403,
        });
        let e = classify(forbidden, "https://api/x").to_string();
        assert!(e.contains("403") && e.contains("`get` on pods"), "{e}");
        let down = kube::Error::Service("connection refused".into());
        assert!(matches!(
            classify(down, "https://api/x"),
            LookupError::Unreachable(m) if m.contains("connection refused")
        ));
    }
}
