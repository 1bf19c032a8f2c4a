//! Every GPU from the request to the confirmed release.
//!
//! **Invariant: every grant the scheduler gives is, at every instant, either recorded
//! where the next start *or another daemon* will find it, or released.** How each
//! instant is covered:
//! - before an `-alloc` client starts, a *call* record is written to the journal, and the
//!   client writes its reply into a file in the state directory, in its own process
//!   group: if orchgpu dies while it runs, or between its reply and anything after, the
//!   next start finds the record, waits out (then kills) a client that still runs, reads
//!   its reply and releases what it granted (`releaser`, through
//!   `GpuScheduler::settle_orphan`);
//! - a grant replaces its call record by a *reservation* record in one durable write
//!   before the job uses it; a grant that cannot be recorded is released at once;
//! - with claims on, the job then records the grant in its claim (`claim`), the job's
//!   shared record in S3, before the bundle is uploaded. From then on the claim, not the
//!   journal, owns it: a start-up replay (or any background release) first asks the
//!   claim (`GrantRecords`) and leaves a grant the claim names to whoever takes the job
//!   over — the same host after a restart, or another daemon after the lease — who
//!   releases it, or, if the function may be running, adopts the job (`adopt`) and
//!   releases it only after the result or the result deadline. A grant leaves the claim
//!   (`ClaimHandle::clear_gpus`) before it is released, so it is never released twice.
//!   **What still depends on this host alone** are two windows of about one scheduler
//!   call each: from the `-alloc` client's start to the claim write that records its
//!   grant (the call itself, one fsync, one small PUT), and from the claim write that
//!   takes a grant out to the scheduler's confirmation of its `-dealloc`. A host that
//!   dies *for good* (disk gone) inside one of them leaks that grant until the
//!   scheduler's own clean-up; a restart on the same disk does not (the journal). Closing
//!   them would take a scheduler that can be asked what it granted to whom (SSGM cannot),
//!   or releasing before the claim forgets the grant, which risks a second release of a
//!   job id the scheduler may have handed to another client (see `releaser`). The soak
//!   (`dev/soak.sh`) kills a daemon for good outside them and counts how often they were
//!   open. (Lambda mode, whose journal dies with its sandbox, takes the other side of
//!   that choice for the second window: a grant stays in its claim until its `-dealloc`
//!   is confirmed, `release_once`/`release_recorded`; `lambda::finish` says why);
//! - a grant printed by a failed call (a "stray grant": non-zero exit, killed at its
//!   timeout, broken reply) is recorded the same way and released by the releaser;
//! - a reservation leaves the journal only once the scheduler confirmed its release, or
//!   once its claim took it over (`hand_off`). A `Reservation` dropped without `release`
//!   (panic, cancelled task) hands itself to the releaser from its drop guard; failed
//!   releases are retried there with backoff.
//!
//! Also here: the gate (one job asks the scheduler at a time; while it waits for a busy
//! scheduler, the others wait behind it) and the ledger (`ledger`), replay of what a
//! previous run left (in the background: start-up never waits on the scheduler), and the
//! rule for releases that never succeed (`releaser::GIVE_UP_AFTER_FAILURES`). What a job
//! does with its GPUs is `job`'s business; how SSGM is run is `scheduler`'s.

mod handover;
mod journal;
mod ledger;
mod releaser;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

pub(crate) use journal::{CallEntry, JournalEntry};
pub(crate) use journal::{Journal, JournalError, Leftovers};
use ledger::GrantLedger;
use releaser::{Releaser, Work};

use crate::aws::error_chain;
use crate::ops::telemetry::{self, SchedulerReply};
use crate::scheduler::{AllocReply, GpuScheduler, Grant, SchedulerError};
use crate::unix_now_ms;

/// How reservations are asked for.
#[derive(Debug, Clone)]
pub(crate) struct ReservationSettings {
    /// GPUs per job.
    pub(crate) gpus: u32,
    /// Wait between attempts while the scheduler is busy (a release of ours is sooner).
    pub(crate) alloc_retry_interval: Duration,
    /// Give up getting GPUs for a job after this long.
    pub(crate) alloc_deadline: Duration,
    /// `host:port` of the scheduler, recorded with each reservation: a journal entry of
    /// another scheduler is never released through this one.
    pub(crate) scheduler_address: String,
}

/// Why no reservation was had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AllocError {
    /// The job was cancelled (shutdown abort or lost message) while asking.
    #[error("allocation interrupted")]
    Interrupted,
    /// Shutdown began before the scheduler was asked.
    #[error("allocation not started: shutting down")]
    Stopping,
    #[error("no GPUs granted within {0:?}")]
    Deadline(Duration),
    #[error("scheduler refused a request for {gpus} GPUs: {detail}")]
    Rejected { gpus: u32, detail: String },
    #[error("scheduler call failed")]
    Scheduler(#[source] SchedulerError),
    #[error("failed to record the reservation in the journal")]
    Journal(#[source] JournalError),
}

/// Where a grant may be recorded besides this host's journal: the jobs' claims. A grant
/// recorded there belongs to whoever takes its job over, not to this host's releaser.
pub(crate) trait GrantRecords: Send + Sync {
    /// Whether job `job_id`'s shared record names the grant `scheduler_job_id`.
    fn records_grant<'a>(
        &'a self,
        job_id: &'a str,
        scheduler_job_id: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<bool, String>> + Send + 'a>>;
}

/// State shared by the reservations, their drop guards and the releaser.
struct Shared<S> {
    scheduler: Arc<S>,
    /// The jobs' shared records (`None`: claims are off; the journal owns every grant).
    records: Option<Arc<dyn GrantRecords>>,
    journal: Arc<Journal>,
    ledger: GrantLedger,
    /// Signalled each time one of our reservations is confirmed released.
    gpus_freed: Notify,
    scheduler_address: String,
    /// GPUs per job, for the GPU time a release counts.
    gpus: u32,
}

impl<S> Shared<S> {
    /// A reservation went back (or was given up): count it out and wake a waiting job.
    fn released(&self) {
        self.ledger.on_release();
        self.gpus_freed.notify_waiters();
    }

    /// Counts a confirmed release's GPU time (`orchgpu_gpu_seconds_total`): GPUs per job
    /// times the seconds from the grant (`granted_unix_ms`) to now. Counted by whoever
    /// releases it, over its whole life: a grant handed over through a claim counts once,
    /// at the daemon that adopted and released it, from its first grant.
    fn count_gpu_time(&self, granted_unix_ms: u64) {
        let held_s = unix_now_ms().saturating_sub(granted_unix_ms) as f64 / 1000.0;
        telemetry::get().gpu_time_released(f64::from(self.gpus) * held_s);
    }
}

/// The room for GPU reservations: the gate, the ledger, the journal and the releaser.
pub(crate) struct Reservations<S> {
    shared: Arc<Shared<S>>,
    settings: ReservationSettings,
    /// Held by the one job that is asking for GPUs. While the scheduler is busy, the
    /// others (and the receive loop) wait behind it instead of asking too.
    gate: Mutex<()>,
    work: mpsc::UnboundedSender<Work>,
    /// Call ids are `<prefix>-<n>`: the prefix (start time and pid) keeps them unique
    /// across runs sharing a state directory.
    call_prefix: String,
    next_call: AtomicU64,
}

/// GPUs granted by the scheduler and recorded in the journal. Give them back with
/// `Reservations::release`; if the value is dropped instead (panic, aborted task), its
/// drop guard hands it to the releaser.
pub(crate) struct Reservation {
    grant: Grant,
    entry: JournalEntry,
    /// When it was granted, in Unix milliseconds (the journal keeps whole seconds).
    granted_unix_ms: u64,
    fallback: Option<mpsc::UnboundedSender<Work>>,
}

impl Reservation {
    /// What the scheduler granted.
    pub(crate) fn grant(&self) -> &Grant {
        &self.grant
    }

    /// When it was granted, in Unix seconds.
    pub(crate) fn allocated_unix(&self) -> u64 {
        self.entry.since_unix
    }

    /// Takes the journal entry out, disarming the drop guard.
    fn disarm(mut self) -> JournalEntry {
        self.fallback = None;
        std::mem::replace(&mut self.entry, JournalEntry::placeholder())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(work) = self.fallback.take() {
            warn!(
                scheduler_job = %self.entry.scheduler_job_id,
                "Reservation dropped without release; releasing in the background."
            );
            // The releaser outlives every job, so a send fails only while the process
            // ends, when the journal takes over.
            let _ = work.send(Work::Release {
                entry: self.entry.clone(),
                after: Duration::ZERO,
                check_records: true,
            });
        }
    }
}

impl JournalEntry {
    /// Left in a disarmed `Reservation`; never written anywhere.
    fn placeholder() -> JournalEntry {
        JournalEntry {
            scheduler_job_id: String::new(),
            scheduler: String::new(),
            job_id: String::new(),
            key: String::new(),
            since_unix: 0,
            release_failures: 0,
        }
    }
}

impl<S: GpuScheduler + Send + Sync + 'static> Reservations<S> {
    /// Opens the room on an open journal and starts the releaser, which first settles
    /// and releases what a previous run left (`leftovers`), in the background. The
    /// releaser ends once this value and every `Reservation` are gone, after one last
    /// attempt at what it never tried; anything left stays in the journal.
    pub(crate) fn start(
        scheduler: Arc<S>,
        journal: Arc<Journal>,
        leftovers: Leftovers,
        settings: ReservationSettings,
        worst_call: Duration,
        records: Option<Arc<dyn GrantRecords>>,
    ) -> (Reservations<S>, JoinHandle<()>) {
        let shared = Arc::new(Shared {
            scheduler,
            records,
            journal,
            ledger: GrantLedger::default(),
            gpus_freed: Notify::new(),
            scheduler_address: settings.scheduler_address.clone(),
            gpus: settings.gpus,
        });
        let (work, inbox) = mpsc::unbounded_channel();
        if leftovers.given_up > 0 {
            warn!(
                count = leftovers.given_up,
                "The journal lists reservations whose release was given up; they are not retried."
            );
        }
        for call in leftovers.calls {
            let _ = work.send(Work::Settle { call, after: None });
        }
        for entry in leftovers.reservations {
            if entry.scheduler == shared.scheduler_address {
                shared.ledger.on_grant();
            }
            // A leftover its claim names is the claim's: the releaser asks first.
            let _ = work.send(Work::Release {
                entry,
                after: Duration::ZERO,
                check_records: true,
            });
        }
        let releaser = tokio::spawn(Releaser::new(shared.clone(), inbox, worst_call).run());
        let call_prefix = format!("{}-{}", unix_now_ms(), std::process::id());
        let reservations = Reservations {
            shared,
            settings,
            gate: Mutex::new(()),
            work,
            call_prefix,
            next_call: AtomicU64::new(1),
        };
        (reservations, releaser)
    }

    /// `host:port` of the scheduler the reservations are asked from.
    pub(crate) fn scheduler_address(&self) -> &str {
        &self.settings.scheduler_address
    }

    #[cfg(test)]
    /// Reservations held now: granted and not yet confirmed released, leftovers of a
    /// previous run included.
    pub(crate) fn held(&self) -> u32 {
        self.shared.ledger.held()
    }

    /// Waits until no job is asking the scheduler. The receive loop calls this so that
    /// it takes no new messages while a job waits for GPUs.
    pub(crate) async fn until_gate_free(&self) {
        drop(self.gate.lock().await);
    }

    /// Asks for GPUs for job `job_id` (input `key`) until granted, refused, past the
    /// deadline or interrupted. One job asks at a time. While the scheduler answers
    /// busy, waits for the retry interval or for one of our own releases, whichever
    /// comes first. `stop` ends a wait for the scheduler (not a call in flight); `abort`
    /// also stops waiting for a call in flight, which the releaser lets finish and
    /// settles (what it granted is released).
    ///
    /// # Errors
    /// See `AllocError`.
    pub(crate) async fn allocate(
        &self,
        job_id: &str,
        key: &str,
        abort: &CancellationToken,
        stop: &CancellationToken,
    ) -> Result<Reservation, AllocError> {
        let deadline = Instant::now() + self.settings.alloc_deadline;
        let _waiting = telemetry::get().waiting_for_gpus();
        let _gate = tokio::select! {
            biased;
            _ = abort.cancelled() => return Err(AllocError::Interrupted),
            _ = stop.cancelled() => return Err(AllocError::Stopping),
            gate = self.gate.lock() => gate,
        };
        loop {
            // Registered before asking, so a release during the call is not missed.
            let freed = self.shared.gpus_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();

            let ledger = &self.shared.ledger;
            if let Some(wait) = ledger.wait_before_asking(self.settings.alloc_retry_interval) {
                let now = Instant::now();
                if now >= deadline {
                    return Err(AllocError::Deadline(self.settings.alloc_deadline));
                }
                let wait = wait.min(deadline - now);
                debug!(
                    wait_ms = wait.as_millis() as u64,
                    "Scheduler was busy at our current holdings; waiting for a release."
                );
                tokio::select! {
                    biased;
                    _ = abort.cancelled() => return Err(AllocError::Interrupted),
                    _ = stop.cancelled() => return Err(AllocError::Stopping),
                    _ = &mut freed => {}
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }

            match self.call_alloc(job_id, key, abort).await? {
                Asked::Granted(reservation) => return Ok(reservation),
                Asked::Rejected { detail } => {
                    return Err(AllocError::Rejected {
                        gpus: self.settings.gpus,
                        detail,
                    });
                }
                Asked::Busy => {
                    ledger.on_busy();
                    if Instant::now() >= deadline {
                        return Err(AllocError::Deadline(self.settings.alloc_deadline));
                    }
                    // The next turn waits for a release of ours or the retry interval.
                }
            }
        }
    }

    /// One `-alloc` call, covered by a call record from before it starts until its grant
    /// is recorded (or it is known to have granted nothing).
    async fn call_alloc(
        &self,
        job_id: &str,
        key: &str,
        abort: &CancellationToken,
    ) -> Result<Asked, AllocError> {
        let journal = &self.shared.journal;
        let call = CallEntry {
            call_id: format!(
                "{}-{}",
                self.call_prefix,
                self.next_call.fetch_add(1, Ordering::Relaxed)
            ),
            scheduler: self.settings.scheduler_address.clone(),
            job_id: job_id.to_owned(),
            key: key.to_owned(),
            started_unix_ms: unix_now_ms(),
        };
        let begun = call.clone();
        blocking(journal, move |j| j.begin_call(begun))
            .await
            .map_err(AllocError::Journal)?;
        let files = journal.call_files(&call.call_id);
        // The call runs in a task of its own: a job that gives up waiting must not kill a
        // client whose scheduler may have granted without printing yet.
        let mut in_flight = tokio::spawn({
            let (scheduler, gpus, files) =
                (self.shared.scheduler.clone(), self.settings.gpus, files);
            async move { scheduler.alloc(gpus, &files).await }
        });
        let result = tokio::select! {
            biased;
            joined = &mut in_flight => joined.unwrap_or_else(|e| Err(SchedulerError::Io(std::io::Error::other(e)))),
            _ = abort.cancelled() => {
                // The releaser lets the call finish, then reads its reply from its file
                // and releases what it granted, like a call of a previous run.
                let _ = self.work.send(Work::Settle { call, after: Some(in_flight) });
                return Err(AllocError::Interrupted);
            }
        };
        telemetry::get().scheduler_call("alloc", alloc_reply_label(&result));
        let entry_for = |scheduler_job_id: &str| JournalEntry {
            scheduler_job_id: scheduler_job_id.to_owned(),
            scheduler: call.scheduler.clone(),
            job_id: call.job_id.clone(),
            key: call.key.clone(),
            since_unix: unix_now_ms() / 1000,
            release_failures: 0,
        };
        match result {
            Ok(AllocReply::Granted(grant)) => {
                let entry = entry_for(&grant.scheduler_job_id);
                let recorded = entry.clone();
                let call_id = call.call_id.clone();
                if let Err(e) = blocking(journal, move |j| j.grant_call(&call_id, recorded)).await {
                    // Without a record a crash would leak these GPUs: do not use them.
                    // The call record stays until the release is confirmed.
                    error!(scheduler_job = %grant.scheduler_job_id, error = %error_chain(&e),
                        "Cannot record a grant; releasing it.");
                    if self
                        .shared
                        .scheduler
                        .dealloc(&grant.scheduler_job_id)
                        .await
                        .is_ok()
                    {
                        self.end_call(&call.call_id).await;
                    }
                    return Err(AllocError::Journal(e));
                }
                self.shared.ledger.on_grant();
                info!(
                    scheduler_job = %grant.scheduler_job_id,
                    gpus = self.settings.gpus,
                    devices = %grant.devices().join(","),
                    "GPUs granted."
                );
                Ok(Asked::Granted(Reservation {
                    grant,
                    granted_unix_ms: unix_now_ms(),
                    entry,
                    fallback: Some(self.work.clone()),
                }))
            }
            Ok(AllocReply::Busy) => {
                self.end_call(&call.call_id).await;
                Ok(Asked::Busy)
            }
            Ok(AllocReply::RequestError { detail }) => {
                self.end_call(&call.call_id).await;
                Ok(Asked::Rejected { detail })
            }
            Err(SchedulerError::StrayGrant { job, source }) => {
                warn!(scheduler_job = %job, error = %error_chain(&*source),
                    "Allocation failed after printing a grant; releasing it.");
                let entry = entry_for(&job);
                let recorded = entry.clone();
                let call_id = call.call_id.clone();
                match blocking(journal, move |j| j.grant_call(&call_id, recorded)).await {
                    Ok(()) => {
                        self.shared.ledger.on_grant();
                        let _ = self.work.send(Work::Release {
                            entry,
                            after: Duration::ZERO,
                            check_records: false,
                        });
                    }
                    // The call record and its output stay: the next start settles it.
                    Err(e) => error!(scheduler_job = %job, error = %error_chain(&e),
                        "Cannot record a stray grant; the next start releases it."),
                }
                Err(AllocError::Scheduler(*source))
            }
            Err(e) => {
                self.end_call(&call.call_id).await;
                Err(AllocError::Scheduler(e))
            }
        }
    }

    /// Forgets a call that granted nothing; a failed write only means the next start
    /// reads its (grantless) output again.
    async fn end_call(&self, call_id: &str) {
        let call_id = call_id.to_owned();
        if let Err(e) = blocking(&self.shared.journal, move |j| j.end_call(&call_id)).await {
            warn!(error = %error_chain(&e), "Failed to update the journal.");
        }
    }

    /// Gives the GPUs back with one attempt and wakes a job waiting for GPUs. A failed
    /// release is logged and retried by the releaser, never fatal.
    pub(crate) async fn release(&self, reservation: Reservation) {
        let granted_unix_ms = reservation.granted_unix_ms;
        let entry = reservation.disarm();
        let started = std::time::Instant::now();
        let released = self.shared.scheduler.dealloc(&entry.scheduler_job_id).await;
        telemetry::get().scheduler_call("dealloc", dealloc_reply_label(&released));
        match released {
            Ok(()) => {
                self.shared.count_gpu_time(granted_unix_ms);
                forget(&self.shared, &entry.scheduler_job_id).await;
                telemetry::get().stage_finished("release", started.elapsed());
                info!(
                    stage = "release",
                    scheduler_job = %entry.scheduler_job_id,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "Stage finished."
                );
            }
            Err(e) => {
                error!(
                    scheduler_job = %entry.scheduler_job_id,
                    error = %error_chain(&e),
                    "Failed to release GPUs; retrying in the background."
                );
                let _ = self.work.send(Work::Retry(entry));
            }
        }
    }
}

/// The reply label of an `-alloc` call for the scheduler-calls metric.
fn alloc_reply_label(result: &Result<AllocReply, SchedulerError>) -> SchedulerReply {
    match result {
        Ok(AllocReply::Granted(_)) => SchedulerReply::Granted,
        Ok(AllocReply::Busy) => SchedulerReply::Busy,
        Ok(AllocReply::RequestError { .. }) => SchedulerReply::Error,
        Err(e) => error_label(e),
    }
}

/// The reply label of a `-dealloc` call.
fn dealloc_reply_label(result: &Result<(), SchedulerError>) -> SchedulerReply {
    match result {
        Ok(()) => SchedulerReply::Ok,
        Err(e) => error_label(e),
    }
}

fn error_label(error: &SchedulerError) -> SchedulerReply {
    match error {
        SchedulerError::StrayGrant { source, .. } => error_label(source),
        SchedulerError::Timeout { .. } => SchedulerReply::Timeout,
        SchedulerError::BadReply { .. } => SchedulerReply::Garbage,
        SchedulerError::Spawn { .. } | SchedulerError::Failed { .. } | SchedulerError::Io(_) => {
            SchedulerReply::Failed
        }
    }
}

/// The outcome of one `-alloc` call.
enum Asked {
    Granted(Reservation),
    Busy,
    /// The scheduler refused the request itself.
    Rejected {
        detail: String,
    },
}

/// Forgets a reservation the scheduler confirmed released and counts it out. A failed
/// journal write only means a harmless extra release attempt at the next start.
async fn forget<S>(shared: &Shared<S>, scheduler_job_id: &str) {
    let job = scheduler_job_id.to_owned();
    if let Err(e) = blocking(&shared.journal, move |j| j.forget(&job)).await {
        warn!(error = %error_chain(&e), "Failed to update the journal.");
    }
    shared.released();
}

/// Runs a journal write on the blocking pool (it fsyncs).
async fn blocking<T: Send + 'static>(
    journal: &Arc<Journal>,
    write: impl FnOnce(&Journal) -> Result<T, JournalError> + Send + 'static,
) -> Result<T, JournalError> {
    let journal = journal.clone();
    tokio::task::spawn_blocking(move || write(&journal))
        .await
        .unwrap_or_else(|e| {
            Err(JournalError::Io {
                path: Default::default(),
                source: std::io::Error::other(e),
            })
        })
}

#[cfg(test)]
mod tests;
