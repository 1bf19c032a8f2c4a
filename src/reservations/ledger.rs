//! What our own reservations tell us about the scheduler's room.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Counts the reservations we hold (granted and not yet confirmed released, leftovers of
/// a previous run included) and remembers how many we held when the scheduler last said
/// busy. If it answered busy while we held `n` and we still hold `n` or more, asking
/// again can only succeed if somebody else released GPUs: so we wait for one of our
/// releases or for the retry interval, instead of asking right after another of our
/// jobs took the GPU that the previous release freed (a busy answer per job).
#[derive(Debug, Default)]
pub(crate) struct GrantLedger {
    held: AtomicU32,
    /// Reservations held at the last busy answer, and when it came.
    busy: Mutex<Option<(u32, Instant)>>,
}

impl GrantLedger {
    /// Reservations held now.
    pub(crate) fn held(&self) -> u32 {
        self.held.load(Ordering::SeqCst)
    }

    fn busy_mark(&self) -> std::sync::MutexGuard<'_, Option<(u32, Instant)>> {
        crate::lock(&self.busy)
    }

    pub(crate) fn on_grant(&self) {
        let held = self.held.fetch_add(1, Ordering::SeqCst) + 1;
        crate::ops::telemetry::get().set_gpus_held(held);
        let mut busy = self.busy_mark();
        // Granted while holding more than at the last busy answer: there is more room
        // than that answer showed, so it says nothing any more.
        if busy.is_some_and(|(mark, _)| held > mark) {
            *busy = None;
        }
    }

    /// A reservation is confirmed released (or given up: no longer ours to count).
    pub(crate) fn on_release(&self) {
        let _ = self
            .held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        crate::ops::telemetry::get().set_gpus_held(self.held());
    }

    /// GPUs we did not count as held were confirmed released (a grant a claim records,
    /// released through it in Lambda mode): the scheduler has more room than its last busy
    /// answer showed, so that answer says nothing any more.
    pub(crate) fn on_freed_uncounted(&self) {
        *self.busy_mark() = None;
    }

    pub(crate) fn on_busy(&self) {
        *self.busy_mark() = Some((self.held(), Instant::now()));
    }

    /// How long to wait before asking, or `None` to ask now: asking is pointless while we
    /// hold as many reservations as when the scheduler last said busy, until the retry
    /// interval since that answer has passed.
    pub(crate) fn wait_before_asking(&self, retry_interval: Duration) -> Option<Duration> {
        let (mark, at) = (*self.busy_mark())?;
        if self.held() < mark {
            return None;
        }
        (at + retry_interval)
            .checked_duration_since(Instant::now())
            .filter(|wait| !wait.is_zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_release_of_grants_we_did_not_count_ends_the_wait() {
        let ledger = GrantLedger::default();
        let retry = Duration::from_secs(60);
        // Busy while holding nothing counted (Lambda mode hands its grants to claims).
        ledger.on_busy();
        assert!(
            ledger.wait_before_asking(retry).is_some(),
            "busy at 0: wait"
        );
        ledger.on_freed_uncounted();
        assert_eq!(ledger.wait_before_asking(retry), None, "GPUs freed: ask");
    }

    #[tokio::test(start_paused = true)]
    async fn waits_while_we_hold_what_we_held_at_busy() {
        let ledger = GrantLedger::default();
        let retry = Duration::from_secs(30);
        assert_eq!(ledger.wait_before_asking(retry), None, "never busy: ask");
        ledger.on_grant();
        ledger.on_busy();
        assert_eq!(
            ledger.wait_before_asking(retry),
            Some(retry),
            "still hold 1"
        );
        ledger.on_release();
        assert_eq!(ledger.wait_before_asking(retry), None, "a release: ask");
        ledger.on_grant();
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            ledger.wait_before_asking(retry),
            Some(Duration::from_secs(20)),
            "the freed GPU went to our next job: wait out the rest of the interval"
        );
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(ledger.wait_before_asking(retry), None, "interval over: ask");
        ledger.on_busy();
        ledger.on_grant();
        assert_eq!(
            ledger.wait_before_asking(retry),
            None,
            "granted beyond the mark: the busy answer is stale"
        );
        assert_eq!(ledger.held(), 2);
    }
}
