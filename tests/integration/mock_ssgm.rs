//! Tests of the `mock-ssgm` binary: its server role, and its client role with
//! SSGM's command line, including every injectable fault (the ones that kill the
//! client's parent run under an `sh` the test owns).
//!
//! Each test starts its own server on a free port, so tests run in parallel.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::harness::MockSsgm;

const MOCK_SSGM: &str = env!("CARGO_BIN_EXE_mock-ssgm");

/// How long a client call may take before the test gives up on it.
const CALL_DEADLINE: Duration = Duration::from_secs(10);

/// How long a hanging client is watched before it is judged hung.
const HANG_WATCH: Duration = Duration::from_millis(800);

/// A running `mock-ssgm serve` (the kit's), stopped on drop, with this file's client
/// calls. Its stderr log is printed if the test fails.
struct MockServer {
    inner: MockSsgm,
}

impl MockServer {
    fn start(gpus: u32) -> Result<Self> {
        Ok(Self {
            inner: MockSsgm::start(gpus)?,
        })
    }

    /// `mock-ssgm -S 127.0.0.1 -P <port> <args>`, which must finish in time.
    fn ssgm(&self, args: &[&str]) -> Result<Call> {
        let mut child = self.spawn_client(args)?;
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if started.elapsed() > CALL_DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                bail!("mock-ssgm {args:?} did not finish within {CALL_DEADLINE:?}");
            }
            thread::sleep(Duration::from_millis(10));
        };
        Call::collect(args, status, &mut child)
    }

    /// Like [`Self::ssgm`], expecting exit 0.
    fn ok(&self, args: &[&str]) -> Result<String> {
        let call = self.ssgm(args)?;
        ensure!(call.status.code() == Some(0), "expected exit 0: {call}");
        Ok(call.stdout)
    }

    /// `-alloc -g <gpus>`, expecting exit 0; returns stdout.
    fn alloc(&self, gpus: &str) -> Result<String> {
        self.ok(&["-alloc", "-g", gpus])
    }

    /// Starts a client that is expected to hang, checks that it does, kills it
    /// and returns what it printed.
    fn expect_hang(&self, args: &[&str]) -> Result<Call> {
        let mut child = self.spawn_client(args)?;
        thread::sleep(HANG_WATCH);
        let still_running = child.try_wait()?.is_none();
        let _ = child.kill();
        let status = child.wait()?;
        let call = Call::collect(args, status, &mut child)?;
        ensure!(still_running, "expected a hang, but it exited: {call}");
        Ok(call)
    }

    fn stats(&self) -> Result<serde_json::Value> {
        let out = self.ok(&["-stats"])?;
        ensure!(out.lines().count() == 1, "stats is not one line: {out:?}");
        serde_json::from_str(&out).with_context(|| format!("stats is not JSON: {out:?}"))
    }

    /// Asserts the named counters of `-stats`.
    fn assert_stats(&self, expected: &[(&str, u64)]) -> Result<()> {
        let stats = self.stats()?;
        for (name, want) in expected {
            let got = stats.get(name).and_then(serde_json::Value::as_u64);
            ensure!(
                got == Some(*want),
                "stats {name}: got {got:?}, want {want}; all: {stats}"
            );
        }
        Ok(())
    }

    /// The live allocations listed by `-top`, header checked and dropped.
    fn top(&self) -> Result<Vec<Vec<String>>> {
        let out = self.ok(&["-top"])?;
        let mut lines = out.lines();
        ensure!(
            lines.next() == Some("JOB GPUS DEVICES AGE_S"),
            "bad header: {out:?}"
        );
        Ok(lines
            .map(|l| l.split(' ').map(str::to_owned).collect())
            .collect())
    }

    fn spawn_client(&self, args: &[&str]) -> Result<Child> {
        Command::new(MOCK_SSGM)
            .args(["-S", "127.0.0.1", "-P", &self.inner.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn mock-ssgm {args:?}"))
    }
}

/// A finished client run, printable for failure messages.
struct Call {
    args: Vec<String>,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Call {
    fn collect(args: &[&str], status: ExitStatus, child: &mut Child) -> Result<Self> {
        let mut stdout = String::new();
        let mut stderr = String::new();
        if let Some(mut out) = child.stdout.take() {
            out.read_to_string(&mut stdout)?;
        }
        if let Some(mut err) = child.stderr.take() {
            err.read_to_string(&mut stderr)?;
        }
        Ok(Self {
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            status,
            stdout,
            stderr,
        })
    }
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "mock-ssgm {:?}: {}\nstdout: {:?}\nstderr: {:?}",
            self.args, self.status, self.stdout, self.stderr
        )
    }
}

#[test]
fn alloc_busy_dealloc_and_request_error() -> Result<()> {
    let server = MockServer::start(2)?;

    let granted = server.alloc("2")?;
    assert_eq!(
        granted,
        "SSGM_ERROR=0;SSGM_JOB=1;RCUDA_DEVICE_COUNT=2;\
         RCUDA_DEVICE_0=127.0.0.1:0;RCUDA_DEVICE_1=127.0.0.1:1;\n"
    );
    assert_eq!(server.alloc("1")?, "SSGM_ERROR=2;\n");
    let top = server.top()?;
    assert_eq!(top.len(), 1, "{top:?}");
    assert_eq!(top[0][..3], ["1", "2", "127.0.0.1:0,127.0.0.1:1"]);
    assert!(top[0][3].parse::<u64>().is_ok(), "{top:?}");

    server.ok(&["-dealloc", "-j", "1"])?;
    assert!(server.top()?.is_empty());
    assert!(server.alloc("1")?.starts_with("SSGM_ERROR=0;SSGM_JOB=2;"));

    for bad in ["3", "0", "two"] {
        let reply = server.alloc(bad)?;
        assert!(
            reply.starts_with("SSGM_ERROR=1;SSGM_MSG="),
            "-g {bad}: {reply:?}"
        );
    }

    let unknown = server.ssgm(&["-dealloc", "-j", "99"])?;
    assert_eq!(unknown.status.code(), Some(1), "{unknown}");
    assert!(unknown.stderr.contains("unknown job"), "{unknown}");

    server.assert_stats(&[
        ("total_gpus", 2),
        ("free_gpus", 1),
        ("live", 1),
        ("max_live", 1),
        ("max_gpus_in_use", 2),
        ("alloc_calls", 6),
        ("granted", 2),
        ("busy", 1),
        ("request_errors", 3),
        ("dealloc_calls", 2),
        ("released", 1),
        ("failed_releases", 1),
        ("faults_injected", 0),
    ])?;

    server.ok(&["-reset"])?;
    server.assert_stats(&[("free_gpus", 2), ("live", 0), ("alloc_calls", 0)])?;
    Ok(())
}

#[test]
fn options_go_in_any_order() -> Result<()> {
    let server = MockServer::start(1)?;
    let port = server.inner.port.to_string();
    let call = Command::new(MOCK_SSGM)
        .args(["-g", "1", "-alloc", "-P", &port, "-S", "127.0.0.1"])
        .output()?;
    assert!(call.status.success());
    assert!(String::from_utf8_lossy(&call.stdout).starts_with("SSGM_ERROR=0;SSGM_JOB=1;"));
    let call = Command::new(MOCK_SSGM)
        .args(["-j", "1", "-P", &port, "-S", "localhost", "-dealloc"])
        .output()?;
    assert!(call.status.success(), "{call:?}");
    Ok(())
}

#[test]
fn injected_busy_error_garbage_and_empty() -> Result<()> {
    let server = MockServer::start(2)?;

    assert_eq!(
        server.ok(&["-inject", "busy", "-n", "2"])?.lines().count(),
        1
    );
    assert_eq!(server.alloc("1")?, "SSGM_ERROR=2;\n");
    assert_eq!(server.alloc("1")?, "SSGM_ERROR=2;\n");
    assert!(server.alloc("1")?.starts_with("SSGM_ERROR=0;SSGM_JOB=1;"));

    server.ok(&["-inject", "error"])?;
    assert!(server.alloc("1")?.starts_with("SSGM_ERROR=1;"));

    server.ok(&["-inject", "garbage"])?;
    let garbage = server.alloc("1")?;
    assert!(garbage.starts_with("Segmentation fault"), "{garbage:?}");
    assert!(!garbage.contains('='), "{garbage:?}");

    server.ok(&["-inject", "empty"])?;
    assert_eq!(server.alloc("1")?, "");

    // Faults are used up: back to normal.
    assert!(server.alloc("1")?.starts_with("SSGM_ERROR=0;SSGM_JOB=2;"));

    server.assert_stats(&[
        ("alloc_calls", 7),
        ("granted", 2),
        ("busy", 2),
        ("request_errors", 1),
        ("faults_injected", 5),
        ("live", 2),
    ])?;
    Ok(())
}

#[test]
fn injected_exit_prints_a_grant_but_holds_nothing() -> Result<()> {
    let server = MockServer::start(2)?;
    server.ok(&["-inject", "exit"])?;
    let call = server.ssgm(&["-alloc", "-g", "2"])?;
    assert_eq!(call.status.code(), Some(1), "{call}");
    assert!(call.stdout.starts_with("SSGM_ERROR=0;SSGM_JOB="), "{call}");
    assert!(server.top()?.is_empty());
    server.assert_stats(&[
        ("live", 0),
        ("free_gpus", 2),
        ("granted", 0),
        ("faults_injected", 1),
    ])?;

    // The id it printed names no job.
    let job = call
        .stdout
        .split(';')
        .find_map(|f| f.strip_prefix("SSGM_JOB="))
        .context("job id")?;
    let release = server.ssgm(&["-dealloc", "-j", job])?;
    assert_eq!(release.status.code(), Some(1), "{release}");
    Ok(())
}

#[test]
fn injected_hang_hangs_the_client_without_allocating() -> Result<()> {
    let server = MockServer::start(2)?;
    server.ok(&["-inject", "hang"])?;
    let call = server.expect_hang(&["-alloc", "-g", "1"])?;
    assert_eq!(call.stdout, "", "{call}");
    server.assert_stats(&[
        ("alloc_calls", 1),
        ("live", 0),
        ("free_gpus", 2),
        ("faults_injected", 1),
    ])?;
    assert!(server.alloc("1")?.starts_with("SSGM_ERROR=0;"));
    Ok(())
}

#[test]
fn injected_grant_then_hang_keeps_the_allocation() -> Result<()> {
    let server = MockServer::start(2)?;
    server.ok(&["-inject", "grant-then-hang"])?;
    let call = server.expect_hang(&["-alloc", "-g", "2"])?;
    assert_eq!(call.stdout, "", "{call}");
    server.assert_stats(&[
        ("live", 1),
        ("free_gpus", 0),
        ("granted", 1),
        ("faults_injected", 1),
    ])?;
    let top = server.top()?;
    assert_eq!(top.len(), 1);
    assert_eq!(top[0][..2], ["1", "2"]);

    // The stray allocation is held until someone releases it by id.
    assert_eq!(server.alloc("1")?, "SSGM_ERROR=2;\n");
    server.ok(&["-dealloc", "-j", "1"])?;
    server.assert_stats(&[("live", 0), ("free_gpus", 2), ("released", 1)])?;
    Ok(())
}

/// Reads `child`'s first stdout line while it runs, or fails after `CALL_DEADLINE`.
fn first_line(child: &mut Child) -> Result<String> {
    let stdout = child.stdout.take().context("client stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line).map(|_| line);
        let _ = tx.send(read);
    });
    Ok(rx
        .recv_timeout(CALL_DEADLINE)
        .context("no line printed in time")??)
}

/// Whether process `pid` exists (it may be a zombie).
fn exists(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

#[test]
fn injected_print_then_hang_prints_the_grant_and_hangs_holding_it() -> Result<()> {
    let server = MockServer::start(2)?;
    server.ok(&["-inject", "print-then-hang"])?;
    let mut child = server.spawn_client(&["-alloc", "-g", "2"])?;
    // The grant is readable while the client is still running: it was flushed.
    let line = first_line(&mut child);
    let hanging = child.try_wait()?.is_none();
    let top = server.top();
    let stats = server.stats();
    thread::sleep(HANG_WATCH);
    let still_hanging = child.try_wait()?.is_none();
    let _ = child.kill();
    let status = child.wait()?;
    let line = line?;
    assert_eq!(
        line,
        "SSGM_ERROR=0;SSGM_JOB=1;RCUDA_DEVICE_COUNT=2;\
         RCUDA_DEVICE_0=127.0.0.1:0;RCUDA_DEVICE_1=127.0.0.1:1;\n"
    );
    assert!(hanging && still_hanging, "the client exited: {status}");
    let top = top?;
    assert_eq!(top.len(), 1, "{top:?}");
    assert_eq!(top[0][..3], ["1", "2", "127.0.0.1:0,127.0.0.1:1"]);
    let stats = stats?;
    for (name, want) in [
        ("live", 1),
        ("free_gpus", 0),
        ("granted", 1),
        ("faults_injected", 1),
    ] {
        assert_eq!(stats[name], want, "{name}: {stats}");
    }

    // Killing the client gives nothing back; the printed id releases the GPUs.
    server.assert_stats(&[("live", 1), ("free_gpus", 0)])?;
    server.ok(&["-dealloc", "-j", "1"])?;
    server.assert_stats(&[("live", 0), ("free_gpus", 2), ("released", 1)])?;
    Ok(())
}

/// Runs `script` under `sh -c`, with `$0` the mock client and `$1`, `$2` files in a
/// temporary directory (`$2` for a background client's pid); returns sh's status, its
/// stdout and the directory.
fn under_sh(server: &MockServer, script: &str) -> Result<(ExitStatus, String, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let mut sh = Command::new("sh")
        .args(["-c", script, MOCK_SSGM])
        .arg(dir.path().join("out"))
        .arg(dir.path().join("pid"))
        .env("PORT", server.inner.port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawn sh")?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = sh.try_wait()? {
            break status;
        }
        if started.elapsed() > CALL_DEADLINE {
            let _ = sh.kill();
            let _ = sh.wait();
            // A client that hangs under sh outlives it: kill it too.
            if let Some(pid) = std::fs::read_to_string(dir.path().join("pid"))
                .ok()
                .and_then(|pid| pid.trim().parse().ok())
            {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            bail!("sh -c {script:?} did not finish within {CALL_DEADLINE:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let mut stdout = String::new();
    sh.stdout
        .take()
        .context("sh stdout")?
        .read_to_string(&mut stdout)?;
    Ok((status, stdout, dir))
}

#[test]
fn injected_kill_parent_after_grant_kills_the_caller_once_the_grant_is_printed() -> Result<()> {
    use std::os::unix::process::ExitStatusExt;

    let server = MockServer::start(2)?;
    server.ok(&["-inject", "kill-parent-after-grant"])?;
    let (status, stdout, dir) = under_sh(
        &server,
        r#""$0" -S 127.0.0.1 -P "$PORT" -alloc -g 1 > "$1"; echo survived"#,
    )?;
    let printed = std::fs::read_to_string(dir.path().join("out"))?;
    assert_eq!(
        status.signal(),
        Some(Signal::SIGKILL as i32),
        "sh: {status}"
    );
    assert_eq!(stdout, "", "sh went on after the client");
    assert_eq!(
        printed,
        "SSGM_ERROR=0;SSGM_JOB=1;RCUDA_DEVICE_COUNT=1;RCUDA_DEVICE_0=127.0.0.1:0;\n"
    );
    server.assert_stats(&[("live", 1), ("granted", 1), ("faults_injected", 1)])?;

    // Used up: the next client under sh leaves its parent alone.
    let (status, stdout, _dir) = under_sh(
        &server,
        r#""$0" -S 127.0.0.1 -P "$PORT" -alloc -g 1 > "$1"; echo survived"#,
    )?;
    assert_eq!((status.code(), stdout.as_str()), (Some(0), "survived\n"));
    server.assert_stats(&[("live", 2), ("granted", 2), ("faults_injected", 1)])?;
    Ok(())
}

#[test]
fn injected_kill_parent_then_hang_leaves_an_orphan_holding_the_grant() -> Result<()> {
    use std::os::unix::process::ExitStatusExt;

    let server = MockServer::start(2)?;
    server.ok(&["-inject", "kill-parent-then-hang"])?;
    let (status, stdout, dir) = under_sh(
        &server,
        r#""$0" -S 127.0.0.1 -P "$PORT" -alloc -g 2 > "$1" & echo $! > "$2"; wait; echo survived"#,
    )?;
    let pid: i32 = std::fs::read_to_string(dir.path().join("pid"))?
        .trim()
        .parse()
        .context("client pid")?;
    thread::sleep(HANG_WATCH);
    let orphan_alive = exists(pid);
    // Not our child: SIGKILL it and let its adopter reap it.
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    assert_eq!(
        status.signal(),
        Some(Signal::SIGKILL as i32),
        "sh: {status}"
    );
    assert_eq!(stdout, "", "sh went on after the client");
    assert!(orphan_alive, "the orphaned client {pid} did not hang");
    let printed = std::fs::read_to_string(dir.path().join("out"))?;
    assert!(
        printed.starts_with("SSGM_ERROR=0;SSGM_JOB=1;RCUDA_DEVICE_COUNT=2;"),
        "{printed:?}"
    );
    server.assert_stats(&[
        ("live", 1),
        ("free_gpus", 0),
        ("granted", 1),
        ("faults_injected", 1),
    ])?;
    Ok(())
}

#[test]
fn injected_fail_release_keeps_the_allocation() -> Result<()> {
    let server = MockServer::start(2)?;
    assert!(server.alloc("1")?.starts_with("SSGM_ERROR=0;SSGM_JOB=1;"));
    server.ok(&["-inject", "fail-release", "-n", "2"])?;
    // Alloc faults and release faults are separate: allocs still work.
    assert!(server.alloc("1")?.starts_with("SSGM_ERROR=0;SSGM_JOB=2;"));
    for _ in 0..2 {
        let call = server.ssgm(&["-dealloc", "-j", "1"])?;
        assert_eq!(call.status.code(), Some(1), "{call}");
        assert!(!call.stderr.is_empty(), "{call}");
    }
    server.assert_stats(&[("live", 2), ("failed_releases", 2), ("faults_injected", 2)])?;
    server.ok(&["-dealloc", "-j", "1"])?;
    server.assert_stats(&[
        ("live", 1),
        ("dealloc_calls", 3),
        ("released", 1),
        ("failed_releases", 2),
    ])?;
    Ok(())
}

#[test]
fn inject_clear_removes_pending_faults() -> Result<()> {
    let server = MockServer::start(1)?;
    server.ok(&["-inject", "busy", "-n", "5"])?;
    server.ok(&["-inject", "fail-release"])?;
    server.ok(&["-inject", "clear"])?;
    assert!(server.alloc("1")?.starts_with("SSGM_ERROR=0;SSGM_JOB=1;"));
    server.ok(&["-dealloc", "-j", "1"])?;
    server.assert_stats(&[("faults_injected", 0), ("released", 1)])?;
    Ok(())
}

#[test]
fn usage_errors_exit_2() -> Result<()> {
    let server = MockServer::start(1)?;
    for args in [
        &["-alloc"][..],
        &["-alloc", "-g", "1", "-top"],
        &["-inject", "sometimes"],
        &["-inject", "busy", "-n", "0"],
        &["-frobnicate"],
        &["-dealloc"],
    ] {
        let call = server.ssgm(args)?;
        assert_eq!(call.status.code(), Some(2), "{call}");
        assert!(!call.stderr.is_empty(), "{call}");
    }
    let call = Command::new(MOCK_SSGM)
        .args(["-alloc", "-g", "1"])
        .output()?;
    assert_eq!(call.status.code(), Some(2), "{call:?}");
    let call = Command::new(MOCK_SSGM)
        .args(["serve", "--gpus", "0"])
        .output()?;
    assert_eq!(call.status.code(), Some(2), "{call:?}");

    let help = Command::new(MOCK_SSGM).arg("--help").output()?;
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("-inject KIND"));
    Ok(())
}

#[test]
fn unreachable_server_exits_1() -> Result<()> {
    // A port that was just free is very likely still closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let call = Command::new(MOCK_SSGM)
        .args([
            "-S",
            "127.0.0.1",
            "-P",
            &port.to_string(),
            "-alloc",
            "-g",
            "1",
        ])
        .output()?;
    assert_eq!(call.status.code(), Some(1), "{call:?}");
    assert!(call.stdout.is_empty(), "{call:?}");
    assert!(
        String::from_utf8_lossy(&call.stderr).contains("cannot reach"),
        "{call:?}"
    );
    Ok(())
}

#[test]
fn server_stops_cleanly_on_sigterm() -> Result<()> {
    let mut server = MockServer::start(1)?;
    let kill = Command::new("kill")
        .args(["-TERM", &server.inner.pid().to_string()])
        .status()?;
    assert!(kill.success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = server.inner.try_wait()? {
            break status;
        }
        ensure!(started.elapsed() < CALL_DEADLINE, "server ignored SIGTERM");
        thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0));
    Ok(())
}
