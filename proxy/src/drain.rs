//! Graceful shutdown signalling. A [`ShutdownHandle`] asks the proxy to shut down; a [`Signal`]
//! tells every [`Watch`] of its group to drain, then waits until all of them are dropped: each
//! accept loop and each connection holds a `Watch`, so "all dropped" means "nothing is in flight
//! any more".

use std::sync::Arc;

use tokio::sync::watch;

/// Starts a graceful shutdown of a running proxy; cheap to clone.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(Arc<watch::Sender<bool>>);

impl ShutdownHandle {
    /// A handle and the receiver that learns when it is triggered.
    pub fn new() -> (Self, watch::Receiver<bool>) {
        let (tx, rx) = watch::channel(false);
        (Self(Arc::new(tx)), rx)
    }

    /// Starts the shutdown (idempotent). `why` is logged.
    pub fn trigger(&self, why: &str) {
        if !self.0.send_replace(true) {
            tracing::info!(reason = why, "shutdown requested");
        }
    }
}

/// The sending half: starts a drain and waits for it to finish.
#[derive(Debug)]
pub struct Signal(watch::Sender<bool>);

/// The receiving half, held by every task that must finish before the drain completes.
#[derive(Debug, Clone)]
pub struct Watch(watch::Receiver<bool>);

/// A new drain channel.
pub fn channel() -> (Signal, Watch) {
    let (tx, rx) = watch::channel(false);
    (Signal(tx), Watch(rx))
}

impl Signal {
    /// Tells every watcher to drain; returns at once.
    pub fn start(&self) {
        self.0.send_replace(true);
    }

    /// Resolves once every watcher has been dropped.
    pub async fn finished(&self) {
        self.0.closed().await
    }

    /// How many watchers are still alive (accept loops plus open connections).
    pub fn in_flight(&self) -> usize {
        self.0.receiver_count()
    }
}

impl Watch {
    /// Resolves once a drain has started (or the signal is gone).
    pub async fn signaled(&mut self) {
        let _ = self.0.wait_for(|draining| *draining).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_every_watcher() {
        let (signal, watch) = channel();
        let mut w = watch.clone();
        drop(watch);
        let task = tokio::spawn(async move {
            w.signaled().await;
            tokio::time::sleep(Duration::from_secs(3)).await;
            drop(w);
        });
        signal.start();
        let t = tokio::time::Instant::now();
        signal.finished().await;
        assert!(t.elapsed() >= Duration::from_secs(3));
        task.await.unwrap();
        assert_eq!(signal.in_flight(), 0);
    }
}
