//! A real Prometheus scraping the daemon, for the alerting and dashboard tests.

use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::http::http_get;

/// A real Prometheus (Debian's `prometheus` package, or `ORCHGPU_PROMETHEUS`) on a free
/// loopback port with its own temporary storage, scraping one target every second as job
/// `orchgpu`. Killed on drop; its log is printed then.
pub struct Prometheus {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (`host:port`, path `/metrics`) and waits until
    /// it reports ready.
    pub fn start(target: &str) -> Result<Prometheus> {
        Prometheus::start_targets(&[(target, None)])
    }

    /// Starts Prometheus scraping several targets in job `orchgpu`, each with an optional
    /// `use_case` label, as docs/operations.md's example for several instances on one
    /// host does.
    pub fn start_targets(targets: &[(&str, Option<&str>)]) -> Result<Prometheus> {
        let program = std::env::var("ORCHGPU_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("prometheus.yml");
        let mut text = "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                        scrape_configs:\n  - job_name: orchgpu\n    static_configs:\n"
            .to_string();
        for (target, use_case) in targets {
            text.push_str(&format!("      - targets: [\"{target}\"]\n"));
            if let Some(use_case) = use_case {
                text.push_str(&format!("        labels: {{use_case: \"{use_case}\"}}\n"));
            }
        }
        std::fs::write(&config, text)?;
        // A free port: bound, read and released; Prometheus binds it just after.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = File::create(dir.path().join("prometheus.log"))?;
        let child = Command::new(&program)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot run {program}: install Debian's prometheus package \
                     (dev/test.sh does) or set ORCHGPU_PROMETHEUS"
                )
            })?;
        let mut prometheus = Prometheus { port, child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_get(&format!("127.0.0.1:{port}"), "/-/ready") {
                return Ok(prometheus);
            }
            if let Some(status) = prometheus.child.try_wait()? {
                bail!(
                    "prometheus exited ({status}) before it was ready:\n{}",
                    prometheus.log()
                );
            }
            if Instant::now() >= deadline {
                bail!("prometheus not ready within 30 s:\n{}", prometheus.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What Prometheus wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query through the HTTP API: the whole JSON answer
    /// (`{"status": "success", "data": {"resultType": ..., "result": [...]}}`). An answer
    /// whose status is not success is an error carrying Prometheus's message.
    pub fn query(&self, promql: &str) -> Result<Value> {
        let encoded =
            percent_encoding::utf8_percent_encode(promql, percent_encoding::NON_ALPHANUMERIC);
        let (status, body) = http_get(
            &format!("127.0.0.1:{}", self.port),
            &format!("/api/v1/query?query={encoded}"),
        )?;
        let answer: Value = serde_json::from_str(&body)
            .with_context(|| format!("query {promql:?}: HTTP {status}, not JSON"))?;
        if status != 200 || answer["status"] != "success" {
            bail!("query {promql:?}: HTTP {status}: {answer}");
        }
        Ok(answer)
    }

    /// Polls `promql` until its result vector is not empty; returns that vector.
    pub fn wait_for_series(&self, promql: &str, timeout: Duration) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let answer = self.query(promql)?;
            if let Some(result) = answer["data"]["result"].as_array()
                && !result.is_empty()
            {
                return Ok(result.clone());
            }
            if Instant::now() >= deadline {
                bail!(
                    "no series for {promql:?} within {timeout:?}; last answer {answer}\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
