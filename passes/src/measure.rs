//! What a pass may ask of the world outside the IR: the measuring service.
//!
//! A pass that needs activations (calibration statistics, a refit, a block's influence) asks its
//! [`Context`] for a [`Measure`] on the inputs it wants. The runtime crate implements it with
//! tract; passes never see tract, and a pipeline without a runtime simply cannot measure (the
//! pass says what it needed).

use prunec_ir::{Model, ValueId};
use std::collections::BTreeMap;

/// A value captured from a run, as f32 whatever its element type.
#[derive(Clone, Debug, PartialEq)]
pub struct Activation {
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its elements, row-major.
    pub values: Vec<f32>,
}

/// Which inputs a pass wants to measure on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inputs {
    /// The user's inputs (`--inputs`).
    Given,
    /// Seeded synthetic inputs: `samples` along an open batch axis, smooth noise for images.
    Noise {
        /// Samples where the batch is open.
        samples: usize,
        /// The seed.
        seed: u64,
    },
}

/// Why a measurement failed.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    /// The pipeline runs without a runtime, or without the inputs the pass asked for.
    #[error("{0}")]
    Unavailable(String),
    /// The model did not run.
    #[error("running the model: {0}")]
    Run(String),
}

/// The models of one measurement, run on one set of inputs.
pub trait Measure {
    /// Where the inputs came from, for reports (a file name, or how the noise was made).
    fn source(&self) -> &str;

    /// Runs `model` (any model with the graph inputs the measurement was made for) and returns
    /// the values named by `probes`; only what they depend on is computed. A probe that is a
    /// graph input is given back from the inputs.
    fn capture(&mut self, model: &Model, probes: &[ValueId]) -> Result<BTreeMap<ValueId, Activation>, MeasureError>;

    /// A run walked in pieces: each [`Stepwise::capture`] computes only what earlier pieces have
    /// not, and feeds their kept values back. Valid while, between two pieces, only ops that no
    /// earlier piece computed change (a refit walking its levels). `model` fixes which values
    /// depend on the inputs.
    fn stepwise<'a>(&'a mut self, model: &Model) -> Box<dyn Stepwise + 'a>;
}

/// See [`Measure::stepwise`].
pub trait Stepwise {
    /// The values `probes` of `model` (the walk's model as changed so far).
    fn capture(&mut self, model: &Model, probes: &[ValueId]) -> Result<BTreeMap<ValueId, Activation>, MeasureError>;
}

/// What runs models for passes: the runtime crate's implementation, or none.
pub trait Runtime {
    /// Whether the user gave inputs (`--inputs`): the passes' `auto` choices depend on it.
    fn has_inputs(&self) -> bool;

    /// A measurement of `model` on `inputs`.
    fn measure<'a>(&'a mut self, model: &Model, inputs: Inputs) -> Result<Box<dyn Measure + 'a>, MeasureError>;
}

/// What a running pass can ask for.
#[derive(Default)]
pub struct Context<'r> {
    runtime: Option<&'r mut dyn Runtime>,
}

impl<'r> Context<'r> {
    /// A context whose passes can measure through `runtime`.
    pub fn with_runtime(runtime: &'r mut dyn Runtime) -> Context<'r> {
        Context { runtime: Some(runtime) }
    }

    /// Whether the user gave inputs.
    pub fn has_inputs(&self) -> bool {
        self.runtime.as_ref().is_some_and(|r| r.has_inputs())
    }

    /// A measurement on `inputs`; `Unavailable` without a runtime or without given inputs.
    pub fn measure<'a>(&'a mut self, model: &Model, inputs: Inputs) -> Result<Box<dyn Measure + 'a>, MeasureError> {
        match self.runtime.as_deref_mut() {
            Some(runtime) => runtime.measure(model, inputs),
            None => Err(MeasureError::Unavailable("this pipeline runs without a runtime, so no pass can run the model".into())),
        }
    }
}
