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

use crate::{Pass, PassError, PassReport};
pub use criteria::{Calibration, Criterion, Normalizer, Reduction};
pub use obspa::{Compensation, CrossMoments, Hessian, HessianSource, Refit, apply_compensations};
use prunec_ir::{Graph, Group, Model, Role, Shape, ValueKind, constant_tensor, model_stats, op_cost};
pub use rewrite::{Removal, RewriteError, mask_consumers};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// What to remove and how to choose it.
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
    /// Seed of the `random` criterion.
    pub seed: u64,
    /// Leave whole the groups whose channels a normalisation mixes (a LayerNorm'd residual
    /// stream): their removal changes every other channel, which no masking check can vouch for.
    pub keep_normalized: bool,
    /// Where OBSPA and FLAP take their consumers' input statistics from.
    pub hessian: HessianSource,
    /// OBSPA's damping: λ = damping × the mean diagonal of H is added to H's diagonal.
    pub damping: f64,
    /// Activation statistics for the calibration criteria (and measured Hessians).
    #[serde(skip)]
    pub calibration: Option<std::sync::Arc<Calibration>>,
    /// OBSPA's compensations refit on the pruned prefix, measured by the CLI for the channels
    /// this same plan chooses: used instead of the one-shot update.
    #[serde(skip)]
    pub refit: Option<std::sync::Arc<Refit>>,
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
            hessian: HessianSource::Noise,
            damping: DEFAULT_DAMPING,
            calibration: None,
            refit: None,
        }
    }
}

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

    fn needs_shapes(&self) -> bool {
        true
    }

    fn run(&self, model: &mut Model) -> Result<PassReport, PassError> {
        let opset = model
            .shell
            .opset_import
            .iter()
            .find(|o| o.domain.as_deref().unwrap_or("").is_empty() || o.domain.as_deref() == Some("ai.onnx"))
            .and_then(|o| o.version)
            .unwrap_or(1);
        let (removal, mut report) = plan(&model.graph, &self.options, opset)?;
        apply_compensations(&mut model.graph, &report.compensated)
            .map_err(|why| PassError::Rewrite(RewriteError { node: "compensation".into(), op_type: "weight".into(), why }))?;
        let applied = rewrite::apply(&mut model.graph, &removal, opset).map_err(PassError::Rewrite)?;
        report.weights_sliced = applied.weights_sliced;
        report.weights_copied = applied.weights_copied;
        report.shape_edits = applied.edits;
        let dce = crate::cleanup::DeadCodeElimination.run(model)?;
        Ok(PassReport { ops_removed: dce.ops_removed, values_removed: dce.values_removed, prune: Some(report) })
    }
}

/// A prunable group with its channel scores.
struct Candidate<'g> {
    group: &'g Group,
    channels: usize,
    scores: Vec<f64>,
    /// The ratio of a `--node-ratio` override.
    ratio: Option<f64>,
}

/// Chooses what to remove: the removal and a report without the rewrite's figures.
pub fn plan(graph: &Graph, options: &PruneOptions, opset: i64) -> Result<(Removal, PruneReport), PassError> {
    check_options(options)?;
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

    let mut report = PruneReport::default();
    let mut eligible = Vec::new();
    for g in &groups.groups {
        let frozen = |reason: String| FrozenGroup { id: g.id, channels: g.channels, reason };
        let nodes = || g.weights.iter().map(|w| w.node.as_str());
        if !g.prunable {
            report.frozen.push(frozen(g.frozen_reason.clone().unwrap_or_default()));
        } else if let Some(node) = nodes().find(|n| exclude.iter().any(|p| p.matches(n))) {
            report.frozen.push(frozen(format!("`{node}` is excluded")));
        } else if let Some(why) = crosses_normalization(graph, g).filter(|_| options.keep_normalized) {
            report.frozen.push(frozen(format!("is kept whole (--keep-normalized): {why}")));
        } else if g.channels.unwrap_or(0) <= options.min_keep as u64 {
            report.frozen.push(frozen(format!("has no more than the {} channels kept per group", options.min_keep)));
        } else {
            let mut one = Removal::default();
            one.add(g, &[0]);
            match rewrite::plan_edits(graph, &one, opset) {
                Ok(_) => eligible.push(g),
                Err(e) => report.frozen.push(frozen(format!("cannot be rewritten: {e}"))),
            }
        }
    }
    let calibration = options.calibration.as_deref();
    let hessians = if options.criterion.needs_hessians() { hessians(graph, options) } else { Default::default() };
    let obs = options.criterion == Criterion::Obspa;
    let layers = obspa::prepare_layers(graph, &eligible, &hessians, obs, options.damping);
    let scores = if options.criterion.needs_hessians() {
        obspa::score_groups(graph, &eligible, options.criterion, options.reduction, &layers)
    } else {
        criteria::score_groups(graph, &eligible, options.criterion, options.reduction, options.seed, &order, calibration)
    };
    let mut candidates = Vec::new();
    for (g, scores) in eligible.into_iter().zip(scores) {
        match scores {
            Some(scores) => {
                let ratio = overrides.iter().find(|(p, _)| g.weights.iter().any(|w| p.matches(&w.node))).map(|(_, r)| *r);
                candidates.push(Candidate { group: g, channels: scores.len(), scores, ratio });
            }
            None => report.frozen.push(FrozenGroup {
                id: g.id,
                channels: g.channels,
                reason: format!("has no weights the `{}` criterion scores", criterion_name(options.criterion)),
            }),
        }
    }
    report.frozen.sort_by_key(|f| f.id);

    let ratio = match options.target {
        None => options.ratio,
        Some(target) => bisect_ratio(graph, &candidates, options, target),
    };
    let chosen = choose(&candidates, options, ratio);
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
    let measured = options.criterion.needs_calibration() || (options.criterion.needs_hessians() && options.hessian.runs_model());
    report.calibration = calibration.filter(|_| measured).map(|c| c.source.clone());
    if options.criterion.needs_hessians() {
        let method = if obs { obspa::Method::Obs } else { obspa::Method::MeanIntoBias };
        let refit = options.refit.as_deref().filter(|_| obs && options.hessian.runs_model());
        let (done, notes) = match refit {
            Some(r) => (r.compensations.clone(), r.notes.clone()),
            None => obspa::compensations(graph, &report.masked, &layers, method),
        };
        report.compensation = Some(CompensationReport {
            hessian: match options.hessian {
                HessianSource::Calib | HessianSource::Noise => calibration.map(|c| c.source.clone()).unwrap_or_default(),
                HessianSource::Bn => "BatchNormalization statistics".into(),
                HessianSource::Identity => "identity (no compensation)".into(),
            },
            layers_with_statistics: hessians.len(),
            layers_compensated: done.len(),
            refit_levels: refit.map_or(0, |r| r.levels),
            notes,
        });
        report.compensated = done;
    }
    Ok((removal, report))
}

/// The consumers' input statistics for OBSPA and FLAP: measured (in the calibration), derived
/// from BatchNormalization, or none (H = I everywhere).
fn hessians<'o>(graph: &Graph, options: &'o PruneOptions) -> std::borrow::Cow<'o, BTreeMap<String, Hessian>> {
    use std::borrow::Cow;
    match (options.hessian, &options.calibration) {
        (HessianSource::Calib | HessianSource::Noise, Some(c)) => Cow::Borrowed(&c.hessians),
        (HessianSource::Bn, _) => {
            Cow::Owned(graph.op_ids().filter_map(|op| Some((graph.op(op).name.clone(), obspa::bn_hessian(graph, op)?))).collect())
        }
        _ => Cow::Owned(BTreeMap::new()),
    }
}

fn check_options(o: &PruneOptions) -> Result<(), PassError> {
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
    if o.criterion.needs_calibration() && o.calibration.is_none() {
        return bad(format!("the `{}` criterion needs calibration inputs (--inputs FILE.npz)", criterion_name(o.criterion)));
    }
    if o.criterion.needs_hessians() && o.hessian.runs_model() && o.calibration.is_none() {
        return bad(format!(
            "the `{}` criterion with --hessian {} needs Hessians measured by running the model (the CLI measures them)",
            criterion_name(o.criterion),
            obspa::HessianSource::ALL.iter().find(|(_, h)| *h == o.hessian).map_or("?", |(n, _)| n)
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

/// The channels to remove from each candidate, in ascending order, at `ratio`.
fn choose(candidates: &[Candidate], options: &PruneOptions, ratio: f64) -> Vec<Vec<usize>> {
    let ranked = |scores: &[f64]| {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        // Stable: on equal scores the lower index goes first.
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
        order
    };
    let max_removed = |c: &Candidate| c.channels.saturating_sub(options.min_keep);
    let mut counts: Vec<usize> = if options.global {
        let normalizer =
            options.normalizer.unwrap_or(if options.criterion == Criterion::Lamp { Normalizer::None } else { Normalizer::Mean });
        let mut all: Vec<(f64, usize, usize)> = candidates
            .iter()
            .enumerate()
            .flat_map(|(ci, c)| criteria::normalize(&c.scores, normalizer).into_iter().enumerate().map(move |(ch, s)| (s, ci, ch)))
            .collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let total: usize = candidates.iter().map(|c| c.channels).sum();
        let mut budget = (total as f64 * ratio).floor() as usize;
        let mut counts = vec![0; candidates.len()];
        for (_, ci, _) in all {
            if budget == 0 {
                break;
            }
            if counts[ci] < max_removed(&candidates[ci]) {
                counts[ci] += 1;
                budget -= 1;
            }
        }
        counts
    } else {
        candidates.iter().map(|c| ((c.channels as f64 * c.ratio.unwrap_or(ratio)).floor() as usize).min(max_removed(c))).collect()
    };
    for (count, c) in counts.iter_mut().zip(candidates) {
        // Round the kept count up, so rounding never removes more than asked.
        let kept = (c.channels - *count).div_ceil(options.round_to) * options.round_to;
        *count = c.channels.saturating_sub(kept.min(c.channels));
    }
    candidates
        .iter()
        .zip(counts)
        .map(|(c, n)| {
            let mut removed: Vec<usize> = ranked(&c.scores).into_iter().take(n).collect();
            removed.sort_unstable();
            removed
        })
        .collect()
}

/// The smallest channel ratio whose estimated saving reaches the target (the largest possible
/// ratio if none does).
fn bisect_ratio(graph: &Graph, candidates: &[Candidate], options: &PruneOptions, target: Target) -> f64 {
    let params = model_stats(&Model { shell: Default::default(), graph: graph.clone() }).parameters;
    let measure = |removal: &Removal| match target {
        Target::Params(_) => estimate_params(graph, params, removal) as f64,
        Target::Flops(_) => estimate_macs(graph, removal) as f64,
    };
    let share = match target {
        Target::Params(s) | Target::Flops(s) => s,
    };
    let before = measure(&Removal::default());
    if before <= 0.0 {
        return 0.0;
    }
    let saving = |ratio: f64| {
        let mut removal = Removal::default();
        for (c, removed) in candidates.iter().zip(choose(candidates, options, ratio)) {
            removal.add(c.group, &removed);
        }
        1.0 - measure(&removal) / before
    };
    let (mut lo, mut hi) = (0.0, 0.999);
    if saving(hi) < share {
        return hi;
    }
    for _ in 0..24 {
        let mid = (lo + hi) / 2.0;
        if saving(mid) >= share { hi = mid } else { lo = mid }
    }
    hi
}

/// Parameters (float constants) after a removal from a graph of `before` parameters, counting
/// the copies that differing uses force.
fn estimate_params(graph: &Graph, before: u64, removal: &Removal) -> u64 {
    let mut per_constant: BTreeMap<prunec_ir::ValueId, BTreeMap<prunec_ir::OpId, BTreeMap<usize, usize>>> = BTreeMap::new();
    for (&(v, axis, user), set) in &removal.axes {
        if let Some(op) = user.filter(|_| !set.is_empty()) {
            per_constant.entry(v).or_default().entry(op).or_default().insert(axis, set.len());
        }
    }
    let mut params = before as i64;
    for (v, uses) in per_constant {
        let Some(t) = constant_tensor(graph, v).filter(|t| t.dtype().is_float()) else { continue };
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
