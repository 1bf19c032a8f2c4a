//! orchgpu-bench: measures what orchestration costs, each figure beside a floor measured
//! in the same run (see BENCHMARKS.md). `bench/run.sh` builds the release binaries, starts
//! an emulator and runs this; it can also be run by hand:
//!
//! `orchgpu-bench --endpoint URL --bin-dir target/release [--quick] [--only NAME,...]`
//!
//! It starts the real daemon, the mock SSGM and the function stand-in as processes, drives
//! them through S3 and SQS, and reads the daemon's JSON log (per-stage `elapsed_us` and
//! timestamps), its `--stats-file` (exact AWS request counts from the SDK interceptor),
//! `/proc/<pid>/status` and `/proc/<pid>/stat` (memory, CPU) and `mock-ssgm -stats`.
//! Every load loop is bounded in count and in time.
//!
//! Its rooms: one file per scenario (named as `--only` names it), `harness` (the test kit's
//! stacks and processes with the bench's settings), `load` (inputs and puts), `measure`
//! (CPU, memory, clock, perf) and `report` (the figures and the final table).

mod contended;
mod detection;
mod harness;
mod load;
mod measure;
mod memory;
mod overhead;
mod report;
mod throughput;
mod waiting;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use orchgpu::aws::{AwsClients, AwsOptions, build_clients};
use orchgpu_testkit::{Bins, Kit};

use report::Report;

/// The command line, and the sizes it picks.
struct Opts {
    kit: Kit,
    repo: PathBuf,
    quick: bool,
    only: Option<Vec<String>>,
    work: tempfile::TempDir,
    sizes: Sizes,
}

impl Opts {
    /// Whether `--only` (if given) names scenario `name`.
    fn wants(&self, name: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == name))
    }
}

/// Sizes of each scenario, full or `--quick`.
struct Sizes {
    overhead_small: usize,
    overhead_large: usize,
    detection: usize,
    throughput: usize,
    contended: usize,
    memory_big_mb: usize,
    waiting: usize,
    waiting_window: Duration,
}

impl Sizes {
    /// The full sizes, or the quick ones.
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                overhead_small: 8,
                overhead_large: 2,
                detection: 4,
                throughput: 100,
                contended: 6,
                memory_big_mb: 64,
                waiting: 200,
                waiting_window: Duration::from_secs(10),
            }
        } else {
            Sizes {
                overhead_small: 20,
                overhead_large: 5,
                detection: 10,
                throughput: 300,
                contended: 20,
                memory_big_mb: 200,
                waiting: 1000,
                waiting_window: Duration::from_secs(30),
            }
        }
    }
}

/// Reads the command line and `ORCHGPU_BENCH_ENDPOINT`.
fn parse_opts() -> Result<Opts> {
    let mut endpoint = std::env::var("ORCHGPU_BENCH_ENDPOINT").ok();
    let mut bin_dir = None;
    let mut quick = false;
    let mut only = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--endpoint" => endpoint = args.next(),
            "--bin-dir" => bin_dir = args.next().map(PathBuf::from),
            "--quick" => quick = true,
            "--only" => {
                only = args
                    .next()
                    .map(|s| s.split(',').map(str::to_string).collect())
            }
            other => bail!(
                "unknown argument {other:?}; usage: orchgpu-bench --endpoint URL --bin-dir DIR [--quick] [--only overhead,detection,throughput,contended,memory,waiting]"
            ),
        }
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin_dir = bin_dir.unwrap_or_else(|| repo.join("target/release"));
    Ok(Opts {
        kit: Kit {
            endpoint: endpoint.ok_or_else(|| anyhow!("--endpoint or ORCHGPU_BENCH_ENDPOINT"))?,
            bins: Bins::in_dir(&bin_dir),
            repo: repo.clone(),
        },
        repo,
        quick,
        only,
        work: tempfile::Builder::new()
            .prefix("orchgpu-bench-")
            .tempdir()?,
        sizes: Sizes::new(quick),
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let opts = parse_opts()?;
    let aws = build_clients(&AwsOptions {
        endpoint_url: Some(opts.kit.endpoint.clone()),
        region: Some("us-east-1".into()),
    })
    .await;
    let mut report = Report::default();
    let started = Instant::now();
    for name in SCENARIOS {
        if !opts.wants(name) {
            continue;
        }
        let t0 = Instant::now();
        eprintln!("bench: === {name} ===");
        if let Err(e) = run_scenario(name, &opts, &aws, &mut report).await {
            report.note(format!("scenario {name} failed: {e:#}"));
        }
        eprintln!("bench: {name} took {:.0} s", t0.elapsed().as_secs_f64());
    }
    report.note(format!(
        "whole run: {:.0} s, mode {}",
        started.elapsed().as_secs_f64(),
        if opts.quick { "quick" } else { "full" }
    ));
    println!("{}", report.print());
    Ok(())
}

/// The scenarios, in the order they run (`--only` picks some of them by these names).
const SCENARIOS: [&str; 6] = [
    "overhead",
    "detection",
    "throughput",
    "contended",
    "memory",
    "waiting",
];

/// Runs the scenario called `name`, adding its rows and notes to `report`.
async fn run_scenario(
    name: &str,
    opts: &Opts,
    aws: &AwsClients,
    report: &mut Report,
) -> Result<()> {
    match name {
        "overhead" => overhead::overhead(opts, aws, report).await,
        "detection" => detection::detection(opts, aws, report).await,
        "throughput" => throughput::throughput(opts, aws, report).await,
        "contended" => contended::contended(opts, aws, report).await,
        "memory" => memory::memory(opts, aws, report).await,
        "waiting" => waiting::waiting(opts, aws, report).await,
        other => bail!("no scenario {other:?}"),
    }
}
