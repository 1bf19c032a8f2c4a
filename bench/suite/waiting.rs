//! Scenario `waiting`: memory and CPU of a daemon with many jobs waiting on their results
//! at once.

use std::time::{Duration, Instant};

use anyhow::Result;
use orchgpu::aws::AwsClients;

use crate::Opts;
use crate::harness::{create_stack, start_daemon, start_ssgm};
use crate::load::put_many;
use crate::measure::{cpu_percent, cpu_ticks, memory_kib};
use crate::report::{Report, requests_text};

pub(crate) async fn waiting(opts: &Opts, aws: &AwsClients, report: &mut Report) -> Result<()> {
    let sizes = &opts.sizes;
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
    let cpu_pct = cpu_percent(cpu, window);
    report.row(
        format!("{jobs} jobs waiting on results at once (defaults -v 30, -b 60, results queue)"),
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
}
