//! Errors of passes.

use prunec_ir::{IrError, ValidateError};

/// Why a pass or a pipeline failed.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// `--passes` names a pass that does not exist.
    #[error("unknown pass `{name}`; known passes: {known}")]
    UnknownPass {
        /// The name given.
        name: String,
        /// The registered names.
        known: String,
    },
    /// A pass left the graph invalid: a bug in prunec, reported instead of writing a broken model.
    #[error("pass `{pass}` left an invalid graph")]
    BrokeGraph {
        /// The pass.
        pass: &'static str,
        /// What is wrong.
        source: IrError,
    },
    /// A pass left a graph that breaks a rule of ONNX the reader checks ([`prunec_ir::validate`],
    /// run after every pass in debug builds and tests): a bug in that pass.
    #[error("pass `{pass}` left a graph the reader would refuse")]
    Invalid {
        /// The pass.
        pass: &'static str,
        /// The rule broken, with the node.
        source: ValidateError,
    },
    /// A pass option is out of range or malformed.
    #[error("{0}")]
    BadOption(String),
    /// A pass could not measure what it needs (no runtime or inputs, or the model did not run).
    #[error("{0}")]
    Measure(String),
    /// The chosen channels cannot be removed consistently.
    #[error("cannot remove the chosen channels: {0}")]
    Rewrite(#[source] crate::prune::RewriteError),
    /// A layer selection names no layer or sub-block of the report.
    #[error("no such block: {0}")]
    NoSuchBlock(String),
    /// The block report does not describe this model (it was made for another graph, or the
    /// graph changed since).
    #[error("the block report does not match the model: {0}")]
    StaleBlockReport(String),
    /// `merge=average` cannot average the chosen layers.
    #[error("cannot average the layers: {0}")]
    Merge(String),
}
