//! `orchgpu jobs`: its command line, a parser of its own, so the daemon's flat
//! orchGPU-style flags stay as they are. `main` sends `orchgpu jobs ...` here
//! (`jobs_argv`), everything else to `Args`.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::{Parser, Subcommand};

use super::{ConfigError, resolve_state_dir};
use crate::history::{JobState, ListFilter};

/// The first argument that selects `orchgpu jobs`; the daemon takes no positional
/// argument, so it cannot mean anything else.
pub const JOBS_COMMAND: &str = "jobs";

/// The arguments of `orchgpu jobs` (from `jobs` on) when `argv` asks for it.
pub fn jobs_argv(
    argv: impl IntoIterator<Item = std::ffi::OsString>,
) -> Option<Vec<std::ffi::OsString>> {
    let mut argv = argv.into_iter();
    let _program = argv.next()?;
    let first = argv.next()?;
    (first == JOBS_COMMAND).then(|| std::iter::once(first).chain(argv).collect())
}

/// Raw values of `orchgpu jobs`; see `JobsConfig` for their validated form.
#[derive(Debug, Parser)]
#[command(
    name = "jobs",
    bin_name = "orchgpu jobs",
    version,
    args_conflicts_with_subcommands = true,
    about = "Lists recent jobs from the job history (read-only; works while the daemon runs).",
    long_about = "Lists recent jobs from the job history, most recently updated first \
(read-only; works while the daemon runs). `orchgpu jobs show ID|KEY` prints one job's \
timeline. Times are UTC. The history is found as the daemon finds it: --state-dir, \
ORCHGPU_STATE_DIR, $STATE_DIRECTORY, $XDG_STATE_HOME/orchgpu, ~/.local/state/orchgpu."
)]
pub struct JobsArgs {
    #[command(subcommand)]
    pub command: Option<JobsSubcommand>,

    /// Only jobs in this state: received, waiting_for_gpus, running, done, failed,
    /// returned or dropped.
    #[arg(long = "state", value_name = "STATE")]
    pub state: Option<String>,

    /// Only jobs whose object key contains this text.
    #[arg(long = "key", value_name = "SUBSTR")]
    pub key: Option<String>,

    /// Only jobs updated since then: an age such as 30m, 2h or 7d, or an RFC 3339 time.
    #[arg(long = "since", value_name = "AGE|TIME")]
    pub since: Option<String>,

    /// At most this many jobs (0 for all).
    #[arg(long = "limit", default_value = "50", value_name = "N")]
    pub limit: String,

    /// The daemon's state directory, where `history.sqlite3` is.
    #[arg(
        long = "state-dir",
        env = "ORCHGPU_STATE_DIR",
        value_name = "DIR",
        global = true
    )]
    pub state_dir: Option<PathBuf>,

    /// Print JSON instead of a table.
    #[arg(long = "json", global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum JobsSubcommand {
    /// One job's timeline: by job id, else the most recent job whose key is KEY.
    Show {
        #[arg(value_name = "ID|KEY")]
        id_or_key: String,
    },
}

/// The validated `orchgpu jobs` command line.
#[derive(Debug, Clone)]
pub struct JobsConfig {
    pub state_dir: PathBuf,
    pub json: bool,
    pub command: JobsCommand,
}

#[derive(Debug, Clone)]
pub enum JobsCommand {
    List(ListFilter),
    Show(String),
}

/// Parses `orchgpu jobs ...` (from `jobs` on). clap prints its own usage errors and
/// `--help` and exits (2 and 0); a value that parses but cannot be used is an `Err`.
///
/// # Errors
///
/// A bad `--state`, `--since`, `--limit` or state directory.
pub fn parse_jobs(argv: Vec<std::ffi::OsString>) -> Result<JobsConfig, ConfigError> {
    JobsConfig::from_args(JobsArgs::parse_from(argv), SystemTime::now(), |name| {
        std::env::var_os(name)
    })
}

impl JobsConfig {
    fn from_args(
        args: JobsArgs,
        now: SystemTime,
        env: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<JobsConfig, ConfigError> {
        let command = match args.command {
            Some(JobsSubcommand::Show { id_or_key }) => JobsCommand::Show(id_or_key),
            None => JobsCommand::List(ListFilter {
                state: args.state.as_deref().map(parse_state).transpose()?,
                key_contains: args.key,
                since: args
                    .since
                    .as_deref()
                    .map(|raw| parse_since(raw, now))
                    .transpose()?,
                limit: args.limit.trim().parse().map_err(|_| {
                    ConfigError::new("--limit", &args.limit, "expected a whole number")
                })?,
            }),
        };
        Ok(JobsConfig {
            state_dir: resolve_state_dir(args.state_dir, env)?,
            json: args.json,
            command,
        })
    }
}

fn parse_state(raw: &str) -> Result<JobState, ConfigError> {
    JobState::parse(raw.trim()).ok_or_else(|| {
        let names: Vec<_> = JobState::ALL.iter().map(|s| s.as_str()).collect();
        ConfigError::new(
            "--state",
            raw,
            format!("expected one of {}", names.join(", ")),
        )
    })
}

/// `30m`, `2h`, `7d` (also `s`, `w`) before `now`, or an RFC 3339 time.
fn parse_since(raw: &str, now: SystemTime) -> Result<SystemTime, ConfigError> {
    let error = || {
        ConfigError::new(
            "--since",
            raw,
            "expected an age such as 30m, 2h or 7d, or an RFC 3339 time such as 2026-05-01T12:00:00Z",
        )
    };
    let text = raw.trim();
    let unit = match text.chars().last() {
        Some('s') => Some(1),
        Some('m') => Some(60),
        Some('h') => Some(3600),
        Some('d') => Some(86_400),
        Some('w') => Some(7 * 86_400),
        _ => None,
    };
    if let Some(unit) = unit
        && let Ok(count) = text[..text.len() - 1].parse::<u64>()
    {
        return count
            .checked_mul(unit)
            .and_then(|secs| now.checked_sub(Duration::from_secs(secs)))
            .ok_or_else(error);
    }
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(SystemTime::from)
        .map_err(|_| error())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jobs(argv: &[&str]) -> Result<JobsConfig, ConfigError> {
        let args = JobsArgs::try_parse_from(argv).expect("jobs args parse");
        let env = |name: &str| (name == "HOME").then(|| std::ffi::OsString::from("/home/u"));
        JobsConfig::from_args(args, UNIX_EPOCH + Duration::from_secs(1_000_000), env)
    }

    use std::time::UNIX_EPOCH;

    #[test]
    fn jobs_is_its_own_command_line() {
        let os = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert_eq!(
            jobs_argv(os(&["orchgpu", "jobs", "show", "x"])),
            Some(os(&["jobs", "show", "x"]))
        );
        assert_eq!(jobs_argv(os(&["orchgpu", "-q", "jobs"])), None);
        assert_eq!(jobs_argv(os(&["orchgpu"])), None);

        let c = jobs(&["jobs"]).expect("valid");
        assert_eq!(c.state_dir, PathBuf::from("/home/u/.local/state/orchgpu"));
        assert!(!c.json);
        let JobsCommand::List(filter) = c.command else {
            panic!("expected a list")
        };
        assert_eq!(filter.limit, 50);
        assert_eq!(filter.state, None);

        let c = jobs(&[
            "jobs",
            "--state",
            "done",
            "--key",
            "cat",
            "--since",
            "2h",
            "--limit",
            "5",
            "--state-dir",
            "/s",
            "--json",
        ])
        .expect("valid");
        assert_eq!(c.state_dir, PathBuf::from("/s"));
        assert!(c.json);
        let JobsCommand::List(filter) = c.command else {
            panic!("expected a list")
        };
        assert_eq!(filter.state, Some(JobState::Done));
        assert_eq!(filter.key_contains.as_deref(), Some("cat"));
        assert_eq!(
            filter.since,
            Some(UNIX_EPOCH + Duration::from_secs(1_000_000 - 7200))
        );
        assert_eq!(filter.limit, 5);

        // Global flags go after `show` too.
        let c = jobs(&[
            "jobs",
            "show",
            "images/a.jpg",
            "--json",
            "--state-dir",
            "/s",
        ])
        .expect("valid");
        assert!(c.json);
        assert!(matches!(c.command, JobsCommand::Show(ref k) if k == "images/a.jpg"));

        // Filters belong to the list, not to `show`; `show` needs its argument.
        for bad in [
            &["jobs", "--state", "done", "show", "x"][..],
            &["jobs", "show"],
        ] {
            let err = JobsArgs::try_parse_from(bad).expect_err("refused");
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
        assert!(
            jobs(&["jobs", "--state", "nope"])
                .expect_err("bad")
                .to_string()
                .contains("--state")
        );
        assert!(
            jobs(&["jobs", "--limit", "x"])
                .expect_err("bad")
                .to_string()
                .contains("--limit")
        );
        assert!(jobs(&["jobs", "--state-dir", "rel"]).is_err());
    }

    #[test]
    fn since_takes_an_age_or_an_rfc3339_time() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000_000);
        let ago = |secs| Ok(now - Duration::from_secs(secs));
        let since = |raw| parse_since(raw, now).map_err(|e| e.to_string());
        assert_eq!(since("30m"), ago(1800));
        assert_eq!(since("2h"), ago(7200));
        assert_eq!(since("7d"), ago(7 * 86_400));
        assert_eq!(since("1w"), ago(7 * 86_400));
        assert_eq!(since("45s"), ago(45));
        assert_eq!(
            since("2026-05-01T12:00:00Z"),
            Ok(UNIX_EPOCH + Duration::from_secs(1_777_636_800))
        );
        assert_eq!(
            since("2026-05-01T14:00:00+02:00"),
            Ok(UNIX_EPOCH + Duration::from_secs(1_777_636_800))
        );
        for bad in [
            "",
            "h",
            "2x",
            "-2h",
            "yesterday",
            "2026-05-01",
            "99999999999999999d",
        ] {
            assert!(since(bad).expect_err(bad).contains("--since"), "{bad}");
        }
    }
}
