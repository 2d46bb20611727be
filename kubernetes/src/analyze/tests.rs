//! Golden-file tests of `outrider analyze`: hand-made manifests (one file per group of checks
//! under `tests/analyze/manifests/`), the shared corpus of real-world manifests
//! (`../shared/corpus/kubernetes/` from the repository root; goldens under
//! `tests/analyze/corpus/`), and pod statuses written as the API server writes them
//! (`tests/analyze/status/`). Beside each golden, a table of the findings each case must hold,
//! so a blessed golden cannot hide a check that stopped firing.
//!
//! `OUTRIDER_BLESS=1 cargo test -p outrider-kubernetes` rewrites the expected files. Without the
//! corpus folder the corpus test prints a loud SKIPPED line, and fails under `CI=true`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::checks::{self, Options};
use super::{render_json, render_text, status, Finding, Severity};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn dir(name: &str) -> PathBuf {
    root().join("tests/analyze").join(name)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "json"))
        .collect();
    files.sort();
    files
}

fn bless() -> bool {
    std::env::var("OUTRIDER_BLESS").is_ok_and(|v| v == "1")
}

/// Compares `actual` with the file `expected` (or rewrites it when blessing); the stale ones
/// go to `stale`.
fn golden(expected: &Path, actual: &str, stale: &mut Vec<String>) {
    if bless() {
        std::fs::create_dir_all(expected.parent().unwrap()).unwrap();
        std::fs::write(expected, actual).unwrap();
    } else if std::fs::read_to_string(expected).ok().as_deref() != Some(actual) {
        stale.push(expected.display().to_string());
    }
}

fn analyze(text: &str) -> Vec<Finding> {
    checks::analyze(text, &Options::default()).unwrap()
}

fn expected(input: &Path, suffix: &str) -> PathBuf {
    let stem = input.file_name().unwrap().to_string_lossy();
    let stem = stem.rsplit_once('.').map_or(&*stem, |(s, _)| s);
    input.with_file_name(format!("{stem}.{suffix}"))
}

#[test]
fn manifest_goldens_match() {
    let mut stale = Vec::new();
    let files = inputs(&dir("manifests"));
    assert!(files.len() >= 6, "{files:?}");
    for input in files {
        let text = render_text(&analyze(&read(&input)));
        golden(&expected(&input, "findings.txt"), &text, &mut stale);
    }
    assert!(
        stale.is_empty(),
        "analyze output differs from {stale:?}; review, then rewrite with OUTRIDER_BLESS=1"
    );
}

/// (file, check, severity, object, path): what each hand-made case must find.
const MUST: &[(&str, &str, Severity, &str, &str)] = &[
    (
        "mesh.yaml",
        "inject-refused",
        Severity::Error,
        "Deployment edge/search",
        "spec.template.metadata.annotations[\"outrider.io/proxy-memory-limit\"]",
    ),
    (
        "wait-loops.yaml",
        "wait-without-dns-check",
        Severity::Warning,
        "Deployment shop/orders",
        "spec.template.spec.initContainers[0].command",
    ),
    (
        "wait-loops.yaml",
        "wait-without-timeout",
        Severity::Warning,
        "Deployment shop/orders",
        "spec.template.spec.initContainers[0].command",
    ),
    (
        "wait-loops.yaml",
        "wait-target-namespace",
        Severity::Error,
        "Deployment shop/orders",
        "spec.template.spec.initContainers[0].command",
    ),
    (
        "wait-loops.yaml",
        "wait-target-namespace",
        Severity::Error,
        "Deployment shop/orders",
        "spec.template.spec.initContainers[1].args",
    ),
    (
        "wait-loops.yaml",
        "wait-bad-target",
        Severity::Error,
        "Deployment shop/orders",
        "spec.template.spec.initContainers[2].args",
    ),
    (
        "job-legacy-sidecar.yaml",
        "job-legacy-sidecar",
        Severity::Error,
        "Job reports/nightly-report",
        "spec.template.spec.containers[1]",
    ),
    (
        "job-legacy-sidecar.yaml",
        "job-legacy-sidecar",
        Severity::Error,
        "CronJob reports/db-backup",
        "spec.jobTemplate.spec.template.spec.containers[1]",
    ),
    (
        "job-legacy-sidecar.yaml",
        "no-requests",
        Severity::Warning,
        "Job reports/nightly-report",
        "spec.template.spec.containers[1].resources",
    ),
    (
        "native-sidecars.yaml",
        "sidecar-after-dependent-init",
        Severity::Error,
        "Pod finance/billing",
        "spec.initContainers[0]",
    ),
    (
        "native-sidecars.yaml",
        "native-sidecar-version",
        Severity::Info,
        "Pod finance/billing",
        "spec.initContainers[1]",
    ),
    (
        "resources.yaml",
        "no-requests",
        Severity::Warning,
        "Deployment shop/checkout",
        "spec.template.spec.initContainers[0].resources",
    ),
    (
        "resources.yaml",
        "no-requests",
        Severity::Warning,
        "Deployment shop/checkout",
        "spec.template.spec.containers[1].resources",
    ),
    (
        "resources.yaml",
        "limit-below-request",
        Severity::Error,
        "Deployment shop/checkout",
        "spec.template.spec.containers[0].resources.limits.memory",
    ),
    (
        "resources.yaml",
        "limit-below-request",
        Severity::Error,
        "Deployment shop/checkout",
        "spec.template.spec.containers[0].resources.limits.cpu",
    ),
    (
        "resources.yaml",
        "pod-resources",
        Severity::Info,
        "StatefulSet finance/ledger",
        "spec.template.spec",
    ),
    (
        "mesh.yaml",
        "tcp-probe-meshed",
        Severity::Warning,
        "Deployment edge/gateway",
        "spec.template.spec.containers[0].livenessProbe.tcpSocket",
    ),
    (
        "mesh.yaml",
        "probe-on-proxy-port",
        Severity::Error,
        "Deployment edge/gateway",
        "spec.template.spec.containers[0].readinessProbe.httpGet.port",
    ),
    (
        "mesh.yaml",
        "port-collision",
        Severity::Error,
        "Deployment edge/gateway",
        "spec.template.spec.containers[0].ports[1].containerPort",
    ),
    (
        "mesh.yaml",
        "host-network",
        Severity::Warning,
        "DaemonSet monitoring/node-agent",
        "spec.template.spec.hostNetwork",
    ),
    (
        "migration-secrets.json",
        "migration-init",
        Severity::Warning,
        "Deployment identity/accounts",
        "spec.template.spec.initContainers[0]",
    ),
    (
        "migration-secrets.json",
        "secret-in-env",
        Severity::Info,
        "Deployment identity/accounts",
        "spec.template.spec.initContainers[0].envFrom[0]",
    ),
    (
        "migration-secrets.json",
        "secret-in-env",
        Severity::Info,
        "Deployment identity/accounts",
        "spec.template.spec.containers[0].env[0]",
    ),
    (
        "wait-loops.yaml",
        "wait-without-timeout",
        Severity::Warning,
        "Deployment shop/orders",
        "spec.template.spec.initContainers[4].command",
    ),
    (
        "wait-loops.yaml",
        "wait-target-namespace",
        Severity::Error,
        "Deployment shop/orders",
        "spec.template.spec.initContainers[4].command",
    ),
    (
        "wait-loops.yaml",
        "wait-passes-through-proxy",
        Severity::Error,
        "Deployment shop/orders",
        "spec.template.spec.initContainers[0].command",
    ),
    (
        "wait-loops.yaml",
        "wait-passes-through-proxy",
        Severity::Error,
        "Deployment shop/orders",
        "spec.template.spec.initContainers[5].command",
    ),
    (
        "wait-loops.yaml",
        "wait-passes-through-proxy",
        Severity::Error,
        "Deployment shop/orders",
        "spec.template.spec.initContainers[6].args",
    ),
    (
        "wait-loops.yaml",
        "wait-without-dns-check",
        Severity::Warning,
        "Deployment shop/batch-import",
        "spec.template.spec.initContainers[0].command",
    ),
];

/// (file, check, object): what a case must not find (the negative half of each check).
const MUST_NOT: &[(&str, &str, &str)] = &[
    // The bounded nslookup-first wait and `outrider wait` raise no loop finding.
    (
        "wait-loops.yaml",
        "wait-without-dns-check",
        "spec.template.spec.initContainers[3]",
    ),
    (
        "wait-loops.yaml",
        "wait-without-timeout",
        "spec.template.spec.initContainers[1]",
    ),
    (
        "wait-loops.yaml",
        "wait-without-timeout",
        "spec.template.spec.initContainers[3]",
    ),
    // The sidecar placed before its reader, and the Job's work itself.
    (
        "native-sidecars.yaml",
        "sidecar-after-dependent-init",
        "spec.initContainers[3]",
    ),
    (
        "job-legacy-sidecar.yaml",
        "job-legacy-sidecar",
        "spec.template.spec.containers[0]",
    ),
    // Opted out of the mesh: its TCP probe means what it says.
    (
        "mesh.yaml",
        "tcp-probe-meshed",
        "Deployment edge/legacy-tcp",
    ),
    // Guaranteed, probed by exec: nothing but its figures.
    (
        "resources.yaml",
        "no-requests",
        "StatefulSet finance/ledger",
    ),
    // nslookup resolves: no DNS-check finding for it.
    (
        "wait-loops.yaml",
        "wait-without-dns-check",
        "spec.template.spec.initContainers[4]",
    ),
    // wget fails on a 5xx, `outrider wait` settles, and no proxy runs in an opted-out pod.
    (
        "wait-loops.yaml",
        "wait-passes-through-proxy",
        "spec.template.spec.initContainers[3]",
    ),
    (
        "wait-loops.yaml",
        "wait-passes-through-proxy",
        "spec.template.spec.initContainers[1]",
    ),
    (
        "wait-loops.yaml",
        "wait-passes-through-proxy",
        "Deployment shop/batch-import",
    ),
    (
        "native-sidecars.yaml",
        "wait-passes-through-proxy",
        "Pod finance/billing",
    ),
];

#[test]
fn every_check_fires_where_it_should_and_not_elsewhere() {
    for (file, check, severity, object, path) in MUST {
        let findings = analyze(&read(&dir("manifests").join(file)));
        assert!(
            findings.iter().any(|f| f.check == *check
                && f.severity == *severity
                && f.object == *object
                && f.path == *path
                && !f.why.is_empty()
                && !f.fix.is_empty()),
            "{file}: no {severity} {check} on {object} {path}:\n{}",
            render_text(&findings)
        );
    }
    for (file, check, place) in MUST_NOT {
        let findings = analyze(&read(&dir("manifests").join(file)));
        assert!(
            !findings
                .iter()
                .any(|f| f.check == *check && (f.path.starts_with(place) || f.object == *place)),
            "{file}: unexpected {check} at {place}:\n{}",
            render_text(&findings)
        );
    }
}

#[test]
fn waits_behind_the_proxy_follow_the_injected_form() {
    let text = read(&dir("manifests/wait-loops.yaml"));
    let through = |text: &str| -> Vec<String> {
        analyze(text)
            .into_iter()
            .filter(|f| f.check == "wait-passes-through-proxy")
            .map(|f| f.path)
            .collect()
    };
    // Native form: outrider-init, outrider-proxy, then the app's init containers, behind it.
    let native = crate::inject::inject(&text, &crate::inject::InjectOptions::default()).unwrap();
    assert_eq!(
        through(&native.yaml),
        [
            "spec.template.spec.initContainers[2].command",
            "spec.template.spec.initContainers[7].command",
            "spec.template.spec.initContainers[8].args"
        ]
    );
    // Legacy form: the app's init containers run as the proxy's uid, not captured.
    let legacy = crate::inject::InjectOptions {
        legacy_sidecar: true,
        ..crate::inject::InjectOptions::default()
    };
    let legacy = crate::inject::inject(&text, &legacy).unwrap();
    assert_eq!(through(&legacy.yaml), Vec::<String>::new());
}

#[test]
fn the_pod_resources_come_from_outrider_resources() {
    let findings = analyze(&read(&dir("manifests/resources.yaml")));
    let ledger = findings
        .iter()
        .find(|f| f.check == "pod-resources" && f.object == "StatefulSet finance/ledger")
        .unwrap();
    assert!(
        ledger
            .message
            .starts_with("the pod requests cpu 500m, memory 1Gi ")
            // The proxy's requests are below its limits: injected, the pod is Burstable.
            && ledger.message.ends_with(
                "QoS class Guaranteed; with the Outrider proxy injected: cpu 600m, memory 1152Mi, QoS class Burstable"
            ),
        "{}",
        ledger.message
    );
    let checkout = findings
        .iter()
        .find(|f| f.check == "pod-resources" && f.object == "Deployment shop/checkout")
        .unwrap();
    // 300m + 0 + 0 CPU and 512Mi memory requested; limits set on one container only.
    assert!(
        checkout.message.contains("cpu 300m, memory 512Mi")
            && checkout.message.ends_with("QoS class Burstable"),
        "{}",
        checkout.message
    );
    let seed = analyze(include_str!("../../../deploy/examples/payments-api.yaml"));
    let pod = seed.iter().find(|f| f.check == "pod-resources").unwrap();
    // The figures `outrider resources` prints for the seed (resources.rs tests).
    assert!(
        pod.message
            .starts_with("the pod requests cpu 600m, memory 640Mi "),
        "{}",
        pod.message
    );
}

#[test]
fn native_sidecars_on_an_old_cluster_are_an_error() {
    let text = read(&dir("manifests/native-sidecars.yaml"));
    let at = |v| {
        checks::analyze(
            &text,
            &Options {
                kubernetes_version: Some(v),
            },
        )
        .unwrap()
        .into_iter()
        .filter(|f| f.check == "native-sidecar-version")
        .map(|f| f.severity)
        .collect::<Vec<_>>()
    };
    assert_eq!(at((1, 28)), [Severity::Error]);
    assert_eq!(at((1, 29)), []);
    assert_eq!(at((1, 33)), []);
    assert_eq!(super::parse_version("v1.28.4"), Ok((1, 28)));
    assert_eq!(super::parse_version("1.29+"), Ok((1, 29)));
    assert!(super::parse_version("latest").is_err());
}

#[test]
fn json_output_holds_every_field_and_the_summary() {
    let findings = analyze(&read(&dir("manifests/job-legacy-sidecar.yaml")));
    let json: serde_json::Value = serde_json::from_str(&render_json(&findings)).unwrap();
    let list = json["findings"].as_array().unwrap();
    assert_eq!(list.len(), findings.len());
    let first = &list[0];
    for key in [
        "severity", "check", "object", "document", "path", "message", "why", "fix",
    ] {
        assert!(first[key].is_string(), "{key}: {first}");
    }
    assert_eq!(first["severity"], "error");
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    assert_eq!(json["summary"]["errors"], errors);
    assert!(super::fails(&findings, Severity::Error));
    let clean = analyze(&read(&dir("manifests/resources.yaml")))
        .into_iter()
        .filter(|f| f.object == "StatefulSet finance/ledger")
        .collect::<Vec<_>>();
    assert!(!super::fails(&clean, Severity::Warning));
    assert!(super::fails(&clean, Severity::Info));
}

#[test]
fn bad_manifests_are_errors_naming_the_document_and_field() {
    let e = checks::analyze("kind: Pod\n---\na: [\n", &Options::default()).unwrap_err();
    assert_eq!(e.document, "document 2");
    let e = checks::analyze(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - {name: a, resources: {requests: {memory: 12GB}}}\n",
        &Options::default(),
    )
    .unwrap_err();
    assert_eq!(
        e.path, "spec.containers[0].resources.requests.memory",
        "{e}"
    );
    let e = checks::analyze(
        "apiVersion: batch/v1\nkind: Job\nmetadata: {name: j}\nspec:\n  template:\n    spec:\n      containers: [{name: a, ports: [{containerPort: web}]}]\n",
        &Options::default(),
    )
    .unwrap_err();
    assert_eq!(
        e.path,
        "spec.template.spec.containers[0].ports[0].containerPort"
    );
}

/// Whether the shared corpus is there; a loud skip otherwise, a failure under `CI=true`.
fn corpus() -> Option<PathBuf> {
    let dir = root().join("../../shared/corpus/kubernetes");
    if dir.is_dir() {
        return Some(dir);
    }
    let why = "needs the shared corpus at ../shared/corpus/kubernetes (from the repository root)";
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(!ci, "{why}, and CI=true forbids skipping");
    let _ = writeln!(
        std::io::stderr(),
        "\n**********\nSKIPPED analyze corpus goldens: {why}\n**********"
    );
    None
}

fn corpus_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = inputs(dir);
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(corpus_files(&path));
        }
    }
    files.sort();
    files
}

#[test]
fn corpus_goldens_match() {
    let Some(corpus) = corpus() else { return };
    let mut stale = Vec::new();
    let files = corpus_files(&corpus);
    assert!(files.len() >= 30, "{} files", files.len());
    let mut analyzed = 0;
    for input in files {
        let rel = input.strip_prefix(&corpus).unwrap();
        // A file the shared reader refuses is recorded as its error (exit 2 for the user).
        let text = match checks::analyze(&read(&input), &Options::default()) {
            Ok(findings) => {
                analyzed += 1;
                render_text(&findings)
            }
            Err(e) => format!("error: {e}\n"),
        };
        let expected = dir("corpus").join(rel.with_extension("findings.txt"));
        golden(&expected, &text, &mut stale);
    }
    assert!(analyzed >= 25, "only {analyzed} corpus files analyzed");
    assert!(
        stale.is_empty(),
        "analyze output differs from {stale:?}; review, then rewrite with OUTRIDER_BLESS=1"
    );
}

#[test]
fn corpus_cases_find_what_a_reader_would() {
    let Some(corpus) = corpus() else { return };
    let of = |file: &str| analyze(&read(&corpus.join(file)));
    // The Kubernetes docs' Job with a native sidecar: nothing blocks its completion.
    let job = of("k8sweb-job-sidecar.yaml");
    assert!(!job.iter().any(|f| f.check == "job-legacy-sidecar"));
    assert!(job.iter().any(|f| f.check == "native-sidecar-version"));
    assert!(job.iter().any(|f| f.check == "no-requests"
        && f.severity == Severity::Warning
        && f.path == "spec.template.spec.initContainers[0].resources"));
    // The docs' TCP liveness example would always pass behind the proxy.
    let tcp = of("k8sweb-tcp-probe-pod.yaml");
    assert!(tcp
        .iter()
        .any(|f| f.check == "tcp-probe-meshed"
            && f.path == "spec.containers[0].livenessProbe.tcpSocket"));
    // Istio's already-injected pod: its legacy istio-proxy holds no Job, but its ports do not
    // collide with ours.
    let istio = of("istio-injector-testdata/istio-already-injected.yaml");
    assert!(!istio.iter().any(|f| f.check == "port-collision"));
}

#[test]
fn status_goldens_match() {
    let mut stale = Vec::new();
    let files = inputs(&dir("status"));
    assert!(files.len() >= 9, "{files:?}");
    for input in files {
        let text = render_text(&status::diagnose(&read(&input)).unwrap());
        golden(&expected(&input, "diagnosis.txt"), &text, &mut stale);
    }
    assert!(
        stale.is_empty(),
        "diagnosis differs from {stale:?}; review, then rewrite with OUTRIDER_BLESS=1"
    );
}

/// (fixture, check, severity, the next command's text): what each start state must say.
const STATES: &[(&str, &str, Severity, &str)] = &[
    (
        "init-running.yaml",
        "init-running",
        Severity::Warning,
        "kubectl logs payments-api-7c9d8b6f5-x2x7k -c wait-for-postgres -n production -f",
    ),
    (
        "init-crashloop.yaml",
        "crash-loop",
        Severity::Error,
        "kubectl logs payments-api-7c9d8b6f5-x2x7k -c migrate -n production --previous",
    ),
    (
        "sidecar-not-started.yaml",
        "sidecar-not-started",
        Severity::Warning,
        "kubectl describe pod payments-api-7c9d8b6f5-q8w4n -n production",
    ),
    (
        "sidecar-not-started.yaml",
        "proxy-not-ready",
        Severity::Warning,
        "kubectl logs payments-api-7c9d8b6f5-q8w4n -c outrider-proxy -n production",
    ),
    (
        "startup-probe.yaml",
        "startup-probe",
        Severity::Warning,
        "kubectl describe pod search-0 -n search",
    ),
    (
        "err-image-pull.yaml",
        "image-pull",
        Severity::Error,
        "kubectl describe pod orders-5f7b9c-mz2tq -n shop",
    ),
    (
        "image-pull-backoff.yaml",
        "image-pull",
        Severity::Error,
        "kubectl describe pod orders-5f7b9c-h7d2p -n shop",
    ),
    (
        "oomkilled-sidecar.yaml",
        "oom-killed",
        Severity::Error,
        "kubectl logs checkout-6d4f8-2kqzt -c log-forwarder -n shop --previous",
    ),
    (
        "job-legacy-sidecar.yaml",
        "job-legacy-sidecar",
        Severity::Error,
        "kubectl delete pod nightly-report-8kx2m -n reports",
    ),
    (
        "unschedulable.yaml",
        "unschedulable",
        Severity::Error,
        "kubectl describe pod ledger-0 -n finance",
    ),
    (
        "running.yaml",
        "pod-running",
        Severity::Info,
        "kubectl describe pod payments-api-7c9d8b6f5-r2d2c -n production",
    ),
    (
        "evicted.yaml",
        "pod-failed",
        Severity::Error,
        "kubectl describe pod reports-api-7d9f-5xk2b -n reports",
    ),
    (
        "config-error.yaml",
        "config-error",
        Severity::Error,
        "kubectl describe pod accounts-6b5c4-wq7zt -n identity",
    ),
    (
        "legacy-proxy-not-ready.yaml",
        "not-ready",
        Severity::Warning,
        "kubectl describe pod web-5c7d9-k2j4h -n shop",
    ),
    (
        "legacy-proxy-not-ready.yaml",
        "proxy-not-ready",
        Severity::Warning,
        "kubectl logs web-5c7d9-k2j4h -c outrider-proxy -n shop",
    ),
    (
        "restarted.yaml",
        "oom-killed",
        Severity::Error,
        "kubectl logs checkout-6d4f8-9vt5m -c log-forwarder -n shop --previous",
    ),
    (
        "restarted.yaml",
        "restarted",
        Severity::Warning,
        "kubectl logs checkout-6d4f8-9vt5m -c checkout -n shop --previous",
    ),
];

#[test]
fn every_start_state_is_named_with_the_next_command() {
    for (file, check, severity, command) in STATES {
        let findings = status::diagnose(&read(&dir("status").join(file))).unwrap();
        assert!(
            findings
                .iter()
                .any(|f| f.check == *check && f.severity == *severity && f.fix.contains(command)),
            "{file}: no {severity} {check} with `{command}`:\n{}",
            render_text(&findings)
        );
    }
    // A healthy pod is nothing but its one info.
    let ok = status::diagnose(&read(&dir("status/running.yaml"))).unwrap();
    assert_eq!(ok.len(), 1, "{}", render_text(&ok));
}

#[test]
fn events_beside_the_pod_are_quoted() {
    let findings = status::diagnose(&read(&dir("status/sidecar-not-started.yaml"))).unwrap();
    let sidecar = findings
        .iter()
        .find(|f| f.check == "sidecar-not-started")
        .unwrap();
    assert!(
        sidecar.message.contains(
            "last event: Unhealthy: Startup probe failed: HTTP probe failed with statuscode: 503 (x14)"
        ),
        "{}",
        sidecar.message
    );
}

#[test]
fn a_list_of_pods_is_diagnosed_pod_by_pod_and_events_stay_with_their_pod() {
    // `kubectl get pods -o yaml`: a List whose items are pods.
    let mut items = Vec::new();
    for file in ["running.yaml", "init-crashloop.yaml"] {
        items.extend(crate::manifest::parse(&read(&dir("status").join(file))).unwrap());
    }
    let mut list = serde_norway::Mapping::new();
    list.insert("apiVersion".into(), "v1".into());
    list.insert("kind".into(), "List".into());
    list.insert("items".into(), serde_norway::Value::Sequence(items));
    let text = crate::manifest::write(&[serde_norway::Value::Mapping(list)]).unwrap();
    let findings = status::diagnose(&text).unwrap();
    let seen: Vec<(&str, &str)> = findings
        .iter()
        .map(|f| (f.document.as_str(), f.check))
        .collect();
    assert_eq!(
        seen,
        [
            ("document 1, items[0]", "pod-running"),
            ("document 1, items[1]", "crash-loop")
        ]
    );
    // The events beside a pod of another name are not quoted for this one.
    let other = read(&dir("status/sidecar-not-started.yaml")).replacen(
        "  name: payments-api-7c9d8b6f5-q8w4n\n  namespace: production\n  ownerReferences",
        "  name: payments-api-7c9d8b6f5-zzzzz\n  namespace: production\n  ownerReferences",
        1,
    );
    let findings = status::diagnose(&other).unwrap();
    let sidecar = findings
        .iter()
        .find(|f| f.check == "sidecar-not-started")
        .unwrap();
    assert!(sidecar.object.ends_with("zzzzz"), "{}", sidecar.object);
    assert!(
        !sidecar.message.contains("last event"),
        "{}",
        sidecar.message
    );
}

#[test]
fn a_manifest_or_garbage_given_as_status_is_an_error() {
    let seed = include_str!("../../../deploy/examples/payments-api.yaml");
    let e = status::diagnose(seed).unwrap_err();
    assert!(e.message.contains("no Pod"), "{e}");
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: a, image: a}]\n";
    let e = status::diagnose(pod).unwrap_err();
    assert_eq!(e.path, "status", "{e}");
    let e = status::diagnose("kind: Pod\nmetadata: {name: p}\nstatus: {phase: 7}\n").unwrap_err();
    assert_eq!(e.path, "status.phase", "{e}");
    let e = status::diagnose("just: [text\n").unwrap_err();
    assert_eq!(e.document, "document 1", "{e}");
}

#[test]
fn cut_and_mangled_inputs_are_errors_or_findings_never_panics() {
    // Every fixture cut at every line, and with each line dropped in turn: an error or a
    // report, never a panic (statuses through --status, manifests through -f).
    let mangled = |input: &Path| {
        let text = read(input);
        let lines: Vec<&str> = text.lines().collect();
        (0..lines.len())
            .flat_map(|i| {
                let cut = lines[..i].join("\n");
                let dropped = [&lines[..i], &lines[i + 1..]].concat().join("\n");
                [cut, dropped]
            })
            .collect::<Vec<_>>()
    };
    for input in inputs(&dir("status")) {
        for t in mangled(&input) {
            let _ = status::diagnose(&t);
        }
    }
    for input in inputs(&dir("manifests")) {
        for t in mangled(&input) {
            let _ = checks::analyze(&t, &Options::default());
        }
    }
}

#[test]
fn every_fixture_passes_kubernetes_validate() {
    if !crate::tests::validator() {
        return;
    }
    // Each object on its own (the validator has no schema for `List`).
    let tmp = std::env::temp_dir().join(format!("outrider-analyze-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let mut files = Vec::new();
    for sub in ["manifests", "status"] {
        for input in inputs(&dir(sub)) {
            let mut docs = crate::manifest::parse(&read(&input)).unwrap();
            let mut objects = Vec::new();
            crate::manifest::for_each_object::<crate::manifest::InputError>(&mut docs, |_, o| {
                objects.push(o.clone());
                Ok(())
            })
            .unwrap();
            let name = format!(
                "{sub}-{}.yaml",
                input.file_stem().unwrap().to_string_lossy()
            );
            let file = tmp.join(name);
            // As JSON documents: timestamps stay quoted strings for the validator's YAML 1.1.
            let text: Vec<String> = objects
                .iter()
                .map(|o| serde_json::to_string(o).unwrap())
                .collect();
            std::fs::write(&file, text.join("\n---\n")).unwrap();
            files.push(file);
        }
    }
    let out = crate::tests::validate(&files);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubernetes-validate failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in &files {
        assert!(
            stdout.contains(&format!("{} passed", f.display())),
            "{} not validated:\n{stdout}",
            f.display()
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
