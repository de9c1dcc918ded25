//! Layer removal: residual blocks found in the graph, scored, and replaced by identity.
//!
//! - [`find_blocks`] (`detect.rs`) finds the removable residual branches, groups them into
//!   sub-blocks (the two streams of a joint attention are one), layers (attention then MLP;
//!   both streams of a dual-stream block) and stacks of equal structure, with the candidates it
//!   declines and why.
//! - [`remove`] (`remove.rs`) splices the chosen layers or sub-blocks out and runs dead-code
//!   elimination; [`Merge::Average`] averages the removed layers into their survivors.
//! - [`zero_residuals`] (`reference.rs`) builds what a removal must equal: the original with
//!   those branches multiplied by zero; [`zeroed_branches`] and [`zero_branches`] are the same
//!   edit by value names, for a reference built from an already edited original.
//! - [`RemoveLayers`] (`pass.rs`) is the `remove-layers` pass: candidates, scores (data-free,
//!   or measured on the inputs: block influence, ablation, greedy re-scoring), the choice (a
//!   count, explicit layers, a parameter or MAC target, one contiguous run), the removal and
//!   its zeroed-branch reference.
//! - [`gate`] evaluates adaLN gates over a grid of timesteps, for the `gate` score.
//! - [`score`] has the data-free scores and the data-driven ones as functions of activations.

mod detect;
pub mod gate;
mod pass;
mod reference;
mod remove;
pub mod score;
#[cfg(test)]
mod tests;

pub use detect::{BlockKind, BlockReport, DeclineReason, Declined, Layer, Region, Stack, SubBlock, find_blocks};
pub use pass::{
    Aggregate, GateScoring, LayerScore, MeasuredScore, MeasuredScores, RemoveLayers, RemoveLayersOptions, RemoveLayersReport, RemovedUnit,
    ScoredUnit, SubBlockChoice, measured_scores,
};
pub use reference::{ZeroedBranch, zero_branches, zero_residuals, zeroed_branches};
pub use remove::{Merge, Removal, Selection, remove, remove_with};
pub use score::DataFreeScore;
