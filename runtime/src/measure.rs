//! The measuring service in tract: what [`prunec_passes::Measure`] promises a pass, on the
//! user's inputs or on seeded synthetic ones.
//!
//! A capture runs a scratch copy of the model cut down to what its probes depend on; a stepwise
//! walk (OBSPA's refit, level by level) runs it in pieces, each computing only what earlier
//! pieces have not and feeding their cached values back as inputs.

use crate::RunError;
use crate::inputs::noise_feed;
use crate::tract::{Feed, Plan, TractTensor};
use prunec_ir::{Model, OpId, ValueId};
use prunec_passes::{Activation, Inputs, Measure, MeasureError, Runtime, Stepwise};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

/// The user's inputs, and where they came from.
#[derive(Clone, Debug)]
pub struct GivenInputs {
    /// The feed (every graph input: arrays of the file, seeded random values for the rest).
    pub feed: Feed,
    /// For reports: the file, quoted.
    pub source: String,
}

/// The runtime a pipeline's passes measure through: tract, on the given inputs or on noise.
#[derive(Clone, Debug, Default)]
pub struct TractRuntime {
    /// Where the model's external data is found.
    pub dir: PathBuf,
    /// `--inputs`, when given.
    pub given: Option<GivenInputs>,
    /// `--input-shape`: sizes of synthetic inputs.
    pub input_shapes: BTreeMap<String, Vec<u64>>,
}

impl Runtime for TractRuntime {
    fn has_inputs(&self) -> bool {
        self.given.is_some()
    }

    fn measure<'a>(&'a mut self, model: &Model, inputs: Inputs) -> Result<Box<dyn Measure + 'a>, MeasureError> {
        let (feed, source) = match inputs {
            Inputs::Given => match &self.given {
                Some(g) => (g.feed.clone(), g.source.clone()),
                None => return Err(MeasureError::Unavailable("no inputs were given (--inputs FILE.npz)".into())),
            },
            Inputs::GivenFirst { samples } => match &self.given {
                Some(g) => {
                    let (feed, kept) = crate::inputs::first_samples(model, &g.feed, samples);
                    let source = match kept {
                        Some(kept) => format!("the first {kept} samples of {}", g.source),
                        None => g.source.clone(),
                    };
                    (feed, source)
                }
                None => return Err(MeasureError::Unavailable("no inputs were given (--inputs FILE.npz)".into())),
            },
            Inputs::Noise { samples, seed } => {
                let feed = noise_feed(model, &self.input_shapes, samples, seed).map_err(|e| MeasureError::Run(e.to_string()))?;
                let shapes: Vec<String> = feed.0.iter().map(|(n, t)| format!("{n}{:?}", t.shape())).collect();
                let source = format!(
                    "noise: seeded uniform inputs, piecewise constant over 8×8 pixel blocks for images (seed {seed}) {}",
                    shapes.join(", ")
                );
                (feed, source)
            }
        };
        Ok(Box::new(TractMeasure::new(&self.dir, model, feed, source)))
    }
}

/// One measurement: a feed, run in tract, in batches the model takes.
pub struct TractMeasure {
    dir: PathBuf,
    /// The feed, split along the first axis where the model declares a smaller fixed batch
    /// than it has; one element otherwise.
    batches: Vec<Feed>,
    source: String,
}

impl TractMeasure {
    /// A measurement of `model` on `feed` (external data relative to `dir`). A feed of more
    /// samples than the model's fixed batch (8 calibration images for an export traced at
    /// batch 1, whose Reshapes say 1) runs in batches of that size, and what each captures is
    /// concatenated along the first axis.
    pub fn new(dir: &Path, model: &Model, feed: Feed, source: String) -> TractMeasure {
        let batches = crate::inputs::split_into_batches(model, &feed).unwrap_or_else(|| vec![feed]);
        TractMeasure { dir: dir.to_path_buf(), batches, source }
    }
}

/// What the batches captured, as one capture of the whole feed: each value's parts
/// concatenated along the first axis, or kept once where every batch computed the same (a value
/// that does not depend on the inputs).
fn concatenate(parts: Vec<BTreeMap<ValueId, Activation>>) -> BTreeMap<ValueId, Activation> {
    let mut parts = parts.into_iter();
    let Some(mut whole) = parts.next() else { return BTreeMap::new() };
    let rest: Vec<_> = parts.collect();
    for (v, first) in whole.iter_mut() {
        let others: Vec<&Activation> = rest.iter().filter_map(|p| p.get(v)).collect();
        if others.iter().all(|o| o.shape == first.shape && o.values == first.values) {
            continue;
        }
        for o in others {
            if let Some(n) = first.shape.first_mut() {
                *n += o.shape.first().copied().unwrap_or(0);
            }
            first.values.extend_from_slice(&o.values);
        }
    }
    whole
}

impl Measure for TractMeasure {
    fn source(&self) -> &str {
        &self.source
    }

    fn capture(&mut self, model: &Model, probes: &[ValueId]) -> Result<BTreeMap<ValueId, Activation>, MeasureError> {
        let graph = &model.graph;
        let mut parts = Vec::new();
        for feed in &self.batches {
            let run = run_probed(model.clone(), &self.dir, feed, probes.iter().copied()).map_err(run_error)?;
            let mut captured = BTreeMap::new();
            for &v in probes {
                let name = &graph.value(v).name;
                if let Some(x) = run.get(name).or_else(|| feed.0.get(name)) {
                    captured.insert(v, activation(x).map_err(run_error)?);
                }
            }
            parts.push(captured);
        }
        Ok(concatenate(parts))
    }

    fn stepwise<'a>(&'a mut self, model: &Model) -> Box<dyn Stepwise + 'a> {
        let pieces = self.batches.iter().map(|_| Pieces::new(model)).collect();
        Box::new(Walk { pieces, measure: self })
    }
}

/// A stepwise walk per batch.
struct Walk<'a> {
    pieces: Vec<Pieces>,
    measure: &'a TractMeasure,
}

impl Stepwise for Walk<'_> {
    fn capture(&mut self, model: &Model, probes: &[ValueId]) -> Result<BTreeMap<ValueId, Activation>, MeasureError> {
        let mut parts = Vec::new();
        for (pieces, feed) in self.pieces.iter_mut().zip(&self.measure.batches) {
            parts.push(pieces.capture(model, &self.measure.dir, feed, probes).map_err(run_error)?);
        }
        Ok(concatenate(parts))
    }
}

fn run_error(e: RunError) -> MeasureError {
    MeasureError::Run(e.to_string())
}

/// A tensor as an [`Activation`] (cast to f32).
fn activation(t: &TractTensor) -> Result<Activation, RunError> {
    let t = t.cast_to::<f32>().map_err(|e| RunError::Inputs(e.to_string()))?;
    let values =
        t.try_as_plain_ram().and_then(|r| r.as_slice::<f32>().map(<[f32]>::to_vec)).map_err(|e| RunError::Inputs(e.to_string()))?;
    Ok(Activation { shape: t.shape().to_vec(), values })
}

/// Runs a model piece by piece as a refit walks its levels: each run computes only what its
/// probes need and has not been computed before, and keeps what later pieces will read.
///
/// Between two runs only the layers of the level just measured change, and no value a run
/// computes depends on a layer of its own level or later (levels are longest paths of dense
/// layers), so every value computed stays valid for the rest of the refit. Values that do not
/// depend on the graph's inputs (weights, shape arithmetic) are recomputed, never fed back, so
/// tract still sees them as constants.
struct Pieces {
    /// Values known for good that ops not run yet still read.
    cache: BTreeMap<ValueId, TractTensor>,
    /// Ops some run has computed.
    done: HashSet<OpId>,
    /// Values that depend on the values (not only the sizes) of a graph input.
    dynamic: HashSet<ValueId>,
}

impl Pieces {
    fn new(model: &Model) -> Pieces {
        let graph = &model.graph;
        let mut dynamic: HashSet<ValueId> = graph.inputs.iter().copied().filter(|&v| graph.value(v).initializer().is_none()).collect();
        for op in graph.topo_order().unwrap_or_default() {
            // Sizes are fixed by the feed: shape arithmetic stays constant to tract.
            let reads_sizes_only = matches!(graph.op(op).op_type.as_str(), "Shape" | "Size");
            let reads_data = graph.op_inputs(op).into_iter().flatten().chain(graph.op_captures(op)).any(|v| dynamic.contains(&v));
            if reads_data && !reads_sizes_only {
                dynamic.extend(graph.op_outputs(op).into_iter().flatten());
            }
        }
        Pieces { cache: BTreeMap::new(), done: HashSet::new(), dynamic }
    }

    /// The values `probes` of `model` (the walk's model, as changed so far).
    fn capture(&mut self, model: &Model, dir: &Path, feed: &Feed, probes: &[ValueId]) -> Result<BTreeMap<ValueId, Activation>, RunError> {
        let graph = &model.graph;
        // The ops to run: back from the probes, stopping at graph inputs and cached values.
        let mut needed: HashSet<OpId> = HashSet::new();
        let mut boundary: BTreeSet<ValueId> = BTreeSet::new();
        let mut stack: Vec<ValueId> = probes.to_vec();
        let mut seen = HashSet::new();
        while let Some(v) = stack.pop() {
            if !seen.insert(v) {
                continue;
            }
            if self.cache.contains_key(&v) {
                boundary.insert(v);
            } else if let Some((op, _)) = graph.producer(v)
                && needed.insert(op)
            {
                stack.extend(graph.op_inputs(op).into_iter().flatten().chain(graph.op_captures(op)));
            }
        }
        // A cached value whose op runs anyway (for another of its outputs) is recomputed.
        boundary.retain(|&v| graph.producer(v).is_none_or(|(op, _)| !needed.contains(&op)));
        let mut piece = model.clone();
        let wanted = probes.iter().copied().filter(|v| !graph.inputs.contains(v) && !self.cache.contains_key(v));
        // What later pieces will read: outputs of this piece's ops that other ops consume.
        let kept_for_later = needed.iter().flat_map(|&op| graph.op_outputs(op).into_iter().flatten()).filter(|&v| {
            self.dynamic.contains(&v)
                && graph.consumers(v).iter().any(|(reader, _)| !needed.contains(reader) && !self.done.contains(reader))
        });
        let mut outputs: Vec<ValueId> = wanted.chain(kept_for_later).collect();
        outputs.sort();
        outputs.dedup();
        let mut piece_feed = Feed(feed.0.clone());
        for &v in &boundary {
            // The cached value becomes an input of the piece in place of the op that made it.
            if let Some((op, _)) = piece.graph.producer(v) {
                piece.graph.remove_op(op);
            }
            piece.graph.value_mut(v).kind = prunec_ir::ValueKind::Input;
            piece.graph.inputs.push(v);
            piece_feed.0.insert(graph.value(v).name.clone(), self.cache[&v].clone());
        }
        let run = if outputs.is_empty() { BTreeMap::new() } else { run_probed(piece, dir, &piece_feed, outputs.iter().copied())? };
        for &v in &outputs {
            if let Some(t) = run.get(&graph.value(v).name) {
                self.cache.insert(v, t.clone());
            }
        }
        let mut captured = BTreeMap::new();
        for &v in probes {
            if let Some(x) = self.cache.get(&v).or_else(|| feed.0.get(&graph.value(v).name)) {
                captured.insert(v, activation(x)?);
            }
        }
        self.done.extend(needed);
        let done = &self.done;
        self.cache.retain(|&v, _| graph.consumers(v).iter().any(|(reader, _)| !done.contains(reader)));
        Ok(captured)
    }
}

/// Runs `model` (a scratch copy) on `feed` for the values `probes` only: its outputs are dropped
/// and so is every op the probes do not depend on, so the first levels of a refit cost a
/// fraction of the model.
fn run_probed(
    mut model: Model,
    dir: &Path,
    feed: &Feed,
    probes: impl Iterator<Item = ValueId>,
) -> Result<BTreeMap<String, TractTensor>, RunError> {
    model.graph.outputs.clear();
    for v in probes {
        if !model.graph.inputs.contains(&v) && !model.graph.outputs.contains(&v) {
            model.graph.outputs.push(v);
        }
    }
    if model.graph.outputs.is_empty() {
        return Ok(BTreeMap::new());
    }
    prunec_passes::remove_dead_code(&mut model);
    let plan = Plan::from_model(&model, dir, feed)?;
    Ok(plan.run(feed)?.values.into_iter().collect())
}
