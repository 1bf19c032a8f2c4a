//! The server side (`mock-ssgm serve`): the listener, one connection per request, and
//! the shared [`State`] behind a lock.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::cli::ServeArgs;
use crate::state::State;
use crate::wire::{MAX_LINE, Reply, Request};

/// Runs the server until SIGTERM or SIGINT.
pub(crate) fn serve(args: ServeArgs) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start runtime")?
        .block_on(serve_async(args))
}

async fn serve_async(args: ServeArgs) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};

    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr().context("listening address")?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    {
        // The one line a test or a script waits for; everything else goes to stderr.
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on {addr}").context("write to stdout")?;
        stdout.flush().context("flush stdout")?;
    }
    eprintln!(
        "mock-ssgm: serving {} GPU(s) on {} at {addr}",
        args.gpus,
        args.hosts.join(",")
    );
    let state = Arc::new(Mutex::new(State::new(args.gpus, args.hosts)));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => {
                    let state = Arc::clone(&state);
                    tokio::spawn(async move {
                        if let Err(e) = handle(socket, &state).await {
                            eprintln!("mock-ssgm: connection failed: {e:#}");
                        }
                    });
                }
                Err(e) => {
                    eprintln!("mock-ssgm: accept failed: {e}");
                    // Out of file descriptors and the like: do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    let live = lock(&state).allocations.len();
    eprintln!("mock-ssgm: stopping with {live} live allocation(s)");
    Ok(())
}

/// Answers one connection: one request line, one reply line.
async fn handle(socket: tokio::net::TcpStream, state: &Mutex<State>) -> Result<()> {
    let (read, mut write) = socket.into_split();
    let mut line = String::new();
    tokio::io::BufReader::new(read.take(MAX_LINE))
        .read_line(&mut line)
        .await
        .context("read request")?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(request) => lock(state).apply(request),
        Err(e) => Reply::fail(format!("mock-ssgm: bad request: {e}\n")),
    };
    let mut out = serde_json::to_string(&reply).context("encode reply")?;
    out.push('\n');
    write
        .write_all(out.as_bytes())
        .await
        .context("send reply")?;
    Ok(())
}

/// Takes the state's lock.
fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .expect("no code panics while holding the state lock")
}
