//! Inputs to run a model on: the user's `.npz`, completed with seeded random values; seeded
//! noise for data-free statistics; and the `--input-shape` sizes a model is specialised to.

use crate::RunError;
use crate::tract::{Feed, TractTensor, load_npz, random_feed};
use prunec_ir::proto::tensor_shape_proto::{Dimension, dimension::Value as DimValue};
use prunec_ir::proto::{TensorShapeProto, ValueInfoProto, type_proto};
use prunec_ir::{Dim, Graph, Model, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// The graph inputs a caller feeds (not the initializers IR < 4 also lists as inputs).
pub fn runtime_inputs(graph: &Graph) -> Vec<String> {
    graph.inputs.iter().filter(|&&v| graph.value(v).initializer().is_none()).map(|&v| graph.value(v).name.clone()).collect()
}

/// Parses `--input-shape` values (`NAME=1,3,224,224`, or the dims alone for a model with one
/// input) against the model's input names.
pub fn parse_input_shapes(specs: &[String], input_names: &[String]) -> Result<BTreeMap<String, Vec<u64>>, RunError> {
    let mut shapes = BTreeMap::new();
    for spec in specs {
        let (name, dims) = match spec.split_once('=') {
            Some((n, d)) => (n.to_string(), d),
            None if input_names.len() == 1 => (input_names[0].clone(), spec.as_str()),
            None => {
                return Err(RunError::Inputs(format!(
                    "--input-shape `{spec}` needs a name (NAME=DIMS): the model has {} inputs",
                    input_names.len()
                )));
            }
        };
        if !input_names.contains(&name) {
            return Err(RunError::Inputs(format!(
                "--input-shape names `{name}`, which is not a graph input (inputs: {})",
                input_names.join(", ")
            )));
        }
        let dims = dims
            .split(',')
            .map(|d| d.trim().parse::<u64>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| RunError::Inputs(format!("--input-shape `{spec}`: dims must be non-negative integers separated by commas")))?;
        shapes.insert(name, dims);
    }
    Ok(shapes)
}

/// Image sides given to open spatial axes: ImageNet's, and a multiple of 32 as detectors need.
pub const OPEN_IMAGE_SIDE: u64 = 224;
/// Tokens given to an open sequence axis.
pub const OPEN_SEQUENCE: u64 = 16;
/// Samples given to an open axis of a 2-D float signal (audio): one 32 ms frame at 16 kHz.
pub const OPEN_SIGNAL: u64 = 512;

/// Sizes for the inputs `shapes` leaves out whose recorded shape has open axes, chosen so that
/// a run means something: the batch (axis 0) gets 1; an image's open sides (4-D, 1 to 4
/// channels) get [`OPEN_IMAGE_SIDE`]; an integer input's open axes after the batch (token ids,
/// masks) get [`OPEN_SEQUENCE`]; a 2-D float signal gets [`OPEN_SIGNAL`] samples; a 3-D float
/// sequence [`OPEN_SEQUENCE`] steps. The second value names every axis no rule covers (left at
/// 1): a comparison there may be degenerate, and the caller says so.
pub fn open_axis_sizes(model: &Model, shapes: &BTreeMap<String, Vec<u64>>) -> (BTreeMap<String, Vec<u64>>, Vec<String>) {
    let graph = &model.graph;
    let mut sized = shapes.clone();
    let mut unknown = Vec::new();
    for v in runtime_inputs(graph).iter().filter_map(|n| graph.value_by_name(n)).map(|id| graph.value(id)) {
        let Some(shape) = v.shape.as_ref().filter(|_| !shapes.contains_key(&v.name)) else { continue };
        if shape.0.iter().all(|d| d.known().is_some()) {
            continue;
        }
        let rank = shape.rank();
        let float = v.dtype.is_some_and(|t| t.is_float());
        let channels = shape.0.get(1).and_then(|d| d.known());
        let dims = shape
            .0
            .iter()
            .enumerate()
            .map(|(axis, d)| {
                if let Some(n) = d.known() {
                    return n;
                }
                match (axis, rank, float) {
                    (0, _, _) => 1,
                    (2 | 3, 4, true) if channels.is_some_and(|c| (1..=4).contains(&c)) => OPEN_IMAGE_SIDE,
                    (_, _, false) => OPEN_SEQUENCE,
                    (1, 2, true) => OPEN_SIGNAL,
                    (1, 3, true) => OPEN_SEQUENCE,
                    _ => {
                        unknown.push(format!("`{}` axis {axis}", v.name));
                        1
                    }
                }
            })
            .collect();
        sized.insert(v.name.clone(), dims);
    }
    (sized, unknown)
}

/// The user's inputs: the arrays of `path` named like graph inputs, and seeded random values at
/// `shapes` (or the recorded shapes) for the inputs the file lacks, which the second value names.
pub fn given_feed(model: &Model, path: &Path, shapes: &BTreeMap<String, Vec<u64>>, seed: u64) -> Result<(Feed, Vec<String>), RunError> {
    let given = load_npz(path, model)?;
    let generated: Vec<String> = runtime_inputs(&model.graph).into_iter().filter(|n| !given.0.contains_key(n)).collect();
    Ok((random_feed(model, given, shapes, seed)?, generated))
}

/// Seeded synthetic inputs for data-free statistics: the shapes of `shapes` or the recorded
/// ones (open axes sized by [`open_axis_sizes`]), with the batch axis set to `samples` wherever
/// the model declares it open and `shapes` does not give it; image-shaped float inputs are smoothed ([`smooth_image_noise`]).
pub fn noise_feed(model: &Model, shapes: &BTreeMap<String, Vec<u64>>, samples: usize, seed: u64) -> Result<Feed, RunError> {
    let graph = &model.graph;
    let samples = samples.max(1) as u64;
    let mut sized = BTreeMap::new();
    let (realistic, _) = open_axis_sizes(model, shapes);
    for v in runtime_inputs(graph).iter().filter_map(|n| graph.value_by_name(n)).map(|id| graph.value(id)) {
        let declared_batch_open = declared_shape(v).is_some_and(|s| declared_open(s, 0));
        let mut dims: Vec<u64> = match (realistic.get(&v.name), &v.shape) {
            (Some(dims), _) => dims.clone(),
            (None, Some(shape)) => shape.0.iter().map(|d| if let Dim::Known(n) = d { *n } else { 1 }).collect(),
            (None, None) => continue,
        };
        let recorded_open = v.shape.as_ref().and_then(|s| s.0.first()).is_some_and(|d| d.known().is_none());
        // A batch the user pinned with --input-shape stays: the model was folded at that size,
        // and exports that write it into their Reshapes take no other.
        let pinned = shapes.contains_key(&v.name);
        if let Some(batch) = dims.first_mut().filter(|_| (declared_batch_open || recorded_open) && !pinned) {
            *batch = samples;
        }
        sized.insert(v.name.clone(), dims);
    }
    let mut feed = random_feed(model, Feed::default(), &sized, seed)?;
    for tensor in feed.0.values_mut() {
        if let Some(smooth) = smooth_image_noise(tensor) {
            *tensor = smooth;
        }
    }
    Ok(feed)
}

/// Image-shaped (N, C, H, W) float noise made piecewise constant over 8×8 blocks: natural
/// images are smooth, and i.i.d. pixel noise gives convolutions input statistics no real image
/// has (all energy at the highest frequencies).
fn smooth_image_noise(t: &TractTensor) -> Option<TractTensor> {
    const BLOCK: usize = 8;
    let shape = t.shape().to_vec();
    let [_, _, h, w] = shape[..] else { return None };
    if h < 2 * BLOCK || w < 2 * BLOCK {
        return None;
    }
    let values = t.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?;
    let smooth: Vec<f32> = (0..values.len())
        .map(|k| {
            let (plane, y, x) = (k / (h * w), k / w % h, k % w);
            values[plane * h * w + (y / BLOCK * BLOCK) * w + x / BLOCK * BLOCK]
        })
        .collect();
    TractTensor::from_shape(&shape, &smooth).ok()
}

/// The passes specialised the model to `--input-shape`; inputs of another shape would fail
/// inside the model, so say what disagrees instead.
pub fn check_feed_matches_input_shapes(feed: &Feed, shapes: &BTreeMap<String, Vec<u64>>) -> Result<(), RunError> {
    for (name, dims) in shapes {
        let Some(given) = feed.0.get(name) else { continue };
        let given: Vec<u64> = given.shape().iter().map(|&d| d as u64).collect();
        if &given != dims {
            return Err(RunError::Inputs(format!(
                "--inputs gives `{name}` the shape {given:?} but --input-shape says {dims:?}; the model is specialised to \
                 --input-shape, so verify on inputs of that shape (or pass --no-verify); nothing was written"
            )));
        }
    }
    Ok(())
}

/// Makes the model declare the `shapes` sizes of its inputs where it left them open: the passes
/// folded shape arithmetic (and verification ran) at those sizes, so the result is only valid
/// for them, and a runtime should say so at the input, not fail in a Reshape. Returns the
/// inputs whose declaration changed.
pub fn pin_input_shapes(model: &mut Model, shapes: &BTreeMap<String, Vec<u64>>) -> Vec<(String, Vec<u64>)> {
    let graph = &mut model.graph;
    let mut changed = Vec::new();
    for (name, dims) in shapes {
        let Some(id) = graph.value_by_name(name) else { continue };
        // Every record of the input: it may be an output or listed in value_info too.
        let mut pinned = false;
        for record in graph.value_mut(id).records_mut() {
            let Some(shape) = declared_shape_mut(record) else { continue };
            if shape.dim.len() != dims.len() || (0..dims.len()).any(|axis| declared_open(shape, axis)) {
                shape.dim = dims.iter().map(|&d| Dimension { value: Some(DimValue::DimValue(d as i64)), denotation: None }).collect();
                pinned = true;
            }
        }
        if pinned {
            changed.push((name.clone(), dims.clone()));
        }
    }
    if !changed.is_empty() {
        settle_open_records(graph);
    }
    changed
}

/// After pinning: a record that declares an axis open with a non-positive `dim_value` (as
/// PaddlePaddle writes -1) now contradicts the pinned inputs for ONNX's shape inference (it
/// reads -1 as a size), so it takes the size the IR knows there, or no size at all.
fn settle_open_records(graph: &mut prunec_ir::Graph) {
    for id in graph.value_ids().collect::<Vec<_>>() {
        let known: Vec<Option<u64>> = graph.value(id).shape.as_ref().map(|s| s.0.iter().map(|d| d.known()).collect()).unwrap_or_default();
        for record in graph.value_mut(id).records_mut() {
            let Some(shape) = declared_shape_mut(record) else { continue };
            for (axis, d) in shape.dim.iter_mut().enumerate() {
                if matches!(d.value, Some(DimValue::DimValue(n)) if n <= 0) {
                    d.value = known.get(axis).copied().flatten().map(|n| DimValue::DimValue(n as i64));
                }
            }
        }
    }
}

/// The `(input, axis)` pairs of `shapes` that the model declares open: where a result that
/// claims an open interface must work at other sizes than the ones the passes were specialised
/// to.
pub fn open_axes(model: &Model, shapes: &BTreeMap<String, Vec<u64>>) -> Vec<(String, usize)> {
    let graph = &model.graph;
    let mut open = Vec::new();
    for (name, dims) in shapes {
        let Some(declared) = graph.value_by_name(name).and_then(|v| declared_shape(graph.value(v))) else { continue };
        open.extend((0..dims.len()).filter(|&axis| declared_open(declared, axis)).map(|axis| (name.clone(), axis)));
    }
    open
}

/// The shape a value's recorded type declares, if it has one.
fn declared_shape(v: &Value) -> Option<&TensorShapeProto> {
    match v.info.as_ref()?.r#type.as_ref()?.value.as_ref()? {
        type_proto::Value::TensorType(t) => t.shape.as_ref(),
        _ => None,
    }
}

/// The shape a record declares, to change.
fn declared_shape_mut(info: &mut ValueInfoProto) -> Option<&mut TensorShapeProto> {
    match info.r#type.as_mut()?.value.as_mut()? {
        type_proto::Value::TensorType(t) => t.shape.as_mut(),
        _ => None,
    }
}

/// Whether a declared axis is open: no size, a symbolic one, or a non-positive `dim_value`
/// (PaddlePaddle writes an open size as -1).
fn declared_open(shape: &TensorShapeProto, axis: usize) -> bool {
    !shape.dim.get(axis).is_some_and(|d| matches!(d.value, Some(DimValue::DimValue(n)) if n > 0))
}

/// The feed as batches of the size the model's inputs declare (in their recorded types) on
/// their first axis: every fed input that has k times its declared fixed first size (the same
/// k for all) is cut into k pieces, and inputs fed at their declared size (FLUX's position ids,
/// without a batch axis) go whole into every batch. `None` when the feed fits as it is. Exports traced at batch 1
/// write that 1 into their Reshapes (ShuffleNet's channel shuffle), so 8 calibration images
/// must go through them one at a time.
pub fn split_into_batches(model: &Model, feed: &Feed) -> Option<Vec<Feed>> {
    let graph = &model.graph;
    let mut pieces: Option<usize> = None;
    let mut split: BTreeMap<&str, usize> = BTreeMap::new();
    for (name, tensor) in &feed.0 {
        // The size the model's interface declares, not one inference found at --input-shape
        // sizes: a result claiming an open batch must run a larger batch whole.
        let declared = graph.value_by_name(name).and_then(|v| declared_shape(graph.value(v))).and_then(|s| match s.dim.first()?.value {
            Some(DimValue::DimValue(n)) if n > 0 => Some(n as usize),
            _ => None,
        });
        let (Some(declared), Some(&given)) = (declared, tensor.shape().first()) else { continue };
        if declared == 0 || given == declared {
            continue;
        }
        if given % declared != 0 || *pieces.get_or_insert(given / declared) != given / declared {
            return None;
        }
        split.insert(name, declared);
    }
    let pieces = pieces?;
    (0..pieces)
        .map(|k| {
            let part = feed.0.iter().map(|(n, t)| match split.get(n.as_str()) {
                Some(&size) => Some((n.clone(), t.slice(0, k * size, (k + 1) * size).ok()?)),
                None => Some((n.clone(), t.clone())),
            });
            part.collect::<Option<BTreeMap<_, _>>>().map(Feed)
        })
        .collect()
}

/// The first `samples` samples of `feed`: every input fed along a batch axis (its recorded
/// first size open, or fixed at `d` and fed `k·d`) keeps its first `samples · d` rows (`d` = 1
/// where open); inputs fed at their recorded size go whole. Also returns how many samples were
/// kept, or `None` when the feed was no larger.
pub fn first_samples(model: &Model, feed: &Feed, samples: usize) -> (Feed, Option<usize>) {
    let graph = &model.graph;
    let mut kept = None;
    let mut out = Feed::default();
    for (name, tensor) in &feed.0 {
        let recorded = graph.value_by_name(name).and_then(|v| graph.value(v).shape.as_ref()).and_then(|s| s.0.first().cloned());
        let given = tensor.shape().first().copied();
        let per_sample = match (recorded, given) {
            (Some(Dim::Known(d)), Some(g)) if d > 0 && g as u64 > d && (g as u64).is_multiple_of(d) => Some(d as usize),
            (Some(Dim::Sym(_) | Dim::Unknown), Some(_)) => Some(1),
            _ => None,
        };
        let cut = per_sample.and_then(|d| Some((d, given?))).filter(|&(d, g)| samples.max(1) * d < g);
        match cut.and_then(|(d, _)| Some((d, tensor.slice(0, 0, samples.max(1) * d).ok()?))) {
            Some((_, part)) => {
                kept = Some(samples.max(1));
                out.0.insert(name.clone(), part);
            }
            None => {
                out.0.insert(name.clone(), tensor.clone());
            }
        }
    }
    (out, kept)
}
