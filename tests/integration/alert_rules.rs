//! The operator's view outside the binary stays true: the alerting rules pass
//! `promtool check` and their unit tests (`promtool test rules`), every alert has a unit
//! test and a runbook section in docs/operations.md, and the Grafana dashboard is
//! well-formed, is valid PromQL and queries only orchgpu's fixed metric names (and covers
//! all of them). That a real Prometheus scrapes the daemon is `observe`'s test.
//!
//! promtool comes from Debian's `prometheus` package (dev/test.sh installs it); without
//! it these tests fail and say so.

use std::collections::BTreeSet;
use std::process::{Command, Output};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::harness::repo_path;

const RULES: &str = "deploy/prometheus/orchgpu-alerts.yml";
const RULE_TESTS: &str = "deploy/prometheus/orchgpu-alerts.test.yml";
const PROMETHEUS_EXAMPLE: &str = "deploy/prometheus/prometheus.example.yml";
const DASHBOARD: &str = "deploy/grafana/orchgpu-dashboard.json";
const OPERATIONS: &str = "docs/operations.md";

/// orchgpu's metric names, fixed (dashboards and alerts rely on them).
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

/// The orchgpu series a text names (`orchgpu_…` identifiers).
fn orchgpu_names(text: &str) -> BTreeSet<String> {
    text.match_indices("orchgpu_")
        .filter(|(at, _)| {
            // Not the tail of a longer identifier.
            !text[..*at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
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
        let names = orchgpu_names(expr);
        assert!(
            !names.is_empty() || expr.starts_with("up{"),
            "{panel}: no metric in {expr:?}"
        );
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
fn rule_files_name_only_the_fixed_metrics() -> Result<()> {
    for file in [RULES, RULE_TESTS] {
        let text = std::fs::read_to_string(repo_path(file))?;
        for name in orchgpu_names(&text) {
            assert!(
                METRICS.contains(&metric_of(&name)),
                "{file} names {name}, not one of orchgpu's metrics"
            );
        }
    }
    Ok(())
}

#[test]
fn every_dashboard_query_is_valid_promql() -> Result<()> {
    let dashboard = dashboard()?;
    let mut found = Vec::new();
    exprs(&dashboard, "", &mut found);
    // promtool parses a recording rule's expression as Prometheus would the query.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in found.iter().enumerate() {
        // Grafana's variables, as Grafana fills them in.
        let query = expr
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&query)?
        ));
    }
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("dashboard-queries.yml");
    std::fs::write(&file, rules)?;
    let output = promtool(&["check", "rules", file.to_str().context("utf-8 temp path")?])?;
    assert_success("promtool check rules (the dashboard's queries)", &output);
    Ok(())
}
