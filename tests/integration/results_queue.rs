//! Event-driven results: with `--results-queue`, a job ends on the output bucket's event,
//! not on a HEAD poll; the events are deleted; the request counts reach the stats file.
//! Request counts are checked as the bounds this feature promises, not exact totals that
//! every other feature's requests would move.

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
    let count = |operation: &str| requests[operation].as_u64().unwrap_or(0);
    assert_eq!(stats["version"], 1);
    // What this feature promises, as bounds that other features' requests do not move:
    // no HEAD while a job waits (the event ends the wait), so at most the one check per
    // job before it starts (is the result already there?).
    assert!(count("S3.HeadObject") <= 3, "a HEAD while waiting: {stats}");
    // Both queues are received from, and the counts reach the stats file.
    assert!(count("SQS.ReceiveMessage") >= 2, "stats: {stats}");
    assert!(count("S3.GetObject") >= 3, "3 inputs, stats: {stats}");
    assert!(count("S3.PutObject") >= 3, "3 bundles, stats: {stats}");
    // Every message of both queues was deleted (they are empty, above), singly or in
    // batches.
    assert!(
        count("SQS.DeleteMessage") + count("SQS.DeleteMessageBatch") >= 1,
        "stats: {stats}"
    );
    Ok(())
}
