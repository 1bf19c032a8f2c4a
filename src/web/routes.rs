//! The web page's routes and their guard: the page and its assets, the JSON API, the
//! upload, and the results proxied from the output bucket.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use crate::aws::error_chain;
use crate::claim::Claims;
use crate::cli::BucketDir;
use crate::event::ObjectRef;
use crate::history::{HistoryError, HistoryReader, ListFilter, Timestamp};
use crate::job::JobId;
use crate::storage;

use super::names::{
    is_job_id, parse_detections, same_origin, sanitise_file_name, token_matches, unique_prefix,
};
use super::status::{S3View, job_view, summary_view};

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// No inline script or style, nothing from another origin, no framing.
const CSP: &str = "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; \
                   style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
                   form-action 'self'; frame-ancestors 'none'";
/// The header a script or curl sends the token in.
const TOKEN_HEADER: &str = "x-orchgpu-token";
/// The cookie the page sets once the token is entered.
const TOKEN_COOKIE: &str = "orchgpu_token";
/// The header carrying the uploaded file's name, percent-encoded.
const NAME_HEADER: &str = "x-filename";
/// Most recent jobs listed.
const RECENT_JOBS: usize = 30;
/// Largest detections file read into a job's view.
const DETECTIONS_MAX: usize = 64 * 1024;
/// Largest body of a token request.
const SESSION_MAX: usize = 1024;

/// What the page needs from the daemon's configuration and clients.
pub struct WebSettings {
    pub s3: aws_sdk_s3::Client,
    /// Where uploads go; `None`: the page shows jobs only.
    pub upload_to: Option<BucketDir>,
    pub upload_max_bytes: u64,
    /// The token the API asks for, if any.
    pub token: Option<String>,
    pub output: BucketDir,
    pub result_suffix: String,
    /// The claims to look at for jobs other daemons run.
    pub claims: Option<Claims>,
    /// Where the job history is.
    pub state_dir: PathBuf,
    /// Where an upload waits on disk before it goes to S3.
    pub work_dir: PathBuf,
}

type Web = Arc<WebSettings>;

/// The page's routes with their guard, to merge into the listener's router.
pub fn router(settings: WebSettings) -> Router {
    let web: Web = Arc::new(settings);
    Router::new()
        .route("/", get(index))
        .route("/assets/app.js", get(app_js))
        .route("/assets/style.css", get(style_css))
        .route("/api/config", get(config))
        .route("/api/session", post(session))
        .route("/api/jobs", get(jobs))
        .route("/api/jobs/{id}", get(job))
        .route("/api/uploads", post(upload))
        .route("/results/{file}", get(result))
        .layer(middleware::from_fn_with_state(web.clone(), guard))
        .with_state(web)
}

/// Refuses cross-site writes and, with a token configured, API and result requests
/// without it; adds the security headers to every answer.
async fn guard(State(web): State<Web>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let path = request.uri().path();
    let writes = !matches!(*request.method(), Method::GET | Method::HEAD);
    let mut response = if writes
        && !same_origin(
            header_str(headers, "sec-fetch-site"),
            header_str(headers, header::ORIGIN.as_str()),
            header_str(headers, header::HOST.as_str()),
        ) {
        error(StatusCode::FORBIDDEN, "cross-site requests are refused")
    } else if needs_token(path) && !authorized(&web, headers) {
        error(
            StatusCode::UNAUTHORIZED,
            "a token is needed: enter it on the page, or send it in the X-Orchgpu-Token header",
        )
    } else {
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
/// of the API and the results need the token when one is set.
fn needs_token(path: &str) -> bool {
    (path.starts_with("/api/") && path != "/api/config" && path != "/api/session")
        || path.starts_with("/results/")
}

fn authorized(web: &WebSettings, headers: &HeaderMap) -> bool {
    let Some(expected) = &web.token else {
        return true;
    };
    if let Some(presented) = header_str(headers, TOKEN_HEADER) {
        return token_matches(presented, expected);
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(name, _)| *name == TOKEN_COOKIE)
        .any(|(_, value)| {
            let value = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
            token_matches(&value, expected)
        })
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn error(status: StatusCode, message: &str) -> Response {
    json(status, serde_json::json!({ "error": message }))
}

fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
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
    json(
        StatusCode::OK,
        serde_json::json!({
            "uploads": web.upload_to.is_some(),
            "upload_max_bytes": web.upload_max_bytes,
            "token_required": web.token.is_some(),
            "authorized": authorized(&web, &headers),
            "result_suffix": web.result_suffix,
        }),
    )
}

/// Takes the token as the body and, when it is right, sets it as an HTTP-only,
/// same-site cookie so that the page's requests (images included) carry it.
async fn session(State(web): State<Web>, body: Body) -> Response {
    let Some(expected) = &web.token else {
        return StatusCode::NO_CONTENT.into_response();
    };
    let Ok(bytes) = axum::body::to_bytes(body, SESSION_MAX).await else {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "the token is too long");
    };
    let presented = String::from_utf8_lossy(&bytes);
    if !token_matches(presented.trim(), expected) {
        return error(StatusCode::UNAUTHORIZED, "wrong token");
    }
    let value: String =
        percent_encoding::utf8_percent_encode(expected, percent_encoding::NON_ALPHANUMERIC)
            .collect();
    let cookie = format!("{TOKEN_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict");
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

async fn jobs(State(web): State<Web>) -> Response {
    let filter = ListFilter {
        limit: RECENT_JOBS,
        ..ListFilter::default()
    };
    let listed = read_history(web.state_dir.clone(), move |r| r.list(&filter)).await;
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

async fn job(State(web): State<Web>, Path(id): Path<String>) -> Response {
    if !is_job_id(&id) {
        return error(StatusCode::NOT_FOUND, "not a job id");
    }
    let wanted = id.clone();
    let history = read_history(web.state_dir.clone(), move |r| r.show(&wanted))
        .await
        .flatten()
        .filter(|detail| detail.job.job_id == id);
    let result_key = web.output.key_for(&format!("{id}{}", web.result_suffix));
    let result = match storage::object_exists(&web.s3, &web.output.bucket, &result_key).await {
        Ok(found) => found,
        Err(e) => {
            warn!(error = %error_chain(&e), "Web: cannot check for a result.");
            return error(StatusCode::BAD_GATEWAY, "cannot reach the output bucket");
        }
    };
    let mut s3 = S3View {
        result,
        ..S3View::default()
    };
    if result {
        let text_key = web.output.key_for(&format!("{id}.txt"));
        s3.detections = fetch_small(&web.s3, &web.output.bucket, &text_key)
            .await
            .map(|text| parse_detections(&text));
    } else if let Some(claims) = &web.claims {
        s3.claim = claims.peek(&id).await.unwrap_or_else(|e| {
            warn!(error = %error_chain(&e), "Web: cannot read a claim.");
            None
        });
    }
    let view = job_view(
        &id,
        history.as_ref(),
        s3,
        Timestamp::from_system(SystemTime::now()),
    );
    match serde_json::to_value(view) {
        Ok(body) => json(StatusCode::OK, body),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the job"),
    }
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

/// `GET /results/<job id><suffix>` and `/results/<job id>.txt`, streamed from the output
/// bucket. Only a well-formed job id reaches S3.
async fn result(State(web): State<Web>, Path(file): Path<String>) -> Response {
    let (id, content_type) = if let Some(id) = file.strip_suffix(".txt") {
        (id, "text/plain; charset=utf-8")
    } else if let Some(id) = file.strip_suffix(web.result_suffix.as_str()) {
        (id, result_type(&web.result_suffix))
    } else {
        return error(StatusCode::NOT_FOUND, "no such result");
    };
    if !is_job_id(id) {
        return error(StatusCode::NOT_FOUND, "no such result");
    }
    let key = web.output.key_for(&file);
    let output = match web
        .s3
        .get_object()
        .bucket(&web.output.bucket)
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
    if content_type == "application/octet-stream" {
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

/// The content type of a result with this suffix; anything but an image is downloaded.
fn result_type(suffix: &str) -> &'static str {
    match suffix.to_ascii_lowercase().as_str() {
        ".png" => "image/png",
        ".jpg" | ".jpeg" => "image/jpeg",
        _ => "application/octet-stream",
    }
}

/// The content type an upload is stored with: an image type the browser named, else
/// bytes.
fn upload_type(headers: &HeaderMap) -> &'static str {
    const IMAGES: [&str; 6] = [
        "image/jpeg",
        "image/png",
        "image/gif",
        "image/bmp",
        "image/webp",
        "image/tiff",
    ];
    let named = header_str(headers, header::CONTENT_TYPE.as_str()).unwrap_or("");
    IMAGES
        .into_iter()
        .find(|t| named.eq_ignore_ascii_case(t))
        .unwrap_or("application/octet-stream")
}

/// `POST /api/uploads`: the raw file as the body, its name percent-encoded in
/// `X-Filename`. Streams it to a temp file in the work dir (refusing it as soon as it
/// passes the limit), uploads it to `--upload-to` under a clean, unique key, and answers
/// the job id the notification will get.
async fn upload(State(web): State<Web>, headers: HeaderMap, body: Body) -> Response {
    let Some(dest) = &web.upload_to else {
        return error(
            StatusCode::NOT_FOUND,
            "uploads are off: orchgpu runs without --upload-to",
        );
    };
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the file is larger than {} bytes", web.upload_max_bytes),
        )
    };
    let declared =
        header_str(&headers, header::CONTENT_LENGTH.as_str()).and_then(|n| n.parse::<u64>().ok());
    if declared.is_some_and(|n| n > web.upload_max_bytes) {
        return too_large();
    }
    let raw_name = header_str(&headers, NAME_HEADER).unwrap_or("");
    let name =
        sanitise_file_name(&percent_encoding::percent_decode_str(raw_name).decode_utf8_lossy());

    let temp = match tempfile::Builder::new()
        .prefix("web-upload.")
        .tempfile_in(&web.work_dir)
    {
        Ok(temp) => temp,
        Err(e) => {
            warn!(error = %e, "Web: cannot make a temp file for an upload.");
            return error(StatusCode::INTERNAL_SERVER_ERROR, "cannot store the upload");
        }
    };
    let mut file = match temp.as_file().try_clone() {
        Ok(file) => tokio::fs::File::from_std(file),
        Err(e) => {
            warn!(error = %e, "Web: cannot open the upload's temp file.");
            return error(StatusCode::INTERNAL_SERVER_ERROR, "cannot store the upload");
        }
    };
    let mut bytes: u64 = 0;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            return error(StatusCode::BAD_REQUEST, "the upload was cut off");
        };
        bytes += chunk.len() as u64;
        if bytes > web.upload_max_bytes {
            return too_large();
        }
        if let Err(e) = file.write_all(&chunk).await {
            warn!(error = %e, "Web: cannot write an upload to disk.");
            return error(StatusCode::INTERNAL_SERVER_ERROR, "cannot store the upload");
        }
    }
    if let Err(e) = file.flush().await {
        warn!(error = %e, "Web: cannot write an upload to disk.");
        return error(StatusCode::INTERNAL_SERVER_ERROR, "cannot store the upload");
    }
    if bytes == 0 {
        return error(StatusCode::BAD_REQUEST, "the file is empty");
    }

    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let key = dest.key_for(&format!(
        "{}-{name}",
        unique_prefix(unix, fastrand::u32(..))
    ));
    if let Err(e) = storage::upload_file(
        &web.s3,
        temp.path(),
        &dest.bucket,
        &key,
        upload_type(&headers),
    )
    .await
    {
        warn!(error = %error_chain(&e), "Web: cannot upload to the input bucket.");
        return error(StatusCode::BAD_GATEWAY, "cannot upload to the input bucket");
    }
    // The job id comes from the object's ETag (or version) as S3 reports it, exactly as
    // the notification will carry it.
    let head = match web
        .s3
        .head_object()
        .bucket(&dest.bucket)
        .key(&key)
        .send()
        .await
    {
        Ok(head) => head,
        Err(e) => {
            warn!(error = %error_chain(&e), "Web: cannot read back an upload.");
            return error(StatusCode::BAD_GATEWAY, "cannot read back the upload");
        }
    };
    let object = ObjectRef {
        bucket: dest.bucket.clone(),
        key: key.clone(),
        size: Some(bytes),
        etag: head.e_tag.map(|t| t.trim_matches('"').to_string()),
        version_id: head.version_id.filter(|v| v != "null"),
        event_name: "ObjectCreated:Put".to_string(),
        event_time: None,
    };
    let job_id = JobId::derive(&object);
    info!(job_id = %job_id, bucket = %dest.bucket, key = %key, bytes, "Web upload stored.");
    json(
        StatusCode::CREATED,
        serde_json::json!({ "job_id": job_id.as_str(), "key": key, "name": name, "bytes": bytes }),
    )
}
