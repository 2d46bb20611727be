//! `outrider cni` through a real CNI chain, driven as a container runtime drives a conflist.
//!
//! Each test makes a "node" namespace and a "pod" namespace (loopback down, as a runtime creates
//! it). Debian's reference plugins (`loopback`, `bridge` with `host-local` IPAM, from
//! `/usr/lib/cni`) run inside the node namespace, so the bridge they make is the test's own; the
//! outrider binary runs as `outrider-cni` (a symlink: the argv[0] dispatch the installer uses)
//! from the test's namespace, because the stand-in API server it asks listens on the test's
//! loopback. The runtime's part is played here: `loopback` on `lo`, then each plugin of the
//! conflist in order with the `CNI_*` variables and `prevResult` threaded through, `DEL` in
//! reverse order with the cached result. The capture is proven with the capture tests' own
//! checks (`SO_ORIGINAL_DST` seen by the pod's listeners, the proxy uid exempt).
//!
//! The stand-in API server is this module's own (real TLS with a CA minted per test, bearer
//! token checked, `GET /api/v1/namespaces/NS/pods/NAME` only); it moves to the shared one of the
//! `kube` tests once those land.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::capture::{self, APP_UID, PROXY_UID};
use crate::support::{self, ChildGuard, Netns, TempDir};

const OUTRIDER: &str = env!("CARGO_BIN_EXE_outrider");
const CNI_BIN: &str = "/usr/lib/cni";
const TOKEN: &str = "test-token-not-secret";

fn requirements() -> bool {
    support::require_root(&support::test_name())
        && support::require_bin("ip")
        && support::require_bin("setpriv")
        && support::require_bin("python3")
        && support::require_bin("iptables-nft-restore")
        && (Path::new(CNI_BIN).join("bridge").exists()
            || !support::require_bin("containernetworking-plugins (/usr/lib/cni/bridge)"))
}

/// How the stand-in API server behaves.
enum ApiMode {
    /// Answers pod GETs from this map (`ns/name` → pod JSON); 404 otherwise.
    Answer(BTreeMap<String, Value>),
    /// Accepts TCP connections and never says a word (a hung API server).
    Silent,
}

/// A stand-in API server on 127.0.0.1 (its own runtime, stopped on drop).
struct ApiServer {
    addr: SocketAddr,
    ca_pem: String,
    _rt: tokio::runtime::Runtime,
}

impl ApiServer {
    fn start(mode: ApiMode) -> ApiServer {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, &ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let pods = Arc::new(match mode {
            ApiMode::Answer(pods) => Some(pods),
            ApiMode::Silent => None,
        });
        rt.spawn(async move {
            let mut held = Vec::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let Some(_) = pods.as_ref() else {
                    held.push(tcp); // never answered, kept open until the server stops
                    continue;
                };
                let (acceptor, pods) = (acceptor.clone(), Arc::clone(&pods));
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let pods = Arc::clone(&pods);
                        async move { Ok::<_, std::convert::Infallible>(answer(&req, &pods)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        ApiServer {
            addr,
            ca_pem: ca_cert.pem(),
            _rt: rt,
        }
    }

    /// Writes a kubeconfig for this server (as the installer does) and returns its path.
    fn kubeconfig(&self, dir: &Path) -> PathBuf {
        kubeconfig_for(dir, &format!("https://{}", self.addr), &self.ca_pem)
    }
}

fn kubeconfig_for(dir: &Path, server: &str, ca_pem: &str) -> PathBuf {
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let path = dir.join("outrider-cni.kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: outrider-cni\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: outrider-cni\n  user:\n    token: {TOKEN}\ncontexts:\n- name: outrider-cni\n  context:\n    cluster: local\n    user: outrider-cni\n",
            ca_file.display()
        ),
    )
    .unwrap();
    path
}

fn answer(
    req: &hyper::Request<hyper::body::Incoming>,
    pods: &Option<BTreeMap<String, Value>>,
) -> hyper::Response<Full<Bytes>> {
    let reply = |status: u16, body: String| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    let authorized = req
        .headers()
        .get("authorization")
        .is_some_and(|v| v.as_bytes() == format!("Bearer {TOKEN}").as_bytes());
    if !authorized {
        return reply(401, r#"{"kind":"Status","code":401}"#.into());
    }
    let path = req.uri().path();
    let key = path
        .strip_prefix("/api/v1/namespaces/")
        .and_then(|rest| rest.split_once("/pods/"))
        .map(|(ns, name)| format!("{ns}/{name}"));
    match key.and_then(|k| pods.as_ref()?.get(&k).cloned()) {
        Some(pod) if req.method() == hyper::Method::GET => reply(200, pod.to_string()),
        _ => reply(404, r#"{"kind":"Status","code":404}"#.into()),
    }
}

/// A pod object as the API server returns it.
fn pod_json(annotations: &[(&str, &str)]) -> Value {
    let ann: serde_json::Map<String, Value> = annotations
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
        .collect();
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"annotations": ann}, "spec": {"containers": []}})
}

/// The node: its namespace, the CNI directories, the conflist.
struct Node {
    ns: Netns,
    _dir: TempDir,
    bin: PathBuf,
    conflist: Value,
}

/// One pod sandbox.
struct Pod {
    ns: Netns,
    namespace: String,
    name: String,
    id: String,
}

impl Pod {
    fn new(namespace: &str, name: &str) -> Pod {
        let ns = Netns::bare();
        let id = format!("sandbox-{}", ns.name());
        Pod {
            ns,
            namespace: namespace.into(),
            name: name.into(),
            id,
        }
    }

    fn netns_path(&self) -> String {
        format!("/var/run/netns/{}", self.ns.name())
    }
}

/// A plugin's exit: stdout parsed as JSON (`Null` when empty) and stderr.
struct Exit {
    ok: bool,
    out: Value,
    stderr: String,
}

impl Node {
    /// A node whose conflist is `bridge` (host-local IPAM) then `outrider-cni`.
    fn new(version: &str, kubeconfig: &Path, api_timeout: u64) -> Node {
        let ns = Netns::new();
        let dir = TempDir::new();
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(OUTRIDER, bin.join("outrider-cni")).unwrap();
        let n = support::unique() % 200 + 20;
        let conflist = json!({
            "cniVersion": version,
            "name": format!("outrider-test-{n}"),
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": format!("obr{n}"),
                    "isGateway": true,
                    "isDefaultGateway": true,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": format!("198.19.{n}.0/24")}]],
                        "dataDir": dir.path().join("ipam"),
                    },
                },
                {
                    "type": "outrider-cni",
                    "kubeconfig": kubeconfig,
                    "apiTimeoutSeconds": api_timeout,
                },
            ],
        });
        Node {
            ns,
            _dir: dir,
            bin,
            conflist,
        }
    }

    /// Runs one plugin as the runtime does. Reference plugins run in the node namespace.
    fn invoke(
        &self,
        plugin: &Value,
        command: &str,
        pod: &Pod,
        ifname: &str,
        prev: Option<&Value>,
    ) -> Exit {
        let kind = plugin["type"].as_str().unwrap();
        let mut conf = plugin.clone();
        conf["cniVersion"] = self.conflist["cniVersion"].clone();
        conf["name"] = self.conflist["name"].clone();
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        let mut cmd = if kind == "outrider-cni" {
            Command::new(self.bin.join(kind))
        } else {
            self.ns.command(Path::new(CNI_BIN).join(kind))
        };
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &pod.id)
            .env("CNI_NETNS", pod.netns_path())
            .env("CNI_IFNAME", ifname)
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
                    pod.namespace, pod.name, pod.id
                ),
            )
            .env("CNI_PATH", format!("{CNI_BIN}:{}", self.bin.display()));
        let out = run_with_stdin(&mut cmd, &conf.to_string());
        let text = String::from_utf8_lossy(&out.stdout);
        Exit {
            ok: out.status.success(),
            out: if text.trim().is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text).unwrap_or_else(|e| {
                    panic!("{kind} {command}: stdout is not JSON ({e}): {text}")
                })
            },
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"].as_array().unwrap().clone()
    }

    /// `loopback` on `lo` (its own network, as runtimes do), then the conflist in order:
    /// returns every plugin's result (the last is the runtime's).
    fn add(&self, pod: &Pod) -> Result<Vec<Value>, Exit> {
        let lo = self.invoke(&json!({"type": "loopback"}), "ADD", pod, "lo", None);
        assert!(lo.ok, "loopback ADD: {} {}", lo.out, lo.stderr);
        let mut results: Vec<Value> = Vec::new();
        for plugin in self.plugins() {
            let exit = self.invoke(&plugin, "ADD", pod, "eth0", results.last());
            if !exit.ok {
                return Err(exit);
            }
            results.push(exit.out);
        }
        Ok(results)
    }

    /// DEL of the conflist in reverse order with the cached result, then `loopback`.
    fn del(&self, pod: &Pod, cached: &Value) {
        for plugin in self.plugins().iter().rev() {
            let exit = self.invoke(plugin, "DEL", pod, "eth0", Some(cached));
            assert!(
                exit.ok,
                "{} DEL: {} {}",
                plugin["type"], exit.out, exit.stderr
            );
        }
        let lo = self.invoke(&json!({"type": "loopback"}), "DEL", pod, "lo", None);
        assert!(lo.ok, "loopback DEL: {}", lo.stderr);
    }

    fn outrider(&self) -> Value {
        self.plugins()[1].clone()
    }
}

/// Runs `cmd` with `input` on stdin, bounded by [`support::COMMAND_TIMEOUT`] (killed by pid).
fn run_with_stdin(cmd: &mut Command, input: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
    let pid = child.id();
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).unwrap();
    }
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(support::COMMAND_TIMEOUT) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!(
                "{cmd:?} did not finish within {:?}",
                support::COMMAND_TIMEOUT
            );
        }
    }
}

fn pod_ipv4(result: &Value) -> String {
    let ips = result["ips"].as_array().expect("result.ips");
    let addr = ips
        .iter()
        .filter_map(|ip| ip["address"].as_str())
        .find(|a| !a.contains(':'))
        .expect("an IPv4 address");
    addr.split('/').next().unwrap().to_owned()
}

fn gateway(result: &Value) -> String {
    result["ips"][0]["gateway"]
        .as_str()
        .expect("gateway")
        .to_owned()
}

/// The pod's nat table (nft backend, the one `auto` picks in a fresh namespace), normalized.
fn nat(pod: &Pod) -> String {
    capture::normalized_save(&pod.ns, "iptables-nft-save", Some("nat"))
}

/// A rule another tool put in the pod's nat table before the plugin ran: it must survive.
fn foreign_rules(pod: &Pod) {
    pod.ns
        .exec_ok(&["iptables-nft", "-t", "nat", "-N", "OTHER_TOOL"]);
    pod.ns.exec_ok(&[
        "iptables-nft",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "udp",
        "--dport",
        "53",
        "-j",
        "OTHER_TOOL",
    ]);
}

/// `outrider cni validate` in the pod as the injected container runs it: uid 2102, no
/// capabilities (setpriv drops them all).
fn validate(pod: &Pod) -> Output {
    let uid = "2102";
    let mut cmd = pod.ns.command("setpriv");
    cmd.args([
        &format!("--reuid={uid}"),
        &format!("--regid={uid}"),
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        OUTRIDER,
        "cni",
        "validate",
        "--timeout",
        "5",
    ]);
    support::run(&mut cmd)
}

fn meshed_api() -> ApiServer {
    let mut pods = BTreeMap::new();
    pods.insert(
        "shop/web-0".to_owned(),
        pod_json(&[
            ("outrider.io/injected", "native"),
            ("outrider.io/capture", "cni"),
            ("outrider.io/skip-inbound-ports", "9090"),
        ]),
    );
    pods.insert("shop/plain-0".to_owned(), pod_json(&[]));
    ApiServer::start(ApiMode::Answer(pods))
}

#[test]
fn cni_chain_captures_a_meshed_pod_and_del_restores_the_nat_table() {
    if !requirements() {
        return;
    }
    let api = meshed_api();
    let dir = TempDir::new();
    let node = Node::new("1.0.0", &api.kubeconfig(dir.path()), 3);
    let pod = Pod::new("shop", "web-0");
    foreign_rules(&pod);
    let before = nat(&pod);

    let results = node
        .add(&pod)
        .unwrap_or_else(|e| panic!("ADD failed: {} {}", e.out, e.stderr));
    // prevResult threaded through unchanged: the runtime's result is the bridge's.
    assert_eq!(results[1], results[0], "outrider-cni changed the result");
    let result = &results[1];
    assert_eq!(result["cniVersion"], "1.0.0");
    let (pod_ip, gw) = (pod_ipv4(result), gateway(result));
    assert!(pod_ip.starts_with("198.19."), "{result}");

    // The CNI mode's init container, unprivileged in the pod, sees the capture.
    let out = validate(&pod);
    assert!(
        out.status.success(),
        "validate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let _servers: Vec<ChildGuard> = vec![
        capture::server(&pod.ns, "pod", "15001,15006,15020,8080,9090"),
        capture::server(&node.ns, "node", "80"),
    ];
    // Outbound from the app: to the proxy's outbound listener, original destination intact.
    capture::assert_outbound(&pod.ns, &gw, 80, APP_UID);
    // The proxy's uid is exempt.
    capture::assert_direct(&pod.ns, &gw, 80, PROXY_UID, "node");
    // Inbound: to the inbound listener; the annotation's skipped port and the admin port not.
    capture::assert_inbound(&node.ns, &pod_ip, 8080, "-1");
    capture::assert_direct(&node.ns, &pod_ip, 9090, "-1", "pod");
    capture::assert_direct(&node.ns, &pod_ip, 15020, "-1", "pod");
    let applied = nat(&pod);
    assert!(applied.contains("OTHER_TOOL"), "{applied}");

    // CHECK with the cached result passes.
    let check = node.invoke(&node.outrider(), "CHECK", &pod, "eth0", Some(result));
    assert!(check.ok, "CHECK: {} {}", check.out, check.stderr);
    // ADD again (a retried ADD): same answer, same table.
    let again = node.invoke(&node.outrider(), "ADD", &pod, "eth0", Some(&results[0]));
    assert!(again.ok, "second ADD: {} {}", again.out, again.stderr);
    assert_eq!(again.out, results[0]);
    assert_eq!(nat(&pod), applied, "a second ADD changed the rules");

    // A rule removed behind the plugin's back: CHECK fails with our code and names it.
    pod.ns
        .exec_ok(&["iptables-nft", "-t", "nat", "-F", "OUTRIDER_OUTPUT"]);
    let check = node.invoke(&node.outrider(), "CHECK", &pod, "eth0", Some(result));
    assert!(!check.ok, "CHECK passed with rules missing");
    assert_eq!(check.out["code"], 101, "{}", check.out);
    assert!(
        check.out["details"]
            .as_str()
            .unwrap_or("")
            .contains("OUTRIDER_OUTPUT"),
        "{}",
        check.out
    );

    // DEL (reverse order): the nat table is as it was found, twice over.
    node.del(&pod, result);
    assert_eq!(nat(&pod), before, "DEL did not restore the nat table");
    let del = node.invoke(&node.outrider(), "DEL", &pod, "eth0", Some(result));
    assert!(del.ok, "second DEL: {} {}", del.out, del.stderr);
    assert_eq!(nat(&pod), before);
}

#[test]
fn cni_chain_passes_an_unmeshed_pod_through_untouched() {
    if !requirements() {
        return;
    }
    let api = meshed_api();
    let dir = TempDir::new();
    // An older runtime's config version: 0.4.0.
    let node = Node::new("0.4.0", &api.kubeconfig(dir.path()), 3);
    let pod = Pod::new("shop", "plain-0");
    foreign_rules(&pod);
    let before = nat(&pod);
    let results = node
        .add(&pod)
        .unwrap_or_else(|e| panic!("ADD failed: {} {}", e.out, e.stderr));
    assert_eq!(results[1], results[0]);
    assert_eq!(results[1]["cniVersion"], "0.4.0");
    assert_eq!(nat(&pod), before, "an unmeshed pod's nat table was changed");
    // A pod the plugin skipped does not start: the validator names the cause.
    let out = validate(&pod);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the capture rules are missing")
            && stderr.contains("outrider-cni plugin did not program this pod"),
        "{stderr}"
    );
    let gw = gateway(&results[1]);
    let _server = capture::server(&node.ns, "node", "80");
    capture::assert_direct(&pod.ns, &gw, 80, APP_UID, "node");
    let check = node.invoke(&node.outrider(), "CHECK", &pod, "eth0", Some(&results[1]));
    assert!(check.ok, "CHECK: {}", check.stderr);
    node.del(&pod, &results[1]);
    assert_eq!(nat(&pod), before);
}

#[test]
fn cni_add_with_an_unanswering_api_server_fails_within_its_bound() {
    if !requirements() {
        return;
    }
    let api = ApiServer::start(ApiMode::Silent);
    let dir = TempDir::new();
    let node = Node::new("1.0.0", &api.kubeconfig(dir.path()), 1);
    let pod = Pod::new("shop", "web-0");
    foreign_rules(&pod);
    let before = nat(&pod);
    let started = Instant::now();
    let Err(exit) = node.add(&pod) else {
        panic!("ADD succeeded without the API server");
    };
    let took = started.elapsed();
    assert_eq!(exit.out["code"], 11, "{}", exit.out);
    assert_eq!(exit.out["cniVersion"], "1.0.0");
    let msg = exit.out["msg"].as_str().unwrap();
    assert!(
        msg.contains("did not answer within 1 s") && msg.contains("shop/web-0"),
        "{msg}"
    );
    // The bound held (the whole chain ran in that time, the bridge included).
    assert!(took < Duration::from_secs(10), "ADD took {took:?}");
    assert_eq!(
        nat(&pod),
        before,
        "rules were applied without the pod's annotations"
    );

    // A refused connection fails the same way; the mesh's own namespace needs no lookup.
    let closed = support::free_port();
    let kc = kubeconfig_for(
        dir.path(),
        &format!("https://127.0.0.1:{closed}"),
        &api.ca_pem,
    );
    let down = Node::new("1.0.0", &kc, 1);
    let prev = json!({"cniVersion": "1.0.0", "interfaces": [], "ips": []});
    let exit = down.invoke(&down.outrider(), "ADD", &pod, "eth0", Some(&prev));
    assert!(!exit.ok);
    assert_eq!(exit.out["code"], 11, "{}", exit.out);
    let own = Pod::new("outrider-system", "outrider-cni-node-1");
    let exit = down.invoke(&down.outrider(), "ADD", &own, "eth0", Some(&prev));
    assert!(exit.ok, "{} {}", exit.out, exit.stderr);
    assert_eq!(exit.out, prev);
    assert!(
        exit.stderr
            .contains("namespace outrider-system is excluded"),
        "{}",
        exit.stderr
    );
}

/// The protocol without root: VERSION, version checks, spec error objects, DEL of a namespace
/// that is gone. `PATH` is empty, so no iptables can ever be reached.
#[test]
fn cni_protocol_versions_and_error_objects() {
    let dir = TempDir::new();
    let link = dir.path().join("outrider-cni");
    std::os::unix::fs::symlink(OUTRIDER, &link).unwrap();
    let call = |program: &Path, args: &[&str], env: &[(&str, &str)], stdin: &str| {
        let mut cmd = Command::new(program);
        cmd.args(args).env_clear().env("PATH", "");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = run_with_stdin(&mut cmd, stdin);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        };
        (out.status.code(), value)
    };
    let base = [
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/var/run/netns/outrider-test-does-not-exist"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "IgnoreUnknown=1"),
    ];
    let with = |cmd: &'static str| {
        let mut env = vec![("CNI_COMMAND", cmd)];
        env.extend(base);
        env
    };
    // VERSION, through the argv[0] name and through `outrider cni`.
    for (program, args) in [
        (link.as_path(), &[][..]),
        (Path::new(OUTRIDER), &["cni"][..]),
    ] {
        let (code, v) = call(
            program,
            args,
            &[("CNI_COMMAND", "VERSION")],
            r#"{"cniVersion":"0.3.1"}"#,
        );
        assert_eq!(code, Some(0));
        assert_eq!(
            v,
            json!({"cniVersion": "0.3.1", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]})
        );
    }
    let conf = |v: &str, prev: &str| {
        format!(r#"{{"cniVersion":"{v}","name":"k8s","type":"outrider-cni"{prev}}}"#)
    };
    let prev = r#","prevResult":{"cniVersion":"0.3.1","interfaces":[{"name":"eth0"}],"ips":[{"version":"4","address":"198.19.1.2/24"}]}"#;
    // A pod that is not Kubernetes' is passed through with prevResult as it came (0.3.1).
    let (code, v) = call(&link, &[], &with("ADD"), &conf("0.3.1", prev));
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["ips"][0]["address"], "198.19.1.2/24");
    for (env, stdin, want_code, needle) in [
        (
            with("ADD"),
            conf("0.2.0", prev),
            1,
            "cniVersion 0.2.0 is not supported",
        ),
        (with("ADD"), "{not json".to_owned(), 6, "not valid JSON"),
        (with("ADD"), conf("1.0.0", ""), 7, "chained plugin"),
        (
            with("CHECK"),
            conf("0.3.1", prev),
            1,
            "CHECK is not defined",
        ),
        (
            vec![("CNI_COMMAND", "ADD")],
            conf("1.0.0", prev),
            4,
            "CNI_CONTAINERID is not set",
        ),
        (with("FROB"), conf("1.0.0", prev), 4, "FROB"),
    ] {
        let (code, v) = call(&link, &[], &env, &stdin);
        assert_eq!(code, Some(1), "{v}");
        assert_eq!(v["code"], want_code, "{v}");
        assert!(v["msg"].as_str().unwrap().contains(needle), "{needle}: {v}");
        assert!(v["cniVersion"].is_string(), "{v}");
    }
    // DEL of a namespace that is gone: success, nothing printed.
    let (code, v) = call(&link, &[], &with("DEL"), &conf("1.0.0", prev));
    assert_eq!((code, v), (Some(0), Value::Null));
}
