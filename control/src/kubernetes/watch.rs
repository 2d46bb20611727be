//! The runtime watchers of Services, EndpointSlices and Pods, and the task that turns what they
//! hold into the control plane's view.
//!
//! Each resource is followed by a `kube` runtime watcher behind a reflector store: it lists,
//! then watches from the list's `resourceVersion` (with bookmarks), lists again on `410 Gone`,
//! and retries failures with the runtime's default backoff. The stores keep what they last saw,
//! so while the API server is unreachable the last good view stays in force (the proxies stay
//! ready). A `403` (RBAC) is logged once per resource, at error level, with the verb and the
//! resource that are missing; other failures once per outage, at warn level.
//!
//! The view is built once all three stores have listed, and again after every change, on a
//! blocking thread (its cost grows with the cluster). A rebuild that changes nothing serves no
//! new version.

use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::Notify;

use super::view::{self, Objects, ANN_INJECTED};
use crate::api::Service;

/// Where the discovered services go.
pub trait Sink: Send + Sync + 'static {
    /// Replaces the discovered services with `services`. Called on a blocking thread.
    fn discovered(&self, services: Vec<Service>);
}

/// Starts the three watchers and the view builder on the current runtime; they run until the
/// runtime stops. `trust_domain` names the meshed endpoints' identities.
pub fn spawn(client: Client, trust_domain: String, sink: Arc<dyn Sink>) {
    let changed = Arc::new(Notify::new());
    let services = follow::<KubeService>(
        Api::all(client.clone()),
        "services",
        changed.clone(),
        |_| {},
    );
    let slices = follow::<EndpointSlice>(
        Api::all(client.clone()),
        "endpointslices.discovery.k8s.io",
        changed.clone(),
        |_| {},
    );
    let pods = follow::<Pod>(Api::all(client), "pods", changed.clone(), slim_pod);
    tokio::spawn(build(services, slices, pods, trust_domain, changed, sink));
}

/// What the view needs of a Pod: its name, namespace, the injector's annotation, its service
/// account and its containers' names. The rest is dropped before it is stored.
fn slim_pod(pod: &mut Pod) {
    *pod = slimmed(std::mem::take(pod));
}

fn slimmed(pod: Pod) -> Pod {
    let names = |cs: Vec<Container>| -> Vec<Container> {
        cs.into_iter()
            .map(|c| Container {
                name: c.name,
                ..Default::default()
            })
            .collect()
    };
    let mut meta = pod.metadata;
    meta.managed_fields = None;
    meta.labels = None;
    meta.annotations = meta
        .annotations
        .map(|mut a| {
            a.retain(|k, _| k == ANN_INJECTED);
            a
        })
        .filter(|a| !a.is_empty());
    let spec = pod.spec.map(|s| PodSpec {
        service_account_name: s.service_account_name,
        containers: names(s.containers),
        init_containers: s.init_containers.map(names),
        ..Default::default()
    });
    Pod {
        metadata: meta,
        spec,
        status: None,
    }
}

/// Starts following one resource into a store; `changed` is notified after every change.
fn follow<K>(
    api: Api<K>,
    resource: &'static str,
    changed: Arc<Notify>,
    slim: fn(&mut K),
) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).modify(slim),
    );
    tokio::spawn(drive(stream, resource, changed));
    store
}

/// Reads a watcher's events, notifying `changed` and logging failures (see the module docs).
async fn drive<S, K>(stream: S, resource: &'static str, changed: Arc<Notify>)
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    let stream = stream.default_backoff();
    futures_util::pin_mut!(stream);
    let mut forbidden_logged = false;
    let mut failing = false;
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                if failing {
                    tracing::info!(resource, "watch resumed");
                    failing = false;
                }
                if matches!(
                    event,
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone
                ) {
                    changed.notify_one();
                }
            }
            Err(e) => {
                let (verb, source) = match &e {
                    watcher::Error::InitialListFailed(s) => ("list", Some(s)),
                    watcher::Error::WatchStartFailed(s) | watcher::Error::WatchFailed(s) => {
                        ("watch", Some(s))
                    }
                    _ => ("watch", None),
                };
                let forbidden = match (&e, source) {
                    (_, Some(kube::Error::Api(r))) | (watcher::Error::WatchError(r), _) => {
                        r.code == 403
                    }
                    _ => false,
                };
                if forbidden {
                    if !forbidden_logged {
                        tracing::error!(
                            verb,
                            resource,
                            "the API server forbids the control plane to {verb} {resource} \
                             (RBAC); grant it get, list and watch on {resource} (deploy/ has the \
                             ClusterRole); the last good view stays: {}",
                            crate::runtime::Chain(&e)
                        );
                        forbidden_logged = true;
                    }
                } else if !failing {
                    tracing::warn!(
                        resource,
                        "watch failed; the last good view stays, retrying with backoff: {}",
                        crate::runtime::Chain(&e)
                    );
                }
                failing = true;
            }
        }
    }
}

/// Builds the view once every store has listed, then after every change.
async fn build(
    services: Store<KubeService>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
    trust_domain: String,
    changed: Arc<Notify>,
    sink: Arc<dyn Sink>,
) {
    for ready in [
        services.wait_until_ready().await,
        slices.wait_until_ready().await,
        pods.wait_until_ready().await,
    ] {
        if ready.is_err() {
            return;
        }
    }
    tracing::info!("the Kubernetes API is listed; discovered services join the view");
    loop {
        let (s, e, p) = (services.state(), slices.state(), pods.state());
        let (td, to) = (trust_domain.clone(), sink.clone());
        let built = tokio::task::spawn_blocking(move || {
            let objects = Objects {
                services: s.iter().map(AsRef::as_ref).collect(),
                slices: e.iter().map(AsRef::as_ref).collect(),
                pods: p.iter().map(AsRef::as_ref).collect(),
            };
            to.discovered(view::services(&objects, &td));
        })
        .await;
        if let Err(e) = built {
            tracing::error!(error = %e, "building the discovered view failed");
        }
        changed.notified().await;
    }
}
