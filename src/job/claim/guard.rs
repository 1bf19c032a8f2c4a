//! A claim this process holds: the guard that renews it on the holder's own clock and
//! ends it, and the handle through which the job changes its record meanwhile.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use super::{
    BoxFuture, ClaimError, Claims, FunctionStarted, JobRecord, Owner, Put, RecordedGrant,
    ServerlessRecord, Shared, duration_ms,
};
use crate::backoff::Backoff;

/// A claim is renewed every `lease / RENEW_EVERY`.
///
/// Why a half, not a third (as until issue 17): the room a renewal leaves before the
/// holder must act (a call timeout before the expiry) is `lease / 2 - call_timeout`, at
/// least two call timeouts (`call_timeout` is at most a sixth of the lease): a renewal
/// and one retry fit even when both hang until their timeouts, and three quick retries
/// fit. A third left three call timeouts; the extra room cost a third more renewals, the
/// largest share of a waiting job's CPU (BENCHMARKS.md, "Memory (issue 17)"). A holder
/// that dies is taken over when its last expiry passes, between half a lease and a lease
/// after its death (was two thirds to one): the failover is, if anything, earlier. What
/// is shorter is how long S3 may refuse renewals before a holder gives its job up (20
/// instead of 30 s with the default 60 s lease); such a job is handed over through its
/// claim or returned, never lost.
pub(super) const RENEW_EVERY: u32 = 2;

/// A claim this process holds, shared between the guard and its handles.
struct Held {
    claims: Claims,
    job_id: String,
    key: String,
    /// Writes go one at a time.
    state: tokio::sync::Mutex<HeldState>,
    /// The expiry of the last confirmed write (unix ms), readable without the lock.
    confirmed_expiry: AtomicU64,
    /// Set when the lease ran out on our clock or another daemon took the claim.
    lost: AtomicBool,
}

struct HeldState {
    /// `None` once another daemon took the claim over, or once it ended.
    etag: Option<String>,
    record: JobRecord,
}

impl Held {
    fn shared(&self) -> &Shared {
        &self.claims.shared
    }

    fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// How long until the holder must act: the confirmed expiry minus a call timeout.
    fn time_to_act(&self) -> Duration {
        let shared = self.shared();
        let act_at = self
            .confirmed_expiry
            .load(Ordering::SeqCst)
            .saturating_sub(duration_ms(shared.call_timeout()));
        Duration::from_millis(act_at.saturating_sub((shared.clock)()))
    }

    /// Writes `record` with a fresh expiry, confirmed; a conflict means the claim is lost.
    async fn write(&self, state: &mut HeldState, record: JobRecord) -> Result<(), ClaimError> {
        let lost = || ClaimError::Lost {
            key: self.key.clone(),
        };
        let etag = state.etag.clone().ok_or_else(lost)?;
        let shared = self.shared();
        let expires = shared.expiry_from_now();
        let body = shared.encode(&self.job_id, expires, &record);
        match shared.replace_confirmed(&self.key, &etag, body).await? {
            Put::Written(etag) => {
                state.etag = Some(etag);
                state.record = record;
                self.confirmed_expiry.fetch_max(expires, Ordering::SeqCst);
                Ok(())
            }
            Put::Conflict => {
                warn!(claim = %self.key, "Claim taken over by another daemon.");
                state.etag = None;
                self.lost.store(true, Ordering::SeqCst);
                Err(lost())
            }
        }
    }

    /// Changes the record (and renews the claim with it).
    async fn update(&self, change: impl FnOnce(&mut JobRecord)) -> Result<(), ClaimError> {
        let mut state = self.state.lock().await;
        let mut record = state.record.clone();
        change(&mut record);
        self.write(&mut state, record).await
    }

    /// Ends the claim: deleted when it records nothing (or `clear`: the record is to be
    /// emptied) and our lease surely holds; otherwise marked released (`If-Match`), the
    /// record kept for the next holder unless `clear`.
    async fn finish(&self, clear: bool) -> Result<(), ClaimError> {
        let mut state = self.state.lock().await;
        let Some(etag) = state.etag.clone() else {
            return if clear {
                Err(ClaimError::Lost {
                    key: self.key.clone(),
                })
            } else {
                Ok(())
            };
        };
        if clear {
            state.record.grant = None;
            state.record.function = None;
        }
        // Whatever `-alloc` call an intent announced is over, and this live process's
        // reservations (journal, releaser) own its outcome.
        if let Some(serverless) = &mut state.record.serverless {
            serverless.alloc_started_unix_ms = None;
        }
        let shared = self.shared();
        let key = &self.key;
        if !state.record.holds_gpus() && !self.is_lost() && !self.time_to_act().is_zero() {
            match shared.timed("delete", key, shared.store.delete(key)).await {
                Ok(()) => {
                    debug!(claim = %key, "Claim deleted.");
                    state.etag = None;
                    return Ok(());
                }
                Err(e) => {
                    warn!(claim = %key, error = %crate::aws::error_chain(&e), "Cannot delete a claim; marking it released.")
                }
            }
        }
        let body = shared.encode(&self.job_id, 0, &state.record);
        match shared.replace_confirmed(key, &etag, body).await? {
            Put::Written(_) => {
                state.etag = None;
                if state.record.holds_gpus() {
                    info!(claim = %key, "Claim released with its grant recorded; the next holder adopts it.");
                } else {
                    debug!(claim = %key, "Claim released.");
                }
                Ok(())
            }
            Put::Conflict => {
                debug!(claim = %key, "Claim was no longer ours.");
                state.etag = None;
                Err(ClaimError::Lost { key: key.clone() })
            }
        }
    }

    /// Hands the claim to no process: written with the serverless holder and `until` as
    /// its expiry (the function's result deadline), the record as it is. Nobody takes it
    /// over before then but the results handler and the schedule (`acquire_parked`).
    async fn park(&self, until_unix_ms: u64) -> Result<(), ClaimError> {
        let mut state = self.state.lock().await;
        let Some(etag) = state.etag.clone() else {
            return Err(ClaimError::Lost {
                key: self.key.clone(),
            });
        };
        let shared = self.shared();
        let body = shared.encode_as(
            &Owner::serverless(),
            &self.job_id,
            until_unix_ms,
            &state.record,
        );
        match shared.replace_confirmed(&self.key, &etag, body).await? {
            Put::Written(_) => {
                state.etag = None;
                debug!(claim = %self.key, until_unix_ms, "Claim parked until the result deadline.");
                Ok(())
            }
            Put::Conflict => {
                state.etag = None;
                self.lost.store(true, Ordering::SeqCst);
                Err(ClaimError::Lost {
                    key: self.key.clone(),
                })
            }
        }
    }

    /// Ends the claim as it is (see `finish`); failures are logged: the claim then expires
    /// by itself.
    async fn end(&self) {
        match self.finish(false).await {
            Ok(()) | Err(ClaimError::Lost { .. }) => {}
            Err(e) => {
                warn!(claim = %self.key, error = %crate::aws::error_chain(&e), "Cannot end a claim; it expires by itself.")
            }
        }
    }
}

/// A claim this process holds. End it with `end`; if it is dropped instead, it is ended
/// in the background.
pub(crate) struct ClaimGuard {
    held: Arc<Held>,
    /// The record as claimed: what a former holder left to take care of.
    carried: JobRecord,
    ended: bool,
}

/// Lets the job change its claim's record while `ClaimGuard::keep_while` renews it.
#[derive(Clone)]
pub(crate) struct ClaimHandle {
    held: Arc<Held>,
}

impl ClaimHandle {
    /// Records the grant, before the bundle is uploaded.
    ///
    /// # Errors
    /// `ClaimError` when the write is not confirmed (`Lost` when another daemon has it).
    pub(crate) async fn record_grant(&self, grant: RecordedGrant) -> Result<(), ClaimError> {
        let mut intent = None;
        self.held
            .update(|r| {
                r.grant = Some(grant);
                // The `-alloc` call the intent announced is over: its grant is here.
                if let Some(serverless) = &mut r.serverless {
                    intent = serverless.alloc_started_unix_ms.take();
                }
            })
            .await?;
        if let Some(started) = intent {
            // The widest the lost-grant window was for this job: from just before the
            // `-alloc` call to the confirmed claim write (docs/serverless.md).
            info!(
                claim = %self.held.key,
                window_ms = crate::unix_now_ms().saturating_sub(started),
                "Grant recorded in the claim."
            );
        }
        Ok(())
    }

    /// Records that the function may run from now until `result_deadline_unix_ms`.
    ///
    /// # Errors
    /// As `record_grant`.
    pub(crate) async fn record_function(
        &self,
        function: FunctionStarted,
    ) -> Result<(), ClaimError> {
        self.held.update(|r| r.function = Some(function)).await
    }

    /// Changes the serverless part of the record (Lambda mode), confirmed.
    ///
    /// # Errors
    /// As `record_grant`.
    pub(crate) async fn update_serverless(
        &self,
        change: impl FnOnce(&mut ServerlessRecord),
    ) -> Result<(), ClaimError> {
        self.held
            .update(|r| change(r.serverless.get_or_insert_with(ServerlessRecord::default)))
            .await
    }

    /// The record as last confirmed.
    pub(crate) async fn record(&self) -> JobRecord {
        self.held.state.lock().await.record.clone()
    }

    /// Whether the record says (confirmed) that the function may be running.
    pub(crate) async fn function_recorded(&self) -> bool {
        self.held.state.lock().await.record.function.is_some()
    }

    /// The job's result exists: ends the claim with nothing recorded (deleted while the
    /// lease holds, else marked released), before the GPUs are released.
    ///
    /// # Errors
    /// As `record_grant`; then the record may still name the grant.
    pub(crate) async fn end_done(&self) -> Result<(), ClaimError> {
        self.held.finish(true).await
    }

    /// A `-dealloc` of the recorded grant failed at `now` (unix milliseconds): the grant
    /// stays recorded, the function is taken out (the job is done or was sent back: no
    /// result is waited for any more), and the failure is counted. Returns the count and
    /// when the failures began. End the claim afterwards (`ClaimGuard::end` marks it
    /// released with the grant kept, for whoever takes it next to release).
    ///
    /// # Errors
    /// As `record_grant`; then the record is as it was (grant included).
    pub(crate) async fn record_release_failure(&self, now: u64) -> Result<(u32, u64), ClaimError> {
        let mut counted = (0, now);
        self.held
            .update(|r| {
                r.function = None;
                let s = r.serverless.get_or_insert_with(ServerlessRecord::default);
                s.release_failures = s.release_failures.saturating_add(1);
                let since = *s.release_failing_since_unix_ms.get_or_insert(now);
                counted = (s.release_failures, since);
            })
            .await?;
        Ok(counted)
    }

    /// Removes the grant and function from the record: before the GPUs are released, so
    /// that no successor releases them again.
    ///
    /// # Errors
    /// As `record_grant`; then the record may still name the grant.
    pub(crate) async fn clear_gpus(&self) -> Result<(), ClaimError> {
        self.held
            .update(|r| {
                r.grant = None;
                r.function = None;
            })
            .await
    }
}

impl ClaimGuard {
    /// A guard for a claim just written with `etag`, holding until `expires_unix_ms`.
    pub(super) fn new(
        claims: Claims,
        job_id: &str,
        key: String,
        etag: String,
        expires_unix_ms: u64,
        record: JobRecord,
    ) -> ClaimGuard {
        ClaimGuard {
            held: Arc::new(Held {
                claims,
                job_id: job_id.to_string(),
                key,
                state: tokio::sync::Mutex::new(HeldState {
                    etag: Some(etag),
                    record: record.clone(),
                }),
                confirmed_expiry: AtomicU64::new(expires_unix_ms),
                lost: AtomicBool::new(false),
            }),
            carried: record,
            ended: false,
        }
    }

    /// The claim object's key.
    #[cfg(test)]
    pub(crate) fn key(&self) -> &str {
        &self.held.key
    }

    /// What the record held when this process claimed it: a former holder's grant and
    /// function, which are now ours to finish.
    pub(crate) fn carried(&self) -> &JobRecord {
        &self.carried
    }

    /// A handle to change the record while the work runs.
    pub(crate) fn handle(&self) -> ClaimHandle {
        ClaimHandle {
            held: self.held.clone(),
        }
    }

    /// Runs `work` while renewing the claim every half of the lease (`RENEW_EVERY`); a
    /// renewal runs beside the work, never pausing it. Unless a renewal was confirmed, `lost` is
    /// cancelled a call timeout before the last confirmed expiry (our lease may end
    /// before we learn anything), or as soon as another daemon is seen to hold the
    /// claim; `work` is still awaited, so it can stop cleanly. Returns the work's output
    /// and whether the claim was lost.
    ///
    /// Cancel safety: dropping the future drops `work`; the claim stays held.
    pub(crate) async fn keep_while<T>(
        &self,
        lost: &CancellationToken,
        work: impl Future<Output = T>,
    ) -> (T, bool) {
        tokio::pin!(work);
        let held = &self.held;
        let every = held.shared().lease / RENEW_EVERY;
        // Three quick retries (1/16, 1/8, 1/4 of the interval, jittered) fit in the room
        // a renewal leaves before the holder must act (a third of the lease).
        let mut retries = Backoff::new(every / 16, every / 4).with_jitter();
        let mut next = tokio::time::Instant::now() + every;
        let mut renewal: Option<BoxFuture<'static, Result<(), ClaimError>>> = None;
        loop {
            let act_at = tokio::time::Instant::now() + held.time_to_act();
            tokio::select! {
                output = &mut work => {
                    // A renewal in flight may change the ETag: let it land, so that the
                    // end acts on the claim as it is.
                    if let Some(in_flight) = renewal.take() {
                        let _ = in_flight.await;
                    }
                    return (output, held.is_lost());
                }
                _ = tokio::time::sleep_until(next), if renewal.is_none() && !held.is_lost() => {
                    let held = held.clone();
                    renewal = Some(Box::pin(async move { held.update(|_| {}).await }));
                }
                reply = reply_of(&mut renewal), if renewal.is_some() => {
                    renewal = None;
                    match reply {
                        Ok(()) => {
                            debug!(claim = %held.key, "Claim renewed.");
                            retries.reset();
                            next = tokio::time::Instant::now() + every;
                        }
                        Err(ClaimError::Lost { .. }) => {
                            warn!(claim = %held.key, "Claim lost to another daemon; stopping the job.");
                            lost.cancel();
                        }
                        Err(e) => {
                            let retry_in = retries.next_delay();
                            warn!(claim = %held.key, error = %crate::aws::error_chain(&e),
                                retry_ms = retry_in.as_millis() as u64, "Claim renewal failed; will retry.");
                            next = tokio::time::Instant::now() + retry_in;
                        }
                    }
                }
                _ = tokio::time::sleep_until(act_at), if !held.is_lost() => {
                    warn!(claim = %held.key, "Claim lease about to end without a confirmed renewal; stopping the job.");
                    held.lost.store(true, Ordering::SeqCst);
                    lost.cancel();
                }
            }
        }
    }

    /// Parks the claim until `until_unix_ms` (see `Held::park`): the serverless jobs
    /// handler's end once the bundle is uploaded. On an error the claim stays ours until
    /// its lease runs out, when the schedule finds its record.
    ///
    /// # Errors
    /// `ClaimError` when the write is not confirmed.
    pub(crate) async fn park(mut self, until_unix_ms: u64) -> Result<(), ClaimError> {
        self.ended = true;
        self.held.park(until_unix_ms).await
    }

    /// Ends the claim (see `Held::end`): deleted when its record holds nothing, else
    /// marked released with the record kept for the next holder.
    pub(crate) async fn end(mut self) {
        self.ended = true;
        self.held.end().await;
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if !self.ended
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let held = self.held.clone();
            runtime.spawn(async move { held.end().await }.in_current_span());
        }
    }
}

/// The reply of the renewal in flight; never completes when there is none.
async fn reply_of(
    renewal: &mut Option<BoxFuture<'static, Result<(), ClaimError>>>,
) -> Result<(), ClaimError> {
    match renewal {
        Some(in_flight) => in_flight.await,
        None => std::future::pending().await,
    }
}
