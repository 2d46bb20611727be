//! Real-kernel tests of `outrider init`.
//!
//! Each test makes its own namespaces: a pod (`198.18.0.1/24`, `2001:db8::1/64`, default routes
//! over the veth) and a peer (`198.18.0.2` and `.3`, `2001:db8::2` and `::3`), runs the real
//! `outrider init` inside the pod with `ip netns exec`, and proves the capture with real sockets:
//! small python3 servers print `ready` once listening and answer every connection with
//! `<label> port=<listening port> orig=<SO_ORIGINAL_DST>`; a python3 client (dropping to the
//! app's uid 1000 or the proxy's uid 1337 before connecting) prints `ok <answer>`, `refused`, or
//! `timeout`. Capture scenarios run on both backends (nft and legacy). Flag errors and the dry
//! run need no root and run the binary directly, always with `--dry-run` or an empty PATH so the
//! host's own iptables can never be touched.

use std::process::{Command, Output};
use std::time::Duration;

use crate::support::{self, ChildGuard, Netns, TempDir};

const OUTRIDER: &str = env!("CARGO_BIN_EXE_outrider");
pub(crate) const APP_UID: &str = "1000";
pub(crate) const PROXY_UID: &str = "1337";
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Answers every connection with its label, listening port and original destination.
const SERVER_PY: &str = r#"
import selectors, socket, struct, sys
label, ports = sys.argv[1], [int(p) for p in sys.argv[2].split(",")]
sel = selectors.DefaultSelector()
for port in ports:
    for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port))
        s.listen(64)
        sel.register(s, selectors.EVENT_READ, port)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        c, _peer = key.fileobj.accept()
        try:
            if c.family == socket.AF_INET:
                raw = c.getsockopt(socket.SOL_IP, 80, 16)
                orig = "%s:%d" % (socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack("!H", raw[2:4])[0])
            else:
                raw = c.getsockopt(socket.IPPROTO_IPV6, 80, 28)
                orig = "[%s]:%d" % (socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack("!H", raw[2:4])[0])
        except OSError:
            orig = "none"
        c.sendall(("%s port=%d orig=%s\n" % (label, key.data, orig)).encode())
        c.close()
"#;

/// Connects as a given uid (-1: stay root) and prints what answered.
const CLIENT_PY: &str = r#"
import os, socket, sys
host, port, uid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if uid >= 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(3)
try:
    s.connect((host, port))
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(256)
        if not chunk:
            break
        data += chunk
    print("ok " + data.decode().strip())
except ConnectionRefusedError:
    print("refused")
except socket.timeout:
    print("timeout")
except OSError as e:
    print("error %s" % e)
"#;

/// The iptables implementations the capture scenarios run on.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    fn tool(self, v6: bool, verb: &str) -> String {
        format!(
            "{}-{}{verb}",
            if v6 { "ip6tables" } else { "iptables" },
            self.name()
        )
    }

    /// `iptables-nft`, `ip6tables-legacy-save`, ...
    fn iptables(self, v6: bool) -> String {
        self.tool(v6, "")
    }

    fn save(self, v6: bool) -> String {
        self.tool(v6, "-save")
    }
}

/// The common requirements of the namespace tests; `false` means skip.
fn requirements(test: &str, backend: Option<Backend>) -> bool {
    if !support::require_root(test)
        || !support::require_bin("ip")
        || !support::require_bin("python3")
    {
        return false;
    }
    match backend {
        Some(b) => {
            support::require_bin(&format!("{}-restore", b.iptables(false)))
                && support::require_bin(&format!("{}-restore", b.iptables(true)))
        }
        None => {
            support::require_bin("iptables-nft-restore")
                && support::require_bin("iptables-legacy-restore")
        }
    }
}

/// A pod and a peer namespace linked by a veth pair, with servers in both.
struct Topology {
    // Field order is drop order: servers die before their namespaces are deleted.
    _servers: Vec<ChildGuard>,
    pod: Netns,
    peer: Netns,
}

impl Topology {
    fn new(with_servers: bool) -> Topology {
        let pod = Netns::new();
        let peer = Netns::new();
        support::veth(
            &pod,
            &["198.18.0.1/24", "2001:db8::1/64"],
            &peer,
            &[
                "198.18.0.2/24",
                "198.18.0.3/24",
                "2001:db8::2/64",
                "2001:db8::3/64",
            ],
        );
        pod.exec_ok(&["ip", "route", "add", "default", "via", "198.18.0.2"]);
        pod.exec_ok(&["ip", "-6", "route", "add", "default", "via", "2001:db8::2"]);
        let mut servers = Vec::new();
        if with_servers {
            servers.push(server(&pod, "pod", "15001,15006,15020,8080,9090"));
            servers.push(server(&peer, "peer", "80,443,8080"));
        }
        Topology {
            _servers: servers,
            pod,
            peer,
        }
    }
}

pub(crate) fn server(ns: &Netns, label: &str, ports: &str) -> ChildGuard {
    let mut child = ns.spawn(&[&support::python(), "-c", SERVER_PY, label, ports]);
    let line = child.expect_line(READY_TIMEOUT);
    assert_eq!(
        line,
        "ready",
        "{label} server did not start: {}",
        child.stderr()
    );
    child
}

/// Connects from `ns` as `uid` ("-1" = root) to host:port; returns the client's one-line verdict.
pub(crate) fn connect(ns: &Netns, host: &str, port: u16, uid: &str) -> String {
    let out = ns.exec(&[
        &support::python(),
        "-c",
        CLIENT_PY,
        host,
        &port.to_string(),
        uid,
    ]);
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success(),
        "client failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn assert_conn(ns: &Netns, host: &str, port: u16, uid: &str, expected: &str) {
    let got = connect(ns, host, port, uid);
    assert_eq!(
        got,
        expected,
        "connect from {} as uid {uid} to {host}:{port}",
        ns.name()
    );
}

/// Asserts a connection from `ns` as `uid` to `host:port` landed on the proxy's outbound
/// listener (15001) with its original destination intact.
pub(crate) fn assert_outbound(ns: &Netns, host: &str, port: u16, uid: &str) {
    assert_redirected(ns, host, port, uid, 15001);
}

/// Asserts a connection from `ns` as `uid` to `host:port` landed on the proxy's inbound listener
/// (15006) with its original destination intact.
pub(crate) fn assert_inbound(ns: &Netns, host: &str, port: u16, uid: &str) {
    assert_redirected(ns, host, port, uid, 15006);
}

fn assert_redirected(ns: &Netns, host: &str, port: u16, uid: &str, listener: u16) {
    let ip: std::net::IpAddr = host.parse().expect("an IP address");
    let orig = std::net::SocketAddr::new(ip, port);
    assert_conn(
        ns,
        host,
        port,
        uid,
        &format!("ok pod port={listener} orig={orig}"),
    );
}

/// Asserts the connection reached `label`'s server on the port dialed: not redirected. (Its
/// SO_ORIGINAL_DST is not checked: without NAT rules the namespace may have no conntrack entry.)
pub(crate) fn assert_direct(ns: &Netns, host: &str, port: u16, uid: &str, label: &str) {
    let got = connect(ns, host, port, uid);
    let expected = format!("ok {label} port={port} ");
    assert!(
        got.starts_with(&expected),
        "connect from {} as uid {uid} to {host}:{port}: expected {expected:?}..., got {got:?}",
        ns.name()
    );
}

/// Runs `outrider init ARGS` inside `ns`.
fn init(ns: &Netns, args: &[&str]) -> Output {
    let mut cmd = ns.command(OUTRIDER);
    cmd.arg("init").args(args);
    support::run(&mut cmd)
}

/// Runs `outrider init ARGS` inside `ns` and panics unless it succeeds; returns stderr.
fn init_ok(ns: &Netns, args: &[&str]) -> String {
    let out = init(ns, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "outrider init {args:?} failed ({}):\n{stderr}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// `iptables-save` output without comments and with counters zeroed.
pub(crate) fn normalized_save(ns: &Netns, save: &str, table: Option<&str>) -> String {
    let mut args = vec![save];
    if let Some(t) = table {
        args.extend(["-t", t]);
    }
    let text = ns.exec_ok(&args);
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
            (true, Some(i)) => format!("{} [0:0]", &l[..i]),
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Everything both families of `backend` hold, normalized.
fn full_state(ns: &Netns, backend: Backend) -> String {
    format!(
        "{}\n---v6---\n{}",
        normalized_save(ns, &backend.save(false), None),
        normalized_save(ns, &backend.save(true), None)
    )
}

fn capture_scenario(backend: Backend) {
    if !requirements(&support::test_name(), Some(backend)) {
        return;
    }
    let t = Topology::new(true);
    // Baseline: without rules the app reaches the peer directly.
    assert_direct(&t.pod, "198.18.0.2", 80, APP_UID, "peer");
    assert_direct(&t.peer, "198.18.0.1", 8080, "-1", "pod");

    let stderr = init_ok(&t.pod, &["--backend", backend.name()]);
    assert!(
        stderr.contains(&format!("using the {} backend (forced", backend.name())),
        "{stderr}"
    );
    assert!(stderr.contains("global IPv6 address present"), "{stderr}");

    // Outbound from the app: redirected to 15001 with the original destination intact.
    assert_outbound(&t.pod, "198.18.0.2", 80, APP_UID);
    assert_outbound(&t.pod, "198.18.5.5", 80, APP_UID);
    assert_outbound(&t.pod, "198.18.0.2", 443, "-1");
    assert_outbound(&t.pod, "2001:db8::2", 80, APP_UID);
    // The proxy's own uid is exempt: it reaches the real peer.
    assert_direct(&t.pod, "198.18.0.2", 80, PROXY_UID, "peer");
    assert_direct(&t.pod, "2001:db8::2", 80, PROXY_UID, "peer");
    assert_eq!(connect(&t.pod, "198.18.0.2", 81, PROXY_UID), "refused");
    // Loopback (and the pod's own IP over lo) is not captured.
    assert_direct(&t.pod, "127.0.0.1", 8080, APP_UID, "pod");
    assert_direct(&t.pod, "::1", 8080, APP_UID, "pod");
    assert_direct(&t.pod, "198.18.0.1", 8080, APP_UID, "pod");
    // Inbound from the peer: redirected to 15006 with the original port intact.
    assert_inbound(&t.peer, "198.18.0.1", 8080, "-1");
    assert_inbound(&t.peer, "198.18.0.1", 9090, "-1");
    assert_inbound(&t.peer, "2001:db8::1", 8080, "-1");
    // The proxy's own ports are never captured inbound.
    assert_direct(&t.peer, "198.18.0.1", 15020, "-1", "pod");
    assert_direct(&t.peer, "198.18.0.1", 15001, "-1", "pod");
    // The other implementation holds nothing.
    let other = match backend {
        Backend::Nft => Backend::Legacy,
        Backend::Legacy => Backend::Nft,
    };
    if support::which(&other.save(false)).is_some() {
        let text = t.pod.exec_ok(&[&other.save(false)]);
        assert!(
            !text.contains("OUTRIDER"),
            "{} has our rules:\n{text}",
            other.name()
        );
    }
}

#[test]
fn capture_nft() {
    capture_scenario(Backend::Nft);
}

#[test]
fn capture_legacy() {
    capture_scenario(Backend::Legacy);
}

fn exclusions_scenario(backend: Backend) {
    if !requirements(&support::test_name(), Some(backend)) {
        return;
    }
    let t = Topology::new(true);
    init_ok(
        &t.pod,
        &[
            "--backend",
            backend.name(),
            "--exclude-inbound-ports",
            "9090",
            "--exclude-outbound-ports",
            "443",
            "--exclude-outbound-cidrs",
            "198.18.0.3/32,2001:db8::3/128",
        ],
    );
    assert_outbound(&t.pod, "198.18.0.2", 80, APP_UID);
    assert_direct(&t.pod, "198.18.0.2", 443, APP_UID, "peer");
    assert_direct(&t.pod, "198.18.0.3", 80, APP_UID, "peer");
    assert_direct(&t.pod, "2001:db8::3", 80, APP_UID, "peer");
    assert_outbound(&t.pod, "2001:db8::2", 80, APP_UID);
    assert_direct(&t.peer, "198.18.0.1", 9090, "-1", "pod");
    assert_direct(&t.peer, "2001:db8::1", 9090, "-1", "pod");
    assert_inbound(&t.peer, "198.18.0.1", 8080, "-1");
}

#[test]
fn exclusions_nft() {
    exclusions_scenario(Backend::Nft);
}

#[test]
fn exclusions_legacy() {
    exclusions_scenario(Backend::Legacy);
}

fn include_scenario(backend: Backend) {
    if !requirements(&support::test_name(), Some(backend)) {
        return;
    }
    let t = Topology::new(true);
    init_ok(
        &t.pod,
        &[
            "--backend",
            backend.name(),
            "--include-outbound-cidrs",
            "198.18.0.2/32,2001:db8::2/128",
        ],
    );
    assert_outbound(&t.pod, "198.18.0.2", 80, APP_UID);
    assert_direct(&t.pod, "198.18.0.3", 80, APP_UID, "peer");
    assert_outbound(&t.pod, "2001:db8::2", 80, APP_UID);
    assert_direct(&t.pod, "2001:db8::3", 80, APP_UID, "peer");
    // Inbound capture is unaffected by the outbound include list.
    assert_inbound(&t.peer, "198.18.0.1", 8080, "-1");
}

#[test]
fn include_cidrs_nft() {
    include_scenario(Backend::Nft);
}

#[test]
fn include_cidrs_legacy() {
    include_scenario(Backend::Legacy);
}

/// `outrider-init`'s arguments as `outrider inject` writes them for a pod with `annotations`.
fn injected_init_args(annotations: &str) -> Vec<String> {
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations: {{{annotations}}}\nspec:\n  containers: [{{name: a, image: x}}]\n"
    );
    let out = outrider_kubernetes::inject::inject(&pod, &Default::default()).unwrap();
    let docs = outrider_kubernetes::manifest::parse(&out.yaml).unwrap();
    let init = &docs[0]["spec"]["initContainers"][0];
    assert_eq!(init["name"].as_str(), Some("outrider-init"));
    let args: Vec<String> = init["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(args[0], "init");
    args[1..].to_vec()
}

/// The include-only annotations, through `outrider inject` to `outrider init` in a real
/// namespace: an included port is captured, another is not, in both directions.
fn include_ports_scenario(backend: Backend) {
    if !requirements(&support::test_name(), Some(backend)) {
        return;
    }
    let t = Topology::new(true);
    let mut args = injected_init_args(
        "outrider.io/include-inbound-ports: \"8080\", outrider.io/include-outbound-ports: \"80\"",
    );
    assert!(
        args.join(" ")
            .contains("--include-inbound-ports 8080 --include-outbound-ports 80"),
        "{args:?}"
    );
    args.extend(["--backend".to_owned(), backend.name().to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    init_ok(&t.pod, &args);
    // Inbound: 8080 goes to the proxy, 9090 straight to the app.
    assert_inbound(&t.peer, "198.18.0.1", 8080, "-1");
    assert_direct(&t.peer, "198.18.0.1", 9090, "-1", "pod");
    assert_inbound(&t.peer, "2001:db8::1", 8080, "-1");
    assert_direct(&t.peer, "2001:db8::1", 9090, "-1", "pod");
    // Outbound: port 80 goes to the proxy, 443 and 8080 straight to the peer.
    assert_outbound(&t.pod, "198.18.0.2", 80, APP_UID);
    assert_direct(&t.pod, "198.18.0.2", 443, APP_UID, "peer");
    assert_direct(&t.pod, "198.18.0.2", 8080, APP_UID, "peer");
    assert_outbound(&t.pod, "2001:db8::2", 80, APP_UID);
    assert_direct(&t.pod, "2001:db8::2", 443, APP_UID, "peer");
}

#[test]
fn include_ports_nft() {
    include_ports_scenario(Backend::Nft);
}

#[test]
fn include_ports_legacy() {
    include_ports_scenario(Backend::Legacy);
}

fn idempotent_cleanup_scenario(backend: Backend) {
    if !requirements(&support::test_name(), Some(backend)) {
        return;
    }
    let t = Topology::new(false);
    // Foreign rules that must survive everything: nat PREROUTING/OUTPUT, a user chain, filter.
    for v6 in [false, true] {
        let ipt = backend.iptables(v6);
        for rule in [
            "-t nat -A PREROUTING -p udp --dport 5353 -m comment --comment user-pre -j RETURN",
            "-t nat -A OUTPUT -p tcp --dport 25 -m comment --comment user-out -j RETURN",
            "-t nat -N USER_CHAIN",
            "-t nat -A USER_CHAIN -p tcp -j RETURN",
            "-t filter -A INPUT -p udp --dport 9 -j ACCEPT",
        ] {
            let mut args = vec![ipt.as_str(), "-w", "10"];
            args.extend(rule.split(' '));
            t.pod.exec_ok(&args);
        }
    }
    let original = full_state(&t.pod, backend);

    let args = ["--backend", backend.name(), "--exclude-inbound-ports", "22"];
    init_ok(&t.pod, &args);
    let first = full_state(&t.pod, backend);
    assert!(first.contains(":OUTRIDER_INBOUND"), "{first}");
    assert_eq!(
        first.matches("-j OUTRIDER_INBOUND").count(),
        2,
        "one jump per family:\n{first}"
    );
    init_ok(&t.pod, &args);
    let second = full_state(&t.pod, backend);
    assert_eq!(first, second, "a second run changed the rules");

    // A run with other flags replaces our chains' content and still adds no duplicate jump.
    init_ok(
        &t.pod,
        &["--backend", backend.name(), "--exclude-inbound-ports", "23"],
    );
    let changed = full_state(&t.pod, backend);
    assert!(
        changed.contains("--dport 23 ") && !changed.contains("--dport 22 "),
        "{changed}"
    );
    assert_eq!(
        changed.matches("-j OUTRIDER_OUTPUT").count(),
        2,
        "{changed}"
    );

    let stderr = init_ok(&t.pod, &["--backend", backend.name(), "--cleanup"]);
    assert!(stderr.contains("removed"), "{stderr}");
    assert_eq!(
        full_state(&t.pod, backend),
        original,
        "cleanup did not restore the original rules"
    );
    // Cleanup of nothing is success and changes nothing.
    init_ok(&t.pod, &["--backend", backend.name(), "--cleanup"]);
    assert_eq!(full_state(&t.pod, backend), original);
}

#[test]
fn idempotent_and_cleanup_nft() {
    idempotent_cleanup_scenario(Backend::Nft);
}

#[test]
fn idempotent_and_cleanup_legacy() {
    idempotent_cleanup_scenario(Backend::Legacy);
}

#[test]
fn auto_backend_picks_legacy_when_legacy_holds_rules() {
    if !requirements(&support::test_name(), None) {
        return;
    }
    let t = Topology::new(false);
    t.pod.exec_ok(&[
        "iptables-legacy",
        "-w",
        "10",
        "-t",
        "filter",
        "-A",
        "INPUT",
        "-p",
        "udp",
        "--dport",
        "9",
        "-j",
        "ACCEPT",
    ]);
    let stderr = init_ok(&t.pod, &[]);
    assert!(
        stderr
            .contains("using the legacy backend (auto: iptables-legacy-save shows existing rules"),
        "{stderr}"
    );
    let legacy = t.pod.exec_ok(&["iptables-legacy-save", "-t", "nat"]);
    assert!(legacy.contains(":OUTRIDER_OUTPUT"), "{legacy}");
    let nft = t.pod.exec_ok(&["iptables-nft-save"]);
    assert!(!nft.contains("OUTRIDER"), "{nft}");
    init_ok(&t.pod, &["--cleanup"]);
    let legacy = t.pod.exec_ok(&["iptables-legacy-save", "-t", "nat"]);
    assert!(!legacy.contains("OUTRIDER"), "{legacy}");
}

#[test]
fn auto_backend_picks_nft_in_a_clean_namespace() {
    if !requirements(&support::test_name(), None) {
        return;
    }
    let t = Topology::new(false);
    let stderr = init_ok(&t.pod, &["--ipv6", "off"]);
    assert!(
        stderr.contains("using the nft backend (auto: iptables-legacy-save shows no rules, ip6tables-legacy-save shows no rules)"),
        "{stderr}"
    );
    let nft = t.pod.exec_ok(&["iptables-nft-save", "-t", "nat"]);
    assert!(nft.contains(":OUTRIDER_OUTPUT"), "{nft}");
    let nft6 = t.pod.exec_ok(&["ip6tables-nft-save"]);
    assert!(
        !nft6.contains("OUTRIDER"),
        "--ipv6 off must leave IPv6 alone:\n{nft6}"
    );
    let legacy = t.pod.exec_ok(&["iptables-legacy-save"]);
    assert!(!legacy.contains("OUTRIDER"), "{legacy}");
}

#[test]
fn ipv6_auto_needs_a_global_address() {
    if !requirements(&support::test_name(), Some(Backend::Nft)) {
        return;
    }
    // Only loopback: ::1 is listed in /proc/net/if_inet6, but it is no reason to program IPv6.
    let ns = Netns::new();
    let stderr = init_ok(
        &ns,
        &[
            "--backend",
            "nft",
            "--exclude-outbound-cidrs",
            "2001:db8::/32",
        ],
    );
    assert!(stderr.contains("no global IPv6 address"), "{stderr}");
    assert!(
        stderr.contains("IPv6 ranges in the flags are ignored"),
        "{stderr}"
    );
    assert!(ns
        .exec_ok(&["iptables-nft-save", "-t", "nat"])
        .contains(":OUTRIDER_INBOUND"));
    assert!(!ns.exec_ok(&["ip6tables-nft-save"]).contains("OUTRIDER"));
    // IPv6 rules from a forced run are still removed by an auto cleanup.
    init_ok(&ns, &["--backend", "nft", "--ipv6", "on"]);
    assert!(ns
        .exec_ok(&["ip6tables-nft-save"])
        .contains(":OUTRIDER_INBOUND"));
    let stderr = init_ok(&ns, &["--backend", "nft", "--cleanup"]);
    assert!(
        stderr.contains("IPv6: removed 12 outrider rules and 4 chains"),
        "{stderr}"
    );
    assert!(!ns.exec_ok(&["ip6tables-nft-save"]).contains("OUTRIDER"));
    assert!(!ns.exec_ok(&["iptables-nft-save"]).contains("OUTRIDER"));
}

#[test]
fn missing_iptables_binary_is_named_and_nothing_is_applied() {
    if !requirements(&support::test_name(), Some(Backend::Nft)) {
        return;
    }
    let t = Topology::new(false);
    let empty = TempDir::new();
    let mut cmd = t.pod.command(OUTRIDER);
    cmd.args(["init", "--backend", "nft"])
        .env("PATH", empty.path());
    let out = support::run(&mut cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("iptables-nft-restore not found in PATH; install the `iptables` package"),
        "{stderr}"
    );
    let nat = t.pod.exec_ok(&["iptables-nft-save"]);
    assert!(!nat.contains("OUTRIDER"), "{nat}");
}

/// A PATH holding the real nft tools, except `broken`, which prints `stderr` and fails.
fn path_with_broken_tool(broken: &str, stderr: &str) -> TempDir {
    let dir = TempDir::new();
    for tool in [
        "iptables-nft-restore",
        "iptables-nft-save",
        "ip6tables-nft-restore",
        "ip6tables-nft-save",
    ] {
        let target = dir.path().join(tool);
        if tool == broken {
            // Builtins only (PATH has nothing else); stdin is drained like the real tool does.
            let quoted = stderr.replace('\'', "'\\''");
            let script = format!(
                "#!/bin/sh\nwhile read -r _; do :; done\nprintf '%s\\n' '{quoted}' >&2\nexit 2\n"
            );
            // Written by a child process: if this (multi-threaded) process held the file open for
            // writing while another thread forks, exec'ing it could fail with ETXTBSY.
            support::run_ok(Command::new("sh").args([
                "-c",
                "printf '%s' \"$2\" > \"$1\" && chmod 755 \"$1\"",
                "sh",
                &target.display().to_string(),
                &script,
            ]));
        } else {
            let real = support::which(tool)
                .unwrap_or_else(|| panic!("{tool} not in PATH (checked by requirements)"));
            std::os::unix::fs::symlink(&real, &target)
                .unwrap_or_else(|e| panic!("symlink {}: {e}", target.display()));
        }
    }
    dir
}

/// Runs `outrider init --backend nft ARGS` in the pod with a PATH where `broken` fails with
/// `stderr`; asserts exit 1, every `needles` in the message, and an unchanged ruleset.
fn init_with_broken_tool(broken: &str, stderr: &str, args: &[&str], needles: &[&str]) {
    let t = Topology::new(false);
    // Make both nat tables exist first, so "unchanged" can be compared exactly.
    for ipt in ["iptables-nft", "ip6tables-nft"] {
        t.pod.exec_ok(&[
            ipt, "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "RETURN",
        ]);
    }
    let before = full_state(&t.pod, Backend::Nft);
    let dir = path_with_broken_tool(broken, stderr);
    let mut cmd = t.pod.command(OUTRIDER);
    cmd.args(["init", "--backend", "nft"])
        .args(args)
        .env("PATH", dir.path());
    let out = support::run(&mut cmd);
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for needle in needles {
        assert!(text.contains(needle), "expected {needle:?} in:\n{text}");
    }
    assert_eq!(
        full_state(&t.pod, Backend::Nft),
        before,
        "rules were left behind:\n{text}"
    );
}

/// IPv4 is applied first; when IPv6 then fails (a kernel without the REDIRECT target for IPv6),
/// the IPv4 rules must be rolled back.
#[test]
fn ipv6_failure_rolls_back_ipv4() {
    if !requirements(&support::test_name(), Some(Backend::Nft)) {
        return;
    }
    init_with_broken_tool(
        "ip6tables-nft-restore",
        "ip6tables-restore v1.8.9 (nf_tables): Couldn't load target `REDIRECT':No such file or directory",
        &["--ipv6", "on"],
        &[
            "IPv4: applied and verified",
            "IPv6: the `REDIRECT` target is unavailable: load the xt_REDIRECT",
            "rolled back the IPv4 rules",
        ],
    );
}

#[test]
fn missing_kernel_pieces_are_named() {
    if !requirements(&support::test_name(), Some(Backend::Nft)) {
        return;
    }
    init_with_broken_tool(
        "iptables-nft-restore",
        "iptables-restore v1.8.9 (nf_tables): can't initialize iptables table `nat': Table does not exist (do you need to insmod?)",
        &["--ipv6", "off"],
        &["IPv4: the kernel has no IPv4 `nat` table for iptables-nft-restore: load the iptable_nat"],
    );
    init_with_broken_tool(
        "iptables-nft-restore",
        "iptables-restore v1.8.9 (nf_tables): Couldn't load match `owner':No such file or directory",
        &["--ipv6", "on"],
        &["IPv4: the `owner` match is unavailable: load the xt_owner kernel module"],
    );
    init_with_broken_tool(
        "ip6tables-nft-save",
        "ip6tables-save v1.8.9 (nf_tables): can't initialize ip6tables table `nat'",
        &["--ipv6", "on"],
        &[
            "IPv6: the kernel has no IPv6 `nat` table",
            "ip6table_nat",
            "rolled back the IPv4 rules",
        ],
    );
}

/// Runs the binary directly (no namespace) with an empty PATH: it cannot reach any iptables.
fn outrider_no_iptables(args: &[&str], env: &[(&str, &str)]) -> Output {
    let empty = TempDir::new();
    let mut cmd = Command::new(OUTRIDER);
    cmd.arg("init")
        .args(args)
        .env("PATH", empty.path())
        .env_remove("OUTRIDER_DRY_RUN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    support::run(&mut cmd)
}

#[test]
fn bad_flags_exit_2_with_the_flag_named() {
    for (args, env, needle) in [
        (&["--inbound-port", "0"][..], &[][..], "'--inbound-port <PORT>'"),
        (&["--inbound-port", "70000"], &[], "port 70000 is out of range"),
        (&["--outbound-port", "abc"], &[], "`abc` is not a port number"),
        (&["--exclude-inbound-ports", "22,0"], &[], "--exclude-inbound-ports"),
        (&["--exclude-outbound-ports", "99999"], &[], "--exclude-outbound-ports"),
        (&["--exclude-outbound-cidrs", "10.0.0.0/33"], &[], "prefix length /33 is too long"),
        (&["--include-outbound-cidrs", "1.2.3"], &[], "`1.2.3` is not an IPv4 or IPv6 address"),
        (&["--exclude-outbound-cidrs", "10.0.0.1/8"], &[], "did you mean 10.0.0.0/8"),
        (&["--proxy-uid", "x"], &[], "--proxy-uid"),
        (&["--ipv6", "sometimes"], &[], "--ipv6"),
        (&["--backend", "nftables"], &[], "--backend"),
        (
            &["--include-outbound-cidrs", "10.0.0.0/8", "--exclude-outbound-cidrs", "10.1.0.0/16"],
            &[],
            "invalid --include-outbound-cidrs: 10.0.0.0/8 overlaps --exclude-outbound-cidrs 10.1.0.0/16",
        ),
        (
            &["--inbound-port", "15001"],
            &[],
            "invalid --outbound-port: 15001 is also the --inbound-port",
        ),
        (&["--outbound-port", "15020"], &[], "invalid --outbound-port: 15020 is also the --admin-port"),
        (
            &["--include-inbound-ports", "22", "--exclude-inbound-ports", "22"],
            &[],
            "invalid --include-inbound-ports: 22 is also in --exclude-inbound-ports",
        ),
        (&["--include-outbound-ports", "0"], &[], "--include-outbound-ports"),
        (
            &["--ipv6", "off", "--exclude-outbound-cidrs", "2001:db8::/32"],
            &[],
            "2001:db8::/32 is an IPv6 range but --ipv6 is off",
        ),
        (&[], &[("OUTRIDER_INBOUND_PORT", "0")], "--inbound-port"),
        (&[], &[("OUTRIDER_EXCLUDE_OUTBOUND_CIDRS", "10.0.0.0/8,nope")], "`nope` is not an IPv4"),
    ] {
        for dry_run in [true, false] {
            let mut argv = args.to_vec();
            if dry_run {
                argv.push("--dry-run");
            }
            let out = outrider_no_iptables(&argv, env);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{argv:?} {env:?}: {stderr}");
            assert!(stderr.contains(needle), "{argv:?} {env:?}: expected {needle:?} in:\n{stderr}");
            assert!(out.stdout.is_empty(), "{argv:?}: printed rules despite the error");
        }
    }
    // All cross-field problems at once.
    let out = outrider_no_iptables(
        &[
            "--dry-run",
            "--inbound-port",
            "15001",
            "--include-outbound-cidrs",
            "0.0.0.0/0",
            "--exclude-outbound-cidrs",
            "10.0.0.0/8",
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("invalid --outbound-port")
            && stderr.contains("invalid --include-outbound-cidrs"),
        "{stderr}"
    );
}

fn golden(name: &str) -> String {
    let path = format!(
        "{}/iptables-init/testdata/{name}.rules",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn dry_run_needs_no_iptables_and_prints_the_golden_rules() {
    for (args, name) in [
        (&["--dry-run"][..], "defaults"),
        (&["--dry-run", "--ipv6", "off"], "ipv6_off"),
        (&["--dry-run", "--cleanup"], "cleanup"),
    ] {
        let out = outrider_no_iptables(args, &[]);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            golden(name),
            "{args:?}"
        );
    }
}

#[test]
fn env_vars_are_read_and_flags_win() {
    let text = |args: &[&str], env: &[(&str, &str)]| {
        let out = outrider_no_iptables(args, env);
        assert!(
            out.status.success(),
            "{args:?} {env:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let env = [
        ("OUTRIDER_PROXY_UID", "4242"),
        ("OUTRIDER_EXCLUDE_INBOUND_PORTS", "22,23"),
        ("OUTRIDER_IPV6", "off"),
    ];
    let from_env = text(&["--dry-run"], &env);
    assert!(from_env.contains("--uid-owner 4242 "), "{from_env}");
    assert!(
        from_env.contains("--dport 22 ") && from_env.contains("--dport 23 "),
        "{from_env}"
    );
    assert!(!from_env.contains("IPv6"), "{from_env}");
    let flag_wins = text(&["--dry-run", "--proxy-uid", "7", "--ipv6", "on"], &env);
    assert!(
        flag_wins.contains("--uid-owner 7 ") && !flag_wins.contains("4242"),
        "{flag_wins}"
    );
    assert!(flag_wins.contains("IPv6"), "{flag_wins}");
    // OUTRIDER_DRY_RUN=true alone makes it a dry run (with an empty PATH a real run would fail).
    let dry = text(&[], &[("OUTRIDER_DRY_RUN", "true")]);
    assert_eq!(dry, golden("defaults"));
}
