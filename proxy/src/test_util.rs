//! Helpers that tests share (the in-process tests of the e2e binary and this crate's own), behind
//! the `test-util` feature so production builds do not carry them. (Metric readers are
//! [`crate::metrics::sum`], which the demo uses too.)

pub use crate::transport::orig_dst::FixedOrigDst;

/// A balancer's endpoint set of `n` endpoints with equal weights and a latency history, for the
/// pick benchmark (`benches/balancer.rs`).
pub struct PickBench {
    set: crate::outbound::backend::EndpointSet,
}

impl PickBench {
    /// A set of `n` endpoints (198.18.x.y:80), each with one latency sample.
    pub fn new(n: u32) -> Self {
        use crate::outbound::backend::{diff, EndpointMeta, EndpointSet};
        use crate::outbound::endpoint::Endpoint;
        use std::sync::Arc;
        let registry = prometheus::Registry::new();
        let metrics = match crate::metrics::Metrics::register(&registry) {
            Ok(m) => m,
            Err(e) => panic!("metrics: {e}"),
        };
        let upstreams =
            crate::http::client::Upstreams::new(crate::transport::connect::Connect::new(
                std::time::Duration::from_secs(1),
                metrics.upstream_connects,
                10,
            ));
        let wanted: Vec<_> = (0..n)
            .map(|i| {
                let addr = std::net::SocketAddr::from(([198, 18, (i >> 8) as u8, i as u8], 80));
                (
                    addr,
                    EndpointMeta {
                        identity: None,
                        weight: 1,
                    },
                )
            })
            .collect();
        let empty = EndpointSet::default();
        let set = empty.apply(
            diff(&empty, &wanted),
            outrider_control::api::Balancer::P2cEwma,
            |addr, _| {
                let upstream =
                    upstreams.get_or_insert(crate::http::client::EndpointKey::plain(addr));
                Arc::new(Endpoint::new(addr, upstream, None))
            },
        );
        Self { set }
    }

    /// One pick (power of two choices over peak-EWMA), as a request does.
    pub fn pick(&self) -> Option<std::net::SocketAddr> {
        self.set
            .pick(tokio::time::Instant::now(), 1_000, true)
            .ok()
            .map(|p| p.endpoint.addr)
    }
}
