//! prunec's intermediate representation.
//!
//! A [`Model`] is an ONNX model lifted into a graph that passes can rewrite safely:
//!
//! - The main graph is a bipartite petgraph DAG of [`Op`]s and [`Value`]s. An edge runs from a value
//!   into each op that reads it (tagged with the input slot) and from an op to each value it
//!   produces (tagged with the output slot). A value has at most one producer; graph inputs,
//!   initializers and sparse initializers have none.
//! - Values that an op's subgraphs (If/Loop/Scan bodies) read from the outer scope are linked to
//!   the op by [`Edge::Captured`] edges, so no pass can delete or rename them unnoticed.
//! - Everything of the ONNX schema that the IR does not model (opset imports, functions, training
//!   info, metadata, doc strings, subgraph bodies, non-tensor types) is carried verbatim as
//!   [`proto`] messages, so writing a model back with no pass loses nothing.
//! - Weights are [`Tensor`]s: reference-counted and immutable; changing one makes a new tensor
//!   (copy on write), so a pass cannot clone a large weight by accident. External data is a slice
//!   of a memory map, never read before it is needed.
//! - Shapes are [`Shape`]s of [`Dim`]s: known, symbolic (a `dim_param` or a tract expression) or
//!   unknown. A value's recorded ONNX type is kept apart from what shape inference found.
//!
//! The IR never decodes or encodes protobuf bytes: that is the frontend's and the backends' job.

pub mod proto;

mod dump;
mod error;
mod graph;
mod groups;
mod guard;
mod ids;
mod ops;
mod quant;
mod records;
mod rng;
mod shape;
mod stats;
mod tensor;
mod validate;

pub use dump::dump;
pub use error::IrError;
pub use graph::{Attribute, Edge, Graph, InfoList, Listed, Model, NodeMeta, Op, Value, ValueInfoMeta, ValueKind, captured_names};
pub use groups::{Group, GroupAxis, Groups, WeightSlice, analyse as analyse_groups, constant_tensor};
pub use guard::catch_quietly;
pub use ids::{OpId, ValueId};
pub use ops::{Role, coupled_op_types};
pub use quant::{QuantizedInput, dequantized_weight, quantized_input, reads_quantized_weight};
pub use rng::SplitMix64;
pub use shape::{DType, Dim, Shape};
pub use stats::{ModelStats, OpCost, model_stats, op_cost, quantized_weights};
pub use tensor::{PageRelease, Tensor};
pub use validate::{OpRule, ValidateError, validate, validate_ops, validate_value_types};
