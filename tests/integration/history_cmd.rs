//! `orchgpu jobs`: the real binary reads a history written through the `History` API
//! (while that writer is still open), as JSON and as a table; a missing history is one
//! line and exit 1; the daemon's orchGPU-style command line is untouched.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use orchgpu::history::{EventKind, History, HistoryEvent, Retention, SUCCEEDED};
use serde_json::Value;

fn orchgpu(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orchgpu"))
        .args(args)
        .env_remove("ORCHGPU_STATE_DIR")
        .env_remove("STATE_DIRECTORY")
        .output()
        .expect("run orchgpu")
}

fn describe(args: &[&str], output: &Output) -> String {
    format!(
        "orchgpu {}\nstatus: {}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs `orchgpu args`, expects exit 0, returns stdout.
fn ok(args: &[&str]) -> String {
    let output = orchgpu(args);
    assert!(output.status.success(), "{}", describe(args, &output));
    String::from_utf8(output.stdout).expect("utf-8 stdout")
}

fn json(args: &[&str]) -> Value {
    let stdout = ok(args);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// A fixed time well in the past (2026-05-28), plus `n` seconds.
fn at(n: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_780_000_000 + n)
}

fn record(history: &History, job: &str, key: &str, n: u64, kind: EventKind) {
    history.record(HistoryEvent {
        job_id: job.into(),
        bucket: "in".into(),
        key: key.into(),
        message_id: Some(format!("msg-{job}")),
        at: at(n),
        kind,
    });
}

/// Three jobs: `job-1` (images/cat.jpg) failed once then succeeded, `job-2`
/// (images/dog.jpg) was returned at shutdown, `job-3` (other/cat.png) is running.
fn write_history(dir: &Path) -> History {
    // Keeps everything: the fixed times are in the past.
    let keep_all = Retention {
        max_age: Duration::from_secs(100 * 365 * 86_400),
        max_rows: u64::MAX,
    };
    let history = History::open(dir, keep_all).expect("open history");
    let reason = "result deadline: no result after 3600 s";
    let cat = "images/cat.jpg";
    record(
        &history,
        "job-1",
        cat,
        0,
        EventKind::Received { receive_count: 1 },
    );
    record(
        &history,
        "job-1",
        cat,
        1,
        EventKind::Granted {
            scheduler_job: "17".into(),
            devices: vec!["gpu1:0".into()],
        },
    );
    record(
        &history,
        "job-1",
        cat,
        2,
        EventKind::Released {
            scheduler_job: "17".into(),
        },
    );
    record(
        &history,
        "job-1",
        cat,
        3,
        EventKind::Returned {
            reason: reason.into(),
        },
    );
    record(
        &history,
        "job-1",
        cat,
        10,
        EventKind::Received { receive_count: 2 },
    );
    record(&history, "job-1", cat, 11, EventKind::Uploaded);
    record(&history, "job-1", cat, 12, EventKind::ResultSeen);
    record(
        &history,
        "job-1",
        cat,
        13,
        EventKind::Deleted {
            outcome: SUCCEEDED.into(),
        },
    );
    let dog = "images/dog.jpg";
    record(
        &history,
        "job-2",
        dog,
        20,
        EventKind::Received { receive_count: 1 },
    );
    record(
        &history,
        "job-2",
        dog,
        21,
        EventKind::Returned {
            reason: "shutdown".into(),
        },
    );
    let png = "other/cat.png";
    record(
        &history,
        "job-3",
        png,
        30,
        EventKind::Received { receive_count: 1 },
    );
    record(&history, "job-3", png, 31, EventKind::WaitingForGpus);
    record(
        &history,
        "job-3",
        png,
        32,
        EventKind::Granted {
            scheduler_job: "19".into(),
            devices: vec!["gpu2:0".into(), "gpu2:1".into()],
        },
    );
    assert!(history.flush(Duration::from_secs(10)), "history flushed");
    assert_eq!(history.write_failures(), 0);
    history
}

fn ids(list: &Value) -> Vec<&str> {
    list.as_array()
        .expect("a JSON array")
        .iter()
        .map(|job| job["job_id"].as_str().expect("job_id"))
        .collect()
}

#[test]
fn jobs_json_lists_and_filters_while_the_writer_is_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _writer = write_history(dir.path());
    let state_dir = dir.path().to_str().expect("utf-8 path");

    let all = json(&["jobs", "--state-dir", state_dir, "--json"]);
    assert_eq!(ids(&all), ["job-3", "job-2", "job-1"]);
    let job1 = &all[2];
    assert_eq!(job1["bucket"], "in");
    assert_eq!(job1["key"], "images/cat.jpg");
    assert_eq!(job1["state"], "done");
    assert_eq!(job1["attempts"], 2);
    assert_eq!(job1["first_seen"], "2026-05-28T20:26:40.000Z");
    assert_eq!(job1["last_update"], "2026-05-28T20:26:53.000Z");
    assert_eq!(
        job1["last_reason"],
        "result deadline: no result after 3600 s"
    );
    assert_eq!(all[0]["state"], "running");
    assert_eq!(all[1]["state"], "returned");

    let filtered = |extra: &[&str]| {
        let mut args = vec!["jobs", "--json", "--state-dir", state_dir];
        args.extend_from_slice(extra);
        json(&args)
    };
    assert_eq!(ids(&filtered(&["--state", "returned"])), ["job-2"]);
    assert_eq!(ids(&filtered(&["--key", "cat"])), ["job-3", "job-1"]);
    assert_eq!(
        ids(&filtered(&["--since", "2026-05-28T20:27:00Z"])),
        ["job-3", "job-2"]
    );
    // The fixed times are in the past: no job was updated in the last hour.
    assert_eq!(ids(&filtered(&["--since", "1h"])), Vec::<&str>::new());
    assert_eq!(ids(&filtered(&["--limit", "1"])), ["job-3"]);

    // ORCHGPU_STATE_DIR finds it as --state-dir does.
    let output = Command::new(env!("CARGO_BIN_EXE_orchgpu"))
        .args(["jobs", "--json"])
        .env("ORCHGPU_STATE_DIR", state_dir)
        .output()
        .expect("run orchgpu");
    assert!(output.status.success(), "{}", describe(&["jobs"], &output));
    let from_env: Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(ids(&from_env), ["job-3", "job-2", "job-1"]);
}

#[test]
fn jobs_show_by_id_and_by_key_gives_both_attempts_with_their_reasons() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(write_history(dir.path()));
    let state_dir = dir.path().to_str().expect("utf-8 path");

    let detail = json(&["jobs", "show", "job-1", "--state-dir", state_dir, "--json"]);
    assert_eq!(detail["job_id"], "job-1");
    assert_eq!(detail["state"], "done");
    let outcomes = detail["attempt_outcomes"].as_array().expect("outcomes");
    assert_eq!(outcomes.len(), 2, "{detail:#}");
    assert_eq!(outcomes[0]["attempt"], 1);
    assert_eq!(outcomes[0]["state"], "returned");
    assert_eq!(
        outcomes[0]["reason"],
        "result deadline: no result after 3600 s"
    );
    assert_eq!(outcomes[1]["attempt"], 2);
    assert_eq!(outcomes[1]["state"], "done");
    assert_eq!(outcomes[1]["reason"], Value::Null);
    let timeline = detail["timeline"].as_array().expect("timeline");
    let kinds: Vec<_> = timeline
        .iter()
        .map(|e| {
            (
                e["attempt"].as_u64().expect("attempt"),
                e["kind"].as_str().expect("kind"),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            (1, "received"),
            (1, "granted"),
            (1, "released"),
            (1, "returned"),
            (2, "received"),
            (2, "uploaded"),
            (2, "result_seen"),
            (2, "deleted"),
        ]
    );
    assert_eq!(timeline[1]["detail"]["scheduler_job"], "17");
    assert_eq!(timeline[4]["detail"]["receive_count"], 2);
    assert_eq!(timeline[0]["at"], "2026-05-28T20:26:40.000Z");

    // By key: the same job.
    let by_key = json(&[
        "jobs",
        "show",
        "images/cat.jpg",
        "--json",
        "--state-dir",
        state_dir,
    ]);
    assert_eq!(by_key["job_id"], "job-1");

    // The readable form: one header line per attempt with its outcome, one line per event.
    let text = ok(&["jobs", "show", "job-1", "--state-dir", state_dir]);
    assert!(text.contains("STATE       done\n"), "{text}");
    assert!(
        text.contains(
            "Attempt 1 (message msg-job-1): returned: result deadline: no result after 3600 s\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("Attempt 2 (message msg-job-1): done\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "  2026-05-28 20:26:41.000  granted           devices=gpu1:0 scheduler_job=17\n"
        ),
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.starts_with("  2026-")).count(),
        8,
        "{text}"
    );
}

#[test]
fn jobs_table_has_its_header_and_one_line_per_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(write_history(dir.path()));
    let state_dir = dir.path().to_str().expect("utf-8 path");
    let text = ok(&["jobs", "--state-dir", state_dir]);
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    let header: Vec<_> = lines[0]
        .split("  ")
        .filter(|c| !c.is_empty())
        .map(str::trim)
        .collect();
    assert_eq!(
        header,
        [
            "UPDATED (UTC)",
            "STATE",
            "ATTEMPTS",
            "GPU S",
            "JOB ID",
            "KEY",
            "LAST REASON"
        ],
        "{text}"
    );
    assert!(
        lines[1].starts_with("2026-05-28 20:27:12  running"),
        "{text}"
    );
    assert!(
        lines[2].contains("job-2") && lines[2].ends_with("shutdown"),
        "{text}"
    );
    assert!(lines[3].contains("images/cat.jpg"), "{text}");
}

#[test]
fn missing_history_is_one_line_and_exit_1_and_bad_usage_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().to_str().expect("utf-8 path");
    for args in [
        &["jobs", "--state-dir", state_dir][..],
        &["jobs", "show", "job-1", "--state-dir", state_dir],
    ] {
        let output = orchgpu(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{}", describe(args, &output));
        assert_eq!(stderr.lines().count(), 1, "{}", describe(args, &output));
        assert!(
            stderr.contains(&format!("{state_dir}/history.sqlite3")),
            "{}",
            describe(args, &output)
        );
        assert!(output.stdout.is_empty(), "{}", describe(args, &output));
    }
    // Reading never creates the file.
    assert!(!dir.path().join("history.sqlite3").exists());

    drop(write_history(dir.path()));
    let args = ["jobs", "show", "no-such-job", "--state-dir", state_dir];
    let output = orchgpu(&args);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}",
        describe(&args, &output)
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("no-such-job"));

    for args in [
        &["jobs", "--state", "nope", "--state-dir", state_dir][..],
        &["jobs", "--since", "yesterday", "--state-dir", state_dir],
        &["jobs", "--bogus"],
        &["jobs", "show"],
    ] {
        let output = orchgpu(args);
        assert_eq!(output.status.code(), Some(2), "{}", describe(args, &output));
    }
}

#[test]
fn the_daemon_command_line_is_unchanged() {
    // `-q x` alone is the daemon's command line, missing its other required flags.
    let args = ["-q", "x"];
    let output = orchgpu(&args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(2),
        "{}",
        describe(&args, &output)
    );
    assert!(
        stderr.contains("--scheduler-host"),
        "{}",
        describe(&args, &output)
    );

    let help = ok(&["--help"]);
    assert!(help.contains("--queue <NAME|URL>"), "{help}");
    assert!(help.contains("--history-max-age <DAYS>"), "{help}");
    assert!(!help.contains("--since"), "{help}");
    let jobs_help = ok(&["jobs", "--help"]);
    assert!(jobs_help.contains("Usage: orchgpu jobs"), "{jobs_help}");
    assert!(jobs_help.contains("--since <AGE|TIME>"), "{jobs_help}");
    assert!(!jobs_help.contains("--queue"), "{jobs_help}");
}
