//! Readiness as a registry of blockers: each part of the proxy that must be in place before
//! traffic is welcome (the listeners bound, the first view from the control plane, the first
//! certificate, an unexpired certificate) registers a [`BlockReady`] and drops it when done.
//! `/ready` answers 200 once none is left and no drain has started, and otherwise names what it
//! still waits for.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The proxy's readiness; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// What is still pending, by name (with a count: two blockers may share a name).
    pending: Mutex<BTreeMap<&'static str, usize>>,
    draining: AtomicBool,
}

/// Holds readiness back until dropped.
#[derive(Debug)]
pub struct BlockReady {
    inner: Arc<Inner>,
    name: &'static str,
}

impl Readiness {
    /// A registry with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers something readiness waits for, named for `/ready`'s answer.
    pub fn block(&self, name: &'static str) -> BlockReady {
        if let Ok(mut pending) = self.inner.pending.lock() {
            *pending.entry(name).or_default() += 1;
        }
        BlockReady {
            inner: self.inner.clone(),
            name,
        }
    }

    /// Marks the proxy as draining: never ready again.
    pub fn drain(&self) {
        self.inner.draining.store(true, Ordering::Release);
    }

    /// `Ok(())` when ready, else what is missing.
    pub fn check(&self) -> Result<(), String> {
        if self.inner.draining.load(Ordering::Acquire) {
            return Err("draining".into());
        }
        let pending = match self.inner.pending.lock() {
            Ok(p) => p.keys().copied().collect::<Vec<_>>(),
            Err(_) => vec!["(unknown)"],
        };
        if pending.is_empty() {
            Ok(())
        } else {
            Err(format!("waiting for {}", pending.join(", ")))
        }
    }
}

impl BlockReady {
    /// What it holds readiness back for.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

impl Drop for BlockReady {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.inner.pending.lock() {
            if let Some(n) = pending.get_mut(self.name) {
                *n -= 1;
                if *n == 0 {
                    pending.remove(self.name);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_once_every_blocker_is_released_and_never_while_draining() {
        let r = Readiness::new();
        assert_eq!(r.check(), Ok(()));
        let listeners = r.block("listeners");
        let first = r.block("the first config from the control plane");
        let second = r.block("listeners");
        assert_eq!(
            r.check(),
            Err("waiting for listeners, the first config from the control plane".into())
        );
        drop(listeners);
        drop(first);
        assert_eq!(r.check(), Err("waiting for listeners".into()));
        drop(second);
        assert_eq!(r.check(), Ok(()));
        r.drain();
        assert_eq!(r.check(), Err("draining".into()));
    }
}
