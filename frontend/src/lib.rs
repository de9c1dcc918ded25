//! Lossless ONNX reader: bytes on disk to a [`prunec_ir::Model`].
//!
//! The file is memory-mapped and decoded with prost types generated from the full onnx.proto, so
//! no field of the schema is dropped. Inline `raw_data` stays a slice of the map and external data
//! is mapped file by file: reading a model copies no weight. The reader checks what the IR relies
//! on (unique value names, defined inputs, an acyclic graph, tensor sizes, external-data paths)
//! and fills in shapes the model does not record with tract's shape inference.

mod check;
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
    /// Runs shape inference again with concrete shapes for some graph inputs (by name), then
    /// checks the ops' rules against the shapes it found: a contradiction that only inference
    /// reveals (a Reshape of a computed value to another element count, say) is refused too.
    pub fn infer_shapes(&mut self, input_shapes: &BTreeMap<String, Vec<u64>>) -> Result<(), ReadError> {
        // tract decodes what it is given into its own protobuf, copying every byte: the weights
        // it would only turn into inputs are left out of its copy.
        let skeleton = without_weight_values(&self.source);
        self.inference = infer::infer_shapes(&mut self.model, skeleton.as_deref().unwrap_or(&self.source), &self.dir, input_shapes);
        Ok(prunec_ir::validate_ops(&self.model.graph)?)
    }
}

/// Reads an ONNX model file. Its inline weights stay slices of the file's memory map and give
/// their pages back as they stream, as external ones do.
pub fn read_model(path: &Path, options: &ReadOptions) -> Result<Loaded, ReadError> {
    let (bytes, pages) = map_file_with_pages(path)?;
    if bytes.is_empty() {
        return Err(ReadError::Empty(path.to_path_buf()));
    }
    decode(bytes, pages, &model_dir(path), path, options)
}

/// Decodes and lifts a model held in memory. External data is resolved against `dir`.
pub fn read_bytes(bytes: Bytes, dir: &Path, options: &ReadOptions) -> Result<Loaded, ReadError> {
    decode(bytes, None, dir, dir, options)
}

fn decode(
    bytes: Bytes,
    pages: Option<std::sync::Arc<external::MappedFile>>,
    dir: &Path,
    path: &Path,
    options: &ReadOptions,
) -> Result<Loaded, ReadError> {
    let proto = proto::ModelProto::decode(bytes.clone())
        .map_err(|e| ReadError::Decode { path: path.to_path_buf(), reason: describe_decode_error(&e) })?;
    let model = lift::lift(proto, dir, pages)?;
    let mut loaded = Loaded { model, dir: dir.to_path_buf(), inference: InferenceReport::skipped(), source: bytes };
    if options.infer_shapes {
        loaded.infer_shapes(&BTreeMap::new())?;
    }
    Ok(loaded)
}

/// The encoded model without the values of the initializers shape inference shows to tract as
/// graph inputs ([`infer::is_weight_input`]), which it never reads: decoding them is a copy of
/// every weight. `None` when there is nothing to leave out (or the bytes do not decode, which
/// the reader has already refused): the model is then given as it is.
fn without_weight_values(bytes: &Bytes) -> Option<Vec<u8>> {
    // prost's `Bytes` fields slice the map: decoding touches no weight page.
    let mut model = proto::ModelProto::decode(bytes.clone()).ok()?;
    let graph = model.graph.as_mut()?;
    let mut stripped = false;
    for t in graph.initializer.iter_mut().filter(|t| infer::is_weight_input(t.data_type(), &t.dims)) {
        stripped |= t.raw_data.take().is_some_and(|r| !r.is_empty());
        for typed in [t.float_data.len(), t.double_data.len(), t.int32_data.len()] {
            stripped |= typed > 0;
        }
        t.float_data = Vec::new();
        t.double_data = Vec::new();
        t.int32_data = Vec::new();
    }
    stripped.then(|| model.encode_to_vec())
}

/// prost's error as one short phrase: what is wrong (in words that name the usual cause) and the
/// field path from the model down to it, outermost first, shortened when deeply nested.
fn describe_decode_error(e: &prost::DecodeError) -> String {
    const SHOWN: usize = 4;
    let text = e.to_string();
    let mut rest = text.strip_prefix("failed to decode Protobuf message: ").unwrap_or(&text);
    // The stack comes first, as `Message.field: ` entries (innermost first); the description,
    // which may itself hold `: `, is what follows the last of them.
    let is_entry = |s: &str| {
        s.split_once('.').is_some_and(|(m, f)| {
            !m.is_empty() && !f.is_empty() && m.chars().chain(f.chars()).all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
    };
    let mut stack = Vec::new();
    while let Some((head, tail)) = rest.split_once(": ")
        && is_entry(head)
    {
        stack.push(head);
        rest = tail;
    }
    let what = match rest {
        "buffer underflow" => "truncated: a field runs past the end of the data".to_string(),
        "invalid varint" => "truncated or corrupt: an integer (varint) is cut off or too long".to_string(),
        "delimited length exceeded" => "truncated: a field runs past the end of the message holding it".to_string(),
        "recursion limit reached" => "messages are nested too deeply (more than 100 levels)".to_string(),
        other => other.to_string(),
    };
    stack.reverse();
    let at = match stack.len() {
        0 => String::new(),
        n if n <= SHOWN => format!(" (in {})", stack.join(" > ")),
        n => format!(" (in {} > ... {} more ... > {})", stack[..2].join(" > "), n - 3, stack[n - 1]),
    };
    format!("{what}{at}")
}

fn model_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Maps a file read-only, with the handle that gives the map's pages back once read (none for an
/// empty file); the map lives as long as any `Bytes` sliced from it.
pub(crate) fn map_file_with_pages(path: &Path) -> Result<(Bytes, Option<std::sync::Arc<external::MappedFile>>), ReadError> {
    let io = |source| ReadError::Io { path: path.to_path_buf(), source };
    // The type is checked before opening (a FIFO's open blocks until a writer comes), and the
    // open itself does not block, in case the path was swapped for one in between.
    let not_a_file = |meta: &std::fs::Metadata| ReadError::NotAFile { path: path.to_path_buf(), kind: file_kind(meta) };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(not_a_file(&meta));
    }
    let file = open_nonblocking(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(not_a_file(&meta));
    }
    if meta.len() == 0 {
        return Ok((Bytes::new(), None));
    }
    // SAFETY: the map is read-only. prunec never writes to its inputs (outputs go to a temporary
    // file that is renamed into place), so the only hazard is another process truncating the file
    // while prunec runs, which no reader of memory-mapped files can prevent.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    let mapped = std::sync::Arc::new(external::MappedFile(map));
    Ok((Bytes::from_owner(external::SharedMap(mapped.clone())), Some(mapped)))
}

/// Opens a file for reading without waiting on it: a FIFO opened this way returns at once
/// instead of blocking for a writer.
fn open_nonblocking(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    options.open(path)
}

/// What a file that is not a regular file is, for the message that refuses it.
pub(crate) fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let ty = meta.file_type();
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ty.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if ty.is_socket() {
            return "a socket";
        }
        if ty.is_char_device() {
            return "a character device";
        }
        if ty.is_block_device() {
            return "a block device";
        }
    }
    if ty.is_dir() { "a folder" } else { "neither a file nor a folder" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_error(bytes: &[u8]) -> String {
        let e = read_bytes(Bytes::copy_from_slice(bytes), Path::new("."), &ReadOptions { infer_shapes: false })
            .expect_err("the bytes are not a model");
        e.to_string()
    }

    #[test]
    fn a_length_past_the_end_reads_as_truncated_with_the_field_path_outermost_first() {
        // Field 7 (graph), length-delimited, claiming 16 bytes of which 2 follow.
        let message = decode_error(&[0x3a, 0x10, 0x0a, 0x00]);
        assert!(
            message.ends_with("is not a valid ONNX protobuf: truncated: a field runs past the end of the data (in ModelProto.graph)"),
            "{message}"
        );
    }

    #[test]
    fn a_description_holding_a_colon_is_kept_whole() {
        let message = decode_error(&[0x00, 0x00]);
        assert!(message.ends_with("is not a valid ONNX protobuf: invalid tag value: 0"), "{message}");
    }

    #[test]
    fn nesting_past_the_decoder_limit_is_one_short_sentence() {
        // Graphs nested through If attributes far past prost's limit of 100 messages.
        let mut graph: Vec<u8> = Vec::new();
        let ld = |field: u8, payload: &[u8]| {
            let mut out = vec![(field << 3) | 2];
            prost::encoding::encode_varint(payload.len() as u64, &mut out);
            out.extend_from_slice(payload);
            out
        };
        for _ in 0..200 {
            let attribute = [ld(1, b"then_branch"), ld(6, &graph)].concat();
            let node = [ld(4, b"If"), ld(5, &attribute)].concat();
            graph = ld(1, &node);
        }
        let message = decode_error(&ld(7, &graph));
        assert!(message.contains("messages are nested too deeply (more than 100 levels)"), "{message}");
        assert!(message.len() < 300, "{} characters: {message}", message.len());
    }
}
