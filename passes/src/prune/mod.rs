//! Channel pruning: rank the channels of every prunable group, choose the weakest, remove them.
//!
//! 1. [`prunec_ir::analyse_groups`] finds the groups; a group is a candidate when it is
//!    prunable, no member matches `--exclude`, and [`rewrite::plan_edits`] can write its removal.
//! 2. [`criteria`] scores each candidate's channels.
//! 3. [`choose`] picks the channels to remove for the target (ratio per group, ratio across
//!    groups, or a share of parameters or MACs found by bisection on the ratio).
//! 4. [`rewrite::apply`] removes them; dead code goes after.
//!
//! The report names every decision, and lists the consumer slices that [`mask_consumers`]
//! zeroes in the original model to build the masking-equivalence reference.

pub mod criteria;
pub mod obspa;
pub mod rewrite;
pub mod sensitivity;
pub mod statistics;

use crate::measure::{Context, Inputs};
use crate::options::{OptionSpec, PassOptions};
use crate::reference::{Reference, ReferenceEdit};
use crate::{Pass, PassDetails, PassError, PassReport};
pub use criteria::{Calibration, Criterion, Normalizer, Reduction};
pub use obspa::{Compensation, CrossMoments, Hessian, HessianSource, Refit, apply_compensations};
use prunec_ir::{Graph, Group, Model, Role, Shape, ValueKind, constant_tensor, model_stats, op_cost};
pub use rewrite::{Removal, RewriteError, mask_consumers};
pub use sensitivity::{AllocationReport, GroupSensitivity, PROBE_RATIOS, SensitivityTable};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// What to remove and how to choose it: the options of the `prune` pass.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PruneOptions {
    /// Channel scoring.
    pub criterion: Criterion,
    /// Reduction of slice scores to one score per channel.
    pub reduction: Reduction,
    /// Scaling of group scores for `global` ranking (`None`: the criterion's own).
    pub normalizer: Option<Normalizer>,
    /// Share of channels to remove (per group, or of all channels with `global`).
    pub ratio: f64,
    /// Rank channels across groups instead of within each.
    pub global: bool,
    /// A share of parameters or MACs to remove instead of a channel ratio.
    pub target: Option<Target>,
    /// Keep channel counts a multiple of this (1: any count).
    pub round_to: usize,
    /// Keep at least this many channels in every group.
    pub min_keep: usize,
    /// Groups with a member node matching one of these globs are not pruned.
    pub exclude: Vec<String>,
    /// `(glob, ratio)`: groups with a member node matching the glob use that ratio instead
    /// (the first match wins; local ranking only).
    pub node_ratios: Vec<(String, f64)>,
    /// Seed of the `random` criterion and of synthetic measurement inputs.
    pub seed: u64,
    /// Leave whole the groups whose channels a normalisation mixes (a LayerNorm'd residual
    /// stream): their removal changes every other channel, which no masking check can vouch for.
    pub keep_normalized: bool,
    /// Where OBSPA and FLAP take their consumers' input statistics from (`None`: calib when the
    /// pipeline has inputs, noise otherwise).
    pub hessian: Option<HessianSource>,
    /// OBSPA's damping: λ = damping × the mean diagonal of H is added to H's diagonal.
    pub damping: f64,
    /// Samples of synthetic input for `hessian=noise` (the batch size, where it is open).
    pub noise_samples: usize,
    /// How OBSPA compensates with measured statistics (`None`: prefix with calib, else none).
    pub refit: Option<RefitMode>,
    /// How a `target` is spread over the groups (`None`: sensitivity with a target, unless
    /// `global` ranks the channels).
    pub allocation: Option<Allocation>,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            criterion: Criterion::L2,
            reduction: Reduction::Mean,
            normalizer: None,
            ratio: DEFAULT_RATIO,
            global: false,
            target: None,
            round_to: 1,
            min_keep: 1,
            exclude: Vec::new(),
            node_ratios: Vec::new(),
            seed: 0,
            keep_normalized: false,
            hessian: None,
            damping: DEFAULT_DAMPING,
            noise_samples: 8,
            refit: None,
            allocation: None,
        }
    }
}

/// How OBSPA compensates with measured statistics (`refit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RefitMode {
    /// The one-shot update from the original model's statistics.
    None,
    /// Level by level in topological order, each on the inputs the already pruned and
    /// compensated prefix gives it.
    Prefix,
    /// As prefix, and every dense layer downstream is refit to the original's outputs too.
    Outputs,
}

/// How a parameter or MAC target is spread over the groups (`allocation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Allocation {
    /// One channel ratio for every group, found by bisection.
    Uniform,
    /// Per-group ratios chosen from measured dry runs (see [`sensitivity`]).
    Sensitivity,
}

impl Allocation {
    /// Every allocation with its name.
    pub const ALL: &[(&str, Allocation)] = &[("uniform", Allocation::Uniform), ("sensitivity", Allocation::Sensitivity)];
}

impl RefitMode {
    /// Every mode with its name.
    pub const ALL: &[(&str, RefitMode)] = &[("none", RefitMode::None), ("prefix", RefitMode::Prefix), ("outputs", RefitMode::Outputs)];
}

const REDUCTIONS: &[(&str, Reduction)] =
    &[("mean", Reduction::Mean), ("sum", Reduction::Sum), ("max", Reduction::Max), ("first", Reduction::First)];

const NORMALIZERS: &[(&str, Normalizer)] = &[
    ("none", Normalizer::None),
    ("mean", Normalizer::Mean),
    ("max", Normalizer::Max),
    ("sum", Normalizer::Sum),
    ("standardization", Normalizer::Standardization),
    ("lamp", Normalizer::Lamp),
];

impl PassOptions for PruneOptions {
    const SCHEMA: &'static [OptionSpec] = &[
        OptionSpec {
            key: "criterion",
            kind: "l1|l2|random|bn-scale|lamp|wanda|obspa|flap",
            default: "l2",
            doc: "channel score (wanda needs inputs; obspa and flap compensate, statistics from `hessian`)",
        },
        OptionSpec { key: "ratio", kind: "share", default: "0.3", doc: "share of each group's channels to remove (of all, with global)" },
        OptionSpec { key: "global", kind: "bool", default: "false", doc: "rank channels across groups (scores normalised per group)" },
        OptionSpec {
            key: "target",
            kind: "none|params=SHARE|flops=SHARE",
            default: "none",
            doc: "remove a share of parameters or MACs instead of a channel ratio (spread over the groups by `allocation`)",
        },
        OptionSpec {
            key: "allocation",
            kind: "auto|uniform|sensitivity",
            default: "auto",
            doc: "how a target is spread: one ratio for all groups, or per-group ratios from measured dry runs (auto: sensitivity with a target, unless global)",
        },
        OptionSpec { key: "reduction", kind: "mean|sum|max|first", default: "mean", doc: "how the scores of a group's weights combine" },
        OptionSpec {
            key: "normalizer",
            kind: "auto|none|mean|max|sum|standardization|lamp",
            default: "auto",
            doc: "scaling of group scores for global ranking (auto: mean; none for lamp)",
        },
        OptionSpec { key: "round-to", kind: "integer", default: "1", doc: "keep channel counts a multiple of this" },
        OptionSpec { key: "min-keep", kind: "integer", default: "1", doc: "keep at least this many channels in every group" },
        OptionSpec {
            key: "exclude",
            kind: "globs",
            default: "",
            doc: "do not prune groups with a node whose name matches one of these globs",
        },
        OptionSpec {
            key: "node-ratio",
            kind: "GLOB=SHARE list",
            default: "",
            doc: "another ratio for groups with a node matching the glob (first match wins)",
        },
        OptionSpec { key: "seed", kind: "integer", default: "0", doc: "seed of the random criterion and of synthetic inputs" },
        OptionSpec {
            key: "keep-normalized",
            kind: "bool",
            default: "false",
            doc: "do not prune groups whose channels a normalisation mixes (keeps masking equivalence checkable)",
        },
        OptionSpec {
            key: "hessian",
            kind: "auto|calib|noise|bn|identity",
            default: "auto",
            doc: "obspa/flap statistics: the inputs, seeded noise, BatchNormalization, or none (auto: calib with inputs, else noise)",
        },
        OptionSpec { key: "damping", kind: "number", default: "0.01", doc: "OBSPA's damping, a share of the mean Hessian diagonal" },
        OptionSpec { key: "noise-samples", kind: "integer", default: "8", doc: "samples of synthetic input for hessian=noise" },
        OptionSpec {
            key: "refit",
            kind: "auto|none|prefix|outputs",
            default: "auto",
            doc: "OBSPA's compensation: one-shot, level by level on the pruned prefix, or to the original's outputs (auto: prefix with calib)",
        },
    ];

    fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        use crate::options::{parse_bool, parse_choice, parse_count, parse_list, parse_share};
        let auto = |v: &str| v.trim() == "auto";
        match key {
            "criterion" => self.criterion = parse_choice(value, Criterion::ALL, "criterion")?,
            "ratio" => self.ratio = parse_share(value)?,
            "global" => self.global = parse_bool(value)?,
            "target" => self.target = if value.trim() == "none" { None } else { Some(parse_target(value)?) },
            "reduction" => self.reduction = parse_choice(value, REDUCTIONS, "reduction")?,
            "normalizer" => self.normalizer = if auto(value) { None } else { Some(parse_choice(value, NORMALIZERS, "normalizer")?) },
            "round-to" => self.round_to = parse_count(value)?,
            "min-keep" => self.min_keep = parse_count(value)?,
            "exclude" => self.exclude = parse_list(value),
            "node-ratio" => {
                self.node_ratios = parse_list(value)
                    .iter()
                    .map(|item| {
                        let (glob, r) = item.rsplit_once('=').ok_or_else(|| format!("`{item}` is not `GLOB=RATIO`"))?;
                        Ok((glob.to_string(), parse_share(r)?))
                    })
                    .collect::<Result<_, String>>()?
            }
            "seed" => self.seed = value.trim().parse().map_err(|_| format!("`{value}` is not a non-negative integer"))?,
            "keep-normalized" => self.keep_normalized = parse_bool(value)?,
            "hessian" => self.hessian = if auto(value) { None } else { Some(parse_choice(value, HessianSource::ALL, "Hessian source")?) },
            "damping" => {
                let d: f64 = value.trim().parse().map_err(|_| format!("`{value}` is not a number"))?;
                if !(0.0..=1e6).contains(&d) {
                    return Err(format!("damping {d} must be a non-negative number"));
                }
                self.damping = d;
            }
            "noise-samples" => self.noise_samples = parse_count(value)?,
            "refit" => self.refit = if auto(value) { None } else { Some(parse_choice(value, RefitMode::ALL, "refit mode")?) },
            "allocation" => self.allocation = if auto(value) { None } else { Some(parse_choice(value, Allocation::ALL, "allocation")?) },
            _ => return Err(format!("no option `{key}`")),
        }
        Ok(())
    }

    fn get(&self, key: &str) -> String {
        use crate::options::{choice_name, print_float};
        match key {
            "criterion" => choice_name(&self.criterion, Criterion::ALL).into(),
            "ratio" => print_float(self.ratio),
            "global" => self.global.to_string(),
            "target" => match self.target {
                None => "none".into(),
                Some(Target::Params(s)) => format!("params={}", print_float(s)),
                Some(Target::Flops(s)) => format!("flops={}", print_float(s)),
            },
            "reduction" => choice_name(&self.reduction, REDUCTIONS).into(),
            "normalizer" => self.normalizer.map_or("auto", |n| choice_name(&n, NORMALIZERS)).into(),
            "round-to" => self.round_to.to_string(),
            "min-keep" => self.min_keep.to_string(),
            "exclude" => self.exclude.join(","),
            "node-ratio" => self.node_ratios.iter().map(|(g, r)| format!("{g}={}", print_float(*r))).collect::<Vec<_>>().join(","),
            "seed" => self.seed.to_string(),
            "keep-normalized" => self.keep_normalized.to_string(),
            "hessian" => self.hessian.map_or("auto", |h| choice_name(&h, HessianSource::ALL)).into(),
            "damping" => print_float(self.damping),
            "noise-samples" => self.noise_samples.to_string(),
            "refit" => self.refit.map_or("auto", |r| choice_name(&r, RefitMode::ALL)).into(),
            "allocation" => self.allocation.map_or("auto", |a| choice_name(&a, Allocation::ALL)).into(),
            _ => String::new(),
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.round_to == 0 || self.min_keep == 0 {
            return Err("round-to and min-keep must be at least 1".into());
        }
        if self.noise_samples == 0 {
            return Err("noise-samples must be at least 1".into());
        }
        if self.allocation == Some(Allocation::Sensitivity) && self.target.is_none() {
            return Err("allocation=sensitivity spreads a target: give target=params=SHARE or flops=SHARE".into());
        }
        if self.allocation == Some(Allocation::Sensitivity) && self.global {
            return Err("allocation=sensitivity and global both choose how many channels each group loses: give one".into());
        }
        for g in self.exclude.iter().chain(self.node_ratios.iter().map(|(g, _)| g)) {
            glob::Pattern::new(g).map_err(|e| format!("glob `{g}`: {e}"))?;
        }
        Ok(())
    }
}

/// Parses `params=SHARE` or `flops=SHARE` (`macs=` is the same as `flops=`).
pub fn parse_target(s: &str) -> Result<Target, String> {
    use crate::options::parse_share;
    match s.trim().split_once('=') {
        Some(("params", v)) => parse_share(v).map(Target::Params),
        Some(("flops" | "macs", v)) => parse_share(v).map(Target::Flops),
        _ => Err(format!("`{s}` is not `params=SHARE` or `flops=SHARE`")),
    }
}

impl PruneOptions {
    /// The Hessian source, `auto` resolved: calib when the pipeline has inputs, noise otherwise.
    pub fn hessian_source(&self, has_inputs: bool) -> HessianSource {
        self.hessian.unwrap_or(if has_inputs { HessianSource::Calib } else { HessianSource::Noise })
    }

    /// The refit mode, `auto` resolved: prefix on calibration inputs, none otherwise (synthetic
    /// inputs deep in a pruned model mislead it).
    pub fn refit_mode(&self, has_inputs: bool) -> RefitMode {
        let calibrated = self.hessian_source(has_inputs) == HessianSource::Calib;
        self.refit.unwrap_or(if calibrated { RefitMode::Prefix } else { RefitMode::None })
    }

    /// The allocation, `auto` resolved: sensitivity for a target ranked within groups, uniform
    /// otherwise (a ratio needs no allocation, and global ranking allocates by itself).
    pub fn allocation(&self) -> Allocation {
        self.allocation.unwrap_or(if self.target.is_some() && !self.global { Allocation::Sensitivity } else { Allocation::Uniform })
    }
}

/// Samples the sensitivity dry runs run on (the first of the given inputs, or synthetic ones
/// along an open batch axis): each group runs the model several times, and ranking groups,
/// unlike estimating a Hessian, needs no more than a few samples.
pub const SENSITIVITY_SAMPLES: usize = 4;

/// The channel ratio of a bare `prunec MODEL -o OUT`.
pub const DEFAULT_RATIO: f64 = 0.3;

/// OBSPA's damping unless told otherwise (SparseGPT's 1% of the mean diagonal).
pub const DEFAULT_DAMPING: f64 = 0.01;

/// A share of the model to remove.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Share of parameters (float constants) to remove.
    Params(f64),
    /// Share of multiply-accumulates (Conv, Gemm, MatMul) to remove.
    Flops(f64),
}

/// What the pass did.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct PruneReport {
    /// The criterion that scored the channels.
    pub criterion: String,
    /// Whether channels were ranked across groups.
    pub global: bool,
    /// The parameter or MAC target, when one was set.
    pub target: Option<Target>,
    /// The channel ratio used (found by bisection for a parameter or MAC target).
    pub ratio: f64,
    /// Pruned or prunable groups: what each kept.
    pub groups: Vec<GroupOutcome>,
    /// Groups not pruned, with the reason.
    pub frozen: Vec<FrozenGroup>,
    /// Channels removed in all.
    pub channels_removed: u64,
    /// Channels in prunable groups before.
    pub channels_prunable: u64,
    /// Weights sliced, per use.
    pub weights_sliced: usize,
    /// Weights copied because their uses lost different channels.
    pub weights_copied: usize,
    /// Shape constants and attributes rewritten.
    pub shape_edits: usize,
    /// Pruned groups that cross a normalisation over their axis: the pruned model is not
    /// expected to equal the masked original there.
    pub normalized: Vec<String>,
    /// The consumer slices of the removed channels (see [`mask_consumers`]).
    #[serde(skip)]
    pub masked: Vec<MaskedSlice>,
    /// The inputs the calibration statistics were measured on, when the criterion used any.
    pub calibration: Option<String>,
    /// How the consumers were compensated (OBSPA, FLAP), when they were.
    pub compensation: Option<CompensationReport>,
    /// The compensated consumers, applied before the rewrite (and to the masked reference).
    #[serde(skip)]
    pub compensated: Vec<Compensation>,
    /// How a target was spread over the groups, when measured sensitivity spread it.
    pub allocation: Option<AllocationReport>,
}

/// What compensation did.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct CompensationReport {
    /// Where the statistics came from.
    pub hessian: String,
    /// Dense consumers with statistics.
    pub layers_with_statistics: usize,
    /// Layers whose weights (and bias) were updated.
    pub layers_compensated: usize,
    /// Levels of layers refit sequentially on the pruned prefix (0: the one-shot update from
    /// the original's statistics).
    pub refit_levels: usize,
    /// Consumers reading removed channels that were left as they were, and why.
    pub notes: Vec<String>,
}

/// One prunable group and what was kept of it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GroupOutcome {
    /// Group id (as `prunec groups` numbers them).
    pub id: usize,
    /// Channels before.
    pub channels: u64,
    /// Channels kept.
    pub kept: u64,
    /// The removed channels, in group order.
    pub removed: Vec<usize>,
    /// For each producer node, the output channels it keeps.
    pub kept_by_producer: BTreeMap<String, Vec<usize>>,
}

/// A group left whole.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct FrozenGroup {
    /// Group id.
    pub id: usize,
    /// Channels, when known.
    pub channels: Option<u64>,
    /// Why it is not pruned.
    pub reason: String,
}

/// A consumer's weight slice that reads removed channels.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct MaskedSlice {
    /// The consuming node.
    pub node: String,
    /// The weight it reads.
    pub weight: String,
    /// The weight's axis.
    pub axis: usize,
    /// The indices along it that read removed channels.
    pub indices: Vec<usize>,
}

/// The `prune` pass.
pub struct ChannelPruning {
    /// Its options.
    pub options: PruneOptions,
}

impl Pass for ChannelPruning {
    fn name(&self) -> &'static str {
        "prune"
    }

    fn options(&self) -> Vec<(&'static str, String)> {
        self.options.values()
    }

    fn needs_shapes(&self) -> bool {
        true
    }

    fn run(&self, model: &mut Model, cx: &mut Context) -> Result<PassReport, PassError> {
        let o = &self.options;
        let opset = default_opset(model);
        let has_inputs = cx.has_inputs();
        let hessian = o.hessian_source(has_inputs);
        let wants_hessians = o.criterion.needs_hessians() && hessian.runs_model();
        let measured_on = statistics_inputs(o, has_inputs)?;
        let statistics = |why: String| move |e: statistics::RefitError| PassError::Measure(format!("{why}: {e}"));
        let name = criterion_name(o.criterion);
        let mut progress = cx.take_progress();
        // `auto` without a runtime (a library pipeline that cannot run models) falls back to
        // one ratio for all, and says so; an explicit `sensitivity` needs the runs.
        let allocation = match o.allocation() {
            Allocation::Sensitivity if o.allocation.is_none() && o.target.is_some() && !cx.has_runtime() => {
                cx.warn(
                    "the target is spread with one ratio for every group: allocation=sensitivity needs a runtime to measure the groups"
                        .into(),
                );
                Allocation::Uniform
            }
            a => a,
        };
        let calibration = match measured_on {
            Some(inputs) => Some(measure_statistics(model, o, inputs, wants_hessians, cx, progress.as_deref_mut())?),
            None => None,
        };
        let resolved = PruneOptions { hessian: Some(hessian), ..o.clone() };
        let scoring = score(&model.graph, &resolved, opset, calibration.as_ref())?;
        let candidates = scoring.candidates();
        let (counts, ratio, allocation) = match (o.target, allocation) {
            (Some(target), Allocation::Sensitivity) if !candidates.is_empty() => {
                let table = dry_runs(model, &candidates, &resolved, PROBE_RATIOS, cx, progress.as_deref_mut())?;
                let (counts, beyond_probes) = sensitivity::allocate(&candidates, &resolved, &table, &Savings::new(&model.graph, target));
                let ratios: Vec<f64> = candidates.iter().zip(&counts).map(|(c, &n)| n as f64 / c.channels as f64).collect();
                let channels: usize = candidates.iter().map(|c| c.channels).sum();
                let ratio = counts.iter().sum::<usize>() as f64 / channels.max(1) as f64;
                (counts, ratio, Some(AllocationReport { table, ratios, beyond_probes }))
            }
            (Some(target), _) => {
                let ratio = bisect_ratio(&Savings::new(&model.graph, target), &candidates, &resolved);
                (counts_at(&candidates, &resolved, ratio), ratio, None)
            }
            (None, _) => (counts_at(&candidates, &resolved, o.ratio), o.ratio, None),
        };
        drop(candidates);
        let (removal, mut report) = finish(&model.graph, &scoring, &resolved, calibration.as_ref(), &counts, ratio, allocation);
        let target = match o.refit_mode(has_inputs) {
            RefitMode::None => None,
            RefitMode::Prefix => Some(statistics::RefitTarget::OwnOutputs),
            RefitMode::Outputs => Some(statistics::RefitTarget::OriginalOutputs),
        };
        if let (Some(target), Some(inputs)) = (target, measured_on)
            && o.criterion == Criterion::Obspa
            && hessian.runs_model()
            && !report.masked.is_empty()
        {
            let mut m = cx.measure(model, inputs).map_err(|e| PassError::Measure(format!("the `{name}` criterion's refit: {e}")))?;
            let mut on_level = |done: usize, total: usize| {
                if let Some(p) = progress.as_deref_mut() {
                    if done == 0 {
                        p.start("prune: refitting the pruned prefix level by level", total as u64);
                    } else {
                        p.step();
                    }
                }
            };
            let refit = statistics::refit(model, m.as_mut(), &report, target, o.damping, &mut on_level)
                .map_err(statistics("running the pruned model level by level to refit its layers".into()))?;
            if let Some(p) = progress.as_deref_mut() {
                p.finish();
            }
            adopt_refit(&mut report, refit);
        }
        cx.restore_progress(progress);
        warn_about(&report, o, cx);
        apply_compensations(&mut model.graph, &report.compensated)
            .map_err(|why| PassError::Rewrite(RewriteError { node: "compensation".into(), op_type: "weight".into(), why }))?;
        let applied = rewrite::apply(&mut model.graph, &removal, opset).map_err(PassError::Rewrite)?;
        report.weights_sliced = applied.weights_sliced;
        report.weights_copied = applied.weights_copied;
        report.shape_edits = applied.edits;
        let dce = crate::remove_dead_code(model);
        let reference = if !report.normalized.is_empty() {
            Reference::Unjudged { why: report.normalized.clone() }
        } else if report.masked.is_empty() {
            Reference::Exact
        } else {
            Reference::Edit(std::sync::Arc::new(MaskedOriginal { compensated: report.compensated.clone(), masked: report.masked.clone() }))
        };
        Ok(PassReport {
            ops_removed: dce.ops_removed,
            values_removed: dce.values_removed,
            reference,
            details: Some(std::sync::Arc::new(report)),
            warnings: Vec::new(),
        })
    }
}

/// The model's version of the default ONNX domain.
fn default_opset(model: &Model) -> i64 {
    model
        .shell
        .opset_import
        .iter()
        .find(|o| o.domain.as_deref().unwrap_or("").is_empty() || o.domain.as_deref() == Some("ai.onnx"))
        .and_then(|o| o.version)
        .unwrap_or(1)
}

/// The dry runs of `prunec sensitivity`: every candidate group of `model` alone loses the share
/// `ratios[k]` of its channels (the lowest scored by `options`' criterion), and the change of
/// the outputs is measured, on the given inputs or on seeded noise. Also returns the groups
/// that are not candidates, with the reason.
pub fn sensitivity_table(
    model: &Model,
    options: &PruneOptions,
    ratios: &[f64],
    cx: &mut Context,
) -> Result<(SensitivityTable, Vec<FrozenGroup>), PassError> {
    if let Some(r) = ratios.iter().find(|r| !(0.0..1.0).contains(*r)) {
        return Err(PassError::BadOption(format!("ratio {r} is not in [0, 1)")));
    }
    let has_inputs = cx.has_inputs();
    let hessian = options.hessian_source(has_inputs);
    let wants_hessians = options.criterion.needs_hessians() && hessian.runs_model();
    let mut progress = cx.take_progress();
    // The same steps as the pass's, so the table is the one its allocation chooses from.
    let mut steps = || {
        let calibration = match statistics_inputs(options, has_inputs)? {
            Some(inputs) => Some(measure_statistics(model, options, inputs, wants_hessians, cx, progress.as_deref_mut())?),
            None => None,
        };
        let resolved = PruneOptions { hessian: Some(hessian), ..options.clone() };
        let scoring = score(&model.graph, &resolved, default_opset(model), calibration.as_ref())?;
        let table = dry_runs(model, &scoring.candidates(), &resolved, ratios, cx, progress.as_deref_mut())?;
        Ok((table, scoring.frozen.clone()))
    };
    let result = steps();
    cx.restore_progress(progress);
    result
}

/// The inputs the criterion's statistics are measured on (`None`: it needs none): the given
/// ones, or seeded noise for Hessians without data.
fn statistics_inputs(o: &PruneOptions, has_inputs: bool) -> Result<Option<Inputs>, PassError> {
    let hessian = o.hessian_source(has_inputs);
    let wants_hessians = o.criterion.needs_hessians() && hessian.runs_model();
    if o.criterion.needs_calibration() || (wants_hessians && hessian == HessianSource::Calib) {
        if !has_inputs {
            return Err(PassError::BadOption(format!(
                "the `{}` criterion{} needs calibration inputs: pass --inputs FILE.npz",
                criterion_name(o.criterion),
                if o.criterion.needs_hessians() { " with --hessian calib" } else { "" }
            )));
        }
        return Ok(Some(Inputs::Given));
    }
    Ok(wants_hessians.then_some(Inputs::Noise { samples: o.noise_samples, seed: o.seed }))
}

/// The criterion's statistics, measured on `inputs`.
fn measure_statistics<'p>(
    model: &Model,
    o: &PruneOptions,
    inputs: Inputs,
    wants_hessians: bool,
    cx: &mut Context,
    mut progress: Option<&mut (dyn crate::measure::Progress + 'p)>,
) -> Result<Calibration, PassError> {
    let name = criterion_name(o.criterion);
    let mut m = cx.measure(model, inputs).map_err(|e| PassError::Measure(format!("the `{name}` criterion's statistics: {e}")))?;
    if let Some(p) = progress.as_deref_mut() {
        p.start(&format!("prune: measuring the `{name}` criterion's statistics"), 0);
    }
    let c = statistics::collect_inputs(model, m.as_mut(), wants_hessians)
        .map_err(|e| PassError::Measure(format!("running the model for the `{name}` criterion's statistics: {e}")))?;
    if let Some(p) = progress {
        p.finish();
    }
    Ok(c)
}

/// The sensitivity dry runs of `candidates` at `ratios`, on a few samples: each group runs
/// the model several times.
fn dry_runs<'p>(
    model: &Model,
    candidates: &[Candidate],
    resolved: &PruneOptions,
    ratios: &[f64],
    cx: &mut Context,
    progress: Option<&mut (dyn crate::measure::Progress + 'p)>,
) -> Result<SensitivityTable, PassError> {
    let inputs = if cx.has_inputs() {
        Inputs::GivenFirst { samples: SENSITIVITY_SAMPLES }
    } else {
        Inputs::Noise { samples: SENSITIVITY_SAMPLES, seed: resolved.seed }
    };
    let mut m = cx
        .measure(model, inputs)
        .map_err(|e| PassError::Measure(format!("allocation=sensitivity runs the model (allocation=uniform does not): {e}")))?;
    sensitivity::measure_groups(model, candidates, resolved, ratios, m.as_mut(), progress)
}

/// Says where the request could not be met sensibly: nothing prunable, a group almost emptied,
/// exclusions that match nothing.
fn warn_about(report: &PruneReport, o: &PruneOptions, cx: &mut Context) {
    if report.channels_prunable == 0 {
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        for f in &report.frozen {
            // The reason's kind, without the names it mentions.
            *reasons.entry(f.reason.split('`').step_by(2).collect::<Vec<_>>().join("…")).or_default() += 1;
        }
        let mut top: Vec<(String, usize)> = reasons.into_iter().collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let top: Vec<String> = top.iter().take(3).map(|(r, n)| format!("{n}× \"{r}\"")).collect();
        cx.warn(format!(
            "nothing is prunable: all {} groups are frozen (most often: {}); `prunec groups MODEL` lists them, and --input-shape often unfreezes a model whose shapes are open",
            report.frozen.len(),
            if top.is_empty() { "no groups at all".into() } else { top.join(", ") }
        ));
    }
    for g in report.groups.iter().filter(|g| g.channels > 1 && (g.channels - g.kept) as f64 >= 0.9 * g.channels as f64) {
        cx.warn(format!("group {} keeps only {} of its {} channels (at least 90% removed)", g.id, g.kept, g.channels));
    }
    if !o.exclude.is_empty() {
        let used: Vec<&str> = report.frozen.iter().filter(|f| f.reason.ends_with("is excluded")).map(|f| f.reason.as_str()).collect();
        for pattern in &o.exclude {
            let p = glob::Pattern::new(pattern).ok();
            if !used.iter().any(|reason| reason.split('`').nth(1).is_some_and(|node| p.as_ref().is_some_and(|p| p.matches(node)))) {
                cx.warn(format!("--exclude `{pattern}` matches no node of a prunable group"));
            }
        }
    }
}

/// The sequential refit's compensations in place of the one-shot ones.
fn adopt_refit(report: &mut PruneReport, refit: Refit) {
    if let Some(c) = report.compensation.as_mut() {
        c.layers_compensated = refit.compensations.len();
        c.refit_levels = refit.levels;
        c.notes = refit.notes;
    }
    report.compensated = refit.compensations;
}

/// Channel removal's reference: the model before the pass with the compensations applied and
/// the removed channels' consumer weights zeroed.
struct MaskedOriginal {
    compensated: Vec<Compensation>,
    masked: Vec<MaskedSlice>,
}

impl ReferenceEdit for MaskedOriginal {
    fn kind(&self) -> &'static str {
        "masked"
    }

    fn describe(&self) -> String {
        if self.compensated.is_empty() { "the masked original".into() } else { "the compensated and masked original".into() }
    }

    fn apply(&self, reference: &mut Model) -> Result<(), String> {
        apply_compensations(&mut reference.graph, &self.compensated)?;
        mask_consumers(&mut reference.graph, &self.masked).map_err(|e| e.to_string())
    }
}

impl PassDetails for PruneReport {
    fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    fn summary(&self) -> Vec<String> {
        let p = self;
        let pruned = p.groups.iter().filter(|g| !g.removed.is_empty()).count();
        let how = match (p.target, &p.allocation) {
            (Some(t), Some(_)) => {
                format!("target {}, per-group ratios from measured sensitivity", serde_json::to_string(&t).unwrap_or_default())
            }
            (Some(t), None) => format!("target {}, found ratio {:.3}", serde_json::to_string(&t).unwrap_or_default(), p.ratio),
            (None, _) => format!("ratio {}", p.ratio),
        };
        let scope = if p.global {
            " across groups"
        } else if p.allocation.is_some() {
            ""
        } else {
            " per group"
        };
        let mut lines = vec![
            format!(
                "prune: {} criterion, {how}{scope}: {pruned} of {} prunable groups pruned ({} frozen), {} of {} channels removed",
                p.criterion,
                p.groups.len(),
                p.frozen.len(),
                p.channels_removed,
                p.channels_prunable
            ),
            format!(
                "       {} weights sliced ({} copied for differing uses), {} shape constants or attributes rewritten",
                p.weights_sliced, p.weights_copied, p.shape_edits
            ),
        ];
        if let Some(a) = &p.allocation {
            let (lo, hi) = a.ratios.iter().fold((f64::INFINITY, 0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
            let probes: Vec<String> = a.table.ratios.iter().map(|r| r.to_string()).collect();
            lines.push(format!(
                "       sensitivity: each group alone at {} of its channels, {} runs on {}; group ratios {lo:.2} to {hi:.2}{}",
                probes.join("/"),
                a.table.runs,
                a.table.measured_on,
                if a.beyond_probes { ", then one common ratio more for all (the target is past the measured ratios)" } else { "" }
            ));
        }
        if let Some(source) = &p.calibration {
            lines.push(format!("       statistics measured on {source}"));
        }
        if let Some(c) = &p.compensation {
            let refit = match c.refit_levels {
                0 => String::new(),
                n => format!(", refit in {n} levels on the pruned prefix"),
            };
            lines.push(format!(
                "       compensated {} layers ({} with statistics from {}{refit})",
                c.layers_compensated, c.layers_with_statistics, c.hessian
            ));
            lines.extend(c.notes.iter().map(|note| format!("       not compensated: {note}")));
        }
        lines
    }
}

/// A prunable group with its channel scores.
pub(crate) struct Candidate<'g> {
    pub(crate) group: &'g Group,
    pub(crate) channels: usize,
    pub(crate) scores: &'g [f64],
    /// The ratio of a `--node-ratio` override.
    pub(crate) ratio: Option<f64>,
}

/// The first half of planning: the groups, the candidates' channel scores, and why every other
/// group is not a candidate. How many channels each candidate loses is decided after it (by a
/// ratio, a bisection, or measured sensitivity), then [`finish`] writes the plan.
pub struct Scoring {
    groups: prunec_ir::Groups,
    /// Each candidate as (index in `groups`, channel scores, `--node-ratio` override).
    scored: Vec<(usize, Vec<f64>, Option<f64>)>,
    frozen: Vec<FrozenGroup>,
}

impl Scoring {
    pub(crate) fn candidates(&self) -> Vec<Candidate<'_>> {
        self.scored
            .iter()
            .map(|(g, scores, ratio)| Candidate { group: &self.groups.groups[*g], channels: scores.len(), scores, ratio: *ratio })
            .collect()
    }
}

/// Chooses what to remove: the removal and a report without the rewrite's figures. A target
/// is met with one ratio for every group (bisection) or by global ranking; the sensitivity
/// allocation needs runs, so the pass does it between [`score`] and [`finish`].
/// `calibration` holds the statistics the criterion measured; `options.hessian` must be
/// resolved (not `auto`).
pub fn plan(
    graph: &Graph,
    options: &PruneOptions,
    opset: i64,
    calibration: Option<&Calibration>,
) -> Result<(Removal, PruneReport), PassError> {
    let scoring = score(graph, options, opset, calibration)?;
    let candidates = scoring.candidates();
    let ratio = match options.target {
        None => options.ratio,
        Some(target) => bisect_ratio(&Savings::new(graph, target), &candidates, options),
    };
    let counts = counts_at(&candidates, options, ratio);
    Ok(finish(graph, &scoring, options, calibration, &counts, ratio, None))
}

/// Analyses the groups and scores the channels of every candidate.
pub fn score(graph: &Graph, options: &PruneOptions, opset: i64, calibration: Option<&Calibration>) -> Result<Scoring, PassError> {
    check_options(options, calibration)?;
    let hessian_source = options.hessian.unwrap_or(HessianSource::Noise);
    let groups = prunec_ir::analyse_groups(graph);
    let globs = |list: &[String]| -> Result<Vec<glob::Pattern>, PassError> {
        list.iter().map(|g| glob::Pattern::new(g).map_err(|e| PassError::BadOption(format!("glob `{g}`: {e}")))).collect()
    };
    let exclude = globs(&options.exclude)?;
    let overrides: Vec<(glob::Pattern, f64)> = globs(&options.node_ratios.iter().map(|(g, _)| g.clone()).collect::<Vec<_>>())?
        .into_iter()
        .zip(options.node_ratios.iter().map(|(_, r)| *r))
        .collect();
    let order: HashMap<String, usize> = graph
        .topo_order()
        .map_err(|source| PassError::BrokeGraph { pass: "prune", source })?
        .iter()
        .enumerate()
        .map(|(i, &op)| (graph.op(op).name.clone(), i))
        .collect();

    let mut frozen = Vec::new();
    let mut eligible = Vec::new();
    for g in &groups.groups {
        let not_candidate = |reason: String| FrozenGroup { id: g.id, channels: g.channels, reason };
        let nodes = || g.weights.iter().map(|w| w.node.as_str());
        if !g.prunable {
            frozen.push(not_candidate(g.frozen_reason.clone().unwrap_or_default()));
        } else if let Some(node) = nodes().find(|n| exclude.iter().any(|p| p.matches(n))) {
            frozen.push(not_candidate(format!("`{node}` is excluded")));
        } else if let Some(why) = crosses_normalization(graph, g).filter(|_| options.keep_normalized) {
            frozen.push(not_candidate(format!("is kept whole (--keep-normalized): {why}")));
        } else if g.channels.unwrap_or(0) <= options.min_keep as u64 {
            frozen.push(not_candidate(format!("has no more than the {} channels kept per group", options.min_keep)));
        } else {
            let mut one = Removal::default();
            one.add(g, &[0]);
            match rewrite::plan_edits(graph, &one, opset) {
                Ok(_) => eligible.push(g),
                Err(e) => frozen.push(not_candidate(format!("cannot be rewritten: {e}"))),
            }
        }
    }
    let statistics = if options.criterion.needs_hessians() {
        hessians(graph, hessian_source, calibration)
    } else {
        obspa::Statistics::Computed(Default::default())
    };
    let consumers = obspa::Consumers::of(graph, &eligible);
    let scores = if options.criterion.needs_hessians() {
        obspa::score_groups(graph, &eligible, options.criterion, options.reduction, &consumers, &statistics, options.damping)
    } else {
        criteria::score_groups(graph, &eligible, options.criterion, options.reduction, options.seed, &order, calibration)
    };
    let mut scored = Vec::new();
    for (g, scores) in eligible.into_iter().zip(scores) {
        match scores {
            Some(scores) => {
                let ratio = overrides.iter().find(|(p, _)| g.weights.iter().any(|w| p.matches(&w.node))).map(|(_, r)| *r);
                scored.push((g.id, scores, ratio));
            }
            None => frozen.push(FrozenGroup {
                id: g.id,
                channels: g.channels,
                reason: format!("has no weights the `{}` criterion scores", criterion_name(options.criterion)),
            }),
        }
    }
    frozen.sort_by_key(|f| f.id);
    Ok(Scoring { groups, scored, frozen })
}

/// The second half of planning: removes `counts[i]` channels (the lowest scored) of each
/// candidate of `scoring`, and reports the choice; `ratio` is the channel ratio to report.
pub(crate) fn finish(
    graph: &Graph,
    scoring: &Scoring,
    options: &PruneOptions,
    calibration: Option<&Calibration>,
    counts: &[usize],
    ratio: f64,
    allocation: Option<AllocationReport>,
) -> (Removal, PruneReport) {
    let hessian_source = options.hessian.unwrap_or(HessianSource::Noise);
    let obs = options.criterion == Criterion::Obspa;
    let candidates = scoring.candidates();
    let mut report = PruneReport {
        criterion: criterion_name(options.criterion).to_string(),
        global: options.global,
        target: options.target,
        frozen: scoring.frozen.clone(),
        allocation,
        ..PruneReport::default()
    };
    let chosen = pick(&candidates, counts);
    let mut removal = Removal::default();
    for (c, removed) in candidates.iter().zip(&chosen) {
        removal.add(c.group, removed);
        report.channels_prunable += c.channels as u64;
        report.channels_removed += removed.len() as u64;
        let gone: BTreeSet<usize> = removed.iter().copied().collect();
        let kept: Vec<usize> = (0..c.channels).filter(|i| !gone.contains(i)).collect();
        let kept_by_producer = c
            .group
            .weights
            .iter()
            .filter(|w| w.role == Role::Producer)
            .map(|w| {
                let mut idx: Vec<usize> = kept.iter().flat_map(|&k| w.indices[k].iter().copied()).collect();
                idx.sort_unstable();
                (w.node.clone(), idx)
            })
            .collect();
        report.groups.push(GroupOutcome {
            id: c.group.id,
            channels: c.channels as u64,
            kept: kept.len() as u64,
            removed: removed.clone(),
            kept_by_producer,
        });
        if removed.is_empty() {
            continue;
        }
        for w in c.group.weights.iter().filter(|w| w.role == Role::Consumer) {
            let indices = removed.iter().flat_map(|&r| w.indices[r].iter().copied()).collect();
            report.masked.push(MaskedSlice { node: w.node.clone(), weight: w.weight.clone(), axis: w.axis, indices });
        }
        if let Some(why) = crosses_normalization(graph, c.group) {
            report.normalized.push(format!("group {}: {why}", c.group.id));
        }
    }
    report.ratio = ratio;
    let measured = options.criterion.needs_calibration() || (options.criterion.needs_hessians() && hessian_source.runs_model());
    report.calibration = calibration.filter(|_| measured).map(|c| c.source.clone());
    if options.criterion.needs_hessians() {
        let statistics = hessians(graph, hessian_source, calibration);
        let eligible: Vec<&Group> = candidates.iter().map(|c| c.group).collect();
        let consumers = obspa::Consumers::of(graph, &eligible);
        let method = if obs { obspa::Method::Obs } else { obspa::Method::MeanIntoBias };
        let (done, notes) = obspa::compensations(graph, &report.masked, &consumers, &statistics, options.damping, method);
        report.compensation = Some(CompensationReport {
            hessian: match hessian_source {
                HessianSource::Calib | HessianSource::Noise => calibration.map(|c| c.source.clone()).unwrap_or_default(),
                HessianSource::Bn => "BatchNormalization statistics".into(),
                HessianSource::Identity => "identity (no compensation)".into(),
            },
            layers_with_statistics: statistics.count(graph),
            layers_compensated: done.len(),
            refit_levels: 0,
            notes,
        });
        report.compensated = done;
    }
    (removal, report)
}

/// The consumers' input statistics for OBSPA and FLAP: measured (in the calibration: its
/// Hessians, or its layers' inputs to compute them from one at a time), derived from
/// BatchNormalization, or none (H = I everywhere).
fn hessians<'c>(graph: &Graph, source: HessianSource, calibration: Option<&'c Calibration>) -> obspa::Statistics<'c> {
    use std::borrow::Cow;
    match (source, calibration) {
        (HessianSource::Calib | HessianSource::Noise, Some(c)) if c.hessians.is_empty() => obspa::Statistics::Measured(&c.layer_inputs),
        (HessianSource::Calib | HessianSource::Noise, Some(c)) => obspa::Statistics::Computed(Cow::Borrowed(&c.hessians)),
        (HessianSource::Bn, _) => obspa::Statistics::Computed(Cow::Owned(
            graph.op_ids().filter_map(|op| Some((graph.op(op).name.clone(), obspa::bn_hessian(graph, op)?))).collect(),
        )),
        _ => obspa::Statistics::Computed(Cow::Owned(BTreeMap::new())),
    }
}

fn check_options(o: &PruneOptions, calibration: Option<&Calibration>) -> Result<(), PassError> {
    let bad = |what: String| Err(PassError::BadOption(what));
    let share = |r: f64| (0.0..1.0).contains(&r);
    if !share(o.ratio) {
        return bad(format!("ratio {} is not in [0, 1)", o.ratio));
    }
    if let Some(Target::Params(r) | Target::Flops(r)) = o.target
        && !share(r)
    {
        return bad(format!("target {r} is not in [0, 1)"));
    }
    if let Some((g, r)) = o.node_ratios.iter().find(|(_, r)| !share(*r)) {
        return bad(format!("ratio {r} for `{g}` is not in [0, 1)"));
    }
    if o.criterion.needs_calibration() && calibration.is_none() {
        return bad(format!("the `{}` criterion needs calibration inputs (--inputs FILE.npz)", criterion_name(o.criterion)));
    }
    let hessian = o.hessian.unwrap_or(HessianSource::Noise);
    if o.criterion.needs_hessians() && hessian.runs_model() && calibration.is_none() {
        return bad(format!(
            "the `{}` criterion with --hessian {} needs Hessians measured by running the model (a pipeline with a runtime measures them)",
            criterion_name(o.criterion),
            obspa::HessianSource::ALL.iter().find(|(_, h)| *h == hessian).map_or("?", |(n, _)| n)
        ));
    }
    if !(0.0..=1e6).contains(&o.damping) {
        return bad(format!("damping {} is not a non-negative number", o.damping));
    }
    if o.round_to == 0 || o.min_keep == 0 {
        return bad("round-to and min-keep must be at least 1".into());
    }
    Ok(())
}

/// How many channels each candidate loses at `ratio` (of each group, or of all with `global`).
pub(crate) fn counts_at(candidates: &[Candidate], options: &PruneOptions, ratio: f64) -> Vec<usize> {
    let counts: Vec<usize> = if options.global {
        let normalizer =
            options.normalizer.unwrap_or(if options.criterion == Criterion::Lamp { Normalizer::None } else { Normalizer::Mean });
        let mut all: Vec<(f64, usize, usize)> = candidates
            .iter()
            .enumerate()
            .flat_map(|(ci, c)| criteria::normalize(c.scores, normalizer).into_iter().enumerate().map(move |(ch, s)| (s, ci, ch)))
            .collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let total: usize = candidates.iter().map(|c| c.channels).sum();
        let mut budget = (total as f64 * ratio).floor() as usize;
        let mut counts = vec![0; candidates.len()];
        for (_, ci, _) in all {
            if budget == 0 {
                break;
            }
            if counts[ci] < candidates[ci].channels.saturating_sub(options.min_keep) {
                counts[ci] += 1;
                budget -= 1;
            }
        }
        counts
    } else {
        candidates.iter().map(|c| (c.channels as f64 * c.ratio.unwrap_or(ratio)).floor() as usize).collect()
    };
    candidates.iter().zip(counts).map(|(c, n)| allowed_count(c, options, n)).collect()
}

/// `wanted` channels of a candidate, within what `min-keep` and `round-to` allow. The kept
/// count rounds up, so rounding never removes more than asked.
pub(crate) fn allowed_count(c: &Candidate, options: &PruneOptions, wanted: usize) -> usize {
    let count = wanted.min(c.channels.saturating_sub(options.min_keep));
    let kept = (c.channels - count).div_ceil(options.round_to) * options.round_to;
    c.channels.saturating_sub(kept.min(c.channels))
}

/// The channels each candidate loses, `counts[i]` of its lowest scored, in ascending order.
pub(crate) fn pick(candidates: &[Candidate], counts: &[usize]) -> Vec<Vec<usize>> {
    candidates
        .iter()
        .zip(counts)
        .map(|(c, &n)| {
            let mut order: Vec<usize> = (0..c.scores.len()).collect();
            // Stable: on equal scores the lower index goes first.
            order.sort_by(|&a, &b| c.scores[a].total_cmp(&c.scores[b]));
            let mut removed: Vec<usize> = order.into_iter().take(n).collect();
            removed.sort_unstable();
            removed
        })
        .collect()
}

/// What a removal saves, as a share of the model that the target counts.
pub(crate) struct Savings<'g> {
    graph: &'g Graph,
    target: Target,
    params: u64,
    before: f64,
}

impl<'g> Savings<'g> {
    pub(crate) fn new(graph: &'g Graph, target: Target) -> Savings<'g> {
        let params = model_stats(&Model { shell: Default::default(), graph: graph.clone() }).parameters;
        let mut s = Savings { graph, target, params, before: 0.0 };
        s.before = s.remaining(&Removal::default());
        s
    }

    fn remaining(&self, removal: &Removal) -> f64 {
        match self.target {
            Target::Params(_) => estimate_params(self.graph, self.params, removal) as f64,
            Target::Flops(_) => estimate_macs(self.graph, removal) as f64,
        }
    }

    /// The share the target asks for.
    pub(crate) fn wanted(&self) -> f64 {
        match self.target {
            Target::Params(s) | Target::Flops(s) => s,
        }
    }

    /// The share `removal` saves (0 where the model has nothing the target counts).
    pub(crate) fn share(&self, removal: &Removal) -> f64 {
        if self.before <= 0.0 { 0.0 } else { 1.0 - self.remaining(removal) / self.before }
    }

    /// The share saved when each candidate loses `counts[i]` channels.
    pub(crate) fn share_of(&self, candidates: &[Candidate], counts: &[usize]) -> f64 {
        let mut removal = Removal::default();
        for (c, removed) in candidates.iter().zip(pick(candidates, counts)) {
            removal.add(c.group, &removed);
        }
        self.share(&removal)
    }
}

/// The smallest channel ratio whose estimated saving reaches the target (the largest possible
/// ratio if none does).
fn bisect_ratio(savings: &Savings, candidates: &[Candidate], options: &PruneOptions) -> f64 {
    if savings.before <= 0.0 {
        return 0.0;
    }
    let saving = |ratio: f64| savings.share_of(candidates, &counts_at(candidates, options, ratio));
    let (mut lo, mut hi) = (0.0, 0.999);
    if saving(hi) < savings.wanted() {
        return hi;
    }
    for _ in 0..24 {
        let mid = (lo + hi) / 2.0;
        if saving(mid) >= savings.wanted() { hi = mid } else { lo = mid }
    }
    hi
}

/// Parameters (float constants and quantised weights) after a removal from a graph of `before` parameters, counting
/// the copies that differing uses force.
fn estimate_params(graph: &Graph, before: u64, removal: &Removal) -> u64 {
    let mut per_constant: BTreeMap<prunec_ir::ValueId, BTreeMap<prunec_ir::OpId, BTreeMap<usize, usize>>> = BTreeMap::new();
    for (&(v, axis, user), set) in &removal.axes {
        if let Some(op) = user.filter(|_| !set.is_empty()) {
            per_constant.entry(v).or_default().entry(op).or_default().insert(axis, set.len());
        }
    }
    // What `model_stats` counts as parameters: float constants and quantised integer weights.
    let quantized = prunec_ir::quantized_weights(graph);
    let mut params = before as i64;
    for (v, uses) in per_constant {
        let Some(t) = constant_tensor(graph, v).filter(|t| t.dtype().is_float() || quantized.contains(&v)) else { continue };
        let dims = t.dims();
        let numel = |spec: &BTreeMap<usize, usize>| {
            dims.iter().enumerate().map(|(a, &d)| d - *spec.get(&a).unwrap_or(&0) as u64).product::<u64>() as i64
        };
        let readers: BTreeSet<_> = graph.consumers(v).into_iter().map(|(op, _)| op).collect();
        let first = uses.values().next().expect("one use at least");
        if readers.iter().all(|op| uses.get(op) == Some(first)) {
            params += numel(first) - t.numel() as i64;
        } else {
            params += uses.values().map(numel).sum::<i64>();
            if readers.iter().all(|op| uses.contains_key(op)) {
                params -= t.numel() as i64;
            }
        }
    }
    params.max(0) as u64
}

/// Multiply-accumulates after a removal, from the resized shapes.
fn estimate_macs(graph: &Graph, removal: &Removal) -> u64 {
    let mut g = graph.clone();
    for (&(v, axis, _), set) in &removal.axes {
        if set.is_empty() {
            continue;
        }
        let value = g.value_mut(v);
        let old = value.shape.as_ref().and_then(|s| s.0.get(axis)).and_then(|d| d.known());
        if let Some(old) = old {
            let new = old.saturating_sub(set.len() as u64);
            if let ValueKind::Initializer(_) = value.kind {
                let mut dims = value.shape.as_ref().and_then(Shape::concrete).unwrap_or_default();
                dims[axis] = new;
                value.shape = Some(Shape::known(&dims));
            } else {
                value.set_dim(axis, new);
            }
        }
    }
    g.op_ids().map(|op| if let prunec_ir::OpCost::Macs(m) = op_cost(&g, op) { m } else { 0 }).sum()
}

/// Whether a group's channels are normalised together (LayerNorm over the axis, a reduction
/// over it): removing a channel then changes the others, so masking is not exact there.
fn crosses_normalization(graph: &Graph, group: &Group) -> Option<String> {
    for ga in group.axes.iter().filter(|a| a.user.is_none()) {
        let rank = graph.value(ga.value).shape.as_ref().map_or(0, |s| s.rank()) as i64;
        for (op_id, _) in graph.consumers(ga.value) {
            let op = graph.op(op_id);
            let covers = |axes: Option<Vec<i64>>| axes.is_none_or(|axes| axes.iter().any(|&a| (a + rank) % rank.max(1) == ga.axis as i64));
            let crosses = match op.op_type.as_str() {
                "LayerNormalization" => {
                    let a = op.attr_int("axis").unwrap_or(-1);
                    (if a < 0 { a + rank } else { a }) <= ga.axis as i64
                }
                "GroupNormalization" | "LpNormalization" | "MeanVarianceNormalization" => true,
                "Softmax" | "LogSoftmax" => covers(Some(vec![op.attr_int("axis").unwrap_or(-1)])),
                t if t.starts_with("Reduce") => covers(
                    op.attr_ints("axes")
                        .map(<[i64]>::to_vec)
                        .or_else(|| graph.op_input(op_id, 1).and_then(|v| constant_tensor(graph, v)).and_then(|t| t.to_i64_vec())),
                ),
                _ => false,
            };
            if crosses {
                return Some(format!("{} `{}` normalises axis {} of `{}`", op.op_type, op.name, ga.axis, graph.value(ga.value).name));
            }
        }
    }
    None
}

fn criterion_name(c: Criterion) -> &'static str {
    Criterion::ALL.iter().find(|(_, x)| *x == c).map_or("?", |(n, _)| n)
}
