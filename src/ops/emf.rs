//! CloudWatch metrics from a Lambda function without an API call: the Embedded Metric
//! Format, one JSON line on stdout that Lambda's log stream turns into a metric
//! (namespace `orchgpu`, no dimensions). The daemon has Prometheus (`telemetry`); the
//! function serves no listener, so its counters are these lines (docs/serverless.md).
//!
//! Names are the caller's constants, never outside data.

use serde_json::json;
use tracing::info;

/// Counts `value` of metric `name` in CloudWatch through the Embedded Metric Format: one
/// JSON line on stdout, which Lambda's log stream turns into a metric (namespace
/// `orchgpu`), no API call and no permission needed.
pub(crate) fn count(name: &str, value: u64) {
    let line = json!({
        "_aws": {
            "Timestamp": crate::unix_now_ms(),
            "CloudWatchMetrics": [{
                "Namespace": "orchgpu",
                "Dimensions": [[]],
                "Metrics": [{"Name": name, "Unit": "Count"}]
            }]
        },
        name: value
    });
    println!("{line}");
    info!(metric = name, value, "Metric counted.");
}
