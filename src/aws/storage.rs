//! S3 transfers a job needs: download an input to a file, upload a bundle from a file, and
//! check whether a result object exists.
//!
//! Everything streams between the network and disk, so memory does not grow with object
//! size. "The object is not there" is a distinct outcome, not an error.

use std::path::Path;

use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::primitives::ByteStream;
use tokio::io::AsyncWriteExt;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong with an S3 transfer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("failed to download s3://{bucket}/{key}")]
    /// S3 refused or broke off a download.
    Download {
        /// The bucket.
        bucket: String,
        /// The object's key.
        key: String,
        #[source]
        /// What went wrong underneath.
        source: BoxError,
    },
    #[error("failed to write the download of s3://{bucket}/{key} to disk")]
    /// A download could not be written to disk.
    WriteLocal {
        /// The bucket.
        bucket: String,
        /// The object's key.
        key: String,
        #[source]
        /// What went wrong underneath.
        source: std::io::Error,
    },
    #[error("failed to upload {path} to s3://{bucket}/{key}")]
    /// An upload failed.
    Upload {
        /// The file or directory.
        path: String,
        /// The bucket.
        bucket: String,
        /// The object's key.
        key: String,
        #[source]
        /// What went wrong underneath.
        source: BoxError,
    },
    #[error("failed to check s3://{bucket}/{key}")]
    /// A HEAD failed for another reason than a missing object.
    Head {
        /// The bucket.
        bucket: String,
        /// The object's key.
        key: String,
        #[source]
        /// What went wrong underneath.
        source: BoxError,
    },
}

/// Largest write buffered at once while saving a download.
const WRITE_BUFFER: usize = 64 * 1024;

/// A downloaded object's facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    /// Bytes written.
    pub size: u64,
    pub(crate) etag: Option<String>,
}

/// Which version of an object a download must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pin<'a> {
    /// Whatever the key holds now.
    Latest,
    /// This version id (a versioned bucket).
    Version(&'a str),
    /// The object only while its ETag is this one (`If-Match`).
    ETag(&'a str),
}

/// The outcome of a pinned download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fetched {
    /// Downloaded.
    Object(Downloaded),
    /// No such object (or version).
    Missing,
    /// The object is there but no longer the pinned one (412 on `If-Match`).
    Changed,
}

/// Downloads `s3://bucket/key` into `file` (truncating it). Returns `Ok(None)` when the
/// object does not exist.
///
/// # Errors
/// `StorageError::Download` for S3 errors (including a body cut short),
/// `StorageError::WriteLocal` for disk errors.
pub async fn download_to_file(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    file: &Path,
) -> Result<Option<Downloaded>, StorageError> {
    match download_pinned(s3, bucket, key, Pin::Latest, file).await? {
        Fetched::Object(downloaded) => Ok(Some(downloaded)),
        Fetched::Missing | Fetched::Changed => Ok(None),
    }
}

/// Downloads exactly the `pin`ned version of `s3://bucket/key` into `file`: the GET
/// (`open_pinned`), then its body to disk (`Opened::save_to`).
///
/// # Errors
/// As `download_to_file`.
pub(crate) async fn download_pinned(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    pin: Pin<'_>,
    file: &Path,
) -> Result<Fetched, StorageError> {
    match open_pinned(s3, bucket, key, pin).await? {
        Answer::Object(opened) => Ok(Fetched::Object(opened.save_to(file).await?)),
        Answer::Missing => Ok(Fetched::Missing),
        Answer::Changed => Ok(Fetched::Changed),
    }
}

/// What S3 answered to a pinned GET, before its body is read.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "returned once per job and unpacked at once; nothing keeps it"
)]
pub(crate) enum Answer {
    /// The pinned object is there; its body is still to be read.
    Object(Opened),
    /// No such object (or version).
    Missing,
    /// The object is there but is not the pinned one.
    Changed,
}

/// An object whose GET has answered: its headers are in hand, its body not yet read.
#[derive(Debug)]
pub(crate) struct Opened {
    bucket: String,
    key: String,
    etag: Option<String>,
    /// `Content-Length`, when S3 sent one.
    expected: Option<u64>,
    body: ByteStream,
}

/// Sends the GET for exactly the `pin`ned version of `s3://bucket/key` and returns once
/// S3 has answered (its status and headers), before the body is read: a caller can
/// tell an object that is there from one that is not without waiting for its bytes.
///
/// The answer is accepted only as the object the pin names. An ETag pin is sent as
/// `If-Match` (S3 answers 412 for another object) *and* the answer's ETag is compared
/// with it; a version pin asks for that version and compares the answer's
/// `x-amz-version-id` when S3 sends one. A store that ignores `If-Match` therefore still
/// cannot hand over another object under the event's name.
///
/// # Errors
/// `StorageError::Download` for S3 errors other than "not there" and "not this one".
pub(crate) async fn open_pinned(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    pin: Pin<'_>,
) -> Result<Answer, StorageError> {
    let request = s3.get_object().bucket(bucket).key(key);
    let request = match pin {
        Pin::Latest => request,
        Pin::Version(version) => request.version_id(version),
        Pin::ETag(etag) => request.if_match(format!("\"{}\"", etag.trim_matches('"'))),
    };
    // Boxed: the SDK's send future is large, and a job's future would otherwise keep
    // room for it while the job waits for its result.
    let output = match Box::pin(request.send()).await {
        Ok(output) => output,
        Err(SdkError::ServiceError(e)) if e.err().is_no_such_key() => return Ok(Answer::Missing),
        // A version that is gone answers 404 NoSuchVersion (a modelled error it is not).
        Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 404 => {
            return Ok(Answer::Missing);
        }
        Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 412 => {
            return Ok(Answer::Changed);
        }
        Err(e) => {
            return Err(StorageError::Download {
                bucket: bucket.to_string(),
                key: key.to_string(),
                source: e.into(),
            });
        }
    };
    let etag = output.e_tag.map(|t| t.trim_matches('"').to_string());
    if !answers_pin(pin, etag.as_deref(), output.version_id.as_deref()) {
        return Ok(Answer::Changed);
    }
    Ok(Answer::Object(Opened {
        bucket: bucket.to_string(),
        key: key.to_string(),
        etag,
        expected: output.content_length.and_then(|n| u64::try_from(n).ok()),
        body: output.body,
    }))
}

/// Whether an answer with this ETag and version id is the object `pin` names. What the
/// answer does not say (no ETag, no version id) is not held against it: S3 always sends
/// an ETag, and `If-Match` / `versionId` already asked for the right one.
fn answers_pin(pin: Pin<'_>, etag: Option<&str>, version_id: Option<&str>) -> bool {
    match pin {
        Pin::Latest => true,
        Pin::ETag(wanted) => etag.is_none_or(|got| got == wanted.trim_matches('"')),
        Pin::Version(wanted) => version_id.is_none_or(|got| got == wanted),
    }
}

impl Opened {
    /// Streams the body into `file` (created if needed, its old content cut).
    ///
    /// # Errors
    /// `StorageError::Download` for S3 errors (including a body cut short),
    /// `StorageError::WriteLocal` for disk errors.
    pub(crate) async fn save_to(self, file: &Path) -> Result<Downloaded, StorageError> {
        let Opened {
            bucket,
            key,
            etag,
            expected,
            body,
        } = self;
        let download_error = |source: BoxError| StorageError::Download {
            bucket: bucket.clone(),
            key: key.clone(),
            source,
        };
        let write_error = |source: std::io::Error| StorageError::WriteLocal {
            bucket: bucket.clone(),
            key: key.clone(),
            source,
        };
        let mut reader = body.into_async_read();
        // Not `File::create`: truncating (even an empty file) makes ext4 flush the file to
        // disk when it is closed (its "replace via truncate" heuristic), which costs a
        // write-back per job for a file we delete soon after. A stale tail is cut below.
        let mut out = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(file)
            .await
            .map_err(write_error)?;
        // tokio copies each write into a buffer of up to 2 MiB by default; with many jobs
        // downloading at once that adds up, for no speed gain on a local disk.
        out.set_max_buf_size(WRITE_BUFFER);
        // Copy errors may come from either side; the reader's are S3's.
        let size = tokio::io::copy_buf(&mut reader, &mut out)
            .await
            .map_err(|e| download_error(e.into()))?;
        out.flush().await.map_err(write_error)?;
        out.set_len(size).await.map_err(write_error)?;
        if let Some(expected) = expected
            && expected != size
        {
            return Err(download_error(
                format!("got {size} bytes, Content-Length said {expected}").into(),
            ));
        }
        Ok(Downloaded { size, etag })
    }
}

/// Files up to this size go up in one PutObject; larger ones in a multipart upload.
pub(crate) const MULTIPART_THRESHOLD: u64 = 32 * 1024 * 1024;
/// Size of each part of a multipart upload (the last one may be smaller).
pub(crate) const PART_SIZE: u64 = 16 * 1024 * 1024;
/// Parts of one upload in flight at once.
const PARTS_IN_FLIGHT: usize = 4;
/// Parts in flight at once across the whole process. A part streams from its file, but
/// each connection sending one buffers about half a MiB (the SDK's 64 KiB file reads plus
/// hyper's write queue): without this bound, 20 jobs with large bundles cost 40+ MiB.
static ALL_PARTS_IN_FLIGHT: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(8);

/// Uploads a file to `s3://bucket/key`, streaming it from disk: one PutObject up to
/// `MULTIPART_THRESHOLD`, a multipart upload of `PART_SIZE` parts above it.
///
/// # Errors
/// `StorageError::Upload`. A failed multipart upload is aborted; so is one whose future
/// is dropped (cancel safety: the abort then runs in a background task).
pub async fn upload_file(
    s3: &aws_sdk_s3::Client,
    path: &Path,
    bucket: &str,
    key: &str,
    content_type: &str,
) -> Result<(), StorageError> {
    // Boxed, so that a caller's future keeps a pointer, not the SDK's request futures
    // (several KB): a job's future is as large as its largest stage for its whole life,
    // the wait for its result included. See BENCHMARKS.md, "Memory".
    Box::pin(upload_file_with(
        s3,
        path,
        bucket,
        key,
        content_type,
        MULTIPART_THRESHOLD,
        PART_SIZE,
    ))
    .await
}

/// `upload_file` with explicit limits, so tests can exercise multipart on small files.
///
/// # Errors
/// As `upload_file`.
pub async fn upload_file_with(
    s3: &aws_sdk_s3::Client,
    path: &Path,
    bucket: &str,
    key: &str,
    content_type: &str,
    multipart_threshold: u64,
    part_size: u64,
) -> Result<(), StorageError> {
    let upload_error = |source: BoxError| StorageError::Upload {
        path: path.display().to_string(),
        bucket: bucket.to_string(),
        key: key.to_string(),
        source,
    };
    let size = tokio::fs::metadata(path)
        .await
        .map_err(|e| upload_error(e.into()))?
        .len();
    if size <= multipart_threshold {
        let body = ByteStream::from_path(path)
            .await
            .map_err(|e| upload_error(e.into()))?;
        s3.put_object()
            .bucket(bucket)
            .key(key)
            .content_type(content_type)
            .body(body)
            .send()
            .await
            .map_err(|e| upload_error(e.into()))?;
        return Ok(());
    }
    upload_multipart(s3, path, bucket, key, content_type, size, part_size.max(1))
        .await
        .map_err(upload_error)
}

async fn upload_multipart(
    s3: &aws_sdk_s3::Client,
    path: &Path,
    bucket: &str,
    key: &str,
    content_type: &str,
    size: u64,
    part_size: u64,
) -> Result<(), BoxError> {
    use aws_sdk_s3::types::CompletedMultipartUpload;

    let created = s3
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .content_type(content_type)
        .send()
        .await?;
    let upload_id = created
        .upload_id
        .ok_or("CreateMultipartUpload returned no upload id")?;
    let mut guard = AbortOnDrop {
        s3: s3.clone(),
        bucket: bucket.to_string(),
        key: key.to_string(),
        upload_id: Some(upload_id.clone()),
    };

    let parts = size.div_ceil(part_size);
    let result = upload_parts(s3, path, bucket, key, &upload_id, size, part_size, parts).await;
    let completed = match result {
        Ok(completed) => completed,
        Err(e) => {
            guard.abort_now().await;
            return Err(e);
        }
    };
    let complete = s3
        .complete_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(&upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(completed))
                .build(),
        )
        .send()
        .await;
    match complete {
        Ok(_) => {
            guard.upload_id = None;
            Ok(())
        }
        // A success status whose body did not parse (moto 5.2.1 answers with a root
        // element the SDK refuses): the object may well be complete. Aborting it now
        // would fail (NoSuchUpload) and the job would retry until the dead-letter queue.
        Err(e) if e.raw_response().is_some_and(|r| r.status().is_success()) => {
            if is_complete(s3, bucket, key, size, parts).await {
                tracing::debug!(
                    bucket,
                    key,
                    "Unparseable multipart completion, but the object is complete."
                );
                guard.upload_id = None;
                Ok(())
            } else {
                guard.abort_now().await;
                Err(e.into())
            }
        }
        Err(e) => {
            guard.abort_now().await;
            Err(e.into())
        }
    }
}

/// Whether `s3://bucket/key` is the object a multipart upload of `parts` parts and `size`
/// bytes makes: that size, and an ETag ending in `-<parts>` (S3's multipart ETag).
async fn is_complete(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    size: u64,
    parts: u64,
) -> bool {
    // Boxed for the reason given in `upload_file`: a job polling for its result keeps
    // room for this future between checks.
    match Box::pin(s3.head_object().bucket(bucket).key(key).send()).await {
        Ok(head) => {
            let etag = head.e_tag.as_deref().unwrap_or("").trim_matches('"');
            head.content_length.and_then(|n| u64::try_from(n).ok()) == Some(size)
                && etag_part_count(etag) == Some(parts)
        }
        Err(_) => false,
    }
}

/// The part count of a multipart ETag (`<md5 of md5s>-<parts>`).
fn etag_part_count(etag: &str) -> Option<u64> {
    etag.rsplit_once('-').and_then(|(_, n)| n.parse().ok())
}

/// Uploads the parts, at most `PARTS_IN_FLIGHT` at once, each streamed from its byte
/// range of the file. Returns them in part order.
#[expect(
    clippy::too_many_arguments,
    reason = "one private call site, all plain values"
)]
async fn upload_parts(
    s3: &aws_sdk_s3::Client,
    path: &Path,
    bucket: &str,
    key: &str,
    upload_id: &str,
    size: u64,
    part_size: u64,
    parts: u64,
) -> Result<Vec<aws_sdk_s3::types::CompletedPart>, BoxError> {
    let mut in_flight = tokio::task::JoinSet::new();
    let mut completed = Vec::with_capacity(usize::try_from(parts)?);
    let mut next = 0;
    while next < parts || !in_flight.is_empty() {
        while next < parts && in_flight.len() < PARTS_IN_FLIGHT {
            let offset = next * part_size;
            let length = part_size.min(size - offset);
            let part_number = i32::try_from(next + 1)?;
            in_flight.spawn(upload_part(
                s3.clone(),
                path.to_path_buf(),
                bucket.to_string(),
                key.to_string(),
                upload_id.to_string(),
                part_number,
                offset,
                length,
            ));
            next += 1;
        }
        // Dropping the set on an error (or on cancellation) aborts the other parts.
        match in_flight.join_next().await {
            Some(Ok(Ok(part))) => completed.push(part),
            Some(Ok(Err(e))) => return Err(e),
            Some(Err(join_error)) => return Err(join_error.into()),
            None => break,
        }
    }
    completed.sort_by_key(|part| part.part_number);
    Ok(completed)
}

#[expect(clippy::too_many_arguments, reason = "owned values for a spawned task")]
async fn upload_part(
    s3: aws_sdk_s3::Client,
    path: std::path::PathBuf,
    bucket: String,
    key: String,
    upload_id: String,
    part_number: i32,
    offset: u64,
    length: u64,
) -> Result<aws_sdk_s3::types::CompletedPart, BoxError> {
    let _slot = ALL_PARTS_IN_FLIGHT
        .acquire()
        .await
        .expect("the semaphore is never closed");
    // Streams this part's byte range from the file; nothing is buffered whole.
    let body = ByteStream::read_from()
        .path(&path)
        .offset(offset)
        .length(aws_sdk_s3::primitives::Length::Exact(length))
        .build()
        .await?;
    let output = s3
        .upload_part()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .part_number(part_number)
        .content_length(i64::try_from(length)?)
        .body(body)
        .send()
        .await?;
    // ETags only: LocalStack refuses per-part checksums on an upload created without a
    // checksum algorithm.
    Ok(aws_sdk_s3::types::CompletedPart::builder()
        .part_number(part_number)
        .set_e_tag(output.e_tag)
        .build())
}

/// Aborts an unfinished multipart upload, so its parts do not linger (and cost) in S3.
struct AbortOnDrop {
    s3: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    upload_id: Option<String>,
}

impl AbortOnDrop {
    async fn abort_now(&mut self) {
        if let Some(upload_id) = self.upload_id.take() {
            abort(&self.s3, &self.bucket, &self.key, &upload_id).await;
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(upload_id) = self.upload_id.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let (s3, bucket, key) = (self.s3.clone(), self.bucket.clone(), self.key.clone());
            runtime.spawn(async move { abort(&s3, &bucket, &key, &upload_id).await });
        }
    }
}

async fn abort(s3: &aws_sdk_s3::Client, bucket: &str, key: &str, upload_id: &str) {
    let result = s3
        .abort_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .send()
        .await;
    if let Err(e) = result {
        tracing::warn!(
            bucket,
            key,
            error = %crate::aws::error_chain(&e),
            "Cannot abort a failed multipart upload; a bucket lifecycle rule will have to."
        );
    }
}

/// Whether `s3://bucket/key` exists (a HEAD request, never a listing).
///
/// # Errors
/// `StorageError::Head` for anything but "not found".
pub(crate) async fn object_exists(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
) -> Result<bool, StorageError> {
    // Boxed for the reason given in `upload_file`: a job polling for its result keeps
    // room for this future between checks.
    match Box::pin(s3.head_object().bucket(bucket).key(key).send()).await {
        Ok(_) => Ok(true),
        Err(SdkError::ServiceError(e)) if e.err().is_not_found() => Ok(false),
        Err(e) => Err(StorageError::Head {
            bucket: bucket.to_string(),
            key: key.to_string(),
            source: e.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_etags_name_their_part_count() {
        assert_eq!(
            etag_part_count("3858f62230ac3c915f300c664312c11f-9"),
            Some(9)
        );
        assert_eq!(etag_part_count("d41d8cd98f00b204e9800998ecf8427e"), None);
        assert_eq!(etag_part_count("abc-x"), None);
    }

    #[test]
    fn an_answer_is_accepted_only_as_the_pinned_object() {
        let etag = "3858f62230ac3c915f300c664312c11f";
        assert!(answers_pin(Pin::ETag(etag), Some(etag), None));
        // The event's ETag may come quoted.
        assert!(answers_pin(
            Pin::ETag("\"3858f62230ac3c915f300c664312c11f\""),
            Some(etag),
            None
        ));
        // A store that ignored If-Match and sent another object.
        assert!(!answers_pin(
            Pin::ETag(etag),
            Some("d41d8cd98f00b204e9800998ecf8427e"),
            None
        ));
        assert!(answers_pin(Pin::Version("v1"), Some(etag), Some("v1")));
        assert!(!answers_pin(Pin::Version("v1"), Some(etag), Some("v2")));
        assert!(answers_pin(Pin::Latest, Some(etag), Some("v2")));
    }
}
