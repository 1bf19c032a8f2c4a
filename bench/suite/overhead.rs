//! Scenario `overhead`: the time per job from message received to bundle uploaded, against
//! a plain loop doing the same GET, gzip, PUT and one SSGM call (the floor).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use aws_sdk_s3::primitives::ByteStream;
use orchgpu::aws::AwsClients;
use orchgpu_testkit::{MockSsgm, create_queue, job_id, message, notify, queue_arn, timestamp_us};
use tokio::io::AsyncWriteExt;

use crate::Opts;
use crate::harness::{create_stack, start_daemon, start_function, start_ssgm};
use crate::load::{pseudo_random, put_bytes};
use crate::measure::TICKS_PER_SEC;
use crate::report::{Report, covered_us, median, ms, ratio};

pub(crate) async fn overhead(opts: &Opts, aws: &AwsClients, report: &mut Report) -> Result<()> {
    let sizes = &opts.sizes;
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
                    timestamp_us(l).unwrap_or(0) - l["fields"]["elapsed_us"].as_i64().unwrap_or(0)
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
            format!("overhead per job, received → bundle uploaded, {label} (median of {count})"),
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
