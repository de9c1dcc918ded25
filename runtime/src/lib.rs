//! prunec's runtime: models run in tract, for what needs their values rather than their bytes.
//!
//! - [`tract`]: plans built for a feed's shapes, `.npz` feeds, seeded random inputs, comparison.
//! - [`measure`]: the measuring service passes ask for ([`prunec_passes::Measure`]): the
//!   current model run on the inputs, the values a pass names captured, piece by piece.
//! - [`inputs`]: the user's inputs completed with seeded values, noise, `--input-shape`.
//! - [`verify`]: the pipeline's output judged against the composition of its passes'
//!   references.
//! - [`latency`]: two plans timed in alternation, median and spread.
//! - `lower`: tract's own copy of a model it refuses as written (shape arithmetic folded at the
//!   feed's sizes, ops it lacks lowered into ones it has).
//!
//! The passes never see tract: they see the measuring service as a trait.

mod error;
pub mod inputs;
pub mod latency;
mod lower;
pub mod measure;
pub mod tract;
pub mod verify;

pub use error::RunError;
