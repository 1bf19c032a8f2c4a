//! The client side: one SSGM-style call sends its request to the server, then carries
//! out the reply (prints it, maybe signals its parent, exits or hangs).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::cli::ClientArgs;
use crate::wire::{MAX_LINE, Reply};

/// How long the client waits to connect, then for the reply.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs one client call and returns its exit code (or hangs, if the reply says so).
pub(crate) fn client(args: ClientArgs) -> ExitCode {
    // Taken before any network wait, so a parent that dies meanwhile is not confused
    // with whoever adopts this process.
    let parent = nix::unistd::getppid();
    let reply = match exchange(&args) {
        Ok(reply) => reply,
        Err(e) => {
            eprintln!(
                "mock-ssgm: cannot reach the scheduler at {}:{}: {e:#}",
                args.host, args.port
            );
            return ExitCode::FAILURE;
        }
    };
    // Output errors (a closed pipe) cannot be reported anywhere useful.
    let _ = std::io::stdout().write_all(reply.stdout.as_bytes());
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().write_all(reply.stderr.as_bytes());
    if reply.kill_parent {
        kill_parent(parent);
    }
    if reply.hang {
        // Hang like a stuck SSGM would: only a signal ends this process.
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    ExitCode::from(reply.exit)
}

/// Sends SIGKILL to `parent`, the process this client started under, unless it is gone
/// already: then `getppid()` names an adopter (init or a subreaper), which must live.
fn kill_parent(parent: nix::unistd::Pid) {
    use nix::sys::signal::{Signal, kill};

    if parent.as_raw() <= 1 || nix::unistd::getppid() != parent {
        eprintln!("mock-ssgm: parent {parent} is gone; not signalling anyone");
        return;
    }
    eprintln!("mock-ssgm: injected SIGKILL of parent {parent}");
    if let Err(e) = kill(parent, Signal::SIGKILL) {
        eprintln!("mock-ssgm: cannot kill parent {parent}: {e}");
    }
}

/// Sends the request and reads the reply.
fn exchange(args: &ClientArgs) -> Result<Reply> {
    let addrs = (args.host.as_str(), args.port)
        .to_socket_addrs()
        .context("cannot resolve host")?;
    let mut last_error = anyhow!("host has no address");
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_error = anyhow::Error::new(e).context(format!("connect to {addr}")),
        }
    }
    let mut stream = stream.ok_or(last_error)?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    let mut line = serde_json::to_string(&args.request)?;
    line.push('\n');
    stream.write_all(line.as_bytes()).context("send request")?;
    let mut reply = String::new();
    BufReader::new(stream.take(MAX_LINE))
        .read_line(&mut reply)
        .context("read reply")?;
    if reply.is_empty() {
        bail!("connection closed without a reply");
    }
    serde_json::from_str(&reply).context("unreadable reply")
}
