//! Shape inference through tract, for the values a model does not annotate.
//!
//! Most exported models record shapes only on graph inputs and outputs. tract-onnx's inference
//! model propagates them (symbolic dims included) through every op it knows. It works on its own
//! copy of the protobuf, so it cannot disturb the IR; an op tract does not know leaves the values
//! after it partly unknown, and [`InferenceReport`] says which.

use prost::Message;
use prunec_ir::{DType, Dim, Model, Shape, ValueId};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::{Factoid, GenericFactoid, InferenceModelExt, ShapeFactoid};

/// What shape inference did.
#[derive(Clone, Debug, Default)]
pub struct InferenceReport {
    /// Whether inference ran at all.
    pub ran: bool,
    /// Why tract could not build or fully analyse the model, if it could not.
    pub problem: Option<String>,
    /// Values with no complete shape after inference, sorted.
    pub unknown: Vec<String>,
}

impl InferenceReport {
    pub(crate) fn skipped() -> InferenceReport {
        InferenceReport::default()
    }
}

/// Fills in dtypes and shapes of `model`'s values from tract's analysis of `bytes` (the same model).
/// `input_shapes` fixes the shapes of the named graph inputs first.
pub(crate) fn infer_shapes(model: &mut Model, bytes: &[u8], dir: &Path, input_shapes: &BTreeMap<String, Vec<u64>>) -> InferenceReport {
    let graph = &mut model.graph;
    // The inputs at the given sizes, and every recorded size named like one of their symbolic
    // ones (a dynamo export's `batch`, `seq`) the same number: tract may not reach them all.
    graph.bind_input_sizes(input_shapes);
    // With every shape and type recorded tract has nothing to add (recorded sizes win in `merge`),
    // and it would parse the model with its weights, copying every one of them: on a model of
    // several gigabytes that copy is most of the memory prunec needs.
    let complete = |v: &prunec_ir::Value| v.dtype.is_some() && v.shape.as_ref().is_some_and(|s| s.0.iter().all(|d| d.known().is_some()));
    if graph.value_ids().all(|id| complete(graph.value(id))) {
        return InferenceReport::skipped();
    }
    // tract is third-party code fed arbitrary models; a panic there must not take prunec down.
    let analysed = prunec_ir::catch_quietly(|| analyse(bytes, dir, input_shapes));
    let mut report = InferenceReport { ran: true, ..Default::default() };
    let facts = match analysed {
        Ok(Ok((facts, problem))) => {
            report.problem = problem;
            facts
        }
        Ok(Err(e)) => {
            report.problem = Some(format!("{e:#}"));
            BTreeMap::new()
        }
        Err(message) => {
            report.problem = Some(format!("tract panicked while analysing the model: {message}"));
            BTreeMap::new()
        }
    };
    let ids: Vec<_> = graph.value_ids().collect();
    let recorded: HashMap<ValueId, Shape> = ids.iter().filter_map(|&id| Some((id, graph.value(id).shape.clone()?))).collect();
    for &id in &ids {
        let value = graph.value_mut(id);
        if let Some((dtype, shape)) = facts.get(&value.name) {
            value.dtype = value.dtype.or(*dtype);
            if let Some(shape) = shape {
                value.shape = Some(merge(value.shape.as_ref(), shape));
            }
        }
    }
    propagate_through_elementwise(graph, &recorded);
    report.unknown = ids.iter().map(|&id| graph.value(id)).filter(|v| !complete_shape(v)).map(|v| v.name.clone()).collect();
    report.unknown.sort();
    report
}

fn complete_shape(v: &prunec_ir::Value) -> bool {
    v.shape.as_ref().is_some_and(|s| s.0.iter().all(|d| *d != Dim::Unknown))
}

/// Ops whose one output has the shape of their first input, by the operator spec.
const SAME_SHAPE: &[&str] = &[
    "Abs",
    "Acos",
    "Acosh",
    "Asin",
    "Asinh",
    "Atan",
    "Atanh",
    "BatchNormalization",
    "Cast",
    "Ceil",
    "Celu",
    "Clip",
    "Cos",
    "Cosh",
    "Dropout",
    "Elu",
    "Erf",
    "Exp",
    "Floor",
    "Gelu",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "InstanceNormalization",
    "LayerNormalization",
    "LeakyRelu",
    "Log",
    "LogSoftmax",
    "LpNormalization",
    "Mish",
    "Neg",
    "Not",
    "Reciprocal",
    "Relu",
    "Round",
    "Selu",
    "Sigmoid",
    "Sign",
    "Sin",
    "Sinh",
    "Softmax",
    "Softplus",
    "Softsign",
    "Sqrt",
    "Tan",
    "Tanh",
    "ThresholdedRelu",
];

/// Gives, in one pass in graph order, the values that an op of [`SAME_SHAPE`] computes the
/// sizes of its input, wherever the model did not record them. tract infers facts in both
/// directions, so a contradiction downstream (a Conv weight that expects other channels) can
/// leave such a value unknown or give it the contradicting size; the reader's op checks need
/// the size the input implies to name the contradiction.
fn propagate_through_elementwise(graph: &mut prunec_ir::Graph, recorded: &HashMap<ValueId, Shape>) {
    let Ok(order) = graph.topo_order() else { return };
    for op in order {
        let o = graph.op(op);
        if !matches!(o.domain.as_str(), "" | "ai.onnx") || !SAME_SHAPE.contains(&o.op_type.as_str()) {
            continue;
        }
        let (Some(x), Some(y)) = (graph.op_input(op, 0), graph.op_output(op, 0)) else { continue };
        let Some(input) = graph.value(x).shape.clone() else { continue };
        let current = graph.value(y).shape.clone();
        if current.as_ref().is_some_and(|c| c.rank() != input.rank()) {
            continue;
        }
        let record = recorded.get(&y).filter(|r| r.rank() == input.rank());
        let dims = (0..input.rank())
            .map(|axis| {
                let recorded_dim = record.map(|r| &r.0[axis]).filter(|d| matches!(d, Dim::Known(_)));
                let from_input = Some(&input.0[axis]).filter(|d| matches!(d, Dim::Known(_)));
                let inferred = current.as_ref().map(|c| &c.0[axis]).filter(|d| **d != Dim::Unknown);
                recorded_dim.or(from_input).or(inferred).unwrap_or(&input.0[axis]).clone()
            })
            .collect();
        graph.value_mut(y).shape = Some(Shape(dims));
    }
}

type Facts = BTreeMap<String, (Option<DType>, Option<Shape>)>;

fn analyse(bytes: &[u8], dir: &Path, input_shapes: &BTreeMap<String, Vec<u64>>) -> TractResult<(Facts, Option<String>)> {
    let mut pb = tract_onnx::pb::ModelProto::decode(bytes)?;
    name_anonymous_input_dims(&mut pb);
    weights_as_inputs(&mut pb);
    let onnx = tract_onnx::onnx();
    let parsed = onnx.parse(&pb, dir.to_str())?;
    let mut model = parsed.model;
    let inputs = model.input_outlets()?.to_vec();
    for (name, dims) in input_shapes {
        let Some(outlet) = parsed.outlets_by_name.get(name) else { continue };
        let Some(ix) = inputs.iter().position(|o| o == outlet) else { continue };
        let mut fact = model.input_fact(ix)?.clone();
        fact.shape = ShapeFactoid::closed(dims.iter().map(|&d| GenericFactoid::Only(TDim::Val(d as i64))).collect());
        model.set_input_fact(ix, fact)?;
    }
    // Obstinate: keep going past ops that fail, to learn as much as possible.
    let problem = model.analyse(true).err().map(|e| format!("{e:#}"));
    let mut facts = Facts::new();
    for (name, outlet) in &parsed.outlets_by_name {
        let Ok(fact) = model.outlet_fact(*outlet) else { continue };
        let dtype = fact.datum_type.concretize().and_then(onnx_dtype);
        let shape = (!fact.shape.is_open()).then(|| {
            Shape(
                fact.shape
                    .dims()
                    .map(|d| match d.concretize() {
                        Some(t) => match t.to_i64() {
                            Ok(v) if v >= 0 => Dim::Known(v as u64),
                            _ => Dim::Sym(t.to_string()),
                        },
                        None => Dim::Unknown,
                    })
                    .collect(),
            )
        });
        facts.insert(name.clone(), (dtype, shape));
    }
    Ok((facts, problem))
}

/// Keeps what the model recorded and takes from inference what it adds: a dim where the record
/// has none, or a concrete size where the record has a symbol (fixed by `input_shapes`).
fn merge(recorded: Option<&Shape>, inferred: &Shape) -> Shape {
    match recorded {
        Some(r) if r.rank() == inferred.rank() => Shape(
            r.0.iter()
                .zip(&inferred.0)
                .map(|(r, i)| match (r, i) {
                    (Dim::Known(_), _) => r.clone(),
                    (_, Dim::Known(_)) => i.clone(),
                    (Dim::Unknown, _) => i.clone(),
                    _ => r.clone(),
                })
                .collect(),
        ),
        // A rank that disagrees with the record is tract's mistake or the model's; trust the record.
        Some(r) => r.clone(),
        None => inferred.clone(),
    }
}

/// Float initializers of at least this many elements are shown to tract as graph inputs.
const WEIGHT_AS_INPUT_MIN_ELEMENTS: i64 = 1024;

/// Whether [`weights_as_inputs`] shows an initializer of this element type (ONNX's number) and
/// these dims to tract as a graph input: its values are then never read by inference.
pub(crate) fn is_weight_input(data_type: i32, dims: &[i64]) -> bool {
    use tract_onnx::pb::tensor_proto::DataType as T;
    let floats = [T::Float, T::Float16, T::Double, T::Bfloat16].map(|t| t as i32);
    floats.contains(&data_type) && dims.iter().all(|&d| d >= 0) && dims.iter().product::<i64>() >= WEIGHT_AS_INPUT_MIN_ELEMENTS
}

/// Turns the large float initializers (weights) into graph inputs of their type and shape. Shape
/// inference needs the values of the constants that spell out sizes (small integer tensors, a
/// few float scales), never those of the weights, and a constant makes tract load it: a copy of
/// every weight, external data included, which on a model of several gigabytes is most of the
/// memory prunec would need.
fn weights_as_inputs(pb: &mut tract_onnx::pb::ModelProto) {
    use tract_onnx::pb::tensor_shape_proto::{Dimension, dimension::Value as D};
    use tract_onnx::pb::{TensorShapeProto, TypeProto, ValueInfoProto, type_proto};
    let Some(graph) = pb.graph.as_mut() else { return };
    let (weights, constants): (Vec<_>, Vec<_>) =
        std::mem::take(&mut graph.initializer).into_iter().partition(|t| is_weight_input(t.data_type, &t.dims));
    graph.initializer = constants;
    for t in weights {
        let dim = t.dims.iter().map(|&d| Dimension { value: Some(D::DimValue(d)), ..Default::default() }).collect();
        let ty = TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: t.data_type,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        };
        // Models of IR version 3 also list their initializers as inputs.
        match graph.input.iter_mut().find(|i| i.name == t.name) {
            Some(input) => input.r#type = Some(ty),
            None => graph.input.push(ValueInfoProto { name: t.name, r#type: Some(ty), ..Default::default() }),
        }
    }
}

/// Gives each graph-input dim with neither a size nor a name (`?`, or `-1` as some exporters
/// write) a symbol of its own, so inference carries it as an expression instead of giving up.
fn name_anonymous_input_dims(pb: &mut tract_onnx::pb::ModelProto) {
    use tract_onnx::pb::tensor_shape_proto::dimension::Value as D;
    use tract_onnx::pb::type_proto::Value as T;
    let Some(graph) = pb.graph.as_mut() else { return };
    for input in &mut graph.input {
        let name = input.name.clone();
        let Some(T::TensorType(t)) = input.r#type.as_mut().and_then(|t| t.value.as_mut()) else { continue };
        let Some(shape) = t.shape.as_mut() else { continue };
        for (axis, dim) in shape.dim.iter_mut().enumerate() {
            let anonymous = match &dim.value {
                None => true,
                Some(D::DimValue(v)) => *v < 0,
                Some(D::DimParam(p)) => p.is_empty() || p == "?",
            };
            if anonymous {
                dim.value = Some(D::DimParam(format!("{name}_dim{axis}")));
            }
        }
    }
}

fn onnx_dtype(dt: DatumType) -> Option<DType> {
    use prunec_ir::proto::tensor_proto::DataType as T;
    let t = match dt {
        DatumType::Bool => T::Bool,
        DatumType::U8 => T::Uint8,
        DatumType::U16 => T::Uint16,
        DatumType::U32 => T::Uint32,
        DatumType::U64 => T::Uint64,
        DatumType::I8 => T::Int8,
        DatumType::I16 => T::Int16,
        DatumType::I32 => T::Int32,
        DatumType::I64 | DatumType::TDim => T::Int64,
        DatumType::F16 => T::Float16,
        DatumType::F32 => T::Float,
        DatumType::F64 => T::Double,
        DatumType::String => T::String,
        _ => return None,
    };
    Some(DType(t as i32))
}
