//! The write side: the one writer thread, its queue, schema migration and retention.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use tracing::{info, warn};

use super::*;

/// Events waiting for the writer; past this `record` drops (and counts) instead of
/// growing without bound while the disk is stuck (about 12 MB of events then).
///
/// The queue is std's unbounded channel with this bound kept by a counter, not a
/// `sync_channel(QUEUE_CAPACITY)`: a bounded std channel allocates and stamps every slot
/// when it is created, 65 536 slots of about 180 bytes, which made 11.5 MB of every
/// daemon's resident memory before its first job (see BENCHMARKS.md, "Memory"). The
/// unbounded one allocates blocks of 31 slots as events queue and frees them as the
/// writer catches up.
const QUEUE_CAPACITY: usize = 65_536;
/// Events written in one transaction at most; one commit (one fsync of the WAL at most)
/// per batch is what makes the writer fast.
const MAX_BATCH: usize = 1024;
/// How often the writer applies retention (and once when it starts).
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// At most one warning line per this interval about lost events.
const WARN_EVERY: Duration = Duration::from_secs(60);

pub(super) enum Command {
    Record(HistoryEvent),
    /// Answered once every event sent before it is written (or lost).
    Flush(mpsc::Sender<()>),
}

/// What the handles and the writer thread share.
pub(super) struct Shared {
    failures: AtomicU64,
    /// `Record`s sent and not yet taken by the writer (the bound of `QUEUE_CAPACITY`).
    pub(super) queued: AtomicUsize,
    started: Instant,
    /// Milliseconds after `started` of the last warning, plus one (0: never warned).
    last_warn: AtomicU64,
}

impl Shared {
    pub(super) fn new() -> Shared {
        Shared {
            failures: AtomicU64::new(0),
            queued: AtomicUsize::new(0),
            started: Instant::now(),
            last_warn: AtomicU64::new(0),
        }
    }

    /// Counts `lost` events and logs at most one line per `WARN_EVERY`.
    fn note_failure(&self, lost: u64, what: &dyn std::fmt::Display) {
        crate::ops::telemetry::get().history_writes_failed(lost);
        let total = self.failures.fetch_add(lost, Ordering::Relaxed) + lost;
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX) + 1;
        let last = self.last_warn.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= WARN_EVERY.as_millis() as u64;
        if due
            && self
                .last_warn
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            warn!(
                events_lost = total,
                error = %what,
                "Cannot write the job history; events are lost, jobs go on."
            );
        }
    }
}

pub(super) struct Writer {
    pub(super) sender: Sender<Command>,
    /// At most this many events wait for the writer (`QUEUE_CAPACITY`; less in tests).
    pub(super) capacity: usize,
    pub(super) shared: Arc<Shared>,
}

/// The write handle: cheap to clone, never blocks `record`, and off (`disabled`) when
/// there is no history.
#[derive(Clone)]
pub struct History {
    pub(super) writer: Option<Arc<Writer>>,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History")
            .field("enabled", &self.writer.is_some())
            .field("write_failures", &self.write_failures())
            .finish()
    }
}

impl History {
    /// Opens (or creates) `history.sqlite3` in `state_dir`, checks its schema version,
    /// and starts the writer thread, which applies `retention` at once and then every
    /// minute. Blocking: call it at start-up, not on an async worker in a hot path.
    ///
    /// # Errors
    ///
    /// The directory or the database cannot be created or opened, or it has a schema
    /// version this build does not know.
    pub fn open(state_dir: &Path, retention: Retention) -> Result<History, HistoryError> {
        std::fs::create_dir_all(state_dir).map_err(|source| HistoryError::CreateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let path = state_dir.join(FILE_NAME);
        let conn = open_for_writing(&path)?;
        let shared = Arc::new(Shared::new());
        let (sender, receiver) = mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("orchgpu-history".into())
            .spawn(move || run_writer(conn, receiver, &thread_shared, retention))
            .map_err(HistoryError::Thread)?;
        Ok(History {
            writer: Some(Arc::new(Writer {
                sender,
                capacity: QUEUE_CAPACITY,
                shared,
            })),
        })
    }

    /// A history that records nothing (`--no-history`).
    pub fn disabled() -> History {
        History { writer: None }
    }

    pub(crate) fn is_enabled(&self) -> bool {
        self.writer.is_some()
    }

    /// Hands `event` to the writer thread. Never blocks and never fails: when the writer
    /// is behind by `QUEUE_CAPACITY` events or gone, the event is dropped and counted.
    pub fn record(&self, event: HistoryEvent) {
        let Some(writer) = &self.writer else { return };
        let queued = &writer.shared.queued;
        if queued.fetch_add(1, Ordering::Relaxed) >= writer.capacity {
            queued.fetch_sub(1, Ordering::Relaxed);
            writer
                .shared
                .note_failure(1, &"the history writer is behind; queue full");
            return;
        }
        if writer.sender.send(Command::Record(event)).is_err() {
            queued.fetch_sub(1, Ordering::Relaxed);
            writer
                .shared
                .note_failure(1, &"the history writer thread has stopped");
        }
    }

    /// Events lost so far: not written (an SQLite error) or dropped (queue full).
    pub fn write_failures(&self) -> u64 {
        self.writer
            .as_ref()
            .map_or(0, |w| w.shared.failures.load(Ordering::Relaxed))
    }

    /// Waits until every event recorded before this call is written (or counted lost);
    /// `false` if that takes longer than `timeout`. Blocking: for shutdown and tests, on
    /// a blocking thread.
    ///
    /// When the queue is full, a short-lived thread waits for room (a blocking send: no
    /// polling) while this one waits for the answer; that thread ends once its send goes
    /// through, or fails because the writer has stopped.
    pub fn flush(&self, timeout: Duration) -> bool {
        let Some(writer) = &self.writer else {
            return true;
        };
        let (done, wait) = mpsc::channel();
        if writer.sender.send(Command::Flush(done)).is_err() {
            return false;
        }
        wait.recv_timeout(timeout).is_ok()
    }
}

pub(super) fn open_for_writing(path: &Path) -> Result<Connection, HistoryError> {
    let open_error = |source| HistoryError::Open {
        path: path.to_path_buf(),
        source,
    };
    let mut conn = Connection::open(path).map_err(open_error)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_error)?;
    // WAL: readers never block the writer nor the writer them. NORMAL: a commit does not
    // wait for fsync; a power cut may lose the last events, never corrupt the file.
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(open_error)?;
    if !mode.eq_ignore_ascii_case("wal") {
        warn!(path = %path.display(), journal_mode = %mode, "The job history is not in WAL mode.");
    }
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(open_error)?;
    migrate(&mut conn, path)?;
    Ok(conn)
}

/// Creates the schema in an empty database; refuses a version this build does not know
/// and a database that is not empty yet has no version (not ours).
pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), HistoryError> {
    let open_error = |source| HistoryError::Open {
        path: path.to_path_buf(),
        source,
    };
    let tx = conn.transaction().map_err(open_error)?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(open_error)?;
    match version {
        SCHEMA_VERSION => return Ok(()),
        0 => {}
        found => {
            return Err(HistoryError::UnknownVersion {
                path: path.to_path_buf(),
                found,
            });
        }
    }
    let objects: i64 = tx
        .query_row("SELECT count(*) FROM sqlite_master", [], |row| row.get(0))
        .map_err(open_error)?;
    if objects != 0 {
        return Err(HistoryError::UnknownVersion {
            path: path.to_path_buf(),
            found: 0,
        });
    }
    tx.execute_batch(SCHEMA).map_err(open_error)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(open_error)?;
    tx.commit().map_err(open_error)?;
    info!(path = %path.display(), version = SCHEMA_VERSION, "Job history created.");
    Ok(())
}

/// The writer thread: batches what is queued into one transaction, applies retention
/// every `PRUNE_EVERY`, and stops when every `History` handle is gone.
pub(super) fn run_writer(
    mut conn: Connection,
    receiver: Receiver<Command>,
    shared: &Shared,
    retention: Retention,
) {
    let mut next_prune = Instant::now();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut flushes = Vec::new();
    loop {
        let wait = next_prune.saturating_duration_since(Instant::now());
        let first = match receiver.recv_timeout(wait) {
            Ok(command) => Some(command),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut next = first;
        while let Some(command) = next {
            match command {
                Command::Record(event) => {
                    shared.queued.fetch_sub(1, Ordering::Relaxed);
                    batch.push(event);
                }
                Command::Flush(done) => flushes.push(done),
            }
            next = if batch.len() < MAX_BATCH {
                receiver.try_recv().ok()
            } else {
                None
            };
        }
        if !batch.is_empty() {
            if let Err(e) = write_batch(&mut conn, &batch) {
                shared.note_failure(batch.len() as u64, &e);
            }
            batch.clear();
        }
        if Instant::now() >= next_prune {
            if let Err(e) = prune(&mut conn, retention, SystemTime::now()) {
                shared.note_failure(0, &e);
            }
            next_prune = Instant::now() + PRUNE_EVERY;
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

pub(super) fn write_batch(conn: &mut Connection, batch: &[HistoryEvent]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    for event in batch {
        apply(&tx, event)?;
    }
    tx.commit()
}

/// One event: updates the job's row (creating it on its first event) and appends the
/// event to its timeline.
pub(super) fn apply(tx: &Transaction<'_>, event: &HistoryEvent) -> rusqlite::Result<()> {
    let at = Timestamp::from_system(event.at).0;
    let previous: Option<(i64, String, Option<String>)> = tx
        .prepare_cached("SELECT attempts, state, last_reason FROM jobs WHERE job_id = ?1")?
        .query_row([&event.job_id], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()?;
    let (attempts, state, reason) = match previous {
        Some((attempts, state, reason)) => (attempts, state, reason),
        None => (0, JobState::Received.as_str().to_string(), None),
    };
    // A job first seen through another event than Received still has attempt 1.
    let attempts = match event.kind {
        EventKind::Received { .. } => attempts + 1,
        _ => attempts.max(1),
    };
    let state = event.kind.state().map_or(state, |s| s.as_str().to_string());
    let reason = event.kind.reason().map(str::to_string).or(reason);
    tx.prepare_cached(
        "INSERT INTO jobs (job_id, bucket, key, message_id, first_seen, last_update, state, \
         attempts, last_reason) VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7, ?8) \
         ON CONFLICT (job_id) DO UPDATE SET \
         message_id = coalesce(excluded.message_id, message_id), \
         last_update = max(last_update, excluded.last_update), \
         state = excluded.state, attempts = excluded.attempts, \
         last_reason = excluded.last_reason",
    )?
    .execute(params![
        event.job_id,
        event.bucket,
        event.key,
        event.message_id,
        at,
        state,
        attempts,
        reason
    ])?;
    tx.prepare_cached(
        "INSERT INTO events (job_id, attempt, at, kind, message_id, detail) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        event.job_id,
        attempts,
        at,
        event.kind.name(),
        event.message_id,
        event.kind.detail().to_string()
    ])?;
    Ok(())
}

/// Deletes the jobs (and their events) not updated within `max_age` of `now`, then all
/// but the `max_rows` most recently updated; returns how many jobs went.
pub(super) fn prune(
    conn: &mut Connection,
    retention: Retention,
    now: SystemTime,
) -> rusqlite::Result<usize> {
    let cutoff = Timestamp::from_system(now.checked_sub(retention.max_age).unwrap_or(UNIX_EPOCH)).0;
    let keep = i64::try_from(retention.max_rows).unwrap_or(i64::MAX);
    const SURPLUS: &str =
        "SELECT job_id FROM jobs ORDER BY last_update DESC, job_id LIMIT -1 OFFSET ?1";
    let tx = conn.transaction()?;
    tx.execute(
        "DELETE FROM events WHERE job_id IN (SELECT job_id FROM jobs WHERE last_update < ?1)",
        [cutoff],
    )?;
    let mut deleted = tx.execute("DELETE FROM jobs WHERE last_update < ?1", [cutoff])?;
    tx.execute(
        &format!("DELETE FROM events WHERE job_id IN ({SURPLUS})"),
        [keep],
    )?;
    deleted += tx.execute(
        &format!("DELETE FROM jobs WHERE job_id IN ({SURPLUS})"),
        [keep],
    )?;
    tx.commit()?;
    if deleted > 0 {
        info!(jobs = deleted, "Old jobs removed from the history.");
    }
    Ok(deleted)
}
