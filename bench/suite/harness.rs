//! The test kit's stacks and processes with the bench's settings: a stack with a results
//! queue, the mock SSGM, the daemon with its JSON log and stats file, the function
//! stand-in running a `bench/` script.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use orchgpu_testkit::{JsonLog, MockSsgm, Stack, message, timestamp_us};
use serde_json::Value;

use crate::Opts;
use crate::measure::cpu_ticks;

/// A stack of the test kit for one scenario, with a results queue (its name is returned);
/// its processes' logs are not printed when it is dropped.
pub(crate) async fn create_stack(opts: &Opts, tag: &str) -> Result<(Stack, String)> {
    let mut stack = Stack::create(&opts.kit, tag, None).await?;
    stack.set_print_logs(false);
    let (results, _) = stack.add_results_queue().await?;
    Ok((stack, results))
}

/// The mock SSGM server with `gpus` GPUs.
pub(crate) fn start_ssgm(opts: &Opts, gpus: u32) -> Result<MockSsgm> {
    MockSsgm::spawn(&opts.kit.bins.mock_ssgm, gpus)
}

/// The daemon as a process of its stack, with its JSON log and stats file.
pub(crate) struct Daemon {
    index: usize,
    pub(crate) pid: u32,
    pub(crate) log: JsonLog,
    stats_file: PathBuf,
}

/// Starts the daemon with the bench's settings (`-w 20 -u 0`, JSON log, a stats file, any
/// `ORCHGPU_BENCH_DAEMON_ARGS`) and `extra`.
pub(crate) fn start_daemon(
    stack: &mut Stack,
    ssgm: &MockSsgm,
    tag: &str,
    extra: &[&str],
) -> Result<Daemon> {
    let stats_file = stack.logs.path().join(format!("{tag}.stats.json"));
    let mut args = stack.base_daemon_args(ssgm);
    args.extend(
        [
            "-w",
            "20",
            "-u",
            "0",
            "--log-format",
            "json",
            "--stats-file",
        ]
        .map(String::from),
    );
    args.push(stats_file.display().to_string());
    // A state dir of its own: the journal and the history start empty in every run, and
    // never touch (or trip over) the user's default dir, whatever version wrote it.
    args.extend(["--state-dir".to_string(), stack.state_dir(tag)]);
    args.extend(extra.iter().map(|s| s.to_string()));
    // Extra flags for every daemon of the run, to compare configurations side by side
    // (e.g. `--no-history` against `--http-listen 127.0.0.1:0`).
    args.extend(
        std::env::var("ORCHGPU_BENCH_DAEMON_ARGS")
            .unwrap_or_default()
            .split_whitespace()
            .map(String::from),
    );
    let mut command = stack.daemon_command(&args);
    command.env(
        "ORCHGPU_LOG",
        "info,orchgpu::daemon=debug,orchgpu::job=debug,aws_config=warn,aws_smithy_runtime=warn",
    );
    let name = format!("{tag}.daemon");
    let index = stack.spawn(&name, command)?;
    let pid = stack
        .process(index)
        .pid()
        .ok_or_else(|| anyhow!("the daemon has no pid"))?;
    Ok(Daemon {
        index,
        pid,
        log: JsonLog::new(stack.log_path(&name)),
        stats_file,
    })
}

/// A JSON log line saying a message was deleted.
fn is_deletion(line: &Value) -> bool {
    message(line) == "Message deleted."
}

/// A JSON log line saying a bundle upload finished.
fn is_upload(line: &Value) -> bool {
    message(line) == "Stage finished." && line["fields"]["stage"] == "upload"
}

impl Daemon {
    /// Waits until the daemon has dropped the queue's s3:TestEvent: it is then receiving.
    pub(crate) async fn ready(&mut self) -> Result<()> {
        self.wait_deleted(1, Duration::from_secs(60))
            .await
            .context("daemon never dropped the test event")
    }
    /// Waits until `count` messages have been deleted in all.
    pub(crate) async fn wait_deleted(&mut self, count: usize, timeout: Duration) -> Result<()> {
        self.log.wait_count(is_deletion, count, timeout).await
    }
    /// Waits until `count` bundles have been uploaded in all.
    pub(crate) async fn wait_uploaded(&mut self, count: usize, timeout: Duration) -> Result<()> {
        self.log.wait_count(is_upload, count, timeout).await
    }
    /// When each message was deleted (µs since the epoch), in log order.
    pub(crate) fn deletions(&self) -> impl Iterator<Item = i64> + '_ {
        self.log
            .lines
            .iter()
            .filter(|l| is_deletion(l))
            .filter_map(timestamp_us)
    }
    /// The first deletion after `after` (µs since the epoch), waited for.
    pub(crate) async fn next_deletion(&mut self, after: i64, timeout: Duration) -> Result<i64> {
        self.log
            .wait_count(
                |l| is_deletion(l) && timestamp_us(l).unwrap_or(0) > after,
                1,
                timeout,
            )
            .await?;
        self.deletions()
            .find(|t| *t > after)
            .ok_or_else(|| anyhow!("no deletion after {after}"))
    }
    /// Its CPU time so far, user + system, in ticks.
    pub(crate) fn cpu_ticks(&self) -> Result<u64> {
        cpu_ticks(self.pid)
    }
    /// Stops it and returns its request counts by operation.
    pub(crate) async fn stop(
        &mut self,
        stack: &mut Stack,
        timeout: Duration,
    ) -> Result<BTreeMap<String, u64>> {
        stack.process(self.index).stop(timeout).await?;
        let text = std::fs::read_to_string(&self.stats_file)
            .with_context(|| format!("no stats file {}", self.stats_file.display()))?;
        let value: Value = serde_json::from_str(&text)?;
        let mut counts = BTreeMap::new();
        if let Some(map) = value["requests"].as_object() {
            for (k, v) in map {
                counts.insert(k.clone(), v.as_u64().unwrap_or(0));
            }
        }
        Ok(counts)
    }
}

/// The function stand-in running `bench/<script>`, 8 invocations at once.
pub(crate) fn start_function(opts: &Opts, stack: &mut Stack, script: &str) -> Result<usize> {
    let mut command = stack.function_command(
        &opts.repo.join("bench").join(script),
        &["--wait-time", "20", "--concurrency", "8"],
    );
    command.env("ORCHGPU_LOG", "warn");
    stack.spawn("function", command)
}
