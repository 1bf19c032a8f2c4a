//! Batched deletes and visibility changes on the jobs queue.
//!
//! `QueueBatcher` is a cloneable handle over two background lanes, one for deletes
//! (`DeleteMessageBatch`) and one for visibility changes (`ChangeMessageVisibilityBatch`).
//! Each request names the latest time it may be sent: deletes, returns and retries go at
//! once; a heartbeat may wait a short window so that heartbeats due about together share a
//! request. A lane takes its first request, then keeps taking requests until it holds ten
//! (SQS's limit per batch) or the earliest latest-send-time among them has come. Requests
//! already queued are always taken, even past that time, so requests that pile up while
//! one is in flight go together next, and a lone urgent request waits for nothing. A batch
//! of one uses the single-message call.
//!
//! Each request gets its own outcome, mapped as the single call maps its errors (see
//! `queue`). Two visibility changes for the same receipt in one batch would race (SQS does
//! not order a batch's entries), so only the later is sent. A heartbeat whose requester has
//! stopped waiting (its job is over) is not sent at all.
//!
//! The lanes end when every handle is dropped, after sending what was queued;
//! `BatcherLanes::finish` waits for that. What to send and when is the daemon's business.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info_span};

use crate::aws::queue::{MAX_BATCH_ENTRIES, Queue, QueueError, ReceiptHandle, ReceivedMessage};

/// A cloneable handle to the jobs queue's batching lanes.
#[derive(Debug, Clone)]
pub(crate) struct QueueBatcher {
    deletes: mpsc::UnboundedSender<Request<ReceivedMessage>>,
    visibility: mpsc::UnboundedSender<Request<(ReceivedMessage, Duration)>>,
    heartbeat_window: Duration,
}

/// The lanes' tasks, to wait for at shutdown.
#[derive(Debug)]
pub(crate) struct BatcherLanes {
    tasks: Vec<JoinHandle<()>>,
}

/// The outcome of one request, once its batch has been sent (a future; cancel safe).
#[derive(Debug)]
pub(crate) struct Reply {
    rx: oneshot::Receiver<Result<(), QueueError>>,
    message_id: String,
    is_delete: bool,
}

/// One queued request: an entry of a future batch and where its outcome goes.
#[derive(Debug)]
struct Request<E> {
    entry: E,
    /// The latest time the entry may go out.
    send_by: Instant,
    /// Visibility changes of one receipt supersede each other; deletes carry `None`.
    supersedes: Option<ReceiptHandle>,
    /// A heartbeat is only worth sending while someone waits for it.
    needed_only_if_awaited: bool,
    reply: oneshot::Sender<Result<(), QueueError>>,
}

impl QueueBatcher {
    /// Starts the lanes on `queue`'s runtime. A heartbeat may wait up to `heartbeat_window`
    /// for other requests to share its batch.
    pub(crate) fn start(queue: Queue, heartbeat_window: Duration) -> (QueueBatcher, BatcherLanes) {
        let (deletes, delete_rx) = mpsc::unbounded_channel();
        let (visibility, visibility_rx) = mpsc::unbounded_channel();
        let delete_queue = queue.clone();
        let delete_lane = tokio::spawn(
            run_lane(delete_rx, move |messages: Vec<ReceivedMessage>| {
                let queue = delete_queue.clone();
                async move {
                    match messages.as_slice() {
                        [message] => vec![queue.delete(message).await],
                        _ => queue.delete_entries(&messages).await,
                    }
                }
            })
            .instrument(info_span!("lane", lane = "delete")),
        );
        let visibility_lane = tokio::spawn(
            run_lane(
                visibility_rx,
                move |entries: Vec<(ReceivedMessage, Duration)>| {
                    let queue = queue.clone();
                    async move {
                        match entries.as_slice() {
                            [(message, delay)] => vec![queue.set_visibility(message, *delay).await],
                            _ => queue.change_visibility_entries(&entries).await,
                        }
                    }
                },
            )
            .instrument(info_span!("lane", lane = "visibility")),
        );
        (
            QueueBatcher {
                deletes,
                visibility,
                heartbeat_window,
            },
            BatcherLanes {
                tasks: vec![delete_lane, visibility_lane],
            },
        )
    }

    /// Queues the deletion of a message, to go out at once (with whatever else is
    /// waiting). The request is sent whether or not the reply is awaited.
    ///
    /// # Errors
    /// The reply says what `Queue::delete` would.
    pub(crate) fn delete(&self, message: &ReceivedMessage) -> Reply {
        self.delete_within(message, Duration::ZERO)
    }

    /// Queues the deletion of a message that may wait up to `within` for others to share
    /// its request (an event already acted on, whose deletion nothing waits for). The
    /// request is sent whether or not the reply is awaited.
    ///
    /// # Errors
    /// The reply says what `Queue::delete` would.
    pub(crate) fn delete_within(&self, message: &ReceivedMessage, within: Duration) -> Reply {
        let (request, reply) = request(
            message.clone(),
            message,
            Instant::now() + within,
            None,
            false,
        );
        send(&self.deletes, request);
        reply
    }

    /// Queues a visibility change, to go out at once (with whatever else is waiting): the
    /// message becomes visible again after `delay` (zero: at once). The request is sent
    /// whether or not the reply is awaited.
    ///
    /// # Errors
    /// The reply says what `Queue::set_visibility` would.
    pub(crate) fn set_visibility(&self, message: &ReceivedMessage, delay: Duration) -> Reply {
        self.change_visibility(message, delay, Instant::now(), false)
    }

    /// Queues a heartbeat: the message stays hidden for `extension` more. It may wait the
    /// heartbeat window for others to share its request. Dropping the reply before the
    /// batch goes out withdraws the heartbeat.
    ///
    /// # Errors
    /// The reply says what `Queue::set_visibility` would.
    pub(crate) fn heartbeat(&self, message: &ReceivedMessage, extension: Duration) -> Reply {
        self.change_visibility(
            message,
            extension,
            Instant::now() + self.heartbeat_window,
            true,
        )
    }

    fn change_visibility(
        &self,
        message: &ReceivedMessage,
        timeout: Duration,
        send_by: Instant,
        needed_only_if_awaited: bool,
    ) -> Reply {
        let (request, reply) = request(
            (message.clone(), timeout),
            message,
            send_by,
            Some(message.receipt.clone()),
            needed_only_if_awaited,
        );
        send(&self.visibility, request);
        reply
    }
}

impl BatcherLanes {
    /// Waits until every handle is dropped and the lanes have sent what was queued.
    pub(crate) async fn finish(self) {
        for task in self.tasks {
            if let Err(e) = task.await {
                error!(error = %e, "A queue batching lane failed.");
            }
        }
    }
}

impl Future for Reply {
    type Output = Result<(), QueueError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(Ok(result)) => Poll::Ready(result),
            Poll::Ready(Err(_)) => {
                let message_id = self.message_id.clone();
                let source = "the queue batching lane stopped before sending the request".into();
                Poll::Ready(Err(if self.is_delete {
                    QueueError::Delete { message_id, source }
                } else {
                    QueueError::ChangeVisibility { message_id, source }
                }))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A request and its reply. Only visibility changes supersede each other, so a request
/// without a receipt to supersede is a delete.
fn request<E>(
    entry: E,
    message: &ReceivedMessage,
    send_by: Instant,
    supersedes: Option<ReceiptHandle>,
    needed_only_if_awaited: bool,
) -> (Request<E>, Reply) {
    let (tx, rx) = oneshot::channel();
    let is_delete = supersedes.is_none();
    (
        Request {
            entry,
            send_by,
            supersedes,
            needed_only_if_awaited,
            reply: tx,
        },
        Reply {
            rx,
            message_id: message.message_id.clone(),
            is_delete,
        },
    )
}

/// Queues a request. The lanes outlive every handle, so the send cannot fail; if it did,
/// the request's reply would say so.
fn send<E>(lane: &mpsc::UnboundedSender<Request<E>>, request: Request<E>) {
    if lane.send(request).is_err() {
        error!("A queue batching lane is gone; the request is not sent.");
    }
}

/// One lane: collects requests into batches and sends them one batch at a time with
/// `send_batch`, which returns one outcome per entry, in order. Returns once every sender
/// is dropped and everything queued is sent.
async fn run_lane<E, F, Fut>(mut requests: mpsc::UnboundedReceiver<Request<E>>, mut send_batch: F)
where
    F: FnMut(Vec<E>) -> Fut,
    Fut: Future<Output = Vec<Result<(), QueueError>>>,
{
    while let Some(batch) = collect_batch(&mut requests).await {
        let (entries, replies): (Vec<E>, Vec<_>) = batch
            .into_iter()
            .filter(|r| !(r.needed_only_if_awaited && r.reply.is_closed()))
            .map(|r| (r.entry, r.reply))
            .unzip();
        if entries.is_empty() {
            continue;
        }
        debug!(entries = entries.len(), "Queue batch sent.");
        let mut results = send_batch(entries).await.into_iter();
        for reply in replies {
            // A requester that stopped waiting does not need its outcome.
            let _ = reply.send(results.next().unwrap_or_else(|| {
                Err(QueueError::ChangeVisibility {
                    message_id: String::new(),
                    source: "the batch returned fewer outcomes than entries".into(),
                })
            }));
        }
    }
}

/// Waits for a first request, then takes more until there are `MAX_BATCH_ENTRIES` or the
/// earliest `send_by` among them has come; requests already queued are taken even past it.
/// A visibility change supersedes an earlier one of the same receipt in the batch, which is
/// answered `Ok` (the later one is what SQS ends up with). `None` once every sender is gone
/// and nothing is queued.
async fn collect_batch<E>(
    requests: &mut mpsc::UnboundedReceiver<Request<E>>,
) -> Option<Vec<Request<E>>> {
    let first = requests.recv().await?;
    let mut send_by = first.send_by;
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH_ENTRIES {
        // `timeout_at` polls `recv` before its deadline, so a queued request is taken
        // even when the deadline has passed.
        let request = match tokio::time::timeout_at(send_by, requests.recv()).await {
            Ok(Some(request)) => request,
            // Every sender is gone: nothing more will come, send now.
            Ok(None) | Err(_) => break,
        };
        send_by = send_by.min(request.send_by);
        if let Some(receipt) = &request.supersedes
            && let Some(i) = batch
                .iter()
                .position(|r| r.supersedes.as_ref() == Some(receipt))
        {
            let earlier = batch.remove(i);
            let _ = earlier.reply.send(Ok(()));
        }
        batch.push(request);
    }
    Some(batch)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    fn message(n: u32) -> ReceivedMessage {
        ReceivedMessage {
            message_id: format!("m{n}"),
            receipt: ReceiptHandle(format!("r{n}")),
            body: String::new(),
            receive_count: 1,
        }
    }

    /// The batches that went out: when (since the test's start) and which entries.
    type Sent = Arc<Mutex<Vec<(Duration, Vec<(String, u64)>)>>>;
    type Lane = mpsc::UnboundedSender<Request<(ReceivedMessage, Duration)>>;

    /// A visibility lane whose "SQS" records each batch, takes `latency` per request and
    /// says the receipt `lost` is invalid.
    fn start_lane(latency: Duration) -> (Lane, Sent, JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let sent: Sent = Arc::default();
        let start = Instant::now();
        let record = sent.clone();
        let task = tokio::spawn(run_lane(
            rx,
            move |entries: Vec<(ReceivedMessage, Duration)>| {
                let record = record.clone();
                async move {
                    record.lock().expect("not poisoned").push((
                        start.elapsed(),
                        entries
                            .iter()
                            .map(|(m, d)| (m.message_id.clone(), d.as_secs()))
                            .collect(),
                    ));
                    tokio::time::sleep(latency).await;
                    entries
                        .iter()
                        .map(|(m, _)| {
                            if m.receipt.0 == "lost" {
                                Err(QueueError::ReceiptInvalid {
                                    message_id: m.message_id.clone(),
                                })
                            } else {
                                Ok(())
                            }
                        })
                        .collect()
                }
            },
        ));
        (tx, sent, task)
    }

    fn visibility(
        lane: &Lane,
        message: &ReceivedMessage,
        seconds: u64,
        wait: Duration,
        heartbeat: bool,
    ) -> Reply {
        let (request, reply) = request(
            (message.clone(), Duration::from_secs(seconds)),
            message,
            Instant::now() + wait,
            Some(message.receipt.clone()),
            heartbeat,
        );
        lane.send(request).expect("lane runs");
        reply
    }

    fn batches(sent: &Sent) -> Vec<(Duration, Vec<(String, u64)>)> {
        sent.lock().expect("not poisoned").clone()
    }

    fn ids(batch: &[(String, u64)]) -> Vec<&str> {
        batch.iter().map(|(id, _)| id.as_str()).collect()
    }

    const WINDOW: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn a_lone_urgent_request_goes_at_once() {
        let (lane, sent, _task) = start_lane(Duration::from_millis(50));
        visibility(&lane, &message(1), 0, Duration::ZERO, false)
            .await
            .expect("sent");
        assert_eq!(
            batches(&sent),
            vec![(Duration::ZERO, vec![("m1".into(), 0)])]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_wait_the_window_and_share_a_request() {
        let (lane, sent, _task) = start_lane(Duration::from_millis(50));
        let a = visibility(&lane, &message(1), 30, WINDOW, true);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let b = visibility(&lane, &message(2), 30, WINDOW, true);
        a.await.expect("a");
        b.await.expect("b");
        let sent = batches(&sent);
        assert_eq!(sent.len(), 1, "{sent:?}");
        // Sent when the first heartbeat's window closed, not later.
        assert_eq!(sent[0].0, WINDOW);
        assert_eq!(ids(&sent[0].1), ["m1", "m2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_urgent_request_cuts_the_window_short() {
        let (lane, sent, _task) = start_lane(Duration::from_millis(50));
        let beat = visibility(&lane, &message(1), 30, WINDOW, true);
        tokio::time::sleep(Duration::from_millis(200)).await;
        visibility(&lane, &message(2), 0, Duration::ZERO, false)
            .await
            .expect("urgent");
        beat.await.expect("heartbeat");
        let sent = batches(&sent);
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(sent[0].0, Duration::from_millis(200));
        assert_eq!(ids(&sent[0].1), ["m1", "m2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_queued_during_a_send_go_together_next() {
        let (lane, sent, _task) = start_lane(Duration::from_millis(100));
        let first = visibility(&lane, &message(0), 0, Duration::ZERO, false);
        tokio::time::sleep(Duration::from_millis(10)).await;
        // Urgent, and already late by the time the lane is free: taken together anyway.
        let rest: Vec<Reply> = (1..=4)
            .map(|n| visibility(&lane, &message(n), 0, Duration::ZERO, false))
            .collect();
        first.await.expect("first");
        for reply in rest {
            reply.await.expect("rest");
        }
        let sent = batches(&sent);
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert_eq!(ids(&sent[0].1), ["m0"]);
        assert_eq!(sent[1].0, Duration::from_millis(100));
        assert_eq!(ids(&sent[1].1), ["m1", "m2", "m3", "m4"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_holds_at_most_ten() {
        let (lane, sent, _task) = start_lane(Duration::from_millis(50));
        let replies: Vec<Reply> = (0..23)
            .map(|n| visibility(&lane, &message(n), 30, WINDOW, true))
            .collect();
        for reply in replies {
            reply.await.expect("sent");
        }
        let sizes: Vec<usize> = batches(&sent).iter().map(|(_, b)| b.len()).collect();
        assert_eq!(sizes, [10, 10, 3]);
        // Full batches do not wait for the window.
        assert_eq!(batches(&sent)[0].0, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_change_of_the_same_receipt_supersedes_the_earlier() {
        let (lane, sent, _task) = start_lane(Duration::from_millis(50));
        let beat = visibility(&lane, &message(1), 30, WINDOW, true);
        let other = visibility(&lane, &message(2), 30, WINDOW, true);
        let retry = visibility(&lane, &message(1), 7, Duration::ZERO, false);
        beat.await.expect("superseded heartbeat is answered Ok");
        retry.await.expect("retry");
        other.await.expect("other");
        let sent = batches(&sent);
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(sent[0].1, vec![("m2".into(), 30), ("m1".into(), 7)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_withdrawn_heartbeat_is_not_sent_but_a_dropped_return_is() {
        let (lane, sent, _task) = start_lane(Duration::from_millis(50));
        drop(visibility(&lane, &message(1), 30, WINDOW, true));
        drop(visibility(&lane, &message(2), 0, Duration::ZERO, false));
        let kept = visibility(&lane, &message(3), 30, WINDOW, true);
        kept.await.expect("kept");
        let sent = batches(&sent);
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(ids(&sent[0].1), ["m2", "m3"]);
    }

    #[tokio::test(start_paused = true)]
    async fn each_entry_gets_its_own_outcome() {
        let (lane, _sent, _task) = start_lane(Duration::from_millis(50));
        let lost = ReceivedMessage {
            receipt: ReceiptHandle("lost".into()),
            ..message(9)
        };
        let a = visibility(&lane, &message(1), 30, WINDOW, true);
        let b = visibility(&lane, &lost, 30, WINDOW, true);
        assert!(a.await.is_ok());
        assert!(matches!(
            b.await,
            Err(QueueError::ReceiptInvalid { message_id }) if message_id == "m9"
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn the_lane_sends_what_is_queued_then_ends_when_senders_are_gone() {
        let (lane, sent, task) = start_lane(Duration::from_millis(50));
        let reply = visibility(&lane, &message(1), 30, Duration::from_secs(3600), true);
        drop(lane);
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the lane ends without waiting for the window")
            .expect("no panic");
        reply.await.expect("sent before the lane ended");
        assert_eq!(batches(&sent).len(), 1);
    }
}
