//! prunec: a compiler that makes ONNX models smaller by structural pruning.
//!
//! The crates form one pipeline, and dependencies only flow along it:
//! [`frontend`] reads ONNX into the [`ir`], [`passes`] rewrite the IR, and [`backends`] emit it
//! (ONNX, or a tract plan). The `prunec` binary in `src/main.rs` wires them together; see
//! ARCHITECTURE.md for the map.

pub use prunec_backends as backends;
pub use prunec_frontend as frontend;
pub use prunec_ir as ir;
pub use prunec_passes as passes;

pub mod calibrate;
pub mod verify;
