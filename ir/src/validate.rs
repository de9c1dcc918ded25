//! Validation of the IR: the rules of ONNX that a graph must keep for the group analysis and the
//! passes to read it safely (naga's `valid`: validate, then trust).
//!
//! The reader runs [`validate`] on every model it lifts (on the recorded shapes, and again on the
//! shapes inference adds), and the pass driver runs it after every pass in debug builds and
//! tests, so a pass that leaves a model the reader would refuse is caught at that pass, by name.
//! The rules concern the graph only: recorded element types, and the attributes and constant
//! inputs of the ops whose structure the analysis relies on (Conv, MatMul, Gemm, Reshape,
//! Concat, elementwise broadcasting, Gather, Split, If, Cast). What only a `ModelProto` shows
//! (IR version, opset imports, function calls, attribute encodings) stays in the frontend.
//!
//! Each rule only fires on what the model states (recorded shapes, constants, attributes):
//! nothing is guessed, so a valid model is never refused for lack of information.

use crate::groups::constant_tensor;
use crate::proto;
use crate::{DType, Graph, OpId, ValueId};

/// A rule of ONNX that a graph breaks. The messages are stable: the reader's refusals (and the
/// hostile corpus that tests them) quote them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValidateError {
    /// A value records an element type code that the schema does not define.
    #[error("value `{value}` has unknown element type code {code}")]
    UnknownElementType {
        /// The value.
        value: String,
        /// The recorded code.
        code: i32,
    },
    /// A node breaks a rule of its op.
    #[error("node `{node}` ({op_type}) {what}")]
    Op {
        /// The node's name.
        node: String,
        /// Its op type.
        op_type: String,
        /// The rule it breaks.
        rule: OpRule,
        /// What is wrong, as a phrase that follows the node.
        what: String,
    },
}

/// The op rules [`validate`] checks, one per op family (named in [`ValidateError::Op`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpRule {
    /// Every node has an op type.
    OpType,
    /// Conv: groups, kernel, strides, dilations, pads, weight rank and channels.
    Conv,
    /// Gather: axis in range, constant indices inside the axis.
    Gather,
    /// Split: axis in range, sizes match the outputs and sum to the axis.
    Split,
    /// If: both branches, with as many outputs as the node.
    If,
    /// Cast: a known target element type.
    Cast,
    /// Reshape: a valid constant target that keeps the element count.
    Reshape,
    /// MatMul: operand ranks, inner and batch sizes, output rank.
    MatMul,
    /// Gemm: 2-D operands, inner sizes, C broadcasts to the result.
    Gemm,
    /// Concat: one rank, equal sizes off the axis.
    Concat,
    /// Elementwise ops: numpy broadcasting.
    Broadcast,
}

/// Checks the graph against every rule of this module; the first broken one is the error.
pub fn validate(graph: &Graph) -> Result<(), ValidateError> {
    validate_value_types(graph)?;
    validate_ops(graph)
}

/// Recorded element types of the main graph's values are codes the schema defines (0, unset,
/// is allowed: exporters write it for values of unknown type).
pub fn validate_value_types(graph: &Graph) -> Result<(), ValidateError> {
    for id in graph.value_ids() {
        let value = graph.value(id);
        let Some(ty) = value.info.as_ref().and_then(|i| i.r#type.as_ref()).and_then(|t| t.value.as_ref()) else { continue };
        let code = match ty {
            proto::type_proto::Value::TensorType(t) => t.elem_type,
            proto::type_proto::Value::SparseTensorType(t) => t.elem_type,
            _ => None,
        };
        if let Some(code) = code.filter(|&c| c != 0 && DType(c).known().is_none()) {
            return Err(ValidateError::UnknownElementType { value: value.name.clone(), code });
        }
    }
    Ok(())
}

/// The ops whose attributes and constant inputs the group analysis and the passes rely on
/// state a structure that can exist (recorded element types are [`validate_value_types`]'s).
pub fn validate_ops(graph: &Graph) -> Result<(), ValidateError> {
    for id in graph.op_ids() {
        let op = graph.op(id);
        let invalid =
            |rule: OpRule| move |what: String| ValidateError::Op { node: op.name.clone(), op_type: op.op_type.clone(), rule, what };
        if op.op_type.is_empty() {
            return Err(invalid(OpRule::OpType)("has no op_type".into()));
        }
        if !matches!(op.domain.as_str(), "" | "ai.onnx") {
            continue;
        }
        match op.op_type.as_str() {
            "Conv" => check_conv(graph, id).map_err(invalid(OpRule::Conv))?,
            "Gather" => check_gather(graph, id).map_err(invalid(OpRule::Gather))?,
            "Split" => check_split(graph, id).map_err(invalid(OpRule::Split))?,
            "If" => check_if(graph, id).map_err(invalid(OpRule::If))?,
            "Cast" => {
                if let Some(to) = op.attr_int("to")
                    && i32::try_from(to).ok().and_then(|t| DType(t).known()).is_none()
                {
                    return Err(invalid(OpRule::Cast)(format!("casts to unknown element type code {to}")));
                }
            }
            "Reshape" => check_reshape(graph, id).map_err(invalid(OpRule::Reshape))?,
            "MatMul" => check_matmul(graph, id).map_err(invalid(OpRule::MatMul))?,
            "Gemm" => check_gemm(graph, id).map_err(invalid(OpRule::Gemm))?,
            "Concat" => check_concat(graph, id).map_err(invalid(OpRule::Concat))?,
            "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Mod" | "Where" | "Max" | "Min" | "Sum" | "Mean" | "Equal" | "Less" | "LessOrEqual"
            | "Greater" | "GreaterOrEqual" | "And" | "Or" | "Xor" | "BitwiseAnd" | "BitwiseOr" | "BitwiseXor" => {
                check_broadcast(graph, id).map_err(invalid(OpRule::Broadcast))?
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
    let branch = |name: &str| op.attr_graph(name).ok_or_else(|| format!("has no {name} graph"));
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
