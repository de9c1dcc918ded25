//! The library API, step for step what the `prunec` command does: [`load`] a model,
//! build a [`pipeline`], [`run`] it, [`emit`] the result (ONNX, a tract NNEF archive, or an
//! in-process tract plan with [`tract_plan`]) and keep the [`Report`].
//!
//! The same model and pipeline give the same bytes as the command line.
//!
//! From a downstream project's `build.rs`, pruning a model the crate embeds at build time
//! (`prunec` as a build-dependency):
//!
//! ```no_run
//! // build.rs
//! use std::path::PathBuf;
//!
//! fn main() -> Result<(), prunec::Error> {
//!     println!("cargo::rerun-if-changed=models/classifier.onnx");
//!     let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
//!     let mut loaded = prunec::load("models/classifier.onnx".as_ref(), &Default::default())?;
//!     let passes = prunec::pipeline("dce,fold,prune{ratio=0.3},identity")?;
//!     let report = prunec::run(&mut loaded, &passes)?;
//!     prunec::emit(&loaded, &out.join("classifier.onnx"), prunec::Format::Onnx, &Default::default())?;
//!     prunec::emit(&loaded, &out.join("classifier.nnef.tgz"), prunec::Format::Nnef, &Default::default())?;
//!     println!("cargo::warning=pruned {} of {} parameters", report.before.parameters - report.after.parameters, report.before.parameters);
//!     Ok(())
//! }
//! ```
//!
//! The crate then embeds the result with `include_bytes!(concat!(env!("OUT_DIR"), "/classifier.nnef.tgz"))`.

// `Error` carries the reader's and the passes' errors by value: it is returned once per run,
// so its size is not worth a box at every call site.
#![allow(clippy::result_large_err)]

use crate::backends::WriteError;
use crate::backends::nnef::{InputShapes, NnefError};
use crate::backends::onnx::{WriteOptions, write_model};
use crate::backends::tract_onnx::prelude::TypedSimplePlan;
use crate::frontend::{Loaded, ReadError, ReadOptions, read_model};
use crate::ir::{ModelStats, model_stats};
use crate::passes::{Context, PassError, Pipeline};
use crate::runtime::RunError;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

impl Error {
    /// A read failure of `path`, named once: in the reader's message where it names the file,
    /// else in this one ("reading `path`: node … ").
    pub fn reading(path: &Path, source: ReadError) -> Error {
        if source.names_the_file() { Error::ReadFile(source) } else { Error::Read { path: path.to_path_buf(), source } }
    }
}

/// Why a step of the library API failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model could not be read.
    #[error("reading `{}`", path.display())]
    Read {
        /// The model file.
        path: PathBuf,
        /// Why.
        source: ReadError,
    },
    /// The model file could not be read; the reader's message names it.
    #[error(transparent)]
    ReadFile(ReadError),
    /// A pass list or a pass failed.
    #[error(transparent)]
    Pass(#[from] PassError),
    /// A pass failed on a model.
    #[error("optimising `{}`", path.display())]
    Optimise {
        /// The model file.
        path: PathBuf,
        /// Why.
        source: PassError,
    },
    /// The inputs cannot be used.
    #[error("{0}")]
    Inputs(String),
    /// Verification was meant to run and failed, or could not run: nothing may be written.
    #[error("{0}")]
    Unverified(String),
    /// The ONNX output could not be written.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The tract backend refused the model.
    #[error(transparent)]
    Nnef(#[from] NnefError),
    /// A model could not be run.
    #[error(transparent)]
    Run(#[from] RunError),
}

/// What an output file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// ONNX (`.onnx`).
    Onnx,
    /// A tract NNEF archive (`.nnef.tgz`).
    Nnef,
}

impl Format {
    /// The format an output path names: `.nnef.tgz` (or `.nnef.tar.gz`) is NNEF, anything else ONNX.
    pub fn of_path(path: &Path) -> Format {
        let name = path.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        if name.ends_with(".nnef.tgz") || name.ends_with(".nnef.tar.gz") { Format::Nnef } else { Format::Onnx }
    }

    /// The file-name ending of the format.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Onnx => ".onnx",
            Format::Nnef => ".nnef.tgz",
        }
    }

    /// `path` with its format's ending replaced by this format's: the sibling output of
    /// `--emit onnx,nnef` (`out.onnx` gives `out.nnef.tgz` and the other way round).
    pub fn sibling(self, path: &Path) -> PathBuf {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let lower = name.to_ascii_lowercase();
        let stem_len =
            [".nnef.tar.gz", ".nnef.tgz", ".onnx"].iter().find(|e| lower.ends_with(*e)).map_or(name.len(), |e| name.len() - e.len());
        path.with_file_name(format!("{}{}", &name[..stem_len], self.extension()))
    }
}

/// How to emit: ONNX writer options and, for tract, concrete input shapes.
#[derive(Clone, Debug, Default)]
pub struct EmitOptions {
    /// External data of an ONNX output.
    pub onnx: WriteOptions,
    /// Concrete shapes for inputs of a tract output; others keep their declared shapes.
    pub input_shapes: InputShapes,
}

/// What a pipeline run did to a model.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Figures of the model before the passes.
    pub before: ModelStats,
    /// Figures after.
    pub after: ModelStats,
    /// Each pass: name, ops and values removed, details.
    pub passes: Vec<PassSummary>,
}

/// One pass of a [`Report`].
#[derive(Clone, Debug, Serialize)]
pub struct PassSummary {
    /// The pass.
    pub name: &'static str,
    /// Ops removed.
    pub ops_removed: usize,
    /// Values removed.
    pub values_removed: usize,
    /// The pass's own details (for `prune`, its `PruneReport`), as JSON.
    pub details: Option<serde_json::Value>,
}

/// Reads a model, with tract's shape inference at `input_shapes` where the model does not
/// record shapes (as `prunec MODEL --input-shape` does).
pub fn load(path: &Path, input_shapes: &InputShapes) -> Result<Loaded, Error> {
    let read = |source| Error::reading(path, source);
    let mut loaded = read_model(path, &ReadOptions { infer_shapes: input_shapes.is_empty() }).map_err(read)?;
    if !input_shapes.is_empty() {
        loaded.infer_shapes(input_shapes).map_err(read)?;
    }
    Ok(loaded)
}

/// Parses a pipeline as `--passes` does (`prunec passes` lists the passes and their options;
/// `none` is empty).
pub fn pipeline(text: &str) -> Result<Pipeline, Error> {
    Ok(Pipeline::parse(text)?)
}

/// Runs the passes on the loaded model, in place, without a runtime: a pass that must run the
/// model (wanda, obspa and flap with measured statistics) fails and says so; [`crate::compile()`]
/// runs a pipeline with one (on `--inputs` or seeded noise) and verifies the result.
pub fn run(loaded: &mut Loaded, pipeline: &Pipeline) -> Result<Report, Error> {
    let before = model_stats(&loaded.model);
    let runs = crate::passes::run_pipeline(&mut loaded.model, pipeline, &mut Context::default())?;
    let passes = runs
        .iter()
        .map(|r| PassSummary {
            name: r.name,
            ops_removed: r.report.ops_removed,
            values_removed: r.report.values_removed,
            details: r.report.details.as_ref().map(|d| d.to_json()),
        })
        .collect();
    Ok(Report { before, after: model_stats(&loaded.model), passes })
}

/// Writes the model in `format` at `path` (atomically; the same model gives the same bytes).
/// Returns the bytes written (the model file, or the archive; ONNX external data excluded).
pub fn emit(loaded: &Loaded, path: &Path, format: Format, options: &EmitOptions) -> Result<u64, Error> {
    match format {
        Format::Onnx => Ok(write_model(&loaded.model, path, &options.onnx)?.model_bytes),
        // The properties an archive leaves out are ONNX metadata tract cannot read back from NNEF text.
        Format::Nnef => Ok(crate::backends::nnef::write_nnef(&loaded.model, &loaded.dir, &options.input_shapes, path)?.0),
    }
}

/// The model as an optimised tract plan, in-process and without writing a file: prune and
/// serve in one binary. Inputs keep their declared shapes unless `input_shapes` gives them.
///
/// ```
/// use prunec::backends::tract_onnx::prelude::*;
///
/// let mut loaded = prunec::load("testdata/models/mlp.onnx".as_ref(), &Default::default())?;
/// prunec::run(&mut loaded, &prunec::pipeline("dce,fold,prune,identity")?)?;
/// let plan = prunec::tract_plan(&loaded, &Default::default())?;
/// let x = Tensor::zero::<f32>(&[64, 16])?;
/// let outputs = plan.run(tvec!(x.into()))?;
/// assert_eq!(outputs[0].shape(), &[64, 8]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn tract_plan(loaded: &Loaded, input_shapes: &InputShapes) -> Result<Arc<TypedSimplePlan>, Error> {
    Ok(crate::backends::nnef::runnable(&loaded.model, &loaded.dir, input_shapes)?)
}
