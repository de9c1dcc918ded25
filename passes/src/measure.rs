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
    /// The first `samples` samples of the user's inputs along their batch axis (all of them
    /// where there are fewer): for passes that run the model many times.
    GivenFirst {
        /// Samples to keep.
        samples: usize,
    },
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

/// Where a pass reports progress through a phase that can take more than a second (the CLI
/// draws a bar on a terminal, and nothing otherwise).
pub trait Progress {
    /// A phase of `total` steps starts (0: unknown).
    fn start(&mut self, phase: &str, total: u64);
    /// One step of the phase is done.
    fn step(&mut self);
    /// The phase is over.
    fn finish(&mut self);
}

/// What a running pass can ask for: the measuring service, a progress sink, and a place for
/// warnings (what the user asked for that cannot be met sensibly).
#[derive(Default)]
pub struct Context<'r> {
    runtime: Option<&'r mut dyn Runtime>,
    progress: Option<&'r mut dyn Progress>,
    warnings: Vec<String>,
}

impl<'r> Context<'r> {
    /// A context whose passes can measure through `runtime`.
    pub fn with_runtime(runtime: &'r mut dyn Runtime) -> Context<'r> {
        Context { runtime: Some(runtime), ..Context::default() }
    }

    /// The context, with progress reported to `progress`.
    pub fn with_progress(self, progress: &'r mut dyn Progress) -> Context<'r> {
        Context { progress: Some(progress), ..self }
    }

    /// A phase of `total` steps starts.
    pub fn start(&mut self, phase: &str, total: u64) {
        if let Some(p) = self.progress.as_deref_mut() {
            p.start(phase, total);
        }
    }

    /// One step of the current phase is done.
    pub fn step(&mut self) {
        if let Some(p) = self.progress.as_deref_mut() {
            p.step();
        }
    }

    /// The current phase is over.
    pub fn finish(&mut self) {
        if let Some(p) = self.progress.as_deref_mut() {
            p.finish();
        }
    }

    /// The progress sink, taken out so that it can report while a measurement borrows the
    /// context; give it back with [`Context::restore_progress`].
    pub fn take_progress(&mut self) -> Option<&'r mut dyn Progress> {
        self.progress.take()
    }

    /// Gives back what [`Context::take_progress`] took.
    pub fn restore_progress(&mut self, progress: Option<&'r mut dyn Progress>) {
        self.progress = progress;
    }

    /// Records a warning for the user.
    pub fn warn(&mut self, warning: String) {
        self.warnings.push(warning);
    }

    /// The warnings recorded since the last call.
    pub fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    /// Whether the pipeline can run models at all.
    pub fn has_runtime(&self) -> bool {
        self.runtime.is_some()
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
