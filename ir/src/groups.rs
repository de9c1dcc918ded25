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
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

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
    /// Every tensor axis of the group, with each channel's indices: what a rewrite slices.
    #[serde(skip)]
    pub axes: Vec<GroupAxis>,
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
    /// Indices of the axis per channel: 1, or a block size (`C·H·W` flattening, head width).
    pub width: usize,
    /// For each channel of the group, in group order, its indices along the axis.
    #[serde(skip)]
    pub indices: Vec<Vec<usize>>,
}

/// A tensor axis of a group (weights and activations alike), with each channel's indices.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupAxis {
    /// The tensor.
    pub value: ValueId,
    /// The axis.
    pub axis: usize,
    /// For a constant, the op whose use of it this is (constants are sliced per use).
    pub user: Option<crate::ids::OpId>,
    /// For each channel of the group, its indices along the axis.
    pub indices: Vec<Vec<usize>>,
}

/// The text listing of `prunec groups`: one header line per group, one line per weight slice.
/// Stable, like the IR dump: snapshot tests compare it.
impl std::fmt::Display for Groups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let prunable = self.groups.iter().filter(|g| g.prunable).count();
        writeln!(f, "{} groups, {prunable} prunable", self.groups.len())?;
        for g in &self.groups {
            let channels = g.channels.map_or("?".to_string(), |c| c.to_string());
            match (&g.frozen_reason, g.prunable) {
                (_, true) => writeln!(f, "group {} channels={channels} prunable", g.id)?,
                (reason, false) => writeln!(f, "group {} channels={channels} frozen: {}", g.id, reason.as_deref().unwrap_or(""))?,
            }
            for w in &g.weights {
                let role = match w.role {
                    Role::Producer => "producer",
                    Role::Consumer => "consumer",
                    Role::Param => "param",
                };
                let width = if w.width > 1 { format!(" x{}", w.width) } else { String::new() };
                writeln!(f, "    {role:<8} {} axis {}{width} ({})", w.weight, w.axis, w.node)?;
            }
        }
        Ok(())
    }
}

/// The constant tensor behind a value: an initializer or a `Constant` node's `value`, possibly
/// behind `Identity` nodes (exporters use them to share one deduplicated weight).
pub fn constant_tensor(graph: &Graph, mut v: ValueId) -> Option<&Tensor> {
    // A loop, not recursion: a model decides how long its chains of Identity ops are.
    loop {
        if let Some(t) = graph.value(v).initializer() {
            return Some(t);
        }
        let (op_id, _) = graph.producer(v)?;
        let op = graph.op(op_id);
        if !op.domain.is_empty() {
            return None;
        }
        match op.op_type.as_str() {
            "Constant" => return op.attr_tensor("value"),
            "Identity" => v = graph.op_input(op_id, 0)?,
            _ => return None,
        }
    }
}

/// The values [`constant_tensor`] sees a constant behind, found in one pass over `order`
/// (asking [`constant_tensor`] value by value walks a chain of Identity ops once per link).
fn constant_values(graph: &Graph, order: &[crate::ids::OpId]) -> HashSet<ValueId> {
    let mut constants: HashSet<ValueId> = graph.value_ids().filter(|&v| graph.value(v).initializer().is_some()).collect();
    for &op in order {
        let o = graph.op(op);
        let constant = o.domain.is_empty()
            && match o.op_type.as_str() {
                "Constant" => o.attr_tensor("value").is_some(),
                "Identity" => graph.op_input(op, 0).is_some_and(|v| constants.contains(&v)),
                _ => false,
            };
        if constant {
            constants.extend(graph.op_outputs(op).into_iter().flatten());
        }
    }
    constants
}

/// Whether an op only computes a constant that [`constant_tensor`] sees through.
fn is_constant_source(graph: &Graph, constants: &HashSet<ValueId>, op: crate::ids::OpId) -> bool {
    graph.op_outputs(op).into_iter().flatten().all(|v| constants.contains(&v))
}

/// Axes larger than this are kept as one opaque element: they are sequence or spatial axes, and
/// tracking them channel by channel would cost memory for nothing.
const MAX_TRACKED: u64 = 1 << 16;

/// One tensor axis as a run of elements of the union-find.
#[derive(Clone, Debug)]
struct DimInfo {
    key: (ValueId, usize, Option<crate::ids::OpId>),
    first: usize,
    len: usize,
    /// Size not known (or too large): the axis is one element, and only whole-axis couplings apply.
    opaque: bool,
    size: Dim,
}

/// Dimension numbering: one per axis of a computed value, one per axis and use of a constant.
#[derive(Default)]
struct Dims {
    index: HashMap<(ValueId, usize, Option<crate::ids::OpId>), usize>,
    infos: Vec<DimInfo>,
    elements: usize,
    /// [`constant_values`] of the graph.
    constants: HashSet<ValueId>,
}

impl Dims {
    fn get(&mut self, graph: &Graph, (v, axis): DimRef, op: Option<crate::ids::OpId>) -> Option<usize> {
        let size = graph.value(v).shape.as_ref()?.0.get(axis)?.clone();
        let user = if self.constants.contains(&v) { op } else { None };
        let next = self.infos.len();
        let id = *self.index.entry((v, axis, user)).or_insert(next);
        if id == next {
            let (len, opaque) = match size {
                Dim::Known(n) if n > 0 && n <= MAX_TRACKED => (n as usize, false),
                _ => (1, true),
            };
            self.infos.push(DimInfo { key: (v, axis, user), first: self.elements, len, opaque, size });
            self.elements += len;
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
    let constants = constant_values(graph, &order);
    let mut facts = Vec::new();
    for &v in &graph.inputs {
        facts.push(Fact::Freeze { value: v, axis: None, reason: format!("`{}` is a graph input", graph.value(v).name), op: None });
    }
    for &op_id in &order {
        let op = graph.op(op_id);
        let mut cx = RuleCx { graph, op: op_id, inputs: graph.op_inputs(op_id), outputs: graph.op_outputs(op_id), facts: Vec::new() };
        if is_constant_source(graph, &constants, op_id) {
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

    // A constant gets fresh dimensions at each use: a weight shared by two ops (exporters
    // deduplicate equal tensors) is copied on rewrite rather than tying the two ops' channels.
    let mut dims = Dims { constants, ..Dims::default() };
    let mut frozen: Vec<(usize, String)> = Vec::new();
    let mut weights: Vec<(usize, WeightSlice)> = Vec::new();
    let mut links: Vec<(usize, usize)> = Vec::new();
    // `(node, weight)` of the weight slices that are quantised weights (`crate::quant`): integers
    // that count as parameters, as float ones do.
    let mut quantized: HashSet<(String, String)> = HashSet::new();
    let name = |v: ValueId| graph.value(v).name.clone();
    let describe = |d: DimRef, info: &DimInfo| format!("axis {} of `{}` ({})", d.1, name(d.0), info.size);
    for fact in &facts {
        match fact {
            Fact::Couple(a, b, op) => {
                let (Some(ia), Some(ib)) = both(&mut dims, graph, *a, *b, *op, &mut frozen, &name) else { continue };
                let (da, db) = (dims.infos[ia].clone(), dims.infos[ib].clone());
                if da.opaque == db.opaque && da.len == db.len && !matches!((&da.size, &db.size), (Dim::Known(x), Dim::Known(y)) if x != y) {
                    links.extend((0..da.len).map(|i| (da.first + i, db.first + i)));
                } else {
                    let reason = format!("{} is coupled to {}", describe(*a, &da), describe(*b, &db));
                    frozen.push((ia, reason.clone()));
                    frozen.push((ib, reason));
                }
            }
            Fact::Offset { part, whole, start, step, op } => {
                let (Some(ip), Some(iw)) = both(&mut dims, graph, *part, *whole, *op, &mut frozen, &name) else { continue };
                let (dp, dw) = (dims.infos[ip].clone(), dims.infos[iw].clone());
                if !dp.opaque && !dw.opaque && start + (dp.len - 1) * step < dw.len {
                    links.extend((0..dp.len).map(|i| (dp.first + i, dw.first + start + i * step)));
                } else {
                    let reason = format!("{} is a window of {} that cannot be placed", describe(*part, &dp), describe(*whole, &dw));
                    frozen.push((ip, reason.clone()));
                    frozen.push((iw, reason));
                }
            }
            Fact::Block { fine, coarse, stride, op } => {
                let (Some(i_f), Some(i_c)) = both(&mut dims, graph, *fine, *coarse, *op, &mut frozen, &name) else { continue };
                let (df, dc) = (dims.infos[i_f].clone(), dims.infos[i_c].clone());
                if !df.opaque && !dc.opaque && *stride > 0 && df.len % (dc.len * stride) == 0 {
                    links.extend((0..df.len).map(|f| (df.first + f, dc.first + (f / stride) % dc.len)));
                } else if df.opaque && dc.opaque {
                    links.push((df.first, dc.first));
                } else {
                    let reason = format!("{} is not a whole number of blocks of {}", describe(*fine, &df), describe(*coarse, &dc));
                    frozen.push((i_f, reason.clone()));
                    frozen.push((i_c, reason));
                }
            }
            Fact::Groups { a, b, groups, op } => {
                let (Some(ia), Some(ib)) = both(&mut dims, graph, *a, *b, *op, &mut frozen, &name) else { continue };
                let (da, db) = (dims.infos[ia].clone(), dims.infos[ib].clone());
                if !da.opaque && !db.opaque && *groups > 0 && da.len % groups == 0 && db.len % groups == 0 {
                    let (wa, wb) = (da.len / groups, db.len / groups);
                    links.extend((0..da.len).map(|e| (da.first + e, da.first + (e / wa) * wa)));
                    links.extend((0..db.len).map(|e| (db.first + e, db.first + (e / wb) * wb)));
                    links.extend((0..*groups).map(|j| (da.first + j * wa, db.first + j * wb)));
                } else {
                    let reason = format!("{} and {} cannot be cut into {groups} groups", describe(*a, &da), describe(*b, &db));
                    frozen.push((ia, reason.clone()));
                    frozen.push((ib, reason));
                }
            }
            Fact::Weight { dim, role, op } => {
                if crate::quant::reads_quantized_weight(graph, *op) {
                    quantized.insert((graph.op(*op).name.clone(), name(dim.0)));
                }
                if let Some(i) = dims.get(graph, *dim, Some(*op)) {
                    let slice = WeightSlice {
                        node: graph.op(*op).name.clone(),
                        weight: name(dim.0),
                        axis: dim.1,
                        role: *role,
                        width: 0,
                        indices: Vec::new(),
                    };
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
    let mut uf = UnionFind { parent: (0..dims.elements).collect() };
    for (a, b) in links {
        uf.union(a, b);
    }

    // Each class of elements is one channel; channels touching the same axes form a group.
    #[derive(Default)]
    struct Class {
        /// Indices along each dim.
        dims: BTreeMap<usize, Vec<usize>>,
        reasons: Vec<String>,
    }
    let mut classes: BTreeMap<usize, Class> = BTreeMap::new();
    for (d, info) in dims.infos.iter().enumerate() {
        for (i, e) in (info.first..info.first + info.len).enumerate() {
            classes.entry(uf.find(e)).or_default().dims.entry(d).or_default().push(i);
        }
    }
    for (d, reason) in frozen {
        let info = &dims.infos[d];
        for e in info.first..info.first + info.len {
            let class = classes.get_mut(&uf.find(e)).expect("every element has a class");
            if !class.reasons.contains(&reason) {
                class.reasons.push(reason.clone());
            }
        }
    }
    let mut slices_of: BTreeMap<usize, Vec<WeightSlice>> = BTreeMap::new();
    for (d, slice) in weights {
        slices_of.entry(d).or_default().push(slice);
    }
    let is_float = |w: &WeightSlice| {
        graph.value_by_name(&w.weight).and_then(|v| constant_tensor(graph, v)).is_some_and(|t| t.dtype().is_float())
            || quantized.contains(&(w.node.clone(), w.weight.clone()))
    };

    struct Pending {
        key: Vec<usize>,
        channels: u64,
        reasons: Vec<String>,
        /// Weight slices (with `indices` empty) and the dim each is an axis of.
        weights: BTreeMap<WeightSlice, usize>,
        indices: BTreeMap<usize, Vec<Vec<usize>>>,
    }
    let mut pending: Vec<Pending> = Vec::new();
    let mut by_key: HashMap<Vec<usize>, usize> = HashMap::new();
    for class in classes.into_values() {
        let touched: Vec<(WeightSlice, usize)> = class
            .dims
            .iter()
            .flat_map(|(&d, idx)| slices_of.get(&d).into_iter().flatten().map(move |w| (WeightSlice { width: idx.len(), ..w.clone() }, d)))
            .collect();
        if !touched.iter().any(|(w, _)| w.role != Role::Param && is_float(w)) {
            continue;
        }
        let key: Vec<usize> = class.dims.keys().copied().collect();
        let opaque = key.iter().any(|&d| dims.infos[d].opaque);
        let at = *by_key.entry(key.clone()).or_insert_with(|| {
            pending.push(Pending { key, channels: 0, reasons: Vec::new(), weights: BTreeMap::new(), indices: BTreeMap::new() });
            pending.len() - 1
        });
        let group = &mut pending[at];
        group.channels += 1;
        for r in class.reasons {
            if !group.reasons.contains(&r) {
                group.reasons.push(r);
            }
        }
        if opaque && !group.reasons.iter().any(|r| r.contains("not known")) {
            group.reasons.push("the channel count is not known".into());
        }
        group.weights.extend(touched);
        for (d, idx) in class.dims {
            group.indices.entry(d).or_default().push(idx);
        }
    }

    let position: HashMap<&str, usize> = order.iter().enumerate().map(|(i, &op)| (graph.op(op).name.as_str(), i)).collect();
    let first_use = |g: &Pending| (g.weights.keys().filter_map(|w| position.get(w.node.as_str()).copied()).min(), g.key.first().copied());
    pending.sort_by_key(first_use);
    let mut groups = Vec::new();
    for g in pending {
        let members: BTreeSet<String> = g
            .weights
            .keys()
            .filter_map(|w| match w.role {
                Role::Producer => Some(format!("{}:out", w.node)),
                Role::Consumer => Some(format!("{}:in", w.node)),
                Role::Param => None,
            })
            .collect();
        let mut reasons = g.reasons;
        if !g.weights.keys().any(|w| w.role == Role::Producer) {
            reasons.push("no weight produces these channels".into());
        }
        let opaque = g.key.iter().any(|&d| dims.infos[d].opaque);
        groups.push(Group {
            id: groups.len(),
            channels: (!opaque).then_some(g.channels),
            prunable: reasons.is_empty(),
            frozen_reason: reasons.first().cloned(),
            frozen_reasons: reasons,
            members: members.into_iter().collect(),
            weights: g.weights.iter().map(|(w, d)| WeightSlice { indices: g.indices[d].clone(), ..w.clone() }).collect(),
            dims: g.key.len(),
            axes: g
                .indices
                .iter()
                .map(|(&d, idx)| {
                    let (value, axis, user) = dims.infos[d].key;
                    GroupAxis { value, axis, user, indices: idx.clone() }
                })
                .collect(),
        });
    }
    Groups { groups }
}

/// Resolves both sides of a link; an axis whose partner has no known rank is frozen.
fn both(
    dims: &mut Dims,
    graph: &Graph,
    a: DimRef,
    b: DimRef,
    op: crate::ids::OpId,
    frozen: &mut Vec<(usize, String)>,
    name: &dyn Fn(ValueId) -> String,
) -> (Option<usize>, Option<usize>) {
    let (ia, ib) = (dims.get(graph, a, Some(op)), dims.get(graph, b, Some(op)));
    match (ia, ib) {
        (Some(i), None) => frozen.push((i, format!("is linked to `{}`, whose shape is unknown", name(b.0)))),
        (None, Some(i)) => frozen.push((i, format!("is linked to `{}`, whose shape is unknown", name(a.0)))),
        _ => {}
    }
    (ia, ib)
}
