//! The deployment files stay true to the binary: the systemd unit passes
//! `systemd-analyze verify`, its start and stop timeouts cover the worst cases the flags
//! of the env example allow (`Config::start_budget`, `stop_budget`), and the
//! example environment file lists every `ORCHGPU_*` variable that `orchgpu --help` does.

use std::collections::BTreeSet;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::harness::repo_path;

const UNIT: &str = "deploy/systemd/orchgpu.service";
/// The template unit: one instance per use case (`orchgpu@ocr`), the plain unit otherwise.
const TEMPLATE: &str = "deploy/systemd/orchgpu@.service";
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

/// The configuration the env example gives, as the daemon would build it; the required
/// settings the example leaves empty get placeholders.
fn example_config() -> Result<orchgpu::cli::Config> {
    let example = std::fs::read_to_string(repo_path(ENV_EXAMPLE))?;
    let mut args = vec!["orchgpu".to_owned()];
    let mut set = BTreeSet::new();
    for line in example.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        let Some(option) = name.strip_prefix("ORCHGPU_") else {
            continue;
        };
        let value = value.trim().trim_matches('"');
        if value.is_empty() {
            continue;
        }
        let flag = format!("--{}", option.to_ascii_lowercase().replace('_', "-"));
        set.insert(flag.clone());
        args.extend([flag, value.to_owned()]);
    }
    for (flag, placeholder) in [
        ("--queue", "jobs"),
        ("--scheduler-host", "scheduler"),
        ("--scheduler-port", "7000"),
        ("--intermediate", "intermediate"),
        ("--output", "output"),
        ("--ssgm", "/bin/true"),
        ("--state-dir", "/tmp"),
    ] {
        if !set.contains(flag) {
            args.extend([flag.to_owned(), placeholder.to_owned()]);
        }
    }
    let parsed = <orchgpu::cli::Args as clap::Parser>::try_parse_from(&args)?;
    Ok(orchgpu::cli::Config::try_from(parsed)?)
}

#[test]
fn unit_timeouts_cover_the_worst_case_start_and_stop() -> Result<()> {
    let config = example_config()?;
    let unit = std::fs::read_to_string(repo_path(UNIT))?;
    let setting = |key: &str| {
        unit.lines()
            .find_map(|line| line.strip_prefix(&format!("{key}=")))
            .map(str::trim)
            .with_context(|| format!("{UNIT} has no {key}="))
    };
    let stop: u64 = setting("TimeoutStopSec")?.parse()?;
    let stop_budget = config.stop_budget().as_secs();
    assert!(
        stop >= stop_budget,
        "TimeoutStopSec={stop} is shorter than the worst-case stop ({stop_budget} s) with the env example's values"
    );
    let start: u64 = setting("TimeoutStartSec")?.parse()?;
    let start_budget = config.start_budget().as_secs();
    assert!(
        start >= start_budget,
        "TimeoutStartSec={start} is shorter than the worst-case start ({start_budget} s)"
    );
    // The budget grows with the flags it depends on (a sanity check of the sum).
    assert!(stop_budget > config.shutdown_grace.as_secs() + 2 * config.ssgm_timeout.as_secs());
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
    verify_unit(UNIT, "orchgpu.service")
}

/// The template, as an instance (`verify` refuses a bare template name).
#[test]
fn template_unit_passes_systemd_analyze_verify_and_security() -> Result<()> {
    verify_unit(TEMPLATE, "orchgpu@ocr.service")
}

/// The template differs from the plain unit only in what makes instances apart: its
/// environment file, state and cache directories, log identifier, description and head
/// comment. Everything else (timeouts, hardening) must be the same, so the plain unit's
/// timeout test covers both.
#[test]
fn template_unit_matches_the_plain_unit_but_for_the_instance() -> Result<()> {
    let settings = |path: &str| -> Result<Vec<String>> {
        Ok(std::fs::read_to_string(repo_path(path))?
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(str::to_owned)
            .collect())
    };
    let plain = settings(UNIT)?;
    let template = settings(TEMPLATE)?;
    let per_instance = [
        ("Description=", "orchgpu %i: "),
        ("EnvironmentFile=", "/etc/orchgpu/%i.env"),
        ("StateDirectory=", "orchgpu/%i"),
        ("CacheDirectory=", "orchgpu/%i"),
        ("SyslogIdentifier=", "orchgpu-%i"),
    ];
    for (key, want) in per_instance {
        let line = template
            .iter()
            .find(|l| l.starts_with(key))
            .with_context(|| format!("{TEMPLATE} has no {key}"))?;
        assert!(line.contains(want), "{TEMPLATE}: {line} (wanted {want})");
    }
    let shared = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .filter(|l| !per_instance.iter().any(|(key, _)| l.starts_with(key)))
            .cloned()
            .collect()
    };
    assert_eq!(
        shared(&plain),
        shared(&template),
        "{UNIT} and {TEMPLATE} drifted apart"
    );
    Ok(())
}

/// `systemd-analyze verify` and `security` on a copy of `unit` named `name`, its
/// ExecStart pointed at the binary just built (verify checks that it is executable).
fn verify_unit(unit: &str, name: &str) -> Result<()> {
    let text = std::fs::read_to_string(repo_path(unit))?;
    let text = text.replace(
        "ExecStart=/usr/bin/orchgpu",
        &format!("ExecStart={}", env!("CARGO_BIN_EXE_orchgpu")),
    );
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(name);
    std::fs::write(&path, text)?;
    let path = path.to_str().context("temp path is not UTF-8")?;

    let verify = systemd_analyze(&["verify", path])?;
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "{unit}: verify failed: {stderr}");
    // verify only warns (exit 0) on unknown keys or bad values: any output is a finding.
    assert!(stderr.trim().is_empty(), "{unit}: verify found: {stderr}");

    // The exposure score is 0 (locked down) .. 10 (unprotected); the threshold is in tenths.
    let security = systemd_analyze(&["security", "--offline=true", "--threshold=20", path])?;
    let report = String::from_utf8_lossy(&security.stdout);
    assert!(
        security.status.success(),
        "{unit}: exposure above 2.0:\n{report}{}",
        String::from_utf8_lossy(&security.stderr)
    );
    Ok(())
}

const LAMBDA_TEMPLATE: &str = "deploy/lambda/template.yaml";

/// The Lambda template's function environment is made of the daemon's own variables: each
/// `ORCHGPU_*:` key it sets is one `orchgpu --help` knows (a renamed flag cannot leave the
/// template setting a variable nothing reads), and it sets the five required ones.
#[test]
fn lambda_template_sets_only_variables_of_help() -> Result<()> {
    let from_help = help_env_vars(&help()?);
    let template = std::fs::read_to_string(repo_path(LAMBDA_TEMPLATE))?;
    let set: BTreeSet<String> = template
        .lines()
        .filter_map(|line| line.trim_start().split_once(':'))
        .map(|(key, _)| key.to_string())
        .filter(|key| key.starts_with("ORCHGPU_"))
        .collect();
    let unknown: Vec<_> = set.difference(&from_help).collect();
    assert!(
        unknown.is_empty(),
        "{LAMBDA_TEMPLATE} sets variables orchgpu does not know: {unknown:?}"
    );
    for required in [
        "ORCHGPU_QUEUE",
        "ORCHGPU_SCHEDULER_HOST",
        "ORCHGPU_SCHEDULER_PORT",
        "ORCHGPU_INTERMEDIATE",
        "ORCHGPU_OUTPUT",
    ] {
        assert!(
            set.contains(required),
            "{LAMBDA_TEMPLATE} does not set {required}"
        );
    }
    // The lost-grant alarm keys on the phrase the function logs (the lambda tests check
    // the function logs it).
    let filter = format!("FilterPattern: '\"{}\"'", crate::lambda::LOST_GRANT);
    assert!(
        template.contains(&filter),
        "{LAMBDA_TEMPLATE}'s lost-grant metric filter is not {filter}"
    );
    let filter = format!("FilterPattern: '\"{}\"'", crate::lambda::RELEASE_GIVEN_UP);
    assert!(
        template.contains(&filter),
        "{LAMBDA_TEMPLATE}'s release-given-up metric filter is not {filter}"
    );
    Ok(())
}
