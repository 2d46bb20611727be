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

use crate::api::{WatchResponse, WorkloadId, WATCH_PATH};
use crate::duration;
use crate::quoted::Quoted;
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

/// Why a control-plane URL was refused. The messages name no flag: the caller adds it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlUrlError {
    /// Not a URL at all.
    #[error("{url} is not a URL ({reason}): expected http://HOST:PORT")]
    Malformed {
        /// The input, quoted and cut to a readable length.
        url: String,
        /// What the URL parser said.
        reason: String,
    },
    /// Not `http://` with a host and port.
    #[error("{url}: expected http://HOST:PORT")]
    NotHttp {
        /// The input, quoted and cut to a readable length.
        url: String,
    },
    /// User and password in the URL (not quoted here, so the password is not echoed).
    #[error("credentials in the URL are not supported (they would show on /config)")]
    Credentials,
    /// A path or query: the watch API's path is fixed, and a query (a token, say) would show on
    /// `/config`.
    #[error("{url}: a path or query is not supported: expected http://HOST:PORT")]
    PathOrQuery {
        /// The input, quoted and cut to a readable length.
        url: String,
    },
}

/// A watch client for one workload.
#[derive(Debug, Clone)]
pub struct Watcher {
    client: Client<HttpConnector, Empty<Bytes>>,
    base: Uri,
    workload: WorkloadId,
    wait: Duration,
}

impl Watcher {
    /// A watcher of `workload` against the control plane at `base` (`http://HOST:PORT`, e.g.
    /// `http://127.0.0.1:15012`), asking it to hold each request up to `wait`.
    pub fn new(base: &str, workload: WorkloadId, wait: Duration) -> Result<Self, ControlUrlError> {
        let shown = || Quoted(base).to_string();
        let uri: Uri = base.parse().map_err(|e: http::uri::InvalidUri| {
            if base.contains('@') {
                ControlUrlError::Credentials
            } else {
                ControlUrlError::Malformed {
                    url: shown(),
                    reason: e.to_string(),
                }
            }
        })?;
        let Some(authority) = uri.authority() else {
            return Err(ControlUrlError::NotHttp { url: shown() });
        };
        if authority.as_str().contains('@') {
            return Err(ControlUrlError::Credentials);
        }
        if uri.scheme_str() != Some("http") || authority.host().is_empty() {
            return Err(ControlUrlError::NotHttp { url: shown() });
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(ControlUrlError::PathOrQuery { url: shown() });
        }
        let base = uri;
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(2)));
        http.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .build(http);
        Ok(Self {
            client,
            base,
            workload,
            wait,
        })
    }

    /// The workload watched.
    pub fn workload(&self) -> &WorkloadId {
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

/// Exponential backoff with full jitter: each delay is uniform in `[min, cap]` (whole
/// milliseconds), the cap doubling from `min` up to `max` after every failure, and reset by
/// [`Backoff::reset`].
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    cap: Duration,
    rng: fastrand::Rng,
}

impl Backoff {
    /// A backoff between `min` and `max`, randomly seeded (so proxies that lost the control plane
    /// together do not retry together).
    pub fn new(min: Duration, max: Duration) -> Self {
        Self::with_rng(min, max, fastrand::Rng::new())
    }

    /// A backoff between `min` and `max` whose delays follow from `seed` (for tests).
    pub fn with_seed(min: Duration, max: Duration, seed: u64) -> Self {
        Self::with_rng(min, max, fastrand::Rng::with_seed(seed))
    }

    fn with_rng(min: Duration, max: Duration, rng: fastrand::Rng) -> Self {
        Self {
            min,
            max: max.max(min),
            cap: min,
            rng,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let span = u64::try_from(self.cap.saturating_sub(self.min).as_millis()).unwrap_or(u64::MAX);
        let delay = self.min + Duration::from_millis(self.rng.u64(0..=span));
        self.cap = self.cap.saturating_mul(2).min(self.max);
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

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_grows_with_jitter_and_resets() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut b = Backoff::with_seed(min, max, 7);
        let delays: Vec<_> = (0..12).map(|_| b.next_delay()).collect();
        // Each delay stays under its cap: min, 2 min, 4 min, ... up to max.
        for (i, d) in delays.iter().enumerate() {
            let cap = (min * 2u32.pow(i as u32)).min(max);
            assert!(*d >= min && *d <= cap, "delay {i} = {d:?} over {cap:?}");
        }
        // The caps grow: the late delays spread over [min, max], not [min, 2 min].
        assert!(delays[6..].iter().any(|d| *d > 4 * min), "{delays:?}");
        // Jitter: not all the same once the cap is above min.
        assert!(delays[1..].windows(2).any(|w| w[0] != w[1]), "{delays:?}");
        b.reset();
        assert_eq!(b.next_delay(), min);
        // The same seed gives the same delays; another seed others.
        let again: Vec<_> = {
            let mut b = Backoff::with_seed(min, max, 7);
            (0..12).map(|_| b.next_delay()).collect()
        };
        assert_eq!(again, delays);
        let mut other = Backoff::with_seed(min, max, 8);
        let other: Vec<_> = (0..12).map(|_| other.next_delay()).collect();
        assert_ne!(other, delays);
    }

    #[test]
    fn backoff_with_equal_bounds_or_huge_max_is_sane() {
        let mut b = Backoff::with_seed(100 * MS, 100 * MS, 1);
        assert!((0..5).all(|_| b.next_delay() == 100 * MS));
        let mut b = Backoff::with_seed(MS, Duration::MAX, 1);
        for _ in 0..200 {
            let _ = b.next_delay();
        }
        let mut b = Backoff::with_seed(100 * MS, MS, 1);
        assert_eq!(b.next_delay(), 100 * MS, "max below min acts as min");
    }

    #[test]
    fn bad_urls_are_refused_without_naming_a_flag() {
        let w: WorkloadId = "a/b".parse().unwrap();
        let new = |url: &str| Watcher::new(url, w.clone(), Duration::from_secs(1)).map(|_| ());
        assert!(matches!(
            new("ftp://x:1"),
            Err(ControlUrlError::NotHttp { .. })
        ));
        assert!(matches!(
            new("127.0.0.1:1"),
            Err(ControlUrlError::NotHttp { .. })
        ));
        assert!(matches!(
            new("not a url"),
            Err(ControlUrlError::Malformed { .. })
        ));
        assert_eq!(
            new("http://u:p@127.0.0.1:1"),
            Err(ControlUrlError::Credentials)
        );
        assert!(matches!(
            new("http://127.0.0.1:1/v1?token=abc"),
            Err(ControlUrlError::PathOrQuery { .. })
        ));
        assert!(matches!(
            new("http://127.0.0.1:1?token=abc"),
            Err(ControlUrlError::PathOrQuery { .. })
        ));
        for url in ["ftp://x:1", "not a url", "http://u:p@h:1", "http://h:1/x"] {
            let e = new(url).unwrap_err().to_string();
            assert!(!e.contains("--"), "{url}: {e}");
            assert!(!e.contains("u:p"), "{url}: {e}");
        }
        let e = new(&format!("ftp://{}", "h".repeat(10_000))).unwrap_err();
        assert!(e.to_string().len() < 300, "{e}");
        assert!(new("http://127.0.0.1:15012").is_ok());
        assert!(new("http://127.0.0.1:15012/").is_ok());
        let watcher = Watcher::new("http://control:15012", w.clone(), Duration::from_secs(1));
        assert_eq!(watcher.unwrap().workload(), &w);
    }
}
