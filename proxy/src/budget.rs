//! A retry budget: how many retries a service may add to its requests. Requests and retries are
//! counted per second in a ring of atomics covering a sliding window, so a deposit (every request)
//! is two atomic operations and no lock; tokio's clock, so tests can pause it. The retry layer
//! spends it per service, and the HTTP/2 client for requests a going-away connection handed back.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use tokio::time::Instant;

/// Length of the budget's sliding window, in seconds.
const WINDOW_SECS: u64 = 10;

/// Retries allowed per second whatever the request rate (so a quiet service can still retry).
const RESERVE_PER_SEC: u64 = 10;

/// A retry budget: requests and retries per second in a ring of [`WINDOW_SECS`] slots.
#[derive(Debug)]
pub(crate) struct Budget {
    born: Instant,
    slots: [Slot; WINDOW_SECS as usize],
}

#[derive(Debug, Default)]
struct Slot {
    /// The second (since `born`) this slot counts, plus one (0: never used).
    second: AtomicU64,
    requests: AtomicU32,
    retries: AtomicU32,
}

impl Default for Budget {
    fn default() -> Self {
        Self::new()
    }
}

impl Budget {
    /// An empty budget whose window starts now.
    pub(crate) fn new() -> Self {
        Self {
            born: Instant::now(),
            slots: Default::default(),
        }
    }

    fn slot(&self, now: Instant) -> (u64, &Slot) {
        let second = now.saturating_duration_since(self.born).as_secs();
        let slot = &self.slots[(second % WINDOW_SECS) as usize];
        let stamp = second + 1;
        let seen = slot.second.load(Ordering::Acquire);
        if seen != stamp
            && slot
                .second
                .compare_exchange(seen, stamp, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.requests.store(0, Ordering::Relaxed);
            slot.retries.store(0, Ordering::Relaxed);
        }
        (second, slot)
    }

    /// Counts a request.
    pub(crate) fn deposit(&self, now: Instant) {
        self.slot(now).1.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry if the window has room for `percent` of its requests plus the reserve.
    pub(crate) fn try_withdraw(&self, now: Instant, percent: u32) -> bool {
        let (second, slot) = self.slot(now);
        let (mut requests, mut retries) = (0u64, 0u64);
        for s in &self.slots {
            let stamp = s.second.load(Ordering::Acquire);
            // Slots of the last WINDOW_SECS seconds only.
            if stamp != 0 && stamp + WINDOW_SECS > second + 1 {
                requests += u64::from(s.requests.load(Ordering::Relaxed));
                retries += u64::from(s.retries.load(Ordering::Relaxed));
            }
        }
        let covered = (second + 1).min(WINDOW_SECS);
        let allowed = requests * u64::from(percent) / 100 + RESERVE_PER_SEC * covered;
        if retries >= allowed {
            return false;
        }
        slot.retries.fetch_add(1, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn the_budget_allows_its_share_plus_ten_a_second_over_a_sliding_window() {
        let budget = Budget::new();
        let now = Instant::now;
        // 100 requests a second for 20 s; retries taken whenever allowed.
        let mut retries_per_sec = Vec::new();
        for _ in 0..20 {
            let mut taken = 0;
            for _ in 0..100 {
                budget.deposit(now());
                if budget.try_withdraw(now(), 20) {
                    taken += 1;
                }
                tokio::time::advance(Duration::from_millis(10)).await;
            }
            retries_per_sec.push(taken);
        }
        // In steady state (a full window) retries are 20% of 100/s plus 10/s = 30/s.
        let steady: u32 = retries_per_sec[10..].iter().sum();
        assert!(
            (280..=320).contains(&steady),
            "{steady} retries in 10 s: {retries_per_sec:?}"
        );
        // Never more than the window allows, in any 10 s.
        for w in retries_per_sec.windows(10) {
            let sum: u32 = w.iter().sum();
            assert!(sum <= 20 * 10 + 100 + 1, "{w:?}");
        }
        // No requests for a whole window: only the reserve (10 a second, over the window).
        tokio::time::advance(Duration::from_secs(11)).await;
        let reserve = (0..1000).filter(|_| budget.try_withdraw(now(), 20)).count();
        assert_eq!(reserve, 100);
    }
}
