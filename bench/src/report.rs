//! Collects measurements and prints them as markdown tables.

use std::fmt::Write as _;
use std::time::Duration;

/// One benchmark row: a workload measured on the framework and on the raw baseline.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    /// Which backend or component.
    pub(crate) group: &'static str,
    /// What was measured.
    pub(crate) workload: String,
    /// Units per second through the framework.
    pub(crate) ours: f64,
    /// Units per second of the raw baseline, if there is one.
    pub(crate) raw: Option<f64>,
    /// Unit of the rates ("events/s", ...).
    pub(crate) unit: &'static str,
    /// The target ratio ours/raw, if the issue sets one.
    pub(crate) target: Option<f64>,
    /// Free-form note (peak memory, settings).
    pub(crate) note: String,
}

/// All rows of one run.
#[derive(Debug, Default)]
pub(crate) struct Report {
    rows: Vec<Row>,
}

impl Report {
    /// Adds a row and echoes it to stderr as it is measured.
    pub(crate) fn push(&mut self, row: Row) {
        eprintln!(
            "[{}] {}: {:.0} {} (raw {}) {}",
            row.group,
            row.workload,
            row.ours,
            row.unit,
            row.raw
                .map_or_else(|| "-".to_owned(), |r| format!("{r:.0}")),
            row.note
        );
        self.rows.push(row);
    }

    /// Whether every row with a target met it.
    pub(crate) fn all_targets_met(&self) -> bool {
        self.rows.iter().all(|r| match (r.raw, r.target) {
            (Some(raw), Some(target)) => r.ours / raw >= target,
            _ => true,
        })
    }

    /// The report as markdown, one table per group.
    pub(crate) fn markdown(&self) -> String {
        let mut out = String::new();
        let mut groups: Vec<&str> = self.rows.iter().map(|r| r.group).collect();
        groups.dedup();
        for group in groups {
            let _ = writeln!(out, "\n**{group}**\n");
            let _ = writeln!(
                out,
                "| workload | framework | raw baseline | ratio | target | note |"
            );
            let _ = writeln!(out, "|---|---:|---:|---:|---:|---|");
            for r in self.rows.iter().filter(|r| r.group == group) {
                let raw = r
                    .raw
                    .map_or_else(|| "-".to_owned(), |v| format!("{} {}", human(v), r.unit));
                let ratio = r
                    .raw
                    .map_or_else(|| "-".to_owned(), |v| format!("{:.2}x", r.ours / v));
                let target = match (r.target, r.raw) {
                    (Some(t), Some(raw)) => {
                        let ok = if r.ours / raw >= t { "met" } else { "NOT met" };
                        format!(">= {t:.2}x ({ok})")
                    }
                    (Some(t), None) => format!(">= {t:.2}x"),
                    _ => "-".to_owned(),
                };
                let _ = writeln!(
                    out,
                    "| {} | {} {} | {raw} | {ratio} | {target} | {} |",
                    r.workload,
                    human(r.ours),
                    r.unit,
                    r.note
                );
            }
        }
        out
    }
}

/// A rate with thousands separators, e.g. `1,234,567`.
pub(crate) fn human(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Units per second for `count` units done in `elapsed`.
pub(crate) fn rate(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}
