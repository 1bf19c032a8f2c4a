//! The function's configuration: the daemon's own `ORCHGPU_*` environment variables,
//! parsed by the daemon's `cli` into the same validated `Config`, then checked for what
//! means something in Lambda mode.
//!
//! One env file describes a deployment in either mode. What the function does with each
//! flag (docs/serverless.md lists them too):
//! - used as in the daemon: the queue (`-q`), scheduler host and port, GPUs, the SSGM
//!   path and its timeout, intermediate and output locations, the result suffix and
//!   deadline, the claims location and lease, endpoint and region, the results queue,
//!   the log format, state and work dirs (both default to `/tmp`: the only writable place
//!   of a Lambda sandbox);
//! - refused, because they need a process that lives between invocations: `--http-listen`
//!   (and the web page's `--upload-to`, `--http-token-file`), `--stats-file`, and
//!   `--claims off` (the claim is the job's only record once the jobs handler returns);
//! - ignored, because the event source mapping and the queue decide them: `-v`, `-w`,
//!   `-u`, `--max-jobs`, `--retry-backoff`, `--shutdown-grace`, the history flags (there
//!   is no history in Lambda), `-b` (the schedule looks for results) and
//!   `--alloc-deadline` (one `-alloc` per record: a busy scheduler is a batch item
//!   failure, retried by SQS).
//!
//! Hostile input: the environment is the operator's; every value goes through the
//! daemon's validation, and a bad one stops the function at init with the daemon's
//! message (Lambda reports an init error and retries the invocation later).

use std::path::PathBuf;

use clap::Parser;

use crate::cli::{Args, Config, ConfigError, QueueRef};

/// Where state (the reservation journal) goes when `ORCHGPU_STATE_DIR` is not set.
const DEFAULT_STATE_DIR: &str = "/tmp/orchgpu/state";
/// Where inputs and bundles go when `ORCHGPU_WORK_DIR` is not set.
const DEFAULT_WORK_DIR: &str = "/tmp/orchgpu/work";

/// The function's validated configuration.
#[derive(Debug, Clone)]
pub struct LambdaConfig {
    pub(crate) config: Config,
    /// The jobs queue's name, to tell its records by their `eventSourceARN`.
    pub(crate) jobs_queue_name: String,
    /// The results queue's name, when one is configured.
    pub(crate) results_queue_name: Option<String>,
}

/// Why the function cannot start with this environment.
#[derive(Debug, thiserror::Error)]
pub enum LambdaConfigError {
    /// The variables do not parse (clap's own message).
    #[error("{0}")]
    Parse(String),
    /// A value the daemon refuses too.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A setting that means nothing in Lambda mode.
    #[error("{setting} cannot be used by orchgpu-lambda: {reason}")]
    NotInLambda {
        /// The flag and its variable.
        setting: &'static str,
        /// Why.
        reason: &'static str,
    },
}

impl LambdaConfig {
    /// Reads the `ORCHGPU_*` variables of this process.
    ///
    /// # Errors
    /// `LambdaConfigError` naming the variable.
    pub fn from_env() -> Result<LambdaConfig, LambdaConfigError> {
        LambdaConfig::from_lookup(|name| std::env::var_os(name))
    }

    /// Reads the configuration with `env` for the variables the defaults depend on
    /// (clap itself reads the process's environment).
    fn from_lookup(
        env: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<LambdaConfig, LambdaConfigError> {
        let mut argv = vec!["orchgpu-lambda".to_string()];
        // The daemon's defaults look for systemd's and the user's directories; a Lambda
        // sandbox has /tmp only.
        if env("ORCHGPU_STATE_DIR").is_none() {
            argv.extend(["--state-dir".into(), DEFAULT_STATE_DIR.into()]);
        }
        if env("ORCHGPU_WORK_DIR").is_none() {
            argv.extend(["--work-dir".into(), DEFAULT_WORK_DIR.into()]);
        }
        LambdaConfig::from_argv(argv)
    }

    /// Parses `argv` (and the process's `ORCHGPU_*` variables) as the daemon would, then
    /// checks it for Lambda mode.
    fn from_argv(argv: Vec<String>) -> Result<LambdaConfig, LambdaConfigError> {
        let args =
            Args::try_parse_from(argv).map_err(|e| LambdaConfigError::Parse(e.to_string()))?;
        LambdaConfig::try_from(Config::try_from(args)?)
    }

    /// The daemon's configuration this function runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Where the reservation journal lives.
    pub(crate) fn state_dir(&self) -> &PathBuf {
        &self.config.state_dir
    }
}

impl TryFrom<Config> for LambdaConfig {
    type Error = LambdaConfigError;

    fn try_from(config: Config) -> Result<LambdaConfig, LambdaConfigError> {
        let refuse = |setting, reason| Err(LambdaConfigError::NotInLambda { setting, reason });
        if config.http_listen.is_some() {
            return refuse(
                "--http-listen (ORCHGPU_HTTP_LISTEN)",
                "a function serves no listener; use CloudWatch for metrics",
            );
        }
        if config.upload_to.is_some() || config.http_token.is_some() {
            return refuse(
                "--upload-to / --http-token-file",
                "the web page needs the daemon's listener",
            );
        }
        if config.stats_file.is_some() {
            return refuse(
                "--stats-file (ORCHGPU_STATS_FILE)",
                "a sandbox's files are gone with it",
            );
        }
        if config.claims.is_none() {
            return refuse(
                "--claims off (ORCHGPU_CLAIMS=off)",
                "the claim is the job's only record once the jobs handler returns",
            );
        }
        let jobs_queue_name = queue_name(&config.queue);
        let results_queue_name = config.results_queue.as_ref().map(queue_name);
        Ok(LambdaConfig {
            config,
            jobs_queue_name,
            results_queue_name,
        })
    }
}

/// A queue's name: as given, or the last segment of its URL.
pub(crate) fn queue_name(queue: &QueueRef) -> String {
    match queue {
        QueueRef::Name(name) => name.clone(),
        QueueRef::Url(url) => url
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(extra: &[&str]) -> Vec<String> {
        let mut argv: Vec<String> = [
            "orchgpu-lambda",
            "-q",
            "https://sqs.eu-west-1.amazonaws.com/123/jobs-q",
            "-S",
            "sched",
            "-P",
            "9999",
            "-i",
            "work/bundles",
            "-o",
            "out/results",
            "-m",
            "/bin/sh",
            "--state-dir",
            "/tmp/s",
            "--work-dir",
            "/tmp/w",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        argv.extend(extra.iter().map(|s| s.to_string()));
        argv
    }

    #[test]
    fn the_daemons_settings_are_taken_and_the_queue_names_found() {
        let config = LambdaConfig::from_argv(argv(&["--results-queue", "res-q"])).expect("valid");
        assert_eq!(config.jobs_queue_name, "jobs-q");
        assert_eq!(config.results_queue_name.as_deref(), Some("res-q"));
        assert!(config.config.claims.is_some(), "claims on by default");
    }

    #[test]
    fn settings_that_need_a_living_process_are_refused_with_their_name() {
        for (extra, named) in [
            (&["--http-listen", "127.0.0.1:9464"][..], "--http-listen"),
            (&["--claims", "off"][..], "--claims off"),
            (&["--stats-file", "/tmp/x.json"][..], "--stats-file"),
        ] {
            let error = LambdaConfig::from_argv(argv(extra)).expect_err("refused");
            assert!(error.to_string().contains(named), "{error}");
        }
    }

    #[test]
    fn a_bad_value_keeps_the_daemons_message() {
        let error = LambdaConfig::from_argv(argv(&["-g", "0"])).expect_err("refused");
        assert!(error.to_string().contains("-g"), "{error}");
    }
}
