//! `outrider control --kubernetes` end to end, on loopback (no root): the real control plane
//! reaches the stand-in API server ([`crate::kubeapi`]) through a kubeconfig the test writes,
//! and a real proxy carries a keep-alive load to two demo apps while the API's EndpointSlices
//! change, the API server goes down and comes back having forgotten its history (410), and RBAC
//! forbids a resource; and `POST /v1/certify` with projected ServiceAccount tokens the stand-in's
//! TokenReview API judges.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::control::{
    control_version, get, metric, proxy_version, start_app, start_client_proxy, start_control_with,
    wait_applied, wait_until, Load, CHANGE_TIMEOUT,
};
use crate::kubeapi::{KubeApi, Reviewed, API_AUDIENCE};
use crate::support::{ChildGuard, TempDir};

const VIP: &str = "198.18.100.2:80";

fn service() -> Value {
    json!({"metadata": {"namespace": "test", "name": "payments"},
           "spec": {"clusterIP": "198.18.100.2", "clusterIPs": ["198.18.100.2"],
                    "ports": [{"name": "http", "port": 80, "targetPort": "web", "appProtocol": "http"}]}})
}

/// An EndpointSlice of `payments` with one endpoint, 127.0.0.1:`port` (its named port `http`
/// resolved as the API resolves `targetPort: web`), in the given state.
fn slice(name: &str, port: u16, ready: bool, terminating: bool) -> Value {
    json!({"metadata": {"namespace": "test", "name": name,
                        "labels": {"kubernetes.io/service-name": "payments"}},
           "addressType": "IPv4",
           "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
           "endpoints": [{"addresses": ["127.0.0.1"],
                          "conditions": {"ready": ready, "serving": true, "terminating": terminating},
                          "targetRef": {"kind": "Pod", "namespace": "test", "name": name}}]})
}

/// The control plane on the stand-in (`--kubernetes --kubeconfig`), plain HTTP, with an empty
/// mesh file.
fn start_control(api: &KubeApi, dir: &TempDir) -> (std::net::SocketAddr, ChildGuard) {
    std::fs::write(dir.path().join("mesh.yaml"), "{}\n").unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    start_control_with(
        Some(dir),
        None,
        &[
            "--plaintext",
            "--kubernetes",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
        ],
    )
}

/// Requests the stand-in recorded from `since` on.
fn count(api: &KubeApi, since: usize, what: impl Fn(&crate::kubeapi::Recorded) -> bool) -> usize {
    api.requests()
        .iter()
        .skip(since)
        .filter(|r| what(r))
        .count()
}

#[test]
fn the_api_server_moves_a_proxys_traffic_and_an_outage_keeps_the_last_view() {
    let api = KubeApi::start();
    let dir = TempDir::new();
    let (p1, _e1) = start_app("e1");
    let (p2, _e2) = start_app("e2");
    api.apply("services", service());
    api.apply("endpointslices", slice("payments-a", p1, true, false));
    api.apply("endpointslices", slice("payments-b", p2, false, false));
    let (cp, mut control) = start_control(&api, &dir);
    // The workload is in no mesh file: with --kubernetes it gets the default view (and the
    // proxy gets ready) once the API has been listed.
    let (_proxy, listen, admin) = start_client_proxy(cp, VIP);
    let mut version = control_version(cp);
    let load = Load::start(listen);
    let t0 = Instant::now();
    assert!(
        load.wait_for("e1", t0, CHANGE_TIMEOUT).is_some(),
        "the ready endpoint e1 serves"
    );

    // e1 starts terminating (still serving), e2 becomes ready: new requests go to e2 only.
    api.apply("endpointslices", slice("payments-a", p1, false, true));
    api.apply("endpointslices", slice("payments-b", p2, true, false));
    let (v, applied) = wait_applied(cp, admin, &version);
    version = v;
    assert!(load.wait_for("e2", applied, CHANGE_TIMEOUT).is_some());
    assert_eq!(
        load.count_since("e1", applied),
        0,
        "a terminating endpoint got new requests"
    );

    // The API server goes down: the control plane keeps its view, the proxy stays ready and
    // its traffic goes on.
    let before = api.requests().len();
    api.set_down(true);
    wait_until("a watcher meets the outage", CHANGE_TIMEOUT, || {
        count(&api, before, |r| {
            r.is_watch_of("endpointslices") || r.is_list_of("endpointslices")
        }) > 0
    });
    control.expect_stderr("the last good view stays", CHANGE_TIMEOUT);
    let during = Instant::now();
    assert!(load.wait_for("e2", during, CHANGE_TIMEOUT).is_some());
    assert_eq!(control_version(cp), version, "the outage changed the view");
    assert_eq!(get(admin, "/ready").status, 200);
    assert_eq!(proxy_version(admin).as_deref(), Some(version.as_str()));

    // While it is down the endpoints change and the API forgets its history: back up, the
    // watchers' versions are too old (410), they list again, and the traffic moves back to e1.
    api.apply("endpointslices", slice("payments-a", p1, true, false));
    api.delete("endpointslices", "test", "payments-b");
    api.compact();
    let before = api.requests().len();
    api.set_down(false);
    let (v, applied) = wait_applied(cp, admin, &version);
    version = v;
    assert!(load.wait_for("e1", applied, CHANGE_TIMEOUT).is_some());
    assert_eq!(
        load.count_since("e2", applied),
        0,
        "a deleted endpoint got requests"
    );
    assert!(
        count(&api, before, |r| r.is_list_of("endpointslices")) >= 1,
        "no relist after 410: {:?}",
        api.requests().iter().skip(before).collect::<Vec<_>>()
    );

    // A bookmark moves the watchers' version without a change of theirs: after the watches
    // end, the Service watch resumes from the bookmark's version.
    api.apply(
        "pods",
        json!({"metadata": {"namespace": "test", "name": "unrelated"},
                             "spec": {"containers": [{"name": "app"}]}}),
    );
    let marked = api.version().to_string();
    let resumed = (0..20).any(|_| {
        let before = api.requests().len();
        api.bookmark();
        // Give the client a moment to read the bookmark before its watch is ended.
        std::thread::sleep(Duration::from_millis(200));
        api.end_watches();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let found = api.requests().iter().skip(before).any(|r| {
                r.is_watch_of("services") && r.query.get("resourceVersion") == Some(&marked)
            });
            if found {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    });
    assert!(
        resumed,
        "the Service watch did not resume from the bookmark's version"
    );
    assert_eq!(control_version(cp), version, "a bookmark changed the view");

    let sent = load.finish();
    let failed: Vec<_> = sent.iter().filter(|s| s.status != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        sent.len(),
        &failed[..failed.len().min(5)]
    );
}

#[test]
fn a_resource_rbac_forbids_is_logged_once_and_discovery_starts_once_granted() {
    let api = KubeApi::start();
    let dir = TempDir::new();
    api.apply("services", service());
    api.forbid("list", "pods", true);
    let (cp, mut control) = start_control(&api, &dir);
    wait_until(
        "three refused lists of pods",
        Duration::from_secs(30),
        || count(&api, 0, |r| r.is_list_of("pods")) >= 3,
    );
    let line = "forbids the control plane to list pods";
    control.expect_stderr(line, CHANGE_TIMEOUT);
    assert_eq!(
        control.stderr().matches(line).count(),
        1,
        "{}",
        control.stderr()
    );
    // Without every resource listed, the view is the file's alone.
    let view = get(cp, "/v1/watch?workload=test/client");
    assert_eq!(view.status, 404, "{}", view.body);

    api.forbid("list", "pods", false);
    wait_until(
        "the view has the discovered service",
        Duration::from_secs(60),
        || {
            let view = get(cp, "/v1/watch?workload=test/client");
            view.status == 200 && view.body.contains("198.18.100.2:80")
        },
    );
}

/// A token shaped like a projected ServiceAccount token (a JWT); only the stand-in knows it.
fn jwt(tag: &str) -> String {
    format!(
        "eyJhbGciOiJSUzI1NiJ9.eyJ0YWciOiJ{tag}{}.c2lnbmF0dXJl",
        crate::support::unique()
    )
}

/// The stand-in API server with the pod `test/web-1`, running under the service account `web`.
fn api_with_web_pod() -> KubeApi {
    let api = KubeApi::start();
    api.apply(
        "pods",
        json!({"metadata": {"namespace": "test", "name": "web-1"},
               "spec": {"serviceAccountName": "web", "containers": [{"name": "app"}]}}),
    );
    api
}

#[test]
fn projected_service_account_tokens_get_certificates_only_for_their_own_account() {
    use outrider_control::api::Identity;
    use outrider_control::client::{Certifier, CertifyError};
    let api = api_with_web_pod();
    let dir = TempDir::new();
    let reviewed = |sa: &str, pod: Option<&str>, audience: &str| Reviewed {
        namespace: "test".into(),
        service_account: sa.into(),
        pod: pod.map(str::to_string),
        audiences: vec![audience.into()],
    };
    let (good, api_only, gone_pod, wrong_pod, forged) =
        (jwt("a"), jwt("b"), jwt("c"), jwt("d"), jwt("e"));
    api.review(&good, reviewed("web", Some("web-1"), "outrider"));
    api.review(&api_only, reviewed("web", None, API_AUDIENCE));
    api.review(&gone_pod, reviewed("web", Some("web-2"), "outrider"));
    api.review(&wrong_pod, reviewed("admin", Some("web-1"), "outrider"));
    let (cp, mut control) = start_control(&api, &dir);
    let certifier = Certifier::new(&format!("http://{cp}"), None).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let csr = |sa: &str| {
        let id = Identity::new("outrider.local", "test", sa).unwrap();
        outrider_proxy::identity::certify::new_csr(&id).unwrap().0
    };
    let refused = |token: &str, sa: &str| match rt.block_on(certifier.certify(token, &csr(sa))) {
        Err(CertifyError::Refused { status, message }) => (status.as_u16(), message),
        other => panic!("{sa}: {other:?}"),
    };

    // The reviewed account gets its certificate, naming the reviewed namespace and account.
    let issued = rt.block_on(certifier.certify(&good, &csr("web"))).unwrap();
    assert_eq!(
        issued.identity.as_str(),
        "spiffe://outrider.local/ns/test/sa/web"
    );
    // A CSR for another account with that token: 403.
    assert_eq!(refused(&good, "admin").0, 403);
    // A token the review rejects (forged, or for the API server's audience only): 401.
    let (status, message) = refused(&forged, "web");
    assert_eq!(status, 401, "{message}");
    assert!(message.contains("token review rejected"), "{message}");
    assert_eq!(refused(&api_only, "web").0, 401);
    // A token bound to a pod that is gone, or that runs under another account: 403.
    let (status, message) = refused(&gone_pod, "web");
    assert_eq!(
        (status, message.contains("does not exist")),
        (403, true),
        "{message}"
    );
    let (status, message) = refused(&wrong_pod, "admin");
    assert_eq!(
        (status, message.contains("runs under")),
        (403, true),
        "{message}"
    );
    // The API server down: the review cannot be made (503), nothing is issued.
    api.set_down(true);
    assert_eq!(refused(&good, "web").0, 503);
    api.set_down(false);
    assert!(rt.block_on(certifier.certify(&good, &csr("web"))).is_ok());

    control.expect_stderr("pod_mismatch", CHANGE_TIMEOUT);
    let log = control.stderr();
    for token in [&good, &api_only, &gone_pod, &wrong_pod, &forged] {
        assert!(
            !log.contains(token.as_str()),
            "a token leaked into the log:\n{log}"
        );
    }
}

#[test]
fn a_rolling_update_under_load_fails_no_request_and_drains_the_old_pods() {
    let api = KubeApi::start();
    let dir = TempDir::new();
    // Three old pods, three new: each pod its own EndpointSlice (its own port on loopback).
    let mut old: Vec<Option<(u16, ChildGuard)>> = ["o1", "o2", "o3"]
        .iter()
        .map(|n| Some(start_app(n)))
        .collect();
    let new: Vec<(u16, ChildGuard)> = ["n1", "n2", "n3"].iter().map(|n| start_app(n)).collect();
    api.apply("services", service());
    for (i, pod) in old.iter().enumerate() {
        let port = pod.as_ref().unwrap().0;
        api.apply(
            "endpointslices",
            slice(&format!("o{}", i + 1), port, true, false),
        );
    }
    let (cp, _control) = start_control(&api, &dir);
    let (_proxy, listen, admin) = start_client_proxy(cp, VIP);
    let mut version = control_version(cp);
    let load = Load::start(listen);
    let mut drained = 0;
    for k in 0..3 {
        let (o, n) = (format!("o{}", k + 1), format!("n{}", k + 1));
        // The new pod becomes ready and gets traffic.
        api.apply("endpointslices", slice(&n, new[k].0, true, false));
        let (v, applied) = wait_applied(cp, admin, &version);
        version = v;
        assert!(
            load.wait_for(&n, applied, CHANGE_TIMEOUT).is_some(),
            "{n} serves"
        );
        // Slow requests in flight, some on the old pod; then it starts terminating.
        let port = old[k].as_ref().unwrap().0;
        let forwarded = || {
            metric(
                admin,
                "outrider_requests_total",
                &[("direction", "forward")],
            )
        };
        let (requests_before, load_before) = (forwarded(), load.started());
        let slow: Vec<_> = (0..6)
            .map(|_| std::thread::spawn(move || get(listen, "/slow?ms=1500")))
            .collect();
        wait_until(
            "the six slow requests reach the proxy",
            CHANGE_TIMEOUT,
            || {
                // The proxy's count first: the load's requests among it are at most those it has
                // started by the time that is read.
                let requests = forwarded();
                requests - requests_before - (load.started() - load_before) as f64 >= 6.0
            },
        );
        api.apply("endpointslices", slice(&o, port, false, true));
        let (v, applied) = wait_applied(cp, admin, &version);
        version = v;
        // Terminating: no new request goes to it; the ones in flight finish.
        assert_eq!(
            load.count_since(&o, applied),
            0,
            "{o} got a new request while terminating"
        );
        for t in slow {
            let answer = t.join().unwrap();
            assert_eq!(
                answer.status, 200,
                "a request in flight on a terminating pod was cut"
            );
            if answer.header("x-instance") == Some(o.as_str()) {
                drained += 1;
            }
        }
        // Removed (the view is already without it: no new version), then its process ends.
        api.delete("endpointslices", "test", &o);
        old[k] = None;
    }
    let end = Instant::now();
    for n in ["n1", "n2", "n3"] {
        assert!(
            load.wait_for(n, end, CHANGE_TIMEOUT).is_some(),
            "{n} serves at the end"
        );
    }
    let sent = load.finish();
    let failed: Vec<_> = sent.iter().filter(|s| s.status != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed during the rollout: {:?}",
        failed.len(),
        sent.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        drained > 0,
        "no slow request ran on a pod as it was drained"
    );
    eprintln!(
        "rollout: {} requests, none failed; {drained} slow requests finished on draining pods",
        sent.len()
    );
}

/// A projected ServiceAccount token as the kubelet writes it for pod `ns/pod` of account `sa`: a
/// JWT whose payload carries the API server's claims (`kubernetes.io`: namespace, pod, service
/// account), unique per call. The proxy reads the claims; only the stand-in's TokenReview
/// decides whether it is good.
fn projected_token(ns: &str, sa: &str, pod: &str) -> String {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let id = crate::support::unique();
    let claims = json!({
        "aud": ["outrider"], "iss": "https://kubernetes.default.svc.cluster.local",
        "exp": 4_102_444_800u64, "iat": 1_764_633_600u64, "nbf": 1_764_633_600u64, "jti": id,
        "kubernetes.io": {"namespace": ns, "pod": {"name": pod, "uid": format!("pod-{id}")},
                          "serviceaccount": {"name": sa, "uid": "sa-uid"}},
        "sub": format!("system:serviceaccount:{ns}:{sa}")
    });
    format!(
        "{}.{}.{}",
        b64(br#"{"alg":"RS256","kid":"stand-in"}"#),
        b64(claims.to_string().as_bytes()),
        b64(format!("signature {id}").as_bytes())
    )
}

/// A real proxy whose `--identity-token-file` holds a projected ServiceAccount token gets its
/// certificate from `outrider control --kubernetes` (TLS, TokenReview by the stand-in API
/// server), for the identity of the token's namespace and account; when the kubelet rotates the
/// file (the old token then rejected), the renewals use the new one; no token reaches a log.
#[test]
fn a_proxy_certifies_with_its_projected_token_and_renews_with_the_rotated_one() {
    use crate::control::{ca_flags, ca_init, get, metric, start_app, start_proxy, wait_until};
    let api = api_with_web_pod();
    let dir = TempDir::new();
    let reviewed = Reviewed {
        namespace: "test".into(),
        service_account: "web".into(),
        pod: Some("web-1".into()),
        audiences: vec!["outrider".into()],
    };
    let (first, rotated) = (
        projected_token("test", "web", "web-1"),
        projected_token("test", "web", "web-1"),
    );
    api.review(&first, reviewed.clone());
    let ca = dir.path().join("ca");
    ca_init(&ca);
    std::fs::write(dir.path().join("mesh.yaml"), "{}\n").unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let mut flags = ca_flags(&ca);
    flags.extend(
        [
            "--kubernetes",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--cert-lifetime",
            "4s",
        ]
        .map(String::from),
    );
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (cp, control) = start_control_with(Some(&dir), None, &flags);
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{first}\n")).unwrap();
    let (app, _app) = start_app("app");
    let (proxy, addrs) = start_proxy(&[
        "--forward",
        &format!("127.0.0.1:0=127.0.0.1:{app}"),
        "--control",
        &format!("https://{cp}"),
        "--trust-anchors",
        &ca.join("root.pem").display().to_string(),
        "--workload",
        "test/web",
        "--identity-token-file",
        &token_file.display().to_string(),
    ]);
    let admin = addrs.admin;
    let within = Duration::from_secs(30);
    wait_until("ready with a certificate", within, || {
        get(admin, "/ready").status == 200
    });
    let identity = get(admin, "/identity").body;
    assert!(
        identity.contains("\"identity\": \"spiffe://outrider.local/ns/test/sa/web\""),
        "{identity}"
    );
    let certified = |result: &str| {
        metric(
            admin,
            "outrider_identity_certify_total",
            &[("result", result)],
        )
    };
    // The kubelet rotates the token; the old one is no longer accepted.
    api.review(&rotated, reviewed);
    std::fs::write(&token_file, &rotated).unwrap();
    api.forget_review(&first);
    let (ok, failed) = (certified("ok"), certified("error"));
    wait_until("two renewals with the rotated token", within, || {
        certified("ok") >= ok + 2.0
    });
    assert_eq!(certified("error"), failed, "a renewal used the old token");
    assert_eq!(get(admin, "/ready").status, 200);
    for (who, log) in [("proxy", proxy.stderr()), ("control", control.stderr())] {
        for token in [&first, &rotated] {
            assert!(!log.contains(token.as_str()), "a token in the {who}'s log");
        }
    }
}
