//! The proxy's side of the watch API: one long-poll request at a time, and a jittered exponential
//! backoff for when the control plane is unreachable. The caller keeps the last good view; a
//! failed or malformed answer never replaces it.

use std::time::Duration;

use bytes::Bytes;
use http::{StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::api::{WatchResponse, WATCH_PATH};
use crate::duration;
use crate::runtime::Chain;

/// Largest watch response accepted.
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Largest error explanation kept (it is logged and shown on `/config`).
const MAX_ERROR_BODY: usize = 1024;

/// Why a watch request failed.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The control plane could not be reached or the connection broke.
    #[error("control plane unreachable: {0}")]
    Unreachable(String),
    /// It answered, but not with a view (4xx/5xx).
    #[error("control plane answered {status}: {body}")]
    Status {
        /// The status.
        status: StatusCode,
        /// Its explanation.
        body: String,
    },
    /// The answer was not a valid view.
    #[error("control plane sent an invalid view: {0}")]
    Invalid(String),
}

/// A watch client for one workload.
#[derive(Debug, Clone)]
pub struct Watcher {
    client: Client<HttpConnector, Empty<Bytes>>,
    base: Uri,
    workload: String,
    wait: Duration,
}

impl Watcher {
    /// A watcher of `workload` (`namespace/name`) against `base` (e.g. `http://127.0.0.1:15012`).
    pub fn new(base: &str, workload: &str, wait: Duration) -> Result<Self, String> {
        let base: Uri = base
            .parse()
            .map_err(|e| format!("--control `{base}`: {e}"))?;
        if base.scheme_str() != Some("http") || base.authority().is_none() {
            return Err(format!("--control `{base}`: expected http://HOST:PORT"));
        }
        if base.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(
                "--control: credentials in the URL are not supported (they would show on /config)"
                    .into(),
            );
        }
        let valid = workload
            .split_once('/')
            .is_some_and(|(ns, n)| !ns.is_empty() && !n.is_empty())
            && workload
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'/');
        if !valid {
            return Err(format!(
                "--workload `{workload}`: expected namespace/name (lower case, digits, -)"
            ));
        }
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(2)));
        http.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .build(http);
        Ok(Self {
            client,
            base,
            workload: workload.to_string(),
            wait,
        })
    }

    /// The workload watched.
    pub fn workload(&self) -> &str {
        &self.workload
    }

    /// One long poll: `Ok(Some(view))` for a new view, `Ok(None)` when nothing changed within the
    /// wait.
    pub async fn poll(&self, version: Option<&str>) -> Result<Option<WatchResponse>, WatchError> {
        let authority = self
            .base
            .authority()
            .map(|a| a.as_str())
            .unwrap_or_default();
        let uri = format!(
            "http://{authority}{WATCH_PATH}?workload={}&version={}&wait={}",
            self.workload,
            version.unwrap_or(""),
            duration::format(self.wait)
        );
        let uri: Uri = uri
            .parse()
            .map_err(|e| WatchError::Invalid(format!("{e}")))?;
        // One deadline for the whole exchange, head and body: a peer that stalls mid-body must
        // not freeze the watch.
        let exchange = async {
            let rsp = self
                .client
                .get(uri)
                .await
                .map_err(|e| WatchError::Unreachable(Chain(&e).to_string()))?;
            let status = rsp.status();
            let limit = if status == StatusCode::OK {
                MAX_BODY
            } else {
                MAX_ERROR_BODY
            };
            let body = match Limited::new(rsp.into_body(), limit).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) if status == StatusCode::OK => {
                    return Err(WatchError::Unreachable(e.to_string()))
                }
                Err(_) => Bytes::from_static(b"(long error body cut)"),
            };
            Ok((status, body))
        };
        let (status, body) = tokio::time::timeout(self.wait + Duration::from_secs(10), exchange)
            .await
            .map_err(|_| WatchError::Unreachable("no complete answer in time".into()))??;
        match status {
            StatusCode::NOT_MODIFIED => Ok(None),
            StatusCode::OK => {
                let view: WatchResponse = serde_json::from_slice(&body)
                    .map_err(|e| WatchError::Invalid(e.to_string()))?;
                if view.workload != self.workload {
                    return Err(WatchError::Invalid(format!(
                        "a view for {} instead of {}",
                        view.workload, self.workload
                    )));
                }
                // The version goes back into the next URL: it must be what the API promises.
                let v = &view.version;
                if v.is_empty()
                    || v.len() > 64
                    || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                {
                    return Err(WatchError::Invalid(format!("malformed version {v:?}")));
                }
                Ok(Some(view))
            }
            status => Err(WatchError::Status {
                status,
                body: String::from_utf8_lossy(&body).trim().to_string(),
            }),
        }
    }
}

/// Exponential backoff with full jitter: each delay is uniform in `[min, cap]`, the cap doubling
/// from `min` up to `max` after every failure, and reset by [`Backoff::reset`].
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    cap: Duration,
    seed: u64,
}

impl Backoff {
    /// A backoff between `min` and `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
            | 1;
        Self {
            min,
            max,
            cap: min,
            seed,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        // xorshift64: jitter needs spread, not cryptographic quality.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let span = self.cap.saturating_sub(self.min).as_millis() as u64;
        let delay =
            self.min + Duration::from_millis(if span == 0 { 0 } else { self.seed % (span + 1) });
        self.cap = (self.cap * 2).min(self.max);
        delay
    }

    /// Back to the shortest delay (after a success).
    pub fn reset(&mut self) {
        self.cap = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays
            .iter()
            .all(|d| *d >= Duration::from_millis(100) && *d <= Duration::from_secs(2)));
        assert!(
            delays[6..].iter().any(|d| *d > Duration::from_millis(400)),
            "{delays:?}"
        );
        assert!(
            delays.windows(2).any(|w| w[0] != w[1]),
            "jittered: {delays:?}"
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn bad_urls_and_workloads_are_refused() {
        assert!(Watcher::new("ftp://x:1", "a/b", Duration::from_secs(1)).is_err());
        assert!(Watcher::new("not a url", "a/b", Duration::from_secs(1)).is_err());
        assert!(
            Watcher::new("http://u:p@127.0.0.1:1", "a/b", Duration::from_secs(1))
                .unwrap_err()
                .contains("credentials")
        );
        assert!(
            Watcher::new("http://127.0.0.1:15012", "nope", Duration::from_secs(1))
                .unwrap_err()
                .contains("--workload")
        );
        assert!(Watcher::new(
            "http://127.0.0.1:15012",
            "demo/loadgen",
            Duration::from_secs(1)
        )
        .is_ok());
    }
}
