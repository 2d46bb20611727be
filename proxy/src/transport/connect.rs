//! The one path that dials upstreams: the HTTP/1 pools, the HTTP/2 connections and opaque TCP all
//! connect through [`Connect`], so the connect timeout, TCP options and the connection counter
//! (and, with mTLS, the TLS client) live in one place.

use std::net::SocketAddr;
use std::time::Duration;

use prometheus::IntCounter;
use tokio::net::TcpStream;

use crate::errors::{ConnectError, ConnectTimeout};

/// Dials upstream endpoints; cheap to clone.
#[derive(Debug, Clone)]
pub struct Connect {
    timeout: Duration,
    connects: IntCounter,
}

impl Connect {
    /// Dials within `timeout`, counting every dial in `connects`.
    pub fn new(timeout: Duration, connects: IntCounter) -> Self {
        Self { timeout, connects }
    }

    /// Connects to `addr` with Nagle off and TCP keepalive on (probes after 30 s idle, every
    /// 10 s, so an upstream that vanished without a FIN is found). Fails with [`ConnectError`] or
    /// [`ConnectTimeout`].
    pub async fn connect(&self, addr: SocketAddr) -> Result<TcpStream, crate::errors::BoxError> {
        self.connects.inc();
        let stream = match tokio::time::timeout(self.timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => return Err(ConnectError { addr, source }.into()),
            Err(_) => {
                return Err(ConnectTimeout {
                    addr,
                    after: self.timeout,
                }
                .into())
            }
        };
        let tune = |s: &TcpStream| -> std::io::Result<()> {
            s.set_nodelay(true)?;
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(Duration::from_secs(30))
                .with_interval(Duration::from_secs(10));
            socket2::SockRef::from(s).set_tcp_keepalive(&keepalive)
        };
        tune(&stream).map_err(|source| ConnectError { addr, source })?;
        Ok(stream)
    }
}
