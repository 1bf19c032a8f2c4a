//! One job's pipeline: one input object in, one result object out, as named stages.
//!
//! claim → check for a result beside the download → allocate (for a small input, once its
//! GET has answered, while its body downloads) → bundle (the grant recorded in the claim
//! meanwhile) → the function recorded in the claim → upload → await result → release. The
//! job holds its GPU reservation for the GPU stages and hands it back to `reservations` on
//! every path it controls (success, error, cancellation); the reservation's own drop guard covers a
//! dropped or panicking task. Temporary files are `tempfile` values, removed on every
//! path. What happens to the SQS message afterwards is decided by
//! `JobError::disposition`, not here.
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
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument, warn};

use crate::aws::error_chain;
use crate::backoff::Backoff;
use bundle::{BundleError, Manifest, ManifestSource, ReservationField};
pub(crate) mod bundle;
pub mod claim;
mod claimed;
pub mod event;
mod outcome;
pub mod results;
pub mod workdir;
pub(crate) use outcome::{Disposition, JobError, JobOutcome};

use crate::aws::storage;
use crate::location::BucketDir;
use crate::ops::history::{EventKind, History, HistoryEvent};
use crate::reservations::{AllocError, Reservation, Reservations};
use crate::scheduler::GpuScheduler;
use claim::{ClaimHandle, Claims, FunctionStarted, RecordedGrant};
use event::ObjectRef;
use results::{ResultRegistry, ResultWaiter};

/// A job's id: derived from the object's identity, so the same object version always
/// maps to the same id (and the same result key), across deliveries, restarts and
/// daemons.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobId(String);

impl JobId {
    /// `sha256(bucket, key, version or ETag)` cut to 20 hex digits (80 bits): short enough
    /// for file names, long enough that two objects never share one in practice. The
    /// event's `sequencer` is not used: LocalStack sends the same one for every event.
    pub fn derive(object: &ObjectRef) -> JobId {
        let mut hasher = Sha256::new();
        let identity = object
            .version_id
            .as_deref()
            .or(object.etag.as_deref())
            .unwrap_or("");
        for part in [object.bucket.as_str(), object.key.as_str(), identity] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part.as_bytes());
        }
        let digest = hasher.finalize();
        let hex: String = digest[..10].iter().map(|b| format!("{b:02x}")).collect();
        JobId(hex)
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Inputs up to this size are small: downloaded while GPUs are being asked for (see
/// `JobContext::prepare`) and without a `LARGE_DOWNLOADS` permit. Larger ones are
/// downloaded first, so GPUs are not held while they stream in.
const SMALL_INPUT_MAX: u64 = 8 * 1024 * 1024;

/// Whether the event says the object is small; one of unknown size counts as large.
fn is_small_input(object: &ObjectRef) -> bool {
    object.size.is_some_and(|size| size <= SMALL_INPUT_MAX)
}

/// Downloads of large inputs (or of unknown size) streaming at once, across the process.
/// Each one keeps hyper's adaptive read buffer (up to about 400 KB) and a write buffer:
/// 20 jobs with 200 MB inputs otherwise cost 15+ MB more than 20 small ones, for no
/// throughput gain (the downloads share one network path).
static LARGE_DOWNLOADS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// When polling, the first HEAD for a result comes this soon after the upload; the
/// interval then doubles up to `-b`.
const FIRST_RESULT_CHECK: Duration = Duration::from_millis(250);

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

/// What `prepare` leaves for the rest of the job.
#[expect(
    clippy::large_enum_variant,
    reason = "one value per job, returned once: boxing the reservation would buy nothing"
)]
enum Prepared {
    AlreadyDone,
    Ready { reservation: Reservation, size: u64 },
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
        guard.end().await;
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
        let (reservation, size) = match self.prepare(&id, object, input.path(), cancel).await? {
            Prepared::AlreadyDone => {
                info!("Result already exists; not running the job again.");
                return Ok(JobOutcome::AlreadyDone);
            }
            Prepared::Ready { reservation, size } => (reservation, size),
        };
        let result = self
            .run_with_gpus(&id, object, size, input.path(), &reservation, cancel, claim)
            .await;
        // The GPUs go back before anything else happens to the message.
        self.give_back(object, reservation, claim, claimed::GpusDone::from(&result))
            .await;
        drop(input);
        if result.is_ok() {
            info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "Job completed."
            );
        }
        result
    }

    /// Checks for an existing result, downloads the input and gets GPUs. The check and
    /// the download start together. A small input's GPUs are asked for as soon as the
    /// check says the job must run *and* the input's GET has answered with the object
    /// the event named, while its body goes on downloading: the scheduler round trip
    /// then costs almost no latency, and an event for an object that is not there (gone,
    /// overwritten, never written) costs no scheduler call at all. A large input (or one
    /// of unknown size) is downloaded first, so GPUs are not held while it streams in.
    async fn prepare(
        &self,
        id: &JobId,
        object: &ObjectRef,
        input: &Path,
        cancel: &JobCancel,
    ) -> Result<Prepared, JobError> {
        // Each stage boxes its own future (see `stage`): the SDK's futures are large.
        let check = stage("check_result", self.result_exists(id));
        if !is_small_input(object) {
            let download = stage(
                "download",
                until_cancelled(cancel, self.download(object, input)),
            );
            let (exists, downloaded) = tokio::join!(check, download);
            if exists? {
                return Ok(Prepared::AlreadyDone);
            }
            let size = downloaded?;
            let reservation = self.allocate_unless_stopping(id, object, cancel).await?;
            return Ok(Prepared::Ready { reservation, size });
        }

        // Sent once the GET has answered with the object; dropped unsent when it did not.
        let (answered, input_is_there) = tokio::sync::oneshot::channel::<()>();
        let download = stage(
            "download",
            until_cancelled(cancel, async {
                let opened = self.open_input(object).await?;
                let _ = answered.send(());
                let saved = opened.save_to(input).await.map_err(JobError::Storage)?;
                Ok(saved.size)
            }),
        );
        // A failed download makes an allocation still waiting for its turn pointless.
        let allocation = JobCancel {
            token: cancel.token.child_token(),
            ..cancel.clone()
        };
        let download = async {
            let downloaded = download.await;
            if downloaded.is_err() {
                allocation.token.cancel();
            }
            downloaded
        };
        let check_then_allocate = async {
            if check.await? {
                return Ok(None);
            }
            if input_is_there.await.is_err() {
                // The download failed (or was cancelled) before S3 answered with the
                // object; its own error is the job's (see below), not this one.
                return Err(cancel.error());
            }
            self.allocate_unless_stopping(id, object, &allocation)
                .await
                .map(Some)
        };
        match tokio::join!(check_then_allocate, download) {
            (Ok(None), _) => Ok(Prepared::AlreadyDone),
            (Ok(Some(reservation)), Ok(size)) => Ok(Prepared::Ready { reservation, size }),
            (Ok(Some(reservation)), Err(e)) => {
                self.reservations.release(reservation).await;
                Err(e)
            }
            // When both failed, the download's error says more: an input that is gone
            // can never run, whatever else went wrong (such as the allocation given up
            // because of it).
            (Err(_), Err(e)) => Err(e),
            (Err(e), Ok(_)) => Err(e),
        }
    }

    async fn allocate_unless_stopping(
        &self,
        id: &JobId,
        object: &ObjectRef,
        cancel: &JobCancel,
    ) -> Result<Reservation, JobError> {
        if cancel.stop.is_cancelled() {
            return Err(JobError::NotStarted);
        }
        self.record(object, None, EventKind::WaitingForGpus);
        let allocate = async {
            self.reservations
                .allocate(id.as_str(), &object.key, &cancel.token, &cancel.stop)
                .await
                .map_err(|e| cancel.allocation_error(e))
        };
        let reservation = stage("allocate", allocate).await?;
        let grant = reservation.grant();
        self.record(
            object,
            None,
            EventKind::Granted {
                scheduler_job: grant.scheduler_job_id.clone(),
                devices: grant.devices().into_iter().map(str::to_owned).collect(),
            },
        );
        Ok(reservation)
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "the job's stages share these; a struct would only rename them"
    )]
    async fn run_with_gpus(
        &self,
        id: &JobId,
        object: &ObjectRef,
        size: u64,
        input: &Path,
        reservation: &Reservation,
        cancel: &JobCancel,
        claim: Option<&ClaimHandle>,
    ) -> Result<JobOutcome, JobError> {
        let bundle_file = self.temp_file(id, "bundle")?;
        let manifest = Manifest {
            version: 1,
            job_id: id.to_string(),
            scheduler_job_id: reservation.grant().scheduler_job_id.clone(),
            source: ManifestSource {
                bucket: object.bucket.clone(),
                key: object.key.clone(),
                size,
                etag: object.etag.clone(),
                version_id: object.version_id.clone(),
            },
            reservation: reservation
                .grant()
                .settings
                .iter()
                .map(|(name, value)| ReservationField {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
            created_unix: unix_now(),
            allocated_unix: reservation.allocated_unix(),
        };
        let ext = bundle::sanitize_extension(&object.key);
        let bundled = stage(
            "bundle",
            until_cancelled(
                cancel,
                write_bundle_file(input, ext, manifest, bundle_file.path()),
            ),
        );
        // The grant goes into the claim while the bundle is written: from then on
        // another daemon can find (and release) it.
        let record_grant = async {
            let Some(claim) = claim else { return Ok(()) };
            let grant = reservation.grant();
            let recorded = RecordedGrant {
                scheduler: self.reservations.scheduler_address().to_owned(),
                scheduler_job_id: grant.scheduler_job_id.clone(),
                devices: grant.devices().into_iter().map(str::to_owned).collect(),
                since_unix: reservation.allocated_unix(),
            };
            until_cancelled(cancel, async {
                claim.record_grant(recorded).await.map_err(JobError::Claim)
            })
            .await
        };
        tokio::try_join!(bundled, record_grant)?;
        let bytes = std::fs::metadata(bundle_file.path()).map_or(0, |m| m.len());
        self.record(object, None, EventKind::Bundled { bytes });

        let bundle_key = bundle::bundle_key(&self.settings.intermediate.dir, id.as_str());
        // Registered before the upload, so a result event cannot come before we listen.
        let result_key = self.result_key(id);
        let waiter = self
            .results
            .as_ref()
            .map(|r| r.register(&self.settings.output.bucket, &result_key));
        let deadline = Instant::now() + self.settings.result_deadline;
        if let Some(claim) = claim {
            // From here on the function may run: the claim says so, with the deadline,
            // before the bundle can reach it.
            let now = crate::unix_now_ms();
            let function = FunctionStarted {
                started_unix_ms: now,
                result_deadline_unix_ms: now
                    .saturating_add(self.settings.result_deadline.as_millis() as u64),
            };
            until_cancelled(cancel, async {
                claim
                    .record_function(function)
                    .await
                    .map_err(JobError::Claim)
            })
            .await?;
        }
        stage(
            "upload",
            until_cancelled(cancel, async {
                storage::upload_file(
                    &self.s3,
                    bundle_file.path(),
                    &self.settings.intermediate.bucket,
                    &bundle_key,
                    "application/gzip",
                )
                .await
                .map_err(JobError::Storage)
            }),
        )
        .await?;
        drop(bundle_file);
        self.record(object, None, EventKind::Uploaded);

        let seen = stage(
            "await_result",
            self.await_result(result_key, waiter.as_ref(), cancel, deadline),
        )
        .await?;
        self.record(object, None, EventKind::ResultSeen);
        Ok(seen)
    }

    /// Downloads the input into `path` (its GET, then its body); at most
    /// `LARGE_DOWNLOADS` large ones at once.
    async fn download(&self, object: &ObjectRef, path: &Path) -> Result<u64, JobError> {
        let _permit = if is_small_input(object) {
            None
        } else {
            Some(
                LARGE_DOWNLOADS
                    .acquire()
                    .await
                    .expect("the semaphore is never closed"),
            )
        };
        let opened = self.open_input(object).await?;
        let saved = opened.save_to(path).await.map_err(JobError::Storage)?;
        Ok(saved.size)
    }

    /// Sends the input's GET and returns once S3 has answered with exactly the object
    /// the event names (the job id derives from its version): a later overwrite has its
    /// own event and job, so anything else is `InputSuperseded`, no object `InputGone`.
    async fn open_input(&self, object: &ObjectRef) -> Result<storage::Opened, JobError> {
        let pin = match (&object.version_id, &object.etag) {
            (Some(version), _) => storage::Pin::Version(version),
            (None, Some(etag)) => storage::Pin::ETag(etag),
            (None, None) => storage::Pin::Latest,
        };
        match storage::open_pinned(&self.s3, &object.bucket, &object.key, pin).await {
            Ok(storage::Answer::Object(opened)) => Ok(opened),
            Ok(storage::Answer::Missing) => Err(JobError::InputGone {
                bucket: object.bucket.clone(),
                key: object.key.clone(),
            }),
            Ok(storage::Answer::Changed) => Err(JobError::InputSuperseded {
                bucket: object.bucket.clone(),
                key: object.key.clone(),
            }),
            Err(e) => Err(JobError::Storage(e)),
        }
    }

    /// Waits for the result object until it exists or the deadline. With a results queue,
    /// its event ends the wait and HEAD checks run only every `-b` as a fallback; without
    /// one, HEAD checks start soon after the upload and back off, doubling, up to `-b`.
    async fn await_result(
        &self,
        key: String,
        waiter: Option<&ResultWaiter>,
        cancel: &JobCancel,
        deadline: Instant,
    ) -> Result<JobOutcome, JobError> {
        let output = &self.settings.output;
        let max_interval = self.settings.result_poll_interval;
        let first = if waiter.is_some() {
            max_interval
        } else {
            FIRST_RESULT_CHECK
        };
        let mut checks = Backoff::new(first, max_interval);
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(JobError::ResultDeadline {
                    bucket: output.bucket.clone(),
                    key,
                    deadline: self.settings.result_deadline,
                });
            }
            let wait = checks.next_delay().min(deadline - now);
            let arrived = async {
                match waiter {
                    Some(waiter) => waiter.arrived().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = cancel.token.cancelled() => return Err(match cancel.error() {
                    JobError::Cancelled => JobError::CancelledAwaitingResult,
                    other => other,
                }),
                _ = arrived => {
                    debug!("Result event received.");
                    return Ok(JobOutcome::Completed);
                }
                _ = tokio::time::sleep(wait) => {}
            }
            match storage::object_exists(&self.s3, &output.bucket, &key).await {
                Ok(true) => return Ok(JobOutcome::Completed),
                Ok(false) => {}
                // A failed check may pass; the deadline bounds how long we keep trying.
                Err(e) => warn!(error = %error_chain(&e), "Result check failed; will retry."),
            }
        }
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

    /// Whether the job's result is already in the output bucket. A duplicate or
    /// redelivered notification then costs one HEAD instead of a GPU job.
    async fn result_exists(&self, id: &JobId) -> Result<bool, JobError> {
        storage::object_exists(&self.s3, &self.settings.output.bucket, &self.result_key(id))
            .await
            .map_err(JobError::Storage)
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
/// to the stage itself.
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

/// Writes the bundle on a blocking thread: tar and gzip are synchronous.
async fn write_bundle_file(
    input: &Path,
    ext: Option<String>,
    manifest: Manifest,
    out: &Path,
) -> Result<(), JobError> {
    let input = input.to_path_buf();
    let out = out.to_path_buf();
    tokio::task::spawn_blocking(move || {
        // The temp file exists and is empty; opening it without truncating spares
        // ext4's flush-on-close after a truncate (see storage::download_to_file).
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&out)
            .map_err(|e| JobError::Bundle(BundleError::Write(e)))?;
        bundle::write_bundle(
            &input,
            ext.as_deref(),
            &manifest,
            std::io::BufWriter::with_capacity(256 * 1024, file),
        )
        .map_err(JobError::Bundle)
    })
    .await
    .map_err(|e| JobError::Bundle(BundleError::Write(std::io::Error::other(e))))?
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(key: &str, etag: Option<&str>, version: Option<&str>) -> ObjectRef {
        ObjectRef {
            bucket: "in".into(),
            key: key.into(),
            size: Some(1),
            etag: etag.map(str::to_string),
            version_id: version.map(str::to_string),
            event_name: "ObjectCreated:Put".into(),
            event_time: None,
        }
    }

    #[test]
    fn job_id_is_stable_and_depends_on_identity() {
        let a = JobId::derive(&object("a b.jpg", Some("e1"), None));
        assert_eq!(a, JobId::derive(&object("a b.jpg", Some("e1"), None)));
        assert_eq!(a.as_str().len(), 20);
        assert!(a.as_str().chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, JobId::derive(&object("a b.jpg", Some("e2"), None)));
        assert_ne!(a, JobId::derive(&object("a+b.jpg", Some("e1"), None)));
        // A version id, when present, identifies the object version better than the ETag.
        assert_eq!(
            JobId::derive(&object("k", Some("e1"), Some("v1"))),
            JobId::derive(&object("k", Some("e2"), Some("v1")))
        );
    }

    #[test]
    fn job_id_fields_cannot_run_into_each_other() {
        let mut left = object("ab", Some("c"), None);
        left.bucket = "x".into();
        let mut right = object("a", Some("bc"), None);
        right.bucket = "x".into();
        assert_ne!(JobId::derive(&left), JobId::derive(&right));
    }
}
