//! Proxy metrics, registered on a [`prometheus::Registry`] passed in at construction (no globals).
//!
//! Every label value is bounded: direction, protocol, status class, detection outcome, error
//! reason. Handles for each label combination are resolved once, at construction, so the request
//! path only does atomic increments (no label lookups, no `format!`).

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::detect::Outcome;
use crate::errors::Reason;

/// Which way traffic flows through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Arriving at the pod, towards the app.
    Inbound,
    /// From the app, towards other services.
    Outbound,
    /// Local mode: the outbound stack behind a `--forward` listener, counted apart.
    Forward,
}

impl Direction {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
            Direction::Forward => "forward",
        }
    }
}

/// Latency buckets in seconds: 250 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Status classes, indexed by `status / 100 - 1`.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// All metric families; one per proxy.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Inbound handles.
    pub inbound: DirectionMetrics,
    /// Outbound handles.
    pub outbound: DirectionMetrics,
    /// Local-mode handles.
    pub forward: DirectionMetrics,
    /// Upstream connections opened (all directions): low when pools are reused.
    pub upstream_connects: IntCounter,
    /// Outbound per-destination stacks alive now (built once, shared by every connection).
    pub destinations: IntGauge,
    /// Outbound per-destination stacks built since start.
    pub destination_builds: IntCounter,
    /// Inbound peers: identities and refusals.
    pub peers: PeerMetrics,
}

/// Pre-resolved handles for one direction.
#[derive(Debug, Clone)]
pub struct DirectionMetrics {
    /// HTTP requests received, by protocol (index 0: HTTP/1, 1: HTTP/2).
    pub requests: [IntCounter; 2],
    /// HTTP responses sent, by status class.
    pub responses: [IntCounter; 5],
    /// Requests that ended without a response (the client cancelled them).
    pub cancelled: IntCounter,
    /// Time from request received to response headers sent.
    pub latency: Histogram,
    /// TCP connections accepted.
    pub tcp_open: IntCounter,
    /// TCP connections closed.
    pub tcp_close: IntCounter,
    /// Connections open now.
    pub tcp_open_now: IntGauge,
    /// Bytes received from the downstream peer.
    pub tcp_received: IntCounter,
    /// Bytes sent to the downstream peer.
    pub tcp_sent: IntCounter,
    /// Detection outcomes, indexed like `detect::Outcome::ALL`.
    pub detect: [IntCounter; 6],
    /// Connections refused because they would loop back into the proxy.
    pub loop_refused: IntCounter,
    /// Times a listener stopped accepting because `--max-connections` were open.
    pub limit_reached: IntCounter,
    /// Locally generated errors, indexed like `errors::Reason::ALL`.
    pub errors: Vec<IntCounter>,
    /// Mutual TLS handshakes (outbound: originated; inbound: terminated).
    pub handshakes: Handshakes,
}

/// Mutual TLS handshakes of one direction, by result.
#[derive(Debug, Clone)]
pub struct Handshakes {
    /// Full handshakes.
    pub full: IntCounter,
    /// Resumed sessions.
    pub resumed: IntCounter,
    /// Failed handshakes.
    pub failed: IntCounter,
}

/// Distinct client identities labelled before the rest are counted as `other` (identities come
/// from verified mesh certificates, so this only guards memory).
const MAX_CLIENT_IDS: usize = 1000;

/// Inbound connections by the client's verified identity, and refusals by reason.
#[derive(Debug, Clone)]
pub struct PeerMetrics {
    clients: IntCounterVec,
    seen: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    denied: IntCounterVec,
}

impl PeerMetrics {
    /// Counts a meshed connection from `identity`.
    pub fn client(&self, identity: &str) {
        let known = match self.seen.lock() {
            Ok(mut seen) => {
                seen.contains(identity)
                    || (seen.len() < MAX_CLIENT_IDS && seen.insert(identity.to_string()))
            }
            Err(_) => false,
        };
        let label = if known { identity } else { "other" };
        self.clients.with_label_values(&[label]).inc();
    }

    /// Counts a refusal by the authorization policy (`rule` is a bounded rule name).
    pub fn denied(&self, rule: &'static str) {
        self.denied.with_label_values(&[rule]).inc();
    }
}

impl Metrics {
    /// Registers every family on `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let requests = counter_vec(
            registry,
            "outrider_requests_total",
            "HTTP requests received",
            &["direction", "protocol"],
        )?;
        let responses = counter_vec(
            registry,
            "outrider_responses_total",
            "HTTP responses sent (status_class cancelled: the client gave up before the response)",
            &["direction", "status_class"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "outrider_request_duration_seconds",
                "Time from request received to response headers sent",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["direction"],
        )?;
        registry.register(Box::new(latency.clone()))?;
        let tcp_open = counter_vec(
            registry,
            "outrider_tcp_open_total",
            "TCP connections accepted",
            &["direction"],
        )?;
        let tcp_close = counter_vec(
            registry,
            "outrider_tcp_close_total",
            "TCP connections closed",
            &["direction"],
        )?;
        let open_now = IntGaugeVec::new(
            Opts::new("outrider_tcp_open_connections", "TCP connections open now"),
            &["direction"],
        )?;
        registry.register(Box::new(open_now.clone()))?;
        let received = counter_vec(
            registry,
            "outrider_tcp_received_bytes_total",
            "Bytes received from the downstream peer",
            &["direction"],
        )?;
        let sent = counter_vec(
            registry,
            "outrider_tcp_sent_bytes_total",
            "Bytes sent to the downstream peer",
            &["direction"],
        )?;
        let detect = counter_vec(
            registry,
            "outrider_detect_total",
            "Protocol detection outcomes (timeout: the client sent nothing in time)",
            &["direction", "outcome"],
        )?;
        let loops = counter_vec(
            registry,
            "outrider_loop_refused_total",
            "Connections refused because their target is the proxy itself",
            &["direction"],
        )?;
        let limit = counter_vec(
            registry,
            "outrider_connection_limit_reached_total",
            "Times a listener stopped accepting because --max-connections connections were open",
            &["direction"],
        )?;
        let errors = counter_vec(
            registry,
            "outrider_errors_total",
            "Locally generated error responses and failed connections",
            &["direction", "reason"],
        )?;
        let handshakes = counter_vec(
            registry,
            "outrider_tls_handshakes_total",
            "Mutual TLS handshakes between sidecars (outbound: originated, inbound: terminated), by result (full, resumed, failed)",
            &["direction", "result"],
        )?;

        let per = |d: Direction| {
            let d = d.as_str();
            DirectionMetrics {
                requests: [
                    requests.with_label_values(&[d, "http1"]),
                    requests.with_label_values(&[d, "http2"]),
                ],
                responses: CLASSES.map(|c| responses.with_label_values(&[d, c])),
                cancelled: responses.with_label_values(&[d, "cancelled"]),
                latency: latency.with_label_values(&[d]),
                tcp_open: tcp_open.with_label_values(&[d]),
                tcp_close: tcp_close.with_label_values(&[d]),
                tcp_open_now: open_now.with_label_values(&[d]),
                tcp_received: received.with_label_values(&[d]),
                tcp_sent: sent.with_label_values(&[d]),
                detect: Outcome::ALL.map(|o| detect.with_label_values(&[d, o.as_str()])),
                loop_refused: loops.with_label_values(&[d]),
                limit_reached: limit.with_label_values(&[d]),
                errors: Reason::ALL
                    .iter()
                    .map(|r| errors.with_label_values(&[d, r.as_str()]))
                    .collect(),
                handshakes: Handshakes {
                    full: handshakes.with_label_values(&[d, "full"]),
                    resumed: handshakes.with_label_values(&[d, "resumed"]),
                    failed: handshakes.with_label_values(&[d, "failed"]),
                },
            }
        };
        let upstream_connects = IntCounter::new(
            "outrider_upstream_connects_total",
            "Upstream TCP connections opened (HTTP pools and opaque streams); low when pools are reused",
        )?;
        registry.register(Box::new(upstream_connects.clone()))?;
        let destinations = IntGauge::new(
            "outrider_outbound_destinations",
            "Outbound per-destination stacks alive (each built once and shared by every connection)",
        )?;
        registry.register(Box::new(destinations.clone()))?;
        let destination_builds = IntCounter::new(
            "outrider_outbound_destination_builds_total",
            "Outbound per-destination stacks built since start",
        )?;
        registry.register(Box::new(destination_builds.clone()))?;
        let peers = PeerMetrics {
            clients: counter_vec(
                registry,
                "outrider_inbound_mesh_connections_total",
                "Inbound mutual TLS connections, by the client's verified SPIFFE identity",
                &["client_id"],
            )?,
            seen: Default::default(),
            denied: counter_vec(
                registry,
                "outrider_authz_denied_total",
                "Inbound requests and connections refused by the port's policy, by rule",
                &["rule"],
            )?,
        };
        Ok(Metrics {
            peers,
            upstream_connects,
            destinations,
            destination_builds,
            inbound: per(Direction::Inbound),
            outbound: per(Direction::Outbound),
            forward: per(Direction::Forward),
        })
    }

    /// The handles of one direction.
    pub fn direction(&self, d: Direction) -> &DirectionMetrics {
        match d {
            Direction::Inbound => &self.inbound,
            Direction::Outbound => &self.outbound,
            Direction::Forward => &self.forward,
        }
    }
}

impl DirectionMetrics {
    /// Counts a response by status class.
    pub fn response(&self, status: http::StatusCode) {
        let i = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.responses[i].inc();
    }

    /// Counts a detection outcome.
    pub fn detected(&self, outcome: Outcome) {
        if let Some(i) = Outcome::ALL.iter().position(|o| *o == outcome) {
            self.detect[i].inc();
        }
    }

    /// Counts a locally generated error.
    pub fn error(&self, reason: Reason) {
        if let Some(c) = self.errors.get(reason as usize) {
            c.inc();
        }
    }
}

/// Registers a counter family with `labels`.
pub(crate) fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let v = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(v.clone()))?;
    Ok(v)
}

/// Registers a gauge family with `labels`.
pub(crate) fn gauge_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    let v = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(v.clone()))?;
    Ok(v)
}

/// The sum of the samples of `family` (counters and gauges) whose labels include every
/// `(name, value)` of `labels`, read from `registry`: for in-process readers such as the demo's
/// summary and the tests.
pub fn sum(registry: &Registry, family: &str, labels: &[(&str, &str)]) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == family)
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .map(|m| m.get_counter().get_value() + m.get_gauge().get_value())
        .sum()
}
