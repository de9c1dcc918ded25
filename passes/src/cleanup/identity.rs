//! Identity elimination: readers of an `Identity`'s output read its input instead.
//!
//! An Identity that produces a graph output stays (the output's name is the interface), and so
//! does one whose output a subgraph reads by name from the outer scope.

use crate::{Context, Pass, PassError, PassReport};
use prunec_ir::{Edge, Model};

/// The `identity` pass.
pub(crate) struct IdentityElimination;

impl Pass for IdentityElimination {
    fn name(&self) -> &'static str {
        "identity"
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
        let identities: Vec<_> = graph
            .op_ids()
            .filter(|&op| graph.op(op).op_type == "Identity" && (graph.op(op).domain.is_empty() || graph.op(op).domain == "ai.onnx"))
            .collect();
        for op in identities {
            let (Some(input), Some(output)) = (graph.op_input(op, 0), graph.op_output(op, 0)) else { continue };
            let readers = graph.consumers(output);
            if graph.is_output(output) || readers.iter().any(|(_, edge)| *edge == Edge::Captured) {
                continue;
            }
            for (reader, edge) in readers {
                if let Edge::Input(slot) = edge {
                    graph.set_op_input(reader, slot, input);
                }
            }
            graph.remove_op(op);
            graph.remove_value(output);
            report.ops_removed += 1;
            report.values_removed += 1;
        }
        Ok(report)
    }
}
