//! The SQS jobs queue: resolving it, receiving, deleting and changing visibility.
//!
//! Thin typed wrappers over the SDK so that the daemon speaks in messages and receipts,
//! and so that "the receipt is no longer ours" is a distinct outcome from "SQS failed".

use std::time::Duration;

use aws_sdk_sqs::error::SdkError;
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};

use crate::cli::QueueRef;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An SQS receipt handle: proof that we hold a received message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReceiptHandle(pub String);

/// One received message.
#[derive(Debug, Clone)]
pub struct ReceivedMessage {
    pub message_id: String,
    pub receipt: ReceiptHandle,
    pub body: String,
    /// How many times SQS has handed this message out, this time included.
    pub receive_count: u32,
}

/// What went wrong talking to the queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("failed to find queue {queue:?}")]
    Resolve {
        queue: String,
        #[source]
        source: BoxError,
    },
    #[error("failed to receive from {url}")]
    Receive {
        url: String,
        #[source]
        source: BoxError,
    },
    #[error("failed to delete message {message_id}")]
    Delete {
        message_id: String,
        #[source]
        source: BoxError,
    },
    #[error("failed to change visibility of message {message_id}")]
    ChangeVisibility {
        message_id: String,
        #[source]
        source: BoxError,
    },
    /// The receipt expired or was superseded: someone else may hold the message now.
    #[error("receipt of message {message_id} is no longer valid")]
    ReceiptInvalid { message_id: String },
    #[error("failed to read attributes of {url}")]
    Attributes {
        url: String,
        #[source]
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

    /// Deletes several messages in one request (at most ten, as SQS allows per batch;
    /// more are sent in batches of ten).
    ///
    /// # Errors
    /// `QueueError::Delete` naming the first message SQS did not delete.
    pub async fn delete_batch(&self, messages: &[ReceivedMessage]) -> Result<(), QueueError> {
        use aws_sdk_sqs::types::DeleteMessageBatchRequestEntry;
        for chunk in messages.chunks(10) {
            let entries = chunk
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
            let output = self
                .sqs
                .delete_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| QueueError::Delete {
                    message_id: chunk[0].message_id.clone(),
                    source: e.into(),
                })?;
            if let Some(failed) = output.failed.first() {
                let index: usize = failed.id.parse().unwrap_or(0);
                return Err(QueueError::Delete {
                    message_id: chunk
                        .get(index)
                        .map_or_else(String::new, |m| m.message_id.clone()),
                    source: format!(
                        "{}: {}",
                        failed.code,
                        failed.message.as_deref().unwrap_or("")
                    )
                    .into(),
                });
            }
        }
        Ok(())
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
            .visibility_timeout(delay.as_secs().min(crate::cli::MAX_VISIBILITY.as_secs()) as i32)
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
    pub async fn attribute(&self, name: QueueAttributeName) -> Result<Option<String>, QueueError> {
        let output = self
            .sqs
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(name.clone())
            .send()
            .await
            .map_err(|e| QueueError::Attributes {
                url: self.url.clone(),
                source: e.into(),
            })?;
        Ok(output.attributes.and_then(|mut a| a.remove(&name)))
    }
}
