//! The gate score of adaLN-gated blocks (DiT, MMDiT) over a grid of timesteps.
//!
//! A gated residual `x + g ⊙ f(x)` writes into the stream in proportion to its gate `g`, which
//! the modulation subgraph computes from the timestep embedding (and, for FLUX and SD3, a pooled
//! text embedding). A block whose gates stay small at every timestep matters little; one whose
//! gates are large late in sampling matters then, so the score is taken over the timesteps a
//! sampler visits, not at the one timestep of a feed.
//!
//! The timestep is the graph input of rank ≤ 1 that reaches the gates (named like `time…` when
//! several do). For each of [`GRID`] timesteps spanning its range, a copy of the model reads
//! that timestep as a constant instead of the input, and the gate values are captured through
//! the measuring service; everything else the modulation reads keeps the feed's values (the
//! given inputs, or noise). Only the modulation subgraph runs: a capture computes what its
//! probes depend on.

use super::detect::Layer;
use crate::measure::{Activation, Measure};
use prunec_ir::{DType, Model, Tensor, ValueId, ValueKind, constant_tensor};
use serde::Serialize;
use std::collections::BTreeSet;

/// Timesteps in the grid.
pub const GRID: usize = 8;

/// The gates of every layer over a grid of timesteps.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GateGrid {
    /// The graph input the grid replaces.
    pub input: String,
    /// The timesteps, ascending.
    pub timesteps: Vec<f64>,
    /// Why this range: read off the feed's timestep.
    pub range_note: String,
    /// One entry per layer, in order.
    pub layers: Vec<LayerGates>,
}

/// One layer's gates over the grid.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerGates {
    /// The layer.
    pub layer: usize,
    /// At each timestep, the mean over the layer's gated branches of the gate's RMS (empty for a
    /// layer without gated branches).
    pub per_timestep: Vec<f64>,
    /// The mean over the grid (`None` without gated branches).
    pub mean: Option<f64>,
    /// The largest over the grid.
    pub max: Option<f64>,
}

/// Why the gates cannot be evaluated over timesteps.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum GridError {
    /// No layer has a gated residual.
    #[error("no layer of this model has a gated residual")]
    NoGates,
    /// No graph input that could be a timestep reaches the gates.
    #[error("no graph input of rank 0 or 1 reaches the gates (no timestep input)")]
    NoTimestep,
    /// Several inputs could be the timestep and none is named like one.
    #[error("several inputs of rank 0 or 1 reach the gates and none is named like a timestep: {0}")]
    Ambiguous(String),
    /// The timestep input is not float32.
    #[error("the timestep input `{0}` is {1}, not float32")]
    NotF32(String, String),
    /// The measurement failed.
    #[error("{0}")]
    Measure(String),
}

/// The timestep input of `model`: a graph input (not an initializer) of rank 0 or 1 whose value
/// reaches some gate of `layers`; of several, the one whose name contains `time` (a FLUX-dev
/// `guidance` reaches the gates too).
pub fn timestep_input(model: &Model, layers: &[Layer]) -> Result<ValueId, GridError> {
    let graph = &model.graph;
    let gates: Vec<ValueId> =
        layers.iter().flat_map(|l| l.sub_blocks.iter().flat_map(|s| &s.regions)).filter_map(|r| r.gate_value).collect();
    if gates.is_empty() {
        return Err(GridError::NoGates);
    }
    // Every value the gates depend on.
    let mut seen: BTreeSet<ValueId> = BTreeSet::new();
    let mut stack = gates;
    while let Some(v) = stack.pop() {
        if !seen.insert(v) {
            continue;
        }
        if let Some((op, _)) = graph.producer(v) {
            stack.extend(graph.op_inputs(op).into_iter().flatten());
            stack.extend(graph.op_captures(op));
        }
    }
    let candidates: Vec<ValueId> = graph
        .inputs
        .iter()
        .copied()
        .filter(|&v| seen.contains(&v) && matches!(graph.value(v).kind, ValueKind::Input))
        .filter(|&v| graph.value(v).shape.as_ref().is_some_and(|s| s.rank() <= 1))
        .collect();
    let named: Vec<ValueId> = candidates.iter().copied().filter(|&v| graph.value(v).name.to_lowercase().contains("time")).collect();
    let chosen = match (&candidates[..], &named[..]) {
        ([], _) => return Err(GridError::NoTimestep),
        ([only], _) | (_, [only]) => *only,
        _ => {
            let names: Vec<String> = candidates.iter().map(|&v| format!("`{}`", graph.value(v).name)).collect();
            return Err(GridError::Ambiguous(names.join(", ")));
        }
    };
    match graph.value(chosen).dtype {
        Some(DType::F32) => Ok(chosen),
        other => Err(GridError::NotF32(graph.value(chosen).name.clone(), other.map_or("of unknown type".into(), |d| d.to_string()))),
    }
}

/// The grid: diffusers' flow-matching FLUX and Qwen-Image take `t ∈ [0, 1]` and scale it by
/// 1000 inside, SD3's and DiT's take `t ∈ [0, 1000]`. Which one a model uses is read off given
/// inputs (a timestep above 1 means the wide range); on noise, whose values say nothing, off the
/// graph (`scaled`: the timestep is multiplied by a constant of at least 100 before use).
pub fn grid_for(given: Option<&[f32]>, scaled: bool) -> (Vec<f64>, String) {
    let (top, why) = match given {
        Some(values) => {
            let largest = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            if largest <= 1.0 {
                (1.0, format!("[0, 1]: the given timestep is at most 1 ({largest})"))
            } else {
                (1000.0, format!("[0, 1000]: the given timestep exceeds 1 ({largest})"))
            }
        }
        None if scaled => (1.0, "[0, 1]: the model multiplies the timestep by at least 100 itself".to_string()),
        None => (1000.0, "[0, 1000]: the model does not scale the timestep itself".to_string()),
    };
    ((0..GRID).map(|i| top * i as f64 / (GRID - 1) as f64).collect(), why)
}

/// Whether `input` is multiplied by a constant of magnitude at least 100 before anything else
/// reads it (through casts and reshapes): a model that takes `t ∈ [0, 1]` and scales it.
fn scaled_inside(model: &Model, input: ValueId) -> bool {
    let graph = &model.graph;
    let mut frontier = vec![input];
    for _ in 0..4 {
        let mut next = Vec::new();
        for v in frontier {
            for (op, _) in graph.consumers(v) {
                let o = graph.op(op);
                match o.op_type.as_str() {
                    "Mul" => {
                        let large = graph.op_inputs(op).into_iter().flatten().filter(|&w| w != v).any(|w| {
                            constant_tensor(graph, w)
                                .and_then(Tensor::to_f32_vec)
                                .is_some_and(|c| !c.is_empty() && c.iter().all(|x| x.abs() >= 100.0))
                        });
                        if large {
                            return true;
                        }
                    }
                    "Cast" | "Unsqueeze" | "Reshape" | "Expand" | "Identity" | "Squeeze" => {
                        next.extend(graph.op_outputs(op).into_iter().flatten())
                    }
                    _ => {}
                }
            }
        }
        frontier = next;
    }
    false
}

/// A copy of `model` whose ops read the constant timestep `t` (of `shape`) instead of the input
/// `input`. The input stays in the graph, unread, so the copy takes the same feed. (A read
/// inside a subgraph, a capture, would still see the feed's timestep; none of the shared
/// diffusion transformers has one.)
pub fn at_timestep(model: &Model, input: ValueId, shape: &[usize], t: f32) -> Model {
    let mut copy = model.clone();
    let graph = &mut copy.graph;
    let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let count = shape.iter().product::<usize>();
    let name = format!("{}_grid", graph.value(input).name);
    let constant = graph.add_initializer(&name, Tensor::from_f32("", &dims, &vec![t; count]));
    for (op, _) in graph.consumers(input) {
        graph.replace_input(op, input, constant);
    }
    copy
}

/// RMS over all elements.
fn rms(a: &Activation) -> f64 {
    if a.values.is_empty() {
        return 0.0;
    }
    (a.values.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / a.values.len() as f64).sqrt()
}

/// The gates of `layers` (found in `model`) over the grid, measured through `measure`.
/// `noise`: the feed is synthetic, so its timestep says nothing of the model's range.
pub fn gate_grid(model: &Model, layers: &[Layer], measure: &mut dyn Measure, noise: bool) -> Result<GateGrid, GridError> {
    let input = timestep_input(model, layers)?;
    let graph = &model.graph;
    let name = graph.value(input).name.clone();
    let fed = measure.capture(model, &[input]).map_err(|e| GridError::Measure(e.to_string()))?;
    let given = fed.get(&input).ok_or_else(|| GridError::Measure(format!("the feed has no value for `{name}`")))?;
    let (timesteps, range_note) = grid_for((!noise).then_some(&given.values[..]), scaled_inside(model, input));
    let per_layer_gates: Vec<Vec<ValueId>> =
        layers.iter().map(|l| l.sub_blocks.iter().flat_map(|s| &s.regions).filter_map(|r| r.gate_value).collect()).collect();
    let probes: Vec<ValueId> = per_layer_gates.iter().flatten().copied().collect::<BTreeSet<_>>().into_iter().collect();
    let mut per: Vec<Vec<f64>> = vec![Vec::with_capacity(GRID); layers.len()];
    for &t in &timesteps {
        let copy = at_timestep(model, input, &given.shape, t as f32);
        let captured = measure.capture(&copy, &probes).map_err(|e| GridError::Measure(e.to_string()))?;
        for (l, gates) in per_layer_gates.iter().enumerate() {
            if gates.is_empty() {
                continue;
            }
            let mut sum = 0.0;
            for g in gates {
                let a =
                    captured.get(g).ok_or_else(|| GridError::Measure(format!("the gate `{}` was not computed", graph.value(*g).name)))?;
                sum += rms(a);
            }
            per[l].push(sum / gates.len() as f64);
        }
    }
    let layers = layers
        .iter()
        .zip(per)
        .map(|(l, per_timestep)| {
            let mean = (!per_timestep.is_empty()).then(|| per_timestep.iter().sum::<f64>() / per_timestep.len() as f64);
            let max = per_timestep.iter().copied().reduce(f64::max);
            LayerGates { layer: l.index, per_timestep, mean, max }
        })
        .collect();
    Ok(GateGrid { input: name, timesteps, range_note, layers })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grid_spans_the_range_the_feed_implies() {
        let (unit, _) = grid_for(Some(&[0.5][..]), false);
        assert_eq!(unit.len(), GRID);
        assert_eq!((unit[0], unit[GRID - 1]), (0.0, 1.0));
        let (wide, note) = grid_for(Some(&[500.0][..]), true);
        assert_eq!(wide[GRID - 1], 1000.0, "the given value decides: {note}");
        assert!(wide.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(grid_for(None, true).0[GRID - 1], 1.0);
        assert_eq!(grid_for(None, false).0[GRID - 1], 1000.0);
    }
}
