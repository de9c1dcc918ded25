//! Twin matching: the text and image streams of each dual-stream block, op by op.
//!
//! The anchor of a dual-stream block is its joint attention: the Concats, inside the block's
//! attention branch, of two streams on one axis that is not the last (the sequence axis: 1 for
//! `[B,L,H,d]`, 2 for `[B,H,L,d]`), at least three of them (Q, K, V). Their first inputs are one
//! stream (side `a`), their second the other (side `b`).
//!
//! From each anchor's two inputs, and from the two streams' last residual sums in the block, the
//! walk goes backwards in step: two values are twins when their producers have the same op type,
//! domain, attributes, input and output counts and output slot, and their inputs are twins slot
//! by slot. It stops at
//! - the block's residual inputs (the skips of its attention branches, from
//!   [`crate::layers::find_blocks`]; a block whose text branch ends at the attention has one
//!   such skip, and its text input is whatever the image input's twin is);
//! - one value reached from both sides: inside the block it is the attention core (or the Split
//!   that slices the joint sequence back), outside it the shared conditioning (a timestep
//!   embedding, a joint rotary table);
//! - constants: equal ones are shared, float weights read by one op only are *twin weights*
//!   (equal shapes required), float tables read by several ops (a rotary table per stream,
//!   shared by every block) are *positional twins*, integer constants of equal shape are shape
//!   arguments that may differ (a Reshape to `[B,Lt,H,d]` against `[B,Li,H,d]`).
//!
//! Anything else is a mismatch, and the block is declined with the two ops that differ; so is a
//! block with an op of its residual branches that neither side nor the joint core accounts for.
//!
//! Which side is the text: the one without a residual exit (SD3's and Qwen-Image's last block),
//! else, following the chain of blocks to its end, the side the model drops: where both streams
//! end in one Concat on the sequence axis (FLUX's single-stream stack), the first Slice of that
//! joint sequence on that axis keeps the image tokens.

use crate::layers::{BlockKind, BlockReport, Layer, find_blocks};
use prunec_ir::{Graph, OpId, Tensor, ValueId, constant_tensor};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// The dual-stream blocks of a graph, and the attention layers that look dual but are not
/// matched.
///
/// JSON (`prunec streams --json`):
///
/// ```text
/// { "blocks": [ { "index", "layer", "order": "text_first" | "image_first", "axis", "anchors": [node],
///                 "text_input", "image_input", "text_output" (or null), "image_output",
///                 "ops": [ { "op_type", "text", "image" } ],
///                 "weights": [ { "text", "image", "shape", "parameters", "divergence" (or null),
///                               "rows": { "axis", "text": [start, end], "image": [start, end] } (or null),
///                               "mlp" } ],
///                 "positional": [ [text, image] ], "shared": [value],
///                 "text_parameters", "divergence" (or null) } ],
///   "declined": [ { "layer", "reason" } ] }
/// ```
#[derive(Clone, Debug, Default, Serialize)]
pub struct StreamReport {
    /// Matched dual-stream blocks, in topological order; `blocks[i].index == i`.
    pub blocks: Vec<DualBlock>,
    /// Layers with a joint attention that could not be matched, with the reason.
    pub declined: Vec<DeclinedBlock>,
}

/// Which stream comes first in the joint sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// `[txt, img]` (FLUX, Qwen-Image).
    TextFirst,
    /// `[img, txt]` (SD3).
    ImageFirst,
}

/// One matched dual-stream block.
#[derive(Clone, Debug, Serialize)]
pub struct DualBlock {
    /// Position among the dual-stream blocks.
    pub index: usize,
    /// The layer of [`crate::layers::find_blocks`] it is.
    pub layer: usize,
    /// Stream order in the joint sequence.
    pub order: Order,
    /// The anchors' concat axis, made non-negative.
    pub axis: usize,
    /// The anchor Concats, in topological order.
    pub anchors: Vec<String>,
    /// The text stream entering the block.
    pub text_input: String,
    /// The image stream entering the block.
    pub image_input: String,
    /// The text stream leaving it; `None` when the text branch ends at the attention.
    pub text_output: Option<String>,
    /// The image stream leaving it.
    pub image_output: String,
    /// Twin ops, in the image op's topological order.
    pub ops: Vec<TwinOp>,
    /// Twin weights, in the same order as their readers.
    pub weights: Vec<TwinWeight>,
    /// Per-stream positional tables (text, image), block-invariant.
    pub positional: Vec<[String; 2]>,
    /// Values both streams read from outside the block: the shared conditioning.
    pub shared: Vec<String>,
    /// Float weight elements of the text branch: what tying it to the image branch frees.
    pub text_parameters: u64,
    /// `‖W_txt − W_img‖_F / ‖W_img‖_F` over all twin weights together; `None` when the image
    /// weights are all zero.
    pub divergence: Option<f64>,
}

/// A text op and its image twin.
#[derive(Clone, Debug, Serialize)]
pub struct TwinOp {
    /// Their op type.
    pub op_type: String,
    /// The text op's name.
    pub text: String,
    /// The image op's name.
    pub image: String,
}

/// A text weight and its image twin.
#[derive(Clone, Debug, Serialize)]
pub struct TwinWeight {
    /// The text weight's value name.
    pub text: String,
    /// The image weight's value name.
    pub image: String,
    /// Their shape.
    pub shape: Vec<u64>,
    /// Elements of one of them.
    pub parameters: u64,
    /// `‖W_txt − W_img‖_F / ‖W_img‖_F`; `None` when the image weight is zero or unreadable.
    pub divergence: Option<f64>,
    /// For twins that are parts of two projections (a text modulation that computes two of
    /// the image modulation's six chunks, in another order): which slices of the feature axis
    /// are twins. `None`: the whole weights are.
    pub rows: Option<RowRanges>,
    /// Read by the block's MLP sub-block: its hidden units are an arbitrary order per stream,
    /// so the twins are not aligned and are never averaged (`tie=average` keeps the image's).
    pub mlp: bool,
}

/// Twin slices of two weights along their output-feature axis.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RowRanges {
    /// The weights' output-feature axis.
    pub axis: usize,
    /// `[start, end)` in the text weight.
    pub text: [u64; 2],
    /// `[start, end)` in the image weight.
    pub image: [u64; 2],
}

/// An attention layer with a joint-attention anchor that was not matched.
#[derive(Clone, Debug, Serialize)]
pub struct DeclinedBlock {
    /// The layer of [`crate::layers::find_blocks`].
    pub layer: usize,
    /// Why, in words.
    pub reason: String,
}

/// Finds the dual-stream blocks of `graph` (read shapes inferred and shape arithmetic folded, as
/// for [`find_blocks`]). Reads the graph only, never panics on it; output is deterministic.
pub fn find_streams(graph: &Graph) -> StreamReport {
    find_streams_in(graph, &find_blocks(graph))
}

/// [`find_streams`] with the blocks already found.
pub fn find_streams_in(graph: &Graph, blocks: &BlockReport) -> StreamReport {
    let Ok(order) = graph.topo_order() else { return StreamReport::default() };
    let position: BTreeMap<OpId, usize> = order.iter().enumerate().map(|(i, &op)| (op, i)).collect();
    let mut matched: Vec<Matched> = Vec::new();
    let mut declined = Vec::new();
    for layer in &blocks.layers {
        match match_layer(graph, layer, &position) {
            Ok(Some(m)) => matched.push(m),
            Ok(None) => {}
            Err(reason) => declined.push(DeclinedBlock { layer: layer.index, reason }),
        }
    }
    // Which side is the text is decided at the end of each chain of blocks (where one stream
    // ends or both are joined) and carried back along the chain.
    let mut text_side: Vec<Option<Side>> = matched.iter().map(|m| m.text_side_alone()).collect();
    for i in (0..matched.len()).rev() {
        if text_side[i].is_some() {
            continue;
        }
        let next = matched.get(i + 1).filter(|n| n.follows(&matched[i]));
        text_side[i] = match next {
            // Side a of the next block is read from whichever exit of this one feeds it.
            Some(n) => text_side[i + 1].and_then(|s| {
                let root = n.root(s);
                if Some(root) == matched[i].exit(Side::A) {
                    Some(Side::A)
                } else if Some(root) == matched[i].exit(Side::B) {
                    Some(Side::B)
                } else {
                    None
                }
            }),
            None => single_branch_after(graph, blocks, &matched[i]).or_else(|| dropped_side(graph, &matched[i], &order, &position)),
        };
    }
    let mut report = StreamReport { blocks: Vec::new(), declined };
    for (m, side) in matched.into_iter().zip(text_side) {
        match side {
            Some(text) => {
                let index = report.blocks.len();
                report.blocks.push(m.into_block(graph, index, text, &position));
            }
            None => report.declined.push(DeclinedBlock {
                layer: m.layer,
                reason: "cannot tell which stream is the text: both streams continue and no slice of their joint sequence keeps one".into(),
            }),
        }
    }
    report.declined.sort_by_key(|d| d.layer);
    report
}

/// Overwrites every text weight of `block` with its image twin (the tied copy, exact for the
/// single-stream conversion): whole weights are copied, slice twins slice by slice. Returns the
/// elements overwritten. Fails, before changing anything, when a weight is not an initializer
/// of `graph`, is not f32 where slices are copied, or the twins' shapes differ.
pub fn tie_text_weights(graph: &mut Graph, block: &DualBlock) -> Result<u64, String> {
    let lookup = |name: &str| -> Result<(ValueId, &Tensor), String> {
        let v = graph.value_by_name(name).ok_or_else(|| format!("no value `{name}`"))?;
        let t = graph.value(v).initializer().ok_or_else(|| format!("weight `{name}` is not an initializer"))?;
        Ok((v, t))
    };
    // The new data of each text weight, in first-met order.
    let mut edits: Vec<(ValueId, String, Vec<u64>, Vec<f32>)> = Vec::new();
    let mut total = 0;
    for w in &block.weights {
        let ((text, tt), (_, ti)) = (lookup(&w.text)?, lookup(&w.image)?);
        let at = match edits.iter().position(|e| e.0 == text) {
            Some(at) => at,
            None => {
                let data = tt.to_f32_vec().filter(|_| tt.dtype() == prunec_ir::DType::F32);
                let data = data.ok_or_else(|| format!("weight `{}` is not f32", w.text))?;
                edits.push((text, w.text.clone(), tt.dims(), data));
                edits.len() - 1
            }
        };
        let image =
            ti.to_f32_vec().filter(|_| ti.dtype() == prunec_ir::DType::F32).ok_or_else(|| format!("weight `{}` is not f32", w.image))?;
        let dims = ti.dims();
        let edit = &mut edits[at];
        match &w.rows {
            None => {
                if edit.2 != dims {
                    return Err(format!("weights `{}` and `{}` differ in shape", w.text, w.image));
                }
                total += image.len() as u64;
                edit.3 = image;
            }
            Some(r) => {
                let (slabs, len) = row_slabs(&edit.2, &dims, r, w)?;
                for &(to, from) in &slabs {
                    edit.3[to..to + len].copy_from_slice(&image[from..from + len]);
                }
                total += (len * slabs.len()) as u64;
            }
        }
    }
    for (text, name, dims, data) in edits {
        graph.set_initializer(text, Tensor::from_f32(&name, &dims, &data));
    }
    Ok(total)
}

/// The twin slices of `r` in a text weight of `text_dims` and an image weight of `image_dims`:
/// for each index before the feature axis, the flat offsets of the text slab and the image
/// slab, and the slabs' length. Fails when the shapes differ off that axis or a range does not
/// fit.
fn row_slabs(text_dims: &[u64], image_dims: &[u64], r: &RowRanges, w: &TwinWeight) -> Result<(Vec<(usize, usize)>, usize), String> {
    let (n_text, n_image) = (text_dims.get(r.axis).copied(), image_dims.get(r.axis).copied());
    let same_rest =
        text_dims.len() == image_dims.len() && text_dims.iter().zip(image_dims).enumerate().all(|(i, (a, b))| i == r.axis || a == b);
    let fits = |range: [u64; 2], n: Option<u64>| range[0] <= range[1] && n.is_some_and(|n| range[1] <= n);
    if !same_rest || !fits(r.text, n_text) || !fits(r.image, n_image) || r.text[1] - r.text[0] != r.image[1] - r.image[0] {
        return Err(format!("slices of `{}` and `{}` do not match", w.text, w.image));
    }
    let inner: usize = image_dims[r.axis + 1..].iter().product::<u64>() as usize;
    let outer: usize = image_dims[..r.axis].iter().product::<u64>() as usize;
    let len = (r.text[1] - r.text[0]) as usize * inner;
    let slabs = (0..outer)
        .map(|o| {
            let text = (o * n_text.unwrap_or(0) as usize + r.text[0] as usize) * inner;
            let image = (o * n_image.unwrap_or(0) as usize + r.image[0] as usize) * inner;
            (text, image)
        })
        .collect();
    Ok((slabs, len))
}

/// Overwrites every aligned image weight of `block` (every twin weight but the MLP's, whose
/// hidden units are in an arbitrary order per stream) with the element-wise mean of it and its
/// text twin, slice twins slice by slice; image rows without a text twin (SD3's last gates)
/// keep their values. Followed by [`tie_text_weights`], both twins hold the merged weights:
/// `tie=average`. Returns the elements averaged. Fails, before changing anything, when a
/// weight is not an f32 initializer of `graph` or the twins' slices do not match.
pub fn average_image_weights(graph: &mut Graph, block: &DualBlock) -> Result<u64, String> {
    let read = |name: &str| -> Result<(ValueId, Vec<u64>, Vec<f32>), String> {
        let v = graph.value_by_name(name).ok_or_else(|| format!("no value `{name}`"))?;
        let t = graph.value(v).initializer().ok_or_else(|| format!("weight `{name}` is not an initializer"))?;
        let data = t.to_f32_vec().filter(|_| t.dtype() == prunec_ir::DType::F32).ok_or_else(|| format!("weight `{name}` is not f32"))?;
        Ok((v, t.dims(), data))
    };
    // The new data of each image weight, in first-met order; text weights are only read.
    let mut edits: Vec<(ValueId, String, Vec<u64>, Vec<f32>)> = Vec::new();
    let mut total = 0;
    for w in block.weights.iter().filter(|w| !w.mlp) {
        let (_, text_dims, text) = read(&w.text)?;
        let (image, dims, data) = read(&w.image)?;
        let at = match edits.iter().position(|e| e.0 == image) {
            Some(at) => at,
            None => {
                edits.push((image, w.image.clone(), dims.clone(), data));
                edits.len() - 1
            }
        };
        let edit = &mut edits[at].3;
        match &w.rows {
            None => {
                if text_dims != dims {
                    return Err(format!("weights `{}` and `{}` differ in shape", w.text, w.image));
                }
                for (x, t) in edit.iter_mut().zip(&text) {
                    *x = 0.5 * (*x + t);
                }
                total += text.len() as u64;
            }
            Some(r) => {
                let (slabs, len) = row_slabs(&text_dims, &dims, r, w)?;
                for &(from, to) in &slabs {
                    for k in 0..len {
                        edit[to + k] = 0.5 * (edit[to + k] + text[from + k]);
                    }
                }
                total += (len * slabs.len()) as u64;
            }
        }
    }
    for (image, name, dims, data) in edits {
        graph.set_initializer(image, Tensor::from_f32(&name, &dims, &data));
    }
    Ok(total)
}

/// The side of the anchors' inputs: `A` is every anchor Concat's first input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    A,
    B,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

/// A block matched side by side, before the text side is known.
struct Matched {
    layer: usize,
    axis: usize,
    anchors: Vec<OpId>,
    roots: (ValueId, ValueId),
    exits: (Option<ValueId>, Option<ValueId>),
    pairs: BTreeMap<OpId, OpId>,
    weights: Vec<WeightPair>,
    positional: BTreeSet<(ValueId, ValueId)>,
    shared: BTreeSet<ValueId>,
    /// Ops of the layer's MLP sub-blocks.
    mlp_ops: BTreeSet<OpId>,
}

/// Two twin weights, side a then side b, whole or by slices of their feature axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct WeightPair {
    a: ValueId,
    b: ValueId,
    /// Feature axis, range in `a`, range in `b`.
    rows: Option<(usize, [u64; 2], [u64; 2])>,
}

impl Matched {
    fn root(&self, side: Side) -> ValueId {
        if side == Side::A { self.roots.0 } else { self.roots.1 }
    }

    fn exit(&self, side: Side) -> Option<ValueId> {
        if side == Side::A { self.exits.0 } else { self.exits.1 }
    }

    /// The text side when the block alone says: the side whose branch has no residual exit.
    fn text_side_alone(&self) -> Option<Side> {
        match self.exits {
            (None, Some(_)) => Some(Side::A),
            (Some(_), None) => Some(Side::B),
            _ => None,
        }
    }

    /// Whether `self`'s streams enter from `before`'s exits.
    fn follows(&self, before: &Matched) -> bool {
        let exits: BTreeSet<ValueId> = [before.exits.0, before.exits.1].into_iter().flatten().collect();
        exits.len() == 2 && exits == [self.roots.0, self.roots.1].into_iter().collect()
    }

    fn into_block(self, graph: &Graph, index: usize, text: Side, position: &BTreeMap<OpId, usize>) -> DualBlock {
        let name = |v: ValueId| graph.value(v).name.clone();
        let op_name = |op: OpId| graph.op(op).name.clone();
        let swap = |(a, b): (ValueId, ValueId)| if text == Side::A { (a, b) } else { (b, a) };
        let mut ops: Vec<(OpId, OpId)> = self.pairs.iter().map(|(&a, &b)| if text == Side::A { (a, b) } else { (b, a) }).collect();
        ops.sort_by_key(|&(_, image)| position.get(&image).copied().unwrap_or(usize::MAX));
        let mut weights: Vec<TwinWeight> = Vec::new();
        let (mut num, mut den) = (0.0f64, 0.0f64);
        let mut text_parameters = 0;
        let mut counted: BTreeSet<ValueId> = BTreeSet::new();
        for &pair in &self.weights {
            let (t, i) = swap((pair.a, pair.b));
            let rows = pair.rows.map(|(axis, ra, rb)| {
                let (text, image) = if text == Side::A { (ra, rb) } else { (rb, ra) };
                RowRanges { axis, text, image }
            });
            let (Some(tt), Some(ti)) = (constant_tensor(graph, t), constant_tensor(graph, i)) else { continue };
            let d = match &rows {
                None => distance(tt, ti),
                Some(r) => row_distance(tt, ti, r),
            };
            if let Some((n, dd)) = d {
                num += n;
                den += dd;
            }
            // Conversion drops the whole text weight, however many of its slices are twins.
            if counted.insert(t) {
                text_parameters += tt.numel();
            }
            let parameters = match &rows {
                None => tt.numel(),
                Some(r) => (r.text[1] - r.text[0]) * tt.numel() / tt.dims().get(r.axis).copied().unwrap_or(1).max(1),
            };
            weights.push(TwinWeight {
                text: name(t),
                image: name(i),
                shape: tt.dims(),
                parameters,
                divergence: d.and_then(|(n, dd)| (dd > 0.0).then(|| (n / dd).sqrt())),
                rows,
                mlp: graph.consumers(i).iter().any(|(op, _)| self.mlp_ops.contains(op)),
            });
        }
        let (text_root, image_root) = swap(self.roots);
        let (text_exit, image_exit) = if text == Side::A { self.exits } else { (self.exits.1, self.exits.0) };
        DualBlock {
            index,
            layer: self.layer,
            order: if text == Side::A { Order::TextFirst } else { Order::ImageFirst },
            axis: self.axis,
            anchors: self.anchors.iter().map(|&op| op_name(op)).collect(),
            text_input: name(text_root),
            image_input: name(image_root),
            text_output: text_exit.map(name),
            image_output: image_exit.map(name).unwrap_or_default(),
            ops: ops
                .into_iter()
                .map(|(t, i)| TwinOp { op_type: graph.op(i).op_type.clone(), text: op_name(t), image: op_name(i) })
                .collect(),
            weights,
            positional: self.positional.iter().map(|&p| swap(p)).map(|(t, i)| [name(t), name(i)]).collect(),
            shared: self.shared.iter().map(|&v| name(v)).collect(),
            text_parameters,
            divergence: (den > 0.0).then(|| (num / den).sqrt()),
        }
    }
}

/// `(‖a − b‖², ‖b‖²)`, when both are readable and of one size.
fn distance(a: &Tensor, b: &Tensor) -> Option<(f64, f64)> {
    let (a, b) = (a.to_f64_vec()?, b.to_f64_vec()?);
    if a.len() != b.len() {
        return None;
    }
    Some(a.iter().zip(&b).fold((0.0, 0.0), |(n, d), (x, y)| (n + (x - y) * (x - y), d + y * y)))
}

/// The elements of `t` whose index on `axis` is in `range`, in order.
fn slab(t: &Tensor, axis: usize, range: [u64; 2]) -> Option<Vec<f64>> {
    let data = t.to_f64_vec()?;
    let dims = t.dims();
    let size = *dims.get(axis)? as usize;
    let inner: usize = dims[axis + 1..].iter().product::<u64>() as usize;
    let outer: usize = dims[..axis].iter().product::<u64>() as usize;
    let (start, end) = (range[0] as usize, range[1] as usize);
    if start > end || end > size {
        return None;
    }
    let mut out = Vec::with_capacity(outer * (end - start) * inner);
    for o in 0..outer {
        out.extend_from_slice(&data[(o * size + start) * inner..(o * size + end) * inner]);
    }
    Some(out)
}

/// [`distance`] between twin slices.
fn row_distance(text: &Tensor, image: &Tensor, rows: &RowRanges) -> Option<(f64, f64)> {
    let (a, b) = (slab(text, rows.axis, rows.text)?, slab(image, rows.axis, rows.image)?);
    if a.len() != b.len() {
        return None;
    }
    Some(a.iter().zip(&b).fold((0.0, 0.0), |(n, d), (x, y)| (n + (x - y) * (x - y), d + y * y)))
}

/// Matches one layer; `Ok(None)` when it has no joint attention.
fn match_layer(graph: &Graph, layer: &Layer, position: &BTreeMap<OpId, usize>) -> Result<Option<Matched>, String> {
    let Some(attention) = layer.sub_blocks.iter().find(|s| s.kind == BlockKind::Attention) else { return Ok(None) };
    let layer_ops: BTreeSet<OpId> = layer.sub_blocks.iter().flat_map(|s| &s.regions).flat_map(|r| r.ops.iter().copied()).collect();
    let attention_ops: BTreeSet<OpId> = attention.regions.iter().flat_map(|r| r.ops.iter().copied()).collect();
    // Concats of two computed values, grouped by their axis; the rotary restacking of pairs is
    // on the last axis and does not count.
    let mut by_axis: BTreeMap<usize, Vec<OpId>> = BTreeMap::new();
    for &op in &attention_ops {
        let o = graph.op(op);
        if o.op_type != "Concat" || !(o.domain.is_empty() || o.domain == "ai.onnx") {
            continue;
        }
        let inputs = graph.op_inputs(op);
        if inputs.len() != 2 || inputs.iter().any(|v| v.is_none_or(|v| constant_tensor(graph, v).is_some())) {
            continue;
        }
        let Some(rank) = graph.op_output(op, 0).and_then(|v| graph.value(v).shape.as_ref()).map(|s| s.0.len()) else { continue };
        let Some(axis) = o.attr_int("axis").and_then(|a| normalize(a, rank)) else { continue };
        if axis + 1 < rank {
            by_axis.entry(axis).or_default().push(op);
        }
    }
    let mut groups: Vec<(usize, Vec<OpId>)> = by_axis.into_iter().filter(|(_, ops)| ops.len() >= 3).collect();
    let (axis, mut anchors) = match groups.len() {
        0 => return Ok(None),
        1 => groups.remove(0),
        _ => return Err("joint-attention Concats on more than one axis".into()),
    };
    anchors.sort_by_key(|op| position.get(op).copied().unwrap_or(usize::MAX));
    let skips: Vec<ValueId> = attention.regions.iter().filter_map(|r| graph.value_by_name(&r.skip)).collect();
    let mut walk = Walk::new(graph, &layer_ops, skips);
    for &anchor in &anchors {
        let inputs = graph.op_inputs(anchor);
        if let (Some(Some(a)), Some(Some(b))) = (inputs.first(), inputs.get(1)) {
            walk.pair(*a, *b)?;
        }
    }
    let roots = walk.roots.ok_or("the joint attention's inputs do not lead back to the block's residual inputs")?;
    // Each side's exit: from the attention branch whose skip is that side's root, through the
    // sub-blocks that continue the same stream.
    let exit = |root: ValueId| -> Option<ValueId> {
        let root_name = &graph.value(root).name;
        let region = attention.regions.iter().find(|r| &r.skip == root_name)?;
        let mut sum = region.sum.clone();
        for sub in &layer.sub_blocks {
            if let Some(r) = sub.regions.iter().find(|r| r.skip == sum) {
                sum = r.sum.clone();
            }
        }
        graph.value_by_name(&sum)
    };
    let exits = (exit(roots.0), exit(roots.1));
    if let (Some(a), Some(b)) = exits {
        walk.pair(a, b)?;
    }
    if exits == (None, None) {
        return Err("neither stream has a residual exit".into());
    }
    // Every op of the block's residual branches is a twin or part of the joint core; where the
    // text branch ends at the attention, the image ops after it have no twin by design.
    let joint = if exits.0.is_some() && exits.1.is_some() {
        walk.joint_ops(&anchors)
    } else {
        // Through the residual Adds too, which are not ops of the branches.
        let mut within = layer_ops.clone();
        within.extend(layer.sub_blocks.iter().flat_map(|s| &s.regions).map(|r| r.add_op));
        downstream(graph, &anchors, &within)
    };
    let unpaired: Vec<String> = layer_ops
        .iter()
        .filter(|&&op| !walk.pairs.contains_key(&op) && !walk.reverse.contains_key(&op) && !joint.contains(&op) && !is_noop_cast(graph, op))
        .map(|&op| format!("`{}`", graph.op(op).name))
        .collect();
    if !unpaired.is_empty() {
        let shown: Vec<String> = unpaired.iter().take(4).cloned().collect();
        let more = if unpaired.len() > 4 { format!(" and {} more", unpaired.len() - 4) } else { String::new() };
        return Err(format!("ops without a twin: {}{more}", shown.join(", ")));
    }
    let weights = collapse_rows(graph, walk.weights);
    let mlp_ops: BTreeSet<OpId> =
        layer.sub_blocks.iter().filter(|s| s.kind == BlockKind::Mlp).flat_map(|s| &s.regions).flat_map(|r| r.ops.iter().copied()).collect();
    Ok(Some(Matched {
        layer: layer.index,
        axis,
        anchors,
        roots,
        exits,
        pairs: walk.pairs,
        weights,
        positional: walk.positional,
        shared: walk.shared,
        mlp_ops,
    }))
}

/// Binary ops whose operands commute.
const COMMUTATIVE: &[&str] = &["Add", "Mul", "Max", "Min", "Sum", "Mean", "And", "Or", "Xor", "Equal"];

/// A Cast to the type its input already has.
fn is_noop_cast(graph: &Graph, op: OpId) -> bool {
    let o = graph.op(op);
    let from = graph.op_input(op, 0).and_then(|v| graph.value(v).dtype);
    o.op_type == "Cast" && from.is_some() && o.attr_int("to").map(|t| t as i32) == from.map(|d| d.0)
}

/// Row pairs that pair every slice of a weight with the same slice of an equal-shaped twin
/// become one pair of whole weights; the others stay as slices. Order is kept.
fn collapse_rows(graph: &Graph, weights: Vec<WeightPair>) -> Vec<WeightPair> {
    type Rows = Vec<(usize, [u64; 2], [u64; 2])>;
    let mut by_weight: BTreeMap<(ValueId, ValueId), Rows> = BTreeMap::new();
    for w in &weights {
        if let Some(r) = w.rows {
            by_weight.entry((w.a, w.b)).or_default().push(r);
        }
    }
    let whole = |a: ValueId, b: ValueId, rows: &[(usize, [u64; 2], [u64; 2])]| -> bool {
        let (Some(ta), Some(tb)) = (constant_tensor(graph, a), constant_tensor(graph, b)) else { return false };
        let Some(&(axis, _, _)) = rows.first() else { return false };
        let Some(&n) = ta.dims().get(axis) else { return false };
        let mut ranges: Vec<[u64; 2]> = rows.iter().filter(|r| r.1 == r.2).map(|r| r.1).collect();
        ranges.sort();
        let covered = ranges.iter().try_fold(0, |at, r| (r[0] == at).then_some(r[1])) == Some(n);
        ta.dims() == tb.dims() && rows.iter().all(|r| r.1 == r.2) && covered
    };
    let mut out: Vec<WeightPair> = Vec::new();
    for w in weights {
        match w.rows {
            Some(_) if whole(w.a, w.b, &by_weight[&(w.a, w.b)]) => {
                let pair = WeightPair { rows: None, ..w };
                if !out.contains(&pair) {
                    out.push(pair);
                }
            }
            _ => out.push(w),
        }
    }
    out
}

/// Ops of `within` computed from the anchors' outputs, the anchors included.
fn downstream(graph: &Graph, anchors: &[OpId], within: &BTreeSet<OpId>) -> BTreeSet<OpId> {
    let mut seen: BTreeSet<OpId> = anchors.iter().copied().collect();
    let mut stack: Vec<OpId> = anchors.to_vec();
    while let Some(op) = stack.pop() {
        for v in graph.op_outputs(op).into_iter().flatten() {
            for (reader, _) in graph.consumers(v) {
                if within.contains(&reader) && seen.insert(reader) {
                    stack.push(reader);
                }
            }
        }
    }
    seen
}

fn normalize(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    usize::try_from(a).ok().filter(|&a| a < rank)
}

/// The lockstep walk of one block.
struct Walk<'g> {
    graph: &'g Graph,
    layer_ops: &'g BTreeSet<OpId>,
    skips: Vec<ValueId>,
    roots: Option<(ValueId, ValueId)>,
    visited: BTreeSet<(ValueId, ValueId)>,
    /// Side-a op → side-b op, and back.
    pairs: BTreeMap<OpId, OpId>,
    reverse: BTreeMap<OpId, OpId>,
    weights: Vec<WeightPair>,
    positional: BTreeSet<(ValueId, ValueId)>,
    shared: BTreeSet<ValueId>,
    /// Values both sides reach inside the block: the attention core's outputs.
    joint: BTreeSet<ValueId>,
}

impl<'g> Walk<'g> {
    fn new(graph: &'g Graph, layer_ops: &'g BTreeSet<OpId>, skips: Vec<ValueId>) -> Walk<'g> {
        Walk {
            graph,
            layer_ops,
            skips,
            roots: None,
            visited: BTreeSet::new(),
            pairs: BTreeMap::new(),
            reverse: BTreeMap::new(),
            weights: Vec::new(),
            positional: BTreeSet::new(),
            shared: BTreeSet::new(),
            joint: BTreeSet::new(),
        }
    }

    fn name(&self, v: ValueId) -> String {
        match self.graph.producer(v) {
            Some((op, _)) => format!("`{}` ({})", self.graph.op(op).name, self.graph.op(op).op_type),
            None => format!("`{}`", self.graph.value(v).name),
        }
    }

    /// Pairs `a` with `b` and everything they are computed from; a loop over a stack, since a
    /// model decides how deep its graph is.
    fn pair(&mut self, a: ValueId, b: ValueId) -> Result<(), String> {
        let mut stack = vec![(a, b)];
        while let Some((a, b)) = stack.pop() {
            let (a, b) = (self.through_casts(a), self.through_casts(b));
            if !self.visited.insert((a, b)) {
                continue;
            }
            if a == b {
                let inside = self.graph.producer(a).is_some_and(|(op, _)| self.layer_ops.contains(&op));
                if inside {
                    self.joint.insert(a)
                } else {
                    self.shared.insert(a)
                };
                continue;
            }
            match self.roots {
                Some(roots) if roots == (a, b) => continue,
                Some(roots) if a == roots.0 || b == roots.1 || a == roots.1 || b == roots.0 => {
                    return Err(format!("a stream input meets a different value: {} against {}", self.name(a), self.name(b)));
                }
                None if self.skips.contains(&a) || self.skips.contains(&b) => {
                    // With two attention branches both roots are their skips; with one (the text
                    // branch ends at the attention) the other root is whatever meets it.
                    if self.skips.len() == 2 && !(self.skips.contains(&a) && self.skips.contains(&b)) {
                        return Err(format!("a stream input meets a different value: {} against {}", self.name(a), self.name(b)));
                    }
                    self.roots = Some((a, b));
                    continue;
                }
                _ => {}
            }
            match (constant_tensor(self.graph, a), constant_tensor(self.graph, b)) {
                (Some(ta), Some(tb)) => {
                    self.constants(a, b, ta, tb)?;
                    continue;
                }
                (None, None) => {}
                _ => return Err(format!("a constant meets a computed value: {} against {}", self.name(a), self.name(b))),
            }
            let (Some((pa, sa)), Some((pb, sb))) = (self.graph.producer(a), self.graph.producer(b)) else {
                // Two graph inputs, one per stream: per-token tables (a mask per stream).
                if self.graph.producer(a).is_none() && self.graph.producer(b).is_none() {
                    self.positional.insert((a, b));
                    continue;
                }
                return Err(format!("a graph input meets a computed value: {} against {}", self.name(a), self.name(b)));
            };
            if pa == pb {
                // Two outputs of one op: the Split of the joint sequence back into the streams.
                if self.graph.op(pa).op_type == "Split" && self.layer_ops.contains(&pa) {
                    self.joint.extend([a, b]);
                    continue;
                }
                return Err(format!("two outputs of one op {}", self.name(a)));
            }
            if let Some(next) = self.row_slices(pa, pb)? {
                stack.push(next);
                continue;
            }
            let (oa, ob) = (self.graph.op(pa), self.graph.op(pb));
            let same = oa.op_type == ob.op_type
                && oa.domain == ob.domain
                && sa == sb
                && oa.attributes == ob.attributes
                && self.graph.op_inputs(pa).len() == self.graph.op_inputs(pb).len()
                && self.graph.op_outputs(pa).len() == self.graph.op_outputs(pb).len();
            if !same {
                if let Some(next) = self.commuted_unsqueeze(a, b).or_else(|| self.commuted_unsqueeze(b, a).map(|(x, y)| (y, x))) {
                    stack.push(next);
                    continue;
                }
                return Err(format!("no twin: {} against {}", self.name(a), self.name(b)));
            }
            match (self.pairs.get(&pa), self.reverse.get(&pb)) {
                (None, None) => {
                    self.pairs.insert(pa, pb);
                    self.reverse.insert(pb, pa);
                }
                (Some(&x), _) if x == pb => {}
                _ => return Err(format!("an op would have two twins: {} and {}", self.name(a), self.name(b))),
            }
            let (ins_a, mut ins_b) = (self.graph.op_inputs(pa), self.graph.op_inputs(pb));
            // Exporters write `x + y` and `y + x` alike: for a commutative op, the order in
            // which the producers' kinds match.
            if COMMUTATIVE.contains(&oa.op_type.as_str()) && ins_a.len() == 2 {
                let kind = |v: Option<ValueId>| v.map(|v| self.kind(self.through_casts(v)));
                let direct = kind(ins_a[0]) == kind(ins_b[0]) && kind(ins_a[1]) == kind(ins_b[1]);
                let swapped = kind(ins_a[0]) == kind(ins_b[1]) && kind(ins_a[1]) == kind(ins_b[0]);
                if !direct && swapped {
                    ins_b.swap(0, 1);
                }
            }
            for (ia, ib) in ins_a.into_iter().zip(ins_b) {
                match (ia, ib) {
                    (Some(ia), Some(ib)) => stack.push((ia, ib)),
                    (None, None) => {}
                    _ => return Err(format!("an optional input is given on one side only: {}", self.name(a))),
                }
            }
        }
        Ok(())
    }

    /// `op(Unsqueeze(x), c)` on one side against `Unsqueeze(op(y, c))` on the other, with `c`
    /// a scalar: the same values (`(1 + scale)[:, None]` against `1 + scale[:, None]`, SD3's two
    /// adaLN forms). Pairs the four ops and returns `(x, y)` to walk on.
    fn commuted_unsqueeze(&mut self, a: ValueId, b: ValueId) -> Option<(ValueId, ValueId)> {
        let g = self.graph;
        let (pa, _) = g.producer(a)?;
        let (ub, _) = g.producer(b)?;
        let scalar_op = |op: OpId| -> Option<(ValueId, Vec<f64>)> {
            let o = g.op(op);
            if !matches!(o.op_type.as_str(), "Add" | "Mul") {
                return None;
            }
            let ins = g.op_inputs(op);
            let (Some(Some(x)), Some(Some(y))) = (ins.first(), ins.get(1)) else { return None };
            let (x, y) = (*x, *y);
            let c = |v: ValueId| constant_tensor(g, v).filter(|t| t.numel() == 1).and_then(|t| t.to_f64_vec());
            match (c(x), c(y)) {
                (None, Some(k)) => Some((x, k)),
                (Some(k), None) => Some((y, k)),
                _ => None,
            }
        };
        let unsqueeze = |op: OpId| -> Option<(ValueId, Vec<i64>)> {
            if g.op(op).op_type != "Unsqueeze" {
                return None;
            }
            let axes = g.op_input(op, 1).and_then(|v| constant_tensor(g, v)).and_then(|t| t.to_i64_vec())?;
            Some((g.op_input(op, 0)?, axes))
        };
        let (ua_out, ka) = scalar_op(pa)?;
        let (ua, _) = g.producer(ua_out)?;
        let (xa, axes_a) = unsqueeze(ua)?;
        let (yb_out, axes_b) = unsqueeze(ub)?;
        let (pb, _) = g.producer(yb_out)?;
        let (xb, kb) = scalar_op(pb)?;
        if g.op(pa).op_type != g.op(pb).op_type || ka != kb || axes_a != axes_b {
            return None;
        }
        for (x, y) in [(pa, pb), (ua, ub)] {
            if self.pairs.contains_key(&x) || self.reverse.contains_key(&y) {
                return None;
            }
        }
        for (x, y) in [(pa, pb), (ua, ub)] {
            self.pairs.insert(x, y);
            self.reverse.insert(y, x);
        }
        Some((xa, xb))
    }

    /// What computes `v`, coarsely: its producer's op type, or whether it is a constant or a
    /// graph input.
    fn kind(&self, v: ValueId) -> String {
        if constant_tensor(self.graph, v).is_some() {
            return "constant".into();
        }
        match self.graph.producer(v) {
            Some((op, _)) => self.graph.op(op).op_type.clone(),
            None => "input".into(),
        }
    }

    /// `v`, or what a chain of Casts to the type it already has reads: an exporter adds those
    /// on one stream only (SD3's text modulation), and they compute nothing.
    fn through_casts(&self, mut v: ValueId) -> ValueId {
        while let Some((op, _)) = self.graph.producer(v) {
            let Some(input) = self.graph.op_input(op, 0) else { break };
            // A residual input is where the walk stops, whatever computed it.
            if self.skips.contains(&v) || !is_noop_cast(self.graph, op) {
                break;
            }
            v = input;
        }
        v
    }

    /// Two Slices, each of one feature range of a Gemm's output with constant weights (adaLN
    /// modulation chunks): their twins are those weights' slices, compared row by row, since a
    /// text modulation may compute fewer chunks, or in another order, than the image's. Returns
    /// the Gemms' activation inputs to walk on, or `None` when the pattern does not apply.
    fn row_slices(&mut self, pa: OpId, pb: OpId) -> Result<Option<(ValueId, ValueId)>, String> {
        let (Some(ra), Some(rb)) = (self.gemm_slice(pa), self.gemm_slice(pb)) else { return Ok(None) };
        let (ga, gb) = (ra.0, rb.0);
        if self.graph.op(ga).attributes != self.graph.op(gb).attributes || ra.1 != rb.1 || ra.4.is_some() != rb.4.is_some() {
            return Ok(None);
        }
        if rb.3[1] - rb.3[0] != ra.3[1] - ra.3[0] {
            return Err(format!("modulation chunks of different sizes: `{}` against `{}`", self.graph.op(pa).name, self.graph.op(pb).name));
        }
        for (x, y) in [(pa, pb), (ga, gb)] {
            match (self.pairs.get(&x), self.reverse.get(&y)) {
                (None, None) => {
                    self.pairs.insert(x, y);
                    self.reverse.insert(y, x);
                }
                (Some(&z), _) if z == y => {}
                _ => return Err(format!("an op would have two twins: `{}`", self.graph.op(x).name)),
            }
        }
        self.weights.push(WeightPair { a: ra.2, b: rb.2, rows: Some((ra.1, ra.3, rb.3)) });
        if let (Some(ca), Some(cb)) = (ra.4, rb.4) {
            self.weights.push(WeightPair { a: ca, b: cb, rows: Some((0, ra.3, rb.3)) });
        }
        let (Some(xa), Some(xb)) = (self.graph.op_input(ga, 0), self.graph.op_input(gb, 0)) else { return Ok(None) };
        Ok(Some((xa, xb)))
    }

    /// For a Slice of one range of the last axis of a Gemm's output whose B (and C, if any) are
    /// private float constants with C of one axis: the Gemm, B's feature axis, B, the range,
    /// and C.
    #[allow(clippy::type_complexity)]
    fn gemm_slice(&self, slice: OpId) -> Option<(OpId, usize, ValueId, [u64; 2], Option<ValueId>)> {
        let g = self.graph;
        if g.op(slice).op_type != "Slice" {
            return None;
        }
        let int = |slot: usize| g.op_input(slice, slot).and_then(|v| constant_tensor(g, v)).and_then(|t| t.to_i64_vec());
        let (Some(starts), Some(ends), Some(axes)) = (int(1), int(2), int(3)) else { return None };
        if int(4).is_some_and(|steps| steps != [1]) || g.op_input(slice, 4).is_some() && int(4).is_none() {
            return None;
        }
        let (&[start], &[end], &[axis]) = (&starts[..], &ends[..], &axes[..]) else { return None };
        let (gemm, _) = g.producer(g.op_input(slice, 0)?)?;
        let o = g.op(gemm);
        if o.op_type != "Gemm" || o.attr_int("transA").unwrap_or(0) != 0 {
            return None;
        }
        if normalize(axis, 2) != Some(1) {
            return None;
        }
        let b = g.op_input(gemm, 1)?;
        let tb = constant_tensor(g, b)?;
        let dims = tb.dims();
        let feature = if o.attr_int("transB").unwrap_or(0) == 1 { 0 } else { 1 };
        let n = *dims.get(feature)? as i64;
        if dims.len() != 2 || !tb.dtype().is_float() || g.consumers(b).len() > 1 {
            return None;
        }
        let clamp = |x: i64| (if x < 0 { x + n } else { x }).clamp(0, n) as u64;
        let range = [clamp(start), clamp(end)];
        if range[0] >= range[1] {
            return None;
        }
        let c = match g.op_input(gemm, 2) {
            None => None,
            Some(c) => {
                let tc = constant_tensor(g, c)?;
                if tc.dims() != [n as u64] || g.consumers(c).len() > 1 {
                    return None;
                }
                Some(c)
            }
        };
        Some((gemm, feature, b, range, c))
    }

    /// Two constants met in step.
    fn constants(&mut self, a: ValueId, b: ValueId, ta: &Tensor, tb: &Tensor) -> Result<(), String> {
        if ta.dtype() == tb.dtype() && ta.dims() == tb.dims() && ta.to_f64_vec().is_some() && ta.to_f64_vec() == tb.to_f64_vec() {
            return Ok(());
        }
        if ta.dtype() != tb.dtype() {
            return Err(format!("constants of different types: {} against {}", self.name(a), self.name(b)));
        }
        if !ta.dtype().is_float() {
            // Shape arguments, which may name each stream's own length.
            if ta.dims() == tb.dims() {
                return Ok(());
            }
            return Err(format!("shape arguments of different sizes: {} against {}", self.name(a), self.name(b)));
        }
        let private = |v: ValueId| self.graph.consumers(v).len() <= 1;
        if private(a) && private(b) {
            if ta.dims() != tb.dims() {
                return Err(format!(
                    "twin weights of different shapes: {} {:?} against {} {:?}",
                    self.name(a),
                    ta.dims(),
                    self.name(b),
                    tb.dims()
                ));
            }
            self.weights.push(WeightPair { a, b, rows: None });
        } else {
            // Read by several ops (every block): a table of the stream's positions.
            self.positional.insert((a, b));
        }
        Ok(())
    }

    /// The joint core: every op computing a joint value, back to the anchors.
    fn joint_ops(&self, anchors: &[OpId]) -> BTreeSet<OpId> {
        let mut seen: BTreeSet<OpId> = anchors.iter().copied().collect();
        let mut stack: Vec<ValueId> = self.joint.iter().copied().collect();
        while let Some(v) = stack.pop() {
            let Some((op, _)) = self.graph.producer(v) else { continue };
            if !self.layer_ops.contains(&op) || self.pairs.contains_key(&op) || self.reverse.contains_key(&op) || !seen.insert(op) {
                continue;
            }
            stack.extend(self.graph.op_inputs(op).into_iter().flatten());
        }
        seen
    }
}

/// For the last matched block of a chain: when a later attention layer has one residual branch
/// (its text branch ends at the attention) on one of this block's exits, that exit is the
/// image, and the other side the text.
fn single_branch_after(graph: &Graph, blocks: &BlockReport, m: &Matched) -> Option<Side> {
    let (Some(ea), Some(eb)) = m.exits else { return None };
    let later = blocks.layers.iter().filter(|l| l.index > m.layer);
    for layer in later {
        let Some(att) = layer.sub_blocks.iter().find(|s| s.kind == BlockKind::Attention) else { continue };
        if let [region] = &att.regions[..] {
            let skip = graph.value_by_name(&region.skip);
            if skip == Some(ea) {
                return Some(Side::B);
            }
            if skip == Some(eb) {
                return Some(Side::A);
            }
        }
    }
    None
}

/// For the last block of a chain whose streams both continue: the side the model drops, found
/// where both exits are joined by one Concat on the block's axis and the first Slice of that
/// joint sequence on the same axis keeps one of them.
fn dropped_side(graph: &Graph, m: &Matched, order: &[OpId], position: &BTreeMap<OpId, usize>) -> Option<Side> {
    let (Some(ea), Some(eb)) = m.exits else { return None };
    let join = graph.consumers(ea).into_iter().map(|(op, _)| op).find(|&op| {
        let o = graph.op(op);
        let inputs = graph.op_inputs(op);
        o.op_type == "Concat" && inputs.len() == 2 && inputs.contains(&Some(eb))
    })?;
    let inputs = graph.op_inputs(join);
    let joined = graph.op_output(join, 0)?;
    let rank = graph.value(joined).shape.as_ref()?.0.len();
    let axis = normalize(graph.op(join).attr_int("axis")?, rank)?;
    // What the graph's outputs are computed from: a stack of single-stream blocks may split
    // and re-join the streams in every block, and only the last slice that reaches an output
    // says which tokens the model keeps.
    let mut live: BTreeSet<ValueId> = graph.outputs.iter().copied().collect();
    for &op in order.iter().rev() {
        if graph.op_outputs(op).into_iter().flatten().any(|v| live.contains(&v)) {
            live.extend(graph.op_inputs(op).into_iter().flatten());
        }
    }
    let mut last: Option<Side> = None;
    // Values computed from the joint sequence, followed in topological order.
    let mut reach: BTreeSet<ValueId> = BTreeSet::from([joined]);
    for &op in &order[position.get(&join)? + 1..] {
        let reads = graph.op_inputs(op);
        if !reads.iter().flatten().any(|v| reach.contains(v)) {
            continue;
        }
        let o = graph.op(op);
        if o.op_type == "Slice" && reads.first().copied().flatten().is_some_and(|v| reach.contains(&v)) {
            let int = |slot: usize| reads.get(slot).copied().flatten().and_then(|v| constant_tensor(graph, v)).and_then(|t| t.to_i64_vec());
            if let (Some(starts), Some(axes)) = (int(1), int(3))
                && let ([start], [a]) = (&starts[..], &axes[..])
                && normalize(*a, rank) == Some(axis)
                && graph.op_output(op, 0).is_some_and(|v| live.contains(&v))
            {
                // Starting at 0 keeps the first input's tokens; past it, the second's.
                let kept = if *start == 0 { inputs[0] } else { inputs[1] };
                let kept_side = if kept == Some(ea) { Side::A } else { Side::B };
                last = Some(kept_side.other());
            }
        }
        reach.extend(graph.op_outputs(op).into_iter().flatten());
    }
    last
}
