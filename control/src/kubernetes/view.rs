//! From Kubernetes objects to the services of the mesh view, and the merge with the mesh file.
//!
//! Pure functions over k8s-openapi values: the watchers ([`super::watch`]) hand them what their
//! stores hold, so every rule here is tested without an API server.
//!
//! - A Service's ClusterIPs (both families of a dual-stack one) and ports are its addresses;
//!   each TCP port becomes one [`Service`] entry (same namespace and name), since each port has
//!   its own target port and protocol.
//! - Its endpoints come from the EndpointSlices labelled `kubernetes.io/service-name`, matched to
//!   the Service port by port name (so named target ports arrive resolved). Endpoints whose
//!   condition `ready` holds are used; when none is ready, the `serving` ones that are
//!   `terminating` are (as kube-proxy does): an endpoint that stops being ready gets no new
//!   requests, and the proxy lets the ones in flight finish.
//! - An endpoint's identity is `spiffe://TD/ns/NS/sa/SA` of its Pod, only when that Pod carries
//!   the proxy as the injector leaves it (annotation [`ANN_INJECTED`] and a container named
//!   [`PROXY_CONTAINER`]); other endpoints get plain TCP.
//! - `appProtocol` gives the protocol hint: `http` → HTTP/1.1, `h2c` and `kubernetes.io/h2c` →
//!   HTTP/2, `grpc` → gRPC, `tcp` → opaque; anything else is detected per connection.
//! - A headless Service (`clusterIP: None`) has no virtual address: each endpoint is its own
//!   entry, selected by the endpoint's address. An `ExternalName` Service is not in the view:
//!   traffic to its name resolves outside the cluster and is an unknown destination.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Pod, Service as KubeService, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::api::{Endpoint, Identity, Service, ServiceProtocol};
use crate::mesh::Mesh;

/// The annotation the injector leaves on a meshed pod (`native` or `legacy`).
pub const ANN_INJECTED: &str = "outrider.io/injected";
/// The name of the proxy container the injector adds.
pub const PROXY_CONTAINER: &str = "outrider-proxy";
/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the API server holds, as the watchers last saw it.
#[derive(Debug, Default, Clone)]
pub struct Objects<'a> {
    /// Every Service.
    pub services: Vec<&'a KubeService>,
    /// Every EndpointSlice.
    pub slices: Vec<&'a EndpointSlice>,
    /// Every Pod.
    pub pods: Vec<&'a Pod>,
}

/// The protocol hint of an `appProtocol` value.
pub fn app_protocol(value: Option<&str>) -> ServiceProtocol {
    match value {
        Some("http") => ServiceProtocol::Http1,
        Some("h2c" | "kubernetes.io/h2c") => ServiceProtocol::Http2,
        Some("grpc") => ServiceProtocol::Grpc,
        Some("tcp") => ServiceProtocol::Opaque,
        _ => ServiceProtocol::Detect,
    }
}

/// Whether a pod carries the proxy as the injector leaves it.
pub fn is_meshed(pod: &Pod) -> bool {
    let annotated = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(ANN_INJECTED));
    let spec = pod.spec.as_ref();
    let has_proxy = spec.is_some_and(|s| {
        s.containers.iter().any(|c| c.name == PROXY_CONTAINER)
            || s.init_containers
                .iter()
                .flatten()
                .any(|c| c.name == PROXY_CONTAINER)
    });
    annotated && has_proxy
}

/// The identity of a meshed pod; `None` for a pod without the proxy.
pub fn pod_identity(pod: &Pod, trust_domain: &str) -> Option<Identity> {
    if !is_meshed(pod) {
        return None;
    }
    let ns = pod.metadata.namespace.as_deref()?;
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|sa| !sa.is_empty())
        .unwrap_or("default");
    Identity::new(trust_domain, ns, sa).ok()
}

/// How an endpoint may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Use {
    /// Ready: gets traffic.
    Ready,
    /// Serving but terminating: gets traffic only when no endpoint is ready.
    Fallback,
    /// Neither.
    None,
}

/// The services the API server describes, sorted (namespace, name, first address) so that the
/// same objects always give the same view.
pub fn services(objects: &Objects<'_>, trust_domain: &str) -> Vec<Service> {
    let pods: HashMap<(&str, &str), &Pod> = objects
        .pods
        .iter()
        .filter_map(|p| {
            Some((
                (
                    p.metadata.namespace.as_deref()?,
                    p.metadata.name.as_deref()?,
                ),
                *p,
            ))
        })
        .collect();
    let mut slices: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for s in &objects.slices {
        let ns = s.metadata.namespace.as_deref();
        let svc = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .map(String::as_str);
        if let (Some(ns), Some(svc)) = (ns, svc) {
            slices.entry((ns, svc)).or_default().push(*s);
        }
    }
    let mut out = Vec::new();
    for svc in &objects.services {
        let (Some(ns), Some(name)) = (
            svc.metadata.namespace.as_deref(),
            svc.metadata.name.as_deref(),
        ) else {
            continue;
        };
        let Some(spec) = &svc.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let headless = spec.cluster_ip.as_deref() == Some("None");
        let mut vips: Vec<IpAddr> = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse().ok())
            .collect();
        vips.sort();
        vips.dedup();
        let my_slices = slices.get(&(ns, name)).map_or(&[][..], Vec::as_slice);
        for port in spec.ports.iter().flatten() {
            if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
                continue;
            }
            let Ok(service_port) = u16::try_from(port.port) else {
                continue;
            };
            let (endpoints, slice_protocol) = port_endpoints(port, my_slices, &pods, trust_domain);
            let protocol = match app_protocol(port.app_protocol.as_deref()) {
                ServiceProtocol::Detect => slice_protocol,
                p => p,
            };
            let entry = |addresses: Vec<SocketAddr>, endpoints: Vec<Endpoint>| Service {
                name: name.to_string(),
                namespace: ns.to_string(),
                addresses,
                protocol,
                endpoints,
                routes: Vec::new(),
                breaker: None,
                balancer: Default::default(),
            };
            if headless {
                for e in endpoints {
                    out.push(entry(vec![e.address], vec![e]));
                }
            } else if !vips.is_empty() {
                let addresses = vips
                    .iter()
                    .map(|ip| SocketAddr::new(*ip, service_port))
                    .collect();
                out.push(entry(addresses, endpoints));
            }
        }
    }
    out.sort_by(|a, b| {
        (&a.namespace, &a.name, a.addresses.first()).cmp(&(
            &b.namespace,
            &b.name,
            b.addresses.first(),
        ))
    });
    out
}

/// The endpoints of one Service port, from its EndpointSlices, and the protocol the slices'
/// `appProtocol` names.
fn port_endpoints(
    port: &ServicePort,
    slices: &[&EndpointSlice],
    pods: &HashMap<(&str, &str), &Pod>,
    trust_domain: &str,
) -> (Vec<Endpoint>, ServiceProtocol) {
    let wanted = port.name.as_deref().unwrap_or("");
    let mut protocol = ServiceProtocol::Detect;
    // Per address, the best use seen (an address in two slices counts once).
    let mut found: BTreeMap<SocketAddr, (Use, Option<Identity>)> = BTreeMap::new();
    for slice in slices {
        let Some(target) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == wanted
                && p.protocol.as_deref().is_none_or(|p| p == "TCP")
        }) else {
            continue;
        };
        let Some(target_port) = target.port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        if protocol == ServiceProtocol::Detect {
            protocol = app_protocol(target.app_protocol.as_deref());
        }
        for e in &slice.endpoints {
            let conditions = e.conditions.as_ref();
            // Unset `ready` and `serving` mean ready (the API's rule); unset `terminating`, no.
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            let usable = if ready && !terminating {
                Use::Ready
            } else if serving && terminating {
                Use::Fallback
            } else {
                Use::None
            };
            if usable == Use::None {
                continue;
            }
            let identity = e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| {
                    let ns = r
                        .namespace
                        .as_deref()
                        .or(slice.metadata.namespace.as_deref())?;
                    pods.get(&(ns, r.name.as_deref()?))
                })
                .and_then(|pod| pod_identity(pod, trust_domain));
            for a in &e.addresses {
                let Ok(ip) = a.parse::<IpAddr>() else {
                    continue;
                };
                let addr = SocketAddr::new(ip, target_port);
                let slot = found.entry(addr).or_insert((usable, identity.clone()));
                if usable < slot.0 {
                    *slot = (usable, identity.clone());
                }
            }
        }
    }
    let best = if found.values().any(|(u, _)| *u == Use::Ready) {
        Use::Ready
    } else {
        Use::Fallback
    };
    let endpoints = found
        .into_iter()
        .filter(|(_, (u, _))| *u == best)
        .map(|(address, (_, identity))| Endpoint {
            address,
            identity,
            weight: 1,
        })
        .collect();
    (endpoints, protocol)
}

/// The mesh served: the file's, with the discovered services. Where both name a service
/// (`namespace/name`), the discovered addresses and endpoints are used with the file's routes,
/// breaker, balancer and (unless `detect`) protocol; file services the API does not know stay
/// as they are. Discovered services come first, so their addresses win a collision.
pub fn merge(file: &Mesh, discovered: &[Service]) -> Mesh {
    let by_id: HashMap<String, &Service> = file.services.iter().map(|s| (s.id(), s)).collect();
    let mut known = std::collections::HashSet::new();
    let mut services = Vec::with_capacity(discovered.len() + file.services.len());
    for d in discovered {
        let id = d.id();
        let mut s = d.clone();
        if let Some(f) = by_id.get(&id) {
            s.routes = f.routes.clone();
            s.breaker = f.breaker.clone();
            s.balancer = f.balancer;
            if f.protocol != ServiceProtocol::Detect {
                s.protocol = f.protocol;
            }
        }
        known.insert(id);
        services.push(s);
    }
    services.extend(
        file.services
            .iter()
            .filter(|s| !known.contains(&s.id()))
            .cloned(),
    );
    Mesh {
        services,
        ..file.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    fn service(name: &str, spec: serde_json::Value) -> KubeService {
        obj(json!({"metadata": {"namespace": "shop", "name": name}, "spec": spec}))
    }

    fn slice(
        service: &str,
        ports: serde_json::Value,
        endpoints: serde_json::Value,
    ) -> EndpointSlice {
        obj(json!({
            "metadata": {"namespace": "shop", "name": format!("{service}-x"),
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "ports": ports, "endpoints": endpoints
        }))
    }

    fn pod(name: &str, sa: &str, meshed: bool) -> Pod {
        let mut containers = vec![json!({"name": "app"})];
        let mut annotations = json!({});
        if meshed {
            containers.push(json!({"name": "outrider-proxy"}));
            annotations = json!({"outrider.io/injected": "native"});
        }
        obj(json!({
            "metadata": {"namespace": "shop", "name": name, "annotations": annotations},
            "spec": {"serviceAccountName": sa, "containers": containers}
        }))
    }

    fn ep(ip: &str, pod: &str, conditions: serde_json::Value) -> serde_json::Value {
        json!({"addresses": [ip], "conditions": conditions,
               "targetRef": {"kind": "Pod", "namespace": "shop", "name": pod}})
    }

    /// Service `web` (10.0.0.5:80) and its slice of `endpoints` on port 8080.
    fn web_on_8080(endpoints: serde_json::Value) -> (KubeService, EndpointSlice) {
        let svc = service(
            "web",
            json!({"clusterIP": "10.0.0.5", "ports": [{"port": 80}]}),
        );
        (svc, slice("web", json!([{"port": 8080}]), endpoints))
    }

    fn build(svcs: &[KubeService], slices: &[EndpointSlice], pods: &[Pod]) -> Vec<Service> {
        let objects = Objects {
            services: svcs.iter().collect(),
            slices: slices.iter().collect(),
            pods: pods.iter().collect(),
        };
        services(&objects, "td")
    }

    fn addrs(s: &Service) -> Vec<String> {
        s.endpoints.iter().map(|e| e.address.to_string()).collect()
    }

    #[test]
    fn ports_named_targets_conditions_and_meshed_identities() {
        let svc = service(
            "web",
            json!({"clusterIP": "10.0.0.5", "clusterIPs": ["10.0.0.5", "fd00::5"],
                   "ports": [{"name": "http", "port": 80, "targetPort": "web", "appProtocol": "http"},
                             {"name": "grpc", "port": 9090, "targetPort": 9000},
                             {"name": "dns", "port": 53, "protocol": "UDP"}]}),
        );
        let s = slice(
            "web",
            json!([{"name": "http", "port": 8080}, {"name": "grpc", "port": 9000, "appProtocol": "kubernetes.io/h2c"}]),
            json!([
                ep("10.1.0.1", "a", json!({"ready": true})),
                ep("10.1.0.2", "b", json!({})),
                ep(
                    "10.1.0.3",
                    "c",
                    json!({"ready": false, "serving": true, "terminating": true})
                ),
                ep("10.1.0.4", "d", json!({"ready": false})),
            ]),
        );
        let pods = [pod("a", "web-sa", true), pod("b", "web-sa", false)];
        let out = build(&[svc], &[s], &pods);
        assert_eq!(out.len(), 2, "{out:?}");
        let http = &out[0];
        assert_eq!(http.id(), "shop/web");
        assert_eq!(
            http.addresses,
            [
                "10.0.0.5:80".parse().unwrap(),
                "[fd00::5]:80".parse().unwrap()
            ]
        );
        assert_eq!(http.protocol, ServiceProtocol::Http1);
        assert_eq!(addrs(http), ["10.1.0.1:8080", "10.1.0.2:8080"]);
        assert_eq!(
            http.endpoints[0].identity.as_ref().map(Identity::as_str),
            Some("spiffe://td/ns/shop/sa/web-sa")
        );
        assert_eq!(http.endpoints[1].identity, None, "pod b is not meshed");
        let grpc = &out[1];
        assert_eq!(grpc.addresses[0].port(), 9090);
        assert_eq!(grpc.protocol, ServiceProtocol::Http2, "from the slice");
        assert_eq!(addrs(grpc), ["10.1.0.1:9000", "10.1.0.2:9000"]);
    }

    #[test]
    fn terminating_endpoints_serve_only_when_none_is_ready() {
        let (svc, s) = web_on_8080(json!([
            ep(
                "10.1.0.3",
                "c",
                json!({"ready": false, "serving": true, "terminating": true})
            ),
            ep(
                "10.1.0.4",
                "d",
                json!({"ready": false, "serving": false, "terminating": true})
            ),
        ]));
        let out = build(&[svc], &[s], &[]);
        assert_eq!(addrs(&out[0]), ["10.1.0.3:8080"]);
    }

    #[test]
    fn headless_external_name_annotation_only_and_app_protocols() {
        let headless = service(
            "db",
            json!({"clusterIP": "None", "ports": [{"port": 5432, "appProtocol": "tcp"}]}),
        );
        let external = service(
            "ext",
            json!({"type": "ExternalName", "externalName": "example.org"}),
        );
        let s = slice(
            "db",
            json!([{"port": 5432}]),
            json!([
                ep("10.1.0.7", "p", json!({})),
                ep("10.1.0.8", "q", json!({}))
            ]),
        );
        // A pod with the annotation but no proxy container is not meshed.
        let mut half: Pod = pod("p", "db", false);
        half.metadata.annotations = Some([(ANN_INJECTED.to_string(), "native".to_string())].into());
        let out = build(&[headless, external], &[s], &[half, pod("q", "db", true)]);
        assert_eq!(
            out.len(),
            2,
            "one entry per headless endpoint, none for ExternalName"
        );
        assert_eq!(
            out[0].addresses,
            out[0]
                .endpoints
                .iter()
                .map(|e| e.address)
                .collect::<Vec<_>>()
        );
        assert_eq!(out[0].protocol, ServiceProtocol::Opaque);
        assert_eq!(out[0].endpoints[0].identity, None);
        assert!(out[1].endpoints[0].identity.is_some());
        for (v, p) in [
            (Some("grpc"), ServiceProtocol::Grpc),
            (Some("h2c"), ServiceProtocol::Http2),
            (Some("https"), ServiceProtocol::Detect),
            (None, ServiceProtocol::Detect),
        ] {
            assert_eq!(app_protocol(v), p, "{v:?}");
        }
    }

    #[test]
    fn the_file_settings_apply_to_discovered_endpoints() {
        let file = Mesh::parse(
            "services:\n  - name: web\n    namespace: shop\n    addresses: [198.18.0.1:80]\n    \
             protocol: http2\n    balancer: p2c-ewma\n    routes:\n      - name: slow\n        \
             timeout: 1s\n  - name: outside\n    addresses: [198.18.0.2:80]\nworkloads:\n  - name: shop/w\n",
        )
        .unwrap();
        let (svc, s) = web_on_8080(json!([ep("10.1.0.1", "a", json!({}))]));
        let merged = merge(&file, &build(&[svc], &[s], &[]));
        let ids: Vec<String> = merged.services.iter().map(Service::id).collect();
        assert_eq!(ids, ["shop/web", "default/outside"]);
        let web = &merged.services[0];
        assert_eq!(web.addresses, ["10.0.0.5:80".parse().unwrap()]);
        assert_eq!(addrs(web), ["10.1.0.1:8080"]);
        assert_eq!(web.protocol, ServiceProtocol::Http2);
        assert_eq!(web.routes.len(), 1);
        assert_eq!(web.balancer, crate::api::Balancer::P2cEwma);
        assert_eq!(merged.workloads, file.workloads);
    }
}
