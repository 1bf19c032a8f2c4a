//! `orchgpu-lambda-local`: runs `orchgpu-lambda` on this machine the way Lambda would,
//! for the demo (`dev/demo.sh --lambda`) and by hand: a Runtime API of the test kit's
//! own, the function as a child process polling it, the SQS event source mappings played
//! against the emulator (jobs queue, and the results queue when given) and the schedule
//! as a scheduled event every few seconds. Each invocation is logged with the time it
//! would be billed (from the event handed out to the answer, whole milliseconds).
//!
//! The function gets this process's environment (its `ORCHGPU_*` variables are the
//! function's configuration) plus the Lambda runtime's own variables. SIGINT or SIGTERM
//! stops the runner and the function, after the invocation in flight.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use orchgpu_testkit::{Mapping, Outcome, RuntimeApi, scheduled_event};

const USAGE: &str = "usage: orchgpu-lambda-local --function PATH [--results-queue NAME] \
[--schedule-every SECS] [--timeout SECS] [--visibility SECS] [--batch-size N]
  --visibility is the queues' visibility timeout (how soon a failed record comes back).
  Reads ORCHGPU_QUEUE and ORCHGPU_ENDPOINT_URL (and passes every ORCHGPU_* variable) to the function.";

struct Options {
    function: PathBuf,
    results_queue: Option<String>,
    schedule_every: Duration,
    timeout: Duration,
    visibility: Duration,
    batch_size: i32,
}

fn parse() -> Result<Options> {
    let mut args = std::env::args().skip(1);
    let mut options = Options {
        function: PathBuf::new(),
        results_queue: None,
        schedule_every: Duration::from_secs(5),
        timeout: Duration::from_secs(300),
        visibility: Duration::from_secs(30),
        batch_size: 10,
    };
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--function" => options.function = PathBuf::from(value()?),
            "--results-queue" => options.results_queue = Some(value()?),
            "--schedule-every" => options.schedule_every = Duration::from_secs(value()?.parse()?),
            "--timeout" => options.timeout = Duration::from_secs(value()?.parse()?),
            "--visibility" => options.visibility = Duration::from_secs(value()?.parse()?),
            "--batch-size" => options.batch_size = value()?.parse()?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if options.function.as_os_str().is_empty() {
        bail!("--function is required\n{USAGE}");
    }
    Ok(options)
}

/// Billed time per kind of invocation.
#[derive(Default)]
struct Totals {
    invocations: u64,
    billed_ms: u64,
    records: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let options = parse()?;
    let endpoint =
        std::env::var("ORCHGPU_ENDPOINT_URL").context("ORCHGPU_ENDPOINT_URL is required")?;
    let jobs_queue = std::env::var("ORCHGPU_QUEUE").context("ORCHGPU_QUEUE is required")?;
    let (_, sqs) = orchgpu_testkit::clients_at(&endpoint).await;
    let url_of = |name: String| {
        let sqs = sqs.clone();
        async move {
            sqs.get_queue_url()
                .queue_name(&name)
                .send()
                .await
                .with_context(|| format!("no queue {name}"))?
                .queue_url
                .context("no queue URL")
        }
    };
    let jobs = Mapping::new(
        &sqs,
        &url_of(jobs_queue).await?,
        options.batch_size,
        options.visibility,
    )
    .await?;
    let results = match options.results_queue.clone() {
        Some(name) => Some(
            Mapping::new(
                &sqs,
                &url_of(name).await?,
                options.batch_size,
                options.visibility,
            )
            .await?,
        ),
        None => None,
    };
    let api = RuntimeApi::start().await?;
    let mut child: Child = Command::new(&options.function)
        .env("AWS_LAMBDA_RUNTIME_API", &api.address)
        .env("AWS_LAMBDA_FUNCTION_NAME", "orchgpu")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", options.function.display()))?;
    eprintln!(
        "orchgpu-lambda-local: function pid {}, Runtime API {}",
        child.id(),
        api.address
    );
    let mut stop = Box::pin(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        anyhow::Ok(())
    });
    let mut totals: [(&str, Totals); 3] = [
        ("jobs", Totals::default()),
        ("results", Totals::default()),
        ("schedule", Totals::default()),
    ];
    let mut next_schedule = Instant::now() + options.schedule_every;
    loop {
        let round = async {
            let mut polled = Vec::new();
            let mappings = std::iter::once(&jobs).chain(results.as_ref());
            for (kind, mapping) in mappings.enumerate() {
                let Some((event, receipts)) = mapping.receive(&sqs).await? else {
                    continue;
                };
                // Billed: from the event handed to the function to its answer.
                let started = Instant::now();
                let mut alive = || true;
                let outcome = api.invoke(event, options.timeout, &mut alive).await;
                let took = started.elapsed();
                let failed = mapping.settle(&sqs, &receipts, &outcome).await?;
                let received: Vec<String> = receipts.into_iter().map(|(id, _)| id).collect();
                polled.push((
                    kind,
                    orchgpu_testkit::Poll {
                        received,
                        failed,
                        outcome,
                    },
                    took,
                ));
            }
            anyhow::Ok(polled)
        };
        let polled = tokio::select! {
            _ = &mut stop => break,
            polled = round => polled?,
        };
        for (kind, p, took) in polled {
            let billed = took.as_millis() as u64;
            let totals = &mut totals[kind].1;
            totals.invocations += 1;
            totals.billed_ms += billed;
            totals.records += p.received.len() as u64;
            eprintln!(
                "orchgpu-lambda-local: invoked {} records={} failed={} billed_ms={billed}{}",
                ["jobs", "results"][kind],
                p.received.len(),
                p.failed.len(),
                if matches!(p.outcome, Outcome::Response(_)) {
                    ""
                } else {
                    " (no response)"
                }
            );
        }
        if Instant::now() >= next_schedule {
            let started = Instant::now();
            let mut alive = || true;
            let outcome = api
                .invoke(scheduled_event(), options.timeout, &mut alive)
                .await;
            let billed = started.elapsed().as_millis() as u64;
            totals[2].1.invocations += 1;
            totals[2].1.billed_ms += billed;
            if let Outcome::Response(summary) = &outcome
                && summary["claims"].as_u64().unwrap_or(0) > 0
            {
                eprintln!("orchgpu-lambda-local: invoked schedule billed_ms={billed} {summary}");
            }
            next_schedule = Instant::now() + options.schedule_every;
        }
        if let Some(status) = child.try_wait()? {
            bail!("the function exited ({status})");
        }
    }
    for (kind, t) in &totals {
        eprintln!(
            "orchgpu-lambda-local: totals {kind}: invocations={} records={} billed_ms={}",
            t.invocations, t.records, t.billed_ms
        );
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}
