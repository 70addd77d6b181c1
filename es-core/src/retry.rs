//! The one backoff every retry loop uses: exponential, capped and jittered.
//!
//! A [`Backoff`] is a policy (its first and its longest delay); [`Backoff::delays`] starts a
//! sequence of pauses. The `n`-th pause (from 0) is drawn at random from `[d/2, d)` where
//! `d = min(initial × 2^n, max)`: it doubles from `initial`, never exceeds `max`, and keeps its
//! jitter at the cap, so that clients that failed together (a server restart) do not retry in
//! step. The sequence never ends; a loop that gives up counts its attempts itself, and a loop that
//! succeeded starts a new sequence ([`Delays::reset`]).
//!
//! Used by the repository (conflict and transient-append retries), subscriptions (reconnecting
//! after a transient store failure), the outbox relay and the projection runner. Backends use it
//! for their own reconnect loops.
//!
//! ```
//! use std::time::Duration;
//! use es_core::Backoff;
//!
//! let policy = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
//! let pauses: Vec<Duration> = policy.delays().take(8).collect();
//! assert!(pauses[0] >= Duration::from_millis(50) && pauses[0] < Duration::from_millis(100));
//! assert!(pauses.iter().all(|p| *p < Duration::from_secs(2)));
//! assert!(pauses[7] >= Duration::from_secs(1));
//! ```

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// A capped, jittered exponential backoff policy. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
}

impl Backoff {
    /// Pauses that start at `initial` and double up to `max` (a `max` below `initial` is raised
    /// to it), each one drawn from the upper half of its step.
    pub const fn new(initial: Duration, max: Duration) -> Self {
        let max = if max.as_nanos() < initial.as_nanos() {
            initial
        } else {
            max
        };
        Self { initial, max }
    }

    /// The first pause's upper bound.
    pub const fn initial(&self) -> Duration {
        self.initial
    }

    /// The upper bound of every pause.
    pub const fn max(&self) -> Duration {
        self.max
    }

    /// Starts a new sequence of pauses.
    pub fn delays(&self) -> Delays {
        Delays {
            policy: *self,
            inner: None,
        }
    }

    fn build(&self) -> ExponentialBackoff {
        // backon's jitter stretches a step `s` to `[s, 2s)`; steps of half the size give
        // `[d/2, d)` with `d` capped at `max`.
        ExponentialBuilder::new()
            .with_min_delay(self.initial / 2)
            .with_max_delay(self.max / 2)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
    }
}

/// A sequence of pauses from a [`Backoff`]; endless.
#[derive(Debug)]
pub struct Delays {
    policy: Backoff,
    /// Built at the first pause, dropped by a reset: a loop that resets after every success
    /// costs nothing until it fails.
    inner: Option<ExponentialBackoff>,
}

impl Delays {
    /// The next pause.
    pub fn next_delay(&mut self) -> Duration {
        let policy = self.policy;
        // The builder sets no limit on attempts or total delay, so the sequence never ends; the
        // fallback only guards that promise.
        self.inner
            .get_or_insert_with(|| policy.build())
            .next()
            .unwrap_or(policy.max)
            .min(policy.max)
    }

    /// Starts over from the first pause (after a success).
    pub fn reset(&mut self) {
        self.inner = None;
    }

    /// Sleeps for the next pause.
    pub async fn sleep(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.next_delay())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn pauses_double_within_the_upper_half_of_each_step_up_to_the_cap() {
        let policy = Backoff::new(100 * MS, 1000 * MS);
        for _ in 0..50 {
            let pauses: Vec<Duration> = policy.delays().take(8).collect();
            for (n, pause) in pauses.iter().enumerate() {
                let step = (100 * MS * (1 << n)).min(1000 * MS);
                assert!(
                    *pause >= step / 2 && *pause <= step,
                    "pause {n} = {pause:?}, step {step:?}"
                );
            }
        }
    }

    #[test]
    fn pauses_stay_jittered_at_the_cap() {
        let policy = Backoff::new(10 * MS, 40 * MS);
        let capped: Vec<Duration> = policy.delays().skip(5).take(64).collect();
        assert!(capped.iter().all(|p| *p >= 20 * MS && *p <= 40 * MS));
        let first = capped[0];
        assert!(
            capped.iter().any(|p| *p != first),
            "64 pauses at the cap are not all equal"
        );
    }

    #[test]
    fn reset_starts_over() {
        let policy = Backoff::new(10 * MS, 10_000 * MS);
        let mut delays = policy.delays();
        for _ in 0..10 {
            delays.next_delay();
        }
        assert!(delays.next_delay() >= 5000 * MS);
        delays.reset();
        assert!(delays.next_delay() <= 10 * MS);
    }

    #[test]
    fn a_cap_below_the_first_pause_is_raised_to_it() {
        let policy = Backoff::new(50 * MS, 10 * MS);
        assert_eq!(policy.max(), 50 * MS);
        assert!(policy.delays().take(5).all(|p| p <= 50 * MS));
    }
}
