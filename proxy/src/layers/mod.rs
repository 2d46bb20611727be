//! Reusable tower layers of the request stacks. None of them knows about inbound, outbound,
//! discovery or the clients below it; each layer's config, metrics and tests live in its module.

pub(crate) mod metrics;
pub(crate) mod rescue;
pub(crate) mod retry;
pub(crate) mod timeout;
