//! Shared helpers: namespaces, child processes, skip policy.
//!
//! - Skip policy: [`require_root`] and [`require_bin`] return `false` (the test returns early) after
//!   printing a loud `SKIPPED <test>: needs ...` line; under `CI=true` they panic instead, so CI
//!   never passes by skipping.
//! - [`Netns`]: a network namespace made by the test (`outrider-<pid>-<n>`, unique per process and
//!   call, so tests run in parallel threads), deleted on drop. [`veth`] links two of them.
//! - [`ChildGuard`]: a child process killed (by pid) and reaped on drop, whose stdout lines can be
//!   awaited with a timeout (the readiness signal: no sleeps as synchronization).
//! - [`run`]: a command with a bounded run time. Every wait here has a timeout.
//! - Ports for child processes: [`spawn_listening`] starts a child on a loopback port and waits
//!   until the child says it is listening, picking another port when another process took the one
//!   it was given (the time-of-check/time-of-use gap of [`free_port`]); a child that can report
//!   its own bound address (the proxy logs it) is better given port 0.
//! - Metrics: [`metric`] and [`sample`] read one family from Prometheus text.
#![allow(dead_code)] // each test module uses a different subset

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a helper command (`ip`, `iptables-save`, a client) may run before the test fails.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A number unique within this test process.
pub fn unique() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// Whether we run under CI (`CI=true`), where a skipped test is a failure.
pub fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The running test's name (libtest names each test's thread after the test).
pub fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_owned()
}

fn skip(test: &str, why: &str) -> bool {
    assert!(!is_ci(), "{test}: {why}, and CI=true forbids skipping");
    // Straight to the process's stderr: libtest captures `eprintln!` of passing tests, and a
    // skip must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "\n**********\nSKIPPED {test}: {why}\n**********"
    );
    false
}

/// The effective uid of this process (from `/proc/self/status`).
pub fn euid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// `true` when running as root; else skips `test` (panics under CI).
pub fn require_root(test: &str) -> bool {
    euid() == Some(0) || skip(test, "needs root")
}

/// `true` when `bin` is in PATH; else skips the running test (panics under CI).
pub fn require_bin(bin: &str) -> bool {
    which(bin).is_some() || skip(&test_name(), &format!("needs `{bin}` in PATH"))
}

/// Finds an executable in PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// A child process that is killed (SIGKILL, by pid) and reaped when dropped.
pub struct ChildGuard {
    child: Child,
    label: String,
    lines: Option<mpsc::Receiver<String>>,
    stderr: Arc<Mutex<String>>,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout and stderr captured; stdout is readable line by line with
    /// [`ChildGuard::expect_line`].
    pub fn spawn(cmd: &mut Command, label: impl Into<String>) -> ChildGuard {
        let label = label.into();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{label}: cannot spawn {cmd:?}: {e}"));
        let lines = child.stdout.take().map(|out| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut err) = child.stderr.take() {
            let sink = Arc::clone(&stderr);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = err.read(&mut buf) {
                    if let Ok(mut s) = sink.lock() {
                        s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            });
        }
        ChildGuard {
            child,
            label,
            lines,
            stderr,
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the child wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The next stdout line, waiting at most `timeout`; panics (with the child's stderr) if none.
    pub fn expect_line(&mut self, timeout: Duration) -> String {
        let got = self.lines.as_ref().map(|rx| rx.recv_timeout(timeout));
        match got {
            Some(Ok(line)) => line,
            _ => panic!(
                "{}: no stdout line within {timeout:?} (exited: {:?}); stderr:\n{}",
                self.label,
                self.child.try_wait().ok().flatten(),
                self.stderr()
            ),
        }
    }

    /// Waits for a stdout line containing `needle`, at most `timeout` in all.
    pub fn expect_line_containing(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.expect_line(left);
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// Waits until the child's stderr contains `needle` (its readiness line), at most `timeout`.
    /// `Err` carries the child's stderr if it exited first or the time ran out.
    pub fn wait_stderr(&mut self, needle: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stderr().contains(needle) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // The stderr reader may still be behind the exit: one bounded last look.
                let end = Instant::now() + Duration::from_secs(2);
                while Arc::strong_count(&self.stderr) > 1 && Instant::now() < end {
                    std::thread::sleep(Duration::from_millis(2));
                }
                let stderr = self.stderr();
                if stderr.contains(needle) {
                    return Ok(());
                }
                return Err(format!(
                    "exited ({status}) before {needle:?}; stderr:\n{stderr}"
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no {needle:?} on stderr within {timeout:?}; stderr:\n{}",
                    self.stderr()
                ));
            }
            // Polling a pipe that another thread fills; the deadline bounds it.
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Like [`ChildGuard::wait_stderr`], panicking with the child's stderr on failure.
    pub fn expect_stderr(&mut self, needle: &str, timeout: Duration) {
        if let Err(e) = self.wait_stderr(needle, timeout) {
            panic!("{}: {e}", self.label);
        }
    }

    /// Waits at most `timeout` for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            // Polling a child's exit: std has no wait-with-timeout; the deadline bounds it.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Runs `cmd` to completion with captured output; panics if it runs longer than `timeout`
/// (after killing it).
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let label = format!("{cmd:?}");
    let mut guard = ChildGuard::spawn(cmd, label.clone());
    let Some(status) = guard.wait_timeout(timeout) else {
        panic!(
            "{label} did not finish within {timeout:?}; stderr:\n{}",
            guard.stderr()
        );
    };
    let mut stdout = Vec::new();
    if let Some(rx) = guard.lines.take() {
        // The writer closed its end when the process exited; drain with a bound.
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
            stdout.extend_from_slice(line.as_bytes());
            stdout.push(b'\n');
        }
    }
    // Give the stderr reader a bounded moment to reach EOF.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Arc::strong_count(&guard.stderr) > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    Output {
        status,
        stdout,
        stderr: guard.stderr().into_bytes(),
    }
}

/// Runs `cmd` with [`COMMAND_TIMEOUT`].
pub fn run(cmd: &mut Command) -> Output {
    run_with_timeout(cmd, COMMAND_TIMEOUT)
}

/// Runs `cmd` and panics unless it exits 0; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The system python3 (`/usr/bin/python3` first: a pyenv shim under /root cannot run as uid 1337).
pub fn python() -> String {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3".to_owned()
    } else {
        which("python3").map_or_else(|| "python3".to_owned(), |p| p.display().to_string())
    }
}

/// The `ip` binary (iproute2).
fn ip() -> PathBuf {
    which("ip").unwrap_or_else(|| PathBuf::from("/usr/sbin/ip"))
}

fn split_program<'a>(args: &'a [&'a str]) -> (&'a str, &'a [&'a str]) {
    match args.split_first() {
        Some((program, rest)) => (program, rest),
        None => panic!("a command needs a program"),
    }
}

/// A network namespace owned by the test: created with loopback up, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `outrider-<pid>-<n>` and brings its loopback up.
    pub fn new() -> Netns {
        let ns = Netns::bare();
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Creates `outrider-<pid>-<n>` as a container runtime does: loopback still down (the CNI
    /// `loopback` plugin brings it up).
    pub fn bare() -> Netns {
        let name = format!("outrider-{}-{}", std::process::id(), unique());
        run_ok(Command::new(ip()).args(["netns", "add", &name]));
        let ns = Netns { name };
        // Interfaces made later skip IPv6 duplicate address detection, link-local included, so
        // IPv6 neighbours answer at once instead of after a second of "tentative".
        ns.exec_ok(&["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"]);
        ns
    }

    /// The namespace's name (for `ip netns exec NAME` / `ip -n NAME`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace (`ip netns exec NAME program`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(ip());
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `args` inside the namespace with [`COMMAND_TIMEOUT`].
    pub fn exec(&self, args: &[&str]) -> Output {
        let (program, rest) = split_program(args);
        run(self.command(program).args(rest))
    }

    /// Runs `args` inside the namespace, panics unless it exits 0, returns stdout.
    pub fn exec_ok(&self, args: &[&str]) -> String {
        let (program, rest) = split_program(args);
        run_ok(self.command(program).args(rest))
    }

    /// Starts `args` inside the namespace as a guarded background process.
    pub fn spawn(&self, args: &[&str]) -> ChildGuard {
        let (program, rest) = split_program(args);
        ChildGuard::spawn(
            self.command(program).args(rest),
            format!("[{}] {}", self.name, args.join(" ")),
        )
    }
}

impl Default for Netns {
    fn default() -> Self {
        Netns::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = run(Command::new(ip()).args(["netns", "del", &self.name]));
        if !out.status.success() {
            eprintln!(
                "warning: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// A veth pair between two namespaces: `a_if` lives in the first, `b_if` in the second. Deleted
/// with the namespaces.
#[derive(Debug, Clone)]
pub struct Veth {
    /// Interface name in the first namespace.
    pub a_if: String,
    /// Interface name in the second namespace.
    pub b_if: String,
}

/// Links `a` and `b` with a veth pair, assigns the addresses (`198.18.0.1/24`, `2001:db8::1/64`;
/// IPv6 without duplicate address detection, so usable at once) and brings both ends up.
pub fn veth(a: &Netns, a_addrs: &[&str], b: &Netns, b_addrs: &[&str]) -> Veth {
    let n = unique();
    let v = Veth {
        a_if: format!("vor{n}a"),
        b_if: format!("vor{n}b"),
    };
    run_ok(Command::new(ip()).args([
        "-n",
        a.name(),
        "link",
        "add",
        &v.a_if,
        "type",
        "veth",
        "peer",
        "name",
        &v.b_if,
        "netns",
        b.name(),
    ]));
    for (ns, ifname, addrs) in [(a, &v.a_if, a_addrs), (b, &v.b_if, b_addrs)] {
        for addr in addrs {
            let mut args = vec!["-n", ns.name(), "addr", "add", addr, "dev", ifname];
            if addr.contains(':') {
                args.push("nodad");
            }
            run_ok(Command::new(ip()).args(&args));
        }
        run_ok(Command::new(ip()).args(["-n", ns.name(), "link", "set", ifname, "up"]));
    }
    v
}

/// A temporary directory removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `$TMPDIR/outrider-e2e-<pid>-<n>`.
    pub fn new() -> TempDir {
        let path =
            std::env::temp_dir().join(format!("outrider-e2e-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A loopback port that was free a moment ago. Anything may take it before it is used: give it
/// to a child through [`spawn_listening`], which retries, or use it only where a collision fails
/// loudly.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

/// Whether a child's stderr says it could not bind its listening address.
fn is_bind_failure(stderr: &str) -> bool {
    stderr.contains("cannot bind") || stderr.contains("Address already in use")
}

/// Starts a child that listens on a loopback port, and returns once it says so (`ready` on its
/// stderr, written after its bind). `make` builds the command for a port.
///
/// With `port` `None`, each try takes a [`free_port`] and another one if the child could not bind
/// it (some other process took it in between). With `Some(port)` (a port others already point at,
/// such as a control plane that restarts) it keeps to that port, retrying while it is taken, for
/// at most 10 s.
pub fn spawn_listening(
    label: &str,
    port: Option<u16>,
    mut make: impl FnMut(u16) -> Command,
    ready: &str,
) -> (u16, ChildGuard) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut failures = Vec::new();
    for _ in 0..20 {
        let p = port.unwrap_or_else(free_port);
        let mut child = ChildGuard::spawn(&mut make(p), format!("{label} on port {p}"));
        match child.wait_stderr(ready, Duration::from_secs(10)) {
            Ok(()) => return (p, child),
            Err(e) if is_bind_failure(&child.stderr()) && Instant::now() < deadline => {
                failures.push(e);
                if port.is_some() {
                    // Waiting for the port's holder to let go; the deadline bounds it.
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            Err(e) => panic!("{label} (port {p}): {e}\nearlier tries: {failures:?}"),
        }
    }
    panic!("{label}: no port could be bound: {failures:?}");
}

/// A loopback port kept for a child that starts later (one whose address others are already
/// given). Until [`PortHold::release`], connections to it are accepted and closed at once, which
/// a retrying client takes like a refusal, and no other process can bind it.
pub struct PortHold {
    port: u16,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PortHold {
    /// Holds a free loopback port.
    pub fn new() -> PortHold {
        PortHold::bind(0, Duration::ZERO)
    }

    /// Holds `port`, retrying for at most `within` while its last owner lets go.
    pub fn at(port: u16, within: Duration) -> PortHold {
        PortHold::bind(port, within)
    }

    fn bind(port: u16, within: Duration) -> PortHold {
        let deadline = Instant::now() + within;
        let listener = loop {
            match std::net::TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => break l,
                Err(_) if Instant::now() < deadline => {
                    // Waiting for the port's holder to let go; the deadline bounds it.
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot hold 127.0.0.1:{port}: {e}"),
            }
        };
        let port = listener.local_addr().map(|a| a.port()).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let halt = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => drop(conn),
                    // Nothing to accept: look again soon (the stop flag bounds the loop).
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        PortHold {
            port,
            stop,
            thread: Some(thread),
        }
    }

    /// The held port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes the listener and returns the port, for a child to bind at once.
    pub fn release(mut self) -> u16 {
        self.stop_thread();
        self.port
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Default for PortHold {
    fn default() -> Self {
        PortHold::new()
    }
}

impl Drop for PortHold {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// The addresses an `outrider proxy` child bound, read from its JSON log (`OUTRIDER_LOG_FORMAT=json`,
/// level info): give it port 0 and read the real ports here, so no port is guessed.
#[derive(Debug, Clone)]
pub struct ProxyAddrs {
    /// The admin server.
    pub admin: std::net::SocketAddr,
    /// The `--forward` listeners, in flag order.
    pub forwards: Vec<std::net::SocketAddr>,
}

/// Waits (at most `timeout`) until `proxy` logged "proxy started", then returns the addresses it
/// logged. The proxy must log JSON at level info.
pub fn proxy_addrs(proxy: &mut ChildGuard, timeout: Duration) -> ProxyAddrs {
    proxy.expect_stderr("\"proxy started\"", timeout);
    let mut admin = None;
    let mut forwards = Vec::new();
    for line in proxy.stderr().lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let fields = &v["fields"];
        let addr = |key: &str| fields[key].as_str().and_then(|a| a.parse().ok());
        match fields["message"].as_str() {
            Some("listening") if fields["direction"] == "forward" => forwards.extend(addr("addr")),
            Some("proxy started") => admin = addr("admin"),
            _ => {}
        }
    }
    let admin = admin.unwrap_or_else(|| panic!("no admin address logged:\n{}", proxy.stderr()));
    ProxyAddrs { admin, forwards }
}

/// One sample line of the Prometheus text format.
struct Sample<'a> {
    family: &'a str,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Parses one sample line; `None` for comments, blank and malformed lines.
fn parse_sample(line: &str) -> Option<Sample<'_>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        // k="v",k2="v2"} value: values may hold escaped quotes, commas and braces.
        let mut chars = inner.char_indices().peekable();
        let mut key = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '}' => {
                    end = Some(i + 1);
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    if chars.next().map(|(_, c)| c) != Some('"') {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()? {
                            (_, '\\') => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            (_, '"') => break,
                            (_, other) => value.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                other => key.push(other),
            }
        }
        rest = &inner[end?..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        family: name,
        labels,
        value,
    })
}

/// The sum of the samples of `family` whose labels include every `(name, value)` of `labels`, in
/// the Prometheus text `metrics`; `None` when no sample matches.
pub fn metric(metrics: &str, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for s in metrics.lines().filter_map(parse_sample) {
        let matches = s.family == family
            && labels
                .iter()
                .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v));
        if matches {
            *found.get_or_insert(0.0) += s.value;
        }
    }
    found
}

/// Reads a response head (up to the empty line), lower-cased; each byte within 5 s.
pub async fn read_head(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut byte))
            .await
            .unwrap()
            .unwrap();
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).to_lowercase()
}

/// Sends `msg` on `s` and expects it echoed back within 5 s.
pub async fn echoes(s: &mut tokio::net::TcpStream, msg: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, msg);
}

/// Like [`metric`], panicking (with the text) when no sample matches: a missing or misspelled
/// family fails the test instead of reading as zero.
pub fn sample(metrics: &str, family: &str, labels: &[(&str, &str)]) -> f64 {
    metric(metrics, family, labels)
        .unwrap_or_else(|| panic!("no sample of {family} with {labels:?} in:\n{metrics}"))
}

#[test]
fn metric_reads_families_by_exact_name_and_labels() {
    let text = "# HELP a_total x\n# TYPE a_total counter\na_total{direction=\"inbound\",reason=\"x,y\"} 2\na_total{direction=\"outbound\",reason=\"q\\\"\"} 3\na_total_more 7\nb 1.5\n";
    assert_eq!(metric(text, "a_total", &[]), Some(5.0));
    assert_eq!(
        metric(text, "a_total", &[("direction", "inbound")]),
        Some(2.0)
    );
    assert_eq!(metric(text, "a_total", &[("reason", "x,y")]), Some(2.0));
    assert_eq!(metric(text, "a_total", &[("reason", "q\"")]), Some(3.0));
    assert_eq!(metric(text, "a_total", &[("direction", "sideways")]), None);
    assert_eq!(metric(text, "a_tot", &[]), None);
    assert_eq!(metric(text, "b", &[]), Some(1.5));
}

#[test]
fn spawn_listening_moves_to_another_port_when_its_port_is_taken() {
    // The first port offered is held by someone else: the child fails to bind it, and the next
    // try gets a free one.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let mut tries = 0;
    let (port, mut app) = spawn_listening(
        "demo-app",
        None,
        |port| {
            tries += 1;
            let port = if tries == 1 { taken_port } else { port };
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_outrider"));
            cmd.args(["demo-app", "--listen", &format!("127.0.0.1:{port}")]);
            cmd
        },
        "listening on",
    );
    assert_eq!(tries, 2);
    assert_ne!(port, taken_port);
    assert!(app.wait_timeout(Duration::ZERO).is_none(), "still running");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
}
