//! A stack's child processes ([`Process`]): started with the emulator's environment and
//! the stack's `TMPDIR`, their logs, waits on them, and their end with the stack (killed,
//! logs printed).

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::kit::aws_env;
use crate::stack::Stack;

impl Stack {
    /// Where the process called `name` writes its stdout and stderr.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.logs.path().join(format!("{name}.log"))
    }

    /// The temporary directory of this stack's processes (their `TMPDIR`), inside
    /// [`Self::logs`]: what a killed process or script leaves there goes with the stack.
    pub fn tmp_dir(&self) -> PathBuf {
        self.logs.path().join("tmp")
    }

    /// Starts `command` with the emulator's environment and the stack's `TMPDIR` (unless
    /// the caller set one), its output to [`Self::log_path`]`(name)`; returns its process
    /// index.
    pub fn spawn(&mut self, name: &str, mut command: Command) -> Result<usize> {
        let log = File::create(self.log_path(name))?;
        aws_env(&mut command, &self.kit.endpoint);
        if !command.get_envs().any(|(name, _)| name == "TMPDIR") {
            let tmp_dir = self.tmp_dir();
            std::fs::create_dir_all(&tmp_dir)?;
            command.env("TMPDIR", tmp_dir);
        }
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let description = format!("{command:?}");
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {description}"))?;
        self.processes.push(Process {
            name: name.to_string(),
            description,
            child: Some(child),
        });
        Ok(self.processes.len() - 1)
    }

    /// The process started with index `index`.
    pub fn process(&mut self, index: usize) -> &mut Process {
        &mut self.processes[index]
    }

    /// The log of a started process.
    pub fn log(&self, index: usize) -> String {
        std::fs::read_to_string(self.log_path(&self.processes[index].name)).unwrap_or_default()
    }

    /// Waits until a process's log contains `needle` `count` times; fails at once if the
    /// process exits first.
    pub async fn wait_for_log(
        &mut self,
        index: usize,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log(index).matches(needle).count() >= count {
                return Ok(());
            }
            if let Some(status) = self.processes[index].try_status()? {
                bail!("process exited ({status}) before logging {needle:?}");
            }
            if Instant::now() >= deadline {
                bail!("timed out after {timeout:?} waiting for {count}× {needle:?} in the log");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for process in &mut self.processes {
            process.kill();
        }
        // Printed unless turned off: the test runner shows a test's output only when it
        // fails (a test returning `Err` is not "panicking", so that cannot be the
        // condition).
        if self.print_logs {
            for process in &self.processes {
                let log = std::fs::read_to_string(self.log_path(&process.name)).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(80).collect();
                eprintln!(
                    "===== {} ({}) last {} lines =====",
                    process.name,
                    process.description,
                    tail.len()
                );
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// A child process that is killed when the test ends.
pub struct Process {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) child: Option<Child>,
}

impl Process {
    /// Its pid, unless it has been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` to it; an error if it was reaped.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| anyhow!("{} is not running", self.name))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)?;
        Ok(())
    }

    /// The exit status, if it has exited.
    pub fn try_status(&mut self) -> Result<Option<std::process::ExitStatus>> {
        match &mut self.child {
            Some(child) => Ok(child.try_wait()?),
            None => bail!("{} was already reaped", self.name),
        }
    }

    /// SIGTERM, then up to `timeout` for it to exit; SIGKILL and an error after that.
    pub async fn stop(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM)?;
        match self.wait_exit(timeout).await {
            Ok(status) => Ok(status),
            Err(e) => {
                self.kill();
                Err(e.context("killed"))
            }
        }
    }

    /// Waits up to `timeout` for it to exit, without signalling it.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL and reap, if it is still ours; then it counts as reaped.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
