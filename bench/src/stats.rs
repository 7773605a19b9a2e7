//! Latency summaries (nearest-rank percentiles) and the plain tables every
//! scenario prints. The tables are Markdown, so a result pastes into
//! `BENCHMARKS.md` as it is.

use std::time::Duration;

/// Percentiles of a set of latencies, in milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Summary {
    /// `None` for no samples: a percentile of nothing is not zero.
    pub fn of(samples: &[Duration]) -> Option<Summary> {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        Self::of_millis(&mut ms)
    }

    /// Like [`Summary::of`], for samples already in milliseconds (sorted in place).
    pub fn of_millis(ms: &mut [f64]) -> Option<Summary> {
        if ms.is_empty() {
            return None;
        }
        ms.sort_by(f64::total_cmp);
        Some(Summary {
            count: ms.len(),
            p50: percentile(ms, 50.0),
            p95: percentile(ms, 95.0),
            p99: percentile(ms, 99.0),
            max: ms[ms.len() - 1],
            mean: ms.iter().sum::<f64>() / ms.len() as f64,
        })
    }
}

/// The nearest-rank percentile `p` (0 < p ≤ 100) of `sorted`, which must be
/// sorted ascending and not empty: the smallest sample that at least `p` %
/// of the samples are less than or equal to.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Milliseconds with a precision that suits their size.
pub fn ms(value: f64) -> String {
    if value < 10.0 {
        format!("{value:.2}")
    } else if value < 100.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.0}")
    }
}

/// A rate with thousands separated, `12,345.6`.
pub fn rate(value: f64) -> String {
    let digits = (value.trunc() as u64).to_string();
    // Groups of three from the right: the first group takes what is left over.
    let first = match digits.len() % 3 {
        0 => 3,
        n => n,
    };
    let mut grouped = digits[..first.min(digits.len())].to_owned();
    let mut rest = &digits[first.min(digits.len())..];
    while !rest.is_empty() {
        grouped.push(',');
        grouped.push_str(&rest[..3]);
        rest = &rest[3..];
    }
    if value < 100.0 {
        format!("{value:.1}")
    } else {
        grouped
    }
}

/// A Markdown table with its columns padded to line up in a terminal.
/// Columns after the first are right-aligned (they hold figures).
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are empty, extra cells are an error of the
    /// caller and dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        let mut cells = cells;
        cells.resize(self.header.len(), String::new());
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let widths: Vec<usize> = (0..self.header.len())
            .map(|c| {
                self.rows
                    .iter()
                    .map(|r| r[c].chars().count())
                    .chain([self.header[c].chars().count(), 3])
                    .max()
                    .unwrap_or(3)
            })
            .collect();
        let line = |cells: &[String]| {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(c, (cell, w))| {
                    if c == 0 {
                        format!("{cell:<w$}")
                    } else {
                        format!("{cell:>w$}")
                    }
                })
                .collect();
            format!("| {} |\n", padded.join(" | "))
        };
        let mut out = line(&self.header);
        let rule: Vec<String> = widths
            .iter()
            .enumerate()
            .map(|(c, w)| {
                if c == 0 {
                    "-".repeat(*w)
                } else {
                    format!("{}:", "-".repeat(w - 1))
                }
            })
            .collect();
        out.push_str(&format!("| {} |\n", rule.join(" | ")));
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
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let s = Summary::of(&samples).unwrap();
        assert_eq!(
            (s.count, s.p50, s.p95, s.p99, s.max),
            (100, 50.0, 95.0, 99.0, 100.0)
        );
        assert!((s.mean - 50.5).abs() < 1e-9);

        // Order does not matter; with few samples the high percentiles are the maximum.
        let mut few = vec![3.0, 1.0, 2.0];
        let s = Summary::of_millis(&mut few).unwrap();
        assert_eq!((s.p50, s.p95, s.p99, s.max), (2.0, 3.0, 3.0, 3.0));

        let mut one = vec![7.5];
        let s = Summary::of_millis(&mut one).unwrap();
        assert_eq!((s.p50, s.p99), (7.5, 7.5));

        assert_eq!(Summary::of(&[]), None);
    }

    #[test]
    fn p99_of_ten_thousand_is_the_hundredth_largest() {
        let mut ms: Vec<f64> = (1..=10_000).map(f64::from).rev().collect();
        let s = Summary::of_millis(&mut ms).unwrap();
        assert_eq!((s.p50, s.p95, s.p99), (5_000.0, 9_500.0, 9_900.0));
    }

    #[test]
    fn figures_are_formatted_for_reading() {
        assert_eq!(ms(1.2345), "1.23");
        assert_eq!(ms(12.345), "12.3");
        assert_eq!(ms(1234.6), "1235");
        assert_eq!(rate(1_234_567.8), "1,234,567");
        assert_eq!(rate(999.9), "999");
        assert_eq!(rate(1000.0), "1,000");
        assert_eq!(rate(123_456.0), "123,456");
        assert_eq!(rate(42.26), "42.3");
        assert_eq!(rate(9.96), "10.0");
        assert_eq!(rate(0.0), "0.0");
    }

    #[test]
    fn tables_line_up_as_markdown() {
        let mut t = Table::new(&["store", "p50 ms"]);
        t.row(vec!["postgres".into(), "1.23".into()]);
        t.row(vec!["sqlite".into()]);
        assert_eq!(
            t.render(),
            "| store    | p50 ms |\n\
             | -------- | -----: |\n\
             | postgres |   1.23 |\n\
             | sqlite   |        |\n"
        );
    }
}
