//! prunec: a compiler that makes ONNX models smaller by structural pruning.
//!
//! The crates form one pipeline, and dependencies only flow along it:
//! [`frontend`] reads ONNX into the [`ir`], [`passes`] rewrite the IR, and [`backends`] emit it
//! (ONNX, a tract NNEF archive, or a tract plan in-process); the [`runtime`] runs models in tract
//! for the passes' measurements, verification and benchmarks. The `prunec` binary in
//! `src/main.rs` wires them together; the functions at the crate root ([`load`], [`pipeline`],
//! [`run`], [`emit`], [`tract_plan`], [`Report`]) do the same steps for a library user. See
//! ARCHITECTURE.md for the map.

pub use prunec_backends as backends;
pub use prunec_frontend as frontend;
pub use prunec_ir as ir;
pub use prunec_passes as passes;
pub use prunec_runtime as runtime;

pub mod api;
pub mod compile;
pub mod recipe;

pub use api::{EmitOptions, Error, Format, PassSummary, Report, emit, load, pipeline, run, tract_plan};
pub use compile::{Compiled, compile};
pub use recipe::Recipe;
