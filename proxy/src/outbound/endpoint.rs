//! The endpoint: one address of a destination, as the balancer sees it, with the state that must
//! outlive every discovery update (a weight change keeps it; only a new identity makes a new one).
//!
//! ```text
//! Balance (pick) → Endpoint: readiness (in-flight bound, breaker) → Track (load, outcome)
//!                → Forward (client) → connect → mutual TLS
//! ```
//!
//! - **Load** is peak-EWMA: a latency estimate that jumps to any slower sample and otherwise decays
//!   towards recent samples (and towards zero while idle, so a slow endpoint is tried again),
//!   multiplied by the requests in flight plus one. Everything is an atomic: a pick reads two
//!   endpoints without a lock, and concurrent updates can at worst lose one sample.
//! - **Readiness** is honest: an endpoint with [`Limits::per_endpoint`] requests in flight, or
//!   whose breaker is open (or half-open with its probe out), is not ready, and the balancer skips
//!   it. The bound also caps what can wait inside one multiplexed HTTP/2 connection behind the
//!   peer's stream limit.
//! - **The breaker** ([`Breaker`]) opens after N consecutive failures (a 5xx, a connect, TLS or
//!   upstream failure, a request still in flight at its route timeout; never the proxy's own
//!   overload), stays open for a jittered, exponentially growing time (at most 60 s), lets one
//!   probe through when half-open, and closes when the probe succeeds.
//!
//! [`Track`] wraps the response future of one request (or the life of one opaque connection): it
//! holds the in-flight counts and records the outcome when the response headers arrive, or when
//! it is dropped without one.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Response;
use tokio::time::Instant;

use super::metrics::EndpointMetrics;
use crate::errors::{reason_of, BoxError, ResponseBody, Side};
use crate::http::client::Upstream;
use crate::layers::retry::ServedBy;

/// The latency an endpoint is assumed to have before its first response.
const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// How fast old latency samples lose weight (the EWMA's time constant). Shorter than linkerd's
/// 10 s: a peak is believed at once, so with 10 s one slow request (a long poll, a report, a
/// scheduling hiccup on a busy node) kept an endpoint out of rotation for most of a minute while
/// its estimate decayed; with 2 s it is back within seconds, and a really slow endpoint is found
/// again by its next sample.
const DECAY: Duration = Duration::from_secs(2);

/// The longest a breaker stays open.
pub(crate) const MAX_OPEN: Duration = Duration::from_secs(60);

pub(crate) use crate::config::Limits;

/// A service's breaker settings (from discovery).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BreakerParams {
    /// Consecutive failures that open the breaker.
    pub consecutive_failures: u32,
    /// How long it stays open the first time (doubled per failed probe, at most [`MAX_OPEN`]).
    pub open_for: Duration,
}

impl From<&outrider_control::api::Breaker> for BreakerParams {
    fn from(b: &outrider_control::api::Breaker) -> Self {
        Self {
            consecutive_failures: b.consecutive_failures.max(1),
            open_for: Duration::from_millis(b.open_ms.max(1)),
        }
    }
}

/// A breaker's state (the glossary's: closed = flowing, open = rejecting, half-open = probing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow.
    Closed = 0,
    /// Requests are refused until the open time passes.
    Open = 1,
    /// One probe request is out; the rest are refused until it answers.
    HalfOpen = 2,
}

impl BreakerState {
    /// The label value (also shown on `/endpoints`).
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }
}

/// Whether an endpoint can take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Readiness {
    /// It can.
    Ready,
    /// Its breaker is open and its open time has passed: the next request is its probe.
    Probe,
    /// It has as many requests in flight as it may.
    Full,
    /// Its breaker is open (or half-open with the probe out).
    Open,
}

/// A per-endpoint circuit breaker: all atomics.
#[derive(Debug, Default)]
pub(crate) struct Breaker {
    state: AtomicU8,
    failures: AtomicU32,
    /// Times opened in a row without closing (the backoff exponent).
    opens: AtomicU32,
    /// When an open breaker may probe, in nanoseconds since the endpoint's birth.
    until_ns: AtomicU64,
}

impl Breaker {
    /// The current state.
    pub(crate) fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.state.load(Ordering::Acquire))
    }
}

/// One endpoint of a destination: see the module docs.
#[derive(Debug)]
pub(crate) struct Endpoint {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Its connections, shared with every destination that names the same endpoint.
    pub upstream: Arc<Upstream>,
    born: Instant,
    pending: AtomicUsize,
    /// The peak-EWMA estimate in nanoseconds (`f64` bits) and when it was last updated.
    rtt_ns: AtomicU64,
    rtt_at_ns: AtomicU64,
    breaker: Breaker,
    metrics: Option<EndpointMetrics>,
}

impl Endpoint {
    /// A new endpoint at `addr`, reached through `upstream`, counting into `metrics` (service
    /// endpoints from discovery; none for a passthrough).
    pub(crate) fn new(
        addr: SocketAddr,
        upstream: Arc<Upstream>,
        metrics: Option<EndpointMetrics>,
    ) -> Self {
        Self {
            addr,
            upstream,
            born: Instant::now(),
            pending: AtomicUsize::new(0),
            rtt_ns: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            rtt_at_ns: AtomicU64::new(0),
            breaker: Breaker::default(),
            metrics,
        }
    }

    fn ns(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.born).as_nanos() as u64
    }

    /// Requests (or opaque connections) in flight now.
    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// The breaker's state.
    pub(crate) fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// The latency estimate at `now` (decayed since the last sample).
    pub(crate) fn rtt(&self, now: Instant) -> Duration {
        Duration::from_nanos(self.rtt_now(self.ns(now)) as u64)
    }

    fn rtt_now(&self, now_ns: u64) -> f64 {
        let rtt = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        let elapsed = now_ns.saturating_sub(self.rtt_at_ns.load(Ordering::Relaxed));
        rtt * decay(elapsed)
    }

    /// The load the balancer compares: the latency estimate times the requests in flight plus
    /// one, divided by the weight discovery gives the endpoint.
    pub(crate) fn cost(&self, now: Instant, weight: u32) -> f64 {
        let pending = self.pending() as f64 + 1.0;
        // An estimate that decayed to nothing still ranks endpoints by their requests in flight.
        let rtt = self.rtt_now(self.ns(now)).max(1.0);
        rtt * pending / f64::from(weight.max(1))
    }

    /// Sets the latency estimate (a new endpoint of a service that has others).
    pub(crate) fn seed_rtt(&self, rtt: Duration, now: Instant) {
        self.rtt_ns
            .store((rtt.as_nanos() as f64).to_bits(), Ordering::Relaxed);
        self.rtt_at_ns.store(self.ns(now), Ordering::Relaxed);
    }

    /// Folds one latency sample into the estimate.
    fn observe(&self, rtt: Duration, now: Instant) {
        let now_ns = self.ns(now);
        let sample = rtt.as_nanos() as f64;
        let current = self.rtt_now(now_ns);
        let next = if sample > current {
            // Peak: a slower sample is believed at once.
            sample
        } else {
            let d = decay(now_ns.saturating_sub(self.rtt_at_ns.load(Ordering::Relaxed)));
            f64::from_bits(self.rtt_ns.load(Ordering::Relaxed)) * d + sample * (1.0 - d)
        };
        self.rtt_ns.store(next.to_bits(), Ordering::Relaxed);
        self.rtt_at_ns.store(now_ns, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.latency.observe(rtt.as_secs_f64());
        }
    }

    /// Whether the endpoint can take a request at `now` (the in-flight bound applies to
    /// requests, `bounded`; opaque connections only count as load).
    pub(crate) fn readiness(&self, now: Instant, limit: usize, bounded: bool) -> Readiness {
        match self.breaker.state() {
            BreakerState::Closed => {}
            BreakerState::HalfOpen => return Readiness::Open,
            BreakerState::Open => {
                let until = self.breaker.until_ns.load(Ordering::Acquire);
                if self.ns(now) < until {
                    return Readiness::Open;
                }
                return Readiness::Probe;
            }
        }
        if bounded && self.pending() >= limit {
            return Readiness::Full;
        }
        Readiness::Ready
    }

    /// Claims the probe of an open breaker whose time has passed; `false` if another request
    /// claimed it first.
    pub(crate) fn claim_probe(&self) -> bool {
        let claimed = self
            .breaker
            .state
            .compare_exchange(
                BreakerState::Open as u8,
                BreakerState::HalfOpen as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if claimed {
            tracing::info!(endpoint = %self.addr, "circuit breaker half-open: probing");
            self.transition(BreakerState::HalfOpen, None);
        }
        claimed
    }

    /// Starts tracking one request (or opaque connection) sent to this endpoint.
    pub(crate) fn track(
        self: &Arc<Self>,
        service: Option<Arc<ServiceLoad>>,
        breaker: Option<BreakerParams>,
        timeout: Option<Duration>,
        probe: bool,
    ) -> InFlight {
        self.pending.fetch_add(1, Ordering::Relaxed);
        if let Some(s) = &service {
            s.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        InFlight {
            endpoint: self.clone(),
            service,
            breaker,
            timeout,
            probe,
            started: Instant::now(),
            done: false,
        }
    }

    fn record(&self, failed: bool, params: Option<BreakerParams>, probe: bool) {
        let Some(params) = params else { return };
        if !failed {
            self.breaker.failures.store(0, Ordering::Relaxed);
            if probe
                && self
                    .breaker
                    .state
                    .compare_exchange(
                        BreakerState::HalfOpen as u8,
                        BreakerState::Closed as u8,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_ok()
            {
                self.breaker.opens.store(0, Ordering::Relaxed);
                self.transition(BreakerState::Closed, Some("the probe succeeded"));
            }
            return;
        }
        if probe {
            // The probe failed: open again, for longer.
            self.open(params, BreakerState::HalfOpen, "the probe failed");
            return;
        }
        let failures = self.breaker.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= params.consecutive_failures {
            self.open(params, BreakerState::Closed, "consecutive failures");
        }
    }

    /// Opens the breaker from state `from` (if it is still in it).
    fn open(&self, params: BreakerParams, from: BreakerState, why: &'static str) {
        let opens = self.breaker.opens.load(Ordering::Relaxed);
        let open_for = open_time(params.open_for, opens);
        let until = self.ns(Instant::now()) + open_for.as_nanos() as u64;
        // Publish the deadline before the state, so a reader that sees Open sees its deadline.
        self.breaker.until_ns.store(until, Ordering::Release);
        if self
            .breaker
            .state
            .compare_exchange(
                from as u8,
                BreakerState::Open as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            self.breaker.opens.fetch_add(1, Ordering::Relaxed);
            self.breaker.failures.store(0, Ordering::Relaxed);
            tracing::info!(endpoint = %self.addr, open_for = ?open_for, why, "circuit breaker opened");
            self.transition(BreakerState::Open, None);
        }
    }

    /// A probe that ended without an outcome (cancelled, or not sent): let the next request
    /// probe.
    pub(crate) fn abandon_probe(&self) {
        self.breaker.until_ns.store(0, Ordering::Release);
        let _ = self.breaker.state.compare_exchange(
            BreakerState::HalfOpen as u8,
            BreakerState::Open as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    fn transition(&self, to: BreakerState, why: Option<&'static str>) {
        if let Some(why) = why {
            tracing::info!(endpoint = %self.addr, why, "circuit breaker closed");
        }
        if let Some(m) = &self.metrics {
            m.breaker(to);
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Some(m) = &self.metrics {
            m.remove();
        }
    }
}

/// `exp(-elapsed / DECAY)`.
fn decay(elapsed_ns: u64) -> f64 {
    (-(elapsed_ns as f64) / DECAY.as_nanos() as f64).exp()
}

/// How long a breaker opened `opens` times in a row stays open: `open_for` doubled per earlier
/// opening, at most [`MAX_OPEN`], with up to a quarter more at random so that proxies that saw the
/// same failures do not all probe at once.
fn open_time(open_for: Duration, opens: u32) -> Duration {
    let base = open_for.saturating_mul(1u32 << opens.min(16)).min(MAX_OPEN);
    let jitter = base.mul_f64(fastrand::f64() * 0.25);
    (base + jitter).min(MAX_OPEN)
}

/// Requests in flight to one service (all its endpoints), shared by its destination's requests.
#[derive(Debug, Default)]
pub(crate) struct ServiceLoad {
    in_flight: AtomicUsize,
}

impl ServiceLoad {
    /// Requests in flight to the service now.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// One request (or opaque connection) in flight to an endpoint: releases its counts when dropped,
/// and records the outcome (once).
#[derive(Debug)]
pub(crate) struct InFlight {
    endpoint: Arc<Endpoint>,
    service: Option<Arc<ServiceLoad>>,
    breaker: Option<BreakerParams>,
    timeout: Option<Duration>,
    probe: bool,
    started: Instant,
    done: bool,
}

impl InFlight {
    /// Moves the start back (tests of latency estimates).
    #[cfg(test)]
    pub fn set_started(&mut self, at: Instant) {
        self.started = at;
    }

    /// Records a response head: its latency, and a 5xx as a failure.
    pub(crate) fn response(&mut self, status: http::StatusCode) {
        self.finish(status.is_server_error(), true);
    }

    /// Records an error: a failure when the upstream side caused it.
    pub(crate) fn error(&mut self, error: &(dyn std::error::Error + 'static)) {
        let reason = reason_of(error);
        if reason.side() == Side::Upstream {
            self.finish(true, false);
        } else {
            // Neither success nor failure (the client's or the proxy's own doing); a probe that
            // learned nothing is given back.
            self.done = true;
            if self.probe {
                self.endpoint.abandon_probe();
            }
        }
    }

    /// Records a successful opaque connect (its latency) or a failed one.
    pub(crate) fn connected(&mut self, ok: bool) {
        self.finish(!ok, ok);
    }

    fn finish(&mut self, failed: bool, sample: bool) {
        if self.done {
            return;
        }
        self.done = true;
        let now = Instant::now();
        if sample {
            self.endpoint
                .observe(now.saturating_duration_since(self.started), now);
        }
        self.endpoint.record(failed, self.breaker, self.probe);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.pending.fetch_sub(1, Ordering::Relaxed);
        if let Some(s) = &self.service {
            s.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        if !self.done {
            // Dropped before an answer: past its route timeout it counts as the endpoint's
            // failure (the request timed out there); earlier, the client went away.
            let timed_out = self.timeout.is_some_and(|t| self.started.elapsed() >= t);
            if timed_out {
                self.finish(true, true);
            } else if self.probe {
                self.endpoint.abandon_probe();
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A request's response future, tracked: see [`InFlight`].
    pub struct Track<F> {
        #[pin]
        inner: F,
        in_flight: Option<InFlight>,
        served: Option<ServedBy>,
    }
}

impl<F> Track<F> {
    /// Tracks `inner` with `in_flight`; a response gets `served` as an extension (requests that
    /// may be retried).
    pub(crate) fn new(inner: F, in_flight: Option<InFlight>, served: Option<ServedBy>) -> Self {
        Self {
            inner,
            in_flight,
            served,
        }
    }
}

impl<F> Future for Track<F>
where
    F: Future<Output = Result<Response<ResponseBody>, BoxError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut result = std::task::ready!(this.inner.poll(cx));
        if let (Some(served), Ok(rsp)) = (this.served.take(), &mut result) {
            rsp.extensions_mut().insert(served);
        }
        if let Some(mut in_flight) = this.in_flight.take() {
            match &result {
                Ok(rsp) => in_flight.response(rsp.status()),
                Err(e) => in_flight.error(&**e),
            }
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Arc<Endpoint> {
        let registry = prometheus::Registry::new();
        let metrics = crate::metrics::Metrics::register(&registry).unwrap();
        let upstreams =
            crate::http::client::Upstreams::new(crate::transport::connect::Connect::new(
                Duration::from_secs(1),
                metrics.upstream_connects,
                10,
            ));
        let addr: SocketAddr = "198.18.0.1:80".parse().unwrap();
        let upstream = upstreams.get_or_insert(crate::http::client::EndpointKey::plain(addr));
        Arc::new(Endpoint::new(addr, upstream, None))
    }

    const PARAMS: BreakerParams = BreakerParams {
        consecutive_failures: 3,
        open_for: Duration::from_secs(1),
    };

    fn fail(e: &Arc<Endpoint>, probe: bool) {
        let mut f = e.track(None, Some(PARAMS), None, probe);
        f.response(http::StatusCode::SERVICE_UNAVAILABLE);
    }

    fn succeed(e: &Arc<Endpoint>, probe: bool) {
        let mut f = e.track(None, Some(PARAMS), None, probe);
        f.response(http::StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn the_breaker_opens_after_consecutive_failures_probes_once_and_closes() {
        let e = endpoint();
        let now = Instant::now;
        fail(&e, false);
        fail(&e, false);
        succeed(&e, false);
        fail(&e, false);
        fail(&e, false);
        assert_eq!(
            e.breaker_state(),
            BreakerState::Closed,
            "a success resets the count"
        );
        fail(&e, false);
        assert_eq!(e.breaker_state(), BreakerState::Open);
        assert_eq!(e.readiness(now(), 10, true), Readiness::Open);
        // Open for 1 s to 1.25 s (jitter), not longer.
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(e.readiness(now(), 10, true), Readiness::Open);
        tokio::time::advance(Duration::from_millis(252)).await;
        assert_eq!(e.readiness(now(), 10, true), Readiness::Probe);
        assert!(e.claim_probe());
        assert!(!e.claim_probe(), "one probe at a time");
        assert_eq!(
            e.readiness(now(), 10, true),
            Readiness::Open,
            "half-open: the probe is out"
        );
        // The probe fails: open again, for twice as long (2 s to 2.5 s).
        fail(&e, true);
        assert_eq!(e.breaker_state(), BreakerState::Open);
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert_eq!(e.readiness(now(), 10, true), Readiness::Open);
        tokio::time::advance(Duration::from_millis(502)).await;
        assert_eq!(e.readiness(now(), 10, true), Readiness::Probe);
        // A probe cancelled without an answer is given back.
        assert!(e.claim_probe());
        drop(e.track(None, Some(PARAMS), None, true));
        assert_eq!(e.readiness(now(), 10, true), Readiness::Probe);
        assert!(e.claim_probe());
        succeed(&e, true);
        assert_eq!(e.breaker_state(), BreakerState::Closed);
        assert_eq!(e.readiness(now(), 10, true), Readiness::Ready);
        // Closed again: the backoff starts over at 1 s.
        for _ in 0..3 {
            fail(&e, false);
        }
        tokio::time::advance(Duration::from_millis(1251)).await;
        assert_eq!(e.readiness(now(), 10, true), Readiness::Probe);
    }

    #[tokio::test(start_paused = true)]
    async fn the_open_time_grows_to_at_most_a_minute() {
        for opens in [0, 5, 6, 20, u32::MAX] {
            let t = open_time(Duration::from_secs(1), opens);
            assert!(t <= MAX_OPEN, "{opens}: {t:?}");
        }
        assert!(open_time(Duration::from_secs(1), 3) >= Duration::from_secs(8));
    }

    #[tokio::test(start_paused = true)]
    async fn errors_count_by_side_and_a_request_past_its_timeout_is_a_failure() {
        let e = endpoint();
        let proxy_side: BoxError = Box::new(crate::errors::NoConfig);
        for _ in 0..5 {
            e.track(None, Some(PARAMS), None, false).error(&*proxy_side);
        }
        assert_eq!(
            e.breaker_state(),
            BreakerState::Closed,
            "the proxy's own errors never count"
        );
        // Requests dropped after their route timeout count; dropped before it, they do not.
        let t = Some(Duration::from_millis(100));
        for _ in 0..5 {
            let f = e.track(None, Some(PARAMS), t, false);
            tokio::time::advance(Duration::from_millis(50)).await;
            drop(f);
        }
        assert_eq!(e.breaker_state(), BreakerState::Closed);
        for _ in 0..3 {
            let f = e.track(None, Some(PARAMS), t, false);
            tokio::time::advance(Duration::from_millis(100)).await;
            drop(f);
        }
        assert_eq!(e.breaker_state(), BreakerState::Open);
        let connect: BoxError = Box::new(crate::errors::ConnectError {
            addr: e.addr,
            source: std::io::ErrorKind::ConnectionRefused.into(),
        });
        let other = endpoint();
        for _ in 0..3 {
            other
                .track(None, Some(PARAMS), None, false)
                .error(&*connect);
        }
        assert_eq!(
            other.breaker_state(),
            BreakerState::Open,
            "connect failures count"
        );
        assert_eq!(e.pending() + other.pending(), 0, "every count given back");
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_jumps_to_slow_samples_decays_and_weighs_in_flight_requests() {
        let e = endpoint();
        let now = Instant::now;
        assert_eq!(e.rtt(now()), DEFAULT_RTT);
        let sample = |ms: u64| {
            let mut f = e.track(None, None, None, false);
            f.set_started(Instant::now() - Duration::from_millis(ms));
            f.response(http::StatusCode::OK);
        };
        sample(300);
        assert_eq!(
            e.rtt(now()),
            Duration::from_millis(300),
            "a peak is believed at once"
        );
        // Fast samples pull it down only as time passes (one time constant here).
        tokio::time::advance(DECAY).await;
        let decayed = e.rtt(now()).as_secs_f64();
        assert!(
            (decayed - 0.3 / std::f64::consts::E).abs() < 0.001,
            "{decayed}"
        );
        sample(10);
        let after = e.rtt(now()).as_secs_f64();
        assert!(after < 0.3 && after > 0.010, "{after}");
        // In-flight requests multiply the cost; weight divides it.
        let base = e.cost(now(), 1);
        let held = e.track(None, None, None, false);
        assert!((e.cost(now(), 1) / base - 2.0).abs() < 1e-9);
        assert!((e.cost(now(), 2) / base - 1.0).abs() < 1e-9);
        assert_eq!(e.readiness(now(), 1, true), Readiness::Full);
        assert_eq!(
            e.readiness(now(), 1, false),
            Readiness::Ready,
            "opaque: load only"
        );
        drop(held);
        assert_eq!(e.readiness(now(), 1, true), Readiness::Ready);
    }
}
