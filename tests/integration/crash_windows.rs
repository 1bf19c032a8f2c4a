//! The instants at which a GPU used to leak: the daemon killed right as the SSGM client
//! printed a grant, a client killed at its timeout after the scheduler granted, and a
//! hung client that outlives its killed daemon. The mock scheduler has one GPU, so a
//! leaked grant would answer "busy" to every later request and the job would never
//! complete; each test also checks the mock's books.
//!
//! And the window the job's end opened on purpose: once the result is there and the
//! claim no longer names the grant, the message's delete does not wait for the
//! scheduler's `-dealloc`; a daemon killed before that release is confirmed leaves it to
//! its journal, and the restart releases it, once.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
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
    ssgm.wait_all_released(Duration::from_secs(30)).await?;
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
    ssgm.wait_all_released(Duration::from_secs(30)).await?;
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
    ssgm.wait_all_released(Duration::from_secs(30)).await?;
    Ok(())
}

/// A scheduler client whose `-dealloc` hangs (30 s, without reaching the scheduler) while
/// the file `hold` exists; every other call goes to the mock's client.
fn client_with_held_deallocs(stack: &Stack, ssgm: &MockSsgm, hold: &Path) -> Result<PathBuf> {
    let dir = stack.tmp_dir();
    std::fs::create_dir_all(&dir)?;
    let wrapper = dir.join("ssgm-held-deallocs.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \" $* \" in *\" -dealloc \"*) [ -e '{hold}' ] && exec sleep 30;; esac\nexec '{bin}' \"$@\"\n",
            hold = hold.display(),
            bin = ssgm.bin().display()
        ),
    )?;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    Ok(wrapper)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_message_goes_while_the_release_runs_and_a_kill_then_leaves_it_to_the_journal()
-> Result<()> {
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("beside", 5).await?;
    stack.start_function("copy-result.sh")?;
    let hold = stack.tmp_dir().join("hold-deallocs");
    let client = client_with_held_deallocs(&stack, &ssgm, &hold)?;
    std::fs::write(&hold, b"")?;
    let client = client.display().to_string();
    // A scheduler call may take 20 s: a delete that waited for the release would come
    // after the 10 s this test gives it.
    let args = ["-m", client.as_str(), "--ssgm-timeout", "20", "-v", "5"];
    let first = stack.start_daemon(&ssgm, &args)?;
    stack
        .upload("beside.png", b"released beside the delete")
        .await?;
    stack.wait_for_results(1, Duration::from_secs(90)).await?;

    // The message is deleted and the claim gone while the GPU is still granted.
    stack.wait_for_empty_queues(Duration::from_secs(10)).await?;
    let claims = stack.keys(&stack.output_bucket, "orchgpu-claims/").await?;
    assert!(claims.is_empty(), "claims left behind: {claims:?}");
    assert_eq!(
        ssgm.stat("live")?,
        1,
        "the release was not held up: the test did not exercise the window"
    );

    // Killed inside the window: the journal still has the grant; the restart (same
    // state dir) finds no claim naming it and releases it.
    stack.process(first).kill();
    std::fs::remove_file(&hold)?;
    stack.start_daemon(&ssgm, &args)?;
    ssgm.wait_all_released(Duration::from_secs(30)).await?;
    let stats = ssgm.stats()?;
    assert_eq!(stats["granted"], 1, "the job ran again: {stats}");
    assert_eq!(stats["failed_releases"], 0, "released twice: {stats}");
    assert_eq!(stack.invocations().values().sum::<usize>(), 1);
    Ok(())
}
