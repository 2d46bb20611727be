//! Opaque TCP: copy bytes both ways between the downstream connection and an upstream one until
//! both sides are done. Half-close is carried through (when one side finishes sending, the other
//! side's write half is shut down and the opposite direction keeps flowing). A connection with no
//! bytes moving for the idle timeout is closed.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::transport::io::Activity;

/// Copies between `downstream` and `upstream` until both close or nothing moves for
/// `idle_timeout`. Returns the bytes sent upstream and downstream.
pub(crate) async fn copy<D, U>(
    mut downstream: D,
    mut upstream: U,
    idle_timeout: Duration,
    activity: &Activity,
) -> std::io::Result<(u64, u64)>
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    tokio::select! {
        res = tokio::io::copy_bidirectional(&mut downstream, &mut upstream) => res,
        () = activity.idle(idle_timeout, || false) => {
            tracing::debug!("closing idle TCP connection");
            Ok((0, 0))
        }
    }
}
