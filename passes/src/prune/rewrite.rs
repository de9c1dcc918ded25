//! The rewrite: removes channels from weights, value shapes and the constants and attributes
//! that spell out sizes (Reshape and Expand shapes, Split sizes, Slice bounds, Resize sizes,
//! depthwise `group`, recurrent `hidden_size`).
//!
//! [`plan_edits`] works out every change without touching the graph, so a group whose removal
//! cannot be written (a shape computed at run time, a strided slice) is known before anything
//! changes; [`apply`] then performs it.

use prunec_ir::{Graph, Group, OpId, Tensor, ValueId, ValueKind, constant_tensor};
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

/// A tensor axis: `(value, axis, use)`, the use being the reading op for a constant (constants
/// are sliced per use) and `None` for a computed value.
pub(crate) type AxisKey = (ValueId, usize, Option<OpId>);

/// Indices to remove along tensor axes.
#[derive(Clone, Debug, Default)]
pub struct Removal {
    pub(crate) axes: BTreeMap<AxisKey, BTreeSet<usize>>,
}

impl Removal {
    /// Adds the removal of `channels` (group order) of `group`.
    pub fn add(&mut self, group: &Group, channels: &[usize]) {
        for ga in &group.axes {
            let set = self.axes.entry((ga.value, ga.axis, ga.user)).or_default();
            for &c in channels {
                set.extend(ga.indices[c].iter().copied());
            }
        }
    }

    fn removed(&self, key: AxisKey) -> usize {
        self.axes.get(&key).map_or(0, BTreeSet::len)
    }
}

/// Why a removal cannot be written.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{op_type} `{node}` {why}")]
pub struct RewriteError {
    /// The node that cannot be updated.
    pub node: String,
    /// Its op type.
    pub op_type: String,
    /// What stands in the way.
    pub why: String,
}

/// One change to an op besides the weights it reads.
#[derive(Clone, Debug)]
pub(crate) enum Edit {
    /// Input `slot` reads a new constant.
    Input { op: OpId, slot: usize, tensor: Tensor },
    /// An integer attribute gets a new value.
    Int { op: OpId, name: &'static str, value: i64 },
    /// An integer-list attribute gets a new value.
    Ints { op: OpId, name: &'static str, values: Vec<i64> },
    /// An attribute goes away.
    Drop { op: OpId, name: &'static str },
}

/// Works out the edits of the ops whose tensors change size, without changing anything.
pub(crate) fn plan_edits(graph: &Graph, removal: &Removal, opset: i64) -> Result<Vec<Edit>, RewriteError> {
    let changed: BTreeSet<ValueId> = removal.axes.iter().filter(|(k, set)| k.2.is_none() && !set.is_empty()).map(|(k, _)| k.0).collect();
    let mut ops: BTreeSet<OpId> = BTreeSet::new();
    for &v in &changed {
        ops.extend(graph.producer(v).map(|(op, _)| op));
        ops.extend(graph.consumers(v).into_iter().map(|(op, _)| op));
    }
    let mut edits = Vec::new();
    for op in ops {
        edits.extend(op_edits(graph, removal, op, opset)?);
    }
    Ok(edits)
}

/// Size of a computed value's axis before and after the removal.
fn sizes(graph: &Graph, removal: &Removal, v: ValueId, axis: usize) -> Option<(u64, u64)> {
    let old = graph.value(v).shape.as_ref()?.0.get(axis)?.known()?;
    Some((old, old - removal.removed((v, axis, None)) as u64))
}

fn op_edits(graph: &Graph, removal: &Removal, op_id: OpId, opset: i64) -> Result<Vec<Edit>, RewriteError> {
    let op = graph.op(op_id);
    let fail = |why: String| RewriteError { node: op.name.clone(), op_type: op.op_type.clone(), why };
    let input = |slot| graph.op_input(op_id, slot);
    let output = |slot| graph.op_output(op_id, slot);
    let rank = |v: Option<ValueId>| v.and_then(|v| graph.value(v).shape.as_ref().map(|s| s.rank())).unwrap_or(0);
    // Axes of a computed value whose size changes: (axis, old, new).
    let changes = |v: Option<ValueId>| -> Vec<(usize, u64, u64)> {
        let Some(v) = v else { return Vec::new() };
        (0..rank(Some(v))).filter_map(|a| sizes(graph, removal, v, a).filter(|(o, n)| o != n).map(|(o, n)| (a, o, n))).collect()
    };
    let const_ints = |slot| input(slot).and_then(|v| constant_tensor(graph, v)).and_then(|t| t.to_i64_vec().map(|ints| (t.clone(), ints)));
    let mut edits = Vec::new();
    if !op.domain.is_empty() && op.domain != "ai.onnx" {
        // The coupling table has no rule for other domains, so their tensors never change size;
        // one that does would have no rule here either.
        return Err(fail(format!("is an op of domain `{}`, which has no rewrite rule", op.domain)));
    }
    match op.op_type.as_str() {
        "Reshape" => {
            let out_changes = changes(output(0));
            if out_changes.is_empty() {
                return Ok(edits);
            }
            let Some((t, mut shape)) = const_ints(1) else { return Err(fail("computes its target shape at run time".into())) };
            let x = input(0);
            for (a, _, new) in out_changes {
                match shape.get(a).copied() {
                    Some(-1) => {}
                    Some(0) if x.and_then(|x| sizes(graph, removal, x, a)).map(|s| s.1) == Some(new) => {}
                    Some(_) => shape[a] = new as i64,
                    None => return Err(fail(format!("has a target shape of rank {} for an output of higher rank", shape.len()))),
                }
            }
            edits.push(Edit::Input { op: op_id, slot: 1, tensor: int_tensor_like(&t, &shape) });
        }
        "Expand" => {
            let out_changes = changes(output(0));
            if out_changes.is_empty() {
                return Ok(edits);
            }
            let Some((t, mut shape)) = const_ints(1) else { return Err(fail("computes its target shape at run time".into())) };
            let r = rank(output(0));
            for (a, _, new) in out_changes {
                if let Some(i) = (a + shape.len()).checked_sub(r)
                    && shape[i] != 1
                {
                    shape[i] = new as i64;
                }
            }
            edits.push(Edit::Input { op: op_id, slot: 1, tensor: int_tensor_like(&t, &shape) });
        }
        "Split" => {
            let Some(x) = input(0) else { return Ok(edits) };
            let axis = normalize(op.attr_int("axis").unwrap_or(0), rank(Some(x)));
            if changes(Some(x)).iter().all(|c| Some(c.0) != axis) {
                return Ok(edits);
            }
            let axis = axis.ok_or_else(|| fail("has an invalid axis".into()))?;
            let outputs: Vec<ValueId> = graph.op_outputs(op_id).into_iter().flatten().collect();
            let new_sizes: Vec<i64> = outputs
                .iter()
                .map(|&o| sizes(graph, removal, o, axis).map(|s| s.1 as i64))
                .collect::<Option<_>>()
                .ok_or_else(|| fail("splits into parts of unknown size".into()))?;
            if input(1).is_some() {
                let Some((t, _)) = const_ints(1) else { return Err(fail("computes its split sizes at run time".into())) };
                edits.push(Edit::Input { op: op_id, slot: 1, tensor: int_tensor_like(&t, &new_sizes) });
            } else if op.attr_ints("split").is_some() || opset < 13 {
                edits.push(Edit::Ints { op: op_id, name: "split", values: new_sizes });
            } else if new_sizes.windows(2).any(|w| w[0] != w[1]) {
                let sizes = Tensor::from_i64(&format!("{}_split", op.name), &[new_sizes.len() as u64], &new_sizes);
                edits.push(Edit::Input { op: op_id, slot: 1, tensor: sizes });
                edits.push(Edit::Drop { op: op_id, name: "num_outputs" });
            }
        }
        "Slice" => {
            let (Some(x), Some(y)) = (input(0), output(0)) else { return Ok(edits) };
            let touched: BTreeSet<usize> = changes(Some(x)).iter().chain(&changes(Some(y))).map(|c| c.0).collect();
            if touched.is_empty() {
                return Ok(edits);
            }
            let r = rank(Some(x));
            let legacy = opset < 10;
            let ints =
                |slot: usize, attr: &str| if legacy { op.attr_ints(attr).map(<[i64]>::to_vec) } else { const_ints(slot).map(|c| c.1) };
            let (Some(mut starts), Some(mut ends)) = (ints(1, "starts"), ints(2, "ends")) else {
                return Err(fail("has slice bounds that are not constant".into()));
            };
            let axes: Vec<usize> = match ints(3, "axes") {
                Some(a) => a.iter().map(|&a| normalize(a, r)).collect::<Option<_>>().ok_or_else(|| fail("has an invalid axis".into()))?,
                None => (0..starts.len()).collect(),
            };
            let steps = if legacy { vec![1; starts.len()] } else { const_ints(4).map_or(vec![1; starts.len()], |c| c.1) };
            if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
                return Err(fail("has starts, ends, axes and steps of different lengths".into()));
            }
            for a in touched {
                let i = axes.iter().position(|&s| s == a);
                let Some(i) = i else { continue };
                if steps[i] != 1 {
                    return Err(fail(format!("slices axis {a} with step {}", steps[i])));
                }
                let (Some((n, _)), Some((_, new_len))) = (sizes(graph, removal, x, a), sizes(graph, removal, y, a)) else {
                    return Err(fail(format!("slices axis {a} of unknown size")));
                };
                let start = if starts[i] < 0 { starts[i] + n as i64 } else { starts[i] }.clamp(0, n as i64) as usize;
                let removed_before = removal.axes.get(&(x, a, None)).map_or(0, |s| s.range(..start).count());
                let new_start = (start - removed_before) as i64;
                starts[i] = new_start;
                ends[i] = new_start + new_len as i64;
            }
            if legacy {
                edits.push(Edit::Ints { op: op_id, name: "starts", values: starts });
                edits.push(Edit::Ints { op: op_id, name: "ends", values: ends });
            } else {
                let (t_starts, _) = const_ints(1).expect("checked above");
                let (t_ends, _) = const_ints(2).expect("checked above");
                edits.push(Edit::Input { op: op_id, slot: 1, tensor: int_tensor_like(&t_starts, &starts) });
                edits.push(Edit::Input { op: op_id, slot: 2, tensor: int_tensor_like(&t_ends, &ends) });
            }
        }
        "Resize" | "Upsample" if input(3).is_some() => {
            let out_changes = changes(output(0));
            if out_changes.is_empty() {
                return Ok(edits);
            }
            let Some((t, mut target)) = const_ints(3) else { return Err(fail("computes its output sizes at run time".into())) };
            for (a, _, new) in out_changes {
                if let Some(s) = target.get_mut(a) {
                    *s = new as i64;
                }
            }
            edits.push(Edit::Input { op: op_id, slot: 3, tensor: int_tensor_like(&t, &target) });
        }
        "Conv" | "ConvTranspose" | "ConvInteger" | "QLinearConv" => {
            let group = op.attr_int("group").unwrap_or(1);
            let Some(x) = input(0) else { return Ok(edits) };
            if group > 1
                && let Some((old, new)) = sizes(graph, removal, x, 1)
                && old != new
            {
                // Depthwise: one channel per group. Grouped: whole groups of `old / group` go.
                let per_group = old / group as u64;
                if (old - new) % per_group != 0 {
                    return Err(fail(format!("would lose part of a group ({group} groups of {per_group} channels)")));
                }
                edits.push(Edit::Int { op: op_id, name: "group", value: (new / per_group) as i64 });
            }
        }
        "LSTM" | "GRU" | "RNN" => {
            let (Some(r), Some(hidden)) = (input(2), op.attr_int("hidden_size")) else { return Ok(edits) };
            let removed = removal.removed((r, 2, Some(op_id)));
            if removed > 0 {
                edits.push(Edit::Int { op: op_id, name: "hidden_size", value: hidden - removed as i64 });
            }
        }
        other if NO_EDIT.binary_search(&other).is_ok() => {}
        _ => return Err(fail("has no rewrite rule for its op type, so its tensors cannot change size".into())),
    }
    Ok(edits)
}

/// The op types whose attributes and constant inputs spell out no channel count, so a change of
/// their tensors' sizes needs no edit: elementwise ops, pooling, normalisations with per-channel
/// parameters (sliced as weights), reductions and layout ops whose attributes name axes, not
/// sizes, and the ops that carry weights whose sizes are the weights' own. Sorted (a test
/// checks); an op type neither here nor in [`op_edits`]'s rules is refused, never passed over.
/// `Resize` and `Upsample` are here for their scale form (input 3 absent), which scales each
/// axis by a ratio; their `sizes` form has a rule.
const NO_EDIT: &[&str] = &[
    "Abs",
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Ceil",
    "Clip",
    "Concat",
    "Constant",
    "Cos",
    "DequantizeLinear",
    "Div",
    "Dropout",
    "Einsum",
    "Elu",
    "Equal",
    "Erf",
    "Exp",
    "Flatten",
    "Floor",
    "Gather",
    "Gelu",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Greater",
    "GroupNormalization",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "InstanceNormalization",
    "IsNaN",
    "LayerNormalization",
    "LeakyRelu",
    "Less",
    "Log",
    "MatMul",
    "MatMulInteger",
    "Max",
    "MaxPool",
    "Min",
    "Mish",
    "Mul",
    "Neg",
    "Not",
    "PRelu",
    "Pad",
    "Pow",
    "QLinearMatMul",
    "QuantizeLinear",
    "Reciprocal",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSum",
    "Relu",
    "Resize",
    "Round",
    "Selu",
    "Shape",
    "Sigmoid",
    "Sign",
    "Sin",
    "Softmax",
    "Softplus",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Tanh",
    "Transpose",
    "Unsqueeze",
    "Upsample",
    "Where",
];

/// The op types [`op_edits`] has an edit rule for.
#[cfg(test)]
const EDITED: &[&str] = &[
    "Conv",
    "ConvInteger",
    "ConvTranspose",
    "Expand",
    "GRU",
    "LSTM",
    "QLinearConv",
    "RNN",
    "Reshape",
    "Resize",
    "Slice",
    "Split",
    "Upsample",
];

fn normalize(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

/// A 1-D integer constant of the same element type as `like`.
fn int_tensor_like(like: &Tensor, values: &[i64]) -> Tensor {
    let width = like.dtype().bit_width().unwrap_or(64) as usize / 8;
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes().into_iter().take(width)).collect();
    like.with_data(&[values.len() as u64], data)
}

/// What [`apply`] changed.
#[derive(Clone, Debug, Default)]
pub(crate) struct Applied {
    /// Weights sliced (per use).
    pub weights_sliced: usize,
    /// Weights that had to be copied because their uses lost different channels.
    pub weights_copied: usize,
    /// Values whose shape changed.
    pub values_resized: usize,
    /// Shape constants and attributes rewritten.
    pub edits: usize,
}

/// Removes the channels: slices every constant at every use, resizes the computed values and
/// applies the planned edits. Nothing is changed if the removal cannot be written.
pub(crate) fn apply(graph: &mut Graph, removal: &Removal, opset: i64) -> Result<Applied, RewriteError> {
    let edits = plan_edits(graph, removal, opset)?;
    let mut applied = Applied { edits: edits.len(), ..Applied::default() };

    // Constants: what each use needs removed, by axis.
    type Spec = BTreeMap<usize, Vec<usize>>;
    let mut per_constant: BTreeMap<ValueId, BTreeMap<OpId, Spec>> = BTreeMap::new();
    for (&(v, axis, user), set) in &removal.axes {
        if let Some(op) = user
            && !set.is_empty()
        {
            per_constant.entry(v).or_default().entry(op).or_default().insert(axis, set.iter().copied().collect());
        }
    }
    // Decide where each sliced tensor goes, slice them all in parallel, then place them.
    enum Place {
        Initializer,
        ConstantNode(OpId),
        Use(OpId),
    }
    let mut jobs: Vec<(ValueId, Place, Tensor, Spec)> = Vec::new();
    for (v, uses) in per_constant {
        let Some(original) = constant_tensor(graph, v).cloned() else { continue };
        let readers: BTreeSet<OpId> = graph.consumers(v).into_iter().map(|(op, _)| op).collect();
        let first = uses.values().next().expect("at least one use").clone();
        let in_place = readers.iter().all(|op| uses.get(op) == Some(&first)) && !graph.is_output(v) && !graph.inputs.contains(&v);
        let producer = graph.producer(v).map(|(op, _)| op);
        match (&graph.value(v).kind, producer) {
            (ValueKind::Initializer(_), _) if in_place => jobs.push((v, Place::Initializer, original, first)),
            (ValueKind::Produced, Some(op)) if in_place && graph.op(op).op_type == "Constant" => {
                jobs.push((v, Place::ConstantNode(op), original, first))
            }
            _ => jobs.extend(uses.into_iter().map(|(op, spec)| (v, Place::Use(op), original.clone(), spec))),
        }
    }
    let sliced: Vec<Result<Tensor, String>> = jobs
        .par_iter()
        .map(|(_, _, t, spec)| {
            spec.iter().try_fold(t.clone(), |t, (&axis, removed)| t.remove_indices(axis, removed)).map_err(|e| e.to_string())
        })
        .collect();
    for ((v, place, _, _), t) in jobs.into_iter().zip(sliced) {
        let t = t.map_err(|why| RewriteError { node: graph.value(v).name.clone(), op_type: "weight".into(), why })?;
        applied.weights_sliced += 1;
        match place {
            Place::Initializer => graph.set_initializer(v, t),
            Place::ConstantNode(op) => {
                let dims = t.dims();
                if let Some(attr) = graph.op_mut(op).attributes.iter_mut().find(|a| a.name() == "value") {
                    attr.tensor = Some(t);
                }
                graph.value_mut(v).set_dims(&dims);
            }
            Place::Use(op) => {
                let new = graph.add_initializer(&format!("{}_{}", graph.value(v).name, graph.op(op).name), t);
                graph.replace_input(op, v, new);
                applied.weights_copied += 1;
            }
        }
    }

    for (&(v, axis, user), set) in &removal.axes {
        if user.is_none() && !set.is_empty() {
            let Some((_, new)) = sizes(graph, removal, v, axis) else { continue };
            graph.value_mut(v).set_dim(axis, new);
            applied.values_resized += 1;
        }
    }

    // A constant whose every reader gets the same new value is changed where it is, keeping
    // its name; otherwise each reader gets its own copy.
    let mut new_values: BTreeMap<ValueId, Vec<&Tensor>> = BTreeMap::new();
    for edit in &edits {
        if let Edit::Input { op, slot, tensor } = edit
            && let Some(v) = graph.op_input(*op, *slot)
        {
            new_values.entry(v).or_default().push(tensor);
        }
    }
    let in_place: BTreeSet<ValueId> = new_values
        .into_iter()
        .filter(|(v, tensors)| {
            graph.is_private_initializer(*v)
                && graph.consumers(*v).len() == tensors.len()
                && tensors.iter().all(|t| t.dims() == tensors[0].dims() && t.packed() == tensors[0].packed())
        })
        .map(|(v, _)| v)
        .collect();
    for edit in edits {
        match edit {
            Edit::Input { op, slot, tensor } => {
                if let Some(v) = graph.op_input(op, slot).filter(|v| in_place.contains(v)) {
                    graph.set_initializer(v, tensor);
                    continue;
                }
                let base =
                    graph.op_input(op, slot).map_or_else(|| format!("{}_input{slot}", graph.op(op).name), |v| graph.value(v).name.clone());
                let new = graph.add_initializer(&format!("{base}_{}", graph.op(op).name), tensor);
                graph.set_op_input(op, slot, new);
            }
            Edit::Int { op, name, value } => graph.op_mut(op).set_attr_int(name, value),
            Edit::Ints { op, name, values } => graph.op_mut(op).set_attr_ints(name, &values),
            Edit::Drop { op, name } => graph.op_mut(op).remove_attr(name),
        }
    }
    Ok(applied)
}

/// Zeroes, in a model that keeps all its channels, what the consumers read of the removed
/// channels: the reference of masking equivalence. Consumers are found by node and weight name,
/// so the report of a pruning run masks a fresh copy of the model it pruned.
pub fn mask_consumers(graph: &mut Graph, slices: &[super::MaskedSlice]) -> Result<(), RewriteError> {
    let mut per_use: BTreeMap<(&str, &str), BTreeMap<usize, BTreeSet<usize>>> = BTreeMap::new();
    for s in slices {
        per_use.entry((&s.node, &s.weight)).or_default().entry(s.axis).or_default().extend(&s.indices);
    }
    for ((node, weight), axes) in per_use {
        let fail = |why: &str| RewriteError { node: node.to_string(), op_type: "consumer".into(), why: why.into() };
        let v = graph.value_by_name(weight).ok_or_else(|| fail("reads a weight that is not in the model"))?;
        // Node names need not be unique, nor set (many exporters leave them empty): the reader
        // of this weight with that name first, then any node of that name.
        let op = graph
            .consumers(v)
            .into_iter()
            .map(|(op, _)| op)
            .find(|&op| graph.op(op).name == node)
            .or_else(|| graph.op_ids().find(|&op| graph.op(op).name == node))
            .ok_or_else(|| fail("is not in the model"))?;
        let mut masked = constant_tensor(graph, v).ok_or_else(|| fail("reads a weight that is not constant"))?.clone();
        for (axis, indices) in axes {
            masked = masked.zero_indices(axis, &indices.into_iter().collect::<Vec<_>>()).map_err(|e| fail(&e.to_string()))?;
        }
        let new = graph.add_initializer(&format!("{weight}_masked"), masked);
        graph.replace_input(op, v, new);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_no_edit_list_is_sorted_and_disjoint_from_the_rules() {
        assert!(NO_EDIT.windows(2).all(|w| w[0] < w[1]), "NO_EDIT is not sorted");
        let both: Vec<&&str> = NO_EDIT.iter().filter(|o| EDITED.contains(o) && !matches!(**o, "Resize" | "Upsample")).collect();
        assert!(both.is_empty(), "in both lists: {both:?}");
    }

    #[test]
    fn every_op_of_the_coupling_table_has_a_rewrite_answer() {
        // An op with a coupling rule can see its tensors change size; the rewrite must say what
        // that means for it (an edit, or none) rather than fall through.
        let missing: Vec<&str> = prunec_ir::coupled_op_types().filter(|o| !NO_EDIT.contains(o) && !EDITED.contains(o)).collect();
        assert!(missing.is_empty(), "ops with a coupling rule but no rewrite answer: {missing:?}");
    }
}
