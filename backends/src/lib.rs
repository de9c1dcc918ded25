//! prunec's backends: what a [`prunec_ir::Model`] becomes.
//!
//! - [`onnx`]: the ONNX writer, atomic and deterministic, with external-data layout control.
//! - [`tract`]: running a model in tract, for verification and latency figures.
//!
//! A backend never decides what to prune: it emits what the IR holds.

mod error;
pub mod onnx;
pub mod tract;

pub use error::{RunError, WriteError};
