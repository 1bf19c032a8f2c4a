//! The command line: clap `Args` (raw values) and their validation into a `Config`.
//!
//! This is the only module that knows clap. Every orchGPU flag keeps its letter, meaning
//! and default; each also has a long name and an `ORCHGPU_*` environment variable.
//! Everything downstream takes the validated `Config` and never re-checks it.

use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::ops::history::Retention;

use crate::aws::queue::MAX_VISIBILITY;
pub use crate::location::BucketDir;

mod jobs;
mod values;
pub use jobs::jobs_argv;
pub(crate) use jobs::{JobsCommand, JobsConfig, parse_jobs};
pub use values::parse_bucket_dir;
use values::*;

/// Raw command-line values, as typed; see `Config` for their validated form.
#[derive(Debug, Parser)]
#[command(
    name = "orchgpu",
    version,
    // A later value wins, so an extra flag can override one from a systemd env file.
    args_override_self = true,
    about = "Turns S3 uploads into GPU jobs on remote GPUs (rCUDA scheduler + SCAR function).",
    long_about = "Receives S3 ObjectCreated notifications from an SQS queue, asks the rCUDA \
scheduler for GPUs through its SSGM client, uploads a bundle (input + reservation) to the \
intermediate bucket for a SCAR function, waits for the function's result in the output bucket, \
then releases the GPUs (kept in a journal until the scheduler confirms) while it deletes the \
message.\n\nDurations are whole seconds.",
    after_help = "The job history: orchgpu jobs --help"
)]
pub struct Args {
    /// SQS jobs queue: a queue name or a full queue URL.
    #[arg(
        short = 'q',
        long = "queue",
        env = "ORCHGPU_QUEUE",
        value_name = "NAME|URL"
    )]
    pub(crate) queue: String,

    /// Scheduler host, passed to SSGM `-S`.
    #[arg(short = 'S', long = "scheduler-host", env = "ORCHGPU_SCHEDULER_HOST")]
    pub(crate) scheduler_host: String,

    /// Scheduler port, passed to SSGM `-P`.
    #[arg(short = 'P', long = "scheduler-port", env = "ORCHGPU_SCHEDULER_PORT")]
    pub(crate) scheduler_port: String,

    /// GPUs per job, passed to SSGM `-g`.
    #[arg(short = 'g', long = "gpus", env = "ORCHGPU_GPUS", default_value = "1")]
    pub(crate) gpus: String,

    /// SQS visibility timeout for received messages; extended while a job runs.
    #[arg(
        short = 'v',
        long = "visibility-timeout",
        env = "ORCHGPU_VISIBILITY_TIMEOUT",
        default_value = "30",
        value_name = "SECS"
    )]
    pub(crate) visibility_timeout: String,

    /// SQS long-poll wait (0..=20).
    #[arg(
        short = 'w',
        long = "wait-time",
        env = "ORCHGPU_WAIT_TIME",
        default_value = "20",
        value_name = "SECS"
    )]
    pub(crate) wait_time: String,

    /// Interval between allocation attempts while the scheduler answers "busy" (a release by
    /// one of our own jobs retries sooner).
    #[arg(
        short = 's',
        long = "alloc-retry-interval",
        env = "ORCHGPU_ALLOC_RETRY_INTERVAL",
        default_value = "30",
        value_name = "SECS"
    )]
    pub(crate) alloc_retry_interval: String,

    /// Pause after a receive that returned no message.
    #[arg(
        short = 'u',
        long = "empty-pause",
        env = "ORCHGPU_EMPTY_PAUSE",
        default_value = "10",
        value_name = "SECS"
    )]
    pub(crate) empty_pause: String,

    /// Interval between checks of the output bucket for a job's result.
    #[arg(
        short = 'b',
        long = "result-poll-interval",
        env = "ORCHGPU_RESULT_POLL_INTERVAL",
        default_value = "60",
        value_name = "SECS"
    )]
    pub(crate) result_poll_interval: String,

    /// SSGM client executable: a path, or a name looked up on PATH.
    #[arg(
        short = 'm',
        long = "ssgm",
        env = "ORCHGPU_SSGM",
        default_value = "ssgm",
        value_name = "PATH"
    )]
    pub(crate) ssgm: String,

    /// Intermediate `bucket/dir` for bundles (a bare `bucket` means its root).
    #[arg(
        short = 'i',
        long = "intermediate",
        env = "ORCHGPU_INTERMEDIATE",
        value_name = "BUCKET[/DIR]"
    )]
    pub(crate) intermediate: String,

    /// Output `bucket/dir` where the function writes results (a bare `bucket` means its root).
    #[arg(
        short = 'o',
        long = "output",
        env = "ORCHGPU_OUTPUT",
        value_name = "BUCKET[/DIR]"
    )]
    pub(crate) output: String,

    /// AWS endpoint URL, for LocalStack or moto (AWS_ENDPOINT_URL is honoured too).
    #[arg(
        long = "endpoint-url",
        env = "ORCHGPU_ENDPOINT_URL",
        value_name = "URL"
    )]
    pub(crate) endpoint_url: Option<String>,

    /// AWS region (default: the SDK's usual sources, then us-east-1).
    #[arg(long = "region", env = "ORCHGPU_REGION")]
    pub(crate) region: Option<String>,

    /// Maximum number of jobs run at once (messages taken never exceed free slots).
    #[arg(long = "max-jobs", env = "ORCHGPU_MAX_JOBS", default_value = "4")]
    pub(crate) max_jobs: String,

    /// Give up on getting GPUs for a job after this long; the message is retried later.
    #[arg(
        long = "alloc-deadline",
        env = "ORCHGPU_ALLOC_DEADLINE",
        default_value = "3600",
        value_name = "SECS"
    )]
    pub(crate) alloc_deadline: String,

    /// Give up waiting for a job's result after this long; GPUs are released and the
    /// message is retried later.
    #[arg(
        long = "result-deadline",
        env = "ORCHGPU_RESULT_DEADLINE",
        default_value = "3600",
        value_name = "SECS"
    )]
    pub(crate) result_deadline: String,

    /// Timeout for each SSGM call; a client still running then is killed.
    #[arg(
        long = "ssgm-timeout",
        env = "ORCHGPU_SSGM_TIMEOUT",
        default_value = "30",
        value_name = "SECS"
    )]
    pub(crate) ssgm_timeout: String,

    /// Suffix of the result object the function writes: `<output dir>/<job id><suffix>`.
    #[arg(
        long = "result-suffix",
        env = "ORCHGPU_RESULT_SUFFIX",
        default_value = ".png"
    )]
    pub(crate) result_suffix: String,

    /// First delay before a failed job's message is visible again; doubles with each
    /// receive of the same message, up to 15 minutes.
    #[arg(
        long = "retry-backoff",
        env = "ORCHGPU_RETRY_BACKOFF",
        default_value = "10",
        value_name = "SECS"
    )]
    pub(crate) retry_backoff: String,

    /// On SIGTERM/SIGINT, how long running jobs may take to finish before their GPUs are
    /// released and their messages returned (a second signal skips the wait).
    #[arg(
        long = "shutdown-grace",
        env = "ORCHGPU_SHUTDOWN_GRACE",
        default_value = "60",
        value_name = "SECS"
    )]
    pub(crate) shutdown_grace: String,

    /// Run until the queue is drained, then exit 0 (for cron, CI, a batch system): the run
    /// ends at the first long-poll receive (at least 1 s, whatever -w says) that brings
    /// nothing new while none of its jobs runs. Each message is tried at most once per run:
    /// a job that fails is not retried by the same run; its message stays hidden until the
    /// run ends (at most 15 min if the run is killed), then comes back after the usual
    /// retry backoff for the next run. Messages hidden at the start (another consumer's, a
    /// failed job's backoff) are not waited for; the `Drained.` log line counts what was
    /// tried, what was returned and what SQS still hides. Exit 0 with failures too.
    #[arg(long = "drain", env = "ORCHGPU_DRAIN")]
    pub(crate) drain: bool,

    /// Directory for the reservation journal and its lock [default: $STATE_DIRECTORY set by
    /// systemd, else $XDG_STATE_HOME/orchgpu, else ~/.local/state/orchgpu].
    #[arg(long = "state-dir", env = "ORCHGPU_STATE_DIR", value_name = "DIR")]
    pub(crate) state_dir: Option<PathBuf>,

    /// Log format.
    #[arg(
        long = "log-format",
        env = "ORCHGPU_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    pub(crate) log_format: LogFormat,

    /// SQS queue (name or URL) fed by the output bucket's ObjectCreated notifications:
    /// results are then detected by event instead of polling with HEAD (which stays as
    /// the fallback, at the `-b` interval).
    #[arg(
        long = "results-queue",
        env = "ORCHGPU_RESULTS_QUEUE",
        value_name = "NAME|URL"
    )]
    pub(crate) results_queue: Option<String>,

    /// Write the counts of AWS requests made, by operation, to this file (JSON) at exit.
    #[arg(long = "stats-file", env = "ORCHGPU_STATS_FILE", value_name = "PATH")]
    pub(crate) stats_file: Option<PathBuf>,

    /// Serve /metrics (Prometheus), /healthz and /readyz on this address, e.g.
    /// 127.0.0.1:9464 [default: off].
    #[arg(
        long = "http-listen",
        env = "ORCHGPU_HTTP_LISTEN",
        value_name = "ADDR:PORT"
    )]
    pub(crate) http_listen: Option<String>,

    /// Host names the listener also answers for, comma-separated `NAME` or `NAME:PORT`:
    /// the names a reverse proxy in front of it serves. Requests naming any other host
    /// are refused (421) [default: its own address, localhost, 127.0.0.1, [::1]].
    #[arg(
        long = "http-allowed-hosts",
        env = "ORCHGPU_HTTP_ALLOWED_HOSTS",
        value_name = "NAME[:PORT],..."
    )]
    pub(crate) http_allowed_hosts: Option<String>,

    /// Seconds a request's head may take to arrive on the listener (idle keep-alive
    /// connections included); a slower client is cut off.
    #[arg(
        long = "http-header-timeout",
        env = "ORCHGPU_HTTP_HEADER_TIMEOUT",
        default_value = "10",
        value_name = "SECS"
    )]
    pub(crate) http_header_timeout: String,

    /// Seconds a request's body (an upload) may pause between two reads; a slower client
    /// is cut off and its upload dropped.
    #[arg(
        long = "http-body-timeout",
        env = "ORCHGPU_HTTP_BODY_TIMEOUT",
        default_value = "30",
        value_name = "SECS"
    )]
    pub(crate) http_body_timeout: String,

    /// Let the web page at / on the listener upload images to this input
    /// `bucket[/prefix]` [default: the page shows jobs only].
    #[arg(
        long = "upload-to",
        env = "ORCHGPU_UPLOAD_TO",
        value_name = "BUCKET[/PREFIX]"
    )]
    pub(crate) upload_to: Option<String>,

    /// Largest upload the web page accepts, in bytes.
    #[arg(
        long = "upload-max-bytes",
        env = "ORCHGPU_UPLOAD_MAX_BYTES",
        default_value = "52428800",
        value_name = "BYTES"
    )]
    pub(crate) upload_max_bytes: String,

    /// Most uploads the web page takes at once; more are refused (429) until one ends.
    #[arg(
        long = "upload-max-concurrent",
        env = "ORCHGPU_UPLOAD_MAX_CONCURRENT",
        default_value = "4",
        value_name = "N"
    )]
    pub(crate) upload_max_concurrent: String,

    /// Bytes of the work dir that the web page's uploads in progress may take together
    /// (at least --upload-max-bytes); an upload that would pass it is refused (507).
    #[arg(
        long = "upload-disk-budget",
        env = "ORCHGPU_UPLOAD_DISK_BUDGET",
        default_value = "209715200",
        value_name = "BYTES"
    )]
    pub(crate) upload_disk_budget: String,

    /// The web page's title: which use case this deployment serves, e.g. "Text
    /// recognition (OCR)" [default: a generic one].
    #[arg(long = "web-title", env = "ORCHGPU_WEB_TITLE", value_name = "TEXT")]
    pub(crate) web_title: Option<String>,

    /// A line under the page's title saying what to upload, e.g. "Upload scanned pages"
    /// [default: a generic one].
    #[arg(long = "web-hint", env = "ORCHGPU_WEB_HINT", value_name = "TEXT")]
    pub(crate) web_hint: Option<String>,

    /// File whose first line is the token the web page and its API ask for (header
    /// X-Orchgpu-Token, or the session cookie the page gets for it); read at start-up.
    /// Required when the listener is not on loopback [default: no token].
    #[arg(
        long = "http-token-file",
        env = "ORCHGPU_HTTP_TOKEN_FILE",
        value_name = "PATH"
    )]
    pub(crate) http_token_file: Option<PathBuf>,

    /// Keep the job history (`orchgpu jobs`) for this many days after a job's last event.
    #[arg(
        long = "history-max-age",
        env = "ORCHGPU_HISTORY_MAX_AGE",
        default_value = "30",
        value_name = "DAYS"
    )]
    pub(crate) history_max_age: String,

    /// Keep at most this many jobs in the history (the most recently updated).
    #[arg(
        long = "history-max-jobs",
        env = "ORCHGPU_HISTORY_MAX_JOBS",
        default_value = "100000",
        value_name = "N"
    )]
    pub(crate) history_max_jobs: String,

    /// Keep no job history (no `history.sqlite3` is written).
    #[arg(long = "no-history", env = "ORCHGPU_NO_HISTORY")]
    pub(crate) no_history: bool,

    /// Where the cross-daemon claims of job ids live, `bucket[/dir]` (never under the
    /// intermediate dir: the function fires there), or `off` for a daemon alone on its
    /// queue [default: <output bucket>/orchgpu-claims].
    #[arg(
        long = "claims",
        env = "ORCHGPU_CLAIMS",
        value_name = "BUCKET[/DIR]|off"
    )]
    pub(crate) claims: Option<String>,

    /// How long a job's claim holds without renewal; renewed every half of it, each claim
    /// call timed out after a sixth of it (1 to 10 s), and a holder whose renewals do
    /// not get through stops a call timeout before the lease ends. At least 6 s. A
    /// crashed daemon's jobs wait this long before a daemon of another host takes them
    /// over.
    #[arg(
        long = "claim-lease",
        env = "ORCHGPU_CLAIM_LEASE",
        default_value = "60",
        value_name = "SECS"
    )]
    pub(crate) claim_lease: String,

    /// Directory for downloaded inputs and bundles (on disk: a large input never sits in
    /// memory) [default: $CACHE_DIRECTORY set by systemd, else the temp dir]. What a
    /// previous run left there is removed at start-up.
    #[arg(long = "work-dir", env = "ORCHGPU_WORK_DIR", value_name = "DIR")]
    pub(crate) work_dir: Option<PathBuf>,
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The SQS queue as given: a name to resolve, or a URL to use as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueRef {
    /// A queue name, resolved to its URL at start-up.
    Name(String),
    /// A queue URL, used as given.
    Url(String),
}

/// The validated configuration of the daemon.
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) queue: QueueRef,
    pub(crate) scheduler_host: String,
    pub(crate) scheduler_port: u16,
    pub(crate) gpus: NonZeroU32,
    pub(crate) visibility_timeout: Duration,
    pub(crate) wait_time: Duration,
    pub(crate) alloc_retry_interval: Duration,
    pub(crate) empty_pause: Duration,
    pub(crate) result_poll_interval: Duration,
    pub(crate) ssgm: PathBuf,
    pub(crate) intermediate: BucketDir,
    pub(crate) output: BucketDir,
    pub(crate) endpoint_url: Option<String>,
    pub(crate) region: Option<String>,
    pub(crate) max_jobs: NonZeroUsize,
    pub(crate) alloc_deadline: Duration,
    pub(crate) result_deadline: Duration,
    /// Timeout of one SSGM call.
    pub ssgm_timeout: Duration,
    pub(crate) result_suffix: String,
    pub(crate) retry_backoff: Duration,
    /// How long running jobs get after the first signal.
    pub shutdown_grace: Duration,
    pub(crate) state_dir: PathBuf,
    /// How log lines are written.
    pub log_format: LogFormat,
    pub(crate) results_queue: Option<QueueRef>,
    pub(crate) stats_file: Option<PathBuf>,
    pub(crate) http_listen: Option<std::net::SocketAddr>,
    /// `--http-allowed-hosts`: names (lowercase) and ports (`None`: any).
    pub(crate) http_allowed_hosts: Vec<(String, Option<u16>)>,
    pub(crate) http_header_timeout: Duration,
    pub(crate) http_body_timeout: Duration,
    /// Where the web page uploads to; `None`: the page shows jobs only.
    pub(crate) upload_to: Option<BucketDir>,
    /// The largest upload the web page accepts.
    pub(crate) upload_max_bytes: u64,
    /// Uploads taken at once.
    pub(crate) upload_max_concurrent: NonZeroUsize,
    /// Bytes of the work dir that uploads in progress may take together.
    pub(crate) upload_disk_budget: u64,
    /// The token the web API asks for, read from `--http-token-file`.
    pub(crate) http_token: Option<String>,
    /// The page's title and hint line (`--web-title`, `--web-hint`); `None`: generic.
    pub(crate) web_title: Option<String>,
    pub(crate) web_hint: Option<String>,
    /// The job history's retention, or `None` with `--no-history`.
    pub(crate) history: Option<Retention>,
    /// `None`: no cross-daemon claims (`--claims off`).
    pub(crate) claims: Option<BucketDir>,
    pub(crate) claim_lease: Duration,
    pub(crate) work_dir: PathBuf,
    /// `--drain`: end once the queue is drained.
    pub(crate) drain: bool,
}

/// A line of the page's text (`--web-title`, `--web-hint`): trimmed, `None` when empty,
/// at most `WEB_TEXT_MAX` characters and no control characters. The page puts it in
/// with `textContent` only, so markup in it shows as text.
fn parse_web_text(flag: &'static str, raw: Option<String>) -> Result<Option<String>, ConfigError> {
    let Some(text) = raw.map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    if text.chars().count() > crate::ops::web::WEB_TEXT_MAX {
        return Err(ConfigError::new(
            flag,
            &text,
            format!("at most {} characters", crate::ops::web::WEB_TEXT_MAX),
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(ConfigError::new(
            flag,
            &text,
            "one line, no control characters",
        ));
    }
    Ok(Some(text))
}

/// A command-line value that cannot be used; the message names the flag.
#[derive(Debug, thiserror::Error)]
#[error("invalid value {value:?} for {flag}: {reason}")]
pub struct ConfigError {
    pub(crate) flag: &'static str,
    pub(crate) value: String,
    pub(crate) reason: String,
}

impl Config {
    /// The longest a graceful stop can take, from the first SIGTERM to exit, with these
    /// flags; the unit's `TimeoutStopSec` must be at least this (a test checks it with the
    /// env example's values). In order: a receive in flight ends within `-w`; running
    /// jobs get `--shutdown-grace`; then each cancelled job takes its grant out of its
    /// claim and ends the claim (two claim calls, each confirmed by a read), makes one
    /// release attempt (an allocation in flight is cut short: the releaser settles it)
    /// and returns its message (one SQS request, retries included); then the releaser's
    /// last pass gets one SSGM call's time.
    pub fn stop_budget(&self) -> Duration {
        let ssgm_call = self.ssgm_timeout + crate::scheduler::KILL_GRACE;
        // A cancelled job's claim calls: clearing its grant and ending its claim, each a
        // write and a confirming read.
        let claim_calls = match self.claims {
            Some(_) => crate::job::claim::call_timeout(self.claim_lease) * 4,
            None => Duration::ZERO,
        };
        self.wait_time
            + self.shutdown_grace
            + ssgm_call
            + crate::aws::worst_sqs_request()
            + ssgm_call
            + claim_calls
    }

    /// The longest start-up can take before READY with these flags: the SQS requests made
    /// before it (the jobs queue's URL, the results queue's) and the S3 check of the
    /// claims location, retries included. Releasing what a previous run left happens
    /// after READY, in the background.
    pub fn start_budget(&self) -> Duration {
        let requests = 1 + u32::from(self.results_queue.is_some());
        // The probe claim's write and delete, each within the claim call timeout.
        let claims_check = if self.claims.is_some() {
            crate::job::claim::call_timeout(self.claim_lease) * 2
        } else {
            Duration::ZERO
        };
        crate::aws::worst_sqs_request() * requests + claims_check
    }
}

impl ConfigError {
    fn new(flag: &'static str, value: &str, reason: impl Into<String>) -> Self {
        ConfigError {
            flag,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, ConfigError> {
        let visibility_timeout = parse_secs(
            "-v/--visibility-timeout",
            &args.visibility_timeout,
            2,
            MAX_VISIBILITY.as_secs(),
        )?;
        let wait_time = parse_secs("-w/--wait-time", &args.wait_time, 0, 20)?;
        let intermediate = parse_bucket_dir("-i/--intermediate", &args.intermediate)?;
        let output = parse_bucket_dir("-o/--output", &args.output)?;
        let claims = parse_claims(args.claims.as_deref(), &intermediate, &output)?;
        let upload_to = args
            .upload_to
            .as_deref()
            .map(str::trim)
            .filter(|raw| !raw.is_empty())
            .map(|raw| parse_bucket_dir("--upload-to", raw))
            .transpose()?;
        if let Some(place) = &upload_to {
            check_upload_place(place, &intermediate, &output, claims.as_ref())?;
        }
        let http_listen = parse_listen(args.http_listen.as_deref())?;
        let http_token = args
            .http_token_file
            .as_deref()
            .map(read_token)
            .transpose()?;
        if let Some(addr) = http_listen
            && !addr.ip().is_loopback()
            && http_token.is_none()
        {
            return Err(ConfigError::new(
                "--http-listen",
                &addr.to_string(),
                "a listener off loopback needs --http-token-file (else the page, its API \
                 and every result are open to the network)",
            ));
        }
        let upload_max_bytes = parse_upload_max(&args.upload_max_bytes)?;
        Ok(Config {
            queue: parse_queue(&args.queue)?,
            scheduler_host: parse_host(&args.scheduler_host)?,
            scheduler_port: parse_port(&args.scheduler_port)?,
            gpus: parse_gpus(&args.gpus)?,
            visibility_timeout,
            wait_time,
            alloc_retry_interval: parse_secs(
                "-s/--alloc-retry-interval",
                &args.alloc_retry_interval,
                1,
                86_400,
            )?,
            empty_pause: parse_secs("-u/--empty-pause", &args.empty_pause, 0, 3600)?,
            result_poll_interval: parse_secs(
                "-b/--result-poll-interval",
                &args.result_poll_interval,
                1,
                3600,
            )?,
            ssgm: resolve_program("-m/--ssgm", &args.ssgm, std::env::var_os("PATH"))?,
            intermediate,
            output,
            endpoint_url: parse_endpoint(args.endpoint_url)?,
            region: parse_region(args.region)?,
            max_jobs: parse_max_jobs(&args.max_jobs)?,
            alloc_deadline: parse_secs(
                "--alloc-deadline",
                &args.alloc_deadline,
                1,
                MAX_VISIBILITY.as_secs(),
            )?,
            result_deadline: parse_secs(
                "--result-deadline",
                &args.result_deadline,
                1,
                MAX_VISIBILITY.as_secs(),
            )?,
            ssgm_timeout: parse_secs("--ssgm-timeout", &args.ssgm_timeout, 1, 3600)?,
            result_suffix: parse_suffix(&args.result_suffix)?,
            retry_backoff: parse_secs("--retry-backoff", &args.retry_backoff, 0, 900)?,
            shutdown_grace: parse_secs("--shutdown-grace", &args.shutdown_grace, 0, 3600)?,
            state_dir: resolve_state_dir(args.state_dir, |name| std::env::var_os(name))?,
            log_format: args.log_format,
            results_queue: parse_results_queue(args.results_queue)?,
            stats_file: args.stats_file,
            http_listen,
            http_allowed_hosts: parse_allowed_hosts(args.http_allowed_hosts.as_deref())?,
            http_header_timeout: parse_secs(
                "--http-header-timeout",
                &args.http_header_timeout,
                1,
                3600,
            )?,
            http_body_timeout: parse_secs("--http-body-timeout", &args.http_body_timeout, 1, 3600)?,
            upload_to,
            upload_max_bytes,
            upload_max_concurrent: parse_positive(
                "--upload-max-concurrent",
                &args.upload_max_concurrent,
                1024,
            )?,
            upload_disk_budget: parse_disk_budget(&args.upload_disk_budget, upload_max_bytes)?,
            http_token,
            web_title: parse_web_text("--web-title", args.web_title)?,
            web_hint: parse_web_text("--web-hint", args.web_hint)?,
            history: parse_history(
                args.no_history,
                &args.history_max_age,
                &args.history_max_jobs,
            )?,
            claims,
            claim_lease: parse_secs(
                "--claim-lease",
                &args.claim_lease,
                crate::job::claim::MIN_LEASE.as_secs(),
                6 * 60 * 60,
            )?,
            work_dir: resolve_work_dir(args.work_dir, |name| std::env::var_os(name))?,
            drain: args.drain,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake environment for the `resolve_*_dir` functions.
    fn env(
        vars: &'static [(&'static str, &'static str)],
    ) -> impl Fn(&str) -> Option<std::ffi::OsString> {
        move |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| std::ffi::OsString::from(v))
        }
    }

    const REQUIRED: [(&str, &str); 6] = [
        ("-q", "jobs"),
        ("-S", "sched.local"),
        ("-P", "9999"),
        ("-i", "work/bundles"),
        ("-o", "out"),
        // Always executable, so tests do not depend on an ssgm on PATH.
        ("-m", "/bin/sh"),
    ];

    /// The required flags plus `extra`; a flag given in `extra` replaces its default here.
    fn with(extra: &[&str]) -> Vec<String> {
        let mut argv = vec!["orchgpu".to_string()];
        for (flag, value) in REQUIRED {
            if !extra.contains(&flag) {
                argv.push(flag.to_string());
                argv.push(value.to_string());
            }
        }
        argv.extend(extra.iter().map(|s| s.to_string()));
        argv
    }

    fn config(extra: &[&str]) -> Result<Config, ConfigError> {
        let args = Args::try_parse_from(with(extra)).expect("args parse");
        Config::try_from(args)
    }

    fn error_for(extra: &[&str]) -> String {
        config(extra).expect_err("should be refused").to_string()
    }

    #[test]
    fn defaults_match_orchgpu() {
        let c = config(&[]).expect("valid");
        assert_eq!(c.queue, QueueRef::Name("jobs".into()));
        assert_eq!(c.scheduler_host, "sched.local");
        assert_eq!(c.scheduler_port, 9999);
        assert_eq!(c.gpus.get(), 1);
        assert_eq!(c.visibility_timeout, Duration::from_secs(30));
        assert_eq!(c.wait_time, Duration::from_secs(20));
        assert_eq!(c.alloc_retry_interval, Duration::from_secs(30));
        assert_eq!(c.empty_pause, Duration::from_secs(10));
        assert_eq!(c.result_poll_interval, Duration::from_secs(60));
        assert_eq!(
            c.intermediate,
            BucketDir {
                bucket: "work".into(),
                dir: "bundles".into()
            }
        );
        assert_eq!(
            c.output,
            BucketDir {
                bucket: "out".into(),
                dir: "".into()
            }
        );
        assert_eq!(c.result_suffix, ".png");
        assert_eq!(c.max_jobs.get(), 4);
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn drain_is_off_unless_asked_for() {
        assert!(!config(&[]).expect("valid").drain);
        assert!(config(&["--drain"]).expect("valid").drain);
    }

    #[test]
    fn every_short_flag_sets_its_value() {
        let c = config(&[
            "-g", "2", "-v", "300", "-w", "5", "-s", "7", "-u", "0", "-b", "3",
        ])
        .expect("valid");
        assert_eq!(c.gpus.get(), 2);
        assert_eq!(c.visibility_timeout, Duration::from_secs(300));
        assert_eq!(c.wait_time, Duration::from_secs(5));
        assert_eq!(c.alloc_retry_interval, Duration::from_secs(7));
        assert_eq!(c.empty_pause, Duration::ZERO);
        assert_eq!(c.result_poll_interval, Duration::from_secs(3));
        assert_eq!(c.ssgm, PathBuf::from("/bin/sh"));
    }

    #[test]
    fn long_options_set_their_values() {
        let c = config(&[
            "--endpoint-url",
            "http://127.0.0.1:4566/",
            "--region",
            "eu-west-1",
            "--max-jobs",
            "8",
            "--alloc-deadline",
            "60",
            "--result-deadline",
            "120",
            "--ssgm-timeout",
            "5",
            "--result-suffix",
            ".jpg",
            "--retry-backoff",
            "1",
            "--shutdown-grace",
            "9",
            "--log-format",
            "json",
        ])
        .expect("valid");
        assert_eq!(c.endpoint_url.as_deref(), Some("http://127.0.0.1:4566"));
        assert_eq!(c.region.as_deref(), Some("eu-west-1"));
        assert_eq!(c.max_jobs.get(), 8);
        assert_eq!(c.alloc_deadline, Duration::from_secs(60));
        assert_eq!(c.result_deadline, Duration::from_secs(120));
        assert_eq!(c.ssgm_timeout, Duration::from_secs(5));
        assert_eq!(c.result_suffix, ".jpg");
        assert_eq!(c.retry_backoff, Duration::from_secs(1));
        assert_eq!(c.shutdown_grace, Duration::from_secs(9));
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn queue_url_is_kept_as_url() {
        let c = config(&["-q", "http://127.0.0.1:4566/000000000000/jobs"]).expect("valid");
        assert_eq!(
            c.queue,
            QueueRef::Url("http://127.0.0.1:4566/000000000000/jobs".into())
        );
    }

    #[test]
    fn bad_values_are_refused_with_the_flag_named() {
        let cases: &[(&[&str], &str)] = &[
            (&["-w", "25"], "-w/--wait-time"),
            (&["-w", "x"], "-w/--wait-time"),
            (&["-P", "0"], "-P/--scheduler-port"),
            (&["-P", "70000"], "-P/--scheduler-port"),
            (&["-g", "0"], "-g/--gpus"),
            (&["-v", "0"], "-v/--visibility-timeout"),
            (&["-v", "43201"], "-v/--visibility-timeout"),
            (&["-b", "0"], "-b/--result-poll-interval"),
            (&["-s", "abc"], "-s/--alloc-retry-interval"),
            (&["-i", "/bundles"], "-i/--intermediate"),
            (&["-i", ""], "-i/--intermediate"),
            (&["-o", "Bad_Bucket/x"], "-o/--output"),
            (&["-o", "out/../x"], "-o/--output"),
            (&["-q", "has space"], "-q/--queue"),
            (&["-S", ""], "-S/--scheduler-host"),
            (&["-m", "/nonexistent/ssgm"], "-m/--ssgm"),
            (&["-m", "/tmp"], "-m/--ssgm"),
            (&["--max-jobs", "0"], "--max-jobs"),
            (&["--endpoint-url", "localhost:4566"], "--endpoint-url"),
            (&["--result-suffix", "a/b"], "--result-suffix"),
            (&["--region", "EU WEST"], "--region"),
        ];
        for (extra, flag) in cases {
            let message = error_for(extra);
            assert!(message.contains(flag), "{extra:?}: {message}");
        }
    }

    #[test]
    fn ssgm_without_execute_permission_is_refused() {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        let path = file.path().to_str().expect("utf-8 temp path");
        let message = error_for(&["-m", path]);
        assert!(message.contains("not executable"), "{message}");
    }

    #[test]
    fn missing_required_flag_is_a_clap_usage_error() {
        let err = Args::try_parse_from(["orchgpu", "-q", "jobs"]).expect_err("refused");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn ssgm_is_looked_up_on_path() {
        let found = resolve_program("-m", "sh", Some("/nonexistent:/bin".into())).expect("found");
        assert_eq!(found, PathBuf::from("/bin/sh"));
        assert!(resolve_program("-m", "ssgm-does-not-exist", Some("/bin".into())).is_err());
    }

    #[test]
    fn state_dir_comes_from_flag_then_systemd_then_xdg_then_home() {
        let all: &'static [(&str, &str)] = &[
            ("STATE_DIRECTORY", "/var/lib/orchgpu:/var/lib/other"),
            ("XDG_STATE_HOME", "/xdg"),
            ("HOME", "/home/u"),
        ];
        assert_eq!(
            resolve_state_dir(Some("/flag".into()), env(all)).expect("ok"),
            PathBuf::from("/flag")
        );
        assert_eq!(
            resolve_state_dir(None, env(all)).expect("ok"),
            PathBuf::from("/var/lib/orchgpu")
        );
        assert_eq!(
            resolve_state_dir(None, env(&all[1..])).expect("ok"),
            PathBuf::from("/xdg/orchgpu")
        );
        assert_eq!(
            resolve_state_dir(None, env(&all[2..])).expect("ok"),
            PathBuf::from("/home/u/.local/state/orchgpu")
        );
        assert!(resolve_state_dir(None, env(&[])).is_err());
        assert!(resolve_state_dir(Some("relative".into()), env(all)).is_err());
    }

    #[test]
    fn bucket_dir_forms() {
        let parse = |s| parse_bucket_dir("-i", s).expect("valid");
        assert_eq!(parse("b-1").dir, "");
        assert_eq!(parse("b-1/").dir, "");
        assert_eq!(parse("b-1/a/b/").dir, "a/b");
        assert_eq!(parse("b-1/a/b").key_for("x.tar.gz"), "a/b/x.tar.gz");
        assert_eq!(parse("b-1").key_for("x.tar.gz"), "x.tar.gz");
    }

    #[test]
    fn http_listen_is_off_by_default_and_needs_an_ip_and_port() {
        assert_eq!(config(&[]).expect("valid").http_listen, None);
        let c = config(&["--http-listen", "127.0.0.1:9464"]).expect("valid");
        assert_eq!(c.http_listen, Some("127.0.0.1:9464".parse().expect("addr")));
        let c = config(&["--http-listen", "[::1]:0"]).expect("valid");
        assert_eq!(c.http_listen, Some("[::1]:0".parse().expect("addr")));
        for bad in ["localhost:9464", "127.0.0.1", "9464", "127.0.0.1:99999"] {
            let err = config(&["--http-listen", bad]).expect_err(bad);
            assert!(err.to_string().contains("--http-listen"), "{err}");
        }
    }

    #[test]
    fn web_title_and_hint_flags() {
        let c = config(&[]).expect("valid");
        assert_eq!((c.web_title, c.web_hint), (None, None));
        let c = config(&[
            "--web-title",
            " Text recognition (OCR) ",
            "--web-hint",
            "Upload scanned pages <b>",
        ])
        .expect("valid");
        assert_eq!(c.web_title.as_deref(), Some("Text recognition (OCR)"));
        assert_eq!(c.web_hint.as_deref(), Some("Upload scanned pages <b>"));
        assert_eq!(
            config(&["--web-title", "  "]).expect("valid").web_title,
            None
        );
        let long = "x".repeat(crate::ops::web::WEB_TEXT_MAX + 1);
        for (flag, bad) in [("--web-title", long.as_str()), ("--web-hint", "two\nlines")] {
            let err = error_for(&[flag, bad]);
            assert!(err.contains(flag), "{err}");
        }
    }

    #[test]
    fn web_upload_flags() {
        let c = config(&[]).expect("valid");
        assert_eq!(c.upload_to, None);
        assert_eq!(c.upload_max_bytes, 52_428_800);
        assert_eq!(c.http_token, None);
        let c = config(&[
            "--upload-to",
            "in-bucket/web/",
            "--upload-max-bytes",
            "1000",
        ])
        .expect("valid");
        assert_eq!(
            c.upload_to,
            Some(BucketDir {
                bucket: "in-bucket".into(),
                dir: "web".into()
            })
        );
        assert_eq!(c.upload_max_bytes, 1000);
        for (flag, bad) in [
            ("--upload-to", "/web"),
            ("--upload-to", "Bad_Bucket"),
            ("--upload-max-bytes", "0"),
            ("--upload-max-bytes", "50MB"),
            ("--http-token-file", "/nonexistent/token"),
        ] {
            let err = config(&[flag, bad]).expect_err(bad);
            assert!(err.to_string().contains(flag), "{err}");
        }
    }

    #[test]
    fn a_listener_off_loopback_needs_a_token() {
        for addr in ["0.0.0.0:9464", "[::]:9464", "10.0.0.5:9464"] {
            let err = error_for(&["--http-listen", addr]);
            assert!(err.contains("--http-token-file"), "{addr}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("token");
        std::fs::write(&path, "0123456789abcdef-token\n").expect("write");
        let token = path.to_str().expect("utf-8");
        let c = config(&["--http-listen", "0.0.0.0:9464", "--http-token-file", token])
            .expect("valid with a token");
        assert!(c.http_token.is_some());
        assert!(config(&["--http-listen", "[::1]:9464"]).is_ok());
    }

    #[test]
    fn upload_place_must_not_overlap_the_functions_places() {
        // -i work/bundles, -o out, claims default to out/orchgpu-claims.
        for place in [
            "work",
            "work/bundles",
            "work/bundles/web",
            "out",
            "out/web",
            "out/orchgpu-claims/x",
        ] {
            let err = error_for(&["--upload-to", place]);
            assert!(
                err.contains("--upload-to") && err.contains("overlaps"),
                "{place}: {err}"
            );
        }
        let err = error_for(&["--upload-to", "c/x", "--claims", "c/x/claims"]);
        assert!(err.contains("--claims"), "{err}");
        for place in ["work/web", "work/bundles2", "in-bucket", "in-bucket/web"] {
            assert!(config(&["--upload-to", place]).is_ok(), "{place}");
        }
        // The output bucket's root holds everything in it.
        let err = error_for(&["--upload-to", "out2/web", "-o", "out2"]);
        assert!(err.contains("-o/--output"), "{err}");
    }

    #[test]
    fn listener_limits_and_allowed_hosts() {
        let c = config(&[]).expect("valid");
        assert_eq!(c.http_allowed_hosts, Vec::new());
        assert_eq!(c.http_header_timeout, Duration::from_secs(10));
        assert_eq!(c.http_body_timeout, Duration::from_secs(30));
        assert_eq!(c.upload_max_concurrent.get(), 4);
        assert_eq!(c.upload_disk_budget, 209_715_200);
        let c = config(&[
            "--http-allowed-hosts",
            "orchgpu.example.org, Proxy.Example:8443",
            "--upload-max-concurrent",
            "2",
            "--upload-max-bytes",
            "1000",
            "--upload-disk-budget",
            "1000",
        ])
        .expect("valid");
        assert_eq!(
            c.http_allowed_hosts,
            vec![
                ("orchgpu.example.org".to_string(), None),
                ("proxy.example".to_string(), Some(8443))
            ]
        );
        assert_eq!(c.upload_max_concurrent.get(), 2);
        for (flag, bad) in [
            ("--http-allowed-hosts", "*.example.org"),
            ("--http-allowed-hosts", "a.example/x"),
            ("--http-allowed-hosts", "a.example:http"),
            ("--http-header-timeout", "0"),
            ("--http-body-timeout", "x"),
            ("--upload-max-concurrent", "0"),
            ("--upload-disk-budget", "1000"),
        ] {
            let err = config(&[flag, bad]).expect_err(bad);
            assert!(err.to_string().contains(flag), "{err}");
        }
    }

    #[test]
    fn http_token_file_is_read_and_must_hold_a_long_token() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("token");
        std::fs::write(&path, "  0123456789abcdef-token \nignored\n").expect("write");
        let c = config(&["--http-token-file", path.to_str().expect("utf-8")]).expect("valid");
        assert_eq!(c.http_token.as_deref(), Some("0123456789abcdef-token"));
        std::fs::write(&path, "short\n").expect("write");
        let err =
            config(&["--http-token-file", path.to_str().expect("utf-8")]).expect_err("short token");
        assert!(err.to_string().contains("at least 16"), "{err}");
    }

    #[test]
    fn results_queue_and_stats_file() {
        let c = config(&[]).expect("valid");
        assert_eq!(c.results_queue, None);
        assert_eq!(c.stats_file, None);
        let c = config(&["--results-queue", "res", "--stats-file", "/tmp/s.json"]).expect("valid");
        assert_eq!(c.results_queue, Some(QueueRef::Name("res".into())));
        assert_eq!(c.stats_file, Some(PathBuf::from("/tmp/s.json")));
        let c = config(&["--results-queue", "http://h:1/000/res"]).expect("valid");
        assert_eq!(
            c.results_queue,
            Some(QueueRef::Url("http://h:1/000/res".into()))
        );
        assert!(error_for(&["--results-queue", "bad name"]).contains("--results-queue"));
    }

    #[test]
    fn history_flags() {
        let c = config(&[]).expect("valid");
        assert_eq!(c.history, Some(Retention::default()));
        assert_eq!(
            Retention::default().max_age,
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(Retention::default().max_rows, 100_000);
        let c = config(&["--history-max-age", "7", "--history-max-jobs", "500"]).expect("valid");
        assert_eq!(
            c.history,
            Some(Retention {
                max_age: Duration::from_secs(7 * 86_400),
                max_rows: 500
            })
        );
        assert_eq!(config(&["--no-history"]).expect("valid").history, None);
        for bad in [
            &["--history-max-age", "0"][..],
            &["--history-max-age", "x"],
            &["--history-max-age", "36501"],
        ] {
            assert!(error_for(bad).contains("--history-max-age"), "{bad:?}");
        }
        for bad in [
            &["--history-max-jobs", "0"][..],
            &["--history-max-jobs", "1.5"],
        ] {
            assert!(error_for(bad).contains("--history-max-jobs"), "{bad:?}");
        }
    }

    #[test]
    fn claims_default_to_the_output_bucket_and_can_be_moved_or_turned_off() {
        let c = config(&[]).expect("valid");
        assert_eq!(
            c.claims,
            Some(BucketDir {
                bucket: "out".into(),
                dir: DEFAULT_CLAIMS_DIR.into()
            })
        );
        assert_eq!(c.claim_lease, Duration::from_secs(60));
        let c = config(&["--claims", "work/claims", "--claim-lease", "6"]).expect("valid");
        assert_eq!(
            c.claims,
            Some(BucketDir {
                bucket: "work".into(),
                dir: "claims".into()
            })
        );
        assert_eq!(c.claim_lease, Duration::from_secs(6));
        assert_eq!(config(&["--claims", "off"]).expect("valid").claims, None);
        // Below six shortest claim-call timeouts a renewal and its retry cannot both fit.
        assert!(error_for(&["--claim-lease", "5"]).contains("--claim-lease"));
    }

    #[test]
    fn claims_are_refused_under_the_intermediate_dir_or_in_the_output_dir() {
        // -i is work/bundles in these tests.
        for place in ["work/bundles", "work/bundles/claims", "work/bundles/a/b"] {
            let e = error_for(&["--claims", place]);
            assert!(e.contains("--claims") && e.contains("intermediate"), "{e}");
        }
        // A bucket's root as the intermediate dir: nothing in that bucket is safe.
        let e = error_for(&["-i", "work", "--claims", "work/claims"]);
        assert!(e.contains("intermediate"), "{e}");
        // The default follows the output bucket: refused when that is the intermediate
        // bucket's root too.
        let e = error_for(&["-i", "out", "-o", "out/results"]);
        assert!(e.contains("intermediate"), "{e}");
        assert!(error_for(&["-o", "out/res", "--claims", "out/res"]).contains("output dir"));
        // Beside the intermediate dir, in the same bucket, is fine.
        assert!(config(&["--claims", "work/bundles-claims"]).is_ok());
        assert!(config(&["--claims", "work/claims"]).is_ok());
    }

    #[test]
    fn work_dir_comes_from_flag_then_systemd_then_the_temp_dir() {
        let all: &'static [(&str, &str)] = &[
            ("CACHE_DIRECTORY", "/var/cache/orchgpu:/var/cache/other"),
            ("TMPDIR", "/scratch"),
        ];
        assert_eq!(
            resolve_work_dir(Some("/flag".into()), env(all)).expect("ok"),
            PathBuf::from("/flag")
        );
        assert_eq!(
            resolve_work_dir(None, env(all)).expect("ok"),
            PathBuf::from("/var/cache/orchgpu")
        );
        assert_eq!(
            resolve_work_dir(None, env(&all[1..])).expect("ok"),
            PathBuf::from("/scratch")
        );
        assert_eq!(
            resolve_work_dir(None, env(&[])).expect("ok"),
            PathBuf::from("/tmp")
        );
        assert!(resolve_work_dir(Some("rel".into()), env(all)).is_err());
        let args = Args::try_parse_from(with(&["--work-dir", "/w"])).expect("parses");
        assert_eq!(args.work_dir, Some(PathBuf::from("/w")));
    }
}
