//! Integration tests: the real binaries against a real S3/SQS emulator.
//! One test binary (see Cargo.toml), one module per area.

mod claims;
mod deadlines;
mod deploy_files;
mod harness;
mod inference;
mod large_input;
mod mock_ssgm;
mod multipart;
mod pipeline;
mod reliability;
mod results_queue;
mod scheduler_faults;
mod soak;
mod ssgm_client;
mod startup;
mod systemd_notify;
