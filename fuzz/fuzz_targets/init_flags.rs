//! `outrider init`'s flags: the input is an argv (one argument per line), parsed by clap as the
//! binary does, validated by `Config::from_args`, and, when valid, rendered as a dry run and
//! checked against its own applied state. Nothing is ever applied: no iptables is run.
#![no_main]

use clap::Parser;
use libfuzzer_sys::fuzz_target;
use outrider_iptables_init::cidr::Family;
use outrider_iptables_init::config::{Config, InitArgs};
use outrider_iptables_init::rules::{applied_state, verify, RuleSet};

#[derive(Debug, Parser)]
#[command(name = "outrider-init")]
struct Cli {
    #[command(flatten)]
    args: InitArgs,
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let argv = std::iter::once("outrider-init").chain(text.split('\n'));
    let Ok(cli) = Cli::try_parse_from(argv) else {
        return;
    };
    let Ok(config) = Config::from_args(&cli.args) else {
        return;
    };
    let out = outrider_iptables_init::dry_run(&config);
    assert!(!out.is_empty());
    for family in [Family::V4, Family::V6] {
        let rules = RuleSet::new(&config, family);
        if let Err(problems) = verify(&rules, &applied_state(&rules)) {
            panic!("rules do not verify against their own applied state: {problems:?}");
        }
    }
});
