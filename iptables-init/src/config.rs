//! The flags of `outrider init` ([`InitArgs`], parsed by clap, each also read from an
//! `OUTRIDER_<FLAG>` environment variable) and the validated [`Config`] built from them.
//!
//! Single values are parsed into real types by clap ([`Port`], [`Cidr`], `u32` uid), so a bad port
//! or network is a clap usage error (exit 2, the flag named in the message). Checks that span
//! several flags (inbound port equal to outbound port, an include range overlapping an exclude
//! range, IPv6 ranges with `--ipv6 off`) live in [`Config::from_args`], which reports every
//! problem at once, each with the flag that caused it.

use std::fmt;
use std::str::FromStr;

use crate::cidr::{Cidr, Family};
use crate::ports;

/// Flags of `outrider init` (DESIGN.md section 8). Every flag also reads `OUTRIDER_<FLAG>`; a flag
/// given on the command line wins over the variable. The switches accept `true/false`, `1/0`,
/// `yes/no`, `on/off` in their variables.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// Print the iptables-restore input instead of applying it (needs no root and no iptables).
    #[arg(long, env = "OUTRIDER_DRY_RUN", value_parser = clap::builder::BoolishValueParser::new())]
    pub dry_run: bool,

    /// Remove the rules `outrider init` added (and nothing else) instead of adding them.
    #[arg(long, env = "OUTRIDER_CLEANUP", value_parser = clap::builder::BoolishValueParser::new())]
    pub cleanup: bool,

    /// The uid the proxy runs as; its traffic is never captured.
    #[arg(long, env = "OUTRIDER_PROXY_UID", value_name = "UID", default_value_t = ports::PROXY_UID)]
    pub proxy_uid: u32,

    /// The proxy's inbound listener port: inbound TCP is redirected here.
    #[arg(long, env = "OUTRIDER_INBOUND_PORT", value_name = "PORT", default_value_t = Port(ports::INBOUND))]
    pub inbound_port: Port,

    /// The proxy's outbound listener port: the app's outbound TCP is redirected here.
    #[arg(long, env = "OUTRIDER_OUTBOUND_PORT", value_name = "PORT", default_value_t = Port(ports::OUTBOUND))]
    pub outbound_port: Port,

    /// The proxy's admin port: never captured inbound.
    #[arg(long, env = "OUTRIDER_ADMIN_PORT", value_name = "PORT", default_value_t = Port(ports::ADMIN))]
    pub admin_port: Port,

    /// Inbound destination ports that bypass the proxy (comma-separated).
    #[arg(
        long,
        env = "OUTRIDER_EXCLUDE_INBOUND_PORTS",
        value_name = "PORT,...",
        value_delimiter = ','
    )]
    pub exclude_inbound_ports: Vec<Port>,

    /// Outbound destination ports that bypass the proxy (comma-separated).
    #[arg(
        long,
        env = "OUTRIDER_EXCLUDE_OUTBOUND_PORTS",
        value_name = "PORT,...",
        value_delimiter = ','
    )]
    pub exclude_outbound_ports: Vec<Port>,

    /// Outbound destination networks that bypass the proxy (comma-separated, IPv4 and IPv6).
    #[arg(
        long,
        env = "OUTRIDER_EXCLUDE_OUTBOUND_CIDRS",
        value_name = "CIDR,...",
        value_delimiter = ','
    )]
    pub exclude_outbound_cidrs: Vec<Cidr>,

    /// Capture outbound traffic only to these networks (comma-separated); default: all.
    #[arg(
        long,
        env = "OUTRIDER_INCLUDE_OUTBOUND_CIDRS",
        value_name = "CIDR,...",
        value_delimiter = ','
    )]
    pub include_outbound_cidrs: Vec<Cidr>,

    /// Capture inbound traffic only to these ports (comma-separated); default: every port but
    /// the excluded ones.
    #[arg(
        long,
        env = "OUTRIDER_INCLUDE_INBOUND_PORTS",
        value_name = "PORT,...",
        value_delimiter = ','
    )]
    pub include_inbound_ports: Vec<Port>,

    /// Capture outbound traffic only to these destination ports (comma-separated; with
    /// --include-outbound-cidrs, only to these ports in those ranges); default: every port.
    #[arg(
        long,
        env = "OUTRIDER_INCLUDE_OUTBOUND_PORTS",
        value_name = "PORT,...",
        value_delimiter = ','
    )]
    pub include_outbound_ports: Vec<Port>,

    /// Program IPv6 too: auto = when the namespace has a global IPv6 address.
    #[arg(long, env = "OUTRIDER_IPV6", value_enum, default_value_t = Ipv6Mode::Auto)]
    pub ipv6: Ipv6Mode,

    /// iptables backend: auto = legacy only if legacy already holds rules, else nft.
    #[arg(long, env = "OUTRIDER_BACKEND", value_enum, default_value_t = BackendMode::Auto)]
    pub backend: BackendMode,
}

/// A TCP port the rules name: 1..=65535 (0 is not a port a connection can use).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port(u16);

impl Port {
    /// Makes a port; `None` for 0.
    pub fn new(port: u16) -> Option<Port> {
        (port != 0).then_some(Port(port))
    }

    /// The port number.
    pub fn get(self) -> u16 {
        self.0
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Port {
    type Err = String;

    fn from_str(s: &str) -> Result<Port, String> {
        let t = s.trim();
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("`{s}` is not a port number (expected 1-65535)"));
        }
        t.parse::<u32>()
            .ok()
            .and_then(|n| u16::try_from(n).ok())
            .and_then(Port::new)
            .ok_or_else(|| format!("port {t} is out of range (expected 1-65535)"))
    }
}

/// Whether to program IPv6 (`--ipv6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ipv6Mode {
    /// When applying: IPv6 too when the namespace has a global IPv6 address (in
    /// `/proc/net/if_inet6`). In a dry run: always print both families, so the output does not
    /// depend on the machine.
    Auto,
    /// Always program IPv6 too (fails if ip6tables cannot).
    On,
    /// IPv4 only.
    Off,
}

/// Which iptables implementation to drive (`--backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendMode {
    /// Legacy when `iptables-legacy-save` shows rules in any table, else nft.
    Auto,
    /// `iptables-nft-restore` and friends.
    Nft,
    /// `iptables-legacy-restore` and friends.
    Legacy,
}

/// What the run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Add (or refresh) the capture rules.
    Apply,
    /// Remove the capture rules.
    Cleanup,
}

/// A validated `outrider init` configuration: every value well-typed and consistent.
///
/// Port and CIDR lists are sorted and deduplicated, so the rules do not depend on flag order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Print instead of applying.
    pub dry_run: bool,
    /// Add or remove the rules.
    pub action: Action,
    /// The proxy's uid; exempt from outbound capture.
    pub proxy_uid: u32,
    /// Where inbound TCP is redirected.
    pub inbound_port: Port,
    /// Where outbound TCP is redirected.
    pub outbound_port: Port,
    /// The admin port, never captured inbound.
    pub admin_port: Port,
    /// Extra inbound ports that are not captured (without the proxy's own ports).
    pub exclude_inbound_ports: Vec<Port>,
    /// Outbound destination ports that are not captured.
    pub exclude_outbound_ports: Vec<Port>,
    /// Outbound destination networks that are not captured.
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// When not empty, only these outbound destinations are captured.
    pub include_outbound_cidrs: Vec<Cidr>,
    /// When not empty, only these inbound ports are captured.
    pub include_inbound_ports: Vec<Port>,
    /// When not empty, only these outbound destination ports are captured.
    pub include_outbound_ports: Vec<Port>,
    /// IPv6 programming mode.
    pub ipv6: Ipv6Mode,
    /// Backend selection mode.
    pub backend: BackendMode,
}

/// One invalid setting: the flag and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The flag, e.g. `--outbound-port`.
    pub flag: &'static str,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: {}", self.flag, self.message)
    }
}

impl Config {
    /// Validates the flags as a whole; returns every problem found, not just the first.
    pub fn from_args(args: &InitArgs) -> Result<Config, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut err =
            |flag: &'static str, message: String| errors.push(ConfigError { flag, message });

        if args.inbound_port == args.outbound_port {
            err(
                "--outbound-port",
                format!(
                    "{} is also the --inbound-port; the proxy needs two different listener ports",
                    args.outbound_port
                ),
            );
        }
        for (flag, port) in [
            ("--inbound-port", args.inbound_port),
            ("--outbound-port", args.outbound_port),
        ] {
            if port == args.admin_port {
                err(
                    flag,
                    format!("{port} is also the --admin-port; the admin server needs its own port"),
                );
            }
        }
        for inc in &args.include_outbound_cidrs {
            for exc in &args.exclude_outbound_cidrs {
                if inc.overlaps(exc) {
                    err(
                        "--include-outbound-cidrs",
                        format!(
                            "{inc} overlaps --exclude-outbound-cidrs {exc}; a range cannot be both \
                             captured and exempt: split the include range or drop one of them"
                        ),
                    );
                }
            }
        }
        for port in &args.include_inbound_ports {
            if args.exclude_inbound_ports.contains(port) {
                err(
                    "--include-inbound-ports",
                    format!(
                        "{port} is also in --exclude-inbound-ports; a port cannot be both \
                         captured and exempt: drop it from one of them"
                    ),
                );
            }
            for (what, own) in [
                ("--admin-port", args.admin_port),
                ("--inbound-port", args.inbound_port),
                ("--outbound-port", args.outbound_port),
            ] {
                if *port == own {
                    err(
                        "--include-inbound-ports",
                        format!("{port} is the proxy's {what}, which is never captured; drop it"),
                    );
                }
            }
        }
        for port in &args.include_outbound_ports {
            if args.exclude_outbound_ports.contains(port) {
                err(
                    "--include-outbound-ports",
                    format!(
                        "{port} is also in --exclude-outbound-ports; a port cannot be both \
                         captured and exempt: drop it from one of them"
                    ),
                );
            }
        }
        if args.ipv6 == Ipv6Mode::Off {
            for (flag, list) in [
                ("--exclude-outbound-cidrs", &args.exclude_outbound_cidrs),
                ("--include-outbound-cidrs", &args.include_outbound_cidrs),
            ] {
                for c in list.iter().filter(|c| c.family() == Family::V6) {
                    err(
                        flag,
                        format!("{c} is an IPv6 range but --ipv6 is off; use --ipv6 auto or on, or drop it"),
                    );
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }

        let own = [args.inbound_port, args.outbound_port, args.admin_port];
        let mut exclude_inbound_ports: Vec<Port> = args
            .exclude_inbound_ports
            .iter()
            .copied()
            .filter(|p| !own.contains(p))
            .collect();
        exclude_inbound_ports.sort();
        exclude_inbound_ports.dedup();
        let mut exclude_outbound_ports = args.exclude_outbound_ports.clone();
        exclude_outbound_ports.sort();
        exclude_outbound_ports.dedup();
        let mut exclude_outbound_cidrs = args.exclude_outbound_cidrs.clone();
        exclude_outbound_cidrs.sort();
        exclude_outbound_cidrs.dedup();
        let mut include_outbound_cidrs = args.include_outbound_cidrs.clone();
        include_outbound_cidrs.sort();
        include_outbound_cidrs.dedup();
        let mut include_inbound_ports = args.include_inbound_ports.clone();
        include_inbound_ports.sort();
        include_inbound_ports.dedup();
        let mut include_outbound_ports = args.include_outbound_ports.clone();
        include_outbound_ports.sort();
        include_outbound_ports.dedup();

        Ok(Config {
            dry_run: args.dry_run,
            action: if args.cleanup {
                Action::Cleanup
            } else {
                Action::Apply
            },
            proxy_uid: args.proxy_uid,
            inbound_port: args.inbound_port,
            outbound_port: args.outbound_port,
            admin_port: args.admin_port,
            exclude_inbound_ports,
            exclude_outbound_ports,
            exclude_outbound_cidrs,
            include_outbound_cidrs,
            include_inbound_ports,
            include_outbound_ports,
            ipv6: args.ipv6,
            backend: args.backend,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: InitArgs,
    }

    fn parse(argv: &[&str]) -> Result<InitArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("init").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn defaults_match_the_port_contract() {
        let cfg = Config::from_args(&parse(&[]).unwrap()).unwrap();
        assert_eq!(cfg.inbound_port.get(), ports::INBOUND);
        assert_eq!(cfg.outbound_port.get(), ports::OUTBOUND);
        assert_eq!(cfg.admin_port.get(), ports::ADMIN);
        assert_eq!(cfg.proxy_uid, ports::PROXY_UID);
        assert_eq!(cfg.ipv6, Ipv6Mode::Auto);
        assert_eq!(cfg.backend, BackendMode::Auto);
        assert_eq!(cfg.action, Action::Apply);
        assert!(!cfg.dry_run);
    }

    #[test]
    fn bad_single_values_are_usage_errors_naming_the_flag() {
        for (argv, needle) in [
            (&["--inbound-port", "0"][..], "--inbound-port"),
            (&["--inbound-port", "70000"], "out of range"),
            (&["--outbound-port", "abc"], "not a port number"),
            (
                &["--exclude-inbound-ports", "22,0"],
                "--exclude-inbound-ports",
            ),
            (&["--exclude-outbound-cidrs", "10.0.0.0/33"], "too long"),
            (
                &["--include-outbound-cidrs", "1.2.3"],
                "not an IPv4 or IPv6 address",
            ),
            (&["--proxy-uid=-1"], "--proxy-uid"),
            (&["--proxy-uid", "4294967296"], "--proxy-uid"),
            (&["--ipv6", "maybe"], "--ipv6"),
            (&["--backend", "iptables"], "--backend"),
        ] {
            let e = parse(argv).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{argv:?}");
            let text = e.to_string();
            assert!(text.contains(needle), "{argv:?}: {text}");
        }
    }

    #[test]
    fn cross_field_errors_are_all_reported() {
        let args = parse(&[
            "--inbound-port",
            "15020",
            "--outbound-port",
            "15020",
            "--include-outbound-cidrs",
            "10.0.0.0/8,2001:db8::/32",
            "--exclude-outbound-cidrs",
            "10.1.0.0/16",
            "--ipv6",
            "off",
        ])
        .unwrap();
        let errs = Config::from_args(&args).unwrap_err();
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert_eq!(errs.len(), 5, "{text:#?}");
        assert!(text[0].starts_with("invalid --outbound-port: 15020 is also the --inbound-port"));
        assert!(text[1].starts_with("invalid --inbound-port: 15020 is also the --admin-port"));
        assert!(text[2].starts_with("invalid --outbound-port: 15020 is also the --admin-port"));
        assert!(text[3].contains("10.0.0.0/8 overlaps --exclude-outbound-cidrs 10.1.0.0/16"));
        assert!(text[4].contains("2001:db8::/32 is an IPv6 range but --ipv6 is off"));
    }

    #[test]
    fn include_ports_that_are_excluded_or_the_proxys_own_are_refused() {
        let args = parse(&[
            "--include-inbound-ports",
            "8080,22,15020",
            "--exclude-inbound-ports",
            "22",
            "--include-outbound-ports",
            "443,80",
            "--exclude-outbound-ports",
            "443",
        ])
        .unwrap();
        let errs = Config::from_args(&args).unwrap_err();
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            text,
            [
                "invalid --include-inbound-ports: 22 is also in --exclude-inbound-ports; a port \
                 cannot be both captured and exempt: drop it from one of them",
                "invalid --include-inbound-ports: 15020 is the proxy's --admin-port, which is \
                 never captured; drop it",
                "invalid --include-outbound-ports: 443 is also in --exclude-outbound-ports; a \
                 port cannot be both captured and exempt: drop it from one of them",
            ]
        );
        let ok = parse(&["--include-inbound-ports", "9090,8080,9090"]).unwrap();
        let cfg = Config::from_args(&ok).unwrap();
        let p = |v: &[Port]| v.iter().map(|p| p.get()).collect::<Vec<_>>();
        assert_eq!(p(&cfg.include_inbound_ports), [8080, 9090]);
        assert!(cfg.include_outbound_ports.is_empty());
    }

    #[test]
    fn lists_are_sorted_deduplicated_and_skip_own_ports() {
        let args = parse(&[
            "--exclude-inbound-ports",
            "9090,22,15020,22,15006",
            "--exclude-outbound-ports",
            "443,80,443",
            "--exclude-outbound-cidrs",
            "2001:db8::/32,10.0.0.0/8,10.0.0.0/8",
        ])
        .unwrap();
        let cfg = Config::from_args(&args).unwrap();
        let p = |v: &[Port]| v.iter().map(|p| p.get()).collect::<Vec<_>>();
        assert_eq!(p(&cfg.exclude_inbound_ports), [22, 9090]);
        assert_eq!(p(&cfg.exclude_outbound_ports), [80, 443]);
        let c: Vec<String> = cfg
            .exclude_outbound_cidrs
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(c, ["10.0.0.0/8", "2001:db8::/32"]);
    }

    #[test]
    fn port_parsing() {
        assert_eq!("1".parse::<Port>().unwrap().get(), 1);
        assert_eq!("65535".parse::<Port>().unwrap().get(), 65535);
        assert!("0".parse::<Port>().is_err());
        assert!("65536".parse::<Port>().is_err());
        assert!("99999999999999999999".parse::<Port>().is_err());
        assert!("".parse::<Port>().is_err());
        assert!("+80".parse::<Port>().is_err());
        assert!(Port::new(0).is_none());
    }
}
