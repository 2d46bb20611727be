//! The inject code handed to the control plane's admission webhook (`POST /v1/inject`): the
//! control crate cannot depend on the kubernetes crate (which depends on it), so the binary joins
//! them. A pod goes through `outrider inject`'s own entry point with its default options (and
//! `--cni` under `outrider control --inject-capture cni`), so the webhook and the CLI make the
//! same pod.

use outrider_control::kubernetes::webhook::{Capture, Injector};
use outrider_kubernetes::inject::{inject, InjectOptions};
use serde_json::Value;

/// `outrider inject` with `options`, one pod at a time.
#[derive(Debug, Clone, Default)]
pub struct InjectHook {
    /// The options `outrider inject` would be given.
    pub options: InjectOptions,
}

impl InjectHook {
    /// The webhook's injector for `outrider control`'s flags: `outrider inject`'s defaults, and
    /// `--cni` when `--inject-capture cni`.
    pub fn for_webhook(args: &outrider_control::ControlArgs) -> Self {
        InjectHook {
            options: InjectOptions {
                cni: args.inject_capture == Capture::Cni,
                ..InjectOptions::default()
            },
        }
    }
}

impl Injector for InjectHook {
    fn inject_pod(&self, pod: &Value) -> Result<Option<Value>, String> {
        // JSON is YAML: the inject code reads it as it reads a manifest.
        let text = serde_json::to_string(pod).map_err(|e| e.to_string())?;
        let out = inject(&text, &self.options).map_err(|e| e.to_string())?;
        let docs = outrider_kubernetes::manifest::parse(&out.yaml).map_err(|e| e.to_string())?;
        let [doc] = docs.as_slice() else {
            return Err(format!(
                "the inject code made {} documents of one pod",
                docs.len()
            ));
        };
        let injected = serde_json::to_value(doc).map_err(|e| e.to_string())?;
        Ok((injected != *pod).then_some(injected))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_comes_back_injected_once() {
        let pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]}});
        let hook = InjectHook::default();
        let injected = hook.inject_pod(&pod).unwrap().unwrap();
        let inits = injected["spec"]["initContainers"].as_array().unwrap();
        assert_eq!(inits[1]["name"], "outrider-proxy");
        assert_eq!(hook.inject_pod(&injected).unwrap(), None, "injected twice");
    }
}
