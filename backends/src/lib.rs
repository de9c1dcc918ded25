//! prunec's backends: what a [`prunec_ir::Model`] becomes.
//!
//! - [`onnx`]: the ONNX writer, atomic and deterministic, with external-data layout control.
//! - [`nnef`]: the tract backend: a tract NNEF archive, or an optimised tract plan in-process.
//! - [`tract`]: running a model in tract, for verification and latency figures.
//! - [`latency`]: timing two models in alternation, median and spread.
//!
//! A backend never decides what to prune: it emits what the IR holds.

mod error;
pub mod latency;
pub mod nnef;
pub mod onnx;
pub mod tract;

pub use error::{RunError, WriteError};
pub use nnef::NnefError;
/// The tract version prunec builds with, for callers that run the plans [`nnef::runnable`] returns.
pub use tract_onnx;
