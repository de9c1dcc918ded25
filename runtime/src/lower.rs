//! The model as tract is given it when it refuses the model as written.
//!
//! tract cannot run everything ONNX Runtime runs. Where the gap is in tract and not in the model,
//! prunec gives tract its own copy of the model, made runnable by rewrites that compute the same
//! function: shape arithmetic folded at the feed's sizes (tract evaluates shape-derived integers
//! as symbolic sizes, which some of its ops cannot take: dynamo's position ids are a `CumSum` of a
//! mask computed from the sequence length, "TDim is not a number"), and ops lowered into ones it
//! runs, one row of [`LOWERINGS`] each. Both models of a comparison go through the same copy, so
//! verification still compares like with like; the user's model is never changed by this.

use crate::tract::Feed;
use prunec_ir::{DType, Graph, Model, Op, OpId, Tensor, Value, ValueId, ValueKind};

/// Integer tensors up to this size are folded for a feed: a mask or position ids per token of a
/// long sequence, not a weight.
const FEED_FOLD_ELEMENTS: usize = 1 << 16;

const F16: DType = DType(prunec_ir::proto::tensor_proto::DataType::Float16 as i32);

/// An op tract cannot run, and how to write it with ops it runs. The function returns `None`
/// (and leaves the graph as it was) when the op is outside what the lowering covers.
struct Lowering {
    domain: &'static str,
    op_type: &'static str,
    lower: fn(&mut Graph, OpId) -> Option<()>,
}

/// Every lowering, by op. The `com.microsoft` ops are ONNX Runtime's contrib ops, which tract
/// does not know; ONNX Runtime's quantisation tool writes them in QOperator models.
const LOWERINGS: &[Lowering] = &[
    // tract 0.23.9 multiplies a float16 Gemm's C by an f32 beta, so the sum comes out f32.
    Lowering { domain: "", op_type: "Gemm", lower: float16_gemm_bias_as_add },
    Lowering { domain: "com.microsoft", op_type: "QGemm", lower: qgemm_as_float_gemm },
    Lowering { domain: "com.microsoft", op_type: "QLinearAdd", lower: |graph, op| elementwise_in_float(graph, op, "Add", 2) },
    Lowering { domain: "com.microsoft", op_type: "QLinearMul", lower: |graph, op| elementwise_in_float(graph, op, "Mul", 2) },
    Lowering {
        domain: "com.microsoft",
        op_type: "QLinearGlobalAveragePool",
        lower: |graph, op| {
            // Channels-last input would need transposes; the exporters write NCHW.
            (graph.op(op).attr_int("channels_last").unwrap_or(0) == 0).then_some(())?;
            elementwise_in_float(graph, op, "GlobalAveragePool", 1)
        },
    },
];

/// A copy of `model` that tract may run where it refused `model` itself: its inputs given the
/// feed's sizes (and the recorded symbolic sizes named like theirs), its shape arithmetic folded
/// at those sizes, and the ops of [`LOWERINGS`] lowered. `None` if nothing changed. Weights are
/// shared with `model`, not copied.
pub(crate) fn for_tract(model: &Model, feed: &Feed) -> Option<Model> {
    let mut copy = model.clone();
    let sizes = feed.0.iter().map(|(n, t)| (n.clone(), t.shape().iter().map(|&d| d as u64).collect())).collect();
    copy.graph.bind_input_sizes(&sizes);
    let folded = prunec_passes::fold_shape_arithmetic(&mut copy, FEED_FOLD_ELEMENTS).ok()?.ops_removed;
    let mut lowered = 0;
    for op in copy.graph.op_ids().collect::<Vec<_>>() {
        let node = copy.graph.op(op);
        let domain = if node.domain == "ai.onnx" { "" } else { node.domain.as_str() };
        let Some(row) = LOWERINGS.iter().find(|l| l.domain == domain && l.op_type == node.op_type) else { continue };
        if (row.lower)(&mut copy.graph, op).is_some() {
            lowered += 1;
        }
    }
    (folded + lowered > 0).then_some(copy)
}

/// `Gemm(A, B, C)` in float16 as `Add(Gemm(A, B), beta·C)`.
fn float16_gemm_bias_as_add(graph: &mut Graph, op: OpId) -> Option<()> {
    let ins = graph.op_inputs(op);
    let (Some(a), Some(b), Some(c)) = (ins.first().copied().flatten(), ins.get(1).copied().flatten(), ins.get(2).copied().flatten()) else {
        return None;
    };
    (graph.value(a).dtype == Some(F16)).then_some(())?;
    let y = graph.op_output(op, 0)?;
    let mut gemm = graph.remove_op(op);
    let beta = gemm.attr_float("beta").unwrap_or(1.0);
    gemm.remove_attr("beta");
    let name = gemm.name.clone();
    let product = fresh_value(graph, &name, "product", Some(F16));
    graph.add_op(gemm, &[Some(a), Some(b)], &[Some(product)]).ok()?;
    let bias = if beta == 1.0 {
        c
    } else {
        let beta = graph.add_initializer(&format!("{name}_beta"), float16_scalar(&format!("{name}_beta"), beta));
        add(graph, "Mul", &name, "scaled_bias", &[c, beta], Some(F16))?
    };
    add_into(graph, "Add", &format!("{name}_bias"), &[product, bias], y)
}

/// `QGemm(A, a_scale, a_zero, B, b_scale, b_zero, C, y_scale, y_zero)` as the float Gemm of the
/// dequantised operands (C, an int32 bias at scale `a_scale·b_scale`, dequantised by hand), then
/// `QuantizeLinear` where it has an output scale.
fn qgemm_as_float_gemm(graph: &mut Graph, op: OpId) -> Option<()> {
    let ins = graph.op_inputs(op);
    let at = |slot: usize| ins.get(slot).copied().flatten();
    let (a, a_scale, b, b_scale) = (at(0)?, at(1)?, at(3)?, at(4)?);
    let y = graph.op_output(op, 0)?;
    let qgemm = graph.remove_op(op);
    let name = qgemm.name.clone();
    let trans_b = qgemm.attr_int("transB").unwrap_or(0);
    let float_a = dequantize(graph, &name, "a", a, a_scale, at(2), None)?;
    // A per-channel B scale runs along N: B's rows when transposed, its columns otherwise.
    let per_channel = graph.value(b_scale).shape.as_ref().is_some_and(|s| s.rank() == 1 && s.numel() != Some(1));
    let b_axis = per_channel.then_some(if trans_b != 0 { 0 } else { 1 });
    let float_b = dequantize(graph, &name, "b", b, b_scale, at(5), b_axis)?;
    let mut inputs = vec![Some(float_a), Some(float_b)];
    if let Some(c) = at(6) {
        let scale = add(graph, "Mul", &name, "bias_scale", &[a_scale, b_scale], Some(DType::F32))?;
        let cast = add(graph, "Cast", &name, "bias_float", &[c], Some(DType::F32))?;
        set_int(graph, cast, "to", DType::F32.0 as i64);
        inputs.push(Some(add(graph, "Mul", &name, "bias", &[cast, scale], Some(DType::F32))?));
    }
    let mut gemm = Op::new("Gemm", &format!("{name}_float"));
    for key in ["transA", "transB"] {
        if let Some(v) = qgemm.attr_int(key) {
            gemm.set_attr_int(key, v);
        }
    }
    if let Some(alpha) = qgemm.attr_float("alpha") {
        gemm.set_attr_float("alpha", alpha);
    }
    match at(7) {
        Some(y_scale) => {
            let float_y = fresh_value(graph, &name, "float", Some(DType::F32));
            graph.add_op(gemm, &inputs, &[Some(float_y)]).ok()?;
            let quantize = Op::new("QuantizeLinear", &format!("{name}_quantize"));
            graph.add_op(quantize, &[Some(float_y), Some(y_scale), at(8)], &[Some(y)]).ok()?;
        }
        None => {
            graph.add_op(gemm, &inputs, &[Some(y)]).ok()?;
        }
    }
    Some(())
}

/// A QLinear elementwise op or pool of `arity` quantised operands (each `x, scale, zero`,
/// then the output's `scale, zero`) as `QuantizeLinear(float_op(DequantizeLinear(x)...))`.
fn elementwise_in_float(graph: &mut Graph, op: OpId, float_op: &str, arity: usize) -> Option<()> {
    let ins = graph.op_inputs(op);
    let at = |slot: usize| ins.get(slot).copied().flatten();
    let (y_scale, y_zero) = (at(3 * arity)?, at(3 * arity + 1));
    let y = graph.op_output(op, 0)?;
    let name = graph.op(op).name.clone();
    // Check every operand before changing anything.
    let operands: Vec<(ValueId, ValueId, Option<ValueId>)> =
        (0..arity).map(|k| Some((at(3 * k)?, at(3 * k + 1)?, at(3 * k + 2)))).collect::<Option<_>>()?;
    graph.remove_op(op);
    let mut floats = Vec::new();
    for (k, (x, scale, zero)) in operands.into_iter().enumerate() {
        floats.push(dequantize(graph, &name, &format!("in{k}"), x, scale, zero, None)?);
    }
    let float_y = add(graph, float_op, &name, "float", &floats, Some(DType::F32))?;
    graph.add_op(Op::new("QuantizeLinear", &format!("{name}_quantize")), &[Some(float_y), Some(y_scale), y_zero], &[Some(y)]).ok()?;
    Some(())
}

/// `DequantizeLinear(x, scale, zero)`, per `axis` when given.
fn dequantize(
    graph: &mut Graph,
    name: &str,
    what: &str,
    x: ValueId,
    scale: ValueId,
    zero: Option<ValueId>,
    axis: Option<i64>,
) -> Option<ValueId> {
    let out = fresh_value(graph, name, &format!("{what}_float"), Some(DType::F32));
    let mut op = Op::new("DequantizeLinear", &format!("{name}_{what}_dequantize"));
    if let Some(axis) = axis {
        op.set_attr_int("axis", axis);
    }
    graph.add_op(op, &[Some(x), Some(scale), zero], &[Some(out)]).ok()?;
    Some(out)
}

/// Adds `op_type(inputs)` as a new value named after `name` and `what`.
fn add(graph: &mut Graph, op_type: &str, name: &str, what: &str, inputs: &[ValueId], dtype: Option<DType>) -> Option<ValueId> {
    let out = fresh_value(graph, name, what, dtype);
    add_into(graph, op_type, &format!("{name}_{what}"), inputs, out)?;
    Some(out)
}

/// Adds `op_type(inputs)` writing the existing value `out`.
fn add_into(graph: &mut Graph, op_type: &str, op_name: &str, inputs: &[ValueId], out: ValueId) -> Option<()> {
    let ins: Vec<Option<ValueId>> = inputs.iter().copied().map(Some).collect();
    graph.add_op(Op::new(op_type, op_name), &ins, &[Some(out)]).ok()?;
    Some(())
}

/// Sets an int attribute on the op producing `value`.
fn set_int(graph: &mut Graph, value: ValueId, key: &str, v: i64) {
    if let Some((op, _)) = graph.producer(value) {
        graph.op_mut(op).set_attr_int(key, v);
    }
}

/// A new produced value named after `name` and `what`, with a suffix if that name is taken.
fn fresh_value(graph: &mut Graph, name: &str, what: &str, dtype: Option<DType>) -> ValueId {
    let base = format!("{name}_{what}_for_tract");
    let unique = std::iter::once(base.clone()).chain((2..).map(|i| format!("{base}_{i}"))).find(|n| graph.value_by_name(n).is_none());
    let mut value = Value::new(unique.expect("some suffix is free"), ValueKind::Produced);
    value.dtype = dtype;
    graph.add_value(value).expect("the name is free")
}

/// A float16 scalar tensor.
fn float16_scalar(name: &str, v: f32) -> Tensor {
    Tensor::from_raw(name, F16, &[], tract_onnx::prelude::f16::from_f32(v).to_bits().to_le_bytes().to_vec())
}
