//! The systemd notify protocol, with a real `AF_UNIX` datagram socket standing in for
//! systemd's: READY=1 only once the queue is reached, STOPPING=1 on SIGTERM, exit 0.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use crate::harness::{MockSsgm, Stack};

/// The socket systemd would listen on, in a temporary directory.
struct NotifySocket {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    socket: UnixDatagram,
    received: Vec<String>,
}

impl NotifySocket {
    fn bind() -> Result<NotifySocket> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).context("bind the notify socket")?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(NotifySocket {
            _dir: dir,
            path,
            socket,
            received: Vec::new(),
        })
    }

    /// Reads datagrams until one holds the line `wanted`, for at most `timeout`; every
    /// datagram read is kept in `received`.
    fn wait_for(&mut self, wanted: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let datagram = String::from_utf8_lossy(&buf[..n]).into_owned();
                    self.received.push(datagram.clone());
                    if datagram.lines().any(|line| line == wanted) {
                        return Ok(datagram);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
        bail!(
            "no {wanted:?} within {timeout:?}; received: {:?}",
            self.received
        )
    }

    /// Every datagram that arrives within `window`.
    fn drain(&mut self, window: Duration) -> Result<Vec<String>> {
        let deadline = Instant::now() + window;
        let mut buf = [0u8; 4096];
        let mut got = Vec::new();
        while Instant::now() < deadline {
            match self.socket.recv(&mut buf) {
                Ok(n) => got.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.received.extend(got.iter().cloned());
        Ok(got)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_after_the_queue_is_reached_then_stopping_on_sigterm() -> Result<()> {
    let mut stack = Stack::new("notify", 5).await?;
    let ssgm = MockSsgm::start(2)?;
    let mut notify = NotifySocket::bind()?;
    let daemon =
        stack.start_daemon_with_env(&ssgm, &[], &[("NOTIFY_SOCKET", notify.path.as_os_str())])?;

    let ready = notify.wait_for("READY=1", Duration::from_secs(30))?;
    assert!(
        ready.contains("STATUS=Receiving jobs from ") && ready.contains(&stack.jobs_queue),
        "READY without the queue in its status: {ready:?}"
    );
    // READY means the queue was reached and the journal read: the log says so before it.
    assert!(
        stack.log(daemon).contains("Journal read;"),
        "READY before start-up finished:\n{}",
        stack.log(daemon)
    );
    assert!(
        stack.process(daemon).try_status()?.is_none(),
        "daemon exited"
    );

    stack.process(daemon).signal(Signal::SIGTERM)?;
    let stopping = notify.wait_for("STOPPING=1", Duration::from_secs(10))?;
    assert!(stopping.contains("STATUS=Stopping"), "{stopping:?}");
    let status = stack
        .process(daemon)
        .wait_exit(Duration::from_secs(30))
        .await?;
    assert_eq!(status.code(), Some(0), "{status}");
    // READY exactly once, and nothing after STOPPING claims readiness again.
    let ready_count = notify
        .received
        .iter()
        .filter(|d| d.lines().any(|l| l == "READY=1"))
        .count();
    assert_eq!(ready_count, 1, "{:?}", notify.received);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_queue_never_sends_ready_and_exits_1() -> Result<()> {
    let mut stack = Stack::new("notify-missing", 5).await?;
    let ssgm = MockSsgm::start(1)?;
    let mut notify = NotifySocket::bind()?;
    let missing = format!("{}-does-not-exist", stack.jobs_queue);
    let daemon = stack.start_daemon_with_env(
        &ssgm,
        &["-q", &missing],
        &[("NOTIFY_SOCKET", notify.path.as_os_str())],
    )?;
    let status = stack
        .process(daemon)
        .wait_exit(Duration::from_secs(60))
        .await?;
    assert_eq!(status.code(), Some(1), "{status}");
    assert!(
        stack.log(daemon).contains("cannot reach the jobs queue"),
        "{}",
        stack.log(daemon)
    );
    let datagrams = notify.drain(Duration::from_millis(300))?;
    assert!(
        !datagrams.iter().any(|d| d.lines().any(|l| l == "READY=1")),
        "READY sent for a missing queue: {datagrams:?}"
    );
    Ok(())
}

/// `WATCHDOG=1` datagrams among `datagrams`.
fn pings(datagrams: &[String]) -> usize {
    datagrams
        .iter()
        .filter(|d| d.lines().any(|l| l == "WATCHDOG=1"))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_watchdog_is_pinged_while_the_loop_turns_and_not_once_it_wedges() -> Result<()> {
    let mut stack = Stack::new("watchdog", 5).await?;
    let ssgm = MockSsgm::start(1)?;
    let mut notify = NotifySocket::bind()?;
    // A 4 s watchdog: pings every 2 s; -w 1 -u 0 makes a receive about every second.
    let daemon = stack.start_daemon_with_env(
        &ssgm,
        &[],
        &[
            ("NOTIFY_SOCKET", notify.path.as_os_str()),
            ("WATCHDOG_USEC", std::ffi::OsStr::new("4000000")),
        ],
    )?;
    notify.wait_for("READY=1", Duration::from_secs(30))?;
    let healthy = notify.drain(Duration::from_secs(5))?;
    assert!(pings(&healthy) >= 2, "pings while healthy: {healthy:?}");
    stack.process(daemon).kill();

    // The same daemon with a loop that wedges after its third receive (a debug-build
    // fault): the pings stop although the process and its timers live on.
    let mut notify = NotifySocket::bind()?;
    let wedged = stack.start_daemon_with_env(
        &ssgm,
        &[],
        &[
            ("NOTIFY_SOCKET", notify.path.as_os_str()),
            ("WATCHDOG_USEC", std::ffi::OsStr::new("4000000")),
            (
                "ORCHGPU_DEBUG_WEDGE_AFTER_RECEIVES",
                std::ffi::OsStr::new("3"),
            ),
        ],
    )?;
    notify.wait_for("READY=1", Duration::from_secs(30))?;
    stack
        .wait_for_log(
            wedged,
            "wedging the receive loop",
            1,
            Duration::from_secs(30),
        )
        .await?;
    // Within half the interval (2 s) plus one ping period the daemon notices.
    let _ = notify.drain(Duration::from_secs(4))?;
    let after = notify.drain(Duration::from_secs(6))?;
    assert_eq!(pings(&after), 0, "pings from a wedged loop: {after:?}");
    assert!(
        stack.process(wedged).try_status()?.is_none(),
        "the wedged daemon is still running (only the watchdog can tell)"
    );
    assert!(
        stack
            .log(wedged)
            .contains("The receive loop shows no progress; not pinging the watchdog."),
        "{}",
        stack.log(wedged)
    );
    Ok(())
}
