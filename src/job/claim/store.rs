//! Where claims are kept: a store of small objects with conditional writes. `S3Store` is
//! the real one (`PutObject` with `If-None-Match` / `If-Match`); the tests use an
//! in-memory one with the same semantics.

use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::primitives::ByteStream;

use super::{BoxError, BoxFuture, ClaimError, Stored};

/// The outcome of a conditional write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Put {
    /// Written; the object's new ETag.
    Written(String),
    /// The condition did not hold (412 `PreconditionFailed`, 409
    /// `ConditionalRequestConflict`, or no object for `If-Match`).
    Conflict,
}

/// Where claims are kept: four operations on one key each. `S3Store` is the real one;
/// tests use an in-memory store.
pub(crate) trait ClaimStore: Send + Sync {
    /// Writes `body` at `key` only if no object is there (`If-None-Match: *`).
    fn create<'a>(&'a self, key: &'a str, body: Vec<u8>) -> BoxFuture<'a, Result<Put, ClaimError>>;
    /// Writes `body` at `key` only if the object there has ETag `etag` (`If-Match`).
    fn replace<'a>(
        &'a self,
        key: &'a str,
        etag: &'a str,
        body: Vec<u8>,
    ) -> BoxFuture<'a, Result<Put, ClaimError>>;
    /// Reads the object at `key`: its ETag and body, or `None` when there is none.
    fn read<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Stored>, ClaimError>>;
    /// Deletes the object at `key`, whatever it holds.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), ClaimError>>;
    /// The keys of every object under `prefix` (the schedule's pass over the claims).
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, ClaimError>>;
}
/// Claims as objects of one S3 bucket.
pub(crate) struct S3Store {
    s3: aws_sdk_s3::Client,
    bucket: String,
}

impl S3Store {
    pub(crate) fn new(s3: aws_sdk_s3::Client, bucket: String) -> S3Store {
        S3Store { s3, bucket }
    }

    fn error(&self, op: &'static str, key: &str, source: BoxError) -> ClaimError {
        ClaimError::Store {
            op,
            bucket: self.bucket.clone(),
            key: key.to_string(),
            source,
        }
    }

    async fn put(
        &self,
        key: &str,
        condition: Condition<'_>,
        body: Vec<u8>,
    ) -> Result<Put, ClaimError> {
        let request = self
            .s3
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/json")
            .body(ByteStream::from(body));
        let request = match condition {
            Condition::Absent => request.if_none_match("*"),
            Condition::Matches(etag) => request.if_match(quoted(etag)),
        };
        match request.send().await {
            Ok(output) => Ok(Put::Written(unquoted(
                output.e_tag.as_deref().unwrap_or(""),
            ))),
            Err(SdkError::ServiceError(e))
                if is_conflict(e.raw().status().as_u16(), e.err().meta().code()) =>
            {
                Ok(Put::Conflict)
            }
            Err(e) => Err(self.error("write", key, e.into())),
        }
    }
}

enum Condition<'a> {
    Absent,
    Matches(&'a str),
}

/// 412: the condition failed; 409: a concurrent conditional write won; 404 `NoSuchKey`:
/// `If-Match` on an object that is gone (a 404 for a missing bucket is an error).
fn is_conflict(status: u16, code: Option<&str>) -> bool {
    match status {
        409 | 412 => true,
        404 => code != Some("NoSuchBucket"),
        _ => false,
    }
}

fn quoted(etag: &str) -> String {
    format!("\"{}\"", unquoted(etag))
}

fn unquoted(etag: &str) -> String {
    etag.trim_matches('"').to_string()
}

impl ClaimStore for S3Store {
    fn create<'a>(&'a self, key: &'a str, body: Vec<u8>) -> BoxFuture<'a, Result<Put, ClaimError>> {
        Box::pin(self.put(key, Condition::Absent, body))
    }

    fn replace<'a>(
        &'a self,
        key: &'a str,
        etag: &'a str,
        body: Vec<u8>,
    ) -> BoxFuture<'a, Result<Put, ClaimError>> {
        Box::pin(self.put(key, Condition::Matches(etag), body))
    }

    fn read<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Stored>, ClaimError>> {
        Box::pin(async move {
            let output = match self
                .s3
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
            {
                Ok(output) => output,
                Err(SdkError::ServiceError(e)) if e.err().is_no_such_key() => return Ok(None),
                Err(e) => return Err(self.error("read", key, e.into())),
            };
            let etag = unquoted(output.e_tag.as_deref().unwrap_or(""));
            let body = output
                .body
                .collect()
                .await
                .map_err(|e| self.error("read", key, e.into()))?
                .into_bytes();
            Ok(Some((etag, body.to_vec())))
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, ClaimError>> {
        Box::pin(async move {
            let mut keys = Vec::new();
            let mut pages = self
                .s3
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| self.error("list", prefix, e.into()))?;
                keys.extend(
                    page.contents
                        .unwrap_or_default()
                        .into_iter()
                        .filter_map(|o| o.key),
                );
            }
            Ok(keys)
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), ClaimError>> {
        Box::pin(async move {
            self.s3
                .delete_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| self.error("delete", key, e.into()))?;
            Ok(())
        })
    }
}
