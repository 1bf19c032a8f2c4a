//! The SSGM command-line client, run as a child process, behind the
//! [`GpuScheduler`] trait.
//!
//! This module owns how SSGM is called: the exact argv (never a shell), the
//! per-call timeout and the killing of a hung client and its process group,
//! the capture of its output into files, the reading of the `-alloc` reply
//! (through [`super::reply`]), and the settling of a client that a previous
//! run of orchgpu left behind. It makes one attempt per call: retries, what a
//! busy or refused allocation means for a job, and remembering what is held
//! belong to `reservations`.
//!
//! An `-alloc` client writes its stdout and stderr into the files the caller
//! names ([`CallFiles`], in the state directory), not into a pipe, and runs in
//! its own process group: if orchgpu dies while the client runs, the client
//! finishes (or hangs) on its own and its reply stays on disk, where the next
//! start reads it ([`GpuScheduler::settle_orphan`]).

use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use super::reply::{
    AllocReply, ReplyError, find_granted_job_id, parse_alloc_reply, truncate_chars,
};

/// The most bytes read of each of a call's stdout and stderr; the rest is ignored.
pub(crate) const OUTPUT_CAP: usize = 64 * 1024;

/// How long a timed-out call gets between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// How many characters of SSGM's output an error keeps.
const ERROR_OUTPUT_MAX_CHARS: usize = 300;

/// How often a client left by a previous run is checked for having exited.
const ORPHAN_POLL: Duration = Duration::from_millis(200);

/// Where one `-alloc` call writes its output. The files outlive orchgpu: they are how
/// a reply printed while orchgpu was being killed is found again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallFiles {
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl CallFiles {
    /// The two files of call `id` in `dir`.
    pub fn in_dir(dir: &Path, id: &str) -> CallFiles {
        CallFiles {
            stdout: dir.join(format!("{id}.out")),
            stderr: dir.join(format!("{id}.err")),
        }
    }

    /// Removes both files; ones already gone are fine.
    pub fn remove(&self) {
        for path in [&self.stdout, &self.stderr] {
            if let Err(e) = std::fs::remove_file(path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "Cannot remove an SSGM output file.");
            }
        }
    }
}

/// What the daemon needs from a GPU scheduler.
///
/// The daemon is generic over it (`S: GpuScheduler + Send + Sync + 'static`),
/// so tests can put a fake in place of [`Ssgm`].
pub trait GpuScheduler {
    /// Asks for `gpus` GPUs for one job, once; the client's output goes to `call`.
    ///
    /// `Ok` carries the scheduler's answer, which may be a refusal
    /// ([`AllocReply::Busy`], [`AllocReply::RequestError`]); `Err` means no
    /// answer could be had. [`SchedulerError::StrayGrant`] means the call failed
    /// although the scheduler printed a grant: that job must be released.
    fn alloc(
        &self,
        gpus: u32,
        call: &CallFiles,
    ) -> impl Future<Output = Result<AllocReply, SchedulerError>> + Send;

    /// Gives back the GPUs held for `scheduler_job_id`, once.
    fn dealloc(
        &self,
        scheduler_job_id: &str,
    ) -> impl Future<Output = Result<(), SchedulerError>> + Send;

    /// Settles an `-alloc` call that a previous run started at `started` and never
    /// finished reading: waits until the call's timeout has passed if its client still
    /// runs, kills it, and returns the scheduler job id its output shows granted.
    fn settle_orphan(
        &self,
        call: &CallFiles,
        started: SystemTime,
    ) -> impl Future<Output = Option<String>> + Send;
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
    /// Where the output of `-dealloc` runs goes (temporary files).
    pub scratch_dir: PathBuf,
}

impl SsgmConfig {
    /// Default for [`SsgmConfig::call_timeout`].
    pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

    /// A configuration with the default timeout and the temp dir as scratch.
    pub fn new(program: impl Into<PathBuf>, host: impl Into<String>, port: u16) -> Self {
        Self {
            program: program.into(),
            host: host.into(),
            port,
            call_timeout: Self::DEFAULT_CALL_TIMEOUT,
            scratch_dir: std::env::temp_dir(),
        }
    }

    /// The longest one call can take: its timeout, then the kill grace.
    pub fn worst_call(&self) -> Duration {
        self.call_timeout + KILL_GRACE
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
    /// `-alloc` failed (for the reason in `source`) after its output showed a grant:
    /// the scheduler may hold GPUs for `job`, which must be released.
    #[error("ssgm -alloc failed after granting scheduler job {job}")]
    StrayGrant {
        /// The scheduler job id the output named.
        job: String,
        /// Why the call is not a grant.
        #[source]
        source: Box<SchedulerError>,
    },
    /// Creating, writing or reading SSGM's output files, or waiting for it, failed.
    #[error("failed to run ssgm")]
    Io(#[source] std::io::Error),
}

impl SchedulerError {
    /// Whether SSGM was killed for taking too long.
    #[must_use]
    pub fn is_timeout(&self) -> bool {
        match self {
            Self::Timeout { .. } => true,
            Self::StrayGrant { source, .. } => source.is_timeout(),
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

    /// Runs `<program> -S <host> -P <port> -alloc -g <gpus>` once, its output going
    /// to `call`.
    ///
    /// A non-zero exit is never taken as a grant, even when stdout holds a
    /// well-formed reply. Whenever the call does not return a grant but its
    /// stdout shows one (a non-zero exit, a call killed at the timeout after
    /// printing, a reply broken after its job id), the error is
    /// [`SchedulerError::StrayGrant`], naming the job to release.
    ///
    /// # Errors
    ///
    /// [`SchedulerError::Spawn`], [`SchedulerError::Timeout`],
    /// [`SchedulerError::Failed`], [`SchedulerError::BadReply`],
    /// [`SchedulerError::StrayGrant`] or [`SchedulerError::Io`].
    ///
    /// # Cancel safety
    ///
    /// Dropping the future kills SSGM's process group; whatever it printed
    /// stays in `call`'s files.
    pub async fn alloc(&self, gpus: u32, call: &CallFiles) -> Result<AllocReply, SchedulerError> {
        const ACTION: &str = "-alloc";
        let gpus = gpus.to_string();
        let (stdout, error) = match self.run(ACTION, &[ACTION, "-g", &gpus], call).await? {
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
        Err(match find_granted_job_id(&stdout) {
            Some(job) => SchedulerError::StrayGrant {
                job: job.to_owned(),
                source: Box::new(error),
            },
            None => error,
        })
    }

    /// Runs `<program> -S <host> -P <port> -dealloc -j <id>` once; success is exit
    /// status 0.
    ///
    /// # Errors
    ///
    /// [`SchedulerError::Spawn`], [`SchedulerError::Timeout`],
    /// [`SchedulerError::Failed`] or [`SchedulerError::Io`].
    ///
    /// # Cancel safety
    ///
    /// Dropping the future kills a running attempt; the job may or may not
    /// have been released, and releasing it again is the way to find out.
    pub async fn dealloc(&self, scheduler_job_id: &str) -> Result<(), SchedulerError> {
        const ACTION: &str = "-dealloc";
        let scratch = |what| {
            tempfile::Builder::new()
                .prefix(&format!("ssgm-dealloc-{what}-"))
                .tempfile_in(&self.config.scratch_dir)
                .map_err(SchedulerError::Io)
        };
        let (stdout, stderr) = (scratch("out")?, scratch("err")?);
        let files = CallFiles {
            stdout: stdout.path().to_path_buf(),
            stderr: stderr.path().to_path_buf(),
        };
        match self
            .run(ACTION, &[ACTION, "-j", scheduler_job_id], &files)
            .await?
        {
            Outcome::Exited(out) if out.status.success() => Ok(()),
            Outcome::Exited(out) => Err(out.into_failed(ACTION)),
            Outcome::TimedOut { .. } => Err(SchedulerError::Timeout {
                action: ACTION,
                timeout: self.config.call_timeout,
            }),
        }
    }

    /// See [`GpuScheduler::settle_orphan`]. The client is recognised by the file its
    /// stdout is open on, which no other process has open: a reused pid cannot fool it.
    pub async fn settle_orphan(&self, call: &CallFiles, started: SystemTime) -> Option<String> {
        let clients = processes_writing_to(&call.stdout);
        if !clients.is_empty() {
            let deadline = started + self.config.call_timeout;
            let left = deadline
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tracing::warn!(
                pids = ?clients.iter().map(|p| p.as_raw()).collect::<Vec<_>>(),
                stdout = %call.stdout.display(),
                wait_ms = left.as_millis() as u64,
                "An SSGM client left by a previous run still runs; waiting out its timeout."
            );
            let until = tokio::time::Instant::now() + left;
            while tokio::time::Instant::now() < until && clients.iter().any(|p| is_running(*p)) {
                tokio::time::sleep(ORPHAN_POLL.min(until - tokio::time::Instant::now())).await;
            }
            for pid in clients.iter().filter(|p| is_running(**p)) {
                let group = GroupGuard { pgid: Some(*pid) };
                group.signal(Signal::SIGTERM);
                let until = tokio::time::Instant::now() + KILL_GRACE;
                while is_running(*pid) && tokio::time::Instant::now() < until {
                    tokio::time::sleep(ORPHAN_POLL).await;
                }
                group.signal(Signal::SIGKILL);
                tracing::warn!(
                    pid = pid.as_raw(),
                    "Killed an SSGM client left by a previous run."
                );
            }
        }
        let stdout = read_capped(&call.stdout).unwrap_or_default();
        find_granted_job_id(&stdout).map(str::to_owned)
    }

    /// Runs SSGM with `-S <host> -P <port>` and then `args`, its output going to
    /// `files`, killing its process group if it outlives the call timeout.
    async fn run(
        &self,
        action: &'static str,
        args: &[&str],
        files: &CallFiles,
    ) -> Result<Outcome, SchedulerError> {
        let config = &self.config;
        let started = Instant::now();
        let create = |path: &Path| std::fs::File::create(path).map_err(SchedulerError::Io);
        let mut command = Command::new(&config.program);
        command
            .arg("-S")
            .arg(&config.host)
            .arg("-P")
            .arg(config.port.to_string())
            .args(args)
            .stdin(Stdio::null())
            .stdout(create(&files.stdout)?)
            .stderr(create(&files.stderr)?)
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
        let finished = tokio::time::timeout(config.call_timeout, child.wait()).await;
        let read = |path: &Path| read_capped(path).map_err(SchedulerError::Io);
        let outcome = match finished {
            Ok(Ok(status)) => Outcome::Exited(Output {
                status,
                stdout: read(&files.stdout)?,
                stderr: read(&files.stderr)?,
            }),
            Ok(Err(e)) => {
                group.kill(&mut child).await;
                group.disarm();
                return Err(SchedulerError::Io(e));
            }
            Err(_elapsed) => {
                tracing::warn!(
                    action,
                    timeout_ms = config.call_timeout.as_millis(),
                    "SSGM call timed out, killing it."
                );
                group.terminate(&mut child).await;
                Outcome::TimedOut {
                    stdout: read(&files.stdout)?,
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
    async fn alloc(&self, gpus: u32, call: &CallFiles) -> Result<AllocReply, SchedulerError> {
        Ssgm::alloc(self, gpus, call).await
    }

    async fn dealloc(&self, scheduler_job_id: &str) -> Result<(), SchedulerError> {
        Ssgm::dealloc(self, scheduler_job_id).await
    }

    async fn settle_orphan(&self, call: &CallFiles, started: SystemTime) -> Option<String> {
        Ssgm::settle_orphan(self, call, started).await
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

/// The first [`OUTPUT_CAP`] bytes of a file, as text; a missing file reads as empty.
fn read_capped(path: &Path) -> std::io::Result<String> {
    let mut buf = Vec::new();
    match std::fs::File::open(path) {
        Ok(file) => {
            file.take(OUTPUT_CAP as u64).read_to_end(&mut buf)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The processes whose stdout is `path`.
fn processes_writing_to(path: &Path) -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/fd/1")).is_ok_and(|target| target == path)
        })
        .map(Pid::from_raw)
        .collect()
}

/// Whether `pid` is a live process (a zombie counts as dead).
fn is_running(pid: Pid) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
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
            scratch_dir: state.path().to_path_buf(),
        };
        (Ssgm::new(config), state)
    }

    /// The output files of one `-alloc` call in `state`.
    fn call(state: &tempfile::TempDir) -> CallFiles {
        CallFiles::in_dir(state.path(), "call-1")
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
        let reply = ssgm.alloc(2, &call(&state)).await.expect("granted");
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
        async fn via<S: GpuScheduler + Send + Sync + 'static>(s: S, dir: &Path) -> AllocReply {
            let files = CallFiles::in_dir(dir, "orchgpu-trait-test");
            let fut = tokio::spawn(async move { s.alloc(1, &files).await });
            fut.await.expect("task").expect("reply")
        }
        let (ssgm, state) = fake("busy", Duration::from_secs(10));
        assert_eq!(via(ssgm, state.path()).await, AllocReply::Busy);
        drop(state);
    }

    #[tokio::test]
    async fn hung_alloc_is_killed_at_the_timeout() {
        let (ssgm, state) = fake("sleep", Duration::from_millis(500));
        let started = Instant::now();
        let err = ssgm
            .alloc(1, &call(&state))
            .await
            .expect_err("must time out");
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
        let cancelled =
            tokio::time::timeout(Duration::from_millis(500), ssgm.alloc(1, &call(&state))).await;
        assert!(cancelled.is_err(), "{cancelled:?}");
        assert_dies(state.path(), &["pid", "child"]).await;
    }

    #[tokio::test]
    async fn term_ignoring_alloc_is_killed_after_the_grace() {
        let (ssgm, state) = fake("ignore-term", Duration::from_millis(300));
        let started = Instant::now();
        let err = ssgm
            .alloc(1, &call(&state))
            .await
            .expect_err("must time out");
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
        let (ssgm, state) = fake("boom", Duration::from_secs(10));
        let err = ssgm.alloc(1, &call(&state)).await.expect_err("must fail");
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
        let (ssgm, state) = fake("exit-1-silent", Duration::from_secs(10));
        let err = ssgm.alloc(1, &call(&state)).await.expect_err("must fail");
        assert!(
            matches!(&err, SchedulerError::Failed { stderr, .. } if stderr == "no output"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn failed_alloc_that_printed_a_grant_names_it() {
        let (ssgm, state) = fake("grant-exit-1", Duration::from_secs(10));
        let err = ssgm
            .alloc(1, &call(&state))
            .await
            .expect_err("non-zero exit is never a grant");
        let SchedulerError::StrayGrant { job, source } = &err else {
            panic!("expected StrayGrant, got {err:?}");
        };
        assert_eq!(job, "77");
        assert!(
            matches!(&**source, SchedulerError::Failed { stderr, .. }
                if stderr.starts_with("stdout: SSGM_ERROR=0;SSGM_JOB=77;")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn timed_out_alloc_that_printed_a_grant_names_it() {
        let (ssgm, state) = fake("grant-then-hang", Duration::from_millis(500));
        let err = ssgm
            .alloc(1, &call(&state))
            .await
            .expect_err("must time out");
        assert!(err.is_timeout(), "{err:?}");
        assert!(
            matches!(&err, SchedulerError::StrayGrant { job, .. } if job == "78"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn broken_reply_with_a_job_id_names_it() {
        let (ssgm, state) = fake("grant-broken", Duration::from_secs(10));
        let err = ssgm
            .alloc(1, &call(&state))
            .await
            .expect_err("broken reply");
        let SchedulerError::StrayGrant { job, source } = &err else {
            panic!("expected StrayGrant, got {err:?}");
        };
        assert_eq!(job, "79");
        assert!(
            matches!(
                &**source,
                SchedulerError::BadReply {
                    source: ReplyError::NoEquals { index: 2, .. },
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn unreadable_reply_is_bad_reply() {
        let (ssgm, state) = fake("garbage", Duration::from_secs(10));
        let err = ssgm.alloc(1, &call(&state)).await.expect_err("garbage");
        let SchedulerError::BadReply { source, stdout } = &err else {
            panic!("expected BadReply, got {err:?}");
        };
        assert!(matches!(source, ReplyError::NoEquals { index: 0, .. }));
        assert_eq!(stdout, "Segmentation fault (core dumped)");
    }

    #[tokio::test]
    async fn dealloc_is_one_attempt_with_its_stderr() {
        let (ssgm, state) = fake("always-fail", Duration::from_secs(10));
        let err = ssgm.dealloc("9").await.expect_err("fails");
        assert_eq!(read(state.path().join("count")).trim(), "1");
        assert!(
            matches!(&err, SchedulerError::Failed { action: "-dealloc", stderr, .. } if stderr == "no such job"),
            "{err:?}"
        );
        assert!(!err.is_timeout());
    }

    #[tokio::test]
    async fn dealloc_timeouts_are_reported_as_such() {
        let (ssgm, _state) = fake("sleep", Duration::from_millis(200));
        let err = ssgm.dealloc("9").await.expect_err("hangs");
        assert!(
            matches!(
                &err,
                SchedulerError::Timeout {
                    action: "-dealloc",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.is_timeout());
    }

    #[tokio::test]
    async fn dealloc_leaves_no_scratch_files() {
        let (ssgm, state) = fake("grant", Duration::from_secs(10));
        ssgm.dealloc("1").await.expect("released");
        let left: Vec<_> = std::fs::read_dir(state.path())
            .expect("list")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("ssgm-dealloc"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// Starts `script` the way a killed orchgpu would have left it: in its own process
    /// group, its output going to `files`, not our child to wait for.
    fn start_orphan(
        script: &str,
        state: &tempfile::TempDir,
        files: &CallFiles,
    ) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        std::process::Command::new(scripts().join(script))
            .args([
                "-S",
                state.path().to_str().expect("utf-8"),
                "-P",
                "1",
                "-alloc",
                "-g",
                "1",
            ])
            .stdout(std::fs::File::create(&files.stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&files.stderr).expect("stderr file"))
            .process_group(0)
            .spawn()
            .expect("spawn orphan")
    }

    #[tokio::test]
    async fn a_finished_orphan_call_gives_its_grant() {
        let (ssgm, state) = fake("grant", Duration::from_secs(10));
        let files = call(&state);
        let mut child = start_orphan("grant", &state, &files);
        child.wait().expect("wait");
        let started = SystemTime::now();
        let job = ssgm.settle_orphan(&files, started).await;
        assert_eq!(job.as_deref(), Some("42"));
    }

    #[tokio::test]
    async fn a_hung_orphan_is_waited_out_then_killed_and_its_grant_read() {
        let (ssgm, state) = fake("grant-then-hang", Duration::from_millis(800));
        let files = call(&state);
        let started = SystemTime::now();
        let mut child = start_orphan("grant-then-hang", &state, &files);
        // Give it time to print before it is looked at.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let timer = Instant::now();
        let job = ssgm.settle_orphan(&files, started).await;
        assert_eq!(job.as_deref(), Some("78"));
        let elapsed = timer.elapsed();
        assert!(
            elapsed >= Duration::from_millis(500),
            "not waited out: {elapsed:?}"
        );
        assert!(
            elapsed < Duration::from_millis(800) + KILL_GRACE,
            "{elapsed:?}"
        );
        // Killed: reaping it returns at once with a signal.
        let status = child.wait().expect("wait");
        assert!(status.code().is_none(), "{status:?}");
    }

    #[tokio::test]
    async fn an_orphan_call_without_output_gives_nothing() {
        let (ssgm, state) = fake("busy", Duration::from_secs(1));
        let files = call(&state);
        assert_eq!(ssgm.settle_orphan(&files, SystemTime::now()).await, None);
        let mut child = start_orphan("busy", &state, &files);
        child.wait().expect("wait");
        assert_eq!(ssgm.settle_orphan(&files, SystemTime::now()).await, None);
    }

    #[tokio::test]
    async fn missing_program_is_spawn_error() {
        let state = tempfile::tempdir().expect("state dir");
        let config = SsgmConfig::new("/nonexistent/ssgm", "localhost", 1);
        let err = Ssgm::new(config)
            .alloc(1, &call(&state))
            .await
            .expect_err("cannot start");
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
        let (ssgm, state) = fake("chatty", Duration::from_secs(20));
        let err = ssgm.alloc(1, &call(&state)).await.expect_err("not a reply");
        let SchedulerError::BadReply { stdout, .. } = &err else {
            panic!("expected BadReply, got {err:?}");
        };
        assert!(stdout.starts_with("xxx") && stdout.ends_with('…'));
        assert_eq!(stdout.chars().count(), ERROR_OUTPUT_MAX_CHARS + 1);

        let (ssgm, state) = fake("chatty-fail", Duration::from_secs(20));
        let err = ssgm.alloc(1, &call(&state)).await.expect_err("exit 1");
        assert!(
            matches!(&err, SchedulerError::Failed { stderr, .. }
                if stderr.starts_with("yyy") && stderr.chars().count() == ERROR_OUTPUT_MAX_CHARS + 1),
            "{err:?}"
        );
    }

    #[test]
    fn read_capped_keeps_the_head() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("out");
        std::fs::write(&path, vec![b'a'; OUTPUT_CAP * 3 + 5]).expect("write");
        assert_eq!(read_capped(&path).expect("read").len(), OUTPUT_CAP);
        assert_eq!(read_capped(&dir.path().join("missing")).expect("read"), "");
    }
}
