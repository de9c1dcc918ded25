//! Quantised weights: how an integer constant and its scale and zero point give the float weight
//! an op computes with, for the ops that read quantised weights (`DequantizeLinear` of a constant
//! in QDQ models; the weight inputs of `QLinearConv`, `QLinearMatMul`, `ConvInteger` and
//! `MatMulInteger`).
//!
//! The coupling rules treat such a constant as a weight, and the pruning criteria score it
//! dequantised, so a channel of small integers with a large scale is not mistaken for a weak
//! one. Only weights whose zero point is absent or zero count: the masking reference of
//! verification zeroes the integers of removed channels, which stands for a zero weight only
//! then.

use crate::graph::Graph;
use crate::groups::constant_tensor;
use crate::ids::{OpId, ValueId};
use crate::proto::tensor_proto::DataType;
use crate::shape::DType;
use crate::tensor::Tensor;

/// Where the quantisation parameters of an op's integer weight input are: its slot, the slots of
/// its scale and zero point (no scale: the integers are the values), and the weight axis a 1-D
/// scale runs along (`None`: the op's `axis` attribute, defaulting to 1, as DequantizeLinear's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantizedInput {
    /// Slot of the integer weight.
    pub weight: usize,
    /// Slot of the scale, if the op has one.
    pub scale: Option<usize>,
    /// Slot of the zero point.
    pub zero_point: usize,
    /// Axis of the weight that a per-channel scale or zero point runs along.
    pub axis: Option<usize>,
}

/// The quantised weight input of a default-domain op, if it has one.
pub fn quantized_input(op_type: &str) -> Option<QuantizedInput> {
    Some(match op_type {
        "DequantizeLinear" => QuantizedInput { weight: 0, scale: Some(1), zero_point: 2, axis: None },
        // W[M, C/group, k...] with w_scale and w_zero_point per output channel.
        "QLinearConv" => QuantizedInput { weight: 3, scale: Some(4), zero_point: 5, axis: Some(0) },
        // B[K, N] with b_scale and b_zero_point per column.
        "QLinearMatMul" => QuantizedInput { weight: 3, scale: Some(4), zero_point: 5, axis: Some(1) },
        "ConvInteger" => QuantizedInput { weight: 1, scale: None, zero_point: 3, axis: Some(0) },
        "MatMulInteger" => QuantizedInput { weight: 1, scale: None, zero_point: 3, axis: Some(1) },
        _ => return None,
    })
}

/// Whether `op` reads a constant integer weight through [`quantized_input`] with a zero point
/// that is absent or all zeros, and no blocked quantisation: the weights the rules treat as
/// weights and the criteria score dequantised.
pub fn reads_quantized_weight(graph: &Graph, op: OpId) -> bool {
    let node = graph.op(op);
    let Some(q) = quantized_input(&node.op_type) else { return false };
    if !(node.domain.is_empty() || node.domain == "ai.onnx") || node.attr_int("block_size").unwrap_or(0) != 0 {
        return false;
    }
    let Some(w) = graph.op_input(op, q.weight).and_then(|w| constant_tensor(graph, w)) else { return false };
    if !is_integer(w.dtype()) {
        return false;
    }
    if let Some(s) = q.scale
        && graph.op_input(op, s).and_then(|s| constant_tensor(graph, s)).is_none_or(|s| s.dtype() != DType::F32)
    {
        return false;
    }
    match graph.op_input(op, q.zero_point) {
        None => true,
        Some(z) => constant_tensor(graph, z).and_then(Tensor::to_i64_vec).is_some_and(|z| z.iter().all(|&z| z == 0)),
    }
}

/// The integer constant behind `v` when `v` is what a `DequantizeLinear` of a weight computes
/// ([`reads_quantized_weight`]): `(integer constant, the DequantizeLinear)`.
pub(crate) fn dequantized_source(graph: &Graph, v: ValueId) -> Option<(ValueId, OpId)> {
    let (op, 0) = graph.producer(v)? else { return None };
    if graph.op(op).op_type != "DequantizeLinear" || !reads_quantized_weight(graph, op) {
        return None;
    }
    Some((graph.op_input(op, 0)?, op))
}

fn is_integer(dtype: DType) -> bool {
    matches!(dtype.known(), Some(DataType::Int8 | DataType::Uint8 | DataType::Int16 | DataType::Uint16 | DataType::Int32))
}

/// The float weight that `op` computes with from its quantised weight input,
/// `(w − zero_point) · scale` per tensor or per channel; `None` when the input is not a constant
/// or is of a form this does not evaluate (blocked quantisation, a scale that is not f32, shapes
/// that do not fit).
///
/// For `DequantizeLinear` this is exactly the op's result (ONNX defines it as the integer
/// difference converted to float and multiplied once by the f32 scale).
pub fn dequantized_weight(graph: &Graph, op: OpId) -> Option<Tensor> {
    let node = graph.op(op);
    let q = quantized_input(&node.op_type)?;
    if node.attr_int("block_size").unwrap_or(0) != 0 {
        return None;
    }
    let x = constant_tensor(graph, graph.op_input(op, q.weight)?)?;
    if !is_integer(x.dtype()) {
        return None;
    }
    let dims = x.dims();
    let values = x.to_i64_vec()?;
    let (s, scale_dims) = match q.scale {
        Some(slot) => {
            let scale = constant_tensor(graph, graph.op_input(op, slot)?)?;
            if scale.dtype() != DType::F32 {
                return None;
            }
            (scale.to_f32_vec()?, scale.dims())
        }
        None => (vec![1.0], Vec::new()),
    };
    let z = match graph.op_input(op, q.zero_point) {
        Some(zp) => {
            let zp = constant_tensor(graph, zp)?;
            if zp.dtype() != x.dtype() {
                return None;
            }
            zp.to_i64_vec()?
        }
        None => vec![0; s.len()],
    };
    // A scale-less op with a per-channel zero point: one unit scale per channel.
    let s = if q.scale.is_none() && z.len() > 1 { vec![1.0; z.len()] } else { s };
    if z.len() != s.len() || s.is_empty() {
        return None;
    }
    // Per tensor (one scale) or per axis (one scale per index of `axis`).
    let (inner, channels) = if s.len() == 1 && scale_dims.len() <= 1 {
        (1, 1)
    } else {
        let rank = dims.len() as i64;
        let axis = q.axis.map_or_else(|| node.attr_int("axis").unwrap_or(1), |a| a as i64);
        let axis = if axis < 0 { axis + rank } else { axis };
        if scale_dims.len() > 1 || !(0..rank).contains(&axis) || dims[axis as usize] != s.len() as u64 {
            return None;
        }
        (dims[axis as usize + 1..].iter().product::<u64>().max(1) as usize, s.len())
    };
    let values: Vec<f32> = values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = (i / inner) % channels;
            (v - z[c]) as f32 * s[c]
        })
        .collect();
    Some(Tensor::from_f32("", &dims, &values))
}
