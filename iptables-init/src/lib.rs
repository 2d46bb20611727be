//! `outrider init`: the pod's init container. Builds the iptables rule set that sends inbound TCP to
//! the proxy's inbound listener and the app's outbound TCP to its outbound listener, applies it in
//! one `iptables-restore --noflush` transaction per address family, verifies it, and exits.
//!
//! Modules: [`ports`] (the shared port contract), [`cidr`] and [`config`] (flags parsed into
//! validated types), [`rules`] (the rule set as data and its rendering: pure), [`state`] (parsing
//! `iptables-save`), [`backend`] (choosing and running the iptables binaries).
//!
//! Exit codes: 0 success, 1 runtime failure (missing binary, kernel feature, verification), 2 bad
//! flags. On failure nothing stays half-applied: each family is one transaction, and if a later
//! family (IPv6) or the verification fails, the families already applied are cleaned up again.
//!
//! A run: choose the backend (`--backend auto`: legacy only when `iptables-legacy-save` shows
//! rules, else nft; one stderr line says which and why), choose the families (`--ipv6 auto`: IPv6
//! too when the namespace has a global IPv6 address), check every binary is installed, then per
//! family: read `<save> -t nat`, render the restore input from it (see [`rules`] for how that
//! makes a re-run idempotent), apply it, read the table back and verify it: our chains must hold
//! exactly our rules in order and each jump must be there exactly once, rules compared in a
//! normal form that ignores the option order `iptables-save` prints ([`state::RuleKey`]).
//! `--cleanup` deletes the jumps into our chains, then flushes and deletes our chains, and
//! nothing else; cleaning a clean namespace succeeds.
//!
//! `--dry-run` runs no program and reads no state: it prints the input a fresh namespace would
//! get (for `--ipv6 auto` both IPv4 and IPv6, so the output is the same on every machine; the
//! backend is not probed, the input is the same for both); `--dry-run --cleanup` prints the
//! removal of a complete rule set.

pub mod backend;
pub mod cidr;
pub mod config;
pub mod ports;
pub mod rules;
pub mod state;

use std::process::ExitCode;

use crate::backend::{Backend, Failure};
use crate::cidr::Family;
use crate::config::{Action, Config, Ipv6Mode};
use crate::rules::RuleSet;
use crate::state::NatState;

pub use crate::config::InitArgs;

/// Runs `outrider init` and returns the process exit code (0 ok, 1 runtime failure, 2 bad usage).
pub fn main(args: InitArgs) -> ExitCode {
    let config = match Config::from_args(&args) {
        Ok(config) => config,
        Err(errors) => {
            for e in &errors {
                eprintln!("outrider init: error: {e}");
            }
            eprintln!("outrider init: see `outrider init --help`");
            return ExitCode::from(2);
        }
    };
    if config.dry_run {
        print!("{}", dry_run(&config));
        return ExitCode::SUCCESS;
    }
    match execute(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outrider init: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// The families a dry run prints: IPv4, plus IPv6 unless `--ipv6 off`.
pub fn dry_run_families(config: &Config) -> Vec<Family> {
    match config.ipv6 {
        Ipv6Mode::Off => vec![Family::V4],
        Ipv6Mode::On | Ipv6Mode::Auto => vec![Family::V4, Family::V6],
    }
}

/// What `--dry-run` prints: the exact `iptables-restore --noflush` input per family for a
/// namespace without outrider rules (or, with `--cleanup`, the removal of a full rule set),
/// each family introduced by `#` comment lines, which iptables-restore ignores.
pub fn dry_run(config: &Config) -> String {
    let mut out = String::new();
    for family in dry_run_families(config) {
        let restore = match family {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        };
        let rules = RuleSet::new(config, family);
        let (what, input) = match config.action {
            Action::Apply => (
                "capture rules for a namespace without outrider rules",
                rules::apply_input(&rules, &NatState::default()),
            ),
            Action::Cleanup => (
                "removal of a complete outrider rule set",
                rules::cleanup_input(&rules::applied_state(&rules)).unwrap_or_default(),
            ),
        };
        out.push_str(&format!(
            "# outrider init --dry-run: {family} {what}\n# input for `{restore} --noflush` (nft or legacy)\n"
        ));
        out.push_str(&input);
    }
    out
}

/// Whether this network namespace has IPv6 connectivity: `/proc/net/if_inet6` lists an address
/// of global scope. Loopback (`::1`) and link-local (`fe80::`) addresses exist wherever the kernel
/// has IPv6 enabled, even in IPv4-only pods, so they do not count.
pub fn has_ipv6() -> bool {
    std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|text| lists_global_ipv6(&text))
}

/// Whether `/proc/net/if_inet6` text lists a global-scope address (scope field `00`).
pub fn lists_global_ipv6(if_inet6: &str) -> bool {
    if_inet6
        .lines()
        .any(|line| line.split_whitespace().nth(3) == Some("00"))
}

fn live_families(config: &Config) -> Vec<Family> {
    match config.ipv6 {
        Ipv6Mode::Off => vec![Family::V4],
        Ipv6Mode::On => vec![Family::V4, Family::V6],
        Ipv6Mode::Auto => {
            if has_ipv6() {
                eprintln!(
                    "outrider init: --ipv6 auto: global IPv6 address present, programming IPv4 and IPv6"
                );
                vec![Family::V4, Family::V6]
            } else {
                eprintln!("outrider init: --ipv6 auto: no global IPv6 address in /proc/net/if_inet6, IPv4 only");
                if config
                    .exclude_outbound_cidrs
                    .iter()
                    .chain(&config.include_outbound_cidrs)
                    .any(|c| c.family() == Family::V6)
                {
                    eprintln!("outrider init: note: IPv6 ranges in the flags are ignored");
                }
                vec![Family::V4]
            }
        }
    }
}

/// Applies (or, with `--cleanup`, removes) the rule set in the current network namespace, as
/// `outrider init` does; progress lines go to stderr. The CNI plugin calls this after entering
/// the pod's namespace, so both paths program exactly the same rules.
pub fn execute(config: &Config) -> Result<(), Failure> {
    let choice = backend::choose(config.backend);
    eprintln!(
        "outrider init: using the {} backend ({})",
        choice.backend.name(),
        choice.reason
    );
    let families = live_families(config);
    backend::preflight(choice.backend, &families)?;
    match config.action {
        Action::Apply => apply(config, choice.backend, &families),
        Action::Cleanup => {
            let mut failures = Vec::new();
            for &family in &families {
                match cleanup(choice.backend, family) {
                    Ok(removed) => report_cleanup(family, removed),
                    Err(e) => failures.push(e.0),
                }
            }
            // With --ipv6 auto and no IPv6 address now, IPv6 rules from an earlier run may still
            // exist: remove them too when ip6tables works, without failing when it does not.
            if config.ipv6 == Ipv6Mode::Auto && !families.contains(&Family::V6) {
                let v6 = backend::preflight(choice.backend, &[Family::V6])
                    .and_then(|()| cleanup(choice.backend, Family::V6));
                match v6 {
                    Ok(removed) => report_cleanup(Family::V6, removed),
                    Err(e) => eprintln!("outrider init: note: IPv6 cleanup skipped: {e}"),
                }
            }
            if failures.is_empty() {
                Ok(())
            } else {
                Err(Failure(failures.join("; ")))
            }
        }
    }
}

/// Verifies, without changing anything, that the current network namespace holds exactly the
/// rule set `config` describes (the same check `outrider init` runs after applying), for every
/// family it would program.
pub fn check(config: &Config) -> Result<(), Failure> {
    let choice = backend::choose(config.backend);
    let families = live_families(config);
    backend::preflight(choice.backend, &families)?;
    for family in families {
        let rules = RuleSet::new(config, family);
        let state = NatState::parse(&backend::save_nat(choice.backend, family)?);
        rules::verify(&rules, &state).map_err(|problems| {
            Failure(format!(
                "{family}: the outrider rules are missing or differ ({} backend):\n  {}",
                choice.backend.name(),
                problems.join("\n  ")
            ))
        })?;
    }
    Ok(())
}

fn report_cleanup(family: Family, (rules, chains): (usize, usize)) {
    if rules == 0 && chains == 0 {
        eprintln!("outrider init: {family}: no outrider rules to remove");
    } else {
        eprintln!("outrider init: {family}: removed {rules} outrider rules and {chains} chains");
    }
}

fn apply(config: &Config, backend: Backend, families: &[Family]) -> Result<(), Failure> {
    let mut applied = Vec::new();
    for &family in families {
        if let Err(e) = apply_family(config, backend, family) {
            // The failed family's transaction is not committed, but verification may have found it
            // half right: clean it and every family applied before it.
            let mut message = format!("{family}: {e}");
            applied.push(family);
            for &done in applied.iter().rev() {
                match cleanup(backend, done) {
                    Ok(_) => message.push_str(&format!("; rolled back the {done} rules")),
                    Err(r) => message.push_str(&format!("; rolling back {done} FAILED too: {r}")),
                }
            }
            return Err(Failure(message));
        }
        applied.push(family);
    }
    Ok(())
}

fn apply_family(config: &Config, backend: Backend, family: Family) -> Result<(), Failure> {
    let rules = RuleSet::new(config, family);
    let before = NatState::parse(&backend::save_nat(backend, family)?);
    let input = rules::apply_input(&rules, &before);
    backend::restore(backend, family, &input)?;
    let after = NatState::parse(&backend::save_nat(backend, family)?);
    rules::verify(&rules, &after).map_err(|problems| {
        Failure(format!(
            "verification failed, {} read back differs from what was applied:\n  {}",
            backend.save_bin(family),
            problems.join("\n  ")
        ))
    })?;
    eprintln!(
        "outrider init: {family}: applied and verified {} rules",
        rules.rules.len() + rules.jumps.len()
    );
    Ok(())
}

/// Removes every outrider rule and chain of `family`; returns how many rules and chains.
fn cleanup(backend: Backend, family: Family) -> Result<(usize, usize), Failure> {
    let before = NatState::parse(&backend::save_nat(backend, family)?);
    let Some(input) = rules::cleanup_input(&before) else {
        return Ok((0, 0));
    };
    let owned = |chain: &str| rules::OWN_CHAINS.contains(&chain);
    let removed_rules = before
        .rules
        .iter()
        .filter(|r| owned(&r.chain) || r.target().is_some_and(owned))
        .count();
    let removed_chains = before.chains.iter().filter(|c| owned(c)).count();
    backend::restore(backend, family, &input)?;
    let after = NatState::parse(&backend::save_nat(backend, family)?);
    if !rules::is_clean(&after) {
        return Err(Failure(format!(
            "{family}: cleanup ran but {} still shows outrider rules",
            backend.save_bin(family)
        )));
    }
    Ok((removed_rules, removed_chains))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_auto_detection_counts_only_global_addresses() {
        let lo = "00000000000000000000000000000001 01 80 10 80       lo\n";
        let link = "fe800000000000000000000000000001 02 40 20 80     eth0\n";
        let global = "20010db8000000000000000000000001 02 40 00 80     eth0\n";
        assert!(!lists_global_ipv6(""));
        assert!(!lists_global_ipv6(&format!("{lo}{link}")));
        assert!(lists_global_ipv6(&format!("{lo}{link}{global}")));
    }
}
