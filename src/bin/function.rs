//! orchgpu-function: a local stand-in for the SCAR function on AWS Lambda.
//!
//! It consumes the intermediate bucket's ObjectCreated notifications from an SQS queue,
//! downloads each bundle and runs a user script the way SCAR's supervisor does
//! (`INPUT_FILE_PATH`, `TMP_OUTPUT_DIR`, `STORAGE_OBJECT_KEY`), then uploads every file the
//! script left in `TMP_OUTPUT_DIR` to the output `bucket/dir`. A development tool: it
//! talks to LocalStack/moto (or AWS) with the same clients as the daemon.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Semaphore;
use tracing::{Instrument, error, info, info_span, warn};

use orchgpu::aws::{AwsOptions, build_clients, error_chain};
use orchgpu::cli::{BucketDir, QueueRef, parse_bucket_dir};
use orchgpu::event::{Notification, ObjectRef, parse_notification};
use orchgpu::queue::{Queue, ReceivedMessage};
use orchgpu::storage;

/// Deliveries of one bundle before a failing script's event is dropped, as Lambda gives up
/// on an asynchronous invocation after its retries.
const MAX_ATTEMPTS: u32 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "orchgpu-function",
    version,
    about = "Local stand-in for the SCAR function: runs a script on each bundle uploaded to the intermediate bucket."
)]
struct Args {
    /// SQS queue (name or URL) receiving the intermediate bucket's notifications.
    #[arg(long, env = "ORCHGPU_FUNCTION_QUEUE")]
    queue: String,
    /// Output `bucket/dir` for the files the script writes to TMP_OUTPUT_DIR.
    #[arg(long, env = "ORCHGPU_FUNCTION_OUTPUT")]
    output: String,
    /// The script to run for each bundle (run directly, so it needs a shebang and +x).
    #[arg(long, env = "ORCHGPU_FUNCTION_SCRIPT")]
    script: PathBuf,
    /// AWS endpoint URL (LocalStack, moto).
    #[arg(long, env = "ORCHGPU_ENDPOINT_URL")]
    endpoint_url: Option<String>,
    /// AWS region.
    #[arg(long, env = "ORCHGPU_REGION")]
    region: Option<String>,
    /// Bundles processed at once.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// SQS long-poll wait, seconds.
    #[arg(long, default_value_t = 2)]
    wait_time: u64,
    /// Kill a script still running after this many seconds.
    #[arg(long, default_value_t = 900)]
    script_timeout: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ORCHGPU_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal, never in journald or a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    if args.concurrency == 0 || args.wait_time > 20 {
        bail!("--concurrency must be at least 1 and --wait-time at most 20");
    }
    let output = parse_bucket_dir("--output", &args.output)?;
    let script = std::fs::canonicalize(&args.script)
        .with_context(|| format!("script {} not found", args.script.display()))?;
    let clients = build_clients(&AwsOptions {
        endpoint_url: args.endpoint_url.clone(),
        region: args.region.clone(),
    })
    .await;
    let queue_ref = if args.queue.starts_with("http") {
        QueueRef::Url(args.queue.clone())
    } else {
        QueueRef::Name(args.queue.clone())
    };
    let queue = Queue::resolve(clients.sqs.clone(), &queue_ref).await?;
    let function = Arc::new(Function {
        s3: clients.s3,
        queue,
        output,
        script,
        script_timeout: Duration::from_secs(args.script_timeout),
    });

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let slots = Arc::new(Semaphore::new(args.concurrency));
    info!(queue = %function.queue.url(), "Function stand-in ready.");
    loop {
        let permit = slots.clone().acquire_owned().await?;
        let wanted = 1 + slots.available_permits();
        let received = tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            received = function.queue.receive(wanted, Duration::from_secs(args.wait_time), Duration::from_secs(args.script_timeout + 60)) => received,
        };
        let messages = match received {
            Ok(messages) => messages,
            Err(e) => {
                warn!(error = %error_chain(&e), "Receive failed; retrying.");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut first = Some(permit);
        for message in messages {
            let Some(permit) = first
                .take()
                .or_else(|| slots.clone().try_acquire_owned().ok())
            else {
                break;
            };
            let function = function.clone();
            let span = info_span!("bundle", message_id = %message.message_id);
            tokio::spawn(
                async move {
                    function.handle(message).await;
                    drop(permit);
                }
                .instrument(span),
            );
        }
    }
    info!("Function stand-in stopping.");
    Ok(())
}

struct Function {
    s3: aws_sdk_s3::Client,
    queue: Queue,
    output: BucketDir,
    script: PathBuf,
    script_timeout: Duration,
}

impl Function {
    async fn handle(&self, message: ReceivedMessage) {
        let objects = match parse_notification(&message.body) {
            Notification::Objects { objects, .. } => objects,
            Notification::TestEvent
            | Notification::NotAnEvent(_)
            | Notification::Unprocessable(_) => Vec::new(),
        };
        let mut failed = false;
        for object in &objects {
            if let Err(e) = self.invoke(object).await {
                error!(key = %object.key, error = format!("{e:#}"), "Invocation failed.");
                failed = true;
            }
        }
        if failed && message.receive_count < MAX_ATTEMPTS {
            let _ = self
                .queue
                .set_visibility(&message, Duration::from_secs(1))
                .await;
        } else if let Err(e) = self.queue.delete(&message).await {
            warn!(error = %error_chain(&e), "Delete failed.");
        }
    }

    /// One invocation: download, run the script, upload its outputs.
    async fn invoke(&self, object: &ObjectRef) -> anyhow::Result<()> {
        let started = Instant::now();
        let work = tempfile::Builder::new()
            .prefix("orchgpu-function-")
            .tempdir()?;
        let file_name = object.key.rsplit('/').next().unwrap_or("bundle");
        let input = work.path().join(if file_name.is_empty() {
            "bundle"
        } else {
            file_name
        });
        let output_dir = work.path().join("output");
        tokio::fs::create_dir(&output_dir).await?;
        if storage::download_to_file(&self.s3, &object.bucket, &object.key, &input)
            .await?
            .is_none()
        {
            warn!(key = %object.key, "Bundle is gone; nothing to do.");
            return Ok(());
        }
        self.run_script(&input, &output_dir, &object.key).await?;
        let uploaded = self.upload_outputs(&output_dir).await?;
        info!(
            key = %object.key,
            uploaded,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "Invocation finished."
        );
        Ok(())
    }

    async fn run_script(&self, input: &Path, output_dir: &Path, key: &str) -> anyhow::Result<()> {
        let mut command = tokio::process::Command::new(&self.script);
        command
            .env("INPUT_FILE_PATH", input)
            .env("TMP_OUTPUT_DIR", output_dir)
            .env("STORAGE_OBJECT_KEY", key)
            .current_dir(output_dir.parent().unwrap_or(output_dir))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let run = command.output();
        let output = tokio::time::timeout(self.script_timeout, run)
            .await
            .with_context(|| format!("script timed out after {:?}", self.script_timeout))?
            .with_context(|| format!("cannot run {}", self.script.display()))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        for line in stdout.lines().chain(stderr.lines()) {
            info!(line, "Script output.");
        }
        if !output.status.success() {
            bail!("script exited with {}", output.status);
        }
        Ok(())
    }

    async fn upload_outputs(&self, output_dir: &Path) -> anyhow::Result<usize> {
        let mut entries = tokio::fs::read_dir(output_dir).await?;
        let mut uploaded = 0;
        while let Some(entry) = entries.next_entry().await? {
            if !entry.file_type().await?.is_file() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let key = self.output.key_for(&name);
            storage::upload_file(
                &self.s3,
                &entry.path(),
                &self.output.bucket,
                &key,
                content_type(&name),
            )
            .await?;
            uploaded += 1;
        }
        Ok(uploaded)
    }
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit('.').next() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("txt" | "tsv" | "csv") => "text/plain",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}
