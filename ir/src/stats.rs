//! Model statistics: parameters, weight bytes, op histogram and multiply-accumulate counts.

use crate::graph::{Graph, Model, Op};
use crate::ids::OpId;
use crate::proto;
use crate::shape::{DType, Shape};
use serde::Serialize;
use std::collections::BTreeMap;

/// Size and cost figures of a model, as `prunec inspect` reports them.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ModelStats {
    /// Elements of floating-point constant tensors (initializers, `Constant` values and tensor
    /// attributes, subgraphs included), and of integer constants that an op reads as a quantised
    /// weight ([`crate::quant::quantized_input`]). Other integer constants are shapes, axes and
    /// indices, not weights.
    pub parameters: u64,
    /// Bytes of those tensors.
    pub parameter_bytes: u64,
    /// Bytes of every constant tensor, of any type.
    pub weight_bytes: u64,
    /// Number of tensors stored as external data, and their bytes.
    pub external_tensors: u64,
    /// See [`ModelStats::external_tensors`].
    pub external_bytes: u64,
    /// Ops of the main graph by type (`domain.Type` for other domains).
    pub op_histogram: BTreeMap<String, u64>,
    /// Ops inside subgraphs (If/Loop/Scan bodies), not in the histogram.
    pub subgraph_ops: u64,
    /// Multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul at the known shapes.
    pub macs: u64,
    /// Conv/Gemm/MatMul ops whose MACs are not counted because a shape is not concrete.
    pub macs_unknown: Vec<String>,
}

/// Cost of one op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpCost {
    /// The op does no multiply-accumulates prunec counts.
    NotCounted,
    /// Multiply-accumulates.
    Macs(u64),
    /// A shape the count needs is not concrete.
    Unknown,
}

/// Computes the figures of [`ModelStats`].
pub fn model_stats(model: &Model) -> ModelStats {
    let graph = &model.graph;
    let mut stats = ModelStats::default();
    let quantized = quantized_weights(graph);
    for &id in &graph.initializers {
        if let Some(t) = graph.value(id).initializer() {
            stats.add_tensor(t.dtype(), t.numel(), t.nbytes(), t.is_external(), quantized.contains(&id));
        }
    }
    for op_id in graph.op_ids() {
        let op = graph.op(op_id);
        let output_is_weight = graph.op_output(op_id, 0).is_some_and(|v| quantized.contains(&v));
        for a in &op.attributes {
            if let Some(t) = &a.tensor {
                stats.add_tensor(t.dtype(), t.numel(), t.nbytes(), t.is_external(), output_is_weight);
            }
            for t in &a.proto.tensors {
                stats.add_proto_tensor(t);
            }
        }
        for sub in op.subgraphs() {
            stats.add_subgraph(sub);
        }
        let key = if op.domain.is_empty() || op.domain == "ai.onnx" { op.op_type.clone() } else { format!("{}.{}", op.domain, op.op_type) };
        *stats.op_histogram.entry(key).or_default() += 1;
        match op_cost(graph, op_id) {
            OpCost::Macs(m) => stats.macs = stats.macs.saturating_add(m),
            OpCost::Unknown => stats.macs_unknown.push(op.name.clone()),
            OpCost::NotCounted => {}
        }
    }
    stats.macs_unknown.sort();
    stats
}

/// The integer constants (initializers, or `Constant` outputs) that an op reads in its quantised
/// weight slot: the weights of QDQ and QOperator models, which count as parameters.
pub fn quantized_weights(graph: &Graph) -> std::collections::HashSet<crate::ids::ValueId> {
    let mut weights = std::collections::HashSet::new();
    for op_id in graph.op_ids() {
        let op = graph.op(op_id);
        let Some(q) = crate::quant::quantized_input(&op.op_type) else { continue };
        if !(op.domain.is_empty() || op.domain == "ai.onnx") {
            continue;
        }
        let Some(w) = graph.op_input(op_id, q.weight) else { continue };
        let constant = match graph.producer(w) {
            None => graph.value(w).initializer().is_some(),
            Some((p, _)) => graph.op(p).op_type == "Constant",
        };
        if constant {
            weights.insert(w);
        }
    }
    weights
}

impl ModelStats {
    fn add_tensor(&mut self, dtype: DType, numel: u64, nbytes: u64, external: bool, quantized_weight: bool) {
        if dtype.is_float() || quantized_weight {
            self.parameters += numel;
            self.parameter_bytes += nbytes;
        }
        self.weight_bytes += nbytes;
        if external {
            self.external_tensors += 1;
            self.external_bytes += nbytes;
        }
    }

    fn add_proto_tensor(&mut self, t: &proto::TensorProto) {
        let numel = t.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(u64::try_from(d).ok()?)).unwrap_or(0);
        let dtype = DType(t.data_type());
        let external = t.data_location() == proto::tensor_proto::DataLocation::External;
        self.add_tensor(dtype, numel, dtype.packed_bytes(numel).unwrap_or(0), external, false);
    }

    fn add_subgraph(&mut self, g: &proto::GraphProto) {
        for t in &g.initializer {
            self.add_proto_tensor(t);
        }
        for n in &g.node {
            self.subgraph_ops += 1;
            for a in &n.attribute {
                for t in a.t.iter().chain(a.tensors.iter()) {
                    self.add_proto_tensor(t);
                }
                for sub in a.g.iter().chain(a.graphs.iter()) {
                    self.add_subgraph(sub);
                }
            }
        }
    }
}

/// Multiply-accumulates of one op at the graph's current shapes.
pub fn op_cost(graph: &Graph, id: OpId) -> OpCost {
    let op: &Op = graph.op(id);
    if !(op.domain.is_empty() || op.domain == "ai.onnx") {
        return OpCost::NotCounted;
    }
    let shape = |slot: Option<crate::ValueId>| -> Option<Vec<u64>> { graph.value(slot?).shape.as_ref().and_then(Shape::concrete) };
    let input = |i: usize| shape(graph.op_input(id, i));
    let output = || shape(graph.op_output(id, 0));
    let numel = |s: &[u64]| s.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
    let macs = match op.op_type.as_str() {
        // W is [M, C/group, k...]: each output element reads C/group·k inputs.
        "Conv" => (|| numel(&output()?)?.checked_mul(numel(input(1)?.get(1..)?)?))(),
        // W is [C, M/group, k...]: each input element feeds M/group·k outputs.
        "ConvTranspose" => (|| numel(&input(0)?)?.checked_mul(numel(input(1)?.get(1..)?)?))(),
        "Gemm" => (|| {
            let a = input(0)?;
            let k = if op.attr_int("transA").unwrap_or(0) != 0 { *a.first()? } else { *a.get(1)? };
            numel(&output()?)?.checked_mul(k)
        })(),
        "MatMul" => (|| numel(&output()?)?.checked_mul(*input(0)?.last()?))(),
        _ => return OpCost::NotCounted,
    };
    macs.map_or(OpCost::Unknown, OpCost::Macs)
}
