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
    let rank = |v: Option<ValueId>| v.and_then(|v| known_rank(graph, v));
    let (Some(ra), Some(rb)) = (rank(graph.op_input(id, 0)), rank(graph.op_input(id, 1))) else { return Ok(()) };
    if ra == 0 || rb == 0 {
        return Err(format!("multiplies operands of ranks {ra} and {rb}; MatMul takes no scalars"));
    }
    let expected = match (ra, rb) {
        (1, 1) => 0,
        (1, r) | (r, 1) => r - 1,
        (a, b) => a.max(b),
    };
    if let Some(ry) = rank(graph.op_output(id, 0))
        && ry != expected
    {
        return Err(format!("records an output of rank {ry}, but operands of ranks {ra} and {rb} give rank {expected}"));
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

/// A Reshape to a constant shape keeps the element count of an input whose shape is recorded.
fn check_reshape(graph: &Graph, id: OpId) -> Result<(), String> {
    let op = graph.op(id);
    if op.attr_int("allowzero").unwrap_or(0) != 0 {
        return Ok(());
    }
    let input = graph.op_input(id, 0).and_then(|x| known_dims(graph, x));
    let target = graph.op_input(id, 1).and_then(|s| constant_tensor(graph, s)?.to_i64_vec());
    let (Some(input), Some(target)) = (input, target) else { return Ok(()) };
    let numel = input.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
    let mut known = 1u64;
    let mut inferred = 0;
    for (i, &t) in target.iter().enumerate() {
        let d = match t {
            -1 => {
                inferred += 1;
                continue;
            }
            0 => input.get(i).copied(),
            t if t > 0 => Some(t as u64),
            _ => None,
        };
        match d.and_then(|d| known.checked_mul(d)) {
            Some(k) => known = k,
            None => return Err(format!("reshapes to {target:?}, which is not a valid shape")),
        }
    }
    let fits = match (numel, inferred) {
        (Some(n), 0) => n == known,
        (Some(n), 1) => known != 0 && n % known == 0,
        _ => false,
    };
    if !fits {
        return Err(format!("reshapes an input of shape {input:?} to {target:?}: the element counts differ"));
    }
    Ok(())
}
