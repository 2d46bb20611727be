//! The control plane end to end, on loopback (no root): the real `outrider control` and
//! `outrider proxy` binaries, three app instances, and a keep-alive HTTP/1.1 client under constant
//! load while the mesh file changes, turns invalid, and the control plane dies and comes back.
//!
//! Every wait is for something observable: the control plane's version (`/v1/version`), the
//! version the proxy applied (`/config`), a metric, or the traffic itself. Deadlines are generous
//! (a loaded machine is slow, not wrong); the times they measure are printed, not asserted.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{self, ChildGuard, PortHold, TempDir};

pub(crate) const OUTRIDER: &str = env!("CARGO_BIN_EXE_outrider");
const VIP: &str = "198.18.100.1:80";
/// How long a change may take to reach the proxy or show in its traffic.
pub(crate) const CHANGE_TIMEOUT: Duration = Duration::from_secs(15);

/// A minimal HTTP/1.1 response: status, headers (lower-case names), body.
pub(crate) struct Answer {
    pub(crate) status: u16,
    headers: Vec<(String, String)>,
    pub(crate) body: String,
}

impl Answer {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request on a keep-alive connection and reads one Content-Length-framed response.
fn exchange(conn: &mut BufReader<TcpStream>, method: &str, path: &str) -> std::io::Result<Answer> {
    let req = format!("{method} {path} HTTP/1.1\r\nHost: payments\r\nContent-Length: 0\r\n\r\n");
    conn.get_mut().write_all(req.as_bytes())?;
    let mut line = String::new();
    conn.read_line(&mut line)?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad status line {line:?}"),
            )
        })?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        conn.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_lowercase(), v.trim().to_string()));
        }
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body)?;
    Ok(Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn connect(addr: SocketAddr) -> BufReader<TcpStream> {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    BufReader::new(s)
}

/// One request on a fresh connection.
pub(crate) fn get(addr: SocketAddr, path: &str) -> Answer {
    exchange(&mut connect(addr), "GET", path).unwrap()
}

fn mesh(endpoints: &[u16], slow_timeout: &str) -> String {
    let eps: String = endpoints
        .iter()
        .map(|p| format!("      - address: 127.0.0.1:{p}\n"))
        .collect();
    format!(
        "services:\n  - name: payments\n    namespace: test\n    addresses: [{VIP}]\n    protocol: http1\n    endpoints:\n{eps}    routes:\n      - name: slow\n        match: {{ path_prefix: /slow }}\n        timeout: {slow_timeout}\nworkloads:\n  - name: test/client\n"
    )
}

/// Writes the mesh file atomically (rename), as config management tools do.
fn write_mesh(dir: &TempDir, yaml: &str) -> Instant {
    let tmp = dir.path().join("mesh.yaml.tmp");
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(&tmp, dir.path().join("mesh.yaml")).unwrap();
    Instant::now()
}

/// One answer of the load: when its request started, its status, and the instance that served it.
#[derive(Debug)]
pub(crate) struct Sent {
    pub(crate) started: Instant,
    pub(crate) status: u16,
    pub(crate) instance: String,
}

/// The constant load: one keep-alive connection, a request every 2 ms, every answer recorded.
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    started: Arc<AtomicU64>,
    log: Arc<Mutex<Vec<Sent>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    pub(crate) fn start(addr: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicU64::new(0));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (s, n, l) = (stop.clone(), started.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            let mut conn = connect(addr);
            let deadline = Instant::now() + Duration::from_secs(120);
            // Bounded: at most 60k requests and 120 s.
            for _ in 0..60_000 {
                if s.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let started = Instant::now();
                n.fetch_add(1, Ordering::SeqCst);
                let sent = match exchange(&mut conn, "GET", "/load") {
                    Ok(a) => Sent {
                        started,
                        status: a.status,
                        instance: a.header("x-instance").unwrap_or("").to_string(),
                    },
                    Err(e) => {
                        conn = connect(addr);
                        Sent {
                            started,
                            status: 0,
                            instance: format!("error: {e}"),
                        }
                    }
                };
                l.lock().unwrap().push(sent);
                // The load's pace, not a wait for anything.
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Load {
            stop,
            started,
            log,
            thread: Some(thread),
        }
    }

    /// How many requests the load has started so far.
    pub(crate) fn started(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }

    /// Waits (at most `within`) for an answer from `instance` to a request started at or after
    /// `since`; returns when that request started.
    pub(crate) fn wait_for(
        &self,
        instance: &str,
        since: Instant,
        within: Duration,
    ) -> Option<Instant> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let found = self
                .log
                .lock()
                .unwrap()
                .iter()
                .find(|s| s.started >= since && s.instance == instance)
                .map(|s| s.started);
            if found.is_some() {
                return found;
            }
            // Polling the load's log with a deadline.
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Answers from `instance` to requests started at or after `since`.
    pub(crate) fn count_since(&self, instance: &str, since: Instant) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.started >= since && s.instance == instance)
            .count()
    }

    pub(crate) fn finish(mut self) -> Vec<Sent> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

/// A demo app instance on a loopback port of its own; returns once it listens.
pub(crate) fn start_app(instance: &str) -> (u16, ChildGuard) {
    support::spawn_listening(
        instance,
        None,
        |port| {
            let mut cmd = Command::new(OUTRIDER);
            cmd.args([
                "demo-app",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--instance",
                instance,
            ]);
            cmd
        },
        "listening on",
    )
}

/// The control plane following `dir`'s mesh file (none: the embedded demo mesh), on `port` or
/// any free one; returns once it listens.
/// It serves plain HTTP (`--plaintext`), as these tests read it with a plain client.
fn start_control(dir: Option<&TempDir>, port: Option<u16>) -> (SocketAddr, ChildGuard) {
    start_control_with(dir, port, &["--plaintext"])
}

/// [`start_control`] with `extra` flags instead of `--plaintext`.
pub(crate) fn start_control_with(
    dir: Option<&TempDir>,
    port: Option<u16>,
    extra: &[&str],
) -> (SocketAddr, ChildGuard) {
    let (port, cp) = support::spawn_listening(
        "control",
        port,
        |port| {
            let mut cmd = Command::new(OUTRIDER);
            cmd.arg("control");
            if let Some(dir) = dir {
                cmd.arg("--config").arg(dir.path().join("mesh.yaml"));
            }
            cmd.args(["--listen", &format!("127.0.0.1:{port}")])
                .args(extra)
                .env("OUTRIDER_LOG", "info");
            cmd
        },
        "control plane ready",
    );
    (SocketAddr::from(([127, 0, 0, 1], port)), cp)
}

/// A proxy with `args`, its admin server and listeners on port 0; returns it with the addresses
/// it bound (from its log).
pub(crate) fn start_proxy(args: &[&str]) -> (ChildGuard, support::ProxyAddrs) {
    let mut proxy = ChildGuard::spawn(
        Command::new(OUTRIDER)
            .arg("proxy")
            .args(args)
            .args(["--admin", "127.0.0.1:0"])
            .env("OUTRIDER_LOG", "info")
            .env("OUTRIDER_LOG_FORMAT", "json"),
        "proxy",
    );
    let addrs = support::proxy_addrs(&mut proxy, Duration::from_secs(10));
    (proxy, addrs)
}

/// A proxy for workload `test/client` forwarding a loopback port to `vip`, watching the plain
/// HTTP control plane `cp`; returns once it is ready, with its forward and admin addresses.
pub(crate) fn start_client_proxy(
    cp: SocketAddr,
    vip: &str,
) -> (ChildGuard, SocketAddr, SocketAddr) {
    let (proxy, addrs) = start_proxy(&[
        "--forward",
        &format!("127.0.0.1:0={vip}"),
        "--control",
        &format!("http://{cp}"),
        "--workload",
        "test/client",
    ]);
    let (listen, admin) = (addrs.forwards[0], addrs.admin);
    wait_until("proxy ready with its first config", CHANGE_TIMEOUT, || {
        get(admin, "/ready").status == 200
    });
    (proxy, listen, admin)
}

/// The sum of `family`'s samples with `labels` on `addr`'s `/metrics`; a missing family fails.
pub(crate) fn metric(addr: SocketAddr, family: &str, labels: &[(&str, &str)]) -> f64 {
    support::sample(&get(addr, "/metrics").body, family, labels)
}

/// The version the control plane serves now.
pub(crate) fn control_version(cp: SocketAddr) -> String {
    let a = get(cp, "/v1/version");
    assert_eq!(a.status, 200, "{}", a.body);
    a.body.trim().to_owned()
}

/// The control-plane version the proxy applied last (its `/config`).
pub(crate) fn proxy_version(admin: SocketAddr) -> Option<String> {
    let config: serde_json::Value = serde_json::from_str(&get(admin, "/config").body).ok()?;
    config["control"]["version"].as_str().map(str::to_owned)
}

pub(crate) fn wait_until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        // Polling observable state with a deadline.
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what}: not within {within:?}");
}

/// Waits until the control plane serves a version other than `old` and the proxy has applied it;
/// returns that version and when the proxy was first seen with it.
pub(crate) fn wait_applied(cp: SocketAddr, admin: SocketAddr, old: &str) -> (String, Instant) {
    let mut new = String::new();
    wait_until(
        "the control plane has a new version",
        CHANGE_TIMEOUT,
        || {
            new = control_version(cp);
            new != old
        },
    );
    wait_until(
        &format!("the proxy applies version {new}"),
        CHANGE_TIMEOUT,
        || proxy_version(admin).as_deref() == Some(new.as_str()),
    );
    (new, Instant::now())
}

#[test]
fn proxies_follow_the_control_plane_live_under_load() {
    let dir = TempDir::new();
    let apps: Vec<(u16, ChildGuard)> = ["e1", "e2", "e3"].iter().map(|n| start_app(n)).collect();
    let ports: Vec<u16> = apps.iter().map(|(p, _)| *p).collect();
    write_mesh(&dir, &mesh(&ports[..2], "10s"));
    let (cp, control) = start_control(Some(&dir), None);

    let (mut proxy, listen, admin) = start_client_proxy(cp, VIP);
    let mut version = control_version(cp);
    assert_eq!(proxy_version(admin), Some(version.clone()));

    let load = Load::start(listen);
    let t0 = Instant::now();
    // When each change took effect, to check that the load ran across all of them.
    let mut changes = Vec::new();
    assert!(
        load.wait_for("e1", t0, CHANGE_TIMEOUT).is_some(),
        "e1 serves"
    );
    assert!(
        load.wait_for("e2", t0, CHANGE_TIMEOUT).is_some(),
        "e2 serves"
    );

    // Add an endpoint: once the proxy has the new version, it gets traffic.
    let t = write_mesh(&dir, &mesh(&ports, "10s"));
    let (v, applied) = wait_applied(cp, admin, &version);
    changes.push(applied);
    version = v;
    let seen = load
        .wait_for("e3", applied, CHANGE_TIMEOUT)
        .expect("e3 gets traffic");
    eprintln!(
        "added endpoint: applied {:?} and served {:?} after the file changed",
        applied - t,
        seen.saturating_duration_since(t)
    );

    // Remove an endpoint while slow requests are in flight (some of them on it): they finish,
    // and no request that starts after the proxy applied the change goes to it.
    let forward_requests = || {
        metric(
            admin,
            "outrider_requests_total",
            &[("direction", "forward")],
        )
    };
    let (requests_before, load_before) = (forward_requests(), load.started());
    let in_flight: Vec<_> = (0..6)
        .map(|_| std::thread::spawn(move || get(listen, "/slow?ms=3000")))
        .collect();
    wait_until(
        "the six slow requests reach the proxy",
        CHANGE_TIMEOUT,
        || {
            // Read the proxy's count first: the load's own requests among it are at most those it
            // has started by the time it is read after.
            let requests = forward_requests();
            let load_requests = (load.started() - load_before) as f64;
            requests - requests_before - load_requests >= 6.0
        },
    );
    let t = write_mesh(&dir, &mesh(&ports[1..], "10s"));
    let (v, applied) = wait_applied(cp, admin, &version);
    changes.push(applied);
    version = v;
    let still_in_flight = in_flight.iter().filter(|h| !h.is_finished()).count();
    assert!(
        still_in_flight > 0,
        "the slow requests finished before the change was applied: nothing was in flight"
    );
    let answers: Vec<Answer> = in_flight.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        answers.iter().all(|a| a.status == 200),
        "in-flight requests finish across the update"
    );
    let on_e1 = answers
        .iter()
        .filter(|a| a.header("x-instance") == Some("e1"))
        .count();
    eprintln!(
        "removed endpoint: applied {:?} after the file changed; {still_in_flight} slow requests \
         were in flight then, {on_e1} of 6 on the removed endpoint, all finished",
        applied - t
    );
    assert!(load.wait_for("e2", applied, CHANGE_TIMEOUT).is_some());
    assert!(load.wait_for("e3", applied, CHANGE_TIMEOUT).is_some());
    assert_eq!(
        load.count_since("e1", applied),
        0,
        "e1 still served after the removal was applied"
    );

    // Change a route timeout: the first request after the proxy applied it times out.
    assert_eq!(get(listen, "/slow?ms=300").status, 200);
    let t = write_mesh(&dir, &mesh(&ports[1..], "100ms"));
    let (v, applied) = wait_applied(cp, admin, &version);
    changes.push(applied);
    version = v;
    let a = get(listen, "/slow?ms=300");
    assert_eq!(a.status, 504, "the new route timeout is in force");
    assert_eq!(a.header("outrider-error"), Some("request-timeout"));
    eprintln!(
        "route timeout change applied {:?} after the file changed",
        applied - t
    );

    // An invalid file: rejected, counted, nothing changes. The rejection is the control plane's
    // decision, so once it is counted no version can come of that file.
    write_mesh(&dir, &mesh(&ports, "5x"));
    wait_until("the invalid file is rejected", CHANGE_TIMEOUT, || {
        metric(cp, "outrider_control_config_rejected_total", &[]) == 1.0
    });
    let after = Instant::now();
    changes.push(after);
    assert_eq!(
        control_version(cp),
        version,
        "no version from the invalid file"
    );
    assert_eq!(proxy_version(admin), Some(version.clone()));
    assert_eq!(
        get(listen, "/slow?ms=300").status,
        504,
        "the last good route timeout stays"
    );
    assert!(load.wait_for("e2", after, CHANGE_TIMEOUT).is_some());
    assert_eq!(
        load.count_since("e1", after),
        0,
        "the invalid file changed nothing"
    );
    assert!(
        control
            .stderr()
            .contains("services[0].routes[0].timeout: invalid duration \"5x\""),
        "{}",
        control.stderr()
    );

    // Kill the control plane: the proxy keeps serving its last config and stays ready while it
    // retries. The port is held meanwhile (connections closed at once), so the control plane can
    // come back on it.
    drop(control);
    let hold = PortHold::at(cp.port(), Duration::from_secs(5));
    wait_until("the proxy notices", CHANGE_TIMEOUT, || {
        metric(admin, "outrider_control_connected", &[]) == 0.0
    });
    let down = Instant::now();
    changes.push(down);
    let errors = metric(admin, "outrider_control_errors_total", &[]);
    wait_until("the proxy retries and fails again", CHANGE_TIMEOUT, || {
        metric(admin, "outrider_control_errors_total", &[]) > errors
    });
    assert_eq!(
        get(admin, "/ready").status,
        200,
        "still ready without the control plane"
    );
    assert!(load.wait_for("e2", down, CHANGE_TIMEOUT).is_some());
    let config = get(admin, "/config").body;
    assert!(
        config.contains("disconnected (serving the last config)"),
        "{config}"
    );

    // Restart it with all three endpoints: the proxy resyncs (its backoff is at most 5 s).
    write_mesh(&dir, &mesh(&ports, "10s"));
    let (_, control) = start_control(Some(&dir), Some(hold.release()));
    let t = Instant::now();
    let (_, applied) = wait_applied(cp, admin, &version);
    changes.push(applied);
    let back = load
        .wait_for("e1", applied, CHANGE_TIMEOUT)
        .expect("e1 served after the resync");
    eprintln!(
        "resynced {:?} and e1 served {:?} after the control plane restarted",
        applied - t,
        back.saturating_duration_since(t)
    );
    assert_eq!(metric(admin, "outrider_control_connected", &[]), 1.0);

    let log = load.finish();
    let failed: Vec<_> = log.iter().filter(|s| s.status != 200).collect();
    // The load ran across every change: requests started before the first, between any two and
    // after the last.
    let mut bounds = vec![t0];
    bounds.extend(&changes);
    for (i, (from, to)) in bounds.iter().zip(bounds.iter().skip(1)).enumerate() {
        assert!(
            log.iter().any(|s| s.started >= *from && s.started < *to),
            "no load before change {i}"
        );
    }
    assert!(log.iter().any(|s| Some(&s.started) >= changes.last()));
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        log.len(),
        &failed[..failed.len().min(5)]
    );
    eprintln!("{} requests under load, none failed", log.len());
    drop((control, apps));
    assert!(
        proxy.wait_timeout(Duration::ZERO).is_none(),
        "the proxy is still running"
    );
}

#[test]
fn check_reports_every_error_with_its_key_path() {
    let dir = TempDir::new();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "services:\n  - name: a\n    addresses: [nowhere]\n    routes:\n      - timeout: 5x\nworkloads:\n  - name: default/w\n    calls: [zz]\n").unwrap();
    let out = support::run(
        Command::new(OUTRIDER)
            .arg("control")
            .arg("--check")
            .arg(&bad),
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "services[0].addresses[0]: invalid address \"nowhere\"",
        "services[0].routes[0].timeout: invalid duration \"5x\"",
        "3 error(s)",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, mesh(&[9001], "1s")).unwrap();
    let out = support::run(
        Command::new(OUTRIDER)
            .arg("control")
            .arg("--check")
            .arg(&good),
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("1 services, 1 endpoints, 1 routes, 1 workloads"));
}

/// The version in a watch answer.
fn watch_version(body: &str) -> String {
    body.split("\"version\":\"")
        .nth(1)
        .and_then(|v| v.split('"').next())
        .unwrap_or_else(|| panic!("no version in {body}"))
        .to_string()
}

#[test]
fn the_watch_api_answers_bad_requests_clearly_and_long_polls() {
    let (addr, mut cp) = start_control(None, None);
    for (path, status, needle) in [
        ("/v1/watch", 400, "missing workload"),
        ("/v1/watch?workload=nope", 400, "bad workload"),
        ("/v1/watch?workload=demo/nobody", 404, "unknown workload"),
        (
            "/v1/watch?workload=demo/loadgen&version=a%20b",
            400,
            "bad version",
        ),
        (
            "/v1/watch?workload=demo/loadgen&version=%%%",
            400,
            "bad escape",
        ),
        (
            "/v1/watch?workload=demo%2Floadgen&wait=1ms",
            200,
            "\"workload\":\"demo/loadgen\"",
        ),
        ("/v1/watch?workload=demo/loadgen&wait=1d", 400, "bad wait"),
        ("/nope", 404, "not found"),
    ] {
        let a = get(addr, path);
        assert_eq!(a.status, status, "{path}: {}", a.body);
        assert!(a.body.contains(needle), "{path}: {}", a.body);
    }
    let first = get(addr, "/v1/watch?workload=demo/loadgen");
    assert_eq!(first.status, 200);
    let version = watch_version(&first.body);
    assert_eq!(version, control_version(addr));
    // The current version: the request waits for a change, then 304.
    let t = Instant::now();
    let again = get(
        addr,
        &format!("/v1/watch?workload=demo/loadgen&version={version}&wait=300ms"),
    );
    assert_eq!(again.status, 304);
    assert!(t.elapsed() >= Duration::from_millis(250), "it waited");
    // Garbage bytes get a 400 and a close, and do not hurt it: a normal watch still works.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"\x16\x03\x01garbage\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)
        .expect("closed after the garbage");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let after = get(addr, "/v1/watch?workload=demo/loadgen");
    assert_eq!(after.status, 200, "{}", after.body);
    assert_eq!(watch_version(&after.body), version);
    assert_eq!(get(addr, "/live").status, 200);
    assert!(cp.wait_timeout(Duration::ZERO).is_none());
}

#[test]
fn refused_unknown_destinations_empty_services_and_readiness() {
    let dir = TempDir::new();
    let (app, _app) = start_app("app");
    let yaml = format!(
        "unknown_destinations: refuse\nservices:\n  - name: empty\n    addresses: [{VIP}]\nworkloads:\n  - name: test/client\n"
    );
    write_mesh(&dir, &yaml);
    // The control plane starts later, on a port the proxy is given now: held until then, with
    // every connection closed at once.
    let hold = PortHold::new();
    // No control plane yet: listening, but not ready.
    let (_proxy, addrs) = start_proxy(&[
        "--forward",
        &format!("127.0.0.1:0=127.0.0.1:{app},127.0.0.1:0={VIP}"),
        "--control",
        &format!("http://127.0.0.1:{}", hold.port()),
        "--workload",
        "test/client",
    ]);
    let (to_app, to_vip, admin) = (addrs.forwards[0], addrs.forwards[1], addrs.admin);
    let ready = get(admin, "/ready");
    assert_eq!(ready.status, 503);
    assert!(
        ready
            .body
            .contains("waiting for the first config from the control plane"),
        "{}",
        ready.body
    );
    // Outbound traffic does not bypass the mesh meanwhile: held (5 s), then 503 no-config.
    let early = get(to_app, "/");
    assert_eq!(early.status, 503);
    assert_eq!(early.header("outrider-error"), Some("no-config"));

    let _control = start_control(Some(&dir), Some(hold.release()));
    wait_until("ready once the first config is in", CHANGE_TIMEOUT, || {
        get(admin, "/ready").status == 200
    });
    let refused = get(to_app, "/");
    assert_eq!(refused.status, 502);
    assert_eq!(refused.header("outrider-error"), Some("no-route"));
    let empty = get(to_vip, "/");
    assert_eq!(empty.status, 503);
    assert_eq!(empty.header("outrider-error"), Some("no-endpoints"));
    // Opaque traffic to an unknown destination is refused too: closed without an answer.
    let mut raw = TcpStream::connect(to_app).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(b"\x00\x01binary").unwrap();
    let mut buf = [0u8; 16];
    assert!(matches!(raw.read(&mut buf), Ok(0) | Err(_)), "closed");
    // Each refusal counted once: the HTTP request and the opaque connection (no route), the
    // request to the empty service (no endpoints). The opaque refusal may be counted just after
    // the client sees the close.
    let errors = |reason: &str| {
        metric(
            admin,
            "outrider_errors_total",
            &[("direction", "forward"), ("reason", reason)],
        )
    };
    wait_until("the opaque refusal is counted", CHANGE_TIMEOUT, || {
        errors("no-route") >= 2.0
    });
    let metrics = get(admin, "/metrics").body;
    for (reason, want) in [("no-route", 2.0), ("no-endpoints", 1.0), ("no-config", 1.0)] {
        assert_eq!(
            support::sample(
                &metrics,
                "outrider_errors_total",
                &[("direction", "forward"), ("reason", reason)]
            ),
            want,
            "{reason}"
        );
    }
}

/// `outrider control ca init` into `dir`; returns its stdout.
pub(crate) fn ca_init(dir: &std::path::Path) -> String {
    support::run_ok(
        Command::new(OUTRIDER)
            .args(["control", "ca", "init", "--dir"])
            .arg(dir),
    )
}

/// `--issuer-cert`, `--issuer-key`, `--trust-anchors`, `--token-key` for the files of `ca init`.
pub(crate) fn ca_flags(dir: &std::path::Path) -> Vec<String> {
    let file = |name: &str| dir.join(name).display().to_string();
    vec![
        "--issuer-cert".into(),
        file("issuer.pem"),
        "--issuer-key".into(),
        file("issuer-key.pem"),
        "--trust-anchors".into(),
        file("root.pem"),
        "--token-key".into(),
        file("token.key"),
    ]
}

#[test]
fn ca_init_and_token_make_a_ca_that_serves_tls_and_honours_only_its_tokens() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new();
    let ca_dir = dir.path().join("ca");
    let out = ca_init(&ca_dir);
    assert!(
        out.contains("root-key.pem") && out.contains("offline"),
        "{out}"
    );
    for (file, mode) in [
        ("root.pem", None),
        ("issuer.pem", None),
        ("root-key.pem", Some(0o600)),
        ("issuer-key.pem", Some(0o600)),
        ("token.key", Some(0o600)),
    ] {
        let meta = std::fs::metadata(ca_dir.join(file)).unwrap();
        if let Some(mode) = mode {
            assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
        }
    }
    // A second init into the same directory refuses and changes nothing.
    let root_before = std::fs::read(ca_dir.join("root.pem")).unwrap();
    let again = support::run(
        Command::new(OUTRIDER)
            .args(["control", "ca", "init", "--dir"])
            .arg(&ca_dir),
    );
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
    assert_eq!(std::fs::read(ca_dir.join("root.pem")).unwrap(), root_before);

    // One token on stdout, for one identity.
    let token_key = ca_dir.join("token.key").display().to_string();
    let token = support::run_ok(Command::new(OUTRIDER).args([
        "control",
        "token",
        "--token-key",
        &token_key,
        "--namespace",
        "demo",
        "--service-account",
        "loadgen",
        "--ttl",
        "5m",
    ]));
    assert_eq!(token.lines().count(), 1, "{token}");
    let token = token.trim().to_string();
    assert!(token.starts_with("v1."), "{token}");
    let bad = support::run(Command::new(OUTRIDER).args([
        "control",
        "token",
        "--token-key",
        &token_key,
        "--identity",
        "spiffe://outrider.local/ns/demo",
    ]));
    assert_eq!(bad.status.code(), Some(2));

    // The control plane on those files serves TLS; the token is honoured (a bad CSR gets 400,
    // not 401), and one minted with another key is not (401).
    let flags = ca_flags(&ca_dir);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (cp, mut control) = start_control_with(None, None, &flags);
    let stderr = control.stderr();
    assert!(stderr.contains("certificate authority loaded"), "{stderr}");
    assert!(!stderr.contains("throwaway"), "{stderr}");
    let anchors = std::fs::read_to_string(ca_dir.join("root.pem")).unwrap();
    let other = dir.path().join("other");
    ca_init(&other);
    let foreign_token = support::run_ok(Command::new(OUTRIDER).args([
        "control",
        "token",
        "--token-key",
        &other.join("token.key").display().to_string(),
        "--identity",
        "spiffe://outrider.local/ns/demo/sa/loadgen",
    ]));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tls = outrider_control::client::client_tls(&anchors).unwrap();
    let certifier =
        outrider_control::client::Certifier::new(&format!("https://{cp}"), Some(tls)).unwrap();
    let status = |token: &str| match rt.block_on(certifier.certify(token, "not a csr")) {
        Err(outrider_control::client::CertifyError::Refused { status, message }) => {
            assert!(!message.contains(token), "the token leaked: {message}");
            status.as_u16()
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(status(&token), 400);
    assert_eq!(status(foreign_token.trim()), 401);
    // Plain HTTP to the TLS port gets nothing useful.
    assert!(exchange(&mut connect(cp), "GET", "/live").map_or(true, |a| a.status != 200));
    // Refusals are logged with the reason and the claimed identity, never the token.
    control.expect_stderr("minted with another token key", Duration::from_secs(5));
    let log = control.stderr();
    assert!(
        log.contains("spiffe://outrider.local/ns/demo/sa/loadgen"),
        "{log}"
    );
    assert!(
        !log.contains(&token) && !log.contains(foreign_token.trim()),
        "{log}"
    );
}

/// A token from the CA files in `ca_dir` for `demo/<account>`, written to a file; its path.
fn token_file(dir: &TempDir, ca_dir: &std::path::Path, account: &str) -> String {
    let token = support::run_ok(Command::new(OUTRIDER).args([
        "control",
        "token",
        "--token-key",
        &ca_dir.join("token.key").display().to_string(),
        "--namespace",
        "demo",
        "--service-account",
        account,
    ]));
    let path = dir.path().join(format!("{account}.token"));
    std::fs::write(&path, token.trim()).unwrap();
    path.display().to_string()
}

/// `/config`'s control-plane sync state of the proxy whose admin server is `admin`.
fn sync_state(admin: SocketAddr) -> serde_json::Value {
    let config: serde_json::Value = serde_json::from_str(&get(admin, "/config").body).unwrap();
    config["control"].clone()
}

/// A TLS control plane on the demo mesh with a CA made by `outrider control ca init` in
/// `ca_dir`, and an app for local-mode proxies to forward to (both stopped on drop).
struct TlsMesh {
    /// The control plane's `https://` URL.
    url: String,
    /// A `--forward` to the app.
    forward: String,
    _running: (ChildGuard, ChildGuard),
}

fn tls_mesh(ca_dir: &std::path::Path) -> TlsMesh {
    ca_init(ca_dir);
    let flags = ca_flags(ca_dir);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (cp, control) = start_control_with(None, None, &flags);
    let (app, app_guard) = start_app("app");
    TlsMesh {
        url: format!("https://{cp}"),
        forward: format!("127.0.0.1:0=127.0.0.1:{app}"),
        _running: (control, app_guard),
    }
}

#[test]
fn over_tls_a_proxy_gets_only_its_own_workloads_view_and_none_without_a_certificate() {
    let dir = TempDir::new();
    let ca_dir = dir.path().join("ca");
    let TlsMesh {
        url,
        forward,
        _running,
        ..
    } = tls_mesh(&ca_dir);
    let root = ca_dir.join("root.pem").display().to_string();
    let loadgen = token_file(&dir, &ca_dir, "loadgen");
    let proxy = |workload: &str, token: Option<&str>| {
        let mut args = vec![
            "--forward",
            &forward,
            "--control",
            &url,
            "--trust-anchors",
            &root,
            "--workload",
            workload,
        ];
        if let Some(token) = token {
            args.extend(["--identity-token-file", token]);
        }
        start_proxy(&args)
    };
    // loadgen's certificate, asking for payments-api's view (its server policy): refused, and
    // the proxy says so on /ready and /config instead of serving nothing silently.
    let (_thief, thief) = proxy("demo/payments-api", Some(&loadgen));
    wait_until("the refusal shows on /ready", CHANGE_TIMEOUT, || {
        get(thief.admin, "/ready").body.contains("refused")
    });
    assert_eq!(get(thief.admin, "/ready").status, 503);
    let state = sync_state(thief.admin);
    let error = state["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("403")
            && error.contains(
                "spiffe://outrider.local/ns/demo/sa/loadgen may not watch workload \"demo/payments-api\""
            ),
        "{state}"
    );
    assert_eq!(state["version"], serde_json::Value::Null, "{state}");
    // No identity at all: the watch API over TLS answers 401, the proxy never gets a view.
    let (_anonymous, anonymous) = proxy("demo/loadgen", None);
    wait_until("the 401", CHANGE_TIMEOUT, || {
        sync_state(anonymous.admin)["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("401") && e.contains("certify first"))
    });
    assert_eq!(get(anonymous.admin, "/ready").status, 503);
    // The same token for its own workload: ready, with loadgen's view (it calls payments-api).
    let (_own, own) = proxy("demo/loadgen", Some(&loadgen));
    wait_until("ready with its own view", CHANGE_TIMEOUT, || {
        get(own.admin, "/ready").status == 200
    });
    let state = sync_state(own.admin);
    assert_eq!(state["state"], "synced", "{state}");
}

#[test]
fn a_proxy_watches_a_tls_control_plane_and_only_with_the_right_anchors() {
    let dir = TempDir::new();
    let (ca_dir, other) = (dir.path().join("ca"), dir.path().join("other"));
    ca_init(&other);
    let TlsMesh {
        url,
        forward,
        _running,
        ..
    } = tls_mesh(&ca_dir);
    let loadgen = token_file(&dir, &ca_dir, "loadgen");

    // The right root: certified first, then ready with the demo mesh's view, watched with its
    // mesh certificate.
    let root = ca_dir.join("root.pem").display().to_string();
    let (proxy, addrs) = start_proxy(&[
        "--forward",
        &forward,
        "--control",
        &url,
        "--trust-anchors",
        &root,
        "--workload",
        "demo/loadgen",
        "--identity-token-file",
        &loadgen,
    ]);
    wait_until("ready over TLS", CHANGE_TIMEOUT, || {
        get(addrs.admin, "/ready").status == 200
    });
    let config: serde_json::Value =
        serde_json::from_str(&get(addrs.admin, "/config").body).unwrap();
    assert_eq!(config["trust_anchors"].as_str(), Some(root.as_str()));
    drop(proxy);
    // Another CA's root: the control plane's certificate is refused, the proxy stays unready
    // and says why.
    let wrong = other.join("root.pem").display().to_string();
    let (mut proxy, addrs) = start_proxy(&[
        "--forward",
        &forward,
        "--control",
        &url,
        "--trust-anchors",
        &wrong,
        "--workload",
        "demo/loadgen",
    ]);
    proxy.expect_stderr("invalid peer certificate: UnknownIssuer", CHANGE_TIMEOUT);
    let log = proxy.stderr();
    assert!(log.contains("control plane request failed"), "{log}");
    assert_eq!(get(addrs.admin, "/ready").status, 503);

    // https without anchors, and anchors with http, are flag errors.
    for (args, want) in [
        (
            vec!["--control", url.as_str()],
            "--trust-anchors: required when --control is https://",
        ),
        (
            vec![
                "--control",
                "http://127.0.0.1:1",
                "--trust-anchors",
                root.as_str(),
            ],
            "--trust-anchors: given, but --control is plaintext http://",
        ),
    ] {
        let out = support::run(
            Command::new(OUTRIDER)
                .args(["proxy", "--forward", &forward, "--workload", "demo/loadgen"])
                .args(&args),
        );
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(want), "{stderr}");
    }
}
