//! Builds the AWS SDK configuration and the S3 and SQS clients, in one place.
//!
//! Endpoint (LocalStack, moto) and region come from the command line or the SDK's usual
//! sources. Timeouts are set per client: SQS requests get a short attempt timeout (a
//! long-poll receive sets its own, from its wait: see `receive_attempt_timeout`), while
//! S3 transfers must not be cut by an operation timeout (a large object legitimately
//! takes long), only by a stalled connection. Retries are the SDK's standard mode with
//! the attempts and backoff named here, so `worst_sqs_request` can say how long a
//! request may take.
//!
//! With a custom endpoint (an emulator) credentials and region come from the environment,
//! profile files, web identity or a container only: the instance metadata service is
//! never asked, so a machine without credentials fails at once with one clear line
//! (`credentials_problem`) instead of the SDK's IMDS errors.

use std::time::Duration;

use aws_config::meta::credentials::CredentialsProviderChain;
use aws_config::meta::region::RegionProviderChain;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextMut;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_runtime_api::box_error::BoxError;
use tracing::warn;

use crate::aws::metrics::RequestCounter;

pub(crate) mod batcher;
pub mod metrics;
pub mod queue;
pub mod storage;

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
pub(crate) fn receive_attempt_timeout(wait: Duration) -> Duration {
    wait + RECEIVE_SLACK
}

/// The longest an SQS request other than a receive may take, retries included.
pub(crate) fn worst_sqs_request() -> Duration {
    (SQS_ATTEMPT_TIMEOUT + CONNECT_TIMEOUT) * MAX_ATTEMPTS + MAX_RETRY_BACKOFF * (MAX_ATTEMPTS - 1)
}
/// Region used when neither the command line nor the environment names one.
const FALLBACK_REGION: &str = "us-east-1";

/// The SDK clients the daemon (and the dev tools) use.
#[derive(Clone, Debug)]
pub struct AwsClients {
    /// The S3 client.
    pub s3: aws_sdk_s3::Client,
    /// The SQS client.
    pub sqs: aws_sdk_sqs::Client,
    /// Every request attempt both clients make, by operation.
    pub(crate) requests: RequestCounter,
    /// A custom endpoint (LocalStack, moto) is used, not AWS itself.
    pub(crate) custom_endpoint: bool,
}

/// Where and how to reach AWS.
#[derive(Clone, Debug, Default)]
pub struct AwsOptions {
    /// Custom endpoint (LocalStack, moto); `None` uses AWS_ENDPOINT_URL or the real AWS.
    pub endpoint_url: Option<String>,
    /// Region; `None` uses the SDK's sources, then us-east-1.
    pub region: Option<String>,
}

/// Builds both clients from the SDK's default sources plus `options` (without the
/// instance metadata service when the endpoint is custom).
pub async fn build_clients(options: &AwsOptions) -> AwsClients {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(url) = &options.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    // The SDK reads AWS_ENDPOINT_URL itself; it makes the endpoint custom all the same.
    let custom_endpoint =
        options.endpoint_url.is_some() || std::env::var_os("AWS_ENDPOINT_URL").is_some();
    if custom_endpoint {
        loader = loader.credentials_provider(credentials_without_imds());
    }
    // Resolved once, here: left unset, each of the SDK's chains (config, credentials,
    // token) would look for a region on its own, the instance metadata service included.
    let region = match &options.region {
        Some(region) => Some(Region::new(region.clone())),
        None if custom_endpoint => region_without_imds().region().await,
        None => RegionProviderChain::default_provider().region().await,
    };
    let region = region.unwrap_or_else(|| {
        warn!(
            region = FALLBACK_REGION,
            "No AWS region given (--region, ORCHGPU_REGION or AWS_REGION): using the fallback."
        );
        Region::new(FALLBACK_REGION)
    });
    let retry = aws_config::retry::RetryConfig::standard()
        .with_max_attempts(MAX_ATTEMPTS)
        .with_max_backoff(MAX_RETRY_BACKOFF);
    let shared = loader.region(region).retry_config(retry).load().await;
    // Path-style only for custom endpoints: emulators' bucket host names do not resolve,
    // while real AWS prefers virtual-hosted addressing.
    let custom_endpoint = custom_endpoint || shared.endpoint_url().is_some();
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
        custom_endpoint,
    }
}

/// The SDK's default credentials chain without its last link, the instance metadata
/// service: an emulator needs no instance profile, and asking for one off EC2 only adds
/// errors about it.
fn credentials_without_imds() -> CredentialsProviderChain {
    CredentialsProviderChain::first_try(
        "Environment",
        aws_config::environment::credentials::EnvironmentVariableCredentialsProvider::new(),
    )
    .or_else(
        "Profile",
        aws_config::profile::ProfileFileCredentialsProvider::builder().build(),
    )
    .or_else(
        "WebIdentityToken",
        aws_config::web_identity_token::WebIdentityTokenCredentialsProvider::builder().build(),
    )
    .or_else(
        "EcsContainer",
        aws_config::ecs::EcsCredentialsProvider::builder().build(),
    )
}

/// The SDK's default region chain without the instance metadata service.
fn region_without_imds() -> RegionProviderChain {
    RegionProviderChain::first_try(
        aws_config::environment::region::EnvironmentVariableRegionProvider::new(),
    )
    .or_else(aws_config::profile::region::ProfileFileRegionProvider::new())
}

/// When `error` failed for want of credentials, one line saying what is missing and how
/// to give it; `None` for any other failure.
pub(crate) fn credentials_problem(
    error: &(dyn std::error::Error + 'static),
    custom_endpoint: bool,
) -> Option<String> {
    let mut source = Some(error);
    while let Some(current) = source {
        if let Some(problem) = current.downcast_ref::<CredentialsError>() {
            return Some(match problem {
                CredentialsError::CredentialsNotLoaded(_) if custom_endpoint => {
                    "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
                     (any value works for an emulator such as LocalStack or moto) or AWS_PROFILE"
                        .to_string()
                }
                CredentialsError::CredentialsNotLoaded(_) => {
                    "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or \
                     AWS_PROFILE, or give this host an instance profile"
                        .to_string()
                }
                other if custom_endpoint => format!(
                    "cannot load AWS credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
                     or AWS_PROFILE): {}",
                    error_chain(other)
                ),
                other => format!(
                    "cannot load AWS credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
                     AWS_PROFILE, or an instance profile): {}",
                    error_chain(other)
                ),
            });
        }
        source = current.source();
    }
    None
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

    #[derive(Debug, thiserror::Error)]
    #[error("dispatch failure")]
    struct Dispatch(#[source] CredentialsError);

    #[test]
    fn credentials_problem_says_what_to_set() {
        let err = Dispatch(CredentialsError::not_loaded("no source had credentials"));
        let emulator = credentials_problem(&err, true).expect("a credentials problem");
        assert!(emulator.starts_with("no AWS credentials: set AWS_ACCESS_KEY_ID"));
        assert!(emulator.contains("emulator") && !emulator.contains("instance profile"));
        let aws = credentials_problem(&err, false).expect("a credentials problem");
        assert!(aws.contains("instance profile") && !aws.contains("emulator"));

        let err = Dispatch(CredentialsError::provider_error("profile \"x\" not found"));
        let other = credentials_problem(&err, true).expect("a credentials problem");
        assert!(other.starts_with("cannot load AWS credentials"), "{other}");
        assert!(other.contains("profile \"x\" not found"), "{other}");

        assert_eq!(
            credentials_problem(&Outer(std::io::Error::other("x")), true),
            None
        );
    }

    #[test]
    fn error_chain_joins_sources() {
        let err = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&err), "outer: inner");
    }
}
