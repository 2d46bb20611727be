//! `RetryLayer`: sends a request again when its route allows it, the outcome is retryable and the
//! service's retry budget has room; each attempt goes back through the balancer, so it picks
//! again (usually another endpoint).
//!
//! - **What is retried** ([`RetryParams`], per route): a failure before anything reached the
//!   upstream (connect, TLS, per-upstream bound, a refused HTTP/2 stream) for every method; a
//!   listed status (default 502, 503, 504) for idempotent methods, or for every method when the
//!   route says `non_idempotent`; a listed gRPC status (default `UNAVAILABLE`) in a trailers-only
//!   gRPC response.
//! - **Bodies** up to [`MAX_REPLAY`] with a known length are read first and replayed from memory;
//!   a longer body, one that streams without a length, and an upgrade are sent once (a retryable
//!   outcome for them is counted as skipped, `body-too-large`).
//! - **The budget** ([`Budget`], per service): retries may add `budget_percent` of the service's
//!   requests plus 10 per second, over a sliding 10 s window. When it is spent the client gets the
//!   upstream's own last answer, never a synthetic one.
//! - Each retry tells the balancer which endpoint the previous attempt failed at ([`Avoid`]); it
//!   goes elsewhere when another endpoint is ready.
//! - Attempts wait a jittered, exponentially growing backoff (on tokio's clock).
//!
//! The attempts themselves run in `tower::retry::Retry` with a [`Policy`] of ours. tower's
//! `TpsBudget` is not used: it takes a mutex on every deposit (every request) and reads
//! `std::time::Instant`, which tests cannot pause; [`Budget`] is a ring of per-second atomics.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::Either;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use tokio::time::Instant;
use tower::util::BoxCloneService;

pub(crate) use crate::budget::Budget;
use crate::errors::{is_retryable, upstream_of, BoxError, ResponseBody};
use crate::http::Body;

/// The largest request body kept for replay.
pub(crate) const MAX_REPLAY: usize = 64 * 1024;

/// A route's retry policy, as a request extension (attached by the router).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RetryParams {
    /// Attempts after the first.
    pub attempts: u32,
    /// The budget's share of requests, in percent.
    pub budget_percent: u32,
    /// Statuses retried.
    pub statuses: Vec<u16>,
    /// gRPC statuses retried.
    pub grpc_codes: Vec<u16>,
    /// Backoff base.
    pub backoff: Duration,
    /// Whether responses to non-idempotent methods are retried too.
    pub non_idempotent: bool,
}

impl From<&outrider_control::api::RetryPolicy> for RetryParams {
    fn from(p: &outrider_control::api::RetryPolicy) -> Self {
        Self {
            attempts: p.attempts,
            budget_percent: p.budget_percent,
            statuses: p.statuses.clone(),
            grpc_codes: p.grpc_codes.clone(),
            backoff: Duration::from_millis(p.backoff_ms),
            non_idempotent: p.non_idempotent,
        }
    }
}

/// A response extension naming the endpoint that answered (set below the retry layer when the
/// request has a retry policy), so a retry can go elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServedBy(pub SocketAddr);

/// A request extension on a retry: the endpoint the previous attempt failed at, which the
/// balancer avoids when another is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Avoid(pub SocketAddr);

/// The request extension carrying a route's [`RetryParams`].
#[derive(Debug, Clone)]
pub(crate) struct RetryRoute(pub Arc<RetryParams>);

/// Why a retryable outcome was not retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skipped {
    /// The budget was spent.
    Budget = 0,
    /// The body could not be replayed.
    BodyTooLarge = 1,
    /// The method is not idempotent and the route does not allow it.
    NonIdempotent = 2,
    /// The route's attempts were used up.
    Attempts = 3,
}

/// Where retries are counted (a service's metrics).
pub(crate) trait RetryStats: Send + Sync {
    /// A retry was sent.
    fn retried(&self);
    /// A retryable outcome was not retried.
    fn skipped(&self, why: Skipped);
}

/// Builds [`Retry`].
#[derive(Clone)]
pub(crate) struct RetryLayer {
    budget: Arc<Budget>,
    stats: Arc<dyn RetryStats>,
}

impl std::fmt::Debug for RetryLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryLayer").finish_non_exhaustive()
    }
}

impl RetryLayer {
    /// Retries within `budget`, counted in `stats`.
    pub(crate) fn new(budget: Arc<Budget>, stats: Arc<dyn RetryStats>) -> Self {
        Self { budget, stats }
    }
}

impl<S> tower::Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Retry {
            inner,
            budget: self.budget.clone(),
            stats: self.stats.clone(),
        }
    }
}

/// Retries requests whose route has a [`RetryRoute`]; the rest pass through without a box.
#[derive(Clone)]
pub(crate) struct Retry<S> {
    inner: S,
    budget: Arc<Budget>,
    stats: Arc<dyn RetryStats>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Retry<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// The response future of [`Retry`].
pub(crate) type RetryFuture<F> =
    Either<F, Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, BoxError>> + Send>>>;

impl<S> tower::Service<Request<Body>> for Retry<S>
where
    S: tower::Service<Request<Body>, Response = Response<ResponseBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<ResponseBody>;
    type Error = BoxError;
    type Future = RetryFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        self.budget.deposit(Instant::now());
        let Some(RetryRoute(params)) = req.extensions().get::<RetryRoute>().cloned() else {
            return Either::Left(self.inner.call(req));
        };
        // The ready service takes this request; a fresh clone stays behind for the next one.
        let fresh = self.inner.clone();
        // Erased, so the attempts' future is not generic (and provably `Send`).
        let ready = BoxCloneService::new(std::mem::replace(&mut self.inner, fresh));
        let (budget, stats) = (self.budget.clone(), self.stats.clone());
        Either::Right(Box::pin(attempts(ready, req, params, budget, stats)))
    }
}

/// The erased future of [`Retry`]'s attempts.
type Attempts = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, BoxError>> + Send>>;

/// Sends `req` through `ready` (a ready service), again as the policy allows. Written with
/// combinators rather than `async`: rustc cannot prove such an `async` body `Send` (its
/// `BoxError`s' lifetimes are erased in the generator).
fn attempts(
    mut ready: BoxCloneService<Request<Body>, Response<ResponseBody>, BoxError>,
    req: Request<Body>,
    params: Arc<RetryParams>,
    budget: Arc<Budget>,
    stats: Arc<dyn RetryStats>,
) -> Attempts {
    use futures_util::FutureExt as _;
    use tower::Service as _;
    Box::pin(replayable(req).then(move |replay| -> Attempts {
        match replay {
            Err(e) => Box::pin(std::future::ready(Err(e))),
            Ok(Replay::Once(req)) => {
                let method = req.method().clone();
                let grpc = crate::errors::is_grpc(req.headers());
                Box::pin(ready.call(req).map(move |mut result| {
                    if classify(&params, &method, grpc, &mut result) != Class::Final {
                        stats.skipped(Skipped::BodyTooLarge);
                    }
                    result
                }))
            }
            Ok(Replay::Kept(req, body)) => {
                let policy = Policy {
                    grpc: crate::errors::is_grpc(req.headers()),
                    params,
                    budget,
                    stats,
                    body,
                    attempt: 0,
                };
                Box::pin(tower::retry::Retry::new(policy, ready).call(req))
            }
        }
    }))
}

enum Replay {
    /// The body was read whole: the request carries it, and a copy is kept.
    Kept(Request<Body>, Bytes),
    /// The request cannot be replayed.
    Once(Request<Body>),
}

/// Reads a request's body into memory if it can be replayed (known length up to
/// [`MAX_REPLAY`], no upgrade).
fn replayable(
    req: Request<Body>,
) -> Pin<Box<dyn Future<Output = Result<Replay, BoxError>> + Send>> {
    use futures_util::FutureExt as _;
    use http_body::Body as _;
    let upgrade =
        req.method() == Method::CONNECT || req.headers().contains_key(http::header::UPGRADE);
    let small = req.body().is_end_stream()
        || req
            .body()
            .size_hint()
            .exact()
            .is_some_and(|n| n <= MAX_REPLAY as u64);
    if upgrade || !small {
        return Box::pin(std::future::ready(Ok(Replay::Once(req))));
    }
    let (parts, body) = req.into_parts();
    Box::pin(
        Limited::new(body, MAX_REPLAY)
            .collect()
            .map(move |collected| match collected {
                Ok(collected) => {
                    let bytes = collected.to_bytes();
                    let req = Request::from_parts(parts, replay_body(bytes.clone()));
                    Ok(Replay::Kept(req, bytes))
                }
                Err(e) => Err(e),
            }),
    )
}

/// A body that replays `bytes`.
fn replay_body(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| -> BoxError { match never {} })
        .boxed_unsync()
}

/// What an outcome means to the retry policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Return it.
    Final,
    /// Send the request again.
    Retryable,
    /// Retryable, but the method is not idempotent.
    NonIdempotent,
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn classify(
    params: &RetryParams,
    method: &Method,
    grpc: bool,
    result: &mut Result<Response<ResponseBody>, BoxError>,
) -> Class {
    match result {
        // Nothing reached the upstream: safe for every method.
        Err(e) if is_retryable(&**e) => Class::Retryable,
        Err(_) => Class::Final,
        Ok(rsp) => {
            let grpc_retryable = grpc
                && rsp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u16>().ok())
                    .is_some_and(|code| params.grpc_codes.contains(&code));
            if grpc_retryable {
                // A trailers-only UNAVAILABLE: the server did not process the call.
                return Class::Retryable;
            }
            if !params.statuses.contains(&rsp.status().as_u16()) {
                Class::Final
            } else if params.non_idempotent || is_idempotent(method) {
                Class::Retryable
            } else {
                Class::NonIdempotent
            }
        }
    }
}

/// The per-request retry policy handed to `tower::retry::Retry`.
#[derive(Clone)]
struct Policy {
    params: Arc<RetryParams>,
    budget: Arc<Budget>,
    stats: Arc<dyn RetryStats>,
    body: Bytes,
    grpc: bool,
    attempt: u32,
}

impl tower::retry::Policy<Request<Body>, Response<ResponseBody>, BoxError> for Policy {
    type Future = Pin<Box<tokio::time::Sleep>>;

    fn retry(
        &mut self,
        req: &mut Request<Body>,
        result: &mut Result<Response<ResponseBody>, BoxError>,
    ) -> Option<Self::Future> {
        match classify(&self.params, req.method(), self.grpc, result) {
            Class::Final => return None,
            Class::NonIdempotent => {
                self.stats.skipped(Skipped::NonIdempotent);
                return None;
            }
            Class::Retryable => {}
        }
        if self.attempt >= self.params.attempts {
            self.stats.skipped(Skipped::Attempts);
            return None;
        }
        if !self
            .budget
            .try_withdraw(Instant::now(), self.params.budget_percent)
        {
            self.stats.skipped(Skipped::Budget);
            return None;
        }
        self.attempt += 1;
        self.stats.retried();
        let failed_at = match result {
            Ok(rsp) => rsp.extensions().get::<ServedBy>().map(|s| s.0),
            Err(e) => upstream_of(&**e),
        };
        if let Some(addr) = failed_at {
            req.extensions_mut().insert(Avoid(addr));
        }
        Some(Box::pin(tokio::time::sleep(backoff(
            self.params.backoff,
            self.attempt,
        ))))
    }

    fn clone_request(&mut self, req: &Request<Body>) -> Option<Request<Body>> {
        let mut clone = Request::new(replay_body(self.body.clone()));
        *clone.method_mut() = req.method().clone();
        *clone.uri_mut() = req.uri().clone();
        *clone.version_mut() = req.version();
        *clone.headers_mut() = req.headers().clone();
        *clone.extensions_mut() = req.extensions().clone();
        Some(clone)
    }
}

/// The wait before attempt `attempt` (1 for the first retry): `base` doubled per attempt (at most
/// 2^5 times), between half and all of it at random.
fn backoff(base: Duration, attempt: u32) -> Duration {
    let full = base.saturating_mul(1 << attempt.saturating_sub(1).min(5));
    full.mul_f64(0.5 + fastrand::f64() * 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> RetryParams {
        RetryParams::from(&outrider_control::api::RetryPolicy {
            attempts: 2,
            budget_percent: 20,
            statuses: outrider_control::api::default_retry_statuses(),
            grpc_codes: outrider_control::api::default_retry_grpc_codes(),
            backoff_ms: 25,
            non_idempotent: false,
        })
    }

    fn status(code: u16) -> Result<Response<ResponseBody>, BoxError> {
        let mut rsp = Response::new(http_body_util::Either::Right(Full::new(Bytes::new())));
        *rsp.status_mut() = http::StatusCode::from_u16(code).unwrap();
        Ok(rsp)
    }

    #[test]
    fn outcomes_are_classified_by_method_status_and_cause() {
        let p = params();
        assert_eq!(
            classify(&p, &Method::GET, false, &mut status(503)),
            Class::Retryable
        );
        assert_eq!(
            classify(&p, &Method::GET, false, &mut status(500)),
            Class::Final
        );
        assert_eq!(
            classify(&p, &Method::GET, false, &mut status(200)),
            Class::Final
        );
        assert_eq!(
            classify(&p, &Method::POST, false, &mut status(503)),
            Class::NonIdempotent
        );
        let refused: BoxError = Box::new(crate::errors::ConnectError {
            addr: "198.18.0.1:80".parse().unwrap(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        });
        assert_eq!(
            classify(&p, &Method::POST, false, &mut Err(refused)),
            Class::Retryable,
            "nothing was sent: every method"
        );
        let broken: BoxError = Box::new(crate::errors::UpstreamFailed {
            addr: "198.18.0.1:80".parse().unwrap(),
            source: "reset".into(),
        });
        assert_eq!(
            classify(&p, &Method::GET, false, &mut Err(broken)),
            Class::Final
        );
        let mut unavailable = status(200);
        if let Ok(rsp) = &mut unavailable {
            rsp.headers_mut()
                .insert("grpc-status", http::HeaderValue::from_static("14"));
        }
        assert_eq!(
            classify(&p, &Method::POST, true, &mut unavailable),
            Class::Retryable
        );
        let non_idempotent = RetryParams {
            non_idempotent: true,
            ..params()
        };
        assert_eq!(
            classify(&non_idempotent, &Method::POST, false, &mut status(502)),
            Class::Retryable
        );
    }

    #[test]
    fn backoff_is_jittered_and_grows() {
        let base = Duration::from_millis(100);
        for attempt in 1..10 {
            let full = base * (1 << (attempt - 1).min(5));
            let b = backoff(base, attempt);
            assert!(b >= full / 2 && b <= full, "{attempt}: {b:?}");
        }
    }
}
