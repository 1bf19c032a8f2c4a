//! A function that never answers: the result deadline releases the GPUs and returns the
//! message for a retry.

use std::time::Duration;

use anyhow::Result;
use nix::sys::signal::Signal;

use crate::harness::{MockSsgm, Stack, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_deadline_releases_gpus_and_returns_the_message() -> Result<()> {
    let ssgm = MockSsgm::start(2)?;
    let mut stack = Stack::new("deadline", 10).await?;
    stack.start_function("never-answers.sh")?;
    let daemon = stack.start_daemon(
        &ssgm,
        &["--result-deadline", "3", "--retry-backoff", "1", "-v", "10"],
    )?;
    stack.upload("never.png", b"nobody answers").await?;

    // The function never answers, so GPUs given back before any signal were given back
    // by the result deadline.
    wait_for(
        "the deadline to release the GPUs",
        Duration::from_secs(60),
        || async {
            let released = ssgm.stat("released")?;
            Ok((released >= 1).then_some(()))
        },
    )
    .await?;
    stack
        .wait_for_log(
            daemon,
            "Message returned for a retry.",
            1,
            Duration::from_secs(10),
        )
        .await?;
    // Stop the daemon so the message stays in the queue for us to look at.
    stack.process(daemon).signal(Signal::SIGTERM)?;
    let status = stack
        .process(daemon)
        .wait_exit(Duration::from_secs(30))
        .await?;
    assert!(status.success(), "daemon exit: {status}");

    wait_for("released GPUs", Duration::from_secs(10), || async {
        Ok((ssgm.stat("live")? == 0).then_some(()))
    })
    .await?;
    ssgm.assert_all_released()?;
    // The message is still in the queue, visible again after its backoff.
    let message = wait_for("the returned message", Duration::from_secs(30), || async {
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
    .await?;
    assert!(message.body().unwrap_or_default().contains("never.png"));
    assert!(stack.output_keys().await?.is_empty());
    Ok(())
}
