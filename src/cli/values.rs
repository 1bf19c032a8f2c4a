//! The value parsers behind `Config::try_from`: one function per flag or family of
//! flags, each refusing a bad value with a `ConfigError` that names the flag.

use std::num::{NonZeroU32, NonZeroUsize};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{BucketDir, ConfigError, QueueRef};
use crate::history::Retention;

/// The web page's upload limit: 1 byte to 5 TB (S3's largest object).
pub(super) fn parse_upload_max(raw: &str) -> Result<u64, ConfigError> {
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
pub(super) fn parse_positive(
    flag: &'static str,
    raw: &str,
    max: usize,
) -> Result<NonZeroUsize, ConfigError> {
    match raw.trim().parse::<usize>() {
        Ok(n) if n <= max => NonZeroUsize::new(n)
            .ok_or_else(|| ConfigError::new(flag, raw, format!("expected 1 to {max}"))),
        _ => Err(ConfigError::new(flag, raw, format!("expected 1 to {max}"))),
    }
}

/// The uploads' disk budget: at least one upload of the largest size.
pub(super) fn parse_disk_budget(raw: &str, upload_max_bytes: u64) -> Result<u64, ConfigError> {
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
pub(super) fn parse_allowed_hosts(
    raw: Option<&str>,
) -> Result<Vec<(String, Option<u16>)>, ConfigError> {
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
pub(super) fn overlaps(a: &BucketDir, b: &BucketDir) -> bool {
    let under = |inner: &str, outer: &str| {
        outer.is_empty() || inner == outer || inner.starts_with(&format!("{outer}/"))
    };
    a.bucket == b.bucket && (under(&a.dir, &b.dir) || under(&b.dir, &a.dir))
}

/// `--upload-to` must not share objects with the intermediate dir (an upload there
/// would invoke the function with a user's file as its bundle), the output dir (it would
/// pass for a result) or the claims (it would pass for a claim).
pub(super) fn check_upload_place(
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
pub(super) fn read_token(path: &std::path::Path) -> Result<String, ConfigError> {
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
pub(super) fn parse_listen(raw: Option<&str>) -> Result<Option<std::net::SocketAddr>, ConfigError> {
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

pub(super) fn parse_secs(
    flag: &'static str,
    raw: &str,
    min: u64,
    max: u64,
) -> Result<Duration, ConfigError> {
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

pub(super) fn parse_queue(raw: &str) -> Result<QueueRef, ConfigError> {
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

pub(super) fn parse_results_queue(raw: Option<String>) -> Result<Option<QueueRef>, ConfigError> {
    match raw {
        None => Ok(None),
        Some(raw) if raw.trim().is_empty() => Ok(None),
        Some(raw) => parse_queue(&raw).map(Some).map_err(|e| ConfigError {
            flag: "--results-queue",
            ..e
        }),
    }
}

pub(super) fn parse_host(raw: &str) -> Result<String, ConfigError> {
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

pub(super) fn parse_port(raw: &str) -> Result<u16, ConfigError> {
    match raw.trim().parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(ConfigError::new(
            "-P/--scheduler-port",
            raw,
            "expected a port between 1 and 65535",
        )),
    }
}

pub(super) fn parse_gpus(raw: &str) -> Result<NonZeroU32, ConfigError> {
    match raw.trim().parse::<u32>() {
        Ok(n) if (1..=1024).contains(&n) => Ok(NonZeroU32::new(n).expect("range excludes zero")),
        _ => Err(ConfigError::new(
            "-g/--gpus",
            raw,
            "expected a number of GPUs between 1 and 1024",
        )),
    }
}

pub(super) fn parse_max_jobs(raw: &str) -> Result<NonZeroUsize, ConfigError> {
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
pub(super) fn resolve_program(
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

pub(super) fn parse_endpoint(raw: Option<String>) -> Result<Option<String>, ConfigError> {
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

pub(super) fn parse_region(raw: Option<String>) -> Result<Option<String>, ConfigError> {
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
pub(super) fn resolve_state_dir(
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
pub(super) fn parse_history(
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
pub(super) fn parse_claims(
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
pub(super) fn resolve_work_dir(
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

pub(super) fn parse_suffix(raw: &str) -> Result<String, ConfigError> {
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
