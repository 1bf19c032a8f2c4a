//! Event-driven result detection: routes the output bucket's `ObjectCreated` events,
//! received on an optional results queue, to the jobs waiting for those keys.
//!
//! A job registers the result key it expects *before* it uploads its bundle, so an event
//! that arrives while the upload call is still returning is not missed: the registry keeps
//! a wake-up permit for it. `run` owns the receive loop on the results queue: it wakes the
//! waiters of every key named in a message, then deletes the messages, ours or not, in
//! batches that may gather for up to a second (an event nobody waits for is a result of a
//! job that is over, or of another daemon; that daemon's HEAD fallback still finds its
//! result). HEAD polling stays in `job`, as the fallback and as the default when no results
//! queue is given.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::aws::error_chain;
use crate::backoff::Backoff;
use crate::batcher::QueueBatcher;
use crate::event::{Notification, parse_notification};
use crate::queue::Queue;

/// Long-poll wait of the results queue's receive.
const RESULTS_WAIT: Duration = Duration::from_secs(20);
/// How long a received event stays hidden; we delete it soon after routing it.
const RESULTS_VISIBILITY: Duration = Duration::from_secs(30);
/// How long a routed event's delete may wait for others to share its request.
const RESULTS_DELETE_WINDOW: Duration = Duration::from_secs(1);
/// First and longest pause between receive attempts while SQS is failing.
const RECEIVE_BACKOFF_FIRST: Duration = Duration::from_secs(2);
const MAX_RECEIVE_BACKOFF: Duration = Duration::from_secs(30);

/// Waiters by `bucket/key`: each with its registration id and its wake-up.
type Waiting = HashMap<String, Vec<(u64, Arc<Notify>)>>;

/// Jobs waiting for result objects, by `bucket/key`.
#[derive(Debug, Default)]
pub struct ResultRegistry {
    waiting: Mutex<Waiting>,
    next_id: AtomicU64,
}

/// One job's registration; dropping it unregisters.
#[derive(Debug)]
pub struct ResultWaiter {
    registry: Arc<ResultRegistry>,
    name: String,
    id: u64,
    notify: Arc<Notify>,
}

impl ResultWaiter {
    /// Completes once an event for the key has been routed here since registration.
    /// Cancel safe: a wake-up that arrives while nobody awaits is kept for the next call.
    pub async fn arrived(&self) {
        self.notify.notified().await;
    }
}

impl Drop for ResultWaiter {
    fn drop(&mut self) {
        let mut waiting = self.registry.lock();
        if let Some(list) = waiting.get_mut(&self.name) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                waiting.remove(&self.name);
            }
        }
    }
}

impl ResultRegistry {
    pub fn new() -> Arc<ResultRegistry> {
        Arc::new(ResultRegistry::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        crate::lock(&self.waiting)
    }

    /// Registers interest in `s3://bucket/key`. Register before the result can possibly
    /// be written (before the bundle upload), then await `ResultWaiter::arrived`.
    pub fn register(self: &Arc<Self>, bucket: &str, key: &str) -> ResultWaiter {
        let name = format!("{bucket}/{key}");
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        self.lock()
            .entry(name.clone())
            .or_default()
            .push((id, notify.clone()));
        ResultWaiter {
            registry: self.clone(),
            name,
            id,
            notify,
        }
    }

    /// Wakes every job waiting for `s3://bucket/key`; returns how many there were.
    pub fn deliver(&self, bucket: &str, key: &str) -> usize {
        let waiting = self.lock();
        match waiting.get(&format!("{bucket}/{key}")) {
            Some(list) => {
                for (_, notify) in list {
                    notify.notify_one();
                }
                list.len()
            }
            None => 0,
        }
    }

    /// How many registrations are live.
    pub fn len(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Receives the results queue until `stop` fires, routing each event to its waiters and
/// deleting the messages.
///
/// Cancel safety: messages received but not yet deleted when `stop` fires become
/// visible again after their visibility timeout; nothing is lost (HEAD still finds them).
pub async fn run(queue: Queue, registry: Arc<ResultRegistry>, stop: CancellationToken) {
    info!(queue = %queue.url(), "Receiving result events.");
    let (deletes, lanes) = QueueBatcher::start(queue.clone(), Duration::ZERO);
    let mut failures: u32 = 0;
    let mut backoff = Backoff::new(RECEIVE_BACKOFF_FIRST, MAX_RECEIVE_BACKOFF).with_jitter();
    let mut last_failure_log: Option<Instant> = None;
    loop {
        let received = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            received = queue.receive(10, RESULTS_WAIT, RESULTS_VISIBILITY) => received,
        };
        let messages = match received {
            Ok(messages) => {
                failures = 0;
                backoff.reset();
                messages
            }
            Err(e) => {
                failures += 1;
                if last_failure_log.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                    warn!(failures, error = %error_chain(&e), "Results receive failed; retrying (HEAD checks continue).");
                    last_failure_log = Some(Instant::now());
                }
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff.next_delay()) => continue,
                }
            }
        };
        if messages.is_empty() {
            continue;
        }
        for message in &messages {
            route(&registry, &message.body);
            // Nothing waits for this delete: it may wait for others to share a request,
            // and stays out of the way of the jobs' own releases and deletes.
            let reply = deletes.delete_within(message, RESULTS_DELETE_WINDOW);
            tokio::spawn(async move {
                if let Err(e) = reply.await {
                    // It comes back after its visibility timeout and is routed (or
                    // dropped) again: harmless.
                    warn!(error = %error_chain(&e), "Could not delete a result event.");
                }
            });
        }
    }
    // The deletes still queued go out now.
    drop(deletes);
    lanes.finish().await;
    info!("Stopped receiving result events.");
}

/// Wakes the waiters of every object named in one message body.
fn route(registry: &ResultRegistry, body: &str) {
    match parse_notification(body) {
        Notification::Objects { objects, .. } => {
            for object in objects {
                let woken = registry.deliver(&object.bucket, &object.key);
                debug!(bucket = %object.bucket, key = %object.key, woken, "Result event.");
            }
        }
        Notification::TestEvent => debug!("Dropping s3:TestEvent on the results queue."),
        Notification::NotAnEvent(reason) | Notification::Unprocessable(reason) => {
            warn!(reason = %reason, "Dropping a results-queue message that is not an S3 event.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real LocalStack event for `s3://bucket/in/my photo+1.jpg`.
    const EVENT: &str = include_str!("../tests/fixtures/events/localstack_put.json");

    #[tokio::test]
    async fn an_event_wakes_the_job_registered_for_its_key() {
        let registry = ResultRegistry::new();
        let waiter = registry.register("bucket", "in/my photo+1.jpg");
        let other = registry.register("bucket", "in/other.jpg");
        route(&registry, EVENT);
        tokio::time::timeout(Duration::from_secs(1), waiter.arrived())
            .await
            .expect("woken");
        assert!(
            tokio::time::timeout(Duration::from_millis(20), other.arrived())
                .await
                .is_err(),
            "another key's waiter must not wake"
        );
    }

    #[tokio::test]
    async fn an_event_before_the_await_is_not_lost() {
        let registry = ResultRegistry::new();
        let waiter = registry.register("out", "results/abc.png");
        assert_eq!(registry.deliver("out", "results/abc.png"), 1);
        tokio::time::timeout(Duration::from_secs(1), waiter.arrived())
            .await
            .expect("the permit was kept");
    }

    #[test]
    fn dropping_a_waiter_unregisters_it() {
        let registry = ResultRegistry::new();
        let a = registry.register("out", "k");
        let b = registry.register("out", "k");
        assert_eq!(registry.len(), 2);
        drop(a);
        assert_eq!(registry.deliver("out", "k"), 1);
        drop(b);
        assert!(registry.is_empty());
        assert_eq!(registry.deliver("out", "k"), 0);
    }

    #[tokio::test]
    async fn junk_and_test_events_wake_nobody_and_a_real_event_still_does() {
        let registry = ResultRegistry::new();
        let waiter = registry.register("bucket", "in/my photo+1.jpg");
        route(&registry, "not json");
        route(
            &registry,
            r#"{"Service":"Amazon S3","Event":"s3:TestEvent","Bucket":"bucket"}"#,
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(20), waiter.arrived())
                .await
                .is_err(),
            "junk or a test event woke a waiter"
        );
        assert_eq!(registry.len(), 1);
        // Its own key's event still wakes it: the silence above is not a deaf waiter.
        route(&registry, EVENT);
        tokio::time::timeout(Duration::from_secs(1), waiter.arrived())
            .await
            .expect("woken by the real event");
    }
}
