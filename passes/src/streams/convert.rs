//! Structural fusion: a range of tied dual-stream blocks run as single-stream blocks.
//!
//! Exact given tying (text weights equal to their image twins): every op but the attention core
//! is per token, and the core already runs on the joint sequence. So the image branch of each
//! block is run on the joint sequence `X` (the streams concatenated once, in the anchors'
//! order, before the first converted block): the anchor Concats read the image side's Q, K, V
//! (now joint), the image side's slice of the attention output reads the whole output, the
//! per-stream positional tables become one joint table, and the Reshape targets that named the
//! image length name the joint length. After the last converted block both streams are sliced
//! back out of `X`; the text branches are left dead and removed.

use super::twins::{DualBlock, Order, StreamReport};
use prunec_ir::{DType, Graph, Model, Op, OpId, Shape, Tensor, Value, ValueId, ValueKind, constant_tensor};
use std::collections::{BTreeMap, BTreeSet};

/// Why symbolic sizes are declined: the conversion writes the stream lengths into Slice bounds
/// and Reshape targets, and derives the joint shapes from them.
const SYMBOLIC: &str = ": the conversion writes the stream lengths into Slice bounds and Reshape targets, so it needs them \
                        as numbers; fix the input sizes (`--input-shape`)";

/// A value's recorded shape in words.
fn shape_text(graph: &Graph, v: ValueId) -> String {
    graph.value(v).shape.as_ref().map_or("not recorded".into(), |s| s.to_string())
}

/// What [`convert`] did to one block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvertedBlock {
    /// Position among the dual-stream blocks.
    pub index: usize,
    /// Float weight elements its text branch held (freed).
    pub text_parameters: u64,
}

/// Converts the dual-stream blocks `range` of `report` (consecutive, each entered from the
/// one before) to single-stream blocks running the image branch, and removes the dead text
/// branches. Only exact when the text weights equal their image twins; the caller ties them.
/// Fails, before changing the graph, when the blocks or their shapes do not allow it.
pub fn convert(model: &mut Model, report: &StreamReport, range: std::ops::Range<usize>) -> Result<Vec<ConvertedBlock>, String> {
    let blocks = report
        .blocks
        .get(range.clone())
        .filter(|b| !b.is_empty())
        .ok_or_else(|| format!("blocks {}..{} are not among the {} dual-stream blocks", range.start, range.end, report.blocks.len()))?;
    for pair in blocks.windows(2) {
        if pair[0].text_output.as_ref() != Some(&pair[1].text_input) || pair[0].image_output != pair[1].image_input {
            return Err(format!("block {} is not entered from block {}", pair[1].index, pair[0].index));
        }
    }
    let graph = &mut model.graph;
    let first = &blocks[0];
    let last = &blocks[blocks.len() - 1];
    let value = |g: &Graph, name: &str| g.value_by_name(name).ok_or_else(|| format!("no value `{name}`"));
    let (x_t, x_i) = (value(graph, &first.text_input)?, value(graph, &first.image_input)?);
    // The stream lengths: the joint attention's Concat inputs on its axis, in the block's order.
    let anchor =
        graph.op_ids().find(|&op| graph.op(op).name == first.anchors[0]).ok_or_else(|| format!("no anchor `{}`", first.anchors[0]))?;
    let dims = |g: &Graph, v: ValueId| -> Option<Vec<u64>> { g.value(v).shape.as_ref()?.0.iter().map(|d| d.known()).collect() };
    let length = |slot: usize| -> Result<u64, String> {
        let v = graph.op_input(anchor, slot).ok_or("an anchor without two inputs")?;
        dims(graph, v)
            .and_then(|d| d.get(first.axis).copied())
            .ok_or_else(|| format!("the joint attention's inputs have no concrete sizes ({}){SYMBOLIC}", shape_text(graph, v)))
    };
    let (la, lb) = (length(0)?, length(1)?);
    let (lt, li) = if first.order == Order::TextFirst { (la, lb) } else { (lb, la) };
    let (dt, di) = (
        dims(graph, x_t).ok_or_else(|| format!("the text stream has no concrete sizes ({}){SYMBOLIC}", shape_text(graph, x_t)))?,
        dims(graph, x_i).ok_or_else(|| format!("the image stream has no concrete sizes ({}){SYMBOLIC}", shape_text(graph, x_i)))?,
    );
    // The streams' sequence axis: the one of those lengths, all others equal. Equal lengths
    // leave it to the sizes, which must then name one axis only.
    let candidates: Vec<usize> =
        (0..dt.len().min(di.len())).filter(|&a| dt[a] == lt && di[a] == li && (0..dt.len()).all(|b| b == a || dt[b] == di[b])).collect();
    let ([axis], true) = (&candidates[..], dt.len() == di.len()) else {
        return Err(format!("the streams' shapes {dt:?} and {di:?} do not have the attention's lengths {lt} and {li} on exactly one axis"));
    };
    let axis = *axis;
    let (lt, li) = (lt as i64, li as i64);
    for out in [Some(&last.image_output), last.text_output.as_ref()].into_iter().flatten() {
        if graph.is_output(value(graph, out)?) {
            return Err(format!("`{out}` is a graph output"));
        }
    }
    let dtype = graph.value(x_i).dtype;
    let ordered = |t: ValueId, i: ValueId| if first.order == Order::TextFirst { [t, i] } else { [i, t] };
    let mut joint_dims = di.clone();
    joint_dims[axis] = (lt + li) as u64;

    // X: the streams joined once.
    let x = new_op(
        graph,
        "Concat",
        &ordered(x_t, x_i),
        &format!("{}/single_stream/Concat", first.image_input),
        dtype,
        Some(&joint_dims),
        |o| o.set_attr_int("axis", axis as i64),
    )?;
    let concat_op = graph.producer(x).map(|(op, _)| op);
    for (op, _) in graph.consumers(x_i) {
        if Some(op) != concat_op {
            graph.replace_input(op, x_i, x);
        }
    }
    let mut tables: BTreeMap<(ValueId, ValueId), ValueId> = BTreeMap::new();
    let mut converted = Vec::new();
    let mut image_ops: BTreeSet<OpId> = BTreeSet::new();
    let mut fixed: BTreeSet<ValueId> = BTreeSet::new();
    let mut seeds: Vec<(ValueId, usize)> = Vec::new();
    for b in blocks {
        convert_block(graph, b, lt, li, &mut tables, &mut image_ops, &mut fixed, &mut seeds)?;
        converted.push(ConvertedBlock { index: b.index, text_parameters: b.text_parameters });
    }
    // The exit: both streams sliced back out of X for what reads them after the range.
    let x_end = value(graph, &last.image_output)?;
    let (start_t, start_i) = if first.order == Order::TextFirst { (0, lt) } else { (li, 0) };
    let readers_i: Vec<OpId> = graph.consumers(x_end).into_iter().map(|(op, _)| op).filter(|op| !image_ops.contains(op)).collect();
    let mut out_dims = joint_dims.clone();
    out_dims[axis] = li as u64;
    let img = slice(graph, x_end, start_i, start_i + li, axis, &format!("{}/single_stream/image", last.image_output), dtype, &out_dims)?;
    for op in readers_i {
        graph.replace_input(op, x_end, img);
    }
    let mut exits: BTreeSet<ValueId> = [img].into_iter().collect();
    if let Some(t_end) = &last.text_output {
        let t_end = value(graph, t_end)?;
        let readers: Vec<OpId> = graph.consumers(t_end).into_iter().map(|(op, _)| op).collect();
        out_dims[axis] = lt as u64;
        let txt = slice(graph, x_end, start_t, start_t + lt, axis, &format!("{}/single_stream/text", last.image_output), dtype, &out_dims)?;
        for op in readers {
            graph.replace_input(op, t_end, txt);
        }
        exits.insert(txt);
    }
    // Values computed on the joint sequence have another length than recorded. A twin's shape
    // says where (`fixed`); for the others (image ops without a twin, after the attention of a
    // block whose text branch ends there; every value when the lengths are equal) the sequence
    // axis is followed op by op from X and from the attention outputs the image slices cut
    // (`seeds`), and the recorded image length there becomes the joint length. The attention
    // core's recorded shapes already have the joint length; what cannot be followed is
    // forgotten, from X to the exit slices.
    let joint_len = (lt + li) as u64;
    let mut region: BTreeSet<ValueId> = BTreeSet::new();
    let mut stack = vec![x];
    while let Some(v) = stack.pop() {
        if exits.contains(&v) || !region.insert(v) {
            continue;
        }
        for (op, _) in graph.consumers(v) {
            if graph.op(op).op_type == "Shape" || graph.op_output(op, 0).is_some_and(|o| exits.contains(&o)) {
                continue;
            }
            stack.extend(graph.op_outputs(op).into_iter().flatten());
        }
    }
    let mut tags: BTreeMap<ValueId, usize> = seeds.into_iter().collect();
    tags.insert(x, axis);
    let order = graph.topo_order().map_err(|e| e.to_string())?;
    for op in order {
        let outs = graph.op_outputs(op);
        if !outs.iter().flatten().any(|v| region.contains(v)) {
            continue;
        }
        for (slot, out) in outs.into_iter().enumerate() {
            if let Some(out) = out
                && !tags.contains_key(&out)
                && let Some(t) = sequence_axis(graph, op, slot, &tags, li as u64, joint_len)
            {
                tags.insert(out, t);
            }
        }
    }
    for &v in &region {
        if v == x || fixed.contains(&v) {
            continue;
        }
        let old: Option<Vec<u64>> = dims(graph, v);
        let derived = match (tags.get(&v), &old) {
            (Some(&t), Some(d)) if d.get(t) == Some(&(li as u64)) => {
                let mut d = d.clone();
                d[t] = joint_len;
                Some(d)
            }
            (Some(&t), Some(d)) if d.get(t) == Some(&joint_len) => Some(d.clone()),
            (Some(_), _) => None,
            (None, Some(d)) => {
                let in_core = graph.producer(v).is_some_and(|(op, _)| !image_ops.contains(&op)) && d.contains(&joint_len);
                in_core.then(|| d.clone())
            }
            (None, None) => None,
        };
        if derived != old {
            graph.value_mut(v).shape = derived.as_deref().map(Shape::known);
        }
    }
    crate::remove_dead_code(model);
    Ok(converted)
}

/// Rewires one block's image branch onto the joint sequence. `seeds` gets each attention output
/// that an image slice cut, with the axis it cut.
#[allow(clippy::too_many_arguments)]
fn convert_block(
    graph: &mut Graph,
    b: &DualBlock,
    lt: i64,
    li: i64,
    tables: &mut BTreeMap<(ValueId, ValueId), ValueId>,
    image_ops: &mut BTreeSet<OpId>,
    fixed: &mut BTreeSet<ValueId>,
    seeds: &mut Vec<(ValueId, usize)>,
) -> Result<(), String> {
    let op_by_name: BTreeMap<String, OpId> = graph.op_ids().map(|op| (graph.op(op).name.clone(), op)).collect();
    let op = |name: &str| op_by_name.get(name).copied().ok_or_else(|| format!("no op `{name}`"));
    let positional: BTreeMap<(ValueId, ValueId), ()> =
        b.positional.iter().filter_map(|[t, i]| Some(((graph.value_by_name(t)?, graph.value_by_name(i)?), ()))).collect();
    let pairs: Vec<(OpId, OpId)> = b.ops.iter().map(|p| Ok((op(&p.text)?, op(&p.image)?))).collect::<Result<_, String>>()?;
    image_ops.extend(pairs.iter().map(|&(_, i)| i));
    // Each image output's shape on the joint sequence: where its text twin's differs from it
    // by the stream lengths, the joint length. Equal lengths do not say where: those shapes
    // are forgotten with the others.
    let known = |g: &Graph, v: ValueId| -> Option<Vec<u64>> { g.value(v).shape.as_ref()?.0.iter().map(|d| d.known()).collect() };
    for &(t, i) in pairs.iter().filter(|_| lt != li) {
        for (vt, vi) in graph.op_outputs(t).into_iter().zip(graph.op_outputs(i)) {
            let (Some(vt), Some(vi)) = (vt, vi) else { continue };
            let (Some(dt), Some(di)) = (known(graph, vt), known(graph, vi)) else { continue };
            let ok = dt.len() == di.len() && dt.iter().zip(&di).all(|(a, c)| a == c || (*a as i64, *c as i64) == (lt, li));
            if ok {
                let dims: Vec<u64> = dt.iter().zip(&di).map(|(a, c)| if a == c { *c } else { (lt + li) as u64 }).collect();
                graph.value_mut(vi).shape = Some(Shape::known(&dims));
                fixed.insert(vi);
            }
        }
    }
    for &(t, i) in &pairs {
        let (ins_t, ins_i) = (graph.op_inputs(t), graph.op_inputs(i));
        let o = graph.op(i).op_type.clone();
        // The image slice of the attention output: the whole joint output instead.
        if o == "Slice" && ins_t.first() == ins_i.first() {
            let (Some(Some(joint)), Some(out)) = (ins_i.first().copied(), graph.op_output(i, 0)) else { continue };
            seeds.extend(slice_axis(graph, i).map(|a| (joint, a)));
            for (reader, _) in graph.consumers(out) {
                graph.replace_input(reader, out, joint);
            }
            continue;
        }
        for (slot, (vt, vi)) in ins_t.iter().zip(&ins_i).enumerate() {
            let (Some(vt), Some(vi)) = (*vt, *vi) else { continue };
            if vt == vi {
                continue;
            }
            // The Split of the joint sequence back into the streams: its input.
            if let (Some((st, _)), Some((si, _))) = (graph.producer(vt), graph.producer(vi))
                && st == si
                && graph.op(si).op_type == "Split"
            {
                let joint = graph.op_input(si, 0).ok_or("a Split without input")?;
                let rank = graph.value(joint).shape.as_ref().map(|s| s.0.len());
                seeds.extend(rank.and_then(|r| normalize(graph.op(si).attr_int("axis").unwrap_or(0), r)).map(|a| (joint, a)));
                graph.set_op_input(i, slot, joint);
                continue;
            }
            // A per-stream positional table: one joint table, in the streams' order.
            if positional.contains_key(&(vt, vi)) {
                let joint = match tables.get(&(vt, vi)) {
                    Some(&j) => j,
                    None => {
                        let j = joint_table(graph, vt, vi, b.order)?;
                        tables.insert((vt, vi), j);
                        j
                    }
                };
                graph.set_op_input(i, slot, joint);
                continue;
            }
            // A Reshape target naming the image length names the joint length.
            if o == "Reshape" && slot == 1 {
                let (Some(tt), Some(ti)) = (constant_tensor(graph, vt), constant_tensor(graph, vi)) else { continue };
                let (Some(st), Some(si)) = (tt.to_i64_vec(), ti.to_i64_vec()) else { continue };
                let mut shape = si.clone();
                for (k, (a, c)) in st.iter().zip(&si).enumerate() {
                    if a != c {
                        if (*a, *c) != (lt, li) {
                            return Err(format!("`{}` reshapes to {si:?}, its twin to {st:?}: not the stream lengths", graph.op(i).name));
                        }
                        shape[k] = lt + li;
                    }
                }
                if lt == li {
                    // Equal targets: the entry that is the stream length, if one is.
                    let at: Vec<usize> = (0..si.len()).filter(|&k| si[k] == li).collect();
                    match at[..] {
                        [] => {}
                        [k] => shape[k] = lt + li,
                        _ => {
                            return Err(format!(
                                "`{}` reshapes to {si:?}: with equal stream lengths, which {li} is the sequence is not known",
                                graph.op(i).name
                            ));
                        }
                    }
                }
                if shape == si {
                    // `-1` or `0` already: the target fits any length.
                    continue;
                }
                let name = format!("{}/single_stream_shape", graph.op(i).name);
                let c = graph.add_initializer(&name, Tensor::from_i64(&name, &[shape.len() as u64], &shape));
                graph.set_op_input(i, slot, c);
            }
        }
    }
    // Where the text branch ends at the attention, the image slice of the attention output has
    // no twin: it is the first Slice after the anchors that cuts the joint length to the image's.
    if b.text_output.is_none() {
        let anchors: Vec<OpId> = b.anchors.iter().map(|a| op(a)).collect::<Result<_, String>>()?;
        let cut = image_cut(graph, &anchors, lt, li)
            .ok_or_else(|| format!("block {}: no slice of the attention output keeps the image tokens", b.index))?;
        {
            let (Some(joint), Some(out)) = (graph.op_input(cut, 0), graph.op_output(cut, 0)) else {
                return Err("a Slice without data".into());
            };
            seeds.extend(slice_axis(graph, cut).map(|a| (joint, a)));
            for (reader, _) in graph.consumers(out) {
                graph.replace_input(reader, out, joint);
            }
        }
    }
    // The anchors read the image side, now joint.
    for anchor in &b.anchors {
        let a = op(anchor)?;
        let slot = if b.order == Order::TextFirst { 1 } else { 0 };
        let (Some(image), Some(out)) = (graph.op_input(a, slot), graph.op_output(a, 0)) else { return Err(format!("anchor `{anchor}`")) };
        for (reader, _) in graph.consumers(out) {
            graph.replace_input(reader, out, image);
        }
    }
    Ok(())
}

/// The one axis a Slice cuts, made non-negative, when its axes are a constant.
fn slice_axis(graph: &Graph, slice: OpId) -> Option<usize> {
    let rank = graph.value(graph.op_input(slice, 0)?).shape.as_ref()?.0.len();
    let axes = graph.op_input(slice, 3).and_then(|v| constant_tensor(graph, v)).and_then(|t| t.to_i64_vec())?;
    let [a] = axes[..] else { return None };
    normalize(a, rank)
}

fn normalize(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    usize::try_from(a).ok().filter(|&a| a < rank)
}

/// Ops that keep every axis of their (broadcast) inputs: the sequence axis stays where it is,
/// counted from the last axis.
const PER_ELEMENT: &[&str] = &[
    "Abs",
    "Add",
    "Cast",
    "Clip",
    "Div",
    "Erf",
    "Exp",
    "Gelu",
    "Identity",
    "Log",
    "Max",
    "Min",
    "Mul",
    "Neg",
    "Pow",
    "Reciprocal",
    "Relu",
    "Sigmoid",
    "Sin",
    "Cos",
    "Softplus",
    "Sqrt",
    "Sub",
    "Tanh",
    "Where",
];

/// Where output `slot` of `op` has the sequence axis, given the axes `tags` of its inputs:
/// `None` when the op's rule is not known or the axis does not survive it (a MatMul that
/// contracts it, a reduction over it). `li` and `joint` are the image and joint lengths, which
/// a Reshape may keep on that axis.
fn sequence_axis(graph: &Graph, op: OpId, slot: usize, tags: &BTreeMap<ValueId, usize>, li: u64, joint: u64) -> Option<usize> {
    let o = graph.op(op);
    if !(o.domain.is_empty() || o.domain == "ai.onnx") {
        return None;
    }
    let ins = graph.op_inputs(op);
    let rank = |v: ValueId| graph.value(v).shape.as_ref().map(|s| s.0.len());
    let out_rank = graph.op_output(op, slot).and_then(|v| graph.value(v).shape.as_ref()).map(|s| s.0.len());
    let tagged: Vec<(usize, ValueId, usize)> =
        ins.iter().enumerate().filter_map(|(k, v)| v.and_then(|v| tags.get(&v).map(|&t| (k, v, t)))).collect();
    let &(slot_in, input, tag) = tagged.first()?;
    let int_input = |k: usize| ins.get(k).copied().flatten().and_then(|v| constant_tensor(graph, v)).and_then(|t| t.to_i64_vec());
    let ri = rank(input)?;
    match o.op_type.as_str() {
        t if PER_ELEMENT.contains(&t) => {
            let ro = out_rank?;
            let mut found: Option<usize> = None;
            for &(_, v, t) in &tagged {
                let aligned = t + ro.checked_sub(rank(v)?)?;
                if found.is_some_and(|f| f != aligned) {
                    return None;
                }
                found = Some(aligned);
            }
            found
        }
        "Softmax" | "LayerNormalization" | "RMSNormalization" => {
            let a = normalize(o.attr_int("axis").unwrap_or(-1), ri)?;
            (slot_in == 0 && a > tag).then_some(tag)
        }
        "ReduceMean" | "ReduceSum" | "ReduceMax" => {
            let axes = o.attr_ints("axes").map(<[i64]>::to_vec).or_else(|| int_input(1))?;
            let keep = o.attr_int("keepdims").unwrap_or(1) == 1;
            let axes: Vec<usize> = axes.iter().map(|&a| normalize(a, ri)).collect::<Option<_>>()?;
            (slot_in == 0 && keep && !axes.contains(&tag)).then_some(tag)
        }
        // The rows of A, not the contracted axis; B's axes do not reach the rows.
        "MatMul" => (slot_in == 0 && tagged.len() == 1 && tag + 1 < ri).then(|| tag + out_rank.unwrap_or(ri) - ri),
        "Transpose" => {
            let perm = o.attr_ints("perm")?;
            perm.iter().position(|&p| p == tag as i64)
        }
        "Reshape" => {
            // Only regrouping the axes after the sequence axis keeps it.
            let (old_in, old_out) = (dims_of(graph, input)?, dims_of(graph, graph.op_output(op, 0)?)?);
            let tail = |d: &[u64]| d.iter().product::<u64>();
            let lengths = [li, joint];
            (old_out.len() > tag
                && old_in[..tag] == old_out[..tag]
                && lengths.contains(&old_in[tag])
                && lengths.contains(&old_out[tag])
                && tail(&old_in[tag + 1..]) == tail(&old_out[tag + 1..]))
            .then_some(tag)
        }
        "Slice" => {
            let axes = int_input(3)?;
            let axes: Vec<usize> = axes.iter().map(|&a| normalize(a, ri)).collect::<Option<_>>()?;
            (slot_in == 0 && !axes.contains(&tag)).then_some(tag)
        }
        "Split" | "Concat" => {
            let a = normalize(o.attr_int("axis").unwrap_or(0), ri)?;
            (a != tag && tagged.iter().all(|&(_, _, t)| t == tag)).then_some(tag)
        }
        "Unsqueeze" | "Squeeze" => {
            let ro = out_rank?;
            let axes = int_input(1).or_else(|| o.attr_ints("axes").map(<[i64]>::to_vec))?;
            if o.op_type == "Unsqueeze" {
                let axes: Vec<usize> = axes.iter().map(|&a| normalize(a, ro)).collect::<Option<_>>()?;
                // The input axes fill the output's non-inserted positions in order.
                (0..ro).filter(|a| !axes.contains(a)).nth(tag)
            } else {
                let axes: Vec<usize> = axes.iter().map(|&a| normalize(a, ri)).collect::<Option<_>>()?;
                (!axes.contains(&tag)).then(|| tag - axes.iter().filter(|&&a| a < tag).count())
            }
        }
        _ => None,
    }
}

/// A value's recorded sizes, when all are known.
fn dims_of(graph: &Graph, v: ValueId) -> Option<Vec<u64>> {
    graph.value(v).shape.as_ref()?.0.iter().map(|d| d.known()).collect()
}

/// The first Slice computed from the anchors whose input has the joint length `lt + li` on
/// some axis and whose output has `li` there (by the recorded shapes).
fn image_cut(graph: &Graph, anchors: &[OpId], lt: i64, li: i64) -> Option<OpId> {
    let dims = |v: ValueId| -> Option<Vec<u64>> { graph.value(v).shape.as_ref()?.0.iter().map(|d| d.known()).collect() };
    let mut seen: BTreeSet<OpId> = anchors.iter().copied().collect();
    let mut queue: std::collections::VecDeque<OpId> = anchors.iter().copied().collect();
    while let Some(op) = queue.pop_front() {
        if graph.op(op).op_type == "Slice"
            && let (Some(i), Some(o)) = (graph.op_input(op, 0).and_then(dims), graph.op_output(op, 0).and_then(dims))
            && i.len() == o.len()
            && (0..i.len()).any(|a| i[a] as i64 == lt + li && o[a] as i64 == li)
        {
            return Some(op);
        }
        for v in graph.op_outputs(op).into_iter().flatten() {
            for (reader, _) in graph.consumers(v) {
                if seen.insert(reader) {
                    queue.push_back(reader);
                }
            }
        }
    }
    None
}

/// `Concat(tables in the streams' order)` on the axis where their shapes differ.
fn joint_table(graph: &mut Graph, t: ValueId, i: ValueId, order: Order) -> Result<ValueId, String> {
    let (tt, ti) =
        (constant_tensor(graph, t).ok_or("a table is not constant")?, constant_tensor(graph, i).ok_or("a table is not constant")?);
    let (dt, di) = (tt.dims(), ti.dims());
    let differ: Vec<usize> = (0..dt.len().min(di.len())).filter(|&a| dt[a] != di[a]).collect();
    let [axis] = differ[..] else { return Err("positional tables that do not differ in one axis".into()) };
    let mut dims = di.clone();
    dims[axis] = dt[axis] + di[axis];
    let inputs = if order == Order::TextFirst { [t, i] } else { [i, t] };
    let name = format!("{}/single_stream/joint", graph.value(i).name);
    // Blocks converted one at a time (`text=linear`) share the table the first one made.
    if let Some(existing) = graph.value_by_name(&format!("{name}_output_0"))
        && let Some((op, _)) = graph.producer(existing)
        && graph.op(op).op_type == "Concat"
        && graph.op_inputs(op) == [Some(inputs[0]), Some(inputs[1])]
    {
        return Ok(existing);
    }
    let dtype = Some(ti.dtype());
    new_op(graph, "Concat", &inputs, &name, dtype, Some(&dims), |o| o.set_attr_int("axis", axis as i64))
}

/// `Slice(x, start..end)` on `axis`.
#[allow(clippy::too_many_arguments)]
fn slice(
    graph: &mut Graph,
    x: ValueId,
    start: i64,
    end: i64,
    axis: usize,
    name: &str,
    dtype: Option<DType>,
    dims: &[u64],
) -> Result<ValueId, String> {
    let c = |g: &mut Graph, what: &str, v: i64| {
        g.add_initializer(&format!("{name}_{what}"), Tensor::from_i64(&format!("{name}_{what}"), &[1], &[v]))
    };
    let (s, e, a) = (c(graph, "starts", start), c(graph, "ends", end), c(graph, "axes", axis as i64));
    new_op(graph, "Slice", &[x, s, e, a], name, dtype, Some(dims), |_| {})
}

/// Adds one op of one output.
pub(super) fn new_op(
    graph: &mut Graph,
    op_type: &str,
    inputs: &[ValueId],
    name: &str,
    dtype: Option<DType>,
    dims: Option<&[u64]>,
    attrs: impl FnOnce(&mut Op),
) -> Result<ValueId, String> {
    let mut v = Value::new(format!("{name}_output_0"), ValueKind::Produced);
    v.dtype = dtype;
    v.shape = dims.map(Shape::known);
    let out = graph.add_value(v).map_err(|e| e.to_string())?;
    let mut op = Op::new(op_type, name);
    attrs(&mut op);
    let ins: Vec<Option<ValueId>> = inputs.iter().copied().map(Some).collect();
    graph.add_op(op, &ins, &[Some(out)]).map_err(|e| e.to_string())?;
    Ok(out)
}
