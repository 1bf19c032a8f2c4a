//! The function's life: what one sandbox builds once (clients, queues, claims, journal,
//! reservations, the job context), and each invocation routed to its handler.
//!
//! A sandbox lives across invocations (warm starts) and may die at any instant (timeout,
//! out of memory, recycled). What it keeps between invocations (the reservation journal
//! and the work dir under `/tmp`) is a cache, not a record: a new sandbox starts with
//! nothing, and the claims in S3 are what the next invocation (or the schedule) goes by.
//! A journal left by an earlier invocation of the same sandbox is replayed as in the
//! daemon (its leftovers released in the background), which only helps.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use aws_lambda_events::sqs::SqsBatchResponse;
use lambda_runtime::{Diagnostic, LambdaEvent, service_fn};
use serde_json::Value;
use tracing::{error, info, warn};

use super::config::LambdaConfig;
use super::route::{QueueNames, Route, route};
use crate::aws::error_chain;
use crate::aws::queue::Queue;
use crate::aws::{AwsOptions, build_clients};
use crate::job::claim::{Claims, S3Store};
use crate::job::workdir::WorkDir;
use crate::job::{JobContext, JobSettings};
use crate::ops::history::History;
use crate::reservations::{Journal, ReservationSettings, Reservations};
use crate::scheduler::{Ssgm, SsgmConfig};

/// What one sandbox shares between its invocations.
pub(crate) struct Lambda {
    pub(crate) config: LambdaConfig,
    pub(crate) s3: aws_sdk_s3::Client,
    pub(crate) queues: QueueNames,
    /// The jobs queue: where the schedule sends a job back.
    pub(crate) jobs_queue: Queue,
    /// The jobs queue's dead-letter queue and its `maxReceiveCount`, from its redrive
    /// policy: where the schedule sends a job that keeps failing.
    pub(crate) dead_letter: Option<(Queue, u32)>,
    pub(crate) claims: Claims,
    pub(crate) jobs: Arc<JobContext<Ssgm>>,
    /// The longest one SSGM call can take (its timeout and the kill grace).
    pub(crate) worst_ssgm_call: Duration,
    /// The work dir of this sandbox (kept alive with it).
    _work_dir: WorkDir,
}

/// One invocation's identity and deadline.
#[derive(Debug, Clone)]
pub(crate) struct Invocation {
    pub(crate) request_id: String,
    /// When Lambda ends the invocation (unix milliseconds).
    pub(crate) deadline_unix_ms: u64,
}

impl Invocation {
    /// How long the invocation has left.
    pub(crate) fn remaining(&self) -> Duration {
        Duration::from_millis(self.deadline_unix_ms.saturating_sub(crate::unix_now_ms()))
    }
}

/// Builds the sandbox's shared parts, then serves invocations from the Lambda Runtime API
/// (`AWS_LAMBDA_RUNTIME_API`) until the sandbox ends.
///
/// # Errors
/// An init failure (queues, claims location, journal, work dir), or the runtime's own.
pub async fn run(config: LambdaConfig) -> anyhow::Result<()> {
    let lambda = Arc::new(Lambda::build(config).await?);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let lambda = lambda.clone();
        async move { lambda.handle(event).await }
    }))
    .await
    .map_err(|e| anyhow::anyhow!("the Lambda runtime failed: {e}"))
}

impl Lambda {
    async fn build(config: LambdaConfig) -> anyhow::Result<Lambda> {
        let c = &config.config;
        let clients = build_clients(&AwsOptions {
            endpoint_url: c.endpoint_url.clone(),
            region: c.region.clone(),
        })
        .await;
        let jobs_queue = Queue::resolve(clients.sqs.clone(), &c.queue)
            .await
            .context("cannot reach the jobs queue")?;
        let dead_letter = dead_letter(&jobs_queue).await;
        let place = c
            .claims
            .as_ref()
            .context("claims are required (checked with the configuration)")?;
        let claims = Claims::new(
            Box::new(S3Store::new(clients.s3.clone(), place.bucket.clone())),
            &place.dir,
            c.claim_lease,
        );
        // As the daemon does at start-up: a claims location the function cannot write
        // fails the init, not every record.
        claims.check().await.with_context(|| {
            format!(
                "cannot write and delete claims in s3://{}/{} (ORCHGPU_CLAIMS): the function \
                 needs s3:PutObject, s3:GetObject, s3:DeleteObject and s3:ListBucket there",
                place.bucket, place.dir
            )
        })?;
        let (work_dir, _) = WorkDir::open(&c.work_dir).context("cannot prepare the work dir")?;
        let (journal, leftovers) =
            Journal::open(config.state_dir()).context("cannot open the reservation journal")?;
        let ssgm = SsgmConfig {
            program: c.ssgm.clone(),
            host: c.scheduler_host.clone(),
            port: c.scheduler_port,
            call_timeout: c.ssgm_timeout,
            scratch_dir: c.state_dir.clone(),
        };
        let worst_ssgm_call = ssgm.worst_call();
        let (reservations, _releaser) = Reservations::start(
            Arc::new(Ssgm::new(ssgm)),
            Arc::new(journal),
            leftovers,
            ReservationSettings {
                gpus: c.gpus.get(),
                alloc_retry_interval: c.alloc_retry_interval,
                // One `-alloc` per record: a busy scheduler is a batch item failure.
                alloc_deadline: Duration::ZERO,
                scheduler_address: format!("{}:{}", c.scheduler_host, c.scheduler_port),
            },
            worst_ssgm_call,
            Some(Arc::new(claims.clone()) as Arc<dyn crate::reservations::GrantRecords>),
        );
        let jobs = Arc::new(JobContext::new(
            clients.s3.clone(),
            Arc::new(reservations),
            JobSettings {
                intermediate: c.intermediate.clone(),
                output: c.output.clone(),
                result_suffix: c.result_suffix.clone(),
                result_poll_interval: c.result_poll_interval,
                result_deadline: c.result_deadline,
                work_dir: work_dir.path().to_path_buf(),
                serverless: true,
            },
            None,
            Some(claims.clone()),
            History::disabled(),
        ));
        let queues = QueueNames {
            jobs: config.jobs_queue_name.clone(),
            results: config.results_queue_name.clone(),
        };
        info!(queue = %jobs_queue.url(), "Function ready.");
        Ok(Lambda {
            s3: clients.s3,
            queues,
            jobs_queue,
            dead_letter,
            claims,
            jobs,
            worst_ssgm_call,
            _work_dir: work_dir,
            config,
        })
    }

    /// One invocation.
    async fn handle(&self, event: LambdaEvent<Value>) -> Result<Value, Diagnostic> {
        let invocation = Invocation {
            request_id: event.context.request_id.clone(),
            deadline_unix_ms: event.context.deadline,
        };
        let route = match route(event.payload, &self.queues) {
            Ok(route) => route,
            Err(e) => {
                error!(request_id = %invocation.request_id, error = %e, "Event refused.");
                return Err(Diagnostic {
                    error_type: "orchgpu.EventRefused".to_string(),
                    error_message: e.to_string(),
                });
            }
        };
        let response = match route {
            Route::Jobs(records) => {
                batch_response(super::jobs::handle(self, &invocation, records).await)
            }
            Route::Results(records) => {
                batch_response(super::results::handle(self, &invocation, records).await)
            }
            Route::Schedule => serde_json::to_value(super::schedule::run(self, &invocation).await)
                .expect("a struct of numbers always serializes"),
        };
        Ok(response)
    }
}

fn batch_response(failures: Vec<String>) -> Value {
    let mut response = SqsBatchResponse::default();
    response.set_failures(failures);
    serde_json::to_value(response).expect("a list of strings always serializes")
}

/// The jobs queue's dead-letter queue and `maxReceiveCount`; `None` (and a warning) when
/// it has no redrive policy: the schedule then sends a job back forever.
async fn dead_letter(jobs: &Queue) -> Option<(Queue, u32)> {
    use aws_sdk_sqs::types::QueueAttributeName;
    let policy = match jobs.attribute(QueueAttributeName::RedrivePolicy).await {
        Ok(Some(policy)) => policy,
        Ok(None) => {
            warn!(
                "The jobs queue has no redrive policy: a job whose result never comes is retried forever."
            );
            return None;
        }
        Err(e) => {
            warn!(error = %error_chain(&e), "Cannot read the jobs queue's redrive policy.");
            return None;
        }
    };
    let max = serde_json::from_str::<Value>(&policy)
        .ok()
        .and_then(|v| match &v["maxReceiveCount"] {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        })
        .and_then(|n| u32::try_from(n).ok())?;
    match jobs.dead_letter_queue().await {
        Ok(Some(queue)) => Some((queue, max)),
        Ok(None) => None,
        Err(e) => {
            warn!(error = %error_chain(&e), "Cannot find the jobs queue's dead-letter queue.");
            None
        }
    }
}
