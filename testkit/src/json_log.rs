//! The log tail: a JSON-lines log (the daemon's `--log-format json`) read as it grows,
//! and the fields of one line (message, job id, timestamp).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::Value;

/// Reads a JSON-lines log (the daemon's `--log-format json`) as it grows.
pub struct JsonLog {
    path: PathBuf,
    offset: u64,
    partial: String,
    /// Every whole line read so far that parsed as JSON.
    pub lines: Vec<Value>,
}

impl JsonLog {
    /// A reader of the log at `path`, from its start (the file may not exist yet).
    pub fn new(path: PathBuf) -> JsonLog {
        JsonLog {
            path,
            offset: 0,
            partial: String::new(),
            lines: Vec::new(),
        }
    }

    /// Reads what was appended since the last call.
    pub fn poll(&mut self) -> Result<()> {
        let Ok(mut file) = File::open(&self.path) else {
            return Ok(());
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut text = String::new();
        let read = file.read_to_string(&mut text)?;
        self.offset += read as u64;
        self.partial.push_str(&text);
        while let Some(end) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=end).collect();
            if let Ok(value) = serde_json::from_str::<Value>(line.trim()) {
                self.lines.push(value);
            }
        }
        Ok(())
    }

    /// How many lines so far match `pred`.
    pub fn count(&mut self, pred: impl Fn(&Value) -> bool) -> Result<usize> {
        self.poll()?;
        Ok(self.lines.iter().filter(|l| pred(l)).count())
    }

    /// Polls every 20 ms until `count` lines match `pred`, or fails after `timeout`.
    pub async fn wait_count(
        &mut self,
        pred: impl Fn(&Value) -> bool,
        count: usize,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.count(&pred)?;
            if n >= count {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} with {n} of {count} log lines ({})",
                    self.path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A JSON log line's message.
pub fn message(line: &Value) -> &str {
    line["fields"]["message"].as_str().unwrap_or("")
}

/// The `job_id` of a JSON log line's spans.
pub fn job_id(line: &Value) -> Option<String> {
    line["spans"].as_array()?.iter().find_map(|span| {
        span.get("job_id")
            .and_then(Value::as_str)
            .map(str::to_string)
    })
}

/// Microseconds since the epoch of a JSON log line's RFC 3339 UTC timestamp.
pub fn timestamp_us(line: &Value) -> Option<i64> {
    parse_rfc3339_us(line["timestamp"].as_str()?)
}

/// Microseconds since the epoch of an RFC 3339 UTC time such as
/// `2026-11-27T08:33:09.123456Z`.
pub fn parse_rfc3339_us(text: &str) -> Option<i64> {
    let (date, time) = text.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>());
    let (hh, mm, ss) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let frac: String = frac.chars().chain(std::iter::repeat('0')).take(6).collect();
    let micros: i64 = frac.parse().ok()?;
    // Days from civil (H. Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1_000_000) + micros)
}
