//! One job as the Lambda jobs handler runs it: the daemon's stages from the claim to the
//! upload, then the claim *parked* — written with no process as its holder and the
//! function's result deadline as its expiry — so that it carries the job, its grant and
//! its deadline once the handler has returned and the SQS record is gone.
//!
//! Differences from `run_job`, each because an invocation must not wait: a claim held
//! elsewhere is never waited out (a live holder's own message comes back later; a parked
//! claim or another message's holder carries the job: this copy is done); a carried
//! function still within its deadline is parked again at once; and the intent is written
//! to the claim before the `-alloc` call (`prepare`), so that a sandbox killed between
//! the client's reply and the claim write that records the grant is reported (`LOST_GRANT`).
//!
//! A crash at any instant (the sandbox killed): before the intent, the claim records
//! nothing and expires after its lease; between the intent and the grant write, a grant
//! may be lost (reported by whoever next takes the claim: the schedule or a redelivery);
//! after the grant write, the claim names it and whoever takes the claim releases it, or
//! (once the function is recorded) adopts the job until its result or deadline.

use std::time::Instant;

use tracing::{info, instrument, warn};

use super::claim::{Acquired, ServerlessRecord};
use super::event::ObjectRef;
use super::{JobCancel, JobContext, JobError, JobId, JobOutcome, stage};
use crate::scheduler::GpuScheduler;

/// The stable phrase of the log line (and the CloudWatch metric `LostGrants`) an alert
/// keys on: an `-alloc` call began, its sandbox died, and no grant reached the claim. The
/// scheduler may hold GPUs for the claim's job that nobody will release.
pub(crate) const LOST_GRANT: &str = "GPU grant possibly lost with its sandbox";

/// How long a recorded grant's release is retried after its first failure before it is
/// given up (the daemon's releaser gives up after 20 failures at a backoff doubling from
/// 1 s to 5 min: a little over an hour, `reservations::releaser`).
pub(crate) const GIVE_UP_AFTER_MS: u64 = 60 * 60 * 1000;

/// The stable phrase of the log line an alert keys on (with the metric
/// `ReleasesGivenUp`): a recorded grant's release kept failing and was given up.
pub(crate) const RELEASE_GIVEN_UP: &str =
    "GPU release given up; the scheduler may still hold the grant";

/// Whether a release failing since `since_unix_ms` is given up at `now`.
pub(crate) fn give_up(since_unix_ms: u64, now: u64) -> bool {
    now.saturating_sub(since_unix_ms) >= GIVE_UP_AFTER_MS
}

/// What the jobs handler knows of a job beyond its object.
#[derive(Debug, Clone)]
pub(crate) struct ServerlessStart {
    /// The S3 event to keep in the claim (to send the job back with).
    pub(crate) event: String,
    /// How many times the job was started before this record (from the message's
    /// attribute, when the schedule sent it back).
    pub(crate) attempts_before: u32,
    /// The invocation's Lambda request id.
    pub(crate) request_id: String,
}

impl<S: GpuScheduler + Send + Sync + 'static> JobContext<S> {
    /// Runs one job of a Lambda jobs handler up to the upload (see the module doc).
    /// `Ok(Handed)`: uploaded, the claim parked; `Ok(Carried)`: a parked claim already
    /// carries the job; `Ok(AlreadyDone)`: the result is there.
    ///
    /// # Errors
    /// A `JobError` whose `disposition` says whether the record is done (`Delete`) or
    /// must come back (anything else).
    #[instrument(skip_all, fields(job_id = %JobId::derive(object), key = %object.key))]
    pub(crate) async fn run_serverless(
        &self,
        object: &ObjectRef,
        message_id: &str,
        start: ServerlessStart,
        cancel: &JobCancel,
    ) -> Result<JobOutcome, JobError> {
        let id = JobId::derive(object);
        let started = Instant::now();
        let _active = self.claim(&id, cancel).await?;
        let claims = self.claims.as_ref().ok_or(JobError::NotStarted)?;
        let acquired = stage("claim", async {
            claims
                .acquire(id.as_str(), Some(message_id))
                .await
                .map_err(JobError::Claim)
        })
        .await?;
        let guard = match acquired {
            Acquired::Claimed(guard) => guard,
            Acquired::HeldElsewhere { parked: true, .. } => {
                info!("The job's parked claim carries it; this copy is done.");
                return Ok(JobOutcome::Carried);
            }
            Acquired::HeldElsewhere {
                owner,
                remaining,
                message_id: holder,
                ..
            } => {
                return Err(match holder {
                    Some(holder) if holder != message_id => JobError::Duplicate { owner },
                    _ => JobError::HeldElsewhere { owner, remaining },
                });
            }
        };
        let carried = guard.carried().clone();
        let now = crate::unix_now_ms();
        if let (Some(_), Some(function)) = (&carried.grant, &carried.function)
            && function.result_deadline_unix_ms > now
        {
            // An earlier invocation started the function and died before parking: the
            // function may be running; the claim carries it again until its deadline.
            info!(
                deadline_unix_ms = function.result_deadline_unix_ms,
                "The job's function may be running; parking its claim again."
            );
            guard
                .park(function.result_deadline_unix_ms)
                .await
                .map_err(JobError::Claim)?;
            return Ok(JobOutcome::Carried);
        }
        let previous = carried.serverless.clone().unwrap_or_default();
        if carried.grant.is_none()
            && let Some(at) = previous.alloc_started_unix_ms
        {
            warn!(claim = %claims.key(id.as_str()), alloc_started_unix_ms = at,
                request_id = %previous.request_id, "{}", LOST_GRANT);
            crate::ops::emf::count("LostGrants", 1);
        }
        let handle = guard.handle();
        let attempts = previous.attempts.max(start.attempts_before) + 1;
        let record = ServerlessRecord {
            event: start.event,
            attempts,
            request_id: start.request_id,
            alloc_started_unix_ms: None,
            // A failed release a former holder counted is this run's to settle
            // (`run_claimed` releases the carried grant first).
            ..ServerlessRecord::default()
        };
        handle
            .update_serverless(|s| *s = record)
            .await
            .map_err(JobError::Claim)?;
        let claim_lost = cancel.token.child_token();
        let stages_cancel = JobCancel {
            token: claim_lost.clone(),
            ..cancel.clone()
        };
        let work = self.run_claimed(&id, object, started, &stages_cancel, &handle, carried);
        let (result, lost) = guard.keep_while(&claim_lost, work).await;
        match result {
            Ok(JobOutcome::Handed) => {
                let record = handle.record().await;
                let deadline = record.function.map_or(now, |f| f.result_deadline_unix_ms);
                if let Err(e) = guard.park(deadline).await {
                    // The claim keeps the record under our lease; once that runs out the
                    // schedule (or a redelivery) finds the function and its deadline.
                    warn!(error = %crate::aws::error_chain(&e), "Cannot park the job's claim; it carries the job all the same.");
                }
                info!(
                    attempts,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "Job handed to its function."
                );
                Ok(JobOutcome::Handed)
            }
            other => {
                let other = match other {
                    Err(_) if lost && !cancel.token.is_cancelled() => Err(JobError::ClaimLost),
                    other => other,
                };
                guard.end().await;
                other
            }
        }
    }
}

/// A fault for the tests, in debug builds only: with `ORCHGPU_DEBUG_ABORT_AT=<point>` the
/// process kills itself (SIGKILL, as Lambda ends a sandbox) when a claimed job reaches
/// `point`: `granted` (GPUs granted, the claim not yet told), `grant-recorded` (the claim
/// names the grant, nothing uploaded), `uploaded` (the bundle is up, the claim not yet
/// parked), `dealloc-confirmed` (a recorded grant's `-dealloc` confirmed, the claim not
/// yet ended: `lambda::finish`).
pub(crate) fn debug_abort_at(point: &str) {
    #[cfg(debug_assertions)]
    if std::env::var("ORCHGPU_DEBUG_ABORT_AT").is_ok_and(|at| at == point) {
        tracing::warn!(point, "Debug fault: the process kills itself here.");
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_release_is_given_up_an_hour_after_its_first_failure() {
        let since = 1_000_000;
        assert!(!give_up(since, since));
        assert!(!give_up(since, since + GIVE_UP_AFTER_MS - 1));
        assert!(give_up(since, since + GIVE_UP_AFTER_MS));
        // A clock behind the first failure (another sandbox's) never gives up early.
        assert!(!give_up(since, since - 5_000));
    }
}
