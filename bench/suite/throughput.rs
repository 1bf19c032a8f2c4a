//! Scenario `throughput`: jobs per second with 8 GPUs, against the emulator's own
//! put → event → receive → delete ceiling; also CPU, AWS requests and SSGM calls per job.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use orchgpu::aws::AwsClients;
use orchgpu::job::event::{Notification, parse_notification};

use crate::Opts;
use crate::harness::{create_stack, start_daemon, start_function, start_ssgm};
use crate::load::put_many;
use crate::measure::{TICKS_PER_SEC, cpu_percent, cpu_ticks, now_us, start_perf, stop_perf};
use crate::report::{Report, ratio, requests_text};

pub(crate) async fn throughput(opts: &Opts, aws: &AwsClients, report: &mut Report) -> Result<()> {
    let sizes = &opts.sizes;
    let jobs = sizes.throughput;
    let size = 100 * 1000;

    // The ceiling, measured before and after orchgpu's run (this machine is noisy).
    let emulator = emulator_pid();
    let emu_before = emulator.map(cpu_ticks).transpose()?;
    let t = Instant::now();
    let ceiling_before = ceiling(opts, aws, jobs, size).await?;
    let ceiling_emu = emulator_cpu(emulator, emu_before, t.elapsed().as_secs_f64())?;

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
    let daemon_emu = emulator_cpu(emulator, emu_at_start, (now_us() - start) as f64 / 1e6)?;
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

/// The emulator's CPU use since `before` (its ticks then) over `seconds`, in % of a core;
/// `None` without its pid.
fn emulator_cpu(emulator: Option<u32>, before: Option<u64>, seconds: f64) -> Result<Option<f64>> {
    let after = emulator.map(cpu_ticks).transpose()?;
    Ok(after
        .zip(before)
        .map(|(after, before)| cpu_percent(after - before, seconds)))
}
