//! orchgpu's test kit, shared by the integration tests (`tests/integration/kit.rs`) and
//! the bench (`bench/suite/`): a per-test AWS stack on the emulator (buckets, queues,
//! notifications); the real daemon and the real function stand-in as processes of that
//! stack, whose logs are printed when it is dropped (unless turned off); the real mock
//! SSGM server, whose log is printed if the test panics; a proxy that stages outages, a
//! real Prometheus; a Lambda Runtime API and a player of the SQS event source mapping for
//! `orchgpu-lambda` (`lambda`; the binary `orchgpu-lambda-local` runs them by hand); and
//! readers for what they leave (JSON logs, `mock-ssgm -stats`, metrics). Each file owns
//! one of these parts; this root only re-exports them.
//!
//! The kit knows no build: the caller passes the emulator's URL and the binaries' paths in
//! a [`Kit`] (the tests from `CARGO_BIN_EXE_*`, the bench from `--bin-dir`). The tests'
//! emulator URL comes from `ORCHGPU_TEST_ENDPOINT` (default LocalStack on 127.0.0.1:4566);
//! `dev/test.sh` starts one. Every stack has its own bucket and queue names, so tests run
//! in parallel and never need an emulator reset.

mod daemon;
mod function;
mod http;
mod json_log;
mod kit;
mod lambda;
mod mock_ssgm;
mod process;
mod prometheus;
mod proxy;
mod queues;
mod stack;
mod wait;

pub use http::{http_address, http_get, metric_sum};
pub use json_log::{JsonLog, job_id, message, parse_rfc3339_us, timestamp_us};
pub use kit::{
    Bins, DEFAULT_ENDPOINT, Kit, clients, clients_at, emulator_config, emulator_config_at, endpoint,
};
pub use lambda::{
    Mapping, Outcome, Poll, RuntimeApi, lambda_env, response, scheduled_event, visible_messages,
};
pub use mock_ssgm::MockSsgm;
pub use process::Process;
pub use prometheus::Prometheus;
pub use proxy::Proxy;
pub use queues::{create_queue, notify, queue_arn};
pub use stack::Stack;
pub use wait::wait_for;
