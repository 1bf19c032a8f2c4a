//! The SSGM command-line client, run as a child process, behind the
//! [`GpuScheduler`] trait.
//!
//! This module owns how SSGM is called: the exact argv (never a shell), the
//! per-call timeout and the killing of a hung client and its process group,
//! the capture of its output, the reading of the `-alloc` reply (through
//! [`super::reply`]) and the retries of `-dealloc`. It does not decide what a
//! busy or refused allocation means for a job, nor remember what is held: the
//! job pipeline and the journal do.

use std::future::Future;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};

use super::reply::{
    AllocReply, ReplyError, find_granted_job_id, parse_alloc_reply, truncate_chars,
};

/// The most bytes kept of each of a call's stdout and stderr; the rest is read and dropped.
pub const OUTPUT_CAP: usize = 64 * 1024;

/// How long a timed-out call gets between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// How many characters of SSGM's output an error keeps.
const ERROR_OUTPUT_MAX_CHARS: usize = 300;

/// What the daemon needs from a GPU scheduler.
///
/// The daemon is generic over it (`S: GpuScheduler + Send + Sync + 'static`),
/// so tests can put a fake in place of [`Ssgm`].
pub trait GpuScheduler {
    /// Asks for `gpus` GPUs for one job.
    ///
    /// `Ok` carries the scheduler's answer, which may be a refusal
    /// ([`AllocReply::Busy`], [`AllocReply::RequestError`]); `Err` means no
    /// answer could be had.
    fn alloc(&self, gpus: u32) -> impl Future<Output = Result<AllocReply, SchedulerError>> + Send;

    /// Gives back the GPUs held for `scheduler_job_id`.
    fn dealloc(
        &self,
        scheduler_job_id: &str,
    ) -> impl Future<Output = Result<(), SchedulerError>> + Send;
}

/// How to reach the scheduler through SSGM, and how patient to be with it.
#[derive(Debug, Clone)]
pub struct SsgmConfig {
    /// The SSGM client executable (a bare name is looked up on `PATH`).
    pub program: PathBuf,
    /// Scheduler host, passed as `-S`.
    pub host: String,
    /// Scheduler port, passed as `-P`.
    pub port: u16,
    /// How long one SSGM run may take before it is killed.
    pub call_timeout: Duration,
    /// How many times `-dealloc` is tried before giving up (at least once).
    pub release_attempts: u32,
    /// Pause before the second `-dealloc` attempt; it doubles after each failure.
    pub release_retry_delay: Duration,
}

impl SsgmConfig {
    /// Default for [`SsgmConfig::call_timeout`].
    pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
    /// Default for [`SsgmConfig::release_attempts`].
    pub const DEFAULT_RELEASE_ATTEMPTS: u32 = 3;
    /// Default for [`SsgmConfig::release_retry_delay`].
    pub const DEFAULT_RELEASE_RETRY_DELAY: Duration = Duration::from_secs(1);

    /// A configuration with the default timeout and release retries.
    pub fn new(program: impl Into<PathBuf>, host: impl Into<String>, port: u16) -> Self {
        Self {
            program: program.into(),
            host: host.into(),
            port,
            call_timeout: Self::DEFAULT_CALL_TIMEOUT,
            release_attempts: Self::DEFAULT_RELEASE_ATTEMPTS,
            release_retry_delay: Self::DEFAULT_RELEASE_RETRY_DELAY,
        }
    }
}

/// Why a scheduler call gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// SSGM could not be started (missing, not executable, ...).
    #[error("failed to start ssgm {program}")]
    Spawn {
        /// The program that was run.
        program: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// SSGM did not finish within the call timeout; its process group was killed.
    #[error("ssgm {action} timed out after {timeout:?} and was killed")]
    Timeout {
        /// `-alloc` or `-dealloc`.
        action: &'static str,
        /// The call timeout that expired.
        timeout: Duration,
    },
    /// SSGM exited with a non-zero status.
    #[error("ssgm {action} exited with {status}: {stderr}")]
    Failed {
        /// `-alloc` or `-dealloc`.
        action: &'static str,
        /// Its exit status.
        status: ExitStatus,
        /// Its stderr, trimmed and cut to about 300 characters; when stderr is
        /// empty, its stdout instead (marked `stdout:`), or `no output`.
        stderr: String,
    },
    /// `-alloc` exited 0 but its stdout is not a reply.
    #[error("ssgm -alloc gave an unreadable reply")]
    BadReply {
        /// What is wrong with it.
        #[source]
        source: ReplyError,
        /// The stdout, trimmed and cut to about 300 characters.
        stdout: String,
    },
    /// Every `-dealloc` attempt failed.
    #[error("failed to release scheduler job {job} after {attempts} attempts")]
    ReleaseFailed {
        /// The scheduler job id that may still hold GPUs.
        job: String,
        /// How many attempts were made.
        attempts: u32,
        /// The error of the last attempt.
        #[source]
        last: Box<SchedulerError>,
    },
    /// Reading SSGM's output or waiting for it failed.
    #[error("failed to wait for ssgm")]
    Wait(#[source] std::io::Error),
}

impl SchedulerError {
    /// Whether SSGM was killed for taking too long (for a failed release,
    /// whether its last attempt was).
    #[must_use]
    pub fn is_timeout(&self) -> bool {
        match self {
            Self::Timeout { .. } => true,
            Self::ReleaseFailed { last, .. } => last.is_timeout(),
            _ => false,
        }
    }
}

/// The rCUDA scheduler reached through its SSGM command-line client.
#[derive(Debug, Clone)]
pub struct Ssgm {
    config: SsgmConfig,
}

impl Ssgm {
    /// A client that runs SSGM as `config` says.
    #[must_use]
    pub fn new(config: SsgmConfig) -> Self {
        Self { config }
    }

    /// The configuration this client runs with.
    #[must_use]
    pub fn config(&self) -> &SsgmConfig {
        &self.config
    }

    /// Runs `<program> -S <host> -P <port> -alloc -g <gpus>` once.
    ///
    /// A non-zero exit is never taken as a grant, even when stdout holds a
    /// well-formed reply: it is returned as [`SchedulerError::Failed`]. The
    /// scheduler may still hold GPUs for a job whose grant was printed, so
    /// whenever the call does not return a grant but its stdout shows one (a
    /// non-zero exit, a call killed at the timeout after printing, a reply
    /// broken after its job id), that job is released before returning, best
    /// effort and logged.
    ///
    /// # Errors
    ///
    /// [`SchedulerError::Spawn`], [`SchedulerError::Timeout`],
    /// [`SchedulerError::Failed`], [`SchedulerError::BadReply`] or
    /// [`SchedulerError::Wait`].
    ///
    /// # Cancel safety
    ///
    /// Dropping the future kills SSGM's process group. If the scheduler had
    /// already granted GPUs, their job id is never learnt and they stay held
    /// until the scheduler reclaims them, so do not race this future against
    /// anything but shutdown.
    pub async fn alloc(&self, gpus: u32) -> Result<AllocReply, SchedulerError> {
        const ACTION: &str = "-alloc";
        let gpus = gpus.to_string();
        let (stdout, error) = match self.run(ACTION, &[ACTION, "-g", &gpus]).await? {
            Outcome::TimedOut { stdout } => {
                let error = SchedulerError::Timeout {
                    action: ACTION,
                    timeout: self.config.call_timeout,
                };
                (stdout, error)
            }
            Outcome::Exited(out) if !out.status.success() => {
                let stdout = out.stdout.clone();
                (stdout, out.into_failed(ACTION))
            }
            Outcome::Exited(out) => match parse_alloc_reply(&out.stdout) {
                Ok(reply) => return Ok(reply),
                Err(source) => {
                    let error = SchedulerError::BadReply {
                        source,
                        stdout: truncate_chars(out.stdout.trim(), ERROR_OUTPUT_MAX_CHARS),
                    };
                    (out.stdout, error)
                }
            },
        };
        if let Some(job) = find_granted_job_id(&stdout) {
            tracing::warn!(
                scheduler_job = %job,
                error = %error,
                "Allocation failed after printing a grant, releasing it."
            );
            self.release_stray(job).await;
        }
        Err(error)
    }

    /// Runs `<program> -S <host> -P <port> -dealloc -j <id>` until it exits 0,
    /// at most [`SsgmConfig::release_attempts`] times, pausing
    /// [`SsgmConfig::release_retry_delay`] (doubled after each failure) between
    /// attempts.
    ///
    /// # Errors
    ///
    /// [`SchedulerError::ReleaseFailed`] with the last attempt's error.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future kills a running attempt; the job may or may not
    /// have been released, and releasing it again is the way to find out.
    pub async fn dealloc(&self, scheduler_job_id: &str) -> Result<(), SchedulerError> {
        let attempts = self.config.release_attempts.max(1);
        let mut delay = self.config.release_retry_delay;
        let mut attempt = 1;
        loop {
            let error = match self.dealloc_once(scheduler_job_id).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            tracing::warn!(
                scheduler_job = %scheduler_job_id,
                attempt,
                error = %error,
                "Release attempt failed."
            );
            if attempt >= attempts {
                return Err(SchedulerError::ReleaseFailed {
                    job: scheduler_job_id.to_owned(),
                    attempts,
                    last: Box::new(error),
                });
            }
            tokio::time::sleep(delay).await;
            delay = delay.saturating_mul(2);
            attempt += 1;
        }
    }

    /// One `-dealloc` run; success is exit status 0.
    async fn dealloc_once(&self, scheduler_job_id: &str) -> Result<(), SchedulerError> {
        const ACTION: &str = "-dealloc";
        match self.run(ACTION, &[ACTION, "-j", scheduler_job_id]).await? {
            Outcome::Exited(out) if out.status.success() => Ok(()),
            Outcome::Exited(out) => Err(out.into_failed(ACTION)),
            Outcome::TimedOut { .. } => Err(SchedulerError::Timeout {
                action: ACTION,
                timeout: self.config.call_timeout,
            }),
        }
    }

    /// Releases a job nobody else knows about; failures are only logged.
    async fn release_stray(&self, scheduler_job_id: &str) {
        match self.dealloc(scheduler_job_id).await {
            Ok(()) => tracing::info!(scheduler_job = %scheduler_job_id, "Released stray grant."),
            Err(e) => tracing::error!(
                scheduler_job = %scheduler_job_id,
                error = %e,
                "Failed to release stray grant, the scheduler may still hold its GPUs."
            ),
        }
    }

    /// Runs SSGM with `-S <host> -P <port>` and then `args`, capturing its
    /// output, killing its process group if it outlives the call timeout.
    async fn run(&self, action: &'static str, args: &[&str]) -> Result<Outcome, SchedulerError> {
        let config = &self.config;
        let started = Instant::now();
        let mut command = Command::new(&config.program);
        command
            .arg("-S")
            .arg(&config.host)
            .arg("-P")
            .arg(config.port.to_string())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a timeout can signal whatever SSGM
            // forks, and a terminal's Ctrl-C (sent to orchgpu's foreground group)
            // does not kill an in-flight release. Under systemd this needs
            // KillMode=mixed, as KillMode=control-group signals every process.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|source| SchedulerError::Spawn {
            program: config.program.clone(),
            source,
        })?;
        let group = GroupGuard::new(&child);
        let stdout = child.stdout.take().expect("stdout was set to piped");
        let stderr = child.stderr.take().expect("stderr was set to piped");

        let mut out_buf = Vec::new();
        let mut err_buf = Vec::new();
        // Output is read while waiting, so a chatty SSGM never blocks on a full
        // pipe. Reading runs to end-of-file, so a forked helper that keeps the
        // pipes open counts as hung and is killed with the group.
        let finished = tokio::time::timeout(config.call_timeout, async {
            let (status, out, err) = tokio::join!(
                child.wait(),
                read_capped(stdout, &mut out_buf),
                read_capped(stderr, &mut err_buf),
            );
            out.and(err).and(status)
        })
        .await;

        let outcome = match finished {
            Ok(Ok(status)) => Outcome::Exited(Output {
                status,
                stdout: String::from_utf8_lossy(&out_buf).into_owned(),
                stderr: String::from_utf8_lossy(&err_buf).into_owned(),
            }),
            Ok(Err(e)) => {
                group.kill(&mut child).await;
                group.disarm();
                return Err(SchedulerError::Wait(e));
            }
            Err(_elapsed) => {
                tracing::warn!(
                    action,
                    timeout_ms = config.call_timeout.as_millis(),
                    "SSGM call timed out, killing it."
                );
                group.terminate(&mut child).await;
                Outcome::TimedOut {
                    stdout: String::from_utf8_lossy(&out_buf).into_owned(),
                }
            }
        };
        group.disarm();
        let status = match &outcome {
            Outcome::Exited(out) => Some(out.status),
            Outcome::TimedOut { .. } => None,
        };
        tracing::debug!(
            action,
            elapsed_ms = started.elapsed().as_millis(),
            ?status,
            "SSGM call finished."
        );
        Ok(outcome)
    }
}

impl GpuScheduler for Ssgm {
    async fn alloc(&self, gpus: u32) -> Result<AllocReply, SchedulerError> {
        Ssgm::alloc(self, gpus).await
    }

    async fn dealloc(&self, scheduler_job_id: &str) -> Result<(), SchedulerError> {
        Ssgm::dealloc(self, scheduler_job_id).await
    }
}

/// How one SSGM run ended.
enum Outcome {
    /// It exited by itself.
    Exited(Output),
    /// It was killed at the call timeout; `stdout` is what it had printed.
    TimedOut { stdout: String },
}

/// What an SSGM run that exited left behind.
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Output {
    /// The error for a non-zero exit, with stderr (or stdout) as its detail.
    fn into_failed(self, action: &'static str) -> SchedulerError {
        let stderr = self.stderr.trim();
        let stdout = self.stdout.trim();
        let detail = if !stderr.is_empty() {
            truncate_chars(stderr, ERROR_OUTPUT_MAX_CHARS)
        } else if !stdout.is_empty() {
            format!("stdout: {}", truncate_chars(stdout, ERROR_OUTPUT_MAX_CHARS))
        } else {
            "no output".to_owned()
        };
        SchedulerError::Failed {
            action,
            status: self.status,
            stderr: detail,
        }
    }
}

/// Reads `reader` to end-of-file, keeping the first [`OUTPUT_CAP`] bytes in `buf`.
async fn read_capped(mut reader: impl AsyncRead + Unpin, buf: &mut Vec<u8>) -> std::io::Result<()> {
    // On the heap, so the futures that embed this one stay small.
    let mut chunk = vec![0u8; 8192];
    loop {
        let n = reader.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        let room = OUTPUT_CAP.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..n.min(room)]);
    }
}

/// The process group of one SSGM run (its id is the child's pid, thanks to
/// `process_group(0)`), killed with SIGKILL if the run is abandoned early.
///
/// `kill_on_drop` alone reaches only the direct child; this reaches anything
/// it forked too.
struct GroupGuard {
    pgid: Option<Pid>,
}

impl GroupGuard {
    fn new(child: &Child) -> Self {
        let pgid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw);
        Self { pgid }
    }

    /// SIGTERM to the group, up to [`KILL_GRACE`] for the child to exit, then
    /// SIGKILL to the group for anything still there, and the child reaped.
    async fn terminate(&self, child: &mut Child) {
        self.signal(Signal::SIGTERM);
        if tokio::time::timeout(KILL_GRACE, child.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_ms = KILL_GRACE.as_millis(),
                "SSGM ignored SIGTERM, killing it."
            );
        }
        self.kill(child).await;
    }

    /// SIGKILL to the group, and the child reaped.
    async fn kill(&self, child: &mut Child) {
        self.signal(Signal::SIGKILL);
        if let Err(e) = child.wait().await {
            tracing::warn!(error = %e, "Failed to reap killed SSGM.");
        }
    }

    fn signal(&self, signal: Signal) {
        if let Some(pgid) = self.pgid {
            match killpg(pgid, signal) {
                // ESRCH only means the whole group is already gone.
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => tracing::warn!(
                    %pgid,
                    ?signal,
                    error = %e,
                    "Failed to signal SSGM's process group."
                ),
            }
        }
    }

    /// The run ended and its child was reaped: nothing left to kill.
    fn disarm(mut self) {
        self.pgid = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.signal(Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::scheduler::reply::Grant;

    /// Fake SSGM programs. Each gets its state directory as `-S` (so `$2`),
    /// and writes its pid, argv and counters there.
    const SCRIPTS: &[(&str, &str)] = &[
        (
            "grant",
            r#"printf '%s\n' "$@" > "$2/argv"
echo 'SSGM_ERROR=0;SSGM_JOB=42;RCUDA_DEVICE_COUNT=1;RCUDA_DEVICE_0=gpu1:0;'
"#,
        ),
        // Forks, so killing only the direct child would leave `sleep` behind.
        (
            "sleep",
            r#"sleep 60 &
echo $! > "$2/child"
echo $$ > "$2/pid"
wait
"#,
        ),
        (
            "ignore-term",
            r#"trap '' TERM
echo $$ > "$2/pid"
while :; do sleep 1; done
"#,
        ),
        (
            "boom",
            r#"echo boom >&2
exit 3
"#,
        ),
        (
            "exit-1-silent",
            r#"exit 1
"#,
        ),
        (
            "fail-twice",
            r#"n=$(cat "$2/count" 2>/dev/null || echo 0)
n=$((n + 1))
echo "$n" > "$2/count"
[ "$n" -ge 3 ] || { echo "not yet $n" >&2; exit 1; }
"#,
        ),
        (
            "always-fail",
            r#"n=$(cat "$2/count" 2>/dev/null || echo 0)
echo $((n + 1)) > "$2/count"
echo "no such job" >&2
exit 1
"#,
        ),
        (
            "chatty",
            r#"head -c 1048576 /dev/zero | tr '\0' x
head -c 1048576 /dev/zero | tr '\0' y >&2
exit 0
"#,
        ),
        (
            "chatty-fail",
            r#"head -c 1048576 /dev/zero | tr '\0' x
head -c 1048576 /dev/zero | tr '\0' y >&2
exit 1
"#,
        ),
        // Allocation prints a grant but exits non-zero; dealloc is recorded.
        (
            "grant-exit-1",
            r#"case "$5" in
-alloc) echo 'SSGM_ERROR=0;SSGM_JOB=77;RCUDA_DEVICE_COUNT=1;'; exit 1 ;;
-dealloc) printf '%s\n' "$@" > "$2/dealloc" ;;
esac
"#,
        ),
        // Allocation prints a grant and then hangs; dealloc is recorded.
        (
            "grant-then-hang",
            r#"case "$5" in
-alloc) echo 'SSGM_ERROR=0;SSGM_JOB=78;'; sleep 60 ;;
-dealloc) printf '%s\n' "$@" > "$2/dealloc" ;;
esac
"#,
        ),
        // Prints a grant whose settings are broken; dealloc is recorded.
        (
            "grant-broken",
            r#"case "$5" in
-alloc) echo 'SSGM_ERROR=0;SSGM_JOB=79;RCUDA_DEVICE_COUNT'; exit 0 ;;
-dealloc) printf '%s\n' "$@" > "$2/dealloc" ;;
esac
"#,
        ),
        (
            "busy",
            r#"echo 'SSGM_ERROR=2;'
"#,
        ),
        (
            "garbage",
            r#"echo 'Segmentation fault (core dumped)'
"#,
        ),
    ];

    /// The directory holding [`SCRIPTS`], written once before any test spawns
    /// a process: writing an executable while another thread forks can make
    /// running it fail with ETXTBSY.
    ///
    /// It lives beside the test binary (so `cargo clean` removes it), is named
    /// after this process, and directories left by earlier runs are removed.
    fn scripts() -> &'static Path {
        static DIR: OnceLock<PathBuf> = OnceLock::new();
        DIR.get_or_init(|| {
            use std::os::unix::fs::PermissionsExt;
            const PREFIX: &str = "ssgm-test-scripts-";
            let exe = std::env::current_exe().expect("test binary path");
            let parent = exe.parent().expect("test binary has a directory");
            for entry in std::fs::read_dir(parent)
                .expect("list test binary directory")
                .flatten()
            {
                let name = entry.file_name();
                let stale = name
                    .to_str()
                    .and_then(|n| n.strip_prefix(PREFIX))
                    .is_some_and(|pid| !Path::new("/proc").join(pid).exists());
                if stale {
                    // Best effort: another run may be removing it too.
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
            let dir = parent.join(format!("{PREFIX}{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir(&dir).expect("create script dir");
            for (name, body) in SCRIPTS {
                let path = dir.join(name);
                std::fs::write(&path, format!("#!/bin/sh\n{body}")).expect("write script");
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                    .expect("chmod script");
            }
            dir
        })
    }

    /// A client running script `name` with a fresh state directory.
    fn fake(name: &str, call_timeout: Duration) -> (Ssgm, tempfile::TempDir) {
        let program = scripts().join(name);
        let state = tempfile::tempdir().expect("state dir");
        let config = SsgmConfig {
            program,
            host: state.path().to_str().expect("utf-8 temp path").to_owned(),
            port: 7000,
            call_timeout,
            release_attempts: 3,
            release_retry_delay: Duration::from_millis(20),
        };
        (Ssgm::new(config), state)
    }

    fn read(path: impl AsRef<Path>) -> String {
        std::fs::read_to_string(path.as_ref())
            .unwrap_or_else(|e| panic!("read {}: {e}", path.as_ref().display()))
    }

    /// Whether `pid` is a live process (a zombie counts as dead).
    fn is_alive(pid: &str) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())) {
            // The state follows the parenthesised command name.
            Ok(stat) => !stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
            Err(_) => false,
        }
    }

    /// Asserts that the processes whose pids are in `files` under `dir` are
    /// dead, or die within a second: a signalled process dies asynchronously.
    async fn assert_dies(dir: &Path, files: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(1);
        for file in files {
            let pid = read(dir.join(file));
            while is_alive(&pid) {
                assert!(
                    Instant::now() < deadline,
                    "{file} {} still running",
                    pid.trim()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    #[tokio::test]
    async fn alloc_passes_exact_argv_and_parses_grant() {
        let (ssgm, state) = fake("grant", Duration::from_secs(10));
        let reply = ssgm.alloc(2).await.expect("granted");
        assert_eq!(
            reply,
            AllocReply::Granted(Grant {
                scheduler_job_id: "42".to_owned(),
                job_field_name: "SSGM_JOB".to_owned(),
                settings: vec![
                    ("RCUDA_DEVICE_COUNT".to_owned(), "1".to_owned()),
                    ("RCUDA_DEVICE_0".to_owned(), "gpu1:0".to_owned()),
                ],
            })
        );
        let host = state.path().to_str().expect("utf-8");
        assert_eq!(
            read(state.path().join("argv")),
            format!("-S\n{host}\n-P\n7000\n-alloc\n-g\n2\n")
        );
    }

    #[tokio::test]
    async fn dealloc_passes_exact_argv() {
        let (ssgm, state) = fake("grant", Duration::from_secs(10));
        ssgm.dealloc("job 7;x").await.expect("released");
        let host = state.path().to_str().expect("utf-8");
        assert_eq!(
            read(state.path().join("argv")),
            format!("-S\n{host}\n-P\n7000\n-dealloc\n-j\njob 7;x\n")
        );
    }

    #[tokio::test]
    async fn works_through_the_trait() {
        async fn via<S: GpuScheduler + Send + Sync + 'static>(s: S) -> AllocReply {
            let fut = tokio::spawn(async move { s.alloc(1).await });
            fut.await.expect("task").expect("reply")
        }
        let (ssgm, _state) = fake("busy", Duration::from_secs(10));
        assert_eq!(via(ssgm).await, AllocReply::Busy);
    }

    #[tokio::test]
    async fn hung_alloc_is_killed_at_the_timeout() {
        let (ssgm, state) = fake("sleep", Duration::from_millis(500));
        let started = Instant::now();
        let err = ssgm.alloc(1).await.expect_err("must time out");
        let elapsed = started.elapsed();
        assert!(err.is_timeout(), "{err:?}");
        assert_eq!(
            err.to_string(),
            "ssgm -alloc timed out after 500ms and was killed"
        );
        assert!(elapsed >= Duration::from_millis(500), "{elapsed:?}");
        assert!(
            elapsed < Duration::from_millis(500) + KILL_GRACE,
            "{elapsed:?}"
        );
        assert_dies(state.path(), &["pid", "child"]).await;
    }

    #[tokio::test]
    async fn dropping_the_call_kills_the_process_group() {
        let (ssgm, state) = fake("sleep", Duration::from_secs(30));
        let cancelled = tokio::time::timeout(Duration::from_millis(500), ssgm.alloc(1)).await;
        assert!(cancelled.is_err(), "{cancelled:?}");
        assert_dies(state.path(), &["pid", "child"]).await;
    }

    #[tokio::test]
    async fn term_ignoring_alloc_is_killed_after_the_grace() {
        let (ssgm, state) = fake("ignore-term", Duration::from_millis(300));
        let started = Instant::now();
        let err = ssgm.alloc(1).await.expect_err("must time out");
        let elapsed = started.elapsed();
        assert!(err.is_timeout(), "{err:?}");
        assert!(
            elapsed >= Duration::from_millis(300) + KILL_GRACE,
            "{elapsed:?}"
        );
        assert!(
            elapsed < Duration::from_millis(300) + KILL_GRACE * 2,
            "{elapsed:?}"
        );
        assert_dies(state.path(), &["pid"]).await;
    }

    #[tokio::test]
    async fn failing_alloc_reports_status_and_stderr() {
        let (ssgm, _state) = fake("boom", Duration::from_secs(10));
        let err = ssgm.alloc(1).await.expect_err("must fail");
        let SchedulerError::Failed {
            action,
            status,
            stderr,
        } = &err
        else {
            panic!("expected Failed, got {err:?}");
        };
        assert_eq!(*action, "-alloc");
        assert_eq!(status.code(), Some(3));
        assert_eq!(stderr, "boom");
        assert_eq!(
            err.to_string(),
            "ssgm -alloc exited with exit status: 3: boom"
        );
        assert!(!err.is_timeout());
    }

    #[tokio::test]
    async fn silent_failure_says_no_output() {
        let (ssgm, _state) = fake("exit-1-silent", Duration::from_secs(10));
        let err = ssgm.alloc(1).await.expect_err("must fail");
        assert!(
            matches!(&err, SchedulerError::Failed { stderr, .. } if stderr == "no output"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn failed_alloc_that_printed_a_grant_is_released() {
        let (ssgm, state) = fake("grant-exit-1", Duration::from_secs(10));
        let err = ssgm
            .alloc(1)
            .await
            .expect_err("non-zero exit is never a grant");
        assert!(
            matches!(&err, SchedulerError::Failed { stderr, .. }
                if stderr.starts_with("stdout: SSGM_ERROR=0;SSGM_JOB=77;")),
            "{err:?}"
        );
        let dealloc = read(state.path().join("dealloc"));
        assert!(dealloc.ends_with("-dealloc\n-j\n77\n"), "{dealloc}");
    }

    #[tokio::test]
    async fn timed_out_alloc_that_printed_a_grant_is_released() {
        let (ssgm, state) = fake("grant-then-hang", Duration::from_millis(500));
        let err = ssgm.alloc(1).await.expect_err("must time out");
        assert!(err.is_timeout(), "{err:?}");
        let dealloc = read(state.path().join("dealloc"));
        assert!(dealloc.ends_with("-dealloc\n-j\n78\n"), "{dealloc}");
    }

    #[tokio::test]
    async fn broken_reply_with_a_job_id_is_released() {
        let (ssgm, state) = fake("grant-broken", Duration::from_secs(10));
        let err = ssgm.alloc(1).await.expect_err("broken reply");
        assert!(
            matches!(
                &err,
                SchedulerError::BadReply {
                    source: ReplyError::NoEquals { index: 2, .. },
                    ..
                }
            ),
            "{err:?}"
        );
        let dealloc = read(state.path().join("dealloc"));
        assert!(dealloc.ends_with("-dealloc\n-j\n79\n"), "{dealloc}");
    }

    #[tokio::test]
    async fn unreadable_reply_is_bad_reply() {
        let (ssgm, _state) = fake("garbage", Duration::from_secs(10));
        let err = ssgm.alloc(1).await.expect_err("garbage");
        let SchedulerError::BadReply { source, stdout } = &err else {
            panic!("expected BadReply, got {err:?}");
        };
        assert!(matches!(source, ReplyError::NoEquals { index: 0, .. }));
        assert_eq!(stdout, "Segmentation fault (core dumped)");
    }

    #[tokio::test]
    async fn dealloc_is_retried_until_it_succeeds() {
        let (ssgm, state) = fake("fail-twice", Duration::from_secs(10));
        ssgm.dealloc("9").await.expect("third attempt succeeds");
        assert_eq!(read(state.path().join("count")).trim(), "3");
    }

    #[tokio::test]
    async fn dealloc_gives_up_after_the_attempts() {
        let (ssgm, state) = fake("always-fail", Duration::from_secs(10));
        let started = Instant::now();
        let err = ssgm.dealloc("9").await.expect_err("never succeeds");
        assert_eq!(read(state.path().join("count")).trim(), "3");
        // Delays are 20 ms then 40 ms.
        assert!(started.elapsed() >= Duration::from_millis(60));
        let SchedulerError::ReleaseFailed {
            job,
            attempts,
            last,
        } = &err
        else {
            panic!("expected ReleaseFailed, got {err:?}");
        };
        assert_eq!(job, "9");
        assert_eq!(*attempts, 3);
        assert!(
            matches!(&**last, SchedulerError::Failed { stderr, .. } if stderr == "no such job"),
            "{last:?}"
        );
        assert_eq!(
            err.to_string(),
            "failed to release scheduler job 9 after 3 attempts"
        );
        assert!(!err.is_timeout());
    }

    #[tokio::test]
    async fn dealloc_timeouts_are_reported_as_such() {
        let (mut ssgm, _state) = fake("sleep", Duration::from_millis(200));
        ssgm.config.release_attempts = 1;
        let err = ssgm.dealloc("9").await.expect_err("hangs");
        assert!(
            matches!(&err, SchedulerError::ReleaseFailed { attempts: 1, .. }),
            "{err:?}"
        );
        assert!(err.is_timeout());
    }

    #[tokio::test]
    async fn missing_program_is_spawn_error() {
        let config = SsgmConfig::new("/nonexistent/ssgm", "localhost", 1);
        let err = Ssgm::new(config).alloc(1).await.expect_err("cannot start");
        assert!(
            matches!(&err, SchedulerError::Spawn { program, source }
                if program == Path::new("/nonexistent/ssgm")
                    && source.kind() == std::io::ErrorKind::NotFound),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "failed to start ssgm /nonexistent/ssgm");
    }

    #[tokio::test]
    async fn megabytes_of_output_do_not_hang() {
        let (ssgm, _state) = fake("chatty", Duration::from_secs(20));
        let err = ssgm.alloc(1).await.expect_err("not a reply");
        let SchedulerError::BadReply { stdout, .. } = &err else {
            panic!("expected BadReply, got {err:?}");
        };
        assert!(stdout.starts_with("xxx") && stdout.ends_with('…'));
        assert_eq!(stdout.chars().count(), ERROR_OUTPUT_MAX_CHARS + 1);

        let (ssgm, _state) = fake("chatty-fail", Duration::from_secs(20));
        let err = ssgm.alloc(1).await.expect_err("exit 1");
        assert!(
            matches!(&err, SchedulerError::Failed { stderr, .. }
                if stderr.starts_with("yyy") && stderr.chars().count() == ERROR_OUTPUT_MAX_CHARS + 1),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn read_capped_keeps_the_head_and_drains_the_rest() {
        let data = vec![b'a'; OUTPUT_CAP * 3 + 5];
        let mut buf = Vec::new();
        read_capped(&data[..], &mut buf).await.expect("read");
        assert_eq!(buf.len(), OUTPUT_CAP);
    }
}
