//! `outrider proxy`'s flags from arbitrary argv (NUL-separated words): parsing and validation
//! never panic; every rejection names a flag. Nothing is bound or started.
#![no_main]

use clap::Parser;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    proxy: outrider_proxy::ProxyArgs,
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Host names in --forward would be resolved: keep the fuzzer on literal addresses.
    if text.split('\0').any(|w| w.contains('=') && w.chars().any(|c| c.is_ascii_alphabetic()) && !w.starts_with("--")) {
        return;
    }
    let argv = std::iter::once("outrider-proxy").chain(text.split('\0'));
    let Ok(cli) = Cli::try_parse_from(argv) else {
        return;
    };
    match outrider_proxy::Config::from_args(cli.proxy) {
        Ok(config) => assert!(config.workers >= 1),
        Err(errors) => {
            assert!(!errors.0.is_empty());
            for e in &errors.0 {
                assert!(e.flag.starts_with("--"), "{e}");
            }
        }
    }
});
