//! The original destination of a redirected connection. In a pod, iptables REDIRECT rewrote the
//! destination to the proxy's listener; the kernel keeps the original in conntrack and returns it
//! through `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6).
//!
//! The lookup sits behind [`OrigDst`] so tests can inject it and run the whole proxy without
//! iptables or root.

use std::io;
use std::net::SocketAddr;

use socket2::SockRef;
use tokio::net::TcpStream;

/// Finds where an accepted connection was originally going.
pub trait OrigDst: Send + Sync + 'static {
    /// The original destination of `socket`.
    fn orig_dst(&self, socket: &TcpStream) -> io::Result<SocketAddr>;
}

/// The kernel's answer, via `getsockopt(SO_ORIGINAL_DST)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SoOriginalDst;

impl OrigDst for SoOriginalDst {
    fn orig_dst(&self, socket: &TcpStream) -> io::Result<SocketAddr> {
        let local = socket.local_addr()?;
        let sock = SockRef::from(socket);
        let addr = match local {
            SocketAddr::V4(_) => sock.original_dst()?,
            SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some() => sock.original_dst()?,
            SocketAddr::V6(_) => sock.original_dst_ipv6()?,
        };
        addr.as_socket().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "SO_ORIGINAL_DST is not an IP address",
            )
        })
    }
}

/// The original-destination lookup of one direction, with its loop check: a connection whose
/// destination is one of the proxy's own ports is refused (counted; logged once per direction),
/// and so is a connection without an original destination (traffic that reached the listener
/// without being redirected; logged once per direction at warn, then at debug).
#[derive(Debug)]
pub struct Lookup {
    direction: &'static str,
    own_ports: Vec<u16>,
    metrics: std::sync::Arc<crate::metrics::DirectionMetrics>,
    loop_logged: std::sync::atomic::AtomicBool,
    missing_logged: std::sync::atomic::AtomicBool,
}

impl Lookup {
    /// The lookup of `direction`, refusing `own_ports`.
    pub fn new(
        direction: &'static str,
        own_ports: Vec<u16>,
        metrics: std::sync::Arc<crate::metrics::DirectionMetrics>,
    ) -> Self {
        Self {
            direction,
            own_ports,
            metrics,
            loop_logged: Default::default(),
            missing_logged: Default::default(),
        }
    }

    /// The original destination of `socket`.
    pub fn orig_dst(
        &self,
        orig_dst: &dyn OrigDst,
        socket: &TcpStream,
    ) -> Result<SocketAddr, crate::errors::Reason> {
        use std::sync::atomic::Ordering;
        orig_dst.orig_dst(socket).map_err(|e| {
            if !self.missing_logged.swap(true, Ordering::Relaxed) {
                tracing::warn!(direction = self.direction, error = %e,
                    "cannot read the original destination (logged once per listener; see outrider_errors_total{{reason=\"no-orig-dst\"}})");
            } else {
                tracing::debug!(error = %e, "cannot read the original destination");
            }
            crate::errors::Reason::NoOrigDst
        })
    }

    /// Whether `port` is one of the proxy's own.
    pub fn is_own_port(&self, port: u16) -> bool {
        self.own_ports.contains(&port)
    }

    /// Whether `addr` is one of the proxy's own ports on a loopback or wildcard address.
    pub fn is_own_loopback(&self, addr: SocketAddr) -> bool {
        (addr.ip().is_loopback() || addr.ip().is_unspecified()) && self.is_own_port(addr.port())
    }

    /// Counts (and logs once) a connection refused because it would loop back into the proxy.
    pub fn refuse_loop(&self, peer: SocketAddr) -> crate::errors::Reason {
        use std::sync::atomic::Ordering;
        self.metrics.loop_refused.inc();
        if !self.loop_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(direction = self.direction, %peer,
                "refusing a connection whose target is the proxy itself (logged once per listener; see outrider_loop_refused_total)");
        }
        crate::errors::Reason::Loop
    }
}

/// A fixed original destination: the stacks in process without iptables or root (the demo's
/// server-side proxies, the in-process tests).
#[derive(Debug, Clone, Copy)]
pub struct FixedOrigDst(pub SocketAddr);

impl OrigDst for FixedOrigDst {
    fn orig_dst(&self, _: &TcpStream) -> io::Result<SocketAddr> {
        Ok(self.0)
    }
}
