//! Rules of ONNX that the reader enforces beyond what decoding and building the graph check, so
//! that nothing after the frontend meets a model that contradicts itself: the model header,
//! recorded element types, attribute encodings, sparse initializers, and the attributes and
//! constant inputs of the ops whose structure the group analysis and the passes rely on.
//!
//! Each rule only fires on what the model states (recorded shapes, constants, attributes):
//! nothing is guessed, so a valid model is never refused for lack of information.

use crate::ReadError;
use prunec_ir::proto::{self, attribute_proto::AttributeType};
use prunec_ir::{DType, Graph, OpId, Tensor, ValueId, constant_tensor};

/// The newest IR version of the vendored onnx.proto (`Version::IrVersion`).
const MAX_IR_VERSION: i64 = proto::Version::IrVersion as i64;

/// A model decodes but holds none of ModelProto's fields: protobuf's wire format accepts many
/// byte strings (an image header, say) as a message of unknown fields only.
pub(crate) fn check_is_onnx(model: &proto::ModelProto) -> Result<(), ReadError> {
    let empty = model.ir_version.is_none()
        && model.graph.is_none()
        && model.opset_import.is_empty()
        && model.producer_name.is_none()
        && model.producer_version.is_none()
        && model.domain.is_none()
        && model.model_version.is_none()
        && model.doc_string.is_none()
        && model.metadata_props.is_empty()
        && model.functions.is_empty()
        && model.training_info.is_empty();
    if empty {
        return Err(ReadError::Invalid(
            "the file is not an ONNX model: it holds no field of an ONNX ModelProto (no graph, no ir_version, no opset import)".into(),
        ));
    }
    Ok(())
}

/// The IR version is stated and is one ONNX has defined.
pub(crate) fn check_ir_version(model: &proto::ModelProto) -> Result<(), ReadError> {
    match model.ir_version {
        None => Err(ReadError::Invalid("the model does not declare its ir_version, which ONNX requires".into())),
        Some(v) if !(1..=MAX_IR_VERSION).contains(&v) => {
            Err(ReadError::Invalid(format!("the model declares ir_version {v}, which does not exist (1 to {MAX_IR_VERSION})")))
        }
        Some(_) => Ok(()),
    }
}

/// Recorded element types of the main graph's values are codes the schema defines (0, unset,
/// is allowed: exporters write it for values of unknown type).
pub(crate) fn check_value_types(graph: &Graph) -> Result<(), ReadError> {
    for id in graph.value_ids() {
        let value = graph.value(id);
        let Some(ty) = value.info.as_ref().and_then(|i| i.r#type.as_ref()).and_then(|t| t.value.as_ref()) else { continue };
        let code = match ty {
            proto::type_proto::Value::TensorType(t) => t.elem_type,
            proto::type_proto::Value::SparseTensorType(t) => t.elem_type,
            _ => None,
        };
        if let Some(code) = code.filter(|&c| c != 0 && DType(c).known().is_none()) {
            return Err(ReadError::Invalid(format!("value `{}` has unknown element type code {code}", value.name)));
        }
    }
    Ok(())
}

/// A sparse initializer's values, indices and dims agree, as ONNX's checker requires: values
/// are a 1-D tensor of NNZ entries, indices are int64 `[NNZ]` (linear) or `[NNZ, rank]`
/// (coordinates), and every index lies inside `dims`.
pub(crate) fn check_sparse(s: &proto::SparseTensorProto) -> Result<(), ReadError> {
    let name = s.values.as_ref().map(|v| v.name().to_string()).unwrap_or_default();
    let bad = |what: String| ReadError::Invalid(format!("sparse tensor `{name}` {what}"));
    let values = s.values.clone().ok_or_else(|| bad("has no values".into()))?;
    let values = Tensor::from_proto(values)?;
    if values.dims().len() != 1 {
        return Err(bad(format!("has values of dims {:?}; they must be 1-D", values.dims())));
    }
    let nnz = values.numel();
    let mut dense = 1u64;
    for &d in &s.dims {
        let d = u64::try_from(d).map_err(|_| bad(format!("has a negative dimension in dims {:?}", s.dims)))?;
        dense = dense.checked_mul(d).ok_or_else(|| bad(format!("has dims {:?} whose element count overflows 64 bits", s.dims)))?;
    }
    let Some(indices) = s.indices.clone() else {
        return if nnz == 0 { Ok(()) } else { Err(bad(format!("has {nnz} values but no indices"))) };
    };
    let indices = Tensor::from_proto(indices)?;
    if indices.dtype() != DType::I64 {
        return Err(bad(format!("has indices of type {}; they must be int64", indices.dtype())));
    }
    let idims = indices.dims();
    let coords = match idims.as_slice() {
        [n] if *n == nnz => 1,
        [n, r] if *n == nnz && *r == s.dims.len() as u64 => s.dims.len(),
        _ => return Err(bad(format!("has indices of dims {idims:?} for {nnz} values and dims {:?}", s.dims))),
    };
    let list = indices.to_i64_vec().ok_or_else(|| bad("has indices that cannot be read".into()))?;
    for (k, &i) in list.iter().enumerate() {
        let bound = if coords == 1 { dense } else { s.dims[k % coords] as u64 };
        if u64::try_from(i).map_or(true, |i| i >= bound) {
            return Err(bad(format!("has index {i}, outside dims {:?}", s.dims)));
        }
    }
    Ok(())
}

/// Every attribute of every node, subgraphs included, holds at most one value, of the type it
/// declares (the rule of ONNX's checker); attributes the passes read have the schema's type.
pub(crate) fn check_attributes(nodes: &[proto::NodeProto]) -> Result<(), ReadError> {
    // An explicit stack: subgraphs nest as deep as the decoder allows, and a walk should not
    // depend on the thread's stack size.
    let mut pending = vec![nodes];
    while let Some(nodes) = pending.pop() {
        for n in nodes {
            for a in &n.attribute {
                check_attribute(n, a)?;
                pending.extend(a.g.iter().chain(&a.graphs).map(|g| g.node.as_slice()));
            }
        }
    }
    Ok(())
}

fn check_attribute(n: &proto::NodeProto, a: &proto::AttributeProto) -> Result<(), ReadError> {
    let bad = |what: String| ReadError::Invalid(format!("node `{}` ({}) has attribute `{}` {what}", n.name(), n.op_type(), a.name()));
    // A reference to an attribute of the enclosing function holds no value of its own.
    if a.ref_attr_name.is_some() {
        return Ok(());
    }
    let declared = match a.r#type {
        None => None,
        Some(code) => Some(AttributeType::try_from(code).map_err(|_| bad(format!("of unknown type code {code}")))?),
    };
    let used: Vec<AttributeType> = [
        (a.f.is_some(), AttributeType::Float),
        (a.i.is_some(), AttributeType::Int),
        (a.s.is_some(), AttributeType::String),
        (a.t.is_some(), AttributeType::Tensor),
        (a.g.is_some(), AttributeType::Graph),
        (a.sparse_tensor.is_some(), AttributeType::SparseTensor),
        (a.tp.is_some(), AttributeType::TypeProto),
        (!a.floats.is_empty(), AttributeType::Floats),
        (!a.ints.is_empty(), AttributeType::Ints),
        (!a.strings.is_empty(), AttributeType::Strings),
        (!a.tensors.is_empty(), AttributeType::Tensors),
        (!a.graphs.is_empty(), AttributeType::Graphs),
        (!a.sparse_tensors.is_empty(), AttributeType::SparseTensors),
        (!a.type_protos.is_empty(), AttributeType::TypeProtos),
    ]
    .into_iter()
    .filter_map(|(set, ty)| set.then_some(ty))
    .collect();
    let holds = match used.as_slice() {
        [] => None,
        [one] => Some(*one),
        _ => return Err(bad("holding more than one value".into())),
    };
    if let (Some(d), Some(h)) = (declared, holds)
        && d != h
    {
        return Err(bad(format!("declared {} but holding {}", d.as_str_name(), h.as_str_name())));
    }
    let default_domain = matches!(n.domain(), "" | "ai.onnx");
    if let (true, Some(required)) = (default_domain, schema_type(n.op_type(), a.name()))
        && let Some(actual) = declared.or(holds)
        && actual != required
    {
        return Err(bad(format!("of type {}, where {} is required", actual.as_str_name(), required.as_str_name())));
    }
    Ok(())
}

/// The schema's type of the default-domain attributes that prunec's analysis and passes read;
/// one of another type would be read as absent and silently replaced by its default.
fn schema_type(op_type: &str, name: &str) -> Option<AttributeType> {
    use AttributeType as T;
    Some(match name {
        "axis"
        | "group"
        | "transA"
        | "transB"
        | "allowzero"
        | "keepdims"
        | "noop_with_empty_axes"
        | "to"
        | "start"
        | "end"
        | "hidden_size"
        | "layout"
        | "fmod"
        | "training_mode"
        | "num_outputs" => T::Int,
        "kernel_shape" | "strides" | "pads" | "dilations" | "perm" | "axes" | "split" | "output_padding" | "output_shape" => T::Ints,
        "value" if matches!(op_type, "Constant" | "ConstantOfShape") => T::Tensor,
        "epsilon" | "momentum" => T::Float,
        _ => return None,
    })
}

/// The ops whose attributes and constant inputs the group analysis and the passes rely on
/// state a structure that can exist.
pub(crate) fn check_ops(graph: &Graph) -> Result<(), ReadError> {
    for id in graph.op_ids() {
        let op = graph.op(id);
        let invalid = |what: String| ReadError::Invalid(format!("node `{}` ({}) {what}", op.name, op.op_type));
        if op.op_type.is_empty() {
            return Err(invalid("has no op_type".into()));
        }
        if !matches!(op.domain.as_str(), "" | "ai.onnx") {
            continue;
        }
        match op.op_type.as_str() {
            "Conv" => check_conv(graph, id).map_err(invalid)?,
            "Gather" => check_gather(graph, id).map_err(invalid)?,
            "Split" => check_split(graph, id).map_err(invalid)?,
            "If" => check_if(graph, id).map_err(invalid)?,
            "Cast" => {
                if let Some(to) = op.attr_int("to")
                    && i32::try_from(to).ok().and_then(|t| DType(t).known()).is_none()
                {
                    return Err(invalid(format!("casts to unknown element type code {to}")));
                }
            }
            "Reshape" => check_reshape(graph, id).map_err(invalid)?,
            "MatMul" => check_matmul(graph, id).map_err(invalid)?,
            "Gemm" => check_gemm(graph, id).map_err(invalid)?,
            "Concat" => check_concat(graph, id).map_err(invalid)?,
            "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Mod" | "Where" | "Max" | "Min" | "Sum" | "Mean" | "Equal" | "Less" | "LessOrEqual"
            | "Greater" | "GreaterOrEqual" | "And" | "Or" | "Xor" | "BitwiseAnd" | "BitwiseOr" | "BitwiseXor" => {
                check_broadcast(graph, id).map_err(invalid)?
            }
            _ => {}
        }
    }
    Ok(())
}

/// The recorded (or constant) dims of a value, where every one is known.
fn known_dims(graph: &Graph, v: ValueId) -> Option<Vec<u64>> {
    if let Some(t) = constant_tensor(graph, v) {
        return Some(t.dims());
    }
    graph.value(v).shape.as_ref()?.concrete()
}

/// The rank of a value, when recorded or constant.
fn known_rank(graph: &Graph, v: ValueId) -> Option<usize> {
    if let Some(t) = constant_tensor(graph, v) {
        return Some(t.dims().len());
    }
    graph.value(v).shape.as_ref().map(|s| s.rank())
}

/// The size of one axis of a value, when recorded or constant.
fn known_dim(graph: &Graph, v: ValueId, axis: usize) -> Option<u64> {
    if let Some(t) = constant_tensor(graph, v) {
        return t.dims().get(axis).copied();
    }
    graph.value(v).shape.as_ref()?.0.get(axis)?.known()
}

fn normalize_axis(axis: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    (-r..r).contains(&axis).then(|| if axis < 0 { (axis + r) as usize } else { axis as usize })
}

fn check_conv(graph: &Graph, id: OpId) -> Result<(), String> {
    let op = graph.op(id);
    let group = op.attr_int("group").unwrap_or(1);
    if group < 1 {
        return Err(format!("has group {group}; a Conv has at least one group"));
    }
    for name in ["kernel_shape", "strides", "dilations"] {
        if let Some(v) = op.attr_ints(name).filter(|v| v.iter().any(|&d| d < 1)) {
            return Err(format!("has {name} {v:?}; every entry must be at least 1"));
        }
    }
    if let Some(pads) = op.attr_ints("pads").filter(|v| v.iter().any(|&d| d < 0)) {
        return Err(format!("has pads {pads:?}; padding cannot be negative"));
    }
    let x_rank = graph.op_input(id, 0).and_then(|x| known_rank(graph, x));
    let Some(w) = graph.op_input(id, 1) else { return Err("has no weight input".into()) };
    let w_name = &graph.value(w).name;
    if let Some(w_rank) = known_rank(graph, w) {
        if w_rank < 3 {
            return Err(format!("has a weight of rank {w_rank} (`{w_name}`); a Conv weight has rank 3 or more"));
        }
        if let Some(x_rank) = x_rank.filter(|&r| r != w_rank) {
            return Err(format!("has a weight of rank {w_rank} (`{w_name}`) for an input of rank {x_rank}"));
        }
        if let Some(k) = op.attr_ints("kernel_shape").filter(|k| k.len() != w_rank - 2) {
            return Err(format!("has kernel_shape {k:?} for a weight of rank {w_rank} (`{w_name}`)"));
        }
    }
    let g = group as u64;
    if let Some(m) = known_dim(graph, w, 0).filter(|m| m % g != 0) {
        return Err(format!("has group {group}, which does not divide the {m} output channels of weight `{w_name}`"));
    }
    let per_group = known_dim(graph, w, 1);
    let channels = graph.op_input(id, 0).and_then(|x| known_dim(graph, x, 1));
    if let (Some(per_group), Some(c)) = (per_group, channels)
        && per_group.checked_mul(g) != Some(c)
    {
        return Err(format!(
            "has group {group} and weight `{w_name}` of {per_group} input channels per group, but its input has {c} channels"
        ));
    }
    Ok(())
}

/// MatMul's output rank follows from its operands' (numpy semantics); the group analysis maps
/// axes by rank arithmetic and must not meet a recorded output rank that contradicts them.
fn check_matmul(graph: &Graph, id: OpId) -> Result<(), String> {
    let (Some(a), Some(b)) = (graph.op_input(id, 0), graph.op_input(id, 1)) else { return Ok(()) };
    let (Some(ra), Some(rb)) = (known_rank(graph, a), known_rank(graph, b)) else { return Ok(()) };
    if ra == 0 || rb == 0 {
        return Err(format!("multiplies operands of ranks {ra} and {rb}; MatMul takes no scalars"));
    }
    let expected = match (ra, rb) {
        (1, 1) => 0,
        (1, r) | (r, 1) => r - 1,
        (a, b) => a.max(b),
    };
    if let Some(ry) = graph.op_output(id, 0).and_then(|y| known_rank(graph, y))
        && ry != expected
    {
        return Err(format!("records an output of rank {ry}, but operands of ranks {ra} and {rb} give rank {expected}"));
    }
    let (k_a, k_b) = (known_dim(graph, a, ra - 1), known_dim(graph, b, if rb == 1 { 0 } else { rb - 2 }));
    if let (Some(k_a), Some(k_b)) = (k_a, k_b)
        && k_a != k_b
    {
        return Err(format!(
            "multiplies {} by {}: the inner dimensions {k_a} and {k_b} differ",
            shown_shape(graph, a),
            shown_shape(graph, b)
        ));
    }
    // The batch axes (all but the last two) broadcast against each other.
    if ra > 2 && rb > 2 {
        let batch = |v: ValueId, r: usize| (0..r - 2).map(|i| known_dim(graph, v, i)).collect::<Vec<_>>();
        broadcast_dims(&[batch(a, ra), batch(b, rb)]).map_err(|(x, y)| {
            format!("multiplies {} by {}: batch sizes {x} and {y} do not broadcast", shown_shape(graph, a), shown_shape(graph, b))
        })?;
    }
    Ok(())
}

/// A value's shape as the message shows it: its name and the dims known of it (`?` unknown).
fn shown_shape(graph: &Graph, v: ValueId) -> String {
    let name = &graph.value(v).name;
    let dims: Option<Vec<String>> = match constant_tensor(graph, v) {
        Some(t) => Some(t.dims().iter().map(u64::to_string).collect()),
        None => graph.value(v).shape.as_ref().map(|s| s.0.iter().map(|d| d.known().map_or("?".to_string(), |d| d.to_string())).collect()),
    };
    match dims {
        Some(d) => format!("`{name}` [{}]", d.join(", ")),
        None => format!("`{name}`"),
    }
}

/// Numpy broadcasting of shapes given as known-or-unknown sizes, aligned at the right: the pair
/// of sizes that cannot broadcast, if there is one. Unknown sizes agree with anything.
fn broadcast_dims(shapes: &[Vec<Option<u64>>]) -> Result<(), (u64, u64)> {
    let rank = shapes.iter().map(Vec::len).max().unwrap_or(0);
    for axis in 0..rank {
        let mut seen: Option<u64> = None;
        for s in shapes {
            let Some(&Some(d)) = (axis + s.len()).checked_sub(rank).and_then(|i| s.get(i)) else { continue };
            match seen {
                _ if d == 1 => {}
                None => seen = Some(d),
                Some(e) if e == d => {}
                Some(e) => return Err((e, d)),
            }
        }
    }
    Ok(())
}

/// The known-or-unknown sizes of a value whose rank is known.
fn maybe_dims(graph: &Graph, v: ValueId) -> Option<Vec<Option<u64>>> {
    let rank = known_rank(graph, v)?;
    Some((0..rank).map(|i| known_dim(graph, v, i)).collect())
}

/// Elementwise ops broadcast their inputs against each other (numpy's multidirectional rule).
fn check_broadcast(graph: &Graph, id: OpId) -> Result<(), String> {
    let inputs: Vec<ValueId> = graph.op_inputs(id).into_iter().flatten().collect();
    let shapes: Vec<Vec<Option<u64>>> = inputs.iter().filter_map(|&v| maybe_dims(graph, v)).collect();
    broadcast_dims(&shapes).map_err(|(a, b)| {
        let shown: Vec<String> = inputs.iter().map(|&v| shown_shape(graph, v)).collect();
        format!("has inputs {} whose sizes {a} and {b} do not broadcast", shown.join(" and "))
    })
}

/// Gemm computes `alpha·A'·B' + beta·C` of 2-D operands (A' = Aᵀ with transA, B' = Bᵀ with
/// transB): the inner sizes agree, and C broadcasts to the `[M, N]` result.
fn check_gemm(graph: &Graph, id: OpId) -> Result<(), String> {
    let op = graph.op(id);
    let (Some(a), Some(b)) = (graph.op_input(id, 0), graph.op_input(id, 1)) else { return Ok(()) };
    for v in [a, b] {
        if let Some(r) = known_rank(graph, v).filter(|&r| r != 2) {
            return Err(format!("has operand {} of rank {r}; Gemm multiplies 2-D matrices", shown_shape(graph, v)));
        }
    }
    let (trans_a, trans_b) = (op.attr_int("transA").unwrap_or(0) != 0, op.attr_int("transB").unwrap_or(0) != 0);
    let m = known_dim(graph, a, usize::from(trans_a));
    let k_a = known_dim(graph, a, usize::from(!trans_a));
    let k_b = known_dim(graph, b, usize::from(trans_b));
    let n = known_dim(graph, b, usize::from(!trans_b));
    if let (Some(k_a), Some(k_b)) = (k_a, k_b)
        && k_a != k_b
    {
        return Err(format!(
            "multiplies {} (transA={}) by {} (transB={}): the inner dimensions {k_a} and {k_b} differ",
            shown_shape(graph, a),
            u8::from(trans_a),
            shown_shape(graph, b),
            u8::from(trans_b)
        ));
    }
    if let Some(c) = graph.op_input(id, 2)
        && let Some(c_dims) = maybe_dims(graph, c)
    {
        // Unidirectional: C's sizes are 1 or the result's.
        let result = [m, n];
        let fits = c_dims.len() <= 2
            && c_dims.iter().rev().zip(result.iter().rev()).all(|(c, r)| match (c, r) {
                (Some(c), Some(r)) => *c == 1 || c == r,
                _ => true,
            });
        if !fits {
            let show = |d: Option<u64>| d.map_or("?".to_string(), |d| d.to_string());
            return Err(format!("has C {} that does not broadcast to the result [{}, {}]", shown_shape(graph, c), show(m), show(n)));
        }
    }
    Ok(())
}

/// Concat joins inputs of one rank that agree on every axis but `axis`.
fn check_concat(graph: &Graph, id: OpId) -> Result<(), String> {
    let op = graph.op(id);
    let axis = op.attr_int("axis").unwrap_or(0);
    let inputs: Vec<ValueId> = graph.op_inputs(id).into_iter().flatten().collect();
    let ranked: Vec<(ValueId, Vec<Option<u64>>)> = inputs.iter().filter_map(|&v| Some((v, maybe_dims(graph, v)?))).collect();
    let Some((first, dims)) = ranked.first() else { return Ok(()) };
    let rank = dims.len();
    if let Some((v, _)) = ranked.iter().find(|(_, d)| d.len() != rank) {
        return Err(format!("joins {} and {} of different ranks", shown_shape(graph, *first), shown_shape(graph, *v)));
    }
    let Some(a) = normalize_axis(axis, rank) else { return Err(format!("has axis {axis} for inputs of rank {rank}")) };
    for i in (0..rank).filter(|&i| i != a) {
        let mut seen: Option<(ValueId, u64)> = None;
        for (v, d) in &ranked {
            let Some(d) = d[i] else { continue };
            match seen {
                None => seen = Some((*v, d)),
                Some((_, e)) if e == d => {}
                Some((w, e)) => {
                    return Err(format!(
                        "joins {} and {} on axis {a}, but they differ on axis {i} ({e} and {d})",
                        shown_shape(graph, w),
                        shown_shape(graph, *v)
                    ));
                }
            }
        }
    }
    Ok(())
}

fn check_gather(graph: &Graph, id: OpId) -> Result<(), String> {
    let op = graph.op(id);
    let (Some(data), Some(indices)) = (graph.op_input(id, 0), graph.op_input(id, 1)) else { return Ok(()) };
    let axis = op.attr_int("axis").unwrap_or(0);
    // The output of `Shape` (whole) is as long as its input's rank: the usual source of shape
    // arithmetic, and a recorded fact even when the Shape's own output records nothing.
    let shape_of = graph.producer(data).filter(|(p, _)| {
        let p = graph.op(*p);
        p.op_type == "Shape" && p.domain.is_empty() && p.attr("start").is_none() && p.attr("end").is_none()
    });
    let (rank, size) = match shape_of {
        Some((p, _)) => (Some(1), graph.op_input(p, 0).and_then(|x| known_rank(graph, x)).map(|r| r as u64)),
        None => {
            let rank = known_rank(graph, data);
            let size = rank.and_then(|r| normalize_axis(axis, r)).and_then(|a| known_dim(graph, data, a));
            (rank, size)
        }
    };
    if let Some(rank) = rank
        && normalize_axis(axis, rank).is_none()
    {
        return Err(format!("has axis {axis} for data of rank {rank}"));
    }
    let (Some(n), Some(list)) = (size, constant_tensor(graph, indices).and_then(|t| t.to_i64_vec())) else { return Ok(()) };
    let n = i64::try_from(n).unwrap_or(i64::MAX);
    if let Some(i) = list.into_iter().find(|i| !(-n..n).contains(i)) {
        return Err(format!("reads index {i} of an axis of size {n}"));
    }
    Ok(())
}

fn check_split(graph: &Graph, id: OpId) -> Result<(), String> {
    let op = graph.op(id);
    let Some(x) = graph.op_input(id, 0) else { return Ok(()) };
    let axis = op.attr_int("axis").unwrap_or(0);
    let Some(rank) = known_rank(graph, x) else { return Ok(()) };
    let Some(a) = normalize_axis(axis, rank) else { return Err(format!("has axis {axis} for an input of rank {rank}")) };
    let sizes = match graph.op_input(id, 1) {
        Some(s) => constant_tensor(graph, s).and_then(|t| t.to_i64_vec()),
        None => op.attr_ints("split").map(<[i64]>::to_vec),
    };
    let Some(sizes) = sizes else { return Ok(()) };
    if sizes.iter().any(|&s| s < 0) {
        return Err(format!("has negative split sizes {sizes:?}"));
    }
    let outputs = graph.op_outputs(id).len();
    if sizes.len() != outputs {
        return Err(format!("has {outputs} outputs but {} split sizes {sizes:?}", sizes.len()));
    }
    let sum = sizes.iter().try_fold(0u64, |acc, &s| acc.checked_add(s as u64));
    if let Some(d) = known_dim(graph, x, a)
        && sum != Some(d)
    {
        let sum = sum.map_or("more than 2^64".to_string(), |s| s.to_string());
        return Err(format!("splits axis {a} of size {d} into sizes {sizes:?}, which sum to {sum}"));
    }
    Ok(())
}

fn check_if(graph: &Graph, id: OpId) -> Result<(), String> {
    let op = graph.op(id);
    let branch = |name: &str| op.attr(name).and_then(|a| a.proto.g.as_ref()).ok_or_else(|| format!("has no {name} graph"));
    let (then_branch, else_branch) = (branch("then_branch")?, branch("else_branch")?);
    let (t, e) = (then_branch.output.len(), else_branch.output.len());
    if t != e {
        return Err(format!("has branches with different output counts: then_branch has {t}, else_branch has {e}"));
    }
    let outputs = graph.op_outputs(id).len();
    if outputs != t {
        return Err(format!("has {outputs} outputs, but its branches have {t}"));
    }
    Ok(())
}

/// A Reshape's constant target is a shape (at most one -1, no size below -1, no 0 beside a -1
/// when zeros are literal) that keeps the element count of an input whose shape is known.
fn check_reshape(graph: &Graph, id: OpId) -> Result<(), String> {
    let op = graph.op(id);
    let allowzero = op.attr_int("allowzero").unwrap_or(0) != 0;
    let Some(target) = graph.op_input(id, 1).and_then(|s| constant_tensor(graph, s)?.to_i64_vec()) else { return Ok(()) };
    if target.iter().filter(|&&t| t == -1).count() > 1 {
        return Err(format!("reshapes to {target:?}, which has more than one -1 (at most one size can be inferred)"));
    }
    if let Some(t) = target.iter().find(|&&t| t < -1) {
        return Err(format!("reshapes to {target:?}, which holds the size {t}"));
    }
    if allowzero && target.contains(&0) && target.contains(&-1) {
        return Err(format!("reshapes to {target:?} with allowzero=1: a literal 0 leaves the -1 undetermined"));
    }
    let Some(input) = graph.op_input(id, 0).and_then(|x| known_dims(graph, x)) else { return Ok(()) };
    let numel = input.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
    let mut known = 1u64;
    let mut inferred = false;
    for (i, &t) in target.iter().enumerate() {
        let d = match t {
            -1 => {
                inferred = true;
                continue;
            }
            0 if !allowzero => input.get(i).copied(),
            t => Some(t as u64),
        };
        match d.and_then(|d| known.checked_mul(d)) {
            Some(k) => known = k,
            None => return Err(format!("reshapes an input of shape {input:?} to {target:?}, which is not a valid shape")),
        }
    }
    let fits = match (numel, inferred) {
        (Some(n), false) => n == known,
        (Some(n), true) => known != 0 && n % known == 0,
        (None, _) => false,
    };
    if !fits {
        return Err(format!("reshapes an input of shape {input:?} to {target:?}: the element counts differ"));
    }
    Ok(())
}

/// The newest opset of the default domain in the vendored onnx.proto's release (ONNX 1.23).
const MAX_ONNX_OPSET: i64 = 28;

fn is_default_domain(domain: &str) -> bool {
    matches!(domain, "" | "ai.onnx")
}

/// The model imports the opsets its nodes use, in versions that exist. IR version 3 made
/// `opset_import` mandatory; a node of a domain the model does not import has no defined meaning
/// (ONNX's checker: "No opset import for domain"). Model-local functions are called in their own
/// domain, which is accepted whether it is imported or not.
pub(crate) fn check_opsets(model: &proto::ModelProto, graph: &proto::GraphProto) -> Result<(), ReadError> {
    for o in &model.opset_import {
        let domain = o.domain.as_deref().unwrap_or("");
        let version = o.version.unwrap_or(0);
        if is_default_domain(domain) && !(1..=MAX_ONNX_OPSET).contains(&version) {
            return Err(ReadError::Invalid(format!(
                "the model imports opset {version} of the default ONNX domain, which does not exist (1 to {MAX_ONNX_OPSET})"
            )));
        }
    }
    let ir_version = model.ir_version.unwrap_or(0);
    if ir_version < 3 {
        return Ok(());
    }
    if model.opset_import.is_empty() {
        return Err(ReadError::Invalid(format!(
            "the model has no opset_import, which ONNX requires since IR version 3 (it declares ir_version {ir_version})"
        )));
    }
    let imported = |domain: &str| {
        model.opset_import.iter().any(|o| {
            let d = o.domain.as_deref().unwrap_or("");
            d == domain || (is_default_domain(d) && is_default_domain(domain))
        })
    };
    let local = |domain: &str| model.functions.iter().any(|f| f.domain() == domain);
    let mut pending = vec![graph.node.as_slice()];
    while let Some(nodes) = pending.pop() {
        for n in nodes {
            let domain = n.domain();
            if !imported(domain) && !local(domain) {
                let shown = if is_default_domain(domain) { "the default ONNX domain".to_string() } else { format!("domain `{domain}`") };
                return Err(ReadError::Invalid(format!(
                    "node `{}` ({}) is an op of {shown}, which the model's opset_import does not import",
                    n.name(),
                    n.op_type()
                )));
            }
            pending.extend(n.attribute.iter().flat_map(|a| a.g.iter().chain(&a.graphs)).map(|g| g.node.as_slice()));
        }
    }
    Ok(())
}

/// Model-local functions do not call themselves, directly or through other functions: ONNX
/// defines a call as the function's body inlined, and inlining (or inferring shapes through) a
/// recursive function never ends.
pub(crate) fn check_function_calls(model: &proto::ModelProto) -> Result<(), ReadError> {
    let functions = &model.functions;
    let identity = |f: &proto::FunctionProto| (f.domain().to_string(), f.name().to_string(), f.overload().to_string());
    let index: std::collections::HashMap<_, usize> = functions.iter().enumerate().map(|(i, f)| (identity(f), i)).collect();
    // Every function's callees, nodes of subgraphs in its body included.
    let callees: Vec<Vec<usize>> = functions
        .iter()
        .map(|f| {
            let mut out = Vec::new();
            let mut pending = vec![f.node.as_slice()];
            while let Some(nodes) = pending.pop() {
                for n in nodes {
                    let key = (n.domain().to_string(), n.op_type().to_string(), n.overload().to_string());
                    out.extend(index.get(&key).copied());
                    pending.extend(n.attribute.iter().flat_map(|a| a.g.iter().chain(&a.graphs)).map(|g| g.node.as_slice()));
                }
            }
            out.sort_unstable();
            out.dedup();
            out
        })
        .collect();
    // Depth-first search with an explicit stack (a model decides how long its call chains are);
    // a callee found on the current path closes a cycle.
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let mut mark = vec![Mark::New; functions.len()];
    for root in 0..functions.len() {
        if mark[root] != Mark::New {
            continue;
        }
        let mut path: Vec<(usize, usize)> = vec![(root, 0)];
        mark[root] = Mark::OnPath;
        while let Some(&mut (f, ref mut next)) = path.last_mut() {
            let Some(&callee) = callees[f].get(*next) else {
                mark[f] = Mark::Done;
                path.pop();
                continue;
            };
            *next += 1;
            match mark[callee] {
                Mark::Done => {}
                Mark::New => {
                    mark[callee] = Mark::OnPath;
                    path.push((callee, 0));
                }
                Mark::OnPath => {
                    let start = path.iter().position(|&(g, _)| g == callee).unwrap_or(0);
                    let name = |i: usize| {
                        let f = &functions[i];
                        if f.domain().is_empty() { format!("`{}`", f.name()) } else { format!("`{}.{}`", f.domain(), f.name()) }
                    };
                    let cycle: Vec<String> = path[start..].iter().map(|&(g, _)| name(g)).chain([name(callee)]).collect();
                    let what = if cycle.len() == 2 { "calls itself" } else { "calls itself through other functions" };
                    return Err(ReadError::Invalid(format!(
                        "model-local function {} {what}: {}; a function call is its body inlined, which would never end",
                        name(callee),
                        cycle.join(" -> ")
                    )));
                }
            }
        }
    }
    Ok(())
}
