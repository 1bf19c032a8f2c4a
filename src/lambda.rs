//! `orchgpu-lambda`: the same jobs driven by AWS Lambda instead of the daemon's receive
//! loop (see docs/serverless.md for the state machine and the crash windows).
//!
//! One function answers three kinds of events: records of the jobs queue (`jobs`), records
//! of the results queue (`results`) and a scheduled event (`schedule`). `route` tells them
//! apart, `config` reads the daemon's own `ORCHGPU_*` variables, `handler` builds the
//! shared parts once per sandbox and serves the invocations. The job stages, the claim,
//! the reservations, the bundle and the SSGM client are the daemon's.

mod config;
mod finish;
mod handler;
mod jobs;
mod results;
mod route;
mod schedule;

pub use config::{LambdaConfig, LambdaConfigError};
pub use handler::run;
