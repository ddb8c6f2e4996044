//! How fast one provider is called: an adaptive window of requests on the wire (AIMD: halve
//! on overload, grow by one per window of successes, never above `concurrency` nor below 1),
//! and optional requests- and tokens-per-minute limits (GCRA, from `governor`).
//!
//! The window is what keeps a self-hosted server from being flooded while a cloud API is
//! used up to its limit: the user sets the ceiling, the server's 429s find the level.

use std::num::NonZeroU32;
use std::sync::Mutex;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::Semaphore;

use crate::lock;

pub struct Limits {
    window: Window,
    requests: Option<DefaultDirectRateLimiter>,
    tokens: Option<(DefaultDirectRateLimiter, NonZeroU32)>,
}

impl Limits {
    pub fn new(
        concurrency: usize,
        requests_per_minute: Option<u32>,
        tokens_per_minute: Option<u32>,
    ) -> Limits {
        // Requests are spaced evenly: a burst of one second's worth at most, so that a
        // limiter counting fixed minutes on the server side is never overrun.
        let requests = requests_per_minute.and_then(NonZeroU32::new).map(|n| {
            let burst = NonZeroU32::new(n.get() / 60).unwrap_or(NonZeroU32::MIN);
            RateLimiter::direct(Quota::per_minute(n).allow_burst(burst))
        });
        // Token budgets are lumpy (one request may be thousands): a minute's worth may go at
        // once, as the servers' own token buckets allow.
        let tokens = tokens_per_minute
            .and_then(NonZeroU32::new)
            .map(|n| (RateLimiter::direct(Quota::per_minute(n)), n));
        Limits {
            window: Window::new(concurrency.max(1)),
            requests,
            tokens,
        }
    }

    /// Wait until one more request of about `tokens` tokens may go out; the ticket holds its
    /// place in the window until it is dropped.
    pub async fn admit(&self, tokens: u32) -> Ticket<'_> {
        let ticket = self.window.enter().await;
        if let Some(limiter) = &self.requests {
            limiter.until_ready().await;
        }
        if let Some((limiter, capacity)) = &self.tokens {
            // A request larger than a minute's budget waits for a whole minute's budget.
            let n = NonZeroU32::new(tokens.min(capacity.get())).unwrap_or(NonZeroU32::MIN);
            // Cannot fail: `n` is at most the capacity.
            let _ = limiter.until_n_ready(n).await;
        }
        ticket
    }

    /// Requests allowed on the wire at once right now.
    pub fn window(&self) -> usize {
        self.window.size()
    }
}

/// The adaptive window. The semaphore holds `size - in flight` permits; shrinking takes free
/// permits away and records the rest as debt, paid by the next releases.
struct Window {
    ceiling: usize,
    slots: Semaphore,
    state: Mutex<WindowState>,
}

struct WindowState {
    size: usize,
    /// Permits to swallow on release, because the window shrank below what was in flight.
    debt: usize,
    /// Fractional growth: +1/size per success, so the window grows by one per full window.
    growth: f64,
    /// Bumped on every shrink: a request admitted before a shrink does not shrink again, so
    /// one burst of 429s halves the window once, not once per request.
    epoch: u64,
}

impl Window {
    fn new(ceiling: usize) -> Window {
        Window {
            ceiling,
            slots: Semaphore::new(ceiling),
            state: Mutex::new(WindowState {
                size: ceiling,
                debt: 0,
                growth: 0.0,
                epoch: 0,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, WindowState> {
        lock(&self.state)
    }

    fn size(&self) -> usize {
        self.state().size
    }

    async fn enter(&self) -> Ticket<'_> {
        // The semaphore is never closed, so acquiring cannot fail; if it somehow did, the
        // request would go out unthrottled rather than not at all.
        if let Ok(permit) = self.slots.acquire().await {
            permit.forget();
        } else {
            self.state().debt += 1;
        }
        Ticket {
            window: self,
            epoch: self.state().epoch,
        }
    }

    fn release(&self) {
        let mut state = self.state();
        if state.debt > 0 {
            state.debt -= 1;
        } else {
            self.slots.add_permits(1);
        }
    }

    fn shrink(&self, epoch: u64) {
        let mut state = self.state();
        if epoch != state.epoch {
            return;
        }
        state.epoch += 1;
        state.growth = 0.0;
        let smaller = (state.size / 2).max(1);
        for _ in smaller..state.size {
            match self.slots.try_acquire() {
                Ok(permit) => permit.forget(),
                Err(_) => state.debt += 1,
            }
        }
        state.size = smaller;
    }

    fn grow(&self) {
        let mut state = self.state();
        if state.size >= self.ceiling {
            return;
        }
        state.growth += 1.0 / state.size as f64;
        if state.growth >= 1.0 {
            state.growth -= 1.0;
            state.size += 1;
            if state.debt > 0 {
                state.debt -= 1;
            } else {
                self.slots.add_permits(1);
            }
        }
    }
}

/// A place in the window for one request; dropping it frees the place.
pub struct Ticket<'a> {
    window: &'a Window,
    epoch: u64,
}

impl Ticket<'_> {
    /// The request succeeded: the window may grow.
    pub fn succeeded(self) {
        self.window.grow();
    }

    /// The server said it is overloaded: halve the window (once per round).
    pub fn overloaded(self) {
        self.window.shrink(self.epoch);
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.window.release();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Tickets admitted right now, without waiting.
    fn admit_all(limits: &Limits, n: usize) -> Vec<Ticket<'_>> {
        let mut tickets = Vec::new();
        for _ in 0..n {
            match limits.window.slots.try_acquire() {
                Ok(permit) => {
                    permit.forget();
                    tickets.push(Ticket {
                        window: &limits.window,
                        epoch: limits.window.state().epoch,
                    });
                }
                Err(_) => break,
            }
        }
        tickets
    }

    #[test]
    fn a_burst_of_overloads_halves_once_and_the_window_floors_at_one() {
        let limits = Limits::new(8, None, None);
        let mut tickets = admit_all(&limits, 10);
        assert_eq!(tickets.len(), 8);
        // All 8 in flight get a 429: one halving, not eight.
        for t in tickets.drain(..) {
            t.overloaded();
        }
        assert_eq!(limits.window(), 4);
        assert_eq!(admit_all(&limits, 10).len(), 4);
        // Each later round halves again, down to 1 and no further.
        for expected in [2, 1, 1] {
            let t = admit_all(&limits, 1).pop().unwrap();
            t.overloaded();
            assert_eq!(limits.window(), expected);
        }
        assert_eq!(admit_all(&limits, 10).len(), 1);
    }

    #[test]
    fn shrinking_below_what_is_in_flight_is_paid_by_releases() {
        let limits = Limits::new(8, None, None);
        let mut tickets = admit_all(&limits, 8);
        let first = tickets.remove(0);
        first.overloaded();
        assert_eq!(limits.window(), 4);
        // 7 still in flight, window 4: nothing may start until 4 of them finish.
        for _ in 0..3 {
            drop(tickets.pop());
            assert_eq!(admit_all(&limits, 1).len(), 0);
        }
        drop(tickets.pop());
        let next = admit_all(&limits, 1);
        assert_eq!(next.len(), 1);
    }

    #[test]
    fn the_window_grows_back_by_one_per_window_of_successes() {
        let limits = Limits::new(4, None, None);
        admit_all(&limits, 1).pop().unwrap().overloaded();
        admit_all(&limits, 1).pop().unwrap().overloaded();
        assert_eq!(limits.window(), 1);
        let mut sizes = Vec::new();
        for _ in 0..12 {
            admit_all(&limits, 1).pop().unwrap().succeeded();
            sizes.push(limits.window());
        }
        // 1 success at size 1, 2 at size 2, 3 at size 3; then the ceiling holds.
        assert_eq!(sizes, [2, 2, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4]);
        assert_eq!(admit_all(&limits, 10).len(), 4);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_waiting_request_starts_when_a_place_frees() {
        let limits = Limits::new(1, None, None);
        let first = limits.admit(1).await;
        let waiting = limits.admit(1);
        tokio::pin!(waiting);
        assert!(
            tokio::time::timeout(Duration::from_millis(10), waiting.as_mut())
                .await
                .is_err()
        );
        drop(first);
        let _second = waiting.await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn requests_per_minute_are_spaced_evenly() {
        // 1200/min: a burst of 20 (one second's worth), then one per 50 ms.
        let limits = Limits::new(4, Some(1200), None);
        let started = std::time::Instant::now();
        for _ in 0..20 {
            drop(limits.admit(1).await);
        }
        assert!(started.elapsed() < Duration::from_millis(40));
        for _ in 0..4 {
            drop(limits.admit(1).await);
        }
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(150) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn tokens_per_minute_spaces_requests_by_their_size() {
        // 6000/min: a burst of 6000 tokens, then 100 per second.
        let limits = Limits::new(4, None, Some(6000));
        let started = std::time::Instant::now();
        drop(limits.admit(6000).await);
        assert!(started.elapsed() < Duration::from_millis(50));
        drop(limits.admit(20).await);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(150) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
    }
}
