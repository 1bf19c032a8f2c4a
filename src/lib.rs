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
//! (the `.tar.gz`), `job` (one job's stages), `daemon` (the receive loop and shutdown),
//! `journal` (crash-safe record of reservations), `signal` (SIGTERM/SIGINT to shutdown
//! tokens), `notify` (the systemd notify protocol), `metrics` (AWS request counts),
//! `results` (event-driven result detection), `workdir` (this run's files on disk).

pub mod aws;
pub mod batcher;
pub mod bundle;
pub mod claim;
pub mod cli;
pub mod daemon;
pub mod event;
pub mod job;
pub mod journal;
pub mod metrics;
pub mod notify;
pub mod queue;
pub mod results;
pub mod scheduler;
pub mod signal;
pub mod storage;
pub mod workdir;
