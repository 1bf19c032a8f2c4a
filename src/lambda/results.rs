//! The results handler: one batch of the results queue's records (the output bucket's
//! `ObjectCreated` events, as `--results-queue` receives them in the daemon). For each
//! result `<output dir>/<job id><suffix>`, the job's claim is taken over (parked or not
//! held by a live invocation), its grant released while the claim still records it, the
//! claim ended once the scheduler confirmed (`finish`), and the outcome logged ("Job completed.", with its attempts and how long the result
//! took) and counted (the CloudWatch metric `JobsCompleted`).
//!
//! Idempotent: a second event for one result finds no claim and does nothing (a
//! debug line). An event that comes while a live invocation still holds the claim (the
//! result came before the jobs handler parked it) is a batch item failure and comes back.
//! Anything else in the bucket (other keys, test events, foreign bodies) is dropped with
//! a line; it can never name a job.
//!
//! A release that fails leaves the grant in the claim (release pending, see
//! `finish`) and is a batch item failure: the event comes back and tries again, and the
//! schedule retries it too; whichever is first releases it, the other finds it done.
//!
//! A crash at any instant: until the claim is ended, after the `-dealloc` is confirmed,
//! the claim names the grant, and a redelivered event (or the schedule, which checks
//! parked claims for their result and releases the grants of claims whose holder is
//! gone) finishes the job; one killed between the confirmed `-dealloc` and the claim
//! write makes the next one call `-dealloc` a second time (`finish` says why that is
//! safe).

use aws_lambda_events::sqs::SqsMessage;
use tracing::{debug, info, warn};

use super::finish::release_recorded;
use super::handler::{Invocation, Lambda};
use crate::aws::error_chain;
use crate::job::claim::Acquired;
use crate::job::event::{Notification, parse_notification};
use crate::location::BucketDir;
use crate::ops::emf;

/// Handles a batch; returns the message ids of the records that failed.
pub(crate) async fn handle(
    lambda: &Lambda,
    _invocation: &Invocation,
    records: Vec<SqsMessage>,
) -> Vec<String> {
    let mut failures = Vec::new();
    for record in records {
        let body = record.body.as_deref().unwrap_or_default();
        let done = match parse_notification(body) {
            Notification::Objects { objects, .. } => {
                let mut done = true;
                for object in objects {
                    let Some(job_id) = job_of_result(
                        &lambda.config.config.output,
                        &lambda.config.config.result_suffix,
                        &object.bucket,
                        &object.key,
                    ) else {
                        debug!(bucket = %object.bucket, key = %object.key, "Not a job's result.");
                        continue;
                    };
                    if let Err(e) = finish(lambda, &job_id).await {
                        warn!(job_id, error = %e, "Cannot finish the job of a result yet; the event comes back.");
                        done = false;
                    }
                }
                done
            }
            Notification::TestEvent => true,
            Notification::NotAnEvent(reason) | Notification::Unprocessable(reason) => {
                warn!(reason = %reason, "Dropping a results-queue message that is not an S3 event.");
                true
            }
        };
        if !done && let Some(id) = record.message_id {
            failures.push(id);
        }
    }
    failures
}

/// The job of a result: `<output dir>/<job id><suffix>` in the output bucket, where a job
/// id is 20 lowercase hex digits (`JobId`); `None` for anything else.
pub(crate) fn job_of_result(
    output: &BucketDir,
    suffix: &str,
    bucket: &str,
    key: &str,
) -> Option<String> {
    if bucket != output.bucket {
        return None;
    }
    let name = if output.dir.is_empty() {
        key
    } else {
        key.strip_prefix(&output.dir)?.strip_prefix('/')?
    };
    let id = name.strip_suffix(suffix)?;
    let is_job_id = id.len() == 20
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    is_job_id.then(|| id.to_string())
}

/// Why a result's job could not be finished now.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FinishError {
    #[error("its claim is held by a live invocation ({owner})")]
    Held { owner: String },
    #[error("{0}")]
    Claim(String),
}

/// Finishes the job `job_id` whose result is there: releases the grant its claim records
/// and ends the claim. Nothing to do when there is no claim (finished already).
///
/// # Errors
/// `FinishError` when the claim is held by a live invocation or cannot be changed.
pub(crate) async fn finish(lambda: &Lambda, job_id: &str) -> Result<(), FinishError> {
    let claims = &lambda.claims;
    let claim_error = |e: crate::job::claim::ClaimError| FinishError::Claim(error_chain(&e));
    if claims.inspect(job_id).await.map_err(claim_error)?.is_none() {
        debug!(job_id, "A result whose job has no claim: finished already.");
        return Ok(());
    }
    let guard = match claims
        .acquire_parked(job_id, None)
        .await
        .map_err(claim_error)?
    {
        Acquired::Claimed(guard) => guard,
        Acquired::HeldElsewhere { owner, .. } => return Err(FinishError::Held { owner }),
    };
    let carried = guard.carried().clone();
    let released = release_recorded(lambda, job_id, &guard, &carried).await;
    guard.end().await;
    // Still recorded (release pending, or the claim unchanged): a batch item failure,
    // so the result's record comes back; the schedule retries too.
    let released = released.map_err(|e| FinishError::Claim(error_chain(&e)))?;
    let now = crate::unix_now_ms();
    let result_after_ms = carried
        .function
        .as_ref()
        .map(|f| now.saturating_sub(f.started_unix_ms));
    let attempts = carried.serverless.as_ref().map_or(0, |s| s.attempts);
    info!(
        job_id,
        attempts,
        result_after_ms,
        scheduler_job = released.as_deref().unwrap_or(""),
        "Job completed."
    );
    emf::count("JobsCompleted", 1);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_job_ids_result_in_the_output_dir_names_a_job() {
        let output = BucketDir {
            bucket: "out".into(),
            dir: "results".into(),
        };
        let id = "0123456789abcdef0123";
        let job = |bucket: &str, key: &str| job_of_result(&output, ".png", bucket, key);
        assert_eq!(job("out", &format!("results/{id}.png")), Some(id.into()));
        assert_eq!(job("other", &format!("results/{id}.png")), None);
        assert_eq!(job("out", &format!("results/{id}.json")), None);
        assert_eq!(job("out", &format!("{id}.png")), None);
        assert_eq!(job("out", &format!("results/x/{id}.png")), None);
        assert_eq!(job("out", "results/0123456789ABCDEF0123.png"), None);
        assert_eq!(job("out", "results/0123456789abcdef.png"), None);
        assert_eq!(job("out", "results/.png"), None);
        assert_eq!(job("out", "results/../claims/x.png"), None);
        let root = BucketDir {
            bucket: "out".into(),
            dir: String::new(),
        };
        assert_eq!(
            job_of_result(&root, ".png", "out", &format!("{id}.png")),
            Some(id.into())
        );
    }
}
