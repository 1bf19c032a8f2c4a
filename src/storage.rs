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
    Download {
        bucket: String,
        key: String,
        #[source]
        source: BoxError,
    },
    #[error("failed to write the download of s3://{bucket}/{key} to disk")]
    WriteLocal {
        bucket: String,
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to upload {path} to s3://{bucket}/{key}")]
    Upload {
        path: String,
        bucket: String,
        key: String,
        #[source]
        source: BoxError,
    },
    #[error("failed to check s3://{bucket}/{key}")]
    Head {
        bucket: String,
        key: String,
        #[source]
        source: BoxError,
    },
}

/// A downloaded object's facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    pub size: u64,
    pub etag: Option<String>,
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
    let download_error = |source: BoxError| StorageError::Download {
        bucket: bucket.to_string(),
        key: key.to_string(),
        source,
    };
    let write_error = |source: std::io::Error| StorageError::WriteLocal {
        bucket: bucket.to_string(),
        key: key.to_string(),
        source,
    };
    let output = match s3.get_object().bucket(bucket).key(key).send().await {
        Ok(output) => output,
        Err(SdkError::ServiceError(e)) if e.err().is_no_such_key() => return Ok(None),
        Err(e) => return Err(download_error(e.into())),
    };
    let etag = output.e_tag.map(|t| t.trim_matches('"').to_string());
    let expected = output.content_length.and_then(|n| u64::try_from(n).ok());
    let mut reader = output.body.into_async_read();
    let mut out = tokio::fs::File::create(file).await.map_err(write_error)?;
    // Copy errors may come from either side; the reader's are S3's.
    let size = tokio::io::copy_buf(&mut reader, &mut out)
        .await
        .map_err(|e| download_error(e.into()))?;
    out.flush().await.map_err(write_error)?;
    if let Some(expected) = expected
        && expected != size
    {
        return Err(download_error(
            format!("got {size} bytes, Content-Length said {expected}").into(),
        ));
    }
    Ok(Some(Downloaded { size, etag }))
}

/// Uploads a file to `s3://bucket/key`, streaming it from disk.
///
/// # Errors
/// `StorageError::Upload`.
pub async fn upload_file(
    s3: &aws_sdk_s3::Client,
    path: &Path,
    bucket: &str,
    key: &str,
    content_type: &str,
) -> Result<(), StorageError> {
    let upload_error = |source: BoxError| StorageError::Upload {
        path: path.display().to_string(),
        bucket: bucket.to_string(),
        key: key.to_string(),
        source,
    };
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
    Ok(())
}

/// Whether `s3://bucket/key` exists (a HEAD request, never a listing).
///
/// # Errors
/// `StorageError::Head` for anything but "not found".
pub async fn object_exists(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
) -> Result<bool, StorageError> {
    match s3.head_object().bucket(bucket).key(key).send().await {
        Ok(_) => Ok(true),
        Err(SdkError::ServiceError(e)) if e.err().is_not_found() => Ok(false),
        Err(e) => Err(StorageError::Head {
            bucket: bucket.to_string(),
            key: key.to_string(),
            source: e.into(),
        }),
    }
}
