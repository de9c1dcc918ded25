//! The default command as a library call: read a model, run a pipeline with a runtime its
//! passes can measure through, verify the result against the passes' references, and specialise
//! its interface to `--input-shape`. Writing is the caller's ([`crate::emit`]).

// `Error` carries the reader's and the passes' errors by value: it is returned once per run,
// so its size is not worth a box at every call site.
#![allow(clippy::result_large_err)]

use crate::api::Error;
use crate::frontend::{Loaded, ReadOptions, read_model};
use crate::ir::{Model, ModelStats, model_stats};
use crate::passes::{Context, PassRun, Pipeline, Progress};
use crate::recipe::Recipe;
use crate::runtime::inputs::{check_feed_matches_input_shapes, given_feed, parse_input_shapes, pin_input_shapes, runtime_inputs};
use crate::runtime::measure::{GivenInputs, TractRuntime};
use crate::runtime::tract::{Feed, random_feed};
use crate::runtime::verify::{VERIFY_MAX_WEIGHT_BYTES, Verification, VerifyError, verify};
use serde::Serialize;
use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;

/// What a compile run did.
pub struct Compiled {
    /// The result (and the folder its external data is read from).
    pub loaded: Loaded,
    /// Figures of the model as read.
    pub before: ModelStats,
    /// Figures of the result.
    pub after: ModelStats,
    /// Each pass: options, report, timing.
    pub runs: Vec<PassRun>,
    /// What verification found, when it ran.
    pub verification: Option<Verification>,
    /// The inputs the model ran on, and where they came from.
    pub inputs: InputsUsed,
    /// Things the user should know, in the order they happened.
    pub notes: Vec<String>,
    /// What was asked that cannot be met sensibly: the run's and every pass's.
    pub warnings: Vec<String>,
}

/// The inputs of a run, for the report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct InputsUsed {
    /// `--inputs`, or `random (seed N)`.
    pub source: String,
    /// The shape of each input verification ran on.
    pub shapes: BTreeMap<String, Vec<usize>>,
    /// Inputs that got seeded random values.
    pub generated: Vec<String>,
}

/// Runs `pipeline` on the model at `path` with the settings of `recipe` (its pipeline is not
/// read: `pipeline` is what runs). `after_pass` sees each pass's result and can stop the
/// pipeline (`--stop-after`); `progress`, when given, hears of every phase.
pub fn compile(
    path: &Path,
    pipeline: &Pipeline,
    recipe: &Recipe,
    after_pass: &mut dyn FnMut(&PassRun, &Model) -> ControlFlow<()>,
    mut progress: Option<&mut dyn Progress>,
) -> Result<Compiled, Error> {
    let read = |source| Error::reading(path, source);
    let settings = &recipe.verify;
    let phase = |p: &mut Option<&mut dyn Progress>, name: Option<&str>| {
        if let Some(p) = p.as_deref_mut() {
            match name {
                Some(name) => p.start(name, 0),
                None => p.finish(),
            }
        }
    };
    phase(&mut progress, Some("reading the model"));
    let mut loaded =
        read_model(path, &ReadOptions { infer_shapes: pipeline.needs_shapes() && settings.input_shapes.is_empty() }).map_err(read)?;
    let shapes = parse_input_shapes(&settings.input_shapes, &runtime_inputs(&loaded.model.graph))?;
    if pipeline.needs_shapes() && !shapes.is_empty() {
        loaded.infer_shapes(&shapes).map_err(read)?;
    }
    phase(&mut progress, None);
    refuse_unasked_big_verification(path, &loaded.model, pipeline, recipe)?;
    let mut notes = Vec::new();
    let mut warnings = Vec::new();
    for (name, dims) in &shapes {
        let recorded = loaded.model.graph.value_by_name(name).and_then(|v| loaded.model.graph.value(v).shape.as_ref()).map(|s| s.rank());
        if let Some(rank) = recorded.filter(|&r| r != dims.len()) {
            warnings.push(format!("--input-shape gives `{name}` {} dims, but the model declares it of rank {rank}", dims.len()));
        }
    }
    // Open axes get sizes a run means something at; the passes and verification use them.
    let (run_shapes, unsized_axes) = crate::runtime::inputs::open_axis_sizes(&loaded.model, &shapes);
    if !unsized_axes.is_empty() {
        notes.push(format!(
            "no realistic size is known for {}: runs use 1 there; give --input-shape or --inputs for a comparison that means something",
            unsized_axes.join(", ")
        ));
    }
    let mut inputs = InputsUsed { source: format!("random inputs (seed {})", settings.seed), ..Default::default() };
    let given = match &settings.inputs {
        Some(file) => {
            let (feed, generated) = given_feed(&loaded.model, file, &run_shapes, settings.seed)
                .map_err(|e| Error::Inputs(format!("reading inputs `{}`: {e}", file.display())))?;
            if !generated.is_empty() {
                let names: Vec<String> = generated.iter().map(|n| format!("`{n}`")).collect();
                notes.push(format!(
                    "`{}` has no array for input {}; verification feeds {} seeded random values (seed {})",
                    file.display(),
                    names.join(", "),
                    if names.len() == 1 { "it" } else { "them" },
                    settings.seed
                ));
            }
            inputs.source = format!("inputs from `{}`", file.display());
            inputs.generated = generated;
            Some(GivenInputs { feed, source: format!("`{}`", file.display()) })
        }
        None => None,
    };
    let original = loaded.model.clone();
    let (before, macs_at_run_sizes) = stats_at(&loaded.model, &run_shapes);
    let mut runtime = TractRuntime { dir: loaded.dir.clone(), given, input_shapes: shapes.clone() };
    let mut cx = Context::with_runtime(&mut runtime);
    if let Some(p) = progress.as_deref_mut() {
        cx = cx.with_progress(p);
    }
    let runs = crate::passes::run_pipeline_observed(&mut loaded.model, pipeline, &mut cx, after_pass)
        .map_err(|source| Error::Optimise { path: path.to_path_buf(), source })?;
    drop(cx);
    let (after, _) = stats_at(&loaded.model, &run_shapes);
    if macs_at_run_sizes {
        let sizes: Vec<String> = run_shapes.iter().map(|(n, d)| format!("{n}{d:?}")).collect();
        notes.push(format!("the model leaves sizes open: MACs are counted at {}", sizes.join(", ")));
    }
    let verification = if !settings.enabled || pipeline.is_empty() {
        None
    } else {
        let feed = match runtime.given.take() {
            Some(g) => g.feed,
            None => random_feed(&original, Feed::default(), &run_shapes, settings.seed)?,
        };
        check_feed_matches_input_shapes(&feed, &shapes)?;
        inputs.shapes = feed.0.iter().map(|(n, t)| (n.clone(), t.shape().to_vec())).collect();
        let references: Vec<_> = runs.iter().map(|r| r.report.reference.clone()).collect();
        phase(&mut progress, Some("verifying in tract"));
        let verified = verify(&original, &loaded.model, &references, &loaded.dir, &feed, settings.tolerance);
        phase(&mut progress, None);
        match verified {
            Ok(v) => Some(v),
            Err(e @ VerifyError::OriginalNotRunnable(_)) => return Err(unverified(path, "cannot verify", &e)),
            Err(e) => return Err(unverified(path, "verification failed on", &e)),
        }
    };
    let keep_open = settings.open_interface && !shapes.is_empty() && !pipeline.is_empty();
    if keep_open && verification.is_some() {
        let references: Vec<_> = runs.iter().map(|r| r.report.reference.clone()).collect();
        let (mut verified_at, mut fixed) = (Vec::new(), Vec::new());
        // One open axis at a time, doubled: an axis the original itself cannot take another size
        // of (PP-OCR's height of 48) is the model's, and stays as it declares it.
        for (name, axis) in crate::runtime::inputs::open_axes(&loaded.model, &shapes) {
            let mut other = shapes.clone();
            let size = other.get_mut(&name).and_then(|d| d.get_mut(axis)).expect("an axis of a given shape");
            *size = (*size * 2).max(2);
            let label = format!("`{name}` axis {axis} at {size}");
            let (other_run, _) = crate::runtime::inputs::open_axis_sizes(&original, &other);
            let feed = random_feed(&original, Feed::default(), &other_run, settings.seed)?;
            phase(&mut progress, Some("verifying at other input sizes"));
            let result = verify(&original, &loaded.model, &references, &loaded.dir, &feed, settings.tolerance);
            phase(&mut progress, None);
            match result {
                Ok(_) => verified_at.push(label),
                Err(VerifyError::OriginalNotRunnable(_)) => fixed.push(label),
                Err(e) => {
                    return Err(Error::Unverified(format!(
                        "the result for `{}` does not keep its interface open: verified at the --input-shape sizes, it fails with {label}: \
                         {e}; nothing was written (without --open-interface its inputs declare the --input-shape sizes)",
                        path.display()
                    )));
                }
            }
        }
        if verified_at.is_empty() && fixed.is_empty() {
            notes.push("--open-interface: no input declares an open size, so there is nothing to keep open".into());
        } else {
            let mut note = String::from("--open-interface: the inputs keep their open sizes");
            if !verified_at.is_empty() {
                note += &format!("; verified again with {}", verified_at.join(", "));
            }
            if !fixed.is_empty() {
                note += &format!("; the original itself does not run with {}", fixed.join(", "));
            }
            notes.push(note);
        }
    } else if keep_open {
        notes.push("--open-interface without verification: the inputs keep their open sizes, unchecked".into());
    }
    drop(original);
    if !pipeline.is_empty() && !keep_open {
        for (name, dims) in pin_input_shapes(&mut loaded.model, &shapes) {
            notes.push(format!("input `{name}` now declares {dims:?}: the model was specialised to --input-shape"));
        }
    }
    warnings.extend(runs.iter().flat_map(|r| r.report.warnings.iter().cloned()));
    Ok(Compiled { loaded, before, after, runs, verification, inputs, notes, warnings })
}

/// The model's figures, with MACs counted at `sizes` where its own shapes leave the sizes of
/// Conv, Gemm or MatMul operands open (a dynamo export's `batch` and `seq`); whether they were.
fn stats_at(model: &Model, sizes: &BTreeMap<String, Vec<u64>>) -> (ModelStats, bool) {
    let mut stats = model_stats(model);
    if stats.macs_unknown.is_empty() || sizes.is_empty() {
        return (stats, false);
    }
    let mut bound = model.clone();
    bound.graph.bind_input_sizes(sizes);
    let at_sizes = model_stats(&bound);
    let counted = at_sizes.macs_unknown.len() < stats.macs_unknown.len();
    (stats.macs, stats.macs_unknown) = (at_sizes.macs, at_sizes.macs_unknown);
    (stats, counted)
}

fn unverified(model: &Path, what: &str, e: &VerifyError) -> Error {
    Error::Unverified(format!(
        "{what} the result for `{}`: {e}; nothing was written (--no-verify writes the model unverified)",
        model.display()
    ))
}

/// Verifying a model of more than [`VERIFY_MAX_WEIGHT_BYTES`] of weights takes several times
/// its size in memory, so it is not started unasked; but an unverified model is never written
/// unasked either: the user says which, before the passes spend any time.
fn refuse_unasked_big_verification(path: &Path, model: &Model, pipeline: &Pipeline, recipe: &Recipe) -> Result<(), Error> {
    let bytes = model_stats(model).weight_bytes;
    let v = &recipe.verify;
    if v.force || !v.enabled || pipeline.is_empty() || bytes <= VERIFY_MAX_WEIGHT_BYTES {
        return Ok(());
    }
    Err(Error::Unverified(format!(
        "not verifying `{}` unasked: it has {:.2} GiB of weights, over the {} GiB above which verification (several copies of the weights in tract) \
         must be asked for; nothing was written: pass --verify to verify anyway, or --no-verify to write the model unverified",
        path.display(),
        bytes as f64 / (1u64 << 30) as f64,
        VERIFY_MAX_WEIGHT_BYTES >> 30
    )))
}
