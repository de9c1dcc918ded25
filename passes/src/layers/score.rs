//! Scores of layers: which to remove first.
//!
//! Data-free scores ([`data_free`]) read the weights only:
//! - a position prior: the first and last [`PROTECTED_ENDS`] layers are kept (early layers carry
//!   semantics, the last ones shape the output; HierarchicalPrune, ShortGPT);
//! - a weight proxy: the RMS of each branch's output projection (the last weighted op before the
//!   residual sum), summed over the layer's branches; a branch that writes little into the
//!   residual stream matters little;
//! - for adaLN-gated blocks (DiT, MMDiT) a gate proxy: the RMS of the gate's rows of the
//!   modulation projection (the chunk of its output the gate is split from), which scales the
//!   gate for every timestep. A branch's term is its output RMS times its gate RMS. The gate
//!   score itself evaluates the gates over a grid of timesteps ([`super::gate`]) and falls back
//!   to this proxy when the model has no timestep input or cannot be run.
//!
//! Data-driven scores are pure functions over activations the caller measured
//! ([`block_influence`], [`ablation_change`]), so a runtime can feed them without this crate
//! depending on one.

use super::detect::{Layer, default_domain};
use prunec_ir::{Graph, OpId, Tensor, ValueId, constant_tensor};
use serde::Serialize;

/// Layers at each end of the stack order that the position prior keeps.
pub const PROTECTED_ENDS: usize = 1;

/// The data-free score of one layer.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DataFreeScore {
    /// Kept by the position prior (among the first or last [`PROTECTED_ENDS`] layers).
    pub protected: bool,
    /// Σ over branches of RMS(output projection), times the gate RMS for a gated branch;
    /// lower is a better candidate. `None` when no branch has a constant output projection.
    pub weight_proxy: Option<f64>,
    /// The gate RMS of each gated branch, in region order.
    pub gates: Vec<f64>,
}

/// Data-free scores of `layers`, in their order.
pub fn data_free(graph: &Graph, layers: &[Layer]) -> Vec<DataFreeScore> {
    let n = layers.len();
    layers
        .iter()
        .map(|layer| {
            let mut proxy: Option<f64> = None;
            let mut gates = Vec::new();
            for region in layer.sub_blocks.iter().flat_map(|s| &s.regions) {
                let output = region.ops.iter().rev().find_map(|&op| projection_weight(graph, op)).map(|w| rms(w, None));
                let gate = region.gate_value.and_then(|g| gate_rms(graph, g));
                gates.extend(gate);
                if let Some(Some(out)) = output {
                    *proxy.get_or_insert(0.0) += out * gate.unwrap_or(1.0);
                }
            }
            let protected = layer.index < PROTECTED_ENDS || layer.index + PROTECTED_ENDS >= n;
            DataFreeScore { protected, weight_proxy: proxy, gates }
        })
        .collect()
}

/// The constant weight of a dense or convolution op, with the axis of its output features.
fn projection_weight(graph: &Graph, op: OpId) -> Option<(&Tensor, usize)> {
    let o = graph.op(op);
    if !default_domain(&o.domain) {
        return None;
    }
    let weight = |slot: usize| graph.op_input(op, slot).and_then(|v| constant_tensor(graph, v)).filter(|t| t.dtype().is_float());
    match o.op_type.as_str() {
        "MatMul" => weight(1).filter(|t| t.dims().len() >= 2).map(|t| (t, t.dims().len() - 1)),
        "Gemm" => weight(1).map(|t| (t, if o.attr_int("transB").unwrap_or(0) != 0 { 0 } else { 1 })),
        "Conv" => weight(1).map(|t| (t, 0)),
        _ => None,
    }
}

/// RMS of a weight over all elements, or over output features `[start, start + len)`.
fn rms((weight, feature_axis): (&Tensor, usize), features: Option<(usize, usize)>) -> Option<f64> {
    let sums = weight.axis_sums(feature_axis, |v| v * v)?;
    let (start, len) = features.unwrap_or((0, sums.len()));
    let chosen = sums.get(start..start.checked_add(len)?)?;
    let per_feature = weight.numel().checked_div(sums.len() as u64)?;
    let count = (len as u64).checked_mul(per_feature).filter(|&c| c > 0)?;
    Some((chosen.iter().sum::<f64>() / count as f64).sqrt())
}

/// RMS of the modulation rows a gate is cut from: followed back through reshapes, casts,
/// bias Adds, and Split or Slice on the last axis (which narrow the rows), to a dense op.
fn gate_rms(graph: &Graph, gate: ValueId) -> Option<f64> {
    let mut v = gate;
    // Features of the current value, as `(offset, len)` into its last axis.
    let mut window: Option<(usize, usize)> = None;
    for _ in 0..16 {
        let (op, slot) = graph.producer(v)?;
        let o = graph.op(op);
        if !default_domain(&o.domain) {
            return None;
        }
        let input = graph.op_input(op, 0)?;
        let on_last = |axis: i64, value: ValueId| {
            let rank = graph.value(value).shape.as_ref().map_or(0, |s| s.rank() as i64);
            rank > 0 && (if axis < 0 { axis + rank } else { axis }) == rank - 1
        };
        match o.op_type.as_str() {
            "Gemm" | "MatMul" => return rms(projection_weight(graph, op)?, window),
            "Unsqueeze" | "Squeeze" | "Reshape" | "Identity" | "Cast" | "Flatten" => v = input,
            "Add" => {
                let inputs: Vec<ValueId> = graph.op_inputs(op).into_iter().flatten().collect();
                v = *inputs.iter().find(|&&w| constant_tensor(graph, w).is_none())?;
            }
            "Split" => {
                let axis = o.attr_int("axis").unwrap_or(0);
                if !on_last(axis, input) {
                    return None;
                }
                let total = graph.value(input).shape.as_ref()?.0.last()?.known()? as usize;
                let outputs = graph.op_outputs(op).len();
                let sizes: Vec<usize> = match graph.op_input(op, 1).and_then(|s| constant_tensor(graph, s)).and_then(Tensor::to_i64_vec) {
                    Some(sizes) => sizes.into_iter().map(|s| usize::try_from(s).ok()).collect::<Option<_>>()?,
                    None => match o.attr_ints("split") {
                        Some(sizes) => sizes.iter().map(|&s| usize::try_from(s).ok()).collect::<Option<_>>()?,
                        None => vec![total.checked_div(outputs)?; outputs],
                    },
                };
                let offset: usize = sizes.get(..slot)?.iter().sum();
                window = Some(narrow(window, offset, *sizes.get(slot)?));
                v = input;
            }
            "Slice" => {
                let constant = |s: usize| graph.op_input(op, s).and_then(|w| constant_tensor(graph, w)).and_then(Tensor::to_i64_vec);
                let (starts, ends) = (constant(1)?, constant(2)?);
                let axes = constant(3).unwrap_or_else(|| (0..starts.len() as i64).collect());
                let steps = constant(4).unwrap_or_else(|| vec![1; starts.len()]);
                let total = graph.value(input).shape.as_ref()?.0.last()?.known()? as i64;
                let (&[start], &[end], &[axis], &[1]) = (&starts[..], &ends[..], &axes[..], &steps[..]) else { return None };
                if !on_last(axis, input) {
                    return None;
                }
                let clamp = |i: i64| if i < 0 { (i + total).max(0) } else { i.min(total) };
                let (start, end) = (clamp(start), clamp(end));
                window = Some(narrow(window, start as usize, usize::try_from(end - start).ok()?));
                v = input;
            }
            _ => return None,
        }
    }
    None
}

/// A window inside a chunk that starts at `offset` and is `len` long, as a window of the whole.
fn narrow(inner: Option<(usize, usize)>, offset: usize, len: usize) -> (usize, usize) {
    match inner {
        Some((start, inner_len)) => (offset + start, inner_len),
        None => (offset, len),
    }
}

/// Why activations cannot be scored.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ActivationError {
    /// The two activations differ in length.
    #[error("activations differ in length: {0} and {1} elements")]
    Lengths(usize, usize),
    /// The length is not a whole number of tokens of the hidden size.
    #[error("{len} elements are not whole tokens of {hidden} features")]
    NotTokens {
        /// Elements given.
        len: usize,
        /// Features per token.
        hidden: usize,
    },
}

/// ShortGPT's block influence: `1 − cos(x_in, x_out)` per token (rows of `hidden` features),
/// averaged over the tokens. A block that leaves its input unchanged scores 0. A token that is
/// zero on both sides counts as unchanged.
pub fn block_influence(x_in: &[f32], x_out: &[f32], hidden: usize) -> Result<f64, ActivationError> {
    if x_in.len() != x_out.len() {
        return Err(ActivationError::Lengths(x_in.len(), x_out.len()));
    }
    if hidden == 0 || x_in.is_empty() || !x_in.len().is_multiple_of(hidden) {
        return Err(ActivationError::NotTokens { len: x_in.len(), hidden });
    }
    let tokens = x_in.len() / hidden;
    let total: f64 = x_in.chunks(hidden).zip(x_out.chunks(hidden)).map(|(a, b)| 1.0 - cosine(a, b)).sum();
    Ok(total / tokens as f64)
}

/// How much ablating a block changes the final output: `‖original − ablated‖₂ / ‖original‖₂`
/// (the absolute norm when the original is zero). An exact identity block scores 0.
pub fn ablation_change(original: &[f32], ablated: &[f32]) -> Result<f64, ActivationError> {
    if original.len() != ablated.len() {
        return Err(ActivationError::Lengths(original.len(), ablated.len()));
    }
    let (mut diff, mut norm) = (0f64, 0f64);
    for (&o, &a) in original.iter().zip(ablated) {
        diff += (f64::from(o) - f64::from(a)).powi(2);
        norm += f64::from(o).powi(2);
    }
    Ok(if norm > 0.0 { (diff / norm).sqrt() } else { diff.sqrt() })
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    match (na > 0.0, nb > 0.0) {
        (false, false) => 1.0,
        (true, true) => dot / (na.sqrt() * nb.sqrt()),
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unchanged_stream_has_no_influence_and_an_orthogonal_one_full() {
        let scaled = block_influence(&[1.0, 2.0, 3.0, 4.0], &[2.0, 4.0, 6.0, 8.0], 2).expect("whole tokens");
        assert!(scaled.abs() < 1e-12, "{scaled}");
        assert_eq!(block_influence(&[1.0, 0.0], &[0.0, 1.0], 2), Ok(1.0));
        assert!(matches!(block_influence(&[1.0; 3], &[1.0; 3], 2), Err(ActivationError::NotTokens { .. })));
    }

    #[test]
    fn ablation_change_is_relative_to_the_original() {
        assert_eq!(ablation_change(&[3.0, 4.0], &[3.0, 4.0]), Ok(0.0));
        assert_eq!(ablation_change(&[3.0, 4.0], &[0.0, 0.0]), Ok(1.0));
        assert_eq!(ablation_change(&[1.0], &[1.0, 2.0]), Err(ActivationError::Lengths(1, 2)));
    }

    #[test]
    fn a_window_inside_a_chunk_is_offset_by_the_chunk() {
        assert_eq!(narrow(None, 8, 4), (8, 4));
        assert_eq!(narrow(Some((1, 2)), 8, 4), (9, 2));
    }
}
