//! The pod annotations that set `outrider init`'s capture flags, read in one place: the
//! injector's `outrider-init` container and the CNI plugin (which programs the same rules from
//! the node) both turn a pod's annotations into flags here, so one pod gets the same rules
//! either way, and a bad value (or two that contradict each other) is refused by name before
//! any rule exists.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use clap::Parser as _;
use outrider_iptables_init::cidr::{Cidr, Family};
use outrider_iptables_init::config::{Config, Port};
use outrider_iptables_init::{ports, InitArgs};

/// Annotation: inbound ports that bypass the proxy (comma-separated, ranges `9000-9010`).
pub const ANN_SKIP_INBOUND_PORTS: &str = "outrider.io/skip-inbound-ports";
/// Annotation: outbound ports that bypass the proxy (comma-separated, ranges).
pub const ANN_SKIP_OUTBOUND_PORTS: &str = "outrider.io/skip-outbound-ports";
/// Annotation: outbound networks that bypass the proxy (comma-separated CIDRs).
pub const ANN_SKIP_OUTBOUND_CIDRS: &str = "outrider.io/skip-outbound-cidrs";
/// Annotation: only traffic to these networks is captured outbound (comma-separated CIDRs).
pub const ANN_INCLUDE_OUTBOUND_CIDRS: &str = "outrider.io/include-outbound-cidrs";
/// Annotation: only these inbound ports are captured (comma-separated, ranges; `*`: all).
pub const ANN_INCLUDE_INBOUND_PORTS: &str = "outrider.io/include-inbound-ports";
/// Annotation: only these outbound destination ports are captured (comma-separated, ranges;
/// `*`: all).
pub const ANN_INCLUDE_OUTBOUND_PORTS: &str = "outrider.io/include-outbound-ports";

/// The most ports one range of a port-list annotation may cover (each port is a rule).
pub const MAX_RANGE: usize = 256;

/// Whether a list holds ports (with ranges) or networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Items {
    Ports,
    Cidrs,
}

/// Each capture annotation, the `outrider init` flag it sets, and what it lists.
const TABLE: [(&str, &str, Items); 6] = [
    (
        ANN_SKIP_INBOUND_PORTS,
        "--exclude-inbound-ports",
        Items::Ports,
    ),
    (
        ANN_SKIP_OUTBOUND_PORTS,
        "--exclude-outbound-ports",
        Items::Ports,
    ),
    (
        ANN_SKIP_OUTBOUND_CIDRS,
        "--exclude-outbound-cidrs",
        Items::Cidrs,
    ),
    (
        ANN_INCLUDE_OUTBOUND_CIDRS,
        "--include-outbound-cidrs",
        Items::Cidrs,
    ),
    (
        ANN_INCLUDE_INBOUND_PORTS,
        "--include-inbound-ports",
        Items::Ports,
    ),
    (
        ANN_INCLUDE_OUTBOUND_PORTS,
        "--include-outbound-ports",
        Items::Ports,
    ),
];

/// A capture annotation whose value is wrong: which one, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotationError {
    /// The annotation's key.
    pub annotation: &'static str,
    /// What is wrong with it.
    pub message: String,
}

/// A pod's capture settings, checked as `outrider init` checks its flags.
#[derive(Debug, Clone)]
pub struct Capture {
    /// `outrider init`'s arguments after `init` (the proxy uid first), in the table's order.
    args: Vec<String>,
    /// The checked configuration they make.
    config: Config,
}

impl Capture {
    /// Reads the capture annotations (`get` looks one up by key) and checks them together.
    pub fn from_annotations<'a>(
        get: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<Capture, AnnotationError> {
        let mut args = vec!["--proxy-uid".to_owned(), ports::PROXY_UID.to_string()];
        for (annotation, flag, items) in TABLE {
            let Some(value) = get(annotation) else {
                continue;
            };
            let bad = |message: String| AnnotationError {
                annotation,
                message,
            };
            let list = match items {
                Items::Ports => join(&port_list(value).map_err(bad)?),
                Items::Cidrs => join(
                    &value
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| s.parse::<Cidr>().map_err(|e| bad(e.to_string())))
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            if !list.is_empty() {
                args.extend([flag.to_owned(), list]);
            }
        }
        let config = check(&args)?;
        Ok(Capture { args, config })
    }

    /// `outrider init`'s arguments (after `init`): `--proxy-uid 1337` and a flag per annotation.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// The checked `outrider init` configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// An IPv4 destination (`address:port`) outside the pod that these rules capture, for the
    /// CNI mode's validation probe; `None` when only IPv6 or nothing at all is captured.
    pub fn probe_target(&self) -> Option<SocketAddr> {
        let c = &self.config;
        let skipped = |a: Ipv4Addr| {
            c.exclude_outbound_cidrs
                .iter()
                .any(|r| r.contains(IpAddr::V4(a)))
        };
        let addr = if c.include_outbound_cidrs.is_empty() {
            // Benchmarking space (RFC 2544), then the documentation ranges.
            [
                Ipv4Addr::new(198, 18, 255, 254),
                Ipv4Addr::new(192, 0, 2, 1),
                Ipv4Addr::new(203, 0, 113, 1),
            ]
            .into_iter()
            .find(|a| !skipped(*a))?
        } else {
            c.include_outbound_cidrs
                .iter()
                .filter(|r| r.family() == Family::V4)
                .flat_map(candidates)
                .find(|a| !a.is_loopback() && !skipped(*a))?
        };
        let port = if c.include_outbound_ports.is_empty() {
            (1..=u16::MAX).find(|p| !c.exclude_outbound_ports.iter().any(|s| s.get() == *p))?
        } else {
            c.include_outbound_ports.first()?.get()
        };
        Some(SocketAddr::from((addr, port)))
    }
}

/// A few addresses of an IPv4 range: its second, last-but-one and first.
fn candidates(range: &Cidr) -> Vec<Ipv4Addr> {
    let IpAddr::V4(net) = range.addr() else {
        return Vec::new();
    };
    let net = u32::from(net);
    let size = 1u64 << (32 - u32::from(range.prefix()));
    let last = u32::try_from(u64::from(net) + size - 1).unwrap_or(u32::MAX);
    [
        net.saturating_add(1).min(last),
        last.saturating_sub(1).max(net),
        net,
    ]
    .into_iter()
    .map(Ipv4Addr::from)
    .collect()
}

/// Parses `args` with `outrider init`'s own parser and checks them as it does; an error names
/// the annotation behind the flag at fault.
fn check(args: &[String]) -> Result<Config, AnnotationError> {
    #[derive(clap::Parser)]
    struct Init {
        #[command(flatten)]
        args: InitArgs,
    }
    let of_flag = |flag: &str| {
        TABLE
            .iter()
            .find(|(_, f, _)| *f == flag)
            .map_or(ANN_SKIP_INBOUND_PORTS, |(a, _, _)| *a)
    };
    let argv = std::iter::once("init").chain(args.iter().map(String::as_str));
    let parsed = Init::try_parse_from(argv).map_err(|e| {
        let text = e.to_string();
        let first = text.lines().next().unwrap_or_default().to_owned();
        let flag = TABLE
            .iter()
            .map(|(_, f, _)| *f)
            .find(|f| first.contains(f))
            .unwrap_or("--exclude-inbound-ports");
        AnnotationError {
            annotation: of_flag(flag),
            message: first.trim_start_matches("error: ").to_owned(),
        }
    })?;
    Config::from_args(&parsed.args).map_err(|errors| {
        let first = &errors[0];
        AnnotationError {
            annotation: of_flag(first.flag),
            message: errors
                .iter()
                .map(|e| {
                    TABLE
                        .iter()
                        .fold(e.message.clone(), |m, (a, f, _)| m.replace(f, a))
                })
                .collect::<Vec<_>>()
                .join("; "),
        }
    })
}

/// A port list with ranges (`5432,9000-9010`), each port checked, sorted, without repeats; `*`
/// alone is every port (the empty list). A range of more than [`MAX_RANGE`] ports is refused.
pub fn port_list(value: &str) -> Result<Vec<Port>, String> {
    if value.trim() == "*" {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (a, b) = item.split_once('-').unwrap_or((item, item));
        let a: Port = a.parse()?;
        let b: Port = b.parse()?;
        if a.get() > b.get() || usize::from(b.get() - a.get()) >= MAX_RANGE {
            return Err(format!(
                "`{item}`: a range is low-high, at most {MAX_RANGE} ports"
            ));
        }
        out.extend((a.get()..=b.get()).filter_map(Port::new));
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// `a,b,c`.
pub(crate) fn join<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn capture(pairs: &[(&str, &str)]) -> Result<Capture, AnnotationError> {
        Capture::from_annotations(|k| pairs.iter().find(|(a, _)| *a == k).map(|(_, v)| *v))
    }

    #[test]
    fn the_validation_probe_is_a_destination_the_rules_capture() {
        let probe = |pairs: &[(&str, &str)]| capture(pairs).unwrap().probe_target();
        let at = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        assert_eq!(probe(&[]), at("198.18.255.254:1"));
        assert_eq!(
            probe(&[
                (ANN_SKIP_OUTBOUND_PORTS, "1-3"),
                (ANN_SKIP_OUTBOUND_CIDRS, "198.18.0.0/15")
            ]),
            at("192.0.2.1:4")
        );
        assert_eq!(
            probe(&[
                (ANN_INCLUDE_OUTBOUND_CIDRS, "2001:db8::/32,10.0.0.0/8"),
                (ANN_INCLUDE_OUTBOUND_PORTS, "8080,443"),
            ]),
            at("10.0.0.1:443")
        );
        assert_eq!(
            probe(&[(ANN_INCLUDE_OUTBOUND_CIDRS, "192.0.2.7/32")]),
            at("192.0.2.7:1")
        );
        assert_eq!(
            probe(&[(ANN_INCLUDE_OUTBOUND_CIDRS, "2001:db8::/32")]),
            None
        );
    }

    #[test]
    fn lists_ranges_and_stars() {
        let c = capture(&[
            (ANN_INCLUDE_INBOUND_PORTS, "*"),
            (ANN_INCLUDE_OUTBOUND_PORTS, "81-82, 80"),
        ])
        .unwrap();
        assert_eq!(
            c.args(),
            [
                "--proxy-uid",
                "1337",
                "--include-outbound-ports",
                "80,81,82"
            ]
        );
        for (pairs, annotation, needle) in [
            (
                &[(ANN_INCLUDE_INBOUND_PORTS, "9000-8000")][..],
                ANN_INCLUDE_INBOUND_PORTS,
                "a range is low-high",
            ),
            (
                &[(ANN_SKIP_OUTBOUND_CIDRS, "10.0.0.0/33")],
                ANN_SKIP_OUTBOUND_CIDRS,
                "/33",
            ),
            (
                &[
                    (ANN_INCLUDE_OUTBOUND_CIDRS, "10.0.0.0/8"),
                    (ANN_SKIP_OUTBOUND_CIDRS, "10.1.0.0/16"),
                ],
                ANN_INCLUDE_OUTBOUND_CIDRS,
                "10.0.0.0/8 overlaps outrider.io/skip-outbound-cidrs 10.1.0.0/16",
            ),
        ] {
            let e = capture(pairs).unwrap_err();
            assert_eq!(e.annotation, annotation, "{e:?}");
            assert!(e.message.contains(needle), "{e:?}");
        }
    }
}
