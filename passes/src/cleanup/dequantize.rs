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
use prunec_ir::{Edge, Model, OpId};

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
            let Some(weight) = prunec_ir::dequantized_weight(graph, op) else { continue };
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
