//! Rules of ONNX that the reader enforces beyond what decoding and building the graph check, on
//! what only the protobuf shows: the model header, opset imports, model-local function calls,
//! attribute encodings and sparse initializers. The rules of the graph itself (recorded element
//! types, the structure of the ops the passes rely on) are the IR's [`prunec_ir::validate`],
//! which the reader runs after lifting and the pass driver after every pass.
//!
//! Each rule only fires on what the model states: nothing is guessed, so a valid model is never
//! refused for lack of information.

use crate::ReadError;
use prunec_ir::proto::{self, attribute_proto::AttributeType};
use prunec_ir::{DType, Tensor};

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
