//! What every stack needs from its caller (the emulator's URL, the binaries' paths, the
//! checkout), SDK clients for the emulator, and the environment every spawned process gets.

use std::path::{Path, PathBuf};
use std::process::Command;

/// LocalStack's usual address, the emulator the tests use unless told otherwise.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:4566";

/// The emulator the tests use: `ORCHGPU_TEST_ENDPOINT`, or LocalStack's default port.
pub fn endpoint() -> String {
    std::env::var("ORCHGPU_TEST_ENDPOINT").unwrap_or_else(|_| DEFAULT_ENDPOINT.to_string())
}

/// The binaries under test, by path: the caller knows where its build put them (the
/// integration tests from `CARGO_BIN_EXE_*`, the bench from `--bin-dir`).
#[derive(Clone, Debug)]
pub struct Bins {
    pub orchgpu: PathBuf,
    pub mock_ssgm: PathBuf,
    pub function: PathBuf,
}

impl Bins {
    /// The three binaries as a build leaves them in one directory.
    pub fn in_dir(dir: &Path) -> Bins {
        Bins {
            orchgpu: dir.join("orchgpu"),
            mock_ssgm: dir.join("mock-ssgm"),
            function: dir.join("orchgpu-function"),
        }
    }
}

/// What every stack needs from its caller: the emulator, the binaries and the checkout
/// (for the function scripts).
#[derive(Clone, Debug)]
pub struct Kit {
    pub endpoint: String,
    pub bins: Bins,
    pub repo: PathBuf,
}

impl Kit {
    /// A file of the checkout.
    pub fn repo_path(&self, relative: &str) -> PathBuf {
        self.repo.join(relative)
    }
}

/// SDK clients for the emulator at `endpoint()`, with its dummy credentials.
pub async fn clients() -> (aws_sdk_s3::Client, aws_sdk_sqs::Client) {
    clients_at(&endpoint()).await
}

/// SDK clients for the emulator at `endpoint`, with its dummy credentials.
pub async fn clients_at(endpoint: &str) -> (aws_sdk_s3::Client, aws_sdk_sqs::Client) {
    let shared = emulator_config_at(endpoint).await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(true)
            .build(),
    );
    let sqs = aws_sdk_sqs::Client::new(&shared);
    (s3, sqs)
}

/// The shared SDK configuration for the emulator at `endpoint()`: its endpoint, region
/// and dummy credentials.
pub async fn emulator_config() -> aws_config::SdkConfig {
    emulator_config_at(&endpoint()).await
}

/// The shared SDK configuration for the emulator at `endpoint`.
pub async fn emulator_config_at(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            "test",
            "test",
            None,
            None,
            "orchgpu-tests",
        ))
        .load()
        .await
}

/// Environment for every spawned process: the emulator and its dummy credentials, and a
/// log filter unless the caller chose one.
pub(crate) fn aws_env(command: &mut Command, endpoint: &str) {
    let has_filter = command.get_envs().any(|(name, _)| name == "ORCHGPU_LOG");
    command
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("ORCHGPU_ENDPOINT_URL", endpoint)
        .env_remove("AWS_PROFILE");
    if !has_filter {
        command.env(
            "ORCHGPU_LOG",
            "info,aws_config=warn,aws_smithy_runtime=warn",
        );
    }
}
