//! The SQS jobs queue: resolving it, receiving, deleting and changing visibility.
//!
//! Thin typed wrappers over the SDK so that the daemon speaks in messages and receipts,
//! and so that "the receipt is no longer ours" is a distinct outcome from "SQS failed".

use std::time::Duration;

use aws_sdk_sqs::error::SdkError;
use aws_sdk_sqs::types::{BatchResultErrorEntry, MessageSystemAttributeName, QueueAttributeName};

use crate::aws::error_chain;
use crate::cli::QueueRef;

/// The message attribute that carries how many times a job was already started, on a
/// job the Lambda schedule sent back (a new message starts SQS's receive count afresh).
pub(crate) const ATTEMPTS_ATTRIBUTE: &str = "orchgpu-attempts";

/// SQS caps a message's visibility timeout at 12 hours.
pub(crate) const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 60 * 60);

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An SQS receipt handle: proof that we hold a received message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ReceiptHandle(pub String);

/// One received message.
#[derive(Debug, Clone)]
pub struct ReceivedMessage {
    /// The SQS message id.
    pub message_id: String,
    pub(crate) receipt: ReceiptHandle,
    /// The message body, as sent.
    pub body: String,
    /// How many times SQS has handed this message out, this time included.
    pub receive_count: u32,
}

/// What went wrong talking to the queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("failed to find queue {queue:?}")]
    /// The queue's URL could not be found.
    Resolve {
        /// The queue as given.
        queue: String,
        #[source]
        /// What went wrong underneath.
        source: BoxError,
    },
    #[error("failed to receive from {url}")]
    /// A receive failed.
    Receive {
        /// The queue's URL.
        url: String,
        #[source]
        /// What went wrong underneath.
        source: BoxError,
    },
    #[error("failed to send a message to {url}")]
    /// A send failed.
    Send {
        /// The queue's URL.
        url: String,
        #[source]
        /// What went wrong underneath.
        source: BoxError,
    },
    #[error("failed to delete message {message_id}")]
    /// A delete failed.
    Delete {
        /// The SQS message id.
        message_id: String,
        #[source]
        /// What went wrong underneath.
        source: BoxError,
    },
    #[error("failed to change visibility of message {message_id}")]
    /// A visibility change failed.
    ChangeVisibility {
        /// The SQS message id.
        message_id: String,
        #[source]
        /// What went wrong underneath.
        source: BoxError,
    },
    /// The receipt expired or was superseded: someone else may hold the message now.
    #[error("receipt of message {message_id} is no longer valid")]
    ReceiptInvalid {
        /// The SQS message id.
        message_id: String,
    },
    #[error("failed to read attributes of {url}")]
    /// The queue's attributes could not be read.
    Attributes {
        /// The queue's URL.
        url: String,
        #[source]
        /// What went wrong underneath.
        source: BoxError,
    },
}

/// A resolved SQS queue.
#[derive(Debug, Clone)]
pub struct Queue {
    sqs: aws_sdk_sqs::Client,
    url: String,
}

impl Queue {
    /// Resolves a queue name to its URL (a URL is used as is, after a cheap check that it
    /// answers).
    ///
    /// # Errors
    /// `QueueError::Resolve` when the queue does not exist or AWS cannot be reached.
    pub async fn resolve(sqs: aws_sdk_sqs::Client, queue: &QueueRef) -> Result<Queue, QueueError> {
        let url = match queue {
            QueueRef::Url(url) => url.clone(),
            QueueRef::Name(name) => sqs
                .get_queue_url()
                .queue_name(name)
                .send()
                .await
                .map_err(|e| QueueError::Resolve {
                    queue: name.clone(),
                    source: e.into(),
                })?
                .queue_url
                .ok_or_else(|| QueueError::Resolve {
                    queue: name.clone(),
                    source: "GetQueueUrl returned no URL".into(),
                })?,
        };
        let resolved = Queue { sqs, url };
        if let QueueRef::Url(url) = queue {
            // A URL given by hand is checked here so a typo fails at start-up, not later.
            resolved
                .attribute(QueueAttributeName::QueueArn)
                .await
                .map_err(|e| QueueError::Resolve {
                    queue: url.clone(),
                    source: Box::new(e),
                })?;
        }
        Ok(resolved)
    }

    /// The queue's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Receives up to `max` (1..=10) messages, waiting up to `wait` for the first.
    ///
    /// # Errors
    /// `QueueError::Receive`. Cancel safety: dropping the future may leave messages that
    /// SQS already handed out invisible until `visibility` passes; none is lost.
    pub async fn receive(
        &self,
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        let max = max.clamp(1, 10) as i32;
        let output = self
            .sqs
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max)
            .wait_time_seconds(wait.as_secs() as i32)
            .visibility_timeout(visibility.as_secs() as i32)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .customize()
            // The client's attempt timeout is shorter than a long poll: derive this one
            // from the wait, so an idle receive is never cut off as a failure.
            .config_override(
                aws_sdk_sqs::config::Builder::default().timeout_config(
                    aws_config::timeout::TimeoutConfig::builder()
                        .read_timeout(crate::aws::receive_attempt_timeout(wait))
                        .operation_attempt_timeout(crate::aws::receive_attempt_timeout(wait))
                        .build(),
                ),
            )
            .send()
            .await
            .map_err(|e| QueueError::Receive {
                url: self.url.clone(),
                source: e.into(),
            })?;
        let messages = output
            .messages
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| {
                // A message without a receipt cannot be deleted or returned: skip it, SQS
                // will hand it out again.
                let receipt = m.receipt_handle?;
                let receive_count = m
                    .attributes
                    .as_ref()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1);
                Some(ReceivedMessage {
                    message_id: m.message_id.unwrap_or_default(),
                    receipt: ReceiptHandle(receipt),
                    body: m.body.unwrap_or_default(),
                    receive_count,
                })
            })
            .collect();
        Ok(messages)
    }

    /// Sends `body` as a new message, with the number of times its job was already
    /// started as the message attribute `ATTEMPTS_ATTRIBUTE` (Lambda mode: the schedule
    /// sends a job back, or on to the dead-letter queue).
    ///
    /// # Errors
    /// `QueueError::Send`.
    pub(crate) async fn send(&self, body: &str, attempts: u32) -> Result<(), QueueError> {
        use aws_sdk_sqs::types::MessageAttributeValue;
        let attempts = MessageAttributeValue::builder()
            .data_type("Number")
            .string_value(attempts.to_string())
            .build()
            .expect("data type is set");
        self.sqs
            .send_message()
            .queue_url(&self.url)
            .message_body(body)
            .message_attributes(ATTEMPTS_ATTRIBUTE, attempts)
            .send()
            .await
            .map_err(|e| QueueError::Send {
                url: self.url.clone(),
                source: e.into(),
            })?;
        Ok(())
    }

    /// Deletes a message for good.
    ///
    /// # Errors
    /// `QueueError::Delete`.
    pub async fn delete(&self, message: &ReceivedMessage) -> Result<(), QueueError> {
        self.sqs
            .delete_message()
            .queue_url(&self.url)
            .receipt_handle(&message.receipt.0)
            .send()
            .await
            .map_err(|e| QueueError::Delete {
                message_id: message.message_id.clone(),
                source: e.into(),
            })?;
        Ok(())
    }

    /// Deletes up to ten messages in one `DeleteMessageBatch` request and returns each
    /// message's outcome, in order: `QueueError::Delete` for an entry SQS refused (its
    /// code and message as the cause), or for every entry when the whole request failed.
    ///
    /// Cancel safety: dropping the future may leave some of the messages deleted.
    pub(crate) async fn delete_entries(
        &self,
        messages: &[ReceivedMessage],
    ) -> Vec<Result<(), QueueError>> {
        use aws_sdk_sqs::types::DeleteMessageBatchRequestEntry;
        debug_assert!(messages.len() <= MAX_BATCH_ENTRIES);
        let entries = messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(&m.receipt.0)
                    .build()
                    .expect("id and receipt handle are set")
            })
            .collect();
        let delete_error = |i: usize, source: String| QueueError::Delete {
            message_id: messages[i].message_id.clone(),
            source: source.into(),
        };
        match self
            .sqs
            .delete_message_batch()
            .queue_url(&self.url)
            .set_entries(Some(entries))
            .send()
            .await
        {
            Ok(output) => entry_results(
                messages.len(),
                output.successful.iter().map(|s| s.id.as_str()),
                &output.failed,
                |i, failed| delete_error(i, failed_entry_text(failed)),
            ),
            Err(e) => whole_request_failed(messages.len(), &e, delete_error),
        }
    }

    /// Changes the visibility of up to ten messages in one `ChangeMessageVisibilityBatch`
    /// request and returns each message's outcome, in order, mapped as `set_visibility`
    /// maps the single call's: `QueueError::ReceiptInvalid` when SQS says the receipt is
    /// invalid or the message is not in flight, `QueueError::ChangeVisibility` otherwise
    /// (for every entry when the whole request failed).
    ///
    /// Cancel safety: dropping the future may leave some of the changes made.
    pub(crate) async fn change_visibility_entries(
        &self,
        entries: &[(ReceivedMessage, Duration)],
    ) -> Vec<Result<(), QueueError>> {
        use aws_sdk_sqs::types::ChangeMessageVisibilityBatchRequestEntry;
        debug_assert!(entries.len() <= MAX_BATCH_ENTRIES);
        let request_entries = entries
            .iter()
            .enumerate()
            .map(|(i, (m, delay))| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(&m.receipt.0)
                    .visibility_timeout(visibility_seconds(*delay))
                    .build()
                    .expect("id and receipt handle are set")
            })
            .collect();
        let change_error = |i: usize, source: String| QueueError::ChangeVisibility {
            message_id: entries[i].0.message_id.clone(),
            source: source.into(),
        };
        match self
            .sqs
            .change_message_visibility_batch()
            .queue_url(&self.url)
            .set_entries(Some(request_entries))
            .send()
            .await
        {
            Ok(output) => entry_results(
                entries.len(),
                output.successful.iter().map(|s| s.id.as_str()),
                &output.failed,
                |i, failed| visibility_entry_error(&entries[i].0.message_id, failed),
            ),
            Err(e) => whole_request_failed(entries.len(), &e, change_error),
        }
    }

    /// Makes a held message visible again after `delay` (zero: at once), or keeps it
    /// hidden that much longer.
    ///
    /// # Errors
    /// `QueueError::ReceiptInvalid` when the receipt is no longer ours,
    /// `QueueError::ChangeVisibility` otherwise.
    pub async fn set_visibility(
        &self,
        message: &ReceivedMessage,
        delay: Duration,
    ) -> Result<(), QueueError> {
        let result = self
            .sqs
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(&message.receipt.0)
            .visibility_timeout(visibility_seconds(delay))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(service))
                if service.err().is_receipt_handle_is_invalid()
                    || service.err().is_message_not_inflight() =>
            {
                Err(QueueError::ReceiptInvalid {
                    message_id: message.message_id.clone(),
                })
            }
            Err(e) => Err(QueueError::ChangeVisibility {
                message_id: message.message_id.clone(),
                source: e.into(),
            }),
        }
    }

    /// Reads one queue attribute (`None` when the queue does not have it).
    ///
    /// # Errors
    /// `QueueError::Attributes`.
    pub(crate) async fn attribute(
        &self,
        name: QueueAttributeName,
    ) -> Result<Option<String>, QueueError> {
        Ok(self
            .attributes(std::slice::from_ref(&name))
            .await?
            .remove(&name))
    }

    /// The values of `names` that the queue has.
    async fn attributes(
        &self,
        names: &[QueueAttributeName],
    ) -> Result<std::collections::HashMap<QueueAttributeName, String>, QueueError> {
        let output = self
            .sqs
            .get_queue_attributes()
            .queue_url(&self.url)
            .set_attribute_names(Some(names.to_vec()))
            .send()
            .await
            .map_err(|e| QueueError::Attributes {
                url: self.url.clone(),
                source: e.into(),
            })?;
        Ok(output.attributes.unwrap_or_default())
    }
}

impl Queue {
    /// The approximate message counts: visible, in flight (received, not deleted),
    /// delayed.
    ///
    /// # Errors
    /// `Attributes` when SQS cannot be asked.
    pub(crate) async fn depths(&self) -> Result<(u64, u64, u64), QueueError> {
        use QueueAttributeName::{
            ApproximateNumberOfMessages, ApproximateNumberOfMessagesDelayed,
            ApproximateNumberOfMessagesNotVisible,
        };
        let attributes = self
            .attributes(&[
                ApproximateNumberOfMessages,
                ApproximateNumberOfMessagesNotVisible,
                ApproximateNumberOfMessagesDelayed,
            ])
            .await?;
        let count = |name: &QueueAttributeName| {
            attributes
                .get(name)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok((
            count(&ApproximateNumberOfMessages),
            count(&ApproximateNumberOfMessagesNotVisible),
            count(&ApproximateNumberOfMessagesDelayed),
        ))
    }

    /// The dead-letter queue named by this queue's redrive policy, if it has one.
    ///
    /// # Errors
    /// `Attributes` or `Resolve` when SQS cannot be asked.
    pub(crate) async fn dead_letter_queue(&self) -> Result<Option<Queue>, QueueError> {
        let Some(policy) = self.attribute(QueueAttributeName::RedrivePolicy).await? else {
            return Ok(None);
        };
        let name = serde_json::from_str::<serde_json::Value>(&policy)
            .ok()
            .and_then(|v| v.get("deadLetterTargetArn")?.as_str().map(str::to_owned))
            .and_then(|arn| arn.rsplit(':').next().map(str::to_owned));
        match name {
            Some(name) => Queue::resolve(self.sqs.clone(), &QueueRef::Name(name))
                .await
                .map(Some),
            None => Ok(None),
        }
    }
}

/// Samples the depths of the jobs queue and its dead-letter queue into the telemetry
/// every `every`, until `stop` fires. A failed sample is logged at debug level and
/// skipped: the gauges keep their last values.
pub(crate) async fn sample_depths(
    jobs: Queue,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let dead_letter = match jobs.dead_letter_queue().await {
        Ok(queue) => queue,
        Err(e) => {
            tracing::debug!(error = %error_chain(&e), "Cannot find the dead-letter queue.");
            None
        }
    };
    let queues = [("jobs", Some(jobs)), ("dead_letter", dead_letter)];
    loop {
        for (label, queue) in &queues {
            let Some(queue) = queue else { continue };
            match queue.depths().await {
                Ok((visible, in_flight, delayed)) => {
                    let t = crate::ops::telemetry::get();
                    t.set_queue_messages(label, "visible", visible);
                    t.set_queue_messages(label, "in_flight", in_flight);
                    t.set_queue_messages(label, "delayed", delayed);
                }
                Err(e) => tracing::debug!(error = %error_chain(&e), "Cannot sample queue depths."),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// SQS's limit of entries per batch request.
pub(crate) const MAX_BATCH_ENTRIES: usize = 10;

/// Batch-entry error codes that mean "the receipt is no longer ours", as the single call's
/// `ReceiptHandleIsInvalid` and `MessageNotInflight` errors. (For a message deleted
/// meanwhile SQS and LocalStack answer `InvalidParameterValue`, in both forms of the call;
/// like the single call, that stays a plain failure.)
const RECEIPT_LOST_CODES: [&str; 3] = [
    "ReceiptHandleIsInvalid",
    "AWS.SimpleQueueService.MessageNotInflight",
    "MessageNotInflight",
];

/// A visibility timeout in SQS's unit, capped at its 12-hour limit.
fn visibility_seconds(delay: Duration) -> i32 {
    delay.as_secs().min(MAX_VISIBILITY.as_secs()) as i32
}

/// A failed batch entry's code and message, as an error cause.
fn failed_entry_text(failed: &BatchResultErrorEntry) -> String {
    match &failed.message {
        Some(message) => format!("{}: {message}", failed.code),
        None => failed.code.clone(),
    }
}

/// A failed visibility entry's error, mapped as `Queue::set_visibility` maps the single
/// call's.
fn visibility_entry_error(message_id: &str, failed: &BatchResultErrorEntry) -> QueueError {
    if RECEIPT_LOST_CODES.contains(&failed.code.as_str()) {
        QueueError::ReceiptInvalid {
            message_id: message_id.to_string(),
        }
    } else {
        QueueError::ChangeVisibility {
            message_id: message_id.to_string(),
            source: failed_entry_text(failed).into(),
        }
    }
}

/// Maps a batch response back to its `count` entries, whose ids are their indexes. An
/// entry SQS names in neither list (which it should never do) counts as failed.
fn entry_results<'a>(
    count: usize,
    successful: impl Iterator<Item = &'a str>,
    failed: &[BatchResultErrorEntry],
    error: impl Fn(usize, &BatchResultErrorEntry) -> QueueError,
) -> Vec<Result<(), QueueError>> {
    let mut results: Vec<Option<Result<(), QueueError>>> = (0..count).map(|_| None).collect();
    for id in successful {
        if let Some(slot) = id.parse::<usize>().ok().and_then(|i| results.get_mut(i)) {
            *slot = Some(Ok(()));
        }
    }
    for entry in failed {
        if let Ok(i) = entry.id.parse::<usize>()
            && i < count
        {
            results[i] = Some(Err(error(i, entry)));
        }
    }
    results
        .into_iter()
        .enumerate()
        .map(|(i, result)| {
            result.unwrap_or_else(|| {
                Err(error(
                    i,
                    &BatchResultErrorEntry::builder()
                        .id(i.to_string())
                        .code("NoResult")
                        .message("SQS returned no result for this entry")
                        .sender_fault(false)
                        .build()
                        .expect("id and code are set"),
                ))
            })
        })
        .collect()
}

/// Every entry's error when the whole batch request failed: each carries the cause's text
/// (an error cannot be shared between entries).
fn whole_request_failed(
    count: usize,
    cause: &(dyn std::error::Error + 'static),
    error: impl Fn(usize, String) -> QueueError,
) -> Vec<Result<(), QueueError>> {
    let text = format!("batch request failed: {}", error_chain(cause));
    (0..count).map(|i| Err(error(i, text.clone()))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(id: &str, code: &str, message: Option<&str>) -> BatchResultErrorEntry {
        BatchResultErrorEntry::builder()
            .id(id)
            .code(code)
            .set_message(message.map(str::to_string))
            .sender_fault(false)
            .build()
            .expect("id and code are set")
    }

    fn outcome(result: &Result<(), QueueError>) -> String {
        match result {
            Ok(()) => "ok".to_string(),
            Err(e) => error_chain(e),
        }
    }

    #[test]
    fn batch_outcomes_are_mapped_back_by_entry_id() {
        // As LocalStack answers a ChangeMessageVisibilityBatch with an entry for a deleted
        // message (0) and one with a malformed receipt (3).
        let failures = [
            failed(
                "3",
                "ReceiptHandleIsInvalid",
                Some("The input receipt handle \"garbage\" is not a valid receipt handle."),
            ),
            failed(
                "0",
                "InvalidParameterValueException",
                Some(
                    "Reason: Message does not exist or is not available for visibility timeout change.",
                ),
            ),
        ];
        let results = entry_results(5, ["2", "1", "9", "x"].into_iter(), &failures, |i, f| {
            visibility_entry_error(&format!("m{i}"), f)
        });
        let outcomes: Vec<String> = results.iter().map(outcome).collect();
        assert_eq!(
            outcomes,
            [
                "failed to change visibility of message m0: InvalidParameterValueException: \
                 Reason: Message does not exist or is not available for visibility timeout change.",
                "ok",
                "ok",
                "receipt of message m3 is no longer valid",
                "failed to change visibility of message m4: NoResult: SQS returned no result for this entry",
            ]
        );
    }

    #[test]
    fn not_in_flight_codes_mean_the_receipt_is_lost() {
        for code in [
            "AWS.SimpleQueueService.MessageNotInflight",
            "ReceiptHandleIsInvalid",
        ] {
            assert!(RECEIPT_LOST_CODES.contains(&code), "{code}");
        }
        assert!(!RECEIPT_LOST_CODES.contains(&"InvalidParameterValue"));
    }

    #[test]
    fn a_failed_request_fails_every_entry_with_its_cause() {
        let cause = std::io::Error::other("connection refused");
        let results = whole_request_failed(2, &cause, |i, source| QueueError::Delete {
            message_id: format!("m{i}"),
            source: source.into(),
        });
        let outcomes: Vec<String> = results.iter().map(outcome).collect();
        assert_eq!(
            outcomes,
            [
                "failed to delete message m0: batch request failed: connection refused",
                "failed to delete message m1: batch request failed: connection refused",
            ]
        );
    }

    #[test]
    fn visibility_is_capped_at_twelve_hours() {
        assert_eq!(visibility_seconds(Duration::from_secs(30)), 30);
        assert_eq!(visibility_seconds(Duration::from_secs(100_000)), 43_200);
    }
}
