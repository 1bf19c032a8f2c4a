//! The orchgpu daemon's entry point: parse, log, run, exit. The wiring is the library's
//! (`orchgpu::app`).

use std::process::ExitCode;

use clap::Parser;
use tracing::{error, info};

use orchgpu::cli::{Args, Config};
use orchgpu::daemon::Shutdown;
use orchgpu::signal::Signals;

/// Exit codes: 0 clean exit (graceful shutdown included), 1 a fatal error at run time, 2 a
/// bad command line or configuration (as clap's own usage errors).
const OK: u8 = 0;
const FATAL: u8 = 1;
const BAD_CONFIG: u8 = 2;

fn main() -> ExitCode {
    orchgpu::app::cap_malloc_arenas();
    if let Some(argv) = orchgpu::cli::jobs_argv(std::env::args_os()) {
        return ExitCode::from(orchgpu::ops::jobs_cmd::main(argv));
    }
    let config = match Config::try_from(Args::parse()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("orchgpu: error: {e}");
            return ExitCode::from(BAD_CONFIG);
        }
    };
    orchgpu::app::init_logging(config.log_format);
    // tokio's default multi-thread runtime: measured side by side with a one-thread one
    // (bench/run.sh --only throughput), one thread used no less CPU per job.
    let outcome = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| {
            runtime.block_on(async {
                // Installed first, so a SIGTERM during start-up is a clean stop.
                let shutdown = Shutdown::new();
                let signals = Signals::install()
                    .map_err(|e| anyhow::anyhow!("cannot install the signal handlers: {e}"))?;
                tokio::spawn(signals.forward(shutdown.clone()));
                orchgpu::app::run(config, shutdown).await
            })
        });
    match outcome {
        Ok(()) => {
            info!("Stopped.");
            ExitCode::from(OK)
        }
        Err(e) => {
            error!(error = format!("{e:#}"), "Fatal error.");
            ExitCode::from(FATAL)
        }
    }
}
