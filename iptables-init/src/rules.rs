//! The capture rules as data, and their rendering to `iptables-restore` input. Pure and
//! deterministic: the same [`Config`] (and the same [`NatState`]) always renders the same bytes,
//! which the golden tests pin down.
//!
//! Layout (nat table, per family, istio-iptables style):
//!
//! ```text
//! PREROUTING  -p tcp -j OUTRIDER_INBOUND
//! OUTRIDER_INBOUND      RETURN for the admin, inbound and outbound ports and --exclude-inbound-ports,
//!                       then -p tcp -j OUTRIDER_IN_REDIRECT (or, with --include-inbound-ports,
//!                       --dport <port> -j OUTRIDER_IN_REDIRECT for each included port)
//! OUTRIDER_IN_REDIRECT  -p tcp -j REDIRECT --to-ports <inbound>
//! OUTPUT      -p tcp -j OUTRIDER_OUTPUT
//! OUTRIDER_OUTPUT       RETURN for the proxy uid, -o lo, loopback destinations,
//!                       --exclude-outbound-ports, --exclude-outbound-cidrs;
//!                       then -j OUTRIDER_REDIRECT (or, with --include-outbound-cidrs and/or
//!                       --include-outbound-ports, [-d <range>] [--dport <port>]
//!                       -j OUTRIDER_REDIRECT for each included range of the family and port)
//! OUTRIDER_REDIRECT     -p tcp -j REDIRECT --to-ports <outbound>
//! ```
//!
//! Every rule carries `-m comment --comment "outrider: ..."`. Rules are rendered in the canonical
//! order `iptables-save` prints options in, so what we apply reads back byte for byte.
//!
//! Idempotency: the restore input declares our chains (`:OUTRIDER_X - [0:0]`), which under
//! `--noflush` creates them or flushes them, then appends their rules: re-running replaces their
//! content. The jump rules live in the built-in chains, which we never flush; for those the input is
//! computed from the current [`NatState`]: a jump is appended only when it is missing, and any
//! other reference to our chains (a duplicate, or a jump from an older version) is deleted with a
//! `-D` line. So a run converges to exactly one jump per built-in chain, whatever was there.

use std::fmt::Write as _;

use crate::cidr::{Cidr, Family};
use crate::config::{Config, Port};
use crate::state::{NatState, RuleKey};

/// Our chain for inbound TCP, jumped to from PREROUTING.
pub const INBOUND_CHAIN: &str = "OUTRIDER_INBOUND";
/// Our chain that redirects inbound TCP to the proxy's inbound port.
pub const IN_REDIRECT_CHAIN: &str = "OUTRIDER_IN_REDIRECT";
/// Our chain for the app's outbound TCP, jumped to from OUTPUT.
pub const OUTPUT_CHAIN: &str = "OUTRIDER_OUTPUT";
/// Our chain that redirects outbound TCP to the proxy's outbound port.
pub const REDIRECT_CHAIN: &str = "OUTRIDER_REDIRECT";
/// Every chain `outrider init` owns, in declaration order. Cleanup deletes exactly these.
pub const OWN_CHAINS: [&str; 4] = [
    INBOUND_CHAIN,
    IN_REDIRECT_CHAIN,
    OUTPUT_CHAIN,
    REDIRECT_CHAIN,
];

/// What a matching packet does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Leave our chain: the packet is not captured.
    Return,
    /// Continue in another chain.
    Jump(&'static str),
    /// Redirect to a local port (the proxy's listener).
    Redirect(Port),
}

/// One iptables rule in the nat table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The chain the rule is appended to.
    pub chain: &'static str,
    /// `-d`: destination network.
    pub destination: Option<Cidr>,
    /// `-o`: output interface.
    pub out_interface: Option<&'static str>,
    /// `-p tcp`.
    pub tcp: bool,
    /// `-m tcp --dport`: destination port (needs `tcp`).
    pub dport: Option<Port>,
    /// `-m owner --uid-owner`: the sending socket's uid.
    pub uid_owner: Option<u32>,
    /// The text after `outrider: ` in the rule's comment.
    pub comment: String,
    /// `-j`.
    pub target: Target,
}

impl Rule {
    fn new(chain: &'static str, comment: impl Into<String>, target: Target) -> Rule {
        Rule {
            chain,
            destination: None,
            out_interface: None,
            tcp: false,
            dport: None,
            uid_owner: None,
            comment: comment.into(),
            target,
        }
    }

    fn tcp(mut self) -> Rule {
        self.tcp = true;
        self
    }

    fn dport(mut self, port: Port) -> Rule {
        self.tcp = true;
        self.dport = Some(port);
        self
    }

    fn destination(mut self, cidr: Cidr) -> Rule {
        self.destination = Some(cidr);
        self
    }

    /// The rule after `-A CHAIN `, in `iptables-save`'s canonical option order.
    pub fn spec(&self) -> String {
        let mut s = String::new();
        // A /0 network matches every address: iptables-save prints no `-d` for it, so neither
        // do we (the rule then reads back identically).
        if let Some(d) = self.destination.filter(|d| d.prefix() > 0) {
            let _ = write!(s, "-d {d} ");
        }
        if let Some(o) = self.out_interface {
            let _ = write!(s, "-o {o} ");
        }
        if self.tcp {
            s.push_str("-p tcp ");
        }
        if let Some(p) = self.dport {
            let _ = write!(s, "-m tcp --dport {p} ");
        }
        if let Some(uid) = self.uid_owner {
            let _ = write!(s, "-m owner --uid-owner {uid} ");
        }
        let _ = write!(s, "-m comment --comment \"outrider: {}\" ", self.comment);
        match &self.target {
            Target::Return => s.push_str("-j RETURN"),
            Target::Jump(chain) => {
                let _ = write!(s, "-j {chain}");
            }
            Target::Redirect(p) => {
                let _ = write!(s, "-j REDIRECT --to-ports {p}");
            }
        }
        s
    }

    /// The `-A CHAIN spec` line.
    pub fn append_line(&self) -> String {
        format!("-A {} {}", self.chain, self.spec())
    }

    /// The rule's normal form, for comparing with what `iptables-save` prints.
    pub fn key(&self) -> RuleKey {
        RuleKey::parse(&self.spec())
    }
}

/// The complete capture rule set of one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    /// The family these rules are for.
    pub family: Family,
    /// Rules in our own chains, grouped by chain in [`OWN_CHAINS`] order, in rule order.
    pub rules: Vec<Rule>,
    /// The jump rules appended to the built-in chains PREROUTING and OUTPUT.
    pub jumps: Vec<Rule>,
}

impl RuleSet {
    /// Builds the rules of `family` for `config`. Ranges of the other family are left out.
    pub fn new(config: &Config, family: Family) -> RuleSet {
        let mut inbound = Vec::new();
        for (what, port) in [
            ("admin", config.admin_port),
            ("inbound", config.inbound_port),
            ("outbound", config.outbound_port),
        ] {
            inbound.push(
                Rule::new(
                    INBOUND_CHAIN,
                    format!("inbound: skip proxy {what} port {port}"),
                    Target::Return,
                )
                .dport(port),
            );
        }
        for &port in &config.exclude_inbound_ports {
            inbound.push(
                Rule::new(
                    INBOUND_CHAIN,
                    format!("inbound: skip excluded port {port}"),
                    Target::Return,
                )
                .dport(port),
            );
        }
        if config.include_inbound_ports.is_empty() {
            inbound.push(
                Rule::new(
                    INBOUND_CHAIN,
                    "inbound: capture other TCP",
                    Target::Jump(IN_REDIRECT_CHAIN),
                )
                .tcp(),
            );
        } else {
            // Only the included ports jump; the rest falls off the chain's end, uncaptured.
            for &port in &config.include_inbound_ports {
                inbound.push(
                    Rule::new(
                        INBOUND_CHAIN,
                        format!("inbound: capture included port {port}"),
                        Target::Jump(IN_REDIRECT_CHAIN),
                    )
                    .dport(port),
                );
            }
        }

        let in_redirect = vec![Rule::new(
            IN_REDIRECT_CHAIN,
            format!("inbound: redirect to proxy port {}", config.inbound_port),
            Target::Redirect(config.inbound_port),
        )
        .tcp()];

        let mut output = Vec::new();
        let mut uid = Rule::new(
            OUTPUT_CHAIN,
            format!("outbound: skip proxy uid {}", config.proxy_uid),
            Target::Return,
        );
        uid.uid_owner = Some(config.proxy_uid);
        output.push(uid);
        let mut lo = Rule::new(
            OUTPUT_CHAIN,
            "outbound: skip loopback interface",
            Target::Return,
        );
        lo.out_interface = Some("lo");
        output.push(lo);
        output.push(
            Rule::new(
                OUTPUT_CHAIN,
                "outbound: skip loopback destination",
                Target::Return,
            )
            .destination(Cidr::loopback(family)),
        );
        for &port in &config.exclude_outbound_ports {
            output.push(
                Rule::new(
                    OUTPUT_CHAIN,
                    format!("outbound: skip excluded port {port}"),
                    Target::Return,
                )
                .dport(port),
            );
        }
        for &cidr in config
            .exclude_outbound_cidrs
            .iter()
            .filter(|c| c.family() == family)
        {
            output.push(
                Rule::new(
                    OUTPUT_CHAIN,
                    format!("outbound: skip excluded range {cidr}"),
                    Target::Return,
                )
                .destination(cidr),
            );
        }
        // Which destinations are captured: every (range, port) pair of the include lists, an
        // empty list meaning "any". A family with include ranges of the other family only
        // captures nothing.
        let ranges: Vec<Option<Cidr>> = if config.include_outbound_cidrs.is_empty() {
            vec![None]
        } else {
            config
                .include_outbound_cidrs
                .iter()
                .filter(|c| c.family() == family)
                .map(|&c| Some(c))
                .collect()
        };
        let ports: Vec<Option<Port>> = if config.include_outbound_ports.is_empty() {
            vec![None]
        } else {
            config
                .include_outbound_ports
                .iter()
                .map(|&p| Some(p))
                .collect()
        };
        for &range in &ranges {
            for &port in &ports {
                let comment = match (range, port) {
                    (None, None) => "outbound: capture other TCP".to_owned(),
                    (Some(r), None) => format!("outbound: capture included range {r}"),
                    (None, Some(p)) => format!("outbound: capture included port {p}"),
                    (Some(r), Some(p)) => {
                        format!("outbound: capture included port {p} in range {r}")
                    }
                };
                let mut rule = Rule::new(OUTPUT_CHAIN, comment, Target::Jump(REDIRECT_CHAIN));
                if let Some(r) = range {
                    rule = rule.destination(r);
                }
                if let Some(p) = port {
                    rule = rule.dport(p);
                }
                output.push(rule);
            }
        }

        let redirect = vec![Rule::new(
            REDIRECT_CHAIN,
            format!("outbound: redirect to proxy port {}", config.outbound_port),
            Target::Redirect(config.outbound_port),
        )
        .tcp()];

        let mut rules = inbound;
        rules.extend(in_redirect);
        rules.extend(output);
        rules.extend(redirect);
        RuleSet {
            family,
            rules,
            jumps: jump_rules(),
        }
    }

    /// The rules of our chain `chain`, in order.
    pub fn chain_rules<'a>(&'a self, chain: &'a str) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules.iter().filter(move |r| r.chain == chain)
    }
}

/// The jump rules from the built-in chains into ours. They do not depend on the config.
pub fn jump_rules() -> Vec<Rule> {
    vec![
        Rule::new("PREROUTING", "inbound capture", Target::Jump(INBOUND_CHAIN)).tcp(),
        Rule::new("OUTPUT", "outbound capture", Target::Jump(OUTPUT_CHAIN)).tcp(),
    ]
}

fn is_own_chain(chain: &str) -> bool {
    OWN_CHAINS.contains(&chain)
}

/// References to our chains from chains that are not ours, which the next transaction must delete
/// (as `-D CHAIN spec` lines), keeping the first exact copy of each wanted jump in `keep`.
fn stale_references(state: &NatState, keep: &[Rule]) -> Vec<String> {
    let mut kept = vec![false; keep.len()];
    let mut lines = Vec::new();
    for rule in &state.rules {
        if is_own_chain(&rule.chain) || !rule.target().is_some_and(is_own_chain) {
            continue;
        }
        let wanted = keep
            .iter()
            .position(|j| j.chain == rule.chain && j.key() == rule.key);
        match wanted {
            Some(i) if !kept[i] => kept[i] = true,
            _ => lines.push(format!("-D {} {}", rule.chain, rule.spec)),
        }
    }
    lines
}

/// The `iptables-restore --noflush` input that makes the nat table hold exactly `rules`, given
/// what it holds now (`state`; an empty state for a fresh namespace).
pub fn apply_input(rules: &RuleSet, state: &NatState) -> String {
    let mut out = String::from("*nat\n");
    for chain in OWN_CHAINS {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for line in stale_references(state, &rules.jumps) {
        let _ = writeln!(out, "{line}");
    }
    for rule in &rules.rules {
        let _ = writeln!(out, "{}", rule.append_line());
    }
    for jump in &rules.jumps {
        let key = jump.key();
        let present = state.chain_rules(jump.chain).any(|r| r.key == key);
        if !present {
            let _ = writeln!(out, "{}", jump.append_line());
        }
    }
    out.push_str("COMMIT\n");
    out
}

/// The `iptables-restore --noflush` input that removes every trace of `outrider init` from the
/// nat table described by `state`: references to our chains, then our chains' rules, then our
/// chains. `None` when there is nothing to remove. Nothing else in the table is touched.
pub fn cleanup_input(state: &NatState) -> Option<String> {
    let deletes = stale_references(state, &[]);
    let chains: Vec<&str> = OWN_CHAINS
        .into_iter()
        .filter(|c| state.chains.contains(*c))
        .collect();
    if deletes.is_empty() && chains.is_empty() {
        return None;
    }
    let mut out = String::from("*nat\n");
    for line in deletes {
        let _ = writeln!(out, "{line}");
    }
    for chain in &chains {
        let _ = writeln!(out, "-F {chain}");
    }
    for chain in &chains {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    Some(out)
}

/// The state a namespace is in right after `rules` were applied to a fresh one: what a dry-run
/// cleanup assumes it will remove.
pub fn applied_state(rules: &RuleSet) -> NatState {
    let text = {
        let mut t = String::from("*nat\n");
        for chain in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
            let _ = writeln!(t, ":{chain} ACCEPT [0:0]");
        }
        for chain in OWN_CHAINS {
            let _ = writeln!(t, ":{chain} - [0:0]");
        }
        for rule in rules.jumps.iter().chain(&rules.rules) {
            let _ = writeln!(t, "{}", rule.append_line());
        }
        t.push_str("COMMIT\n");
        t
    };
    NatState::parse(&text)
}

/// Compares the nat table read back after applying with the rules we meant to apply. Our chains
/// must hold exactly our rules in order; each jump must be present exactly once. Returns one
/// line per difference.
pub fn verify(rules: &RuleSet, state: &NatState) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    for chain in OWN_CHAINS {
        if !state.chains.contains(chain) {
            problems.push(format!("chain {chain} is missing"));
            continue;
        }
        let want: Vec<RuleKey> = rules.chain_rules(chain).map(Rule::key).collect();
        let have: Vec<&crate::state::SavedRule> = state.chain_rules(chain).collect();
        let have_keys: Vec<&RuleKey> = have.iter().map(|r| &r.key).collect();
        if want.iter().collect::<Vec<_>>() != have_keys {
            for rule in rules.chain_rules(chain) {
                let n = have.iter().filter(|h| h.key == rule.key()).count();
                if n != 1 {
                    problems.push(format!(
                        "expected once, found {n} times: {}",
                        rule.append_line()
                    ));
                }
            }
            for h in &have {
                if !want.contains(&h.key) {
                    problems.push(format!("unexpected rule: -A {} {}", h.chain, h.spec));
                }
            }
            if problems.is_empty() {
                problems.push(format!("rules of {chain} are out of order"));
            }
        }
    }
    for jump in &rules.jumps {
        let key = jump.key();
        let n = state
            .chain_rules(jump.chain)
            .filter(|r| r.key == key)
            .count();
        if n != 1 {
            problems.push(format!(
                "expected once, found {n} times: {}",
                jump.append_line()
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Whether `state` holds no trace of `outrider init` (after a cleanup).
pub fn is_clean(state: &NatState) -> bool {
    cleanup_input(state).is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Action, BackendMode, Ipv6Mode};

    fn config() -> Config {
        Config {
            dry_run: false,
            action: Action::Apply,
            proxy_uid: 1337,
            inbound_port: Port::new(15006).unwrap(),
            outbound_port: Port::new(15001).unwrap(),
            admin_port: Port::new(15020).unwrap(),
            exclude_inbound_ports: vec![],
            exclude_outbound_ports: vec![],
            exclude_outbound_cidrs: vec![],
            include_outbound_cidrs: vec![],
            include_inbound_ports: vec![],
            include_outbound_ports: vec![],
            ipv6: Ipv6Mode::Auto,
            backend: BackendMode::Auto,
        }
    }

    #[test]
    fn applied_rules_verify_and_rerun_adds_no_jumps() {
        let rs = RuleSet::new(&config(), Family::V4);
        let state = applied_state(&rs);
        assert_eq!(verify(&rs, &state), Ok(()));
        let again = apply_input(&rs, &state);
        assert!(!again.contains("-A PREROUTING"), "{again}");
        assert!(!again.contains("-A OUTPUT "), "{again}");
        assert!(!again.contains("-D "), "{again}");
        let fresh = apply_input(&rs, &NatState::default());
        assert!(fresh.contains("-A PREROUTING -p tcp -m comment"), "{fresh}");
    }

    #[test]
    fn verify_reports_missing_duplicate_and_foreign_rules() {
        let rs = RuleSet::new(&config(), Family::V4);
        assert!(verify(&rs, &NatState::default()).unwrap_err()[0].contains("missing"));
        let mut state = applied_state(&rs);
        let dup = state.rules[0].clone();
        state.rules.push(dup);
        let extra = NatState::parse("*nat\n-A OUTRIDER_REDIRECT -p udp -j RETURN\nCOMMIT\n");
        state.rules.extend(extra.rules);
        let errs = verify(&rs, &state).unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.contains("found 2 times: -A PREROUTING")),
            "{errs:#?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.contains("unexpected rule: -A OUTRIDER_REDIRECT -p udp")),
            "{errs:#?}"
        );
    }

    #[test]
    fn cleanup_of_nothing_is_nothing() {
        assert_eq!(cleanup_input(&NatState::default()), None);
        let foreign = NatState::parse(
            "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -p udp -j RETURN\nCOMMIT\n",
        );
        assert_eq!(cleanup_input(&foreign), None);
        assert!(is_clean(&foreign));
    }

    #[test]
    fn other_family_ranges_are_left_out() {
        let mut cfg = config();
        cfg.exclude_outbound_cidrs = vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        let v4 = RuleSet::new(&cfg, Family::V4);
        let v6 = RuleSet::new(&cfg, Family::V6);
        let text = |rs: &RuleSet| {
            rs.rules
                .iter()
                .map(Rule::append_line)
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert!(text(&v4).contains("10.0.0.0/8") && !text(&v4).contains("2001:db8"));
        assert!(text(&v6).contains("2001:db8::/32") && !text(&v6).contains("10.0.0.0"));
        assert!(text(&v6).contains("-d ::1/128"));
    }
}
