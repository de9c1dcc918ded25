//! Lossless ONNX reader: bytes on disk to a [`prunec_ir::Model`].
//!
//! The file is memory-mapped and decoded with prost types generated from the full onnx.proto, so
//! no field of the schema is dropped. Inline `raw_data` stays a slice of the map and external data
//! is mapped file by file: reading a model copies no weight. The reader checks what the IR relies
//! on (unique value names, defined inputs, an acyclic graph, tensor sizes, external-data paths)
//! and fills in shapes the model does not record with tract's shape inference.

mod error;
mod external;
mod infer;
mod lift;

pub use error::ReadError;
pub use infer::InferenceReport;

use bytes::Bytes;
use prost::Message;
use prunec_ir::{Model, proto};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How to read a model.
#[derive(Clone, Debug)]
pub struct ReadOptions {
    /// Run tract's shape inference for values whose shape the model does not record.
    pub infer_shapes: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions { infer_shapes: true }
    }
}

/// A model read from disk, with what shape inference could not find.
#[derive(Debug)]
pub struct Loaded {
    /// The model.
    pub model: Model,
    /// The folder the model was read from; external-data locations are relative to it.
    pub dir: PathBuf,
    /// What shape inference found and left unknown.
    pub inference: InferenceReport,
    /// The encoded model as read (a view of the memory map, not a copy).
    pub source: Bytes,
}

impl Loaded {
    /// Runs shape inference again with concrete shapes for some graph inputs (by name).
    pub fn infer_shapes(&mut self, input_shapes: &BTreeMap<String, Vec<u64>>) {
        self.inference = infer::infer_shapes(&mut self.model, &self.source, &self.dir, input_shapes);
    }
}

/// Reads an ONNX model file.
pub fn read_model(path: &Path, options: &ReadOptions) -> Result<Loaded, ReadError> {
    let bytes = map_file(path)?;
    if bytes.is_empty() {
        return Err(ReadError::Empty(path.to_path_buf()));
    }
    decode(bytes, &model_dir(path), path, options)
}

/// Decodes and lifts a model held in memory. External data is resolved against `dir`.
pub fn read_bytes(bytes: Bytes, dir: &Path, options: &ReadOptions) -> Result<Loaded, ReadError> {
    decode(bytes, dir, dir, options)
}

fn decode(bytes: Bytes, dir: &Path, path: &Path, options: &ReadOptions) -> Result<Loaded, ReadError> {
    let proto = proto::ModelProto::decode(bytes.clone()).map_err(|source| ReadError::Decode { path: path.to_path_buf(), source })?;
    let model = lift::lift(proto, dir)?;
    let mut loaded = Loaded { model, dir: dir.to_path_buf(), inference: InferenceReport::skipped(), source: bytes };
    if options.infer_shapes {
        loaded.infer_shapes(&BTreeMap::new());
    }
    Ok(loaded)
}

fn model_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Maps a file read-only; the map lives as long as any `Bytes` sliced from it.
pub(crate) fn map_file(path: &Path) -> Result<Bytes, ReadError> {
    let io = |source| ReadError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(ReadError::NotAFile(path.to_path_buf()));
    }
    if meta.len() == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: the map is read-only. prunec never writes to its inputs (outputs go to a temporary
    // file that is renamed into place), so the only hazard is another process truncating the file
    // while prunec runs, which no reader of memory-mapped files can prevent.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    Ok(Bytes::from_owner(map))
}
