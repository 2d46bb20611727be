//! `outrider proxy`: the sidecar data plane.
//!
//! Two stacks, each assembled in one place: `inbound` (traffic arriving at the pod, redirected
//! by `outrider init` to :15006, forwarded to the app) and `outbound` (the app's own outbound
//! traffic, redirected to :15001, and local mode's `--forward` listeners, which are outbound with
//! a fixed destination). [`app`] binds the listeners, builds both stacks once, serves the
//! `admin` API and drains on shutdown.
//!
//! Underneath: [`transport`] (accept, original destination, I/O wrappers, the one connect path),
//! `detect` (protocol detection), `http` (server glue and upstream clients), `layers`
//! (direction-agnostic tower layers), `discovery` (the control-plane watch), `errors`,
//! [`metrics`], [`readiness`], [`drain`], [`config`] and [`log`].

pub(crate) mod admin;
pub mod app;
pub mod app_probe;
pub(crate) mod budget;
pub mod config;
pub(crate) mod detect;
pub(crate) mod discovery;
pub mod drain;
pub(crate) mod errors;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod http;
pub mod identity;
pub(crate) mod inbound;
pub(crate) mod layers;
pub mod log;
pub mod metrics;
pub(crate) mod outbound;
pub mod readiness;
pub mod transport;

#[cfg(any(test, feature = "test-util"))]
pub mod test_util;

pub use app::Proxy;
pub use config::{Config, ProxyArgs};
pub use drain::ShutdownHandle;

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;

/// Runs `outrider proxy` with `config` until `shutdown` resolves (SIGTERM, SIGINT) or `POST
/// /shutdown`, and returns the exit code (0 after a clean drain, 1 on a runtime failure).
pub async fn run(
    mut config: Config,
    log: Option<log::LogHandle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> ExitCode {
    raise_open_files(&mut config);
    let orig_dst = Arc::new(transport::orig_dst::SoOriginalDst);
    let proxy = match Proxy::bind(config, orig_dst, log, prometheus::Registry::new()).await {
        Ok(proxy) => proxy,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("outrider proxy: {e:#}");
            return ExitCode::from(1);
        }
    };
    let handle = proxy.shutdown_handle();
    tokio::spawn(async move {
        shutdown.await;
        handle.trigger("signal");
    });
    match proxy.run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}

/// Where the proxy's certificate comes from, by its flags: with `--identity-token-file`, the
/// control plane's certify API.
pub fn identity_source(config: &Config) -> anyhow::Result<Option<app::IdentitySource>> {
    let (Some(token), Some(control)) = (&config.identity_token_file, &config.control) else {
        return Ok(None);
    };
    let certifier = outrider_control::client::Certifier::new(control, config.control_tls.clone())
        .map_err(|e| anyhow::anyhow!("--control: {e}"))?;
    Ok(Some(app::IdentitySource {
        ca: Arc::new(certifier),
        token: identity::certify::TokenSource::file(token, &config.trust_domain),
    }))
}

/// Raises the open-file soft limit to the hard limit (a proxied connection needs two descriptors,
/// and the default soft limit is often 1024), and fits `--max-connections` into it with a reserve
/// (see [`Config::fit_open_files`]).
fn raise_open_files(config: &mut Config) {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-file limit");
            return;
        }
    };
    match config.fit_open_files(limit) {
        Some(was) => tracing::warn!(
            open_files = limit,
            max_connections = config.max_connections,
            requested = was,
            "the open-file limit cannot hold --max-connections per listener (2 descriptors per connection, and a reserve for the admin server): lowered it; raise the hard limit (ulimit -Hn, LimitNOFILE) to allow more"
        ),
        None => tracing::info!(open_files = limit, "open-file limit"),
    }
}
