//! `outrider inject`, `outrider resources` and `outrider wait` as a user runs them: the real
//! binary, files and stdin, exit codes, stdout and stderr. Waits are against real listeners on
//! 127.0.0.1 port 0, refused ports and `.invalid` names (RFC 2606: never resolves, never leaves
//! the machine).

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::support::{run, ChildGuard, PortHold, TempDir};

const OUTRIDER: &str = env!("CARGO_BIN_EXE_outrider");

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn outrider(args: &[&str]) -> Output {
    run(Command::new(OUTRIDER).args(args))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `outrider args` with `input` on stdin.
pub(crate) fn outrider_stdin(args: &[&str], input: &str) -> Output {
    let mut child = Command::new(OUTRIDER)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    out
}

#[test]
fn inject_reads_stdin_and_writes_the_golden_seed() {
    let seed = std::fs::read_to_string(repo("deploy/examples/payments-api.yaml")).unwrap();
    let out = outrider_stdin(&["inject", "-f", "-"], &seed);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let golden =
        std::fs::read_to_string(repo("deploy/examples/payments-api.injected.yaml")).unwrap();
    assert_eq!(text(&out.stdout), golden);
    // And back.
    let back = outrider_stdin(&["inject", "--uninject"], &golden);
    assert!(back.status.success(), "{}", text(&back.stderr));
    assert!(text(&back.stdout)
        .contains("          httpGet:\n            path: /healthz\n            port: http\n"));
    let back = text(&back.stdout);
    assert!(
        !back.contains("outrider.io/") && !back.contains("outrider-proxy"),
        "{back}"
    );
}

#[test]
fn inject_warns_about_skipped_workloads_on_stderr() {
    let out = outrider(&[
        "inject",
        "-f",
        repo("kubernetes/tests/golden/list.yaml").to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("warning: document 2 (Deployment legacy-batch): outrider.io/inject: disabled"),
        "{err}"
    );
    assert!(
        err.contains("warning: document 3 (Pod node-exporter): hostNetwork: true"),
        "{err}"
    );
    assert!(!text(&out.stdout).contains("warning"));
}

#[test]
fn malformed_input_exits_2_naming_document_and_field_with_nothing_on_stdout() {
    let good = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  containers: [{name: a, image: a}]\n";
    for (bad, needle) in [
        (
            format!("{good}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: b}}\nspec:\n  containers: [{{name: b, image: b, ports: [{{containerPort: x}}]}}]\n"),
            "document 2: spec.containers[0].ports[0].containerPort: ",
        ),
        (
            format!("{good}---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: c\n  annotations: {{outrider.io/proxy-memory-request: lots}}\nspec:\n  containers: [{{name: c, image: c}}]\n"),
            "document 2: metadata.annotations[\"outrider.io/proxy-memory-request\"]: `lots` is not a quantity",
        ),
        (format!("{good}---\nkind: [\n"), "document 2: not YAML"),
        (
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  spec: {containers: []}\n".to_owned(),
            "document 1, items[0]: metadata.name: missing",
        ),
    ] {
        let out = outrider_stdin(&["inject"], &bad);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        assert!(out.stdout.is_empty(), "stdout: {}", text(&out.stdout));
        assert!(text(&out.stderr).contains(needle), "{needle}: {}", text(&out.stderr));
    }
    let missing = outrider(&["inject", "-f", "/nonexistent/app.yaml"]);
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(outrider(&["inject", "--bogus"]).status.code(), Some(2));
}

#[test]
fn resources_reports_the_seed_with_and_without_the_proxy() {
    let seed = repo("deploy/examples/payments-api.yaml");
    let out = outrider(&["resources", "-f", seed.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    assert!(
        report.starts_with("Deployment production/payments-api\n"),
        "{report}"
    );
    assert!(
        report.contains("  init max:    cpu 200m, memory 256Mi\n"),
        "{report}"
    );
    assert!(
        report.contains("  app sum:     cpu 600m, memory 640Mi"),
        "{report}"
    );
    assert!(
        report.contains("  pod request: cpu 600m, memory 640Mi\n"),
        "{report}"
    );
    assert!(
        report.contains("  warning: secrets-refresh: no cpu or memory request"),
        "{report}"
    );
    let out = outrider(&["resources", "-f", seed.to_str().unwrap(), "--with-proxy"]);
    let report = text(&out.stdout);
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("  outrider-proxy ") && l.contains(" sidecar ")),
        "{report}"
    );
    assert!(
        report.contains("  pod request: cpu 700m, memory 768Mi\n"),
        "{report}"
    );
    assert_eq!(outrider(&["resources"]).status.code(), Some(2));
}

#[test]
fn the_control_plane_manifest_carries_a_valid_mesh_config() {
    // The ConfigMap's mesh.yaml, cut out of deploy/control-plane.yaml and checked by the
    // control plane's own --check.
    let manifest = std::fs::read_to_string(repo("deploy/control-plane.yaml")).unwrap();
    let start = manifest.find("  mesh.yaml: |\n").unwrap() + "  mesh.yaml: |\n".len();
    let end = start + manifest[start..].find("\n---").unwrap();
    let mesh: String = manifest[start..end]
        .lines()
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    let dir = TempDir::new();
    let file = dir.path().join("mesh.yaml");
    std::fs::write(&file, mesh).unwrap();
    let out = outrider(&["control", "--check", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A one-request-per-connection HTTP server on 127.0.0.1:0 answering `status`, in a thread that
/// ends with the test process.
fn http_server(status: u16) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 2048];
            let _ = conn.read(&mut buf);
            let _ = write!(
                conn,
                "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
    });
    port
}

#[test]
fn wait_succeeds_when_every_target_answers() {
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_port = tcp.local_addr().unwrap().port();
    let http_port = http_server(204);
    let out = outrider(&[
        "wait",
        "--tcp",
        &format!("127.0.0.1:{tcp_port}"),
        "--tcp",
        &format!("localhost:{tcp_port}"),
        "--http",
        &format!("http://127.0.0.1:{http_port}/healthz"),
        "--timeout",
        "20s",
    ]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("tcp 127.0.0.1:{tcp_port}: reachable")),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "http http://127.0.0.1:{http_port}/healthz: reachable"
        )),
        "{err}"
    );
}

#[test]
fn wait_retries_until_a_late_listener_appears() {
    let port = free_port();
    let mut wait = ChildGuard::spawn(
        Command::new(OUTRIDER).args([
            "wait",
            "--tcp",
            &format!("127.0.0.1:{port}"),
            "--timeout",
            "30s",
        ]),
        "outrider wait",
    );
    // The first attempt was refused (an event on stderr), then the listener comes up.
    wait.expect_stderr(
        "attempt 1 failed: connection refused",
        Duration::from_secs(10),
    );
    let _listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let status = wait
        .wait_timeout(Duration::from_secs(20))
        .expect("wait did not finish");
    assert!(status.success(), "{}", wait.stderr());
    assert!(
        wait.stderr().contains("reachable at 127.0.0.1:"),
        "{}",
        wait.stderr()
    );
}

#[test]
fn wait_gives_up_naming_each_unreachable_target_and_why() {
    let refused = free_port();
    let http_port = http_server(503);
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let ok = tcp.local_addr().unwrap().port();
    let out = outrider(&[
        "wait",
        "--tcp",
        &format!("127.0.0.1:{refused}"),
        "--tcp",
        "postgres-service.invalid:5432",
        "--tcp",
        &format!("127.0.0.1:{ok}"),
        "--http",
        &format!("http://127.0.0.1:{http_port}/ready"),
        "--timeout",
        "2s",
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    // Progress lines per attempt say what failed...
    assert!(err.contains("tcp postgres-service.invalid:5432: attempt 1 failed: DNS: `postgres-service.invalid` does not resolve"), "{err}");
    // ...and the summary lists exactly the unreachable targets with their reason.
    let summary = &err[err.find("gave up after 2s; not reachable:").expect(&err)..];
    assert!(
        summary.contains(&format!(
            "  tcp 127.0.0.1:{refused}: connection refused by 127.0.0.1:{refused}"
        )),
        "{summary}"
    );
    assert!(
        summary.contains("  tcp postgres-service.invalid:5432: DNS: "),
        "{summary}"
    );
    assert!(
        summary.contains(&format!(
            "  http http://127.0.0.1:{http_port}/ready: HTTP status 503 (2xx expected)"
        )),
        "{summary}"
    );
    assert!(!summary.contains(&format!("127.0.0.1:{ok}")), "{summary}");
}

#[test]
fn wait_bad_usage_exits_2() {
    for args in [
        &["wait"][..],
        &["wait", "--tcp", "postgres-service"],
        &["wait", "--tcp", "postgres-service:0"],
        &["wait", "--http", "https://api.invalid/"],
        &["wait", "--tcp", "a:1", "--timeout", "soon"],
    ] {
        let out = outrider(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

/// The injected containers of the first workload of a golden file: (`outrider-init`'s args,
/// `outrider-proxy`'s plain env values).
fn injected_containers(path: &str) -> (Vec<String>, Vec<(String, String)>) {
    let text = std::fs::read_to_string(repo(path)).unwrap();
    let docs = outrider_kubernetes::manifest::parse(&text).unwrap();
    let kind = outrider_kubernetes::manifest::WorkloadKind::of(&docs[0]).unwrap();
    let at = outrider_kubernetes::manifest::Location::new("document 1");
    let w = outrider_kubernetes::manifest::Workload::check(kind, &docs[0], &at).unwrap();
    let inits = w.pod.init_containers.unwrap();
    let init = inits.iter().find(|c| c.name == "outrider-init").unwrap();
    let proxy = inits.iter().find(|c| c.name == "outrider-proxy").unwrap();
    let env = proxy
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect();
    (init.args.clone().unwrap(), env)
}

#[test]
fn outrider_init_accepts_the_injected_arguments() {
    let (args, _) = injected_containers("kubernetes/tests/golden/deployment.injected.yaml");
    assert_eq!(args[0], "init");
    // A dry run parses every flag as `outrider init` in the pod would, and prints the rules.
    let out = run(Command::new(OUTRIDER).args(&args).arg("--dry-run"));
    let rules = text(&out.stdout);
    assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    for excluded in ["9090", "5432", "6379", "10.96.0.0/12"] {
        assert!(rules.contains(excluded), "{excluded} not in:\n{rules}");
    }
}

#[test]
fn outrider_proxy_starts_with_the_injected_environment_and_serves_app_probes() {
    let (_, env) = injected_containers("deploy/examples/payments-api.injected.yaml");
    let (_, more) = injected_containers("kubernetes/tests/golden/deployment.injected.yaml");
    let mut cmd = Command::new(OUTRIDER);
    // Local mode on loopback port 0 instead of the pod's capture listeners; no control plane
    // (and the identity files do not exist here).
    cmd.args(["proxy", "--forward", "127.0.0.1:0=127.0.0.1:9"]);
    for (name, value) in env
        .iter()
        .chain(more.iter().filter(|(n, _)| n == "OUTRIDER_OPAQUE_PORTS"))
    {
        if !name.starts_with("OUTRIDER_CONTROL")
            && !name.starts_with("OUTRIDER_WORKLOAD")
            && !name.starts_with("OUTRIDER_IDENTITY")
            && name != "OUTRIDER_TRUST_ANCHORS"
        {
            cmd.env(name, value);
        }
    }
    assert!(env.iter().any(|(n, _)| n == "OUTRIDER_APP_PROBES"));
    cmd.env("OUTRIDER_ADMIN", "127.0.0.1:0")
        .env("OUTRIDER_LOG", "info")
        .env("OUTRIDER_LOG_FORMAT", "json");
    let mut proxy = ChildGuard::spawn(&mut cmd, "proxy");
    let admin = crate::support::proxy_addrs(&mut proxy, Duration::from_secs(10)).admin;
    let get = |path: &str| {
        let mut s = std::net::TcpStream::connect(admin).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    // The probe is in the table and forwarded to 127.0.0.1:8080 (where nothing of ours runs:
    // it fails, or answers whatever else listens there); an unknown one is 404.
    let live = get("/app-probe/payments-api/liveness");
    assert!(
        live.contains("app probe failed: connect to 127.0.0.1:8080")
            || live.contains("app answered"),
        "{live}"
    );
    let none = get("/app-probe/payments-api/startup");
    assert!(none.starts_with("HTTP/1.1 404"), "{none}");
}

#[test]
fn wait_does_not_take_a_connection_closed_at_once_for_a_dependency() {
    // A listener that accepts and closes every connection at once, as a sidecar proxy does when
    // it cannot reach the target: not reachable, unless --settle 0 asks for a bare connect.
    let hold = PortHold::new();
    let target = format!("127.0.0.1:{}", hold.port());
    let out = outrider(&["wait", "--tcp", &target, "--timeout", "2s"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "  tcp {target}: connected to {target} but it closed at once"
        )),
        "{err}"
    );
    let out = outrider(&["wait", "--tcp", &target, "--timeout", "5s", "--settle", "0"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn logs_to_a_pipe_carry_no_terminal_escapes() {
    // What `kubectl logs` and `2>file` get: stderr is a pipe here.
    let mut proxy = ChildGuard::spawn(
        Command::new(OUTRIDER)
            .args(["proxy", "--forward", "127.0.0.1:0=127.0.0.1:9"])
            .env("OUTRIDER_ADMIN", "127.0.0.1:0")
            .env("OUTRIDER_LOG", "info")
            .env_remove("NO_COLOR"),
        "proxy",
    );
    proxy.expect_stderr("proxy started", Duration::from_secs(10));
    let mut control = ChildGuard::spawn(
        Command::new(OUTRIDER)
            .args(["control", "--plaintext", "--listen", "127.0.0.1:0"])
            .env("OUTRIDER_LOG", "info")
            .env_remove("NO_COLOR"),
        "control",
    );
    control.expect_stderr("control plane ready", Duration::from_secs(10));
    for (name, log) in [("proxy", proxy.stderr()), ("control", control.stderr())] {
        assert!(log.contains(" INFO "), "{name}: {log}");
        assert!(
            !log.contains('\x1b'),
            "{name} wrote terminal escapes to a pipe: {log:?}"
        );
    }
}

#[test]
fn wait_lines_carry_the_elapsed_time_and_sigterm_names_what_was_pending() {
    let port = free_port();
    let mut wait = ChildGuard::spawn(
        Command::new(OUTRIDER).args([
            "wait",
            "--tcp",
            &format!("127.0.0.1:{port}"),
            "--http",
            &format!("http://user:s3cret@127.0.0.1:{port}/ready"),
            "--timeout",
            "60s",
        ]),
        "outrider wait",
    );
    wait.expect_stderr(
        "attempt 1 failed: connection refused",
        Duration::from_secs(10),
    );
    let out = Command::new("kill")
        .args(["-TERM", &wait.pid().to_string()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let status = wait
        .wait_timeout(Duration::from_secs(10))
        .expect("wait did not stop on SIGTERM");
    let err = wait.stderr();
    assert_eq!(status.code(), Some(143), "{err}");
    // Every progress line starts with the time since the start.
    let first = err.lines().next().unwrap();
    assert!(
        first.starts_with("outrider wait: [") && first.contains("s] "),
        "{err}"
    );
    let last = err.lines().last().unwrap();
    assert!(last.contains("stopped by a signal after"), "{err}");
    assert!(
        last.contains(&format!(
            "still waiting for: tcp 127.0.0.1:{port} (connection refused"
        )),
        "{err}"
    );
    assert!(
        !err.contains("s3cret") && err.contains("http://***@127.0.0.1"),
        "{err}"
    );
}

#[test]
fn inject_checks_its_flags_and_warns_about_an_image_without_a_registry() {
    let seed = std::fs::read_to_string(repo("deploy/examples/payments-api.yaml")).unwrap();
    let out = outrider_stdin(&["inject"], &seed);
    assert!(out.status.success());
    assert!(
        text(&out.stderr).contains("the image outrider:0.1.0 names no registry"),
        "{}",
        text(&out.stderr)
    );
    let out = outrider_stdin(
        &["inject", "--image", "registry.example/outrider:0.1.0"],
        &seed,
    );
    assert!(out.status.success());
    assert!(
        !text(&out.stderr).contains("names no registry"),
        "{}",
        text(&out.stderr)
    );
    for (flag, value) in [
        ("--image", ""),
        ("--image", "a b"),
        ("--control", "not a url"),
        ("--control", "ftp://x/"),
    ] {
        let out = outrider_stdin(&["inject", flag, value], &seed);
        assert_eq!(out.status.code(), Some(2), "{flag} {value:?}");
        assert!(text(&out.stderr).contains(flag), "{}", text(&out.stderr));
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn wait_accepts_a_redirect_only_when_told_to() {
    let port = http_server(302);
    let url = format!("http://127.0.0.1:{port}/");
    let out = outrider(&["wait", "--http", &url, "--timeout", "1s"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("HTTP status 302 (2xx expected)"),
        "{}",
        text(&out.stderr)
    );
    let port = http_server(302);
    let url = format!("http://127.0.0.1:{port}/");
    let out = outrider(&[
        "wait",
        "--http",
        &url,
        "--http-status",
        "200-399",
        "--timeout",
        "10s",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}
