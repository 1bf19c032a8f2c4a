//! The figures and the final table: medians, ratios to the floor, requests per job, and
//! the Markdown report printed at the end of a run.

use std::collections::BTreeMap;

/// One line of the final table.
pub(crate) struct Row {
    what: String,
    value: String,
    floor: String,
    ratio: String,
    target: &'static str,
}

#[derive(Default)]
pub(crate) struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Report {
    /// Adds a row of the table (and says it on stderr).
    pub(crate) fn row(
        &mut self,
        what: impl Into<String>,
        value: impl Into<String>,
        floor: impl Into<String>,
        ratio: impl Into<String>,
        target: &'static str,
    ) {
        let row = Row {
            what: what.into(),
            value: value.into(),
            floor: floor.into(),
            ratio: ratio.into(),
            target,
        };
        eprintln!(
            "bench: {} = {} (floor {}, ratio {})",
            row.what, row.value, row.floor, row.ratio
        );
        self.rows.push(row);
    }
    /// Adds a note under the table (and says it on stderr).
    pub(crate) fn note(&mut self, text: impl Into<String>) {
        let text = text.into();
        eprintln!("bench: note: {text}");
        self.notes.push(text);
    }
    /// The table and its notes, in Markdown.
    pub(crate) fn print(&self) -> String {
        let mut out = String::new();
        out.push_str("| what | orchgpu | floor (same run) | ratio | target |\n");
        out.push_str("|---|---|---|---|---|\n");
        for r in &self.rows {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                r.what, r.value, r.floor, r.ratio, r.target
            ));
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for n in &self.notes {
                out.push_str(&format!("- {n}\n"));
            }
        }
        out
    }
}

/// Total length of the union of `(start, end)` intervals.
pub(crate) fn covered_us(intervals: &mut [(i64, i64)]) -> i64 {
    intervals.sort_unstable();
    let mut total = 0;
    let mut reach = i64::MIN;
    for &(start, end) in intervals.iter() {
        let start = start.max(reach);
        if end > start {
            total += end - start;
            reach = end;
        }
    }
    total
}

/// The median of `values` (NaN for none); sorts them.
pub(crate) fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// µs as milliseconds, to 0.1 ms.
pub(crate) fn ms(us: f64) -> String {
    format!("{:.1} ms", us / 1000.0)
}

/// `value / floor`, as `1.23×`.
pub(crate) fn ratio(value: f64, floor: f64) -> String {
    format!("{:.2}×", value / floor)
}

/// Requests per job by operation, for those made at all: `<operation> <per job>, ...`.
pub(crate) fn requests_text(counts: &BTreeMap<String, u64>, jobs: usize) -> String {
    counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(op, n)| format!("{op} {:.2}", *n as f64 / jobs as f64))
        .collect::<Vec<_>>()
        .join(", ")
}
