//! The subcommands of `outrider control` that do not serve: `ca init` (write a new root, issuer
//! and token key) and `token` (print a bootstrap token for one identity). Both exit 0 on
//! success and 2 with a message on stderr otherwise; neither prints key material.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::api::{check_trust_domain, Identity, DEFAULT_TRUST_DOMAIN};
use crate::ca::CaFiles;
use crate::duration;
use crate::quoted::Quoted;
use crate::token::{write_secret, TokenKey};

/// `outrider control <subcommand>`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ControlCommand {
    /// Manage the certificate authority's files.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Print a bootstrap token that entitles one identity to certificates.
    Token(TokenArgs),
}

/// `outrider control ca <subcommand>`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CaCommand {
    /// Write a new root, issuer and token key into a directory (never overwriting a file).
    Init(CaInitArgs),
}

/// Flags of `outrider control ca init`.
#[derive(Debug, Clone, clap::Args)]
pub struct CaInitArgs {
    /// Where to write root.pem, root-key.pem, issuer.pem, issuer-key.pem and token.key.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// The trust domain (named in the certificates' subjects).
    #[arg(long, value_name = "TD", default_value = DEFAULT_TRUST_DOMAIN, value_parser = parse_trust_domain)]
    pub trust_domain: String,
    /// How long the root is valid: e.g. 10y, 365d, 12h.
    #[arg(long, value_name = "DUR", default_value = "10y", value_parser = parse_long_duration)]
    pub root_lifetime: Duration,
    /// How long the issuer is valid (at most the root's).
    #[arg(long, value_name = "DUR", default_value = "1y", value_parser = parse_long_duration)]
    pub issuer_lifetime: Duration,
}

/// Flags of `outrider control token`.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// The token key file (as written by `outrider control ca init`; the control plane's
    /// `--token-key`).
    #[arg(long, value_name = "FILE")]
    pub token_key: PathBuf,
    /// The identity the token entitles, `spiffe://TD/ns/NS/sa/SA`.
    #[arg(long, value_name = "SPIFFE-ID", conflicts_with_all = ["namespace", "service_account", "trust_domain"],
          required_unless_present_all = ["namespace", "service_account"])]
    pub identity: Option<Identity>,
    /// The identity's namespace (with --service-account).
    #[arg(long, value_name = "NS", requires = "service_account")]
    pub namespace: Option<String>,
    /// The identity's service account (with --namespace).
    #[arg(long, value_name = "SA", requires = "namespace")]
    pub service_account: Option<String>,
    /// The identity's trust domain (with --namespace and --service-account).
    #[arg(long, value_name = "TD")]
    pub trust_domain: Option<String>,
    /// How long the token is valid (at most 720h: a token is a bearer secret that anyone holding
    /// it can redeem for certificates until it expires).
    #[arg(long, value_name = "DUR", default_value = "1h", value_parser = parse_token_ttl)]
    pub ttl: Duration,
}

fn parse_trust_domain(s: &str) -> Result<String, String> {
    check_trust_domain(s).map(|()| s.to_string())
}

/// A duration longer than 0 (the repo's syntax: `250ms`, `5s`, `5m`, `1h`, at most a year).
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match duration::parse(s)? {
        d if d.is_zero() => Err(format!("{} must be longer than 0", Quoted(s))),
        d => Ok(d),
    }
}

/// The longest a bootstrap token may live.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(720 * 3600);

/// A token lifetime: longer than 0, at most [`MAX_TOKEN_TTL`].
pub fn parse_token_ttl(s: &str) -> Result<Duration, String> {
    match parse_positive_duration(s)? {
        d if d > MAX_TOKEN_TTL => Err(format!(
            "{} is longer than 720h: a token can be redeemed for certificates by whoever holds it until it expires; mint a new one instead",
            Quoted(s)
        )),
        d => Ok(d),
    }
}

/// A CA lifetime: `10y` (365-day years), `90d`, or the repo's durations; longer than 0, at most
/// 100 years.
pub fn parse_long_duration(s: &str) -> Result<Duration, String> {
    const DAY: u64 = 24 * 3600;
    let t = s.trim();
    let unit = |suffix: &str, secs: u64| {
        t.strip_suffix(suffix)
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<u64>().ok())
            .map(|n| Duration::from_secs(n.saturating_mul(secs)))
    };
    let d = match unit("y", 365 * DAY).or_else(|| unit("d", DAY)) {
        Some(d) => d,
        None => duration::parse(t)
            .map_err(|e| format!("{e} (or a number of days or years, e.g. 90d, 10y)"))?,
    };
    if d.is_zero() || d > Duration::from_secs(100 * 365 * DAY) {
        return Err(format!(
            "invalid lifetime {}: longer than 0 and at most 100y",
            Quoted(s)
        ));
    }
    Ok(d)
}

/// Runs a subcommand.
pub fn run(command: ControlCommand) -> ExitCode {
    let result = match command {
        ControlCommand::Ca(CaCommand::Init(args)) => ca_init(&args),
        ControlCommand::Token(args) => token(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outrider control: {e}");
            ExitCode::from(2)
        }
    }
}

/// The files `ca init` writes, in order.
const CA_FILES: [&str; 5] = [
    "root.pem",
    "root-key.pem",
    "issuer.pem",
    "issuer-key.pem",
    "token.key",
];

fn ca_init(args: &CaInitArgs) -> Result<(), String> {
    let dir = &args.dir;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let existing: Vec<_> = CA_FILES
        .iter()
        .map(|f| dir.join(f))
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if !existing.is_empty() {
        return Err(format!(
            "refusing to overwrite existing files: {}; use another --dir",
            existing.join(", ")
        ));
    }
    let files = CaFiles::generate(&args.trust_domain, args.root_lifetime, args.issuer_lifetime)
        .map_err(|e| e.to_string())?;
    let key = TokenKey::generate().map_err(|e| e.to_string())?;
    let write = |name: &str, text: &str, secret: bool| -> Result<(), String> {
        let path = dir.join(name);
        let written = if secret {
            write_secret(&path, text.as_bytes())
        } else {
            write_new(&path, text.as_bytes())
        };
        written.map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    write("root.pem", &files.root_pem, false)?;
    write("root-key.pem", &files.root_key_pem, true)?;
    write("issuer.pem", &files.issuer_pem, false)?;
    write("issuer-key.pem", &files.issuer_key_pem, true)?;
    key.to_file(&dir.join("token.key"))
        .map_err(|e| e.to_string())?;
    let d = dir.display();
    println!(
        "wrote a root, an issuer and a token key for trust domain {td} in {d}:\n  \
         {d}/root.pem        the trust anchor: give it to every proxy (--trust-anchors)\n  \
         {d}/root-key.pem    the root's key: move it offline; it is only needed to sign the next issuer\n  \
         {d}/issuer.pem      the issuer (intermediate) certificate\n  \
         {d}/issuer-key.pem  the issuer's key: only the control plane reads it\n  \
         {d}/token.key       signs bootstrap tokens (outrider control token --token-key)\n\
         run: outrider control --issuer-cert {d}/issuer.pem --issuer-key {d}/issuer-key.pem \
         --trust-anchors {d}/root.pem --token-key {d}/token.key --trust-domain {td}",
        td = args.trust_domain
    );
    Ok(())
}

/// Writes a new file (mode 0644 under the usual umask); fails if it exists.
fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn token(args: &TokenArgs) -> Result<(), String> {
    let identity = match (&args.identity, &args.namespace, &args.service_account) {
        (Some(id), _, _) => id.clone(),
        (None, Some(ns), Some(sa)) => Identity::new(
            args.trust_domain.as_deref().unwrap_or(DEFAULT_TRUST_DOMAIN),
            ns,
            sa,
        )
        .map_err(|e| e.to_string())?,
        _ => return Err("give --identity, or --namespace and --service-account".into()),
    };
    let key = TokenKey::from_file(&args.token_key).map_err(|e| e.to_string())?;
    println!("{}", key.mint(&identity, args.ttl));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes() {
        let day = Duration::from_secs(24 * 3600);
        assert_eq!(parse_long_duration("10y"), Ok(3650 * day));
        assert_eq!(parse_long_duration("90d"), Ok(90 * day));
        assert_eq!(parse_long_duration("12h"), Ok(day / 2));
        assert_eq!(parse_long_duration("30"), Ok(Duration::from_secs(30)));
        for bad in ["0y", "101y", "y", "-1d", "10x", "0s"] {
            assert!(parse_long_duration(bad).is_err(), "{bad}");
        }
        assert!(parse_positive_duration("0s").is_err());
        assert_eq!(parse_positive_duration("5s"), Ok(Duration::from_secs(5)));
    }
}

#[cfg(test)]
mod flag_tests {
    use clap::Parser;

    use super::*;
    use crate::server::{ControlArgs, DEFAULT_SERVER_NAMES};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        control: ControlArgs,
    }

    fn parse(args: &[&str]) -> Result<ControlArgs, String> {
        Cli::try_parse_from(std::iter::once("control").chain(args.iter().copied()))
            .map(|c| c.control)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn serving_flags_default_and_the_ca_flags_go_together() {
        let args = parse(&[]).unwrap();
        assert!(args.command.is_none() && !args.plaintext);
        assert_eq!(args.cert_lifetime, Duration::from_secs(24 * 3600));
        assert_eq!(args.server_names, DEFAULT_SERVER_NAMES);
        assert_eq!(args.trust_domain, None);
        let e = parse(&["--issuer-cert", "a.pem"]).unwrap_err();
        assert!(
            e.contains("--issuer-key") && e.contains("--trust-anchors"),
            "{e}"
        );
        assert!(parse(&[
            "--issuer-cert",
            "a",
            "--issuer-key",
            "b",
            "--trust-anchors",
            "c"
        ])
        .is_ok());
        assert!(parse(&["--cert-lifetime", "5s"]).is_ok());
        assert!(parse(&["--cert-lifetime", "0s"]).is_err());
        assert!(parse(&["--trust-domain", "Bad!"])
            .unwrap_err()
            .contains("invalid trust domain"));
        let args = parse(&["--server-name", "a.example", "--server-name", "b"]).unwrap();
        assert_eq!(args.server_names, ["a.example", "b"]);
    }

    #[test]
    fn subcommands_parse_and_exclude_the_serving_flags() {
        let args = parse(&["ca", "init", "--dir", "/tmp/x", "--root-lifetime", "2y"]).unwrap();
        match args.command {
            Some(ControlCommand::Ca(CaCommand::Init(init))) => {
                assert_eq!(init.root_lifetime, Duration::from_secs(2 * 365 * 24 * 3600));
                assert_eq!(init.trust_domain, DEFAULT_TRUST_DOMAIN);
            }
            other => panic!("{other:?}"),
        }
        let args = parse(&[
            "token",
            "--token-key",
            "k",
            "--identity",
            "spiffe://td/ns/a/sa/b",
        ])
        .unwrap();
        match args.command {
            Some(ControlCommand::Token(t)) => assert_eq!(t.ttl, Duration::from_secs(3600)),
            other => panic!("{other:?}"),
        }
        let token = |ttl: &str| {
            parse(&[
                "token",
                "--token-key",
                "k",
                "--identity",
                "spiffe://td/ns/a/sa/b",
                "--ttl",
                ttl,
            ])
        };
        assert!(token("720h").is_ok());
        assert!(token("721h").unwrap_err().contains("longer than 720h"));
        assert!(token("8760h").is_err(), "a year is too long");
        assert!(
            parse(&["token", "--token-key", "k"]).is_err(),
            "no identity"
        );
        assert!(parse(&["token", "--token-key", "k", "--identity", "nope"]).is_err());
        assert!(parse(&["--plaintext", "token", "--token-key", "k"]).is_err());
    }
}
