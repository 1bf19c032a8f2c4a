//! The read side: what `orchgpu jobs` lists and shows, read while the daemon writes.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;

use super::*;

/// What `orchgpu jobs` lists.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only jobs in this state.
    pub state: Option<JobState>,
    /// Jobs whose key contains this (case-sensitive).
    pub key_contains: Option<String>,
    /// Jobs updated at or after this.
    pub since: Option<SystemTime>,
    /// At most this many, most recently updated first; 0 for all.
    pub limit: usize,
}

/// One job, as listed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobSummary {
    pub(crate) job_id: String,
    pub(crate) bucket: String,
    pub(crate) key: String,
    pub(crate) state: String,
    pub(crate) attempts: u32,
    pub(crate) first_seen: Timestamp,
    pub(crate) last_update: Timestamp,
    pub(crate) last_reason: Option<String>,
    /// GPU time of its attempts on this daemon (GPUs × seconds from each grant to its
    /// release, as `GPU_SECONDS` reads the timeline); `None` before any release.
    pub(crate) gpu_seconds: Option<f64>,
}

/// A job's GPU time from its timeline, as a column: for each `released` event, the
/// devices of the latest earlier `granted` event of the same scheduler job times the
/// milliseconds between them. The same figure `orchgpu_gpu_seconds_total` sums, per job;
/// a grant released by another daemon (handed over through the claim) counts there.
pub(super) const GPU_SECONDS: &str = "(SELECT SUM(json_array_length(g.detail, '$.devices') * (r.at - g.at)) \
     / 1000.0 FROM events r JOIN events g ON g.seq = (SELECT max(seq) FROM events \
     WHERE job_id = r.job_id AND kind = 'granted' AND seq < r.seq \
     AND json_extract(detail, '$.scheduler_job') = json_extract(r.detail, '$.scheduler_job')) \
     WHERE r.job_id = jobs.job_id AND r.kind = 'released')";

/// One event of a job's timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRecord {
    pub(crate) attempt: u32,
    pub(crate) at: Timestamp,
    pub(crate) kind: String,
    pub(crate) message_id: Option<String>,
    /// The event's fields, e.g. `{"reason": "..."}`.
    pub(crate) detail: serde_json::Value,
}

/// How one attempt (one receive of the job's message) ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct AttemptOutcome {
    pub(crate) attempt: u32,
    pub(crate) message_id: Option<String>,
    pub(crate) started: Timestamp,
    pub(crate) ended: Timestamp,
    /// The state its events leave the job in.
    pub(crate) state: String,
    /// Why it ended other than by success, if it says.
    pub(crate) reason: Option<String>,
}

/// One job with its timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobDetail {
    #[serde(flatten)]
    pub(crate) job: JobSummary,
    pub(crate) message_id: Option<String>,
    pub(crate) attempt_outcomes: Vec<AttemptOutcome>,
    /// Every event of the job, oldest first.
    pub timeline: Vec<EventRecord>,
}

/// A read-only view of the history, safe to use while the daemon writes.
pub struct HistoryReader {
    conn: Connection,
    path: PathBuf,
}

impl HistoryReader {
    /// Opens `history.sqlite3` in `state_dir` read-only; never creates it.
    ///
    /// # Errors
    ///
    /// `Missing` when there is no history there; `Open` or `UnknownVersion` when it
    /// cannot be read as one.
    pub fn open(state_dir: &Path) -> Result<HistoryReader, HistoryError> {
        let path = state_dir.join(FILE_NAME);
        if !path.is_file() {
            return Err(HistoryError::Missing { path });
        }
        let open_error = |source| HistoryError::Open {
            path: path.clone(),
            source,
        };
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_error)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_error)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(open_error)?;
        if version != SCHEMA_VERSION {
            return Err(HistoryError::UnknownVersion {
                path,
                found: version,
            });
        }
        Ok(HistoryReader { conn, path })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn read_error(&self) -> impl Fn(rusqlite::Error) -> HistoryError + '_ {
        |source| HistoryError::Read {
            path: self.path.clone(),
            source,
        }
    }

    /// The jobs that match `filter`, most recently updated first.
    ///
    /// # Errors
    ///
    /// The database cannot be read.
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<JobSummary>, HistoryError> {
        let limit = match filter.limit {
            0 => -1,
            n => i64::try_from(n).unwrap_or(i64::MAX),
        };
        let mut statement = self
            .conn
            .prepare(&format!(
                "SELECT job_id, bucket, key, state, attempts, first_seen, last_update, \
                 last_reason, {GPU_SECONDS} FROM jobs \
                 WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR instr(key, ?2) > 0) \
                 AND (?3 IS NULL OR last_update >= ?3) \
                 ORDER BY last_update DESC, job_id LIMIT ?4",
            ))
            .map_err(self.read_error())?;
        let rows = statement
            .query_map(
                params![
                    filter.state.map(JobState::as_str),
                    filter.key_contains,
                    filter.since.map(|t| Timestamp::from_system(t).0),
                    limit
                ],
                summary_from_row,
            )
            .map_err(self.read_error())?;
        rows.collect::<Result<_, _>>().map_err(self.read_error())
    }

    /// The job whose id is `id_or_key`, else the most recently updated job whose key is
    /// exactly `id_or_key`, with its timeline.
    ///
    /// # Errors
    ///
    /// The database cannot be read.
    pub fn show(&self, id_or_key: &str) -> Result<Option<JobDetail>, HistoryError> {
        let columns = format!(
            "SELECT job_id, bucket, key, state, attempts, first_seen, last_update, \
             last_reason, {GPU_SECONDS}, message_id FROM jobs"
        );
        let read = |sql: &str| {
            self.conn
                .query_row(sql, [id_or_key], |row| {
                    Ok((summary_from_row(row)?, row.get::<_, Option<String>>(9)?))
                })
                .optional()
        };
        let found =
            match read(&format!("{columns} WHERE job_id = ?1")).map_err(self.read_error())? {
                Some(found) => Some(found),
                None => read(&format!(
                    "{columns} WHERE key = ?1 ORDER BY last_update DESC, job_id LIMIT 1"
                ))
                .map_err(self.read_error())?,
            };
        let Some((job, message_id)) = found else {
            return Ok(None);
        };
        let mut statement = self
            .conn
            .prepare(
                "SELECT attempt, at, kind, message_id, detail FROM events \
                 WHERE job_id = ?1 ORDER BY seq",
            )
            .map_err(self.read_error())?;
        let timeline = statement
            .query_map([&job.job_id], |row| {
                let detail: String = row.get(4)?;
                Ok(EventRecord {
                    attempt: row.get(0)?,
                    at: Timestamp(row.get(1)?),
                    kind: row.get(2)?,
                    message_id: row.get(3)?,
                    // A detail that is not JSON is shown as the text it is.
                    detail: serde_json::from_str(&detail)
                        .unwrap_or(serde_json::Value::String(detail)),
                })
            })
            .map_err(self.read_error())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.read_error())?;
        Ok(Some(JobDetail {
            attempt_outcomes: attempt_outcomes(&timeline),
            job,
            message_id,
            timeline,
        }))
    }
}

pub(super) fn summary_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<JobSummary> {
    Ok(JobSummary {
        job_id: row.get(0)?,
        bucket: row.get(1)?,
        key: row.get(2)?,
        state: row.get(3)?,
        attempts: row.get(4)?,
        first_seen: Timestamp(row.get(5)?),
        last_update: Timestamp(row.get(6)?),
        last_reason: row.get(7)?,
        gpu_seconds: row.get(8)?,
    })
}

/// Each attempt's span, final state and reason, from the timeline (in order).
pub(super) fn attempt_outcomes(timeline: &[EventRecord]) -> Vec<AttemptOutcome> {
    let mut outcomes: Vec<AttemptOutcome> = Vec::new();
    for event in timeline {
        let kind = EventKind::from_stored(&event.kind, &event.detail);
        let outcome = match outcomes.last_mut() {
            Some(last) if last.attempt == event.attempt => last,
            _ => {
                outcomes.push(AttemptOutcome {
                    attempt: event.attempt,
                    message_id: event.message_id.clone(),
                    started: event.at,
                    ended: event.at,
                    state: JobState::Received.as_str().into(),
                    reason: None,
                });
                let Some(last) = outcomes.last_mut() else {
                    unreachable!("an outcome was just pushed")
                };
                last
            }
        };
        outcome.ended = outcome.ended.max(event.at);
        if outcome.message_id.is_none() {
            outcome.message_id.clone_from(&event.message_id);
        }
        if let Some(kind) = kind {
            if let Some(state) = kind.state() {
                outcome.state = state.as_str().into();
            }
            if let Some(reason) = kind.reason() {
                outcome.reason = Some(reason.to_string());
            }
        }
    }
    outcomes
}
