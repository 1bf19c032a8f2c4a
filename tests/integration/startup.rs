//! Start-up: bad flags stop the daemon with one clear line and exit code 2; an
//! unreachable queue is a fatal error (exit 1); --help and --version work.

use std::process::Command;

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
