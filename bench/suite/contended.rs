//! Scenario `contended`: SSGM calls per job when 1 GPU serves many jobs of 2 s.

use std::time::Duration;

use anyhow::Result;
use orchgpu::aws::AwsClients;

use crate::Opts;
use crate::harness::{create_stack, start_daemon, start_function, start_ssgm};
use crate::load::put_many;
use crate::report::{Report, ratio};

pub(crate) async fn contended(opts: &Opts, aws: &AwsClients, report: &mut Report) -> Result<()> {
    let sizes = &opts.sizes;
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
}
