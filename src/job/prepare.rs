//! A job's first stages, overlapped: the check for an existing result, the input's
//! download and the allocation of its GPUs (`prepare`). It leaves the GPU stages to
//! `with_gpus` and what the job does with the reservation afterwards to `job`.

use std::path::Path;

use super::claim::ClaimHandle;
use super::event::ObjectRef;
use super::{JobCancel, JobContext, JobError, JobId, stage, until_cancelled};
use crate::aws::storage;
use crate::ops::history::EventKind;
use crate::reservations::Reservation;
use crate::scheduler::GpuScheduler;

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

/// What `prepare` leaves for the rest of the job.
#[expect(
    clippy::large_enum_variant,
    reason = "one value per job, returned once: boxing the reservation would buy nothing"
)]
pub(super) enum Prepared {
    AlreadyDone,
    Ready { reservation: Reservation, size: u64 },
}

impl<S: GpuScheduler + Send + Sync + 'static> JobContext<S> {
    /// Checks for an existing result, downloads the input and gets GPUs. The check and
    /// the download start together. A small input's GPUs are asked for as soon as the
    /// check says the job must run *and* the input's GET has answered with the object
    /// the event named, while its body goes on downloading: the scheduler round trip
    /// then costs almost no latency, and an event for an object that is not there (gone,
    /// overwritten, never written) costs no scheduler call at all. A large input (or one
    /// of unknown size) is downloaded first, so GPUs are not held while it streams in.
    pub(super) async fn prepare(
        &self,
        id: &JobId,
        object: &ObjectRef,
        input: &Path,
        cancel: &JobCancel,
        claim: Option<&ClaimHandle>,
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
            let reservation = self
                .allocate_unless_stopping(id, object, cancel, claim)
                .await?;
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
            self.allocate_unless_stopping(id, object, &allocation, claim)
                .await
                .map(Some)
        };
        match tokio::join!(check_then_allocate, download) {
            (Ok(None), _) => Ok(Prepared::AlreadyDone),
            (Ok(Some(reservation)), Ok(size)) => Ok(Prepared::Ready { reservation, size }),
            (Ok(Some(reservation)), Err(e)) => {
                Box::pin(self.reservations.release(reservation)).await;
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
        claim: Option<&ClaimHandle>,
    ) -> Result<Reservation, JobError> {
        if cancel.stop.is_cancelled() {
            return Err(JobError::NotStarted);
        }
        if self.settings.serverless
            && let Some(claim) = claim
        {
            // Lambda mode: a sandbox killed between the client's reply and the claim
            // write that records its grant leaves no journal anyone reads again; the
            // intent tells the schedule that a grant may have been lost there.
            let now = crate::unix_now_ms();
            until_cancelled(cancel, async {
                claim
                    .update_serverless(|s| s.alloc_started_unix_ms = Some(now))
                    .await
                    .map_err(JobError::Claim)
            })
            .await?;
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

    /// Whether the job's result is already in the output bucket. A duplicate or
    /// redelivered notification then costs one HEAD instead of a GPU job.
    async fn result_exists(&self, id: &JobId) -> Result<bool, JobError> {
        storage::object_exists(&self.s3, &self.settings.output.bucket, &self.result_key(id))
            .await
            .map_err(JobError::Storage)
    }
}
