//! The one retry policy of the crate: exponential backoff with a cap and optional jitter.
//!
//! Every loop that retries (receives on the jobs and results queues, GPU releases,
//! visibility extensions, result checks) takes its delays from a `Backoff`, so the
//! policy is written once. Jitter spreads the retries of several daemons (or several
//! releases) that failed together, so they do not hit the scheduler or SQS in step.

use std::time::Duration;

/// Delays that start at `first`, double after each failure up to `max`, and go back to
/// `first` on `reset`. With jitter, each delay is drawn uniformly from its upper half
/// (`[d/2, d]`): never more than the undisturbed delay, never less than half of it.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    first: Duration,
    max: Duration,
    jitter: bool,
    current: Duration,
}

impl Backoff {
    /// A backoff from `first` doubling to `max`, without jitter.
    pub(crate) fn new(first: Duration, max: Duration) -> Backoff {
        let first = first.min(max);
        Backoff {
            first,
            max,
            jitter: false,
            current: first,
        }
    }

    /// The same, with jitter (for retries several processes may make at once).
    pub(crate) fn with_jitter(mut self) -> Backoff {
        self.jitter = true;
        self
    }

    /// The delay before the next attempt; the one after will be twice as long (capped).
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.current;
        self.current = self.current.saturating_mul(2).min(self.max);
        if self.jitter && !delay.is_zero() {
            let half = delay / 2;
            let spread = (delay - half).as_nanos().min(u128::from(u64::MAX)) as u64;
            half + Duration::from_nanos(fastrand::u64(0..=spread))
        } else {
            delay
        }
    }

    /// Back to the first delay, after a success.
    pub(crate) fn reset(&mut self) {
        self.current = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(S(1), S(5));
        let delays: Vec<_> = (0..5).map(|_| b.next_delay()).collect();
        assert_eq!(delays, [S(1), S(2), S(4), S(5), S(5)]);
        b.reset();
        assert_eq!(b.next_delay(), S(1));
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        let mut b = Backoff::new(S(8), S(8)).with_jitter();
        let delays: Vec<_> = (0..200).map(|_| b.next_delay()).collect();
        assert!(
            delays.iter().all(|d| *d >= S(4) && *d <= S(8)),
            "{delays:?}"
        );
        // 200 draws from a 4 s range are not all equal unless jitter is broken.
        assert!(
            delays.iter().any(|d| *d != delays[0]),
            "no spread: {delays:?}"
        );
    }

    #[test]
    fn first_above_max_is_capped() {
        let mut b = Backoff::new(S(10), S(3));
        assert_eq!(b.next_delay(), S(3));
    }
}
