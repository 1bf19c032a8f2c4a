//! The command line: clap `Args` (raw values) and their validation into a `Config`.
//!
//! This is the only module that knows clap. Every orchGPU flag keeps its letter, meaning
//! and default; each also has a long name and an `ORCHGPU_*` environment variable.
//! Everything downstream takes the validated `Config` and never re-checks it.

use std::num::{NonZeroU32, NonZeroUsize};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::{Parser, Subcommand, ValueEnum};

use crate::history::{JobState, ListFilter, Retention};

/// SQS caps a message's visibility timeout at 12 hours.
pub const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 60 * 60);

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
releases the GPUs and only then deletes the message.\n\nDurations are whole seconds.",
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
    pub queue: String,

    /// Scheduler host, passed to SSGM `-S`.
    #[arg(short = 'S', long = "scheduler-host", env = "ORCHGPU_SCHEDULER_HOST")]
    pub scheduler_host: String,

    /// Scheduler port, passed to SSGM `-P`.
    #[arg(short = 'P', long = "scheduler-port", env = "ORCHGPU_SCHEDULER_PORT")]
    pub scheduler_port: String,

    /// GPUs per job, passed to SSGM `-g`.
    #[arg(short = 'g', long = "gpus", env = "ORCHGPU_GPUS", default_value = "1")]
    pub gpus: String,

    /// SQS visibility timeout for received messages; extended while a job runs.
    #[arg(
        short = 'v',
        long = "visibility-timeout",
        env = "ORCHGPU_VISIBILITY_TIMEOUT",
        default_value = "30",
        value_name = "SECS"
    )]
    pub visibility_timeout: String,

    /// SQS long-poll wait (0..=20).
    #[arg(
        short = 'w',
        long = "wait-time",
        env = "ORCHGPU_WAIT_TIME",
        default_value = "20",
        value_name = "SECS"
    )]
    pub wait_time: String,

    /// Interval between allocation attempts while the scheduler answers "busy" (a release by
    /// one of our own jobs retries sooner).
    #[arg(
        short = 's',
        long = "alloc-retry-interval",
        env = "ORCHGPU_ALLOC_RETRY_INTERVAL",
        default_value = "30",
        value_name = "SECS"
    )]
    pub alloc_retry_interval: String,

    /// Pause after a receive that returned no message.
    #[arg(
        short = 'u',
        long = "empty-pause",
        env = "ORCHGPU_EMPTY_PAUSE",
        default_value = "10",
        value_name = "SECS"
    )]
    pub empty_pause: String,

    /// Interval between checks of the output bucket for a job's result.
    #[arg(
        short = 'b',
        long = "result-poll-interval",
        env = "ORCHGPU_RESULT_POLL_INTERVAL",
        default_value = "60",
        value_name = "SECS"
    )]
    pub result_poll_interval: String,

    /// SSGM client executable: a path, or a name looked up on PATH.
    #[arg(
        short = 'm',
        long = "ssgm",
        env = "ORCHGPU_SSGM",
        default_value = "ssgm",
        value_name = "PATH"
    )]
    pub ssgm: String,

    /// Intermediate `bucket/dir` for bundles (a bare `bucket` means its root).
    #[arg(
        short = 'i',
        long = "intermediate",
        env = "ORCHGPU_INTERMEDIATE",
        value_name = "BUCKET[/DIR]"
    )]
    pub intermediate: String,

    /// Output `bucket/dir` where the function writes results (a bare `bucket` means its root).
    #[arg(
        short = 'o',
        long = "output",
        env = "ORCHGPU_OUTPUT",
        value_name = "BUCKET[/DIR]"
    )]
    pub output: String,

    /// AWS endpoint URL, for LocalStack or moto (AWS_ENDPOINT_URL is honoured too).
    #[arg(
        long = "endpoint-url",
        env = "ORCHGPU_ENDPOINT_URL",
        value_name = "URL"
    )]
    pub endpoint_url: Option<String>,

    /// AWS region (default: the SDK's usual sources, then us-east-1).
    #[arg(long = "region", env = "ORCHGPU_REGION")]
    pub region: Option<String>,

    /// Maximum number of jobs run at once (messages taken never exceed free slots).
    #[arg(long = "max-jobs", env = "ORCHGPU_MAX_JOBS", default_value = "4")]
    pub max_jobs: String,

    /// Give up on getting GPUs for a job after this long; the message is retried later.
    #[arg(
        long = "alloc-deadline",
        env = "ORCHGPU_ALLOC_DEADLINE",
        default_value = "3600",
        value_name = "SECS"
    )]
    pub alloc_deadline: String,

    /// Give up waiting for a job's result after this long; GPUs are released and the
    /// message is retried later.
    #[arg(
        long = "result-deadline",
        env = "ORCHGPU_RESULT_DEADLINE",
        default_value = "3600",
        value_name = "SECS"
    )]
    pub result_deadline: String,

    /// Timeout for each SSGM call; a client still running then is killed.
    #[arg(
        long = "ssgm-timeout",
        env = "ORCHGPU_SSGM_TIMEOUT",
        default_value = "30",
        value_name = "SECS"
    )]
    pub ssgm_timeout: String,

    /// Suffix of the result object the function writes: `<output dir>/<job id><suffix>`.
    #[arg(
        long = "result-suffix",
        env = "ORCHGPU_RESULT_SUFFIX",
        default_value = ".png"
    )]
    pub result_suffix: String,

    /// First delay before a failed job's message is visible again; doubles with each
    /// receive of the same message, up to 15 minutes.
    #[arg(
        long = "retry-backoff",
        env = "ORCHGPU_RETRY_BACKOFF",
        default_value = "10",
        value_name = "SECS"
    )]
    pub retry_backoff: String,

    /// On SIGTERM/SIGINT, how long running jobs may take to finish before their GPUs are
    /// released and their messages returned (a second signal skips the wait).
    #[arg(
        long = "shutdown-grace",
        env = "ORCHGPU_SHUTDOWN_GRACE",
        default_value = "60",
        value_name = "SECS"
    )]
    pub shutdown_grace: String,

    /// Directory for the reservation journal and its lock [default: $STATE_DIRECTORY set by
    /// systemd, else $XDG_STATE_HOME/orchgpu, else ~/.local/state/orchgpu].
    #[arg(long = "state-dir", env = "ORCHGPU_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Log format.
    #[arg(
        long = "log-format",
        env = "ORCHGPU_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,

    /// SQS queue (name or URL) fed by the output bucket's ObjectCreated notifications:
    /// results are then detected by event instead of polling with HEAD (which stays as
    /// the fallback, at the `-b` interval).
    #[arg(
        long = "results-queue",
        env = "ORCHGPU_RESULTS_QUEUE",
        value_name = "NAME|URL"
    )]
    pub results_queue: Option<String>,

    /// Write the counts of AWS requests made, by operation, to this file (JSON) at exit.
    #[arg(long = "stats-file", env = "ORCHGPU_STATS_FILE", value_name = "PATH")]
    pub stats_file: Option<PathBuf>,

    /// Serve /metrics (Prometheus), /healthz and /readyz on this address, e.g.
    /// 127.0.0.1:9464 [default: off].
    #[arg(
        long = "http-listen",
        env = "ORCHGPU_HTTP_LISTEN",
        value_name = "ADDR:PORT"
    )]
    pub http_listen: Option<String>,

    /// Host names the listener also answers for, comma-separated `NAME` or `NAME:PORT`:
    /// the names a reverse proxy in front of it serves. Requests naming any other host
    /// are refused (421) [default: its own address, localhost, 127.0.0.1, [::1]].
    #[arg(
        long = "http-allowed-hosts",
        env = "ORCHGPU_HTTP_ALLOWED_HOSTS",
        value_name = "NAME[:PORT],..."
    )]
    pub http_allowed_hosts: Option<String>,

    /// Seconds a request's head may take to arrive on the listener (idle keep-alive
    /// connections included); a slower client is cut off.
    #[arg(
        long = "http-header-timeout",
        env = "ORCHGPU_HTTP_HEADER_TIMEOUT",
        default_value = "10",
        value_name = "SECS"
    )]
    pub http_header_timeout: String,

    /// Seconds a request's body (an upload) may pause between two reads; a slower client
    /// is cut off and its upload dropped.
    #[arg(
        long = "http-body-timeout",
        env = "ORCHGPU_HTTP_BODY_TIMEOUT",
        default_value = "30",
        value_name = "SECS"
    )]
    pub http_body_timeout: String,

    /// Let the web page at / on the listener upload images to this input
    /// `bucket[/prefix]` [default: the page shows jobs only].
    #[arg(
        long = "upload-to",
        env = "ORCHGPU_UPLOAD_TO",
        value_name = "BUCKET[/PREFIX]"
    )]
    pub upload_to: Option<String>,

    /// Largest upload the web page accepts, in bytes.
    #[arg(
        long = "upload-max-bytes",
        env = "ORCHGPU_UPLOAD_MAX_BYTES",
        default_value = "52428800",
        value_name = "BYTES"
    )]
    pub upload_max_bytes: String,

    /// Most uploads the web page takes at once; more are refused (429) until one ends.
    #[arg(
        long = "upload-max-concurrent",
        env = "ORCHGPU_UPLOAD_MAX_CONCURRENT",
        default_value = "4",
        value_name = "N"
    )]
    pub upload_max_concurrent: String,

    /// Bytes of the work dir that the web page's uploads in progress may take together
    /// (at least --upload-max-bytes); an upload that would pass it is refused (507).
    #[arg(
        long = "upload-disk-budget",
        env = "ORCHGPU_UPLOAD_DISK_BUDGET",
        default_value = "209715200",
        value_name = "BYTES"
    )]
    pub upload_disk_budget: String,

    /// The web page's title: which use case this deployment serves, e.g. "Text
    /// recognition (OCR)" [default: a generic one].
    #[arg(long = "web-title", env = "ORCHGPU_WEB_TITLE", value_name = "TEXT")]
    pub web_title: Option<String>,

    /// A line under the page's title saying what to upload, e.g. "Upload scanned pages"
    /// [default: a generic one].
    #[arg(long = "web-hint", env = "ORCHGPU_WEB_HINT", value_name = "TEXT")]
    pub web_hint: Option<String>,

    /// File whose first line is the token the web page and its API ask for (header
    /// X-Orchgpu-Token, or the session cookie the page gets for it); read at start-up.
    /// Required when the listener is not on loopback [default: no token].
    #[arg(
        long = "http-token-file",
        env = "ORCHGPU_HTTP_TOKEN_FILE",
        value_name = "PATH"
    )]
    pub http_token_file: Option<PathBuf>,

    /// Keep the job history (`orchgpu jobs`) for this many days after a job's last event.
    #[arg(
        long = "history-max-age",
        env = "ORCHGPU_HISTORY_MAX_AGE",
        default_value = "30",
        value_name = "DAYS"
    )]
    pub history_max_age: String,

    /// Keep at most this many jobs in the history (the most recently updated).
    #[arg(
        long = "history-max-jobs",
        env = "ORCHGPU_HISTORY_MAX_JOBS",
        default_value = "100000",
        value_name = "N"
    )]
    pub history_max_jobs: String,

    /// Keep no job history (no `history.sqlite3` is written).
    #[arg(long = "no-history", env = "ORCHGPU_NO_HISTORY")]
    pub no_history: bool,

    /// Where the cross-daemon claims of job ids live, `bucket[/dir]` (never under the
    /// intermediate dir: the function fires there), or `off` for a daemon alone on its
    /// queue [default: <output bucket>/orchgpu-claims].
    #[arg(
        long = "claims",
        env = "ORCHGPU_CLAIMS",
        value_name = "BUCKET[/DIR]|off"
    )]
    pub claims: Option<String>,

    /// How long a job's claim holds without renewal; renewed every third of it, each claim
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
    pub claim_lease: String,

    /// Directory for downloaded inputs and bundles (on disk: a large input never sits in
    /// memory) [default: $CACHE_DIRECTORY set by systemd, else the temp dir]. What a
    /// previous run left there is removed at start-up.
    #[arg(long = "work-dir", env = "ORCHGPU_WORK_DIR", value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
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
    Name(String),
    Url(String),
}

/// A `bucket/dir` location; `dir` is empty for the bucket's root and never has a leading
/// or trailing `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketDir {
    pub bucket: String,
    pub dir: String,
}

impl BucketDir {
    /// The key of `name` inside this location.
    pub fn key_for(&self, name: &str) -> String {
        if self.dir.is_empty() {
            name.to_string()
        } else {
            format!("{}/{}", self.dir, name)
        }
    }
}

impl std::fmt::Display for BucketDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.dir)
    }
}

/// The validated configuration of the daemon.
#[derive(Debug, Clone)]
pub struct Config {
    pub queue: QueueRef,
    pub scheduler_host: String,
    pub scheduler_port: u16,
    pub gpus: NonZeroU32,
    pub visibility_timeout: Duration,
    pub wait_time: Duration,
    pub alloc_retry_interval: Duration,
    pub empty_pause: Duration,
    pub result_poll_interval: Duration,
    pub ssgm: PathBuf,
    pub intermediate: BucketDir,
    pub output: BucketDir,
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub max_jobs: NonZeroUsize,
    pub alloc_deadline: Duration,
    pub result_deadline: Duration,
    pub ssgm_timeout: Duration,
    pub result_suffix: String,
    pub retry_backoff: Duration,
    pub shutdown_grace: Duration,
    pub state_dir: PathBuf,
    pub log_format: LogFormat,
    pub results_queue: Option<QueueRef>,
    pub stats_file: Option<PathBuf>,
    pub http_listen: Option<std::net::SocketAddr>,
    /// `--http-allowed-hosts`: names (lowercase) and ports (`None`: any).
    pub http_allowed_hosts: Vec<(String, Option<u16>)>,
    pub http_header_timeout: Duration,
    pub http_body_timeout: Duration,
    /// Where the web page uploads to; `None`: the page shows jobs only.
    pub upload_to: Option<BucketDir>,
    /// The largest upload the web page accepts.
    pub upload_max_bytes: u64,
    /// Uploads taken at once.
    pub upload_max_concurrent: NonZeroUsize,
    /// Bytes of the work dir that uploads in progress may take together.
    pub upload_disk_budget: u64,
    /// The token the web API asks for, read from `--http-token-file`.
    pub http_token: Option<String>,
    /// The page's title and hint line (`--web-title`, `--web-hint`); `None`: generic.
    pub web_title: Option<String>,
    pub web_hint: Option<String>,
    /// The job history's retention, or `None` with `--no-history`.
    pub history: Option<Retention>,
    /// `None`: no cross-daemon claims (`--claims off`).
    pub claims: Option<BucketDir>,
    pub claim_lease: Duration,
    pub work_dir: PathBuf,
}

/// A line of the page's text (`--web-title`, `--web-hint`): trimmed, `None` when empty,
/// at most `WEB_TEXT_MAX` characters and no control characters. The page puts it in
/// with `textContent` only, so markup in it shows as text.
fn parse_web_text(flag: &'static str, raw: Option<String>) -> Result<Option<String>, ConfigError> {
    let Some(text) = raw.map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    if text.chars().count() > crate::web::WEB_TEXT_MAX {
        return Err(ConfigError::new(
            flag,
            &text,
            format!("at most {} characters", crate::web::WEB_TEXT_MAX),
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
    pub flag: &'static str,
    pub value: String,
    pub reason: String,
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
            Some(_) => crate::claim::call_timeout(self.claim_lease) * 4,
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
            crate::claim::call_timeout(self.claim_lease) * 2
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
                crate::claim::MIN_LEASE.as_secs(),
                6 * 60 * 60,
            )?,
            work_dir: resolve_work_dir(args.work_dir, |name| std::env::var_os(name))?,
        })
    }
}

/// The web page's upload limit: 1 byte to 5 TB (S3's largest object).
fn parse_upload_max(raw: &str) -> Result<u64, ConfigError> {
    match raw.trim().parse::<u64>() {
        Ok(n) if (1..=5_000_000_000_000).contains(&n) => Ok(n),
        _ => Err(ConfigError::new(
            "--upload-max-bytes",
            raw,
            "expected a whole number of bytes from 1 to 5000000000000",
        )),
    }
}

/// A whole number from 1 to `max`.
fn parse_positive(flag: &'static str, raw: &str, max: usize) -> Result<NonZeroUsize, ConfigError> {
    match raw.trim().parse::<usize>() {
        Ok(n) if n <= max => NonZeroUsize::new(n)
            .ok_or_else(|| ConfigError::new(flag, raw, format!("expected 1 to {max}"))),
        _ => Err(ConfigError::new(flag, raw, format!("expected 1 to {max}"))),
    }
}

/// The uploads' disk budget: at least one upload of the largest size.
fn parse_disk_budget(raw: &str, upload_max_bytes: u64) -> Result<u64, ConfigError> {
    let flag = "--upload-disk-budget";
    let budget = raw
        .trim()
        .parse::<u64>()
        .map_err(|_| ConfigError::new(flag, raw, "expected a whole number of bytes"))?;
    if budget < upload_max_bytes {
        return Err(ConfigError::new(
            flag,
            raw,
            format!("must be at least --upload-max-bytes ({upload_max_bytes})"),
        ));
    }
    Ok(budget)
}

/// `--http-allowed-hosts`: comma-separated `name` or `name:port` (IP literals in
/// brackets for IPv6); no wildcards.
fn parse_allowed_hosts(raw: Option<&str>) -> Result<Vec<(String, Option<u16>)>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    raw.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            crate::http::parse_host_port(entry).ok_or_else(|| {
                ConfigError::new(
                    "--http-allowed-hosts",
                    raw,
                    format!(
                        "{entry:?} is not a host name or name:port (letters, digits, '.', '-')"
                    ),
                )
            })
        })
        .collect()
}

/// Whether two places share objects: the same bucket, and one dir is the other or
/// under it (a bucket's root holds everything in it).
fn overlaps(a: &BucketDir, b: &BucketDir) -> bool {
    let under = |inner: &str, outer: &str| {
        outer.is_empty() || inner == outer || inner.starts_with(&format!("{outer}/"))
    };
    a.bucket == b.bucket && (under(&a.dir, &b.dir) || under(&b.dir, &a.dir))
}

/// `--upload-to` must not share objects with the intermediate dir (an upload there
/// would invoke the function with a user's file as its bundle), the output dir (it would
/// pass for a result) or the claims (it would pass for a claim).
fn check_upload_place(
    place: &BucketDir,
    intermediate: &BucketDir,
    output: &BucketDir,
    claims: Option<&BucketDir>,
) -> Result<(), ConfigError> {
    let shown = place.to_string();
    let clash = [
        (Some(intermediate), "-i/--intermediate"),
        (Some(output), "-o/--output"),
        (claims, "--claims"),
    ]
    .into_iter()
    .find_map(|(other, flag)| other.filter(|o| overlaps(place, o)).map(|o| (o, flag)));
    match clash {
        Some((other, flag)) => Err(ConfigError::new(
            "--upload-to",
            &shown,
            format!("it overlaps the {flag} location {other}; give a place of its own"),
        )),
        None => Ok(()),
    }
}

/// The first line of the token file, trimmed; refuses a missing file or an empty or
/// short token (a guessable one protects nothing).
fn read_token(path: &std::path::Path) -> Result<String, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new("--http-token-file", &shown, format!("cannot read it: {e}"))
    })?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.len() < 16 || token.chars().any(|c| c.is_control()) {
        return Err(ConfigError::new(
            "--http-token-file",
            &shown,
            "its first line must be a token of at least 16 printable characters",
        ));
    }
    Ok(token)
}

/// `ADDR:PORT` with a literal IP address (`127.0.0.1:9464`, `[::1]:9464`): a host name
/// would be resolved behind the operator's back.
fn parse_listen(raw: Option<&str>) -> Result<Option<std::net::SocketAddr>, ConfigError> {
    let Some(raw) = raw.map(str::trim).filter(|r| !r.is_empty()) else {
        return Ok(None);
    };
    raw.parse().map(Some).map_err(|_| {
        ConfigError::new(
            "--http-listen",
            raw,
            "expected an IP address and a port, such as 127.0.0.1:9464",
        )
    })
}

fn parse_secs(flag: &'static str, raw: &str, min: u64, max: u64) -> Result<Duration, ConfigError> {
    let secs: u64 = raw
        .trim()
        .parse()
        .map_err(|_| ConfigError::new(flag, raw, "expected a whole number of seconds"))?;
    if secs < min || secs > max {
        return Err(ConfigError::new(
            flag,
            raw,
            format!("must be between {min} and {max} seconds"),
        ));
    }
    Ok(Duration::from_secs(secs))
}

fn parse_queue(raw: &str) -> Result<QueueRef, ConfigError> {
    let flag = "-q/--queue";
    let value = raw.trim();
    if value.starts_with("http://") || value.starts_with("https://") {
        return Ok(QueueRef::Url(value.to_string()));
    }
    // SQS queue names: 1..=80 of alphanumerics, '-' and '_', plus ".fifo" for FIFO queues.
    let base = value.strip_suffix(".fifo").unwrap_or(value);
    let valid = !base.is_empty()
        && value.len() <= 80
        && base
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        return Err(ConfigError::new(
            flag,
            raw,
            "expected a queue name (1-80 letters, digits, '-', '_') or an http(s) queue URL",
        ));
    }
    Ok(QueueRef::Name(value.to_string()))
}

fn parse_results_queue(raw: Option<String>) -> Result<Option<QueueRef>, ConfigError> {
    match raw {
        None => Ok(None),
        Some(raw) if raw.trim().is_empty() => Ok(None),
        Some(raw) => parse_queue(&raw).map(Some).map_err(|e| ConfigError {
            flag: "--results-queue",
            ..e
        }),
    }
}

fn parse_host(raw: &str) -> Result<String, ConfigError> {
    let value = raw.trim();
    if value.is_empty() || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ConfigError::new(
            "-S/--scheduler-host",
            raw,
            "expected a host name or address",
        ));
    }
    Ok(value.to_string())
}

fn parse_port(raw: &str) -> Result<u16, ConfigError> {
    match raw.trim().parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(ConfigError::new(
            "-P/--scheduler-port",
            raw,
            "expected a port between 1 and 65535",
        )),
    }
}

fn parse_gpus(raw: &str) -> Result<NonZeroU32, ConfigError> {
    match raw.trim().parse::<u32>() {
        Ok(n) if (1..=1024).contains(&n) => Ok(NonZeroU32::new(n).expect("range excludes zero")),
        _ => Err(ConfigError::new(
            "-g/--gpus",
            raw,
            "expected a number of GPUs between 1 and 1024",
        )),
    }
}

fn parse_max_jobs(raw: &str) -> Result<NonZeroUsize, ConfigError> {
    match raw.trim().parse::<usize>() {
        Ok(n) if (1..=10_000).contains(&n) => {
            Ok(NonZeroUsize::new(n).expect("range excludes zero"))
        }
        _ => Err(ConfigError::new(
            "--max-jobs",
            raw,
            "expected a number between 1 and 10000",
        )),
    }
}

/// Parses `bucket[/dir]`; refuses an empty bucket (orchGPU panicked on a missing `/`).
pub fn parse_bucket_dir(flag: &'static str, raw: &str) -> Result<BucketDir, ConfigError> {
    let value = raw.trim();
    let (bucket, dir) = match value.split_once('/') {
        Some((bucket, dir)) => (bucket, dir.trim_matches('/')),
        None => (value, ""),
    };
    if bucket.is_empty() {
        return Err(ConfigError::new(
            flag,
            raw,
            "expected bucket[/dir]; the bucket name is missing",
        ));
    }
    if !is_valid_bucket_name(bucket) {
        return Err(ConfigError::new(
            flag,
            raw,
            format!(
                "{bucket:?} is not a valid S3 bucket name (3-63 lowercase letters, digits, '.', '-')"
            ),
        ));
    }
    if dir.split('/').any(|part| part == ".." || part == ".")
        || dir.contains("//")
        || dir.chars().any(char::is_control)
    {
        return Err(ConfigError::new(
            flag,
            raw,
            "the dir part has an empty, '.' or '..' segment",
        ));
    }
    Ok(BucketDir {
        bucket: bucket.to_string(),
        dir: dir.to_string(),
    })
}

fn is_valid_bucket_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (3..=63).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'.' || *b == b'-')
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
}

/// Finds the SSGM client the way a shell would, and checks that it can be executed.
fn resolve_program(
    flag: &'static str,
    raw: &str,
    path_var: Option<std::ffi::OsString>,
) -> Result<PathBuf, ConfigError> {
    let value = raw.trim();
    if value.is_empty() {
        return Err(ConfigError::new(
            flag,
            raw,
            "expected a path to the SSGM client",
        ));
    }
    if value.contains('/') {
        let path = Path::new(value);
        return match executable_status(path) {
            Ok(()) => Ok(path.to_path_buf()),
            Err(reason) => Err(ConfigError::new(flag, raw, reason)),
        };
    }
    let found = path_var
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(value))
        .find(|candidate| executable_status(candidate).is_ok());
    found.ok_or_else(|| {
        ConfigError::new(
            flag,
            raw,
            "not found on PATH as an executable file; give its path with -m",
        )
    })
}

fn executable_status(path: &Path) -> Result<(), String> {
    let metadata = std::fs::metadata(path).map_err(|e| format!("cannot use it: {e}"))?;
    if !metadata.is_file() {
        return Err("not a regular file".to_string());
    }
    if metadata.permissions().mode() & 0o111 == 0 {
        return Err("not executable (no x permission)".to_string());
    }
    Ok(())
}

fn parse_endpoint(raw: Option<String>) -> Result<Option<String>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    let value = raw.trim();
    if value.is_empty() {
        return Ok(None);
    }
    let rest = value
        .strip_prefix("http://")
        .or_else(|| value.strip_prefix("https://"));
    match rest {
        Some(host) if !host.is_empty() && !host.contains(char::is_whitespace) => {
            Ok(Some(value.trim_end_matches('/').to_string()))
        }
        _ => Err(ConfigError::new(
            "--endpoint-url",
            &raw,
            "expected an http:// or https:// URL",
        )),
    }
}

fn parse_region(raw: Option<String>) -> Result<Option<String>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    let value = raw.trim();
    if value.is_empty() {
        return Ok(None);
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(ConfigError::new(
            "--region",
            &raw,
            "expected a region such as us-east-1",
        ));
    }
    Ok(Some(value.to_string()))
}

/// The state directory: the flag, else systemd's `StateDirectory=`, else the XDG state
/// directory of the user running the daemon.
fn resolve_state_dir(
    flag: Option<PathBuf>,
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<PathBuf, ConfigError> {
    let chosen = flag
        .or_else(|| {
            // systemd may list several directories separated by ':'; the first is ours.
            env("STATE_DIRECTORY").and_then(|v| {
                v.to_string_lossy()
                    .split(':')
                    .next()
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
            })
        })
        .or_else(|| env("XDG_STATE_HOME").map(|d| PathBuf::from(d).join("orchgpu")))
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".local/state/orchgpu")));
    match chosen {
        Some(dir) if dir.is_absolute() => Ok(dir),
        Some(dir) => Err(ConfigError::new(
            "--state-dir",
            &dir.display().to_string(),
            "expected an absolute path",
        )),
        None => Err(ConfigError::new(
            "--state-dir",
            "",
            "no state directory: give one with --state-dir",
        )),
    }
}

/// The history's retention; `None` when it is off (the other two flags are still checked).
fn parse_history(
    off: bool,
    max_age: &str,
    max_jobs: &str,
) -> Result<Option<Retention>, ConfigError> {
    const MAX_DAYS: u64 = 36_500;
    let days = match max_age.trim().parse::<u64>() {
        Ok(days @ 1..=MAX_DAYS) => days,
        _ => {
            return Err(ConfigError::new(
                "--history-max-age",
                max_age,
                format!("expected a whole number of days between 1 and {MAX_DAYS}"),
            ));
        }
    };
    let max_rows = match max_jobs.trim().parse::<u64>() {
        Ok(n) if n >= 1 => n,
        _ => {
            return Err(ConfigError::new(
                "--history-max-jobs",
                max_jobs,
                "expected a whole number of jobs, at least 1",
            ));
        }
    };
    Ok((!off).then_some(Retention {
        max_age: Duration::from_secs(days * 86_400),
        max_rows,
    }))
}

/// The claims' dir when `--claims` is not given, in the output bucket.
pub const DEFAULT_CLAIMS_DIR: &str = "orchgpu-claims";

/// Where claims live: the flag, else `<output bucket>/orchgpu-claims`; `off` for none.
/// Refuses a place under the intermediate dir (every object created there invokes the
/// function) or the output dir itself (where results are looked for).
fn parse_claims(
    raw: Option<&str>,
    intermediate: &BucketDir,
    output: &BucketDir,
) -> Result<Option<BucketDir>, ConfigError> {
    let flag = "--claims";
    let (claims, shown) = match raw.map(str::trim) {
        Some("off") => return Ok(None),
        Some(value) if !value.is_empty() => (parse_bucket_dir(flag, value)?, value.to_string()),
        _ => {
            let default = BucketDir {
                bucket: output.bucket.clone(),
                dir: DEFAULT_CLAIMS_DIR.to_string(),
            };
            let shown = format!("{}/{}", default.bucket, default.dir);
            (default, shown)
        }
    };
    let under = |place: &BucketDir| {
        place.bucket == claims.bucket
            && (place.dir.is_empty()
                || claims.dir == place.dir
                || claims.dir.starts_with(&format!("{}/", place.dir)))
    };
    if under(intermediate) {
        return Err(ConfigError::new(
            flag,
            &shown,
            format!(
                "claims must not be under the intermediate dir {intermediate} (the function \
                 fires on every object created there); give another bucket[/dir]"
            ),
        ));
    }
    if claims.bucket == output.bucket && claims.dir == output.dir {
        return Err(ConfigError::new(
            flag,
            &shown,
            "claims must not share the output dir; give another bucket[/dir]",
        ));
    }
    Ok(Some(claims))
}

/// The work dir: the flag, else systemd's `CacheDirectory=`, else the temp dir.
fn resolve_work_dir(
    flag: Option<PathBuf>,
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<PathBuf, ConfigError> {
    let chosen = flag
        .or_else(|| {
            // systemd may list several directories separated by ':'; the first is ours.
            env("CACHE_DIRECTORY").and_then(|v| {
                v.to_string_lossy()
                    .split(':')
                    .next()
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
            })
        })
        .unwrap_or_else(|| env("TMPDIR").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from));
    if !chosen.is_absolute() {
        return Err(ConfigError::new(
            "--work-dir",
            &chosen.display().to_string(),
            "expected an absolute path",
        ));
    }
    Ok(chosen)
}

fn parse_suffix(raw: &str) -> Result<String, ConfigError> {
    let valid = !raw.is_empty()
        && raw.len() <= 64
        && !raw.contains('/')
        && raw
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if !valid {
        return Err(ConfigError::new(
            "--result-suffix",
            raw,
            "expected 1-64 letters, digits, '.', '-' or '_' (no '/')",
        ));
    }
    Ok(raw.to_string())
}

// ---------------------------------------------------------------------------------------
// `orchgpu jobs`: a separate parser, so the daemon's flat orchGPU-style flags stay as
// they are. `main` sends `orchgpu jobs ...` here (`jobs_argv`), everything else to `Args`.

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
        let long = "x".repeat(crate::web::WEB_TEXT_MAX + 1);
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
