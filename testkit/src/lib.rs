//! orchgpu's test kit, shared by the integration tests (`tests/integration/kit.rs`) and
//! the bench (`bench/bench.rs`): a per-test AWS stack on the emulator (buckets, queues,
//! notifications), the real mock SSGM server, the real function stand-in and the real
//! daemon, each as a process whose logs are printed when the stack is dropped, and
//! readers for what they leave (JSON logs, `mock-ssgm -stats`).
//!
//! The kit knows no build: the caller passes the emulator's URL and the binaries' paths in
//! a [`Kit`] (the tests from `CARGO_BIN_EXE_*`, the bench from `--bin-dir`). The tests'
//! emulator URL comes from `ORCHGPU_TEST_ENDPOINT` (default LocalStack on 127.0.0.1:4566);
//! `dev/test.sh` starts one. Every stack has its own bucket and queue names, so tests run
//! in parallel and never need an emulator reset.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    Event, FilterRule, FilterRuleName, NotificationConfiguration, NotificationConfigurationFilter,
    QueueConfiguration, S3KeyFilter,
};
use aws_sdk_sqs::types::QueueAttributeName;
use serde_json::Value;

pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:4566";

/// The emulator the tests use: `ORCHGPU_TEST_ENDPOINT`, or LocalStack's default port.
pub fn endpoint() -> String {
    std::env::var("ORCHGPU_TEST_ENDPOINT").unwrap_or_else(|_| DEFAULT_ENDPOINT.to_string())
}

/// The binaries under test, by path: the caller knows where its build put them (the
/// integration tests from `CARGO_BIN_EXE_*`, the bench from `--bin-dir`).
#[derive(Clone, Debug)]
pub struct Bins {
    pub orchgpu: PathBuf,
    pub mock_ssgm: PathBuf,
    pub function: PathBuf,
}

impl Bins {
    /// The three binaries as a build leaves them in one directory.
    pub fn in_dir(dir: &Path) -> Bins {
        Bins {
            orchgpu: dir.join("orchgpu"),
            mock_ssgm: dir.join("mock-ssgm"),
            function: dir.join("orchgpu-function"),
        }
    }
}

/// What every stack needs from its caller: the emulator, the binaries and the checkout
/// (for the function scripts).
#[derive(Clone, Debug)]
pub struct Kit {
    pub endpoint: String,
    pub bins: Bins,
    pub repo: PathBuf,
}

impl Kit {
    /// A file of the checkout.
    pub fn repo_path(&self, relative: &str) -> PathBuf {
        self.repo.join(relative)
    }
}

/// SDK clients for the emulator at `endpoint()`, with its dummy credentials.
pub async fn clients() -> (aws_sdk_s3::Client, aws_sdk_sqs::Client) {
    clients_at(&endpoint()).await
}

/// SDK clients for the emulator at `endpoint`, with its dummy credentials.
pub async fn clients_at(endpoint: &str) -> (aws_sdk_s3::Client, aws_sdk_sqs::Client) {
    let shared = emulator_config_at(endpoint).await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(true)
            .build(),
    );
    let sqs = aws_sdk_sqs::Client::new(&shared);
    (s3, sqs)
}

/// The shared SDK configuration for the emulator at `endpoint()`: its endpoint, region
/// and dummy credentials.
pub async fn emulator_config() -> aws_config::SdkConfig {
    emulator_config_at(&endpoint()).await
}

/// The shared SDK configuration for the emulator at `endpoint`.
pub async fn emulator_config_at(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            "test",
            "test",
            None,
            None,
            "orchgpu-tests",
        ))
        .load()
        .await
}

/// Environment for every spawned process: the emulator and its dummy credentials, and a
/// log filter unless the caller chose one.
fn aws_env(command: &mut Command, endpoint: &str) {
    let has_filter = command.get_envs().any(|(name, _)| name == "ORCHGPU_LOG");
    command
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("ORCHGPU_ENDPOINT_URL", endpoint)
        .env_remove("AWS_PROFILE");
    if !has_filter {
        command.env(
            "ORCHGPU_LOG",
            "info,aws_config=warn,aws_smithy_runtime=warn",
        );
    }
}

/// Polls `check` every 200 ms until it returns `Some`, or fails after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

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
    kit: Kit,
    processes: Vec<Process>,
    print_logs: bool,
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

    pub async fn wait_for_empty_queues(&self, timeout: Duration) -> Result<()> {
        wait_for("empty jobs queue", timeout, || async {
            Ok((self.queue_depth(&self.jobs_url).await? == 0).then_some(()))
        })
        .await
    }

    /// Where the process called `name` writes its stdout and stderr.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.logs.path().join(format!("{name}.log"))
    }

    /// The temporary directory of this stack's processes (their `TMPDIR`), inside
    /// [`Self::logs`]: what a killed process or script leaves there goes with the stack.
    pub fn tmp_dir(&self) -> PathBuf {
        self.logs.path().join("tmp")
    }

    /// Starts `command` with the emulator's environment and the stack's `TMPDIR` (unless
    /// the caller set one), its output to [`Self::log_path`]`(name)`; returns its process
    /// index.
    pub fn spawn(&mut self, name: &str, mut command: Command) -> Result<usize> {
        let log = File::create(self.log_path(name))?;
        aws_env(&mut command, &self.kit.endpoint);
        if !command.get_envs().any(|(name, _)| name == "TMPDIR") {
            let tmp_dir = self.tmp_dir();
            std::fs::create_dir_all(&tmp_dir)?;
            command.env("TMPDIR", tmp_dir);
        }
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let description = format!("{command:?}");
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {description}"))?;
        self.processes.push(Process {
            name: name.to_string(),
            description,
            child: Some(child),
        });
        Ok(self.processes.len() - 1)
    }

    /// Starts the function stand-in with a test script from tests/fixtures/function.
    pub fn start_function(&mut self, script: &str) -> Result<usize> {
        self.start_function_with(script, &[])
    }

    /// Starts the function stand-in with extra environment for its script.
    pub fn start_function_with(&mut self, script: &str, env: &[(&str, &str)]) -> Result<usize> {
        let script = self
            .kit
            .repo_path(&format!("tests/fixtures/function/{script}"));
        let mut command =
            self.function_command(&script, &["--wait-time", "1", "--concurrency", "8"]);
        command.envs(env.iter().copied());
        let name = format!("function-{}", self.processes.len());
        self.spawn(&name, command)
    }

    /// The function stand-in's command line for this stack, running `script` with
    /// `options` (`--wait-time`, `--concurrency`: the stand-in takes each once).
    pub fn function_command(&self, script: &Path, options: &[&str]) -> Command {
        let mut command = Command::new(&self.kit.bins.function);
        command
            .arg("--queue")
            .arg(&self.function_queue)
            .arg("--output")
            .arg(format!("{}/{}", self.output_bucket, self.output_dir))
            .arg("--script")
            .arg(script)
            .args(options);
        command
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

    /// How many times the function stand-in finished an invocation, by bundle key, over
    /// every function process of this test.
    pub fn invocations(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for (index, process) in self.processes.iter().enumerate() {
            if !process.name.starts_with("function") {
                continue;
            }
            for line in self.log(index).lines() {
                if !line.contains("Invocation finished.") {
                    continue;
                }
                if let Some(key) = line
                    .split_whitespace()
                    .find_map(|field| field.strip_prefix("key="))
                {
                    *counts.entry(key.to_string()).or_default() += 1;
                }
            }
        }
        counts
    }

    /// The daemon's arguments for this stack, with fast test timings; `extra` is appended
    /// (clap takes the last value of a repeated option).
    pub fn daemon_args(&self, ssgm: &MockSsgm, extra: &[&str]) -> Vec<String> {
        let mut args = self.base_daemon_args(ssgm);
        args.extend(
            [
                "-w",
                "1",
                "-u",
                "0",
                "-b",
                "1",
                "-s",
                "60",
                "-v",
                "20",
                "--retry-backoff",
                "1",
                "--ssgm-timeout",
                "3",
                "--result-deadline",
                "90",
                "--max-jobs",
                "4",
                "--state-dir",
                &self.state_dir("default"),
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// What names this stack to the daemon: its queue, the scheduler and the buckets.
    pub fn base_daemon_args(&self, ssgm: &MockSsgm) -> Vec<String> {
        vec![
            "-q".into(),
            self.jobs_queue.clone(),
            "-S".into(),
            "127.0.0.1".into(),
            "-P".into(),
            ssgm.port.to_string(),
            "-m".into(),
            ssgm.bin.display().to_string(),
            "-i".into(),
            format!("{}/{}", self.work_bucket, self.work_dir),
            "-o".into(),
            format!("{}/{}", self.output_bucket, self.output_dir),
        ]
    }

    /// The daemon's binary with `args`.
    pub fn daemon_command(&self, args: &[String]) -> Command {
        let mut command = Command::new(&self.kit.bins.orchgpu);
        command.args(args);
        command
    }

    /// A state directory for a daemon of this test (one journal per name).
    pub fn state_dir(&self, name: &str) -> String {
        self.logs
            .path()
            .join(format!("state-{name}"))
            .display()
            .to_string()
    }

    /// Starts the daemon; returns its process index.
    pub fn start_daemon(&mut self, ssgm: &MockSsgm, extra: &[&str]) -> Result<usize> {
        let command = self.daemon_command(&self.daemon_args(ssgm, extra));
        let name = format!("orchgpu-{}", self.processes.len());
        self.spawn(&name, command)
    }

    pub fn process(&mut self, index: usize) -> &mut Process {
        &mut self.processes[index]
    }

    /// The log of a started process.
    pub fn log(&self, index: usize) -> String {
        std::fs::read_to_string(self.log_path(&self.processes[index].name)).unwrap_or_default()
    }

    /// Waits until a process's log contains `needle` `count` times; fails at once if the
    /// process exits first.
    pub async fn wait_for_log(
        &mut self,
        index: usize,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log(index).matches(needle).count() >= count {
                return Ok(());
            }
            if let Some(status) = self.processes[index].try_status()? {
                bail!("process exited ({status}) before logging {needle:?}");
            }
            if Instant::now() >= deadline {
                bail!("timed out after {timeout:?} waiting for {count}× {needle:?} in the log");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for process in &mut self.processes {
            process.kill();
        }
        // Printed unless turned off: the test runner shows a test's output only when it
        // fails (a test returning `Err` is not "panicking", so that cannot be the
        // condition).
        if self.print_logs {
            for process in &self.processes {
                let log = std::fs::read_to_string(self.log_path(&process.name)).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(80).collect();
                eprintln!(
                    "===== {} ({}) last {} lines =====",
                    process.name,
                    process.description,
                    tail.len()
                );
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// A child process that is killed when the test ends.
pub struct Process {
    name: String,
    description: String,
    child: Option<Child>,
}

impl Process {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| anyhow!("{} is not running", self.name))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)?;
        Ok(())
    }

    /// The exit status, if it has exited.
    pub fn try_status(&mut self) -> Result<Option<std::process::ExitStatus>> {
        match &mut self.child {
            Some(child) => Ok(child.try_wait()?),
            None => bail!("{} was already reaped", self.name),
        }
    }

    /// SIGTERM, then up to `timeout` for it to exit; SIGKILL and an error after that.
    pub async fn stop(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM)?;
        match self.wait_exit(timeout).await {
            Ok(status) => Ok(status),
            Err(e) => {
                self.kill();
                Err(e.context("killed"))
            }
        }
    }

    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

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

/// The mock SSGM server, as a real process; its stderr log is printed if the test
/// panics.
pub struct MockSsgm {
    pub port: u16,
    bin: PathBuf,
    child: Child,
    log: Arc<Mutex<String>>,
}

impl MockSsgm {
    /// Starts `bin` as a mock SSGM server with `gpus` GPUs on a free loopback port.
    pub fn spawn(bin: &Path, gpus: u32) -> Result<MockSsgm> {
        let mut child = Command::new(bin)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--gpus",
                &gpus.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let log = Arc::new(Mutex::new(String::new()));
        if let Some(stderr) = child.stderr.take() {
            let sink = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut log = sink.lock().unwrap_or_else(|e| e.into_inner());
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let port = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout"))
            .and_then(read_port);
        match port {
            Ok(port) => Ok(MockSsgm {
                port,
                bin: bin.to_owned(),
                child,
                log,
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// The mock's binary, which is also its SSGM client.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's exit status, if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// What the server wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The counters `names` of one `-stats` call; an error if any is missing.
    pub fn counters<const N: usize>(&self, names: [&str; N]) -> Result<[u64; N]> {
        let stats = self.stats()?;
        let mut values = [0; N];
        for (value, name) in values.iter_mut().zip(names) {
            *value = stats[name]
                .as_u64()
                .ok_or_else(|| anyhow!("no {name} in mock-ssgm stats: {stats}"))?;
        }
        Ok(values)
    }

    pub fn client(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(Command::new(&self.bin)
            .args(["-S", "127.0.0.1", "-P", &self.port.to_string()])
            .args(args)
            .output()?)
    }

    pub fn stats(&self) -> Result<Value> {
        let output = self.client(&["-stats"])?;
        if !output.status.success() {
            bail!(
                "mock-ssgm -stats failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    pub fn stat(&self, name: &str) -> Result<u64> {
        self.stats()?[name]
            .as_u64()
            .ok_or_else(|| anyhow!("no {name} in mock-ssgm stats"))
    }

    pub fn inject(&self, kind: &str, count: u32) -> Result<()> {
        let output = self.client(&["-inject", kind, "-n", &count.to_string()])?;
        if !output.status.success() {
            bail!(
                "mock-ssgm -inject failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Live `mock-ssgm -alloc` clients talking to this server (found by their command
    /// line): a hung client must not outlive the daemon that ran it for long.
    pub fn alloc_clients(&self) -> Vec<u32> {
        let port = self.port.to_string();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                    return false;
                };
                let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
                // A zombie has exited; its parent has not reaped it yet.
                let alive = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                    !s.rsplit_once(')')
                        .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
                });
                alive && args.contains(&&b"-alloc"[..]) && args.contains(&port.as_bytes())
            })
            .collect()
    }

    /// Waits (releases may be confirmed in the background, after the job ended) until
    /// nothing is allocated, then asserts the lifecycle promise (`assert_all_released`).
    pub async fn wait_all_released(&self, timeout: Duration) -> Result<()> {
        wait_for("every grant released", timeout, || async {
            Ok((self.stat("live")? == 0).then_some(()))
        })
        .await?;
        self.assert_all_released()
    }

    /// Asserts the lifecycle promise: nothing left allocated and every grant released.
    pub fn assert_all_released(&self) -> Result<()> {
        let stats = self.stats()?;
        assert_eq!(stats["live"], 0, "allocations left live: {stats}");
        assert_eq!(
            stats["granted"], stats["released"],
            "grants vs releases: {stats}"
        );
        Ok(())
    }
}

impl Drop for MockSsgm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- mock-ssgm server log ---\n{}---", self.log());
        }
    }
}

/// Reads the server's `listening on 127.0.0.1:PORT` line.
fn read_port(stdout: std::process::ChildStdout) -> Result<u16> {
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("read mock-ssgm's listening line")?;
    let port = line
        .trim()
        .strip_prefix("listening on 127.0.0.1:")
        .with_context(|| format!("unexpected first line from mock-ssgm: {line:?}"))?;
    port.parse()
        .with_context(|| format!("bad port in mock-ssgm's line {line:?}"))
}

/// A TCP forwarder to the emulator that a test can cut and restore, to stage an outage.
pub struct Proxy {
    pub port: u16,
    open: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start() -> Result<Proxy> {
        Proxy::start_holding(None).await
    }

    /// A proxy that holds back conditional overwrites (PUT requests with an `If-Match`
    /// header) after the first `pass`, each for `hold` before it reaches the emulator, as
    /// a slow or partitioned S3 endpoint would; the requests still land, late, even when
    /// the client has given up on them.
    pub async fn start_holding(rule: Option<(usize, Duration)>) -> Result<Proxy> {
        let target = endpoint()
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (open, watch) = tokio::sync::watch::channel(true);
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !*watch.borrow() {
                    // Cut: the connection is dropped at once, like a dead endpoint.
                    continue;
                }
                let target = target.clone();
                let mut cut = watch.clone();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    if let Some((pass, hold)) = rule {
                        hold_conditional_writes(inbound, outbound, &seen, pass, hold).await;
                        return;
                    }
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Ok(Proxy { port, open, task })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }
}

/// Forwards one connection, holding back each chunk from the client that carries an
/// `If-Match` header once `pass` such requests went through (counted over every
/// connection in `seen`). Requests on one connection are sequential (no pipelining), so
/// a held chunk holds its request only.
async fn hold_conditional_writes(
    inbound: tokio::net::TcpStream,
    outbound: tokio::net::TcpStream,
    seen: &std::sync::atomic::AtomicUsize,
    pass: usize,
    hold: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut from_client, mut to_client) = inbound.into_split();
    let (mut from_server, mut to_server) = outbound.into_split();
    let answers = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
    });
    let mut buffer = vec![0u8; 64 * 1024];
    while let Ok(n) = from_client.read(&mut buffer).await {
        if n == 0 {
            break;
        }
        let chunk = &buffer[..n];
        let conditional = chunk.starts_with(b"PUT ")
            && chunk
                .windows(11)
                .any(|w| w.eq_ignore_ascii_case(b"\r\nif-match:"));
        if conditional && seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= pass {
            tokio::time::sleep(hold).await;
        }
        if to_server.write_all(chunk).await.is_err() {
            break;
        }
    }
    // Late answers still reach the emulator's side; the client may be long gone.
    let _ = tokio::time::timeout(Duration::from_secs(5), answers).await;
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// Helpers for the deployment tests (systemd notify, real inference).
impl Stack {
    /// Starts the daemon with extra environment variables; returns its process index.
    pub fn start_daemon_with_env(
        &mut self,
        ssgm: &MockSsgm,
        extra: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<usize> {
        let mut command = Command::new(&self.kit.bins.orchgpu);
        command.args(self.daemon_args(ssgm, extra));
        for (name, value) in env {
            command.env(name, value);
        }
        let name = format!("orchgpu-{}", self.processes.len());
        self.spawn(&name, command)
    }

    /// Starts the function stand-in with any script (not only the test fixtures) and extra
    /// environment variables for it, one bundle at a time.
    pub fn start_function_script(
        &mut self,
        script: &Path,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<usize> {
        let mut command =
            self.function_command(script, &["--wait-time", "1", "--concurrency", "1"]);
        for (name, value) in env {
            command.env(name, value);
        }
        let name = format!("function-{}", self.processes.len());
        self.spawn(&name, command)
    }
}

/// A plain HTTP/1.0 GET on loopback (no chunked answer to decode): the status code and
/// the body.
pub fn http_get(address: &str, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address)
        .with_context(|| format!("cannot connect to {address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of headers in {response:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// The sum of the samples of metric `name` whose labels include all of `labels`, in a
/// Prometheus or OpenMetrics text exposition.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((metric, rest)) => (metric, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let wanted = metric == name
                && labels
                    .iter()
                    .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// The address the daemon's HTTP listener took (it logs it at start-up).
pub async fn http_address(stack: &mut Stack, daemon: usize) -> Result<String> {
    stack
        .wait_for_log(daemon, "Serving /metrics", 1, Duration::from_secs(30))
        .await?;
    let log = stack.log(daemon);
    log.lines()
        .find(|l| l.contains("Serving /metrics"))
        .and_then(|l| l.split("address=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no address in the log"))
}

/// A real Prometheus (Debian's `prometheus` package, or `ORCHGPU_PROMETHEUS`) on a free
/// loopback port with its own temporary storage, scraping one target every second as job
/// `orchgpu`. Killed on drop; its log is printed then.
pub struct Prometheus {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (`host:port`, path `/metrics`) and waits until
    /// it reports ready.
    pub fn start(target: &str) -> Result<Prometheus> {
        Prometheus::start_targets(&[(target, None)])
    }

    /// Starts Prometheus scraping several targets in job `orchgpu`, each with an optional
    /// `use_case` label, as docs/operations.md's example for several instances on one
    /// host does.
    pub fn start_targets(targets: &[(&str, Option<&str>)]) -> Result<Prometheus> {
        let program = std::env::var("ORCHGPU_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("prometheus.yml");
        let mut text = "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                        scrape_configs:\n  - job_name: orchgpu\n    static_configs:\n"
            .to_string();
        for (target, use_case) in targets {
            text.push_str(&format!("      - targets: [\"{target}\"]\n"));
            if let Some(use_case) = use_case {
                text.push_str(&format!("        labels: {{use_case: \"{use_case}\"}}\n"));
            }
        }
        std::fs::write(&config, text)?;
        // A free port: bound, read and released; Prometheus binds it just after.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = File::create(dir.path().join("prometheus.log"))?;
        let child = Command::new(&program)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot run {program}: install Debian's prometheus package \
                     (dev/test.sh does) or set ORCHGPU_PROMETHEUS"
                )
            })?;
        let mut prometheus = Prometheus { port, child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_get(&format!("127.0.0.1:{port}"), "/-/ready") {
                return Ok(prometheus);
            }
            if let Some(status) = prometheus.child.try_wait()? {
                bail!(
                    "prometheus exited ({status}) before it was ready:\n{}",
                    prometheus.log()
                );
            }
            if Instant::now() >= deadline {
                bail!("prometheus not ready within 30 s:\n{}", prometheus.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query through the HTTP API: the whole JSON answer
    /// (`{"status": "success", "data": {"resultType": ..., "result": [...]}}`). An answer
    /// whose status is not success is an error carrying Prometheus's message.
    pub fn query(&self, promql: &str) -> Result<Value> {
        let encoded =
            percent_encoding::utf8_percent_encode(promql, percent_encoding::NON_ALPHANUMERIC);
        let (status, body) = http_get(
            &format!("127.0.0.1:{}", self.port),
            &format!("/api/v1/query?query={encoded}"),
        )?;
        let answer: Value = serde_json::from_str(&body)
            .with_context(|| format!("query {promql:?}: HTTP {status}, not JSON"))?;
        if status != 200 || answer["status"] != "success" {
            bail!("query {promql:?}: HTTP {status}: {answer}");
        }
        Ok(answer)
    }

    /// Polls `promql` until its result vector is not empty; returns that vector.
    pub fn wait_for_series(&self, promql: &str, timeout: Duration) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let answer = self.query(promql)?;
            if let Some(result) = answer["data"]["result"].as_array()
                && !result.is_empty()
            {
                return Ok(result.clone());
            }
            if Instant::now() >= deadline {
                bail!(
                    "no series for {promql:?} within {timeout:?}; last answer {answer}\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// Helpers for the claim, pinning and large-input tests.
impl Stack {
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

/// Reads a JSON-lines log (the daemon's `--log-format json`) as it grows.
pub struct JsonLog {
    path: PathBuf,
    offset: u64,
    partial: String,
    /// Every whole line read so far that parsed as JSON.
    pub lines: Vec<Value>,
}

impl JsonLog {
    pub fn new(path: PathBuf) -> JsonLog {
        JsonLog {
            path,
            offset: 0,
            partial: String::new(),
            lines: Vec::new(),
        }
    }

    /// Reads what was appended since the last call.
    pub fn poll(&mut self) -> Result<()> {
        let Ok(mut file) = File::open(&self.path) else {
            return Ok(());
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut text = String::new();
        let read = file.read_to_string(&mut text)?;
        self.offset += read as u64;
        self.partial.push_str(&text);
        while let Some(end) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=end).collect();
            if let Ok(value) = serde_json::from_str::<Value>(line.trim()) {
                self.lines.push(value);
            }
        }
        Ok(())
    }

    /// How many lines so far match `pred`.
    pub fn count(&mut self, pred: impl Fn(&Value) -> bool) -> Result<usize> {
        self.poll()?;
        Ok(self.lines.iter().filter(|l| pred(l)).count())
    }

    /// Polls every 20 ms until `count` lines match `pred`, or fails after `timeout`.
    pub async fn wait_count(
        &mut self,
        pred: impl Fn(&Value) -> bool,
        count: usize,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.count(&pred)?;
            if n >= count {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} with {n} of {count} log lines ({})",
                    self.path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A JSON log line's message.
pub fn message(line: &Value) -> &str {
    line["fields"]["message"].as_str().unwrap_or("")
}

/// The `job_id` of a JSON log line's spans.
pub fn job_id(line: &Value) -> Option<String> {
    line["spans"].as_array()?.iter().find_map(|span| {
        span.get("job_id")
            .and_then(Value::as_str)
            .map(str::to_string)
    })
}

/// Microseconds since the epoch of a JSON log line's RFC 3339 UTC timestamp.
pub fn timestamp_us(line: &Value) -> Option<i64> {
    parse_rfc3339_us(line["timestamp"].as_str()?)
}

/// Microseconds since the epoch of an RFC 3339 UTC time such as
/// `2026-11-27T08:33:09.123456Z`.
pub fn parse_rfc3339_us(text: &str) -> Option<i64> {
    let (date, time) = text.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>());
    let (hh, mm, ss) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let frac: String = frac.chars().chain(std::iter::repeat('0')).take(6).collect();
    let micros: i64 = frac.parse().ok()?;
    // Days from civil (H. Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1_000_000) + micros)
}
