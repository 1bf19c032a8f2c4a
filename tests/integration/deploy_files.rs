//! The deployment files stay true to the binary: the systemd unit passes
//! `systemd-analyze verify`, its stop timeout covers the shutdown grace period, and the
//! example environment file lists every `ORCHGPU_*` variable that `orchgpu --help` does.

use std::collections::BTreeSet;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::harness::repo_path;

const UNIT: &str = "deploy/systemd/orchgpu.service";
const ENV_EXAMPLE: &str = "deploy/systemd/orchgpu.env.example";

fn help() -> Result<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_orchgpu"))
        .arg("--help")
        .output()?;
    if !output.status.success() {
        bail!("orchgpu --help failed: {}", output.status);
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// Every `[env: NAME=...]` in the help text.
fn help_env_vars(help: &str) -> BTreeSet<String> {
    help.match_indices("[env: ")
        .map(|(at, tag)| {
            help[at + tag.len()..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect()
}

/// The default the help text gives for `--option`, in seconds.
fn help_default_secs(help: &str, option: &str) -> Result<u64> {
    let start = help
        .find(&format!("--{option} "))
        .with_context(|| format!("--{option} is not in --help"))?;
    let rest = &help[start..];
    let at = rest
        .find("[default: ")
        .with_context(|| format!("--{option} has no default"))?;
    let value: String = rest[at + "[default: ".len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Ok(value.parse()?)
}

/// `NAME=` or `#NAME=` at the start of a line.
fn example_vars(example: &str) -> BTreeSet<String> {
    example
        .lines()
        .filter_map(|line| {
            let line = line.trim_start_matches('#');
            let (name, _) = line.split_once('=')?;
            (!name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
                .then(|| name.to_string())
        })
        .collect()
}

#[test]
fn env_example_lists_every_option_of_help() -> Result<()> {
    let help = help()?;
    let from_help = help_env_vars(&help);
    assert!(
        from_help.len() >= 20,
        "too few env vars in --help: {from_help:?}"
    );
    let example = std::fs::read_to_string(repo_path(ENV_EXAMPLE))?;
    let in_example = example_vars(&example);
    let missing: Vec<_> = from_help.difference(&in_example).collect();
    assert!(
        missing.is_empty(),
        "{ENV_EXAMPLE} lacks {missing:?}: add each with its default and a comment"
    );
    // And nothing made up: every ORCHGPU_* there is an option, or the log filter.
    let unknown: Vec<_> = in_example
        .iter()
        .filter(|name| name.starts_with("ORCHGPU_"))
        .filter(|name| !from_help.contains(*name) && name.as_str() != "ORCHGPU_LOG")
        .collect();
    assert!(
        unknown.is_empty(),
        "{ENV_EXAMPLE} names {unknown:?}, which --help does not list"
    );
    Ok(())
}

#[test]
fn unit_stop_timeout_covers_the_shutdown_grace() -> Result<()> {
    let help = help()?;
    let grace = help_default_secs(&help, "shutdown-grace")?;
    let ssgm_timeout = help_default_secs(&help, "ssgm-timeout")?;
    let unit = std::fs::read_to_string(repo_path(UNIT))?;
    let setting = |key: &str| {
        unit.lines()
            .find_map(|line| line.strip_prefix(&format!("{key}=")))
            .map(str::trim)
            .with_context(|| format!("{UNIT} has no {key}="))
    };
    let stop: u64 = setting("TimeoutStopSec")?.parse()?;
    assert!(
        stop > grace + ssgm_timeout,
        "TimeoutStopSec={stop} must exceed the grace ({grace}) + one SSGM timeout ({ssgm_timeout})"
    );
    assert_eq!(setting("Type")?, "notify");
    assert_eq!(setting("KillMode")?, "mixed");
    assert_eq!(setting("StateDirectory")?, "orchgpu");
    assert_eq!(setting("ExecStart")?, "/usr/bin/orchgpu");
    assert_eq!(setting("EnvironmentFile")?, "/etc/orchgpu/orchgpu.env");
    Ok(())
}

fn systemd_analyze(args: &[&str]) -> Result<std::process::Output> {
    Command::new("systemd-analyze").args(args).output().context(
        "cannot run systemd-analyze: install it with `apt-get install -y systemd` \
         (CI does; .ci/run installs it)",
    )
}

#[test]
fn unit_passes_systemd_analyze_verify_and_security() -> Result<()> {
    // verify checks that ExecStart is executable, so point a copy at the binary just built.
    let unit = std::fs::read_to_string(repo_path(UNIT))?;
    let unit = unit.replace(
        "ExecStart=/usr/bin/orchgpu",
        &format!("ExecStart={}", env!("CARGO_BIN_EXE_orchgpu")),
    );
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("orchgpu.service");
    std::fs::write(&path, unit)?;
    let path = path.to_str().context("temp path is not UTF-8")?;

    let verify = systemd_analyze(&["verify", path])?;
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "verify failed: {stderr}");
    // verify only warns (exit 0) on unknown keys or bad values: any output is a finding.
    assert!(stderr.trim().is_empty(), "verify found: {stderr}");

    // The exposure score is 0 (locked down) .. 10 (unprotected); the threshold is in tenths.
    let security = systemd_analyze(&["security", "--offline=true", "--threshold=20", path])?;
    let report = String::from_utf8_lossy(&security.stdout);
    assert!(
        security.status.success(),
        "exposure above 2.0:\n{report}{}",
        String::from_utf8_lossy(&security.stderr)
    );
    Ok(())
}
