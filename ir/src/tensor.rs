//! Weights: shared, immutable tensors whose bytes may live in a memory map.

use crate::error::IrError;
use crate::proto::{self, tensor_proto::DataLocation, tensor_proto::DataType};
use crate::shape::DType;
use bytes::Bytes;
use std::sync::Arc;

/// A constant tensor: an initializer, a `Constant` node's value or any tensor attribute.
///
/// Cloning is cheap (a reference count). The bytes are never copied when the model is read: inline
/// `raw_data` points into the decoded file and external data into a memory map. To change a
/// tensor, build a new one with [`Tensor::from_f32`] or [`Tensor::from_proto`].
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor(Arc<Inner>);

#[derive(Debug, PartialEq)]
struct Inner {
    /// The tensor as the model stores it; for external data, `raw_data` is empty.
    proto: proto::TensorProto,
    /// The bytes of an external tensor, sliced out of the data file's memory map.
    external: Option<Bytes>,
    numel: u64,
}

impl Tensor {
    /// Wraps an inline tensor after checking that its dims, type and data agree.
    pub fn from_proto(proto: proto::TensorProto) -> Result<Tensor, IrError> {
        if proto.data_location() == DataLocation::External {
            return Err(tensor_error(&proto, "stores its data externally, but no external bytes were given".into()));
        }
        let numel = checked_numel(&proto)?;
        check_inline_data(&proto, numel)?;
        Ok(Tensor(Arc::new(Inner { proto, external: None, numel })))
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
        Ok(Tensor(Arc::new(Inner { proto, external: Some(bytes), numel })))
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
        Tensor(Arc::new(Inner { proto, external: None, numel }))
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

    /// Whether the data lives in an external file.
    pub fn is_external(&self) -> bool {
        self.0.external.is_some()
    }

    /// The packed little-endian bytes, when the tensor is stored as raw or external data.
    pub fn raw_bytes(&self) -> Option<&Bytes> {
        self.0.external.as_ref().or(self.0.proto.raw_data.as_ref().filter(|_| self.0.proto.data_location() != DataLocation::External))
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
            Tensor(Arc::new(Inner { proto, external: Some(data), numel }))
        } else {
            proto.raw_data = Some(data);
            Tensor(Arc::new(Inner { proto, external: None, numel }))
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
        Tensor(Arc::new(Inner { proto, external: self.0.external.clone(), numel: self.0.numel }))
    }

    /// A copy without the given indices of `axis` (sorted, distinct, in range).
    pub fn remove_indices(&self, axis: usize, removed: &[usize]) -> Result<Tensor, IrError> {
        let dims = self.dims();
        let (outer, n, inner) = self.axis_layout(axis)?;
        let bytes =
            self.packed().ok_or_else(|| tensor_error(self.proto(), format!("has element type {} that cannot be sliced", self.dtype())))?;
        let mut keep = vec![true; n];
        for &i in removed {
            *keep.get_mut(i).ok_or_else(|| tensor_error(self.proto(), format!("has no index {i} on axis {axis}")))? = false;
        }
        let kept = keep.iter().filter(|&&k| k).count();
        let mut out = Vec::with_capacity(outer * kept * inner);
        for o in 0..outer {
            for (i, _) in keep.iter().enumerate().filter(|(_, k)| **k) {
                let at = (o * n + i) * inner;
                out.extend_from_slice(&bytes[at..at + inner]);
            }
        }
        let mut new_dims = dims;
        new_dims[axis] = kept as u64;
        Ok(self.with_data(&new_dims, out))
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
        let dims = self.dims();
        let n = *dims.get(axis)? as usize;
        let inner: u64 = dims[axis + 1..].iter().product();
        let values = self.to_f64_vec()?;
        let mut sums = vec![0.0; n];
        if n == 0 {
            return Some(sums);
        }
        for (k, v) in values.into_iter().enumerate() {
            sums[(k / inner.max(1) as usize) % n] += f(v);
        }
        Some(sums)
    }
}

fn decode_raw(dtype: DType, raw: &[u8], n: usize) -> Option<Vec<f64>> {
    use DataType as T;
    fn chunks<const W: usize>(raw: &[u8], n: usize, f: impl Fn([u8; W]) -> f64) -> Option<Vec<f64>> {
        (raw.len() == n * W).then(|| raw.chunks_exact(W).map(|c| f(c.try_into().expect("chunk width"))).collect())
    }
    match dtype.known()? {
        T::Float => chunks::<4>(raw, n, |b| f32::from_le_bytes(b) as f64),
        T::Double => chunks::<8>(raw, n, f64::from_le_bytes),
        T::Float16 => chunks::<2>(raw, n, |b| half::f16::from_le_bytes(b).to_f64()),
        T::Bfloat16 => chunks::<2>(raw, n, |b| half::bf16::from_le_bytes(b).to_f64()),
        T::Int64 => chunks::<8>(raw, n, |b| i64::from_le_bytes(b) as f64),
        T::Int32 => chunks::<4>(raw, n, |b| i32::from_le_bytes(b) as f64),
        T::Int16 => chunks::<2>(raw, n, |b| i16::from_le_bytes(b) as f64),
        T::Int8 => chunks::<1>(raw, n, |b| b[0] as i8 as f64),
        T::Uint64 => chunks::<8>(raw, n, |b| u64::from_le_bytes(b) as f64),
        T::Uint32 => chunks::<4>(raw, n, |b| u32::from_le_bytes(b) as f64),
        T::Uint16 => chunks::<2>(raw, n, |b| u16::from_le_bytes(b) as f64),
        T::Uint8 | T::Bool => chunks::<1>(raw, n, |b| b[0] as f64),
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
