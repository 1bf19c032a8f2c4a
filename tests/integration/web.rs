//! The web page (`src/web/`) and its listener (`src/http.rs`): their refusals over plain
//! HTTP (a rebinding host, no token, a listener off loopback without one, an oversize
//! upload, slow clients, too many uploads, hostile names and paths, cross-site posts,
//! another uploader's jobs), the start-up checks (an overlapping --upload-to, a history
//! that cannot open), nginx in front as docs/operations.md sets it up, and one real
//! browser, headless Chromium through ChromeDriver, uploading dog.jpg through the page
//! (chosen and dropped) with real darknet behind the function.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::harness::{MockSsgm, Stack, http_address, metric_sum, repo_path, wait_for};
use crate::inference::{DARKNET_HOME, weights};

/// A token long enough for `--http-token-file`.
const TOKEN: &str = "web-test-token-0123456789";

struct Reply {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("not JSON ({}): {}", self.status, self.text()))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends a raw request on loopback and reads the answer up to the close.
fn raw(address: &str, request: &[u8]) -> Result<Reply> {
    let mut stream = std::net::TcpStream::connect(address)
        .with_context(|| format!("cannot connect to {address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(request)?;
    let mut response = Vec::new();
    // The server may answer (and close) before it has read the whole body.
    let _ = stream.read_to_end(&mut response);
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            anyhow!(
                "no end of headers in {:?}",
                String::from_utf8_lossy(&response)
            )
        })?;
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head:?}"))?;
    Ok(Reply {
        status,
        head,
        body: response[split + 4..].to_vec(),
    })
}

/// An HTTP/1.0 request with a Content-Length body.
fn request(
    address: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Reply> {
    let mut text = format!("{method} {path} HTTP/1.0\r\nHost: {address}\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = text.into_bytes();
    bytes.extend_from_slice(body);
    raw(address, &bytes)
}

fn get(address: &str, path: &str, headers: &[(&str, &str)]) -> Result<Reply> {
    request(address, "GET", path, headers, b"")
}

fn upload(address: &str, name: &str, headers: &[(&str, &str)], body: &[u8]) -> Result<Reply> {
    let mut all = vec![("X-Filename", name), ("Content-Type", "image/jpeg")];
    all.extend_from_slice(headers);
    request(address, "POST", "/api/uploads", &all, body)
}

/// A stack and a daemon serving the page, uploads going to `<input bucket>/web`.
async fn start(name: &str, extra: &[&str]) -> Result<(Stack, MockSsgm, String)> {
    let (stack, ssgm, address, _) = start_daemon(name, extra).await?;
    Ok((stack, ssgm, address))
}

/// As `start`, also answering the daemon's index; a listener on every address is
/// reached on 127.0.0.1.
async fn start_daemon(name: &str, extra: &[&str]) -> Result<(Stack, MockSsgm, String, usize)> {
    let mut stack = Stack::new(name, 5).await?;
    let ssgm = MockSsgm::start(1)?;
    let upload_to = format!("{}/web", stack.input_bucket);
    let mut args = vec!["--http-listen", "127.0.0.1:0", "--upload-to", &upload_to];
    args.extend_from_slice(extra);
    let daemon = stack.start_daemon(&ssgm, &args)?;
    let address = http_address(&mut stack, daemon)
        .await?
        .replace("0.0.0.0:", "127.0.0.1:");
    Ok((stack, ssgm, address, daemon))
}

/// A token file in `dir`.
fn token_file(dir: &Path) -> Result<String> {
    let path = dir.join("token");
    std::fs::write(&path, format!("{TOKEN}\n"))?;
    Ok(path.to_str().context("utf-8 path")?.to_string())
}

/// Runs orchgpu with the required flags (nothing reachable) plus `extra`, to see it refuse
/// to start.
fn orchgpu_refuses(extra: &[&str]) -> Result<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_orchgpu"))
        .args([
            "-q",
            "jobs",
            "-S",
            "127.0.0.1",
            "-P",
            "1",
            "-m",
            "/bin/sh",
            "-i",
            "work/bundles",
            "-o",
            "out/results",
        ])
        .args(extra)
        .env("ORCHGPU_ENDPOINT_URL", "http://127.0.0.1:9")
        .stdin(Stdio::null())
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "{extra:?}: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    Ok(stderr)
}

/// Files whose name starts with `web-upload.` under `dir`: uploads on disk.
fn upload_temp_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if entry
                .file_name()
                .to_string_lossy()
                .starts_with("web-upload.")
            {
                found.push(path);
            }
        }
    }
    found
}

/// An upload whose body is sent in part, the connection kept open: a slow client.
fn partial_upload(address: &str, declared: usize, sent: usize) -> Result<std::net::TcpStream> {
    let mut stream = std::net::TcpStream::connect(address)?;
    write!(
        stream,
        "POST /api/uploads HTTP/1.1\r\nHost: {address}\r\nX-Filename: slow.jpg\r\nConnection: close\r\n\
         Content-Length: {declared}\r\n\r\n"
    )?;
    stream.write_all(&vec![7u8; sent])?;
    stream.flush()?;
    Ok(stream)
}

/// Reads what the server sends until it closes the connection; the time that took.
fn read_until_closed(
    stream: &mut std::net::TcpStream,
    limit: Duration,
) -> Result<(String, Duration)> {
    let started = Instant::now();
    stream.set_read_timeout(Some(limit))?;
    let mut seen = Vec::new();
    match stream.read_to_end(&mut seen) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => bail!("the server kept the connection open past {limit:?}: {e}"),
    }
    Ok((
        String::from_utf8_lossy(&seen).into_owned(),
        started.elapsed(),
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn web_off_loopback_needs_the_token_for_all_but_metrics_and_health() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let token = token_file(dir.path())?;
    let (stack, _ssgm, address) = start(
        "webtoken",
        &["--http-listen", "0.0.0.0:0", "--http-token-file", &token],
    )
    .await?;

    // Prometheus and the load balancer need no token.
    assert_eq!(get(&address, "/metrics", &[])?.status, 200);
    assert_eq!(get(&address, "/healthz", &[])?.status, 200);
    assert_eq!(get(&address, "/readyz", &[])?.status, 200);
    // The page's shell is open, so a user can enter the token; it carries no data.
    assert_eq!(get(&address, "/", &[])?.status, 200);
    let config = get(&address, "/api/config", &[])?.json()?;
    assert_eq!(config["token_required"], true);
    assert_eq!(config["authorized"], false);

    let no_token = upload(&address, "dog.jpg", &[], b"jpeg bytes")?;
    assert_eq!(no_token.status, 401, "{}", no_token.text());
    let wrong = upload(
        &address,
        "dog.jpg",
        &[("X-Orchgpu-Token", "web-test-token-0123456780")],
        b"x",
    )?;
    assert_eq!(wrong.status, 401, "{}", wrong.text());
    assert_eq!(get(&address, "/api/jobs", &[])?.status, 401);
    assert_eq!(
        request(&address, "POST", "/api/session", &[], b"not the token")?.status,
        401
    );
    assert!(
        stack.keys(&stack.input_bucket, "").await?.is_empty(),
        "an upload got through"
    );

    let ok = upload(
        &address,
        "dog.jpg",
        &[("X-Orchgpu-Token", TOKEN)],
        b"jpeg bytes",
    )?;
    assert_eq!(ok.status, 201, "{}", ok.text());
    let handle = ok.json()?["handle"]
        .as_str()
        .context("no handle")?
        .to_string();
    // Even the handle opens nothing without the token.
    for path in [
        format!("/api/uploads/{handle}"),
        format!("/results/{handle}.png"),
        format!("/results/{handle}.txt"),
    ] {
        let reply = get(&address, &path, &[])?;
        assert_eq!(reply.status, 401, "{path}: {}", reply.text());
    }
    // Entering the token on the page sets an HTTP-only, expiring session cookie that
    // then opens the API; it holds a MAC, not the token.
    let session = request(&address, "POST", "/api/session", &[], TOKEN.as_bytes())?;
    assert_eq!(session.status, 204, "{}", session.text());
    let cookie = session.header("set-cookie").context("no cookie set")?;
    assert!(
        cookie.contains("HttpOnly")
            && cookie.contains("SameSite=Strict")
            && cookie.contains("Max-Age="),
        "{cookie}"
    );
    assert!(!cookie.contains("Secure"), "no proxy said HTTPS: {cookie}");
    assert!(!cookie.contains(TOKEN), "{cookie}");
    let pair = cookie.split(';').next().context("empty cookie")?;
    assert_eq!(get(&address, "/api/jobs", &[("Cookie", pair)])?.status, 200);
    let view = get(
        &address,
        &format!("/api/uploads/{handle}"),
        &[("Cookie", pair)],
    )?;
    assert_eq!(view.status, 200, "{}", view.text());
    let forged = pair.replace(|c: char| c.is_ascii_digit(), "1");
    assert_eq!(
        get(&address, "/api/jobs", &[("Cookie", &forged)])?.status,
        401
    );
    assert_eq!(stack.keys(&stack.input_bucket, "").await?.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn web_off_loopback_without_a_token_refuses_to_start() -> Result<()> {
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let stderr = orchgpu_refuses(&["--http-listen", listen])?;
        assert!(stderr.contains("--http-token-file"), "{stderr}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn web_upload_place_overlapping_the_functions_places_refuses_to_start() -> Result<()> {
    for place in [
        "work/bundles/web",
        "work",
        "out/results",
        "out/orchgpu-claims",
    ] {
        let stderr = orchgpu_refuses(&["--upload-to", place])?;
        assert!(
            stderr.contains("--upload-to") && stderr.contains("overlaps"),
            "{place}: {stderr}"
        );
    }
    Ok(())
}

/// Any use case's outputs: the page lists every file the function wrote for one's own
/// job, serves each with a type from our own table (images and plain text shown, SVG and
/// bytes as attachments), and never lists or serves a name from S3 that is not a plain
/// suffix, nor takes a path from a request.
#[tokio::test(flavor = "multi_thread")]
async fn web_lists_and_serves_every_output_of_a_job_by_its_handle() -> Result<()> {
    let (mut stack, _ssgm, address) = start("weboutputs", &["--result-suffix", ".png"]).await?;
    stack.start_function("many-outputs.sh")?;
    let uploaded = upload(&address, "page.png", &[], b"png bytes")?;
    assert_eq!(uploaded.status, 201, "{}", uploaded.text());
    let answer = uploaded.json()?;
    let handle = answer["handle"].as_str().context("no handle")?.to_string();
    let job_id = answer["job_id"].as_str().context("no job id")?.to_string();
    // Hostile names beside the job's files, as a broken or malicious function could
    // write them: never listed, never served.
    for hostile in [
        format!("{job_id}.a b"),
        format!("{job_id}.x/../../secret"),
        format!("{job_id}..hidden"),
        format!("{job_id}.\u{e9}t\u{e9}"),
        job_id.clone(),
    ] {
        stack
            .s3
            .put_object()
            .bucket(&stack.output_bucket)
            .key(format!("{}/{hostile}", stack.output_dir))
            .body(b"decoy".to_vec().into())
            .send()
            .await?;
    }
    let view = wait_for("the final view", Duration::from_secs(60), || async {
        let reply = get(&address, &format!("/api/uploads/{handle}"), &[])?;
        let view = reply.json()?;
        Ok(
            (view["final"] == true && view["outputs"].as_array().is_some_and(|o| o.len() >= 5))
                .then_some(view),
        )
    })
    .await?;
    let mut listed: Vec<(String, String)> = view["outputs"]
        .as_array()
        .context("outputs")?
        .iter()
        .map(|o| {
            (
                o["suffix"].as_str().unwrap_or("").to_owned(),
                o["kind"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            (".bin".to_string(), "file".to_string()),
            (".png".into(), "image".into()),
            (".svg".into(), "file".into()),
            (".tsv".into(), "text".into()),
            (".txt".into(), "text".into()),
        ],
        "{view}"
    );
    // Not a detections file: plain text, so no detections.
    assert!(view["detections"].is_null(), "{view}");

    for (suffix, content_type, attachment, body) in [
        (".png", "image/png", false, &b"png bytes"[..]),
        (
            ".txt",
            "text/plain; charset=utf-8",
            false,
            &b"recognised words for "[..],
        ),
        (
            ".tsv",
            "text/plain; charset=utf-8",
            false,
            &b"level\ttext"[..],
        ),
        (".svg", "application/octet-stream", true, &b"<svg"[..]),
        (
            ".bin",
            "application/octet-stream",
            true,
            &b"\x01\x02\x03"[..],
        ),
    ] {
        let reply = get(&address, &format!("/results/{handle}{suffix}"), &[])?;
        assert_eq!(reply.status, 200, "{suffix}: {}", reply.text());
        assert_eq!(reply.header("content-type"), Some(content_type), "{suffix}");
        assert_eq!(
            reply.header("content-disposition") == Some("attachment"),
            attachment,
            "{suffix}"
        );
        assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
        assert!(reply.body.starts_with(body), "{suffix}: {}", reply.text());
    }
    for path in [
        format!("/results/{handle}.a%20b"),
        format!("/results/{handle}.x%2F..%2F..%2Fsecret"),
        format!("/results/{handle}..hidden"),
        format!("/results/{handle}"),
        format!("/results/{handle}.%C3%A9t%C3%A9"),
        format!("/results/{job_id}.txt"),
        format!("/results/{}.txt", &handle[..handle.len() - 1]),
    ] {
        let reply = get(&address, &path, &[])?;
        assert_eq!(reply.status, 404, "{path}: {}", reply.text());
        assert!(!reply.text().contains("decoy"), "{path}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn web_rebinding_host_can_neither_upload_nor_read() -> Result<()> {
    let (stack, _ssgm, address) = start("webrebind", &[]).await?;
    let own = upload(&address, "mine.jpg", &[], b"jpeg bytes")?;
    assert_eq!(own.status, 201, "{}", own.text());
    let handle = own.json()?["handle"]
        .as_str()
        .context("no handle")?
        .to_string();
    let port = address.rsplit(':').next().context("a port")?;

    // What a page on rebind.example sends once its name resolves to 127.0.0.1.
    let host = format!("rebind.example:{port}");
    let origin = format!("http://{host}");
    let attacker = |method: &str, path: &str, body: &[u8]| -> Result<Reply> {
        let text = format!(
            "{method} {path} HTTP/1.0\r\nHost: {host}\r\nOrigin: {origin}\r\n\
             Sec-Fetch-Site: same-origin\r\nX-Filename: evil.jpg\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        let mut bytes = text.into_bytes();
        bytes.extend_from_slice(body);
        raw(&address, &bytes)
    };
    let posted = attacker("POST", "/api/uploads", b"jpeg bytes")?;
    assert_eq!(posted.status, 421, "{}", posted.text());
    for path in [
        "/api/jobs".to_string(),
        format!("/api/uploads/{handle}"),
        format!("/results/{handle}.png"),
        "/api/config".to_string(),
        "/".to_string(),
        "/metrics".to_string(),
    ] {
        let reply = attacker("GET", &path, b"")?;
        assert_eq!(reply.status, 421, "{path}: {}", reply.text());
        assert!(
            !reply.text().contains(&handle[..20]),
            "{path} leaked the job"
        );
    }
    // An absolute URI naming the attacker is refused too, whatever Host says.
    let absolute = raw(
        &address,
        format!(
            "GET http://{host}/api/config HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )?;
    assert_eq!(absolute.status, 421, "{}", absolute.text());
    assert_eq!(
        stack.keys(&stack.input_bucket, "").await?.len(),
        1,
        "the rebinding upload got through"
    );
    // No name at all is no browser (an HTTP/1.0 health check): it is answered.
    let probe = raw(&address, b"GET /healthz HTTP/1.0\r\n\r\n")?;
    assert_eq!(probe.status, 200, "{}", probe.text());
    // The listener's own names still work.
    for name in ["localhost", "127.0.0.1"] {
        let text = format!("GET /api/config HTTP/1.0\r\nHost: {name}:{port}\r\n\r\n");
        assert_eq!(raw(&address, text.as_bytes())?.status, 200, "{name}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn web_one_uploader_cannot_read_another_uploaders_jobs() -> Result<()> {
    let (_stack, _ssgm, address) = start("webmine", &[]).await?;
    let a = upload(&address, "a.jpg", &[], b"first bytes")?.json()?;
    let b = upload(&address, "b.jpg", &[], b"other bytes")?.json()?;
    let handle_a = a["handle"].as_str().context("no handle")?;
    let job_b = b["job_id"].as_str().context("no job id")?;
    assert_eq!(handle_a.len(), 52, "{handle_a}");

    let mine = get(&address, &format!("/api/uploads/{handle_a}"), &[])?;
    assert_eq!(mine.status, 200, "{}", mine.text());
    let mine = mine.json()?;
    // An uploader's view says what happens in words: no key, error text or owner.
    for field in ["key", "reason", "owner", "scheduler_job"] {
        assert!(
            mine[field].is_null(),
            "{field} shown to an uploader: {mine}"
        );
    }
    // B's job id is no secret, but opens nothing: not as itself, not under A's MAC.
    let forged = format!("{job_b}{}", &handle_a[20..]);
    for (path, status) in [
        (format!("/api/uploads/{forged}"), 404),
        (format!("/api/uploads/{job_b}"), 404),
        (format!("/results/{forged}.png"), 404),
        (format!("/results/{job_b}.png"), 404),
        (format!("/results/{job_b}.txt"), 404),
        (format!("/api/jobs/{job_b}"), 403),
        ("/api/jobs".to_string(), 403),
    ] {
        let reply = get(&address, &path, &[])?;
        assert_eq!(reply.status, status, "{path}: {}", reply.text());
        assert!(!reply.text().contains("b.jpg"), "{path}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn web_polling_pages_cost_s3_one_refresh_per_job_per_few_seconds() -> Result<()> {
    // Uploads into a bucket no daemon hears from: the job stays unknown to the history,
    // so every refresh of its view asks S3 (a HEAD for the result, a GET of its claim).
    let mut stack = Stack::new("webpoll", 5).await?;
    let ssgm = MockSsgm::start(1)?;
    let upload_to = format!("{}/unheard", stack.work_bucket);
    let daemon = stack.start_daemon(
        &ssgm,
        &["--http-listen", "127.0.0.1:0", "--upload-to", &upload_to],
    )?;
    let address = http_address(&mut stack, daemon).await?;
    let reply = upload(&address, "polled.jpg", &[], b"jpeg bytes")?;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let handle = reply.json()?["handle"]
        .as_str()
        .context("no handle")?
        .to_string();
    let s3_requests = || -> Result<f64> {
        let metrics = get(&address, "/metrics", &[])?.text();
        Ok(["HeadObject", "GetObject"]
            .iter()
            .map(|op| metric_sum(&metrics, "orchgpu_aws_requests_total", &[("operation", op)]))
            .sum())
    };
    let before = s3_requests()?;
    // Eight pages, each asking ten times a second for 6 s.
    let started = Instant::now();
    let path = format!("/api/uploads/{handle}");
    let pages: Vec<_> = (0..8)
        .map(|_| {
            let (address, path) = (address.clone(), path.clone());
            std::thread::spawn(move || -> Result<u32> {
                let mut asked = 0;
                while started.elapsed() < Duration::from_secs(6) {
                    let view = get(&address, &path, &[])?;
                    assert_eq!(view.status, 200, "{}", view.text());
                    asked += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Ok(asked)
            })
        })
        .collect();
    let mut asked = 0;
    for page in pages {
        asked += page.join().map_err(|_| anyhow!("a page panicked"))??;
    }
    let spent = s3_requests()? - before;
    let secs = started.elapsed().as_secs_f64();
    eprintln!("{asked} status requests in {secs:.1} s cost {spent} S3 requests");
    assert!(asked >= 200, "only {asked} requests");
    // One refresh (two requests) per 3 s, plus the one in progress at the end.
    let most = 2.0 * ((secs / 3.0).floor() + 1.0);
    assert!(
        spent <= most,
        "{spent} S3 requests for {asked} asks in {secs:.1} s (at most {most})"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn web_slow_clients_are_cut_off_and_leave_no_temp_file() -> Result<()> {
    let work = tempfile::tempdir()?;
    let work_dir = work.path().to_str().context("utf-8")?;
    let (_stack, _ssgm, address) = start(
        "webslow",
        &[
            "--http-header-timeout",
            "1",
            "--http-body-timeout",
            "1",
            "--work-dir",
            work_dir,
        ],
    )
    .await?;

    // A head that never ends (slowloris).
    let mut stream = std::net::TcpStream::connect(&address)?;
    write!(
        stream,
        "GET /api/config HTTP/1.1\r\nHost: {address}\r\nX-Slow: 1"
    )?;
    let (_, took) = read_until_closed(&mut stream, Duration::from_secs(10))?;
    assert!(took < Duration::from_secs(5), "head cut off after {took:?}");
    // An idle keep-alive connection is closed as well.
    let mut stream = std::net::TcpStream::connect(&address)?;
    write!(stream, "GET /healthz HTTP/1.1\r\nHost: {address}\r\n\r\n")?;
    let (seen, took) = read_until_closed(&mut stream, Duration::from_secs(10))?;
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(
        took < Duration::from_secs(5),
        "idle connection closed after {took:?}"
    );

    // A body that stops halfway.
    let mut stream = partial_upload(&address, 1000, 100)?;
    wait_for(
        "the slow upload's temp file",
        Duration::from_secs(5),
        || async { Ok((!upload_temp_files(work.path()).is_empty()).then_some(())) },
    )
    .await?;
    let (seen, took) = read_until_closed(&mut stream, Duration::from_secs(10))?;
    assert!(
        took < Duration::from_secs(5),
        "body cut off after {took:?}: {seen}"
    );
    assert!(seen.starts_with("HTTP/1.1 400"), "{seen}");
    wait_for("the temp file to go", Duration::from_secs(5), || async {
        Ok(upload_temp_files(work.path()).is_empty().then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn web_uploads_past_the_cap_or_the_disk_budget_are_refused() -> Result<()> {
    let work = tempfile::tempdir()?;
    let work_dir = work.path().to_str().context("utf-8")?;
    let (stack, _ssgm, address) = start(
        "webcap",
        &[
            "--upload-max-concurrent",
            "2",
            "--upload-max-bytes",
            "1000",
            "--upload-disk-budget",
            "1500",
            "--work-dir",
            work_dir,
        ],
    )
    .await?;

    // One slow upload holds a slot and 1000 bytes of the budget.
    let mut first = partial_upload(&address, 1000, 10)?;
    wait_for(
        "the first upload's temp file",
        Duration::from_secs(5),
        || async { Ok((upload_temp_files(work.path()).len() == 1).then_some(())) },
    )
    .await?;
    let no_room = upload(&address, "big.jpg", &[], &[7u8; 600])?;
    assert_eq!(no_room.status, 507, "{}", no_room.text());
    assert!(no_room.text().contains("no room"), "{}", no_room.text());
    // The second slot: a slow one that fits the budget.
    let mut second = partial_upload(&address, 400, 10)?;
    wait_for(
        "the second upload's temp file",
        Duration::from_secs(5),
        || async { Ok((upload_temp_files(work.path()).len() == 2).then_some(())) },
    )
    .await?;
    let busy = upload(&address, "third.jpg", &[], b"jpeg bytes")?;
    assert_eq!(busy.status, 429, "{}", busy.text());
    assert!(busy.text().contains("2 uploads at once"), "{}", busy.text());
    assert_eq!(busy.header("retry-after"), Some("5"));
    assert_eq!(
        upload_temp_files(work.path()).len(),
        2,
        "the refused ones left files"
    );

    // Both finish: the slots, the budget and the disk are free again.
    first.write_all(&[7u8; 990])?;
    second.write_all(&[7u8; 390])?;
    for stream in [&mut first, &mut second] {
        let (seen, _) = read_until_closed(stream, Duration::from_secs(30))?;
        assert!(seen.starts_with("HTTP/1.1 201"), "{seen}");
    }
    assert!(upload_temp_files(work.path()).is_empty());
    let after = upload(&address, "big.jpg", &[], &[7u8; 1000])?;
    assert_eq!(after.status, 201, "{}", after.text());
    assert_eq!(stack.keys(&stack.input_bucket, "").await?.len(), 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn web_a_history_that_cannot_open_shows_on_metrics() -> Result<()> {
    let mut stack = Stack::new("webhistory", 5).await?;
    let ssgm = MockSsgm::start(1)?;
    // A directory where the history's file should be: SQLite cannot open it.
    let state = stack.state_dir("broken-history");
    std::fs::create_dir_all(Path::new(&state).join("history.sqlite3"))?;
    let daemon = stack.start_daemon(
        &ssgm,
        &["--http-listen", "127.0.0.1:0", "--state-dir", &state],
    )?;
    let address = http_address(&mut stack, daemon).await?;
    let metrics = get(&address, "/metrics", &[])?.text();
    assert_eq!(
        metric_sum(&metrics, "orchgpu_history_enabled", &[]),
        0.0,
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("orchgpu_history_enabled")),
        "no sample: {metrics}"
    );
    // A history that opens says 1; --no-history has no sample (nothing to alert on).
    let daemon = stack.start_daemon(&ssgm, &["--http-listen", "127.0.0.1:0"])?;
    let address = http_address(&mut stack, daemon).await?;
    let metrics = get(&address, "/metrics", &[])?.text();
    assert_eq!(metric_sum(&metrics, "orchgpu_history_enabled", &[]), 1.0);
    let no_history_state = stack.state_dir("none");
    let daemon = stack.start_daemon(
        &ssgm,
        &[
            "--http-listen",
            "127.0.0.1:0",
            "--no-history",
            "--state-dir",
            &no_history_state,
        ],
    )?;
    let address = http_address(&mut stack, daemon).await?;
    let metrics = get(&address, "/metrics", &[])?.text();
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("orchgpu_history_enabled")),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn web_refuses_an_oversize_upload_declared_or_streamed() -> Result<()> {
    let (stack, _ssgm, address) = start("websize", &["--upload-max-bytes", "1000"]).await?;

    let declared = upload(&address, "big.jpg", &[], &[7u8; 5000])?;
    assert_eq!(declared.status, 413, "{}", declared.text());
    // Chunked, so no length is declared: refused while it streams.
    let mut chunked = format!(
        "POST /api/uploads HTTP/1.1\r\nHost: {address}\r\nX-Filename: big.jpg\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..3 {
        chunked.extend_from_slice(b"258\r\n");
        chunked.extend_from_slice(&[7u8; 600]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let streamed = raw(&address, &chunked)?;
    assert_eq!(streamed.status, 413, "{}", streamed.text());
    assert!(
        stack.keys(&stack.input_bucket, "").await?.is_empty(),
        "an oversize upload got through"
    );

    let at_limit = upload(&address, "fits.jpg", &[], &[7u8; 1000])?;
    assert_eq!(at_limit.status, 201, "{}", at_limit.text());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn web_hostile_names_and_paths_reach_neither_another_key_nor_another_object() -> Result<()> {
    let (stack, _ssgm, address) = start("webnames", &[]).await?;

    let hostile = "..%2F..%2F..%2Fetc%2Fpasswd%00.jpg";
    let reply = upload(&address, hostile, &[], b"jpeg bytes")?;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let body = reply.json()?;
    let key = body["key"].as_str().context("no key")?;
    assert!(
        key.starts_with("web/") && key.ends_with("-passwd_.jpg"),
        "{key}"
    );
    assert_eq!(key.matches('/').count(), 1, "{key}");
    let handle = body["handle"].as_str().context("no handle")?.to_string();
    assert_eq!(
        stack.keys(&stack.input_bucket, "").await?,
        vec![key.to_string()]
    );
    // The handle's job id is the one the daemon derives from the notification: the
    // history, read through the page's API, knows it (no longer just queued).
    let path = format!("/api/uploads/{handle}");
    wait_for(
        "the upload's job in the history",
        Duration::from_secs(30),
        || async {
            let job = get(&address, &path, &[])?.json()?;
            Ok((job["state"].as_str() != Some("queued")).then_some(()))
        },
    )
    .await?;

    // A decoy outside the output dir: no request path may reach it.
    stack
        .s3
        .put_object()
        .bucket(&stack.output_bucket)
        .key("secret.png")
        .body(b"decoy".to_vec().into())
        .send()
        .await?;
    for path in [
        "/results/..%2Fsecret.png",
        "/results/../secret.png",
        "/results/%2e%2e%2fsecret.png",
        "/results/secret.png",
        "/results/0123456789abcdef0123.png",
        "/results/0123456789ABCDEF0123.png",
        "/api/uploads/..%2F..%2Fetc%2Fpasswd",
        "/api/uploads/0123456789abcdef0123",
    ] {
        let reply = get(&address, path, &[])?;
        assert_eq!(reply.status, 404, "{path}: {}", reply.text());
        assert!(!reply.text().contains("decoy"), "{path}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn web_refuses_cross_site_posts_and_sends_a_strict_csp() -> Result<()> {
    let (stack, _ssgm, address) = start("weborigin", &[]).await?;

    for headers in [
        vec![("Origin", "http://evil.example")],
        vec![("Origin", "null")],
        vec![("Sec-Fetch-Site", "cross-site")],
        vec![
            ("Sec-Fetch-Site", "same-site"),
            ("Origin", "http://sub.example"),
        ],
    ] {
        let reply = upload(&address, "dog.jpg", &headers, b"jpeg bytes")?;
        assert_eq!(reply.status, 403, "{headers:?}: {}", reply.text());
    }
    assert!(
        stack.keys(&stack.input_bucket, "").await?.is_empty(),
        "a cross-site upload got through"
    );
    let own = format!("http://{address}");
    let reply = upload(
        &address,
        "dog.jpg",
        &[("Origin", &own), ("Sec-Fetch-Site", "same-origin")],
        b"jpeg bytes",
    )?;
    assert_eq!(reply.status, 201, "{}", reply.text());

    let page = get(&address, "/", &[])?;
    let csp = page.header("content-security-policy").context("no CSP")?;
    assert!(
        csp.contains("default-src 'self'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    assert!(
        !page.text().contains("<script>"),
        "an inline script would be blocked by the CSP"
    );
    Ok(())
}

/// nginx (Debian's package, dev/install-nginx.sh) on free loopback ports, killed on drop.
struct Nginx {
    child: Child,
    https_port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const NGINX_CONF: &str = "deploy/nginx/orchgpu.conf";

fn nginx_program() -> Result<String> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .map(str::to_owned)
        .context("nginx is not installed: run dev/install-nginx.sh (apt-get install nginx ssl-cert curl, as root); this test does not skip")
}

/// A main nginx.conf around `site` (a server-block file, as sites-enabled/ holds), with
/// every path nginx writes inside `dir`.
fn nginx_main_conf(dir: &Path, site: &Path) -> Result<std::path::PathBuf> {
    let d = dir.display();
    let main = dir.join("nginx.conf");
    std::fs::write(
        &main,
        format!(
            "pid {d}/nginx.pid;\nevents {{}}\nhttp {{\n  access_log off;\n  \
             client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  \
             scgi_temp_path {d}/scgi;\n  include {};\n}}\n",
            site.display()
        ),
    )?;
    Ok(main)
}

fn nginx_command(dir: &Path, main: &Path) -> Result<Command> {
    let mut command = Command::new(nginx_program()?);
    command
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(main);
    Ok(command)
}

impl Nginx {
    /// The shipped config with its ports moved to free loopback ones and its backend to
    /// `backend`.
    async fn start(backend: &str) -> Result<Nginx> {
        let dir = tempfile::tempdir()?;
        let free = || -> Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        };
        let (http_port, https_port) = (free()?, free()?);
        let shipped = std::fs::read_to_string(repo_path(NGINX_CONF))?;
        let site = shipped
            .replace("listen 80;", &format!("listen 127.0.0.1:{http_port};"))
            .replace("listen [::]:80;", "")
            .replace("listen 443 ", &format!("listen 127.0.0.1:{https_port} "))
            .replace("listen [::]:443 ssl http2;", "")
            .replace("127.0.0.1:9464", backend);
        assert_ne!(site, shipped);
        let site_path = dir.path().join("orchgpu.conf");
        std::fs::write(&site_path, site)?;
        let main = nginx_main_conf(dir.path(), &site_path)?;
        let child = nginx_command(dir.path(), &main)?
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start nginx")?;
        let nginx = Nginx {
            child,
            https_port,
            _dir: dir,
        };
        wait_for("nginx to listen", Duration::from_secs(20), || async move {
            Ok(std::net::TcpStream::connect(("127.0.0.1", https_port))
                .ok()
                .map(|_| ()))
        })
        .await?;
        Ok(nginx)
    }

    /// curl through nginx's HTTPS port as `name` (its certificate is not checked: the
    /// snake-oil pair); returns the status line and headers, and the body.
    fn curl(&self, name: &str, path: &str, extra: &[&str]) -> Result<(String, String)> {
        let port = self.https_port;
        let output = Command::new("curl")
            .args(["-sSk", "-D", "-", "--max-time", "20", "--resolve"])
            .arg(format!("{name}:{port}:127.0.0.1"))
            .args(extra)
            .arg(format!("https://{name}:{port}{path}"))
            .output()
            .context("cannot run curl: run dev/install-nginx.sh")?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "curl {path}: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        Ok((head.to_string(), body.to_string()))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn web_behind_the_shipped_nginx_config_over_tls() -> Result<()> {
    // The shipped file as an operator installs it: `nginx -t` passes.
    let dir = tempfile::tempdir()?;
    let main = nginx_main_conf(dir.path(), &repo_path(NGINX_CONF))?;
    let checked = nginx_command(dir.path(), &main)?.arg("-t").output()?;
    assert!(
        checked.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&checked.stderr)
    );

    let token_dir = tempfile::tempdir()?;
    let token = token_file(token_dir.path())?;
    let (_stack, _ssgm, address) = start(
        "webnginx",
        &[
            "--http-allowed-hosts",
            "orchgpu.example.org",
            "--http-token-file",
            &token,
        ],
    )
    .await?;
    let nginx = Nginx::start(&address).await?;

    let (head, body) = nginx.curl("orchgpu.example.org", "/api/config", &[])?;
    assert!(
        head.starts_with("HTTP/2 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(body.contains("\"token_required\":true"), "{body}");
    // Over TLS through the proxy the session cookie is Secure.
    let (head, _) = nginx.curl(
        "orchgpu.example.org",
        "/api/session",
        &["--data-binary", TOKEN],
    )?;
    let cookie = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .with_context(|| format!("no cookie: {head}"))?;
    assert!(cookie.contains("; Secure"), "{cookie}");
    // A name the proxy passes on but orchgpu was not given: refused, as rebinding is.
    let (head, _) = nginx.curl("rebind.example", "/api/config", &[])?;
    assert!(head.contains(" 421"), "{head}");
    // Prometheus scrapes orchgpu directly, not through the proxy.
    let (head, _) = nginx.curl("orchgpu.example.org", "/metrics", &[])?;
    assert!(head.contains(" 404"), "{head}");
    // Directly, the proxy's name with no proxy in between gets no Secure cookie.
    let direct = request(&address, "POST", "/api/session", &[], TOKEN.as_bytes())?;
    assert!(!direct.header("set-cookie").unwrap_or("").contains("Secure"));
    Ok(())
}

/// A ChromeDriver on a free loopback port, killed on drop.
struct ChromeDriver {
    child: Child,
    url: String,
}

impl ChromeDriver {
    async fn start(log: &Path) -> Result<ChromeDriver> {
        for tool in ["chromium", "chromedriver"] {
            let found = std::env::var_os("PATH")
                .iter()
                .flat_map(std::env::split_paths)
                .any(|dir| dir.join(tool).is_file());
            if !found {
                bail!(
                    "{tool} is not installed: run dev/install-chromium.sh (apt-get install \
                     chromium chromium-driver, as root); this test does not skip"
                );
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .context("cannot start chromedriver")?;
        let driver = ChromeDriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        wait_for(
            "chromedriver to listen",
            Duration::from_secs(20),
            || async move {
                Ok(std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(|_| ()))
            },
        )
        .await?;
        Ok(driver)
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One attribute of the first element matching `css`, `None` while there is none.
async fn attribute(browser: &fantoccini::Client, css: &str, name: &str) -> Result<Option<String>> {
    match browser.find(fantoccini::Locator::Css(css)).await {
        Ok(element) => Ok(element.attr(name).await?),
        Err(e) if e.is_no_such_element() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn web_page_in_chromium_uploads_dog_jpg_and_shows_the_dog() -> Result<()> {
    let weights = weights()?;
    let mut stack = Stack::new("webpage", 5).await?;
    let driver = ChromeDriver::start(&stack.logs.path().join("chromedriver.log")).await?;
    let ssgm = MockSsgm::start(1)?;
    stack.start_function_script(
        &repo_path("scar/yolo/detect.sh"),
        &[
            ("DARKNET_HOME", DARKNET_HOME.as_ref()),
            ("DARKNET_WEIGHTS", weights.as_os_str()),
        ],
    )?;
    let upload_to = format!("{}/web", stack.input_bucket);
    let token_dir = tempfile::tempdir()?;
    let token = token_file(token_dir.path())?;
    let daemon = stack.start_daemon(
        &ssgm,
        &[
            "--http-listen",
            "127.0.0.1:0",
            "--upload-to",
            &upload_to,
            "--http-token-file",
            &token,
        ],
    )?;
    let address = http_address(&mut stack, daemon).await?;

    let profile = tempfile::tempdir()?;
    let capabilities = serde_json::json!({
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=900,1400",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        }
    });
    let serde_json::Value::Object(capabilities) = capabilities else {
        bail!("capabilities are an object");
    };
    let browser =
        fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&driver.url)
            .await
            .context("cannot start headless Chromium through chromedriver")?;
    let outcome = drive(&browser, &address).await;
    // The last screenshot, whatever happened: the phone-width page.
    let screenshot = browser.screenshot().await;
    browser.close().await?;
    if let Ok(png) = screenshot {
        save_screenshot("web-page-phone.png", &png)?;
    }
    let seen = outcome?;
    eprintln!("states seen on the page: {seen}");
    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;
    ssgm.assert_all_released()?;
    Ok(())
}

fn save_screenshot(name: &str, png: &[u8]) -> Result<()> {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&path, png)?;
    eprintln!("screenshot: {}", path.display());
    Ok(())
}

/// Standard base64 (with padding), for handing a file to the page's script.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Waits until the newest card's figures are final; returns the states it went through.
async fn until_final(browser: &fantoccini::Client) -> Result<String> {
    wait_for(
        "the card to reach its final figures",
        Duration::from_secs(180),
        || async {
            let state = attribute(browser, "li.card", "data-state").await?;
            let last = attribute(browser, "li.card", "data-final").await?;
            Ok(match state.as_deref() {
                Some("failed" | "dropped" | "error" | "gone") => {
                    attribute(browser, "li.card", "data-seen").await?
                }
                Some("done") if last.is_some() => {
                    attribute(browser, "li.card", "data-seen").await?
                }
                _ => None,
            })
        },
    )
    .await
}

/// Checks the newest card: done through the pipeline's states, its own duration, the
/// annotated image (through orchgpu, at the input's size) and "dog" among the detections.
async fn check_card(browser: &fantoccini::Client, seen: &str) -> Result<()> {
    use fantoccini::Locator::Css;
    let summary = browser
        .find(Css("li.card:first-child .summary"))
        .await?
        .text()
        .await?;
    let states: Vec<&str> = seen.split(' ').collect();
    assert_eq!(states.last(), Some(&"done"), "{seen}: {summary}");
    assert_eq!(&states[..2], ["uploading", "uploaded"], "{seen}");
    assert!(
        states
            .iter()
            .any(|s| ["queued", "received", "waiting_for_gpus", "running"].contains(s)),
        "the job went straight to done: {seen}"
    );
    // The job's own figure, from its pick-up to its end (darknet alone takes ~0.8 s
    // here, docs/inference.md), never one read from an unfinished record.
    let took: f64 = summary
        .split("Took ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no duration in {summary:?}"))?;
    assert!(took >= 0.5, "took {took} s: {summary}");

    let width = wait_for(
        "the annotated image to load",
        Duration::from_secs(30),
        || async {
            let width = browser
                .execute(
                    "const i = document.querySelector('li.card img'); \
                 return i && i.complete ? i.naturalWidth : 0;",
                    vec![],
                )
                .await?;
            Ok(width.as_u64().filter(|w| *w > 0))
        },
    )
    .await?;
    assert_eq!(width, 768);
    let src = attribute(browser, "li.card:first-child img", "src")
        .await?
        .unwrap_or_default();
    // By the upload's handle, not its job id.
    assert!(
        src.starts_with("/results/")
            && src.ends_with(".png")
            && src.len() == "/results/".len() + 52 + 4,
        "{src}"
    );
    let detections = browser
        .find(Css("li.card:first-child ul.detections"))
        .await?
        .text()
        .await?;
    assert!(
        detections.lines().any(|l| l.starts_with("dog ")),
        "no dog in the detections on the page: {detections:?}"
    );
    let links = browser
        .find_all(Css("li.card:first-child .links a"))
        .await?;
    assert_eq!(
        links.len(),
        2,
        "download links for the image and the detections"
    );
    Ok(())
}

/// Enters the token, uploads dog.jpg through the file picker and follows its card to the
/// result (desktop screenshot), then at phone width drops dog.jpg on the page and follows
/// that one too; returns the states the first card went through.
async fn drive(browser: &fantoccini::Client, address: &str) -> Result<String> {
    use fantoccini::Locator::Css;
    browser.goto(&format!("http://{address}/")).await?;
    wait_for("the token form", Duration::from_secs(20), || async {
        Ok(attribute(browser, "#token", "hidden")
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    browser
        .find(Css("#token-input"))
        .await?
        .send_keys(TOKEN)
        .await?;
    browser
        .find(Css("#token-form button"))
        .await?
        .click()
        .await?;
    wait_for("the upload form", Duration::from_secs(20), || async {
        Ok(attribute(browser, "#upload", "hidden")
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    let started = Instant::now();
    browser
        .find(Css("#files"))
        .await?
        .send_keys(&format!("{DARKNET_HOME}/data/dog.jpg"))
        .await?;
    let seen = until_final(browser).await?;
    check_card(browser, &seen).await?;
    eprintln!(
        "dog.jpg through the page: final after {:.1?}",
        started.elapsed()
    );
    // A token holder is an operator: the recent jobs of every source are listed.
    wait_for("the recent jobs", Duration::from_secs(20), || async {
        Ok(browser
            .find_all(Css("#recent tbody tr"))
            .await?
            .len()
            .checked_sub(1)
            .map(|_| ()))
    })
    .await?;
    if let Ok(png) = browser.screenshot().await {
        save_screenshot("web-page.png", &png)?;
    }

    // A phone, and a file dropped on the page instead of chosen.
    browser.set_window_size(390, 844).await?;
    let dog = std::fs::read(format!("{DARKNET_HOME}/data/dog.jpg"))?;
    let dropped = browser
        .execute(
            "const [data, name] = arguments; \
             const text = atob(data); const bytes = new Uint8Array(text.length); \
             for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i); \
             const dt = new DataTransfer(); \
             dt.items.add(new File([bytes], name, { type: 'image/jpeg' })); \
             const zone = document.getElementById('drop'); \
             for (const type of ['dragenter', 'dragover', 'drop']) \
               zone.dispatchEvent(new DragEvent(type, { dataTransfer: dt, bubbles: true, cancelable: true })); \
             return document.querySelectorAll('li.card').length;",
            vec![
                serde_json::Value::String(base64(&dog)),
                serde_json::Value::String("dropped dog.jpg".into()),
            ],
        )
        .await?;
    assert_eq!(dropped.as_u64(), Some(2), "the drop made no card");
    let title = browser.find(Css("li.card h3")).await?.text().await?;
    assert_eq!(title, "dropped dog.jpg");
    let phone_seen = until_final(browser).await?;
    check_card(browser, &phone_seen).await?;
    // Nothing wider than the phone's screen: no sideways scrolling.
    let overflow = browser
        .execute(
            "return document.documentElement.scrollWidth - window.innerWidth;",
            vec![],
        )
        .await?;
    assert!(
        overflow.as_i64().is_some_and(|o| o <= 0),
        "page wider than the phone by {overflow}"
    );
    browser.execute("window.scrollTo(0, 0);", vec![]).await?;
    Ok(seen)
}

/// A headless Chromium through `driver`, with its own profile in `profile`.
async fn headless_chromium(driver: &ChromeDriver, profile: &Path) -> Result<fantoccini::Client> {
    let capabilities = serde_json::json!({
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=900,1200",
                format!("--user-data-dir={}", profile.display()),
            ],
        }
    });
    let serde_json::Value::Object(capabilities) = capabilities else {
        bail!("capabilities are an object");
    };
    fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .context("cannot start headless Chromium through chromedriver")
}

/// Two deployments, as two `orchgpu@` instances serve them: the YOLO page and the OCR
/// page (which says so with `--web-title` and `--web-hint`). In one browser, a photo goes
/// to the first and a document page (drawn with a DejaVu font) to the second; each card
/// shows its own kind of result: the annotated image with its detections, and the
/// recognised text inline with a copy button and the word table as a download. Both are
/// screenshotted (`web-photo.png`, `web-document.png` under the test target dir).
#[tokio::test(flavor = "multi_thread")]
async fn web_pages_in_chromium_show_a_photo_and_a_document_result() -> Result<()> {
    use fantoccini::Locator::Css;
    const TITLE: &str = "Text recognition (OCR)";
    const HINT: &str = "Upload scanned pages or photos of documents.";
    let weights = weights()?;
    let page = crate::ocr::draw_document(&["Invoice number 4711 from Valencia"])?;
    let files = tempfile::tempdir()?;
    let page_path = files.path().join("invoice.png");
    std::fs::write(&page_path, &page)?;

    let ssgm = MockSsgm::start(2)?;
    let mut yolo = Stack::new("webyolo", 5).await?;
    yolo.start_function_script(
        &repo_path("scar/yolo/detect.sh"),
        &[
            ("DARKNET_HOME", DARKNET_HOME.as_ref()),
            ("DARKNET_WEIGHTS", weights.as_os_str()),
        ],
    )?;
    let yolo_upload = format!("{}/web", yolo.input_bucket);
    let daemon = yolo.start_daemon(
        &ssgm,
        &["--http-listen", "127.0.0.1:0", "--upload-to", &yolo_upload],
    )?;
    let yolo_address = http_address(&mut yolo, daemon).await?;
    let mut ocr = Stack::new("webocr", 5).await?;
    ocr.start_function_script(&repo_path("scar/ocr/recognize.sh"), &[])?;
    let ocr_upload = format!("{}/web", ocr.input_bucket);
    let daemon = ocr.start_daemon(
        &ssgm,
        &[
            "--http-listen",
            "127.0.0.1:0",
            "--upload-to",
            &ocr_upload,
            "--result-suffix",
            ".txt",
            "--web-title",
            TITLE,
            "--web-hint",
            HINT,
        ],
    )?;
    let ocr_address = http_address(&mut ocr, daemon).await?;

    let driver = ChromeDriver::start(&yolo.logs.path().join("chromedriver.log")).await?;
    let profile = tempfile::tempdir()?;
    let browser = headless_chromium(&driver, profile.path()).await?;
    let outcome = async {
        // The photo, on the YOLO page.
        browser.goto(&format!("http://{yolo_address}/")).await?;
        wait_for("the upload form", Duration::from_secs(20), || async {
            Ok(attribute(&browser, "#upload", "hidden")
                .await?
                .is_none()
                .then_some(()))
        })
        .await?;
        browser
            .find(Css("#files"))
            .await?
            .send_keys(&format!("{DARKNET_HOME}/data/dog.jpg"))
            .await?;
        let seen = until_final(&browser).await?;
        assert!(seen.ends_with("done"), "{seen}");
        wait_for("the annotated image", Duration::from_secs(30), || async {
            let width = browser
                .execute(
                    "const i = document.querySelector('li.card img'); \
                     return i && i.complete ? i.naturalWidth : 0;",
                    vec![],
                )
                .await?;
            Ok(width.as_u64().filter(|w| *w == 768))
        })
        .await?;
        let found = browser
            .find(Css("li.card ul.detections"))
            .await?
            .text()
            .await?;
        assert!(found.lines().any(|l| l.starts_with("dog ")), "{found}");
        if let Ok(png) = browser.screenshot().await {
            save_screenshot("web-photo.png", &png)?;
        }

        // The document, on the OCR page, which says what it is for.
        browser.goto(&format!("http://{ocr_address}/")).await?;
        wait_for("the page's own title", Duration::from_secs(20), || async {
            let title = browser.find(Css("#title")).await?.text().await?;
            Ok((title == TITLE).then_some(()))
        })
        .await?;
        assert_eq!(browser.find(Css("#hint")).await?.text().await?, HINT);
        assert_eq!(browser.title().await?, format!("{TITLE} · orchgpu"));
        let path = page_path.to_str().context("utf-8 path")?;
        browser.find(Css("#files")).await?.send_keys(path).await?;
        let seen = until_final(&browser).await?;
        assert!(seen.ends_with("done"), "{seen}");
        let text = wait_for("the recognised text", Duration::from_secs(30), || async {
            match attribute(&browser, "li.card pre.text", "data-loaded").await? {
                Some(_) => Ok(Some(
                    browser.find(Css("li.card pre.text")).await?.text().await?,
                )),
                None => Ok(None),
            }
        })
        .await?;
        for word in ["Invoice", "4711", "Valencia"] {
            assert!(
                text.contains(word),
                "no {word:?} in the text shown: {text:?}"
            );
        }
        // No picture for a text result; a copy button; the word table to download.
        assert!(browser.find_all(Css("li.card img")).await?.is_empty());
        let copy = browser.find(Css("li.card button.copy")).await?;
        assert_eq!(copy.attr("disabled").await?, None, "copy button disabled");
        copy.click().await?;
        // The clipboard answers asynchronously.
        let after = wait_for(
            "the copy button's answer",
            Duration::from_secs(10),
            || async {
                let after = copy.text().await?;
                Ok((after != "Copy text").then_some(after))
            },
        )
        .await?;
        assert!(
            after == "Copied" || after.starts_with("Selected"),
            "{after}"
        );
        let mut links = Vec::new();
        for link in browser.find_all(Css("li.card .links a")).await? {
            links.push(link.text().await?);
        }
        assert_eq!(links, ["Download the text", "Download tsv"], "{links:?}");
        if let Ok(png) = browser.screenshot().await {
            save_screenshot("web-document.png", &png)?;
        }
        anyhow::Ok(())
    }
    .await;
    browser.close().await?;
    outcome?;
    yolo.wait_for_empty_queues(Duration::from_secs(30)).await?;
    ocr.wait_for_empty_queues(Duration::from_secs(30)).await?;
    ssgm.wait_all_released(Duration::from_secs(10)).await?;
    Ok(())
}
