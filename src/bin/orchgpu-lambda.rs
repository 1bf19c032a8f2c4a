//! The Lambda function's entry point: configuration from the `ORCHGPU_*` environment,
//! logging, then the Lambda Runtime API loop (`AWS_LAMBDA_RUNTIME_API`). The handlers are
//! the library's (`orchgpu::lambda`).

use std::process::ExitCode;

/// Exit codes as the daemon's: 1 a fatal error, 2 a bad configuration.
const FATAL: u8 = 1;
const BAD_CONFIG: u8 = 2;

fn main() -> ExitCode {
    orchgpu::app::cap_malloc_arenas();
    let config = match orchgpu::lambda::LambdaConfig::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("orchgpu-lambda: error: {e}");
            return ExitCode::from(BAD_CONFIG);
        }
    };
    orchgpu::app::init_logging(config.config().log_format);
    let outcome = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(orchgpu::lambda::run(config)));
    match outcome {
        // The Runtime API loop only ends on an error.
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "Fatal error.");
            ExitCode::from(FATAL)
        }
    }
}
