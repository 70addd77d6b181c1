//! Collects measurements and prints them as one markdown table.
//!
//! Framework and raw runs alternate (ABBA order) after a warm-up; a row reports the median rate
//! of each side and the median of the per-pair ratios, which is steadier than a ratio of two
//! best-of-N figures when the machine's load drifts.

use std::fmt::Write as _;
use std::time::Duration;

/// What a row must reach to meet its target.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// ours/raw at least this.
    RatioAtLeast(f64),
    /// ours/raw at most this: for costs, such as a latency against an earlier one.
    RatioAtMost(f64),
    /// The framework figure itself at least this, in the row's unit (no baseline needed).
    AtLeast(f64),
    /// Counts that must come out exactly as `expected` says; `met` is whether they did.
    Exactly {
        /// The expected counts, as shown in the table.
        expected: String,
        /// Whether every run came out so.
        met: bool,
    },
}

impl Target {
    /// The target as shown in the table, e.g. `>= 0.80x` or `>= 1,000 commands/s`.
    fn describe(&self, unit: &str) -> String {
        match self {
            Self::RatioAtLeast(t) => format!(">= {t:.2}x"),
            Self::RatioAtMost(t) => format!("<= {t:.2}x"),
            Self::AtLeast(t) => format!(">= {} {unit}", human(*t)),
            Self::Exactly { expected, .. } => expected.clone(),
        }
    }
}

/// One benchmark row: a workload measured on the framework and on the raw baseline.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    /// Which backend or component.
    pub(crate) group: &'static str,
    /// What was measured.
    pub(crate) workload: String,
    /// Units per second through the framework.
    pub(crate) ours: f64,
    /// The framework column as text, for a figure that is not one rate (counts of outcomes).
    pub(crate) shown: Option<String>,
    /// Units per second of the raw baseline, if there is one.
    pub(crate) raw: Option<f64>,
    /// ours/raw; by default `ours / raw`, or the median of paired ratios (see [`Samples`]).
    pub(crate) ratio: Option<f64>,
    /// Unit of the rates ("events/s", ...).
    pub(crate) unit: &'static str,
    /// The target, if the issue sets one.
    pub(crate) target: Option<Target>,
    /// Free-form note (peak memory, settings).
    pub(crate) note: String,
}

impl Row {
    /// A row from alternating samples: median rates and the median paired ratio; `target` is a
    /// lower bound on the ratio.
    pub(crate) fn paired(
        group: &'static str,
        workload: impl Into<String>,
        samples: &Samples,
        unit: &'static str,
        target: Option<f64>,
        note: impl Into<String>,
    ) -> Self {
        Self {
            group,
            workload: workload.into(),
            ours: samples.ours(),
            shown: None,
            raw: Some(samples.raw()),
            ratio: Some(samples.ratio()),
            unit,
            target: target.map(Target::RatioAtLeast),
            note: note.into(),
        }
    }

    /// A row with no raw baseline: one figure of the framework's own.
    pub(crate) fn alone(
        group: &'static str,
        workload: impl Into<String>,
        ours: f64,
        unit: &'static str,
        note: impl Into<String>,
    ) -> Self {
        Self {
            group,
            workload: workload.into(),
            ours,
            shown: None,
            raw: None,
            ratio: None,
            unit,
            target: None,
            note: note.into(),
        }
    }

    /// The same row with `target` in place of its own.
    pub(crate) fn with_target(mut self, target: Target) -> Self {
        self.target = Some(target);
        self
    }

    /// The same row showing `text` in the framework column instead of the rate.
    pub(crate) fn showing(mut self, text: impl Into<String>) -> Self {
        self.shown = Some(text.into());
        self
    }

    /// ours/raw, if there is a raw baseline.
    pub(crate) fn ratio(&self) -> Option<f64> {
        self.ratio.or_else(|| self.raw.map(|raw| self.ours / raw))
    }

    /// Whether the target is met (`None` without a target, or without the baseline it needs).
    pub(crate) fn met(&self) -> Option<bool> {
        match self.target.as_ref()? {
            Target::RatioAtLeast(t) => Some(self.ratio()? >= *t),
            Target::RatioAtMost(t) => Some(self.ratio()? <= *t),
            Target::AtLeast(t) => Some(self.ours >= *t),
            Target::Exactly { met, .. } => Some(*met),
        }
    }

    /// The framework column: the rate with its unit, or the row's own text.
    fn framework(&self) -> String {
        self.shown
            .clone()
            .unwrap_or_else(|| format!("{} {}", human(self.ours), self.unit))
    }

    /// What was reached against what was wanted, e.g. `0.75x, wanted >= 0.80x`.
    pub(crate) fn against_target(&self) -> String {
        let Some(target) = &self.target else {
            return "no target".to_owned();
        };
        let got = match target {
            Target::RatioAtLeast(_) | Target::RatioAtMost(_) => self
                .ratio()
                .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x")),
            Target::AtLeast(_) | Target::Exactly { .. } => self.framework(),
        };
        format!("{got}, wanted {}", target.describe(self.unit))
    }
}

/// Rates of alternating framework and raw runs; pair `i` was measured back to back.
#[derive(Debug, Default, Clone)]
pub(crate) struct Samples {
    ours: Vec<f64>,
    raw: Vec<f64>,
}

impl Samples {
    /// Adds one pair of rates.
    pub(crate) fn push(&mut self, ours: f64, raw: f64) {
        self.ours.push(ours);
        self.raw.push(raw);
    }

    /// Adds one pair of timings of `units` units each.
    pub(crate) fn push_times(&mut self, units: u64, ours: Duration, raw: Duration) {
        self.push(rate(units, ours), rate(units, raw));
    }

    /// Number of pairs.
    pub(crate) fn len(&self) -> usize {
        self.ours.len()
    }

    /// Median framework rate.
    pub(crate) fn ours(&self) -> f64 {
        median(&self.ours)
    }

    /// Median raw rate.
    pub(crate) fn raw(&self) -> f64 {
        median(&self.raw)
    }

    /// Median of the per-pair ratios ours/raw.
    pub(crate) fn ratio(&self) -> f64 {
        let ratios: Vec<f64> = self
            .ours
            .iter()
            .zip(&self.raw)
            .map(|(o, r)| o / r)
            .collect();
        median(&ratios)
    }

    /// The spread of the paired ratios, as `min–max`.
    pub(crate) fn spread(&self) -> String {
        let ratios = self.ours.iter().zip(&self.raw).map(|(o, r)| o / r);
        let (lo, hi) = ratios.fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(r), hi.max(r)));
        format!("{lo:.2}–{hi:.2}x")
    }

    /// "median of N pairs (spread a–b)".
    pub(crate) fn describe(&self) -> String {
        format!(
            "median of {} alternating pairs (ratios {})",
            self.len(),
            self.spread()
        )
    }
}

/// The median of `values` (0 when empty).
pub(crate) fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        f64::midpoint(v[mid - 1], v[mid])
    }
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
            "[{}] {}: {} (raw {}, ratio {}) {}",
            row.group,
            row.workload,
            row.framework(),
            row.raw.map_or_else(|| "-".to_owned(), human),
            row.ratio()
                .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x")),
            row.note
        );
        self.rows.push(row);
    }

    /// Whether every row with a target met it.
    pub(crate) fn all_targets_met(&self) -> bool {
        self.rows.iter().all(|r| r.met() != Some(false))
    }

    /// The rows that missed their target.
    pub(crate) fn missed(&self) -> impl Iterator<Item = &Row> {
        self.rows.iter().filter(|r| r.met() == Some(false))
    }

    /// The report as one markdown table.
    pub(crate) fn markdown(&self, quick: bool) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| group | workload | framework | raw baseline | ratio | target | note |"
        );
        let _ = writeln!(out, "|---|---|---:|---:|---:|---|---|");
        for r in &self.rows {
            let raw = r
                .raw
                .map_or_else(|| "-".to_owned(), |v| format!("{} {}", human(v), r.unit));
            let ratio = r
                .ratio()
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.2}x"));
            let target = match (&r.target, r.met()) {
                (Some(t), Some(true)) => format!("{} met", t.describe(r.unit)),
                (Some(t), Some(false)) => format!("{} **NOT met**", t.describe(r.unit)),
                (Some(t), None) => t.describe(r.unit),
                (None, _) => "-".to_owned(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {raw} | {ratio} | {target} | {} |",
                r.group,
                r.workload,
                r.framework(),
                r.note
            );
        }
        let _ = writeln!(
            out,
            "\nRatio = framework / raw baseline doing the same work in the same run. Framework and \
             raw runs alternate after a warm-up; rates are medians, the ratio is the median of the \
             per-pair ratios."
        );
        if quick {
            let _ = writeln!(
                out,
                "\n**Quick run** (`--quick`): small sizes, few repetitions; a smoke check, not \
                 figures to quote."
            );
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

/// Peak heap as KiB or MiB.
pub(crate) fn heap_size(n: usize) -> String {
    if n >= 4 << 20 {
        format!("{:.1} MiB", n as f64 / f64::from(1 << 20))
    } else {
        format!("{:.0} KiB", n as f64 / 1024.0)
    }
}

#[cfg(test)]
mod tests {
    use super::{human, median, Samples};

    #[test]
    fn medians_and_paired_ratios() {
        assert!((median(&[3.0, 1.0, 2.0]) - 2.0).abs() < 1e-9);
        assert!((median(&[4.0, 1.0, 2.0, 3.0]) - 2.5).abs() < 1e-9);
        let mut s = Samples::default();
        s.push(10.0, 20.0);
        s.push(30.0, 30.0);
        s.push(8.0, 10.0);
        assert!((s.ratio() - 0.8).abs() < 1e-9);
        assert!((s.ours() - 10.0).abs() < 1e-9);
        assert_eq!(human(1_234_567.0), "1,234,567");
    }
}
