//! Counts the AWS requests the daemon makes, exactly, by service and operation.
//!
//! An SDK interceptor registered on every client (see `aws`) bumps a shared counter once
//! per *attempt*, so retries are counted too. The daemon logs the totals at shutdown and
//! can write them as JSON for the benchmark (`--stats-file`). This module owns no policy:
//! it only counts. The operations the daemon makes are counted on atomics, with no lock
//! on the request path; any other operation goes to a locked map.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use serde::Serialize;

/// Request counts by `"<Service>.<Operation>"` (for example `"S3.GetObject"`), shared by
/// every client built from the same `AwsClients`.
#[derive(Debug, Clone, Default)]
pub struct RequestCounter {
    counts: Arc<Counts>,
}

/// The operations the daemon makes, each with a lock-free count in `Counts::made`.
const COUNTED: [(&str, &str); 17] = [
    ("S3", "GetObject"),
    ("S3", "PutObject"),
    ("S3", "HeadObject"),
    ("S3", "DeleteObject"),
    ("S3", "ListObjectsV2"),
    ("S3", "CreateMultipartUpload"),
    ("S3", "UploadPart"),
    ("S3", "CompleteMultipartUpload"),
    ("S3", "AbortMultipartUpload"),
    ("SQS", "ReceiveMessage"),
    ("SQS", "DeleteMessage"),
    ("SQS", "DeleteMessageBatch"),
    ("SQS", "ChangeMessageVisibility"),
    ("SQS", "ChangeMessageVisibilityBatch"),
    ("SQS", "GetQueueUrl"),
    ("SQS", "GetQueueAttributes"),
    ("SQS", "SendMessage"),
];

#[derive(Debug, Default)]
struct Counts {
    /// By index in `COUNTED`.
    made: [AtomicU64; COUNTED.len()],
    /// Any other operation, by `"<Service>.<Operation>"`.
    other: Mutex<BTreeMap<String, u64>>,
}

impl RequestCounter {
    pub fn new() -> RequestCounter {
        RequestCounter::default()
    }

    /// Counts one attempt of `service`'s `operation`.
    pub fn record(&self, service: &str, operation: &str) {
        crate::telemetry::get().aws_request(service, operation);
        match COUNTED
            .iter()
            .position(|&(s, o)| s == service && o == operation)
        {
            Some(at) => {
                self.counts.made[at].fetch_add(1, Ordering::Relaxed);
            }
            None => {
                *crate::lock(&self.counts.other)
                    .entry(format!("{service}.{operation}"))
                    .or_insert(0) += 1;
            }
        }
    }

    /// The counts so far (operations made at least once), sorted by name.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        let mut counts = crate::lock(&self.counts.other).clone();
        for ((service, operation), made) in COUNTED.iter().zip(&self.counts.made) {
            let made = made.load(Ordering::Relaxed);
            if made > 0 {
                counts.insert(format!("{service}.{operation}"), made);
            }
        }
        counts
    }

    /// The count of one `"<Service>.<Operation>"`, zero if never made.
    pub fn get(&self, name: &str) -> u64 {
        self.snapshot().get(name).copied().unwrap_or(0)
    }

    /// The interceptor to register on an SDK client's config.
    pub fn interceptor(&self) -> CountRequests {
        CountRequests {
            counter: self.clone(),
        }
    }

    /// Logs the totals on one line, one field per operation the daemon uses (field names
    /// are fixed, so they stay a bounded vocabulary); anything else is summed in `other`.
    pub fn log_totals(&self) {
        let counts = self.snapshot();
        let get = |name: &str| counts.get(name).copied().unwrap_or(0);
        let known: u64 = KNOWN_OPERATIONS.iter().map(|name| get(name)).sum();
        let total: u64 = counts.values().sum();
        tracing::info!(
            total,
            s3_get_object = get("S3.GetObject"),
            s3_put_object = get("S3.PutObject"),
            s3_head_object = get("S3.HeadObject"),
            s3_create_multipart_upload = get("S3.CreateMultipartUpload"),
            s3_upload_part = get("S3.UploadPart"),
            s3_complete_multipart_upload = get("S3.CompleteMultipartUpload"),
            s3_abort_multipart_upload = get("S3.AbortMultipartUpload"),
            sqs_receive_message = get("SQS.ReceiveMessage"),
            sqs_delete_message = get("SQS.DeleteMessage"),
            sqs_delete_message_batch = get("SQS.DeleteMessageBatch"),
            sqs_change_message_visibility = get("SQS.ChangeMessageVisibility"),
            sqs_change_message_visibility_batch = get("SQS.ChangeMessageVisibilityBatch"),
            sqs_get_queue_url = get("SQS.GetQueueUrl"),
            sqs_get_queue_attributes = get("SQS.GetQueueAttributes"),
            other = total - known,
            "Requests made."
        );
    }

    /// Writes the totals as JSON (`{"version":1,"requests":{...},"total":n}`) via a
    /// temporary file and a rename, so a reader never sees half a file.
    ///
    /// # Errors
    /// Any I/O error.
    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        #[derive(Serialize)]
        struct StatsFile {
            version: u32,
            requests: BTreeMap<String, u64>,
            total: u64,
        }
        let requests = self.snapshot();
        let stats = StatsFile {
            version: 1,
            total: requests.values().sum(),
            requests,
        };
        let text = serde_json::to_string_pretty(&stats).expect("plain counters always serialise");
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
        let mut temp = tempfile::NamedTempFile::new_in(dir.unwrap_or(Path::new(".")))?;
        std::io::Write::write_all(&mut temp, text.as_bytes())?;
        temp.persist(path).map_err(|e| e.error)?;
        Ok(())
    }
}

/// Operations with their own field in the shutdown log line.
const KNOWN_OPERATIONS: [&str; 14] = [
    "S3.GetObject",
    "S3.PutObject",
    "S3.HeadObject",
    "S3.CreateMultipartUpload",
    "S3.UploadPart",
    "S3.CompleteMultipartUpload",
    "S3.AbortMultipartUpload",
    "SQS.ReceiveMessage",
    "SQS.DeleteMessage",
    "SQS.DeleteMessageBatch",
    "SQS.ChangeMessageVisibility",
    "SQS.ChangeMessageVisibilityBatch",
    "SQS.GetQueueUrl",
    "SQS.GetQueueAttributes",
];

/// The SDK interceptor: one count per attempt, taken just before it is sent.
#[derive(Debug, Clone)]
pub struct CountRequests {
    counter: RequestCounter,
}

impl Intercept for CountRequests {
    fn name(&self) -> &'static str {
        "orchgpu.CountRequests"
    }

    // `read_before_attempt` runs once per attempt, retries included.
    fn read_before_attempt(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        match cfg.load::<Metadata>() {
            Some(metadata) => self.counter.record(metadata.service(), metadata.name()),
            None => self.counter.record("unknown", "unknown"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_service_and_operation() {
        let counter = RequestCounter::new();
        counter.record("S3", "GetObject");
        counter.record("S3", "GetObject");
        counter.record("SQS", "ReceiveMessage");
        let clone = counter.clone();
        clone.record("S3", "PutObject");
        // Not one the daemon makes: counted all the same, on the locked map.
        counter.record("S3", "CreateBucket");
        assert_eq!(counter.get("S3.GetObject"), 2);
        assert_eq!(counter.get("S3.PutObject"), 1);
        assert_eq!(counter.get("SQS.ReceiveMessage"), 1);
        assert_eq!(counter.get("S3.CreateBucket"), 1);
        assert_eq!(counter.get("SQS.DeleteMessage"), 0);
        assert_eq!(counter.snapshot().len(), 4);
    }

    #[test]
    fn every_operation_the_daemon_logs_is_counted_lock_free() {
        for name in KNOWN_OPERATIONS {
            assert!(
                COUNTED.iter().any(|(s, o)| format!("{s}.{o}") == name),
                "{name} is not in COUNTED"
            );
        }
    }

    #[test]
    fn writes_json_atomically() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("stats.json");
        let counter = RequestCounter::new();
        counter.record("S3", "HeadObject");
        counter.write_json(&path).expect("write");
        let value: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        assert_eq!(value["version"], 1);
        assert_eq!(value["requests"]["S3.HeadObject"], 1);
        assert_eq!(value["total"], 1);
    }

    /// The interceptor counts every attempt of a real SDK call, retries included: a
    /// server that answers 500 twice and then 200 must be counted three times.
    #[tokio::test]
    async fn interceptor_counts_each_attempt() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            let mut served = 0;
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = vec![0u8; 16 * 1024];
                let _ = socket.read(&mut buf).await;
                served += 1;
                let reply = if served <= 2 {
                    "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                } else {
                    "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                };
                let _ = socket.write_all(reply.as_bytes()).await;
            }
        });
        let counter = RequestCounter::new();
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .endpoint_url(format!("http://127.0.0.1:{port}"))
            .force_path_style(true)
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                "test", "test", None, None, "test",
            ))
            .retry_config(
                aws_sdk_s3::config::retry::RetryConfig::standard()
                    .with_max_attempts(3)
                    .with_initial_backoff(std::time::Duration::from_millis(1)),
            )
            .interceptor(counter.interceptor())
            .build();
        let s3 = aws_sdk_s3::Client::from_conf(config);
        s3.head_object()
            .bucket("b")
            .key("k")
            .send()
            .await
            .expect("third attempt succeeds");
        assert_eq!(counter.get("S3.HeadObject"), 3);
    }
}
