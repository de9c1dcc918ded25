//! Sensitivity-aware allocation: where a parameter or MAC target is spent.
//!
//! One ratio for every group spends the same share of each, and the groups a whole stage of a
//! residual network shares, or a decoder's hidden stream, cost far more output fidelity per
//! parameter than a block's inner channels. So each candidate group is first tried alone: in
//! a dry run it loses the lowest-scored share `r` of its channels, for each `r` of the probe
//! ratios, and the change of the model's outputs is measured. The dry run is the group's masked
//! original (its consumers' weights of those channels zeroed), which is what the pruned model
//! computes for a group no normalisation mixes.
//!
//! The allocation then spends the budget where the loss per saved parameter (or MAC) is the
//! smallest, in the spirit of LAMP's and Týr-the-Pruner's global choice of per-layer sparsity:
//! each group's measured points, with the unpruned model at the origin, are reduced to their
//! lower convex hull over (saving, loss); the hull's segments of all groups are taken in order
//! of increasing slope (within a group they come in order, the hull being convex), and the last
//! one only as far as the target needs. Losses are taken to add up across groups, which holds
//! for small changes of the outputs; the verification of the result does not depend on it.

use super::{Candidate, MaskedSlice, PruneOptions, Savings, allowed_count, mask_consumers, pick};
use crate::PassError;
use crate::measure::{Activation, Measure, Progress};
use prunec_ir::{Model, Role, ValueId};
use std::collections::BTreeMap;

/// The shares of a group's channels each dry run removes, unless told otherwise.
pub const PROBE_RATIOS: &[f64] = &[0.3, 0.6, 0.9];

/// One group's dry runs.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GroupSensitivity {
    /// The group's id.
    pub id: usize,
    /// Its channels.
    pub channels: u64,
    /// A node of the group that names it (the first producer's).
    pub node: String,
    /// Channels removed in each dry run, one per probe ratio.
    pub removed: Vec<u64>,
    /// The output loss of each dry run: the mean over the graph outputs of ‖y − y′‖² / ‖y‖²
    /// (the squared relative L2 change; `null` where the run could not compare).
    pub loss: Vec<Option<f64>>,
    /// Share of the model's parameters each dry run's removal saves alone.
    pub params_saved: Vec<f64>,
    /// Share of the model's MACs each dry run's removal saves alone.
    pub macs_saved: Vec<f64>,
}

/// The dry runs of every candidate group (`prunec sensitivity`, and the allocation's basis).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct SensitivityTable {
    /// The criterion whose ranking chose each run's channels.
    pub criterion: String,
    /// The inputs the runs ran on.
    pub measured_on: String,
    /// The probe ratios.
    pub ratios: Vec<f64>,
    /// Runs of the model, the unpruned one included.
    pub runs: usize,
    /// One entry per candidate group, in group order.
    pub groups: Vec<GroupSensitivity>,
}

/// How measured sensitivity spread a target (the prune report's `allocation`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct AllocationReport {
    /// The dry runs the allocation chose from.
    pub table: SensitivityTable,
    /// Each candidate's share of channels removed, in the table's order.
    pub ratios: Vec<f64>,
    /// Whether the target needed more than the largest probe ratio of the cheapest groups, so
    /// that every group was then taken to one more common ratio (found by bisection).
    pub beyond_probes: bool,
}

/// Runs the dry runs of `candidates` on `measure` (made for `model`'s inputs).
pub(crate) fn measure_groups<'p>(
    model: &Model,
    candidates: &[Candidate],
    options: &PruneOptions,
    ratios: &[f64],
    measure: &mut dyn Measure,
    mut progress: Option<&mut (dyn Progress + 'p)>,
) -> Result<SensitivityTable, PassError> {
    let graph = &model.graph;
    let outputs: Vec<ValueId> = graph.outputs.clone();
    let failed = |e: crate::measure::MeasureError| PassError::Measure(format!("measuring each group's sensitivity: {e}"));
    let baseline = measure.capture(model, &outputs).map_err(failed)?;
    let params = Savings::new(graph, super::Target::Params(0.0));
    let macs = Savings::new(graph, super::Target::Flops(0.0));
    let dry_runs = candidates.len() * ratios.len();
    if let Some(p) = progress.as_deref_mut() {
        p.start("prune: measuring each group's sensitivity", dry_runs as u64);
    }
    let mut table = SensitivityTable {
        criterion: super::criterion_name(options.criterion).to_string(),
        measured_on: measure.source().to_string(),
        ratios: ratios.to_vec(),
        runs: 1,
        groups: Vec::new(),
    };
    for c in candidates {
        let mut entry = GroupSensitivity {
            id: c.group.id,
            channels: c.channels as u64,
            node: c
                .group
                .weights
                .iter()
                .find(|w| w.role == Role::Producer)
                .or(c.group.weights.first())
                .map(|w| w.node.clone())
                .unwrap_or_default(),
            removed: Vec::new(),
            loss: Vec::new(),
            params_saved: Vec::new(),
            macs_saved: Vec::new(),
        };
        let mut last: Option<(usize, Option<f64>)> = None;
        for &r in ratios {
            let n = allowed_count(c, options, (c.channels as f64 * r).floor() as usize);
            let chosen = pick(std::slice::from_ref(c), &[n]).remove(0);
            let mut removal = super::Removal::default();
            removal.add(c.group, &chosen);
            let loss = match last {
                // Rounding or min-keep made this probe the previous one again.
                Some((previous, loss)) if previous == n => loss,
                _ if n == 0 => Some(0.0),
                _ => {
                    let slices = consumer_slices(c, &chosen);
                    if slices.is_empty() {
                        None
                    } else {
                        let mut masked = model.clone();
                        mask_consumers(&mut masked.graph, &slices).map_err(PassError::Rewrite)?;
                        let changed = measure.capture(&masked, &outputs).map_err(failed)?;
                        table.runs += 1;
                        output_loss(&baseline, &changed)
                    }
                }
            };
            last = Some((n, loss));
            entry.removed.push(n as u64);
            entry.loss.push(loss);
            entry.params_saved.push(params.share(&removal));
            entry.macs_saved.push(macs.share(&removal));
            if let Some(p) = progress.as_deref_mut() {
                p.step();
            }
        }
        table.groups.push(entry);
    }
    if let Some(p) = progress {
        p.finish();
    }
    Ok(table)
}

/// The consumer weight slices of a candidate's `channels`: what its masked original zeroes.
fn consumer_slices(c: &Candidate, channels: &[usize]) -> Vec<MaskedSlice> {
    c.group
        .weights
        .iter()
        .filter(|w| w.role == Role::Consumer)
        .map(|w| MaskedSlice {
            node: w.node.clone(),
            weight: w.weight.clone(),
            axis: w.axis,
            indices: channels.iter().flat_map(|&ch| w.indices[ch].iter().copied()).collect(),
        })
        .collect()
}

/// The mean over the outputs of ‖y − y′‖² / ‖y‖² (‖y′‖² for an all-zero output), or `None`
/// where an output is missing, differs in size, or is not finite.
pub fn output_loss<K: Ord>(original: &BTreeMap<K, Activation>, changed: &BTreeMap<K, Activation>) -> Option<f64> {
    if original.is_empty() {
        return None;
    }
    let mut total = 0.0;
    for (v, y) in original {
        let z = changed.get(v).filter(|z| z.values.len() == y.values.len())?;
        let (mut diff, mut norm) = (0f64, 0f64);
        for (&a, &b) in y.values.iter().zip(&z.values) {
            diff += (f64::from(a) - f64::from(b)).powi(2);
            norm += f64::from(a).powi(2);
        }
        let loss = if norm > 0.0 { diff / norm } else { diff };
        if !loss.is_finite() {
            return None;
        }
        total += loss;
    }
    Some(total / original.len() as f64)
}

/// A point of a group's loss curve: channels removed, the share saved, the loss.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Point {
    removed: usize,
    saved: f64,
    loss: f64,
}

/// The lower convex hull of a group's points over (saved, loss), from the origin: the
/// removals worth taking, in order. A point no cheaper per share than a later one is skipped;
/// points that save nothing more than an earlier one, or could not be measured, never count.
fn lower_hull(points: &[Point]) -> Vec<Point> {
    let mut hull = vec![Point { removed: 0, saved: 0.0, loss: 0.0 }];
    for &p in points {
        if p.saved <= hull.last().map_or(0.0, |h| h.saved) || !p.loss.is_finite() {
            continue;
        }
        // Drop the last vertex while it lies on or above the line from the one before it to `p`.
        while hull.len() >= 2 {
            let (a, b) = (hull[hull.len() - 2], hull[hull.len() - 1]);
            let above = (b.loss - a.loss) * (p.saved - a.saved) >= (p.loss - a.loss) * (b.saved - a.saved);
            if above {
                hull.pop()
            } else {
                break;
            };
        }
        hull.push(p);
    }
    hull
}

/// Per-candidate channel counts meeting `savings`' target, chosen from `table` (one entry per
/// candidate, in order). Candidates with a `--node-ratio` keep their own ratio. Returns the
/// counts and whether the target needed more than the measured hulls offer.
pub(crate) fn allocate(
    candidates: &[Candidate],
    options: &PruneOptions,
    table: &SensitivityTable,
    savings: &Savings,
) -> (Vec<usize>, bool) {
    let wanted = savings.wanted();
    let mut counts: Vec<usize> =
        candidates.iter().map(|c| c.ratio.map_or(0, |r| allowed_count(c, options, (c.channels as f64 * r).floor() as usize))).collect();
    if wanted <= 0.0 || savings.share_of(candidates, &counts) >= wanted {
        return (counts, false);
    }
    let by_params = matches!(savings.target, super::Target::Params(_));
    // Every hull segment as (slope, candidate, removed before, removed after).
    let mut segments: Vec<(f64, usize, usize, usize)> = Vec::new();
    for (i, (c, entry)) in candidates.iter().zip(&table.groups).enumerate() {
        if c.ratio.is_some() {
            continue;
        }
        let saved = if by_params { &entry.params_saved } else { &entry.macs_saved };
        let points: Vec<Point> = (0..entry.removed.len())
            .filter_map(|k| Some(Point { removed: entry.removed[k] as usize, saved: saved[k], loss: entry.loss[k]? }))
            .collect();
        let hull = lower_hull(&points);
        for pair in hull.windows(2) {
            let slope = (pair[1].loss - pair[0].loss) / (pair[1].saved - pair[0].saved);
            segments.push((slope, i, pair[0].removed, pair[1].removed));
        }
    }
    segments.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    for &(_, i, from, to) in &segments {
        counts[i] = to;
        if savings.share_of(candidates, &counts) >= wanted {
            // The fewest channels of this segment that reach the target.
            let (mut lo, mut hi) = (from, to);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                counts[i] = allowed_count(&candidates[i], options, mid);
                if savings.share_of(candidates, &counts) >= wanted { hi = mid } else { lo = mid }
            }
            counts[i] = allowed_count(&candidates[i], options, hi);
            return (counts, false);
        }
    }
    // Past every measured hull: one more common ratio for all, as small as reaches the target.
    let floor = |ratio: f64| -> Vec<usize> {
        candidates
            .iter()
            .zip(&counts)
            .map(
                |(c, &n)| {
                    if c.ratio.is_some() { n } else { n.max(allowed_count(c, options, (c.channels as f64 * ratio).floor() as usize)) }
                },
            )
            .collect()
    };
    let (mut lo, mut hi) = (0.0, 0.999);
    if savings.share_of(candidates, &floor(hi)) >= wanted {
        for _ in 0..24 {
            let mid = (lo + hi) / 2.0;
            if savings.share_of(candidates, &floor(mid)) >= wanted { hi = mid } else { lo = mid }
        }
    }
    (floor(hi), true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(removed: usize, saved: f64, loss: f64) -> Point {
        Point { removed, saved, loss }
    }

    #[test]
    fn the_hull_skips_a_removal_that_a_larger_one_beats_per_share() {
        // 0.5 of the group costs more than the line from the origin to 0.75 allows.
        let hull = lower_hull(&[point(2, 0.1, 0.01), point(4, 0.2, 0.09), point(6, 0.3, 0.1)]);
        assert_eq!(hull.iter().map(|p| p.removed).collect::<Vec<_>>(), [0, 2, 6]);
    }

    #[test]
    fn the_hull_of_a_convex_curve_keeps_every_point() {
        let hull = lower_hull(&[point(1, 0.1, 0.01), point(2, 0.2, 0.04), point(3, 0.3, 0.09)]);
        assert_eq!(hull.len(), 4);
    }

    #[test]
    fn points_that_save_nothing_more_or_were_not_measured_never_count() {
        let hull = lower_hull(&[point(1, 0.1, 0.01), point(2, 0.1, 0.0), point(3, 0.3, f64::INFINITY)]);
        assert_eq!(hull.iter().map(|p| p.removed).collect::<Vec<_>>(), [0, 1]);
    }

    #[test]
    fn output_loss_is_the_mean_squared_relative_change() {
        let act = |v: &[f32]| Activation { shape: vec![v.len()], values: v.to_vec() };
        let original = BTreeMap::from([(0usize, act(&[3.0, 4.0])), (1usize, act(&[1.0]))]);
        let changed = BTreeMap::from([(0usize, act(&[3.0, 4.0])), (1usize, act(&[0.0]))]);
        assert_eq!(output_loss(&original, &changed), Some(0.5));
        assert_eq!(output_loss(&original, &original), Some(0.0));
        let short = BTreeMap::from([(0usize, act(&[3.0]))]);
        assert_eq!(output_loss(&original, &short), None);
        let nan = BTreeMap::from([(0usize, act(&[f32::NAN, 4.0])), (1usize, act(&[1.0]))]);
        assert_eq!(output_loss(&original, &nan), None);
    }
}
