//! Verification of a pruned model: run it in tract beside the original and beside the masked
//! original (the original with the removed channels' consumer weights zeroed), and compare.
//!
//! The pruned model must run, keep every output's shape, and equal the masked original up to
//! float rounding wherever no pruned group crosses a normalisation: that is what proves the
//! rewrite sliced every weight and shape consistently. Its distance to the original is the
//! price of pruning, reported but not judged.

use crate::RunError;
use crate::latency::{Latency, interleaved};
use crate::tract::{Feed, Plan, compare};
use prunec_ir::Model;
use prunec_passes::prune::{PruneReport, apply_compensations, mask_consumers};
use serde::Serialize;
use std::path::Path;

/// Largest difference to the masked original, relative to the output's scale, that the CLI
/// counts as equal. Float sums taken in another order (tract packs a narrower convolution
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
    /// Median of three runs of the original in tract, in milliseconds, timed in alternation with
    /// the pruned model (`prunec bench` measures more runs, and in ONNX Runtime too).
    pub original_ms: f64,
    /// Same for the pruned model.
    pub pruned_ms: f64,
    /// Whether the pruned model must equal the masked original (no pruned group crosses a
    /// normalisation), with the reasons when not.
    pub masking_expected: bool,
    /// Why masking equivalence is not expected.
    pub masking_not_expected: Vec<String>,
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
    /// Largest difference to the masked original, relative to its scale (when pruned).
    pub masked_rel: Option<f64>,
}

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
    /// The pruned model differs from the masked original: a prunec bug.
    #[error("the pruned model differs from the masked original on output `{output}` by {rel:.3e} of its scale (tolerance {tolerance:e})")]
    MaskingMismatch {
        /// The output.
        output: String,
        /// The relative difference.
        rel: f64,
        /// The tolerance it exceeds.
        tolerance: f64,
    },
    /// The masked reference could not be built.
    #[error("cannot build the masked reference: {0}")]
    Mask(String),
}

/// Compares `pruned` with `original` (and with the masked original when `report` says what was
/// removed) on `feed`. `dir` is where external data of both models is found; `tolerance` bounds
/// the difference to the masked original relative to each output's scale.
pub fn verify(
    original: &Model,
    pruned: &Model,
    report: Option<&PruneReport>,
    dir: &Path,
    feed: &Feed,
    tolerance: f64,
) -> Result<Verification, VerifyError> {
    const RUNS: usize = 3;
    let original_plan = Plan::from_model(original, dir, feed).map_err(VerifyError::OriginalNotRunnable)?;
    let reference = original_plan.run(feed).map_err(VerifyError::OriginalNotRunnable)?;
    let pruned_plan = Plan::from_model(pruned, dir, feed).map_err(VerifyError::PrunedNotRunnable)?;
    let got = pruned_plan.run(feed).map_err(VerifyError::PrunedNotRunnable)?;
    // The runs above were the warm-up; timed in alternation as `prunec bench` times them.
    let (original_times, pruned_times) =
        interleaved(&original_plan, &pruned_plan, feed, 0, RUNS).map_err(VerifyError::PrunedNotRunnable)?;
    drop((original_plan, pruned_plan));
    let median = |t: &[f64]| Latency::of(t).map_or(f64::NAN, |l| l.median_ms);
    let masked = match report.filter(|r| !r.masked.is_empty()) {
        Some(r) => {
            let mut m = original.clone();
            // The pruned consumers were compensated before slicing; the reference is too.
            apply_compensations(&mut m.graph, &r.compensated).map_err(VerifyError::Mask)?;
            mask_consumers(&mut m.graph, &r.masked).map_err(|e| VerifyError::Mask(e.to_string()))?;
            let plan = Plan::from_model(&m, dir, feed).map_err(|e| VerifyError::Mask(e.to_string()))?;
            Some(plan.run(feed).map_err(|e| VerifyError::Mask(e.to_string()))?)
        }
        None => None,
    };
    let masking_not_expected = report.map(|r| r.normalized.clone()).unwrap_or_default();
    let mut outputs = Vec::new();
    for (i, (name, want)) in reference.values.iter().enumerate() {
        let changed = |what: String| VerifyError::OutputChanged { output: name.clone(), what };
        let have = &got.values.get(i).ok_or_else(|| changed("is missing".into()))?.1;
        if have.shape() != want.shape() || have.datum_type() != want.datum_type() {
            let of = |t: &crate::tract::TractTensor| format!("{:?}{:?}", t.datum_type(), t.shape());
            return Err(changed(format!("is {}, the original's {}", of(have), of(want))));
        }
        let d = compare(want, have).map_err(|e| changed(e.to_string()))?;
        let masked_rel = match &masked {
            Some(m) => {
                let dm = compare(&m.values[i].1, have).map_err(|e| VerifyError::Mask(e.to_string()))?;
                Some(dm.max_abs / dm.ref_max_abs.max(f64::MIN_POSITIVE))
            }
            None => None,
        };
        outputs.push(OutputCheck {
            name: name.clone(),
            max_abs: d.max_abs,
            rel: d.max_abs / d.ref_max_abs.max(f64::MIN_POSITIVE),
            scale: d.ref_max_abs,
            cosine: d.cosine,
            masked_rel,
        });
    }
    let masking_expected = masked.is_some() && masking_not_expected.is_empty();
    if masking_expected && let Some(bad) = outputs.iter().find(|o| o.masked_rel.is_some_and(|r| !(r <= tolerance))) {
        return Err(VerifyError::MaskingMismatch { output: bad.name.clone(), rel: bad.masked_rel.unwrap_or(f64::NAN), tolerance });
    }
    Ok(Verification {
        outputs,
        original_ms: median(&original_times),
        pruned_ms: median(&pruned_times),
        masking_expected,
        masking_not_expected,
    })
}
