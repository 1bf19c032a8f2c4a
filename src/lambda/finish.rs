//! What the results handler, the schedule and the jobs handler share once they hold a
//! job's claim: releasing the grant it records, and the job's one-record S3 event.
//!
//! **The rule: a recorded grant leaves the claim only once the scheduler confirmed its
//! release.** A sandbox's `/tmp` (its journal) dies with it, so in Lambda mode the claim
//! is the grant's only durable record. `release_recorded` runs while its caller holds
//! the claim (a live claim under its lease: nobody else acts on it) and:
//!
//! 1. calls `-dealloc` once, the grant still recorded;
//! 2. confirmed: ends the claim (deleted; the grant with it);
//! 3. failed (non-zero exit, timeout, no client): writes the claim with the grant kept,
//!    the function taken out (the job is done, or was sent back: no result is awaited)
//!    and the failure counted (`release_failures`, `release_failing_since_unix_ms`), then
//!    the caller's end marks it released: the **release pending** state. The schedule's
//!    next pass (holder gone, a grant, no function: `ReleaseGrant`), a retried results
//!    record, a redelivered jobs record or a daemon sharing the claims, whoever takes it
//!    first, releases it again. The caller reports the failure (the results handler: a
//!    batch item failure, so its record comes back);
//! 4. the give-up rule: a release still failing `GIVE_UP_AFTER` after its first failure
//!    (the daemon's releaser retries about as long) is given up: an error names the claim
//!    and the scheduler job (`RELEASE_GIVEN_UP`, metric `ReleasesGivenUp`), and the claim
//!    ends. The scheduler's own clean-up is then the only way back for those GPUs.
//!
//! **Releasing twice.** A caller killed after a confirmed `-dealloc` and before the claim
//! write (2.) leaves the grant recorded; whoever takes the claim next calls `-dealloc`
//! again for a job id the scheduler no longer knows. The SSGM client reports that as a
//! failure (the mock SSGM exits 1, "unknown job", and frees nothing; its job ids only
//! increase, so an old id never names a new job), which is counted as in 3. until it
//! succeeds or is given up: a second release frees nothing as long as the scheduler does
//! not hand the same job id to another client within the give-up time. That is the
//! assumption the daemon's releaser already makes when it retries a `-dealloc` that
//! timed out (which the scheduler may have applied). We choose it over the old order
//! (the grant taken out of the claim before the `-dealloc`), which never released twice
//! but leaked every grant whose release failed in a sandbox that was then recycled.
//!
//! A crash at each instant: before the `-dealloc`, during it, or after it and before the
//! claim write: the claim is live with the grant (and the function, if it had one) until
//! its lease runs out; then the schedule (a function: its result is there, or its
//! deadline passed; no function: `ReleaseGrant`) or a redelivered record takes it and
//! releases again (a second `-dealloc` if the first was applied: see above). During the
//! failure write (3.): the write is confirmed or not; not confirmed, the claim is as it
//! was, with the grant. Between that write and the end: the claim is live with the
//! grant, no function, until its lease runs out: `ReleaseGrant`. No instant leaves the
//! grant recorded nowhere.

use serde_json::json;
use tracing::{error, warn};

use super::handler::Lambda;
use crate::aws::error_chain;
use tokio_util::sync::CancellationToken;

use crate::job::claim::{ClaimError, ClaimGuard, JobRecord};
use crate::job::event::ObjectRef;
use crate::job::serverless::{RELEASE_GIVEN_UP, debug_abort_at, give_up};
use crate::ops::emf;

/// Why a recorded grant is still recorded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReleaseError {
    /// The claim could not be changed: it records the grant as it did.
    #[error(transparent)]
    Claim(#[from] ClaimError),
    /// The `-dealloc` failed: the claim keeps the grant (release pending), or, when the
    /// failure write was not confirmed, is as it was.
    #[error(
        "the release of scheduler job {scheduler_job} failed ({failures} in a row); the claim keeps the grant"
    )]
    Failed {
        scheduler_job: String,
        failures: u32,
    },
}

/// Releases the grant `carried` records, if any, then ends the claim (see the module doc:
/// the grant stays recorded until the release is confirmed). Returns the scheduler job
/// id released. The caller holds the claim (`guard`) and ends it after; the claim is
/// renewed while the `-dealloc` runs, so that nobody else takes it (and releases the
/// same grant) however long the call takes.
///
/// # Errors
/// `ReleaseError` when the grant is still recorded: the release failed, or the claim
/// could not be changed.
pub(crate) async fn release_recorded(
    lambda: &Lambda,
    job_id: &str,
    guard: &ClaimGuard,
    carried: &JobRecord,
) -> Result<Option<String>, ReleaseError> {
    let handle = guard.handle();
    let Some(grant) = &carried.grant else {
        handle.end_done().await?;
        return Ok(None);
    };
    let reservations = lambda.jobs.reservations();
    if grant.scheduler != reservations.scheduler_address() {
        error!(job_id, scheduler_job = %grant.scheduler_job_id, scheduler = %grant.scheduler,
            "Cannot take over the grant the job's claim records (another scheduler); release it by hand.");
        handle.end_done().await?;
        return Ok(None);
    }
    let dealloc = reservations.release_recorded(
        &grant.scheduler_job_id,
        grant.since_unix.saturating_mul(1000),
    );
    // A lease that runs out meanwhile does not stop the call (its outcome must be known):
    // the claim writes after it then fail, and the grant stays recorded.
    let (released, _) = guard.keep_while(&CancellationToken::new(), dealloc).await;
    let failure = match released {
        Ok(()) => {
            debug_abort_at("dealloc-confirmed");
            if let Err(e) = handle.end_done().await {
                // Released, still recorded: the next taker's `-dealloc` is a second one
                // (see the module doc), answered "unknown job" and counted until given up.
                warn!(job_id, scheduler_job = %grant.scheduler_job_id, error = %error_chain(&e),
                    "GPUs released, but the claim still records them.");
            }
            return Ok(Some(grant.scheduler_job_id.clone()));
        }
        Err(e) => e,
    };
    let now = crate::unix_now_ms();
    let (failures, since) = handle.record_release_failure(now).await?;
    if give_up(since, now) {
        error!(claim = %lambda.claims.key(job_id), job_id, scheduler_job = %grant.scheduler_job_id,
            scheduler = %grant.scheduler, failures, failing_since_unix_ms = since,
            error = %error_chain(&failure), "{}", RELEASE_GIVEN_UP);
        emf::count("ReleasesGivenUp", 1);
        handle.end_done().await?;
        return Ok(None);
    }
    warn!(claim = %lambda.claims.key(job_id), job_id, scheduler_job = %grant.scheduler_job_id,
        failures, error = %error_chain(&failure),
        "Cannot release the GPUs the claim records; the claim keeps them for a retry.");
    Err(ReleaseError::Failed {
        scheduler_job: grant.scheduler_job_id.clone(),
        failures,
    })
}

/// Bodies up to this size are kept as they came; a larger one (or one naming several
/// objects) is stored as the one-record event of its job's object.
const ORIGINAL_EVENT_MAX: usize = 8 * 1024;

/// The event a job's claim keeps, to send the job back with: the record's own body when it
/// names this one object and is small, else a one-record S3 event for the object (key
/// percent-encoded, which S3's own form encoding decodes to the same key).
pub(crate) fn event_for(object: &ObjectRef, body: &str, objects_in_body: usize) -> String {
    if objects_in_body == 1 && body.len() <= ORIGINAL_EVENT_MAX {
        return body.to_string();
    }
    let key =
        percent_encoding::utf8_percent_encode(&object.key, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    let mut s3_object = json!({"key": key});
    if let Some(size) = object.size {
        s3_object["size"] = json!(size);
    }
    if let Some(etag) = &object.etag {
        s3_object["eTag"] = json!(etag);
    }
    if let Some(version) = &object.version_id {
        s3_object["versionId"] = json!(version);
    }
    let mut record = json!({
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "eventName": object.event_name,
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": object.bucket}, "object": s3_object}
    });
    if let Some(time) = &object.event_time {
        record["eventTime"] = json!(time);
    }
    json!({"Records": [record]}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::event::{Notification, parse_notification};

    /// The one object of a job's stored S3 event.
    fn object_of_event(event: &str) -> Option<ObjectRef> {
        match parse_notification(event) {
            Notification::Objects { mut objects, .. } if objects.len() == 1 => objects.pop(),
            _ => None,
        }
    }

    fn object(key: &str) -> ObjectRef {
        ObjectRef {
            bucket: "in".into(),
            key: key.into(),
            size: Some(3),
            etag: Some("e1".into()),
            version_id: Some("v1".into()),
            event_name: "ObjectCreated:Put".into(),
            event_time: Some("2026-12-05T20:00:00.000Z".into()),
        }
    }

    #[test]
    fn a_stored_event_names_exactly_its_object_whatever_the_key() {
        for key in ["a b+c%20d.jpg", "dir/ü ñ/€.png", "x?y#z&w=1.jpg", "50%.png"] {
            let event = event_for(&object(key), "not this body", 2);
            assert_eq!(object_of_event(&event), Some(object(key)), "{event}");
        }
    }

    #[test]
    fn a_small_one_object_body_is_kept_as_it_came() {
        let body = include_str!("../../tests/fixtures/events/localstack_put.json");
        let original = object_of_event(body).expect("one object");
        assert_eq!(event_for(&original, body, 1), body);
        // A large one is replaced by the object's own event.
        let large = format!("{body}{}", " ".repeat(ORIGINAL_EVENT_MAX));
        let stored = event_for(&original, &large, 1);
        assert!(stored.len() < large.len());
        assert_eq!(object_of_event(&stored), Some(original));
    }
}
