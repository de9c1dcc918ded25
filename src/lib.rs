//! prunec: a compiler that makes ONNX models smaller by structural pruning.
//!
//! The crates form one pipeline, and dependencies only flow along it:
//! [`frontend`] reads ONNX into the [`ir`], [`passes`] rewrite the IR, and [`backends`] emit it
//! (ONNX, a tract NNEF archive, or a tract plan in-process). The `prunec` binary in
//! `src/main.rs` wires them together; the functions at the crate root ([`load`], [`pipeline`],
//! [`run`], [`emit`], [`tract_plan`], [`Report`]) do the same steps for a library user. See
//! ARCHITECTURE.md for the map.

pub use prunec_backends as backends;
pub use prunec_frontend as frontend;
pub use prunec_ir as ir;
pub use prunec_passes as passes;

pub mod api;
pub mod calibrate;
pub mod verify;

pub use api::{EmitOptions, Error, Format, PassSummary, Report, emit, load, pipeline, run, tract_plan};
