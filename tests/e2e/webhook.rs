//! The control plane's admission webhook (`POST /v1/inject`) end to end: real `AdmissionReview`
//! bodies for the pods the workloads of `../shared/corpus/kubernetes/` make (as their
//! controllers make them: `generateName`, owner references, `pod-template-hash`), sent to the
//! real `outrider control --kubernetes` over HTTP; the JSON patch it answers, applied to the
//! pod, must give the pod template that the real `outrider inject` makes of the workload.
//! Namespace labels come from the stand-in API server. Also: the control plane writes its trust
//! anchors into deploy/injector.yaml's `caBundle` and serves the webhook over TLS to a client
//! that trusts only that bundle, and every manifest under `deploy/` passes `kubernetes-validate
//! --strict` for Kubernetes 1.29 and the newest version the validator knows.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

use crate::control::{ca_flags, ca_init, start_control_with, wait_until, CHANGE_TIMEOUT, OUTRIDER};
use crate::kubeapi::KubeApi;
use crate::support::{self, TempDir};

/// One POST with a JSON body on a fresh connection; the status and the body.
fn post(addr: SocketAddr, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: control\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&out[..split]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, out[split + 4..].to_vec())
}

/// The AdmissionReview the API server sends for creating `pod` in `namespace`.
fn review(uid: &str, namespace: &str, pod: &Value) -> Vec<u8> {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace, "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                         "groups": ["system:serviceaccounts"]},
            "object": pod, "oldObject": null, "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    })
    .to_string()
    .into_bytes()
}

/// What the webhook answered: whether it allowed the pod, and the pod after its patch.
fn admit(cp: SocketAddr, uid: &str, namespace: &str, pod: &Value) -> (bool, Value, String) {
    let (status, body) = post(cp, "/v1/inject", &review(uid, namespace, pod));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let answer: Value = serde_json::from_slice(&body).unwrap();
    let rsp = &answer["response"];
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(rsp["uid"], uid, "the answer names the request");
    let mut patched = pod.clone();
    if let Some(patch) = rsp["patch"].as_str() {
        assert_eq!(rsp["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(patch)
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        json_patch::patch(&mut patched, &patch).unwrap();
    }
    let message = rsp["status"]["message"].as_str().unwrap_or("").to_string();
    (rsp["allowed"] == true, patched, message)
}

/// The pod a controller makes from `workload`'s template in `namespace`: the template's
/// metadata and spec, with `generateName` and owner as the controller sets them.
fn controller_pod(workload: &Value, namespace: &str) -> Value {
    let kind = workload["kind"].as_str().unwrap();
    let name = workload["metadata"]["name"].as_str().unwrap();
    let template = match kind {
        "Pod" => {
            let mut pod = workload.clone();
            pod["metadata"]["namespace"] = json!(namespace);
            return pod;
        }
        "CronJob" => &workload["spec"]["jobTemplate"]["spec"]["template"],
        _ => &workload["spec"]["template"],
    };
    let mut meta = template["metadata"].clone();
    if meta.is_null() {
        meta = json!({});
    }
    let (owner_kind, owner) = match kind {
        "Deployment" => {
            meta["labels"]["pod-template-hash"] = json!("5d4f8c7b9");
            ("ReplicaSet", format!("{name}-5d4f8c7b9"))
        }
        "CronJob" => ("Job", format!("{name}-29431200")),
        other => (other, name.to_string()),
    };
    meta["namespace"] = json!(namespace);
    meta["generateName"] = json!(format!("{owner}-"));
    meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": owner_kind, "name": owner,
                                      "uid": "7f3c", "controller": true, "blockOwnerDeletion": true}]);
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template["spec"]})
}

/// `outrider inject FLAGS` on one workload: its output as JSON, or its error.
fn cli_inject(dir: &Path, workload: &Value, flags: &[&str]) -> Result<Value, String> {
    let file = dir.join("workload.json");
    std::fs::write(&file, workload.to_string()).unwrap();
    let out = support::run(
        Command::new(OUTRIDER)
            .arg("inject")
            .args(flags)
            .arg("-f")
            .arg(&file),
    );
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    let docs = outrider_kubernetes::manifest::parse(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(docs.len(), 1);
    Ok(serde_json::to_value(&docs[0]).unwrap())
}

/// The corpus's workloads, one JSON value each (Lists unrolled), with their file.
fn corpus_workloads() -> Vec<(PathBuf, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "json"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let Ok(mut docs) = outrider_kubernetes::manifest::parse(&text) else {
            continue;
        };
        let walked = outrider_kubernetes::manifest::for_each_object::<
            outrider_kubernetes::manifest::InputError,
        >(&mut docs, |_, o| {
            // A workload of an API group the API server no longer serves (extensions/v1beta1,
            // which the CLI refuses by name) makes no pods on a 1.29+ cluster: nothing to admit.
            let retired = o
                .get("apiVersion")
                .and_then(|v| v.as_str())
                .is_some_and(|v| v.starts_with("extensions/") || v.contains("v1beta"));
            if outrider_kubernetes::manifest::WorkloadKind::of(o).is_some() && !retired {
                out.push((file.clone(), serde_json::to_value(&*o).unwrap()));
            }
            Ok(())
        });
        walked.unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
    out
}

/// The stand-in API server with namespaces `shop` (labelled for injection) and `plain`, and a
/// control plane with `--kubernetes` against it and `flags`.
fn webhook_control(dir: &TempDir, flags: &[&str]) -> (KubeApi, SocketAddr, support::ChildGuard) {
    let api = KubeApi::start();
    api.apply(
        "namespaces",
        json!({"metadata": {"name": "shop", "labels": {"outrider.io/inject": "enabled"}}}),
    );
    api.apply("namespaces", json!({"metadata": {"name": "plain"}}));
    std::fs::write(dir.path().join("mesh.yaml"), "{}\n").unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let mut args = vec![
        "--plaintext",
        "--kubernetes",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ];
    args.extend_from_slice(flags);
    let (cp, control) = start_control_with(Some(dir), None, &args);
    (api, cp, control)
}

/// Every corpus workload's pod through the webhook at `cp` and the same workload through
/// `outrider inject` with `cli_flags`: the patched pod equals the CLI's, and a workload the CLI
/// refuses is denied for the same field. The injected pods, each with its original.
fn webhook_equals_cli(
    cp: SocketAddr,
    dir: &TempDir,
    control: &support::ChildGuard,
    cli_flags: &[&str],
) -> Vec<(String, Value, Value)> {
    let (mut compared, mut denied, mut untouched) = (0, 0, 0);
    let mut injected_pods = Vec::new();
    for (i, (file, workload)) in corpus_workloads().into_iter().enumerate() {
        let what = format!(
            "{} {} {}",
            file.file_name().unwrap().to_string_lossy(),
            workload["kind"],
            workload["metadata"]["name"]
        );
        let pod = controller_pod(&workload, "shop");
        let (allowed, patched, message) = admit(cp, &format!("uid-{i}"), "shop", &pod);
        // The CLI sees the workload in the namespace the webhook's pod is created in.
        let mut in_shop = workload.clone();
        in_shop["metadata"]["namespace"] = json!("shop");
        match cli_inject(dir.path(), &in_shop, cli_flags) {
            Err(e) => {
                // The CLI refuses it: the webhook denies it, with the same reason.
                assert!(
                    !allowed,
                    "{what}: the CLI refused ({e}) but the webhook allowed"
                );
                // The same field and reason: the pod's path is the tail of the template's.
                let tail = |m: &str| {
                    m.split_once("document 1: ")
                        .map(|(_, t)| t.trim().to_string())
                };
                let (theirs, ours) = (tail(&e), tail(&message));
                // (A workload refused as a whole, e.g. for its apiVersion, makes no pod to
                // compare reasons with: denied is all that is asked then.)
                let about_the_pod = theirs.as_ref().is_some_and(|t| t.starts_with("spec."));
                assert!(
                    !about_the_pod
                        || ours.as_ref().is_some_and(|o| theirs
                            .as_ref()
                            .is_some_and(|t| t.ends_with(o.as_str()))),
                    "{what}: {message} vs {e}"
                );
                denied += 1;
            }
            Ok(injected) => {
                assert!(allowed, "{what}: denied: {message}\n{}", control.stderr());
                let expected = controller_pod(&injected, "shop");
                assert!(
                    patched == expected,
                    "{what}: the patched pod is not what `outrider inject {}` makes:\n{patched}\n{expected}\n{}",
                    cli_flags.join(" "),
                    control.stderr()
                );
                if patched == pod {
                    untouched += 1;
                } else {
                    compared += 1;
                    injected_pods.push((what, pod, patched));
                }
            }
        }
    }
    eprintln!("webhook vs outrider inject {}: {compared} pods injected alike, {untouched} left alone alike, {denied} refused alike", cli_flags.join(" "));
    assert!(compared >= 20, "only {compared} pods compared");
    injected_pods
}

#[test]
fn the_webhook_patches_corpus_pods_into_what_outrider_inject_makes() {
    let dir = TempDir::new();
    let (_api, cp, control) = webhook_control(&dir, &[]);
    webhook_equals_cli(cp, &dir, &control, &[]);

    // Namespace label and pod annotation decide.
    let pod = |annotations: Value| {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"generateName": "solo-", "annotations": annotations},
               "spec": {"containers": [{"name": "app", "image": "app:1"}]}})
    };
    let (allowed, patched, _) = admit(cp, "p1", "plain", &pod(json!({})));
    assert!(
        allowed && patched == pod(json!({})),
        "an unlabelled namespace's pod was changed"
    );
    let enabled = pod(json!({"outrider.io/inject": "enabled"}));
    let (allowed, patched, _) = admit(cp, "p2", "plain", &enabled);
    assert!(
        allowed && patched != enabled,
        "an annotated pod was not injected"
    );
    assert!(
        patched["metadata"].get("name").is_none(),
        "the patch named the pod"
    );
    assert_eq!(patched["metadata"]["generateName"], "solo-");
    let disabled = pod(json!({"outrider.io/inject": "disabled"}));
    let (allowed, patched, _) = admit(cp, "p3", "shop", &disabled);
    assert!(
        allowed && patched == disabled,
        "an opted-out pod was changed"
    );
    // A bad annotation is denied with the inject code's message.
    let bad = pod(json!({"outrider.io/proxy-memory-limit": "12GB"}));
    let (allowed, _, message) = admit(cp, "p4", "shop", &bad);
    assert!(
        !allowed && message.contains("outrider.io/proxy-memory-limit"),
        "{message}"
    );
    // Without --inject-capture the pod's annotation picks CNI mode.
    let (allowed, patched, _) = admit(
        cp,
        "p5",
        "shop",
        &restricted_pod(json!({"outrider.io/capture": "cni"})),
    );
    assert!(allowed);
    assert_eq!(
        patched["spec"]["initContainers"][0]["name"],
        "outrider-cni-validate"
    );
    let (_, patched, _) = admit(cp, "p6", "shop", &restricted_pod(json!({})));
    assert_eq!(
        patched["spec"]["initContainers"][0]["name"],
        "outrider-init"
    );
    // Not an AdmissionReview: 400.
    assert_eq!(post(cp, "/v1/inject", b"{\"kind\": 3}").0, 400);
}

/// A pod that meets Pod Security `restricted` on its own.
fn restricted_pod(annotations: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"generateName": "locked-", "annotations": annotations},
           "spec": {
               "securityContext": {"runAsNonRoot": true,
                                   "seccompProfile": {"type": "RuntimeDefault"}},
               "containers": [{"name": "app", "image": "app:1",
                               "ports": [{"containerPort": 8080}],
                               "securityContext": {"allowPrivilegeEscalation": false,
                                                   "capabilities": {"drop": ["ALL"]}}}]}})
}

/// The Pod Security `restricted` violations of a pod (JSON).
fn restricted(pod: &Value) -> Vec<String> {
    // Quantities written as YAML numbers (`cpu: 0.5`), which the API server takes, as strings
    // for k8s-openapi's type.
    fn quantities_as_strings(v: &mut Value, in_resources: bool) {
        match v {
            Value::Number(n) if in_resources => *v = Value::String(n.to_string()),
            Value::Object(map) => {
                for (k, child) in map.iter_mut() {
                    let r = in_resources || k == "requests" || k == "limits";
                    quantities_as_strings(child, r);
                }
            }
            Value::Array(items) => items
                .iter_mut()
                .for_each(|i| quantities_as_strings(i, false)),
            _ => {}
        }
    }
    let mut spec = pod["spec"].clone();
    quantities_as_strings(&mut spec, false);
    let spec: k8s_openapi::api::core::v1::PodSpec = serde_json::from_value(spec).unwrap();
    outrider_kubernetes::restricted::check(&spec)
}

#[test]
fn the_webhook_in_cni_mode_makes_what_outrider_inject_cni_makes_and_its_pods_pass_restricted() {
    let dir = TempDir::new();
    let (_api, cp, control) = webhook_control(&dir, &["--inject-capture", "cni"]);
    let pods = webhook_equals_cli(cp, &dir, &control, &["--cni"]);
    for (what, original, patched) in &pods {
        // The mesh adds no violation of its own: none names its containers, and the app's
        // stay as they were.
        let (before, after) = (restricted(original), restricted(patched));
        assert!(
            after.iter().all(|v| !v.contains("(outrider-")),
            "{what}: {after:#?}"
        );
        assert_eq!(before.len(), after.len(), "{what}: {before:#?}\n{after:#?}");
        let inits = patched["spec"]["initContainers"].as_array().unwrap();
        assert!(
            inits.iter().all(|c| c["name"] != "outrider-init"),
            "{what}: outrider-init in CNI mode"
        );
    }
    // A pod that passes `restricted` still passes once injected, with the validator first.
    let locked = restricted_pod(json!({}));
    assert_eq!(restricted(&locked), Vec::<String>::new());
    let (allowed, patched, message) = admit(cp, "r1", "shop", &locked);
    assert!(allowed, "{message}");
    assert_eq!(restricted(&patched), Vec::<String>::new(), "{patched}");
    assert_eq!(
        patched["spec"]["initContainers"][0]["name"],
        "outrider-cni-validate"
    );
    // The pod's annotation beats the flag: `init` brings outrider-init (and fails restricted).
    let (allowed, patched, message) = admit(
        cp,
        "r2",
        "shop",
        &restricted_pod(json!({"outrider.io/capture": "init"})),
    );
    assert!(allowed, "{message}");
    assert_eq!(
        patched["spec"]["initContainers"][0]["name"],
        "outrider-init"
    );
    let problems = restricted(&patched).join("\n");
    assert!(problems.contains("NET_ADMIN is not allowed"), "{problems}");
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

#[test]
fn deploy_manifests_pass_kubernetes_validate_for_1_29_and_the_newest() {
    if !support::require_bin("kubernetes-validate") {
        return;
    }
    let mut files = Vec::new();
    for dir in [deploy_dir(), deploy_dir().join("examples")] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                files.push(path);
            }
        }
    }
    files.sort();
    assert!(files.iter().any(|f| f.ends_with("deploy/injector.yaml")));
    // No -k: the validator's newest version.
    for version in [Some("1.29"), None] {
        let mut cmd = Command::new("kubernetes-validate");
        cmd.arg("--strict");
        if let Some(v) = version {
            cmd.args(["--kubernetes-version", v]);
        }
        let out = support::run(cmd.args(&files));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{version:?}:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for f in &files {
            assert!(
                stdout.contains(&format!("{} passed", f.display())),
                "{version:?}: {} not validated:\n{stdout}",
                f.display()
            );
        }
    }
}

/// One POST over TLS to `addr`, verified against `anchors` for `server_name`; the status and
/// the body.
fn post_tls(addr: SocketAddr, server_name: &str, anchors: &str, body: &[u8]) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tls = outrider_control::client::client_tls(anchors).unwrap();
        let connector = tokio_rustls::TlsConnector::from(tls);
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).unwrap();
        let mut s = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
            .await
            .unwrap()
            .unwrap();
        let head = format!(
            "POST /v1/inject HTTP/1.1\r\nHost: {server_name}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&out[..split]).to_string();
        (
            head.split(' ').nth(1).unwrap().parse().unwrap(),
            out[split + 4..].to_vec(),
        )
    })
}

#[test]
fn the_control_plane_writes_its_ca_bundle_and_trust_anchors_and_serves_the_webhook_over_tls() {
    let api = KubeApi::start();
    api.apply(
        "namespaces",
        json!({"metadata": {"name": "shop", "labels": {"outrider.io/inject": "enabled"}}}),
    );
    api.apply("namespaces", json!({"metadata": {"name": "plain"}}));
    // The webhook configuration exactly as deploy/ has it.
    let text = std::fs::read_to_string(deploy_dir().join("injector.yaml")).unwrap();
    let docs = outrider_kubernetes::manifest::parse(&text).unwrap();
    let configuration = serde_json::to_value(&docs[0]).unwrap();
    assert!(configuration["webhooks"][0]["clientConfig"]
        .get("caBundle")
        .is_none());
    api.apply("mutatingwebhookconfigurations", configuration);
    let dir = TempDir::new();
    let ca = dir.path().join("ca");
    ca_init(&ca);
    let anchors = std::fs::read_to_string(ca.join("root.pem")).unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), "{}\n").unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let mut flags = ca_flags(&ca);
    flags.extend([
        "--kubernetes".into(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
    ]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (cp, _control) = start_control_with(Some(&dir), None, &flags);

    let bundles = || -> Vec<Option<String>> {
        let c = api
            .get("mutatingwebhookconfigurations", "", "outrider-injector")
            .unwrap();
        c["webhooks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                w["clientConfig"]["caBundle"].as_str().map(|b| {
                    let bytes = base64::engine::general_purpose::STANDARD.decode(b).unwrap();
                    String::from_utf8(bytes).unwrap()
                })
            })
            .collect()
    };
    wait_until(
        "both webhooks carry the trust anchors",
        CHANGE_TIMEOUT,
        || {
            bundles()
                .iter()
                .all(|b| b.as_deref() == Some(anchors.as_str()))
        },
    );
    assert_eq!(bundles().len(), 2);

    // The API server's view: it trusts only that bundle and calls the Service's DNS name.
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"generateName": "web-", "namespace": "shop"},
                     "spec": {"containers": [{"name": "app", "image": "app:1"}]}});
    let (status, body) = post_tls(
        cp,
        "outrider-control.outrider-system.svc",
        &anchors,
        &review("tls-1", "shop", &pod),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"]["patch"].is_string(), "{answer}");

    // The labelled namespace gets the trust-anchors ConfigMap the injected proxies mount; the
    // unlabelled one does not.
    wait_until(
        "the trust anchors are published in shop",
        CHANGE_TIMEOUT,
        || {
            api.get("configmaps", "shop", "outrider-trust-anchors")
                .is_some_and(|cm| cm["data"]["trust-anchors.pem"] == anchors.as_str())
        },
    );
    assert!(api
        .get("configmaps", "plain", "outrider-trust-anchors")
        .is_none());
}
