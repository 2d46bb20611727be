//! The data plane end to end: the real `outrider` binary, real clients (curl, h2load, python
//! sockets), and, for the two-pod tests, real kernels: two network namespaces joined by a veth
//! pair, each captured by `outrider init` and served by `outrider proxy` running as uid 1337.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{self, sample, ChildGuard, Netns};

const OUTRIDER: &str = env!("CARGO_BIN_EXE_outrider");
const POD_A: &str = "198.18.0.1";
const POD_B: &str = "198.18.0.2";
const POD_A6: &str = "2001:db8::1";
const POD_B6: &str = "2001:db8::2";

/// A TCP server: optional banner first (server speaks first), then echo until the client closes.
pub(crate) const PY_SERVER: &str = r#"
import socket, sys, threading
port = int(sys.argv[1]); banner = sys.argv[2].encode() if len(sys.argv) > 2 else b""
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port)); s.listen(16)
print("ready", flush=True)
def serve(c):
    if banner: c.sendall(banner)
    while True:
        d = c.recv(65536)
        if not d: break
        c.sendall(d)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Connects, optionally sends a line, prints the first line received and the seconds it took.
const PY_CLIENT: &str = r#"
import socket, sys, time
t = time.monotonic()
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
if len(sys.argv) > 3: c.sendall(sys.argv[3].encode() + b"\n")
data = b""
while b"\n" not in data:
    d = c.recv(4096)
    if not d: break
    data += d
print(data.decode(errors="replace").strip())
print("%.3f" % (time.monotonic() - t))
"#;

/// A WebSocket client (RFC 6455): handshake with `Sec-WebSocket-Accept` checked, then a short and
/// a 300-byte masked text message echoed back, then a clean close.
const PY_UPGRADE: &str = r#"
import base64, hashlib, os, socket, struct, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
key = base64.b64encode(os.urandom(16)).decode()
c.sendall(("GET /chat HTTP/1.1\r\nHost: payments\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
           "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + "\r\n\r\n").encode())
head = b""
while b"\r\n\r\n" not in head:
    d = c.recv(1)
    if not d: break
    head += d
lines = head.decode().split("\r\n")
print(lines[0])
want = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
got = [l.split(":", 1)[1].strip() for l in lines if l.lower().startswith("sec-websocket-accept:")]
print("accept-ok" if got == [want] else "accept-bad %r" % got)
def recv_exact(n):
    b = b""
    while len(b) < n:
        d = c.recv(n - len(b))
        if not d: raise EOFError
        b += d
    return b
def send(op, payload, fin=0x80):
    mask = os.urandom(4)
    n = len(payload)
    hdr = bytes([fin | op]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n))
    c.sendall(hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
def recv():
    b0, b1 = recv_exact(2)
    n = b1 & 0x7f
    if n == 126: n = struct.unpack(">H", recv_exact(2))[0]
    return b0 & 0x0f, recv_exact(n), b0 & 0x80
for msg in [b"hello-ws", b"x" * 300]:
    send(1, msg)
    op, data, fin = recv()
    print("text %d %s" % (len(data), "ok" if (op, data, fin) == (1, msg, 0x80) else "bad"))
send(1, b"Hel", fin=0)
send(0, b"lo")
frames = [recv(), recv()]
print("fragments %s" % ("ok" if frames == [(1, b"Hel", 0), (0, b"lo", 0x80)] else "bad %r" % frames))
send(8, b"")
print("close %d" % recv()[0])
"#;

pub(crate) fn requirements(test: &str, bins: &[&str]) -> bool {
    support::require_root(test) && bins.iter().all(|b| support::require_bin(b))
}

/// One pod: a namespace captured by `outrider init`, its proxy (uid 1337) and its apps.
pub(crate) struct Pod {
    pub(crate) ns: Netns,
    pub(crate) proxy: Option<ChildGuard>,
    apps: Vec<ChildGuard>,
}

impl Pod {
    pub(crate) fn new(ns: Netns, proxy_args: &[&str]) -> Pod {
        Pod::with_init(ns, &[], proxy_args)
    }

    /// A pod whose `outrider init` gets `init_args`.
    fn with_init(ns: Netns, init_args: &[&str], proxy_args: &[&str]) -> Pod {
        let mut args = vec![OUTRIDER, "init"];
        args.extend_from_slice(init_args);
        let init = ns.exec(&args);
        assert!(
            init.status.success(),
            "outrider init failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let mut pod = Pod {
            ns,
            proxy: None,
            apps: Vec::new(),
        };
        pod.start_proxy(proxy_args);
        pod.serve_demo_app("[::]:8080", "app");
        pod
    }

    /// A namespace outside the mesh (no capture, no proxy), for its apps.
    pub(crate) fn bare(ns: Netns) -> Pod {
        Pod {
            ns,
            proxy: None,
            apps: Vec::new(),
        }
    }

    /// Starts a demo app on `listen` in the pod and waits until it listens.
    pub(crate) fn serve_demo_app(&mut self, listen: &str, instance: &str) {
        let mut app = self.ns.spawn(&[
            OUTRIDER,
            "demo-app",
            "--listen",
            listen,
            "--instance",
            instance,
        ]);
        app.expect_stderr("listening on", Duration::from_secs(10));
        self.apps.push(app);
    }

    fn start_proxy(&mut self, extra: &[&str]) {
        // A proxy already running is stopped first: the new one binds the same ports.
        drop(self.proxy.take());
        let mut args = vec![
            "setpriv",
            "--reuid",
            "1337",
            "--regid",
            "1337",
            "--clear-groups",
            OUTRIDER,
            "proxy",
        ];
        if !extra.contains(&"--detect-timeout") {
            args.extend(["--detect-timeout", "500ms"]);
        }
        args.extend_from_slice(extra);
        let mut cmd = self.ns.command(args[0]);
        cmd.args(&args[1..]).env("OUTRIDER_LOG", "info");
        self.proxy = Some(ChildGuard::spawn(
            &mut cmd,
            format!("[{}] proxy", self.ns.name()),
        ));
        self.wait_ready();
    }

    /// Polls `/ready` (bounded: 100 tries, 50 ms apart) until the proxy answers 200.
    fn wait_ready(&self) {
        for _ in 0..100 {
            if self
                .curl(&["-sf", "http://127.0.0.1:15020/ready"])
                .status
                .success()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let stderr = self.proxy.as_ref().map(|p| p.stderr()).unwrap_or_default();
        panic!(
            "[{}] proxy never became ready; stderr:\n{stderr}",
            self.ns.name()
        );
    }

    pub(crate) fn curl(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["curl", "--max-time", "10"];
        all.extend_from_slice(args);
        self.ns.exec(&all)
    }

    fn curl_ok(&self, args: &[&str]) -> String {
        let out = self.curl(args);
        assert!(
            out.status.success(),
            "curl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub(crate) fn serve_py(&mut self, port: &str, banner: Option<&str>) {
        let mut args = vec![OUTRIDER_PY.as_str(), "-c", PY_SERVER, port];
        args.extend(banner);
        let mut app = self.ns.spawn(&args);
        app.expect_line_containing("ready", Duration::from_secs(10));
        self.apps.push(app);
    }

    fn py(&self, script: &str, args: &[&str]) -> Vec<String> {
        let mut all = vec![OUTRIDER_PY.as_str(), "-c", script];
        all.extend_from_slice(args);
        let out = self.ns.exec(&all);
        assert!(
            out.status.success(),
            "python client {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub(crate) fn metrics(&self) -> String {
        self.curl_ok(&["-s", "http://127.0.0.1:15020/metrics"])
    }

    fn proxy_pid(&self) -> u32 {
        self.proxy.as_ref().map_or(0, ChildGuard::pid)
    }
}

static OUTRIDER_PY: std::sync::LazyLock<String> = std::sync::LazyLock::new(support::python);

/// Two namespaces joined by a veth pair (A 198.18.0.1, B 198.18.0.2), with a route in A for the
/// mesh's virtual addresses (198.18.100.0/24: connect() needs one; iptables redirects them
/// locally); `None` when the test's requirements are missing.
fn linked_pods(test: &str) -> Option<(Netns, Netns, support::Veth)> {
    if !requirements(test, &["ip", "curl", "python3", "setpriv"]) {
        return None;
    }
    let (a, b) = (Netns::new(), Netns::new());
    let link = support::veth(&a, &[&format!("{POD_A}/24")], &b, &[&format!("{POD_B}/24")]);
    a.exec_ok(&["ip", "route", "add", "198.18.100.0/24", "dev", &link.a_if]);
    Some((a, b, link))
}

/// Two pods joined by a veth pair: A (198.18.0.1) is the client, B (198.18.0.2) the server.
fn two_pods(proxy_args: &[&str]) -> (Pod, Pod) {
    let (a, b) = (Netns::new(), Netns::new());
    support::veth(
        &a,
        &[&format!("{POD_A}/24"), &format!("{POD_A6}/64")],
        &b,
        &[&format!("{POD_B}/24"), &format!("{POD_B6}/64")],
    );
    (Pod::new(a, proxy_args), Pod::new(b, proxy_args))
}

fn promtool_check(metrics: &str) {
    let dir = support::TempDir::new();
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, metrics).unwrap();
    let out = support::run(
        Command::new("sh")
            .arg("-c")
            .arg(format!("promtool check metrics < {}", file.display())),
    );
    assert!(
        out.status.success(),
        "promtool rejected /metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn two_pods_carry_http1_h2c_upgrade_and_opaque_tcp() {
    if !requirements(
        "two_pods_carry_http1_h2c_upgrade_and_opaque_tcp",
        &["ip", "curl", "h2load", "python3", "setpriv", "promtool"],
    ) {
        return;
    }
    let (a, mut b) = two_pods(&[]);
    b.serve_py("6379", None); // an opaque-listed port: no detection
    b.serve_py("2525", Some("220 payments-smtp ready\n")); // server speaks first, not listed

    // HTTP/1.1 with curl, through A's outbound and B's inbound proxy.
    let body = a.curl_ok(&["-s", &format!("http://{POD_B}:8080/hello")]);
    assert!(
        body.contains("\"protocol\":\"HTTP/1.1\"") && body.contains("\"path\":\"/hello\""),
        "{body}"
    );
    // The same over IPv6: ip6tables redirects to the proxies' IPv6 listeners.
    let body = a.curl_ok(&["-s", "-g", &format!("http://[{POD_B6}]:8080/v6")]);
    assert!(body.contains("\"path\":\"/v6\""), "{body}");
    // h2c with prior knowledge: curl once, then a bounded h2load burst.
    let body = a.curl_ok(&[
        "-s",
        "--http2-prior-knowledge",
        &format!("http://{POD_B}:8080/h2"),
    ]);
    assert!(body.contains("HTTP/2.0"), "{body}");
    let h2load = String::from_utf8_lossy(
        &a.ns
            .exec(&[
                "h2load",
                "-n",
                "200",
                "-c",
                "4",
                "-m",
                "4",
                &format!("http://{POD_B}:8080/"),
            ])
            .stdout,
    )
    .into_owned();
    assert!(
        h2load.contains("200 succeeded, 0 failed, 0 errored"),
        "{h2load}"
    );
    // A real WebSocket session through both proxies.
    let ws = a.py(PY_UPGRADE, &[POD_B, "8080"]);
    assert_eq!(
        ws,
        [
            "HTTP/1.1 101 Switching Protocols",
            "accept-ok",
            "text 8 ok",
            "text 300 ok",
            "fragments ok",
            "close 8"
        ]
    );
    // Plain TCP echo on an opaque-listed port.
    let echo = a.py(PY_CLIENT, &[POD_B, "6379", "PING"]);
    assert_eq!(echo[0], "PING");
    // Server-speaks-first on an unlisted port: A's outbound dials after its 25 ms grace, B's
    // inbound waits out its detection timeout (500 ms).
    let banner = a.py(PY_CLIENT, &[POD_B, "2525"]);
    assert_eq!(banner[0], "220 payments-smtp ready");
    let delay: f64 = banner[1].parse().unwrap();
    assert!(
        delay < 3.0,
        "server-speaks-first delay is bounded: {delay} s"
    );

    // Both proxies saw the traffic, each in its own direction.
    let (ma, mb) = (a.metrics(), b.metrics());
    // A accepted 10 connections (curl 3, h2load 4, upgrade, echo, banner); B fewer, because A's
    // proxy reuses its pooled upstream connections for HTTP.
    for (m, dir, pod, conns) in [(&ma, "outbound", "A", 10.0), (&mb, "inbound", "B", 4.0)] {
        let other = if dir == "inbound" {
            "outbound"
        } else {
            "inbound"
        };
        let at =
            |family: &str, label: (&str, &str)| sample(m, family, &[("direction", dir), label]);
        let expect = [
            // curl over IPv4 and IPv6, plus the upgrade request.
            ("outrider_requests_total", ("protocol", "http1"), 3.0),
            // curl, plus the h2load burst.
            ("outrider_requests_total", ("protocol", "http2"), 201.0),
            ("outrider_responses_total", ("status_class", "2xx"), 203.0),
            // The 101 of the upgrade.
            ("outrider_responses_total", ("status_class", "1xx"), 1.0),
            // Port 6379 is in the opaque list; port 2525 waited out detection.
            ("outrider_detect_total", ("outcome", "skipped"), 1.0),
            ("outrider_detect_total", ("outcome", "timeout"), 1.0),
        ];
        for (family, label, want) in expect {
            assert_eq!(
                at(family, label),
                want,
                "pod {pod} {dir} {family} {label:?}\n{m}"
            );
        }
        let opened = sample(m, "outrider_tcp_open_total", &[("direction", dir)]);
        assert!(opened >= conns, "pod {pod}: {opened} connections");
        assert!(
            sample(
                m,
                "outrider_tcp_received_bytes_total",
                &[("direction", dir)]
            ) > 1000.0
        );
        let wrong_way = sample(m, "outrider_requests_total", &[("direction", other)]);
        assert_eq!(wrong_way, 0.0, "pod {pod}: nothing counted {other}");
        promtool_check(m);
    }
}

#[test]
fn sigterm_drains_inbound_and_keeps_outbound_for_the_window() {
    if !requirements(
        "sigterm_drains_inbound_and_keeps_outbound_for_the_window",
        &["ip", "curl", "setpriv", "kill"],
    ) {
        return;
    }
    let (a, mut b) = two_pods(&["--drain-window", "3s", "--shutdown-grace", "15s"]);
    let before = sample(
        &b.metrics(),
        "outrider_requests_total",
        &[("direction", "inbound")],
    );
    // A request that is in flight at B's proxy when it gets SIGTERM.
    let mut slow = a.ns.spawn(&[
        "curl",
        "-s",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}\n",
        &format!("http://{POD_B}:8080/slow?ms=1500"),
    ]);
    let seen = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        sample(
            &b.metrics(),
            "outrider_requests_total",
            &[("direction", "inbound")],
        ) > before
    });
    assert!(seen, "the slow request reached B's proxy");
    let term = Instant::now();
    support::run_ok(Command::new("kill").args(["-TERM", &b.proxy_pid().to_string()]));

    // During the drain window: B is not ready (once the proxy has handled the signal), and B's
    // app can still call out.
    let ready = || {
        let out = b.curl(&[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://127.0.0.1:15020/ready",
        ]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = ready();
    while last != "503" && Instant::now() < deadline {
        // Polling the admin API with a deadline.
        std::thread::sleep(Duration::from_millis(10));
        last = ready();
    }
    assert_eq!(last, "503", "not ready while draining");
    let out = b.curl_ok(&["-s", &format!("http://{POD_A}:8080/during-drain")]);
    assert!(out.contains("during-drain"), "{out}");
    // The in-flight request completes.
    assert_eq!(slow.expect_line(Duration::from_secs(10)), "200");
    // The proxy exits 0 after the window, well before the grace deadline.
    let proxy = b.proxy.as_mut().unwrap();
    let status = proxy
        .wait_timeout(Duration::from_secs(12))
        .expect("proxy exited");
    assert!(
        status.success(),
        "exit status {status}; stderr:\n{}",
        proxy.stderr()
    );
    let took = term.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(12),
        "drain took {took:?}"
    );
    assert!(proxy.stderr().contains("drained"), "{}", proxy.stderr());
}

#[test]
fn local_mode_binary_serves_admin_and_metrics_without_root() {
    if !(support::require_bin("curl") && support::require_bin("promtool")) {
        return;
    }
    // The app listens on a port given on its command line (another is tried if that one was
    // taken meanwhile); the proxy binds port 0 and logs what it got.
    let (port, app) = support::spawn_listening(
        "demo-app",
        None,
        |port| {
            let mut cmd = Command::new(OUTRIDER);
            cmd.args(["demo-app", "--listen", &format!("127.0.0.1:{port}")]);
            cmd
        },
        "listening on",
    );
    let mut proxy = support::ChildGuard::spawn(
        Command::new(OUTRIDER)
            .args([
                "proxy",
                "--forward",
                &format!("127.0.0.1:0=localhost:{port}"),
            ])
            .env("OUTRIDER_ADMIN", "127.0.0.1:0")
            .env("OUTRIDER_LOG", "info")
            .env("OUTRIDER_LOG_FORMAT", "json"),
        "proxy",
    );
    let addrs = support::proxy_addrs(&mut proxy, Duration::from_secs(10));
    let (listen, admin) = (addrs.forwards[0].port(), addrs.admin.port());
    let curl = |args: &[&str]| {
        let mut all = vec!["--max-time", "5", "-s"];
        all.extend_from_slice(args);
        support::run(Command::new("curl").args(&all))
    };
    let ready = curl(&["-f", &format!("http://127.0.0.1:{admin}/ready")]);
    assert!(
        ready.status.success(),
        "proxy not ready: {}",
        proxy.stderr()
    );
    let body =
        String::from_utf8_lossy(&curl(&[&format!("http://127.0.0.1:{listen}/laptop")]).stdout)
            .into_owned();
    assert!(body.contains("/laptop"), "{body}");
    let level = curl(&[
        "-X",
        "PUT",
        "--data",
        "outrider_proxy=debug",
        &format!("http://127.0.0.1:{admin}/log-level"),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&level.stdout).trim(),
        "outrider_proxy=debug"
    );
    let bad = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "PUT",
        "--data",
        "x[",
        &format!("http://127.0.0.1:{admin}/log-level"),
    ]);
    assert_eq!(String::from_utf8_lossy(&bad.stdout).trim(), "400");
    // An empty filter (curl -X PUT without --data) would turn logging off: refused.
    let empty = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "PUT",
        &format!("http://127.0.0.1:{admin}/log-level"),
    ]);
    assert_eq!(String::from_utf8_lossy(&empty.stdout).trim(), "400");
    let level = curl(&[&format!("http://127.0.0.1:{admin}/log-level")]);
    assert_eq!(
        String::from_utf8_lossy(&level.stdout).trim(),
        "outrider_proxy=debug"
    );
    let metrics =
        String::from_utf8_lossy(&curl(&[&format!("http://127.0.0.1:{admin}/metrics")]).stdout)
            .into_owned();
    assert_eq!(
        sample(
            &metrics,
            "outrider_requests_total",
            &[("direction", "forward"), ("protocol", "http1")]
        ),
        1.0,
        "{metrics}"
    );
    promtool_check(&metrics);
    let config =
        String::from_utf8_lossy(&curl(&[&format!("http://127.0.0.1:{admin}/config")]).stdout)
            .into_owned();
    assert!(config.contains("\"mode\": \"local\""), "{config}");
    // Shutdown through the admin API; logs were JSON lines.
    assert!(curl(&[
        "-f",
        "-X",
        "POST",
        &format!("http://127.0.0.1:{admin}/shutdown")
    ])
    .status
    .success());
    let status = proxy
        .wait_timeout(Duration::from_secs(10))
        .expect("proxy exited after /shutdown");
    assert!(status.success());
    assert!(
        proxy.stderr().lines().all(|l| l.starts_with('{')),
        "{}",
        proxy.stderr()
    );
    assert!(
        proxy.stderr().contains("log filter change requested"),
        "the filter change is logged at warn: {}",
        proxy.stderr()
    );
    drop(app);
}

#[test]
fn bad_proxy_flags_exit_2_with_the_reason() {
    for (args, needle) in [
        (&["--forward", "127.0.0.1:8080"][..], "has no `=`"),
        (
            &["--forward", "127.0.0.1:8080=nowhere.invalid:x"][..],
            "upstream",
        ),
        (&["--detect-timeout", "5x"][..], "invalid duration"),
        (&["--workers", "0"][..], "--workers"),
        (
            &["--admin", "127.0.0.1:15020", "--inbound", "127.0.0.1:15020"][..],
            "already used by --admin",
        ),
        // Never bound: validation stops first.
        (
            &[
                "--forward",
                "127.0.0.1:18990=127.0.0.1:18991",
                "--forward",
                "127.0.0.1:18991=127.0.0.1:18990",
            ][..],
            "127.0.0.1:18990=127.0.0.1:18991 → 127.0.0.1:18991=127.0.0.1:18990",
        ),
        (
            &["--forward", "0.0.0.0:18992=127.0.0.1:18992"][..],
            "requests would loop back into the proxy",
        ),
    ] {
        let out = support::run(Command::new(OUTRIDER).arg("proxy").args(args));
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    // Every problem at once, each with its flag.
    let out = support::run(Command::new(OUTRIDER).args([
        "proxy",
        "--admin",
        "127.0.0.1:15020",
        "--inbound",
        "127.0.0.1:15020",
        "--control",
        "http://127.0.0.1:15012",
    ]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("--inbound: 127.0.0.1:15020 is already used by --admin"),
        "{stderr}"
    );
    assert!(
        stderr.contains("--workload: --control needs --workload"),
        "{stderr}"
    );
}

/// `outrider demo` with `args`. The demo mesh's endpoints are fixed ports (127.0.0.1:18181-18183,
/// 127.0.0.2-4:8080): as root the demo runs in a network namespace of its own, so another test
/// run on the machine (a second checkout's suite) cannot collide with it; without root it runs on
/// the host's loopback, as a user would.
fn run_demo(ns: Option<&support::Netns>, args: &[&str]) -> String {
    let mut cmd = match ns {
        Some(ns) => ns.command(OUTRIDER),
        None => Command::new(OUTRIDER),
    };
    support::run_ok(cmd.arg("demo").args(args))
}

#[test]
fn demo_runs_and_reports() {
    let ns = (support::euid() == Some(0)).then(support::Netns::new);
    let out = run_demo(ns.as_ref(), &["--duration", "1s"]);
    assert!(out.contains("errors     0"), "{out}");
    assert!(out.contains("statuses   200: "), "{out}");
    let counted = out
        .lines()
        .find(|l| l.starts_with("proxies"))
        .unwrap_or_default()
        .to_owned();
    assert!(!counted.contains("counted 0 "), "{out}");
    // Every proxied request is counted exactly once on each proxy.
    let numbers: Vec<u64> = counted
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    assert_eq!(numbers.len(), 2, "{counted}");
    assert_eq!(
        numbers[0], numbers[1],
        "client and server side disagree: {counted}"
    );
    // Mutual TLS between the two sides, both identities named, handshakes counted, and the
    // intruder's call denied.
    let mtls = out
        .lines()
        .find(|l| l.starts_with("mTLS"))
        .unwrap_or_default();
    assert!(
        mtls.contains("sa/loadgen → spiffe://outrider.local/ns/demo/sa/payments-api")
            && !mtls.contains(": 0 connections"),
        "{out}"
    );
    let handshakes = out
        .lines()
        .find(|l| l.starts_with("handshakes"))
        .unwrap_or_default();
    assert!(!handshakes.starts_with("handshakes 0 full"), "{out}");
    assert!(handshakes.contains("0 failed"), "{out}");
    assert!(
        out.contains(
            "denied     1 call from spiffe://outrider.local/ns/demo/sa/intruder: 403 denied"
        ),
        "{out}"
    );

    // With faults (run after the plain demo: both use the demo mesh's fixed endpoint ports):
    // retries and breakers keep every request successful, the failing copy's breaker opens and,
    // once it recovers, closes; the slow copy gets less of the load than the healthy one (on a
    // loaded machine every answer is slow, so its share of the total says little; the order of
    // the two holds).
    let out = run_demo(ns.as_ref(), &["--faults", "--duration", "6s"]);
    assert!(out.contains("errors     0"), "{out}");
    let line = |prefix: &str| -> String {
        out.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_default()
            .to_string()
    };
    let numbers = |l: &str| -> Vec<f64> {
        l.split(|c: char| !c.is_ascii_digit() && c != '.')
            .filter_map(|n| n.parse().ok())
            .collect()
    };
    let retries = line("retries");
    assert!(numbers(&retries)[0] > 0.0, "{out}");
    let failing = line("breaker    127.0.0.1:18181");
    // "…:18181: opened N times, probed N, closed N; now …": the last three numbers.
    let n = numbers(&failing);
    let (opened, closed) = (n[n.len() - 3], n[n.len() - 1]);
    assert!(
        opened >= 1.0 && closed >= 1.0,
        "the breaker opened and closed: {out}"
    );
    assert!(failing.ends_with("now closed"), "{out}");
    let spread = line("endpoints");
    let share = |instance: &str| -> f64 {
        let at = spread.find(instance).unwrap() + instance.len() + 2;
        spread[at..]
            .split(',')
            .next()
            .unwrap()
            .trim()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(
        share("payments-api-2") < share("payments-api-1"),
        "the slow copy: {spread}"
    );
}

#[test]
fn sidecar_outbound_follows_discovery() {
    let Some((a, b, _link)) = linked_pods("sidecar_outbound_follows_discovery") else {
        return;
    };
    let dir = support::TempDir::new();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        format!(
            "services:
  - name: payments
    namespace: test
    addresses: [198.18.100.1:80]
    protocol: http1
    endpoints:
      - address: {POD_B}:8080
      - address: {POD_B}:8081
    routes:
      - name: slow
        match: {{ path_prefix: /slow }}
        timeout: 200ms
  - name: cache
    namespace: test
    addresses: [198.18.100.2:7000]
    protocol: opaque
    endpoints:
      - address: {POD_B}:6379
workloads:
  - name: test/client
"
        ),
    )
    .unwrap();
    // The control plane runs in pod A's namespace, so its proxy reaches it on loopback.
    let mesh_path = mesh.display().to_string();
    let mut control = a.spawn(&[OUTRIDER, "control", "--plaintext", "--config", &mesh_path]);
    control.expect_stderr("control plane ready", Duration::from_secs(10));
    let a = Pod::new(
        a,
        &[
            "--control",
            "http://127.0.0.1:15012",
            "--workload",
            "test/client",
        ],
    );
    let mut b = Pod::new(b, &[]);
    b.serve_demo_app("[::]:8081", "app2");
    b.serve_py("6379", None);

    // HTTP to the virtual address: balanced over both endpoints of pod B.
    let mut instances = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let body = a.curl_ok(&["-s", "http://198.18.100.1/pay"]);
        let instance = body
            .split("\"instance\":\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or_default()
            .to_string();
        instances.insert(instance);
    }
    assert_eq!(instances.into_iter().collect::<Vec<_>>(), ["app", "app2"]);
    // The route's timeout applies.
    let slow = a.curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "http://198.18.100.1/slow?ms=1000",
    ]);
    assert_eq!(String::from_utf8_lossy(&slow.stdout).trim(), "504");
    // An opaque service: bytes go to its endpoint.
    let echo = a.py(PY_CLIENT, &["198.18.100.2", "7000", "PING"]);
    assert_eq!(echo[0], "PING");
    // Anything else passes through to its original destination.
    assert!(a
        .curl_ok(&["-s", &format!("http://{POD_B}:8080/direct")])
        .contains("/direct"));

    let m = a.metrics();
    assert_eq!(sample(&m, "outrider_control_connected", &[]), 1.0);
    assert_eq!(
        sample(
            &m,
            "outrider_errors_total",
            &[("direction", "outbound"), ("reason", "request-timeout")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "outrider_detect_total",
            &[("direction", "outbound"), ("outcome", "skipped")]
        ),
        1.0,
        "opaque service: no detection"
    );
}

#[test]
fn inbound_reaches_the_pods_address_not_its_loopback_and_admin_config_is_loopback_only() {
    if !requirements(
        "inbound_reaches_the_pods_address_not_its_loopback_and_admin_config_is_loopback_only",
        &["ip", "curl", "setpriv"],
    ) {
        return;
    }
    // B's admin listens on every address (as a kubelet or Prometheus would need).
    let (a, mut b) = two_pods(&["--admin", "0.0.0.0:15020"]);
    // A debug server inside B that listens on loopback only.
    b.serve_demo_app("127.0.0.1:9090", "private");
    let status = |pod: &Pod, url: &str| {
        let out = pod.curl(&["-s", "-o", "/dev/null", "-w", "%{http_code}", url]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let private = format!("http://{POD_B}:9090/");
    // Default: inbound goes to B's own address, where nothing listens on 9090.
    assert_eq!(status(&a, &private), "502");
    // Reached inside B itself (loopback is not captured).
    assert_eq!(status(&b, "http://127.0.0.1:9090/"), "200");
    // The admin port is not captured: from A, /metrics answers, /config is refused.
    assert_eq!(status(&a, &format!("http://{POD_B}:15020/metrics")), "200");
    assert_eq!(status(&a, &format!("http://{POD_B}:15020/config")), "403");
    assert_eq!(status(&b, "http://127.0.0.1:15020/config"), "200");

    // --inbound-target loopback: the older behaviour reaches loopback-only listeners.
    b.start_proxy(&["--admin", "0.0.0.0:15020", "--inbound-target", "loopback"]);
    assert_eq!(status(&a, &private), "200");
}

/// Records every frame an interface carries into a file (AF_PACKET), for `seconds`.
const PY_CAPTURE: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
s.bind((sys.argv[1], 0))
s.settimeout(0.2)
out = open(sys.argv[2], "ab", buffering=0)
print("ready", flush=True)
end = time.time() + float(sys.argv[3])
while time.time() < end:
    try:
        out.write(s.recv(65535))
    except socket.timeout:
        pass
"#;

#[test]
fn two_meshed_pods_speak_mutual_tls_on_the_wire_and_authorize_by_identity() {
    let Some((a, b, link)) =
        linked_pods("two_meshed_pods_speak_mutual_tls_on_the_wire_and_authorize_by_identity")
    else {
        return;
    };
    // The CA's files, the two pods' tokens, readable by the proxies' uid.
    let dir = support::TempDir::new();
    let d = |f: &str| dir.path().join(f).display().to_string();
    let ca = dir.path().join("ca");
    support::run_ok(Command::new(OUTRIDER).args(["control", "ca", "init", "--dir", &d("ca")]));
    let token = |sa: &str| {
        let out = support::run_ok(Command::new(OUTRIDER).args([
            "control",
            "token",
            "--token-key",
            &ca.join("token.key").display().to_string(),
            "--namespace",
            "demo",
            "--service-account",
            sa,
        ]));
        std::fs::write(dir.path().join(format!("{sa}.token")), out.trim()).unwrap();
    };
    token("web");
    token("api");
    let policy = |allowed: &str| {
        format!(
            "services:
  - name: api
    namespace: demo
    addresses: [198.18.100.1:80]
    protocol: http1
    endpoints:
      - address: {POD_B}:8080
        identity: spiffe://outrider.local/ns/demo/sa/api
  - name: echo
    namespace: demo
    addresses: [198.18.100.2:7000]
    protocol: opaque
    endpoints:
      - address: {POD_B}:6379
        identity: spiffe://outrider.local/ns/demo/sa/api
  - name: banner
    namespace: demo
    addresses: [198.18.100.3:7777]
    endpoints:
      - address: {POD_B}:7777
        identity: spiffe://outrider.local/ns/demo/sa/api
workloads:
  - name: demo/web
  - name: demo/api
    default_policy: mesh-only
    servers:
      - port: 8080
        allow: [{allowed}]
      - port: 6379
        allow: [{allowed}]
"
        )
    };
    std::fs::write(
        d("mesh.yaml"),
        policy("spiffe://outrider.local/ns/demo/sa/web"),
    )
    .unwrap();
    for f in ["web.token", "api.token", "ca/root.pem"] {
        support::run_ok(Command::new("chmod").args(["a+r", &d(f)]));
    }
    support::run_ok(Command::new("chmod").args(["a+rx", &d(""), &d("ca")]));
    // The control plane, over TLS, in pod A's namespace (its port exempt from capture).
    let mut control = a.spawn(&[
        OUTRIDER,
        "control",
        "--config",
        &d("mesh.yaml"),
        "--listen",
        &format!("{POD_A}:15012"),
        "--issuer-cert",
        &d("ca/issuer.pem"),
        "--issuer-key",
        &d("ca/issuer-key.pem"),
        "--trust-anchors",
        &d("ca/root.pem"),
        "--token-key",
        &d("ca/token.key"),
    ]);
    control.expect_stderr("control plane ready", Duration::from_secs(10));
    let url = format!("https://{POD_A}:15012");
    let proxy = |workload: &str, token: &str| {
        vec![
            "--control".to_string(),
            url.clone(),
            "--trust-anchors".into(),
            d("ca/root.pem"),
            "--workload".into(),
            workload.into(),
            "--identity-token-file".into(),
            d(token),
            "--detect-timeout".into(),
            "2s".into(),
        ]
    };
    let a_args = proxy("demo/web", "web.token");
    let a_args: Vec<&str> = a_args.iter().map(String::as_str).collect();
    let a = Pod::with_init(a, &["--exclude-inbound-ports", "15012"], &a_args);
    let b_args = proxy("demo/api", "api.token");
    let b_args: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let mut b = Pod::new(b, &b_args);
    b.serve_py("6379", None);
    b.serve_py("7777", Some("BANNER\n"));
    assert!(b
        .curl_ok(&["-s", "http://127.0.0.1:15020/identity"])
        .contains("spiffe://outrider.local/ns/demo/sa/api"));

    // Watch the wire between the pods.
    let capture = d("wire.bin");
    let mut sniffer = b.ns.spawn(&[
        OUTRIDER_PY.as_str(),
        "-c",
        PY_CAPTURE,
        &link.b_if,
        &capture,
        "60",
    ]);
    sniffer.expect_line_containing("ready", Duration::from_secs(10));

    // HTTP/1.1 from pod A's app to the service: mTLS between the proxies, HTTP/1.1 at the app.
    let body = a.curl_ok(&[
        "-s",
        "-H",
        "x-marker: secret-header-value",
        "--data",
        "secret-body-bytes",
        "http://198.18.100.1/secret-path",
    ]);
    assert!(body.contains("\"protocol\":\"HTTP/1.1\""), "{body}");
    assert!(body.contains("/secret-path"), "{body}");
    // Opaque TCP rides its own TLS stream.
    assert_eq!(
        a.py(PY_CLIENT, &["198.18.100.2", "7000", "PING-secret"])[0],
        "PING-secret"
    );
    // A server that speaks first, on a port nobody declared opaque: less than one detection
    // timeout (A's outbound dials after a 25 ms grace, not its 2 s timeout; B's inbound sees a
    // mesh ClientHello at once).
    let start = Instant::now();
    let banner = a.py(PY_CLIENT, &["198.18.100.3", "7777"]);
    let waited = start.elapsed();
    assert_eq!(banner[0], "BANNER");
    assert!(
        waited < Duration::from_millis(1900),
        "waited {waited:?}: a whole detection timeout?"
    );
    // Positive control for the capture: a plaintext request (to an address with no identity)
    // shows on the wire.
    let _ = a.curl(&["-s", &format!("http://{POD_B}:9999/plaintext-control")]);
    std::thread::sleep(Duration::from_millis(300));
    let wire = std::fs::read(&capture).unwrap();
    let seen = |needle: &str| wire.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(
        seen("plaintext-control"),
        "the capture sees plaintext ({} bytes)",
        wire.len()
    );
    for secret in [
        "secret-path",
        "secret-header-value",
        "secret-body-bytes",
        "PING-secret",
    ] {
        assert!(!seen(secret), "{secret} crossed the wire in plaintext");
    }
    assert!(
        wire.windows(3).any(|w| w == [0x17, 0x03, 0x03]),
        "TLS application data records"
    );
    drop(sniffer);

    let m = b.metrics();
    assert!(
        sample(
            &m,
            "outrider_inbound_mesh_connections_total",
            &[("client_id", "spiffe://outrider.local/ns/demo/sa/web")]
        ) >= 2.0
    );
    let hs = sample(
        &m,
        "outrider_tls_handshakes_total",
        &[("direction", "inbound")],
    );
    assert!(hs >= 2.0, "inbound handshakes: {hs}");
    // A plaintext client of a strict port: refused before the app.
    let direct = a.curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{POD_B}:8080/"),
    ]);
    assert_eq!(String::from_utf8_lossy(&direct.stdout).trim(), "403");

    // The policy changes: web is no longer allowed. HTTP gets 403, TCP is closed.
    std::fs::write(
        d("mesh.yaml"),
        policy("spiffe://outrider.local/ns/demo/sa/nobody"),
    )
    .unwrap();
    let mut code = String::new();
    for _ in 0..100 {
        let out = a.curl(&[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://198.18.100.1/",
        ]);
        code = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if code == "403" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(code, "403");
    let echo = a.ns.exec(&[
        OUTRIDER_PY.as_str(),
        "-c",
        PY_CLIENT,
        "198.18.100.2",
        "7000",
        "PING",
    ]);
    assert!(
        !String::from_utf8_lossy(&echo.stdout).contains("PING"),
        "a denied TCP connection carries nothing"
    );
    let m = b.metrics();
    assert!(
        sample(
            &m,
            "outrider_authz_denied_total",
            &[("rule", "identity-not-allowed")]
        ) >= 2.0
    );
    promtool_check(&m);
}
