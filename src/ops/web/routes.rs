//! The web page's routes and their guard: the page and its assets, the JSON API, the
//! upload, and the results proxied from the output bucket.
//!
//! Who may do what (the listener in `http` has already refused foreign host names):
//!
//! | request | no token set (loopback only) | token set |
//! |---|---|---|
//! | `/`, assets, `/api/config`, `/api/session` | anyone | anyone |
//! | `POST /api/uploads` | anyone, same origin | token holders, same origin |
//! | `/api/uploads/<handle>`, `/results/<handle><suffix>` | the handle's holder | token holders with the handle |
//! | `/api/jobs`, `/api/jobs/<id>`, `/results/<id>…` | nobody (`orchgpu jobs` on the host) | token holders (operators) |
//!
//! A token holder is a request with the token in `X-Orchgpu-Token` or with a session
//! cookie that `/api/session` gave for it (see `keys`). An uploader's view of a job says
//! what happened in words: no key, bucket, error text, claim owner or scheduler job.
//!
//! Hostile input and limits: a request body pauses at most `--http-body-timeout`
//! (`http`) and an upload takes at most `UPLOAD_DEADLINE`; at most
//! `--upload-max-concurrent` uploads run at once (429 beyond) and together they hold at
//! most `--upload-disk-budget` bytes of the work dir (507 beyond); each upload's temp
//! file is a `tempfile` value, removed on every path, a cut-off client included (a crash
//! leaves it to the work dir's clean-up at the next start). Status answers come from
//! `cache`: one refresh per job at a time, S3 asked at most every `S3_FRESH`, not at all
//! while this daemon's history has the job in hand, never again once it is over.
//!
//! Results: what the function wrote for a job is listed once its result is there (one
//! `ListObjectsV2` of `<output dir>/<job id>.`, at most `OUTPUTS_MAX` names) and served
//! as `/results/<handle><suffix>`. A listed name whose suffix is not a plain name
//! (`names::is_output_suffix`) is not shown; a requested suffix is checked the same way
//! and the key is rebuilt as `<output dir>/<job id><suffix>`, so neither a name in S3 nor
//! a request path is ever used as a path or reaches another job's files. Types come from
//! our own table (`names::output_kind`), never from S3's metadata: raster images and
//! plain text are shown, anything else is an attachment.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use tokio::sync::Semaphore;
use tracing::warn;

use crate::aws::error_chain;
use crate::aws::storage;
use crate::job::claim::Claims;
use crate::location::BucketDir;
use crate::ops::history::{HistoryError, HistoryReader, ListFilter, Timestamp};
use crate::ops::http::Via;

use super::cache::{Fresh, ViewCache};
use super::keys::{HANDLE_LEN, Keys};
use super::names::{
    OutputKind, is_job_id, is_output_suffix, output_kind, parse_detections, same_origin,
    token_matches,
};
use super::status::{JobView, OutputFile, S3View, history_in_hand, job_view, summary_view};

use super::upload::*;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// No inline script or style, nothing from another origin, no framing.
const CSP: &str = "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; \
                   style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
                   form-action 'self'; frame-ancestors 'none'";
/// The header a script or curl sends the token in.
const TOKEN_HEADER: &str = "x-orchgpu-token";
/// The cookie the page gets once the token is entered.
const SESSION_COOKIE: &str = "orchgpu_session";
/// How long a session lasts.
const SESSION_SECS: u64 = 12 * 60 * 60;
/// The header carrying the uploaded file's name, percent-encoded.
pub(super) const NAME_HEADER: &str = "x-filename";
/// Most recent jobs listed.
const RECENT_JOBS: usize = 30;
/// Largest detections file read into a job's view.
const DETECTIONS_MAX: usize = 64 * 1024;
/// Most files of one job listed on the page.
const OUTPUTS_MAX: i32 = 50;
/// Longest title and hint a deployment may set (`--web-title`, `--web-hint`).
pub(crate) const WEB_TEXT_MAX: usize = 300;
/// Largest body of a token request.
const SESSION_MAX: usize = 1024;
/// The longest an upload may take from its first byte to its last, however steadily it
/// trickles: 50 MiB (the default limit) at 60 kB/s.
pub(super) const UPLOAD_DEADLINE: Duration = Duration::from_secs(15 * 60);
/// How long a view that asked S3 serves every page that polls the job.
const S3_FRESH: Duration = Duration::from_secs(3);
/// How long a view from the history alone serves.
const HISTORY_FRESH: Duration = Duration::from_secs(1);
/// Jobs whose views are cached.
const CACHED_JOBS: usize = 1024;

/// What the page needs from the daemon's configuration and clients.
pub(crate) struct WebSettings {
    pub(crate) s3: aws_sdk_s3::Client,
    /// Where uploads go; `None`: the page shows jobs only.
    pub(crate) upload_to: Option<BucketDir>,
    pub(crate) upload_max_bytes: u64,
    /// Uploads taken at once.
    pub(crate) upload_max_concurrent: usize,
    /// Bytes of the work dir that uploads in progress may hold together.
    pub(crate) upload_disk_budget: u64,
    /// The token the API asks for, if any.
    pub(crate) token: Option<String>,
    pub(crate) output: BucketDir,
    pub(crate) result_suffix: String,
    /// The claims to look at for jobs other daemons run.
    pub(crate) claims: Option<Claims>,
    /// Where the job history is.
    pub(crate) state_dir: PathBuf,
    /// Where an upload waits on disk before it goes to S3.
    pub(crate) work_dir: PathBuf,
    /// The page's title: which use case this deployment serves (`--web-title`).
    pub(crate) title: Option<String>,
    /// A line under the title saying what to upload (`--web-hint`).
    pub(crate) hint: Option<String>,
}

pub(super) struct WebState {
    pub(super) settings: WebSettings,
    pub(super) keys: Keys,
    pub(super) uploads: Arc<Semaphore>,
    pub(super) disk: DiskBudget,
    views: ViewCache<Result<JobView, &'static str>>,
}

pub(super) type Web = Arc<WebState>;

/// Who is asking, as the guard found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// A token holder: every job.
    Operator,
    /// Anyone, where no token is set: their own uploads, by handle.
    Uploader,
}

/// The page's routes with their guard, to merge into the listener's router.
///
/// # Errors
/// The operating system's random source failed (for the per-start key).
pub(crate) fn router(settings: WebSettings) -> Result<Router, getrandom::Error> {
    let web: Web = Arc::new(WebState {
        keys: Keys::random()?,
        uploads: Arc::new(Semaphore::new(settings.upload_max_concurrent)),
        disk: DiskBudget::new(settings.upload_disk_budget),
        views: ViewCache::new(CACHED_JOBS),
        settings,
    });
    Ok(Router::new()
        .route("/", get(index))
        .route("/assets/app.js", get(app_js))
        .route("/assets/style.css", get(style_css))
        .route("/api/config", get(config))
        .route("/api/session", post(session))
        .route("/api/jobs", get(jobs))
        .route("/api/jobs/{id}", get(job))
        .route("/api/uploads", post(upload))
        .route("/api/uploads/{handle}", get(uploaded))
        .route("/results/{file}", get(result))
        .layer(middleware::from_fn_with_state(web.clone(), guard))
        .with_state(web))
}

/// Refuses cross-site writes and, with a token set, API and result requests without
/// it; tells the handlers who asks; adds the security headers to every answer.
async fn guard(State(web): State<Web>, mut request: Request, next: Next) -> Response {
    let headers = request.headers();
    let path = request.uri().path();
    let writes = !matches!(*request.method(), Method::GET | Method::HEAD);
    let access = access(&web, headers);
    let mut response = if writes
        && !same_origin(
            header_str(headers, "sec-fetch-site"),
            header_str(headers, header::ORIGIN.as_str()),
            header_str(headers, header::HOST.as_str()),
        ) {
        error(StatusCode::FORBIDDEN, "cross-site requests are refused")
    } else if needs_access(path) && access.is_none() {
        error(
            StatusCode::UNAUTHORIZED,
            "a token is needed: enter it on the page, or send it in the X-Orchgpu-Token header",
        )
    } else {
        if let Some(access) = access {
            request.extensions_mut().insert(access);
        }
        next.run(request).await
    };
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// The page and its assets, the configuration and the token request are open; the rest
/// of the API and the results need access.
fn needs_access(path: &str) -> bool {
    (path.starts_with("/api/") && path != "/api/config" && path != "/api/session")
        || path.starts_with("/results/")
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Operator with the token (header or session cookie), uploader where no token is set,
/// `None` otherwise.
fn access(web: &WebState, headers: &HeaderMap) -> Option<Access> {
    let Some(expected) = &web.settings.token else {
        return Some(Access::Uploader);
    };
    if let Some(presented) = header_str(headers, TOKEN_HEADER) {
        return token_matches(presented, expected).then_some(Access::Operator);
    }
    let now = unix_now();
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(name, _)| *name == SESSION_COOKIE)
        .any(|(_, value)| web.keys.session_valid(value, expected, now))
        .then_some(Access::Operator)
}

pub(super) fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

pub(super) fn error(status: StatusCode, message: &str) -> Response {
    json(status, serde_json::json!({ "error": message }))
}

pub(super) fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn operators_only() -> Response {
    error(
        StatusCode::FORBIDDEN,
        "the list of jobs and other people's jobs are for operators: start orchgpu with \
         --http-token-file, or run `orchgpu jobs` on its host",
    )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

async fn config(State(web): State<Web>, headers: HeaderMap) -> Response {
    let access = access(&web, &headers);
    let s = &web.settings;
    json(
        StatusCode::OK,
        serde_json::json!({
            "uploads": s.upload_to.is_some(),
            "upload_max_bytes": s.upload_max_bytes,
            "upload_max_concurrent": s.upload_max_concurrent,
            "token_required": s.token.is_some(),
            "authorized": access.is_some(),
            "operator": access == Some(Access::Operator),
            "result_suffix": s.result_suffix,
            "title": s.title,
            "hint": s.hint,
        }),
    )
}

/// Takes the token as the body and, when it is right, sets a session cookie for it
/// (HTTP-only, same-site, expiring; `Secure` when a reverse proxy named in
/// `--http-allowed-hosts` says the request came over HTTPS) so that the page's requests,
/// images included, carry it. The cookie holds a MAC, not the token.
async fn session(
    State(web): State<Web>,
    via: Option<Extension<Via>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(expected) = &web.settings.token else {
        return StatusCode::NO_CONTENT.into_response();
    };
    let Ok(bytes) = axum::body::to_bytes(body, SESSION_MAX).await else {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "the token is too long");
    };
    let presented = String::from_utf8_lossy(&bytes);
    if !token_matches(presented.trim(), expected) {
        return error(StatusCode::UNAUTHORIZED, "wrong token");
    }
    let value = web.keys.session(expected, unix_now() + SESSION_SECS);
    let over_tls = via.is_some_and(|Extension(via)| via == Via::Proxy)
        && header_str(&headers, "x-forwarded-proto")
            .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"));
    let secure = if over_tls { "; Secure" } else { "" };
    let cookie = format!(
        "{SESSION_COOKIE}={value}; Path=/; Max-Age={SESSION_SECS}; HttpOnly; SameSite=Strict{secure}"
    );
    match HeaderValue::from_str(&cookie) {
        Ok(cookie) => (StatusCode::NO_CONTENT, [(header::SET_COOKIE, cookie)]).into_response(),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "cannot set the cookie"),
    }
}

/// Runs `read` on the history in the blocking pool; `None` when there is no history (or
/// it cannot be read, which is logged).
async fn read_history<T: Send + 'static>(
    state_dir: PathBuf,
    read: impl FnOnce(&HistoryReader) -> Result<T, HistoryError> + Send + 'static,
) -> Option<T> {
    let outcome = tokio::task::spawn_blocking(move || {
        let reader = HistoryReader::open(&state_dir)?;
        read(&reader)
    })
    .await;
    match outcome {
        Ok(Ok(value)) => Some(value),
        Ok(Err(HistoryError::Missing { .. })) => None,
        Ok(Err(e)) => {
            warn!(error = %error_chain(&e), "Web: cannot read the job history.");
            None
        }
        Err(e) => {
            warn!(error = %e, "Web: the history read failed.");
            None
        }
    }
}

async fn jobs(State(web): State<Web>, Extension(access): Extension<Access>) -> Response {
    if access != Access::Operator {
        return operators_only();
    }
    let filter = ListFilter {
        limit: RECENT_JOBS,
        ..ListFilter::default()
    };
    let listed = read_history(web.settings.state_dir.clone(), move |r| r.list(&filter)).await;
    let history = listed.is_some();
    let rows: Vec<_> = listed
        .unwrap_or_default()
        .iter()
        .map(summary_view)
        .collect();
    json(
        StatusCode::OK,
        serde_json::json!({ "history": history, "jobs": rows }),
    )
}

/// `GET /api/jobs/<job id>`: any job, everything known of it, for operators.
async fn job(
    State(web): State<Web>,
    Extension(access): Extension<Access>,
    Path(id): Path<String>,
) -> Response {
    if access != Access::Operator {
        return operators_only();
    }
    if !is_job_id(&id) {
        return error(StatusCode::NOT_FOUND, "not a job id");
    }
    view_response(cached_view(&web, &id).await, false)
}

/// `GET /api/uploads/<handle>`: the job of one's own upload; what an uploader may see of
/// it (operators see everything).
async fn uploaded(
    State(web): State<Web>,
    Extension(access): Extension<Access>,
    Path(handle): Path<String>,
) -> Response {
    let Some(id) = web.keys.job_of(&handle) else {
        return no_such_upload();
    };
    view_response(cached_view(&web, &id).await, access != Access::Operator)
}

fn no_such_upload() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such upload: its handle is wrong, or orchgpu restarted since (handles last one run)",
    )
}

fn view_response(view: Result<JobView, &'static str>, for_uploader: bool) -> Response {
    let view = match view {
        Ok(view) if for_uploader => view.for_uploader(),
        Ok(view) => view,
        Err(message) => return error(StatusCode::BAD_GATEWAY, message),
    };
    match serde_json::to_value(view) {
        Ok(body) => json(StatusCode::OK, body),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the job"),
    }
}

async fn cached_view(web: &Web, id: &str) -> Result<JobView, &'static str> {
    web.views.get(id, || refresh_view(web, id)).await
}

/// A job's view from the history and, unless the history has it in hand here, S3: the
/// result (a HEAD), then the detections once it is there, else a claim of another daemon.
async fn refresh_view(web: &Web, id: &str) -> (Result<JobView, &'static str>, Fresh) {
    let s = &web.settings;
    let wanted = id.to_string();
    let history = read_history(s.state_dir.clone(), move |r| r.show(&wanted))
        .await
        .flatten()
        .filter(|detail| detail.job.job_id == id);
    let in_hand = history_in_hand(history.as_ref());
    let mut s3 = S3View::default();
    if !in_hand {
        let result_key = s.output.key_for(&format!("{id}{}", s.result_suffix));
        match storage::object_exists(&s.s3, &s.output.bucket, &result_key).await {
            Ok(found) => s3.result = found,
            Err(e) => {
                warn!(error = %error_chain(&e), "Web: cannot check for a result.");
                return (Err("cannot reach the output bucket"), Fresh::For(S3_FRESH));
            }
        }
        let state = history.as_ref().map(|h| h.job.state.as_str());
        if s3.result {
            s3.outputs = list_outputs(&s.s3, &s.output, id).await;
            // A listing that failed says nothing: ask for the text file all the same.
            let has_text = s3.outputs.is_empty() || s3.outputs.iter().any(|o| o.suffix == ".txt");
            if has_text {
                let text_key = s.output.key_for(&format!("{id}.txt"));
                s3.detections = fetch_small(&s.s3, &s.output.bucket, &text_key)
                    .await
                    .and_then(|text| parse_detections(&text));
            }
        } else if let Some(claims) = &s.claims
            && matches!(state, None | Some("returned" | "failed"))
        {
            s3.claim = claims.peek(id).await.unwrap_or_else(|e| {
                warn!(error = %error_chain(&e), "Web: cannot read a claim.");
                None
            });
        }
    }
    let view = job_view(
        id,
        history.as_ref(),
        s3,
        Timestamp::from_system(SystemTime::now()),
    );
    let fresh = if view.is_final {
        Fresh::Final
    } else if in_hand {
        Fresh::For(HISTORY_FRESH)
    } else {
        Fresh::For(S3_FRESH)
    };
    (Ok(view), fresh)
}

/// The files the function wrote for job `id`: `<output dir>/<id><suffix>` for the
/// suffixes `is_output_suffix` accepts, at most `OUTPUTS_MAX`; empty when S3 cannot be
/// listed (logged).
async fn list_outputs(s3: &aws_sdk_s3::Client, output: &BucketDir, id: &str) -> Vec<OutputFile> {
    let prefix = output.key_for(id);
    let listed = s3
        .list_objects_v2()
        .bucket(&output.bucket)
        .prefix(format!("{prefix}."))
        .max_keys(OUTPUTS_MAX)
        .send()
        .await;
    let listed = match listed {
        Ok(listed) => listed,
        Err(e) => {
            warn!(error = %error_chain(&e), "Web: cannot list a job's outputs.");
            return Vec::new();
        }
    };
    listed
        .contents
        .unwrap_or_default()
        .into_iter()
        .filter_map(|object| {
            let suffix = object.key.as_deref()?.strip_prefix(prefix.as_str())?;
            is_output_suffix(suffix).then(|| OutputFile {
                suffix: suffix.to_string(),
                kind: output_kind(suffix).0,
                bytes: object.size.and_then(|n| u64::try_from(n).ok()).unwrap_or(0),
            })
        })
        .collect()
}

/// A small text object, or `None` when it is missing, too large or unreadable.
async fn fetch_small(s3: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Option<String> {
    let output = s3.get_object().bucket(bucket).key(key).send().await.ok()?;
    if output.content_length.unwrap_or(0) > DETECTIONS_MAX as i64 {
        return None;
    }
    let bytes = output.body.collect().await.ok()?.into_bytes();
    (bytes.len() <= DETECTIONS_MAX).then(|| String::from_utf8_lossy(&bytes).into_owned())
}

/// `GET /results/<handle><suffix>`, any file the function wrote for the job (operators
/// also by job id), streamed from the output bucket. Only a job id from a valid handle,
/// or a well-formed one from an operator, and a suffix that is a plain name, reach S3.
async fn result(
    State(web): State<Web>,
    Extension(access): Extension<Access>,
    Path(file): Path<String>,
) -> Response {
    let s = &web.settings;
    // Handles and job ids hold no dot: the suffix starts at the first one.
    let Some(dot) = file.find('.') else {
        return error(StatusCode::NOT_FOUND, "no such result");
    };
    let (stem, ext) = file.split_at(dot);
    if !is_output_suffix(ext) {
        return error(StatusCode::NOT_FOUND, "no such result");
    }
    let (kind, content_type) = output_kind(ext);
    let id = if stem.len() == HANDLE_LEN {
        match web.keys.job_of(stem) {
            Some(id) => id,
            None => return no_such_upload(),
        }
    } else if is_job_id(stem) {
        if access != Access::Operator {
            return error(StatusCode::NOT_FOUND, "no such result");
        }
        stem.to_string()
    } else {
        return error(StatusCode::NOT_FOUND, "no such result");
    };
    let key = s.output.key_for(&format!("{id}{ext}"));
    let output = match s
        .s3
        .get_object()
        .bucket(&s.output.bucket)
        .key(&key)
        .send()
        .await
    {
        Ok(output) => output,
        Err(aws_sdk_s3::error::SdkError::ServiceError(e)) if e.err().is_no_such_key() => {
            return error(StatusCode::NOT_FOUND, "no such result (yet)");
        }
        Err(e) => {
            warn!(error = %error_chain(&e), "Web: cannot read a result.");
            return error(StatusCode::BAD_GATEWAY, "cannot reach the output bucket");
        }
    };
    let stream = tokio_util::io::ReaderStream::new(output.body.into_async_read());
    let mut response = Response::new(Body::from_stream(stream));
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(length) = output.content_length.and_then(|n| u64::try_from(n).ok()) {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    if kind == OutputKind::File {
        h.insert(
            header::CONTENT_DISPOSITION,
            HeaderValue::from_static("attachment"),
        );
    }
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=60"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn the_disk_budget_is_shared_and_given_back() {
        let budget = DiskBudget::new(100);
        let mut a = budget.start();
        assert!(a.grow_to(60));
        let mut b = budget.start();
        assert!(!b.grow_to(41), "past the budget");
        assert!(b.grow_to(40));
        assert!(!a.grow_to(61));
        assert!(a.grow_to(60), "no more than held");
        drop(a);
        assert!(b.grow_to(100));
        drop(b);
        assert_eq!(budget.held.load(Ordering::Acquire), 0);
    }
}
