//! Calibration: runs the model in tract on real (or synthetic) inputs and measures, for every
//! weighted op, the second moment of each input channel it reads (what the calibration criteria
//! weigh weights by) and, when asked, the Hessian E[x xᵀ] of a dense consumer's input columns
//! (what OBSPA and FLAP need).

use crate::RunError;
use crate::tract::{Feed, Plan, TractTensor};
use prunec_ir::{Model, OpId, ValueId, constant_tensor};
use prunec_passes::prune::{Calibration, Compensation, CrossMoments, PruneReport, Refit, apply_compensations, mask_consumers, obspa};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;

/// The activation a weighted op reads and the axis its weight's input columns match.
fn activation_axis(model: &Model, op: OpId) -> Option<(ValueId, usize)> {
    let graph = &model.graph;
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

/// Rows (samples × positions) a consumer's Hessian is measured on at most: an evenly spaced
/// subset beyond, so a high-resolution convolution costs O(rows · columns²), not more.
pub const MAX_HESSIAN_ROWS: usize = 8192;

/// Measures the second moments (and the Hessians, with `hessians`) on `feed`; every sample and
/// position of the batch counts.
pub fn collect(model: &Model, dir: &Path, feed: &Feed, source: &str, hessians: bool) -> Result<Calibration, RunError> {
    let graph = &model.graph;
    let reads: BTreeMap<String, (OpId, ValueId, usize)> =
        graph.op_ids().filter_map(|op| activation_axis(model, op).map(|(v, axis)| (graph.op(op).name.clone(), (op, v, axis)))).collect();
    let activations = run_probed(model.clone(), dir, feed, reads.values().map(|r| r.1))?;
    let mut second_moments = BTreeMap::new();
    let mut dense: Vec<(OpId, TractTensor)> = Vec::new();
    for (node, (op, v, axis)) in reads {
        let Some(tensor) = activation(&activations, feed, &graph.value(v).name) else { continue };
        if let Some(m2) = channel_second_moments(tensor, axis) {
            second_moments.insert(node, m2);
        }
        if hessians {
            dense.push((op, as_f32(tensor)?));
        }
    }
    drop(activations);
    let reads: Vec<(OpId, &[f32], &[usize])> = dense.iter().filter_map(|(op, t)| Some((*op, plain_f32(t)?, t.shape()))).collect();
    let hessians = obspa::input_hessians(graph, &reads, MAX_HESSIAN_ROWS);
    Ok(Calibration { second_moments, hessians, source: source.to_string() })
}

/// The dense layers OBSPA can refit, in topological order, each with its level: the most dense
/// layers on any path from the graph's inputs to its input. Layers of one level never feed each
/// other, so they can be refit together once every lower level is.
pub fn dense_levels(model: &Model) -> Vec<(OpId, usize)> {
    let graph = &model.graph;
    let Ok(order) = graph.topo_order() else { return Vec::new() };
    let mut depth: BTreeMap<ValueId, usize> = BTreeMap::new();
    let mut levels = Vec::new();
    for op in order {
        let level = graph.op_inputs(op).into_iter().flatten().filter_map(|v| depth.get(&v).copied()).max().unwrap_or(0);
        let dense = obspa::dense_view(graph, op).is_some() && activation_axis(model, op).is_some();
        if dense {
            levels.push((op, level));
        }
        for v in graph.op_outputs(op).into_iter().flatten() {
            depth.insert(v, level + dense as usize);
        }
    }
    levels
}

/// Runs `model` on `feed` and returns the input activations of `layers` (as f32).
pub fn dense_inputs(model: &Model, dir: &Path, feed: &Feed, layers: &[OpId]) -> Result<BTreeMap<OpId, TractTensor>, RunError> {
    let graph = &model.graph;
    let reads: Vec<(OpId, ValueId)> = layers.iter().filter_map(|&op| Some((op, activation_axis(model, op)?.0))).collect();
    let run = run_probed(model.clone(), dir, feed, reads.iter().map(|r| r.1))?;
    let mut inputs = BTreeMap::new();
    for (op, v) in reads {
        if let Some(x) = activation(&run, feed, &graph.value(v).name) {
            inputs.insert(op, as_f32(x)?);
        }
    }
    Ok(inputs)
}

/// The [`CrossMoments`] of each layer of `current` (input activations of the pruned model so
/// far) against the same layer's input in `original`, or against itself when `original` is
/// `None` (the layer then keeps its own outputs on the new inputs). Layers whose activations do
/// not pair up are left out.
pub fn cross_moments(
    graph: &prunec_ir::Graph,
    original: Option<&BTreeMap<OpId, TractTensor>>,
    current: &BTreeMap<OpId, TractTensor>,
) -> BTreeMap<String, CrossMoments> {
    let reads: Vec<_> = current
        .iter()
        .filter_map(|(&op, now)| {
            let before = original.map_or(Some(now), |o| o.get(&op))?;
            (before.shape() == now.shape()).then_some((op, plain_f32(before)?, plain_f32(now)?, now.shape()))
        })
        .collect();
    obspa::cross_moments_of(graph, &reads, MAX_HESSIAN_ROWS)
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
    Run(#[from] RunError),
    /// The compensated and masked original could not be built.
    #[error("building the pruned prefix: {0}")]
    Rewrite(String),
}

/// Refits OBSPA's compensations of the channels `report` removed, sequentially: layer level by
/// level ([`dense_levels`]), the original with the compensations so far and the removed channels
/// masked runs on `feed`, and each layer of the level is refit ([`obspa::refit`]) on the inputs
/// it now gets, so later layers see the already pruned prefix.
pub fn refit(
    original: &Model,
    dir: &Path,
    feed: &Feed,
    report: &PruneReport,
    target: RefitTarget,
    damping: f64,
) -> Result<Refit, RefitError> {
    let graph = &original.graph;
    let pruned: BTreeSet<&str> = report.masked.iter().map(|m| m.node.as_str()).collect();
    let to_originals = target == RefitTarget::OriginalOutputs;
    let levels: Vec<(OpId, usize)> =
        dense_levels(original).into_iter().filter(|&(op, _)| to_originals || pruned.contains(graph.op(op).name.as_str())).collect();
    let all: Vec<OpId> = levels.iter().map(|l| l.0).collect();
    let before = if to_originals { Some(dense_inputs(original, dir, feed, &all)?) } else { None };
    let mut compensations: BTreeMap<String, Compensation> = report.compensated.iter().map(|c| (c.node.clone(), c.clone())).collect();
    // The original with every compensation so far; each level masks a copy of it.
    let mut compensated = original.clone();
    apply_compensations(&mut compensated.graph, &report.compensated).map_err(RefitError::Rewrite)?;
    let mut refit = Refit::default();
    let mut pieces = Pieces::new(original);
    for level in 0..=levels.iter().map(|l| l.1).max().unwrap_or(0) {
        let layers: Vec<OpId> = levels.iter().filter(|l| l.1 == level).map(|l| l.0).collect();
        if layers.is_empty() {
            continue;
        }
        let mut current = compensated.clone();
        mask_consumers(&mut current.graph, &report.masked).map_err(|e| RefitError::Rewrite(e.to_string()))?;
        let mut now = pieces.dense_inputs(&current, dir, feed, &layers)?;
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

/// Runs a model piece by piece as a refit walks its levels: each run computes only what its
/// probes need and has not been computed before, and keeps what later pieces will read.
///
/// Between two runs only the layers of the level just measured change, and no value a run
/// computes depends on a layer of its own level or later (levels are longest paths of dense
/// layers), so every value computed stays valid for the rest of the refit. Values that do not
/// depend on the graph's inputs (weights, shape arithmetic) are recomputed, never fed back, so
/// tract still sees them as constants.
struct Pieces {
    /// Values known for good that ops not run yet still read.
    cache: BTreeMap<ValueId, TractTensor>,
    /// Ops some run has computed.
    done: HashSet<OpId>,
    /// Values that depend on the values (not only the sizes) of a graph input.
    dynamic: HashSet<ValueId>,
}

impl Pieces {
    fn new(model: &Model) -> Pieces {
        let graph = &model.graph;
        let mut dynamic: HashSet<ValueId> = graph.inputs.iter().copied().filter(|&v| graph.value(v).initializer().is_none()).collect();
        for op in graph.topo_order().unwrap_or_default() {
            // Sizes are fixed by the feed: shape arithmetic stays constant to tract.
            let reads_sizes_only = matches!(graph.op(op).op_type.as_str(), "Shape" | "Size");
            let reads_data = graph.op_inputs(op).into_iter().flatten().chain(graph.op_captures(op)).any(|v| dynamic.contains(&v));
            if reads_data && !reads_sizes_only {
                dynamic.extend(graph.op_outputs(op).into_iter().flatten());
            }
        }
        Pieces { cache: BTreeMap::new(), done: HashSet::new(), dynamic }
    }

    /// The input activations of `layers` in `model` (this refit's original, as changed so far).
    fn dense_inputs(&mut self, model: &Model, dir: &Path, feed: &Feed, layers: &[OpId]) -> Result<BTreeMap<OpId, TractTensor>, RunError> {
        let graph = &model.graph;
        let reads: Vec<(OpId, ValueId)> = layers.iter().filter_map(|&op| Some((op, activation_axis(model, op)?.0))).collect();
        // The ops to run: back from the probes, stopping at graph inputs and cached values.
        let mut needed: HashSet<OpId> = HashSet::new();
        let mut boundary: BTreeSet<ValueId> = BTreeSet::new();
        let mut stack: Vec<ValueId> = reads.iter().map(|r| r.1).collect();
        let mut seen = HashSet::new();
        while let Some(v) = stack.pop() {
            if !seen.insert(v) {
                continue;
            }
            if self.cache.contains_key(&v) {
                boundary.insert(v);
            } else if let Some((op, _)) = graph.producer(v)
                && needed.insert(op)
            {
                stack.extend(graph.op_inputs(op).into_iter().flatten().chain(graph.op_captures(op)));
            }
        }
        // A cached value whose op runs anyway (for another of its outputs) is recomputed.
        boundary.retain(|&v| graph.producer(v).is_none_or(|(op, _)| !needed.contains(&op)));
        let mut piece = model.clone();
        let probes = reads.iter().map(|r| r.1).filter(|v| !graph.inputs.contains(v) && !self.cache.contains_key(v));
        // What later pieces will read: outputs of this piece's ops that other ops consume.
        let kept_for_later = needed.iter().flat_map(|&op| graph.op_outputs(op).into_iter().flatten()).filter(|&v| {
            self.dynamic.contains(&v)
                && graph.consumers(v).iter().any(|(reader, _)| !needed.contains(reader) && !self.done.contains(reader))
        });
        let mut outputs: Vec<ValueId> = probes.chain(kept_for_later).collect();
        outputs.sort();
        outputs.dedup();
        let mut piece_feed = Feed(feed.0.clone());
        for &v in &boundary {
            // The cached value becomes an input of the piece in place of the op that made it.
            if let Some((op, _)) = piece.graph.producer(v) {
                piece.graph.remove_op(op);
            }
            piece.graph.value_mut(v).kind = prunec_ir::ValueKind::Input;
            piece.graph.inputs.push(v);
            piece_feed.0.insert(graph.value(v).name.clone(), self.cache[&v].clone());
        }
        let run = if outputs.is_empty() { BTreeMap::new() } else { run_probed(piece, dir, &piece_feed, outputs.iter().copied())? };
        for &v in &outputs {
            if let Some(t) = run.get(&graph.value(v).name) {
                self.cache.insert(v, t.clone());
            }
        }
        let mut inputs = BTreeMap::new();
        for &(op, v) in &reads {
            if let Some(x) = self.cache.get(&v).or_else(|| feed.0.get(&graph.value(v).name)) {
                inputs.insert(op, as_f32(x)?);
            }
        }
        self.done.extend(needed);
        let done = &self.done;
        self.cache.retain(|&v, _| graph.consumers(v).iter().any(|(reader, _)| !done.contains(reader)));
        Ok(inputs)
    }
}

/// Runs `model` (a scratch copy) on `feed` for the values `probes` only: its outputs are dropped
/// and so is every op the probes do not depend on, so the first levels of a refit cost a
/// fraction of the model.
fn run_probed(
    mut model: Model,
    dir: &Path,
    feed: &Feed,
    probes: impl Iterator<Item = ValueId>,
) -> Result<BTreeMap<String, TractTensor>, RunError> {
    model.graph.outputs.clear();
    for v in probes {
        if !model.graph.inputs.contains(&v) && !model.graph.outputs.contains(&v) {
            model.graph.outputs.push(v);
        }
    }
    if model.graph.outputs.is_empty() {
        return Ok(BTreeMap::new());
    }
    let dce = prunec_passes::parse_pipeline("dce", &Default::default()).map_err(|e| RunError::Inputs(e.to_string()))?;
    for pass in &dce {
        pass.run(&mut model).map_err(|e| RunError::Inputs(e.to_string()))?;
    }
    let plan = Plan::from_model(&model, dir, feed)?;
    Ok(plan.run(feed)?.values.into_iter().collect())
}

/// A value of a probed run, or the graph input of that name.
fn activation<'a>(run: &'a BTreeMap<String, TractTensor>, feed: &'a Feed, name: &str) -> Option<&'a TractTensor> {
    run.get(name).or_else(|| feed.0.get(name))
}

fn as_f32(t: &TractTensor) -> Result<TractTensor, RunError> {
    t.cast_to::<f32>().map(|t| t.into_owned()).map_err(|e| RunError::Inputs(e.to_string()))
}

fn plain_f32(t: &TractTensor) -> Option<&[f32]> {
    t.try_as_plain_ram().ok()?.as_slice::<f32>().ok()
}

/// Mean of x² per index of `axis`, over every other axis.
fn channel_second_moments(t: &TractTensor, axis: usize) -> Option<Vec<f64>> {
    let shape = t.shape().to_vec();
    let n = *shape.get(axis)?;
    let inner: usize = shape[axis + 1..].iter().product();
    let values = t.cast_to::<f64>().ok()?;
    let values = values.try_as_plain_ram().ok()?.as_slice::<f64>().ok()?;
    if n == 0 || values.is_empty() {
        return None;
    }
    let mut sums = vec![0.0; n];
    for (k, x) in values.iter().enumerate() {
        sums[(k / inner.max(1)) % n] += x * x;
    }
    let per_channel = (values.len() / n) as f64;
    Some(sums.into_iter().map(|s| s / per_channel).collect())
}
