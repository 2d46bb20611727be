//! Publishes the mesh's trust anchors as the ConfigMap `outrider-trust-anchors` (key
//! `trust-anchors.pem`) in every namespace labelled `outrider.io/inject=enabled`: the injected
//! proxies mount it to trust the control plane before they have a certificate, so no one has to
//! create it by hand.
//!
//! Every [`CHECK`] the labelled namespaces are listed; a namespace whose ConfigMap was not
//! written with the anchors now in force gets it by server-side apply (field manager
//! `outrider-control`, forced: the control plane owns that key). What was written is remembered
//! for [`REFRESH`], then written again (a ConfigMap deleted by hand comes back). Failures are
//! logged once until the outcome changes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams};
use kube::{Api, Client};
use tokio::time::Instant;

use super::webhook::INJECT_KEY;
use crate::authority::Authority;

/// The ConfigMap's name (the injector mounts it; `outrider_kubernetes::inject`).
pub const CONFIGMAP: &str = "outrider-trust-anchors";
/// Its key.
pub const KEY: &str = "trust-anchors.pem";
/// How often the labelled namespaces are listed.
pub const CHECK: Duration = Duration::from_secs(10);
/// How long one API call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a write is trusted before it is made again.
pub const REFRESH: Duration = Duration::from_secs(600);

/// Keeps the ConfigMap in every labelled namespace; runs until the task is dropped.
pub async fn publish(client: Client, authority: Arc<Authority>) {
    let namespaces = Api::<Namespace>::all(client.clone());
    let params = ListParams::default().labels(&format!("{INJECT_KEY}=enabled"));
    let apply = PatchParams::apply("outrider-control").force();
    // Namespace → (anchors written, when).
    let mut written: HashMap<String, (String, Instant)> = HashMap::new();
    let mut last: Option<String> = None;
    loop {
        let anchors = authority.ca().trust_anchors_pem().to_string();
        let listed = tokio::time::timeout(CALL_TIMEOUT, namespaces.list(&params)).await;
        let outcome = match listed {
            Err(_) => "cannot list the namespaces: no answer in time".to_string(),
            Ok(Err(e)) => format!(
                "cannot list the namespaces labelled {INJECT_KEY}=enabled: {}",
                crate::runtime::Chain(&e)
            ),
            Ok(Ok(list)) => {
                let mut failed = Vec::new();
                let names: Vec<String> = list
                    .items
                    .into_iter()
                    .filter(|ns| {
                        ns.metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(INJECT_KEY))
                            .is_some_and(|v| v == "enabled")
                    })
                    .filter_map(|ns| ns.metadata.name)
                    .collect();
                for ns in &names {
                    let fresh = written
                        .get(ns)
                        .is_some_and(|(a, at)| *a == anchors && at.elapsed() < REFRESH);
                    if fresh {
                        continue;
                    }
                    let cm = ConfigMap {
                        metadata: ObjectMeta {
                            name: Some(CONFIGMAP.into()),
                            namespace: Some(ns.clone()),
                            labels: Some(
                                [(
                                    "app.kubernetes.io/part-of".to_string(),
                                    "outrider".to_string(),
                                )]
                                .into(),
                            ),
                            ..Default::default()
                        },
                        data: Some([(KEY.to_string(), anchors.clone())].into()),
                        ..Default::default()
                    };
                    let api = Api::<ConfigMap>::namespaced(client.clone(), ns);
                    let body = Patch::Apply(&cm);
                    let patch = api.patch(CONFIGMAP, &apply, &body);
                    match tokio::time::timeout(CALL_TIMEOUT, patch).await {
                        Ok(Ok(_)) => {
                            written.insert(ns.clone(), (anchors.clone(), Instant::now()));
                        }
                        Ok(Err(e)) => failed.push(format!("{ns}: {}", crate::runtime::Chain(&e))),
                        Err(_) => failed.push(format!("{ns}: no answer in time")),
                    }
                }
                written.retain(|ns, _| names.contains(ns));
                if failed.is_empty() {
                    format!("published in {} namespace(s)", names.len())
                } else {
                    format!("cannot write it in {}", failed.join("; "))
                }
            }
        };
        if last.as_deref() != Some(outcome.as_str()) {
            if outcome.starts_with("cannot") {
                tracing::warn!(configmap = CONFIGMAP, "trust anchors: {outcome}");
            } else {
                tracing::info!(configmap = CONFIGMAP, "trust anchors: {outcome}");
            }
            last = Some(outcome);
        }
        tokio::time::sleep(CHECK).await;
    }
}
