//! A refused connection stays refused in a meshed pod, for real: a "pod" namespace captured by
//! `outrider init` and served by `outrider proxy` (uid 1337), a "peer" namespace beside it (joined
//! by a veth pair) where some ports listen and others do not. A client of the pod that connects to
//! a port with nothing listening is reset within 100 ms (the proxy dials for a silent client after
//! a short grace, and resets it when the dial fails), for an undeclared destination and for a
//! service declared HTTP alike; without the proxy (uid 1337 is not captured) it is refused at
//! once. `outrider wait --tcp` therefore fails on a dead port and passes on a live one, and an
//! HTTP client of a refused destination still gets a 502 at once.

use std::time::Duration;

use crate::dataplane::Pod;
use crate::support::{self, sample, ChildGuard, Netns};

const OUTRIDER: &str = env!("CARGO_BIN_EXE_outrider");
const POD: &str = "198.18.0.1";
const PEER: &str = "198.18.0.2";
/// A service declared HTTP whose endpoint (the peer's port 8080) does not listen.
const DEAD_HTTP: &str = "198.18.100.1";
/// A service declared HTTP with no endpoints at all.
const EMPTY_HTTP: &str = "198.18.100.2";
/// A port outside the default opaque list where nothing listens in the peer (MongoDB's).
const DEAD: &str = "27017";
/// A port where the peer listens (and echoes).
const LIVE: &str = "27018";

/// Connects (as whoever runs it), optionally sends bytes, then reads; prints how the connection
/// ended (`refused` at connect, `reset`, `eof`, `data`, or `open` when nothing happened within
/// the read timeout) and the seconds that took: from the `connect()` call to a refusal, from the
/// connection's opening to anything else (how long an accepted connection was held).
const PY_PROBE: &str = r#"
import socket, sys, time
host, port, send, wait = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
t = time.monotonic()
try:
    c = socket.create_connection((host, port), timeout=5)
    t = time.monotonic()
    if send: c.sendall(send.encode())
    c.settimeout(wait)
    d = c.recv(1)
    how = "data" if d else "eof"
except ConnectionRefusedError:
    how = "refused"
except ConnectionResetError:
    how = "reset"
except socket.timeout:
    how = "open"
print(how)
print("%.3f" % (time.monotonic() - t))
"#;

/// The pod (captured, its proxy and control plane running) and its peer (an echo server on
/// [`LIVE`], the demo app on 8081).
struct Pods {
    pod: Pod,
    _peer: Pod,
    _link: support::Veth,
    _dir: support::TempDir,
    _control: ChildGuard,
}

/// How a probe connection ended, and after how long.
#[derive(Debug)]
struct Ending {
    how: String,
    after: Duration,
}

impl Pods {
    fn new(test: &str) -> Option<Pods> {
        if !crate::dataplane::requirements(test, &["ip", "curl", "python3", "setpriv"]) {
            return None;
        }
        let (pod, peer) = (Netns::new(), Netns::new());
        let link = support::veth(
            &pod,
            &[&format!("{POD}/24")],
            &peer,
            &[&format!("{PEER}/24")],
        );
        // The services' virtual addresses need a route for connect(); iptables redirects them.
        pod.exec_ok(&["ip", "route", "add", "198.18.100.0/24", "dev", &link.a_if]);
        let dir = support::TempDir::new();
        let mesh = dir.path().join("mesh.yaml");
        std::fs::write(
            &mesh,
            format!(
                "services:
  - name: dead
    namespace: test
    addresses: [{DEAD_HTTP}:80]
    protocol: http1
    endpoints:
      - address: {PEER}:8080
  - name: empty
    namespace: test
    addresses: [{EMPTY_HTTP}:80]
    protocol: http1
    endpoints: []
workloads:
  - name: test/client
"
            ),
        )
        .unwrap();
        let mesh = mesh.display().to_string();
        let mut control = pod.spawn(&[OUTRIDER, "control", "--plaintext", "--config", &mesh]);
        control.expect_stderr("control plane ready", Duration::from_secs(10));
        let pod = Pod::new(
            pod,
            &[
                "--detect-timeout",
                "1s",
                "--control",
                "http://127.0.0.1:15012",
                "--workload",
                "test/client",
            ],
        );
        // The peer is not captured (no proxy): its ports answer as the kernel does.
        let mut peer = Pod::bare(peer);
        peer.serve_py(LIVE, None);
        peer.serve_demo_app("0.0.0.0:8081", "app");
        Some(Pods {
            pod,
            _peer: peer,
            _link: link,
            _dir: dir,
            _control: control,
        })
    }

    /// Runs curl in the pod (as root: captured); its stdout, or `curl failed` with stderr.
    fn curl(&self, args: &[&str]) -> String {
        let out = self.pod.curl(args);
        if out.status.success() {
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        } else {
            format!("curl failed: {}", String::from_utf8_lossy(&out.stderr))
        }
    }

    /// A probe connection from the pod as `uid` (the app's traffic is captured; the proxy's own
    /// uid is not: that is the connection without the mesh), sending `send` first unless empty.
    fn probe(&self, uid: &str, host: &str, port: &str, send: &str) -> Ending {
        let python = support::python();
        let out = self.pod.ns.exec(&[
            "setpriv",
            "--reuid",
            uid,
            "--regid",
            uid,
            "--clear-groups",
            python.as_str(),
            "-c",
            PY_PROBE,
            host,
            port,
            send,
            "3",
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines();
        let (Some(how), Some(secs)) = (lines.next(), lines.next()) else {
            panic!(
                "probe failed: {}{}",
                text,
                String::from_utf8_lossy(&out.stderr)
            );
        };
        Ending {
            how: how.to_owned(),
            after: Duration::from_secs_f64(secs.parse().unwrap()),
        }
    }

    /// The probe ended `how` within 100 ms: "the way it would without the mesh".
    fn assert_fast(&self, ending: &Ending, how: &str, what: &str) {
        eprintln!("{what}: {ending:?}");
        let logs = || {
            self.pod
                .proxy
                .as_ref()
                .map(ChildGuard::stderr)
                .unwrap_or_default()
        };
        assert_eq!(ending.how, how, "{what}: {ending:?}; proxy:\n{}", logs());
        assert!(
            ending.after < Duration::from_millis(100),
            "{what}: took {:?}; proxy:\n{}",
            ending.after,
            logs()
        );
    }

    fn errors(&self, reason: &str) -> f64 {
        sample(
            &self.pod.metrics(),
            "outrider_errors_total",
            &[("direction", "outbound"), ("reason", reason)],
        )
    }

    /// `outrider wait --tcp target` run by the app (captured); its exit code and stderr.
    fn wait_tcp(&self, target: &str) -> (Option<i32>, String) {
        let out = self.pod.ns.exec(&[
            "setpriv",
            "--reuid",
            APP,
            "--regid",
            APP,
            "--clear-groups",
            OUTRIDER,
            "wait",
            "--tcp",
            target,
            "--timeout",
            "2s",
        ]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// The app's uid (captured) and the proxy's (not captured).
const APP: &str = "1000";
const PROXY: &str = "1337";

#[test]
fn a_connection_to_a_port_where_nothing_listens_is_reset_through_the_outbound() {
    let Some(pods) =
        Pods::new("a_connection_to_a_port_where_nothing_listens_is_reset_through_the_outbound")
    else {
        return;
    };
    // Without the mesh: refused at connect.
    pods.assert_fast(
        &pods.probe(PROXY, PEER, DEAD, ""),
        "refused",
        "without the mesh",
    );
    let before = pods.errors("connect-failed");
    // Through the outbound: accepted by the proxy, then reset, whether the client waits for a
    // server that speaks first or speaks first itself.
    pods.assert_fast(&pods.probe(APP, PEER, DEAD, ""), "reset", "silent client");
    pods.assert_fast(
        &pods.probe(APP, PEER, DEAD, "{ping}"),
        "reset",
        "client that speaks",
    );
    // A service declared HTTP: its endpoint refuses, or it has none.
    pods.assert_fast(
        &pods.probe(APP, DEAD_HTTP, "80", ""),
        "reset",
        "declared HTTP",
    );
    pods.assert_fast(
        &pods.probe(APP, EMPTY_HTTP, "80", ""),
        "reset",
        "no endpoints",
    );
    assert_eq!(
        pods.errors("connect-failed") - before,
        3.0,
        "each refused dial counted"
    );
    assert_eq!(pods.errors("no-endpoints"), 1.0);
    // A live port stays open for a silent client, and echoes.
    assert_eq!(pods.probe(APP, PEER, LIVE, "").how, "open");
    assert_eq!(pods.probe(APP, PEER, LIVE, "{ping}").how, "data");
}

#[test]
fn outrider_wait_tcp_fails_on_a_dead_port_in_a_captured_pod_and_passes_on_a_live_one() {
    let Some(pods) = Pods::new(
        "outrider_wait_tcp_fails_on_a_dead_port_in_a_captured_pod_and_passes_on_a_live_one",
    ) else {
        return;
    };
    let (code, stderr) = pods.wait_tcp(&format!("{PEER}:{DEAD}"));
    assert_eq!(code, Some(1), "a dead port must not pass: {stderr}");
    assert!(stderr.contains("reset"), "{stderr}");
    let (code, stderr) = pods.wait_tcp(&format!("{PEER}:{LIVE}"));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("reachable"), "{stderr}");
}

#[test]
fn an_http_client_of_a_refused_destination_gets_a_502_at_once_and_no_extra_dial() {
    let Some(pods) =
        Pods::new("an_http_client_of_a_refused_destination_gets_a_502_at_once_and_no_extra_dial")
    else {
        return;
    };
    let status = |url: &str| {
        pods.curl(&[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{time_total}",
            url,
        ])
    };
    for (url, want) in [
        (format!("http://{PEER}:{DEAD}/"), "502"),
        (format!("http://{DEAD_HTTP}/"), "502"),
        (format!("http://{EMPTY_HTTP}/"), "503"),
    ] {
        let got = status(&url);
        let (code, secs) = got.split_once(' ').unwrap_or((&got, "0"));
        assert_eq!(code, want, "{url}: {got}");
        let secs: f64 = secs.parse().unwrap();
        assert!(secs < 0.5, "{url}: answered after {secs} s");
    }
    // An HTTP client speaks at once: no early dial; five requests (five connections from the
    // client) share one pooled upstream connection.
    let connects = || sample(&pods.pod.metrics(), "outrider_upstream_connects_total", &[]);
    let before = connects();
    for _ in 0..5 {
        assert_eq!(
            status(&format!("http://{PEER}:8081/")).split(' ').next(),
            Some("200")
        );
    }
    assert_eq!(connects() - before, 1.0, "one pooled dial, none early");
}

/// Meshed: the endpoint is the peer proxy (mutual TLS), which always accepts; when its app
/// refuses, the peer's inbound drops the mTLS connection and the refusal travels back.
#[tokio::test]
async fn a_meshed_destination_whose_app_refuses_ends_the_connection_at_once() {
    use tokio::io::AsyncReadExt;
    let dead = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let mesh = crate::mesh::start(dead, "detect", "").await;
    let mut s = tokio::net::TcpStream::connect(mesh.client.outbound.unwrap())
        .await
        .unwrap();
    let start = std::time::Instant::now();
    let mut one = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut one)).await;
    let after = start.elapsed();
    eprintln!("meshed: {read:?} after {after:?}");
    let kind = match read {
        Ok(Err(e)) => e.kind(),
        Ok(Ok(0)) => std::io::ErrorKind::UnexpectedEof,
        other => panic!("still open: {other:?}"),
    };
    assert_eq!(kind, std::io::ErrorKind::ConnectionReset, "after {after:?}");
    assert!(after < Duration::from_millis(500), "took {after:?}");
    assert_eq!(
        mesh.server.sum(
            "outrider_inbound_mesh_connections_total",
            &[("client_id", crate::mesh::WEB)]
        ),
        1.0,
        "the refusal came from the peer's app, through the peer proxy"
    );
}
