//! Scenario `detection`: the time from a result written to its message deleted, with a
//! results queue and with HEAD polling, against one HEAD of that result.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use orchgpu::aws::AwsClients;
use orchgpu::job::event::{Notification, parse_notification};
use orchgpu_testkit::{message, timestamp_us};

use crate::Opts;
use crate::harness::{create_stack, start_daemon, start_ssgm};
use crate::load::{pseudo_random, put_bytes};
use crate::measure::now_us;
use crate::report::{Report, median, ms, ratio, requests_text};

pub(crate) async fn detection(opts: &Opts, aws: &AwsClients, report: &mut Report) -> Result<()> {
    let sizes = &opts.sizes;
    let ssgm = start_ssgm(opts, 8)?;
    let mut heads = Vec::new();
    for events in [true, false] {
        let (mut stack, results) = create_stack(opts, if events { "dete" } else { "detp" }).await?;
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
