//! `outrider inject`: adds the mesh to the pod templates of Kubernetes workloads, and
//! `--uninject` takes it out again.
//!
//! Per workload (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob) it adds, in
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
//! - the `outrider-identity` projected volume (the service account's Outrider token and the trust
//!   anchors, see [`IDENTITY_DIR`]);
//! - HTTP probes of the app rewritten to `:15020/app-probe/<container>/<kind>`, the originals kept
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
    ResourceRequirements, SeccompProfile, SecretProjection, SecurityContext, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use outrider_iptables_init::cidr::Cidr;
use outrider_iptables_init::config::Port;
use outrider_iptables_init::ports;
use outrider_proxy::app_probe::{AppProbe, AppProbes, ProbeHeader};
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
/// Where the identity volume is mounted in the proxy (read-only): `token` (the service
/// account's Outrider bootstrap token, from the Secret `outrider-token-<serviceaccount>`) and
/// `trust-anchors.pem` (from the ConfigMap [`TRUST_ANCHORS_CONFIGMAP`]).
pub const IDENTITY_DIR: &str = "/var/run/secrets/outrider/identity";
/// The ConfigMap with the mesh's trust anchors (key `trust-anchors.pem`), in every namespace
/// with injected workloads.
pub const TRUST_ANCHORS_CONFIGMAP: &str = "outrider-trust-anchors";
/// The Secret holding a service account's token (key `token`) is this prefix + its name.
pub const TOKEN_SECRET_PREFIX: &str = "outrider-token-";
/// The control plane's address inside the cluster (deploy/control-plane.yaml).
pub const DEFAULT_CONTROL: &str = "https://outrider-control.outrider-system.svc:15012";
/// The default image (`docker build -t outrider:0.1.0 -f deploy/Dockerfile .`).
pub const DEFAULT_IMAGE: &str = concat!("outrider:", env!("CARGO_PKG_VERSION"));

/// Annotation: `disabled` leaves the workload alone.
pub const ANN_INJECT: &str = "outrider.io/inject";
/// Annotation written by the injector: `native` or `legacy`.
pub const ANN_INJECTED: &str = "outrider.io/injected";
/// Annotation written by the injector: the app's original `httpGet` probe actions (JSON).
pub const ANN_ORIGINAL_PROBES: &str = "outrider.io/original-probes";
/// Annotation written by `--legacy-sidecar`: the app's init containers' original
/// `securityContext`s (JSON; `null` where there was none).
pub const ANN_ORIGINAL_INIT_SECURITY: &str = "outrider.io/original-init-security";
/// Annotation: inbound ports that bypass the proxy (comma-separated).
pub const ANN_SKIP_INBOUND_PORTS: &str = "outrider.io/skip-inbound-ports";
/// Annotation: outbound ports that bypass the proxy (comma-separated).
pub const ANN_SKIP_OUTBOUND_PORTS: &str = "outrider.io/skip-outbound-ports";
/// Annotation: outbound networks that bypass the proxy (comma-separated CIDRs).
pub const ANN_SKIP_OUTBOUND_CIDRS: &str = "outrider.io/skip-outbound-cidrs";
/// Annotation: `cni` captures through the node's CNI plugin (no `outrider-init`), `init` through
/// `outrider-init` even when injecting with `--cni`.
pub const ANN_CAPTURE: &str = "outrider.io/capture";
/// Annotation: ports that skip protocol detection, added to the proxy's defaults.
pub const ANN_OPAQUE_PORTS: &str = "outrider.io/opaque-ports";

/// The proxy's resources when no annotation says otherwise: requests `100m` CPU and `128Mi`
/// memory, limits `1` CPU and `256Mi` memory (never zero: a sidecar starved of memory is
/// OOM-killed and takes the pod's network with it). Annotations
/// `outrider.io/proxy-{cpu,memory}-{request,limit}` override each.
pub const PROXY_RESOURCES: [(&str, &str, &str); 4] = [
    ("outrider.io/proxy-cpu-request", "requests", "100m"),
    ("outrider.io/proxy-memory-request", "requests", "128Mi"),
    ("outrider.io/proxy-cpu-limit", "limits", "1"),
    ("outrider.io/proxy-memory-limit", "limits", "256Mi"),
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
    /// CNI mode: no `outrider-init`, a validation init container instead.
    pub cni: bool,
}

impl Default for InjectOptions {
    fn default() -> Self {
        InjectOptions {
            image: DEFAULT_IMAGE.into(),
            control: DEFAULT_CONTROL.into(),
            legacy_sidecar: false,
            cni: false,
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
    let mut docs = manifest::parse(text)?;
    let mut warnings = Vec::new();
    inject_docs(&mut docs, opts, &mut warnings)?;
    finish(&docs, warnings)
}

/// Takes the mesh out of every workload of `text` (the inverse of [`inject`]).
pub fn uninject(text: &str) -> Result<Output, InputError> {
    let mut docs = manifest::parse(text)?;
    manifest::for_each_object(&mut docs, uninject_object)?;
    finish(&docs, Vec::new())
}

fn finish(docs: &[Value], warnings: Vec<String>) -> Result<Output, InputError> {
    let yaml = manifest::write(docs).map_err(|e| InputError {
        document: "output".into(),
        path: String::new(),
        message: e,
    })?;
    Ok(Output { yaml, warnings })
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

fn inject_object(
    at: &Location,
    object: &mut Value,
    opts: &InjectOptions,
    warnings: &mut Vec<String>,
) -> Result<(), InputError> {
    let Some(kind) = WorkloadKind::of(object) else {
        return Ok(());
    };
    let w = Workload::check(kind, object, at)?;
    let pfx = manifest::prefix(kind);
    let what = format!("{at} ({:?} {})", kind, w.name);
    let template = manifest::template_mut(object, kind)
        .ok_or_else(|| at.error(pfx.trim_end_matches('.'), "missing pod template"))?;
    let ann = Annotations::read(template, &pfx);
    if ann.get(ANN_INJECT).is_some_and(|v| v.1 == "disabled") {
        warnings.push(format!("{what}: {ANN_INJECT}: disabled, left as it is"));
        return Ok(());
    }
    if w.pod.host_network == Some(true) {
        warnings.push(format!(
            "{what}: hostNetwork: true, left as it is (capturing traffic would capture the node's)"
        ));
        return Ok(());
    }
    if is_injected(&w.pod) {
        return Ok(());
    }
    let cni = match ann.get(ANN_CAPTURE) {
        None => opts.cni,
        Some((_, v)) if v == "cni" => true,
        Some((_, v)) if v == "init" => false,
        Some((path, v)) => {
            return Err(at.error(path, format!("`{v}` is not a capture mode (cni or init)")))
        }
    };
    let init = if cni {
        validate_container(&ann, opts, at)?
    } else {
        init_container(&ann, opts, at)?
    };
    let probes = app_probes(&w.pod, &pfx, at, &what, warnings)?;
    let proxy = proxy_container(&w, &ann, &probes, opts, at)?;
    let to_value = |c: &Container| {
        serde_norway::to_value(c).map_err(|e| at.error(&pfx, format!("cannot write: {e}")))
    };
    let (init, proxy) = (to_value(&init)?, to_value(&proxy)?);
    let volume = serde_norway::to_value(identity_volume(&w.pod))
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

fn join<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The CNI mode's init container: `outrider cni validate`, non-root (uid [`VALIDATE_UID`]), no
/// capabilities, its probe on a port the pod's `skip-outbound-ports` do not exempt.
fn validate_container(
    ann: &Annotations,
    opts: &InjectOptions,
    at: &Location,
) -> Result<Container, InputError> {
    let skipped: Vec<Port> = ann.list(ANN_SKIP_OUTBOUND_PORTS, at)?;
    let probe_port = (1..=u16::MAX)
        .find(|p| !skipped.iter().any(|s| s.get() == *p))
        .unwrap_or(1);
    let mut c = init_container(ann, opts, at)?;
    c.name = VALIDATE_NAME.into();
    c.args = Some(vec![
        "cni".into(),
        "validate".into(),
        "--outbound-port".into(),
        ports::OUTBOUND.to_string(),
        "--probe".into(),
        format!("198.18.255.254:{probe_port}"),
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
    let mut args = vec![
        "init".to_owned(),
        "--proxy-uid".into(),
        ports::PROXY_UID.to_string(),
    ];
    let inbound: Vec<Port> = ann.list(ANN_SKIP_INBOUND_PORTS, at)?;
    let outbound: Vec<Port> = ann.list(ANN_SKIP_OUTBOUND_PORTS, at)?;
    let cidrs: Vec<Cidr> = ann.list(ANN_SKIP_OUTBOUND_CIDRS, at)?;
    for (flag, list) in [
        ("--exclude-inbound-ports", join(&inbound)),
        ("--exclude-outbound-ports", join(&outbound)),
        ("--exclude-outbound-cidrs", join(&cidrs)),
    ] {
        if !list.is_empty() {
            args.extend([flag.to_owned(), list]);
        }
    }
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
    Ok(Container {
        name: INIT_NAME.into(),
        image: Some(opts.image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
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
    let opaque: Vec<Port> = ann.list(ANN_OPAQUE_PORTS, at)?;
    if !opaque.is_empty() {
        let mut all: Vec<u16> = outrider_proxy::config::DEFAULT_OPAQUE_PORTS.to_vec();
        all.extend(opaque.iter().map(|p| p.get()));
        all.sort_unstable();
        all.dedup();
        env.push(plain("OUTRIDER_OPAQUE_PORTS", join(&all)));
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
    Ok(Container {
        name: PROXY_NAME.into(),
        image: Some(opts.image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        args: Some(vec!["proxy".into()]),
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
        let q: Quantity = text.parse().map_err(|e| at.error(&path, format!("{e}")))?;
        if q.is_zero() {
            return Err(at.error(
                path,
                "must be more than 0 (a starved proxy takes the pod's network with it)",
            ));
        }
        let resource = if key.contains("cpu") { "cpu" } else { "memory" };
        parsed.insert((side, resource), (q, text, path));
    }
    let mut req = ResourceRequirements::default();
    for resource in ["cpu", "memory"] {
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

fn identity_volume(pod: &PodSpec) -> Volume {
    let account = pod
        .service_account_name
        .clone()
        .or_else(|| pod.service_account.clone()) // the deprecated alias
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| "default".into());
    let key = |key: &str| KeyToPath {
        key: key.into(),
        path: key.into(),
        ..Default::default()
    };
    Volume {
        name: IDENTITY_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![
                VolumeProjection {
                    secret: Some(SecretProjection {
                        name: format!("{TOKEN_SECRET_PREFIX}{account}"),
                        items: Some(vec![key("token")]),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
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
    }
}

/// The probe kinds and their field names in a container.
const PROBE_FIELDS: [(&str, &str); 3] = [
    ("liveness", "livenessProbe"),
    ("readiness", "readinessProbe"),
    ("startup", "startupProbe"),
];

/// The app containers' HTTP probes to forward (`<container>/<kind>` → target).
fn app_probes(
    pod: &PodSpec,
    pfx: &str,
    at: &Location,
    what: &str,
    warnings: &mut Vec<String>,
) -> Result<AppProbes, InputError> {
    let mut table = AppProbes::new();
    for (i, c) in pod.containers.iter().enumerate() {
        for (kind, field) in PROBE_FIELDS {
            let probe = match kind {
                "liveness" => &c.liveness_probe,
                "readiness" => &c.readiness_probe,
                _ => &c.startup_probe,
            };
            let Some(get) = probe.as_ref().and_then(|p| p.http_get.as_ref()) else {
                continue;
            };
            let path = format!("{pfx}spec.containers[{i}].{field}.httpGet");
            if get.scheme.as_deref().is_some_and(|s| s != "HTTP") || get.host.is_some() {
                warnings.push(format!(
                    "{what}: {path}: HTTPS or a host is not forwarded by the proxy; left as it is"
                ));
                continue;
            }
            let port = match &get.port {
                IntOrString::Int(p) => u16::try_from(*p).ok().filter(|p| *p != 0),
                IntOrString::String(name) => c
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some(name.as_str()))
                    .and_then(|p| u16::try_from(p.container_port).ok()),
            }
            .ok_or_else(|| {
                at.error(
                    format!("{path}.port"),
                    "not a port number nor the name of one of the container's ports",
                )
            })?;
            let key = format!("{}/{kind}", c.name);
            let headers = get.http_headers.iter().flatten();
            table.insert(
                key.clone(),
                AppProbe {
                    port,
                    path: match get.path.as_deref() {
                        Some(p) if p.starts_with('/') => p.into(),
                        Some(p) => format!("/{p}"),
                        None => "/".into(),
                    },
                    headers: headers
                        .map(|h| ProbeHeader {
                            name: h.name.clone(),
                            value: h.value.clone(),
                        })
                        .collect(),
                },
            );
        }
    }
    Ok(table)
}

/// Points each probe in `probes` at the admin port; returns the original `httpGet`s as they
/// were written, by `<container>/<kind>`, for the annotation.
fn rewrite_probes(spec: &mut Mapping, probes: &AppProbes) -> Mapping {
    let mut originals = Mapping::new();
    let Some(Value::Sequence(containers)) = spec.get_mut("containers") else {
        return originals;
    };
    for c in containers.iter_mut() {
        let Some(name) = c.get("name").and_then(Value::as_str).map(str::to_owned) else {
            continue;
        };
        for (kind, field) in PROBE_FIELDS {
            let key = format!("{name}/{kind}");
            if !probes.contains_key(&key) {
                continue;
            }
            if let Some(Value::Mapping(probe)) = c.get_mut(field) {
                let mut get = Mapping::new();
                get.insert("path".into(), format!("/app-probe/{key}").into());
                get.insert("port".into(), Value::Number(ports::ADMIN.into()));
                if let Some(old) = probe.insert("httpGet".into(), Value::Mapping(get)) {
                    originals.insert(key.into(), old);
                }
            }
        }
    }
    originals
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
            ] {
                if let Some(v) = map.remove(key) {
                    ann.insert(key.into(), v);
                }
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
    for (list, restore) in [("containers", &probes), ("initContainers", &security)] {
        let Some(Value::Sequence(items)) = spec.get_mut(list) else {
            continue;
        };
        for c in items.iter_mut().filter_map(Value::as_mapping_mut) {
            let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
            let name = name.to_owned();
            if list == "initContainers" {
                match security.get(name.as_str()) {
                    Some(Value::Null) => {
                        c.remove("securityContext");
                    }
                    Some(old) => {
                        c.insert("securityContext".into(), old.clone());
                    }
                    None => {}
                }
                continue;
            }
            for (kind, field) in PROBE_FIELDS {
                let key = format!("{name}/{kind}");
                if let (Some(old), Some(Value::Mapping(probe))) =
                    (restore.get(key.as_str()), c.get_mut(field))
                {
                    probe.insert("httpGet".into(), old.clone());
                }
            }
        }
    }
    manifest::drop_if_empty(spec, "initContainers");
    manifest::drop_if_empty(spec, "volumes");
    Ok(())
}
