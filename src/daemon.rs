//! The receive loop: job slots, message handling, visibility heartbeats and shutdown.
//!
//! One task per message. The loop never takes more messages than there are free job
//! slots, and takes none while a job waits for the scheduler to free GPUs. Each message's
//! visibility is extended while its jobs run: a heartbeat every half visibility timeout,
//! one at a time, which may wait a short window (a tenth of the interval, at most 1 s) so
//! that heartbeats due about together share a `ChangeMessageVisibilityBatch`. A failed
//! heartbeat is retried within seconds, with backoff, and always before the visibility
//! it had runs out (`HeartbeatSchedule`). The job's
//! end never waits for a heartbeat; one not yet sent is withdrawn. What happens to a
//! message then is decided by `Disposition`; deletes and returns go out at once, batched
//! only with requests already waiting (see `batcher`), and are sent before `run` returns.
//!
//! Shutdown follows two tokens: `stop` (stop receiving, let running jobs finish) and
//! `abort` (cancel running jobs: they release their GPUs and return their messages).
//! `stop` is a child of `abort`. Signals are wired in `main`, not here.
//!
//! With `--drain` the loop also ends by itself, once the queue has nothing new for it and
//! no job runs, and a failed job's message is held hidden until the run ends instead of
//! coming back into it; the rules and what a crash does then are in `drain`.

mod drain;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::aws::batcher::{QueueBatcher, Reply};
use crate::aws::error_chain;
use crate::aws::queue::MAX_VISIBILITY;
use crate::aws::queue::{Queue, QueueError, ReceivedMessage};
use crate::backoff::Backoff;
use crate::job::event::{Notification, parse_notification};
use crate::job::{Disposition, JobCancel, JobContext, JobError, JobOutcome};
use crate::ops::history::{self, EventKind};
use crate::ops::telemetry::{self, Outcome};
use crate::scheduler::GpuScheduler;

/// SQS returns at most ten messages per receive.
const MAX_BATCH: usize = 10;
/// Longest pause between receive attempts while SQS is failing.
const MAX_RECEIVE_BACKOFF: Duration = Duration::from_secs(30);
/// Retry backoff cap for failed jobs.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(15 * 60);
/// Safety margin under SQS's 12-hour visibility limit.
const VISIBILITY_MARGIN: Duration = Duration::from_secs(60);
/// How much of a message body a drop log line quotes.
const BODY_GIST_CHARS: usize = 160;
/// How long the loop (or, while jobs run, the job tasks) may show no progress before the
/// daemon counts as unhealthy for `/healthz`.
pub(crate) const STALE_AFTER: Duration = Duration::from_secs(30);
/// Longest wait of a heartbeat for others to share its request.
const MAX_HEARTBEAT_WINDOW: Duration = Duration::from_secs(1);
/// First retry of a failed heartbeat; the retries double up to the heartbeat interval.
const HEARTBEAT_RETRY_FIRST: Duration = Duration::from_secs(1);
/// Never retry a failed heartbeat sooner than this.
const HEARTBEAT_RETRY_MIN: Duration = Duration::from_millis(250);
/// First pause after a failed receive; doubles up to `MAX_RECEIVE_BACKOFF`.
const RECEIVE_BACKOFF_FIRST: Duration = Duration::from_secs(2);

/// Loop settings taken from the configuration.
#[derive(Debug, Clone)]
pub(crate) struct DaemonSettings {
    pub(crate) max_jobs: usize,
    pub(crate) wait_time: Duration,
    pub(crate) visibility_timeout: Duration,
    pub(crate) empty_pause: Duration,
    pub(crate) retry_backoff: Duration,
    pub(crate) shutdown_grace: Duration,
    /// `--drain`: end once the queue has nothing new and no job runs (see `drain`).
    pub(crate) drain: bool,
}

/// How the daemon is told to stop.
#[derive(Debug, Clone)]
pub struct Shutdown {
    /// Stop receiving; running jobs may finish within the grace period.
    pub(crate) stop: CancellationToken,
    /// Cancel running jobs now: release GPUs, return messages.
    pub(crate) abort: CancellationToken,
}

impl Shutdown {
    /// A new value with nothing recorded yet.
    pub fn new() -> Shutdown {
        let abort = CancellationToken::new();
        Shutdown {
            stop: abort.child_token(),
            abort,
        }
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

/// Runs the daemon until `shutdown.stop` fires and every job has ended.
///
/// Returns once no job is running, every dropped reservation has been released and every
/// delete and visibility change of the jobs' messages has been sent.
pub(crate) async fn run<S: GpuScheduler + Send + Sync + 'static>(
    queue: Queue,
    jobs: Arc<JobContext<S>>,
    settings: DaemonSettings,
    shutdown: Shutdown,
) {
    let heartbeat_window =
        (heartbeat_interval(settings.visibility_timeout) / 10).min(MAX_HEARTBEAT_WINDOW);
    let (batcher, lanes) = QueueBatcher::start(queue.clone(), heartbeat_window);
    let slots = Arc::new(Semaphore::new(settings.max_jobs));
    let tracker = TaskTracker::new();
    let mut receive_failures: u32 = 0;
    let mut receive_backoff =
        Backoff::new(RECEIVE_BACKOFF_FIRST, MAX_RECEIVE_BACKOFF).with_jitter();
    let mut last_failure_log: Option<Instant> = None;
    let stop = shutdown.stop.clone();
    let drain = settings.drain.then(|| Arc::new(drain::Drain::default()));
    let wait_time = match drain {
        Some(_) => drain::wait_time(settings.wait_time),
        None => settings.wait_time,
    };
    let mut drained = false;

    info!(queue = %queue.url(), max_jobs = settings.max_jobs, drain = settings.drain, "Receiving jobs.");
    let mut receives: u64 = 0;
    loop {
        telemetry::get().loop_progressed();
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            permit = ticking(slots.clone().acquire_owned()) => permit.expect("the slot semaphore is never closed"),
        };
        // A job waiting for GPUs holds the gate: new messages would only wait too.
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = ticking(jobs.reservations().until_gate_free()) => {}
        }
        let wanted = (1 + slots.available_permits()).min(MAX_BATCH);
        // A receive in flight is not dropped on the first signal: SQS may already have
        // handed it messages, which would stay hidden for the visibility timeout. It ends
        // within the long-poll wait, and whatever it got is returned at once.
        let received = tokio::select! {
            biased;
            _ = shutdown.abort.cancelled() => break,
            received = ticking(queue.receive(wanted, wait_time, settings.visibility_timeout)) => received,
        };
        receives += 1;
        debug_wedge(receives).await;
        if stop.is_cancelled() {
            if let Ok(messages) = received {
                return_now(&batcher, &messages).await;
            }
            break;
        }
        let messages = match received {
            Ok(messages) => {
                telemetry::get().received();
                if receive_failures > 0 {
                    info!(failures = receive_failures, "Queue reachable again.");
                }
                receive_failures = 0;
                receive_backoff.reset();
                messages
            }
            Err(e) => {
                receive_failures += 1;
                // One line per outage interval, not one per failed call.
                if last_failure_log.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                    warn!(failures = receive_failures, error = %error_chain(&e), "Receive failed; retrying.");
                    last_failure_log = Some(Instant::now());
                }
                if sleep_or_stop(receive_backoff.next_delay(), &stop).await {
                    break;
                }
                continue;
            }
        };
        let messages = match &drain {
            Some(drain) => {
                let (new, again) = drain.sort(messages);
                drain::hold(&batcher, drain, &again, settings.retry_backoff).await;
                new
            }
            None => messages,
        };
        if messages.is_empty() {
            drop(permit);
            if drain.is_some() && drain::finished(messages.len(), tracker.len()) {
                drained = true;
                break;
            }
            if sleep_or_stop(settings.empty_pause, &stop).await {
                break;
            }
            continue;
        }
        let mut first_permit = Some(permit);
        for message in messages {
            let permit = first_permit
                .take()
                .or_else(|| slots.clone().try_acquire_owned().ok());
            let Some(permit) = permit else {
                // Cannot happen (we asked for no more than the free slots), but a
                // message without a slot goes straight back rather than waiting.
                return_now(&batcher, std::slice::from_ref(&message)).await;
                continue;
            };
            let span = info_span!("message", message_id = %message.message_id);
            tracker.spawn(
                handle_message(
                    batcher.clone(),
                    jobs.clone(),
                    settings.clone(),
                    message,
                    permit,
                    shutdown.clone(),
                    drain.clone(),
                )
                .instrument(span),
            );
        }
    }

    telemetry::get().set_ready(false);
    tracker.close();
    info!(
        running = tracker.len(),
        grace_s = settings.shutdown_grace.as_secs(),
        "Stopping: no new messages."
    );
    tokio::select! {
        _ = tracker.wait() => {}
        _ = shutdown.abort.cancelled() => info!("Stopping now: cancelling running jobs."),
        _ = tokio::time::sleep(settings.shutdown_grace) => {
            info!(running = tracker.len(), "Grace period over: cancelling running jobs.");
            shutdown.abort.cancel();
        }
    }
    tracker.wait().await;
    info!("All jobs ended.");
    if let Some(drain) = &drain {
        drain::end_drain(&queue, &batcher, drain, drained).await;
    }
    // The jobs held the other handles: the lanes send what is queued, then stop.
    drop(batcher);
    lanes.finish().await;
}

/// How often a running job's message gets its visibility extended.
fn heartbeat_interval(visibility_timeout: Duration) -> Duration {
    (visibility_timeout / 2).max(Duration::from_secs(1))
}

/// Sleeps, or returns `true` early when asked to stop.
async fn sleep_or_stop(duration: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        biased;
        _ = stop.cancelled() => true,
        _ = ticking(tokio::time::sleep(duration)) => false,
    }
}

/// Runs `wait`, a wait the receive loop is meant to make, showing progress meanwhile:
/// a loop that waits where it should is alive; one that stops turning is not.
async fn ticking<F: std::future::Future>(wait: F) -> F::Output {
    tokio::pin!(wait);
    let mut tick = tokio::time::interval(telemetry::LOOP_TICK);
    loop {
        tokio::select! {
            output = &mut wait => return output,
            _ = tick.tick() => telemetry::get().loop_progressed(),
        }
    }
}

/// A fault for the watchdog test, in debug builds only: with
/// `ORCHGPU_DEBUG_WEDGE_AFTER_RECEIVES=N` the loop hangs for good after its N-th receive,
/// showing no progress, as a wedged loop would.
async fn debug_wedge(receives: u64) {
    #[cfg(debug_assertions)]
    if std::env::var("ORCHGPU_DEBUG_WEDGE_AFTER_RECEIVES")
        .ok()
        .and_then(|n| n.parse::<u64>().ok())
        .is_some_and(|n| receives >= n)
    {
        warn!(receives, "Debug fault: wedging the receive loop.");
        std::future::pending::<()>().await;
    }
    #[cfg(not(debug_assertions))]
    let _ = receives;
}

/// A fault for the tests, in debug builds only: with `ORCHGPU_DEBUG_NO_HEARTBEATS=1` no
/// message's visibility is extended, as during an SQS brownout, so a running job's
/// message comes back to the queue.
fn debug_no_heartbeats() -> bool {
    cfg!(debug_assertions) && std::env::var_os("ORCHGPU_DEBUG_NO_HEARTBEATS").is_some()
}

/// Processes one message in its own task, extending its visibility meanwhile, then
/// deletes it, returns it or leaves it according to the outcome. A panic in the job is
/// contained here.
async fn handle_message<S: GpuScheduler + Send + Sync + 'static>(
    batcher: QueueBatcher,
    jobs: Arc<JobContext<S>>,
    settings: DaemonSettings,
    message: ReceivedMessage,
    permit: OwnedSemaphorePermit,
    shutdown: Shutdown,
    drain: Option<Arc<drain::Drain>>,
) {
    let _permit = permit;
    let _running = telemetry::get().job_running();
    telemetry::get().jobs_progressed();
    let received_at = Instant::now();
    let jobs_have_claims = jobs.has_claims();
    let cancel = JobCancel {
        token: shutdown.abort.child_token(),
        lost: CancellationToken::new(),
        stop: shutdown.stop.clone(),
    };
    let mut work = tokio::spawn(
        process_message(
            jobs,
            message.message_id.clone(),
            message.body.clone(),
            message.receive_count,
            cancel.clone(),
        )
        .in_current_span(),
    );
    let heartbeat_every = heartbeat_interval(settings.visibility_timeout);
    let heartbeats = !debug_no_heartbeats();
    let mut schedule = HeartbeatSchedule::new(
        tokio::time::Instant::now(),
        heartbeat_every,
        settings.visibility_timeout,
    );
    // At most one heartbeat in flight (with the visibility it asks for and when it left);
    // the job's end does not wait for it.
    let mut beat: Option<(Reply, Duration, tokio::time::Instant)> = None;
    let mut progress = tokio::time::interval(telemetry::JOBS_TICK);
    let outcome = loop {
        tokio::select! {
            outcome = &mut work => break outcome,
            _ = progress.tick() => telemetry::get().jobs_progressed(),
            _ = tokio::time::sleep_until(schedule.due()), if heartbeats && beat.is_none() && !cancel.lost.is_cancelled() => {
                let now = tokio::time::Instant::now();
                schedule.sending(now);
                // SQS refuses to keep a message hidden longer than 12 hours after it was
                // received; past that another consumer may take it, so we let it go.
                let left = MAX_VISIBILITY.saturating_sub(received_at.elapsed() + VISIBILITY_MARGIN);
                if left < heartbeat_every {
                    warn!("Message reached SQS's 12-hour visibility limit; abandoning the job.");
                    cancel.lost.cancel();
                    cancel.token.cancel();
                    continue;
                }
                let visibility = settings.visibility_timeout.min(left);
                beat = Some((batcher.heartbeat(&message, visibility), visibility, now));
            }
            result = heartbeat_reply(&mut beat), if beat.is_some() => {
                let Some((_, visibility, sent_at)) = beat.take() else { continue };
                match result {
                    Ok(()) => schedule.succeeded(sent_at, visibility),
                    // With claims, the claim carries the job: the copy of the message that
                    // came back waits for it to end, so the job goes on.
                    Err(QueueError::ReceiptInvalid { .. }) if jobs_have_claims => {
                        warn!("Message receipt lost (the message came back); the job goes on under its claim.");
                        cancel.lost.cancel();
                    }
                    Err(QueueError::ReceiptInvalid { .. }) => {
                        warn!("Message receipt lost; abandoning the job.");
                        cancel.lost.cancel();
                        cancel.token.cancel();
                    }
                    Err(e) => {
                        let retry_in = schedule.failed(tokio::time::Instant::now());
                        warn!(error = %error_chain(&e), retry_ms = retry_in.as_millis() as u64,
                            "Visibility extension failed; will retry.");
                    }
                }
            }
        }
    };
    // A heartbeat not sent yet is withdrawn: the message is about to be deleted or returned.
    drop(beat);
    let (disposition, succeeded) = match outcome {
        Ok(ended) => ended,
        Err(join_error) => {
            error!(error = %join_error, "Job task panicked; its message will be retried.");
            telemetry::get().job_ended(Outcome::Returned);
            (Disposition::RetryLater, false)
        }
    };
    match disposition {
        Disposition::Delete => match batcher.delete(&message).await {
            Ok(()) => {
                debug!("Message deleted.");
                if succeeded {
                    telemetry::get().job_finished(received_at.elapsed());
                }
            }
            // The message will come back; its result exists, so it is harmless.
            Err(e) => {
                warn!(error = %error_chain(&e), "Delete failed; the message will be redelivered.")
            }
        },
        Disposition::RetryLater if drain.is_some() => {
            let delay = retry_delay(settings.retry_backoff, message.receive_count);
            let left = MAX_VISIBILITY.saturating_sub(received_at.elapsed() + VISIBILITY_MARGIN);
            info!(
                delay_s = delay.as_secs(),
                receive_count = message.receive_count,
                "Message held until the drain ends, then returned for a retry."
            );
            if let Err(e) = batcher
                .set_visibility(&message, drain::HOLD.min(left))
                .await
            {
                warn!(error = %error_chain(&e), "Could not hold the message; it reappears after its visibility timeout.");
            }
            if let Some(drain) = &drain {
                drain.hold(message, delay);
            }
        }
        Disposition::RetryLater => {
            let delay = retry_delay(settings.retry_backoff, message.receive_count);
            info!(
                delay_s = delay.as_secs(),
                receive_count = message.receive_count,
                "Message returned for a retry."
            );
            if let Err(e) = batcher.set_visibility(&message, delay).await {
                warn!(error = %error_chain(&e), "Could not return the message; it reappears after its visibility timeout.");
            }
        }
        Disposition::ReturnNow => return_now(&batcher, std::slice::from_ref(&message)).await,
        Disposition::ReturnAfter(delay) => {
            // Not a failure: the message comes back when the other daemon's claim ends.
            let left = MAX_VISIBILITY.saturating_sub(received_at.elapsed() + VISIBILITY_MARGIN);
            if let Err(e) = batcher.set_visibility(&message, delay.min(left)).await {
                warn!(error = %error_chain(&e), "Could not return the message; it reappears after its visibility timeout.");
            }
        }
        Disposition::Abandon => {}
    }
}

/// The reply of the heartbeat in flight; never completes when there is none.
async fn heartbeat_reply(
    beat: &mut Option<(Reply, Duration, tokio::time::Instant)>,
) -> Result<(), QueueError> {
    match beat {
        Some((reply, _, _)) => reply.await,
        None => std::future::pending().await,
    }
}

/// When a message's next heartbeat is due. Beats keep their phase (not "an interval
/// after the last reply"), so the heartbeats of messages received together stay due
/// together. After a failure the next try comes within seconds, backing off, and always
/// before the visibility the last successful beat (or the receive) gave runs out.
#[derive(Debug)]
struct HeartbeatSchedule {
    every: Duration,
    next: tokio::time::Instant,
    /// Until when the message is surely ours.
    visible_until: tokio::time::Instant,
    retries: Backoff,
}

impl HeartbeatSchedule {
    fn new(received: tokio::time::Instant, every: Duration, visibility: Duration) -> Self {
        HeartbeatSchedule {
            every,
            next: received + every,
            visible_until: received + visibility,
            retries: Backoff::new(HEARTBEAT_RETRY_FIRST, every).with_jitter(),
        }
    }

    fn due(&self) -> tokio::time::Instant {
        self.next
    }

    /// A heartbeat goes out at `now`: the next one is due an interval after this one was.
    fn sending(&mut self, now: tokio::time::Instant) {
        self.next = (self.next + self.every).max(now);
    }

    /// The heartbeat sent at `sent_at` kept the message hidden for `visibility` more.
    fn succeeded(&mut self, sent_at: tokio::time::Instant, visibility: Duration) {
        self.visible_until = sent_at + visibility;
        self.retries.reset();
    }

    /// The heartbeat failed at `now`; returns how soon it is retried.
    fn failed(&mut self, now: tokio::time::Instant) -> Duration {
        let left = self.visible_until.saturating_duration_since(now);
        let wait = self
            .retries
            .next_delay()
            .min(left / 2)
            .max(HEARTBEAT_RETRY_MIN);
        self.next = now + wait;
        wait
    }
}

/// Makes messages visible again at once, in as few requests as possible.
async fn return_now(batcher: &QueueBatcher, messages: &[ReceivedMessage]) {
    let replies: Vec<Reply> = messages
        .iter()
        .map(|message| batcher.set_visibility(message, Duration::ZERO))
        .collect();
    for (message, reply) in messages.iter().zip(replies) {
        match reply.await {
            Ok(()) => info!(message_id = %message.message_id, "Message returned to the queue."),
            Err(e) => {
                warn!(message_id = %message.message_id, error = %error_chain(&e), "Could not return the message; it reappears after its visibility timeout.")
            }
        }
    }
}

/// Classifies the body and runs a job per object, counting how each ended; returns what
/// to do with the message, and whether a job of it ran to its result.
async fn process_message<S: GpuScheduler + Send + Sync + 'static>(
    jobs: Arc<JobContext<S>>,
    message_id: String,
    body: String,
    receive_count: u32,
    cancel: JobCancel,
) -> (Disposition, bool) {
    let telemetry = telemetry::get();
    let objects = match parse_notification(&body) {
        Notification::TestEvent => {
            info!("Dropping s3:TestEvent message.");
            telemetry.job_ended(Outcome::Dropped);
            return (Disposition::Delete, false);
        }
        Notification::NotAnEvent(reason) => {
            warn!(reason = %reason, body = %gist(&body), "Dropping message that is not an S3 object event.");
            telemetry.job_ended(Outcome::Dropped);
            return (Disposition::Delete, false);
        }
        // It may name a job: retried, then dead-lettered by the queue's redrive policy.
        Notification::Unprocessable(reason) => {
            warn!(reason = %reason, receive_count, body = %gist(&body), "Cannot process this S3 event; it goes back to the queue, then to the dead-letter queue.");
            telemetry.job_ended(Outcome::Returned);
            return (Disposition::RetryLater, false);
        }
        Notification::Objects { objects, skipped } => {
            if skipped > 0 {
                info!(
                    skipped,
                    "Skipping records that are not ObjectCreated events."
                );
            }
            objects
        }
    };
    let mut succeeded = false;
    for object in &objects {
        jobs.record(
            object,
            Some(&message_id),
            EventKind::Received { receive_count },
        );
        let ended = jobs.run_job(object, Some(&message_id), &cancel).await;
        match &ended {
            Ok(JobOutcome::Completed) => {
                succeeded = true;
                telemetry.job_ended(Outcome::Succeeded);
            }
            // Handed and Carried come only from the Lambda jobs handler, never from here.
            Ok(JobOutcome::AlreadyDone | JobOutcome::Handed | JobOutcome::Carried) => {
                telemetry.job_ended(Outcome::Duplicate)
            }
            Err(e) => telemetry.job_ended(e.outcome()),
        }
        jobs.record(object, Some(&message_id), history_ending(&ended));
        if let Err(e) = ended {
            let disposition = e.disposition();
            match disposition {
                Disposition::Delete if matches!(e, JobError::Duplicate { .. }) => {
                    info!(key = %object.key, reason = %e, "Duplicate of a job another daemon runs from its own message; deleting this copy.");
                    continue;
                }
                Disposition::Delete => {
                    warn!(bucket = %object.bucket, key = %object.key, reason = %error_chain(&e), "Dropping job that can never run.");
                    continue;
                }
                Disposition::RetryLater
                    if matches!(e, crate::job::JobError::CancelledAwaitingResult) =>
                {
                    info!(key = %object.key, reason = %e, "Job stopped.");
                }
                Disposition::RetryLater => {
                    warn!(key = %object.key, receive_count, error = %error_chain(&e), "Job failed.");
                }
                Disposition::ReturnNow | Disposition::Abandon => {
                    info!(key = %object.key, reason = %e, "Job stopped.");
                }
                Disposition::ReturnAfter(delay) => {
                    info!(key = %object.key, delay_s = delay.as_secs(), reason = %e, "Job held elsewhere; message returns later.");
                }
            }
            return (disposition, succeeded);
        }
    }
    (Disposition::Delete, succeeded)
}

/// How a job's attempt ended, for its timeline: the message deleted (with the outcome),
/// returned (with the reason), or no longer ours.
fn history_ending(ended: &Result<JobOutcome, JobError>) -> EventKind {
    match ended {
        Ok(JobOutcome::Completed) => EventKind::Deleted {
            outcome: history::SUCCEEDED.to_owned(),
        },
        Ok(JobOutcome::AlreadyDone | JobOutcome::Handed | JobOutcome::Carried) => {
            EventKind::Deleted {
                outcome: "duplicate".to_owned(),
            }
        }
        Err(e) => match e.disposition() {
            Disposition::Delete => EventKind::Deleted {
                outcome: format!("dropped: {}", error_chain(e)),
            },
            Disposition::RetryLater | Disposition::ReturnNow | Disposition::ReturnAfter(_) => {
                EventKind::Returned {
                    reason: error_chain(e),
                }
            }
            Disposition::Abandon => EventKind::Failed {
                reason: error_chain(e),
            },
        },
    }
}

/// Backoff for a failed job's message: doubles with each receive, capped.
pub(crate) fn retry_delay(base: Duration, receive_count: u32) -> Duration {
    let exponent = receive_count.saturating_sub(1).min(16);
    base.saturating_mul(1 << exponent).min(MAX_RETRY_BACKOFF)
}

/// The first characters of a body, on one line, for a log line.
fn gist(body: &str) -> String {
    let one_line: String = body
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(BODY_GIST_CHARS)
        .collect();
    if body.chars().count() > BODY_GIST_CHARS {
        format!("{one_line}…")
    } else {
        one_line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_and_is_capped() {
        let base = Duration::from_secs(10);
        assert_eq!(retry_delay(base, 0), Duration::from_secs(10));
        assert_eq!(retry_delay(base, 1), Duration::from_secs(10));
        assert_eq!(retry_delay(base, 2), Duration::from_secs(20));
        assert_eq!(retry_delay(base, 4), Duration::from_secs(80));
        assert_eq!(retry_delay(base, 10), MAX_RETRY_BACKOFF);
        assert_eq!(retry_delay(base, u32::MAX), MAX_RETRY_BACKOFF);
        assert_eq!(retry_delay(Duration::ZERO, 5), Duration::ZERO);
    }

    #[test]
    fn gist_is_short_and_one_line() {
        assert_eq!(gist("a\nb"), "a b");
        let long = "x".repeat(500);
        let g = gist(&long);
        assert_eq!(g.chars().count(), BODY_GIST_CHARS + 1);
        assert!(g.ends_with('…'));
    }

    /// Drives a schedule the way `handle_message` does, on tokio's paused clock, with a
    /// fake extension whose outcomes are given; returns when each beat was sent.
    async fn beats(outcomes: &[bool], every: Duration, visibility: Duration) -> Vec<Duration> {
        let start = tokio::time::Instant::now();
        let mut schedule = HeartbeatSchedule::new(start, every, visibility);
        let mut sent = Vec::new();
        for &ok in outcomes {
            tokio::time::sleep_until(schedule.due()).await;
            let now = tokio::time::Instant::now();
            schedule.sending(now);
            sent.push(now - start);
            if ok {
                schedule.succeeded(now, visibility);
            } else {
                schedule.failed(now);
            }
        }
        sent
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_heartbeat_is_retried_within_seconds_and_before_visibility_runs_out() {
        let s = Duration::from_secs;
        // -v 30: beats every 15 s. The beat at 15 s fails, and so do the next three.
        let sent = beats(&[false, false, false, false, true, true], s(15), s(30)).await;
        assert_eq!(sent[0], s(15));
        // Retries come within seconds (jittered backoff from 1 s), not a whole interval later.
        assert!(sent[1] > s(15) && sent[1] <= s(16), "{sent:?}");
        // Every retry lands before the visibility the receive gave (30 s) runs out.
        assert!(sent[1..5].iter().all(|t| *t < s(30)), "{sent:?}");
        assert!(sent[1..5].windows(2).all(|w| w[0] < w[1]), "{sent:?}");
        // After a success the phase resumes one interval on, from the retry's slot.
        assert!(sent[5] - sent[4] <= s(15), "{sent:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn healthy_heartbeats_keep_their_phase() {
        let s = Duration::from_secs;
        // Each beat goes out 2 s late (a busy runtime) and its request takes 1 s: the next
        // stays due on the 15 s grid, not an interval after the late one went out.
        let start = tokio::time::Instant::now();
        let mut schedule = HeartbeatSchedule::new(start, s(15), s(30));
        let mut sent = Vec::new();
        for _ in 0..3 {
            tokio::time::sleep_until(schedule.due() + s(2)).await;
            let now = tokio::time::Instant::now();
            schedule.sending(now);
            sent.push(now - start);
            tokio::time::sleep(s(1)).await;
            schedule.succeeded(now, s(30));
        }
        assert_eq!(sent, [s(17), s(32), s(47)]);
    }

    #[test]
    fn stop_is_a_child_of_abort() {
        let shutdown = Shutdown::new();
        shutdown.abort.cancel();
        assert!(shutdown.stop.is_cancelled());
        let shutdown = Shutdown::new();
        shutdown.stop.cancel();
        assert!(!shutdown.abort.is_cancelled());
    }
}
