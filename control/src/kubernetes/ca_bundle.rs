//! Keeps the `caBundle` of the injection webhook's configuration (deploy/injector.yaml) equal to
//! the control plane's trust anchors, so the API server trusts the webhook's serving certificate
//! with no hand edit, and again after the CA's files rotate.
//!
//! Every [`CHECK`] the configuration is read; each of its webhooks whose `caBundle` differs gets
//! the anchors, in one `update` (which carries the `resourceVersion` read, so two replicas
//! cannot overwrite each other's newer write; a conflict is retried at the next check). A
//! missing configuration or a refusal is logged once until it changes.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::ByteString;
use kube::api::PostParams;
use kube::{Api, Client};

use crate::authority::Authority;

/// How often the configuration is checked.
pub const CHECK: Duration = Duration::from_secs(10);

/// Keeps the `caBundle` of the MutatingWebhookConfiguration `name` equal to `authority`'s trust
/// anchors; runs until the task is dropped.
pub async fn keep(client: Client, name: String, authority: Arc<Authority>) {
    let api = Api::<MutatingWebhookConfiguration>::all(client);
    let mut last: Option<String> = None;
    loop {
        let anchors = authority.ca().trust_anchors_pem().as_bytes().to_vec();
        let outcome = tokio::time::timeout(CHECK * 3, sync(&api, &name, anchors))
            .await
            .unwrap_or_else(|_| "cannot read or update it: no answer in time".to_string());
        if last.as_deref() != Some(outcome.as_str()) {
            if outcome.starts_with("cannot") || outcome.starts_with("no ") {
                tracing::warn!(configuration = %name, "webhook caBundle: {outcome}");
            } else {
                tracing::info!(configuration = %name, "webhook caBundle: {outcome}");
            }
            last = Some(outcome);
        }
        tokio::time::sleep(CHECK).await;
    }
}

/// One check; what happened, for the log.
async fn sync(api: &Api<MutatingWebhookConfiguration>, name: &str, anchors: Vec<u8>) -> String {
    let mut config = match api.get_opt(name).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            return format!(
                "no MutatingWebhookConfiguration {name} (apply deploy/injector.yaml); pods are not injected"
            )
        }
        Err(e) => return format!("cannot read it: {}", crate::runtime::Chain(&e)),
    };
    let mut changed = 0;
    for webhook in config.webhooks.iter_mut().flatten() {
        let bundle = &mut webhook.client_config.ca_bundle;
        if bundle.as_ref().map(|b| &b.0) != Some(&anchors) {
            *bundle = Some(ByteString(anchors.clone()));
            changed += 1;
        }
    }
    if changed == 0 {
        return "up to date".into();
    }
    match api.replace(name, &PostParams::default(), &config).await {
        Ok(_) => format!("set on {changed} webhook(s)"),
        Err(e) => format!("cannot update it: {}", crate::runtime::Chain(&e)),
    }
}
