//! Which handler an invocation's event is for: pure, no AWS calls.
//!
//! An SQS batch is told by its records' `eventSourceARN`: the queue name at its end
//! against the jobs queue (`ORCHGPU_QUEUE`) and the results queue
//! (`ORCHGPU_RESULTS_QUEUE`). An EventBridge scheduled event (source `aws.events` or
//! `aws.scheduler`, detail-type `Scheduled Event`) runs the schedule. Anything else is a
//! `RouteError`: the invocation fails with its message, so a mis-wired trigger shows in
//! the function's errors instead of being dropped or, worse, run as jobs.
//!
//! Hostile input: an event is whatever invoked the function (any principal allowed to
//! invoke it). A batch mixing queues, a record of another queue, an event of another
//! shape: all refused before anything is touched. Bodies are not read here.

use aws_lambda_events::eventbridge::EventBridgeEvent;
use aws_lambda_events::sqs::{SqsEvent, SqsMessage};
use serde_json::Value;

/// The handler an event is for.
#[derive(Debug)]
pub(crate) enum Route {
    /// Records of the jobs queue.
    Jobs(Vec<SqsMessage>),
    /// Records of the results queue.
    Results(Vec<SqsMessage>),
    /// The periodic clean-up.
    Schedule,
}

/// Why an event is not for this function.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum RouteError {
    #[error("an SQS batch with no records")]
    EmptyBatch,
    #[error("an SQS record without eventSourceARN")]
    NoSource,
    #[error("an SQS batch from several queues ({first} and {other})")]
    MixedSources { first: String, other: String },
    #[error(
        "records of queue {queue:?}, which is neither the jobs queue ({jobs:?}) nor the results queue ({results})"
    )]
    UnknownQueue {
        queue: String,
        jobs: String,
        results: String,
    },
    #[error(
        "an EventBridge event that is not a scheduled event (source {from:?}, detail-type {detail_type:?})"
    )]
    NotScheduled { from: String, detail_type: String },
    #[error("an event this function does not handle ({0})")]
    Unknown(String),
}

/// The queue names events are told by.
#[derive(Debug, Clone)]
pub(crate) struct QueueNames {
    pub(crate) jobs: String,
    pub(crate) results: Option<String>,
}

/// The handler for `event`.
///
/// # Errors
/// `RouteError` for anything but a batch of one of our queues or a scheduled event.
pub(crate) fn route(event: Value, queues: &QueueNames) -> Result<Route, RouteError> {
    if let Some(records) = event.get("Records") {
        // Another service's records (an S3 event sent straight to the function, say).
        let source = records
            .get(0)
            .and_then(|r| r.get("eventSource").or_else(|| r.get("EventSource")))
            .and_then(Value::as_str);
        if let Some(source) = source
            && source != "aws:sqs"
        {
            return Err(RouteError::Unknown(format!(
                "records of {source:?}, not of SQS: the function takes S3 events only through the jobs queue"
            )));
        }
        let batch: SqsEvent = serde_json::from_value(event)
            .map_err(|e| RouteError::Unknown(format!("Records that are not SQS records: {e}")))?;
        return route_batch(batch.records, queues);
    }
    if event.get("detail-type").is_some() {
        let event: EventBridgeEvent = serde_json::from_value(event)
            .map_err(|e| RouteError::Unknown(format!("not an EventBridge event: {e}")))?;
        let scheduled = matches!(event.source.as_str(), "aws.events" | "aws.scheduler")
            && event.detail_type == "Scheduled Event";
        if !scheduled {
            return Err(RouteError::NotScheduled {
                from: event.source,
                detail_type: event.detail_type,
            });
        }
        return Ok(Route::Schedule);
    }
    let shape = match &event {
        Value::Object(map) => {
            let keys: Vec<&str> = map.keys().take(5).map(String::as_str).collect();
            format!("an object with keys {keys:?}")
        }
        Value::Null => "null".to_string(),
        Value::Array(_) => "an array".to_string(),
        _ => "a scalar".to_string(),
    };
    Err(RouteError::Unknown(shape))
}

fn route_batch(records: Vec<SqsMessage>, queues: &QueueNames) -> Result<Route, RouteError> {
    let first = records.first().ok_or(RouteError::EmptyBatch)?;
    let arn = first.event_source_arn.clone().ok_or(RouteError::NoSource)?;
    for record in &records {
        let other = record
            .event_source_arn
            .as_deref()
            .ok_or(RouteError::NoSource)?;
        if other != arn {
            return Err(RouteError::MixedSources {
                first: arn,
                other: other.to_string(),
            });
        }
    }
    let queue = queue_of_arn(&arn);
    if queue == queues.jobs {
        return Ok(Route::Jobs(records));
    }
    if queues.results.as_deref() == Some(queue) {
        return Ok(Route::Results(records));
    }
    Err(RouteError::UnknownQueue {
        queue: queue.to_string(),
        jobs: queues.jobs.clone(),
        results: queues
            .results
            .as_ref()
            .map_or_else(|| "none configured".to_string(), |r| format!("{r:?}")),
    })
}

/// The queue name of an SQS ARN (`arn:aws:sqs:<region>:<account>:<name>`).
fn queue_of_arn(arn: &str) -> &str {
    arn.rsplit(':').next().unwrap_or(arn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn queues() -> QueueNames {
        QueueNames {
            jobs: "jobs-q".into(),
            results: Some("res-q".into()),
        }
    }

    fn record(arn: &str) -> Value {
        json!({
            "messageId": "m-1",
            "receiptHandle": "r-1",
            "body": "{}",
            "attributes": {"ApproximateReceiveCount": "1"},
            "messageAttributes": {},
            "md5OfBody": "x",
            "eventSource": "aws:sqs",
            "eventSourceARN": arn,
            "awsRegion": "us-east-1"
        })
    }

    const JOBS: &str = "arn:aws:sqs:us-east-1:000000000000:jobs-q";
    const RESULTS: &str = "arn:aws:sqs:us-east-1:000000000000:res-q";

    #[test]
    fn batches_go_by_the_queue_at_the_end_of_their_arn() {
        let jobs = route(json!({"Records": [record(JOBS), record(JOBS)]}), &queues());
        assert!(matches!(jobs, Ok(Route::Jobs(r)) if r.len() == 2));
        let results = route(json!({"Records": [record(RESULTS)]}), &queues());
        assert!(matches!(results, Ok(Route::Results(r)) if r.len() == 1));
        // A queue whose name merely contains ours is another queue.
        let other = route(
            json!({"Records": [record("arn:aws:sqs:us-east-1:1:jobs-q-dlq")]}),
            &queues(),
        );
        assert!(
            matches!(other, Err(RouteError::UnknownQueue { .. })),
            "{other:?}"
        );
    }

    #[test]
    fn a_results_batch_without_a_results_queue_is_refused() {
        let queues = QueueNames {
            jobs: "jobs-q".into(),
            results: None,
        };
        let error = route(json!({"Records": [record(RESULTS)]}), &queues).expect_err("refused");
        assert!(error.to_string().contains("none configured"), "{error}");
    }

    #[test]
    fn mixed_empty_or_unsourced_batches_are_refused() {
        let mixed = route(
            json!({"Records": [record(JOBS), record(RESULTS)]}),
            &queues(),
        );
        assert!(
            matches!(mixed, Err(RouteError::MixedSources { .. })),
            "{mixed:?}"
        );
        assert_eq!(
            route(json!({"Records": []}), &queues()).expect_err("empty"),
            RouteError::EmptyBatch
        );
        let mut unsourced = record(JOBS);
        unsourced
            .as_object_mut()
            .expect("an object")
            .remove("eventSourceARN");
        assert_eq!(
            route(json!({"Records": [unsourced]}), &queues()).expect_err("no source"),
            RouteError::NoSource
        );
        // An S3 event sent straight to the function is not an SQS batch of ours.
        let s3 = include_str!("../../tests/fixtures/events/aws_put.json");
        let s3: Value = serde_json::from_str(s3).expect("fixture");
        assert!(route(s3, &queues()).is_err());
    }

    #[test]
    fn scheduled_events_run_the_schedule_and_other_eventbridge_events_do_not() {
        let scheduled = json!({
            "version": "0", "id": "e-1", "detail-type": "Scheduled Event",
            "source": "aws.events", "account": "1", "time": "2026-12-05T20:00:00Z",
            "region": "us-east-1", "resources": ["arn:aws:events:us-east-1:1:rule/orchgpu"],
            "detail": {}
        });
        assert!(matches!(route(scheduled, &queues()), Ok(Route::Schedule)));
        let s3_via_eventbridge = json!({
            "version": "0", "id": "e-2", "detail-type": "Object Created",
            "source": "aws.s3", "detail": {}
        });
        assert!(matches!(
            route(s3_via_eventbridge, &queues()),
            Err(RouteError::NotScheduled { .. })
        ));
    }

    #[test]
    fn anything_else_is_named_in_the_error() {
        for event in [json!(null), json!([1]), json!("x"), json!({"hello": 1})] {
            let error = route(event, &queues()).expect_err("refused");
            assert!(matches!(error, RouteError::Unknown(_)), "{error:?}");
        }
    }
}
