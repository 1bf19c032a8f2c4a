//! The job path end to end: awkward keys, junk messages, GPU contention.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Result;

use crate::harness::{MockSsgm, Stack};

/// Keys users really upload: spaces, '+', '%', unicode, folders, dots, no extension.
const AWKWARD_KEYS: [&str; 10] = [
    "plain.jpg",
    "with space.png",
    "plus+sign.jpg",
    "percent%20literal.jpeg",
    "unicode café 📷.png",
    "nested/folder/deeper/image.JPG",
    "many.dots.in.the.name.tar.gz",
    "no-extension",
    ".hidden",
    "notes.v2.txt",
];

fn body_for(key: &str) -> Vec<u8> {
    // Distinct bytes per key, with some binary, so a mix-up shows.
    let mut body = format!("input for {key}\n").into_bytes();
    body.extend((0..=255u8).cycle().take(4096 + key.len()));
    body
}

/// Each input key has exactly one result, a byte copy of its input (`copy-result.sh`).
fn assert_one_result_each_equal_to_its_input(
    results: &HashMap<String, Vec<Vec<u8>>>,
    inputs: impl IntoIterator<Item = (String, Vec<u8>)>,
) {
    for (key, body) in inputs {
        let bodies = results
            .get(&key)
            .unwrap_or_else(|| panic!("no result for {key:?}"));
        assert_eq!(bodies.len(), 1, "{key:?} has {} results", bodies.len());
        assert!(bodies[0] == body, "result of {key:?} is not its input");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awkward_keys_each_get_exactly_one_correct_result() -> Result<()> {
    let ssgm = MockSsgm::start(2)?;
    let mut stack = Stack::new("keys", 5).await?;
    stack.start_function("copy-result.sh")?;
    let daemon = stack.start_daemon(&ssgm, &[])?;
    for key in AWKWARD_KEYS {
        stack.upload(key, &body_for(key)).await?;
    }

    stack
        .wait_for_results(AWKWARD_KEYS.len(), Duration::from_secs(120))
        .await?;
    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;

    let results = stack.results_by_source_key().await?;
    assert_eq!(
        results.len(),
        AWKWARD_KEYS.len(),
        "results: {:?}",
        results.keys()
    );
    assert_one_result_each_equal_to_its_input(
        &results,
        AWKWARD_KEYS
            .iter()
            .map(|key| (key.to_string(), body_for(key))),
    );
    assert_eq!(
        stack.queue_depth(&stack.dlq_url).await?,
        0,
        "dead-letter queue"
    );
    ssgm.wait_all_released(Duration::from_secs(10)).await?;
    assert_eq!(ssgm.stat("granted")?, AWKWARD_KEYS.len() as u64);
    assert!(
        stack.process(daemon).try_status()?.is_none(),
        "daemon exited"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_messages_are_dropped_and_later_jobs_still_run() -> Result<()> {
    let ssgm = MockSsgm::start(2)?;
    let mut stack = Stack::new("junk", 5).await?;
    stack.start_function("copy-result.sh")?;
    let daemon = stack.start_daemon(&ssgm, &[])?;

    stack.send_raw("this is not JSON").await?;
    stack.send_raw(r#"{"Records":[]}"#).await?;
    stack.send_raw(r#"{"Service":"Amazon S3","Event":"s3:TestEvent","Time":"2026-11-27T08:00:00.000Z","Bucket":"x","RequestId":"1","HostId":"2"}"#).await?;
    let missing = stack.object_created_event("gone away.jpg", "abc");
    stack.send_raw(&missing).await?;

    // The notification setup's own s3:TestEvent plus ours: two test-event drops.
    stack
        .wait_for_log(
            daemon,
            "Dropping s3:TestEvent message.",
            2,
            Duration::from_secs(30),
        )
        .await?;
    stack
        .wait_for_log(
            daemon,
            "Dropping message that is not an S3 object event.",
            2,
            Duration::from_secs(30),
        )
        .await?;
    stack
        .wait_for_log(
            daemon,
            "Dropping job that can never run.",
            1,
            Duration::from_secs(30),
        )
        .await?;
    let log = stack.log(daemon);
    assert!(
        log.contains("this is not JSON"),
        "the drop line quotes the body"
    );
    assert!(
        log.contains("gone away.jpg"),
        "the drop line names the missing key"
    );

    stack.upload("after-junk.png", b"still works").await?;
    stack.wait_for_results(1, Duration::from_secs(60)).await?;
    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;
    assert_eq!(stack.queue_depth(&stack.dlq_url).await?, 0);
    assert!(
        stack.process(daemon).try_status()?.is_none(),
        "daemon exited"
    );
    // The missing object never reached the scheduler.
    assert_eq!(ssgm.stat("alloc_calls")?, 1);
    ssgm.wait_all_released(Duration::from_secs(10)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gpu_five_jobs_never_overlap_and_do_not_hammer_the_scheduler() -> Result<()> {
    const JOBS: u64 = 5;
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("onegpu", 5).await?;
    stack.start_function("copy-result.sh")?;
    stack.start_daemon(&ssgm, &["--max-jobs", "3"])?;
    for i in 0..JOBS {
        stack
            .upload(&format!("img-{i}.png"), &body_for(&i.to_string()))
            .await?;
    }

    stack
        .wait_for_results(JOBS as usize, Duration::from_secs(150))
        .await?;
    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;

    let stats = ssgm.stats()?;
    assert_eq!(
        stats["max_live"], 1,
        "two allocations were live at once: {stats}"
    );
    assert_eq!(stats["granted"], JOBS, "{stats}");
    // Each job is granted once; a busy answer is only followed by another try when one of
    // our own jobs released its GPU (the -s interval, 60 s, is longer than the test), so
    // at most one busy answer per release: alloc calls <= jobs + (jobs - 1).
    let alloc_calls = stats["alloc_calls"].as_u64().unwrap_or(u64::MAX);
    assert!(
        alloc_calls < 2 * JOBS,
        "{alloc_calls} alloc calls for {JOBS} jobs: {stats}"
    );
    ssgm.wait_all_released(Duration::from_secs(10)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_and_small_inputs_side_by_side_each_get_their_result() -> Result<()> {
    // Above 8 MiB an input is downloaded before GPUs are asked for, and only a few large
    // downloads stream at once; small ones ask for GPUs while they download.
    let ssgm = MockSsgm::start(4)?;
    let mut stack = Stack::new("sizes", 5).await?;
    stack.start_function("copy-result.sh")?;
    stack.start_daemon(&ssgm, &["--max-jobs", "6"])?;
    let mut inputs = Vec::new();
    for i in 0..6usize {
        let key = format!("size-{i}.bin");
        let mut body = body_for(&key);
        if i % 2 == 0 {
            // 9 MiB, distinct per key.
            body = body.iter().copied().cycle().take(9 * 1024 * 1024).collect();
        }
        stack.upload(&key, &body).await?;
        inputs.push((key, body));
    }

    stack
        .wait_for_results(inputs.len(), Duration::from_secs(150))
        .await?;
    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;
    let results = stack.results_by_source_key().await?;
    let jobs = inputs.len() as u64;
    assert_one_result_each_equal_to_its_input(&results, inputs);
    assert_eq!(ssgm.stat("granted")?, jobs);
    ssgm.wait_all_released(Duration::from_secs(10)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_input_gone_before_its_job_is_dropped_with_no_gpu_kept() -> Result<()> {
    // An event that names a small size lets the job ask for GPUs while it downloads,
    // but only once the GET has answered with the object: a 404 asks for none.
    let ssgm = MockSsgm::start(1)?;
    let mut stack = Stack::new("gonesized", 5).await?;
    stack.start_function("copy-result.sh")?;
    let daemon = stack.start_daemon(&ssgm, &[])?;
    let mut event: serde_json::Value =
        serde_json::from_str(&stack.object_created_event("deleted meanwhile.jpg", "abc"))?;
    event["Records"][0]["s3"]["object"]["size"] = 1234.into();
    stack.send_raw(&event.to_string()).await?;
    stack
        .wait_for_log(
            daemon,
            "Dropping job that can never run.",
            1,
            Duration::from_secs(30),
        )
        .await?;
    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;
    // An allocation whose grant came back after the download failed may be given back
    // by the background releaser, a moment after the message is dropped.
    crate::harness::wait_for("no live allocation", Duration::from_secs(10), || async {
        Ok((ssgm.stat("live")? == 0).then_some(()))
    })
    .await?;
    ssgm.wait_all_released(Duration::from_secs(10)).await?;
    assert_eq!(
        ssgm.stat("alloc_calls")?,
        0,
        "an allocation for a missing input"
    );

    // The one GPU is free for the next job.
    stack.upload("after-gone.png", b"still works").await?;
    stack.wait_for_results(1, Duration::from_secs(60)).await?;
    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;
    ssgm.wait_all_released(Duration::from_secs(10)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_events_and_folder_keys_cost_no_gpu_and_folders_no_request() -> Result<()> {
    // Events for small objects that are not there (deleted, never written), one for an
    // object that is there but not the version the event names, and keys that name no
    // object at all, beside one real input. Only the real input may reach the scheduler;
    // the folder keys may not even reach S3.
    const MISSING: usize = 60;
    const FOLDER_KEYS: [&str; 4] = ["/", "//", "%2F", ""];
    let ssgm = MockSsgm::start(2)?;
    let mut stack = Stack::new("stale", 5).await?;
    stack.start_function("copy-result.sh")?;
    let stats_file = stack.logs.path().join("stats.json");
    let stats_path = stats_file.to_str().expect("utf-8 temp path").to_string();
    let sized = |body: String| -> Result<String> {
        let mut event: serde_json::Value = serde_json::from_str(&body)?;
        event["Records"][0]["s3"]["object"]["size"] = 1234.into();
        Ok(event.to_string())
    };
    stack.upload("real.png", b"the one real input").await?;
    // The real object under another ETag: a later version's event, or a forged one.
    stack
        .send_raw(&sized(stack.object_created_event(
            "real.png",
            "0123456789abcdef0123456789abcdef",
        ))?)
        .await?;
    for i in 0..MISSING {
        let event = stack.object_created_event(&format!("gone/{i}.jpg"), "abc");
        stack.send_raw(&sized(event)?).await?;
    }
    for key in FOLDER_KEYS {
        // Raw keys, as S3 sends them (form-encoded already).
        let event = sized(stack.object_created_event("placeholder", "abc"))?
            .replace("\"placeholder\"", &format!("\"{key}\""));
        stack.send_raw(&event).await?;
    }
    let daemon = stack.start_daemon(&ssgm, &["--max-jobs", "10", "--stats-file", &stats_path])?;

    stack
        .wait_for_log(
            daemon,
            "Dropping job that can never run.",
            MISSING + 1,
            Duration::from_secs(60),
        )
        .await?;
    stack
        .wait_for_log(
            daemon,
            "is empty or a folder (ends in /)",
            FOLDER_KEYS.len(),
            Duration::from_secs(30),
        )
        .await?;
    stack.wait_for_results(1, Duration::from_secs(60)).await?;
    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;
    let outputs = stack.output_keys().await?;
    let results = outputs.iter().filter(|k| k.ends_with(".png")).count();
    assert_eq!(results, 1, "{outputs:?}");
    assert_eq!(stack.queue_depth(&stack.dlq_url).await?, 0);
    let books = ssgm.stats()?;
    assert_eq!(
        books["granted"], 1,
        "GPUs granted for inputs that are not there: {books}"
    );
    assert_eq!(books["alloc_calls"], 1, "{books}");
    ssgm.wait_all_released(Duration::from_secs(10)).await?;

    // One GET per event that names an object (the real one, its stale twin, the missing
    // ones), plus the claims location's check at start-up; none for the folder keys.
    stack
        .process(daemon)
        .signal(nix::sys::signal::Signal::SIGTERM)?;
    let status = stack
        .process(daemon)
        .wait_exit(Duration::from_secs(30))
        .await?;
    assert!(status.success(), "daemon exited with {status}");
    let stats: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stats_file)?)?;
    let gets = stats["requests"]["S3.GetObject"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert!(gets <= MISSING as u64 + 3, "{gets} GETs: {stats}");
    Ok(())
}
