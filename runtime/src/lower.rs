//! The model as tract is given it when it refuses the model as written.
//!
//! tract cannot run everything ONNX Runtime runs. Where the gap is in tract and not in the model,
//! prunec gives tract its own copy of the model, made runnable by rewrites that compute the same
//! function on this feed: shape arithmetic folded at the feed's sizes (tract evaluates
//! shape-derived integers as symbolic sizes, which some of its ops cannot take: dynamo's position
//! ids are a `CumSum` of a mask computed from the sequence length, "TDim is not a number");
//! model-local functions expanded (`inline`); control flow decided by the feed written out: the
//! small integer inputs an `If` decides on bound to their fed values, and each `If` whose
//! condition is then known replaced by its taken branch, folding again to a fixpoint, since
//! tract analyses both branches of an `If` and refuses one whose branches disagree (silero VAD's
//! squeeze-if-one-sized branches differ in rank); sequences of a known length written as their
//! tensors (`sequences`); and ops lowered into ones it runs, one row of [`LOWERINGS`] each. Both
//! models of a comparison go through the same copy, so verification still compares like with
//! like; the user's model is never changed by this.

mod inline;
mod sequences;
mod shapes;

use crate::tract::{Feed, TractTensor};
use prunec_ir::{DType, Graph, Model, Op, OpId, Tensor, Value, ValueId, ValueKind};
use std::path::Path;

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

/// Rounds of folding and inlining at most: each round inlines every `If` it can decide, so
/// this bounds the nesting depth followed, not the number of `If`s.
const MAX_ROUNDS: usize = 32;

/// Graph inputs of at most this many elements may be bound to their fed values when an `If`
/// decides on them: a sample rate or a flag, not data.
const CONTROL_INPUT_ELEMENTS: usize = 8;

/// tract's copy of a model (see the module's documentation).
pub(crate) struct ForTract {
    /// The copy.
    pub model: Model,
    /// The graph inputs that are constants in the copy, bound to the values of the feed it was
    /// made for: a plan of the copy computes the model only where they are fed those values.
    pub bound: Vec<String>,
}

/// A copy of `model` that tract may run where it refused `model` itself: its inputs given the
/// feed's sizes (and the recorded symbolic sizes named like theirs), model-local functions
/// expanded, its shape arithmetic folded at those sizes, the `If`s decided by the feed inlined,
/// sequences of known length lowered and the ops of [`LOWERINGS`] lowered. `None` if nothing
/// changed. Weights are shared with `model`, not copied; `dir` is where its external data is.
pub(crate) fn for_tract(model: &Model, dir: &Path, feed: &Feed) -> Option<ForTract> {
    let mut copy = model.clone();
    let sizes = feed.0.iter().map(|(n, t)| (n.clone(), t.shape().iter().map(|&d| d as u64).collect())).collect();
    copy.graph.bind_input_sizes(&sizes);
    let mut changed = expand_functions(&mut copy) + densify_sparse_initializers(&mut copy.graph);
    let mut bound = Vec::new();
    changed += decide_control_flow(&mut copy, dir, feed, &mut bound)?;
    let mut lowered = 0;
    for op in copy.graph.op_ids().collect::<Vec<_>>() {
        let node = copy.graph.op(op);
        let domain = if node.domain == "ai.onnx" { "" } else { node.domain.as_str() };
        let Some(row) = LOWERINGS.iter().find(|l| l.domain == domain && l.op_type == node.op_type) else { continue };
        if (row.lower)(&mut copy.graph, op).is_some() {
            lowered += 1;
        }
    }
    (changed + lowered > 0).then_some(ForTract { model: copy, bound })
}

/// Folds shape arithmetic, lowers sequences, binds the inputs `If`s decide on and inlines every
/// `If` whose condition is known, round after round until nothing changes: an inlined branch
/// brings the `If`s nested in it, decided by sizes of values the branch computes. Where an `If`
/// stays undecided, tract's analysis gives the shapes at the feed's sizes once more (the reader's
/// are at open sizes, and inlined values have none). How many ops changed; `None` if the graph
/// stopped being one the folder can order.
fn decide_control_flow(copy: &mut Model, dir: &Path, feed: &Feed, bound: &mut Vec<String>) -> Option<usize> {
    let opset = default_opset(copy);
    let mut changed = 0;
    let mut shapes_fresh = false;
    for _ in 0..MAX_ROUNDS {
        changed += prunec_passes::fold_shape_arithmetic(copy, FEED_FOLD_ELEMENTS).ok()?.ops_removed;
        changed += sequences::lower_sequences(&mut copy.graph, opset);
        if bind_control_inputs(&mut copy.graph, feed, bound) > 0 {
            changed += 1;
            continue;
        }
        let ifs: Vec<OpId> = copy.graph.op_ids().filter(|&op| is_default(copy.graph.op(op), "If")).collect();
        if ifs.is_empty() {
            return Some(changed);
        }
        let known = prunec_passes::known_integers(&copy.graph, FEED_FOLD_ELEMENTS).ok()?;
        let mut inlined = 0;
        for op in ifs {
            let Some(cond) = copy.graph.op_input(op, 0) else { continue };
            let value = known.get(&cond).map(|k| k.data.clone()).or_else(|| copy.graph.value(cond).initializer()?.to_i64_vec());
            let Some(&[taken]) = value.as_deref() else { continue };
            let branch = if taken != 0 { "then_branch" } else { "else_branch" };
            let Some(body) = copy.graph.op(op).attr_graph(branch).cloned() else { continue };
            // A branch the IR cannot hold leaves the If as it was (weights are shared, so the
            // graph is cheap to keep).
            let before = copy.graph.clone();
            match inline::inline_branch(&mut copy.graph, op, &body) {
                Some(()) => inlined += 1,
                None => copy.graph = before,
            }
        }
        changed += inlined;
        if inlined > 0 {
            shapes_fresh = false;
        } else if shapes_fresh {
            // Undecided at the feed's sizes: data decides them, and tract gets them as they are.
            return Some(changed);
        } else {
            shapes::refresh(copy, dir, feed);
            shapes_fresh = true;
        }
    }
    // Out of rounds: what the last inlining brought is folded still.
    changed += prunec_passes::fold_shape_arithmetic(copy, FEED_FOLD_ELEMENTS).ok()?.ops_removed;
    Some(changed)
}

/// Binds, as constants of their fed values, the small integer and boolean graph inputs that an
/// `If`'s condition is computed from (silero VAD's sample rate selects its 8 and 16 kHz
/// branches); how many. The copy has to compute the model's function on this feed only, and on
/// it these inputs are these numbers; a plan of the copy refuses a feed that gives them others
/// (`Plan::run`). Inputs that decide nothing stay inputs: the copy stays as general as it can.
fn bind_control_inputs(graph: &mut Graph, feed: &Feed, bound: &mut Vec<String>) -> usize {
    let mut stack: Vec<ValueId> =
        graph.op_ids().filter(|&op| is_default(graph.op(op), "If")).filter_map(|op| graph.op_input(op, 0)).collect();
    let mut seen = std::collections::HashSet::new();
    let mut deciding = Vec::new();
    while let Some(v) = stack.pop() {
        if !seen.insert(v) {
            continue;
        }
        match graph.producer(v) {
            Some((op, _)) => {
                stack.extend(graph.op_inputs(op).into_iter().flatten());
                stack.extend(graph.op_captures(op));
            }
            None if graph.value(v).kind == ValueKind::Input => deciding.push(v),
            None => {}
        }
    }
    let mut count = 0;
    for v in deciding {
        let name = graph.value(v).name.clone();
        let Some(tensor) = feed.0.get(&name).and_then(|t| control_constant(&name, t)) else { continue };
        let value = graph.value_mut(v);
        value.shape = Some(prunec_ir::Shape::known(&tensor.dims()));
        value.kind = ValueKind::Initializer(tensor);
        graph.inputs.retain(|&i| i != v);
        graph.initializers.push(v);
        bound.push(name);
        count += 1;
    }
    count
}

/// A fed value as an IR constant, if it is small and of an integer or boolean type.
fn control_constant(name: &str, t: &TractTensor) -> Option<Tensor> {
    use prunec_ir::proto::tensor_proto::DataType as T;
    use tract_onnx::prelude::DatumType;
    if t.len() > CONTROL_INPUT_ELEMENTS {
        return None;
    }
    let dims: Vec<u64> = t.shape().iter().map(|&d| d as u64).collect();
    let plain = t.try_as_plain_ram().ok()?;
    Some(match t.datum_type() {
        DatumType::I64 => Tensor::from_i64(name, &dims, plain.as_slice::<i64>().ok()?),
        DatumType::I32 => {
            let bytes = plain.as_slice::<i32>().ok()?.iter().flat_map(|v| v.to_le_bytes()).collect();
            Tensor::from_raw(name, DType(T::Int32 as i32), &dims, bytes)
        }
        DatumType::Bool => {
            let bytes = plain.as_slice::<bool>().ok()?.iter().map(|&b| u8::from(b)).collect();
            Tensor::from_raw(name, DType(T::Bool as i32), &dims, bytes)
        }
        _ => return None,
    })
}

/// Writes every sparse initializer as the dense tensor it stands for (tract takes a sparse
/// initializer for an input without a type); how many. One whose indices do not fit its dims
/// stays sparse.
fn densify_sparse_initializers(graph: &mut Graph) -> usize {
    let mut count = 0;
    for v in graph.sparse_initializers.clone() {
        let ValueKind::SparseInitializer(sparse) = &graph.value(v).kind else { continue };
        let Some(dense) = dense_of(sparse) else { continue };
        let value = graph.value_mut(v);
        value.shape = Some(prunec_ir::Shape::known(&dense.dims()));
        value.kind = ValueKind::Initializer(dense.renamed(&value.name));
        graph.sparse_initializers.retain(|&s| s != v);
        graph.initializers.push(v);
        count += 1;
    }
    count
}

/// The dense tensor of a sparse one: zeros but at the indices, which are linear (`[NNZ]`) or
/// coordinates (`[NNZ, rank]`).
fn dense_of(sparse: &prunec_ir::proto::SparseTensorProto) -> Option<Tensor> {
    let values = Tensor::from_proto(sparse.values.clone()?).ok()?;
    let indices = Tensor::from_proto(sparse.indices.clone()?).ok()?;
    let dims: Vec<u64> = sparse.dims.iter().map(|&d| u64::try_from(d).ok()).collect::<Option<_>>()?;
    let numel = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d))?;
    let packed = values.packed()?;
    let nnz = values.numel() as usize;
    let width = packed.len().checked_div(nnz).unwrap_or(0);
    let flat: Vec<i64> = indices.to_i64_vec()?;
    let linear: Vec<u64> = match indices.dims().as_slice() {
        [n] if *n as usize == nnz => flat.iter().map(|&i| u64::try_from(i).ok()).collect::<Option<_>>()?,
        [n, r] if *n as usize == nnz && *r as usize == dims.len() => flat
            .chunks(dims.len().max(1))
            .map(|c| c.iter().zip(&dims).try_fold(0u64, |at, (&i, &d)| Some(at * d + u64::try_from(i).ok().filter(|&i| i < d)?)))
            .collect::<Option<_>>()?,
        _ => return None,
    };
    let mut bytes = vec![0u8; usize::try_from(numel).ok()?.checked_mul(width)?];
    for (k, &at) in linear.iter().enumerate() {
        let at = usize::try_from(at).ok().filter(|&a| (a as u64) < numel)? * width;
        bytes[at..at + width].copy_from_slice(&packed[k * width..(k + 1) * width]);
    }
    Some(Tensor::from_raw(values.name(), values.dtype(), &dims, bytes))
}

/// Expands every call of a model-local function (tract reads none of them) into the function's
/// body, nested calls included; how many calls. A call whose body cannot be written into the
/// graph (its opsets differ from the model's) stays a call.
fn expand_functions(copy: &mut Model) -> usize {
    let functions = copy.shell.functions.clone();
    let model_opsets: std::collections::BTreeMap<&str, i64> =
        copy.shell.opset_import.iter().map(|o| (normal_domain(o.domain()), o.version())).collect();
    // A body's ops are read under the model's opsets once inlined: the function must use the same.
    let fits = |f: &prunec_ir::proto::FunctionProto| {
        f.opset_import.iter().all(|o| model_opsets.get(normal_domain(o.domain())).is_none_or(|&v| v == o.version()))
    };
    let mut expanded = 0;
    // Each round expands one level of nesting; the reader refuses functions that call themselves.
    for _ in 0..MAX_ROUNDS {
        let mut round = 0;
        for op in copy.graph.op_ids().collect::<Vec<_>>() {
            let node = copy.graph.op(op);
            let called = functions.iter().find(|f| {
                f.name() == node.op_type
                    && normal_domain(f.domain()) == normal_domain(&node.domain)
                    && f.overload.as_deref().unwrap_or("") == node.meta.overload.as_deref().unwrap_or("")
            });
            let Some(function) = called.filter(|f| fits(f)) else { continue };
            let before = copy.graph.clone();
            match inline::inline_call(&mut copy.graph, op, function) {
                Some(()) => round += 1,
                None => copy.graph = before,
            }
        }
        expanded += round;
        if round == 0 {
            break;
        }
    }
    expanded
}

fn normal_domain(domain: &str) -> &str {
    if domain == "ai.onnx" { "" } else { domain }
}

fn is_default(op: &Op, op_type: &str) -> bool {
    normal_domain(&op.domain).is_empty() && op.op_type == op_type
}

/// The model's version of the default ONNX domain.
fn default_opset(model: &Model) -> i64 {
    model.shell.opset_import.iter().find(|o| normal_domain(o.domain()).is_empty()).map_or(1, |o| o.version())
}

/// An int64 constant.
fn int64_constant(name: &str, dims: &[u64], data: &[i64]) -> Tensor {
    Tensor::from_i64(name, dims, data)
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
