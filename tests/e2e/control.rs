//! The control plane end to end, on loopback (no root): the real `outrider control` and
//! `outrider proxy` binaries, three app instances, and a keep-alive HTTP/1.1 client under constant
//! load while the mesh file changes, turns invalid, and the control plane dies and comes back.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{self, ChildGuard, TempDir};

const OUTRIDER: &str = env!("CARGO_BIN_EXE_outrider");
const VIP: &str = "198.18.100.1:80";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// A minimal HTTP/1.1 response: status, headers (lower-case names), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
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
fn get(addr: SocketAddr, path: &str) -> Answer {
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

/// The constant load: one keep-alive connection, a request every 2 ms, every answer recorded.
struct Load {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<(Instant, u16, String)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (s, l) = (stop.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            let mut conn = connect(addr);
            let deadline = Instant::now() + Duration::from_secs(90);
            // Bounded: at most 40k requests and 90 s.
            for _ in 0..40_000 {
                if s.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let entry = match exchange(&mut conn, "GET", "/load") {
                    Ok(a) => (
                        Instant::now(),
                        a.status,
                        a.header("x-instance").unwrap_or("").to_string(),
                    ),
                    Err(e) => {
                        conn = connect(addr);
                        (Instant::now(), 0, format!("error: {e}"))
                    }
                };
                l.lock().unwrap().push(entry);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Load {
            stop,
            log,
            thread: Some(thread),
        }
    }

    /// Waits (bounded) until an answer from `instance` arrives after `since`; returns when.
    fn wait_for(&self, instance: &str, since: Instant, within: Duration) -> Option<Instant> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let found = self
                .log
                .lock()
                .unwrap()
                .iter()
                .find(|(t, _, i)| *t >= since && i == instance)
                .map(|(t, _, _)| *t);
            if found.is_some() {
                return found;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    fn count_since(&self, instance: &str, since: Instant) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _, i)| *t >= since && i == instance)
            .count()
    }

    fn finish(mut self) -> Vec<(Instant, u16, String)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

fn start_control(dir: &TempDir, port: u16) -> ChildGuard {
    let cp = ChildGuard::spawn(
        Command::new(OUTRIDER)
            .args(["control", "--config"])
            .arg(dir.path().join("mesh.yaml"))
            .args(["--listen", &format!("127.0.0.1:{port}")]),
        "control",
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let up = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        TcpStream::connect(addr).is_ok()
    });
    assert!(up, "control plane did not start: {}", cp.stderr());
    cp
}

fn metric(admin: SocketAddr, name: &str) -> f64 {
    let body = get(admin, "/metrics").body;
    body.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(-1.0)
}

fn wait_until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what}: not within {within:?}");
}

#[test]
fn proxies_follow_the_control_plane_live_under_load() {
    let dir = TempDir::new();
    let apps: Vec<(u16, ChildGuard)> = ["e1", "e2", "e3"]
        .iter()
        .map(|name| {
            let port = free_port();
            let app = ChildGuard::spawn(
                Command::new(OUTRIDER).args([
                    "demo-app",
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                    "--instance",
                    name,
                ]),
                *name,
            );
            (port, app)
        })
        .collect();
    let ports: Vec<u16> = apps.iter().map(|(p, _)| *p).collect();
    write_mesh(&dir, &mesh(&ports[..2], "2s"));
    let cp_port = free_port();
    let mut control = start_control(&dir, cp_port);
    let cp_addr: SocketAddr = format!("127.0.0.1:{cp_port}").parse().unwrap();

    let (listen, admin) = (free_port(), free_port());
    let mut proxy = ChildGuard::spawn(
        Command::new(OUTRIDER).args([
            "proxy",
            "--forward",
            &format!("127.0.0.1:{listen}={VIP}"),
            "--control",
            &format!("http://127.0.0.1:{cp_port}"),
            "--workload",
            "test/client",
            "--admin",
            &format!("127.0.0.1:{admin}"),
        ]),
        "proxy",
    );
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
    wait_until(
        "proxy ready with its first config",
        Duration::from_secs(10),
        || TcpStream::connect(admin).is_ok() && get(admin, "/ready").status == 200,
    );

    let load = Load::start(listen);
    let t0 = Instant::now();
    assert!(
        load.wait_for("e1", t0, Duration::from_secs(5)).is_some(),
        "e1 serves"
    );
    assert!(
        load.wait_for("e2", t0, Duration::from_secs(5)).is_some(),
        "e2 serves"
    );

    // Add an endpoint: it gets traffic within 1 s.
    let t = write_mesh(&dir, &mesh(&ports, "2s"));
    let seen = load
        .wait_for("e3", t, Duration::from_secs(3))
        .expect("e3 gets traffic");
    assert!(seen - t < Duration::from_secs(1), "e3 after {:?}", seen - t);
    eprintln!(
        "added endpoint served {:?} after the file changed",
        seen - t
    );

    // Remove an endpoint while slow requests are in flight (some of them on it): they finish,
    // and within 1 s the removed endpoint gets no new requests.
    let in_flight: Vec<_> = (0..6)
        .map(|_| std::thread::spawn(move || get(listen, "/slow?ms=700")))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let t = write_mesh(&dir, &mesh(&ports[1..], "2s"));
    let answers: Vec<Answer> = in_flight.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        answers.iter().all(|a| a.status == 200),
        "in-flight requests finish across the update"
    );
    let on_e1 = answers
        .iter()
        .filter(|a| a.header("x-instance") == Some("e1"))
        .count();
    eprintln!("{on_e1} of 6 in-flight requests were on the removed endpoint and finished");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        load.count_since("e1", t + Duration::from_secs(1)),
        0,
        "e1 still served after removal"
    );
    assert!(
        load.count_since("e2", t + Duration::from_secs(1)) > 0
            && load.count_since("e3", t + Duration::from_secs(1)) > 0
    );

    // Change a route timeout: within 1 s a 300 ms request on that route times out.
    assert_eq!(get(listen, "/slow?ms=300").status, 200);
    let t = write_mesh(&dir, &mesh(&ports[1..], "100ms"));
    // The first request that times out started after the change was in force.
    let mut in_force = None;
    wait_until(
        "the new route timeout is in force",
        Duration::from_secs(3),
        || {
            let started = Instant::now();
            let a = get(listen, "/slow?ms=300");
            if a.status == 504 {
                assert_eq!(a.header("outrider-error"), Some("request-timeout"));
                in_force = Some(started - t);
                true
            } else {
                false
            }
        },
    );
    let in_force = in_force.unwrap();
    assert!(
        in_force < Duration::from_secs(1),
        "timeout change in force after {in_force:?}"
    );
    eprintln!("route timeout change in force after at most {in_force:?}");

    // An invalid file: rejected, counted, nothing changes.
    write_mesh(&dir, &mesh(&ports, "5x"));
    wait_until(
        "the invalid file is rejected",
        Duration::from_secs(3),
        || metric(cp_addr, "outrider_control_config_rejected_total") == 1.0,
    );
    let after = Instant::now();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        load.count_since("e1", after),
        0,
        "the invalid file changed nothing"
    );
    assert_eq!(
        get(listen, "/slow?ms=300").status,
        504,
        "the last good route timeout stays"
    );
    assert!(
        control
            .stderr()
            .contains("services[0].routes[0].timeout: invalid duration \"5x\""),
        "{}",
        control.stderr()
    );

    // Kill the control plane: the proxy keeps serving its last config and stays ready.
    drop(control);
    wait_until("the proxy notices", Duration::from_secs(5), || {
        metric(admin, "outrider_control_connected") == 0.0
    });
    let down = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        get(admin, "/ready").status,
        200,
        "still ready without the control plane"
    );
    assert!(load.count_since("e2", down) > 0);
    let config = get(admin, "/config").body;
    assert!(
        config.contains("disconnected (serving the last config)"),
        "{config}"
    );

    // Restart it with all three endpoints: the proxy resyncs (backoff is at most 5 s).
    write_mesh(&dir, &mesh(&ports, "2s"));
    control = start_control(&dir, cp_port);
    let t = Instant::now();
    let back = load
        .wait_for("e1", t, Duration::from_secs(10))
        .expect("resynced after the restart");
    eprintln!("resynced {:?} after the control plane restarted", back - t);
    assert_eq!(metric(admin, "outrider_control_connected"), 1.0);

    let log = load.finish();
    let failed: Vec<_> = log.iter().filter(|(_, s, _)| *s != 200).collect();
    assert!(log.len() > 500, "only {} requests", log.len());
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

#[test]
fn the_watch_api_answers_bad_requests_clearly_and_long_polls() {
    let port = free_port();
    let mut cp = ChildGuard::spawn(
        Command::new(OUTRIDER).args(["control", "--listen", &format!("127.0.0.1:{port}")]),
        "control",
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_until("control plane up", Duration::from_secs(5), || {
        TcpStream::connect(addr).is_ok()
    });
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
    let version = first
        .body
        .split("\"version\":\"")
        .nth(1)
        .and_then(|v| v.split('"').next())
        .unwrap()
        .to_string();
    // The current version: the request waits for a change, then 304.
    let t = Instant::now();
    let again = get(
        addr,
        &format!("/v1/watch?workload=demo/loadgen&version={version}&wait=300ms"),
    );
    assert_eq!(again.status, 304);
    assert!(t.elapsed() >= Duration::from_millis(250), "it waited");
    // Garbage bytes do not hurt it.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"\x16\x03\x01garbage\r\n\r\n").unwrap();
    assert_eq!(get(addr, "/live").status, 200);
    assert!(cp.wait_timeout(Duration::ZERO).is_none());
}

#[test]
fn refused_unknown_destinations_empty_services_and_readiness() {
    let dir = TempDir::new();
    let app = free_port();
    let _app = ChildGuard::spawn(
        Command::new(OUTRIDER).args(["demo-app", "--listen", &format!("127.0.0.1:{app}")]),
        "app",
    );
    let yaml = format!(
        "unknown_destinations: refuse\nservices:\n  - name: empty\n    addresses: [{VIP}]\nworkloads:\n  - name: test/client\n"
    );
    write_mesh(&dir, &yaml);
    let (cp_port, admin, to_app, to_vip) = (free_port(), free_port(), free_port(), free_port());
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let proxy_cmd = || {
        let mut cmd = Command::new(OUTRIDER);
        cmd.args([
            "proxy",
            "--forward",
            &format!("127.0.0.1:{to_app}=127.0.0.1:{app},127.0.0.1:{to_vip}={VIP}"),
            "--control",
            &format!("http://127.0.0.1:{cp_port}"),
            "--workload",
            "test/client",
            "--admin",
            &admin.to_string(),
        ]);
        cmd
    };
    // No control plane yet: listening, but not ready.
    let _proxy = ChildGuard::spawn(&mut proxy_cmd(), "proxy");
    wait_until("admin up", Duration::from_secs(5), || {
        TcpStream::connect(admin).is_ok()
    });
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
    let early = get(format!("127.0.0.1:{to_app}").parse().unwrap(), "/");
    assert_eq!(early.status, 503);
    assert_eq!(early.header("outrider-error"), Some("no-config"));

    let _control = start_control(&dir, cp_port);
    wait_until(
        "ready once the first config is in",
        Duration::from_secs(10),
        || get(admin, "/ready").status == 200,
    );
    let to_app: SocketAddr = format!("127.0.0.1:{to_app}").parse().unwrap();
    let to_vip: SocketAddr = format!("127.0.0.1:{to_vip}").parse().unwrap();
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
    let metrics = get(admin, "/metrics").body;
    for reason in ["no-route", "no-endpoints"] {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with("outrider_errors_total")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .unwrap_or_default();
        assert!(
            line.ends_with(" 1") || line.ends_with(" 2"),
            "{reason}: {line}"
        );
    }
}
