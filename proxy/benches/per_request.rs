//! The per-request and per-connection pieces of the data plane, each on its own: protocol
//! detection, the request-header handling before forwarding, the metrics a request records, the
//! inbound authorization decision, and a mutual TLS handshake between two sidecars' real rustls
//! configurations, in memory (full and resumed). Endpoint pick: `benches/balancer.rs`.
//!
//! `cargo bench -p outrider-proxy --features test-util --bench per_request` (or
//! `benches/run micro`). Bench targets are built only by `cargo bench` (and clippy's
//! `--all-targets`), never by `cargo test`.

// criterion's macros generate undocumented public functions.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use outrider_control::api::Identity;
use outrider_proxy::identity::store::Leaf;
use outrider_proxy::identity::testing::TestCa;
use outrider_proxy::identity::{Alpn, IdentityStore};
use outrider_proxy::metrics::{Direction, Metrics};
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, Connection, ServerConnection};

const H1_GET: &[u8] = b"GET /api/v1/orders/42 HTTP/1.1\r\nHost: orders.demo.svc:8080\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n";
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00";
// The first bytes of a TLS 1.3 ClientHello record.
const TLS_HELLO: &[u8] =
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03abcdefghijklmnopqrstuvwxyz012345";

fn detection(c: &mut Criterion) {
    let mut group = c.benchmark_group("detect");
    for (name, bytes) in [
        ("http1", H1_GET),
        ("h2_preface", H2_PREFACE),
        ("tls", TLS_HELLO),
    ] {
        group.bench_with_input(BenchmarkId::from_parameter(name), bytes, |b, bytes| {
            b.iter(|| black_box(outrider_proxy::fuzzing::detect(black_box(bytes), 1024)))
        });
    }
    group.finish();
}

/// A browser-like request: the forwarding checks and hop-by-hop removal (with the map built from
/// the received pairs, as hyper hands it over, and the fuzz entry point's own invariant checks).
fn headers(c: &mut Criterion) {
    let pairs: Vec<(&[u8], &[u8])> = vec![
        (b"host", b"orders.demo.svc:8080"),
        (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) bench"),
        (b"accept", b"application/json"),
        (b"accept-encoding", b"gzip, deflate, br"),
        (b"accept-language", b"en-GB,en;q=0.9"),
        (b"connection", b"keep-alive"),
        (b"keep-alive", b"timeout=5"),
        (b"x-request-id", b"0f8a3c1e-7b2d-4c55-9d0e-2a6b1c9e4f70"),
        (
            b"traceparent",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        (b"cookie", b"session=redacted"),
    ];
    c.bench_function("headers/normalize_10", |b| {
        b.iter(|| outrider_proxy::fuzzing::normalize_request_headers(black_box(&pairs), false))
    });
}

/// What the metrics layer records for one request (request by protocol, response by status
/// class, latency histogram), and an inbound connection's client identity.
fn metrics(c: &mut Criterion) {
    let registry = prometheus::Registry::new();
    let Ok(m) = Metrics::register(&registry) else {
        panic!("metrics register")
    };
    let out = m.direction(Direction::Outbound).clone();
    c.bench_function("metrics/request", |b| {
        b.iter(|| {
            out.requests[0].inc();
            out.response(black_box(http::StatusCode::OK));
            out.latency.observe(black_box(0.000_42));
        })
    });
    c.bench_function("metrics/inbound_client_identity", |b| {
        b.iter(|| {
            m.peers
                .client(black_box("spiffe://outrider.local/ns/demo/sa/web"))
        })
    });
}

fn store(ca: &TestCa, identity: &str) -> Arc<IdentityStore> {
    let store = IdentityStore::new();
    let Ok(leaf) = ca.leaf(identity, Duration::from_secs(3600)) else {
        panic!("leaf")
    };
    let Ok(leaf) = Leaf::from_pem(&leaf.chain_pem, leaf.key_der) else {
        panic!("load leaf")
    };
    store.set_leaf(leaf);
    if store.set_anchors(&ca.root_pem()).is_err() {
        panic!("anchors");
    }
    store
}

/// Moves what `from` has to send into `to`, and lets `to` process it.
fn pump(from: &mut Connection, to: &mut Connection, buf: &mut Vec<u8>) {
    buf.clear();
    while from.wants_write() {
        if from.write_tls(buf).is_err() {
            panic!("write_tls");
        }
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        if to.read_tls(&mut rd).is_err() || to.process_new_packets().is_err() {
            panic!("read_tls");
        }
    }
}

/// Drives one handshake between `client` and `server` through memory buffers (and delivers the
/// server's session ticket, which a resumption needs).
fn handshake(client: &mut Connection, server: &mut Connection) {
    let mut buf = Vec::with_capacity(4096);
    for _ in 0..16 {
        if !client.is_handshaking() && !server.is_handshaking() {
            return;
        }
        pump(client, server, &mut buf);
        pump(server, client, &mut buf);
    }
    panic!("the handshake did not finish");
}

/// A client and a server connection with these configurations.
fn pair(
    client: &Arc<rustls::ClientConfig>,
    server: &Arc<rustls::ServerConfig>,
    name: &ServerName<'static>,
) -> (Connection, Connection) {
    let (Ok(cl), Ok(sv)) = (
        ClientConnection::new(client.clone(), name.clone()),
        ServerConnection::new(server.clone()),
    ) else {
        panic!("connections")
    };
    (cl.into(), sv.into())
}

/// A sidecar-to-sidecar mutual TLS 1.3 handshake with the proxies' own configurations (SPIFFE
/// identity checks both ways, P-256 leaves from one root): full, and resumed from the client's
/// session cache.
fn tls(c: &mut Criterion) {
    let Ok(ca) = TestCa::new("bench root") else {
        panic!("ca")
    };
    let client_store = store(&ca, "spiffe://outrider.local/ns/demo/sa/web");
    let server_store = store(&ca, "spiffe://outrider.local/ns/demo/sa/api");
    let Ok(peer) = "spiffe://outrider.local/ns/demo/sa/api".parse::<Identity>() else {
        panic!("identity")
    };
    let (Some(client_cfg), Some(server_cfg)) = (
        client_store.client_config(&peer, Alpn::H2),
        server_store.server_config(),
    ) else {
        panic!("configs")
    };
    let mut full_cfg = (*client_cfg).clone();
    full_cfg.resumption = rustls::client::Resumption::disabled();
    let full_cfg = Arc::new(full_cfg);
    let name = ServerName::try_from("api.demo.outrider.local").unwrap_or_else(|_| panic!("name"));
    // Each variant does what its name says (checked once, before measuring).
    for (cfg, want) in [
        (&full_cfg, rustls::HandshakeKind::Full),
        (&client_cfg, rustls::HandshakeKind::Resumed),
    ] {
        let mut kind = None;
        for _ in 0..2 {
            let (mut cl, mut sv) = pair(cfg, &server_cfg, &name);
            handshake(&mut cl, &mut sv);
            kind = cl.handshake_kind();
        }
        assert_eq!(kind, Some(want), "the second handshake");
    }
    let mut group = c.benchmark_group("tls_handshake");
    for (label, cfg) in [("full", full_cfg), ("resumed", client_cfg)] {
        group.bench_function(label, |b| {
            b.iter(|| {
                let (mut cl, mut sv) = pair(&cfg, &server_cfg, &name);
                handshake(&mut cl, &mut sv);
                black_box(sv.alpn_protocol().map(<[u8]>::len))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, detection, headers, metrics, tls);
criterion_main!(benches);
