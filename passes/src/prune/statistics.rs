//! What the prune pass measures through the measuring service: each weighted op's input-channel
//! second moments and each dense consumer's input Hessian (on `--inputs` or seeded noise), and
//! OBSPA's sequential refit, which runs the pruned prefix level by level.

use super::criteria::LayerInput;
use super::obspa::{self, Compensation, CrossMoments, Refit, apply_compensations};
use super::{Calibration, MaskedSlice, PruneReport, mask_consumers};
use crate::measure::{Activation, Measure, MeasureError};
use prunec_ir::{Graph, Model, OpId, ValueId, constant_tensor};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Rows (samples × positions) a consumer's Hessian is measured on at most: an evenly spaced
/// subset beyond, so a high-resolution convolution costs O(rows · columns²), not more.
pub const MAX_HESSIAN_ROWS: usize = 8192;

/// The activation a weighted op reads and the axis its weight's input columns match.
fn activation_axis(graph: &Graph, op: OpId) -> Option<(ValueId, usize)> {
    let o = graph.op(op);
    if !(o.domain.is_empty() || o.domain == "ai.onnx") {
        return None;
    }
    let x = graph.op_input(op, 0)?;
    constant_tensor(graph, graph.op_input(op, 1)?)?;
    let rank = graph.value(x).shape.as_ref()?.rank();
    let axis = match o.op_type.as_str() {
        "Conv" if o.attr_int("group").unwrap_or(1) == 1 => 1,
        "Gemm" if o.attr_int("transA").unwrap_or(0) == 0 => 1,
        "MatMul" => rank.checked_sub(1)?,
        _ => return None,
    };
    (axis < rank).then_some((x, axis))
}

/// Measures the second moments (and the Hessians, with `hessians`) of `model`; every sample
/// and position of the inputs counts. Every Hessian is computed and held at once: the pass
/// itself uses [`collect_inputs`], which computes each when needed.
pub fn collect(model: &Model, measure: &mut dyn Measure, hessians: bool) -> Result<Calibration, MeasureError> {
    let mut calibration = collect_inputs(model, measure, hessians)?;
    let inputs = std::mem::take(&mut calibration.layer_inputs);
    let reads: Vec<(OpId, &[f32], &[usize])> =
        inputs.values().map(|i| (i.op, i.activation.values.as_slice(), i.activation.shape.as_slice())).collect();
    calibration.hessians = obspa::input_hessians(&model.graph, &reads, MAX_HESSIAN_ROWS);
    Ok(calibration)
}

/// Measures the second moments of `model` and, with `hessians`, keeps each dense consumer's
/// input activation ([`Calibration::layer_inputs`]) for its Hessian to be computed when the pass
/// needs it, one layer at a time.
pub fn collect_inputs(model: &Model, measure: &mut dyn Measure, hessians: bool) -> Result<Calibration, MeasureError> {
    let graph = &model.graph;
    let reads: BTreeMap<String, (OpId, ValueId, usize)> =
        graph.op_ids().filter_map(|op| activation_axis(graph, op).map(|(v, axis)| (graph.op(op).name.clone(), (op, v, axis)))).collect();
    let probes: Vec<ValueId> = reads.values().map(|r| r.1).collect();
    let activations: BTreeMap<ValueId, Arc<Activation>> =
        measure.capture(model, &probes)?.into_iter().map(|(v, x)| (v, Arc::new(x))).collect();
    let mut second_moments = BTreeMap::new();
    let mut layer_inputs = BTreeMap::new();
    for (node, &(op, v, axis)) in &reads {
        let Some(x) = activations.get(&v) else { continue };
        if let Some(m2) = channel_second_moments(x, axis) {
            second_moments.insert(node.clone(), m2);
        }
        if hessians {
            layer_inputs.insert(node.clone(), LayerInput { op, activation: x.clone() });
        }
    }
    Ok(Calibration { second_moments, hessians: BTreeMap::new(), layer_inputs, source: measure.source().to_string() })
}

/// Mean of x² per index of `axis`, over every other axis.
fn channel_second_moments(x: &Activation, axis: usize) -> Option<Vec<f64>> {
    let n = *x.shape.get(axis)?;
    let inner: usize = x.shape[axis + 1..].iter().product();
    if n == 0 || x.values.is_empty() {
        return None;
    }
    let mut sums = vec![0.0; n];
    for (k, &v) in x.values.iter().enumerate() {
        let v = v as f64;
        sums[(k / inner.max(1)) % n] += v * v;
    }
    let per_channel = (x.values.len() / n) as f64;
    Some(sums.into_iter().map(|s| s / per_channel).collect())
}

/// The dense layers OBSPA can refit, in topological order, each with its level: the most dense
/// layers on any path from the graph's inputs to its input. Layers of one level never feed each
/// other, so they can be refit together once every lower level is.
pub fn dense_levels(graph: &Graph) -> Vec<(OpId, usize)> {
    let Ok(order) = graph.topo_order() else { return Vec::new() };
    let mut depth: BTreeMap<ValueId, usize> = BTreeMap::new();
    let mut levels = Vec::new();
    for op in order {
        let level = graph.op_inputs(op).into_iter().flatten().filter_map(|v| depth.get(&v).copied()).max().unwrap_or(0);
        let dense = obspa::dense_view(graph, op).is_some() && activation_axis(graph, op).is_some();
        if dense {
            levels.push((op, level));
        }
        for v in graph.op_outputs(op).into_iter().flatten() {
            depth.insert(v, level + dense as usize);
        }
    }
    levels
}

/// What a sequential refit fits each layer to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefitTarget {
    /// The layer's own (original) weights applied to its new inputs: only the consumers of
    /// removed channels change, on the Hessians of the pruned prefix (SparseGPT's sequence).
    OwnOutputs,
    /// The original model's outputs of the layer: every dense layer whose input changed is refit.
    OriginalOutputs,
}

/// Why a refit stopped.
#[derive(Debug, thiserror::Error)]
pub enum RefitError {
    /// A model did not run.
    #[error(transparent)]
    Measure(#[from] MeasureError),
    /// The compensated and masked model could not be built.
    #[error("building the pruned prefix: {0}")]
    Rewrite(String),
}

/// The input activations of `layers` among `captured` (graph inputs included).
fn layer_inputs(graph: &Graph, layers: &[OpId], captured: BTreeMap<ValueId, Activation>) -> BTreeMap<OpId, Activation> {
    let reads: Vec<(OpId, ValueId)> = layers.iter().filter_map(|&op| Some((op, activation_axis(graph, op)?.0))).collect();
    reads.into_iter().filter_map(|(op, v)| Some((op, captured.get(&v)?.clone()))).collect()
}

fn layer_probes(graph: &Graph, layers: &[OpId]) -> Vec<ValueId> {
    layers.iter().filter_map(|&op| Some(activation_axis(graph, op)?.0)).collect()
}

/// Refits OBSPA's compensations of the channels `report` removed from `model` (as it was when
/// the pass chose them), sequentially: level by level ([`dense_levels`]), the model with the
/// compensations so far and the removed channels masked runs on the measurement's inputs, and
/// each layer of the level is refit ([`obspa::refit`]) on the inputs it now gets, so later
/// layers see the already pruned prefix. `on_level(done, total)` is called before each level.
pub fn refit(
    model: &Model,
    measure: &mut dyn Measure,
    report: &PruneReport,
    target: RefitTarget,
    damping: f64,
    on_level: &mut dyn FnMut(usize, usize),
) -> Result<Refit, RefitError> {
    let graph = &model.graph;
    let pruned: BTreeSet<&str> = report.masked.iter().map(|m| m.node.as_str()).collect();
    let to_originals = target == RefitTarget::OriginalOutputs;
    let levels: Vec<(OpId, usize)> =
        dense_levels(graph).into_iter().filter(|&(op, _)| to_originals || pruned.contains(graph.op(op).name.as_str())).collect();
    let all: Vec<OpId> = levels.iter().map(|l| l.0).collect();
    let before = if to_originals { Some(layer_inputs(graph, &all, measure.capture(model, &layer_probes(graph, &all))?)) } else { None };
    let mut compensations: BTreeMap<String, Compensation> = report.compensated.iter().map(|c| (c.node.clone(), c.clone())).collect();
    // The model with every compensation so far; each level masks a copy of it.
    let mut compensated = model.clone();
    apply_compensations(&mut compensated.graph, &report.compensated).map_err(RefitError::Rewrite)?;
    let mut refit = Refit::default();
    let mut pieces = measure.stepwise(model);
    let last = levels.iter().map(|l| l.1).max().unwrap_or(0);
    for level in 0..=last {
        on_level(level, last + 1);
        let layers: Vec<OpId> = levels.iter().filter(|l| l.1 == level).map(|l| l.0).collect();
        if layers.is_empty() {
            continue;
        }
        let mut current = compensated.clone();
        mask(&mut current, &report.masked)?;
        let mut now = layer_inputs(graph, &layers, pieces.capture(&current, &layer_probes(graph, &layers))?);
        if let Some(before) = &before {
            // A layer whose input did not change and that lost nothing keeps its weights.
            now.retain(|op, x| pruned.contains(graph.op(*op).name.as_str()) || before.get(op) != Some(x));
        }
        let (done, notes) = obspa::refit(graph, &report.masked, &cross_moments(graph, before.as_ref(), &now), damping);
        apply_compensations(&mut compensated.graph, &done).map_err(RefitError::Rewrite)?;
        compensations.extend(done.into_iter().map(|c| (c.node.clone(), c)));
        refit.notes.extend(notes);
        refit.levels += 1;
    }
    refit.compensations = compensations.into_values().collect();
    Ok(refit)
}

fn mask(model: &mut Model, masked: &[MaskedSlice]) -> Result<(), RefitError> {
    mask_consumers(&mut model.graph, masked).map_err(|e| RefitError::Rewrite(e.to_string()))
}

/// The [`CrossMoments`] of each layer of `current` (input activations of the pruned model so
/// far) against the same layer's input in `original`, or against itself when `original` is
/// `None` (the layer then keeps its own outputs on the new inputs). Layers whose activations do
/// not pair up are left out.
fn cross_moments(
    graph: &Graph,
    original: Option<&BTreeMap<OpId, Activation>>,
    current: &BTreeMap<OpId, Activation>,
) -> BTreeMap<String, CrossMoments> {
    let reads: Vec<_> = current
        .iter()
        .filter_map(|(&op, now)| {
            let before = original.map_or(Some(now), |o| o.get(&op))?;
            (before.shape == now.shape).then_some((op, before.values.as_slice(), now.values.as_slice(), now.shape.as_slice()))
        })
        .collect();
    obspa::cross_moments_of(graph, &reads, MAX_HESSIAN_ROWS)
}
