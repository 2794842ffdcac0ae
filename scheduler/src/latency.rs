//! One definition of a latency distribution for the whole workspace: the messenger's report, its
//! live page and `/monitor`, and the benchmark's tables all summarise lateness with [`Latency`],
//! an HDR histogram (`hdrhistogram`: three significant digits at any magnitude, fixed memory,
//! mergeable), and show the same four figures, p50, p99, p99.9 and max.
//!
//! Early records (negative lateness) are not folded into the distribution: they are counted
//! apart, because an early delivery is a broken promise, not a small latency.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Lateness values in milliseconds.
#[derive(Debug, Clone)]
pub struct Latency {
    hist: Histogram<u64>,
    early: u64,
}

impl Default for Latency {
    fn default() -> Self {
        // 1 ms to one hour at first, three significant digits; it grows for larger values.
        let mut hist = Histogram::new_with_bounds(1, 3_600_000, 3).expect("valid bounds");
        hist.auto(true);
        Latency { hist, early: 0 }
    }
}

/// The figures every latency table of the workspace shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Values recorded, early ones included.
    pub count: u64,
    /// Values below zero (recorded as 0 in the percentiles).
    pub early: u64,
    pub p50_ms: Option<i64>,
    pub p99_ms: Option<i64>,
    pub p999_ms: Option<i64>,
    pub max_ms: Option<i64>,
}

impl Latency {
    /// Records one value; a negative one counts as early (and as 0 in the distribution).
    pub fn record(&mut self, ms: i64) {
        if ms < 0 {
            self.early += 1;
        }
        // Auto-resize is on, so a value of any size fits.
        let _ = self.hist.record(ms.max(0) as u64);
    }

    /// A distribution of `values`.
    pub fn of(values: impl IntoIterator<Item = i64>) -> Latency {
        let mut l = Latency::default();
        for v in values {
            l.record(v);
        }
        l
    }

    /// Adds another distribution's values to this one.
    pub fn merge(&mut self, other: &Latency) {
        let _ = self.hist.add(&other.hist);
        self.early += other.early;
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// p50, p99, p99.9 and max (`None` while empty). Percentiles are HDR's: exact to three
    /// significant digits, at the highest value of the bucket they fall in.
    pub fn summary(&self) -> Summary {
        if self.hist.is_empty() {
            return Summary {
                early: self.early,
                ..Summary::default()
            };
        }
        let q = |p: f64| Some(self.hist.value_at_quantile(p) as i64);
        Summary {
            count: self.hist.len(),
            early: self.early,
            p50_ms: q(0.50),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: Some(self.hist.max() as i64),
        }
    }
}

/// Values in one decade of milliseconds: `[from_ms, to_ms)` (the first is `[0, 1)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Decade {
    pub from_ms: u64,
    pub to_ms: u64,
    pub count: u64,
}

impl Latency {
    /// Counts per decade, from `[0, 1)` ms up to the decade of the largest value: a distribution a
    /// chart on a log scale can show whole.
    pub fn decades(&self) -> Vec<Decade> {
        let mut out: Vec<Decade> = Vec::new();
        if self.hist.is_empty() {
            return out;
        }
        let bound = |i: usize| if i == 0 { 0 } else { 10u64.pow(i as u32 - 1) };
        let mut i = 0;
        while bound(i) <= self.hist.max() {
            out.push(Decade {
                from_ms: bound(i),
                to_ms: bound(i + 1),
                count: 0,
            });
            i += 1;
        }
        for v in self.hist.iter_recorded() {
            let value = self.hist.highest_equivalent(v.value_iterated_to());
            let decade = if value == 0 {
                0
            } else {
                value.ilog10() as usize + 1
            };
            let last = out.len() - 1;
            out[decade.min(last)].count += v.count_at_value();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_values_are_exact_and_large_ones_within_three_digits() {
        let s = Latency::of(1..=1000).summary();
        assert_eq!(s.count, 1000);
        assert_eq!(s.p50_ms, Some(500));
        assert_eq!(s.p99_ms, Some(990));
        assert_eq!(s.p999_ms, Some(999));
        assert_eq!(s.max_ms, Some(1000));
        let big = Latency::of([86_400_000 * 3]).summary();
        let max = big.max_ms.expect("one value") as f64;
        assert!((max / (86_400_000.0 * 3.0) - 1.0).abs() < 1e-3, "{max}");
    }

    #[test]
    fn early_values_are_counted_apart_and_empty_has_no_percentiles() {
        let s = Latency::of([-5, -1, 10]).summary();
        assert_eq!((s.count, s.early), (3, 2));
        assert_eq!(s.p50_ms, Some(0));
        assert_eq!(s.max_ms, Some(10));
        assert_eq!(Latency::default().summary().p99_ms, None);
    }

    #[test]
    fn decades_count_every_value_once() {
        let d = Latency::of([0, 0, 3, 42, 420, 999, 1000, 25_000]).decades();
        let counts: Vec<(u64, u64)> = d.iter().map(|d| (d.from_ms, d.count)).collect();
        assert_eq!(
            counts,
            [(0, 2), (1, 1), (10, 1), (100, 2), (1000, 1), (10_000, 1)]
        );
        assert!(Latency::default().decades().is_empty());
    }

    #[test]
    fn merged_distributions_equal_one_of_all_values() {
        let mut a = Latency::of(0..500);
        a.merge(&Latency::of(500..1000));
        assert_eq!(a.summary(), Latency::of(0..1000).summary());
    }
}
