//! A destination's endpoints and the balancer over them.
//!
//! Endpoint changes from discovery arrive as [`Change`]s (tower's discover vocabulary: insert or
//! remove, keyed by address), computed by [`diff`] between the endpoints a destination has and
//! those the latest view names. An endpoint that stays keeps its [`BackendEndpoint`] (and its
//! upstream connections), so per-endpoint state outlives every update.
//!
//! [`Balance`] is the balancer: a cheap per-request handle over the destination's shared state,
//! with no channel hop. Its readiness is honest: it picks an endpoint (weighted round robin) in
//! `poll_ready` and fails there when there is nothing to pick (`no-endpoints`, `no-route`,
//! `no-config`); `call` sends to the endpoint it picked.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Request;
use tower::discover::Change;

use tracing::Instrument;

use super::destination::{Destination, Profile};
use super::route::RouteName;
use crate::errors::{BoxError, NoConfig, NoEndpoints, NoRoute};
use crate::http::client::{Forward, Upstream, UpstreamHttp};
use crate::http::Body;

/// What discovery says about one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointMeta {
    /// The identity it must present (mTLS).
    pub identity: Option<outrider_control::api::Identity>,
    /// Relative share of traffic.
    pub weight: u32,
}

/// One endpoint of a destination, with its (shared) upstream connections.
#[derive(Debug)]
pub struct BackendEndpoint {
    /// Where to connect.
    pub addr: SocketAddr,
    /// What discovery says about it.
    pub meta: EndpointMeta,
    /// Its connections, shared with every destination that names the same endpoint.
    pub upstream: Arc<Upstream>,
}

/// A destination's endpoints and its weighted round-robin schedule.
#[derive(Debug, Default)]
pub struct EndpointSet {
    list: Vec<Arc<BackendEndpoint>>,
    schedule: Schedule,
    next: AtomicUsize,
}

impl EndpointSet {
    /// The next endpoint in weighted round-robin order; `None` without endpoints.
    pub fn pick(&self) -> Option<&Arc<BackendEndpoint>> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) as u64;
        self.list.get(self.schedule.index(n)?)
    }

    /// The set after `changes`: endpoints not removed or re-inserted are kept as they are (the
    /// same `Arc`); `upstream` gives the connections of a new one.
    pub fn apply(
        &self,
        changes: Vec<Change<SocketAddr, EndpointMeta>>,
        upstream: impl Fn(SocketAddr, &EndpointMeta) -> Arc<Upstream>,
    ) -> EndpointSet {
        let mut list = self.list.clone();
        for change in changes {
            match change {
                Change::Remove(addr) => list.retain(|e| e.addr != addr),
                Change::Insert(addr, meta) => {
                    let endpoint = Arc::new(BackendEndpoint {
                        addr,
                        upstream: upstream(addr, &meta),
                        meta,
                    });
                    match list.iter_mut().find(|e| e.addr == addr) {
                        Some(slot) => *slot = endpoint,
                        None => list.push(endpoint),
                    }
                }
            }
        }
        let weights: Vec<u32> = list.iter().map(|e| e.meta.weight).collect();
        EndpointSet {
            schedule: Schedule::new(&weights),
            // A random start, so proxies (and updated sets) do not all begin at endpoint 0.
            next: AtomicUsize::new(fastrand::usize(..1_000_003)),
            list,
        }
    }
}

/// The changes that turn `current` into `wanted`: a removal for every endpoint no longer named,
/// an insertion for every new endpoint and for every endpoint whose metadata changed.
pub fn diff(
    current: &EndpointSet,
    wanted: &[(SocketAddr, EndpointMeta)],
) -> Vec<Change<SocketAddr, EndpointMeta>> {
    let mut changes = Vec::new();
    for e in &current.list {
        if !wanted.iter().any(|(addr, _)| *addr == e.addr) {
            changes.push(Change::Remove(e.addr));
        }
    }
    for (addr, meta) in wanted {
        let same = current
            .list
            .iter()
            .any(|e| e.addr == *addr && e.meta == *meta);
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

/// The balancer: picks a destination's endpoint in `poll_ready`, sends to it in `call`.
#[derive(Debug, Clone)]
pub struct Balance {
    dest: Arc<Destination>,
    policy: UpstreamHttp,
    picked: Option<Forward>,
}

impl Balance {
    /// Balances over `dest`'s endpoints, speaking HTTP as `policy` says where the destination
    /// does not declare a protocol.
    pub fn new(dest: Arc<Destination>, policy: UpstreamHttp) -> Self {
        Self {
            dest,
            policy,
            picked: None,
        }
    }
}

impl tower::Service<Request<Body>> for Balance {
    type Response = <Forward as tower::Service<Request<Body>>>::Response;
    type Error = BoxError;
    type Future =
        tracing::instrument::Instrumented<<Forward as tower::Service<Request<Body>>>::Future>;

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
            let Some(endpoint) = resolved.endpoints.pick() else {
                let service = match &resolved.profile {
                    Profile::Service(s) => s.id.clone(),
                    _ => Arc::from(self.dest.addr().to_string()),
                };
                return Poll::Ready(Err(NoEndpoints { service }.into()));
            };
            self.picked = Some(Forward::new(endpoint.upstream.clone(), self.policy, hint));
        }
        match &mut self.picked {
            Some(forward) => tower::Service::poll_ready(forward, cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let Some(mut forward) = self.picked.take() else {
            let not_ready: <Forward as tower::Service<Request<Body>>>::Future = Box::pin(
                std::future::ready(Err("the balancer was called before it was ready".into())),
            );
            return not_ready.instrument(tracing::Span::none());
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
        tower::Service::call(&mut forward, req).instrument(span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn updates_are_inserts_and_removals_and_kept_endpoints_keep_their_state() {
        let registry = prometheus::Registry::new();
        let metrics = crate::metrics::Metrics::register(&registry).unwrap();
        let upstreams =
            crate::http::client::Upstreams::new(crate::transport::connect::Connect::new(
                std::time::Duration::from_secs(1),
                metrics.upstream_connects,
                100,
            ));
        let up = |addr, _: &EndpointMeta| {
            upstreams.get_or_insert(crate::http::client::EndpointKey::plain(addr))
        };
        let (a, b, c): (SocketAddr, SocketAddr, SocketAddr) = (
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
            "10.0.0.3:80".parse().unwrap(),
        );
        let empty = EndpointSet::default();
        let first = empty.apply(diff(&empty, &[(a, meta(1)), (b, meta(1))]), up);
        let changes = diff(&first, &[(a, meta(1)), (c, meta(1)), (b, meta(5))]);
        assert_eq!(
            changes.len(),
            2,
            "c inserted, b re-inserted with its new weight"
        );
        assert!(changes
            .iter()
            .any(|ch| matches!(ch, Change::Insert(addr, m) if *addr == c && m.weight == 1)));
        let second = first.apply(changes, up);
        assert!(
            Arc::ptr_eq(&first.list[0], &second.list[0]),
            "a kept as it was"
        );
        assert_eq!(second.list[1].meta.weight, 5, "b updated in place");
        assert!(
            Arc::ptr_eq(&first.list[1].upstream, &second.list[1].upstream),
            "b keeps its connections"
        );
        let third = second.apply(diff(&second, &[(c, meta(1))]), up);
        let removed: Vec<SocketAddr> = diff(&second, &[(c, meta(1))])
            .into_iter()
            .map(|ch| match ch {
                Change::Remove(addr) => addr,
                Change::Insert(addr, _) => panic!("unexpected insert of {addr}"),
            })
            .collect();
        assert_eq!(removed, vec![a, b]);
        assert_eq!(third.list.len(), 1);
        assert!(
            diff(&third, &[(c, meta(1))]).is_empty(),
            "no change, no churn"
        );
    }
}
