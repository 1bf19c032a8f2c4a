//! Integration tests: the real binaries against a real S3/SQS emulator.
//! One test binary (see Cargo.toml), one module per area.

mod alert_rules;
mod claims;
mod crash_windows;
mod deadlines;
mod deploy_files;
mod drain;
mod history_cmd;
mod inference;
// The tests' door to the test kit (testkit/); the tests name it `harness`.
mod kit;
mod lambda;
use kit as harness;
mod large_input;
mod mock_ssgm;
mod multipart;
mod observe;
pub(crate) mod ocr;
mod pipeline;
pub(crate) mod reliability;
mod results_queue;
mod scheduler_faults;
mod soak;
mod ssgm_client;
mod startup;
mod systemd_notify;
mod web;
