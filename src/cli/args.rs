//! Command-line arguments (clap).

use anyhow::{Context, bail};
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
    #[arg(required = true)]
    pub model: Option<PathBuf>,
    /// Where to write the result (its external data, if any, goes to `<OUT>.data`).
    #[arg(short, long, required = true)]
    pub output: Option<PathBuf>,
    /// Comma-separated passes to run, or `none` to write the model back untouched
    /// (`prunec passes` lists them).
    #[arg(long, default_value = prunec::passes::DEFAULT_PIPELINE)]
    pub passes: String,
    /// External data of the output: `keep` (the input's layout), `inline`, or a size threshold
    /// such as `1024`, `64KB`, `16MB`: tensors at least that large go to `<OUT>.data`.
    #[arg(long, default_value = "keep", value_parser = parse_external_data)]
    pub external_data: prunec::backends::onnx::ExternalData,
    /// Files of the external data: `one-file` (`<OUT>.data`) or `per-tensor` (`<OUT>.data`,
    /// `<OUT>.data.1`, `<OUT>.data.2`, … one tensor each).
    #[arg(long, default_value = "one-file", value_parser = parse_data_layout)]
    pub external_data_layout: prunec::backends::onnx::DataLayout,
    #[command(flatten)]
    pub prune: PruneArgs,
    /// Also fold inference BatchNormalization into the Conv or Gemm before it (adds `fold-bn`
    /// to the end of the pipeline).
    #[arg(long)]
    pub fold_bn: bool,
    /// Skip the check that runs the original, pruned and masked models in tract: the only way to
    /// write a model that was not verified. Without it, a verification that fails or cannot run
    /// writes nothing and exits with code 3.
    #[arg(long)]
    pub no_verify: bool,
    /// Verify a model of more than 1 GiB of weights (several copies of the weights in tract);
    /// above that size prunec refuses (exit 3) unless --verify or --no-verify says which.
    #[arg(long, conflicts_with = "no_verify")]
    pub verify: bool,
    /// Inputs for verification (`.npz`, arrays named like the graph inputs); inputs not in it
    /// get seeded random values (said on stderr), and a file with none of them is an error.
    #[arg(long, value_name = "FILE.npz")]
    pub inputs: Option<PathBuf>,
    /// Concrete shape of an input for verification and shape inference, as for `inspect`.
    #[arg(long = "input-shape", value_name = "NAME=DIMS")]
    pub input_shapes: Vec<String>,
    /// Write the report (sizes before and after, groups, verification, timings) as JSON.
    #[arg(long, value_name = "FILE.json")]
    pub report: Option<PathBuf>,
    /// Plan and report, but write no model.
    #[arg(long)]
    pub dry_run: bool,
    /// Output formats, comma-separated: `onnx`, `nnef` (a tract NNEF archive), or `onnx,nnef`
    /// for both from one run, the second beside `--output` with its own ending (`out.onnx` and
    /// `out.nnef.tgz`). Default: the format `--output` names (`.nnef.tgz` is NNEF, else ONNX).
    #[arg(long, value_delimiter = ',', value_parser = parse_format, value_name = "FORMATS")]
    pub emit: Vec<prunec::Format>,
}

/// Options of the `prune` pass.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Share of each group's channels to remove (of all prunable channels with `--global`).
    #[arg(long, default_value_t = prunec::passes::prune::DEFAULT_RATIO, value_parser = parse_share)]
    pub ratio: f64,
    /// Rank channels across groups (scores normalised per group) instead of within each group.
    #[arg(long)]
    pub global: bool,
    /// Remove a share of the model instead of a channel ratio: `params=0.5` or `flops=0.3`
    /// (the channel ratio is found by bisection).
    #[arg(long, value_parser = parse_target)]
    pub target: Option<prunec::passes::prune::Target>,
    /// Channel score: l1, l2, random, bn-scale, lamp, wanda (needs --inputs), obspa or flap
    /// (compensating criteria; their statistics come from --hessian).
    #[arg(long, default_value = "l2", value_parser = parse_criterion)]
    pub criterion: prunec::passes::prune::Criterion,
    /// How the scores of a group's weights combine: mean, sum, max or first.
    #[arg(long, default_value = "mean", value_parser = parse_reduction)]
    pub reduction: prunec::passes::prune::Reduction,
    /// Scaling of group scores for `--global`: none, mean, max, sum, standardization or lamp
    /// (default: mean; none for the lamp criterion).
    #[arg(long, value_parser = parse_normalizer)]
    pub normalizer: Option<prunec::passes::prune::Normalizer>,
    /// Keep channel counts a multiple of N.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub round_to: usize,
    /// Keep at least N channels in every group.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub min_keep: usize,
    /// Do not prune groups with a node whose name matches this glob (repeatable).
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Another ratio for groups with a node matching the glob, as `GLOB=R` (repeatable).
    #[arg(long, value_name = "GLOB=R", value_parser = parse_node_ratio)]
    pub node_ratio: Vec<(String, f64)>,
    /// Seed of the random criterion and of random verification inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Do not prune groups whose channels a normalisation mixes (LayerNorm over a residual
    /// stream); the rest of the model stays checkable by masking equivalence.
    #[arg(long)]
    pub keep_normalized: bool,
    /// Where obspa and flap take their consumers' input statistics from: calib (the --inputs),
    /// noise (seeded synthetic inputs), bn (BatchNormalization statistics, no execution) or
    /// identity (no compensation). Default: calib with --inputs, noise without.
    #[arg(long, value_parser = parse_hessian)]
    pub hessian: Option<prunec::passes::prune::HessianSource>,
    /// OBSPA's damping: this share of the mean diagonal is added to each Hessian's diagonal.
    #[arg(long, default_value_t = prunec::passes::prune::DEFAULT_DAMPING, value_parser = parse_damping, allow_negative_numbers = true)]
    pub damping: f64,
    /// Samples of synthetic input for `--hessian noise` (the batch size, where it is dynamic).
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub noise_samples: usize,
    /// OBSPA with measured statistics: how consumers are compensated. none: once, from the
    /// original model's statistics; prefix: level by level in topological order, each on the
    /// inputs the already pruned and compensated prefix gives it; outputs: as prefix, and every
    /// dense layer downstream is refit to the original's outputs too. Default: prefix with
    /// --hessian calib, none otherwise (synthetic inputs deep in a pruned model mislead it).
    #[arg(long, value_enum)]
    pub refit: Option<RefitMode>,
}

/// How OBSPA compensates (`--refit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RefitMode {
    /// The one-shot update from the original model's Hessians.
    None,
    /// Sequentially, on the Hessians of the pruned prefix.
    Prefix,
    /// Sequentially, every changed dense layer fit to the original's outputs.
    Outputs,
}

impl CompileArgs {
    /// The prune pass's options, with the Hessian source resolved: calib when there are
    /// `--inputs`, noise otherwise, unless `--hessian` says.
    pub fn prune_options(&self) -> prunec::passes::prune::PruneOptions {
        use prunec::passes::prune::HessianSource;
        let hessian = self.prune.hessian.unwrap_or(if self.inputs.is_some() { HessianSource::Calib } else { HessianSource::Noise });
        prunec::passes::prune::PruneOptions { hessian, ..self.prune.options() }
    }

    /// The refit `--refit` asks for, resolved: prefix on calibration inputs, none otherwise.
    pub fn refit_mode(&self) -> RefitMode {
        let calibrated = self.prune_options().hessian == prunec::passes::prune::HessianSource::Calib;
        self.prune.refit.unwrap_or(if calibrated { RefitMode::Prefix } else { RefitMode::None })
    }
}

impl PruneArgs {
    /// The command-line name of the criterion.
    pub fn criterion_name(&self) -> &'static str {
        prunec::passes::prune::Criterion::ALL.iter().find(|(_, c)| *c == self.criterion).map_or("?", |(n, _)| n)
    }

    /// The pass options these arguments ask for.
    pub fn options(&self) -> prunec::passes::prune::PruneOptions {
        prunec::passes::prune::PruneOptions {
            criterion: self.criterion,
            reduction: self.reduction,
            normalizer: self.normalizer,
            ratio: self.ratio,
            global: self.global,
            target: self.target,
            round_to: self.round_to,
            min_keep: self.min_keep,
            exclude: self.exclude.clone(),
            node_ratios: self.node_ratio.clone(),
            seed: self.seed,
            keep_normalized: self.keep_normalized,
            hessian: self.hessian.unwrap_or(prunec::passes::prune::HessianSource::Noise),
            damping: self.damping,
            calibration: None,
            refit: None,
        }
    }
}

fn parse_criterion(s: &str) -> Result<prunec::passes::prune::Criterion, String> {
    use prunec::passes::prune::Criterion;
    Criterion::ALL.iter().find(|(n, _)| *n == s).map(|(_, c)| *c).ok_or_else(|| {
        format!("unknown criterion `{s}`; expected one of {}", Criterion::ALL.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "))
    })
}

fn parse_hessian(s: &str) -> Result<prunec::passes::prune::HessianSource, String> {
    use prunec::passes::prune::HessianSource;
    HessianSource::ALL.iter().find(|(n, _)| *n == s).map(|(_, h)| *h).ok_or_else(|| {
        format!(
            "unknown Hessian source `{s}`; expected one of {}",
            HessianSource::ALL.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
        )
    })
}

fn parse_damping(s: &str) -> Result<f64, String> {
    let d: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if (0.0..=1e6).contains(&d) { Ok(d) } else { Err(format!("damping {d} must be a non-negative number")) }
}

fn parse_reduction(s: &str) -> Result<prunec::passes::prune::Reduction, String> {
    use prunec::passes::prune::Reduction::*;
    Ok(match s {
        "mean" => Mean,
        "sum" => Sum,
        "max" => Max,
        "first" => First,
        _ => return Err(format!("unknown reduction `{s}`; expected mean, sum, max or first")),
    })
}

fn parse_normalizer(s: &str) -> Result<prunec::passes::prune::Normalizer, String> {
    use prunec::passes::prune::Normalizer::*;
    Ok(match s {
        "none" => None,
        "mean" => Mean,
        "max" => Max,
        "sum" => Sum,
        "standardization" => Standardization,
        "lamp" => Lamp,
        _ => return Err(format!("unknown normalizer `{s}`; expected none, mean, max, sum, standardization or lamp")),
    })
}

fn parse_share(s: &str) -> Result<f64, String> {
    s.trim().parse::<f64>().ok().filter(|r| (0.0..1.0).contains(r)).ok_or_else(|| format!("`{s}` is not a share in [0, 1)"))
}

fn parse_target(s: &str) -> Result<prunec::passes::prune::Target, String> {
    use prunec::passes::prune::Target;
    match s.split_once('=') {
        Some(("params", v)) => parse_share(v).map(Target::Params),
        Some(("flops" | "macs", v)) => parse_share(v).map(Target::Flops),
        _ => Err(format!("`{s}` is not `params=SHARE` or `flops=SHARE`")),
    }
}

fn parse_node_ratio(s: &str) -> Result<(String, f64), String> {
    let (glob, r) = s.rsplit_once('=').ok_or_else(|| format!("`{s}` is not `GLOB=RATIO`"))?;
    Ok((glob.to_string(), parse_share(r)?))
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

fn parse_format(s: &str) -> Result<prunec::Format, String> {
    match s.trim() {
        "onnx" => Ok(prunec::Format::Onnx),
        "nnef" | "tract" => Ok(prunec::Format::Nnef),
        _ => Err(format!("unknown output format `{s}`; expected onnx or nnef")),
    }
}

fn parse_data_layout(s: &str) -> Result<prunec::backends::onnx::DataLayout, String> {
    use prunec::backends::onnx::DataLayout;
    match s {
        "one-file" => Ok(DataLayout::OneFile),
        "per-tensor" => Ok(DataLayout::PerTensor),
        _ => Err(format!("`{s}` is not `one-file` or `per-tensor`")),
    }
}

fn parse_external_data(s: &str) -> Result<prunec::backends::onnx::ExternalData, String> {
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
    let mut shapes = BTreeMap::new();
    for spec in specs {
        let (name, dims) = match spec.split_once('=') {
            Some((n, d)) => (n.to_string(), d),
            None if input_names.len() == 1 => (input_names[0].clone(), spec.as_str()),
            None => bail!("--input-shape `{spec}` needs a name (NAME=DIMS): the model has {} inputs", input_names.len()),
        };
        if !input_names.contains(&name) {
            bail!("--input-shape names `{name}`, which is not a graph input (inputs: {})", input_names.join(", "));
        }
        let dims = dims
            .split(',')
            .map(|d| d.trim().parse::<u64>())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("--input-shape `{spec}`: dims must be non-negative integers separated by commas"))?;
        shapes.insert(name, dims);
    }
    Ok(shapes)
}
