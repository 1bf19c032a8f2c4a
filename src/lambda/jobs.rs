//! The jobs handler: one batch of the jobs queue's records, one after the other. Each
//! object runs the daemon's stages up to the upload (`JobContext::run_serverless`), and
//! its claim, parked until the function's result deadline, carries it from then on.
//!
//! What happens to a record is the daemon's policy (`JobError::disposition`): a record
//! that can never become a job (not an S3 event, a test event, an input that is gone,
//! a duplicate of a job another holder carries) succeeds and is deleted by the mapping;
//! anything that may pass (a busy scheduler, an S3 or claim error, a claim a live
//! invocation holds) is a batch item failure and comes back after its visibility timeout.
//! The queue's redrive policy dead-letters a record that keeps failing.
//!
//! Time: a record is started only while the invocation has at least `record_budget` left
//! (one SSGM call with its kill grace, four claim calls, an upload allowance); the rest of
//! the batch then fails at once, with one log line. Everything still running is cancelled
//! a little before Lambda's own deadline, so its GPUs are released (or handed to its
//! claim) and its claim ended while the sandbox still runs.
//!
//! Hostile input: bodies go through the daemon's `event` parser (never a panic); a record
//! without a message id cannot be reported as failed, so it is run and, if it fails,
//! logged (its object's claim, or the input's next event, still carries it).

use std::time::Duration;

use aws_lambda_events::sqs::SqsMessage;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::finish::event_for;
use super::handler::{Invocation, Lambda};
use crate::aws::error_chain;
use crate::aws::queue::ATTEMPTS_ATTRIBUTE;
use crate::job::event::{Notification, parse_notification};
use crate::job::serverless::ServerlessStart;
use crate::job::{Disposition, JobCancel, JobError};

/// What a record's upload is allowed beside its SSGM and claim calls.
const UPLOAD_ALLOWANCE: Duration = Duration::from_secs(15);

/// Handles a batch; returns the message ids of the records that failed (they come back
/// after their visibility timeout).
pub(crate) async fn handle(
    lambda: &Lambda,
    invocation: &Invocation,
    records: Vec<SqsMessage>,
) -> Vec<String> {
    let budget = record_budget(lambda);
    let cancel = JobCancel {
        token: CancellationToken::new(),
        lost: CancellationToken::new(),
        stop: CancellationToken::new(),
    };
    // Cancelled before Lambda's deadline, leaving time to release and end claims.
    let cleanup = cleanup_margin(lambda.config.config.claim_lease);
    let timer = tokio::spawn({
        let token = cancel.token.clone();
        let left = invocation.remaining().saturating_sub(cleanup);
        async move {
            tokio::time::sleep(left).await;
            warn!("The invocation's deadline is near; cancelling the jobs still running.");
            token.cancel();
        }
    });
    let mut failures = Vec::new();
    let total = records.len();
    let mut records = records.into_iter().enumerate();
    while let Some((index, record)) = records.next() {
        let remaining = invocation.remaining();
        if remaining < budget {
            warn!(
                remaining_ms = remaining.as_millis() as u64,
                budget_ms = budget.as_millis() as u64,
                not_started = total - index,
                "Remaining invocation time is short; not starting more records."
            );
            failures.extend(record.message_id);
            failures.extend(records.filter_map(|(_, r)| r.message_id));
            break;
        }
        if !handle_record(lambda, invocation, &record, &cancel).await {
            match record.message_id {
                Some(id) => failures.push(id),
                None => {
                    warn!("A record without a message id failed; it cannot be reported back.")
                }
            }
        }
    }
    timer.abort();
    failures
}

/// One record; `true` when it is done with (to be deleted by the mapping).
async fn handle_record(
    lambda: &Lambda,
    invocation: &Invocation,
    record: &SqsMessage,
    cancel: &JobCancel,
) -> bool {
    let body = record.body.as_deref().unwrap_or_default();
    let message_id = record.message_id.as_deref().unwrap_or_default();
    let objects = match parse_notification(body) {
        Notification::Objects { objects, .. } => objects,
        Notification::TestEvent => {
            info!(message_id, "Dropping s3:TestEvent.");
            return true;
        }
        Notification::NotAnEvent(reason) => {
            warn!(message_id, reason = %reason, "Dropping a message that can never become a job.");
            return true;
        }
        Notification::Unprocessable(reason) => {
            warn!(message_id, reason = %reason, "An S3 event this version cannot process; it comes back (and goes to the dead-letter queue).");
            return false;
        }
    };
    let attempts_before = record
        .message_attributes
        .get(ATTEMPTS_ATTRIBUTE)
        .and_then(|a| a.string_value.as_deref())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut done = true;
    for object in &objects {
        let start = ServerlessStart {
            event: event_for(object, body, objects.len()),
            attempts_before,
            request_id: invocation.request_id.clone(),
        };
        let ended = lambda
            .jobs
            .run_serverless(object, message_id, start, cancel)
            .await;
        let Err(e) = ended else { continue };
        match e.disposition() {
            Disposition::Delete if matches!(e, JobError::Duplicate { .. }) => {
                info!(key = %object.key, reason = %e, "Duplicate of a job another holder carries; this copy is done.");
            }
            Disposition::Delete => {
                warn!(bucket = %object.bucket, key = %object.key, reason = %error_chain(&e), "Dropping job that can never run.");
            }
            _ => {
                warn!(key = %object.key, error = %error_chain(&e), "Job not started; its record comes back.");
                done = false;
            }
        }
    }
    done
}

/// The least time a record is started with: one SSGM call and its kill grace, four claim
/// calls (the claim, the intent, the grant, the function; the park rides on the upload
/// allowance) and the upload.
pub(crate) fn record_budget(lambda: &Lambda) -> Duration {
    budget(lambda.worst_ssgm_call, lambda.config.config.claim_lease)
}

/// `record_budget` from the longest SSGM call and the claim lease.
fn budget(worst_ssgm_call: Duration, lease: Duration) -> Duration {
    worst_ssgm_call + crate::job::claim::call_timeout(lease) * 4 + UPLOAD_ALLOWANCE
}

/// How long before the invocation's deadline the jobs still running are cancelled: two
/// claim calls (the grant out, the claim ended) and a second for the release's first try.
fn cleanup_margin(lease: Duration) -> Duration {
    crate::job::claim::call_timeout(lease) * 2 + Duration::from_secs(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_started_records_ssgm_call_ends_before_the_cleanup_cancels_it() {
        let grace = crate::scheduler::KILL_GRACE;
        for (ssgm_s, lease_s) in [(30, 60), (3, 60), (1, 6), (300, 21_600), (10, 30)] {
            let (ssgm, lease) = (
                Duration::from_secs(ssgm_s) + grace,
                Duration::from_secs(lease_s),
            );
            let call = crate::job::claim::call_timeout(lease);
            // Started with exactly the budget left: after the claim and the intent (one
            // claim call each at worst) and the SSGM call, the cleanup is still ahead.
            let left_after_alloc = budget(ssgm, lease) - call * 2 - ssgm;
            assert!(
                left_after_alloc > cleanup_margin(lease),
                "ssgm {ssgm_s} s, lease {lease_s} s"
            );
        }
        // The defaults (SSGM 30 s, lease 60 s), as docs/serverless.md says.
        assert_eq!(
            budget(Duration::from_secs(30) + grace, Duration::from_secs(60)),
            Duration::from_secs(87)
        );
    }
}
