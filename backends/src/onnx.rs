//! The ONNX writer.
//!
//! The output is the input model with the IR's changes and nothing else: node order, names,
//! attributes, doc strings, metadata, functions and opset imports are kept. The same model and
//! options always give the same bytes. Files are written to a temporary name in the output's
//! folder and renamed into place, so a failed run leaves no partial file and does not damage an
//! existing one.

use crate::WriteError;
use prost::Message;
use prunec_ir::proto::{self, tensor_proto::DataLocation};
use prunec_ir::{Graph, InfoList, Listed, Model, PageRelease, Tensor, Value, ValueId};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Protobuf readers (C++, Python) refuse messages of 2 GiB or more.
const PROTOBUF_LIMIT: u64 = (1 << 31) - 1;
/// External tensors start at multiples of this, so readers can map them page-aligned.
const EXTERNAL_ALIGNMENT: u64 = 4096;

/// Which tensors go to an external data file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExternalData {
    /// Tensors that were external in the input stay external; the others stay inline.
    #[default]
    KeepLayout,
    /// Tensors of at least this many bytes go external.
    Threshold(u64),
    /// Every tensor inline.
    Inline,
}

/// How external tensors are spread over files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DataLayout {
    /// All in `<OUT>.data`.
    #[default]
    OneFile,
    /// One file per tensor, `<OUT>.data.<N>` in the order the writer meets them: tools that
    /// copy or diff weights one by one, and file systems or transfers with a per-file size limit.
    PerTensor,
}

/// How to write a model.
#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    /// Which tensors go external.
    pub external_data: ExternalData,
    /// Which files they go to.
    pub layout: DataLayout,
}

/// What was written.
#[derive(Clone, Debug)]
pub struct Written {
    /// The model file.
    pub model: PathBuf,
    /// The first external data file, if any tensor went external.
    pub data: Option<PathBuf>,
    /// How many external data files were written.
    pub data_files: usize,
    /// Size of the model file.
    pub model_bytes: u64,
    /// Size of the external data, all files together.
    pub data_bytes: u64,
}

/// Tensors bound for the external data file, in file order. They are kept as tensors, not bytes,
/// so each is packed only while it streams into the file: a sliced weight is never held whole,
/// and the pages of a mapped one are given back as it goes.
#[derive(Default)]
struct DataFile {
    location: String,
    chunks: Vec<(u64, Tensor)>,
    len: u64,
    /// Further files of a per-tensor layout, one tensor each.
    others: Vec<DataFile>,
    per_tensor: bool,
    /// The memory maps the inline tensors' bytes are slices of, each once: the encoder gives
    /// their pages back as the bytes reach the output.
    pages: Vec<Arc<dyn PageRelease>>,
}

impl DataFile {
    /// Places a tensor; its file's location and its offset there.
    fn push(&mut self, tensor: Tensor) -> (String, u64) {
        if self.per_tensor && !self.chunks.is_empty() {
            let location = format!("{}.{}", self.location, self.others.len() + 1);
            let len = tensor.nbytes();
            self.others.push(DataFile { location: location.clone(), chunks: vec![(0, tensor)], len, ..Default::default() });
            return (location, 0);
        }
        let offset = self.len.next_multiple_of(EXTERNAL_ALIGNMENT);
        self.len = offset + tensor.nbytes();
        self.chunks.push((offset, tensor));
        (self.location.clone(), offset)
    }

    /// Writes this file (atomically) into `dir`.
    fn write(&self, dir: &Path) -> Result<PathBuf, WriteError> {
        let path = dir.join(&self.location);
        atomic_write(&path, |w| {
            let mut at = 0u64;
            for (offset, tensor) in &self.chunks {
                w.write_all(&vec![0u8; (offset - at) as usize])?;
                if !tensor.write_packed(w)? {
                    return Err(std::io::Error::other(format!("tensor `{}` has no packed form for external data", tensor.name())));
                }
                at = offset + tensor.nbytes();
            }
            Ok(())
        })?;
        Ok(path)
    }
}

/// Converts a model to its protobuf, with every tensor inline.
pub fn to_proto(model: &Model) -> Result<proto::ModelProto, WriteError> {
    let mut sink = DataFile::default();
    build_model(model, ExternalData::Inline, &mut sink)
}

/// Encodes a model with every tensor inline (for handing it to another library in memory). The
/// pages of the input's memory map are given back as its weights are copied in.
pub fn to_bytes(model: &Model) -> Result<Vec<u8>, WriteError> {
    let mut sink = DataFile::default();
    let proto = build_model(model, ExternalData::Inline, &mut sink)?;
    let mut out = Vec::with_capacity(proto.encoded_len());
    encode_streaming(&proto, &mut out, &sink.pages).expect("writing to memory cannot fail");
    Ok(out)
}

/// Writes a model to `path`, and its external data (if any) to `<path>.data` beside it.
pub fn write_model(model: &Model, path: &Path, options: &WriteOptions) -> Result<Written, WriteError> {
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model.onnx".into());
    let per_tensor = options.layout == DataLayout::PerTensor;
    let mut data = DataFile { location: format!("{file_name}.data"), per_tensor, ..Default::default() };
    let proto = build_model(model, options.external_data, &mut data)?;
    let encoded_len = proto.encoded_len() as u64;
    if encoded_len > PROTOBUF_LIMIT {
        return Err(WriteError::TooLarge(encoded_len));
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // The data files land first: a model file never points at data that is not there yet.
    let data_written = if data.chunks.is_empty() { None } else { Some(data.write(&dir)?) };
    for other in &data.others {
        other.write(&dir)?;
    }
    atomic_write(path, |w| encode_streaming(&proto, w, &data.pages))?;
    let data_files = data_written.is_some() as usize + data.others.len();
    let data_bytes = data.len + data.others.iter().map(|d| d.len).sum::<u64>();
    Ok(Written { model: path.to_path_buf(), data: data_written, data_files, model_bytes: encoded_len, data_bytes })
}

/// Encodes straight into the writer through a small buffer: the model is never held twice in
/// memory (its weights are views of the input's memory map until they reach the file, and the
/// map's pages, `pages`, are given back once written).
fn encode_streaming(proto: &proto::ModelProto, w: &mut impl Write, pages: &[Arc<dyn PageRelease>]) -> std::io::Result<()> {
    let mut sink = StreamSink { buf: vec![0; 1 << 16], filled: 0, out: w, error: None, pages };
    proto.encode(&mut sink).map_err(|e| std::io::Error::other(e.to_string()))?;
    if let Some(e) = sink.error.take() {
        return Err(e);
    }
    sink.flush()
}

/// A `BufMut` that spills into a writer whenever its buffer is full.
struct StreamSink<'a, W: Write> {
    buf: Vec<u8>,
    filled: usize,
    out: &'a mut W,
    /// The first write error; prost's `BufMut` cannot report one, so it is checked at the end.
    error: Option<std::io::Error>,
    /// Memory maps whose pages are given back once a field's bytes from them are written.
    pages: &'a [Arc<dyn PageRelease>],
}

/// Fields at least this long (weights) bypass the buffer.
const DIRECT_WRITE: usize = 1 << 16;
/// A long field is written, and its source pages given back, this much at a time.
const DIRECT_PIECE: usize = 4 << 20;

impl<W: Write> StreamSink<'_, W> {
    fn flush(&mut self) -> std::io::Result<()> {
        let result = self.out.write_all(&self.buf[..self.filled]);
        self.filled = 0;
        result
    }
}

// SAFETY: `chunk_mut` hands out only the unfilled, initialised tail of `buf`, and
// `advance_mut` moves `filled` forward by at most that tail's length.
unsafe impl<W: Write> bytes::BufMut for StreamSink<'_, W> {
    fn remaining_mut(&self) -> usize {
        usize::MAX - self.filled
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        self.filled = (self.filled + cnt).min(self.buf.len());
    }

    /// prost puts `bytes` fields (inline weights) through here: long ones go straight to the
    /// writer, a piece at a time, and the pages under each piece are given back (a slice outside
    /// a map is left alone by its `release`), so a mapped model's weights are not all resident
    /// by the time the file is written.
    fn put<T: bytes::Buf>(&mut self, mut src: T)
    where
        Self: Sized,
    {
        if src.remaining() >= DIRECT_WRITE && self.error.is_none() {
            if let Err(e) = self.flush() {
                self.error.get_or_insert(e);
            }
            while src.has_remaining() {
                let chunk = src.chunk();
                let piece = &chunk[..chunk.len().min(DIRECT_PIECE)];
                if self.error.is_none()
                    && let Err(e) = self.out.write_all(piece)
                {
                    self.error.get_or_insert(e);
                }
                for pages in self.pages {
                    pages.release(piece);
                }
                let n = piece.len();
                src.advance(n);
            }
            return;
        }
        while src.has_remaining() {
            let s = src.chunk();
            let d = self.chunk_mut();
            let n = s.len().min(d.len());
            d[..n].copy_from_slice(&s[..n]);
            // SAFETY: the first `n` bytes of the unfilled tail were just written.
            unsafe { self.advance_mut(n) };
            src.advance(n);
        }
    }

    fn chunk_mut(&mut self) -> &mut bytes::buf::UninitSlice {
        if self.filled == self.buf.len()
            && let Err(e) = self.flush()
        {
            self.error.get_or_insert(e);
        }
        let filled = self.filled;
        bytes::buf::UninitSlice::new(&mut self.buf[filled..])
    }
}

fn atomic_write(path: &Path, fill: impl FnOnce(&mut std::io::BufWriter<&std::fs::File>) -> std::io::Result<()>) -> Result<(), WriteError> {
    let io = |source| WriteError::Io { path: path.to_path_buf(), source };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new().prefix(".prunec-").suffix(".tmp").tempfile_in(dir).map_err(io)?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file());
        fill(&mut w).map_err(io)?;
        w.flush().map_err(io)?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644)).map_err(io)?;
    }
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

fn build_model(model: &Model, policy: ExternalData, data: &mut DataFile) -> Result<proto::ModelProto, WriteError> {
    let mut out = model.shell.clone();
    out.graph = Some(build_graph(&model.graph, policy, data)?);
    Ok(out)
}

fn build_graph(graph: &Graph, policy: ExternalData, data: &mut DataFile) -> Result<proto::GraphProto, WriteError> {
    let mut g = graph.shell.clone();
    let name_of = |id: Option<ValueId>| id.map(|v| graph.value(v).name.clone()).unwrap_or_default();
    for op_id in graph.topo_order()? {
        let op = graph.op(op_id);
        g.node.push(proto::NodeProto {
            input: graph.op_inputs(op_id).into_iter().map(name_of).collect(),
            output: graph.op_outputs(op_id).into_iter().map(name_of).collect(),
            name: (op.meta.has_name || !op.name.is_empty()).then(|| op.name.clone()),
            op_type: Some(op.op_type.clone()),
            domain: (op.meta.has_domain || !op.domain.is_empty()).then(|| op.domain.clone()),
            overload: op.meta.overload.clone(),
            attribute: op
                .attributes
                .iter()
                .map(|a| {
                    let mut p = a.proto.clone();
                    p.t = a.tensor.as_ref().map(|t| emit_tensor(t, policy, data));
                    p
                })
                .collect(),
            doc_string: op.meta.doc_string.clone(),
            metadata_props: op.meta.metadata_props.clone(),
            device_configurations: op.meta.device_configurations.clone(),
        });
    }
    for &id in &graph.initializers {
        if let Some(t) = graph.value(id).initializer() {
            g.initializer.push(emit_tensor(t, policy, data));
        }
    }
    for &id in &graph.sparse_initializers {
        if let prunec_ir::ValueKind::SparseInitializer(s) = &graph.value(id).kind {
            g.sparse_initializer.push((**s).clone());
        }
    }
    g.input = graph.inputs.iter().map(|&v| value_info(graph.value(v), InfoList::Input)).collect();
    g.output = graph.outputs.iter().map(|&v| value_info(graph.value(v), InfoList::Output)).collect();
    g.value_info = graph
        .value_infos
        .iter()
        .map(|l| match l {
            Listed::Value(v) => value_info(graph.value(*v), InfoList::ValueInfo),
            Listed::Orphan(info) => (**info).clone(),
        })
        .collect();
    Ok(g)
}

/// The stored form of a value's type in one list of the graph: what the model recorded there,
/// or what the IR knows.
fn value_info(v: &Value, list: InfoList) -> proto::ValueInfoProto {
    if let Some(info) = v.record(list) {
        let mut info = info.clone();
        info.name = Some(v.name.clone());
        return info;
    }
    let shape = v.shape.as_ref().map(|s| proto::TensorShapeProto {
        dim: s
            .0
            .iter()
            .map(|d| proto::tensor_shape_proto::Dimension {
                value: match d {
                    prunec_ir::Dim::Known(n) => Some(proto::tensor_shape_proto::dimension::Value::DimValue(*n as i64)),
                    prunec_ir::Dim::Sym(s) => Some(proto::tensor_shape_proto::dimension::Value::DimParam(s.clone())),
                    prunec_ir::Dim::Unknown => None,
                },
                denotation: None,
            })
            .collect(),
    });
    proto::ValueInfoProto {
        name: Some(v.name.clone()),
        r#type: Some(proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(proto::type_proto::Tensor { elem_type: v.dtype.map(|d| d.0), shape })),
            denotation: None,
        }),
        ..Default::default()
    }
}

fn emit_tensor(t: &Tensor, policy: ExternalData, data: &mut DataFile) -> proto::TensorProto {
    let external = match policy {
        ExternalData::KeepLayout => t.is_external(),
        ExternalData::Threshold(min) => t.has_raw_data() && t.nbytes() >= min,
        ExternalData::Inline => false,
    };
    if !external
        && let Some(pages) = t.pages()
        && !data.pages.iter().any(|p| Arc::ptr_eq(p, pages))
    {
        data.pages.push(pages.clone());
    }
    let mut p = t.proto().clone();
    if external && t.has_raw_data() {
        let (location, offset) = data.push(t.clone());
        let entry = |k: &str, v: String| proto::StringStringEntryProto { key: Some(k.into()), value: Some(v) };
        p.raw_data = None;
        p.data_location = Some(DataLocation::External as i32);
        p.external_data = vec![entry("location", location), entry("offset", offset.to_string()), entry("length", t.nbytes().to_string())];
    } else if t.is_external() {
        p.raw_data = t.raw_bytes().cloned();
        p.data_location = None;
        p.external_data.clear();
    }
    p
}
