//! Helpers that tests share (the in-process tests of the e2e binary and this crate's own), behind
//! the `test-util` feature so production builds do not carry them.

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

/// The value of the sample of `family` whose labels include every `(name, value)` of `labels`
/// (counters and gauges; summed when several match), from `registry`.
pub fn metric(registry: &prometheus::Registry, family: &str, labels: &[(&str, &str)]) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == family)
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .map(|m| m.get_counter().get_value() + m.get_gauge().get_value())
        .sum()
}
