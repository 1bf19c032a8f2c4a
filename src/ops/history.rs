//! The job history: each job's timeline in an SQLite database, `history.sqlite3` in the
//! state directory (WAL mode, so `orchgpu jobs` reads while the daemon writes).
//!
//! It owns the schema and its version, the one writer thread, retention, and the read
//! side (`HistoryReader`) that `orchgpu jobs` renders. It decides nothing about a job or
//! a message: `job` and `daemon` `record` what happened, and a history that cannot be
//! written loses events (logged, counted), never a job.
//!
//! A job's *state* is derived from its latest event that says one (`EventKind::state`);
//! each `Received` starts a new attempt of that job id.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

mod reader;
mod writer;
pub use reader::*;
pub use writer::*;

/// The database's file name inside the state directory.
pub(crate) const FILE_NAME: &str = "history.sqlite3";

/// The schema this build reads and writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;

/// How long a statement waits for a lock held by another connection.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE jobs (
    job_id      TEXT PRIMARY KEY NOT NULL,
    bucket      TEXT NOT NULL,
    key         TEXT NOT NULL,
    message_id  TEXT,
    first_seen  INTEGER NOT NULL,
    last_update INTEGER NOT NULL,
    state       TEXT NOT NULL,
    attempts    INTEGER NOT NULL,
    last_reason TEXT
);
CREATE INDEX jobs_by_update ON jobs (last_update);
CREATE INDEX jobs_by_key ON jobs (key, last_update);
CREATE TABLE events (
    seq        INTEGER PRIMARY KEY,
    job_id     TEXT NOT NULL,
    attempt    INTEGER NOT NULL,
    at         INTEGER NOT NULL,
    kind       TEXT NOT NULL,
    message_id TEXT,
    detail     TEXT NOT NULL
);
CREATE INDEX events_by_job ON events (job_id, seq);
";

/// Why the history cannot be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("cannot create the state directory {path}")]
    /// The state directory could not be created.
    CreateDir {
        /// The file or directory.
        path: PathBuf,
        #[source]
        /// What went wrong underneath.
        source: std::io::Error,
    },
    #[error("no job history at {path}")]
    /// There is no history file (the daemon never ran with this state directory).
    Missing {
        /// The file or directory.
        path: PathBuf,
    },
    #[error("cannot open the job history at {path}")]
    /// The database could not be opened or set up.
    Open {
        /// The file or directory.
        path: PathBuf,
        #[source]
        /// What went wrong underneath.
        source: rusqlite::Error,
    },
    #[error(
        "the job history at {path} has schema version {found}, this orchgpu knows only {SCHEMA_VERSION}"
    )]
    /// The file was written by a newer orchgpu.
    UnknownVersion {
        /// The file or directory.
        path: PathBuf,
        /// The version the file has.
        found: i64,
    },
    #[error("cannot start the job history's writer thread")]
    /// The writer thread could not be started.
    Thread(#[source] std::io::Error),
    #[error("cannot read the job history at {path}")]
    /// A query failed.
    Read {
        /// The file or directory.
        path: PathBuf,
        #[source]
        /// What went wrong underneath.
        source: rusqlite::Error,
    },
}

/// How much history is kept: jobs not updated for `max_age` go, and at most `max_rows`
/// jobs stay (the most recently updated); a job's events go with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Events older than this are removed.
    pub max_age: Duration,
    /// At most this many events are kept.
    pub max_rows: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: Duration::from_secs(30 * 24 * 60 * 60),
            max_rows: 100_000,
        }
    }
}

/// One thing that happened to a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEvent {
    /// The job's id.
    pub job_id: String,
    /// The bucket.
    pub bucket: String,
    /// The object's key.
    pub key: String,
    /// The SQS message id.
    pub message_id: Option<String>,
    /// When it happened.
    pub at: SystemTime,
    /// What happened.
    pub kind: EventKind,
}

impl HistoryEvent {
    /// An event that happens now.
    pub(crate) fn now(
        job_id: impl Into<String>,
        bucket: impl Into<String>,
        key: impl Into<String>,
        message_id: Option<String>,
        kind: EventKind,
    ) -> Self {
        HistoryEvent {
            job_id: job_id.into(),
            bucket: bucket.into(),
            key: key.into(),
            message_id,
            at: SystemTime::now(),
            kind,
        }
    }
}

/// What happened; stored as its snake_case name plus its fields as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    /// The message was received; starts a new attempt.
    Received {
        /// How many times SQS handed the message out.
        receive_count: u32,
    },
    /// The job id was claimed for this daemon.
    Claimed,
    /// The scheduler answered busy; the job waits for GPUs.
    WaitingForGpus,
    /// The scheduler granted GPUs.
    Granted {
        /// The scheduler's job id.
        scheduler_job: String,
        /// The devices granted.
        devices: Vec<String>,
    },
    /// The bundle was built.
    Bundled {
        /// The bundle's size.
        bytes: u64,
    },
    /// The bundle was uploaded to the intermediate bucket.
    Uploaded,
    /// The function's result was found in the output bucket.
    ResultSeen,
    /// The GPUs were given back (does not change the job's state).
    Released {
        /// The scheduler's job id.
        scheduler_job: String,
    },
    /// The message was deleted: `outcome` is `succeeded` (the job is done) or why the
    /// message can never become a job (`duplicate`, `dropped`, `superseded`, ...).
    Deleted {
        /// How the job ended.
        outcome: String,
    },
    /// The message was made visible again: the job's error chain, or `shutdown`.
    Returned {
        /// Why.
        reason: String,
    },
    /// The job failed.
    Failed {
        /// Why.
        reason: String,
    },
}

/// The `Deleted` outcome of a job that succeeded.
pub const SUCCEEDED: &str = "succeeded";

impl EventKind {
    /// The stored name, e.g. `waiting_for_gpus`.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            EventKind::Received { .. } => "received",
            EventKind::Claimed => "claimed",
            EventKind::WaitingForGpus => "waiting_for_gpus",
            EventKind::Granted { .. } => "granted",
            EventKind::Bundled { .. } => "bundled",
            EventKind::Uploaded => "uploaded",
            EventKind::ResultSeen => "result_seen",
            EventKind::Released { .. } => "released",
            EventKind::Deleted { .. } => "deleted",
            EventKind::Returned { .. } => "returned",
            EventKind::Failed { .. } => "failed",
        }
    }

    /// The job's state after this event, or `None` when it keeps the one it had.
    pub(crate) fn state(&self) -> Option<JobState> {
        Some(match self {
            EventKind::Received { .. } | EventKind::Claimed => JobState::Received,
            EventKind::WaitingForGpus => JobState::WaitingForGpus,
            EventKind::Granted { .. }
            | EventKind::Bundled { .. }
            | EventKind::Uploaded
            | EventKind::ResultSeen => JobState::Running,
            // GPUs are released after a success and after a failure alike.
            EventKind::Released { .. } => return None,
            EventKind::Deleted { outcome } if outcome == SUCCEEDED => JobState::Done,
            EventKind::Deleted { .. } => JobState::Dropped,
            EventKind::Returned { .. } => JobState::Returned,
            EventKind::Failed { .. } => JobState::Failed,
        })
    }

    /// Why the attempt ended other than by success, if this event says.
    fn reason(&self) -> Option<&str> {
        match self {
            EventKind::Returned { reason } | EventKind::Failed { reason } => Some(reason),
            EventKind::Deleted { outcome } if outcome != SUCCEEDED => Some(outcome),
            _ => None,
        }
    }

    /// The fields, without the name, as JSON (`{}` for none).
    fn detail(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        match value.as_object_mut() {
            Some(fields) => {
                fields.remove("kind");
                value
            }
            None => serde_json::json!({}),
        }
    }

    /// The event back from its stored name and fields; `None` for a kind this build does
    /// not know (written by a newer one).
    fn from_stored(name: &str, detail: &serde_json::Value) -> Option<EventKind> {
        let mut value = detail.clone();
        value
            .as_object_mut()?
            .insert("kind".into(), serde_json::Value::String(name.into()));
        serde_json::from_value(value).ok()
    }
}

/// A job's state, derived from its latest event that says one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Received from the queue.
    Received,
    /// Waiting for the scheduler.
    WaitingForGpus,
    /// Its function runs.
    Running,
    /// Its result is there.
    Done,
    /// The attempt ended without its message (lost receipt, shutdown abort).
    Failed,
    /// The message went back to the queue for a retry.
    Returned,
    /// It can never run (not an object event, a gone input).
    Dropped,
}

impl JobState {
    pub(crate) const ALL: [JobState; 7] = [
        JobState::Received,
        JobState::WaitingForGpus,
        JobState::Running,
        JobState::Done,
        JobState::Failed,
        JobState::Returned,
        JobState::Dropped,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            JobState::Received => "received",
            JobState::WaitingForGpus => "waiting_for_gpus",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Returned => "returned",
            JobState::Dropped => "dropped",
        }
    }

    /// The state named `name`, as stored and as `--state` takes it.
    pub(crate) fn parse(name: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A point in time as stored: milliseconds since the Unix epoch. Serialized as RFC 3339
/// in UTC; displayed as `YYYY-MM-DD HH:MM:SS` in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Timestamp(pub i64);

impl Timestamp {
    pub(crate) fn from_system(at: SystemTime) -> Self {
        let millis = at
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Timestamp(millis)
    }

    /// RFC 3339 in UTC with milliseconds, e.g. `2026-05-01T12:00:00.250Z`.
    pub(crate) fn rfc3339(self) -> String {
        let (date, millis) = self.civil();
        format!("{date}.{millis:03}Z").replacen(' ', "T", 1)
    }

    /// `YYYY-MM-DD HH:MM:SS` (UTC) and the milliseconds.
    fn civil(self) -> (String, u16) {
        let nanos = i128::from(self.0) * 1_000_000;
        match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
            Ok(t) => (
                format!(
                    "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
                    t.year(),
                    u8::from(t.month()),
                    t.day(),
                    t.hour(),
                    t.minute(),
                    t.second()
                ),
                t.millisecond(),
            ),
            Err(_) => (format!("@{}", self.0), 0),
        }
    }

    /// `YYYY-MM-DD HH:MM:SS.mmm` (UTC).
    pub(crate) fn display_millis(self) -> String {
        let (date, millis) = self.civil();
        format!("{date}.{millis:03}")
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.civil().0)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.rfc3339())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::sync::mpsc::{self, Sender};
    use std::time::Instant;

    use rusqlite::Connection;

    const WAIT: Duration = Duration::from_secs(10);

    fn event(job: &str, key: &str, at: SystemTime, kind: EventKind) -> HistoryEvent {
        HistoryEvent {
            job_id: job.into(),
            bucket: "in".into(),
            key: key.into(),
            message_id: Some(format!("m-{job}")),
            at,
            kind,
        }
    }

    fn secs(n: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_780_000_000 + n)
    }

    /// Keeps everything: the tests' fixed times are in the past.
    const KEEP_ALL: Retention = Retention {
        max_age: Duration::from_secs(100 * 365 * 86_400),
        max_rows: u64::MAX,
    };

    fn open(dir: &Path) -> History {
        History::open(dir, KEEP_ALL).expect("open history")
    }

    fn reader(dir: &Path) -> HistoryReader {
        HistoryReader::open(dir).expect("open reader")
    }

    fn all(dir: &Path) -> Vec<JobSummary> {
        reader(dir).list(&ListFilter::default()).expect("list")
    }

    /// A job that failed once (returned with a reason) then succeeded.
    fn failed_then_succeeded(history: &History, job: &str, key: &str, t0: u64) {
        for (n, kind) in [
            EventKind::Received { receive_count: 1 },
            EventKind::Claimed,
            EventKind::Granted {
                scheduler_job: "17".into(),
                devices: vec!["gpu1:0".into()],
            },
            EventKind::Failed {
                reason: "result deadline: no result after 3600 s".into(),
            },
            EventKind::Released {
                scheduler_job: "17".into(),
            },
            EventKind::Returned {
                reason: "result deadline: no result after 3600 s".into(),
            },
            EventKind::Received { receive_count: 2 },
            EventKind::WaitingForGpus,
            EventKind::Granted {
                scheduler_job: "18".into(),
                devices: vec!["gpu2:0".into()],
            },
            EventKind::Bundled { bytes: 1234 },
            EventKind::Uploaded,
            EventKind::ResultSeen,
            EventKind::Released {
                scheduler_job: "18".into(),
            },
            EventKind::Deleted {
                outcome: SUCCEEDED.into(),
            },
        ]
        .into_iter()
        .enumerate()
        {
            history.record(event(job, key, secs(t0 + n as u64), kind));
        }
    }

    #[test]
    fn gpu_time_is_each_grant_to_its_release_times_its_devices() {
        let dir = tempfile::tempdir().expect("tempdir");
        let history = open(dir.path());
        // Grant 17 (1 device) at +2 s, released at +4 s; grant 18 (1 device) at +8 s,
        // released at +12 s: 2 + 4 GPU-seconds.
        failed_then_succeeded(&history, "job-gpu", "k", 0);
        // Two devices from +1 s to +2.5 s, and a grant never released (not counted).
        for (at_ms, kind) in [
            (1_000, EventKind::Received { receive_count: 1 }),
            (
                1_000,
                EventKind::Granted {
                    scheduler_job: "30".into(),
                    devices: vec!["a:0".into(), "a:1".into()],
                },
            ),
            (
                2_500,
                EventKind::Released {
                    scheduler_job: "30".into(),
                },
            ),
            (
                3_000,
                EventKind::Granted {
                    scheduler_job: "31".into(),
                    devices: vec!["a:0".into()],
                },
            ),
        ] {
            history.record(event(
                "job-two",
                "k2",
                secs(0) + Duration::from_millis(at_ms),
                kind,
            ));
        }
        history.record(event(
            "job-none",
            "k3",
            secs(0),
            EventKind::Received { receive_count: 1 },
        ));
        assert!(history.flush(WAIT));
        let shown = |id: &str| {
            reader(dir.path())
                .show(id)
                .expect("show")
                .expect("found")
                .job
                .gpu_seconds
        };
        assert_eq!(shown("job-gpu"), Some(6.0));
        assert_eq!(shown("job-two"), Some(3.0));
        assert_eq!(shown("job-none"), None);
        let listed: Vec<_> = all(dir.path())
            .into_iter()
            .map(|j| (j.job_id, j.gpu_seconds))
            .collect();
        assert!(
            listed.contains(&("job-gpu".into(), Some(6.0))),
            "{listed:?}"
        );
        assert!(
            listed.contains(&("job-two".into(), Some(3.0))),
            "{listed:?}"
        );
    }

    #[test]
    fn each_event_sets_the_state_it_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let history = open(dir.path());
        let state_after = |kinds: Vec<EventKind>| {
            let job = format!("j{}", fastrand::u64(..));
            for (n, kind) in kinds.into_iter().enumerate() {
                history.record(event(&job, "k", secs(n as u64), kind));
            }
            assert!(history.flush(WAIT));
            reader(dir.path())
                .show(&job)
                .expect("show")
                .expect("found")
                .job
                .state
        };
        let received = EventKind::Received { receive_count: 1 };
        let granted = EventKind::Granted {
            scheduler_job: "1".into(),
            devices: vec![],
        };
        assert_eq!(state_after(vec![received.clone()]), "received");
        assert_eq!(
            state_after(vec![received.clone(), EventKind::WaitingForGpus]),
            "waiting_for_gpus"
        );
        assert_eq!(
            state_after(vec![received.clone(), granted.clone()]),
            "running"
        );
        // Released keeps the state it follows.
        assert_eq!(
            state_after(vec![
                granted.clone(),
                EventKind::ResultSeen,
                EventKind::Released {
                    scheduler_job: "1".into()
                }
            ]),
            "running"
        );
        assert_eq!(
            state_after(vec![
                granted.clone(),
                EventKind::Failed { reason: "x".into() },
                EventKind::Released {
                    scheduler_job: "1".into()
                }
            ]),
            "failed"
        );
        assert_eq!(
            state_after(vec![EventKind::Deleted {
                outcome: SUCCEEDED.into()
            }]),
            "done"
        );
        assert_eq!(
            state_after(vec![EventKind::Deleted {
                outcome: "duplicate".into()
            }]),
            "dropped"
        );
        assert_eq!(
            state_after(vec![EventKind::Returned {
                reason: "shutdown".into()
            }]),
            "returned"
        );
        assert_eq!(history.write_failures(), 0);
    }

    #[test]
    fn two_attempts_show_with_their_reasons() {
        let dir = tempfile::tempdir().expect("tempdir");
        let history = open(dir.path());
        failed_then_succeeded(&history, "job-1", "images/a.jpg", 0);
        assert!(history.flush(WAIT));

        let detail = reader(dir.path())
            .show("job-1")
            .expect("show")
            .expect("found");
        assert_eq!(detail.job.state, "done");
        assert_eq!(detail.job.attempts, 2);
        assert_eq!(
            detail.job.last_reason.as_deref(),
            Some("result deadline: no result after 3600 s")
        );
        assert_eq!(detail.timeline.len(), 14);
        assert_eq!(
            detail
                .timeline
                .iter()
                .map(|e| e.attempt)
                .collect::<Vec<_>>(),
            [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2]
        );
        assert_eq!(detail.timeline[2].detail["devices"][0], "gpu1:0");
        assert_eq!(detail.timeline[6].detail["receive_count"], 2);
        let outcomes: Vec<_> = detail
            .attempt_outcomes
            .iter()
            .map(|o| (o.attempt, o.state.as_str(), o.reason.as_deref()))
            .collect();
        assert_eq!(
            outcomes,
            [
                (
                    1,
                    "returned",
                    Some("result deadline: no result after 3600 s")
                ),
                (2, "done", None)
            ]
        );
        assert_eq!(
            detail.attempt_outcomes[0].started,
            Timestamp::from_system(secs(0))
        );
        assert_eq!(
            detail.attempt_outcomes[1].ended,
            Timestamp::from_system(secs(13))
        );
        // By key, too.
        let by_key = reader(dir.path())
            .show("images/a.jpg")
            .expect("show")
            .expect("found");
        assert_eq!(by_key.job.job_id, "job-1");
        assert!(reader(dir.path()).show("nothing").expect("show").is_none());
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let history = open(dir.path());
        failed_then_succeeded(&history, "job-1", "a", 0);
        assert!(history.flush(WAIT));
        drop(history);
        // The writer has gone with its last handle; a new one appends to the same file.
        let history = open(dir.path());
        history.record(event(
            "job-1",
            "a",
            secs(100),
            EventKind::Received { receive_count: 3 },
        ));
        assert!(history.flush(WAIT));
        let detail = reader(dir.path())
            .show("job-1")
            .expect("show")
            .expect("found");
        assert_eq!(detail.job.attempts, 3);
        assert_eq!(detail.timeline.len(), 15);
        assert_eq!(detail.job.state, "received");
    }

    #[test]
    fn retention_by_age_and_by_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        let history = open(dir.path());
        for (job, age_days) in [("old", 40), ("mid", 20), ("new1", 2), ("new2", 1)] {
            history.record(event(
                job,
                job,
                now - day * age_days,
                EventKind::Received { receive_count: 1 },
            ));
        }
        assert!(history.flush(WAIT));
        assert_eq!(all(dir.path()).len(), 4);
        drop(history);

        // Retention applies when the writer starts (then every minute): by age...
        let history = History::open(
            dir.path(),
            Retention {
                max_age: day * 30,
                max_rows: 100,
            },
        )
        .expect("open");
        assert!(history.flush(WAIT));
        let ids = |jobs: Vec<JobSummary>| jobs.into_iter().map(|j| j.job_id).collect::<Vec<_>>();
        assert_eq!(ids(all(dir.path())), ["new2", "new1", "mid"]);
        assert!(reader(dir.path()).show("old").expect("show").is_none());
        drop(history);

        // ...then by rows, keeping the most recently updated.
        let history = History::open(
            dir.path(),
            Retention {
                max_age: day * 30,
                max_rows: 2,
            },
        )
        .expect("open");
        assert!(history.flush(WAIT));
        assert_eq!(ids(all(dir.path())), ["new2", "new1"]);
        // Their events went with them.
        let conn = Connection::open(dir.path().join(FILE_NAME)).expect("open raw");
        let events: i64 = conn
            .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
            .expect("count");
        assert_eq!(events, 2);
        assert_eq!(history.write_failures(), 0);
    }

    #[test]
    fn unwritable_history_never_blocks_and_counts_failures() {
        let dir = tempfile::tempdir().expect("tempdir");
        let history = open(dir.path());
        assert!(history.flush(WAIT));
        // Another connection takes the tables away: every write now fails.
        let conn = Connection::open(dir.path().join(FILE_NAME)).expect("open raw");
        conn.execute_batch("DROP TABLE jobs; DROP TABLE events;")
            .expect("drop tables");

        let started = Instant::now();
        for n in 0..100 {
            history.record(event("j", "k", secs(n), EventKind::Claimed));
        }
        let elapsed = started.elapsed();
        assert!(
            elapsed < Duration::from_millis(200),
            "record blocked: {elapsed:?}"
        );
        assert!(history.flush(WAIT));
        assert_eq!(history.write_failures(), 100);
    }

    fn with_channel(sender: Sender<Command>, capacity: usize) -> History {
        History {
            writer: Some(Arc::new(Writer {
                sender,
                capacity,
                shared: Arc::new(Shared::new()),
            })),
        }
    }

    #[test]
    fn the_writer_frees_the_queue_it_takes_from() {
        let dir = tempfile::tempdir().expect("tempdir");
        let history = open(dir.path());
        for n in 0..100 {
            history.record(event("j", "k", secs(n), EventKind::Claimed));
        }
        assert!(history.flush(WAIT));
        let writer = history.writer.as_ref().expect("enabled");
        assert_eq!(writer.shared.queued.load(Ordering::Relaxed), 0);
        assert_eq!(history.write_failures(), 0);
    }

    #[test]
    fn a_full_queue_or_a_gone_writer_drops_and_counts_without_blocking() {
        // Nobody receives: the one slot fills, the other four are dropped.
        let (sender, _receiver) = mpsc::channel();
        let history = with_channel(sender, 1);
        for n in 0..5 {
            history.record(event("j", "k", secs(n), EventKind::Claimed));
        }
        assert_eq!(history.write_failures(), 4);
        assert!(!history.flush(Duration::from_millis(50)));

        let (sender, receiver) = mpsc::channel();
        drop(receiver);
        let history = with_channel(sender, 8);
        history.record(event("j", "k", secs(0), EventKind::Claimed));
        assert_eq!(history.write_failures(), 1);

        let disabled = History::disabled();
        disabled.record(event("j", "k", secs(0), EventKind::Claimed));
        assert_eq!(disabled.write_failures(), 0);
        assert!(disabled.flush(Duration::ZERO));
    }

    #[test]
    fn reader_sees_rows_while_the_writer_is_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let history = open(dir.path());
        let reader = reader(dir.path());
        assert!(
            reader
                .list(&ListFilter::default())
                .expect("list")
                .is_empty()
        );
        history.record(event(
            "j1",
            "a/b.jpg",
            secs(0),
            EventKind::Received { receive_count: 1 },
        ));
        assert!(history.flush(WAIT));
        let jobs = reader.list(&ListFilter::default()).expect("list");
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].key, "a/b.jpg");
        let mode: String = Connection::open(dir.path().join(FILE_NAME))
            .expect("open raw")
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("mode");
        assert_eq!(mode, "wal");
    }

    #[test]
    fn list_filters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let history = open(dir.path());
        failed_then_succeeded(&history, "done-1", "images/cat.jpg", 0);
        history.record(event(
            "ret-1",
            "images/dog.jpg",
            secs(100),
            EventKind::Returned {
                reason: "shutdown".into(),
            },
        ));
        history.record(event(
            "run-1",
            "other/cat.png",
            secs(200),
            EventKind::Uploaded,
        ));
        assert!(history.flush(WAIT));
        let reader = reader(dir.path());
        let ids = |filter: ListFilter| {
            reader
                .list(&filter)
                .expect("list")
                .into_iter()
                .map(|j| j.job_id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(ListFilter::default()), ["run-1", "ret-1", "done-1"]);
        assert_eq!(
            ids(ListFilter {
                state: Some(JobState::Done),
                ..ListFilter::default()
            }),
            ["done-1"]
        );
        assert_eq!(
            ids(ListFilter {
                key_contains: Some("cat".into()),
                ..ListFilter::default()
            }),
            ["run-1", "done-1"]
        );
        assert_eq!(
            ids(ListFilter {
                since: Some(secs(100)),
                ..ListFilter::default()
            }),
            ["run-1", "ret-1"]
        );
        assert_eq!(
            ids(ListFilter {
                limit: 1,
                ..ListFilter::default()
            }),
            ["run-1"]
        );
    }

    #[test]
    fn unknown_schema_version_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE_NAME);
        Connection::open(&path)
            .expect("open raw")
            .pragma_update(None, "user_version", 7)
            .expect("set version");
        let err = History::open(dir.path(), Retention::default()).expect_err("refused");
        assert!(
            matches!(err, HistoryError::UnknownVersion { found: 7, .. }),
            "{err}"
        );
        let err = HistoryReader::open(dir.path()).err().expect("refused");
        assert!(
            matches!(err, HistoryError::UnknownVersion { found: 7, .. }),
            "{err}"
        );
        // A database that is not ours (tables, no version) is refused too.
        let other = tempfile::tempdir().expect("tempdir");
        Connection::open(other.path().join(FILE_NAME))
            .expect("open raw")
            .execute_batch("CREATE TABLE t (x)")
            .expect("create");
        assert!(History::open(other.path(), Retention::default()).is_err());
    }

    #[test]
    fn timestamps_render_in_utc() {
        let t = Timestamp(1_780_000_000_250);
        assert_eq!(t.rfc3339(), "2026-05-28T20:26:40.250Z");
        assert_eq!(t.to_string(), "2026-05-28 20:26:40");
        assert_eq!(
            serde_json::to_string(&t).expect("json"),
            "\"2026-05-28T20:26:40.250Z\""
        );
    }
}
