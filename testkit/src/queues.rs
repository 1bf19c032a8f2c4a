//! SQS queues and the S3 bucket notifications that feed them.

use anyhow::{Context, Result, anyhow};
use aws_sdk_s3::types::{
    Event, FilterRule, FilterRuleName, NotificationConfiguration, NotificationConfigurationFilter,
    QueueConfiguration, S3KeyFilter,
};
use aws_sdk_sqs::types::QueueAttributeName;

/// Creates queue `name` (with `redrive`, a JSON redrive policy, if given); returns its URL.
pub async fn create_queue(
    sqs: &aws_sdk_sqs::Client,
    name: &str,
    redrive: Option<String>,
) -> Result<String> {
    let mut request = sqs.create_queue().queue_name(name);
    if let Some(redrive) = redrive {
        request = request.attributes(QueueAttributeName::RedrivePolicy, redrive);
    }
    let output = request
        .send()
        .await
        .with_context(|| format!("create queue {name}"))?;
    output
        .queue_url
        .ok_or_else(|| anyhow!("no URL for queue {name}"))
}

/// The ARN of the queue at `url`.
pub async fn queue_arn(sqs: &aws_sdk_sqs::Client, url: &str) -> Result<String> {
    let output = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await?;
    output
        .attributes
        .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
        .ok_or_else(|| anyhow!("queue {url} has no ARN"))
}

/// Makes `bucket` send its `ObjectCreated` events to the queue `queue_arn` (only for keys
/// with the given prefix and suffix, if any), replacing its notification configuration.
pub async fn notify(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    queue_arn: &str,
    prefix_suffix: Option<(String, String)>,
) -> Result<()> {
    let mut queue = QueueConfiguration::builder()
        .queue_arn(queue_arn)
        .events(Event::from("s3:ObjectCreated:*"));
    if let Some((prefix, suffix)) = prefix_suffix {
        queue = queue.filter(
            NotificationConfigurationFilter::builder()
                .key(
                    S3KeyFilter::builder()
                        .filter_rules(
                            FilterRule::builder()
                                .name(FilterRuleName::Prefix)
                                .value(prefix)
                                .build(),
                        )
                        .filter_rules(
                            FilterRule::builder()
                                .name(FilterRuleName::Suffix)
                                .value(suffix)
                                .build(),
                        )
                        .build(),
                )
                .build(),
        );
    }
    s3.put_bucket_notification_configuration()
        .bucket(bucket)
        .notification_configuration(
            NotificationConfiguration::builder()
                .queue_configurations(queue.build()?)
                .build(),
        )
        .send()
        .await
        .with_context(|| format!("notification on {bucket}"))?;
    Ok(())
}
