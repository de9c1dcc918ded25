//! Bodies written into the graph that holds them: the taken branch of an `If` whose condition
//! is known, and the body of a model-local function in place of each call.
//!
//! Both are ops kept as protobuf (a branch is a `GraphProto` in an attribute, a function a
//! `FunctionProto` of the model's shell) whose names are their own: what a body defines gets a
//! name free in the graph (its own where that is free, as exporters make them unique), what it
//! reads from outside is resolved where it is written, and the subgraphs nested in it read the
//! renamed values too.

use prunec_ir::{Attribute, Graph, NodeMeta, Op, OpId, Tensor, Value, ValueId, ValueKind, captured_names, proto};
use std::collections::{BTreeMap, BTreeSet};

/// Replaces `op` (an `If`) by the ops of `branch`, one of its branches: what read the If's
/// outputs reads the branch's. `None` for a branch the IR cannot hold (sparse initializers,
/// inputs, a name defined twice, an attribute it cannot lift) or one that does not match the
/// op's outputs; the graph may then be half changed, and the caller keeps its own copy.
pub(super) fn inline_branch(graph: &mut Graph, op: OpId, branch: &proto::GraphProto) -> Option<()> {
    let outputs = graph.op_outputs(op);
    if !branch.sparse_initializer.is_empty() || !branch.input.is_empty() || branch.output.len() != outputs.len() {
        return None;
    }
    let defined = branch.initializer.iter().map(|t| t.name().to_string()).chain(branch.node.iter().flat_map(|n| n.output.clone()));
    let renames = free_names(graph, defined.filter(|n| !n.is_empty()));
    // Everything the branch reads from outside must be there before anything changes.
    let outside = captured_names(branch);
    if outside.iter().any(|n| graph.value_by_name(n).is_none()) {
        return None;
    }
    let records: BTreeMap<&str, &proto::TypeProto> =
        branch.value_info.iter().chain(&branch.output).filter_map(|i| Some((i.name(), i.r#type.as_ref()?))).collect();
    let tensors: Vec<(String, Tensor)> = branch
        .initializer
        .iter()
        .map(|t| Some((renames.get(t.name())?.clone(), Tensor::from_proto(t.clone()).ok()?)))
        .collect::<Option<_>>()?;
    graph.remove_op(op);
    for (name, tensor) in tensors {
        graph.add_initializer(&name, tensor);
    }
    add_body(graph, &branch.node, &renames, &records, &BTreeMap::new(), None)?;
    for (slot, out) in outputs.into_iter().enumerate() {
        let Some(out) = out else { continue };
        let from = resolve(graph, &renames, branch.output[slot].name())?;
        // The branch's result keeps its name where the If's readers find it; the op is named
        // after it too (value names are unique, an unnamed If's are not).
        let op_name = graph.value(out).name.clone();
        graph.add_op(Op::new("Identity", &op_name), &[Some(from)], &[Some(out)]).ok()?;
    }
    Some(())
}

/// Replaces `op`, a call of `function`, by the function's body: formal inputs read the call's
/// inputs, formal outputs write its outputs, attribute references take the call's attributes
/// (or the function's defaults). `None` for a call the body does not fit (more inputs or
/// outputs than the function declares, a body reading what it does not define); the graph may
/// then be half changed, and the caller keeps its own copy.
pub(super) fn inline_call(graph: &mut Graph, op: OpId, function: &proto::FunctionProto) -> Option<()> {
    let (inputs, outputs) = (graph.op_inputs(op), graph.op_outputs(op));
    if inputs.len() > function.input.len() || outputs.len() > function.output.len() {
        return None;
    }
    let call = graph.op(op).clone();
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for (formal, actual) in function.input.iter().zip(inputs.iter().map(Some).chain(std::iter::repeat(None))) {
        // An omitted optional input stays omitted in the body: ONNX's empty name.
        let actual = actual.copied().flatten().map(|v| graph.value(v).name.clone()).unwrap_or_default();
        names.insert(formal.clone(), actual);
    }
    let mut unwritten = Vec::new();
    for (k, formal) in function.output.iter().enumerate() {
        match outputs.get(k).copied().flatten() {
            Some(v) => {
                names.insert(formal.clone(), graph.value(v).name.clone());
            }
            None => unwritten.push(formal.clone()),
        }
    }
    // What the body computes for itself is named after the call, so the copy reads as a trace.
    let prefix = if call.name.is_empty() { call.op_type.clone() } else { call.name.clone() };
    let internal: Vec<String> =
        function.node.iter().flat_map(|n| n.output.clone()).filter(|n| !n.is_empty() && !names.contains_key(n)).collect();
    let mut taken = BTreeSet::new();
    for formal in internal.into_iter().chain(unwritten) {
        if let std::collections::btree_map::Entry::Vacant(entry) = names.entry(formal) {
            let free = free_name(graph, &mut taken, &format!("{prefix}/{}", entry.key()));
            entry.insert(free);
        }
    }
    // Every output the call writes must be computed by a node (not a formal input passed on).
    let produced: BTreeSet<&str> = function.node.iter().flat_map(|n| n.output.iter().map(String::as_str)).collect();
    if function.output.iter().zip(&outputs).any(|(formal, actual)| actual.is_some() && !produced.contains(formal.as_str())) {
        return None;
    }
    // A body reads nothing but its inputs and what it computes: functions have no outer scope.
    let read = function.node.iter().flat_map(|n| n.input.iter()).filter(|n| !n.is_empty());
    if read.clone().any(|n| !names.contains_key(n)) {
        return None;
    }
    let defaults: BTreeMap<&str, &proto::AttributeProto> = function.attribute_proto.iter().map(|a| (a.name(), a)).collect();
    let nodes: Vec<proto::NodeProto> = function
        .node
        .iter()
        .map(|n| {
            let mut n = n.clone();
            n.attribute = n.attribute.into_iter().filter_map(|a| resolve_reference(a, &call, &defaults)).collect();
            n
        })
        .collect();
    graph.remove_op(op);
    let outputs_by_name: BTreeMap<String, ValueId> =
        outputs.iter().flatten().map(|&v| (graph.value(v).name.clone(), v)).collect::<BTreeMap<_, _>>();
    add_body(graph, &nodes, &names, &BTreeMap::new(), &outputs_by_name, Some(&prefix))
}

/// An attribute of a function's body node with its reference (`ref_attr_name`) to the call's
/// attributes resolved: the call's value, else the function's default, else none at all (the
/// attribute was optional and the call left it out).
fn resolve_reference(
    a: proto::AttributeProto,
    call: &Op,
    defaults: &BTreeMap<&str, &proto::AttributeProto>,
) -> Option<proto::AttributeProto> {
    let Some(reference) = a.ref_attr_name.as_deref() else { return Some(a) };
    let given = call.attr(reference).map(Attribute::to_proto).or_else(|| defaults.get(reference).map(|d| (*d).clone()))?;
    Some(proto::AttributeProto { name: a.name.clone(), doc_string: a.doc_string.clone(), ref_attr_name: None, ..given })
}

/// For each name a body defines, a name free in `graph` (and among the others): its own if free,
/// else with a numbered suffix.
fn free_names(graph: &Graph, defined: impl Iterator<Item = String>) -> BTreeMap<String, String> {
    let mut taken = BTreeSet::new();
    let mut renames = BTreeMap::new();
    for name in defined {
        if let std::collections::btree_map::Entry::Vacant(entry) = renames.entry(name) {
            let free = free_name(graph, &mut taken, entry.key());
            entry.insert(free);
        }
    }
    renames
}

/// `base`, or `base_inlined_2`, `base_inlined_3`…: the first that neither `graph` nor `taken`
/// holds, which it is then added to.
fn free_name(graph: &Graph, taken: &mut BTreeSet<String>, base: &str) -> String {
    let free = std::iter::once(base.to_string())
        .chain((2..).map(|i| format!("{base}_inlined_{i}")))
        .find(|n| graph.value_by_name(n).is_none() && !taken.contains(n))
        .expect("some suffix is free");
    taken.insert(free.clone());
    free
}

/// The value a body's name stands for: renamed if the body defines it, else the enclosing
/// scope's value of that name.
fn resolve(graph: &Graph, renames: &BTreeMap<String, String>, name: &str) -> Option<ValueId> {
    graph.value_by_name(renames.get(name).map_or(name, String::as_str))
}

/// Adds `nodes` to `graph` with the body's names mapped by `renames`; a mapped name in `into` is
/// an existing value the body writes (a call's outputs), every other output a new value typed
/// by `records` where the body recorded it. Ops are named `{prefix}/{name}` where a prefix is
/// given, and made unique among the graph's: tract refuses two nodes of one name, and a body
/// written twice brings its names twice.
fn add_body(
    graph: &mut Graph,
    nodes: &[proto::NodeProto],
    renames: &BTreeMap<String, String>,
    records: &BTreeMap<&str, &proto::TypeProto>,
    into: &BTreeMap<String, ValueId>,
    prefix: Option<&str>,
) -> Option<()> {
    let mut op_names: BTreeSet<String> = graph.op_ids().map(|op| graph.op(op).name.clone()).collect();
    // Outputs first: the body's nodes need not be in order.
    let mut pending = Vec::with_capacity(nodes.len());
    for node in nodes {
        let mut outs = Vec::with_capacity(node.output.len());
        for o in &node.output {
            if o.is_empty() {
                outs.push(None);
                continue;
            }
            let name = renames.get(o).cloned().unwrap_or_else(|| o.clone());
            let id = match into.get(&name) {
                Some(&v) => v,
                None => {
                    let mut value = Value::new(name, ValueKind::Produced);
                    value.dtype = records.get(o.as_str()).and_then(|t| element_type(t));
                    graph.add_value(value).ok()?
                }
            };
            outs.push(Some(id));
        }
        pending.push((node, outs));
    }
    for (node, outs) in pending {
        // A name mapped to nothing is an optional input the call left out.
        let omitted = |i: &String| i.is_empty() || renames.get(i).is_some_and(String::is_empty);
        let ins: Vec<Option<ValueId>> =
            node.input.iter().map(|i| if omitted(i) { Some(None) } else { resolve(graph, renames, i).map(Some) }).collect::<Option<_>>()?;
        let mut attributes = Vec::with_capacity(node.attribute.len());
        for a in &node.attribute {
            let mut a = a.clone();
            for sub in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                rename_free(sub, renames);
            }
            attributes.push(Attribute::from_proto(a).ok()?);
        }
        let base = match (prefix, node.name.as_deref().unwrap_or_default()) {
            (Some(prefix), "") => format!("{prefix}/{}", node.op_type()),
            (Some(prefix), name) => format!("{prefix}/{name}"),
            (None, name) => name.to_string(),
        };
        let name = if base.is_empty() {
            base
        } else {
            let free = std::iter::once(base.clone()).chain((2..).map(|i| format!("{base}_{i}"))).find(|n| !op_names.contains(n));
            let free = free.expect("some suffix is free");
            op_names.insert(free.clone());
            free
        };
        let op = Op {
            name,
            op_type: node.op_type.clone().unwrap_or_default(),
            domain: node.domain.clone().unwrap_or_default(),
            attributes,
            meta: NodeMeta { has_name: node.name.is_some(), has_domain: node.domain.is_some(), ..Default::default() },
            seq: u64::MAX,
        };
        let captured: BTreeSet<String> = op.subgraphs().flat_map(captured_names).collect();
        let id = graph.add_op(op, &ins, &outs).ok()?;
        for name in captured {
            let v = graph.value_by_name(&name)?;
            graph.add_capture(id, v);
        }
    }
    Some(())
}

/// Renames, in a subgraph and the subgraphs it holds, every name it reads from outside that
/// `renames` maps: what it defines itself shadows the enclosing scope's names.
fn rename_free(graph: &mut proto::GraphProto, renames: &BTreeMap<String, String>) {
    let local: BTreeSet<&str> = graph
        .input
        .iter()
        .map(|i| i.name())
        .chain(graph.initializer.iter().map(|t| t.name()))
        .chain(graph.node.iter().flat_map(|n| n.output.iter().map(String::as_str)))
        .collect();
    let active: BTreeMap<String, String> =
        renames.iter().filter(|(k, v)| !local.contains(k.as_str()) && k != v).map(|(k, v)| (k.clone(), v.clone())).collect();
    if active.is_empty() {
        return;
    }
    for node in &mut graph.node {
        for input in &mut node.input {
            if let Some(new) = active.get(input.as_str()) {
                *input = new.clone();
            }
        }
        for a in &mut node.attribute {
            for sub in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                rename_free(sub, &active);
            }
        }
    }
    for out in &mut graph.output {
        if let Some(new) = active.get(out.name()) {
            out.name = Some(new.clone());
        }
    }
}

/// The element type a recorded tensor type names.
fn element_type(ty: &proto::TypeProto) -> Option<prunec_ir::DType> {
    match ty.value.as_ref()? {
        proto::type_proto::Value::TensorType(t) => t.elem_type.map(prunec_ir::DType),
        _ => None,
    }
}
