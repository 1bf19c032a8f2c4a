//! The background releaser: gives back what the jobs could not, and what a previous run
//! left.
//!
//! Its work: reservations dropped without `release` (panic, aborted task), releases that
//! failed, the journal's leftovers at start-up, grants a job handed back without knowing
//! whether its claim still names them, and calls to settle (an `-alloc` client
//! of a previous run, or one cut short at shutdown: its reply is read from its file and a
//! grant in it is recorded and released). Attempts run concurrently, each retried with
//! the crate's backoff (1 s doubling to 5 min, jittered, so daemons that failed together
//! do not retry together) until the scheduler confirms. A release marked `check_records`
//! first asks the job's claim (`GrantRecords`): a grant the claim names is the claim's —
//! whoever takes the job over releases it — and only leaves the journal here. While the
//! claim cannot be read, the question is asked again (same backoff) and nothing is
//! released: a release now could be the second one.
//!
//! **The give-up rule.** A release that fails `GIVE_UP_AFTER_FAILURES` times in a row,
//! counted in the journal across restarts (about an hour of retrying at the backoff's
//! pace), is given up: an error names the scheduler job and how long it was held, and
//! the entry moves to the journal's given-up list, where it stays for the operator. It
//! is never released again by orchgpu: by then the scheduler may have handed that job id
//! to another client, whose GPUs a late release would free. For the same reason an entry
//! recorded for another scheduler address is never released through this one.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::journal::{CallEntry, JournalEntry};
use super::{Shared, blocking, forget, unix_now_ms};
use crate::aws::error_chain;
use crate::backoff::Backoff;
use crate::scheduler::{AllocReply, GpuScheduler, SchedulerError};
use crate::telemetry;

/// Consecutive failed releases after which a reservation is given up (see the module doc).
pub(crate) const GIVE_UP_AFTER_FAILURES: u32 = 20;
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(5 * 60);
/// How often the age of the oldest reservation is measured for its gauge.
const GAUGE_REFRESH: Duration = Duration::from_secs(10);

/// What the releaser is asked to do.
pub(super) enum Work {
    /// Release this reservation, the first attempt after `after`; with `check_records`,
    /// only if the job's claim does not name it.
    Release {
        entry: JournalEntry,
        after: Duration,
        check_records: bool,
    },
    /// A release of this reservation just failed: count it and retry after a backoff.
    Retry(JournalEntry),
    /// Settle this call (once `after`, the call still running in this process, has
    /// ended) and release what it granted.
    Settle {
        call: CallEntry,
        after: Option<JoinHandle<Result<AllocReply, SchedulerError>>>,
    },
}

/// A release waiting for its next attempt.
struct Pending {
    entry: JournalEntry,
    due: Instant,
    /// Ask the job's claim before releasing (see the module doc).
    check_records: bool,
    /// Failed attempts at asking it, for the backoff.
    check_failures: u32,
}

/// How one attempt ended.
enum Attempt {
    Released,
    Failed,
    /// The job's claim names the grant: it is the claim's now.
    RecordedElsewhere,
    /// The claim could not be read: ask again later.
    Unknown,
}

pub(super) struct Releaser<S> {
    shared: Arc<Shared<S>>,
    inbox: mpsc::UnboundedReceiver<Work>,
    /// The longest one scheduler call can take: how long the last pass may wait.
    worst_call: Duration,
    pending: Vec<Pending>,
    attempts: JoinSet<(Pending, Attempt)>,
    settles: JoinSet<Option<JournalEntry>>,
}

impl<S: GpuScheduler + Send + Sync + 'static> Releaser<S> {
    pub(super) fn new(
        shared: Arc<Shared<S>>,
        inbox: mpsc::UnboundedReceiver<Work>,
        worst_call: Duration,
    ) -> Releaser<S> {
        Releaser {
            shared,
            inbox,
            worst_call,
            pending: Vec::new(),
            attempts: JoinSet::new(),
            settles: JoinSet::new(),
        }
    }

    /// Runs until every sender is gone, then makes one last pass (see `finish`).
    pub(super) async fn run(mut self) {
        let mut gauges = tokio::time::interval(GAUGE_REFRESH);
        loop {
            let next_due = self.pending.iter().map(|p| p.due).min();
            tokio::select! {
                _ = gauges.tick() => self.refresh_gauges(),
                work = self.inbox.recv() => match work {
                    Some(work) => self.accept(work).await,
                    None => break,
                },
                Some(done) = self.attempts.join_next() => {
                    if let Ok((pending, attempt)) = done {
                        self.attempted(pending, attempt).await;
                    }
                }
                Some(settled) = self.settles.join_next() => self.settled(settled),
                _ = tokio::time::sleep_until(next_due.unwrap_or_else(Instant::now)), if next_due.is_some() => {}
            }
            self.start_due_attempts();
            telemetry::get().set_releases_pending(
                self.pending.len() + self.attempts.len() + self.settles.len(),
            );
        }
        self.finish().await;
    }

    /// The age of the oldest reservation the journal holds, for the metric.
    fn refresh_gauges(&self) {
        let now = unix_now_ms() / 1000;
        let oldest = self
            .shared
            .journal
            .reservations()
            .iter()
            .map(|e| now.saturating_sub(e.since_unix))
            .max()
            .unwrap_or(0);
        telemetry::get().set_oldest_reservation(Duration::from_secs(oldest));
    }

    async fn accept(&mut self, work: Work) {
        match work {
            Work::Retry(entry) => {
                self.attempted(Pending::now(entry, false), Attempt::Failed)
                    .await
            }
            Work::Release {
                entry,
                after,
                check_records,
            } => self.add_release(entry, after, check_records),
            Work::Settle { call, after } => {
                let shared = self.shared.clone();
                self.settles.spawn(async move {
                    if let Some(in_flight) = after {
                        // Its reply is in its file either way.
                        let _ = in_flight.await;
                    }
                    settle(shared, call).await
                });
            }
        }
    }

    fn add_release(&mut self, entry: JournalEntry, after: Duration, check_records: bool) {
        if entry.scheduler != self.shared.scheduler_address {
            warn!(
                scheduler_job = %entry.scheduler_job_id,
                scheduler = %entry.scheduler,
                "Journal entry is for another scheduler; keeping it, not releasing it here."
            );
            return;
        }
        self.pending.push(Pending {
            entry,
            due: Instant::now() + after,
            check_records,
            check_failures: 0,
        });
    }

    fn start_due_attempts(&mut self) {
        let now = Instant::now();
        let (due, waiting): (Vec<_>, Vec<_>) = self.pending.drain(..).partition(|p| p.due <= now);
        self.pending = waiting;
        for pending in due {
            let shared = self.shared.clone();
            self.attempts.spawn(async move {
                let attempt = attempt_release(&shared, &pending).await;
                (pending, attempt)
            });
        }
    }

    async fn attempted(&mut self, pending: Pending, attempt: Attempt) {
        let entry = pending.entry;
        match attempt {
            Attempt::Released => {
                info!(scheduler_job = %entry.scheduler_job_id, job_id = %entry.job_id,
                    key = %entry.key, "Released reservation in the background.");
                self.shared
                    .count_gpu_time(entry.since_unix.saturating_mul(1000));
                forget(&self.shared, &entry.scheduler_job_id).await;
                return;
            }
            Attempt::RecordedElsewhere => {
                info!(scheduler_job = %entry.scheduler_job_id, job_id = %entry.job_id,
                    "The job's claim records this grant; whoever takes the job over releases it.");
                forget(&self.shared, &entry.scheduler_job_id).await;
                return;
            }
            Attempt::Unknown => {
                let check_failures = pending.check_failures + 1;
                let delay = retry_delay(check_failures);
                warn!(scheduler_job = %entry.scheduler_job_id, job_id = %entry.job_id,
                    retry_s = delay.as_secs(), "Cannot read the job's claim; asking again before releasing.");
                self.pending.push(Pending {
                    entry,
                    due: Instant::now() + delay,
                    check_records: true,
                    check_failures,
                });
                return;
            }
            Attempt::Failed => {}
        }
        telemetry::get().release_failed();
        let job = entry.scheduler_job_id.clone();
        let failures = blocking(&self.shared.journal, move |j| j.note_release_failure(&job))
            .await
            .unwrap_or_else(|e| {
                warn!(error = %error_chain(&e), "Failed to update the journal.");
                entry.release_failures + 1
            });
        if failures >= GIVE_UP_AFTER_FAILURES {
            self.give_up(entry, failures).await;
            return;
        }
        let delay = retry_delay(failures);
        warn!(
            scheduler_job = %entry.scheduler_job_id,
            failures,
            retry_s = delay.as_secs(),
            "Release failed again; will retry."
        );
        // The claim was asked already (or need not be): it never takes a grant back.
        self.pending.push(Pending {
            entry: JournalEntry {
                release_failures: failures,
                ..entry
            },
            due: Instant::now() + delay,
            check_records: false,
            check_failures: 0,
        });
    }

    async fn give_up(&mut self, entry: JournalEntry, failures: u32) {
        let now = unix_now_ms() / 1000;
        error!(
            scheduler_job = %entry.scheduler_job_id,
            scheduler = %entry.scheduler,
            job_id = %entry.job_id,
            key = %entry.key,
            failures,
            held_s = now.saturating_sub(entry.since_unix),
            "Giving up releasing GPUs: the scheduler may still hold them. Release them by hand \
             (ssgm -dealloc -j ID) and check the scheduler; the journal keeps the entry under given_up."
        );
        telemetry::get().release_given_up();
        let job = entry.scheduler_job_id.clone();
        if let Err(e) = blocking(&self.shared.journal, move |j| j.give_up(&job, now)).await {
            warn!(error = %error_chain(&e), "Failed to update the journal.");
        }
        self.shared.released();
    }

    fn settled(&mut self, settled: Result<Option<JournalEntry>, tokio::task::JoinError>) {
        if let Ok(Some(entry)) = settled {
            if entry.scheduler == self.shared.scheduler_address {
                self.shared.ledger.on_grant();
            }
            self.add_release(entry, Duration::ZERO, false);
        }
    }

    /// The daemon is ending: one attempt at each release never tried yet, and the
    /// attempts and settles in flight, all within one scheduler call's time. Retries that
    /// are not due, and whatever is still open after that, stay in the journal for the
    /// next start.
    async fn finish(mut self) {
        let now = Instant::now();
        for pending in &mut self.pending {
            if pending.entry.release_failures == 0 {
                pending.due = now;
            }
        }
        self.start_due_attempts();
        let limit = self.worst_call;
        let last_pass = async {
            loop {
                tokio::select! {
                    Some(done) = self.attempts.join_next() => {
                        if let Ok((pending, attempt)) = done {
                            self.attempted(pending, attempt).await;
                        }
                    }
                    Some(settled) = self.settles.join_next() => self.settled(settled),
                    else => break,
                }
                // A settled call's grant is due now; failed attempts are not.
                self.start_due_attempts();
            }
        };
        if tokio::time::timeout(limit, last_pass).await.is_err() {
            warn!("Stopping with releases still in flight.");
        }
        let open = self.shared.journal.reservations().len() + self.shared.journal.calls().len();
        if open > 0 {
            error!(
                count = open,
                "Reservations not confirmed released at exit; the journal keeps them for the next start."
            );
        }
    }
}

impl Pending {
    fn now(entry: JournalEntry, check_records: bool) -> Pending {
        Pending {
            entry,
            due: Instant::now(),
            check_records,
            check_failures: 0,
        }
    }
}

/// One attempt: asks the job's claim first when told to, then the scheduler.
async fn attempt_release<S: GpuScheduler>(shared: &Shared<S>, pending: &Pending) -> Attempt {
    let entry = &pending.entry;
    if pending.check_records
        && !entry.job_id.is_empty()
        && let Some(records) = &shared.records
    {
        match records
            .records_grant(&entry.job_id, &entry.scheduler_job_id)
            .await
        {
            Ok(true) => return Attempt::RecordedElsewhere,
            Ok(false) => {}
            Err(e) => {
                warn!(scheduler_job = %entry.scheduler_job_id, error = %e, "Cannot read the job's claim.");
                return Attempt::Unknown;
            }
        }
    }
    let result = shared.scheduler.dealloc(&entry.scheduler_job_id).await;
    telemetry::get().scheduler_call("dealloc", super::dealloc_reply_label(&result));
    match result {
        Ok(()) => Attempt::Released,
        Err(e) => {
            warn!(
                scheduler_job = %entry.scheduler_job_id,
                error = %error_chain(&e),
                "Background release failed."
            );
            Attempt::Failed
        }
    }
}

/// The wait before the next attempt after `failures` failed ones.
fn retry_delay(failures: u32) -> Duration {
    let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX).with_jitter();
    for _ in 1..failures {
        backoff.next_delay();
    }
    backoff.next_delay()
}

/// Reads what a call left (after waiting out a client that still runs) and records a
/// grant in it as a reservation; a call that granted nothing is forgotten.
async fn settle<S: GpuScheduler>(shared: Arc<Shared<S>>, call: CallEntry) -> Option<JournalEntry> {
    let files = shared.journal.call_files(&call.call_id);
    let started = std::time::UNIX_EPOCH + Duration::from_millis(call.started_unix_ms);
    let granted = shared.scheduler.settle_orphan(&files, started).await;
    let call_id = call.call_id.clone();
    let Some(job) = granted else {
        info!(job_id = %call.job_id, key = %call.key, "Unfinished SSGM call granted nothing.");
        if let Err(e) = blocking(&shared.journal, move |j| j.end_call(&call_id)).await {
            warn!(error = %error_chain(&e), "Failed to update the journal.");
        }
        return None;
    };
    warn!(scheduler_job = %job, job_id = %call.job_id, key = %call.key,
        "Unfinished SSGM call had granted GPUs; releasing them.");
    let entry = JournalEntry {
        scheduler_job_id: job,
        scheduler: call.scheduler,
        job_id: call.job_id,
        key: call.key,
        since_unix: call.started_unix_ms / 1000,
        release_failures: 0,
    };
    let recorded = entry.clone();
    match blocking(&shared.journal, move |j| j.grant_call(&call_id, recorded)).await {
        Ok(()) => Some(entry),
        // The call record stays: the next start settles it again.
        Err(e) => {
            warn!(error = %error_chain(&e), "Failed to update the journal.");
            None
        }
    }
}
