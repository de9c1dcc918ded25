//! Errors of reading a model.

use prunec_ir::{IrError, ValidateError};
use std::path::PathBuf;

/// Why a model could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be opened or mapped.
    // The source is not repeated in the message: `{:#}` and other chain printers append it.
    #[error("cannot read `{}`", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The path is a folder, a device, a FIFO or a socket: opening a FIFO for reading blocks
    /// until a writer comes, and a device can stream without end.
    #[error("`{}` is not a regular file but {kind}", path.display())]
    NotAFile {
        /// The file.
        path: PathBuf,
        /// What it is instead, as a phrase ("a FIFO (named pipe)").
        kind: &'static str,
    },
    /// The file has no bytes at all (an empty protobuf would decode as a model with no graph).
    #[error("`{}` is empty, not an ONNX model", .0.display())]
    Empty(PathBuf),
    /// The bytes are not an ONNX protobuf (truncated, wrong wire types, too deeply nested).
    #[error("`{}` is not a valid ONNX protobuf: {reason}", path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// What the decoder found and where, as a phrase (prost's own message can list a
        /// hundred nested fields).
        reason: String,
    },
    /// The model decodes but breaks a rule of the ONNX graph.
    #[error(transparent)]
    Graph(#[from] IrError),
    /// The graph breaks a rule of ONNX that the IR's validation checks (an op's structure, a
    /// recorded element type).
    #[error(transparent)]
    Validate(#[from] ValidateError),
    /// An external-data reference that cannot be honoured.
    #[error("tensor `{tensor}`: external data {what}")]
    ExternalData {
        /// The tensor.
        tensor: String,
        /// What is wrong, as a phrase.
        what: String,
    },
    /// A node or import that no ONNX runtime could accept.
    #[error("{0}")]
    Invalid(String),
    /// Something the reader does not handle yet.
    #[error("unsupported model: {0}")]
    Unsupported(String),
}

impl ReadError {
    /// Whether the message names the model file itself, so a caller adding "reading `path`"
    /// would say it twice. Errors about the graph inside name nodes and values instead.
    pub fn names_the_file(&self) -> bool {
        matches!(self, ReadError::Io { .. } | ReadError::NotAFile { .. } | ReadError::Empty(_) | ReadError::Decode { .. })
    }
}
