//! The function stand-in (`orchgpu-function`) as a process of a stack: its command line,
//! starting it with a script, and counting the invocations it finished.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use anyhow::Result;

use crate::stack::Stack;

impl Stack {
    /// Starts the function stand-in with a test script from tests/fixtures/function.
    pub fn start_function(&mut self, script: &str) -> Result<usize> {
        self.start_function_with(script, &[])
    }

    /// Starts the function stand-in with extra environment for its script.
    pub fn start_function_with(&mut self, script: &str, env: &[(&str, &str)]) -> Result<usize> {
        let script = self
            .kit
            .repo_path(&format!("tests/fixtures/function/{script}"));
        let mut command =
            self.function_command(&script, &["--wait-time", "1", "--concurrency", "8"]);
        command.envs(env.iter().copied());
        let name = format!("function-{}", self.processes.len());
        self.spawn(&name, command)
    }

    /// The function stand-in's command line for this stack, running `script` with
    /// `options` (`--wait-time`, `--concurrency`: the stand-in takes each once).
    pub fn function_command(&self, script: &Path, options: &[&str]) -> Command {
        let mut command = Command::new(&self.kit.bins.function);
        command
            .arg("--queue")
            .arg(&self.function_queue)
            .arg("--output")
            .arg(format!("{}/{}", self.output_bucket, self.output_dir))
            .arg("--script")
            .arg(script)
            .args(options);
        command
    }

    /// How many times the function stand-in finished an invocation, by bundle key, over
    /// every function process of this test.
    pub fn invocations(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for (index, process) in self.processes.iter().enumerate() {
            if !process.name.starts_with("function") {
                continue;
            }
            for line in self.log(index).lines() {
                if !line.contains("Invocation finished.") {
                    continue;
                }
                if let Some(key) = line
                    .split_whitespace()
                    .find_map(|field| field.strip_prefix("key="))
                {
                    *counts.entry(key.to_string()).or_default() += 1;
                }
            }
        }
        counts
    }

    /// Starts the function stand-in with any script (not only the test fixtures) and extra
    /// environment variables for it, one bundle at a time.
    pub fn start_function_script(
        &mut self,
        script: &Path,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<usize> {
        let mut command =
            self.function_command(script, &["--wait-time", "1", "--concurrency", "1"]);
        for (name, value) in env {
            command.env(name, value);
        }
        let name = format!("function-{}", self.processes.len());
        self.spawn(&name, command)
    }
}
