//! Dequantization of constant weights: a `DequantizeLinear` whose input, scale and zero point
//! are constants becomes the float constant it computes, `y = (x − zero_point) · scale`.
//!
//! The result is exact, not an approximation: ONNX defines the op as that integer difference
//! converted to float and multiplied once by the f32 scale, which is what this pass computes
//! and what every runtime computes at run time. The model therefore gives the same values,
//! with f32 weights in place of 8-bit ones (four times the weight bytes). What it is for:
//! tract 0.23 cannot write `DequantizeLinear` to NNEF, so a model quantised only in its weights
//! can become an archive after this pass; a `QuantizeLinear` of activations has no exact float
//! form and stays (the NNEF backend refuses it).

use crate::{Context, Pass, PassError, PassReport};
use prunec_ir::proto::tensor_proto::DataType;
use prunec_ir::{DType, Edge, Graph, Model, OpId, Tensor, constant_tensor};

/// The `dequantize` pass.
pub(crate) struct Dequantize;

impl Pass for Dequantize {
    fn name(&self) -> &'static str {
        "dequantize"
    }

    fn options(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }

    fn needs_shapes(&self) -> bool {
        false
    }

    fn run(&self, model: &mut Model, _: &mut Context) -> Result<PassReport, PassError> {
        let graph = &mut model.graph;
        let mut report = PassReport::default();
        let ops: Vec<OpId> = graph
            .op_ids()
            .filter(|&op| {
                graph.op(op).op_type == "DequantizeLinear" && (graph.op(op).domain.is_empty() || graph.op(op).domain == "ai.onnx")
            })
            .collect();
        for op in ops {
            let Some(output) = graph.op_output(op, 0) else { continue };
            let readers = graph.consumers(output);
            // The output's name is the interface when it is a graph output or read by name from a subgraph.
            if graph.is_output(output) || readers.iter().any(|(_, edge)| *edge == Edge::Captured) {
                continue;
            }
            let Some(weight) = dequantized(graph, op) else { continue };
            let name = graph.value(output).name.clone();
            graph.remove_op(op);
            graph.remove_value(output);
            // Removed first, so the weight takes the name the readers knew.
            let folded = graph.add_initializer(&name, weight);
            for (reader, edge) in readers {
                if let Edge::Input(slot) = edge {
                    graph.set_op_input(reader, slot, folded);
                }
            }
            report.ops_removed += 1;
            report.values_removed += 1;
        }
        // The integer weights, scales and zero points nothing reads any more.
        let dce = super::remove_dead_code(model);
        report.ops_removed += dce.ops_removed;
        report.values_removed += dce.values_removed;
        Ok(report)
    }
}

/// The float tensor a `DequantizeLinear` of constants computes; `None` when an input is not a
/// constant or the op is of a form this pass does not evaluate (blocked quantisation, a scale
/// that is not f32, shapes that do not fit).
fn dequantized(graph: &Graph, op: OpId) -> Option<Tensor> {
    let node = graph.op(op);
    if node.attr_int("block_size").unwrap_or(0) != 0 {
        return None;
    }
    let x = constant_tensor(graph, graph.op_input(op, 0)?)?;
    let scale = constant_tensor(graph, graph.op_input(op, 1)?)?;
    let integer = matches!(x.dtype().known()?, DataType::Int8 | DataType::Uint8 | DataType::Int16 | DataType::Uint16 | DataType::Int32);
    if !integer || scale.dtype() != DType::F32 {
        return None;
    }
    let dims = x.dims();
    let q = x.to_i64_vec()?;
    let s = scale.to_f32_vec()?;
    let z = match graph.op_input(op, 2) {
        Some(zp) => {
            let zp = constant_tensor(graph, zp)?;
            if zp.dtype() != x.dtype() {
                return None;
            }
            zp.to_i64_vec()?
        }
        None => vec![0; s.len()],
    };
    if z.len() != s.len() || s.is_empty() {
        return None;
    }
    // Per tensor (one scale) or per axis (one scale per index of `axis`).
    let inner_and_channels = if s.len() == 1 && scale.dims().len() <= 1 {
        (1, 1)
    } else {
        let rank = dims.len() as i64;
        let axis = node.attr_int("axis").unwrap_or(1);
        let axis = if axis < 0 { axis + rank } else { axis };
        if scale.dims().len() != 1 || !(0..rank).contains(&axis) || dims[axis as usize] != s.len() as u64 {
            return None;
        }
        (dims[axis as usize + 1..].iter().product::<u64>().max(1) as usize, s.len())
    };
    let (inner, channels) = inner_and_channels;
    let values: Vec<f32> = q
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = (i / inner) % channels;
            (v - z[c]) as f32 * s[c]
        })
        .collect();
    Some(Tensor::from_f32("", &dims, &values))
}
