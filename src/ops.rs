//! The operator's view: what orchgpu shows of itself and takes from the people around it.
//! `telemetry` (Prometheus metrics, liveness, readiness), `http` (the listener that serves
//! them and the page), `web` (the page for uploaders and its API), `history` (the SQLite
//! job timeline), `jobs_cmd` (`orchgpu jobs`: the history as a table or JSON) and `notify`
//! (the systemd notify protocol), `emf` (CloudWatch metric lines, for the Lambda function).
//! None of them decides what happens to a job or a message.

pub(crate) mod emf;
pub mod history;
pub mod http;
pub mod jobs_cmd;
pub mod notify;
pub mod telemetry;
pub mod web;
