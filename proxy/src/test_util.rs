//! Helpers that tests share (the in-process tests of the e2e binary and this crate's own), behind
//! the `test-util` feature so production builds do not carry them. (Metric readers are
//! [`crate::metrics::sum`], which the demo uses too.)

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpStream;

use crate::transport::orig_dst::OrigDst;

/// A fixed original destination: runs the inbound and outbound stacks in-process, without
/// iptables or root.
#[derive(Debug, Clone, Copy)]
pub struct FixedOrigDst(pub SocketAddr);

impl OrigDst for FixedOrigDst {
    fn orig_dst(&self, _: &TcpStream) -> io::Result<SocketAddr> {
        Ok(self.0)
    }
}
