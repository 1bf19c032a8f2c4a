//! Scenario `memory`: peak RSS with 20 concurrent jobs of big inputs against 1 MB inputs,
//! and the stage the peak falls in.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Result;
use orchgpu::aws::AwsClients;
use orchgpu_testkit::{message, timestamp_us};

use crate::Opts;
use crate::harness::{create_stack, start_daemon, start_ssgm};
use crate::load::pseudo_random;
use crate::measure::{memory_kib, now_us};
use crate::report::Report;

pub(crate) async fn memory(opts: &Opts, aws: &AwsClients, report: &mut Report) -> Result<()> {
    let sizes = &opts.sizes;
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
                    orchgpu::aws::storage::upload_file(
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
}
