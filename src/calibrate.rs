//! Calibration: runs the model in tract on real (or synthetic) inputs and measures, for every
//! weighted op, the second moment of each input channel it reads (what the calibration criteria
//! weigh weights by) and, when asked, the Hessian E[x xᵀ] of a dense consumer's input columns
//! (what OBSPA and FLAP need).

use crate::backends::RunError;
use crate::backends::tract::{Feed, Plan, TractTensor};
use crate::ir::{Model, ValueId, constant_tensor};
use crate::passes::prune::Calibration;
use std::collections::BTreeMap;
use std::path::Path;

/// The activation a weighted op reads and the axis its weight's input columns match.
fn activation_axis(model: &Model, op: crate::ir::OpId) -> Option<(ValueId, usize)> {
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
    let mut reads: BTreeMap<String, (crate::ir::OpId, ValueId, usize)> = BTreeMap::new();
    for op in graph.op_ids() {
        if let Some((v, axis)) = activation_axis(model, op) {
            reads.insert(graph.op(op).name.clone(), (op, v, axis));
        }
    }
    // Ask tract for every activation read that is not already an input or output.
    let mut probe = model.clone();
    let mut extra: Vec<ValueId> = Vec::new();
    for &(_, v, _) in reads.values() {
        if !probe.graph.inputs.contains(&v) && !probe.graph.outputs.contains(&v) && !extra.contains(&v) {
            extra.push(v);
        }
    }
    probe.graph.outputs.extend(&extra);
    let plan = Plan::from_model(&probe, dir, feed)?;
    let outputs = plan.run(feed)?;
    let by_name: BTreeMap<&str, &TractTensor> = outputs.values.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut second_moments = BTreeMap::new();
    let mut activations: Vec<(crate::ir::OpId, TractTensor)> = Vec::new();
    for (node, (op, v, axis)) in reads {
        let name = graph.value(v).name.as_str();
        let Some(tensor) = by_name.get(name).copied().or_else(|| feed.0.get(name)) else { continue };
        if let Some(m2) = channel_second_moments(tensor, axis) {
            second_moments.insert(node, m2);
        }
        if hessians {
            activations.push((op, tensor.cast_to::<f32>().map(|t| t.into_owned()).map_err(|e| RunError::Inputs(e.to_string()))?));
        }
    }
    drop(outputs);
    let reads: Vec<(crate::ir::OpId, &[f32], &[usize])> =
        activations.iter().filter_map(|(op, t)| Some((*op, t.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?, t.shape()))).collect();
    let hessians = crate::passes::prune::obspa::input_hessians(graph, &reads, MAX_HESSIAN_ROWS);
    Ok(Calibration { second_moments, hessians, source: source.to_string() })
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
