//! orchgpu: turns S3 uploads into GPU jobs on remote GPUs.
//!
//! An S3 `ObjectCreated` notification arrives on an SQS queue; orchgpu asks the rCUDA
//! scheduler for GPUs through its SSGM client, uploads a bundle (input + reservation) to
//! the intermediate bucket, where a SCAR function picks it up, waits for the function's
//! result in the output bucket, then releases the GPUs (kept in a journal until the
//! scheduler confirms) while it deletes the message.
//!
//! The map, one room per concern, in layers:
//! - the daemon: `app` (builds and runs it from a `Config` and a shutdown signal), `cli`
//!   (flags to a validated `Config`; the only module that knows clap), with `values` (the
//!   flags' value parsers) and `jobs` (the `orchgpu jobs` command line), `daemon` (the
//!   receive loop, job slots, heartbeats, shutdown; `drain`, the `--drain` run),
//!   `signal` (SIGTERM/SIGINT to shutdown tokens), `location` (a bucket and a dir),
//!   `backoff` (the one retry policy);
//! - the AWS side, `aws`: the SDK clients, and `queue` (SQS), `batcher` (batched deletes
//!   and visibility changes), `storage` (S3 transfers), `metrics` (AWS request counts);
//! - the job pipeline, `job`: one job's stages in order, and `id` (the job's id),
//!   `prepare` (result check, download, allocation), `with_gpus` (bundle, upload, the
//!   wait for the result), `outcome` (how a job ends, what that means for its message),
//!   `claimed` (a job under its claim), `serverless` (a job as the Lambda jobs handler
//!   runs it), `event` (S3 notifications to objects), `bundle` (the `.tar.gz`), `claim`
//!   (the job's shared record in S3; `record`, what it says; `store`, its conditional
//!   writes; `guard`, the lease on our own clock), `results` (event-driven result
//!   detection), `workdir` (this run's files on disk);
//! - the Lambda front end, `lambda` (`orchgpu-lambda`): `config` (the daemon's `ORCHGPU_*`
//!   variables), `route` (which handler an event is for), `handler` (one sandbox's parts),
//!   `jobs`, `results` and `schedule` (the three handlers), `finish` (what they share);
//! - the GPUs: `reservations` (every GPU from the request to the confirmed release: the
//!   gate and replay, `ledger`, `journal` (crash-safe), `releaser`, `handover` (grants
//!   passed on through a claim)) and `scheduler`
//!   (the `GpuScheduler` trait; `ssgm`, the SSGM client; `reply`, its reply parser);
//! - the operator's view, `ops`: `telemetry` (metrics, liveness, readiness), `http` (the
//!   listener), `web` (the page for uploaders: `routes`, `upload`, `status`, `names`,
//!   `keys`, `cache`), `history` (the SQLite job timeline: `writer`, `reader`),
//!   `jobs_cmd` (`orchgpu jobs`), `notify` (systemd notify), `emf` (CloudWatch metric
//!   lines, for the Lambda function).
//!
//! Where a change goes: a new flag in `cli` (and `cli/values.rs` for its parser), wired in
//! `app`; a new metric in `ops::telemetry`; a new stage in `job`; what happens to a
//! message after a new kind of failure in `job::outcome`.
//!
//! Locks: every `std::sync::Mutex` of the crate is taken through [`lock`], which recovers
//! a poisoned lock rather than panic (see there why); tests may `expect`.

#![warn(unreachable_pub, missing_docs)]

pub mod app;
pub mod aws;
pub(crate) mod backoff;
pub mod cli;
pub mod daemon;
pub mod job;
pub mod lambda;
pub mod location;
pub mod ops;
pub mod reservations;
pub mod scheduler;
pub mod signal;

/// Wall-clock time in unix milliseconds (0 before 1970, saturating far after): the one
/// reading of the system clock that claims, reservations and jobs share.
pub(crate) fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Takes `mutex`, recovering it if a thread panicked while holding it: the crate's one
/// lock-poisoning policy.
///
/// Why recover and not `expect`: every critical section in the crate is one small change
/// (an insert, a remove, a count) that a panic cannot leave half-made, so the data behind
/// a poisoned lock is as good as before; and a daemon with jobs in flight must go on to
/// release their GPUs and return their messages, where `expect` would turn one task's
/// panic into a panic in every task that takes the lock afterwards. A critical section
/// that could leave its data half-changed must not use this (none does).
pub(crate) fn lock<T: ?Sized>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
