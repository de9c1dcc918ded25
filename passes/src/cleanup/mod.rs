//! Cleanup passes: rewrites that shrink a graph without changing what it computes.

mod dce;

pub(crate) use dce::DeadCodeElimination;
