//! `POST /v1/inject`: the mutating admission webhook that adds the mesh to pods as the API
//! server creates them.
//!
//! The API server sends an `AdmissionReview` (`admission.k8s.io/v1`) for each Pod `CREATE`; the
//! answer allows it with a JSON patch that turns the pod into what `outrider inject` makes of
//! it (the binary hands the inject code in as an [`Injector`]; this crate does not depend on
//! it). A pod is injected when it is annotated `outrider.io/inject: enabled`, or when its
//! namespace is labelled `outrider.io/inject=enabled` (looked up with the API client; without
//! one, the webhook configuration's `namespaceSelector` is trusted to have chosen) and the pod is
//! not annotated `outrider.io/inject: disabled`.
//!
//! Pods made by controllers arrive with only `generateName` (or, from a StatefulSet, a name of
//! their own): the workload name the proxy is given comes from the pod's controller (a
//! ReplicaSet's Deployment, with the `pod-template-hash` cut; a CronJob's Job, with its minute
//! cut; the StatefulSet, DaemonSet, Job), else from the pod's name or `generateName` prefix. The
//! name is given to the inject code only: the patch never changes `metadata.name`.
//!
//! A pod the inject code refuses (a bad annotation, say) is denied with its message; a request
//! that is not an `AdmissionReview` gets `400`.
//!
//! How an injected pod's traffic is captured is the control plane's `--inject-capture`
//! ([`Capture`]): `init` (the default, the `outrider-init` container with `NET_ADMIN`) or `cni`
//! (the node's `outrider-cni` plugin, as `outrider inject --cni`: no capabilities in the pod). A
//! pod's `outrider.io/capture` annotation (`cni` or `init`) beats it, as it beats `--cni`.

use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use k8s_openapi::api::core::v1::Namespace;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::core::DynamicObject;
use kube::{Api, Client};
use serde_json::Value;

use crate::authority::json_response;
use crate::runtime::text;

/// The path of the webhook.
pub const INJECT_PATH: &str = "/v1/inject";
/// The label of a namespace whose pods are injected, and the annotation of a pod (value
/// `enabled`; `disabled` on a pod opts it out).
pub const INJECT_KEY: &str = "outrider.io/inject";
/// The largest AdmissionReview accepted, in bytes (the API server's own request limit is 3 MiB).
pub const MAX_REVIEW_BYTES: usize = 3 * 1024 * 1024;

/// How long reading a namespace's labels may take.
const NAMESPACE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(4);

/// How the webhook's pods capture their traffic when their `outrider.io/capture` annotation
/// does not say (`outrider control --inject-capture`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Capture {
    /// `outrider-init` (root, `NET_ADMIN`, `NET_RAW`) programs the pod's iptables.
    #[default]
    Init,
    /// The node's `outrider-cni` plugin does (`outrider inject --cni`; docs/cni.md).
    Cni,
}

/// The inject code: a pod in, the injected pod out.
pub trait Injector: Send + Sync + 'static {
    /// Injects `pod` (a Pod as JSON, `metadata.name` set); `Ok(None)` when it is left alone
    /// (already injected, opted out), `Err` with a message for the user otherwise.
    fn inject_pod(&self, pod: &Value) -> Result<Option<Value>, String>;
}

/// The webhook: the inject code, and the API client for namespace labels.
#[derive(Clone)]
pub struct Webhook {
    injector: Arc<dyn Injector>,
    client: Option<Client>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("client", &self.client.is_some())
            .finish()
    }
}

impl Webhook {
    /// A webhook injecting with `injector`; `client` reads namespace labels (without one every
    /// pod sent that is not opted out is injected).
    pub fn new(injector: Arc<dyn Injector>, client: Option<Client>) -> Self {
        Self { injector, client }
    }

    /// Answers one request body.
    pub async fn handle(&self, body: &[u8]) -> http::Response<Full<Bytes>> {
        let raw: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("not JSON: {e}\n")),
        };
        let review: AdmissionReview<DynamicObject> = match serde_json::from_value(raw.clone()) {
            Ok(r) => r,
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("not an AdmissionReview: {e}\n"),
                )
            }
        };
        let request: AdmissionRequest<DynamicObject> = match review.try_into() {
            Ok(r) => r,
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("an AdmissionReview without a request: {e}\n"),
                )
            }
        };
        let pod = raw
            .pointer("/request/object")
            .cloned()
            .unwrap_or(Value::Null);
        let response = AdmissionResponse::from(&request);
        // The patch as the API documents it: base64 in a JSON string (kube's type would write
        // an array of numbers).
        let mut patch_bytes = None;
        let response = match self.decide(&request, &pod).await {
            Ok(None) => response,
            Ok(Some(patch)) => match serde_json::to_vec(&patch)
                .map_err(|e| e.to_string())
                .and_then(|bytes| {
                    let r = response
                        .clone()
                        .with_patch(patch)
                        .map_err(|e| e.to_string())?;
                    patch_bytes = Some(bytes);
                    Ok(r)
                }) {
                Ok(r) => r,
                Err(e) => response.deny(format!("outrider: cannot write the patch: {e}")),
            },
            Err(message) => {
                tracing::warn!(
                    namespace = %request.namespace.as_deref().unwrap_or(""),
                    "admission refused: {message}"
                );
                response.deny(format!("outrider: {message}"))
            }
        };
        let mut review = match serde_json::to_value(response.into_review()) {
            Ok(v) => v,
            Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        };
        if let (Some(bytes), Some(slot)) = (patch_bytes, review.pointer_mut("/response/patch")) {
            use base64::Engine;
            *slot = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
        json_response(StatusCode::OK, &review)
    }

    /// The patch for a request: `None` to let it through unchanged.
    async fn decide(
        &self,
        request: &AdmissionRequest<DynamicObject>,
        pod: &Value,
    ) -> Result<Option<json_patch::Patch>, String> {
        if request.kind.kind != "Pod"
            || !request.kind.group.is_empty()
            || request.operation != Operation::Create
            || request.sub_resource.is_some()
        {
            return Ok(None);
        }
        let annotation = pod
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(INJECT_KEY))
            .and_then(Value::as_str);
        let wanted = match annotation {
            Some("enabled") => true,
            Some("disabled") => false,
            _ => {
                let ns = request
                    .namespace
                    .as_deref()
                    .or_else(|| pod.pointer("/metadata/namespace").and_then(Value::as_str))
                    .unwrap_or("default");
                self.namespace_enabled(ns).await?
            }
        };
        if !wanted {
            return Ok(None);
        }
        // The inject code names the workload after `metadata.name`: give it the workload's
        // name, and put the pod's own (or none) back after.
        let own_name = pod.pointer("/metadata/name").cloned();
        let workload =
            workload_name(pod).ok_or("the pod has neither an owner, a name nor a generateName")?;
        let mut named = pod.clone();
        if let Some(meta) = named.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("name".into(), Value::String(workload));
        }
        let Some(mut injected) = self.injector.inject_pod(&named)? else {
            return Ok(None);
        };
        if let Some(meta) = injected.get_mut("metadata").and_then(Value::as_object_mut) {
            match own_name {
                Some(name) => meta.insert("name".into(), name),
                None => meta.remove("name"),
            };
        }
        Ok(Some(json_patch::diff(pod, &injected)))
    }

    /// Whether `namespace` is labelled `outrider.io/inject=enabled`.
    async fn namespace_enabled(&self, namespace: &str) -> Result<bool, String> {
        let Some(client) = &self.client else {
            return Ok(true);
        };
        let api = Api::<Namespace>::all(client.clone());
        let lookup = api.get_opt(namespace);
        // Within the API server's own wait for the webhook (deploy/injector.yaml: 5-10 s).
        let ns = tokio::time::timeout(NAMESPACE_TIMEOUT, lookup)
            .await
            .map_err(|_| format!("the labels of namespace {namespace} took too long to read"))?
            .map_err(|e| {
                format!(
                    "cannot read the labels of namespace {namespace}: {}",
                    crate::runtime::Chain(&e)
                )
            })?;
        Ok(ns
            .and_then(|ns| ns.metadata.labels)
            .and_then(|l| l.get(INJECT_KEY).cloned())
            .is_some_and(|v| v == "enabled"))
    }
}

/// The workload a pod belongs to: its controller's name (a ReplicaSet's with the
/// `-<pod-template-hash>` cut, which is its Deployment's; a Job's with a CronJob's
/// `-<scheduled minute>` cut), else its own name, else its `generateName` without the trailing
/// `-`.
pub fn workload_name(pod: &Value) -> Option<String> {
    let meta = pod.get("metadata")?;
    let owner = meta
        .get("ownerReferences")
        .and_then(Value::as_array)
        .and_then(|owners| {
            owners
                .iter()
                .find(|o| o.get("controller").and_then(Value::as_bool) == Some(true))
                .or_else(|| owners.first())
        });
    if let Some(owner) = owner {
        let kind = owner.get("kind").and_then(Value::as_str).unwrap_or("");
        if let Some(name) = owner.get("name").and_then(Value::as_str) {
            let hash = meta
                .pointer("/labels/pod-template-hash")
                .and_then(Value::as_str);
            let name = match (kind, hash) {
                ("ReplicaSet", Some(hash)) => name
                    .strip_suffix(hash)
                    .and_then(|n| n.strip_suffix('-'))
                    .unwrap_or(name),
                // A CronJob names its Jobs `<cronjob>-<minutes since the epoch>`.
                ("Job", _) => match name.rsplit_once('-') {
                    Some((base, minutes))
                        if !base.is_empty()
                            && minutes.len() >= 8
                            && minutes.bytes().all(|b| b.is_ascii_digit()) =>
                    {
                        base
                    }
                    _ => name,
                },
                _ => name,
            };
            if !name.is_empty() {
                return Some(name.to_string());
            }
        }
    }
    if let Some(name) = meta
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
    {
        return Some(name.to_string());
    }
    let prefix = meta.get("generateName").and_then(Value::as_str)?;
    let name = prefix.trim_end_matches('-');
    (!name.is_empty()).then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn workload_names_from_owners_and_prefixes() {
        let pod = json!({"metadata": {"generateName": "web-7c9d8-",
            "labels": {"pod-template-hash": "7c9d8"},
            "ownerReferences": [{"kind": "ReplicaSet", "name": "web-7c9d8", "controller": true}]}});
        assert_eq!(workload_name(&pod).as_deref(), Some("web"));
        let pod = json!({"metadata": {"generateName": "db-",
            "ownerReferences": [{"kind": "StatefulSet", "name": "db", "controller": true}]}});
        assert_eq!(workload_name(&pod).as_deref(), Some("db"));
        let pod = json!({"metadata": {"name": "db-0",
            "ownerReferences": [{"kind": "StatefulSet", "name": "db", "controller": true}]}});
        assert_eq!(workload_name(&pod).as_deref(), Some("db"), "the owner wins");
        let pod = json!({"metadata": {"generateName": "backup-29345678-",
            "ownerReferences": [{"kind": "Job", "name": "backup-29345678", "controller": true}]}});
        assert_eq!(workload_name(&pod).as_deref(), Some("backup"));
        let pod = json!({"metadata": {"ownerReferences": [{"kind": "Job", "name": "migrate-1"}]}});
        assert_eq!(workload_name(&pod).as_deref(), Some("migrate-1"));
        let pod = json!({"metadata": {"name": "solo"}});
        assert_eq!(workload_name(&pod).as_deref(), Some("solo"));
        let pod = json!({"metadata": {"generateName": "batch-"}});
        assert_eq!(workload_name(&pod).as_deref(), Some("batch"));
        assert_eq!(workload_name(&json!({"metadata": {}})), None);
        assert_eq!(
            workload_name(&json!({"metadata": {"generateName": "-"}})),
            None
        );
    }
}
