//! The real-world corpus: every manifest under `../shared/corpus/kubernetes/` (relative to the
//! repository; Istio samples and injector inputs, emojivoto, microservices-demo, podinfo,
//! kubernetes/examples and kubernetes/website) goes through `inject` (both sidecar forms),
//! `--uninject` and `resources`, with the checks of the 2026-12-02 audit: injecting twice changes
//! nothing, uninject gives the input back, the init containers run in order (capture, proxy, then
//! the app's own), volumes and security contexts are kept, every probe and lifecycle hook is
//! either left to the kubelet (`exec`, another host) or rewritten to the admin port with the
//! right target in the proxy's table, and each output passes `kubernetes-validate --strict` on
//! 1.29 and on the newest version the validator knows wherever its input does.
//!
//! A missing corpus folder is a failure under `CI=true` and a loud skip otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::core::v1::{Container, LifecycleHandler, PodSpec, Probe};
use outrider_proxy::app_probe::{self, AppProbes, ProbeKind};
use serde_norway::Value;

use crate::inject::{self, InjectOptions};
use crate::manifest::{self, InputError, Workload, WorkloadKind};
use crate::tests::{validator, Sources};

/// API groups the API server no longer serves: their objects are refused, by name.
const REMOVED_APIS: [&str; 3] = ["extensions/v1beta1", "apps/v1beta1", "apps/v1beta2"];

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The corpus files, or `None` (a loud skip) when the folder is missing outside CI.
fn corpus() -> Option<Vec<PathBuf>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/kubernetes");
    if !dir.is_dir() {
        let why =
            "the corpus folder ../shared/corpus/kubernetes (beside the repository) is missing";
        assert!(!ci(), "{why}, and CI=true forbids skipping");
        let _ = writeln!(
            std::io::stderr(),
            "\n**********\nSKIPPED corpus tests: {why}\n**********"
        );
        return None;
    }
    let mut files = Vec::new();
    let mut dirs = vec![dir];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path
                .extension()
                .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
            {
                files.push(path);
            }
        }
    }
    files.sort();
    assert!(files.len() >= 30, "the corpus has {} files", files.len());
    Some(files)
}

fn objects(text: &str) -> Vec<Value> {
    let mut docs = manifest::parse(text).unwrap();
    let mut out = Vec::new();
    manifest::for_each_object::<InputError>(&mut docs, |_, o| {
        out.push(o.clone());
        Ok(())
    })
    .unwrap();
    out
}

fn removed_api(objects: &[Value]) -> Option<String> {
    objects.iter().find_map(|o| {
        let api = o.get("apiVersion")?.as_str()?;
        (WorkloadKind::of(o).is_some() && REMOVED_APIS.contains(&api)).then(|| api.to_owned())
    })
}

fn opts(legacy: bool) -> InjectOptions {
    InjectOptions {
        legacy_sidecar: legacy,
        ..InjectOptions::default()
    }
}

fn names(list: &[Container]) -> Vec<String> {
    list.iter().map(|c| c.name.clone()).collect()
}

fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap()
}

/// A probe or hook handler: (httpGet, tcpSocket, grpc, the rest as JSON with those three out).
fn split(handler: serde_json::Value) -> (serde_json::Value, serde_json::Value) {
    let mut rest = handler;
    let mut taken = serde_json::Map::new();
    if let Some(m) = rest.as_object_mut() {
        for k in ["httpGet", "tcpSocket", "grpc"] {
            if let Some(v) = m.remove(k) {
                taken.insert(k.into(), v);
            }
        }
    }
    (serde_json::Value::Object(taken), rest)
}

/// The checks of a container by kind (`liveness` ... `pre-stop`), as JSON.
fn checks(c: &Container) -> BTreeMap<&'static str, serde_json::Value> {
    let mut out = BTreeMap::new();
    let probes: [(&str, &Option<Probe>); 3] = [
        ("liveness", &c.liveness_probe),
        ("readiness", &c.readiness_probe),
        ("startup", &c.startup_probe),
    ];
    for (kind, p) in probes {
        if let Some(p) = p {
            out.insert(kind, json(p));
        }
    }
    let hooks: [(&str, Option<&LifecycleHandler>); 2] = [
        (
            "post-start",
            c.lifecycle.as_ref().and_then(|l| l.post_start.as_ref()),
        ),
        (
            "pre-stop",
            c.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref()),
        ),
    ];
    for (kind, h) in hooks {
        if let Some(h) = h {
            out.insert(kind, json(h));
        }
    }
    out
}

fn port_of(c: &Container, port: &serde_json::Value) -> u16 {
    match port {
        serde_json::Value::Number(n) => u16::try_from(n.as_u64().unwrap()).unwrap(),
        serde_json::Value::String(name) => {
            let p = c
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_ref() == Some(name));
            u16::try_from(p.expect("a named port").container_port).unwrap()
        }
        other => panic!("port {other}"),
    }
}

/// The audit's semantic checks of one injected workload against its input.
fn check_workload(file: &str, legacy: bool, input: &PodSpec, output: &PodSpec) -> usize {
    let at = format!("{file} ({})", if legacy { "legacy" } else { "native" });
    let (ii, oi) = (
        input.init_containers.clone().unwrap_or_default(),
        output.init_containers.clone().unwrap_or_default(),
    );
    // Order: capture, proxy (native), then the app's own init containers, unchanged.
    let mut want_init = vec![inject::INIT_NAME.to_owned()];
    let mut want_app = names(&input.containers);
    if legacy {
        want_app.insert(0, inject::PROXY_NAME.into());
    } else {
        want_init.push(inject::PROXY_NAME.into());
    }
    want_init.extend(names(&ii));
    assert_eq!(names(&oi), want_init, "{at}");
    assert_eq!(names(&output.containers), want_app, "{at}");
    let proxy = oi
        .iter()
        .chain(&output.containers)
        .find(|c| c.name == inject::PROXY_NAME)
        .unwrap();
    if !legacy {
        assert_eq!(oi[1].restart_policy.as_deref(), Some("Always"), "{at}");
    }
    // Volumes and security contexts kept.
    let out_volumes: Vec<_> = output.volumes.iter().flatten().map(json).collect();
    for v in input.volumes.iter().flatten() {
        assert!(
            out_volumes.contains(&json(v)),
            "{at}: volume {} changed",
            v.name
        );
    }
    assert_eq!(
        out_volumes.len(),
        input.volumes.iter().flatten().count() + 1,
        "{at}"
    );
    assert_eq!(
        json(&input.security_context),
        json(&output.security_context),
        "{at}"
    );
    let by_name = |list: &[Container], name: &str| list.iter().find(|c| c.name == name).cloned();
    for c in &input.containers {
        let o = by_name(&output.containers, &c.name).unwrap();
        assert_eq!(
            json(&c.security_context),
            json(&o.security_context),
            "{at}: {}",
            c.name
        );
    }
    if !legacy {
        for c in &ii {
            let o = by_name(&oi, &c.name).unwrap();
            assert_eq!(
                json(&c.security_context),
                json(&o.security_context),
                "{at}: {}",
                c.name
            );
        }
    }
    // Probes and hooks: left to the kubelet, or rewritten to the admin port with the right
    // target in the proxy's table.
    let table: AppProbes = proxy
        .env
        .iter()
        .flatten()
        .find(|e| e.name == app_probe::ENV)
        .map(|e| app_probe::parse(e.value.as_deref().unwrap()).unwrap())
        .unwrap_or_default();
    let mut rewritten = 0;
    let sidecars = ii
        .iter()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    for c in input.containers.iter().chain(sidecars) {
        let o = by_name(&output.containers, &c.name)
            .or_else(|| by_name(&oi, &c.name))
            .unwrap();
        let (before, after) = (checks(c), checks(&o));
        assert_eq!(
            before.keys().collect::<Vec<_>>(),
            after.keys().collect::<Vec<_>>(),
            "{at}: {}",
            c.name
        );
        for (kind, b) in before {
            let key = format!("{}/{kind}", c.name);
            let (handler, rest) = split(b.clone());
            let (new_handler, new_rest) = split(after[kind].clone());
            assert_eq!(rest, new_rest, "{at}: {key}: timing and other fields kept");
            let other_host = ["httpGet", "tcpSocket"]
                .iter()
                .any(|h| handler[h]["host"].as_str().is_some_and(|h| !h.is_empty()));
            let Some((name, action)) = handler.as_object().unwrap().iter().next() else {
                assert_eq!(
                    b, after[kind],
                    "{at}: {key}: exec/sleep left to the kubelet"
                );
                assert!(!table.contains_key(&key), "{at}: {key}");
                continue;
            };
            if other_host {
                assert_eq!(b, after[kind], "{at}: {key}: another host's probe left");
                continue;
            }
            let get = &new_handler["httpGet"];
            assert_eq!(
                new_handler.as_object().unwrap().len(),
                1,
                "{at}: {key}: one handler"
            );
            assert_eq!(get["port"], serde_json::json!(15020), "{at}: {key}");
            assert_eq!(
                get["path"],
                format!("/app-probe/{key}").as_str(),
                "{at}: {key}"
            );
            let target = table
                .get(&key)
                .unwrap_or_else(|| panic!("{at}: {key} not in the table"));
            let (kind, port) = match name.as_str() {
                "httpGet" if action["scheme"] == "HTTPS" => (ProbeKind::Https, &action["port"]),
                "httpGet" => (ProbeKind::Http, &action["port"]),
                "tcpSocket" => (ProbeKind::Tcp, &action["port"]),
                _ => (ProbeKind::Grpc, &action["port"]),
            };
            assert_eq!(target.kind, kind, "{at}: {key}");
            assert_eq!(target.port, port_of(c, port), "{at}: {key}");
            if kind == ProbeKind::Http || kind == ProbeKind::Https {
                let path = action["path"].as_str().unwrap_or("/");
                assert_eq!(
                    target.path.trim_start_matches('/'),
                    path.trim_start_matches('/')
                );
                let headers = action["httpHeaders"].as_array().map_or(0, Vec::len);
                assert_eq!(target.headers.len(), headers, "{at}: {key}");
            }
            rewritten += 1;
        }
    }
    assert_eq!(
        rewritten,
        table.len(),
        "{at}: the table has only rewritten checks"
    );
    rewritten
}

#[test]
fn every_corpus_file_injects_uninjects_and_reports() {
    let Some(files) = corpus() else {
        return;
    };
    let (mut workloads, mut injected, mut rewritten, mut refused) = (0, 0, 0, Vec::new());
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(file).unwrap();
        let inputs = objects(&text);
        if let Some(api) = removed_api(&inputs) {
            let e = inject::inject(&text, &opts(false)).unwrap_err();
            assert!(e.to_string().contains(&api), "{name}: {e}");
            assert!(crate::resource_reports(&text, false).is_err());
            refused.push(name);
            continue;
        }
        let normalized = manifest::write(&manifest::parse(&text).unwrap()).unwrap();
        for legacy in [false, true] {
            let out = inject::inject(&text, &opts(legacy))
                .unwrap_or_else(|e| panic!("{name}: inject refused: {e}"));
            let again = inject::inject(&out.yaml, &opts(legacy)).unwrap();
            assert_eq!(again.yaml, out.yaml, "{name}: injecting twice changed it");
            let back = inject::uninject(&out.yaml).unwrap();
            assert_eq!(
                back.yaml, normalized,
                "{name}: uninject did not give it back"
            );
            for (t, with_proxy) in [(&text, false), (&text, true), (&out.yaml, false)] {
                crate::resource_reports(t, with_proxy)
                    .unwrap_or_else(|e| panic!("{name}: resources refused: {e}"));
            }
            let outputs = objects(&out.yaml);
            assert_eq!(inputs.len(), outputs.len(), "{name}");
            for (i, (a, b)) in inputs.iter().zip(&outputs).enumerate() {
                let Some(kind) = WorkloadKind::of(a) else {
                    assert_eq!(a, b, "{name}: a non-workload changed");
                    continue;
                };
                let at = manifest::Location::new(format!("object {i}"));
                let wi = Workload::check(kind, a, &at).unwrap();
                let wo = Workload::check(kind, b, &at).unwrap();
                workloads += usize::from(!legacy);
                if inject::is_injected(&wo.pod) && !inject::is_injected(&wi.pod) {
                    injected += usize::from(!legacy);
                    let n = check_workload(&name, legacy, &wi.pod, &wo.pod);
                    rewritten += if legacy { 0 } else { n };
                } else {
                    assert_eq!(a, b, "{name}: a workload left alone changed");
                    assert!(
                        inject::is_injected(&wi.pod)
                            || out.warnings.iter().any(|w| w.contains(&wi.name)),
                        "{name}: {} skipped without a warning: {:?}",
                        wi.name,
                        out.warnings
                    );
                }
            }
        }
    }
    let _ = writeln!(
        std::io::stderr(),
        "corpus: {} files, {workloads} workloads, {injected} injected, {rewritten} checks \
         rewritten, refused (removed APIs): {refused:?}",
        files.len()
    );
    assert!(
        workloads >= 60 && injected >= 55 && rewritten >= 35,
        "too few checked"
    );
}

/// The newest Kubernetes version the validator knows (its default).
fn newest_version() -> String {
    let help = Command::new("kubernetes-validate")
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let at = help
        .find("Defaults to ")
        .expect("the validator's --help names its default");
    help[at + 12..]
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()
        .unwrap()
        .trim_end_matches('.')
        .to_owned()
}

#[test]
fn corpus_outputs_validate_on_1_29_and_the_newest_wherever_their_inputs_do() {
    let Some(files) = corpus() else {
        return;
    };
    if !validator() {
        return;
    }
    let dir = Sources::new("corpus");
    let mut pairs = Vec::new();
    for file in &files {
        let stem = file.file_stem().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(file).unwrap();
        let inputs = objects(&text);
        if removed_api(&inputs).is_some() {
            continue;
        }
        // Lists have no schema: their items go into the files as documents.
        let input = dir.write(
            &format!("{stem}.in.yaml"),
            &manifest::write(&inputs).unwrap(),
        );
        for legacy in [false, true] {
            let out = inject::inject(&text, &opts(legacy)).unwrap();
            let out = manifest::write(&objects(&out.yaml)).unwrap();
            let form = if legacy { "legacy" } else { "native" };
            pairs.push((
                input.clone(),
                dir.write(&format!("{stem}.{form}.yaml"), &out),
            ));
        }
    }
    let newest = newest_version();
    assert!(
        newest.starts_with("1.") && newest.as_str() > "1.29",
        "{newest}"
    );
    let mut inputs_failing = 0;
    for version in ["1.29.0".to_owned(), newest] {
        let all: BTreeSet<&PathBuf> = pairs.iter().flat_map(|(a, b)| [a, b]).collect();
        let out = Command::new("kubernetes-validate")
            .args(["--kubernetes-version", &version, "--strict"])
            .args(&all)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let failed = |f: &Path| stdout.contains(&format!("ERROR {} ", f.display()));
        for f in &all {
            assert!(
                stdout.contains(&format!("{} passed", f.display())) || failed(f),
                "{version}: {} not validated:\n{stdout}",
                f.display()
            );
        }
        for (input, output) in &pairs {
            if failed(input) {
                inputs_failing += 1;
                continue;
            }
            assert!(
                !failed(output),
                "{version}: {} passes but its injected form does not:\n{stdout}",
                input.display()
            );
        }
    }
    // Only the pod-level-resources Pod fails on 1.29 (its own spec.resources), in both forms.
    assert!(inputs_failing <= 2, "{inputs_failing} inputs failing");
}

#[test]
fn the_writer_writes_every_corpus_document_as_libyaml_does() {
    let Some(files) = corpus() else {
        return;
    };
    let (mut taken, mut total) = (0, 0);
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let Ok(mut docs) = manifest::parse(&text) else {
            continue;
        };
        if let Ok(out) = inject::inject(&text, &opts(false)) {
            docs.extend(manifest::parse(&out.yaml).unwrap());
        }
        for doc in &docs {
            total += 1;
            taken += usize::from(crate::emit::tests::same_as_serde(doc));
        }
    }
    // Only documents with multi-line strings (ConfigMaps, scripts) are left to serde_norway.
    assert!(taken * 10 >= total * 8, "{taken} of {total}");
}
