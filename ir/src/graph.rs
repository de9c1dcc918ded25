//! The model and its graph of ops and values.

use crate::error::IrError;
use crate::ids::{OpId, ValueId};
use crate::proto::{self, attribute_proto::AttributeType};
use crate::shape::{DType, Shape, dtype_of_type};
use crate::tensor::Tensor;
use petgraph::Direction;
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};

/// An ONNX model: the main graph as IR, everything else verbatim.
#[derive(Clone, Debug)]
pub struct Model {
    /// Every field of the `ModelProto` except `graph`: IR version, opset imports, producer,
    /// metadata, functions, training info, device configurations.
    pub shell: proto::ModelProto,
    /// The main graph.
    pub graph: Graph,
}

/// The main graph of a model.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    /// Graph-level fields that are not nodes or values (`name`, `doc_string`, `metadata_props`,
    /// `quantization_annotation`); the list fields of this proto are always empty.
    pub shell: proto::GraphProto,
    dag: StableDiGraph<Node, Edge>,
    by_name: HashMap<String, ValueId>,
    /// Graph inputs in their declared order (initializers listed as inputs included).
    pub inputs: Vec<ValueId>,
    /// Graph outputs in their declared order.
    pub outputs: Vec<ValueId>,
    /// Initializers in their stored order.
    pub initializers: Vec<ValueId>,
    /// Sparse initializers in their stored order.
    pub sparse_initializers: Vec<ValueId>,
    /// The `value_info` list in its stored order: values of the IR, and records that describe
    /// none (a name the graph does not hold, or a second record of a value), kept verbatim.
    pub value_infos: Vec<Listed>,
    next_seq: u64,
}

/// A node of the bipartite graph.
#[derive(Clone, Debug)]
enum Node {
    Op { op: Op, n_inputs: usize, n_outputs: usize },
    Value(Value),
}

/// How a value and an op are linked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edge {
    /// The value is the op's input number `n`.
    Input(usize),
    /// The value is the op's output number `n`.
    Output(usize),
    /// A subgraph of the op reads the value from the enclosing scope.
    Captured,
}

/// An operator: one ONNX `NodeProto`.
#[derive(Clone, Debug, PartialEq)]
pub struct Op {
    /// Node name (may be empty).
    pub name: String,
    /// Operator type, exactly as in the model (`Conv`).
    pub op_type: String,
    /// Operator domain (`""` is the default ONNX domain).
    pub domain: String,
    /// Attributes in their stored order.
    pub attributes: Vec<Attribute>,
    /// The node's other fields, kept verbatim.
    pub meta: NodeMeta,
    /// Position in the original node list; the writer keeps this order where the graph allows.
    /// `u64::MAX` asks [`Graph::add_op`] to place a new op after all others.
    pub seq: u64,
}

/// Fields of a node that the IR does not interpret.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeMeta {
    /// Whether `name` and `domain` were present in the file (proto2 presence).
    pub has_name: bool,
    /// See [`NodeMeta::has_name`].
    pub has_domain: bool,
    /// `doc_string`.
    pub doc_string: Option<String>,
    /// `overload` (for calls of overloaded functions).
    pub overload: Option<String>,
    /// `metadata_props`.
    pub metadata_props: Vec<proto::StringStringEntryProto>,
    /// `device_configurations`.
    pub device_configurations: Vec<proto::NodeDeviceConfigurationProto>,
}

/// One attribute of an op.
///
/// A tensor-valued attribute (a `Constant`'s `value`) is lifted into a shared [`Tensor`] so weights
/// in `Constant` nodes are handled like initializers; `proto.t` is then `None`.
#[derive(Clone, Debug, PartialEq)]
pub struct Attribute {
    /// The attribute as stored, minus a lifted tensor.
    pub proto: proto::AttributeProto,
    /// The lifted tensor value, for `TENSOR` attributes.
    pub tensor: Option<Tensor>,
}

impl Attribute {
    /// Lifts a stored attribute.
    pub fn from_proto(mut proto: proto::AttributeProto) -> Result<Attribute, IrError> {
        let tensor = proto.t.take().map(Tensor::from_proto).transpose()?;
        Ok(Attribute { proto, tensor })
    }

    /// The attribute as ONNX stores it.
    pub fn to_proto(&self) -> proto::AttributeProto {
        let mut p = self.proto.clone();
        if let Some(t) = &self.tensor {
            p.t = Some(t.proto().clone());
        }
        p
    }

    /// Attribute name.
    pub fn name(&self) -> &str {
        self.proto.name()
    }
}

/// What defines a value.
#[derive(Clone, Debug, PartialEq)]
pub enum ValueKind {
    /// A graph input that is not an initializer.
    Input,
    /// An initializer (possibly also listed as a graph input, as IR versions < 4 require).
    Initializer(Tensor),
    /// A sparse initializer, kept verbatim: its channels are never pruned.
    SparseInitializer(Box<proto::SparseTensorProto>),
    /// The output of an op.
    Produced,
}

/// A named tensor of the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    /// The ONNX name.
    pub name: String,
    /// What defines it.
    pub kind: ValueKind,
    /// The `ValueInfoProto` the model stores for it (from `input`, `output` or `value_info`),
    /// whose `type` is the recorded type: the record of the first list that names the value, in
    /// the order input, output, value_info. Written back as is, but for the sizes a pass changes.
    pub info: Option<proto::ValueInfoProto>,
    /// The value's records in further lists, where it is named in more than one.
    pub more_info: Vec<(InfoList, proto::ValueInfoProto)>,
    /// Element type, recorded or inferred.
    pub dtype: Option<DType>,
    /// Shape, recorded or inferred; `None` when nothing is known, not even the rank.
    pub shape: Option<Shape>,
}

/// One entry of a graph's `value_info` list.
#[derive(Clone, Debug, PartialEq)]
pub enum Listed {
    /// A value of the IR; its record is [`Value::record`] of [`InfoList::ValueInfo`].
    Value(ValueId),
    /// A record the IR holds no value for, or a repeated record of a value: written back as read
    /// while no pass runs, and dropped by [`Graph::reconcile_records`] once it names a value,
    /// since nothing keeps it in step with that value's shape.
    Orphan(Box<proto::ValueInfoProto>),
}

/// The list of a `GraphProto` a value's record comes from. A value may be recorded in several
/// (a graph output also listed in `value_info`, a graph input that is also an output), and the
/// records may differ: each list gets its own back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InfoList {
    /// `input`.
    Input,
    /// `output`.
    Output,
    /// `value_info`.
    ValueInfo,
}

/// Fields of a `ValueInfoProto` other than name and type, for building values.
#[derive(Clone, Debug, Default)]
pub struct ValueInfoMeta {
    /// `doc_string`.
    pub doc_string: Option<String>,
    /// `metadata_props`.
    pub metadata_props: Vec<proto::StringStringEntryProto>,
}

impl Value {
    /// A value with nothing known about it yet.
    pub fn new(name: impl Into<String>, kind: ValueKind) -> Value {
        let mut v = Value { name: name.into(), kind, info: None, more_info: Vec::new(), dtype: None, shape: None };
        match &v.kind {
            ValueKind::Initializer(t) => {
                v.dtype = Some(t.dtype());
                v.shape = Some(Shape::known(&t.dims()));
            }
            ValueKind::SparseInitializer(s) => {
                v.dtype = s.values.as_ref().map(|t| DType(t.data_type()));
                v.shape = s.dims.iter().map(|&d| u64::try_from(d).ok()).collect::<Option<Vec<_>>>().map(|d| Shape::known(&d));
            }
            ValueKind::Input | ValueKind::Produced => {}
        }
        v
    }

    /// Records the model's `ValueInfoProto` for this value, taking dtype and shape from it where
    /// the value has none yet.
    pub fn set_info(&mut self, info: proto::ValueInfoProto) {
        self.absorb(&info);
        self.info = Some(info);
    }

    /// Records the value's `ValueInfoProto` from `list`: the main record if it has none yet,
    /// else a further one (an earlier list's record is never replaced by a later one's).
    pub fn add_record(&mut self, list: InfoList, info: proto::ValueInfoProto) {
        if self.info.is_none() {
            return self.set_info(info);
        }
        self.absorb(&info);
        self.more_info.retain(|(l, _)| *l != list);
        self.more_info.push((list, info));
    }

    /// The record to write in `list`: the one read from it, else the main one.
    pub fn record(&self, list: InfoList) -> Option<&proto::ValueInfoProto> {
        self.more_info.iter().find(|(l, _)| *l == list).map(|(_, i)| i).or(self.info.as_ref())
    }

    /// Every record of the value, to change.
    pub fn records_mut(&mut self) -> impl Iterator<Item = &mut proto::ValueInfoProto> {
        self.info.iter_mut().chain(self.more_info.iter_mut().map(|(_, i)| i))
    }

    fn absorb(&mut self, info: &proto::ValueInfoProto) {
        if let Some(ty) = &info.r#type {
            self.dtype = self.dtype.or(dtype_of_type(ty));
            if self.shape.is_none() {
                self.shape = Shape::from_type(ty);
            }
        }
    }

    /// Sets the size of one axis, in the shape and in every recorded `ValueInfoProto` (which the
    /// writer emits as is), after a pass changed it.
    pub fn set_dim(&mut self, axis: usize, size: u64) {
        if let Some(d) = self.shape.as_mut().and_then(|s| s.0.get_mut(axis)) {
            *d = crate::shape::Dim::Known(size);
        }
        for info in self.records_mut() {
            if let Some(d) = crate::records::recorded_shape_mut(info).and_then(|s| s.dim.get_mut(axis)) {
                d.value = Some(proto::tensor_shape_proto::dimension::Value::DimValue(size as i64));
            }
        }
    }

    /// Sets every axis size (a resliced constant), in the shape and the recorded info.
    pub fn set_dims(&mut self, dims: &[u64]) {
        if self.shape.as_ref().is_none_or(|s| s.rank() != dims.len()) {
            self.shape = Some(Shape::known(dims));
        }
        for (axis, &d) in dims.iter().enumerate() {
            self.set_dim(axis, d);
        }
    }

    /// The weight behind this value, if it is an initializer.
    pub fn initializer(&self) -> Option<&Tensor> {
        match &self.kind {
            ValueKind::Initializer(t) => Some(t),
            _ => None,
        }
    }
}

impl Op {
    /// A new default-domain op with no attributes, which [`Graph::add_op`] places after all
    /// others.
    pub fn new(op_type: &str, name: &str) -> Op {
        Op {
            name: name.to_string(),
            op_type: op_type.into(),
            domain: String::new(),
            attributes: Vec::new(),
            meta: Default::default(),
            seq: u64::MAX,
        }
    }

    /// The attribute called `name`.
    pub fn attr(&self, name: &str) -> Option<&Attribute> {
        self.attributes.iter().find(|a| a.name() == name)
    }

    /// An `INT` attribute.
    pub fn attr_int(&self, name: &str) -> Option<i64> {
        self.attr(name).and_then(|a| a.proto.i)
    }

    /// An `INTS` attribute.
    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        self.attr(name).map(|a| a.proto.ints.as_slice())
    }

    /// A tensor attribute (`Constant.value`).
    pub fn attr_tensor(&self, name: &str) -> Option<&Tensor> {
        self.attr(name).and_then(|a| a.tensor.as_ref())
    }

    /// A `FLOAT` attribute.
    pub fn attr_float(&self, name: &str) -> Option<f32> {
        self.attr(name).and_then(|a| a.proto.f)
    }

    /// A `FLOATS` attribute.
    pub fn attr_floats(&self, name: &str) -> Option<&[f32]> {
        self.attr(name).map(|a| a.proto.floats.as_slice())
    }

    /// A `STRING` attribute, as its bytes (ONNX does not require UTF-8).
    pub fn attr_string(&self, name: &str) -> Option<&[u8]> {
        self.attr(name).and_then(|a| a.proto.s.as_deref())
    }

    /// A `GRAPH` attribute (an If branch, a Loop or Scan body), kept as ONNX stores it.
    pub fn attr_graph(&self, name: &str) -> Option<&proto::GraphProto> {
        self.attr(name).and_then(|a| a.proto.g.as_ref())
    }

    /// Sets an `INT` attribute (see [`Op::set_attr_with`] for what is kept).
    pub fn set_attr_int(&mut self, name: &str, value: i64) {
        self.set_attr_with(name, AttributeType::Int, |a| a.i = Some(value));
    }

    /// Sets an `INTS` attribute (see [`Op::set_attr_with`] for what is kept).
    pub fn set_attr_ints(&mut self, name: &str, values: &[i64]) {
        self.set_attr_with(name, AttributeType::Ints, |a| a.ints = values.to_vec());
    }

    /// Sets a `FLOAT` attribute (see [`Op::set_attr_with`] for what is kept).
    pub fn set_attr_float(&mut self, name: &str, value: f32) {
        self.set_attr_with(name, AttributeType::Float, |a| a.f = Some(value));
    }

    /// Sets a `FLOATS` attribute (see [`Op::set_attr_with`] for what is kept).
    pub fn set_attr_floats(&mut self, name: &str, values: &[f32]) {
        self.set_attr_with(name, AttributeType::Floats, |a| a.floats = values.to_vec());
    }

    /// Sets a `STRING` attribute (see [`Op::set_attr_with`] for what is kept).
    pub fn set_attr_string(&mut self, name: &str, value: &[u8]) {
        self.set_attr_with(name, AttributeType::String, |a| a.s = Some(value.to_vec()));
    }

    /// Removes the attribute called `name`, if there is one; the others keep their order.
    pub fn remove_attr(&mut self, name: &str) {
        self.attributes.retain(|a| a.name() != name);
    }

    /// Sets attribute `name` to a value of type `ty` written by `set`. An attribute of that type
    /// keeps its place and every other field (doc string, declared type as stored) and has its
    /// value replaced, so the attribute is written as before but for its value. One of another
    /// type is replaced in place by a fresh attribute (name and doc string kept), so it never
    /// holds two values; a new one goes last.
    fn set_attr_with(&mut self, name: &str, ty: AttributeType, set: impl FnOnce(&mut proto::AttributeProto)) {
        match self.attributes.iter_mut().find(|a| a.name() == name) {
            // An untyped attribute (older exporters omit `type`) keeps its encoding too: the
            // reader refuses one holding a value of another type than its schema's.
            Some(a) if a.proto.r#type.is_none_or(|t| t == ty as i32) => set(&mut a.proto),
            Some(a) => {
                let mut fresh = proto::AttributeProto {
                    name: a.proto.name.clone(),
                    doc_string: a.proto.doc_string.clone(),
                    r#type: Some(ty as i32),
                    ..Default::default()
                };
                set(&mut fresh);
                *a = Attribute { proto: fresh, tensor: None };
            }
            None => {
                let mut fresh = proto::AttributeProto { name: Some(name.to_string()), r#type: Some(ty as i32), ..Default::default() };
                set(&mut fresh);
                self.attributes.push(Attribute { proto: fresh, tensor: None });
            }
        }
    }

    /// Whether any attribute holds a subgraph (If, Loop, Scan).
    pub fn has_subgraphs(&self) -> bool {
        self.attributes.iter().any(|a| a.proto.g.is_some() || !a.proto.graphs.is_empty())
    }

    /// The subgraphs held by the attributes, in attribute order.
    pub fn subgraphs(&self) -> impl Iterator<Item = &proto::GraphProto> {
        self.attributes.iter().flat_map(|a| a.proto.g.iter().chain(a.proto.graphs.iter()))
    }
}

impl Graph {
    /// An empty graph with the given graph-level fields.
    pub fn new(shell: proto::GraphProto) -> Graph {
        Graph { shell, ..Default::default() }
    }

    /// Adds a value; its name must be new.
    pub fn add_value(&mut self, value: Value) -> Result<ValueId, IrError> {
        if let Some(&existing) = self.by_name.get(&value.name) {
            return Err(IrError::DuplicateValue {
                name: value.name.clone(),
                first: self.describe_definition(existing),
                second: describe_kind(&value.kind).to_string(),
            });
        }
        let name = value.name.clone();
        let id = ValueId(self.dag.add_node(Node::Value(value)));
        self.by_name.insert(name, id);
        Ok(id)
    }

    /// Adds an op reading `inputs` (`None` for an omitted optional input) and producing
    /// `outputs`, which must not have a producer yet. The op's `seq` is kept if set, else the op
    /// goes after all others.
    pub fn add_op(&mut self, mut op: Op, inputs: &[Option<ValueId>], outputs: &[Option<ValueId>]) -> Result<OpId, IrError> {
        for out in outputs.iter().flatten() {
            if let Some((producer, _)) = self.producer(*out) {
                let name = self.value(*out).name.clone();
                return Err(IrError::DuplicateValue {
                    name,
                    first: format!("output of node `{}`", self.op(producer).name),
                    second: format!("output of node `{}`", op.name),
                });
            }
            if self.value(*out).kind != ValueKind::Produced {
                return Err(IrError::DuplicateValue {
                    name: self.value(*out).name.clone(),
                    first: self.describe_definition(*out),
                    second: format!("output of node `{}`", op.name),
                });
            }
        }
        if op.seq == u64::MAX {
            op.seq = self.next_seq;
        }
        self.next_seq = self.next_seq.max(op.seq + 1);
        let id = OpId(self.dag.add_node(Node::Op { op, n_inputs: inputs.len(), n_outputs: outputs.len() }));
        for (slot, input) in inputs.iter().enumerate() {
            if let Some(v) = input {
                self.dag.add_edge(v.0, id.0, Edge::Input(slot));
            }
        }
        for (slot, output) in outputs.iter().enumerate() {
            if let Some(v) = output {
                self.dag.add_edge(id.0, v.0, Edge::Output(slot));
            }
        }
        Ok(id)
    }

    /// Makes input `slot` of `op` read `value` instead of what it read before (a slot past the
    /// last one adds an input, leaving any slots between them omitted).
    pub fn set_op_input(&mut self, op: OpId, slot: usize, value: ValueId) {
        if let Node::Op { n_inputs, .. } = &mut self.dag[op.0] {
            *n_inputs = (*n_inputs).max(slot + 1);
        }
        let old = self.dag.edges_directed(op.0, Direction::Incoming).find(|e| *e.weight() == Edge::Input(slot)).map(|e| e.id());
        if let Some(edge) = old {
            self.dag.remove_edge(edge);
        }
        self.dag.add_edge(value.0, op.0, Edge::Input(slot));
    }

    /// Makes every input slot of `op` that reads `old` read `new` instead.
    pub fn replace_input(&mut self, op: OpId, old: ValueId, new: ValueId) {
        let slots: Vec<usize> = self.op_inputs(op).iter().enumerate().filter(|(_, v)| **v == Some(old)).map(|(slot, _)| slot).collect();
        for slot in slots {
            self.set_op_input(op, slot, new);
        }
    }

    /// Adds an initializer named `base`, or `base_2`, `base_3`… if that name is taken.
    pub fn add_initializer(&mut self, base: &str, tensor: Tensor) -> ValueId {
        let base = if base.is_empty() { "initializer" } else { base };
        let name = std::iter::once(base.to_string())
            .chain((2..).map(|i| format!("{base}_{i}")))
            .find(|n| self.value_by_name(n).is_none())
            .expect("some suffix is free");
        let id = self.add_value(Value::new(name.clone(), ValueKind::Initializer(tensor.renamed(&name)))).expect("the name is free");
        self.initializers.push(id);
        id
    }

    /// Replaces the tensor of an initializer, keeping its name, and takes its shape, into the
    /// value and its records (exporters record weights in `value_info` too).
    pub fn set_initializer(&mut self, id: ValueId, tensor: Tensor) {
        let value = self.value_mut(id);
        let tensor = tensor.renamed(&value.name);
        value.shape = Some(Shape::known(&tensor.dims()));
        value.kind = ValueKind::Initializer(tensor);
        value.reconcile_records();
    }

    /// Whether an initializer may be changed where it is: it is not part of the model's
    /// interface (a graph input, as IR versions < 4 list them, or a graph output).
    pub fn is_private_initializer(&self, id: ValueId) -> bool {
        self.value(id).initializer().is_some() && !self.inputs.contains(&id) && !self.is_output(id)
    }

    /// Links `value` to `op` as read by one of the op's subgraphs.
    pub fn add_capture(&mut self, op: OpId, value: ValueId) {
        self.dag.add_edge(value.0, op.0, Edge::Captured);
    }

    /// The value called `name`.
    pub fn value_by_name(&self, name: &str) -> Option<ValueId> {
        self.by_name.get(name).copied()
    }

    /// A value.
    pub fn value(&self, id: ValueId) -> &Value {
        match &self.dag[id.0] {
            Node::Value(v) => v,
            Node::Op { .. } => unreachable!("ValueId always points at a value"),
        }
    }

    /// A value, mutably. Renaming it is not allowed here (the name index would go stale).
    pub fn value_mut(&mut self, id: ValueId) -> &mut Value {
        match &mut self.dag[id.0] {
            Node::Value(v) => v,
            Node::Op { .. } => unreachable!("ValueId always points at a value"),
        }
    }

    /// An op.
    pub fn op(&self, id: OpId) -> &Op {
        match &self.dag[id.0] {
            Node::Op { op, .. } => op,
            Node::Value(_) => unreachable!("OpId always points at an op"),
        }
    }

    /// An op, mutably.
    pub fn op_mut(&mut self, id: OpId) -> &mut Op {
        match &mut self.dag[id.0] {
            Node::Op { op, .. } => op,
            Node::Value(_) => unreachable!("OpId always points at an op"),
        }
    }

    fn arity(&self, id: OpId) -> (usize, usize) {
        match &self.dag[id.0] {
            Node::Op { n_inputs, n_outputs, .. } => (*n_inputs, *n_outputs),
            Node::Value(_) => unreachable!("OpId always points at an op"),
        }
    }

    /// The op's inputs by slot; `None` where an optional input is omitted.
    pub fn op_inputs(&self, id: OpId) -> Vec<Option<ValueId>> {
        let mut inputs = vec![None; self.arity(id).0];
        for e in self.dag.edges_directed(id.0, Direction::Incoming) {
            if let Edge::Input(slot) = *e.weight() {
                inputs[slot] = Some(ValueId(e.source()));
            }
        }
        inputs
    }

    /// The op's outputs by slot; `None` where an optional output is omitted.
    pub fn op_outputs(&self, id: OpId) -> Vec<Option<ValueId>> {
        let mut outputs = vec![None; self.arity(id).1];
        for e in self.dag.edges_directed(id.0, Direction::Outgoing) {
            if let Edge::Output(slot) = *e.weight() {
                outputs[slot] = Some(ValueId(e.target()));
            }
        }
        outputs
    }

    /// Input `slot` of an op, if present.
    pub fn op_input(&self, id: OpId, slot: usize) -> Option<ValueId> {
        self.op_inputs(id).get(slot).copied().flatten()
    }

    /// Output `slot` of an op, if present.
    pub fn op_output(&self, id: OpId, slot: usize) -> Option<ValueId> {
        self.op_outputs(id).get(slot).copied().flatten()
    }

    /// Values the op's subgraphs read from the enclosing scope, sorted by name.
    pub fn op_captures(&self, id: OpId) -> Vec<ValueId> {
        let mut captured: Vec<ValueId> = self
            .dag
            .edges_directed(id.0, Direction::Incoming)
            .filter(|e| *e.weight() == Edge::Captured)
            .map(|e| ValueId(e.source()))
            .collect();
        captured.sort_by(|a, b| self.value(*a).name.cmp(&self.value(*b).name));
        captured
    }

    /// The op producing a value and the output slot, if any.
    pub fn producer(&self, id: ValueId) -> Option<(OpId, usize)> {
        self.dag.edges_directed(id.0, Direction::Incoming).find_map(|e| match *e.weight() {
            Edge::Output(slot) => Some((OpId(e.source()), slot)),
            _ => None,
        })
    }

    /// Every use of a value: the op and how it reads it, in a deterministic order.
    pub fn consumers(&self, id: ValueId) -> Vec<(OpId, Edge)> {
        let mut uses: Vec<(OpId, Edge)> =
            self.dag.edges_directed(id.0, Direction::Outgoing).map(|e| (OpId(e.target()), *e.weight())).collect();
        uses.sort_by_key(|(op, edge)| (self.op(*op).seq, edge_order(edge)));
        uses
    }

    /// Whether the value is a graph output.
    pub fn is_output(&self, id: ValueId) -> bool {
        self.outputs.contains(&id)
    }

    /// Every op, in no particular order.
    pub fn op_ids(&self) -> impl Iterator<Item = OpId> + '_ {
        self.dag.node_indices().filter(|&n| matches!(self.dag[n], Node::Op { .. })).map(OpId)
    }

    /// Every value, in no particular order.
    pub fn value_ids(&self) -> impl Iterator<Item = ValueId> + '_ {
        self.dag.node_indices().filter(|&n| matches!(self.dag[n], Node::Value(_))).map(ValueId)
    }

    /// Number of ops.
    pub fn op_count(&self) -> usize {
        self.op_ids().count()
    }

    /// The ops in a topological order that keeps the original node order wherever the
    /// dependencies allow; an error names an op on a cycle.
    pub fn topo_order(&self) -> Result<Vec<OpId>, IrError> {
        let mut pending: HashMap<NodeIndex, usize> = HashMap::new();
        let mut ready = BinaryHeap::new();
        for op in self.op_ids() {
            let deps = self.op_dependencies(op).len();
            pending.insert(op.0, deps);
            if deps == 0 {
                ready.push(Reverse((self.op(op).seq, op.0)));
            }
        }
        let mut order = Vec::with_capacity(pending.len());
        while let Some(Reverse((_, n))) = ready.pop() {
            let op = OpId(n);
            order.push(op);
            for out in self.op_outputs(op).into_iter().flatten() {
                for (user, _) in self.consumers(out) {
                    let left = pending.get_mut(&user.0).expect("every op is counted");
                    *left -= 1;
                    if *left == 0 {
                        ready.push(Reverse((self.op(user).seq, user.0)));
                    }
                }
            }
        }
        if order.len() < pending.len() {
            let stuck = pending.iter().filter(|(_, left)| **left > 0).map(|(n, _)| OpId(*n)).min_by_key(|op| self.op(*op).seq);
            let op = self.op(stuck.expect("a cycle leaves ops behind"));
            return Err(IrError::Cycle { node: op.name.clone(), op_type: op.op_type.clone() });
        }
        Ok(order)
    }

    /// One entry per edge from a produced value into the op (an op reading a value twice counts twice).
    fn op_dependencies(&self, op: OpId) -> Vec<OpId> {
        self.dag.edges_directed(op.0, Direction::Incoming).filter_map(|e| self.producer(ValueId(e.source())).map(|(p, _)| p)).collect()
    }

    /// Removes an op, leaving its outputs without a producer.
    pub fn remove_op(&mut self, id: OpId) -> Op {
        match self.dag.remove_node(id.0) {
            Some(Node::Op { op, .. }) => op,
            _ => unreachable!("OpId always points at an op"),
        }
    }

    /// Removes a value and all its links; it must not be listed as a graph input or output.
    pub fn remove_value(&mut self, id: ValueId) -> Value {
        let value = match self.dag.remove_node(id.0) {
            Some(Node::Value(v)) => v,
            _ => unreachable!("ValueId always points at a value"),
        };
        self.by_name.remove(&value.name);
        self.initializers.retain(|v| *v != id);
        self.sparse_initializers.retain(|v| *v != id);
        self.value_infos.retain(|l| *l != Listed::Value(id));
        value
    }

    /// Gives the graph inputs named in `sizes` those dims, and every shape whose symbolic size
    /// is named like one of theirs the same number: the shapes at one set of input sizes, for a
    /// runtime's copy or for counting MACs at the sizes a model ran at. Records are not changed.
    pub fn bind_input_sizes(&mut self, sizes: &std::collections::BTreeMap<String, Vec<u64>>) {
        let mut symbols: HashMap<String, u64> = HashMap::new();
        for &input in &self.inputs.clone() {
            let value = self.value_mut(input);
            let Some(dims) = sizes.get(&value.name) else { continue };
            if let Some(shape) = &value.shape {
                for (d, &size) in shape.0.iter().zip(dims) {
                    if let crate::shape::Dim::Sym(name) = d {
                        symbols.insert(name.clone(), size);
                    }
                }
            }
            value.shape = Some(Shape::known(dims));
        }
        for id in self.value_ids().collect::<Vec<_>>() {
            if let Some(shape) = self.value_mut(id).shape.as_mut() {
                for d in &mut shape.0 {
                    if let crate::shape::Dim::Sym(name) = d
                        && let Some(&size) = symbols.get(name.as_str())
                    {
                        *d = crate::shape::Dim::Known(size);
                    }
                }
            }
        }
    }

    fn describe_definition(&self, id: ValueId) -> String {
        match self.producer(id) {
            Some((op, _)) => format!("output of node `{}`", self.op(op).name),
            None => describe_kind(&self.value(id).kind).to_string(),
        }
    }
}

fn edge_order(edge: &Edge) -> usize {
    match edge {
        Edge::Input(slot) => *slot,
        Edge::Output(slot) => *slot,
        Edge::Captured => usize::MAX,
    }
}

fn describe_kind(kind: &ValueKind) -> &'static str {
    match kind {
        ValueKind::Input => "graph input",
        ValueKind::Initializer(_) => "initializer",
        ValueKind::SparseInitializer(_) => "sparse initializer",
        ValueKind::Produced => "node output",
    }
}

/// Names a subgraph reads from enclosing scopes: used but defined neither in it nor in any
/// subgraph it encloses on the path to the use. Sorted.
pub fn captured_names(graph: &proto::GraphProto) -> BTreeSet<String> {
    let mut captured = BTreeSet::new();
    collect_captures(graph, &mut Vec::new(), &mut captured);
    captured
}

fn collect_captures<'a>(graph: &'a proto::GraphProto, scopes: &mut Vec<BTreeSet<&'a str>>, captured: &mut BTreeSet<String>) {
    let mut local: BTreeSet<&str> = BTreeSet::new();
    local.extend(graph.input.iter().map(|v| v.name()));
    local.extend(graph.initializer.iter().map(|t| t.name()));
    local.extend(graph.sparse_initializer.iter().filter_map(|s| s.values.as_ref()).map(|t| t.name()));
    scopes.push(local);
    let defined = |scopes: &Vec<BTreeSet<&str>>, name: &str| scopes.iter().any(|s| s.contains(name));
    for node in &graph.node {
        for input in node.input.iter().filter(|n| !n.is_empty()) {
            if !defined(scopes, input) {
                captured.insert(input.clone());
            }
        }
        for attr in &node.attribute {
            for sub in attr.g.iter().chain(attr.graphs.iter()) {
                let mut inner = BTreeSet::new();
                collect_captures(sub, scopes, &mut inner);
                captured.extend(inner.into_iter().filter(|n| !defined(scopes, n)));
            }
        }
        let top = scopes.last_mut().expect("pushed above");
        top.extend(node.output.iter().map(String::as_str));
    }
    for out in &graph.output {
        if !defined(scopes, out.name()) {
            captured.insert(out.name().to_string());
        }
    }
    scopes.pop();
}
