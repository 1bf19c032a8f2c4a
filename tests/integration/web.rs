//! The web page (`src/web/`): its refusals over plain HTTP (no token, an oversize upload,
//! hostile names and paths, cross-site posts), and one real browser, headless Chromium
//! through ChromeDriver, uploading dog.jpg through the page with real darknet behind the
//! function.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::harness::{MockSsgm, Stack, http_address, repo_path, wait_for};
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
    let mut stack = Stack::new(name, 5).await?;
    let ssgm = MockSsgm::start(1)?;
    let upload_to = format!("{}/web", stack.input_bucket);
    let mut args = vec!["--http-listen", "127.0.0.1:0", "--upload-to", &upload_to];
    args.extend_from_slice(extra);
    let daemon = stack.start_daemon(&ssgm, &args)?;
    let address = http_address(&mut stack, daemon).await?;
    Ok((stack, ssgm, address))
}

#[tokio::test(flavor = "multi_thread")]
async fn web_uploads_and_reads_need_the_token_when_one_is_set() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n"))?;
    let token_path = token_file.to_str().context("utf-8 path")?;
    let (stack, _ssgm, address) = start("webtoken", &["--http-token-file", token_path]).await?;

    // The page itself is open, so a user can enter the token.
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
        get(&address, "/results/0123456789abcdef0123.png", &[])?.status,
        401
    );
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
    // Entering the token on the page sets an HTTP-only cookie that then opens the API.
    let session = request(&address, "POST", "/api/session", &[], TOKEN.as_bytes())?;
    assert_eq!(session.status, 204, "{}", session.text());
    let cookie = session.header("set-cookie").context("no cookie set")?;
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().context("empty cookie")?;
    assert_eq!(get(&address, "/api/jobs", &[("Cookie", pair)])?.status, 200);
    assert_eq!(stack.keys(&stack.input_bucket, "").await?.len(), 1);
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
    let job_id = body["job_id"].as_str().context("no job id")?.to_string();
    assert_eq!(
        stack.keys(&stack.input_bucket, "").await?,
        vec![key.to_string()]
    );
    // The answered job id is the one the daemon derives from the notification: the
    // history, read through the page's API, knows it under the uploaded key.
    let path = format!("/api/jobs/{job_id}");
    wait_for(
        "the upload's job in the history",
        Duration::from_secs(30),
        || async {
            let job = get(&address, &path, &[])?.json()?;
            Ok((job["key"].as_str() == Some(key)).then_some(()))
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
        "/api/jobs/..%2F..%2Fetc%2Fpasswd",
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
        &repo_path("scar/detect.sh"),
        &[
            ("DARKNET_HOME", DARKNET_HOME.as_ref()),
            ("DARKNET_WEIGHTS", weights.as_os_str()),
        ],
    )?;
    let upload_to = format!("{}/web", stack.input_bucket);
    let daemon = stack.start_daemon(
        &ssgm,
        &["--http-listen", "127.0.0.1:0", "--upload-to", &upload_to],
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
    let screenshot = browser.screenshot().await;
    browser.close().await?;
    if let Ok(png) = screenshot {
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-page.png");
        std::fs::write(&path, png)?;
        eprintln!("screenshot: {}", path.display());
    }
    let seen = outcome?;
    eprintln!("states seen on the page: {seen}");
    stack.wait_for_empty_queues(Duration::from_secs(30)).await?;
    ssgm.assert_all_released()?;
    Ok(())
}

/// Uploads dog.jpg through the page and follows its card to the result; returns the
/// states the card went through.
async fn drive(browser: &fantoccini::Client, address: &str) -> Result<String> {
    use fantoccini::Locator::Css;
    browser.goto(&format!("http://{address}/")).await?;
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
    let seen = wait_for(
        "the card to reach a final state",
        Duration::from_secs(180),
        || async {
            let state = attribute(browser, "li.card", "data-state").await?;
            Ok(match state.as_deref() {
                Some("done" | "failed" | "dropped" | "error") => {
                    attribute(browser, "li.card", "data-seen").await?
                }
                _ => None,
            })
        },
    )
    .await?;
    let summary = browser.find(Css("li.card .summary")).await?.text().await?;
    let states: Vec<&str> = seen.split(' ').collect();
    assert_eq!(states.last(), Some(&"done"), "{seen}: {summary}");
    assert_eq!(&states[..2], ["uploading", "uploaded"], "{seen}");
    assert!(
        states
            .iter()
            .any(|s| ["queued", "received", "waiting_for_gpus", "running"].contains(s)),
        "the job went straight to done: {seen}"
    );
    eprintln!(
        "dog.jpg through the page: done after {:.1?}",
        started.elapsed()
    );

    // The annotated image loads (through orchgpu, not from S3), at the input's size.
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
    let src = attribute(browser, "li.card img", "src")
        .await?
        .unwrap_or_default();
    assert!(
        src.starts_with("/results/") && src.ends_with(".png"),
        "{src}"
    );
    let detections = browser
        .find(Css("li.card ul.detections"))
        .await?
        .text()
        .await?;
    assert!(
        detections.lines().any(|l| l.starts_with("dog ")),
        "no dog in the detections on the page: {detections:?}"
    );
    let links = browser.find_all(Css("li.card .links a")).await?;
    assert_eq!(
        links.len(),
        2,
        "download links for the image and the detections"
    );
    Ok(seen)
}
