//! A failing scheduler: request errors, garbage, a hung client, a failed release. Each
//! leaves no allocation live and loses no job.

use std::time::Duration;

use anyhow::Result;

use crate::harness::{MockSsgm, Stack, wait_for};

/// Injects `count` faults of `kind`, runs `jobs` inputs through and checks that every job
/// still completes, nothing is left allocated and nothing reaches the dead-letter queue.
async fn survives(
    kind: &str,
    count: u32,
    jobs: usize,
    gpus: u32,
) -> Result<(MockSsgm, Stack, usize)> {
    let ssgm = MockSsgm::start(gpus)?;
    let mut stack = Stack::new(&format!("fault-{kind}"), 10).await?;
    stack.start_function("copy-result.sh")?;
    ssgm.inject(kind, count)?;
    let daemon = stack.start_daemon(&ssgm, &[])?;
    for i in 0..jobs {
        stack
            .upload(&format!("{kind}-{i}.png"), format!("input {i}").as_bytes())
            .await?;
    }
    stack
        .wait_for_results(jobs, Duration::from_secs(120))
        .await?;
    stack.wait_for_empty_queues(Duration::from_secs(60)).await?;
    let results = stack.results_by_source_key().await?;
    assert_eq!(results.len(), jobs, "{:?}", results.keys());
    assert!(results.values().all(|r| r.len() == 1));
    assert_eq!(stack.queue_depth(&stack.dlq_url).await?, 0);
    // A failed release is retried in the background, after the job ended.
    wait_for("every grant released", Duration::from_secs(30), || async {
        Ok((ssgm.stat("live")? == 0).then_some(()))
    })
    .await?;
    ssgm.assert_all_released()?;
    assert!(ssgm.stat("faults_injected")? >= u64::from(count));
    Ok((ssgm, stack, daemon))
}

/// Asserts from the mock's books that each of `count` faulty alloc calls was followed by
/// another try, and that each of `jobs` jobs was granted once: every alloc call was a
/// grant or a fault (there are GPUs enough for no busy answer).
fn assert_each_fault_retried(ssgm: &MockSsgm, count: u32, jobs: usize) -> Result<()> {
    let stats = ssgm.stats()?;
    assert_eq!(stats["faults_injected"], count, "{stats}");
    assert_eq!(stats["granted"], jobs as u64, "{stats}");
    assert_eq!(stats["busy"], 0, "{stats}");
    assert_eq!(
        stats["alloc_calls"],
        jobs as u64 + u64::from(count),
        "{stats}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_errors_are_retried() -> Result<()> {
    let (ssgm, stack, daemon) = survives("error", 2, 2, 2).await?;
    assert_each_fault_retried(&ssgm, 2, 2)?;
    assert_eq!(ssgm.stat("request_errors")?, 2);
    // How the daemon classified it shows only in its log.
    assert!(stack.log(daemon).contains("scheduler refused a request"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_replies_are_retried() -> Result<()> {
    let (ssgm, stack, daemon) = survives("garbage", 2, 2, 2).await?;
    assert_each_fault_retried(&ssgm, 2, 2)?;
    assert!(stack.log(daemon).contains("unreadable reply"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_client_is_killed_and_retried() -> Result<()> {
    let (ssgm, stack, daemon) = survives("hang", 1, 2, 2).await?;
    assert_each_fault_retried(&ssgm, 1, 2)?;
    assert!(stack.log(daemon).contains("timed out"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_release_is_retried() -> Result<()> {
    let (ssgm, _stack, _daemon) = survives("fail-release", 2, 2, 2).await?;
    assert!(ssgm.stat("failed_releases")? >= 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_failing_past_its_retries_is_retried_in_the_background() -> Result<()> {
    // Four failures: the job's own attempt and three of the background releaser's; with
    // one GPU the second job can only run once the releaser has given the GPU back.
    let (ssgm, stack, daemon) = survives("fail-release", 4, 2, 1).await?;
    assert!(
        stack
            .log(daemon)
            .contains("Released reservation in the background.")
    );
    assert_eq!(ssgm.stat("failed_releases")?, 4);
    Ok(())
}
