//! The HTTP listener (`--http-listen`): `/metrics` in the Prometheus text format, and
//! `/healthz` and `/readyz` with small JSON bodies for load balancers and probes, and the
//! routes of `web` (the page at `/`), merged in here.
//!
//! It serves what `telemetry` holds and changes nothing. It is off unless asked for; the
//! examples bind it to loopback. What it guards for every route:
//!
//! - **The Host.** A request is answered only when its `Host` (or absolute URI) names
//!   this listener: its own address, `localhost`, `127.0.0.1` or `[::1]` with its port,
//!   any IP literal when it listens on every address, or a name of
//!   `--http-allowed-hosts` (the names a reverse proxy serves). Anything else gets 421
//!   and reaches no handler: a page on another site whose name was made to resolve to
//!   this host (DNS rebinding) names itself in `Host` and is refused. An IP literal is
//!   no rebinding: the page's origin then is this host; nor is a request with no name at
//!   all (an HTTP/1.0 health check): browsers always send one.
//! - **Time.** HTTP/1.1 only (what reverse proxies speak to a backend); a request's head
//!   must arrive within `--http-header-timeout` (idle keep-alive connections included),
//!   and a body that pauses longer than `--http-body-timeout` between two reads is cut
//!   off (its handler sees an error). At most `MAX_CONNECTIONS` connections are served at
//!   once; further ones wait in the kernel's backlog.
//!
//! Hostile input: a malformed or foreign `Host` (or two that disagree) is 421; a slowloris head or body
//! is cut off by the timeouts; a flood of connections waits for a free slot. A crash at
//! any instant loses nothing: the listener holds no state.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::backoff::Backoff;
use crate::telemetry;

/// Connections served at once.
const MAX_CONNECTIONS: usize = 512;
/// How long open connections get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The listener's guards, from the configuration.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    /// How long the receive loop (and the job tasks, while jobs run) may show no
    /// progress before `/healthz` answers 503.
    pub stale_after: Duration,
    /// The longest a request's head may take to arrive.
    pub header_timeout: Duration,
    /// The longest a request's body may pause between two reads.
    pub body_timeout: Duration,
    /// The names the listener answers for.
    pub hosts: AllowedHosts,
}

/// How a request named this listener: directly (its address, loopback) or by a name of
/// `--http-allowed-hosts` (through a reverse proxy). `web` reads it from the request's
/// extensions: only through a proxy does it trust `X-Forwarded-Proto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Direct,
    Proxy,
}

/// The names the listener answers for.
#[derive(Debug, Clone)]
pub struct AllowedHosts {
    listen: SocketAddr,
    /// `--http-allowed-hosts`, lowercase; a port of `None` matches any port or none.
    proxied: Vec<(String, Option<u16>)>,
}

impl AllowedHosts {
    /// The defaults of a listener bound to `listen` (its actual address, port 0 resolved),
    /// plus the `proxied` names (`name` or `name:port`, as `parse_host_port` reads them).
    pub fn new(listen: SocketAddr, proxied: &[(String, Option<u16>)]) -> AllowedHosts {
        AllowedHosts {
            listen,
            proxied: proxied
                .iter()
                .map(|(name, port)| (name.to_ascii_lowercase(), *port))
                .collect(),
        }
    }

    /// How `host` (a `Host` header's value) names this listener, or `None` if it does not.
    pub fn check(&self, host: &str) -> Option<Via> {
        let (name, port) = parse_host_port(host)?;
        let port_ok = match port {
            Some(port) => port == self.listen.port(),
            None => self.listen.port() == 80,
        };
        if port_ok {
            if name == "localhost" {
                return Some(Via::Direct);
            }
            if let Ok(ip) = name
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                && (ip.is_loopback() || ip == self.listen.ip() || self.listen.ip().is_unspecified())
            {
                return Some(Via::Direct);
            }
        }
        self.proxied
            .iter()
            .any(|(allowed, allowed_port)| {
                *allowed == name && (allowed_port.is_none() || *allowed_port == port)
            })
            .then_some(Via::Proxy)
    }
}

/// `name`, `name:port`, `[v6]` or `[v6]:port` to a lowercase name (brackets kept) and
/// the port; `None` for anything else: an empty name, characters outside letters,
/// digits, `.`, `-` (and `:` inside brackets), a bad port.
pub fn parse_host_port(raw: &str) -> Option<(String, Option<u16>)> {
    let raw = raw.trim();
    let (name, port) = if raw.starts_with('[') {
        let end = raw.find(']')?;
        let (name, rest) = raw.split_at(end + 1);
        let inside = &name[1..name.len() - 1];
        if inside.is_empty()
            || !inside
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        {
            return None;
        }
        match rest {
            "" => (name, None),
            _ => (name, Some(rest.strip_prefix(':')?)),
        }
    } else {
        match raw.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (raw, None),
        }
    };
    if !name.starts_with('[')
        && (name.is_empty()
            || name.starts_with(['.', '-'])
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'))
    {
        return None;
    }
    let port = match port {
        None => None,
        Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
            Some(p.parse::<u16>().ok()?)
        }
        Some(_) => return None,
    };
    Some((name.to_ascii_lowercase(), port))
}

/// Serves until `stop` fires. `web` is `web::router`'s routes.
///
/// # Errors
/// None at present; the accept loop retries what fails (a full file table).
pub async fn serve(
    listener: tokio::net::TcpListener,
    settings: ServeSettings,
    web: Router,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let stale_after = settings.stale_after;
    let guard = Arc::new(settings.clone());
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(move || healthz(stale_after)))
        .route("/readyz", get(readyz))
        .merge(web)
        .layer(middleware::from_fn_with_state(guard, check_request));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => break,
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let stream = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // A full file table passes as connections close.
                    warn!(error = %e, "Cannot accept an HTTP connection.");
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(backoff.next_delay()) => continue,
                    }
                }
            },
        };
        backoff.reset();
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // A client that goes away, or a timeout, ends the connection; nothing to log.
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {}
    }
    Ok(())
}

/// Refuses a request that does not name this listener (421); gives the others a body
/// that ends when it pauses too long, and tells `web` how the request came.
async fn check_request(
    State(settings): State<Arc<ServeSettings>>,
    mut request: Request,
    next: Next,
) -> Response {
    let from_header = request
        .headers()
        .get(header::HOST)
        .map(|v| v.to_str().ok().and_then(|v| settings.hosts.check(v)));
    let from_uri = request
        .uri()
        .authority()
        .map(|a| settings.hosts.check(a.as_str()));
    let via = match (from_header, from_uri) {
        (Some(Some(via)), None | Some(Some(_))) | (None, Some(Some(via))) => via,
        // No name at all: an HTTP/1.0 probe (some load balancers' health checks), never a
        // browser, which always sends one.
        (None, None) => Via::Direct,
        _ => {
            return json(
                StatusCode::MISDIRECTED_REQUEST,
                serde_json::json!({
                    "error": "this listener does not answer for that host name: use its \
                              own address, or a name given in --http-allowed-hosts"
                }),
            )
            .into_response();
        }
    };
    request.extensions_mut().insert(via);
    let (parts, body) = request.into_parts();
    let body = Body::new(IdleTimeoutBody::new(body, settings.body_timeout));
    next.run(Request::from_parts(parts, body)).await
}

/// A request body that fails when no data arrives for `idle`.
struct IdleTimeoutBody {
    inner: Body,
    idle: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl IdleTimeoutBody {
    fn new(inner: Body, idle: Duration) -> Self {
        IdleTimeoutBody {
            inner,
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

/// The error a body that paused too long ends with.
#[derive(Debug, thiserror::Error)]
#[error("the request body paused longer than --http-body-timeout")]
struct BodyTimedOut;

impl http_body::Body for IdleTimeoutBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = tokio::time::Instant::now() + this.idle;
                this.sleep.as_mut().reset(next);
                Poll::Ready(frame)
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut)))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(listen: &str, proxied: &[&str]) -> AllowedHosts {
        let proxied: Vec<_> = proxied
            .iter()
            .map(|p| parse_host_port(p).expect("a valid entry"))
            .collect();
        AllowedHosts::new(listen.parse().expect("an address"), &proxied)
    }

    #[test]
    fn loopback_listener_answers_its_own_names_only() {
        let h = hosts("127.0.0.1:9464", &[]);
        for ok in [
            "127.0.0.1:9464",
            "localhost:9464",
            "LOCALHOST:9464",
            "[::1]:9464",
        ] {
            assert_eq!(h.check(ok), Some(Via::Direct), "{ok}");
        }
        for bad in [
            "rebind.example:9464",
            "127.0.0.1:9465",
            "127.0.0.1",
            "localhost",
            "10.0.0.5:9464",
            "localhost.:9464",
            "",
            "127.0.0.1:9464:1",
            "user@127.0.0.1:9464",
            "127.0.0.1:+9464",
            "[::1",
            "::1:9464",
        ] {
            assert_eq!(h.check(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_listener_on_every_address_takes_ip_literals_but_no_names() {
        let h = hosts("0.0.0.0:9464", &[]);
        assert_eq!(h.check("10.0.0.5:9464"), Some(Via::Direct));
        assert_eq!(h.check("[fe80::1]:9464"), Some(Via::Direct));
        assert_eq!(h.check("orchgpu.internal:9464"), None);
        let h = hosts("10.0.0.5:9464", &[]);
        assert_eq!(h.check("10.0.0.5:9464"), Some(Via::Direct));
        assert_eq!(h.check("10.0.0.6:9464"), None);
    }

    #[test]
    fn proxied_names_match_with_any_port_unless_one_is_given() {
        let h = hosts(
            "127.0.0.1:9464",
            &["orchgpu.example.org", "Other.Example:8443"],
        );
        assert_eq!(h.check("orchgpu.example.org"), Some(Via::Proxy));
        assert_eq!(h.check("ORCHGPU.example.org:443"), Some(Via::Proxy));
        assert_eq!(h.check("other.example:8443"), Some(Via::Proxy));
        assert_eq!(h.check("other.example"), None);
        assert_eq!(h.check("other.example:443"), None);
        assert_eq!(h.check("evil.orchgpu.example.org"), None);
    }

    #[test]
    fn port_80_may_go_unnamed() {
        let h = hosts("127.0.0.1:80", &[]);
        assert_eq!(h.check("localhost"), Some(Via::Direct));
        assert_eq!(h.check("localhost:80"), Some(Via::Direct));
    }
}
