//! The job's shared record: a small S3 object per job id that says which daemon holds the
//! job, until when, from which SQS message, and what it holds (the grant, whether the
//! function may be running).
//!
//! This module owns the claim object's life: creating it with a conditional write
//! (`PutObject` with `If-None-Match: *`, so of two daemons exactly one wins), renewing it
//! while the job runs (`If-Match` on its ETag), recording the grant and the start of the
//! function in it, taking over an expired or released one (`If-Match` again, so of two
//! late comers exactly one wins; the record of what the former holder held is carried
//! over to the new holder), and ending it.
//!
//! **The lease is kept on the holder's own clock.** Every store call has a timeout
//! (`call_timeout`: a sixth of the lease, 1 to 10 s). Unless a renewal was confirmed, the
//! holder acts `call_timeout` before the expiry it last confirmed, never only after a
//! later call tells it that it lost: `ClaimGuard::keep_while` cancels the work then.
//! Every write is "maybe applied" until confirmed: a write answered with a conflict or an
//! error is read back, and one whose stored body is exactly ours counts as written (a
//! renewal that S3 applied but whose reply was lost, then retried by the SDK and answered
//! 412, is not a loss).
//!
//! **Ends.** A claim whose record holds nothing (no grant, no function) is deleted when
//! its job ends, while the holder's lease holds; past it, it is marked released instead
//! (`If-Match`, so a claim someone else took over is left alone). A claim whose record
//! holds a grant for a running function is handed over: marked released with the record
//! kept, so whoever takes the job over next adopts it at once (see `job`).
//!
//! Hostile or broken claim objects: a body over 4 KiB, not JSON, or of an unknown version
//! is no claim of ours; it is taken over like an expired one (whoever can write to the
//! claims location can stop jobs anyway). A crash at any instant leaves either no claim
//! (the job is claimed afresh), our claim (it expires after the lease, or at once for a
//! dead process of the same machine), or a record that says what we held.
//!
//! It leaves to others what a claim means for the message (`job::JobError::disposition`)
//! and what to do with a recorded grant (`job`, `reservations`). The expiry is
//! wall-clock time, shared across hosts: the hosts' clocks must agree to well under
//! `call_timeout` (NTP does).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info};

mod guard;
mod record;
mod store;
pub(crate) use guard::{ClaimGuard, ClaimHandle};
use record::ClaimBody;
pub(crate) use record::{FunctionStarted, JobRecord, Owner, RecordedGrant, ServerlessRecord};
pub(crate) use store::{ClaimStore, Put, S3Store};

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
/// A stored claim object: its ETag and body.
type Stored = (String, Vec<u8>);

/// Attempts at creating or taking over a claim that keeps changing under us.
const ACQUIRE_ATTEMPTS: usize = 3;
/// Claim bodies are written by orchgpu; anything larger is not one of ours. A serverless
/// claim carries its job's S3 event (one record; a key is at most 1 KiB, 3 KiB escaped),
/// so this is larger than any claim we write. (Daemons before Lambda mode read at most
/// 4 KiB: sharing a claims location with one, a serverless claim of a key over about
/// 2 KiB would look foreign to it; see docs/serverless.md.)
const MAX_BODY: usize = 16 * 1024;
/// The shortest and longest timeout of one claim call (a sixth of the lease between).
const CALL_TIMEOUT_MIN: Duration = Duration::from_secs(1);
const CALL_TIMEOUT_MAX: Duration = Duration::from_secs(10);
/// The shortest lease: six of the shortest call timeouts, so that a renewal (every half
/// of the lease) and a retry both fit before the holder must act.
pub(crate) const MIN_LEASE: Duration = Duration::from_secs(6);
/// The claim format written now; version 1 (no record) is still read. Version 2 gained
/// `serverless` (Lambda mode) as an optional field: older readers ignore it.
const VERSION: u32 = 2;
/// The host name of a parked serverless claim's holder (pid 0: no process).
const SERVERLESS_HOST: &str = "serverless";

/// The timeout of each claim call for a lease: a sixth of it (1 to 10 s), so that two fit
/// between a renewal and the instant the holder must act.
pub(crate) fn call_timeout(lease: Duration) -> Duration {
    (lease / 6).clamp(CALL_TIMEOUT_MIN, CALL_TIMEOUT_MAX)
}

/// A claim store's failure (S3 unreachable, access denied, too slow...).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClaimError {
    #[error("failed to {op} the claim s3://{bucket}/{key}")]
    Store {
        op: &'static str,
        bucket: String,
        key: String,
        #[source]
        source: BoxError,
    },
    #[error("claim call to {op} {key} took longer than {timeout:?}")]
    Timeout {
        op: &'static str,
        key: String,
        timeout: Duration,
    },
    #[error("the claim {key} is no longer ours")]
    Lost { key: String },
}

/// Wall-clock time in unix milliseconds. A function so tests can drive it with tokio's
/// paused clock.
pub(crate) type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The outcome of `Claims::acquire`.
pub(crate) enum Acquired {
    /// Ours until we end it (or fail to keep it). Its record carries what a former holder
    /// held (`ClaimGuard::carried`).
    Claimed(ClaimGuard),
    /// Another daemon holds this job; its lease runs out in `remaining` unless renewed.
    HeldElsewhere {
        owner: String,
        remaining: Duration,
        /// The message the holder works from (`None` for a claim of an older version).
        message_id: Option<String>,
        /// A parked serverless claim: no process holds it; it carries its job (and the
        /// function that may be running) until `remaining` runs out.
        parked: bool,
    },
}

struct Shared {
    store: Box<dyn ClaimStore>,
    /// Key prefix: the claims dir with a trailing `/`, or empty for the bucket's root.
    prefix: String,
    lease: Duration,
    owner: Owner,
    clock: Clock,
}

impl Shared {
    fn call_timeout(&self) -> Duration {
        call_timeout(self.lease)
    }

    /// Runs one store call within the call timeout.
    async fn timed<T>(
        &self,
        op: &'static str,
        key: &str,
        call: impl Future<Output = Result<T, ClaimError>>,
    ) -> Result<T, ClaimError> {
        let timeout = self.call_timeout();
        tokio::time::timeout(timeout, call)
            .await
            .unwrap_or_else(|_| {
                Err(ClaimError::Timeout {
                    op,
                    key: key.to_string(),
                    timeout,
                })
            })
    }

    async fn read(&self, key: &str) -> Result<Option<Stored>, ClaimError> {
        self.timed("read", key, self.store.read(key)).await
    }

    /// A conditional overwrite, confirmed: a conflict or an error is read back, and a
    /// stored body that is exactly ours counts as written (the write was applied, its
    /// reply lost). A conflict whose read-back fails stays unknown: an error.
    async fn replace_confirmed(
        &self,
        key: &str,
        etag: &str,
        body: Vec<u8>,
    ) -> Result<Put, ClaimError> {
        let first = self
            .timed("write", key, self.store.replace(key, etag, body.clone()))
            .await;
        if let Ok(Put::Written(etag)) = first {
            return Ok(Put::Written(etag));
        }
        match self.read(key).await {
            Ok(Some((stored_etag, stored))) if stored == body => {
                debug!(claim = %key, "Claim write was applied though its reply said otherwise.");
                Ok(Put::Written(stored_etag))
            }
            Ok(_) => first,
            Err(read_error) => Err(match first {
                Err(e) => e,
                Ok(_) => read_error,
            }),
        }
    }

    fn encode(&self, job_id: &str, expires_unix_ms: u64, record: &JobRecord) -> Vec<u8> {
        self.encode_as(&self.owner, job_id, expires_unix_ms, record)
    }

    fn encode_as(
        &self,
        owner: &Owner,
        job_id: &str,
        expires_unix_ms: u64,
        record: &JobRecord,
    ) -> Vec<u8> {
        let body = ClaimBody {
            version: VERSION,
            job_id: job_id.to_string(),
            owner: owner.clone(),
            expires_unix_ms,
            record: record.clone(),
        };
        serde_json::to_vec(&body).expect("a struct of strings and numbers always serializes")
    }

    fn expiry_from_now(&self) -> u64 {
        (self.clock)().saturating_add(duration_ms(self.lease))
    }
}

/// Claims of job ids, in one place (bucket and prefix), held by this process.
#[derive(Clone)]
pub(crate) struct Claims {
    shared: Arc<Shared>,
}

impl Claims {
    /// Claims under `dir` of the store (empty for its root), each held for `lease`
    /// between renewals.
    pub(crate) fn new(store: Box<dyn ClaimStore>, dir: &str, lease: Duration) -> Claims {
        Claims::with_clock(
            store,
            dir,
            lease,
            Owner::this_process(),
            Arc::new(crate::unix_now_ms),
        )
    }

    /// As `new`, with an explicit owner and clock (tests).
    pub(crate) fn with_clock(
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

    /// Writes and deletes a probe claim: a start-up check that jobs will be able to claim
    /// (the bucket exists, and `s3:PutObject` and `s3:DeleteObject` are granted there),
    /// so a wrong `--claims` or a missing permission fails at once rather than sending
    /// every job to the dead-letter queue.
    ///
    /// # Errors
    /// `ClaimError` naming the operation (write or delete) that failed.
    pub(crate) async fn check(&self) -> Result<(), ClaimError> {
        let shared = &self.shared;
        let probe = format!(
            "{}orchgpu-start-up-check-{}",
            shared.prefix, shared.owner.pid
        );
        let body = shared.encode("start-up-check", 0, &JobRecord::default());
        shared
            .timed("write", &probe, shared.store.create(&probe, body))
            .await?;
        shared
            .timed("delete", &probe, shared.store.delete(&probe))
            .await
    }

    /// The lease: how long a claim holds without renewal.
    pub(crate) fn lease(&self) -> Duration {
        self.shared.lease
    }

    /// The claim object's key for a job id.
    pub(crate) fn key(&self, job_id: &str) -> String {
        format!("{}{job_id}.claim", self.shared.prefix)
    }

    /// Claims `job_id` for this process, working from message `message_id`: creates the
    /// claim, or takes over one that has expired, was released, was left by this very
    /// process or by a dead process of this machine. A taken-over claim keeps the former
    /// holder's grant and function in its record. Exactly one of several daemons calling
    /// this at once gets `Claimed`.
    ///
    /// # Errors
    /// `ClaimError` when the store cannot be reached; the caller should retry later.
    /// Cancel safety: a claim created by a cancelled call stays until its lease runs out.
    pub(crate) async fn acquire(
        &self,
        job_id: &str,
        message_id: Option<&str>,
    ) -> Result<Acquired, ClaimError> {
        self.acquire_inner(job_id, message_id, false).await
    }

    /// As `acquire`, and also takes over a parked serverless claim before its result
    /// deadline: for the results handler (the result is there) and the schedule (it
    /// checked the result).
    ///
    /// # Errors
    /// As `acquire`.
    pub(crate) async fn acquire_parked(
        &self,
        job_id: &str,
        message_id: Option<&str>,
    ) -> Result<Acquired, ClaimError> {
        self.acquire_inner(job_id, message_id, true).await
    }

    async fn acquire_inner(
        &self,
        job_id: &str,
        message_id: Option<&str>,
        take_parked: bool,
    ) -> Result<Acquired, ClaimError> {
        let shared = &self.shared;
        let key = self.key(job_id);
        let mine = JobRecord {
            message_id: message_id.map(str::to_owned),
            ..JobRecord::default()
        };
        for _ in 0..ACQUIRE_ATTEMPTS {
            let expires = shared.expiry_from_now();
            let body = shared.encode(job_id, expires, &mine);
            let created = shared
                .timed("write", &key, shared.store.create(&key, body))
                .await?;
            if let Put::Written(etag) = created {
                debug!(claim = %key, "Claim created.");
                return Ok(Acquired::Claimed(
                    self.guard(job_id, key, etag, expires, mine),
                ));
            }
            let Some((etag, current)) = shared.read(&key).await? else {
                // Deleted between our write and our read: its job ended; try again.
                continue;
            };
            let now = (shared.clock)();
            let current = parse_body(&current);
            let why = match &current {
                None => "unreadable",
                Some(body) if body.expires_unix_ms == 0 => "released",
                Some(body) if body.owner == shared.owner => {
                    // A claim of this very process: the daemon runs one job per id at a
                    // time, so no job of ours holds it now (one ended without deleting it).
                    "left by this process"
                }
                Some(body) if body.expires_unix_ms <= now => "expired",
                Some(body) if take_parked && body.owner.is_serverless() => "parked",
                Some(body) if shared.owner.is_dead_neighbour(&body.owner) => {
                    "left by a dead process of this machine"
                }
                Some(body) => {
                    return Ok(Acquired::HeldElsewhere {
                        owner: body.owner.to_string(),
                        remaining: Duration::from_millis(body.expires_unix_ms - now),
                        message_id: body.record.message_id.clone(),
                        parked: body.owner.is_serverless(),
                    });
                }
            };
            // Take it over, and with it whatever the former holder held.
            let mut record = mine.clone();
            if let Some(body) = &current {
                record.grant = body.record.grant.clone();
                record.function = body.record.function.clone();
                record.serverless = body.record.serverless.clone();
            }
            let expires = shared.expiry_from_now();
            let body = shared.encode(job_id, expires, &record);
            match shared.replace_confirmed(&key, &etag, body).await? {
                Put::Written(etag) => {
                    let previous =
                        current.map_or_else(|| "unknown".to_string(), |b| b.owner.to_string());
                    let holds_gpus = record.holds_gpus();
                    if why == "released" && !holds_gpus {
                        debug!(claim = %key, "Took over a released claim.");
                    } else {
                        info!(claim = %key, previous_owner = %previous, why, holds_gpus, "Took over a claim.");
                    }
                    return Ok(Acquired::Claimed(
                        self.guard(job_id, key, etag, expires, record),
                    ));
                }
                Put::Conflict => continue,
            }
        }
        // It kept changing under us: somebody else is busy with it right now.
        Ok(Acquired::HeldElsewhere {
            owner: "unknown (contended)".to_string(),
            remaining: shared.lease,
            message_id: None,
            parked: false,
        })
    }

    /// What the store says about `job_id`'s claim, changing nothing: `None` when there is
    /// no claim object (or one that is not ours to read).
    ///
    /// # Errors
    /// `ClaimError` when the store cannot be reached.
    pub(crate) async fn peek(&self, job_id: &str) -> Result<Option<ClaimSeen>, ClaimError> {
        let shared = &self.shared;
        let Some((_, body)) = shared.read(&self.key(job_id)).await? else {
            return Ok(None);
        };
        let now = (shared.clock)();
        Ok(parse_body(&body).map(|body| ClaimSeen {
            live: body.expires_unix_ms > now,
            mine: body.owner == shared.owner,
            owner: body.owner.to_string(),
        }))
    }

    /// The job ids of every claim object under the claims dir (the start-up probe and
    /// foreign objects left out), for the schedule's pass.
    ///
    /// # Errors
    /// `ClaimError` when the store cannot be listed.
    pub(crate) async fn list(&self) -> Result<Vec<String>, ClaimError> {
        let shared = &self.shared;
        let keys = shared
            .timed("list", &shared.prefix, shared.store.list(&shared.prefix))
            .await?;
        Ok(keys
            .iter()
            .filter_map(|key| key.strip_prefix(&shared.prefix)?.strip_suffix(".claim"))
            .filter(|id| !id.is_empty() && !id.contains('/'))
            .map(str::to_owned)
            .collect())
    }

    /// The whole of `job_id`'s claim as stored, changing nothing: `None` when there is
    /// none, or one that is not ours to read (`unreadable` then says so).
    ///
    /// # Errors
    /// `ClaimError` when the store cannot be reached.
    pub(crate) async fn inspect(&self, job_id: &str) -> Result<Option<ClaimView>, ClaimError> {
        let shared = &self.shared;
        let Some((_, body)) = shared.read(&self.key(job_id)).await? else {
            return Ok(None);
        };
        let now = (shared.clock)();
        Ok(Some(match parse_body(&body) {
            None => ClaimView {
                unreadable: true,
                ..ClaimView::default()
            },
            Some(body) => ClaimView {
                unreadable: false,
                parked: body.owner.is_serverless(),
                holder_gone: body.expires_unix_ms == 0
                    || body.expires_unix_ms <= now
                    || shared.owner.is_dead_neighbour(&body.owner),
                expires_unix_ms: body.expires_unix_ms,
                owner: body.owner.to_string(),
                record: body.record,
            },
        }))
    }

    /// Whether `job_id`'s claim records the grant `scheduler_job_id`: then the claim, not
    /// this host's journal, holds it, and whoever takes the job over releases it.
    ///
    /// # Errors
    /// `ClaimError` when the store cannot be reached (the answer is unknown).
    pub(crate) async fn records_grant(
        &self,
        job_id: &str,
        scheduler_job_id: &str,
    ) -> Result<bool, ClaimError> {
        let Some((_, body)) = self.shared.read(&self.key(job_id)).await? else {
            return Ok(false);
        };
        Ok(parse_body(&body)
            .and_then(|b| b.record.grant)
            .is_some_and(|g| g.scheduler_job_id == scheduler_job_id))
    }

    fn guard(
        &self,
        job_id: &str,
        key: String,
        etag: String,
        expires_unix_ms: u64,
        record: JobRecord,
    ) -> ClaimGuard {
        ClaimGuard::new(self.clone(), job_id, key, etag, expires_unix_ms, record)
    }
}

impl crate::reservations::GrantRecords for Claims {
    fn records_grant<'a>(
        &'a self,
        job_id: &'a str,
        scheduler_job_id: &'a str,
    ) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            Claims::records_grant(self, job_id, scheduler_job_id)
                .await
                .map_err(|e| crate::aws::error_chain(&e))
        })
    }
}

fn parse_body(bytes: &[u8]) -> Option<ClaimBody> {
    if bytes.len() > MAX_BODY {
        return None;
    }
    serde_json::from_slice::<ClaimBody>(bytes)
        .ok()
        .filter(|body| body.version == 1 || body.version == VERSION)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A claim as read by `Claims::inspect`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ClaimView {
    /// Not a claim body of ours (too large, not JSON, unknown version).
    pub(crate) unreadable: bool,
    /// A parked serverless claim: no process holds it; it holds until `expires_unix_ms`,
    /// its function's result deadline.
    pub(crate) parked: bool,
    /// Its holder is gone: released, expired, or a dead process of this machine. (A
    /// parked claim's holder is "gone" only past its result deadline.)
    pub(crate) holder_gone: bool,
    pub(crate) expires_unix_ms: u64,
    pub(crate) owner: String,
    pub(crate) record: JobRecord,
}

/// A claim as read by `Claims::peek`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClaimSeen {
    /// Held (not expired, not released) right now.
    pub(crate) live: bool,
    /// Which daemon wrote it.
    pub(crate) owner: String,
    /// This very process wrote it.
    pub(crate) mine: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
    use tokio_util::sync::CancellationToken;

    /// An in-memory claim store with S3's conditional-write semantics.
    #[derive(Default)]
    struct MemStore {
        objects: Mutex<HashMap<String, (String, Vec<u8>)>>,
        next_etag: AtomicU64,
        /// The next this many writes fail as if S3 were unreachable.
        failing_writes: AtomicU32,
        /// The next this many `replace` calls are applied but answered 412 (the reply of
        /// the applied write was lost, the SDK retried it, and the retry met our own ETag).
        applied_then_conflict: AtomicU32,
        writes: AtomicU32,
        /// How long each `replace` takes to answer after it was applied (a slow reply).
        replace_delay_ms: AtomicU64,
        /// How long each `replace` is held back before it reaches the store (a slow or
        /// partitioned S3 endpoint).
        replace_held_ms: AtomicU64,
    }

    fn take_one(counter: &AtomicU32) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    impl MemStore {
        fn write(
            &self,
            key: &str,
            expected: Option<Option<&str>>,
            body: Vec<u8>,
        ) -> Result<Put, ClaimError> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            if take_one(&self.failing_writes) {
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

        fn body(&self, key: &str) -> Option<ClaimBody> {
            let objects = self.objects.lock().expect("not poisoned");
            objects.get(key).and_then(|(_, body)| parse_body(body))
        }

        fn expiry(&self, key: &str) -> Option<u64> {
            self.body(key).map(|b| b.expires_unix_ms)
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
                let held = self.replace_held_ms.load(Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(held)).await;
                let written = self.write(key, Some(Some(etag)), body);
                let delay = self.replace_delay_ms.load(Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(delay)).await;
                match written {
                    Ok(Put::Written(_)) if take_one(&self.applied_then_conflict) => {
                        Ok(Put::Conflict)
                    }
                    other => other,
                }
            })
        }
        fn read<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Stored>, ClaimError>> {
            Box::pin(
                async move { Ok(self.objects.lock().expect("not poisoned").get(key).cloned()) },
            )
        }
        fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, ClaimError>> {
            Box::pin(async move {
                let objects = self.objects.lock().expect("not poisoned");
                Ok(objects
                    .keys()
                    .filter(|k| k.starts_with(prefix))
                    .cloned()
                    .collect())
            })
        }
        fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), ClaimError>> {
            Box::pin(async move {
                if take_one(&self.failing_writes) {
                    return Err(ClaimError::Store {
                        op: "delete",
                        bucket: "mem".into(),
                        key: key.into(),
                        source: "access denied".into(),
                    });
                }
                self.objects.lock().expect("not poisoned").remove(key);
                Ok(())
            })
        }
    }

    const LEASE: Duration = Duration::from_secs(30);
    const T0: u64 = 1_000_000_000;

    /// Wall clock driven by tokio's (paused) clock.
    fn paused_clock() -> Clock {
        let start = tokio::time::Instant::now();
        Arc::new(move || T0 + duration_ms(start.elapsed()))
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

    /// Job "j" claimed by daemon 1.
    async fn held_by_daemon_1(store: &Arc<MemStore>, clock: &Clock) -> ClaimGuard {
        claimed(
            daemon(store, 1, clock)
                .acquire("j", None)
                .await
                .expect("ok"),
        )
    }

    fn grant(id: &str) -> RecordedGrant {
        RecordedGrant {
            scheduler: "s:1".into(),
            scheduler_job_id: id.into(),
            devices: vec!["gpu0".into()],
            since_unix: 1,
        }
    }

    #[test]
    fn a_renewal_and_a_retry_fit_before_the_holder_must_act_for_any_allowed_lease() {
        assert_eq!(call_timeout(MIN_LEASE), Duration::from_secs(1));
        assert_eq!(call_timeout(LEASE), Duration::from_secs(5));
        assert_eq!(call_timeout(Duration::from_secs(3600)), CALL_TIMEOUT_MAX);
        for secs in [6, 7, 10, 60, 600, 21_600] {
            let lease = Duration::from_secs(secs);
            // Renewed at lease / RENEW_EVERY, acting at lease - call_timeout.
            let room = lease - call_timeout(lease) - lease / guard::RENEW_EVERY;
            assert!(call_timeout(lease) * 2 <= room, "lease {secs} s");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_of_two_daemons_wins_and_the_other_learns_until_when_and_from_which_message() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let (a, b) = (daemon(&store, 1, &clock), daemon(&store, 2, &clock));
        let guard = claimed(a.acquire("j1", Some("m-1")).await.expect("store works"));
        assert_eq!(guard.key(), "claims/j1.claim");
        tokio::time::advance(Duration::from_secs(10)).await;
        match b.acquire("j1", Some("m-2")).await.expect("store works") {
            Acquired::HeldElsewhere {
                owner,
                remaining,
                message_id,
                parked,
            } => {
                assert!(!parked);
                assert!(owner.starts_with("h:1 "), "{owner}");
                assert_eq!(remaining, LEASE - Duration::from_secs(10));
                assert_eq!(message_id.as_deref(), Some("m-1"));
            }
            Acquired::Claimed(_) => panic!("both daemons won"),
        }
        guard.end().await;
        assert!(
            store.objects.lock().expect("ok").is_empty(),
            "ended claim left behind"
        );
        claimed(b.acquire("j1", None).await.expect("store works"));
    }

    #[tokio::test(start_paused = true)]
    async fn peek_tells_a_live_claim_from_an_expired_one() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let (a, web) = (daemon(&store, 1, &clock), daemon(&store, 2, &clock));
        assert_eq!(web.peek("j").await.expect("store works"), None);
        let guard = claimed(a.acquire("j", None).await.expect("store works"));
        let seen = web.peek("j").await.expect("store works").expect("a claim");
        assert!(seen.live && seen.owner.starts_with("h:1 "), "{seen:?}");
        tokio::time::advance(LEASE + Duration::from_millis(1)).await;
        assert!(!web.peek("j").await.expect("ok").expect("a claim").live);
        std::mem::forget(guard);
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_claim_is_taken_over_by_exactly_one_of_two_daemons() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let dead = daemon(&store, 1, &clock);
        let stale = claimed(dead.acquire("j", None).await.expect("store works"));
        // The owner dies: nothing renews or ends its claim.
        std::mem::forget(stale);
        tokio::time::advance(LEASE + Duration::from_millis(1)).await;
        let (b, c) = (daemon(&store, 2, &clock), daemon(&store, 3, &clock));
        let (rb, rc) = tokio::join!(b.acquire("j", None), c.acquire("j", None));
        let winners = [rb, rc]
            .into_iter()
            .map(|r| r.expect("store works"))
            .filter(|r| matches!(r, Acquired::Claimed(_)))
            .count();
        assert_eq!(winners, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_holders_grant_and_function_pass_to_whoever_takes_the_job_over() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let dead = daemon(&store, 1, &clock);
        let guard = claimed(dead.acquire("j", Some("m-1")).await.expect("ok"));
        let handle = guard.handle();
        handle.record_grant(grant("77")).await.expect("recorded");
        let function = FunctionStarted {
            started_unix_ms: clock(),
            result_deadline_unix_ms: clock() + 90_000,
        };
        handle
            .record_function(function.clone())
            .await
            .expect("recorded");
        assert!(dead.records_grant("j", "77").await.expect("ok"));
        assert!(!dead.records_grant("j", "78").await.expect("ok"));
        // The host dies for good.
        std::mem::forget(guard);
        tokio::time::advance(LEASE + Duration::from_millis(1)).await;
        let survivor = daemon(&store, 2, &clock);
        let guard = claimed(survivor.acquire("j", Some("m-2")).await.expect("ok"));
        assert_eq!(guard.carried().grant, Some(grant("77")));
        assert_eq!(guard.carried().function, Some(function));
        assert_eq!(guard.carried().message_id.as_deref(), Some("m-2"));
        // The record stays in the claim while the survivor holds it...
        assert!(survivor.records_grant("j", "77").await.expect("ok"));
        let record = store.body("claims/j.claim").expect("a claim").record;
        assert_eq!(record.message_id.as_deref(), Some("m-2"));
        // ...and an end that did not clear it hands it over instead of deleting it.
        guard.end().await;
        let body = store
            .body("claims/j.claim")
            .expect("kept for the next holder");
        assert_eq!(body.expires_unix_ms, 0);
        assert_eq!(body.record.grant, Some(grant("77")));
        let next = claimed(
            daemon(&store, 3, &clock)
                .acquire("j", None)
                .await
                .expect("ok"),
        );
        assert_eq!(next.carried().grant, Some(grant("77")));
        // Cleared before the release, the claim is then deleted at its end.
        next.handle().clear_gpus().await.expect("cleared");
        assert!(!survivor.records_grant("j", "77").await.expect("ok"));
        next.end().await;
        assert!(store.objects.lock().expect("ok").is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_parked_claim_carries_its_job_until_its_deadline_and_only_parked_takers_skip_it() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let invocation = daemon(&store, 1, &clock);
        let guard = claimed(invocation.acquire("j", Some("m-1")).await.expect("ok"));
        let handle = guard.handle();
        handle
            .update_serverless(|s| {
                s.event = "{}".into();
                s.attempts = 1;
                s.alloc_started_unix_ms = Some(clock());
            })
            .await
            .expect("recorded");
        handle.record_grant(grant("9")).await.expect("recorded");
        let deadline = clock() + 600_000;
        handle
            .record_function(FunctionStarted {
                started_unix_ms: clock(),
                result_deadline_unix_ms: deadline,
            })
            .await
            .expect("recorded");
        guard.park(deadline).await.expect("parked");
        let body = store.body("claims/j.claim").expect("kept");
        assert!(body.owner.is_serverless(), "{:?}", body.owner);
        assert_eq!(body.expires_unix_ms, deadline);
        let serverless = body.record.serverless.expect("serverless record");
        assert_eq!(
            serverless.alloc_started_unix_ms, None,
            "the grant ends the intent"
        );
        // Long past any lease, a daemon (or a duplicate record) still meets a holder...
        tokio::time::advance(LEASE * 4).await;
        let other = daemon(&store, 2, &clock);
        match other.acquire("j", Some("m-2")).await.expect("ok") {
            Acquired::HeldElsewhere {
                parked, message_id, ..
            } => {
                assert!(parked);
                assert_eq!(message_id.as_deref(), Some("m-1"));
            }
            Acquired::Claimed(_) => panic!("a parked claim taken before its deadline"),
        }
        let seen = other.inspect("j").await.expect("ok").expect("a claim");
        assert!(seen.parked && !seen.holder_gone, "{seen:?}");
        assert_eq!(other.list().await.expect("ok"), vec!["j".to_string()]);
        // ...while the results handler or the schedule takes it over with its record.
        let taken = claimed(other.acquire_parked("j", None).await.expect("ok"));
        assert_eq!(taken.carried().grant, Some(grant("9")));
        assert_eq!(
            taken.carried().serverless.as_ref().map(|s| s.attempts),
            Some(1)
        );
        taken.handle().end_done().await.expect("ended");
        assert!(store.objects.lock().expect("ok").is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_parked_claim_past_its_deadline_is_taken_over_by_anyone() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let guard = held_by_daemon_1(&store, &clock).await;
        guard.park(clock() + 1_000).await.expect("parked");
        tokio::time::advance(Duration::from_secs(2)).await;
        let seen = daemon(&store, 2, &clock)
            .inspect("j")
            .await
            .expect("ok")
            .expect("a claim");
        assert!(seen.parked && seen.holder_gone, "{seen:?}");
        claimed(
            daemon(&store, 2, &clock)
                .acquire("j", None)
                .await
                .expect("ok"),
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_live_claim_left_by_this_very_process_is_taken_over_at_once() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let a = daemon(&store, 1, &clock);
        // A job whose claim could not be ended (an S3 outage): it stays live.
        std::mem::forget(claimed(a.acquire("j", None).await.expect("store works")));
        let b = daemon(&store, 2, &clock);
        assert!(matches!(
            b.acquire("j", None).await.expect("ok"),
            Acquired::HeldElsewhere { .. }
        ));
        // The redelivered message comes back to the same daemon: no waiting for the lease.
        claimed(a.acquire("j", None).await.expect("store works"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_ended_claim_is_deleted_within_its_lease_and_marked_released_past_it() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let a = daemon(&store, 1, &clock);
        claimed(a.acquire("j", None).await.expect("ok")).end().await;
        assert_eq!(store.expiry("claims/j.claim"), None, "deleted");
        // A delete that fails (no s3:DeleteObject) falls back to marking it released.
        let guard = claimed(a.acquire("j", None).await.expect("ok"));
        store.failing_writes.store(1, Ordering::SeqCst);
        guard.end().await;
        assert_eq!(store.expiry("claims/j.claim"), Some(0));
        // Past the point where the holder must act, it is never deleted unconditionally.
        let guard = claimed(a.acquire("j", None).await.expect("ok"));
        tokio::time::advance(LEASE - Duration::from_secs(1)).await;
        guard.end().await;
        assert_eq!(store.expiry("claims/j.claim"), Some(0));
        let b = daemon(&store, 2, &clock);
        claimed(b.acquire("j", None).await.expect("store works"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_guard_ends_its_claim_in_the_background() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let guard = held_by_daemon_1(&store, &clock).await;
        drop(guard);
        tokio::task::yield_now().await;
        assert_eq!(store.expiry("claims/j.claim"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_claim_is_renewed_every_half_of_the_lease_while_the_work_runs() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let guard = held_by_daemon_1(&store, &clock).await;
        let lost = CancellationToken::new();
        let (_, was_lost) = guard
            .keep_while(
                &lost,
                tokio::time::sleep(LEASE * 3 + Duration::from_secs(1)),
            )
            .await;
        assert!(!was_lost && !lost.is_cancelled());
        // 1 create + 6 renewals (at 15, 30, ... 90 s).
        assert_eq!(store.writes.load(Ordering::SeqCst), 7);
        let expiry = store.expiry("claims/j.claim").expect("claim there");
        assert!(expiry > clock(), "the claim must still hold");
        // Another daemon sees it held all along.
        let other = daemon(&store, 2, &clock);
        assert!(matches!(
            other.acquire("j", None).await.expect("ok"),
            Acquired::HeldElsewhere { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_renewal_is_retried_with_backoff_and_the_claim_kept() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let guard = held_by_daemon_1(&store, &clock).await;
        store.failing_writes.store(3, Ordering::SeqCst);
        let lost = CancellationToken::new();
        let (_, was_lost) = guard
            .keep_while(&lost, tokio::time::sleep(Duration::from_secs(24)))
            .await;
        assert!(!was_lost && !lost.is_cancelled());
        // Create, then at 15 s three failures backing off from 0.94 s (jittered, at most
        // 6.6 s in all), then a success before the holder must act (25 s).
        assert_eq!(store.writes.load(Ordering::SeqCst), 5);
        let expiry = store.expiry("claims/j.claim").expect("claim there");
        assert!(
            expiry > T0 + duration_ms(LEASE) + 15_000,
            "renewed: {expiry}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_slower_than_the_lease_makes_the_holder_act_before_its_expiry() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let guard = held_by_daemon_1(&store, &clock).await;
        let expiry = store.expiry("claims/j.claim").expect("claim there");
        // Every renewal is held back on its way to S3 for longer than the lease.
        store.replace_held_ms.store(60_000, Ordering::SeqCst);
        let lost = CancellationToken::new();
        let work = async {
            lost.cancelled().await;
            clock()
        };
        let (stopped_at, was_lost) = guard.keep_while(&lost, work).await;
        assert!(was_lost);
        // It acted a call timeout (5 s) before the expiry another daemon goes by.
        assert_eq!(stopped_at, expiry - 5_000);
        assert!(stopped_at < expiry);
        // Another daemon takes over only once that expiry has passed.
        let other = daemon(&store, 2, &clock);
        assert!(matches!(
            other.acquire("j", None).await.expect("ok"),
            Acquired::HeldElsewhere { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_applied_but_answered_412_is_not_a_loss() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let guard = held_by_daemon_1(&store, &clock).await;
        store.applied_then_conflict.store(1, Ordering::SeqCst);
        let lost = CancellationToken::new();
        let (_, was_lost) = guard
            .keep_while(&lost, tokio::time::sleep(Duration::from_secs(20)))
            .await;
        assert!(!was_lost && !lost.is_cancelled());
        // The renewal at 15 s counts: the claim holds until 45 s, and the guard knows
        // its ETag (its end deletes the claim).
        assert_eq!(store.expiry("claims/j.claim"), Some(T0 + 45_000));
        guard.end().await;
        assert_eq!(store.expiry("claims/j.claim"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_refused_by_a_new_holder_cancels_the_work() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let guard = held_by_daemon_1(&store, &clock).await;
        // Someone else replaced the claim (say, after our lease ran out during a pause).
        store
            .objects
            .lock()
            .expect("ok")
            .insert("claims/j.claim".into(), ("other".into(), b"{}".to_vec()));
        let lost = CancellationToken::new();
        let (_, was_lost) = guard.keep_while(&lost, lost.cancelled()).await;
        assert!(was_lost);
        assert_eq!(clock(), T0 + duration_ms(LEASE / guard::RENEW_EVERY));
        // A lost claim is neither deleted nor released by its former holder.
        guard.end().await;
        assert_eq!(
            store.objects.lock().expect("ok")["claims/j.claim"].1,
            b"{}".to_vec()
        );
    }

    #[test]
    fn unreadable_or_foreign_bodies_are_not_claims_and_version_1_is_read() {
        assert!(parse_body(b"not json").is_none());
        assert!(parse_body(br#"{"version":3,"job_id":"j","owner":{"host":"h","pid":1,"started_unix":1},"expires_unix_ms":9}"#).is_none());
        let v1 = parse_body(br#"{"version":1,"job_id":"j","owner":{"host":"h","pid":1,"started_unix":1},"expires_unix_ms":9}"#).expect("version 1");
        assert_eq!((v1.expires_unix_ms, v1.record), (9, JobRecord::default()));
        let huge = format!(
            r#"{{"version":2,"job_id":"{}","owner":{{"host":"h","pid":1,"started_unix":1}},"expires_unix_ms":9}}"#,
            "j".repeat(MAX_BODY)
        );
        assert!(parse_body(huge.as_bytes()).is_none());
        let store = Arc::new(MemStore::default());
        let clock: Clock = Arc::new(|| T0);
        let claims = daemon(&store, 1, &clock);
        let record = JobRecord {
            message_id: Some("m".into()),
            grant: Some(grant("5")),
            function: None,
            serverless: None,
        };
        let body = parse_body(&claims.shared.encode("j", 42, &record)).expect("our own body");
        assert_eq!((body.version, body.expires_unix_ms), (VERSION, 42));
        assert_eq!(body.record, record);
    }

    #[tokio::test(start_paused = true)]
    async fn the_start_up_check_writes_and_deletes_a_probe() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let claims = daemon(&store, 1, &clock);
        claims.check().await.expect("a writable store");
        assert_eq!(store.writes.load(Ordering::SeqCst), 1);
        assert!(store.objects.lock().expect("ok").is_empty(), "probe left");
        store.failing_writes.store(1, Ordering::SeqCst);
        let error = claims.check().await.expect_err("writes refused");
        assert!(error.to_string().contains("write"), "{error}");
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
        std::mem::forget(claimed(
            claims_of(dead).acquire("j", None).await.expect("ok"),
        ));
        // Another machine (or pid namespace) cannot tell: it waits for the lease.
        let elsewhere = Owner {
            pid_space: "other-boot/pid:[1]".into(),
            ..me.clone()
        };
        assert!(matches!(
            claims_of(elsewhere).acquire("j", None).await.expect("ok"),
            Acquired::HeldElsewhere { .. }
        ));
        // This machine can: the owner is gone, its claim is taken over before its lease.
        std::mem::forget(claimed(
            claims_of(me.clone()).acquire("j", None).await.expect("ok"),
        ));
        // A live owner's claim (ours, as seen by another daemon of this machine) holds.
        let neighbour = Owner {
            pid: 1,
            ..me.clone()
        };
        assert!(matches!(
            claims_of(neighbour).acquire("j", None).await.expect("ok"),
            Acquired::HeldElsewhere { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_renewal_does_not_hold_up_the_work() {
        let store = Arc::new(MemStore::default());
        let clock = paused_clock();
        let guard = held_by_daemon_1(&store, &clock).await;
        store.replace_delay_ms.store(3_000, Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        let work = async {
            tokio::time::sleep(Duration::from_secs(12)).await;
            started.elapsed()
        };
        let lost = CancellationToken::new();
        // The renewal starts at 10 s and takes until 13 s; the work ends at 12 s.
        let (work_took, was_lost) = guard.keep_while(&lost, work).await;
        assert_eq!(work_took, Duration::from_secs(12));
        assert!(!was_lost);
        // The renewal in flight was waited for, so the guard knows the claim's new ETag.
        guard.end().await;
        assert_eq!(store.expiry("claims/j.claim"), None);
    }
}
