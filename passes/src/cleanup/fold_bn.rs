//! BatchNorm folding: a `BatchNormalization` in inference mode that alone reads a Conv's (or a
//! Gemm's) output becomes part of that op's weight and bias:
//! `s = γ / √(var + ε)`, `W' = W · s` per output channel, `b' = (b − mean) · s + β`.

use crate::{Context, Pass, PassError, PassReport};
use prunec_ir::{Graph, Model, OpId, Tensor, ValueId, constant_tensor};

/// The `fold-bn` pass.
pub(crate) struct FoldBatchNorm;

impl Pass for FoldBatchNorm {
    fn name(&self) -> &'static str {
        "fold-bn"
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
        let norms: Vec<OpId> =
            graph.op_ids().filter(|&op| graph.op(op).op_type == "BatchNormalization" && graph.op(op).domain.is_empty()).collect();
        for bn in norms {
            let Some(fold) = foldable(graph, bn) else { continue };
            let producer = graph.op(fold.producer).clone();
            let inputs = graph.op_inputs(fold.producer);
            let output = graph.op_output(bn, 0).expect("checked by foldable");
            let old_output = graph.op_output(fold.producer, 0).expect("checked by foldable");
            let weight = replace_constant(graph, inputs[1].expect("checked by foldable"), fold.weight, "folded");
            let bias_name = format!("{}_bias", graph.op(fold.producer).name);
            let bias = match inputs.get(2).copied().flatten() {
                Some(b) => replace_constant(graph, b, fold.bias, "folded"),
                None => graph.add_initializer(&bias_name, fold.bias),
            };
            graph.remove_op(bn);
            graph.remove_op(fold.producer);
            graph.remove_value(old_output);
            let new_inputs = [inputs[0], Some(weight), Some(bias)];
            graph.add_op(producer, &new_inputs, &[Some(output)]).map_err(|source| PassError::BrokeGraph { pass: "fold-bn", source })?;
            report.ops_removed += 1;
            report.values_removed += 1;
        }
        let dce = super::remove_dead_code(model);
        report.ops_removed += dce.ops_removed;
        report.values_removed += dce.values_removed;
        Ok(report)
    }
}

/// The folded weight and bias of a BatchNormalization, and the op they go into.
struct Fold {
    producer: OpId,
    weight: Tensor,
    bias: Tensor,
}

fn floats(graph: &Graph, v: Option<ValueId>) -> Option<Vec<f32>> {
    let t = constant_tensor(graph, v?)?;
    (t.dtype() == prunec_ir::DType::F32).then(|| t.to_f32_vec()).flatten()
}

fn foldable(graph: &Graph, bn: OpId) -> Option<Fold> {
    let op = graph.op(bn);
    if op.attr_int("training_mode").unwrap_or(0) != 0 || graph.op_outputs(bn).iter().skip(1).any(Option::is_some) {
        return None;
    }
    let x = graph.op_input(bn, 0)?;
    let (producer, _) = graph.producer(x)?;
    let p = graph.op(producer);
    if !p.domain.is_empty() || graph.is_output(x) || graph.consumers(x).len() != 1 {
        return None;
    }
    let [gamma, beta, mean, var] = [1, 2, 3, 4].map(|slot| floats(graph, graph.op_input(bn, slot)));
    let (gamma, beta, mean, var) = (gamma?, beta?, mean?, var?);
    let eps = op.attr_float("epsilon").unwrap_or(1e-5);
    let scale: Vec<f32> = gamma.iter().zip(&var).map(|(g, v)| g / (v + eps).sqrt()).collect();
    let w = constant_tensor(graph, graph.op_input(producer, 1)?)?;
    let dims = w.dims();
    let values = floats(graph, graph.op_input(producer, 1))?;
    // The axis of the weight that holds the output channels.
    let axis = match p.op_type.as_str() {
        "Conv" if graph.op_input(producer, 0).and_then(|x| graph.value(x).shape.as_ref().map(|s| s.rank())).is_none_or(|r| r >= 3) => 0,
        "Gemm" if p.attr_float("alpha").unwrap_or(1.0) == 1.0 && p.attr_float("beta").unwrap_or(1.0) == 1.0 => {
            if p.attr_int("transB").unwrap_or(0) != 0 { 0 } else { 1 }
        }
        _ => return None,
    };
    if dims.get(axis).copied() != Some(scale.len() as u64) || [&beta, &mean].iter().any(|v| v.len() != scale.len()) {
        return None;
    }
    let inner: usize = dims[axis + 1..].iter().product::<u64>() as usize;
    let n = scale.len();
    let folded: Vec<u8> = values.iter().enumerate().flat_map(|(i, w)| (w * scale[(i / inner.max(1)) % n]).to_le_bytes()).collect();
    let bias = match graph.op_input(producer, 2) {
        Some(b) => floats(graph, Some(b)).filter(|b| b.len() == n)?,
        None => vec![0.0; n],
    };
    let new_bias: Vec<f32> = (0..n).map(|c| (bias[c] - mean[c]) * scale[c] + beta[c]).collect();
    Some(Fold { producer, weight: w.with_data(&dims, folded), bias: Tensor::from_f32("", &[n as u64], &new_bias) })
}

/// Puts `tensor` where `old` was for the folded op: in place when nothing else reads `old`,
/// else as a new initializer.
fn replace_constant(graph: &mut Graph, old: ValueId, tensor: Tensor, suffix: &str) -> ValueId {
    if graph.is_private_initializer(old) && graph.consumers(old).len() == 1 {
        graph.set_initializer(old, tensor);
        return old;
    }
    graph.add_initializer(&format!("{}_{suffix}", graph.value(old).name), tensor)
}
