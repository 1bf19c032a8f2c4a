//! `orchgpu-lambda` as Lambda runs it, without Docker: the real binary polls a Runtime API
//! of the tests' own (`RuntimeApi`), and the test plays the event source mappings
//! (`Mapping`: receive a batch, invoke, delete what succeeded, leave the failures) and
//! the schedule (a scheduled event), against the emulator, the mock SSGM and the
//! function stand-in. The mock's books (`granted`, `released`, `live`) are the judge of
//! every GPU.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::Value;

use crate::harness::{
    Mapping, MockSsgm, Outcome, RuntimeApi, Stack, lambda_env, response, scheduled_event, wait_for,
};

const LAMBDA: &str = env!("CARGO_BIN_EXE_orchgpu-lambda");
/// The function's timeout (each invocation's deadline) in these tests.
const TIMEOUT: Duration = Duration::from_secs(120);
/// The stable phrase of a possibly lost grant (`job::serverless::LOST_GRANT`).
pub(crate) const LOST_GRANT: &str = "GPU grant possibly lost with its sandbox";
/// The stable phrase of a release given up (`job::serverless::RELEASE_GIVEN_UP`).
pub(crate) const RELEASE_GIVEN_UP: &str =
    "GPU release given up; the scheduler may still hold the grant";

/// One sandbox: a Runtime API and the `orchgpu-lambda` process polling it.
struct Sandbox {
    api: RuntimeApi,
    process: usize,
}

async fn sandbox(
    stack: &mut Stack,
    ssgm: &MockSsgm,
    name: &str,
    extra: &[(&str, &str)],
) -> Result<Sandbox> {
    let api = RuntimeApi::start().await?;
    let env = lambda_env(stack, ssgm.port, ssgm.bin(), &api, name);
    let process = stack.start_lambda(Path::new(LAMBDA), &env, extra)?;
    Ok(Sandbox { api, process })
}

/// Invokes `sandbox` with `event`; `NoAnswer` as soon as its process is gone.
async fn invoke(stack: &mut Stack, sandbox: &Sandbox, event: Value) -> Outcome {
    let index = sandbox.process;
    let mut alive = || matches!(stack.process(index).try_status(), Ok(None));
    sandbox.api.invoke(event, TIMEOUT, &mut alive).await
}

/// One poll of `mapping` into `sandbox`.
async fn poll(
    stack: &mut Stack,
    mapping: &Mapping,
    sandbox: &Sandbox,
) -> Result<Option<crate::harness::Poll>> {
    let sqs = stack.sqs.clone();
    let index = sandbox.process;
    let mut alive = || matches!(stack.process(index).try_status(), Ok(None));
    mapping.poll(&sqs, &sandbox.api, TIMEOUT, &mut alive).await
}

/// Deletes S3's `s3:TestEvent` (sent when the stack set up its notification) from the
/// jobs queue, so that the first batch a test plays is its own.
async fn drain_test_event(stack: &Stack) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let output = stack
            .sqs
            .receive_message()
            .queue_url(&stack.jobs_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await?;
        for m in output.messages.unwrap_or_default() {
            if m.body().unwrap_or_default().contains("s3:TestEvent") {
                stack
                    .sqs
                    .delete_message()
                    .queue_url(&stack.jobs_url)
                    .set_receipt_handle(m.receipt_handle)
                    .send()
                    .await?;
                return Ok(());
            }
        }
    }
    bail!("no s3:TestEvent on the jobs queue")
}

/// Polls until a batch comes (or `timeout`).
async fn next_batch(
    stack: &mut Stack,
    mapping: &Mapping,
    sandbox: &Sandbox,
    timeout: Duration,
) -> Result<crate::harness::Poll> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(polled) = poll(stack, mapping, sandbox).await? {
            return Ok(polled);
        }
        if Instant::now() >= deadline {
            bail!("no batch within {timeout:?}");
        }
    }
}

/// Runs one schedule pass in `sandbox`; its summary.
async fn schedule(stack: &mut Stack, sandbox: &Sandbox) -> Result<Value> {
    let outcome = invoke(stack, sandbox, scheduled_event()).await;
    Ok(response(&outcome)?.clone())
}

fn claims_prefix() -> &'static str {
    "orchgpu-claims/"
}

async fn claims_left(stack: &Stack) -> Result<Vec<String>> {
    stack.keys(&stack.output_bucket, claims_prefix()).await
}

async fn claim_body(stack: &Stack) -> Result<Value> {
    let keys = claims_left(stack).await?;
    let [key] = keys.as_slice() else {
        bail!("expected one claim, found {keys:?}");
    };
    Ok(serde_json::from_slice(
        &stack.get(&stack.output_bucket, key).await?,
    )?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_with_awkward_keys_run_once_through_the_handlers_and_release_every_gpu() -> Result<()>
{
    // A GPU per job: no record meets a busy scheduler here.
    let ssgm = MockSsgm::start(3)?;
    let mut stack = Stack::new("lhappy", 5).await?;
    let (results_queue, results_url) = stack.add_results_queue().await?;
    stack.start_function("copy-result.sh")?;
    let lambda = sandbox(
        &mut stack,
        &ssgm,
        "a",
        &[("ORCHGPU_RESULTS_QUEUE", &results_queue)],
    )
    .await?;
    let keys = ["a b+c.png", "dir/ü ñ%20x.png", "q?x#y&z=1;'\".png"];
    for (i, key) in keys.iter().enumerate() {
        stack.upload(key, format!("input {i}").as_bytes()).await?;
    }
    let sqs = stack.sqs.clone();
    let jobs = Mapping::new(&sqs, &stack.jobs_url, 10, TIMEOUT).await?;
    let results = Mapping::new(&sqs, &results_url, 10, Duration::from_secs(5)).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(polled) = poll(&mut stack, &jobs, &lambda).await? {
            response(&polled.outcome)?;
            assert!(polled.failed.is_empty(), "jobs failed: {polled:?}");
        }
        poll(&mut stack, &results, &lambda).await?;
        let done = stack
            .output_keys()
            .await?
            .iter()
            .filter(|k| k.ends_with(".png"))
            .count();
        if done == keys.len()
            && stack.queue_depth(&stack.jobs_url).await? == 0
            && stack.queue_depth(&results_url).await? == 0
            && claims_left(&stack).await?.is_empty()
        {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "not done in time: {done} results, claims {:?}",
                claims_left(&stack).await?
            );
        }
    }
    let results = stack.results_by_source_key().await?;
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(
            results.get(*key),
            Some(&vec![format!("input {i}").into_bytes()]),
            "{key}: {:?}",
            results.keys()
        );
    }
    assert!(stack.invocations().values().all(|&n| n == 1));
    assert_eq!(ssgm.stat("granted")?, keys.len() as u64);
    ssgm.wait_all_released(Duration::from_secs(10)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_scheduler_is_a_batch_item_failure_and_the_record_comes_back() -> Result<()> {
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("lbusy", 5).await?;
    stack.start_function("copy-result.sh")?;
    let lambda = sandbox(
        &mut stack,
        &ssgm,
        "a",
        &[("ORCHGPU_ALLOC_RETRY_INTERVAL", "1")],
    )
    .await?;
    ssgm.inject("busy", 1)?;
    drain_test_event(&stack).await?;
    stack.upload("busy.png", b"wait for it").await?;
    let sqs = stack.sqs.clone();
    let jobs = Mapping::new(&sqs, &stack.jobs_url, 10, Duration::from_secs(2)).await?;
    let first = next_batch(&mut stack, &jobs, &lambda, Duration::from_secs(30)).await?;
    response(&first.outcome)?;
    assert_eq!(
        first.failed, first.received,
        "the busy record must come back"
    );
    assert_eq!(ssgm.stat("busy")?, 1);
    // Nothing was deleted: the same message comes back after its visibility and runs.
    let second = next_batch(&mut stack, &jobs, &lambda, Duration::from_secs(30)).await?;
    assert_eq!(second.received, first.failed);
    assert!(second.failed.is_empty(), "{second:?}");
    stack.wait_for_results(1, Duration::from_secs(30)).await?;
    assert_eq!(ssgm.stat("granted")?, 1);
    // No results queue: the schedule finds the result and releases the GPUs.
    let summary = schedule(&mut stack, &lambda).await?;
    assert_eq!(summary["finished"], 1, "{summary}");
    ssgm.wait_all_released(Duration::from_secs(10)).await?;
    assert!(claims_left(&stack).await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_in_one_batch_and_across_concurrent_invocations_run_once() -> Result<()> {
    let ssgm = MockSsgm::start(4)?;
    let mut stack = Stack::new("ldup", 5).await?;
    let hold = stack.logs.path().join("hold");
    std::fs::write(&hold, b"")?;
    let hold_env = hold.display().to_string();
    // The function holds its results until the test says so: every copy meets the claim.
    stack.start_function_with("held-copy.sh", &[("ORCHGPU_TEST_HOLD", &hold_env)])?;
    let a = sandbox(&mut stack, &ssgm, "a", &[]).await?;
    let b = sandbox(&mut stack, &ssgm, "b", &[]).await?;
    // One object notified four times: S3's event and three copies.
    drain_test_event(&stack).await?;
    stack.upload("twice.png", b"one object").await?;
    for _ in 0..3 {
        let again = stack.duplicate_notification("twice.png").await?;
        stack.send_raw(&again).await?;
    }
    let sqs = stack.sqs.clone();
    // Two mappings of one message each, invoked at the same time, then the two other
    // copies in one batch.
    let one = Mapping::new(&sqs, &stack.jobs_url, 1, TIMEOUT).await?;
    let (ea, ra) = one
        .receive(&sqs)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no message"))?;
    let (eb, rb) = one
        .receive(&sqs)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no message"))?;
    let (mut alive_a, mut alive_b) = (|| true, || true);
    let (oa, ob) = tokio::join!(
        a.api.invoke(ea, TIMEOUT, &mut alive_a),
        b.api.invoke(eb, TIMEOUT, &mut alive_b)
    );
    let failed_a = one.settle(&sqs, &ra, &oa).await?;
    let failed_b = one.settle(&sqs, &rb, &ob).await?;
    // The loser either found the winner's live claim (a failure: it comes back) or its
    // parked claim (done): never a second grant.
    assert!(failed_a.is_empty() || failed_b.is_empty(), "{oa:?} {ob:?}");
    let batch = Mapping::new(&sqs, &stack.jobs_url, 10, Duration::from_secs(2)).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut largest_batch = 0;
    while stack.queue_depth(&stack.jobs_url).await? > 0 {
        if let Some(polled) = poll(&mut stack, &batch, &a).await? {
            response(&polled.outcome)?;
            largest_batch = largest_batch.max(polled.received.len());
        }
        if Instant::now() >= deadline {
            bail!("copies left on the jobs queue");
        }
    }
    assert_eq!(
        largest_batch, 2,
        "the two last copies were to share a batch"
    );
    std::fs::remove_file(&hold)?;
    stack.wait_for_results(1, Duration::from_secs(30)).await?;
    assert_eq!(ssgm.stat("granted")?, 1, "one GPU job for one object");
    let summary = schedule(&mut stack, &a).await?;
    assert_eq!(summary["finished"], 1, "{summary}");
    ssgm.wait_all_released(Duration::from_secs(10)).await?;
    assert_eq!(stack.invocations().len(), 1);
    assert!(stack.invocations().values().all(|&n| n == 1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_the_grant_and_the_claim_write_the_lost_grant_is_reported() -> Result<()> {
    let ssgm = MockSsgm::start(2)?;
    let mut stack = Stack::new("lkill1", 5).await?;
    stack.start_function("copy-result.sh")?;
    let doomed = sandbox(
        &mut stack,
        &ssgm,
        "doomed",
        &[("ORCHGPU_DEBUG_ABORT_AT", "granted")],
    )
    .await?;
    drain_test_event(&stack).await?;
    stack.upload("lost.png", b"granted as it died").await?;
    let sqs = stack.sqs.clone();
    let jobs = Mapping::new(&sqs, &stack.jobs_url, 10, Duration::from_secs(3)).await?;
    let polled = next_batch(&mut stack, &jobs, &doomed, Duration::from_secs(30)).await?;
    assert_eq!(polled.outcome, Outcome::NoAnswer, "the sandbox was to die");
    assert_eq!(
        ssgm.stat("live")?,
        1,
        "the scheduler granted before the death"
    );
    let claim = claim_body(&stack).await?;
    assert!(
        claim["serverless"]["alloc_started_unix_ms"].is_u64(),
        "{claim}"
    );
    assert!(claim.get("grant").is_none(), "{claim}");
    // A new sandbox; the schedule names the claim in the line an alert keys on.
    let fresh = sandbox(&mut stack, &ssgm, "fresh", &[]).await?;
    let summary = schedule(&mut stack, &fresh).await?;
    assert_eq!(summary["lost_grants"], 1, "{summary}");
    let log = stack.log(fresh.process);
    let line = log
        .lines()
        .find(|l| l.contains(LOST_GRANT))
        .ok_or_else(|| anyhow::anyhow!("no lost-grant line:\n{log}"))?;
    assert!(
        line.contains("orchgpu-claims/") && line.contains(".claim"),
        "{line}"
    );
    assert!(log.contains(r#""LostGrants":1"#), "no metric line:\n{log}");
    // The record comes back and the job runs on the other GPU; the lost one stays lost.
    let again = next_batch(&mut stack, &jobs, &fresh, Duration::from_secs(30)).await?;
    assert!(again.failed.is_empty(), "{again:?}");
    stack.wait_for_results(1, Duration::from_secs(30)).await?;
    schedule(&mut stack, &fresh).await?;
    wait_for(
        "the job's own grant released",
        Duration::from_secs(10),
        || async { Ok((ssgm.stat("released")? == 1).then_some(())) },
    )
    .await?;
    assert_eq!(
        ssgm.stat("live")?,
        1,
        "the lost grant (the scheduler's clean-up frees it)"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_grant_write_the_schedule_releases_the_recorded_grant() -> Result<()> {
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("lkill2", 5).await?;
    stack.start_function("copy-result.sh")?;
    let doomed = sandbox(
        &mut stack,
        &ssgm,
        "doomed",
        &[("ORCHGPU_DEBUG_ABORT_AT", "grant-recorded")],
    )
    .await?;
    drain_test_event(&stack).await?;
    stack.upload("recorded.png", b"recorded as it died").await?;
    let sqs = stack.sqs.clone();
    let jobs = Mapping::new(&sqs, &stack.jobs_url, 10, Duration::from_secs(3)).await?;
    let polled = next_batch(&mut stack, &jobs, &doomed, Duration::from_secs(30)).await?;
    assert_eq!(polled.outcome, Outcome::NoAnswer);
    assert_eq!(ssgm.stat("live")?, 1);
    let claim = claim_body(&stack).await?;
    assert!(claim["grant"]["scheduler_job_id"].is_string(), "{claim}");
    let fresh = sandbox(&mut stack, &ssgm, "fresh", &[]).await?;
    let summary = schedule(&mut stack, &fresh).await?;
    assert_eq!(summary["grants_released"], 1, "{summary}");
    assert_eq!(ssgm.stat("live")?, 0, "the recorded grant is released");
    assert!(claims_left(&stack).await?.is_empty());
    // The record comes back and runs on the only GPU: nothing leaked.
    let again = next_batch(&mut stack, &jobs, &fresh, Duration::from_secs(30)).await?;
    assert!(again.failed.is_empty(), "{again:?}");
    stack.wait_for_results(1, Duration::from_secs(30)).await?;
    schedule(&mut stack, &fresh).await?;
    ssgm.wait_all_released(Duration::from_secs(10)).await?;
    assert_eq!(ssgm.stat("granted")?, 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_that_never_comes_releases_the_gpus_retries_then_dead_letters() -> Result<()> {
    let ssgm = MockSsgm::start(1)?;
    // maxReceiveCount 2: two attempts, then the dead-letter queue.
    let mut stack = Stack::new("lnever", 2).await?;
    // No function: the result never comes.
    let lambda = sandbox(&mut stack, &ssgm, "a", &[("ORCHGPU_RESULT_DEADLINE", "2")]).await?;
    drain_test_event(&stack).await?;
    stack.upload("never.png", b"nobody answers").await?;
    let sqs = stack.sqs.clone();
    let jobs = Mapping::new(&sqs, &stack.jobs_url, 10, TIMEOUT).await?;
    for attempt in 1..=2u64 {
        let polled = next_batch(&mut stack, &jobs, &lambda, Duration::from_secs(30)).await?;
        assert!(polled.failed.is_empty(), "{polled:?}");
        let claim = claim_body(&stack).await?;
        assert_eq!(claim["serverless"]["attempts"], attempt, "{claim}");
        assert_eq!(claim["owner"]["host"], "serverless", "parked: {claim}");
        assert_eq!(ssgm.stat("live")?, 1, "held while the function may run");
        // Before the deadline the schedule leaves it; after it, it acts.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let summary = schedule(&mut stack, &lambda).await?;
        assert_eq!(ssgm.stat("live")?, 0, "released at the deadline: {summary}");
        if attempt == 1 {
            assert_eq!(summary["retried"], 1, "{summary}");
        } else {
            assert_eq!(summary["dead_lettered"], 1, "{summary}");
        }
    }
    assert_eq!(stack.queue_depth(&stack.jobs_url).await?, 0);
    assert_eq!(stack.queue_depth(&stack.dlq_url).await?, 1);
    assert!(claims_left(&stack).await?.is_empty());
    ssgm.assert_all_released()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_results_handler_run_twice_for_one_result_releases_once() -> Result<()> {
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("ltwice", 5).await?;
    let (results_queue, results_url) = stack.add_results_queue().await?;
    stack.start_function("copy-result.sh")?;
    let lambda = sandbox(
        &mut stack,
        &ssgm,
        "a",
        &[("ORCHGPU_RESULTS_QUEUE", &results_queue)],
    )
    .await?;
    drain_test_event(&stack).await?;
    stack.upload("once.png", b"one result").await?;
    let sqs = stack.sqs.clone();
    let jobs = Mapping::new(&sqs, &stack.jobs_url, 10, TIMEOUT).await?;
    let polled = next_batch(&mut stack, &jobs, &lambda, Duration::from_secs(30)).await?;
    assert!(polled.failed.is_empty(), "{polled:?}");
    let results = Mapping::new(&sqs, &results_url, 10, Duration::from_secs(5)).await?;
    // The result's event, received once and given to the handler twice.
    let (event, receipts) = loop {
        if let Some((event, receipts)) = results.receive(&sqs).await?
            && event.to_string().contains(".png")
        {
            break (event, receipts);
        }
    };
    for round in 0..2 {
        let outcome = invoke(&mut stack, &lambda, event.clone()).await;
        let answer = response(&outcome)?;
        assert_eq!(
            answer["batchItemFailures"],
            Value::Array(vec![]),
            "round {round}"
        );
    }
    results
        .settle(&sqs, &receipts, &Outcome::Response(Value::Null))
        .await?;
    ssgm.wait_all_released(Duration::from_secs(10)).await?;
    assert_eq!(ssgm.stat("released")?, 1);
    assert_eq!(ssgm.stat("failed_releases")?, 0);
    assert!(claims_left(&stack).await?.is_empty());
    assert_eq!(
        stack.log(lambda.process).matches("Job completed.").count(),
        1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_release_keeps_the_grant_in_the_claim_until_a_retry_releases_it_once() -> Result<()>
{
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("lrelfail", 5).await?;
    let (results_queue, results_url) = stack.add_results_queue().await?;
    stack.start_function("copy-result.sh")?;
    let env = [("ORCHGPU_RESULTS_QUEUE", results_queue.as_str())];
    let first = sandbox(&mut stack, &ssgm, "first", &env).await?;
    drain_test_event(&stack).await?;
    stack.upload("release.png", b"released later").await?;
    let sqs = stack.sqs.clone();
    let jobs = Mapping::new(&sqs, &stack.jobs_url, 10, TIMEOUT).await?;
    let polled = next_batch(&mut stack, &jobs, &first, Duration::from_secs(30)).await?;
    assert!(polled.failed.is_empty(), "{polled:?}");
    stack.wait_for_results(1, Duration::from_secs(30)).await?;
    // The scheduler fails the next `-dealloc`.
    ssgm.inject("fail-release", 1)?;
    let results = Mapping::new(&sqs, &results_url, 10, Duration::from_secs(3)).await?;
    // (Batches before the result's, such as S3's test event, succeed.)
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let polled = next_batch(&mut stack, &results, &first, Duration::from_secs(30)).await?;
        response(&polled.outcome)?;
        if !polled.failed.is_empty() {
            assert_eq!(polled.failed.len(), 1, "{polled:?}");
            break;
        }
        if Instant::now() >= deadline {
            bail!("the result's record never failed (the release's failure is lost)");
        }
    }
    assert_eq!(ssgm.stat("failed_releases")?, 1);
    assert_eq!(ssgm.stat("live")?, 1);
    // The claim keeps the grant, without the function, released for the next taker.
    let claim = claim_body(&stack).await?;
    assert!(claim["grant"]["scheduler_job_id"].is_string(), "{claim}");
    assert!(claim.get("function").is_none(), "{claim}");
    assert_eq!(claim["expires_unix_ms"], 0, "{claim}");
    assert_eq!(claim["serverless"]["release_failures"], 1, "{claim}");
    // The sandbox is recycled: whatever it kept in /tmp is gone with it.
    stack.process(first.process).kill();
    // The scheduler answers again; a fresh sandbox's schedule releases the grant.
    let fresh = sandbox(&mut stack, &ssgm, "fresh", &env).await?;
    let summary = schedule(&mut stack, &fresh).await?;
    assert_eq!(summary["grants_released"], 1, "{summary}");
    assert_eq!(ssgm.stat("live")?, 0, "released once the scheduler answers");
    assert!(claims_left(&stack).await?.is_empty());
    // The result's record comes back and finds the job finished.
    let again = next_batch(&mut stack, &results, &fresh, Duration::from_secs(30)).await?;
    assert!(again.failed.is_empty(), "{again:?}");
    assert_eq!(stack.queue_depth(&results_url).await?, 0);
    assert_eq!(ssgm.stat("released")?, 1, "released exactly once");
    assert_eq!(ssgm.stat("failed_releases")?, 1);
    assert_eq!(ssgm.stat("dealloc_calls")?, 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_carried_grant_whose_release_fails_stays_in_the_claim_and_the_record_comes_back()
-> Result<()> {
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("lcarryfail", 5).await?;
    stack.start_function("copy-result.sh")?;
    let doomed = sandbox(
        &mut stack,
        &ssgm,
        "doomed",
        &[("ORCHGPU_DEBUG_ABORT_AT", "grant-recorded")],
    )
    .await?;
    drain_test_event(&stack).await?;
    stack
        .upload("carried.png", b"carried, then refused")
        .await?;
    let sqs = stack.sqs.clone();
    let jobs = Mapping::new(&sqs, &stack.jobs_url, 10, Duration::from_secs(3)).await?;
    let polled = next_batch(&mut stack, &jobs, &doomed, Duration::from_secs(30)).await?;
    assert_eq!(polled.outcome, Outcome::NoAnswer);
    // The redelivered record meets the grant the dead sandbox recorded, and the
    // scheduler refuses its release: the claim keeps it, the record comes back.
    ssgm.inject("fail-release", 1)?;
    let fresh = sandbox(&mut stack, &ssgm, "fresh", &[]).await?;
    let again = next_batch(&mut stack, &jobs, &fresh, Duration::from_secs(30)).await?;
    assert_eq!(again.failed.len(), 1, "{again:?}");
    assert_eq!(ssgm.stat("live")?, 1);
    assert_eq!(ssgm.stat("granted")?, 1, "no second grant over the first");
    let claim = claim_body(&stack).await?;
    assert!(claim["grant"]["scheduler_job_id"].is_string(), "{claim}");
    assert_eq!(claim["serverless"]["release_failures"], 1, "{claim}");
    assert_eq!(claim["expires_unix_ms"], 0, "{claim}");
    // The fresh sandbox is recycled too; a third one's schedule releases the grant.
    stack.process(fresh.process).kill();
    let third = sandbox(&mut stack, &ssgm, "third", &[]).await?;
    let summary = schedule(&mut stack, &third).await?;
    assert_eq!(summary["grants_released"], 1, "{summary}");
    assert_eq!(ssgm.stat("live")?, 0);
    assert!(claims_left(&stack).await?.is_empty());
    // The record runs the job on the only GPU: nothing leaked, nothing released twice.
    let last = next_batch(&mut stack, &jobs, &third, Duration::from_secs(30)).await?;
    assert!(last.failed.is_empty(), "{last:?}");
    stack.wait_for_results(1, Duration::from_secs(30)).await?;
    schedule(&mut stack, &third).await?;
    ssgm.wait_all_released(Duration::from_secs(10)).await?;
    let [granted, released, failed] = ssgm.counters(["granted", "released", "failed_releases"])?;
    assert_eq!((granted, released, failed), (2, 2, 1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_a_confirmed_release_the_second_dealloc_frees_nothing() -> Result<()> {
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("lrelkill", 5).await?;
    let (results_queue, results_url) = stack.add_results_queue().await?;
    stack.start_function("copy-result.sh")?;
    let env = [("ORCHGPU_RESULTS_QUEUE", results_queue.as_str())];
    let lambda = sandbox(&mut stack, &ssgm, "a", &env).await?;
    drain_test_event(&stack).await?;
    stack.upload("twice.png", b"released, then killed").await?;
    let sqs = stack.sqs.clone();
    let jobs = Mapping::new(&sqs, &stack.jobs_url, 10, TIMEOUT).await?;
    let polled = next_batch(&mut stack, &jobs, &lambda, Duration::from_secs(30)).await?;
    assert!(polled.failed.is_empty(), "{polled:?}");
    stack.wait_for_results(1, Duration::from_secs(30)).await?;
    // The result's handler dies between the confirmed `-dealloc` and the claim write.
    let doomed = sandbox(
        &mut stack,
        &ssgm,
        "doomed",
        &[
            ("ORCHGPU_RESULTS_QUEUE", results_queue.as_str()),
            ("ORCHGPU_DEBUG_ABORT_AT", "dealloc-confirmed"),
        ],
    )
    .await?;
    let results = Mapping::new(&sqs, &results_url, 10, Duration::from_secs(3)).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while next_batch(&mut stack, &results, &doomed, Duration::from_secs(30))
        .await?
        .outcome
        != Outcome::NoAnswer
    {
        if Instant::now() >= deadline {
            bail!("the doomed sandbox never reached the release");
        }
    }
    assert_eq!(ssgm.stat("released")?, 1);
    assert_eq!(ssgm.stat("live")?, 0);
    let claim = claim_body(&stack).await?;
    assert!(claim["grant"]["scheduler_job_id"].is_string(), "{claim}");
    // The schedule finds the grant still recorded and calls `-dealloc` again: the
    // scheduler no longer knows the job (exit 1) and frees nothing; the claim keeps the
    // grant, release pending, counted towards the give-up rule.
    let summary = schedule(&mut stack, &lambda).await?;
    assert_eq!(summary["errors"], 1, "{summary}");
    let [released, failed, calls] =
        ssgm.counters(["released", "failed_releases", "dealloc_calls"])?;
    assert_eq!((released, failed, calls), (1, 1, 2));
    let mut claim = claim_body(&stack).await?;
    assert_eq!(claim["serverless"]["release_failures"], 1, "{claim}");
    assert!(claim.get("function").is_none(), "{claim}");
    assert_eq!(claim["expires_unix_ms"], 0, "{claim}");
    // An hour of failures later (the first one moved back in the claim), the next failed
    // attempt gives the release up, names the claim, and removes it.
    let since = claim["serverless"]["release_failing_since_unix_ms"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no failing-since in {claim}"))?;
    claim["serverless"]["release_failing_since_unix_ms"] = (since - 3_600_000).into();
    let [key] = claims_left(&stack)
        .await?
        .try_into()
        .map_err(|k| anyhow::anyhow!("{k:?}"))?;
    stack
        .s3
        .put_object()
        .bucket(&stack.output_bucket)
        .key(&key)
        .body(serde_json::to_vec(&claim)?.into())
        .send()
        .await?;
    schedule(&mut stack, &lambda).await?;
    assert_eq!(ssgm.stat("dealloc_calls")?, 3);
    assert!(claims_left(&stack).await?.is_empty());
    let log = stack.log(lambda.process);
    let given_up = log
        .lines()
        .find(|l| l.contains(RELEASE_GIVEN_UP))
        .ok_or_else(|| anyhow::anyhow!("no give-up line in the log"))?;
    assert!(given_up.contains(&key), "{given_up}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_too_little_time_left_no_record_is_started_and_all_come_back() -> Result<()> {
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("lshort", 5).await?;
    let lambda = sandbox(&mut stack, &ssgm, "a", &[]).await?;
    drain_test_event(&stack).await?;
    stack.upload("late.png", b"too late").await?;
    let sqs = stack.sqs.clone();
    let jobs = Mapping::new(&sqs, &stack.jobs_url, 10, Duration::from_secs(2)).await?;
    let (event, receipts) = loop {
        if let Some(batch) = jobs.receive(&sqs).await? {
            break batch;
        }
    };
    // A deadline 20 s away: less than one record's budget (one SSGM call of 3 s with its
    // kill grace, four claim calls of 10 s, 15 s of upload).
    let index = lambda.process;
    let mut alive = || matches!(stack.process(index).try_status(), Ok(None));
    let outcome = lambda
        .api
        .invoke(event, Duration::from_secs(20), &mut alive)
        .await;
    let failed = jobs.settle(&sqs, &receipts, &outcome).await?;
    assert_eq!(failed.len(), receipts.len(), "{outcome:?}");
    assert_eq!(ssgm.stat("alloc_calls")?, 0);
    assert!(claims_left(&stack).await?.is_empty());
    assert!(
        stack
            .log(lambda.process)
            .contains("Remaining invocation time is short; not starting more records."),
        "{}",
        stack.log(lambda.process)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_left_by_nothing_is_removed_and_a_foreign_object_left_alone() -> Result<()> {
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("lorphan", 5).await?;
    let lambda = sandbox(&mut stack, &ssgm, "a", &[]).await?;
    // A claim whose holder's lease ran out with nothing recorded (a holder that died
    // before its intent), and an object that is no claim of ours.
    let stale = serde_json::json!({
        "version": 2,
        "job_id": "00112233445566778899",
        "owner": {"host": "gone", "pid": 1, "started_unix": 1},
        "expires_unix_ms": 1_000,
        "message_id": "m-1"
    });
    for (key, body) in [
        ("00112233445566778899.claim", stale.to_string()),
        ("aabbccddeeff00112233.claim", "not a claim".to_string()),
    ] {
        stack
            .s3
            .put_object()
            .bucket(&stack.output_bucket)
            .key(format!("{}{key}", claims_prefix()))
            .body(body.into_bytes().into())
            .send()
            .await?;
    }
    let summary = schedule(&mut stack, &lambda).await?;
    assert_eq!(summary["claims"], 2, "{summary}");
    assert_eq!(summary["removed"], 1, "{summary}");
    let left = claims_left(&stack).await?;
    assert_eq!(
        left,
        vec![format!("{}aabbccddeeff00112233.claim", claims_prefix())]
    );
    Ok(())
}

/// Median of `values` (milliseconds).
fn median(values: &mut [u64]) -> u64 {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check; see BENCHMARKS.md"]
async fn measure_lambda_against_the_daemon() -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    const JOBS: usize = 10;
    let mut report = Vec::new();
    for mode in ["daemon", "lambda"] {
        let ssgm = MockSsgm::start(1)?;
        let mut stack = Stack::new(&format!("lbench-{mode}"), 5).await?;
        stack.set_print_logs(false);
        let (results_queue, results_url) = stack.add_results_queue().await?;
        stack.start_function("copy-result.sh")?;
        drain_test_event(&stack).await?;
        let stop = Arc::new(AtomicBool::new(false));
        // Billed milliseconds of each invocation, by handler.
        let billed: Arc<Mutex<Vec<(&'static str, u64)>>> = Arc::default();
        let mut players = Vec::new();
        if mode == "daemon" {
            stack.start_daemon(&ssgm, &["--results-queue", &results_queue, "-b", "60"])?;
        } else {
            let lambda = sandbox(
                &mut stack,
                &ssgm,
                "bench",
                &[("ORCHGPU_RESULTS_QUEUE", &results_queue)],
            )
            .await?;
            let api = Arc::new(lambda.api);
            let sqs = stack.sqs.clone();
            // One player per mapping, as Lambda polls each queue on its own.
            for (kind, url) in [
                ("jobs", stack.jobs_url.clone()),
                ("results", results_url.clone()),
            ] {
                let mapping = Mapping::new(&sqs, &url, 10, Duration::from_secs(5)).await?;
                let (api, sqs, stop, billed) =
                    (api.clone(), sqs.clone(), stop.clone(), billed.clone());
                players.push(tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let Ok(Some((event, receipts))) = mapping.receive(&sqs).await else {
                            continue;
                        };
                        let started = Instant::now();
                        let outcome = api.invoke(event, TIMEOUT, &mut || true).await;
                        let took = started.elapsed().as_millis() as u64;
                        billed.lock().expect("not poisoned").push((kind, took));
                        let _ = mapping.settle(&sqs, &receipts, &outcome).await;
                    }
                }));
            }
        }
        let (mut to_bundle, mut to_release) = (Vec::new(), Vec::new());
        for i in 0..JOBS {
            let started = Instant::now();
            stack
                .upload(&format!("bench-{i}.png"), format!("job {i}").as_bytes())
                .await?;
            let prefix = format!("{}/", stack.work_dir);
            let poll = Duration::from_millis(10);
            let deadline = started + Duration::from_secs(60);
            while stack.keys(&stack.work_bucket, &prefix).await?.len() <= i {
                if Instant::now() > deadline {
                    bail!("{mode}: no bundle for job {i}");
                }
                tokio::time::sleep(poll).await;
            }
            to_bundle.push(started.elapsed().as_millis() as u64);
            loop {
                let pngs = stack
                    .output_keys()
                    .await?
                    .iter()
                    .filter(|k| k.ends_with(".png"))
                    .count();
                if pngs > i {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{mode}: no result for job {i}");
                }
                tokio::time::sleep(poll).await;
            }
            let result_seen = Instant::now();
            while ssgm.stat("released")? <= i as u64 {
                if Instant::now() > deadline {
                    bail!("{mode}: job {i}'s GPUs not released");
                }
                tokio::time::sleep(poll).await;
            }
            to_release.push(result_seen.elapsed().as_millis() as u64);
        }
        stop.store(true, Ordering::SeqCst);
        for player in players {
            let _ = player.await;
        }
        let billed = billed.lock().expect("not poisoned").clone();
        let per_job = |kind: &str| {
            billed
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, ms)| ms)
                .sum::<u64>() as f64
                / JOBS as f64
        };
        report.push(format!(
            "{mode}: upload -> bundle uploaded median {} ms (max {}), result -> GPUs released median {} ms (max {}){}",
            median(&mut to_bundle.clone()),
            to_bundle.iter().max().unwrap_or(&0),
            median(&mut to_release.clone()),
            to_release.iter().max().unwrap_or(&0),
            if mode == "lambda" {
                format!(
                    "; billed per job: jobs handler {:.0} ms, results handler {:.0} ms",
                    per_job("jobs"),
                    per_job("results")
                )
            } else {
                String::new()
            }
        ));
        ssgm.wait_all_released(Duration::from_secs(10)).await?;
    }
    for line in &report {
        println!("{line}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_of_another_kind_fails_the_invocation_and_names_it() -> Result<()> {
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("lroute", 5).await?;
    let lambda = sandbox(&mut stack, &ssgm, "a", &[]).await?;
    // An S3 event sent straight to the function, and a batch of another queue.
    let s3_event: Value = serde_json::from_str(include_str!("../fixtures/events/aws_put.json"))?;
    let other_queue = serde_json::json!({"Records": [{
        "messageId": "m", "receiptHandle": "r", "body": "{}", "attributes": {},
        "messageAttributes": {}, "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:000000000000:someone-elses-queue",
    }]});
    for (event, named) in [
        (s3_event, "not of SQS"),
        (other_queue, "someone-elses-queue"),
    ] {
        match invoke(&mut stack, &lambda, event).await {
            Outcome::Error(error) => {
                assert_eq!(error["errorType"], "orchgpu.EventRefused", "{error}");
                assert!(error.to_string().contains(named), "{error}");
            }
            other => bail!("not refused: {other:?}"),
        }
    }
    assert_eq!(ssgm.stat("alloc_calls")?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claims_location_the_function_cannot_write_fails_its_init() -> Result<()> {
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("linit", 5).await?;
    let lambda = sandbox(
        &mut stack,
        &ssgm,
        "a",
        &[("ORCHGPU_CLAIMS", "orchgpu-no-such-bucket-for-claims/c")],
    )
    .await?;
    let status = stack
        .process(lambda.process)
        .wait_exit(Duration::from_secs(30))
        .await?;
    assert_eq!(status.code(), Some(1), "{status:?}");
    let log = stack.log(lambda.process);
    assert!(
        log.contains("cannot write and delete claims in s3://orchgpu-no-such-bucket-for-claims/c"),
        "{log}"
    );
    Ok(())
}
