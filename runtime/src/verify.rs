//! Verification of a pipeline's result: run it in tract beside the original and beside the
//! pipeline's reference, and compare.
//!
//! Each pass declares what its output must equal ([`Reference`]); the reference model is the
//! original with every pass's edit applied in order (the masked original for channel removal,
//! nothing for an exact pass). The result must run, keep every output's shape and type, and equal
//! the reference up to float rounding: that is what proves the rewrite sliced every weight and
//! shape consistently. Its distance to the original is the price of pruning, reported but not
//! judged. A pass with no reference (a pruned group crosses a normalisation) leaves the result
//! reported only.

use crate::RunError;
use crate::tract::{Feed, Outputs, Plan, compare};
use prunec_ir::Model;
use prunec_passes::Reference;
use serde::Serialize;
use std::path::Path;

/// Largest difference to the reference, relative to the output's scale, that counts as equal
/// unless `--tolerance` says otherwise. Float sums taken in another order (tract packs a narrower convolution
/// differently) stay near 1e-6 on most models and reach a few 1e-5 behind the softmax of deep
/// real models; a slicing mistake shows at the scale of the pruning drift itself (1e-2 and up).
pub const MASKING_TOLERANCE: f64 = 1e-4;

/// Weight bytes above which the CLI skips verification unless `--verify` forces it: tract holds
/// the original, the pruned and the masked model in turn, each optimised from an in-memory copy
/// of its weights, so verifying takes several times the model's size in memory (and a model over
/// 2 GiB cannot be handed to tract inline at all).
pub const VERIFY_MAX_WEIGHT_BYTES: u64 = 1 << 30;

/// What verification found.
#[derive(Clone, Debug, Serialize)]
pub struct Verification {
    /// Per output.
    pub outputs: Vec<OutputCheck>,
    /// The original's one run in tract that verification makes, in milliseconds: a cold run (no
    /// warm-up, not repeated), so only a rough figure; `prunec bench` measures latency to rely
    /// on (warm-up, alternating runs, in ONNX Runtime too).
    pub original_ms: f64,
    /// Same for the pruned model.
    pub pruned_ms: f64,
    /// What the result was judged against: `exact` (the original), `masked` (the masked
    /// original), `reference` (another model the passes built), or `tolerance` (no reference).
    pub reference: String,
    /// The reference in words, for the report (`the compensated and masked original`).
    pub reference_description: String,
    /// Whether the result had to equal the reference within `tolerance`.
    pub judged: bool,
    /// Why it was not judged.
    pub not_judged: Vec<String>,
    /// The bound on the difference to the reference, relative to each output's scale.
    pub tolerance: f64,
}

/// How one output of the pruned model compares.
#[derive(Clone, Debug, Serialize)]
pub struct OutputCheck {
    /// Output name.
    pub name: String,
    /// Largest absolute difference to the original.
    pub max_abs: f64,
    /// `max_abs` over the original output's largest absolute value.
    pub rel: f64,
    /// The original output's largest absolute value.
    pub scale: f64,
    /// Cosine similarity to the original.
    pub cosine: f64,
    /// Largest difference to the reference, relative to its scale.
    pub reference_rel: f64,
    /// Why the comparison of this output proves nothing, when it does not: the original's
    /// output is the same everywhere (an all-zero head), so equal outputs say nothing of the
    /// rest of the model.
    pub vacuous: Option<String>,
    /// When the difference to the reference exceeded the tolerance: the float error measured
    /// on this output (the reference run by tract's unoptimised kernels against its optimised
    /// ones, relative to its scale). The result is accepted if within [`FLOAT_ERROR_MARGIN`]
    /// times it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub float_error: Option<f64>,
}

/// How many times the measured float error of the reference a result may differ from it by
/// (where that exceeds the tolerance): the sums of a compensated model run in other orders
/// than the masked original's, so their rounding differs by about as much as two orderings of
/// one model do; ten times that leaves room and is still far below what a wrong rewrite
/// changes (whole channels: percents).
pub const FLOAT_ERROR_MARGIN: f64 = 10.0;

/// Why verification failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The original does not run in tract: nothing to compare against (not the pruned model's fault).
    #[error("tract cannot run the original model: {0}")]
    OriginalNotRunnable(RunError),
    /// The pruned model does not run: a prunec bug.
    #[error("the pruned model does not run in tract: {0}")]
    PrunedNotRunnable(RunError),
    /// An output of the pruned model is missing or changed shape or type: a prunec bug.
    #[error("the pruned model's output `{output}` {what}")]
    OutputChanged {
        /// The output.
        output: String,
        /// What changed.
        what: String,
    },
    /// The result differs from the reference: a prunec bug.
    #[error("the pruned model differs from {reference} on output `{output}` by {rel:.3e} of its scale (tolerance {tolerance:e})")]
    Mismatch {
        /// The reference, in words.
        reference: String,
        /// The output.
        output: String,
        /// The relative difference.
        rel: f64,
        /// The tolerance it exceeds.
        tolerance: f64,
    },
    /// Every output of the original is constant on these inputs: no comparison can tell a
    /// broken rewrite from a correct one.
    #[error(
        "every output of the original is constant on these inputs ({0}), so the comparison would prove nothing; verify on inputs the outputs depend on (--inputs)"
    )]
    Vacuous(String),
    /// The reference could not be built or run.
    #[error("cannot build the reference: {0}")]
    Reference(String),
}

/// Compares `pruned` with `original` and with the composition of `references` (the pipeline's
/// passes', in order; none for an exact pipeline), on `feed`. `dir` is where external data of
/// both models is found; `tolerance` bounds the difference to the reference relative to each
/// output's scale.
pub fn verify(
    original: &Model,
    pruned: &Model,
    references: &[Reference],
    dir: &Path,
    feed: &Feed,
    tolerance: f64,
) -> Result<Verification, VerifyError> {
    // One model in tract at a time: each plan holds its own copy of the weights (and the
    // optimiser's packed forms), so a plan is dropped as soon as its outputs are taken, and the
    // next one is built only then. Latency is not measured here (`prunec bench` measures it:
    // warm-up and alternating runs); the figures reported are the one run each that verification
    // needs anyway.
    let (want, original_ms) = run_once(original, dir, feed).map_err(VerifyError::OriginalNotRunnable)?;
    let (got, pruned_ms) = run_once(pruned, dir, feed).map_err(VerifyError::PrunedNotRunnable)?;
    let not_judged: Vec<String> = references
        .iter()
        .flat_map(|r| match r {
            Reference::Unjudged { why } => why.clone(),
            _ => Vec::new(),
        })
        .collect();
    let edits: Vec<_> = references
        .iter()
        .filter_map(|r| match r {
            Reference::Edit(e) => Some(e.clone()),
            _ => None,
        })
        .collect();
    let (kind, description) = match edits.as_slice() {
        _ if !not_judged.is_empty() => ("tolerance", "the original".to_string()),
        [] => ("exact", "the original".to_string()),
        [one] => (one.kind(), one.describe()),
        many => (
            if many.iter().all(|e| e.kind() == "masked") { "masked" } else { "reference" },
            many.iter().map(|e| e.describe()).collect::<Vec<_>>().join(", then "),
        ),
    };
    let reference = if edits.is_empty() {
        None
    } else {
        let mut m = original.clone();
        for edit in &edits {
            edit.apply(&mut m).map_err(VerifyError::Reference)?;
        }
        Some(run_once(&m, dir, feed).map_err(|e| VerifyError::Reference(e.to_string()))?.0)
    };
    let reference = reference.as_ref().unwrap_or(&want);
    let mut outputs = Vec::new();
    for (i, (name, want)) in want.values.iter().enumerate() {
        let changed = |what: String| VerifyError::OutputChanged { output: name.clone(), what };
        let have = &got.values.get(i).ok_or_else(|| changed("is missing".into()))?.1;
        if have.shape() != want.shape() || have.datum_type() != want.datum_type() {
            let of = |t: &crate::tract::TractTensor| format!("{:?}{:?}", t.datum_type(), t.shape());
            return Err(changed(format!("is {}, the original's {}", of(have), of(want))));
        }
        let d = compare(want, have).map_err(|e| changed(e.to_string()))?;
        let dr = compare(&reference.values[i].1, have).map_err(|e| VerifyError::Reference(e.to_string()))?;
        let vacuous = constant_value(want).map(|c| format!("the original's `{name}` is {c} everywhere"));
        outputs.push(OutputCheck {
            name: name.clone(),
            max_abs: d.max_abs,
            rel: d.max_abs / d.ref_max_abs.max(f64::MIN_POSITIVE),
            scale: d.ref_max_abs,
            cosine: d.cosine,
            reference_rel: dr.max_abs / dr.ref_max_abs.max(f64::MIN_POSITIVE),
            vacuous,
            float_error: None,
        });
    }
    let judged = not_judged.is_empty();
    if judged && outputs.iter().any(|o| within(o.reference_rel, tolerance) != Some(true)) {
        // Over the fixed tolerance: is it the float error a model this deep and of this scale
        // has anyway? Measured on the reference itself, in another order of the same sums.
        let noise = float_error(original, &edits, dir, feed, reference)?;
        for (o, n) in outputs.iter_mut().zip(noise) {
            if within(o.reference_rel, tolerance) != Some(true) {
                o.float_error = Some(n);
            }
        }
        let allowed = |o: &OutputCheck| tolerance.max(FLOAT_ERROR_MARGIN * o.float_error.unwrap_or(0.0));
        if let Some(bad) = outputs.iter().find(|o| within(o.reference_rel, allowed(o)) != Some(true)) {
            return Err(VerifyError::Mismatch {
                reference: description,
                output: bad.name.clone(),
                rel: bad.reference_rel,
                tolerance: allowed(bad),
            });
        }
    }
    // After the judgement: a result that differs is a failure whatever the inputs were.
    if !outputs.is_empty() && outputs.iter().all(|o| o.vacuous.is_some()) {
        return Err(VerifyError::Vacuous(outputs.iter().filter_map(|o| o.vacuous.clone()).collect::<Vec<_>>().join("; ")));
    }
    Ok(Verification {
        outputs,
        original_ms,
        pruned_ms,
        reference: kind.to_string(),
        reference_description: description,
        judged,
        not_judged,
        tolerance,
    })
}

/// Per output, how far the reference's outputs (`reference`, from the optimised plan) are from
/// the same model run by tract's unoptimised kernels, relative to each output's scale.
fn float_error(
    original: &Model,
    edits: &[std::sync::Arc<dyn prunec_passes::ReferenceEdit>],
    dir: &Path,
    feed: &Feed,
    reference: &Outputs,
) -> Result<Vec<f64>, VerifyError> {
    let mut m = original.clone();
    for edit in edits {
        edit.apply(&mut m).map_err(VerifyError::Reference)?;
    }
    let failed = |e: RunError| VerifyError::Reference(format!("measuring the float error: {e}"));
    let plain = run_with(&m, dir, feed, Plan::from_model_unoptimised).map_err(failed)?;
    drop(m);
    reference
        .values
        .iter()
        .zip(&plain.values)
        .map(|((_, a), (_, b))| {
            let d = compare(a, b).map_err(|e| VerifyError::Reference(e.to_string()))?;
            Ok(d.max_abs / d.ref_max_abs.max(f64::MIN_POSITIVE))
        })
        .collect()
}

/// Builds `model`'s plan, runs it once on `feed` and drops the plan (and its weights) before
/// returning the outputs and the run's time in milliseconds. A feed of more samples than the
/// model's fixed batch runs batch by batch through one plan, the outputs concatenated along the
/// first axis.
fn run_once(model: &Model, dir: &Path, feed: &Feed) -> Result<(Outputs, f64), RunError> {
    let outputs = run_with(model, dir, feed, Plan::from_model)?;
    let ms = outputs.elapsed.as_secs_f64() * 1e3;
    Ok((outputs, ms))
}

/// Runs `model` on `feed` through the plan `build` makes, batch by batch where the feed has more
/// samples than the model's fixed batch.
fn run_with(
    model: &Model,
    dir: &Path,
    feed: &Feed,
    build: fn(&Model, &Path, &Feed) -> Result<Plan, RunError>,
) -> Result<Outputs, RunError> {
    let Some(batches) = crate::inputs::split_into_batches(model, feed) else {
        return build(model, dir, feed)?.run(feed);
    };
    let plan = build(model, dir, &batches[0])?;
    let runs: Vec<Outputs> = batches.iter().map(|b| plan.run(b)).collect::<Result<_, _>>()?;
    let elapsed = runs.iter().map(|r| r.elapsed).sum();
    let mut values = Vec::new();
    for (i, (name, _)) in runs[0].values.iter().enumerate() {
        let parts: Vec<&crate::tract::TractTensor> = runs.iter().map(|r| &r.values[i].1).collect();
        let whole = crate::tract::TractTensor::stack_tensors(0, &parts).map_err(|e| RunError::Tract(format!("output `{name}`: {e}")))?;
        values.push((name.clone(), whole));
    }
    Ok(Outputs { values, elapsed })
}

/// The one value every element of `t` has, when there is one and more than one element.
fn constant_value(t: &crate::tract::TractTensor) -> Option<f64> {
    let values = t.cast_to::<f64>().ok()?;
    let values = values.try_as_plain_ram().ok()?.as_slice::<f64>().ok()?.to_vec();
    let first = *values.first()?;
    (values.len() > 1 && values.iter().all(|&v| v == first)).then_some(first)
}

/// Whether `rel` is within `tolerance`; `None` for NaN, which is never within anything.
fn within(rel: f64, tolerance: f64) -> Option<bool> {
    rel.partial_cmp(&tolerance).map(|o| o.is_le())
}
