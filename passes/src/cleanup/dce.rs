//! Dead-code elimination.
//!
//! Removes every op none of whose outputs a graph output depends on, and every initializer,
//! sparse initializer and value nothing reads any more. Graph inputs stay, used or not: they
//! are the model's interface. Values read by subgraphs count as read.

use crate::{Context, Pass, PassError, PassReport};
use prunec_ir::{Model, ValueKind};
use std::collections::HashSet;

/// The `dce` pass.
pub(crate) struct DeadCodeElimination;

impl Pass for DeadCodeElimination {
    fn name(&self) -> &'static str {
        "dce"
    }

    fn options(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }

    fn needs_shapes(&self) -> bool {
        false
    }

    fn run(&self, model: &mut Model, _: &mut Context) -> Result<PassReport, PassError> {
        Ok(remove_dead_code(model))
    }
}

/// Removes what no graph output depends on (the `dce` pass, for passes that leave dead code).
pub fn remove_dead_code(model: &mut Model) -> PassReport {
    let graph = &mut model.graph;
    let mut live_values = HashSet::new();
    let mut live_ops = HashSet::new();
    let mut stack: Vec<_> = graph.outputs.clone();
    while let Some(v) = stack.pop() {
        if !live_values.insert(v) {
            continue;
        }
        if let Some((op, _)) = graph.producer(v)
            && live_ops.insert(op)
        {
            stack.extend(graph.op_inputs(op).into_iter().flatten());
            stack.extend(graph.op_captures(op));
        }
    }
    let mut report = PassReport::default();
    let dead_ops: Vec<_> = graph.op_ids().filter(|op| !live_ops.contains(op)).collect();
    for op in dead_ops {
        graph.remove_op(op);
        report.ops_removed += 1;
    }
    let dead_values: Vec<_> = graph
        .value_ids()
        .filter(|v| !live_values.contains(v) && !graph.inputs.contains(v))
        // An unread output of a live op stays: the op still produces it.
        .filter(|v| match graph.value(*v).kind {
            ValueKind::Produced => graph.producer(*v).is_none(),
            ValueKind::Initializer(_) | ValueKind::SparseInitializer(_) => true,
            ValueKind::Input => false,
        })
        .collect();
    for v in dead_values {
        graph.remove_value(v);
        report.values_removed += 1;
    }
    report
}
