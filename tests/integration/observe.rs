//! The operator's view from the outside: `/metrics` agrees with what the emulator and the
//! mock scheduler saw through a run with scheduler faults, `/healthz` and `/readyz`
//! answer, and readiness drops on SIGTERM.

use std::time::Duration;

use anyhow::Result;
use nix::sys::signal::Signal;

use crate::harness::{MockSsgm, Prometheus, Stack, http_address, http_get, metric_sum, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_agree_with_the_emulator_and_the_scheduler() -> Result<()> {
    const JOBS: usize = 4;
    let ssgm = MockSsgm::start(2)?;
    let mut stack = Stack::new("observe", 10).await?;
    stack.start_function("copy-result.sh")?;
    for (kind, count) in [
        ("busy", 2),
        ("error", 1),
        ("garbage", 1),
        ("fail-release", 1),
    ] {
        ssgm.inject(kind, count)?;
    }
    // -s 2: the injected busy answers cost two seconds each, not a minute.
    let daemon = stack.start_daemon(&ssgm, &["--http-listen", "127.0.0.1:0", "-s", "2"])?;
    let address = http_address(&mut stack, daemon).await?;
    let (status, ready) = http_get(&address, "/readyz")?;
    assert_eq!(status, 200, "{ready}");
    for i in 0..JOBS {
        stack
            .upload(&format!("observe-{i}.png"), format!("input {i}").as_bytes())
            .await?;
    }
    stack
        .wait_for_results(JOBS, Duration::from_secs(120))
        .await?;
    stack.wait_for_empty_queues(Duration::from_secs(60)).await?;
    // A failed release is confirmed in the background; the gauge follows the scheduler.
    let text = wait_for("GPUs held back to 0", Duration::from_secs(30), || async {
        let (_, text) = http_get(&address, "/metrics")?;
        Ok(
            (ssgm.stat("live")? == 0 && metric_sum(&text, "orchgpu_gpus_held", &[]) == 0.0)
                .then_some(text),
        )
    })
    .await?;

    let results = stack.results_by_source_key().await?.len() as f64;
    assert_eq!(results, JOBS as f64);
    let sum = |name: &str, labels: &[(&str, &str)]| metric_sum(&text, name, labels);
    assert_eq!(
        sum("orchgpu_jobs_total", &[("outcome", "succeeded")]),
        results,
        "{text}"
    );
    let stats = ssgm.stats()?;
    let stat = |name: &str| stats[name].as_f64().unwrap_or(-1.0);
    assert_eq!(
        sum("orchgpu_scheduler_calls_total", &[("call", "alloc")]),
        stat("alloc_calls"),
        "{stats}\n{text}"
    );
    assert_eq!(
        sum(
            "orchgpu_scheduler_calls_total",
            &[("call", "alloc"), ("reply", "granted")]
        ),
        stat("granted"),
        "{stats}"
    );
    assert_eq!(
        sum(
            "orchgpu_scheduler_calls_total",
            &[("call", "alloc"), ("reply", "busy")]
        ),
        stat("busy"),
        "{stats}"
    );
    assert_eq!(
        sum(
            "orchgpu_scheduler_calls_total",
            &[("call", "alloc"), ("reply", "error")]
        ),
        stat("request_errors"),
        "{stats}"
    );
    assert_eq!(
        sum(
            "orchgpu_scheduler_calls_total",
            &[("call", "alloc"), ("reply", "garbage")]
        ),
        1.0
    );
    assert_eq!(
        sum("orchgpu_scheduler_calls_total", &[("call", "dealloc")]),
        stat("dealloc_calls"),
        "{stats}"
    );
    assert_eq!(
        sum(
            "orchgpu_scheduler_calls_total",
            &[("call", "dealloc"), ("reply", "ok")]
        ),
        stat("released"),
        "{stats}"
    );
    assert_eq!(
        sum("orchgpu_release_failures_total", &[]),
        stat("failed_releases")
    );
    assert_eq!(sum("orchgpu_jobs_running", &[]), 0.0);
    assert_eq!(sum("orchgpu_job_duration_seconds_count", &[]), results);
    assert_eq!(
        sum(
            "orchgpu_stage_duration_seconds_count",
            &[("stage", "upload")]
        ),
        results
    );
    assert!(
        sum(
            "orchgpu_aws_requests_total",
            &[("service", "S3"), ("operation", "PutObject")]
        ) >= results
    );
    assert!(sum("orchgpu_last_receive_timestamp_seconds", &[]) > 1.7e9);
    assert_eq!(
        sum(
            "orchgpu_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    let (status, health) = http_get(&address, "/healthz")?;
    assert_eq!(status, 200, "{health}");
    assert!(health.contains("\"healthy\":true"), "{health}");

    stack.process(daemon).signal(Signal::SIGTERM)?;
    wait_for("/readyz unready", Duration::from_secs(10), || async {
        Ok(match http_get(&address, "/readyz") {
            Ok((503, body)) => Some(body),
            // The listener closes as the daemon exits.
            _ => None,
        })
    })
    .await?;
    let status = stack
        .process(daemon)
        .wait_exit(Duration::from_secs(30))
        .await?;
    assert_eq!(status.code(), Some(0), "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_is_a_one_line_start_up_error() -> Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let address = taken.local_addr()?.to_string();
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("observe-port", 5).await?;
    let daemon = stack.start_daemon(&ssgm, &["--http-listen", &address])?;
    let status = stack
        .process(daemon)
        .wait_exit(Duration::from_secs(30))
        .await?;
    assert_eq!(status.code(), Some(1), "{status}");
    let log = stack.log(daemon);
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(
        errors[0].contains(&format!("cannot listen on {address}")),
        "{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_daemon() -> Result<()> {
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("observe-prom", 5).await?;
    stack.start_function("copy-result.sh")?;
    let daemon = stack.start_daemon(&ssgm, &["--http-listen", "127.0.0.1:0"])?;
    let address = http_address(&mut stack, daemon).await?;
    stack.upload("scraped.png", b"counted").await?;
    stack.wait_for_results(1, Duration::from_secs(60)).await?;
    let prometheus = Prometheus::start(&address)?;
    let series = prometheus.wait_for_series(
        "orchgpu_jobs_total{outcome=\"succeeded\"} >= 1",
        Duration::from_secs(60),
    )?;
    assert_eq!(series.len(), 1, "{series:?}");
    assert_eq!(
        series[0]["metric"]["instance"],
        address.as_str(),
        "{series:?}"
    );
    assert_eq!(series[0]["value"][1], "1", "{series:?}");
    let up = prometheus.query("up")?;
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");
    Ok(())
}

/// `orchgpu jobs` against the state directory a daemon wrote: its JSON output.
fn jobs_json(args: &[&str]) -> Result<serde_json::Value> {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_orchgpu"))
        .args(args)
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "orchgpu {args:?}: {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_shows_a_failed_attempt_and_the_successful_retry_across_a_restart() -> Result<()>
{
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("history-e2e", 5).await?;
    stack.start_function("copy-result.sh")?;
    // The first attempt's allocation is refused; the retry succeeds.
    ssgm.inject("error", 1)?;
    let daemon = stack.start_daemon(&ssgm, &[])?;
    stack.upload("twice tried.png", b"failed once").await?;
    stack.wait_for_results(1, Duration::from_secs(60)).await?;
    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;
    stack.process(daemon).signal(Signal::SIGTERM)?;
    let status = stack
        .process(daemon)
        .wait_exit(Duration::from_secs(30))
        .await?;
    assert_eq!(status.code(), Some(0), "{status}");

    // A restart on the same state directory keeps the history.
    let again = stack.start_daemon(&ssgm, &[])?;
    stack
        .wait_for_log(again, "Receiving jobs.", 1, Duration::from_secs(30))
        .await?;
    let state_dir = stack.state_dir("default");
    let detail = jobs_json(&[
        "jobs",
        "show",
        "twice tried.png",
        "--state-dir",
        &state_dir,
        "--json",
    ])?;
    assert_eq!(detail["state"], "done", "{detail:#}");
    assert_eq!(detail["key"], "twice tried.png", "{detail:#}");
    let attempts = detail["attempt_outcomes"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{detail:#}");
    assert_eq!(attempts[0]["state"], "returned", "{detail:#}");
    let reason = attempts[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("scheduler refused a request"), "{detail:#}");
    assert_eq!(attempts[1]["state"], "done", "{detail:#}");
    let kinds: Vec<&str> = detail["timeline"]
        .as_array()
        .expect("timeline")
        .iter()
        .filter(|e| e["attempt"] == 2)
        .filter_map(|e| e["kind"].as_str())
        .collect();
    for kind in [
        "received",
        "claimed",
        "waiting_for_gpus",
        "granted",
        "bundled",
        "uploaded",
        "result_seen",
        "released",
        "deleted",
    ] {
        assert!(kinds.contains(&kind), "no {kind} in attempt 2: {kinds:?}");
    }
    let list = jobs_json(&[
        "jobs",
        "--state-dir",
        &state_dir,
        "--state",
        "done",
        "--json",
    ])?;
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list:#}");
    Ok(())
}
