//! A destination's endpoints and the balancer over them.
//!
//! Endpoint changes from discovery arrive as [`Change`]s (tower's discover vocabulary: insert or
//! remove, keyed by address), computed by [`diff`] between the endpoints a destination has and
//! those the latest view names, in time proportional to the two lists (a map, no nested scan).
//! An endpoint that stays keeps its [`Endpoint`] object (load, breaker, connections), also when
//! only its weight changes; only a new identity makes a new one.
//!
//! [`Balance`] is the balancer: a cheap per-request handle over the destination's shared state.
//! It picks in `poll_ready`, so readiness is honest: power of two choices over peak-EWMA cost (or
//! weighted round robin, if the service says so) among the endpoints that are ready; with none
//! ready it fails at once (`overloaded`, `circuit-open`, `no-endpoints`), never queues. `call`
//! sends to the endpoint it picked and tracks the request there ([`Track`]). A retry polls a
//! fresh handle, so every attempt picks again.
//!
//! Why not tower's `p2c::Balance` over `PeakEwma`: it owns its endpoints (`&mut self`, not
//! `Clone`), so sharing one per destination across connections and workers needs a `Buffer`
//! (a channel hop and a task per request), and `PeakEwma` keeps a mutex per endpoint. Here the
//! state is in atomics behind `Arc`, read without locks by the same P2C rule.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use outrider_control::api::Balancer;
use tokio::time::Instant;
use tower::discover::Change;
use tracing::Instrument;

use super::destination::{Destination, Profile};
use super::endpoint::{BreakerParams, Endpoint, Limits, Readiness, Track};
use super::metrics::Shed;
use super::route::RouteName;
use crate::errors::{BoxError, CircuitOpen, EndpointsBusy, NoConfig, NoEndpoints, NoRoute};
use crate::http::client::{Forward, UpstreamHttp};
use crate::http::Body;
use crate::layers::retry::{Avoid, RetryRoute, ServedBy};
use crate::layers::timeout::RequestTimeout;

/// What discovery says about one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EndpointMeta {
    /// The identity it must present (mTLS).
    pub identity: Option<outrider_control::api::Identity>,
    /// Relative share of traffic.
    pub weight: u32,
}

/// Why no endpoint could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unavailable {
    /// The set is empty.
    NoEndpoints,
    /// Every endpoint's breaker is open.
    CircuitOpen,
    /// Every endpoint that is not open has as many requests in flight as it may.
    Overloaded,
}

/// An endpoint picked for one request.
#[derive(Debug, Clone)]
pub(crate) struct Pick {
    /// The endpoint.
    pub endpoint: Arc<Endpoint>,
    /// The request is the probe of its half-open breaker.
    pub probe: bool,
}

/// A destination's endpoints: the same endpoint objects across updates, indexed by address.
#[derive(Debug, Default)]
pub(crate) struct EndpointSet {
    list: Vec<Arc<Endpoint>>,
    meta: Vec<EndpointMeta>,
    by_addr: HashMap<SocketAddr, usize>,
    /// Running weight totals when weights differ (weighted sampling); `None`: all equal.
    totals: Option<Vec<u64>>,
    /// Weighted round robin, when the service asks for it.
    schedule: Option<Schedule>,
    next: AtomicUsize,
}

impl EndpointSet {
    /// The endpoints, in discovery order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Arc<Endpoint>, &EndpointMeta)> {
        self.list.iter().zip(&self.meta)
    }

    /// Picks an endpoint that can take a request at `now`: two distinct endpoints drawn at
    /// random (by weight), the one with the lower peak-EWMA cost in proportion to the other's
    /// (an endpoint due a breaker probe first); with round robin, the next ready one in the schedule. Endpoints at `limit` requests in flight (when `bounded`) or
    /// with an open breaker are skipped; a half-open one whose open time has passed is picked as
    /// its breaker's probe. The cost does not grow with the number of endpoints unless most of
    /// them are unready (then one scan finds the last ready ones, or says why there are none).
    pub(crate) fn pick(
        &self,
        now: Instant,
        limit: usize,
        bounded: bool,
    ) -> Result<Pick, Unavailable> {
        self.pick_avoiding(now, limit, bounded, None)
    }

    /// [`pick`](Self::pick), never choosing the endpoint at `avoid` (a retry's failed one).
    pub(crate) fn pick_avoiding(
        &self,
        now: Instant,
        limit: usize,
        bounded: bool,
        avoid: Option<SocketAddr>,
    ) -> Result<Pick, Unavailable> {
        let n = self.list.len();
        if n == 0 {
            return Err(Unavailable::NoEndpoints);
        }
        let usable = |i: usize| -> Option<(usize, bool)> {
            if Some(self.list[i].addr) == avoid {
                return None;
            }
            match self.list[i].readiness(now, limit, bounded) {
                Readiness::Ready => Some((i, false)),
                Readiness::Probe => Some((i, true)),
                Readiness::Full | Readiness::Open => None,
            }
        };
        if let Some(schedule) = &self.schedule {
            let start = self.next.fetch_add(1, Ordering::Relaxed) as u64;
            for k in 0..n as u64 {
                if let Some(found) = schedule.index(start + k).and_then(usable) {
                    if let Some(pick) = self.take(found) {
                        return Ok(pick);
                    }
                }
            }
            return Err(self.why_none(now, limit, bounded));
        }
        if n == 1 {
            return usable(0)
                .and_then(|found| self.take(found))
                .ok_or_else(|| self.why_none(now, limit, bounded));
        }
        for _ in 0..3 {
            let a = self.sample();
            let mut b = self.sample();
            if b == a {
                b = (a + 1 + fastrand::usize(..n - 1)) % n;
            }
            let found = match (usable(a), usable(b)) {
                // An open breaker whose time is up gets its probe: that is how it learns that
                // its endpoint recovered.
                (Some(x), Some(y)) if x.1 || y.1 => {
                    if x.1 {
                        [Some(x), Some(y)]
                    } else {
                        [Some(y), Some(x)]
                    }
                }
                (Some(x), Some(y)) => {
                    // The cheaper one, with the chance of the other's share of the two costs: an
                    // endpoint ten times as costly still gets about one pair in eleven, so it
                    // keeps being sampled and one slow answer cannot starve it (at low
                    // concurrency, strict P2C sends everything to whichever estimate is lower).
                    let cost = |(i, _): (usize, bool)| self.list[i].cost(now, self.meta[i].weight);
                    let (cx, cy) = (cost(x), cost(y));
                    if fastrand::f64() * (cx + cy) < cy {
                        [Some(x), Some(y)]
                    } else {
                        [Some(y), Some(x)]
                    }
                }
                (x, y) => [x.or(y), None],
            };
            for f in found.into_iter().flatten() {
                if let Some(pick) = self.take(f) {
                    return Ok(pick);
                }
            }
        }
        // Most endpoints are unready: the cheapest of the rest, or why there is none.
        let mut best: Option<((usize, bool), f64)> = None;
        for i in 0..n {
            if let Some(found) = usable(i) {
                let cost = self.list[i].cost(now, self.meta[i].weight);
                if best.is_none_or(|(_, c)| cost < c) {
                    best = Some((found, cost));
                }
            }
        }
        best.and_then(|(found, _)| self.take(found))
            .ok_or_else(|| self.why_none(now, limit, bounded))
    }

    /// Takes endpoint `i` (claiming its probe, when it is one).
    fn take(&self, (i, probe): (usize, bool)) -> Option<Pick> {
        let endpoint = &self.list[i];
        if probe && !endpoint.claim_probe() {
            return None;
        }
        Some(Pick {
            endpoint: endpoint.clone(),
            probe,
        })
    }

    fn sample(&self) -> usize {
        match &self.totals {
            None => fastrand::usize(..self.list.len()),
            Some(totals) => {
                let total = totals.last().copied().unwrap_or(1).max(1);
                let r = fastrand::u64(..total);
                totals.partition_point(|t| *t <= r).min(self.list.len() - 1)
            }
        }
    }

    fn why_none(&self, now: Instant, limit: usize, bounded: bool) -> Unavailable {
        let full = self
            .list
            .iter()
            .any(|e| e.readiness(now, limit, bounded) == Readiness::Full);
        if full {
            Unavailable::Overloaded
        } else {
            Unavailable::CircuitOpen
        }
    }

    /// The set after `changes`, balanced by `balancer`: an endpoint re-inserted with the same
    /// identity keeps its object (its new weight applies); `make` builds a new one.
    pub(crate) fn apply(
        &self,
        changes: Vec<Change<SocketAddr, EndpointMeta>>,
        balancer: Balancer,
        make: impl Fn(SocketAddr, &EndpointMeta) -> Arc<Endpoint>,
    ) -> EndpointSet {
        // A new endpoint starts at the latency its service has now, so it takes its share at
        // once instead of waiting for a default estimate to decay.
        let now = Instant::now();
        let typical = (!self.list.is_empty()).then(|| {
            let sum: Duration = self.list.iter().map(|e| e.rtt(now)).sum();
            sum / self.list.len() as u32
        });
        let make = |addr: SocketAddr, m: &EndpointMeta| {
            let endpoint = make(addr, m);
            if let Some(rtt) = typical {
                endpoint.seed_rtt(rtt, now);
            }
            endpoint
        };
        let mut list = self.list.clone();
        let mut meta = self.meta.clone();
        let mut by_addr = self.by_addr.clone();
        let mut removed = HashSet::new();
        for change in changes {
            match change {
                Change::Remove(addr) => {
                    if by_addr.contains_key(&addr) {
                        removed.insert(addr);
                    }
                }
                Change::Insert(addr, m) => match by_addr.get(&addr).inspect(|_| {
                    removed.remove(&addr);
                }) {
                    Some(&i) if meta[i].identity == m.identity => meta[i] = m,
                    Some(&i) => {
                        list[i] = make(addr, &m);
                        meta[i] = m;
                    }
                    None => {
                        by_addr.insert(addr, list.len());
                        list.push(make(addr, &m));
                        meta.push(m);
                    }
                },
            }
        }
        if !removed.is_empty() {
            let mut keep = list.iter().map(|e| !removed.contains(&e.addr));
            meta.retain(|_| keep.next().unwrap_or(false));
            list.retain(|e| !removed.contains(&e.addr));
            by_addr = list.iter().enumerate().map(|(i, e)| (e.addr, i)).collect();
        }
        let weights: Vec<u32> = meta.iter().map(|m| m.weight.max(1)).collect();
        let equal = weights.windows(2).all(|w| w[0] == w[1]);
        let totals = (!equal).then(|| {
            weights
                .iter()
                .scan(0u64, |acc, w| {
                    *acc += u64::from(*w);
                    Some(*acc)
                })
                .collect()
        });
        EndpointSet {
            schedule: (balancer == Balancer::RoundRobin).then(|| Schedule::new(&weights)),
            totals,
            list,
            meta,
            by_addr,
            // A random start, so proxies (and updated sets) do not all begin at endpoint 0.
            next: AtomicUsize::new(fastrand::usize(..1_000_003)),
        }
    }
}

/// The changes that turn `current` into `wanted`: a removal for every endpoint no longer named,
/// an insertion for every new endpoint and for every endpoint whose metadata changed. Linear in
/// the two lists.
pub(crate) fn diff(
    current: &EndpointSet,
    wanted: &[(SocketAddr, EndpointMeta)],
) -> Vec<Change<SocketAddr, EndpointMeta>> {
    let named: HashSet<SocketAddr> = wanted.iter().map(|(a, _)| *a).collect();
    let mut changes: Vec<_> = current
        .list
        .iter()
        .filter(|e| !named.contains(&e.addr))
        .map(|e| Change::Remove(e.addr))
        .collect();
    for (addr, meta) in wanted {
        let same = current
            .by_addr
            .get(addr)
            .is_some_and(|&i| current.meta[i] == *meta);
        if !same {
            changes.push(Change::Insert(*addr, meta.clone()));
        }
    }
    changes
}

/// Longest weighted round-robin cycle kept per destination; beyond it, weighted random.
const MAX_CYCLE: u64 = 65_536;

/// How a destination's endpoints take turns.
#[derive(Debug)]
enum Schedule {
    /// Exact weighted round robin: endpoint indexes, each spread over the cycle.
    Cycle(Vec<u32>),
    /// Weights too large for a cycle: a weighted random pick from running weight totals.
    Weighted(Vec<u64>),
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::Cycle(Vec::new())
    }
}

impl Schedule {
    /// Weights are divided by their greatest common divisor first; the cycle is exact when the
    /// reduced total fits in [`MAX_CYCLE`] slots, so memory stays bounded whatever the weights.
    fn new(weights: &[u32]) -> Self {
        fn gcd(a: u64, b: u64) -> u64 {
            if b == 0 {
                a
            } else {
                gcd(b, a % b)
            }
        }
        let weights: Vec<u64> = weights.iter().map(|w| u64::from((*w).max(1))).collect();
        let g = weights.iter().copied().fold(0, gcd).max(1);
        let reduced: Vec<u64> = weights.iter().map(|w| w / g).collect();
        if reduced.iter().sum::<u64>() > MAX_CYCLE {
            let totals = reduced.iter().scan(0u64, |acc, w| {
                *acc += w;
                Some(*acc)
            });
            return Schedule::Weighted(totals.collect());
        }
        let mut keyed: Vec<(u128, u32)> = Vec::new();
        for (i, n) in reduced.iter().enumerate() {
            for k in 0..*n {
                // Slot k of n sits at (2k + 1) / 2n of the cycle.
                keyed.push(((u128::from(2 * k + 1) << 32) / u128::from(2 * n), i as u32));
            }
        }
        keyed.sort_unstable();
        Schedule::Cycle(keyed.into_iter().map(|(_, i)| i).collect())
    }

    /// The endpoint index for the `n`th pick; `None` without endpoints.
    fn index(&self, n: u64) -> Option<usize> {
        match self {
            Schedule::Cycle(cycle) if !cycle.is_empty() => {
                Some(cycle[(n % cycle.len() as u64) as usize] as usize)
            }
            Schedule::Weighted(totals) => {
                let total = *totals.last()?;
                let r = fastrand::u64(..total);
                Some(totals.partition_point(|t| *t <= r))
            }
            Schedule::Cycle(_) => None,
        }
    }
}

/// The balancer: picks a destination's endpoint in `poll_ready`, sends to it in `call`. A clone
/// has not picked (every request, and every retry, picks anew).
#[derive(Debug)]
pub(crate) struct Balance {
    dest: Arc<Destination>,
    policy: UpstreamHttp,
    limits: Limits,
    picked: Option<(Forward, Pick, Option<BreakerParams>)>,
}

impl Clone for Balance {
    fn clone(&self) -> Self {
        Self {
            dest: self.dest.clone(),
            policy: self.policy,
            limits: self.limits,
            picked: None,
        }
    }
}

impl Balance {
    /// Balances over `dest`'s endpoints within `limits`, speaking HTTP as `policy` says where
    /// the destination does not declare a protocol.
    pub(crate) fn new(dest: Arc<Destination>, policy: UpstreamHttp, limits: Limits) -> Self {
        Self {
            dest,
            policy,
            limits,
            picked: None,
        }
    }
}

/// The error for a destination that cannot take a request now, counted as shed when it is.
pub(crate) fn unavailable(dest: &Destination, why: Unavailable) -> BoxError {
    let resolved = dest.resolved();
    let service = match &resolved.profile {
        Profile::Service(s) => s.id.clone(),
        _ => Arc::from(dest.addr().to_string()),
    };
    let shed = |reason| {
        if let Some(m) = &resolved.metrics {
            m.shed(reason);
        }
    };
    match why {
        Unavailable::NoEndpoints => NoEndpoints { service }.into(),
        Unavailable::CircuitOpen => {
            shed(Shed::CircuitOpen);
            CircuitOpen { service }.into()
        }
        Unavailable::Overloaded => {
            shed(Shed::Overloaded);
            EndpointsBusy { service }.into()
        }
    }
}

impl tower::Service<Request<Body>> for Balance {
    type Response = <Forward as tower::Service<Request<Body>>>::Response;
    type Error = BoxError;
    type Future = tracing::instrument::Instrumented<
        Track<<Forward as tower::Service<Request<Body>>>::Future>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.picked.is_none() {
            let resolved = self.dest.resolved();
            let hint = match &resolved.profile {
                Profile::NoConfig => return Poll::Ready(Err(NoConfig.into())),
                Profile::Refused => {
                    return Poll::Ready(Err(NoRoute {
                        dest: self.dest.addr(),
                    }
                    .into()))
                }
                Profile::Passthrough => Default::default(),
                Profile::Service(s) => s.version_hint(),
            };
            if self.dest.load().in_flight() >= self.limits.per_service {
                return Poll::Ready(Err(unavailable(&self.dest, Unavailable::Overloaded)));
            }
            let pick = match resolved
                .endpoints
                .pick(Instant::now(), self.limits.per_endpoint, true)
            {
                Ok(pick) => pick,
                Err(why) => return Poll::Ready(Err(unavailable(&self.dest, why))),
            };
            let forward = Forward::new(pick.endpoint.upstream.clone(), self.policy, hint);
            self.picked = Some((forward, pick, resolved.breaker));
        }
        match &mut self.picked {
            Some((forward, _, _)) => tower::Service::poll_ready(forward, cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let Some((mut forward, pick, breaker)) = self.picked.take() else {
            let not_ready: <Forward as tower::Service<Request<Body>>>::Future = Box::pin(
                std::future::ready(Err("the balancer was called before it was ready".into())),
            );
            return Track::new(not_ready, None, None).instrument(tracing::Span::none());
        };
        // Method, version, route and endpoint; never the path or header values (secrets).
        // Field expressions are evaluated only when the span is enabled.
        let span = tracing::debug_span!(
            "request",
            method = %req.method(),
            version = ?req.version(),
            route = req.extensions().get::<RouteName>().map(|r| &*r.0),
            endpoint = %forward.addr(),
        );
        // A retry goes to another endpoint than the one that just failed, if one is ready.
        let avoid = req.extensions().get::<Avoid>().map(|a| a.0);
        let mut pick = pick;
        if avoid == Some(pick.endpoint.addr) {
            let other = self.dest.resolved().endpoints.pick_avoiding(
                Instant::now(),
                self.limits.per_endpoint,
                true,
                avoid,
            );
            if let Ok(other) = other {
                if pick.probe {
                    pick.endpoint.abandon_probe();
                }
                forward =
                    Forward::new(other.endpoint.upstream.clone(), self.policy, forward.hint());
                pick = other;
            }
        }
        let timeout = req.extensions().get::<RequestTimeout>().map(|t| t.0);
        let in_flight =
            pick.endpoint
                .track(Some(self.dest.load().clone()), breaker, timeout, pick.probe);
        let served = req
            .extensions()
            .get::<RetryRoute>()
            .map(|_| ServedBy(pick.endpoint.addr));
        Track::new(
            tower::Service::call(&mut forward, req),
            Some(in_flight),
            served,
        )
        .instrument(span)
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::endpoint::Endpoint;

    fn meta(weight: u32) -> EndpointMeta {
        EndpointMeta {
            identity: None,
            weight,
        }
    }

    #[test]
    fn weighted_schedules_are_exact_spread_and_bounded() {
        let cycle = |w: &[u32]| match Schedule::new(w) {
            Schedule::Cycle(c) => c,
            Schedule::Weighted(_) => panic!("expected a cycle"),
        };
        let s = cycle(&[3, 1]);
        assert_eq!(s.iter().filter(|i| **i == 0).count(), 3);
        assert_ne!(s, vec![0, 0, 0, 1], "not three in a row then one: {s:?}");
        assert_eq!(cycle(&[500, 1000]), vec![1, 0, 1], "reduced by the gcd");
        assert_eq!(
            cycle(&[1000; 1000]).len(),
            1000,
            "equal weights: one slot each"
        );
        let weights: Vec<u32> = (0..5000).map(|i| 1 + i % 1000).collect();
        assert!(matches!(Schedule::new(&weights), Schedule::Weighted(_)));
        // One heavy endpoint against 4000 light ones gets its share (1000 / 5000 = 20%).
        let mut skewed = vec![1000u32];
        skewed.extend(std::iter::repeat_n(1, 4000));
        let s = Schedule::new(&skewed);
        fastrand::seed(7);
        let heavy = (0..100_000u64).filter(|n| s.index(*n) == Some(0)).count();
        assert!(
            (18_000..22_000).contains(&heavy),
            "heavy share {heavy} of 100000"
        );
        assert_eq!(Schedule::new(&[]).index(0), None);
    }

    struct Fixture {
        upstreams: crate::http::client::Upstreams,
    }

    impl Fixture {
        fn new() -> Self {
            let registry = prometheus::Registry::new();
            let metrics = crate::metrics::Metrics::register(&registry).unwrap();
            Self {
                upstreams: crate::http::client::Upstreams::new(
                    crate::transport::connect::Connect::new(
                        std::time::Duration::from_secs(1),
                        metrics.upstream_connects,
                        100,
                    ),
                ),
            }
        }

        fn make(&self) -> impl Fn(SocketAddr, &EndpointMeta) -> Arc<Endpoint> + '_ {
            |addr, meta| {
                let key = crate::http::client::EndpointKey {
                    addr,
                    identity: meta.identity.clone(),
                };
                Arc::new(Endpoint::new(addr, self.upstreams.get_or_insert(key), None))
            }
        }

        fn set(&self, endpoints: &[(SocketAddr, EndpointMeta)], balancer: Balancer) -> EndpointSet {
            let empty = EndpointSet::default();
            empty.apply(diff(&empty, endpoints), balancer, self.make())
        }
    }

    fn addr(i: u32) -> SocketAddr {
        SocketAddr::from(([198, 18, (i >> 8) as u8, i as u8], 80))
    }

    #[tokio::test]
    async fn updates_are_inserts_and_removals_and_kept_endpoints_keep_their_state() {
        let f = Fixture::new();
        let (a, b, c) = (addr(1), addr(2), addr(3));
        let first = f.set(&[(a, meta(1)), (b, meta(1))], Balancer::P2cEwma);
        // State that must survive: a request in flight on b.
        let held = first.list[1].track(None, None, None, false);
        let changes = diff(&first, &[(a, meta(1)), (c, meta(1)), (b, meta(5))]);
        assert_eq!(
            changes.len(),
            2,
            "c inserted, b re-inserted with its new weight"
        );
        let second = first.apply(changes, Balancer::P2cEwma, f.make());
        assert!(
            Arc::ptr_eq(&first.list[0], &second.list[0]),
            "a kept as it was"
        );
        let b2 = &second.list[second.by_addr[&b]];
        assert!(
            Arc::ptr_eq(&first.list[1], b2),
            "a weight change keeps the endpoint object"
        );
        assert_eq!(
            second.meta[second.by_addr[&b]].weight, 5,
            "with its new weight"
        );
        assert_eq!(b2.pending(), 1, "and its load");
        drop(held);
        // A new identity is a new endpoint.
        let meshed = EndpointMeta {
            identity: Some("spiffe://td/ns/a/sa/b".parse().unwrap()),
            weight: 5,
        };
        let third = second.apply(
            diff(&second, &[(a, meta(1)), (b, meshed)]),
            Balancer::P2cEwma,
            f.make(),
        );
        assert!(!Arc::ptr_eq(b2, &third.list[third.by_addr[&b]]));
        assert_eq!(third.list.len(), 2, "c removed");
        assert_eq!(third.by_addr.len(), 2);
        assert!(
            diff(
                &third,
                &[(a, meta(1)), (b, third.meta[third.by_addr[&b]].clone())]
            )
            .is_empty(),
            "no change, no churn"
        );
    }

    fn share(set: &EndpointSet, n: usize) -> Vec<usize> {
        let mut counts = vec![0; set.list.len()];
        for _ in 0..n {
            let pick = set.pick(Instant::now(), 100, true).unwrap();
            counts[set.by_addr[&pick.endpoint.addr]] += 1;
        }
        counts
    }

    /// Gives endpoint `i` a latency estimate of `ms`.
    fn slow(set: &EndpointSet, i: usize, ms: u64) {
        let mut r = set.list[i].track(None, None, None, false);
        r.set_started(Instant::now() - std::time::Duration::from_millis(ms));
        r.response(http::StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_prefers_cheap_endpoints_and_respects_weights() {
        fastrand::seed(11);
        let f = Fixture::new();
        let three: Vec<_> = (0..3).map(|i| (addr(i), meta(1))).collect();
        let set = f.set(&three, Balancer::P2cEwma);
        for i in 0..3 {
            slow(&set, i, 10);
        }
        let equal = share(&set, 3000);
        for c in &equal {
            assert!(
                (800..1200).contains(c),
                "equal endpoints share evenly: {equal:?}"
            );
        }
        slow(&set, 2, 100);
        let skewed = share(&set, 3000);
        assert!(
            skewed[2] < 600,
            "a slower endpoint gets under 20%: {skewed:?}"
        );
        // Requests in flight count: a loaded endpoint loses to an idle one of equal latency.
        let set = f.set(&three, Balancer::P2cEwma);
        let _held: Vec<_> = (0..5)
            .map(|_| set.list[0].track(None, None, None, false))
            .collect();
        let loaded = share(&set, 3000);
        assert!(loaded[0] < 450, "{loaded:?}");
        // Weights: 3 to 1 to 1 with equal latency.
        let weighted = f.set(
            &[(addr(0), meta(3)), (addr(1), meta(1)), (addr(2), meta(1))],
            Balancer::P2cEwma,
        );
        let w = share(&weighted, 5000);
        assert!(
            w[0] > 2 * w[1] && w[0] > 2 * w[2],
            "the heavier endpoint gets more: {w:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unready_endpoints_are_skipped_and_none_ready_says_why() {
        let f = Fixture::new();
        let endpoints: Vec<_> = (0..3).map(|i| (addr(i), meta(1))).collect();
        for balancer in [Balancer::P2cEwma, Balancer::RoundRobin] {
            let set = f.set(&endpoints, balancer);
            // Endpoint 0 at its bound of 2.
            let held: Vec<_> = (0..2)
                .map(|_| set.list[0].track(None, None, None, false))
                .collect();
            for _ in 0..200 {
                let pick = set.pick(Instant::now(), 2, true).unwrap();
                assert_ne!(
                    pick.endpoint.addr,
                    addr(0),
                    "{balancer:?}: a full endpoint is not ready"
                );
            }
            let more: Vec<_> = [1, 1, 2, 2]
                .iter()
                .map(|i| set.list[*i].track(None, None, None, false))
                .collect();
            assert_eq!(
                set.pick(Instant::now(), 2, true).err(),
                Some(Unavailable::Overloaded)
            );
            assert!(
                set.pick(Instant::now(), 2, false).is_ok(),
                "opaque connections are load only"
            );
            drop((held, more));
            // Breakers: open all three.
            let params = super::super::endpoint::BreakerParams {
                consecutive_failures: 1,
                open_for: std::time::Duration::from_secs(1),
            };
            for e in &set.list {
                e.track(None, Some(params), None, false)
                    .response(http::StatusCode::BAD_GATEWAY);
            }
            assert_eq!(
                set.pick(Instant::now(), 2, true).err(),
                Some(Unavailable::CircuitOpen)
            );
            tokio::time::advance(std::time::Duration::from_millis(1300)).await;
            // Open time over: each pick is a probe, one per endpoint, then none.
            let probes: Vec<_> = (0..3)
                .map(|_| set.pick(Instant::now(), 2, true).unwrap())
                .collect();
            assert!(probes.iter().all(|p| p.probe));
            assert_eq!(
                set.pick(Instant::now(), 2, true).err(),
                Some(Unavailable::CircuitOpen)
            );
        }
        assert_eq!(
            EndpointSet::default().pick(Instant::now(), 1, true).err(),
            Some(Unavailable::NoEndpoints)
        );
    }

    #[test]
    fn round_robin_stays_selectable_and_exact() {
        let f = Fixture::new();
        let set = f.set(
            &[(addr(0), meta(3)), (addr(1), meta(1))],
            Balancer::RoundRobin,
        );
        let counts = share(&set, 400);
        assert_eq!(counts, vec![300, 100]);
    }
}
