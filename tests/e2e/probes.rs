//! The kubelet's probes of a meshed pod, for real: a "node" namespace probes a "pod" namespace
//! (joined by a veth pair) that `outrider init` captured and `outrider proxy` (uid 1337) serves,
//! with the probe table `outrider inject` writes. A `tcpSocket` probe fails while nothing listens
//! on the app's port (the proxy's own inbound listener would accept it) and passes once the app
//! listens; an HTTP probe with its own `Host` and `User-Agent` reaches the app with exactly one
//! of each (nginx and Go answer 400 to two `Host`s).

use std::time::Duration;

use crate::support::{self, ChildGuard, Netns};

const OUTRIDER: &str = env!("CARGO_BIN_EXE_outrider");
const NODE: &str = "198.18.0.1";
const POD: &str = "198.18.0.2";
const NODE6: &str = "2001:db8::1";
const POD6: &str = "2001:db8::2";

/// An HTTP app: 200 when the request has exactly one `Host: www.example.com` and one
/// `User-Agent: my-probe`, else 400 (as nginx answers a duplicate Host); prints what it saw.
const PY_VHOST_APP: &str = r#"
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    head = b""
    while b"\r\n\r\n" not in head:
        d = c.recv(4096)
        if not d: break
        head += d
    lines = head.decode(errors="replace").split("\r\n")[1:]
    hosts = [l.split(":", 1)[1].strip() for l in lines if l.lower().startswith("host:")]
    agents = [l.split(":", 1)[1].strip() for l in lines if l.lower().startswith("user-agent:")]
    print("host=%r user-agent=%r" % (hosts, agents), flush=True)
    ok = hosts == ["www.example.com"] and agents == ["my-probe"]
    c.sendall(b"HTTP/1.1 %s\r\ncontent-length: 0\r\nconnection: close\r\n\r\n" % (b"200 OK" if ok else b"400 Bad Request"))
    c.close()
"#;

/// A TCP app that accepts and closes.
const PY_TCP_APP: &str = r#"
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.close()
"#;

/// The probe table, as `outrider inject` writes it for a `tcpSocket` liveness probe of `app`
/// on 8080 and an `httpGet` readiness probe of `web` on 8081 with `Host`/`User-Agent` headers.
const PROBES: &str = r#"{"app/liveness":{"kind":"tcp","port":8080},"web/readiness":{"port":8081,"path":"/healthz","headers":[{"name":"Host","value":"www.example.com"},{"name":"User-Agent","value":"my-probe"}]}}"#;

struct Probed {
    node: Netns,
    pod: Netns,
    _proxy: ChildGuard,
}

impl Probed {
    /// The two namespaces, the pod captured and its proxy ready; `None` without root or tools.
    fn new(test: &str) -> Option<Probed> {
        if !(support::require_root(test)
            && ["ip", "curl", "python3", "setpriv"]
                .iter()
                .all(|b| support::require_bin(b)))
        {
            return None;
        }
        let (node, pod) = (Netns::new(), Netns::new());
        support::veth(
            &node,
            &[&format!("{NODE}/24"), &format!("{NODE6}/64")],
            &pod,
            &[&format!("{POD}/24"), &format!("{POD6}/64")],
        );
        let init = pod.exec(&[OUTRIDER, "init"]);
        assert!(
            init.status.success(),
            "{}",
            String::from_utf8_lossy(&init.stderr)
        );
        let mut cmd = pod.command("setpriv");
        cmd.args([
            "--reuid",
            "1337",
            "--regid",
            "1337",
            "--clear-groups",
            OUTRIDER,
        ])
        .args(["proxy", "--admin", "0.0.0.0:15020", "--app-probes", PROBES])
        .env("OUTRIDER_LOG", "info");
        let proxy = ChildGuard::spawn(&mut cmd, format!("[{}] proxy", pod.name()));
        let probed = Probed {
            node,
            pod,
            _proxy: proxy,
        };
        for _ in 0..100 {
            if probed.status("/ready") == "200" {
                return Some(probed);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the proxy never became ready: {}", probed._proxy.stderr());
    }

    /// The status the kubelet (in the node namespace) gets for `path` on the pod's admin port.
    fn status(&self, path: &str) -> String {
        self.status_at(POD, path)
    }

    /// [`status`](Self::status) at the pod address `ip` (`[v6]` in brackets).
    fn status_at(&self, ip: &str, path: &str) -> String {
        let url = format!("http://{ip}:15020{path}");
        let out = self.node.exec(&[
            "curl",
            "--max-time",
            "10",
            "-g",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn app(&self, script: &str, port: &str) -> ChildGuard {
        let python = support::python();
        let mut app = self.pod.spawn(&[python.as_str(), "-c", script, port]);
        app.expect_line_containing("ready", Duration::from_secs(10));
        app
    }
}

#[test]
fn a_tcp_probe_fails_through_the_mesh_while_nothing_listens() {
    let Some(p) = Probed::new("a_tcp_probe_fails_through_the_mesh_while_nothing_listens") else {
        return;
    };
    assert_eq!(p.status("/app-probe/app/liveness"), "503");
    let app = p.app(PY_TCP_APP, "8080");
    assert_eq!(p.status("/app-probe/app/liveness"), "200");
    drop(app);
    assert_eq!(p.status("/app-probe/app/liveness"), "503");
}

#[test]
fn a_probe_with_a_host_header_reaches_the_app_with_exactly_one_host() {
    let Some(p) = Probed::new("a_probe_with_a_host_header_reaches_the_app_with_exactly_one_host")
    else {
        return;
    };
    let mut app = p.app(PY_VHOST_APP, "8081");
    assert_eq!(p.status("/app-probe/web/readiness"), "200");
    let seen = app.expect_line_containing("host=", Duration::from_secs(10));
    assert_eq!(
        seen.trim(),
        "host=['www.example.com'] user-agent=['my-probe']"
    );
}

#[test]
fn the_admin_port_answers_the_kubelet_over_ipv6_too() {
    // `OUTRIDER_ADMIN=0.0.0.0:15020`, as injected: an IPv6-only cluster probes `[podIP]:15020`.
    let Some(p) = Probed::new("the_admin_port_answers_the_kubelet_over_ipv6_too") else {
        return;
    };
    let v6 = format!("[{POD6}]");
    assert_eq!(p.status_at(&v6, "/live"), "200", "{}", p._proxy.stderr());
    assert_eq!(p.status_at(&v6, "/app-probe/app/liveness"), "503");
    let _app = p.app(PY_TCP_APP, "8080");
    assert_eq!(p.status_at(&v6, "/app-probe/app/liveness"), "200");
    // `/config` stays loopback-only on the twin as on the IPv4 listener.
    assert_eq!(p.status_at(&v6, "/config"), "403");
}
