//! What a claim object says: who holds it (`Owner`), the job's record it carries (the
//! holder's message, the grant, the function's start, the serverless job) and the JSON
//! body they are stored as. Part of `claim`, which reads and writes them.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::SERVERLESS_HOST;

/// Who holds a claim: enough for an operator to find the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Owner {
    pub(crate) host: String,
    pub(crate) pid: u32,
    /// When that process started (unix seconds): a pid alone is reused.
    pub(crate) started_unix: u64,
    /// The kernel boot and pid namespace the pid belongs to (empty when unknown): only a
    /// process that shares both can tell whether the owner is still alive.
    #[serde(default)]
    pub(crate) pid_space: String,
}

impl Owner {
    /// The holder of a parked serverless claim: no process. Its claim holds until its
    /// function's result deadline, when the schedule (or any daemon) takes it over.
    pub(crate) fn serverless() -> Owner {
        Owner {
            host: SERVERLESS_HOST.to_string(),
            pid: 0,
            started_unix: 0,
            pid_space: String::new(),
        }
    }

    /// Whether this is the holder of a parked serverless claim.
    pub(crate) fn is_serverless(&self) -> bool {
        self.host == SERVERLESS_HOST && self.pid == 0
    }

    /// This process.
    pub(crate) fn this_process() -> Owner {
        // The kernel's host name (what gethostname returns), without a new dependency.
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown".to_string());
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok();
        let namespace = std::fs::read_link("/proc/self/ns/pid").ok();
        let pid_space = match (boot, namespace) {
            (Some(boot), Some(ns)) => format!("{}/{}", boot.trim(), ns.display()),
            _ => String::new(),
        };
        // Debug builds only: tests play daemons of several hosts on one machine.
        #[cfg(debug_assertions)]
        let pid_space = std::env::var("ORCHGPU_DEBUG_PID_SPACE").unwrap_or(pid_space);
        Owner {
            host,
            pid: std::process::id(),
            started_unix: crate::unix_now_ms() / 1000,
            pid_space,
        }
    }

    /// Whether `other` is a process of our own pid space that no longer exists: a daemon
    /// on this machine that was killed or crashed. Its claims need not wait for their
    /// lease. A reused pid only makes us wait for the lease, which is safe.
    pub(super) fn is_dead_neighbour(&self, other: &Owner) -> bool {
        if self.pid_space.is_empty() || self.pid_space != other.pid_space || *self == *other {
            return false;
        }
        let Ok(pid) = i32::try_from(other.pid) else {
            return false;
        };
        matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        )
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{} (started {})",
            self.host, self.pid, self.started_unix
        )
    }
}

/// What a claim records of its job beyond who holds it: what a successor needs to finish
/// the holder's work.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct JobRecord {
    /// The SQS message id the holder works from: a copy with another id is a duplicate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) message_id: Option<String>,
    /// GPUs granted for the job and not released; written before the bundle is uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) grant: Option<RecordedGrant>,
    /// Set just before the bundle upload: from then on the function may be running on the
    /// grant, which is released only after its result or its deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) function: Option<FunctionStarted>,
    /// Lambda mode: what the job's only record must hold once the jobs handler returned
    /// (its SQS record is gone then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) serverless: Option<ServerlessRecord>,
}

/// What a serverless job's claim carries beyond the daemon's record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ServerlessRecord {
    /// The S3 event (one record, this object) to send back to the jobs queue when the job
    /// must run again.
    pub(crate) event: String,
    /// How many times the job was started (sent to a jobs handler), this time included.
    pub(crate) attempts: u32,
    /// The Lambda request id of the invocation that last wrote the claim.
    #[serde(default)]
    pub(crate) request_id: String,
    /// Set just before the `-alloc` call (unix milliseconds), cleared with it: an intent
    /// without a grant in a claim whose holder died means a grant may have been printed
    /// and lost with the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) alloc_started_unix_ms: Option<u64>,
    /// `-dealloc` attempts at the recorded grant that failed in a row (the grant stays
    /// recorded until one is confirmed; see `lambda::finish`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) release_failures: u32,
    /// When the first of those failed (unix milliseconds): the give-up rule counts from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) release_failing_since_unix_ms: Option<u64>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl JobRecord {
    /// Whether the record holds anything a successor must take care of.
    pub(crate) fn holds_gpus(&self) -> bool {
        self.grant.is_some() || self.function.is_some()
    }
}

/// A grant as the claim records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RecordedGrant {
    /// `host:port` of the scheduler that granted it.
    pub(crate) scheduler: String,
    pub(crate) scheduler_job_id: String,
    #[serde(default)]
    pub(crate) devices: Vec<String>,
    /// When it was granted (unix seconds).
    #[serde(default)]
    pub(crate) since_unix: u64,
}

/// The bundle went (or was about to go) to the function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FunctionStarted {
    /// When the upload began (unix milliseconds).
    pub(crate) started_unix_ms: u64,
    /// After this (unix milliseconds) no result is waited for any more.
    pub(crate) result_deadline_unix_ms: u64,
}

/// The claim object's body (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct ClaimBody {
    pub(super) version: u32,
    pub(super) job_id: String,
    pub(super) owner: Owner,
    /// Until when the claim holds (unix milliseconds); 0 once released.
    pub(super) expires_unix_ms: u64,
    #[serde(flatten)]
    pub(super) record: JobRecord,
}
