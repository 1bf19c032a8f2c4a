//! The bundle: the `.tar.gz` a SCAR function unpacks to run one job (DESIGN.md §3.2).
//!
//! This module owns the bundle's layout (member names, the reservation rendered as `.txt`
//! and `.env`, the JSON manifest) and writing it. It uses plain synchronous `std::io`, so
//! the caller runs [`write_bundle`] in `spawn_blocking`; downloading the input and
//! uploading the result belong to `job`, and no tokio or AWS type appears here.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};
use tar::{Builder, EntryType, Header};

/// Everything the function needs to know about a job, stored as `tmp/<id>.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Manifest {
    /// Format version of this manifest; currently 1.
    pub(crate) version: u32,
    pub(crate) job_id: String,
    pub(crate) scheduler_job_id: String,
    pub(crate) source: ManifestSource,
    /// The rCUDA settings granted by the scheduler, in the scheduler's order.
    pub(crate) reservation: Vec<ReservationField>,
    /// When the job was created, in seconds since the Unix epoch; also every member's mtime.
    pub(crate) created_unix: u64,
    /// When the GPUs were allocated, in seconds since the Unix epoch.
    pub(crate) allocated_unix: u64,
}

/// The S3 object the job was made from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct ManifestSource {
    pub(crate) bucket: String,
    pub(crate) key: String,
    pub(crate) size: u64,
    pub(crate) etag: Option<String>,
    pub(crate) version_id: Option<String>,
}

/// One `NAME=value` setting of the scheduler's reply, such as `RCUDA_DEVICE_COUNT=1`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct ReservationField {
    pub(crate) name: String,
    pub(crate) value: String,
}

/// Paths of the bundle's members, in the order they are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MemberNames {
    pub(crate) txt: String,
    pub(crate) input: String,
    pub(crate) env: String,
    pub(crate) json: String,
}

/// Why a bundle could not be written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BundleError {
    #[error("failed to read bundle input {path}")]
    ReadInput {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to write bundle")]
    Write(#[source] io::Error),
    #[error("invalid job id {0:?}")]
    InvalidJobId(String),
}

/// Longest extension kept; longer "extensions" are more likely words than file types.
const MAX_EXTENSION_LEN: usize = 16;

/// Longest job id accepted: with `tmp/`, a dot and the longest extension, every member
/// name still fits the 100-byte ustar name field, so any `tar` unpacks it. The daemon's
/// ids are far shorter.
const MAX_JOB_ID_LEN: usize = 64;

/// Returns the extension of the key's file name (the part after the last `/`): its last
/// dot-separated piece, lowercased, if that is 1 to 16 ASCII letters and digits.
///
/// A name made only of dots before the extension (`.bashrc`) is a hidden name, not an
/// extension. Anything else yields `None`, so no raw key text reaches a member name.
pub(crate) fn sanitize_extension(key: &str) -> Option<String> {
    let file_name = key.rsplit('/').next().unwrap_or(key);
    let (stem, ext) = file_name.rsplit_once('.')?;
    let valid = !stem.trim_start_matches('.').is_empty() && is_valid_extension(ext);
    valid.then(|| ext.to_ascii_lowercase())
}

/// Returns the member names for a job.
///
/// `job_id` must be one the daemon made (see [`write_bundle`], which checks it) and `ext`
/// must come from [`sanitize_extension`]; an invalid `ext` is dropped rather than trusted.
pub(crate) fn member_names(job_id: &str, ext: Option<&str>) -> MemberNames {
    debug_assert!(is_valid_job_id(job_id), "invalid job id {job_id:?}");
    MemberNames {
        txt: format!("tmp/{job_id}.txt"),
        input: format!("tmp/{}", input_file_name(job_id, ext)),
        env: format!("tmp/{job_id}.env"),
        json: format!("tmp/{job_id}.json"),
    }
}

/// Returns the key of the bundle in the intermediate bucket: `<dir>/<id>.tar.gz`, or
/// `<id>.tar.gz` when `dir` is empty.
pub(crate) fn bundle_key(dir: &str, job_id: &str) -> String {
    debug_assert!(is_valid_job_id(job_id), "invalid job id {job_id:?}");
    // Tolerate stray slashes so "dir/" never turns into "dir//id.tar.gz".
    match dir.trim_matches('/') {
        "" => format!("{job_id}.tar.gz"),
        dir => format!("{dir}/{job_id}.tar.gz"),
    }
}

/// Renders the reservation values, one per line, without names.
///
/// orchGPU's scripts read line 1 as the device count and line 2 as the first device.
/// Values come from SSGM's one-line reply, so they hold no newline.
pub(crate) fn render_txt(manifest: &Manifest) -> String {
    manifest
        .reservation
        .iter()
        .map(|field| format!("{}\n", field.value))
        .collect()
}

/// Renders the reservation as `NAME='value'` lines a shell script can source, followed by
/// `ORCHGPU_JOB_ID`, `ORCHGPU_SCHEDULER_JOB` and `ORCHGPU_INPUT_FILE`.
///
/// Fields whose name is not a shell identifier are left out (they stay in `.txt` and
/// `.json`). The `ORCHGPU_*` lines come last, so a scheduler field cannot override them.
pub(crate) fn render_env(manifest: &Manifest, input_member_file_name: &str) -> String {
    let fields = manifest
        .reservation
        .iter()
        .filter(|field| is_shell_identifier(&field.name))
        .map(|field| (field.name.as_str(), field.value.as_str()));
    let ours = [
        ("ORCHGPU_JOB_ID", manifest.job_id.as_str()),
        ("ORCHGPU_SCHEDULER_JOB", manifest.scheduler_job_id.as_str()),
        ("ORCHGPU_INPUT_FILE", input_member_file_name),
    ];
    fields
        .chain(ours)
        .map(|(name, value)| format!("{name}='{}'\n", value.replace('\'', r"'\''")))
        .collect()
}

/// Writes the bundle for `manifest` to `out`: a gzip'd tar of the `.txt`, the input read
/// from the file `input` (streamed, so memory does not grow with its size), the `.env` and
/// the `.json`, then finishes the gzip stream and flushes `out`.
///
/// The compression level comes from [`compression_for`]: none for an input that is
/// already compressed, `Compression::fast()` otherwise.
///
/// # Errors
///
/// [`BundleError::InvalidJobId`] if the manifest's job id is not 1 to 64 ASCII letters,
/// digits, `-` or `_`, and [`BundleError::ReadInput`] if `input` cannot be opened; `out`
/// is untouched in both cases. [`BundleError::ReadInput`] or [`BundleError::Write`] if
/// reading or writing fails later, leaving a partial bundle in `out` to be discarded.
pub(crate) fn write_bundle(
    input: &Path,
    ext: Option<&str>,
    manifest: &Manifest,
    out: impl Write,
) -> Result<(), BundleError> {
    let job_id = &manifest.job_id;
    if !is_valid_job_id(job_id) {
        return Err(BundleError::InvalidJobId(job_id.clone()));
    }
    let read_error = |source| BundleError::ReadInput {
        path: input.to_path_buf(),
        source,
    };
    // Open the input before writing anything, so a missing input leaves `out` untouched.
    let file = File::open(input).map_err(read_error)?;
    let len = file.metadata().map_err(read_error)?.len();
    let compression = compression_for(&file, len).map_err(read_error)?;

    let names = member_names(job_id, ext);
    let txt = render_txt(manifest);
    let env = render_env(manifest, &input_file_name(job_id, ext));
    let mut json = serde_json::to_string_pretty(manifest)
        .expect("a manifest of strings, integers and options always serializes");
    json.push('\n');

    let mtime = manifest.created_unix;
    let mut builder = Builder::new(GzEncoder::new(out, compression));
    append_bytes(&mut builder, &names.txt, txt.as_bytes(), mtime)?;
    let mut reader = InputReader {
        inner: file,
        remaining: len,
        error: None,
    };
    let mut header = member_header(len, mtime);
    builder
        .append_data(&mut header, &names.input, &mut reader)
        .map_err(|err| match reader.error.take() {
            Some(source) => read_error(source),
            None => BundleError::Write(err),
        })?;
    append_bytes(&mut builder, &names.env, env.as_bytes(), mtime)?;
    append_bytes(&mut builder, &names.json, json.as_bytes(), mtime)?;

    // `into_inner` writes the tar trailer and `finish` the gzip trailer; both can fail.
    let encoder = builder.into_inner().map_err(BundleError::Write)?;
    let mut out = encoder.finish().map_err(BundleError::Write)?;
    out.flush().map_err(BundleError::Write)
}

/// How much of the input's start [`compression_for`] looks at.
const SAMPLE_LEN: usize = 16 * 1024;
/// A sample that deflates to more than this share of its size is not worth compressing.
const INCOMPRESSIBLE_RATIO: f64 = 0.95;

/// Chooses the bundle's compression level from the input's first bytes. Inputs are
/// mostly images that are compressed already (JPEG, PNG, ...): deflating them costs the
/// most CPU of a job's own work and gains about nothing (measured: JPEGs 0.1% smaller,
/// PNGs 1 to 3%), so they are stored (gzip level 0: still a `.tar.gz` any `tar -xzf`
/// reads). A known compressed format is stored at once; anything else is stored if a
/// sample of its start does not deflate below `INCOMPRESSIBLE_RATIO`, and compressed with
/// `Compression::fast()` otherwise (a higher level was 4 to 6 times slower for little
/// gain).
///
/// # Errors
/// Reading the sample failed.
pub(crate) fn compression_for(input: &File, len: u64) -> io::Result<Compression> {
    use std::os::unix::fs::FileExt;

    let sample_len = usize::try_from(len).map_or(SAMPLE_LEN, |len| len.min(SAMPLE_LEN));
    let mut sample = vec![0; sample_len];
    // `read_exact_at` leaves the file's offset at the start for the real read.
    input.read_exact_at(&mut sample, 0)?;
    if is_compressed_format(&sample) {
        return Ok(Compression::none());
    }
    if sample.len() < 512 {
        // Too short to judge, and too short for the choice to matter.
        return Ok(Compression::fast());
    }
    let mut probe = flate2::write::DeflateEncoder::new(Vec::new(), Compression::fast());
    probe.write_all(&sample)?;
    let deflated = probe.finish()?.len();
    Ok(
        if deflated as f64 > INCOMPRESSIBLE_RATIO * sample.len() as f64 {
            Compression::none()
        } else {
            Compression::fast()
        },
    )
}

/// Whether `start` begins like a format that is compressed already: JPEG, PNG, GIF, WebP,
/// ISO media (MP4, MOV, HEIC, AVIF), Matroska/WebM, gzip, zip, zstd, xz or bzip2.
fn is_compressed_format(start: &[u8]) -> bool {
    const MAGIC: [&[u8]; 9] = [
        b"\xff\xd8\xff",      // JPEG
        b"\x89PNG\r\n\x1a\n", // PNG
        b"GIF8",              // GIF
        b"\x1f\x8b",          // gzip
        b"PK\x03\x04",        // zip (and docx, jar, ...)
        b"\x28\xb5\x2f\xfd",  // zstd
        b"\xfd7zXZ\x00",      // xz
        b"BZh",               // bzip2
        b"\x1a\x45\xdf\xa3",  // Matroska / WebM
    ];
    let webp = start.len() >= 12 && &start[..4] == b"RIFF" && &start[8..12] == b"WEBP";
    let iso_media = start.len() >= 8 && &start[4..8] == b"ftyp";
    webp || iso_media || MAGIC.iter().any(|magic| start.starts_with(magic))
}

/// Appends an in-memory member.
fn append_bytes<W: Write>(
    builder: &mut Builder<W>,
    name: &str,
    data: &[u8],
    mtime: u64,
) -> Result<(), BundleError> {
    let mut header = member_header(data.len() as u64, mtime);
    builder
        .append_data(&mut header, name, data)
        .map_err(BundleError::Write)
}

/// Returns the header every member shares: a regular file, 0644, owned by root.
fn member_header(size: u64, mtime: u64) -> Header {
    let mut header = Header::new_gnu();
    header.set_entry_type(EntryType::Regular);
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(mtime);
    header.set_uid(0);
    header.set_gid(0);
    header
}

/// Returns the input member's file name: `<id>.<ext>`, or `<id>` without an extension.
fn input_file_name(job_id: &str, ext: Option<&str>) -> String {
    debug_assert!(
        ext.is_none_or(is_valid_extension),
        "invalid extension {ext:?}"
    );
    match ext.filter(|ext| is_valid_extension(ext)) {
        // An input whose extension is one of ours would overwrite that member when the
        // bundle is unpacked; `ORCHGPU_INPUT_FILE` in the .env names it either way.
        Some(ext @ ("txt" | "env" | "json")) => format!("{job_id}-input.{ext}"),
        Some(ext) => format!("{job_id}.{ext}"),
        None => job_id.to_owned(),
    }
}

fn is_valid_extension(ext: &str) -> bool {
    (1..=MAX_EXTENSION_LEN).contains(&ext.len()) && ext.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Job ids name members and S3 keys, so only a conservative alphabet is accepted; this
/// also rules out `/`, `..` and the empty id.
fn is_valid_job_id(job_id: &str) -> bool {
    (1..=MAX_JOB_ID_LEN).contains(&job_id.len())
        && job_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `[A-Za-z_][A-Za-z0-9_]*`: names a POSIX shell accepts in an assignment.
fn is_shell_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Reads exactly `remaining` bytes of the input and keeps any error it hits.
///
/// `tar` reports input and output failures as the same `io::Error`; keeping the input's
/// own error tells them apart. Stopping at the size written in the header, and failing if
/// the file ends early, keeps the archive well-formed even if the file changed size.
struct InputReader<R> {
    inner: R,
    remaining: u64,
    error: Option<io::Error>,
}

impl<R: Read> Read for InputReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let max = usize::try_from(self.remaining).map_or(buf.len(), |r| r.min(buf.len()));
        let error = match self.inner.read(&mut buf[..max]) {
            Ok(0) => io::Error::new(io::ErrorKind::UnexpectedEof, "input shorter than its size"),
            Ok(n) => {
                self.remaining -= n as u64;
                return Ok(n);
            }
            // `io::copy` retries these, so they are not failures.
            Err(err) if err.kind() == io::ErrorKind::Interrupted => return Err(err),
            Err(err) => err,
        };
        self.error = Some(error);
        Err(io::Error::other("bundle input failed"))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Seek;
    use std::process::Command;

    use flate2::read::GzDecoder;

    use super::*;

    const JOB_ID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    const CREATED: u64 = 1_700_000_000;

    fn manifest(job_id: &str, fields: &[(&str, &str)]) -> Manifest {
        Manifest {
            version: 1,
            job_id: job_id.to_owned(),
            scheduler_job_id: "42".to_owned(),
            source: ManifestSource {
                bucket: "input".to_owned(),
                key: "photos/cat.JPG".to_owned(),
                size: 3,
                etag: Some("\"d41d8cd98f00b204e9800998ecf8427e\"".to_owned()),
                version_id: None,
            },
            reservation: fields
                .iter()
                .map(|&(name, value)| ReservationField {
                    name: name.to_owned(),
                    value: value.to_owned(),
                })
                .collect(),
            created_unix: CREATED,
            allocated_unix: CREATED + 5,
        }
    }

    fn one_gpu() -> Manifest {
        manifest(
            JOB_ID,
            &[("RCUDA_DEVICE_COUNT", "1"), ("RCUDA_DEVICE_0", "gpu1:0")],
        )
    }

    fn three_gpus() -> Manifest {
        manifest(
            JOB_ID,
            &[
                ("RCUDA_DEVICE_COUNT", "3"),
                ("RCUDA_DEVICE_0", "gpu1:0"),
                ("RCUDA_DEVICE_1", "gpu1:1"),
                ("RCUDA_DEVICE_2", "gpu2"),
            ],
        )
    }

    /// Bytes that exercise the tar padding: not a multiple of 512, with NULs and high bytes.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i.wrapping_mul(31) ^ (i >> 9)) as u8)
            .collect()
    }

    fn input_file(contents: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("create temp input");
        file.write_all(contents).expect("write temp input");
        file
    }

    fn bundle(contents: &[u8], ext: Option<&str>, manifest: &Manifest) -> Vec<u8> {
        let input = input_file(contents);
        let mut out = Vec::new();
        write_bundle(input.path(), ext, manifest, &mut out).expect("write bundle");
        out
    }

    /// Unpacks a bundle into (name, contents), checking every header on the way.
    fn unpack(bundle: &[u8], mtime: u64) -> Vec<(String, Vec<u8>)> {
        let mut archive = tar::Archive::new(GzDecoder::new(bundle));
        let mut members = Vec::new();
        for entry in archive.entries().expect("read entries") {
            let mut entry = entry.expect("read entry");
            let header = entry.header();
            assert_eq!(header.entry_type(), EntryType::Regular);
            assert_eq!(header.mode().expect("mode"), 0o644);
            assert_eq!(header.mtime().expect("mtime"), mtime);
            assert_eq!(header.uid().expect("uid"), 0);
            assert_eq!(header.gid().expect("gid"), 0);
            let name = entry.path().expect("path").to_string_lossy().into_owned();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).expect("read member");
            members.push((name, data));
        }
        members
    }

    fn check_bundle(contents: &[u8], ext: Option<&str>, manifest: &Manifest) {
        let members = unpack(&bundle(contents, ext, manifest), manifest.created_unix);
        let names = member_names(&manifest.job_id, ext);
        let listed: Vec<&str> = members.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(listed, [&names.txt, &names.input, &names.env, &names.json]);

        let input_name = names.input.strip_prefix("tmp/").expect("under tmp/");
        assert_eq!(members[0].1, render_txt(manifest).as_bytes());
        assert!(members[1].1 == contents, "input member differs");
        assert_eq!(members[2].1, render_env(manifest, input_name).as_bytes());
        let json = String::from_utf8(members[3].1.clone()).expect("utf-8 json");
        assert!(json.ends_with("}\n"), "{json}");
        assert!(json.contains("\n  \"version\": 1,\n"), "not pretty: {json}");
        let parsed: Manifest = serde_json::from_str(&json).expect("parse manifest");
        assert_eq!(&parsed, manifest);
    }

    /// Bytes no compressor can shrink, reproducible.
    fn noise(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    }

    fn level_for(contents: &[u8]) -> u32 {
        let input = input_file(contents);
        let file = File::open(input.path()).expect("open input");
        compression_for(&file, contents.len() as u64)
            .expect("sample the input")
            .level()
    }

    #[test]
    fn compressed_inputs_are_stored_and_others_deflated() {
        let mut jpeg = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00".to_vec();
        // A JPEG's header can be quite compressible; the magic decides.
        jpeg.extend(std::iter::repeat_n(0u8, 4000));
        assert_eq!(level_for(&jpeg), 0, "JPEG");
        let mut mp4 = b"\x00\x00\x00\x18ftypmp42".to_vec();
        mp4.extend(std::iter::repeat_n(7u8, 4000));
        assert_eq!(level_for(&mp4), 0, "MP4");
        assert_eq!(level_for(&noise(100_000)), 0, "incompressible bytes");
        let text = "a line of text that repeats\n".repeat(4000);
        assert_eq!(
            level_for(text.as_bytes()),
            Compression::fast().level(),
            "text"
        );
        assert_eq!(
            level_for(b"short"),
            Compression::fast().level(),
            "tiny input"
        );
        assert_eq!(level_for(b""), Compression::fast().level(), "empty input");
    }

    #[test]
    fn stored_and_deflated_bundles_both_unpack_byte_for_byte() {
        let noisy = noise(300_000);
        check_bundle(&noisy, Some("jpg"), &one_gpu());
        // Stored: about the input's size plus headers, not smaller.
        let stored = bundle(&noisy, Some("jpg"), &one_gpu()).len();
        assert!(
            stored >= noisy.len() && stored < noisy.len() + 16 * 1024,
            "{stored}"
        );

        let text = "a line of text that repeats\n".repeat(10_000);
        check_bundle(text.as_bytes(), Some("txt"), &one_gpu());
        let deflated = bundle(text.as_bytes(), Some("txt"), &one_gpu()).len();
        assert!(
            deflated < text.len() / 10,
            "{deflated} bytes for {}",
            text.len()
        );
        // The reader must still start at the input's first byte after the sample.
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend(noise(50_000));
        check_bundle(&png, Some("png"), &three_gpus());
    }

    #[test]
    fn bundle_holds_every_member_byte_for_byte() {
        let binary = [0u8, 0xff, 0x80, b'\n', 0, 0x1b, b'\'', 0xfe];
        check_bundle(&binary, Some("jpg"), &one_gpu());
        check_bundle(&binary, None, &three_gpus());
        check_bundle(&[], Some("png"), &one_gpu());
        check_bundle(&pattern(3 * 1024 * 1024 + 123), Some("tiff"), &three_gpus());
    }

    #[test]
    fn members_have_the_documented_contents() {
        let members = unpack(&bundle(b"img", Some("jpg"), &one_gpu()), CREATED);
        let names: Vec<&str> = members.iter().map(|(name, _)| name.as_str()).collect();
        let id = JOB_ID;
        let expected = [
            format!("tmp/{id}.txt"),
            format!("tmp/{id}.jpg"),
            format!("tmp/{id}.env"),
            format!("tmp/{id}.json"),
        ];
        assert_eq!(names, expected);
        assert_eq!(members[0].1, b"1\ngpu1:0\n");
        assert_eq!(members[1].1, b"img");
        let env = format!(
            "RCUDA_DEVICE_COUNT='1'\nRCUDA_DEVICE_0='gpu1:0'\nORCHGPU_JOB_ID='{id}'\n\
             ORCHGPU_SCHEDULER_JOB='42'\nORCHGPU_INPUT_FILE='{id}.jpg'\n"
        );
        assert_eq!(String::from_utf8_lossy(&members[2].1), env);
    }

    #[test]
    fn input_without_extension_has_no_trailing_dot() {
        let names = member_names("abc-123", None);
        assert_eq!(names.input, "tmp/abc-123");
        assert_eq!(names.txt, "tmp/abc-123.txt");
        assert_eq!(names.env, "tmp/abc-123.env");
        assert_eq!(names.json, "tmp/abc-123.json");
        assert_eq!(
            member_names("abc-123", Some("png")).input,
            "tmp/abc-123.png"
        );
        let env = render_env(&one_gpu(), &input_file_name(JOB_ID, None));
        assert!(
            env.ends_with(&format!("ORCHGPU_INPUT_FILE='{JOB_ID}'\n")),
            "{env}"
        );
    }

    #[test]
    fn sanitize_extension_table() {
        let cases: &[(&str, Option<&str>)] = &[
            ("a/b.c/photo.JPG", Some("jpg")),
            ("photo.jpg", Some("jpg")),
            ("x.tar.gz", Some("gz")),
            ("a.b.c.d.jpeg", Some("jpeg")),
            ("deep/nested/folders/img.Png", Some("png")),
            ("x.mp4", Some("mp4")),
            ("x.abcdefghijklmnop", Some("abcdefghijklmnop")),
            (".bashrc.jpg", Some("jpg")),
            ("dir.d/noext", None),
            ("noext", None),
            ("", None),
            ("dir/", None),
            (".bashrc", None),
            ("a/.bashrc", None),
            ("..", None),
            ("...", None),
            ("..jpg", None),
            ("file.", None),
            ("a/../evil.p/ng", None),
            ("a/..", None),
            ("x.p n g", None),
            ("x.jpg ", None),
            ("x. jpg", None),
            ("x.ünï", None),
            ("ünï.jpg", Some("jpg")),
            ("x.JPĞ", None),
            ("x.jp%67", None),
            ("x.jp-g", None),
            ("x.jp_g", None),
            ("x.jp\\g", None),
            ("x.jpg\n", None),
            ("x.abcdefghijklmnopq", None),
        ];
        for &(key, expected) in cases {
            assert_eq!(sanitize_extension(key).as_deref(), expected, "key {key:?}");
        }
    }

    #[test]
    fn longest_names_fit_plain_ustar_headers() {
        let id = "f".repeat(MAX_JOB_ID_LEN);
        let ext = "x".repeat(MAX_EXTENSION_LEN);
        let manifest = manifest(&id, &[("RCUDA_DEVICE_COUNT", "1")]);
        let bundle = bundle(b"data", Some(&ext), &manifest);
        let mut archive = tar::Archive::new(GzDecoder::new(&bundle[..]));
        for entry in archive.entries().expect("read entries") {
            let entry = entry.expect("read entry");
            // A GNU long-name entry would show up as a name outside the header's field.
            let in_header = entry.header().path_bytes().into_owned();
            assert_eq!(in_header, entry.path_bytes().into_owned());
            assert!(in_header.starts_with(b"tmp/"));
        }
        check_bundle(b"data", Some(&ext), &manifest);
    }

    #[test]
    fn bundle_key_joins_dir_and_id() {
        assert_eq!(bundle_key("jobs/in", "abc"), "jobs/in/abc.tar.gz");
        assert_eq!(bundle_key("jobs", "abc"), "jobs/abc.tar.gz");
        assert_eq!(bundle_key("", "abc"), "abc.tar.gz");
        assert_eq!(bundle_key("jobs/", "abc"), "jobs/abc.tar.gz");
    }

    /// Sources `env` in `/bin/sh` and returns what `$name` holds.
    fn sourced(env: &str, name: &str) -> String {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("f"), env).expect("write env file");
        let output = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!(". ./f; printf %s \"${name}\""))
            .current_dir(dir.path())
            .output()
            .expect("run /bin/sh");
        assert!(output.status.success(), "sh failed: {output:?}");
        assert!(output.stderr.is_empty(), "sh complained: {output:?}");
        String::from_utf8(output.stdout).expect("utf-8 output")
    }

    #[test]
    fn env_values_survive_the_shell() {
        let values = [
            ("QUOTE", "it's"),
            ("QUOTES", "'''"),
            ("SPACES", " a  b "),
            ("DOLLAR", "$HOME ${PATH} $(id)"),
            ("BACKTICKS", "`id`"),
            ("SEMICOLON", "a; touch pwned; b"),
            ("MIXED", "'\"\\$`;&|<>*?~#!\t"),
            ("NEWLINE", "line1\nline2"),
            ("EMPTY", ""),
            ("_under_score9", "ok"),
        ];
        let manifest = manifest("job-1", &values);
        let env = render_env(&manifest, "job-1.jpg");
        for (name, value) in values {
            assert_eq!(sourced(&env, name), value, "field {name}");
        }
        assert_eq!(sourced(&env, "ORCHGPU_JOB_ID"), "job-1");
        assert_eq!(sourced(&env, "ORCHGPU_SCHEDULER_JOB"), "42");
        assert_eq!(sourced(&env, "ORCHGPU_INPUT_FILE"), "job-1.jpg");
    }

    #[test]
    fn scheduler_fields_cannot_override_our_variables() {
        let manifest = manifest("job-1", &[("ORCHGPU_JOB_ID", "evil")]);
        let env = render_env(&manifest, "job-1");
        assert_eq!(sourced(&env, "ORCHGPU_JOB_ID"), "job-1");
    }

    #[test]
    fn invalid_shell_names_are_kept_out_of_env_only() {
        let fields = [
            ("RCUDA_DEVICE_COUNT", "1"),
            ("9LIVES", "a"),
            ("WITH-DASH", "b"),
            ("WITH SPACE", "c"),
            ("", "d"),
            ("X;rm", "e"),
            ("ÜNI", "f"),
            ("RCUDA_DEVICE_0", "gpu1:0"),
        ];
        let manifest = manifest(JOB_ID, &fields);
        let env = render_env(&manifest, "x");
        let names: Vec<&str> = env
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|p| p.0)
            .collect();
        let expected = [
            "RCUDA_DEVICE_COUNT",
            "RCUDA_DEVICE_0",
            "ORCHGPU_JOB_ID",
            "ORCHGPU_SCHEDULER_JOB",
            "ORCHGPU_INPUT_FILE",
        ];
        assert_eq!(names, expected);
        assert_eq!(render_txt(&manifest), "1\na\nb\nc\nd\ne\nf\ngpu1:0\n");
        // The whole bundle, .json included, keeps every field.
        check_bundle(b"data", Some("jpg"), &manifest);
    }

    #[test]
    fn txt_lists_values_in_order() {
        assert_eq!(render_txt(&one_gpu()), "1\ngpu1:0\n");
        assert_eq!(render_txt(&three_gpus()), "3\ngpu1:0\ngpu1:1\ngpu2\n");
        assert_eq!(render_txt(&manifest(JOB_ID, &[])), "");
    }

    #[test]
    fn missing_input_is_a_read_error_and_writes_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("missing.jpg");
        let mut out = Vec::new();
        let err = write_bundle(&missing, Some("jpg"), &one_gpu(), &mut out)
            .expect_err("missing input must fail");
        match err {
            BundleError::ReadInput { path, source } => {
                assert_eq!(path, missing);
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("expected ReadInput, got {other:?}"),
        }
        assert!(out.is_empty());
    }

    #[test]
    fn invalid_job_ids_are_refused_before_writing() {
        let input = input_file(b"data");
        for id in [
            "a/b",
            "../x",
            "..",
            "a..b",
            "",
            "a.b",
            "a b",
            "ü",
            &"a".repeat(65),
        ] {
            let mut out = Vec::new();
            let err = write_bundle(input.path(), None, &manifest(id, &[]), &mut out)
                .expect_err("invalid job id must fail");
            assert!(
                matches!(&err, BundleError::InvalidJobId(got) if got == id),
                "{err:?}"
            );
            assert!(out.is_empty());
        }
        assert_eq!(
            BundleError::InvalidJobId("a/b".to_owned()).to_string(),
            r#"invalid job id "a/b""#
        );
    }

    /// Accepts `limit` bytes, then fails like a full disk.
    struct FailingWriter {
        limit: usize,
    }

    impl Write for FailingWriter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.limit == 0 {
                return Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"));
            }
            let n = buf.len().min(self.limit);
            self.limit -= n;
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_failures_are_write_errors() {
        let input = input_file(&pattern(1024 * 1024));
        for limit in [0, 10, 100_000] {
            let err = write_bundle(input.path(), None, &one_gpu(), FailingWriter { limit })
                .expect_err("full output must fail");
            match err {
                BundleError::Write(source) => {
                    assert_eq!(source.kind(), io::ErrorKind::StorageFull, "limit {limit}");
                }
                other => panic!("expected Write, got {other:?}"),
            }
        }
    }

    #[test]
    fn input_reader_stops_at_size_and_keeps_its_own_error() {
        let mut long = InputReader {
            inner: &b"abcdef"[..],
            remaining: 4,
            error: None,
        };
        let mut data = Vec::new();
        long.read_to_end(&mut data).expect("read");
        assert_eq!(data, b"abcd");

        let mut short = InputReader {
            inner: &b"ab"[..],
            remaining: 4,
            error: None,
        };
        let mut data = Vec::new();
        assert!(short.read_to_end(&mut data).is_err());
        let kept = short.error.expect("input error kept");
        assert_eq!(kept.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Keeps the bundle and its largest single write. Once it holds more than
    /// `tamper_after` bytes (well past the gzip header and the `.txt` member), it
    /// overwrites the input file's last bytes with `tail`, in place: the bundle holds the
    /// new tail only if the input was still being read when output reached the writer.
    struct TamperingWriter {
        bundle: Vec<u8>,
        largest_write: usize,
        input: File,
        tail_at: u64,
        tail: Vec<u8>,
        tamper_after: usize,
        tampered_at: Option<usize>,
    }

    impl Write for TamperingWriter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            use std::os::unix::fs::FileExt;

            self.bundle.extend_from_slice(buf);
            self.largest_write = self.largest_write.max(buf.len());
            if self.tampered_at.is_none() && self.bundle.len() > self.tamper_after {
                self.input.write_all_at(&self.tail, self.tail_at)?;
                self.tampered_at = Some(self.bundle.len());
            }
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn large_input_is_streamed() {
        const SIZE: u64 = 64 * 1024 * 1024;
        const CHUNK: u64 = 1024 * 1024;
        let mut file = tempfile::NamedTempFile::new().expect("create temp input");
        // A pattern every 8 MiB, holes between: big on paper, cheap to write and compress.
        let chunk = pattern(CHUNK as usize);
        for offset in (0..SIZE).step_by(8 * CHUNK as usize) {
            file.seek(io::SeekFrom::Start(offset)).expect("seek");
            file.write_all(&chunk).expect("write chunk");
        }
        file.as_file().set_len(SIZE).expect("extend input");

        // The last MiB is a hole now; it becomes noise once 16 KiB of bundle are out.
        let tail = noise(CHUNK as usize);
        let mut out = TamperingWriter {
            bundle: Vec::new(),
            largest_write: 0,
            input: file.reopen().expect("reopen input"),
            tail_at: SIZE - CHUNK,
            tail: tail.clone(),
            tamper_after: 16 * 1024,
            tampered_at: None,
        };
        write_bundle(file.path(), Some("bin"), &one_gpu(), &mut out).expect("write bundle");
        let written = out.bundle.len() as u64;
        assert!(written > 0 && written < SIZE, "wrote {written} bytes");
        assert!(out.tampered_at.is_some(), "wrote only {written} bytes");
        // Output came in pieces, never the input (or the bundle) in one go.
        assert!(
            out.largest_write <= 256 * 1024,
            "a write of {}",
            out.largest_write
        );

        let mut archive = tar::Archive::new(GzDecoder::new(&out.bundle[..]));
        let mut entry = archive
            .entries()
            .expect("read entries")
            .map(|entry| entry.expect("read entry"))
            .find(|entry| {
                entry
                    .path()
                    .expect("path")
                    .ends_with(format!("{JOB_ID}.bin"))
            })
            .expect("input member");
        let mut member = Vec::new();
        entry.read_to_end(&mut member).expect("read input member");
        assert_eq!(member.len() as u64, SIZE);
        assert!(member[..CHUNK as usize] == chunk, "the first MiB differs");
        assert!(
            member[(SIZE - CHUNK) as usize..] == tail,
            "the input was read in full before {:?} bundle bytes reached the writer",
            out.tampered_at
        );
    }

    #[test]
    fn an_input_with_one_of_our_extensions_gets_its_own_member() {
        for ext in ["txt", "env", "json"] {
            let names = member_names("abc", Some(ext));
            assert_eq!(names.input, format!("tmp/abc-input.{ext}"));
            let ours = [&names.txt, &names.env, &names.json];
            assert!(!ours.contains(&&names.input), "{ext}: {names:?}");
        }
        assert_eq!(member_names("abc", Some("png")).input, "tmp/abc.png");
    }
}
