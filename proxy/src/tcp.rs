//! Opaque TCP: connect to the upstream and copy bytes both ways until both sides are done.
//! Half-close is carried through (when one side finishes sending, the other side's write half is
//! shut down and the opposite direction keeps flowing). A connection with no bytes moving for the
//! idle timeout is closed.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::errors::{ProxyError, Reason};
use crate::io::Activity;

/// Connects to `target` within `timeout`, with Nagle off.
pub async fn connect(target: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(target))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {target} timed out"),
            )
        })??;
    stream.set_nodelay(true)?;
    // TCP keepalive finds upstreams that vanished without a FIN (idle pooled connections and
    // long requests alike): probes after 30 s idle, every 10 s.
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
    Ok(stream)
}

/// Copies bytes between `downstream` and a new connection to `target`. Returns the bytes sent
/// upstream and downstream.
pub async fn forward<I>(
    mut downstream: I,
    target: SocketAddr,
    connect_timeout: Duration,
    idle_timeout: Duration,
    activity: Activity,
) -> Result<(u64, u64), ProxyError>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut upstream = connect(target, connect_timeout)
        .await
        .map_err(|e| ProxyError::new(Reason::ConnectFailed, e))?;
    tokio::select! {
        res = tokio::io::copy_bidirectional(&mut downstream, &mut upstream) => {
            res.map_err(|e| ProxyError::new(Reason::UpstreamFailed, e))
        }
        () = activity.idle(idle_timeout, || false) => {
            tracing::debug!("closing idle TCP connection");
            Ok((0, 0))
        }
    }
}
