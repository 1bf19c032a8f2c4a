//! A job's GPU stages: the bundle (the grant recorded in the claim meanwhile), the
//! function recorded in the claim, the upload and the wait for the result (a results
//! queue's event, or HEAD checks). It leaves getting the GPUs to `prepare` and giving
//! them back to `job` and `claimed`.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{debug, warn};

use super::bundle::{self, BundleError, Manifest, ManifestSource, ReservationField};
use super::claim::{ClaimHandle, FunctionStarted, RecordedGrant};
use super::event::ObjectRef;
use super::results::ResultWaiter;
use super::{JobCancel, JobContext, JobError, JobId, JobOutcome, stage, until_cancelled};
use crate::aws::{error_chain, storage};
use crate::backoff::Backoff;
use crate::ops::history::EventKind;
use crate::reservations::Reservation;
use crate::scheduler::GpuScheduler;

/// When polling, the first HEAD for a result comes this soon after the upload; the
/// interval then doubles up to `-b`.
const FIRST_RESULT_CHECK: Duration = Duration::from_millis(250);

impl<S: GpuScheduler + Send + Sync + 'static> JobContext<S> {
    #[expect(
        clippy::too_many_arguments,
        reason = "the job's stages share these; a struct would only rename them"
    )]
    pub(super) async fn run_with_gpus(
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
            super::serverless::debug_abort_at("granted");
            let grant = reservation.grant();
            let recorded = RecordedGrant {
                scheduler: self.reservations.scheduler_address().to_owned(),
                scheduler_job_id: grant.scheduler_job_id.clone(),
                devices: grant.devices().into_iter().map(str::to_owned).collect(),
                since_unix: reservation.allocated_unix(),
            };
            until_cancelled(cancel, async {
                Box::pin(claim.record_grant(recorded))
                    .await
                    .map_err(JobError::Claim)
            })
            .await
        };
        tokio::try_join!(bundled, record_grant)?;
        if claim.is_some() {
            super::serverless::debug_abort_at("grant-recorded");
        }
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
                Box::pin(claim.record_function(function))
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
        if self.settings.serverless {
            // The claim carries the job from here: its grant, its function, its deadline.
            super::serverless::debug_abort_at("uploaded");
            return Ok(JobOutcome::Handed);
        }

        let seen = stage(
            "await_result",
            self.await_result(result_key, waiter.as_ref(), cancel, deadline),
        )
        .await?;
        self.record(object, None, EventKind::ResultSeen);
        Ok(seen)
    }

    /// Waits for the result object until it exists or the deadline. With a results queue,
    /// its event ends the wait and HEAD checks run only every `-b` as a fallback; without
    /// one, HEAD checks start soon after the upload and back off, doubling, up to `-b`.
    pub(super) async fn await_result(
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
