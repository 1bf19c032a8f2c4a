//! Lambda without Docker: a Lambda Runtime API of the tests' own ([`RuntimeApi`]) that the
//! real `orchgpu-lambda` binary polls (`AWS_LAMBDA_RUNTIME_API`), and a player of the
//! event source mapping ([`Mapping`]): receive a batch from a queue, build the SQS event
//! Lambda would, invoke, delete what succeeded, leave the failures to come back.
//!
//! The Runtime API serves the four routes a runtime uses (`/2018-06-01/runtime/invocation/
//! next`, `.../{id}/response`, `.../{id}/error`, `/runtime/init/error`) over plain HTTP/1.1
//! with keep-alive, one invocation at a time per function process, as Lambda does. What
//! it does not do: freeze the sandbox between invocations, or kill it at the deadline
//! (the tests kill processes themselves where that matters).

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};

use crate::stack::Stack;

/// How an invocation ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The handler's response (`.../response`).
    Response(Value),
    /// The handler's error (`.../error`, or `init/error`).
    Error(Value),
    /// No answer within the timeout: the process died or hung.
    NoAnswer,
}

struct Pending {
    request_id: String,
    deadline_ms: u64,
    event: Value,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<VecDeque<Pending>>,
    queued: Notify,
    answers: Mutex<HashMap<String, oneshot::Sender<Outcome>>>,
    init_errors: Mutex<Vec<Value>>,
}

/// A Lambda Runtime API for one function process.
pub struct RuntimeApi {
    /// `host:port`, the value of `AWS_LAMBDA_RUNTIME_API`.
    pub address: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    next_id: std::sync::atomic::AtomicU64,
}

impl RuntimeApi {
    /// Listens on a free loopback port.
    pub async fn start() -> Result<RuntimeApi> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn({
            let shared = shared.clone();
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(serve(stream, shared.clone()));
                }
            }
        });
        Ok(RuntimeApi {
            address,
            shared,
            task,
            next_id: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// Invokes the function with `event` and a deadline `timeout` from now; waits for its
    /// answer until then (and two seconds more), or until `alive` says the process is gone.
    pub async fn invoke(
        &self,
        event: Value,
        timeout: Duration,
        alive: &mut (dyn FnMut() -> bool + Send),
    ) -> Outcome {
        let n = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let request_id = format!("req-{n:04}");
        let (tx, mut rx) = oneshot::channel();
        lock(&self.shared.answers).insert(request_id.clone(), tx);
        lock(&self.shared.queue).push_back(Pending {
            request_id: request_id.clone(),
            deadline_ms: unix_ms() + timeout.as_millis() as u64,
            event,
        });
        self.shared.queued.notify_waiters();
        self.shared.queued.notify_one();
        let give_up = Instant::now() + timeout + Duration::from_secs(2);
        loop {
            match tokio::time::timeout(Duration::from_millis(100), &mut rx).await {
                Ok(Ok(outcome)) => return outcome,
                Ok(Err(_)) => return Outcome::NoAnswer,
                Err(_) => {}
            }
            if let Some(error) = lock(&self.shared.init_errors).pop() {
                return Outcome::Error(error);
            }
            if Instant::now() >= give_up || !alive() {
                lock(&self.shared.answers).remove(&request_id);
                lock(&self.shared.queue).retain(|p| p.request_id != request_id);
                return Outcome::NoAnswer;
            }
        }
    }
}

impl Drop for RuntimeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One connection: requests one after the other (keep-alive).
async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).await.unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        let reply = answer(&method, &path, &body, &shared).await;
        if write.write_all(&reply).await.is_err() {
            return;
        }
    }
}

const PREFIX: &str = "/2018-06-01/runtime";

async fn answer(method: &str, path: &str, body: &[u8], shared: &Shared) -> Vec<u8> {
    let parsed = || serde_json::from_slice::<Value>(body).unwrap_or(Value::Null);
    if method == "GET" && path == format!("{PREFIX}/invocation/next") {
        let pending = loop {
            let queued = shared.queued.notified();
            tokio::pin!(queued);
            queued.as_mut().enable();
            if let Some(pending) = lock(&shared.queue).pop_front() {
                break pending;
            }
            queued.await;
        };
        let payload = pending.event.to_string();
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Lambda-Runtime-Aws-Request-Id: {}\r\nLambda-Runtime-Deadline-Ms: {}\r\n\
             Lambda-Runtime-Invoked-Function-Arn: arn:aws:lambda:us-east-1:000000000000:function:orchgpu\r\n\
             Lambda-Runtime-Trace-Id: Root=1-00000000-000000000000000000000000\r\n\r\n",
            payload.len(),
            pending.request_id,
            pending.deadline_ms
        );
        return [head.into_bytes(), payload.into_bytes()].concat();
    }
    if method == "POST" && path == format!("{PREFIX}/init/error") {
        lock(&shared.init_errors).push(parsed());
        return accepted();
    }
    if method == "POST"
        && let Some(rest) = path.strip_prefix(&format!("{PREFIX}/invocation/"))
        && let Some((id, kind)) = rest.split_once('/')
    {
        let outcome = match kind {
            "response" => Outcome::Response(parsed()),
            "error" => Outcome::Error(parsed()),
            _ => return not_found(),
        };
        if let Some(tx) = lock(&shared.answers).remove(id) {
            let _ = tx.send(outcome);
        }
        return accepted();
    }
    not_found()
}

fn accepted() -> Vec<u8> {
    b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{\"status\":\"OK\"}\n"
        .to_vec()
}

fn not_found() -> Vec<u8> {
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec()
}

/// The environment of `orchgpu-lambda` for a stack: the daemon's `ORCHGPU_*` variables
/// (as `Stack::base_daemon_args` names them) and the Lambda runtime's own.
pub fn lambda_env(
    stack: &Stack,
    ssgm_port: u16,
    ssgm_bin: &Path,
    api: &RuntimeApi,
    sandbox: &str,
) -> Vec<(String, String)> {
    let dir = |what: &str| {
        stack
            .logs
            .path()
            .join(format!("sandbox-{sandbox}/{what}"))
            .display()
            .to_string()
    };
    [
        ("AWS_LAMBDA_RUNTIME_API", api.address.clone()),
        ("AWS_LAMBDA_FUNCTION_NAME", "orchgpu".to_string()),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512".to_string()),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".to_string()),
        ("ORCHGPU_QUEUE", stack.jobs_queue.clone()),
        ("ORCHGPU_SCHEDULER_HOST", "127.0.0.1".to_string()),
        ("ORCHGPU_SCHEDULER_PORT", ssgm_port.to_string()),
        ("ORCHGPU_SSGM", ssgm_bin.display().to_string()),
        (
            "ORCHGPU_INTERMEDIATE",
            format!("{}/{}", stack.work_bucket, stack.work_dir),
        ),
        (
            "ORCHGPU_OUTPUT",
            format!("{}/{}", stack.output_bucket, stack.output_dir),
        ),
        ("ORCHGPU_SSGM_TIMEOUT", "3".to_string()),
        ("ORCHGPU_RESULT_DEADLINE", "60".to_string()),
        ("ORCHGPU_STATE_DIR", dir("state")),
        ("ORCHGPU_WORK_DIR", dir("work")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

impl Stack {
    /// Starts `bin` (`orchgpu-lambda`) as a sandbox polling `api`, with `env` (see
    /// [`lambda_env`]) and `extra` on top; returns its process index.
    pub fn start_lambda(
        &mut self,
        bin: &Path,
        env: &[(String, String)],
        extra: &[(&str, &str)],
    ) -> Result<usize> {
        let mut command = Command::new(bin);
        command.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        command.envs(extra.iter().copied());
        // Only what the tests name: a developer's own ORCHGPU_* must not leak in.
        for (name, _) in std::env::vars() {
            if name.starts_with("ORCHGPU_")
                && !env.iter().any(|(k, _)| *k == name)
                && !extra.iter().any(|(k, _)| *k == name)
                && name != "ORCHGPU_LOG"
            {
                command.env_remove(&name);
            }
        }
        let name = format!("lambda-{}", self.processes.len());
        self.spawn(&name, command)
    }
}

/// One SQS event source mapping, played by the test: receive, invoke, delete.
pub struct Mapping {
    pub queue_url: String,
    pub queue_arn: String,
    pub batch_size: i32,
    /// The visibility timeout of received messages (the function's timeout, on AWS).
    pub visibility: Duration,
}

/// What one poll did.
#[derive(Debug, Clone)]
pub struct Poll {
    /// Message ids received.
    pub received: Vec<String>,
    /// Message ids left for SQS to hand out again.
    pub failed: Vec<String>,
    pub outcome: Outcome,
}

impl Mapping {
    /// A mapping on `queue_url`.
    pub async fn new(
        sqs: &aws_sdk_sqs::Client,
        queue_url: &str,
        batch_size: i32,
        visibility: Duration,
    ) -> Result<Mapping> {
        Ok(Mapping {
            queue_url: queue_url.to_string(),
            queue_arn: crate::queues::queue_arn(sqs, queue_url).await?,
            batch_size,
            visibility,
        })
    }

    /// Receives one batch (waiting up to a second); `None` when the queue gave nothing.
    pub async fn receive(
        &self,
        sqs: &aws_sdk_sqs::Client,
    ) -> Result<Option<(Value, Vec<(String, String)>)>> {
        let output = sqs
            .receive_message()
            .queue_url(&self.queue_url)
            .max_number_of_messages(self.batch_size)
            .wait_time_seconds(1)
            .visibility_timeout(self.visibility.as_secs() as i32)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send()
            .await
            .context("receive for the mapping")?;
        let messages = output.messages.unwrap_or_default();
        if messages.is_empty() {
            return Ok(None);
        }
        let mut receipts = Vec::new();
        let mut records = Vec::new();
        for m in messages {
            let id = m.message_id.clone().unwrap_or_default();
            let receipt = m.receipt_handle.clone().unwrap_or_default();
            receipts.push((id.clone(), receipt.clone()));
            let attributes: serde_json::Map<String, Value> = m
                .attributes
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k.as_str().to_string(), Value::String(v)))
                .collect();
            let message_attributes: serde_json::Map<String, Value> = m
                .message_attributes
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| {
                    (
                        k,
                        json!({
                            "stringValue": v.string_value,
                            "stringListValues": [],
                            "binaryListValues": [],
                            "dataType": v.data_type,
                        }),
                    )
                })
                .collect();
            records.push(json!({
                "messageId": id,
                "receiptHandle": receipt,
                "body": m.body.unwrap_or_default(),
                "attributes": attributes,
                "messageAttributes": message_attributes,
                "md5OfBody": m.md5_of_body.unwrap_or_default(),
                "eventSource": "aws:sqs",
                "eventSourceARN": self.queue_arn,
                "awsRegion": "us-east-1",
            }));
        }
        Ok(Some((json!({ "Records": records }), receipts)))
    }

    /// Deletes what the outcome says succeeded: everything on a response without
    /// failures, everything but the listed `batchItemFailures` otherwise, nothing on an
    /// error or no answer. Returns the ids left to come back.
    pub async fn settle(
        &self,
        sqs: &aws_sdk_sqs::Client,
        receipts: &[(String, String)],
        outcome: &Outcome,
    ) -> Result<Vec<String>> {
        let failed: Vec<String> = match outcome {
            Outcome::Response(response) => response["batchItemFailures"]
                .as_array()
                .map(|list| {
                    list.iter()
                        .filter_map(|f| f["itemIdentifier"].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            Outcome::Error(_) | Outcome::NoAnswer => {
                receipts.iter().map(|(id, _)| id.clone()).collect()
            }
        };
        for (id, receipt) in receipts {
            if failed.contains(id) {
                continue;
            }
            sqs.delete_message()
                .queue_url(&self.queue_url)
                .receipt_handle(receipt)
                .send()
                .await
                .with_context(|| format!("delete {id}"))?;
        }
        Ok(failed)
    }

    /// One poll: receive a batch, invoke `api` with it (deadline `timeout`), settle.
    /// `None` when the queue gave nothing.
    pub async fn poll(
        &self,
        sqs: &aws_sdk_sqs::Client,
        api: &RuntimeApi,
        timeout: Duration,
        alive: &mut (dyn FnMut() -> bool + Send),
    ) -> Result<Option<Poll>> {
        let Some((event, receipts)) = self.receive(sqs).await? else {
            return Ok(None);
        };
        let outcome = api.invoke(event, timeout, alive).await;
        let failed = self.settle(sqs, &receipts, &outcome).await?;
        Ok(Some(Poll {
            received: receipts.into_iter().map(|(id, _)| id).collect(),
            failed,
            outcome,
        }))
    }
}

/// The event EventBridge sends for a scheduled rule.
pub fn scheduled_event() -> Value {
    json!({
        "version": "0",
        "id": "00000000-0000-0000-0000-000000000000",
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "000000000000",
        "time": "2026-12-05T20:00:00Z",
        "region": "us-east-1",
        "resources": ["arn:aws:events:us-east-1:000000000000:rule/orchgpu-schedule"],
        "detail": {}
    })
}

/// A queue's `maxReceiveCount`-free attribute reader for tests: the approximate number of
/// visible messages.
pub async fn visible_messages(sqs: &aws_sdk_sqs::Client, url: &str) -> Result<u64> {
    let output = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .send()
        .await?;
    output
        .attributes
        .and_then(|a| {
            a.get(&QueueAttributeName::ApproximateNumberOfMessages)
                .cloned()
        })
        .ok_or_else(|| anyhow!("no count"))?
        .parse()
        .map_err(|e| anyhow!("bad count: {e}"))
}

/// Fails unless `outcome` is a response.
pub fn response(outcome: &Outcome) -> Result<&Value> {
    match outcome {
        Outcome::Response(value) => Ok(value),
        other => bail!("the invocation did not answer: {other:?}"),
    }
}
