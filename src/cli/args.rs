//! Command-line arguments (clap).

use clap::{Args, Parser, Subcommand};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// prunec: prune ONNX models structurally, from the exported file alone.
#[derive(Debug, Parser)]
#[command(
    name = "prunec",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Exit codes: 0 success; 1 error; 2 usage; 3 verification failed or could not run (nothing written; \
                  --no-verify writes an unverified model)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub compile: CompileArgs,
}

/// `prunec MODEL -o OUT`: run a pass pipeline and write the result.
#[derive(Debug, Args)]
pub struct CompileArgs {
    /// The ONNX model to read.
    #[arg(required_unless_present = "print_pipeline")]
    pub model: Option<PathBuf>,
    /// Where to write the result (its external data, if any, goes to `<OUT>.data`); `-` writes
    /// the ONNX model to standard output.
    #[arg(short, long, required_unless_present_any = ["print_pipeline", "dry_run"])]
    pub output: Option<PathBuf>,
    /// The pipeline: passes separated by commas, each with options as `name{key=value,...}`
    /// (`prunec passes` lists them), or `none` to write the model back untouched.
    /// [default: dce,fold,prune,identity]
    #[arg(long)]
    pub passes: Option<String>,
    /// A recipe (TOML, or a `--report` JSON to replay): the pipeline with its options, the
    /// verification and the output settings. Flags given here override it.
    #[arg(long, value_name = "FILE.toml")]
    pub recipe: Option<PathBuf>,
    /// Print the effective pipeline, every option filled in, in the form `--passes` reads back,
    /// and exit.
    #[arg(long)]
    pub print_pipeline: bool,
    /// After the named pass (or `all`), write the IR dump to stderr.
    #[arg(long, value_name = "PASS")]
    pub print_after: Option<String>,
    /// Stop the pipeline after the first run of the named pass; the rest is verified and
    /// written as usual.
    #[arg(long, value_name = "PASS")]
    pub stop_after: Option<String>,
    /// External data of the output: `keep` (the input's layout), `inline`, or a size threshold
    /// such as `1024`, `64KB`, `16MB`: tensors at least that large go to `<OUT>.data`.
    /// [default: keep]
    #[arg(long, value_parser = checked(parse_external_data))]
    pub external_data: Option<String>,
    /// Files of the external data: `one-file` (`<OUT>.data`) or `per-tensor` (`<OUT>.data`,
    /// `<OUT>.data.1`, `<OUT>.data.2`, … one tensor each). [default: one-file]
    #[arg(long, value_parser = checked(parse_data_layout))]
    pub external_data_layout: Option<String>,
    #[command(flatten)]
    pub prune: PruneArgs,
    /// Also fold inference BatchNormalization into the Conv or Gemm before it (adds `fold-bn`
    /// to the end of the pipeline).
    #[arg(long)]
    pub fold_bn: bool,
    /// Skip the check that runs the original, the result and the passes' reference in tract:
    /// the only way to write a model that was not verified. Without it, a verification that
    /// fails or cannot run writes nothing and exits with code 3.
    #[arg(long)]
    pub no_verify: bool,
    /// Verify a model of more than 1 GiB of weights (several copies of the weights in tract);
    /// above that size prunec refuses (exit 3) unless --verify or --no-verify says which.
    #[arg(long, conflicts_with = "no_verify")]
    pub verify: bool,
    /// Largest difference to the passes' reference (the masked original for `prune`), relative
    /// to each output's scale, that verification accepts. [default: 1e-4]
    #[arg(long, value_parser = parse_tolerance)]
    pub tolerance: Option<f64>,
    /// Inputs for verification and for the passes' measurements (`.npz`, arrays named like the
    /// graph inputs); inputs not in it get seeded random values (said on stderr), and a file
    /// with none of them is an error.
    #[arg(long, value_name = "FILE.npz")]
    pub inputs: Option<PathBuf>,
    /// Concrete shape of an input for shape inference, measurements and verification, as for
    /// `inspect`. The output then declares these sizes at its inputs: the passes folded shape
    /// arithmetic at them, so the result is only valid for them (see --open-interface).
    #[arg(long = "input-shape", value_name = "NAME=DIMS")]
    pub input_shapes: Vec<String>,
    /// With --input-shape: keep the sizes the model leaves open open in the output, if the
    /// result works at other sizes too. It is verified again with each open axis doubled in
    /// turn (an axis the original itself cannot take another size of stays as declared), and
    /// refused (exit 3) if it only works at the --input-shape sizes.
    #[arg(long, requires = "input_shapes")]
    pub open_interface: bool,
    /// Write the report (the effective recipe, sizes before and after, each pass's details and
    /// timing, verification) as JSON; `--recipe` replays it.
    #[arg(long, value_name = "FILE.json")]
    pub report: Option<PathBuf>,
    /// Plan, verify and report, but write no model (`--output` is then optional).
    #[arg(long)]
    pub dry_run: bool,
    /// Print only warnings and errors: no report table, no progress.
    #[arg(short, long, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Also print the effective pipeline, each pass's options and every frozen group's reason.
    #[arg(short, long)]
    pub verbose: bool,
    /// Output formats, comma-separated: `onnx`, `nnef` (a tract NNEF archive), or `onnx,nnef`
    /// for both from one run, the second beside `--output` with its own ending (`out.onnx` and
    /// `out.nnef.tgz`). Default: the format `--output` names (`.nnef.tgz` is NNEF, else ONNX).
    #[arg(long, value_delimiter = ',', value_parser = checked(parse_format), value_name = "FORMATS")]
    pub emit: Vec<String>,
}

/// Shorthands for the options of every `prune` entry of the pipeline: a flag sets its key on
/// each `prune` entry of `--passes` that does not set the key itself, and overrides the key in
/// a recipe's entries. `prunec passes` documents each option.
#[derive(Debug, Args)]
#[command(next_help_heading = "Options of the prune pass (shorthand for prune{key=value})")]
pub struct PruneArgs {
    /// Share of each group's channels to remove (of all prunable channels with `--global`).
    /// [default: 0.3]
    #[arg(long, value_parser = prune_value("ratio"))]
    pub ratio: Option<String>,
    /// Rank channels across groups (scores normalised per group) instead of within each group.
    #[arg(long)]
    pub global: bool,
    /// Remove a share of the model instead of a channel ratio: `params=0.5` or `flops=0.3`,
    /// spread over the groups by `--allocation`.
    #[arg(long, value_parser = prune_value("target"))]
    pub target: Option<String>,
    /// How `--target` is spread: sensitivity (each group is first measured alone in dry runs
    /// that remove 30%, 60% and 90% of its channels, on --inputs or seeded noise, and the
    /// budget goes where the outputs change least per parameter saved) or uniform (one channel
    /// ratio for every group, found by bisection; no runs). Default: sensitivity, or the global
    /// ranking with --global.
    #[arg(long, value_parser = prune_value("allocation"))]
    pub allocation: Option<String>,
    /// Channel score: l1, l2, random, bn-scale, lamp, wanda (needs --inputs), obspa or flap
    /// (compensating criteria; their statistics come from --hessian). [default: l2]
    #[arg(long, value_parser = prune_value("criterion"))]
    pub criterion: Option<String>,
    /// How the scores of a group's weights combine: mean, sum, max or first. [default: mean]
    #[arg(long, value_parser = prune_value("reduction"))]
    pub reduction: Option<String>,
    /// Scaling of group scores for `--global`: none, mean, max, sum, standardization or lamp
    /// (default: mean; none for the lamp criterion).
    #[arg(long, value_parser = prune_value("normalizer"))]
    pub normalizer: Option<String>,
    /// Keep channel counts a multiple of N. [default: 1]
    #[arg(long, value_name = "N", value_parser = prune_value("round-to"))]
    pub round_to: Option<String>,
    /// Keep at least N channels in every group. [default: 1]
    #[arg(long, value_name = "N", value_parser = prune_value("min-keep"))]
    pub min_keep: Option<String>,
    /// Do not prune groups with a node whose name matches this glob (repeatable).
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Another ratio for groups with a node matching the glob, as `GLOB=R` (repeatable).
    #[arg(long, value_name = "GLOB=R", value_parser = prune_value("node-ratio"))]
    pub node_ratio: Vec<String>,
    /// Seed of the random criterion, of synthetic statistics inputs and of random verification
    /// inputs. [default: 0]
    #[arg(long, value_parser = prune_value("seed"))]
    pub seed: Option<String>,
    /// Do not prune groups whose channels a normalisation mixes (LayerNorm over a residual
    /// stream); the rest of the model stays checkable by masking equivalence.
    #[arg(long)]
    pub keep_normalized: bool,
    /// Where obspa and flap take their consumers' input statistics from: calib (the --inputs),
    /// noise (seeded synthetic inputs), bn (BatchNormalization statistics, no execution) or
    /// identity (no compensation). Default: calib with --inputs, noise without.
    #[arg(long, value_parser = prune_value("hessian"))]
    pub hessian: Option<String>,
    /// OBSPA's damping: this share of the mean diagonal is added to each Hessian's diagonal.
    /// [default: 0.01]
    #[arg(long, value_parser = prune_value("damping"), allow_negative_numbers = true)]
    pub damping: Option<String>,
    /// Samples of synthetic input for `--hessian noise` (the batch size, where it is dynamic).
    /// [default: 8]
    #[arg(long, value_name = "N", value_parser = prune_value("noise-samples"))]
    pub noise_samples: Option<String>,
    /// OBSPA with measured statistics: how consumers are compensated. none: once, from the
    /// original model's statistics; prefix: level by level in topological order, each on the
    /// inputs the already pruned and compensated prefix gives it; outputs: as prefix, and every
    /// dense layer downstream is refit to the original's outputs too. Default: prefix with
    /// --hessian calib, none otherwise (synthetic inputs deep in a pruned model mislead it).
    #[arg(long, value_parser = prune_value("refit"))]
    pub refit: Option<String>,
}

impl PruneArgs {
    /// The `key=value` pairs the flags given set, in schema order.
    pub fn pairs(&self) -> Vec<(String, String)> {
        let flag = |on: bool| on.then(|| "true".to_string());
        let list = |items: &[String]| (!items.is_empty()).then(|| items.join(","));
        [
            ("criterion", self.criterion.clone()),
            ("ratio", self.ratio.clone()),
            ("global", flag(self.global)),
            ("target", self.target.clone()),
            ("allocation", self.allocation.clone()),
            ("reduction", self.reduction.clone()),
            ("normalizer", self.normalizer.clone()),
            ("round-to", self.round_to.clone()),
            ("min-keep", self.min_keep.clone()),
            ("exclude", list(&self.exclude)),
            ("node-ratio", list(&self.node_ratio)),
            ("seed", self.seed.clone()),
            ("keep-normalized", flag(self.keep_normalized)),
            ("hessian", self.hessian.clone()),
            ("damping", self.damping.clone()),
            ("noise-samples", self.noise_samples.clone()),
            ("refit", self.refit.clone()),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_string(), v?)))
        .collect()
    }
}

/// A value parser that checks a shorthand flag's value with the prune pass's own schema, so the
/// flag and `prune{key=value}` accept exactly the same text.
pub(super) fn prune_value(key: &'static str) -> impl Fn(&str) -> Result<String, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        use prunec::passes::PassOptions;
        prunec::passes::prune::PruneOptions::default().set(key, s).map(|()| s.to_string())
    }
}

/// A value parser that checks the text with `parse` and keeps the text.
fn checked<T: 'static>(parse: fn(&str) -> Result<T, String>) -> impl Fn(&str) -> Result<String, String> + Clone + Send + Sync + 'static {
    move |s: &str| parse(s).map(|_| s.to_string())
}

fn parse_tolerance(s: &str) -> Result<f64, String> {
    let t: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
    if t > 0.0 && t.is_finite() { Ok(t) } else { Err(format!("tolerance {t} must be a positive number")) }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Summarise a model: inputs, outputs, op histogram, parameters, MACs, weight storage.
    Inspect(InspectArgs),
    /// Print the IR text dump (the format of snapshot tests).
    Dump(DumpArgs),
    /// List the dependency groups: the sets of channels that must be removed together.
    Groups(GroupsArgs),
    /// List the passes `--passes` accepts.
    Passes,
    /// Compare an original and a pruned model: latency in tract (and ONNX Runtime, when its
    /// Python package is found), parameters, MACs, weight bytes and output cosine.
    Bench(super::bench::BenchArgs),
    /// List the removable residual layers: sub-blocks, size, cost, data-free score, and the
    /// residual candidates that are declined, with the reason.
    Blocks(super::blocks::BlocksArgs),
    /// List the dual-stream blocks of an MMDiT model: per block the twin ops and weights of its
    /// text and image streams, and the data-free divergence between them.
    Streams(super::streams::StreamsArgs),
    /// Measure what each dependency group costs the outputs: dry runs in which the group alone
    /// loses a share of its lowest-scored channels, on --inputs or seeded noise (the basis of
    /// `--target`'s sensitivity allocation).
    Sensitivity(super::sensitivity::SensitivityArgs),
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Concrete shape of an input, as `NAME=1,3,224,224` (or `1,3,224,224` for a model with
    /// one input); repeatable. Shapes of the rest of the graph are inferred from it.
    #[arg(long = "input-shape", value_name = "NAME=DIMS")]
    pub input_shapes: Vec<String>,
}

#[derive(Debug, Args)]
pub struct DumpArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// Concrete shape of an input, as for `inspect`.
    #[arg(long = "input-shape", value_name = "NAME=DIMS")]
    pub input_shapes: Vec<String>,
}

#[derive(Debug, Args)]
pub struct GroupsArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// Analyse the model as given; by default shape arithmetic of known sizes is folded first
    /// (the `fold` pass), as the default pipeline does before pruning.
    #[arg(long)]
    pub no_fold: bool,
    /// Print JSON (`{"groups": [{"id", "channels", "prunable", "frozen_reason", "members", ...}]}`).
    #[arg(long)]
    pub json: bool,
    /// Concrete shape of an input, as for `inspect`.
    #[arg(long = "input-shape", value_name = "NAME=DIMS")]
    pub input_shapes: Vec<String>,
}

/// Parses the process arguments; exits with code 2 on a usage error.
pub fn parse() -> Cli {
    Cli::parse()
}

pub fn parse_format(s: &str) -> Result<prunec::Format, String> {
    match s.trim() {
        "onnx" => Ok(prunec::Format::Onnx),
        "nnef" | "tract" => Ok(prunec::Format::Nnef),
        _ => Err(format!("unknown output format `{s}`; expected onnx or nnef")),
    }
}

pub fn parse_data_layout(s: &str) -> Result<prunec::backends::onnx::DataLayout, String> {
    use prunec::backends::onnx::DataLayout;
    match s {
        "one-file" => Ok(DataLayout::OneFile),
        "per-tensor" => Ok(DataLayout::PerTensor),
        _ => Err(format!("`{s}` is not `one-file` or `per-tensor`")),
    }
}

pub fn parse_external_data(s: &str) -> Result<prunec::backends::onnx::ExternalData, String> {
    use prunec::backends::onnx::ExternalData;
    match s {
        "keep" => return Ok(ExternalData::KeepLayout),
        "inline" | "none" => return Ok(ExternalData::Inline),
        _ => {}
    }
    let upper = s.to_ascii_uppercase();
    let (digits, scale) = [("GB", 1u64 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)]
        .iter()
        .find_map(|(suffix, scale)| upper.strip_suffix(suffix).map(|d| (d.to_string(), *scale)))
        .unwrap_or((upper.clone(), 1));
    digits
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .map(ExternalData::Threshold)
        .ok_or_else(|| format!("`{s}` is not `keep`, `inline` or a size such as 1024, 64KB or 16MB"))
}

/// Resolves `--input-shape` values against the model's input names.
pub fn input_shapes(specs: &[String], input_names: &[String]) -> anyhow::Result<BTreeMap<String, Vec<u64>>> {
    Ok(prunec::runtime::inputs::parse_input_shapes(specs, input_names)?)
}
