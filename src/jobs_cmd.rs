//! `orchgpu jobs`: the job history as a readable table or as JSON.
//!
//! It owns only the rendering: `cli` parses the command line into a `JobsConfig`, and
//! `history::HistoryReader` reads the database (read-only, while the daemon writes).
//! Times are shown in UTC; `--json` gives them as RFC 3339.

use std::io::{self, Write};
use std::path::PathBuf;

use crate::cli::{JobsCommand, JobsConfig};
use crate::history::{EventRecord, HistoryError, HistoryReader, JobDetail, JobSummary};

/// Why `orchgpu jobs` printed nothing useful; every one exits 1.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error(
        "no job history at {path}: give the daemon's state directory with --state-dir or ORCHGPU_STATE_DIR"
    )]
    NoHistory { path: PathBuf },
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error("no job {id_or_key:?} in the history at {path}")]
    NotFound { id_or_key: String, path: PathBuf },
    #[error("cannot write the output")]
    Output(#[source] io::Error),
}

/// Longest last reason shown in the table; `show` prints it whole.
const REASON_WIDTH: usize = 100;

/// `orchgpu jobs ...` from its arguments to its exit code: 0, 1 when the history cannot
/// be read, 2 for bad usage (as the daemon's own codes).
pub fn main(argv: Vec<std::ffi::OsString>) -> u8 {
    let config = match crate::cli::parse_jobs(argv) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("orchgpu jobs: error: {e}");
            return 2;
        }
    };
    match run(&config, &mut std::io::stdout().lock()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("orchgpu jobs: {}", crate::aws::error_chain(&e));
            1
        }
    }
}

/// Runs `orchgpu jobs` and writes its output to `out`. A reader that went away (e.g.
/// `| head`) is not an error.
///
/// # Errors
///
/// The history is missing or unreadable, or `show` found no such job.
pub fn run(config: &JobsConfig, out: &mut dyn Write) -> Result<(), JobsError> {
    let reader = match HistoryReader::open(&config.state_dir) {
        Ok(reader) => reader,
        Err(HistoryError::Missing { path }) => return Err(JobsError::NoHistory { path }),
        Err(e) => return Err(e.into()),
    };
    let written = match &config.command {
        JobsCommand::List(filter) => {
            let jobs = reader.list(filter)?;
            if config.json {
                write_json(out, &jobs)
            } else {
                write_table(out, &jobs)
            }
        }
        JobsCommand::Show(id_or_key) => {
            let Some(detail) = reader.show(id_or_key)? else {
                return Err(JobsError::NotFound {
                    id_or_key: id_or_key.clone(),
                    path: reader.path().to_path_buf(),
                });
            };
            if config.json {
                write_json(out, &detail)
            } else {
                write_detail(out, &detail)
            }
        }
    };
    match written.and_then(|()| out.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(JobsError::Output(e)),
        _ => Ok(()),
    }
}

fn write_json(out: &mut dyn Write, value: &impl serde::Serialize) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)
}

/// The table's header, one line.
pub const TABLE_HEADER: [&str; 7] = [
    "UPDATED (UTC)",
    "STATE",
    "ATTEMPTS",
    "GPU S",
    "JOB ID",
    "KEY",
    "LAST REASON",
];

fn write_table(out: &mut dyn Write, jobs: &[JobSummary]) -> io::Result<()> {
    let rows: Vec<[String; 7]> = jobs
        .iter()
        .map(|job| {
            [
                job.last_update.to_string(),
                job.state.clone(),
                job.attempts.to_string(),
                gpu_seconds(job),
                one_line(&job.job_id),
                one_line(&job.key),
                job.last_reason
                    .as_deref()
                    .map_or_else(|| "-".to_string(), |r| shorten(&one_line(r), REASON_WIDTH)),
            ]
        })
        .collect();
    let header = TABLE_HEADER.map(str::to_string);
    let mut widths = [0; 7];
    for row in std::iter::once(&header).chain(&rows) {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (n, (cell, width)) in row.iter().zip(widths).enumerate() {
            if n + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  "));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

fn write_detail(out: &mut dyn Write, detail: &JobDetail) -> io::Result<()> {
    let job = &detail.job;
    writeln!(out, "JOB ID      {}", one_line(&job.job_id))?;
    writeln!(
        out,
        "OBJECT      s3://{}/{}",
        one_line(&job.bucket),
        one_line(&job.key)
    )?;
    writeln!(out, "STATE       {}", job.state)?;
    writeln!(out, "ATTEMPTS    {}", job.attempts)?;
    writeln!(out, "GPU TIME    {} GPU-seconds", gpu_seconds(job))?;
    writeln!(out, "FIRST SEEN  {} UTC", job.first_seen)?;
    writeln!(out, "UPDATED     {} UTC", job.last_update)?;
    if let Some(message_id) = &detail.message_id {
        writeln!(out, "MESSAGE     {}", one_line(message_id))?;
    }
    for outcome in &detail.attempt_outcomes {
        writeln!(out)?;
        let message = outcome
            .message_id
            .as_deref()
            .map_or_else(String::new, |m| format!(" (message {})", one_line(m)));
        let reason = outcome
            .reason
            .as_deref()
            .map_or_else(String::new, |r| format!(": {}", one_line(r)));
        writeln!(
            out,
            "Attempt {}{message}: {}{reason}",
            outcome.attempt, outcome.state
        )?;
        let events = detail
            .timeline
            .iter()
            .filter(|e| e.attempt == outcome.attempt);
        for event in events {
            writeln!(out, "{}", timeline_line(event).trim_end())?;
        }
    }
    Ok(())
}

/// `  2026-05-01 12:00:00.250  granted       scheduler_job=17 devices=gpu1:0,gpu1:1`
/// GPUs × seconds from grant to release, over the job's attempts; `-` before a release.
fn gpu_seconds(job: &JobSummary) -> String {
    job.gpu_seconds
        .map_or_else(|| "-".to_string(), |s| format!("{s:.2}"))
}

fn timeline_line(event: &EventRecord) -> String {
    let fields = match &event.detail {
        serde_json::Value::Object(fields) => fields
            .iter()
            .map(|(name, value)| format!("{name}={}", plain(value)))
            .collect::<Vec<_>>()
            .join(" "),
        other => plain(other),
    };
    format!(
        "  {}  {:<16}  {}",
        event.at.display_millis(),
        event.kind,
        one_line(&fields)
    )
}

/// A JSON value as an operator reads it: strings bare, lists comma-separated.
fn plain(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(items) => items.iter().map(plain).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Control characters (an object key may hold any) escaped, so one value stays one line
/// and cannot drive the terminal.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut short: String = text.chars().take(max.saturating_sub(1)).collect();
    short.push('…');
    short
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Timestamp;

    fn summary(job_id: &str, key: &str, reason: Option<&str>) -> JobSummary {
        JobSummary {
            job_id: job_id.into(),
            bucket: "in".into(),
            key: key.into(),
            state: "done".into(),
            attempts: 2,
            first_seen: Timestamp(1_780_000_000_000),
            last_update: Timestamp(1_780_000_060_000),
            last_reason: reason.map(str::to_string),
            gpu_seconds: Some(2.5),
        }
    }

    #[test]
    fn table_aligns_columns_and_keeps_each_job_on_one_line() {
        let mut out = Vec::new();
        write_table(
            &mut out,
            &[
                summary("job-1", "images/a.jpg", Some("scheduler busy\nthen gone")),
                summary("j2", "b\u{1b}[31m", None),
            ],
        )
        .expect("write");
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].starts_with("UPDATED (UTC)        STATE  ATTEMPTS  GPU S  JOB ID  KEY"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("2026-05-28 20:27:40  done   2         2.50   job-1"),
            "{text}"
        );
        assert!(lines[1].ends_with("scheduler busy\\nthen gone"), "{text}");
        assert!(!text.contains('\u{1b}'), "{text}");
        // The KEY column starts at the same place on every line.
        let at = lines[0].find("KEY").expect("KEY");
        assert_eq!(&lines[1][at..at + 6], "images");
        assert!(lines[2].ends_with('-'), "{text}");
    }

    #[test]
    fn long_reasons_are_shortened_in_the_table() {
        assert_eq!(shorten("abcdef", 4), "abc…");
        assert_eq!(shorten("abc", 4), "abc");
    }

    #[test]
    fn timeline_lines_show_time_kind_and_fields() {
        let event = EventRecord {
            attempt: 1,
            at: Timestamp(1_780_000_000_250),
            kind: "granted".into(),
            message_id: None,
            detail: serde_json::json!({"devices": ["gpu1:0", "gpu1:1"], "scheduler_job": "17"}),
        };
        assert_eq!(
            timeline_line(&event),
            "  2026-05-28 20:26:40.250  granted           devices=gpu1:0,gpu1:1 scheduler_job=17"
        );
    }
}
