//! A 200 MB input goes through the whole pipeline: downloaded to the work dir (not to
//! memory), bundled, uploaded in parts, and its multipart completion accepted on every
//! emulator (moto 5.2.1 answers it with a body the SDK cannot parse).

use std::time::Duration;

use anyhow::{Result, anyhow};

use crate::harness::{MockSsgm, Stack};

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mb_input_completes_once() -> Result<()> {
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("large", 2).await?;
    stack.start_function("small-result.sh")?;
    // Incompressible at its start, so the bundle stores it: a 200 MB bundle in 13 parts.
    let mut block = vec![0u8; MIB];
    let mut x: u32 = 2_463_534_242;
    for byte in &mut block {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *byte = x as u8;
    }
    let mut body = Vec::with_capacity(200 * MIB);
    for i in 0..200u8 {
        block[0] = i;
        body.extend_from_slice(&block);
    }
    let size = body.len();
    let work = tempfile::tempdir()?;
    let work_dir = work.path().display().to_string();
    let daemon = stack.start_daemon(
        &ssgm,
        &[
            "--work-dir",
            &work_dir,
            "--result-deadline",
            "600",
            "-v",
            "30",
        ],
    )?;
    stack.upload_etag("big input.bin", body).await?;

    stack.wait_for_results(1, Duration::from_secs(600)).await?;
    stack.wait_for_empty_queues(Duration::from_secs(60)).await?;
    let png = stack
        .output_keys()
        .await?
        .into_iter()
        .find(|k| k.ends_with(".png"))
        .ok_or_else(|| anyhow!("no result"))?;
    let result = String::from_utf8(stack.get(&stack.output_bucket, &png).await?)?;
    assert!(
        result.starts_with(&format!("{size} ")),
        "the function saw another input: {result}"
    );
    assert_eq!(ssgm.stat("granted")?, 1, "the job ran more than once");
    assert!(!stack.log(daemon).contains("Job failed."));
    assert_eq!(stack.queue_depth(&stack.dlq_url).await?, 0);
    // The input and the bundle went to the work dir, and are gone from it.
    let left: Vec<_> = walk(work.path());
    assert!(
        left.iter().all(|p| p.ends_with("lock")),
        "files left in the work dir: {left:?}"
    );
    ssgm.wait_all_released(Duration::from_secs(10)).await?;
    Ok(())
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemons_inputs_are_removed_by_the_next_start() -> Result<()> {
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("workdir", 5).await?;
    stack.start_function("never-answers.sh")?;
    let work = tempfile::tempdir()?;
    let work_dir = work.path().display().to_string();
    let first = stack.start_daemon(&ssgm, &["--work-dir", &work_dir])?;
    stack.upload("left behind.bin", &vec![7u8; 3 * MIB]).await?;
    // Killed while it waits for the result: its input is still on disk.
    stack
        .wait_for_log(first, "stage=\"upload\"", 1, Duration::from_secs(60))
        .await?;
    stack
        .process(first)
        .signal(nix::sys::signal::Signal::SIGKILL)?;
    stack
        .process(first)
        .wait_exit(Duration::from_secs(10))
        .await?;
    let left = walk(work.path());
    assert!(
        left.iter().any(|p| !p.ends_with("lock")),
        "the killed daemon left nothing to clean: {left:?}"
    );

    let state_dir = stack.state_dir("second");
    let second =
        stack.start_daemon(&ssgm, &["--work-dir", &work_dir, "--state-dir", &state_dir])?;
    stack
        .wait_for_log(second, "Work dir ready.", 1, Duration::from_secs(30))
        .await?;
    assert!(
        stack.log(second).contains("removed=1"),
        "{}",
        stack.log(second)
    );
    let left = walk(work.path());
    assert!(
        left.iter().all(|p| p.ends_with("lock")),
        "the killed daemon's files are still there: {left:?}"
    );
    Ok(())
}
