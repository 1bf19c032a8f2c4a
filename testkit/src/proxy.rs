//! A TCP forwarder to the emulator that stages outages and slow conditional writes.

use std::time::Duration;

use anyhow::Result;

use crate::kit::endpoint;

/// A TCP forwarder to the emulator that a test can cut and restore, to stage an outage.
pub struct Proxy {
    pub port: u16,
    open: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// A plain forwarder, open until [`Proxy::set_open`] cuts it.
    pub async fn start() -> Result<Proxy> {
        Proxy::start_holding(None).await
    }

    /// A proxy that holds back conditional overwrites (PUT requests with an `If-Match`
    /// header) after the first `pass`, each for `hold` before it reaches the emulator, as
    /// a slow or partitioned S3 endpoint would; the requests still land, late, even when
    /// the client has given up on them.
    pub async fn start_holding(rule: Option<(usize, Duration)>) -> Result<Proxy> {
        let target = endpoint()
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (open, watch) = tokio::sync::watch::channel(true);
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !*watch.borrow() {
                    // Cut: the connection is dropped at once, like a dead endpoint.
                    continue;
                }
                let target = target.clone();
                let mut cut = watch.clone();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    if let Some((pass, hold)) = rule {
                        hold_conditional_writes(inbound, outbound, &seen, pass, hold).await;
                        return;
                    }
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Ok(Proxy { port, open, task })
    }

    /// The URL to give the daemon instead of the emulator's.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Cuts it (`false`: open connections are dropped, and new ones as soon as they are
    /// accepted) or restores it.
    pub fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }
}

/// Forwards one connection, holding back each chunk from the client that carries an
/// `If-Match` header once `pass` such requests went through (counted over every
/// connection in `seen`). Requests on one connection are sequential (no pipelining), so
/// a held chunk holds its request only.
async fn hold_conditional_writes(
    inbound: tokio::net::TcpStream,
    outbound: tokio::net::TcpStream,
    seen: &std::sync::atomic::AtomicUsize,
    pass: usize,
    hold: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut from_client, mut to_client) = inbound.into_split();
    let (mut from_server, mut to_server) = outbound.into_split();
    let answers = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
    });
    let mut buffer = vec![0u8; 64 * 1024];
    while let Ok(n) = from_client.read(&mut buffer).await {
        if n == 0 {
            break;
        }
        let chunk = &buffer[..n];
        let conditional = chunk.starts_with(b"PUT ")
            && chunk
                .windows(11)
                .any(|w| w.eq_ignore_ascii_case(b"\r\nif-match:"));
        if conditional && seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= pass {
            tokio::time::sleep(hold).await;
        }
        if to_server.write_all(chunk).await.is_err() {
            break;
        }
    }
    // Late answers still reach the emulator's side; the client may be long gone.
    let _ = tokio::time::timeout(Duration::from_secs(5), answers).await;
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
