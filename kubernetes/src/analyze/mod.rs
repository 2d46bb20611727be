//! `outrider analyze`: why a pod will not start, or why it is not starting.
//!
//! Two modes, one report format:
//!
//! - `-f FILE|-` reads manifests as `outrider inject` does (multi-document YAML, JSON, `List`s,
//!   the seven workload kinds, checked against the `k8s-openapi` types by [`crate::manifest`])
//!   and reports [`Finding`]s about init containers, sidecars, resources, probes and ports in a
//!   meshed pod (see [`checks`]);
//! - `--status FILE|-` reads pods as the API server writes them (`kubectl get pod -o yaml|json`,
//!   a `List` of pods, and the pod's events beside them) and explains what each pod is waiting
//!   for, in the order the kubelet starts containers, with the next command to run (see
//!   [`status`]); `--admin URL` adds what the proxy's admin server says (see [`admin`]).
//!
//! Exit codes: 0 when nothing at or above `--fail-on` was found, 1 otherwise, 2 for bad usage or
//! bad input (a file that cannot be read; a document that does not parse, with the document and
//! field path named), so a CI job can tell findings from a broken invocation.

pub mod admin;
pub mod checks;
pub mod status;

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::process::ExitCode;

use serde::Serialize;

/// Flags of `outrider analyze`.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["file", "status"])))]
pub struct AnalyzeArgs {
    /// Manifests to check (`-` for stdin): multi-document YAML, JSON, `List`s.
    #[arg(short = 'f', long = "filename", value_name = "FILE|-")]
    pub file: Option<String>,
    /// Live pods to diagnose (`-` for stdin): `kubectl get pod NAME -o yaml` (or `-o json`, a
    /// `List` of pods), with `kubectl get events -o json` beside it if you have it.
    #[arg(long, value_name = "FILE|-", conflicts_with = "file")]
    pub status: Option<String>,
    /// Output format.
    #[arg(
        short = 'o',
        long = "output",
        env = "OUTRIDER_OUTPUT",
        value_name = "FORMAT",
        default_value = "text"
    )]
    pub output: Format,
    /// Exit 1 when a finding of this severity or above is found.
    #[arg(
        long,
        env = "OUTRIDER_FAIL_ON",
        value_name = "SEVERITY",
        default_value = "error"
    )]
    pub fail_on: Severity,
    /// The cluster's Kubernetes version (`1.28`, `v1.30.2`): native sidecars need 1.29.
    #[arg(long, env = "OUTRIDER_KUBERNETES_VERSION", value_name = "VERSION", value_parser = parse_version)]
    pub kubernetes_version: Option<(u32, u32)>,
    /// With `--status`: the proxy's admin server (`http://127.0.0.1:15020` after `kubectl
    /// port-forward POD 15020`); its `/ready` and `/identity` are read. (No `OUTRIDER_ADMIN`:
    /// in a meshed container that variable is the proxy's own listen address.)
    #[arg(long, value_name = "URL", conflicts_with = "file", value_parser = crate::wait::parse_http_url)]
    pub admin: Option<http::Uri>,
}

/// `-o`: how the report is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// For people.
    Text,
    /// For machines: `{"findings": [...], "summary": {...}}`.
    Json,
}

/// How much a finding matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing (the pod's effective request, a version requirement).
    Info,
    /// Works today, fails in a case that will come (a rotated secret, a DNS hiccup).
    Warning,
    /// Does not work: a pod that never starts, never completes, or is not what it seems.
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// One thing found: what, where, why it matters and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// How much it matters.
    pub severity: Severity,
    /// A stable name for the check (`job-legacy-sidecar`), for filters and docs.
    pub check: &'static str,
    /// The object: `Kind namespace/name`.
    pub object: String,
    /// Where the object is in the input (`document 2, items[0]`).
    pub document: String,
    /// The field path inside the object (`spec.template.spec.initContainers[1]`).
    pub path: String,
    /// What was found.
    pub message: String,
    /// Why it matters.
    pub why: String,
    /// What to do (for a live pod: the next command to run).
    pub fix: String,
}

/// Parses `1.28`, `v1.30.2`, `1.29+` into (major, minor).
pub fn parse_version(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("`{s}` is not a Kubernetes version (e.g. 1.29)");
    let t = s.trim().trim_start_matches('v');
    let mut parts = t.split('.');
    let major = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let minor = parts
        .next()
        .map(|p| p.trim_end_matches(|c: char| !c.is_ascii_digit()))
        .and_then(|p| p.parse().ok())
        .ok_or_else(bad)?;
    Ok((major, minor))
}

/// The counts of findings per severity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Errors.
    pub errors: usize,
    /// Warnings.
    pub warnings: usize,
    /// Infos.
    pub infos: usize,
}

impl Summary {
    /// Counts `findings`.
    pub fn of(findings: &[Finding]) -> Summary {
        let mut s = Summary::default();
        for f in findings {
            match f.severity {
                Severity::Error => s.errors += 1,
                Severity::Warning => s.warnings += 1,
                Severity::Info => s.infos += 1,
            }
        }
        s
    }
}

/// The findings as text, grouped by object in input order.
pub fn render_text(findings: &[Finding]) -> String {
    let mut out = String::new();
    let mut last: Option<(&str, &str)> = None;
    for f in findings {
        if last != Some((f.document.as_str(), f.object.as_str())) {
            if last.is_some() {
                out.push('\n');
            }
            let _ = writeln!(out, "{} ({})", f.object, f.document);
            last = Some((&f.document, &f.object));
        }
        let severity = f.severity.to_string();
        let _ = writeln!(out, "  {severity:7}  {}  {}", f.check, f.path);
        let _ = writeln!(out, "    {}", f.message);
        let _ = writeln!(out, "    why: {}", f.why);
        let _ = writeln!(out, "    fix: {}", f.fix);
    }
    let s = Summary::of(findings);
    if !findings.is_empty() {
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "{} error(s), {} warning(s), {} info(s)",
        s.errors, s.warnings, s.infos
    );
    out
}

/// The findings as one JSON document: `{"findings": [...], "summary": {...}}`.
pub fn render_json(findings: &[Finding]) -> String {
    #[derive(Serialize)]
    struct Report<'a> {
        findings: &'a [Finding],
        summary: Summary,
    }
    let report = Report {
        findings,
        summary: Summary::of(findings),
    };
    match serde_json::to_string_pretty(&report) {
        Ok(mut s) => {
            s.push('\n');
            s
        }
        // Strings and numbers only: serializing cannot fail.
        Err(e) => format!("{{\"error\": \"{e}\"}}\n"),
    }
}

/// Whether any finding is at or above `fail_on`.
pub fn fails(findings: &[Finding], fail_on: Severity) -> bool {
    findings.iter().any(|f| f.severity >= fail_on)
}

/// `outrider analyze`: the report on stdout; exit 0, 1 (findings at `--fail-on`) or 2 (bad
/// input, an unreadable file).
pub fn main(args: AnalyzeArgs) -> ExitCode {
    let (file, live) = match (&args.file, &args.status) {
        (Some(f), _) => (f.as_str(), false),
        (None, Some(f)) => (f.as_str(), true),
        (None, None) => {
            eprintln!("outrider analyze: give -f FILE|- (manifests) or --status FILE|- (pods)");
            return ExitCode::from(2);
        }
    };
    let text = match crate::read_input(file) {
        Ok(t) => t,
        Err(e) => {
            // Exit 1 means "findings": a file that is not there is bad usage.
            eprintln!("outrider analyze: cannot read {file}: {e}");
            return ExitCode::from(2);
        }
    };
    let result = if live {
        status::diagnose(&text).map(|mut findings| {
            if let Some(url) = &args.admin {
                findings.extend(admin::findings(url, &findings));
            }
            findings
        })
    } else {
        let opts = checks::Options {
            kubernetes_version: args.kubernetes_version,
        };
        checks::analyze(&text, &opts)
    };
    let findings = match result {
        Ok(f) => f,
        Err(e) => {
            eprintln!("outrider analyze: {file}: {e}");
            return ExitCode::from(2);
        }
    };
    let out = match args.output {
        Format::Text => render_text(&findings),
        Format::Json => render_json(&findings),
    };
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
    {
        eprintln!("outrider analyze: cannot write the output: {e}");
        return ExitCode::from(1);
    }
    if fails(&findings, args.fail_on) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests;
