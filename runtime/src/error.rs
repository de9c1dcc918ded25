//! Errors of the runtime.

use prunec_backends::WriteError;

/// Why a model could not be run in tract.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// tract refused or failed.
    #[error("tract: {0}")]
    Tract(String),
    /// The inputs do not fit the model.
    #[error("inputs: {0}")]
    Inputs(String),
    /// The model could not be serialised for tract.
    #[error(transparent)]
    Write(#[from] WriteError),
}

impl From<tract_onnx::prelude::TractError> for RunError {
    fn from(e: tract_onnx::prelude::TractError) -> Self {
        RunError::Tract(format!("{e:#}"))
    }
}
