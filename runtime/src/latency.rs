//! Latency measurement that survives a noisy machine: two models timed in alternation in one
//! process after a warm-up, summarised by the median and the spread.
//!
//! A single timed run of each model, one after the other, measures whatever else the machine
//! did at that moment as much as the models (a model with nothing pruned showed 0.77× of
//! itself). Alternating the runs exposes both to the same disturbances, and the median ignores
//! the outliers.

use crate::RunError;
use crate::tract::{Feed, Plan};
use serde::Serialize;

/// Statistics of one model's timed runs, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Latency {
    /// Median of the runs.
    pub median_ms: f64,
    /// Fastest run.
    pub min_ms: f64,
    /// Slowest run.
    pub max_ms: f64,
    /// First quartile.
    pub p25_ms: f64,
    /// Third quartile.
    pub p75_ms: f64,
    /// Interquartile range over the median: how far the figure can be trusted.
    pub spread: f64,
    /// Number of timed runs.
    pub runs: usize,
}

impl Latency {
    /// Summarises run times in milliseconds; `None` without any run.
    pub fn of(samples_ms: &[f64]) -> Option<Latency> {
        let mut s: Vec<f64> = samples_ms.iter().copied().filter(|t| t.is_finite()).collect();
        if s.is_empty() {
            return None;
        }
        s.sort_by(f64::total_cmp);
        // Linear interpolation between order statistics (numpy's default), so small run counts
        // still give a meaningful quartile.
        let q = |p: f64| {
            let x = p * (s.len() - 1) as f64;
            let (lo, hi) = (x.floor() as usize, x.ceil() as usize);
            s[lo] + (s[hi] - s[lo]) * (x - lo as f64)
        };
        let median = q(0.5);
        let (p25, p75) = (q(0.25), q(0.75));
        Some(Latency {
            median_ms: median,
            min_ms: s[0],
            max_ms: s[s.len() - 1],
            p25_ms: p25,
            p75_ms: p75,
            spread: if median > 0.0 { (p75 - p25) / median } else { 0.0 },
            runs: s.len(),
        })
    }
}

/// Runs `a` and `b` on `feed`: `warmup` untimed runs of each, then `runs` timed runs of each in
/// alternation (a b, b a, a b, ...: neither always runs first with the caches the other left).
/// Returns the run times of `a` and of `b` in milliseconds.
pub fn interleaved(a: &Plan, b: &Plan, feed: &Feed, warmup: usize, runs: usize) -> Result<(Vec<f64>, Vec<f64>), RunError> {
    for _ in 0..warmup {
        a.run(feed)?;
        b.run(feed)?;
    }
    let (mut ta, mut tb) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    let ms = |plan: &Plan| plan.run(feed).map(|o| o.elapsed.as_secs_f64() * 1e3);
    for i in 0..runs {
        if i % 2 == 0 {
            ta.push(ms(a)?);
            tb.push(ms(b)?);
        } else {
            tb.push(ms(b)?);
            ta.push(ms(a)?);
        }
    }
    Ok((ta, tb))
}

#[cfg(test)]
mod tests {
    use super::Latency;

    #[test]
    fn quartiles_interpolate_like_numpy() {
        let l = Latency::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!((l.min_ms, l.p25_ms, l.median_ms, l.p75_ms, l.max_ms), (1.0, 1.75, 2.5, 3.25, 4.0));
        assert_eq!(l.spread, 1.5 / 2.5);
        assert_eq!(l.runs, 4);
    }

    #[test]
    fn no_runs_no_figure() {
        assert_eq!(Latency::of(&[]), None);
        assert_eq!(Latency::of(&[f64::NAN]), None);
    }
}
