//! Pure checks and names for the web API: the upload's object key from a user's file name,
//! the job id a path may carry, the token comparison, the same-origin rule for writes, the
//! names and types of the files a function wrote, and the detections among them.

use sha2::{Digest, Sha256};

/// Longest sanitised file name kept in a key.
const NAME_MAX: usize = 80;

/// A user's file name made safe for an object key: the last path component, ASCII
/// letters, digits, `.`, `-` and `_` kept, runs of anything else turned into one `_`,
/// no leading dot, at most `NAME_MAX` characters (the extension kept), `upload` when
/// nothing is left.
pub(crate) fn sanitise_file_name(raw: &str) -> String {
    let base = raw.rsplit(['/', '\\']).next().unwrap_or("");
    let mut clean = String::with_capacity(base.len());
    for c in base.chars() {
        let keep = c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
        if keep {
            clean.push(c);
        } else if !clean.ends_with('_') {
            clean.push('_');
        }
    }
    let clean = clean.trim_start_matches(['.', '_']).trim_end_matches('_');
    let clean = if clean.chars().all(|c| c == '.') {
        "upload"
    } else {
        clean
    };
    if clean.len() <= NAME_MAX {
        return clean.to_string();
    }
    // Keep a short extension at the end, cut the stem.
    match clean.rsplit_once('.') {
        Some((stem, ext)) if !ext.is_empty() && ext.len() <= 10 => {
            let room = NAME_MAX - ext.len() - 1;
            format!("{}.{ext}", &stem[..room.min(stem.len())])
        }
        _ => clean[..NAME_MAX].to_string(),
    }
}

/// The unique part in front of an upload's name: UTC time to the second and 32 random
/// bits, so two uploads of the same name never share a key.
pub(crate) fn unique_prefix(unix_secs: u64, random: u32) -> String {
    let stamp = time::OffsetDateTime::from_unix_timestamp(i64::try_from(unix_secs).unwrap_or(0))
        .map(|t| {
            format!(
                "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        })
        .unwrap_or_else(|_| "0".to_string());
    format!("{stamp}-{random:08x}")
}

/// Whether `id` is a job id as `JobId::derive` makes them: 20 lowercase hex digits.
/// Nothing else from a request path reaches S3.
pub(crate) fn is_job_id(id: &str) -> bool {
    id.len() == 20 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Compares a presented token with the configured one in time that does not depend on
/// where they differ (both are hashed first, so not on their lengths either).
pub(crate) fn token_matches(presented: &str, expected: &str) -> bool {
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Whether a state-changing request comes from the page's own origin, from its
/// `Sec-Fetch-Site`, `Origin` and `Host` headers. A request with neither fetch header
/// (curl, a script) passes: the token guards those.
pub(crate) fn same_origin(
    sec_fetch_site: Option<&str>,
    origin: Option<&str>,
    host: Option<&str>,
) -> bool {
    if let Some(site) = sec_fetch_site
        && !matches!(site, "same-origin" | "none")
    {
        return false;
    }
    match origin {
        None => true,
        Some(origin) => {
            let Some(host) = host else { return false };
            origin == format!("http://{host}") || origin == format!("https://{host}")
        }
    }
}

/// Longest suffix of an output's name after the job id (`.png`, `.txt`, `.words.tsv`).
const OUTPUT_SUFFIX_MAX: usize = 32;

/// Whether `suffix`, what follows the job id in the name of a file a function wrote
/// (`<id><suffix>`), may name an output on the page: a dot, then ASCII letters, digits,
/// `.`, `-` and `_`, at most `OUTPUT_SUFFIX_MAX` in all, no `..`. It is never a path (no
/// `/`, `\`, `%`): names listed from S3 that fail are not shown, request paths that fail
/// get 404, and a key is only ever `<output dir>/<job id><suffix>`.
pub(crate) fn is_output_suffix(suffix: &str) -> bool {
    suffix.len() >= 2
        && suffix.len() <= OUTPUT_SUFFIX_MAX
        && suffix.starts_with('.')
        && !suffix.contains("..")
        && !suffix.ends_with('.')
        && suffix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// How the page shows an output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OutputKind {
    /// Shown inline as a picture.
    Image,
    /// Shown inline as text, with a copy button.
    Text,
    /// A download link.
    File,
}

/// The kind and the content type an output is served with, from its last extension.
/// Only raster images and plain text are shown; SVG, HTML (hOCR included), PDF and
/// anything unknown are downloads (`application/octet-stream`, as an attachment), so no
/// file a function writes can run script or markup on the page's origin. Text types are
/// all served as `text/plain`.
pub(crate) fn output_kind(suffix: &str) -> (OutputKind, &'static str) {
    let ext = suffix.rsplit('.').next().unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "png" => (OutputKind::Image, "image/png"),
        "jpg" | "jpeg" => (OutputKind::Image, "image/jpeg"),
        "gif" => (OutputKind::Image, "image/gif"),
        "webp" => (OutputKind::Image, "image/webp"),
        "bmp" => (OutputKind::Image, "image/bmp"),
        "txt" | "text" | "tsv" | "csv" | "json" | "md" | "log" => {
            (OutputKind::Text, "text/plain; charset=utf-8")
        }
        _ => (OutputKind::File, "application/octet-stream"),
    }
}

/// One detection of a function's `<id>.txt`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub(crate) struct Detection {
    pub label: String,
    /// The confidence in percent, as darknet printed it.
    pub percent: u32,
}

/// darknet's `label: NN%` lines from `scar/yolo/detect.sh`'s text file; comment lines (`#`)
/// and anything else are skipped. `None` for a text that is not a detections file (no
/// `# detections:` line, which detect.sh writes): a recognised page's "VAT: 21%" is text,
/// not a detection.
pub(crate) fn parse_detections(text: &str) -> Option<Vec<Detection>> {
    if !text.lines().any(|line| line.starts_with("# detections:")) {
        return None;
    }
    let found = text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (label, rest) = line.split_once(": ")?;
            let percent = rest.trim().strip_suffix('%')?.trim().parse().ok()?;
            let label = label.trim();
            (!label.is_empty()).then(|| Detection {
                label: label.to_string(),
                percent,
            })
        })
        .collect();
    Some(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_lose_paths_and_odd_characters() {
        let cases = [
            ("dog.jpg", "dog.jpg"),
            ("my photo (1).JPG", "my_photo_1_.JPG"),
            ("../../etc/passwd", "passwd"),
            ("..\\..\\windows\\system.ini", "system.ini"),
            ("/abs/path/x.png", "x.png"),
            (".hidden", "hidden"),
            ("..", "upload"),
            ("", "upload"),
            ("日本語.jpg", "jpg"),
            ("a\u{0}b\r\nc.jpg", "a_b_c.jpg"),
            ("x%2F..%2Fy.jpg", "x_2F.._2Fy.jpg"),
        ];
        for (raw, want) in cases {
            assert_eq!(sanitise_file_name(raw), want, "{raw:?}");
        }
        let long = format!("{}.jpeg", "a".repeat(300));
        let clean = sanitise_file_name(&long);
        assert_eq!(clean.len(), NAME_MAX);
        assert!(clean.ends_with(".jpeg"), "{clean}");
    }

    #[test]
    fn unique_prefixes_carry_the_time_and_the_random_part() {
        assert_eq!(
            unique_prefix(1_780_000_000, 0xab),
            "20260528T202640Z-000000ab"
        );
    }

    #[test]
    fn only_twenty_hex_digits_are_a_job_id() {
        assert!(is_job_id("0123456789abcdef0123"));
        for bad in [
            "0123456789abcdef012",
            "0123456789abcdef01234",
            "0123456789ABCDEF0123",
            "../../../../etc/pass",
            "0123456789abcdef012g",
        ] {
            assert!(!is_job_id(bad), "{bad}");
        }
    }

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(token_matches("0123456789abcdef", "0123456789abcdef"));
        assert!(!token_matches("0123456789abcdeF", "0123456789abcdef"));
        assert!(!token_matches("", "0123456789abcdef"));
        assert!(!token_matches("0123456789abcdef0", "0123456789abcdef"));
    }

    #[test]
    fn writes_from_other_sites_are_refused() {
        let host = Some("127.0.0.1:8080");
        assert!(same_origin(None, None, host));
        assert!(same_origin(
            Some("same-origin"),
            Some("http://127.0.0.1:8080"),
            host
        ));
        assert!(!same_origin(Some("cross-site"), None, host));
        assert!(!same_origin(Some("same-site"), None, host));
        assert!(!same_origin(None, Some("http://evil.example"), host));
        assert!(!same_origin(None, Some("null"), host));
        assert!(!same_origin(None, Some("http://127.0.0.1:8080"), None));
    }

    #[test]
    fn detections_are_read_from_darknet_lines() {
        let text = "# rcuda: 1 device(s), first 127.0.0.1\n# detections: 2\ndog: 56%\n\
                    bicycle: 59%\ntruck: x%\n# darknet_seconds: 0.8\nnoise\n";
        assert_eq!(
            parse_detections(text),
            Some(vec![
                Detection {
                    label: "dog".into(),
                    percent: 56
                },
                Detection {
                    label: "bicycle".into(),
                    percent: 59
                },
            ])
        );
        // A recognised page is no detections file, whatever its lines look like.
        assert_eq!(parse_detections("Total: 100%\nVAT: 21%\n"), None);
    }

    #[test]
    fn output_suffixes_are_names_never_paths() {
        for good in [".png", ".txt", ".words.tsv", ".a-b_c", ".PNG"] {
            assert!(is_output_suffix(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "png",
            "..",
            "../x",
            "./x",
            ".a/b",
            ".a\\b",
            ".a%2Fb",
            ".a..b",
            ".a.",
            ".é",
            ".a b",
            ".a\nb",
            &format!(".{}", "a".repeat(40)),
        ] {
            assert!(!is_output_suffix(bad), "{bad:?}");
        }
    }

    #[test]
    fn only_raster_images_and_plain_text_are_shown() {
        assert_eq!(output_kind(".png"), (OutputKind::Image, "image/png"));
        assert_eq!(output_kind(".JPG"), (OutputKind::Image, "image/jpeg"));
        assert_eq!(output_kind(".words.tsv").0, OutputKind::Text);
        assert_eq!(output_kind(".json").1, "text/plain; charset=utf-8");
        for download in [".svg", ".html", ".hocr", ".pdf", ".js", ".bin"] {
            assert_eq!(
                output_kind(download),
                (OutputKind::File, "application/octet-stream"),
                "{download}"
            );
        }
    }
}
