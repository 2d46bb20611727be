//! What the kernel holds: `iptables-save -t nat` output parsed into chains and rules, and a rule
//! normal form to compare rules robustly.
//!
//! `outrider init` reads the nat table before changing it (to add a jump rule only when it is
//! missing, and to know what cleanup must delete) and after (to verify). `iptables-save` prints a
//! rule in its own canonical order, which may differ from the order options were given in; the
//! [`RuleKey`] normal form (the rule split into option groups, sorted) makes two spellings of the
//! same rule compare equal. Parsing never fails: lines it does not understand are ignored.

use std::collections::BTreeSet;

/// One rule as `iptables-save` printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedRule {
    /// The chain the rule is in.
    pub chain: String,
    /// The rule after `-A CHAIN `, exactly as printed (usable in a `-D CHAIN <spec>` line).
    pub spec: String,
    /// The normal form of `spec`.
    pub key: RuleKey,
}

impl SavedRule {
    /// The rule's target (`-j X`), if any.
    pub fn target(&self) -> Option<&str> {
        self.key.target()
    }
}

/// A rule's options grouped (`-m tcp`, `--dport 80`, `! -d 10.0.0.0/8`) and sorted: rules that
/// differ only in option order have equal keys.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleKey(Vec<Vec<String>>);

impl RuleKey {
    /// Normalizes a rule spec (the part after `-A CHAIN`).
    pub fn parse(spec: &str) -> RuleKey {
        let mut groups: Vec<Vec<String>> = Vec::new();
        let mut negate = false;
        for token in tokenize(spec) {
            if token == "!" {
                negate = true;
                continue;
            }
            if token.starts_with('-') && token.len() > 1 || groups.is_empty() {
                let mut group = Vec::new();
                if negate {
                    group.push("!".to_owned());
                    negate = false;
                }
                group.push(token);
                groups.push(group);
            } else if let Some(last) = groups.last_mut() {
                last.push(token);
            }
        }
        groups.sort();
        RuleKey(groups)
    }

    /// The `-j` target of the rule, if any.
    pub fn target(&self) -> Option<&str> {
        self.0
            .iter()
            .find(|g| g.len() == 2 && (g[0] == "-j" || g[0] == "--jump"))
            .map(|g| g[1].as_str())
    }
}

/// The nat table of one family as `iptables-save -t nat` showed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatState {
    /// Every chain declared in the table (built-in and user-defined).
    pub chains: BTreeSet<String>,
    /// Every rule, in the order printed (chain by chain, in rule order).
    pub rules: Vec<SavedRule>,
}

impl NatState {
    /// Parses `iptables-save` output, keeping only the `nat` table. Output without a nat table
    /// (e.g. a namespace where nothing created it yet) is an empty state.
    pub fn parse(save_output: &str) -> NatState {
        let mut state = NatState::default();
        let mut in_nat = false;
        for line in save_output.lines() {
            let line = line.trim_end();
            if let Some(table) = line.strip_prefix('*') {
                in_nat = table.trim() == "nat";
            } else if line == "COMMIT" {
                in_nat = false;
            } else if !in_nat {
                continue;
            } else if let Some(decl) = line.strip_prefix(':') {
                if let Some(name) = decl.split_whitespace().next() {
                    state.chains.insert(name.to_owned());
                }
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
                state.rules.push(SavedRule {
                    chain: chain.to_owned(),
                    spec: spec.to_owned(),
                    key: RuleKey::parse(spec),
                });
            }
        }
        state
    }

    /// The rules in `chain`, in order.
    pub fn chain_rules<'a>(&'a self, chain: &'a str) -> impl Iterator<Item = &'a SavedRule> + 'a {
        self.rules.iter().filter(move |r| r.chain == chain)
    }
}

/// Whether `iptables-save` output (all tables) shows that this iptables is in use: any rule, any
/// user-defined chain, or a built-in chain whose policy is not ACCEPT.
pub fn shows_rules(save_output: &str) -> bool {
    const BUILTIN: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];
    save_output.lines().any(|line| {
        if line.starts_with("-A ") {
            return true;
        }
        if let Some(decl) = line.strip_prefix(':') {
            let mut parts = decl.split_whitespace();
            let name = parts.next().unwrap_or_default();
            let policy = parts.next().unwrap_or_default();
            return !BUILTIN.contains(&name) || policy != "ACCEPT";
        }
        false
    })
}

/// Splits a rule spec into tokens the way `iptables-restore` does: whitespace-separated, with
/// double quotes grouping and backslash escaping inside quotes.
pub fn tokenize(spec: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut current = String::new();
    let mut in_token = false;
    let mut quoted = false;
    let mut chars = spec.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_token = true;
            }
            '\\' if quoted => {
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if in_token {
                    tokens.push(std::mem::take(&mut current));
                    in_token = false;
                }
            }
            c => {
                current.push(c);
                in_token = true;
            }
        }
    }
    if in_token {
        tokens.push(current);
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "\
# Generated by iptables-nft-save v1.8.9 (nf_tables) on Wed Nov 25 10:29:29 2026
*filter
:INPUT ACCEPT [0:0]
-A INPUT -p udp -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [3:180]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:OUTRIDER_INBOUND - [0:0]
-A PREROUTING -p tcp -m comment --comment \"outrider: inbound capture\" -j OUTRIDER_INBOUND
-A OUTRIDER_INBOUND -p tcp -m tcp --dport 15020 -m comment --comment \"a \\\"q\\\" b\" -j RETURN
COMMIT
# Completed on Wed Nov 25 10:29:29 2026
";

    #[test]
    fn parses_only_the_nat_table() {
        let s = NatState::parse(SAVE);
        assert_eq!(s.chains.len(), 5);
        assert!(s.chains.contains("OUTRIDER_INBOUND"));
        assert_eq!(s.rules.len(), 2);
        assert_eq!(s.rules[0].chain, "PREROUTING");
        assert_eq!(s.rules[0].target(), Some("OUTRIDER_INBOUND"));
        assert_eq!(s.chain_rules("OUTRIDER_INBOUND").count(), 1);
        assert_eq!(NatState::parse(""), NatState::default());
    }

    #[test]
    fn tokenizes_quotes_and_escapes() {
        assert_eq!(
            tokenize(r#"-m comment --comment "a \"q\" b"  -j RETURN"#),
            ["-m", "comment", "--comment", "a \"q\" b", "-j", "RETURN"]
        );
        assert_eq!(tokenize(r#"--comment """#), ["--comment", ""]);
    }

    #[test]
    fn keys_ignore_option_order_but_not_values_or_negation() {
        let a = RuleKey::parse(
            r#"-p tcp -m owner --uid-owner 1337 -m comment --comment "x y" -j RETURN"#,
        );
        let b = RuleKey::parse(
            r#"-p tcp -m comment --comment "x y" -m owner --uid-owner 1337 -j RETURN"#,
        );
        let c = RuleKey::parse(
            r#"-p tcp -m comment --comment "x y" -m owner --uid-owner 1338 -j RETURN"#,
        );
        let d = RuleKey::parse(
            r#"! -p tcp -m comment --comment "x y" -m owner --uid-owner 1337 -j RETURN"#,
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        assert_eq!(a.target(), Some("RETURN"));
    }

    #[test]
    fn detects_a_used_iptables() {
        assert!(!shows_rules(""));
        assert!(!shows_rules(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [5:300]\nCOMMIT\n"
        ));
        assert!(shows_rules(
            "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n"
        ));
        assert!(shows_rules("*filter\n:MY_CHAIN - [0:0]\nCOMMIT\n"));
        assert!(shows_rules("*filter\n:FORWARD DROP [0:0]\nCOMMIT\n"));
    }
}
