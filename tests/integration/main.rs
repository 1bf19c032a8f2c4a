//! Integration tests: the real binaries against a real S3/SQS emulator.
//! One test binary (see Cargo.toml), one module per area.

mod deadlines;
mod deploy_files;
mod harness;
mod inference;
mod mock_ssgm;
mod pipeline;
mod reliability;
mod scheduler_faults;
mod soak;
mod ssgm_client;
mod startup;
mod systemd_notify;
