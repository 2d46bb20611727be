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

/// A fixed answer: for tests, and the shape of what a test harness injects.
#[derive(Debug, Clone, Copy)]
pub struct FixedOrigDst(pub SocketAddr);

impl OrigDst for FixedOrigDst {
    fn orig_dst(&self, _: &TcpStream) -> io::Result<SocketAddr> {
        Ok(self.0)
    }
}
