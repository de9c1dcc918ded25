//! Finding residual blocks, grouping them into layers and layers into stacks.
//!
//! A *region* is the residual branch of one `y = Add(x, f(x))` (or a gated `x + g ⊙ f(x)`): the
//! ops of `f` that read `x`'s data, directly or through other ops of `f`. Everything else `f`
//! reads is a *side input*: a weight, a constant, or a tensor that does not depend on `x`
//! (a timestep embedding, a rotary table, a mask, an adaLN modulation, the other stream of a
//! dual-stream block). With side inputs taken as free, "every node of R is dominated by x" is
//! exactly "every node of R depends on x", which is how regions are built. Shape and Size read
//! no data, so an op that only reads the shape of `x` is a side input too: removing the block
//! keeps `x`, so what is computed from its shape stays computable.
//!
//! A region is removable when `shape(y) == shape(x)` and its values reach the rest of the graph
//! only through the Add: the Add post-dominates every op of the region (checked on the
//! post-dominator tree of the op graph). Where it does not, the branch escapes into another
//! region: the two residual Adds of a joint attention (MMDiT) share the attention core, and
//! such regions become one sub-block, whose union must then reach the graph only through its
//! Adds. An Add whose two operands fork from a common dominator and both carry weights is a
//! shortcut that is not an identity (ResNet's downsample): it is declined with that reason.
//!
//! Sub-blocks become layers: an attention sub-block starts a layer, and the MLP sub-blocks that
//! follow its exits on the same streams join it (sequential attention + MLP, both streams of a
//! dual-stream block). Consecutive layers of equal structural signature form a stack.
//!
//! The analysis reads the graph only and never panics on it; every list is in topological order.

use super::score::{self, DataFreeScore};
use petgraph::algo::dominators::{Dominators, simple_fast};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::Reversed;
use prunec_ir::{Graph, OpCost, OpId, ValueId, constant_tensor, op_cost};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// What [`find_blocks`] found in a graph.
///
/// Its JSON form (`prunec blocks --json`) is stable; every field is described on its type, and
/// handles into the graph are left out (they only mean something for the graph analysed):
///
/// ```text
/// { "layers": [ { "index", "stack", "position", "nodes", "parameters", "macs", "macs_incomplete",
///                 "signature",
///                 "score": { "protected", "weight_proxy" (number or null), "gates": [number] },
///                 "sub_blocks": [ { "kind": "attention" | "mlp" | "convolution" | "other", "nodes",
///                                   "regions": [ { "add", "sum", "skip", "branch",
///                                                  "gate" (string or null), "nodes" } ] } ] } ],
///   "stacks": [ { "index", "layers": [index], "signature" } ],
///   "declined": [ { "add", "text",
///                   "reason": { "kind": "non_identity_shortcut", "shortcut": [node] }
///                           | { "kind": "internal_value_used", "value", "reader" (node or null) }
///                           | { "kind": "shape_change", "skip", "output" }
///                           | { "kind": "shape_unknown" }
///                           | { "kind": "nested", "inner": [node] } } ] }
/// ```
#[derive(Clone, Debug, Default, Serialize)]
pub struct BlockReport {
    /// Removable layers, in topological order; `layers[i].index == i`.
    pub layers: Vec<Layer>,
    /// Runs of consecutive layers of equal structure.
    pub stacks: Vec<Stack>,
    /// Residual candidates that cannot be removed, with the reason.
    pub declined: Vec<Declined>,
}

/// A layer: one or more sub-blocks removed together.
#[derive(Clone, Debug, Serialize)]
pub struct Layer {
    /// Position among all layers of the graph.
    pub index: usize,
    /// The stack it belongs to ([`Stack::index`]).
    pub stack: usize,
    /// Position inside its stack.
    pub position: usize,
    /// Its sub-blocks, in topological order.
    pub sub_blocks: Vec<SubBlock>,
    /// Ops removing the whole layer deletes: the residual Adds, the branches and the side
    /// computations only they read.
    pub nodes: usize,
    /// Floating-point weight elements removing the layer deletes.
    pub parameters: u64,
    /// Multiply-accumulates of those ops at the known shapes.
    pub macs: u64,
    /// Whether some of those ops have MACs that the known shapes cannot count.
    pub macs_incomplete: bool,
    /// A digest of the structural signature (op sequence, attributes, weight shapes, edges).
    pub signature: String,
    /// The data-free score (lower: a better candidate for removal).
    pub score: DataFreeScore,
    /// Everything the signature covers, in full, to compare layers.
    #[serde(skip)]
    pub(crate) signature_text: String,
    /// See [`Layer::weights`].
    #[serde(skip)]
    pub(crate) weights: Vec<ValueId>,
}

impl Layer {
    /// Its sub-blocks' kinds, with the stream count where one joins several:
    /// `attention×2 mlp mlp` (what `prunec blocks` prints).
    pub fn sub_block_summary(&self) -> String {
        let names: Vec<String> = self
            .sub_blocks
            .iter()
            .map(|s| if s.regions.len() > 1 { format!("{}×{}", s.kind, s.regions.len()) } else { s.kind.to_string() })
            .collect();
        names.join(" ")
    }
}

impl Layer {
    /// The float weights only this layer reads, in signature order: what removing it deletes,
    /// and what `Merge::Average` averages position by position across layers of one stack.
    pub fn weights(&self) -> &[ValueId] {
        &self.weights
    }
}

/// A sub-block: residual regions that can only be removed together (one region, or the two
/// streams of a joint attention).
#[derive(Clone, Debug, Serialize)]
pub struct SubBlock {
    /// What the branch computes.
    pub kind: BlockKind,
    /// Its regions, one per stream.
    pub regions: Vec<Region>,
    /// Ops of the branches, shared ones once (the residual Adds are not counted).
    pub nodes: usize,
}

/// One residual branch `y = x + f(x)` or `y = x + g ⊙ f(x)`.
#[derive(Clone, Debug, Serialize)]
pub struct Region {
    /// Name of the residual Add node.
    pub add: String,
    /// Its output `y`, the sum.
    pub sum: String,
    /// The skip input `x`.
    pub skip: String,
    /// The branch input of the Add: `f(x)`, or `g ⊙ f(x)`.
    pub branch: String,
    /// The gate `g`, for a gated residual.
    pub gate: Option<String>,
    /// Ops of the branch (the residual Add not counted).
    pub nodes: usize,
    #[serde(skip)]
    pub(crate) add_op: OpId,
    /// Which input slot of the Add is the skip.
    #[serde(skip)]
    pub(crate) skip_slot: usize,
    #[serde(skip)]
    pub(crate) branch_value: ValueId,
    #[serde(skip)]
    pub(crate) gate_value: Option<ValueId>,
    #[serde(skip)]
    pub(crate) ops: Vec<OpId>,
}

/// What a sub-block computes, from the ops of its branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockKind {
    /// An attention core (Softmax, or a fused attention op) is inside.
    Attention,
    /// Dense layers (MatMul, Gemm) and no attention core.
    Mlp,
    /// Convolutions and no attention core or dense layer.
    Convolution,
    /// Anything else with weights.
    Other,
}

impl fmt::Display for BlockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlockKind::Attention => "attention",
            BlockKind::Mlp => "mlp",
            BlockKind::Convolution => "conv",
            BlockKind::Other => "other",
        })
    }
}

/// Consecutive layers of equal structural signature.
#[derive(Clone, Debug, Serialize)]
pub struct Stack {
    /// Position among the stacks.
    pub index: usize,
    /// Its layers' indices, in order.
    pub layers: Vec<usize>,
    /// The signature digest its layers share.
    pub signature: String,
}

/// A residual candidate that is not removable.
#[derive(Clone, Debug, Serialize)]
pub struct Declined {
    /// Name of the Add node.
    pub add: String,
    /// Why.
    pub reason: DeclineReason,
    /// The reason in words.
    pub text: String,
}

/// Why a residual candidate is not removable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeclineReason {
    /// The shortcut computes something (ResNet's downsample), so removing the branch would not
    /// leave an identity.
    NonIdentityShortcut {
        /// The weighted ops on the shortcut.
        shortcut: Vec<String>,
    },
    /// A value of the branch is read outside it, or is a graph output (a KV cache, a returned
    /// hidden state).
    InternalValueUsed {
        /// The value.
        value: String,
        /// The node outside the branch that reads it; `None` for a graph output.
        reader: Option<String>,
    },
    /// The Add's output does not have the shape of the skip.
    ShapeChange {
        /// Shape of the skip.
        skip: String,
        /// Shape of the Add's output.
        output: String,
    },
    /// The shapes the proof needs are not known.
    ShapeUnknown,
    /// The branch holds other residual blocks; those are the layers.
    Nested {
        /// The inner Adds.
        inner: Vec<String>,
    },
}

impl fmt::Display for DeclineReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeclineReason::NonIdentityShortcut { shortcut } => {
                write!(f, "the shortcut is not an identity: it passes through {}", shortcut.join(", "))
            }
            DeclineReason::InternalValueUsed { value, reader: Some(reader) } => {
                write!(f, "internal value `{value}` is read outside the branch by `{reader}`")
            }
            DeclineReason::InternalValueUsed { value, reader: None } => write!(f, "internal value `{value}` is a graph output"),
            DeclineReason::ShapeChange { skip, output } => write!(f, "shape change: the skip is {skip}, the sum {output}"),
            DeclineReason::ShapeUnknown => f.write_str("the shapes of the skip and the sum are not known"),
            DeclineReason::Nested { inner } => write!(f, "the branch holds other residual blocks ({})", inner.join(", ")),
        }
    }
}

/// Op types that carry learned weights when one input is a constant.
const WEIGHTED: &[&str] = &["Conv", "ConvTranspose", "Einsum", "Gemm", "MatMul"];
/// Op types that make a branch an attention.
const ATTENTION_CORE: &[&str] = &["Attention", "GroupQueryAttention", "MultiHeadAttention", "Softmax"];
/// Ops that read only the shape of their input, not its data.
const SHAPE_ONLY: &[&str] = &["Shape", "Size"];
/// The most ops a shortcut that is not an identity has (a projection: ResNet's Conv and
/// BatchNormalization, ResNet-D's AvgPool before them); longer ones are not shortcuts.
const SHORTCUT_OPS: usize = 4;
/// How far a stream is followed from a sub-block's exit through single-input ops (a post-norm
/// LayerNormalization, a ReLU after a ResNet sum) to the next sub-block's skip.
const STREAM_HOPS: usize = 4;

/// Finds the removable residual blocks of a graph, its layers and stacks, and the candidates
/// that are not removable.
pub fn find_blocks(graph: &Graph) -> BlockReport {
    let Ok(order) = graph.topo_order() else { return BlockReport::default() };
    let index = OpGraph::new(graph, order);
    let (candidates, mut declined) = index.candidates();
    let (sub_blocks, more_declined) = index.sub_blocks(candidates);
    declined.extend(more_declined);
    declined.sort_by_key(|(position, _)| *position);
    let layers = index.layers(sub_blocks);
    let stacks = stacks(&layers);
    let mut report = BlockReport { layers, stacks, declined: declined.into_iter().map(|(_, d)| d).collect() };
    let (layers, stacks) = (&mut report.layers, &report.stacks);
    for stack in stacks {
        for (position, &layer) in stack.layers.iter().enumerate() {
            layers[layer].stack = stack.index;
            layers[layer].position = position;
        }
    }
    let scores = score::data_free(graph, layers);
    for (layer, score) in layers.iter_mut().zip(scores) {
        layer.score = score;
    }
    report
}

/// The graph seen as ops, with the dominator trees the analysis asks.
struct OpGraph<'g> {
    graph: &'g Graph,
    order: Vec<OpId>,
    position: BTreeMap<OpId, usize>,
    /// Values that depend on a runtime input.
    dynamic: BTreeSet<ValueId>,
    node: BTreeMap<OpId, NodeIndex>,
    op_of: BTreeMap<NodeIndex, OpId>,
    /// From a root feeding every op that reads a runtime input.
    dominators: Dominators<NodeIndex>,
    /// From a sink fed by every op producing a graph output.
    post_dominators: Dominators<NodeIndex>,
}

/// A residual Add whose branch depends on its skip, before grouping.
struct Candidate {
    position: usize,
    region: Region,
    ops: BTreeSet<OpId>,
    /// Other candidates its branch escapes into.
    partners: BTreeSet<usize>,
    /// Where the branch escapes to no region.
    leak: Option<DeclineReason>,
}

impl<'g> OpGraph<'g> {
    fn new(graph: &'g Graph, order: Vec<OpId>) -> OpGraph<'g> {
        let position: BTreeMap<OpId, usize> = order.iter().enumerate().map(|(i, &op)| (op, i)).collect();
        let mut dynamic: BTreeSet<ValueId> = graph.inputs.iter().copied().filter(|&v| graph.value(v).initializer().is_none()).collect();
        for &op in &order {
            if reads(graph, op).iter().any(|v| dynamic.contains(v)) {
                dynamic.extend(graph.op_outputs(op).into_iter().flatten());
            }
        }
        let mut dag: DiGraph<(), ()> = DiGraph::new();
        let root = dag.add_node(());
        let sink = dag.add_node(());
        let node: BTreeMap<OpId, NodeIndex> = order.iter().map(|&op| (op, dag.add_node(()))).collect();
        let op_of = node.iter().map(|(&op, &n)| (n, op)).collect();
        for &op in &order {
            for v in reads(graph, op) {
                match graph.producer(v) {
                    Some((p, _)) => {
                        dag.update_edge(node[&p], node[&op], ());
                    }
                    None if dynamic.contains(&v) => {
                        dag.update_edge(root, node[&op], ());
                    }
                    None => {}
                }
            }
            if graph.op_outputs(op).into_iter().flatten().any(|v| graph.is_output(v)) {
                dag.update_edge(node[&op], sink, ());
            }
        }
        let dominators = simple_fast(&dag, root);
        let post_dominators = simple_fast(Reversed(&dag), sink);
        OpGraph { graph, order, position, dynamic, node, op_of, dominators, post_dominators }
    }

    fn op_name(&self, op: OpId) -> String {
        let o = self.graph.op(op);
        if o.name.is_empty() { format!("{} #{}", o.op_type, self.position[&op]) } else { o.name.clone() }
    }

    fn value_name(&self, v: ValueId) -> String {
        self.graph.value(v).name.clone()
    }

    fn is_weighted(&self, op: OpId) -> bool {
        let o = self.graph.op(op);
        default_domain(&o.domain)
            && WEIGHTED.contains(&o.op_type.as_str())
            && self.graph.op_inputs(op).into_iter().flatten().any(|v| !self.dynamic.contains(&v))
    }

    /// The ops that read `x`'s data, directly or through each other (not through Shape or Size).
    fn data_dependents(&self, x: ValueId) -> BTreeSet<OpId> {
        let mut found = BTreeSet::new();
        let mut stack = vec![x];
        while let Some(v) = stack.pop() {
            for (reader, _) in self.graph.consumers(v) {
                let o = self.graph.op(reader);
                if SHAPE_ONLY.contains(&o.op_type.as_str()) && default_domain(&o.domain) {
                    continue;
                }
                if found.insert(reader) {
                    stack.extend(self.graph.op_outputs(reader).into_iter().flatten());
                }
            }
        }
        found
    }

    /// The ops of `within` that `b` is computed from through ops of `within`.
    fn cone(&self, b: ValueId, within: &BTreeSet<OpId>) -> BTreeSet<OpId> {
        let mut found = BTreeSet::new();
        let mut stack = vec![b];
        while let Some(v) = stack.pop() {
            let Some((p, _)) = self.graph.producer(v) else { continue };
            if within.contains(&p) && found.insert(p) {
                stack.extend(reads(self.graph, p));
            }
        }
        found
    }

    fn post_dominated_by(&self, op: OpId, by: OpId) -> bool {
        let target = self.node[&by];
        match self.post_dominators.strict_dominators(self.node[&op]) {
            Some(mut chain) => chain.any(|n| n == target),
            // An op no graph output depends on is dead: nothing outside reads it.
            None => true,
        }
    }

    /// Every residual Add whose branch reads its skip, and the Adds declined on the way.
    fn candidates(&self) -> (Vec<Candidate>, Vec<(usize, Declined)>) {
        let graph = self.graph;
        let mut candidates = Vec::new();
        let mut declined = Vec::new();
        // Sums whose skip is broadcast up to them, with their branches.
        let mut stretched = Vec::new();
        for &add in &self.order {
            let o = graph.op(add);
            if o.op_type != "Add" || !default_domain(&o.domain) {
                continue;
            }
            let inputs = graph.op_inputs(add);
            let (Some(&Some(a)), Some(&Some(b)), Some(y)) = (inputs.first(), inputs.get(1), graph.op_output(add, 0)) else { continue };
            let floating = |v: ValueId| graph.value(v).dtype.is_none_or(|d| d.is_float());
            if inputs.len() != 2 || !self.dynamic.contains(&a) || !self.dynamic.contains(&b) || !floating(y) {
                continue;
            }
            let position = self.position[&add];
            let decline = |reason: DeclineReason| (position, Declined { add: self.op_name(add), text: reason.to_string(), reason });
            let produced_by = |v: ValueId, ops: &BTreeSet<OpId>| graph.producer(v).is_some_and(|(p, _)| ops.contains(&p));
            let after_a = self.data_dependents(a);
            let (skip_slot, skip, branch, dependents) = if produced_by(b, &after_a) {
                (0, a, b, after_a)
            } else {
                let after_b = self.data_dependents(b);
                if produced_by(a, &after_b) {
                    (1, b, a, after_b)
                } else {
                    if let Some(shortcut) = self.non_identity_shortcut(a, b, y) {
                        declined.push(decline(DeclineReason::NonIdentityShortcut { shortcut }));
                    }
                    continue;
                }
            };
            let ops = self.cone(branch, &dependents);
            if !ops.iter().any(|&op| self.is_weighted(op)) {
                // Arithmetic such as GELU's `x + 0.044715·x³`, not a block.
                continue;
            }
            match (&graph.value(skip).shape, &graph.value(y).shape) {
                (Some(s), Some(t)) if s == t && s.0.iter().all(|d| *d != prunec_ir::Dim::Unknown) => {}
                // The sum can only differ from its skip by broadcasting the skip up.
                (Some(s), Some(t)) if skip_broadcasts(s, t) => {
                    let reason = DeclineReason::ShapeChange { skip: s.to_string(), output: t.to_string() };
                    stretched.push((position, Declined { add: self.op_name(add), text: reason.to_string(), reason }, ops));
                    continue;
                }
                _ => {
                    declined.push(decline(DeclineReason::ShapeUnknown));
                    continue;
                }
            }
            let gate = self.gate(branch, &ops);
            let region = Region {
                add: self.op_name(add),
                sum: self.value_name(y),
                skip: self.value_name(skip),
                branch: self.value_name(branch),
                gate: gate.map(|g| self.value_name(g)),
                nodes: ops.len(),
                add_op: add,
                skip_slot,
                branch_value: branch,
                gate_value: gate,
                ops: self.sorted(&ops),
            };
            candidates.push(Candidate { position, region, ops, partners: BTreeSet::new(), leak: None });
        }
        // Innermost blocks are the layers: a branch holding other candidates' sums is a stage.
        let adds: BTreeMap<OpId, usize> = candidates.iter().enumerate().map(|(i, c)| (c.region.add_op, i)).collect();
        // A broadcast skip whose "branch" spans whole layers is a tensor added in every layer (an
        // attention mask), not a residual stream; any other is a residual that changes shape.
        for (position, d, ops) in stretched {
            if !ops.iter().any(|op| adds.contains_key(op)) {
                declined.push((position, d));
            }
        }
        let mut kept = Vec::new();
        for c in candidates {
            let inner: Vec<String> =
                self.sorted(&c.ops).into_iter().filter(|op| adds.contains_key(op)).map(|op| self.op_name(op)).collect();
            if inner.is_empty() {
                kept.push(c);
            } else {
                let reason = DeclineReason::Nested { inner };
                declined.push((c.position, Declined { add: c.region.add.clone(), text: reason.to_string(), reason }));
            }
        }
        (kept, declined)
    }

    /// The gate of `branch = Mul(g, f(x))`: the operand that does not depend on the skip.
    fn gate(&self, branch: ValueId, ops: &BTreeSet<OpId>) -> Option<ValueId> {
        let (mul, _) = self.graph.producer(branch)?;
        let o = self.graph.op(mul);
        if o.op_type != "Mul" || !default_domain(&o.domain) {
            return None;
        }
        let inputs: Vec<ValueId> = self.graph.op_inputs(mul).into_iter().flatten().collect();
        let inside = |v: &ValueId| self.graph.producer(*v).is_some_and(|(p, _)| ops.contains(&p));
        match inputs[..] {
            [p, q] if inside(&p) && !inside(&q) && self.dynamic.contains(&q) => Some(q),
            [p, q] if inside(&q) && !inside(&p) && self.dynamic.contains(&p) => Some(p),
            _ => None,
        }
    }

    /// For an Add of two operands that fork from one op and both pass through weights, the
    /// shorter side short enough to be a projection shortcut: its weighted ops.
    fn non_identity_shortcut(&self, a: ValueId, b: ValueId, y: ValueId) -> Option<Vec<String>> {
        let shapes = [a, b, y].map(|v| self.graph.value(v).shape.clone());
        if shapes[0].is_none() || shapes.iter().any(|s| s != &shapes[0]) {
            return None;
        }
        let (pa, _) = self.graph.producer(a)?;
        let (pb, _) = self.graph.producer(b)?;
        let above_a: BTreeSet<NodeIndex> = self.dominators.dominators(self.node[&pa])?.collect();
        let fork = self.dominators.dominators(self.node[&pb])?.find(|n| above_a.contains(n))?;
        let fork = *self.op_of.get(&fork)?;
        let fork_out: BTreeSet<ValueId> = self.graph.op_outputs(fork).into_iter().flatten().collect();
        let side = |v: ValueId| -> BTreeSet<OpId> {
            let mut dependents = BTreeSet::new();
            for &x in &fork_out {
                dependents.extend(self.data_dependents(x));
            }
            self.cone(v, &dependents)
        };
        let (side_a, side_b) = (side(a), side(b));
        let weighted = |s: &BTreeSet<OpId>| s.iter().copied().filter(|&op| self.is_weighted(op)).collect::<Vec<_>>();
        let (wa, wb) = (weighted(&side_a), weighted(&side_b));
        if wa.is_empty() || wb.is_empty() {
            return None;
        }
        let (shortcut, shortcut_ops) = if side_a.len() <= side_b.len() { (wa, side_a.len()) } else { (wb, side_b.len()) };
        if shortcut_ops > SHORTCUT_OPS {
            // Two deep paths meeting (an FPN's top-down sum) are no residual block at all.
            return None;
        }
        Some(self.sorted(&shortcut.into_iter().collect()).into_iter().map(|op| self.op_name(op)).collect())
    }

    fn sorted(&self, ops: &BTreeSet<OpId>) -> Vec<OpId> {
        let mut v: Vec<OpId> = ops.iter().copied().collect();
        v.sort_by_key(|op| self.position[op]);
        v
    }

    /// Values produced by `ops` that reach a graph output without passing through `ops` or `stops`:
    /// the first such value and the reader that leads it out. Ops of `regions` are not passed
    /// either: reaching one names it as a partner instead.
    fn escapes(
        &self,
        ops: &BTreeSet<OpId>,
        stops: &BTreeSet<OpId>,
        regions: &BTreeMap<OpId, usize>,
    ) -> (BTreeSet<usize>, Option<DeclineReason>) {
        let mut partners = BTreeSet::new();
        let mut seen: BTreeSet<OpId> = BTreeSet::new();
        for &op in ops {
            for v in self.graph.op_outputs(op).into_iter().flatten() {
                if self.graph.is_output(v) {
                    return (partners, Some(DeclineReason::InternalValueUsed { value: self.value_name(v), reader: None }));
                }
                for (reader, _) in self.graph.consumers(v) {
                    if ops.contains(&reader) || stops.contains(&reader) {
                        continue;
                    }
                    if let Some(&r) = regions.get(&reader) {
                        partners.insert(r);
                        continue;
                    }
                    // Does this reader lead to a graph output around the stops?
                    let mut stack = vec![reader];
                    while let Some(o) = stack.pop() {
                        if !seen.insert(o) {
                            continue;
                        }
                        for w in self.graph.op_outputs(o).into_iter().flatten() {
                            if self.graph.is_output(w) {
                                let reason =
                                    DeclineReason::InternalValueUsed { value: self.value_name(v), reader: Some(self.op_name(reader)) };
                                return (partners, Some(reason));
                            }
                            for (next, _) in self.graph.consumers(w) {
                                if ops.contains(&next) || stops.contains(&next) {
                                    continue;
                                }
                                match regions.get(&next) {
                                    Some(&r) => {
                                        partners.insert(r);
                                    }
                                    None => stack.push(next),
                                }
                            }
                        }
                    }
                }
            }
        }
        (partners, None)
    }

    /// Groups candidates whose branches escape into each other and keeps the groups that reach
    /// the graph only through their Adds.
    fn sub_blocks(&self, mut candidates: Vec<Candidate>) -> (Vec<SubBlock>, Vec<(usize, Declined)>) {
        let mut region_of: BTreeMap<OpId, usize> = BTreeMap::new();
        for (i, c) in candidates.iter().enumerate() {
            for &op in &c.ops {
                region_of.entry(op).or_insert(i);
            }
        }
        for i in 0..candidates.len() {
            let c = &candidates[i];
            let single_exit = c.ops.iter().all(|&op| self.post_dominated_by(op, c.region.add_op));
            if single_exit {
                continue;
            }
            let others: BTreeMap<OpId, usize> =
                region_of.iter().filter(|(op, r)| **r != i && !c.ops.contains(op)).map(|(&op, &r)| (op, r)).collect();
            let (mut partners, leak) = self.escapes(&c.ops, &BTreeSet::from([c.region.add_op]), &others);
            // Shared ops (a joint attention core) belong to both regions.
            for (j, other) in candidates.iter().enumerate() {
                if j != i && !other.ops.is_disjoint(&c.ops) {
                    partners.insert(j);
                }
            }
            candidates[i].partners = partners;
            candidates[i].leak = leak;
        }
        let mut parent: Vec<usize> = (0..candidates.len()).collect();
        fn root(parent: &mut [usize], mut i: usize) -> usize {
            while parent[i] != i {
                parent[i] = parent[parent[i]];
                i = parent[i];
            }
            i
        }
        for (i, c) in candidates.iter().enumerate() {
            for &j in &c.partners {
                let (ri, rj) = (root(&mut parent, i), root(&mut parent, j));
                parent[ri.max(rj)] = ri.min(rj);
            }
        }
        let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for i in 0..candidates.len() {
            let r = root(&mut parent, i);
            groups.entry(r).or_default().push(i);
        }
        let mut sub_blocks = Vec::new();
        let mut declined = Vec::new();
        for members in groups.values() {
            let union: BTreeSet<OpId> = members.iter().flat_map(|&i| candidates[i].ops.iter().copied()).collect();
            let adds: BTreeSet<OpId> = members.iter().map(|&i| candidates[i].region.add_op).collect();
            let leak = members.iter().find_map(|&i| candidates[i].leak.clone()).or_else(|| {
                if members.len() == 1 && candidates[members[0]].partners.is_empty() {
                    None
                } else {
                    self.escapes(&union, &adds, &BTreeMap::new()).1
                }
            });
            if let Some(reason) = leak {
                for &i in members {
                    let c = &candidates[i];
                    declined.push((c.position, Declined { add: c.region.add.clone(), text: reason.to_string(), reason: reason.clone() }));
                }
                continue;
            }
            let kind = self.kind(&union);
            let regions: Vec<Region> = members.iter().map(|&i| candidates[i].region.clone()).collect();
            sub_blocks.push(SubBlock { kind, regions, nodes: union.len() });
        }
        sub_blocks.sort_by_key(|s| s.regions.iter().map(|r| self.position[&r.add_op]).min());
        (sub_blocks, declined)
    }

    fn kind(&self, ops: &BTreeSet<OpId>) -> BlockKind {
        let types: BTreeSet<&str> =
            ops.iter().map(|&op| self.graph.op(op)).filter(|o| default_domain(&o.domain)).map(|o| o.op_type.as_str()).collect();
        let weighted: BTreeSet<&str> =
            ops.iter().filter(|&&op| self.is_weighted(op)).map(|&op| self.graph.op(op).op_type.as_str()).collect();
        if ATTENTION_CORE.iter().any(|t| types.contains(t)) {
            BlockKind::Attention
        } else if weighted.contains("MatMul") || weighted.contains("Gemm") || weighted.contains("Einsum") {
            BlockKind::Mlp
        } else if weighted.contains("Conv") || weighted.contains("ConvTranspose") {
            BlockKind::Convolution
        } else {
            BlockKind::Other
        }
    }

    /// The skips a stream value leads to: itself, then through single-input ops outside every
    /// branch (a post-norm LayerNormalization, the ReLU after a ResNet sum).
    fn stream_successors(&self, y: ValueId, in_regions: &BTreeSet<OpId>) -> Vec<ValueId> {
        let mut found = vec![y];
        let mut v = y;
        for _ in 0..STREAM_HOPS {
            let readers: Vec<OpId> = self.graph.consumers(v).into_iter().map(|(op, _)| op).collect();
            let [reader] = readers[..] else { break };
            let dynamic_inputs = reads(self.graph, reader).into_iter().filter(|w| self.dynamic.contains(w)).count();
            let outputs: Vec<ValueId> = self.graph.op_outputs(reader).into_iter().flatten().collect();
            let (&[out], 1) = (&outputs[..], dynamic_inputs) else { break };
            if in_regions.contains(&reader) || self.graph.op(reader).op_type == "Add" {
                break;
            }
            found.push(out);
            v = out;
        }
        found
    }

    fn layers(&self, sub_blocks: Vec<SubBlock>) -> Vec<Layer> {
        let graph = self.graph;
        let in_regions: BTreeSet<OpId> = sub_blocks.iter().flat_map(|s| s.regions.iter().flat_map(|r| r.ops.iter().copied())).collect();
        // The sub-block and exit each stream value comes out of.
        let mut exit_of: BTreeMap<ValueId, (usize, ValueId)> = BTreeMap::new();
        for (s, sub) in sub_blocks.iter().enumerate() {
            for r in &sub.regions {
                let Some(y) = graph.op_output(r.add_op, 0) else { continue };
                for v in self.stream_successors(y, &in_regions) {
                    exit_of.entry(v).or_insert((s, y));
                }
            }
        }
        let mut layer_of: Vec<usize> = Vec::with_capacity(sub_blocks.len());
        let mut members: Vec<Vec<usize>> = Vec::new();
        let mut claimed: BTreeSet<ValueId> = BTreeSet::new();
        for (s, sub) in sub_blocks.iter().enumerate() {
            let follows = sub.regions.iter().find_map(|r| {
                let skip = graph.op_input(r.add_op, r.skip_slot)?;
                let &(previous, exit) = exit_of.get(&skip)?;
                // Sub-blocks are in topological order, so the one a skip comes out of is placed.
                let layer = *layer_of.get(previous)?;
                let joins = sub.kind != BlockKind::Attention
                    && sub_blocks[previous].kind == BlockKind::Attention
                    && members[layer].first() == Some(&previous)
                    && !claimed.contains(&exit);
                joins.then_some((layer, exit))
            });
            match follows {
                Some((layer, exit)) => {
                    claimed.insert(exit);
                    layer_of.push(layer);
                    members[layer].push(s);
                }
                None => {
                    layer_of.push(members.len());
                    members.push(vec![s]);
                }
            }
        }
        let mut slots: Vec<Option<SubBlock>> = sub_blocks.into_iter().map(Some).collect();
        members
            .into_iter()
            .enumerate()
            .map(|(index, subs)| {
                let subs: Vec<SubBlock> = subs.into_iter().filter_map(|s| slots[s].take()).collect();
                self.layer(index, subs)
            })
            .collect()
    }

    fn layer(&self, index: usize, sub_blocks: Vec<SubBlock>) -> Layer {
        let graph = self.graph;
        let branch_ops: BTreeSet<OpId> = sub_blocks.iter().flat_map(|s| s.regions.iter().flat_map(|r| r.ops.iter().copied())).collect();
        let dead = self.dies_with(&branch_ops);
        let dead_ops = self.sorted(&dead);
        let (mut parameters, mut macs, mut macs_incomplete) = (0u64, 0u64, false);
        let mut weights: Vec<ValueId> = Vec::new();
        let mut counted: BTreeSet<ValueId> = BTreeSet::new();
        for &op in &dead_ops {
            match op_cost(graph, op) {
                OpCost::Macs(m) => macs = macs.saturating_add(m),
                OpCost::Unknown => macs_incomplete = true,
                OpCost::NotCounted => {}
            }
            for v in graph.op_inputs(op).into_iter().flatten() {
                let Some(t) = constant_tensor(graph, v) else { continue };
                // The value holding the tensor: exporters share one weight through Identity nodes.
                let held = stored_constant(graph, v);
                let only_here = graph.producer(held).is_none_or(|(p, _)| dead.contains(&p))
                    && graph.consumers(held).iter().all(|(r, _)| dead.contains(r))
                    && !graph.is_output(held)
                    && !graph.inputs.contains(&held);
                if t.dtype().is_float() && only_here && counted.insert(held) {
                    parameters += t.numel();
                    weights.push(held);
                }
            }
        }
        let signature_text = self.signature(&sub_blocks, &dead_ops, &branch_ops, &weights);
        Layer {
            index,
            stack: 0,
            position: 0,
            nodes: dead_ops.len() + sub_blocks.iter().map(|s| s.regions.len()).sum::<usize>(),
            parameters,
            macs,
            macs_incomplete,
            signature: format!("{:016x}", fnv1a(signature_text.as_bytes())),
            score: DataFreeScore::default(),
            sub_blocks,
            signature_text,
            weights,
        }
    }

    /// `ops` and the ops that only they read, transitively: what dead-code elimination deletes
    /// once the branches are cut off.
    fn dies_with(&self, ops: &BTreeSet<OpId>) -> BTreeSet<OpId> {
        let graph = self.graph;
        let mut dead = ops.clone();
        let mut pending: Vec<OpId> = ops.iter().copied().collect();
        while let Some(op) = pending.pop() {
            for v in reads(graph, op) {
                let Some((p, _)) = graph.producer(v) else { continue };
                if dead.contains(&p) {
                    continue;
                }
                let outputs: Vec<ValueId> = graph.op_outputs(p).into_iter().flatten().collect();
                let unread_elsewhere =
                    outputs.iter().all(|&w| !graph.is_output(w) && graph.consumers(w).iter().all(|(r, _)| dead.contains(r)));
                if unread_elsewhere {
                    dead.insert(p);
                    pending.push(p);
                }
            }
        }
        dead
    }

    /// The op sequence of the branches, with attributes and how each input is reached (the
    /// skip, an earlier op of the layer, a constant of some shape, a side input), then the
    /// shapes of the weights the layer owns.
    fn signature(&self, sub_blocks: &[SubBlock], dead_ops: &[OpId], branch_ops: &BTreeSet<OpId>, weights: &[ValueId]) -> String {
        use std::fmt::Write;
        let graph = self.graph;
        let skips: BTreeSet<ValueId> =
            sub_blocks.iter().flat_map(|s| s.regions.iter().filter_map(|r| graph.op_input(r.add_op, r.skip_slot))).collect();
        let branch: Vec<OpId> = dead_ops.iter().copied().filter(|op| branch_ops.contains(op)).collect();
        let local: BTreeMap<OpId, usize> = branch.iter().enumerate().map(|(i, &op)| (op, i)).collect();
        let mut text = String::new();
        for &op in &branch {
            let o = graph.op(op);
            let _ = write!(text, "{}.{}(", o.domain, o.op_type);
            for input in graph.op_inputs(op) {
                match input {
                    None => text.push_str("_,"),
                    Some(v) if skips.contains(&v) => text.push_str("x,"),
                    Some(v) => match graph.producer(v).and_then(|(p, slot)| local.get(&p).map(|i| (i, slot))) {
                        Some((i, slot)) => {
                            let _ = write!(text, "%{i}.{slot},");
                        }
                        None => match constant_tensor(graph, v) {
                            Some(t) if t.dtype().is_float() => {
                                let _ = write!(text, "w{}{:?},", t.dtype(), t.dims());
                            }
                            Some(t) => {
                                let _ = write!(text, "c{}{:?}{:?},", t.dtype(), t.dims(), t.to_i64_vec().filter(|v| v.len() <= 16));
                            }
                            None => text.push_str("s,"),
                        },
                    },
                }
            }
            text.push(')');
            for a in &o.attributes {
                let p = &a.proto;
                let _ = write!(text, " {}={:?}{:?}{:?}{:?}{:?}{:?}", p.name(), p.i, p.f, p.ints, p.floats, p.s, p.strings);
                if let Some(t) = &a.tensor {
                    let _ = write!(text, "{}{:?}", t.dtype(), t.dims());
                }
            }
            text.push('\n');
        }
        for &w in weights {
            if let Some(t) = constant_tensor(graph, w) {
                let _ = writeln!(text, "weight {}{:?}", t.dtype(), t.dims());
            }
        }
        text
    }
}

/// Stacks: maximal runs of consecutive layers with one signature.
fn stacks(layers: &[Layer]) -> Vec<Stack> {
    let mut stacks: Vec<Stack> = Vec::new();
    for layer in layers {
        match stacks.last_mut() {
            Some(s) if layers[s.layers[0]].signature_text == layer.signature_text => s.layers.push(layer.index),
            _ => stacks.push(Stack { index: stacks.len(), layers: vec![layer.index], signature: layer.signature.clone() }),
        }
    }
    stacks
}

/// Whether `skip` is stretched to `sum` by broadcasting: a lower rank, or a size of 1 where the
/// sum's is not.
fn skip_broadcasts(skip: &prunec_ir::Shape, sum: &prunec_ir::Shape) -> bool {
    skip.rank() < sum.rank() || skip.0.iter().zip(&sum.0).any(|(s, t)| s.known() == Some(1) && t.known() != Some(1))
}

/// The value a constant is stored in: `v`, or the start of the Identity chain it is read through.
fn stored_constant(graph: &Graph, mut v: ValueId) -> ValueId {
    // A loop, not recursion: a model decides how long its chains of Identity ops are.
    while let Some((op, _)) = graph.producer(v) {
        let o = graph.op(op);
        match graph.op_input(op, 0) {
            Some(input) if o.op_type == "Identity" && default_domain(&o.domain) => v = input,
            _ => break,
        }
    }
    v
}

/// What an op reads: its inputs and the values its subgraphs capture.
pub(crate) fn reads(graph: &Graph, op: OpId) -> Vec<ValueId> {
    let mut values: Vec<ValueId> = graph.op_inputs(op).into_iter().flatten().collect();
    values.extend(graph.op_captures(op));
    values
}

pub(crate) fn default_domain(domain: &str) -> bool {
    domain.is_empty() || domain == "ai.onnx"
}

/// A stable 64-bit digest (FNV-1a): signatures are compared in full, the digest is for display.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}
