//! orchgpu-history-bench: what the job history costs (see BENCHMARKS.md, "Job history").
//!
//! `cargo run --example orchgpu-history-bench -- [--jobs N] [--rounds R]`
//!
//! Each round, side by side: `History::record` on a disabled history (the floor: what a
//! caller pays with `--no-history`) and on a real one (a fresh `history.sqlite3` in a
//! temporary directory), 8 events per job (a job's timeline). It reports the time spent
//! inside `record` per call, and the writer thread's throughput: events recorded in
//! chunks of 32 768 (half the queue, so nothing is dropped), each chunk flushed, from the
//! first `record` to the last flush. Then it times `orchgpu jobs`' queries on the filled
//! history and reports its size on disk. Bounded: N jobs per round, R rounds.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use orchgpu::ops::history::{
    EventKind, History, HistoryEvent, HistoryReader, ListFilter, Retention, SUCCEEDED,
};

const CHUNK: usize = 32_768;

fn timeline(job: usize) -> Vec<HistoryEvent> {
    let job_id = format!("{job:020x}");
    let key = format!("images/{job:08}.jpg");
    let event = |kind| HistoryEvent {
        job_id: job_id.clone(),
        bucket: "orchgpu-input".into(),
        key: key.clone(),
        message_id: Some(format!("c0ffee00-0000-4000-8000-{job:012}")),
        at: SystemTime::now(),
        kind,
    };
    vec![
        event(EventKind::Received { receive_count: 1 }),
        event(EventKind::Claimed),
        event(EventKind::Granted {
            scheduler_job: job.to_string(),
            devices: vec!["gpu-node-1:0".into()],
        }),
        event(EventKind::Bundled { bytes: 104_857 }),
        event(EventKind::Uploaded),
        event(EventKind::ResultSeen),
        event(EventKind::Released {
            scheduler_job: job.to_string(),
        }),
        event(EventKind::Deleted {
            outcome: SUCCEEDED.into(),
        }),
    ]
}

/// Records every job's timeline, chunk by chunk, flushing after each chunk; returns the
/// time spent inside `record` and the wall time to the last flush.
fn run(history: &History, jobs: usize) -> Result<(Duration, Duration)> {
    let events: Vec<HistoryEvent> = (0..jobs).flat_map(timeline).collect();
    let mut inside = Duration::ZERO;
    let started = Instant::now();
    let mut events = events.into_iter().peekable();
    while events.peek().is_some() {
        let chunk: Vec<_> = events.by_ref().take(CHUNK).collect();
        let t = Instant::now();
        for event in chunk {
            history.record(event);
        }
        inside += t.elapsed();
        if !history.flush(Duration::from_secs(300)) {
            bail!("the writer did not catch up within 300 s");
        }
    }
    Ok((inside, started.elapsed()))
}

fn size_on_disk(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn main() -> Result<()> {
    let mut jobs = 20_000;
    let mut rounds = 3;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().context("a flag without its value")?;
        match arg.as_str() {
            "--jobs" => jobs = value.parse()?,
            "--rounds" => rounds = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    let events = (jobs * 8) as f64;
    println!("{jobs} jobs x 8 events per round, {rounds} rounds, off and on side by side");
    println!("round  record off (us/call)  record on (us/call)  ratio  writer (events/s)");
    for round in 1..=rounds {
        let (off, _) = run(&History::disabled(), jobs)?;
        let dir = tempfile::tempdir()?;
        let history = History::open(dir.path(), Retention::default())?;
        let (on, wall) = run(&history, jobs)?;
        if history.write_failures() != 0 {
            bail!("{} events lost", history.write_failures());
        }
        let off_us = off.as_secs_f64() * 1e6 / events;
        let on_us = on.as_secs_f64() * 1e6 / events;
        println!(
            "{round:>5}  {off_us:>20.3}  {on_us:>19.3}  {:>5.1}  {:>17.0}",
            on_us / off_us,
            events / wall.as_secs_f64()
        );
        if round == rounds {
            drop(history);
            let reader = HistoryReader::open(dir.path())?;
            let time = |what: &str, f: &dyn Fn() -> Result<usize>| -> Result<()> {
                let t = Instant::now();
                let n = f()?;
                println!(
                    "{what}: {:.1} ms ({n} rows)",
                    t.elapsed().as_secs_f64() * 1e3
                );
                Ok(())
            };
            let list = |filter: ListFilter| reader.list(&filter).map(|jobs| jobs.len());
            time("orchgpu jobs (latest 50)", &|| {
                Ok(list(ListFilter {
                    limit: 50,
                    ..ListFilter::default()
                })?)
            })?;
            time("orchgpu jobs --key 0001234 (scans every key)", &|| {
                Ok(list(ListFilter {
                    key_contains: Some("0001234".into()),
                    limit: 50,
                    ..ListFilter::default()
                })?)
            })?;
            let key = format!("images/{:08}.jpg", jobs / 2);
            time("orchgpu jobs show KEY", &|| {
                Ok(reader.show(&key)?.map_or(0, |d| d.timeline.len()))
            })?;
            println!(
                "size on disk: {:.1} MB for {jobs} jobs",
                size_on_disk(dir.path()) as f64 / 1e6
            );
        }
    }
    Ok(())
}
