//! Channel importance: any per-weight criterion becomes a group criterion (the SPA idea) by
//! scoring each weight slice of the group per channel and reducing over the slices.

use prunec_ir::{Graph, Group, Role, constant_tensor};
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// How a channel's weights are scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Criterion {
    /// Sum of absolute values of the channel's weight slices.
    L1,
    /// Sum of squares of the channel's weight slices (Torch-Pruning's `MagnitudeImportance(p=2)`).
    L2,
    /// Uniform random scores from `--seed`: the baseline any criterion must beat.
    Random,
    /// |γ| of the BatchNormalization scales in the group; groups without one are not pruned.
    BnScale,
    /// L2 with LAMP normalisation: a channel's score over the sum of the scores not below it.
    Lamp,
    /// Activation-weighted magnitude (the structured Wanda form): for each consumer, the
    /// channel's input-column |W| sums times the root mean square of the activation it reads,
    /// from calibration inputs.
    Wanda,
    /// OBSPA: the least error that removing the channel leaves in its consumers' outputs
    /// (structured Optimal Brain Surgeon on each consumer's input Hessian); the consumers are
    /// compensated. The Hessians come from `--hessian`.
    Obspa,
    /// FLAP: the fluctuation Var(x)·‖W‖² of the channel's input columns in its consumers; the
    /// removed channels' mean contribution is folded into the consumers' biases.
    Flap,
}

impl Criterion {
    /// Every criterion with its command-line name.
    pub const ALL: &[(&str, Criterion)] = &[
        ("l1", Criterion::L1),
        ("l2", Criterion::L2),
        ("random", Criterion::Random),
        ("bn-scale", Criterion::BnScale),
        ("lamp", Criterion::Lamp),
        ("wanda", Criterion::Wanda),
        ("obspa", Criterion::Obspa),
        ("flap", Criterion::Flap),
    ];

    /// Whether the criterion reads activation statistics from calibration inputs.
    pub fn needs_calibration(self) -> bool {
        self == Criterion::Wanda
    }

    /// Whether the criterion reads consumer input Hessians (`--hessian`).
    pub fn needs_hessians(self) -> bool {
        matches!(self, Criterion::Obspa | Criterion::Flap)
    }
}

/// How the scores of a group's weight slices become one score per channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reduction {
    /// Mean over slices (Torch-Pruning's default).
    Mean,
    /// Sum over slices.
    Sum,
    /// Largest slice score.
    Max,
    /// The score of the group's first producer in graph order.
    First,
}

/// How a group's scores are scaled before channels of different groups are compared
/// (`--global`); ranking inside one group does not depend on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Normalizer {
    /// Scores as they are.
    None,
    /// Divided by the group mean (Torch-Pruning's default).
    Mean,
    /// Divided by the group maximum.
    Max,
    /// Divided by the group sum.
    Sum,
    /// Standardised: minus the mean, over the standard deviation.
    Standardization,
    /// LAMP: a score over the sum of the scores not below it.
    Lamp,
}

/// Per-channel statistics of the activations that weighted ops read, measured on calibration
/// inputs (the CLI runs the model in tract to collect them).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Calibration {
    /// For each weighted op (by node name), the mean of x² of its activation input, per index of
    /// the axis its weight's input columns read.
    pub second_moments: BTreeMap<String, Vec<f64>>,
    /// For each dense consumer (by node name), the statistics of its input columns.
    pub hessians: BTreeMap<String, super::obspa::Hessian>,
    /// For each dense consumer (by node name), its input activation, from which its Hessian is
    /// computed when the pass needs it and dropped after ([`super::statistics::collect_inputs`]):
    /// all Hessians and their inverses at once are many times the model's size.
    pub layer_inputs: BTreeMap<String, LayerInput>,
    /// Where the statistics came from, for the report.
    pub source: String,
}

/// A dense consumer's input activation, as measured.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerInput {
    /// The op that reads it.
    pub op: prunec_ir::OpId,
    /// The activation (shared: consumers of one value read the same).
    pub activation: std::sync::Arc<crate::measure::Activation>,
}

/// Scores every channel of each group (`None` where the criterion has nothing to score).
/// Weight slices shared between groups are reduced once.
pub(crate) fn score_groups(
    graph: &Graph,
    groups: &[&Group],
    criterion: Criterion,
    reduction: Reduction,
    seed: u64,
    order: &HashMap<String, usize>,
    calibration: Option<&Calibration>,
) -> Vec<Option<Vec<f64>>> {
    let quantized = quantized_weights(graph);
    let wanted: BTreeSet<(String, usize)> =
        groups.iter().flat_map(|g| scored_slices(graph, g, criterion, &quantized)).map(|w| (w.weight.clone(), w.axis)).collect();
    // A closure, not a function pointer, so it inlines into the per-element loop of the sums.
    let absolute = matches!(criterion, Criterion::L1 | Criterion::BnScale | Criterion::Wanda);
    let power = move |x: f64| if absolute { x.abs() } else { x * x };
    // One streamed pass per weight for all its scored axes: a weight read twice is twice the I/O
    // on a model that does not fit in memory.
    let mut per_weight: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (weight, axis) in wanted {
        per_weight.entry(weight).or_default().push(axis);
    }
    let sums: HashMap<(String, usize), Vec<f64>> = per_weight
        .into_par_iter()
        .filter_map(|(weight, axes)| {
            // A quantised weight is scored dequantised (see `quantized_weights`).
            let dequantized =
                quantized.iter().find(|((_, w), _)| *w == weight).and_then(|(_, &op)| prunec_ir::dequantized_weight(graph, op));
            let t = match &dequantized {
                Some(t) => t,
                None => constant_tensor(graph, graph.value_by_name(&weight)?)?,
            };
            let sums = t.axes_sums(&axes, power)?;
            Some(axes.into_iter().zip(sums).map(move |(axis, s)| ((weight.clone(), axis), s)).collect::<Vec<_>>())
        })
        .flatten()
        .collect();
    groups
        .iter()
        .map(|g| {
            let channels = g.channels? as usize;
            if criterion == Criterion::Random {
                let mut rng = prunec_ir::SplitMix64(seed ^ (g.id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                return Some((0..channels).map(|_| rng.unit()).collect());
            }
            let mut slices: Vec<&prunec_ir::WeightSlice> = scored_slices(graph, g, criterion, &quantized).collect();
            if reduction == Reduction::First {
                slices.retain(|w| w.role == Role::Producer);
                slices.sort_by_key(|w| order.get(&w.node).copied().unwrap_or(usize::MAX));
                slices.truncate(1);
            }
            let per_slice: Vec<Vec<f64>> = slices
                .iter()
                .filter_map(|w| {
                    let sums = sums.get(&(w.weight.clone(), w.axis))?;
                    let rms: Option<Vec<f64>> = match criterion {
                        Criterion::Wanda => Some(calibration?.second_moments.get(&w.node)?.iter().map(|m| m.sqrt()).collect()),
                        _ => None,
                    };
                    let at =
                        |i: usize| sums.get(i).copied().unwrap_or(0.0) * rms.as_ref().map_or(1.0, |r| r.get(i).copied().unwrap_or(0.0));
                    Some(w.indices.iter().map(|idx| idx.iter().map(|&i| at(i)).sum()).collect())
                })
                .collect();
            let scores = reduce(&per_slice, channels, reduction)?;
            Some(if criterion == Criterion::Lamp { normalize(&scores, Normalizer::Lamp) } else { scores })
        })
        .collect()
}

/// One score per channel from the per-slice scores of a group (`None` without any slice).
pub(crate) fn reduce(per_slice: &[Vec<f64>], channels: usize, reduction: Reduction) -> Option<Vec<f64>> {
    if per_slice.is_empty() {
        return None;
    }
    let n = per_slice.len() as f64;
    let score = |c: usize| {
        let column = per_slice.iter().map(|s| s[c]);
        match reduction {
            Reduction::Mean => column.sum::<f64>() / n,
            Reduction::Sum | Reduction::First => column.sum(),
            Reduction::Max => column.fold(f64::MIN, f64::max),
        }
    };
    Some((0..channels).map(score).collect())
}

/// The quantised weights of the graph (`prunec_ir::reads_quantized_weight`): `(node, weight)` of
/// the op that reads each integer weight with its scale, and that op.
///
/// A quantised weight is scored as the float weight it stands for, `(q − zero_point) · scale`,
/// dequantised whole, rather than as its integers times a per-channel scale: the scale runs
/// along the output channels, so the input columns a consumer slice sums mix channels of
/// different scales, and only the dequantised values rank those columns as the float model's
/// would (and as the float weight's scores rank its output rows). The cost is one f32 copy of a
/// quantised weight while it is scored. Like every other weight type, the sums are in f64.
fn quantized_weights(graph: &Graph) -> BTreeMap<(String, String), prunec_ir::OpId> {
    graph
        .op_ids()
        .filter(|&op| prunec_ir::reads_quantized_weight(graph, op))
        .filter_map(|op| {
            let q = prunec_ir::quantized_input(&graph.op(op).op_type)?;
            let w = graph.op_input(op, q.weight)?;
            Some(((graph.op(op).name.clone(), graph.value(w).name.clone()), op))
        })
        .collect()
}

/// The slices a criterion reads: producer and consumer weights of a float type or quantised
/// (biases and other per-channel parameters are not counted), or the BatchNormalization scales
/// for `bn-scale`. Scores are f64 whatever the stored type (f16, bf16, int8 weights included).
fn scored_slices<'g>(
    graph: &'g Graph,
    group: &'g Group,
    criterion: Criterion,
    quantized: &'g BTreeMap<(String, String), prunec_ir::OpId>,
) -> impl Iterator<Item = &'g prunec_ir::WeightSlice> + 'g {
    group.weights.iter().filter(move |w| {
        let Some(v) = graph.value_by_name(&w.weight) else { return false };
        let is_float =
            constant_tensor(graph, v).is_some_and(|t| t.dtype().is_float()) || quantized.contains_key(&(w.node.clone(), w.weight.clone()));
        match criterion {
            Criterion::BnScale => {
                w.role == Role::Param
                    && graph.consumers(v).iter().any(|&(op, edge)| {
                        let op = graph.op(op);
                        op.name == w.node && op.op_type == "BatchNormalization" && edge == prunec_ir::Edge::Input(1)
                    })
            }
            // Wanda weighs the input columns a consumer reads by the activations it reads.
            Criterion::Wanda => is_float && w.role == Role::Consumer,
            _ => is_float && w.role != Role::Param,
        }
    })
}

/// Scales a group's scores for comparison with other groups.
pub(crate) fn normalize(scores: &[f64], how: Normalizer) -> Vec<f64> {
    let n = scores.len().max(1) as f64;
    let sum: f64 = scores.iter().sum();
    let safe = |d: f64| if d.abs() > f64::EPSILON { d } else { 1.0 };
    match how {
        Normalizer::None => scores.to_vec(),
        Normalizer::Mean => scores.iter().map(|s| s / safe(sum / n)).collect(),
        Normalizer::Max => {
            let max = scores.iter().copied().fold(f64::MIN, f64::max);
            scores.iter().map(|s| s / safe(max)).collect()
        }
        Normalizer::Sum => scores.iter().map(|s| s / safe(sum)).collect(),
        Normalizer::Standardization => {
            let mean = sum / n;
            let std = (scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n).sqrt();
            scores.iter().map(|s| (s - mean) / safe(std)).collect()
        }
        Normalizer::Lamp => {
            let mut order: Vec<usize> = (0..scores.len()).collect();
            order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
            let mut out = vec![0.0; scores.len()];
            let mut tail = 0.0;
            for &i in order.iter().rev() {
                tail += scores[i];
                out[i] = scores[i] / safe(tail);
            }
            out
        }
    }
}
