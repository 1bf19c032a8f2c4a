//! One job's pipeline: one input object in, one result object out, as named stages.
//!
//! claim → check for a result beside the download → allocate (for a small input, once its
//! GET has answered, while its body downloads) → bundle (the grant recorded in the claim
//! meanwhile) → the function recorded in the claim → upload → await result → release (after
//! a result, once the claim no longer names the grant, beside the message's delete). The
//! job holds its GPU reservation for the GPU stages and hands it back to `reservations` on
//! every path it controls (success, error, cancellation); the reservation's own drop guard
//! covers a dropped or panicking task. Temporary files are `tempfile` values, removed on
//! every path. What happens to the SQS message afterwards is decided by
//! `JobError::disposition`, not here.
//!
//! This file holds the order of the stages and what they share (`JobContext`, `JobCancel`,
//! `stage`); the first stages are in `prepare`, the GPU stages in `with_gpus`, a job under
//! its claim in `claimed`.
//!
//! With claims on, the claim is the job's shared record (see `claim`). Once the claim
//! says the function may be running, the GPUs are released only after the result or the
//! result deadline: any other ending (shutdown, a lost lease, an upload whose outcome is
//! unknown) hands them over through the claim, and whoever takes the job over next
//! *adopts* it — waits for the result until the recorded deadline, then releases. A grant
//! recorded without the function is released by the next holder before it runs the job.
//! A copy of the job's message that is not the holder's is deleted (the holder's message
//! carries the job); the holder's own message coming back is kept hidden until the claim
//! ends.

use std::collections::HashSet;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, instrument};

pub(crate) mod bundle;
pub mod claim;
mod claimed;
pub mod event;
mod id;
mod outcome;
mod prepare;
pub mod results;
pub(crate) mod serverless;
mod with_gpus;
pub mod workdir;
pub use id::JobId;
pub(crate) use outcome::{Disposition, JobError, JobOutcome};

use crate::location::BucketDir;
use crate::ops::history::{EventKind, History, HistoryEvent};
use crate::reservations::{AllocError, Reservations};
use crate::scheduler::GpuScheduler;
use claim::{ClaimHandle, Claims};
use event::ObjectRef;
use prepare::Prepared;
use results::ResultRegistry;

/// Job settings taken from the configuration.
#[derive(Debug, Clone)]
pub(crate) struct JobSettings {
    pub(crate) intermediate: BucketDir,
    pub(crate) output: BucketDir,
    pub(crate) result_suffix: String,
    pub(crate) result_poll_interval: Duration,
    pub(crate) result_deadline: Duration,
    /// Where temporary input and bundle files go.
    pub(crate) work_dir: PathBuf,
    /// Lambda mode (`serverless`): the intent is recorded in the claim before the
    /// `-alloc` call, and the job ends once its bundle is uploaded, its grant handed to
    /// the claim (`JobOutcome::Handed`) instead of waited on.
    pub(crate) serverless: bool,
}

/// What every job shares: the S3 client, the GPU reservations and the bookkeeping of
/// the jobs running in this daemon.
pub(crate) struct JobContext<S> {
    s3: aws_sdk_s3::Client,
    reservations: Arc<Reservations<S>>,
    settings: JobSettings,
    /// Ids of the jobs running in this daemon: a second delivery of the same object
    /// waits for the first instead of running beside it.
    active: std::sync::Mutex<HashSet<JobId>>,
    /// Signalled when a job leaves `active`.
    job_ended: Notify,
    /// Result events from the results queue, when one is configured (see `results`).
    results: Option<Arc<ResultRegistry>>,
    /// Cross-daemon claims of job ids (`None`: this daemon is alone on its queue).
    claims: Option<Claims>,
    /// Each job's timeline (`orchgpu jobs`); never fails a job.
    history: History,
}

impl<S> JobContext<S> {
    pub(crate) fn new(
        s3: aws_sdk_s3::Client,
        reservations: Arc<Reservations<S>>,
        settings: JobSettings,
        results: Option<Arc<ResultRegistry>>,
        claims: Option<Claims>,
        history: History,
    ) -> JobContext<S> {
        JobContext {
            s3,
            reservations,
            settings,
            active: std::sync::Mutex::new(HashSet::new()),
            job_ended: Notify::new(),
            results,
            claims,
            history,
        }
    }

    /// Adds an event to job `object`'s timeline in the history.
    pub(crate) fn record(&self, object: &ObjectRef, message_id: Option<&str>, kind: EventKind) {
        self.history.record(HistoryEvent::now(
            JobId::derive(object).as_str(),
            object.bucket.as_str(),
            object.key.as_str(),
            message_id.map(str::to_owned),
            kind,
        ));
    }

    /// Whether jobs are claimed across daemons.
    pub(crate) fn has_claims(&self) -> bool {
        self.claims.is_some()
    }

    /// The GPU reservations the jobs draw on.
    pub(crate) fn reservations(&self) -> &Reservations<S> {
        &self.reservations
    }
}

/// Why a job's cancellation token fired.
#[derive(Debug, Clone)]
pub(crate) struct JobCancel {
    /// Fired on shutdown abort or when the message's receipt is lost.
    pub(crate) token: CancellationToken,
    /// Fired only when the message's receipt is lost.
    pub(crate) lost: CancellationToken,
    /// Fired on the first shutdown signal: a job that holds no GPUs yet stops and returns
    /// its message at once; one that holds GPUs goes on within the grace period.
    pub(crate) stop: CancellationToken,
}

impl JobCancel {
    fn error(&self) -> JobError {
        if self.lost.is_cancelled() {
            JobError::Abandoned
        } else {
            JobError::Cancelled
        }
    }

    /// The job's error for an allocation that failed or was cut short.
    fn allocation_error(&self, error: AllocError) -> JobError {
        match error {
            AllocError::Interrupted => self.error(),
            AllocError::Stopping => JobError::NotStarted,
            other => JobError::Allocation(other),
        }
    }
}

/// Removes a job from `active` when it ends, on every path.
struct ActiveClaim<'a, S> {
    context: &'a JobContext<S>,
    id: JobId,
}

impl<S> Drop for ActiveClaim<'_, S> {
    fn drop(&mut self) {
        crate::lock(&self.context.active).remove(&self.id);
        self.context.job_ended.notify_waiters();
    }
}

impl<S: GpuScheduler + Send + Sync + 'static> JobContext<S> {
    /// Runs one job to its end. Cancellation via `cancel` releases the GPUs and returns
    /// `Cancelled` or `Abandoned`.
    ///
    /// # Errors
    /// A `JobError` whose `disposition` says what to do with the message.
    #[instrument(skip_all, fields(job_id = %JobId::derive(object), key = %object.key))]
    pub(crate) async fn run_job(
        &self,
        object: &ObjectRef,
        message_id: Option<&str>,
        cancel: &JobCancel,
    ) -> Result<JobOutcome, JobError> {
        let id = JobId::derive(object);
        let started = Instant::now();
        let _active = self.claim(&id, cancel).await?;
        let Some(claims) = &self.claims else {
            return self.run_stages(&id, object, started, cancel, None).await;
        };
        // The cross-daemon claim comes before the result check: of two daemons, the one
        // that loses either finds the result later or takes over an expired claim.
        let guard = stage("claim", self.acquire_claim(claims, &id, message_id, cancel)).await?;
        self.record(object, None, EventKind::Claimed);
        let claim_lost = cancel.token.child_token();
        let stages_cancel = JobCancel {
            token: claim_lost.clone(),
            ..cancel.clone()
        };
        let handle = guard.handle();
        let work = self.run_claimed(
            &id,
            object,
            started,
            &stages_cancel,
            &handle,
            guard.carried().clone(),
        );
        let (result, lost) = guard.keep_while(&claim_lost, work).await;
        let result = match result {
            Err(_) if lost && !cancel.token.is_cancelled() => Err(JobError::ClaimLost),
            other => other,
        };
        // Deleted if it records nothing; else released with its record for the next holder.
        Box::pin(guard.end()).await;
        result
    }

    /// The job's stages, from the result check to the release.
    async fn run_stages(
        &self,
        id: &JobId,
        object: &ObjectRef,
        started: Instant,
        cancel: &JobCancel,
        claim: Option<&ClaimHandle>,
    ) -> Result<JobOutcome, JobError> {
        let id = id.clone();
        let input = self.temp_file(&id, "input")?;
        let prepared = Box::pin(self.prepare(&id, object, input.path(), cancel, claim)).await?;
        let (reservation, size) = match prepared {
            Prepared::AlreadyDone => {
                info!("Result already exists; not running the job again.");
                return Ok(JobOutcome::AlreadyDone);
            }
            Prepared::Ready { reservation, size } => (reservation, size),
        };
        let result = self
            .run_with_gpus(&id, object, size, input.path(), &reservation, cancel, claim)
            .await;
        // The GPUs go back (after a result, beside the message's delete: see `claimed`).
        let done = claimed::GpusDone::from(&result);
        Box::pin(self.give_back(object, reservation, claim, done)).await;
        drop(input);
        if matches!(result, Ok(JobOutcome::Completed)) {
            info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "Job completed."
            );
        }
        result
    }

    /// Marks the job as running in this daemon, waiting while another delivery of the
    /// same object runs.
    async fn claim(&self, id: &JobId, cancel: &JobCancel) -> Result<ActiveClaim<'_, S>, JobError> {
        loop {
            let ended = self.job_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let inserted = crate::lock(&self.active).insert(id.clone());
            if inserted {
                return Ok(ActiveClaim {
                    context: self,
                    id: id.clone(),
                });
            }
            info!("Same object is already being processed; waiting for it.");
            tokio::select! {
                biased;
                _ = cancel.token.cancelled() => return Err(cancel.error()),
                _ = cancel.stop.cancelled() => return Err(JobError::NotStarted),
                _ = &mut ended => {}
            }
        }
    }

    fn result_key(&self, id: &JobId) -> String {
        self.settings
            .output
            .key_for(&format!("{id}{}", self.settings.result_suffix))
    }

    fn temp_file(&self, id: &JobId, what: &str) -> Result<tempfile::NamedTempFile, JobError> {
        tempfile::Builder::new()
            .prefix(&format!("orchgpu-{id}-{what}-"))
            .tempfile_in(&self.settings.work_dir)
            .map_err(|source| JobError::TempFile {
                dir: self.settings.work_dir.display().to_string(),
                source,
            })
    }
}

/// Runs a stage and logs one line with its name and elapsed time when it succeeds.
///
/// The stage's future is boxed: an async fn's future is as large as its largest await,
/// for its whole life, so a job waiting for its result would otherwise keep room for its
/// largest stage (an SDK request is several KB; with them inline a waiting job's task
/// took 83 KB, see BENCHMARKS.md, "Memory"). One allocation per stage costs nothing next
/// to the stage itself. The job's other requests (the claim's writes and its end, the
/// release, an adoption) and the `prepare` and `give_back` steps are boxed where they are
/// awaited, for the same reason.
async fn stage<T>(
    name: &'static str,
    fut: impl Future<Output = Result<T, JobError>>,
) -> Result<T, JobError> {
    let started = Instant::now();
    let result = Box::pin(fut).await;
    if result.is_ok() {
        let elapsed = started.elapsed();
        crate::ops::telemetry::get().stage_finished(name, elapsed);
        info!(
            stage = name,
            elapsed_ms = elapsed.as_millis() as u64,
            // Finer than milliseconds, for the benchmark's per-stage figures.
            elapsed_us = elapsed.as_micros() as u64,
            "Stage finished."
        );
    }
    result
}

async fn until_cancelled<T>(
    cancel: &JobCancel,
    fut: impl Future<Output = Result<T, JobError>>,
) -> Result<T, JobError> {
    tokio::select! {
        biased;
        _ = cancel.token.cancelled() => Err(cancel.error()),
        result = fut => result,
    }
}
