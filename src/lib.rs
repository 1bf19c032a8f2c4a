//! orchgpu: turns S3 uploads into GPU jobs on remote GPUs.
//!
//! An S3 `ObjectCreated` notification arrives on an SQS queue; orchgpu asks the rCUDA
//! scheduler for GPUs through its SSGM client, uploads a bundle (input + reservation) to
//! the intermediate bucket, where a SCAR function picks it up, waits for the function's
//! result in the output bucket, releases the GPUs and only then deletes the message.
//!
//! Modules, one concern each: `cli` (flags to a validated `Config`), `aws` (SDK clients),
//! `claim` (the cross-daemon claim of a job id in S3), `queue` (SQS), `batcher` (batched deletes and visibility changes on the jobs queue),
//! `storage` (S3 transfers), `event` (notification parsing), `scheduler` (SSGM), `bundle`
//! (the `.tar.gz`), `job` (one job's stages), `reservations` (every GPU from the request
//! to the confirmed release: gate, ledger, crash-safe journal, releaser, replay),
//! `daemon` (the receive loop and shutdown), `signal` (SIGTERM/SIGINT to shutdown
//! tokens), `notify` (the systemd notify protocol), `metrics` (AWS request counts),
//! `results` (event-driven result detection), `backoff` (the one retry policy),
//! `telemetry` (Prometheus metrics, liveness, readiness), `http` (the listener that
//! serves them), `web` (the page for uploaders and its API, on that listener), `history` (the SQLite job timeline), `jobs_cmd` (`orchgpu jobs`: the
//! history as a table or JSON), `claim` (the cross-daemon claim of a job id in S3) and
//! `workdir` (this run's files on disk).
//!
//! Locks: every `std::sync::Mutex` of the crate is taken through [`lock`], which recovers
//! a poisoned lock rather than panic (see there why); tests may `expect`.

pub mod app;
pub mod aws;
pub(crate) mod backoff;
pub(crate) mod batcher;
pub(crate) mod bundle;
pub mod claim;
pub mod cli;
pub mod daemon;
pub mod event;
pub mod history;
pub mod http;
pub mod job;
pub mod jobs_cmd;
pub mod location;
pub mod metrics;
pub mod notify;
pub mod queue;
pub mod reservations;
pub mod results;
pub mod scheduler;
pub mod signal;
pub mod storage;
pub mod telemetry;
pub mod web;
pub mod workdir;

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
