//! Cleanup passes: rewrites that shrink a graph without changing what it computes.

mod dce;
mod dequantize;
mod fold_bn;
mod fold_constants;
mod identity;

pub(crate) use dce::DeadCodeElimination;
pub use dce::remove_dead_code;
pub(crate) use dequantize::Dequantize;
pub(crate) use fold_bn::FoldBatchNorm;
pub(crate) use fold_constants::FoldConstants;
pub use fold_constants::{KnownIntegers, fold_shape_arithmetic, known_integers};
pub(crate) use identity::IdentityElimination;
