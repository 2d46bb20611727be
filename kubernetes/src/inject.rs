//! `outrider inject`: adds the mesh to the pod templates of Kubernetes workloads, and
//! `--uninject` takes it out again.
//!
//! Per workload (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job,
//! CronJob) it adds, in
//! this order:
//!
//! - `initContainers[0]`: `outrider-init` (`outrider init`), root with `NET_ADMIN` and `NET_RAW`
//!   only, the port and CIDR exclusions from the pod's annotations; or, in CNI mode (`--cni`, or
//!   the pod annotation `outrider.io/capture: cni`), `outrider-cni-validate` (`outrider cni
//!   validate`: non-root, no capabilities), which fails the pod's start when the node's CNI
//!   plugin did not program the rules (docs/cni.md);
//! - `initContainers[1]`: `outrider-proxy` as a native sidecar (`restartPolicy: Always`, Kubernetes
//!   1.29+), before the app's own init containers, so they reach the network through it; or, with
//!   `--legacy-sidecar`, `containers[0]` and the app's init containers run as the proxy's uid
//!   (their traffic is then not captured: there is no proxy yet when they run);
//! - the `outrider-identity` projected volume (the proxy's bootstrap token and the trust anchors,
//!   see [`IDENTITY_DIR`]): by default a projected ServiceAccount token for the audience
//!   `outrider` ([`IdentityToken::Projected`]), or the service account's Outrider token from a
//!   Secret ([`IdentityToken::Secret`], `--identity-token secret` or the annotation
//!   `outrider.io/identity-token: secret`);
//! - the app's probes and lifecycle hooks (`httpGet` over HTTP or HTTPS, `tcpSocket`, `grpc`; app
//!   containers and native sidecars) rewritten to `:15020/app-probe/<container>/<kind>`, where
//!   the proxy performs the original check (see `outrider_proxy::app_probe`), the originals kept
//!   in the `outrider.io/original-probes` annotation.
//!
//! Everything else in the input (other documents, other fields, key order) comes back as it was.
//! A workload already injected is left alone, so injecting twice changes nothing. Bad input is an
//! [`InputError`] naming the document and the field; nothing is written then.

use std::collections::BTreeMap;
use std::str::FromStr;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapProjection, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, ObjectFieldSelector, PodSpec, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, SecretProjection, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use outrider_iptables_init::config::Port;
use outrider_iptables_init::ports;
use outrider_proxy::app_probe::{AppProbe, AppProbes, ProbeHeader, ProbeKind};
use serde_norway::{Mapping, Value};

use crate::manifest::{self, InputError, Location, Workload, WorkloadKind};
use crate::quantity::Quantity;

/// Name of the traffic-capture init container.
pub const INIT_NAME: &str = "outrider-init";
/// Name of the CNI mode's validation init container (in place of [`INIT_NAME`]).
pub const VALIDATE_NAME: &str = "outrider-cni-validate";
/// The uid the validation container runs as: not root, not the proxy's (its probe must be
/// captured).
pub const VALIDATE_UID: u32 = 2102;
/// Name of the proxy container.
pub const PROXY_NAME: &str = "outrider-proxy";
/// Name of the identity volume.
pub const IDENTITY_VOLUME: &str = "outrider-identity";
/// Where the identity volume is mounted in the proxy (read-only): `token` (the bootstrap token:
/// a projected ServiceAccount token, or the service account's Outrider token from the Secret
/// `outrider-token-<serviceaccount>`, see [`IdentityToken`]) and `trust-anchors.pem` (from the
/// ConfigMap [`TRUST_ANCHORS_CONFIGMAP`]).
pub const IDENTITY_DIR: &str = "/var/run/secrets/outrider/identity";
/// The ConfigMap with the mesh's trust anchors (key `trust-anchors.pem`), in every namespace
/// with injected workloads.
pub const TRUST_ANCHORS_CONFIGMAP: &str = "outrider-trust-anchors";
/// The Secret holding a service account's token (key `token`) is this prefix + its name.
pub const TOKEN_SECRET_PREFIX: &str = "outrider-token-";
/// The audience of the projected ServiceAccount token (the control plane's TokenReview asks
/// for it).
pub const TOKEN_AUDIENCE: &str = "outrider";
/// The projected token's lifetime, in seconds (the kubelet rotates it at 80%, reading it again
/// at each certificate renewal picks the new one up): 12 hours, as Istio's.
pub const TOKEN_EXPIRATION_SECONDS: i64 = 43_200;
/// Annotation: the proxy's bootstrap token, `projected` or `secret` (beats `--identity-token`).
pub const ANN_IDENTITY_TOKEN: &str = "outrider.io/identity-token";

/// The proxy's bootstrap token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum IdentityToken {
    /// A projected ServiceAccount token (audience [`TOKEN_AUDIENCE`], expiring after
    /// [`TOKEN_EXPIRATION_SECONDS`], rotated by the kubelet), checked by `outrider control
    /// --kubernetes` with TokenReview: nothing to create per service account.
    #[default]
    Projected,
    /// The Secret `outrider-token-<serviceaccount>` (an `outrider control token`), for control
    /// planes without the Kubernetes API (and the demo).
    Secret,
}

/// The control plane's address inside the cluster (deploy/control-plane.yaml).
pub const DEFAULT_CONTROL: &str = "https://outrider-control.outrider-system.svc:15012";
/// The default image (`docker build -t outrider:0.1.0 -f deploy/Dockerfile .`).
pub const DEFAULT_IMAGE: &str = concat!("outrider:", env!("CARGO_PKG_VERSION"));

/// Annotation: `disabled` leaves the workload alone.
pub const ANN_INJECT: &str = "outrider.io/inject";
/// Annotation written by the injector: `native` or `legacy`.
pub const ANN_INJECTED: &str = "outrider.io/injected";
/// Annotation written by the injector: the app's original probe and hook handlers (JSON: an
/// `httpGet` action as it was, other kinds as `{"tcpSocket": ...}` or `{"grpc": ...}`).
pub const ANN_ORIGINAL_PROBES: &str = "outrider.io/original-probes";
/// Annotation written by `--legacy-sidecar`: the app's init containers' original
/// `securityContext`s (JSON; `null` where there was none).
pub const ANN_ORIGINAL_INIT_SECURITY: &str = "outrider.io/original-init-security";
/// Annotation written by the injector when the pod sets pod-level `spec.resources`: the
/// original (JSON), for `--uninject`.
pub const ANN_ORIGINAL_POD_RESOURCES: &str = "outrider.io/original-pod-resources";
pub use crate::capture::{
    ANN_INCLUDE_INBOUND_PORTS, ANN_INCLUDE_OUTBOUND_CIDRS, ANN_INCLUDE_OUTBOUND_PORTS,
    ANN_SKIP_INBOUND_PORTS, ANN_SKIP_OUTBOUND_CIDRS, ANN_SKIP_OUTBOUND_PORTS, MAX_RANGE,
};
/// Annotation: `cni` captures through the node's CNI plugin (no `outrider-init`), `init` through
/// `outrider-init` even when injecting with `--cni`.
pub const ANN_CAPTURE: &str = "outrider.io/capture";
/// Annotation: ports that skip protocol detection, added to the proxy's defaults.
pub const ANN_OPAQUE_PORTS: &str = "outrider.io/opaque-ports";
/// Annotation: the proxy's log filter (`OUTRIDER_LOG`, e.g. `debug` or
/// `outrider_proxy=debug,info`).
pub const ANN_LOG_LEVEL: &str = "outrider.io/proxy-log-level";
/// Annotation: the proxy's log format, `plain` or `json` (`OUTRIDER_LOG_FORMAT`).
pub const ANN_LOG_FORMAT: &str = "outrider.io/proxy-log-format";
/// Annotation: the image of the mesh's containers for this workload (beats `--image`).
pub const ANN_IMAGE: &str = "outrider.io/proxy-image";
/// Annotation: their `imagePullPolicy`: `Always`, `IfNotPresent` (the default) or `Never`.
pub const ANN_PULL_POLICY: &str = "outrider.io/proxy-image-pull-policy";
/// Annotation: how long outbound keeps serving after SIGTERM (`OUTRIDER_DRAIN_WINDOW`, `5s`).
pub const ANN_DRAIN_WINDOW: &str = "outrider.io/proxy-drain-window";
/// Annotation: the longest graceful shutdown (`OUTRIDER_SHUTDOWN_GRACE`, `30s`).
pub const ANN_SHUTDOWN_GRACE: &str = "outrider.io/proxy-shutdown-grace";
/// Annotation: `"false"` injects this workload in the legacy form (proxy as the first
/// container), `"true"` as a native sidecar, whatever `--legacy-sidecar` says.
pub const ANN_NATIVE_SIDECAR: &str = "outrider.io/native-sidecar";
/// Written by `--legacy-sidecar` when it set `kubectl.kubernetes.io/default-container` (so
/// `kubectl logs/exec` default to the app, not the proxy in front of it).
pub const ANN_DEFAULT_CONTAINER_ADDED: &str = "outrider.io/default-container-added";
/// `kubectl logs`, `exec` and `attach` use this container when none is named.
pub const ANN_DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";

/// The proxy's resources when no annotation says otherwise: requests `100m` CPU and `128Mi`
/// memory, limits `1` CPU and `256Mi` memory (never zero: a sidecar starved of memory is
/// OOM-killed and takes the pod's network with it). Annotations
/// `outrider.io/proxy-{cpu,memory}-{request,limit}` override each.
/// `outrider.io/proxy-cpu-limit: none` removes the CPU limit (no throttling; the pod leaves
/// Guaranteed), and `outrider.io/proxy-ephemeral-storage-{request,limit}` add those (no default).
pub const PROXY_RESOURCES: [(&str, &str, &str); 6] = [
    ("outrider.io/proxy-cpu-request", "requests", "100m"),
    ("outrider.io/proxy-memory-request", "requests", "128Mi"),
    (
        "outrider.io/proxy-ephemeral-storage-request",
        "requests",
        "",
    ),
    ("outrider.io/proxy-cpu-limit", "limits", "1"),
    ("outrider.io/proxy-memory-limit", "limits", "256Mi"),
    ("outrider.io/proxy-ephemeral-storage-limit", "limits", ""),
];
/// `outrider-init`'s resources (it runs for a moment): requests `10m`/`16Mi`, limits
/// `100m`/`64Mi`.
pub const INIT_RESOURCES: [(&str, &str); 4] = [
    ("requests.cpu", "10m"),
    ("requests.memory", "16Mi"),
    ("limits.cpu", "100m"),
    ("limits.memory", "64Mi"),
];

/// How to inject.
#[derive(Debug, Clone)]
pub struct InjectOptions {
    /// The image with the `outrider` binary.
    pub image: String,
    /// The control plane URL given to the proxy.
    pub control: String,
    /// The pre-1.29 form: the proxy as the first regular container.
    pub legacy_sidecar: bool,
    /// Inject what is otherwise skipped with a warning: workloads in `kube-system` or
    /// `kube-public`, and pods that another mesh (Istio, Linkerd) has injected or will inject.
    pub force: bool,
    /// CNI mode: no `outrider-init`, a validation init container instead.
    pub cni: bool,
    /// The proxy's bootstrap token.
    pub identity_token: IdentityToken,
}

impl Default for InjectOptions {
    fn default() -> Self {
        InjectOptions {
            image: DEFAULT_IMAGE.into(),
            control: DEFAULT_CONTROL.into(),
            legacy_sidecar: false,
            force: false,
            cni: false,
            identity_token: IdentityToken::Projected,
        }
    }
}

/// The result: the YAML to print and the warnings for stderr.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// The documents, as YAML.
    pub yaml: String,
    /// One line each: a workload skipped, a probe left as it was, ...
    pub warnings: Vec<String>,
}

/// Injects every workload of the YAML stream `text`.
pub fn inject(text: &str, opts: &InjectOptions) -> Result<Output, InputError> {
    let mut warnings = Vec::new();
    let yaml = manifest::transform(text, |at, object| {
        inject_object(at, object, opts, &mut warnings)
    })?;
    Ok(Output { yaml, warnings })
}

/// Takes the mesh out of every workload of `text` (the inverse of [`inject`]).
pub fn uninject(text: &str) -> Result<Output, InputError> {
    let yaml = manifest::transform(text, uninject_object)?;
    Ok(Output {
        yaml,
        warnings: Vec::new(),
    })
}

/// Injects every workload of parsed documents in place.
pub fn inject_docs(
    docs: &mut [Value],
    opts: &InjectOptions,
    warnings: &mut Vec<String>,
) -> Result<(), InputError> {
    manifest::for_each_object(docs, |at, object| inject_object(at, object, opts, warnings))
}

/// Whether a pod spec already holds the injected containers.
pub fn is_injected(pod: &PodSpec) -> bool {
    let named =
        |c: &Container| c.name == INIT_NAME || c.name == PROXY_NAME || c.name == VALIDATE_NAME;
    pod.containers.iter().any(named) || pod.init_containers.iter().flatten().any(named)
}

/// Injects one object (a workload; anything else is left alone).
pub(crate) fn inject_object(
    at: &Location,
    object: &mut Value,
    opts: &InjectOptions,
    warnings: &mut Vec<String>,
) -> Result<(), InputError> {
    let Some(kind) = WorkloadKind::of(object) else {
        // A custom resource with a pod template (Argo Rollout, OpenShift DeploymentConfig).
        let containers = object
            .get("spec")
            .and_then(|s| s.get("template"))
            .and_then(|t| t.get("spec"))
            .and_then(|s| s.get("containers"));
        if containers.is_some_and(Value::is_sequence) {
            let kind = object.get("kind").and_then(Value::as_str).unwrap_or("?");
            warnings.push(format!(
                "{at} ({}): a {} with a pod template outrider inject does not know; left as it is",
                crate::wait::safe(kind),
                crate::wait::safe(kind)
            ));
        }
        return Ok(());
    };
    let w = Workload::check(kind, object, at)?;
    let pfx = manifest::prefix(kind);
    let what = format!("{at} ({:?} {})", kind, w.name);
    let template = manifest::template_mut(object, kind)
        .ok_or_else(|| at.error(pfx.trim_end_matches('.'), "missing pod template"))?;
    let ann = Annotations::read(template, &pfx);
    match ann.get(ANN_INJECT) {
        Some((_, v)) if v == "disabled" => {
            warnings.push(format!("{what}: {ANN_INJECT}: disabled, left as it is"));
            return Ok(());
        }
        Some((path, v)) if v != "enabled" => {
            return Err(at.error(path, format!("`{v}` is neither `enabled` nor `disabled`")));
        }
        _ => {}
    }
    if w.pod.host_network == Some(true) {
        warnings.push(format!(
            "{what}: hostNetwork: true, left as it is (capturing traffic would capture the node's)"
        ));
        return Ok(());
    }
    if w.pod.os.as_ref().is_some_and(|os| os.name == "windows") {
        warnings.push(format!(
            "{what}: spec.os.name: windows, left as it is (the proxy and its capture are Linux only)"
        ));
        return Ok(());
    }
    if is_injected(&w.pod) {
        return reinject(at, object, opts, &what, warnings);
    }
    unknown_fields(&w.pod, template, &pfx, &what, warnings);
    if !opts.force {
        if let Some(mesh) = other_mesh(&w.pod, template) {
            warnings.push(format!(
                "{what}: {mesh}; left as it is (two meshes would both capture the pod's \
                 traffic; --force injects anyway)"
            ));
            return Ok(());
        }
        let ns = w.namespace.as_deref().unwrap_or_default();
        if ns == "kube-system" || ns == "kube-public" {
            warnings.push(format!(
                "{what}: in {ns}, left as it is (the cluster's own components stay out of the \
                 mesh; --force injects anyway)"
            ));
            return Ok(());
        }
    }
    check_ports(&w.pod, &pfx, at)?;
    let legacy = match ann.get(ANN_NATIVE_SIDECAR) {
        None => opts.legacy_sidecar,
        Some((_, v)) if v == "true" => false,
        Some((_, v)) if v == "false" => true,
        Some((path, v)) => return Err(at.error(path, format!("`{v}` is neither true nor false"))),
    };
    let opts = &InjectOptions {
        legacy_sidecar: legacy,
        ..opts.clone()
    };
    let guaranteed = crate::resources::qos(&w.pod, w.pod_resources.as_ref())
        == crate::resources::Qos::Guaranteed
        && w.pod_resources.is_none();
    let cni = match ann.get(ANN_CAPTURE) {
        None => opts.cni,
        Some((_, v)) if v == "cni" => true,
        Some((_, v)) if v == "init" => false,
        Some((path, v)) => {
            return Err(at.error(path, format!("`{v}` is not a capture mode (cni or init)")))
        }
    };
    let mut init = if cni {
        validate_container(&ann, opts, at)?
    } else {
        init_container(&ann, opts, at)?
    };
    let probes = app_probes(&w.pod, &pfx, at, &what, warnings)?;
    let proxy = proxy_container(&w, &ann, &probes, opts, at)?;
    if guaranteed {
        // A Guaranteed pod stays Guaranteed only if every container requests its limits: the
        // capture container's cost nothing (it runs for a moment); the proxy's are the user's
        // call.
        if let Some(res) = init.resources.as_mut() {
            res.requests.clone_from(&res.limits);
        }
        let res = proxy.resources.clone().unwrap_or_default();
        if res.requests != res.limits {
            warnings.push(format!(
                "{what}: the pod is Guaranteed and the proxy's requests are below its limits, \
                 so it becomes Burstable (evicted earlier, no exclusive CPUs): set \
                 outrider.io/proxy-cpu-request = outrider.io/proxy-cpu-limit and \
                 outrider.io/proxy-memory-request = outrider.io/proxy-memory-limit to keep it \
                 Guaranteed"
            ));
        }
    }
    let to_value = |c: &Container| {
        serde_norway::to_value(c).map_err(|e| at.error(&pfx, format!("cannot write: {e}")))
    };
    let (init, proxy) = (to_value(&init)?, to_value(&proxy)?);
    let volume = serde_norway::to_value(identity_volume(&w.pod, &ann, opts, at)?)
        .map_err(|e| at.error(&pfx, format!("cannot write: {e}")))?;

    let mut annotations: Vec<(&str, String)> = vec![(
        ANN_INJECTED,
        if opts.legacy_sidecar {
            "legacy"
        } else {
            "native"
        }
        .into(),
    )];
    let spec = manifest::child_map(template, "spec").ok_or_else(|| at.error(&pfx, "no spec"))?;
    let originals = rewrite_probes(spec, &probes);
    if !originals.is_empty() {
        let saved = json(&Value::Mapping(originals), at, &pfx)?;
        annotations.push((ANN_ORIGINAL_PROBES, saved));
    }
    if opts.legacy_sidecar {
        if kind.runs_to_completion() {
            warnings.push(format!(
                "{what}: with --legacy-sidecar the proxy keeps the pod running after the job's \
                 containers finish: have the job POST 127.0.0.1:15020/shutdown when it is done"
            ));
        }
        let saved = run_init_containers_as_proxy(spec);
        if !saved.is_empty() {
            let saved = json(&Value::Mapping(saved), at, &pfx)?;
            annotations.push((ANN_ORIGINAL_INIT_SECURITY, saved));
        }
        let inits = manifest::child_seq(spec, "initContainers")
            .ok_or_else(|| at.error(format!("{pfx}spec.initContainers"), "must be a list"))?;
        inits.insert(0, init);
        let containers = manifest::child_seq(spec, "containers")
            .ok_or_else(|| at.error(format!("{pfx}spec.containers"), "must be a list"))?;
        containers.insert(0, proxy);
        if let (None, Some(app)) = (ann.get(ANN_DEFAULT_CONTAINER), w.pod.containers.first()) {
            annotations.push((ANN_DEFAULT_CONTAINER, app.name.clone()));
            annotations.push((ANN_DEFAULT_CONTAINER_ADDED, "true".into()));
        }
    } else {
        let inits = manifest::child_seq(spec, "initContainers")
            .ok_or_else(|| at.error(format!("{pfx}spec.initContainers"), "must be a list"))?;
        inits.insert(0, proxy);
        inits.insert(0, init);
    }
    manifest::child_seq(spec, "volumes")
        .ok_or_else(|| at.error(format!("{pfx}spec.volumes"), "must be a list"))?
        .push(volume);
    let meta = manifest::child_map(template, "metadata")
        .ok_or_else(|| at.error(format!("{pfx}metadata"), "must be a mapping"))?;
    let map = manifest::child_map(meta, "annotations")
        .ok_or_else(|| at.error(format!("{pfx}metadata.annotations"), "must be a mapping"))?;
    for (k, v) in annotations {
        map.insert(k.into(), Value::String(v));
    }
    if w.pod_resources.is_some() {
        pod_level_resources(at, object, kind, &what, warnings)?;
    }
    Ok(())
}

/// An injected workload injected again: taken out and put back with the current options, so a
/// new `--image`, annotations or sidecar form take effect; left byte for byte when nothing
/// changes.
fn reinject(
    at: &Location,
    object: &mut Value,
    opts: &InjectOptions,
    what: &str,
    warnings: &mut Vec<String>,
) -> Result<(), InputError> {
    let mut fresh = object.clone();
    uninject_object(at, &mut fresh)?;
    let Some(kind) = WorkloadKind::of(&fresh) else {
        return Ok(());
    };
    if is_injected(&Workload::check(kind, &fresh, at)?.pod) {
        return Err(at.error(
            format!("{}spec", manifest::prefix(kind)),
            format!("has more than one set of {INIT_NAME}/{PROXY_NAME} containers"),
        ));
    }
    let mut inner = Vec::new();
    inject_object(at, &mut fresh, opts, &mut inner)?;
    if fresh != *object {
        *object = fresh;
        warnings.push(format!(
            "{what}: already injected; updated to this run's image, options and annotations"
        ));
        warnings.extend(inner);
    }
    Ok(())
}

/// Fields of the pod spec and its containers that Kubernetes 1.30 does not know, each named
/// in a warning: a misspelled `readinessprobe` is neither rewritten nor refused otherwise
/// (kubectl's strict validation would refuse it). Newer fields are kept as they are.
fn unknown_fields(
    pod: &PodSpec,
    template: &Mapping,
    pfx: &str,
    what: &str,
    warnings: &mut Vec<String>,
) {
    fn known(typed: &impl serde::Serialize) -> Vec<String> {
        match serde_json::to_value(typed) {
            Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }
    let mut report = |path: String, given: Option<&Value>, known: &[String], extra: &[&str]| {
        let Some(Value::Mapping(given)) = given else {
            return;
        };
        for (k, v) in given {
            let Some(k) = k.as_str() else { continue };
            if !v.is_null() && !known.iter().any(|n| n == k) && !extra.contains(&k) {
                warnings.push(format!(
                    "{what}: {path}.{k}: not a field Kubernetes 1.30 knows (misspelled? kubectl \
                     --validate=strict refuses unknown fields); left as it is"
                ));
            }
        }
    };
    let spec = template.get("spec");
    report(format!("{pfx}spec"), spec, &known(pod), &["resources"]);
    for (list, containers) in [
        ("containers", Some(&pod.containers)),
        ("initContainers", pod.init_containers.as_ref()),
    ] {
        for (i, c) in containers.into_iter().flatten().enumerate() {
            let given = spec.and_then(|s| s.get(list)).and_then(|l| l.get(i));
            report(format!("{pfx}spec.{list}[{i}]"), given, &known(c), &[]);
        }
    }
}

/// Another mesh's sidecar in the pod, or the annotation that has its webhook add one.
fn other_mesh(pod: &PodSpec, template: &Mapping) -> Option<String> {
    const SIDECARS: [&str; 4] = ["istio-proxy", "istio-init", "linkerd-proxy", "linkerd-init"];
    let containers = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten());
    if let Some(c) = containers
        .map(|c| c.name.as_str())
        .find(|n| SIDECARS.contains(n))
    {
        return Some(format!("already has another mesh's sidecar `{c}`"));
    }
    let meta = template.get("metadata");
    let field = |map: &str, key: &str| {
        meta.and_then(|m| m.get(map))
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    for (map, key, injects) in [
        ("annotations", "sidecar.istio.io/status", None),
        ("annotations", "linkerd.io/proxy-version", None),
        ("annotations", "linkerd.io/inject", Some("enabled")),
        ("labels", "sidecar.istio.io/inject", Some("true")),
        ("annotations", "sidecar.istio.io/inject", Some("true")),
    ] {
        if let Some(v) = field(map, key) {
            if injects.is_none_or(|want| v == want) {
                return Some(format!("its {map} have `{key}: {v}` (another mesh)"));
            }
        }
    }
    None
}

/// App ports the proxy binds itself are an error: the proxy could not start.
fn check_ports(pod: &PodSpec, pfx: &str, at: &Location) -> Result<(), InputError> {
    let ours = [
        (ports::INBOUND, "inbound"),
        (ports::OUTBOUND, "outbound"),
        (ports::ADMIN, "admin"),
    ];
    let none = Vec::new();
    let lists = [
        ("containers", &pod.containers),
        (
            "initContainers",
            pod.init_containers.as_ref().unwrap_or(&none),
        ),
    ];
    for (list, containers) in lists {
        for (i, c) in containers.iter().enumerate() {
            for (j, p) in c.ports.iter().flatten().enumerate() {
                if let Some((port, name)) = ours
                    .iter()
                    .find(|(port, _)| i32::from(*port) == p.container_port)
                {
                    return Err(at.error(
                        format!("{pfx}spec.{list}[{i}].ports[{j}].containerPort"),
                        format!("{port} is the proxy's {name} port: move the app off it"),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Pod-level `spec.resources` (Kubernetes 1.32+): the API server refuses a pod whose containers
/// request more than it, so the proxy's requests and limits are added to the pod's own (the app
/// keeps its share), raised further to the containers' aggregate where needed; a warning says
/// what changed, and the original is kept for `--uninject`.
fn pod_level_resources(
    at: &Location,
    object: &mut Value,
    kind: WorkloadKind,
    what: &str,
    warnings: &mut Vec<String>,
) -> Result<(), InputError> {
    let pfx = manifest::prefix(kind);
    let w = Workload::check(kind, object, at)?;
    let Some(pod_res) = w.pod_resources.clone() else {
        return Ok(());
    };
    let report = crate::resources::report(&w, at)?;
    let proxy = report
        .rows
        .iter()
        .find(|r| r.name == PROXY_NAME)
        .cloned()
        .ok_or_else(|| at.error(&pfx, "no proxy after injection"))?;
    let template = manifest::template_mut(object, kind)
        .ok_or_else(|| at.error(pfx.trim_end_matches('.'), "missing pod template"))?;
    let spec = manifest::child_map(template, "spec").ok_or_else(|| at.error(&pfx, "no spec"))?;
    let original = spec.get("resources").cloned().unwrap_or(Value::Null);
    let mut changed = Vec::new();
    for (side, pod_side) in [("requests", &pod_res.requests), ("limits", &pod_res.limits)] {
        for (r, name) in crate::resources::RESOURCES.iter().enumerate() {
            let Some(current) = pod_side.as_ref().and_then(|m| m.get(*name)) else {
                continue;
            };
            let path = format!("{pfx}spec.resources.{side}.{name}");
            let current: Quantity = current
                .0
                .parse()
                .map_err(|e| at.error(&path, format!("{e}")))?;
            let (add, floor) = if side == "requests" {
                (proxy.requests[r], report.pod[r])
            } else {
                (proxy.limits[r], Quantity::ZERO)
            };
            let new = (current + add.unwrap_or_default()).max(floor);
            if new == current {
                continue;
            }
            let text = if r == 0 {
                new.cpu()
            } else {
                new.memory_exact()
            };
            let from = if r == 0 {
                current.cpu()
            } else {
                current.memory()
            };
            changed.push(format!("{side}.{name} {from} → {text}"));
            let res = manifest::child_map(spec, "resources")
                .and_then(|m| manifest::child_map(m, side))
                .ok_or_else(|| at.error(&path, "must be a mapping"))?;
            res.insert((*name).into(), Value::String(text));
        }
    }
    if changed.is_empty() {
        return Ok(());
    }
    warnings.push(format!(
        "{what}: pod-level spec.resources raised for the proxy: {}",
        changed.join(", ")
    ));
    let saved = json(&original, at, &pfx)?;
    let meta = manifest::child_map(template, "metadata")
        .and_then(|m| manifest::child_map(m, "annotations"))
        .ok_or_else(|| at.error(format!("{pfx}metadata.annotations"), "must be a mapping"))?;
    meta.insert(ANN_ORIGINAL_POD_RESOURCES.into(), Value::String(saved));
    Ok(())
}

/// The pod template's annotations, with the field path of each for error messages.
struct Annotations(BTreeMap<String, (String, String)>);

impl Annotations {
    fn read(template: &Mapping, pfx: &str) -> Annotations {
        let mut out = BTreeMap::new();
        if let Some(Value::Mapping(m)) = template.get("metadata").and_then(|m| m.get("annotations"))
        {
            for (k, v) in m {
                if let (Some(k), Some(v)) = (k.as_str(), v.as_str()) {
                    let path = format!("{pfx}metadata.annotations[\"{k}\"]");
                    out.insert(k.to_owned(), (path, v.to_owned()));
                }
            }
        }
        Annotations(out)
    }

    fn get(&self, key: &str) -> Option<&(String, String)> {
        self.0.get(key)
    }

    /// A comma-separated list of `T`, each checked.
    fn list<T: FromStr>(&self, key: &str, at: &Location) -> Result<Vec<T>, InputError>
    where
        T::Err: std::fmt::Display,
    {
        let Some((path, value)) = self.get(key) else {
            return Ok(Vec::new());
        };
        value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<T>().map_err(|e| at.error(path, e.to_string())))
            .collect()
    }
}

/// What the injector saves in an annotation, as JSON (YAML keys that are not strings cannot be).
fn json(value: &Value, at: &Location, pfx: &str) -> Result<String, InputError> {
    serde_json::to_string(value).map_err(|e| {
        at.error(
            format!("{pfx}spec"),
            format!("cannot be saved for --uninject: {e}"),
        )
    })
}

/// The CNI mode's init container: `outrider cni validate`, non-root (uid [`VALIDATE_UID`]), no
/// capabilities, its probe on a port the pod's `skip-outbound-ports` do not exempt.
fn validate_container(
    ann: &Annotations,
    opts: &InjectOptions,
    at: &Location,
) -> Result<Container, InputError> {
    let capture = capture(ann, at)?;
    let probe = capture.probe_target().ok_or_else(|| {
        let key = ANN_INCLUDE_OUTBOUND_CIDRS;
        let path = ann.get(key).map_or(key, |(p, _)| p.as_str());
        at.error(
            path,
            "CNI mode checks the capture with an IPv4 probe, but these annotations capture no \
             IPv4 destination outside the pod",
        )
    })?;
    let mut c = init_container(ann, opts, at)?;
    c.name = VALIDATE_NAME.into();
    c.args = Some(vec![
        "cni".into(),
        "validate".into(),
        "--outbound-port".into(),
        ports::OUTBOUND.to_string(),
        "--probe".into(),
        probe.to_string(),
    ]);
    c.security_context = Some(unprivileged(VALIDATE_UID));
    Ok(c)
}

/// Non-root as `uid`, no capabilities, read-only root, `RuntimeDefault` seccomp: what Pod
/// Security `restricted` asks of a container.
fn unprivileged(uid: u32) -> SecurityContext {
    SecurityContext {
        run_as_user: Some(i64::from(uid)),
        run_as_group: Some(i64::from(uid)),
        run_as_non_root: Some(true),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        seccomp_profile: Some(runtime_default()),
        ..Default::default()
    }
}

fn init_container(
    ann: &Annotations,
    opts: &InjectOptions,
    at: &Location,
) -> Result<Container, InputError> {
    let mut args = vec!["init".to_owned()];
    args.extend_from_slice(capture(ann, at)?.args());
    let mut resources = ResourceRequirements::default();
    for (key, value) in INIT_RESOURCES {
        let (side, name) = key.split_once('.').unwrap_or((key, key));
        let map = if side == "requests" {
            resources.requests.get_or_insert_with(BTreeMap::new)
        } else {
            resources.limits.get_or_insert_with(BTreeMap::new)
        };
        map.insert(name.into(), K8sQuantity(value.into()));
    }
    let (image, pull) = image(ann, opts, at)?;
    Ok(Container {
        name: INIT_NAME.into(),
        image: Some(image),
        image_pull_policy: Some(pull),
        args: Some(args),
        resources: Some(resources),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            // iptables takes its lock under /run: the root filesystem stays writable here.
            read_only_root_filesystem: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            seccomp_profile: Some(runtime_default()),
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".into(),
        ..Default::default()
    }
}

fn proxy_container(
    w: &Workload,
    ann: &Annotations,
    probes: &AppProbes,
    opts: &InjectOptions,
    at: &Location,
) -> Result<Container, InputError> {
    let field = |name: &str, path: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let plain = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..Default::default()
    };
    let mut env = vec![
        field("POD_NAMESPACE", "metadata.namespace"),
        field("POD_NAME", "metadata.name"),
        field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        plain("OUTRIDER_WORKLOAD", format!("$(POD_NAMESPACE)/{}", w.name)),
        plain("OUTRIDER_CONTROL", opts.control.clone()),
        plain("OUTRIDER_ADMIN", format!("0.0.0.0:{}", ports::ADMIN)),
        plain(
            "OUTRIDER_IDENTITY_TOKEN_FILE",
            format!("{IDENTITY_DIR}/token"),
        ),
        plain(
            "OUTRIDER_TRUST_ANCHORS",
            format!("{IDENTITY_DIR}/trust-anchors.pem"),
        ),
    ];
    if let Some((path, level)) = ann.get(ANN_LOG_LEVEL) {
        outrider_proxy::log::check_filter(level).map_err(|e| at.error(path, e))?;
        env.push(plain("OUTRIDER_LOG", level.trim().to_owned()));
    }
    match ann.get(ANN_LOG_FORMAT) {
        Some((_, f)) if f == "plain" || f == "json" => {
            env.push(plain("OUTRIDER_LOG_FORMAT", f.clone()));
        }
        Some((path, f)) => return Err(at.error(path, format!("`{f}` is neither plain nor json"))),
        None => {}
    }
    for (key, var) in [
        (ANN_DRAIN_WINDOW, "OUTRIDER_DRAIN_WINDOW"),
        (ANN_SHUTDOWN_GRACE, "OUTRIDER_SHUTDOWN_GRACE"),
    ] {
        if let Some((path, d)) = ann.get(key) {
            outrider_proxy::config::parse_duration(d.trim()).map_err(|e| at.error(path, e))?;
            env.push(plain(var, d.trim().to_owned()));
        }
    }
    let opaque: Vec<Port> = ann.list(ANN_OPAQUE_PORTS, at)?;
    if !opaque.is_empty() {
        let mut all: Vec<u16> = outrider_proxy::config::DEFAULT_OPAQUE_PORTS.to_vec();
        all.extend(opaque.iter().map(|p| p.get()));
        all.sort_unstable();
        all.dedup();
        env.push(plain("OUTRIDER_OPAQUE_PORTS", crate::capture::join(&all)));
    }
    if !probes.is_empty() {
        let table = serde_json::to_string(probes).map_err(|e| at.error("", e.to_string()))?;
        env.push(plain(outrider_proxy::app_probe::ENV, table));
    }
    let admin_get = |path: &str| HTTPGetAction {
        path: Some(path.into()),
        port: IntOrString::Int(i32::from(ports::ADMIN)),
        ..Default::default()
    };
    let (image, pull) = image(ann, opts, at)?;
    Ok(Container {
        name: PROXY_NAME.into(),
        image: Some(image),
        image_pull_policy: Some(pull),
        // Fail closed until the first view, stated in the pod (docs/security.md says why).
        args: Some(
            ["proxy", "--default-inbound-policy", "deny"]
                .map(Into::into)
                .to_vec(),
        ),
        restart_policy: (!opts.legacy_sidecar).then(|| "Always".into()),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("outrider-admin".into()),
            container_port: i32::from(ports::ADMIN),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: Some(proxy_resources(ann, at)?),
        startup_probe: Some(Probe {
            http_get: Some(admin_get("/ready")),
            period_seconds: Some(1),
            failure_threshold: Some(120),
            ..Default::default()
        }),
        liveness_probe: Some(Probe {
            http_get: Some(admin_get("/live")),
            period_seconds: Some(10),
            ..Default::default()
        }),
        // Not ready while draining or without a certificate or config: the pod leaves the
        // Service's endpoints.
        readiness_probe: Some(Probe {
            http_get: Some(admin_get("/ready")),
            period_seconds: Some(5),
            ..Default::default()
        }),
        security_context: Some(unprivileged(ports::PROXY_UID)),
        volume_mounts: Some(vec![VolumeMount {
            name: IDENTITY_VOLUME.into(),
            mount_path: IDENTITY_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        }]),
        ..Default::default()
    })
}

/// The proxy's requests and limits: defaults, overridden by annotations, each a valid non-zero
/// quantity and no request above its limit.
fn proxy_resources(ann: &Annotations, at: &Location) -> Result<ResourceRequirements, InputError> {
    let mut parsed = BTreeMap::new();
    for (key, side, default) in PROXY_RESOURCES {
        let (path, text) = match ann.get(key) {
            Some((path, v)) => (path.clone(), v.trim().to_owned()),
            None => (String::new(), default.to_owned()),
        };
        let resource = ["cpu", "memory", "ephemeral-storage"]
            .into_iter()
            .find(|r| key.contains(r))
            .unwrap_or("cpu");
        if text.is_empty() || (key == "outrider.io/proxy-cpu-limit" && text == "none") {
            continue;
        }
        let q: Quantity = text.parse().map_err(|e| at.error(&path, format!("{e}")))?;
        if q.is_zero() {
            return Err(at.error(
                path,
                "must be more than 0 (a starved proxy takes the pod's network with it)",
            ));
        }
        parsed.insert((side, resource), (q, text, path));
    }
    let mut req = ResourceRequirements::default();
    for resource in ["cpu", "memory", "ephemeral-storage"] {
        if let (Some(r), Some(l)) = (
            parsed.get(&("requests", resource)),
            parsed.get(&("limits", resource)),
        ) {
            if r.0 > l.0 {
                let path = if r.2.is_empty() { &l.2 } else { &r.2 };
                return Err(at.error(
                    path,
                    format!("{resource} request {} is above its limit {}", r.1, l.1),
                ));
            }
        }
    }
    for ((side, resource), (_, text, _)) in parsed {
        let map = if side == "requests" {
            req.requests.get_or_insert_with(BTreeMap::new)
        } else {
            req.limits.get_or_insert_with(BTreeMap::new)
        };
        map.insert(resource.into(), K8sQuantity(text));
    }
    Ok(req)
}

/// The image and pull policy of the mesh's containers: annotations, else the options.
fn image(
    ann: &Annotations,
    opts: &InjectOptions,
    at: &Location,
) -> Result<(String, String), InputError> {
    let image = match ann.get(ANN_IMAGE) {
        Some((path, v)) if v.trim().is_empty() || v.contains(char::is_whitespace) => {
            return Err(at.error(path, "must be an image reference"));
        }
        Some((_, v)) => v.clone(),
        None => opts.image.clone(),
    };
    let policy = match ann.get(ANN_PULL_POLICY) {
        Some((_, v)) if ["Always", "IfNotPresent", "Never"].contains(&v.as_str()) => v.clone(),
        Some((path, v)) => {
            return Err(at.error(path, format!("`{v}` is not Always, IfNotPresent or Never")))
        }
        None => "IfNotPresent".into(),
    };
    Ok((image, policy))
}

/// The pod's capture settings from its annotations (shared with the CNI plugin), an error
/// naming the annotation at fault.
fn capture(ann: &Annotations, at: &Location) -> Result<crate::capture::Capture, InputError> {
    crate::capture::Capture::from_annotations(|k| ann.get(k).map(|(_, v)| v.as_str())).map_err(
        |e| {
            let path = ann
                .get(e.annotation)
                .map_or(e.annotation, |(p, _)| p.as_str());
            at.error(path, e.message)
        },
    )
}

/// The `outrider-identity` volume: the bootstrap token (see [`IdentityToken`]; the annotation
/// beats the options) and the trust anchors.
fn identity_volume(
    pod: &PodSpec,
    ann: &Annotations,
    opts: &InjectOptions,
    at: &Location,
) -> Result<Volume, InputError> {
    let kind = match ann.get(ANN_IDENTITY_TOKEN) {
        None => opts.identity_token,
        Some((_, v)) if v == "projected" => IdentityToken::Projected,
        Some((_, v)) if v == "secret" => IdentityToken::Secret,
        Some((path, v)) => {
            return Err(at.error(path, format!("`{v}` is neither projected nor secret")))
        }
    };
    let key = |key: &str| KeyToPath {
        key: key.into(),
        path: key.into(),
        ..Default::default()
    };
    let token = match kind {
        IdentityToken::Projected => VolumeProjection {
            service_account_token: Some(ServiceAccountTokenProjection {
                audience: Some(TOKEN_AUDIENCE.into()),
                expiration_seconds: Some(TOKEN_EXPIRATION_SECONDS),
                path: "token".into(),
            }),
            ..Default::default()
        },
        IdentityToken::Secret => {
            let account = pod
                .service_account_name
                .clone()
                .or_else(|| pod.service_account.clone()) // the deprecated alias
                .filter(|a| !a.is_empty())
                .unwrap_or_else(|| "default".into());
            VolumeProjection {
                secret: Some(SecretProjection {
                    name: format!("{TOKEN_SECRET_PREFIX}{account}"),
                    items: Some(vec![key("token")]),
                    ..Default::default()
                }),
                ..Default::default()
            }
        }
    };
    Ok(Volume {
        name: IDENTITY_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![
                token,
                VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: TRUST_ANCHORS_CONFIGMAP.into(),
                        items: Some(vec![key("trust-anchors.pem")]),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Where a container's checks sit: the key suffix (`<container>/<kind>`) and the field path
/// of the handler's mapping (a probe, or a lifecycle hook under `lifecycle`).
const CHECKS: [(&str, &[&str]); 5] = [
    ("liveness", &["livenessProbe"]),
    ("readiness", &["readinessProbe"]),
    ("startup", &["startupProbe"]),
    ("post-start", &["lifecycle", "postStart"]),
    ("pre-stop", &["lifecycle", "preStop"]),
];

/// The handler kinds the proxy performs in the kubelet's place.
const HANDLERS: [&str; 3] = ["httpGet", "tcpSocket", "grpc"];

/// The containers whose checks are forwarded: app containers and native sidecars (init
/// containers with `restartPolicy: Always`), with their field path.
fn checked_containers<'a>(
    pod: &'a PodSpec,
    pfx: &'a str,
) -> impl Iterator<Item = (String, &'a Container)> + 'a {
    let sidecars = pod.init_containers.iter().flatten().enumerate();
    let sidecars = sidecars
        .filter(|(_, c)| c.restart_policy.as_deref() == Some("Always"))
        .map(move |(i, c)| (format!("{pfx}spec.initContainers[{i}]"), c));
    let apps = pod.containers.iter().enumerate();
    let apps = apps.map(move |(i, c)| (format!("{pfx}spec.containers[{i}]"), c));
    apps.chain(sidecars)
}

/// A container's named port.
fn resolve_port(c: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).ok().filter(|p| *p != 0),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .filter(|p| *p != 0),
    }
}

/// The app's probes and lifecycle hooks the proxy performs (`<container>/<kind>` → target):
/// `httpGet` (HTTP or HTTPS), `tcpSocket` and `grpc`; `exec` and `sleep` stay with the kubelet.
/// A check aimed at another `host` is left as it is, with a warning.
fn app_probes(
    pod: &PodSpec,
    pfx: &str,
    at: &Location,
    what: &str,
    warnings: &mut Vec<String>,
) -> Result<AppProbes, InputError> {
    let mut table = AppProbes::new();
    for (cpath, c) in checked_containers(pod, pfx) {
        let lifecycle = c.lifecycle.as_ref();
        for (kind, field) in CHECKS {
            let (http, tcp, grpc) = match kind {
                "post-start" | "pre-stop" => {
                    let h = lifecycle.and_then(|l| {
                        if kind == "post-start" {
                            l.post_start.as_ref()
                        } else {
                            l.pre_stop.as_ref()
                        }
                    });
                    let Some(h) = h else { continue };
                    (h.http_get.as_ref(), h.tcp_socket.as_ref(), None)
                }
                _ => {
                    let p = match kind {
                        "liveness" => &c.liveness_probe,
                        "readiness" => &c.readiness_probe,
                        _ => &c.startup_probe,
                    };
                    let Some(p) = p else { continue };
                    (p.http_get.as_ref(), p.tcp_socket.as_ref(), p.grpc.as_ref())
                }
            };
            let path = format!("{cpath}.{}", field.join("."));
            let port_error = |handler: &str| {
                at.error(
                    format!("{path}.{handler}.port"),
                    "not a port number nor the name of one of the container's ports",
                )
            };
            let probe = if let Some(get) = http {
                if get.host.as_deref().is_some_and(|h| !h.is_empty()) {
                    warnings.push(format!(
                        "{what}: {path}.httpGet: a probe of another host is not forwarded by \
                         the proxy; left as it is"
                    ));
                    continue;
                }
                let kind = match get.scheme.as_deref() {
                    None | Some("HTTP") => ProbeKind::Http,
                    Some("HTTPS") => ProbeKind::Https,
                    Some(other) => {
                        return Err(at.error(
                            format!("{path}.httpGet.scheme"),
                            format!("`{other}` is neither HTTP nor HTTPS"),
                        ))
                    }
                };
                AppProbe {
                    kind,
                    port: resolve_port(c, &get.port).ok_or_else(|| port_error("httpGet"))?,
                    path: match get.path.as_deref() {
                        Some(p) if p.starts_with('/') => p.into(),
                        Some(p) => format!("/{p}"),
                        None => "/".into(),
                    },
                    service: None,
                    headers: get
                        .http_headers
                        .iter()
                        .flatten()
                        .map(|h| ProbeHeader {
                            name: h.name.clone(),
                            value: h.value.clone(),
                        })
                        .collect(),
                }
            } else if let Some(tcp) = tcp {
                if tcp.host.as_deref().is_some_and(|h| !h.is_empty()) {
                    warnings.push(format!(
                        "{what}: {path}.tcpSocket: a probe of another host is not forwarded by \
                         the proxy; left as it is"
                    ));
                    continue;
                }
                AppProbe {
                    kind: ProbeKind::Tcp,
                    port: resolve_port(c, &tcp.port).ok_or_else(|| port_error("tcpSocket"))?,
                    ..AppProbe::default()
                }
            } else if let Some(grpc) = grpc {
                AppProbe {
                    kind: ProbeKind::Grpc,
                    port: u16::try_from(grpc.port)
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| {
                            at.error(format!("{path}.grpc.port"), "not a port number")
                        })?,
                    service: grpc.service.clone().filter(|s| !s.is_empty()),
                    ..AppProbe::default()
                }
            } else {
                continue;
            };
            table.insert(format!("{}/{kind}", c.name), probe);
        }
    }
    Ok(table)
}

/// The mapping at `path` under `map`, if there is one.
fn mapping_at<'a>(map: &'a mut Mapping, path: &[&str]) -> Option<&'a mut Mapping> {
    let mut m = map;
    for key in path {
        m = m.get_mut(*key)?.as_mapping_mut()?;
    }
    Some(m)
}

/// Replaces the entry `old` of `map` by `new` = `value` at the same place (key order kept).
fn replace_entry(map: &mut Mapping, old: &str, new: &str, value: Value) {
    let entries = std::mem::take(map);
    *map = entries
        .into_iter()
        .map(|(k, v)| {
            if k.as_str() == Some(old) {
                (Value::from(new), value.clone())
            } else {
                (k, v)
            }
        })
        .collect();
}

/// The container mappings of a pod spec whose checks may be forwarded.
fn container_maps(spec: &mut Mapping) -> impl Iterator<Item = &mut Mapping> {
    spec.iter_mut()
        .filter(|(k, _)| matches!(k.as_str(), Some("containers" | "initContainers")))
        .filter_map(|(_, v)| v.as_sequence_mut())
        .flatten()
        .filter_map(Value::as_mapping_mut)
}

/// Points each check in `probes` at the admin port (an `httpGet` in place of its handler);
/// returns the original handlers as they were written, by `<container>/<kind>`, for the
/// annotation: an `httpGet` action as it is, another kind as `{tcpSocket: ...}`/`{grpc: ...}`.
fn rewrite_probes(spec: &mut Mapping, probes: &AppProbes) -> Mapping {
    let mut originals = Mapping::new();
    for c in container_maps(spec) {
        let Some(name) = c.get("name").and_then(Value::as_str).map(str::to_owned) else {
            continue;
        };
        for (kind, field) in CHECKS {
            let key = format!("{name}/{kind}");
            if !probes.contains_key(&key) {
                continue;
            }
            let Some(handler) = mapping_at(c, field) else {
                continue;
            };
            let Some(old) = HANDLERS.into_iter().find(|h| handler.contains_key(*h)) else {
                continue;
            };
            let mut get = Mapping::new();
            get.insert("path".into(), format!("/app-probe/{key}").into());
            get.insert("port".into(), Value::Number(ports::ADMIN.into()));
            let original = handler.get(old).cloned().unwrap_or(Value::Null);
            replace_entry(handler, old, "httpGet", Value::Mapping(get));
            let saved = if old == "httpGet" {
                original
            } else {
                let mut wrapped = Mapping::new();
                wrapped.insert(old.into(), original);
                Value::Mapping(wrapped)
            };
            originals.insert(key.into(), saved);
        }
    }
    originals
}

/// Puts back the handlers [`rewrite_probes`] saved.
fn restore_probes(spec: &mut Mapping, saved: &Mapping) {
    for c in container_maps(spec) {
        let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
        let name = name.to_owned();
        for (kind, field) in CHECKS {
            let key = format!("{name}/{kind}");
            let (Some(old), Some(handler)) = (saved.get(key.as_str()), mapping_at(c, field)) else {
                continue;
            };
            let wrapped = old.as_mapping().filter(|m| m.len() == 1).and_then(|m| {
                let (k, v) = m.iter().next()?;
                let k = k.as_str().filter(|k| HANDLERS.contains(k))?;
                Some((k.to_owned(), v.clone()))
            });
            let (name, value) = wrapped.unwrap_or_else(|| ("httpGet".into(), old.clone()));
            replace_entry(handler, "httpGet", &name, value);
        }
    }
}

/// `--legacy-sidecar`: the app's init containers run as the proxy's uid (not captured: there
/// is no proxy yet to take their traffic). Returns their original `securityContext`s.
fn run_init_containers_as_proxy(spec: &mut Mapping) -> Mapping {
    let mut saved = Mapping::new();
    let Some(Value::Sequence(inits)) = spec.get_mut("initContainers") else {
        return saved;
    };
    for c in inits.iter_mut() {
        let Some(c) = c.as_mapping_mut() else {
            continue;
        };
        let Some(name) = c.get("name").and_then(Value::as_str).map(str::to_owned) else {
            continue;
        };
        let old = c.get("securityContext").cloned().unwrap_or(Value::Null);
        saved.insert(name.into(), old);
        if let Some(sc) = manifest::child_map(c, "securityContext") {
            sc.insert(
                "runAsUser".into(),
                Value::Number(u64::from(ports::PROXY_UID).into()),
            );
            sc.insert("runAsNonRoot".into(), Value::Bool(true));
        }
    }
    saved
}

fn uninject_object(at: &Location, object: &mut Value) -> Result<(), InputError> {
    let Some(kind) = WorkloadKind::of(object) else {
        return Ok(());
    };
    let w = Workload::check(kind, object, at)?;
    if !is_injected(&w.pod) {
        return Ok(());
    }
    let pfx = manifest::prefix(kind);
    let template = manifest::template_mut(object, kind)
        .ok_or_else(|| at.error(pfx.trim_end_matches('.'), "missing pod template"))?;
    let mut ann = Mapping::new();
    if let Some(Value::Mapping(meta)) = template.get_mut("metadata") {
        if let Some(Value::Mapping(map)) = meta.get_mut("annotations") {
            for key in [
                ANN_INJECTED,
                ANN_ORIGINAL_PROBES,
                ANN_ORIGINAL_INIT_SECURITY,
                ANN_ORIGINAL_POD_RESOURCES,
                ANN_DEFAULT_CONTAINER_ADDED,
            ] {
                if let Some(v) = map.remove(key) {
                    ann.insert(key.into(), v);
                }
            }
            if ann.contains_key(ANN_DEFAULT_CONTAINER_ADDED) {
                map.remove(ANN_DEFAULT_CONTAINER);
            }
        }
        manifest::drop_if_empty(meta, "annotations");
    }
    manifest::drop_if_empty(template, "metadata");
    let saved = |key: &str| -> Result<Mapping, InputError> {
        match ann.get(key).and_then(Value::as_str) {
            None => Ok(Mapping::new()),
            Some(text) => serde_norway::from_str(text).map_err(|e| {
                at.error(
                    format!("{pfx}metadata.annotations[\"{key}\"]"),
                    format!("not what outrider inject wrote: {e}"),
                )
            }),
        }
    };
    let (probes, security) = (
        saved(ANN_ORIGINAL_PROBES)?,
        saved(ANN_ORIGINAL_INIT_SECURITY)?,
    );
    let Some(Value::Mapping(spec)) = template.get_mut("spec") else {
        return Ok(());
    };
    let ours = |v: &Value| {
        v.get("name")
            .and_then(Value::as_str)
            .is_some_and(|n| [INIT_NAME, PROXY_NAME, IDENTITY_VOLUME, VALIDATE_NAME].contains(&n))
    };
    for list in ["initContainers", "containers", "volumes"] {
        if let Some(Value::Sequence(items)) = spec.get_mut(list) {
            items.retain(|v| !ours(v));
        }
    }
    restore_probes(spec, &probes);
    if let Some(text) = ann.get(ANN_ORIGINAL_POD_RESOURCES).and_then(Value::as_str) {
        let path = format!("{pfx}metadata.annotations[\"{ANN_ORIGINAL_POD_RESOURCES}\"]");
        let old: Value = serde_norway::from_str(text)
            .map_err(|e| at.error(path, format!("not what outrider inject wrote: {e}")))?;
        if old.is_null() {
            spec.remove("resources");
        } else {
            spec.insert("resources".into(), old);
        }
    }
    if let Some(Value::Sequence(items)) = spec.get_mut("initContainers") {
        for c in items.iter_mut().filter_map(Value::as_mapping_mut) {
            let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
            match security.get(name) {
                Some(Value::Null) => {
                    c.remove("securityContext");
                }
                Some(old) => {
                    c.insert("securityContext".into(), old.clone());
                }
                None => {}
            }
        }
    }
    manifest::drop_if_empty(spec, "initContainers");
    manifest::drop_if_empty(spec, "volumes");
    Ok(())
}
