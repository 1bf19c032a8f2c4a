//! Grants that pass between holders through a job's claim: adopted from a former holder,
//! handed off to the next one, released once with the claim still naming them (Lambda
//! mode), or released in the background. Part of `reservations`, whose invariant and
//! crash windows hold here too.

use std::time::Duration;

use tracing::info;

use super::releaser::Work;
use super::{
    AllocError, JournalEntry, Reservation, Reservations, blocking, dealloc_reply_label, forget,
};
use crate::ops::telemetry;
use crate::scheduler::{GpuScheduler, Grant, SchedulerError};

impl<S: GpuScheduler + Send + Sync + 'static> Reservations<S> {
    /// Takes over a grant another holder recorded in job `job_id`'s claim: records it in
    /// this host's journal (so a crash here still finds it) and counts it as held.
    ///
    /// # Errors
    /// `Journal` when it cannot be recorded; `Rejected` when it was granted by another
    /// scheduler, which this daemon cannot release it through.
    pub(crate) async fn adopt(
        &self,
        job_id: &str,
        key: &str,
        scheduler: &str,
        scheduler_job_id: &str,
        devices: &[String],
        since_unix: u64,
    ) -> Result<Reservation, AllocError> {
        if scheduler != self.settings.scheduler_address {
            return Err(AllocError::Rejected {
                gpus: self.settings.gpus,
                detail: format!(
                    "the claim records grant {scheduler_job_id} of scheduler {scheduler}, not {}",
                    self.settings.scheduler_address
                ),
            });
        }
        let entry = JournalEntry {
            scheduler_job_id: scheduler_job_id.to_owned(),
            scheduler: scheduler.to_owned(),
            job_id: job_id.to_owned(),
            key: key.to_owned(),
            since_unix,
            release_failures: 0,
        };
        let recorded = entry.clone();
        blocking(&self.shared.journal, move |j| j.adopt(recorded))
            .await
            .map_err(AllocError::Journal)?;
        self.shared.ledger.on_grant();
        info!(scheduler_job = %scheduler_job_id, "Adopted a grant from the job's claim.");
        let settings = devices
            .iter()
            .enumerate()
            .map(|(i, device)| (format!("RCUDA_DEVICE_{i}"), device.clone()))
            .collect();
        Ok(Reservation {
            grant: Grant {
                scheduler_job_id: scheduler_job_id.to_owned(),
                job_field_name: String::new(),
                settings,
            },
            entry,
            granted_unix_ms: since_unix.saturating_mul(1000),
            fallback: Some(self.work.clone()),
        })
    }

    /// Gives the reservation to the job's claim instead of the scheduler: its function may
    /// still be running, and whoever takes the job over releases it after the result. It
    /// leaves the journal and the count of what this daemon holds.
    pub(crate) async fn hand_off(&self, reservation: Reservation) {
        let entry = reservation.disarm();
        info!(scheduler_job = %entry.scheduler_job_id,
            "Grant handed over through the job's claim; the next holder releases it after the result.");
        forget(&self.shared, &entry.scheduler_job_id).await;
    }

    /// One `-dealloc` attempt for a reservation whose job's claim records it (Lambda mode:
    /// the claim keeps the grant until the release is confirmed). Confirmed: it leaves the
    /// journal, as `release` does. Failed: it is given back, still journalled and armed,
    /// for the caller to decide (`hand_off` once the claim keeps it for a retry).
    ///
    /// # Errors
    /// The reservation itself, with the scheduler call's failure.
    pub(crate) async fn release_once(
        &self,
        reservation: Reservation,
    ) -> Result<(), (Reservation, SchedulerError)> {
        let job = reservation.grant.scheduler_job_id.clone();
        match self
            .release_recorded(&job, reservation.granted_unix_ms)
            .await
        {
            Ok(()) => {
                let entry = reservation.disarm();
                forget(&self.shared, &entry.scheduler_job_id).await;
                Ok(())
            }
            Err(e) => Err((reservation, e)),
        }
    }

    /// One `-dealloc` attempt for a grant that a claim records and keeps recording until
    /// this returns `Ok` (Lambda mode: the claim, not this sandbox's journal, is the
    /// grant's record, so nothing is written to the journal and nothing is retried here;
    /// whoever takes the claim next retries a failure). Counts the GPU time on success
    /// and wakes a job waiting for GPUs.
    ///
    /// # Errors
    /// The scheduler call's failure (the outcome is unknown after a timeout).
    pub(crate) async fn release_recorded(
        &self,
        scheduler_job_id: &str,
        granted_unix_ms: u64,
    ) -> Result<(), SchedulerError> {
        let started = std::time::Instant::now();
        let released = self.shared.scheduler.dealloc(scheduler_job_id).await;
        telemetry::get().scheduler_call("dealloc", dealloc_reply_label(&released));
        if released.is_ok() {
            self.shared.count_gpu_time(granted_unix_ms);
            self.shared.ledger.on_freed_uncounted();
            self.shared.gpus_freed.notify_waiters();
            info!(
                stage = "release",
                scheduler_job = %scheduler_job_id,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "Stage finished."
            );
        } else {
            telemetry::get().release_failed();
        }
        released
    }

    /// Releases in the background, after asking the job's claim whether it names the
    /// grant (then it is the claim's, not ours): for a job that could not confirm that its
    /// claim no longer names it.
    pub(crate) fn release_in_background(&self, reservation: Reservation) {
        let entry = reservation.disarm();
        let _ = self.work.send(Work::Release {
            entry,
            after: Duration::ZERO,
            check_records: true,
        });
    }
}
