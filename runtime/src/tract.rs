//! Running models in tract: the in-process runtime behind verification and latency figures.

use crate::RunError;
use prost::Message;
use prunec_ir::{DType, Dim, Model, proto::tensor_proto::DataType};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use tract_onnx::prelude::*;

pub use tract_onnx::prelude::Tensor as TractTensor;

/// Named input tensors.
#[derive(Clone, Debug, Default)]
pub struct Feed(pub BTreeMap<String, TractTensor>);

/// The outputs of one run, in graph-output order, and how long the run took.
#[derive(Debug)]
pub struct Outputs {
    /// `(name, tensor)` per graph output.
    pub values: Vec<(String, TractTensor)>,
    /// Wall time of the run itself (plan building excluded).
    pub elapsed: Duration,
}

/// A model compiled by tract, ready to run many times.
pub struct Plan {
    plan: std::sync::Arc<TypedSimplePlan>,
    input_names: Vec<String>,
    output_names: Vec<String>,
    /// Inputs that tract's copy holds as constants of the values fed when the plan was built
    /// (they decide its control flow): a run must feed the same values.
    bound: Vec<(String, TractTensor)>,
}

impl Plan {
    /// Builds an optimised plan from an IR model, for the shapes of `feed`. External data is
    /// looked up relative to `dir`.
    ///
    /// If tract cannot build it, tract tries again on its own copy of the model, made runnable
    /// by rewrites that compute the same function for this feed (the `lower` module: shape
    /// arithmetic folded at the feed's sizes, functions expanded, the `If`s the feed decides
    /// inlined, sequences of known length and ops tract lacks lowered into ones it has). Such a
    /// plan refuses to run a feed whose inputs that decided an `If` differ from this one's.
    pub fn from_model(model: &Model, dir: &Path, feed: &Feed) -> Result<Plan, RunError> {
        Plan::from_model_as(model, dir, feed, true)
    }

    /// As [`Plan::from_model`], but decluttered only, not optimised: tract's reference kernels,
    /// which sum in other orders than the optimised ones. The two plans of one model differ by
    /// the float error of its depth and scale, which verification measures this way.
    pub fn from_model_unoptimised(model: &Model, dir: &Path, feed: &Feed) -> Result<Plan, RunError> {
        Plan::from_model_as(model, dir, feed, false)
    }

    fn from_model_as(model: &Model, dir: &Path, feed: &Feed, optimise: bool) -> Result<Plan, RunError> {
        let bytes = prunec_backends::onnx::to_bytes(model)?;
        let refusal = match Plan::from_bytes(bytes, dir, feed, optimise) {
            Ok(plan) => return Ok(plan),
            Err(refusal) => refusal,
        };
        let Some(copy) = crate::lower::for_tract(model, dir, feed) else { return Err(refusal) };
        // The first refusal names what tract lacks; a second one would name the copy's.
        let mut plan = Plan::from_bytes(prunec_backends::onnx::to_bytes(&copy.model)?, dir, feed, optimise).map_err(|_| refusal)?;
        plan.bound = copy.bound.into_iter().filter_map(|name| Some((name.clone(), feed.0.get(&name)?.clone()))).collect();
        Ok(plan)
    }

    /// Builds an optimised plan from an ONNX file.
    pub fn from_file(path: &Path, feed: &Feed) -> Result<Plan, RunError> {
        let bytes = std::fs::read(path).map_err(|e| RunError::Tract(format!("cannot read `{}`: {e}", path.display())))?;
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Plan::from_bytes(bytes, dir, feed, true)
    }

    fn from_bytes(bytes: Vec<u8>, dir: &Path, feed: &Feed, optimise: bool) -> Result<Plan, RunError> {
        prunec_ir::catch_quietly(move || Plan::build(bytes, dir, feed, optimise))
            .map_err(|m| RunError::Tract(format!("internal failure: {m}")))?
    }

    /// Each form of the model is dropped as soon as the next one is made (the encoded bytes once
    /// decoded, tract's protobuf once parsed), so no more than two copies of the weights are
    /// alive at any moment, where keeping them all would hold three.
    fn build(bytes: Vec<u8>, dir: &Path, feed: &Feed, optimise: bool) -> Result<Plan, RunError> {
        let mut pb = tract_onnx::pb::ModelProto::decode(bytes.as_slice()).map_err(|e| RunError::Tract(e.to_string()))?;
        drop(bytes);
        specialise(&mut pb, feed);
        let graph = pb.graph.as_ref().ok_or_else(|| RunError::Tract("model has no graph".into()))?;
        let initializers: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let input_names: Vec<String> = graph.input.iter().map(|i| i.name.clone()).filter(|n| !initializers.contains(n.as_str())).collect();
        let output_names = graph.output.iter().map(|o| o.name.clone()).collect();
        let parsed = tract_onnx::onnx().parse(&pb, dir.to_str())?;
        drop(pb);
        let mut model = parsed.model;
        for (ix, name) in input_names.iter().enumerate() {
            let tensor = feed.0.get(name).ok_or_else(|| RunError::Inputs(format!("no value for input `{name}`")))?;
            model.set_input_fact(ix, InferenceFact::dt_shape(tensor.datum_type(), tensor.shape()))?;
        }
        let plan =
            if optimise { model.into_optimized()?.into_runnable()? } else { model.into_typed()?.into_decluttered()?.into_runnable()? };
        Ok(Plan { plan, input_names, output_names, bound: Vec::new() })
    }

    /// Runs the plan once.
    pub fn run(&self, feed: &Feed) -> Result<Outputs, RunError> {
        for (name, value) in &self.bound {
            if feed.0.get(name) != Some(value) {
                return Err(RunError::Inputs(format!(
                    "input `{name}` decides the model's control flow and was {value:?} when this plan was built; a plan runs only that branch"
                )));
            }
        }
        let inputs: TVec<TValue> = self
            .input_names
            .iter()
            .map(|n| feed.0.get(n).cloned().map(TValue::from).ok_or_else(|| RunError::Inputs(format!("no value for input `{n}`"))))
            .collect::<Result<_, _>>()?;
        let start = Instant::now();
        let out = prunec_ir::catch_quietly(|| self.plan.run(inputs)).map_err(|m| RunError::Tract(format!("internal failure: {m}")))??;
        let elapsed = start.elapsed();
        let values = self.output_names.iter().cloned().zip(out.into_iter().map(|v| v.into_tensor())).collect();
        Ok(Outputs { values, elapsed })
    }
}

/// Gives every recorded dimension named like an open input dimension the size `feed` gives that
/// input there, and leaves unknown every other name in `value_info` and the outputs (a sympy
/// expression of dynamo's, a size computed inside the model). A plan is built for the feed's
/// concrete shapes, and tract refuses a record that keeps the symbol ("Impossible to unify
/// Sym(batch) with Val(2)"); what a record no longer says, tract infers. Only tract's copy of
/// the model changes.
pub(crate) fn specialise(pb: &mut tract_onnx::pb::ModelProto, feed: &Feed) {
    use tract_onnx::pb::tensor_shape_proto::{Dimension, dimension::Value as D};
    use tract_onnx::pb::{GraphProto, ValueInfoProto, type_proto::Value as T};
    // tract's protobuf knows tensor types only.
    fn dims(info: &mut ValueInfoProto) -> Option<&mut Vec<Dimension>> {
        let T::TensorType(t) = info.r#type.as_mut()?.value.as_mut()?;
        t.shape.as_mut().map(|s| &mut s.dim)
    }
    fn rewrite(graph: &mut GraphProto, sizes: &BTreeMap<String, Option<i64>>) {
        let inputs = graph.input.iter_mut().map(|i| (i, false));
        let records = inputs.chain(graph.output.iter_mut().chain(graph.value_info.iter_mut()).map(|i| (i, true)));
        for (info, recorded) in records {
            for d in dims(info).into_iter().flatten() {
                let Some(D::DimParam(p)) = &d.value else { continue };
                match sizes.get(p) {
                    Some(Some(size)) => d.value = Some(D::DimValue(*size)),
                    // Inputs keep their names: a subgraph's are its own, and the graph's get
                    // their sizes from the feed.
                    _ if recorded => d.value = None,
                    _ => {}
                }
            }
        }
        for node in &mut graph.node {
            for a in &mut node.attribute {
                for g in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                    rewrite(g, sizes);
                }
            }
        }
    }
    let Some(graph) = pb.graph.as_mut() else { return };
    let mut sizes: BTreeMap<String, Option<i64>> = BTreeMap::new();
    for input in &mut graph.input {
        let Some(tensor) = feed.0.get(&input.name) else { continue };
        let Some(input_dims) = dims(input) else { continue };
        for (d, &size) in input_dims.iter().zip(tensor.shape()) {
            if let Some(D::DimParam(p)) = &d.value {
                // A name fed two different sizes stays a name: tract then says what disagrees.
                let entry = sizes.entry(p.clone()).or_insert(Some(size as i64));
                if *entry != Some(size as i64) {
                    *entry = None;
                }
            }
        }
    }
    rewrite(graph, &sizes);
}

/// Reads the arrays of an `.npz` file whose names are inputs of `model`; other arrays (labels)
/// are ignored, but a file none of whose arrays is named like an input is refused: its inputs
/// would silently be replaced by random ones. An array's `.npy` suffix (as `numpy.savez` may
/// leave it in the archive) is not part of its name.
pub fn load_npz(path: &Path, model: &Model) -> Result<Feed, RunError> {
    let err = |e: &dyn std::fmt::Display| RunError::Inputs(format!("`{}`: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| err(&e))?;
    let mut npz = ndarray_npy::NpzReader::new(file).map_err(|e| err(&e))?;
    let graph = &model.graph;
    let mut feed = Feed::default();
    let names = npz.names().map_err(|e| err(&e))?;
    for name in &names {
        let Some(id) = graph.value_by_name(name) else { continue };
        if !graph.inputs.contains(&id) {
            continue;
        }
        let tensor = read_array(&mut npz, name).map_err(|e| err(&format!("array `{name}`: {e}")))?;
        feed.0.insert(name.clone(), tensor);
    }
    let expected: Vec<&str> =
        graph.inputs.iter().map(|&v| graph.value(v)).filter(|v| v.initializer().is_none()).map(|v| v.name.as_str()).collect();
    if !expected.is_empty() && !expected.iter().any(|n| feed.0.contains_key(*n)) {
        let quoted = |names: &[&str]| names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
        let given: Vec<&str> = names.iter().map(String::as_str).collect();
        // The caller names the file; say only what is wrong with it.
        return Err(RunError::Inputs(format!(
            "no array is named like an input of the model: it expects {}, the file has {}",
            quoted(&expected),
            if given.is_empty() { "no arrays".to_string() } else { quoted(&given) }
        )));
    }
    Ok(feed)
}

/// Writes a feed as an `.npz` file (arrays named like the inputs), for another runtime to read
/// the same inputs.
pub fn save_npz(feed: &Feed, path: &Path) -> Result<(), RunError> {
    let err = |e: &dyn std::fmt::Display| RunError::Inputs(format!("`{}`: {e}", path.display()));
    let file = std::fs::File::create(path).map_err(|e| err(&e))?;
    let mut npz = ndarray_npy::NpzWriter::new(file);
    for (name, tensor) in &feed.0 {
        macro_rules! try_type {
            ($($t:ty),*) => {
                $(if tensor.datum_type() == <$t>::datum_type() {
                    let view = tensor.to_plain_array_view::<$t>().map_err(|e| err(&e))?;
                    npz.add_array(name.as_str(), &view).map_err(|e| err(&e))?;
                    continue;
                })*
            };
        }
        try_type!(f32, f64, i64, i32, bool, u8, i8);
        return Err(err(&format!("input `{name}` has type {:?}, which cannot be saved", tensor.datum_type())));
    }
    npz.finish().map_err(|e| err(&e))?;
    Ok(())
}

fn read_array(npz: &mut ndarray_npy::NpzReader<std::fs::File>, name: &str) -> Result<TractTensor, String> {
    use tract_ndarray::{ArrayD, OwnedRepr};
    macro_rules! try_type {
        ($t:ty) => {
            if let Ok(a) = npz.by_name::<OwnedRepr<$t>, tract_ndarray::IxDyn>(name) {
                let a: ArrayD<$t> = a;
                return Ok(a.into_tensor());
            }
        };
    }
    try_type!(f32);
    try_type!(i64);
    try_type!(i32);
    try_type!(f64);
    try_type!(bool);
    try_type!(u8);
    try_type!(i8);
    if let Ok(a) = npz.by_name::<OwnedRepr<NpyF16>, tract_ndarray::IxDyn>(name) {
        let a: ArrayD<NpyF16> = a;
        return Ok(a.mapv(|h| h.0).into_tensor());
    }
    Err("unsupported element type (expected f32, f16, f64, i64, i32, u8, i8 or bool)".into())
}

/// A half-precision element as `.npy` stores it (`<f2`), which ndarray-npy does not read itself:
/// fp16 models take fp16 inputs.
#[derive(Clone, Copy)]
struct NpyF16(f16);

impl ndarray_npy::ReadableElement for NpyF16 {
    fn read_to_end_exact_vec<R: std::io::Read>(
        mut reader: R,
        type_desc: &py_literal::Value,
        len: usize,
    ) -> Result<Vec<Self>, ndarray_npy::ReadDataError> {
        let little = cfg!(target_endian = "little");
        match type_desc {
            py_literal::Value::String(s) if s == "<f2" || (little && s == "=f2") => {}
            other => return Err(ndarray_npy::ReadDataError::WrongDescriptor(other.clone())),
        }
        let mut bytes = vec![0u8; len.checked_mul(2).ok_or_else(|| std::io::Error::other("array too large"))?];
        reader.read_exact(&mut bytes)?;
        if reader.read(&mut [0u8])? != 0 {
            return Err(ndarray_npy::ReadDataError::ExtraBytes(1));
        }
        Ok(bytes.chunks_exact(2).map(|b| NpyF16(f16::from_bits(u16::from_le_bytes([b[0], b[1]])))).collect())
    }
}

/// Seeded random inputs for every graph input of `model` that `given` lacks. Shapes come from
/// `shapes`, else from the model, with every unknown or symbolic dim set to 1. Floats (f32, f64,
/// f16) are uniform in [-1, 1); 8-bit integers cover their whole range (they are pixels or
/// quantised data, which a range of 0 and 1 would barely exercise); wider integers are 0 or 1
/// (valid indices for any table); booleans are random. A type tract cannot run (bf16, strings,
/// complex numbers) is refused with the input's name: such inputs must come from `--inputs`.
pub fn random_feed(model: &Model, given: Feed, shapes: &BTreeMap<String, Vec<u64>>, seed: u64) -> Result<Feed, RunError> {
    let mut feed = given;
    let mut rng = prunec_ir::SplitMix64(seed);
    for &id in &model.graph.inputs {
        let v = model.graph.value(id);
        if v.initializer().is_some() || feed.0.contains_key(&v.name) {
            continue;
        }
        let dims: Vec<usize> = match shapes.get(&v.name) {
            Some(s) => s.iter().map(|&d| d as usize).collect(),
            None => v
                .shape
                .as_ref()
                .map(|s| s.0.iter().map(|d| if let Dim::Known(n) = d { *n as usize } else { 1 }).collect())
                .unwrap_or_default(),
        };
        let dtype = v.dtype.unwrap_or(DType::F32);
        let tensor = random_tensor(dtype, &dims, &mut rng)
            .ok_or_else(|| {
                RunError::Inputs(format!(
                    "cannot make random values of type {dtype} for input `{}`: tract cannot run it; give its values with --inputs",
                    v.name
                ))
            })?
            .map_err(RunError::from)?;
        feed.0.insert(v.name.clone(), tensor);
    }
    Ok(feed)
}

/// Random values of an element type for [`random_feed`]; `None` for a type tract has no datum
/// type for.
fn random_tensor(dtype: DType, dims: &[usize], rng: &mut prunec_ir::SplitMix64) -> Option<TractResult<TractTensor>> {
    let n: usize = dims.iter().product();
    fn make<T: Datum + Copy>(dims: &[usize], n: usize, mut f: impl FnMut() -> T) -> TractResult<TractTensor> {
        TractTensor::from_shape(dims, &(0..n).map(|_| f()).collect::<Vec<T>>())
    }
    let unit = |rng: &mut prunec_ir::SplitMix64| rng.unit() * 2.0 - 1.0;
    Some(match dtype.known()? {
        DataType::Float => make(dims, n, || unit(rng) as f32),
        DataType::Double => make(dims, n, || unit(rng)),
        DataType::Float16 => make(dims, n, || f16::from_f64(unit(rng))),
        DataType::Uint8 => make(dims, n, || rng.next_u64() as u8),
        DataType::Int8 => make(dims, n, || rng.next_u64() as i8),
        DataType::Uint16 => make(dims, n, || (rng.next_u64() % 2) as u16),
        DataType::Int16 => make(dims, n, || (rng.next_u64() % 2) as i16),
        DataType::Uint32 => make(dims, n, || (rng.next_u64() % 2) as u32),
        DataType::Int32 => make(dims, n, || (rng.next_u64() % 2) as i32),
        DataType::Uint64 => make(dims, n, || rng.next_u64() % 2),
        DataType::Int64 => make(dims, n, || (rng.next_u64() % 2) as i64),
        DataType::Bool => make(dims, n, || rng.next_u64() % 2 == 1),
        _ => return None,
    })
}

/// How far two outputs are apart.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Difference {
    /// Largest absolute difference.
    pub max_abs: f64,
    /// Largest absolute value of the reference, for scale.
    pub ref_max_abs: f64,
    /// Cosine similarity of the flattened tensors.
    pub cosine: f64,
}

/// Compares two tensors of the same shape elementwise (any numeric type, cast to f64).
pub fn compare(reference: &TractTensor, other: &TractTensor) -> Result<Difference, RunError> {
    if reference.shape() != other.shape() {
        return Err(RunError::Inputs(format!("shapes differ: {:?} vs {:?}", reference.shape(), other.shape())));
    }
    let a = reference.cast_to::<f64>()?;
    let b = other.cast_to::<f64>()?;
    let (a, b) = (a.try_as_plain_ram()?.as_slice::<f64>()?.to_vec(), b.try_as_plain_ram()?.as_slice::<f64>()?.to_vec());
    let (mut max_abs, mut ref_max, mut dot, mut na, mut nb) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        // A NaN or an infinity where the reference has the same one is agreement (a mask of
        // -inf, a 0/0 the model computes on purpose); anywhere else it is a difference that must
        // not vanish in max(). The scale and the cosine are those of the finite values.
        if !(x.is_finite() && y.is_finite()) {
            let same = (x.is_nan() && y.is_nan()) || x == y;
            if !same {
                max_abs = f64::INFINITY;
            }
            continue;
        }
        max_abs = max_abs.max((x - y).abs());
        ref_max = ref_max.max(x.abs());
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    let cosine = if na == 0.0 && nb == 0.0 { 1.0 } else { dot / (na.sqrt() * nb.sqrt()) };
    Ok(Difference { max_abs, ref_max_abs: ref_max, cosine })
}
