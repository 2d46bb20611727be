//! Choosing and running the iptables binaries: `iptables-{nft,legacy}-{save,restore}` and their
//! `ip6tables-*` twins, as child processes (no shell).
//!
//! The backend is the iptables implementation the host really uses: with `--backend auto`, legacy
//! only when `iptables-legacy-save` (or `ip6tables-legacy-save`) already shows rules, else nft;
//! mixing the two on one host splits the rules into two tables the kernel both evaluates.
//! A failure becomes a [`Failure`] whose text names the missing piece (binary, `nat` table,
//! `owner` match, `REDIRECT` target, privileges) and what to do about it, translated from the
//! tool's stderr; the raw stderr is kept at the end of the message.

use std::fmt;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::cidr::Family;
use crate::config::BackendMode;
use crate::state;

/// An iptables implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// iptables over nf_tables (`iptables-nft-*`).
    Nft,
    /// iptables over the legacy x_tables interface (`iptables-legacy-*`).
    Legacy,
}

impl Backend {
    /// `nft` or `legacy`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    fn tool(self, family: Family, verb: &str) -> String {
        let prefix = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        format!("{prefix}-{}-{verb}", self.name())
    }

    /// The restore binary for `family`, e.g. `iptables-nft-restore`.
    pub fn restore_bin(self, family: Family) -> String {
        self.tool(family, "restore")
    }

    /// The save binary for `family`, e.g. `ip6tables-legacy-save`.
    pub fn save_bin(self, family: Family) -> String {
        self.tool(family, "save")
    }
}

/// The backend chosen, and why (printed as one line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The backend to use.
    pub backend: Backend,
    /// Why it was chosen.
    pub reason: String,
}

/// A runtime failure with an actionable message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure(pub String);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failure {}

/// Chooses the backend for `mode`. With `auto` this runs `iptables-legacy-save` and
/// `ip6tables-legacy-save` (read-only) to see whether legacy is in use.
pub fn choose(mode: BackendMode) -> Choice {
    match mode {
        BackendMode::Nft => Choice {
            backend: Backend::Nft,
            reason: "forced by --backend nft".to_owned(),
        },
        BackendMode::Legacy => Choice {
            backend: Backend::Legacy,
            reason: "forced by --backend legacy".to_owned(),
        },
        BackendMode::Auto => {
            let mut looked = Vec::new();
            for family in [Family::V4, Family::V6] {
                let bin = Backend::Legacy.save_bin(family);
                if find_in_path(&bin).is_none() {
                    looked.push(format!("{bin} is not installed"));
                    continue;
                }
                match run(&bin, &[], None) {
                    Ok(out) if state::shows_rules(&out) => {
                        return Choice {
                            backend: Backend::Legacy,
                            reason: format!(
                            "auto: {bin} shows existing rules, so this host uses legacy iptables"
                        ),
                        }
                    }
                    Ok(_) => looked.push(format!("{bin} shows no rules")),
                    Err(_) => looked.push(format!("{bin} failed")),
                }
            }
            Choice {
                backend: Backend::Nft,
                reason: format!("auto: {}", looked.join(", ")),
            }
        }
    }
}

/// Finds an executable named `name` in `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// The message for a binary missing from `PATH`.
pub fn not_found(bin: &str) -> Failure {
    Failure(format!(
        "{bin} not found in PATH; install the `iptables` package (it provides iptables-nft-* and \
         iptables-legacy-*), or pick the other implementation with --backend"
    ))
}

/// Checks that the save and restore binaries of every family are installed, before anything
/// is changed.
pub fn preflight(backend: Backend, families: &[Family]) -> Result<(), Failure> {
    for &family in families {
        for bin in [backend.restore_bin(family), backend.save_bin(family)] {
            if find_in_path(&bin).is_none() {
                return Err(not_found(&bin));
            }
        }
    }
    Ok(())
}

/// Reads the nat table of `family` (`<save> -t nat`).
pub fn save_nat(backend: Backend, family: Family) -> Result<String, Failure> {
    let bin = backend.save_bin(family);
    run(&bin, &["-t", "nat"], None).map_err(|stderr| translate(&bin, family, &stderr))
}

/// Applies `input` in one `<restore> --noflush` transaction: all of it, or none of it.
pub fn restore(backend: Backend, family: Family, input: &str) -> Result<(), Failure> {
    let bin = backend.restore_bin(family);
    run(&bin, &["--noflush", "--wait=10"], Some(input))
        .map(drop)
        .map_err(|stderr| translate(&bin, family, &stderr))
}

/// Runs `bin args`, feeding `stdin`; `Ok(stdout)` on exit 0, else `Err(stderr)` (or a
/// description of why it could not run).
fn run(bin: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    if find_in_path(bin).is_none() {
        return Err(format!("{bin}: not found in PATH"));
    }
    let mut child = Command::new(bin)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{bin}: cannot run: {e}"))?;
    let writer = match (stdin, child.stdin.take()) {
        (Some(text), Some(mut pipe)) => {
            let text = text.to_owned();
            Some(std::thread::spawn(move || pipe.write_all(text.as_bytes())))
        }
        _ => None,
    };
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{bin}: cannot wait: {e}"))?;
    if let Some(w) = writer {
        match w.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) if out.status.success() => return Err(format!("{bin}: writing input: {e}")),
            _ => {}
        }
    }
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        Err(if stderr.is_empty() {
            format!("{bin} exited with {}", out.status)
        } else {
            stderr
        })
    }
}

/// Turns a tool's stderr into a message naming the missing piece and what to do.
pub fn translate(bin: &str, family: Family, stderr: &str) -> Failure {
    let lower = stderr.to_lowercase();
    let nat_module = match family {
        Family::V4 => "iptable_nat",
        Family::V6 => "ip6table_nat",
    };
    let hint = if lower.contains("not found in path") {
        return not_found(bin);
    } else if lower.contains("permission denied")
        || lower.contains("you must be root")
        || lower.contains("operation not permitted")
    {
        "permission denied: run `outrider init` as root (or with CAP_NET_ADMIN and CAP_NET_RAW) in the \
         pod's network namespace"
            .to_owned()
    } else if (lower.contains("initialize") && lower.contains("nat"))
        || lower.contains("table does not exist")
    {
        format!(
            "the kernel has no {family} `nat` table for {bin}: load the {nat_module} and nf_nat \
             modules (or enable them in the kernel), or try the other --backend"
        )
    } else if lower.contains("match `owner'") || lower.contains("match \"owner\"") {
        "the `owner` match is unavailable: load the xt_owner kernel module; outrider needs it to \
         exempt the proxy's own traffic (--proxy-uid)"
            .to_owned()
    } else if lower.contains("target `redirect'") || lower.contains("target \"redirect\"") {
        "the `REDIRECT` target is unavailable: load the xt_REDIRECT and nf_nat kernel modules; \
         outrider needs it to send traffic to the proxy"
            .to_owned()
    } else if lower.contains("match `comment'") || lower.contains("match \"comment\"") {
        "the `comment` match is unavailable: load the xt_comment kernel module".to_owned()
    } else if lower.contains("match `tcp'") || lower.contains("match \"tcp\"") {
        "the `tcp` match is unavailable: load the xt_tcpudp kernel module".to_owned()
    } else if lower.contains("xtables lock") {
        "another program held the xtables lock for 10 s; retry when it is done".to_owned()
    } else {
        format!("{bin} failed for {family}")
    };
    Failure(format!("{hint} ({bin} said: {})", one_line(stderr)))
}

fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_names() {
        assert_eq!(Backend::Nft.restore_bin(Family::V4), "iptables-nft-restore");
        assert_eq!(Backend::Nft.save_bin(Family::V6), "ip6tables-nft-save");
        assert_eq!(
            Backend::Legacy.restore_bin(Family::V6),
            "ip6tables-legacy-restore"
        );
        assert_eq!(Backend::Legacy.save_bin(Family::V4), "iptables-legacy-save");
    }

    #[test]
    fn translates_known_failures() {
        let t = |stderr: &str| translate("iptables-legacy-restore", Family::V4, stderr).0;
        assert!(t("iptables-restore v1.8.9 (legacy): can't initialize iptables table `nat': Table does not exist (do you need to insmod?)")
            .starts_with("the kernel has no IPv4 `nat` table for iptables-legacy-restore: load the iptable_nat"));
        assert!(t("iptables-restore v1.8.9 (legacy): Couldn't load match `owner':No such file or directory\nError occurred at line: 9")
            .starts_with("the `owner` match is unavailable"));
        assert!(
            t("iptables-restore: Couldn't load target `REDIRECT':No such file or directory")
                .starts_with("the `REDIRECT` target is unavailable")
        );
        assert!(t(
            "iptables-restore v1.8.9 (legacy): iptables-restore: unable to initialize table 'nat'"
        )
        .starts_with("the kernel has no IPv4 `nat` table"));
        assert!(
            t("Could not fetch rule set generation id: Permission denied (you must be root)")
                .starts_with("permission denied")
        );
        let other = t("line 3 failed\nsomething odd");
        assert_eq!(other, "iptables-legacy-restore failed for IPv4 (iptables-legacy-restore said: line 3 failed | something odd)");
        assert!(translate(
            "ip6tables-nft-restore",
            Family::V6,
            "ip6tables-nft-restore: not found in PATH"
        )
        .0
        .starts_with("ip6tables-nft-restore not found in PATH; install the `iptables` package"));
    }
}
