//! The orchgpu daemon's entry point: parse, log, connect, run, exit.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio::sync::{Notify, mpsc};
use tracing::{error, info, warn};

use orchgpu::aws::{AwsOptions, build_clients, error_chain};
use orchgpu::claim::{Claims, S3Store};
use orchgpu::cli::{Args, Config, LogFormat};
use orchgpu::daemon::{self, DaemonSettings, Shutdown};
use orchgpu::job::{JobContext, JobSettings, release_leftovers, run_releaser};
use orchgpu::journal::Journal;
use orchgpu::notify;
use orchgpu::queue::Queue;
use orchgpu::results::ResultRegistry;
use orchgpu::scheduler::{Ssgm, SsgmConfig};
use orchgpu::signal::Signals;
use orchgpu::workdir::WorkDir;

/// Exit codes, in one place: 0 clean exit (graceful shutdown included), 1 a fatal error
/// at run time, 2 a bad command line or configuration (as clap's own usage errors).
mod exit_codes {
    pub const OK: u8 = 0;
    pub const FATAL: u8 = 1;
    pub const BAD_CONFIG: u8 = 2;
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::try_from(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("orchgpu: error: {e}");
            return ExitCode::from(exit_codes::BAD_CONFIG);
        }
    };
    init_tracing(config.log_format);

    // One thread runs all async work. A job's own async work is a few hundred µs of
    // request building and bookkeeping between waits; file and journal I/O and the
    // bundle go to tokio's blocking pool. Measured (bench/run.sh --only throughput): 4.2
    // ms of CPU per job on one thread, 6.5 ms on the default worker per core, which
    // spends it in cross-thread wake-ups; throughput was no lower.
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            error!(error = %e, "Failed to start the async runtime.");
            return ExitCode::from(exit_codes::FATAL);
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => {
            info!("Stopped.");
            ExitCode::from(exit_codes::OK)
        }
        Err(e) => {
            error!(error = format!("{e:#}"), "Fatal error.");
            ExitCode::from(exit_codes::FATAL)
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ORCHGPU_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal, never in journald or a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let clients = build_clients(&AwsOptions {
        endpoint_url: config.endpoint_url.clone(),
        region: config.region.clone(),
        max_receive_wait: config.wait_time,
    })
    .await;
    let queue = Queue::resolve(clients.sqs.clone(), &config.queue)
        .await
        .context("cannot reach the jobs queue")?;
    warn_without_redrive(&queue).await;
    let requests = clients.requests.clone();
    let results_stop = tokio_util::sync::CancellationToken::new();
    let (results, results_task) = match &config.results_queue {
        Some(queue_ref) => {
            let results_queue = Queue::resolve(clients.sqs.clone(), queue_ref)
                .await
                .context("cannot reach the results queue")?;
            let registry = ResultRegistry::new();
            let task = tokio::spawn(orchgpu::results::run(
                results_queue,
                registry.clone(),
                results_stop.clone(),
            ));
            (Some(registry), Some(task))
        }
        None => (None, None),
    };

    // Inputs and bundles go to disk; what a killed run left there goes first.
    let (work_dir, removed) =
        WorkDir::open(&config.work_dir).context("cannot prepare the work dir")?;
    info!(work_dir = %work_dir.path().display(), removed, "Work dir ready.");

    let (journal, leftovers) =
        Journal::open(&config.state_dir).context("cannot open the reservation journal")?;
    let journal = Arc::new(journal);
    let scheduler = Arc::new(Ssgm::new(SsgmConfig {
        program: config.ssgm.clone(),
        host: config.scheduler_host.clone(),
        port: config.scheduler_port,
        call_timeout: config.ssgm_timeout,
        release_attempts: 3,
        release_retry_delay: std::time::Duration::from_secs(1),
    }));
    let scheduler_address = format!("{}:{}", config.scheduler_host, config.scheduler_port);
    let gpus_freed = Arc::new(Notify::new());
    let (release_tx, release_rx) = mpsc::unbounded_channel();
    let releaser = tokio::spawn(run_releaser(
        scheduler.clone(),
        release_rx,
        gpus_freed.clone(),
        journal.clone(),
    ));
    // Whatever a previous run still held goes back before new work starts.
    let found = leftovers.len();
    let (released, kept) = release_leftovers(
        &*scheduler,
        &journal,
        leftovers,
        &scheduler_address,
        &release_tx,
    )
    .await;
    info!(
        state_dir = %config.state_dir.display(),
        found,
        released,
        kept,
        "Journal replayed."
    );

    let mut jobs = JobContext::new(
        clients.s3,
        scheduler,
        JobSettings {
            gpus: config.gpus.get(),
            intermediate: config.intermediate.clone(),
            output: config.output.clone(),
            result_suffix: config.result_suffix.clone(),
            result_poll_interval: config.result_poll_interval,
            result_deadline: config.result_deadline,
            alloc_retry_interval: config.alloc_retry_interval,
            alloc_deadline: config.alloc_deadline,
            work_dir: work_dir.path().to_path_buf(),
            scheduler_address,
        },
        gpus_freed,
        release_tx,
        journal,
    );
    jobs.results = results;
    if let Some(place) = &config.claims {
        let store = S3Store::new(jobs.s3.clone(), place.bucket.clone());
        let claims = Claims::new(Box::new(store), &place.dir, config.claim_lease);
        let context = || format!("cannot reach the claims location {place} (--claims)");
        claims.check().await.with_context(context)?;
        jobs.claims = Some(claims);
    }
    let jobs = Arc::new(jobs);

    let shutdown = Shutdown::new();
    let signals = Signals::install().context("cannot install the signal handlers")?;
    tokio::spawn(signals.forward(shutdown.clone()));
    // The queue is reached, the journal replayed and signals handled: tell systemd.
    notify::ready(&format!("Receiving jobs from {}.", queue.url()));

    daemon::run(
        queue,
        jobs,
        DaemonSettings {
            max_jobs: config.max_jobs.get(),
            wait_time: config.wait_time,
            visibility_timeout: config.visibility_timeout,
            empty_pause: config.empty_pause,
            retry_backoff: config.retry_backoff,
            shutdown_grace: config.shutdown_grace,
        },
        shutdown,
    )
    .await;
    // Every job has ended, so the last sender is gone: the releaser drains and stops.
    releaser.await.context("the releaser task failed")?;
    results_stop.cancel();
    if let Some(task) = results_task {
        task.await.context("the results task failed")?;
    }
    requests.log_totals();
    if let Some(path) = &config.stats_file
        && let Err(e) = requests.write_json(path)
    {
        warn!(path = %path.display(), error = %e, "Cannot write the stats file.");
    }
    Ok(())
}

/// Without a redrive policy a poison message is retried forever: say so at start-up.
async fn warn_without_redrive(queue: &Queue) {
    use aws_sdk_sqs::types::QueueAttributeName;
    match queue.attribute(QueueAttributeName::RedrivePolicy).await {
        Ok(Some(_)) => {}
        Ok(None) => warn!(
            queue = %queue.url(),
            "The jobs queue has no redrive policy: a message that always fails is retried forever."
        ),
        Err(e) => warn!(error = %error_chain(&e), "Cannot read the jobs queue's redrive policy."),
    }
}
