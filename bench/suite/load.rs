//! The load: deterministic incompressible inputs and puts of many of them at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};
use aws_sdk_s3::primitives::ByteStream;
use orchgpu::aws::AwsClients;

/// Deterministic incompressible bytes (xorshift), so gzip does real work.
pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Puts `body` as `bucket/key`.
pub(crate) async fn put_bytes(
    aws: &AwsClients,
    bucket: &str,
    key: &str,
    body: Vec<u8>,
) -> Result<()> {
    aws.s3
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(body))
        .send()
        .await
        .with_context(|| format!("put {bucket}/{key}"))?;
    Ok(())
}

/// Puts `count` objects with `concurrency` in flight; returns when all are in.
pub(crate) async fn put_many(
    aws: &AwsClients,
    bucket: &str,
    prefix: &str,
    count: usize,
    size: usize,
    concurrency: usize,
) -> Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (aws, bucket, prefix, next) = (
            aws.clone(),
            bucket.to_string(),
            prefix.to_string(),
            next.clone(),
        );
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, anyhow::Error>(());
                }
                let body = pseudo_random(size, i as u64 + 1);
                put_bytes(&aws, &bucket, &format!("{prefix}{i:05}.jpg"), body).await?;
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(())
}
