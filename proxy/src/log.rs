//! Logging: `tracing` to stderr, plain or JSON, with the level filter taken from `OUTRIDER_LOG`
//! (RUST_LOG syntax, default `info`) and changeable at run time through the admin `/log-level`.
//!
//! Colours (ANSI escapes) only when stderr is a terminal and `NO_COLOR` is unset, so a log file,
//! a pipe or `kubectl logs` gets plain lines.
//!
//! Nothing on the request path logs header values or bodies at any level.

use std::sync::Mutex;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::LogFormat;

/// Changes the process's log filter at run time.
pub struct LogHandle {
    reload: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

impl std::fmt::Debug for LogHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogHandle")
            .field("current", &self.current())
            .finish()
    }
}

/// Installs the global subscriber with the filter from `OUTRIDER_LOG` (default `info`).
pub fn init(format: LogFormat) -> Result<LogHandle, String> {
    let spec = std::env::var("OUTRIDER_LOG").unwrap_or_else(|_| "info".to_string());
    init_with(format, &spec)
}

/// The filter directives for `spec`: the HTTP libraries' trace output can include header values,
/// so they stay at `info` unless `spec` names them explicitly.
fn directives(spec: &str) -> String {
    let spec = spec.trim();
    let mut full = spec.to_string();
    for lib in ["h2", "hyper", "hyper_util"] {
        if !spec
            .split(',')
            .any(|d| d.trim().starts_with(&format!("{lib}=")))
        {
            if !full.is_empty() {
                full.push(',');
            }
            full.push_str(lib);
            full.push_str("=info");
        }
    }
    full
}

/// Checks a filter (`info`, `outrider_proxy=debug,info`) the way the proxy will read it.
pub fn check_filter(spec: &str) -> Result<(), String> {
    filter(spec).map(drop)
}

fn filter(spec: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(directives(spec))
        .map_err(|e| format!("invalid log filter `{}`: {e}", spec.trim()))
}

/// Installs the global subscriber with `spec` as the filter.
pub fn init_with(format: LogFormat, spec: &str) -> Result<LogHandle, String> {
    let filter = filter(spec).map_err(|e| format!("OUTRIDER_LOG: {e}"))?;
    let (filter, reload) = reload::Layer::new(filter);
    let plain = (format == LogFormat::Plain).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(outrider_control::runtime::log_colours())
            .with_target(false)
    });
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_ansi(false)
            .with_writer(std::io::stderr)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(plain)
        .with(json)
        .try_init()
        .map_err(|e| format!("cannot install the logger: {e}"))?;
    Ok(LogHandle {
        reload,
        current: Mutex::new(spec.to_string()),
    })
}

impl LogHandle {
    /// The filter in force.
    pub fn current(&self) -> String {
        match self.current.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replaces the filter; a spec that does not parse leaves the old one in force.
    pub fn set(&self, spec: &str) -> Result<(), String> {
        let filter = filter(spec)?;
        self.reload
            .reload(filter)
            .map_err(|e| format!("cannot change the log filter: {e}"))?;
        match self.current.lock() {
            Ok(mut s) => *s = spec.trim().to_string(),
            Err(p) => *p.into_inner() = spec.trim().to_string(),
        }
        tracing::info!(filter = spec.trim(), "log filter changed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_libraries_stay_at_info_unless_named() {
        assert_eq!(
            directives("trace"),
            "trace,h2=info,hyper=info,hyper_util=info"
        );
        assert_eq!(
            directives("debug,h2=trace"),
            "debug,h2=trace,hyper=info,hyper_util=info"
        );
        assert!(filter("x[").is_err());
        assert!(filter("outrider_proxy=debug").is_ok());
    }
}
