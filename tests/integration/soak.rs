//! The reliability soak: many jobs through two daemons while faults are injected, then
//! the figures the README's reliability section reports. Ignored by default (it takes
//! minutes); run it with `dev/soak.sh` (ORCHGPU_SOAK_JOBS sets the job count, 500 by
//! default). Each daemon plays a host of its own (`ORCHGPU_DEBUG_PID_SPACE`), each wave
//! has two long jobs (12 s) whose notifications come again while they run, and one
//! daemon is killed for good (its state directory deleted) and replaced by a new one.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use nix::sys::signal::Signal;

use crate::harness::{MockSsgm, Stack, wait_for};

const WAVE: usize = 50;
/// Jobs per wave whose function runs long (`long-when-asked.sh`).
const LONG_PER_WAVE: usize = 2;

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long; run with dev/soak.sh"]
async fn soak_with_faults_loses_nothing_and_leaks_nothing() -> Result<()> {
    let jobs: usize = std::env::var("ORCHGPU_SOAK_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let started = Instant::now();
    let ssgm = MockSsgm::start(4)?;
    let mut stack = Stack::new("soak", 10).await?;
    stack.start_function("long-when-asked.sh")?;
    let state_a = stack.state_dir("a");
    let mut state_b = stack.state_dir("b");
    let daemon_args = |state: &str| -> Vec<String> {
        [
            "--state-dir",
            state,
            "--max-jobs",
            "6",
            "-s",
            "2",
            "-v",
            "10",
            "--shutdown-grace",
            "2",
            // Short, so that the claims of killed daemons do not hold their jobs long.
            "--claim-lease",
            "10",
        ]
        .map(str::to_string)
        .to_vec()
    };
    let args_a = daemon_args(&state_a);
    let mut args_b = daemon_args(&state_b);
    let mut host_b = "host-b";
    let mut a = start_on(&mut stack, &ssgm, &args_a, "host-a")?;
    let mut b = start_on(&mut stack, &ssgm, &args_b, host_b)?;

    let mut faults: HashMap<&str, u64> = HashMap::new();
    let mut keys = Vec::new();
    let mut wave = 0;
    while keys.len() < jobs {
        wave += 1;
        for (kind, count) in [
            ("error", 2),
            ("garbage", 1),
            ("hang", 1),
            ("fail-release", 2),
            ("busy", 3),
            // Kills whichever daemon allocates next, at the instant its grant is printed.
            ("kill-parent-after-grant", 1),
        ] {
            ssgm.inject(kind, count)?;
            *faults.entry(kind).or_default() += u64::from(count);
        }
        let wave_keys: Vec<String> = (0..WAVE.min(jobs - keys.len()))
            .map(|i| format!("soak/w{wave:03}/img {i}.png"))
            .collect();
        for (i, key) in wave_keys.iter().enumerate() {
            let body = if i < LONG_PER_WAVE {
                format!("LONG {key} body")
            } else {
                format!("{key} body")
            };
            stack.upload(key, body.as_bytes()).await?;
            if i % 5 == 0 {
                // S3's at-least-once delivery: the same notification twice at the same
                // moment, for both daemons to take.
                stack
                    .send_raw(&stack.duplicate_notification(key).await?)
                    .await?;
                *faults
                    .entry("duplicate notification at the same moment")
                    .or_default() += 1;
            }
            if i == wave_keys.len() / 2 {
                restart_if_killed(&mut stack, &ssgm, &mut a, &args_a, "host-a", &mut faults)
                    .await?;
                restart_if_killed(&mut stack, &ssgm, &mut b, &args_b, host_b, &mut faults).await?;
                if wave == 2 {
                    // A host lost for good: the daemon killed, its state directory gone;
                    // a new daemon of a new host takes its place. Its jobs' claims are
                    // the only record of what it held.
                    let deferred = kill_for_good(&mut stack, b, &state_b).await?;
                    *faults
                        .entry("daemon killed for good, state dir deleted")
                        .or_default() += 1;
                    *faults
                        .entry("kills deferred: a grant only in the local journal")
                        .or_default() += deferred;
                    state_b = stack.state_dir("c");
                    args_b = daemon_args(&state_b);
                    host_b = "host-c";
                    b = start_on(&mut stack, &ssgm, &args_b, host_b)?;
                } else if wave % 2 == 1 {
                    // A crash: no release, no return; the journal and SQS must cope.
                    stack.process(a).signal(Signal::SIGKILL)?;
                    stack.process(a).wait_exit(Duration::from_secs(10)).await?;
                    a = start_on(&mut stack, &ssgm, &args_a, "host-a")?;
                    *faults.entry("daemon SIGKILL").or_default() += 1;
                } else {
                    // A stop with a short grace: jobs cut off, messages returned.
                    stack.process(b).signal(Signal::SIGTERM)?;
                    let status = stack.process(b).wait_exit(Duration::from_secs(60)).await?;
                    assert!(status.success(), "daemon exit after SIGTERM: {status}");
                    b = start_on(&mut stack, &ssgm, &args_b, host_b)?;
                    *faults.entry("daemon SIGTERM (2 s grace)").or_default() += 1;
                }
            }
        }
        // The long jobs of this wave run for a while yet: their notifications again, for
        // whichever daemon takes them.
        for key in wave_keys.iter().take(LONG_PER_WAVE) {
            stack
                .send_raw(&stack.duplicate_notification(key).await?)
                .await?;
            *faults.entry("late duplicate of a long job").or_default() += 1;
        }
        // Duplicate notifications of objects of the previous wave (most of them done by
        // now): a redelivered object must not run again.
        let previous: Vec<String> = keys.iter().rev().take(5).cloned().collect();
        for key in &previous {
            stack
                .send_raw(&stack.duplicate_notification(key).await?)
                .await?;
            *faults.entry("duplicate notification").or_default() += 1;
        }
        keys.extend(wave_keys);
        // Let the wave finish before arming the next faults, so they spread over the run.
        stack
            .wait_for_results(keys.len(), Duration::from_secs(300))
            .await?;
        restart_if_killed(&mut stack, &ssgm, &mut a, &args_a, "host-a", &mut faults).await?;
        restart_if_killed(&mut stack, &ssgm, &mut b, &args_b, host_b, &mut faults).await?;
    }

    let _ = stack.wait_for_results(jobs, Duration::from_secs(600)).await;
    let _ = stack.wait_for_empty_queues(Duration::from_secs(120)).await;
    for daemon in [a, b] {
        stack.process(daemon).signal(Signal::SIGTERM)?;
        stack
            .process(daemon)
            .wait_exit(Duration::from_secs(60))
            .await?;
    }
    wait_for("no live allocation", Duration::from_secs(10), || async {
        Ok((ssgm.stat("live")? == 0).then_some(()))
    })
    .await
    .ok();
    let surviving_clients = ssgm.alloc_clients();

    let results = stack.results_by_source_key().await?;
    let lost = keys.iter().filter(|k| !results.contains_key(*k)).count();
    let invocations = stack.invocations();
    let duplicates: usize = invocations.values().map(|n| n.saturating_sub(1)).sum();
    let run_twice = invocations.values().filter(|n| **n > 1).count();
    let stats = ssgm.stats()?;
    let dead_lettered = stack.queue_depth(&stack.dlq_url).await?;
    let left_in_queue = stack.queue_depth(&stack.jobs_url).await?;

    println!("SOAK jobs={jobs} elapsed_s={}", started.elapsed().as_secs());
    let mut kinds: Vec<_> = faults.iter().collect();
    kinds.sort();
    for (kind, count) in kinds {
        println!("SOAK fault {kind}: {count} armed/caused");
    }
    println!("SOAK ssgm faults applied: {}", stats["faults_injected"]);
    println!(
        "SOAK results: {} of {jobs}; messages lost: {lost}",
        results.len()
    );
    println!("SOAK duplicate function invocations: {duplicates}");
    println!("SOAK objects run more than once: {run_twice}");
    println!("SOAK dead-lettered: {dead_lettered}; left in queue: {left_in_queue}");
    println!(
        "SOAK reservations left live: {}; scheduler stats: {stats}",
        stats["live"]
    );
    println!(
        "SOAK SSGM clients left running: {}",
        surviving_clients.len()
    );

    assert_eq!(lost, 0, "messages lost");
    assert_eq!(dead_lettered, 0, "messages dead-lettered");
    assert_eq!(left_in_queue, 0, "messages left in the queue");
    assert_eq!(stats["live"], 0, "reservations left live");
    assert_eq!(stats["granted"], stats["released"], "grants vs releases");
    assert_eq!(duplicates, 0, "duplicate results");
    assert!(
        surviving_clients.is_empty(),
        "SSGM clients left running: {surviving_clients:?}"
    );
    assert_eq!(run_twice, 0, "objects run more than once");
    Ok(())
}

/// Restarts a daemon that the `kill-parent-after-grant` fault killed.
async fn restart_if_killed(
    stack: &mut Stack,
    ssgm: &MockSsgm,
    daemon: &mut usize,
    args: &[String],
    host: &str,
    faults: &mut HashMap<&str, u64>,
) -> Result<()> {
    if stack.process(*daemon).try_status()?.is_some() {
        *daemon = start_on(stack, ssgm, args, host)?;
        *faults.entry("daemon SIGKILL at a grant").or_default() += 1;
    }
    Ok(())
}

/// Starts a daemon that plays host `host` (claims of other hosts wait for their lease).
fn start_on(stack: &mut Stack, ssgm: &MockSsgm, args: &[String], host: &str) -> Result<usize> {
    stack.start_daemon_with_env(
        ssgm,
        &as_strs(args),
        &[("ORCHGPU_DEBUG_PID_SPACE", std::ffi::OsStr::new(host))],
    )
}

/// Kills a daemon for good and deletes its state directory, at an instant when every
/// grant it holds is recorded in its job's claim: the one window the claim cannot cover
/// (an SSGM call in flight, or the milliseconds between its answer and the claim write,
/// see `reservations`) is waited out with the daemon stopped (SIGSTOP), so nothing new
/// starts between the look and the kill. Returns how many looks found the window open.
async fn kill_for_good(stack: &mut Stack, daemon: usize, state_dir: &str) -> Result<u64> {
    let mut deferred = 0;
    loop {
        stack.process(daemon).signal(Signal::SIGSTOP)?;
        if grants_all_in_claims(stack, state_dir).await? {
            break;
        }
        deferred += 1;
        stack.process(daemon).signal(Signal::SIGCONT)?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stack.process(daemon).signal(Signal::SIGKILL)?;
    stack
        .process(daemon)
        .wait_exit(Duration::from_secs(10))
        .await?;
    std::fs::remove_dir_all(state_dir)?;
    Ok(deferred)
}

/// Whether the journal in `state_dir` has no SSGM call in flight and every reservation it
/// lists is named by its job's claim.
async fn grants_all_in_claims(stack: &Stack, state_dir: &str) -> Result<bool> {
    let journal: serde_json::Value = match std::fs::read(format!("{state_dir}/reservations.json")) {
        Ok(bytes) => serde_json::from_slice(&bytes)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(e.into()),
    };
    let calls = journal["calls"].as_array().map_or(0, Vec::len);
    if calls > 0 {
        return Ok(false);
    }
    for entry in journal["reservations"].as_array().into_iter().flatten() {
        let (Some(job), Some(grant)) =
            (entry["job_id"].as_str(), entry["scheduler_job_id"].as_str())
        else {
            return Ok(false);
        };
        let key = format!("orchgpu-claims/{job}.claim");
        let Ok(body) = stack.get(&stack.output_bucket, &key).await else {
            return Ok(false);
        };
        let claim: serde_json::Value = serde_json::from_slice(&body)?;
        if claim["grant"]["scheduler_job_id"].as_str() != Some(grant) {
            return Ok(false);
        }
    }
    Ok(true)
}
