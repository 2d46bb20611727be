//! Opaque TCP to a destination: the balancer's choice of endpoint (per connection), one dial
//! through the shared connect path, then a byte copy both ways. A destination that cannot be
//! served (no config yet, refused, no endpoints) closes the connection, counted by reason.

use tokio::io::{AsyncRead, AsyncWrite};

use super::destination::{Destination, Profile};
use crate::errors::{BoxError, NoConfig, NoEndpoints, NoRoute};
use crate::transport::connect::{Connect, Upstream};
use crate::transport::io::Activity;

/// Forwards `io` to an endpoint of `dest` (over `upstream` when it is already connected) until
/// either side is done; returns the bytes sent upstream and downstream.
pub async fn forward<I>(
    dest: &Destination,
    io: I,
    upstream: Option<crate::transport::connect::Upstream>,
    connect: &Connect,
    idle_timeout: std::time::Duration,
    activity: &Activity,
) -> Result<(u64, u64), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let upstream = match upstream {
        Some(u) => u,
        None => self::connect(dest, connect).await?,
    };
    Ok(crate::transport::tcp::copy(io, upstream, idle_timeout, activity).await?)
}

/// Connects to an endpoint of `dest`, picked by the balancer.
pub async fn connect(dest: &Destination, connect: &Connect) -> Result<Upstream, BoxError> {
    let resolved = dest.resolved();
    match &resolved.profile {
        Profile::NoConfig => return Err(NoConfig.into()),
        Profile::Refused => return Err(NoRoute { dest: dest.addr() }.into()),
        Profile::Passthrough | Profile::Service(_) => {}
    }
    let Some(endpoint) = resolved.endpoints.pick() else {
        let service = match &resolved.profile {
            Profile::Service(s) => s.id.clone(),
            _ => dest.addr().to_string().into(),
        };
        return Err(NoEndpoints { service }.into());
    };
    let addr = endpoint.addr;
    let peer = endpoint.meta.identity.clone();
    drop(resolved);
    connect
        .connect_to(addr, peer.as_ref(), crate::identity::Alpn::Opaque)
        .await
}
