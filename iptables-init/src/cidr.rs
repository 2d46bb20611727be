//! IP networks (`10.0.0.0/8`, `2001:db8::/32`) as a small typed value, for the
//! `--exclude-outbound-cidrs` and `--include-outbound-cidrs` flags.
//!
//! Parsing is strict so that what we hand to iptables is exactly what `iptables-save` prints back
//! (the verification step compares the two): the prefix must fit the family (`/0`..`/32` or
//! `/0`..`/128`) and the address must have no host bits set (`10.0.0.1/8` is rejected with a hint
//! to write `10.0.0.0/8`). A bare address is a host network (`/32` or `/128`). A bad value is a
//! [`CidrError`] whose text says what is wrong; the config layer adds the flag name.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IP address family; every rule set is built for exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// IPv4, programmed with `iptables-restore`.
    V4,
    /// IPv6, programmed with `ip6tables-restore`.
    V6,
}

impl Family {
    /// The family's name for messages: `IPv4` or `IPv6`.
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    /// The number of bits in an address of this family (32 or 128).
    pub fn bits(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An IP network: a network address with no host bits set and a prefix length that fits its family.
///
/// Displays in the canonical form `iptables-save` prints (`10.0.0.0/8`, `2001:db8::/32`,
/// `192.0.2.7/32`), so rendered rules read back byte for byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a string is not a [`Cidr`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrError(String);

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CidrError {}

impl Cidr {
    /// Makes a network from an address and a prefix length; fails if the prefix is too long for
    /// the family or the address has host bits set.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, CidrError> {
        let family = family_of(addr);
        if prefix > family.bits() {
            return Err(CidrError(format!(
                "prefix length /{prefix} is too long for an {family} network (at most /{})",
                family.bits()
            )));
        }
        let masked = mask(addr, prefix);
        if masked != addr {
            return Err(CidrError(format!(
                "{addr}/{prefix} has host bits set; did you mean {masked}/{prefix}?"
            )));
        }
        Ok(Cidr { addr, prefix })
    }

    /// The loopback network of `family`: `127.0.0.0/8` or `::1/128`.
    pub fn loopback(family: Family) -> Cidr {
        match family {
            Family::V4 => Cidr {
                addr: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)),
                prefix: 8,
            },
            Family::V6 => Cidr {
                addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
                prefix: 128,
            },
        }
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The network's address family.
    pub fn family(&self) -> Family {
        family_of(self.addr)
    }

    /// Whether `addr` lies inside this network (always false for the other family).
    pub fn contains(&self, addr: IpAddr) -> bool {
        family_of(addr) == self.family() && mask(addr, self.prefix) == self.addr
    }

    /// Whether the two networks share at least one address (one contains the other).
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }

    /// A sort key: family first, then address, then prefix length.
    fn key(&self) -> (Family, u128, u8) {
        let bits = match self.addr {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        (self.family(), bits, self.prefix)
    }
}

impl PartialOrd for Cidr {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Cidr {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let s = s.trim();
        let (addr_text, prefix_text) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr_text.parse().map_err(|_| {
            CidrError(format!(
                "`{addr_text}` is not an IPv4 or IPv6 address (expected e.g. 10.0.0.0/8 or 2001:db8::/32)"
            ))
        })?;
        let prefix = match prefix_text {
            None => family_of(addr).bits(),
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().map_err(|_| {
                    CidrError(format!(
                        "prefix length /{p} is too long for an {} network (at most /{})",
                        family_of(addr),
                        family_of(addr).bits()
                    ))
                })?
            }
            Some(p) => {
                return Err(CidrError(format!(
                    "`/{p}` is not a prefix length (expected a number, e.g. /8)"
                )))
            }
        };
        Cidr::new(addr, prefix)
    }
}

fn family_of(addr: IpAddr) -> Family {
    match addr {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

/// Clears the host bits of `addr` beyond `prefix` (which must fit the family).
fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_displays_canonically() {
        assert_eq!(c("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(c("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(c("192.0.2.7").to_string(), "192.0.2.7/32");
        assert_eq!(c("2001:DB8:0:0::/32").to_string(), "2001:db8::/32");
        assert_eq!(c("::1").to_string(), "::1/128");
        assert_eq!(c("::/0").to_string(), "::/0");
        assert_eq!(c(" 198.18.0.0/15 ").to_string(), "198.18.0.0/15");
    }

    #[test]
    fn rejects_bad_values_with_reasons() {
        let err = |s: &str| s.parse::<Cidr>().unwrap_err().to_string();
        assert!(
            err("10.0.0.0/33").contains("too long"),
            "{}",
            err("10.0.0.0/33")
        );
        assert!(err("10.0.0.0/300").contains("too long"));
        assert!(err("::/129").contains("too long"));
        assert!(err("1.2.3").contains("not an IPv4 or IPv6 address"));
        assert!(err("1.2.3/24").contains("not an IPv4 or IPv6 address"));
        assert!(err("").contains("not an IPv4"));
        assert!(err("10.0.0.0/").contains("not a prefix length"));
        assert!(err("10.0.0.0/x").contains("not a prefix length"));
        assert!(err("10.0.0.0/-1").contains("not a prefix length"));
        assert!(err("10.0.0.1/8").contains("did you mean 10.0.0.0/8"));
        assert!(err("2001:db8::1/32").contains("did you mean 2001:db8::/32"));
    }

    #[test]
    fn overlap_and_containment() {
        assert!(c("10.0.0.0/8").overlaps(&c("10.1.0.0/16")));
        assert!(c("10.1.0.0/16").overlaps(&c("10.0.0.0/8")));
        assert!(c("10.1.2.3").overlaps(&c("10.1.2.3/32")));
        assert!(!c("10.0.0.0/8").overlaps(&c("11.0.0.0/8")));
        assert!(c("0.0.0.0/0").overlaps(&c("192.0.2.0/24")));
        assert!(!c("0.0.0.0/0").overlaps(&c("::/0")));
        assert!(c("2001:db8::/32").overlaps(&c("2001:db8:1::/48")));
        assert!(!c("2001:db8::/32").contains("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn sorts_by_family_then_address() {
        let mut v = [
            c("2001:db8::/32"),
            c("10.0.0.0/16"),
            c("10.0.0.0/8"),
            c("9.0.0.0/8"),
        ];
        v.sort();
        let s: Vec<String> = v.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            s,
            ["9.0.0.0/8", "10.0.0.0/8", "10.0.0.0/16", "2001:db8::/32"]
        );
    }
}
