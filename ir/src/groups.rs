//! Dependency groups: the sets of channels that must be removed together.
//!
//! Every axis of every tensor of known rank is a dimension. The coupling rules of
//! [`crate::ops`] say which dimensions carry the same channels; a union-find joins them into
//! classes. A class that holds the axis of a weight is a group: removing channel `i` of the group
//! means slicing index `i` out of every weight axis in it, and nothing else changes shape.
//!
//! A group is frozen, with the reasons recorded, when any of its dimensions is: a graph input or
//! output, an op without a rule, a subgraph's outer-scope value, an axis a rule cannot map.

use crate::graph::Graph;
use crate::ids::ValueId;
use crate::ops::{DimRef, Fact, Role, RuleCx, rule_for};
use crate::shape::Dim;
use crate::tensor::Tensor;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// The result of the analysis: every group of a graph, in graph order.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Groups {
    /// The groups; `id` is the index.
    pub groups: Vec<Group>,
}

/// One set of coupled channels.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Group {
    /// Position in [`Groups::groups`].
    pub id: usize,
    /// Number of channels, when known.
    pub channels: Option<u64>,
    /// Whether channels may be removed: nothing freezes the group and a weight produces it.
    pub prunable: bool,
    /// The first reason the group is frozen.
    pub frozen_reason: Option<String>,
    /// Every distinct reason, in graph order.
    pub frozen_reasons: Vec<String>,
    /// `<node>:out` for each weighted producer, `<node>:in` for each weighted consumer, sorted.
    pub members: Vec<String>,
    /// Every weight axis sliced with the channels.
    pub weights: Vec<WeightSlice>,
    /// Number of tensor axes in the group.
    pub dims: usize,
}

/// A weight axis that carries a group's channels.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct WeightSlice {
    /// The node that uses the weight this way.
    pub node: String,
    /// The weight (initializer name, or the output of a `Constant` node).
    pub weight: String,
    /// The axis of the weight.
    pub axis: usize,
    /// How the weight relates to the channels.
    pub role: Role,
}

/// The constant tensor behind a value: an initializer or a `Constant` node's `value`, possibly
/// behind `Identity` nodes (exporters use them to share one deduplicated weight).
pub fn constant_tensor(graph: &Graph, v: ValueId) -> Option<&Tensor> {
    if let Some(t) = graph.value(v).initializer() {
        return Some(t);
    }
    let (op_id, _) = graph.producer(v)?;
    let op = graph.op(op_id);
    if !op.domain.is_empty() {
        return None;
    }
    match op.op_type.as_str() {
        "Constant" => op.attr_tensor("value"),
        "Identity" => constant_tensor(graph, graph.op_input(op_id, 0)?),
        _ => None,
    }
}

/// Whether an op only computes a constant that [`constant_tensor`] sees through.
fn is_constant_source(graph: &Graph, op: crate::ids::OpId) -> bool {
    graph.op_outputs(op).into_iter().flatten().all(|v| constant_tensor(graph, v).is_some())
}

/// Dimension numbering: one per axis of a computed value, one per axis and use of a constant.
#[derive(Default)]
struct Dims {
    index: HashMap<(ValueId, usize, Option<crate::ids::OpId>), usize>,
    sizes: Vec<Dim>,
}

impl Dims {
    fn get(&mut self, graph: &Graph, (v, axis): DimRef, op: Option<crate::ids::OpId>) -> Option<usize> {
        let size = graph.value(v).shape.as_ref()?.0.get(axis)?.clone();
        let user = if constant_tensor(graph, v).is_some() { op } else { None };
        let next = self.sizes.len();
        let id = *self.index.entry((v, axis, user)).or_insert(next);
        if id == next {
            self.sizes.push(size);
        }
        Some(id)
    }
}

struct UnionFind {
    parent: Vec<usize>,
}

impl UnionFind {
    fn find(&mut self, mut x: usize) -> usize {
        while self.parent[x] != x {
            self.parent[x] = self.parent[self.parent[x]];
            x = self.parent[x];
        }
        x
    }

    fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        // The older root wins, so roots follow graph order.
        let (keep, drop) = if ra < rb { (ra, rb) } else { (rb, ra) };
        self.parent[drop] = keep;
    }
}

/// Finds the dependency groups of a graph.
pub fn analyse(graph: &Graph) -> Groups {
    let order = match graph.topo_order() {
        Ok(order) => order,
        Err(_) => return Groups { groups: Vec::new() },
    };
    // A constant gets fresh dimensions at each use: a weight shared by two ops (exporters
    // deduplicate equal tensors) is copied on rewrite rather than tying the two ops' channels.
    let mut dims = Dims::default();

    let mut facts = Vec::new();
    for &v in &graph.inputs {
        facts.push(Fact::Freeze { value: v, axis: None, reason: format!("`{}` is a graph input", graph.value(v).name), op: None });
    }
    for &op_id in &order {
        let op = graph.op(op_id);
        let mut cx = RuleCx { graph, op: op_id, inputs: graph.op_inputs(op_id), outputs: graph.op_outputs(op_id), facts: Vec::new() };
        if is_constant_source(graph, op_id) {
            continue;
        } else if op.has_subgraphs() {
            cx.freeze_all("runs subgraphs, whose reads are not analysed");
        } else {
            match rule_for(&op.domain, &op.op_type) {
                Some(rule) => rule(&mut cx),
                None => cx.freeze_all("has no coupling rule"),
            }
        }
        facts.extend(cx.facts);
    }
    for &v in &graph.outputs {
        facts.push(Fact::Freeze { value: v, axis: None, reason: format!("`{}` is a graph output", graph.value(v).name), op: None });
    }

    let mut frozen: Vec<(usize, String)> = Vec::new();
    let mut weights: Vec<(usize, WeightSlice)> = Vec::new();
    let mut couples: Vec<(usize, usize)> = Vec::new();
    let name = |v: ValueId| graph.value(v).name.clone();
    for fact in &facts {
        match fact {
            Fact::Couple(a, b, op) => match (dims.get(graph, *a, Some(*op)), dims.get(graph, *b, Some(*op))) {
                (Some(ia), Some(ib)) => {
                    let (da, db) = (&dims.sizes[ia], &dims.sizes[ib]);
                    if matches!((da, db), (Dim::Known(x), Dim::Known(y)) if x != y) {
                        let reason = format!("axis {} of `{}` ({da}) is coupled to axis {} of `{}` ({db})", a.1, name(a.0), b.1, name(b.0));
                        frozen.push((ia, reason.clone()));
                        frozen.push((ib, reason));
                    } else {
                        couples.push((ia, ib));
                    }
                }
                (Some(i), None) | (None, Some(i)) => {
                    let other = if dims.get(graph, *a, Some(*op)).is_some() { b } else { a };
                    frozen.push((i, format!("is coupled to `{}`, whose shape is unknown", name(other.0))));
                }
                (None, None) => {}
            },
            Fact::Weight { dim, role, op } => {
                if let Some(i) = dims.get(graph, *dim, Some(*op)) {
                    let slice = WeightSlice { node: graph.op(*op).name.clone(), weight: name(dim.0), axis: dim.1, role: *role };
                    weights.push((i, slice));
                }
            }
            Fact::Freeze { value, axis, reason, op } => {
                let rank = graph.value(*value).shape.as_ref().map_or(0, |s| s.rank());
                let axes: Vec<usize> = match axis {
                    Some(a) => vec![*a],
                    None => (0..rank).collect(),
                };
                for a in axes {
                    if let Some(i) = dims.get(graph, (*value, a), *op) {
                        frozen.push((i, reason.clone()));
                    }
                }
            }
        }
    }
    let mut uf = UnionFind { parent: (0..dims.sizes.len()).collect() };
    for (a, b) in couples {
        uf.union(a, b);
    }

    // Gather each class.
    #[derive(Default)]
    struct Class {
        dims: usize,
        size: Option<Dim>,
        reasons: Vec<String>,
        weights: BTreeSet<WeightSlice>,
        has_float_weight: bool,
    }
    let mut classes: BTreeMap<usize, Class> = BTreeMap::new();
    for i in 0..dims.sizes.len() {
        let root = uf.find(i);
        let class = classes.entry(root).or_default();
        class.dims += 1;
        class.size.get_or_insert_with(|| dims.sizes[i].clone());
    }
    for (i, reason) in frozen {
        let class = classes.get_mut(&uf.find(i)).expect("every dim has a class");
        if !class.reasons.contains(&reason) {
            class.reasons.push(reason);
        }
    }
    for (i, slice) in weights {
        let root = uf.find(i);
        let is_float = graph.value_by_name(&slice.weight).and_then(|v| constant_tensor(graph, v)).is_some_and(|t| t.dtype().is_float());
        let class = classes.get_mut(&root).expect("every dim has a class");
        class.has_float_weight |= is_float && slice.role != Role::Param;
        class.weights.insert(slice);
    }

    let position: HashMap<&str, usize> = order.iter().enumerate().map(|(i, &op)| (graph.op(op).name.as_str(), i)).collect();
    let first_use = |c: &Class| c.weights.iter().filter_map(|w| position.get(w.node.as_str()).copied()).min();
    let mut classes: Vec<Class> = classes.into_values().filter(|c| c.has_float_weight).collect();
    // Graph order of the first op touching the group; the sort is stable, so ties keep dim order.
    classes.sort_by_key(first_use);
    let mut groups = Vec::new();
    for class in classes {
        let members: BTreeSet<String> = class
            .weights
            .iter()
            .filter_map(|w| match w.role {
                Role::Producer => Some(format!("{}:out", w.node)),
                Role::Consumer => Some(format!("{}:in", w.node)),
                Role::Param => None,
            })
            .collect();
        let has_producer = class.weights.iter().any(|w| w.role == Role::Producer);
        let channels = class.size.as_ref().and_then(Dim::known);
        let mut reasons = class.reasons;
        if !has_producer {
            reasons.push("no weight produces these channels".into());
        }
        if channels.is_none() {
            reasons.push("the channel count is not known".into());
        }
        groups.push(Group {
            id: groups.len(),
            channels,
            prunable: reasons.is_empty(),
            frozen_reason: reasons.first().cloned(),
            frozen_reasons: reasons,
            members: members.into_iter().collect(),
            weights: class.weights.into_iter().collect(),
            dims: class.dims,
        });
    }
    Groups { groups }
}
