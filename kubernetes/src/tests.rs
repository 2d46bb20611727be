//! Golden-file tests of `outrider inject` (one input per workload kind under `tests/golden/`,
//! plus the seed example under `deploy/examples/`), idempotence, the `--uninject` round trip,
//! and schema validation of every injected output and every manifest under `deploy/` with
//! `kubernetes-validate` (Kubernetes 1.30, strict).
//!
//! `OUTRIDER_BLESS=1 cargo test -p outrider-kubernetes` rewrites the expected files. Without
//! `kubernetes-validate` in PATH the validation tests print a loud SKIPPED line, and fail under
//! `CI=true` (`.ci/run` installs it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::inject::{self, InjectOptions};
use crate::manifest;

/// The Kubernetes version every emitted manifest is validated against.
const KUBERNETES_VERSION: &str = "1.30.0";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// (input, expected output, legacy sidecar form)
fn cases() -> Vec<(PathBuf, PathBuf, bool)> {
    let golden = root().join("tests/golden");
    let mut cases: Vec<_> = [
        "pod",
        "deployment",
        "statefulset",
        "daemonset",
        "replicaset",
        "job",
        "cronjob",
        "list",
        "legacy-sidecar",
    ]
    .iter()
    .map(|name| {
        (
            golden.join(format!("{name}.yaml")),
            golden.join(format!("{name}.injected.yaml")),
            *name == "legacy-sidecar",
        )
    })
    .collect();
    let examples = root().join("../deploy/examples");
    cases.push((
        examples.join("payments-api.yaml"),
        examples.join("payments-api.injected.yaml"),
        false,
    ));
    cases
}

fn opts(legacy: bool) -> InjectOptions {
    InjectOptions {
        legacy_sidecar: legacy,
        ..InjectOptions::default()
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn golden_files_match() {
    let bless = std::env::var("OUTRIDER_BLESS").is_ok_and(|v| v == "1");
    let mut stale = Vec::new();
    for (input, expected, legacy) in cases() {
        let out = inject::inject(&read(&input), &opts(legacy)).unwrap();
        if bless {
            std::fs::write(&expected, &out.yaml).unwrap();
        } else if std::fs::read_to_string(&expected).ok().as_deref() != Some(out.yaml.as_str()) {
            stale.push(expected.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "injected output differs from {stale:?}; review, then rewrite with OUTRIDER_BLESS=1"
    );
}

#[test]
fn injecting_injected_output_changes_nothing_byte_for_byte() {
    for (_, expected, legacy) in cases() {
        let injected = read(&expected);
        let again = inject::inject(&injected, &opts(legacy)).unwrap();
        assert_eq!(again.yaml, injected, "{}", expected.display());
        assert!(again
            .warnings
            .iter()
            .all(|w| !w.contains("already injected")));
        // The other form re-injects, says so, and is then stable too.
        let other = inject::inject(&injected, &opts(!legacy)).unwrap();
        assert_ne!(other.yaml, injected, "{}", expected.display());
        assert!(other
            .warnings
            .iter()
            .any(|w| w.contains("already injected; updated")));
        let form = if legacy { "native" } else { "legacy" };
        assert!(other
            .yaml
            .contains(&format!("outrider.io/injected: {form}")));
        assert_eq!(
            inject::inject(&other.yaml, &opts(!legacy)).unwrap().yaml,
            other.yaml
        );
    }
}

#[test]
fn reinjecting_with_a_new_image_or_annotations_updates_the_workload() {
    let seed = read(&root().join("../deploy/examples/payments-api.injected.yaml"));
    let new = InjectOptions {
        image: "registry.example/outrider:0.2.0".into(),
        ..opts(false)
    };
    let out = inject::inject(&seed, &new).unwrap();
    assert_eq!(
        out.yaml
            .matches("image: registry.example/outrider:0.2.0")
            .count(),
        2
    );
    let old = |t: &str| t.matches("image: outrider:0.1.0").count();
    assert_eq!(
        old(&out.yaml) + 2,
        old(&seed),
        "only the mesh's containers change"
    );
    assert!(out.warnings[0].contains("(Deployment payments-api): already injected; updated"));
    // A changed annotation takes effect the same way.
    let annotated = seed.replacen(
        "outrider.io/injected: native",
        "outrider.io/injected: native\n        outrider.io/proxy-memory-limit: 512Mi",
        1,
    );
    assert_ne!(annotated, seed);
    let out = inject::inject(&annotated, &opts(false)).unwrap();
    assert!(out.yaml.contains("memory: 512Mi"), "{}", out.yaml);
    // Uninjecting the update gives the original back.
    let original = manifest::write(
        &manifest::parse(&read(&root().join("../deploy/examples/payments-api.yaml"))).unwrap(),
    )
    .unwrap();
    let back = inject::uninject(&inject::inject(&seed, &new).unwrap().yaml).unwrap();
    assert_eq!(back.yaml, original);
}

fn pod(namespace: &str, meta: &str, spec: &str) -> String {
    format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: {namespace}\n{meta}spec:\n{spec}  containers:\n  - name: app\n    image: app:1\n")
}

#[test]
fn system_windows_and_other_meshes_pods_are_skipped_with_a_warning_unless_forced() {
    let cases = [
        (pod("kube-system", "", ""), "in kube-system", true),
        (pod("kube-public", "", ""), "in kube-public", true),
        (
            pod("shop", "  annotations: {linkerd.io/inject: enabled}\n", ""),
            "linkerd.io/inject: enabled",
            true,
        ),
        (
            pod(
                "shop",
                "  labels: {sidecar.istio.io/inject: \"true\"}\n",
                "",
            ),
            "sidecar.istio.io/inject: true",
            true,
        ),
        (
            pod(
                "shop",
                "  annotations: {sidecar.istio.io/status: \"{}\"}\n",
                "",
            ),
            "sidecar.istio.io/status",
            true,
        ),
        (
            pod(
                "shop",
                "",
                "  initContainers: [{name: istio-proxy, image: x, restartPolicy: Always}]\n",
            ),
            "another mesh's sidecar `istio-proxy`",
            true,
        ),
        (
            pod("shop", "", "  os: {name: windows}\n"),
            "spec.os.name: windows",
            false,
        ),
    ];
    for (text, reason, forceable) in cases {
        let out = inject::inject(&text, &opts(false)).unwrap();
        assert!(!out.yaml.contains(inject::PROXY_NAME), "{reason}");
        assert_eq!(out.warnings.len(), 1, "{reason}: {:?}", out.warnings);
        assert!(
            out.warnings[0].contains(reason),
            "{reason}: {:?}",
            out.warnings
        );
        assert!(out.warnings[0].contains("(Pod p)"), "{:?}", out.warnings);
        let forced = InjectOptions {
            force: true,
            ..opts(false)
        };
        let out = inject::inject(&text, &forced).unwrap();
        assert_eq!(out.yaml.contains(inject::PROXY_NAME), forceable, "{reason}");
    }
    // Annotations that say "no" to the other mesh are no reason to skip.
    let out = inject::inject(
        &pod(
            "shop",
            "  labels: {sidecar.istio.io/inject: \"false\"}\n",
            "",
        ),
        &opts(false),
    )
    .unwrap();
    assert!(out.yaml.contains(inject::PROXY_NAME) && out.warnings.is_empty());
}

#[test]
fn the_inject_annotation_and_app_ports_are_checked() {
    for bad in ["\"false\"", "\"no\"", "Enabled"] {
        let text = deployment_with(&format!("outrider.io/inject: {bad}"), "");
        let e = inject::inject(&text, &opts(false)).unwrap_err();
        assert_eq!(
            e.path,
            "spec.template.metadata.annotations[\"outrider.io/inject\"]"
        );
        assert!(
            e.message.contains("neither `enabled` nor `disabled`"),
            "{e}"
        );
    }
    assert!(inject::inject(
        &deployment_with("outrider.io/inject: enabled", ""),
        &opts(false)
    )
    .unwrap()
    .yaml
    .contains(inject::PROXY_NAME));
    for (port, name) in [(15001, "outbound"), (15006, "inbound"), (15020, "admin")] {
        let text = deployment_with(
            "",
            &format!("        ports: [{{containerPort: 80}}, {{containerPort: {port}}}]\n"),
        );
        let e = inject::inject(&text, &opts(false)).unwrap_err();
        assert_eq!(
            e.path,
            "spec.template.spec.containers[0].ports[1].containerPort"
        );
        assert!(
            e.message
                .contains(&format!("{port} is the proxy's {name} port")),
            "{e}"
        );
    }
}

#[test]
fn guaranteed_pods_keep_their_class_or_the_injector_says_why_not() {
    use crate::resources::{qos, Qos};
    let spec = |ann: &str| {
        pod("shop", &format!("  annotations: {{{ann}}}\n"), "").replace(
            "    image: app:1\n",
            "    image: app:1\n    resources: {limits: {cpu: 500m, memory: 1Gi}}\n",
        )
    };
    let class = |yaml: &str| {
        let docs = manifest::parse(yaml).unwrap();
        let w = manifest::Workload::check(
            manifest::WorkloadKind::Pod,
            &docs[0],
            &manifest::Location::new("d"),
        )
        .unwrap();
        qos(&w.pod, w.pod_resources.as_ref())
    };
    assert_eq!(class(&spec("")), Qos::Guaranteed);
    let out = inject::inject(&spec(""), &opts(false)).unwrap();
    assert_eq!(class(&out.yaml), Qos::Burstable);
    assert!(
        out.warnings[0].contains("the pod is Guaranteed"),
        "{:?}",
        out.warnings
    );
    let equal = "outrider.io/proxy-cpu-request: 200m, outrider.io/proxy-cpu-limit: 200m, outrider.io/proxy-memory-request: 128Mi, outrider.io/proxy-memory-limit: 128Mi";
    let out = inject::inject(&spec(equal), &opts(false)).unwrap();
    assert_eq!(class(&out.yaml), Qos::Guaranteed, "{}", out.yaml);
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    // A Burstable pod is left Burstable without a word.
    let out = inject::inject(&pod("shop", "", ""), &opts(false)).unwrap();
    assert_eq!(class(&out.yaml), Qos::Burstable);
    assert!(out.warnings.is_empty());
}

#[test]
fn pod_level_resources_grow_by_the_proxys_share() {
    let text = pod("shop", "", "  resources: {requests: {cpu: \"1\", memory: 100Mi}, limits: {cpu: \"1\", memory: 200Mi}}\n")
        .replace("    image: app:1\n", "    image: app:1\n    resources: {requests: {cpu: 500m, memory: 50Mi}}\n");
    let out = inject::inject(&text, &opts(false)).unwrap();
    let docs = manifest::parse(&out.yaml).unwrap();
    let w = manifest::Workload::check(
        manifest::WorkloadKind::Pod,
        &docs[0],
        &manifest::Location::new("d"),
    )
    .unwrap();
    let res = w.pod_resources.clone().unwrap();
    let get = |m: &Option<
        std::collections::BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    >,
               k: &str| m.as_ref().unwrap()[k].0.clone();
    // 1 + 100m, 100Mi + 128Mi; limits 1 + 1, 200Mi + 256Mi.
    assert_eq!(get(&res.requests, "cpu"), "1100m");
    assert_eq!(get(&res.requests, "memory"), "228Mi");
    assert_eq!(get(&res.limits, "cpu"), "2");
    assert_eq!(get(&res.limits, "memory"), "456Mi");
    // The API server's rule: the pod requests at least what its containers do.
    let report = crate::resources::report(&w, &manifest::Location::new("d")).unwrap();
    assert!(report.pod[1] <= get(&res.requests, "memory").parse().unwrap());
    assert!(
        out.warnings[0]
            .contains("pod-level spec.resources raised for the proxy: requests.cpu 1 → 1100m"),
        "{:?}",
        out.warnings
    );
    let back = inject::uninject(&out.yaml).unwrap();
    assert_eq!(
        back.yaml,
        manifest::write(&manifest::parse(&text).unwrap()).unwrap()
    );
}

#[test]
fn uninject_gives_back_the_original() {
    for (input, expected, _) in cases() {
        let original = read(&input);
        let normalized = manifest::write(&manifest::parse(&original).unwrap()).unwrap();
        let back = inject::uninject(&read(&expected)).unwrap();
        assert_eq!(back.yaml, normalized, "{}", input.display());
        // Uninjecting something never injected changes nothing.
        assert_eq!(inject::uninject(&original).unwrap().yaml, normalized);
    }
}

#[test]
fn every_kind_gets_the_native_sidecar_in_front_of_the_apps_init_containers() {
    for (input, expected, legacy) in cases() {
        let docs = manifest::parse(&read(&expected)).unwrap();
        let mut seen = 0;
        let mut docs = docs;
        manifest::for_each_object::<manifest::InputError>(&mut docs, |at, object| {
            let Some(kind) = manifest::WorkloadKind::of(object) else {
                return Ok(());
            };
            let w = manifest::Workload::check(kind, object, at)?;
            if !inject::is_injected(&w.pod) {
                return Ok(());
            }
            seen += 1;
            let inits = w.pod.init_containers.unwrap();
            assert_eq!(inits[0].name, inject::INIT_NAME, "{}", input.display());
            let proxy = if legacy {
                assert_ne!(
                    inits.get(1).map(|c| c.name.as_str()),
                    Some(inject::PROXY_NAME)
                );
                w.pod.containers[0].clone()
            } else {
                assert_eq!(inits[1].restart_policy.as_deref(), Some("Always"));
                inits[1].clone()
            };
            assert_eq!(proxy.name, inject::PROXY_NAME);
            let sc = proxy.security_context.unwrap();
            assert_eq!(sc.run_as_user, Some(1337));
            assert_eq!(sc.read_only_root_filesystem, Some(true));
            let res = proxy.resources.unwrap();
            assert!(res.requests.unwrap().len() == 2 && res.limits.unwrap().len() == 2);
            Ok(())
        })
        .unwrap();
        assert!(seen > 0, "{}: nothing injected", input.display());
    }
}

#[test]
fn skipped_workloads_and_unforwardable_probes_are_reported() {
    let list = inject::inject(&read(&root().join("tests/golden/list.yaml")), &opts(false)).unwrap();
    assert_eq!(list.warnings.len(), 2, "{:?}", list.warnings);
    assert!(list.warnings[0]
        .contains("document 2 (Deployment legacy-batch): outrider.io/inject: disabled"));
    assert!(list.warnings[1].contains("document 3 (Pod node-exporter): hostNetwork: true"));
    let ds = inject::inject(
        &read(&root().join("tests/golden/daemonset.yaml")),
        &opts(false),
    )
    .unwrap();
    assert!(ds.warnings.is_empty(), "{:?}", ds.warnings);
    assert!(ds
        .yaml
        .contains(r#""kind":"https","port":8443,"path":"/healthz""#));
    let job = inject::inject(&read(&root().join("tests/golden/job.yaml")), &opts(true)).unwrap();
    assert!(job.warnings[0].contains("/shutdown"), "{:?}", job.warnings);
}

fn deployment_with(annotations: &str, container_extra: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: a}}\nspec:\n  selector: {{matchLabels: {{app: a}}}}\n  template:\n    metadata:\n      labels: {{app: a}}\n      annotations: {{{annotations}}}\n    spec:\n      containers:\n      - name: a\n        image: a:1\n{container_extra}"
    )
}

#[test]
fn bad_annotations_and_fields_name_the_document_and_path() {
    let cases = [
        (
            "outrider.io/proxy-memory-limit: 12GB",
            "",
            "spec.template.metadata.annotations[\"outrider.io/proxy-memory-limit\"]",
            "`12GB` is not a quantity",
        ),
        (
            "outrider.io/proxy-cpu-request: \"0\"",
            "",
            "spec.template.metadata.annotations[\"outrider.io/proxy-cpu-request\"]",
            "more than 0",
        ),
        (
            "outrider.io/proxy-cpu-request: \"2\"",
            "",
            "spec.template.metadata.annotations[\"outrider.io/proxy-cpu-request\"]",
            "above its limit",
        ),
        (
            "outrider.io/skip-outbound-ports: \"5432,99999\"",
            "",
            "spec.template.metadata.annotations[\"outrider.io/skip-outbound-ports\"]",
            "out of range",
        ),
        (
            "outrider.io/skip-outbound-cidrs: 10.0.0.0/33",
            "",
            "spec.template.metadata.annotations[\"outrider.io/skip-outbound-cidrs\"]",
            "",
        ),
        (
            "",
            "        livenessProbe: {httpGet: {port: metrics}}\n",
            "spec.template.spec.containers[0].livenessProbe.httpGet.port",
            "not a port number nor the name",
        ),
        (
            "",
            "        ports: [{containerPort: eighty}]\n",
            "spec.template.spec.containers[0].ports[0].containerPort",
            "",
        ),
    ];
    for (ann, extra, path, message) in cases {
        let text = format!("kind: ConfigMap\n---\n{}", deployment_with(ann, extra));
        let e = inject::inject(&text, &opts(false)).unwrap_err();
        assert_eq!(e.document, "document 2", "{e}");
        assert_eq!(e.path, path, "{e}");
        assert!(e.message.contains(message), "{e}");
    }
}

/// A folder of files for the validator, removed when dropped.
pub(crate) struct Sources(PathBuf);

impl Sources {
    /// A new empty folder under the system's temporary directory.
    pub(crate) fn new(name: &str) -> Sources {
        let dir = std::env::temp_dir().join(format!("outrider-k8s-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Sources(dir)
    }

    /// Writes `text` to `name` in the folder.
    pub(crate) fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Sources {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether `kubernetes-validate` can run; a loud skip otherwise, a failure under `CI=true`.
pub(crate) fn validator() -> bool {
    let found = Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        let why = "needs `kubernetes-validate` in PATH (pip install kubernetes-validate)";
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(!ci, "{why}, and CI=true forbids skipping");
        let _ = writeln!(
            std::io::stderr(),
            "\n**********\nSKIPPED kubernetes-validate tests: {why}\n**********"
        );
    }
    found
}

pub(crate) fn validate(files: &[PathBuf]) -> std::process::Output {
    Command::new("kubernetes-validate")
        .args(["--kubernetes-version", KUBERNETES_VERSION, "--strict"])
        .args(files)
        .output()
        .unwrap()
}

fn deploy_manifests() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in ["../deploy", "../deploy/examples"] {
        for entry in std::fs::read_dir(root().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn injected_outputs_and_deploy_manifests_pass_kubernetes_validate() {
    if !validator() {
        return;
    }
    // kubernetes-validate has no schema for `List`: its items go to a file of their own.
    let dir = std::env::temp_dir().join(format!("outrider-k8s-lists-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files: Vec<PathBuf> = Vec::new();
    for (_, expected, _) in cases() {
        let mut docs = manifest::parse(&read(&expected)).unwrap();
        let mut objects = Vec::new();
        manifest::for_each_object::<manifest::InputError>(&mut docs, |_, o| {
            objects.push(o.clone());
            Ok(())
        })
        .unwrap();
        if objects.len() == docs.len() {
            files.push(expected);
        } else {
            let file = dir.join(expected.file_name().unwrap());
            std::fs::write(&file, manifest::write(&objects).unwrap()).unwrap();
            files.push(file);
        }
    }
    files.extend(deploy_manifests());
    assert!(files
        .iter()
        .any(|f| f.ends_with("deploy/control-plane.yaml")));
    let out = validate(&files);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubernetes-validate failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every file was looked at (it says `passed` per resource).
    for f in &files {
        let passed = format!("{} passed", f.display());
        assert!(
            stdout.contains(&passed),
            "{} not validated:\n{stdout}",
            f.display()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kubernetes_validate_catches_a_broken_manifest() {
    if !validator() {
        return;
    }
    // The seed, injected, with one field the schema does not know and one of the wrong type.
    let injected = read(&root().join("../deploy/examples/payments-api.injected.yaml"));
    let dir = std::env::temp_dir().join(format!("outrider-k8s-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, broken) in [
        (
            "unknown-field",
            injected.replacen(
                "restartPolicy: Always",
                "restartPolicy: Always\n        sidecar: true",
                1,
            ),
        ),
        (
            "wrong-type",
            injected.replacen("replicas: 3", "replicas: three", 1),
        ),
    ] {
        assert_ne!(broken, injected, "{name}: the edit did not apply");
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, broken).unwrap();
        let out = validate(&[file]);
        assert!(
            !out.status.success(),
            "{name}: kubernetes-validate passed a broken manifest"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cut_and_mangled_inputs_are_errors_or_output_never_panics() {
    // Every golden input and the seed's output cut at every line, and with each line dropped
    // in turn: inject, uninject and the resource report answer each with output or an error.
    let seed = root().join("../deploy/examples/payments-api.injected.yaml");
    let inputs = cases().into_iter().map(|c| (c.0, c.2));
    for (input, legacy) in inputs.chain([(seed, false)]) {
        let text = read(&input);
        let lines: Vec<&str> = text.lines().collect();
        for i in 0..lines.len() {
            let cut = lines[..i].join("\n");
            let dropped = [&lines[..i], &lines[i + 1..]].concat().join("\n");
            for t in [cut, dropped] {
                let _ = inject::inject(&t, &opts(legacy));
                let _ = inject::uninject(&t);
                let _ = crate::resource_reports(&t, true);
            }
        }
    }
}

/// The uid and groups a container runs as, and whether it can read a file the kubelet wrote for
/// a Secret or ConfigMap volume: owned by root, group `fsGroup` when the pod sets one, mode the
/// item's `mode`, else the volume's `defaultMode`, else 0644.
fn can_read(
    pod: &k8s_openapi::api::core::v1::PodSpec,
    c: &k8s_openapi::api::core::v1::Container,
    mode: i32,
) -> bool {
    let psc = pod.security_context.clone().unwrap_or_default();
    let csc = c.security_context.clone().unwrap_or_default();
    let uid = csc.run_as_user.or(psc.run_as_user).unwrap_or(0);
    let gid = csc.run_as_group.or(psc.run_as_group).unwrap_or(0);
    let mut groups = vec![gid];
    groups.extend(psc.fs_group);
    groups.extend(psc.supplemental_groups.into_iter().flatten());
    let file_group = psc.fs_group.unwrap_or(0);
    uid == 0 || (groups.contains(&file_group) && mode & 0o040 != 0) || mode & 0o004 != 0
}

#[test]
fn deploy_manifests_inject_report_and_their_secrets_are_readable_by_their_containers() {
    let mut checked = 0;
    for file in deploy_manifests() {
        let text = read(&file);
        // The project's own manifests are what users run inject and resources on first.
        inject::inject(&text, &opts(false)).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        crate::resource_reports(&text, true).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let mut docs = manifest::parse(&text).unwrap();
        manifest::for_each_object::<manifest::InputError>(&mut docs, |at, object| {
            let Some(kind) = manifest::WorkloadKind::of(object) else {
                return Ok(());
            };
            let w = manifest::Workload::check(kind, object, at)?;
            for c in w
                .pod
                .containers
                .iter()
                .chain(w.pod.init_containers.iter().flatten())
            {
                for m in c.volume_mounts.iter().flatten() {
                    let v = w
                        .pod
                        .volumes
                        .iter()
                        .flatten()
                        .find(|v| v.name == m.name)
                        .unwrap();
                    let (default, items) = if let Some(s) = &v.secret {
                        (s.default_mode, s.items.clone())
                    } else if let Some(cm) = &v.config_map {
                        (cm.default_mode, cm.items.clone())
                    } else {
                        continue;
                    };
                    let modes: Vec<i32> = match items {
                        Some(items) => items
                            .iter()
                            .map(|i| i.mode.or(default).unwrap_or(0o644))
                            .collect(),
                        None => vec![default.unwrap_or(0o644)],
                    };
                    for mode in modes {
                        assert!(
                            can_read(&w.pod, c, mode),
                            "{}: {} cannot read volume {} (mode {mode:o})",
                            file.display(),
                            c.name,
                            v.name
                        );
                        checked += 1;
                    }
                }
            }
            Ok(())
        })
        .unwrap();
    }
    assert!(checked >= 2, "{checked}");
    // The control plane survives a node drain: two replicas, a budget, HTTP probes.
    let text = read(&root().join("../deploy/control-plane.yaml"));
    let docs = manifest::parse(&text).unwrap();
    let kind = |k: &str| docs.iter().find(|d| d["kind"].as_str() == Some(k)).unwrap();
    let deployment = kind("Deployment");
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2);
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let pdb = kind("PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"].as_u64(), Some(1));
    for (k, v) in pdb["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(&labels[k], v);
    }
    let c = &deployment["spec"]["template"]["spec"]["containers"][0];
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            c[probe]["httpGet"]["scheme"].as_str(),
            Some("HTTPS"),
            "{probe}"
        );
    }
}

fn env_of(c: &k8s_openapi::api::core::v1::Container, name: &str) -> Option<String> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

#[test]
fn per_workload_annotations_reach_the_mesh_containers() {
    let ann = "outrider.io/proxy-log-level: debug, outrider.io/proxy-log-format: json, \
        outrider.io/proxy-image: registry.example/outrider:9, \
        outrider.io/proxy-image-pull-policy: Always, outrider.io/proxy-drain-window: 10s, \
        outrider.io/proxy-shutdown-grace: 1m, outrider.io/native-sidecar: \"false\", \
        outrider.io/skip-inbound-ports: \"9000-9003,22\", outrider.io/skip-outbound-ports: \"5432\", \
        outrider.io/include-outbound-cidrs: 10.0.0.0/8, outrider.io/proxy-cpu-limit: none, \
        outrider.io/include-inbound-ports: \"8080,9100-9101\", \
        outrider.io/include-outbound-ports: \"443\", \
        outrider.io/proxy-ephemeral-storage-request: 100Mi, \
        outrider.io/proxy-ephemeral-storage-limit: 1Gi";
    let out = inject::inject(&deployment_with(ann, ""), &opts(false)).unwrap();
    let docs = manifest::parse(&out.yaml).unwrap();
    let w = manifest::Workload::check(
        manifest::WorkloadKind::Deployment,
        &docs[0],
        &manifest::Location::new("d"),
    )
    .unwrap();
    // native-sidecar: "false": the legacy form, with kubectl's default container on the app.
    let proxy = &w.pod.containers[0];
    assert_eq!(proxy.name, inject::PROXY_NAME);
    assert!(
        out.yaml
            .contains("kubectl.kubernetes.io/default-container: a\n"),
        "{}",
        out.yaml
    );
    let init = &w.pod.init_containers.as_ref().unwrap()[0];
    for c in [proxy, init] {
        assert_eq!(c.image.as_deref(), Some("registry.example/outrider:9"));
        assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
    }
    assert_eq!(env_of(proxy, "OUTRIDER_LOG").as_deref(), Some("debug"));
    assert_eq!(
        env_of(proxy, "OUTRIDER_LOG_FORMAT").as_deref(),
        Some("json")
    );
    assert_eq!(
        env_of(proxy, "OUTRIDER_DRAIN_WINDOW").as_deref(),
        Some("10s")
    );
    assert_eq!(
        env_of(proxy, "OUTRIDER_SHUTDOWN_GRACE").as_deref(),
        Some("1m")
    );
    let args = init.args.clone().unwrap().join(" ");
    assert!(
        args.contains("--exclude-inbound-ports 22,9000,9001,9002,9003"),
        "{args}"
    );
    assert!(args.contains("--exclude-outbound-ports 5432"), "{args}");
    assert!(
        args.contains("--include-outbound-cidrs 10.0.0.0/8"),
        "{args}"
    );
    assert!(
        args.contains("--include-inbound-ports 8080,9100,9101"),
        "{args}"
    );
    assert!(args.contains("--include-outbound-ports 443"), "{args}");
    let res = proxy.resources.clone().unwrap();
    let limits = res.limits.unwrap();
    assert!(!limits.contains_key("cpu"));
    assert_eq!(limits["ephemeral-storage"].0, "1Gi");
    assert_eq!(res.requests.unwrap()["ephemeral-storage"].0, "100Mi");
    assert!(proxy.readiness_probe.is_some());
    // And all of it comes out again.
    let back = inject::uninject(&out.yaml).unwrap();
    let original = deployment_with(ann, "");
    assert_eq!(
        back.yaml,
        manifest::write(&manifest::parse(&original).unwrap()).unwrap()
    );

    let bad = [
        ("outrider.io/proxy-log-level: \"debug[\"", "proxy-log-level"),
        ("outrider.io/proxy-log-format: yaml", "proxy-log-format"),
        (
            "outrider.io/proxy-image-pull-policy: Sometimes",
            "proxy-image-pull-policy",
        ),
        ("outrider.io/proxy-image: \"a b\"", "proxy-image"),
        ("outrider.io/proxy-drain-window: soon", "proxy-drain-window"),
        ("outrider.io/native-sidecar: maybe", "native-sidecar"),
        (
            "outrider.io/skip-inbound-ports: \"9010-9000\"",
            "skip-inbound-ports",
        ),
        (
            "outrider.io/skip-inbound-ports: \"1-60000\"",
            "skip-inbound-ports",
        ),
        (
            "outrider.io/include-outbound-cidrs: 10.0.0.0/40",
            "include-outbound-cidrs",
        ),
        ("outrider.io/proxy-memory-limit: none", "proxy-memory-limit"),
        (
            "outrider.io/include-inbound-ports: \"15020\"",
            "include-inbound-ports",
        ),
        (
            "outrider.io/include-outbound-ports: \"80-x\"",
            "include-outbound-ports",
        ),
        (
            "outrider.io/skip-outbound-ports: \"443\", outrider.io/include-outbound-ports: \"443\"",
            "include-outbound-ports",
        ),
    ];
    for (ann, key) in bad {
        let e = inject::inject(&deployment_with(ann, ""), &opts(false)).unwrap_err();
        assert_eq!(
            e.path,
            format!("spec.template.metadata.annotations[\"outrider.io/{key}\"]"),
            "{e}"
        );
    }
}

#[test]
fn misspelled_fields_are_named_in_a_warning() {
    let text = deployment_with(
        "",
        "        readinessprobe: {httpGet: {port: 80}}\n        env: []\n        args: null\n",
    )
    .replace(
        "      containers:\n",
        "      restartpolicy: Never\n      containers:\n",
    );
    let out = inject::inject(&text, &opts(false)).unwrap();
    assert_eq!(out.warnings.len(), 2, "{:?}", out.warnings);
    assert!(
        out.warnings[0].contains("spec.template.spec.restartpolicy: not a field"),
        "{:?}",
        out.warnings
    );
    assert!(
        out.warnings[1].contains("spec.template.spec.containers[0].readinessprobe: not a field"),
        "{:?}",
        out.warnings
    );
    // Every corpus-like real field is known: the seed injects without a word.
    let seed = read(&root().join("../deploy/examples/payments-api.yaml"));
    assert!(inject::inject(&seed, &opts(false))
        .unwrap()
        .warnings
        .is_empty());
}

#[test]
fn pod_templates_of_unknown_kinds_are_named() {
    let text = "apiVersion: argoproj.io/v1alpha1\nkind: Rollout\nmetadata: {name: r}\nspec:\n  template:\n    spec:\n      containers: [{name: a, image: x}]\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n";
    let out = inject::inject(text, &opts(false)).unwrap();
    assert_eq!(out.warnings, ["document 1 (Rollout): a Rollout with a pod template outrider inject does not know; left as it is"]);
    assert_eq!(
        out.yaml,
        manifest::write(&manifest::parse(text).unwrap()).unwrap()
    );
}

#[test]
fn the_injected_proxy_fails_closed_until_its_first_view_by_its_own_flag() {
    #[derive(clap::Parser)]
    struct Proxy {
        #[command(flatten)]
        args: outrider_proxy::config::ProxyArgs,
    }
    use clap::Parser as _;
    let out = inject::inject(&deployment_with("", ""), &opts(false)).unwrap();
    let docs = manifest::parse(&out.yaml).unwrap();
    let proxy = docs[0]["spec"]["template"]["spec"]["initContainers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str() == Some(inject::PROXY_NAME))
        .unwrap();
    let args: Vec<String> = serde_norway::from_value(proxy["args"].clone()).unwrap();
    assert_eq!(args[0], "proxy");
    // Stated in the pod, not left to the binary's default (which an upgrade could change).
    let flag = args.iter().position(|a| a == "--default-inbound-policy");
    assert_eq!(
        flag.and_then(|i| args.get(i + 1)).map(String::as_str),
        Some("deny"),
        "{args:?}"
    );
    // And the real flag parser reads it so.
    let parsed = Proxy::try_parse_from(
        std::iter::once("outrider-proxy").chain(args[1..].iter().map(String::as_str)),
    )
    .unwrap();
    assert_eq!(
        parsed.args.default_inbound_policy,
        outrider_control::api::DefaultPolicy::Deny
    );
}

#[test]
fn the_proxy_mounts_a_projected_token_unless_the_secret_is_asked_for() {
    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: shop\n  annotations: {}\nspec:\n  serviceAccountName: web-sa\n  containers:\n  - name: web\n    image: web:1\n";
    let token_source = |yaml: &str, opts: &InjectOptions| -> serde_json::Value {
        let out = inject::inject(yaml, opts).unwrap();
        let docs = manifest::parse(&out.yaml).unwrap();
        let pod = serde_json::to_value(&docs[0]).unwrap();
        let volume = pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == inject::IDENTITY_VOLUME)
            .unwrap()
            .clone();
        volume["projected"]["sources"][0].clone()
    };
    // The default: the kubelet's projected token for the audience outrider, at `token`.
    let projected = token_source(POD, &InjectOptions::default());
    assert_eq!(
        projected,
        serde_json::json!({"serviceAccountToken": {
            "audience": "outrider", "expirationSeconds": 43200, "path": "token"}})
    );
    // --identity-token secret: the service account's Secret, as before.
    let secret = InjectOptions {
        identity_token: inject::IdentityToken::Secret,
        ..InjectOptions::default()
    };
    assert_eq!(
        token_source(POD, &secret),
        serde_json::json!({"secret": {"name": "outrider-token-web-sa",
                                      "items": [{"key": "token", "path": "token"}]}})
    );
    // The annotation beats the option, both ways.
    let annotated = |v: &str| POD.replace("{}", &format!("{{outrider.io/identity-token: {v}}}"));
    assert_eq!(
        token_source(&annotated("secret"), &InjectOptions::default())["secret"]["name"],
        "outrider-token-web-sa"
    );
    assert_eq!(token_source(&annotated("projected"), &secret), projected);
    let e = inject::inject(&annotated("jwt"), &InjectOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("outrider.io/identity-token")
            && e.contains("`jwt` is neither projected nor secret"),
        "{e}"
    );
}

/// The writing work of injecting `copies` identical pods: documents, nodes and bytes grow in
/// exact proportion, and one document at a time is held (streamed), whatever the stream's size.
#[test]
fn injecting_n_pods_costs_n_times_one_pod() {
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {app: p}, annotations: {date: \"2024-05-01\"}}\nspec:\n  containers:\n  - name: a\n    image: x:1\n    env: [{name: A, value: \"yes\"}]\n    readinessProbe: {httpGet: {path: /r, port: 80}}\n";
    let work = |copies: usize| {
        let text = vec![pod; copies].join("---\n");
        let opts = inject::InjectOptions::default();
        let mut warnings = Vec::new();
        let (out, work) = manifest::transform_counted(&text, |at, o| {
            inject::inject_object(at, o, &opts, &mut warnings)
        })
        .unwrap();
        assert_eq!(out, inject::inject(&text, &opts).unwrap().yaml);
        work
    };
    let (one, many) = (work(10), work(80));
    assert_eq!(one.by_serde, 0, "{one:?}");
    assert_eq!(many.documents, 8 * one.documents);
    assert_eq!(many.emitted.nodes, 8 * one.emitted.nodes);
    // 80 documents have 70 more `---` separators' worth of bytes in the stream, not here.
    assert_eq!(many.emitted.bytes, 8 * one.emitted.bytes);
    assert_eq!(many.peak_document_nodes, one.peak_document_nodes);
    assert!(one.peak_document_nodes * 10 >= one.emitted.nodes, "{one:?}");
}
