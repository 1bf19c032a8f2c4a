//! Real inference end to end: LocalStack, the mock SSGM, the real orchgpu and the function
//! stand-in running the real `scar/yolo/detect.sh` with Debian's darknet and the YOLOv3-tiny
//! weights. `dev/install-darknet.sh` installs both; without them these tests fail (they
//! are not skipped), saying so.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::harness::{MockSsgm, Stack, repo_path, wait_for};

pub const DARKNET_HOME: &str = "/usr/share/darknet";

/// The weights dev/fetch-weights.sh leaves, after checking that darknet is installed.
pub fn weights() -> Result<PathBuf> {
    let hint = "run dev/install-darknet.sh (apt-get install darknet netpbm, then the weights)";
    let darknet = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("darknet"))
        .find(|path| path.is_file());
    if darknet.is_none() {
        bail!("darknet is not installed: {hint}");
    }
    for file in ["cfg/yolov3-tiny.cfg", "cfg/coco.data", "data/coco.names"] {
        let path = PathBuf::from(DARKNET_HOME).join(file);
        if !path.is_file() {
            bail!("{} is missing: {hint}", path.display());
        }
    }
    let cache = match std::env::var_os("ORCHGPU_WEIGHTS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
            .join(".cache/orchgpu/weights"),
    };
    let weights = cache.join("yolov3-tiny.weights");
    let size = std::fs::metadata(&weights).map(|m| m.len()).unwrap_or(0);
    if size != 35_434_956 {
        bail!(
            "the YOLOv3-tiny weights are not at {} ({size} bytes): {hint}",
            weights.display()
        );
    }
    Ok(weights)
}

/// Width and height from a JPEG's start-of-frame marker.
fn jpeg_size(jpeg: &[u8]) -> Result<(u32, u32)> {
    if jpeg.get(..2) != Some(&[0xFF, 0xD8]) {
        bail!("not a JPEG");
    }
    let mut at = 2;
    while at + 9 < jpeg.len() {
        if jpeg[at] != 0xFF {
            bail!("bad JPEG marker at {at}");
        }
        let marker = jpeg[at + 1];
        let length = usize::from(u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]));
        // SOF0..SOF15, except DHT (C4), JPG (C8) and DAC (CC).
        if (0xC0..=0xCF).contains(&marker) && ![0xC4, 0xC8, 0xCC].contains(&marker) {
            let height = u16::from_be_bytes([jpeg[at + 5], jpeg[at + 6]]);
            let width = u16::from_be_bytes([jpeg[at + 7], jpeg[at + 8]]);
            return Ok((u32::from(width), u32::from(height)));
        }
        at += 2 + length;
    }
    bail!("no start-of-frame marker in the JPEG")
}

/// Checks the PNG signature, that IHDR comes first and IEND last; returns width, height.
fn png_size(png: &[u8]) -> Result<(u32, u32)> {
    const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    if png.len() < 8 + 25 + 12 || png[..8] != SIGNATURE {
        bail!("no PNG signature ({} bytes)", png.len());
    }
    if &png[12..16] != b"IHDR" || png[8..12] != [0, 0, 0, 13] {
        bail!("the first chunk is not a 13-byte IHDR");
    }
    if &png[png.len() - 8..png.len() - 4] != b"IEND" {
        bail!("the PNG does not end with IEND (truncated?)");
    }
    let width = u32::from_be_bytes(png[16..20].try_into().expect("4 bytes"));
    let height = u32::from_be_bytes(png[20..24].try_into().expect("4 bytes"));
    Ok((width, height))
}

/// A stack with the real detect.sh behind the function stand-in, and a daemon.
async fn start(name: &str) -> Result<(Stack, MockSsgm)> {
    let weights = weights()?;
    let mut stack = Stack::new(name, 5).await?;
    let ssgm = MockSsgm::start(1)?;
    stack.start_function_script(
        &repo_path("scar/yolo/detect.sh"),
        &[
            ("DARKNET_HOME", DARKNET_HOME.as_ref()),
            ("DARKNET_WEIGHTS", weights.as_os_str()),
        ],
    )?;
    stack.start_daemon(&ssgm, &[])?;
    Ok((stack, ssgm))
}

/// Uploads `image` as `key` and waits for its `.png` and `.txt`; returns them and the time
/// from upload to the `.png`.
async fn detect(stack: &Stack, key: &str, image: &[u8]) -> Result<(Vec<u8>, String, Duration)> {
    let before: Vec<String> = stack.output_keys().await?;
    let started = Instant::now();
    stack.upload(key, image).await?;
    let png_key = wait_for(
        &format!("the result of {key}"),
        Duration::from_secs(180),
        || {
            let before = before.clone();
            async move {
                let keys = stack.output_keys().await?;
                Ok(keys
                    .into_iter()
                    .find(|k| k.ends_with(".png") && !before.contains(k)))
            }
        },
    )
    .await?;
    let elapsed = started.elapsed();
    let txt_key = format!("{}.txt", png_key.trim_end_matches(".png"));
    let txt = wait_for(&txt_key, Duration::from_secs(30), || async {
        Ok(stack.output_keys().await?.contains(&txt_key).then_some(()))
    })
    .await;
    txt?;
    let png = stack.get(&stack.output_bucket, &png_key).await?;
    let text = String::from_utf8(stack.get(&stack.output_bucket, &txt_key).await?)?;
    Ok((png, text, elapsed))
}

fn labels(detections: &str) -> Vec<&str> {
    detections
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_once(": ").map(|(label, _)| label))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn dog_jpg_through_the_whole_pipeline_finds_a_dog_and_a_bicycle() -> Result<()> {
    let (stack, ssgm) = start("infer").await?;
    let image = std::fs::read(format!("{DARKNET_HOME}/data/dog.jpg"))?;
    let (png, text, elapsed) = detect(&stack, "photos/dog.jpg", &image).await?;
    eprintln!("dog.jpg: upload to result in {elapsed:.2?}\n{text}");

    let found = labels(&text);
    assert!(found.contains(&"dog"), "no dog in:\n{text}");
    assert!(found.contains(&"bicycle"), "no bicycle in:\n{text}");
    assert!(text.contains("# rcuda: 1 device(s), first "), "{text}");
    assert_eq!(
        png_size(&png)?,
        jpeg_size(&image)?,
        "result size differs from input"
    );
    assert_eq!(png_size(&png)?, (768, 576));
    // The annotated image, not a copy of the input.
    assert_ne!(png, image);

    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;
    ssgm.wait_all_released(Duration::from_secs(10)).await?;
    Ok(())
}

/// Measures darknet's own time and orchgpu's upload-to-result time per image, one image
/// at a time. Run by hand (docs/inference.md):
/// `cargo nextest run --run-ignored only --no-capture inference::measure`
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement, not a check: run by hand"]
async fn measure_per_image_times() -> Result<()> {
    let (stack, ssgm) = start("measure").await?;
    let mut rows = Vec::new();
    // dog.jpg once first, so the first measured run does not pay for cold caches.
    let warm = std::fs::read(format!("{DARKNET_HOME}/data/dog.jpg"))?;
    detect(&stack, "warm/dog.jpg", &warm).await?;
    for name in [
        "dog", "horses", "person", "eagle", "giraffe", "kite", "scream",
    ] {
        let image = std::fs::read(format!("{DARKNET_HOME}/data/{name}.jpg"))?;
        let (_, text, elapsed) = detect(&stack, &format!("measure/{name}.jpg"), &image).await?;
        let darknet: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("# darknet_seconds: "))
            .and_then(|s| s.trim().parse().ok())
            .context("no darknet_seconds line")?;
        rows.push((
            name,
            darknet,
            elapsed.as_secs_f64(),
            labels(&text).join(", "),
        ));
    }
    eprintln!("| image | darknet (s) | orchgpu upload → result (s) | detections |");
    eprintln!("|---|---|---|---|");
    for (name, darknet, total, found) in &rows {
        eprintln!("| {name}.jpg | {darknet:.2} | {total:.2} | {found} |");
    }
    let n = rows.len() as f64;
    eprintln!(
        "| mean | {:.2} | {:.2} | |",
        rows.iter().map(|r| r.1).sum::<f64>() / n,
        rows.iter().map(|r| r.2).sum::<f64>() / n
    );
    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;
    ssgm.wait_all_released(Duration::from_secs(10)).await?;
    Ok(())
}
