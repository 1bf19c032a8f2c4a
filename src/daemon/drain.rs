//! `--drain`: receive until the queue has nothing new, finish the jobs, exit 0 (for cron,
//! CI, a batch system and tests). This module owns the book of one drain run and what the
//! run does to the messages it holds (hidden while it goes on, given back at its end); the
//! loop in `daemon` asks it what each received message is and when the run is over.
//!
//! The rules, as `docs/operations.md` states them for operators:
//!
//! - **The end.** The run ends at the first long-poll receive that brings no message new
//!   to this run while none of its jobs runs. Its receives always long-poll (at least
//!   [`MIN_WAIT`], even with `-w 0`): a short poll samples only some of SQS's servers and
//!   may come back empty from a queue that is not.
//! - **Once per run.** Each message is tried at most once per run. A job that fails for a
//!   reason that may pass is not retried by the same run: its message is kept hidden for
//!   [`HOLD`] (not the usual short backoff, which would bring it back into this run and
//!   count receives against `maxReceiveCount` without attempts), and when the run ends it
//!   is made visible after the usual retry backoff, so the next run (or the daemon) takes
//!   it. A message that comes back during the run anyway (a run longer than `HOLD`, a
//!   job another daemon held) is put back the same way, untried.
//! - **Not waited for.** Messages hidden at the start (another consumer's, or a failed
//!   job's backoff from an earlier run) are not this run's: it does not wait for them. The
//!   count SQS reports at the end is logged (`not_visible`) so a cron job can tell.
//!   The results queue is only a wake-up channel for the run's own jobs; it is not drained.
//! - **Exit 0** once drained, failures included (their messages are in the queue, nothing
//!   is lost; the `Drained.` line counts them). Signals stop a drain as they stop the
//!   daemon.
//!
//! Hostile input and crashes: a body is handled by the daemon's usual code, so nothing is
//! new there. A message id is only compared, never parsed. A run killed at any instant
//! leaves each held message hidden for at most `HOLD` (the daemon's longest retry backoff)
//! and each running job's message for its visibility timeout; GPUs are the reservation
//! journal's, as in the daemon. A queue that never empties (producers faster than the
//! jobs) keeps a drain running, as it should: it is the receive that decides.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use tracing::{info, warn};

use super::retry_delay;
use crate::aws::batcher::{QueueBatcher, Reply};
use crate::aws::error_chain;
use crate::aws::queue::{Queue, ReceivedMessage};

/// How long a failed (or returning) message is kept hidden while the run goes on: the
/// daemon's longest retry backoff, so a killed run delays it no more than that.
pub(crate) const HOLD: Duration = Duration::from_secs(15 * 60);

/// The shortest receive wait of a drain: one second is a long poll, which asks every SQS
/// server (a wait of 0 asks a sample of them).
pub(crate) const MIN_WAIT: Duration = Duration::from_secs(1);

/// The receive wait a drain uses for the configured `-w`.
pub(crate) fn wait_time(configured: Duration) -> Duration {
    configured.max(MIN_WAIT)
}

/// Whether a run is over after a receive that brought `new` messages new to it, with
/// `running` of its jobs still running.
pub(crate) fn finished(new: usize, running: usize) -> bool {
    new == 0 && running == 0
}

/// The book of one drain run: the messages it tried and those it holds hidden until it
/// ends. Shared by the receive loop and the job tasks.
#[derive(Debug, Default)]
pub(crate) struct Drain {
    book: Mutex<Book>,
}

#[derive(Debug, Default)]
struct Book {
    tried: HashSet<String>,
    /// By message id: the latest receipt and the delay it gets when the run ends.
    held: HashMap<String, (ReceivedMessage, Duration)>,
}

/// What the counts of a finished run were.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) tried: usize,
    pub(crate) held: usize,
}

impl Drain {
    /// Splits a receive into messages new to this run (now counted as tried) and messages
    /// it already tried.
    pub(crate) fn sort(
        &self,
        messages: Vec<ReceivedMessage>,
    ) -> (Vec<ReceivedMessage>, Vec<ReceivedMessage>) {
        let mut book = self.book.lock().expect("the drain book is never poisoned");
        messages
            .into_iter()
            .partition(|message| book.tried.insert(message.message_id.clone()))
    }

    /// Keeps `message` (this receipt of it) to be made visible `delay` after the run ends.
    pub(crate) fn hold(&self, message: ReceivedMessage, delay: Duration) {
        let mut book = self.book.lock().expect("the drain book is never poisoned");
        book.held
            .insert(message.message_id.clone(), (message, delay));
    }

    /// The held messages with their delays, in message id order; the book forgets them.
    pub(crate) fn take_held(&self) -> Vec<(ReceivedMessage, Duration)> {
        let mut book = self.book.lock().expect("the drain book is never poisoned");
        let mut held: Vec<_> = book.held.drain().map(|(_, held)| held).collect();
        held.sort_by(|a, b| a.0.message_id.cmp(&b.0.message_id));
        held
    }

    pub(crate) fn totals(&self) -> Totals {
        let book = self.book.lock().expect("the drain book is never poisoned");
        Totals {
            tried: book.tried.len(),
            held: book.held.len(),
        }
    }
}

/// In a drain, puts back messages the run already tried, untried: hidden until the run
/// ends, then visible after the usual retry backoff.
pub(super) async fn hold(
    batcher: &QueueBatcher,
    drain: &Drain,
    messages: &[ReceivedMessage],
    retry_backoff: Duration,
) {
    let replies: Vec<Reply> = messages
        .iter()
        .map(|message| batcher.set_visibility(message, HOLD))
        .collect();
    for (message, reply) in messages.iter().zip(replies) {
        info!(message_id = %message.message_id, receive_count = message.receive_count,
            "Message already tried in this drain; held until it ends.");
        if let Err(e) = reply.await {
            warn!(message_id = %message.message_id, error = %error_chain(&e), "Could not hold the message; it reappears after its visibility timeout.");
        }
        drain.hold(
            message.clone(),
            retry_delay(retry_backoff, message.receive_count),
        );
    }
}

/// The end of a drain run: the held messages become visible after their retry backoff,
/// and one line says how the run went.
pub(super) async fn end_drain(queue: &Queue, batcher: &QueueBatcher, drain: &Drain, drained: bool) {
    let totals = drain.totals();
    let held = drain.take_held();
    let replies: Vec<Reply> = held
        .iter()
        .map(|(message, delay)| batcher.set_visibility(message, *delay))
        .collect();
    for ((message, delay), reply) in held.iter().zip(replies) {
        match reply.await {
            Ok(()) => {
                info!(message_id = %message.message_id, delay_s = delay.as_secs(), "Message returned for a retry.")
            }
            Err(e) => {
                warn!(message_id = %message.message_id, error = %error_chain(&e), "Could not return the message; it reappears when its hold ends.")
            }
        }
    }
    use aws_sdk_sqs::types::QueueAttributeName;
    let not_visible = match queue
        .attribute(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .await
    {
        Ok(count) => count.unwrap_or_default(),
        Err(e) => {
            warn!(error = %error_chain(&e), "Cannot read the queue's hidden message count.");
            "unknown".to_string()
        }
    };
    if drained {
        info!(
            tried = totals.tried,
            returned = totals.held,
            not_visible = %not_visible,
            "Drained."
        );
    } else {
        info!(
            tried = totals.tried,
            returned = totals.held,
            not_visible = %not_visible,
            "Drain stopped before the queue was empty."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: &str, receipt: &str) -> ReceivedMessage {
        ReceivedMessage {
            message_id: id.to_string(),
            receipt: crate::aws::queue::ReceiptHandle(receipt.to_string()),
            body: String::new(),
            receive_count: 1,
        }
    }

    fn ids(messages: &[ReceivedMessage]) -> Vec<&str> {
        messages.iter().map(|m| m.message_id.as_str()).collect()
    }

    #[test]
    fn a_message_is_new_once_per_run() {
        let drain = Drain::default();
        let (new, again) = drain.sort(vec![message("a", "r1"), message("b", "r2")]);
        assert_eq!((ids(&new), ids(&again)), (vec!["a", "b"], vec![]));
        let (new, again) = drain.sort(vec![message("b", "r3"), message("c", "r4")]);
        assert_eq!((ids(&new), ids(&again)), (vec!["c"], vec!["b"]));
        assert_eq!(drain.totals(), Totals { tried: 3, held: 0 });
    }

    #[test]
    fn a_held_message_keeps_its_latest_receipt_and_is_taken_once() {
        let drain = Drain::default();
        drain.hold(message("a", "old"), Duration::from_secs(10));
        drain.hold(message("a", "new"), Duration::from_secs(20));
        drain.hold(message("b", "only"), Duration::from_secs(5));
        assert_eq!(drain.totals().held, 2);
        let held = drain.take_held();
        let got: Vec<_> = held
            .iter()
            .map(|(m, d)| (m.message_id.as_str(), m.receipt.0.as_str(), d.as_secs()))
            .collect();
        assert_eq!(got, [("a", "new", 20), ("b", "only", 5)]);
        assert!(drain.take_held().is_empty());
    }

    #[test]
    fn the_run_ends_only_on_nothing_new_with_nothing_running() {
        assert!(finished(0, 0));
        assert!(!finished(0, 1), "a running job may still fail or finish");
        assert!(!finished(1, 0), "a new message starts a job");
    }

    #[test]
    fn a_drain_always_long_polls() {
        assert_eq!(wait_time(Duration::ZERO), MIN_WAIT);
        assert_eq!(wait_time(Duration::from_secs(20)), Duration::from_secs(20));
    }

    #[test]
    fn hold_is_no_longer_than_the_daemons_longest_backoff() {
        assert!(HOLD <= super::super::MAX_RETRY_BACKOFF);
    }
}
