//! How the inbound stack answers its errors. The upstream is the app in the pod: a refused
//! connection means the app is not listening (502 `connect-failed`), a broken exchange is the
//! app's failure (502 `upstream-failed`), the peer's own broken request is a 400. Routing and
//! discovery errors do not occur inbound.

use std::error::Error as StdError;

use crate::errors::{reason_of, Reason};

/// The inbound mapping from an error to the reason it is answered with.
pub(crate) fn rescue(error: &(dyn StdError + 'static)) -> Reason {
    reason_of(error)
}
