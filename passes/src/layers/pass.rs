//! The `remove-layers` pass: score the residual layers [`find_blocks`] finds, remove the least
//! important, verify against the original with their branches zeroed.
//!
//! Scores (lower: removed first):
//! - `position`: later layers first (ShortGPT and SLEB find the deep layers, short of the last,
//!   the most redundant); the position prior `keep-first`/`keep-last` applies to every score;
//! - `weights`: the data-free weight proxy ([`DataFreeScore::weight_proxy`]: output projection
//!   RMS, times the gate RMS for gated branches);
//! - `gate`: for adaLN-gated blocks (DiT, MMDiT), the RMS of the layer's gates over a grid of
//!   timesteps ([`gate_grid`]: the modulation subgraph run on the given inputs, or on noise,
//!   with the timestep input held at each grid point), aggregated over the grid by `aggregate`;
//!   without a timestep input (or without a runtime) the weight proxy of the gates, the RMS of
//!   their modulation rows, and the report says which was used;
//! - `influence`: ShortGPT's block influence, `1 − cos(x_in, x_out)` per token, per stream
//!   (each chain of residual sums of one stream through the layer), averaged over streams;
//! - `ablation`: the relative L2 change of the graph outputs when the unit alone is removed
//!   ([`score::ablation_change`]); with `greedy` the remaining units are re-scored after each
//!   removal on the model with the earlier choices removed (SLEB).
//!
//! The data-driven scores run the model through [`Context::measure`] on the given inputs. When
//! every graph input and output has the same first axis of more than one sample, each sample is
//! an input set of its own (a transformer's batch does not mix samples), scored separately and
//! aggregated by `aggregate`; otherwise the whole feed is one set, and the report says so.

use super::detect::{BlockKind, BlockReport, Layer, Region, find_blocks};
use super::gate::{GateGrid, gate_grid};
use super::reference::{ZeroedBranch, zero_branches, zeroed_branches};
use super::remove::{Merge, Selection, remove_with, write_weight};
use super::score::{self, DataFreeScore};
use crate::measure::{Activation, Context, Inputs, Measure};
use crate::options::{OptionSpec, PassOptions, choice_name, parse_bool, parse_choice, parse_count, parse_list, print_float};
use crate::prune::{Target, parse_target};
use crate::reference::{Reference, ReferenceEdit};
use crate::{Pass, PassDetails, PassError, PassReport};
use prunec_ir::{Model, Tensor, ValueId, ValueKind, constant_tensor, model_stats};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// How layers are scored (`score`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerScore {
    /// Later layers first.
    Position,
    /// The data-free weight proxy.
    Weights,
    /// The gate RMS of gated branches over a grid of timesteps (the modulation rows' RMS
    /// without a timestep input).
    Gate,
    /// Block influence on the inputs.
    Influence,
    /// Output change when the unit alone is removed, on the inputs.
    Ablation,
}

impl LayerScore {
    /// Every score with its name.
    pub const ALL: &[(&str, LayerScore)] = &[
        ("position", LayerScore::Position),
        ("weights", LayerScore::Weights),
        ("gate", LayerScore::Gate),
        ("influence", LayerScore::Influence),
        ("ablation", LayerScore::Ablation),
    ];

    /// Whether the score runs the model.
    pub fn needs_inputs(self) -> bool {
        matches!(self, LayerScore::Influence | LayerScore::Ablation)
    }
}

/// Which part of each layer is removed (`sub-block`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SubBlockChoice {
    /// Whole layers.
    #[default]
    All,
    /// The attention sub-blocks of a layer.
    Attention,
    /// The MLP sub-blocks of a layer.
    Mlp,
}

const SUB_BLOCKS: &[(&str, SubBlockChoice)] =
    &[("all", SubBlockChoice::All), ("attention", SubBlockChoice::Attention), ("mlp", SubBlockChoice::Mlp)];
const AGGREGATES: &[(&str, Aggregate)] = &[("mean", Aggregate::Mean), ("max", Aggregate::Max)];
const MERGES: &[(&str, Merge)] = &[("none", Merge::Identity), ("average", Merge::Average)];

/// How the scores of several input sets combine (`aggregate`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregate {
    /// The mean over sets.
    #[default]
    Mean,
    /// The worst set.
    Max,
}

impl Aggregate {
    fn of(self, values: &[f64]) -> f64 {
        match self {
            _ if values.is_empty() => f64::INFINITY,
            Aggregate::Mean => values.iter().sum::<f64>() / values.len() as f64,
            Aggregate::Max => values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

/// The options of `remove-layers`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RemoveLayersOptions {
    /// Units to remove when neither `layers` nor `target` says.
    pub n: usize,
    /// The layers to remove (empty: chosen by score).
    pub layers: Vec<usize>,
    /// A share of parameters or MACs to remove instead of `n` units.
    pub target: Option<Target>,
    /// Remove one run of consecutive layers.
    pub contiguous: bool,
    /// Whole layers, or their attention or MLP sub-blocks.
    pub sub_block: SubBlockChoice,
    /// The score (`None`: ablation with inputs, the weight proxy without).
    pub score: Option<LayerScore>,
    /// How per-set scores combine.
    pub aggregate: Aggregate,
    /// Re-score after each removal (SLEB).
    pub greedy: bool,
    /// What the survivors become.
    #[serde(skip)]
    pub merge: Merge,
    /// Layers at the start that are never chosen by score.
    pub keep_first: usize,
    /// Layers at the end that are never chosen by score.
    pub keep_last: usize,
}

impl Default for RemoveLayersOptions {
    fn default() -> Self {
        RemoveLayersOptions {
            n: 1,
            layers: Vec::new(),
            target: None,
            contiguous: false,
            sub_block: SubBlockChoice::All,
            score: None,
            aggregate: Aggregate::Mean,
            greedy: false,
            merge: Merge::Identity,
            keep_first: score::PROTECTED_ENDS,
            keep_last: score::PROTECTED_ENDS,
        }
    }
}

impl PassOptions for RemoveLayersOptions {
    const SCHEMA: &'static [OptionSpec] = &[
        OptionSpec { key: "n", kind: "integer", default: "1", doc: "layers (or sub-blocks) to remove, chosen by score" },
        OptionSpec { key: "layers", kind: "integers", default: "", doc: "remove these layers (as `prunec blocks` numbers them) instead" },
        OptionSpec {
            key: "target",
            kind: "none|params=SHARE|flops=SHARE",
            default: "none",
            doc: "remove layers by score until this share of parameters or MACs is gone (instead of n)",
        },
        OptionSpec { key: "contiguous", kind: "bool", default: "false", doc: "remove one run of consecutive layers (scored as a run)" },
        OptionSpec {
            key: "sub-block",
            kind: "all|attention|mlp",
            default: "all",
            doc: "remove whole layers, or only their attention or MLP",
        },
        OptionSpec {
            key: "score",
            kind: "auto|position|weights|gate|influence|ablation",
            default: "auto",
            doc: "layer score (influence and ablation need --inputs; gate: the adaLN gates' RMS over 8 timesteps, on the inputs or noise, or their modulation rows' RMS without a timestep input; auto: ablation with inputs, else weights)",
        },
        OptionSpec {
            key: "aggregate",
            kind: "mean|max",
            default: "mean",
            doc: "how the scores of several input sets (for score=gate: of the timesteps) combine",
        },
        OptionSpec { key: "greedy", kind: "bool", default: "false", doc: "re-score the rest after each removal (SLEB)" },
        OptionSpec {
            key: "merge",
            kind: "none|average",
            default: "none",
            doc: "average each survivor with the removed neighbours it stands for (needs distillation after)",
        },
        OptionSpec { key: "keep-first", kind: "integer", default: "1", doc: "never choose the first this many layers by score" },
        OptionSpec { key: "keep-last", kind: "integer", default: "1", doc: "never choose the last this many layers by score" },
    ];

    fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        match key {
            "n" => self.n = parse_count(value)?,
            "layers" => self.layers = parse_list(value).iter().map(|l| parse_count(l)).collect::<Result<_, _>>()?,
            "target" => self.target = if value.trim() == "none" { None } else { Some(parse_target(value)?) },
            "contiguous" => self.contiguous = parse_bool(value)?,
            "sub-block" => self.sub_block = parse_choice(value, SUB_BLOCKS, "sub-block")?,
            "score" => self.score = if value.trim() == "auto" { None } else { Some(parse_choice(value, LayerScore::ALL, "score")?) },
            "aggregate" => self.aggregate = parse_choice(value, AGGREGATES, "aggregate")?,
            "greedy" => self.greedy = parse_bool(value)?,
            "merge" => self.merge = parse_choice(value, MERGES, "merge")?,
            "keep-first" => self.keep_first = parse_count(value)?,
            "keep-last" => self.keep_last = parse_count(value)?,
            _ => return Err(format!("no option `{key}`")),
        }
        Ok(())
    }

    fn get(&self, key: &str) -> String {
        match key {
            "n" => self.n.to_string(),
            "layers" => self.layers.iter().map(usize::to_string).collect::<Vec<_>>().join(","),
            "target" => match self.target {
                None => "none".into(),
                Some(Target::Params(s)) => format!("params={}", print_float(s)),
                Some(Target::Flops(s)) => format!("flops={}", print_float(s)),
            },
            "contiguous" => self.contiguous.to_string(),
            "sub-block" => choice_name(&self.sub_block, SUB_BLOCKS).into(),
            "score" => self.score.map_or("auto", |s| choice_name(&s, LayerScore::ALL)).into(),
            "aggregate" => choice_name(&self.aggregate, AGGREGATES).into(),
            "greedy" => self.greedy.to_string(),
            "merge" => choice_name(&self.merge, MERGES).into(),
            "keep-first" => self.keep_first.to_string(),
            "keep-last" => self.keep_last.to_string(),
            _ => String::new(),
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.n == 0 && self.layers.is_empty() && self.target.is_none() {
            return Err("n must be at least 1 (or give layers or a target)".into());
        }
        if self.merge == Merge::Average && self.sub_block != SubBlockChoice::All {
            return Err("merge=average stands whole layers for whole layers: it needs sub-block=all".into());
        }
        Ok(())
    }
}

impl RemoveLayersOptions {
    /// The score, `auto` resolved: ablation when the pipeline has inputs, the weight proxy
    /// otherwise.
    pub fn score_kind(&self, has_inputs: bool) -> LayerScore {
        self.score.unwrap_or(if has_inputs { LayerScore::Ablation } else { LayerScore::Weights })
    }
}

/// The `remove-layers` pass.
pub struct RemoveLayers {
    /// Its options.
    pub options: RemoveLayersOptions,
}

/// One unit that can be removed: a layer, or its sub-blocks of one kind.
#[derive(Clone, Debug)]
struct Unit {
    layer: usize,
    selections: Vec<Selection>,
    kinds: Vec<String>,
}

/// A scored unit, as the report lists it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScoredUnit {
    /// The layer (as `prunec blocks` numbers it).
    pub layer: usize,
    /// The kinds of the sub-blocks the unit removes, in order.
    pub sub_blocks: Vec<String>,
    /// The aggregated score (lower: removed first).
    pub score: f64,
    /// The score on each input set (one entry for a data-free score; for the gate score over
    /// timesteps, one per timestep of the grid).
    pub per_set: Vec<f64>,
}

/// One removed unit.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RemovedUnit {
    /// The layer and its scores when it was chosen (after the earlier removals, with `greedy`).
    #[serde(flatten)]
    pub unit: ScoredUnit,
    /// Parameters removing this unit alone deletes.
    pub parameters: u64,
    /// MACs removing this unit alone deletes.
    pub macs: u64,
}

/// What `remove-layers` did: its details in the report.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RemoveLayersReport {
    /// The score used (`auto` resolved).
    pub score: String,
    /// Where the data-driven scores' inputs came from.
    pub inputs: Option<String>,
    /// Input sets scored separately.
    pub input_sets: usize,
    /// How the input sets were formed.
    pub input_sets_note: String,
    /// Layers found.
    pub layers_found: usize,
    /// Every candidate's first-round score, in layer order.
    pub candidates: Vec<ScoredUnit>,
    /// The removed units, in the order they were chosen.
    pub removed: Vec<RemovedUnit>,
    /// Parameters before and after.
    pub parameters: (u64, u64),
    /// MACs before and after.
    pub macs: (u64, u64),
    /// The change of the graph outputs on each input set (relative L2), when inputs were given.
    pub output_change: Option<Vec<f64>>,
    /// For `merge=average`: each survivor and the removed layers averaged into it.
    pub merged: Vec<(usize, Vec<usize>)>,
    /// The residual branches the reference zeroes.
    pub zeroed: Vec<ZeroedBranch>,
    /// Model runs the scoring took.
    pub runs: usize,
    /// For the gate score: what it was computed from.
    pub gate: Option<GateScoring>,
}

/// What the gate score was computed from.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GateScoring {
    /// `timesteps` (the gates evaluated over a grid of timesteps) or `weights` (the RMS of the
    /// gates' modulation rows).
    pub basis: String,
    /// Why the weight proxy was used, or what the grid was run on.
    pub note: String,
    /// The grid and each layer's gates on it, for `timesteps`.
    pub grid: Option<GateGrid>,
}

impl PassDetails for RemoveLayersReport {
    fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    fn summary(&self) -> Vec<String> {
        let removed: Vec<String> = self
            .removed
            .iter()
            .map(|r| {
                let what = if r.unit.sub_blocks.is_empty() { String::new() } else { format!(" ({})", r.unit.sub_blocks.join(" ")) };
                format!("{}{what} at {:.3e}", r.unit.layer, r.unit.score)
            })
            .collect();
        let share =
            |(before, after): (u64, u64)| if before == 0 { 0.0 } else { 100.0 * (before - after.min(before)) as f64 / before as f64 };
        let mut lines = vec![
            format!(
                "remove-layers: {} score; of {} layers removed {}",
                self.score,
                self.layers_found,
                if removed.is_empty() { "none".into() } else { removed.join(", ") }
            ),
            format!(
                "               parameters {} -> {} (-{:.1}%), MACs {} -> {} (-{:.1}%)",
                self.parameters.0,
                self.parameters.1,
                share(self.parameters),
                self.macs.0,
                self.macs.1,
                share(self.macs)
            ),
        ];
        if let Some(inputs) = &self.inputs {
            lines.push(format!("               scored on {inputs}: {} input set(s), {}", self.input_sets, self.input_sets_note));
        }
        if let Some(gate) = &self.gate {
            lines.push(format!("               gate score from {}: {}", gate.basis, gate.note));
            if let Some(grid) = &gate.grid {
                let t: Vec<String> = grid.timesteps.iter().map(|t| format!("{t:.4}")).collect();
                lines.push(format!("               timesteps `{}` = {}", grid.input, t.join(", ")));
                for l in grid.layers.iter().filter(|l| !l.per_timestep.is_empty()) {
                    let g: Vec<String> = l.per_timestep.iter().map(|g| format!("{g:.3e}")).collect();
                    lines.push(format!(
                        "               layer {} gate RMS mean {:.3e} max {:.3e}: {}",
                        l.layer,
                        l.mean.unwrap_or(0.0),
                        l.max.unwrap_or(0.0),
                        g.join(" ")
                    ));
                }
            }
        }
        if let Some(change) = &self.output_change {
            let shown: Vec<String> = change.iter().map(|c| format!("{c:.3e}")).collect();
            lines.push(format!("               output change (relative L2) per input set: {}", shown.join(", ")));
        }
        lines
    }
}

/// The reference: the original with the survivors' averaged weights (for `merge=average`) and
/// the removed residual branches zeroed, all by value names.
struct ZeroedReference {
    branches: Vec<ZeroedBranch>,
    averaged: Vec<(String, Tensor)>,
}

impl ReferenceEdit for ZeroedReference {
    fn kind(&self) -> &'static str {
        "reference"
    }

    fn describe(&self) -> String {
        if self.averaged.is_empty() {
            "the original with the removed layers' residual branches zeroed".into()
        } else {
            "the original with the survivors' averaged weights and the removed layers' residual branches zeroed".into()
        }
    }

    fn apply(&self, reference: &mut Model) -> Result<(), String> {
        for (name, tensor) in &self.averaged {
            let v = reference.graph.value_by_name(name).ok_or_else(|| format!("the reference has no weight `{name}`"))?;
            write_weight(reference, v, tensor.clone()).map_err(|e| e.to_string())?;
        }
        zero_branches(reference, &self.branches).map_err(|e| e.to_string())
    }
}

impl Pass for RemoveLayers {
    fn name(&self) -> &'static str {
        "remove-layers"
    }

    fn options(&self) -> Vec<(&'static str, String)> {
        self.options.values()
    }

    fn needs_shapes(&self) -> bool {
        true
    }

    fn run(&self, model: &mut Model, cx: &mut Context) -> Result<PassReport, PassError> {
        let o = &self.options;
        let blocks = find_blocks(&model.graph);
        let kind = o.score_kind(cx.has_inputs());
        let units = units(&blocks, o.sub_block);
        let n_layers = blocks.layers.len();
        let mut report =
            RemoveLayersReport { score: choice_name(&kind, LayerScore::ALL).into(), layers_found: n_layers, ..Default::default() };
        // Explicit layers are taken as asked; the position prior only limits what scores choose.
        let candidates: Vec<usize> = if o.layers.is_empty() {
            (0..units.len()).filter(|&u| units[u].layer >= o.keep_first && units[u].layer + o.keep_last < n_layers).collect()
        } else {
            let mut chosen = Vec::new();
            for &l in &o.layers {
                let u = units.iter().position(|u| u.layer == l).ok_or_else(|| {
                    PassError::NoSuchBlock(format!(
                        "layer {l} (there are {n_layers}{})",
                        if o.sub_block == SubBlockChoice::All {
                            String::new()
                        } else {
                            format!(", with {} sub-blocks in {}", self.options.get("sub-block"), units.len())
                        }
                    ))
                })?;
                chosen.push(u);
            }
            chosen
        };
        let stats = model_stats(model);
        report.parameters = (stats.parameters, stats.parameters);
        report.macs = (stats.macs, stats.macs);
        if units.is_empty() || candidates.is_empty() {
            cx.warn(format!(
                "remove-layers: nothing to remove ({n_layers} layers found, {} candidates after keep-first={} keep-last={}); `prunec blocks MODEL` lists them",
                candidates.len(),
                o.keep_first,
                o.keep_last
            ));
            return Ok(PassReport { details: Some(Arc::new(report)), ..PassReport::default() });
        }
        // What each unit deletes, counted on a copy (sub-blocks have no counts of their own).
        let mut costs = BTreeMap::new();
        for &u in &candidates {
            let mut copy = model.clone();
            remove_with(&mut copy, &blocks, &units[u].selections, Merge::Identity)?;
            let after = model_stats(&copy);
            costs.insert(u, (stats.parameters.saturating_sub(after.parameters), stats.macs.saturating_sub(after.macs)));
        }

        let original = model.clone();
        let mut warnings = Vec::new();
        if o.greedy && !kind.needs_inputs() {
            // Weights do not change when a layer goes, and neither do the gates (the modulation
            // reads the timestep and text embeddings, not the residual stream), so re-scoring
            // would rank the same.
            warnings.push(format!(
                "remove-layers: greedy re-scoring changes nothing for the {} score, which removals do not change",
                report.score
            ));
        }
        let mut scorer = Scorer::new(&original, &blocks, &units, kind, o.aggregate, cx)?;
        let first = scorer.score(&[], &candidates.iter().map(|&u| vec![u]).collect::<Vec<_>>())?;
        report.candidates = candidates.iter().zip(&first).map(|(&u, (s, per))| scored(&units[u], *s, per)).collect();

        // The choice.
        let goal = |chosen: &[usize]| -> bool {
            let (p, m) = chosen.iter().fold((0u64, 0u64), |(p, m), u| (p + costs[u].0, m + costs[u].1));
            match o.target {
                Some(Target::Params(share)) => p as f64 >= share * stats.parameters as f64,
                Some(Target::Flops(share)) => m as f64 >= share * stats.macs as f64,
                None => chosen.len() >= o.n,
            }
        };
        let mut chosen: Vec<(usize, f64, Vec<f64>)> = Vec::new();
        if !o.layers.is_empty() {
            for (&u, (s, per)) in candidates.iter().zip(&first) {
                chosen.push((u, *s, per.clone()));
            }
        } else if o.contiguous {
            // Runs of consecutive candidate layers: the shortest length that meets the goal,
            // and of those runs the best scored as a whole (PPCL: a run removed together).
            for len in 1..=candidates.len() {
                let runs: Vec<Vec<usize>> = candidates
                    .windows(len)
                    .filter(|w| w.windows(2).all(|p| units[p[1]].layer == units[p[0]].layer + 1))
                    .map(<[usize]>::to_vec)
                    .filter(|r| goal(r))
                    .collect();
                if runs.is_empty() {
                    continue;
                }
                let scores = scorer.score(&[], &runs)?;
                let best = (0..runs.len()).min_by(|&a, &b| scores[a].0.total_cmp(&scores[b].0).then(a.cmp(&b))).unwrap_or(0);
                for &u in &runs[best] {
                    let at = candidates.iter().position(|&c| c == u).unwrap_or(0);
                    chosen.push((u, first[at].0, first[at].1.clone()));
                }
                break;
            }
        } else {
            let mut scores: BTreeMap<usize, (f64, Vec<f64>)> = candidates.iter().copied().zip(first.iter().cloned()).collect();
            while !goal(&chosen.iter().map(|c| c.0).collect::<Vec<_>>()) && !scores.is_empty() {
                let (&best, _) = scores.iter().min_by(|a, b| a.1.0.total_cmp(&b.1.0).then(a.0.cmp(b.0))).expect("not empty");
                let (s, per) = scores.remove(&best).expect("present");
                chosen.push((best, s, per));
                if o.greedy && kind.needs_inputs() && !scores.is_empty() && !goal(&chosen.iter().map(|c| c.0).collect::<Vec<_>>()) {
                    let done: Vec<usize> = chosen.iter().map(|c| c.0).collect();
                    let rest: Vec<usize> = scores.keys().copied().collect();
                    let again = scorer.score(&done, &rest.iter().map(|&u| vec![u]).collect::<Vec<_>>())?;
                    scores = rest.into_iter().zip(again).collect();
                }
            }
        }
        if !goal(&chosen.iter().map(|c| c.0).collect::<Vec<_>>()) {
            warnings.push(format!(
                "remove-layers: {} of the {} candidates removed, short of the goal{}",
                chosen.len(),
                candidates.len(),
                if o.contiguous { " (no run of consecutive candidates meets it)" } else { "" }
            ));
        }
        let selections: Vec<Selection> = chosen.iter().flat_map(|(u, ..)| units[*u].selections.iter().copied()).collect();
        report.removed = chosen
            .iter()
            .map(|(u, s, per)| RemovedUnit { unit: scored(&units[*u], *s, per), parameters: costs[u].0, macs: costs[u].1 })
            .collect();

        // The rewrite, and the reference by names.
        report.zeroed = zeroed_branches(model, &blocks, &selections)?;
        let removal = remove_with(model, &blocks, &selections, o.merge)?;
        let mut averaged = Vec::new();
        for (survivor, _) in &removal.merged {
            for &w in blocks.layers[*survivor].weights() {
                let name = original.graph.value(w).name.clone();
                if let Some(t) = constant_tensor(&model.graph, w) {
                    averaged.push((name, t.clone()));
                }
            }
        }
        report.merged = removal.merged.clone();
        let after = model_stats(model);
        report.parameters.1 = after.parameters;
        report.macs.1 = after.macs;
        if let Some(change) = scorer.output_change(model)? {
            report.output_change = Some(change);
        }
        report.inputs = scorer.source.clone();
        report.input_sets = scorer.sets;
        report.input_sets_note = scorer.note.clone();
        report.runs = scorer.runs;
        report.gate = scorer.gate.clone();
        Ok(PassReport {
            ops_removed: removal.ops_removed,
            values_removed: removal.values_removed,
            reference: Reference::Edit(Arc::new(ZeroedReference { branches: report.zeroed.clone(), averaged })),
            details: Some(Arc::new(report)),
            warnings,
        })
    }
}

fn scored(unit: &Unit, score: f64, per_set: &[f64]) -> ScoredUnit {
    ScoredUnit { layer: unit.layer, sub_blocks: unit.kinds.clone(), score, per_set: per_set.to_vec() }
}

/// The removable units, in layer order: whole layers, or each layer's sub-blocks of one kind.
fn units(blocks: &BlockReport, choice: SubBlockChoice) -> Vec<Unit> {
    let want = match choice {
        SubBlockChoice::All => None,
        SubBlockChoice::Attention => Some(BlockKind::Attention),
        SubBlockChoice::Mlp => Some(BlockKind::Mlp),
    };
    blocks
        .layers
        .iter()
        .filter_map(|layer| {
            let subs: Vec<usize> = (0..layer.sub_blocks.len()).filter(|&s| want.is_none_or(|k| layer.sub_blocks[s].kind == k)).collect();
            if subs.is_empty() {
                return None;
            }
            let kinds = subs.iter().map(|&s| layer.sub_blocks[s].kind.to_string()).collect();
            let selections = match want {
                None => vec![Selection::Layer(layer.index)],
                Some(_) => subs.iter().map(|&s| Selection::SubBlock { layer: layer.index, sub_block: s }).collect(),
            };
            Some(Unit { layer: layer.index, selections, kinds })
        })
        .collect()
}

/// Scores units on the original model: the data-free ones from the weights, the data-driven
/// ones through one measurement on the given inputs.
struct Scorer<'m, 'c> {
    model: &'m Model,
    blocks: &'m BlockReport,
    units: &'m [Unit],
    kind: LayerScore,
    aggregate: Aggregate,
    data_free: Vec<DataFreeScore>,
    measure: Option<Box<dyn Measure + 'c>>,
    /// The original's graph outputs, per output.
    baseline: Vec<Activation>,
    /// Samples per input set split along the first axis (1: the whole feed is one set).
    batch: usize,
    sets: usize,
    note: String,
    source: Option<String>,
    runs: usize,
    /// For the gate score: the grid when it could be measured, and what was used.
    gate: Option<GateScoring>,
}

impl<'m, 'c> Scorer<'m, 'c> {
    fn new(
        model: &'m Model,
        blocks: &'m BlockReport,
        units: &'m [Unit],
        kind: LayerScore,
        aggregate: Aggregate,
        cx: &'c mut Context,
    ) -> Result<Scorer<'m, 'c>, PassError> {
        let data_free = score::data_free(&model.graph, &blocks.layers);
        let mut scorer = Scorer {
            model,
            blocks,
            units,
            kind,
            aggregate,
            data_free,
            measure: None,
            baseline: Vec::new(),
            batch: 1,
            sets: 1,
            note: "data-free: the weights only".into(),
            source: None,
            runs: 0,
            gate: None,
        };
        if kind == LayerScore::Gate {
            scorer.gate = Some(Self::gates_over_timesteps(model, blocks, cx, &mut scorer.runs));
        }
        // Data-driven scores need the inputs; a data-free score still reports the output change
        // when there are inputs.
        if kind.needs_inputs() || cx.has_inputs() {
            let mut measure = match cx.measure(model, Inputs::Given) {
                Ok(m) => m,
                Err(e) if kind.needs_inputs() => {
                    return Err(PassError::Measure(format!("remove-layers score={}: {e}", choice_name(&kind, LayerScore::ALL))));
                }
                Err(_) => return Ok(scorer),
            };
            let graph = &model.graph;
            let inputs: Vec<ValueId> = graph.inputs.iter().copied().filter(|&v| matches!(graph.value(v).kind, ValueKind::Input)).collect();
            let outputs = graph.outputs.clone();
            let probes: Vec<ValueId> = inputs.iter().chain(&outputs).copied().collect();
            let captured = measure.capture(model, &probes).map_err(|e| PassError::Measure(format!("remove-layers: {e}")))?;
            scorer.runs += 1;
            scorer.baseline = outputs
                .iter()
                .map(|v| {
                    captured
                        .get(v)
                        .cloned()
                        .ok_or_else(|| PassError::Measure(format!("remove-layers: output `{}` was not computed", graph.value(*v).name)))
                })
                .collect::<Result<_, _>>()?;
            let firsts: BTreeSet<Option<usize>> = captured.values().map(|a| a.shape.first().copied()).collect();
            match firsts.iter().next() {
                Some(&Some(b)) if firsts.len() == 1 && b > 1 => {
                    scorer.batch = b;
                    scorer.sets = b;
                    scorer.note = format!("each of the {b} samples along the first axis of every input and output is a set");
                }
                _ => {
                    scorer.note = "the whole feed is one set (its inputs and outputs share no first axis of several samples)".into();
                }
            }
            scorer.source = Some(measure.source().to_string());
            scorer.measure = Some(measure);
        }
        Ok(scorer)
    }

    /// The gate score's basis: the gates over a grid of timesteps, measured on the given inputs
    /// (or noise without them), or the weight proxy when the model has no timestep input or
    /// cannot be run (which is said, and warned of when a timestep input exists).
    fn gates_over_timesteps(model: &Model, blocks: &BlockReport, cx: &mut Context, runs: &mut usize) -> GateScoring {
        let weights = |note: String| GateScoring { basis: "weights".into(), note, grid: None };
        if let Err(e) = super::gate::timestep_input(model, &blocks.layers) {
            return weights(format!("the RMS of the gates' modulation rows ({e})"));
        }
        let noise = !cx.has_inputs();
        let inputs = if noise { Inputs::Noise { samples: 1, seed: 0 } } else { Inputs::Given };
        let result = match cx.measure(model, inputs) {
            Ok(mut measure) => {
                let source = measure.source().to_string();
                gate_grid(model, &blocks.layers, measure.as_mut(), noise).map(|grid| (grid, source)).map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok((grid, source)) => {
                // One run per grid point (the feed's timestep is read off the feed, not run).
                *runs += grid.timesteps.len();
                let note = format!(
                    "the gates' RMS at {} timesteps of `{}` over {}, the other inputs from {source}",
                    grid.timesteps.len(),
                    grid.input,
                    grid.range_note
                );
                GateScoring { basis: "timesteps".into(), note, grid: Some(grid) }
            }
            Err(e) => {
                cx.warn(format!("remove-layers score=gate: the gates could not be evaluated over timesteps ({e}); scored by their modulation rows' RMS instead"));
                weights(format!("the RMS of the gates' modulation rows (evaluating them over timesteps failed: {e})"))
            }
        }
    }

    /// The activation cut into input sets (whole, when its first axis is not the samples).
    fn split<'a>(&self, a: &'a Activation) -> Vec<&'a [f32]> {
        if self.batch > 1 && a.shape.first() == Some(&self.batch) && a.values.len().is_multiple_of(self.batch) {
            a.values.chunks(a.values.len() / self.batch).collect()
        } else {
            vec![&a.values[..]]
        }
    }

    /// Relative L2 change of `outputs` from the baseline, per set, averaged over the outputs.
    fn change(&self, outputs: &[Activation]) -> Result<Vec<f64>, PassError> {
        let mut per_set = vec![0.0; self.sets];
        for (want, got) in self.baseline.iter().zip(outputs) {
            let (w, g) = (self.split(want), self.split(got));
            for (set, slot) in per_set.iter_mut().enumerate() {
                let (w, g) = (w.get(set).or(w.first()), g.get(set).or(g.first()));
                let (Some(w), Some(g)) = (w, g) else { continue };
                *slot += score::ablation_change(w, g).map_err(|e| PassError::Measure(format!("remove-layers: comparing outputs: {e}")))?
                    / self.baseline.len().max(1) as f64;
            }
        }
        Ok(per_set)
    }

    /// The graph outputs of `model` (the original's outputs, by id).
    fn outputs_of(&mut self, model: &Model) -> Result<Vec<Activation>, PassError> {
        let outputs = model.graph.outputs.clone();
        let measure = self.measure.as_mut().ok_or_else(|| PassError::Measure("remove-layers: no inputs to run the model on".into()))?;
        let mut captured = measure.capture(model, &outputs).map_err(|e| PassError::Measure(format!("remove-layers: {e}")))?;
        self.runs += 1;
        outputs
            .iter()
            .map(|v| {
                captured
                    .remove(v)
                    .ok_or_else(|| PassError::Measure(format!("remove-layers: output `{}` was not computed", model.graph.value(*v).name)))
            })
            .collect()
    }

    /// The output change of the final model, when there are inputs.
    fn output_change(&mut self, model: &Model) -> Result<Option<Vec<f64>>, PassError> {
        if self.measure.is_none() {
            return Ok(None);
        }
        let outputs = self.outputs_of(model)?;
        self.change(&outputs).map(Some)
    }

    /// The original with the units `done` removed.
    fn without(&self, done: &[usize]) -> Result<Model, PassError> {
        let mut copy = self.model.clone();
        let selections: Vec<Selection> = done.iter().flat_map(|&u| self.units[u].selections.iter().copied()).collect();
        if !selections.is_empty() {
            remove_with(&mut copy, self.blocks, &selections, Merge::Identity)?;
        }
        Ok(copy)
    }

    /// Each group of units' score (aggregated, and per set), with `done` already removed.
    fn score(&mut self, done: &[usize], groups: &[Vec<usize>]) -> Result<Vec<(f64, Vec<f64>)>, PassError> {
        let n = self.blocks.layers.len();
        let one = |v: f64| (v, vec![v]);
        let mut out = Vec::with_capacity(groups.len());
        match self.kind {
            LayerScore::Position => {
                for g in groups {
                    // Later first: the score falls with depth.
                    out.push(one(g.iter().map(|&u| (n - self.units[u].layer) as f64 / n as f64).sum()));
                }
            }
            LayerScore::Weights => {
                for g in groups {
                    out.push(one(g.iter().map(|&u| self.data_free[self.units[u].layer].weight_proxy.unwrap_or(f64::INFINITY)).sum()));
                }
            }
            LayerScore::Gate if self.gate.as_ref().is_some_and(|g| g.grid.is_some()) => {
                let grid = self.gate.as_ref().and_then(|g| g.grid.as_ref()).expect("checked");
                for g in groups {
                    // Per timestep, summed over the group's layers; an ungated layer is never
                    // chosen by the gate score.
                    let mut per = vec![0.0; grid.timesteps.len()];
                    for &u in g {
                        let gates = &grid.layers[self.units[u].layer].per_timestep;
                        if gates.is_empty() {
                            per.iter_mut().for_each(|p| *p = f64::INFINITY);
                        }
                        for (p, v) in per.iter_mut().zip(gates) {
                            *p += v;
                        }
                    }
                    out.push((self.aggregate.of(&per), per));
                }
            }
            LayerScore::Gate => {
                if self.data_free.iter().all(|s| s.gates.is_empty()) {
                    return Err(PassError::BadOption("remove-layers score=gate: no layer of this model has a gated residual".into()));
                }
                for g in groups {
                    let gate = |l: usize| {
                        let gates = &self.data_free[l].gates;
                        if gates.is_empty() { f64::INFINITY } else { gates.iter().sum::<f64>() / gates.len() as f64 }
                    };
                    out.push(one(g.iter().map(|&u| gate(self.units[u].layer)).sum()));
                }
            }
            LayerScore::Ablation => {
                for g in groups {
                    let all: Vec<usize> = done.iter().chain(g).copied().collect();
                    let ablated = self.without(&all)?;
                    let outputs = self.outputs_of(&ablated)?;
                    let per = self.change(&outputs)?;
                    out.push((self.aggregate.of(&per), per));
                }
            }
            LayerScore::Influence => {
                let current = self.without(done)?;
                let wanted: BTreeSet<usize> = groups.iter().flatten().copied().collect();
                // Each stream's input and output, as the current graph computes them.
                let mut streams: BTreeMap<usize, Vec<(ValueId, ValueId)>> = BTreeMap::new();
                for &u in &wanted {
                    streams.insert(u, self.streams(&current, u));
                }
                let probes: Vec<ValueId> =
                    streams.values().flatten().flat_map(|&(a, b)| [a, b]).collect::<BTreeSet<_>>().into_iter().collect();
                let measure =
                    self.measure.as_mut().ok_or_else(|| PassError::Measure("remove-layers: no inputs to run the model on".into()))?;
                let captured = measure.capture(&current, &probes).map_err(|e| PassError::Measure(format!("remove-layers: {e}")))?;
                self.runs += 1;
                let mut per_unit: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
                for (&u, pairs) in &streams {
                    let mut per = vec![0.0; self.sets];
                    for &(a, b) in pairs {
                        let (Some(x), Some(y)) = (captured.get(&a), captured.get(&b)) else {
                            return Err(PassError::Measure(format!(
                                "remove-layers: layer {}'s activations were not computed",
                                self.units[u].layer
                            )));
                        };
                        let hidden = hidden_size(x, self.batch);
                        let (xs, ys) = (self.split(x), self.split(y));
                        for (set, slot) in per.iter_mut().enumerate() {
                            let (Some(xi), Some(yi)) = (xs.get(set).or(xs.first()), ys.get(set).or(ys.first())) else { continue };
                            *slot += score::block_influence(xi, yi, hidden)
                                .map_err(|e| PassError::Measure(format!("remove-layers: layer {}: {e}", self.units[u].layer)))?
                                / pairs.len().max(1) as f64;
                        }
                    }
                    per_unit.insert(u, per);
                }
                for g in groups {
                    let mut per = vec![0.0; self.sets];
                    for u in g {
                        for (p, v) in per.iter_mut().zip(&per_unit[u]) {
                            *p += v;
                        }
                    }
                    out.push((self.aggregate.of(&per), per));
                }
            }
        }
        Ok(out)
    }

    /// A unit's streams in `current`: each chain of its residual sums where one sum is the next
    /// one's skip, as (the chain's first skip, its last sum). Read from the Adds in `current`,
    /// since an earlier removal moves a skip.
    fn streams(&self, current: &Model, u: usize) -> Vec<(ValueId, ValueId)> {
        let layer: &Layer = &self.blocks.layers[self.units[u].layer];
        let chosen: BTreeSet<usize> = self.units[u]
            .selections
            .iter()
            .flat_map(|s| match *s {
                Selection::Layer(_) => (0..layer.sub_blocks.len()).collect::<Vec<_>>(),
                Selection::SubBlock { sub_block, .. } => vec![sub_block],
            })
            .collect();
        let regions: Vec<&Region> = chosen.iter().flat_map(|&s| &layer.sub_blocks[s].regions).collect();
        let graph = &current.graph;
        let ends: Vec<(ValueId, ValueId)> =
            regions.iter().filter_map(|r| Some((graph.op_input(r.add_op, r.skip_slot)?, graph.op_output(r.add_op, 0)?))).collect();
        let mut chains: Vec<(ValueId, ValueId)> = Vec::new();
        for (skip, sum) in ends {
            match chains.iter_mut().find(|c| c.1 == skip) {
                Some(chain) => chain.1 = sum,
                None => chains.push((skip, sum)),
            }
        }
        chains
    }
}

/// Features per token: the last axis, or a whole sample for a convolution's `N×C×H×W` (whose
/// channels are not last).
fn hidden_size(a: &Activation, batch: usize) -> usize {
    match a.shape.len() {
        4 => a.values.len() / a.shape.first().copied().unwrap_or(batch).max(1),
        _ => a.shape.last().copied().unwrap_or(a.values.len()).max(1),
    }
}

/// The data-driven scores of one layer, as `prunec blocks --inputs` lists them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MeasuredScore {
    /// The layer.
    pub layer: usize,
    /// Block influence, aggregated over input sets.
    pub influence: f64,
    /// Block influence per input set.
    pub influence_per_set: Vec<f64>,
    /// Ablation change, aggregated over input sets.
    pub ablation: f64,
    /// Ablation change per input set.
    pub ablation_per_set: Vec<f64>,
}

/// What [`measured_scores`] found, with how it measured.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MeasuredScores {
    /// Where the inputs came from.
    pub inputs: Option<String>,
    /// Input sets scored separately.
    pub input_sets: usize,
    /// How the input sets were formed.
    pub input_sets_note: String,
    /// Model runs the scores took.
    pub runs: usize,
    /// One entry per layer of `blocks`, in order.
    pub layers: Vec<MeasuredScore>,
}

/// Block influence and ablation change of every whole layer of `blocks` (found in `model`), on
/// the inputs `cx` gives (`Inputs::Given`).
pub fn measured_scores(model: &Model, blocks: &BlockReport, aggregate: Aggregate, cx: &mut Context) -> Result<MeasuredScores, PassError> {
    let units = units(blocks, SubBlockChoice::All);
    let groups: Vec<Vec<usize>> = (0..units.len()).map(|u| vec![u]).collect();
    let (influence, runs_influence) = {
        let mut scorer = Scorer::new(model, blocks, &units, LayerScore::Influence, aggregate, cx)?;
        (scorer.score(&[], &groups)?, scorer.runs)
    };
    let mut scorer = Scorer::new(model, blocks, &units, LayerScore::Ablation, aggregate, cx)?;
    let ablation = scorer.score(&[], &groups)?;
    let layers = units
        .iter()
        .zip(influence.into_iter().zip(ablation))
        .map(|(u, ((i, ip), (a, ap)))| MeasuredScore {
            layer: u.layer,
            influence: i,
            influence_per_set: ip,
            ablation: a,
            ablation_per_set: ap,
        })
        .collect();
    Ok(MeasuredScores {
        inputs: scorer.source.clone(),
        input_sets: scorer.sets,
        input_sets_note: scorer.note.clone(),
        runs: runs_influence + scorer.runs,
        layers,
    })
}
