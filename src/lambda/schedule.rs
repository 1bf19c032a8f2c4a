//! The schedule (an EventBridge rule, every minute): one pass over the claims, finishing
//! what invocations that returned or died left in them. Each claim is judged by `decide`
//! (pure) from what it records and whether its holder is gone:
//!
//! | the claim                                         | action |
//! |---------------------------------------------------|--------|
//! | held by a live process                            | left alone |
//! | parked (or holder gone) with a function, before its deadline | its result looked for (HEAD): there → finished as by the results handler |
//! | ... past its deadline                              | grant released, the job's event sent back to the jobs queue with its attempt count, or to the dead-letter queue once `maxReceiveCount` attempts were made; claim removed |
//! | holder gone, a grant without a function           | grant released, claim removed (the dead invocation's SQS record brings the job back); also a *release pending* claim (an earlier release failed, `finish`), retried every pass until confirmed or given up |
//! | holder gone, an intent without a grant            | `LOST_GRANT` logged with the claim's key and counted (`LostGrants`); claim removed |
//! | holder gone, nothing recorded                     | removed |
//! | not a claim body of ours                          | left alone |
//!
//! Every change goes through the claim's conditional writes (`acquire_parked`): of two
//! passes (or a pass and an invocation) on one claim, one acts and the other skips it.
//! Sending back comes before the release and the removal: a pass killed in between leaves
//! the claim as it was, and the next pass sends it again (a second copy of a job is
//! a duplicate the claim absorbs, never a second run). Every release keeps the grant in
//! the claim until the scheduler confirms it (`finish::release_recorded`): a failed one
//! leaves the claim release pending for the next pass. The pass stops when the
//! invocation's time gets short and says so; the next pass goes on.

use serde::Serialize;
use tracing::{debug, info, warn};

use super::finish::release_recorded;
use super::handler::{Invocation, Lambda};
use super::results::finish;
use crate::aws::{error_chain, storage};
use crate::job::claim::{Acquired, ClaimView};
use crate::job::serverless::LOST_GRANT;
use crate::ops::emf;

/// What the schedule does with one claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Leave,
    CheckResult,
    Retry,
    ReleaseGrant,
    ReportLostGrant,
    Remove,
    Foreign,
}

/// What to do with a claim seen at `now` (unix milliseconds).
pub(crate) fn decide(view: &ClaimView, now: u64) -> Action {
    if view.unreadable {
        return Action::Foreign;
    }
    let record = &view.record;
    if let Some(function) = &record.function {
        if !(view.parked || view.holder_gone) {
            return Action::Leave;
        }
        return if now >= function.result_deadline_unix_ms {
            Action::Retry
        } else {
            Action::CheckResult
        };
    }
    if !view.holder_gone {
        return Action::Leave;
    }
    if record.grant.is_some() {
        return Action::ReleaseGrant;
    }
    if record
        .serverless
        .as_ref()
        .is_some_and(|s| s.alloc_started_unix_ms.is_some())
    {
        return Action::ReportLostGrant;
    }
    Action::Remove
}

/// What one pass did.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Pass {
    pub(crate) claims: usize,
    pub(crate) finished: usize,
    pub(crate) retried: usize,
    pub(crate) dead_lettered: usize,
    pub(crate) grants_released: usize,
    pub(crate) lost_grants: usize,
    pub(crate) removed: usize,
    /// Claims not reached because the invocation's time got short.
    pub(crate) not_reached: usize,
    pub(crate) errors: usize,
}

/// One pass over the claims.
pub(crate) async fn run(lambda: &Lambda, invocation: &Invocation) -> Pass {
    let mut pass = Pass::default();
    let ids = match lambda.claims.list().await {
        Ok(ids) => ids,
        Err(e) => {
            warn!(error = %error_chain(&e), "Cannot list the claims; the next pass tries again.");
            pass.errors += 1;
            return pass;
        }
    };
    pass.claims = ids.len();
    let budget = super::jobs::record_budget(lambda);
    for (index, id) in ids.iter().enumerate() {
        if invocation.remaining() < budget {
            pass.not_reached = ids.len() - index;
            warn!(
                not_reached = pass.not_reached,
                "Remaining invocation time is short; the next pass goes on."
            );
            break;
        }
        if let Err(e) = visit(lambda, id, &mut pass).await {
            warn!(job_id = %id, error = %e, "Cannot settle a claim; the next pass tries again.");
            pass.errors += 1;
        }
    }
    info!(
        claims = pass.claims,
        finished = pass.finished,
        retried = pass.retried,
        dead_lettered = pass.dead_lettered,
        grants_released = pass.grants_released,
        lost_grants = pass.lost_grants,
        removed = pass.removed,
        errors = pass.errors,
        "Schedule pass done."
    );
    pass
}

async fn visit(lambda: &Lambda, id: &str, pass: &mut Pass) -> Result<(), String> {
    let claims = &lambda.claims;
    let Some(view) = claims.inspect(id).await.map_err(|e| error_chain(&e))? else {
        return Ok(());
    };
    let action = decide(&view, crate::unix_now_ms());
    debug!(job_id = id, ?action, owner = %view.owner, "Claim seen.");
    match action {
        Action::Leave => Ok(()),
        Action::Foreign => {
            debug!(job_id = id, "Not a claim body of ours; left alone.");
            Ok(())
        }
        Action::CheckResult => {
            if result_exists(lambda, id).await? {
                finish(lambda, id).await.map_err(|e| e.to_string())?;
                pass.finished += 1;
            }
            Ok(())
        }
        Action::Retry => retry(lambda, id, pass).await,
        Action::ReleaseGrant | Action::ReportLostGrant | Action::Remove => {
            let guard = match claims.acquire_parked(id, None).await {
                Ok(Acquired::Claimed(guard)) => guard,
                Ok(Acquired::HeldElsewhere { .. }) => return Ok(()),
                Err(e) => return Err(error_chain(&e)),
            };
            let carried = guard.carried().clone();
            // Judged again on the record as taken over: it may have moved on since.
            let taken = ClaimView {
                record: carried.clone(),
                holder_gone: true,
                ..view
            };
            let now_action = decide(&taken, crate::unix_now_ms());
            let result = match now_action {
                Action::ReleaseGrant => release_recorded(lambda, id, &guard, &carried)
                    .await
                    .map(|released| {
                        let retried = carried
                            .serverless
                            .as_ref()
                            .map_or(0, |s| s.release_failures);
                        if retried > 0 {
                            info!(
                                job_id = id,
                                scheduler_job = released.as_deref().unwrap_or(""),
                                failed_before = retried,
                                "Released a grant whose earlier release failed."
                            );
                        } else {
                            info!(
                                job_id = id,
                                scheduler_job = released.as_deref().unwrap_or(""),
                                "Released the grant of an invocation that died before its upload."
                            );
                        }
                        pass.grants_released += 1;
                    })
                    .map_err(|e| error_chain(&e)),
                Action::ReportLostGrant => {
                    let serverless = carried.serverless.clone().unwrap_or_default();
                    warn!(claim = %claims.key(id), job_id = id,
                        alloc_started_unix_ms = serverless.alloc_started_unix_ms,
                        request_id = %serverless.request_id, "{}", LOST_GRANT);
                    emf::count("LostGrants", 1);
                    pass.lost_grants += 1;
                    Ok(())
                }
                Action::Remove => {
                    pass.removed += 1;
                    Ok(())
                }
                // A function appeared meanwhile: the next pass looks at it.
                _ => {
                    if let Some(function) = &carried.function {
                        let _ = guard.park(function.result_deadline_unix_ms).await;
                        return Ok(());
                    }
                    Ok(())
                }
            };
            guard.end().await;
            result
        }
    }
}

/// A parked job whose result deadline passed: sent back (or dead-lettered), then its
/// grant released and its claim removed.
async fn retry(lambda: &Lambda, id: &str, pass: &mut Pass) -> Result<(), String> {
    if result_exists(lambda, id).await? {
        finish(lambda, id).await.map_err(|e| e.to_string())?;
        pass.finished += 1;
        return Ok(());
    }
    let guard = match lambda.claims.acquire_parked(id, None).await {
        Ok(Acquired::Claimed(guard)) => guard,
        Ok(Acquired::HeldElsewhere { .. }) => return Ok(()),
        Err(e) => return Err(error_chain(&e)),
    };
    let carried = guard.carried().clone();
    let Some(function) = carried.function.clone() else {
        // Moved on since it was seen: the next pass judges it again.
        guard.end().await;
        return Ok(());
    };
    if function.result_deadline_unix_ms > crate::unix_now_ms() {
        let _ = guard.park(function.result_deadline_unix_ms).await;
        return Ok(());
    }
    if let Some(serverless) = &carried.serverless {
        let attempts = serverless.attempts;
        let (queue, dead) = match &lambda.dead_letter {
            Some((dlq, max)) if attempts >= *max => (dlq, true),
            _ => (&lambda.jobs_queue, false),
        };
        if let Err(e) = queue.send(&serverless.event, attempts).await {
            // Put back as it was: the next pass tries again.
            let _ = guard.park(function.result_deadline_unix_ms).await;
            return Err(error_chain(&e));
        }
        if dead {
            warn!(job_id = id, attempts, queue = %queue.url(),
                "No result within the deadline, attempts exhausted; the job goes to the dead-letter queue.");
            emf::count("JobsDeadLettered", 1);
            pass.dead_lettered += 1;
        } else {
            warn!(
                job_id = id,
                attempts, "No result within the deadline; the job goes back to the jobs queue."
            );
            emf::count("JobsRetried", 1);
            pass.retried += 1;
        }
    }
    let released = release_recorded(lambda, id, &guard, &carried).await;
    guard.end().await;
    released.map(|_| ()).map_err(|e| error_chain(&e))
}

async fn result_exists(lambda: &Lambda, id: &str) -> Result<bool, String> {
    let config = &lambda.config.config;
    let key = config
        .output
        .key_for(&format!("{id}{}", config.result_suffix));
    storage::object_exists(&lambda.s3, &config.output.bucket, &key)
        .await
        .map_err(|e| error_chain(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::claim::{FunctionStarted, JobRecord, RecordedGrant, ServerlessRecord};

    const NOW: u64 = 1_000_000;

    fn grant() -> Option<RecordedGrant> {
        Some(RecordedGrant {
            scheduler: "s:1".into(),
            scheduler_job_id: "7".into(),
            devices: vec![],
            since_unix: 1,
        })
    }

    fn function(deadline: u64) -> Option<FunctionStarted> {
        Some(FunctionStarted {
            started_unix_ms: 1,
            result_deadline_unix_ms: deadline,
        })
    }

    fn view(parked: bool, holder_gone: bool, record: JobRecord) -> ClaimView {
        ClaimView {
            unreadable: false,
            parked,
            holder_gone,
            expires_unix_ms: 0,
            owner: "o".into(),
            record,
        }
    }

    fn intent() -> Option<ServerlessRecord> {
        Some(ServerlessRecord {
            alloc_started_unix_ms: Some(5),
            ..ServerlessRecord::default()
        })
    }

    #[test]
    fn each_state_of_a_claim_has_its_action() {
        let running = JobRecord {
            grant: grant(),
            function: function(NOW + 1),
            ..JobRecord::default()
        };
        let overdue = JobRecord {
            function: function(NOW),
            ..running.clone()
        };
        let granted = JobRecord {
            grant: grant(),
            serverless: intent(),
            ..JobRecord::default()
        };
        // An earlier release failed: the claim kept the grant, took the function out and
        // was marked released (holder gone).
        let release_pending = JobRecord {
            grant: grant(),
            serverless: Some(ServerlessRecord {
                release_failures: 2,
                release_failing_since_unix_ms: Some(NOW - 60_000),
                ..ServerlessRecord::default()
            }),
            ..JobRecord::default()
        };
        let intended = JobRecord {
            serverless: intent(),
            ..JobRecord::default()
        };
        let cases = [
            (view(true, false, running.clone()), Action::CheckResult),
            (view(false, true, running.clone()), Action::CheckResult),
            (view(false, false, running), Action::Leave),
            (view(true, false, overdue.clone()), Action::Retry),
            (view(false, true, overdue), Action::Retry),
            (view(false, true, granted.clone()), Action::ReleaseGrant),
            (view(false, false, granted), Action::Leave),
            (
                view(false, true, release_pending.clone()),
                Action::ReleaseGrant,
            ),
            (view(false, false, release_pending), Action::Leave),
            (view(false, true, intended.clone()), Action::ReportLostGrant),
            (view(false, false, intended), Action::Leave),
            (view(false, true, JobRecord::default()), Action::Remove),
            (view(false, false, JobRecord::default()), Action::Leave),
        ];
        for (seen, expected) in cases {
            assert_eq!(decide(&seen, NOW), expected, "{seen:?}");
        }
        let foreign = ClaimView {
            unreadable: true,
            holder_gone: true,
            ..ClaimView::default()
        };
        assert_eq!(decide(&foreign, NOW), Action::Foreign);
    }
}
