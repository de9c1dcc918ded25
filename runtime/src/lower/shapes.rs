//! The copy's shapes at the feed's sizes, as tract's analysis gives them.
//!
//! The reader's shapes are the model's at open sizes (a symbol, or an expression of one that the
//! IR keeps as unknown), and the ops an inlined branch brings have none at all; an `If` deciding
//! on `Shape(x)` can only be folded once `x`'s sizes are numbers. tract analyses a model it
//! cannot run as far as it can (past the `If` it refuses), so what it says of the values before
//! that point is exact at these sizes.

use crate::tract::{Feed, specialise};
use prost::Message;
use prunec_ir::{DType, Dim, Model, Shape};
use std::path::Path;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::{Factoid, InferenceModelExt};

/// Float initializers of at least this many elements are shown to tract as graph inputs of
/// their type and shape: the analysis never needs a weight's values, and a constant makes tract
/// copy it.
const WEIGHT_AS_INPUT_MIN_ELEMENTS: i64 = 1024;

/// Gives every value of `model` whose shape is not all numbers the sizes tract's analysis finds
/// at the feed's input sizes, and every value without an element type tract's; how many values
/// changed. Nothing changes where tract cannot even parse the model.
pub(super) fn refresh(model: &mut Model, dir: &Path, feed: &Feed) -> usize {
    let Ok(bytes) = prunec_backends::onnx::to_bytes(model) else { return 0 };
    let facts = match prunec_ir::catch_quietly(|| analyse(bytes, dir, feed)) {
        Ok(Ok(facts)) => facts,
        _ => return 0,
    };
    let graph = &mut model.graph;
    let mut changed = 0;
    for id in graph.value_ids().collect::<Vec<_>>() {
        let value = graph.value_mut(id);
        let Some((dtype, dims)) = facts.get(&value.name) else { continue };
        let complete = value.shape.as_ref().is_some_and(|s| s.0.iter().all(|d| matches!(d, Dim::Known(_))));
        let mut touched = false;
        if let Some(dims) = dims.as_ref().filter(|_| !complete) {
            // A recorded rank that disagrees is left alone: tract would be contradicting the model.
            if value.shape.as_ref().is_none_or(|s| s.rank() == dims.len()) {
                value.shape = Some(Shape::known(dims));
                touched = true;
            }
        }
        if value.dtype.is_none() && dtype.is_some() {
            value.dtype = *dtype;
            touched = true;
        }
        changed += usize::from(touched);
    }
    changed
}

type Facts = std::collections::BTreeMap<String, (Option<DType>, Option<Vec<u64>>)>;

fn analyse(bytes: Vec<u8>, dir: &Path, feed: &Feed) -> TractResult<Facts> {
    let mut pb = tract_onnx::pb::ModelProto::decode(bytes.as_slice())?;
    drop(bytes);
    specialise(&mut pb, feed);
    weights_as_inputs(&mut pb);
    let parsed = tract_onnx::onnx().parse(&pb, dir.to_str())?;
    drop(pb);
    let mut model = parsed.model;
    let inputs = model.input_outlets()?.to_vec();
    for (name, tensor) in &feed.0 {
        let Some(outlet) = parsed.outlets_by_name.get(name) else { continue };
        let Some(ix) = inputs.iter().position(|o| o == outlet) else { continue };
        model.set_input_fact(ix, InferenceFact::dt_shape(tensor.datum_type(), tensor.shape()))?;
    }
    // Obstinate: past the op it refuses, as far as it gets.
    let _refusal = model.analyse(true);
    let mut facts = Facts::new();
    for (name, outlet) in &parsed.outlets_by_name {
        let Ok(fact) = model.outlet_fact(*outlet) else { continue };
        let dtype = fact.datum_type.concretize().and_then(onnx_dtype);
        let dims = fact.shape.concretize().and_then(|dims| dims.iter().map(|d| u64::try_from(d.to_i64().ok()?).ok()).collect());
        facts.insert(name.clone(), (dtype, dims));
    }
    Ok(facts)
}

/// Turns the large float initializers into graph inputs of their type and shape (see
/// [`WEIGHT_AS_INPUT_MIN_ELEMENTS`]).
fn weights_as_inputs(pb: &mut tract_onnx::pb::ModelProto) {
    use tract_onnx::pb::tensor_proto::DataType as T;
    use tract_onnx::pb::tensor_shape_proto::{Dimension, dimension::Value as D};
    use tract_onnx::pb::{TensorShapeProto, TypeProto, ValueInfoProto, type_proto};
    let Some(graph) = pb.graph.as_mut() else { return };
    let floats = [T::Float, T::Float16, T::Double, T::Bfloat16].map(|t| t as i32);
    let is_weight =
        |t: &tract_onnx::pb::TensorProto| floats.contains(&t.data_type) && t.dims.iter().product::<i64>() >= WEIGHT_AS_INPUT_MIN_ELEMENTS;
    let (weights, constants): (Vec<_>, Vec<_>) = std::mem::take(&mut graph.initializer).into_iter().partition(is_weight);
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
        match graph.input.iter_mut().find(|i| i.name == t.name) {
            Some(input) => input.r#type = Some(ty),
            None => graph.input.push(ValueInfoProto { name: t.name, r#type: Some(ty), ..Default::default() }),
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
        _ => return None,
    };
    Some(DType(t as i32))
}
