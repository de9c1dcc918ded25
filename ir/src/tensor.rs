//! Weights: shared, immutable tensors whose bytes may live in a memory map.

use crate::error::IrError;
use crate::proto::{self, tensor_proto::DataLocation, tensor_proto::DataType};
use crate::shape::DType;
use bytes::Bytes;
use std::sync::{Arc, OnceLock};

/// A constant tensor: an initializer, a `Constant` node's value or any tensor attribute.
///
/// Cloning is cheap (a reference count). The bytes are never copied when the model is read: inline
/// `raw_data` points into the decoded file and external data into a memory map. To change a
/// tensor, build a new one with [`Tensor::from_f32`] or [`Tensor::from_proto`].
///
/// Removing channels from an external tensor ([`Tensor::remove_indices`]) copies nothing either:
/// the result is the source minus some indices, materialised piece by piece when it is streamed
/// ([`Tensor::write_packed`]) and in full only when something asks for its values.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor(Arc<Inner>);

#[derive(Debug, PartialEq)]
struct Inner {
    /// The tensor as the model stores it; for external and sliced data, `raw_data` is empty.
    proto: proto::TensorProto,
    data: Data,
    numel: u64,
}

/// Where the values are.
#[derive(Clone, Debug)]
enum Data {
    /// In the proto: `raw_data` or a typed field. `pages` can give back the pages of the memory
    /// map `raw_data` is a slice of (an inline tensor of a mapped model file).
    Proto { pages: Option<Arc<dyn PageRelease>> },
    /// The bytes of an external tensor, sliced out of the data file's memory map (`pages` can give
    /// the map's pages back once read) or built in memory.
    External { bytes: Bytes, pages: Option<Arc<dyn PageRelease>> },
    /// Another tensor minus some indices along some axes (always external data).
    Sliced(Arc<Sliced>),
}

impl PartialEq for Data {
    fn eq(&self, other: &Data) -> bool {
        match (self, other) {
            (Data::Proto { .. }, Data::Proto { .. }) => true,
            (Data::External { bytes: a, .. }, Data::External { bytes: b, .. }) => a == b,
            (Data::Sliced(a), Data::Sliced(b)) => a.source == b.source && a.keep == b.keep,
            _ => false,
        }
    }
}

/// A lazy removal: the source's elements at the kept indices.
#[derive(Debug)]
struct Sliced {
    /// Never itself sliced: removals compose into one `keep`.
    source: Tensor,
    /// Per axis of the source, the indices kept (sorted, distinct); `None` keeps the whole axis.
    keep: Vec<Option<Vec<usize>>>,
    /// The materialised bytes, once something needed them all at once.
    bytes: OnceLock<Bytes>,
}

/// Memory that can give the pages under a slice of it back to the operating system once they
/// have been read: a read-only file mapping, whose pages count in the process's resident set
/// while mapped in and come back from the file on the next read.
pub trait PageRelease: Send + Sync + std::fmt::Debug {
    /// Drops the pages under `bytes` (a slice of this memory; anything else is ignored) from the
    /// process. Must leave the contents readable and unchanged.
    fn release(&self, bytes: &[u8]);
}

/// Streamed tensors go through pieces of about this size, which bounds the pages of the source
/// mapped in at once and the buffers of the slicing.
const STREAM_CHUNK: usize = 4 << 20;

impl Tensor {
    /// Wraps an inline tensor after checking that its dims, type and data agree.
    pub fn from_proto(proto: proto::TensorProto) -> Result<Tensor, IrError> {
        if proto.data_location() == DataLocation::External {
            return Err(tensor_error(&proto, "stores its data externally, but no external bytes were given".into()));
        }
        let numel = checked_numel(&proto)?;
        check_inline_data(&proto, numel)?;
        Ok(Tensor(Arc::new(Inner { proto, data: Data::Proto { pages: None }, numel })))
    }

    /// [`Tensor::from_proto`] for a tensor decoded from a memory map without copying: its
    /// `raw_data` is a slice of the map, whose pages `pages` gives back as the tensor streams
    /// ([`Tensor::write_packed`], [`Tensor::axes_sums`]), as a mapped external tensor's are.
    pub fn from_mapped_proto(proto: proto::TensorProto, pages: Arc<dyn PageRelease>) -> Result<Tensor, IrError> {
        let mut t = Tensor::from_proto(proto)?;
        if let Some(inner) = Arc::get_mut(&mut t.0)
            && let Data::Proto { pages: slot } = &mut inner.data
        {
            *slot = Some(pages);
        }
        Ok(t)
    }

    /// Wraps an external-data tensor whose bytes were read (or mapped) by the caller.
    pub fn from_external(proto: proto::TensorProto, bytes: Bytes) -> Result<Tensor, IrError> {
        let numel = checked_numel(&proto)?;
        let dtype = DType(proto.data_type());
        let expected = dtype
            .packed_bytes(numel)
            .ok_or_else(|| tensor_error(&proto, format!("has element type {dtype}, which cannot be stored as external data")))?;
        if bytes.len() as u64 != expected {
            return Err(tensor_error(
                &proto,
                format!("has {} bytes of external data, but dims {:?} of {dtype} need {expected}", bytes.len(), proto.dims),
            ));
        }
        Ok(Tensor(Arc::new(Inner { proto, data: Data::External { bytes, pages: None }, numel })))
    }

    /// Like [`Tensor::from_external`] for bytes sliced out of a read-only file mapping: once
    /// streamed, the tensor gives the pages it read back to `pages`, so reading a model larger
    /// than memory keeps only a working set resident.
    pub fn from_mapped(proto: proto::TensorProto, bytes: Bytes, pages: Arc<dyn PageRelease>) -> Result<Tensor, IrError> {
        let mut t = Tensor::from_external(proto, bytes)?;
        if let Some(inner) = Arc::get_mut(&mut t.0)
            && let Data::External { pages: slot, .. } = &mut inner.data
        {
            *slot = Some(pages);
        }
        Ok(t)
    }

    /// A new inline tensor of `dtype` whose packed little-endian bytes are `raw`; the caller
    /// gives as many bytes as the dims and type need.
    pub fn from_raw(name: &str, dtype: DType, dims: &[u64], raw: Vec<u8>) -> Tensor {
        let proto = proto::TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: Some(dtype.0),
            name: Some(name.to_string()),
            raw_data: Some(Bytes::from(raw)),
            ..Default::default()
        };
        let numel = dims.iter().product();
        Tensor(Arc::new(Inner { proto, data: Data::Proto { pages: None }, numel }))
    }

    /// A new inline f32 tensor stored as `raw_data`.
    pub fn from_f32(name: &str, dims: &[u64], data: &[f32]) -> Tensor {
        Tensor::from_raw(name, DType::F32, dims, data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// The tensor as the model stores it. For an external tensor `raw_data` is empty and
    /// `external_data` still names the location it was read from.
    pub fn proto(&self) -> &proto::TensorProto {
        &self.0.proto
    }

    /// The tensor's name (empty for most attribute tensors).
    pub fn name(&self) -> &str {
        self.0.proto.name()
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        DType(self.0.proto.data_type())
    }

    /// Sizes of the dimensions.
    pub fn dims(&self) -> Vec<u64> {
        self.0.proto.dims.iter().map(|&d| d as u64).collect()
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.0.numel
    }

    /// Size of the data in bytes once packed (what `raw_data` or external data holds).
    pub fn nbytes(&self) -> u64 {
        self.dtype().packed_bytes(self.numel()).unwrap_or(0)
    }

    /// What can give back the pages of the memory map this tensor's packed bytes are a slice of
    /// (inline `raw_data` of a mapped model file, or mapped external data); `None` for bytes
    /// in memory and for sliced tensors, which [`Tensor::write_packed`] streams itself.
    pub fn pages(&self) -> Option<&Arc<dyn PageRelease>> {
        match &self.0.data {
            Data::Proto { pages } | Data::External { pages, .. } => pages.as_ref(),
            Data::Sliced(_) => None,
        }
    }

    /// Whether the data lives in an external file.
    pub fn is_external(&self) -> bool {
        !matches!(self.0.data, Data::Proto { .. })
    }

    /// Whether the data is packed bytes (`raw_data` or external data) rather than a typed field;
    /// unlike [`Tensor::raw_bytes`], it never materialises a sliced tensor.
    pub fn has_raw_data(&self) -> bool {
        match &self.0.data {
            Data::Proto { .. } => self.0.proto.raw_data.is_some() && self.0.proto.data_location() != DataLocation::External,
            Data::External { .. } | Data::Sliced(_) => true,
        }
    }

    /// The packed little-endian bytes, when the tensor is stored as raw or external data. A
    /// sliced tensor is materialised (once) to answer; [`Tensor::write_packed`] streams instead.
    pub fn raw_bytes(&self) -> Option<&Bytes> {
        match &self.0.data {
            Data::Proto { .. } => self.0.proto.raw_data.as_ref().filter(|_| self.0.proto.data_location() != DataLocation::External),
            Data::External { bytes, .. } => Some(bytes),
            Data::Sliced(s) => Some(s.bytes.get_or_init(|| {
                let mut out = Vec::with_capacity(self.nbytes() as usize);
                s.stream(&mut |piece| {
                    out.extend_from_slice(piece);
                    Ok(())
                })
                .expect("writing to memory cannot fail");
                Bytes::from(out)
            })),
        }
    }

    /// The values converted to f64, for the numeric types prunec understands (floats, ints, bool).
    pub fn to_f64_vec(&self) -> Option<Vec<f64>> {
        let p = &self.0.proto;
        let n = self.numel() as usize;
        if let Some(raw) = self.raw_bytes().filter(|_| self.numel() > 0) {
            return decode_raw(self.dtype(), raw, n);
        }
        use DataType as T;
        let values: Vec<f64> = match self.dtype().known()? {
            T::Float => p.float_data.iter().map(|&v| v as f64).collect(),
            T::Double => p.double_data.clone(),
            T::Int64 => p.int64_data.iter().map(|&v| v as f64).collect(),
            T::Uint32 | T::Uint64 => p.uint64_data.iter().map(|&v| v as f64).collect(),
            T::Int32 | T::Int16 | T::Int8 | T::Uint8 | T::Uint16 | T::Bool => p.int32_data.iter().map(|&v| v as f64).collect(),
            T::Float16 => p.int32_data.iter().map(|&v| half::f16::from_bits(v as u16).to_f64()).collect(),
            T::Bfloat16 => p.int32_data.iter().map(|&v| half::bf16::from_bits(v as u16).to_f64()).collect(),
            _ => return None,
        };
        (values.len() == n).then_some(values)
    }

    /// The values as f32, for the numeric types prunec understands.
    pub fn to_f32_vec(&self) -> Option<Vec<f32>> {
        self.to_f64_vec().map(|v| v.into_iter().map(|x| x as f32).collect())
    }

    /// The values as i64, for integer tensors (shapes, axes, indices).
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        if !matches!(
            self.dtype().known()?,
            DataType::Int64
                | DataType::Int32
                | DataType::Int16
                | DataType::Int8
                | DataType::Uint8
                | DataType::Uint16
                | DataType::Uint32
                | DataType::Bool
        ) {
            return None;
        }
        if self.dtype() == DType::I64 && self.raw_bytes().is_none() {
            return Some(self.0.proto.int64_data.clone());
        }
        self.to_f64_vec().map(|v| v.into_iter().map(|x| x as i64).collect())
    }
}

impl Tensor {
    /// The data packed little-endian, as `raw_data` stores it: borrowed when the tensor already
    /// is raw or external, packed from the typed fields otherwise. `None` for strings and
    /// sub-byte types stored in typed fields.
    pub fn packed(&self) -> Option<std::borrow::Cow<'_, [u8]>> {
        if let Some(raw) = self.raw_bytes().filter(|r| !r.is_empty() || self.numel() == 0) {
            return Some(std::borrow::Cow::Borrowed(raw.as_ref()));
        }
        use DataType as T;
        let p = &self.0.proto;
        let bytes: Vec<u8> = match self.dtype().known()? {
            T::Float => p.float_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            T::Double => p.double_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            T::Int64 => p.int64_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            T::Uint64 => p.uint64_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            T::Uint32 => p.uint64_data.iter().flat_map(|&v| (v as u32).to_le_bytes()).collect(),
            T::Int32 => p.int32_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            T::Int16 | T::Uint16 | T::Float16 | T::Bfloat16 => p.int32_data.iter().flat_map(|&v| (v as u16).to_le_bytes()).collect(),
            T::Int8 | T::Uint8 | T::Bool | T::Float8e4m3fn | T::Float8e4m3fnuz | T::Float8e5m2 | T::Float8e5m2fnuz | T::Float8e8m0 => {
                p.int32_data.iter().map(|&v| v as u8).collect()
            }
            _ => return None,
        };
        (bytes.len() as u64 == self.nbytes()).then_some(std::borrow::Cow::Owned(bytes))
    }

    /// A tensor like this one (name, type, doc string, external placement) with new dims and
    /// packed data.
    pub fn with_data(&self, dims: &[u64], data: Vec<u8>) -> Tensor {
        let mut proto = self.0.proto.clone();
        proto.dims = dims.iter().map(|&d| d as i64).collect();
        proto.float_data.clear();
        proto.double_data.clear();
        proto.int32_data.clear();
        proto.int64_data.clear();
        proto.uint64_data.clear();
        let numel = dims.iter().product();
        let data = Bytes::from(data);
        if self.is_external() {
            proto.raw_data = None;
            Tensor(Arc::new(Inner { proto, data: Data::External { bytes: data, pages: None }, numel }))
        } else {
            proto.raw_data = Some(data);
            Tensor(Arc::new(Inner { proto, data: Data::Proto { pages: None }, numel }))
        }
    }

    /// A new inline int64 tensor stored as `raw_data`.
    pub fn from_i64(name: &str, dims: &[u64], data: &[i64]) -> Tensor {
        Tensor::from_raw(name, DType::I64, dims, data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// The same tensor under another name (the data is shared).
    pub fn renamed(&self, name: &str) -> Tensor {
        let mut proto = self.0.proto.clone();
        proto.name = Some(name.to_string());
        Tensor(Arc::new(Inner { proto, data: self.0.data.clone(), numel: self.0.numel }))
    }

    /// The tensor without the given indices of `axis` (sorted, distinct, in range). An external
    /// tensor is not copied: the result refers to it and is materialised when streamed or read.
    pub fn remove_indices(&self, axis: usize, removed: &[usize]) -> Result<Tensor, IrError> {
        let dims = self.dims();
        let (outer, n, inner) = self.axis_layout(axis)?;
        let mut keep = vec![true; n];
        for &i in removed {
            *keep.get_mut(i).ok_or_else(|| tensor_error(self.proto(), format!("has no index {i} on axis {axis}")))? = false;
        }
        let kept = keep.iter().filter(|&&k| k).count();
        let mut new_dims = dims;
        new_dims[axis] = kept as u64;
        if self.is_external() {
            return Ok(self.sliced(axis, &keep, &new_dims));
        }
        let bytes =
            self.packed().ok_or_else(|| tensor_error(self.proto(), format!("has element type {} that cannot be sliced", self.dtype())))?;
        let mut out = Vec::with_capacity(outer * kept * inner);
        for o in 0..outer {
            for (i, _) in keep.iter().enumerate().filter(|(_, k)| **k) {
                let at = (o * n + i) * inner;
                out.extend_from_slice(&bytes[at..at + inner]);
            }
        }
        // The source was read whole and the copy is what the model keeps: a mapped source's
        // pages go back (they come back from the file if it is read again).
        if let (Data::Proto { pages: Some(pages) }, std::borrow::Cow::Borrowed(raw)) = (&self.0.data, &bytes) {
            pages.release(raw);
        }
        Ok(self.with_data(&new_dims, out))
    }

    /// The lazy form of [`Tensor::remove_indices`] for an external tensor whose layout was checked:
    /// `keep` flags the indices of `axis` that stay.
    fn sliced(&self, axis: usize, keep: &[bool], new_dims: &[u64]) -> Tensor {
        let (source, mut kept) = match &self.0.data {
            Data::Sliced(s) => (s.source.clone(), s.keep.clone()),
            _ => (self.clone(), vec![None; new_dims.len()]),
        };
        // Indices of this tensor's axis map to indices of the source's through what is kept already.
        let current: Vec<usize> = kept[axis].take().unwrap_or_else(|| (0..keep.len()).collect());
        kept[axis] = Some(current.into_iter().zip(keep).filter(|(_, k)| **k).map(|(i, _)| i).collect());
        let mut proto = self.0.proto.clone();
        proto.dims = new_dims.iter().map(|&d| d as i64).collect();
        proto.raw_data = None;
        let numel = new_dims.iter().product();
        let sliced = Sliced { source, keep: kept, bytes: OnceLock::new() };
        Tensor(Arc::new(Inner { proto, data: Data::Sliced(Arc::new(sliced)), numel }))
    }

    /// Writes the packed little-endian bytes to `w` piece by piece: a sliced tensor is never
    /// materialised whole, and a mapped one gives its pages back as it goes. `Ok(false)` when the
    /// tensor has no packed form (strings, sub-byte types in typed fields).
    pub fn write_packed(&self, w: &mut dyn std::io::Write) -> std::io::Result<bool> {
        self.stream(&mut |piece| w.write_all(piece))
    }

    /// Calls `f` with the packed bytes in order, in pieces that each hold whole elements.
    fn stream(&self, f: &mut dyn FnMut(&[u8]) -> std::io::Result<()>) -> std::io::Result<bool> {
        match &self.0.data {
            Data::External { bytes, pages } => {
                for piece in bytes.chunks(STREAM_CHUNK) {
                    f(piece)?;
                    if let Some(pages) = pages {
                        pages.release(piece);
                    }
                }
                Ok(true)
            }
            Data::Sliced(s) => match s.bytes.get() {
                Some(bytes) => bytes.chunks(STREAM_CHUNK).try_for_each(&mut *f).map(|()| true),
                None => s.stream(f).map(|()| true),
            },
            Data::Proto { pages } => match self.packed() {
                Some(std::borrow::Cow::Borrowed(raw)) => {
                    for piece in raw.chunks(STREAM_CHUNK) {
                        f(piece)?;
                        if let Some(pages) = pages {
                            pages.release(piece);
                        }
                    }
                    Ok(true)
                }
                Some(bytes) => bytes.chunks(STREAM_CHUNK).try_for_each(&mut *f).map(|()| true),
                None => Ok(false),
            },
        }
    }

    /// A copy with the given indices of `axis` set to zero (all-zero bytes: 0 for every
    /// numeric type prunec slices).
    pub fn zero_indices(&self, axis: usize, indices: &[usize]) -> Result<Tensor, IrError> {
        let (outer, n, inner) = self.axis_layout(axis)?;
        let mut bytes = self
            .packed()
            .ok_or_else(|| tensor_error(self.proto(), format!("has element type {} that cannot be masked", self.dtype())))?
            .into_owned();
        for o in 0..outer {
            for &i in indices.iter().filter(|&&i| i < n) {
                let at = (o * n + i) * inner;
                bytes[at..at + inner].fill(0);
            }
        }
        Ok(self.with_data(&self.dims(), bytes))
    }

    /// `(elements before the axis, axis size, bytes of one step along the axis)`.
    fn axis_layout(&self, axis: usize) -> Result<(usize, usize, usize), IrError> {
        let dims = self.dims();
        let Some(&n) = dims.get(axis) else { return Err(tensor_error(self.proto(), format!("has no axis {axis}"))) };
        let width = self
            .dtype()
            .bit_width()
            .filter(|w| w % 8 == 0)
            .ok_or_else(|| tensor_error(self.proto(), format!("has element type {} that cannot be sliced", self.dtype())))?;
        let outer: u64 = dims[..axis].iter().product();
        let inner: u64 = dims[axis + 1..].iter().product::<u64>() * width / 8;
        Ok((outer as usize, n as usize, inner as usize))
    }

    /// For each index of `axis`, `f` summed over the values at that index (the reduction over
    /// every other axis). `None` for a type without numeric values.
    pub fn axis_sums(&self, axis: usize, f: impl Fn(f64) -> f64) -> Option<Vec<f64>> {
        self.axes_sums(&[axis], f).and_then(|mut v| v.pop())
    }

    /// [`Tensor::axis_sums`] for several axes in one pass over the data, which is streamed: a
    /// tensor of raw or external data is decoded a piece at a time (never whole), and a mapped
    /// one gives its pages back as it goes.
    pub fn axes_sums(&self, axes: &[usize], f: impl Fn(f64) -> f64) -> Option<Vec<Vec<f64>>> {
        let dims: Vec<usize> = self.dims().iter().map(|&d| d as usize).collect();
        if axes.iter().any(|&a| a >= dims.len()) {
            return None;
        }
        let mut sums: Vec<Vec<f64>> = axes.iter().map(|&a| vec![0.0; dims[a]]).collect();
        if self.numel() == 0 {
            return Some(sums);
        }
        // A row is the run of elements along which no summed index changes, except the last axis
        // when it is summed itself: then a row is one step of the axis before it.
        let last = dims.len() - 1;
        let deepest = *axes.iter().max()?;
        let row_len: usize = if deepest == last { dims[last] } else { dims[deepest + 1..].iter().product() };
        // Index of axis `a` for row `r`: (r / rows_per[a]) % dims[a].
        let rows_per: Vec<usize> =
            axes.iter().map(|&a| if a == last { 1 } else { dims[a + 1..].iter().product::<usize>() / row_len.max(1) }).collect();
        let mut row = 0usize;
        let mut at = 0usize;
        let mut index: Vec<usize> = vec![0; axes.len()];
        // `values` hold f(x) already: f is applied once per element, however many axes are summed.
        let mut add = |values: &[f64]| {
            let mut values = values;
            while !values.is_empty() {
                if at == 0 {
                    for (k, &a) in axes.iter().enumerate() {
                        if a != last || deepest != last {
                            index[k] = (row / rows_per[k].max(1)) % dims[a];
                        }
                    }
                }
                let take = (row_len - at).min(values.len());
                let (seg, rest) = values.split_at(take);
                // Each sum receives its values in element order, as a plain loop over the
                // tensor would add them, so the scores do not depend on the piece size.
                for (k, &a) in axes.iter().enumerate() {
                    if a == last && deepest == last {
                        for (s, &v) in sums[k][at..at + take].iter_mut().zip(seg) {
                            *s += v;
                        }
                    } else {
                        let s = &mut sums[k][index[k]];
                        for &v in seg {
                            *s += v;
                        }
                    }
                }
                at += take;
                if at == row_len {
                    at = 0;
                    row += 1;
                }
                values = rest;
            }
        };
        if self.has_raw_data() {
            let dtype = self.dtype();
            let mut decoded = Vec::new();
            let mut ok = true;
            self.stream(&mut |piece| {
                ok = ok && decode_into(dtype, piece, &mut decoded).is_some();
                if ok {
                    decoded.iter_mut().for_each(|v| *v = f(*v));
                    add(&decoded);
                }
                Ok(())
            })
            .ok()?;
            ok.then_some(())?;
        } else {
            add(&self.to_f64_vec()?.into_iter().map(&f).collect::<Vec<f64>>());
        }
        Some(sums)
    }
}

impl Sliced {
    /// Streams the kept elements: for every kept index of the axes before the last sliced one,
    /// the runs of consecutive kept indices of that axis are contiguous blocks of the source.
    fn stream(&self, f: &mut dyn FnMut(&[u8]) -> std::io::Result<()>) -> std::io::Result<()> {
        let source = &self.source;
        let (bytes, pages) = match &source.0.data {
            Data::External { bytes, pages } => (bytes.clone(), pages.clone()),
            _ => match source.packed() {
                Some(b) => (Bytes::from(b.into_owned()), None),
                None => return Ok(()),
            },
        };
        let dims: Vec<usize> = source.dims().iter().map(|&d| d as usize).collect();
        let width = source.dtype().bit_width().unwrap_or(8) as usize / 8;
        let Some(last_sliced) = self.keep.iter().rposition(Option::is_some) else {
            return bytes.chunks(STREAM_CHUNK).try_for_each(&mut *f);
        };
        let block = dims[last_sliced + 1..].iter().product::<usize>() * width;
        let strides: Vec<usize> = (0..dims.len()).map(|a| dims[a + 1..].iter().product::<usize>() * width).collect();
        let kept = |a: usize| -> Vec<usize> { self.keep[a].clone().unwrap_or_else(|| (0..dims[a]).collect()) };
        let outer_kept: Vec<Vec<usize>> = (0..last_sliced).map(kept).collect();
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for i in kept(last_sliced) {
            match runs.last_mut() {
                Some((start, len)) if *start + *len == i => *len += 1,
                _ => runs.push((i, 1)),
            }
        }
        if outer_kept.iter().any(Vec::is_empty) || runs.is_empty() {
            return Ok(());
        }
        let mut buf: Vec<u8> = Vec::with_capacity(STREAM_CHUNK);
        // The source is read front to back; its pages are given back behind the read position.
        let mut released = 0usize;
        let mut odometer = vec![0usize; last_sliced];
        loop {
            let base: usize = odometer.iter().enumerate().map(|(a, &k)| outer_kept[a][k] * strides[a]).sum();
            for &(start, len) in &runs {
                let from = base + start * strides[last_sliced];
                let piece = &bytes[from..from + len * block];
                if buf.len() + piece.len() > STREAM_CHUNK {
                    f(&buf)?;
                    buf.clear();
                }
                if piece.len() >= STREAM_CHUNK {
                    piece.chunks(STREAM_CHUNK).try_for_each(&mut *f)?;
                } else {
                    buf.extend_from_slice(piece);
                }
                if let Some(pages) = &pages
                    && from >= released + STREAM_CHUNK
                {
                    pages.release(&bytes[released..from]);
                    released = from;
                }
            }
            // Next combination of kept outer indices, last axis fastest.
            let mut a = last_sliced;
            loop {
                if a == 0 {
                    if !buf.is_empty() {
                        f(&buf)?;
                    }
                    if let Some(pages) = &pages {
                        pages.release(&bytes[released..]);
                    }
                    return Ok(());
                }
                a -= 1;
                odometer[a] += 1;
                if odometer[a] < outer_kept[a].len() {
                    break;
                }
                odometer[a] = 0;
            }
        }
    }
}

fn decode_raw(dtype: DType, raw: &[u8], n: usize) -> Option<Vec<f64>> {
    let mut out = Vec::new();
    decode_into(dtype, raw, &mut out)?;
    (out.len() == n).then_some(out)
}

/// Decodes packed little-endian values into `out` (cleared first); `None` for a type without
/// numeric values or bytes that are not whole elements.
fn decode_into(dtype: DType, raw: &[u8], out: &mut Vec<f64>) -> Option<()> {
    use DataType as T;
    fn chunks<const W: usize>(raw: &[u8], out: &mut Vec<f64>, f: impl Fn([u8; W]) -> f64) -> Option<()> {
        out.clear();
        raw.len().is_multiple_of(W).then(|| out.extend(raw.chunks_exact(W).map(|c| f(c.try_into().expect("chunk width")))))
    }
    match dtype.known()? {
        T::Float => chunks::<4>(raw, out, |b| f32::from_le_bytes(b) as f64),
        T::Double => chunks::<8>(raw, out, f64::from_le_bytes),
        T::Float16 => chunks::<2>(raw, out, |b| half::f16::from_le_bytes(b).to_f64()),
        T::Bfloat16 => chunks::<2>(raw, out, |b| half::bf16::from_le_bytes(b).to_f64()),
        T::Int64 => chunks::<8>(raw, out, |b| i64::from_le_bytes(b) as f64),
        T::Int32 => chunks::<4>(raw, out, |b| i32::from_le_bytes(b) as f64),
        T::Int16 => chunks::<2>(raw, out, |b| i16::from_le_bytes(b) as f64),
        T::Int8 => chunks::<1>(raw, out, |b| b[0] as i8 as f64),
        T::Uint64 => chunks::<8>(raw, out, |b| u64::from_le_bytes(b) as f64),
        T::Uint32 => chunks::<4>(raw, out, |b| u32::from_le_bytes(b) as f64),
        T::Uint16 => chunks::<2>(raw, out, |b| u16::from_le_bytes(b) as f64),
        T::Uint8 | T::Bool => chunks::<1>(raw, out, |b| b[0] as f64),
        _ => None,
    }
}

fn tensor_error(proto: &proto::TensorProto, what: String) -> IrError {
    IrError::BadTensor { name: proto.name().to_string(), what }
}

fn checked_numel(proto: &proto::TensorProto) -> Result<u64, IrError> {
    let mut numel = 1u64;
    for &d in &proto.dims {
        if d < 0 {
            return Err(tensor_error(proto, format!("has a negative dimension in dims {:?}", proto.dims)));
        }
        numel = numel
            .checked_mul(d as u64)
            .ok_or_else(|| tensor_error(proto, format!("has dims {:?} whose element count overflows 64 bits", proto.dims)))?;
    }
    let dtype = DType(proto.data_type());
    if dtype.known().is_none() {
        return Err(tensor_error(proto, format!("has unknown element type code {}", dtype.0)));
    }
    if dtype.bit_width().is_some() && dtype.packed_bytes(numel).is_none() {
        return Err(tensor_error(proto, format!("has dims {:?} of {dtype} whose byte size overflows 64 bits", proto.dims)));
    }
    Ok(numel)
}

fn check_inline_data(proto: &proto::TensorProto, numel: u64) -> Result<(), IrError> {
    use DataType as T;
    let dtype = DType(proto.data_type());
    if let Some(raw) = proto.raw_data.as_ref().filter(|r| !r.is_empty()) {
        let expected = dtype.packed_bytes(numel).ok_or_else(|| tensor_error(proto, format!("stores {dtype} elements as raw_data")))?;
        if raw.len() as u64 != expected {
            return Err(tensor_error(
                proto,
                format!("has {} bytes of raw_data, but dims {:?} of {dtype} need {expected}", raw.len(), proto.dims),
            ));
        }
        return Ok(());
    }
    let (field, have, per_element) = match dtype.known() {
        Some(T::Float) => ("float_data", proto.float_data.len(), 1),
        Some(T::Complex64) => ("float_data", proto.float_data.len(), 2),
        Some(T::Double) => ("double_data", proto.double_data.len(), 1),
        Some(T::Complex128) => ("double_data", proto.double_data.len(), 2),
        Some(T::Int64) => ("int64_data", proto.int64_data.len(), 1),
        Some(T::Uint32 | T::Uint64) => ("uint64_data", proto.uint64_data.len(), 1),
        Some(T::String) => ("string_data", proto.string_data.len(), 1),
        // Sub-byte types pack several elements into one int32 entry.
        Some(T::Int4 | T::Uint4 | T::Float4e2m1 | T::Float6e2m3 | T::Float6e3m2) => ("int32_data", proto.int32_data.len() * 2, 1),
        Some(T::Int2 | T::Uint2) => ("int32_data", proto.int32_data.len() * 4, 1),
        _ => ("int32_data", proto.int32_data.len(), 1),
    };
    let needed = numel.saturating_mul(per_element);
    let ok = match dtype.bit_width() {
        Some(w) if w < 8 => (have as u64) >= needed && (have as u64) < needed + 8 / w,
        _ => have as u64 == needed,
    };
    if !ok {
        return Err(tensor_error(proto, format!("has {have} entries in {field}, but dims {:?} of {dtype} need {needed}", proto.dims)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Debug, Default)]
    struct CountingPages(AtomicUsize);

    impl PageRelease for CountingPages {
        fn release(&self, bytes: &[u8]) {
            self.0.fetch_add(bytes.len(), Ordering::Relaxed);
        }
    }

    fn values(n: usize) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37).sin()).collect()
    }

    fn external(dims: &[u64], pages: Option<Arc<CountingPages>>) -> Tensor {
        let inline = Tensor::from_f32("w", dims, &values(dims.iter().product::<u64>() as usize));
        let mut proto = inline.proto().clone();
        let bytes = proto.raw_data.take().expect("raw");
        proto.data_location = Some(DataLocation::External as i32);
        match pages {
            Some(p) => Tensor::from_mapped(proto, bytes, p).expect("valid"),
            None => Tensor::from_external(proto, bytes).expect("valid"),
        }
    }

    fn streamed(t: &Tensor) -> Vec<u8> {
        let mut out = Vec::new();
        assert!(t.write_packed(&mut out).expect("in memory"));
        out
    }

    #[test]
    fn lazy_removal_equals_the_eager_copy() {
        let dims = [6, 5, 4];
        let inline = Tensor::from_f32("w", &dims, &values(120));
        let pages = Arc::new(CountingPages::default());
        let ext = external(&dims, Some(pages.clone()));
        let eager = inline.remove_indices(1, &[0, 2, 3]).and_then(|t| t.remove_indices(0, &[1, 4])).expect("eager");
        let lazy = ext.remove_indices(1, &[0, 2, 3]).and_then(|t| t.remove_indices(0, &[1, 4])).expect("lazy");
        assert!(matches!(lazy.0.data, Data::Sliced(_)), "an external tensor is sliced lazily");
        assert_eq!(lazy.dims(), vec![4, 2, 4]);
        assert_eq!(lazy.nbytes(), eager.nbytes());
        assert_eq!(streamed(&lazy), eager.packed().expect("raw").to_vec());
        assert!(pages.0.load(Ordering::Relaxed) > 0, "the source's pages are given back");
        assert_eq!(lazy.raw_bytes().expect("materialised").as_ref(), eager.packed().expect("raw").as_ref());
        assert_eq!(lazy.to_f64_vec(), eager.to_f64_vec());
        // Removing again composes with what was removed before, on the same axis too.
        let again = lazy.remove_indices(1, &[0]).expect("lazy");
        assert_eq!(streamed(&again), eager.remove_indices(1, &[0]).expect("eager").packed().expect("raw").to_vec());
        // The last axis: runs of one element.
        let last = ext.remove_indices(2, &[1]).expect("lazy");
        assert_eq!(streamed(&last), inline.remove_indices(2, &[1]).expect("eager").packed().expect("raw").to_vec());
        // Everything removed.
        let empty = ext.remove_indices(0, &[0, 1, 2, 3, 4, 5]).expect("lazy");
        assert!(streamed(&empty).is_empty());
    }

    #[test]
    fn an_inline_tensor_of_a_mapped_model_gives_its_pages_back_as_it_streams() {
        // Larger than one stream piece: every piece is given back, not only the last.
        let dims = [3, 700, 701];
        let inline = Tensor::from_f32("w", &dims, &values(3 * 700 * 701));
        let pages = Arc::new(CountingPages::default());
        let mapped = Tensor::from_mapped_proto(inline.proto().clone(), pages.clone()).expect("valid");
        assert_eq!(mapped, inline, "where the bytes live is not part of the value");
        assert!(mapped.pages().is_some() && inline.pages().is_none());
        assert_eq!(streamed(&mapped), inline.packed().expect("raw").to_vec());
        assert_eq!(pages.0.load(Ordering::Relaxed), mapped.nbytes() as usize, "every byte written is given back");
        let summed = Arc::new(CountingPages::default());
        let mapped = Tensor::from_mapped_proto(inline.proto().clone(), summed.clone()).expect("valid");
        assert_eq!(mapped.axis_sums(1, |x| x * x), inline.axis_sums(1, |x| x * x));
        assert_eq!(summed.0.load(Ordering::Relaxed), mapped.nbytes() as usize, "every byte summed is given back");
        let sliced = Arc::new(CountingPages::default());
        let mapped = Tensor::from_mapped_proto(inline.proto().clone(), sliced.clone()).expect("valid");
        assert_eq!(mapped.remove_indices(1, &[0, 5]).expect("slices"), inline.remove_indices(1, &[0, 5]).expect("slices"));
        assert_eq!(sliced.0.load(Ordering::Relaxed), mapped.nbytes() as usize, "the sliced source is given back");
        // A tensor built in memory has no pages to give back, and streams as before.
        assert_eq!(streamed(&inline), mapped.packed().expect("raw").to_vec());
    }

    #[test]
    fn streamed_axis_sums_equal_a_plain_loop() {
        // Larger than one stream piece, so sums cross piece boundaries.
        let dims = [3, 700, 701];
        let ext = external(&dims, Some(Arc::new(CountingPages::default())));
        let values: Vec<f64> = values(3 * 700 * 701).into_iter().map(f64::from).collect();
        for axes in [vec![0], vec![1], vec![2], vec![0, 1], vec![0, 2], vec![1, 2], vec![0, 1, 2]] {
            let got = ext.axes_sums(&axes, |x| x * x).expect("numeric");
            for (k, &a) in axes.iter().enumerate() {
                let inner: usize = dims[a + 1..].iter().product::<u64>() as usize;
                let mut want = vec![0.0; dims[a] as usize];
                for (i, v) in values.iter().enumerate() {
                    want[(i / inner) % dims[a] as usize] += v * v;
                }
                assert_eq!(got[k], want, "axes {axes:?}, axis {a}");
            }
        }
        assert_eq!(ext.axis_sums(3, f64::abs), None);
    }
}
