//! A job under its claim: taking the claim (a copy of another message is a duplicate;
//! the holder's own message waits for the claim to end), finishing what a former holder
//! left in it (a grant to release, a running function to adopt), and giving the GPUs back
//! in the order that never releases a grant twice (the daemon: the grant leaves the claim
//! first, its journal survives a restart). Lambda mode keeps a grant the claim records in
//! the claim until its `-dealloc` is confirmed instead (`give_back_recorded`; a sandbox's
//! journal dies with it): a crash after a confirmed `-dealloc` and before the claim write
//! makes the next holder call `-dealloc` a second time, which `lambda::finish` explains
//! is safe.
//!
//! **After the result.** Once the result is there, the claim ends first (deleted, or marked
//! released with nothing recorded), confirmed; then the GPUs' release and the message's
//! delete run at once: the release in a task of its own (`release_beside_delete`), the job
//! returns and the daemon deletes the message meanwhile. Without claims the release starts
//! at once. Before issue 17 the three ran one after another. Why each instant is safe
//! (a crash here is a SIGKILL or a power cut; "for good" means the host never comes back):
//! - *Before the claim's end is confirmed*: as before, the claim names the grant and the
//!   function, the message is still there. A restart on the same disk finds the grant in
//!   its journal, asks the claim, leaves it to the claim; whoever takes the message next
//!   adopts the job, finds the result at its first check and releases. Nothing released twice, and
//!   nothing under a function that has not written its result.
//! - *Claim ended, neither the release nor the delete done*: the journal holds the grant
//!   (a reservation leaves it only once the scheduler confirms the `-dealloc`); a restart
//!   asks the claim, finds it gone, releases. The message comes back to someone, whose
//!   result check finds the result: one HEAD, no GPU. The job is not lost: its result is
//!   written.
//! - *Message deleted, release not confirmed* (the new window): the same journal entry,
//!   the same release at the restart or by the live releaser's retries. The message was
//!   never what kept a grant: a failed first `-dealloc` went to the background releaser
//!   before issue 17 as well, and the message was deleted right after.
//! - *Released, message not deleted*: the message comes back and finds the result.
//! - *The host gone for good after the claim's end*: the grant leaks until the
//!   scheduler's own clean-up, exactly as in the window `docs/operations.md` §6 names ("the
//!   claim write that takes a grant out until the scheduler confirms its `-dealloc`"); the
//!   delete beside the release neither widens that window nor adds one.
//!
//! The message is never deleted before the claim's end is confirmed: a claim that still
//! named the grant with no message left to bring a successor would keep the grant
//! (a restart leaves grants the claim names to the claim). A graceful exit waits for a
//! release in flight: its task holds the reservations, so the releaser, which `app` waits
//! for, outlives it.

use std::time::{Duration, Instant};

use tracing::{Instrument, error, info, warn};

use super::{JobCancel, JobContext, JobError, JobId, JobOutcome, stage};
use crate::aws::error_chain;
use crate::job::claim::{Acquired, ClaimGuard, ClaimHandle, Claims, JobRecord};
use crate::job::event::ObjectRef;
use crate::ops::history::{EventKind, HistoryEvent};
use crate::reservations::{AllocError, Reservation};
use crate::scheduler::GpuScheduler;
use crate::unix_now_ms;

impl<S: GpuScheduler + Send + Sync + 'static> JobContext<S> {
    /// A claimed job: first what a former holder left in the claim (a grant to release, or
    /// a running function to adopt), then the stages.
    pub(crate) async fn run_claimed(
        &self,
        id: &JobId,
        object: &ObjectRef,
        started: Instant,
        cancel: &JobCancel,
        claim: &ClaimHandle,
        carried: JobRecord,
    ) -> Result<JobOutcome, JobError> {
        if let Some(grant) = &carried.grant {
            let adopted = Box::pin(self.reservations.adopt(
                id.as_str(),
                &object.key,
                &grant.scheduler,
                &grant.scheduler_job_id,
                &grant.devices,
                grant.since_unix,
            ))
            .await;
            match adopted {
                Ok(reservation) => {
                    if let Some(function) = &carried.function {
                        info!(scheduler_job = %grant.scheduler_job_id,
                            "Adopting a job whose function may be running: waiting for its result.");
                        let result_key = self.result_key(id);
                        let waiter = self
                            .results
                            .as_ref()
                            .map(|r| r.register(&self.settings.output.bucket, &result_key));
                        let deadline = instant_of_unix_ms(function.result_deadline_unix_ms);
                        let seen = stage(
                            "await_result",
                            self.await_result(result_key, waiter.as_ref(), cancel, deadline),
                        )
                        .await;
                        if seen.is_ok() {
                            self.record(object, None, EventKind::ResultSeen);
                        }
                        let done = GpusDone::from(&seen);
                        let kept =
                            Box::pin(self.give_back(object, reservation, Some(claim), done)).await;
                        if kept {
                            // Lambda mode: the claim keeps the unreleased grant; the job
                            // must not record another over it. Its record comes back.
                            return Err(JobError::ReleasePending);
                        }
                        // Lambda mode adopts only a function whose deadline has passed
                        // (one still running is parked again, see `serverless`): the job
                        // runs again now.
                        if !(self.settings.serverless && seen.is_err()) {
                            return seen;
                        }
                    } else {
                        info!(scheduler_job = %grant.scheduler_job_id,
                            "Releasing the grant a former holder recorded before it uploaded.");
                        let done = GpusDone::NothingRuns;
                        if Box::pin(self.give_back(object, reservation, Some(claim), done)).await {
                            return Err(JobError::ReleasePending);
                        }
                    }
                }
                Err(e) => {
                    // Not ours to release (another scheduler) or not recordable here: say
                    // so, and take it out of the record so the job can go on.
                    error!(scheduler_job = %grant.scheduler_job_id, scheduler = %grant.scheduler,
                        error = %error_chain(&e), "Cannot take over the grant the job's claim records; release it by hand.");
                    if let AllocError::Journal(_) = e {
                        return Err(JobError::Allocation(e));
                    }
                    Box::pin(claim.clear_gpus())
                        .await
                        .map_err(JobError::Claim)?;
                }
            }
        }
        self.run_stages(id, object, started, cancel, Some(claim))
            .await
    }

    /// Gives the GPUs back: released, unless the claim says the function may be running
    /// and neither its result nor its deadline ended the wait — then they are handed over
    /// through the claim (see the module doc). A grant the claim names leaves the claim
    /// first; when that is not confirmed, the releaser asks the claim before releasing,
    /// so a grant is never released twice.
    pub(super) async fn give_back(
        &self,
        object: &ObjectRef,
        reservation: Reservation,
        claim: Option<&ClaimHandle>,
        done: GpusDone,
    ) -> bool {
        let scheduler_job = reservation.grant().scheduler_job_id.clone();
        let Some(claim) = claim else {
            if done == GpusDone::ResultSeen {
                self.release_beside_delete(object, reservation);
                return false;
            }
            Box::pin(self.reservations.release(reservation)).await;
            self.record(object, None, EventKind::Released { scheduler_job });
            return false;
        };
        if done == GpusDone::Handed
            || (done == GpusDone::Interrupted && claim.function_recorded().await)
        {
            Box::pin(self.reservations.hand_off(reservation)).await;
            return false;
        }
        if self.settings.serverless
            && claim
                .record()
                .await
                .grant
                .is_some_and(|g| g.scheduler_job_id == scheduler_job)
        {
            return Box::pin(self.give_back_recorded(object, reservation, claim, done)).await;
        }
        let cleared = match done {
            GpusDone::ResultSeen => Box::pin(claim.end_done()).await,
            GpusDone::NothingRuns | GpusDone::Interrupted | GpusDone::Handed => {
                Box::pin(claim.clear_gpus()).await
            }
        };
        match cleared {
            // The claim no longer names the grant: the release may run beside the
            // message's delete (see the module doc).
            Ok(()) if done == GpusDone::ResultSeen => {
                self.release_beside_delete(object, reservation);
            }
            Ok(()) => {
                Box::pin(self.reservations.release(reservation)).await;
                self.record(object, None, EventKind::Released { scheduler_job });
            }
            Err(e) => {
                warn!(scheduler_job = %scheduler_job, error = %error_chain(&e),
                    "Cannot take the grant out of the job's claim; the releaser asks the claim before releasing.");
                self.reservations.release_in_background(reservation);
            }
        }
        false
    }

    /// Lambda mode, a grant the claim records: released with the grant still recorded, and
    /// taken out of the claim only once the scheduler confirmed (this sandbox's journal
    /// dies with it; the claim is the durable record, see `lambda::finish`). A failed
    /// release leaves the grant in the claim with the failure counted (release pending:
    /// whoever takes the claim next releases it) and lets this sandbox's journal forget
    /// it. Returns whether the claim still records the grant, unreleased.
    async fn give_back_recorded(
        &self,
        object: &ObjectRef,
        reservation: Reservation,
        claim: &ClaimHandle,
        done: GpusDone,
    ) -> bool {
        let scheduler_job = reservation.grant().scheduler_job_id.clone();
        let failure = match self.reservations.release_once(reservation).await {
            Ok(()) => {
                self.record(
                    object,
                    None,
                    EventKind::Released {
                        scheduler_job: scheduler_job.clone(),
                    },
                );
                let cleared = match done {
                    GpusDone::ResultSeen => claim.end_done().await,
                    _ => claim.clear_gpus().await,
                };
                if let Err(e) = cleared {
                    // The next taker's `-dealloc` is a second one (see `lambda::finish`).
                    warn!(scheduler_job = %scheduler_job, error = %error_chain(&e),
                        "GPUs released, but the claim still records them.");
                }
                return false;
            }
            Err(failure) => failure,
        };
        let (reservation, error) = failure;
        let now = crate::unix_now_ms();
        match claim.record_release_failure(now).await {
            Ok((failures, since)) if super::serverless::give_up(since, now) => {
                error!(scheduler_job = %scheduler_job, failures, failing_since_unix_ms = since,
                    error = %error_chain(&error), "{}", super::serverless::RELEASE_GIVEN_UP);
                crate::ops::emf::count("ReleasesGivenUp", 1);
                self.reservations.hand_off(reservation).await;
                let _ = claim.clear_gpus().await;
                false
            }
            Ok((failures, _)) => {
                warn!(scheduler_job = %scheduler_job, failures, error = %error_chain(&error),
                    "Cannot release the GPUs the claim records; the claim keeps them for a retry.");
                self.reservations.hand_off(reservation).await;
                true
            }
            Err(e) => {
                // Whether the claim still names it is unknown: the releaser asks it first.
                warn!(scheduler_job = %scheduler_job, error = %error_chain(&e),
                    "Cannot release the GPUs nor count the failure in the claim; the releaser asks the claim before retrying.");
                self.reservations.release_in_background(reservation);
                true
            }
        }
    }
}

impl<S: GpuScheduler + Send + Sync + 'static> JobContext<S> {
    /// Releases a finished job's GPUs in a task of their own, so that the job ends (and
    /// its message is deleted) while the scheduler's `-dealloc` runs. For a job whose
    /// result is there and whose claim, if any, no longer names the grant: see the
    /// module doc for why that order is safe at every instant.
    ///
    /// The task holds the reservations, whose releaser therefore outlives it: at exit,
    /// `app` waits for the releaser, hence for this release, before the process ends.
    fn release_beside_delete(&self, object: &ObjectRef, reservation: Reservation) {
        let reservations = self.reservations.clone();
        let history = self.history.clone();
        let job_id = JobId::derive(object);
        let (bucket, key) = (object.bucket.clone(), object.key.clone());
        let scheduler_job = reservation.grant().scheduler_job_id.clone();
        let release = async move {
            reservations.release(reservation).await;
            history.record(HistoryEvent::now(
                job_id.as_str(),
                &bucket,
                &key,
                None,
                EventKind::Released { scheduler_job },
            ));
        };
        tokio::spawn(release.in_current_span());
    }
}

/// What ended a job's use of its GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GpusDone {
    /// The result is there: the job is done (its claim ends with the release).
    ResultSeen,
    /// Nothing runs on them: never uploaded, or the result deadline passed.
    NothingRuns,
    /// Stopped before either (shutdown, a lost claim, a failed stage): the function may
    /// still run if the claim says it started.
    Interrupted,
    /// Lambda mode: the bundle is uploaded and the claim carries the grant on.
    Handed,
}

impl GpusDone {
    pub(super) fn from(result: &Result<JobOutcome, JobError>) -> GpusDone {
        match result {
            Ok(JobOutcome::Handed) => GpusDone::Handed,
            Ok(_) => GpusDone::ResultSeen,
            Err(JobError::ResultDeadline { .. }) => GpusDone::NothingRuns,
            Err(_) => GpusDone::Interrupted,
        }
    }
}

impl<S> JobContext<S> {
    /// Claims the job across daemons. A claim another daemon holds from this very message
    /// (the holder's message came back when its visibility lapsed) is waited out, the
    /// message kept hidden meanwhile; one it holds from another message makes this copy a
    /// `Duplicate`; one of an older daemon that records no message is `HeldElsewhere`.
    pub(super) async fn acquire_claim(
        &self,
        claims: &Claims,
        id: &JobId,
        message_id: Option<&str>,
        cancel: &JobCancel,
    ) -> Result<ClaimGuard, JobError> {
        let mut said = false;
        loop {
            let acquired = claims
                .acquire(id.as_str(), message_id)
                .await
                .map_err(JobError::Claim)?;
            let (owner, remaining, holder_message) = match acquired {
                Acquired::Claimed(guard) => return Ok(guard),
                // A parked serverless claim records its invocation's message: another
                // copy is a duplicate, as of any holder.
                Acquired::HeldElsewhere {
                    owner,
                    remaining,
                    message_id,
                    ..
                } => (owner, remaining, message_id),
            };
            match (holder_message.as_deref(), message_id) {
                (Some(holder), Some(ours)) if holder == ours => {
                    if !said {
                        info!(owner = %owner, "The holder's own message came back; keeping it hidden until the holder's claim ends.");
                        said = true;
                    }
                    let wait = remaining.min(claims.lease() / 3) + Duration::from_millis(100);
                    tokio::select! {
                        biased;
                        _ = cancel.token.cancelled() => return Err(cancel.error()),
                        _ = cancel.stop.cancelled() => return Err(JobError::NotStarted),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                (Some(_), Some(_)) => return Err(JobError::Duplicate { owner }),
                _ => return Err(JobError::HeldElsewhere { owner, remaining }),
            }
        }
    }
}

/// The `Instant` at which the wall clock reads `unix_ms` (now, if that is past).
fn instant_of_unix_ms(unix_ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(unix_ms.saturating_sub(unix_now_ms()))
}
