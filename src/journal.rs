//! The reservation journal: a crash-safe record of the GPU reservations this daemon holds.
//!
//! An allocation is recorded before the job uses it and forgotten once the scheduler
//! confirms its release. At start-up, whatever a previous run left behind (a crash, a
//! SIGKILL, a release that kept failing) is released before new work starts. The file is
//! small and rewritten whole: temp file, fsync, rename, fsync of the directory. A lock
//! file keeps two daemons from sharing one journal by accident.
//!
//! Format (`reservations.json`), versioned from day one:
//! `{"version":1,"reservations":[{"scheduler_job_id":"42","scheduler":"host:port",
//! "job_id":"…","key":"…","since_unix":1764230000}]}`. An unknown version is refused.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

const VERSION: u32 = 1;
const FILE_NAME: &str = "reservations.json";
const LOCK_NAME: &str = "lock";

/// One reservation held (or possibly held) on the scheduler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub scheduler_job_id: String,
    /// `host:port` of the scheduler that granted it.
    pub scheduler: String,
    pub job_id: String,
    pub key: String,
    pub since_unix: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct JournalFile {
    version: u32,
    reservations: Vec<JournalEntry>,
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
    #[error("journal {path} has version {version}, this orchgpu reads version {VERSION} only")]
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
    entries: Mutex<Vec<JournalEntry>>,
    // Held for the daemon's lifetime; the lock goes with the file descriptor.
    _lock: Flock<File>,
}

impl Journal {
    /// Creates the state directory if needed, takes its lock and reads the journal.
    /// Returns the journal and the reservations a previous run left behind.
    ///
    /// # Errors
    /// `Locked` when another daemon uses the directory, `Io`, `Corrupt`, `UnknownVersion`.
    pub fn open(dir: &Path) -> Result<(Journal, Vec<JournalEntry>), JournalError> {
        let io_error = |source| JournalError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io_error)?;
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
        let leftovers = read_entries(&dir.join(FILE_NAME))?;
        let journal = Journal {
            dir: dir.to_path_buf(),
            entries: Mutex::new(leftovers.clone()),
            _lock: lock,
        };
        Ok((journal, leftovers))
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Records a reservation, durably, before the job uses it. Blocking (fsync): call it
    /// from a blocking thread.
    ///
    /// # Errors
    /// `Io` when the journal cannot be written.
    pub fn record(&self, entry: JournalEntry) -> Result<(), JournalError> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|e| e.scheduler_job_id != entry.scheduler_job_id);
        entries.push(entry);
        self.write(&entries)
    }

    /// Forgets a reservation whose release the scheduler confirmed. Blocking.
    ///
    /// # Errors
    /// `Io` when the journal cannot be written.
    pub fn forget(&self, scheduler_job_id: &str) -> Result<(), JournalError> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let before = entries.len();
        entries.retain(|e| e.scheduler_job_id != scheduler_job_id);
        if entries.len() == before {
            return Ok(());
        }
        self.write(&entries)
    }

    /// The reservations currently recorded.
    pub fn entries(&self) -> Vec<JournalEntry> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn write(&self, entries: &[JournalEntry]) -> Result<(), JournalError> {
        let io_error = |source| JournalError::Io {
            path: self.dir.clone(),
            source,
        };
        let file = JournalFile {
            version: VERSION,
            reservations: entries.to_vec(),
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

fn read_entries(path: &Path) -> Result<Vec<JournalEntry>, JournalError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(JournalError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    // Read the version first, so a newer format is refused by name rather than by a
    // confusing field error.
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|source| JournalError::Corrupt {
            path: path.to_path_buf(),
            source,
        })?;
    let version = value.get("version").and_then(serde_json::Value::as_u64);
    if version != Some(u64::from(VERSION)) {
        return Err(JournalError::UnknownVersion {
            path: path.to_path_buf(),
            version: version.and_then(|v| u32::try_from(v).ok()).unwrap_or(0),
        });
    }
    let file: JournalFile =
        serde_json::from_value(value).map_err(|source| JournalError::Corrupt {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(file.reservations)
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
        }
    }

    #[test]
    fn records_survive_a_restart_and_forget_removes_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (journal, leftovers) = Journal::open(dir.path()).expect("open");
            assert!(leftovers.is_empty());
            journal.record(entry("1")).expect("record");
            journal.record(entry("2")).expect("record");
            journal.forget("1").expect("forget");
            journal.forget("unknown").expect("forget unknown");
        }
        let (journal, leftovers) = Journal::open(dir.path()).expect("reopen");
        assert_eq!(leftovers, vec![entry("2")]);
        assert_eq!(journal.entries(), vec![entry("2")]);
        let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).expect("read");
        assert!(text.contains("\"version\": 1"), "{text}");
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
            r#"{"version":2,"reservations":[]}"#,
        )
        .expect("write");
        let err = Journal::open(dir.path()).expect_err("refused");
        assert!(
            matches!(err, JournalError::UnknownVersion { version: 2, .. }),
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
        journal.record(entry("1")).expect("record");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    }
}
