//! prunec's backends: what a [`prunec_ir::Model`] becomes.
//!
//! - [`onnx`]: the ONNX writer, atomic and deterministic, with external-data layout control.
//! - [`nnef`]: the tract backend: a tract NNEF archive, or an optimised tract plan in-process.
//!
//! A backend never decides what to prune: it emits what the IR holds.

mod error;
pub mod nnef;
pub mod onnx;

pub use error::WriteError;
pub use nnef::NnefError;
/// The tract version prunec builds with, for callers that run the plans [`nnef::runnable`] returns.
pub use tract_onnx;
