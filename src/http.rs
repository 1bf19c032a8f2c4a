//! The HTTP listener (`--http-listen`): `/metrics` in the Prometheus text format, and
//! `/healthz` and `/readyz` with small JSON bodies for load balancers and probes.
//!
//! It serves what `telemetry` holds and changes nothing. It is off unless asked for; the
//! examples bind it to loopback.

use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::telemetry;

/// Serves until `stop` fires.
///
/// `stale_after` is how long the receive loop (and the job tasks, while jobs run) may
/// show no progress before `/healthz` answers 503.
///
/// # Errors
/// The server's I/O error.
pub async fn serve(
    listener: tokio::net::TcpListener,
    stale_after: Duration,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(move || healthz(stale_after)))
        .route("/readyz", get(readyz));
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

async fn metrics() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        telemetry::get().encode(),
    )
}

async fn healthz(stale_after: Duration) -> impl IntoResponse {
    let health = telemetry::get().health(stale_after);
    let status = if health.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "healthy": health.healthy,
        "receive_loop_idle_seconds": health.loop_age.as_secs_f64(),
        "jobs_idle_seconds": health.jobs_age.map(|a| a.as_secs_f64()),
        "jobs_running": health.jobs_running,
    });
    json(status, body)
}

async fn readyz() -> impl IntoResponse {
    let ready = telemetry::get().is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, serde_json::json!({ "ready": ready }))
}

fn json(status: StatusCode, body: serde_json::Value) -> impl IntoResponse {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}
