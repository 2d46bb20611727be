//! Metrics of the outbound resilience layers: balancing, retries, breakers, shedding.
//!
//! Labels are bounded by discovery: `service` is a service's `namespace/name` and `endpoint` an
//! address the view names, never anything a request carries. Passthrough destinations (addresses
//! the app chose) get no per-service or per-endpoint series. Handles are resolved when a service
//! or endpoint appears, so the request path only touches atomics, and the series are removed when
//! the last destination or endpoint that uses them goes away.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Registry,
};

use crate::metrics::{counter_vec, gauge_vec};

use super::endpoint::BreakerState;
use crate::layers::retry::Skipped;

/// Latency buckets in seconds: 250 µs to 10 s (as the request metrics').
const LATENCY_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

const SKIPPED: [Skipped; 4] = [
    Skipped::Budget,
    Skipped::BodyTooLarge,
    Skipped::NonIdempotent,
    Skipped::Attempts,
];

fn skipped_label(why: Skipped) -> &'static str {
    match why {
        Skipped::Budget => "budget",
        Skipped::BodyTooLarge => "body-too-large",
        Skipped::NonIdempotent => "non-idempotent",
        Skipped::Attempts => "attempts",
    }
}

/// Why the balancer answered a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// Every endpoint (or the service) had as many requests in flight as it may.
    Overloaded = 0,
    /// Every endpoint's breaker was open.
    CircuitOpen = 1,
}

/// The metric families (one set per proxy).
#[derive(Debug, Clone)]
pub struct ResilienceMetrics {
    retries: IntCounterVec,
    skipped: IntCounterVec,
    shed: IntCounterVec,
    endpoints: IntGaugeVec,
    breaker_state: IntGaugeVec,
    transitions: IntCounterVec,
    latency: HistogramVec,
    services: Arc<Mutex<HashMap<String, Weak<ServiceMetrics>>>>,
}

impl ResilienceMetrics {
    /// Registers the families on `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "outrider_endpoint_response_latency_seconds",
                "Outbound: time from a request sent to an endpoint to its response headers",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["service", "endpoint"],
        )?;
        registry.register(Box::new(latency.clone()))?;
        Ok(Self {
            retries: counter_vec(
                registry,
                "outrider_retries_total",
                "Outbound: retries sent",
                &["service"],
            )?,
            skipped: counter_vec(
                registry,
                "outrider_retries_skipped_total",
                "Outbound: retryable outcomes not retried, by reason",
                &["service", "reason"],
            )?,
            shed: counter_vec(
                registry,
                "outrider_requests_shed_total",
                "Outbound: requests answered at once because no endpoint could take them",
                &["service", "reason"],
            )?,
            endpoints: gauge_vec(
                registry,
                "outrider_balancer_endpoints",
                "Outbound: a service's endpoints, ready (breaker closed) or not",
                &["service", "state"],
            )?,
            breaker_state: gauge_vec(
                registry,
                "outrider_breaker_state",
                "Outbound: an endpoint's breaker (0 closed, 1 open, 2 half-open)",
                &["service", "endpoint"],
            )?,
            transitions: counter_vec(
                registry,
                "outrider_breaker_transitions_total",
                "Outbound: breaker state changes, by the state entered",
                &["service", "endpoint", "to"],
            )?,
            latency,
            services: Arc::default(),
        })
    }

    /// The handles of service `id` (shared by every destination that resolves to it).
    pub fn service(&self, id: &str) -> Arc<ServiceMetrics> {
        let mut services = match self.services.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(s) = services.get(id).and_then(Weak::upgrade) {
            return s;
        }
        services.retain(|_, s| s.strong_count() > 0);
        let s = Arc::new(ServiceMetrics {
            retries: self.retries.with_label_values(&[id]),
            skipped: SKIPPED.map(|r| self.skipped.with_label_values(&[id, skipped_label(r)])),
            shed: [
                self.shed.with_label_values(&[id, "overloaded"]),
                self.shed.with_label_values(&[id, "circuit-open"]),
            ],
            ready: self.endpoints.with_label_values(&[id, "ready"]),
            unready: self.endpoints.with_label_values(&[id, "unready"]),
            id: id.to_string(),
            families: self.clone(),
        });
        services.insert(id.to_string(), Arc::downgrade(&s));
        s
    }
}

/// One service's handles.
#[derive(Debug)]
pub struct ServiceMetrics {
    id: String,
    retries: IntCounter,
    skipped: [IntCounter; 4],
    shed: [IntCounter; 2],
    ready: IntGauge,
    unready: IntGauge,
    families: ResilienceMetrics,
}

impl ServiceMetrics {
    /// Counts a retry sent.
    pub fn retried(&self) {
        self.retries.inc();
    }

    /// Counts a retry not sent.
    pub fn skipped(&self, why: Skipped) {
        self.skipped[why as usize].inc();
    }

    /// Counts a request shed.
    pub fn shed(&self, why: Shed) {
        self.shed[why as usize].inc();
    }

    /// The handles of one endpoint of the service (counted ready until its breaker opens).
    pub fn endpoint(self: &Arc<Self>, addr: SocketAddr) -> EndpointMetrics {
        let endpoint = addr.to_string();
        let f = &self.families;
        let labels = [self.id.as_str(), endpoint.as_str()];
        let to = |s: BreakerState| {
            f.transitions
                .with_label_values(&[self.id.as_str(), endpoint.as_str(), s.as_str()])
        };
        self.ready.inc();
        EndpointMetrics {
            latency: f.latency.with_label_values(&labels),
            state: f.breaker_state.with_label_values(&labels),
            to: [
                to(BreakerState::Closed),
                to(BreakerState::Open),
                to(BreakerState::HalfOpen),
            ],
            service: self.clone(),
            endpoint,
        }
    }
}

impl Drop for ServiceMetrics {
    fn drop(&mut self) {
        let f = &self.families;
        let id = self.id.as_str();
        let _ = f.retries.remove_label_values(&[id]);
        for r in SKIPPED {
            let _ = f.skipped.remove_label_values(&[id, skipped_label(r)]);
        }
        for r in ["overloaded", "circuit-open"] {
            let _ = f.shed.remove_label_values(&[id, r]);
        }
        for s in ["ready", "unready"] {
            let _ = f.endpoints.remove_label_values(&[id, s]);
        }
    }
}

/// One endpoint's handles.
#[derive(Debug)]
pub struct EndpointMetrics {
    /// Response latency of requests sent to it.
    pub latency: Histogram,
    state: IntGauge,
    to: [IntCounter; 3],
    service: Arc<ServiceMetrics>,
    endpoint: String,
}

impl EndpointMetrics {
    /// Records a breaker transition into `to`.
    pub fn breaker(&self, to: BreakerState) {
        let was = self.state.get();
        self.state.set(to as i64);
        self.to[to as usize].inc();
        let (was_ready, is_ready) = (was == 0, to == BreakerState::Closed);
        if was_ready && !is_ready {
            self.service.ready.dec();
            self.service.unready.inc();
        } else if !was_ready && is_ready {
            self.service.unready.dec();
            self.service.ready.inc();
        }
    }

    /// Removes the endpoint's series (it left discovery).
    pub fn remove(&self) {
        if self.state.get() == 0 {
            self.service.ready.dec();
        } else {
            self.service.unready.dec();
        }
        let f = &self.service.families;
        let labels = [self.service.id.as_str(), self.endpoint.as_str()];
        let _ = f.latency.remove_label_values(&labels);
        let _ = f.breaker_state.remove_label_values(&labels);
        for s in [
            BreakerState::Closed,
            BreakerState::Open,
            BreakerState::HalfOpen,
        ] {
            let _ = f
                .transitions
                .remove_label_values(&[labels[0], labels[1], s.as_str()]);
        }
    }
}
