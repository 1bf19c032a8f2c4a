//! The cross-daemon claim of a job id: a small S3 object that says which daemon runs a
//! job and until when.
//!
//! This module owns the claim object's life: creating it with a conditional write
//! (`PutObject` with `If-None-Match: *`, so of two daemons exactly one wins), renewing it
//! while the job runs (`If-Match` on its ETag, so a daemon that lost its claim notices),
//! taking over an expired or released one (`If-Match` again, so of two late comers exactly
//! one wins), and giving it back. A finished job's claim is deleted; a failed job's is
//! marked released with `If-Match` (S3 emulators refuse a conditional `DeleteObject`), so
//! a retry takes it over at once instead of waiting for the lease.
//!
//! It leaves to others what a claim means for the message (`job::JobError::disposition`)
//! and when to check for a result (`job`). The expiry is wall-clock time, shared across
//! hosts: the hosts' clocks must agree to well under a lease (NTP does).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::primitives::ByteStream;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
/// A stored claim object: its ETag and body.
type Stored = (String, Vec<u8>);

/// Longest wait between renewal attempts after one failed for a reason that may pass.
const RENEW_RETRY: Duration = Duration::from_secs(1);
/// Attempts at creating or taking over a claim that keeps changing under us.
const ACQUIRE_ATTEMPTS: usize = 3;
/// Claim bodies are written by orchgpu; anything larger is not one of ours.
const MAX_BODY: usize = 4096;

/// A claim store's failure (S3 unreachable, access denied...).
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("failed to {op} the claim s3://{bucket}/{key}")]
    Store {
        op: &'static str,
        bucket: String,
        key: String,
        #[source]
        source: BoxError,
    },
}

/// The outcome of a conditional write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Put {
    /// Written; the object's new ETag.
    Written(String),
    /// The condition did not hold (412 `PreconditionFailed`, 409
    /// `ConditionalRequestConflict`, or no object for `If-Match`).
    Conflict,
}

/// Where claims are kept: four conditional operations on one key each. `S3Store` is the
/// real one; tests use an in-memory store.
pub trait ClaimStore: Send + Sync {
    /// Writes `body` at `key` only if no object is there (`If-None-Match: *`).
    fn create<'a>(&'a self, key: &'a str, body: Vec<u8>) -> BoxFuture<'a, Result<Put, ClaimError>>;
    /// Writes `body` at `key` only if the object there has ETag `etag` (`If-Match`).
    fn replace<'a>(
        &'a self,
        key: &'a str,
        etag: &'a str,
        body: Vec<u8>,
    ) -> BoxFuture<'a, Result<Put, ClaimError>>;
    /// Reads the object at `key`: its ETag and body, or `None` when there is none.
    fn read<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Stored>, ClaimError>>;
    /// Deletes the object at `key`, whatever it holds.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), ClaimError>>;
}

/// Claims as objects of one S3 bucket.
pub struct S3Store {
    s3: aws_sdk_s3::Client,
    bucket: String,
}

impl S3Store {
    pub fn new(s3: aws_sdk_s3::Client, bucket: String) -> S3Store {
        S3Store { s3, bucket }
    }

    fn error(&self, op: &'static str, key: &str, source: BoxError) -> ClaimError {
        ClaimError::Store {
            op,
            bucket: self.bucket.clone(),
            key: key.to_string(),
            source,
        }
    }

    async fn put(
        &self,
        key: &str,
        condition: Condition<'_>,
        body: Vec<u8>,
    ) -> Result<Put, ClaimError> {
        let request = self
            .s3
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/json")
            .body(ByteStream::from(body));
        let request = match condition {
            Condition::Absent => request.if_none_match("*"),
            Condition::Matches(etag) => request.if_match(quoted(etag)),
        };
        match request.send().await {
            Ok(output) => Ok(Put::Written(unquoted(
                output.e_tag.as_deref().unwrap_or(""),
            ))),
            Err(SdkError::ServiceError(e)) if is_conflict(e.raw().status().as_u16()) => {
                Ok(Put::Conflict)
            }
            Err(e) => Err(self.error("write", key, e.into())),
        }
    }
}

enum Condition<'a> {
    Absent,
    Matches(&'a str),
}

/// 412: the condition failed; 409: a concurrent conditional write won; 404: `If-Match`
/// on an object that is gone.
fn is_conflict(status: u16) -> bool {
    matches!(status, 404 | 409 | 412)
}

fn quoted(etag: &str) -> String {
    format!("\"{}\"", unquoted(etag))
}

fn unquoted(etag: &str) -> String {
    etag.trim_matches('"').to_string()
}

impl ClaimStore for S3Store {
    fn create<'a>(&'a self, key: &'a str, body: Vec<u8>) -> BoxFuture<'a, Result<Put, ClaimError>> {
        Box::pin(self.put(key, Condition::Absent, body))
    }

    fn replace<'a>(
        &'a self,
        key: &'a str,
        etag: &'a str,
        body: Vec<u8>,
    ) -> BoxFuture<'a, Result<Put, ClaimError>> {
        Box::pin(self.put(key, Condition::Matches(etag), body))
    }

    fn read<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Stored>, ClaimError>> {
        Box::pin(async move {
            let output = match self
                .s3
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
            {
                Ok(output) => output,
                Err(SdkError::ServiceError(e)) if e.err().is_no_such_key() => return Ok(None),
                Err(e) => return Err(self.error("read", key, e.into())),
            };
            let etag = unquoted(output.e_tag.as_deref().unwrap_or(""));
            let body = output
                .body
                .collect()
                .await
                .map_err(|e| self.error("read", key, e.into()))?
                .into_bytes();
            Ok(Some((etag, body.to_vec())))
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), ClaimError>> {
        Box::pin(async move {
            self.s3
                .delete_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| self.error("delete", key, e.into()))?;
            Ok(())
        })
    }
}

/// Who holds a claim: enough for an operator to find the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub host: String,
    pub pid: u32,
    /// When that process started (unix seconds): a pid alone is reused.
    pub started_unix: u64,
    /// The kernel boot and pid namespace the pid belongs to (empty when unknown): only a
    /// process that shares both can tell whether the owner is still alive.
    #[serde(default)]
    pub pid_space: String,
}

impl Owner {
    /// This process.
    pub fn this_process() -> Owner {
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
        Owner {
            host,
            pid: std::process::id(),
            started_unix: system_unix_ms() / 1000,
            pid_space,
        }
    }

    /// Whether `other` is a process of our own pid space that no longer exists: a daemon
    /// on this machine that was killed or crashed. Its claims need not wait for their
    /// lease. A reused pid only makes us wait for the lease, which is safe.
    fn is_dead_neighbour(&self, other: &Owner) -> bool {
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

/// The claim object's body (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ClaimBody {
    version: u32,
    job_id: String,
    owner: Owner,
    /// Until when the claim holds (unix milliseconds); 0 once released.
    expires_unix_ms: u64,
}

/// Wall-clock time in unix milliseconds. A function so tests can drive it with tokio's
/// paused clock.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

fn system_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The outcome of `Claims::acquire`.
pub enum Acquired {
    /// Ours until we give it up (or fail to renew it).
    Claimed(ClaimGuard),
    /// Another daemon runs this job; its lease runs out in `remaining` unless renewed.
    HeldElsewhere { owner: String, remaining: Duration },
}

struct Shared {
    store: Box<dyn ClaimStore>,
    /// Key prefix: the claims dir with a trailing `/`, or empty for the bucket's root.
    prefix: String,
    lease: Duration,
    owner: Owner,
    clock: Clock,
}

/// Claims of job ids, in one place (bucket and prefix), held by this process.
#[derive(Clone)]
pub struct Claims {
    shared: Arc<Shared>,
}

impl Claims {
    /// Claims under `dir` of the store (empty for its root), each held for `lease`
    /// between renewals.
    pub fn new(store: Box<dyn ClaimStore>, dir: &str, lease: Duration) -> Claims {
        Claims::with_clock(
            store,
            dir,
            lease,
            Owner::this_process(),
            Arc::new(system_unix_ms),
        )
    }

    /// As `new`, with an explicit owner and clock (tests).
    pub fn with_clock(
        store: Box<dyn ClaimStore>,
        dir: &str,
        lease: Duration,
        owner: Owner,
        clock: Clock,
    ) -> Claims {
        let dir = dir.trim_matches('/');
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        Claims {
            shared: Arc::new(Shared {
                store,
                prefix,
                lease,
                owner,
                clock,
            }),
        }
    }

    /// Reads a key that does not exist under the claims dir: a start-up check that the
    /// bucket exists and may be read, so a wrong `--claims` fails at once rather than
    /// sending every job to the dead-letter queue.
    ///
    /// # Errors
    /// `ClaimError` when the store cannot be read.
    pub async fn check(&self) -> Result<(), ClaimError> {
        let probe = format!("{}orchgpu-start-up-check", self.shared.prefix);
        self.shared.store.read(&probe).await.map(|_| ())
    }

    /// The lease: how long a claim holds without renewal.
    pub fn lease(&self) -> Duration {
        self.shared.lease
    }

    /// The claim object's key for a job id.
    pub fn key(&self, job_id: &str) -> String {
        format!("{}{job_id}.claim", self.shared.prefix)
    }

    /// Claims `job_id` for this process: creates the claim, or takes over one that has
    /// expired or was released. Exactly one of several daemons calling this at once gets
    /// `Claimed`.
    ///
    /// # Errors
    /// `ClaimError` when the store cannot be reached; the caller should retry later.
    /// Cancel safety: a claim created by a cancelled call stays until its lease runs out.
    pub async fn acquire(&self, job_id: &str) -> Result<Acquired, ClaimError> {
        let shared = &self.shared;
        let key = self.key(job_id);
        for _ in 0..ACQUIRE_ATTEMPTS {
            let (body, expires) = self.body(job_id);
            if let Put::Written(etag) = shared.store.create(&key, body).await? {
                debug!(claim = %key, "Claim created.");
                return Ok(Acquired::Claimed(self.guard(job_id, key, etag, expires)));
            }
            let Some((etag, current)) = shared.store.read(&key).await? else {
                // Deleted between our write and our read: its job ended; try again.
                continue;
            };
            let now = (shared.clock)();
            let current = parse_body(&current);
            // A live claim of our own process is a leftover (a finished job whose claim
            // could not be deleted): the daemon runs one job per id at a time, so no job
            // of ours holds it now.
            if let Some(body) = &current
                && body.expires_unix_ms > now
                && body.owner != shared.owner
                && !shared.owner.is_dead_neighbour(&body.owner)
            {
                return Ok(Acquired::HeldElsewhere {
                    owner: body.owner.to_string(),
                    remaining: Duration::from_millis(body.expires_unix_ms - now),
                });
            }
            // Expired, released or unreadable: take it over, unless someone else does first.
            let (body, expires) = self.body(job_id);
            match shared.store.replace(&key, &etag, body).await? {
                Put::Written(etag) => {
                    let previous =
                        current.map_or_else(|| "unknown".to_string(), |b| b.owner.to_string());
                    info!(claim = %key, previous_owner = %previous, "Took over an expired claim.");
                    return Ok(Acquired::Claimed(self.guard(job_id, key, etag, expires)));
                }
                Put::Conflict => continue,
            }
        }
        // It kept changing under us: somebody else is busy with it right now.
        Ok(Acquired::HeldElsewhere {
            owner: "unknown (contended)".to_string(),
            remaining: shared.lease,
        })
    }

    /// What the store says about `job_id`'s claim, changing nothing: `None` when there is
    /// no claim object (or one that is not ours to read).
    ///
    /// # Errors
    /// `ClaimError` when the store cannot be reached.
    pub async fn peek(&self, job_id: &str) -> Result<Option<ClaimSeen>, ClaimError> {
        let shared = &self.shared;
        let Some((_, body)) = shared.store.read(&self.key(job_id)).await? else {
            return Ok(None);
        };
        let now = (shared.clock)();
        Ok(parse_body(&body).map(|body| ClaimSeen {
            live: body.expires_unix_ms > now,
            mine: body.owner == shared.owner,
            owner: body.owner.to_string(),
        }))
    }

    fn body(&self, job_id: &str) -> (Vec<u8>, u64) {
        let expires = (self.shared.clock)().saturating_add(duration_ms(self.shared.lease));
        (encode(&self.shared.owner, job_id, expires), expires)
    }

    fn guard(&self, job_id: &str, key: String, etag: String, expires_unix_ms: u64) -> ClaimGuard {
        ClaimGuard {
            claims: self.clone(),
            job_id: job_id.to_string(),
            key,
            etag: Some(etag),
            expires_unix_ms,
        }
    }
}

fn encode(owner: &Owner, job_id: &str, expires_unix_ms: u64) -> Vec<u8> {
    let body = ClaimBody {
        version: 1,
        job_id: job_id.to_string(),
        owner: owner.clone(),
        expires_unix_ms,
    };
    serde_json::to_vec(&body).expect("a struct of strings and numbers always serializes")
}

fn parse_body(bytes: &[u8]) -> Option<ClaimBody> {
    if bytes.len() > MAX_BODY {
        return None;
    }
    serde_json::from_slice::<ClaimBody>(bytes)
        .ok()
        .filter(|body| body.version == 1)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A claim as read by `Claims::peek`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimSeen {
    /// Held (not expired, not released) right now.
    pub live: bool,
    /// Which daemon wrote it.
    pub owner: String,
    /// This very process wrote it.
    pub mine: bool,
}

/// A claim this process holds. End it with `finish` (the job's result exists) or
/// `give_up` (the job did not finish); if it is dropped instead, it is given up in the
/// background.
pub struct ClaimGuard {
    claims: Claims,
    job_id: String,
    key: String,
    /// `None` once the claim was lost or ended.
    etag: Option<String>,
    expires_unix_ms: u64,
}

impl ClaimGuard {
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Runs `work` while renewing the claim every third of the lease; a renewal runs
    /// beside the work, never pausing it. If the claim is lost (another daemon took it
    /// over after a renewal failed to arrive in time), `lost` is cancelled and `work` is
    /// still awaited, so it can stop cleanly. Returns the work's output and whether the
    /// claim was lost.
    ///
    /// Cancel safety: dropping the future drops `work`; the claim stays held.
    pub async fn keep_while<T>(
        &mut self,
        lost: &CancellationToken,
        work: impl Future<Output = T>,
    ) -> (T, bool) {
        tokio::pin!(work);
        let renew_every = self.claims.shared.lease / 3;
        let mut next = tokio::time::Instant::now() + renew_every;
        let mut renewal: Option<BoxFuture<'static, RenewalReply>> = None;
        loop {
            tokio::select! {
                output = &mut work => {
                    // A renewal in flight may already have changed the ETag: learn it, so
                    // that `finish` or `give_up` acts on the claim as it is.
                    if let Some(in_flight) = renewal.take() {
                        self.apply_renewal(in_flight.await);
                    }
                    return (output, self.etag.is_none());
                }
                _ = tokio::time::sleep_until(next), if self.etag.is_some() && renewal.is_none() => {
                    renewal = self.start_renewal();
                }
                reply = reply_of(&mut renewal), if renewal.is_some() => {
                    renewal = None;
                    next = match self.apply_renewal(reply) {
                        Renewal::Renewed => tokio::time::Instant::now() + renew_every,
                        Renewal::Failed => tokio::time::Instant::now() + RENEW_RETRY.min(renew_every),
                        Renewal::Lost => {
                            lost.cancel();
                            next
                        }
                    };
                }
            }
        }
    }

    /// A renewal request that owns what it needs, so it can run beside the work.
    fn start_renewal(&self) -> Option<BoxFuture<'static, RenewalReply>> {
        let etag = self.etag.clone()?;
        let claims = self.claims.clone();
        let (key, job_id) = (self.key.clone(), self.job_id.clone());
        Some(Box::pin(async move {
            let shared = &claims.shared;
            let now = (shared.clock)();
            let expires = now.saturating_add(duration_ms(shared.lease));
            let body = encode(&shared.owner, &job_id, expires);
            let result = shared.store.replace(&key, &etag, body).await;
            RenewalReply {
                result,
                sent_unix_ms: now,
                expires_unix_ms: expires,
            }
        }))
    }

    /// Takes in a renewal's reply: the new ETag and expiry, or the claim lost.
    fn apply_renewal(&mut self, reply: RenewalReply) -> Renewal {
        match reply.result {
            Ok(Put::Written(etag)) => {
                self.etag = Some(etag);
                self.expires_unix_ms = reply.expires_unix_ms;
                debug!(claim = %self.key, "Claim renewed.");
                Renewal::Renewed
            }
            Ok(Put::Conflict) => {
                warn!(claim = %self.key, "Claim lost to another daemon; stopping the job.");
                self.etag = None;
                Renewal::Lost
            }
            Err(e) if reply.sent_unix_ms >= self.expires_unix_ms => {
                // Another daemon may have taken it over by now: stop rather than run twice.
                warn!(claim = %self.key, error = %crate::aws::error_chain(&e), "Claim expired before it could be renewed; stopping the job.");
                self.etag = None;
                Renewal::Lost
            }
            Err(e) => {
                warn!(claim = %self.key, error = %crate::aws::error_chain(&e), "Claim renewal failed; will retry.");
                Renewal::Failed
            }
        }
    }

    /// The job's result exists: deletes the claim. A failed delete is logged; the claim
    /// then expires by itself and a lifecycle rule removes it.
    pub async fn finish(mut self) {
        if self.etag.take().is_none() {
            return;
        }
        let shared = &self.claims.shared;
        if let Err(e) = shared.store.delete(&self.key).await {
            warn!(claim = %self.key, error = %crate::aws::error_chain(&e), "Cannot delete a finished job's claim; it expires by itself.");
        }
    }

    /// The job did not finish: marks the claim released (`If-Match` on our ETag, so a
    /// claim another daemon took over is left alone), for a retry to take over at once.
    pub async fn give_up(mut self) {
        let Some(etag) = self.etag.take() else {
            return;
        };
        give_up(&self.claims, &self.job_id, &self.key, &etag).await;
    }

    /// Leaves the claim to expire by itself: for a job whose function may still write the
    /// result, so that no daemon starts it again within the lease.
    pub fn leave(mut self) {
        self.etag = None;
    }
}

async fn give_up(claims: &Claims, job_id: &str, key: &str, etag: &str) {
    let shared = &claims.shared;
    let body = encode(&shared.owner, job_id, 0);
    match shared.store.replace(key, etag, body).await {
        Ok(Put::Written(_)) => debug!(claim = %key, "Claim released."),
        Ok(Put::Conflict) => debug!(claim = %key, "Claim was no longer ours."),
        Err(e) => {
            warn!(claim = %key, error = %crate::aws::error_chain(&e), "Cannot release a claim; it expires by itself.")
        }
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if let Some(etag) = self.etag.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let (claims, job_id, key) =
                (self.claims.clone(), self.job_id.clone(), self.key.clone());
            runtime.spawn(
                async move { give_up(&claims, &job_id, &key, &etag).await }.in_current_span(),
            );
        }
    }
}

enum Renewal {
    Renewed,
    Failed,
    Lost,
}

/// What a renewal request came back with.
struct RenewalReply {
    result: Result<Put, ClaimError>,
    sent_unix_ms: u64,
    expires_unix_ms: u64,
}

/// The reply of the renewal in flight; never completes when there is none.
async fn reply_of(renewal: &mut Option<BoxFuture<'static, RenewalReply>>) -> RenewalReply {
    match renewal {
        Some(in_flight) => in_flight.await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

    /// An in-memory claim store with S3's conditional-write semantics.
    #[derive(Default)]
    struct MemStore {
        objects: Mutex<HashMap<String, (String, Vec<u8>)>>,
        next_etag: AtomicU64,
        /// The next this many writes fail as if S3 were unreachable.
        failing_writes: AtomicU32,
        writes: AtomicU32,
        /// How long each `replace` takes to answer (a slow S3).
        replace_delay_ms: AtomicU64,
    }

    impl MemStore {
        fn fail_next(&self) -> bool {
            self.failing_writes
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        }

        fn write(
            &self,
            key: &str,
            expected: Option<Option<&str>>,
            body: Vec<u8>,
        ) -> Result<Put, ClaimError> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            if self.fail_next() {
                return Err(ClaimError::Store {
                    op: "write",
                    bucket: "mem".into(),
                    key: key.into(),
                    source: "unreachable".into(),
                });
            }
            let mut objects = self.objects.lock().expect("not poisoned");
            let current = objects.get(key).map(|(etag, _)| etag.as_str());
            let ok = match expected {
                // If-None-Match: *
                None => current.is_none(),
                // If-Match
                Some(want) => current.is_some() && current == want,
            };
            if !ok {
                return Ok(Put::Conflict);
            }
            let etag = format!("e{}", self.next_etag.fetch_add(1, Ordering::SeqCst));
            objects.insert(key.to_string(), (etag.clone(), body));
            Ok(Put::Written(etag))
        }

        fn expiry(&self, key: &str) -> Option<u64> {
            let objects = self.objects.lock().expect("not poisoned");
            objects
                .get(key)
                .and_then(|(_, body)| parse_body(body))
                .map(|b| b.expires_unix_ms)
        }
    }

    impl ClaimStore for Arc<MemStore> {
        fn create<'a>(
            &'a self,
            key: &'a str,
            body: Vec<u8>,
        ) -> BoxFuture<'a, Result<Put, ClaimError>> {
            Box::pin(async move { self.write(key, None, body) })
        }
        fn replace<'a>(
            &'a self,
            key: &'a str,
            etag: &'a str,
            body: Vec<u8>,
        ) -> BoxFuture<'a, Result<Put, ClaimError>> {
            Box::pin(async move {
                // The write lands at once; its reply is slow (as a request that S3 has
                // carried out while the answer is still on its way).
                let written = self.write(key, Some(Some(etag)), body);
                let delay = self.replace_delay_ms.load(Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(delay)).await;
                written
            })
        }
        fn read<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Stored>, ClaimError>> {
            Box::pin(
                async move { Ok(self.objects.lock().expect("not poisoned").get(key).cloned()) },
            )
        }
        fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), ClaimError>> {
            Box::pin(async move {
                self.objects.lock().expect("not poisoned").remove(key);
                Ok(())
            })
        }
    }

    const LEASE: Duration = Duration::from_secs(30);

    /// Wall clock driven by tokio's (paused) clock.
    fn paused_clock() -> Clock {
        let start = tokio::time::Instant::now();
        Arc::new(move || 1_000_000_000 + duration_ms(start.elapsed()))
    }

    fn daemon(store: &Arc<MemStore>, pid: u32, clock: &Clock) -> Claims {
        let owner = Owner {
            host: "h".into(),
            pid,
            started_unix: 1,
            pid_space: String::new(),
        };
        Claims::with_clock(
            Box::new(store.clone()),
            "claims/",
            LEASE,
            owner,
            clock.clone(),
        )
    }

    fn claimed(acquired: Acquired) -> ClaimGuard {
        match acquired {
            Acquired::Claimed(guard) => guard,
            Acquired::HeldElsewhere { owner, .. } => panic!("held by {owner}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_of_two_daemons_wins_and_the_other_learns_until_when() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let (a, b) = (daemon(&store, 1, &clock), daemon(&store, 2, &clock));
        let guard = claimed(a.acquire("j1").await.expect("store works"));
        assert_eq!(guard.key(), "claims/j1.claim");
        tokio::time::advance(Duration::from_secs(10)).await;
        match b.acquire("j1").await.expect("store works") {
            Acquired::HeldElsewhere { owner, remaining } => {
                assert!(owner.starts_with("h:1 "), "{owner}");
                assert_eq!(remaining, LEASE - Duration::from_secs(10));
            }
            Acquired::Claimed(_) => panic!("both daemons won"),
        }
        guard.finish().await;
        assert!(
            store.objects.lock().expect("ok").is_empty(),
            "finished claim left behind"
        );
        claimed(b.acquire("j1").await.expect("store works"));
    }

    #[tokio::test(start_paused = true)]
    async fn peek_tells_a_live_claim_from_an_expired_or_released_one() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let (a, web) = (daemon(&store, 1, &clock), daemon(&store, 2, &clock));
        assert_eq!(web.peek("j").await.expect("store works"), None);
        let guard = claimed(a.acquire("j").await.expect("store works"));
        let seen = web.peek("j").await.expect("store works").expect("a claim");
        assert!(seen.live && seen.owner.starts_with("h:1 "), "{seen:?}");
        tokio::time::advance(LEASE + Duration::from_millis(1)).await;
        assert!(!web.peek("j").await.expect("ok").expect("a claim").live);
        guard.give_up().await;
        assert!(!web.peek("j").await.expect("ok").expect("a claim").live);
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_claim_is_taken_over_by_exactly_one_of_two_daemons() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let dead = daemon(&store, 1, &clock);
        let stale = claimed(dead.acquire("j").await.expect("store works"));
        // The owner dies: nothing renews or gives up its claim.
        std::mem::forget(stale);
        tokio::time::advance(LEASE + Duration::from_millis(1)).await;
        let (b, c) = (daemon(&store, 2, &clock), daemon(&store, 3, &clock));
        let (rb, rc) = tokio::join!(b.acquire("j"), c.acquire("j"));
        let winners = [rb, rc]
            .into_iter()
            .map(|r| r.expect("store works"))
            .filter(|r| matches!(r, Acquired::Claimed(_)))
            .count();
        assert_eq!(winners, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_live_claim_left_by_this_very_process_is_taken_over_at_once() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let a = daemon(&store, 1, &clock);
        // A finished job whose claim could not be deleted (an S3 outage): it stays live.
        claimed(a.acquire("j").await.expect("store works")).leave();
        let b = daemon(&store, 2, &clock);
        assert!(matches!(
            b.acquire("j").await.expect("ok"),
            Acquired::HeldElsewhere { .. }
        ));
        // The redelivered message comes back to the same daemon: no waiting for the lease.
        claimed(a.acquire("j").await.expect("store works")).leave();
    }

    #[tokio::test(start_paused = true)]
    async fn a_given_up_claim_is_taken_over_at_once() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let a = daemon(&store, 1, &clock);
        let guard = claimed(a.acquire("j").await.expect("store works"));
        guard.give_up().await;
        let b = daemon(&store, 2, &clock);
        claimed(b.acquire("j").await.expect("store works"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_guard_gives_its_claim_up_in_the_background() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let guard = claimed(daemon(&store, 1, &clock).acquire("j").await.expect("ok"));
        drop(guard);
        tokio::task::yield_now().await;
        assert_eq!(store.expiry("claims/j.claim"), Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_claim_is_renewed_every_third_of_the_lease_while_the_work_runs() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let mut guard = claimed(daemon(&store, 1, &clock).acquire("j").await.expect("ok"));
        let lost = CancellationToken::new();
        let (_, was_lost) = guard
            .keep_while(
                &lost,
                tokio::time::sleep(LEASE * 3 + Duration::from_secs(1)),
            )
            .await;
        assert!(!was_lost && !lost.is_cancelled());
        // 1 create + 9 renewals (at 10, 20, ... 90 s).
        assert_eq!(store.writes.load(Ordering::SeqCst), 10);
        let expiry = store.expiry("claims/j.claim").expect("claim there");
        assert!(expiry > clock(), "the claim must still hold");
        // Another daemon sees it held all along.
        let other = daemon(&store, 2, &clock);
        assert!(matches!(
            other.acquire("j").await.expect("ok"),
            Acquired::HeldElsewhere { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_renewal_is_retried_and_the_claim_kept() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let mut guard = claimed(daemon(&store, 1, &clock).acquire("j").await.expect("ok"));
        store.failing_writes.store(3, Ordering::SeqCst);
        let lost = CancellationToken::new();
        let (_, was_lost) = guard
            .keep_while(&lost, tokio::time::sleep(Duration::from_secs(15)))
            .await;
        assert!(!was_lost);
        // Create, then at 10 s three failures 1 s apart and a success at 13 s.
        assert_eq!(store.writes.load(Ordering::SeqCst), 5);
        assert_eq!(
            store.expiry("claims/j.claim"),
            Some(clock() - 2_000 + duration_ms(LEASE))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_taken_over_while_held_cancels_the_work() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let mut guard = claimed(daemon(&store, 1, &clock).acquire("j").await.expect("ok"));
        // Renewals cannot get through until after the lease: another daemon takes over.
        store.failing_writes.store(u32::MAX, Ordering::SeqCst);
        let lost = CancellationToken::new();
        let work = async {
            lost.cancelled().await;
            "stopped"
        };
        let (output, was_lost) = guard.keep_while(&lost, work).await;
        assert_eq!(output, "stopped");
        assert!(was_lost);
        assert!(
            clock() >= 1_000_000_000 + duration_ms(LEASE),
            "gave up before the lease ran out"
        );
        // A lost claim is neither deleted nor released by its former holder.
        store.failing_writes.store(0, Ordering::SeqCst);
        let expiry_before = store.expiry("claims/j.claim");
        guard.give_up().await;
        assert_eq!(store.expiry("claims/j.claim"), expiry_before);
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_refused_by_a_new_holder_cancels_the_work() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let mut guard = claimed(daemon(&store, 1, &clock).acquire("j").await.expect("ok"));
        // Someone else replaced the claim (say, after our lease ran out during a pause).
        store
            .objects
            .lock()
            .expect("ok")
            .insert("claims/j.claim".into(), ("other".into(), b"{}".to_vec()));
        let lost = CancellationToken::new();
        let (_, was_lost) = guard.keep_while(&lost, lost.cancelled()).await;
        assert!(was_lost);
        assert_eq!(clock(), 1_000_000_000 + duration_ms(LEASE / 3));
    }

    #[test]
    fn unreadable_or_foreign_bodies_are_not_claims() {
        assert!(parse_body(b"not json").is_none());
        assert!(parse_body(br#"{"version":2,"job_id":"j","owner":{"host":"h","pid":1,"started_unix":1},"expires_unix_ms":9}"#).is_none());
        let owner = Owner {
            host: "h".into(),
            pid: 1,
            started_unix: 1,
            pid_space: String::new(),
        };
        let body = parse_body(&encode(&owner, "j", 42)).expect("our own body");
        assert_eq!((body.owner, body.expires_unix_ms), (owner, 42));
    }

    #[tokio::test(start_paused = true)]
    async fn a_live_claim_of_a_dead_process_of_this_machine_is_taken_over_at_once() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let me = Owner::this_process();
        assert!(!me.pid_space.is_empty(), "no /proc here?");
        // A process that has exited (and was reaped): its pid is free.
        let mut child = std::process::Command::new("true").spawn().expect("spawns");
        let dead_pid = child.id();
        child.wait().expect("exits");
        let dead = Owner {
            pid: dead_pid,
            ..me.clone()
        };
        let claims_of = |owner: Owner| {
            Claims::with_clock(Box::new(store.clone()), "c", LEASE, owner, clock.clone())
        };
        claimed(claims_of(dead).acquire("j").await.expect("ok")).leave();
        // Another machine (or pid namespace) cannot tell: it waits for the lease.
        let elsewhere = Owner {
            pid_space: "other-boot/pid:[1]".into(),
            ..me.clone()
        };
        assert!(matches!(
            claims_of(elsewhere).acquire("j").await.expect("ok"),
            Acquired::HeldElsewhere { .. }
        ));
        // This machine can: the owner is gone, its claim is taken over before its lease.
        claimed(claims_of(me.clone()).acquire("j").await.expect("ok")).leave();
        // A live owner's claim (ours, as seen by another daemon of this machine) holds.
        let neighbour = Owner {
            pid: 1,
            ..me.clone()
        };
        assert!(matches!(
            claims_of(neighbour).acquire("j").await.expect("ok"),
            Acquired::HeldElsewhere { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_renewal_does_not_hold_up_the_work() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let mut guard = claimed(daemon(&store, 1, &clock).acquire("j").await.expect("ok"));
        store.replace_delay_ms.store(5_000, Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        let work = async {
            tokio::time::sleep(Duration::from_secs(12)).await;
            started.elapsed()
        };
        let lost = CancellationToken::new();
        // The renewal starts at 10 s and takes until 15 s; the work ends at 12 s.
        let (work_took, was_lost) = guard.keep_while(&lost, work).await;
        assert_eq!(work_took, Duration::from_secs(12));
        assert!(!was_lost);
        // The renewal in flight was waited for, so the guard knows the claim's new ETag:
        // its release (If-Match) goes through.
        guard.give_up().await;
        assert_eq!(store.expiry("claims/j.claim"), Some(0));
    }
}
