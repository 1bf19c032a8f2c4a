//! The upload: a file from the page streamed to the work dir, bounded by size, by a
//! disk budget and by how many run at once, then put in the input bucket.

use super::names::{sanitise_file_name, unique_prefix};
use crate::aws::error_chain;
use crate::aws::storage;
use crate::job::JobId;
use crate::job::event::ObjectRef;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use futures_util::StreamExt;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use super::routes::*;

/// The content type an upload is stored with: an image type the browser named, else
/// bytes.
pub(super) fn upload_type(headers: &HeaderMap) -> &'static str {
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

/// The bytes of the work dir that uploads in progress hold, against their budget.
pub(super) struct DiskBudget {
    pub(super) held: AtomicU64,
    limit: u64,
}

/// Bytes taken from a `DiskBudget`, given back on drop.
pub(super) struct Taken<'a> {
    budget: &'a DiskBudget,
    bytes: u64,
}

impl DiskBudget {
    pub(super) fn new(limit: u64) -> Self {
        DiskBudget {
            held: AtomicU64::new(0),
            limit,
        }
    }

    /// Nothing taken yet.
    pub(super) fn start(&self) -> Taken<'_> {
        Taken {
            budget: self,
            bytes: 0,
        }
    }
}

impl Taken<'_> {
    /// Holds `total` bytes in all (more than now); `false`, holding what it held, when
    /// that would pass the budget.
    pub(super) fn grow_to(&mut self, total: u64) -> bool {
        let more = total.saturating_sub(self.bytes);
        let budget = self.budget;
        let granted = budget
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(more)
                    .filter(|after| *after <= budget.limit)
            })
            .is_ok();
        if granted {
            self.bytes += more;
        }
        granted
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

pub(super) fn no_room() -> Response {
    error(
        StatusCode::INSUFFICIENT_STORAGE,
        "orchgpu has no room for this upload right now: other uploads fill its disk budget; \
         try again in a minute",
    )
}

/// `POST /api/uploads`: the raw file as the body, its name percent-encoded in
/// `X-Filename`. Takes an upload slot (429 when none is free) and disk budget (507),
/// streams the body to a temp file in the work dir (refusing it as soon as it passes the
/// limit), uploads it to `--upload-to` under a clean, unique key, and answers the upload's
/// handle (and the job id the notification will get).
pub(super) async fn upload(State(web): State<Web>, headers: HeaderMap, body: Body) -> Response {
    let s = &web.settings;
    let Some(dest) = &s.upload_to else {
        return error(
            StatusCode::NOT_FOUND,
            "uploads are off: orchgpu runs without --upload-to",
        );
    };
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the file is larger than {} bytes", s.upload_max_bytes),
        )
    };
    let declared =
        header_str(&headers, header::CONTENT_LENGTH.as_str()).and_then(|n| n.parse::<u64>().ok());
    if declared.is_some_and(|n| n > s.upload_max_bytes) {
        return too_large();
    }
    let Ok(_slot) = web.uploads.clone().try_acquire_owned() else {
        let mut response = error(
            StatusCode::TOO_MANY_REQUESTS,
            &format!(
                "orchgpu takes {} uploads at once and is busy with them: try again in a moment",
                s.upload_max_concurrent
            ),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return response;
    };
    let mut taken = web.disk.start();
    if !taken.grow_to(declared.unwrap_or(0)) {
        return no_room();
    }
    let raw_name = header_str(&headers, NAME_HEADER).unwrap_or("");
    let name =
        sanitise_file_name(&percent_encoding::percent_decode_str(raw_name).decode_utf8_lossy());

    let temp = match tempfile::Builder::new()
        .prefix("web-upload.")
        .tempfile_in(&s.work_dir)
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
    let received = tokio::time::timeout(UPLOAD_DEADLINE, async {
        let mut bytes: u64 = 0;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "the upload was cut off (or paused too long)",
                ));
            };
            bytes += chunk.len() as u64;
            if bytes > s.upload_max_bytes {
                return Err(too_large());
            }
            if !taken.grow_to(bytes) {
                return Err(no_room());
            }
            if let Err(e) = file.write_all(&chunk).await {
                warn!(error = %e, "Web: cannot write an upload to disk.");
                return Err(error(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "cannot store the upload",
                ));
            }
        }
        if let Err(e) = file.flush().await {
            warn!(error = %e, "Web: cannot write an upload to disk.");
            return Err(error(
                StatusCode::INSUFFICIENT_STORAGE,
                "cannot store the upload",
            ));
        }
        Ok(bytes)
    })
    .await;
    let bytes = match received {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(response)) => return response,
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "the upload took too long; try again on a faster connection",
            );
        }
    };
    if bytes == 0 {
        return error(StatusCode::BAD_REQUEST, "the file is empty");
    }

    let key = dest.key_for(&format!(
        "{}-{name}",
        unique_prefix(unix_now(), fastrand::u32(..))
    ));
    if let Err(e) = storage::upload_file(
        &s.s3,
        temp.path(),
        &dest.bucket,
        &key,
        upload_type(&headers),
    )
    .await
    {
        warn!(error = %error_chain(&e), "Web: cannot upload to the input bucket.");
        return error(StatusCode::BAD_GATEWAY, "cannot store the upload in S3");
    }
    drop(temp);
    drop(taken);
    // The job id comes from the object's ETag (or version) as S3 reports it, exactly as
    // the notification will carry it.
    let head = match s
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
            return error(
                StatusCode::BAD_GATEWAY,
                "cannot read back the upload from S3",
            );
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
        serde_json::json!({
            "handle": web.keys.handle(job_id.as_str()),
            "job_id": job_id.as_str(),
            "key": key,
            "name": name,
            "bytes": bytes,
        }),
    )
}
