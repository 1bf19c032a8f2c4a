//! The work dir: where a run keeps its downloaded inputs and bundles, and how the leftovers
//! of a killed run are found and removed.
//!
//! Each run works in its own subdirectory `orchgpu-run.XXXXXX` of `--work-dir`, holding an
//! exclusive lock on the `lock` file inside for as long as it runs. At start-up, a run
//! removes every such subdirectory whose lock it can take: its owner is gone (killed,
//! crashed), while a daemon still running beside it (two daemons may share a work dir)
//! keeps its lock and its files. A clean exit removes the run's own subdirectory.
//!
//! It leaves naming and removing the individual files to their users (`tempfile` values
//! in `job`).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Prefix of each run's subdirectory.
const RUN_PREFIX: &str = "orchgpu-run.";
/// The lock file inside a run's subdirectory.
const LOCK_NAME: &str = "lock";

/// Why the work dir cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WorkDirError {
    #[error("cannot use work dir {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// This run's subdirectory of the work dir, locked while it lives; removed when dropped.
pub(crate) struct WorkDir {
    dir: tempfile::TempDir,
    _lock: Flock<File>,
}

impl WorkDir {
    /// Creates the work dir if needed, removes what earlier runs left there, and makes
    /// this run's locked subdirectory. Returns it and how many leftovers were removed.
    /// Blocking (file system calls).
    ///
    /// # Errors
    /// `WorkDirError` when the dir cannot be created or written.
    pub(crate) fn open(base: &Path) -> Result<(WorkDir, usize), WorkDirError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| WorkDirError::Io { path, source }
        };
        std::fs::create_dir_all(base).map_err(io(base))?;
        let removed = remove_leftovers(base);
        let dir = tempfile::Builder::new()
            .prefix(RUN_PREFIX)
            .tempdir_in(base)
            .map_err(io(base))?;
        let lock_path = dir.path().join(LOCK_NAME);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| io(&lock_path)(std::io::Error::from(errno)))?;
        Ok((WorkDir { dir, _lock: lock }, removed))
    }

    /// Where this run puts its files.
    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Removes the run subdirectories whose lock is free; returns how many. A subdirectory
/// without a lock file yet is a run starting right now, and is left alone.
fn remove_leftovers(base: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(base) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(RUN_PREFIX) {
            continue;
        }
        let path: PathBuf = entry.path();
        let Ok(file) = OpenOptions::new().write(true).open(path.join(LOCK_NAME)) else {
            continue;
        };
        // Taken: its owner is gone. Held until the directory is removed, so a new run
        // cannot pick the same name in between (tempfile names are random anyway).
        if let Ok(_lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "Removed files a previous run left.");
                    removed += 1;
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "Cannot remove files a previous run left.")
                }
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_runs_files_are_removed_and_a_live_runs_kept() {
        let base = tempfile::tempdir().expect("temp dir");
        let (live, removed) = WorkDir::open(base.path()).expect("opens");
        assert_eq!(removed, 0);
        std::fs::write(live.path().join("orchgpu-x-input-1"), b"live").expect("write");
        // A run that was killed: its subdirectory and lock file, no process holding it.
        let dead = base.path().join(format!("{RUN_PREFIX}dead01"));
        std::fs::create_dir(&dead).expect("mkdir");
        std::fs::write(dead.join(LOCK_NAME), b"").expect("lock file");
        std::fs::write(dead.join("orchgpu-y-input-2"), vec![0u8; 1024]).expect("input");
        // A run starting right now (no lock file yet) and a file that is not ours.
        let starting = base.path().join(format!("{RUN_PREFIX}new001"));
        std::fs::create_dir(&starting).expect("mkdir");
        std::fs::write(base.path().join("unrelated"), b"x").expect("write");

        let (second, removed) = WorkDir::open(base.path()).expect("opens");
        assert_eq!(removed, 1);
        assert!(!dead.exists(), "a dead run's files were left");
        assert!(
            live.path().join("orchgpu-x-input-1").exists(),
            "a live run's file was removed"
        );
        assert!(starting.exists() && base.path().join("unrelated").exists());

        let (second_path, live_path) = (second.path().to_path_buf(), live.path().to_path_buf());
        drop(second);
        drop(live);
        assert!(
            !second_path.exists() && !live_path.exists(),
            "a clean exit leaves its dir"
        );
    }
}
