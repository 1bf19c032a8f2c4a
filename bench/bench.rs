//! orchgpu-bench: measures what orchestration costs, each figure beside a floor measured
//! in the same run (see BENCHMARKS.md). `bench/run.sh` builds the release binaries, starts
//! an emulator and runs this; it can also be run by hand:
//!
//! `orchgpu-bench --endpoint URL --bin-dir target/release [--quick] [--only NAME,...]`
//!
//! It starts the real daemon, the mock SSGM and the function stand-in as processes, drives
//! them through S3 and SQS, and reads the daemon's JSON log (per-stage `elapsed_us` and
//! timestamps), its `--stats-file` (exact AWS request counts from the SDK interceptor),
//! `/proc/<pid>/status` and `/proc/<pid>/stat` (memory, CPU) and `mock-ssgm -stats`.
//! Every load loop is bounded in count and in time.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use aws_sdk_s3::primitives::ByteStream;
use orchgpu::aws::{AwsClients, AwsOptions, build_clients};
use orchgpu::event::{Notification, parse_notification};
use orchgpu_testkit::{
    Bins, JsonLog, Kit, MockSsgm, Stack, create_queue, job_id, message, notify, queue_arn,
    timestamp_us,
};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// Linux reports utime/stime in USER_HZ ticks, 100 per second on every common platform.
const TICKS_PER_SEC: f64 = 100.0;

struct Opts {
    kit: Kit,
    repo: PathBuf,
    quick: bool,
    only: Option<Vec<String>>,
    work: tempfile::TempDir,
}

impl Opts {
    fn wants(&self, name: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == name))
    }
}

/// Sizes of each scenario, full or `--quick`.
struct Sizes {
    overhead_small: usize,
    overhead_large: usize,
    detection: usize,
    throughput: usize,
    contended: usize,
    memory_big_mb: usize,
    waiting: usize,
    waiting_window: Duration,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                overhead_small: 8,
                overhead_large: 2,
                detection: 4,
                throughput: 100,
                contended: 6,
                memory_big_mb: 64,
                waiting: 200,
                waiting_window: Duration::from_secs(10),
            }
        } else {
            Sizes {
                overhead_small: 20,
                overhead_large: 5,
                detection: 10,
                throughput: 300,
                contended: 20,
                memory_big_mb: 200,
                waiting: 1000,
                waiting_window: Duration::from_secs(30),
            }
        }
    }
}

/// One line of the final table.
struct Row {
    what: String,
    value: String,
    floor: String,
    ratio: String,
    target: &'static str,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Report {
    fn row(
        &mut self,
        what: impl Into<String>,
        value: impl Into<String>,
        floor: impl Into<String>,
        ratio: impl Into<String>,
        target: &'static str,
    ) {
        let row = Row {
            what: what.into(),
            value: value.into(),
            floor: floor.into(),
            ratio: ratio.into(),
            target,
        };
        eprintln!(
            "bench: {} = {} (floor {}, ratio {})",
            row.what, row.value, row.floor, row.ratio
        );
        self.rows.push(row);
    }
    fn note(&mut self, text: impl Into<String>) {
        let text = text.into();
        eprintln!("bench: note: {text}");
        self.notes.push(text);
    }
    fn print(&self) -> String {
        let mut out = String::new();
        out.push_str("| what | orchgpu | floor (same run) | ratio | target |\n");
        out.push_str("|---|---|---|---|---|\n");
        for r in &self.rows {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                r.what, r.value, r.floor, r.ratio, r.target
            ));
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for n in &self.notes {
                out.push_str(&format!("- {n}\n"));
            }
        }
        out
    }
}

fn parse_opts() -> Result<Opts> {
    let mut endpoint = std::env::var("ORCHGPU_BENCH_ENDPOINT").ok();
    let mut bin_dir = None;
    let mut quick = false;
    let mut only = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--endpoint" => endpoint = args.next(),
            "--bin-dir" => bin_dir = args.next().map(PathBuf::from),
            "--quick" => quick = true,
            "--only" => {
                only = args
                    .next()
                    .map(|s| s.split(',').map(str::to_string).collect())
            }
            other => bail!(
                "unknown argument {other:?}; usage: orchgpu-bench --endpoint URL --bin-dir DIR [--quick] [--only overhead,detection,throughput,contended,memory,waiting]"
            ),
        }
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin_dir = bin_dir.unwrap_or_else(|| repo.join("target/release"));
    Ok(Opts {
        kit: Kit {
            endpoint: endpoint.ok_or_else(|| anyhow!("--endpoint or ORCHGPU_BENCH_ENDPOINT"))?,
            bins: Bins::in_dir(&bin_dir),
            repo: repo.clone(),
        },
        repo,
        quick,
        only,
        work: tempfile::Builder::new()
            .prefix("orchgpu-bench-")
            .tempdir()?,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let opts = parse_opts()?;
    let sizes = Sizes::new(opts.quick);
    let aws = build_clients(&AwsOptions {
        endpoint_url: Some(opts.kit.endpoint.clone()),
        region: Some("us-east-1".into()),
    })
    .await;
    let mut report = Report::default();
    let started = Instant::now();
    let scenarios: [(&str, Scenario); 6] = [
        ("overhead", overhead),
        ("detection", detection),
        ("throughput", throughput),
        ("contended", contended),
        ("memory", memory),
        ("waiting", waiting),
    ];
    for (name, scenario) in scenarios {
        if !opts.wants(name) {
            continue;
        }
        let t0 = Instant::now();
        eprintln!("bench: === {name} ===");
        if let Err(e) = scenario(&opts, &sizes, &aws, &mut report).await {
            report.note(format!("scenario {name} failed: {e:#}"));
        }
        eprintln!("bench: {name} took {:.0} s", t0.elapsed().as_secs_f64());
    }
    report.note(format!(
        "whole run: {:.0} s, mode {}",
        started.elapsed().as_secs_f64(),
        if opts.quick { "quick" } else { "full" }
    ));
    println!("{}", report.print());
    Ok(())
}

type Scenario = for<'a> fn(
    &'a Opts,
    &'a Sizes,
    &'a AwsClients,
    &'a mut Report,
)
    -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + 'a>>;

// ---------------------------------------------------------------------------------------
// Infrastructure: the test kit's stacks and processes, with the bench's settings.

/// A stack of the test kit for one scenario, with a results queue (its name is returned);
/// its processes' logs are not printed when it is dropped.
async fn create_stack(opts: &Opts, tag: &str) -> Result<(Stack, String)> {
    let mut stack = Stack::create(&opts.kit, tag, None).await?;
    stack.set_print_logs(false);
    let (results, _) = stack.add_results_queue().await?;
    Ok((stack, results))
}

/// The mock SSGM server with `gpus` GPUs.
fn start_ssgm(opts: &Opts, gpus: u32) -> Result<MockSsgm> {
    MockSsgm::spawn(&opts.kit.bins.mock_ssgm, gpus)
}

/// The daemon as a process of its stack, with its JSON log and stats file.
struct Daemon {
    index: usize,
    pid: u32,
    log: JsonLog,
    stats_file: PathBuf,
}

fn start_daemon(stack: &mut Stack, ssgm: &MockSsgm, tag: &str, extra: &[&str]) -> Result<Daemon> {
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

fn is_deletion(line: &Value) -> bool {
    message(line) == "Message deleted."
}

fn is_upload(line: &Value) -> bool {
    message(line) == "Stage finished." && line["fields"]["stage"] == "upload"
}

impl Daemon {
    /// Waits until the daemon has dropped the queue's s3:TestEvent: it is then receiving.
    async fn ready(&mut self) -> Result<()> {
        self.wait_deleted(1, Duration::from_secs(60))
            .await
            .context("daemon never dropped the test event")
    }
    /// Waits until `count` messages have been deleted in all.
    async fn wait_deleted(&mut self, count: usize, timeout: Duration) -> Result<()> {
        self.log.wait_count(is_deletion, count, timeout).await
    }
    /// Waits until `count` bundles have been uploaded in all.
    async fn wait_uploaded(&mut self, count: usize, timeout: Duration) -> Result<()> {
        self.log.wait_count(is_upload, count, timeout).await
    }
    /// When each message was deleted (µs since the epoch), in log order.
    fn deletions(&self) -> impl Iterator<Item = i64> + '_ {
        self.log
            .lines
            .iter()
            .filter(|l| is_deletion(l))
            .filter_map(timestamp_us)
    }
    /// The first deletion after `after` (µs since the epoch), waited for.
    async fn next_deletion(&mut self, after: i64, timeout: Duration) -> Result<i64> {
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
    fn cpu_ticks(&self) -> Result<u64> {
        cpu_ticks(self.pid)
    }
    /// Stops it and returns its request counts by operation.
    async fn stop(
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
fn start_function(opts: &Opts, stack: &mut Stack, script: &str) -> Result<usize> {
    let mut command = stack.function_command(
        &opts.repo.join("bench").join(script),
        &["--wait-time", "20", "--concurrency", "8"],
    );
    command.env("ORCHGPU_LOG", "warn");
    stack.spawn("function", command)
}

/// With `ORCHGPU_BENCH_PERF=DIR`, records a CPU profile of `pid` into `DIR/<tag>.data`
/// until [`stop_perf`] (SIGINT makes perf write its file).
fn start_perf(stack: &mut Stack, pid: u32, tag: &str) -> Result<Option<usize>> {
    let Ok(dir) = std::env::var("ORCHGPU_BENCH_PERF") else {
        return Ok(None);
    };
    let mut command = Command::new("perf");
    command
        .args(["record", "-F", "2999", "-g", "-p", &pid.to_string(), "-o"])
        .arg(Path::new(&dir).join(format!("{tag}.data")));
    Ok(Some(stack.spawn("perf", command)?))
}

async fn stop_perf(stack: &mut Stack, perf: Option<usize>) {
    if let Some(index) = perf {
        let perf = stack.process(index);
        let _ = perf.signal(nix::sys::signal::Signal::SIGINT);
        if perf.wait_exit(Duration::from_secs(30)).await.is_err() {
            perf.kill();
        }
    }
}

fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(") ").ok_or_else(|| anyhow!("odd stat"))?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the command name.
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// `VmHWM` and `VmRSS` in KiB.
fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmHWM:"), field("VmRSS:")))
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_micros() as i64
}

/// Total length of the union of `(start, end)` intervals.
fn covered_us(intervals: &mut [(i64, i64)]) -> i64 {
    intervals.sort_unstable();
    let mut total = 0;
    let mut reach = i64::MIN;
    for &(start, end) in intervals.iter() {
        let start = start.max(reach);
        if end > start {
            total += end - start;
            reach = end;
        }
    }
    total
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn ms(us: f64) -> String {
    format!("{:.1} ms", us / 1000.0)
}

fn ratio(value: f64, floor: f64) -> String {
    format!("{:.2}×", value / floor)
}

/// Deterministic incompressible bytes (xorshift), so gzip does real work.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

async fn put_bytes(aws: &AwsClients, bucket: &str, key: &str, body: Vec<u8>) -> Result<()> {
    aws.s3
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(body))
        .send()
        .await
        .with_context(|| format!("put {bucket}/{key}"))?;
    Ok(())
}

/// Puts `count` objects with `concurrency` in flight; returns when all are in.
async fn put_many(
    aws: &AwsClients,
    bucket: &str,
    prefix: &str,
    count: usize,
    size: usize,
    concurrency: usize,
) -> Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (aws, bucket, prefix, next) = (
            aws.clone(),
            bucket.to_string(),
            prefix.to_string(),
            next.clone(),
        );
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, anyhow::Error>(());
                }
                let body = pseudo_random(size, i as u64 + 1);
                put_bytes(&aws, &bucket, &format!("{prefix}{i:05}.jpg"), body).await?;
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(())
}

fn requests_text(counts: &BTreeMap<String, u64>, jobs: usize) -> String {
    counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(op, n)| format!("{op} {:.2}", *n as f64 / jobs as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------
// Scenario 1: overhead per job, message received → bundle uploaded, vs a plain loop.

fn overhead<'a>(
    opts: &'a Opts,
    sizes: &'a Sizes,
    aws: &'a AwsClients,
    report: &'a mut Report,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + 'a>> {
    Box::pin(async move {
        let ssgm = start_ssgm(opts, 8)?;
        let (mut stack, results) = create_stack(opts, "ovh").await?;
        let floor_bucket = format!("bfloor-{}", std::process::id());
        aws.s3.create_bucket().bucket(&floor_bucket).send().await?;
        // The floor's PUT goes to a bucket that notifies a queue, as the intermediate
        // bucket does: the same PUT, since on the emulator a notifying PUT costs more.
        let floor_out = format!("bfloorout-{}", std::process::id());
        aws.s3.create_bucket().bucket(&floor_out).send().await?;
        let floor_events =
            create_queue(&aws.sqs, &format!("bfloorq-{}", std::process::id()), None).await?;
        notify(
            &aws.s3,
            &floor_out,
            &queue_arn(&aws.sqs, &floor_events).await?,
            Some(("bundles/".into(), ".tar.gz".into())),
        )
        .await?;
        let _function = start_function(opts, &mut stack, "instant.sh")?;
        let mut daemon = start_daemon(
            &mut stack,
            &ssgm,
            "overhead",
            &["--max-jobs", "1", "--results-queue", &results],
        )?;
        daemon.ready().await?;
        let mut done = 1; // the test event's deletion
        for (label, size, count) in [
            ("100 KB", 100 * 1000, sizes.overhead_small),
            ("20 MB", 20 * 1000 * 1000, sizes.overhead_large),
        ] {
            let mut daemon_us = Vec::new();
            let mut floor_us = Vec::new();
            let mut stage_us: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            let mut floor_steps: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
            let cpu_before = daemon.cpu_ticks()?;
            // One warm-up round of each, not counted.
            for i in 0..=count {
                let body = pseudo_random(size, 1000 + i as u64);
                let key = format!("{label}-{i}.jpg").replace(' ', "");
                // The floor: the same bytes, GET + gzip + PUT + one SSGM call, in a loop.
                put_bytes(aws, &floor_bucket, &key, body.clone()).await?;
                let steps = floor_job(opts, aws, &ssgm, &floor_bucket, &key, &floor_out).await?;
                // orchgpu: the same bytes through the whole pipeline.
                put_bytes(aws, &stack.input_bucket, &key, body).await?;
                done += 1;
                daemon.wait_deleted(done, Duration::from_secs(120)).await?;
                if i == 0 {
                    continue;
                }
                floor_us.push(steps.iter().map(|(_, us)| us).sum());
                for (name, us) in steps {
                    floor_steps.entry(name).or_default().push(us);
                }
                let lines = &daemon.log.lines;
                let job = lines
                    .iter()
                    .rev()
                    .find(|l| message(l) == "Job completed.")
                    .and_then(job_id)
                    .ok_or_else(|| anyhow!("no completed job in the log"))?;
                let stage_line = |stage: &str| {
                    lines.iter().find(|l| {
                        message(l) == "Stage finished."
                            && l["fields"]["stage"] == stage
                            && job_id(l).as_deref() == Some(job.as_str())
                    })
                };
                let upload = stage_line("upload").ok_or_else(|| anyhow!("no upload"))?;
                // The job starts with its first stage (the existing-result check and the
                // download, side by side).
                let start = ["check_result", "download"]
                    .iter()
                    .filter_map(|stage| stage_line(stage))
                    .map(|l| {
                        timestamp_us(l).unwrap_or(0)
                            - l["fields"]["elapsed_us"].as_i64().unwrap_or(0)
                    })
                    .min()
                    .ok_or_else(|| anyhow!("no first stage"))?;
                let end = timestamp_us(upload).unwrap_or(0);
                daemon_us.push((end - start) as f64);
                // Stages overlap (the check beside the download, and for small inputs
                // the allocation too): "between stages" is the time no stage covers.
                let mut intervals = Vec::new();
                for stage in ["check_result", "download", "allocate", "bundle", "upload"] {
                    if let Some(line) = stage_line(stage) {
                        let us = line["fields"]["elapsed_us"].as_i64().unwrap_or(0);
                        let finished = timestamp_us(line).unwrap_or(0);
                        intervals.push((finished - us, finished));
                        stage_us
                            .entry(stage.to_string())
                            .or_default()
                            .push(us as f64);
                    }
                }
                stage_us
                    .entry("between stages".to_string())
                    .or_default()
                    .push((end - start - covered_us(&mut intervals)) as f64);
            }
            let cpu_ticks = daemon.cpu_ticks()? - cpu_before;
            let d = median(&mut daemon_us);
            let f = median(&mut floor_us);
            report.row(
                format!(
                    "overhead per job, received → bundle uploaded, {label} (median of {count})"
                ),
                ms(d),
                ms(f),
                ratio(d, f),
                "≤ 1.15×",
            );
            let stages: Vec<String> = stage_us
                .iter_mut()
                .map(|(k, v)| format!("{k} {}", ms(median(v))))
                .collect();
            let floor_parts: Vec<String> = floor_steps
                .iter_mut()
                .map(|(k, v)| format!("{k} {}", ms(median(v))))
                .collect();
            report.note(format!(
                "{label}: orchgpu stages (median): {}; floor steps (median): {}; daemon CPU over these {} jobs (whole pipeline, incl. release/delete): {:.1} ms/job",
                stages.join(", "),
                floor_parts.join(", "),
                count + 1,
                cpu_ticks as f64 * 1000.0 / TICKS_PER_SEC / (count + 1) as f64
            ));
        }
        daemon.stop(&mut stack, Duration::from_secs(30)).await?;
        Ok(())
    })
}

/// One floor job: GET to a file, gzip file to file, PUT from the file, one SSGM alloc
/// (released afterwards, untimed). Returns each step's time in µs.
async fn floor_job(
    opts: &Opts,
    aws: &AwsClients,
    ssgm: &MockSsgm,
    bucket: &str,
    key: &str,
    out_bucket: &str,
) -> Result<Vec<(&'static str, f64)>> {
    let dir = opts.work.path();
    let input = dir.join("floor-input");
    let gz = dir.join("floor-input.gz");
    let mut steps = Vec::new();

    let t = Instant::now();
    let output = aws.s3.get_object().bucket(bucket).key(key).send().await?;
    let mut reader = output.body.into_async_read();
    let mut file = tokio::fs::File::create(&input).await?;
    tokio::io::copy_buf(&mut reader, &mut file).await?;
    file.flush().await?;
    drop(file);
    steps.push(("GET", t.elapsed().as_micros() as f64));

    let t = Instant::now();
    let (i2, g2) = (input.clone(), gz.clone());
    tokio::task::spawn_blocking(move || -> Result<()> {
        let mut src = std::fs::File::open(i2)?;
        let dst = std::fs::File::create(g2)?;
        let mut enc = flate2::write::GzEncoder::new(dst, flate2::Compression::fast());
        std::io::copy(&mut src, &mut enc)?;
        enc.finish()?.sync_data().ok();
        Ok(())
    })
    .await??;
    steps.push(("gzip", t.elapsed().as_micros() as f64));

    let t = Instant::now();
    aws.s3
        .put_object()
        .bucket(out_bucket)
        .key(format!("bundles/{key}.tar.gz"))
        .body(ByteStream::from_path(&gz).await?)
        .send()
        .await?;
    steps.push(("PUT", t.elapsed().as_micros() as f64));

    let t = Instant::now();
    let port = ssgm.port.to_string();
    let reply = tokio::process::Command::new(ssgm.bin())
        .args(["-S", "127.0.0.1", "-P", &port, "-alloc", "-g", "1"])
        .output()
        .await?;
    steps.push(("SSGM alloc", t.elapsed().as_micros() as f64));
    let text = String::from_utf8_lossy(&reply.stdout);
    if let Some(job) = text
        .split(';')
        .nth(1)
        .and_then(|f| f.split_once('='))
        .map(|(_, v)| v.trim().to_string())
    {
        tokio::process::Command::new(ssgm.bin())
            .args(["-S", "127.0.0.1", "-P", &port, "-dealloc", "-j", &job])
            .output()
            .await?;
    }
    Ok(steps)
}

// ---------------------------------------------------------------------------------------
// Scenario 2: result detection, result written → message deleted, vs one HEAD.

fn detection<'a>(
    opts: &'a Opts,
    sizes: &'a Sizes,
    aws: &'a AwsClients,
    report: &'a mut Report,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + 'a>> {
    Box::pin(async move {
        let ssgm = start_ssgm(opts, 8)?;
        let mut heads = Vec::new();
        for events in [true, false] {
            let (mut stack, results) =
                create_stack(opts, if events { "dete" } else { "detp" }).await?;
            let mut extra = vec!["--max-jobs", "1"];
            if events {
                extra.extend(["--results-queue", results.as_str()]);
            }
            let tag = if events {
                "detect-events"
            } else {
                "detect-poll"
            };
            let mut daemon = start_daemon(&mut stack, &ssgm, tag, &extra)?;
            daemon.ready().await?;
            let mut latencies = Vec::new();
            let mut to_event = Vec::new();
            // Simulated GPU work of varied length, so polling meets results at any phase.
            let delays_ms = [300u64, 800, 1500, 2500, 1100];
            for i in 0..sizes.detection {
                put_bytes(
                    aws,
                    &stack.input_bucket,
                    &format!("d{i}.jpg"),
                    pseudo_random(10_000, i as u64),
                )
                .await?;
                let id = next_bundle_id(aws, &stack.function_url).await?;
                tokio::time::sleep(Duration::from_millis(delays_ms[i % delays_ms.len()])).await;
                let result_key = format!("results/{id}.png");
                put_bytes(aws, &stack.output_bucket, &result_key, b"result".to_vec()).await?;
                let written = now_us();
                let deleted = daemon
                    .next_deletion(written, Duration::from_secs(120))
                    .await?;
                latencies.push((deleted - written) as f64);
                if let Some(event) = daemon
                    .log
                    .lines
                    .iter()
                    .filter(|l| message(l) == "Result event received.")
                    .filter_map(timestamp_us)
                    .find(|t| *t > written)
                {
                    to_event.push((event - written) as f64);
                }
                // The floor: one HEAD of that very result, timed now that all is quiet.
                let t = Instant::now();
                aws.s3
                    .head_object()
                    .bucket(&stack.output_bucket)
                    .key(&result_key)
                    .send()
                    .await?;
                heads.push(t.elapsed().as_micros() as f64);
            }
            let counts = daemon.stop(&mut stack, Duration::from_secs(30)).await?;
            let l = median(&mut latencies);
            let h = median(&mut heads.clone());
            if events {
                report.row(
                    format!(
                        "result detection, result written → message deleted, results queue (median of {})",
                        sizes.detection
                    ),
                    ms(l),
                    format!("{} (one HEAD)", ms(h)),
                    ratio(l, h),
                    "≤ 2×",
                );
            } else {
                report.row(
                    format!(
                        "result detection, HEAD polling, default -b 60 (median of {}, work 0.3–2.5 s)",
                        sizes.detection
                    ),
                    ms(l),
                    format!("{} (one HEAD)", ms(h)),
                    ratio(l, h),
                    "report",
                );
            }
            report.note(format!(
                "{tag}: requests per job {}",
                requests_text(&counts, sizes.detection)
            ));
            if !to_event.is_empty() {
                let e = median(&mut to_event);
                report.note(format!(
                    "{tag}: result written → event routed to the job {} (median), then release + delete {}",
                    ms(e),
                    ms(l - e)
                ));
            }
        }
        Ok(())
    })
}

/// Receives the function queue until a bundle event arrives; returns its job id.
async fn next_bundle_id(aws: &AwsClients, fn_url: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let output = aws
            .sqs
            .receive_message()
            .queue_url(fn_url)
            .max_number_of_messages(1)
            .wait_time_seconds(5)
            .send()
            .await?;
        for m in output.messages.unwrap_or_default() {
            if let Some(receipt) = &m.receipt_handle {
                aws.sqs
                    .delete_message()
                    .queue_url(fn_url)
                    .receipt_handle(receipt)
                    .send()
                    .await?;
            }
            if let Notification::Objects { objects, .. } =
                parse_notification(m.body.as_deref().unwrap_or(""))
                && let Some(object) = objects.first()
            {
                let name = object.key.rsplit('/').next().unwrap_or("");
                return Ok(name.trim_end_matches(".tar.gz").to_string());
            }
        }
    }
    bail!("no bundle event within 60 s")
}

// ---------------------------------------------------------------------------------------
// Scenario 3: throughput, 300 jobs on 8 GPUs, vs the emulator's own
// put → event → receive → delete ceiling. Also gives requests, CPU and SSGM calls per job.

fn throughput<'a>(
    opts: &'a Opts,
    sizes: &'a Sizes,
    aws: &'a AwsClients,
    report: &'a mut Report,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + 'a>> {
    Box::pin(async move {
        let jobs = sizes.throughput;
        let size = 100 * 1000;

        // The ceiling, measured before and after orchgpu's run (this machine is noisy).
        let emulator = emulator_pid();
        let emu_before = emulator.map(cpu_ticks).transpose()?;
        let t = Instant::now();
        let ceiling_before = ceiling(opts, aws, jobs, size).await?;
        let ceiling_emu =
            emulator
                .map(cpu_ticks)
                .transpose()?
                .zip(emu_before)
                .map(|(after, before)| {
                    (after - before) as f64 / TICKS_PER_SEC / t.elapsed().as_secs_f64() * 100.0
                });

        // orchgpu: the whole pipeline with the instant function and a results queue.
        let ssgm = start_ssgm(opts, 8)?;
        let (mut stack, results) = create_stack(opts, "thr").await?;
        let _function = start_function(opts, &mut stack, "instant.sh")?;
        let mut daemon = start_daemon(
            &mut stack,
            &ssgm,
            "throughput",
            &["--max-jobs", "8", "--results-queue", &results],
        )?;
        daemon.ready().await?;
        let perf = start_perf(&mut stack, daemon.pid, "throughput")?;
        let cpu_before = daemon.cpu_ticks()?;
        let emu_at_start = emulator.map(cpu_ticks).transpose()?;
        let start = now_us();
        put_many(aws, &stack.input_bucket, "t", jobs, size, 8).await?;
        daemon
            .wait_deleted(jobs + 1, Duration::from_secs(900))
            .await?;
        let end = daemon.deletions().max().unwrap_or(start);
        let cpu = daemon.cpu_ticks()? - cpu_before;
        let daemon_emu =
            emulator
                .map(cpu_ticks)
                .transpose()?
                .zip(emu_at_start)
                .map(|(after, before)| {
                    (after - before) as f64 / TICKS_PER_SEC / ((now_us() - start) as f64 / 1e6)
                        * 100.0
                });
        stop_perf(&mut stack, perf).await;
        let rate = jobs as f64 / ((end - start) as f64 / 1e6);
        let [alloc, busy, dealloc] = ssgm.counters(["alloc_calls", "busy", "dealloc_calls"])?;
        let counts = daemon.stop(&mut stack, Duration::from_secs(30)).await?;
        let ceiling_after = ceiling(opts, aws, jobs, size).await?;
        let ceiling = (ceiling_before + ceiling_after) / 2.0;
        report.row(
            format!("throughput, {jobs} jobs of 100 KB, 8 GPUs (jobs/s)"),
            format!("{rate:.1}"),
            format!("{ceiling:.1} (put→event→receive→delete)"),
            ratio(rate, ceiling),
            "≥ 0.8×",
        );
        report.note(format!(
            "throughput: ceiling {ceiling_before:.1} jobs/s before and {ceiling_after:.1} after orchgpu's run; emulator CPU {} during the ceiling run, {} during orchgpu's",
            ceiling_emu.map_or("n/a".into(), |p| format!("{p:.0}%")),
            daemon_emu.map_or("n/a".into(), |p| format!("{p:.0}%")),
        ));
        report.row(
            format!("CPU time per job (user+sys), {jobs} jobs of 100 KB"),
            format!(
                "{:.2} ms",
                cpu as f64 * 1000.0 / TICKS_PER_SEC / jobs as f64
            ),
            "—",
            "—",
            "< 5 ms",
        );
        let per = |op: &str| *counts.get(op).unwrap_or(&0) as f64 / jobs as f64;
        report.row(
            "AWS requests per job (jobs queue + results queue + S3)",
            format!(
                "{:.2} total",
                counts.values().sum::<u64>() as f64 / jobs as f64
            ),
            "receive ≤ 1, get 1, put 1, delete 1",
            "—",
            "no request the job did not need",
        );
        report.note(format!(
            "requests per job by operation ({jobs} jobs; receives count both queues, including empty long polls): {}",
            requests_text(&counts, jobs)
        ));
        report.note(format!(
            "GET {:.2}, PUT {:.2}, HEAD {:.2} per job",
            per("S3.GetObject"),
            per("S3.PutObject"),
            per("S3.HeadObject")
        ));
        report.row(
            "SSGM calls per job, ample GPUs",
            format!(
                "{:.2} (alloc {alloc}, busy {busy}, dealloc {dealloc})",
                (alloc + dealloc) as f64 / jobs as f64
            ),
            "2",
            ratio((alloc + dealloc) as f64 / jobs as f64, 2.0),
            "exactly 2",
        );
        Ok(())
    })
}

/// The emulator's own ceiling: `jobs` puts with 8 in flight to a bucket that notifies a
/// queue, two receivers that delete each message; jobs per second, first put to last
/// delete.
async fn ceiling(opts: &Opts, aws: &AwsClients, jobs: usize, size: usize) -> Result<f64> {
    let (stack, _) = create_stack(opts, "ceil").await?;
    let jobs_url = stack.jobs_url.clone();
    let deleted = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut receivers = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let (aws, url, deleted) = (aws.clone(), jobs_url.clone(), deleted.clone());
        receivers.spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(300);
            while deleted.load(Ordering::Relaxed) < jobs && Instant::now() < deadline {
                let output = aws
                    .sqs
                    .receive_message()
                    .queue_url(&url)
                    .max_number_of_messages(10)
                    .wait_time_seconds(1)
                    .send()
                    .await?;
                for m in output.messages.unwrap_or_default() {
                    aws.sqs
                        .delete_message()
                        .queue_url(&url)
                        .set_receipt_handle(m.receipt_handle)
                        .send()
                        .await?;
                    if matches!(
                        parse_notification(m.body.as_deref().unwrap_or("")),
                        Notification::Objects { .. }
                    ) {
                        deleted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    put_many(aws, &stack.input_bucket, "c", jobs, size, 8).await?;
    while let Some(r) = receivers.join_next().await {
        r??;
    }
    Ok(jobs as f64 / t0.elapsed().as_secs_f64())
}

/// The emulator's pid, when `bench/run.sh` started it (for its CPU use).
fn emulator_pid() -> Option<u32> {
    std::env::var("ORCHGPU_BENCH_EMULATOR_PID")
        .ok()
        .and_then(|p| p.parse().ok())
}

// ---------------------------------------------------------------------------------------
// Scenario 4: SSGM calls with 1 GPU and 20 jobs of 2 s.

fn contended<'a>(
    opts: &'a Opts,
    sizes: &'a Sizes,
    aws: &'a AwsClients,
    report: &'a mut Report,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + 'a>> {
    Box::pin(async move {
        let jobs = sizes.contended;
        let ssgm = start_ssgm(opts, 1)?;
        let (mut stack, results) = create_stack(opts, "cont").await?;
        let _function = start_function(opts, &mut stack, "two-seconds.sh")?;
        let mut daemon = start_daemon(
            &mut stack,
            &ssgm,
            "contended",
            &["--results-queue", &results],
        )?;
        daemon.ready().await?;
        put_many(aws, &stack.input_bucket, "g", jobs, 1000, 4).await?;
        daemon
            .wait_deleted(jobs + 1, Duration::from_secs(30 + 5 * jobs as u64))
            .await?;
        let [alloc, busy, dealloc] = ssgm.counters(["alloc_calls", "busy", "dealloc_calls"])?;
        daemon.stop(&mut stack, Duration::from_secs(30)).await?;
        let per = (alloc + dealloc) as f64 / jobs as f64;
        report.row(
            format!("SSGM calls per job, 1 GPU, {jobs} jobs of 2 s"),
            format!("{per:.2} (alloc {alloc}, busy {busy}, dealloc {dealloc})"),
            "2",
            ratio(per, 2.0),
            "≤ 1.5×",
        );
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Scenario 5: peak RSS, 20 concurrent jobs of big inputs vs of 1 MB inputs.

fn memory<'a>(
    opts: &'a Opts,
    sizes: &'a Sizes,
    aws: &'a AwsClients,
    report: &'a mut Report,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + 'a>> {
    Box::pin(async move {
        let mut peaks = Vec::new();
        for mb in [1, sizes.memory_big_mb] {
            let (mut stack, _) = create_stack(opts, &format!("mem{mb}")).await?;
            let ssgm = start_ssgm(opts, 20)?;
            // One input file on disk, uploaded 20 times (multipart when large).
            let file = opts.work.path().join(format!("input-{mb}"));
            {
                let mut out = std::io::BufWriter::new(std::fs::File::create(&file)?);
                for chunk in 0..mb {
                    out.write_all(&pseudo_random(1_000_000, (chunk + 7) as u64))?;
                }
                out.flush()?;
            }
            let mut uploads = tokio::task::JoinSet::new();
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..4 {
                let (s3, bucket, file, next) = (
                    aws.s3.clone(),
                    stack.input_bucket.clone(),
                    file.clone(),
                    next.clone(),
                );
                uploads.spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= 20 {
                            return Ok::<_, anyhow::Error>(());
                        }
                        orchgpu::storage::upload_file(
                            &s3,
                            &file,
                            &bucket,
                            &format!("m{i}.jpg"),
                            "image/jpeg",
                        )
                        .await?;
                    }
                });
            }
            while let Some(r) = uploads.join_next().await {
                r??;
            }
            let tag = format!("memory-{mb}");
            let mut daemon = start_daemon(
                &mut stack,
                &ssgm,
                &tag,
                &["--max-jobs", "20", "-v", "300", "--shutdown-grace", "0"],
            )?;
            // RSS every 20 ms, to tell which stage the peak falls in.
            let pid = daemon.pid;
            let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
            let sampler = tokio::spawn({
                let sampling = sampling.clone();
                async move {
                    let mut peak = (0i64, 0u64);
                    while sampling.load(Ordering::Relaxed) {
                        if let Ok((_, rss)) = memory_kib(pid)
                            && rss > peak.1
                        {
                            peak = (now_us(), rss);
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    peak
                }
            });
            daemon
                .wait_uploaded(20, Duration::from_secs(if mb > 1 { 900 } else { 120 }))
                .await?;
            let (hwm, _) = memory_kib(daemon.pid)?;
            sampling.store(false, Ordering::Relaxed);
            let (peak_at, _) = sampler.await?;
            let finished = |stage: &str| {
                daemon
                    .log
                    .lines
                    .iter()
                    .filter(|l| {
                        message(l) == "Stage finished."
                            && l["fields"]["stage"] == stage
                            && timestamp_us(l).unwrap_or(i64::MAX) <= peak_at
                    })
                    .count()
            };
            report.note(format!(
                "memory: {mb} MB inputs: highest sampled RSS came when {} downloads, {} bundles and {} uploads of 20 had finished",
                finished("download"),
                finished("bundle"),
                finished("upload")
            ));
            let [max_live] = ssgm.counters(["max_live"])?;
            daemon.stop(&mut stack, Duration::from_secs(60)).await?;
            let _ = std::fs::remove_file(&file);
            peaks.push(hwm);
            report.note(format!(
                "memory: {mb} MB inputs: peak RSS (VmHWM) {:.1} MB, at most {max_live} jobs held GPUs at once",
                hwm as f64 / 1024.0
            ));
        }
        let (small, big) = (peaks[0] as f64 / 1024.0, peaks[1] as f64 / 1024.0);
        report.row(
            format!(
                "peak RSS, 20 concurrent jobs of {} MB vs of 1 MB inputs",
                sizes.memory_big_mb
            ),
            format!("{big:.1} MB"),
            format!("{small:.1} MB (1 MB inputs)"),
            format!("+{:.1} MB", big - small),
            "flat (≤ 10 MB) and < 64 MB",
        );
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Scenario 6: 1,000 jobs waiting on results at once.

fn waiting<'a>(
    opts: &'a Opts,
    sizes: &'a Sizes,
    aws: &'a AwsClients,
    report: &'a mut Report,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + 'a>> {
    Box::pin(async move {
        let jobs = sizes.waiting;
        let (mut stack, results) = create_stack(opts, "wait").await?;
        let ssgm = start_ssgm(opts, jobs as u32)?;
        put_many(aws, &stack.input_bucket, "w", jobs, 1000, 16).await?;
        let max_jobs = jobs.to_string();
        let mut daemon = start_daemon(
            &mut stack,
            &ssgm,
            "waiting",
            &[
                "--max-jobs",
                &max_jobs,
                "--results-queue",
                &results,
                "--shutdown-grace",
                "0",
            ],
        )?;
        let t0 = Instant::now();
        daemon.wait_uploaded(jobs, Duration::from_secs(600)).await?;
        let fill = t0.elapsed();
        let pid = daemon.pid;
        let before = cpu_ticks(pid)?;
        let t = Instant::now();
        tokio::time::sleep(sizes.waiting_window).await;
        let cpu = cpu_ticks(pid)? - before;
        let window = t.elapsed().as_secs_f64();
        let (hwm, rss) = memory_kib(pid)?;
        let stop = daemon.stop(&mut stack, Duration::from_secs(180)).await;
        let cpu_pct = cpu as f64 / TICKS_PER_SEC / window * 100.0;
        report.row(
            format!(
                "{jobs} jobs waiting on results at once (defaults -v 30, -b 60, results queue)"
            ),
            format!(
                "RSS {:.1} MB (peak {:.1} MB), CPU {cpu_pct:.1}% of a core",
                rss as f64 / 1024.0,
                hwm as f64 / 1024.0
            ),
            "—",
            "—",
            "RSS < 100 MB, CPU < 5%",
        );
        report.note(format!(
            "waiting: {jobs} jobs reached the wait in {:.0} s; CPU measured over {window:.0} s",
            fill.as_secs_f64()
        ));
        match stop {
            Ok(counts) => report.note(format!(
                "waiting: requests per job over the whole run: {}",
                requests_text(&counts, jobs)
            )),
            Err(e) => report.note(format!("waiting: {e:#}")),
        }
        Ok(())
    })
}
