//! What the bench reads from Linux about a process: CPU ticks and memory from `/proc`,
//! the wall clock in µs, and an optional `perf record` profile.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Result, anyhow};
use orchgpu_testkit::Stack;

/// Linux reports utime/stime in USER_HZ ticks, 100 per second on every common platform.
pub(crate) const TICKS_PER_SEC: f64 = 100.0;

/// With `ORCHGPU_BENCH_PERF=DIR`, records a CPU profile of `pid` into `DIR/<tag>.data`
/// until [`stop_perf`] (SIGINT makes perf write its file).
pub(crate) fn start_perf(stack: &mut Stack, pid: u32, tag: &str) -> Result<Option<usize>> {
    let Ok(dir) = std::env::var("ORCHGPU_BENCH_PERF") else {
        return Ok(None);
    };
    let mut command = Command::new("perf");
    command
        .args(["record", "-F", "2999", "-g", "-p", &pid.to_string(), "-o"])
        .arg(Path::new(&dir).join(format!("{tag}.data")));
    Ok(Some(stack.spawn("perf", command)?))
}

/// Stops the profile [`start_perf`] started, if any, so perf writes its file.
pub(crate) async fn stop_perf(stack: &mut Stack, perf: Option<usize>) {
    if let Some(index) = perf {
        let perf = stack.process(index);
        let _ = perf.signal(nix::sys::signal::Signal::SIGINT);
        if perf.wait_exit(Duration::from_secs(30)).await.is_err() {
            perf.kill();
        }
    }
}

/// The CPU time of `pid` so far, user + system, in ticks ([`TICKS_PER_SEC`]).
pub(crate) fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(") ").ok_or_else(|| anyhow!("odd stat"))?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the command name.
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// CPU `ticks` spent over `seconds` of wall time, in % of one core.
pub(crate) fn cpu_percent(ticks: u64, seconds: f64) -> f64 {
    ticks as f64 / TICKS_PER_SEC / seconds * 100.0
}

/// `VmHWM` and `VmRSS` in KiB.
pub(crate) fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmHWM:"), field("VmRSS:")))
}

/// The wall clock in µs since the epoch, as the daemon's log timestamps are.
pub(crate) fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_micros() as i64
}
