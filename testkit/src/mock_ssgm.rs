//! The mock SSGM server (`mock-ssgm serve`) as a real process, and its client calls:
//! `-stats`, `-inject`, the lifecycle promise (every grant released).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::wait::wait_for;

/// The mock SSGM server, as a real process; its stderr log is printed if the test
/// panics.
pub struct MockSsgm {
    pub port: u16,
    pub(crate) bin: PathBuf,
    child: Child,
    log: Arc<Mutex<String>>,
}

impl MockSsgm {
    /// Starts `bin` as a mock SSGM server with `gpus` GPUs on a free loopback port.
    pub fn spawn(bin: &Path, gpus: u32) -> Result<MockSsgm> {
        let mut child = Command::new(bin)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--gpus",
                &gpus.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let log = Arc::new(Mutex::new(String::new()));
        if let Some(stderr) = child.stderr.take() {
            let sink = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut log = sink.lock().unwrap_or_else(|e| e.into_inner());
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let port = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout"))
            .and_then(read_port);
        match port {
            Ok(port) => Ok(MockSsgm {
                port,
                bin: bin.to_owned(),
                child,
                log,
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// The mock's binary, which is also its SSGM client.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's exit status, if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// What the server wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The counters `names` of one `-stats` call; an error if any is missing.
    pub fn counters<const N: usize>(&self, names: [&str; N]) -> Result<[u64; N]> {
        let stats = self.stats()?;
        let mut values = [0; N];
        for (value, name) in values.iter_mut().zip(names) {
            *value = stats[name]
                .as_u64()
                .ok_or_else(|| anyhow!("no {name} in mock-ssgm stats: {stats}"))?;
        }
        Ok(values)
    }

    /// Runs the mock's client against this server with `args` (`-alloc -g 1`, `-top`...).
    pub fn client(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(Command::new(&self.bin)
            .args(["-S", "127.0.0.1", "-P", &self.port.to_string()])
            .args(args)
            .output()?)
    }

    /// The `-stats` line as JSON; an error if the call fails (never a zero count).
    pub fn stats(&self) -> Result<Value> {
        let output = self.client(&["-stats"])?;
        if !output.status.success() {
            bail!(
                "mock-ssgm -stats failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    /// One counter of `-stats`; an error if it is missing.
    pub fn stat(&self, name: &str) -> Result<u64> {
        self.stats()?[name]
            .as_u64()
            .ok_or_else(|| anyhow!("no {name} in mock-ssgm stats"))
    }

    /// Arms fault `kind` (see `mock-ssgm --help`) for the next `count` matching calls.
    pub fn inject(&self, kind: &str, count: u32) -> Result<()> {
        let output = self.client(&["-inject", kind, "-n", &count.to_string()])?;
        if !output.status.success() {
            bail!(
                "mock-ssgm -inject failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Live `mock-ssgm -alloc` clients talking to this server (found by their command
    /// line): a hung client must not outlive the daemon that ran it for long.
    pub fn alloc_clients(&self) -> Vec<u32> {
        let port = self.port.to_string();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                    return false;
                };
                let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
                // A zombie has exited; its parent has not reaped it yet.
                let alive = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                    !s.rsplit_once(')')
                        .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
                });
                alive && args.contains(&&b"-alloc"[..]) && args.contains(&port.as_bytes())
            })
            .collect()
    }

    /// Waits (releases may be confirmed in the background, after the job ended) until
    /// nothing is allocated, then asserts the lifecycle promise (`assert_all_released`).
    pub async fn wait_all_released(&self, timeout: Duration) -> Result<()> {
        wait_for("every grant released", timeout, || async {
            Ok((self.stat("live")? == 0).then_some(()))
        })
        .await?;
        self.assert_all_released()
    }

    /// Asserts the lifecycle promise: nothing left allocated and every grant released.
    pub fn assert_all_released(&self) -> Result<()> {
        let stats = self.stats()?;
        assert_eq!(stats["live"], 0, "allocations left live: {stats}");
        assert_eq!(
            stats["granted"], stats["released"],
            "grants vs releases: {stats}"
        );
        Ok(())
    }
}

impl Drop for MockSsgm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- mock-ssgm server log ---\n{}---", self.log());
        }
    }
}

/// Reads the server's `listening on 127.0.0.1:PORT` line.
fn read_port(stdout: std::process::ChildStdout) -> Result<u16> {
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("read mock-ssgm's listening line")?;
    let port = line
        .trim()
        .strip_prefix("listening on 127.0.0.1:")
        .with_context(|| format!("unexpected first line from mock-ssgm: {line:?}"))?;
    port.parse()
        .with_context(|| format!("bad port in mock-ssgm's line {line:?}"))
}
