//! The control plane at scale (issue 21, "Views that scale"): 10,000 services and 100,000
//! endpoints in the stand-in Kubernetes API (`tests/e2e/kubeapi.rs`), the real `outrider
//! control --kubernetes` binary, 1,000 watching proxies (long-poll clients of the watch API,
//! each workload calling 10 services), then 10,000 idle watchers. It prints:
//!
//! - the time from one EndpointSlice change in the API to the view reaching the watcher whose
//!   workload calls that service (p50, p99, max over the changes);
//! - the control plane's RSS (and high-water mark) after the sync, after the changes, and with
//!   10,000 more idle watchers;
//! - `/live` latency (a new connection each time, every 50 ms) throughout.
//!
//! Not part of `cargo test`. Run with `cargo bench --bench control_scale` (release build);
//! `CONTROL_SCALE_CHANGES` sets the number of changes (default 200). The watch API is served
//! over `--plaintext` here: the watchers are not proxies with certificates.

// A benchmark: a failed step ends it with the reason, as in the tests whose stand-in it uses.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(dead_code)]
#[path = "../tests/e2e/kubeapi.rs"]
mod kubeapi;

/// What the stand-in API server needs of the tests' support code.
mod support {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    /// A number unique in this process.
    pub fn unique() -> u32 {
        COUNTER.fetch_add(1, Ordering::Relaxed)
    }
}

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SERVICES: usize = 10_000;
const ENDPOINTS_PER_SERVICE: usize = 10;
const WORKLOADS: usize = 1_000;
const CALLS: usize = 10;
const IDLE: usize = 10_000;

fn service(i: usize) -> Value {
    let ip = format!("198.19.{}.{}", i / 250, i % 250 + 1);
    json!({"metadata": {"namespace": "bench", "name": format!("s{i}")},
           "spec": {"clusterIP": ip, "clusterIPs": [ip],
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"}]}})
}

/// Service `i`'s slice; `generation` moves its first endpoint's address.
fn slice(i: usize, generation: usize) -> Value {
    let endpoints: Vec<Value> = (0..ENDPOINTS_PER_SERVICE)
        .map(|e| {
            let n = i * ENDPOINTS_PER_SERVICE + e + if e == 0 { generation } else { 0 };
            let addr = format!("198.18.{}.{}", (n / 250) % 256, n % 250 + 1);
            json!({"addresses": [addr], "conditions": {"ready": true}})
        })
        .collect();
    json!({"metadata": {"namespace": "bench", "name": format!("s{i}-abc"),
                        "labels": {"kubernetes.io/service-name": format!("s{i}")}},
           "addressType": "IPv4",
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": endpoints})
}

fn mesh_file() -> String {
    let mut out = String::from("workloads:\n");
    for w in 0..WORKLOADS {
        let calls: Vec<String> = (0..CALLS).map(|c| format!("s{}", w * CALLS + c)).collect();
        out.push_str(&format!(
            "  - name: bench/w{w}\n    calls: [{}]\n",
            calls.join(", ")
        ));
    }
    out
}

/// A free loopback port (bound then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One HTTP/1.1 exchange on `conn`: status and body.
async fn exchange(conn: &mut TcpStream, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    conn.write_all(format!("GET {path} HTTP/1.1\r\nhost: control\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    conn.read_exact(&mut body).await?;
    Ok((status, body))
}

/// Long-polls `workload`'s view forever, reporting each new view's arrival time.
async fn watcher(
    addr: SocketAddr,
    workload: usize,
    reports: tokio::sync::mpsc::UnboundedSender<(usize, Instant)>,
) {
    let mut version = String::new();
    loop {
        let Ok(mut conn) = TcpStream::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        loop {
            let path = format!("/v1/watch?workload=bench/w{workload}&version={version}&wait=300s");
            match exchange(&mut conn, &path).await {
                Ok((200, body)) => {
                    let at = Instant::now();
                    let view: Value = serde_json::from_slice(&body).unwrap_or_default();
                    version = view["version"].as_str().unwrap_or_default().to_string();
                    let _ = reports.send((workload, at));
                }
                Ok((304, _)) => {}
                _ => break,
            }
        }
    }
}

/// RSS and high-water mark of `pid`, in MiB.
fn rss(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(f64::NAN, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn show(what: &str, samples: &mut [Duration]) {
    samples.sort();
    println!(
        "{what}: n={} p50={:?} p99={:?} max={:?}",
        samples.len(),
        percentile(samples, 0.5),
        percentile(samples, 0.99),
        samples.last().copied().unwrap_or_default()
    );
}

/// Stops the control plane when dropped.
struct Control(Child);
impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `outrider_control_watchers` gauge.
async fn waiting_watchers(addr: SocketAddr) -> usize {
    let Ok(mut conn) = TcpStream::connect(addr).await else {
        return 0;
    };
    let Ok((_, body)) = exchange(&mut conn, "/metrics").await else {
        return 0;
    };
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix("outrider_control_watchers "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as usize)
}

fn main() {
    let changes: usize = std::env::var("CONTROL_SCALE_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = std::env::temp_dir().join(format!("outrider-control-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");

    let started = Instant::now();
    let api = kubeapi::KubeApi::start();
    for i in 0..SERVICES {
        api.apply("services", service(i));
        api.apply("endpointslices", slice(i, 0));
    }
    println!(
        "stand-in API: {SERVICES} services, {} endpoints, in {:?}",
        SERVICES * ENDPOINTS_PER_SERVICE,
        started.elapsed()
    );
    let kubeconfig = api.kubeconfig(&dir);
    let mesh = dir.join("mesh.yaml");
    std::fs::write(&mesh, mesh_file()).expect("mesh file");
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let child = Command::new(env!("CARGO_BIN_EXE_outrider"))
        .args(["control", "--plaintext", "--kubernetes", "--kubeconfig"])
        .arg(&kubeconfig)
        .arg("--config")
        .arg(&mesh)
        .args(["--listen", &addr.to_string()])
        .env("OUTRIDER_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("outrider control");
    let control = Control(child);
    let pid = control.0.id();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let stop = Arc::new(AtomicBool::new(false));
    let live: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let live_failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    rt.block_on(async {
        // Synced: workload 0 sees its 10 services with their endpoints.
        let synced = Instant::now();
        loop {
            assert!(
                synced.elapsed() < Duration::from_secs(600),
                "no synced view in 600 s"
            );
            if let Ok(mut conn) = TcpStream::connect(addr).await {
                if let Ok((200, body)) = exchange(&mut conn, "/v1/watch?workload=bench/w0").await {
                    let view: Value = serde_json::from_slice(&body).unwrap_or_default();
                    let services = view["outbound"]["services"].as_array().map_or(0, Vec::len);
                    if services == CALLS {
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        println!("control plane synced in {:?}", synced.elapsed());
        let (r, hwm) = rss(pid);
        println!("control plane RSS after the sync: {r:.0} MiB (high-water {hwm:.0} MiB)");

        // /live, throughout, on a thread of its own (blocking connects, so a busy runtime here
        // does not add to it).
        let (stop2, live2, failures2) = (stop.clone(), live.clone(), live_failures.clone());
        let _prober = std::thread::spawn(move || {
            use std::io::{Read, Write};
            while !stop2.load(Ordering::Relaxed) {
                let t = Instant::now();
                let ok = (|| -> std::io::Result<bool> {
                    let mut s =
                        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
                    s.set_read_timeout(Some(Duration::from_secs(10)))?;
                    s.write_all(b"GET /live HTTP/1.1\r\nhost: c\r\nconnection: close\r\n\r\n")?;
                    let mut out = Vec::new();
                    s.read_to_end(&mut out)?;
                    Ok(out.starts_with(b"HTTP/1.1 200"))
                })();
                if ok.unwrap_or(false) {
                    live2.lock().map(|mut l| l.push(t.elapsed())).ok();
                } else {
                    failures2.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });

        // 1,000 watchers, each with its first view.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for w in 0..WORKLOADS {
            tokio::spawn(watcher(addr, w, tx.clone()));
        }
        let mut first = vec![false; WORKLOADS];
        let mut have = 0;
        let t = Instant::now();
        while have < WORKLOADS {
            match tokio::time::timeout(Duration::from_secs(120), rx.recv()).await {
                Ok(Some((w, _))) if !first[w] => {
                    first[w] = true;
                    have += 1;
                }
                Ok(Some(_)) => {}
                _ => panic!("only {have} of {WORKLOADS} watchers got a first view"),
            }
        }
        println!("{WORKLOADS} watchers have their first view in {:?}", t.elapsed());
        let t = Instant::now();
        while waiting_watchers(addr).await < WORKLOADS && t.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // One change at a time: the watcher of the workload calling the changed service.
        let mut delays = Vec::new();
        let mut missed = 0;
        for n in 0..changes {
            let service = (n * 7919) % SERVICES;
            let workload = service / CALLS;
            while rx.try_recv().is_ok() {}
            let t0 = Instant::now();
            api.apply("endpointslices", slice(service, n + 1));
            let deadline = t0 + Duration::from_secs(30);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, rx.recv()).await {
                    Ok(Some((w, at))) if w == workload => {
                        delays.push(at - t0);
                        break;
                    }
                    Ok(Some(_)) => {}
                    _ => {
                        missed += 1;
                        break;
                    }
                }
            }
        }
        show("change to watcher (one endpoint changed)", &mut delays);
        println!("changes not seen within 30 s: {missed}");
        let (r, hwm) = rss(pid);
        println!("control plane RSS after the changes: {r:.0} MiB (high-water {hwm:.0} MiB)");

        // 10,000 idle watchers: long polls at the current version, 10 per workload.
        let before = rss(pid).0;
        let mut idle = Vec::with_capacity(IDLE);
        let mut version = String::new();
        if let Ok(mut conn) = TcpStream::connect(addr).await {
            if let Ok((200, body)) = exchange(&mut conn, "/v1/watch?workload=bench/w0").await {
                let view: Value = serde_json::from_slice(&body).unwrap_or_default();
                version = view["version"].as_str().unwrap_or_default().to_string();
            }
        }
        for i in 0..IDLE {
            let Ok(mut conn) = TcpStream::connect(addr).await else {
                continue;
            };
            let path = format!(
                "GET /v1/watch?workload=bench/w{}&version={version}&wait=300s HTTP/1.1\r\nhost: c\r\n\r\n",
                i % WORKLOADS
            );
            if conn.write_all(path.as_bytes()).await.is_ok() {
                idle.push(conn);
            }
        }
        let t = Instant::now();
        let mut waiting = 0;
        while t.elapsed() < Duration::from_secs(120) {
            waiting = waiting_watchers(addr).await;
            if waiting >= WORKLOADS + idle.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (r, hwm) = rss(pid);
        println!(
            "{} idle watchers open ({waiting} waiting): control plane RSS {r:.0} MiB (+{:.0} MiB, high-water {hwm:.0} MiB)",
            idle.len(),
            r - before
        );
        drop(idle);
    });
    stop.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(100));
    let mut samples = live.lock().map(|l| l.clone()).unwrap_or_default();
    show("/live (new connection each)", &mut samples);
    println!("/live failures: {}", live_failures.load(Ordering::Relaxed));
    drop(control);
    drop(rt);
    let _ = std::fs::remove_dir_all(&dir);
}
