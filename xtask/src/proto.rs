//! Small builders of ONNX protobuf messages, shared by the test-model generator (`testdata`)
//! and the hostile-input corpus (`hostile`).
//!
//! Also compiled into `tests/hostile.rs` (by `#[path]`, as `crate::proto`), so it only uses
//! prost and prunec-ir.

use prost::bytes::Bytes;
use prunec_ir::proto::{AttributeProto, GraphProto, TensorProto, attribute_proto::AttributeType, tensor_proto::DataType};

/// An attribute with its name and type only; the builders below fill the value.
pub fn attr(name: &str, ty: AttributeType) -> AttributeProto {
    AttributeProto { name: Some(name.into()), r#type: Some(ty as i32), ..Default::default() }
}

pub fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto { i: Some(i), ..attr(name, AttributeType::Int) }
}

pub fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto { ints: ints.to_vec(), ..attr(name, AttributeType::Ints) }
}

pub fn attr_float(name: &str, f: f32) -> AttributeProto {
    AttributeProto { f: Some(f), ..attr(name, AttributeType::Float) }
}

pub fn attr_tensor(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto { t: Some(t), ..attr(name, AttributeType::Tensor) }
}

pub fn attr_graph(name: &str, g: GraphProto) -> AttributeProto {
    AttributeProto { g: Some(g), ..attr(name, AttributeType::Graph) }
}

/// A tensor stored as little-endian `raw_data`, the encoding exporters use for weights.
pub fn tensor_raw(name: &str, dims: &[i64], data_type: DataType, raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(data_type as i32),
        raw_data: Some(Bytes::from(raw)),
        ..Default::default()
    }
}

pub fn tensor_f32(name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
    tensor_raw(name, dims, DataType::Float, data.iter().flat_map(|v| v.to_le_bytes()).collect())
}

pub fn tensor_i64(name: &str, dims: &[i64], data: &[i64]) -> TensorProto {
    tensor_raw(name, dims, DataType::Int64, data.iter().flat_map(|v| v.to_le_bytes()).collect())
}
