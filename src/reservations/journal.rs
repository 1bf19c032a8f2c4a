//! The reservation journal: a crash-safe record of every GPU reservation this daemon
//! holds or may hold, in its state directory.
//!
//! Three kinds of record, each written before the moment it covers:
//! - a *call*: an `-alloc` run of SSGM that has started and whose reply is not read yet
//!   (the client writes it into `ssgm/<call id>.out` beside the journal);
//! - a *reservation*: a grant not yet confirmed released, with its failed release
//!   attempts so far (counted across restarts);
//! - a *given-up* reservation: one whose release failed too often (see
//!   `releaser::GIVE_UP_AFTER_FAILURES`); kept for the operator, never retried.
//!
//! The file is small and rewritten whole: temp file, fsync, rename, fsync of the
//! directory. A lock file keeps two daemons from sharing one journal by accident.
//!
//! Format (`reservations.json`), versioned: version 2 adds `calls`, `given_up` and
//! `release_failures` to version 1, which is still read (an old journal means no calls
//! and no failures). An unknown version is refused by name: an older orchgpu reading a
//! version-2 journal stops rather than forget its calls.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::scheduler::CallFiles;

const VERSION: u32 = 2;
const READABLE_VERSIONS: [u32; 2] = [1, 2];
const FILE_NAME: &str = "reservations.json";
const LOCK_NAME: &str = "lock";
/// Where SSGM `-alloc` clients write their replies.
const CALLS_DIR: &str = "ssgm";

/// One reservation held (or possibly held) on the scheduler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct JournalEntry {
    pub(crate) scheduler_job_id: String,
    /// `host:port` of the scheduler that granted it.
    pub(crate) scheduler: String,
    pub(crate) job_id: String,
    pub(crate) key: String,
    pub(crate) since_unix: u64,
    /// Failed release attempts so far, across restarts.
    #[serde(default)]
    pub(crate) release_failures: u32,
}

/// An `-alloc` call started and not yet read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CallEntry {
    pub(crate) call_id: String,
    pub(crate) scheduler: String,
    pub(crate) job_id: String,
    pub(crate) key: String,
    pub(crate) started_unix_ms: u64,
}

/// A reservation whose release was given up, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct GivenUp {
    #[serde(flatten)]
    pub(crate) entry: JournalEntry,
    pub(crate) given_up_unix: u64,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Records {
    #[serde(default)]
    reservations: Vec<JournalEntry>,
    #[serde(default)]
    calls: Vec<CallEntry>,
    #[serde(default)]
    given_up: Vec<GivenUp>,
}

#[derive(Debug, Serialize)]
struct JournalFile<'a> {
    version: u32,
    #[serde(flatten)]
    records: &'a Records,
}

/// What a previous run left: reservations to release and calls to settle.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Leftovers {
    pub(crate) reservations: Vec<JournalEntry>,
    pub(crate) calls: Vec<CallEntry>,
    /// Reservations given up by earlier runs (reported, never released).
    pub(crate) given_up: usize,
}

impl Leftovers {
    /// How many reservations a previous run left unreleased.
    pub fn reservation_count(&self) -> usize {
        self.reservations.len()
    }

    /// How many `-alloc` calls a previous run left unread.
    pub fn call_count(&self) -> usize {
        self.calls.len()
    }
}

/// What can go wrong with the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot use state directory {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state directory {path} is locked by another orchgpu; give each daemon its own --state-dir"
    )]
    Locked { path: PathBuf },
    #[error("journal {path} has version {version}, this orchgpu reads versions 1 and 2 only")]
    UnknownVersion { path: PathBuf, version: u32 },
    #[error(
        "journal {path} is not valid JSON; move it aside after releasing its reservations by hand"
    )]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The open, locked journal.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    records: Mutex<Records>,
    // Held for the daemon's lifetime; the lock goes with the file descriptor.
    _lock: Flock<File>,
}

impl Journal {
    /// Creates the state directory if needed, takes its lock and reads the journal.
    /// Returns the journal and what a previous run left behind.
    ///
    /// # Errors
    /// `Locked` when another daemon uses the directory, `Io`, `Corrupt`, `UnknownVersion`.
    pub fn open(dir: &Path) -> Result<(Journal, Leftovers), JournalError> {
        let io_error = |source| JournalError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir.join(CALLS_DIR)).map_err(io_error)?;
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_NAME))
            .map_err(io_error)?;
        let lock =
            Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
                if errno == nix::errno::Errno::EWOULDBLOCK {
                    JournalError::Locked {
                        path: dir.to_path_buf(),
                    }
                } else {
                    io_error(std::io::Error::from(errno))
                }
            })?;
        let records = read_records(&dir.join(FILE_NAME))?;
        let leftovers = Leftovers {
            reservations: records.reservations.clone(),
            calls: records.calls.clone(),
            given_up: records.given_up.len(),
        };
        let journal = Journal {
            dir: dir.to_path_buf(),
            records: Mutex::new(records),
            _lock: lock,
        };
        Ok((journal, leftovers))
    }

    /// The output files of call `call_id`.
    pub(crate) fn call_files(&self, call_id: &str) -> CallFiles {
        CallFiles::in_dir(&self.dir.join(CALLS_DIR), call_id)
    }

    /// Records, durably, that an `-alloc` call is about to start. Blocking (fsync).
    ///
    /// # Errors
    /// `Io` when the journal cannot be written.
    pub(crate) fn begin_call(&self, call: CallEntry) -> Result<(), JournalError> {
        self.update(|records| {
            records.calls.retain(|c| c.call_id != call.call_id);
            records.calls.push(call);
            true
        })
    }

    /// Replaces call `call_id` by the reservation it granted, in one write; its output
    /// files are removed once that is durable. Blocking.
    ///
    /// # Errors
    /// `Io` when the journal cannot be written (the call record then stays, so the
    /// next start still finds the grant in its output).
    pub(crate) fn grant_call(
        &self,
        call_id: &str,
        entry: JournalEntry,
    ) -> Result<(), JournalError> {
        self.update(|records| {
            records.calls.retain(|c| c.call_id != call_id);
            records
                .reservations
                .retain(|e| e.scheduler_job_id != entry.scheduler_job_id);
            records.reservations.push(entry);
            true
        })?;
        self.call_files(call_id).remove();
        Ok(())
    }

    /// Records a reservation taken over from another holder (a grant found in a job's
    /// claim), so that this host releases it after a crash too. Blocking.
    ///
    /// # Errors
    /// `Io` when the journal cannot be written.
    pub(crate) fn adopt(&self, entry: JournalEntry) -> Result<(), JournalError> {
        self.update(|records| {
            records
                .reservations
                .retain(|e| e.scheduler_job_id != entry.scheduler_job_id);
            records.reservations.push(entry);
            true
        })
    }

    /// Forgets call `call_id`, which granted nothing, and removes its files. Blocking.
    ///
    /// # Errors
    /// `Io` when the journal cannot be written.
    pub(crate) fn end_call(&self, call_id: &str) -> Result<(), JournalError> {
        self.update(|records| {
            let before = records.calls.len();
            records.calls.retain(|c| c.call_id != call_id);
            records.calls.len() != before
        })?;
        self.call_files(call_id).remove();
        Ok(())
    }

    /// Forgets a reservation whose release the scheduler confirmed. Blocking.
    ///
    /// # Errors
    /// `Io` when the journal cannot be written.
    pub(crate) fn forget(&self, scheduler_job_id: &str) -> Result<(), JournalError> {
        self.update(|records| {
            let before = records.reservations.len();
            records
                .reservations
                .retain(|e| e.scheduler_job_id != scheduler_job_id);
            records.reservations.len() != before
        })
    }

    /// Counts one more failed release of a reservation and returns the new count.
    /// Blocking.
    ///
    /// # Errors
    /// `Io` when the journal cannot be written.
    pub(crate) fn note_release_failure(&self, scheduler_job_id: &str) -> Result<u32, JournalError> {
        let mut failures = 0;
        self.update(|records| {
            let entry = records
                .reservations
                .iter_mut()
                .find(|e| e.scheduler_job_id == scheduler_job_id);
            match entry {
                Some(entry) => {
                    entry.release_failures += 1;
                    failures = entry.release_failures;
                    true
                }
                None => false,
            }
        })?;
        Ok(failures)
    }

    /// Moves a reservation to the given-up list: it is never released by orchgpu again.
    /// Blocking.
    ///
    /// # Errors
    /// `Io` when the journal cannot be written.
    pub(crate) fn give_up(
        &self,
        scheduler_job_id: &str,
        now_unix: u64,
    ) -> Result<(), JournalError> {
        self.update(|records| {
            let Some(at) = records
                .reservations
                .iter()
                .position(|e| e.scheduler_job_id == scheduler_job_id)
            else {
                return false;
            };
            let entry = records.reservations.remove(at);
            records.given_up.push(GivenUp {
                entry,
                given_up_unix: now_unix,
            });
            true
        })
    }

    /// The reservations currently recorded.
    pub(crate) fn reservations(&self) -> Vec<JournalEntry> {
        self.lock().reservations.clone()
    }

    /// The calls currently recorded.
    pub(crate) fn calls(&self) -> Vec<CallEntry> {
        self.lock().calls.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Records> {
        crate::lock(&self.records)
    }

    /// Applies `change` and writes the journal if it says something changed. The lock is
    /// held across the write, so writes land in the order of their changes.
    fn update(&self, change: impl FnOnce(&mut Records) -> bool) -> Result<(), JournalError> {
        let mut records = self.lock();
        let mut next = records.clone();
        if !change(&mut next) {
            return Ok(());
        }
        self.write(&next)?;
        *records = next;
        Ok(())
    }

    fn write(&self, records: &Records) -> Result<(), JournalError> {
        let io_error = |source| JournalError::Io {
            path: self.dir.clone(),
            source,
        };
        let file = JournalFile {
            version: VERSION,
            records,
        };
        let json = serde_json::to_vec_pretty(&file).map_err(|e| io_error(e.into()))?;
        let temp_path = self.dir.join(format!("{FILE_NAME}.tmp"));
        let mut temp = File::create(&temp_path).map_err(io_error)?;
        temp.write_all(&json).map_err(io_error)?;
        temp.write_all(b"\n").map_err(io_error)?;
        temp.sync_all().map_err(io_error)?;
        std::fs::rename(&temp_path, self.dir.join(FILE_NAME)).map_err(io_error)?;
        // The rename is durable only once the directory itself is synced.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error)?;
        Ok(())
    }
}

fn read_records(path: &Path) -> Result<Records, JournalError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Records::default()),
        Err(source) => {
            return Err(JournalError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    // Read the version first, so a newer format is refused by name rather than by a
    // confusing field error.
    let corrupt = |source| JournalError::Corrupt {
        path: path.to_path_buf(),
        source,
    };
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(corrupt)?;
    let version = value
        .get("version")
        .and_then(serde_json::Value::as_u64)
        .and_then(|v| u32::try_from(v).ok())
        .unwrap_or(0);
    if !READABLE_VERSIONS.contains(&version) {
        return Err(JournalError::UnknownVersion {
            path: path.to_path_buf(),
            version,
        });
    }
    serde_json::from_value(value).map_err(corrupt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> JournalEntry {
        JournalEntry {
            scheduler_job_id: id.into(),
            scheduler: "127.0.0.1:9".into(),
            job_id: format!("job-{id}"),
            key: "in/a b.jpg".into(),
            since_unix: 1,
            release_failures: 0,
        }
    }

    fn call(id: &str) -> CallEntry {
        CallEntry {
            call_id: id.into(),
            scheduler: "127.0.0.1:9".into(),
            job_id: "job".into(),
            key: "k".into(),
            started_unix_ms: 5,
        }
    }

    #[test]
    fn records_survive_a_restart_and_forget_removes_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (journal, leftovers) = Journal::open(dir.path()).expect("open");
            assert_eq!(leftovers, Leftovers::default());
            journal.begin_call(call("c1")).expect("begin");
            journal.grant_call("c1", entry("1")).expect("grant");
            journal.begin_call(call("c2")).expect("begin");
            journal.grant_call("c2", entry("2")).expect("grant");
            journal.begin_call(call("c3")).expect("begin");
            journal.forget("1").expect("forget");
            journal.forget("unknown").expect("forget unknown");
            assert_eq!(journal.note_release_failure("2").expect("note"), 1);
        }
        let (journal, leftovers) = Journal::open(dir.path()).expect("reopen");
        let mut failed = entry("2");
        failed.release_failures = 1;
        assert_eq!(leftovers.reservations, vec![failed.clone()]);
        assert_eq!(leftovers.calls, vec![call("c3")]);
        assert_eq!(journal.reservations(), vec![failed]);
        let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).expect("read");
        assert!(text.contains("\"version\": 2"), "{text}");
    }

    #[test]
    fn a_granted_or_ended_call_loses_its_record_and_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (journal, _) = Journal::open(dir.path()).expect("open");
        for id in ["c1", "c2"] {
            journal.begin_call(call(id)).expect("begin");
            let files = journal.call_files(id);
            std::fs::write(&files.stdout, "x").expect("out");
            std::fs::write(&files.stderr, "y").expect("err");
        }
        journal.grant_call("c1", entry("1")).expect("grant");
        journal.end_call("c2").expect("end");
        assert!(journal.calls().is_empty());
        let left: Vec<_> = std::fs::read_dir(dir.path().join(CALLS_DIR))
            .expect("list")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_given_up_reservation_is_kept_aside_and_not_a_leftover() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (journal, _) = Journal::open(dir.path()).expect("open");
            journal.begin_call(call("c1")).expect("begin");
            journal.grant_call("c1", entry("1")).expect("grant");
            journal.give_up("1", 99).expect("give up");
        }
        let (journal, leftovers) = Journal::open(dir.path()).expect("reopen");
        assert!(leftovers.reservations.is_empty());
        assert_eq!(leftovers.given_up, 1);
        assert!(journal.reservations().is_empty());
        let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).expect("read");
        assert!(text.contains("\"given_up_unix\": 99"), "{text}");
    }

    #[test]
    fn a_version_1_journal_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join(FILE_NAME),
            r#"{"version":1,"reservations":[{"scheduler_job_id":"7","scheduler":"h:1",
               "job_id":"j","key":"k","since_unix":3}]}"#,
        )
        .expect("write");
        let (_, leftovers) = Journal::open(dir.path()).expect("open");
        assert_eq!(leftovers.reservations.len(), 1);
        assert_eq!(leftovers.reservations[0].scheduler_job_id, "7");
        assert_eq!(leftovers.reservations[0].release_failures, 0);
        assert!(leftovers.calls.is_empty());
    }

    #[test]
    fn a_second_daemon_cannot_take_the_same_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = Journal::open(dir.path()).expect("open");
        let second = Journal::open(dir.path()).expect_err("locked");
        assert!(matches!(second, JournalError::Locked { .. }), "{second}");
    }

    #[test]
    fn unknown_version_and_corrupt_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join(FILE_NAME),
            r#"{"version":3,"reservations":[]}"#,
        )
        .expect("write");
        let err = Journal::open(dir.path()).expect_err("refused");
        assert!(
            matches!(err, JournalError::UnknownVersion { version: 3, .. }),
            "{err}"
        );

        std::fs::write(dir.path().join(FILE_NAME), "{not json").expect("write");
        let err = Journal::open(dir.path()).expect_err("refused");
        assert!(matches!(err, JournalError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn no_temp_file_is_left_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (journal, _) = Journal::open(dir.path()).expect("open");
        journal.begin_call(call("c1")).expect("begin");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    }
}
