//! Event-driven results: with `--results-queue`, a job ends on the output bucket's event,
//! not on a HEAD poll; the events are deleted; the request counts reach the stats file.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::Value;

use crate::harness::{MockSsgm, Stack, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_queue_events_end_jobs_without_waiting_for_a_poll() -> Result<()> {
    let ssgm = MockSsgm::start(2)?;
    let mut stack = Stack::new("resq", 5).await?;
    let (results_queue, results_url) = stack.add_results_queue().await?;
    let stats_file = stack.logs.path().join("stats.json");
    stack.start_function("copy-result.sh")?;
    // With -b 60 the first HEAD comes a minute after the upload: only the event can end
    // these jobs within the test's bound.
    let daemon = stack.start_daemon(
        &ssgm,
        &[
            "-b",
            "60",
            "--results-queue",
            &results_queue,
            "--stats-file",
            stats_file.to_str().expect("utf-8 temp path"),
        ],
    )?;
    let started = Instant::now();
    for i in 0..3 {
        stack
            .upload(&format!("image-{i}.jpg"), format!("input {i}").as_bytes())
            .await?;
    }
    stack.wait_for_empty_queues(Duration::from_secs(40)).await?;
    assert!(
        started.elapsed() < Duration::from_secs(45),
        "jobs took {:?}: the results were found by polling, not by event",
        started.elapsed()
    );
    let results = stack.results_by_source_key().await?;
    assert_eq!(results.len(), 3, "results: {:?}", results.keys());
    // The results queue's events (and its s3:TestEvent) are deleted once routed.
    wait_for("empty results queue", Duration::from_secs(20), || async {
        Ok((stack.queue_depth(&results_url).await? == 0).then_some(()))
    })
    .await?;
    ssgm.assert_all_released()?;

    stack
        .process(daemon)
        .signal(nix::sys::signal::Signal::SIGTERM)?;
    let status = stack
        .process(daemon)
        .wait_exit(Duration::from_secs(30))
        .await?;
    assert!(status.success(), "daemon exited with {status}");
    assert!(
        stack.log(daemon).contains("Requests made."),
        "no request totals in the log"
    );
    let stats: Value = serde_json::from_str(&std::fs::read_to_string(&stats_file)?)?;
    let requests = &stats["requests"];
    assert_eq!(stats["version"], 1);
    // The 3 inputs, and the start-up check of the claims location.
    assert_eq!(requests["S3.GetObject"], 4, "stats: {stats}");
    // Per job: the bundle and its claim (created, then deleted once the result is there).
    assert_eq!(requests["S3.PutObject"], 6, "stats: {stats}");
    assert_eq!(requests["S3.DeleteObject"], 3, "stats: {stats}");
    // The jobs queue's 4 messages (3 jobs + the s3:TestEvent) were all deleted (the queue
    // is empty). A delete goes alone when none is in flight, so the test event's and the
    // first job's did; jobs ending within one request of each other share a
    // DeleteMessageBatch, counted below with the results queue's.
    let single_deletes = requests["SQS.DeleteMessage"].as_u64().unwrap_or(0);
    assert!(
        (2..=4).contains(&single_deletes),
        "3 jobs + test event: {stats}"
    );
    // One HEAD per job, before it starts (is the result already there?); none while
    // waiting for it: the events ended the waits.
    assert_eq!(requests["S3.HeadObject"], 3, "stats: {stats}");
    assert!(requests["SQS.DeleteMessageBatch"].as_u64().unwrap_or(0) >= 1);
    Ok(())
}
