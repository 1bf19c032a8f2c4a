//! The operator's view outside the binary stays true: the alerting rules pass
//! `promtool check` and their unit tests (`promtool test rules`), every alert has a unit
//! test and a runbook section in docs/operations.md, the Grafana dashboard is well-formed
//! and queries only orchgpu's fixed metric names (and covers all of them), and the
//! harness's real Prometheus scrapes an exporter and runs every dashboard query.
//!
//! promtool and prometheus come from Debian's `prometheus` package (dev/test.sh installs
//! it); without them these tests fail and say so.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::harness::{Prometheus, repo_path};

const RULES: &str = "deploy/prometheus/orchgpu-alerts.yml";
const RULE_TESTS: &str = "deploy/prometheus/orchgpu-alerts.test.yml";
const PROMETHEUS_EXAMPLE: &str = "deploy/prometheus/prometheus.example.yml";
const DASHBOARD: &str = "deploy/grafana/orchgpu-dashboard.json";
const OPERATIONS: &str = "docs/operations.md";

/// orchgpu's metric names, fixed (dashboards and alerts rely on them), plus Prometheus's
/// own `up`.
const METRICS: &[&str] = &[
    "orchgpu_jobs_total",
    "orchgpu_jobs_running",
    "orchgpu_jobs_waiting_for_gpus",
    "orchgpu_gpus_held",
    "orchgpu_releases_pending",
    "orchgpu_reservation_oldest_seconds",
    "orchgpu_release_failures_total",
    "orchgpu_releases_given_up_total",
    "orchgpu_gpu_seconds_total",
    "orchgpu_scheduler_calls_total",
    "orchgpu_aws_requests_total",
    "orchgpu_history_write_failures_total",
    "orchgpu_history_enabled",
    "orchgpu_stage_duration_seconds",
    "orchgpu_job_duration_seconds",
    "orchgpu_queue_messages",
    "orchgpu_last_receive_timestamp_seconds",
    "orchgpu_build_info",
    "up",
];

/// The histograms among them, whose series are `<name>_bucket`, `_sum` and `_count`.
const HISTOGRAMS: &[&str] = &[
    "orchgpu_stage_duration_seconds",
    "orchgpu_job_duration_seconds",
];

fn promtool(args: &[&str]) -> Result<Output> {
    let program = std::env::var("ORCHGPU_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let output = Command::new(&program)
        .args(args)
        .current_dir(repo_path(""))
        .output()
        .with_context(|| {
            format!(
                "cannot run {program}: install Debian's prometheus package \
                 (apt-get install prometheus; dev/test.sh does it as root) or set ORCHGPU_PROMTOOL"
            )
        })?;
    Ok(output)
}

fn assert_success(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{what}: {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn rules_and_example_config_pass_promtool_check() -> Result<()> {
    let output = promtool(&["check", "rules", RULES])?;
    assert_success("promtool check rules", &output);
    // The example config loads the rules file beside it, so this checks both again.
    let output = promtool(&["check", "config", PROMETHEUS_EXAMPLE])?;
    assert_success("promtool check config", &output);
    Ok(())
}

#[test]
fn rule_unit_tests_pass() -> Result<()> {
    let output = promtool(&["test", "rules", RULE_TESTS])?;
    assert_success("promtool test rules", &output);
    // promtool exits 0 for a file with no test groups; make sure they ran.
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("SUCCESS"), "{stdout}");
    Ok(())
}

/// `- alert: NAME` lines of the rules file.
fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert:"))
        .map(|name| name.trim().to_string())
        .collect()
}

/// GitHub's anchor for a Markdown heading: lowercase, spaces to hyphens, punctuation
/// other than `-` and `_` dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_alert_has_annotations_a_unit_test_and_a_runbook_section() -> Result<()> {
    let rules = std::fs::read_to_string(repo_path(RULES))?;
    let tests = std::fs::read_to_string(repo_path(RULE_TESTS))?;
    let operations = std::fs::read_to_string(repo_path(OPERATIONS))?;
    let anchors: BTreeSet<String> = operations
        .lines()
        .filter(|line| line.starts_with('#'))
        .map(|line| anchor(line.trim_start_matches('#')))
        .collect();

    let names = alert_names(&rules);
    assert!(names.len() >= 8, "too few alerts: {names:?}");
    for name in &names {
        // The rule's own block: from its `- alert:` line to the next one.
        let start = rules
            .find(&format!("- alert: {name}"))
            .context("alert line")?;
        let block = rules[start + 1..]
            .find("- alert:")
            .map_or(&rules[start..], |end| &rules[start..start + 1 + end]);
        for key in ["summary:", "description:", "runbook_url:"] {
            assert!(block.contains(key), "{name} has no {key}\n{block}");
        }
        let url = block
            .lines()
            .find_map(|line| line.trim().strip_prefix("runbook_url:"))
            .context("runbook_url line")?
            .trim()
            .trim_matches('"');
        let expected = format!("{OPERATIONS}#{}", name.to_lowercase());
        assert_eq!(url, expected, "{name}'s runbook_url");
        assert!(
            anchors.contains(&name.to_lowercase()),
            "{OPERATIONS} has no heading for {name} (its runbook_url points there)"
        );
        assert!(
            tests.contains(&format!("alertname: {name}\n")),
            "{RULE_TESTS} has no test of {name}"
        );
    }
    Ok(())
}

/// The metric names a PromQL expression selects: identifiers outside label matchers,
/// ranges and strings, that are neither functions, aggregations, keywords nor the
/// labels of a `by (...)`-style clause.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "group",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
    ];
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Skips from an opening delimiter to its closing one (no nesting in PromQL's).
    let skip_to = |i: usize, close: char| {
        chars[i + 1..]
            .iter()
            .position(|&c| c == close)
            .map_or(chars.len(), |at| i + 1 + at + 1)
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '{' => i = skip_to(i, '}'),
            '[' => i = skip_to(i, ']'),
            '"' | '\'' | '`' => i = skip_to(i, c),
            c if c.is_ascii_digit() => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let call = chars.get(next) == Some(&'(');
                if LABEL_LISTS.contains(&word.as_str()) && call {
                    i = skip_to(next, ')');
                } else if !call && !KEYWORDS.contains(&word.to_lowercase().as_str()) {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// A series name back to its metric: a histogram's `_bucket`, `_sum`, `_count`.
fn metric_of(series: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = series.strip_suffix(suffix)
            && HISTOGRAMS.contains(&base)
        {
            return base;
        }
    }
    series
}

/// Every `expr` in the dashboard, with the panel it belongs to.
fn exprs(value: &Value, panel: &str, found: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            let title = map
                .get("title")
                .and_then(Value::as_str)
                .unwrap_or(panel)
                .to_string();
            for (key, child) in map {
                match (key.as_str(), child) {
                    ("expr", Value::String(expr)) => found.push((title.clone(), expr.clone())),
                    _ => exprs(child, &title, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| exprs(item, panel, found)),
        _ => {}
    }
}

fn dashboard() -> Result<Value> {
    let text = std::fs::read_to_string(repo_path(DASHBOARD))?;
    serde_json::from_str(&text).with_context(|| format!("{DASHBOARD} is not valid JSON"))
}

#[test]
fn dashboard_is_well_formed_and_queries_exactly_the_fixed_metrics() -> Result<()> {
    let dashboard = dashboard()?;
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    let schema = dashboard["schemaVersion"]
        .as_u64()
        .context("schemaVersion")?;
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    let panels = dashboard["panels"].as_array().context("panels")?;
    let mut ids = BTreeSet::new();
    for panel in panels {
        let id = panel["id"]
            .as_u64()
            .context("a panel without a numeric id")?;
        assert!(ids.insert(id), "duplicate panel id: {panel}");
        if panel["type"] != "row" {
            assert_eq!(
                panel["datasource"]["uid"], "${DS_PROMETHEUS}",
                "panel {} does not use the datasource input",
                panel["title"]
            );
        }
    }

    let mut found = Vec::new();
    exprs(&dashboard, "", &mut found);
    assert!(found.len() >= 16, "too few queries: {found:?}");
    let mut used = BTreeSet::new();
    for (panel, expr) in &found {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{panel}: no metric in {expr:?}");
        for name in names {
            let metric = metric_of(&name).to_string();
            assert!(
                METRICS.contains(&metric.as_str()),
                "panel {panel:?} queries {name}, not one of orchgpu's metrics: {expr}"
            );
            used.insert(metric);
        }
    }
    let missing: Vec<_> = METRICS.iter().filter(|m| !used.contains(**m)).collect();
    assert!(missing.is_empty(), "no panel shows {missing:?}");
    Ok(())
}

#[test]
fn metric_names_finds_selectors_only() {
    let expr = r#"histogram_quantile(0.9, sum by (le, stage) (rate(orchgpu_stage_duration_seconds_bucket{instance=~"$instance", stage="x y"}[$__rate_interval]))) / on (job) group_left (version) orchgpu_build_info offset 5m > 1e3 and time() - up"#;
    let names: Vec<String> = metric_names(expr).into_iter().collect();
    assert_eq!(
        names,
        [
            "orchgpu_build_info",
            "orchgpu_stage_duration_seconds_bucket",
            "up"
        ]
    );
}

#[test]
fn rule_files_name_only_the_fixed_metrics() -> Result<()> {
    for file in [RULES, RULE_TESTS] {
        let text = std::fs::read_to_string(repo_path(file))?;
        for (at, _) in text.match_indices("orchgpu_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                METRICS.contains(&metric_of(&name)),
                "{file} names {name}, not one of orchgpu's metrics"
            );
        }
    }
    Ok(())
}

/// Serves `body` as a Prometheus text exposition on a loopback port, forever, from a
/// thread; returns the port.
fn static_exporter(body: &'static str) -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            // The request's head fits one read; its content does not matter.
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(port)
}

const EXPOSITION: &str = "\
# HELP orchgpu_build_info orchgpu's version.
# TYPE orchgpu_build_info gauge
orchgpu_build_info{version=\"x\"} 1
";

#[test]
fn harness_prometheus_scrapes_an_exporter_and_answers_queries() -> Result<()> {
    let port = static_exporter(EXPOSITION)?;
    let prometheus = Prometheus::start(&format!("127.0.0.1:{port}"))?;
    let result = prometheus.wait_for_series("orchgpu_build_info", Duration::from_secs(30))?;
    assert_eq!(result.len(), 1, "{result:?}");
    let series = &result[0];
    assert_eq!(series["metric"]["version"], "x", "{series}");
    assert_eq!(series["metric"]["job"], "orchgpu", "{series}");
    assert_eq!(
        series["metric"]["instance"],
        format!("127.0.0.1:{port}"),
        "{series}"
    );
    assert_eq!(series["value"][1], "1", "{series}");
    // Prometheus's own `up` for that target.
    let up = prometheus.wait_for_series("up == 1", Duration::from_secs(10))?;
    assert_eq!(up[0]["metric"]["job"], "orchgpu");
    // A bad query is an error, not an empty answer.
    assert!(prometheus.query("sum(").is_err());
    Ok(())
}

#[test]
fn every_dashboard_query_runs_on_prometheus() -> Result<()> {
    let dashboard = dashboard()?;
    let mut found = Vec::new();
    exprs(&dashboard, "", &mut found);
    let port = static_exporter(EXPOSITION)?;
    let prometheus = Prometheus::start(&format!("127.0.0.1:{port}"))?;
    let mut failures = Vec::new();
    for (panel, expr) in &found {
        // Grafana's variables, as Grafana fills them in.
        let query = expr
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*");
        if let Err(e) = prometheus.query(&query) {
            failures.push(format!("{panel}: {e:#}"));
        }
    }
    if !failures.is_empty() {
        bail!("queries Prometheus refused:\n{}", failures.join("\n"));
    }
    Ok(())
}
