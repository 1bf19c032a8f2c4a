//! Builds and runs the daemon from a validated `Config`: the wiring of every module, in
//! the order start-up needs (signals, listener, queues, work dir, claims, journal,
//! reservations, history, jobs, observers), so that `main` only parses, sets up logging,
//! calls `run` and maps its outcome to an exit code, and a second front end can reuse the
//! same assembly. *(mini-redis `server::run`)*

use std::sync::Arc;

use anyhow::Context;
use tracing::{error, info, warn};

use crate::aws::queue::Queue;
use crate::aws::{AwsOptions, build_clients, credentials_problem, error_chain};
use crate::cli::{Config, LogFormat};
use crate::daemon::{self, DaemonSettings, Shutdown};
use crate::job::claim::{Claims, S3Store};
use crate::job::results::ResultRegistry;
use crate::job::workdir::WorkDir;
use crate::job::{JobContext, JobSettings};
use crate::ops::history::History;
use crate::ops::notify;
use crate::ops::telemetry;
use crate::reservations::{Journal, ReservationSettings, Reservations};
use crate::scheduler::{Ssgm, SsgmConfig};

/// Caps glibc's malloc arenas at two; call it first thing in `main`, before any thread.
///
/// glibc gives threads that allocate at the same time arenas of their own (up to 8 per
/// core), and memory freed in one arena serves only that arena: after the blocking pool's
/// threads have written a burst of inputs and bundles, each arena keeps its high-water
/// mark. With two, 200 waiting jobs held 13–18 MB of anonymous memory instead of 22–27 MB
/// (BENCHMARKS.md, "Memory (issue 17)"). `MALLOC_ARENA_MAX` in the environment wins.
pub fn cap_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a tunable of glibc's allocator; `main` calls this
        // before any other thread exists, and a refused value (result 0) leaves glibc's
        // default in place, which is harmless.
        unsafe {
            nix::libc::mallopt(nix::libc::M_ARENA_MAX, 2);
        }
    }
}

/// Sets up logging to stderr, as text or JSON; `ORCHGPU_LOG` overrides the filter.
pub fn init_logging(format: LogFormat) {
    // The SDK's own warnings (each failed credentials or region source, with its
    // internals) only repeat, at length, what the one fatal error line says.
    let filter = tracing_subscriber::EnvFilter::try_from_env("ORCHGPU_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,aws_config=error"));
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

/// Runs the daemon until `shutdown` (wired to the signals by the caller) and every job has
/// ended; start-up errors come back with their context.
///
/// # Errors
/// A start-up failure (listener, queues, work dir, claims location, journal) or a task
/// that failed; the caller maps it to exit code 1.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    info!(
        stop_budget_s = config.stop_budget().as_secs(),
        start_budget_s = config.start_budget().as_secs(),
        "Worst-case start and stop times with these flags (TimeoutStartSec and TimeoutStopSec must cover them)."
    );
    // Bound first: a port in use is a start-up error, before anything else is touched.
    let http = match config.http_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--http-listen)"))?,
        ),
        None => None,
    };
    let clients = build_clients(&AwsOptions {
        endpoint_url: config.endpoint_url.clone(),
        region: config.region.clone(),
    })
    .await;
    let custom_endpoint = clients.custom_endpoint;
    let queue = Queue::resolve(clients.sqs.clone(), &config.queue)
        .await
        .map_err(|e| startup_error(e, "cannot reach the jobs queue", custom_endpoint))?;
    let requests = clients.requests.clone();
    let results_stop = tokio_util::sync::CancellationToken::new();
    let (results, results_task) = match &config.results_queue {
        Some(queue_ref) => {
            let results_queue = Queue::resolve(clients.sqs.clone(), queue_ref)
                .await
                .map_err(|e| startup_error(e, "cannot reach the results queue", custom_endpoint))?;
            let registry = ResultRegistry::new();
            let task = tokio::spawn(crate::job::results::run(
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

    // Jobs must be able to write and delete their claims: checked before anything else
    // runs, so a missing permission fails at start-up, not every job.
    let claims = match &config.claims {
        Some(place) => {
            let store = S3Store::new(clients.s3.clone(), place.bucket.clone());
            let claims = Claims::new(Box::new(store), &place.dir, config.claim_lease);
            claims.check().await.with_context(|| {
                format!(
                    "cannot write and delete claims in s3://{}/{} (--claims): jobs need \
                     s3:PutObject and s3:DeleteObject there; --claims off for a daemon alone on its queue",
                    place.bucket, place.dir
                )
            })?;
            Some(claims)
        }
        None => None,
    };
    let (journal, leftovers) =
        Journal::open(&config.state_dir).context("cannot open the reservation journal")?;
    info!(
        state_dir = %config.state_dir.display(),
        reservations = leftovers.reservation_count(),
        calls = leftovers.call_count(),
        "Journal read; releasing what a previous run left in the background."
    );
    let ssgm = SsgmConfig {
        program: config.ssgm.clone(),
        host: config.scheduler_host.clone(),
        port: config.scheduler_port,
        call_timeout: config.ssgm_timeout,
        scratch_dir: config.state_dir.clone(),
    };
    let worst_call = ssgm.worst_call();
    let (reservations, releaser) = Reservations::start(
        Arc::new(Ssgm::new(ssgm)),
        Arc::new(journal),
        leftovers,
        ReservationSettings {
            gpus: config.gpus.get(),
            alloc_retry_interval: config.alloc_retry_interval,
            alloc_deadline: config.alloc_deadline,
            scheduler_address: format!("{}:{}", config.scheduler_host, config.scheduler_port),
        },
        worst_call,
        claims
            .clone()
            .map(|c| Arc::new(c) as Arc<dyn crate::reservations::GrantRecords>),
    );
    // A history that cannot be opened never stops the daemon: jobs run without it.
    // The gauge lets an alert see it (orchgpu_history_enabled 0).
    let history = match config.history {
        Some(retention) => {
            let history = History::open(&config.state_dir, retention).unwrap_or_else(|e| {
                error!(error = %error_chain(&e), "Cannot open the job history; running without it.");
                History::disabled()
            });
            telemetry::get().set_history_enabled(history.is_enabled());
            history
        }
        None => History::disabled(),
    };
    let web = crate::ops::web::WebSettings {
        s3: clients.s3.clone(),
        upload_to: config.upload_to.clone(),
        upload_max_bytes: config.upload_max_bytes,
        upload_max_concurrent: config.upload_max_concurrent.get(),
        upload_disk_budget: config.upload_disk_budget,
        token: config.http_token.clone(),
        output: config.output.clone(),
        result_suffix: config.result_suffix.clone(),
        claims: claims.clone(),
        state_dir: config.state_dir.clone(),
        work_dir: work_dir.path().to_path_buf(),
        title: config.web_title.clone(),
        hint: config.web_hint.clone(),
    };
    let jobs = Arc::new(JobContext::new(
        clients.s3,
        Arc::new(reservations),
        JobSettings {
            intermediate: config.intermediate.clone(),
            output: config.output.clone(),
            result_suffix: config.result_suffix.clone(),
            result_poll_interval: config.result_poll_interval,
            result_deadline: config.result_deadline,
            work_dir: work_dir.path().to_path_buf(),
            serverless: false,
        },
        results,
        claims,
        history.clone(),
    ));

    // The queue is reached and the journal read: tell systemd.
    telemetry::get().set_ready(true);
    notify::ready(&format!("Receiving jobs from {}.", queue.url()));
    tokio::spawn(warn_without_redrive(queue.clone()));
    let observers = tokio_util::sync::CancellationToken::new();
    if let Some(listener) = http {
        let address = listener
            .local_addr()
            .context("the listener has no address")?;
        let settings = crate::ops::http::ServeSettings {
            stale_after: daemon::STALE_AFTER,
            header_timeout: config.http_header_timeout,
            body_timeout: config.http_body_timeout,
            hosts: crate::ops::http::AllowedHosts::new(address, &config.http_allowed_hosts),
        };
        let web = crate::ops::web::router(web).context("cannot draw the web page's key")?;
        info!(%address, "Serving /metrics, /healthz, /readyz and the web page at /.");
        tokio::spawn(crate::ops::http::serve(
            listener,
            settings,
            web,
            observers.clone(),
        ));
        tokio::spawn(crate::aws::queue::sample_depths(
            queue.clone(),
            QUEUE_SAMPLE_INTERVAL,
            observers.clone(),
        ));
    }
    if let Some(interval) = notify::watchdog_interval() {
        tokio::spawn(watchdog(interval, observers.clone()));
    }

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
            drain: config.drain,
        },
        shutdown,
    )
    .await;
    // Every job has ended and `jobs` is gone with `daemon::run`, so the releaser's last
    // sender is gone too: it makes its last pass and stops.
    releaser.await.context("the releaser task failed")?;
    observers.cancel();
    // The last events of the jobs reach the history before the process ends.
    let flushed = tokio::task::spawn_blocking(move || history.flush(HISTORY_FLUSH)).await;
    if !matches!(flushed, Ok(true)) {
        warn!("The job history's last events may be missing: its writer did not finish in time.");
    }
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

/// How long the job history's writer gets at exit for its last events.
const HISTORY_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

/// How often the queue depths are sampled for `/metrics`.
const QUEUE_SAMPLE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// Pings the systemd watchdog twice per interval, but only while the receive loop (and
/// the job tasks) show progress: a wedged daemon stops pinging and systemd restarts it.
/// The loop counts as stalled after half the interval without progress (at least three
/// of its ticks, at most `daemon::STALE_AFTER`), so the pings stop before systemd's
/// deadline.
async fn watchdog(interval: std::time::Duration, stop: tokio_util::sync::CancellationToken) {
    let stale_after = (interval / 2).clamp(telemetry::LOOP_TICK * 3, daemon::STALE_AFTER);
    let mut warned = false;
    loop {
        let health = telemetry::get().health(stale_after);
        if health.healthy {
            notify::watchdog();
            warned = false;
        } else if !warned {
            error!(
                loop_idle_s = health.loop_age.as_secs(),
                "The receive loop shows no progress; not pinging the watchdog."
            );
            warned = true;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval / 2) => {}
        }
    }
}

/// A first request that failed: missing credentials say only what to set (the SDK's
/// chain of causes is long and names every source it tried); anything else keeps its
/// context and causes.
fn startup_error(
    error: impl std::error::Error + Send + Sync + 'static,
    context: &'static str,
    custom_endpoint: bool,
) -> anyhow::Error {
    match credentials_problem(&error, custom_endpoint) {
        Some(problem) => anyhow::anyhow!(problem),
        None => anyhow::Error::new(error).context(context),
    }
}

/// Without a redrive policy a poison message is retried forever: say so at start-up.
async fn warn_without_redrive(queue: Queue) {
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
