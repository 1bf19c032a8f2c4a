//! Large bundles go up as multipart uploads, byte for byte, with nothing left behind.

use anyhow::Result;
use orchgpu::aws::metrics::RequestCounter;
use orchgpu::aws::storage;

use crate::harness::emulator_config;

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_upload_round_trips_byte_for_byte() -> Result<()> {
    // The daemon's S3 settings (see aws.rs), with the emulator's dummy credentials.
    let requests = RequestCounter::new();
    let shared = emulator_config().await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(true)
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            )
            .interceptor(requests.interceptor())
            .build(),
    );
    let bucket = format!("mpu-{}", std::process::id());
    s3.create_bucket().bucket(&bucket).send().await?;

    // Three parts of 5 MiB (S3's smallest) and a short last one: 15 MiB + 4321 bytes.
    let len = (15 * MIB + 4321) as usize;
    let mut body = Vec::with_capacity(len);
    let mut x: u32 = 12345;
    while body.len() < len {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        body.push((x >> 16) as u8);
    }
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bundle.tar.gz");
    std::fs::write(&path, &body)?;

    storage::upload_file_with(
        &s3,
        &path,
        &bucket,
        "big/bundle.tar.gz",
        "application/gzip",
        5 * MIB,
        5 * MIB,
    )
    .await?;
    assert_eq!(requests.get("S3.CreateMultipartUpload"), 1);
    assert_eq!(requests.get("S3.UploadPart"), 4);
    assert_eq!(requests.get("S3.CompleteMultipartUpload"), 1);
    assert_eq!(requests.get("S3.PutObject"), 0);

    let back = dir.path().join("back");
    let downloaded = storage::download_to_file(&s3, &bucket, "big/bundle.tar.gz", &back).await?;
    assert_eq!(downloaded.map(|d| d.size), Some(len as u64));
    assert!(std::fs::read(&back)? == body, "downloaded bytes differ");

    let pending = s3.list_multipart_uploads().bucket(&bucket).send().await?;
    assert!(
        pending.uploads.unwrap_or_default().is_empty(),
        "unfinished multipart uploads left behind"
    );

    // A small file still goes up in one PutObject.
    std::fs::write(&path, b"small")?;
    storage::upload_file(&s3, &path, &bucket, "small", "text/plain").await?;
    assert_eq!(requests.get("S3.PutObject"), 1);
    Ok(())
}
