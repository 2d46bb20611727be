//! Listening and accepting, the same for every listener: at most `max_connections` connections
//! are open per listener (a listener and its IPv6 twin share the bound); past it the loop stops
//! accepting until one closes (the kernel backlog holds the rest), which is counted and logged.
//! Each accepted connection is handed to the listener's [`Serve`] (the inbound or outbound stack)
//! on its own task, with a [`ConnGuard`] that keeps the slot and the gauges right for as long as
//! any part of the connection lives.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::drain;
use crate::metrics::DirectionMetrics;

/// An accepted connection, as a stack receives it.
#[derive(Debug)]
pub struct Accepted {
    /// The socket.
    pub socket: TcpStream,
    /// The client's address.
    pub peer: SocketAddr,
    /// Held for as long as any part of the connection lives.
    pub guard: Arc<ConnGuard>,
    /// The drain signal of the listener's group.
    pub drain: drain::Watch,
}

/// What a listener does with its connections: the inbound or the outbound stack.
pub trait Serve: Send + Sync + 'static {
    /// Serves one connection until it ends.
    fn serve(self: Arc<Self>, conn: Accepted) -> impl Future<Output = ()> + Send + 'static;
}

/// How often a failing accept is logged at most.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);

/// The connection bound of one listener (shared with its IPv6 twin).
#[derive(Debug)]
pub struct Limit {
    slots: Arc<Semaphore>,
    max: usize,
    reached: IntCounter,
    logged: AtomicBool,
}

impl Limit {
    /// `max` open connections; each time the bound is reached, `reached` counts it.
    pub fn new(max: usize, reached: IntCounter) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(max)),
            max,
            reached,
            logged: AtomicBool::new(false),
        })
    }

    async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Some(permit);
        }
        self.reached.inc();
        if !self.logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                max = self.max,
                "--max-connections reached: not accepting until a connection closes (logged once per listener; see outrider_connection_limit_reached_total)"
            );
        }
        self.slots.clone().acquire_owned().await.ok()
    }
}

/// Held for as long as a downstream connection lives, including an upgraded (WebSocket) stream
/// that outlives its HTTP connection: keeps the connection-limit permit and the open-connections
/// gauge right, and counts the close when dropped.
#[derive(Debug)]
pub struct ConnGuard {
    metrics: Arc<DirectionMetrics>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.metrics.tcp_open_now.dec();
        self.metrics.tcp_close.inc();
    }
}

/// Accepts connections until `stop` is signalled, handing each to `stack` on its own task with
/// `drain` (the drain of its connections, which may start earlier: a draining listener keeps
/// accepting for the drain window).
pub async fn accept_loop<S: Serve>(
    listener: TcpListener,
    stack: Arc<S>,
    limit: Arc<Limit>,
    metrics: Arc<DirectionMetrics>,
    mut stop: drain::Watch,
    drain: drain::Watch,
) {
    let mut last_warn: Option<tokio::time::Instant> = None;
    let mut failures = 0u64;
    loop {
        let permit = tokio::select! {
            permit = limit.acquire() => match permit {
                Some(p) => p,
                None => return,
            },
            () = stop.signaled() => break,
        };
        let accepted = tokio::select! {
            res = listener.accept() => res,
            () = stop.signaled() => break,
        };
        match accepted {
            Ok((socket, peer)) => {
                metrics.tcp_open.inc();
                metrics.tcp_open_now.inc();
                let _ = socket.set_nodelay(true);
                let conn = Accepted {
                    socket,
                    peer,
                    guard: Arc::new(ConnGuard {
                        metrics: metrics.clone(),
                        _permit: permit,
                    }),
                    drain: drain.clone(),
                };
                tokio::spawn(stack.clone().serve(conn));
            }
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning, and log
                // at most every 10 s.
                failures += 1;
                let now = tokio::time::Instant::now();
                if last_warn.is_none_or(|at| now.duration_since(at) >= ACCEPT_WARN_EVERY) {
                    tracing::warn!(error = %e, failures, "accept failed (logged at most every 10 s)");
                    last_warn = Some(now);
                    failures = 0;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracing::debug!("listener closed for drain");
}
