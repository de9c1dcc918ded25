//! What a pass's output must equal: its verification reference.
//!
//! The verifier builds one reference model for a whole pipeline: the original with each pass's
//! reference edit applied in pipeline order (an `exact` pass adds none), runs it beside the
//! result and judges the difference. A pass whose output no model built from the original can
//! predict says so (`Unjudged`), and the pipeline's result is then only reported, not judged.

use prunec_ir::Model;
use std::fmt;
use std::sync::Arc;

/// The reference a pass declares for its output.
#[derive(Clone)]
pub enum Reference {
    /// The output computes exactly what the input did (cleanup passes).
    Exact,
    /// The output equals its input with this edit applied: channel removal's masked original
    /// (after compensation), layer removal's zeroed residual branches.
    Edit(Arc<dyn ReferenceEdit>),
    /// The output changes what the model computes in a way no reference predicts (a pruned
    /// group crosses a normalisation): reported against the original, judged only by
    /// `--tolerance`.
    Unjudged {
        /// Why there is no reference.
        why: Vec<String>,
    },
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Exact => f.write_str("exact"),
            Reference::Edit(e) => write!(f, "{}", e.kind()),
            Reference::Unjudged { why } => write!(f, "tolerance only ({})", why.join("; ")),
        }
    }
}

impl Reference {
    /// The kind, as the report names it: `exact`, `masked`, `reference` or `tolerance`.
    pub fn kind(&self) -> &'static str {
        match self {
            Reference::Exact => "exact",
            Reference::Edit(e) => e.kind(),
            Reference::Unjudged { .. } => "tolerance",
        }
    }
}

/// An edit of the pipeline's reference model that stands for one pass.
pub trait ReferenceEdit: Send + Sync {
    /// `masked` for channel removal, `reference` for any other model built to compare against.
    fn kind(&self) -> &'static str;

    /// The reference in words, for the report: `the masked original`.
    fn describe(&self) -> String;

    /// Applies the edit to the reference built so far (the original, edited by the passes
    /// before this one). It names what it edits by node and weight names, which every pass
    /// before keeps.
    fn apply(&self, reference: &mut Model) -> Result<(), String>;
}
