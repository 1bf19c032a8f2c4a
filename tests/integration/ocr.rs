//! The second use case, OCR, end to end: LocalStack, the mock SSGM, the real orchgpu and
//! the function stand-in running the real `scar/ocr/recognize.sh` with Debian's
//! Tesseract, on document pages drawn here with ImageMagick and a DejaVu font. Then two
//! use cases on one host: a YOLO and an OCR daemon, each with its own queues, buckets and
//! state directory, sharing one scheduler, with jobs of both at once.
//! `dev/install-tesseract.sh` installs what these need; without it they fail (they are
//! not skipped), saying so.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::harness::{
    MockSsgm, Prometheus, Stack, http_address, http_get, metric_sum, repo_path, wait_for,
};
use crate::inference::{DARKNET_HOME, weights};

const HINT: &str = "run dev/install-tesseract.sh (apt-get install tesseract-ocr tesseract-ocr-eng imagemagick fonts-dejavu-core)";
/// The font the pages are drawn with (Debian's fonts-dejavu-core).
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// ImageMagick's convert, by the Debian package's own name first (a bare `convert`
/// elsewhere on PATH may be another program).
fn convert() -> Result<PathBuf> {
    if on_path("tesseract").is_none() {
        bail!("tesseract is not installed: {HINT}");
    }
    if !std::path::Path::new(FONT).is_file() {
        bail!("{FONT} is missing: {HINT}");
    }
    ["magick", "convert-im6.q16", "convert"]
        .into_iter()
        .find_map(on_path)
        .with_context(|| format!("ImageMagick is not installed: {HINT}"))
}

/// A document page: `lines` of black text in DejaVu Sans on a white page, one
/// `-annotate` per line (ImageMagick 6's multi-line `label:` fails past a few lines), as
/// a grey PNG.
pub fn draw_document(lines: &[&str]) -> Result<Vec<u8>> {
    const LINE: usize = 56;
    let height = 120 + LINE * lines.len();
    let mut command = Command::new(convert()?);
    command.args([
        "-size",
        &format!("1700x{height}"),
        "xc:white",
        "-fill",
        "black",
        "-font",
        FONT,
        "-pointsize",
        "36",
    ]);
    for (n, line) in lines.iter().enumerate() {
        // ImageMagick reads a leading '@' as a file name and '%' as an escape.
        let text = line.replace('%', "%%").trim_start_matches('@').to_string();
        command
            .arg("-annotate")
            .arg(format!("+60+{}", 90 + LINE * n))
            .arg(text);
    }
    let output = command
        .args(["-colorspace", "Gray", "png:-"])
        .output()
        .context("cannot run ImageMagick")?;
    if !output.status.success() || !output.stdout.starts_with(b"\x89PNG") {
        bail!(
            "ImageMagick drew no PNG ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output.stdout)
}

/// Whether every word of `words` is in `text` (case and punctuation aside).
fn missing_words<'a>(text: &str, words: &[&'a str]) -> Vec<&'a str> {
    let found: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    words
        .iter()
        .copied()
        .filter(|w| !found.contains(&w.to_lowercase()))
        .collect()
}

/// The OCR function behind the stand-in, for `stack`.
fn start_ocr_function(stack: &mut Stack) -> Result<usize> {
    convert()?;
    stack.start_function_script(&repo_path("scar/ocr/recognize.sh"), &[])
}

/// Keys of the output dir, new since `before`, ending in `suffix`.
async fn wait_new_keys(
    stack: &Stack,
    before: &[String],
    suffix: &str,
    count: usize,
) -> Result<Vec<String>> {
    wait_for(
        &format!("{count} new {suffix} results"),
        Duration::from_secs(120),
        || async {
            let keys: Vec<String> = stack
                .output_keys()
                .await?
                .into_iter()
                .filter(|k| k.ends_with(suffix) && !before.contains(k))
                .collect();
            Ok((keys.len() >= count).then_some(keys))
        },
    )
    .await
}

const PAGE_1: &[&str] = &[
    "Invoice number 4711 from Valencia",
    "Orchestrating remote graphics cards",
];
const WORDS_1: &[&str] = &[
    "invoice",
    "number",
    "4711",
    "from",
    "valencia",
    "orchestrating",
    "remote",
    "graphics",
    "cards",
];
const PAGE_2: &[&str] = &["The quick brown fox", "jumps over the lazy dog"];
const WORDS_2: &[&str] = &["quick", "brown", "fox", "jumps", "over", "lazy", "dog"];

#[tokio::test(flavor = "multi_thread")]
async fn a_drawn_page_through_the_whole_pipeline_comes_back_as_its_words() -> Result<()> {
    let page = draw_document(PAGE_1)?;
    let mut stack = Stack::new("ocr", 5).await?;
    let ssgm = MockSsgm::start(1)?;
    start_ocr_function(&mut stack)?;
    stack.start_daemon(&ssgm, &["--result-suffix", ".txt"])?;

    let started = Instant::now();
    stack.upload("scans/invoice page.png", &page).await?;
    let keys = wait_new_keys(&stack, &[], ".txt", 1).await?;
    eprintln!("upload to text in {:.2?}", started.elapsed());
    let text = String::from_utf8(stack.get(&stack.output_bucket, &keys[0]).await?)?;
    eprintln!("recognised:\n{text}");
    let missing = missing_words(&text, WORDS_1);
    assert!(missing.is_empty(), "missing {missing:?} in:\n{text}");

    // The words with their boxes and confidences beside it.
    let tsv_key = keys[0].replace(".txt", ".tsv");
    let tsv = wait_for(&tsv_key, Duration::from_secs(10), || async {
        Ok(stack.output_keys().await?.contains(&tsv_key).then_some(()))
    })
    .await;
    tsv?;
    let tsv = String::from_utf8(stack.get(&stack.output_bucket, &tsv_key).await?)?;
    assert!(tsv.starts_with("level\tpage_num"), "{tsv}");
    assert!(tsv.contains("\tValencia"), "{tsv}");

    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;
    ssgm.wait_all_released(Duration::from_secs(10)).await?;
    Ok(())
}

/// `orchgpu jobs --json` for a state directory: the jobs listed.
fn jobs_of(state_dir: &str) -> Result<Vec<Value>> {
    let output = Command::new(env!("CARGO_BIN_EXE_orchgpu"))
        .args(["jobs", "--state-dir", state_dir, "--json"])
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "orchgpu jobs: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let list: Value = serde_json::from_slice(&output.stdout)?;
    list.as_array().cloned().context("not a list")
}

/// Two use cases on one host, as two `orchgpu@` instances would run: YOLO and OCR, each
/// with its own jobs queue, buckets, function and state directory, one scheduler for
/// both (one pool of GPUs). Jobs of both at once; each result comes from the right
/// function, neither sees the other's jobs, and a real Prometheus scraping both tells
/// their metrics apart by instance (and the `use_case` label of its scrape config).
#[tokio::test(flavor = "multi_thread")]
async fn two_use_cases_on_one_host_keep_to_their_own_jobs_and_metrics() -> Result<()> {
    let weights = weights()?;
    let pages = [draw_document(PAGE_1)?, draw_document(PAGE_2)?];
    let ssgm = MockSsgm::start(2)?;

    let mut yolo = Stack::new("two-yolo", 5).await?;
    yolo.start_function_script(
        &repo_path("scar/yolo/detect.sh"),
        &[
            ("DARKNET_HOME", DARKNET_HOME.as_ref()),
            ("DARKNET_WEIGHTS", weights.as_os_str()),
        ],
    )?;
    let yolo_daemon = yolo.start_daemon(&ssgm, &["--http-listen", "127.0.0.1:0"])?;
    let mut ocr = Stack::new("two-ocr", 5).await?;
    start_ocr_function(&mut ocr)?;
    let ocr_daemon = ocr.start_daemon(
        &ssgm,
        &["--result-suffix", ".txt", "--http-listen", "127.0.0.1:0"],
    )?;
    let yolo_address = http_address(&mut yolo, yolo_daemon).await?;
    let ocr_address = http_address(&mut ocr, ocr_daemon).await?;
    assert_ne!(yolo.state_dir("default"), ocr.state_dir("default"));

    let dog = std::fs::read(format!("{DARKNET_HOME}/data/dog.jpg"))?;
    let (a, b, c) = tokio::join!(
        yolo.upload("photos/dog.jpg", &dog),
        ocr.upload("scans/page-1.png", &pages[0]),
        ocr.upload("scans/page-2.png", &pages[1]),
    );
    a?;
    b?;
    c?;

    // YOLO: one annotated image and its detections; nothing of OCR's.
    let pngs = wait_new_keys(&yolo, &[], ".png", 1).await?;
    let detections_key = pngs[0].replace(".png", ".txt");
    let detections = wait_for("the detections", Duration::from_secs(30), || async {
        Ok(yolo
            .output_keys()
            .await?
            .contains(&detections_key)
            .then_some(()))
    })
    .await;
    detections?;
    let detections = String::from_utf8(yolo.get(&yolo.output_bucket, &detections_key).await?)?;
    assert!(detections.contains("\ndog: "), "{detections}");
    // OCR: two texts, each with its own page's words.
    let texts = wait_new_keys(&ocr, &[], ".txt", 2).await?;
    yolo.wait_for_empty_queues(Duration::from_secs(60)).await?;
    ocr.wait_for_empty_queues(Duration::from_secs(60)).await?;

    let yolo_keys = yolo.output_keys().await?;
    let ocr_keys = ocr.output_keys().await?;
    assert_eq!(yolo_keys.len(), 2, "{yolo_keys:?}");
    assert!(
        yolo_keys.iter().all(|k| !k.ends_with(".tsv")),
        "{yolo_keys:?}"
    );
    assert_eq!(ocr_keys.len(), 4, "two .txt and two .tsv: {ocr_keys:?}");
    assert!(
        ocr_keys.iter().all(|k| !k.ends_with(".png")),
        "{ocr_keys:?}"
    );

    // Each text belongs to its page: the OCR daemon's history maps job id to input key.
    let ocr_jobs = jobs_of(&ocr.state_dir("default"))?;
    let yolo_jobs = jobs_of(&yolo.state_dir("default"))?;
    let keys_of = |jobs: &[Value]| -> Vec<String> {
        let mut keys: Vec<String> = jobs
            .iter()
            .filter_map(|j| j["key"].as_str().map(str::to_owned))
            .collect();
        keys.sort();
        keys
    };
    assert_eq!(keys_of(&ocr_jobs), ["scans/page-1.png", "scans/page-2.png"]);
    assert_eq!(keys_of(&yolo_jobs), ["photos/dog.jpg"]);
    let key_by_id: HashMap<&str, &str> = ocr_jobs
        .iter()
        .filter_map(|j| Some((j["job_id"].as_str()?, j["key"].as_str()?)))
        .collect();
    for text_key in &texts {
        let id = text_key
            .rsplit('/')
            .next()
            .and_then(|n| n.strip_suffix(".txt"))
            .context("a text key")?;
        let words = match key_by_id.get(id) {
            Some(&"scans/page-1.png") => WORDS_1,
            Some(&"scans/page-2.png") => WORDS_2,
            other => bail!("text {text_key} of no OCR job ({other:?})"),
        };
        let text = String::from_utf8(ocr.get(&ocr.output_bucket, text_key).await?)?;
        let missing = missing_words(&text, words);
        assert!(
            missing.is_empty(),
            "{text_key}: missing {missing:?} in:\n{text}"
        );
    }

    // Metrics: each daemon counts its own jobs and GPU time, which its history explains.
    let metrics = |address: &str| -> Result<String> {
        let (status, body) = http_get(address, "/metrics")?;
        anyhow::ensure!(status == 200, "/metrics: {status}");
        Ok(body)
    };
    let ended = |jobs: &[Value]| jobs.iter().all(|j| j["gpu_seconds"].is_number());
    wait_for(
        "the histories' releases",
        Duration::from_secs(30),
        || async {
            let both = ended(&jobs_of(&yolo.state_dir("default"))?)
                && ended(&jobs_of(&ocr.state_dir("default"))?);
            Ok(both.then_some(()))
        },
    )
    .await?;
    for (name, address, stack, jobs) in [
        ("yolo", &yolo_address, &yolo, 1.0),
        ("ocr", &ocr_address, &ocr, 2.0),
    ] {
        let text = metrics(address)?;
        let succeeded = metric_sum(&text, "orchgpu_jobs_total", &[("outcome", "succeeded")]);
        assert_eq!(succeeded, jobs, "{name}: {text}");
        let metric = metric_sum(&text, "orchgpu_gpu_seconds_total", &[]);
        let history: f64 = jobs_of(&stack.state_dir("default"))?
            .iter()
            .filter_map(|j| j["gpu_seconds"].as_f64())
            .sum();
        assert!(metric > 0.0, "{name}: no GPU time counted");
        // The metric counts from the reservation's grant, the history from its granted
        // event: the same instants but for the journal write in between.
        assert!(
            (metric - history).abs() < 0.25 * jobs,
            "{name}: metric {metric} s against the history's {history} s"
        );
    }

    let prometheus =
        Prometheus::start_targets(&[(&yolo_address, Some("yolo")), (&ocr_address, Some("ocr"))])?;
    let series = wait_for(
        "both instances scraped",
        Duration::from_secs(60),
        || async {
            let answer = prometheus.query("orchgpu_jobs_total{outcome=\"succeeded\"}")?;
            let result = answer["data"]["result"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            Ok((result.len() == 2).then_some(result))
        },
    )
    .await?;
    let by_use_case: HashMap<String, (String, String)> = series
        .iter()
        .map(|s| {
            (
                s["metric"]["use_case"].as_str().unwrap_or("").to_owned(),
                (
                    s["metric"]["instance"].as_str().unwrap_or("").to_owned(),
                    s["value"][1].as_str().unwrap_or("").to_owned(),
                ),
            )
        })
        .collect();
    assert_eq!(
        by_use_case.get("yolo"),
        Some(&(yolo_address.clone(), "1".to_string())),
        "{series:?}"
    );
    assert_eq!(
        by_use_case.get("ocr"),
        Some(&(ocr_address.clone(), "2".to_string())),
        "{series:?}"
    );
    let gpu = prometheus.wait_for_series(
        "sum by (use_case) (orchgpu_gpu_seconds_total) > 0",
        Duration::from_secs(30),
    )?;
    assert_eq!(gpu.len(), 2, "{gpu:?}");

    ssgm.wait_all_released(Duration::from_secs(10)).await?;
    Ok(())
}

/// Tesseract's time per page and orchgpu's upload-to-result time, one page at a time, on
/// pages drawn here. Run by hand (docs/inference.md):
/// `cargo nextest run --run-ignored only --no-capture ocr::measure`
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement, not a check: run by hand"]
async fn measure_per_page_times() -> Result<()> {
    let mut stack = Stack::new("ocr-measure", 5).await?;
    let ssgm = MockSsgm::start(1)?;
    start_ocr_function(&mut stack)?;
    stack.start_daemon(&ssgm, &["--result-suffix", ".txt"])?;
    let long: Vec<String> = (1..=30)
        .map(|n| format!("Line {n}: remote GPUs for every upload, released after the result"))
        .collect();
    let long: Vec<&str> = long.iter().map(String::as_str).collect();
    let pages: Vec<(&str, Vec<u8>)> = vec![
        ("warm-up", draw_document(PAGE_2)?),
        ("2 lines", draw_document(PAGE_1)?),
        ("2 lines (b)", draw_document(PAGE_2)?),
        ("30 lines", draw_document(&long)?),
    ];
    let mut rows = Vec::new();
    for (n, (name, page)) in pages.iter().enumerate() {
        let before = stack.output_keys().await?;
        let started = Instant::now();
        stack.upload(&format!("measure/{n}.png"), page).await?;
        let keys = wait_new_keys(&stack, &before, ".txt", 1).await?;
        let elapsed = started.elapsed().as_secs_f64();
        let text = String::from_utf8(stack.get(&stack.output_bucket, &keys[0]).await?)?;
        if n > 0 {
            rows.push((name, page.len(), elapsed, text.split_whitespace().count()));
        }
    }
    // recognize.sh logs Tesseract's own time: "tesseract: N words in M ms".
    let log = stack.log(0);
    let tesseract_ms: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("words in ").nth(1))
        .filter_map(|rest| rest.split(" ms").next())
        .collect();
    eprintln!("| page | PNG bytes | tesseract (ms) | orchgpu upload → text (s) | words |");
    eprintln!("|---|---|---|---|---|");
    for (i, (name, bytes, total, words)) in rows.iter().enumerate() {
        let own = tesseract_ms.get(i + 1).copied().unwrap_or("?");
        eprintln!("| {name} | {bytes} | {own} | {total:.2} | {words} |");
    }
    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;
    ssgm.wait_all_released(Duration::from_secs(10)).await?;
    Ok(())
}
