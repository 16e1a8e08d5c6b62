// SPDX-License-Identifier: Apache-2.0
//! Small statistics shared by every benchmark: percentiles of samples, rates (ops/s, MB/s),
//! ratios against a baseline, and a Markdown table printer.

use serde::Serialize;

/// Percentiles of a set of samples, in the samples' unit (milliseconds for latencies).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// Number of samples.
    pub count: usize,
    /// Smallest sample.
    pub min: f64,
    /// Median (nearest rank).
    pub p50: f64,
    /// 90th percentile (nearest rank).
    pub p90: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Largest sample.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
}

impl Summary {
    /// The summary of `samples`; `None` when there are none (or one is NaN).
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() || samples.iter().any(|s| s.is_nan()) {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(Summary {
            count: sorted.len(),
            min: sorted[0],
            p50: percentile(&sorted, 50.0),
            p90: percentile(&sorted, 90.0),
            p99: percentile(&sorted, 99.0),
            max: sorted[sorted.len() - 1],
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
        })
    }
}

/// The `p`-th percentile (0 < p <= 100) of `sorted` (ascending, not empty) by the nearest-rank
/// method: the smallest sample with at least p % of the samples at or below it. Always one of
/// the samples, so a p99 of ten samples is their maximum, not an interpolation.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    assert!(!sorted.is_empty(), "percentile of no samples");
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of `values` (nearest rank, so one of them); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    Summary::of(values).map(|s| s.p50)
}

/// Operations per second.
pub fn ops_per_s(ops: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        ops as f64 / seconds
    } else {
        f64::NAN
    }
}

/// Events per minute: `count` in `seconds`.
pub fn per_minute(count: u64, seconds: f64) -> f64 {
    ops_per_s(count, seconds) * 60.0
}

/// Throughput in MB/s (10^6 bytes per second, as fio and qemu print "MB/s").
pub fn mb_per_s(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 / 1e6 / seconds
    } else {
        f64::NAN
    }
}

/// `value / baseline`; `None` when the baseline is zero or either is not a number.
pub fn ratio(value: f64, baseline: f64) -> Option<f64> {
    (baseline != 0.0 && value.is_finite() && baseline.is_finite()).then(|| value / baseline)
}

/// A number with a precision that suits its size: 3 significant digits below 100, none above.
pub fn fmt_num(value: f64) -> String {
    if !value.is_finite() {
        return "n/a".into();
    }
    let abs = value.abs();
    if abs >= 100.0 {
        format!("{value:.0}")
    } else if abs >= 10.0 {
        format!("{value:.1}")
    } else if abs >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

/// A ratio as `0.93x`, or `n/a`.
pub fn fmt_ratio(ratio: Option<f64>) -> String {
    ratio.map_or_else(|| "n/a".into(), |r| format!("{r:.2}x"))
}

/// A table printed as GitHub Markdown: readable in a terminal and in `docs/benchmarks.md`.
/// Columns after the first are right-aligned (they hold numbers).
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new<S: Into<String>>(headers: impl IntoIterator<Item = S>) -> Table {
        Table {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row; missing cells are left empty, extra cells are dropped.
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        let mut row: Vec<String> = cells.into_iter().map(Into::into).collect();
        row.resize(self.headers.len(), String::new());
        self.rows.push(row);
    }

    /// The table as Markdown, columns padded to their widest cell.
    pub fn render(&self) -> String {
        let widths: Vec<usize> = (0..self.headers.len())
            .map(|c| {
                self.rows
                    .iter()
                    .map(|r| r[c].chars().count())
                    .chain([self.headers[c].chars().count(), 3])
                    .max()
                    .unwrap_or(3)
            })
            .collect();
        let line = |cells: &[String]| {
            let padded: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(c, cell)| {
                    if c == 0 {
                        format!("{cell:<w$}", w = widths[c])
                    } else {
                        format!("{cell:>w$}", w = widths[c])
                    }
                })
                .collect();
            format!("| {} |\n", padded.join(" | "))
        };
        let mut out = line(&self.headers);
        // Each rule cell spans its column's padding too; numbers are right-aligned.
        let rule: Vec<String> = widths
            .iter()
            .enumerate()
            .map(|(c, w)| {
                if c == 0 {
                    "-".repeat(w + 2)
                } else {
                    format!("{}:", "-".repeat(w + 1))
                }
            })
            .collect();
        out.push_str(&format!("|{}|\n", rule.join("|")));
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples: Vec<f64> = (1..=10).rev().map(f64::from).collect();
        let s = Summary::of(&samples).unwrap();
        assert_eq!(s.count, 10);
        assert_eq!((s.min, s.p50, s.p90, s.p99, s.max), (1.0, 5.0, 9.0, 10.0, 10.0));
        assert_eq!(s.mean, 5.5);
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Summary::of(&hundred).unwrap();
        assert_eq!((s.p50, s.p90, s.p99, s.max), (50.0, 90.0, 99.0, 100.0));
        let one = Summary::of(&[7.0]).unwrap();
        assert_eq!((one.p50, one.p90, one.p99, one.max), (7.0, 7.0, 7.0, 7.0));
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[1.0, f64::NAN]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
    }

    #[test]
    fn rates_and_ratios() {
        assert_eq!(mb_per_s(10_000_000, 2.0), 5.0);
        assert_eq!(ops_per_s(1000, 0.5), 2000.0);
        assert_eq!(per_minute(4, 8.0), 30.0);
        assert_eq!(per_minute(1, 60.0), 1.0);
        assert!(per_minute(3, 0.0).is_nan());
        assert!(per_minute(3, f64::NAN).is_nan());
        assert!(mb_per_s(1, 0.0).is_nan());
        assert_eq!(ratio(50.0, 100.0), Some(0.5));
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(ratio(f64::NAN, 1.0), None);
        assert_eq!(fmt_ratio(Some(0.456)), "0.46x");
        assert_eq!(fmt_ratio(None), "n/a");
        assert_eq!(fmt_num(1234.5), "1234");
        assert_eq!(fmt_num(12.345), "12.3");
        assert_eq!(fmt_num(1.2345), "1.23");
        assert_eq!(fmt_num(0.12345), "0.123");
        assert_eq!(fmt_num(f64::INFINITY), "n/a");
    }

    #[test]
    fn tables_are_aligned_markdown() {
        let mut t = Table::new(["op", "p50 ms"]);
        t.row(["create", "12.5"]);
        t.row(["snapshot"]);
        let text = t.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "| op       | p50 ms |");
        assert_eq!(lines[1], "|----------|-------:|");
        assert_eq!(lines[2], "| create   |   12.5 |");
        assert_eq!(lines[3], "| snapshot |        |");
    }
}
