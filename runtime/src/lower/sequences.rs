//! Sequences whose length the copy knows, as the tensors they hold: tract has no sequence type.
//!
//! A sequence built by `SequenceConstruct` (or `SequenceEmpty`, `SequenceInsert`,
//! `SequenceErase` at known positions, `SplitToSequence` of a known split) is a list of tensor
//! values; what reads one element (`SequenceAt` at a known position), the length or the whole
//! list concatenated (`ConcatFromSequence`) reads the tensors instead. The sequence ops become
//! dead and dead-code elimination removes them; a sequence read any other way (a `Loop`, a graph
//! output) keeps its ops, which tract then refuses as before.

use super::{fresh_value, int64_constant};
use prunec_ir::{Graph, Op, OpId, ValueId, ValueKind};
use std::collections::HashMap;

/// Lowers what it can of the sequences of `graph` (default-domain opset `opset`, which says
/// whether Squeeze, Unsqueeze and Split take their axes and sizes as inputs); how many ops were
/// replaced.
pub(super) fn lower_sequences(graph: &mut Graph, opset: i64) -> usize {
    let sequential = |op: OpId| {
        let o = graph.op(op);
        o.op_type.starts_with("Sequence") || o.op_type.ends_with("ToSequence") || o.op_type.ends_with("FromSequence")
    };
    if !graph.op_ids().any(sequential) {
        return 0;
    }
    let Ok(order) = graph.topo_order() else { return 0 };
    let known = prunec_passes::known_integers(graph, 64).unwrap_or_default();
    let integers = |graph: &Graph, v: Option<ValueId>| -> Option<Vec<i64>> {
        let v = v?;
        known.get(&v).map(|k| k.data.clone()).or_else(|| graph.value(v).initializer()?.to_i64_vec())
    };
    let mut lists: HashMap<ValueId, Vec<ValueId>> = HashMap::new();
    let mut lowered = 0;
    for op in order {
        let node = graph.op(op);
        if !(node.domain.is_empty() || node.domain == "ai.onnx") {
            continue;
        }
        let op_type = node.op_type.clone();
        let ins = graph.op_inputs(op);
        let at = |slot: usize| ins.get(slot).copied().flatten();
        let Some(out) = graph.op_output(op, 0) else { continue };
        let list = at(0).and_then(|s| lists.get(&s).cloned());
        // A position into a list of `len` (`len` itself allowed for an insertion), negative
        // counting from the end.
        let position = |p: i64, len: usize, past_end: bool| {
            let p = if p < 0 { p + len as i64 } else { p };
            let last = if past_end { len as i64 } else { len as i64 - 1 };
            (0..=last).contains(&p).then_some(p as usize)
        };
        match op_type.as_str() {
            "SequenceConstruct" => {
                if let Some(tensors) = ins.iter().copied().collect::<Option<Vec<_>>>() {
                    lists.insert(out, tensors);
                }
            }
            "SequenceEmpty" => {
                lists.insert(out, Vec::new());
            }
            "SequenceInsert" => {
                let (Some(mut list), Some(tensor)) = (list, at(1)) else { continue };
                let p = match at(2) {
                    Some(_) => match integers(graph, at(2)).as_deref() {
                        Some(&[p]) => position(p, list.len(), true),
                        _ => None,
                    },
                    None => Some(list.len()),
                };
                let Some(p) = p else { continue };
                list.insert(p, tensor);
                lists.insert(out, list);
            }
            "SequenceErase" => {
                let Some(mut list) = list else { continue };
                let p = match at(1) {
                    Some(_) => match integers(graph, at(1)).as_deref() {
                        Some(&[p]) => position(p, list.len(), false),
                        _ => None,
                    },
                    None => list.len().checked_sub(1),
                };
                let Some(p) = p else { continue };
                list.remove(p);
                lists.insert(out, list);
            }
            "SequenceAt" => {
                let Some(list) = list else { continue };
                let Some(&[p]) = integers(graph, at(1)).as_deref() else { continue };
                let Some(p) = position(p, list.len(), false) else { continue };
                let name = graph.op(op).name.clone();
                graph.remove_op(op);
                if graph.add_op(Op::new("Identity", &name), &[Some(list[p])], &[Some(out)]).is_ok() {
                    lowered += 1;
                }
            }
            "SequenceLength" => {
                let Some(list) = list else { continue };
                graph.remove_op(op);
                let name = graph.value(out).name.clone();
                graph.value_mut(out).kind = ValueKind::Initializer(int64_constant(&name, &[], &[list.len() as i64]));
                graph.value_mut(out).shape = Some(prunec_ir::Shape::known(&[]));
                graph.value_mut(out).dtype = Some(prunec_ir::DType::I64);
                graph.initializers.push(out);
                lowered += 1;
            }
            "ConcatFromSequence" => {
                let Some(list) = list.filter(|l| !l.is_empty()) else { continue };
                let (node, dtype) = (graph.op(op).clone(), graph.value(list[0]).dtype);
                let Some(axis) = node.attr_int("axis") else { continue };
                let parts = if node.attr_int("new_axis").unwrap_or(0) != 0 {
                    let unsqueezed = list.iter().enumerate().map(|(k, &t)| {
                        let part = fresh_value(graph, &node.name, &format!("element{k}"), dtype);
                        with_axes(graph, "Unsqueeze", &format!("{}_unsqueeze{k}", node.name), t, part, &[axis], opset).map(|()| Some(part))
                    });
                    let Some(parts) = unsqueezed.collect::<Option<Vec<_>>>() else { continue };
                    parts
                } else {
                    list.iter().copied().map(Some).collect()
                };
                graph.remove_op(op);
                let mut concat = Op::new("Concat", &node.name);
                concat.set_attr_int("axis", axis);
                if graph.add_op(concat, &parts, &[Some(out)]).is_ok() {
                    lowered += 1;
                }
            }
            "SplitToSequence" => {
                if let Some(parts) = split_to_tensors(graph, op, opset, integers(graph, at(1)), at(1).is_some()) {
                    lists.insert(out, parts);
                }
            }
            _ => {}
        }
    }
    lowered
}

/// `SplitToSequence(x, split)` as a `Split` (and a `Squeeze` of each part where `keepdims` is 0
/// and no split is given), where the axis's size and the split are known; the parts. The
/// sequence op stays until nothing reads its sequence.
fn split_to_tensors(graph: &mut Graph, op: OpId, opset: i64, split: Option<Vec<i64>>, has_split: bool) -> Option<Vec<ValueId>> {
    let node = graph.op(op).clone();
    let x = graph.op_input(op, 0)?;
    let shape = graph.value(x).shape.clone()?;
    let rank = shape.rank() as i64;
    let axis = node.attr_int("axis").unwrap_or(0);
    let axis = if axis < 0 { axis + rank } else { axis };
    let size = shape.0.get(usize::try_from(axis).ok()?)?.known()? as i64;
    let sizes: Vec<i64> = match (has_split, split.as_deref()) {
        (false, _) => vec![1; size as usize],
        // A scalar: parts of that size, the last one smaller if the axis is not a multiple.
        (true, Some(&[s])) if s > 0 && graph.value(graph.op_input(op, 1)?).shape.as_ref()?.rank() == 0 => {
            (0..size).step_by(s as usize).map(|start| s.min(size - start)).collect()
        }
        (true, Some(sizes)) if sizes.iter().all(|&s| s >= 0) && sizes.iter().sum::<i64>() == size => sizes.to_vec(),
        _ => return None,
    };
    if sizes.is_empty() {
        return None;
    }
    let dtype = graph.value(x).dtype;
    let parts: Vec<ValueId> = (0..sizes.len()).map(|k| fresh_value(graph, &node.name, &format!("part{k}"), dtype)).collect();
    let mut split_op = Op::new("Split", &format!("{}_split", node.name));
    split_op.set_attr_int("axis", axis);
    let mut inputs = vec![Some(x)];
    if opset >= 13 {
        let sizes_value = graph.add_initializer(&format!("{}_split_sizes", node.name), int64_constant("", &[sizes.len() as u64], &sizes));
        inputs.push(Some(sizes_value));
    } else {
        split_op.set_attr_ints("split", &sizes);
    }
    let squeeze = !has_split && node.attr_int("keepdims").unwrap_or(1) == 0;
    let split_outputs: Vec<ValueId> = if squeeze {
        (0..sizes.len()).map(|k| fresh_value(graph, &node.name, &format!("unsqueezed_part{k}"), dtype)).collect()
    } else {
        parts.clone()
    };
    graph.add_op(split_op, &inputs, &split_outputs.iter().copied().map(Some).collect::<Vec<_>>()).ok()?;
    if squeeze {
        for (k, (&from, &to)) in split_outputs.iter().zip(&parts).enumerate() {
            with_axes(graph, "Squeeze", &format!("{}_squeeze{k}", node.name), from, to, &[axis], opset)?;
        }
    }
    Some(parts)
}

/// Adds `op_type(x)` over `axes` writing `y`: Squeeze and Unsqueeze take their axes as an input
/// from opset 13 and as an attribute before.
fn with_axes(graph: &mut Graph, op_type: &str, name: &str, x: ValueId, y: ValueId, axes: &[i64], opset: i64) -> Option<()> {
    let mut op = Op::new(op_type, name);
    let mut inputs = vec![Some(x)];
    if opset >= 13 {
        inputs.push(Some(graph.add_initializer(&format!("{name}_axes"), int64_constant("", &[axes.len() as u64], axes))));
    } else {
        op.set_attr_ints("axes", axes);
    }
    graph.add_op(op, &inputs, &[Some(y)]).ok().map(|_| ())
}
