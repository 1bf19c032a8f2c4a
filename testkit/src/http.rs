//! The daemon's HTTP listener seen from outside: its address from the log, a plain GET,
//! and sums over a metrics exposition.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};

use crate::stack::Stack;

/// A plain HTTP/1.0 GET on loopback (no chunked answer to decode): the status code and
/// the body.
pub fn http_get(address: &str, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address)
        .with_context(|| format!("cannot connect to {address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of headers in {response:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// The sum of the samples of metric `name` whose labels include all of `labels`, in a
/// Prometheus or OpenMetrics text exposition.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((metric, rest)) => (metric, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let wanted = metric == name
                && labels
                    .iter()
                    .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// The address the daemon's HTTP listener took (it logs it at start-up).
pub async fn http_address(stack: &mut Stack, daemon: usize) -> Result<String> {
    stack
        .wait_for_log(daemon, "Serving /metrics", 1, Duration::from_secs(30))
        .await?;
    let log = stack.log(daemon);
    log.lines()
        .find(|l| l.contains("Serving /metrics"))
        .and_then(|l| l.split("address=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no address in the log"))
}
