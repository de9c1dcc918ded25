//! Removing layers: the residual sum becomes its skip, then dead-code elimination.
//!
//! The splice is exact: every reader of `y = x + f(x)` reads `x` instead (where `y` is a graph
//! output or a subgraph reads it by name, an `Identity(x)` takes the Add's place so the name
//! stays), and the branch, now unread, goes with the weights only it used. Shapes do not change
//! (`shape(y) == shape(x)` is a condition of detection), so no recorded shape goes stale.

use super::detect::{BlockReport, Layer, Region};
use crate::PassError;
use crate::cleanup::remove_dead_code;
use prunec_ir::{Edge, Model, Op, OpId, Tensor, ValueId, ValueKind};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// What to remove.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Selection {
    /// A whole layer, by [`Layer::index`].
    Layer(usize),
    /// One sub-block (an attention or an MLP) of a layer, by its position in
    /// [`Layer::sub_blocks`].
    SubBlock {
        /// The layer.
        layer: usize,
        /// The sub-block.
        sub_block: usize,
    },
}

/// How the survivors stand for the removed layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Merge {
    /// The removed layers are gone; survivors keep their weights.
    #[default]
    Identity,
    /// Each surviving layer becomes the element-wise mean of itself and the removed layers it
    /// stands for (the nearest survivor before them in their stack, else the one after), as
    /// Amber-Image's local weight averaging: every weight of [`Layer::weights`], position by
    /// position (weights a layer shares with others, such as an exporter's deduplicated
    /// constants, are not its own and stay). Not function-preserving: the result needs
    /// distillation.
    Average,
}

/// What [`remove`] did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Removal {
    /// Residual sums spliced out, by Add name.
    pub spliced: Vec<String>,
    /// Ops deleted (the Adds and everything only they made live).
    pub ops_removed: usize,
    /// Values deleted, weights included.
    pub values_removed: usize,
    /// For `Merge::Average`: each survivor and the removed layers averaged into it.
    pub merged: Vec<(usize, Vec<usize>)>,
}

/// Removes the selected layers and sub-blocks of `report` from `model`.
pub fn remove(model: &mut Model, report: &BlockReport, which: &[Selection]) -> Result<Removal, PassError> {
    remove_with(model, report, which, Merge::Identity)
}

/// [`remove`], with a choice of what the survivors become.
pub fn remove_with(model: &mut Model, report: &BlockReport, which: &[Selection], merge: Merge) -> Result<Removal, PassError> {
    let regions = selected_regions(model, report, which)?;
    let mut removal = Removal::default();
    if merge == Merge::Average {
        removal.merged = average_into_survivors(model, report, which)?;
    }
    for region in regions {
        splice(model, region)?;
        removal.spliced.push(region.add.clone());
    }
    let cleaned = remove_dead_code(model);
    removal.ops_removed = cleaned.ops_removed;
    removal.values_removed = cleaned.values_removed;
    Ok(removal)
}

/// The regions `which` names, in report order, each once; checked against the model.
pub(crate) fn selected_regions<'r>(model: &Model, report: &'r BlockReport, which: &[Selection]) -> Result<Vec<&'r Region>, PassError> {
    let mut chosen: BTreeSet<(usize, usize)> = BTreeSet::new();
    for &selection in which {
        let (index, sub) = match selection {
            Selection::Layer(layer) => (layer, None),
            Selection::SubBlock { layer, sub_block } => (layer, Some(sub_block)),
        };
        let layer =
            report.layers.get(index).ok_or_else(|| PassError::NoSuchBlock(format!("layer {index} (there are {})", report.layers.len())))?;
        match sub {
            None => chosen.extend((0..layer.sub_blocks.len()).map(|s| (index, s))),
            Some(s) if s < layer.sub_blocks.len() => {
                chosen.insert((index, s));
            }
            Some(s) => {
                return Err(PassError::NoSuchBlock(format!("sub-block {s} of layer {index} (it has {})", layer.sub_blocks.len())));
            }
        }
    }
    let ops: BTreeSet<OpId> = model.graph.op_ids().collect();
    let mut regions = Vec::new();
    for (layer, sub) in chosen {
        for region in &report.layers[layer].sub_blocks[sub].regions {
            let graph = &model.graph;
            let matches = ops.contains(&region.add_op)
                && graph.op(region.add_op).op_type == "Add"
                && graph.op_input(region.add_op, 1 - region.skip_slot) == Some(region.branch_value);
            if !matches {
                return Err(PassError::StaleBlockReport(format!("`{}` is not the residual sum the report found", region.add)));
            }
            regions.push(region);
        }
    }
    Ok(regions)
}

/// Makes the readers of the region's sum read its skip.
fn splice(model: &mut Model, region: &Region) -> Result<(), PassError> {
    let graph = &mut model.graph;
    let add = region.add_op;
    let stale = || PassError::StaleBlockReport(format!("`{}` lost an input or its output", region.add));
    // Read now, not from the report: an earlier splice may have moved this sum's skip.
    let skip = graph.op_input(add, region.skip_slot).ok_or_else(stale)?;
    let sum = graph.op_output(add, 0).ok_or_else(stale)?;
    let readers = graph.consumers(sum);
    if graph.is_output(sum) || readers.iter().any(|(_, edge)| *edge == Edge::Captured) {
        // The name is the interface (or a subgraph's reference): keep it, computed by an Identity.
        let old = graph.remove_op(add);
        let identity = Op { op_type: "Identity".into(), domain: String::new(), attributes: Vec::new(), ..old };
        graph.add_op(identity, &[Some(skip)], &[Some(sum)]).map_err(|e| PassError::StaleBlockReport(e.to_string()))?;
        return Ok(());
    }
    for (reader, edge) in readers {
        if let Edge::Input(slot) = edge {
            graph.set_op_input(reader, slot, skip);
        }
    }
    Ok(())
}

/// For `Merge::Average`: writes into each surviving layer the mean of its weights and those of
/// the removed layers it stands for.
fn average_into_survivors(model: &mut Model, report: &BlockReport, which: &[Selection]) -> Result<Vec<(usize, Vec<usize>)>, PassError> {
    let mut removed: BTreeSet<usize> = BTreeSet::new();
    for &selection in which {
        match selection {
            Selection::Layer(l) => {
                removed.insert(l);
            }
            Selection::SubBlock { layer, .. } => {
                return Err(PassError::Merge(format!("layer {layer}: averaging stands whole layers for whole layers, not sub-blocks")));
            }
        }
    }
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &gone in &removed {
        let layer = report.layers.get(gone).ok_or_else(|| PassError::NoSuchBlock(format!("layer {gone}")))?;
        let stack = report.stacks.get(layer.stack).ok_or_else(|| PassError::StaleBlockReport(format!("stack {}", layer.stack)))?;
        let earlier = stack.layers.get(..layer.position).ok_or_else(|| PassError::StaleBlockReport(format!("layer {gone}'s position")))?;
        let before = earlier.iter().rev().find(|l| !removed.contains(l));
        let after = stack.layers.get(layer.position + 1..).and_then(|rest| rest.iter().find(|l| !removed.contains(l)));
        let survivor = before.or(after).ok_or_else(|| {
            PassError::Merge(format!("layer {gone}: every layer of its stack {} is removed, none can stand for it", layer.stack))
        })?;
        groups.entry(*survivor).or_default().push(gone);
    }
    // Everything is computed and every target found before anything is written: an error
    // leaves the model as it was.
    let mut writes = Vec::new();
    for (&survivor, gone) in &groups {
        for (value, tensor) in mean_weights(model, report, survivor, gone)? {
            writes.push((weight_slot(model, value)?, tensor));
        }
    }
    for (slot, tensor) in writes {
        write_slot(model, slot, tensor);
    }
    Ok(groups.into_iter().collect())
}

/// Writes `tensor` where the constant behind `v` is stored (an initializer, or a Constant node
/// behind Identity nodes): how the averaging reference repeats the pass's writes by name.
pub(crate) fn write_weight(model: &mut Model, v: ValueId, tensor: Tensor) -> Result<(), PassError> {
    let slot = weight_slot(model, v)?;
    write_slot(model, slot, tensor);
    Ok(())
}

fn write_slot(model: &mut Model, slot: WeightSlot, tensor: Tensor) {
    match slot {
        WeightSlot::Initializer(v) => model.graph.set_initializer(v, tensor),
        WeightSlot::Constant(op, name) => {
            if let Some(a) = model.graph.op_mut(op).attributes.iter_mut().find(|a| a.name() == "value") {
                a.tensor = Some(tensor.renamed(&name));
            }
        }
    }
}

/// The survivor's weights averaged with the removed layers', keyed by the survivor's values.
fn mean_weights(model: &Model, report: &BlockReport, survivor: usize, gone: &[usize]) -> Result<Vec<(ValueId, Tensor)>, PassError> {
    let graph = &model.graph;
    let layer_of = |l: usize| report.layers.get(l).ok_or_else(|| PassError::StaleBlockReport(format!("no layer {l}")));
    let keep: &Layer = layer_of(survivor)?;
    let mut sums: Vec<Vec<f64>> = Vec::with_capacity(keep.weights.len());
    for &w in &keep.weights {
        sums.push(float_values(model, w, survivor)?);
    }
    for &g in gone {
        let layer = layer_of(g)?;
        if layer.signature_text != keep.signature_text || layer.weights.len() != keep.weights.len() {
            return Err(PassError::Merge(format!(
                "layers {survivor} and {g} differ in structure (signatures {} and {})",
                keep.signature, layer.signature
            )));
        }
        for (k, (&w, &mine)) in layer.weights.iter().zip(&keep.weights).enumerate() {
            let values = float_values(model, w, g)?;
            if values.len() != sums[k].len() || dims(model, w) != dims(model, mine) {
                return Err(PassError::Merge(format!(
                    "weight `{}` of layer {g} is {:?}, but `{}` of layer {survivor} is {:?}",
                    graph.value(w).name,
                    dims(model, w),
                    graph.value(mine).name,
                    dims(model, mine)
                )));
            }
            for (s, v) in sums[k].iter_mut().zip(values) {
                *s += v;
            }
        }
    }
    let count = (gone.len() + 1) as f64;
    Ok(keep
        .weights
        .iter()
        .zip(sums)
        .map(|(&w, sum)| {
            let data: Vec<f32> = sum.into_iter().map(|s| (s / count) as f32).collect();
            (w, Tensor::from_f32(&graph.value(w).name, &dims(model, w), &data))
        })
        .collect())
}

fn dims(model: &Model, v: ValueId) -> Vec<u64> {
    prunec_ir::constant_tensor(&model.graph, v).map(Tensor::dims).unwrap_or_default()
}

fn float_values(model: &Model, v: ValueId, layer: usize) -> Result<Vec<f64>, PassError> {
    let tensor = prunec_ir::constant_tensor(&model.graph, v)
        .ok_or_else(|| PassError::StaleBlockReport(format!("weight `{}` of layer {layer} is not a constant", model.graph.value(v).name)))?;
    if tensor.dtype() != prunec_ir::DType::F32 {
        return Err(PassError::Merge(format!("weight `{}` of layer {layer} is {}, averaging handles f32", tensor.name(), tensor.dtype())));
    }
    tensor.to_f64_vec().ok_or_else(|| PassError::Merge(format!("weight `{}` of layer {layer} cannot be read", tensor.name())))
}

/// Where a weight is stored.
enum WeightSlot {
    /// A private initializer.
    Initializer(ValueId),
    /// The `value` of a Constant node, and the name of its output.
    Constant(OpId, String),
}

/// Where the constant behind `v` is stored (an initializer or a Constant node, possibly behind
/// Identity nodes), if it can be changed there.
fn weight_slot(model: &Model, mut v: ValueId) -> Result<WeightSlot, PassError> {
    let graph = &model.graph;
    loop {
        if let ValueKind::Initializer(_) = graph.value(v).kind {
            if !graph.is_private_initializer(v) {
                return Err(PassError::Merge(format!("weight `{}` is part of the model's interface", graph.value(v).name)));
            }
            return Ok(WeightSlot::Initializer(v));
        }
        let Some((op, _)) = graph.producer(v) else { break };
        match graph.op(op).op_type.as_str() {
            "Identity" => v = graph.op_input(op, 0).ok_or_else(|| PassError::Merge("an Identity without input".into()))?,
            "Constant" if graph.op(op).attributes.iter().any(|a| a.name() == "value") => {
                return Ok(WeightSlot::Constant(op, graph.value(v).name.clone()));
            }
            _ => break,
        }
    }
    Err(PassError::Merge(format!("weight `{}` is not an initializer or a Constant value", graph.value(v).name)))
}
