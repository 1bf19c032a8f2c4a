//! The instants at which a GPU used to leak: the daemon killed right as the SSGM client
//! printed a grant, a client killed at its timeout after the scheduler granted, and a
//! hung client that outlives its killed daemon. The mock scheduler has one GPU, so a
//! leaked grant would answer "busy" to every later request and the job would never
//! complete; each test also checks the mock's books.

use std::time::Duration;

use anyhow::Result;

use crate::harness::{MockSsgm, Stack, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_the_instant_of_a_grant_the_restart_releases_it_and_the_job_runs_once()
-> Result<()> {
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("killgrant", 5).await?;
    stack.start_function("copy-result.sh")?;
    ssgm.inject("kill-parent-after-grant", 1)?;
    let first = stack.start_daemon(&ssgm, &["-v", "5"])?;
    stack.upload("grant.png", b"granted as it died").await?;

    // The client printed the grant and SIGKILLed the daemon at that instant.
    let status = stack
        .process(first)
        .wait_exit(Duration::from_secs(60))
        .await?;
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "{status:?}"
    );
    assert_eq!(ssgm.stat("live")?, 1, "the grant is held by the scheduler");

    // The same state directory: the restart finds the call and releases its grant in
    // the background; the message comes back and the job runs once, on the only GPU.
    stack.start_daemon(&ssgm, &["-v", "5"])?;
    stack.wait_for_results(1, Duration::from_secs(90)).await?;
    stack.wait_for_empty_queues(Duration::from_secs(60)).await?;
    assert_eq!(stack.invocations().len(), 1);
    assert!(stack.invocations().values().all(|&n| n == 1));
    wait_for("every grant released", Duration::from_secs(30), || async {
        Ok((ssgm.stat("live")? == 0).then_some(()))
    })
    .await?;
    ssgm.assert_all_released()?;
    assert_eq!(
        ssgm.stat("granted")?,
        2,
        "the leaked grant and the job's own"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_at_its_timeout_after_granting_has_its_grant_released() -> Result<()> {
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("hungrant", 5).await?;
    stack.start_function("copy-result.sh")?;
    ssgm.inject("print-then-hang", 1)?;
    stack.start_daemon(&ssgm, &["--ssgm-timeout", "2"])?;
    stack.upload("hung.png", b"granted then hung").await?;
    stack.wait_for_results(1, Duration::from_secs(90)).await?;
    stack.wait_for_empty_queues(Duration::from_secs(60)).await?;
    wait_for("every grant released", Duration::from_secs(30), || async {
        Ok((ssgm.stat("live")? == 0).then_some(()))
    })
    .await?;
    ssgm.assert_all_released()?;
    assert_eq!(
        ssgm.stat("granted")?,
        2,
        "the stray grant and the job's own"
    );
    assert!(ssgm.alloc_clients().is_empty(), "a hung client survived");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphaned_hung_client_is_waited_out_killed_and_its_grant_released() -> Result<()> {
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("orphan", 5).await?;
    stack.start_function("copy-result.sh")?;
    ssgm.inject("kill-parent-then-hang", 1)?;
    let first = stack.start_daemon(&ssgm, &["-v", "5", "--ssgm-timeout", "4"])?;
    stack
        .upload("orphan.png", b"granted, parent killed, client hung")
        .await?;
    stack
        .process(first)
        .wait_exit(Duration::from_secs(60))
        .await?;
    let orphans = ssgm.alloc_clients();
    assert_eq!(orphans.len(), 1, "the hung client outlives its daemon");

    stack.start_daemon(&ssgm, &["-v", "5", "--ssgm-timeout", "4"])?;
    wait_for("the orphan killed", Duration::from_secs(30), || async {
        Ok(ssgm.alloc_clients().is_empty().then_some(()))
    })
    .await?;
    stack.wait_for_results(1, Duration::from_secs(90)).await?;
    stack.wait_for_empty_queues(Duration::from_secs(60)).await?;
    wait_for("every grant released", Duration::from_secs(30), || async {
        Ok((ssgm.stat("live")? == 0).then_some(()))
    })
    .await?;
    ssgm.assert_all_released()?;
    Ok(())
}
