//! What the results handler, the schedule and the jobs handler share once they hold a
//! job's claim: releasing the grant it records in the daemon's order (adopted into this
//! sandbox's journal, taken out of the claim, then released: never released twice), the
//! job's one-record S3 event.

use serde_json::json;
use tracing::error;

use super::handler::Lambda;
use crate::aws::error_chain;
use crate::job::claim::{ClaimError, ClaimHandle, JobRecord};
use crate::job::event::{Notification, ObjectRef, parse_notification};

/// Releases the grant `carried` records, if any, after ending the claim (which takes it
/// out). Returns the scheduler job id released.
///
/// # Errors
/// `ClaimError` when the claim could not be changed: the grant then stays recorded in it
/// (and in this sandbox's journal, whose releaser asks the claim before it releases).
pub(crate) async fn release_recorded(
    lambda: &Lambda,
    job_id: &str,
    handle: &ClaimHandle,
    carried: &JobRecord,
) -> Result<Option<String>, ClaimError> {
    let clear = || handle.end_done();
    let Some(grant) = &carried.grant else {
        clear().await?;
        return Ok(None);
    };
    let reservations = lambda.jobs.reservations();
    let key = carried
        .serverless
        .as_ref()
        .and_then(|s| object_of_event(&s.event))
        .map(|o| o.key)
        .unwrap_or_default();
    let adopted = reservations
        .adopt(
            job_id,
            &key,
            &grant.scheduler,
            &grant.scheduler_job_id,
            &grant.devices,
            grant.since_unix,
        )
        .await;
    match adopted {
        Ok(reservation) => match clear().await {
            Ok(()) => {
                reservations.release(reservation).await;
                Ok(Some(grant.scheduler_job_id.clone()))
            }
            Err(e) => {
                // Still named by the claim: the releaser asks it first and leaves it.
                reservations.release_in_background(reservation);
                Err(e)
            }
        },
        Err(e) => {
            error!(job_id, scheduler_job = %grant.scheduler_job_id, scheduler = %grant.scheduler,
                error = %error_chain(&e), "Cannot take over the grant the job's claim records; release it by hand.");
            clear().await?;
            Ok(None)
        }
    }
}

/// The one object of a job's stored S3 event.
pub(crate) fn object_of_event(event: &str) -> Option<ObjectRef> {
    match parse_notification(event) {
        Notification::Objects { mut objects, .. } if objects.len() == 1 => objects.pop(),
        _ => None,
    }
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
