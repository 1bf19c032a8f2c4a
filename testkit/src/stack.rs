//! One test's AWS resources ([`Stack`]): its buckets, queues and notifications on the
//! emulator, and what a test puts in and reads back from them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_sqs::types::QueueAttributeName;
use serde_json::Value;

use crate::kit::{Kit, clients_at};
use crate::process::Process;
use crate::queues::{create_queue, notify, queue_arn};
use crate::wait::wait_for;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// One test's AWS resources.
pub struct Stack {
    pub s3: aws_sdk_s3::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub input_bucket: String,
    pub work_bucket: String,
    pub work_dir: String,
    pub output_bucket: String,
    pub output_dir: String,
    pub jobs_queue: String,
    pub jobs_url: String,
    pub dlq_url: String,
    pub function_queue: String,
    pub function_url: String,
    pub logs: tempfile::TempDir,
    pub(crate) kit: Kit,
    pub(crate) processes: Vec<Process>,
    pub(crate) print_logs: bool,
}

impl Stack {
    /// Creates buckets, queues (jobs, its dead-letter queue, function) and the
    /// notifications input → jobs and intermediate → function, on `kit`'s emulator. The
    /// jobs queue sends a message to the dead-letter queue after `max_receive_count`
    /// receives; with `None` it never does (the bench's setting).
    pub async fn create(kit: &Kit, name: &str, max_receive_count: Option<u32>) -> Result<Stack> {
        let (s3, sqs) = clients_at(&kit.endpoint).await;
        // The pid and a counter are unique within a run; the clock tells apart runs on a
        // long-lived emulator where a pid comes round again (nextest runs each test in a
        // process of its own), whose buckets would still hold the old run's objects.
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64 % 0x100_0000)
            .unwrap_or(0);
        let unique = format!(
            "{name}-{}-{}-{clock:06x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let input_bucket = format!("in-{unique}");
        let work_bucket = format!("work-{unique}");
        let output_bucket = format!("out-{unique}");
        for bucket in [&input_bucket, &work_bucket, &output_bucket] {
            s3.create_bucket()
                .bucket(bucket)
                .send()
                .await
                .with_context(|| {
                    format!(
                        "cannot create bucket {bucket} at {}: is the emulator running? \
                         (dev/test.sh starts one; or set ORCHGPU_TEST_ENDPOINT)",
                        kit.endpoint
                    )
                })?;
        }
        let dlq_url = create_queue(&sqs, &format!("dlq-{unique}"), None).await?;
        let dlq_arn = queue_arn(&sqs, &dlq_url).await?;
        let redrive = max_receive_count.map(|count| {
            format!(r#"{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"{count}"}}"#)
        });
        let jobs_queue = format!("jobs-{unique}");
        let jobs_url = create_queue(&sqs, &jobs_queue, redrive).await?;
        let function_queue = format!("fn-{unique}");
        let function_url = create_queue(&sqs, &function_queue, None).await?;

        let work_dir = "bundles/v1".to_string();
        notify(&s3, &input_bucket, &queue_arn(&sqs, &jobs_url).await?, None).await?;
        notify(
            &s3,
            &work_bucket,
            &queue_arn(&sqs, &function_url).await?,
            Some((format!("{work_dir}/"), ".tar.gz".to_string())),
        )
        .await?;

        Ok(Stack {
            s3,
            sqs,
            input_bucket,
            work_bucket,
            work_dir,
            output_bucket,
            output_dir: "results".to_string(),
            jobs_queue,
            jobs_url,
            dlq_url,
            function_queue,
            function_url,
            logs: tempfile::tempdir()?,
            kit: kit.clone(),
            processes: Vec::new(),
            print_logs: true,
        })
    }

    /// Whether the processes' logs are printed when the stack is dropped (they are by
    /// default: a test's output shows only when it fails).
    pub fn set_print_logs(&mut self, print: bool) {
        self.print_logs = print;
    }

    /// A results queue (`res-<jobs queue>`) that the output bucket notifies of each
    /// result (`<output dir>/….png`), for `--results-queue`; returns its name and URL.
    pub async fn add_results_queue(&self) -> Result<(String, String)> {
        let name = format!("res-{}", self.jobs_queue);
        let url = create_queue(&self.sqs, &name, None).await?;
        notify(
            &self.s3,
            &self.output_bucket,
            &queue_arn(&self.sqs, &url).await?,
            Some((format!("{}/", self.output_dir), ".png".to_string())),
        )
        .await?;
        Ok((name, url))
    }

    /// Uploads `body` to the input bucket as `key`.
    pub async fn upload(&self, key: &str, body: &[u8]) -> Result<()> {
        self.s3
            .put_object()
            .bucket(&self.input_bucket)
            .key(key)
            .body(ByteStream::from(body.to_vec()))
            .send()
            .await
            .with_context(|| format!("upload {key}"))?;
        Ok(())
    }

    /// Sends a raw message body to the jobs queue.
    pub async fn send_raw(&self, body: &str) -> Result<()> {
        self.sqs
            .send_message()
            .queue_url(&self.jobs_url)
            .message_body(body)
            .send()
            .await?;
        Ok(())
    }

    /// Visible + in flight + delayed messages on a queue.
    pub async fn queue_depth(&self, url: &str) -> Result<u64> {
        let output = self
            .sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::All)
            .send()
            .await?;
        let attributes = output.attributes.unwrap_or_default();
        let mut total = 0;
        for name in [
            QueueAttributeName::ApproximateNumberOfMessages,
            QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
            QueueAttributeName::ApproximateNumberOfMessagesDelayed,
        ] {
            total += attributes
                .get(&name)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
        Ok(total)
    }

    /// Every object key under the output dir.
    pub async fn output_keys(&self) -> Result<Vec<String>> {
        self.keys(&self.output_bucket, &format!("{}/", self.output_dir))
            .await
    }

    /// The whole body of `bucket/key`.
    pub async fn get(&self, bucket: &str, key: &str) -> Result<Vec<u8>> {
        let output = self.s3.get_object().bucket(bucket).key(key).send().await?;
        Ok(output.body.collect().await?.into_bytes().to_vec())
    }

    /// Results by source key: the test function writes `<id>.png` (a copy of the input)
    /// and `<id>.json` (the bundle's manifest), so each result can be traced to its input.
    pub async fn results_by_source_key(&self) -> Result<HashMap<String, Vec<Vec<u8>>>> {
        let mut results: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
        for key in self.output_keys().await? {
            let Some(stem) = key.strip_suffix(".json") else {
                continue;
            };
            let manifest: Value =
                serde_json::from_slice(&self.get(&self.output_bucket, &key).await?)?;
            let source = manifest["source"]["key"]
                .as_str()
                .ok_or_else(|| anyhow!("manifest {key} has no source key"))?
                .to_string();
            let png = format!("{stem}.png");
            let body = self.get(&self.output_bucket, &png).await?;
            results.entry(source).or_default().push(body);
        }
        Ok(results)
    }

    /// Waits until `count` results (`.png`) are in the output dir.
    pub async fn wait_for_results(&self, count: usize, timeout: Duration) -> Result<()> {
        wait_for(&format!("{count} results"), timeout, || async {
            let pngs = self
                .output_keys()
                .await?
                .iter()
                .filter(|k| k.ends_with(".png"))
                .count();
            Ok((pngs >= count).then_some(()))
        })
        .await
    }

    /// Waits until the jobs queue holds no message at all (visible, in flight or delayed).
    pub async fn wait_for_empty_queues(&self, timeout: Duration) -> Result<()> {
        wait_for("empty jobs queue", timeout, || async {
            Ok((self.queue_depth(&self.jobs_url).await? == 0).then_some(()))
        })
        .await
    }

    /// The notification S3 would send again for an object already uploaded: an
    /// ObjectCreated event with the object's real ETag, so it names the same job.
    pub async fn duplicate_notification(&self, key: &str) -> Result<String> {
        let head = self
            .s3
            .head_object()
            .bucket(&self.input_bucket)
            .key(key)
            .send()
            .await?;
        let etag = head.e_tag().unwrap_or_default().trim_matches('"');
        Ok(self.object_created_event(key, etag))
    }

    /// An S3 ObjectCreated notification body for an object of the input bucket, as S3
    /// would send it (key form-encoded), to stage duplicate or stale deliveries.
    pub fn object_created_event(&self, key: &str, etag: &str) -> String {
        serde_json::json!({"Records": [{
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "eventName": "ObjectCreated:Put",
            "s3": {
                "bucket": {"name": self.input_bucket},
                "object": {"key": key.replace('%', "%25").replace('+', "%2B").replace(' ', "+"), "eTag": etag}
            }
        }]})
        .to_string()
    }

    /// Every key under `prefix` in `bucket`.
    pub async fn keys(&self, bucket: &str, prefix: &str) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        let mut pages = self
            .s3
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            for object in page?.contents.unwrap_or_default() {
                keys.extend(object.key);
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Uploads to the input bucket; returns the object's ETag (unquoted).
    pub async fn upload_etag(&self, key: &str, body: Vec<u8>) -> Result<String> {
        let output = self
            .s3
            .put_object()
            .bucket(&self.input_bucket)
            .key(key)
            .body(ByteStream::from(body))
            .send()
            .await
            .with_context(|| format!("upload {key}"))?;
        Ok(output
            .e_tag()
            .unwrap_or_default()
            .trim_matches('"')
            .to_string())
    }
}
