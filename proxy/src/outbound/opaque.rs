//! Opaque TCP to a destination: the balancer's choice of endpoint (per connection: the same P2C
//! over peak-EWMA rule as requests, the connect time as latency sample, connects in flight as
//! load; breakers count connect failures) and one dial through the shared connect path; the
//! outbound stack then copies bytes both ways (`transport::tcp`). A destination that cannot be
//! served (no config yet, refused, no endpoints, every breaker open) fails the dial, counted by
//! reason; a sidecar resets its client then, a `--forward` listener closes it.

use tokio::time::Instant;

use super::backend::unavailable;
use super::destination::{Destination, Profile};
use super::endpoint::Limits;
use crate::errors::{BoxError, NoConfig, NoRoute};
use crate::transport::connect::{Connect, Upstream};

/// Connects to an endpoint of `dest`, picked by the balancer.
pub(crate) async fn connect(
    dest: &Destination,
    connect: &Connect,
    limits: Limits,
) -> Result<Upstream, BoxError> {
    let resolved = dest.resolved();
    match &resolved.profile {
        Profile::NoConfig => return Err(NoConfig.into()),
        Profile::Refused => return Err(NoRoute { dest: dest.addr() }.into()),
        Profile::Passthrough | Profile::Service(_) => {}
    }
    // Connections are load, not requests: the per-endpoint request bound does not apply.
    let pick = match resolved
        .endpoints
        .pick(Instant::now(), limits.per_endpoint, false)
    {
        Ok(pick) => pick,
        Err(why) => return Err(unavailable(dest, why)),
    };
    let breaker = resolved.breaker;
    drop(resolved);
    let endpoint = pick.endpoint;
    let mut in_flight = endpoint.track(None, breaker, None, pick.probe);
    let peer = endpoint.upstream.identity();
    let result = connect
        .connect_to(endpoint.addr, peer, crate::identity::Alpn::Opaque)
        .await;
    match &result {
        Ok(_) => in_flight.connected(true),
        Err(e) => in_flight.error(&**e),
    }
    result
}
