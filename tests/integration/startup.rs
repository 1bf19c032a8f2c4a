//! Start-up: bad flags stop the daemon with one clear line and exit code 2; an
//! unreachable queue is a fatal error (exit 1); --help and --version work. Against an
//! emulator with a bare environment, missing credentials are one error line naming what
//! to set, a missing region one warning, and the instance metadata service is never asked.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::harness;

fn orchgpu(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_orchgpu"))
        .args(args)
        .env_remove("ORCHGPU_ENDPOINT_URL")
        .output()
        .expect("run orchgpu")
}

const VALID: [&str; 12] = [
    "-q",
    "jobs",
    "-S",
    "127.0.0.1",
    "-P",
    "9",
    "-i",
    "work/dir",
    "-o",
    "out",
    "-m",
    "/bin/true",
];

fn with(extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = VALID.iter().map(|s| s.to_string()).collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn bad_values_exit_2_with_one_clear_line() {
    let cases: &[(&[&str], &str)] = &[
        (&["-i", "/dir"], "-i/--intermediate"),
        (&["-o", ""], "-o/--output"),
        (&["-w", "25"], "-w/--wait-time"),
        (&["-P", "0"], "-P/--scheduler-port"),
        (&["-m", "/etc/passwd"], "-m/--ssgm"),
        (&["-m", "no-such-ssgm-anywhere"], "-m/--ssgm"),
        (&["-g", "zero"], "-g/--gpus"),
    ];
    for (extra, flag) in cases {
        let args = with(extra);
        let output = orchgpu(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{extra:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{extra:?}: {stderr}");
        assert!(stderr.contains(flag), "{extra:?}: {stderr}");
    }
}

#[test]
fn missing_required_flag_exits_2() {
    let output = orchgpu(&["-q", "jobs"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--scheduler-host"));
}

/// The option names that open each option line of `--help`: `["-q", "--queue"]` for
/// `  -q, --queue <QUEUE>`, `["--region"]` for `      --region <REGION>`.
fn help_options(help: &str) -> Vec<Vec<&str>> {
    help.lines()
        .filter(|line| line.trim_start().starts_with('-'))
        .map(|line| {
            line.split_whitespace()
                .map(|token| token.trim_end_matches(','))
                .take_while(|token| token.starts_with('-'))
                .collect()
        })
        .collect()
}

#[test]
fn help_documents_every_option_and_version_works() {
    let help = orchgpu(&["--help"]);
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    let options = help_options(&text);
    // orchGPU's letters, each paired with its long name on one line; a letter that went
    // missing or moved to another option fails here.
    for (short, long) in [
        ("-q", "--queue"),
        ("-S", "--scheduler-host"),
        ("-P", "--scheduler-port"),
        ("-g", "--gpus"),
        ("-v", "--visibility-timeout"),
        ("-w", "--wait-time"),
        ("-s", "--alloc-retry-interval"),
        ("-u", "--empty-pause"),
        ("-b", "--result-poll-interval"),
        ("-m", "--ssgm"),
        ("-i", "--intermediate"),
        ("-o", "--output"),
    ] {
        assert!(
            options.contains(&vec![short, long]),
            "--help has no line for {short}, {long}: {options:?}"
        );
    }
    for long in [
        "--endpoint-url",
        "--region",
        "--max-jobs",
        "--alloc-deadline",
        "--result-deadline",
        "--ssgm-timeout",
        "--result-suffix",
        "--retry-backoff",
        "--shutdown-grace",
        "--state-dir",
        "--results-queue",
        "--stats-file",
        "--log-format",
    ] {
        assert!(
            options.contains(&vec![long]),
            "--help has no line for {long}: {options:?}"
        );
    }
    assert!(text.contains("[env: ORCHGPU_QUEUE="), "{text}");
    let version = orchgpu(&["--version"]);
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn unreachable_queue_is_fatal_with_exit_1() {
    // Nothing listens on port 9 of loopback: the queue cannot be resolved.
    let args = with(&["--endpoint-url", "http://127.0.0.1:9"]);
    let output = Command::new(env!("CARGO_BIN_EXE_orchgpu"))
        .args(&args)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .output()
        .expect("run orchgpu");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot reach the jobs queue"), "{stderr}");
}

/// A stand-in instance metadata service on loopback that only counts the connections it
/// gets (the SDK honours `AWS_EC2_METADATA_SERVICE_ENDPOINT`): orchgpu pointed at an
/// emulator must make none.
fn imds_trap() -> Result<(String, Arc<AtomicUsize>)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}", listener.local_addr()?);
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            counter.fetch_add(1, Ordering::SeqCst);
            // Dropped at once: a dead metadata service.
            drop(stream);
        }
    });
    Ok((url, connections))
}

/// orchgpu as a new user would start it: nothing in the environment but PATH, an empty
/// HOME (no ~/.aws) and `env`, pointed at the emulator.
fn bare_orchgpu(queue: &str, home: &std::path::Path, env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_orchgpu"));
    command
        .args([
            "-q",
            queue,
            "-S",
            "127.0.0.1",
            "-P",
            "9",
            "-i",
            "work/dir",
            "-o",
            "out",
        ])
        .args(["-m", "/bin/true", "--endpoint-url", &harness::endpoint()])
        // A short long-poll, so that SIGTERM ends the receive in flight soon; no claims:
        // the output bucket does not exist, and these tests are about credentials.
        .args(["-w", "1", "--claims", "off"])
        .arg("--state-dir")
        .arg(home.join("state"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home);
    for (name, value) in env {
        command.env(name, value);
    }
    command
}

fn assert_no_imds(stderr: &str, connections: &AtomicUsize) {
    for text in ["imds", "IMDS", "169.254"] {
        assert!(!stderr.contains(text), "{text:?} in stderr:\n{stderr}");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "orchgpu asked the instance metadata service:\n{stderr}"
    );
}

#[test]
fn no_credentials_is_one_error_line_and_no_instance_metadata() -> Result<()> {
    let home = tempfile::tempdir()?;
    let (imds, connections) = imds_trap()?;
    let output = bare_orchgpu(
        "orchgpu-no-credentials",
        home.path(),
        &[("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds)],
    )
    .output()
    .context("run orchgpu")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.to_lowercase().contains("error"))
        .collect();
    assert_eq!(errors.len(), 1, "not one error line:\n{stderr}");
    for text in [
        "no AWS credentials",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_PROFILE",
        "emulator",
    ] {
        assert!(errors[0].contains(text), "no {text:?} in {:?}", errors[0]);
    }
    assert_no_imds(&stderr, &connections);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_without_region_use_us_east_1_with_one_warning() -> Result<()> {
    // The queue exists in us-east-1 only, so reaching it proves the fallback region.
    let (_, sqs) = harness::clients().await;
    let queue = format!("orchgpu-fallback-{}", std::process::id());
    let queue_url = harness::create_queue(&sqs, &queue, None).await?;
    let home = tempfile::tempdir()?;
    let (imds, connections) = imds_trap()?;
    let log = home.path().join("stderr.log");
    let mut child = bare_orchgpu(
        &queue,
        home.path(),
        &[
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds),
        ],
    )
    .stderr(std::fs::File::create(&log)?)
    .spawn()
    .context("start orchgpu")?;
    // Started once the queue is reached and the journal read.
    let deadline = Instant::now() + Duration::from_secs(30);
    let started = loop {
        let stderr = std::fs::read_to_string(&log)?;
        if stderr.contains("Journal read") {
            break Ok(());
        }
        if let Some(status) = child.try_wait()? {
            break Err(anyhow::anyhow!("orchgpu exited ({status}):\n{stderr}"));
        }
        if Instant::now() >= deadline {
            break Err(anyhow::anyhow!("orchgpu did not start in 30 s:\n{stderr}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if let Err(e) = started {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            bail!("orchgpu did not stop within 60 s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let stderr = std::fs::read_to_string(&log)?;
    assert_eq!(status.code(), Some(0), "{stderr}");
    let region_lines: Vec<&str> = stderr
        .lines()
        .filter(|line| line.to_lowercase().contains("region"))
        .collect();
    assert_eq!(region_lines.len(), 1, "not one region line:\n{stderr}");
    assert!(
        region_lines[0].contains("WARN") && region_lines[0].contains("us-east-1"),
        "{:?}",
        region_lines[0]
    );
    assert!(
        !stderr.lines().any(|line| line.contains("ERROR")),
        "{stderr}"
    );
    assert_no_imds(&stderr, &connections);
    let _ = sqs.delete_queue().queue_url(queue_url).send().await;
    Ok(())
}
