//! Logging: `tracing` to stderr, plain or JSON, with the level filter taken from `OUTRIDER_LOG`
//! (RUST_LOG syntax, default `info`) and changeable at run time through the admin `/log-level`.
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

/// Installs the global subscriber with `spec` as the filter.
pub fn init_with(format: LogFormat, spec: &str) -> Result<LogHandle, String> {
    let filter = EnvFilter::try_new(spec).map_err(|e| format!("OUTRIDER_LOG `{spec}`: {e}"))?;
    let (filter, reload) = reload::Layer::new(filter);
    let plain = (format == LogFormat::Plain).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
    });
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
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
        let filter = EnvFilter::try_new(spec.trim())
            .map_err(|e| format!("invalid log filter `{}`: {e}", spec.trim()))?;
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
