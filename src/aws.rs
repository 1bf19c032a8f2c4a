//! Builds the AWS SDK configuration and the S3 and SQS clients, in one place.
//!
//! Endpoint (LocalStack, moto) and region come from the command line or the SDK's usual
//! sources. Timeouts are set per client: SQS requests get a short attempt timeout (a
//! long-poll receive sets its own, from its wait: see `receive_attempt_timeout`), while
//! S3 transfers must not be cut by an operation timeout (a large object legitimately
//! takes long), only by a stalled connection. Retries are the SDK's standard mode with
//! the attempts and backoff named here, so `worst_sqs_request` can say how long a
//! request may take.

use std::time::Duration;

use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextMut;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_runtime_api::box_error::BoxError;

use crate::metrics::RequestCounter;

/// Connecting to AWS (or the emulator) should never take long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A transfer that sends or receives nothing for this long is stalled.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Slack on top of the long-poll wait for the receive call's attempt timeout.
const RECEIVE_SLACK: Duration = Duration::from_secs(10);
/// Attempt timeout of every other SQS request.
const SQS_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(20);
/// Attempts per request (the SDK's standard retry mode).
const MAX_ATTEMPTS: u32 = 3;
/// Longest pause between two attempts.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(5);

/// The attempt timeout of a long-poll receive that waits `wait`.
pub fn receive_attempt_timeout(wait: Duration) -> Duration {
    wait + RECEIVE_SLACK
}

/// The longest an SQS request other than a receive may take, retries included.
pub fn worst_sqs_request() -> Duration {
    (SQS_ATTEMPT_TIMEOUT + CONNECT_TIMEOUT) * MAX_ATTEMPTS + MAX_RETRY_BACKOFF * (MAX_ATTEMPTS - 1)
}
/// Region used when neither the command line nor the environment names one.
const FALLBACK_REGION: &str = "us-east-1";

/// The SDK clients the daemon (and the dev tools) use.
#[derive(Clone, Debug)]
pub struct AwsClients {
    pub s3: aws_sdk_s3::Client,
    pub sqs: aws_sdk_sqs::Client,
    /// Every request attempt both clients make, by operation.
    pub requests: RequestCounter,
}

/// Where and how to reach AWS.
#[derive(Clone, Debug, Default)]
pub struct AwsOptions {
    /// Custom endpoint (LocalStack, moto); `None` uses AWS_ENDPOINT_URL or the real AWS.
    pub endpoint_url: Option<String>,
    /// Region; `None` uses the SDK's sources, then us-east-1.
    pub region: Option<String>,
}

/// Builds both clients from the SDK's default sources plus `options`.
pub async fn build_clients(options: &AwsOptions) -> AwsClients {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(url) = &options.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    if let Some(region) = &options.region {
        loader = loader.region(Region::new(region.clone()));
    }
    let retry = aws_config::retry::RetryConfig::standard()
        .with_max_attempts(MAX_ATTEMPTS)
        .with_max_backoff(MAX_RETRY_BACKOFF);
    let mut shared = loader.retry_config(retry).load().await;
    if shared.region().is_none() {
        shared = shared
            .into_builder()
            .region(Region::new(FALLBACK_REGION))
            .build();
    }
    // Path-style only for custom endpoints: emulators' bucket host names do not resolve,
    // while real AWS prefers virtual-hosted addressing.
    let custom_endpoint = shared.endpoint_url().is_some();
    let requests = RequestCounter::new();

    let s3_config = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(custom_endpoint)
        .request_checksum_calculation(aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired)
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .read_timeout(READ_TIMEOUT)
                .build(),
        )
        .interceptor(requests.interceptor());
    let s3_config = if custom_endpoint {
        s3_config.interceptor(AskForKeepAlive)
    } else {
        s3_config
    }
    .build();

    let sqs_config = aws_sdk_sqs::config::Builder::from(&shared)
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .read_timeout(SQS_ATTEMPT_TIMEOUT)
                .operation_attempt_timeout(SQS_ATTEMPT_TIMEOUT)
                .build(),
        )
        .interceptor(requests.interceptor());
    let sqs_config = if custom_endpoint {
        sqs_config.interceptor(AskForKeepAlive)
    } else {
        sqs_config
    }
    .build();

    AwsClients {
        s3: aws_sdk_s3::Client::from_conf(s3_config),
        sqs: aws_sdk_sqs::Client::from_conf(sqs_config),
        requests,
    }
}

/// Adds `Connection: keep-alive` to every request to a custom endpoint. LocalStack (with
/// its hypercorn gateway) closes the connection after each response unless the client
/// asks for keep-alive explicitly, so each request would cost a new TCP connection on
/// both sides (about six per job). HTTP/1.1 means the same by default, so the header
/// changes nothing elsewhere; requests to AWS itself are left as the SDK makes them.
#[derive(Debug)]
struct AskForKeepAlive;

impl Intercept for AskForKeepAlive {
    fn name(&self) -> &'static str {
        "orchgpu.AskForKeepAlive"
    }

    fn modify_before_transmit(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        context
            .request_mut()
            .headers_mut()
            .insert("connection", "keep-alive");
        Ok(())
    }
}

/// Formats an error with its whole source chain on one line ("a: b: c"), which the SDK's
/// own `Display` ("service error") does not.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // The SDK repeats a cause's message in its parent; print each once.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn error_chain_joins_sources() {
        let err = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&err), "outer: inner");
    }
}
