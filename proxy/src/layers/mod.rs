//! Reusable tower layers of the request stack. Each layer's config, metrics and tests live in its
//! module; none of them knows about inbound or outbound assembly.

pub mod metrics;
pub mod rescue;
pub mod router;
pub mod timeout;
