//! What an operator can watch: the Prometheus metrics, liveness and readiness.
//!
//! One process-wide `Telemetry` (see `get`) holds every metric family under its fixed
//! name (dashboards and alerts in `deploy/` rely on them), the liveness stamps of the
//! receive loop and the job tasks, and whether the daemon is ready. The modules that know
//! an event happened record it here through small methods; this module decides nothing
//! about jobs, messages or GPUs. `http` serves what it holds; the systemd watchdog pings
//! only while `health` says the loop makes progress.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// How a job ended, for `orchgpu_jobs_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Its result appeared; the message was deleted.
    Succeeded,
    /// Its result was already there; nothing ran.
    Duplicate,
    /// It failed for a reason that may pass; the message comes back after a backoff.
    Returned,
    /// The message can never be a job (not an S3 event, a test event, a gone input).
    Dropped,
    /// A newer version of the object replaced the notified one.
    Superseded,
    /// Its message was no longer ours (lost receipt, 12-hour limit).
    Abandoned,
    /// No GPUs or no result within the deadline; returned for a retry.
    Deadline,
    /// Returned at shutdown.
    Stopped,
    /// Another daemon holds the job's claim; the message comes back later.
    Deferred,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Duplicate => "duplicate",
            Outcome::Returned => "returned",
            Outcome::Dropped => "dropped",
            Outcome::Superseded => "superseded",
            Outcome::Abandoned => "abandoned",
            Outcome::Deadline => "deadline",
            Outcome::Stopped => "stopped",
            Outcome::Deferred => "deferred",
        }
    }
}

/// A scheduler call's reply, for `orchgpu_scheduler_calls_total{call,reply}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerReply {
    Granted,
    Busy,
    /// The scheduler refused the request (`SSGM_ERROR=1`).
    Error,
    /// The reply could not be read.
    Garbage,
    Timeout,
    /// The client failed (non-zero exit, could not start).
    Failed,
    /// A release confirmed.
    Ok,
}

impl SchedulerReply {
    fn label(self) -> &'static str {
        match self {
            SchedulerReply::Granted => "granted",
            SchedulerReply::Busy => "busy",
            SchedulerReply::Error => "error",
            SchedulerReply::Garbage => "garbage",
            SchedulerReply::Timeout => "timeout",
            SchedulerReply::Failed => "failed",
            SchedulerReply::Ok => "ok",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    call: &'static str,
    reply: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AwsLabels {
    service: String,
    operation: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue: &'static str,
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

/// A series without labels in a family, so that it has no sample until one is set.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct NoLabels;

impl EncodeLabelSet for NoLabels {
    fn encode(&self, _encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        Ok(())
    }
}

type SecondsGauge = Gauge<f64, AtomicU64>;

/// How often the receive loop shows progress while it waits where it should.
pub const LOOP_TICK: Duration = Duration::from_secs(1);
/// How often each job task shows progress (sparser: there may be thousands).
pub const JOBS_TICK: Duration = Duration::from_secs(10);

/// Stage durations: 1 ms to about 9 minutes.
fn stage_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

/// Every metric, under its fixed name, and the liveness and readiness state.
pub struct Telemetry {
    registry: Registry,
    jobs: Family<OutcomeLabels, Counter>,
    jobs_running: Gauge,
    jobs_waiting_for_gpus: Gauge,
    gpus_held: Gauge,
    releases_pending: Gauge,
    reservation_oldest: SecondsGauge,
    release_failures: Counter,
    releases_given_up: Counter,
    gpu_seconds: Counter<f64, AtomicU64>,
    scheduler_calls: Family<CallLabels, Counter>,
    stage_duration: Family<StageLabels, Histogram, fn() -> Histogram>,
    job_duration: Histogram,
    aws_requests: Family<AwsLabels, Counter>,
    queue_messages: Family<QueueLabels, Gauge>,
    last_receive: SecondsGauge,
    history_write_failures: Counter,
    /// No sample until set: absent with `--no-history`, so no alert fires for it.
    history_enabled: Family<NoLabels, Gauge>,
    /// Unix milliseconds of the receive loop's last sign of progress.
    loop_tick_ms: AtomicI64,
    /// Unix milliseconds of the job tasks' last sign of progress.
    jobs_tick_ms: AtomicI64,
    ready: AtomicBool,
}

static TELEMETRY: LazyLock<Telemetry> = LazyLock::new(Telemetry::new);

/// The process's telemetry.
pub fn get() -> &'static Telemetry {
    &TELEMETRY
}

impl Telemetry {
    fn new() -> Telemetry {
        let mut registry = Registry::with_prefix("orchgpu");
        let t = Telemetry {
            jobs: Family::default(),
            jobs_running: Gauge::default(),
            jobs_waiting_for_gpus: Gauge::default(),
            gpus_held: Gauge::default(),
            releases_pending: Gauge::default(),
            reservation_oldest: SecondsGauge::default(),
            release_failures: Counter::default(),
            releases_given_up: Counter::default(),
            gpu_seconds: Counter::default(),
            scheduler_calls: Family::default(),
            stage_duration: Family::new_with_constructor(stage_histogram),
            job_duration: Histogram::new(exponential_buckets(0.01, 2.0, 20)),
            aws_requests: Family::default(),
            queue_messages: Family::default(),
            last_receive: SecondsGauge::default(),
            history_write_failures: Counter::default(),
            history_enabled: Family::default(),
            loop_tick_ms: AtomicI64::new(now_ms()),
            jobs_tick_ms: AtomicI64::new(now_ms()),
            ready: AtomicBool::new(false),
            registry: Registry::default(),
        };
        // prometheus-client adds `_total` to counters and the prefix to every name.
        registry.register("jobs", "Jobs ended, by outcome", t.jobs.clone());
        registry.register("jobs_running", "Jobs running now", t.jobs_running.clone());
        registry.register(
            "jobs_waiting_for_gpus",
            "Jobs waiting for the scheduler to grant GPUs",
            t.jobs_waiting_for_gpus.clone(),
        );
        registry.register(
            "gpus_held",
            "Reservations granted and not yet confirmed released, leftovers of a previous run included",
            t.gpus_held.clone(),
        );
        registry.register(
            "releases_pending",
            "Releases the background releaser still has to confirm",
            t.releases_pending.clone(),
        );
        registry.register(
            "reservation_oldest_seconds",
            "Age of the oldest reservation held, 0 when none",
            t.reservation_oldest.clone(),
        );
        registry.register(
            "release_failures",
            "Failed release attempts",
            t.release_failures.clone(),
        );
        registry.register(
            "releases_given_up",
            "Releases given up after failing too often (the scheduler may still hold the GPUs)",
            t.releases_given_up.clone(),
        );
        registry.register(
            "gpu_seconds",
            "GPUs times seconds from grant to confirmed release, counted at the release",
            t.gpu_seconds.clone(),
        );
        registry.register(
            "scheduler_calls",
            "SSGM calls, by call and reply",
            t.scheduler_calls.clone(),
        );
        registry.register(
            "stage_duration_seconds",
            "Duration of each completed job stage",
            t.stage_duration.clone(),
        );
        registry.register(
            "job_duration_seconds",
            "From a message's receive to its delete, for jobs that succeeded",
            t.job_duration.clone(),
        );
        registry.register(
            "aws_requests",
            "AWS request attempts, by service and operation (retries included)",
            t.aws_requests.clone(),
        );
        registry.register(
            "queue_messages",
            "Messages in the jobs queue and its dead-letter queue, by state (sampled)",
            t.queue_messages.clone(),
        );
        registry.register(
            "last_receive_timestamp_seconds",
            "Unix time of the last completed receive on the jobs queue",
            t.last_receive.clone(),
        );
        registry.register(
            "history_write_failures",
            "Job history writes that failed (jobs are never failed for it)",
            t.history_write_failures.clone(),
        );
        registry.register(
            "history_enabled",
            "1 while the job history is kept, 0 when it was asked for and could not be opened (absent with --no-history)",
            t.history_enabled.clone(),
        );
        let build_info = Family::<VersionLabels, Gauge>::default();
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "orchgpu's version", build_info);
        Telemetry { registry, ..t }
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    pub fn job_ended(&self, outcome: Outcome) {
        self.jobs
            .get_or_create(&OutcomeLabels {
                outcome: outcome.label(),
            })
            .inc();
    }

    /// Counts a job as running until the guard is dropped.
    pub fn job_running(&self) -> GaugeGuard<'_> {
        GaugeGuard::new(&self.jobs_running)
    }

    /// Counts a job as waiting for GPUs until the guard is dropped.
    pub fn waiting_for_gpus(&self) -> GaugeGuard<'_> {
        GaugeGuard::new(&self.jobs_waiting_for_gpus)
    }

    pub fn set_gpus_held(&self, held: u32) {
        self.gpus_held.set(i64::from(held));
    }

    pub fn set_releases_pending(&self, pending: usize) {
        self.releases_pending
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
    }

    pub fn set_oldest_reservation(&self, age: Duration) {
        self.reservation_oldest.set(age.as_secs_f64());
    }

    /// GPU time (GPUs × seconds) of a reservation confirmed released.
    pub fn gpu_time_released(&self, gpu_seconds: f64) {
        self.gpu_seconds.inc_by(gpu_seconds.max(0.0));
    }

    pub fn release_failed(&self) {
        self.release_failures.inc();
    }

    pub fn release_given_up(&self) {
        self.releases_given_up.inc();
    }

    /// `call` is `alloc` or `dealloc`.
    pub fn scheduler_call(&self, call: &'static str, reply: SchedulerReply) {
        self.scheduler_calls
            .get_or_create(&CallLabels {
                call,
                reply: reply.label(),
            })
            .inc();
    }

    pub fn stage_finished(&self, stage: &'static str, elapsed: Duration) {
        self.stage_duration
            .get_or_create(&StageLabels { stage })
            .observe(elapsed.as_secs_f64());
    }

    pub fn job_finished(&self, elapsed: Duration) {
        self.job_duration.observe(elapsed.as_secs_f64());
    }

    pub fn aws_request(&self, service: &str, operation: &str) {
        self.aws_requests
            .get_or_create(&AwsLabels {
                service: service.to_owned(),
                operation: operation.to_owned(),
            })
            .inc();
    }

    /// `queue` is `jobs` or `dead_letter`; `state` is `visible`, `in_flight` or `delayed`.
    pub fn set_queue_messages(&self, queue: &'static str, state: &'static str, count: u64) {
        self.queue_messages
            .get_or_create(&QueueLabels { queue, state })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// A receive on the jobs queue completed (with or without messages).
    pub fn received(&self) {
        self.last_receive.set(now_ms() as f64 / 1000.0);
        self.loop_progressed();
    }

    /// `lost` history events were not written (jobs are never failed for it).
    pub fn history_writes_failed(&self, lost: u64) {
        self.history_write_failures.inc_by(lost);
    }

    /// The receive loop is alive: it completed a step or is waiting where it should.
    /// Whether the job history asked for is kept (`false`: it could not be opened).
    pub fn set_history_enabled(&self, enabled: bool) {
        self.history_enabled
            .get_or_create(&NoLabels)
            .set(i64::from(enabled));
    }

    pub fn loop_progressed(&self) {
        self.loop_tick_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// A job task is alive (its heartbeat loop turned).
    pub fn jobs_progressed(&self) {
        self.jobs_tick_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Whether the receive loop showed progress within `stale_after`, and the job tasks,
    /// if any run, within three of their ticks (or `stale_after` if longer). The watchdog
    /// pings and `/healthz` answers 200 only while it is.
    pub fn health(&self, stale_after: Duration) -> Health {
        let jobs_stale_after = stale_after.max(JOBS_TICK * 3);
        let now = now_ms();
        let age = |stamp: &AtomicI64| {
            Duration::from_millis(u64::try_from(now - stamp.load(Ordering::Relaxed)).unwrap_or(0))
        };
        let loop_age = age(&self.loop_tick_ms);
        let running = self.jobs_running.get();
        let jobs_age = (running > 0).then(|| age(&self.jobs_tick_ms));
        Health {
            healthy: loop_age <= stale_after && jobs_age.is_none_or(|a| a <= jobs_stale_after),
            loop_age,
            jobs_age,
            jobs_running: running,
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// The answer of `Telemetry::health`.
#[derive(Debug, Clone, Copy)]
pub struct Health {
    pub healthy: bool,
    pub loop_age: Duration,
    pub jobs_age: Option<Duration>,
    pub jobs_running: i64,
}

/// Holds a gauge one higher until dropped.
pub struct GaugeGuard<'a>(&'a Gauge);

impl<'a> GaugeGuard<'a> {
    fn new(gauge: &'a Gauge) -> GaugeGuard<'a> {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_fixed_ones() {
        let t = Telemetry::new();
        t.job_ended(Outcome::Succeeded);
        t.scheduler_call("alloc", SchedulerReply::Busy);
        t.stage_finished("download", Duration::from_millis(3));
        t.aws_request("S3", "GetObject");
        t.set_queue_messages("jobs", "visible", 4);
        let text = t.encode();
        for line in [
            "orchgpu_jobs_total{outcome=\"succeeded\"} 1",
            "orchgpu_scheduler_calls_total{call=\"alloc\",reply=\"busy\"} 1",
            "orchgpu_stage_duration_seconds_count{stage=\"download\"} 1",
            "orchgpu_aws_requests_total{service=\"S3\",operation=\"GetObject\"} 1",
            "orchgpu_queue_messages{queue=\"jobs\",state=\"visible\"} 4",
            "orchgpu_jobs_running 0",
            "orchgpu_gpus_held 0",
            "orchgpu_releases_pending 0",
            "orchgpu_release_failures_total 0",
            "orchgpu_job_duration_seconds_count 0",
            "orchgpu_last_receive_timestamp_seconds 0",
            "orchgpu_jobs_waiting_for_gpus 0",
            "orchgpu_reservation_oldest_seconds 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert!(
            text.contains(&format!(
                "orchgpu_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
    }

    #[test]
    fn health_needs_recent_loop_progress_and_job_progress_while_jobs_run() {
        let t = Telemetry::new();
        let stale = Duration::from_secs(60);
        assert!(t.health(stale).healthy);
        t.loop_tick_ms.store(now_ms() - 120_000, Ordering::Relaxed);
        assert!(!t.health(stale).healthy, "a loop silent for 2 min");
        t.loop_progressed();
        assert!(t.health(stale).healthy);
        let running = t.job_running();
        t.jobs_tick_ms.store(now_ms() - 120_000, Ordering::Relaxed);
        assert!(!t.health(stale).healthy, "a job task silent for 2 min");
        drop(running);
        assert!(
            t.health(stale).healthy,
            "no job runs: the job stamp does not count"
        );
    }
}
