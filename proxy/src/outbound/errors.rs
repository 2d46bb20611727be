//! How the outbound stack answers its errors: by the cause chain ([`reason_of`]): no config yet,
//! no endpoints or an overloaded stack → 503, a route timeout → 504, a connect failure or a
//! failing upstream → 502, an unknown destination that the mesh refuses → 502 `no-route`, the
//! client's own broken request → 400. gRPC requests get the matching gRPC status.

use std::error::Error as StdError;

use crate::errors::{reason_of, Reason};

/// The outbound mapping from an error to the reason it is answered with.
pub(crate) fn rescue(error: &(dyn StdError + 'static)) -> Reason {
    reason_of(error)
}
