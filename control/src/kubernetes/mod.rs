//! `outrider control --kubernetes`: the Kubernetes API server as a discovery source.
//!
//! - [`client`]: the `kube` client, from the in-cluster environment (`KUBERNETES_SERVICE_HOST`
//!   and the pod's service-account files) or from a kubeconfig (`--kubeconfig`, else
//!   `KUBECONFIG`, else `~/.kube/config`; a `certificate-authority-data`, `server` and bearer
//!   `token` one is enough). TLS is rustls on ring.
//! - [`watch`]: runtime watchers of Services, EndpointSlices and Pods feeding the view.
//! - [`review`]: projected ServiceAccount tokens checked with the TokenReview API, for
//!   `POST /v1/certify`.
//! - [`anchors`]: the trust-anchors ConfigMap in every namespace labelled for injection.
//! - [`webhook`]: the mutating admission webhook `POST /v1/inject`, and [`ca_bundle`], which
//!   keeps its configuration's `caBundle` equal to the control plane's trust anchors.
//! - [`view`]: the rules that turn those objects into the mesh's services, and the merge with
//!   the mesh file (which keeps routes, retries, breakers, policy and services outside the
//!   cluster).

pub mod anchors;
pub mod ca_bundle;
pub mod review;
pub mod view;
pub mod watch;
pub mod webhook;

use std::path::Path;

use anyhow::Context;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// The environment variable that says the process runs in a pod.
const IN_CLUSTER_ENV: &str = "KUBERNETES_SERVICE_HOST";

/// The client `outrider control --kubernetes` uses: `kubeconfig` if given, else the in-cluster
/// configuration when `KUBERNETES_SERVICE_HOST` is set, else `KUBECONFIG` or `~/.kube/config`.
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let (config, from) = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read the kubeconfig {}", path.display()))?;
            let config = Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("unusable kubeconfig {}", path.display()))?;
            (config, path.display().to_string())
        }
        None if std::env::var_os(IN_CLUSTER_ENV).is_some() => (
            Config::incluster().context("cannot use the in-cluster configuration")?,
            "the in-cluster service account".to_string(),
        ),
        None => (
            Config::from_kubeconfig(&KubeConfigOptions::default())
                .await
                .context(
                    "no kubeconfig: give --kubeconfig FILE or set KUBECONFIG (or run in a pod)",
                )?,
            "KUBECONFIG or ~/.kube/config".to_string(),
        ),
    };
    tracing::info!(server = %config.cluster_url, from, "Kubernetes API client configured");
    Client::try_from(config).context("cannot build the Kubernetes client")
}
