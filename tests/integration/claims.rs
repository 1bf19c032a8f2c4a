//! Each object version runs once across daemons (the claim in S3), a download gets exactly
//! the version its event names, and an S3 event orchgpu cannot process is dead-lettered,
//! not dropped.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Result, anyhow};
use aws_sdk_s3::primitives::ByteStream;
use orchgpu::job::JobId;
use orchgpu::job::event::{Notification, parse_notification};
use serde_json::Value;

use crate::harness::{MockSsgm, Proxy, Stack};
use crate::reliability::{Hold, wait_for_live};

/// The notification S3 sent for an object, sent again (LocalStack 4.13 and moto 5.2 both
/// send the object's ETag, so both name the same job).
async fn same_notification(stack: &Stack, key: &str) -> Result<String> {
    stack.duplicate_notification(key).await
}

fn job_id_of(body: &str) -> Result<JobId> {
    match parse_notification(body) {
        Notification::Objects { objects, .. } => Ok(JobId::derive(&objects[0])),
        other => Err(anyhow!("not an object event: {other:?}")),
    }
}

/// What a daemon logs when it deletes a copy of a job that another daemon runs from the
/// job's own message.
const DUPLICATE_DELETED: &str = "Duplicate of a job another daemon runs";

fn count_in_logs(stack: &Stack, daemons: &[usize], needle: &str) -> usize {
    daemons
        .iter()
        .map(|&d| stack.log(d).matches(needle).count())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_with_every_object_notified_twice_at_once_run_each_once() -> Result<()> {
    const OBJECTS: usize = 10;
    // GPUs and slots for every message: each daemon may take ten, so the two notifications
    // of an object can land in different daemons.
    let ssgm = MockSsgm::start(20)?;
    let mut stack = Stack::new("claims2x", 5).await?;
    // Claims beside the bundles, in the intermediate bucket: the function's notification
    // filter (prefix bundles/v1/, suffix .tar.gz) must keep them away from it.
    let claims = format!("{}/claims", stack.work_bucket);
    // Results wait until both daemons have met each other's claims: without the hold, a
    // fast emulator may finish a job before its duplicate is even received.
    let hold = stack.logs.path().join("hold");
    std::fs::write(&hold, b"")?;
    let hold_env = hold.display().to_string();
    stack.start_function_with("held-copy.sh", &[("ORCHGPU_TEST_HOLD", &hold_env)])?;
    for i in 0..OBJECTS {
        stack
            .upload(
                &format!("twice-{i:02}.png"),
                format!("object {i}").as_bytes(),
            )
            .await?;
    }
    for i in 0..OBJECTS {
        let again = same_notification(&stack, &format!("twice-{i:02}.png")).await?;
        stack.send_raw(&again).await?;
    }
    // Both daemons start on a queue that already holds both notifications of each object.
    let extra = [
        "--claims",
        &claims,
        "--claim-lease",
        "6",
        "-s",
        "2",
        "--max-jobs",
        "10",
    ];
    let a_state = stack.state_dir("a");
    let b_state = stack.state_dir("b");
    let a = stack.start_daemon(&ssgm, &[&extra[..], &["--state-dir", &a_state]].concat())?;
    let b = stack.start_daemon(&ssgm, &[&extra[..], &["--state-dir", &b_state]].concat())?;
    let met = crate::harness::wait_for("a claim held elsewhere", Duration::from_secs(60), || {
        let found = count_in_logs(&stack, &[a, b], DUPLICATE_DELETED) > 0;
        async move { Ok(found.then_some(())) }
    })
    .await;
    std::fs::remove_file(&hold)?;
    met?;

    stack
        .wait_for_results(OBJECTS, Duration::from_secs(120))
        .await?;
    stack.wait_for_empty_queues(Duration::from_secs(60)).await?;
    let results = stack.results_by_source_key().await?;
    assert_eq!(results.len(), OBJECTS, "{:?}", results.keys());
    for (key, bodies) in &results {
        assert_eq!(bodies.len(), 1, "{key} has {} results", bodies.len());
    }
    let invocations: HashMap<String, usize> = stack.invocations();
    assert_eq!(invocations.len(), OBJECTS, "{invocations:?}");
    for (bundle, count) in &invocations {
        assert_eq!(*count, 1, "{bundle} ran {count} times");
        assert!(
            bundle.starts_with(&format!("{}/", stack.work_dir)),
            "the function was invoked on {bundle}, which is not a bundle"
        );
    }
    assert_eq!(ssgm.stat("granted")?, OBJECTS as u64, "GPU jobs run");
    assert!(
        count_in_logs(&stack, &[a, b], DUPLICATE_DELETED) > 0,
        "no notification met another daemon's claim: the test did not exercise it"
    );
    // Finished jobs leave no claim.
    let left = stack.keys(&stack.work_bucket, "claims/").await?;
    assert!(left.is_empty(), "claims left behind: {left:?}");
    ssgm.wait_all_released(Duration::from_secs(10)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_daemons_claim_is_taken_over_by_exactly_one_daemon_when_it_expires() -> Result<()> {
    let ssgm = MockSsgm::start(2)?;
    let mut stack = Stack::new("takeover", 10).await?;
    stack.start_function("copy-result.sh")?;
    stack
        .upload("ghost.png", b"claimed by a dead daemon")
        .await?;
    let again = same_notification(&stack, "ghost.png").await?;
    let id = job_id_of(&again)?;
    // A claim of a daemon that died: it holds for 3 s more, and nobody renews it.
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let body = serde_json::json!({
        "version": 1,
        "job_id": id.to_string(),
        "owner": {"host": "ghost", "pid": 1, "started_unix": 1},
        "expires_unix_ms": now_ms + 3_000,
    });
    let claim_key = format!("orchgpu-claims/{id}.claim");
    stack
        .s3
        .put_object()
        .bucket(&stack.output_bucket)
        .key(&claim_key)
        .body(ByteStream::from(body.to_string().into_bytes()))
        .send()
        .await?;
    for _ in 0..3 {
        stack.send_raw(&again).await?;
    }
    // One message each at a time, so both daemons meet the claim and, when it expires,
    // both try to take it over.
    let extra = ["--claim-lease", "6", "--max-jobs", "1"];
    let a_state = stack.state_dir("a");
    let b_state = stack.state_dir("b");
    let started = Instant::now();
    let a = stack.start_daemon(&ssgm, &[&extra[..], &["--state-dir", &a_state]].concat())?;
    let b = stack.start_daemon(&ssgm, &[&extra[..], &["--state-dir", &b_state]].concat())?;

    stack.wait_for_results(1, Duration::from_secs(60)).await?;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the job ran while the dead daemon's claim still held"
    );
    stack.wait_for_empty_queues(Duration::from_secs(60)).await?;
    assert_eq!(ssgm.stat("granted")?, 1, "more than one daemon ran the job");
    let invocations = stack.invocations();
    assert_eq!(invocations.values().sum::<usize>(), 1, "{invocations:?}");
    assert!(
        count_in_logs(&stack, &[a, b], "ghost:1") > 0,
        "no daemon reported the dead daemon's claim"
    );
    assert_eq!(
        count_in_logs(&stack, &[a, b], "why=\"expired\""),
        1,
        "the expired claim must be taken over exactly once"
    );
    let left = stack.keys(&stack.output_bucket, "orchgpu-claims/").await?;
    assert!(left.is_empty(), "claims left behind: {left:?}");
    ssgm.wait_all_released(Duration::from_secs(10)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_gives_up_its_claim_so_the_retry_runs_at_once() -> Result<()> {
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("claimfail", 5).await?;
    stack.start_function("copy-result.sh")?;
    // A long lease: a retry that had to wait for it would come a minute late. The retry
    // comes 4 s after the failure: long enough to look at the claim in between.
    let daemon = stack.start_daemon(
        &ssgm,
        &["--claim-lease", "60", "--retry-backoff", "4", "-v", "30"],
    )?;
    ssgm.inject("error", 1)?;
    let started = Instant::now();
    stack.upload("retry.png", b"fails once").await?;
    stack
        .wait_for_log(daemon, "Job failed.", 1, Duration::from_secs(30))
        .await?;
    // The failed attempt ended its claim (this daemon would take over its own live claim
    // at once, so only the claim itself shows that it was given up).
    let ended = crate::harness::wait_for(
        "the failed job's claim ended",
        Duration::from_secs(3),
        || async {
            Ok(stack
                .keys(&stack.output_bucket, "orchgpu-claims/")
                .await?
                .is_empty()
                .then_some(()))
        },
    )
    .await;
    assert!(
        stack.log(daemon).matches("Claim lease").count() == 0 && ended.is_ok(),
        "the failed job's claim was left: {ended:?}"
    );
    stack.wait_for_results(1, Duration::from_secs(40)).await?;
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "the retry waited for the lease"
    );
    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;
    assert!(
        stack.log(daemon).contains("Job failed."),
        "the fault did not apply"
    );
    assert!(!stack.log(daemon).contains("Job held elsewhere"));
    let left = stack.keys(&stack.output_bucket, "orchgpu-claims/").await?;
    assert!(left.is_empty(), "claims left behind: {left:?}");
    ssgm.wait_all_released(Duration::from_secs(10)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_overwritten_before_its_download_runs_only_as_its_new_version() -> Result<()> {
    let ssgm = MockSsgm::start(2)?;
    let mut stack = Stack::new("overwrite", 5).await?;
    stack.start_function("copy-result.sh")?;
    // Both versions are notified before any daemon runs: the first event's download
    // would otherwise get the second version's bytes.
    let first = stack
        .upload_etag("photo.png", b"version one".to_vec())
        .await?;
    let second = stack
        .upload_etag("photo.png", b"version two, longer".to_vec())
        .await?;
    assert_ne!(first, second);
    let daemon = stack.start_daemon(&ssgm, &[])?;

    stack.wait_for_results(1, Duration::from_secs(60)).await?;
    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;
    let results = stack.results_by_source_key().await?;
    let bodies = results
        .get("photo.png")
        .ok_or_else(|| anyhow!("no result for photo.png"))?;
    assert_eq!(bodies.len(), 1, "the object ran {} times", bodies.len());
    assert_eq!(bodies[0], b"version two, longer");
    // The one result is the second version's job, under its own id.
    let mut manifests: Vec<Value> = Vec::new();
    for key in stack.output_keys().await? {
        if key.ends_with(".json") {
            manifests.push(serde_json::from_slice(
                &stack.get(&stack.output_bucket, &key).await?,
            )?);
        }
    }
    assert_eq!(manifests.len(), 1);
    assert_eq!(manifests[0]["source"]["etag"], Value::from(second.clone()));
    assert!(
        stack.log(daemon).contains("superseded"),
        "the first event was not reported as superseded"
    );
    assert_eq!(stack.queue_depth(&stack.dlq_url).await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_of_an_unknown_version_reaches_the_dead_letter_queue() -> Result<()> {
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("evversion", 2).await?;
    let daemon = stack.start_daemon(&ssgm, &[])?;
    let future = stack
        .object_created_event("from-the-future.png", "abc")
        .replace("\"2.1\"", "\"3.0\"");
    assert!(future.contains("\"3.0\""));
    stack.send_raw(&future).await?;
    // Junk that can never be a job is still deleted at once.
    stack.send_raw("not json at all").await?;

    crate::harness::wait_for(
        "the event in the dead-letter queue",
        Duration::from_secs(60),
        || async { Ok((stack.queue_depth(&stack.dlq_url).await? == 1).then_some(())) },
    )
    .await?;
    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;
    let log = stack.log(daemon);
    assert!(
        log.contains("Cannot process this S3 event")
            && log.contains("unsupported eventVersion 3.0"),
        "no log line names what was wrong"
    );
    assert!(log.contains("Dropping message that is not an S3 object event."));
    let moved = stack
        .sqs
        .receive_message()
        .queue_url(&stack.dlq_url)
        .send()
        .await?;
    let body = moved
        .messages
        .unwrap_or_default()
        .into_iter()
        .next()
        .and_then(|m| m.body)
        .unwrap_or_default();
    assert_eq!(body, future, "the dead-letter queue holds something else");
    Ok(())
}

/// One run of `JOBS` jobs through one daemon; returns (AWS requests by operation, claim
/// stage latencies in µs, job latencies in ms).
async fn measure(claims: bool) -> Result<(Value, Vec<u64>, Vec<u64>)> {
    const JOBS: usize = 40;
    let ssgm = MockSsgm::start(4)?;
    let mut stack = Stack::new(if claims { "coston" } else { "costoff" }, 5).await?;
    stack.start_function("copy-result.sh")?;
    let stats = stack.logs.path().join("stats.json").display().to_string();
    let mut extra = vec!["--stats-file", &stats, "-b", "1"];
    if !claims {
        extra.extend(["--claims", "off"]);
    }
    let daemon = stack.start_daemon(&ssgm, &extra)?;
    for i in 0..JOBS {
        stack
            .upload(&format!("cost-{i:02}.png"), format!("job {i}").as_bytes())
            .await?;
    }
    stack
        .wait_for_results(JOBS, Duration::from_secs(180))
        .await?;
    stack.wait_for_empty_queues(Duration::from_secs(60)).await?;
    stack
        .process(daemon)
        .signal(nix::sys::signal::Signal::SIGTERM)?;
    stack
        .process(daemon)
        .wait_exit(Duration::from_secs(30))
        .await?;
    let log = stack.log(daemon);
    let field = |line: &str, name: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .and_then(|v| v.parse().ok())
    };
    let claim_us = log
        .lines()
        .filter(|l| l.contains("stage=\"claim\""))
        .filter_map(|l| field(l, "elapsed_us="))
        .collect();
    let job_ms = log
        .lines()
        .filter(|l| l.contains("Job completed."))
        .filter_map(|l| field(l, "elapsed_ms="))
        .collect();
    let requests: Value = serde_json::from_slice(&std::fs::read(&stats)?)?;
    Ok((requests, claim_us, job_ms))
}

fn percentile(values: &mut [u64], p: usize) -> u64 {
    values.sort_unstable();
    values
        .get((values.len().saturating_sub(1)) * p / 100)
        .copied()
        .unwrap_or(0)
}

/// What the claim costs per job, side by side with `--claims off` (BENCHMARKS.md): run
/// with `cargo nextest run --run-ignored only --no-capture claim_cost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check; see BENCHMARKS.md"]
async fn claim_cost() -> Result<()> {
    for round in 1..=2 {
        for claims in [false, true] {
            let (requests, mut claim_us, mut job_ms) = measure(claims).await?;
            let jobs = job_ms.len() as f64;
            let per_job = |op: &str| requests["requests"][op].as_u64().unwrap_or(0) as f64 / jobs;
            println!(
                "CLAIMCOST round={round} claims={} jobs={} requests_per_job={:.2} s3_put_per_job={:.2} s3_get_per_job={:.2} s3_delete_per_job={:.2} claim_p50_ms={:.1} claim_p95_ms={:.1} job_p50_ms={} job_p95_ms={}",
                if claims { "on" } else { "off" },
                job_ms.len(),
                requests["total"].as_u64().unwrap_or(0) as f64 / jobs,
                per_job("S3.PutObject"),
                per_job("S3.GetObject"),
                per_job("S3.DeleteObject"),
                percentile(&mut claim_us, 50) as f64 / 1000.0,
                percentile(&mut claim_us, 95) as f64 / 1000.0,
                percentile(&mut job_ms, 50),
                percentile(&mut job_ms, 95),
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claims_location_that_cannot_be_written_is_fatal_at_start_up() -> Result<()> {
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("noclaims", 5).await?;
    let missing = format!("{}-missing/claims", stack.output_bucket);
    let daemon = stack.start_daemon(&ssgm, &["--claims", &missing])?;
    let status = stack
        .process(daemon)
        .wait_exit(Duration::from_secs(60))
        .await?;
    assert_eq!(status.code(), Some(1), "{status}");
    let log = stack.log(daemon);
    assert!(
        log.contains("cannot write and delete claims in") && log.contains(&missing),
        "{log}"
    );
    Ok(())
}

/// What a daemon logs when it takes over a job whose function may still be running.
const ADOPTED: &str = "Adopting a job whose function may be running";

/// The daemon's environment for a host of its own: claims of another pid space are
/// never taken over before their lease, as between two machines.
fn host(name: &str) -> [(&'static str, &std::ffi::OsStr); 1] {
    [("ORCHGPU_DEBUG_PID_SPACE", std::ffi::OsStr::new(name))]
}

async fn dead_letters(stack: &Stack) -> Result<u64> {
    stack.queue_depth(&stack.dlq_url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_of_a_long_job_on_another_daemon_are_deleted_not_dead_lettered() -> Result<()> {
    let ssgm = MockSsgm::start(2)?;
    // Two receives and a message is dead-lettered: a duplicate returned "after the
    // lease" twice during the job would be.
    let mut stack = Stack::new("longdup", 2).await?;
    let hold = Hold::new(&stack)?;
    stack.start_function_with("held-copy.sh", &[("ORCHGPU_TEST_HOLD", &hold.env())])?;
    let extra = ["--claim-lease", "6", "--max-jobs", "1"];
    let a_state = stack.state_dir("a");
    let a = stack.start_daemon(&ssgm, &[&extra[..], &["--state-dir", &a_state]].concat())?;
    stack.upload("long.png", b"runs for a while").await?;
    stack
        .wait_for_log(a, "stage=\"upload\"", 1, Duration::from_secs(60))
        .await?;
    // The first daemon's one slot is busy: the copies go to the second.
    let b_state = stack.state_dir("b");
    let b = stack.start_daemon(&ssgm, &[&extra[..], &["--state-dir", &b_state]].concat())?;
    for _ in 0..2 {
        let again = same_notification(&stack, "long.png").await?;
        stack.send_raw(&again).await?;
    }
    // The job goes on for more than two leases: a copy returned after each lease would
    // be received a third time, and dead-lettered, meanwhile.
    tokio::time::sleep(Duration::from_secs(16)).await;
    assert_eq!(
        dead_letters(&stack).await?,
        0,
        "a duplicate was dead-lettered"
    );
    assert_eq!(stack.log(b).matches(DUPLICATE_DELETED).count(), 2);
    hold.release()?;
    stack.wait_for_results(1, Duration::from_secs(60)).await?;
    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;
    assert_eq!(
        dead_letters(&stack).await?,
        0,
        "dead-lettered after the job"
    );
    assert_eq!(stack.invocations().values().sum::<usize>(), 1);
    assert_eq!(ssgm.stat("granted")?, 1, "the job ran twice");
    ssgm.wait_all_released(Duration::from_secs(30)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_dies_for_good_leaves_its_gpu_to_whoever_takes_its_job_over() -> Result<()> {
    // One GPU: until the dead host's grant is released, the scheduler is busy for all.
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("deadhost", 5).await?;
    let hold = Hold::new(&stack)?;
    stack.start_function_with("held-copy.sh", &[("ORCHGPU_TEST_HOLD", &hold.env())])?;
    let extra = ["--claim-lease", "6", "-v", "4"];
    let a_state = stack.state_dir("a");
    let a = stack.start_daemon_with_env(
        &ssgm,
        &[&extra[..], &["--state-dir", &a_state]].concat(),
        &host("host-a"),
    )?;
    stack.upload("orphan.png", b"its host is gone").await?;
    stack
        .wait_for_log(a, "stage=\"upload\"", 1, Duration::from_secs(60))
        .await?;
    // The host is terminated for good: process and state directory both gone.
    stack.process(a).signal(nix::sys::signal::Signal::SIGKILL)?;
    stack.process(a).wait_exit(Duration::from_secs(10)).await?;
    std::fs::remove_dir_all(&a_state)?;
    assert_eq!(ssgm.stat("live")?, 1);

    let b_state = stack.state_dir("b");
    let b = stack.start_daemon_with_env(
        &ssgm,
        &[&extra[..], &["--state-dir", &b_state]].concat(),
        &host("host-b"),
    )?;
    // After the lease, the survivor takes the job over from its claim and adopts the
    // running function: the dead host's GPU is kept until the result, then released.
    stack
        .wait_for_log(b, ADOPTED, 1, Duration::from_secs(40))
        .await?;
    assert_eq!(ssgm.stat("live")?, 1, "released under the running function");
    hold.release()?;
    stack.wait_for_results(1, Duration::from_secs(60)).await?;
    wait_for_live(&ssgm, 0, Duration::from_secs(30)).await?;
    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;
    assert_eq!(stack.invocations().values().sum::<usize>(), 1);
    let stats = ssgm.stats()?;
    assert_eq!(stats["granted"], 1, "the job ran again: {stats}");
    assert_eq!(stats["released"], 1, "{stats}");
    assert_eq!(stats["failed_releases"], 0, "released twice: {stats}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_holders_own_message_coming_back_mid_job_is_kept_not_dead_lettered() -> Result<()> {
    let ssgm = MockSsgm::start(2)?;
    let mut stack = Stack::new("ownmsg", 2).await?;
    let hold = Hold::new(&stack)?;
    stack.start_function_with("held-copy.sh", &[("ORCHGPU_TEST_HOLD", &hold.env())])?;
    // The holder's heartbeats never get through (an SQS brownout): its message comes
    // back every 2 s. One slot, so the copy goes to the other daemon.
    let a_state = stack.state_dir("a");
    let a = stack.start_daemon_with_env(
        &ssgm,
        &[
            "--claim-lease",
            "6",
            "-v",
            "2",
            "--max-jobs",
            "1",
            "--state-dir",
            &a_state,
        ],
        &[("ORCHGPU_DEBUG_NO_HEARTBEATS", std::ffi::OsStr::new("1"))],
    )?;
    stack
        .upload("brownout.png", b"its message came back")
        .await?;
    stack
        .wait_for_log(a, "stage=\"upload\"", 1, Duration::from_secs(60))
        .await?;
    let b_state = stack.state_dir("b");
    let b = stack.start_daemon(&ssgm, &["--claim-lease", "6", "--state-dir", &b_state])?;
    // Its message comes back within 2 s and is kept hidden while the holder runs: no
    // more receives, nothing dead-lettered (returned, it would be received a third time).
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(
        dead_letters(&stack).await?,
        0,
        "the holder's message was dead-lettered"
    );
    assert!(stack.log(b).contains("The holder's own message came back"));
    hold.release()?;
    stack.wait_for_results(1, Duration::from_secs(60)).await?;
    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;
    assert_eq!(dead_letters(&stack).await?, 0);
    assert_eq!(stack.invocations().values().sum::<usize>(), 1);
    assert_eq!(ssgm.stat("granted")?, 1, "the job ran twice");
    ssgm.wait_all_released(Duration::from_secs(30)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_renewals_are_held_back_stops_and_its_successor_adopts() -> Result<()> {
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("slows3", 5).await?;
    let hold = Hold::new(&stack)?;
    stack.start_function_with("held-copy.sh", &[("ORCHGPU_TEST_HOLD", &hold.env())])?;
    // The holder's claim writes after the first two (the grant and the function) are
    // held back 20 s on their way to S3: its renewals, and whatever it writes later.
    let proxy = Proxy::start_holding(Some((2, Duration::from_secs(20)))).await?;
    let a_state = stack.state_dir("a");
    let a = stack.start_daemon_with_env(
        &ssgm,
        &[
            "--endpoint-url",
            &proxy.url(),
            "--claim-lease",
            "6",
            "--max-jobs",
            "1",
            "--state-dir",
            &a_state,
        ],
        &host("host-a"),
    )?;
    stack.upload("slow.png", b"renewals held back").await?;
    stack
        .wait_for_log(a, "stage=\"upload\"", 1, Duration::from_secs(60))
        .await?;
    let b_state = stack.state_dir("b");
    let b = stack.start_daemon_with_env(
        &ssgm,
        &["--claim-lease", "6", "--state-dir", &b_state],
        &host("host-b"),
    )?;
    // The holder acts before its lease ends, a copy of the event reaches the other daemon
    // after it, and that daemon adopts the running function.
    stack
        .wait_for_log(
            a,
            "Claim lease about to end without a confirmed renewal",
            1,
            Duration::from_secs(20),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = same_notification(&stack, "slow.png").await?;
    stack.send_raw(&again).await?;
    stack
        .wait_for_log(b, ADOPTED, 1, Duration::from_secs(30))
        .await?;
    assert_eq!(
        ssgm.stat("live")?,
        1,
        "the GPU was released under its running function"
    );
    hold.release()?;
    stack.wait_for_results(1, Duration::from_secs(60)).await?;
    wait_for_live(&ssgm, 0, Duration::from_secs(30)).await?;
    stack.wait_for_empty_queues(Duration::from_secs(60)).await?;
    assert_eq!(
        stack.invocations().values().sum::<usize>(),
        1,
        "the function ran twice"
    );
    let stats = ssgm.stats()?;
    assert_eq!(stats["granted"], 1, "{stats}");
    assert_eq!(stats["failed_releases"], 0, "released twice: {stats}");
    assert_eq!(dead_letters(&stack).await?, 0);
    Ok(())
}
