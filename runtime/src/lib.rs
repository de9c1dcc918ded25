//! prunec's runtime: models run in tract, for what needs their values rather than their bytes.
//!
//! - [`tract`]: plans built for a feed's shapes, `.npz` feeds, seeded random inputs, comparison.
//! - [`calibrate`]: the measuring service passes ask for ([`prunec_passes::Measure`]): the
//!   current model run on the inputs, the values a pass names captured, piece by piece.
//! - [`verify`]: the pipeline's output judged against the composition of its passes'
//!   references.
//! - [`latency`]: two plans timed in alternation, median and spread.
//!
//! The passes never see tract: they see the measuring service as a trait.

pub mod calibrate;
mod error;
pub mod latency;
pub mod tract;
pub mod verify;

pub use error::RunError;
