//! `orchgpu --drain` (`ORCHGPU_DRAIN`): runs every job the queue holds, then exits 0 by
//! itself; a job that fails is tried once per run and its message comes back after it.

use std::time::Duration;

use anyhow::Result;

use crate::harness::{MockSsgm, Stack, wait_for};

/// Waits until SQS counts the notifications of `jobs` uploads and the emulator's
/// s3:TestEvent on the jobs queue (they arrive asynchronously: a drain started before
/// them would rightly find nothing).
async fn wait_for_notifications(stack: &Stack, jobs: u64) -> Result<()> {
    wait_for(
        &format!("{jobs} notifications queued"),
        Duration::from_secs(30),
        || async { Ok((stack.queue_depth(&stack.jobs_url).await? > jobs).then_some(())) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_runs_every_job_then_exits_0_by_itself() -> Result<()> {
    let ssgm = MockSsgm::start(2)?;
    let mut stack = Stack::new("drain", 5).await?;
    stack.start_function("copy-result.sh")?;
    for key in ["a.png", "dir/b c.png", "ü+%.png"] {
        stack.upload(key, key.as_bytes()).await?;
    }
    wait_for_notifications(&stack, 3).await?;

    // Through the environment variable, as a cron job's env file would set it.
    let daemon = stack.start_daemon_with_env(
        &ssgm,
        &["--max-jobs", "2"],
        &[("ORCHGPU_DRAIN", "true".as_ref())],
    )?;
    let status = stack
        .process(daemon)
        .wait_exit(Duration::from_secs(90))
        .await?;
    assert!(status.success(), "drain exit: {status}");

    let results = stack.results_by_source_key().await?;
    for key in ["a.png", "dir/b c.png", "ü+%.png"] {
        assert_eq!(
            results.get(key).map(Vec::len),
            Some(1),
            "{key}: {results:?}"
        );
    }
    assert_eq!(stack.queue_depth(&stack.jobs_url).await?, 0);
    assert_eq!(stack.queue_depth(&stack.dlq_url).await?, 0);
    assert_eq!(ssgm.stat("live")?, 0, "GPUs still held after the drain");
    ssgm.assert_all_released()?;
    let log = stack.log(daemon);
    assert!(
        log.contains("Drained.") && log.contains("returned=0"),
        "{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_is_tried_once_per_drain_and_comes_back_after_it() -> Result<()> {
    let ssgm = MockSsgm::start(2)?;
    let mut stack = Stack::new("drain-fail", 10).await?;
    // The function never answers: the result deadline fails the job, a failure that may
    // pass, so the message is returned for a retry with a 1 s backoff.
    stack.start_function("never-answers.sh")?;
    stack.upload("never.png", b"nobody answers").await?;
    wait_for_notifications(&stack, 1).await?;

    let daemon = stack.start_daemon(
        &ssgm,
        &["--drain", "--result-deadline", "2", "--retry-backoff", "1"],
    )?;
    // Were the message retried within the run, it would be back after 1 s, fail again
    // every few seconds and never let the drain end (until the dead-letter queue).
    let status = stack
        .process(daemon)
        .wait_exit(Duration::from_secs(60))
        .await?;
    assert!(status.success(), "drain exit: {status}");
    assert_eq!(ssgm.stat("live")?, 0, "GPUs still held after the drain");
    assert_eq!(ssgm.stat("granted")?, 1, "the job was tried more than once");
    let log = stack.log(daemon);
    assert!(
        log.contains("Drained.") && log.contains("returned=1"),
        "{log}"
    );

    // The message is back in the queue after its backoff, received once so far (by the
    // drain), not dead-lettered.
    let message = receive_returned(&stack).await?;
    assert!(message.body().unwrap_or_default().contains("never.png"));
    assert_eq!(
        receive_count(&message).as_deref(),
        Some("2"),
        "drain's receive, then ours"
    );
    assert_eq!(stack.queue_depth(&stack.dlq_url).await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_message_stays_out_of_the_run_while_other_jobs_keep_it_going() -> Result<()> {
    let ssgm = MockSsgm::start(2)?;
    let mut stack = Stack::new("drain-held", 10).await?;
    // The second job's result waits for the test, so the run goes on well past the
    // failed message's 1 s backoff.
    let hold = crate::reliability::Hold::new(&stack)?;
    stack.start_function_with("held-copy.sh", &[("ORCHGPU_TEST_HOLD", &hold.env())])?;
    // The first alloc call is refused (SSGM_ERROR=1): that job fails, a failure that may pass.
    ssgm.inject("error", 1)?;
    stack.upload("one.png", b"one").await?;
    stack.upload("two.png", b"two").await?;
    wait_for_notifications(&stack, 2).await?;

    let daemon = stack.start_daemon(&ssgm, &["--drain", "--retry-backoff", "1"])?;
    wait_for(
        "a refused and a granted alloc",
        Duration::from_secs(30),
        || async {
            let [faults, granted] = ssgm.counters(["faults_injected", "granted"])?;
            Ok((faults == 1 && granted == 1).then_some(()))
        },
    )
    .await?;
    // Four backoffs' worth of time (receives wait 1 s, no pause after an empty one): a
    // run that let the message come back would have received it and called alloc again.
    let window = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < window {
        assert_eq!(
            ssgm.stat("alloc_calls")?,
            2,
            "the failed job was tried again"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    hold.release()?;
    let status = stack
        .process(daemon)
        .wait_exit(Duration::from_secs(60))
        .await?;
    assert!(status.success(), "drain exit: {status}");
    let stats = ssgm.stats()?;
    assert_eq!(stats["alloc_calls"], 2, "{stats}");
    assert_eq!(stats["granted"], 1, "{stats}");
    assert_eq!(stats["live"], 0, "{stats}");
    assert_eq!(stack.results_by_source_key().await?.len(), 1);
    // The failed job's message is in the queue for the next run, received only once by
    // the drain (a message let back into the run is received again, which counts
    // against maxReceiveCount though nothing tried it), nothing dead-lettered.
    let message = receive_returned(&stack).await?;
    assert_is_the_failed_one(&stack, &message).await?;
    assert_eq!(
        receive_count(&message).as_deref(),
        Some("2"),
        "drain's receive, then ours"
    );
    assert_eq!(stack.queue_depth(&stack.dlq_url).await?, 0);
    Ok(())
}

/// The message a drain returned, received (within 30 s: after its retry backoff) with its
/// receive count.
async fn receive_returned(stack: &Stack) -> Result<aws_sdk_sqs::types::Message> {
    wait_for("the returned message", Duration::from_secs(30), || async {
        let output = stack
            .sqs
            .receive_message()
            .queue_url(&stack.jobs_url)
            .wait_time_seconds(1)
            .message_system_attribute_names(
                aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount,
            )
            .send()
            .await?;
        Ok(output.messages.unwrap_or_default().into_iter().next())
    })
    .await
}

/// Of `one.png` and `two.png`, the message is the one without a result (which of the two
/// met the refused alloc depends on which called first).
async fn assert_is_the_failed_one(
    stack: &Stack,
    message: &aws_sdk_sqs::types::Message,
) -> Result<()> {
    let results = stack.results_by_source_key().await?;
    let failed: Vec<&str> = ["one.png", "two.png"]
        .into_iter()
        .filter(|key| !results.contains_key(*key))
        .collect();
    assert_eq!(failed.len(), 1, "results: {:?}", results.keys());
    let body = message.body().unwrap_or_default();
    assert!(body.contains(failed[0]), "{body}");
    Ok(())
}

fn receive_count(message: &aws_sdk_sqs::types::Message) -> Option<String> {
    message
        .attributes()
        .and_then(|a| {
            a.get(&aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount)
        })
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_drain_and_gives_back_the_messages_it_held() -> Result<()> {
    let ssgm = MockSsgm::start(2)?;
    let mut stack = Stack::new("drain-term", 10).await?;
    let hold = crate::reliability::Hold::new(&stack)?;
    stack.start_function_with("held-copy.sh", &[("ORCHGPU_TEST_HOLD", &hold.env())])?;
    ssgm.inject("error", 1)?;
    stack.upload("one.png", b"one").await?;
    stack.upload("two.png", b"two").await?;
    wait_for_notifications(&stack, 2).await?;

    let daemon = stack.start_daemon(&ssgm, &["--drain", "--retry-backoff", "1"])?;
    wait_for(
        "a refused and a granted alloc",
        Duration::from_secs(30),
        || async {
            let [faults, granted] = ssgm.counters(["faults_injected", "granted"])?;
            Ok((faults == 1 && granted == 1).then_some(()))
        },
    )
    .await?;
    // The failed job's message is held; the other job waits for its result.
    stack
        .process(daemon)
        .signal(nix::sys::signal::Signal::SIGTERM)?;
    hold.release()?;
    let status = stack
        .process(daemon)
        .wait_exit(Duration::from_secs(60))
        .await?;
    assert!(status.success(), "drain exit: {status}");
    assert_eq!(ssgm.stat("live")?, 0);
    // Given back with its 1 s backoff, not left hidden for the 15 min hold.
    let message = receive_returned(&stack).await?;
    assert_is_the_failed_one(&stack, &message).await?;
    assert!(
        stack
            .log(daemon)
            .contains("Drain stopped before the queue was empty.")
    );
    Ok(())
}
