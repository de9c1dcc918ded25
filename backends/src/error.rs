//! Errors of the backends.

use prunec_ir::IrError;
use std::path::PathBuf;

/// Why a model could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The graph cannot be serialised (a pass left a cycle).
    #[error(transparent)]
    Graph(#[from] IrError),
    /// The protobuf would exceed the 2 GiB limit of protobuf readers.
    #[error(
        "the model is {0} bytes with its tensors inline, over protobuf's 2 GiB limit; store the large ones as external data with `--external-data SIZE` (for example `--external-data 1MB`)"
    )]
    TooLarge(u64),
    /// A file could not be written.
    #[error("cannot write `{}`", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}
