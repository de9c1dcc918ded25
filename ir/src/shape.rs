//! Element types and shapes, with symbolic and unknown dimensions.

use crate::proto;
use std::fmt;

/// An ONNX element type (`TensorProto.DataType`), kept as its raw number so unknown codes survive.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct DType(pub i32);

impl DType {
    /// 32-bit float.
    pub const F32: DType = DType(proto::tensor_proto::DataType::Float as i32);
    /// 64-bit signed integer.
    pub const I64: DType = DType(proto::tensor_proto::DataType::Int64 as i32);

    /// The schema's enum value, or `None` for a code the schema does not define.
    pub fn known(self) -> Option<proto::tensor_proto::DataType> {
        proto::tensor_proto::DataType::try_from(self.0).ok().filter(|t| *t != proto::tensor_proto::DataType::Undefined)
    }

    /// Size of one element in bits, for the fixed-size types.
    pub fn bit_width(self) -> Option<u64> {
        use proto::tensor_proto::DataType as T;
        Some(match self.known()? {
            T::Bool | T::Int8 | T::Uint8 | T::Float8e4m3fn | T::Float8e4m3fnuz | T::Float8e5m2 | T::Float8e5m2fnuz | T::Float8e8m0 => 8,
            T::Int16 | T::Uint16 | T::Float16 | T::Bfloat16 => 16,
            T::Int32 | T::Uint32 | T::Float => 32,
            T::Int64 | T::Uint64 | T::Double | T::Complex64 => 64,
            T::Complex128 => 128,
            T::Int4 | T::Uint4 | T::Float4e2m1 => 4,
            T::Float6e2m3 | T::Float6e3m2 => 6,
            T::Int2 | T::Uint2 => 2,
            T::String | T::Undefined => return None,
        })
    }

    /// Bytes taken by `numel` packed elements (sub-byte types round up), or `None` for strings.
    pub fn packed_bytes(self, numel: u64) -> Option<u64> {
        numel.checked_mul(self.bit_width()?).map(|bits| bits.div_ceil(8))
    }

    /// Whether this is a floating-point type: tensors of these types count as parameters.
    pub fn is_float(self) -> bool {
        use proto::tensor_proto::DataType as T;
        matches!(
            self.known(),
            Some(
                T::Float
                    | T::Double
                    | T::Float16
                    | T::Bfloat16
                    | T::Float8e4m3fn
                    | T::Float8e4m3fnuz
                    | T::Float8e5m2
                    | T::Float8e5m2fnuz
                    | T::Float8e8m0
                    | T::Float4e2m1
                    | T::Float6e2m3
                    | T::Float6e3m2
            )
        )
    }

    /// Short lower-case name used by the text dump (`f32`, `i64`, ...).
    pub fn short_name(self) -> String {
        use proto::tensor_proto::DataType as T;
        let name = match self.known() {
            Some(T::Float) => "f32",
            Some(T::Double) => "f64",
            Some(T::Float16) => "f16",
            Some(T::Bfloat16) => "bf16",
            Some(T::Int8) => "i8",
            Some(T::Int16) => "i16",
            Some(T::Int32) => "i32",
            Some(T::Int64) => "i64",
            Some(T::Uint8) => "u8",
            Some(T::Uint16) => "u16",
            Some(T::Uint32) => "u32",
            Some(T::Uint64) => "u64",
            Some(T::Bool) => "bool",
            Some(T::String) => "str",
            Some(other) => return other.as_str_name().to_ascii_lowercase(),
            None => return format!("dtype{}", self.0),
        };
        name.to_string()
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short_name())
    }
}

/// One dimension of a shape.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Dim {
    /// A concrete size.
    Known(u64),
    /// A named or computed size: an ONNX `dim_param` or an expression found by inference (`2*N`).
    Sym(String),
    /// Nothing is known.
    Unknown,
}

impl Dim {
    /// The concrete size, if known.
    pub fn known(&self) -> Option<u64> {
        match self {
            Dim::Known(n) => Some(*n),
            _ => None,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Known(n) => write!(f, "{n}"),
            Dim::Sym(s) => f.write_str(s),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

/// A tensor shape: a list of dimensions (rank 0 is a scalar).
#[derive(Clone, PartialEq, Eq, Hash, Debug, Default)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    /// A shape of known sizes.
    pub fn known(dims: &[u64]) -> Shape {
        Shape(dims.iter().map(|&d| Dim::Known(d)).collect())
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// All sizes, if every one is known.
    pub fn concrete(&self) -> Option<Vec<u64>> {
        self.0.iter().map(Dim::known).collect()
    }

    /// Number of elements, if every size is known and the product fits in a u64.
    pub fn numel(&self) -> Option<u64> {
        self.0.iter().try_fold(1u64, |acc, d| acc.checked_mul(d.known()?))
    }

    /// The shape an ONNX type records, if it is a tensor type with a shape.
    pub fn from_type(ty: &proto::TypeProto) -> Option<Shape> {
        let shape = match ty.value.as_ref()? {
            proto::type_proto::Value::TensorType(t) => t.shape.as_ref()?,
            proto::type_proto::Value::SparseTensorType(t) => t.shape.as_ref()?,
            _ => return None,
        };
        Some(Shape(
            shape
                .dim
                .iter()
                .map(|d| match &d.value {
                    Some(proto::tensor_shape_proto::dimension::Value::DimValue(v)) if *v >= 0 => Dim::Known(*v as u64),
                    Some(proto::tensor_shape_proto::dimension::Value::DimParam(p)) if !p.is_empty() => Dim::Sym(p.clone()),
                    _ => Dim::Unknown,
                })
                .collect(),
        ))
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// The element type an ONNX type records, if it is a tensor type.
pub(crate) fn dtype_of_type(ty: &proto::TypeProto) -> Option<DType> {
    match ty.value.as_ref()? {
        proto::type_proto::Value::TensorType(t) => t.elem_type.map(DType),
        proto::type_proto::Value::SparseTensorType(t) => t.elem_type.map(DType),
        _ => None,
    }
}
