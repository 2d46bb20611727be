//! `outrider proxy`: the sidecar data plane.
//!
//! The proxy owns three kinds of listener: *inbound* (traffic arriving at the pod, redirected by
//! `outrider init` to :15006), *outbound* (the app's own outbound traffic, redirected to :15001) and,
//! in local mode, *forward* listeners with a fixed upstream (`--forward LISTEN=UPSTREAM`). Every
//! accepted connection goes through the same pipeline (see [`listener`]):
//!
//! ```text
//! accept → target (orig_dst / fixed) → loop check → protocol detection
//!        → HTTP/1 or HTTP/2 server → request metrics → rescue → forward (pooled hyper client)
//!        → or opaque TCP (bidirectional copy)
//! ```
//!
//! Resilience layers (route, timeout, retry, balance, breaker) and mTLS slot in between the request
//! metrics and the forward service as later issues land; see DESIGN.md section 3.

pub mod admin;
pub mod config;
pub mod demo;
pub mod demo_app;
pub mod detect;
pub mod discovery;
pub mod drain;
pub mod errors;
pub mod http;
pub mod io;
pub mod layers;
pub mod listener;
pub mod log;
pub mod metrics;
pub mod orig_dst;
pub mod proxy;
pub mod tcp;

#[cfg(test)]
mod tests;

pub use config::{Config, ProxyArgs};
pub use proxy::{Proxy, ShutdownHandle};

use std::process::ExitCode;
use std::sync::Arc;

/// Runs `outrider proxy` until SIGTERM, SIGINT or `POST /shutdown`, and returns the exit code
/// (0 after a clean drain, 1 on a runtime failure, 2 on bad configuration).
pub fn main(args: ProxyArgs) -> ExitCode {
    let config = match Config::from_args(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("outrider proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let log = match log::init(config.log_format) {
        Ok(log) => Some(log),
        Err(e) => {
            eprintln!("outrider proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let workers = config.workers;
    outrider_control::runtime::block_on("outrider proxy", workers, async move {
        let proxy = match Proxy::bind(config, Arc::new(orig_dst::SoOriginalDst), log).await {
            Ok(proxy) => proxy,
            Err(e) => {
                tracing::error!("{e:#}");
                eprintln!("outrider proxy: {e:#}");
                return ExitCode::from(1);
            }
        };
        let handle = proxy.shutdown_handle();
        tokio::spawn(async move {
            outrider_control::runtime::shutdown_signal().await;
            handle.trigger("signal");
        });
        match proxy.run().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e:#}");
                ExitCode::from(1)
            }
        }
    })
}
