//! The daemon (`orchgpu`) as a process of a stack: its command line with fast test
//! timings, and starting it.

use std::process::Command;

use anyhow::Result;

use crate::mock_ssgm::MockSsgm;
use crate::stack::Stack;

impl Stack {
    /// The daemon's arguments for this stack, with fast test timings; `extra` is appended
    /// (clap takes the last value of a repeated option).
    pub fn daemon_args(&self, ssgm: &MockSsgm, extra: &[&str]) -> Vec<String> {
        let mut args = self.base_daemon_args(ssgm);
        args.extend(
            [
                "-w",
                "1",
                "-u",
                "0",
                "-b",
                "1",
                "-s",
                "60",
                "-v",
                "20",
                "--retry-backoff",
                "1",
                "--ssgm-timeout",
                "3",
                "--result-deadline",
                "90",
                "--max-jobs",
                "4",
                "--state-dir",
                &self.state_dir("default"),
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// What names this stack to the daemon: its queue, the scheduler and the buckets.
    pub fn base_daemon_args(&self, ssgm: &MockSsgm) -> Vec<String> {
        vec![
            "-q".into(),
            self.jobs_queue.clone(),
            "-S".into(),
            "127.0.0.1".into(),
            "-P".into(),
            ssgm.port.to_string(),
            "-m".into(),
            ssgm.bin.display().to_string(),
            "-i".into(),
            format!("{}/{}", self.work_bucket, self.work_dir),
            "-o".into(),
            format!("{}/{}", self.output_bucket, self.output_dir),
        ]
    }

    /// The daemon's binary with `args`.
    pub fn daemon_command(&self, args: &[String]) -> Command {
        let mut command = Command::new(&self.kit.bins.orchgpu);
        command.args(args);
        command
    }

    /// A state directory for a daemon of this test (one journal per name).
    pub fn state_dir(&self, name: &str) -> String {
        self.logs
            .path()
            .join(format!("state-{name}"))
            .display()
            .to_string()
    }

    /// Starts the daemon; returns its process index.
    pub fn start_daemon(&mut self, ssgm: &MockSsgm, extra: &[&str]) -> Result<usize> {
        let command = self.daemon_command(&self.daemon_args(ssgm, extra));
        let name = format!("orchgpu-{}", self.processes.len());
        self.spawn(&name, command)
    }

    /// Starts the daemon with extra environment variables; returns its process index.
    pub fn start_daemon_with_env(
        &mut self,
        ssgm: &MockSsgm,
        extra: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<usize> {
        let mut command = Command::new(&self.kit.bins.orchgpu);
        command.args(self.daemon_args(ssgm, extra));
        for (name, value) in env {
            command.env(name, value);
        }
        let name = format!("orchgpu-{}", self.processes.len());
        self.spawn(&name, command)
    }
}
