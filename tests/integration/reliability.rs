//! Faults around the daemon itself: SIGKILL and restart, SIGTERM with a long and a short
//! grace, a job that outlives its visibility timeout, heartbeats of jobs waiting together
//! (batched), duplicate notifications, two daemons on one queue, and an emulator outage.

use std::time::Duration;

use anyhow::Result;
use nix::sys::signal::Signal;

use crate::harness::{MockSsgm, Proxy, Stack, wait_for};

/// A file whose existence holds the test function before it writes its result.
pub(crate) struct Hold(std::path::PathBuf);

impl Hold {
    pub(crate) fn new(stack: &Stack) -> Result<Hold> {
        let path = stack.logs.path().join("hold");
        std::fs::write(&path, b"")?;
        Ok(Hold(path))
    }

    pub(crate) fn env(&self) -> String {
        self.0.display().to_string()
    }

    pub(crate) fn release(&self) -> Result<()> {
        std::fs::remove_file(&self.0)?;
        Ok(())
    }
}

pub(crate) async fn wait_for_live(ssgm: &MockSsgm, live: u64, timeout: Duration) -> Result<()> {
    wait_for(&format!("{live} live allocations"), timeout, || async {
        Ok((ssgm.stat("live")? == live).then_some(()))
    })
    .await
}

/// Stops a daemon with SIGTERM, expects exit 0 and returns its `--stats-file` JSON.
async fn stop_for_stats(
    stack: &mut Stack,
    daemon: usize,
    stats_file: &std::path::Path,
) -> Result<serde_json::Value> {
    stack.process(daemon).signal(Signal::SIGTERM)?;
    let status = stack
        .process(daemon)
        .wait_exit(Duration::from_secs(30))
        .await?;
    assert!(status.success(), "daemon exited with {status}");
    Ok(serde_json::from_str(&std::fs::read_to_string(stats_file)?)?)
}

/// Every bundle was handed to the function exactly once.
fn assert_invoked_once_each(stack: &Stack, jobs: usize) {
    let invocations = stack.invocations();
    assert_eq!(invocations.len(), jobs, "{invocations:?}");
    assert!(invocations.values().all(|&n| n == 1), "{invocations:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_the_function_runs_then_restart_releases_only_after_the_result() -> Result<()>
{
    let ssgm = MockSsgm::start(2)?;
    let mut stack = Stack::new("sigkill", 5).await?;
    let hold = Hold::new(&stack)?;
    stack.start_function_with("held-copy.sh", &[("ORCHGPU_TEST_HOLD", &hold.env())])?;
    let first = stack.start_daemon(&ssgm, &["-v", "4"])?;
    stack.upload("killed.png", b"survives a SIGKILL").await?;

    stack
        .wait_for_log(first, "stage=\"upload\"", 1, Duration::from_secs(60))
        .await?;
    assert_eq!(ssgm.stat("live")?, 1);
    stack.process(first).signal(Signal::SIGKILL)?;
    stack
        .process(first)
        .wait_exit(Duration::from_secs(10))
        .await?;
    assert_eq!(ssgm.stat("live")?, 1, "the killed daemon could not release");

    // Same state directory: the journal names the reservation, but the job's claim records
    // it with a function that may still run on it. The restart leaves it to the claim; the
    // message comes back (-v 4) and the job is adopted: its GPU is kept until the result.
    let second = stack.start_daemon(&ssgm, &["-v", "4"])?;
    stack
        .wait_for_log(
            second,
            "Adopting a job whose function may be running",
            1,
            Duration::from_secs(30),
        )
        .await?;
    assert!(
        stack
            .log(second)
            .contains("The job's claim records this grant"),
        "the restart did not defer to the claim"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        ssgm.stat("live")?,
        1,
        "the GPU was released while its function still ran"
    );

    // The function finishes the bundle it already has; then, and only then, the GPU goes
    // back, and the job is not run again.
    hold.release()?;
    stack.wait_for_results(1, Duration::from_secs(60)).await?;
    wait_for_live(&ssgm, 0, Duration::from_secs(30)).await?;
    stack.wait_for_empty_queues(Duration::from_secs(60)).await?;
    assert_invoked_once_each(&stack, 1);
    let stats = ssgm.stats()?;
    assert_eq!(stats["granted"], 1, "the job ran again: {stats}");
    assert_eq!(stats["released"], 1, "{stats}");
    assert_eq!(stats["failed_releases"], 0, "released twice: {stats}");
    assert!(
        stack.process(second).try_status()?.is_none(),
        "the second daemon exited"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_long_grace_lets_running_jobs_finish() -> Result<()> {
    const JOBS: usize = 3;
    let ssgm = MockSsgm::start(4)?;
    let mut stack = Stack::new("graceful", 5).await?;
    let hold = Hold::new(&stack)?;
    stack.start_function_with("held-copy.sh", &[("ORCHGPU_TEST_HOLD", &hold.env())])?;
    let daemon = stack.start_daemon(&ssgm, &["--shutdown-grace", "60"])?;
    for i in 0..JOBS {
        stack
            .upload(&format!("grace-{i}.png"), b"finish me")
            .await?;
    }
    stack
        .wait_for_log(daemon, "stage=\"upload\"", JOBS, Duration::from_secs(60))
        .await?;

    stack.process(daemon).signal(Signal::SIGTERM)?;
    stack
        .wait_for_log(
            daemon,
            "Stopping: no new messages.",
            1,
            Duration::from_secs(10),
        )
        .await?;
    hold.release()?;
    let status = stack
        .process(daemon)
        .wait_exit(Duration::from_secs(60))
        .await?;
    assert_eq!(status.code(), Some(0), "exit status");

    stack
        .wait_for_results(JOBS, Duration::from_secs(10))
        .await?;
    assert_eq!(
        stack.queue_depth(&stack.jobs_url).await?,
        0,
        "messages left"
    );
    assert_invoked_once_each(&stack, JOBS);
    ssgm.assert_all_released()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_short_grace_hands_running_functions_over_then_a_new_daemon_completes()
-> Result<()> {
    const JOBS: usize = 2;
    let ssgm = MockSsgm::start(2)?;
    let mut stack = Stack::new("shortgrace", 5).await?;
    let hold = Hold::new(&stack)?;
    stack.start_function_with("held-copy.sh", &[("ORCHGPU_TEST_HOLD", &hold.env())])?;
    let first = stack.start_daemon(&ssgm, &["--shutdown-grace", "1"])?;
    for i in 0..JOBS {
        stack
            .upload(&format!("short-{i}.png"), b"come back later")
            .await?;
    }
    stack
        .wait_for_log(first, "stage=\"upload\"", JOBS, Duration::from_secs(60))
        .await?;

    stack.process(first).signal(Signal::SIGTERM)?;
    let status = stack
        .process(first)
        .wait_exit(Duration::from_secs(30))
        .await?;
    assert_eq!(status.code(), Some(0), "exit status");
    // Their functions had the bundles and still run: the GPUs stay with them, handed over
    // through the jobs' claims, and the messages come back after the retry backoff.
    assert_eq!(
        ssgm.stat("live")?,
        JOBS as u64,
        "GPUs released under running functions"
    );
    assert_eq!(
        stack
            .log(first)
            .matches("Grant handed over through the job's claim")
            .count(),
        JOBS
    );
    assert_eq!(
        stack
            .log(first)
            .matches("Message returned for a retry.")
            .count(),
        JOBS
    );
    assert_eq!(stack.queue_depth(&stack.jobs_url).await?, JOBS as u64);

    // A new daemon adopts both jobs and waits for their results; only then are the GPUs
    // released, and no job runs twice.
    let second = stack.start_daemon(&ssgm, &[])?;
    stack
        .wait_for_log(
            second,
            "Adopting a job whose function may be running",
            JOBS,
            Duration::from_secs(30),
        )
        .await?;
    assert_eq!(
        ssgm.stat("live")?,
        JOBS as u64,
        "released before the results"
    );
    hold.release()?;
    stack
        .wait_for_results(JOBS, Duration::from_secs(60))
        .await?;
    wait_for_live(&ssgm, 0, Duration::from_secs(30)).await?;
    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;
    assert_invoked_once_each(&stack, JOBS);
    assert_eq!(ssgm.stat("granted")?, JOBS as u64, "a job ran twice");
    ssgm.assert_all_released()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_outliving_its_visibility_timeout_is_not_started_twice() -> Result<()> {
    let ssgm = MockSsgm::start(2)?;
    let mut stack = Stack::new("outlive", 5).await?;
    let hold = Hold::new(&stack)?;
    stack.start_function_with("held-copy.sh", &[("ORCHGPU_TEST_HOLD", &hold.env())])?;
    let stats_file = stack.logs.path().join("stats.json");
    // Visibility 2 s; the job takes about 8 s, four times as long.
    let daemon = stack.start_daemon(
        &ssgm,
        &[
            "-v",
            "2",
            "--stats-file",
            stats_file.to_str().expect("utf-8 temp path"),
        ],
    )?;
    stack.upload("long-job.png", b"takes a while").await?;
    stack
        .wait_for_log(daemon, "stage=\"upload\"", 1, Duration::from_secs(60))
        .await?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    hold.release()?;

    stack.wait_for_results(1, Duration::from_secs(60)).await?;
    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;
    assert_eq!(ssgm.stat("granted")?, 1, "the job was started twice");
    assert_invoked_once_each(&stack, 1);
    ssgm.assert_all_released()?;
    // The input was downloaded once: a second start would have fetched it again.
    let stats = stop_for_stats(&mut stack, daemon, &stats_file).await?;
    assert_eq!(stats["requests"]["S3.GetObject"], 1, "{stats}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_of_jobs_waiting_together_share_batch_requests() -> Result<()> {
    const JOBS: usize = 8;
    /// How long the results are held once every bundle is uploaded.
    const HOLD_S: u64 = 6;
    let ssgm = MockSsgm::start(JOBS as u32)?;
    let mut stack = Stack::new("hbbatch", 5).await?;
    let hold = Hold::new(&stack)?;
    stack.start_function_with("held-copy.sh", &[("ORCHGPU_TEST_HOLD", &hold.env())])?;
    for i in 0..JOBS {
        stack
            .upload(&format!("held-{i}.png"), format!("job {i}").as_bytes())
            .await?;
    }
    // Every notification, and the emulator's s3:TestEvent, is queued before the daemon
    // starts, so one receive takes them all and the jobs' heartbeats fall due together.
    wait_for(
        "all notifications queued",
        Duration::from_secs(30),
        || async { Ok((stack.queue_depth(&stack.jobs_url).await? > JOBS as u64).then_some(())) },
    )
    .await?;
    let stats_file = stack.logs.path().join("stats.json");
    // Visibility 2 s: a heartbeat every second per job, each allowed to wait 100 ms.
    let daemon = stack.start_daemon(
        &ssgm,
        &[
            "-v",
            "2",
            "--max-jobs",
            "10",
            "--stats-file",
            stats_file.to_str().expect("utf-8 temp path"),
        ],
    )?;
    stack
        .wait_for_log(daemon, "stage=\"upload\"", JOBS, Duration::from_secs(60))
        .await?;
    tokio::time::sleep(Duration::from_secs(HOLD_S)).await;
    hold.release()?;

    stack
        .wait_for_results(JOBS, Duration::from_secs(60))
        .await?;
    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;
    assert_eq!(
        ssgm.stat("granted")?,
        JOBS as u64,
        "a job was started twice"
    );
    assert_invoked_once_each(&stack, JOBS);
    ssgm.assert_all_released()?;
    stack.process(daemon).signal(Signal::SIGTERM)?;
    let status = stack
        .process(daemon)
        .wait_exit(Duration::from_secs(30))
        .await?;
    assert!(status.success(), "daemon exited with {status}");
    assert_eq!(stack.queue_depth(&stack.dlq_url).await?, 0);

    let stats: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stats_file)?)?;
    eprintln!("stats: {stats}");
    let count = |name: &str| stats["requests"][name].as_u64().unwrap_or(0);
    // Each job waited at least HOLD_S seconds after its upload: at least HOLD_S - 1
    // heartbeats each, which unbatched are as many requests.
    let heartbeats_at_least = JOBS as u64 * (HOLD_S - 1);
    let visibility_requests =
        count("SQS.ChangeMessageVisibility") + count("SQS.ChangeMessageVisibilityBatch");
    assert!(
        count("SQS.ChangeMessageVisibilityBatch") > 0,
        "no batched heartbeat: {stats}"
    );
    assert!(
        visibility_requests * 2 <= heartbeats_at_least,
        "{visibility_requests} visibility requests for at least {heartbeats_at_least} \
         heartbeats: {stats}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_object_notified_three_times_runs_one_job() -> Result<()> {
    let ssgm = MockSsgm::start(2)?;
    let mut stack = Stack::new("dupes", 5).await?;
    let hold = Hold::new(&stack)?;
    stack.start_function_with("held-copy.sh", &[("ORCHGPU_TEST_HOLD", &hold.env())])?;
    let daemon = stack.start_daemon(&ssgm, &[])?;
    stack.upload("twice.png", b"one job please").await?;
    let duplicate = stack.duplicate_notification("twice.png").await?;
    // Two more deliveries while the first job runs, and the queue's own notification.
    stack
        .wait_for_log(daemon, "stage=\"upload\"", 1, Duration::from_secs(60))
        .await?;
    stack.send_raw(&duplicate).await?;
    stack.send_raw(&duplicate).await?;
    stack
        .wait_for_log(
            daemon,
            "Same object is already being processed",
            2,
            Duration::from_secs(30),
        )
        .await?;
    hold.release()?;

    stack.wait_for_results(1, Duration::from_secs(60)).await?;
    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;
    assert_eq!(ssgm.stat("granted")?, 1, "more than one job ran");
    assert_eq!(
        stack.log(daemon).matches("Result already exists").count(),
        2
    );
    assert_invoked_once_each(&stack, 1);
    ssgm.assert_all_released()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_share_one_queue_without_running_a_job_twice() -> Result<()> {
    const JOBS: usize = 20;
    let ssgm = MockSsgm::start(2)?;
    let mut stack = Stack::new("twodaemons", 5).await?;
    stack.start_function("copy-result.sh")?;
    let a = stack.state_dir("a");
    let b = stack.state_dir("b");
    let stats_a = stack.logs.path().join("stats-a.json");
    let stats_b = stack.logs.path().join("stats-b.json");
    let daemon_args = |dir: &str, stats: &std::path::Path| -> Vec<String> {
        let stats = stats.to_str().expect("utf-8 temp path");
        [
            "--state-dir",
            dir,
            "--max-jobs",
            "2",
            "-s",
            "2",
            "--stats-file",
            stats,
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let args_a = daemon_args(&a, &stats_a);
    let args_b = daemon_args(&b, &stats_b);
    let first = stack.start_daemon(
        &ssgm,
        &args_a.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let second = stack.start_daemon(
        &ssgm,
        &args_b.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    for i in 0..JOBS {
        stack
            .upload(&format!("shared-{i:02}.png"), format!("job {i}").as_bytes())
            .await?;
    }

    stack
        .wait_for_results(JOBS, Duration::from_secs(180))
        .await?;
    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;
    let results = stack.results_by_source_key().await?;
    assert_eq!(results.len(), JOBS);
    assert_invoked_once_each(&stack, JOBS);
    let stats = ssgm.stats()?;
    assert_eq!(stats["granted"], JOBS as u64, "{stats}");
    let max_live = stats["max_live"]
        .as_u64()
        .expect("max_live in the mock's stats");
    assert!(max_live <= 2, "{stats}");
    ssgm.assert_all_released()?;
    // Each job uploads one bundle: the uploads of both daemons add up to the jobs, and
    // each daemon did some.
    let uploads = |stats: &serde_json::Value| {
        let requests = stats["requests"]
            .as_object()
            .expect("requests in the stats file");
        // An operation never made is not listed.
        requests
            .get("S3.PutObject")
            .map_or(0, |n| n.as_u64().expect("a count"))
    };
    let (a, b) = (
        uploads(&stop_for_stats(&mut stack, first, &stats_a).await?),
        uploads(&stop_for_stats(&mut stack, second, &stats_b).await?),
    );
    // Each job PUTs its claim and its bundle (a renewal would add one more): the function
    // saw each bundle once, and both daemons did some of the work.
    assert_invoked_once_each(&stack, JOBS);
    assert!(a >= 2 && b >= 2, "one daemon did all the work: {a} + {b}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emulator_outage_is_survived_and_logged_once() -> Result<()> {
    let ssgm = MockSsgm::start(2)?;
    let mut stack = Stack::new("outage", 5).await?;
    stack.start_function("copy-result.sh")?;
    let proxy = Proxy::start().await?;
    let daemon = stack.start_daemon(&ssgm, &["--endpoint-url", &proxy.url()])?;
    stack.upload("before.png", b"before the outage").await?;
    stack.wait_for_results(1, Duration::from_secs(60)).await?;

    proxy.set_open(false);
    stack
        .wait_for_log(
            daemon,
            "Receive failed; retrying.",
            1,
            Duration::from_secs(30),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    stack
        .upload("during.png", b"sent during the outage")
        .await?;
    proxy.set_open(true);

    stack
        .wait_for_log(daemon, "Queue reachable again.", 1, Duration::from_secs(60))
        .await?;
    stack.wait_for_results(2, Duration::from_secs(60)).await?;
    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;
    let log = stack.log(daemon);
    assert_eq!(
        log.matches("Receive failed; retrying.").count(),
        1,
        "logged per call, not per interval"
    );
    assert!(
        stack.process(daemon).try_status()?.is_none(),
        "daemon exited"
    );
    ssgm.assert_all_released()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_state_directory_is_refused() -> Result<()> {
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("locked", 5).await?;
    let first = stack.start_daemon(&ssgm, &[])?;
    stack
        .wait_for_log(first, "Receiving jobs.", 1, Duration::from_secs(30))
        .await?;
    let second = stack.start_daemon(&ssgm, &[])?;
    let status = stack
        .process(second)
        .wait_exit(Duration::from_secs(30))
        .await?;
    assert_eq!(status.code(), Some(1), "second daemon exit");
    assert!(stack.log(second).contains("is locked by another orchgpu"));
    assert!(
        stack.process(first).try_status()?.is_none(),
        "first daemon exited"
    );
    Ok(())
}
